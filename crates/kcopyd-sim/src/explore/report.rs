//! What a scenario run reports: one serde value, printed as text or JSON, and the metrics a
//! sweep sorts by.

use serde::Serialize;

use super::verify::Verification;

/// Latency percentiles of a set of requests or jobs, in milliseconds of virtual time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Latencies {
    /// How many were measured.
    pub count: u64,
    /// Mean.
    pub mean_ms: f64,
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Largest.
    pub max_ms: f64,
}

impl Latencies {
    /// Percentiles of a histogram of microseconds.
    pub(crate) fn of(histogram: &hdrhistogram::Histogram<u64>) -> Latencies {
        let ms = |us: u64| us as f64 / 1000.0;
        Latencies {
            count: histogram.len(),
            mean_ms: histogram.mean() / 1000.0,
            p50_ms: ms(histogram.value_at_quantile(0.5)),
            p99_ms: ms(histogram.value_at_quantile(0.99)),
            p999_ms: ms(histogram.value_at_quantile(0.999)),
            max_ms: ms(histogram.max()),
        }
    }
}

/// What happened on one target of a `[[jobs]]` entry, summed over its jobs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TargetOutcome {
    /// The target disk.
    pub disk: String,
    /// Jobs whose write to this target failed.
    pub jobs_with_write_errors: u64,
    /// Sectors whose write failed.
    pub write_failed_sectors: u64,
    /// Sectors that do not hold the source's data after the jobs.
    pub not_copied_sectors: u64,
    /// The first [`RANGES_LISTED`] ranges of sectors whose write failed, `[start, end)`.
    pub write_failed_ranges: Vec<[u64; 2]>,
}

/// Failed ranges listed in a report (all of them are counted).
pub const RANGES_LISTED: usize = 16;

/// The outcome of one `[[jobs]]` entry (all its repetitions).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct JobReport {
    /// The entry's name.
    pub name: String,
    /// `copy` or `zero`.
    pub kind: String,
    /// Jobs submitted.
    pub jobs: u64,
    /// Jobs that copied every sector to every target.
    pub ok: u64,
    /// Jobs with a read error.
    pub jobs_with_read_errors: u64,
    /// Source sectors that could not be read.
    pub read_failed_sectors: u64,
    /// The first [`RANGES_LISTED`] ranges of unreadable source sectors, `[start, end)`.
    pub read_failed_ranges: Vec<[u64; 2]>,
    /// Bytes per job times jobs.
    pub bytes: u64,
    /// When the first job was submitted, in virtual seconds.
    pub first_submit_s: f64,
    /// When the last job completed, in virtual seconds.
    pub last_complete_s: f64,
    /// Time from submission to completion of each job (what a caller waiting on it sees).
    pub latency: Latencies,
    /// Per target, in the order given.
    pub targets: Vec<TargetOutcome>,
    /// The first few jobs that did not finish cleanly, one line each.
    pub failures: Vec<String>,
    /// The targets checked against the sources after the run.
    pub verification: Verification,
}

/// The engine's requests on one disk.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DiskReport {
    /// The disk.
    pub disk: String,
    /// Read requests of the engine.
    pub reads: u64,
    /// Bytes the engine read.
    pub read_bytes: u64,
    /// Mean latency of the engine's reads.
    pub read_latency_ms_mean: f64,
    /// Write (and write-zeroes) requests of the engine.
    pub writes: u64,
    /// Bytes the engine wrote.
    pub written_bytes: u64,
    /// Mean latency of the engine's writes: the target with the highest bounds the copy.
    pub write_latency_ms_mean: f64,
    /// Share of the copy's time with at least one engine request in flight, in percent.
    pub busy_percent: f64,
    /// Mean engine requests in flight over the copy.
    pub queue_depth_mean: f64,
    /// Most engine requests in flight at once.
    pub queue_depth_max: u64,
    /// Requests that failed (engine and foreground).
    pub errors: u64,
}

/// How many engine requests had one size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct IoSizeCount {
    /// Bytes per request.
    pub size_bytes: u64,
    /// Reads of that size.
    pub reads: u64,
    /// Writes of that size.
    pub writes: u64,
}

/// The foreground's latency with the jobs running and alone.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ForegroundReport {
    /// The disk.
    pub disk: String,
    /// With the jobs running.
    pub with_jobs: Latencies,
    /// The same workload alone for as long (absent when the scenario has no jobs).
    pub alone: Option<Latencies>,
    /// Requests per second achieved with the jobs running.
    pub iops: f64,
}

/// One bucket of the timeline.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Sample {
    /// Start of the bucket, in virtual seconds.
    pub at_s: f64,
    /// Bytes per second the engine read in the bucket (the copy's progress).
    pub read_bytes_per_s: f64,
    /// Bytes per second the engine wrote in the bucket (all targets).
    pub written_bytes_per_s: f64,
    /// Mean foreground latency of requests completed in the bucket, with the jobs.
    pub foreground_ms_mean: Option<f64>,
    /// Largest foreground latency in the bucket, with the jobs.
    pub foreground_ms_max: Option<f64>,
    /// Mean foreground latency in the same bucket of the run without jobs.
    pub foreground_alone_ms_mean: Option<f64>,
    /// Mean engine requests in flight per disk, in the order of `disks`.
    pub queue_depth: Vec<f64>,
}

/// Everything a scenario run reports.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ScenarioReport {
    /// The scenario's description.
    pub description: String,
    /// The scenario's seed.
    pub seed: u64,
    /// Virtual time from the start of the run to the last job's completion.
    pub copy_seconds: f64,
    /// Virtual time the whole run took (jobs and foreground).
    pub virtual_seconds: f64,
    /// Wall-clock time the simulation took (both runs when there is a foreground baseline).
    pub wall_seconds: f64,
    /// Bytes of all jobs (source bytes of copies, target range of zeroes).
    pub job_bytes: u64,
    /// `job_bytes` over the time from the first submission to the last completion, in
    /// decimal megabytes per second.
    pub throughput_mb_per_s: f64,
    /// Whether every job copied every sector to every target, and the targets checked hold
    /// what the jobs reported.
    pub all_ok: bool,
    /// Pages of the budget.
    pub page_budget: usize,
    /// Most pages in use at once.
    pub pages_in_use_max: usize,
    /// Each `[[jobs]]` entry.
    pub jobs: Vec<JobReport>,
    /// The engine's requests per disk.
    pub disks: Vec<DiskReport>,
    /// Engine request sizes.
    pub io_sizes: Vec<IoSizeCount>,
    /// The foreground's latency.
    pub foreground: Option<ForegroundReport>,
    /// Width of one timeline bucket, in virtual seconds.
    pub bucket_s: f64,
    /// Throughput, queue depth and foreground latency over virtual time.
    pub timeline: Vec<Sample>,
}

/// A metric a sweep can sort by: name, meaning, and whether higher is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metric {
    /// The name given to `--metric`.
    pub name: &'static str,
    /// What it measures.
    pub meaning: &'static str,
    /// Whether a higher value is better (sorted first).
    pub higher_is_better: bool,
}

/// Every metric, the first being the default.
pub const METRICS: [Metric; 9] = [
    Metric { name: "throughput_mb_per_s", meaning: "job bytes per second, MB/s", higher_is_better: true },
    Metric { name: "copy_seconds", meaning: "virtual seconds until the last job completes", higher_is_better: false },
    Metric { name: "fg_p50_ms", meaning: "foreground median latency with the jobs", higher_is_better: false },
    Metric { name: "fg_p99_ms", meaning: "foreground 99th percentile latency with the jobs", higher_is_better: false },
    Metric {
        name: "fg_p999_ms",
        meaning: "foreground 99.9th percentile latency with the jobs",
        higher_is_better: false,
    },
    Metric {
        name: "job_p50_ms",
        meaning: "median job latency (submission to completion), worst entry",
        higher_is_better: false,
    },
    Metric { name: "job_p99_ms", meaning: "99th percentile job latency, worst entry", higher_is_better: false },
    Metric { name: "pages_in_use_max", meaning: "most pages in use at once", higher_is_better: false },
    Metric {
        name: "not_copied_sectors",
        meaning: "target sectors left without the source's data",
        higher_is_better: false,
    },
];

/// The metric called `name`.
pub fn metric(name: &str) -> Option<Metric> {
    METRICS.iter().copied().find(|m| m.name == name)
}

impl ScenarioReport {
    /// The value of metric `name` (see [`METRICS`]); `None` for an unknown name or a
    /// foreground metric of a scenario without a foreground.
    pub fn metric(&self, name: &str) -> Option<f64> {
        let worst_job = |f: fn(&Latencies) -> f64| self.jobs.iter().map(|j| f(&j.latency)).reduce(f64::max);
        match name {
            "throughput_mb_per_s" => Some(self.throughput_mb_per_s),
            "copy_seconds" => Some(self.copy_seconds),
            "fg_p50_ms" => self.foreground.as_ref().map(|f| f.with_jobs.p50_ms),
            "fg_p99_ms" => self.foreground.as_ref().map(|f| f.with_jobs.p99_ms),
            "fg_p999_ms" => self.foreground.as_ref().map(|f| f.with_jobs.p999_ms),
            "job_p50_ms" => worst_job(|l| l.p50_ms),
            "job_p99_ms" => worst_job(|l| l.p99_ms),
            "pages_in_use_max" => Some(self.pages_in_use_max as f64),
            "not_copied_sectors" => {
                Some(self.jobs.iter().flat_map(|j| &j.targets).map(|t| t.not_copied_sectors).sum::<u64>() as f64)
            }
            _ => None,
        }
    }
}
