//! The synchronous I/O engine: blocking positioned vectored I/O (`preadv`/`pwritev`) run on a
//! bounded pool of threads, so that the caller's thread (the copy engine's actors) never
//! blocks. The pool is also every engine's [`Engine::pool`], for blocking work such as
//! write-zeroes; which memory goes to the kernel, and in which pieces, is `aligned.rs`'s.
//!
//! ```text
//!  caller thread                     pool (≤ threads_max std threads, started on demand)
//!  submit(work) ──push──► queue ──► worker: run work (owns the buffer and the file handle)
//!       │                              │  drop the file handle first,
//!       ◄──────── oneshot ◄────────────┘  then send (buffer, result) back
//!  await the receiver (Send)
//! ```
//!
//! The buffer moves to the worker with the request and comes back with the completion: nothing
//! is borrowed across the blocking call, so a caller that drops its future early leaves the
//! worker holding the pages until the kernel is done with them.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;

use kcopyd_core::{ReadBuf, WriteBuf};
use rustix::io::Errno;
use tokio::sync::oneshot;

use crate::aligned::{Bounce, Direction, IOVECS_PER_CALL_MAX, MemoryRules, Transfer, bounce_rules, ended_early};
use crate::device::IoEngine;
use crate::engine::{Engine, ReadReply};

/// Largest write of zeroes one call issues when zeroing without offload.
pub const ZEROES_BYTES_PER_WRITE_MAX: usize = 1024 * 1024;

const _: () = assert!(ZEROES_BYTES_PER_WRITE_MAX % crate::device::ALIGNMENT_BYTES_MAX as usize == 0);

type Work = Box<dyn FnOnce() + Send + 'static>;

/// A pool of at most `threads_max` threads running blocking work in submission order.
pub(crate) struct SyncEngine {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    work_ready: Condvar,
    threads_max: usize,
    thread_name: String,
}

struct State {
    queue: VecDeque<Work>,
    threads: usize,
    threads_idle: usize,
    closed: bool,
}

impl SyncEngine {
    /// A pool of up to `threads_max` threads (at least 1) named `thread_name`, with its first
    /// thread running: every submission is served even if no further thread can be started.
    pub(crate) fn new(thread_name: &str, threads_max: usize) -> io::Result<SyncEngine> {
        assert!(threads_max >= 1, "an engine needs a thread");
        let shared = Arc::new(Shared {
            state: Mutex::new(State { queue: VecDeque::new(), threads: 1, threads_idle: 0, closed: false }),
            work_ready: Condvar::new(),
            threads_max,
            thread_name: thread_name.into(),
        });
        spawn_worker(&shared)?;
        Ok(SyncEngine { shared })
    }

    /// Queues `work` and returns the receiver of its result; never blocks on I/O.
    ///
    /// A new thread starts when more work is queued than threads are idle, up to the limit.
    pub(crate) fn submit<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> oneshot::Receiver<T> {
        let (sender, receiver) = oneshot::channel();
        let work: Work = Box::new(move || {
            // `work` and what it captured (the file handle) are dropped before the reply
            // goes out, so that a caller who sees the reply can rely on the handle being shut.
            let output = work();
            let _ = sender.send(output);
        });
        let start_thread = {
            let mut state = self.shared.lock();
            state.queue.push_back(work);
            let start = state.queue.len() > state.threads_idle && state.threads < self.shared.threads_max;
            if start {
                state.threads += 1;
            }
            start
        };
        self.shared.work_ready.notify_one();
        if start_thread && spawn_worker(&self.shared).is_err() {
            // The threads already running serve the queue; only parallelism is lost.
            self.shared.lock().threads -= 1;
        }
        receiver
    }

    /// Threads running now.
    #[cfg(test)]
    pub(crate) fn threads(&self) -> usize {
        self.shared.lock().threads
    }
}

impl Drop for SyncEngine {
    fn drop(&mut self) {
        // Workers finish what is queued (work whose caller went away still owns its buffer),
        // then exit. Nobody waits for them: a drop must not block the caller's thread.
        self.shared.lock().closed = true;
        self.shared.work_ready.notify_all();
    }
}

/// The synchronous engine: every request is blocking work on the pool.
impl Engine for SyncEngine {
    fn kind(&self) -> IoEngine {
        IoEngine::Sync
    }

    fn read(
        &self,
        file: Arc<File>,
        offset_bytes: u64,
        mut buf: ReadBuf,
        rules: Option<MemoryRules>,
    ) -> oneshot::Receiver<ReadReply> {
        self.submit(move || {
            let result = read_at(&file, offset_bytes, &mut buf, rules);
            drop(file);
            (buf, result)
        })
    }

    fn write(
        &self,
        file: Arc<File>,
        offset_bytes: u64,
        buf: WriteBuf,
        rules: Option<MemoryRules>,
    ) -> oneshot::Receiver<io::Result<Transfer>> {
        self.submit(move || {
            let result = write_at(&file, offset_bytes, &buf, rules);
            drop(file);
            result
        })
    }

    fn flush(&self, file: Arc<File>) -> oneshot::Receiver<io::Result<()>> {
        self.submit(move || {
            let result = file.sync_data();
            drop(file);
            result
        })
    }

    fn pool(&self) -> &SyncEngine {
        self
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("engine lock")
    }
}

fn spawn_worker(shared: &Arc<Shared>) -> io::Result<()> {
    let shared = shared.clone();
    thread::Builder::new().name(shared.thread_name.clone()).spawn(move || worker(&shared))?;
    Ok(())
}

fn worker(shared: &Shared) {
    let mut state = shared.lock();
    loop {
        if let Some(work) = state.queue.pop_front() {
            drop(state);
            work();
            state = shared.lock();
            continue;
        }
        if state.closed {
            state.threads -= 1;
            return;
        }
        state.threads_idle += 1;
        state = shared.work_ready.wait(state).expect("engine lock");
        state.threads_idle -= 1;
    }
}

/// Fills `buf`'s window from `offset_bytes`, through a bounce buffer if its segments break
/// `rules` (`None`: buffered I/O, any memory will do).
pub(crate) fn read_at(
    file: &File,
    offset_bytes: u64,
    buf: &mut ReadBuf,
    rules: Option<MemoryRules>,
) -> io::Result<Transfer> {
    let len_bytes = buf.len();
    if let Some(rules) = rules {
        rules.assert_request(offset_bytes, len_bytes);
    }
    let Some(rules) = bounce_rules(rules, buf.segments()) else {
        let mut slices: Vec<IoSliceMut<'_>> = buf.segments_mut().map(IoSliceMut::new).collect();
        preadv_exact(file, &mut slices, offset_bytes)?;
        return Ok(Transfer::Direct);
    };
    let mut bounce = Bounce::new(len_bytes, rules);
    let mut done_bytes = 0;
    while done_bytes < len_bytes {
        let piece = bounce.piece_from(done_bytes);
        preadv_exact(file, &mut [IoSliceMut::new(bounce.memory(&piece))], offset_bytes + piece.start as u64)?;
        bounce.unload(buf.segments_mut(), &piece);
        done_bytes = piece.end;
    }
    Ok(Transfer::Bounced)
}

/// Writes all of `buf` at `offset_bytes`, through a bounce buffer if its segments break
/// `rules` (`None`: buffered I/O).
pub(crate) fn write_at(
    file: &File,
    offset_bytes: u64,
    buf: &WriteBuf,
    rules: Option<MemoryRules>,
) -> io::Result<Transfer> {
    let len_bytes = buf.len();
    if let Some(rules) = rules {
        rules.assert_request(offset_bytes, len_bytes);
    }
    let segments = buf.segments();
    let Some(rules) = bounce_rules(rules, segments.iter().map(|segment| &segment[..])) else {
        let mut slices: Vec<IoSlice<'_>> = segments.iter().map(|segment| IoSlice::new(segment)).collect();
        pwritev_exact(file, &mut slices, offset_bytes)?;
        return Ok(Transfer::Direct);
    };
    let mut bounce = Bounce::new(len_bytes, rules);
    let mut done_bytes = 0;
    while done_bytes < len_bytes {
        let piece = bounce.piece_from(done_bytes);
        let memory = bounce.load(buf, &piece);
        pwritev_exact(file, &mut [IoSlice::new(memory)], offset_bytes + piece.start as u64)?;
        done_bytes = piece.end;
    }
    Ok(Transfer::Bounced)
}

/// Writes `len_bytes` of zeroes at `offset_bytes` with plain writes from the shared, page
/// aligned zero block, at most [`ZEROES_BYTES_PER_WRITE_MAX`] per call.
pub(crate) fn write_zeroes_at(
    file: &File,
    offset_bytes: u64,
    len_bytes: u64,
    rules: Option<MemoryRules>,
) -> io::Result<()> {
    let mut done_bytes = 0;
    while done_bytes < len_bytes {
        let piece_bytes = (len_bytes - done_bytes).min(ZEROES_BYTES_PER_WRITE_MAX as u64);
        write_at(file, offset_bytes + done_bytes, &WriteBuf::zeroes(piece_bytes as usize), rules)?;
        done_bytes += piece_bytes;
    }
    Ok(())
}

/// `preadv` until every slice is full: retried on EINTR, continued after a short read, at
/// most [`IOVECS_PER_CALL_MAX`] slices per call. A read returning 0 (end of file) before the
/// slices are full is an error: the file shrank under the device.
fn preadv_exact(file: &File, mut slices: &mut [IoSliceMut<'_>], mut offset_bytes: u64) -> io::Result<()> {
    let wanted_bytes: usize = slices.iter().map(|slice| slice.len()).sum();
    let mut done_bytes = 0;
    while done_bytes < wanted_bytes {
        let batch = slices.len().min(IOVECS_PER_CALL_MAX);
        match rustix::io::preadv(file, &mut slices[..batch], offset_bytes) {
            Ok(0) => return Err(ended_early(Direction::Read, offset_bytes, wanted_bytes - done_bytes)),
            Ok(n) => {
                done_bytes += n;
                offset_bytes += n as u64;
                IoSliceMut::advance_slices(&mut slices, n);
            }
            Err(Errno::INTR) => {}
            Err(error) => return Err(error.into()),
        }
    }
    Ok(())
}

/// `pwritev` until every slice is written: retried on EINTR, continued after a short write,
/// at most [`IOVECS_PER_CALL_MAX`] slices per call. A write of 0 bytes is an error.
fn pwritev_exact(file: &File, mut slices: &mut [IoSlice<'_>], mut offset_bytes: u64) -> io::Result<()> {
    let wanted_bytes: usize = slices.iter().map(|slice| slice.len()).sum();
    let mut done_bytes = 0;
    while done_bytes < wanted_bytes {
        let batch = slices.len().min(IOVECS_PER_CALL_MAX);
        match rustix::io::pwritev(file, &slices[..batch], offset_bytes) {
            Ok(0) => return Err(ended_early(Direction::Write, offset_bytes, wanted_bytes - done_bytes)),
            Ok(n) => {
                done_bytes += n;
                offset_bytes += n as u64;
                IoSlice::advance_slices(&mut slices, n);
            }
            Err(Errno::INTR) => {}
            Err(error) => return Err(error.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    fn block_on<F: std::future::Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(future)
    }

    #[test]
    fn submit_returns_at_once_and_work_runs_on_another_thread() {
        let engine = SyncEngine::new("kcopyd-io-test", 2).unwrap();
        let (release, gate) = mpsc::channel::<()>();
        let caller = thread::current().id();
        let mut receiver = engine.submit(move || {
            gate.recv().unwrap();
            thread::current().id()
        });
        // The work is blocked on the gate, yet the caller got its receiver back.
        assert!(receiver.try_recv().is_err());
        release.send(()).unwrap();
        let worker = block_on(receiver).unwrap();
        assert_ne!(worker, caller);
    }

    #[test]
    fn threads_never_exceed_the_limit_and_all_work_completes() {
        const THREADS_MAX: usize = 3;
        let engine = SyncEngine::new("kcopyd-io-test", THREADS_MAX).unwrap();
        let running = Arc::new(AtomicUsize::new(0));
        let running_max = Arc::new(AtomicUsize::new(0));
        let (release, gate) = mpsc::channel::<()>();
        let gate = Arc::new(Mutex::new(gate));
        let receivers: Vec<_> = (0..10)
            .map(|i| {
                let (running, running_max, gate) = (running.clone(), running_max.clone(), gate.clone());
                engine.submit(move || {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    running_max.fetch_max(now, Ordering::SeqCst);
                    gate.lock().unwrap().recv_timeout(Duration::from_secs(10)).unwrap();
                    running.fetch_sub(1, Ordering::SeqCst);
                    i
                })
            })
            .collect();
        assert!(engine.threads() <= THREADS_MAX);
        for _ in 0..10 {
            release.send(()).unwrap();
        }
        let results: Vec<usize> = receivers.into_iter().map(|r| block_on(r).unwrap()).collect();
        assert_eq!(results, (0..10).collect::<Vec<_>>());
        assert!(running_max.load(Ordering::SeqCst) <= THREADS_MAX);
        assert_eq!(engine.threads(), THREADS_MAX, "ten queued requests start every allowed thread");
    }

    #[test]
    fn work_queued_before_drop_still_completes() {
        let engine = SyncEngine::new("kcopyd-io-test", 1).unwrap();
        let receivers: Vec<_> = (0..4).map(|i| engine.submit(move || i * 2)).collect();
        drop(engine);
        let results: Vec<usize> = receivers.into_iter().map(|r| block_on(r).unwrap()).collect();
        assert_eq!(results, vec![0, 2, 4, 6]);
    }
}
