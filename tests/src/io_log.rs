//! The I/O trace the oracle reads: every request a job issued to a device, when it was issued
//! and when it completed, on one sequence shared with the harness's own marks (cancels).
//!
//! ```text
//!  engine ──read/write──► Forward<Watched>(disk) ──► MemDisk
//!                            │  issue: push an IoRecord { issued: seq }
//!                            │  done:  set done: seq, ok
//!                            ▼
//!                         IoLog  ◄── marks from the harness (cancel job j: seq)
//! ```
//!
//! A request's life is `issued..done` on the sequence; two requests were in flight together
//! exactly when their lives overlap. That is what lets the oracle measure concurrency and
//! order (sub-jobs in flight, pages held, WRITE_SEQ) instead of trusting the engine's word.

use std::io;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

use kcopyd_core::{BlockDevice, Forward, Hooks, IoFuture, RangeSet, ReadBuf, SECTOR_SIZE, WriteBuf};
use kcopyd_sim::MemDisk;

/// Which disk of a scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DiskRef {
    /// Source disk `i`.
    Source(usize),
    /// Target disk `i`.
    Target(usize),
}

/// The kind of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoKind {
    /// A read.
    Read,
    /// A write of data.
    Write,
    /// A write-zeroes (offloaded zeroing).
    WriteZeroes,
}

/// One request: what, where, and its life on the log's sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoRecord {
    /// The disk.
    pub disk: DiskRef,
    /// The kind.
    pub kind: IoKind,
    /// The sectors asked for.
    pub sectors: Range<u64>,
    /// The phase of the run (1: the jobs; 2: the resubmissions after a crash).
    pub phase: u8,
    /// Sequence number of the issue.
    pub issued: u64,
    /// Model time of the issue, µs after the log began.
    pub issued_us: u64,
    /// Sequence number of the completion (`u64::MAX` while in flight).
    pub done: u64,
    /// Model time of the completion, µs after the log began (`u64::MAX` while in flight).
    pub done_us: u64,
    /// Whether it succeeded.
    pub ok: bool,
}

/// A harness event on the same sequence as the requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// Job `j` was asked to cancel.
    Cancel(usize),
    /// Job `j`'s completion callback ran.
    Completed(usize),
    /// Job `j` is about to be submitted.
    Submitting(usize),
    /// Job `j`'s submission was refused.
    Refused(usize),
    /// The client was asked to shut down (in the middle of the run, or at its end).
    ShutdownBegun,
    /// The client's shutdown returned.
    ShutdownReturned,
    /// Prepared callback `p` is about to be prepared.
    Preparing(usize),
    /// Prepared callback `p` was refused.
    PrepareRefused(usize),
    /// Prepared callback `p` is about to be queued (completed or dropped).
    PreparedQueued(usize),
    /// Prepared callback `p` ran.
    PreparedRan(usize),
    /// Job `j`'s completion callback is about to return.
    CallbackReturned(usize),
    /// Prepared callback `p` is about to return.
    PreparedReturned(usize),
}

#[derive(Debug, Default)]
struct LogInner {
    next: u64,
    phase: u8,
    records: Vec<IoRecord>,
    marks: Vec<(u64, Mark)>,
    /// Model time of each mark, µs after the log began (parallel to `marks`).
    mark_us: Vec<u64>,
    began: Option<tokio::time::Instant>,
}

impl LogInner {
    /// Model time now, µs after the log began.
    fn now_us(&self) -> u64 {
        let now = tokio::time::Instant::now();
        let since = self.began.map_or(std::time::Duration::ZERO, |began| now.saturating_duration_since(began));
        kcopyd_sim::to_model(since).as_micros() as u64
    }
}

/// The shared log. Cloning shares it.
#[derive(Debug, Clone, Default)]
pub struct IoLog {
    inner: Arc<Mutex<LogInner>>,
}

impl IoLog {
    /// An empty log in phase 1.
    pub fn new() -> IoLog {
        let log = IoLog::default();
        let mut inner = log.lock();
        inner.phase = 1;
        inner.began = Some(tokio::time::Instant::now());
        drop(inner);
        log
    }

    fn lock(&self) -> MutexGuard<'_, LogInner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Requests issued from now on belong to `phase`.
    pub fn set_phase(&self, phase: u8) {
        self.lock().phase = phase;
    }

    /// Records a harness event; returns its sequence number.
    pub fn mark(&self, mark: Mark) -> u64 {
        let mut inner = self.lock();
        let seq = inner.next;
        inner.next += 1;
        inner.marks.push((seq, mark));
        let at = inner.now_us();
        inner.mark_us.push(at);
        seq
    }

    fn issue(&self, disk: DiskRef, kind: IoKind, sectors: Range<u64>) -> usize {
        let mut inner = self.lock();
        let issued = inner.next;
        inner.next += 1;
        let phase = inner.phase;
        let issued_us = inner.now_us();
        let record =
            IoRecord { disk, kind, sectors, phase, issued, issued_us, done: u64::MAX, done_us: u64::MAX, ok: false };
        inner.records.push(record);
        inner.records.len() - 1
    }

    fn done(&self, index: usize, ok: bool) {
        let mut inner = self.lock();
        let done = inner.next;
        inner.next += 1;
        let done_us = inner.now_us();
        let record = &mut inner.records[index];
        record.done = done;
        record.done_us = done_us;
        record.ok = ok;
    }

    /// Every request so far, in the order issued.
    pub fn records(&self) -> Vec<IoRecord> {
        self.lock().records.clone()
    }

    /// Every harness mark so far, with its sequence number.
    pub fn marks(&self) -> Vec<(u64, Mark)> {
        self.lock().marks.clone()
    }

    /// The model time of every harness mark (µs after the log began), in the order of
    /// [`marks`](IoLog::marks).
    pub fn mark_times(&self) -> Vec<u64> {
        self.lock().mark_us.clone()
    }
}

/// The hooks of a simulated disk whose every request is logged in an [`IoLog`]: reads, writes,
/// write-zeroes and deallocations (logged as write-zeroes: the range reads as zeroes afterwards
/// either way). Everything else — flushes, and allocation queries but for the mapped zeroes
/// below — is the disk's own, through [`Forward`].
///
/// A sparse [`MemDisk`] calls every run of zero sectors unallocated. A thin volume does not:
/// a block it mapped stays mapped when it holds zeroes. `mapped_zeroes` are such runs (device
/// sectors): allocation queries report them allocated, so that a sparse copy reads them and
/// finds them zero by scanning, as on a real thin volume.
///
/// ```text
///  disk:     [ pattern ][ zero 10..30 .............. ][ pattern ]
///  mapped zeroes:              [ 16..24 ]
///  allocated(): 0..10, 16..24, 30..   (the rest of 10..30 is a hole)
/// ```
#[derive(Debug)]
pub struct Watched {
    which: DiskRef,
    log: IoLog,
    mapped_zeroes: RangeSet,
}

impl Watched {
    /// `disk`, known as `which`, logging into `log`.
    pub fn new(disk: Arc<MemDisk>, which: DiskRef, log: IoLog) -> Forward<Watched> {
        Watched::with_mapped_zeroes(disk, which, log, RangeSet::new())
    }

    /// As [`new`](Watched::new), reporting `mapped_zeroes` (device sectors) allocated
    /// whatever the disk holds there.
    pub fn with_mapped_zeroes(
        disk: Arc<MemDisk>,
        which: DiskRef,
        log: IoLog,
        mapped_zeroes: RangeSet,
    ) -> Forward<Watched> {
        Forward::new(disk, Watched { which, log, mapped_zeroes })
    }

    fn sectors(offset_sectors: u64, len_bytes: usize) -> Range<u64> {
        offset_sectors..offset_sectors.saturating_add(len_bytes.div_ceil(SECTOR_SIZE) as u64)
    }

    /// Logs `request` of `kind` on `sectors` from its issue (now) to its completion.
    fn logged<'a, T: Send + 'a>(
        &'a self,
        kind: IoKind,
        sectors: Range<u64>,
        request: IoFuture<'a, T>,
        ok: fn(&T) -> bool,
    ) -> IoFuture<'a, T> {
        let index = self.log.issue(self.which, kind, sectors);
        Box::pin(async move {
            let done = request.await;
            self.log.done(index, ok(&done));
            done
        })
    }
}

impl Hooks for Watched {
    fn read<'a>(
        &'a self,
        inner: &'a dyn BlockDevice,
        offset_sectors: u64,
        buf: ReadBuf,
    ) -> IoFuture<'a, (ReadBuf, io::Result<()>)> {
        let sectors = Watched::sectors(offset_sectors, buf.len());
        self.logged(IoKind::Read, sectors, inner.read(offset_sectors, buf), |(_, result)| result.is_ok())
    }

    fn write<'a>(
        &'a self,
        inner: &'a dyn BlockDevice,
        offset_sectors: u64,
        buf: WriteBuf,
    ) -> IoFuture<'a, io::Result<()>> {
        let sectors = Watched::sectors(offset_sectors, buf.len());
        self.logged(IoKind::Write, sectors, inner.write(offset_sectors, buf), io::Result::is_ok)
    }

    fn write_zeroes<'a>(
        &'a self,
        inner: &'a dyn BlockDevice,
        offset_sectors: u64,
        len_sectors: u64,
    ) -> IoFuture<'a, io::Result<()>> {
        let sectors = offset_sectors..offset_sectors.saturating_add(len_sectors);
        self.logged(IoKind::WriteZeroes, sectors, inner.write_zeroes(offset_sectors, len_sectors), io::Result::is_ok)
    }

    fn deallocate<'a>(
        &'a self,
        inner: &'a dyn BlockDevice,
        offset_sectors: u64,
        len_sectors: u64,
    ) -> IoFuture<'a, io::Result<()>> {
        let sectors = offset_sectors..offset_sectors.saturating_add(len_sectors);
        self.logged(IoKind::WriteZeroes, sectors, inner.deallocate(offset_sectors, len_sectors), io::Result::is_ok)
    }

    /// The disk's allocation, plus the mapped zeroes within the query.
    fn allocated<'a>(
        &'a self,
        inner: &'a dyn BlockDevice,
        offset_sectors: u64,
        len_sectors: u64,
    ) -> IoFuture<'a, io::Result<RangeSet>> {
        Box::pin(async move {
            let mut set = inner.allocated(offset_sectors, len_sectors).await?;
            let end = offset_sectors.saturating_add(len_sectors);
            for range in self.mapped_zeroes.ranges() {
                let (start, stop) = (range.start.max(offset_sectors), range.end.min(end));
                if start < stop {
                    set.insert(start..stop);
                }
            }
            Ok(set)
        })
    }
}
