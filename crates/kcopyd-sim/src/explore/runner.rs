//! Runs a [`Scenario`] in virtual time and builds its [`ScenarioReport`].
//!
//! ```text
//!  run(scenario)
//!   ├─ Simulation #1: disks, jobs (each entry a task: wait for its start, submit count jobs,
//!   │                 at most `concurrency` in flight), foreground tasks until the jobs end
//!   └─ Simulation #2: the same disks and foreground alone, for as long   (baseline latency)
//! ```
//!
//! The engine sees each disk through an [`Observed`] device that records its requests; the
//! foreground goes straight to the disk, so its requests and the engine's share the disk's
//! queue and data path but are counted apart.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use kcopyd_core::{
    BlockDevice, Client, Device, Flags, Job, Outcome, PagePool, RangeSet, ReadBuf, Region, SECTOR_SIZE, WriteBuf,
    sectors_to_bytes,
};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::ScenarioError;
use super::probe::{Observed, model_us_since, observed};
use super::report::{
    DiskReport, ForegroundReport, IoSizeCount, JobReport, Latencies, RANGES_LISTED, Sample, ScenarioReport,
    TargetOutcome,
};
use super::scenario::{Access, Content, EntryKind, JobEntry, Scenario};
use super::series::Series;
use super::verify::{JobFailures, verify_entry};
use crate::{Medium, MemDisk, Simulation, mix64, to_tokio};

/// Failures listed per job entry in the report.
const FAILURES_LISTED: usize = 5;
/// Latencies are recorded up to this many microseconds (100 hours).
const LATENCY_US_MAX: u64 = 360_000_000_000;

/// A stable 64-bit hash of a name (FNV-1a, mixed), so seeds do not depend on map order.
fn name_hash(name: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in name.bytes() {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }
    mix64(hash)
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("valid histogram bounds")
}

/// What one job entry's jobs reported.
struct EntryResult {
    report: JobReport,
    latencies: Histogram<u64>,
    submit_error: Option<kcopyd_core::SubmitError>,
    /// Per job that was not ok: what it reported failed.
    failures: BTreeMap<u64, JobFailures>,
}

/// What the foreground recorded.
struct ForegroundResult {
    latencies: Histogram<u64>,
    /// Latency sum and count per bucket, and the largest.
    latency_series: Series,
    count_series: Series,
    end_us: u64,
}

impl ForegroundResult {
    /// Counts a request due at `due_us` and done at `done_us`.
    fn record(&mut self, due_us: u64, done_us: u64) {
        let latency_us = done_us - due_us;
        self.latencies.record(latency_us.clamp(1, LATENCY_US_MAX)).expect("within bounds");
        self.latency_series.add(done_us, latency_us as f64);
        self.count_series.add(done_us, 1.0);
        self.end_us = self.end_us.max(done_us);
    }
}

/// What one simulation of the scenario recorded.
struct RunData {
    entries: Vec<EntryResult>,
    jobs_end_us: u64,
    end_us: u64,
    disks: Vec<(String, Arc<Observed>, Arc<MemDisk>)>,
    foreground: Option<ForegroundResult>,
    pages_in_use_max: usize,
}

/// Runs `scenario` (validated again first): once with its jobs and foreground, and, when it
/// has both, once more with the foreground alone for as long, for the baseline latency.
///
/// # Errors
/// The scenario does not hold together, or the engine refused a job.
pub fn run(scenario: &Scenario) -> Result<ScenarioReport, ScenarioError> {
    run_with(scenario, &|_| {})
}

/// The disks of a run by name, as [`run_with`]'s hook sees them.
pub type Disks<'a> = BTreeMap<&'a str, &'a MemDisk>;

/// As [`run`], calling `after_jobs` with the disks once the jobs and the foreground are done
/// and before the check of what the targets hold: what it changes behind the engine's back,
/// the check must find (the demo's `--tamper`).
///
/// # Errors
/// As [`run`].
pub fn run_with(scenario: &Scenario, after_jobs: &dyn Fn(&Disks<'_>)) -> Result<ScenarioReport, ScenarioError> {
    scenario.validate()?;
    let wall = std::time::Instant::now();
    let main = simulate(scenario, true, None, after_jobs)?;
    let baseline = match &scenario.foreground {
        Some(foreground) if !scenario.jobs.is_empty() => {
            let duration_us = foreground.duration_us.unwrap_or(main.jobs_end_us).max(1);
            Some(simulate(scenario, false, Some(duration_us), &|_| {})?)
        }
        _ => None,
    };
    Ok(assemble(scenario, main, baseline, wall.elapsed()))
}

/// One simulation: with the jobs, or (`with_jobs` false) the foreground alone for
/// `foreground_us`.
fn simulate(
    scenario: &Scenario,
    with_jobs: bool,
    foreground_us: Option<u64>,
    after_jobs: &dyn Fn(&Disks<'_>),
) -> Result<RunData, ScenarioError> {
    let outcome = Simulation::run(scenario.client.clone(), |client, _trace| async move {
        let origin = Instant::now();
        let media: BTreeMap<&str, Medium> =
            scenario.disks.values().filter_map(|d| d.medium.as_deref()).map(|m| (m, Medium::new())).collect();
        let disks: Vec<(String, Arc<Observed>, Arc<MemDisk>)> = scenario
            .disks
            .iter()
            .map(|(name, spec)| {
                let mut options = spec.options.clone();
                options.seed = mix64(scenario.seed ^ name_hash(name) ^ mix64(options.seed));
                options.latency.seed = mix64(options.seed ^ options.latency.seed ^ 0x006c_6174_656e_6379);
                let disk = Arc::new(match spec.medium.as_deref() {
                    Some(medium) => MemDisk::on_medium(options, &media[medium]),
                    None => MemDisk::new(options),
                });
                if spec.content == Content::Pattern {
                    disk.fill_pattern(disk.options().seed);
                }
                (name.clone(), Arc::new(observed(disk.clone(), origin)), disk)
            })
            .collect();
        let by_name: BTreeMap<&str, (Arc<Observed>, Arc<MemDisk>)> =
            disks.iter().map(|(name, observed, disk)| (name.as_str(), (observed.clone(), disk.clone()))).collect();

        let jobs_done = Rc::new(Cell::new(!with_jobs));
        let foreground = scenario.foreground.as_ref().map(|spec| {
            let disk = by_name[spec.disk.as_str()].1.clone();
            let end_us = foreground_us.or(spec.duration_us);
            actix_rt::spawn(run_foreground(scenario.clone(), disk, origin, end_us, jobs_done.clone()))
        });

        let mut entries = Vec::new();
        if with_jobs {
            let drivers: Vec<_> = (0..scenario.jobs.len())
                .map(|index| {
                    let devices: BTreeMap<String, Device> = by_name
                        .iter()
                        .map(|(name, (observed, _))| (name.to_string(), observed.clone() as Device))
                        .collect();
                    actix_rt::spawn(drive_entry(scenario.clone(), index, client.clone(), devices, origin))
                })
                .collect();
            for driver in drivers {
                entries.push(driver.await.expect("a job entry's task does not panic"));
            }
        }
        let jobs_end_us = model_us_since(origin);
        jobs_done.set(true);
        let foreground = match foreground {
            Some(task) => Some(task.await.expect("the foreground task does not panic")),
            None => None,
        };
        let end_us = model_us_since(origin);
        let by_disk: Disks<'_> = disks.iter().map(|(name, _, disk)| (name.as_str(), &**disk)).collect();
        after_jobs(&by_disk);
        for (index, entry) in entries.iter_mut().enumerate() {
            entry.report.verification = verify_entry(scenario, index, &by_disk, &entry.failures);
        }
        for (_, observed, _) in &disks {
            observed.hooks().probe().finish(jobs_end_us.max(1));
        }
        let pages_in_use_max = client.pool_stats().pages_in_use_max;
        RunData { entries, jobs_end_us, end_us, disks, foreground, pages_in_use_max }
    })
    .map_err(|source| ScenarioError::Client { source })?;
    if let Some((index, error)) =
        outcome.entries.iter().enumerate().find_map(|(i, e)| e.submit_error.clone().map(|error| (i, error)))
    {
        return Err(ScenarioError::Submit { job: scenario.job_name(index), source: error });
    }
    Ok(outcome)
}

/// Submits the jobs of entry `index` and waits for all of them.
async fn drive_entry(
    scenario: Scenario,
    index: usize,
    client: Client,
    devices: BTreeMap<String, Device>,
    origin: Instant,
) -> EntryResult {
    let spec = &scenario.jobs[index];
    let (len_sectors, stride_sectors) = scenario.job_regions(index).expect("validated");
    let result = Rc::new(RefCell::new(empty_entry_result(&scenario, index, len_sectors)));
    let limit = (spec.concurrency > 0).then(|| Arc::new(Semaphore::new(spec.concurrency as usize)));
    let flags = entry_flags(spec);
    let mut waiters = Vec::new();
    for i in 0..spec.count {
        let start_us = spec.start_at_us.saturating_add(spec.interval_us.saturating_mul(i));
        tokio::time::sleep_until(origin + to_tokio(Duration::from_micros(start_us))).await;
        let permit = match &limit {
            Some(limit) => Some(limit.clone().acquire_owned().await.expect("the semaphore is never closed")),
            None => None,
        };
        let job = entry_job(spec, &devices, stride_sectors * i, len_sectors, flags);
        let submitted_us = model_us_since(origin);
        if i == 0 {
            result.borrow_mut().report.first_submit_s = submitted_us as f64 / 1e6;
        }
        match client.submit(job).await {
            Ok(handle) => {
                let result = result.clone();
                waiters.push(actix_rt::spawn(async move {
                    let outcome = handle.await;
                    drop(permit);
                    let done_us = model_us_since(origin);
                    record_outcome(&mut result.borrow_mut(), i, &outcome, done_us - submitted_us, done_us);
                }));
            }
            Err(error) => {
                result.borrow_mut().submit_error = Some(error);
                break;
            }
        }
    }
    for waiter in waiters {
        waiter.await.expect("a job's waiter does not panic");
    }
    Rc::try_unwrap(result).ok().expect("every waiter is done").into_inner()
}

/// Entry `index`'s result before any of its jobs ran: its name, kind, bytes and targets.
fn empty_entry_result(scenario: &Scenario, index: usize, len_sectors: u64) -> EntryResult {
    let spec = &scenario.jobs[index];
    EntryResult {
        report: JobReport {
            name: scenario.job_name(index),
            kind: match spec.kind {
                EntryKind::Copy => "copy".into(),
                EntryKind::Zero => "zero".into(),
            },
            // Saturating: a job may cover a disk of up to u64::MAX sectors, many times.
            bytes: u64::try_from(sectors_to_bytes(len_sectors).saturating_mul(u128::from(spec.count)))
                .unwrap_or(u64::MAX),
            targets: spec
                .targets
                .iter()
                .map(|t| TargetOutcome { disk: t.clone(), ..TargetOutcome::default() })
                .collect(),
            ..JobReport::default()
        },
        latencies: histogram(),
        submit_error: None,
        failures: BTreeMap::new(),
    }
}

/// The engine's flags of an entry's jobs.
fn entry_flags(spec: &JobEntry) -> Flags {
    let mut flags = Flags::empty();
    if spec.ignore_error {
        flags |= Flags::IGNORE_ERROR;
    }
    if spec.write_seq {
        flags |= Flags::WRITE_SEQ;
    }
    flags
}

/// One job of an entry, its regions `shift_sectors` past the entry's first.
fn entry_job(
    spec: &JobEntry,
    devices: &BTreeMap<String, Device>,
    shift_sectors: u64,
    len_sectors: u64,
    flags: Flags,
) -> Job {
    let targets = spec
        .targets
        .iter()
        .map(|t| Region::new(devices[t].clone(), spec.target_start_sector + shift_sectors, len_sectors))
        .collect();
    match (&spec.kind, &spec.source) {
        (EntryKind::Copy, Some(source)) => Job::copy(
            Region::new(devices[source].clone(), spec.source_start_sector + shift_sectors, len_sectors),
            targets,
            flags,
        ),
        _ => Job::zero(targets, flags),
    }
}

fn record_outcome(result: &mut EntryResult, index: u64, outcome: &Outcome, latency_us: u64, done_us: u64) {
    let report = &mut result.report;
    report.jobs += 1;
    report.last_complete_s = report.last_complete_s.max(done_us as f64 / 1e6);
    result.latencies.record(latency_us.clamp(1, LATENCY_US_MAX)).expect("latency within the histogram's bounds");
    if outcome.is_ok() {
        report.ok += 1;
        return;
    }
    result.failures.insert(
        index,
        JobFailures {
            read_failed: outcome.read_failed.clone(),
            write_failed: outcome.targets.iter().map(|t| t.write_failed.clone()).collect(),
            not_copied: outcome.targets.iter().map(|t| t.not_copied.clone()).collect(),
            ran_to_end: !outcome.cancelled && outcome.panicked.is_none(),
        },
    );
    if outcome.read_err {
        report.jobs_with_read_errors += 1;
    }
    report.read_failed_sectors += outcome.read_failed.len_sectors();
    for (target, summary) in outcome.targets.iter().zip(report.targets.iter_mut()) {
        summary.write_failed_sectors += target.write_failed.len_sectors();
        summary.not_copied_sectors += target.not_copied.len_sectors();
    }
    for bit in outcome.write_err.iter() {
        if let Some(summary) = report.targets.get_mut(bit) {
            summary.jobs_with_write_errors += 1;
        }
    }
    if report.failures.len() < FAILURES_LISTED {
        let mut line = format!("job {index}:");
        if outcome.read_err {
            line += &format!(" read error ({} sectors unreadable)", outcome.read_failed.len_sectors());
        }
        for bit in outcome.write_err.iter() {
            line += &format!(" write error on target {bit}");
        }
        if outcome.cancelled {
            line += " cancelled";
        }
        if let Some(message) = &outcome.panicked {
            line += &format!(" panicked: {message}");
        }
        report.failures.push(line);
    }
}

/// The foreground workload until `end_us` (or, without it, until the jobs are done).
async fn run_foreground(
    scenario: Scenario,
    disk: Arc<MemDisk>,
    origin: Instant,
    end_us: Option<u64>,
    jobs_done: Rc<Cell<bool>>,
) -> ForegroundResult {
    let spec = scenario.foreground.clone().expect("a foreground");
    let (region_start, region_len) = scenario.foreground_region(&spec).expect("validated");
    let io_sectors = spec.io_size_bytes / SECTOR_SIZE as u64;
    let pages_per_io = (spec.io_size_bytes as usize).div_ceil(kcopyd_core::PAGE_SIZE);
    let pool = PagePool::with_huge_pages(pages_per_io * spec.queue_depth as usize, false)
        .expect("a small page arena for the foreground");
    let slots = Arc::new(Semaphore::new(spec.queue_depth as usize));
    let seed = mix64(scenario.seed ^ name_hash("foreground"));
    let state = Rc::new(RefCell::new(ForegroundResult {
        latencies: histogram(),
        latency_series: Series::default(),
        count_series: Series::default(),
        end_us: 0,
    }));
    let positions = region_len / io_sectors;
    let stop = {
        let jobs_done = jobs_done.clone();
        move || match end_us {
            Some(end) => model_us_since(origin) >= end,
            None => jobs_done.get(),
        }
    };
    let mut tasks = Vec::new();
    for n in 0u64.. {
        // Open loop: request n is due at n / rate; closed loop: as soon as a slot is free.
        if let Some(due_us) = n.saturating_mul(1_000_000).checked_div(spec.rate_per_s) {
            if end_us.is_some_and(|end| due_us >= end) {
                break;
            }
            tokio::time::sleep_until(origin + to_tokio(Duration::from_micros(due_us))).await;
        }
        let due_us = model_us_since(origin);
        if stop() {
            break;
        }
        let permit = slots.clone().acquire_owned().await.expect("never closed");
        if spec.rate_per_s == 0 && stop() {
            break;
        }
        let position = match spec.access {
            Access::Random => mix64(seed ^ mix64(n)) % positions,
            Access::Sequential => n % positions,
        };
        let offset = region_start + position * io_sectors;
        let read = mix64(seed ^ mix64(n) ^ 0x7277) % 100 < u64::from(spec.read_percent);
        let (disk, pool, state) = (disk.clone(), pool.clone(), state.clone());
        let len_bytes = spec.io_size_bytes as usize;
        tasks.push(actix_rt::spawn(async move {
            if read {
                let pages = pool.alloc(pages_per_io).await;
                let _ = disk.read(offset, ReadBuf::new(pages, len_bytes)).await;
            } else {
                let _ = disk.write(offset, WriteBuf::zeroes(len_bytes)).await;
            }
            drop(permit);
            state.borrow_mut().record(due_us, model_us_since(origin));
        }));
        // Keep the list short: drop handles of finished requests.
        if tasks.len() > 4 * spec.queue_depth as usize {
            tasks.retain(|t: &actix_rt::task::JoinHandle<()>| !t.is_finished());
        }
    }
    for task in tasks {
        task.await.expect("a foreground request does not panic");
    }
    Rc::try_unwrap(state).ok().expect("every request is done").into_inner()
}

/// Builds the report from the run with jobs and the optional baseline.
fn assemble(scenario: &Scenario, main: RunData, baseline: Option<RunData>, wall: Duration) -> ScenarioReport {
    let mut entries = main.entries;
    let jobs: Vec<JobReport> = entries
        .iter_mut()
        .map(|entry| {
            entry.report.latency = Latencies::of(&entry.latencies);
            list_failed_ranges(entry);
            entry.report.clone()
        })
        .collect();
    let job_bytes: u64 = jobs.iter().fold(0, |sum, j| sum.saturating_add(j.bytes));
    let first_submit_s = jobs.iter().map(|j| j.first_submit_s).reduce(f64::min).unwrap_or(0.0);
    let copy_seconds = main.jobs_end_us as f64 / 1e6;
    let span_s = copy_seconds - first_submit_s;
    let throughput_mb_per_s = if span_s > 0.0 { job_bytes as f64 / span_s / 1e6 } else { 0.0 };
    let all_ok = jobs.iter().all(|j| j.ok == j.jobs && j.verification.agrees());

    let mut probes: Vec<_> = main.disks.iter().map(|(_, observed, _)| observed.hooks().probe().clone()).collect();
    let mut foreground = main.foreground;
    let mut alone = baseline.and_then(|b| b.foreground);
    let end_us = main.end_us.max(1);
    let width_us = align_series(&mut probes, foreground.iter_mut().chain(alone.iter_mut()).collect(), end_us);
    let buckets = (end_us / width_us + 1) as usize;
    let bucket_s = width_us as f64 / 1e6;
    let timeline = timeline(&probes, foreground.as_ref(), alone.as_ref(), buckets, width_us);
    let disks = disk_reports(&main.disks, &probes, main.jobs_end_us.max(1) as f64);
    let foreground_report = scenario.foreground.as_ref().zip(foreground.as_ref()).map(|(spec, f)| {
        let seconds = f.end_us.max(1) as f64 / 1e6;
        ForegroundReport {
            disk: spec.disk.clone(),
            with_jobs: Latencies::of(&f.latencies),
            alone: alone.as_ref().map(|a| Latencies::of(&a.latencies)),
            iops: f.latencies.len() as f64 / seconds,
        }
    });
    ScenarioReport {
        description: scenario.description.clone(),
        seed: scenario.seed,
        copy_seconds,
        virtual_seconds: main.end_us as f64 / 1e6,
        wall_seconds: wall.as_secs_f64(),
        job_bytes,
        throughput_mb_per_s,
        all_ok,
        page_budget: scenario.client.page_budget,
        pages_in_use_max: main.pages_in_use_max,
        jobs,
        disks,
        io_sizes: io_sizes(&probes),
        foreground: foreground_report,
        bucket_s,
        timeline,
    }
}

/// Brings every series to one bucket width, the widest any of them reached (doubled until a
/// run of `end_us` fits in [`BUCKETS_MAX`](super::series::BUCKETS_MAX) buckets); the width.
fn align_series(probes: &mut [super::probe::Probe], foregrounds: Vec<&mut ForegroundResult>, end_us: u64) -> u64 {
    let mut width_us = 1;
    for probe in probes.iter() {
        width_us = width_us.max(probe.in_flight_series.width_us());
        width_us = width_us.max(probe.reads.bytes_series.width_us()).max(probe.writes.bytes_series.width_us());
    }
    for f in &foregrounds {
        width_us = width_us.max(f.latency_series.width_us()).max(f.count_series.width_us());
    }
    while end_us / width_us >= super::series::BUCKETS_MAX as u64 {
        width_us *= 2;
    }
    for probe in probes.iter_mut() {
        probe.in_flight_series.coarsen_to(width_us);
        probe.reads.bytes_series.coarsen_to(width_us);
        probe.writes.bytes_series.coarsen_to(width_us);
    }
    for f in foregrounds {
        f.latency_series.coarsen_to(width_us);
        f.count_series.coarsen_to(width_us);
    }
    width_us
}

/// The run over time: bytes moved, foreground latency (with and without the jobs) and each
/// disk's queue depth, per bucket of `width_us`.
fn timeline(
    probes: &[super::probe::Probe],
    foreground: Option<&ForegroundResult>,
    alone: Option<&ForegroundResult>,
    buckets: usize,
    width_us: u64,
) -> Vec<Sample> {
    let bucket_s = width_us as f64 / 1e6;
    let sum_over = |f: &dyn Fn(&super::probe::Probe) -> Vec<f64>| {
        let mut total = vec![0.0; buckets];
        for probe in probes {
            for (t, v) in total.iter_mut().zip(f(probe)) {
                *t += v;
            }
        }
        total
    };
    let read_bytes = sum_over(&|p| p.reads.bytes_series.sums(buckets));
    let written_bytes = sum_over(&|p| p.writes.bytes_series.sums(buckets));
    let queue_depths: Vec<Vec<f64>> = probes.iter().map(|p| p.in_flight_series.sums(buckets)).collect();
    let mean_of = |f: &ForegroundResult, i: usize| {
        let counts = f.count_series.sums(buckets);
        let sums = f.latency_series.sums(buckets);
        (counts[i] > 0.0).then(|| sums[i] / counts[i] / 1000.0)
    };
    (0..buckets)
        .map(|i| Sample {
            at_s: i as f64 * bucket_s,
            read_bytes_per_s: read_bytes[i] / bucket_s,
            written_bytes_per_s: written_bytes[i] / bucket_s,
            foreground_ms_mean: foreground.and_then(|f| mean_of(f, i)),
            foreground_ms_max: foreground.and_then(|f| {
                let counts = f.count_series.sums(buckets);
                (counts[i] > 0.0).then(|| f.latency_series.maxes(buckets)[i] / 1000.0)
            }),
            foreground_alone_ms_mean: alone.and_then(|f| mean_of(f, i)),
            queue_depth: queue_depths.iter().map(|q| q[i] / width_us as f64).collect(),
        })
        .collect()
}

/// Requests per size over every disk.
fn io_sizes(probes: &[super::probe::Probe]) -> Vec<IoSizeCount> {
    let mut sizes: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    for probe in probes {
        for (size, (reads, writes)) in &probe.sizes {
            let entry = sizes.entry(*size).or_default();
            entry.0 += reads;
            entry.1 += writes;
        }
    }
    sizes.into_iter().map(|(size_bytes, (reads, writes))| IoSizeCount { size_bytes, reads, writes }).collect()
}

/// Each disk's requests, bytes, latency, busy share and queue depth over the jobs' `jobs_us`.
fn disk_reports(
    disks: &[(String, Arc<Observed>, Arc<MemDisk>)],
    probes: &[super::probe::Probe],
    jobs_us: f64,
) -> Vec<DiskReport> {
    let mean_ms = |total_us: u64, count: u64| if count == 0 { 0.0 } else { total_us as f64 / count as f64 / 1000.0 };
    disks
        .iter()
        .zip(probes)
        .map(|((name, _, disk), probe)| DiskReport {
            disk: name.clone(),
            reads: probe.reads.requests,
            read_bytes: probe.reads.bytes,
            read_latency_ms_mean: mean_ms(probe.reads.latency_us_total, probe.reads.requests),
            writes: probe.writes.requests,
            written_bytes: probe.writes.bytes,
            write_latency_ms_mean: mean_ms(probe.writes.latency_us_total, probe.writes.requests),
            busy_percent: probe.busy_us as f64 / jobs_us * 100.0,
            // `+ 0.0`: a sum of nothing is -0.0.
            queue_depth_mean: probe.in_flight_series.sums(0).iter().sum::<f64>() / jobs_us + 0.0,
            queue_depth_max: probe.in_flight_max,
            errors: disk.stats().errors,
        })
        .collect()
}

/// Lists the first failed ranges of an entry's jobs in its report.
fn list_failed_ranges(entry: &mut EntryResult) {
    let listed = |set: &RangeSet| set.ranges().iter().take(RANGES_LISTED).map(|r| [r.start, r.end]).collect();
    let mut read_failed = RangeSet::new();
    for failures in entry.failures.values() {
        read_failed.extend(&failures.read_failed);
    }
    entry.report.read_failed_ranges = listed(&read_failed);
    for (t, target) in entry.report.targets.iter_mut().enumerate() {
        let mut write_failed = RangeSet::new();
        for failures in entry.failures.values() {
            if let Some(failed) = failures.write_failed.get(t) {
                write_failed.extend(failed);
            }
        }
        target.write_failed_ranges = listed(&write_failed);
    }
}
