//! `kcopyd-clone`: device-mapper's dm-clone as a library. A [`CloneDevice`] is a
//! [`BlockDevice`](kcopyd_core::BlockDevice) over a read-only source (a remote export, say), a
//! local destination and a small metadata device: usable at once, it serves reads of regions
//! not yet copied from the source while a kcopyd [`Client`](kcopyd_core::Client) copies
//! ("hydrates") them onto the destination in the background.
//!
//! ```text
//!              ┌──────────────────────── CloneDevice ────────────────────────┐
//!  read ──────►│ hydrated? ── yes ─► destination    no ─► source (+ a hint)   │
//!  write ─────►│ region hydrated or covered whole? ─► destination            │
//!              │   else copy the region first (through the client), then write│
//!  discard ───►│ whole unhydrated regions: zeroes on the destination, no copy │
//!  flush ─────►│ destination.flush() ─► bitmap to the other slot ─► meta.flush│
//!              │ run_hydration(): threshold regions in flight, batches, hints,│
//!              │   paused by foreground I/O, bounded retries, periodic commits│
//!              └──────────────────────────────────────────────────────────────┘
//! ```
//!
//! One file per concern: `config.rs` (region size and knobs), `error.rs`, `metadata.rs` (the
//! on-disk format), `regions.rs` (the in-memory state, no I/O), `commit.rs` (crash-consistent
//! commits), `foreground.rs` (the device's requests), `hydration.rs` (copies and the background
//! loop), `device.rs` (create, open, the trait), `status.rs`. docs/CLONE.md tells the
//! guarantees and the format.
//!
//! ```
//! use std::sync::Arc;
//! use kcopyd_clone::{CloneDevice, CloneDevices, CloneOptions, HydrationEnd};
//! use kcopyd_core::{BlockDevice, ReadBuf};
//! use kcopyd_sim::{MemDisk, Simulation};
//!
//! let source = Arc::new(MemDisk::with_pattern("source", 2048, 512, 7));
//! let destination = Arc::new(MemDisk::zeroed("destination", 2048, 512));
//! let metadata = Arc::new(MemDisk::zeroed("metadata", 64, 512));
//! Simulation::run(Default::default(), |client, _| async move {
//!     let devices = CloneDevices { source: source.clone(), destination: destination.clone(), metadata };
//!     let clone = CloneDevice::create(devices, 64 * 1024, client, CloneOptions::default()).await.unwrap();
//!     // Usable at once: this read comes from the source.
//!     let (buf, result) = clone.read(0, ReadBuf::with_capacity(4096)).await;
//!     result.unwrap();
//!     assert_eq!(buf.to_vec(), source.snapshot(0, 8));
//!     assert_eq!(clone.run_hydration().await, HydrationEnd::Complete);
//!     assert_eq!(destination.snapshot(0, 2048), source.snapshot(0, 2048));
//!     assert!(clone.status().hydration_complete);
//! })
//! .unwrap();
//! ```
#![warn(missing_docs)]
#![forbid(unsafe_code)]
// A library does not print.
#![cfg_attr(not(test), deny(clippy::print_stderr, clippy::print_stdout))]

mod commit;
mod config;
mod device;
mod error;
#[cfg(feature = "explore")]
pub mod explore;
mod foreground;
mod hydration;
mod inner;
mod metadata;
mod regions;
mod status;

pub use config::{
    COMMIT_INTERVAL_DEFAULT_MS, CloneOptions, HINTS_MAX, HYDRATION_ATTEMPTS_DEFAULT, HYDRATION_ATTEMPTS_MAX,
    HYDRATION_BATCH_SIZE_DEFAULT, HYDRATION_THRESHOLD_DEFAULT, HYDRATION_THRESHOLD_MAX, REGION_SIZE_MAX,
    REGION_SIZE_MIN, check_region_size,
};
pub use device::{CloneDevice, CloneDevices};
pub use error::{CloneError, HydrationError, RequestError};
pub use hydration::HydrationEnd;
pub use metadata::{BLOCK_MIN_BYTES, HEADER_BYTES, MAGIC, VERSION, crc32c, metadata_bytes_needed};
pub use status::{CloneStats, CloneStatus};

const _: () = assert!(REGION_SIZE_MIN.is_power_of_two() && REGION_SIZE_MAX.is_power_of_two());
const _: () = assert!(REGION_SIZE_MIN >= kcopyd_core::SECTOR_SIZE as u64);
