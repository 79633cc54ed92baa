//! Random scenarios for the engine on simulated disks, and the oracle that checks them.
//!
//! ```text
//!  Inputs (numbers only: from proptest, so they shrink; or from one seed, as the swarm does)
//!     │ layout(): disjoint source and target regions, disk sizes, fault plans
//!     ▼
//!  SwarmScenario ──run()──► one thread, paused time: disks + client, jobs submitted at virtual
//!     │                     times, an optional crash, then a liveness phase (faults off, resubmit)
//!     ▼
//!  SwarmReport ──check()──► the brief's invariants, each violation named (see `oracle`)
//! ```
//!
//! Every source region and every target region belongs to one job only, so each request and
//! each fault on a disk belongs to exactly one job, and a target sector's content has exactly
//! two legal values: its old content (the target's own pattern) and its new content (the
//! source's pattern, or zeroes). The engine sees the disks through [`Watched`], which logs
//! every request's issue and completion for the oracle.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kcopyd_core::{
    Client, ClientConfig, ClientStats, Device, Flags, Job, Outcome, RangeSet, Region, SECTOR_SIZE, ShutdownReport,
    Sparse, SubmitError, TargetMask, TargetZeroes, Throttle,
};
use kcopyd_sim::{
    FaultOdds, FaultPlan, FaultRecord, IoModel, Latency, MemDisk, MemDiskOptions, Misdirect, Simulation, SlowSpike,
    Stall, Trace, WriteFault, mix64, to_model, to_tokio,
};
use proptest::prelude::*;
use serde::{Deserialize, Serialize};

use crate::io_log::{DiskRef, IoLog, IoRecord, Mark, Watched};
pub use crate::oracle::check;
use crate::sectors::Sectors;

/// How long a run may take in virtual time before it counts as a deadlock.
pub const DEADLOCK_AFTER: Duration = Duration::from_secs(3600);
/// Sectors per zone of a zoned target (in units; see [`Inputs::unit_sectors`]); also the
/// longest job on a zoned target.
const ZONE_UNITS: u64 = 64;
/// The longest job on conventional targets, in bytes.
const JOB_BYTES_MAX: u64 = 8 << 20;

/// The timing of one direction of a disk.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimingInputs {
    /// Cost per request in µs.
    pub cost_us: u64,
    /// Bandwidth in MB/s (0 = unlimited).
    pub bandwidth_mb_per_s: u64,
    /// Queue depth (0 = unlimited).
    pub queue_depth: u32,
    /// Jitter in µs.
    pub jitter_us: u64,
}

/// Faults of one disk, in units of the scenario (offsets wrap around the disk).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultInputs {
    /// Latent sector errors: (offset, length) in units.
    pub latent: Vec<(u64, u64)>,
    /// Write faults: (offset, length, attempts; 0 = persistent).
    pub write_faults: Vec<(u64, u64, u32)>,
    /// The device fails from this request on.
    pub fail_after_ios: Option<u64>,
    /// Slow spikes: (request index, extra µs).
    pub slow: Vec<(u64, u64)>,
    /// Misdirected writes: (write index, shift in units).
    pub misdirects: Vec<(u64, i64)>,
    /// One block per underlying call.
    pub short_io: bool,
    /// Odds per request in ppm: read error, write error, misdirect, slow.
    pub odds: (u32, u32, u32, u32),
    /// Stalls: (request index, µs the device holds it; `None` for ever).
    #[serde(default)]
    pub stalls: Vec<(u64, Option<u64>)>,
    /// Every allocation query fails (sources): a sparse copy reads everything.
    #[serde(default)]
    pub allocation_unknown: bool,
}

/// One disk.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInputs {
    /// 4096-byte logical blocks (only when the scenario uses 8-sector units).
    pub block_4k: bool,
    /// Write-zeroes offload.
    pub write_zeroes: bool,
    /// Zoned (targets only).
    pub zoned: bool,
    /// Read timing.
    pub read: TimingInputs,
    /// Write timing.
    pub write: TimingInputs,
    /// Faults.
    pub faults: FaultInputs,
}

/// A callback prepared with `Client::prepare_callback` (dm-kcopyd's prepare/do callback): a
/// completion the caller raises itself, queued with the jobs'.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreparedInputs {
    /// Virtual time of the preparation, µs after the start.
    pub at_us: u64,
    /// Queued this many µs later.
    pub after_us: u64,
    /// Queued with `complete(read_err, write_err)`; otherwise dropped (then it runs cancelled).
    pub complete: bool,
    /// The `read_err` it is completed with.
    pub read_err: bool,
    /// The `write_err` it is completed with: targets 0–7.
    pub write_err_bits: u8,
    /// Queued from inside the completion callback of this job (modulo the number of jobs)
    /// instead of `after_us` after its preparation — if it was prepared by then (otherwise at
    /// `after_us` as usual).
    #[serde(default)]
    pub in_callback_of: Option<usize>,
}

impl PreparedInputs {
    fn from_bits(bits: u64) -> PreparedInputs {
        PreparedInputs {
            at_us: bits % 8000,
            after_us: (bits >> 16) % 3000,
            complete: (bits >> 32) % 4 != 0,
            read_err: (bits >> 40) & 1 == 1,
            write_err_bits: (bits >> 48) as u8,
            in_callback_of: ((bits >> 56) % 3 == 0).then_some((bits >> 58) as usize),
        }
    }

    /// The write_err it is completed with.
    pub fn write_err(&self) -> TargetMask {
        let mut mask = TargetMask::new();
        (0..8).filter(|i| self.write_err_bits >> i & 1 == 1).for_each(|i| mask.set(i));
        mask
    }
}

/// One job.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobInputs {
    /// Zero instead of copy.
    pub zero: bool,
    /// Source disk (modulo the number of sources).
    pub source: usize,
    /// Target disks (modulo the number of targets; duplicates dropped).
    pub targets: Vec<usize>,
    /// Length in units (0: a zero-length job).
    pub len_units: u64,
    /// Gap before each of its regions, in units.
    pub gap_units: u64,
    /// IGNORE_ERROR.
    pub ignore_error: bool,
    /// WRITE_SEQ.
    pub write_seq: bool,
    /// Virtual time of submission, µs after the start.
    pub submit_at_us: u64,
    /// Cancel the job this many µs after its submission.
    #[serde(default)]
    pub cancel_after_us: Option<u64>,
    /// A sparse copy (`Job::sparse`; a zero job ignores it).
    #[serde(default)]
    pub sparse: Sparse,
    /// Holes of its source region: (offset, length) in units from the region's start, clipped
    /// to the region; copies only. A source with a hole is a sparse disk.
    #[serde(default)]
    pub holes: Vec<(u64, u64)>,
    /// Allocated runs of zeroes in its source region: (offset, length) in sectors from the
    /// region's start, clipped to it; copies only. The source reports them allocated (a thin
    /// volume's mapped blocks that hold zeroes), also where they lie in a hole.
    #[serde(default)]
    pub zero_runs: Vec<(u64, u64)>,
}

/// Everything a scenario is made of: plain numbers, so that proptest can shrink them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inputs {
    /// Seed of the disks' own draws (jitter, odds, tearing).
    pub seed: u64,
    /// Page budget, at least 1.
    pub page_budget: usize,
    /// Sub-job size in units.
    pub subjob_units: u64,
    /// Sub-jobs in flight per job.
    pub subjobs_in_flight: usize,
    /// Units of 8 sectors (and some 4096-byte disks) instead of 1.
    pub big_units: bool,
    /// Source disks.
    pub sources: Vec<DiskInputs>,
    /// Target disks.
    pub targets: Vec<DiskInputs>,
    /// Jobs.
    pub jobs: Vec<JobInputs>,
    /// Crash every disk at this virtual time (µs), then run a liveness phase.
    pub crash_at_us: Option<u64>,
    /// Sparse, headers-only disks (`MemDiskOptions::headers_only`) instead of dense,
    /// whole-sector ones: the oracle's provenance checks must hold the same in both.
    #[serde(default)]
    pub headers_only: bool,
    /// Shut the client down at this virtual time (µs), with jobs perhaps still queued, running
    /// or not yet submitted. Not with a crash (its liveness phase resubmits jobs).
    #[serde(default)]
    pub shutdown_at_us: Option<u64>,
    /// Prepared callbacks.
    #[serde(default)]
    pub prepared: Vec<PreparedInputs>,
    /// The client's throttle (a rate or a busy share, now and then).
    #[serde(default)]
    pub throttle: Throttle,
    /// The client's queued-jobs limit (0: 1024); a small one makes submissions wait for
    /// admission.
    #[serde(default)]
    pub queued_jobs_max: usize,
    /// Shut the client down from inside this job's completion callback (as an embedder that
    /// stops once its last job is done), instead of at `shutdown_at_us`. Not with a crash.
    #[serde(default)]
    pub shutdown_in_callback_of: Option<usize>,
    /// The client's per-request timeout, ms of model time.
    #[serde(default)]
    pub io_timeout_ms: Option<u64>,
    /// Start the client without a throttle and give it `throttle` with
    /// `Client::set_throttle` before the first job: a throttle set on a running client must
    /// hold as one configured does.
    #[serde(default)]
    pub throttle_set_after_start: bool,
}

impl Inputs {
    /// Sectors per unit of offsets and lengths.
    pub fn unit_sectors(&self) -> u64 {
        if self.big_units { 8 } else { 1 }
    }

    /// Every option and every fault probability drawn from `seed` (as VOPR does): some
    /// scenarios are calm, some are stormy; most are small, some are wide (64 or more targets
    /// per job), big (jobs and sub-jobs of MiBs) or long (up to 120 jobs).
    pub fn from_seed(seed: u64) -> Inputs {
        let mut rng = Draw(mix64(seed));
        let big_units = rng.below(2) == 0;
        let storm = rng.below(4); // 0 calm .. 3 stormy
        let crash = rng.below(5) == 0;
        let shape = match rng.below(10) {
            0 => Shape::Wide,
            1 => Shape::Big,
            2 => Shape::Long,
            _ => Shape::Small,
        };
        let unit_bytes = if big_units { 8 * SECTOR_SIZE as u64 } else { SECTOR_SIZE as u64 };
        let disk = |rng: &mut Draw, target: bool| rng.disk(big_units, storm, crash, target);
        let sources = (0..1 + rng.below(3)).map(|_| disk(&mut rng, false)).collect();
        let target_disks = match shape {
            Shape::Wide => 64 + rng.below(33),
            _ => 1 + rng.below(8),
        };
        let targets = (0..target_disks).map(|_| disk(&mut rng, true)).collect();
        let job_count = match shape {
            Shape::Long => 40 + rng.below(81),
            _ => 1 + rng.below(10),
        };
        let jobs = (0..job_count).map(|_| rng.job(shape, target_disks, unit_bytes)).collect();
        let (page_budget, subjob_units) = match shape {
            Shape::Big => (
                [16, 256, 1024, 2048][rng.below(4) as usize],
                [128 << 10, 512 << 10, 1 << 20, 4 << 20][rng.below(4) as usize] / unit_bytes,
            ),
            _ => ([1, 2, 3, 8, 16, 64, 256][rng.below(7) as usize], [1, 2, 3, 8, 16, 64][rng.below(6) as usize]),
        };
        Inputs {
            seed,
            page_budget,
            subjob_units,
            subjobs_in_flight: [1, 1 + rng.below(8), 1 + rng.below(32)][rng.below(3) as usize] as usize,
            big_units,
            sources,
            targets,
            jobs,
            crash_at_us: crash.then(|| rng.below(20_000)),
            // Drawn last, so that every earlier draw of a seed stays what it was.
            headers_only: rng.below(3) == 0,
            shutdown_at_us: (rng.below(5) == 0).then(|| rng.below(4) * rng.below(5000)),
            prepared: (0..[0, 0, 1, 2, 3][rng.below(5) as usize])
                .map(|_| PreparedInputs::from_bits(rng.below(u64::MAX)))
                .collect(),
            throttle: match rng.below(8) {
                0 => Throttle { rate_bytes_per_s: Some((1 + rng.below(64)) << 20), ..Throttle::OFF },
                1 => Throttle { busy_percent: Some(10 + rng.below(81) as u32), ..Throttle::OFF },
                _ => Throttle::OFF,
            },
            queued_jobs_max: [0, 0, 0, 1, 2, 4][rng.below(6) as usize],
            shutdown_in_callback_of: None,
            io_timeout_ms: None,
            throttle_set_after_start: false,
        }
        .busy_for_long(seed)
        .stalls_and_timeouts(seed)
        .sparse_jobs(seed)
        .zero_runs(seed)
        .throttle_turns(seed)
    }

    /// For one throttled scenario in two, the throttle given after the start; and for one
    /// rate-limited scenario of two jobs or more in two, a queue at the throttle: the second
    /// job submitted with the first and cancelled while its sub-jobs wait their turns behind
    /// the first's, so that the turn must skip the places they gave up (a turn that lands on
    /// one leaves every later sub-job waiting for ever). From a generator of its own, so that
    /// every earlier draw of a seed stays what it was.
    fn throttle_turns(mut self, seed: u64) -> Inputs {
        if self.throttle == Throttle::OFF {
            return self;
        }
        let mut rng = Draw(mix64(seed ^ 0x7e_70ca));
        self.throttle_set_after_start = rng.below(2) == 0;
        if self.throttle.rate_bytes_per_s.is_some() && self.jobs.len() >= 2 && rng.below(2) == 0 {
            // Sub-jobs of one unit, a page each, a thousand a second, and pages enough for
            // both jobs' sub-jobs to wait at the throttle; a first job of more sub-jobs than
            // go at once, so that its later ones ask for turns after the second job's places
            // were given up (the cancel comes while they wait, within a few turns).
            self.subjob_units = 1;
            self.subjobs_in_flight = 1 + rng.below(3) as usize;
            self.page_budget = self.page_budget.max(16);
            self.throttle.rate_bytes_per_s = Some(1000 * self.unit_sectors() * SECTOR_SIZE as u64);
            self.jobs[0].len_units = self.jobs[0].len_units.max(8 + rng.below(8));
            self.jobs[1].submit_at_us = self.jobs[0].submit_at_us;
            self.jobs[1].cancel_after_us = Some(1 + rng.below(4000));
        }
        self
    }

    /// Allocated runs of zeroes in the sources of sparse copies (three in four), of every
    /// length — a sector, less than a page, whole pages, a page and a sector, a sub-job, up to
    /// the job — placed at any sector, on a page, at a sub-job's start, or against one of the
    /// job's holes (before, after, or over it): where the zero-block scan must find exactly
    /// the blocks that are zero, across the pages of a sub-job's buffer, and where the
    /// allocation is no longer whole blocks. Drawn from a generator of their own, so that
    /// every other draw of a seed stays what it was.
    fn zero_runs(mut self, seed: u64) -> Inputs {
        let mut rng = Draw(mix64(seed ^ 0x2e50_5e70));
        // A sub-job's buffer is one run of pages only while pages come back in the order they
        // were taken; sub-jobs of different lengths (cut by holes and zero runs) in flight
        // together fragment the pool, and a buffer becomes several runs, which the zero-block
        // scan must walk across. In one sparse scenario in two: several sub-jobs in flight,
        // and a budget for them.
        if self.jobs.iter().any(|job| job.sparse.is_on()) && rng.below(2) == 0 {
            self.subjobs_in_flight = self.subjobs_in_flight.max(4 + rng.below(13) as usize);
            let pages = (self.subjob_units * self.unit_sectors()).div_ceil(8) as usize;
            self.page_budget = self.page_budget.max(pages * (2 + rng.below(7) as usize));
        }
        let unit = self.unit_sectors();
        let subjob_sectors = self.subjob_units.max(1) * unit;
        for job in self.jobs.iter_mut().filter(|job| !job.zero && job.sparse.is_on()) {
            let len = job.len_units * unit;
            if len == 0 || rng.below(4) == 0 {
                continue;
            }
            let holes: Vec<(u64, u64)> = job.holes.iter().map(|&(o, n)| (o * unit, n * unit)).collect();
            job.zero_runs = (0..1 + rng.below(4)).map(|_| rng.zero_run(len, subjob_sectors, &holes)).collect();
        }
        self
    }

    /// Sparse copies, in one scenario in three: copy jobs made sparse (`Job::sparse`) with
    /// holes in their source regions, under every flag, fault, cancel, crash and target the
    /// scenario has. Never `TargetZeroes::Skip`: every target holds old data, which a skipped
    /// hole would leave behind (Skip is only right for targets known to read as zeroes). Drawn
    /// from a generator of its own, so that every other draw of a seed stays what it was.
    fn sparse_jobs(mut self, seed: u64) -> Inputs {
        let mut rng = Draw(mix64(seed ^ 0x5ba2_5e0b));
        if rng.below(3) != 0 {
            return self;
        }
        for job in self.jobs.iter_mut().filter(|job| !job.zero) {
            if rng.below(4) == 0 {
                continue;
            }
            job.sparse = Sparse {
                skip_holes: rng.below(4) != 0,
                zero_block_bytes: [0, 512, 4096, 65536][rng.below(4) as usize],
                target_zeroes: [TargetZeroes::Write, TargetZeroes::Deallocate][rng.below(2) as usize],
            };
            let len = job.len_units.max(1);
            job.holes = (0..rng.below(5)).map(|_| (rng.below(len), 1 + rng.below(len.div_ceil(2)))).collect();
        }
        self
    }

    /// Stalling requests and per-request timeouts, in three scenarios in five: a timeout of 3–29
    /// ms with requests held for a while (shorter or longer than it) or for ever; requests held
    /// for a while without a timeout; or a timeout alone (slow requests may outlive it). No
    /// timeout with a crash (its resubmissions must succeed on healed disks, slow or not). A
    /// request held for ever keeps its buffer's pages for ever: it is drawn only where the
    /// page budget leaves every other sub-job its pages, so that the copy can go on.
    fn stalls_and_timeouts(mut self, seed: u64) -> Inputs {
        let mut rng = Draw(mix64(seed ^ 0x57a11));
        let (timeout, stalls) = match rng.below(5) {
            0 => (true, true),
            1 => (false, true),
            2 => (true, false),
            _ => return self,
        };
        // After a crash, jobs are resubmitted on healed disks and must succeed: no timeout.
        let timeout = timeout && self.crash_at_us.is_none();
        if timeout {
            self.io_timeout_ms = Some([3, 7, 13, 29][rng.below(4) as usize]);
        }
        if !stalls {
            return self;
        }
        let unit_bytes = self.unit_sectors() * SECTOR_SIZE as u64;
        let subjob_pages = (self.subjob_units.max(1) * unit_bytes).div_ceil(kcopyd_core::PAGE_SIZE as u64).max(1);
        let mut for_ever_left = (self.page_budget as u64 / subjob_pages).saturating_sub(1);
        let disks = self.sources.len() + self.targets.len();
        for d in 0..disks {
            if rng.below(2) == 0 {
                continue;
            }
            let disk =
                if d < self.sources.len() { &mut self.sources[d] } else { &mut self.targets[d - self.sources.len()] };
            for _ in 0..1 + rng.below(2) {
                // Odd microseconds: never a whole number of milliseconds, as the timeout is.
                let mut hold = Some([300, 2_000, 10_000, 60_000][rng.below(4) as usize] + 2 * rng.below(500) + 1);
                if timeout && for_ever_left > 0 && rng.below(3) == 0 {
                    for_ever_left -= 1;
                    hold = None;
                }
                disk.faults.stalls.push((rng.below(60), hold));
            }
        }
        self
    }

    /// A scenario under a busy limit made long enough for the limit to matter over several of
    /// its windows (`BUSY_WINDOW`): disks whose every request costs 2–10 ms (no bandwidth
    /// limit, no queue: a sub-job's life stays short beside a window) and at least 30 jobs,
    /// some submitted over the first 3 s (idle stretches, then work). Other scenarios are
    /// returned as they are.
    fn busy_for_long(mut self, seed: u64) -> Inputs {
        if self.throttle.busy_percent.is_none() {
            return self;
        }
        let mut rng = Draw(mix64(seed ^ 0xb05e));
        let slow = |rng: &mut Draw| TimingInputs {
            cost_us: [2000, 5000, 10_000][rng.below(3) as usize],
            bandwidth_mb_per_s: 0,
            queue_depth: 0,
            jitter_us: rng.below(2) * 1000,
        };
        for disk in self.sources.iter_mut().chain(&mut self.targets) {
            (disk.read, disk.write) = (slow(&mut rng), slow(&mut rng));
        }
        let drawn = self.jobs.len() as u64;
        while self.jobs.len() < 30 {
            let mut job = self.jobs[rng.below(drawn) as usize].clone();
            job.submit_at_us = rng.below(2) * rng.below(3_000_000);
            self.jobs.push(job);
        }
        self
    }

    /// The scenario of `seed` as [`Inputs::from_seed`] draws it, and for two seeds in three
    /// *aimed*: a probe run of it finds the instants where something happens (a request issued
    /// or completed, a job submitted or completed), and a cancel or a shutdown is moved to
    /// exactly one of them. Races live where two things meet — a cancel at the moment a
    /// sub-job is admitted, a shutdown at the moment a submission is admitted — and times
    /// drawn at random almost never meet anything. The run is deterministic, so the aimed run
    /// is the probe run up to that instant.
    pub fn aimed(seed: u64) -> Inputs {
        let mut inputs = Inputs::from_seed(seed);
        let mut rng = Draw(mix64(seed ^ 0xa1_3ed));
        let aim = rng.below(3);
        if aim == 0 || inputs.jobs.is_empty() {
            return inputs;
        }
        let scenario = inputs.layout();
        let probe = run(&scenario);
        if probe.deadlocked {
            return inputs;
        }
        if aim == 1 || inputs.crash_at_us.is_some() {
            // A cancel of a job at one of its own requests' issue or completion.
            let instants: Vec<(usize, u64)> = probe
                .io
                .iter()
                .filter(|r| r.phase == 1)
                .filter_map(|r| scenario.job_of_request(r).map(|j| (j, r)))
                .flat_map(|(j, r)| [(j, r.issued_us), (j, r.done_us)])
                .filter(|&(j, at)| at != u64::MAX && at >= scenario.jobs[j].submit_at_us)
                .collect();
            if let Some(&(j, at)) = instants.get(rng.below(instants.len() as u64) as usize) {
                inputs.jobs[j].cancel_after_us = Some(at - scenario.jobs[j].submit_at_us);
            }
        } else {
            // A shutdown at a job's completion (it frees an admission), submission or request.
            let marks = probe.marks.iter().zip(&probe.mark_us);
            let instants: Vec<u64> = match rng.below(4) {
                0 | 1 => marks.filter(|((_, m), _)| matches!(m, Mark::Completed(_))).map(|(_, &at)| at).collect(),
                2 => marks.filter(|((_, m), _)| matches!(m, Mark::Submitting(_))).map(|(_, &at)| at).collect(),
                _ => probe.io.iter().map(|r| r.done_us).filter(|&at| at != u64::MAX).collect(),
            };
            if let Some(&at) = instants.get(rng.below(instants.len() as u64) as usize) {
                inputs.shutdown_at_us = Some(at);
            }
            // Or from inside the callback of a job: right after it frees its admission.
            let completed: Vec<usize> = probe
                .marks
                .iter()
                .filter_map(|(_, m)| if let Mark::Completed(j) = m { Some(*j) } else { None })
                .collect();
            if rng.below(2) == 0 && !completed.is_empty() {
                inputs.shutdown_at_us = None;
                inputs.shutdown_in_callback_of = Some(completed[rng.below(completed.len() as u64) as usize]);
            }
        }
        inputs
    }

    /// Places `job` after the regions placed before it (`source_cursor` and `target_cursor`:
    /// where each disk's next region may start, in sectors): its regions, flags, holes and
    /// zero runs in sectors.
    fn place(&self, job: &JobInputs, source_cursor: &mut [u64], target_cursor: &mut [u64]) -> JobLayout {
        let unit = self.unit_sectors();
        let source = job.source % self.sources.len();
        let mut targets: Vec<usize> = Vec::new();
        for &t in &job.targets {
            let t = t % self.targets.len();
            if !targets.contains(&t) {
                targets.push(t);
            }
        }
        let len_units_max = if targets.iter().any(|&t| self.targets[t].zoned) {
            ZONE_UNITS
        } else {
            JOB_BYTES_MAX / SECTOR_SIZE as u64 / unit
        };
        let len = job.len_units.min(len_units_max) * unit;
        let source_start = source_cursor[source] + job.gap_units * unit;
        if !job.zero {
            source_cursor[source] = source_start + len;
        }
        let regions = targets
            .iter()
            .map(|&t| {
                let mut start = target_cursor[t] + job.gap_units * unit;
                if self.targets[t].zoned {
                    start = start.div_ceil(ZONE_UNITS * unit) * ZONE_UNITS * unit;
                }
                target_cursor[t] = start + len;
                (t, start)
            })
            .collect();
        let (holes, zero_runs) = if job.zero {
            (Vec::new(), Vec::new())
        } else {
            let clipped = job.holes.iter().map(|&(o, n)| o.min(len / unit) * unit..(o + n).min(len / unit) * unit);
            let zero_runs =
                Sectors::from_ranges(job.zero_runs.iter().map(|&(o, n)| o.min(len)..o.saturating_add(n).min(len)));
            // A zero run over a hole is allocated there: the hole is what is left around it.
            let holes = Sectors::from_ranges(clipped).difference(&zero_runs);
            (holes.ranges().to_vec(), zero_runs.ranges().to_vec())
        };
        let mut flags = Flags::empty();
        if job.ignore_error {
            flags |= Flags::IGNORE_ERROR;
        }
        if job.write_seq {
            flags |= Flags::WRITE_SEQ;
        }
        JobLayout {
            zero: job.zero,
            source: (!job.zero).then_some((source, source_start)),
            targets: regions,
            len_sectors: len,
            flags,
            submit_at_us: job.submit_at_us,
            cancel_at_us: job.cancel_after_us.map(|after| job.submit_at_us + after),
            sparse: if job.zero { Sparse::OFF } else { job.sparse },
            holes,
            zero_runs,
        }
    }

    /// The options of a disk of the scenario (`inputs`, its regions ending at `cursor`): its
    /// length with some slack (whole zones if zoned), block size, timing and faults, which
    /// wrap around the disk.
    fn disk_options(&self, inputs: &DiskInputs, cursor: u64, name: String, index: u64) -> MemDiskOptions {
        let unit = self.unit_sectors();
        let slack = 4 * unit;
        let zone = ZONE_UNITS * unit;
        let block: u32 = if inputs.block_4k && self.big_units { 4096 } else { 512 };
        let mut len = cursor + slack;
        if inputs.zoned {
            len = len.div_ceil(zone) * zone;
        }
        let wrap = |offset: u64, count: u64| {
            let start = offset * unit % len;
            start..(start + count.max(1) * unit).min(len)
        };
        let faults = &inputs.faults;
        MemDiskOptions {
            name,
            seed: mix64(self.seed ^ index),
            len_sectors: len,
            logical_block_size: block,
            sparse: self.headers_only,
            headers_only: self.headers_only,
            write_zeroes: inputs.write_zeroes,
            zoned: inputs.zoned,
            zone_sectors: if inputs.zoned { zone } else { 0 },
            latency: Latency {
                read: inputs.read.model(),
                write: inputs.write.model(),
                seed: mix64(self.seed ^ index ^ 7),
                ..Latency::default()
            },
            faults: FaultPlan {
                latent_sectors: faults.latent.iter().map(|&(o, n)| wrap(o, n)).collect(),
                write_faults: faults
                    .write_faults
                    .iter()
                    .map(|&(o, n, attempts)| WriteFault { sectors: wrap(o, n), attempts })
                    .collect(),
                fail_after_ios: faults.fail_after_ios,
                fail_at_us: None,
                slow_spikes: faults.slow.iter().map(|&(io_index, extra_us)| SlowSpike { io_index, extra_us }).collect(),
                misdirects: faults
                    .misdirects
                    .iter()
                    .map(|&(write_index, shift)| Misdirect { write_index, shift_sectors: shift * unit as i64 })
                    .collect(),
                short_io: faults.short_io,
                allocation_unknown: faults.allocation_unknown,
                stalls: faults.stalls.iter().map(|&(io_index, hold_us)| Stall { io_index, hold_us }).collect(),
                volatile_cache: self.crash_at_us.is_some(),
                odds: FaultOdds {
                    read_error_ppm: faults.odds.0,
                    write_error_ppm: faults.odds.1,
                    misdirect_ppm: faults.odds.2,
                    slow_ppm: faults.odds.3,
                    slow_us: 5000,
                    ..FaultOdds::default()
                },
            },
        }
    }

    /// The concrete scenario: disk options, regions and flags.
    pub fn layout(&self) -> SwarmScenario {
        let unit = self.unit_sectors();
        let mut source_cursor = vec![0u64; self.sources.len()];
        let mut target_cursor = vec![0u64; self.targets.len()];
        let jobs: Vec<JobLayout> =
            self.jobs.iter().map(|job| self.place(job, &mut source_cursor, &mut target_cursor)).collect();
        let holed: Vec<bool> = (0..self.sources.len())
            .map(|s| jobs.iter().any(|job| job.source.is_some_and(|(source, _)| source == s) && !job.holes.is_empty()))
            .collect();
        let disk_options =
            |inputs: &DiskInputs, cursor: u64, name: String, index: u64| self.disk_options(inputs, cursor, name, index);
        SwarmScenario {
            config: ClientConfig {
                page_budget: self.page_budget.max(1),
                subjob_size_bytes: (self.subjob_units.max(1) * unit) as usize * SECTOR_SIZE,
                subjobs_in_flight: self.subjobs_in_flight.clamp(1, 64),
                queued_jobs_max: if self.queued_jobs_max == 0 { 1024 } else { self.queued_jobs_max },
                huge_pages: true,
                throttle: self.throttle,
                io_timeout_ms: self.io_timeout_ms,
            },
            sources: self
                .sources
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    // A source with holes is sparse: it reports them unallocated.
                    let options = disk_options(d, source_cursor[i], format!("source{i}"), i as u64);
                    MemDiskOptions { sparse: options.sparse || holed[i], ..options }
                })
                .collect(),
            targets: self
                .targets
                .iter()
                .enumerate()
                .map(|(i, d)| disk_options(d, target_cursor[i], format!("target{i}"), 100 + i as u64))
                .collect(),
            jobs,
            crash_at_us: self.crash_at_us,
            shutdown_at_us: self.shutdown_at_us.filter(|_| self.crash_at_us.is_none()),
            shutdown_in_callback_of: self.shutdown_in_callback_of.filter(|_| self.crash_at_us.is_none()),
            prepared: self.prepared.clone(),
            throttle_set_after_start: self.throttle_set_after_start,
        }
    }
}

impl TimingInputs {
    fn model(&self) -> IoModel {
        IoModel {
            cost_us: self.cost_us,
            bandwidth_bytes_per_s: self.bandwidth_mb_per_s * 1_000_000,
            queue_depth: self.queue_depth,
            jitter_us: self.jitter_us,
        }
    }
}

/// The shape of a scenario drawn by [`Inputs::from_seed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// Up to 10 jobs of up to 64 units, 1–8 targets each.
    Small,
    /// 64–96 target disks; jobs with up to 96 targets.
    Wide,
    /// Jobs of up to 8 MiB, sub-jobs of 128 KiB to 4 MiB, budgets up to 8 MiB.
    Big,
    /// 40–120 small jobs.
    Long,
}

/// A small seeded generator: for [`Inputs::from_seed`], and for the validation and sparse
/// cases.
pub(crate) struct Draw(pub(crate) u64);

impl Draw {
    /// A number below `n` (0 when `n` is 0).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.0 = mix64(self.0);
        self.0 % n.max(1)
    }

    /// One allocated run of zeroes in a source region of `len` sectors (sub-jobs of `subjob_sectors`
    /// sectors, `holes` as (offset, length) in sectors): (offset, length) in sectors.
    fn zero_run(&mut self, len: u64, subjob_sectors: u64, holes: &[(u64, u64)]) -> (u64, u64) {
        const PAGE: u64 = 8;
        let length = match self.below(6) {
            0 => 1,
            1 => 2 + self.below(PAGE - 2),
            2 => PAGE * (1 + self.below(4)),
            3 => PAGE * (1 + self.below(4)) + [1, PAGE - 1][self.below(2) as usize],
            4 => subjob_sectors + [0, 1, PAGE][self.below(3) as usize],
            _ => 1 + self.below(len),
        };
        let hole = (!holes.is_empty()).then(|| holes[self.below(holes.len() as u64) as usize]);
        let offset = match (self.below(5), hole) {
            (0, _) | (_, None) => self.below(len),
            (1, _) => self.below(len) / PAGE * PAGE + [0, 1][self.below(2) as usize],
            (2, _) => self.below(len.div_ceil(subjob_sectors)) * subjob_sectors,
            // Against a hole: ending where it begins, beginning where it ends, or over part of it.
            (3, Some((start, n))) => [start.saturating_sub(length), start + n][self.below(2) as usize],
            (_, Some((start, n))) => start + self.below(n),
        };
        (offset, length)
    }

    /// A disk of [`Inputs::from_seed`]: 4 KiB blocks in one case in two with big units, write-zeroes
    /// offload in one in two, zoned in one target in six (never with a crash), its timing
    /// and its faults.
    fn disk(&mut self, big_units: bool, storm: u64, crash: bool, target: bool) -> DiskInputs {
        DiskInputs {
            block_4k: big_units && self.below(2) == 0,
            write_zeroes: self.below(2) == 0,
            zoned: target && !crash && self.below(6) == 0,
            read: self.timing(),
            write: self.timing(),
            faults: self.faults(storm, target),
        }
    }

    /// A job of [`Inputs::from_seed`] for a scenario of `shape` with `target_disks` targets.
    fn job(&mut self, shape: Shape, target_disks: u64, unit_bytes: u64) -> JobInputs {
        JobInputs {
            zero: self.below(5) == 0,
            source: self.below(3) as usize,
            targets: match shape {
                Shape::Wide => (0..1 + self.below(96)).map(|_| self.below(target_disks) as usize).collect(),
                _ => (0..1 + self.below(8)).map(|_| self.below(8) as usize).collect(),
            },
            len_units: match (self.below(20), shape) {
                (0, _) => 0,
                (_, Shape::Big) => 1 + self.below(JOB_BYTES_MAX / unit_bytes),
                _ => 1 + self.below(64),
            },
            gap_units: self.below(8),
            ignore_error: self.below(2) == 0,
            write_seq: self.below(4) == 0,
            submit_at_us: self.below(4) * self.below(5000),
            cancel_after_us: (self.below(6) == 0).then(|| self.below(3) * self.below(3000)),
            sparse: Sparse::OFF,
            holes: Vec::new(),
            zero_runs: Vec::new(),
        }
    }

    fn timing(&mut self) -> TimingInputs {
        TimingInputs {
            cost_us: [0, 10, 100, 1000][self.below(4) as usize],
            bandwidth_mb_per_s: [0, 50, 500, 3000][self.below(4) as usize],
            queue_depth: [0, 1, 4, 32][self.below(4) as usize],
            jitter_us: [0, 0, 50, 2000][self.below(4) as usize],
        }
    }

    fn faults(&mut self, storm: u64, target: bool) -> FaultInputs {
        let many = |d: &mut Draw| if storm == 0 { 0 } else { d.below(storm + 1) };
        let latent = (0..many(self)).map(|_| (self.below(1000), 1 + self.below(3))).collect();
        let write_faults = if target {
            (0..many(self)).map(|_| (self.below(1000), 1 + self.below(3), self.below(3) as u32)).collect()
        } else {
            vec![]
        };
        let misdirects = if target && storm >= 2 {
            (0..self.below(2)).map(|_| (self.below(40), self.below(9) as i64 - 4)).collect()
        } else {
            vec![]
        };
        let ppm = |d: &mut Draw, scale: u64| if storm == 0 { 0 } else { (d.below(storm + 1) * scale) as u32 };
        FaultInputs {
            latent,
            write_faults,
            fail_after_ios: (storm == 3 && self.below(4) == 0).then(|| self.below(200)),
            slow: (0..self.below(3)).map(|_| (self.below(100), self.below(20_000))).collect(),
            misdirects,
            short_io: self.below(6) == 0,
            odds: (
                ppm(self, 3000),
                if target { ppm(self, 3000) } else { 0 },
                if target { ppm(self, 1000) } else { 0 },
                ppm(self, 20_000),
            ),
            stalls: Vec::new(),
            // A source in six cannot tell its allocation. Hashed from the draw's state, not
            // drawn from it, so that the draws after it (and every seed kept for a regression)
            // stay what they were.
            allocation_unknown: !target && mix64(self.0 ^ 0x000a_110c) % 6 == 0,
        }
    }
}

/// A job placed on the disks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobLayout {
    /// A zero job.
    pub zero: bool,
    /// Source disk and start sector (copies).
    pub source: Option<(usize, u64)>,
    /// Target disks and start sectors.
    pub targets: Vec<(usize, u64)>,
    /// Length in sectors.
    pub len_sectors: u64,
    /// Flags as submitted.
    pub flags: Flags,
    /// Virtual submission time, µs.
    pub submit_at_us: u64,
    /// Virtual time at which the job is asked to cancel, µs.
    #[serde(default)]
    pub cancel_at_us: Option<u64>,
    /// How the copy treats zeroes (`Sparse::OFF` for a zero job).
    #[serde(default)]
    pub sparse: Sparse,
    /// Holes punched in its source region (job-relative sectors, sorted, disjoint): they read
    /// as zeroes and the (sparse) source reports them unallocated.
    #[serde(default)]
    pub holes: Vec<std::ops::Range<u64>>,
    /// Allocated runs of zeroes in its source region (job-relative sectors, sorted, disjoint,
    /// apart from the holes): they read as zeroes, and the source reports them allocated.
    #[serde(default)]
    pub zero_runs: Vec<std::ops::Range<u64>>,
}

impl JobLayout {
    /// Whether job-relative sector `k` of its source reads as zeroes: in a hole or a zero run.
    pub fn source_reads_zero(&self, k: u64) -> bool {
        self.holes.iter().chain(&self.zero_runs).any(|run| run.contains(&k))
    }
}

/// A concrete scenario: a serde value that can be saved and replayed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwarmScenario {
    /// The client's configuration.
    pub config: ClientConfig,
    /// Source disks (pattern-filled with their own seeds, never written).
    pub sources: Vec<MemDiskOptions>,
    /// Target disks (pattern-filled: their old content).
    pub targets: Vec<MemDiskOptions>,
    /// Jobs.
    pub jobs: Vec<JobLayout>,
    /// Crash every disk at this virtual time (µs).
    pub crash_at_us: Option<u64>,
    /// Shut the client down at this virtual time (µs): jobs submitted later are refused.
    #[serde(default)]
    pub shutdown_at_us: Option<u64>,
    /// Shut the client down from inside this job's completion callback.
    #[serde(default)]
    pub shutdown_in_callback_of: Option<usize>,
    /// Prepared callbacks.
    #[serde(default)]
    pub prepared: Vec<PreparedInputs>,
    /// The throttle is given with `Client::set_throttle` after the start (the client starts
    /// without one).
    #[serde(default)]
    pub throttle_set_after_start: bool,
}

impl SwarmScenario {
    /// The holes of every source region, in device sectors: (source, sectors).
    pub fn source_holes(&self) -> impl Iterator<Item = (usize, std::ops::Range<u64>)> + '_ {
        self.jobs
            .iter()
            .filter_map(|job| job.source.map(|source| (job, source)))
            .flat_map(|(job, (s, start))| job.holes.iter().map(move |hole| (s, start + hole.start..start + hole.end)))
    }

    /// The allocated runs of zeroes of every source region, in device sectors: (source, sectors).
    pub fn source_zero_runs(&self) -> impl Iterator<Item = (usize, std::ops::Range<u64>)> + '_ {
        self.jobs
            .iter()
            .filter_map(|job| job.source.map(|source| (job, source)))
            .flat_map(|(job, (s, start))| job.zero_runs.iter().map(move |run| (s, start + run.start..start + run.end)))
    }

    /// The job whose region holds `record`'s sectors, if any.
    pub fn job_of_request(&self, record: &IoRecord) -> Option<usize> {
        let inside = |start: u64, len: u64| start <= record.sectors.start && record.sectors.end <= start + len;
        self.jobs.iter().position(|job| match record.disk {
            DiskRef::Source(s) => {
                job.source.is_some_and(|(source, start)| source == s && inside(start, job.len_sectors))
            }
            DiskRef::Target(t) => {
                job.targets.iter().any(|&(target, start)| target == t && inside(start, job.len_sectors))
            }
        })
    }
}

/// Seed of the pattern of source disk `i` (old content of its sectors).
pub fn source_seed(i: usize) -> u64 {
    1000 + i as u64
}

/// Seed of the pattern of target disk `i` (old content of its sectors).
pub fn target_seed(i: usize) -> u64 {
    2000 + i as u64
}

/// What one job did.
#[derive(Debug, Clone, Default)]
pub struct JobResult {
    /// Completions seen by the callback.
    pub callbacks: usize,
    /// The outcome the handle gave.
    pub outcome: Option<Outcome>,
    /// The outcome of the resubmission in the liveness phase, if any.
    pub retry: Option<Outcome>,
    /// Why its submission was refused (only after the client began to shut down).
    pub refused: Option<SubmitError>,
}

/// What a prepared callback did.
#[derive(Debug, Clone, Default)]
pub struct PreparedResult {
    /// Why `prepare_callback` refused it (only after the client began to shut down).
    pub refused: Option<SubmitError>,
    /// The outcomes it ran with: exactly one if prepared.
    pub outcomes: Vec<Outcome>,
}

/// What a run produced.
#[derive(Debug)]
pub struct SwarmReport {
    /// Per job.
    pub jobs: Vec<JobResult>,
    /// The trace's hash.
    pub trace_hash: u64,
    /// Events in the trace.
    pub trace_events: usize,
    /// The trace itself.
    pub trace: Trace,
    /// The run did not finish within [`DEADLOCK_AFTER`] of virtual time.
    pub deadlocked: bool,
    /// Most pages in use at once.
    pub pages_in_use_max: usize,
    /// Virtual time the run took.
    pub virtual_time: Duration,
    /// The disks, for the oracle.
    pub sources: Vec<Arc<MemDisk>>,
    /// The disks, for the oracle.
    pub targets: Vec<Arc<MemDisk>>,
    /// Fault logs right after the first phase (before the liveness phase), per target.
    pub target_logs_before_retry: Vec<Vec<FaultRecord>>,
    /// Every request the engine issued, in the order issued.
    pub io: Vec<IoRecord>,
    /// The harness's marks (cancels, completions) on the requests' sequence.
    pub marks: Vec<(u64, Mark)>,
    /// The model time of each mark, µs after the start (in the order of `marks`).
    pub mark_us: Vec<u64>,
    /// The client's statistics once its final shutdown returned (`None` after a deadlock).
    pub stats: Option<ClientStats>,
    /// What each shutdown call returned: the one in the middle of the run, if any, then the
    /// final one.
    pub shutdown_reports: Vec<ShutdownReport>,
    /// Per prepared callback (left default when its time came after the run ended).
    pub prepared: Vec<PreparedResult>,
}

/// A prepared callback waiting to be queued from inside a job's callback: (that job, the
/// callback, how to queue it).
type Ready = (usize, kcopyd_core::PreparedCallback, PreparedInputs);

/// Per prepared callback, the one waiting for a job's callback to queue it, if any.
type Waiting = Arc<Mutex<Vec<Option<Ready>>>>;

/// The task of a shutdown in the middle of the run, once it began.
type EarlyShutdown = Arc<Mutex<Option<tokio::task::JoinHandle<ShutdownReport>>>>;

/// Shuts `client` down, marked begun and returned.
async fn shut_down(client: Client, log: IoLog, trace: Trace) -> ShutdownReport {
    trace.record("shutdown");
    log.mark(Mark::ShutdownBegun);
    let report = client.shutdown().await;
    log.mark(Mark::ShutdownReturned);
    report
}

/// Queues prepared callback `p` as `layout` says (completed or dropped), marked.
fn queue_prepared(log: &IoLog, p: usize, callback: kcopyd_core::PreparedCallback, layout: &PreparedInputs) {
    log.mark(Mark::PreparedQueued(p));
    if layout.complete {
        callback.complete(layout.read_err, layout.write_err());
    } else {
        drop(callback);
    }
}

/// What the task of a prepared callback needs.
struct PreparedContext {
    client: Client,
    log: IoLog,
    trace: Trace,
    results: Arc<Mutex<Vec<PreparedResult>>>,
    waiting: Waiting,
}

impl PreparedContext {
    /// Prepares callback `p` at its time and queues it `after_us` later — or from inside the
    /// callback of the job it waits for, if that job completes first.
    async fn run(self, p: usize, layout: PreparedInputs, began: tokio::time::Instant, jobs: usize) {
        let PreparedContext { client, log, trace, results, waiting } = self;
        tokio::time::sleep_until(began + to_tokio(Duration::from_micros(layout.at_us))).await;
        log.mark(Mark::Preparing(p));
        let (ran_log, ran_trace, ran) = (log.clone(), trace.clone(), results.clone());
        let callback = client.prepare_callback(move |outcome| {
            ran_log.mark(Mark::PreparedRan(p));
            ran_trace.record(format!("prepared {p} ran: {outcome:?}"));
            ran.lock().expect("not poisoned")[p].outcomes.push(outcome);
            ran_log.mark(Mark::PreparedReturned(p));
        });
        let callback = match callback {
            Ok(callback) => callback,
            Err(error) => {
                log.mark(Mark::PrepareRefused(p));
                results.lock().expect("not poisoned")[p].refused = Some(error);
                return;
            }
        };
        let callback = match layout.in_callback_of.filter(|_| jobs > 0) {
            Some(job) => {
                waiting.lock().expect("not poisoned")[p] = Some((job % jobs, callback, layout.clone()));
                None
            }
            None => Some(callback),
        };
        tokio::time::sleep(to_tokio(Duration::from_micros(layout.after_us))).await;
        let callback = callback.or_else(|| waiting.lock().expect("not poisoned")[p].take().map(|(_, c, _)| c));
        if let Some(callback) = callback {
            queue_prepared(&log, p, callback, &layout);
        }
    }
}

fn job_of(layout: &JobLayout, sources: &[Device], targets: &[Device]) -> Job {
    let regions =
        layout.targets.iter().map(|&(t, start)| Region::new(targets[t].clone(), start, layout.len_sectors)).collect();
    match layout.source {
        Some((s, start)) => {
            Job::copy(Region::new(sources[s].clone(), start, layout.len_sectors), regions, layout.flags)
                .sparse(layout.sparse)
        }
        None => Job::zero(regions, layout.flags),
    }
}

/// Runs a scenario on one thread in virtual time.
#[allow(
    clippy::too_many_lines,
    reason = "one async block whose order of spawns, awaits and shutdown is the trace; split, the order would hide across functions"
)]
pub fn run(scenario: &SwarmScenario) -> SwarmReport {
    Simulation::block_on(async {
        let began = tokio::time::Instant::now();
        let trace = Trace::new();
        let log = IoLog::new();
        let make = |options: &MemDiskOptions, seed: u64| {
            let disk = Arc::new(MemDisk::new(options.clone()));
            disk.fill_pattern(seed);
            disk.set_trace(trace.clone());
            disk
        };
        let sources: Vec<_> = scenario.sources.iter().enumerate().map(|(i, o)| make(o, source_seed(i))).collect();
        let mut mapped_zeroes = vec![RangeSet::new(); sources.len()];
        for (s, zeroes) in scenario.source_holes().chain(scenario.source_zero_runs()) {
            sources[s].poke(zeroes.start, &vec![0; (zeroes.end - zeroes.start) as usize * SECTOR_SIZE]);
        }
        for (s, run) in scenario.source_zero_runs() {
            mapped_zeroes[s].insert(run);
        }
        let targets: Vec<_> = scenario.targets.iter().enumerate().map(|(i, o)| make(o, target_seed(i))).collect();
        let watched = |disks: &[Arc<MemDisk>], which: fn(usize) -> DiskRef| -> Vec<Device> {
            disks
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    let mapped = match which(i) {
                        DiskRef::Source(s) => mapped_zeroes[s].clone(),
                        DiskRef::Target(_) => RangeSet::new(),
                    };
                    Arc::new(Watched::with_mapped_zeroes(d.clone(), which(i), log.clone(), mapped)) as Device
                })
                .collect()
        };
        let (source_devices, target_devices) = (watched(&sources, DiskRef::Source), watched(&targets, DiskRef::Target));
        let client = if scenario.throttle_set_after_start {
            let config = ClientConfig { throttle: Throttle::OFF, ..scenario.config.clone() };
            let client = Client::start_in_current_system(config).expect("generated configurations are valid");
            client.set_throttle(scenario.config.throttle).expect("generated throttles are valid");
            client
        } else {
            Client::start_in_current_system(scenario.config.clone()).expect("generated configurations are valid")
        };
        let results: Rc<RefCell<Vec<JobResult>>> =
            Rc::new(RefCell::new(vec![JobResult::default(); scenario.jobs.len()]));
        let callbacks: Arc<Vec<std::sync::atomic::AtomicUsize>> =
            Arc::new((0..scenario.jobs.len()).map(|_| Default::default()).collect());

        if let Some(at) = scenario.crash_at_us {
            let (sources, targets, trace) = (sources.clone(), targets.clone(), trace.clone());
            actix_rt::spawn(async move {
                tokio::time::sleep_until(began + to_tokio(Duration::from_micros(at))).await;
                trace.record("crash");
                sources.iter().chain(&targets).for_each(|d| d.crash());
            });
        }

        // A shutdown in the middle of the run (at its time, or from a job's callback): its
        // report, once it returned.
        let early_shutdown: EarlyShutdown = Arc::new(Mutex::new(None));
        if let Some(at) = scenario.shutdown_at_us {
            let (client, log, trace) = (client.clone(), log.clone(), trace.clone());
            *early_shutdown.lock().expect("not poisoned") = Some(actix_rt::spawn(async move {
                tokio::time::sleep_until(began + to_tokio(Duration::from_micros(at))).await;
                shut_down(client, log, trace).await
            }));
        }

        let prepared: Arc<Mutex<Vec<PreparedResult>>> =
            Arc::new(Mutex::new(vec![PreparedResult::default(); scenario.prepared.len()]));
        let waiting: Waiting = Arc::new(Mutex::new((0..scenario.prepared.len()).map(|_| None).collect()));
        for (p, layout) in scenario.prepared.iter().enumerate() {
            let context = PreparedContext {
                client: client.clone(),
                log: log.clone(),
                trace: trace.clone(),
                results: prepared.clone(),
                waiting: waiting.clone(),
            };
            actix_rt::spawn(context.run(p, layout.clone(), began, scenario.jobs.len()));
        }

        let mut order: Vec<usize> = (0..scenario.jobs.len()).collect();
        order.sort_by_key(|&j| (scenario.jobs[j].submit_at_us, j));
        let phase_one = async {
            let mut handles = Vec::new();
            for j in order {
                let layout = &scenario.jobs[j];
                tokio::time::sleep_until(began + to_tokio(Duration::from_micros(layout.submit_at_us))).await;
                let counter = callbacks.clone();
                let trace_done = trace.clone();
                let log_done = log.clone();
                let waiting = waiting.clone();
                let shutdown_here = scenario.shutdown_in_callback_of == Some(j);
                let (client_here, early_here) = (client.clone(), early_shutdown.clone());
                let job = job_of(layout, &source_devices, &target_devices).on_complete(move |outcome| {
                    counter[j].fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    log_done.mark(Mark::Completed(j));
                    trace_done.record(format!(
                        "job {j} done ok={} read_err={} write_err={:?}",
                        outcome.is_ok(),
                        outcome.read_err,
                        outcome.write_err
                    ));
                    // Prepared callbacks waiting for this job's completion are queued from here.
                    let ready: Vec<(usize, Ready)> = waiting
                        .lock()
                        .expect("not poisoned")
                        .iter_mut()
                        .enumerate()
                        .filter_map(|(p, slot)| slot.take_if(|(job, ..)| *job == j).map(|ready| (p, ready)))
                        .collect();
                    for (p, (_, callback, layout)) in ready {
                        queue_prepared(&log_done, p, callback, &layout);
                    }
                    if shutdown_here {
                        let task = shut_down(client_here.clone(), log_done.clone(), trace_done.clone());
                        *early_here.lock().expect("not poisoned") = Some(actix_rt::spawn(task));
                    }
                    log_done.mark(Mark::CallbackReturned(j));
                });
                trace.record(format!("job {j} submit"));
                log.mark(Mark::Submitting(j));
                let handle = match client.submit(job).await {
                    Ok(handle) => handle,
                    Err(error) => {
                        trace.record(format!("job {j} refused: {error}"));
                        log.mark(Mark::Refused(j));
                        results.borrow_mut()[j].refused = Some(error);
                        continue;
                    }
                };
                if let Some(at) = layout.cancel_at_us {
                    let (handle, log, trace) = (handle.clone(), log.clone(), trace.clone());
                    actix_rt::spawn(async move {
                        tokio::time::sleep_until(began + to_tokio(Duration::from_micros(at))).await;
                        trace.record(format!("job {j} cancel"));
                        log.mark(Mark::Cancel(j));
                        handle.cancel();
                    });
                }
                handles.push((j, handle));
            }
            for (j, handle) in handles {
                let outcome = handle.await;
                results.borrow_mut()[j].outcome = Some(outcome);
            }
        };
        let mut deadlocked = tokio::time::timeout(to_tokio(DEADLOCK_AFTER), phase_one).await.is_err();
        let mut shutdown_reports = Vec::new();
        let early_shutdown = early_shutdown.lock().expect("not poisoned").take();
        if let (false, Some(task)) = (deadlocked, early_shutdown) {
            match tokio::time::timeout(to_tokio(DEADLOCK_AFTER), task).await {
                Ok(Ok(report)) => shutdown_reports.push(report),
                Ok(Err(panic)) => panic!("the shutdown task panicked: {panic}"),
                Err(_) => deadlocked = true,
            }
        }
        let target_logs_before_retry = targets.iter().map(|t| t.fault_log()).collect();

        let mut deadlocked_retry = false;
        if let (false, Some(at)) = (deadlocked, scenario.crash_at_us) {
            // Liveness: once the crash has happened, faults off, disks back, and every job
            // that did not finish cleanly submitted again.
            tokio::time::sleep_until(began + to_tokio(Duration::from_micros(at + 1))).await;
            trace.record("heal");
            log.set_phase(2);
            for disk in sources.iter().chain(&targets) {
                disk.heal();
                disk.restart();
            }
            let retry = async {
                for (j, layout) in scenario.jobs.iter().enumerate() {
                    let ok = results.borrow()[j].outcome.as_ref().is_some_and(Outcome::is_ok);
                    if !ok {
                        let job = job_of(layout, &source_devices, &target_devices);
                        let outcome = client.submit(job).await.expect("valid").await;
                        results.borrow_mut()[j].retry = Some(outcome);
                    }
                }
            };
            deadlocked_retry = tokio::time::timeout(to_tokio(DEADLOCK_AFTER), retry).await.is_err();
        }
        let mut deadlocked = deadlocked || deadlocked_retry;
        let pages_in_use_max = client.pool_stats().pages_in_use_max;
        if !deadlocked {
            log.mark(Mark::ShutdownBegun);
            match tokio::time::timeout(to_tokio(DEADLOCK_AFTER), client.shutdown()).await {
                Ok(report) => shutdown_reports.push(report),
                Err(_) => deadlocked = true,
            }
            log.mark(Mark::ShutdownReturned);
        }
        let stats = (!deadlocked).then(|| client.stats());
        let mut jobs = results.borrow().clone();
        for (j, job) in jobs.iter_mut().enumerate() {
            job.callbacks = callbacks[j].load(std::sync::atomic::Ordering::SeqCst);
        }
        SwarmReport {
            jobs,
            trace_hash: trace.hash(),
            trace_events: trace.len(),
            trace: trace.clone(),
            deadlocked,
            pages_in_use_max,
            virtual_time: to_model(tokio::time::Instant::now() - began),
            sources,
            targets,
            target_logs_before_retry,
            io: log.records(),
            marks: log.marks(),
            mark_us: log.mark_times(),
            stats,
            shutdown_reports,
            prepared: prepared.lock().expect("not poisoned").clone(),
        }
    })
}

/// A sparse copy's settings, its holes (units) and its zero runs (sectors), as (offset, length).
type SparseDraw = (Sparse, Vec<(u64, u64)>, Vec<(u64, u64)>);

/// A sparse copy's settings (never `TargetZeroes::Skip`: every target holds old data), up to
/// four holes (units) and up to four allocated zero runs (sectors, of any length and
/// alignment) in its source; a zero job ignores them.
fn arb_sparse() -> impl Strategy<Value = SparseDraw> {
    (
        proptest::bool::weighted(0.75),
        prop_oneof![Just(0u32), Just(512), Just(4096), Just(65536)],
        any::<bool>(),
        proptest::collection::vec((0u64..48, 1u64..24), 0..4),
        proptest::collection::vec((0u64..400, prop_oneof![1u64..9, 8u64..80, 1u64..400]), 0..4),
    )
        .prop_map(|(skip_holes, zero_block_bytes, deallocate, holes, zero_runs)| {
            let target_zeroes = if deallocate { TargetZeroes::Deallocate } else { TargetZeroes::Write };
            (Sparse { skip_holes, zero_block_bytes, target_zeroes }, holes, zero_runs)
        })
}

/// A disk's timing and faults, for [`arb_inputs`].
fn arb_disk() -> impl Strategy<Value = DiskInputs> {
    let timing = (0u64..3, 0u64..3, 0u32..3, 0u64..3).prop_map(|(c, b, q, j)| TimingInputs {
        cost_us: [0, 20, 500][c as usize],
        bandwidth_mb_per_s: [0, 100, 2000][b as usize],
        queue_depth: [0, 1, 8][q as usize],
        jitter_us: [0, 100, 3000][j as usize],
    });
    let faults = (
        proptest::collection::vec((0u64..400, 1u64..4), 0..3),
        proptest::collection::vec((0u64..400, 1u64..4, 0u32..3), 0..3),
        proptest::option::weighted(0.1, 0u64..100),
        proptest::collection::vec((0u64..50, 0u64..10_000), 0..2),
        proptest::collection::vec((0u64..30, -4i64..5), 0..2),
        proptest::bool::weighted(0.2),
        (0u32..5000, 0u32..5000, 0u32..2000, 0u32..50_000),
    )
        .prop_map(|(latent, write_faults, fail_after_ios, slow, misdirects, short_io, odds)| FaultInputs {
            latent,
            write_faults,
            fail_after_ios,
            slow,
            misdirects,
            short_io,
            odds,
            stalls: Vec::new(),
            allocation_unknown: false,
        });
    (any::<bool>(), any::<bool>(), proptest::bool::weighted(0.15), timing.clone(), timing, faults).prop_map(
        |(block_4k, write_zeroes, zoned, read, write, faults)| DiskInputs {
            block_4k,
            write_zeroes,
            zoned,
            read,
            write,
            faults,
        },
    )
}

/// A job, for [`arb_inputs`]: copies (some sparse, with holes and zero runs) and zero jobs.
fn arb_job() -> impl Strategy<Value = JobInputs> {
    (
        proptest::bool::weighted(0.2),
        0usize..3,
        proptest::collection::vec(0usize..8, 1..=8),
        prop_oneof![1 => Just(0u64), 20 => 1u64..48],
        0u64..4,
        any::<bool>(),
        proptest::bool::weighted(0.25),
        0u64..5000,
        proptest::option::weighted(0.15, 0u64..3000),
        proptest::option::weighted(0.4, arb_sparse()),
    )
        .prop_map(
            |(
                zero,
                source,
                targets,
                len_units,
                gap_units,
                ignore_error,
                write_seq,
                submit_at_us,
                cancel_after_us,
                sparse,
            )| {
                let (sparse, holes, zero_runs) = sparse.unwrap_or_default();
                JobInputs {
                    zero,
                    source,
                    targets,
                    len_units,
                    gap_units,
                    ignore_error,
                    write_seq,
                    submit_at_us,
                    cancel_after_us,
                    sparse,
                    holes,
                    zero_runs,
                }
            },
        )
}

/// A proptest strategy for [`Inputs`]: small, shrinkable scenarios.
pub fn arb_inputs() -> impl Strategy<Value = Inputs> {
    let (disk, job) = (arb_disk(), arb_job());
    (
        any::<u64>(),
        prop_oneof![Just(1usize), 1usize..8, 8usize..300],
        1u64..40,
        1usize..9,
        any::<bool>(),
        proptest::collection::vec(arb_disk(), 1..3),
        proptest::collection::vec(disk, 1..8),
        proptest::collection::vec(job, 1..8),
    )
        .prop_map(|(seed, page_budget, subjob_units, subjobs_in_flight, big_units, sources, targets, jobs)| {
            Inputs {
                seed,
                page_budget,
                subjob_units,
                subjobs_in_flight,
                big_units,
                sources,
                targets,
                jobs,
                crash_at_us: None,
                // From the seed, so that the strategy and its saved regressions keep their shape.
                headers_only: seed % 3 == 0,
                shutdown_at_us: (seed % 5 == 1).then_some((seed >> 8) % 12_000),
                prepared: if seed % 3 == 2 { vec![PreparedInputs::from_bits(mix64(seed))] } else { Vec::new() },
                throttle: match seed % 7 {
                    3 => Throttle { rate_bytes_per_s: Some(((seed >> 24) % 64 + 1) << 20), ..Throttle::OFF },
                    5 => Throttle { busy_percent: Some(10 + (seed >> 24) as u32 % 81), ..Throttle::OFF },
                    _ => Throttle::OFF,
                },
                queued_jobs_max: 0,
                shutdown_in_callback_of: None,
                io_timeout_ms: None,
                throttle_set_after_start: seed % 11 == 4,
            }
        })
}
