//! Jobs: validation at submit, and the job actor that runs sub-jobs.
//!
//! ```text
//!  JobActor::started ──spawn──► slot 0 ┐   each slot loops:
//!                     ──spawn──► slot 1 ├─   1. take the pages for one chunk (FIFO pool)
//!                        …             │   2. take the next chunk from the shared cursor
//!                     ──spawn──► slot N ┘   3. wait for the client's throttle (issue only)
//!  all slots done ──► Outcome ──► client    4. read the source once (narrow on error)
//!                                           5. [WRITE_SEQ: wait for this chunk's turn]
//!                                           6. write every target concurrently, record
//! ```
//!
//! Pages are taken before the chunk, so chunks are handed out in the order their pages
//! were granted: under WRITE_SEQ every chunk before the one waiting for its turn already
//! holds its pages and can finish, so waiting for a turn never waits for pages.

use std::cell::{OnceCell, RefCell};
use std::future::Future;
use std::ops::Range;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Poll;

use actix::prelude::*;
use futures_util::future::{Either, join_all, select};
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::client::{ClientActor, JobDone, JobShared, panic_message};
use crate::error::SubmitError;
use crate::io::SubJobIo;
use crate::sparse::{Allocation, HOLE_SUB_JOB_SECTORS_MAX, SparseSubJob, zero_blocks};
use crate::{
    ClientConfig, Flags, Outcome, PAGE_SIZE, PagePool, Pages, RangeSet, ReadBuf, Region, SECTOR_SIZE, Sparse,
    TARGETS_MAX, TargetMask, TargetReport, TargetZeroes, WriteBuf,
};

/// What a job does.
#[derive(Debug)]
pub(crate) enum JobKind {
    Copy { source: Region, sparse: Sparse },
    Zero,
}

/// A validated job: every region checked, sizes worked out.
#[derive(Debug)]
pub(crate) struct JobSpec {
    pub(crate) kind: JobKind,
    pub(crate) targets: Vec<Region>,
    /// Effective flags: WRITE_SEQ added for zoned targets, IGNORE_ERROR dropped with WRITE_SEQ.
    pub(crate) flags: Flags,
    pub(crate) len_sectors: u64,
    /// Sectors per sub-job: a multiple of `block_sectors`, within the page budget.
    pub(crate) chunk_sectors: u64,
    /// The job's logical block in sectors: the largest of its devices'.
    pub(crate) block_sectors: u64,
    /// Slots (sub-jobs in flight): no more than there are chunks.
    pub(crate) slots: usize,
}

impl JobSpec {
    /// Checks a job against its devices and the client's configuration, before any I/O.
    pub(crate) fn validate(
        kind: JobKind,
        targets: Vec<Region>,
        mut flags: Flags,
        config: &ClientConfig,
    ) -> Result<JobSpec, SubmitError> {
        if targets.is_empty() {
            return Err(SubmitError::NoTargets);
        }
        if targets.len() > TARGETS_MAX {
            return Err(SubmitError::TooManyTargets { count: targets.len(), max: TARGETS_MAX });
        }
        let len_sectors = match &kind {
            JobKind::Copy { source, sparse } => {
                if !sparse.zero_block_is_valid() {
                    return Err(SubmitError::ZeroBlockSize { bytes: sparse.zero_block_bytes });
                }
                source.len_sectors
            }
            JobKind::Zero => targets[0].len_sectors,
        };
        for (index, target) in targets.iter().enumerate() {
            if target.len_sectors != len_sectors {
                return Err(SubmitError::CountMismatch {
                    target: index,
                    device: target.device.name().to_owned(),
                    target_sectors: target.len_sectors,
                    source_sectors: len_sectors,
                });
            }
        }
        let source = match &kind {
            JobKind::Copy { source, .. } => Some(source),
            JobKind::Zero => None,
        };
        let mut block_sectors = 1;
        for region in source.into_iter().chain(&targets) {
            block_sectors = block_sectors.max(check_region(region)?);
        }
        for (index, target) in targets.iter().enumerate() {
            if let Some(source) = source {
                if overlaps(source, target) {
                    return Err(SubmitError::TargetOverlapsSource {
                        target: index,
                        device: target.device.name().to_owned(),
                        target_sectors: target.sectors(),
                        source_sectors: source.sectors(),
                    });
                }
            }
            if let Some(first) = targets[..index].iter().position(|earlier| overlaps(earlier, target)) {
                return Err(SubmitError::TargetsOverlap {
                    first,
                    second: index,
                    device: target.device.name().to_owned(),
                });
            }
        }
        let budget_sectors = (config.page_budget_bytes() / SECTOR_SIZE) as u64;
        if block_sectors > budget_sectors {
            return Err(SubmitError::BlockLargerThanBudget {
                block_size: (block_sectors * SECTOR_SIZE as u64) as u32,
                budget_bytes: config.page_budget_bytes(),
            });
        }
        let wanted_sectors = (config.sub_job_size_bytes / SECTOR_SIZE) as u64;
        let chunk_sectors = (wanted_sectors.min(budget_sectors) / block_sectors * block_sectors).max(block_sectors);
        if targets.iter().any(|t| t.device.geometry().zoned) {
            flags |= Flags::WRITE_SEQ;
        }
        if flags.contains(Flags::WRITE_SEQ) {
            flags = Flags::WRITE_SEQ;
        }
        let chunks = len_sectors.div_ceil(chunk_sectors);
        let slots = chunks.min(config.subjobs_in_flight as u64) as usize;
        Ok(JobSpec { kind, targets, flags, len_sectors, chunk_sectors, block_sectors, slots })
    }

    fn chunk_pages(&self) -> usize {
        (self.chunk_sectors as usize * SECTOR_SIZE).div_ceil(PAGE_SIZE)
    }

    fn ignore_error(&self) -> bool {
        self.flags.contains(Flags::IGNORE_ERROR)
    }

    fn write_seq(&self) -> bool {
        self.flags.contains(Flags::WRITE_SEQ)
    }

    /// How the copy treats zeroes ([`Sparse::OFF`] for a zero job).
    fn sparse(&self) -> Sparse {
        match &self.kind {
            JobKind::Copy { sparse, .. } => *sparse,
            JobKind::Zero => Sparse::OFF,
        }
    }

    /// Whether every target takes a hole without data moving through the engine.
    fn holes_are_cheap(&self) -> bool {
        let sparse = self.sparse();
        self.targets.iter().all(|t| sparse.zeroes_are_cheap(&t.device.geometry(), t.device.deallocates()))
    }

    /// Most sectors of one hole sub-job: a hole is written as a zero buffer (and so within a
    /// sub-job's size) to a target whose zeroes are not cheap.
    fn hole_sectors_max(&self) -> u64 {
        if self.holes_are_cheap() {
            HOLE_SUB_JOB_SECTORS_MAX / self.block_sectors * self.block_sectors
        } else {
            self.chunk_sectors
        }
    }
}

/// Polls `future` once: `Ready` if it needed no wait (for counting only real waits).
async fn poll_once<F: Future + Unpin>(mut future: F) -> Poll<F::Output> {
    std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut future).poll(cx))).await
}

/// Checks one region against its device; returns the device's logical block in sectors.
fn check_region(region: &Region) -> Result<u64, SubmitError> {
    let geometry = region.device.geometry();
    let block_sectors = geometry.block_sectors().max(1);
    let end = region.start_sector.checked_add(region.len_sectors);
    if end.is_none_or(|end| end > geometry.len_sectors) {
        return Err(SubmitError::OutOfRange {
            device: region.device.name().to_owned(),
            sectors: region.sectors(),
            device_sectors: geometry.len_sectors,
        });
    }
    if region.start_sector % block_sectors != 0 || region.len_sectors % block_sectors != 0 {
        return Err(SubmitError::Misaligned {
            device: region.device.name().to_owned(),
            sectors: region.sectors(),
            block_size: geometry.logical_block_size,
        });
    }
    Ok(block_sectors)
}

fn overlaps(a: &Region, b: &Region) -> bool {
    let (ra, rb) = (a.sectors(), b.sectors());
    a.device.id() == b.device.id() && ra.start < rb.end && rb.start < ra.end
}

/// What the slots of one job share. Single-threaded: the borrow is never held across an await.
struct JobState {
    /// Next job-relative sector to hand out.
    cursor: u64,
    /// An error stopped the job (without IGNORE_ERROR).
    stopped: bool,
    /// The job-relative start of the earliest sub-job that stopped the job (a failed read or
    /// write, or one given up on cancel). Under WRITE_SEQ, sub-jobs before it are still
    /// written and sub-jobs from it on are not: they would leave a hole.
    stopped_at: u64,
    /// WRITE_SEQ: the job-relative sector whose writes go next.
    write_turn: u64,
    read_err: bool,
    write_err: TargetMask,
    /// Source sectors (job-relative) that could not be read.
    read_failed: RangeSet,
    /// Per target, job-relative sectors whose write failed.
    write_failed: Vec<RangeSet>,
    /// Per target, job-relative sectors written with the source's data.
    copied: Vec<RangeSet>,
    /// The message of the first panic in a slot (a device's or the engine's).
    panicked: Option<String>,
    /// A sub-job already taken was given up because the job was cancelled while it waited
    /// for the throttle.
    sub_job_given_up: bool,
}

impl JobState {
    /// Stops the job because of the sub-job starting at job-relative sector `sector`.
    fn stop_at(&mut self, sector: u64) {
        self.stopped = true;
        self.stopped_at = self.stopped_at.min(sector);
    }
}

/// One job's context, shared by its slots (and held by the client actor, which reads it if the
/// job actor is dropped before it finishes).
pub(crate) struct JobRun {
    spec: Arc<JobSpec>,
    pool: PagePool,
    io: Arc<SubJobIo>,
    shared: Arc<JobShared>,
    state: RefCell<JobState>,
    turn_changed: Notify,
    /// The outcome, stored by the job actor when its last slot is done.
    finished: RefCell<Option<Outcome>>,
    /// A sparse copy skipping holes: the source's allocation, known before any slot starts.
    allocation: OnceCell<Allocation>,
}

impl JobRun {
    /// The outcome the job actor stored when it finished, taken once.
    pub(crate) fn take_outcome(&self) -> Option<Outcome> {
        self.finished.borrow_mut().take()
    }

    /// The outcome of a job whose actor went away before it finished (its actix System was
    /// dropped): cancelled, with every sector not yet written reported as not copied. Writes
    /// that were in flight may still land; they count as not copied.
    pub(crate) fn abandoned_outcome(&self) -> Outcome {
        if self.state.try_borrow().is_err() {
            // Dropped in the middle of a state change (a panic unwinding): claim nothing.
            let targets = self
                .spec
                .targets
                .iter()
                .map(|t| TargetReport { write_failed: RangeSet::new(), not_copied: RangeSet::from_range(t.sectors()) })
                .collect();
            return Outcome { targets, cancelled: true, ..Outcome::default() };
        }
        Outcome { cancelled: true, ..self.outcome() }
    }

    /// The next chunk, or `None` when the job is done, stopped or cancelled. A sparse copy's
    /// chunks follow the source's allocation: data, or a hole (nothing to read).
    fn take_chunk(&self) -> Option<SparseSubJob> {
        let mut state = self.state.borrow_mut();
        if state.cursor >= self.spec.len_sectors || state.stopped {
            return None;
        }
        if self.shared.cancel_requested() {
            return None;
        }
        let start = state.cursor;
        let sub_job = match self.allocation.get() {
            Some(allocation) => {
                allocation.next(start, self.spec.len_sectors, self.spec.chunk_sectors, self.spec.hole_sectors_max())
            }
            None => SparseSubJob {
                sectors: start..(start + self.spec.chunk_sectors).min(self.spec.len_sectors),
                hole: false,
            },
        };
        assert!(sub_job.sectors.start == start && sub_job.sectors.end > start);
        assert!(sub_job.sectors.end - start <= self.spec.chunk_sectors || sub_job.hole);
        state.cursor = sub_job.sectors.end;
        Some(sub_job)
    }

    fn finished(&self) -> bool {
        let state = self.state.borrow();
        state.cursor >= self.spec.len_sectors || state.stopped || self.shared.cancel_requested()
    }

    /// Runs one slot's `work`; a panic in it (a device's or the engine's own) stops the job
    /// instead of taking the actor, and the job's completion, down with it.
    async fn guarded(self: Rc<Self>, work: impl Future<Output = ()>) {
        if let Err(payload) = AssertUnwindSafe(work).catch_unwind().await {
            let mut state = self.state.borrow_mut();
            // Which sub-job panicked is not known, and the WRITE_SEQ waiters released below no
            // longer keep their order: nothing more is written.
            state.stop_at(0);
            state.panicked.get_or_insert_with(|| panic_message(&*payload));
            drop(state);
            // WRITE_SEQ: the panicking chunk never takes its turn; release those waiting for it.
            self.turn_changed.notify_waiters();
        }
    }

    /// One slot: chunk after chunk until none is left.
    async fn run_slot(self: Rc<Self>) {
        while !self.finished() {
            match &self.spec.kind {
                JobKind::Copy { source, .. } => {
                    let Some(mut pages) = self.alloc_pages().await else { break };
                    let Some(SparseSubJob { sectors: chunk, hole }) = self.take_chunk() else { break };
                    if hole {
                        // A hole reads nothing: its pages go back at once.
                        drop(pages);
                        // Paced by the bytes it moves: none where every target's zeroes are cheap.
                        let paced = if self.spec.holes_are_cheap() { chunk.start..chunk.start } else { chunk.clone() };
                        if !self.throttle_sub_job(&paced).await {
                            self.give_up_sub_job(chunk).await;
                            break;
                        }
                        self.write_hole(chunk).await;
                        continue;
                    }
                    if !self.throttle_sub_job(&chunk).await {
                        drop(pages);
                        self.give_up_sub_job(chunk).await;
                        break;
                    }
                    let len_bytes = (chunk.end - chunk.start) as usize * SECTOR_SIZE;
                    pages.truncate(len_bytes.div_ceil(PAGE_SIZE));
                    self.copy_chunk(source, chunk, ReadBuf::new(pages, len_bytes)).await;
                }
                JobKind::Zero => {
                    let Some(SparseSubJob { sectors: chunk, .. }) = self.take_chunk() else { break };
                    if !self.throttle_sub_job(&chunk).await {
                        self.give_up_sub_job(chunk).await;
                        break;
                    }
                    let data = WriteBuf::zeroes((chunk.end - chunk.start) as usize * SECTOR_SIZE);
                    self.write_chunk(chunk.clone(), data, RangeSet::from_range(chunk), RangeSet::new()).await;
                }
            }
        }
    }

    /// Waits for the pages of one sub-job; `None` if the job was cancelled meanwhile (so that
    /// a cancelled job completes even while other jobs hold every page).
    async fn alloc_pages(&self) -> Option<Pages> {
        let mut alloc = std::pin::pin!(self.pool.alloc(self.spec.chunk_pages()));
        if let Poll::Ready(pages) = poll_once(alloc.as_mut()).await {
            return Some(pages);
        }
        let began = Instant::now();
        let cancelled = std::pin::pin!(self.shared.cancelled());
        let pages = match select(alloc, cancelled).await {
            Either::Left((pages, _)) => Some(pages),
            Either::Right(_) => None,
        };
        self.io.stats.waited_for_pages(self.io.clock.to_model(began.elapsed()));
        pages
    }

    /// The throttle's hook: waits until the client's throttle lets a sub-job of these
    /// (job-relative) sectors be issued. Only this sub-job's task waits; `false` if the job
    /// was cancelled meanwhile.
    async fn throttle_sub_job(&self, sub_job: &Range<u64>) -> bool {
        let len_bytes = (sub_job.end - sub_job.start) * SECTOR_SIZE as u64;
        let mut admitted = std::pin::pin!(self.io.throttler.admit_sub_job(len_bytes));
        if poll_once(admitted.as_mut()).await.is_ready() {
            return true;
        }
        let began = Instant::now();
        let cancelled = std::pin::pin!(self.shared.cancelled());
        let admitted = matches!(select(admitted, cancelled).await, Either::Left(_));
        self.io.stats.waited_for_throttle(self.io.clock.to_model(began.elapsed()));
        admitted
    }

    /// Gives up a sub-job that was taken but never issued (the job was cancelled): nothing is
    /// written, and under WRITE_SEQ later sub-jobs get their turn.
    async fn give_up_sub_job(&self, sub_job: Range<u64>) {
        {
            let mut state = self.state.borrow_mut();
            state.sub_job_given_up = true;
            if self.spec.write_seq() {
                state.stop_at(sub_job.start);
            }
        }
        self.write_chunk(sub_job, WriteBuf::default(), RangeSet::new(), RangeSet::new()).await;
    }

    /// Writes a hole of the source (job-relative `hole`) to every target as zeroes.
    async fn write_hole(&self, hole: Range<u64>) {
        let whole = RangeSet::from_range(hole.clone());
        // A zero buffer only for targets that must be written with data (within a sub-job).
        let data = if self.spec.holes_are_cheap() {
            WriteBuf::default()
        } else {
            WriteBuf::zeroes((hole.end - hole.start) as usize * SECTOR_SIZE)
        };
        self.write_chunk(hole, data, whole.clone(), whole).await;
    }

    /// The zero blocks of a chunk just read (job-relative), if the copy scans for them.
    fn zero_blocks(&self, chunk: &Range<u64>, data: &WriteBuf) -> RangeSet {
        match self.spec.sparse().zero_block_sectors(self.spec.block_sectors) {
            Some(zero_block_sectors) => zero_blocks(data, chunk.start, zero_block_sectors),
            None => RangeSet::new(),
        }
    }

    /// Reads one chunk of the source and writes it to every target.
    async fn copy_chunk(&self, source: &Region, chunk: Range<u64>, buf: ReadBuf) {
        let (buf, result) = self.io.read(&source.device, source.start_sector + chunk.start, buf).await;
        let whole = RangeSet::from_range(chunk.clone());
        let buf = match (buf, result) {
            (Some(buf), Ok(())) => {
                let data = buf.freeze();
                let zeroes = self.zero_blocks(&chunk, &data);
                return self.write_chunk(chunk, data, whole, zeroes).await;
            }
            (buf, Err(_)) => buf,
            (None, Ok(())) => unreachable!("a read that kept its buffer timed out"),
        };
        self.state.borrow_mut().read_err = true;
        // A timed-out read took the buffer with it: without it there is nothing to narrow
        // into, and re-reading a stuck device would only wait again. The whole chunk failed.
        let Some(buf) = buf.filter(|_| self.spec.ignore_error()) else {
            {
                let mut state = self.state.borrow_mut();
                if !self.spec.ignore_error() {
                    state.stop_at(chunk.start);
                }
                state.read_failed.insert(chunk.clone());
            }
            // Nothing to write, but under WRITE_SEQ later chunks wait for this one's turn.
            return self.write_chunk(chunk, WriteBuf::default(), RangeSet::new(), RangeSet::new()).await;
        };
        let (buf, unreadable) = self.narrow(source, chunk.clone(), buf).await;
        self.state.borrow_mut().read_failed.extend(&unreadable);
        match buf {
            Some(buf) => {
                let data = buf.freeze();
                let zeroes = self.zero_blocks(&chunk, &data).difference(&unreadable);
                self.write_chunk(chunk, data, whole.difference(&unreadable), zeroes).await
            }
            None => self.write_chunk(chunk, WriteBuf::default(), RangeSet::new(), RangeSet::new()).await,
        }
    }

    /// Re-reads a chunk that failed in halves, down to the job's logical block, into the same
    /// pages. Returns the buffer and the job-relative sectors that stayed unreadable; if a
    /// re-read timed out, the buffer stays with the device and the whole chunk is unreadable.
    async fn narrow(&self, source: &Region, chunk: Range<u64>, mut buf: ReadBuf) -> (Option<ReadBuf>, RangeSet) {
        let block = self.spec.block_sectors;
        let mut unreadable = RangeSet::new();
        let mut pending = vec![chunk.clone()];
        let mut known_bad = true; // the whole chunk already failed once
        while let Some(piece) = pending.pop() {
            if !known_bad {
                let bytes = (piece.start - chunk.start) as usize * SECTOR_SIZE
                    ..(piece.end - chunk.start) as usize * SECTOR_SIZE;
                buf.set_window(bytes);
                let (back, result) = self.io.read(&source.device, source.start_sector + piece.start, buf).await;
                let Some(back) = back else { return (None, RangeSet::from_range(chunk)) };
                buf = back;
                if result.is_ok() {
                    continue;
                }
            }
            known_bad = false;
            let blocks = (piece.end - piece.start) / block;
            if blocks <= 1 {
                unreadable.insert(piece);
                continue;
            }
            let middle = piece.start + blocks / 2 * block;
            pending.push(middle..piece.end);
            pending.push(piece.start..middle);
        }
        buf.reset_window();
        (Some(buf), unreadable)
    }

    /// Writes the `readable` parts of `chunk` (job-relative) from `data` to every target; the
    /// `zeroes` among them (holes, zero blocks) as the copy's [`TargetZeroes`] says where that
    /// is cheap for the target, and as data (from `data`) where it is not.
    async fn write_chunk(&self, chunk: Range<u64>, data: WriteBuf, readable: RangeSet, zeroes: RangeSet) {
        debug_assert!(zeroes.difference(&readable).is_empty());
        let sparse = self.spec.sparse();
        if self.spec.write_seq() {
            loop {
                let turn = self.turn_changed.notified();
                let my_turn = {
                    let state = self.state.borrow();
                    state.write_turn == chunk.start || state.panicked.is_some()
                };
                if my_turn {
                    break;
                }
                turn.await;
            }
        }
        // Under WRITE_SEQ a stopped job writes nothing from the sub-job that stopped it on: a
        // later one would leave a hole. The ones before it were read and still land.
        let skip = self.spec.write_seq() && chunk.start >= self.state.borrow().stopped_at;
        if !skip && !readable.is_empty() {
            let writes = self.spec.targets.iter().map(|target| {
                let data = &data;
                let cheap = sparse.zeroes_are_cheap(&target.device.geometry(), target.device.deallocates());
                let pieces = pieces_in_order(&readable, if cheap { &zeroes } else { &EMPTY });
                async move {
                    for (piece, zero) in pieces {
                        let at = target.start_sector + piece.start;
                        let result = match (zero, sparse.target_zeroes) {
                            (true, TargetZeroes::Skip) => Ok(()),
                            (true, TargetZeroes::Deallocate) if target.device.deallocates() => {
                                self.io.deallocate(&target.device, at, piece.end - piece.start).await
                            }
                            (true, _) => self.io.write_zeroes(&target.device, at, piece.end - piece.start).await,
                            (false, _) => {
                                let bytes = (piece.start - chunk.start) as usize * SECTOR_SIZE
                                    ..(piece.end - chunk.start) as usize * SECTOR_SIZE;
                                self.io.write(&target.device, at, data.slice(bytes)).await
                            }
                        };
                        if result.is_err() {
                            return Err(piece);
                        }
                    }
                    Ok(())
                }
            });
            let results = join_all(writes).await;
            let mut state = self.state.borrow_mut();
            for (index, result) in results.into_iter().enumerate() {
                match result {
                    Ok(()) => state.copied[index].extend(&readable),
                    Err(failed) => {
                        state.write_err.set(index);
                        state.write_failed[index].insert(failed.clone());
                        // The pieces before the failed one did land.
                        let landed = readable.difference(&RangeSet::from_range(failed.start..chunk.end));
                        state.copied[index].extend(&landed);
                        if !self.spec.ignore_error() {
                            state.stop_at(chunk.start);
                        }
                    }
                }
            }
        }
        drop(data);
        self.shared.add_done(chunk.end - chunk.start);
        if self.spec.write_seq() {
            self.state.borrow_mut().write_turn = chunk.end;
            self.turn_changed.notify_waiters();
        }
    }

    /// Zeroes every target with one offloaded request each.
    async fn zero_offloaded(self: Rc<Self>) {
        let len = self.spec.len_sectors;
        // One request per target that moves no data through the engine, and cannot be paced:
        // it waits for the busy limit only (the rate counts the bytes the engine moves).
        if !self.throttle_sub_job(&(0..0)).await {
            self.state.borrow_mut().sub_job_given_up = true;
            return;
        }
        let requests = self.spec.targets.iter().map(|t| self.io.write_zeroes(&t.device, t.start_sector, len));
        let results = join_all(requests).await;
        let mut state = self.state.borrow_mut();
        state.cursor = len;
        for (index, result) in results.into_iter().enumerate() {
            match result {
                Ok(()) => state.copied[index].insert(0..len),
                Err(_) => {
                    state.write_err.set(index);
                    state.write_failed[index].insert(0..len);
                }
            }
        }
        self.shared.add_done(len);
    }

    /// The job's outcome, in device coordinates.
    fn outcome(&self) -> Outcome {
        let state = self.state.borrow();
        let whole = RangeSet::from_range(0..self.spec.len_sectors);
        let read_failed = match &self.spec.kind {
            JobKind::Copy { source, .. } => on_device(&state.read_failed, source),
            JobKind::Zero => RangeSet::new(),
        };
        let targets = self
            .spec
            .targets
            .iter()
            .enumerate()
            .map(|(index, target)| TargetReport {
                write_failed: on_device(&state.write_failed[index], target),
                not_copied: on_device(&whole.difference(&state.copied[index]), target),
            })
            .collect();
        Outcome {
            read_err: state.read_err,
            write_err: state.write_err,
            read_failed,
            targets,
            // Cancelled only if the request left part of the job never started.
            cancelled: self.shared.cancel_requested()
                && (state.cursor < self.spec.len_sectors || state.sub_job_given_up),
            panicked: state.panicked.clone(),
            callback_panicked: None,
        }
    }
}

/// An empty set, for targets that take every zero as data.
static EMPTY: RangeSet = RangeSet::new();

/// The pieces of `readable` in sector order, each marked whether it is in `zeroes` (a subset).
fn pieces_in_order(readable: &RangeSet, zeroes: &RangeSet) -> Vec<(Range<u64>, bool)> {
    let data = readable.difference(zeroes);
    let mut pieces: Vec<(Range<u64>, bool)> = data
        .ranges()
        .iter()
        .map(|r| (r.clone(), false))
        .chain(zeroes.ranges().iter().map(|r| (r.clone(), true)))
        .collect();
    pieces.sort_by_key(|(range, _)| range.start);
    pieces
}

/// Job-relative sectors in `region`'s device coordinates. Validation checked that the region
/// lies inside its device, so the shift cannot leave the sector numbers.
fn on_device(sectors: &RangeSet, region: &Region) -> RangeSet {
    sectors.shifted(0, region.start_sector).expect("a validated region lies inside its device")
}

/// The actor that runs one job on the client's arbiter.
pub(crate) struct JobActor {
    id: u64,
    run: Rc<JobRun>,
    slots_running: usize,
    client: Addr<ClientActor>,
}

impl JobActor {
    pub(crate) fn new(
        id: u64,
        spec: Arc<JobSpec>,
        pool: PagePool,
        io: Arc<SubJobIo>,
        shared: Arc<JobShared>,
        client: Addr<ClientActor>,
    ) -> JobActor {
        let targets = spec.targets.len();
        let state = JobState {
            cursor: 0,
            stopped: false,
            stopped_at: u64::MAX,
            write_turn: 0,
            read_err: false,
            write_err: TargetMask::default(),
            read_failed: RangeSet::new(),
            write_failed: vec![RangeSet::new(); targets],
            copied: vec![RangeSet::new(); targets],
            panicked: None,
            sub_job_given_up: false,
        };
        let run = Rc::new(JobRun {
            spec,
            pool,
            io,
            shared,
            state: RefCell::new(state),
            turn_changed: Notify::new(),
            allocation: OnceCell::new(),
            finished: RefCell::new(None),
        });
        JobActor { id, run, slots_running: 0, client }
    }

    /// The job's context, which the client actor keeps until the job completes.
    pub(crate) fn run(&self) -> Rc<JobRun> {
        self.run.clone()
    }

    fn slot_done(&mut self, ctx: &mut Context<Self>) {
        self.slots_running -= 1;
        if self.slots_running == 0 {
            let outcome = self.run.outcome();
            debug_assert!(
                outcome.cancelled
                    || self.run.state.borrow().stopped
                    || self.run.shared.progress().done_sectors == self.run.spec.len_sectors
            );
            *self.run.finished.borrow_mut() = Some(outcome);
            self.client.do_send(JobDone { id: self.id });
            ctx.stop();
        }
    }
}

impl Actor for JobActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let spec = &self.run.spec;
        let offload =
            matches!(spec.kind, JobKind::Zero) && spec.targets.iter().all(|t| t.device.geometry().write_zeroes);
        if offload && !self.run.shared.cancel_requested() {
            self.slots_running = 1;
            let work = self.run.clone().guarded(self.run.clone().zero_offloaded());
            ctx.spawn(work.into_actor(self).map(|(), actor, ctx| actor.slot_done(ctx)));
            return;
        }
        if let JobKind::Copy { source, sparse } = &spec.kind {
            if sparse.skip_holes && spec.len_sectors > 0 {
                // Ask the source for its allocation first; the slots follow it.
                let (run, source) = (self.run.clone(), source.clone());
                let query = async move {
                    let allocation = Allocation::query(&source, run.spec.len_sectors, run.spec.block_sectors).await;
                    run.allocation.set(allocation).expect("queried once");
                };
                ctx.spawn(query.into_actor(self).map(|(), actor, ctx| actor.start_slots(ctx)));
                return;
            }
        }
        self.start_slots(ctx);
    }
}

impl JobActor {
    /// Starts the job's slots (sub-jobs in flight).
    fn start_slots(&mut self, ctx: &mut Context<Self>) {
        let slots = self.run.spec.slots;
        self.slots_running = 1;
        if slots == 0 {
            // Nothing to do: complete on the next turn of the mailbox.
            ctx.spawn(async {}.into_actor(self).map(|(), actor, ctx| actor.slot_done(ctx)));
            return;
        }
        // All slots in one actor future. An actor context polls every future spawned on it
        // whenever any of them is woken, so slots spawned one by one would cost a poll of
        // every slot (and of every request it waits on) per completion; a FuturesUnordered
        // polls only the slots that were woken.
        let all: FuturesUnordered<_> =
            (0..slots).map(|_| self.run.clone().guarded(self.run.clone().run_slot())).collect();
        let work = all.for_each(|()| async {});
        ctx.spawn(work.into_actor(self).map(|(), actor, ctx| actor.slot_done(ctx)));
    }
}
