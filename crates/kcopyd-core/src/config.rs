//! Client configuration.

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;
use crate::throttle::Throttle;
use crate::{PAGE_SIZE, SECTOR_SIZE};

/// Most bytes one sub-job may move (and so the largest I/O the engine issues).
pub const SUBJOB_SIZE_MAX: usize = 64 * 1024 * 1024;
/// Most sub-jobs one job may keep in flight.
pub const SUBJOBS_IN_FLIGHT_MAX: usize = 1024;

/// Bytes per sub-job by default: 1 MiB. The kernel uses 512 KiB (since 2019) with 8 in flight;
/// on this project's measurements (docs/BENCHMARKS.md) 4 × 1 MiB copied fastest to one and to
/// three targets, and the `kcopyd` command uses the same defaults. Storage that gains from
/// deeper queues (NVMe, striped arrays) wants more in flight.
pub const SUBJOB_SIZE_DEFAULT_BYTES: usize = 1024 * 1024;
/// Sub-jobs one job keeps in flight by default (see [`SUBJOB_SIZE_DEFAULT_BYTES`]).
pub const SUBJOBS_IN_FLIGHT_DEFAULT: usize = 4;
/// Pages in the budget by default: 4096 (16 MiB), the sub-jobs in flight of four jobs, so that
/// reads run ahead while several targets are still being written.
pub const PAGE_BUDGET_DEFAULT: usize = 4096;

const _: () = assert!(SUBJOB_SIZE_DEFAULT_BYTES % SECTOR_SIZE == 0 && SUBJOB_SIZE_DEFAULT_BYTES <= SUBJOB_SIZE_MAX);
const _: () = assert!(SUBJOBS_IN_FLIGHT_DEFAULT >= 1 && SUBJOBS_IN_FLIGHT_DEFAULT <= SUBJOBS_IN_FLIGHT_MAX);
const _: () = assert!(PAGE_BUDGET_DEFAULT * PAGE_SIZE >= SUBJOB_SIZE_DEFAULT_BYTES * SUBJOBS_IN_FLIGHT_DEFAULT);

/// How a [`Client`](crate::Client) runs its jobs. Every field has a default.
///
/// ```
/// # use kcopyd_core::ClientConfig;
/// let config = ClientConfig { page_budget: 1, ..ClientConfig::default() };
/// assert!(config.validate().is_ok()); // one page is enough to finish any job
/// assert!(ClientConfig { subjob_size_bytes: 1000, ..config }.validate().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientConfig {
    /// Pages (4 KiB) reserved for copy buffers; at least 1. Default
    /// [`PAGE_BUDGET_DEFAULT`] (16 MiB).
    pub page_budget: usize,
    /// Bytes per sub-job: a multiple of 512, at most 64 MiB. Default
    /// [`SUBJOB_SIZE_DEFAULT_BYTES`] (1 MiB). A job whose budget is smaller uses the whole
    /// budget per sub-job instead. (Read also under its old name `sub_job_size_bytes`.)
    #[serde(alias = "sub_job_size_bytes")]
    pub subjob_size_bytes: usize,
    /// Sub-jobs one job keeps in flight, at least 1. Default [`SUBJOBS_IN_FLIGHT_DEFAULT`] (4).
    pub subjobs_in_flight: usize,
    /// Jobs admitted (queued or running) at once; submitting waits while it is reached.
    /// Default 1024.
    pub queued_jobs_max: usize,
    /// Align the page arena to 2 MiB and advise it for transparent huge pages, so that
    /// adjacent pages are physically adjacent and each I/O is a few scatter-gather segments
    /// instead of one per page. Default `true`; see [`PagePool`](crate::PagePool).
    pub huge_pages: bool,
    /// Limits on the share of time the client's I/O is busy and on its bytes per second;
    /// both off by default. Change them while jobs run with
    /// [`Client::set_throttle`](crate::Client::set_throttle) (this field keeps the value the
    /// client started with).
    pub throttle: Throttle,
    /// Most milliseconds one device request may take before it fails with `TimedOut`
    /// (`ETIMEDOUT`) and is reported in the outcome's ranges like any error; `None` (the
    /// default) waits for ever. A timed-out request is not abandoned by the device: its buffer
    /// and pages come back to the pool only when the device completes it.
    pub io_timeout_ms: Option<u64>,
}

impl Default for ClientConfig {
    fn default() -> ClientConfig {
        ClientConfig {
            page_budget: PAGE_BUDGET_DEFAULT,
            subjob_size_bytes: SUBJOB_SIZE_DEFAULT_BYTES,
            subjobs_in_flight: SUBJOBS_IN_FLIGHT_DEFAULT,
            queued_jobs_max: 1024,
            huge_pages: true,
            throttle: Throttle::OFF,
            io_timeout_ms: None,
        }
    }
}

impl ClientConfig {
    /// Checks every field against its bounds.
    ///
    /// # Errors
    /// The first field out of bounds.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.page_budget == 0 || self.page_budget > u32::MAX as usize {
            return Err(ConfigError::PageBudget { pages: self.page_budget });
        }
        if self.subjob_size_bytes == 0
            || self.subjob_size_bytes % SECTOR_SIZE != 0
            || self.subjob_size_bytes > SUBJOB_SIZE_MAX
        {
            return Err(ConfigError::SubjobSize { bytes: self.subjob_size_bytes, max: SUBJOB_SIZE_MAX });
        }
        if self.subjobs_in_flight == 0 || self.subjobs_in_flight > SUBJOBS_IN_FLIGHT_MAX {
            return Err(ConfigError::SubjobsInFlight { count: self.subjobs_in_flight, max: SUBJOBS_IN_FLIGHT_MAX });
        }
        if self.queued_jobs_max == 0 || self.queued_jobs_max > tokio::sync::Semaphore::MAX_PERMITS {
            return Err(ConfigError::QueuedJobs { count: self.queued_jobs_max });
        }
        if self.io_timeout_ms == Some(0) {
            return Err(ConfigError::IoTimeout { ms: 0 });
        }
        self.throttle.validate()
    }

    /// The page budget in bytes.
    pub fn page_budget_bytes(&self) -> usize {
        self.page_budget * PAGE_SIZE
    }
}
