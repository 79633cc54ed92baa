//! `kcopyd-core`: a userspace block-copy engine in the manner of device-mapper's kcopyd.
//!
//! Copy a range of sectors from one [`BlockDevice`] to one or more others, or zero ranges,
//! with asynchronous completion, a bounded page budget and exact per-target error reports.
//!
//! ```text
//!  Job::copy / Job::zero ─► Client::submit ─► JobSpec::validate (job.rs; before any I/O)
//!                              │ admission permit (queued_jobs_max)
//!                              ▼
//!  JobHandle ◄─ outcome slot ─ ClientActor ─start─► JobActor ─► JobRun::run (run.rs, no actix)
//!  (handle.rs: await, wait,    (actors.rs: one       │           min(subjobs_in_flight, sub-jobs)
//!   progress, cancel)           arbiter; callbacks   │           loops, each sub-job after sub-job:
//!                               one at a time) ◄─────┘           pages (FIFO) → next sub-job →
//!                                   JobDone                      throttle → read the source once
//!                                                                (narrow on error) → [WRITE_SEQ
//!                                                                turn] → write every target
//! ```
//!
//! One file per concern, each using only those before it: `job.rs` (what a job is),
//! `handle.rs` (its handle and outcome slot), `run.rs` (the algorithm), `shared.rs` (what a
//! client's threads share), `actors.rs` (all actix code), `client.rs` (admission and
//! shutdown). Device I/O for sub-jobs goes through `io.rs`, pages through `pool.rs`; sparse
//! copies' allocation walk and zero scan live in `sparse.rs`, called from `run.rs`.
//!
//! The crate touches no files and no devices: its one OS resource is the page arena, an
//! anonymous mapping reserved when the client starts. Everything device-specific lives
//! behind [`BlockDevice`].
//!
//! ```
//! use std::sync::Arc;
//! use kcopyd_core::{Client, ClientConfig, Flags, Job, Region};
//! use kcopyd_sim::MemDisk;
//!
//! let source = Arc::new(MemDisk::with_pattern("source", 1024, 512, 7));
//! let target = Arc::new(MemDisk::zeroed("target", 2048, 512));
//! let client = Client::new(ClientConfig::default()).unwrap();
//! let job = client
//!     .submit_blocking(kcopyd_core::Job::copy(
//!         Region::new(source.clone(), 0, 1024),
//!         vec![Region::new(target.clone(), 1024, 1024)],
//!         Flags::empty(),
//!     ))
//!     .unwrap();
//! let outcome = job.wait();
//! assert!(outcome.is_ok());
//! assert_eq!(source.snapshot(0, 1024), target.snapshot(1024, 1024));
//! client.shutdown_blocking();
//! ```
#![warn(missing_docs)]
// A library does not print: diagnostics go through `tracing`, results through outcomes.
#![cfg_attr(not(test), deny(clippy::print_stderr, clippy::print_stdout))]

mod actors;
mod block_on;
mod buffer;
mod client;
mod config;
mod device;
mod error;
mod forward;
mod handle;
mod io;
mod job;
mod outcome;
mod pool;
mod region;
mod run;
mod shared;
mod sparse;
mod stats;
mod throttle;
mod time_scale;
mod verify;

pub use buffer::{ReadBuf, WriteBuf};
pub use client::{Client, PreparedCallback};
pub use config::{
    ClientConfig, PAGE_BUDGET_DEFAULT, SUBJOB_SIZE_DEFAULT_BYTES, SUBJOB_SIZE_MAX, SUBJOBS_IN_FLIGHT_DEFAULT,
    SUBJOBS_IN_FLIGHT_MAX,
};
pub use device::{BlockDevice, Device, DeviceId, Geometry, IntoDevice, IoFuture, all_allocated};
pub use error::{ConfigError, RequestRefused, ShiftError, ShutdownError, SubmitError};
pub use forward::{Forward, Hooks};
pub use handle::{JobHandle, Progress};
pub use job::Job;
pub use outcome::{Outcome, TargetMask, TargetReport};
pub use pool::{HUGE_PAGE_SIZE, PagePool, Pages, PoolStats};
pub use region::{Flags, RangeSet, Region};
pub use run::read_narrowed;
pub use shared::{RunningJob, ShutdownReport};
pub use sparse::{HOLE_SUBJOB_SECTORS_MAX, Sparse, TargetZeroes};
pub use stats::{ClientStats, DeviceStats, LATENCY_BUCKETS, LatencyHistogram, OpStats};
pub use throttle::{BUSY_WINDOW, Throttle};
pub use time_scale::{set_time_scale, time_scale, to_model, to_tokio};
pub use verify::{Comparison, TargetDiff, Verify, VerifyControl, VerifyError, VerifyHandle};

/// Bytes in a sector, the unit of every offset and length in this crate.
pub const SECTOR_SIZE: usize = 512;
/// Bytes in a page of the page arena.
pub const PAGE_SIZE: usize = 4096;
/// Sectors in a page.
pub const SECTORS_PER_PAGE: u64 = (PAGE_SIZE / SECTOR_SIZE) as u64;
/// Most targets one job may have (the width of [`TargetMask`]).
pub const TARGETS_MAX: usize = 128;

/// The bytes in `len_sectors` sectors, as a `u128`: a device may have up to `u64::MAX` sectors,
/// whose bytes (2⁷³) no `u64` holds. Every sector-to-byte count that a region can reach goes
/// through this (or through a checked conversion to `usize` for a buffer's length).
///
/// ```
/// # use kcopyd_core::sectors_to_bytes;
/// assert_eq!(sectors_to_bytes(8), 4096);
/// assert_eq!(sectors_to_bytes(u64::MAX), u128::from(u64::MAX) * 512);
/// ```
pub const fn sectors_to_bytes(len_sectors: u64) -> u128 {
    len_sectors as u128 * SECTOR_SIZE as u128
}

const _: () = assert!(PAGE_SIZE % SECTOR_SIZE == 0);
const _: () = assert!(PAGE_SIZE.is_power_of_two() && SECTOR_SIZE.is_power_of_two());
const _: () = assert!(TARGETS_MAX <= u128::BITS as usize);
