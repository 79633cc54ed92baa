//! The device contract: one async, object-safe trait with owned buffers.

use std::fmt;
use std::future::Future;
use std::io;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;

use serde::Serialize;

use crate::{RangeSet, ReadBuf, RequestRefused, SECTOR_SIZE, WriteBuf, sectors_to_bytes};

/// The future a [`BlockDevice`] operation returns.
pub type IoFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A shared device handle: one job may mix backends.
pub type Device = Arc<dyn BlockDevice>;

/// What [`Region::new`](crate::Region::new) accepts as a device: any `Arc<D>` of a
/// [`BlockDevice`], or an already shared [`Device`].
pub trait IntoDevice {
    /// The shared device handle.
    fn into_device(self) -> Device;
}

impl<D: BlockDevice + 'static> IntoDevice for Arc<D> {
    fn into_device(self) -> Device {
        self
    }
}

impl IntoDevice for Device {
    fn into_device(self) -> Device {
        self
    }
}

/// What a device is like: its size and its rules. Made with [`Geometry::new`] and the
/// `with_` methods, so that a field added later breaks no device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Geometry {
    /// Length in 512-byte sectors.
    pub len_sectors: u64,
    /// Smallest unit of I/O in bytes: a power of two, at least 512. Every offset and length
    /// sent to the device is a multiple of it.
    pub logical_block_size: u32,
    /// Whether [`BlockDevice::write_zeroes`] is offloaded (no data transfer).
    pub write_zeroes: bool,
    /// Whether writes must be sequential (a zoned or append-only device).
    pub zoned: bool,
    /// A zoned device's zone length in sectors: no write may cross a multiple of it (a zone's
    /// end), so the engine cuts every sub-job there. 0 when not zoned, or when the whole device
    /// is one zone.
    pub zone_sectors: u64,
}

impl Geometry {
    /// A device of `len_sectors` sectors and `logical_block_size`-byte blocks, without
    /// write-zeroes offload, not zoned.
    ///
    /// ```
    /// # use kcopyd_core::Geometry;
    /// let g = Geometry::new(64, 4096).with_write_zeroes(true);
    /// assert_eq!(g.block_sectors(), 8);
    /// assert!(g.write_zeroes && !g.zoned);
    /// ```
    pub const fn new(len_sectors: u64, logical_block_size: u32) -> Geometry {
        Geometry { len_sectors, logical_block_size, write_zeroes: false, zoned: false, zone_sectors: 0 }
    }

    /// The same geometry, with write-zeroes offload on or off.
    pub const fn with_write_zeroes(self, write_zeroes: bool) -> Geometry {
        Geometry { write_zeroes, ..self }
    }

    /// The same geometry, zoned (sequential writes only) or not.
    pub const fn with_zoned(self, zoned: bool) -> Geometry {
        Geometry { zoned, ..self }
    }

    /// The same geometry with zones of `zone_sectors` (0: one zone, the whole device). Only
    /// meaningful on a zoned device.
    ///
    /// ```
    /// # use kcopyd_core::Geometry;
    /// let g = Geometry::new(1 << 20, 4096).with_zoned(true).with_zone_sectors(1 << 19);
    /// assert_eq!(g.zone_end(1000), Some(1 << 19));
    /// assert_eq!(Geometry::new(64, 512).zone_end(10), None, "not zoned: no zone ends");
    /// ```
    pub const fn with_zone_sectors(self, zone_sectors: u64) -> Geometry {
        Geometry { zone_sectors, ..self }
    }

    /// The end of the zone holding `sector` (the first sector a write from `sector` may not
    /// reach), or `None` if no zone ends before the device's end. Saturates at `u64::MAX`.
    pub const fn zone_end(&self, sector: u64) -> Option<u64> {
        if !self.zoned || self.zone_sectors == 0 {
            return None;
        }
        let end = (sector / self.zone_sectors).saturating_add(1).saturating_mul(self.zone_sectors);
        if end >= self.len_sectors { None } else { Some(end) }
    }

    /// The logical block size in sectors.
    pub fn block_sectors(&self) -> u64 {
        u64::from(self.logical_block_size) / SECTOR_SIZE as u64
    }

    /// Checks a request of `len_bytes` from `offset_sectors` against the device's rules, the
    /// same for every backend: whole logical blocks (checked first), and inside the device.
    /// Returns the sectors it covers. Bytes are counted in `u128`: a write-zeroes may cover
    /// up to `u64::MAX` sectors, and no sum overflows.
    ///
    /// Worked example, 4096-byte blocks on a 16-sector device: 4096 bytes at sector 8 end at
    /// sector 16, the end: accepted (`8..16`); at sector 4 (byte 2048): misaligned; at
    /// sector 16: out of range.
    ///
    /// ```
    /// # use kcopyd_core::{Geometry, RequestRefused};
    /// let geometry = Geometry::new(16, 4096);
    /// assert_eq!(geometry.check_request(8, 4096), Ok(8..16));
    /// assert!(matches!(geometry.check_request(4, 4096), Err(RequestRefused::Misaligned { .. })));
    /// assert!(matches!(geometry.check_request(16, 4096), Err(RequestRefused::OutOfRange { .. })));
    /// // The edge of the address space: aligned, but past the end, and no overflow.
    /// assert!(matches!(geometry.check_request(u64::MAX - 7, 4096), Err(RequestRefused::OutOfRange { .. })));
    /// assert_eq!(geometry.check_request(16, 0), Ok(16..16), "an empty request at the end is inside");
    /// ```
    ///
    /// # Errors
    /// [`RequestRefused::Misaligned`] or [`RequestRefused::OutOfRange`], naming the request
    /// and the device's block size or length.
    pub fn check_request(&self, offset_sectors: u64, len_bytes: u128) -> Result<Range<u64>, RequestRefused> {
        let block_bytes = u128::from(self.logical_block_size);
        if sectors_to_bytes(offset_sectors) % block_bytes != 0 || len_bytes % block_bytes != 0 {
            return Err(RequestRefused::Misaligned { offset_sectors, len_bytes, block_bytes: self.logical_block_size });
        }
        let end_sectors = u128::from(offset_sectors) + len_bytes / SECTOR_SIZE as u128;
        if end_sectors > u128::from(self.len_sectors) {
            return Err(RequestRefused::OutOfRange { offset_sectors, len_bytes, device_sectors: self.len_sectors });
        }
        let end_sectors = u64::try_from(end_sectors).expect("inside the device");
        debug_assert!(offset_sectors <= end_sectors && end_sectors <= self.len_sectors);
        Ok(offset_sectors..end_sectors)
    }

    /// [`Geometry::check_request`] for a request counted in sectors (write-zeroes,
    /// deallocate).
    ///
    /// # Errors
    /// As [`Geometry::check_request`].
    pub fn check_request_sectors(&self, offset_sectors: u64, len_sectors: u64) -> Result<Range<u64>, RequestRefused> {
        self.check_request(offset_sectors, sectors_to_bytes(len_sectors))
    }
}

/// Identity of the storage behind a device, to tell whether two regions can overlap.
///
/// Two handles with equal ids address the same bytes (two opens of one file, say).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct DeviceId {
    /// Which kind of backend minted the id ("mem", "file", "block", ...).
    pub namespace: &'static str,
    /// First half of the backend's key (a device number, a counter).
    pub major: u64,
    /// Second half of the backend's key (an inode number).
    pub minor: u64,
}

/// A block device: geometry plus asynchronous read, write, write-zeroes and flush.
///
/// Offsets and lengths are in 512-byte sectors and must be aligned to the logical block
/// size; a device refuses misaligned or out-of-range requests with an error and does no I/O.
/// Buffers are owned: `read` takes a [`ReadBuf`], fills its window and gives it back with the
/// result; `write` takes shared immutable bytes.
///
/// **Buffers are the engine's pages.** A device must drop every buffer it was given (the
/// `WriteBuf` of a write and every clone or slice of it, the `ReadBuf` of a read, which goes
/// back in the result) by the time the operation's future completes or is dropped: they are
/// pages of the client's fixed budget, and a device that keeps them (a zero-copy cache, say)
/// starves later jobs. A device that needs the data longer copies it out
/// ([`WriteBuf::to_vec`]). Pages kept past shutdown show in
/// [`ShutdownReport::pool`](crate::ShutdownReport::pool) as `pages_in_use`.
///
/// A device written outside this workspace can be tested without a client: give it buffers
/// from [`ReadBuf::with_capacity`] and [`WriteBuf::from_bytes`].
pub trait BlockDevice: Send + Sync + fmt::Debug {
    /// A name for messages (a path, or `sim:…`).
    fn name(&self) -> &str;

    /// Identity of the storage behind this handle.
    fn id(&self) -> DeviceId;

    /// Size and rules of the device.
    fn geometry(&self) -> Geometry;

    /// Reads `buf.len()` bytes at `offset_sectors` into the buffer's window.
    fn read(&self, offset_sectors: u64, buf: ReadBuf) -> IoFuture<'_, (ReadBuf, io::Result<()>)>;

    /// Writes `buf` at `offset_sectors`.
    fn write(&self, offset_sectors: u64, buf: WriteBuf) -> IoFuture<'_, io::Result<()>>;

    /// Writes `len_sectors` of zeroes at `offset_sectors`, offloaded where the geometry says
    /// so; a device without offload may still implement it by writing zeroes.
    fn write_zeroes(&self, offset_sectors: u64, len_sectors: u64) -> IoFuture<'_, io::Result<()>>;

    /// Makes every completed write durable.
    fn flush(&self) -> IoFuture<'_, io::Result<()>>;

    /// The sectors of `offset_sectors..offset_sectors + len_sectors` that hold data; the rest
    /// are holes that read as zeroes. Used by sparse copies
    /// ([`Sparse::skip_holes`](crate::Sparse::skip_holes)) to read only what is allocated.
    ///
    /// May over-report (say a hole is data) but never under-report. A device that cannot tell
    /// returns [`all_allocated`]: it loses nothing but speed.
    fn allocated(&self, offset_sectors: u64, len_sectors: u64) -> IoFuture<'_, io::Result<RangeSet>>;

    /// Whether [`deallocate`](BlockDevice::deallocate) releases storage (punches a hole)
    /// rather than writing zeroes. A device that cannot returns `false`.
    fn deallocates(&self) -> bool;

    /// Makes `len_sectors` at `offset_sectors` read as zeroes and releases their storage where
    /// the device can (a file punches a hole). A device that cannot release storage calls its
    /// own [`write_zeroes`](BlockDevice::write_zeroes): the range reads as zeroes either way.
    fn deallocate(&self, offset_sectors: u64, len_sectors: u64) -> IoFuture<'_, io::Result<()>>;
}

/// What a device that cannot tell its allocation answers to
/// [`BlockDevice::allocated`]: every sector of the range holds data (saturating at `u64::MAX`).
///
/// ```
/// # use std::task::{Context, Poll, Waker};
/// let mut answer = kcopyd_core::all_allocated(u64::MAX - 2, 10);
/// let Poll::Ready(Ok(set)) = answer.as_mut().poll(&mut Context::from_waker(Waker::noop())) else { panic!() };
/// assert_eq!(set.ranges(), &[u64::MAX - 2..u64::MAX]);
/// ```
pub fn all_allocated(offset_sectors: u64, len_sectors: u64) -> IoFuture<'static, io::Result<RangeSet>> {
    let end = offset_sectors.saturating_add(len_sectors);
    Box::pin(std::future::ready(Ok(RangeSet::from_range(offset_sectors..end))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_inside_whole_blocks_are_accepted_up_to_the_last_sector() {
        let geometry = Geometry::new(64, 4096);
        assert_eq!(geometry.check_request(0, 64 * 512), Ok(0..64), "the whole device");
        assert_eq!(geometry.check_request(56, 4096), Ok(56..64), "the last block");
        assert_eq!(geometry.check_request(64, 0), Ok(64..64), "empty, at the end");
        assert_eq!(geometry.check_request_sectors(8, 16), Ok(8..24));
    }

    #[test]
    fn misalignment_is_found_before_the_range_and_names_the_block() {
        let geometry = Geometry::new(64, 4096);
        let misaligned =
            |offset_sectors, len_bytes| RequestRefused::Misaligned { offset_sectors, len_bytes, block_bytes: 4096 };
        assert_eq!(geometry.check_request(4, 4096), Err(misaligned(4, 4096)));
        assert_eq!(geometry.check_request(0, 512), Err(misaligned(0, 512)));
        // Misaligned and past the end: misaligned (the kernel checks alignment first).
        assert_eq!(geometry.check_request(100, 100), Err(misaligned(100, 100)));
        assert_eq!(misaligned(100, 100).sectors(), 100..101, "a partial sector rounds up");
    }

    #[test]
    fn past_the_end_straddling_it_or_overflowing_is_out_of_range() {
        let geometry = Geometry::new(64, 512);
        let out =
            |offset_sectors, len_bytes| RequestRefused::OutOfRange { offset_sectors, len_bytes, device_sectors: 64 };
        assert_eq!(geometry.check_request(64, 512), Err(out(64, 512)), "one past the end");
        assert_eq!(geometry.check_request(63, 1024), Err(out(63, 1024)), "straddling the end");
        assert_eq!(geometry.check_request(u64::MAX, 512), Err(out(u64::MAX, 512)), "the sum overflows u64");
        let everything = sectors_to_bytes(u64::MAX);
        assert_eq!(geometry.check_request_sectors(0, u64::MAX), Err(out(0, everything)));
        assert_eq!(out(u64::MAX, 512).sectors(), u64::MAX..u64::MAX, "saturates");
        assert_eq!(out(1, 512).errno(), RequestRefused::ERRNO);
        assert_eq!(out(1, 512).io_kind(), io::ErrorKind::InvalidInput);
        // A device of u64::MAX sectors: its last sector is reachable, one more is not.
        let huge = Geometry::new(u64::MAX, 512);
        assert_eq!(huge.check_request(u64::MAX - 1, 512), Ok(u64::MAX - 1..u64::MAX));
        assert!(huge.check_request(u64::MAX, 512).is_err());
    }
}
