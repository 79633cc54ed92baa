//! Sparse copies: read only what the source has allocated, and write zeroes cheaply.
//!
//! ```text
//!  source   [ data 0..40 ][ hole 40..1000 .................. ][ data 1000..1016 ]
//!  allocated() ──► Allocation (job-relative, rounded out to the job's logical block)
//!  sub-jobs  [0..16][16..32][32..40][ hole 40..1000 (no pages) ][1000..1016]
//!             read, scan for zero blocks   │                     read, scan
//!             data ──► write                └─► every target: TargetZeroes
//!             zero blocks ──► TargetZeroes       Write: write-zeroes (offloaded) or zero buffer
//!                                               Deallocate: punch a hole (or write-zeroes)
//!                                               Skip: nothing (the target already reads zeroes)
//! ```
//!
//! A hole or a zero block is never just left alone on a target unless the caller said the
//! target reads as zeroes already ([`TargetZeroes::Skip`]): stale target data must not
//! survive where the source reads as zeroes.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::{Geometry, RangeSet, Region, SECTOR_SIZE, WriteBuf};

/// Most sectors one hole sub-job covers (1 GiB): holes need no pages, so they go in large
/// pieces, but a bound keeps progress moving and each write-zeroes request reasonable.
pub const HOLE_SUBJOB_SECTORS_MAX: u64 = (1 << 30) / SECTOR_SIZE as u64;

/// What to do on a target where the source reads as zeroes (a hole, or a zero block).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TargetZeroes {
    /// Write-zeroes where the target offloads it; otherwise write zeroes as data. The target
    /// keeps its storage allocated.
    #[default]
    Write,
    /// Release the target's storage where it can ([`BlockDevice::deallocate`], a hole punched
    /// in a file), else as `Write`: a sparse target.
    ///
    /// [`BlockDevice::deallocate`]: crate::BlockDevice::deallocate
    Deallocate,
    /// Write nothing: the caller knows every target already reads as zeroes (a new file, a
    /// fresh thin volume). Wrong if it does not. A zoned target is written as with `Write`
    /// all the same: a skipped range would leave its write pointer behind, and every later
    /// write of the zone would fail.
    Skip,
}

/// How a copy treats zeroes. [`Sparse::OFF`] (the default) reads and writes every sector.
///
/// ```
/// # use kcopyd_core::{Sparse, TargetZeroes};
/// // As `qemu-img convert`: skip holes, detect 4 KiB zero blocks, punch holes in targets.
/// let sparse = Sparse { skip_holes: true, zero_block_bytes: 4096, target_zeroes: TargetZeroes::Deallocate };
/// assert!(sparse.is_on());
/// assert!(!Sparse::OFF.is_on());
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Sparse {
    /// Ask the source which ranges are allocated ([`BlockDevice::allocated`]) and read only
    /// those; holes are written to the targets as `target_zeroes` says.
    ///
    /// [`BlockDevice::allocated`]: crate::BlockDevice::allocated
    pub skip_holes: bool,
    /// Scan what was read for blocks of this many bytes that are all zeroes, and write them as
    /// `target_zeroes` says, where that is cheap for the target. 0 turns the scan off;
    /// otherwise a power of two of at least 512 (a block smaller than the job's logical block
    /// scans whole logical blocks).
    pub zero_block_bytes: u32,
    /// What targets get where the source reads as zeroes.
    pub target_zeroes: TargetZeroes,
}

impl Sparse {
    /// Every sector read and written: a plain copy.
    pub const OFF: Sparse = Sparse { skip_holes: false, zero_block_bytes: 0, target_zeroes: TargetZeroes::Write };

    /// Whether the copy treats zeroes specially at all.
    pub fn is_on(&self) -> bool {
        self.skip_holes || self.zero_block_bytes != 0
    }

    /// Whether `zero_block_bytes` is acceptable.
    pub(crate) fn zero_block_is_valid(&self) -> bool {
        self.zero_block_bytes == 0
            || (self.zero_block_bytes.is_power_of_two() && self.zero_block_bytes as usize >= SECTOR_SIZE)
    }

    /// The zero-scan block in sectors for a job of `block_sectors` logical blocks; `None` if off.
    pub(crate) fn zero_block_sectors(&self, block_sectors: u64) -> Option<u64> {
        (self.zero_block_bytes != 0).then(|| (u64::from(self.zero_block_bytes) / SECTOR_SIZE as u64).max(block_sectors))
    }

    /// Whether writing zeroes to a target of `geometry` costs no data transfer: then zero
    /// blocks found in read data are written as zeroes instead of as the data.
    pub(crate) fn zeroes_are_cheap(&self, geometry: &Geometry, deallocates: bool) -> bool {
        match self.target_zeroes {
            // A zoned target is written all the same (see `TargetZeroes::Skip`).
            TargetZeroes::Skip => !geometry.zoned || geometry.write_zeroes,
            TargetZeroes::Deallocate => deallocates || geometry.write_zeroes,
            TargetZeroes::Write => geometry.write_zeroes,
        }
    }
}

/// The source's allocated sectors, job-relative, rounded out to the job's logical block.
#[derive(Debug, Clone)]
pub(crate) struct Allocation {
    allocated: RangeSet,
}

/// The next sub-job of a sparse copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SparseSubjob {
    /// Job-relative sectors.
    pub(crate) sectors: Range<u64>,
    /// A hole of the source: nothing to read.
    pub(crate) hole: bool,
}

impl Allocation {
    /// Asks `source` which of its `len_sectors` are allocated. A device that fails to say is
    /// taken as fully allocated (slower, never wrong).
    pub(crate) async fn query(source: &Region, len_sectors: u64, block_sectors: u64) -> Allocation {
        let allocated = match source.device.allocated(source.start_sector, len_sectors).await {
            Ok(set) => set,
            Err(error) => {
                tracing::debug!(device = source.device.name(), %error, "allocation unknown: reading everything");
                RangeSet::from_range(source.start_sector..source.start_sector + len_sectors)
            }
        };
        Allocation::from_device_ranges(&allocated, source.start_sector, len_sectors, block_sectors)
    }

    /// Clips device ranges to the job, makes them job-relative and rounds them out to whole
    /// blocks: with 8-sector blocks, data at 10..12 becomes 8..16.
    pub(crate) fn from_device_ranges(
        allocated: &RangeSet,
        start_sector: u64,
        len_sectors: u64,
        block_sectors: u64,
    ) -> Allocation {
        let mut set = RangeSet::new();
        for range in allocated.ranges() {
            let start = range.start.max(start_sector) - start_sector;
            let end = range.end.min(start_sector + len_sectors).saturating_sub(start_sector);
            if start < end {
                let start = start / block_sectors * block_sectors;
                let end = end.div_ceil(block_sectors).saturating_mul(block_sectors).min(len_sectors);
                set.insert(start..end);
            }
        }
        Allocation { allocated: set }
    }

    /// The sub-job starting at `cursor` (< `len_sectors`): data up to `subjob_sectors` within an
    /// allocated range, or a hole up to `hole_sectors_max`.
    pub(crate) fn next(
        &self,
        cursor: u64,
        len_sectors: u64,
        subjob_sectors: u64,
        hole_sectors_max: u64,
    ) -> SparseSubjob {
        assert!(cursor < len_sectors);
        let ranges = self.allocated.ranges();
        let index = ranges.partition_point(|range| range.end <= cursor);
        match ranges.get(index) {
            Some(range) if range.start <= cursor => {
                SparseSubjob { sectors: cursor..range.end.min(cursor.saturating_add(subjob_sectors)), hole: false }
            }
            next => {
                let hole_end = next.map_or(len_sectors, |range| range.start);
                SparseSubjob { sectors: cursor..hole_end.min(cursor.saturating_add(hole_sectors_max)), hole: true }
            }
        }
    }
}

/// Whether `bytes` are all zero (vectorises: no early exit inside a 64-byte stride).
fn all_zero(bytes: &[u8]) -> bool {
    let mut strides = bytes.chunks_exact(64);
    strides.all(|stride| stride.iter().fold(0u8, |acc, &b| acc | b) == 0) && strides.remainder().iter().all(|&b| b == 0)
}

/// The job-relative sectors of `data` (the sub-job at job-relative `subjob_start`) that are
/// whole blocks of `zero_block_sectors` of zeroes, blocks counted from `subjob_start` (the
/// last one may be shorter).
///
/// ```text
///  data:  [ 0000 | ab00 | 0000 | 0000 ]   4 blocks from sector 100, 8 sectors each
///  zero:  100..108, 116..132
/// ```
pub(crate) fn zero_blocks(data: &WriteBuf, subjob_start: u64, zero_block_sectors: u64) -> RangeSet {
    let block_bytes = zero_block_sectors as usize * SECTOR_SIZE;
    let mut zero = RangeSet::new();
    // Walk blocks across the buffer's segments, a block zero while all its pieces are.
    let mut block_start = 0usize;
    let mut block_zero = true;
    let mut at = 0usize;
    let mut close = |block_start: usize, end: usize, block_zero: bool| {
        if block_zero && end > block_start {
            let sector = |bytes: usize| subjob_start + (bytes / SECTOR_SIZE) as u64;
            zero.insert(sector(block_start)..sector(end));
        }
    };
    for segment in data.segments() {
        let mut offset = 0;
        while offset < segment.len() {
            let block_end = block_start + block_bytes;
            let take = (block_end - (at + offset)).min(segment.len() - offset);
            if block_zero {
                block_zero = all_zero(&segment[offset..offset + take]);
            }
            offset += take;
            if at + offset == block_end {
                close(block_start, block_end, block_zero);
                block_start = block_end;
                block_zero = true;
            }
        }
        at += segment.len();
    }
    close(block_start, at, block_zero);
    zero
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    #[test]
    fn zero_blocks_span_segments_and_a_short_last_block() {
        // 3 blocks of 1024 bytes plus 512: segments split blocks unevenly.
        let mut bytes = vec![0u8; 3584];
        bytes[1500] = 7; // block 1 (1024..2048) is data
        let segments = vec![
            Bytes::copy_from_slice(&bytes[..700]),
            Bytes::copy_from_slice(&bytes[700..2100]),
            Bytes::copy_from_slice(&bytes[2100..]),
        ];
        let zero = zero_blocks(&WriteBuf::from_segments(segments), 100, 2);
        assert_eq!(zero.ranges(), &[100..102, 104..107]);
        bytes[3583] = 1; // the short last block is data now
        let zero = zero_blocks(&WriteBuf::from_bytes(Bytes::from(bytes)), 100, 2);
        assert_eq!(zero.ranges(), &[100..102, 104..106]);
    }

    #[test]
    fn all_zero_checks_the_remainder() {
        let mut bytes = vec![0u8; 130];
        assert!(all_zero(&bytes));
        bytes[129] = 1;
        assert!(!all_zero(&bytes));
        bytes[129] = 0;
        bytes[3] = 1;
        assert!(!all_zero(&bytes));
    }

    #[test]
    fn allocation_is_clipped_rounded_out_and_walked() {
        let mut device = RangeSet::new();
        device.insert(90..95); // before the job: clipped to 100
        device.insert(102..103);
        device.insert(150..400); // past the job's end (100 + 200): clipped
        let allocation = Allocation::from_device_ranges(&device, 100, 200, 8);
        assert_eq!(allocation.allocated.ranges(), &[0..8, 48..200]);
        let walk = |cursor| allocation.next(cursor, 200, 64, 30);
        assert_eq!(walk(0), SparseSubjob { sectors: 0..8, hole: false });
        assert_eq!(walk(8), SparseSubjob { sectors: 8..38, hole: true }, "a hole stops at its maximum");
        assert_eq!(walk(38), SparseSubjob { sectors: 38..48, hole: true });
        assert_eq!(walk(48), SparseSubjob { sectors: 48..112, hole: false });
        assert_eq!(walk(176), SparseSubjob { sectors: 176..200, hole: false });
        let empty = Allocation::from_device_ranges(&RangeSet::new(), 0, 100, 1);
        assert_eq!(empty.next(0, 100, 8, 1000), SparseSubjob { sectors: 0..100, hole: true });
    }

    #[test]
    fn subjobs_at_the_end_of_the_address_space_do_not_overflow() {
        let len = u64::MAX;
        let mut device = RangeSet::new();
        device.insert(len - 10..len);
        let allocation = Allocation::from_device_ranges(&device, 0, len, 1);
        assert_eq!(
            allocation.next(len - 30, len, 64, 1 << 21),
            SparseSubjob { sectors: len - 30..len - 10, hole: true }
        );
        assert_eq!(allocation.next(len - 10, len, 64, 1 << 21), SparseSubjob { sectors: len - 10..len, hole: false });
        assert_eq!(
            allocation.next(len - 3, len, u64::MAX, 1 << 21),
            SparseSubjob { sectors: len - 3..len, hole: false }
        );
    }

    #[test]
    fn zero_block_sizes() {
        let sparse = |bytes| Sparse { zero_block_bytes: bytes, ..Sparse::OFF };
        assert!(sparse(0).zero_block_is_valid() && sparse(512).zero_block_is_valid());
        assert!(!sparse(256).zero_block_is_valid() && !sparse(3000).zero_block_is_valid());
        assert_eq!(sparse(4096).zero_block_sectors(1), Some(8));
        assert_eq!(sparse(512).zero_block_sectors(8), Some(8), "at least one logical block");
        assert_eq!(sparse(0).zero_block_sectors(8), None);
    }
}
