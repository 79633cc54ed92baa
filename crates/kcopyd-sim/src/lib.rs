//! `kcopyd-sim`: in-memory block devices with injected faults, for tests, demos and design
//! exploration.
//!
//! ```text
//!            ┌──────────────── MemDisk ────────────────┐
//!  request ──► check: aligned? in range? zoned WP? │ EINVAL / EIO as the kernel says
//!            │ fault map: bad read / bad write ranges │ EIO, nothing transferred
//!            │ timing: queue slots, cost, bandwidth,  │ tokio sleep (virtual when paused)
//!            │         seeded jitter                  │
//!            │ memory: the true bytes                 │ copied into / out of the buffer
//!            └─────────────────────────────────────────┘
//! ```
//!
//! Memory always holds the clean data; faults are a separate map consulted on each access,
//! so a test can compare what a job reported with what was injected.
#![warn(missing_docs)]

mod mem_disk;

pub use mem_disk::{FaultKind, FaultRecord, IoModel, IoStats, Latency, MemDisk, MemDiskOptions, Operation};

/// A deterministic 64-bit mixer (splitmix64): the same input gives the same output.
pub fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}
