//! `copy`, `zero` and `verify`: check, run the job with progress, flush, report.

use std::cell::Cell;

use futures_util::future::join_all;
use kcopyd_core::{
    Client, Device, Flags, Job, JobHandle, Outcome, PagePool, RangeSet, Region, SECTOR_SIZE, Sparse, TargetZeroes,
};

use crate::cli::{CopyArgs, EngineArgs, OutputArgs, VerifyArgs, ZeroArgs};
use crate::clock::Instant;
use crate::compare::{self, CompareShape, Comparison, Side};
use crate::devices;
use crate::error::{CliError, Status};
use crate::out;
use crate::progress::{self, Interrupts, Phase};
use crate::report::{self, Report, SourceReport, TargetReport, TargetVerify, VerifyReport};
use crate::size::Bytes;
use kcopyd_tool::map::{self, CopyMap};
use kcopyd_tool::{Opened, Settings, Tail, TailError};
use std::future::Future;

/// What a command hands back to `main`: its report and exit status.
#[derive(Debug)]
pub struct Done {
    /// The report.
    pub report: Report,
    /// The exit status.
    pub status: Status,
}

fn flags(ignore_errors: bool, write_seq: bool) -> Flags {
    let mut flags = Flags::empty();
    if ignore_errors {
        flags |= Flags::IGNORE_ERROR;
    }
    if write_seq {
        flags |= Flags::WRITE_SEQ;
    }
    flags
}

fn region(opened: &Opened, len_sectors: u64) -> Region {
    Region::new(opened.device.clone(), opened.start_sector(), len_sectors)
}

fn side(opened: &Opened) -> Side {
    Side {
        device: opened.device.clone(),
        start_sector: opened.start_sector(),
        zero_before_read: kcopyd_tool::plan::is_headers_only(&opened.arg),
    }
}

/// Warns when the source lies on a device mounted read-write.
fn warn_mounted(source: &Opened, len_bytes: u64, output: &OutputArgs) {
    if let Some(warning) = source.mounted_warning(len_bytes) {
        if !output.quiet {
            out::note(&format!("kcopyd: warning: {warning}"));
        }
    }
}

/// Starts a client with the checked settings: on its own worker thread, or on this thread's
/// actix System when the command runs in virtual time.
fn start_client(settings: &Settings) -> Result<Client, CliError> {
    let config = settings.config.clone();
    let started =
        if kcopyd_sim::in_virtual_time() { Client::start_in_current_system(config) } else { Client::new(config) };
    started.map_err(|source| CliError::Config { option: "--memory", source })
}

/// What every phase of a command needs to know about its options.
#[derive(Debug, Clone, Copy)]
struct Context<'a> {
    settings: &'a Settings,
    engine: &'a EngineArgs,
    output: &'a OutputArgs,
}

/// The result of the job phase shared by `copy` and `zero`.
struct JobRun {
    outcome: Outcome,
    interrupted: Option<u8>,
    done_bytes: u64,
    /// `copy --map`: bytes the map held as done (or, with --retry-failed, not to retry) when
    /// this run started.
    before_bytes: u64,
    seconds: f64,
    flush_errors: Vec<Option<String>>,
    stats: kcopyd_core::ClientStats,
}

/// A job as the command shows it.
#[derive(Debug, Clone, Copy)]
struct Shown {
    /// `copy` or `zero`.
    label: &'static str,
    /// Bytes in the range.
    len_bytes: u64,
    /// Where the source's range starts (0 without a source).
    source_start: u64,
}

/// Submits `job`, shows progress, waits (cancelling on Ctrl-C), then flushes every target.
async fn run_job(
    context: Context<'_>,
    job: Job,
    targets: &[Opened],
    shown: Shown,
    interrupts: &mut Interrupts,
    created: &mut kcopyd_tool::CreatedFiles,
) -> Result<JobRun, CliError> {
    let Shown { label, len_bytes, source_start } = shown;
    let client = start_client(context.settings)?;
    let started = Instant::now();
    // From here a signal cancels the job (at once if it came before the job started).
    interrupts.set_phase(Phase::Graceful);
    let handle = client.submit(job).await.map_err(|source| CliError::Submit { source })?;
    created.keep();
    job_started(interrupts, &handle, 0, len_bytes, label);
    let bar = progress::byte_bar(progress::bars_wanted(context.output.quiet), len_bytes, label);
    let watched = progress::watch(&handle, &bar, interrupts).await;
    bar.finish_and_clear();
    // Whatever was written is made durable, also after errors or a cancellation.
    let flushes = join_all(targets.iter().map(|t| t.device.flush())).await;
    let seconds = started.elapsed().as_secs_f64();
    let stats = client.stats();
    client.shutdown().await;
    // A signal during the flush: the job is done, the command still ends as asked.
    let interrupted = watched.interrupted.or_else(|| interrupts.take_pending());
    let done_bytes = moved_bytes(&handle, &watched.outcome, source_start, targets.first().map(Opened::start_sector));
    Ok(JobRun {
        outcome: watched.outcome,
        interrupted,
        done_bytes,
        before_bytes: 0,
        seconds,
        flush_errors: flushes.into_iter().map(|r| r.err().map(|e| e.to_string())).collect(),
        stats,
    })
}

/// A job has started (a signal now cancels it: [`Phase::Graceful`]): a second signal quits at
/// once saying how far it got (`base_bytes` done before this job).
fn job_started(interrupts: &Interrupts, handle: &JobHandle, base_bytes: u64, len_bytes: u64, label: &'static str) {
    let handle = handle.clone();
    interrupts.set_summary(Some(Box::new(move || {
        let done = base_bytes + handle.progress().done_sectors * SECTOR_SIZE as u64;
        format!(
            "kcopyd: interrupted again: quit at once: {label} reached {} of {}; the I/O in flight was not \
             waited for and the targets were not flushed",
            Bytes(done.min(len_bytes)),
            Bytes(len_bytes)
        )
    })));
}

/// Bytes the job moved: its sectors less those it gave up on without trying (a cancel, or an
/// error without --ignore-errors, skips the sub-jobs not started; the engine's progress counts
/// some of those as finished). Failed blocks count: they were tried.
///
/// Worked example: 64 MiB cancelled after 5 MiB, with 4 MiB of sub-jobs waiting for the
/// throttle when it came: the progress says 9 MiB finished; the first target's not_copied
/// holds the other 59 MiB, none of it failed: 5 MiB.
fn moved_bytes(handle: &JobHandle, outcome: &Outcome, source_start: u64, first_target_start: Option<u64>) -> u64 {
    let progress = handle.progress();
    let given_up = match (first_target_start, outcome.targets.first()) {
        (Some(target_start), Some(report)) => {
            // In the first target's sectors: read_failed is in the source's.
            let read_failed = outcome.read_failed.shifted(source_start, target_start).unwrap_or_default();
            report.not_copied.difference(&report.write_failed).difference(&read_failed).len_sectors()
        }
        _ => 0,
    };
    progress.total_sectors.saturating_sub(given_up).min(progress.done_sectors) * SECTOR_SIZE as u64
}

/// A copy run in batches recorded in a map.
struct Mapped<'a> {
    map: &'a mut CopyMap,
    len_sectors: u64,
    batch_sectors: u64,
    flags: Flags,
    sparse: Sparse,
    retry_failed: bool,
}

/// A progress bar that starts at `base` bytes (the jobs before this one, and what the map
/// already had done).
struct OffsetBar<'a> {
    bar: &'a indicatif::ProgressBar,
    base: u64,
}

impl progress::WatchUi for OffsetBar<'_> {
    fn tick(&self, done_bytes: u64) {
        self.bar.set_position(self.base + done_bytes);
    }

    fn note(&self, line: &str) {
        self.bar.suspend(|| out::note(line));
    }
}

/// What the jobs of a mapped copy came to so far.
struct MappedRun {
    outcome: Outcome,
    interrupted: Option<u8>,
    done_bytes: u64,
    flush_errors: Vec<Option<String>>,
}

impl MappedRun {
    /// Adds a job's outcome; returns whether the copy stops after it.
    fn add(&mut self, job: &Outcome, flags: Flags) -> bool {
        let outcome = &mut self.outcome;
        outcome.read_err |= job.read_err;
        for index in job.write_err.iter() {
            outcome.write_err.set(index);
        }
        outcome.read_failed.extend(&job.read_failed);
        for (merged, report) in outcome.targets.iter_mut().zip(&job.targets) {
            merged.write_failed.extend(&report.write_failed);
        }
        outcome.cancelled |= job.cancelled;
        outcome.panicked = outcome.panicked.take().or(job.panicked.clone());
        let stop = !job.is_ok() && !flags.contains(Flags::IGNORE_ERROR);
        self.interrupted.is_some() || stop || job.cancelled || job.panicked.is_some()
    }
}

/// Runs one batch of a mapped copy: its jobs one after another, then one flush and one map
/// append. Returns whether the copy stops after it.
async fn run_batch(
    client: &Client,
    (mapped, batch): (&mut Mapped<'_>, &[std::ops::Range<u64>]),
    (source, devices): (&Opened, &[(Device, u64)]),
    (bar, interrupts, created): (&indicatif::ProgressBar, &mut Interrupts, &mut kcopyd_tool::CreatedFiles),
    run: &mut MappedRun,
) -> Result<bool, CliError> {
    let mut jobs = Vec::with_capacity(batch.len());
    let mut stop = false;
    for range in batch {
        let job = map::batch_job(range, (&source.device, source.start_sector()), devices, mapped.flags, mapped.sparse);
        let handle = client.submit(job).await.map_err(|source| CliError::Submit { source })?;
        created.keep();
        mapped.map.keep();
        job_started(interrupts, &handle, bar.position(), bar.length().unwrap_or(0), "copy");
        let ui = OffsetBar { bar, base: bar.position() };
        let watched = progress::watch(&handle, &ui, interrupts).await;
        let first_target_start = devices.first().map(|(_, start)| *start);
        run.done_bytes += moved_bytes(&handle, &watched.outcome, source.start_sector(), first_target_start);
        run.interrupted = run.interrupted.or(watched.interrupted);
        stop = run.add(&watched.outcome, mapped.flags);
        jobs.push((range.clone(), watched.outcome));
        if stop {
            break;
        }
    }
    // Durable on every target before the map says so.
    let flushes = map::finish_batch(mapped.map, &jobs, source.start_sector(), devices).await?;
    let flushed = flushes.iter().all(Option::is_none);
    for (slot, error) in run.flush_errors.iter_mut().zip(flushes) {
        if let Some(error) = error {
            *slot = Some(error.to_string());
        }
    }
    Ok(stop || !flushed)
}

/// `copy --map`: copies what the map says is not done (or, with --retry-failed, what failed)
/// in batches of jobs; after each batch flushes the targets, then records the batch in the
/// map. Stops at the first job with errors unless errors are ignored, and at Ctrl-C.
async fn run_mapped(
    context: Context<'_>,
    mut mapped: Mapped<'_>,
    source: &Opened,
    targets: &[Opened],
    len_bytes: u64,
    interrupts: &mut Interrupts,
    created: &mut kcopyd_tool::CreatedFiles,
) -> Result<JobRun, CliError> {
    let failed = mapped.map.state.failed();
    let work = if mapped.retry_failed { failed.clone() } else { mapped.map.state.remaining(mapped.len_sectors) };
    let client = start_client(context.settings)?;
    let started = Instant::now();
    let bar = progress::byte_bar(progress::bars_wanted(context.output.quiet), len_bytes, "copy");
    let before_bytes = len_bytes.saturating_sub(work.len_sectors() * SECTOR_SIZE as u64);
    bar.set_position(before_bytes);
    let devices: Vec<(Device, u64)> = targets.iter().map(|t| (t.device.clone(), t.start_sector())).collect();
    interrupts.set_phase(Phase::Graceful);
    let mut run = MappedRun {
        outcome: Outcome::default(),
        interrupted: None,
        done_bytes: 0,
        flush_errors: vec![None; targets.len()],
    };
    run.outcome.targets = vec![Default::default(); targets.len()];
    for batch in map::batches(&work, &failed, mapped.batch_sectors) {
        let ui = (&bar, &mut *interrupts, &mut *created);
        if run_batch(&client, (&mut mapped, &batch), (source, &devices), ui, &mut run).await? {
            break;
        }
    }
    // The run went through, also with nothing to copy: what it created stays.
    created.keep();
    mapped.map.keep();
    bar.finish_and_clear();
    // Whatever the map does not hold as done is not copied, on every target.
    let not_done: RangeSet = map::complement(&mapped.map.state.done.to_range_set(), mapped.len_sectors).collect();
    for (report, target) in run.outcome.targets.iter_mut().zip(targets) {
        report.not_copied = not_done.shifted(0, target.start_sector()).expect("the copy lies inside every target");
    }
    let seconds = started.elapsed().as_secs_f64();
    let stats = client.stats();
    client.shutdown().await;
    let MappedRun { outcome, interrupted, done_bytes, flush_errors } = run;
    Ok(JobRun { outcome, interrupted, done_bytes, before_bytes, seconds, flush_errors, stats })
}

/// Opens the map of `copy --map`, checked against the devices opened now, with the batch
/// size in sectors. `created[i]`: target `i` was created by this run.
///
/// # Errors
/// A batch smaller than one logical block, or a map that cannot be used (see
/// [`CopyMap::open`]); a map created here is removed again.
fn open_map(
    path: &std::path::Path,
    args: &CopyArgs,
    plan: &kcopyd_tool::Plan,
    created: &[bool],
) -> Result<(CopyMap, u64), CliError> {
    let block_bytes = std::iter::once(&plan.source).chain(&plan.targets).map(Opened::block_bytes).max().unwrap_or(512);
    let batch_bytes = args.map_batch_bytes / block_bytes * block_bytes;
    if batch_bytes == 0 {
        return Err(CliError::argument(
            "--map-batch",
            args.map_batch_bytes.to_string(),
            format!("smaller than one {block_bytes}-byte logical block"),
        ));
    }
    let (header, guard) = map::header_of(&plan.source, &plan.targets, plan.len_bytes, created)?;
    let map = CopyMap::open(path, &header, &guard)?;
    if args.retry_failed && map.state.failed().is_empty() && !args.output.quiet {
        out::note(&format!(
            "kcopyd: --retry-failed: the map '{}' records nothing failed: nothing to retry",
            path.display()
        ));
    }
    Ok((map, batch_bytes / SECTOR_SIZE as u64))
}

/// `copy --map FILE --retry-failed` before there is a map (no FILE, or an empty one): nothing
/// failed, so nothing is opened, created or written. Returns the report of that, if so.
fn nothing_to_retry(args: &CopyArgs) -> Option<Done> {
    let path = args.map.as_ref().filter(|_| args.retry_failed)?;
    match std::fs::metadata(path) {
        Ok(metadata) if metadata.len() > 0 => return None,
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return None,
        _ => {}
    }
    if !args.output.quiet {
        out::note(&format!(
            "kcopyd: --retry-failed: no map '{}' yet, so nothing failed: nothing to retry",
            path.display()
        ));
    }
    let report = Report {
        command: "copy",
        status: "ok",
        exit_code: Status::Success.code(),
        bytes: 0,
        bytes_total: 0,
        bytes_copied: Some(0),
        bytes_not_copied: Some(0),
        seconds: 0.0,
        throughput_bytes_per_s: 0.0,
        bytes_done_before: None,
        cancelled: false,
        read_errors_recovered: false,
        panicked: None,
        source: None,
        targets: Vec::new(),
        verify: None,
        stats: None,
        wall_seconds: None,
    };
    Some(Done { report, status: Status::Success })
}

/// Per target argument: whether it names a file that does not exist (and that a copy would
/// create).
fn missing_targets(targets: &[kcopyd_tool::DeviceAddress]) -> Vec<bool> {
    targets
        .iter()
        .map(|arg| match &arg.backend {
            kcopyd_tool::Backend::Path(path) => {
                matches!(std::fs::symlink_metadata(path), Err(e) if e.kind() == std::io::ErrorKind::NotFound)
            }
            _ => false,
        })
        .collect()
}

/// What a comparison needs, made before anything is written so that it cannot refuse
/// afterwards: its shape within the budget and its pages.
struct CompareSetup {
    shape: CompareShape,
    pool: PagePool,
}

/// Fits the comparison of `source` with `targets` into the budget and reserves its pages.
///
/// # Errors
/// One block does not fit in the budget, or the pages cannot be reserved.
fn prepare_compare(context: Context<'_>, source: &Opened, targets: &[Opened]) -> Result<CompareSetup, CliError> {
    let Context { settings, engine, .. } = context;
    let devices = targets.len() + 1;
    let block_bytes = std::iter::once(source).chain(targets).map(Opened::block_bytes).max().unwrap_or(512);
    let shape = CompareShape::fit(
        settings.config.page_budget,
        devices,
        block_bytes,
        settings.config.sub_job_size_bytes as u64,
        settings.config.subjobs_in_flight,
    )
    .map_err(|problem| CliError::argument("--memory", engine.memory_bytes.to_string(), problem))?;
    let pool =
        PagePool::with_huge_pages(settings.config.page_budget, settings.config.huge_pages).map_err(|source| {
            CliError::Config {
                option: "--memory",
                source: kcopyd_core::ConfigError::Arena { pages: settings.config.page_budget, source },
            }
        })?;
    Ok(CompareSetup { shape, pool })
}

/// Compares, with a bar, stopping at a signal. Returns the comparison (partial when
/// interrupted), the bytes compared, the seconds and the signal's exit code.
async fn run_compare(
    context: Context<'_>,
    setup: &CompareSetup,
    source: &Opened,
    targets: &[Opened],
    (len_bytes, tail): (u64, Tail),
    skip: Option<&[RangeSet]>,
    interrupts: &mut Interrupts,
) -> (Comparison, u64, f64, Option<u8>) {
    let bar = progress::byte_bar(progress::bars_wanted(context.output.quiet), len_bytes, "verify");
    let compared = Cell::new(0u64);
    let on_chunk = |bytes: u64| {
        compared.set(compared.get() + bytes);
        bar.set_position(compared.get());
    };
    let sides: Vec<Side> = targets.iter().map(side).collect();
    let started = Instant::now();
    let len_sectors = tail.offset_in_range_bytes / SECTOR_SIZE as u64;
    let source_side = side(source);
    // A signal (now, or one that came during the copy's flush) stops it between chunks; what
    // the chunks compared so far found is kept.
    interrupts.set_phase(Phase::Graceful);
    interrupts.set_summary(Some(Box::new(|| {
        "kcopyd: interrupted again: quit at once during the comparison (nothing is written by it)".to_owned()
    })));
    let stop = interrupts.stop_flag();
    let mut comparison =
        compare::compare(&source_side, &sides, len_sectors, skip, setup.shape, &setup.pool, &on_chunk, stop).await;
    let mut interrupted = interrupts.take_pending();
    if interrupted.is_none() && !tail.is_empty() {
        interrupted = compare_tail(source, targets, tail, skip, &mut comparison, interrupts).await;
        if interrupted.is_none() {
            on_chunk(tail.len_bytes);
        }
    }
    bar.finish_and_clear();
    (comparison, compared.get(), started.elapsed().as_secs_f64(), interrupted)
}

/// How a tail's read or write ended when it did not: a signal's exit code, or an I/O error.
enum TailStop {
    Interrupted(u8),
    Io,
}

/// Awaits a tail's `work`, whose token `cancel` the first signal cancels (at once if one is
/// pending).
async fn signalled<T>(
    interrupts: &mut Interrupts,
    cancel: &kcopyd_tool::Cancel,
    work: impl Future<Output = Result<T, TailError>>,
) -> Result<T, TailStop> {
    if let Some(code) = interrupts.take_pending() {
        return Err(TailStop::Interrupted(code));
    }
    tokio::pin!(work);
    let code = tokio::select! {
        done = &mut work => return done.map_err(|_| TailStop::Io),
        code = interrupts.recv() => code,
    };
    cancel.cancel();
    let _ = work.await;
    Err(TailStop::Interrupted(code))
}

async fn read_tail(interrupts: &mut Interrupts, tail: Tail, opened: &Opened) -> Result<Vec<u8>, TailStop> {
    let cancel = kcopyd_tool::Cancel::new();
    signalled(interrupts, &cancel, tail.read(opened, &cancel)).await
}

async fn write_tail(interrupts: &mut Interrupts, tail: Tail, opened: &Opened, bytes: &[u8]) -> Result<(), TailStop> {
    let cancel = kcopyd_tool::Cancel::new();
    signalled(interrupts, &cancel, tail.write(opened, bytes, &cancel)).await
}

/// Compares the tail of the range (files, NBD exports): a differing tail counts as one
/// differing block, its sectors those the tail touches. A signal stops it (returned): the
/// targets not compared yet are left as they are.
async fn compare_tail(
    source: &Opened,
    targets: &[Opened],
    tail: Tail,
    skip: Option<&[RangeSet]>,
    found: &mut Comparison,
    interrupts: &mut Interrupts,
) -> Option<u8> {
    let sectors = tail.range_sectors();
    let expected = match read_tail(interrupts, tail, source).await {
        Ok(bytes) => bytes,
        Err(TailStop::Interrupted(code)) => return Some(code),
        Err(TailStop::Io) => {
            found.source_unreadable.insert(sectors);
            return None;
        }
    };
    for (index, (target, diff)) in targets.iter().zip(&mut found.targets).enumerate() {
        if skip.is_some_and(|skip| skip[index].intersects(&sectors)) {
            continue;
        }
        match read_tail(interrupts, tail, target).await {
            Ok(bytes) if bytes == expected => {}
            Ok(_) => {
                diff.differing_blocks += 1;
                diff.differing.insert(sectors.clone());
            }
            Err(TailStop::Interrupted(code)) => return Some(code),
            Err(TailStop::Io) => diff.unreadable.insert(sectors.clone()),
        }
    }
    None
}

/// After a copy or zero job, writes the tail of the range (regular files) with `bytes` read
/// from the source (`None`: zeroes), if the job went on to its end: finished, or failed with
/// `--ignore-errors`. Otherwise, or where it fails, the tail is reported as the job reports
/// blocks: read failed, write failed, not copied. A signal during it (an NBD export's request
/// abandoned) stops it: the tail is not copied where it was not written, and the run is
/// interrupted.
async fn finish_tail(
    tail: Tail,
    source: Option<&Opened>,
    targets: &[Opened],
    keep_going: bool,
    run: &mut JobRun,
    interrupts: &mut Interrupts,
) {
    if tail.is_empty() {
        return;
    }
    let outcome = &mut run.outcome;
    let went_on = run.interrupted.is_none()
        && !outcome.cancelled
        && outcome.panicked.is_none()
        && (keep_going || job_ok(outcome));
    let mut bytes = match (went_on, source) {
        (false, _) => None,
        (true, None) => Some(vec![0; tail.len_bytes as usize]),
        (true, Some(source)) => match read_tail(interrupts, tail, source).await {
            Ok(bytes) => Some(bytes),
            Err(TailStop::Interrupted(code)) => {
                run.interrupted = Some(code);
                None
            }
            Err(TailStop::Io) => {
                outcome.read_err = true;
                outcome.read_failed.insert(tail.sectors(source));
                None
            }
        },
    };
    let mut written = 0;
    for (target, report) in targets.iter().zip(&mut outcome.targets) {
        let sectors = tail.sectors(target);
        match &bytes {
            Some(data) => match write_tail(interrupts, tail, target, data).await {
                Ok(()) => written += 1,
                Err(TailStop::Interrupted(code)) => {
                    // Written or not, it was not made sure of: the rest is not started.
                    run.interrupted = Some(code);
                    report.not_copied.insert(sectors);
                    bytes = None;
                }
                Err(TailStop::Io) => {
                    report.write_failed.insert(sectors.clone());
                    report.not_copied.insert(sectors);
                }
            },
            None => report.not_copied.insert(sectors),
        }
    }
    if written == targets.len() {
        run.done_bytes += tail.len_bytes;
    }
}

fn target_status(target: &TargetReport) -> &'static str {
    let nonempty = |ranges: &Option<Vec<[u64; 2]>>| ranges.as_ref().is_some_and(|r| !r.is_empty());
    if target.flush_error.is_some() {
        "flush_failed"
    } else if nonempty(&target.write_failed_sectors) {
        "write_errors"
    } else if nonempty(&target.not_copied_sectors) {
        "incomplete"
    } else {
        match &target.verify {
            // A comparison stopped by a signal says so in its own status; the copy is whole.
            Some(TargetVerify { status, .. }) if *status != "identical" && *status != "incomplete" => status,
            _ => "ok",
        }
    }
}

/// A target's `not_copied` (target-device sectors) relative to the start of its region.
fn not_copied_in_region(target: &Opened, outcome: &kcopyd_core::TargetReport) -> RangeSet {
    outcome.not_copied.shifted(target.start_sector(), 0).expect("not_copied lies inside the target region")
}

/// Bytes of the range that at least one target does not hold. A target whose final flush
/// failed holds nothing for sure: all of its range counts.
fn not_copied_bytes(opened: &[Opened], run: &JobRun, len_bytes: u64) -> u64 {
    let mut union = RangeSet::new();
    for ((target, outcome), flush_error) in opened.iter().zip(&run.outcome.targets).zip(&run.flush_errors) {
        if flush_error.is_some() {
            return len_bytes;
        }
        union.extend(&not_copied_in_region(target, outcome));
    }
    report::range_bytes(&union, len_bytes)
}

/// Whether the job copied everything: as [`Outcome::is_ok`], except that a read error that
/// narrowing recovered from (every block read on retry, nothing unreadable) is no error.
fn job_ok(outcome: &Outcome) -> bool {
    outcome.read_failed.is_empty()
        && outcome.write_err.is_empty()
        && !outcome.cancelled
        && outcome.panicked.is_none()
        && outcome.targets.iter().all(|t| t.not_copied.is_empty())
}

/// A read failed and was retried in smaller reads that all succeeded: nothing is missing.
fn read_errors_recovered(outcome: &Outcome) -> bool {
    outcome.read_err && outcome.read_failed.is_empty()
}

fn job_targets(opened: &[Opened], run: &JobRun, len_bytes: u64) -> Vec<TargetReport> {
    opened
        .iter()
        .zip(&run.outcome.targets)
        .zip(&run.flush_errors)
        .map(|((target, outcome), flush_error)| TargetReport {
            device: target.arg.text.clone(),
            offset_bytes: target.arg.offset_bytes,
            status: "ok",
            write_failed_sectors: Some(report::pairs(&outcome.write_failed)),
            not_copied_sectors: Some(report::pairs(&outcome.not_copied)),
            bytes_not_copied: Some(report::range_bytes(&not_copied_in_region(target, outcome), len_bytes)),
            flush_error: flush_error.clone(),
            verify: None,
        })
        .collect()
}

/// The headline status of a finished job and its exit status.
fn job_status(run: &JobRun, targets: &[TargetReport], verify_identical: Option<bool>) -> (&'static str, Status) {
    if let Some(code) = run.interrupted {
        return ("cancelled", Status::Interrupted(code));
    }
    if !job_ok(&run.outcome) || targets.iter().any(|t| t.flush_error.is_some()) {
        return ("errors", Status::Failed);
    }
    if verify_identical == Some(false) {
        return ("differences", Status::Failed);
    }
    ("ok", Status::Success)
}

/// A target's comparison, marked `incomplete` where a signal stopped it before it found
/// anything: what it found is reported, whatever it did not reach is not called identical.
fn partial_verify(mut verify: TargetVerify, interrupted: Option<u8>) -> TargetVerify {
    if interrupted.is_some() && verify.status == "identical" {
        verify.status = "incomplete";
    }
    verify
}

/// `verify`'s per-target reports, from what the comparison found (so far, if a signal stopped
/// it).
fn verify_targets(targets: &[Opened], comparison: &Comparison, interrupted: Option<u8>) -> Vec<TargetReport> {
    targets
        .iter()
        .enumerate()
        .map(|(index, target)| {
            let verify = comparison
                .targets
                .get(index)
                .map(|diff| partial_verify(report::target_verify(diff, target.start_sector()), interrupted));
            TargetReport {
                device: target.arg.text.clone(),
                offset_bytes: target.arg.offset_bytes,
                status: verify.as_ref().map_or("incomplete", |v| v.status),
                write_failed_sectors: None,
                not_copied_sectors: None,
                bytes_not_copied: None,
                flush_error: None,
                verify,
            }
        })
        .collect()
}

/// `copy --verify`: reads the targets back and compares them with the source, leaving out
/// what the copy reported as not copied; fills each target's `verify`. Returns the summary and
/// the signal that stopped the comparison, if one did.
async fn verify_copy(
    context: Context<'_>,
    setup: &CompareSetup,
    plan: &kcopyd_tool::Plan,
    run: &JobRun,
    targets: &mut [TargetReport],
    interrupts: &mut Interrupts,
) -> (VerifyReport, Option<u8>) {
    // Leave out what the copy itself reported as not copied: those differences are known.
    let skip: Vec<RangeSet> = plan
        .targets
        .iter()
        .zip(&run.outcome.targets)
        .map(|(target, outcome)| not_copied_in_region(target, outcome))
        .collect();
    let range = (plan.len_bytes, plan.tail);
    let (mut comparison, bytes, seconds, signal) =
        run_compare(context, setup, &plan.source, &plan.targets, range, Some(&skip), interrupts).await;
    // The source's unreadable blocks were reported by the copy already.
    let read_failed = run
        .outcome
        .read_failed
        .shifted(plan.source.start_sector(), 0)
        .expect("read_failed lies inside the source region");
    comparison.source_unreadable = comparison.source_unreadable.difference(&read_failed);
    for ((target, opened), diff) in targets.iter_mut().zip(&plan.targets).zip(&comparison.targets) {
        target.verify = Some(partial_verify(report::target_verify(diff, opened.start_sector()), signal));
    }
    let mut skipped = RangeSet::new();
    for set in &skip {
        skipped.extend(set);
    }
    let mut summary = report::verify_report(&comparison, bytes, report::range_bytes(&skipped, plan.len_bytes), seconds);
    summary.identical &= signal.is_none();
    (summary, signal)
}

/// The sparse-copy options of `copy`, checked.
///
/// # Errors
/// A bad --sparse-size, or --target-is-zero without --sparse.
fn sparse_of(args: &CopyArgs) -> Result<Sparse, CliError> {
    let on = args.sparse && !args.no_sparse;
    if let (false, Some(size)) = (on, args.sparse_size_bytes) {
        return Err(CliError::argument(
            "--sparse-size",
            size.to_string(),
            "sets the zero scan of a sparse copy, and --sparse=off / --no-sparse turns sparse copies off",
        ));
    }
    let size = args.sparse_size_bytes.unwrap_or(crate::cli::SPARSE_SIZE_DEFAULT_BYTES);
    if size != 0 && (!size.is_power_of_two() || size < SECTOR_SIZE as u64 || size > u64::from(u32::MAX / 2 + 1)) {
        return Err(CliError::argument(
            "--sparse-size",
            size.to_string(),
            "must be 0 (no zero scan) or a power of two from 512 to 2G",
        ));
    }
    if args.target_is_zero && !on {
        return Err(CliError::Arguments {
            what: "--target-is-zero",
            problem: "needs a sparse copy, and --sparse=off / --no-sparse turns it off".into(),
        });
    }
    if !on {
        return Ok(Sparse::OFF);
    }
    let target_zeroes = if args.target_is_zero { TargetZeroes::Skip } else { TargetZeroes::Deallocate };
    Ok(Sparse { skip_holes: true, zero_block_bytes: size as u32, target_zeroes })
}

/// `kcopyd copy`.
///
/// # Errors
/// Bad options or devices (nothing written).
pub async fn copy(args: &CopyArgs, interrupts: &mut Interrupts) -> Result<Done, CliError> {
    let sparse = sparse_of(args)?;
    if let Some(done) = nothing_to_retry(args) {
        return Ok(done);
    }
    let missing = missing_targets(&args.targets);
    let devices = std::iter::once(&args.source).chain(&args.targets);
    let settings = devices::with_throttle(devices::settings(&args.engine, devices)?, &args.throttle)?;
    let context = Context { settings: &settings, engine: &args.engine, output: &args.output };
    let mut plan =
        devices::open_plan(&args.source, &args.targets, args.length_bytes, true, &settings, interrupts).await?;
    warn_mounted(&plan.source, plan.len_bytes, &args.output);
    // The whole blocks go through the engine, a partial last block of files after it.
    let len_sectors = plan.tail.offset_in_range_bytes / SECTOR_SIZE as u64;
    let job = Job::copy(
        region(&plan.source, len_sectors),
        plan.targets.iter().map(|t| region(t, len_sectors)).collect(),
        flags(args.ignore_errors, args.write_seq),
    )
    .sparse(sparse);
    // Checked before anything is written: a comparison that cannot run must refuse the command.
    let compare_setup = if args.verify { Some(prepare_compare(context, &plan.source, &plan.targets)?) } else { None };
    let mut run = match &args.map {
        None => {
            let shown = Shown { label: "copy", len_bytes: plan.len_bytes, source_start: plan.source.start_sector() };
            run_job(context, job, &plan.targets, shown, interrupts, &mut plan.created).await?
        }
        Some(path) => {
            let (mut map, batch_sectors) = open_map(path, args, &plan, &missing)?;
            let mapped = Mapped {
                map: &mut map,
                len_sectors,
                batch_sectors,
                flags: flags(args.ignore_errors || args.retry_failed, args.write_seq),
                sparse,
                retry_failed: args.retry_failed,
            };
            run_mapped(context, mapped, &plan.source, &plan.targets, plan.len_bytes, interrupts, &mut plan.created)
                .await?
        }
    };
    finish_tail(plan.tail, Some(&plan.source), &plan.targets, args.ignore_errors, &mut run, interrupts).await;
    let mut targets = job_targets(&plan.targets, &run, plan.len_bytes);
    let not_copied = not_copied_bytes(&plan.targets, &run, plan.len_bytes);
    let mut verify = None;
    let mut interrupted = run.interrupted;
    if let (Some(setup), None) = (&compare_setup, interrupted) {
        let (summary, signal) = verify_copy(context, setup, &plan, &run, &mut targets, interrupts).await;
        (verify, interrupted) = (Some(summary), signal);
    }
    for target in &mut targets {
        target.status = target_status(target);
    }
    let (mut status_name, mut status) = job_status(&run, &targets, verify.as_ref().map(|v| v.identical));
    if let Some(code) = interrupted {
        (status_name, status) = ("cancelled", Status::Interrupted(code));
    }
    let report = Report {
        command: "copy",
        status: status_name,
        exit_code: status.code(),
        bytes: run.done_bytes,
        bytes_total: plan.len_bytes,
        bytes_copied: Some(plan.len_bytes - not_copied),
        bytes_not_copied: Some(not_copied),
        seconds: run.seconds,
        throughput_bytes_per_s: report::throughput(run.done_bytes, run.seconds),
        cancelled: run.outcome.cancelled || interrupted.is_some(),
        panicked: run.outcome.panicked.clone(),
        read_errors_recovered: read_errors_recovered(&run.outcome),
        bytes_done_before: args.map.is_some().then_some(run.before_bytes),
        source: Some(SourceReport {
            device: plan.source.arg.text.clone(),
            offset_bytes: plan.source.arg.offset_bytes,
            read_failed_sectors: report::pairs(&run.outcome.read_failed),
        }),
        targets,
        verify,
        stats: Some(run.stats),
        wall_seconds: None,
    };
    Ok(Done { report, status })
}

/// `kcopyd zero`.
///
/// # Errors
/// Bad options or devices (nothing written).
pub async fn zero(args: &ZeroArgs, interrupts: &mut Interrupts) -> Result<Done, CliError> {
    let settings = devices::with_throttle(devices::settings(&args.engine, &args.targets)?, &args.throttle)?;
    let context = Context { settings: &settings, engine: &args.engine, output: &args.output };
    let plan = devices::open_zero_plan(&args.targets, args.length_bytes, &settings, interrupts).await?;
    let (opened, len_bytes) = (&plan.targets, plan.len_bytes);
    let len_sectors = plan.tail.offset_in_range_bytes / SECTOR_SIZE as u64;
    let job =
        Job::zero(opened.iter().map(|t| region(t, len_sectors)).collect(), flags(args.ignore_errors, args.write_seq));
    let mut nothing_created = kcopyd_tool::CreatedFiles::default();
    let mut run = run_job(
        context,
        job,
        opened,
        Shown { label: "zero", len_bytes, source_start: 0 },
        interrupts,
        &mut nothing_created,
    )
    .await?;
    finish_tail(plan.tail, None, opened, args.ignore_errors, &mut run, interrupts).await;
    let mut targets = job_targets(opened, &run, len_bytes);
    let not_copied = not_copied_bytes(opened, &run, len_bytes);
    for target in &mut targets {
        target.status = target_status(target);
    }
    let (status_name, status) = job_status(&run, &targets, None);
    let report = Report {
        command: "zero",
        status: status_name,
        exit_code: status.code(),
        bytes: run.done_bytes,
        bytes_total: len_bytes,
        bytes_copied: Some(len_bytes - not_copied),
        bytes_not_copied: Some(not_copied),
        seconds: run.seconds,
        throughput_bytes_per_s: report::throughput(run.done_bytes, run.seconds),
        cancelled: run.outcome.cancelled || run.interrupted.is_some(),
        panicked: run.outcome.panicked.clone(),
        read_errors_recovered: false,
        bytes_done_before: None,
        source: None,
        targets,
        verify: None,
        stats: Some(run.stats),
        wall_seconds: None,
    };
    Ok(Done { report, status })
}

/// `kcopyd verify`.
///
/// # Errors
/// Bad options or devices.
pub async fn verify(args: &VerifyArgs, interrupts: &mut Interrupts) -> Result<Done, CliError> {
    let devices = std::iter::once(&args.source).chain(&args.targets);
    let settings = devices::settings(&args.engine, devices)?;
    let context = Context { settings: &settings, engine: &args.engine, output: &args.output };
    let plan = devices::open_plan(&args.source, &args.targets, args.length_bytes, false, &settings, interrupts).await?;
    warn_mounted(&plan.source, plan.len_bytes, &args.output);
    let setup = prepare_compare(context, &plan.source, &plan.targets)?;
    let (comparison, bytes, seconds, interrupted) =
        run_compare(context, &setup, &plan.source, &plan.targets, (plan.len_bytes, plan.tail), None, interrupts).await;
    let (status_name, status) = match interrupted {
        Some(code) => ("cancelled", Status::Interrupted(code)),
        None if comparison.identical() => ("ok", Status::Success),
        None if comparison.targets.iter().all(|t| t.unreadable.is_empty())
            && comparison.source_unreadable.is_empty() =>
        {
            ("differences", Status::Failed)
        }
        None => ("errors", Status::Failed),
    };
    let targets = verify_targets(&plan.targets, &comparison, interrupted);
    let report = Report {
        command: "verify",
        status: status_name,
        exit_code: status.code(),
        bytes,
        bytes_total: plan.len_bytes,
        bytes_copied: None,
        bytes_not_copied: None,
        seconds,
        throughput_bytes_per_s: report::throughput(bytes, seconds),
        cancelled: interrupted.is_some(),
        panicked: None,
        read_errors_recovered: false,
        bytes_done_before: None,
        source: Some(SourceReport {
            device: plan.source.arg.text.clone(),
            offset_bytes: plan.source.arg.offset_bytes,
            read_failed_sectors: report::pairs(
                &comparison
                    .source_unreadable
                    .shifted(0, plan.source.start_sector())
                    .expect("the source region lies inside its device"),
            ),
        }),
        targets,
        verify: Some({
            let mut summary = report::verify_report(&comparison, bytes, 0, seconds);
            summary.identical &= interrupted.is_none();
            summary
        }),
        stats: None,
        wall_seconds: None,
    };
    Ok(Done { report, status })
}
