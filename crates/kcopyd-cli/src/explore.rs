//! `kcopyd sim run` and `kcopyd sim sweep`: scenario files in virtual time, as text, JSON and
//! SVG. The scenario format, the runner and the text of reports and rankings are kcopyd-sim's
//! `explore` module; this file reads the files, shows progress, prints and draws.
//!
//! ```text
//!  SCENARIO.toml ─► value tree ─► --set edits ─► run ──────────► summary | --json ; --svg
//!                                           └──► sweep (--vary) ─► table | --json ; --svg
//! ```

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kcopyd_sim::explore::file::{self, ScenarioFileError, folder_of};
use kcopyd_sim::explore::{self, METRICS, Ranking, Scenario, ScenarioError, SweepPoint, Vary, plot};
use toml::Value;

use crate::cli::{SimRunArgs, SimSweepArgs};
use crate::error::{CliError, Status};
use crate::out;

use crate::progress::{self, Interrupts, SignalPhase, bars_wanted};

/// Runs `kcopyd sim run`. A signal quits at once (the run cannot stop half-way with a report
/// that means anything; the `--svg` file is not left behind).
pub fn run(args: &SimRunArgs, interrupts: &Interrupts) -> Result<Status, CliError> {
    interrupts.set_summary(Some(Box::new(|| "kcopyd: interrupted: the scenario stopped before its report".to_owned())));
    off_runtime(|| run_scenario(args))
}

/// Runs `kcopyd sim sweep`. The first signal lets the points running finish and prints the
/// table of the points done (exit 130 or 143); a second one quits at once.
pub fn sweep(args: &SimSweepArgs, interrupts: &Interrupts) -> Result<Status, CliError> {
    off_runtime(|| run_sweep(args, interrupts))
}

/// Runs `work` on a thread of its own: the simulations build their own runtimes, which cannot
/// start on the command's runtime thread.
pub(crate) fn off_runtime<T: Send>(work: impl FnOnce() -> Result<T, CliError> + Send) -> Result<T, CliError> {
    std::thread::scope(|scope| scope.spawn(work).join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
}

/// A picture that could not be drawn (exit 1).
fn plot_error(error: plot::PlotError) -> CliError {
    CliError::Plot { path: error.path.display().to_string(), problem: error.problem }
}

/// The scenario file as a value tree, with the `--set` edits applied.
fn load(path: &Path, set: &[String]) -> Result<Value, CliError> {
    file::read_tree(path, set).map_err(|error| match error {
        ScenarioFileError::Read { path, source } => {
            CliError::File { what: "scenario", path: path.display().to_string(), source }
        }
        ScenarioFileError::Edit { edit } => CliError::argument("--set", edit, "not KEY=VALUE"),
        ScenarioFileError::Scenario { path, source } => CliError::Scenario { path: path.display().to_string(), source },
    })
}

fn run_scenario(args: &SimRunArgs) -> Result<Status, CliError> {
    let shown = args.scenario.display().to_string();
    let tree = load(&args.scenario, &args.set)?;
    let scenario_error = |source: ScenarioError| CliError::Scenario { path: shown.clone(), source };
    let scenario = Scenario::from_value_in(tree, &folder_of(&args.scenario)).map_err(scenario_error)?;
    if let Some(svg) = &args.svg {
        crate::progress::check_output_file(svg, "--svg")?;
    }
    let report = explore::run(&scenario).map_err(scenario_error)?;
    if let Some(svg) = &args.svg {
        plot::run_svg(svg, &report).map_err(plot_error)?;
    }
    if args.json {
        out::print(&format!("{}\n", serde_json::to_string(&report).expect("a report serializes")))?;
    } else {
        out::print(&report.to_string())?;
    }
    Ok(Status::Success)
}

fn run_sweep(args: &SimSweepArgs, interrupts: &Interrupts) -> Result<Status, CliError> {
    let shown = args.scenario.display().to_string();
    let tree = load(&args.scenario, &args.set)?;
    let metric = explore::metric(&args.metric).ok_or_else(|| {
        let names: Vec<&str> = METRICS.iter().map(|m| m.name).collect();
        CliError::argument("--metric", &args.metric, format!("unknown metric (known: {})", names.join(", ")))
    })?;
    let varies = parse_varies(&args.vary)?;
    if args.svg.is_some() && varies.len() > 2 {
        return Err(CliError::Arguments { what: "--svg", problem: "plots one or two varied keys".into() });
    }
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if threads == 0 {
        return Err(CliError::argument("--threads", "0", "at least 1"));
    }
    let total: usize = varies.iter().map(|v| v.values.len()).product();
    let target =
        if bars_wanted(args.json) { ProgressDrawTarget::stderr_with_hz(10) } else { ProgressDrawTarget::hidden() };
    let bar = ProgressBar::with_draw_target(Some(total as u64), target);
    bar.set_style(
        ProgressStyle::with_template("sweep [{wide_bar}] {pos}/{len} points, {elapsed} ETA {eta}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    if let Some(svg) = &args.svg {
        crate::progress::check_output_file(svg, "--svg")?;
    }
    let folder = folder_of(&args.scenario);
    let points = sweep_until_signal(interrupts, total, &bar, |on_done, stop| {
        explore::sweep_until(&tree, &folder, &varies, threads, on_done, stop)
            .map_err(|source| CliError::Scenario { path: shown.clone(), source })
    })?;
    bar.finish_and_clear();
    let stop = interrupts.stop_flag();
    let interrupted = stop.load(Ordering::Acquire).then(|| interrupted_code(points.len(), total));
    if let (Some(svg), None) = (&args.svg, interrupted) {
        plot::sweep_svg(svg, &varies, &points, metric).map_err(plot_error)?;
    }
    let ranking = Ranking::new(&varies, &points, metric, interrupted.map(|_| total));
    out::print(&if args.json { format!("{}\n", ranking.to_json()) } else { ranking.to_string() })?;
    Ok(interrupted.map_or(Status::Success, Status::Interrupted))
}

/// The `--vary` options, each key once.
fn parse_varies(texts: &[String]) -> Result<Vec<Vary>, CliError> {
    let varies = texts
        .iter()
        .map(|text| Vary::parse(text).map_err(|error| CliError::argument("--vary", text, error.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(repeated) = explore::repeated_key(&varies) {
        return Err(CliError::argument(
            "--vary",
            &texts[repeated],
            format!("key '{}' is varied twice: give all its values in one --vary", varies[repeated].key),
        ));
    }
    Ok(varies)
}

/// Runs `sweep` (given the callback after each point and the stop flag) so that a signal lets
/// the points running finish and starts no new one; a second signal quits at once, saying how
/// many of `total` points ran.
fn sweep_until_signal(
    interrupts: &Interrupts,
    total: usize,
    bar: &ProgressBar,
    sweep: impl FnOnce(&(dyn Fn(&SweepPoint) + Sync), &AtomicBool) -> Result<Vec<SweepPoint>, CliError>,
) -> Result<Vec<SweepPoint>, CliError> {
    let done = Arc::new(AtomicUsize::new(0));
    let counted = done.clone();
    interrupts.set_summary(Some(Box::new(move || {
        format!(
            "kcopyd: interrupted again: quit at once after {} of {total} points, without their table",
            counted.load(Ordering::Relaxed)
        )
    })));
    interrupts.set_phase(SignalPhase::Graceful);
    let on_done = |_: &SweepPoint| {
        done.fetch_add(1, Ordering::Relaxed);
        bar.inc(1);
    };
    sweep(&on_done, interrupts.stop_flag())
}

/// After a signal stopped a sweep: says so on stderr and returns the signal's exit code.
fn interrupted_code(done: usize, total: usize) -> u8 {
    out::note(&format!(
        "kcopyd: interrupted: {done} of {total} points ran; their table follows (the --svg file is not drawn)"
    ));
    progress::first_signal().unwrap_or(progress::EXIT_SIGINT)
}

#[cfg(test)]
mod tests {
    use kcopyd_sim::explore::METRICS;

    #[test]
    fn the_help_of_metric_names_every_metric() {
        let help = include_str!("cli.rs");
        for metric in METRICS {
            assert!(help.contains(metric.name), "--metric's help names {}", metric.name);
        }
    }
}
