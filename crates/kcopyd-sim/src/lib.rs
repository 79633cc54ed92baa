//! `kcopyd-sim`: deterministic, fault-injecting in-memory block devices in virtual time, for
//! tests, demos and design exploration.
//!
//! ```text
//!            ┌──────────────────── MemDisk ─────────────────────┐
//!  request ──► check: aligned? in range?          → EINVAL / EIO │ before any transfer
//!            │ timing: queue slot, cost, data path, jitter       │ tokio sleep (virtual when paused)
//!            │ fault plan: latent errors, write errors, device   │ EIO, logged in the fault log
//!            │   failure, slow spikes, misdirects, short I/O     │
//!            │ zoned: write pointer per zone                     │
//!            │ storage: the true bytes (dense, or sparse extents │ volatile cache: undo log that a
//!            │   of provenance)                                  │   crash may replay or tear
//!            └───────────────────────────────────────────────────┘
//! ```
//!
//! Memory always holds the clean data; faults are a separate map consulted on each access, so
//! a test can compare what a job reported with what fired ([`MemDisk::fault_log`]). Run under
//! [`Simulation`], every actor and every simulated I/O shares one thread and paused tokio
//! time, so a seed replays the same [`Trace`] bit for bit.
//!
//! [`spec`] reads a disk from one line of text (`sim:size=1G,latency=100us,...`).
//!
//! [`explore`] runs scenario files (disks, client, jobs, a foreground workload) and sweeps over
//! their keys, for design exploration.
#![warn(missing_docs)]
#![forbid(unsafe_code)]
// Library code reports through its return values, never by printing.
#![cfg_attr(not(test), deny(clippy::print_stderr, clippy::print_stdout))]

mod disk_model;
mod error;
pub mod explore;
mod faults;
mod mem_disk;
mod simulation;
pub mod spec;
mod storage;
mod timing;
mod trace;
pub mod units;

pub use disk_model::{DiskModel, Measurement};
pub use error::{DiskError, DiskFailure};
pub use faults::{FaultKind, FaultOdds, FaultPlan, FaultRecord, Misdirect, Operation, SlowSpike, Stall, WriteFault};
pub use mem_disk::{IoStats, MemDisk, MemDiskOptions};
pub use simulation::{Simulation, in_virtual_time, time_scale, to_model, to_tokio};
pub use storage::{Provenance, pattern_sector, provenance_of};
pub use timing::{IoModel, Latency, LinkModel, Medium, PathModel, SeekModel};
pub use trace::{Trace, TraceEvent};

/// A deterministic 64-bit mixer (splitmix64): the same input gives the same output.
pub fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}
