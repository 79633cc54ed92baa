//! `copy`, `zero` and `verify`: check, run the job with progress, flush, report.

use std::cell::Cell;

use futures_util::future::join_all;
use kcopyd_core::{Client, Device, Flags, Job, Outcome, PagePool, RangeSet, Region, SECTOR_SIZE, Sparse, TargetZeroes};

use crate::cli::{CopyArgs, EngineArgs, OutputArgs, VerifyArgs, ZeroArgs};
use crate::clock::Instant;
use crate::compare::{self, CompareShape, Comparison, Side};
use crate::devices::{self, Opened, Settings};
use crate::error::{CliError, Status};
use crate::map::{self, CopyMap, MapHeader};
use crate::progress::{self, Interrupts};
use crate::report::{self, Report, SourceReport, TargetReport, TargetVerify};
use crate::tail::Tail;

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
        zero_before_read: devices::is_headers_only(&opened.arg),
    }
}

/// Warns when the source lies on a device mounted read-write.
fn warn_mounted(source: &Opened, len_bytes: u64, output: &OutputArgs) {
    if let Some(warning) = source.mounted_warning(len_bytes) {
        if !output.quiet {
            eprintln!("kcopyd: warning: {warning}");
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
    seconds: f64,
    flush_errors: Vec<Option<String>>,
    stats: kcopyd_core::ClientStats,
}

/// Submits `job`, shows progress, waits (cancelling on Ctrl-C), then flushes every target.
async fn run_job(
    context: Context<'_>,
    job: Job,
    targets: &[Opened],
    len_bytes: u64,
    label: &str,
    interrupts: &mut Interrupts,
    created: &mut devices::CreatedFiles,
) -> Result<JobRun, CliError> {
    let client = start_client(context.settings)?;
    let started = Instant::now();
    let handle = client.submit(job).await.map_err(|source| CliError::Submit { source })?;
    created.keep();
    let bar = progress::byte_bar(progress::bars_wanted(context.output.quiet), len_bytes, label);
    let watched = progress::watch(&handle, &bar, interrupts).await;
    bar.finish_and_clear();
    // Whatever was written is made durable, also after errors or a cancellation.
    let flushes = join_all(targets.iter().map(|t| t.device.flush())).await;
    let seconds = started.elapsed().as_secs_f64();
    let stats = client.stats();
    client.shutdown().await;
    Ok(JobRun {
        outcome: watched.outcome,
        interrupted: watched.interrupted,
        done_bytes: handle.progress().done_sectors * SECTOR_SIZE as u64,
        seconds,
        flush_errors: flushes.into_iter().map(|r| r.err().map(|e| e.to_string())).collect(),
        stats,
    })
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

/// A progress bar that starts at `base` bytes (the batches before this one, and what the map
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
        self.bar.suspend(|| eprintln!("{line}"));
    }
}

/// `copy --map`: copies what the map says is not done (or, with --retry-failed, what failed)
/// in batches, one job each; after each batch flushes the targets, then records the batch in
/// the map. Stops at the first batch with errors unless errors are ignored, and at Ctrl-C.
async fn run_mapped(
    context: Context<'_>,
    mapped: Mapped<'_>,
    source: &Opened,
    targets: &[Opened],
    len_bytes: u64,
    interrupts: &mut Interrupts,
    created: &mut devices::CreatedFiles,
) -> Result<JobRun, CliError> {
    let Mapped { map, len_sectors, batch_sectors, flags, sparse, retry_failed } = mapped;
    let work = if retry_failed { map.state.failed() } else { map.state.remaining(len_sectors) };
    let client = start_client(context.settings)?;
    let started = Instant::now();
    let bar = progress::byte_bar(progress::bars_wanted(context.output.quiet), len_bytes, "copy");
    let already_bytes = RangeSet::from_range(0..len_sectors).difference(&work).len_sectors() * SECTOR_SIZE as u64;
    bar.set_position(already_bytes);
    let target_starts: Vec<u64> = targets.iter().map(Opened::start_sector).collect();
    let devices: Vec<(Device, u64)> = targets.iter().map(|t| (t.device.clone(), t.start_sector())).collect();
    let mut outcome = Outcome::default();
    outcome.targets = vec![Default::default(); targets.len()];
    let (mut interrupted, mut done_bytes, mut flush_errors) = (None, 0, vec![None; targets.len()]);
    for batch in map::batches(&work, batch_sectors) {
        let job = map::batch_job(&batch, (&source.device, source.start_sector()), &devices, flags, sparse);
        let handle = client.submit(job).await.map_err(|source| CliError::Submit { source })?;
        created.keep();
        let ui = OffsetBar { bar: &bar, base: bar.position() };
        let watched = progress::watch(&handle, &ui, interrupts).await;
        done_bytes += handle.progress().done_sectors * SECTOR_SIZE as u64;
        let batch_outcome = watched.outcome;
        // Durable on every target before the map says so.
        let flushes = map::finish_batch(map, batch, &batch_outcome, source.start_sector(), &devices).await?;
        let flushed = flushes.iter().all(Option::is_none);
        for (slot, error) in flush_errors.iter_mut().zip(flushes) {
            if let Some(error) = error {
                *slot = Some(error.to_string());
            }
        }
        outcome.read_err |= batch_outcome.read_err;
        for index in batch_outcome.write_err.iter() {
            outcome.write_err.set(index);
        }
        outcome.read_failed.extend(&batch_outcome.read_failed);
        for (merged, report) in outcome.targets.iter_mut().zip(&batch_outcome.targets) {
            merged.write_failed.extend(&report.write_failed);
        }
        outcome.cancelled |= batch_outcome.cancelled;
        outcome.panicked = outcome.panicked.or(batch_outcome.panicked.clone());
        interrupted = watched.interrupted;
        let stop = !batch_outcome.is_ok() && !flags.contains(Flags::IGNORE_ERROR);
        if interrupted.is_some() || stop || !flushed || batch_outcome.cancelled {
            break;
        }
    }
    bar.finish_and_clear();
    // Whatever the map does not hold as done is not copied, on every target.
    let not_done = RangeSet::from_range(0..len_sectors).difference(&map.state.done);
    for (report, start) in outcome.targets.iter_mut().zip(&target_starts) {
        report.not_copied = not_done.shifted(0, *start).expect("the copy lies inside every target");
    }
    let seconds = started.elapsed().as_secs_f64();
    let stats = client.stats();
    client.shutdown().await;
    Ok(JobRun { outcome, interrupted, done_bytes, seconds, flush_errors, stats })
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
    let comparing = compare::compare(&source_side, &sides, len_sectors, skip, setup.shape, &setup.pool, &on_chunk);
    let (mut comparison, interrupted) = tokio::select! {
        comparison = comparing => (comparison, None),
        code = interrupts.recv() => (Comparison::default(), Some(code)),
    };
    if interrupted.is_none() && !tail.is_empty() {
        compare_tail(source, targets, tail, skip, &mut comparison);
        on_chunk(tail.len_bytes);
    }
    bar.finish_and_clear();
    (comparison, compared.get(), started.elapsed().as_secs_f64(), interrupted)
}

/// Compares the tail of the range (regular files, through the page cache): a differing tail
/// counts as one differing block, its sectors those the tail touches.
fn compare_tail(source: &Opened, targets: &[Opened], tail: Tail, skip: Option<&[RangeSet]>, found: &mut Comparison) {
    let sectors = tail.range_sectors();
    let expected = match tail.read(source) {
        Ok(bytes) => bytes,
        Err(_) => {
            found.source_unreadable.insert(sectors);
            return;
        }
    };
    for (index, (target, diff)) in targets.iter().zip(&mut found.targets).enumerate() {
        if skip.is_some_and(|skip| skip[index].intersects(&sectors)) {
            continue;
        }
        match tail.read(target) {
            Ok(bytes) if bytes == expected => {}
            Ok(_) => {
                diff.differing_blocks += 1;
                diff.differing.insert(sectors.clone());
            }
            Err(_) => diff.unreadable.insert(sectors.clone()),
        }
    }
}

/// After a copy or zero job, writes the tail of the range (regular files) with `bytes` read
/// from the source (`None`: zeroes), if the job went on to its end: finished, or failed with
/// `--ignore-errors`. Otherwise, or where it fails, the tail is reported as the job reports
/// blocks: read failed, write failed, not copied.
fn finish_tail(tail: Tail, source: Option<&Opened>, targets: &[Opened], keep_going: bool, run: &mut JobRun) {
    if tail.is_empty() {
        return;
    }
    let outcome = &mut run.outcome;
    let went_on = run.interrupted.is_none()
        && !outcome.cancelled
        && outcome.panicked.is_none()
        && (keep_going || outcome.is_ok());
    let bytes = match (went_on, source) {
        (false, _) => None,
        (true, None) => Some(vec![0; tail.len_bytes as usize]),
        (true, Some(source)) => match tail.read(source) {
            Ok(bytes) => Some(bytes),
            Err(_) => {
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
            Some(bytes) => match tail.write(target, bytes) {
                Ok(()) => written += 1,
                Err(_) => {
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
            Some(TargetVerify { status, .. }) if *status != "identical" => status,
            _ => "ok",
        }
    }
}

/// A target's `not_copied` (target-device sectors) relative to the start of its region.
fn not_copied_in_region(target: &Opened, outcome: &kcopyd_core::TargetReport) -> RangeSet {
    outcome.not_copied.shifted(target.start_sector(), 0).expect("not_copied lies inside the target region")
}

/// Bytes of the range that at least one target does not hold.
fn not_copied_bytes(opened: &[Opened], run: &JobRun, len_bytes: u64) -> u64 {
    let mut union = RangeSet::new();
    for (target, outcome) in opened.iter().zip(&run.outcome.targets) {
        union.extend(&not_copied_in_region(target, outcome));
    }
    report::range_bytes(&union, len_bytes)
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
    if !run.outcome.is_ok() || targets.iter().any(|t| t.flush_error.is_some()) {
        return ("errors", Status::Failed);
    }
    if verify_identical == Some(false) {
        return ("differences", Status::Failed);
    }
    ("ok", Status::Success)
}

/// The sparse-copy options of `copy`, checked.
///
/// # Errors
/// A bad --sparse-size, or --target-is-zero without --sparse.
fn sparse_of(args: &CopyArgs) -> Result<Sparse, CliError> {
    let on = args.sparse && !args.no_sparse;
    let size = args.sparse_size_bytes;
    if size != 0 && (!size.is_power_of_two() || size < SECTOR_SIZE as u64 || size > u64::from(u32::MAX / 2 + 1)) {
        return Err(CliError::argument(
            "--sparse-size",
            size.to_string(),
            "must be 0 (no zero scan) or a power of two from 512 to 2G",
        ));
    }
    if args.target_is_zero && !on {
        return Err(CliError::argument("--target-is-zero", "", "needs a sparse copy (not --sparse=off / --no-sparse)"));
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
    let devices = std::iter::once(&args.source).chain(&args.targets);
    let settings = Settings::from_args(&args.engine, devices)?.with_throttle(&args.throttle)?;
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
        None => run_job(context, job, &plan.targets, plan.len_bytes, "copy", interrupts, &mut plan.created).await?,
        Some(path) => {
            let header = MapHeader {
                source: (plan.source.arg.offset_bytes, plan.source.arg.text.clone()),
                targets: plan.targets.iter().map(|t| (t.arg.offset_bytes, t.arg.text.clone())).collect(),
                len_bytes: plan.len_bytes,
            };
            let mut map = CopyMap::open(path, &header)?;
            let block_bytes = std::iter::once(&plan.source).chain(&plan.targets).map(Opened::block_bytes).max();
            let batch_bytes = args.map_batch_bytes / block_bytes.unwrap_or(512) * block_bytes.unwrap_or(512);
            if batch_bytes == 0 {
                return Err(CliError::argument(
                    "--map-batch",
                    args.map_batch_bytes.to_string(),
                    "smaller than one logical block",
                ));
            }
            let mapped = Mapped {
                map: &mut map,
                len_sectors,
                batch_sectors: batch_bytes / SECTOR_SIZE as u64,
                flags: flags(args.ignore_errors || args.retry_failed, args.write_seq),
                sparse,
                retry_failed: args.retry_failed,
            };
            run_mapped(context, mapped, &plan.source, &plan.targets, plan.len_bytes, interrupts, &mut plan.created)
                .await?
        }
    };
    finish_tail(plan.tail, Some(&plan.source), &plan.targets, args.ignore_errors, &mut run);
    let mut targets = job_targets(&plan.targets, &run, plan.len_bytes);
    let not_copied = not_copied_bytes(&plan.targets, &run, plan.len_bytes);
    let mut verify = None;
    let mut interrupted = run.interrupted;
    if let (Some(setup), None) = (&compare_setup, interrupted) {
        // Leave out what the copy itself reported as not copied: those differences are known.
        let skip: Vec<RangeSet> = plan
            .targets
            .iter()
            .zip(&run.outcome.targets)
            .map(|(target, outcome)| not_copied_in_region(target, outcome))
            .collect();
        let (mut comparison, bytes, seconds, signal) = run_compare(
            context,
            setup,
            &plan.source,
            &plan.targets,
            (plan.len_bytes, plan.tail),
            Some(&skip),
            interrupts,
        )
        .await;
        interrupted = signal;
        if signal.is_none() {
            // The source's unreadable blocks were reported by the copy already.
            let read_failed = run
                .outcome
                .read_failed
                .shifted(plan.source.start_sector(), 0)
                .expect("read_failed lies inside the source region");
            comparison.source_unreadable = comparison.source_unreadable.difference(&read_failed);
            for ((target, opened), diff) in targets.iter_mut().zip(&plan.targets).zip(&comparison.targets) {
                target.verify = Some(report::target_verify(diff, opened.start_sector()));
            }
            let mut skipped = RangeSet::new();
            for set in &skip {
                skipped.extend(set);
            }
            verify =
                Some(report::verify_report(&comparison, bytes, report::range_bytes(&skipped, plan.len_bytes), seconds));
        }
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
    let settings = Settings::from_args(&args.engine, &args.targets)?.with_throttle(&args.throttle)?;
    let context = Context { settings: &settings, engine: &args.engine, output: &args.output };
    let plan = devices::open_zero_plan(&args.targets, args.length_bytes, &settings, interrupts).await?;
    let (opened, len_bytes) = (&plan.targets, plan.len_bytes);
    let len_sectors = plan.tail.offset_in_range_bytes / SECTOR_SIZE as u64;
    let job =
        Job::zero(opened.iter().map(|t| region(t, len_sectors)).collect(), flags(args.ignore_errors, args.write_seq));
    let mut nothing_created = devices::CreatedFiles::default();
    let mut run = run_job(context, job, opened, len_bytes, "zero", interrupts, &mut nothing_created).await?;
    finish_tail(plan.tail, None, opened, args.ignore_errors, &mut run);
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
    let settings = Settings::from_args(&args.engine, devices)?;
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
    let targets = plan
        .targets
        .iter()
        .enumerate()
        .map(|(index, target)| {
            let verify = comparison.targets.get(index).map(|diff| report::target_verify(diff, target.start_sector()));
            TargetReport {
                device: target.arg.text.clone(),
                offset_bytes: target.arg.offset_bytes,
                status: verify.as_ref().map_or("not_compared", |v| v.status),
                write_failed_sectors: None,
                not_copied_sectors: None,
                bytes_not_copied: None,
                flush_error: None,
                verify,
            }
        })
        .collect();
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
        verify: interrupted.is_none().then(|| report::verify_report(&comparison, bytes, 0, seconds)),
        stats: None,
        wall_seconds: None,
    };
    Ok(Done { report, status })
}
