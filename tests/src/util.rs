//! Small helpers shared by the integration tests.

use std::sync::Arc;

use kcopyd_core::{Device, Region, SECTOR_SIZE};
use kcopyd_sim::MemDisk;

/// A zero-filled in-memory disk.
pub fn zeroed(name: &str, len_sectors: u64, logical_block_size: u32) -> Arc<MemDisk> {
    Arc::new(MemDisk::zeroed(name, len_sectors, logical_block_size))
}

/// An in-memory disk filled with the pattern of `seed`.
pub fn patterned(name: &str, len_sectors: u64, logical_block_size: u32, seed: u64) -> Arc<MemDisk> {
    Arc::new(MemDisk::with_pattern(name, len_sectors, logical_block_size, seed))
}

/// A region over an in-memory disk.
pub fn region(disk: &Arc<MemDisk>, start_sector: u64, len_sectors: u64) -> Region {
    Region::new(disk.clone() as Device, start_sector, len_sectors)
}

/// Asserts that `len` sectors of `target` from `target_start` equal `source` from
/// `source_start`, naming the first differing sector.
pub fn assert_same(source: &MemDisk, source_start: u64, target: &MemDisk, target_start: u64, len: u64) {
    let (a, b) = (source.snapshot(source_start, len), target.snapshot(target_start, len));
    if let Some(at) = a.iter().zip(&b).position(|(x, y)| x != y) {
        panic!(
            "sector {} of {:?} differs from sector {} of {:?}",
            target_start + (at / SECTOR_SIZE) as u64,
            target,
            source_start + (at / SECTOR_SIZE) as u64,
            source
        );
    }
}
