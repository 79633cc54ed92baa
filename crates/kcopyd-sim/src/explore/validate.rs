//! A disk model checked against the real device (`kcopyd sim validate`), or a link in front of
//! one against a real link (`kcopyd sim validate-link`): the configurations
//! copied, the simulated copy's prediction, and the rows comparing it with the measurements.
//!
//! ```text
//!  "1Mx4x1" ─► Config::parse ─► real copies (the caller's, timed) ─► measured seconds
//!                         └─► predict_seconds: the same copy in virtual time, sparse pattern
//!                             disks, one Medium when SOURCE and TARGET share a device
//!                         └─► LinkSetup::predict_seconds: the same, with a LinkModel in front
//!                             of the remote end(s) (`kcopyd sim validate-link`)
//!  Row::new (median, fastest, error) ─► Validation::new (largest error) ─► LinkValidation
//! ```
//!
//! The real copies are the caller's: this module neither opens nor writes a real device.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kcopyd_core::{ClientConfig, Device, Flags, Job, PAGE_SIZE, Region, SECTOR_SIZE};
use serde::Serialize;
use thiserror::Error;

use crate::units::{SizeError, parse_size};
use crate::{DiskModel, LinkModel, Simulation};

/// The most targets a configuration may name.
pub const TARGETS_MAX: usize = 8;
/// The most rounds of real copies.
pub const RUNS_MAX: usize = 100;
/// The most sub-jobs in flight a configuration may name.
pub const IN_FLIGHT_MAX: usize = 1024;

/// Why a configuration does not read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigParseError {
    /// Not three parts separated by `x`.
    #[error("not SUBJOB_SIZExIN_FLIGHTxTARGETS, e.g. 1Mx4x1")]
    Shape,
    /// The sub-job size does not read.
    #[error("{0}")]
    Size(#[source] SizeError),
    /// A count is not a whole number in its bounds.
    #[error("{what} '{text}' is not a whole number from 1 to {max}")]
    Count {
        /// `sub-jobs in flight` or `targets`.
        what: &'static str,
        /// The count as given.
        text: String,
        /// Its largest value.
        max: usize,
    },
}

/// Configurations or rounds refused before any copy is made.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigsError {
    /// A configuration that does not read.
    #[error("{text}: {problem}")]
    Config {
        /// The configuration as given.
        text: String,
        /// Why it does not read.
        problem: ConfigParseError,
    },
    /// An empty list of configurations.
    #[error("no configuration given")]
    NoConfig,
    /// Rounds outside 1 to [`RUNS_MAX`].
    #[error("must be 1 to {RUNS_MAX}")]
    Runs {
        /// The rounds asked for.
        runs: usize,
    },
}

/// Reads each of `texts` as [`Config::parse`] does; at least one.
///
/// # Errors
/// The first configuration that does not read, or none given.
pub fn parse_configs(texts: &[String]) -> Result<Vec<Config>, ConfigsError> {
    let configs: Vec<Config> = texts
        .iter()
        .map(|text| Config::parse(text).map_err(|problem| ConfigsError::Config { text: text.clone(), problem }))
        .collect::<Result<_, _>>()?;
    if configs.is_empty() {
        return Err(ConfigsError::NoConfig);
    }
    Ok(configs)
}

/// Refuses rounds of real copies outside 1 to [`RUNS_MAX`].
///
/// # Errors
/// [`ConfigsError::Runs`].
pub fn check_runs(runs: usize) -> Result<(), ConfigsError> {
    if !(1..=RUNS_MAX).contains(&runs) {
        return Err(ConfigsError::Runs { runs });
    }
    Ok(())
}

/// One configuration: how the copy is cut and how many targets it writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Config {
    /// Bytes per sub-job.
    pub subjob_size_bytes: u64,
    /// Sub-jobs in flight.
    pub subjobs_in_flight: usize,
    /// Targets written.
    pub targets: usize,
}

impl Config {
    /// Reads `SIZExIN_FLIGHTxTARGETS`, e.g. `1Mx4x1`.
    ///
    /// # Errors
    /// Not three parts, a size that does not parse, or counts out of bounds (`1Mx0x1`).
    pub fn parse(text: &str) -> Result<Config, ConfigParseError> {
        let parts: Vec<&str> = text.split('x').collect();
        let [size, in_flight, targets] = parts[..] else {
            return Err(ConfigParseError::Shape);
        };
        let subjob_size_bytes = parse_size(size).map_err(ConfigParseError::Size)?;
        let count = |text: &str, max: usize, what: &'static str| {
            text.parse::<usize>().ok().filter(|n| (1..=max).contains(n)).ok_or_else(|| ConfigParseError::Count {
                what,
                text: text.to_owned(),
                max,
            })
        };
        Ok(Config {
            subjob_size_bytes,
            subjobs_in_flight: count(in_flight, IN_FLIGHT_MAX, "sub-jobs in flight")?,
            targets: count(targets, TARGETS_MAX, "targets")?,
        })
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

impl Row {
    /// The row of `config` from its measured seconds and its prediction.
    pub fn new(config: Config, measured_seconds: Vec<f64>, predicted_seconds: f64) -> Row {
        let measured_median_seconds = median(&measured_seconds);
        Row {
            config,
            measured_min_seconds: measured_seconds.iter().copied().fold(f64::INFINITY, f64::min),
            measured_seconds,
            measured_median_seconds,
            predicted_seconds,
            error_percent: error_percent(predicted_seconds, measured_median_seconds),
        }
    }
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

impl Validation {
    /// The result of `rows`, with its largest error.
    pub fn new(model: String, source: String, len_bytes: u64, one_device: bool, runs: usize, rows: Vec<Row>) -> Self {
        Validation {
            model,
            source,
            len_bytes,
            one_device,
            runs,
            max_abs_error_percent: rows.iter().map(|r| r.error_percent.abs()).fold(0.0, f64::max),
            configs: rows,
        }
    }
}

/// The result of a link validation: the link, which end it is in front of, the targets and
/// the rows (as for a disk, with `one_device` false).
#[derive(Debug, Clone, Serialize)]
pub struct LinkValidation {
    /// The link and which end is behind it.
    #[serde(flatten)]
    pub setup: LinkSetup,
    /// The targets, as given.
    pub targets: Vec<String>,
    /// The copies: measured, predicted, error.
    #[serde(flatten)]
    pub validation: Validation,
}

impl std::fmt::Display for Config {
    /// `1 MiB × 4 → 1`: sub-job size, sub-jobs in flight, targets.
    fn fmt(&self, out: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let size = crate::units::Bytes(self.subjob_size_bytes);
        write!(out, "{size} × {} → {}", self.subjobs_in_flight, self.targets)
    }
}

impl std::fmt::Display for LinkValidation {
    /// The table for people: the link and the targets, then the rows as [`Validation`] shows
    /// them.
    fn fmt(&self, out: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let link = self.setup.link;
        let end = match self.setup.remote {
            Remote::Source => "the source",
            Remote::Target => "the target(s)",
            Remote::Both => "both ends",
        };
        write!(
            out,
            "link in front of {end}: round trip {} µs, {:.1} MB/s each way, burst {}; to {}\n{}",
            link.round_trip_us,
            link.bandwidth_bytes_per_s as f64 / 1e6,
            crate::units::Bytes(link.burst_bytes),
            self.targets.join(", "),
            self.validation
        )
    }
}

impl std::fmt::Display for Validation {
    /// The table for people: what was copied and the model, then per configuration the
    /// measured median and fastest times, the prediction and its error; the largest error.
    fn fmt(&self, out: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let validation = self;
        writeln!(
            out,
            "{} of {} per copy, median of {} run(s); model: {}{}",
            crate::units::Bytes(validation.len_bytes),
            validation.source,
            validation.runs,
            validation.model,
            if validation.one_device { " (disks on one device)" } else { "" }
        )?;
        writeln!(
            out,
            "{:<12} {:>9} {:>8} {:>12} {:>9} {:>12} {:>9}",
            "sub-job", "in flight", "targets", "measured s", "fastest", "predicted s", "error"
        )?;
        for row in &validation.configs {
            writeln!(
                out,
                "{:<12} {:>9} {:>8} {:>12.3} {:>9.3} {:>12.3} {:>+8.1}%",
                crate::units::Bytes(row.config.subjob_size_bytes).to_string(),
                row.config.subjobs_in_flight,
                row.config.targets,
                row.measured_median_seconds,
                row.measured_min_seconds,
                row.predicted_seconds,
                row.error_percent
            )?;
        }
        writeln!(out, "largest error: {:.1}%", validation.max_abs_error_percent)?;
        Ok(())
    }
}

/// The error of a prediction, in percent of the measurement.
///
/// Worked example: predicted 0.69 s, measured 0.60 s: +15 %; predicted 0.51 s: −15 %.
pub fn error_percent(predicted_seconds: f64, measured_seconds: f64) -> f64 {
    if measured_seconds > 0.0 { (predicted_seconds - measured_seconds) / measured_seconds * 100.0 } else { 0.0 }
}

/// The median (upper median for an even count); 0 for none.
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(0.0)
}

/// The target files of `count` targets: `target`, `target.2`, `target.3`, …
pub fn target_paths(target: &Path, count: usize) -> Vec<PathBuf> {
    (1..=count)
        .map(|i| if i == 1 { target.to_path_buf() } else { PathBuf::from(format!("{}.{i}", target.display())) })
        .collect()
}

/// Whether `source` and the directory of `target` are on one device (a block device's own
/// number, else its filesystem's): their simulated disks then share one data path.
pub fn on_one_device(source: &Path, target: &Path) -> bool {
    let device_number = |path: &Path| {
        let metadata = fs::metadata(path).ok()?;
        Some(if metadata.file_type().is_block_device() { metadata.rdev() } else { metadata.dev() })
    };
    let target_dir = target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    device_number(source).is_some() && device_number(source) == device_number(target_dir)
}

/// The model seconds of `config` in the simulator: sparse pattern disks of `len_bytes` and
/// `block_bytes` blocks, on one medium when `one_device`, a page budget of `memory_bytes`.
/// NaN if the simulation could not run.
pub fn predict_seconds(
    model: &DiskModel,
    config: Config,
    len_bytes: u64,
    block_bytes: u32,
    one_device: bool,
    memory_bytes: u64,
) -> f64 {
    let copy = SimulatedCopy { source: model, target: model, len_bytes, block_bytes, one_device, memory_bytes };
    copy.predict_seconds(config)
}

/// Which end of a copy sits behind the network link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Remote {
    /// The source is read over the link (its bytes cross back with each read).
    Source,
    /// The targets are written over the link (the bytes cross out with each write).
    Target,
    /// Both ends, each behind a link of its own.
    Both,
}

/// The link of a link validation: what the simulated remote disks put in front of `model`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LinkSetup {
    /// The link (round trip, bandwidth, burst).
    pub link: LinkModel,
    /// Which end is behind it.
    pub remote: Remote,
}

impl LinkSetup {
    /// The models of the source and of the targets: `model`, with the link in front of the
    /// remote end(s).
    pub fn models(&self, model: &DiskModel) -> (DiskModel, DiskModel) {
        let with_link = |remote: bool| {
            let mut model = model.clone();
            if remote {
                model.latency.link = self.link;
            }
            model
        };
        (
            with_link(matches!(self.remote, Remote::Source | Remote::Both)),
            with_link(matches!(self.remote, Remote::Target | Remote::Both)),
        )
    }

    /// The model seconds of `config` copying `len_bytes` (blocks of `block_bytes`) with the
    /// link in front of `model`'s remote end, a page budget of `memory_bytes`. The ends' disks
    /// share one medium when the model says `one_device` (their costs are paid on one
    /// machine: two exports served on this host), each behind its own link. NaN if the
    /// simulation could not run.
    ///
    /// Worked example: 16 MiB to a target behind a 50 MB/s link with a 1 ms round trip, an
    /// instant disk, 1 MiB sub-jobs one at a time: 16 × (20.97 + 1) ms = 0.3515 s; four at a
    /// time fill the link: 16 × 20.97 ms + 1 ms = 0.3365 s; with a 4 MiB burst the first
    /// 4 MiB cross at once: 12 × 20.97 ms + 1 ms = 0.2527 s.
    pub fn predict_seconds(
        &self,
        model: &DiskModel,
        config: Config,
        len_bytes: u64,
        block_bytes: u32,
        memory_bytes: u64,
    ) -> f64 {
        let (source, target) = self.models(model);
        let one_device = model.one_device;
        let copy = SimulatedCopy { source: &source, target: &target, len_bytes, block_bytes, one_device, memory_bytes };
        copy.predict_seconds(config)
    }
}

/// One copy in the simulator: the models of its source and targets, its length, block size,
/// whether the disks share one medium, and the page budget.
struct SimulatedCopy<'a> {
    source: &'a DiskModel,
    target: &'a DiskModel,
    len_bytes: u64,
    block_bytes: u32,
    one_device: bool,
    memory_bytes: u64,
}

impl SimulatedCopy<'_> {
    /// The model seconds of `config`: sparse pattern disks; NaN if the simulation could not
    /// run.
    fn predict_seconds(&self, config: Config) -> f64 {
        let SimulatedCopy { source, target, len_bytes, block_bytes, one_device, memory_bytes } = *self;
        let len_sectors = len_bytes / SECTOR_SIZE as u64;
        let client_config = ClientConfig {
            page_budget: usize::try_from(memory_bytes / PAGE_SIZE as u64).unwrap_or(usize::MAX),
            subjob_size_bytes: config.subjob_size_bytes as usize,
            subjobs_in_flight: config.subjobs_in_flight,
            ..ClientConfig::default()
        };
        let (source_model, target_model) = (source.clone(), target.clone());
        // Simulation runs its own runtime: on a thread of its own, not inside the caller's.
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    Simulation::run(client_config, |client, _trace| async move {
                        let medium = if one_device { Some(crate::Medium::new()) } else { None };
                        let disk = |name: &str, seed: u64| {
                            let model = if name == "source" { &source_model } else { &target_model };
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
                        crate::to_model(began.elapsed()).as_secs_f64()
                    })
                })
                .join()
                .expect("the simulation does not panic")
        })
        .unwrap_or(f64::NAN)
    }
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
        let row = Row::new(Config::parse("1Mx4x1").unwrap(), vec![0.7, 0.6, 0.5], 0.69);
        assert_eq!((row.measured_median_seconds, row.measured_min_seconds), (0.6, 0.5));
        let validation = Validation::new("m".into(), "s".into(), 1, false, 3, vec![row]);
        assert!((validation.max_abs_error_percent - 15.0).abs() < 1e-9);
    }

    #[test]
    fn the_table_shows_each_configuration_and_the_largest_error() {
        let row = Row::new(Config::parse("256Kx8x3").unwrap(), vec![0.7, 0.6, 0.5], 0.69);
        let table = Validation::new("hdd".into(), "disk.img".into(), 1 << 30, true, 3, vec![row]).to_string();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0], "1 GiB of disk.img per copy, median of 3 run(s); model: hdd (disks on one device)");
        assert!(lines[1].starts_with("sub-job") && lines[1].ends_with("error"), "{table}");
        assert!(lines[2].starts_with("256 KiB") && lines[2].ends_with("+15.0%"), "{table}");
        assert_eq!(lines[3], "largest error: 15.0%");
    }

    #[test]
    fn a_list_of_configurations_names_the_first_bad_one_and_rounds_are_bounded() {
        let texts = |list: &[&str]| list.iter().map(|text| text.to_string()).collect::<Vec<_>>();
        assert_eq!(parse_configs(&texts(&["1Mx4x1", "64Kx8x3"])).unwrap().len(), 2);
        assert_eq!(parse_configs(&[]), Err(ConfigsError::NoConfig));
        let Err(ConfigsError::Config { text, problem }) = parse_configs(&texts(&["1Mx4x1", "1Mx4", "1Mx0x1"])) else {
            panic!("the bad configuration is not named")
        };
        assert_eq!((text.as_str(), problem), ("1Mx4", ConfigParseError::Shape));
        assert_eq!((check_runs(1), check_runs(RUNS_MAX)), (Ok(()), Ok(())));
        assert_eq!(check_runs(0), Err(ConfigsError::Runs { runs: 0 }));
        assert_eq!(check_runs(RUNS_MAX + 1), Err(ConfigsError::Runs { runs: RUNS_MAX + 1 }));
    }

    #[test]
    fn configurations_parse_and_refuse_what_is_out_of_bounds() {
        assert_eq!(
            Config::parse("256Kx8x3").unwrap(),
            Config { subjob_size_bytes: 256 << 10, subjobs_in_flight: 8, targets: 3 }
        );
        assert_eq!(Config::parse("1Mx4"), Err(ConfigParseError::Shape));
        assert_eq!(Config::parse("1Mx4x1x1"), Err(ConfigParseError::Shape));
        assert!(matches!(Config::parse("1Qx4x1"), Err(ConfigParseError::Size(_))));
        assert!(matches!(Config::parse("1Mx0x1"), Err(ConfigParseError::Count { what: "sub-jobs in flight", .. })));
        assert!(matches!(Config::parse("1Mx4x9"), Err(ConfigParseError::Count { what: "targets", max: 8, .. })));
    }

    #[test]
    fn the_link_table_names_the_link_and_the_targets_above_the_rows() {
        let row = Row::new(Config::parse("1Mx4x2").unwrap(), vec![0.5], 0.5);
        let validation = Validation::new("ssd".into(), "nbd://a/x".into(), 1 << 20, false, 1, vec![row]);
        let link = LinkModel { round_trip_us: 5000, bandwidth_bytes_per_s: 50_000_000, burst_bytes: 512 << 10 };
        let setup = LinkSetup { link, remote: Remote::Both };
        let table = LinkValidation { setup, targets: vec!["t1".into(), "t2".into()], validation }.to_string();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[0],
            "link in front of both ends: round trip 5000 µs, 50.0 MB/s each way, burst 512 KiB; to t1, t2"
        );
        assert_eq!(lines[1], "1 MiB of nbd://a/x per copy, median of 1 run(s); model: ssd");
        assert!(lines[3].starts_with("1 MiB"), "{table}");
        assert_eq!(Config::parse("256Kx8x3").unwrap().to_string(), "256 KiB × 8 → 3");
    }

    #[test]
    fn the_link_worked_example_holds_at_either_end() {
        let link = LinkModel { round_trip_us: 1000, bandwidth_bytes_per_s: 50_000_000, burst_bytes: 0 };
        let instant = DiskModel::default();
        let predict = |remote: Remote, burst_bytes: u64, in_flight: usize| {
            let setup = LinkSetup { link: LinkModel { burst_bytes, ..link }, remote };
            let config = Config { subjob_size_bytes: 1 << 20, subjobs_in_flight: in_flight, targets: 1 };
            setup.predict_seconds(&instant, config, 16 << 20, 512, 16 << 20)
        };
        let near = |seconds: f64, expected: f64| (seconds - expected).abs() < 0.0005;
        for remote in [Remote::Source, Remote::Target] {
            assert!(near(predict(remote, 0, 1), 0.3515), "{remote:?}: {}", predict(remote, 0, 1));
            assert!(near(predict(remote, 0, 4), 0.3365), "{remote:?}: {}", predict(remote, 0, 4));
            assert!(near(predict(remote, 4 << 20, 4), 0.2527), "{remote:?}: {}", predict(remote, 4 << 20, 4));
        }
        // Both ends remote, one sub-job at a time: each pays its own round trip and transfer.
        assert!(near(predict(Remote::Both, 0, 1), 0.7030), "{}", predict(Remote::Both, 0, 1));
        let (source, target) = LinkSetup { link, remote: Remote::Target }.models(&instant);
        assert_eq!((source.latency.link, target.latency.link), (LinkModel::default(), link));
    }

    #[test]
    fn the_targets_are_named_after_the_first() {
        let paths = target_paths(Path::new("/t/x.img"), 3);
        assert_eq!(paths, [PathBuf::from("/t/x.img"), "/t/x.img.2".into(), "/t/x.img.3".into()]);
    }
}
