//! The io_uring I/O engine: one ring per device, driven by one thread that turns requests
//! into READV / WRITEV / FSYNC submissions and completes each through a oneshot.
//!
//! ```text
//!  caller thread                          ring thread (one per device)
//!  read/write/flush ──channel──► waiting ──► free slot? ──► InFlight { buffer, iovecs, file }
//!       │  └─ write(eventfd) ──► POLL_ADD CQE wakes the thread     │ push SQE, submit_and_wait
//!       │                                                          ▼
//!       │                                   CQE: short? ─► advance the iovecs, push again
//!       │                                        EINTR/EAGAIN ─► push again (bounded)
//!       │                                        done ─► take the slot, drop the file handle,
//!       ◄────────────── oneshot (buffer, result) ◄───────  send the buffer back
//! ```
//!
//! Buffers are owned: a [`ReadBuf`] or [`WriteBuf`] moves into its slot with the iovec array
//! that points into it, and neither leaves the slot before the kernel has posted the CQE of
//! the one submission the slot has outstanding. The slots are a vector of fixed length,
//! allocated before the first submission, so a slot's contents never move either.
//!
//! At most `queue_depth` requests are in the kernel at once; more wait in arrival order. The
//! submission queue has room for every slot plus the wake-up poll, and the completion queue
//! (twice as large) for all of them, so neither can overflow.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::mpsc::{self, TryRecvError};
use std::thread;

use io_uring::{IoUring, opcode, squeue, types};
use kcopyd_core::{ReadBuf, WriteBuf};
use rustix::event::{EventfdFlags, eventfd};
use tokio::sync::oneshot;

use crate::aligned::{Bounce, Direction, IOVECS_PER_CALL_MAX, MemoryRules, Transfer, bounce_rules, ended_early};
use crate::engine::{Engine, IoEngine, ReadReply};
use crate::pool::Pool;

/// Resubmissions of one request after EINTR or EAGAIN before it fails with that error: the
/// kernel retries EAGAIN itself almost always, so a request that keeps getting it is stuck.
pub(crate) const RETRIES_MAX: u32 = 64;

/// The `user_data` of the wake-up poll on the eventfd; slots use their index.
const WAKE_TAG: u64 = u64::MAX;

/// One request for the ring thread.
struct Submission {
    /// Held until the completion, so that the descriptor in the SQE stays open.
    file: Arc<File>,
    offset_bytes: u64,
    rules: Option<MemoryRules>,
    op: Op,
}

enum Op {
    Read { buf: ReadBuf, reply: oneshot::Sender<ReadReply> },
    Write { buf: WriteBuf, reply: oneshot::Sender<io::Result<Transfer>> },
    Flush { reply: oneshot::Sender<io::Result<()>> },
}

/// The io_uring engine: reads, writes and flushes on the ring; blocking work (write-zeroes)
/// on a thread pool beside it, since io_uring has no BLKZEROOUT.
pub(crate) struct UringEngine {
    ring: Ring,
    pool: Pool,
}

impl UringEngine {
    /// The engine over a started ring and the pool for blocking work.
    pub(crate) fn new(ring: Ring, pool: Pool) -> UringEngine {
        UringEngine { ring, pool }
    }
}

impl Engine for UringEngine {
    fn kind(&self) -> IoEngine {
        IoEngine::Uring
    }

    fn read(
        &self,
        file: Arc<File>,
        offset_bytes: u64,
        buf: ReadBuf,
        rules: Option<MemoryRules>,
    ) -> oneshot::Receiver<ReadReply> {
        let (reply, receiver) = oneshot::channel();
        self.ring.submit(Submission { file, offset_bytes, rules, op: Op::Read { buf, reply } });
        receiver
    }

    fn write(
        &self,
        file: Arc<File>,
        offset_bytes: u64,
        buf: WriteBuf,
        rules: Option<MemoryRules>,
    ) -> oneshot::Receiver<io::Result<Transfer>> {
        let (reply, receiver) = oneshot::channel();
        self.ring.submit(Submission { file, offset_bytes, rules, op: Op::Write { buf, reply } });
        receiver
    }

    /// `fdatasync` through the ring (FSYNC with DATASYNC).
    fn flush(&self, file: Arc<File>) -> oneshot::Receiver<io::Result<()>> {
        let (reply, receiver) = oneshot::channel();
        self.ring.submit(Submission { file, offset_bytes: 0, rules: None, op: Op::Flush { reply } });
        receiver
    }

    fn pool(&self) -> &Pool {
        &self.pool
    }
}

/// The caller's side of a ring: a channel to the ring thread and the eventfd that wakes it.
pub(crate) struct Ring {
    /// `None` only while dropping: dropping it tells the ring thread to finish and exit.
    sender: Option<mpsc::Sender<Submission>>,
    wake: Arc<OwnedFd>,
}

impl Ring {
    /// Sets up a ring for `queue_depth` requests in flight and starts its thread.
    ///
    /// # Errors
    /// `io_uring_setup` failed (EPERM where io_uring is disabled, ENOSYS on old kernels), or the
    /// eventfd or the thread could not be made.
    pub(crate) fn start(thread_name: &str, queue_depth: usize) -> io::Result<Ring> {
        assert!(queue_depth >= 1, "an engine needs a slot");
        // Slots plus the wake-up poll; io_uring wants a power of two.
        let entries = u32::try_from(queue_depth + 1).expect("queue depths are bounded").next_power_of_two();
        let ring = IoUring::new(entries)?;
        assert!(ring.params().sq_entries() as usize > queue_depth, "room for every slot and the wake-up poll");
        let wake = Arc::new(eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?);
        let (sender, receiver) = mpsc::channel();
        let thread_wake = wake.clone();
        // The state is built on the ring thread itself: the iovecs' raw pointers never cross
        // threads, and only the ring, the receiver and the eventfd move.
        let run = move || {
            let mut slots = Vec::with_capacity(queue_depth);
            slots.resize_with(queue_depth, || None);
            let ring_thread = RingThread {
                ring,
                receiver,
                wake: thread_wake,
                slots,
                waiting: VecDeque::new(),
                completions: Vec::with_capacity(entries as usize * 2),
                wake_armed: false,
                closing: false,
            };
            ring_thread.run();
        };
        thread::Builder::new().name(thread_name.into()).spawn(run)?;
        Ok(Ring { sender: Some(sender), wake })
    }

    fn submit(&self, submission: Submission) {
        let sender = self.sender.as_ref().expect("set until dropped");
        // A send fails only if the ring thread is gone (it panicked): the submission, and with
        // it the reply sender, is dropped here and the caller's receiver reports it.
        if sender.send(submission).is_ok() {
            wake(&self.wake);
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // Disconnect first, then wake: the thread then sees the disconnection, finishes what is
        // queued or in flight (those buffers belong to the kernel until their CQEs) and exits.
        // Nobody waits for it: a drop must not block the caller's thread.
        drop(self.sender.take());
        wake(&self.wake);
    }
}

/// Adds one to the eventfd. It can only fail with EAGAIN when the counter is about to overflow,
/// and then the thread is due to wake anyway.
fn wake(eventfd: &OwnedFd) {
    let _ = rustix::io::write(eventfd, &1u64.to_ne_bytes());
}

/// The ring thread's state.
struct RingThread {
    ring: IoUring,
    receiver: mpsc::Receiver<Submission>,
    wake: Arc<OwnedFd>,
    /// Requests in the kernel, by `user_data`. Fixed length: a slot never moves.
    slots: Vec<Option<InFlight>>,
    /// Requests received but not yet given a slot, in arrival order.
    waiting: VecDeque<Submission>,
    /// (user_data, result) of the CQEs of one pass, reused.
    completions: Vec<(u64, i32)>,
    /// Whether a POLL_ADD on the eventfd is in the kernel.
    wake_armed: bool,
    /// Whether the engine was dropped: no more submissions will come.
    closing: bool,
}

impl RingThread {
    fn run(mut self) {
        loop {
            self.receive();
            self.start_waiting();
            if self.closing && self.in_flight() == 0 && self.waiting.is_empty() {
                // A wake-up poll may still be armed: it refers to no memory of ours, and the
                // kernel cancels it when the ring is closed.
                return;
            }
            if !self.wake_armed && !self.closing {
                let poll = opcode::PollAdd::new(types::Fd(self.wake.as_raw_fd()), libc::POLLIN as u32)
                    .build()
                    .user_data(WAKE_TAG);
                // SAFETY: a poll request carries no pointer into our memory, only the eventfd's
                // descriptor, which `self.wake` keeps open for as long as the ring exists.
                unsafe { self.ring.submission().push(&poll) }.expect("the submission queue has room for the poll");
                self.wake_armed = true;
            }
            self.wait();
            self.reap();
        }
    }

    fn in_flight(&self) -> usize {
        self.slots.iter().filter(|slot| slot.is_some()).count()
    }

    /// Moves what arrived on the channel to the waiting queue; notes a disconnection.
    fn receive(&mut self) {
        loop {
            match self.receiver.try_recv() {
                Ok(submission) => self.waiting.push_back(submission),
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Disconnected) => {
                    self.closing = true;
                    return;
                }
            }
        }
    }

    /// Gives waiting requests the free slots and pushes their first SQE.
    fn start_waiting(&mut self) {
        while !self.waiting.is_empty() {
            let Some(slot) = self.slots.iter().position(Option::is_none) else { return };
            let submission = self.waiting.pop_front().expect("not empty");
            self.slots[slot] = Some(InFlight::new(submission));
            self.push(slot);
        }
    }

    /// Pushes the SQE for what remains of the request in `slot`.
    fn push(&mut self, slot: usize) {
        let in_flight = self.slots[slot].as_ref().expect("pushing an occupied slot");
        let entry = in_flight.entry().user_data(slot as u64);
        // SAFETY: the SQE points at `in_flight.iovecs[first..]` and through them at the pages
        // of the ReadBuf, the `Bytes` of the WriteBuf or the bounce buffer; all of these are
        // owned by the `InFlight` in `self.slots[slot]` and are heap memory, which does not
        // move even if the `InFlight` did (and it does not: the slot vector never grows). The
        // slot is emptied only in `complete`, after the CQE with this `user_data` was reaped:
        // the kernel is done with the iovecs and the buffer by then. Nothing reads or writes
        // the buffer while the SQE is outstanding. The thread leaves `run` only with every
        // slot empty, and if it unwinds with slots in use `Drop` leaks them rather than free
        // memory the kernel may still write. The descriptor stays open through
        // `in_flight.file`.
        unsafe { self.ring.submission().push(&entry) }.expect("the submission queue has room for every slot");
    }

    /// Submits what was pushed and waits for at least one completion.
    fn wait(&mut self) {
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => return,
                Err(error) if error.raw_os_error() == Some(libc::EINTR) => {}
                // The completion queue is full: reaping makes room.
                Err(error) if error.raw_os_error() == Some(libc::EBUSY) => return,
                Err(error) => panic!("io_uring_enter failed: {error}"),
            }
        }
    }

    fn reap(&mut self) {
        let mut completions = std::mem::take(&mut self.completions);
        completions.extend(self.ring.completion().map(|cqe| (cqe.user_data(), cqe.result())));
        for &(user_data, result) in &completions {
            if user_data == WAKE_TAG {
                self.wake_armed = false;
                // Reset the counter; the channel is drained on the next pass. EAGAIN: already 0.
                let _ = rustix::io::read(&*self.wake, &mut [0u8; 8]);
            } else {
                self.complete(user_data as usize, result);
            }
        }
        completions.clear();
        self.completions = completions;
    }

    /// Handles the CQE of `slot`: push the rest, or finish the request.
    fn complete(&mut self, slot: usize, result: i32) {
        let in_flight = self.slots[slot].as_mut().expect("a CQE for an empty slot");
        match in_flight.advance(result) {
            Step::Again => self.push(slot),
            Step::Done(result) => self.slots[slot].take().expect("occupied").finish(result),
        }
    }
}

impl Drop for RingThread {
    fn drop(&mut self) {
        if self.slots.iter().any(Option::is_some) {
            // Only a panic gets here with requests in the kernel: their buffers must outlive the
            // kernel's use, which nobody will wait for now. Leak them.
            std::mem::forget(std::mem::take(&mut self.slots));
        }
    }
}

/// What to do after a CQE.
enum Step {
    Again,
    Done(io::Result<()>),
}

/// A request in the kernel, with everything its SQE points at.
struct InFlight {
    file: Arc<File>,
    /// Where byte 0 of the request goes on the device.
    offset_bytes: u64,
    len_bytes: usize,
    done_bytes: usize,
    retries: u32,
    op: Op,
    /// Aligned memory the transfer goes through when the buffer breaks the memory rules.
    bounce: Option<Bounce>,
    /// The iovecs still to transfer, from `first`; consumed ones are left in place.
    iovecs: Vec<libc::iovec>,
    first: usize,
}

impl InFlight {
    fn new(submission: Submission) -> InFlight {
        let Submission { file, offset_bytes, rules, mut op } = submission;
        let (len_bytes, bounce_for, iovecs) = match &mut op {
            Op::Read { buf, .. } => {
                let bounce_for = bounce_rules(rules, buf.segments());
                let iovecs = match bounce_for {
                    Some(_) => Vec::new(),
                    None => buf.segments_mut().map(|segment| iovec(segment.as_mut_ptr(), segment.len())).collect(),
                };
                (buf.len(), bounce_for, iovecs)
            }
            Op::Write { buf, .. } => {
                let segments = buf.segments();
                let bounce_for = bounce_rules(rules, segments.iter().map(|segment| &segment[..]));
                let iovecs = match bounce_for {
                    Some(_) => Vec::new(),
                    // The kernel only reads through these (WRITEV): the `*mut` is the iovec's type.
                    None => segments.iter().map(|segment| iovec(segment.as_ptr().cast_mut(), segment.len())).collect(),
                };
                (buf.len(), bounce_for, iovecs)
            }
            Op::Flush { .. } => (0, None, Vec::new()),
        };
        if let (Some(rules), false) = (rules, matches!(op, Op::Flush { .. })) {
            rules.assert_request(offset_bytes, len_bytes);
        }
        let bounce = bounce_for.map(|rules| Bounce::new(len_bytes, rules));
        let mut in_flight =
            InFlight { file, offset_bytes, len_bytes, done_bytes: 0, retries: 0, op, bounce, iovecs, first: 0 };
        if in_flight.bounce.is_some() {
            in_flight.next_piece();
        }
        in_flight
    }

    /// The SQE for what remains: at most [`IOVECS_PER_CALL_MAX`] iovecs.
    fn entry(&self) -> squeue::Entry {
        let fd = types::Fd(self.file.as_raw_fd());
        let batch = &self.iovecs[self.first..self.iovecs.len().min(self.first + IOVECS_PER_CALL_MAX)];
        let (iovecs, count, offset_bytes) =
            (batch.as_ptr(), batch.len() as u32, self.offset_bytes + self.done_bytes as u64);
        match self.op {
            Op::Read { .. } => opcode::Readv::new(fd, iovecs, count).offset(offset_bytes).build(),
            Op::Write { .. } => opcode::Writev::new(fd, iovecs, count).offset(offset_bytes).build(),
            Op::Flush { .. } => opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build(),
        }
    }

    /// Takes in the result of the last submission.
    fn advance(&mut self, result: i32) -> Step {
        if result < 0 {
            let errno = -result;
            if (errno == libc::EINTR || errno == libc::EAGAIN) && self.retries < RETRIES_MAX {
                self.retries += 1;
                return Step::Again;
            }
            return Step::Done(Err(io::Error::from_raw_os_error(errno)));
        }
        let direction = match self.op {
            Op::Flush { .. } => return Step::Done(Ok(())),
            Op::Read { .. } => Direction::Read,
            Op::Write { .. } => Direction::Write,
        };
        let n = result as usize;
        if n == 0 {
            let at_bytes = self.offset_bytes + self.done_bytes as u64;
            return Step::Done(Err(ended_early(direction, at_bytes, self.len_bytes - self.done_bytes)));
        }
        self.retries = 0;
        self.first = advance_iovecs(&mut self.iovecs, self.first, n);
        self.done_bytes += n;
        assert!(self.done_bytes <= self.len_bytes, "the kernel transferred more than asked");
        if self.first < self.iovecs.len() {
            // A short transfer, or more iovecs than one call takes: the rest.
            return Step::Again;
        }
        if self.bounce.is_some() {
            self.piece_done();
        }
        if self.done_bytes == self.len_bytes {
            Step::Done(Ok(()))
        } else {
            assert!(self.bounce.is_some(), "direct iovecs cover the whole request");
            self.next_piece();
            Step::Again
        }
    }

    /// Bounced: the piece that ends at `done_bytes` has been transferred; a read copies it
    /// from the bounce buffer into the caller's buffer.
    fn piece_done(&mut self) {
        let bounce = self.bounce.as_mut().expect("bounced");
        let piece = bounce.piece_to(self.done_bytes);
        if let Op::Read { buf, .. } = &mut self.op {
            bounce.unload(buf.segments_mut(), &piece);
        }
    }

    /// Bounced: points the iovecs at the next piece (from `done_bytes`); a write copies it into
    /// the bounce buffer first.
    fn next_piece(&mut self) {
        let bounce = self.bounce.as_mut().expect("bounced");
        let piece = bounce.piece_from(self.done_bytes);
        let memory = match &self.op {
            Op::Write { buf, .. } => bounce.load(buf, &piece),
            _ => bounce.memory(&piece),
        };
        self.iovecs.clear();
        self.iovecs.push(iovec(memory.as_mut_ptr(), memory.len()));
        self.first = 0;
    }

    /// Drops the file handle, then sends the buffer and the result back.
    fn finish(self, result: io::Result<()>) {
        let InFlight { file, op, bounce, .. } = self;
        drop(file);
        let transfer = if bounce.is_some() { Transfer::Bounced } else { Transfer::Direct };
        // A caller that dropped its future dropped the receiver too: nothing to tell.
        match op {
            Op::Read { buf, reply } => drop(reply.send((buf, result.map(|()| transfer)))),
            Op::Write { buf, reply } => {
                drop(buf);
                drop(reply.send(result.map(|()| transfer)));
            }
            Op::Flush { reply } => drop(reply.send(result)),
        }
    }
}

fn iovec(base: *mut u8, len: usize) -> libc::iovec {
    libc::iovec { iov_base: base.cast(), iov_len: len }
}

/// Consumes `n` bytes of `iovecs` from index `first`; returns the new first index. A partly
/// consumed iovec is shortened in place (the kernel is done with the array when this runs).
///
/// Worked example: lengths [4096, 4096, 4096] from 0, 6144 bytes done → first 1, and iovec 1
/// now starts 2048 bytes further, 2048 bytes long.
fn advance_iovecs(iovecs: &mut [libc::iovec], mut first: usize, mut n: usize) -> usize {
    while n > 0 {
        let iovec = &mut iovecs[first];
        if n >= iovec.iov_len {
            n -= iovec.iov_len;
            first += 1;
        } else {
            iovec.iov_base = iovec.iov_base.cast::<u8>().wrapping_add(n).cast();
            iovec.iov_len -= n;
            n = 0;
        }
    }
    // Skip empty iovecs, so that `first == len` means done.
    while first < iovecs.len() && iovecs[first].iov_len == 0 {
        first += 1;
    }
    first
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lengths(iovecs: &[libc::iovec], first: usize) -> Vec<usize> {
        iovecs[first..].iter().map(|iovec| iovec.iov_len).collect()
    }

    #[test]
    fn short_transfers_resume_inside_an_iovec() {
        let mut memory = [0u8; 3 * 4096];
        let base = memory.as_mut_ptr();
        let mut iovecs: Vec<libc::iovec> = (0..3).map(|i| iovec(base.wrapping_add(i * 4096), 4096)).collect();
        let first = advance_iovecs(&mut iovecs, 0, 6144);
        assert_eq!((first, lengths(&iovecs, first)), (1, vec![2048, 4096]));
        assert_eq!(iovecs[1].iov_base.cast::<u8>(), base.wrapping_add(4096 + 2048));
        let first = advance_iovecs(&mut iovecs, first, 2048);
        assert_eq!((first, lengths(&iovecs, first)), (2, vec![4096]));
        let first = advance_iovecs(&mut iovecs, first, 4096);
        assert_eq!(first, 3, "all consumed");
    }
}
