//! Errors of the engine: configuration and submission (validation before any I/O).

use std::io;
use std::ops::Range;
use std::time::Duration;

use thiserror::Error;

use crate::RunningJob;

/// A [`ClientConfig`](crate::ClientConfig) field out of bounds, or the client could not start.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The page budget is zero or too large.
    #[error("page budget of {pages} pages: must be at least 1")]
    PageBudget {
        /// The budget given.
        pages: usize,
    },
    /// The sub-job size is zero, not a multiple of 512 or too large.
    #[error("sub-job size of {bytes} bytes: must be a non-zero multiple of 512 up to {max}")]
    SubjobSize {
        /// The size given.
        bytes: usize,
        /// The largest size allowed.
        max: usize,
    },
    /// Sub-jobs in flight is zero or too large.
    #[error("{count} sub-jobs in flight: must be between 1 and {max}")]
    SubjobsInFlight {
        /// The count given.
        count: usize,
        /// The largest count allowed.
        max: usize,
    },
    /// The queued-jobs limit is zero or too large.
    #[error("queued-jobs limit of {count}: must be at least 1")]
    QueuedJobs {
        /// The limit given.
        count: usize,
    },
    /// The throttle's busy percentage is outside 1..=100.
    #[error("throttle of {percent} % busy: must be between 1 and 100 (leave it unset for no limit)")]
    ThrottleBusy {
        /// The percentage given.
        percent: u32,
    },
    /// The throttle's rate is zero.
    #[error("throttle rate of {bytes_per_s} bytes/s: must be at least 1 (leave it unset for no limit)")]
    ThrottleRate {
        /// The rate given.
        bytes_per_s: u64,
    },
    /// The per-I/O timeout is zero.
    #[error("I/O timeout of {ms} ms: must be at least 1 (leave it unset to wait for ever)")]
    IoTimeout {
        /// The timeout given.
        ms: u64,
    },
    /// The page arena could not be reserved.
    #[error("reserving the page arena of {pages} pages")]
    Arena {
        /// The budget asked for.
        pages: usize,
        /// What the mapping said.
        #[source]
        source: io::Error,
    },
    /// The client's worker thread could not start.
    #[error("starting the client's worker thread")]
    Worker(#[source] io::Error),
    /// [`Client::start_in_current_system`](crate::Client::start_in_current_system) on a thread
    /// that runs no actix System.
    #[error("starting a client in the current actix System: this thread runs none")]
    NoActixSystem,
}

/// Why a job was refused at submission. Nothing was read or written.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SubmitError {
    /// A copy or zero job without targets.
    #[error("no targets given")]
    NoTargets,
    /// More targets than one job can report on.
    #[error("{count} targets: at most {max} per job")]
    TooManyTargets {
        /// Targets given.
        count: usize,
        /// Most allowed.
        max: usize,
    },
    /// A target's sector count differs from the source's.
    #[error("target {target} ({device}) has {target_sectors} sectors, the source {source_sectors}")]
    CountMismatch {
        /// Index of the target.
        target: usize,
        /// Its device.
        device: String,
        /// Its sector count.
        target_sectors: u64,
        /// The source's sector count.
        source_sectors: u64,
    },
    /// A region ends past the end of its device.
    #[error("region {sectors:?} of {device} ends past the device's end at sector {device_sectors}")]
    OutOfRange {
        /// The device.
        device: String,
        /// The region's sectors.
        sectors: Range<u64>,
        /// The device's length in sectors.
        device_sectors: u64,
    },
    /// A region's start or length is not a multiple of its device's logical block size.
    #[error("region {sectors:?} of {device} is not aligned to its {block_size}-byte logical blocks")]
    Misaligned {
        /// The device.
        device: String,
        /// The region's sectors.
        sectors: Range<u64>,
        /// The device's logical block size in bytes.
        block_size: u32,
    },
    /// A zoned target's zone ends fall inside the region but not on the job's logical blocks
    /// (the largest of its devices'): a sub-job cut at a zone's end would split a block.
    #[error(
        "target {target} ({device}): its zones of {zone_sectors} sectors do not end on the job's {block_sectors}-sector blocks"
    )]
    ZoneMisaligned {
        /// Index of the target.
        target: usize,
        /// Its device.
        device: String,
        /// The device's zone length in sectors.
        zone_sectors: u64,
        /// The job's logical block in sectors.
        block_sectors: u64,
    },
    /// A sparse copy's zero-scan block is not 0 or a power of two of at least 512 bytes.
    #[error("zero-scan block of {bytes} bytes: must be 0 (off) or a power of two of at least 512")]
    ZeroBlockSize {
        /// The size given.
        bytes: u32,
    },
    /// A target overlaps the source on the same device.
    #[error("target {target} overlaps the source on {device}: {target_sectors:?} and {source_sectors:?}")]
    TargetOverlapsSource {
        /// Index of the target.
        target: usize,
        /// The shared device.
        device: String,
        /// The target's sectors.
        target_sectors: Range<u64>,
        /// The source's sectors.
        source_sectors: Range<u64>,
    },
    /// Two targets overlap on the same device.
    #[error("targets {first} and {second} overlap on {device}")]
    TargetsOverlap {
        /// Index of the earlier target.
        first: usize,
        /// Index of the later target.
        second: usize,
        /// The shared device.
        device: String,
    },
    /// The job's logical block (the largest of its devices') does not fit in the page budget.
    #[error("logical block of {block_size} bytes does not fit in the page budget of {budget_bytes} bytes")]
    BlockLargerThanBudget {
        /// The job's logical block size.
        block_size: u32,
        /// The client's page budget in bytes.
        budget_bytes: usize,
    },
    /// The client is shutting down.
    #[error("the client is shut down")]
    ShutDown,
    /// The queued-jobs limit is reached (only from the non-waiting `try_submit`).
    #[error("the queued-jobs limit of {max} is reached")]
    QueueFull {
        /// The limit.
        max: usize,
    },
    /// A blocking submission from the client's own worker thread (a callback) would wait for
    /// itself; use `try_submit` there.
    #[error("a blocking submission on the client's worker thread would deadlock")]
    WouldBlockWorker,
}

/// Why [`Client::shutdown_timeout`](crate::Client::shutdown_timeout) returned without a report.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ShutdownError {
    /// Jobs or prepared callbacks were still running when the time was up. The client takes
    /// no new job; the running ones go on.
    #[error(
        "shutdown gave up after {waited:?}: {} jobs and {prepared_callbacks} prepared callbacks still running",
        running.len()
    )]
    TimedOut {
        /// How long it waited.
        waited: Duration,
        /// The jobs not yet completed, in submission order.
        running: Vec<RunningJob>,
        /// Prepared callbacks not yet run (or not yet completed by their owner).
        prepared_callbacks: usize,
    },
    /// Called on the client's worker thread (from a callback): it would wait for itself.
    #[error("shutdown on the client's worker thread would wait for itself")]
    OnWorker,
}

/// A sector shift that would take a range below sector 0 or past `u64::MAX`.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("shifting sectors {range:?} so that sector {from} lands on {to} leaves the sector numbers")]
#[non_exhaustive]
pub struct ShiftError {
    /// The first range that did not fit.
    pub range: Range<u64>,
    /// The sector that was to move.
    pub from: u64,
    /// Where it was to land.
    pub to: u64,
}

/// Why a device refuses a request by its [`Geometry`](crate::Geometry) alone, before any I/O
/// ([`Geometry::check_request`](crate::Geometry::check_request)). The same rules for every
/// backend; each wraps it with its own name and the operation.
///
/// The message names the rule broken, not the request: the backend's error around it names the
/// device, the operation and the sectors. [`RequestRefused::errno`] is EINVAL for both
/// variants: what `pread`/`pwrite` give for a misaligned O_DIRECT request and what an NBD
/// server gives for a request past the export's end. (The simulator's disks keep EIO for a
/// request past the end, as the kernel's block layer fails such a bio.)
///
/// ```
/// # use kcopyd_core::{Geometry, RequestRefused};
/// let geometry = Geometry::new(64, 512);
/// let refused = geometry.check_request(60, 4096).unwrap_err();
/// assert_eq!(refused, RequestRefused::OutOfRange { offset_sectors: 60, len_bytes: 4096, device_sectors: 64 });
/// assert_eq!(refused.to_string(), "past the end of the device (64 sectors)");
/// assert_eq!(refused.sectors(), 60..68);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum RequestRefused {
    /// The offset or the length is not a whole number of logical blocks.
    #[error("not aligned to the {block_bytes}-byte logical block")]
    Misaligned {
        /// First sector asked for.
        offset_sectors: u64,
        /// Bytes asked for.
        len_bytes: u128,
        /// The device's logical block size.
        block_bytes: u32,
    },
    /// The request ends past the device's last sector (or past sector 2⁶⁴).
    #[error("past the end of the device ({device_sectors} sectors)")]
    OutOfRange {
        /// First sector asked for.
        offset_sectors: u64,
        /// Bytes asked for.
        len_bytes: u128,
        /// The device's length in sectors.
        device_sectors: u64,
    },
}

impl RequestRefused {
    /// EINVAL, the errno of every refusal (see the type's documentation).
    pub const ERRNO: i32 = 22;

    /// The sectors asked for, a partial last sector rounded up, saturating at `u64::MAX`.
    pub fn sectors(&self) -> Range<u64> {
        let (RequestRefused::Misaligned { offset_sectors, len_bytes, .. }
        | RequestRefused::OutOfRange { offset_sectors, len_bytes, .. }) = *self;
        let len_sectors = u64::try_from(len_bytes.div_ceil(crate::SECTOR_SIZE as u128)).unwrap_or(u64::MAX);
        offset_sectors..offset_sectors.saturating_add(len_sectors)
    }

    /// The errno of the refusal: [`RequestRefused::ERRNO`].
    pub fn errno(&self) -> i32 {
        Self::ERRNO
    }

    /// The `io::ErrorKind` of [`RequestRefused::errno`]: `InvalidInput`.
    pub fn io_kind(&self) -> io::ErrorKind {
        io::ErrorKind::InvalidInput
    }
}
