//! `kcopyd sim run` and `kcopyd sim sweep`: scenario files in virtual time, as text, JSON and
//! SVG. The scenario format and the runner are kcopyd-sim's `explore` module; this file reads
//! the files, prints and draws.
//!
//! ```text
//!  SCENARIO.toml ─► value tree ─► --set edits ─► run ──────────► summary | --json ; --svg
//!                                           └──► sweep (--vary) ─► table | --json ; --svg
//! ```

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kcopyd_sim::explore::file::{self, ScenarioFileError, folder_of};
use kcopyd_sim::explore::{self, METRICS, Report, Scenario, ScenarioError, SweepPoint, Vary, plot};
use serde_json::json;
use toml::Value;

use crate::cli::{SimRunArgs, SimSweepArgs};
use crate::error::{CliError, Status};
use crate::out;

use crate::progress::{self, Interrupts, Phase, bars_wanted};
use crate::size::Bytes;

/// Rows of the queue-depth table in the summary.
const QUEUE_ROWS: usize = 10;
/// Request sizes listed in the summary (narrowed-down reads make many).
const IO_SIZES_SHOWN: usize = 6;

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

/// The folder a scenario's disk model files are relative to: the scenario file's own.
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
        out::check_output_file(svg, "--svg")?;
    }
    let report = explore::run(&scenario).map_err(scenario_error)?;
    if let Some(svg) = &args.svg {
        plot::run_svg(svg, &report).map_err(plot_error)?;
    }
    if args.json {
        out::print(&format!("{}\n", serde_json::to_string(&report).expect("a report serializes")))?;
    } else {
        out::print(&summary(&report))?;
    }
    Ok(Status::Success)
}

fn mb(bytes: f64) -> f64 {
    bytes / 1e6
}

/// Milliseconds for people: `0.192 ms`, `83.455 ms`, `5553.26 s`.
fn duration(ms: f64) -> String {
    if ms < 10_000.0 { format!("{ms:.3} ms") } else { format!("{:.2} s", ms / 1000.0) }
}

/// What the check of an entry's failures against the fault logs found, in a few words.
fn fault_log_finding(check: &kcopyd_sim::explore::Verification) -> String {
    let problems: Vec<String> = [
        (check.unexplained_read_failed_sectors, "read_failed sectors no logged fault explains"),
        (check.unexplained_write_failed_sectors, "write_failed sectors no logged fault explains"),
        (check.missed_latent_sectors, "latent sectors read but not reported"),
        (check.not_copied_disagreeing_sectors, "sectors where not_copied and the failures disagree"),
    ]
    .into_iter()
    .filter(|(count, _)| *count > 0)
    .map(|(count, what)| format!("{count} {what}"))
    .collect();
    if problems.is_empty() { "failures agree with the fault logs".into() } else { problems.join(", ") }
}

/// The human summary of a run.
pub fn summary(report: &Report) -> String {
    let mut out = String::new();
    if !report.description.is_empty() {
        let _ = writeln!(out, "scenario: {}", report.description);
    }
    let _ = writeln!(
        out,
        "jobs:     {} in {:.3} s virtual ({:.2} s wall): {:.1} MB/s, {}",
        Bytes(report.job_bytes),
        report.copy_seconds,
        report.wall_seconds,
        report.throughput_mb_per_s,
        if report.all_ok { "every job ok" } else { "NOT every job ok" },
    );
    let _ = writeln!(out, "pages:    {} in use at most, of {}", report.pages_in_use_max, report.page_budget);
    out += &jobs_lines(report);
    out += &disks_table(report);
    out += &io_sizes_lines(report);
    out += &queue_table(report);
    out += &foreground_lines(report);
    out
}

/// Per job: counts, latencies, per-target failures, the runner's check.
fn jobs_lines(report: &Report) -> String {
    let mut out = String::new();
    for job in &report.jobs {
        let _ = writeln!(
            out,
            "job '{}': {} × {}, {} ok; latency p50 {}, p99 {}, max {}; {} with read errors, {} sectors unreadable",
            job.name,
            job.jobs,
            job.kind,
            job.ok,
            duration(job.latency.p50_ms),
            duration(job.latency.p99_ms),
            duration(job.latency.max_ms),
            job.jobs_with_read_errors,
            job.read_failed_sectors,
        );
        for target in &job.targets {
            let _ = writeln!(
                out,
                "  target {}: {} jobs with write errors, {} sectors failed, {} sectors not copied",
                target.disk, target.jobs_with_write_errors, target.write_failed_sectors, target.not_copied_sectors
            );
        }
        for failure in &job.failures {
            let _ = writeln!(out, "  {failure}");
        }
        let check = &job.verification;
        if check.checked {
            let _ = writeln!(
                out,
                "  checked: {} target sectors against the source, {} mismatched; {}",
                check.sectors,
                check.mismatched_sectors,
                fault_log_finding(check)
            );
        } else {
            let _ = writeln!(out, "  not checked: {}", check.note);
        }
    }
    out
}

/// The engine's requests per disk, as a table.
fn disks_table(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "disks (the engine's requests):");
    let _ = writeln!(
        out,
        "  {:<12} {:>9} {:>10} {:>9} {:>9} {:>10} {:>9} {:>6} {:>7} {:>5} {:>6}",
        "disk",
        "reads",
        "read MB",
        "read ms",
        "writes",
        "written MB",
        "write ms",
        "busy%",
        "qd mean",
        "qd max",
        "errors"
    );
    for disk in &report.disks {
        let _ = writeln!(
            out,
            "  {:<12} {:>9} {:>10.1} {:>9.3} {:>9} {:>10.1} {:>9.3} {:>6.1} {:>7.2} {:>5} {:>6}",
            disk.disk,
            disk.reads,
            mb(disk.read_bytes as f64),
            disk.read_latency_ms_mean,
            disk.writes,
            mb(disk.written_bytes as f64),
            disk.write_latency_ms_mean,
            disk.busy_percent,
            disk.queue_depth_mean,
            disk.queue_depth_max,
            disk.errors
        );
    }
    out
}

/// The engine's request sizes, most common first.
fn io_sizes_lines(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "I/O sizes (the engine's requests, most common first):");
    let mut sizes = report.io_sizes.clone();
    sizes.sort_by_key(|s| std::cmp::Reverse(s.reads + s.writes));
    for size in sizes.iter().take(IO_SIZES_SHOWN) {
        let _ = writeln!(
            out,
            "  {:>10}  {:>9} reads  {:>9} writes",
            Bytes(size.size_bytes).to_string(),
            size.reads,
            size.writes
        );
    }
    if sizes.len() > IO_SIZES_SHOWN {
        let rest = &sizes[IO_SIZES_SHOWN..];
        let _ = writeln!(
            out,
            "  and {} other sizes: {} reads, {} writes (--json lists them)",
            rest.len(),
            rest.iter().map(|s| s.reads).sum::<u64>(),
            rest.iter().map(|s| s.writes).sum::<u64>()
        );
    }
    out
}

/// The foreground's latencies with the jobs (and alone), if the run had a foreground.
fn foreground_lines(report: &Report) -> String {
    let mut out = String::new();
    if let Some(foreground) = &report.foreground {
        let line = |l: &explore::Latencies| {
            format!(
                "p50 {}, p99 {}, p99.9 {}, max {} ({} requests)",
                duration(l.p50_ms),
                duration(l.p99_ms),
                duration(l.p999_ms),
                duration(l.max_ms),
                l.count
            )
        };
        let _ = writeln!(out, "foreground on {} ({:.0} requests/s with the jobs):", foreground.disk, foreground.iops);
        let _ = writeln!(out, "  with the jobs: {}", line(&foreground.with_jobs));
        if let Some(alone) = &foreground.alone {
            let _ = writeln!(out, "  alone:         {}", line(alone));
        }
    }
    out
}

/// Mean requests in flight per disk, over `QUEUE_ROWS` slices of the run.
fn queue_table(report: &Report) -> String {
    let mut out = String::new();
    if report.timeline.is_empty() || report.disks.is_empty() {
        return out;
    }
    let _ = write!(out, "queue depth over time (mean engine requests in flight), and copy MB/s:\n  {:>10}", "t (s)");
    for disk in &report.disks {
        let _ = write!(out, " {:>10}", disk.disk);
    }
    let _ = writeln!(out, " {:>10}", "read MB/s");
    let per_row = report.timeline.len().div_ceil(QUEUE_ROWS);
    for rows in report.timeline.chunks(per_row) {
        let _ = write!(out, "  {:>10.3}", rows[0].at_s);
        for disk in 0..report.disks.len() {
            let mean = rows.iter().map(|s| s.queue_depth[disk]).sum::<f64>() / rows.len() as f64;
            let _ = write!(out, " {mean:>10.2}");
        }
        let rate = rows.iter().map(|s| s.read_bytes_per_s).sum::<f64>() / rows.len() as f64;
        let _ = writeln!(out, " {:>10.1}", mb(rate));
    }
    out
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
        out::check_output_file(svg, "--svg")?;
    }
    let folder = folder_of(&args.scenario);
    let points = sweep_until_signal(interrupts, total, &bar, |on_done, stop| {
        explore::sweep_until(&tree, &folder, &varies, threads, on_done, stop)
            .map_err(|source| CliError::Scenario { path: shown.clone(), source })
    })?;
    bar.finish_and_clear();
    let stop = interrupts.stop_flag();
    let interrupted = stop.load(Ordering::Acquire).then(|| interrupted_code(points.len(), total));
    let order = explore::best_first(&points, metric);
    if let (Some(svg), None) = (&args.svg, interrupted) {
        plot::sweep_svg(svg, &varies, &points, metric).map_err(plot_error)?;
    }
    print_sweep(args.json, (&varies, &points, &order), metric.name, interrupted.map(|_| total))?;
    Ok(interrupted.map_or(Status::Success, Status::Interrupted))
}

/// Prints the sweep's points best first (`order`): JSON or the table. `interrupted_of` is the
/// number of points there would have been, when a signal stopped the sweep.
fn print_sweep(
    json: bool,
    (varies, points, order): (&[Vary], &[SweepPoint], &[usize]),
    metric: &str,
    interrupted_of: Option<usize>,
) -> Result<(), CliError> {
    if json {
        let rows: Vec<_> = order
            .iter()
            .map(|&i| {
                let point = &points[i];
                let values: serde_json::Map<String, serde_json::Value> =
                    point.values.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
                json!({ "values": values, "metric": point.report.metric(metric), "report": point.report })
            })
            .collect();
        let mut object = json!({ "metric": metric, "points": rows });
        if let Some(total) = interrupted_of {
            object["interrupted"] = json!(true);
            object["points_total"] = json!(total);
        }
        out::print(&format!("{object}\n"))?;
    } else {
        out::print(&sweep_table(varies, points, order, metric))?;
    }
    Ok(())
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
    interrupts.set_phase(Phase::Graceful);
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

/// The sweep's table, best first.
fn sweep_table(varies: &[Vary], points: &[SweepPoint], order: &[usize], metric: &str) -> String {
    let mut out = String::new();
    let columns = ["throughput_mb_per_s", "copy_seconds", "fg_p99_ms", "job_p99_ms", "pages_in_use_max"];
    let mut header: Vec<String> = varies.iter().map(|v| v.key.clone()).collect();
    header.push(format!("{metric} (sorted)"));
    header.extend(columns.iter().filter(|c| **c != metric).map(|c| c.to_string()));
    let rows: Vec<Vec<String>> = order
        .iter()
        .map(|&i| {
            let point = &points[i];
            let show = |name: &str| match point.report.metric(name) {
                None => "-".to_owned(),
                Some(v) if v.fract() == 0.0 && v.abs() < 1e15 => format!("{v:.0}"),
                Some(v) => format!("{v:.3}"),
            };
            let mut row: Vec<String> = point.values.iter().map(|(_, v)| v.clone()).collect();
            row.push(show(metric));
            row.extend(columns.iter().filter(|c| **c != metric).map(|c| show(c)));
            row
        })
        .collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|c| rows.iter().map(|r| r[c].len()).chain([header[c].len()]).max().unwrap_or(0))
        .collect();
    let line = |cells: &[String]| {
        cells.iter().zip(&widths).map(|(cell, w)| format!("{cell:>w$}")).collect::<Vec<_>>().join("  ")
    };
    let _ = writeln!(out, "{}", line(&header));
    for row in &rows {
        let _ = writeln!(out, "{}", line(row));
    }
    out
}

#[cfg(test)]
mod tests {
    use kcopyd_sim::explore::METRICS;

    #[test]
    fn durations_read_in_milliseconds_or_seconds() {
        assert_eq!(super::duration(0.192), "0.192 ms");
        assert_eq!(super::duration(9_999.0), "9999.000 ms");
        assert_eq!(super::duration(5_553_258.495), "5553.26 s");
    }

    #[test]
    fn the_help_of_metric_names_every_metric() {
        let help = include_str!("cli.rs");
        for metric in METRICS {
            assert!(help.contains(metric.name), "--metric's help names {}", metric.name);
        }
    }
}
