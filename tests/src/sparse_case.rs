//! Sparse copies under random shapes, checked from the I/O log and the disks: a source of data
//! runs, allocated zero runs and holes; targets that deallocate, offload write-zeroes or do
//! neither; every `Sparse` setting. The swarm checks a case per seed; a property test draws
//! more.
//!
//! ```text
//!  source  [data][hole ........][zeroes][data][hole ...]     (sparse MemDisk)
//!     │ Watched ──► IoLog ──► reads: exactly the allocated runs (skip_holes) or everything
//!     ▼
//!  engine ──► Watched(target i) ──► writes: data where the source has data; zeroes (as
//!                                    write-zeroes where cheap, in few requests) elsewhere;
//!                                    nothing where the caller said the target is zero
//! ```
//!
//! What must hold, with no fault injected: the job succeeds; every target reads as the
//! source; the source is read exactly where it is allocated (`skip_holes`, the source tells
//! its allocation) or everywhere (otherwise); on every target each sector is written once at
//! most, every sector of source data as data, no data write longer than a sub-job and no
//! write-zeroes longer than a hole sub-job; where
//! zeroes are cheap for every target a hole is never written as data, and the requests stay
//! few (holes go in large pieces, not sub-job by sub-job); the zero blocks a scan must find
//! (from each sub-job's start) are not written as data to a target where zeroes are cheap;
//! with `TargetZeroes::Skip` no hole and no zero block is written at all.

use std::ops::Range;
use std::sync::Arc;

use kcopyd_core::{Client, ClientConfig, Device, Flags, Job, Outcome, Region, SECTOR_SIZE, Sparse, TargetZeroes};
use kcopyd_sim::{FaultPlan, MemDisk, MemDiskOptions, Simulation, mix64, to_tokio};
use serde::{Deserialize, Serialize};

use crate::io_log::{DiskRef, IoKind, IoLog, IoRecord, Watched};
use crate::oracle::HOLE_SUBJOB_SECTORS;
use crate::scenario::{DEADLOCK_AFTER, Draw};
use crate::sectors::Sectors;

/// A run of the source, in sectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Run {
    /// Pattern data.
    Data(u64),
    /// All zeroes, written as data: allocated on a dense source, a hole on a sparse one (a
    /// sparse disk keeps zeroes as zero extents).
    Zeroes(u64),
    /// Not allocated: reads as zeroes.
    Hole(u64),
}

/// What a target is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TargetKind {
    /// A sparse disk: its write-zeroes frees storage (`deallocates`).
    Thin,
    /// A dense disk that offloads write-zeroes.
    Offload,
    /// A dense disk that does neither: zeroes go as data.
    Plain,
}

/// One sparse copy to check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SparseCase {
    /// Logical block size of every disk, bytes.
    pub block_bytes: u32,
    /// The source, run after run, from sector 0.
    pub runs: Vec<Run>,
    /// A dense source, which reports everything allocated (zeroes are found by the scan
    /// alone), instead of a sparse one.
    pub dense_source: bool,
    /// The targets.
    pub targets: Vec<TargetKind>,
    /// The job's sparse settings.
    pub sparse: Sparse,
    /// Page budget, pages.
    pub page_budget: usize,
    /// Sub-job size, bytes.
    pub subjob_bytes: usize,
    /// Sub-jobs in flight.
    pub subjobs_in_flight: usize,
    /// The source cannot tell its allocation (its queries fail): the copy must read it all,
    /// and still leave every target equal to it.
    #[serde(default)]
    pub allocation_unknown: bool,
}

impl SparseCase {
    /// A case drawn from `seed`.
    pub fn from_seed(seed: u64) -> SparseCase {
        let mut rng = Draw(mix64(seed ^ 0x5a_a25e));
        let block_bytes: u32 = if rng.below(3) == 0 { 4096 } else { 512 };
        let block = u64::from(block_bytes) / SECTOR_SIZE as u64;
        let kib = |n: u64| (n * 2).next_multiple_of(block); // KiB in sectors, whole blocks
        let runs = (0..1 + rng.below(8))
            .map(|_| match rng.below(5) {
                0 | 1 => Run::Data(kib(4 + rng.below(512))),
                2 => Run::Zeroes(kib(4 * (1 + rng.below(32)))),
                // Holes of up to 4 MiB: many sub-jobs long, so that splitting them is seen.
                _ => Run::Hole(kib(64 + rng.below(4096))),
            })
            .collect();
        let targets = (0..1 + rng.below(3))
            .map(|_| [TargetKind::Thin, TargetKind::Offload, TargetKind::Plain][rng.below(3) as usize])
            .collect();
        let sparse = Sparse {
            skip_holes: rng.below(4) != 0,
            zero_block_bytes: [0, 512, 4096, 65536][rng.below(4) as usize],
            target_zeroes: [TargetZeroes::Write, TargetZeroes::Deallocate, TargetZeroes::Skip][rng.below(3) as usize],
        };
        let subjob_bytes = [64 << 10, 128 << 10, 256 << 10][rng.below(3) as usize];
        let mut case = SparseCase {
            block_bytes,
            runs,
            dense_source: rng.below(3) == 0,
            targets,
            sparse,
            page_budget: subjob_bytes / 4096 * (1 + rng.below(4) as usize),
            subjob_bytes,
            subjobs_in_flight: 1 + rng.below(8) as usize,
            allocation_unknown: false,
        };
        if rng.below(8) == 0 {
            // A thin volume's worth: a hole of 1.5–3 GiB between two data runs, onto thin
            // targets — longer than one hole sub-job (1 GiB), so its pieces are seen.
            let hole_sectors = ((3 << 30) - rng.below(3 << 29)) / SECTOR_SIZE as u64 / 8 * 8;
            case.block_bytes = 4096;
            case.runs = vec![Run::Data(128), Run::Hole(hole_sectors), Run::Data(128)];
            case.dense_source = false;
            case.targets = vec![TargetKind::Thin; case.targets.len()];
            case.sparse.skip_holes = true;
            if case.sparse.target_zeroes == TargetZeroes::Write {
                case.sparse.target_zeroes = TargetZeroes::Deallocate;
            }
        } else {
            // Drawn last, so that the cases drawn before it kept their shapes.
            case.allocation_unknown = rng.below(6) == 0;
        }
        case
    }

    fn len_sectors(&self) -> u64 {
        self.runs.iter().map(|&run| run_len(run)).sum::<u64>().max(u64::from(self.block_bytes) / SECTOR_SIZE as u64)
    }

    /// Sectors of the source of each kind: (data, zeroes written as data, holes).
    fn layout(&self) -> (Sectors, Sectors, Sectors) {
        let (mut data, mut zeroes, mut holes) = (Vec::new(), Vec::new(), Vec::new());
        let mut at = 0;
        for &run in &self.runs {
            let sectors = at..at + run_len(run);
            match run {
                Run::Data(_) => data.push(sectors),
                Run::Zeroes(_) => zeroes.push(sectors),
                Run::Hole(_) => holes.push(sectors),
            }
            at += run_len(run);
        }
        holes.push(at..self.len_sectors()); // the tail of an empty source
        (Sectors::from_ranges(data), Sectors::from_ranges(zeroes), Sectors::from_ranges(holes))
    }

    /// Runs the copy in virtual time and returns every rule it breaks.
    pub fn check(&self) -> Vec<String> {
        let (data, zeroes, holes) = self.layout();
        let (source, targets) = self.disks(&data, &zeroes);
        let log = IoLog::new();
        let Some(outcome) = self.run_copy(&source, &targets, &log) else {
            return vec![format!("still running after {DEADLOCK_AFTER:?} of virtual time")];
        };
        let mut problems = Vec::new();
        if !outcome.is_ok() {
            problems.push(format!("failed on healthy disks: {outcome:?}"));
        }
        let seen = Seen::of(self, &log, &data, &zeroes, &holes, &mut problems);
        for (i, target) in targets.iter().enumerate() {
            self.check_target(i, target, &source, &seen, &mut problems);
        }
        problems
    }

    /// The source (its data runs of pattern, its zero runs written, its holes left alone) and
    /// the targets (full of stale data, unless they are said to read as zeroes).
    fn disks(&self, data: &Sectors, zeroes: &Sectors) -> (Arc<MemDisk>, Vec<Arc<MemDisk>>) {
        let len = self.len_sectors();
        let disk = |name: String, sparse: bool, write_zeroes: bool, allocation_unknown: bool| {
            Arc::new(MemDisk::new(MemDiskOptions {
                name,
                len_sectors: len,
                logical_block_size: self.block_bytes,
                sparse,
                write_zeroes,
                faults: FaultPlan { allocation_unknown, ..FaultPlan::default() },
                ..MemDiskOptions::default()
            }))
        };
        let source = disk("source".into(), !self.dense_source, false, self.allocation_unknown);
        for range in data.ranges() {
            source.fill_pattern_range(range.clone(), 7, 0);
        }
        for range in zeroes.ranges() {
            source.poke(range.start, &vec![0; ((range.end - range.start) as usize) * SECTOR_SIZE]);
        }
        let skip = self.sparse.target_zeroes == TargetZeroes::Skip;
        let targets = self
            .targets
            .iter()
            .enumerate()
            .map(|(i, kind)| {
                let target = disk(format!("target{i}"), *kind == TargetKind::Thin, *kind == TargetKind::Offload, false);
                if !skip {
                    target.fill_pattern(100 + i as u64); // stale data every zero must replace
                }
                target
            })
            .collect();
        (source, targets)
    }

    /// Runs the copy on a client of the case's configuration, every request logged in `log`:
    /// its outcome, `None` if it did not finish.
    fn run_copy(&self, source: &Arc<MemDisk>, targets: &[Arc<MemDisk>], log: &IoLog) -> Option<Outcome> {
        let len = self.len_sectors();
        let config = ClientConfig {
            page_budget: self.page_budget,
            subjob_size_bytes: self.subjob_bytes,
            subjobs_in_flight: self.subjobs_in_flight,
            ..ClientConfig::default()
        };
        let outcome = Simulation::block_on(async {
            let client = Client::start_in_current_system(config).expect("a valid configuration");
            let watched =
                |disk: &Arc<MemDisk>, which| Arc::new(Watched::new(disk.clone(), which, log.clone())) as Device;
            let regions =
                targets.iter().enumerate().map(|(i, t)| Region::new(watched(t, DiskRef::Target(i)), 0, len)).collect();
            let job = Job::copy(Region::new(watched(source, DiskRef::Source(0)), 0, len), regions, Flags::empty())
                .sparse(self.sparse);
            let handle = client.submit(job).await.expect("a valid job");
            let outcome = tokio::time::timeout(to_tokio(DEADLOCK_AFTER), handle).await;
            if outcome.is_ok() {
                client.shutdown().await;
            }
            outcome
        });
        outcome.ok()
    }

    /// Whether zeroes are cheap on a target of `kind` (`Sparse`'s contract).
    fn cheap(&self, kind: TargetKind) -> bool {
        match self.sparse.target_zeroes {
            TargetZeroes::Skip => true,
            TargetZeroes::Deallocate => kind != TargetKind::Plain,
            TargetZeroes::Write => kind == TargetKind::Offload,
        }
    }

    /// Target `i`'s content and requests against what the source holds and what was seen.
    fn check_target(&self, i: usize, target: &MemDisk, source: &MemDisk, seen: &Seen, problems: &mut Vec<String>) {
        let (data, unallocated, zero_blocks) = (&seen.data, &seen.unallocated, &seen.zero_blocks);
        let skip = self.sparse.target_zeroes == TargetZeroes::Skip;
        let cheap_everywhere = self.targets.iter().all(|&kind| self.cheap(kind));
        let which = DiskRef::Target(i);
        if let Some(range) = seen.first_difference(target, source) {
            problems.push(format!("target{i} ({:?}) does not read as the source in {range:?}", self.targets[i]));
        }
        let writes = seen.requests(which, IoKind::Write);
        let zero_writes = seen.requests(which, IoKind::WriteZeroes);
        let written: u64 = writes.iter().chain(&zero_writes).map(|r| r.end - r.start).sum();
        let touched = Sectors::from_ranges(writes.iter().chain(&zero_writes).cloned());
        if written != touched.len_sectors() {
            problems.push(format!("target{i}: a sector written twice ({written} sectors in requests)"));
        }
        if let Some(long) = writes.iter().find(|r| r.end - r.start > seen.subjob_sectors) {
            problems.push(format!("target{i}: a data write {long:?} longer than a sub-job"));
        }
        if let Some(long) = zero_writes.iter().find(|r| r.end - r.start > HOLE_SUBJOB_SECTORS) {
            problems.push(format!("target{i}: a write-zeroes {long:?} longer than a hole sub-job"));
        }
        let as_data = Sectors::from_ranges(writes.iter().cloned());
        if !data.is_subset(&as_data) {
            problems.push(format!("target{i}: source data not written as data: {:?}", data.difference(&as_data)));
        }
        if self.sparse.skip_holes && cheap_everywhere && !unallocated.intersection(&as_data).is_empty() {
            problems.push(format!(
                "target{i} ({:?}): holes written as data although zeroes are cheap: {:?}",
                self.targets[i],
                unallocated.intersection(&as_data)
            ));
        }
        if self.cheap(self.targets[i]) && !zero_blocks.intersection(&as_data).is_empty() {
            problems.push(format!(
                "target{i} ({:?}): zero blocks written as data although zeroes are cheap: {:?}",
                self.targets[i],
                zero_blocks.intersection(&as_data)
            ));
        }
        // The scan writes zeroes for whole zero blocks only: inside what was read, a
        // write-zeroes covers nothing but blocks the reference found (a scan in smaller
        // blocks than asked would write zeroes for shorter runs).
        let zeroed_in_reads = Sectors::from_ranges(zero_writes.iter().cloned()).intersection(&seen.reads);
        if !zeroed_in_reads.is_subset(zero_blocks) {
            problems.push(format!(
                "target{i}: write-zeroes inside read data that are not whole zero blocks: {:?}",
                zeroed_in_reads.difference(zero_blocks)
            ));
        }
        if skip && !zero_blocks.intersection(&touched).is_empty() {
            problems.push(format!(
                "target{i}: zero blocks written although the target is zero: {:?}",
                zero_blocks.intersection(&touched)
            ));
        }
        if self.sparse.skip_holes && skip && !unallocated.intersection(&touched).is_empty() {
            problems.push(format!(
                "target{i}: holes written although the target is zero: {:?}",
                unallocated.intersection(&touched)
            ));
        }
        let requests = (writes.len() + zero_writes.len()) as u64;
        if self.sparse.is_on() && cheap_everywhere && requests > seen.requests_max {
            problems.push(format!(
                "target{i}: {requests} requests for {} runs and {} sectors read in sub-jobs of {} (at most {})",
                self.runs.len(),
                seen.read_sectors,
                seen.subjob_sectors,
                seen.requests_max
            ));
        }
    }
}

/// What a sparse case's run showed, for the checks of each target: the requests, the
/// source's data and what reads as zeroes, and the zero blocks the scan had to find.
struct Seen {
    records: Vec<IoRecord>,
    data: Sectors,
    not_data: Sectors,
    /// What the source reports unallocated: its holes and zeroes if sparse, nothing if dense
    /// or if it cannot tell.
    unallocated: Sectors,
    zero_blocks: Sectors,
    /// What the source was read in.
    reads: Sectors,
    subjob_sectors: u64,
    read_sectors: u64,
    /// The requests a target may need: sub-jobs that read data, and runs of every kind.
    requests_max: u64,
}

impl Seen {
    /// What the run logged in `log` showed; a source read other than expected is a problem.
    fn of(
        case: &SparseCase,
        log: &IoLog,
        data: &Sectors,
        zeroes: &Sectors,
        holes: &Sectors,
        problems: &mut Vec<String>,
    ) -> Seen {
        let len = case.len_sectors();
        let records = log.records();
        let of = |disk: DiskRef, kind: IoKind| -> Vec<Range<u64>> {
            records.iter().filter(|r| r.disk == disk && r.kind == kind).map(|r| r.sectors.clone()).collect()
        };
        let reads = Sectors::from_ranges(of(DiskRef::Source(0), IoKind::Read));
        let whole = Sectors::from_ranges(std::iter::once(0..len));
        let unallocated =
            if case.dense_source || case.allocation_unknown { Sectors::new() } else { zeroes.union(holes) };
        let allocated = whole.difference(&unallocated);
        let expected_reads = if case.sparse.skip_holes { &allocated } else { &whole };
        if reads != *expected_reads {
            problems.push(format!("source read {:?}, expected {:?}", reads.ranges(), expected_reads.ranges()));
        }
        let subjob_sectors = (case.subjob_bytes / SECTOR_SIZE) as u64;
        let read_sectors = expected_reads.len_sectors();
        let requests_max = 2 * (case.runs.len() as u64 + 2 + read_sectors.div_ceil(subjob_sectors));
        let not_data = whole.difference(data);
        // The zero blocks the scan must find: blocks of the zero-block size (at least the
        // logical block) from the start of each sub-job read, the last one perhaps short,
        // wholly where the source reads as zeroes.
        let block = u64::from(case.block_bytes) / SECTOR_SIZE as u64;
        let zero_block_sectors = (case.sparse.zero_block_bytes != 0)
            .then(|| (u64::from(case.sparse.zero_block_bytes) / SECTOR_SIZE as u64).max(block));
        let zero_blocks = Sectors::from_ranges(zero_block_sectors.into_iter().flat_map(|z| {
            of(DiskRef::Source(0), IoKind::Read)
                .into_iter()
                .flat_map(move |read| (read.start..read.end).step_by(z as usize).map(move |b| b..(b + z).min(read.end)))
                .filter(|b| Sectors::from_ranges(std::iter::once(b.clone())).is_subset(&not_data))
        }));
        let data = data.clone();
        Seen { records, data, not_data, unallocated, zero_blocks, reads, subjob_sectors, read_sectors, requests_max }
    }

    /// The first run where `target` does not read as `source`: data as the source's, zeroes
    /// elsewhere (unallocated on a thin target, which is how a hole of gigabytes is checked
    /// without reading it).
    fn first_difference(&self, target: &MemDisk, source: &MemDisk) -> Option<Range<u64>> {
        let same =
            |r: &Range<u64>| target.snapshot(r.start, r.end - r.start) == source.snapshot(r.start, r.end - r.start);
        let zero = |r: &Range<u64>| {
            target.allocated_sectors(r.clone()) == 0
                || target.snapshot(r.start, r.end - r.start).iter().all(|&byte| byte == 0)
        };
        let data = self.data.ranges().iter().find(|r| !same(r));
        data.or_else(|| self.not_data.ranges().iter().find(|r| !zero(r))).cloned()
    }

    /// The sectors of every request of `kind` to `disk`.
    fn requests(&self, disk: DiskRef, kind: IoKind) -> Vec<Range<u64>> {
        self.records.iter().filter(|r| r.disk == disk && r.kind == kind).map(|r| r.sectors.clone()).collect()
    }
}

fn run_len(run: Run) -> u64 {
    match run {
        Run::Data(n) | Run::Zeroes(n) | Run::Hole(n) => n,
    }
}

/// Checks `cases` sparse copies of one swarm seed; returns every problem, named.
pub fn check_seed(seed: u64, cases: u64) -> Vec<String> {
    (0..cases)
        .flat_map(|n| {
            let case = SparseCase::from_seed(mix64(seed ^ 0x5ba25e) ^ n);
            case.check().into_iter().map(move |problem| {
                format!("sparse case {n}: {problem}; case {}", serde_json::to_string(&case).expect("cases serialize"))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generator_makes_every_kind_of_run_target_and_setting() {
        let cases: Vec<SparseCase> = (0..300).map(SparseCase::from_seed).collect();
        let runs: Vec<Run> = cases.iter().flat_map(|c| c.runs.clone()).collect();
        assert!(runs.iter().any(|r| matches!(r, Run::Data(_))));
        assert!(runs.iter().any(|r| matches!(r, Run::Zeroes(_))));
        assert!(runs.iter().any(|r| matches!(r, Run::Hole(_))));
        for kind in [TargetKind::Thin, TargetKind::Offload, TargetKind::Plain] {
            assert!(cases.iter().any(|c| c.targets.contains(&kind)), "{kind:?}");
        }
        for zeroes in [TargetZeroes::Write, TargetZeroes::Deallocate, TargetZeroes::Skip] {
            assert!(cases.iter().any(|c| c.sparse.target_zeroes == zeroes), "{zeroes:?}");
        }
        assert!(cases.iter().any(|c| !c.sparse.skip_holes && c.sparse.zero_block_bytes > 0));
        assert!(cases.iter().any(|c| c.sparse.skip_holes && c.sparse.zero_block_bytes == 0));
        assert!(cases.iter().any(|c| !c.sparse.is_on()));
        assert!(cases.iter().any(|c| c.allocation_unknown && c.sparse.skip_holes));
    }

    #[test]
    fn sparse_copies_pass() {
        let problems: Vec<String> = (0..40).flat_map(|seed| check_seed(seed, 1)).collect();
        assert!(problems.is_empty(), "{problems:#?}");
    }
}
