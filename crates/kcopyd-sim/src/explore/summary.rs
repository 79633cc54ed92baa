//! What a run and a sweep look like to people: the summary of a [`ScenarioReport`] (its `Display`),
//! and the points of a sweep ranked by a metric ([`Ranking`]: a table, or one JSON object).
//!
//! ```text
//!  ScenarioReport ──► Display: headline, pages, jobs and targets, disks, I/O sizes, queue depth over
//!             time, foreground
//!  [SweepPoint] + Metric ──► best_first ──► Ranking ──► Display (table) | to_json()
//! ```

use std::fmt::{self, Write as _};

use serde_json::json;

use super::{Latencies, Metric, ScenarioReport, SweepPoint, Vary, Verification, best_first};
use crate::units::Bytes;

/// Rows of the queue-depth table in the summary.
const QUEUE_ROWS: usize = 10;
/// Request sizes listed in the summary (narrowed-down reads make many).
const IO_SIZES_SHOWN: usize = 6;
/// The columns of a sweep's table besides the varied keys and the sorting metric.
const SWEEP_COLUMNS: [&str; 5] = ["throughput_mb_per_s", "copy_seconds", "fg_p99_ms", "job_p99_ms", "pages_in_use_max"];

impl fmt::Display for ScenarioReport {
    /// The summary for people: the jobs' bytes, time and outcome; pages; per job its
    /// latencies, failures and the runner's check; the disks' requests; request sizes; queue
    /// depth over time; the foreground's latency.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&summary(self))
    }
}

/// The points of a sweep, best first by a metric: [`Display`](fmt::Display) writes the table,
/// [`Ranking::to_json`] the object `kcopyd sim sweep --json` prints.
#[derive(Debug, Clone)]
pub struct Ranking<'a> {
    varies: &'a [Vary],
    points: &'a [SweepPoint],
    metric: Metric,
    order: Vec<usize>,
    interrupted_of: Option<usize>,
}

impl<'a> Ranking<'a> {
    /// Ranks `points` (made by varying `varies`) by `metric`. `interrupted_of` is the number
    /// of points there would have been, when a signal stopped the sweep early: the JSON says
    /// so.
    pub fn new(varies: &'a [Vary], points: &'a [SweepPoint], metric: Metric, interrupted_of: Option<usize>) -> Self {
        Ranking { varies, points, metric, order: best_first(points, metric), interrupted_of }
    }

    /// The indices of the points, best first.
    pub fn order(&self) -> &[usize] {
        &self.order
    }

    /// One JSON object: the metric, and per point (best first) the varied keys' values, the
    /// metric's value and the whole report; `interrupted` and `points_total` when a signal
    /// stopped the sweep.
    pub fn to_json(&self) -> serde_json::Value {
        let metric = self.metric.name;
        let rows: Vec<_> = self
            .order
            .iter()
            .map(|&i| {
                let point = &self.points[i];
                let values: serde_json::Map<String, serde_json::Value> =
                    point.values.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
                json!({ "values": values, "metric": point.report.metric(metric), "report": point.report })
            })
            .collect();
        let mut object = json!({ "metric": metric, "points": rows });
        if let Some(total) = self.interrupted_of {
            object["interrupted"] = json!(true);
            object["points_total"] = json!(total);
        }
        object
    }
}

impl fmt::Display for Ranking<'_> {
    /// The table: a column per varied key, the metric (sorted) and the usual metrics; a row
    /// per point, best first; `-` where a point has no value (no foreground).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&sweep_table(self.varies, self.points, &self.order, self.metric.name))
    }
}

fn mb(bytes: f64) -> f64 {
    bytes / 1e6
}

/// Milliseconds for people: `0.192 ms`, `83.455 ms`, `5553.26 s`.
pub(crate) fn duration(ms: f64) -> String {
    if ms < 10_000.0 { format!("{ms:.3} ms") } else { format!("{:.2} s", ms / 1000.0) }
}

/// What the check of an entry's failures against the fault logs found, in a few words.
fn fault_log_finding(check: &Verification) -> String {
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

/// The summary of a run for people (what `ScenarioReport`'s `Display` writes).
fn summary(report: &ScenarioReport) -> String {
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
fn jobs_lines(report: &ScenarioReport) -> String {
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
fn disks_table(report: &ScenarioReport) -> String {
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
fn io_sizes_lines(report: &ScenarioReport) -> String {
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
fn foreground_lines(report: &ScenarioReport) -> String {
    let mut out = String::new();
    if let Some(foreground) = &report.foreground {
        let line = |l: &Latencies| {
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
fn queue_table(report: &ScenarioReport) -> String {
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

/// The sweep's table, best first.
fn sweep_table(varies: &[Vary], points: &[SweepPoint], order: &[usize], metric: &str) -> String {
    let mut out = String::new();
    let columns = SWEEP_COLUMNS;
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
    use super::*;
    use crate::explore::{JobReport, metric};

    #[test]
    fn durations_read_in_milliseconds_or_seconds() {
        assert_eq!(duration(0.192), "0.192 ms");
        assert_eq!(duration(9_999.0), "9999.000 ms");
        assert_eq!(duration(5_553_258.495), "5553.26 s");
    }

    /// A report of one job entry with the given throughput and job p99.
    fn report(throughput_mb_per_s: f64, p99_ms: f64) -> ScenarioReport {
        let mut job = JobReport { name: "copy".into(), kind: "copy".into(), jobs: 2, ok: 2, ..JobReport::default() };
        job.latency.p99_ms = p99_ms;
        job.verification.note = "not asked".into();
        ScenarioReport {
            throughput_mb_per_s,
            page_budget: 64,
            pages_in_use_max: 8,
            jobs: vec![job],
            ..ScenarioReport::default()
        }
    }

    #[test]
    fn the_summary_names_the_outcome_and_every_job() {
        let text = report(12.5, 3.0).to_string();
        assert!(text.starts_with("jobs:     0 B in 0.000 s virtual"), "{text}");
        assert!(text.contains("12.5 MB/s, NOT every job ok"), "{text}");
        assert!(text.contains("pages:    8 in use at most, of 64"), "{text}");
        assert!(text.contains("job 'copy': 2 × copy, 2 ok; latency p50 0.000 ms, p99 3.000 ms"), "{text}");
        assert!(text.contains("  not checked: not asked"), "{text}");
    }

    #[test]
    fn a_ranking_puts_the_best_point_first_in_the_table_and_the_json() {
        let varies = [Vary { key: "client.page_budget".into(), values: vec!["8".into(), "64".into()] }];
        let point = |value: &str, throughput| SweepPoint {
            values: vec![("client.page_budget".into(), value.into())],
            report: report(throughput, 1.0),
        };
        let points = [point("8", 10.0), point("64", 40.0)];
        let throughput = metric("throughput_mb_per_s").unwrap();
        let ranking = Ranking::new(&varies, &points, throughput, None);
        assert_eq!(ranking.order(), [1, 0]);
        let table = ranking.to_string();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert!(lines[0].contains("client.page_budget") && lines[0].contains("throughput_mb_per_s (sorted)"));
        assert!(lines[1].trim_start().starts_with("64") && lines[1].contains("40"), "{table}");
        let json = ranking.to_json();
        assert_eq!(json["points"][0]["values"]["client.page_budget"], "64");
        assert_eq!(json["points"][0]["metric"], 40.0);
        assert!(json.get("interrupted").is_none());
        let stopped = Ranking::new(&varies, &points[..1], throughput, Some(2)).to_json();
        assert_eq!((stopped["interrupted"].clone(), stopped["points_total"].clone()), (json!(true), json!(2)));
    }
}
