//! The oracle: what a run must look like, checked from the disks, the fault logs and the I/O
//! trace, never from the engine's own bookkeeping.
//!
//! ```text
//!  SwarmReport ─┬─ I/O trace (IoLog) ──► per job: its requests, by sub-job ─┬─► reads, writes, stop,
//!               │                                                           │   cancel, WRITE_SEQ,
//!               │                                                           │   completeness
//!               │                         per run: lives of sub-jobs ───────┴─► in flight, pages
//!               ├─ outcomes ──► well-formed RangeSets ──► Sectors (own model) ──► compared
//!               └─ disks ──► provenance of every target sector ──► old / new / other
//! ```
//!
//! The oracle works out each job's sub-jobs as the engine's documented contract defines them
//! (`subjob_sectors = max(min(subjob_size, page_budget) rounded down to the job's logical block, one
//! block)`; for a sparse copy that skips holes, rebuilt from its source's allocation, see
//! `subjobs`), attributes every request to the job and sub-job whose region it falls in, and
//! derives what the outcome must say. Every rule is listed, with its reason, in
//! docs/SIMULATION.md.

use std::collections::BTreeMap;
use std::ops::Range;

use kcopyd_core::{Flags, Outcome, PAGE_SIZE, RangeSet, SECTOR_SIZE, SubmitError, TargetZeroes};
use kcopyd_sim::{FaultKind, MemDisk, Provenance};

use crate::io_log::{DiskRef, IoKind, IoRecord, Mark};
use crate::scenario::{DEADLOCK_AFTER, JobLayout, SwarmReport, SwarmScenario, source_seed, target_seed};
use crate::sectors::Sectors;

/// Which region of its job a request falls in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Source,
    Target(usize),
}

/// A job as the oracle sees it: its shape, worked out independently, and its requests.
struct JobView<'a> {
    layout: &'a JobLayout,
    /// IGNORE_ERROR in effect: asked for, and neither WRITE_SEQ nor a zoned target.
    ignore: bool,
    /// WRITE_SEQ in effect: asked for, or implied by a zoned target.
    seq: bool,
    /// The job's logical block in sectors (the largest of its devices').
    block: u64,
    /// Sectors per sub-job that reads (the contract's sub-job size, in sectors).
    subjob_sectors: u64,
    /// Number of sub-jobs.
    subjob_count: u64,
    /// Where each sub-job starts, job-relative, then the job's length: every `subjob_sectors` sectors
    /// for a plain copy or a zero job; for a sparse copy that skips holes, rebuilt from the
    /// source's allocation as the engine walks it (data cut every `subjob_sectors` sectors from the
    /// start of each allocated run, holes cut every `hole_max`).
    bounds: Vec<u64>,
    /// Per sub-job: a hole of a sparse copy (nothing read, no pages held).
    holes: Vec<bool>,
    /// A sparse copy whose every target takes zeroes cheaply: a hole moves no bytes.
    cheap_holes: bool,
    /// Its requests of phase 1, with their role and job-relative sectors.
    ios: Vec<(&'a IoRecord, Role, Range<u64>)>,
    /// Its requests of every phase (the resubmission after a crash is phase 2).
    all: Vec<(&'a IoRecord, Role, Range<u64>)>,
    /// The client's I/O timeout, and which requests the engine saw time out.
    timeouts: &'a Timeouts,
}

impl JobView<'_> {
    fn subjob_range(&self, k: u64) -> Range<u64> {
        self.bounds[k as usize]..self.bounds[k as usize + 1]
    }

    /// The sub-job holding job-relative sector `sector` (the last one past the end).
    fn subjob_of(&self, sector: u64) -> u64 {
        (self.bounds.partition_point(|&b| b <= sector).max(1) - 1) as u64
    }

    /// The sub-jobs a job-relative range touches.
    fn subjobs_of(&self, range: &Range<u64>) -> Range<u64> {
        if range.start >= range.end {
            return self.subjob_of(range.start)..self.subjob_of(range.start);
        }
        self.subjob_of(range.start)..self.subjob_of(range.end - 1) + 1
    }

    /// Whether sub-job `k` is a hole of a sparse copy: it reads nothing and holds no pages.
    fn is_hole(&self, k: u64) -> bool {
        self.holes.get(k as usize).copied().unwrap_or(false)
    }

    /// The bytes sub-job `k` moves through the engine (what the throttle's rate charges):
    /// none for a hole whose every target takes zeroes cheaply.
    fn moved_bytes(&self, k: u64) -> u64 {
        let range = self.subjob_range(k);
        if self.is_hole(k) && self.cheap_holes { 0 } else { (range.end - range.start) * SECTOR_SIZE as u64 }
    }

    /// The whole sub-jobs holding any sector of `set`.
    fn whole_subjobs(&self, set: &Sectors) -> Sectors {
        Sectors::from_ranges(set.ranges().iter().flat_map(|r| self.subjobs_of(r)).map(|k| self.subjob_range(k)))
    }

    /// The whole sub-jobs of phase 1 where a read timed out: a timed-out read keeps the buffer,
    /// so nothing is narrowed and the whole sub-job is unreadable.
    fn timed_out_reads(&self) -> Sectors {
        let timed_out = self.failed(|r| r == Role::Source).filter(|(r, _)| self.timeouts.view(r).0);
        self.whole_subjobs(&Sectors::from_ranges(timed_out.map(|(_, rel)| rel.clone())))
    }

    fn failed(&self, role: impl Fn(Role) -> bool) -> impl Iterator<Item = (&IoRecord, &Range<u64>)> {
        self.ios.iter().filter(move |(r, ro, _)| !r.ok && role(*ro)).map(|(r, _, rel)| (*r, rel))
    }
}

/// A region of a job on a disk: (sectors, job, role, first sector).
type Owner = (Range<u64>, usize, Role, u64);

/// The set of one range.
fn span(range: Range<u64>) -> Sectors {
    Sectors::from_ranges(std::iter::once(range))
}

/// The logical block of a disk, in sectors.
fn block_sectors(options: &kcopyd_sim::MemDiskOptions) -> u64 {
    u64::from(options.logical_block_size).div_ceil(SECTOR_SIZE as u64).max(1)
}

/// Checks the invariants; returns every violation, named.
pub fn check(scenario: &SwarmScenario, report: &SwarmReport) -> Vec<String> {
    let mut violations = Vec::new();
    if report.deadlocked {
        violations.push(format!("deadlock: jobs still running after {DEADLOCK_AFTER:?} of virtual time"));
        return violations;
    }
    if report.pages_in_use_max > scenario.config.page_budget {
        violations.push(format!(
            "the pool reports {} pages in use at once over a budget of {}",
            report.pages_in_use_max, scenario.config.page_budget
        ));
    }
    let timeouts = Timeouts::of(scenario, report);
    let io = engine_io(report, &timeouts);
    let views = attribute(scenario, &io, &timeouts, &mut violations);
    for (j, view) in views.iter().enumerate() {
        check_job(j, view, report, &mut violations);
    }
    for phase in [1, 2] {
        check_concurrency(scenario, &views, phase, &mut violations);
    }
    check_shutdown(scenario, report, &views, &mut violations);
    check_throttle(scenario, &views, &mut violations);
    check_busy(scenario, report, &views, &mut violations);
    check_prepared(scenario, report, &mut violations);
    check_stats(scenario, report, &timeouts, &mut violations);
    check_callback_order(report, &mut violations);
    check_held(report, &views, &mut violations);
    for (t, disk) in report.targets.iter().enumerate() {
        for fault in disk.fault_log() {
            if let FaultKind::ZoneViolation { write_pointer } = fault.kind {
                violations.push(format!(
                    "target{t}: write {:?} refused by the zone (write pointer at {write_pointer})",
                    fault.sectors
                ));
            }
        }
    }
    check_contents(scenario, report, &mut violations);
    violations
}

/// Shutdown: a job is refused exactly when its submission began after the shutdown did (or
/// was still waiting for admission when it did), with `ShutDown`, and then does nothing at
/// all; a shutdown returns only once every job accepted has completed and all its requests
/// have ended; every shutdown report finds every page back, no request outstanding and the
/// jobs completed counted.
fn check_shutdown(scenario: &SwarmScenario, report: &SwarmReport, views: &[JobView], violations: &mut Vec<String>) {
    let seq_of = |mark: Mark| report.marks.iter().find(|(_, m)| *m == mark).map(|&(seq, _)| seq);
    // The first shutdown: the one in the middle of the run, or else the final one.
    let begun = seq_of(Mark::ShutdownBegun);
    let returned = seq_of(Mark::ShutdownReturned);
    let count = |mark: Mark| report.marks.iter().filter(|(_, m)| *m == mark).count();
    // A shutdown from a job's callback happens only if that job's callback ran.
    let in_callback =
        scenario.shutdown_in_callback_of.is_some_and(|j| report.jobs.get(j).is_some_and(|r| r.callbacks > 0));
    let mid_run = usize::from(scenario.shutdown_at_us.is_some() || in_callback);
    let (begun_count, returned_count) = (count(Mark::ShutdownBegun), count(Mark::ShutdownReturned));
    if begun_count != 1 + mid_run || returned_count != begun_count {
        violations.push(format!(
            "shutdown in the middle of the run asked at {:?} µs: {begun_count} shutdowns begun, {returned_count} returned",
            scenario.shutdown_at_us
        ));
    }
    let mut accepted = 0;
    for (j, (result, view)) in report.jobs.iter().zip(views).enumerate() {
        let submitting = seq_of(Mark::Submitting(j));
        if let Some(error) = &result.refused {
            if *error != SubmitError::ShutDown {
                violations.push(format!("job {j}: refused with {error:?}, expected ShutDown"));
            }
            let refused_at = seq_of(Mark::Refused(j));
            if begun.is_none_or(|begun| refused_at.is_none_or(|at| at <= begun)) {
                violations.push(format!("job {j}: refused ({error}) before any shutdown began"));
            }
            if !view.all.is_empty() || result.callbacks != 0 || result.outcome.is_some() {
                violations.push(format!(
                    "job {j}: refused, yet {} requests, {} completions, outcome {:?}",
                    view.all.len(),
                    result.callbacks,
                    result.outcome
                ));
            }
            continue;
        }
        accepted += 1;
        if let (Some(begun), Some(submitting)) = (begun, submitting) {
            if begun < submitting {
                violations.push(format!("job {j}: submitted after the shutdown began, yet accepted"));
            }
        }
        if let Some(returned) = returned {
            if seq_of(Mark::Completed(j)).is_none_or(|done| done >= returned) {
                violations.push(format!("job {j}: the shutdown returned before the job completed"));
            }
            if let Some((record, ..)) = view.all.iter().find(|(r, ..)| r.done > returned) {
                violations.push(format!(
                    "job {j}: request {:?} {:?} still in flight when the shutdown returned",
                    record.kind, record.sectors
                ));
            }
        }
    }
    let retried = report.jobs.iter().filter(|r| r.retry.is_some()).count();
    for (n, shutdown) in report.shutdown_reports.iter().enumerate() {
        let expected = if n < mid_run { accepted } else { accepted + retried };
        if shutdown.jobs_completed != expected as u64 {
            violations.push(format!(
                "shutdown {n}: {} jobs completed (expected {expected}), {} pages in use, {} requests outstanding",
                shutdown.jobs_completed, shutdown.pool.pages_in_use, shutdown.requests_outstanding
            ));
        }
    }
}

/// Prepared callbacks: one prepared after a shutdown began is refused with `ShutDown` and never
/// runs; one prepared before runs exactly once, after it was queued, with what it was completed
/// with (or cancelled, when dropped), and before every shutdown that began after it was
/// prepared returns.
fn check_prepared(scenario: &SwarmScenario, report: &SwarmReport, violations: &mut Vec<String>) {
    let seqs = |mark: Mark| report.marks.iter().filter(|(_, m)| *m == mark).map(|&(seq, _)| seq).collect::<Vec<_>>();
    let shutdowns: Vec<(u64, u64)> = seqs(Mark::ShutdownBegun).into_iter().zip(seqs(Mark::ShutdownReturned)).collect();
    for (p, (layout, result)) in scenario.prepared.iter().zip(&report.prepared).enumerate() {
        let Some(&preparing) = seqs(Mark::Preparing(p)).first() else {
            continue; // its time came after the run ended
        };
        if let Some(error) = &result.refused {
            let refused_at = seqs(Mark::PrepareRefused(p)).first().copied().unwrap_or(u64::MAX);
            if *error != SubmitError::ShutDown
                || !shutdowns.iter().any(|&(begun, _)| begun < refused_at)
                || !result.outcomes.is_empty()
            {
                violations.push(format!(
                    "prepared {p}: refused with {error:?} at {refused_at} (shutdowns {shutdowns:?}), ran {} times",
                    result.outcomes.len()
                ));
            }
            continue;
        }
        if let Some(&(begun, _)) = shutdowns.iter().find(|&&(begun, _)| begun < preparing) {
            violations.push(format!(
                "prepared {p}: prepared at {preparing}, after a shutdown began at {begun}, yet accepted"
            ));
        }
        let ran = seqs(Mark::PreparedRan(p));
        let queued = seqs(Mark::PreparedQueued(p)).first().copied();
        if ran.len() != 1 || result.outcomes.len() != 1 {
            violations.push(format!("prepared {p}: ran {} times", ran.len()));
            continue;
        }
        if queued.is_none_or(|queued| ran[0] < queued) {
            violations.push(format!("prepared {p}: ran at {} before it was queued ({queued:?})", ran[0]));
        }
        let outcome = &result.outcomes[0];
        let (read_err, write_err, cancelled) = if layout.complete {
            (layout.read_err, layout.write_err(), false)
        } else {
            (false, kcopyd_core::TargetMask::new(), true)
        };
        if outcome.read_err != read_err || outcome.write_err != write_err || outcome.cancelled != cancelled {
            violations.push(format!(
                "prepared {p}: ran with {outcome:?}, expected read_err {read_err}, write_err {write_err:?}, cancelled {cancelled}"
            ));
        }
        for &(begun, returned) in &shutdowns {
            if preparing < begun && returned < ran[0] {
                violations.push(format!(
                    "prepared {p}: the shutdown begun at {begun} returned at {returned}, before the callback ran at {}",
                    ran[0]
                ));
            }
        }
    }
}

/// Most sectors one hole sub-job of a sparse copy covers: 1 GiB, as the engine documents
/// (`kcopyd_core::HOLE_SUBJOB_SECTORS_MAX`). Written out here rather than taken from the
/// engine: a wrong constant there would otherwise sit on both sides of every comparison.
pub(crate) const HOLE_SUBJOB_SECTORS: u64 = (1 << 30) / 512;

/// Works out every job's shape and attributes every request to the job whose region holds
/// it. A request outside every region, misaligned, or across two sub-jobs is a violation.
fn attribute<'a>(
    scenario: &'a SwarmScenario,
    io: &'a [IoRecord],
    timeouts: &'a Timeouts,
    violations: &mut Vec<String>,
) -> Vec<JobView<'a>> {
    let mut views: Vec<JobView<'a>> =
        scenario.jobs.iter().map(|layout| JobView::of(scenario, layout, timeouts)).collect();
    let owners = region_owners(scenario);
    for record in io {
        let options = match record.disk {
            DiskRef::Source(s) => &scenario.sources[s],
            DiskRef::Target(t) => &scenario.targets[t],
        };
        let block = block_sectors(options);
        let sectors = &record.sectors;
        if sectors.start % block != 0 || sectors.end % block != 0 || sectors.start >= sectors.end {
            violations.push(format!("{:?} {:?} {sectors:?}: not whole logical blocks", record.disk, record.kind));
        }
        let owner = owners.get(&record.disk).and_then(|regions| {
            regions.iter().find(|(range, ..)| range.start <= sectors.start && sectors.end <= range.end)
        });
        let Some(&(_, j, role, start)) = owner else {
            violations.push(format!(
                "{:?} {:?} {sectors:?} (phase {}): outside every job's region",
                record.disk, record.kind, record.phase
            ));
            continue;
        };
        let view = &mut views[j];
        let relative = sectors.start - start..sectors.end - start;
        let whole_job = record.kind == IoKind::WriteZeroes && relative == (0..view.layout.len_sectors);
        if !whole_job && view.subjobs_of(&relative).count() != 1 {
            violations.push(format!(
                "job {j}: {:?} {:?} {sectors:?} spans sub-jobs of {} sectors",
                record.disk, record.kind, view.subjob_sectors
            ));
        }
        if (role == Role::Source) != (record.kind == IoKind::Read) {
            violations.push(format!("job {j}: {:?} {:?} {sectors:?} on its {role:?}", record.disk, record.kind));
        }
        if record.phase == 1 {
            view.ios.push((record, role, relative.clone()));
        }
        view.all.push((record, role, relative));
    }
    views
}

impl<'a> JobView<'a> {
    /// The shape of job `layout` of `scenario` (flags in effect, block, sub-jobs), with no
    /// request attributed yet.
    fn of(scenario: &SwarmScenario, layout: &'a JobLayout, timeouts: &'a Timeouts) -> JobView<'a> {
        let zoned = layout.targets.iter().any(|&(t, _)| scenario.targets[t].zoned);
        let seq = layout.flags.contains(Flags::WRITE_SEQ) || zoned;
        let ignore = layout.flags.contains(Flags::IGNORE_ERROR) && !seq;
        let block = layout
            .source
            .iter()
            .map(|&(s, _)| block_sectors(&scenario.sources[s]))
            .chain(layout.targets.iter().map(|&(t, _)| block_sectors(&scenario.targets[t])))
            .max()
            .unwrap_or(1);
        let wanted = (scenario.config.subjob_size_bytes / SECTOR_SIZE) as u64;
        let budget = (scenario.config.page_budget * PAGE_SIZE / SECTOR_SIZE) as u64;
        let subjob_sectors = (wanted.min(budget) / block * block).max(block);
        let cheap_holes = layout.targets.iter().all(|&(t, _)| zeroes_are_cheap(layout, &scenario.targets[t]));
        // A source that cannot tell its allocation is taken as allocated everywhere.
        let allocation_known = layout.source.is_some_and(|(s, _)| !scenario.sources[s].faults.allocation_unknown);
        let (bounds, holes) = subjobs(layout, subjob_sectors, block, cheap_holes, allocation_known);
        let subjob_count = holes.len() as u64;
        JobView {
            layout,
            ignore,
            seq,
            block,
            subjob_sectors,
            subjob_count,
            bounds,
            holes,
            cheap_holes,
            ios: Vec::new(),
            all: Vec::new(),
            timeouts,
        }
    }
}

/// Every region of the scenario: per disk, (sectors, job, role, region start).
fn region_owners(scenario: &SwarmScenario) -> BTreeMap<DiskRef, Vec<Owner>> {
    let mut owners: BTreeMap<DiskRef, Vec<Owner>> = BTreeMap::new();
    for (j, layout) in scenario.jobs.iter().enumerate() {
        let len = layout.len_sectors;
        if let Some((s, start)) = layout.source {
            owners.entry(DiskRef::Source(s)).or_default().push((start..start + len, j, Role::Source, start));
        }
        for (i, &(t, start)) in layout.targets.iter().enumerate() {
            owners.entry(DiskRef::Target(t)).or_default().push((start..start + len, j, Role::Target(i), start));
        }
    }
    owners
}

/// Whether zeroes cost a sparse copy no data transfer on `target` (`Sparse`'s contract):
/// `Write` needs write-zeroes offload, `Deallocate` offload or a disk that deallocates (a
/// sparse one); a zoned target that does not offload takes zeroes as data.
fn zeroes_are_cheap(layout: &JobLayout, target: &kcopyd_sim::MemDiskOptions) -> bool {
    match layout.sparse.target_zeroes {
        TargetZeroes::Write => target.write_zeroes,
        TargetZeroes::Deallocate => target.write_zeroes || target.sparse,
        TargetZeroes::Skip => !target.zoned || target.write_zeroes,
    }
}

/// A job's sub-jobs: their bounds (starts, then the length) and which are holes. A sparse copy
/// that skips holes walks its source's allocation (the complement of its holes, rounded out to
/// the job's block): data up to `subjob_sectors` sectors within an allocated run, holes up to
/// [`HOLE_SUBJOB_SECTORS`] (in whole blocks) where every target takes zeroes cheaply and up
/// to `subjob_sectors` otherwise. Any other job (a zero job, a copy that does not skip holes or
/// whose source cannot tell its allocation) is cut every `subjob_sectors` sectors.
fn subjobs(
    layout: &JobLayout,
    subjob_sectors: u64,
    block: u64,
    cheap_holes: bool,
    allocation_known: bool,
) -> (Vec<u64>, Vec<bool>) {
    let len = layout.len_sectors;
    let skips = allocation_known && layout.sparse.skip_holes;
    let allocated = span(0..len).difference(&Sectors::from_ranges(layout.holes.iter().cloned()));
    let allocated = Sectors::from_ranges(
        allocated.ranges().iter().map(|r| r.start / block * block..(r.end.div_ceil(block) * block).min(len)),
    );
    let hole_max = if cheap_holes { HOLE_SUBJOB_SECTORS / block * block } else { subjob_sectors };
    let (mut bounds, mut holes, mut cursor) = (Vec::new(), Vec::new(), 0);
    while cursor < len {
        bounds.push(cursor);
        let run = allocated.ranges().iter().find(|r| r.end > cursor);
        let (end, hole) = match run {
            _ if !skips => ((cursor + subjob_sectors).min(len), false),
            Some(r) if r.start <= cursor => (r.end.min(cursor + subjob_sectors), false),
            next => (next.map_or(len, |r| r.start).min(cursor + hole_max), true),
        };
        holes.push(hole);
        cursor = end;
    }
    bounds.push(len);
    (bounds, holes)
}

/// Formats a job-relative set in a region's device coordinates.
fn at(set: &Sectors, start: u64) -> Vec<Range<u64>> {
    set.ranges().iter().map(|r| r.start + start..r.end + start).collect()
}

/// A device-coordinate `RangeSet` of the engine for the region `start..start + len`, as a
/// job-relative `Sectors`; a malformed set, or sectors outside the region, are violations.
fn relative(set: &RangeSet, start: u64, len: u64, what: &str, violations: &mut Vec<String>) -> Sectors {
    let sectors = Sectors::of(set).unwrap_or_else(|problem| {
        violations.push(format!("{what}: malformed: {problem}"));
        Sectors::from_ranges(set.ranges().iter().cloned())
    });
    let region = span(start..start + len);
    let outside = sectors.difference(&region);
    if !outside.is_empty() {
        violations.push(format!("{what}: {outside:?} lie outside the region {:?}", start..start + len));
    }
    let inside = sectors.intersection(&region);
    Sectors::from_ranges(inside.ranges().iter().map(|r| r.start - start..r.end - start))
}

/// What one job's rules share: its first outcome, and what its requests show — which
/// sub-jobs were taken and when, how they ended, the cancel and the failures.
struct JobFacts<'a> {
    j: usize,
    view: &'a JobView<'a>,
    outcome: &'a Outcome,
    len: u64,
    whole: Sectors,
    source_start: u64,
    /// The failed reads of phase 1, with their job-relative sectors.
    failed_reads: Vec<(&'a IoRecord, &'a Range<u64>)>,
    /// `read_failed`, job-relative.
    read_failed: Sectors,
    /// Per sub-job with a request: its first request's issue and its last one's completion.
    taken_at: BTreeMap<u64, u64>,
    ended_at: BTreeMap<u64, u64>,
    /// The sectors of the sub-jobs never taken.
    untaken: Sectors,
    last_done: Option<u64>,
    any_failure: bool,
    /// The cancel, if it came before the completion.
    cancel_at: Option<u64>,
}

impl<'a> JobFacts<'a> {
    /// The facts of job `j`, whose outcome is `outcome`; a malformed `read_failed` is a
    /// violation (rule 3).
    fn of(
        j: usize,
        view: &'a JobView<'a>,
        outcome: &'a Outcome,
        report: &SwarmReport,
        violations: &mut Vec<String>,
    ) -> Self {
        let len = view.layout.len_sectors;
        let source_start = view.layout.source.map_or(0, |(_, start)| start);
        let failed_reads: Vec<(&IoRecord, &Range<u64>)> = view.failed(|r| r == Role::Source).collect();
        let read_failed =
            relative(&outcome.read_failed, source_start, len, &format!("job {j}: read_failed"), violations);
        let mut taken_at: BTreeMap<u64, u64> = BTreeMap::new();
        let mut ended_at: BTreeMap<u64, u64> = BTreeMap::new();
        for (record, _, rel) in &view.ios {
            for k in view.subjobs_of(rel) {
                let first = taken_at.entry(k).or_insert(record.issued);
                *first = (*first).min(record.issued);
                let last = ended_at.entry(k).or_insert(record.done);
                *last = (*last).max(record.done);
            }
        }
        let whole = span(0..len);
        let untaken = whole.difference(&Sectors::from_ranges(taken_at.keys().map(|&k| view.subjob_range(k))));
        let completed_at = report.marks.iter().find(|(_, m)| *m == Mark::Completed(j)).map(|&(seq, _)| seq);
        let cancel_at = report
            .marks
            .iter()
            .find(|(_, m)| *m == Mark::Cancel(j))
            .map(|&(seq, _)| seq)
            .filter(|&seq| completed_at.is_none_or(|done| seq < done));
        JobFacts {
            j,
            view,
            outcome,
            len,
            whole,
            source_start,
            failed_reads,
            read_failed,
            taken_at,
            ended_at,
            untaken,
            last_done: view.ios.iter().map(|(r, ..)| r.done).max(),
            any_failure: view.ios.iter().any(|(r, ..)| !r.ok),
            cancel_at,
        }
    }

    /// Whether sub-job `k` reads nothing — a zero job's, or a hole of a sparse copy — and so
    /// shows no request under WRITE_SEQ until its turn comes (when it was taken is not seen).
    fn turn_waits(&self, k: u64) -> bool {
        self.view.seq && (self.view.layout.source.is_none() || self.view.is_hole(k))
    }

    /// The whole sub-jobs where a read failed.
    fn read_failed_subjobs(&self) -> Sectors {
        self.view.whole_subjobs(&Sectors::from_ranges(self.failed_reads.iter().map(|(_, rel)| (*rel).clone())))
    }
}

/// What one target of a job shows: its report, job-relative, and its requests.
struct TargetFacts {
    i: usize,
    start: u64,
    /// `job J target I (targetT)`, for messages.
    name: String,
    write_failed: Sectors,
    not_copied: Sectors,
    /// Its failed writes, job-relative.
    failed: Vec<Range<u64>>,
    expected_write_failed: Sectors,
    /// What its successful writes cover.
    landed: Sectors,
    /// The whole sub-jobs where a write to it failed.
    failed_subjobs: Sectors,
}

impl TargetFacts {
    /// Target `i` of the job; its malformed sets are violations (rule 3).
    fn of(facts: &JobFacts, i: usize, violations: &mut Vec<String>) -> TargetFacts {
        let (j, view) = (facts.j, facts.view);
        let (t, start) = view.layout.targets[i];
        let name = format!("job {j} target {i} (target{t})");
        let report_i = &facts.outcome.targets[i];
        let len = facts.len;
        let write_failed = relative(&report_i.write_failed, start, len, &format!("{name}: write_failed"), violations);
        let not_copied = relative(&report_i.not_copied, start, len, &format!("{name}: not_copied"), violations);
        let failed: Vec<Range<u64>> = view.failed(|r| r == Role::Target(i)).map(|(_, rel)| rel.clone()).collect();
        let expected_write_failed = Sectors::from_ranges(failed.iter().cloned());
        let landed = Sectors::from_ranges(
            view.ios.iter().filter(|(r, role, _)| r.ok && *role == Role::Target(i)).map(|(_, _, rel)| rel.clone()),
        );
        let failed_subjobs = view.whole_subjobs(&expected_write_failed);
        TargetFacts { i, start, name, write_failed, not_copied, failed, expected_write_failed, landed, failed_subjobs }
    }
}

/// The rules for one job's first outcome, each in a function named as its self-test.
fn check_job(j: usize, view: &JobView, report: &SwarmReport, violations: &mut Vec<String>) {
    let Some(outcome) = rule_1_every_job_completes_exactly_once_without_a_panic(j, view, report, violations) else {
        return;
    };
    let facts = JobFacts::of(j, view, outcome, report, violations);
    rule_4_read_err_and_read_failed_are_exactly_the_failed_reads(&facts, violations);
    rule_8_without_ignore_error_no_subjob_starts_after_an_error(&facts, violations);
    rule_12_a_zero_job_offloading_every_target_sends_each_one_write_zeroes(&facts, report, violations);
    rule_9_no_subjob_starts_after_a_cancel_and_cancelled_is_exact(&facts, violations);
    rule_7_a_job_without_failures_or_cancel_copies_everything(&facts, violations);
    let targets: Vec<TargetFacts> =
        (0..view.layout.targets.len()).map(|i| TargetFacts::of(&facts, i, violations)).collect();
    let all_failed_subjobs = targets.iter().fold(facts.read_failed_subjobs(), |acc, t| acc.union(&t.failed_subjobs));
    for target in &targets {
        rule_5_write_err_and_write_failed_are_exactly_the_failed_writes(&facts, target, violations);
        rule_6_not_copied_is_what_the_successful_writes_leave(&facts, target, violations);
        rule_7_sectors_are_not_copied_only_for_a_reason(&facts, target, &all_failed_subjobs, violations);
        rule_10_write_seq_writes_one_after_another_upwards(&facts, target, violations);
    }
}

/// Rule 1: the job completed exactly once (its callback; the resubmission after a crash, if
/// any, succeeded), with an outcome, no panic and a report per target. Returns the outcome
/// when the other rules can judge it.
fn rule_1_every_job_completes_exactly_once_without_a_panic<'a>(
    j: usize,
    view: &JobView,
    report: &'a SwarmReport,
    violations: &mut Vec<String>,
) -> Option<&'a Outcome> {
    let result = &report.jobs[j];
    if result.refused.is_some() {
        return None; // check_shutdown's
    }
    // The callback is on the first submission only; the retry is awaited.
    if result.callbacks != 1 {
        violations.push(format!("job {j}: {} completions, expected exactly 1", result.callbacks));
    }
    if let Some(retry) = &result.retry {
        if !retry.is_ok() {
            violations.push(format!("job {j}: resubmitted with faults off, still failed: {retry:?}"));
        }
    }
    let Some(outcome) = &result.outcome else {
        violations.push(format!("job {j}: no outcome"));
        return None;
    };
    if let Some(message) = &outcome.panicked {
        violations.push(format!("job {j}: the engine panicked: {message}"));
        return None;
    }
    if outcome.targets.len() != view.layout.targets.len() {
        violations.push(format!(
            "job {j}: {} target reports for {} targets",
            outcome.targets.len(),
            view.layout.targets.len()
        ));
        return None;
    }
    Some(outcome)
}

/// Rule 4: `read_err` is set exactly when a read failed; `read_failed` is exactly the failed
/// requests (without IGNORE_ERROR: whole sub-jobs), or exactly the logical blocks that stayed
/// unreadable once narrowed down (with it), and every sub-job whose read timed out.
fn rule_4_read_err_and_read_failed_are_exactly_the_failed_reads(facts: &JobFacts, violations: &mut Vec<String>) {
    let (j, view, outcome) = (facts.j, facts.view, facts.outcome);
    if outcome.read_err == facts.failed_reads.is_empty() {
        violations.push(format!(
            "job {j}: read_err {} but {} reads failed",
            outcome.read_err,
            facts.failed_reads.len()
        ));
    }
    let expected_read_failed = Sectors::from_ranges(
        facts
            .failed_reads
            .iter()
            .filter(|(_, rel)| !view.ignore || rel.end - rel.start == view.block)
            .map(|(_, rel)| (*rel).clone()),
    )
    .union(&view.timed_out_reads());
    if facts.read_failed != expected_read_failed {
        violations.push(format!(
            "job {j}: read_failed {:?}, but the failed {} are {:?}",
            outcome.read_failed,
            if view.ignore { "single-block reads" } else { "reads" },
            at(&expected_read_failed, facts.source_start)
        ));
    }
}

/// Rule 8: without IGNORE_ERROR, no sub-job is taken once an error is known (a failed read at
/// its completion, a failed write once its sub-job's writes have all completed) — but under
/// WRITE_SEQ a sub-job before the one that failed first may still start (taken before the
/// error, it waited for the throttle): every sub-job before a failure is written.
fn rule_8_without_ignore_error_no_subjob_starts_after_an_error(facts: &JobFacts, violations: &mut Vec<String>) {
    let view = facts.view;
    if view.ignore {
        return;
    }
    let known = view
        .ios
        .iter()
        .filter(|(r, ..)| !r.ok)
        .map(|(r, role, rel)| {
            let failing = view.subjobs_of(rel);
            let at = match role {
                Role::Source => r.done,
                Role::Target(_) => failing.clone().map(|k| facts.ended_at[&k]).max().unwrap_or(r.done),
            };
            (at, failing.start)
        })
        .min();
    if let Some((known, failing)) = known {
        let may_start = |k: u64| view.seq && k < failing;
        let after = |seq: u64| seq > known && view.timeouts.later_instant(seq, known);
        if let Some((k, _)) = facts.taken_at.iter().find(|&(&k, &seq)| after(seq) && !may_start(k)) {
            violations.push(format!("job {}: sub-job {k} started after an error had stopped the job", facts.j));
        }
    }
}

/// Rule 12, offload: a zero job whose targets all offload write-zeroes zeroes each with one
/// request over its whole region (none if it was cancelled before it started).
fn rule_12_a_zero_job_offloading_every_target_sends_each_one_write_zeroes(
    facts: &JobFacts,
    report: &SwarmReport,
    violations: &mut Vec<String>,
) {
    let (layout, len) = (facts.view.layout, facts.len);
    let offloads = layout.targets.iter().all(|&(t, _)| report.targets[t].options().write_zeroes);
    if layout.source.is_some() || len == 0 || !offloads {
        return;
    }
    for (i, &(t, _)) in layout.targets.iter().enumerate() {
        let requests: Vec<_> = facts.view.ios.iter().filter(|(_, role, _)| *role == Role::Target(i)).collect();
        let whole = requests.iter().all(|(r, _, rel)| r.kind == IoKind::WriteZeroes && *rel == (0..len));
        if !whole || requests.len() > 1 || (requests.is_empty() && facts.cancel_at.is_none()) {
            violations.push(format!(
                "job {}: target {i} (target{t}) offloads write-zeroes, yet the zero job sent {:?}",
                facts.j,
                requests.iter().map(|(r, ..)| (r.kind, r.sectors.clone())).collect::<Vec<_>>()
            ));
        }
    }
}

/// Rule 9: no sub-job is taken after the cancel; `cancelled` is set exactly when the cancel
/// came before the last sub-job was taken. A sub-job that reads nothing shows no request under
/// WRITE_SEQ until its turn ([`JobFacts::turn_waits`]), so it is not held to either.
fn rule_9_no_subjob_starts_after_a_cancel_and_cancelled_is_exact(facts: &JobFacts, violations: &mut Vec<String>) {
    let (j, view, outcome) = (facts.j, facts.view, facts.outcome);
    let zero_seq = view.subjob_count > 0 && facts.turn_waits(view.subjob_count - 1);
    if let Some(cancel) = facts.cancel_at {
        let after = |seq: u64| seq > cancel && view.timeouts.later_instant(seq, cancel);
        if let Some((k, _)) = facts.taken_at.iter().find(|&(&k, &seq)| after(seq) && !facts.turn_waits(k)) {
            violations.push(format!("job {j}: sub-job {k} started after the job was cancelled"));
        }
    }
    if view.subjob_count == 0 {
        if outcome.cancelled {
            violations.push(format!("job {j}: a zero-length job reported cancelled"));
        }
        return;
    }
    let last_taken = facts.taken_at.get(&(view.subjob_count - 1)).copied();
    let expected = match (facts.cancel_at, last_taken) {
        (None, _) => Some(false),
        (Some(cancel), Some(taken)) => (!zero_seq || cancel > taken)
            .then_some(cancel < taken)
            .filter(|_| view.timeouts.later_instant(cancel.max(taken), cancel.min(taken))),
        // The job may have finished (stopped) just before the cancel came; and a zero
        // sub-job taken under WRITE_SEQ shows no request until its turn, which a stopped
        // job never gives it.
        (Some(cancel), None) => (!zero_seq && facts.last_done.is_none_or(|done| cancel < done)).then_some(true),
    };
    if expected.is_some_and(|expected| expected != outcome.cancelled) {
        violations.push(format!(
            "job {j}: cancelled {} but the cancel came {}",
            outcome.cancelled,
            match (facts.cancel_at, last_taken) {
                (None, _) => "never (or after completion)".to_owned(),
                (Some(c), Some(t)) if c > t => "after its last sub-job was taken".to_owned(),
                _ => "before its last sub-job was taken".to_owned(),
            }
        ));
    }
}

/// Rule 7, the whole job: a job that met no error and no cancel copied everything.
fn rule_7_a_job_without_failures_or_cancel_copies_everything(facts: &JobFacts, violations: &mut Vec<String>) {
    let outcome = facts.outcome;
    let failed = outcome.read_err || !outcome.write_err.is_empty() || !outcome.is_ok();
    if !facts.any_failure && facts.cancel_at.is_none() && failed {
        violations
            .push(format!("job {}: no request failed and no cancel came, yet the outcome is {outcome:?}", facts.j));
    }
}

/// Rule 5: `write_err` bit i and `write_failed[i]` are exactly the failed writes to target i.
fn rule_5_write_err_and_write_failed_are_exactly_the_failed_writes(
    facts: &JobFacts,
    target: &TargetFacts,
    violations: &mut Vec<String>,
) {
    let (outcome, name, i) = (facts.outcome, &target.name, target.i);
    if outcome.write_err.contains(i) == target.failed.is_empty() {
        violations.push(format!(
            "{name}: write_err {} but {} writes failed",
            outcome.write_err.contains(i),
            target.failed.len()
        ));
    }
    if target.write_failed != target.expected_write_failed {
        violations.push(format!(
            "{name}: write_failed {:?}, the failed writes are {:?}",
            outcome.targets[i].write_failed,
            at(&target.expected_write_failed, target.start)
        ));
    }
}

/// Rule 6: what the trace says landed on target i is what the outcome calls copied.
fn rule_6_not_copied_is_what_the_successful_writes_leave(
    facts: &JobFacts,
    target: &TargetFacts,
    violations: &mut Vec<String>,
) {
    let not_landed = facts.whole.difference(&target.landed);
    if target.not_copied != not_landed {
        violations.push(format!(
            "{}: not_copied {:?}, but the writes that did not succeed leave {:?}",
            target.name,
            facts.outcome.targets[target.i].not_copied,
            at(&not_landed, target.start)
        ));
    }
}

/// Rule 7, per target: sectors are not copied only for a reason. With IGNORE_ERROR,
/// `not_copied` holds `read_failed` and the failed writes and lies within them, their
/// sub-jobs and the sub-jobs never taken; without it, it is exactly the sub-jobs never taken,
/// unreadable, failed on this target and, under WRITE_SEQ, after the first failing one. And
/// a sub-job is never left untaken without a cancel.
fn rule_7_sectors_are_not_copied_only_for_a_reason(
    facts: &JobFacts,
    target: &TargetFacts,
    all_failed_subjobs: &Sectors,
    violations: &mut Vec<String>,
) {
    let (view, name, untaken) = (facts.view, &target.name, &facts.untaken);
    let report_i = &facts.outcome.targets[target.i];
    if view.ignore {
        let lower = facts.read_failed.union(&target.expected_write_failed).union(untaken);
        let upper = facts.read_failed.union(&target.failed_subjobs).union(untaken);
        if !lower.is_subset(&target.not_copied) || !target.not_copied.is_subset(&upper) {
            violations.push(format!(
                "{name} (IGNORE_ERROR): not_copied {:?} must hold read_failed and the failed writes {:?} and lie within them and their sub-jobs {:?}",
                report_i.not_copied,
                at(&lower, target.start),
                at(&upper, target.start)
            ));
        }
    } else {
        // WRITE_SEQ: the first failing sub-job; later ones are not written (earlier ones are).
        let after_first_failure = match all_failed_subjobs.ranges().first() {
            Some(first) if view.seq => span(first.end..facts.len).difference(untaken),
            _ => Sectors::new(),
        };
        // A sparse copy that scans for zero blocks writes a sub-job to a target in several
        // requests (data, and zeroes where it found zero blocks): of a sub-job with a failed
        // write, the pieces that landed are copied. Every other job writes a sub-job to a
        // target in one request, and a failed write leaves the whole sub-job.
        let failed_here = if view.layout.sparse.zero_block_bytes != 0 {
            target.failed_subjobs.difference(&target.landed)
        } else {
            target.failed_subjobs.clone()
        };
        let expected = untaken.union(&facts.read_failed_subjobs()).union(&failed_here).union(&after_first_failure);
        if target.not_copied != expected {
            violations.push(format!(
                "{name}: not_copied {:?}, expected {:?} (sub-jobs never taken, unreadable, failed on this target{})",
                report_i.not_copied,
                at(&expected, target.start),
                if view.seq { ", or after the first failure under WRITE_SEQ" } else { "" }
            ));
        }
    }
    if !untaken.is_empty() && facts.cancel_at.is_none() && (view.ignore || !facts.any_failure) {
        violations.push(format!(
            "job {}: sectors {:?} of the source never read, with no cancel",
            facts.j,
            at(untaken, facts.source_start)
        ));
    }
}

/// Rule 10: under WRITE_SEQ, a write to target i is issued only once the job's previous write
/// to it has completed, and at a higher sector.
fn rule_10_write_seq_writes_one_after_another_upwards(
    facts: &JobFacts,
    target: &TargetFacts,
    violations: &mut Vec<String>,
) {
    if !facts.view.seq {
        return;
    }
    let mut writes: Vec<&(&IoRecord, Role, Range<u64>)> =
        facts.view.ios.iter().filter(|(_, role, _)| *role == Role::Target(target.i)).collect();
    writes.sort_by_key(|(r, ..)| r.issued);
    for pair in writes.windows(2) {
        let ((before, _, before_rel), (after, _, after_rel)) = (pair[0], pair[1]);
        if before.done > after.issued || before_rel.end > after_rel.start {
            violations.push(format!(
                "{} (WRITE_SEQ): write {:?} issued before write {:?} completed or below it",
                target.name, after.sectors, before.sectors
            ));
        }
    }
}

/// Sub-jobs in flight per job never exceed `subjobs_in_flight`, and pages held by copy
/// sub-jobs never exceed the budget: measured from the lives of the requests, where a
/// sub-job lives from its first request's issue to its last request's completion (a lower
/// bound of how long it holds its slot), and holds its pages from its first read's issue to
/// its last read's or data write's completion (a write-zeroes holds no pages: a sparse copy's
/// sub-job may give its pages back once its blocks were found all zero, then write zeroes).
fn check_concurrency(scenario: &SwarmScenario, views: &[JobView], phase: u8, violations: &mut Vec<String>) {
    // (job, sub-job) -> (first issue, last completion); the same over requests holding pages.
    let mut lives: BTreeMap<(usize, u64), (u64, u64)> = BTreeMap::new();
    let mut page_lives: BTreeMap<(usize, u64), (u64, u64, usize)> = BTreeMap::new();
    for (j, view) in views.iter().enumerate() {
        for (record, _, rel) in view.all.iter().filter(|(r, ..)| r.phase == phase) {
            let k = view.subjob_of(rel.start);
            let life = lives.entry((j, k)).or_insert((record.issued, record.done));
            life.0 = life.0.min(record.issued);
            life.1 = life.1.max(record.done);
            // A hole sub-job gives its pages back before it writes.
            if view.layout.source.is_some() && !view.is_hole(k) && record.kind != IoKind::WriteZeroes {
                let subjob = view.subjob_range(k);
                let pages = ((subjob.end - subjob.start) as usize * SECTOR_SIZE).div_ceil(PAGE_SIZE);
                let life = page_lives.entry((j, k)).or_insert((record.issued, record.done, pages));
                life.0 = life.0.min(record.issued);
                life.1 = life.1.max(record.done);
            }
        }
    }
    let mut events: Vec<(u64, usize, i64, i64)> = Vec::new(); // (seq, job, sub-jobs, pages)
    for (&(j, _), &(from, to)) in &lives {
        events.push((from, j, 1, 0));
        events.push((to, j, -1, 0));
    }
    for (&(j, _), &(from, to, pages)) in &page_lives {
        events.push((from, j, 0, pages as i64));
        events.push((to, j, 0, -(pages as i64)));
    }
    events.sort_by_key(|&(seq, ..)| seq);
    let mut in_flight = vec![0i64; views.len()];
    let mut reported = vec![false; views.len()];
    let mut pages = 0i64;
    let mut pages_reported = false;
    let limit = scenario.config.subjobs_in_flight as i64;
    for (seq, j, delta, page_delta) in events {
        in_flight[j] += delta;
        pages += page_delta;
        if in_flight[j] > limit && !reported[j] {
            reported[j] = true;
            violations.push(format!(
                "job {j} (phase {phase}): {} sub-jobs in flight at trace position {seq}, over subjobs_in_flight {limit}",
                in_flight[j]
            ));
        }
        if pages > scenario.config.page_budget as i64 && !pages_reported {
            pages_reported = true;
            violations.push(format!(
                "phase {phase}: copy sub-jobs in flight hold at least {pages} pages at trace position {seq}, over the budget of {}",
                scenario.config.page_budget
            ));
        }
    }
}

/// The content a target sector may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Old,
    New,
    Other,
}

/// Targets hold old or new content as the outcome says; nothing else changed.
fn check_contents(scenario: &SwarmScenario, report: &SwarmReport, violations: &mut Vec<String>) {
    // Per job and target, the final outcome's not_copied, in the oracle's own model.
    let not_copied: Vec<Vec<Sectors>> = report
        .jobs
        .iter()
        .map(|result| {
            let outcome: Option<&Outcome> = result.retry.as_ref().or(result.outcome.as_ref());
            outcome
                .map(|o| {
                    o.targets.iter().map(|t| Sectors::from_ranges(t.not_copied.ranges().iter().cloned())).collect()
                })
                .unwrap_or_default()
        })
        .collect();
    for (t, disk) in report.targets.iter().enumerate() {
        check_target_contents(scenario, t, disk, &not_copied, violations);
    }
    check_source_contents(scenario, report, violations);
}

/// Target `t`'s every sector: outside every job its old content; inside a job's region old or
/// new, and new where the final outcome calls it copied — unless a logged fault (a torn, lost
/// or misdirected write) may have left anything there.
fn check_target_contents(
    scenario: &SwarmScenario,
    t: usize,
    disk: &MemDisk,
    not_copied: &[Vec<Sectors>],
    violations: &mut Vec<String>,
) {
    let log = disk.fault_log();
    // Sectors where a fault may leave anything: misdirected writes (both ends), torn and
    // lost writes.
    let excused = Sectors::from_ranges(log.iter().flat_map(|r| match &r.kind {
        FaultKind::Misdirected { landed } => vec![r.sectors.clone(), landed.clone()],
        FaultKind::Torn { .. } | FaultKind::Lost => vec![r.sectors.clone()],
        _ => vec![],
    }));
    let len = disk.options().len_sectors;
    let mut owner: Vec<Option<(usize, usize, u64)>> = vec![None; len as usize];
    for (j, layout) in scenario.jobs.iter().enumerate() {
        for (i, &(tt, start)) in layout.targets.iter().enumerate() {
            if tt == t {
                for k in 0..layout.len_sectors {
                    owner[(start + k) as usize] = Some((j, i, k));
                }
            }
        }
    }
    for (range, run) in disk.provenance(0..len) {
        for sector in range.clone() {
            // A pattern run names its first sector; the others follow on.
            let provenance = match run {
                Provenance::Pattern { seed, generation, sector: first } => {
                    Provenance::Pattern { seed, generation, sector: first + (sector - range.start) }
                }
                other => other,
            };
            let old = Provenance::Pattern { seed: target_seed(t), generation: 0, sector };
            let Some((j, i, k)) = owner[sector as usize] else {
                if provenance != old && !excused.contains(sector) {
                    violations.push(format!("target{t} sector {sector} outside every job changed to {provenance:?}"));
                }
                continue;
            };
            let verdict = sector_verdict(&scenario.jobs[j], k, provenance, old);
            let copied = not_copied[j].get(i).is_some_and(|set| !set.contains(sector));
            let legal = match verdict {
                Verdict::New => true,
                Verdict::Old => !copied,
                Verdict::Other => false,
            };
            if !legal && !excused.contains(sector) {
                violations.push(format!(
                    "job {j} target {i} (target{t}) sector {sector}: holds {verdict:?} ({provenance:?}) but the outcome says {}",
                    if copied { "copied" } else { "not copied" }
                ));
            }
        }
    }
}

/// What a target sector holding `provenance` holds for job-relative sector `k` of `layout`,
/// whose old content is `old`: the new content is the source's pattern, or zeroes for a zero
/// job and where the source reads as zeroes (a hole or a zero run).
fn sector_verdict(layout: &JobLayout, k: u64, provenance: Provenance, old: Provenance) -> Verdict {
    let new = match layout.source {
        Some((s, start)) if !layout.source_reads_zero(k) => {
            Provenance::Pattern { seed: source_seed(s), generation: 0, sector: start + k }
        }
        _ => Provenance::Zero,
    };
    if provenance == new {
        Verdict::New
    } else if provenance == old {
        Verdict::Old
    } else {
        Verdict::Other
    }
}

/// Sources are never written: their pattern, and zeroes in their holes and zero runs.
fn check_source_contents(scenario: &SwarmScenario, report: &SwarmReport, violations: &mut Vec<String>) {
    for (s, disk) in report.sources.iter().enumerate() {
        let len = disk.options().len_sectors;
        let zeroes = scenario.source_holes().chain(scenario.source_zero_runs());
        let holes = Sectors::from_ranges(zeroes.filter(|&(h, _)| h == s).map(|(_, hole)| hole));
        let pattern = span(0..len).difference(&holes);
        let expected =
            pattern.ranges().iter().map(|r| (r.clone(), false)).chain(holes.ranges().iter().map(|r| (r.clone(), true)));
        let mut expected: Vec<(Range<u64>, bool)> = expected.collect();
        expected.sort_by_key(|(r, _)| r.start);
        let expected: Vec<(Range<u64>, Provenance)> = expected
            .into_iter()
            .map(|(r, hole)| {
                let provenance = if hole {
                    Provenance::Zero
                } else {
                    Provenance::Pattern { seed: source_seed(s), generation: 0, sector: r.start }
                };
                (r, provenance)
            })
            .collect();
        if disk.provenance(0..len) != expected {
            violations.push(format!("source{s} changed"));
        }
    }
}

/// Throttle: with a rate limit of R bytes/s, the sub-jobs issued by time t (each counted once,
/// by its length, at its first request; an offloaded zero job moves no bytes) never exceed
/// R·t plus the bucket, which holds one sub-job (the largest, if one is larger); twice that is
/// allowed for rounding.
fn check_throttle(scenario: &SwarmScenario, views: &[JobView], violations: &mut Vec<String>) {
    let Some(rate) = scenario.config.throttle.rate_bytes_per_s else { return };
    let mut issues: Vec<(u64, u64)> = Vec::new(); // (µs, bytes)
    for view in views {
        let mut first: BTreeMap<u64, (u64, bool)> = BTreeMap::new(); // sub-job: (µs, offloaded)
        for (record, _, rel) in &view.all {
            let at = record.issued_us;
            let offloaded = record.kind == IoKind::WriteZeroes && *rel == (0..view.layout.len_sectors);
            for k in view.subjobs_of(rel) {
                let entry = first.entry(k).or_insert((at, offloaded));
                if at < entry.0 {
                    *entry = (at, offloaded);
                }
            }
        }
        for (k, (at, offloaded)) in first {
            let bytes = if offloaded { 0 } else { view.moved_bytes(k) };
            issues.push((at, bytes));
        }
    }
    issues.sort_unstable();
    let largest = issues.iter().map(|&(_, bytes)| bytes).max().unwrap_or(0);
    let bucket = 2 * largest.max(scenario.config.subjob_size_bytes as u64);
    let mut sum: u128 = 0;
    for &(at, bytes) in &issues {
        sum += u128::from(bytes);
        let allowed = u128::from(bucket) + u128::from(rate) * u128::from(at) / 1_000_000;
        if sum > allowed {
            violations.push(format!(
                "throttle of {rate} B/s: {sum} bytes of sub-jobs issued by {at} µs, more than the {allowed} allowed"
            ));
            return;
        }
    }
}

/// Callbacks (jobs' and prepared ones) run one at a time, each returning before the next
/// begins; and a prepared callback queued after a job's callback began runs after that
/// callback returned (dm-kcopyd's promise: it is queued behind the completions before it).
fn check_callback_order(report: &SwarmReport, violations: &mut Vec<String>) {
    let seq_of = |mark: Mark| report.marks.iter().find(|(_, m)| *m == mark).map(|&(seq, _)| seq);
    // (began, returned, what)
    let mut runs: Vec<(u64, u64, String)> = Vec::new();
    for (seq, mark) in &report.marks {
        let (returned, what) = match *mark {
            Mark::Completed(j) => (seq_of(Mark::CallbackReturned(j)), format!("job {j}'s callback")),
            Mark::PreparedRan(p) => (seq_of(Mark::PreparedReturned(p)), format!("prepared {p}")),
            _ => continue,
        };
        match returned {
            Some(returned) if returned > *seq => runs.push((*seq, returned, what)),
            _ => violations.push(format!("callbacks: {what} began at {seq} and never returned")),
        }
    }
    runs.sort();
    for pair in runs.windows(2) {
        if pair[1].0 < pair[0].1 {
            violations.push(format!(
                "callbacks: {} began at {} while {} ran ({}..{})",
                pair[1].2, pair[1].0, pair[0].2, pair[0].0, pair[0].1
            ));
        }
    }
    for (p, ran) in
        report.marks.iter().filter_map(|&(seq, m)| if let Mark::PreparedRan(p) = m { Some((p, seq)) } else { None })
    {
        let Some(queued) = seq_of(Mark::PreparedQueued(p)) else { continue }; // rule 16's
        for (began, mark) in &report.marks {
            let Mark::Completed(j) = *mark else { continue };
            let returned = seq_of(Mark::CallbackReturned(j)).unwrap_or(u64::MAX);
            if *began < queued && ran < returned {
                violations.push(format!(
                    "callbacks: prepared {p}, queued at {queued} after job {j}'s callback began ({began}), ran at {ran}, before it returned"
                ));
            }
        }
    }
}

/// The I/O log as the engine saw it: a request that outlived the client's I/O timeout (or
/// never completed) failed when the timeout fired, which is placed on the log's sequence at
/// the first event at or after that moment. Its `done_us` stays the device's completion.
fn engine_io(report: &SwarmReport, timeouts: &Timeouts) -> Vec<IoRecord> {
    let Some(timeout) = timeouts.limit_us else { return report.io.clone() };
    let marks = report.marks.iter().zip(&report.mark_us).map(|(&(seq, _), &us)| (us, seq));
    let mut times: Vec<(u64, u64)> = report
        .io
        .iter()
        .flat_map(|r| [(r.issued_us, r.issued), (r.done_us, r.done)])
        .chain(marks)
        .filter(|&(us, _)| us != u64::MAX)
        .collect();
    times.sort_unstable();
    let end = times.iter().map(|&(_, seq)| seq + 1).max().unwrap_or(0);
    let seen = |r: &IoRecord| {
        if !timeouts.view(r).0 {
            return r.clone();
        }
        let at = r.issued_us + timeout;
        let done = times.get(times.partition_point(|&(us, _)| us < at)).map_or(end, |&(_, seq)| seq);
        IoRecord { ok: false, done, ..r.clone() }
    };
    report.io.iter().map(seen).collect()
}

/// Requests that had timed out by `timed_out_by` (µs) and that their devices still held after
/// `held_after` (or at it, with `at_too`), and the pages of the sub-jobs their buffers belong
/// to (each sub-job once; a zero job's buffer and a write-zeroes hold none).
fn held(views: &[JobView], timed_out_by: u64, held_after: u64, at_too: bool) -> (u64, u64) {
    let (mut requests, mut subjobs) = (0, std::collections::BTreeSet::new());
    for (j, view) in views.iter().enumerate() {
        for (record, _, rel) in &view.all {
            let (timed_out, latency) = view.timeouts.view(record);
            let still = record.done_us > held_after || (at_too && record.done_us == held_after);
            if timed_out && record.issued_us + latency <= timed_out_by && still {
                requests += 1;
                let k = view.subjobs_of(rel).start;
                // A hole's zero buffer is no pool page.
                if view.layout.source.is_some() && record.kind != IoKind::WriteZeroes && !view.is_hole(k) {
                    subjobs.insert((j, k));
                }
            }
        }
    }
    let pages = subjobs.iter().map(|&(j, k)| {
        let range = views[j].subjob_range(k);
        ((range.end - range.start) * SECTOR_SIZE as u64).div_ceil(PAGE_SIZE as u64)
    });
    (requests, pages.sum())
}

/// Held resources: the shutdown report (published once, when the first shutdown's wait ended:
/// every later call returns it) and the statistics after the last shutdown count as
/// outstanding exactly the timed-out requests the devices still held, and as pages in use
/// exactly their sub-jobs' pages: at least what had timed out when the shutdown began and was
/// still held when it returned, at most what had timed out by its return and was held when it
/// began.
fn check_held(report: &SwarmReport, views: &[JobView], violations: &mut Vec<String>) {
    let times = |mark: Mark| -> Vec<u64> {
        report.marks.iter().zip(&report.mark_us).filter(|((_, m), _)| *m == mark).map(|(_, &us)| us).collect()
    };
    let spans: Vec<(u64, u64)> = times(Mark::ShutdownBegun).into_iter().zip(times(Mark::ShutdownReturned)).collect();
    let Some(&first) = spans.first() else { return };
    let mut counted: Vec<(String, u64, u64, (u64, u64))> = report
        .shutdown_reports
        .iter()
        .enumerate()
        .map(|(n, r)| (format!("shutdown {n}"), r.pool.pages_in_use as u64, r.requests_outstanding, first))
        .collect();
    if let (Some(stats), Some(&(_, returned))) = (&report.stats, spans.last()) {
        let pages = stats.pool.pages_in_use as u64;
        counted.push(("the statistics after it".into(), pages, stats.requests_outstanding, (returned, returned)));
    }
    for (what, pages, requests, (begun, returned)) in counted {
        let (least, most) = (held(views, begun, returned, false), held(views, returned, begun, true));
        if !(least.0..=most.0).contains(&requests) || !(least.1..=most.1).contains(&pages) {
            violations.push(format!(
                "{what}: {pages} pages in use, {requests} requests outstanding; devices held {}..={} timed-out requests and {}..={} of their pages",
                least.0, most.0, least.1, most.1
            ));
        }
    }
}

/// The client's I/O timeout, and how the engine saw each request against it.
#[derive(Debug, Default)]
struct Timeouts {
    /// The timeout in model µs; `None`: requests wait for ever.
    limit_us: Option<u64>,
    /// Requests (by the sequence number of their issue) that completed at the very moment
    /// their timeout fired and that the engine counted as timed out: both timers fire at one
    /// instant, and the outcome tells which the engine saw first.
    ties: std::collections::BTreeSet<u64>,
    /// The model time (µs) of every position of the log's sequence (requests and marks).
    times: BTreeMap<u64, u64>,
}

impl Timeouts {
    /// The timeout of `scenario`, with the ties of `report` settled by the outcomes.
    fn of(scenario: &SwarmScenario, report: &SwarmReport) -> Timeouts {
        let limit_us = scenario.config.io_timeout_ms.map(|ms| ms.saturating_mul(1000));
        let Some(limit) = limit_us else { return Timeouts::default() };
        let tied = report.io.iter().filter(|r| r.done_us != u64::MAX && r.done_us - r.issued_us == limit);
        let ties = tied.filter(|r| Timeouts::reported_failed(scenario, report, r)).map(|r| r.issued).collect();
        let requests = report.io.iter().flat_map(|r| [(r.issued, r.issued_us), (r.done, r.done_us)]);
        let marks = report.marks.iter().zip(&report.mark_us).map(|(&(seq, _), &us)| (seq, us));
        let times = requests.chain(marks).filter(|&(_, us)| us != u64::MAX).collect();
        Timeouts { limit_us, ties, times }
    }

    /// Whether position `later` of the log came at a later model time than `earlier`, as far
    /// as the order of requests tells what the engine did. Without a timeout, every request
    /// is issued where the engine calls its device, and the sequence alone tells. With one,
    /// each request runs as a task of its own and reaches the device (and the log) later in
    /// the same instant: a sub-job taken before an error or a cancel may show its first
    /// request after them, so only a later instant counts.
    fn later_instant(&self, later: u64, earlier: u64) -> bool {
        let us = |seq: u64| self.times.get(&seq).copied().unwrap_or(u64::MAX);
        self.limit_us.is_none() || us(later) > us(earlier)
    }

    /// Whether the outcome of `record`'s job reports its sectors as failed.
    fn reported_failed(scenario: &SwarmScenario, report: &SwarmReport, record: &IoRecord) -> bool {
        let Some(j) = scenario.job_of_request(record) else { return false };
        let result = &report.jobs[j];
        let outcome = if record.phase == 1 { result.outcome.as_ref() } else { result.retry.as_ref() };
        let Some(outcome) = outcome else { return false };
        match record.disk {
            DiskRef::Source(_) => outcome.read_failed.intersects(&record.sectors),
            DiskRef::Target(t) => scenario.jobs[j]
                .targets
                .iter()
                .zip(&outcome.targets)
                .any(|(&(target, _), report)| target == t && report.write_failed.intersects(&record.sectors)),
        }
    }

    /// Whether the engine saw `record` time out (it outlived the timeout, or never
    /// completed), and its latency as the engine counts it, in µs (up to the timeout).
    fn view(&self, record: &IoRecord) -> (bool, u64) {
        let life = record.done_us.saturating_sub(record.issued_us);
        match self.limit_us {
            Some(limit) if record.done_us == u64::MAX || life > limit => (true, limit),
            Some(limit) if life == limit && self.ties.contains(&record.issued) => (true, limit),
            _ => (false, life),
        }
    }
}

/// Statistics: `Client::stats()` once the client shut down agrees with the run — jobs
/// submitted (accepted, resubmissions included; refused ones not counted), completed, failed
/// (a read or write error, or a panic) and cancelled from the outcomes; per device and
/// operation, the requests, errors, timeouts, bytes of the successful ones, and their
/// latencies (count, sum and longest) from the I/O log.
fn check_stats(scenario: &SwarmScenario, report: &SwarmReport, timeouts: &Timeouts, violations: &mut Vec<String>) {
    let Some(stats) = &report.stats else { return };
    let outcomes: Vec<&Outcome> = report.jobs.iter().flat_map(|r| r.outcome.iter().chain(r.retry.iter())).collect();
    let failed = outcomes.iter().filter(|o| o.read_err || !o.write_err.is_empty() || o.panicked.is_some()).count();
    let cancelled = outcomes.iter().filter(|o| o.cancelled).count();
    let counted = (stats.jobs_submitted, stats.jobs_completed, stats.jobs_failed, stats.jobs_cancelled);
    let expected = (outcomes.len() as u64, outcomes.len() as u64, failed as u64, cancelled as u64);
    if counted != expected {
        violations.push(format!(
            "statistics: jobs submitted, completed, failed, cancelled {counted:?}, the outcomes say {expected:?}"
        ));
    }
    // (disk, kind) -> (count, errors, timeouts, bytes, latency count, sum, max)
    let mut from_log: BTreeMap<(String, &'static str), [u128; 7]> = BTreeMap::new();
    for record in &report.io {
        let name = match record.disk {
            DiskRef::Source(s) => &scenario.sources[s].name,
            DiskRef::Target(t) => &scenario.targets[t].name,
        };
        let op = match record.kind {
            IoKind::Read => "read",
            IoKind::Write => "write",
            IoKind::WriteZeroes => "write_zeroes",
        };
        let (timed_out, latency) = timeouts.view(record);
        let ok = record.ok && !timed_out;
        let entry = from_log.entry((name.clone(), op)).or_default();
        let bytes = u128::from(record.sectors.end - record.sectors.start) * SECTOR_SIZE as u128;
        let latency = u128::from(latency);
        let row = [1, u128::from(!ok), u128::from(timed_out), if ok { bytes } else { 0 }, 1, latency, latency];
        for (k, value) in row.into_iter().enumerate() {
            entry[k] = if k == 6 { entry[k].max(value) } else { entry[k] + value };
        }
    }
    let mut from_stats: BTreeMap<(String, &'static str), [u128; 7]> = BTreeMap::new();
    for device in &stats.devices {
        for (op, o) in [("read", &device.read), ("write", &device.write), ("write_zeroes", &device.write_zeroes)] {
            if o.count > 0 || o.latency.count() > 0 {
                let [count, errors, timeouts, latencies, sum_us, max_us] =
                    [o.count, o.errors, o.timeouts, o.latency.count(), o.latency.sum_us, o.latency.max_us]
                        .map(u128::from);
                let row = [count, errors, timeouts, o.bytes, latencies, sum_us, max_us];
                from_stats.insert((device.name.clone(), op), row);
            }
        }
    }
    for key in from_log.keys().chain(from_stats.keys()).collect::<std::collections::BTreeSet<_>>() {
        let (log, counted) = (from_log.get(key), from_stats.get(key));
        if log != counted {
            violations.push(format!(
                "statistics: {} {}: [count, errors, timeouts, bytes, latencies, sum µs, max µs] {counted:?}, the I/O log says {log:?}",
                key.0, key.1
            ));
        }
    }
}

/// The client's busy time from the I/O log: the union of every request's life as the engine
/// counts it (from its issue to its completion, or to the timeout), as sorted, disjoint
/// intervals of model µs.
fn busy_intervals(report: &SwarmReport, timeouts: &Timeouts) -> Vec<Range<u64>> {
    let mut lives: Vec<Range<u64>> = report
        .io
        .iter()
        .map(|r| r.issued_us..r.issued_us.saturating_add(timeouts.view(r).1))
        .filter(|life| life.start < life.end)
        .collect();
    lives.sort_by_key(|life| life.start);
    let mut union: Vec<Range<u64>> = Vec::new();
    for life in lives {
        match union.last_mut() {
            Some(last) if life.start <= last.end => last.end = last.end.max(life.end),
            _ => union.push(life),
        }
    }
    union
}

/// Busy time of `busy` within `window`.
fn busy_within(busy: &[Range<u64>], window: Range<u64>) -> u64 {
    busy.iter().map(|b| b.end.min(window.end).saturating_sub(b.start.max(window.start))).sum()
}

/// Throttle busy share: with a limit of P %, over any window of the throttle's length
/// (`BUSY_WINDOW`) from the start of a busy stretch, the client's busy time (from the I/O log)
/// stays within P % of it plus the credit the throttle may hold when the window starts and
/// twice the longest sub-job's life (the I/O of sub-jobs admitted just under the limit) — and,
/// under `WRITE_SEQ`, `subjobs_in_flight` sub-jobs' lives (taken and admitted together, they
/// write one after another when their turns come: the throttle admits before the turn). The
/// throttle admits a sub-job only while busy ≤ P % × total over its decaying history (both
/// halved when the total reaches a window), so in a window it can spend P % of the window plus
/// that credit: P % of the time accounted (at most a window) less the busy time accounted, of
/// which the last half window counts at least half (at most one halving falls in it). A
/// throttle that forgets its busy history when it halves it gets a whole credit back each
/// half window and spends twice the share. And the copy
/// progresses: while a job is waiting to complete, the client is never idle longer than it takes
/// the busy share of a window to fall back under the limit (100 / P windows) plus the rate's
/// wait for the largest sub-job.
fn check_busy(scenario: &SwarmScenario, report: &SwarmReport, views: &[JobView], violations: &mut Vec<String>) {
    let Some(percent) = scenario.config.throttle.busy_percent.filter(|&p| p < 100) else { return };
    let window = kcopyd_core::BUSY_WINDOW.as_micros() as u64;
    let (mut longest_life, mut largest_bytes, mut ahead) = (0, 0, 0);
    for view in views {
        let mut lives: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
        for (record, _, rel) in &view.all {
            let end = record.issued_us.saturating_add(view.timeouts.view(record).1);
            for k in view.subjobs_of(rel) {
                let life = lives.entry(k).or_insert((record.issued_us, end));
                *life = (life.0.min(record.issued_us), life.1.max(end));
            }
        }
        let longest = lives.values().map(|&(from, to)| to - from).max().unwrap_or(0);
        longest_life = longest_life.max(longest);
        if view.seq {
            // WRITE_SEQ: sub-jobs are admitted when taken and write when their turn comes, so
            // up to `subjobs_in_flight` of them admitted together write one after another.
            let together = (scenario.config.subjobs_in_flight as u64).min(view.subjob_count);
            ahead = ahead.max(together * longest);
        }
        largest_bytes = largest_bytes.max(view.subjob_sectors * SECTOR_SIZE as u64);
    }
    let Some(timeouts) = views.first().map(|view| view.timeouts) else { return };
    let busy = busy_intervals(report, timeouts);
    let first = busy.first().map_or(0, |b| b.start);
    let share = |us: u64| us * u64::from(percent) / 100;
    for start in busy.iter().map(|b| b.start) {
        // The credit the throttle may hold when the window starts: P % of its time accounted
        // (at most a window) less its busy time accounted, of which the last half window
        // counts at least half (one halving at most).
        let credit = share((start - first).min(window))
            .saturating_sub(busy_within(&busy, start.saturating_sub(window / 2).max(first)..start) / 2);
        let allowed = share(window) + credit + 2 * longest_life + ahead;
        let within = busy_within(&busy, start..start + window);
        if within > allowed {
            violations.push(format!(
                "busy limit of {percent} %: busy {within} µs of the {window} µs from {start} µs, more than the {allowed} allowed (longest sub-job {longest_life} µs, WRITE_SEQ sub-jobs admitted ahead {ahead} µs)"
            ));
            break;
        }
    }
    let rate_wait = scenario.config.throttle.rate_bytes_per_s.map_or(0, |rate| largest_bytes * 1_000_000 / rate);
    let idle_max = window * 100 / u64::from(percent) + rate_wait + 2 * longest_life;
    let mark_at = |mark: Mark| report.marks.iter().position(|(_, m)| *m == mark).map(|i| report.mark_us[i]);
    let pending: Vec<(u64, u64)> = (0..report.jobs.len())
        .filter_map(|j| Some((mark_at(Mark::Submitting(j))?, mark_at(Mark::Completed(j))?)))
        .collect();
    for gap in busy.windows(2).map(|pair| pair[0].end..pair[1].start) {
        let waiting = pending.iter().any(|&(from, to)| from <= gap.start && gap.end <= to);
        if waiting && gap.end - gap.start > idle_max {
            violations.push(format!(
                "busy limit of {percent} %: idle from {} µs to {} µs while a job waited, longer than {idle_max} µs",
                gap.start, gap.end
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::{Inputs, run};

    /// A clean run of a seed with a copy job of several sub-jobs, and that job's index.
    fn clean_run() -> (SwarmScenario, SwarmReport, usize) {
        for seed in 0.. {
            let mut inputs = Inputs::from_seed(seed);
            inputs.crash_at_us = None;
            for disk in inputs.sources.iter_mut().chain(&mut inputs.targets) {
                disk.faults = Default::default();
            }
            inputs.jobs.iter_mut().for_each(|job| job.cancel_after_us = None);
            let scenario = inputs.layout();
            let job = scenario.jobs.iter().position(|j| j.source.is_some() && j.len_sectors >= 8);
            if let (Some(job), true) = (job, scenario.jobs.len() < 20) {
                let report = run(&scenario);
                assert_eq!(check(&scenario, &report), Vec::<String>::new(), "seed {seed} without faults");
                return (scenario, report, job);
            }
        }
        unreachable!()
    }

    fn tampered(change: impl FnOnce(&mut Outcome)) -> Vec<String> {
        let (scenario, mut report, j) = clean_run();
        change(report.jobs[j].outcome.as_mut().unwrap());
        check(&scenario, &report)
    }

    #[test]
    fn the_oracle_flags_every_kind_of_wrong_outcome() {
        let (scenario, _, j) = clean_run();
        let first = scenario.jobs[j].targets[0].1;
        let cases: Vec<(&str, Vec<String>)> = vec![
            ("not_copied", tampered(|o| o.targets[0].not_copied = RangeSet::from_range(first..first + 1))),
            ("read_err", tampered(|o| o.read_err = true)),
            ("cancelled", tampered(|o| o.cancelled = true)),
            ("write_err", tampered(|o| o.write_err.set(0))),
            (
                "touching",
                tampered(|o| {
                    o.read_failed =
                        serde_json::from_str(r#"{"ranges":[{"start":0,"end":1},{"start":1,"end":2}]}"#).unwrap()
                }),
            ),
        ];
        for (what, violations) in cases {
            assert!(
                violations.iter().any(|v| v.contains(what)),
                "tampering with {what} went unnoticed: {violations:?}"
            );
        }
    }

    #[test]
    fn the_oracle_measures_subjobs_in_flight_from_the_trace() {
        let (mut scenario, report, _) = clean_run();
        // The same trace checked against a lower limit than the run had: sub-jobs that ran
        // side by side are now too many.
        let most = report.io.len();
        assert!(most > 1);
        scenario.config.subjobs_in_flight = 0;
        let violations = check(&scenario, &report);
        assert!(violations.iter().any(|v| v.contains("over subjobs_in_flight 0")), "{violations:?}");
        scenario.config.subjobs_in_flight = 64;
        scenario.config.page_budget = 0;
        let violations = check(&scenario, &report);
        assert!(violations.iter().any(|v| v.contains("over the budget of 0")), "{violations:?}");
    }
}
