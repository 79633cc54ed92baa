//! The copy and zero algorithm, as plain async code on one thread (no actor in sight): a
//! job's sub-jobs, `subjobs_in_flight` of them at a time, and the narrowing re-read.
//!
//! ```text
//!  JobRun::run ──► sub-job loop 0 ┐   each loop, sub-job after sub-job:
//!              ──► sub-job loop 1 ├─   1. take the pages for one sub-job (FIFO pool)
//!                   …             │   2. take the next sub-job from the shared cursor
//!              ──► sub-job loop N ┘   3. wait for the client's throttle (issue only)
//!  all loops done ──► Outcome         4. read the source once (narrow on error)
//!                                     5. [WRITE_SEQ: wait for this sub-job's turn]
//!                                     6. write every target concurrently, record
//! ```
//!
//! Pages are taken before the sub-job, so sub-jobs are handed out in the order their pages
//! were granted: under WRITE_SEQ every sub-job before the one waiting for its turn already
//! holds its pages and can finish, so waiting for a turn never waits for pages.
//!
//! The invariants the algorithm relies on are asserted where they are established: every
//! sub-job is block-aligned, the readable part of a sub-job lies inside it, WRITE_SEQ write
//! turns strictly increase, and every page is back in the pool when a job's work is done
//! (checked once per sub-job or per job, never per byte).

use std::cell::{OnceCell, RefCell};
use std::future::Future;
use std::io;
use std::ops::Range;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Poll;

use futures_util::future::{Either, join_all, select};
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::handle::JobShared;
use crate::io::SubjobIo;
use crate::job::{JobKind, JobSpec};
use crate::sparse::{Allocation, SparseSubjob, zero_blocks};
use crate::{
    Device, Outcome, PAGE_SIZE, PagePool, Pages, RangeSet, ReadBuf, Region, SECTOR_SIZE, TargetMask, TargetReport,
    TargetZeroes, WriteBuf, sectors_to_bytes,
};

/// Polls `future` once: `Ready` if it needed no wait (for counting only real waits).
async fn poll_once<F: Future + Unpin>(mut future: F) -> Poll<F::Output> {
    std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut future).poll(cx))).await
}

/// The message a panic carried (`panic!` with a literal or a formatted string), or a
/// placeholder for other payloads.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string())
}

/// Reads `sectors` of `device` into `buf` (`sectors.end - sectors.start` sectors long), and
/// where a read fails, re-reads the range in halves down to `block_sectors` (the largest
/// logical block involved), into the same pages: what `IGNORE_ERROR` does with a sub-job
/// whose read failed. Returns the buffer, whole again, and the sectors (in `device`
/// coordinates, as `sectors`) that stayed unreadable; every other sector of `buf` holds the
/// device's data.
///
/// Example: 16 sectors at 100 with blocks of 4 sectors and sector 109 unreadable read
/// 100..116 (fails), 100..108 (ok), 108..116 (fails), 108..112 (fails: one block, so it is
/// unreadable), 112..116 (ok), and return the set `108..112`.
///
/// Pieces are split on block boundaries counted from `sectors.start`; a range that is not
/// whole blocks keeps its partial last block with the piece before it.
///
/// # Panics
/// If `block_sectors` is 0 or `buf` is not as long as `sectors`.
pub async fn read_narrowed(
    device: &Device,
    sectors: Range<u64>,
    block_sectors: u64,
    buf: ReadBuf,
) -> (ReadBuf, RangeSet) {
    let read = |piece_start: u64, buf: ReadBuf| async move {
        let (buf, result) = device.read(piece_start, buf).await;
        (Some(buf), result)
    };
    let (buf, unreadable) = narrow(sectors, block_sectors, buf, false, read).await;
    (buf.expect("a device read gives its buffer back"), unreadable)
}

/// The narrowing re-read behind [`read_narrowed`], over any `read` of a piece (its first
/// sector, the buffer windowed to it) that may keep the buffer (a timed-out request). With
/// `known_bad`, the whole of `sectors` already failed once and is split at once. Returns the
/// buffer (`None` if a read kept it: then all of `sectors` counts as unreadable) and the
/// sectors that stayed unreadable.
pub(crate) async fn narrow<F, R>(
    sectors: Range<u64>,
    block_sectors: u64,
    mut buf: ReadBuf,
    mut known_bad: bool,
    mut read: F,
) -> (Option<ReadBuf>, RangeSet)
where
    F: FnMut(u64, ReadBuf) -> R,
    R: Future<Output = (Option<ReadBuf>, io::Result<()>)>,
{
    assert!(block_sectors > 0 && sectors.start <= sectors.end);
    let len_bytes =
        usize::try_from(sectors_to_bytes(sectors.end - sectors.start)).expect("a buffer's length fits a usize");
    assert_eq!(buf.len(), len_bytes, "the buffer holds the range being read");
    let mut unreadable = RangeSet::new();
    let mut pending = vec![sectors.clone()];
    while let Some(piece) = pending.pop() {
        if !known_bad {
            let bytes = (piece.start - sectors.start) as usize * SECTOR_SIZE
                ..(piece.end - sectors.start) as usize * SECTOR_SIZE;
            buf.set_window(bytes);
            let (back, result) = read(piece.start, buf).await;
            let Some(back) = back else { return (None, RangeSet::from_range(sectors)) };
            buf = back;
            if result.is_ok() {
                continue;
            }
        }
        known_bad = false;
        let blocks = (piece.end - piece.start) / block_sectors;
        if blocks <= 1 {
            unreadable.insert(piece);
            continue;
        }
        let middle = piece.start + blocks / 2 * block_sectors;
        pending.push(middle..piece.end);
        pending.push(piece.start..middle);
    }
    buf.reset_window();
    // The pages come back whole: the caller writes from every readable sector of them.
    assert_eq!(buf.len(), len_bytes, "narrowing gives the whole buffer back");
    (Some(buf), unreadable)
}

/// What the sub-jobs of one job share. Single-threaded: the borrow is never held across an
/// await.
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
    /// The message of the first panic in a sub-job (a device's or the engine's).
    panicked: Option<String>,
    /// A sub-job already taken was given up because the job was cancelled (or stopped) while
    /// it waited for the throttle.
    subjob_given_up: bool,
}

impl JobState {
    fn new(targets: usize) -> JobState {
        JobState {
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
            subjob_given_up: false,
        }
    }

    /// Stops the job because of the sub-job starting at job-relative sector `sector`.
    fn stop_at(&mut self, sector: u64) {
        self.stopped = true;
        self.stopped_at = self.stopped_at.min(sector);
    }
}

/// One job's run: its spec, the client's pool and I/O context, and the state its sub-jobs
/// share. Held by whoever drives it (the job actor) and by the client actor, which reads it
/// if the driver is dropped before the job finished.
pub(crate) struct JobRun {
    spec: Arc<JobSpec>,
    pool: PagePool,
    io: Arc<SubjobIo>,
    shared: Arc<JobShared>,
    state: RefCell<JobState>,
    turn_changed: Notify,
    /// Woken when an error stops the job, for sub-jobs waiting on the throttle: they give up
    /// at once rather than wait for their turn (and be charged to the rate) only to give up.
    stop_changed: Notify,
    /// The outcome, stored when the last sub-job is done.
    finished: RefCell<Option<Outcome>>,
    /// A sparse copy skipping holes: the source's allocation, known before any sub-job starts.
    allocation: OnceCell<Allocation>,
}

impl JobRun {
    pub(crate) fn new(spec: Arc<JobSpec>, pool: PagePool, io: Arc<SubjobIo>, shared: Arc<JobShared>) -> Rc<JobRun> {
        let state = RefCell::new(JobState::new(spec.targets.len()));
        let (turn_changed, stop_changed) = (Notify::new(), Notify::new());
        let (finished, allocation) = (RefCell::new(None), OnceCell::new());
        Rc::new(JobRun { spec, pool, io, shared, state, turn_changed, stop_changed, finished, allocation })
    }

    /// A sparse copy that skips holes first asks the source for its allocation: the future
    /// that does, to run to its end before [`run`](JobRun::run); `None` for any other job.
    pub(crate) fn query_allocation(self: &Rc<Self>) -> Option<impl Future<Output = ()> + 'static> {
        let JobKind::Copy { source, sparse } = &self.spec.kind else { return None };
        if !sparse.skip_holes || self.spec.len_sectors == 0 {
            return None;
        }
        let (run, source) = (self.clone(), source.clone());
        Some(async move {
            let allocation = Allocation::query(&source, run.spec.len_sectors, run.spec.block_sectors).await;
            run.allocation.set(allocation).expect("queried once");
        })
    }

    /// The whole job (after [`query_allocation`](JobRun::query_allocation)): resolves once every sub-job is done, with the outcome stored for
    /// [`take_outcome`](JobRun::take_outcome). The plan (offloaded zeroing, nothing to do, or
    /// `subjobs_in_flight` sub-job loops) is chosen now, when the job starts.
    pub(crate) fn run(self: Rc<Self>) -> impl Future<Output = ()> {
        let spec = &self.spec;
        let offload =
            matches!(spec.kind, JobKind::Zero) && spec.targets.iter().all(|t| t.device.geometry().write_zeroes);
        let work = if offload && !self.shared.cancel_requested() {
            self.clone().guarded(self.clone().zero_offloaded()).boxed_local()
        } else if spec.subjobs_in_flight == 0 {
            // Nothing to do: complete when first polled.
            async {}.boxed_local()
        } else {
            // All loops in one future. An actor context polls every future spawned on it
            // whenever any of them is woken, so loops spawned one by one would cost a poll of
            // every loop (and of every request it waits on) per completion; a
            // FuturesUnordered polls only the loops that were woken.
            let all: FuturesUnordered<_> =
                (0..spec.subjobs_in_flight).map(|_| self.clone().guarded(self.clone().run_subjobs())).collect();
            all.for_each(|()| async {}).boxed_local()
        };
        async move {
            work.await;
            self.finish();
        }
    }

    /// Stores the outcome once the last sub-job is done.
    fn finish(&self) {
        let outcome = self.outcome();
        debug_assert!(
            outcome.cancelled
                || self.state.borrow().stopped
                || self.shared.progress().done_sectors == self.spec.len_sectors
        );
        *self.finished.borrow_mut() = Some(outcome);
    }

    /// The outcome stored when the job finished, taken once.
    pub(crate) fn take_outcome(&self) -> Option<Outcome> {
        self.finished.borrow_mut().take()
    }

    /// The outcome of a job whose driver went away before it finished (its actix System was
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

    /// The next sub-job (job-relative sectors), or `None` when the job is done, stopped or
    /// cancelled. A sparse copy's sub-jobs follow the source's allocation: data, or a hole
    /// (nothing to read, and up to [`JobSpec::hole_sectors_max`] long).
    fn take_subjob(&self) -> Option<SparseSubjob> {
        let mut state = self.state.borrow_mut();
        if state.cursor >= self.spec.len_sectors || state.stopped {
            return None;
        }
        if self.shared.cancel_requested() {
            return None;
        }
        let start = state.cursor;
        let (len, subjob_sectors) = (self.spec.len_sectors, self.spec.subjob_sectors);
        let subjob = match self.allocation.get() {
            Some(allocation) => allocation.next(start, len, subjob_sectors, self.spec.hole_sectors_max()),
            // Saturating: a job may end at sector u64::MAX.
            None => SparseSubjob { sectors: start..start.saturating_add(subjob_sectors).min(len), hole: false },
        };
        // No write of a sub-job may cross a zoned target's zone end.
        let subjob = SparseSubjob { sectors: start..subjob.sectors.end.min(self.spec.zone_end(start)), ..subjob };
        let (end, block) = (subjob.sectors.end, self.spec.block_sectors);
        assert!(subjob.sectors.start == start && end > start);
        assert!(end - start <= subjob_sectors || subjob.hole, "a sub-job that reads fits its pages");
        // Every read and write of a sub-job, and every narrowed piece, is then whole blocks
        // of every device of the job.
        assert!(start % block == 0 && end % block == 0, "sub-job {start}..{end} not in {block}-sector blocks");
        state.cursor = end;
        Some(subjob)
    }

    fn finished(&self) -> bool {
        let state = self.state.borrow();
        state.cursor >= self.spec.len_sectors || state.stopped || self.shared.cancel_requested()
    }

    /// Runs one sub-job loop's `work`; a panic in it (a device's or the engine's own) stops
    /// the job instead of taking its driver, and the job's completion, down with it.
    async fn guarded(self: Rc<Self>, work: impl Future<Output = ()>) {
        if let Err(payload) = AssertUnwindSafe(work).catch_unwind().await {
            let mut state = self.state.borrow_mut();
            // Which sub-job panicked is not known, and the WRITE_SEQ waiters released below no
            // longer keep their order: nothing more is written.
            state.stop_at(0);
            state.panicked.get_or_insert_with(|| panic_message(&*payload));
            drop(state);
            // WRITE_SEQ: the panicking sub-job never takes its turn; release those waiting.
            self.turn_changed.notify_waiters();
            self.stop_changed.notify_waiters();
        }
    }

    /// One of the job's `subjobs_in_flight` loops: sub-job after sub-job until none is left.
    async fn run_subjobs(self: Rc<Self>) {
        while !self.finished() {
            match &self.spec.kind {
                JobKind::Copy { source, .. } => {
                    let Some(mut pages) = self.alloc_pages().await else { break };
                    let Some(SparseSubjob { sectors: subjob, hole }) = self.take_subjob() else { break };
                    if hole {
                        // A hole reads nothing: its pages go back at once.
                        drop(pages);
                        if !self.copy_hole(subjob).await {
                            break;
                        }
                        continue;
                    }
                    if !self.throttle_subjob(&subjob).await || self.stopped_before(&subjob) {
                        drop(pages);
                        self.give_up_subjob(subjob).await;
                        break;
                    }
                    let len_bytes = (subjob.end - subjob.start) as usize * SECTOR_SIZE;
                    // The last sub-job may be shorter: its spare pages go back at once.
                    pages.truncate(len_bytes.div_ceil(PAGE_SIZE));
                    self.copy_subjob(source, subjob, ReadBuf::new(pages, len_bytes)).await;
                }
                JobKind::Zero => {
                    let Some(SparseSubjob { sectors: subjob, .. }) = self.take_subjob() else { break };
                    if !self.throttle_subjob(&subjob).await || self.stopped_before(&subjob) {
                        self.give_up_subjob(subjob).await;
                        break;
                    }
                    let data = WriteBuf::zeroes((subjob.end - subjob.start) as usize * SECTOR_SIZE);
                    self.write_subjob(subjob.clone(), data, RangeSet::from_range(subjob), RangeSet::new()).await;
                }
            }
        }
    }

    /// A hole sub-job of a sparse copy: waits for the throttle, then writes the hole. `false`
    /// if the job was cancelled meanwhile (the sub-job is given up).
    async fn copy_hole(&self, hole: Range<u64>) -> bool {
        // Paced by the bytes it moves: none where every target's zeroes are cheap.
        let paced = if self.spec.holes_are_cheap() { hole.start..hole.start } else { hole.clone() };
        if !self.throttle_subjob(&paced).await || self.stopped_before(&hole) {
            self.give_up_subjob(hole).await;
            return false;
        }
        self.write_hole(hole).await;
        true
    }

    /// Waits for the pages of one sub-job; `None` if the job was cancelled meanwhile (so that
    /// a cancelled job completes even while other jobs hold every page).
    async fn alloc_pages(&self) -> Option<Pages> {
        let mut alloc = std::pin::pin!(self.pool.alloc(self.spec.subjob_pages()));
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
    async fn throttle_subjob(&self, subjob: &Range<u64>) -> bool {
        // A sub-job is at most a hole's 1 GiB: its bytes fit a u64.
        let len_bytes =
            u64::try_from(sectors_to_bytes(subjob.end - subjob.start)).expect("a sub-job's bytes fit a u64");
        let mut admitted = std::pin::pin!(self.io.throttler.admit_subjob(len_bytes));
        if poll_once(admitted.as_mut()).await.is_ready() {
            return true;
        }
        let began = Instant::now();
        let cancelled = std::pin::pin!(self.shared.cancelled());
        let stopped = std::pin::pin!(self.stopped_for(subjob));
        // Waiting ends as soon as the sub-job would be given up anyway: its place in the
        // throttle's queue is then given up too (nothing charged to the rate), and the job,
        // and the sub-jobs queued behind it, do not wait for its turn.
        let admitted = matches!(select(admitted, select(cancelled, stopped)).await, Either::Left(_));
        self.io.stats.waited_for_throttle(self.io.clock.to_model(began.elapsed()));
        // Admitted at the very moment of a cancel (both ready at one wake-up, and `select`
        // looks at the admission first): the cancel still wins, the sub-job was not issued.
        // The caller checks `stopped_before` likewise.
        admitted && !self.shared.cancel_requested()
    }

    /// Resolves once an error has stopped the job so that `subjob` is to be given up
    /// ([`stopped_before`](JobRun::stopped_before)).
    async fn stopped_for(&self, subjob: &Range<u64>) {
        loop {
            let notified = self.stop_changed.notified();
            let mut notified = std::pin::pin!(notified);
            // Registered before the check, so a stop between the two still wakes it.
            notified.as_mut().enable();
            if self.stopped_before(subjob) {
                return;
            }
            notified.await;
        }
    }

    /// Whether an error stopped the job while `subjob`, already taken, waited for the throttle:
    /// then it is given up, not issued — unless it lies before the stop under WRITE_SEQ, which
    /// writes every sub-job before the one that failed.
    fn stopped_before(&self, subjob: &Range<u64>) -> bool {
        let state = self.state.borrow();
        state.stopped && !(self.spec.write_seq() && subjob.start < state.stopped_at)
    }

    /// Gives up a sub-job that was taken but never issued (the job was cancelled, or stopped,
    /// while it waited for the throttle): nothing is written, and under WRITE_SEQ later
    /// sub-jobs get their turn.
    async fn give_up_subjob(&self, subjob: Range<u64>) {
        {
            let mut state = self.state.borrow_mut();
            state.subjob_given_up = true;
            if self.spec.write_seq() {
                state.stop_at(subjob.start);
            }
        }
        self.stop_changed.notify_waiters();
        self.write_subjob(subjob, WriteBuf::default(), RangeSet::new(), RangeSet::new()).await;
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
        self.write_subjob(hole, data, whole.clone(), whole).await;
    }

    /// The zero blocks of a sub-job just read (job-relative), if the copy scans for them.
    fn zero_blocks(&self, subjob: &Range<u64>, data: &WriteBuf) -> RangeSet {
        match self.spec.sparse().zero_block_sectors(self.spec.block_sectors) {
            Some(zero_block_sectors) => zero_blocks(data, subjob.start, zero_block_sectors),
            None => RangeSet::new(),
        }
    }

    /// Reads one sub-job of the source and writes it to every target.
    async fn copy_subjob(&self, source: &Region, subjob: Range<u64>, buf: ReadBuf) {
        let (buf, result) = self.io.read(&source.device, source.start_sector + subjob.start, buf).await;
        let whole = RangeSet::from_range(subjob.clone());
        let buf = match (buf, result) {
            (Some(buf), Ok(())) => {
                let data = buf.freeze();
                let zeroes = self.zero_blocks(&subjob, &data);
                return self.write_subjob(subjob, data, whole, zeroes).await;
            }
            (buf, Err(_)) => buf,
            (None, Ok(())) => unreachable!("a read that kept its buffer timed out"),
        };
        self.state.borrow_mut().read_err = true;
        // A timed-out read took the buffer with it: without it there is nothing to narrow
        // into, and re-reading a stuck device would only wait again. The whole sub-job failed.
        let Some(buf) = buf.filter(|_| self.spec.ignore_error()) else {
            {
                let mut state = self.state.borrow_mut();
                if !self.spec.ignore_error() {
                    state.stop_at(subjob.start);
                }
                state.read_failed.insert(subjob.clone());
            }
            self.stop_changed.notify_waiters();
            // Nothing to write, but under WRITE_SEQ later sub-jobs wait for this one's turn.
            return self.write_subjob(subjob, WriteBuf::default(), RangeSet::new(), RangeSet::new()).await;
        };
        let (buf, unreadable) = self.narrow_source(source, subjob.clone(), buf).await;
        self.state.borrow_mut().read_failed.extend(&unreadable);
        match buf {
            Some(buf) => {
                let data = buf.freeze();
                let zeroes = self.zero_blocks(&subjob, &data).difference(&unreadable);
                self.write_subjob(subjob, data, whole.difference(&unreadable), zeroes).await
            }
            None => self.write_subjob(subjob, WriteBuf::default(), RangeSet::new(), RangeSet::new()).await,
        }
    }

    /// Re-reads a sub-job whose read failed in halves, down to the job's logical block, into
    /// the same pages ([`read_narrowed`], through the client's I/O context). Returns the
    /// buffer and the job-relative sectors that stayed unreadable; if a re-read timed out, the
    /// buffer stays with the device and the whole sub-job is unreadable.
    async fn narrow_source(&self, source: &Region, subjob: Range<u64>, buf: ReadBuf) -> (Option<ReadBuf>, RangeSet) {
        let read =
            |piece_start: u64, buf: ReadBuf| self.io.read(&source.device, source.start_sector + piece_start, buf);
        // The whole sub-job already failed once.
        narrow(subjob, self.spec.block_sectors, buf, true, read).await
    }

    /// Writes the `readable` parts of `subjob` (job-relative) from `data` to every target; the
    /// `zeroes` among them (holes, zero blocks) as the copy's [`TargetZeroes`] says where that
    /// is cheap for the target, and as data (from `data`) where it is not.
    async fn write_subjob(&self, subjob: Range<u64>, data: WriteBuf, readable: RangeSet, zeroes: RangeSet) {
        debug_assert!(zeroes.difference(&readable).is_empty());
        let ranges = readable.ranges();
        assert!(
            ranges.first().is_none_or(|r| r.start >= subjob.start) && ranges.last().is_none_or(|r| r.end <= subjob.end),
            "the readable part of sub-job {subjob:?} lies inside it"
        );
        if self.spec.write_seq() {
            self.wait_for_turn(&subjob).await;
        }
        // Under WRITE_SEQ a stopped job writes nothing from the sub-job that stopped it on: a
        // later one would leave a hole. The ones before it were read and still land.
        let skip = self.spec.write_seq() && subjob.start >= self.state.borrow().stopped_at;
        if !skip && !readable.is_empty() {
            self.write_targets(&subjob, &data, &readable, &zeroes).await;
        }
        drop(data);
        self.shared.add_done(subjob.end - subjob.start);
        if self.spec.write_seq() {
            let mut state = self.state.borrow_mut();
            // Without a panic (which releases every waiter), turns go in order, each sub-job
            // right after the one before it.
            if state.panicked.is_none() {
                assert!(
                    state.write_turn == subjob.start && subjob.end > state.write_turn,
                    "WRITE_SEQ turn {} taken by sub-job {subjob:?}",
                    state.write_turn
                );
            }
            state.write_turn = subjob.end;
            drop(state);
            self.turn_changed.notify_waiters();
        }
    }

    /// WRITE_SEQ: waits until the writes of every sub-job before `subjob` are done (or a
    /// panic released every waiter).
    async fn wait_for_turn(&self, subjob: &Range<u64>) {
        loop {
            let turn = self.turn_changed.notified();
            let my_turn = {
                let state = self.state.borrow();
                state.write_turn == subjob.start || state.panicked.is_some()
            };
            if my_turn {
                return;
            }
            turn.await;
        }
    }

    /// Writes `readable` (job-relative, inside `subjob`) from `data` to every target at once,
    /// each target piece by piece in sector order (the `zeroes` among them as zeroes where
    /// that is cheap for the target), and records what landed and what failed.
    async fn write_targets(&self, subjob: &Range<u64>, data: &WriteBuf, readable: &RangeSet, zeroes: &RangeSet) {
        let sparse = self.spec.sparse();
        let writes = self.spec.targets.iter().map(|target| {
            let geometry = target.device.geometry();
            let cheap = sparse.zeroes_are_cheap(&geometry, target.device.deallocates());
            let pieces = pieces_in_order(readable, if cheap { zeroes } else { &EMPTY });
            async move {
                for (piece, zero) in pieces {
                    let at = target.start_sector + piece.start;
                    let result = match (zero, sparse.target_zeroes) {
                        // A zoned target cannot skip: its write pointer must move on.
                        (true, TargetZeroes::Skip) if !geometry.zoned => Ok(()),
                        (true, TargetZeroes::Deallocate) if target.device.deallocates() => {
                            self.io.deallocate(&target.device, at, piece.end - piece.start).await
                        }
                        (true, _) => self.io.write_zeroes(&target.device, at, piece.end - piece.start).await,
                        (false, _) => {
                            let bytes = (piece.start - subjob.start) as usize * SECTOR_SIZE
                                ..(piece.end - subjob.start) as usize * SECTOR_SIZE;
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
                Ok(()) => state.copied[index].extend(readable),
                Err(failed) => {
                    state.write_err.set(index);
                    state.write_failed[index].insert(failed.clone());
                    // The pieces before the failed one did land.
                    let landed = readable.difference(&RangeSet::from_range(failed.start..subjob.end));
                    state.copied[index].extend(&landed);
                    if !self.spec.ignore_error() {
                        state.stop_at(subjob.start);
                    }
                }
            }
        }
        drop(state);
        self.stop_changed.notify_waiters();
    }

    /// Zeroes every target with one offloaded request each.
    async fn zero_offloaded(self: Rc<Self>) {
        let len = self.spec.len_sectors;
        // One request per target that moves no data through the engine, and cannot be paced:
        // it waits for the busy limit only (the rate counts the bytes the engine moves).
        if !self.throttle_subjob(&(0..0)).await {
            self.state.borrow_mut().subjob_given_up = true;
            return;
        }
        let requests = self.spec.targets.iter().map(|target| self.zero_target_offloaded(target));
        let results = join_all(requests).await;
        let mut state = self.state.borrow_mut();
        state.cursor = len;
        for (index, result) in results.into_iter().enumerate() {
            match result {
                Ok(()) => state.copied[index].insert(0..len),
                Err(failed) => {
                    state.write_err.set(index);
                    // The zones before the failed request were zeroed.
                    state.copied[index].insert(0..failed.start);
                    state.write_failed[index].insert(failed);
                }
            }
        }
        self.shared.add_done(len);
    }

    /// Zeroes the whole of `target` (offloaded): one request, or one per zone of a zoned
    /// target, in order (a write may not cross a zone's end). `Err` with the job-relative
    /// sectors of the request that failed; nothing after it is tried.
    async fn zero_target_offloaded(&self, target: &Region) -> Result<(), Range<u64>> {
        let (len, geometry) = (self.spec.len_sectors, target.device.geometry());
        let mut at = 0;
        while at < len {
            let end = geometry.zone_end(target.start_sector + at).map_or(len, |e| (e - target.start_sector).min(len));
            if self.io.write_zeroes(&target.device, target.start_sector + at, end - at).await.is_err() {
                return Err(at..end);
            }
            at = end;
        }
        Ok(())
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
                && (state.cursor < self.spec.len_sectors || state.subjob_given_up),
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
