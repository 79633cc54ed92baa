//! The state every handle of a clone shares, and the metadata store between commits: plain
//! data, below the files that act on it (each adds its methods to [`Inner`]).
//!
//! ```text
//!  device.rs (create, open, BlockDevice) ─┐
//!  foreground.rs (Inner::read, modify)   ─┼─► Inner: devices, client, Regions, Store, counters
//!  commit.rs (Inner::commit)             ─┤         └─ Store: layout, current slot, seq, template
//!  hydration.rs (the background copy)    ─┘
//! ```

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Mutex, MutexGuard, PoisonError};

use kcopyd_core::{Client, Device, DeviceId, Geometry};
use tokio::sync::Notify;

use crate::CloneOptions;
use crate::metadata::{Header, Layout};
use crate::regions::Regions;
use crate::status::Counters;

/// What every handle of a clone shares.
pub(crate) struct Inner {
    pub(crate) name: String,
    pub(crate) id: DeviceId,
    pub(crate) geometry: Geometry,
    pub(crate) source: Device,
    pub(crate) destination: Device,
    pub(crate) metadata: Device,
    pub(crate) client: Client,
    pub(crate) regions: Mutex<Regions>,
    /// Woken on every change of a region, of the foreground count, of the options, at stop.
    pub(crate) changed: Notify,
    pub(crate) store: tokio::sync::Mutex<Store>,
    pub(crate) commits_begun: AtomicU64,
    /// The index of the latest commit that succeeded.
    pub(crate) commits_done: AtomicU64,
    /// The sequence number of the latest good commit (the store's, readable without its lock).
    pub(crate) commit_seq: AtomicU64,
    /// The bitmap version of the latest good commit (the store's, readable without its lock).
    pub(crate) committed_version: AtomicU64,
    /// Where the slots are on the metadata device.
    pub(crate) layout: Layout,
    pub(crate) foreground: AtomicU64,
    pub(crate) options: Mutex<CloneOptions>,
    pub(crate) stop: AtomicBool,
    pub(crate) counters: Counters,
}

impl Inner {
    pub(crate) fn regions(&self) -> MutexGuard<'_, Regions> {
        // Every update leaves the state consistent before it could panic.
        self.regions.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn options(&self) -> CloneOptions {
        *self.options.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The metadata device's state between commits.
#[derive(Debug)]
pub(crate) struct Store {
    pub(crate) layout: Layout,
    /// The slot holding the latest good commit.
    pub(crate) current_slot: usize,
    /// That commit's sequence number.
    pub(crate) seq: u64,
    /// The bitmap version it holds.
    pub(crate) committed_version: u64,
    /// Fields every header repeats.
    pub(crate) template: Header,
}
