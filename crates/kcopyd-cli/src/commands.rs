//! `copy`, `zero` and `verify`: check, run the job with progress, flush, report.

use std::cell::Cell;

use futures_util::future::join_all;
use kcopyd_core::{Client, Flags, Job, Outcome, PagePool, RangeSet, Region, SECTOR_SIZE};

use crate::cli::{CopyArgs, EngineArgs, OutputArgs, VerifyArgs, ZeroArgs};
use crate::clock::Instant;
use crate::compare::{self, CompareShape, Comparison, Side};
use crate::devices::{self, Opened, Settings};
use crate::error::{CliError, Status};
use crate::progress::{self, Interrupts};
use crate::report::{self, Report, SourceReport, TargetReport, TargetVerify};

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
    Side { device: opened.device.clone(), start_sector: opened.start_sector() }
}

/// Says that the end of a file is left out when the length was taken from it.
fn warn_trailing(opened: &Opened, length_given: bool, output: &OutputArgs) {
    if opened.trailing_bytes > 0 && !length_given && !output.quiet {
        eprintln!(
            "kcopyd: warning: {} '{}': its last {} bytes do not fill a {}-byte logical block and are left out",
            opened.role.name(),
            opened.arg.text,
            opened.trailing_bytes,
            opened.block_bytes()
        );
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
    client.shutdown().await;
    Ok(JobRun {
        outcome: watched.outcome,
        interrupted: watched.interrupted,
        done_bytes: handle.progress().done_sectors * SECTOR_SIZE as u64,
        seconds,
        flush_errors: flushes.into_iter().map(|r| r.err().map(|e| e.to_string())).collect(),
    })
}

/// Compares, with a bar, stopping at a signal. Returns the comparison (partial when
/// interrupted), the bytes compared, the seconds and the signal's exit code.
async fn run_compare(
    context: Context<'_>,
    source: &Opened,
    targets: &[Opened],
    len_bytes: u64,
    skip: Option<&[RangeSet]>,
    interrupts: &mut Interrupts,
) -> Result<(Comparison, u64, f64, Option<u8>), CliError> {
    let Context { settings, engine, output } = context;
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
    let bar = progress::byte_bar(progress::bars_wanted(output.quiet), len_bytes, "verify");
    let compared = Cell::new(0u64);
    let on_chunk = |bytes: u64| {
        compared.set(compared.get() + bytes);
        bar.set_position(compared.get());
    };
    let targets: Vec<Side> = targets.iter().map(side).collect();
    let source = side(source);
    let started = Instant::now();
    let comparing = compare::compare(&source, &targets, len_bytes / SECTOR_SIZE as u64, skip, shape, &pool, &on_chunk);
    let (comparison, interrupted) = tokio::select! {
        comparison = comparing => (comparison, None),
        code = interrupts.recv() => (Comparison::default(), Some(code)),
    };
    bar.finish_and_clear();
    Ok((comparison, compared.get(), started.elapsed().as_secs_f64(), interrupted))
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

fn job_targets(opened: &[Opened], run: &JobRun) -> Vec<TargetReport> {
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

/// `kcopyd copy`.
///
/// # Errors
/// Bad options or devices (nothing written).
pub async fn copy(args: &CopyArgs, interrupts: &mut Interrupts) -> Result<Done, CliError> {
    let settings = Settings::from_args(&args.engine)?;
    let context = Context { settings: &settings, engine: &args.engine, output: &args.output };
    let mut plan = devices::plan_with_source(&args.source, &args.targets, args.length_bytes, true, &settings)?;
    warn_trailing(&plan.source, args.length_bytes.is_some(), &args.output);
    let len_sectors = plan.len_bytes / SECTOR_SIZE as u64;
    let job = Job::copy(
        region(&plan.source, len_sectors),
        plan.targets.iter().map(|t| region(t, len_sectors)).collect(),
        flags(args.ignore_errors, args.write_seq),
    );
    let run = run_job(context, job, &plan.targets, plan.len_bytes, "copy", interrupts, &mut plan.created).await?;
    let mut targets = job_targets(&plan.targets, &run);
    let mut verify = None;
    let mut interrupted = run.interrupted;
    if args.verify && interrupted.is_none() {
        // Leave out what the copy itself reported as not copied: those differences are known.
        let skip: Vec<RangeSet> = plan
            .targets
            .iter()
            .zip(&run.outcome.targets)
            .map(|(target, outcome)| outcome.not_copied.shifted(target.start_sector(), 0))
            .collect();
        let (mut comparison, bytes, seconds, signal) =
            run_compare(context, &plan.source, &plan.targets, plan.len_bytes, Some(&skip), interrupts).await?;
        interrupted = signal;
        if signal.is_none() {
            // The source's unreadable blocks were reported by the copy already.
            let read_failed = run.outcome.read_failed.shifted(plan.source.start_sector(), 0);
            comparison.source_unreadable = comparison.source_unreadable.difference(&read_failed);
            for ((target, opened), diff) in targets.iter_mut().zip(&plan.targets).zip(&comparison.targets) {
                target.verify = Some(report::target_verify(diff, opened.start_sector()));
            }
            verify = Some(report::verify_report(&comparison, bytes, seconds));
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
        wall_seconds: None,
    };
    Ok(Done { report, status })
}

/// `kcopyd zero`.
///
/// # Errors
/// Bad options or devices (nothing written).
pub async fn zero(args: &ZeroArgs, interrupts: &mut Interrupts) -> Result<Done, CliError> {
    let settings = Settings::from_args(&args.engine)?;
    let context = Context { settings: &settings, engine: &args.engine, output: &args.output };
    let (opened, len_bytes) = devices::plan_zero(&args.targets, args.length_bytes, &settings)?;
    let len_sectors = len_bytes / SECTOR_SIZE as u64;
    let job =
        Job::zero(opened.iter().map(|t| region(t, len_sectors)).collect(), flags(args.ignore_errors, args.write_seq));
    let mut nothing_created = devices::CreatedFiles::default();
    let run = run_job(context, job, &opened, len_bytes, "zero", interrupts, &mut nothing_created).await?;
    let mut targets = job_targets(&opened, &run);
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
        seconds: run.seconds,
        throughput_bytes_per_s: report::throughput(run.done_bytes, run.seconds),
        cancelled: run.outcome.cancelled || run.interrupted.is_some(),
        panicked: run.outcome.panicked.clone(),
        source: None,
        targets,
        verify: None,
        wall_seconds: None,
    };
    Ok(Done { report, status })
}

/// `kcopyd verify`.
///
/// # Errors
/// Bad options or devices.
pub async fn verify(args: &VerifyArgs, interrupts: &mut Interrupts) -> Result<Done, CliError> {
    let settings = Settings::from_args(&args.engine)?;
    let context = Context { settings: &settings, engine: &args.engine, output: &args.output };
    let plan = devices::plan_with_source(&args.source, &args.targets, args.length_bytes, false, &settings)?;
    warn_trailing(&plan.source, args.length_bytes.is_some(), &args.output);
    let (comparison, bytes, seconds, interrupted) =
        run_compare(context, &plan.source, &plan.targets, plan.len_bytes, None, interrupts).await?;
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
        seconds,
        throughput_bytes_per_s: report::throughput(bytes, seconds),
        cancelled: interrupted.is_some(),
        panicked: None,
        source: Some(SourceReport {
            device: plan.source.arg.text.clone(),
            offset_bytes: plan.source.arg.offset_bytes,
            read_failed_sectors: report::pairs(&comparison.source_unreadable.shifted(0, plan.source.start_sector())),
        }),
        targets,
        verify: interrupted.is_none().then(|| report::verify_report(&comparison, bytes, seconds)),
        wall_seconds: None,
    };
    Ok(Done { report, status })
}
