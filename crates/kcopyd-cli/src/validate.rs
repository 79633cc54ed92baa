//! `kcopyd sim validate`: the same copies on the real device and in the simulator, side by
//! side, so that the disk model's predictions carry a measured error.
//!
//! ```text
//!  model (--model, or calibrate a scratch file next to TARGET)
//!  real:      warm-up copy, then --runs rounds × configurations, alternating  ─► median s
//!  simulated: each configuration once in virtual time, sparse pattern disks,
//!             one Medium when SOURCE and TARGET are on one device            ─► model s
//!  error = (predicted − measured) / measured
//! ```
//!
//! The real copies go through `kcopyd copy` itself (the same checks, engine, flush and
//! timing), so a prediction is compared with exactly what a user sees.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kcopyd_core::{BlockDevice, ClientConfig, Device, Flags, Job, PAGE_SIZE, Region, SECTOR_SIZE};
use kcopyd_os::{OpenOptions, OsDevice};
use kcopyd_sim::{DiskModel, Simulation};
use serde::Serialize;

use crate::calibrate::{self, Plan, Scratch};
use crate::cli::ValidateArgs;
use crate::error::{CliError, Status, open_reason};
use crate::progress::{self, Interrupts};
use crate::size::{self, Bytes};
use crate::{commands, devices};
use kcopyd_tool::{Backend, DeviceAddress};

/// The most targets a configuration may name.
pub const TARGETS_MAX: usize = 8;
/// The most rounds of real copies.
pub const RUNS_MAX: usize = 100;

/// One configuration: how the copy is cut and how many targets it writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Config {
    /// Bytes per sub-job.
    pub sub_job_size_bytes: u64,
    /// Sub-jobs in flight.
    pub subjobs_in_flight: usize,
    /// Targets written.
    pub targets: usize,
}

impl Config {
    /// Reads `SIZExIN_FLIGHTxTARGETS`, e.g. `1Mx4x1`.
    ///
    /// # Errors
    /// Not three parts, a size that does not parse, or counts out of bounds.
    pub fn parse(text: &str) -> Result<Config, CliError> {
        let bad = |problem: String| CliError::argument("--configs", text, problem);
        let parts: Vec<&str> = text.split('x').collect();
        let [size, in_flight, targets] = parts[..] else {
            return Err(bad("not SUB_JOB_SIZExIN_FLIGHTxTARGETS, e.g. 1Mx4x1".into()));
        };
        let sub_job_size_bytes = size::parse_size(size).map_err(|error| bad(error.to_string()))?;
        let count = |text: &str, max: usize, what: &str| {
            text.parse::<usize>()
                .ok()
                .filter(|n| (1..=max).contains(n))
                .ok_or_else(|| bad(format!("{what} '{text}' is not a whole number from 1 to {max}")))
        };
        Ok(Config {
            sub_job_size_bytes,
            subjobs_in_flight: count(in_flight, 1024, "sub-jobs in flight")?,
            targets: count(targets, TARGETS_MAX, "targets")?,
        })
    }

    fn label(&self) -> String {
        format!("{} × {} → {}", Bytes(self.sub_job_size_bytes), self.subjobs_in_flight, self.targets)
    }
}

/// One configuration's result.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// The configuration.
    #[serde(flatten)]
    pub config: Config,
    /// Seconds of each real copy, in the order run.
    pub measured_seconds: Vec<f64>,
    /// Their median.
    pub measured_median_seconds: f64,
    /// The fastest of them: on a busy machine, the one least slowed by other work.
    pub measured_min_seconds: f64,
    /// What the simulator predicts (model seconds).
    pub predicted_seconds: f64,
    /// `(predicted − measured median) / measured median × 100`.
    pub error_percent: f64,
}

/// The whole result.
#[derive(Debug, Clone, Serialize)]
pub struct Validation {
    /// The model's description.
    pub model: String,
    /// The source.
    pub source: String,
    /// Bytes copied by each copy.
    pub len_bytes: u64,
    /// Whether the simulated disks shared one data path (SOURCE and TARGET on one device).
    pub one_device: bool,
    /// Rounds of real copies.
    pub runs: usize,
    /// One row per configuration, in the order given.
    pub configs: Vec<Row>,
    /// The largest error, in absolute value.
    pub max_abs_error_percent: f64,
}

/// The error of a prediction, in percent of the measurement.
///
/// Worked example: predicted 0.69 s, measured 0.60 s: +15 %; predicted 0.51 s: −15 %.
pub fn error_percent(predicted_seconds: f64, measured_seconds: f64) -> f64 {
    if measured_seconds > 0.0 { (predicted_seconds - measured_seconds) / measured_seconds * 100.0 } else { 0.0 }
}

/// The median (upper median for an even count).
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(0.0)
}

/// Target files of the configurations: TARGET, TARGET.2, TARGET.3, …; those created here are
/// removed when this is dropped.
#[derive(Debug)]
struct Targets {
    paths: Vec<PathBuf>,
    created: Vec<PathBuf>,
}

impl Targets {
    fn new(target: &Path, count: usize) -> Targets {
        let paths: Vec<PathBuf> = (1..=count)
            .map(|i| if i == 1 { target.to_path_buf() } else { PathBuf::from(format!("{}.{i}", target.display())) })
            .collect();
        let created: Vec<PathBuf> = paths.iter().filter(|p| fs::symlink_metadata(p).is_err()).cloned().collect();
        progress::remove_on_quit(&created);
        Targets { paths, created }
    }
}

impl Drop for Targets {
    fn drop(&mut self) {
        for path in &self.created {
            let _ = fs::remove_file(path);
        }
        progress::forget_created(&self.created);
    }
}

/// The device a path lives on: a block device's own number, else its filesystem's.
fn device_number(path: &Path) -> Option<u64> {
    use std::os::unix::fs::FileTypeExt;
    let metadata = fs::metadata(path).ok()?;
    Some(if metadata.file_type().is_block_device() { metadata.rdev() } else { metadata.dev() })
}

/// Runs the copy of `config` through `kcopyd copy` and returns its seconds.
async fn real_copy(
    args: &ValidateArgs,
    config: Config,
    targets: &Targets,
    interrupts: &mut Interrupts,
) -> Result<Result<f64, Status>, CliError> {
    let arg = |path: &Path| DeviceAddress {
        text: path.display().to_string(),
        backend: Backend::Path(path.to_path_buf()),
        offset_bytes: 0,
    };
    let source = arg(&args.source);
    let target_args: Vec<DeviceAddress> = targets.paths[..config.targets].iter().map(|p| arg(p)).collect();
    let client_config = kcopyd_core::ClientConfig {
        page_budget: usize::try_from(args.memory_bytes / PAGE_SIZE as u64).unwrap_or(usize::MAX),
        sub_job_size_bytes: usize::try_from(config.sub_job_size_bytes).unwrap_or(usize::MAX),
        subjobs_in_flight: config.subjobs_in_flight,
        ..kcopyd_core::ClientConfig::default()
    };
    devices::check_memory(args.memory_bytes)?;
    client_config.validate().map_err(|source| CliError::Config { option: "--memory", source })?;
    let settings = kcopyd_tool::Settings::new(client_config);
    // A full copy, as the simulated one: the disk model times every sector read.
    let options = kcopyd_tool::run::CopyOptions::default();
    let mut plan = devices::open_plan(&source, &target_args, None, true, &settings, interrupts).await?;
    let done = commands::copy_planned(&mut plan, &settings, options, true, interrupts).await;
    // Between copies (the simulation, the table) a signal quits at once; the files made for
    // the targets go with it (the copy forgot the ones it created when its job started).
    progress::remove_on_quit(&targets.created);
    interrupts.set_summary(Some(Box::new(|| {
        "kcopyd: interrupted: validation stopped, no table (the target files it created are removed)".to_owned()
    })));
    interrupts.set_phase(progress::Phase::QuitAtOnce);
    let done = done?;
    if done.status != Status::Success {
        crate::out::note_text(&crate::report::human(&done.report));
        return Ok(Err(done.status));
    }
    Ok(Ok(done.report.seconds))
}

/// The model seconds of `config` in the simulator: sparse pattern disks of the source's
/// length and block, on one medium when `one_device`.
fn simulated_copy(
    model: &DiskModel,
    config: Config,
    len_bytes: u64,
    block_bytes: u32,
    one_device: bool,
    memory_bytes: u64,
) -> f64 {
    let len_sectors = len_bytes / SECTOR_SIZE as u64;
    let client_config = ClientConfig {
        page_budget: usize::try_from(memory_bytes / PAGE_SIZE as u64).unwrap_or(usize::MAX),
        sub_job_size_bytes: config.sub_job_size_bytes as usize,
        subjobs_in_flight: config.subjobs_in_flight,
        ..ClientConfig::default()
    };
    let model = model.clone();
    // Simulation runs its own runtime: on a thread of its own, not inside this one.
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                Simulation::run(client_config, |client, _trace| async move {
                    let medium = if one_device { Some(kcopyd_sim::Medium::new()) } else { None };
                    let disk = |name: &str, seed: u64| {
                        let mut options = model.options(name, len_sectors, seed);
                        options.sparse = true;
                        options.logical_block_size = block_bytes;
                        Arc::new(DiskModel::disk(options, medium.as_ref()))
                    };
                    let source = disk("source", 1);
                    source.fill_pattern(1);
                    let targets: Vec<Region> = (0..config.targets)
                        .map(|i| {
                            let target: Device = disk(&format!("target{i}"), 2 + i as u64);
                            Region::new(target, 0, len_sectors)
                        })
                        .collect();
                    let began = tokio::time::Instant::now();
                    let source: Device = source;
                    let job = Job::copy(Region::new(source, 0, len_sectors), targets, Flags::empty());
                    let outcome = client.submit(job).await.expect("a checked job is accepted").await;
                    assert!(outcome.is_ok(), "a simulated copy without faults succeeds: {outcome:?}");
                    kcopyd_sim::to_model(began.elapsed()).as_secs_f64()
                })
            })
            .join()
            .expect("the simulation does not panic")
    })
    .unwrap_or(f64::NAN)
}

/// `kcopyd sim validate`.
///
/// # Errors
/// Bad arguments or model (nothing written), or a failed copy.
pub async fn run(args: &ValidateArgs, interrupts: &mut Interrupts) -> Result<Status, CliError> {
    let configs: Vec<Config> = args.configs.iter().map(|c| Config::parse(c)).collect::<Result<_, _>>()?;
    if configs.is_empty() {
        return Err(CliError::Arguments { what: "--configs", problem: "no configuration given".into() });
    }
    if !(1..=RUNS_MAX).contains(&args.runs) {
        return Err(CliError::argument("--runs", args.runs.to_string(), format!("must be 1 to {RUNS_MAX}")));
    }
    let source_text = args.source.display().to_string();
    let source = OsDevice::open(&args.source, &OpenOptions::default()).map_err(|source| CliError::Open {
        what: "SOURCE",
        text: source_text.clone(),
        reason: open_reason(&source, None),
        source,
    })?;
    let geometry = source.geometry();
    let len_bytes = geometry.len_sectors * SECTOR_SIZE as u64;
    drop(source);
    let bars = progress::bars_wanted(args.quiet);
    let model = match &args.model {
        Some(path) => calibrate::load(path)?,
        None => {
            let scratch_path = PathBuf::from(format!("{}.calibrate", args.target.display()));
            let scratch = Scratch::open(&scratch_path, 1 << 30, 0, None, false)?;
            let plan = Plan {
                io_sizes_bytes: vec![4 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20],
                queue_depths: vec![1, 4, 16, 32],
                point_time: std::time::Duration::from_millis(250),
                rounds: 3,
                bars,
            };
            let calibrated = calibrate::calibrate(&scratch, &plan).await?;
            calibrate::warn_if_busy(&calibrated);
            calibrated.model
        }
    };
    let target_count = configs.iter().map(|c| c.targets).max().unwrap_or(1);
    // TARGET.2, TARGET.3, … are files next to TARGET: only next to a file.
    let target_is_other = fs::metadata(&args.target).is_ok_and(|m| !m.is_file());
    if target_is_other && target_count > 1 {
        return Err(CliError::argument(
            "TARGET",
            args.target.display().to_string(),
            "is not a regular file: configurations with more than one target write TARGET.2, TARGET.3, … \
             next to TARGET, which needs TARGET to be a file",
        ));
    }
    let targets = Targets::new(&args.target, target_count);
    let target_dir = args.target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let one_device = device_number(&args.source).is_some() && device_number(&args.source) == device_number(target_dir);
    let bar = progress::byte_bar(bars, (1 + args.runs * configs.len() + configs.len()) as u64, "validate");
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg:<28} [{wide_bar}] {pos}/{len} copies ETA {eta}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    // A warm-up copy to every target (creating the files), not counted.
    let widest = *configs.iter().max_by_key(|c| c.targets).expect("at least one");
    bar.set_message(format!("warm-up {}", widest.label()));
    if let Err(status) = real_copy(args, widest, &targets, interrupts).await? {
        return Ok(status);
    }
    bar.inc(1);
    let mut measured: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    for round in 0..args.runs {
        for (i, &config) in configs.iter().enumerate() {
            bar.set_message(format!("run {}/{} {}", round + 1, args.runs, config.label()));
            match real_copy(args, config, &targets, interrupts).await? {
                Ok(seconds) => measured[i].push(seconds),
                Err(status) => return Ok(status),
            }
            bar.inc(1);
        }
    }
    let mut rows = Vec::new();
    for (config, measured) in configs.iter().zip(measured) {
        bar.set_message(format!("simulate {}", config.label()));
        let predicted =
            simulated_copy(&model, *config, len_bytes, geometry.logical_block_size, one_device, args.memory_bytes);
        bar.inc(1);
        let measured_median = median(&measured);
        rows.push(Row {
            config: *config,
            measured_min_seconds: measured.iter().copied().fold(f64::INFINITY, f64::min),
            measured_seconds: measured,
            measured_median_seconds: measured_median,
            predicted_seconds: predicted,
            error_percent: error_percent(predicted, measured_median),
        });
    }
    bar.finish_and_clear();
    drop(targets);
    let validation = Validation {
        model: model.description.clone(),
        source: source_text,
        len_bytes,
        one_device,
        runs: args.runs,
        max_abs_error_percent: rows.iter().map(|r| r.error_percent.abs()).fold(0.0, f64::max),
        configs: rows,
    };
    if args.json {
        crate::out::print(&format!("{}\n", serde_json::to_string(&validation).expect("a validation serializes")))?;
    } else {
        crate::out::print(&human(&validation))?;
    }
    Ok(Status::Success)
}

/// The table for people.
pub fn human(validation: &Validation) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} of {} per copy, median of {} run(s); model: {}{}",
        Bytes(validation.len_bytes),
        validation.source,
        validation.runs,
        validation.model,
        if validation.one_device { " (disks on one device)" } else { "" }
    );
    let _ = writeln!(
        out,
        "{:<12} {:>9} {:>8} {:>12} {:>9} {:>12} {:>9}",
        "sub-job", "in flight", "targets", "measured s", "fastest", "predicted s", "error"
    );
    for row in &validation.configs {
        let _ = writeln!(
            out,
            "{:<12} {:>9} {:>8} {:>12.3} {:>9.3} {:>12.3} {:>+8.1}%",
            Bytes(row.config.sub_job_size_bytes).to_string(),
            row.config.subjobs_in_flight,
            row.config.targets,
            row.measured_median_seconds,
            row.measured_min_seconds,
            row.predicted_seconds,
            row.error_percent
        );
    }
    let _ = writeln!(out, "largest error: {:.1}%", validation.max_abs_error_percent);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_error_worked_example_holds() {
        assert!((error_percent(0.69, 0.60) - 15.0).abs() < 1e-9);
        assert!((error_percent(0.51, 0.60) + 15.0).abs() < 1e-9);
        assert_eq!(error_percent(1.0, 0.0), 0.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
    }

    #[test]
    fn configurations_parse_and_refuse_what_is_out_of_bounds() {
        assert_eq!(
            Config::parse("256Kx8x3").unwrap(),
            Config { sub_job_size_bytes: 256 << 10, subjobs_in_flight: 8, targets: 3 }
        );
        for bad in ["1Mx4", "1Mx0x1", "1Mx4x9", "1Qx4x1", "1Mx4x1x1"] {
            let error = Config::parse(bad).unwrap_err().to_string();
            assert!(error.contains("--configs") && error.contains(bad), "{error}");
        }
    }
}
