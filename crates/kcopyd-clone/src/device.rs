//! The clone as a [`BlockDevice`]: creating it (new metadata) or opening it (resuming from
//! the latest commit), the checks on its devices, and the trait's methods, which hand over to
//! `foreground.rs`.
//!
//! ```text
//!  CloneDevice::create(devices, region size, options) ── checks ── format metadata ─┐
//!  CloneDevice::open(devices, options) ── checks ── load the newest valid slot ───────┤
//!                                                                                     ▼
//!  CloneDevice (Arc<Inner> of inner.rs: devices, client, Regions, Store, counters) ─ BlockDevice ─► foreground.rs
//!        └─ run_hydration() (hydration.rs): the background copy, driven by the embedder
//! ```

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use kcopyd_core::{
    BlockDevice, Client, Device, DeviceId, Geometry, IoFuture, RangeSet, ReadBuf, SECTOR_SIZE, WriteBuf,
    sectors_to_bytes,
};
use tokio::sync::Notify;

use crate::CloneOptions;
use crate::config::check_region_size;
use crate::error::CloneError;
use crate::foreground::Modify;
use crate::inner::{Inner, Store};
use crate::metadata::{self, Header, Layout};
use crate::regions::Regions;
use crate::status::{CloneStats, CloneStatus, Counters};

static NEXT_CLONE: AtomicU64 = AtomicU64::new(1);

/// The three devices of a clone.
#[derive(Debug, Clone)]
pub struct CloneDevices {
    /// Where the data comes from; only ever read.
    pub source: Device,
    /// Where it goes; at least as long as the source. Its content before the clone is
    /// created does not matter: no region is read from it before it is hydrated.
    pub destination: Device,
    /// Where the bitmap of hydrated regions is committed (see docs/CLONE.md for its size).
    pub metadata: Device,
}

/// A block device over a read-only source that hydrates itself onto a destination, as
/// device-mapper's dm-clone: reads of regions not yet copied go to the source, writes wait for
/// their region's copy (or skip it when they cover the region whole), discards mark regions
/// hydrated without copying, and flushes commit the bitmap crash-consistently.
///
/// Cloning the handle shares the device. The background hydration runs when the embedder
/// awaits [`run_hydration`](CloneDevice::run_hydration) (spawn it on any runtime with a
/// timer); the foreground works without it.
#[derive(Clone)]
pub struct CloneDevice {
    pub(crate) inner: Arc<Inner>,
}

impl CloneDevice {
    /// Creates a clone: checks the devices and options, then writes fresh metadata (no region
    /// hydrated) and flushes it. Copies run through `client`, under its throttle.
    ///
    /// # Errors
    /// A [`CloneError`] naming what is wrong; nothing is written unless it is
    /// [`CloneError::WriteMetadata`].
    pub async fn create(
        devices: CloneDevices,
        region_size_bytes: u64,
        client: Client,
        options: CloneOptions,
    ) -> Result<CloneDevice, CloneError> {
        options.validate()?;
        check_region_size(region_size_bytes)?;
        let region_sectors = region_size_bytes / SECTOR_SIZE as u64;
        let geometry = check_devices(&devices, region_sectors)?;
        let region_count = geometry.len_sectors.div_ceil(region_sectors);
        let layout = Layout::new(&devices.metadata, region_count)?;
        let template = Header {
            seq: 1,
            slot: 0,
            block_bytes: layout.block_bytes,
            region_sectors,
            region_count,
            source_sectors: geometry.len_sectors,
            destination_sectors: devices.destination.geometry().len_sectors,
            hydrated_regions: 0,
            bitmap_crc: 0,
        };
        format(&devices.metadata, &layout, &template).await?;
        let bitmap = vec![0u8; layout.bitmap_bytes()];
        let regions = Regions::new(region_sectors, geometry.len_sectors, &bitmap, layout.regions_per_block(), 1);
        let store = Store { layout, current_slot: 0, seq: 1, committed_version: 0, template };
        Ok(CloneDevice::assemble(devices, geometry, client, options, regions, store))
    }

    /// Opens a clone from its metadata: the newest slot whose checksums hold. Regions that
    /// were hydrated but not committed before a crash are copied again.
    ///
    /// # Errors
    /// A [`CloneError`]: the devices or options are wrong, the metadata cannot be read, holds
    /// no valid commit, or describes other devices. Nothing is written.
    pub async fn open(devices: CloneDevices, client: Client, options: CloneOptions) -> Result<CloneDevice, CloneError> {
        options.validate()?;
        let metadata_device = &devices.metadata;
        let block_bytes = Layout::new(metadata_device, 0)?.block_bytes;
        let loaded = metadata::load(metadata_device, block_bytes).await?;
        let header = loaded.header;
        check_region_size(header.region_sectors.saturating_mul(SECTOR_SIZE as u64))?;
        let geometry = check_devices(&devices, header.region_sectors)?;
        let mismatch = |field, recorded, actual| CloneError::MetadataMismatch {
            device: metadata_device.name().to_owned(),
            field,
            recorded,
            actual,
        };
        if header.source_sectors != geometry.len_sectors {
            return Err(mismatch("source sectors", header.source_sectors, geometry.len_sectors));
        }
        let destination_sectors = devices.destination.geometry().len_sectors;
        if header.destination_sectors != destination_sectors {
            return Err(mismatch("destination sectors", header.destination_sectors, destination_sectors));
        }
        let region_count = geometry.len_sectors.div_ceil(header.region_sectors);
        if header.region_count != region_count {
            return Err(mismatch("regions", header.region_count, region_count));
        }
        let layout = Layout::new(metadata_device, region_count)?;
        let slot = header.slot as usize;
        let regions = Regions::new(
            header.region_sectors,
            geometry.len_sectors,
            &loaded.bitmap,
            layout.regions_per_block(),
            1 - slot,
        );
        let store = Store { layout, current_slot: slot, seq: header.seq, committed_version: 0, template: header };
        Ok(CloneDevice::assemble(devices, geometry, client, options, regions, store))
    }

    fn assemble(
        devices: CloneDevices,
        geometry: Geometry,
        client: Client,
        options: CloneOptions,
        regions: Regions,
        store: Store,
    ) -> CloneDevice {
        let name = format!("clone:{}", devices.destination.name());
        let id = DeviceId { namespace: "clone", major: NEXT_CLONE.fetch_add(1, Ordering::Relaxed), minor: 0 };
        let (commit_seq, layout) = (AtomicU64::new(store.seq), store.layout);
        CloneDevice {
            inner: Arc::new(Inner {
                name,
                id,
                geometry,
                source: devices.source,
                destination: devices.destination,
                metadata: devices.metadata,
                client,
                regions: Mutex::new(regions),
                changed: Notify::new(),
                store: tokio::sync::Mutex::new(store),
                commits_begun: AtomicU64::new(0),
                commits_done: AtomicU64::new(0),
                commit_seq,
                committed_version: AtomicU64::new(0),
                layout,
                foreground: AtomicU64::new(0),
                options: Mutex::new(options),
                stop: AtomicBool::new(false),
                counters: Counters::default(),
            }),
        }
    }

    /// Changes the hydration knobs while the clone runs (dm-clone's messages).
    ///
    /// # Errors
    /// [`CloneError::Option`]; the options are then unchanged.
    pub fn set_options(&self, options: CloneOptions) -> Result<(), CloneError> {
        options.validate()?;
        *self.inner.options.lock().unwrap_or_else(PoisonError::into_inner) = options;
        self.inner.changed.notify_waiters();
        Ok(())
    }

    /// The knobs in force.
    pub fn options(&self) -> CloneOptions {
        self.inner.options()
    }

    /// Where the clone stands, in dm-clone's terms (its `Display` is dm-clone's status line).
    pub fn status(&self) -> CloneStatus {
        let (hydrated, total, hydrating, failed, complete, region_sectors) = {
            let regions = self.inner.regions();
            let complete = regions.released();
            let sectors = regions.region_sectors;
            (regions.hydrated(), regions.region_count, regions.hydrating(), regions.failed(), complete, sectors)
        };
        let (layout, seq) = (self.inner.layout, self.inner.commit_seq.load(Ordering::Acquire));
        let metadata_block_sectors = layout.block_sectors();
        CloneStatus {
            metadata_block_sectors,
            metadata_blocks_used: layout.total_sectors() / metadata_block_sectors,
            metadata_blocks_total: self.inner.metadata.geometry().len_sectors / metadata_block_sectors,
            region_sectors,
            regions_hydrated: hydrated,
            regions_total: total,
            regions_hydrating: hydrating,
            regions_failed: failed,
            hydration_complete: complete,
            commit_seq: seq,
            options: self.inner.options(),
        }
    }

    /// Counters since the clone was created or opened.
    pub fn stats(&self) -> CloneStats {
        self.inner.counters.snapshot()
    }

    /// Tries the regions given up on again (their attempts start from zero).
    pub fn retry_failed(&self) {
        self.inner.regions().retry_failed();
        self.inner.changed.notify_waiters();
    }

    /// Asks [`run_hydration`](CloneDevice::run_hydration) to return; copies in flight finish
    /// on their own. The foreground goes on working.
    pub fn stop_hydration(&self) {
        self.inner.stop.store(true, Ordering::Release);
        self.inner.changed.notify_waiters();
    }
}

/// Checks the three devices against each other and the region size; the clone's geometry.
fn check_devices(devices: &CloneDevices, region_sectors: u64) -> Result<Geometry, CloneError> {
    let roles =
        [("source", &devices.source), ("destination", &devices.destination), ("metadata device", &devices.metadata)];
    for (i, (first, a)) in roles.iter().enumerate() {
        for (second, b) in &roles[i + 1..] {
            if a.id() == b.id() {
                return Err(CloneError::SameDevice { first, second, device: a.name().to_owned() });
            }
        }
    }
    let (source, destination) = (devices.source.geometry(), devices.destination.geometry());
    let region_bytes = region_sectors * SECTOR_SIZE as u64;
    for (device, geometry) in [(&devices.source, source), (&devices.destination, destination)] {
        if u64::from(geometry.logical_block_size) > region_bytes {
            return Err(CloneError::RegionSmallerThanBlock {
                region_bytes,
                device: device.name().to_owned(),
                block_size: geometry.logical_block_size,
            });
        }
    }
    if destination.len_sectors < source.len_sectors {
        return Err(CloneError::DestinationTooSmall {
            device: devices.destination.name().to_owned(),
            destination_sectors: destination.len_sectors,
            source_sectors: source.len_sectors,
        });
    }
    let block_size = source.logical_block_size.max(destination.logical_block_size);
    if source.len_sectors % (u64::from(block_size) / SECTOR_SIZE as u64) != 0 {
        return Err(CloneError::SourceLength {
            device: devices.source.name().to_owned(),
            source_sectors: source.len_sectors,
            block_size,
        });
    }
    Ok(Geometry::new(source.len_sectors, block_size).with_write_zeroes(destination.write_zeroes))
}

/// Writes fresh metadata: both headers zeroed and flushed first (so that an older clone's
/// metadata on the device can never be taken for this one's), then slot 0 with an empty
/// bitmap, flushed.
async fn format(device: &Device, layout: &Layout, template: &Header) -> Result<(), CloneError> {
    let failed = |source| CloneError::WriteMetadata { device: device.name().to_owned(), source };
    let zeroes = vec![0u8; 2 * layout.block_bytes as usize];
    metadata::write_sectors(device, 0, zeroes).await.map_err(failed)?;
    device.flush().await.map_err(failed)?;
    let bitmap = vec![0u8; layout.bitmap_bytes()];
    let header = Header { bitmap_crc: metadata::crc32c(&bitmap), ..*template };
    // Every bitmap block, as one run (none for a clone of no regions).
    let blocks: Vec<_> = std::iter::once(0..layout.bitmap_blocks).filter(|run| !run.is_empty()).collect();
    metadata::write_commit(device, layout, &header, &bitmap, &blocks).await.map_err(failed)
}

impl BlockDevice for CloneDevice {
    fn name(&self) -> &str {
        &self.inner.name
    }

    fn id(&self) -> DeviceId {
        self.inner.id
    }

    fn geometry(&self) -> Geometry {
        self.inner.geometry
    }

    fn read(&self, offset_sectors: u64, buf: ReadBuf) -> IoFuture<'_, (ReadBuf, io::Result<()>)> {
        Box::pin(self.inner.clone().read(offset_sectors, buf))
    }

    fn write(&self, offset_sectors: u64, buf: WriteBuf) -> IoFuture<'_, io::Result<()>> {
        Box::pin(self.inner.clone().modify(offset_sectors, buf.len() as u128, Modify::Data(buf)))
    }

    fn write_zeroes(&self, offset_sectors: u64, len_sectors: u64) -> IoFuture<'_, io::Result<()>> {
        Box::pin(self.inner.clone().modify(offset_sectors, sectors_to_bytes(len_sectors), Modify::Zeroes))
    }

    fn flush(&self) -> IoFuture<'_, io::Result<()>> {
        Box::pin(self.inner.clone().flush())
    }

    /// Hydrated regions as the destination tells, the others as the source (and the
    /// destination, for a region hydrating or written meanwhile) tells: a sparse source's holes
    /// show through the clone until their regions hydrate.
    fn allocated(&self, offset_sectors: u64, len_sectors: u64) -> IoFuture<'_, io::Result<RangeSet>> {
        Box::pin(self.inner.clone().allocated(offset_sectors, len_sectors))
    }

    fn deallocates(&self) -> bool {
        self.inner.destination.deallocates()
    }

    fn deallocate(&self, offset_sectors: u64, len_sectors: u64) -> IoFuture<'_, io::Result<()>> {
        Box::pin(self.inner.clone().modify(offset_sectors, sectors_to_bytes(len_sectors), Modify::Deallocate))
    }
}

impl fmt::Debug for CloneDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CloneDevice").field("name", &self.inner.name).field("status", &self.status()).finish()
    }
}

// The handle is for any thread and any runtime.
const _: () = {
    const fn assert_shareable<T: Send + Sync + Clone + 'static>() {}
    assert_shareable::<CloneDevice>();
};
