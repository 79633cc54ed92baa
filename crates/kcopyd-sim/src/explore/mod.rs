//! Design exploration: scenario files, runs in virtual time and sweeps over their keys.
//!
//! ```text
//!  scenario.toml ─► toml value tree ─► [set_path: --vary / --set] ─► units ─► Scenario
//!                                                                            │ validate
//!  ScenarioReport ◄─ assemble ◄─ Simulation (jobs + foreground) ◄─ run ◄─────┘
//!        ▲                     Simulation (foreground alone: the baseline)
//!  sweep: the cross product of the varied values, one Simulation per thread
//! ```
//!
//! A scenario names disks (the simulator's [`MemDiskOptions`](crate::MemDiskOptions), sparse by
//! default so terabytes cost little memory), the client ([`ClientConfig`](kcopyd_core::ClientConfig)),
//! jobs and an optional foreground workload. [`run`] reports the virtual duration, throughput,
//! per-job and per-target outcomes, the page high-water mark, request sizes, queue depth and
//! throughput over time, and the foreground's latency with and without the jobs. The same seed
//! gives the same report (but for `wall_seconds`).
//!
//! [`calibrate`] measures a device (any [`BlockDevice`](kcopyd_core::BlockDevice): a real one,
//! or a simulated one in virtual time) and fits a [`DiskModel`](crate::DiskModel) to it;
//! [`validate`] compares its predictions with copies measured by the caller.

pub mod calibrate;
pub mod demo;
pub mod file;
mod keys;
#[cfg(feature = "plot")]
pub mod plot;
mod probe;
mod report;
mod runner;
mod scenario;
mod series;
mod summary;
mod sweep;
pub mod validate;
mod verify;

use kcopyd_core::{ConfigError, SubmitError};
use thiserror::Error;

use crate::units::SizeError;

pub use keys::{RENAMED_KEYS, parse_value, set_path};
pub use report::{
    DiskReport, ForegroundReport, IoSizeCount, JobReport, Latencies, METRICS, Metric, RANGES_LISTED, Sample,
    ScenarioReport, TargetOutcome, metric,
};
pub use runner::{Disks, run, run_with};
pub use scenario::{
    Access, Content, DENSE_LEN_BYTES_MAX, DISKS_MAX, DiskSpec, EntryKind, FOREGROUND_IO_BYTES_MAX,
    FOREGROUND_QUEUE_DEPTH_MAX, ForegroundSpec, JOB_COUNT_MAX, JobEntry, Scenario, parse_tree,
};
pub use series::BUCKETS_MAX;
pub use summary::Ranking;
pub use sweep::{POINTS_MAX, SweepPoint, Vary, best_first, repeated_key, sweep, sweep_until};
pub use verify::{Mismatch, Verification};

/// Why a scenario could not be read or run. Each names the key, disk or job at fault.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ScenarioError {
    /// The TOML does not parse, or does not fit the scenario's types (an unknown key, a
    /// wrong type, a missing field).
    #[error("scenario: {source}")]
    Toml {
        /// What the TOML reader said (with the key and line).
        #[source]
        source: toml::de::Error,
    },
    /// A string under a unit-suffixed key that does not read as that unit.
    #[error("scenario key '{key}': {source}")]
    Unit {
        /// The dotted key.
        key: String,
        /// What is wrong with the value.
        #[source]
        source: SizeError,
    },
    /// A dotted key that cannot be set, or a value that does not fit it.
    #[error("scenario key '{key}': {problem}")]
    Key {
        /// The dotted key.
        key: String,
        /// What is wrong.
        problem: String,
    },
    /// The client configuration is out of bounds.
    #[error("scenario [client]: {source}")]
    Client {
        /// The engine's complaint.
        #[source]
        source: ConfigError,
    },
    /// A disk, job or the foreground that does not hold together.
    #[error("scenario {what}: {problem}")]
    Invalid {
        /// Which part.
        what: String,
        /// What is wrong.
        problem: String,
    },
    /// A disk whose length in bytes does not fit in 64 bits: no byte offset could address it.
    #[error("scenario disk '{disk}': len_sectors {len_sectors} is {len_sectors} × 512 bytes, more than 64 bits hold")]
    DiskTooLarge {
        /// The disk.
        disk: String,
        /// Its length, as given.
        len_sectors: u64,
    },
    /// A job or the foreground names a disk that is not in `[disks]`.
    #[error("scenario {user}: no disk named '{disk}' in [disks]")]
    UnknownDisk {
        /// The job or foreground.
        user: String,
        /// The name given.
        disk: String,
    },
    /// A region past the end of its disk.
    #[error(
        "scenario {user}: sectors {start_sector}..+{len_sectors} do not fit disk '{disk}' of {disk_len_sectors} sectors"
    )]
    OutOfRange {
        /// The job or foreground.
        user: String,
        /// The disk.
        disk: String,
        /// Start of the region (of all the entry's repetitions).
        start_sector: u64,
        /// Length of the region.
        len_sectors: u64,
        /// The disk's length.
        disk_len_sectors: u64,
    },
    /// The engine refused a job at submission (nothing of it was read or written).
    #[error("scenario {job}: the engine refused the job: {source}")]
    Submit {
        /// The job entry.
        job: String,
        /// The engine's reason.
        #[source]
        source: SubmitError,
    },
    /// A disk's model file cannot be read or is not a disk model.
    #[error("scenario disk '{disk}': model '{path}': {problem}")]
    Model {
        /// The disk.
        disk: String,
        /// The file, as given.
        path: String,
        /// What is wrong.
        problem: String,
    },
    /// A sweep that does not hold together (no values, too many points, an unknown metric).
    #[error("sweep: {problem}")]
    Sweep {
        /// What is wrong.
        problem: String,
    },
}
