//! `kcopyd demo`: a mirror resync on simulated disks, with injected faults, checked against
//! the simulator's fault log.
//!
//! ```text
//!               latent read errors (2)
//!  source ─────────────┬──────────► mirror-a   stale data, to be resynced
//!  80 µs + 800 MB/s    ├──────────► mirror-b   + a bad write region
//!  queue 32            └──────────► mirror-c
//!                 IGNORE_ERROR      150 µs + 300 MB/s, queue 32
//!
//!  then: every read_failed range ⊆ read faults logged on the source
//!        every write_failed range ⊆ write faults logged on that target
//!        every sector outside the failed ranges = the source's
//! ```
//!
//! The disks hold their bytes in memory and run in real time: 256 MiB by default takes a
//! second or two.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;

use futures_util::future::join_all;
use indicatif::{MultiProgress, ProgressBar};
use kcopyd_core::{BlockDevice, Client, Flags, Job, Outcome, RangeSet, Region, SECTOR_SIZE};
use kcopyd_sim::{FaultKind, IoModel, Latency, MemDisk, MemDiskOptions, Operation};

use crate::cli::{DemoArgs, MEMORY_DEFAULT, SUB_JOB_SIZE_DEFAULT, SUBJOBS_IN_FLIGHT_DEFAULT};
use crate::error::{CliError, Status};
use crate::out;
use crate::progress::{self, Interrupts, WatchUi};
use crate::report::describe_ranges;
use crate::size::{self, Bytes};

/// The smallest and largest disk the demo takes (each of four disks holds it in memory).
const DEMO_LEN_BYTES_MIN: u64 = 16 << 20;
const DEMO_LEN_BYTES_MAX: u64 = 1 << 30;
/// The pattern seeds: the source, and the stale data on the mirrors.
const SOURCE_SEED: u64 = 0x5eed;
const STALE_SEED: u64 = 0x57a1e;
/// Sectors compared at once by the check (bounds its memory).
const CHECK_SECTORS: u64 = 32 << 11;

/// Reads of a fast SSD: 80 µs per request, 800 MB/s, 32 at once.
const READ_MODEL: IoModel = IoModel { cost_us: 80, bandwidth_bytes_per_s: 800_000_000, queue_depth: 32, jitter_us: 20 };
/// Writes are slower: 150 µs per request, 300 MB/s.
const WRITE_MODEL: IoModel =
    IoModel { cost_us: 150, bandwidth_bytes_per_s: 300_000_000, queue_depth: 32, jitter_us: 40 };

const TARGET_NAMES: [&str; 3] = ["mirror-a", "mirror-b", "mirror-c"];
/// The target with the bad write region.
const BAD_WRITE_TARGET: usize = 1;

fn disk(name: &str, len_sectors: u64, seed: u64) -> Arc<MemDisk> {
    let disk = Arc::new(MemDisk::new(MemDiskOptions {
        name: name.into(),
        seed,
        len_sectors,
        logical_block_size: 512,
        // Sparse: the disks keep extents of provenance, not bytes, so the demo needs little memory.
        sparse: true,
        latency: Latency { read: READ_MODEL, write: WRITE_MODEL, seed, ..Latency::default() },
        ..MemDiskOptions::default()
    }));
    disk.fill_pattern(seed);
    disk
}

/// Where the faults go: two latent read errors on the source (one sector, and eight), and a
/// bad write region of 64 sectors on one mirror, placed at fractions of the disk.
struct Faults {
    bad_reads: Vec<std::ops::Range<u64>>,
    bad_write: std::ops::Range<u64>,
}

impl Faults {
    fn for_len(len_sectors: u64) -> Faults {
        let at = |fraction: u64| len_sectors / 10 * fraction;
        Faults { bad_reads: vec![at(2) + 1..at(2) + 2, at(6) + 17..at(6) + 25], bad_write: at(4) + 100..at(4) + 164 }
    }
}

/// The bars: the job, the source's reads and each mirror's writes, from the disks' counters.
struct Bars {
    job: ProgressBar,
    source: (ProgressBar, Arc<MemDisk>),
    targets: Vec<(ProgressBar, Arc<MemDisk>)>,
    _multi: MultiProgress,
}

impl WatchUi for Bars {
    fn tick(&self, done_bytes: u64) {
        self.job.set_position(done_bytes);
        self.source.0.set_position(self.source.1.stats().read_bytes);
        for (bar, disk) in &self.targets {
            bar.set_position(disk.stats().written_bytes);
        }
    }

    fn note(&self, line: &str) {
        self.job.suspend(|| out::note(line));
    }
}

impl Bars {
    fn new(visible: bool, len_bytes: u64, source: &Arc<MemDisk>, targets: &[Arc<MemDisk>]) -> Bars {
        let multi = progress::multi(visible);
        let bar = |label: &str| {
            let bar = multi.add(ProgressBar::new(len_bytes));
            bar.set_style(progress::byte_style());
            bar.set_message(label.to_owned());
            bar
        };
        Bars {
            job: bar("resync"),
            source: (bar("source"), source.clone()),
            targets: targets.iter().map(|t| (bar(t.name()), t.clone())).collect(),
            _multi: multi,
        }
    }

    fn finish(&self) {
        self.tick(self.job.length().unwrap_or(0));
        self.job.finish_and_clear();
        self.source.0.finish_and_clear();
        self.targets.iter().for_each(|(bar, _)| bar.finish_and_clear());
    }
}

/// One finding of the check.
struct Check {
    passed: bool,
    what: String,
}

/// Checks the outcome against the fault logs and the disks' contents.
fn check(
    outcome: &Outcome,
    source: &MemDisk,
    targets: &[Arc<MemDisk>],
    faults: &Faults,
    len_sectors: u64,
) -> Vec<Check> {
    let mut checks = Vec::new();
    let logged = |disk: &MemDisk, operations: &[Operation], kind: FaultKind| -> RangeSet {
        disk.fault_log()
            .into_iter()
            .filter(|f| f.device == disk.name() && operations.contains(&f.operation) && f.kind == kind)
            .map(|f| f.sectors)
            .collect()
    };
    let read_logged = logged(source, &[Operation::Read], FaultKind::LatentSectorError);
    let uncovered = outcome.read_failed.difference(&read_logged);
    checks.push(Check {
        passed: uncovered.is_empty(),
        what: format!(
            "every read_failed range is covered by read faults logged on the source ({} faults logged){}",
            source.fault_log().len(),
            if uncovered.is_empty() { String::new() } else { format!(": not covered: {uncovered:?}") }
        ),
    });
    let mut write_problems = Vec::new();
    for (target, report) in targets.iter().zip(&outcome.targets) {
        let write_logged = logged(target, &[Operation::Write, Operation::WriteZeroes], FaultKind::WriteError);
        let uncovered = report.write_failed.difference(&write_logged);
        if !uncovered.is_empty() {
            write_problems.push(format!("{}: not covered: {uncovered:?}", target.name()));
        }
    }
    checks.push(Check {
        passed: write_problems.is_empty(),
        what: format!(
            "every write_failed range is covered by write faults logged on its target{}",
            if write_problems.is_empty() { String::new() } else { format!(": {}", write_problems.join("; ")) }
        ),
    });
    let whole = RangeSet::from_range(0..len_sectors);
    let mut compared_sectors = 0;
    let mut mismatches = Vec::new();
    for (target, report) in targets.iter().zip(&outcome.targets) {
        let mut failed = outcome.read_failed.clone();
        failed.extend(&report.write_failed);
        let good = whole.difference(&failed);
        'ranges: for range in good.ranges() {
            let mut at = range.start;
            while at < range.end {
                let len = (range.end - at).min(CHECK_SECTORS);
                let expected = source.snapshot(at, len);
                let actual = target.snapshot(at, len);
                if expected != actual {
                    let offset = expected.iter().zip(&actual).position(|(a, b)| a != b).unwrap_or(0);
                    mismatches.push(format!(
                        "{} differs at sector {}",
                        target.name(),
                        at + (offset / SECTOR_SIZE) as u64
                    ));
                    break 'ranges;
                }
                compared_sectors += len;
                at += len;
            }
        }
    }
    checks.push(Check {
        passed: mismatches.is_empty(),
        what: format!(
            "every sector outside the failed ranges equals the source ({} compared){}",
            Bytes(compared_sectors * SECTOR_SIZE as u64),
            if mismatches.is_empty() { String::new() } else { format!(": {}", mismatches.join("; ")) }
        ),
    });
    let injected: RangeSet = faults.bad_reads.iter().cloned().collect();
    let missed = injected.difference(&outcome.read_failed);
    checks.push(Check {
        passed: missed.is_empty(),
        what: format!(
            "every injected latent error was found and narrowed to its sectors{}",
            if missed.is_empty() { String::new() } else { format!(": missed {missed:?}") }
        ),
    });
    let mut extra = Vec::new();
    for (target, report) in targets.iter().zip(&outcome.targets) {
        let mut failed = outcome.read_failed.clone();
        failed.extend(&report.write_failed);
        if report.not_copied != failed {
            extra.push(format!("{}: not_copied {:?}, failed {:?}", target.name(), report.not_copied, failed));
        }
    }
    checks.push(Check {
        passed: extra.is_empty(),
        what: format!(
            "on every target, not_copied = read_failed ∪ write_failed{}",
            if extra.is_empty() { String::new() } else { format!(": {}", extra.join("; ")) }
        ),
    });
    checks
}

/// The per-target table.
fn table(outcome: &Outcome, targets: &[Arc<MemDisk>], len_sectors: u64) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<10} {:<13} {:>12} {:>12}  write failed (sectors)",
        "target", "status", "copied", "not copied"
    );
    for (target, report) in targets.iter().zip(&outcome.targets) {
        let status = if !report.write_failed.is_empty() {
            "write errors"
        } else if !report.not_copied.is_empty() {
            "incomplete"
        } else {
            "ok"
        };
        let not_copied = report.not_copied.len_sectors();
        let write_failed: Vec<String> =
            report.write_failed.ranges().iter().map(|r| format!("{}-{}", r.start, r.end)).collect();
        let _ = writeln!(
            out,
            "{:<10} {:<13} {:>12} {:>12}  {}",
            target.name(),
            status,
            Bytes((len_sectors - not_copied) * SECTOR_SIZE as u64).to_string(),
            Bytes(not_copied * SECTOR_SIZE as u64).to_string(),
            if write_failed.is_empty() { "-".to_owned() } else { write_failed.join(", ") }
        );
    }
    out
}

fn pairs(set: &RangeSet) -> Vec<[u64; 2]> {
    set.ranges().iter().map(|r| [r.start, r.end]).collect()
}

/// Prints a line on stdout; a closed stdout ends the demo quietly (exit 141).
macro_rules! say {
    () => {
        out::print("\n")?
    };
    ($($arg:tt)*) => {
        out::print(&format!("{}\n", format_args!($($arg)*)))?
    };
}

/// Runs the demo.
///
/// # Errors
/// A `--size` out of bounds, or the engine cannot start.
pub async fn run(args: &DemoArgs, interrupts: &mut Interrupts) -> Result<Status, CliError> {
    interrupts
        .set_summary(Some(Box::new(|| "kcopyd: interrupted: the demo stopped (its disks were in memory)".into())));
    let len_bytes = args.size_bytes;
    if !(DEMO_LEN_BYTES_MIN..=DEMO_LEN_BYTES_MAX).contains(&len_bytes) || len_bytes % (1 << 20) != 0 {
        return Err(CliError::argument(
            "--size",
            len_bytes.to_string(),
            format!(
                "must be a whole number of MiB from {} to {}",
                Bytes(DEMO_LEN_BYTES_MIN),
                Bytes(DEMO_LEN_BYTES_MAX)
            ),
        ));
    }
    let len_sectors = len_bytes / SECTOR_SIZE as u64;
    let faults = Faults::for_len(len_sectors);
    let rate = |model: &IoModel| {
        format!("{} µs + {} MB/s, queue {}", model.cost_us, model.bandwidth_bytes_per_s / 1_000_000, model.queue_depth)
    };
    say!(
        "kcopyd demo: resync {} from source to {} mirrors holding stale data, on simulated disks",
        Bytes(len_bytes),
        TARGET_NAMES.len()
    );
    say!("  disks: reads {}; writes {}", rate(&READ_MODEL), rate(&WRITE_MODEL));
    let injected: RangeSet = faults.bad_reads.iter().cloned().collect();
    say!("  injected: latent read errors on the source at sectors {}", describe_ranges(&pairs(&injected)));
    say!(
        "            a bad write region on {} at sectors {}",
        TARGET_NAMES[BAD_WRITE_TARGET],
        describe_ranges(&[[faults.bad_write.start, faults.bad_write.end]])
    );
    let setup_started = Instant::now();
    let source = disk("source", len_sectors, SOURCE_SEED);
    let targets: Vec<Arc<MemDisk>> =
        TARGET_NAMES.iter().enumerate().map(|(i, name)| disk(name, len_sectors, STALE_SEED + i as u64)).collect();
    faults.bad_reads.iter().for_each(|r| source.fail_reads(r.clone()));
    targets[BAD_WRITE_TARGET].fail_writes(faults.bad_write.clone());
    say!(
        "  job: IGNORE_ERROR, {SUB_JOB_SIZE_DEFAULT} sub-jobs, {SUBJOBS_IN_FLIGHT_DEFAULT} in flight, \
         {MEMORY_DEFAULT} of buffers (disks filled in {:.2} s)",
        setup_started.elapsed().as_secs_f64()
    );

    let config = kcopyd_core::ClientConfig {
        page_budget: (size::parse_size(MEMORY_DEFAULT).expect("a valid default") / 4096) as usize,
        sub_job_size_bytes: size::parse_size(SUB_JOB_SIZE_DEFAULT).expect("a valid default") as usize,
        subjobs_in_flight: SUBJOBS_IN_FLIGHT_DEFAULT,
        ..kcopyd_core::ClientConfig::default()
    };
    let client = Client::new(config).map_err(|source| CliError::Config { option: "--memory", source })?;
    let job = Job::copy(
        Region::new(source.clone(), 0, len_sectors),
        targets.iter().map(|t| Region::new(t.clone(), 0, len_sectors)).collect(),
        Flags::IGNORE_ERROR,
    );
    let bars = Bars::new(progress::bars_wanted(args.quiet), len_bytes, &source, &targets);
    let started = Instant::now();
    // From here a signal cancels the resync (at once if it came before it started).
    interrupts.set_phase(progress::Phase::Graceful);
    let handle = client.submit(job).await.map_err(|source| CliError::Submit { source })?;
    let watched = progress::watch(&handle, &bars, interrupts).await;
    let flushes = join_all(targets.iter().map(|t| t.flush())).await;
    let seconds = started.elapsed().as_secs_f64();
    bars.finish();
    client.shutdown().await;
    let outcome = watched.outcome;

    say!();
    say!(
        "resync {}: {} in {seconds:.2} s ({}/s){}",
        if outcome.cancelled { "cancelled" } else { "done" },
        Bytes(len_bytes),
        Bytes((len_bytes as f64 / seconds.max(1e-9)) as u64),
        if outcome.is_ok() { "" } else { ", with errors (as injected)" }
    );
    say!();
    out::print(&table(&outcome, &targets, len_sectors))?;
    say!();
    say!("failed ranges (512-byte sectors, START-END with END excluded):");
    if outcome.read_failed.is_empty() {
        say!("  source read_failed: none");
    } else {
        say!("  source read_failed: {}", describe_ranges(&pairs(&outcome.read_failed)));
    }
    for (target, report) in targets.iter().zip(&outcome.targets) {
        if !report.write_failed.is_empty() {
            say!("  {} write_failed: {}", target.name(), describe_ranges(&pairs(&report.write_failed)));
        }
    }
    let logged_reads = source.fault_log().len();
    let logged_writes: usize = targets.iter().map(|t| t.fault_log().len()).sum();
    let plural = |count: usize| if count == 1 { "" } else { "s" };
    say!(
        "  fault log: {logged_reads} failed read{} on the source (the engine narrows a failed chunk in halves), \
         {logged_writes} failed write{} on the mirrors",
        plural(logged_reads),
        plural(logged_writes)
    );
    for (target, result) in targets.iter().zip(&flushes) {
        if let Err(error) = result {
            say!("  {}: flush failed: {error}", target.name());
        }
    }

    if let Some(code) = watched.interrupted {
        say!();
        say!("interrupted: the check against the fault log needs a finished resync");
        return Ok(Status::Interrupted(code));
    }
    if args.tamper {
        // A sector the engine copied, changed behind its back: only the data check can see it.
        let sector = 8;
        let flipped: Vec<u8> = source.snapshot(sector, 1).iter().map(|b| !b).collect();
        targets[0].poke(sector, &flipped);
        say!();
        say!("--tamper: changed sector {sector} of {} after the resync", targets[0].name());
    }
    say!();
    say!("check against the simulator's fault log:");
    let checks = check(&outcome, &source, &targets, &faults, len_sectors);
    for finding in &checks {
        say!("  [{}] {}", if finding.passed { " ok " } else { "FAIL" }, finding.what);
    }
    let passed = checks.iter().all(|c| c.passed) && flushes.iter().all(Result::is_ok);
    say!();
    if passed {
        say!("PASS: the outcome matches the fault log ({:.2} s in all)", setup_started.elapsed().as_secs_f64());
        Ok(Status::Success)
    } else {
        say!("FAIL: the outcome does not match the fault log");
        Ok(Status::Failed)
    }
}
