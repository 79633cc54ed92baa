//! The scenario file: disks, the client, jobs and a foreground workload, as serde types.
//!
//! ```text
//!  seed = 7                         everything random in the run derives from it
//!  [client]                         kcopyd_core::ClientConfig (page_budget, subjob_size_bytes, …)
//!  [disks.NAME]                     MemDiskOptions (len_sectors, latency, faults, …) + content
//!  [[jobs]]                         copy/zero, source/targets by disk name, count × stride
//!  [foreground]                     reads/writes on one disk whose latency is recorded
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use kcopyd_core::{ClientConfig, SECTOR_SIZE};
use serde::{Deserialize, Serialize};
use toml::Value;

use super::ScenarioError;
use super::keys;
use crate::MemDiskOptions;

/// Most disks in one scenario.
pub const DISKS_MAX: usize = 128;
/// Most jobs one `[[jobs]]` entry may repeat.
pub const JOB_COUNT_MAX: u64 = 1_000_000;
/// The largest dense (byte-holding) disk: larger ones must be sparse.
pub const DENSE_LEN_BYTES_MAX: u64 = 4 << 30;
/// Most foreground requests in flight.
pub const FOREGROUND_QUEUE_DEPTH_MAX: u32 = 1024;
/// The largest foreground request.
pub const FOREGROUND_IO_BYTES_MAX: u64 = 64 << 20;

/// A whole scenario. Read it with [`Scenario::from_toml`] (units and defaults applied) or
/// build it in code.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// What the scenario models, for people.
    #[serde(default)]
    pub description: String,
    /// Seed of every random draw in the run (disk jitter and faults, foreground offsets).
    #[serde(default)]
    pub seed: u64,
    /// The engine's configuration.
    #[serde(default)]
    pub client: ClientConfig,
    /// The disks, by name.
    pub disks: BTreeMap<String, DiskSpec>,
    /// The jobs, submitted in the order given when their start times are equal.
    #[serde(default)]
    pub jobs: Vec<JobEntry>,
    /// Requests of an application on the same disks, whose latency is recorded.
    #[serde(default)]
    pub foreground: Option<ForegroundSpec>,
}

/// What a disk holds when the run starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Content {
    /// The pattern of the disk's seed (each sector names its seed and number): cheap on
    /// sparse disks and checkable after a copy.
    #[default]
    Pattern,
    /// Zeroes.
    Zero,
}

/// One disk: the simulator's own options plus what it holds at the start and the device it
/// shares.
///
/// Every field of [`MemDiskOptions`] is a key of the disk's table (`len_sectors`, `latency`,
/// `faults`, …), so the scenario format follows the disk model. In a scenario, `name` comes
/// from the table's key, the disk's seed is mixed with the scenario's, `sparse` defaults to
/// `true`, and `headers_only` to `true` when every disk is sparse and none sets it.
/// `model = "FILE.toml"` takes the timing from a [`DiskModel`](crate::DiskModel) file (as
/// `kcopyd sim calibrate` writes it; the disk's own `latency` keys override it), and disks
/// with the same `medium` name share one [`Medium`](crate::Medium): one device's data paths
/// (a model measured as `one_device` puts the disks made from it on one medium).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiskSpec {
    /// What the disk holds at the start.
    #[serde(default)]
    pub content: Content,
    /// The name of the device whose data paths this disk shares with the other disks that
    /// name it; `None`: its own.
    #[serde(default)]
    pub medium: Option<String>,
    /// The simulated disk.
    #[serde(flatten)]
    pub options: MemDiskOptions,
}

impl<'de> Deserialize<'de> for DiskSpec {
    /// `content`, then every other key as [`MemDiskOptions`], which refuses unknown keys.
    /// (serde's `flatten` would let unknown keys through silently.)
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<DiskSpec, D::Error> {
        use serde::de::Error;
        let mut table = toml::Table::deserialize(deserializer)?;
        let content = match table.remove("content") {
            Some(value) => Content::deserialize(value).map_err(D::Error::custom)?,
            None => Content::default(),
        };
        let medium = match table.remove("medium") {
            Some(value) => Some(String::deserialize(value).map_err(D::Error::custom)?),
            None => None,
        };
        let options = MemDiskOptions::deserialize(Value::Table(table)).map_err(D::Error::custom)?;
        Ok(DiskSpec { content, medium, options })
    }
}

/// Copy or zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// Copy `source` to every target.
    Copy,
    /// Zero every target.
    Zero,
}

/// One job, or `count` jobs `stride_sectors` apart (e.g. the chunk copies of a snapshot).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobEntry {
    /// Name in reports; default `job N`.
    #[serde(default)]
    pub name: String,
    /// Copy or zero.
    pub kind: EntryKind,
    /// The disk copied from (copy only).
    #[serde(default)]
    pub source: Option<String>,
    /// Where the first job starts on the source.
    #[serde(default)]
    pub source_start_sector: u64,
    /// The disks written.
    pub targets: Vec<String>,
    /// Where the first job starts on every target.
    #[serde(default)]
    pub target_start_sector: u64,
    /// Sectors per job; default: to the end of the source (copy) or of the smallest target
    /// (zero), from the start sector.
    #[serde(default)]
    pub len_sectors: Option<u64>,
    /// Keep copying after errors (`IGNORE_ERROR`).
    #[serde(default)]
    pub ignore_error: bool,
    /// Write each target in increasing order (`WRITE_SEQ`).
    #[serde(default)]
    pub write_seq: bool,
    /// When the first job is submitted, in virtual time from the start of the run.
    #[serde(default)]
    pub start_at_us: u64,
    /// How many jobs this entry submits; default 1.
    #[serde(default = "one")]
    pub count: u64,
    /// How far each job starts from the previous one on source and targets; default its
    /// length (back to back).
    #[serde(default)]
    pub stride_sectors: Option<u64>,
    /// Time between two submissions of this entry.
    #[serde(default)]
    pub interval_us: u64,
    /// Jobs of this entry in flight at once (a writer waiting on each copy before the next);
    /// 0 = no limit.
    #[serde(default)]
    pub concurrency: u64,
}

fn one() -> u64 {
    1
}

/// How the foreground picks offsets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    /// Uniformly at random over the region, aligned to the request size, from the seed.
    #[default]
    Random,
    /// One after another, wrapping at the end of the region.
    Sequential,
}

/// An application's requests on one disk: a closed loop of `queue_depth` requests, or an open
/// loop at `rate_per_s` with at most `queue_depth` in flight (a request that must wait counts
/// its wait in its latency).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForegroundSpec {
    /// The disk.
    pub disk: String,
    /// Random or sequential offsets.
    #[serde(default)]
    pub access: Access,
    /// Share of reads, 0 to 100; the rest are writes. Default 100.
    #[serde(default = "hundred")]
    pub read_percent: u8,
    /// Bytes per request; default 4 KiB.
    #[serde(default = "four_k")]
    pub io_size_bytes: u64,
    /// Start of the region the requests fall in.
    #[serde(default)]
    pub start_sector: u64,
    /// Length of the region; default to the end of the disk.
    #[serde(default)]
    pub len_sectors: Option<u64>,
    /// Requests in flight (closed loop), or the most in flight (open loop). Default 1.
    #[serde(default = "one_u32")]
    pub queue_depth: u32,
    /// Requests per second (open loop); 0 = closed loop.
    #[serde(default)]
    pub rate_per_s: u64,
    /// How long the foreground runs; default: until the last job completes.
    #[serde(default)]
    pub duration_us: Option<u64>,
}

fn hundred() -> u8 {
    100
}

fn four_k() -> u64 {
    4096
}

fn one_u32() -> u32 {
    1
}

impl Scenario {
    /// Reads a scenario from TOML text: units by key suffix, `sparse = true` unless given (and
    /// then `headers_only = true` unless a disk says), then the typed checks of
    /// [`Scenario::validate`].
    ///
    /// # Errors
    /// A TOML syntax error, an unknown key, a bad unit, or a scenario that does not hold
    /// together.
    pub fn from_toml(text: &str) -> Result<Scenario, ScenarioError> {
        Scenario::from_value(parse_tree(text)?)
    }

    /// Reads a scenario from a TOML value tree (e.g. one edited with
    /// [`set_path`](super::set_path)); disk model files are found from the current directory.
    ///
    /// # Errors
    /// As [`Scenario::from_toml`].
    pub fn from_value(tree: Value) -> Result<Scenario, ScenarioError> {
        Scenario::from_value_in(tree, Path::new("."))
    }

    /// Reads a scenario from a TOML value tree whose disk model files (`model = "…"`) are
    /// relative to `base` (the scenario file's folder).
    ///
    /// # Errors
    /// As [`Scenario::from_toml`], or a model file that cannot be read or is not a disk model.
    pub fn from_value_in(mut tree: Value, base: &Path) -> Result<Scenario, ScenarioError> {
        keys::rename_old_keys(&mut tree, "")?;
        keys::inline_models(&mut tree, base)?;
        keys::normalize_units(&mut tree)?;
        if let Some(Value::Table(disks)) = tree.get_mut("disks") {
            for (_, disk) in disks.iter_mut() {
                if let Value::Table(disk) = disk {
                    disk.entry("sparse").or_insert(Value::Boolean(true));
                }
            }
            // Headers-only pattern sectors (fast, still verified by provenance) when every disk
            // is sparse and none says otherwise: the mode must be the same on every disk.
            let tables = || disks.iter().filter_map(|(_, d)| d.as_table());
            let all_sparse = tables().all(|d| d.get("sparse").and_then(Value::as_bool) == Some(true));
            let none_given = tables().all(|d| !d.contains_key("headers_only"));
            if all_sparse && none_given {
                for (_, disk) in disks.iter_mut() {
                    if let Value::Table(disk) = disk {
                        disk.insert("headers_only".into(), Value::Boolean(true));
                    }
                }
            }
        }
        let mut scenario: Scenario = tree.try_into().map_err(|source| ScenarioError::Toml { source })?;
        for (name, disk) in scenario.disks.iter_mut() {
            disk.options.name = name.clone();
        }
        scenario.validate()?;
        Ok(scenario)
    }

    /// Checks that the scenario holds together: known disks, regions inside them, limits.
    ///
    /// # Errors
    /// The first problem, naming the disk or job.
    pub fn validate(&self) -> Result<(), ScenarioError> {
        self.client.validate().map_err(|source| ScenarioError::Client { source })?;
        if self.disks.is_empty() || self.disks.len() > DISKS_MAX {
            return Err(ScenarioError::Invalid {
                what: "disks".into(),
                problem: format!("{} disks: 1 to {DISKS_MAX}", self.disks.len()),
            });
        }
        let headers_only = self.disks.values().next().is_some_and(|d| d.options.headers_only);
        for (name, disk) in &self.disks {
            let invalid = |problem: String| ScenarioError::Invalid { what: format!("disk '{name}'"), problem };
            if disk.options.headers_only != headers_only {
                // A whole-sector disk would take a header-only sector for data.
                return Err(invalid("headers_only must be the same on every disk".into()));
            }
            let block = disk.options.logical_block_size;
            if !block.is_power_of_two() || !(512..=65536).contains(&block) {
                return Err(invalid(format!("logical_block_size {block}: a power of two from 512 to 65536")));
            }
            let block_sectors = u64::from(block) / SECTOR_SIZE as u64;
            if disk.options.len_sectors == 0 || disk.options.len_sectors % block_sectors != 0 {
                return Err(invalid(format!(
                    "len_sectors {}: a positive multiple of the block",
                    disk.options.len_sectors
                )));
            }
            let Some(len_bytes) = disk.options.len_sectors.checked_mul(SECTOR_SIZE as u64) else {
                return Err(ScenarioError::DiskTooLarge { disk: name.clone(), len_sectors: disk.options.len_sectors });
            };
            if !disk.options.sparse && len_bytes > DENSE_LEN_BYTES_MAX {
                return Err(invalid(format!("{len_bytes} bytes is too large for a dense disk: leave sparse = true")));
            }
        }
        if self.jobs.is_empty() && self.foreground.as_ref().is_none_or(|f| f.duration_us.is_none()) {
            return Err(ScenarioError::Invalid {
                what: "scenario".into(),
                problem: "no jobs, and no foreground with a duration_us: nothing to run".into(),
            });
        }
        for index in 0..self.jobs.len() {
            self.job_regions(index)?;
        }
        if let Some(foreground) = &self.foreground {
            self.foreground_region(foreground)?;
        }
        Ok(())
    }

    /// The disk named `name`, or an error naming `user`.
    fn disk(&self, user: &str, name: &str) -> Result<&DiskSpec, ScenarioError> {
        self.disks.get(name).ok_or_else(|| ScenarioError::UnknownDisk { user: user.to_owned(), disk: name.to_owned() })
    }

    /// The name a job entry goes by in reports.
    pub fn job_name(&self, index: usize) -> String {
        let name = &self.jobs[index].name;
        if name.is_empty() { format!("job {index}") } else { name.clone() }
    }

    /// Sectors per job and the stride of job entry `index`, checked against every disk it
    /// touches (all `count` repetitions).
    pub(crate) fn job_regions(&self, index: usize) -> Result<(u64, u64), ScenarioError> {
        let job = &self.jobs[index];
        let user = self.job_name(index);
        let invalid = |problem: String| ScenarioError::Invalid { what: user.clone(), problem };
        if job.count == 0 || job.count > JOB_COUNT_MAX {
            return Err(invalid(format!("count {}: 1 to {JOB_COUNT_MAX}", job.count)));
        }
        if job.targets.is_empty() {
            return Err(invalid("no targets".into()));
        }
        let source = match (job.kind, &job.source) {
            (EntryKind::Copy, Some(source)) => Some(self.disk(&user, source)?),
            (EntryKind::Copy, None) => return Err(invalid("a copy needs a source".into())),
            (EntryKind::Zero, Some(_)) => return Err(invalid("a zero job takes no source".into())),
            (EntryKind::Zero, None) => None,
        };
        let targets = job.targets.iter().map(|t| self.disk(&user, t)).collect::<Result<Vec<_>, _>>()?;
        let len_sectors = match job.len_sectors {
            Some(len) => len,
            None => match source {
                Some(source) => source.options.len_sectors.saturating_sub(job.source_start_sector),
                None => targets
                    .iter()
                    .map(|t| t.options.len_sectors)
                    .min()
                    .unwrap_or(0)
                    .saturating_sub(job.target_start_sector),
            },
        };
        let stride = job.stride_sectors.unwrap_or(len_sectors);
        let span = stride.checked_mul(job.count - 1).and_then(|s| s.checked_add(len_sectors));
        let check = |disk: &DiskSpec, start: u64| {
            let end = span.and_then(|span| start.checked_add(span));
            match end {
                Some(end) if end <= disk.options.len_sectors => Ok(()),
                _ => Err(ScenarioError::OutOfRange {
                    user: user.clone(),
                    disk: disk.options.name.clone(),
                    start_sector: start,
                    len_sectors: span.unwrap_or(u64::MAX),
                    disk_len_sectors: disk.options.len_sectors,
                }),
            }
        };
        if let Some(source) = source {
            check(source, job.source_start_sector)?;
        }
        for target in targets {
            check(target, job.target_start_sector)?;
        }
        Ok((len_sectors, stride))
    }

    /// The foreground's region `(start, len)` in sectors, checked.
    pub(crate) fn foreground_region(&self, foreground: &ForegroundSpec) -> Result<(u64, u64), ScenarioError> {
        let disk = self.disk("foreground", &foreground.disk)?;
        let invalid = |problem: String| ScenarioError::Invalid { what: "foreground".into(), problem };
        let block = u64::from(disk.options.logical_block_size);
        if foreground.io_size_bytes == 0
            || foreground.io_size_bytes % block != 0
            || foreground.io_size_bytes > FOREGROUND_IO_BYTES_MAX
        {
            return Err(invalid(format!(
                "io_size_bytes {}: a multiple of the disk's {block}-byte block, at most {FOREGROUND_IO_BYTES_MAX}",
                foreground.io_size_bytes
            )));
        }
        if foreground.queue_depth == 0 || foreground.queue_depth > FOREGROUND_QUEUE_DEPTH_MAX {
            return Err(invalid(format!("queue_depth {}: 1 to {FOREGROUND_QUEUE_DEPTH_MAX}", foreground.queue_depth)));
        }
        let latency = &disk.options.latency;
        if foreground.rate_per_s == 0 && latency.is_instant(false) && latency.is_instant(true) {
            // A closed loop on a disk without a timing model never lets virtual time pass.
            return Err(invalid(format!(
                "disk '{}' has no timing model: give it a latency or a rate_per_s",
                foreground.disk
            )));
        }
        if foreground.read_percent > 100 {
            return Err(invalid(format!("read_percent {}: 0 to 100", foreground.read_percent)));
        }
        let start = foreground.start_sector;
        let len = foreground.len_sectors.unwrap_or(disk.options.len_sectors.saturating_sub(start));
        let io_sectors = foreground.io_size_bytes / SECTOR_SIZE as u64;
        if start % (block / SECTOR_SIZE as u64) != 0
            || len < io_sectors
            || start.checked_add(len).is_none_or(|end| end > disk.options.len_sectors)
        {
            return Err(ScenarioError::OutOfRange {
                user: "foreground".into(),
                disk: foreground.disk.clone(),
                start_sector: start,
                len_sectors: len,
                disk_len_sectors: disk.options.len_sectors,
            });
        }
        Ok((start, len))
    }
}

/// Parses TOML text into a value tree (no units applied yet), old key names
/// ([`RENAMED_KEYS`](super::RENAMED_KEYS)) renamed to the current ones.
///
/// # Errors
/// A TOML syntax error, or a key given under its old and its current name.
pub fn parse_tree(text: &str) -> Result<Value, ScenarioError> {
    let mut tree = text.parse::<toml::Table>().map(Value::Table).map_err(|source| ScenarioError::Toml { source })?;
    keys::rename_old_keys(&mut tree, "")?;
    Ok(tree)
}
