//! A clone in the simulator: hydration and an application's I/O through the [`CloneDevice`]
//! in virtual time, over disk models from kcopyd-sim (a remote source behind a link, a local
//! destination), to answer "how long does hydration take, and what does it cost the
//! application's latency" before running it for real. Feature `explore` (on by default).
//!
//! ```text
//!  clone scenario.toml ─► [clone] table (region size, CloneOptions)  ─┐
//!                       └► the rest: kcopyd-sim's Scenario (seed,     ├─► run()
//!                          [client], [disks.source], [disks.destination],│
//!                          [foreground] with disk = "clone")           ─┘
//!  run():
//!   Simulation #1: CloneDevice::create ─► run_hydration() ∥ foreground on the clone
//!                  until hydration ends (hydration time, p50/p99 of the application)
//!   Simulation #2: the same foreground on the destination alone (the hydrated clone: the
//!                  latency it is compared with), for as long, at most BASELINE_US_MAX
//! ```
//!
//! Time grows with the requests, not the bytes (the disks are sparse and move pattern
//! headers only): a 1 TiB clone at 64 KiB regions is 16 million copies; scenarios usually run
//! a smaller source and scale the hydration time linearly (`hours_per_tib` in the report).

use std::cell::{Cell, RefCell};
use std::fmt;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use kcopyd_core::{Device, PagePool, ReadBuf, SECTOR_SIZE, WriteBuf};
use kcopyd_sim::explore::{Access, Content, ForegroundSpec, Scenario, ScenarioError, Vary, parse_value, set_path};
use kcopyd_sim::{MemDisk, Simulation, mix64, to_model, to_tokio};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use toml::Value;

use crate::{CloneDevice, CloneDevices, CloneError, CloneOptions, HydrationEnd, metadata_bytes_needed};

/// The foreground's disk name that means "through the clone".
pub const CLONE_DISK: &str = "clone";
/// The baseline (the destination alone) runs at most this long, in model microseconds (60 s):
/// its latency is a steady state.
pub const BASELINE_US_MAX: u64 = 60_000_000;
/// Latencies are recorded up to this many microseconds (100 hours).
const LATENCY_US_MAX: u64 = 360_000_000_000;
/// One tebibyte, for the extrapolation.
const TIB: f64 = (1u64 << 40) as f64;

/// Why a clone scenario could not be read or run.
#[derive(Debug, Error)]
pub enum CloneScenarioError {
    /// The simulator's part of the scenario (disks, client, foreground, a key).
    #[error(transparent)]
    Scenario(#[from] ScenarioError),
    /// The `[clone]` table does not read.
    #[error("scenario [clone]: {problem}")]
    CloneTable {
        /// What is wrong.
        problem: String,
    },
    /// A disk the clone needs is missing, or the foreground is not on the clone.
    #[error("clone scenario: {problem}")]
    Shape {
        /// What is wrong.
        problem: String,
    },
    /// The clone refused its devices or options.
    #[error("clone scenario: {source}")]
    Clone {
        /// The clone's complaint.
        #[source]
        source: CloneError,
    },
}

/// The `[clone]` table: the region size and the hydration knobs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloneSpec {
    /// Region size in bytes (a power of two, 4 KiB to 1 GiB); `"64K"` reads too.
    pub region_size_bytes: u64,
    /// The hydration knobs (`[clone.options]`); the client's throttle is `[client.throttle]`.
    #[serde(default)]
    pub options: CloneOptions,
    /// Stop the hydration after this many virtual seconds (it reports the share hydrated and
    /// extrapolates); default: run until hydration ends.
    #[serde(default)]
    pub time_limit_s: Option<u64>,
}

/// A clone scenario: the simulator's scenario (disks `source` and `destination`, the client,
/// the foreground with `disk = "clone"`, no jobs) and the clone's own table.
#[derive(Debug, Clone, PartialEq)]
pub struct CloneScenario {
    /// Seed, client, disks and foreground (its `disk` stands for the clone).
    pub scenario: Scenario,
    /// Region size and options.
    pub clone: CloneSpec,
}

impl CloneScenario {
    /// Reads a clone scenario from a TOML value tree (after any `--set`); disk model files
    /// are found from `base`.
    ///
    /// # Errors
    /// The `[clone]` table is missing or wrong, the rest is not a scenario, a disk is missing,
    /// or the foreground is not on the clone.
    pub fn from_value_in(mut tree: Value, base: &Path) -> Result<CloneScenario, CloneScenarioError> {
        let table_error = |problem: String| CloneScenarioError::CloneTable { problem };
        let shape = |problem: String| CloneScenarioError::Shape { problem };
        let mut clone = match tree.as_table_mut().and_then(|t| t.remove("clone")) {
            Some(Value::Table(table)) => table,
            _ => return Err(table_error("missing: give region_size_bytes and [clone.options]".into())),
        };
        if let Some(Value::String(text)) = clone.get("region_size_bytes") {
            let bytes =
                kcopyd_sim::units::parse_size(text).map_err(|e| table_error(format!("region_size_bytes: {e}")))?;
            let bytes =
                i64::try_from(bytes).map_err(|_| table_error(format!("region_size_bytes {bytes}: too large")))?;
            clone.insert("region_size_bytes".into(), Value::Integer(bytes));
        }
        let clone: CloneSpec = Value::Table(clone).try_into().map_err(|e| table_error(format!("{e}")))?;
        let foreground = tree.get("foreground").ok_or_else(|| shape("no [foreground] (the application)".into()))?;
        let disk = foreground.get("disk").and_then(Value::as_str).unwrap_or_default();
        if disk != CLONE_DISK {
            return Err(shape(format!("the foreground's disk is '{disk}': it must be '{CLONE_DISK}'")));
        }
        if foreground.get("duration_us").is_some() {
            return Err(shape("the foreground runs until hydration ends: no duration_us".into()));
        }
        // The clone is as long as the source: check the foreground's region against it. The
        // simulator's scenario wants jobs or a foreground's duration: give it one, taken
        // back below.
        set_path(&mut tree, "foreground.disk", Value::String("source".into()))?;
        set_path(&mut tree, "foreground.duration_us", Value::Integer(1))?;
        let mut scenario = Scenario::from_value_in(tree, base)?;
        for disk in ["source", "destination"] {
            if !scenario.disks.contains_key(disk) {
                return Err(shape(format!("no [disks.{disk}]")));
            }
        }
        if scenario.disks.len() != 2 || !scenario.jobs.is_empty() {
            return Err(shape("only [disks.source] and [disks.destination], and no [[jobs]]".into()));
        }
        let source_sectors = scenario.disks["source"].options.len_sectors;
        if let Some(fg) = scenario.foreground.as_mut() {
            fg.duration_us = None;
            // The baseline runs on the destination, which may be longer: the same region.
            fg.len_sectors.get_or_insert(source_sectors.saturating_sub(fg.start_sector));
        }
        clone.options.validate().map_err(|source| CloneScenarioError::Clone { source })?;
        crate::check_region_size(clone.region_size_bytes).map_err(|source| CloneScenarioError::Clone { source })?;
        Ok(CloneScenario { scenario, clone })
    }

    /// Reads a clone scenario from TOML text (model files from the current directory).
    ///
    /// # Errors
    /// As [`CloneScenario::from_value_in`].
    pub fn from_toml(text: &str) -> Result<CloneScenario, CloneScenarioError> {
        let tree = kcopyd_sim::explore::parse_tree(text)?;
        CloneScenario::from_value_in(tree, Path::new("."))
    }
}

/// Latency percentiles of the application's requests, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    /// Requests completed.
    pub count: u64,
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Largest.
    pub max_ms: f64,
}

impl LatencySummary {
    fn of(histogram: &Histogram<u64>) -> LatencySummary {
        let ms = |us: u64| us as f64 / 1000.0;
        LatencySummary {
            count: histogram.len(),
            p50_ms: ms(histogram.value_at_quantile(0.50)),
            p99_ms: ms(histogram.value_at_quantile(0.99)),
            p999_ms: ms(histogram.value_at_quantile(0.999)),
            max_ms: ms(histogram.max()),
        }
    }
}

/// What a clone scenario's run reported.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CloneReport {
    /// How the background hydration ended (`complete`, or regions given up on).
    pub hydration_end: String,
    /// Virtual seconds from the clone's creation to the end of hydration.
    pub hydration_seconds: f64,
    /// The source's bytes over the hydration time, in MB/s.
    pub hydration_mb_per_s: f64,
    /// The share of regions hydrated at the end (1 unless stopped by `time_limit_s`).
    pub hydrated_fraction: f64,
    /// The hydration time scaled to a 1 TiB source, in hours (linear in the length and, when
    /// stopped early, in the share hydrated).
    pub hours_per_tib: f64,
    /// The source's length in bytes.
    pub source_bytes: u64,
    /// The clone's counters at the end (regions copied, writes that waited, …).
    pub stats: crate::CloneStats,
    /// The application during hydration, through the clone.
    pub foreground: Option<LatencySummary>,
    /// The same application on the destination alone (the clone once hydrated).
    pub baseline: Option<LatencySummary>,
    /// Wall time of both simulations, in seconds.
    pub wall_seconds: f64,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("valid histogram bounds")
}

fn model_us_since(origin: Instant) -> u64 {
    u64::try_from(to_model(Instant::now().saturating_duration_since(origin)).as_micros()).unwrap_or(u64::MAX)
}

/// Builds the scenario's disk `name` as the explore runner does (seeded by name).
fn build_disk(scenario: &Scenario, name: &str) -> Arc<MemDisk> {
    let spec = &scenario.disks[name];
    let mut options = spec.options.clone();
    let name_seed =
        name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    options.seed = mix64(scenario.seed ^ mix64(name_seed) ^ mix64(options.seed));
    options.latency.seed = mix64(options.seed ^ options.latency.seed ^ 0x006c_6174_656e_6379);
    let disk = Arc::new(MemDisk::new(options));
    if spec.content == Content::Pattern {
        disk.fill_pattern(disk.options().seed);
    }
    disk
}

/// Runs the scenario: hydration with the foreground through the clone, then the foreground
/// alone on the destination for the baseline.
///
/// # Errors
/// The client configuration is out of bounds, or the clone refused its devices.
pub fn run(scenario: &CloneScenario) -> Result<CloneReport, CloneScenarioError> {
    let wall = std::time::Instant::now();
    let spec = scenario.clone.clone();
    let (end, hydration_us, stats, foreground, fraction) =
        Simulation::run(scenario.scenario.client.clone(), |client, _| {
            let scenario = scenario.scenario.clone();
            async move {
                let source = build_disk(&scenario, "source");
                let destination = build_disk(&scenario, "destination");
                let len_sectors = source.options().len_sectors;
                let block = destination.options().logical_block_size;
                let metadata_sectors =
                    metadata_bytes_needed(len_sectors, spec.region_size_bytes, block).div_ceil(SECTOR_SIZE as u64);
                let metadata = Arc::new(MemDisk::zeroed("metadata", metadata_sectors, block));
                let devices = CloneDevices { source, destination, metadata };
                let origin = Instant::now();
                let clone = CloneDevice::create(devices, spec.region_size_bytes, client, spec.options)
                    .await
                    .map_err(|source| CloneScenarioError::Clone { source })?;
                let done = Rc::new(Cell::new(false));
                let foreground = scenario.foreground.clone().map(|fg| {
                    let device: Device = Arc::new(clone.clone());
                    actix_rt::spawn(run_foreground(fg, scenario.seed, device, origin, None, done.clone()))
                });
                let end = hydrate(&clone, origin, spec.time_limit_s).await;
                let hydration_us = model_us_since(origin);
                done.set(true);
                let foreground = match foreground {
                    Some(task) => Some(task.await.expect("the foreground task does not panic")),
                    None => None,
                };
                let status = clone.status();
                let fraction = status.regions_hydrated as f64 / status.regions_total.max(1) as f64;
                Ok::<_, CloneScenarioError>((end, hydration_us, clone.stats(), foreground, fraction))
            }
        })
        .map_err(|source| ScenarioError::Client { source })??;
    let baseline = match &scenario.scenario.foreground {
        Some(fg) => Some(run_baseline(&scenario.scenario, fg, hydration_us.clamp(1, BASELINE_US_MAX))?),
        None => None,
    };
    let source_bytes = scenario.scenario.disks["source"].options.len_sectors * SECTOR_SIZE as u64;
    let seconds = hydration_us as f64 / 1e6;
    Ok(CloneReport {
        hydration_end: match end {
            HydrationEnd::Complete => "complete".into(),
            other => format!("{other:?}"),
        },
        hydration_seconds: seconds,
        hydration_mb_per_s: fraction * source_bytes as f64 / 1e6 / seconds.max(1e-9),
        hydrated_fraction: fraction,
        hours_per_tib: seconds * TIB / (fraction * source_bytes as f64).max(1.0) / 3600.0,
        source_bytes,
        stats,
        foreground: foreground.map(|h| LatencySummary::of(&h)),
        baseline: baseline.map(|h| LatencySummary::of(&h)),
        wall_seconds: wall.elapsed().as_secs_f64(),
    })
}

/// Runs the hydration to its end, or stops it `time_limit_s` after `origin`.
async fn hydrate(clone: &CloneDevice, origin: Instant, time_limit_s: Option<u64>) -> HydrationEnd {
    let Some(limit_s) = time_limit_s else {
        return clone.run_hydration().await;
    };
    let deadline = origin + to_tokio(Duration::from_secs(limit_s));
    let stopper = clone.clone();
    let stop = actix_rt::spawn(async move {
        tokio::time::sleep_until(deadline).await;
        stopper.stop_hydration();
    });
    let end = clone.run_hydration().await;
    stop.abort();
    end
}

/// The foreground alone on the destination for `duration_us`.
fn run_baseline(scenario: &Scenario, fg: &ForegroundSpec, duration_us: u64) -> Result<Histogram<u64>, ScenarioError> {
    Simulation::run(scenario.client.clone(), |_, _| {
        let (scenario, fg) = (scenario.clone(), fg.clone());
        async move {
            let device: Device = build_disk(&scenario, "destination");
            let done = Rc::new(Cell::new(false));
            run_foreground(fg, scenario.seed, device, Instant::now(), Some(duration_us), done).await
        }
    })
    .map_err(|source| ScenarioError::Client { source })
}

/// The application: open loop at `rate_per_s` (at most `queue_depth` in flight, a request
/// that waits for a slot counts its wait), or closed loop, until `end_us` or `done`. Each
/// request's latency runs from when it was due.
async fn run_foreground(
    spec: ForegroundSpec,
    seed: u64,
    device: Device,
    origin: Instant,
    end_us: Option<u64>,
    done: Rc<Cell<bool>>,
) -> Histogram<u64> {
    let io_sectors = spec.io_size_bytes / SECTOR_SIZE as u64;
    let region_len = spec.len_sectors.unwrap_or(device.geometry().len_sectors - spec.start_sector);
    let positions = (region_len / io_sectors).max(1);
    let pages_per_io = (spec.io_size_bytes as usize).div_ceil(kcopyd_core::PAGE_SIZE);
    let pool = PagePool::with_huge_pages(pages_per_io * spec.queue_depth as usize, false)
        .expect("a small page arena for the foreground");
    let slots = Arc::new(Semaphore::new(spec.queue_depth as usize));
    let seed = mix64(seed ^ 0x666f_7265_6772_6f75);
    let latencies = Rc::new(RefCell::new(histogram()));
    let stop = || end_us.map_or_else(|| done.get(), |end| model_us_since(origin) >= end);
    let mut tasks = Vec::new();
    for n in 0u64.. {
        if let Some(due_us) = n.saturating_mul(1_000_000).checked_div(spec.rate_per_s) {
            tokio::time::sleep_until(origin + to_tokio(Duration::from_micros(due_us))).await;
        }
        let due_us = model_us_since(origin);
        if stop() {
            break;
        }
        let permit = slots.clone().acquire_owned().await.expect("never closed");
        let position = match spec.access {
            Access::Random => mix64(seed ^ mix64(n)) % positions,
            Access::Sequential => n % positions,
        };
        let offset = spec.start_sector + position * io_sectors;
        let read = mix64(seed ^ mix64(n) ^ 0x7277) % 100 < u64::from(spec.read_percent);
        let (device, pool, latencies) = (device.clone(), pool.clone(), latencies.clone());
        let len_bytes = spec.io_size_bytes as usize;
        tasks.push(actix_rt::spawn(async move {
            if read {
                let pages = pool.alloc(pages_per_io).await;
                let _ = device.read(offset, ReadBuf::new(pages, len_bytes)).await;
            } else {
                let _ = device.write(offset, WriteBuf::zeroes(len_bytes)).await;
            }
            drop(permit);
            let latency_us = model_us_since(origin) - due_us;
            latencies.borrow_mut().record(latency_us.clamp(1, LATENCY_US_MAX)).expect("within bounds");
        }));
        if tasks.len() > 4 * spec.queue_depth as usize {
            tasks.retain(|t: &actix_rt::task::JoinHandle<()>| !t.is_finished());
        }
    }
    for task in tasks {
        task.await.expect("a foreground request does not panic");
    }
    Rc::try_unwrap(latencies).expect("every request is done").into_inner()
}

/// One point of a sweep: the value of each varied key and the run's report.
#[derive(Debug, Clone, Serialize)]
pub struct ClonePoint {
    /// `(key, value)` per varied key, in the order given.
    pub values: Vec<(String, String)>,
    /// What the run reported.
    pub report: CloneReport,
}

/// Runs every point of the cross product of `varies` over `tree` (the last key varies
/// fastest), one after the other.
///
/// # Errors
/// The first point whose scenario does not read or run, naming its values.
pub fn sweep(tree: &Value, base: &Path, varies: &[Vary]) -> Result<Vec<ClonePoint>, CloneScenarioError> {
    let mut points: Vec<Vec<(String, String)>> = vec![Vec::new()];
    for vary in varies {
        points = points
            .into_iter()
            .flat_map(|point| {
                vary.values.iter().map(move |value| {
                    let mut point = point.clone();
                    point.push((vary.key.clone(), value.clone()));
                    point
                })
            })
            .collect();
    }
    let mut reports = Vec::with_capacity(points.len());
    for values in points {
        let mut tree = tree.clone();
        for (key, value) in &values {
            set_path(&mut tree, key, parse_value(value))?;
        }
        let report = run(&CloneScenario::from_value_in(tree, base)?)?;
        reports.push(ClonePoint { values, report });
    }
    Ok(reports)
}

impl fmt::Display for CloneReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let stats = &self.stats;
        writeln!(
            f,
            "hydration:  {} ({:.1} % of regions) in {:.3} s virtual ({:.2} s wall): {:.1} MB/s, {:.2} h per TiB",
            self.hydration_end,
            self.hydrated_fraction * 100.0,
            self.hydration_seconds,
            self.wall_seconds,
            self.hydration_mb_per_s,
            self.hours_per_tib
        )?;
        writeln!(
            f,
            "clone:      {} regions copied in {} background jobs; {} reads ({} source sectors), {} writes ({} waited for a copy), {} commits",
            stats.regions_copied,
            stats.hydration_jobs,
            stats.reads,
            stats.read_source_sectors,
            stats.writes,
            stats.writes_waited,
            stats.commits
        )?;
        let line = |f: &mut fmt::Formatter<'_>, what: &str, l: &LatencySummary| {
            writeln!(
                f,
                "{what} p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms ({} requests)",
                l.p50_ms, l.p99_ms, l.p999_ms, l.max_ms, l.count
            )
        };
        if let Some(fg) = &self.foreground {
            line(f, "foreground during hydration:", fg)?;
        }
        if let Some(baseline) = &self.baseline {
            line(f, "foreground on the hydrated clone:", baseline)?;
        }
        Ok(())
    }
}
