//! `copy`, `zero` and `verify`: arguments to a plan, the plan to the runner of `kcopyd-tool`
//! with progress bars and Ctrl-C, and the run to a report and an exit status.
//!
//! ```text
//!  args ─► devices::settings, open_plan ─► Runner::copy/zero/verify ◄─ Ctrl-C: cancel token
//!            (exit 2, nothing written)      │ events ─► progress bars, quit-at-once summary
//!                                           ▼
//!                                   FinishedJob / VerifyRun ─► Report (+ status, exit code)
//! ```

use std::cell::{Cell, RefCell};
use std::future::Future;

use kcopyd_core::{Flags, JobHandle, SECTOR_SIZE};
use kcopyd_tool::report;
use kcopyd_tool::run::{CopyOptions, Event, MappedCopy, Phase, RunError, Runner};
use kcopyd_tool::{Cancel, Opened, map};

use crate::cli::{CopyArgs, EngineArgs, OutputArgs, VerifyArgs, ZeroArgs};
use crate::devices;
use crate::error::{CliError, Status};
use crate::out;
use crate::progress::{self, Interrupts, SignalPhase};
use crate::report::Report;
use crate::size::Bytes;

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

/// Warns when the source lies on a device mounted read-write.
fn warn_mounted(source: &Opened, len_bytes: u64, output: &OutputArgs) {
    if let Some(warning) = source.mounted_warning(len_bytes) {
        if !output.quiet {
            out::note(&format!("kcopyd: warning: {warning}"));
        }
    }
}

/// Tells (unless `quiet`) what `devices` run of what was asked for: each NBD export opened
/// with fewer connections than `--connections` (its server does not allow several, or took
/// fewer), then each file or block device that runs fewer I/Os at once than
/// `--subjobs-in-flight` (256 at most: `kcopyd_os::QUEUE_DEPTH_MAX`).
fn note_devices<'a>(
    devices: impl IntoIterator<Item = &'a Opened>,
    settings: &kcopyd_tool::Settings,
    engine: &EngineArgs,
    output: &OutputArgs,
) {
    if output.quiet {
        return;
    }
    let devices: Vec<&Opened> = devices.into_iter().collect();
    let connections = engine.connections.map(|asked| usize::try_from(asked).unwrap_or(usize::MAX));
    let in_flight = settings.config.subjobs_in_flight;
    let connection_notes = devices.iter().filter_map(|d| connections.and_then(|asked| d.connections_note(asked)));
    let queue_notes = devices.iter().filter_map(|d| d.queue_depth_note(settings.queue_depth, in_flight));
    for note in connection_notes.chain(queue_notes) {
        out::note(&format!("kcopyd: note: {note}"));
    }
}

/// Tells (unless `quiet`) when the page budget runs fewer of a copy's sub-jobs at once than
/// `--subjobs-in-flight` asks for: each holds its size of the budget until every target is
/// written, and the rest would wait for pages without a word.
fn note_budget(settings: &kcopyd_tool::Settings, output: &OutputArgs) {
    let config = &settings.config;
    let (budget, size) = (settings.config.page_budget_bytes() as u64, config.subjob_size_bytes as u64);
    let held = kcopyd_tool::options::subjobs_held(budget, size, config.subjobs_in_flight);
    // A budget smaller than one sub-job cuts the sub-jobs to its size: asked for, not noted.
    if budget >= size && held < config.subjobs_in_flight && !output.quiet {
        let needed = kcopyd_tool::options::memory_for_subjobs(size, config.subjobs_in_flight);
        out::note(&format!(
            "kcopyd: note: --memory {} holds {held} sub-jobs of {} at once, not the {} asked for \
             (--memory {} holds them all)",
            option_size(budget),
            option_size(size),
            config.subjobs_in_flight,
            option_size(needed),
        ));
    }
}

/// `bytes` as an option takes it: 32M, 1G, 4K, or bytes when no unit divides it.
fn option_size(bytes: u64) -> String {
    let units = [(40, "T"), (30, "G"), (20, "M"), (10, "K")];
    match units.iter().find(|(shift, _)| bytes >= 1 << shift && bytes % (1 << shift) == 0) {
        Some((shift, unit)) => format!("{}{unit}", bytes >> shift),
        None => bytes.to_string(),
    }
}

/// A run's error, named by the option at fault (`--memory`: the budget in force in `settings`).
fn run_error(error: RunError, settings: &kcopyd_tool::Settings) -> CliError {
    let memory_bytes = settings.config.page_budget_bytes() as u64;
    match error {
        RunError::Start { source } => CliError::Config { option: "--memory", source },
        RunError::Submit { source } => CliError::Submit { source },
        RunError::CompareBudget { problem } => CliError::argument("--memory", memory_bytes.to_string(), problem),
        RunError::Map(error) => error.into(),
        RunError::Verify { source } => CliError::Arguments { what: "TARGET", problem: source.to_string() },
    }
}

/// The exit code of a cancelled run: the signal that cancelled it.
fn cancel_code() -> u8 {
    progress::first_signal().unwrap_or(130)
}

/// A report and its exit status.
fn done(report: Report) -> Done {
    let status = status_of(&report);
    Done { report, status }
}

/// The exit status of a report, from its exit code.
fn status_of(report: &Report) -> Status {
    match report.exit_code {
        0 => Status::Success,
        1 => Status::Failed,
        code => Status::Interrupted(code),
    }
}

/// The command's side of a run: a progress bar per phase, and what a quit at once says.
struct Ui {
    quiet: bool,
    bar: RefCell<Option<indicatif::ProgressBar>>,
    phase: Cell<Option<Phase>>,
    len_bytes: Cell<u64>,
}

impl Ui {
    fn new(quiet: bool) -> Ui {
        Ui { quiet, bar: RefCell::new(None), phase: Cell::new(None), len_bytes: Cell::new(0) }
    }

    fn on_event(&self, event: Event<'_>) {
        match event {
            Event::Started { phase, len_bytes, done_bytes } => {
                let bar = progress::byte_bar(progress::bars_wanted(self.quiet), len_bytes, phase.name());
                bar.set_position(done_bytes);
                self.bar.replace(Some(bar));
                self.phase.set(Some(phase));
                self.len_bytes.set(len_bytes);
                // From here a signal cancels the run (at once if it came before the job started).
                progress::enter(SignalPhase::Graceful);
                if phase == Phase::Verify {
                    progress::set_summary(Some(Box::new(|| {
                        "kcopyd: interrupted again: quit at once during the comparison (nothing is written by it)"
                            .to_owned()
                    })));
                }
            }
            Event::Job { handle, base_bytes } => {
                let label = self.phase.get().map_or("copy", Phase::name);
                job_started(handle, base_bytes, self.len_bytes.get(), label);
            }
            Event::Progress { done_bytes } => {
                if let Some(bar) = &*self.bar.borrow() {
                    bar.set_position(done_bytes);
                }
            }
            Event::Finished { .. } => {
                if let Some(bar) = self.bar.take() {
                    bar.finish_and_clear();
                }
            }
        }
    }

    /// The first signal came: a job says it is stopping.
    fn interrupted(&self) {
        if matches!(self.phase.get(), Some(Phase::Copy | Phase::Zero)) {
            let line =
                "kcopyd: interrupted: finishing the I/O in flight, then stopping (interrupt again to quit at once)";
            match &*self.bar.borrow() {
                Some(bar) => bar.suspend(|| out::note(line)),
                None => out::note(line),
            }
        }
    }
}

/// Runs `work` (a run of `runner`, whose token is `cancel`) to its end; the first signal
/// cancels it (a second one quits at once, from the signal thread).
async fn drive<T>(work: impl Future<Output = T>, cancel: &Cancel, ui: &Ui, interrupts: &mut Interrupts) -> T {
    tokio::pin!(work);
    loop {
        tokio::select! {
            done = &mut work => return done,
            _ = interrupts.recv() => {
                if !cancel.is_cancelled() {
                    cancel.cancel();
                    ui.interrupted();
                }
            }
        }
    }
}

/// A job has started: a second signal quits at once saying how far it got (`base_bytes`
/// done before this job).
fn job_started(handle: &JobHandle, base_bytes: u64, len_bytes: u64, label: &'static str) {
    let handle = handle.clone();
    progress::set_summary(Some(Box::new(move || {
        let done = base_bytes + handle.progress().done_sectors * SECTOR_SIZE as u64;
        format!(
            "kcopyd: interrupted again: quit at once: {label} reached {} of {}; the I/O in flight was not \
             waited for and the targets were not flushed",
            Bytes(done.min(len_bytes)),
            Bytes(len_bytes)
        )
    })));
}

/// `copy --map FILE --retry-failed` before there is a map (no FILE, or an empty one): nothing
/// failed, so nothing is opened, created or written. Returns the report of that, if so.
fn nothing_to_retry(args: &CopyArgs) -> Option<Done> {
    let path = args.map.as_ref().filter(|_| args.retry_failed)?;
    if !map::holds_nothing(path) {
        return None;
    }
    if !args.output.quiet {
        out::note(&format!(
            "kcopyd: --retry-failed: no map '{}' yet, so nothing failed: nothing to retry",
            path.display()
        ));
    }
    Some(done(report::nothing_copied()))
}

/// The copy as the runner runs it: through the map of `--map`, if given.
async fn run_copy(
    runner: Runner<'_>,
    args: &CopyArgs,
    plan: &mut kcopyd_tool::Plan,
    options: CopyOptions,
) -> Result<kcopyd_tool::run::CopyRun, CliError> {
    let Some(path) = &args.map else {
        return runner.copy(plan, options, None).await.map_err(|e| run_error(e, runner.settings));
    };
    let (mut copy_map, batch_sectors) = map::open_for(path, plan, args.map_batch_bytes)?;
    if args.retry_failed && copy_map.state.failed().is_empty() && !args.output.quiet {
        out::note(&format!(
            "kcopyd: --retry-failed: the map '{}' records nothing failed: nothing to retry",
            path.display()
        ));
    }
    let mapped = MappedCopy { map: &mut copy_map, batch_sectors, retry_failed: args.retry_failed };
    runner.copy(plan, options, Some(mapped)).await.map_err(|e| run_error(e, runner.settings))
}

/// `kcopyd copy`.
///
/// # Errors
/// Bad options or devices (nothing written).
pub async fn copy(args: &CopyArgs, interrupts: &mut Interrupts) -> Result<Done, CliError> {
    let sparse =
        kcopyd_tool::options::sparse(args.sparse && !args.no_sparse, args.sparse_size_bytes, args.target_is_zero)
            .map_err(devices::option_error)?;
    if let Some(done) = nothing_to_retry(args) {
        return Ok(done);
    }
    let devices = std::iter::once(&args.source).chain(&args.targets);
    let settings = devices::with_throttle(devices::settings(&args.engine, devices)?, &args.throttle)?;
    note_budget(&settings, &args.output);
    let mut plan =
        devices::open_plan(&args.source, &args.targets, args.length_bytes, true, &settings, interrupts).await?;
    warn_mounted(&plan.source, plan.len_bytes, &args.output);
    note_devices(plan.devices(), &settings, &args.engine, &args.output);
    let options = CopyOptions { flags: flags(args.ignore_errors, args.write_seq), sparse, verify: args.verify };
    let (ui, cancel) = (Ui::new(args.output.quiet), Cancel::new());
    let on_event = |event: Event<'_>| ui.on_event(event);
    let runner = Runner { settings: &settings, on_event: &on_event, cancel: &cancel };
    let run = drive(run_copy(runner, args, &mut plan, options), &cancel, &ui, interrupts).await?;
    Ok(done(report::copy_report(&plan, &run, args.map.is_some(), cancel_code())))
}

/// Copies `plan` as `kcopyd copy` does without a map (bars unless `quiet`, Ctrl-C cancels),
/// and reports as it does.
///
/// # Errors
/// The engine could not start or refused the job.
pub async fn copy_planned(
    plan: &mut kcopyd_tool::Plan,
    settings: &kcopyd_tool::Settings,
    options: CopyOptions,
    quiet: bool,
    interrupts: &mut Interrupts,
) -> Result<Done, CliError> {
    let (ui, cancel) = (Ui::new(quiet), Cancel::new());
    let on_event = |event: Event<'_>| ui.on_event(event);
    let runner = Runner { settings, on_event: &on_event, cancel: &cancel };
    let copied = runner.copy(plan, options, None);
    let run = drive(copied, &cancel, &ui, interrupts).await.map_err(|e| run_error(e, runner.settings))?;
    Ok(done(report::copy_report(plan, &run, false, cancel_code())))
}

/// `kcopyd zero`.
///
/// # Errors
/// Bad options or devices (nothing written).
pub async fn zero(args: &ZeroArgs, interrupts: &mut Interrupts) -> Result<Done, CliError> {
    let settings = devices::with_throttle(devices::settings(&args.engine, &args.targets)?, &args.throttle)?;
    let plan = devices::open_zero_plan(&args.targets, args.length_bytes, &settings, interrupts).await?;
    note_devices(&plan.targets, &settings, &args.engine, &args.output);
    let (ui, cancel) = (Ui::new(args.output.quiet), Cancel::new());
    let on_event = |event: Event<'_>| ui.on_event(event);
    let runner = Runner { settings: &settings, on_event: &on_event, cancel: &cancel };
    let zeroed = runner.zero(&plan, flags(args.ignore_errors, args.write_seq));
    let run = drive(zeroed, &cancel, &ui, interrupts).await.map_err(|e| run_error(e, &settings))?;
    let report = report::zero_report(&plan, &run, cancel_code());
    let status = status_of(&report);
    Ok(Done { report, status })
}

/// `kcopyd verify`.
///
/// # Errors
/// Bad options or devices.
pub async fn verify(args: &VerifyArgs, interrupts: &mut Interrupts) -> Result<Done, CliError> {
    let devices = std::iter::once(&args.source).chain(&args.targets);
    let settings = devices::settings(&args.engine, devices)?;
    let plan = devices::open_plan(&args.source, &args.targets, args.length_bytes, false, &settings, interrupts).await?;
    warn_mounted(&plan.source, plan.len_bytes, &args.output);
    note_devices(plan.devices(), &settings, &args.engine, &args.output);
    let (ui, cancel) = (Ui::new(args.output.quiet), Cancel::new());
    let on_event = |event: Event<'_>| ui.on_event(event);
    let runner = Runner { settings: &settings, on_event: &on_event, cancel: &cancel };
    let compared = runner.verify(&plan);
    let run = drive(compared, &cancel, &ui, interrupts).await.map_err(|e| run_error(e, &settings))?;
    let report = report::verify_command_report(&plan, &run, cancel_code());
    let status = status_of(&report);
    Ok(Done { report, status })
}
