//! Comparing a range of a source with targets, through the
//! [`BlockDevice`](kcopyd_core::BlockDevice) trait.
//!
//! ```text
//!  chunks of the range ──► up to `in_flight` at once: for each device, pages from the pool,
//!                          one read per device (all devices at once); a failed read is
//!                          narrowed in halves down to logical blocks
//!  in order ──────────────► compare each target with the source, block by block where they
//!                          differ; blocks that could not be read on either side, or that a
//!                          copy reported as not copied, are left out
//! ```
//!
//! The budget bounds everything at once: `in_flight × devices × chunk pages ≤ pool pages`,
//! so that no allocation ever waits behind another chunk's.

use std::io;
use std::ops::Range;

use futures_util::StreamExt;
use futures_util::future::join_all;
use futures_util::stream;
use kcopyd_core::{Device, PAGE_SIZE, PagePool, RangeSet, ReadBuf, SECTOR_SIZE};

/// How a comparison reads: bytes per read and reads in flight per device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompareShape {
    /// Bytes per read: a multiple of the block size.
    pub chunk_bytes: u64,
    /// Chunks read at once.
    pub in_flight: usize,
}

impl CompareShape {
    /// The largest chunks (up to `chunk_bytes_max`) and the most of them in flight (up to
    /// `in_flight_max`) that fit in `budget_pages` for `devices` devices.
    ///
    /// Worked example: 64 MiB (16384 pages), 2 MiB chunks, 2 devices: 512 pages a chunk and
    /// device, 1024 a chunk, so 16 chunks in flight.
    ///
    /// # Errors
    /// Not even one block per device fits in the budget.
    pub fn fit(
        budget_pages: usize,
        devices: usize,
        block_bytes: u64,
        chunk_bytes_max: u64,
        in_flight_max: usize,
    ) -> Result<CompareShape, String> {
        let budget_bytes = budget_pages as u64 * PAGE_SIZE as u64;
        let per_device_bytes = budget_bytes / devices as u64;
        let chunk_bytes = chunk_bytes_max.min(per_device_bytes) / block_bytes * block_bytes;
        let chunk_pages = usize::try_from(chunk_bytes.div_ceil(PAGE_SIZE as u64)).unwrap_or(usize::MAX);
        if chunk_bytes == 0 || chunk_pages.saturating_mul(devices) > budget_pages {
            return Err(format!(
                "{budget_bytes} bytes cannot hold one {block_bytes}-byte block for each of {devices} devices"
            ));
        }
        let in_flight = (budget_pages / (chunk_pages * devices)).clamp(1, in_flight_max.max(1));
        Ok(CompareShape { chunk_bytes, in_flight })
    }
}

/// One side of a comparison: a device and the first sector of the range on it.
#[derive(Debug, Clone)]
pub struct Side {
    /// The device.
    pub device: Device,
    /// The first sector of the range.
    pub start_sector: u64,
    /// Zero each buffer before reading into it: for devices that fill only part of each
    /// sector (headers-only simulated disks), so that what a read leaves untouched is the
    /// same on both sides instead of whatever the pages held before.
    pub zero_before_read: bool,
}

/// What a comparison found for one target. Sectors are relative to the range.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TargetDiff {
    /// Blocks that differ from the source.
    pub differing_blocks: u64,
    /// The sectors of those blocks.
    pub differing: RangeSet,
    /// Sectors of the target that could not be read.
    pub unreadable: RangeSet,
}

impl TargetDiff {
    /// Whether the target matched the source wherever both could be read and were compared.
    pub fn identical(&self) -> bool {
        self.differing_blocks == 0 && self.unreadable.is_empty()
    }

    /// The first differing sector, relative to the range.
    pub fn first_differing_sector(&self) -> Option<u64> {
        self.differing.ranges().first().map(|r| r.start)
    }
}

/// What a comparison found. Sectors are relative to the range.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Comparison {
    /// The comparison unit: the largest logical block of the devices.
    pub block_bytes: u64,
    /// Sectors of the source that could not be read.
    pub source_unreadable: RangeSet,
    /// One entry per target.
    pub targets: Vec<TargetDiff>,
}

impl Comparison {
    /// Whether every target matched and every sector could be read.
    pub fn identical(&self) -> bool {
        self.source_unreadable.is_empty() && self.targets.iter().all(TargetDiff::identical)
    }
}

/// Compares `len_sectors` of `source` with each target. `skip[i]` (relative sectors) are
/// left out for target `i`; `progress` is told the bytes of each chunk compared.
pub async fn compare(
    source: &Side,
    targets: &[Side],
    len_sectors: u64,
    skip: Option<&[RangeSet]>,
    shape: CompareShape,
    pool: &PagePool,
    progress: &dyn Fn(u64),
) -> Comparison {
    let sides: Vec<&Side> = std::iter::once(source).chain(targets).collect();
    let block_sectors =
        sides.iter().map(|s| u64::from(s.device.geometry().logical_block_size)).max().unwrap_or(512) / 512;
    let chunk_sectors = shape.chunk_bytes / SECTOR_SIZE as u64;
    assert!(chunk_sectors > 0 && chunk_sectors % block_sectors == 0, "chunks are whole blocks");
    let mut found = Comparison {
        block_bytes: block_sectors * SECTOR_SIZE as u64,
        source_unreadable: RangeSet::new(),
        targets: vec![TargetDiff::default(); targets.len()],
    };
    let chunks =
        (0..len_sectors.div_ceil(chunk_sectors)).map(|i| i * chunk_sectors..((i + 1) * chunk_sectors).min(len_sectors));
    let sides = &sides;
    let mut reads = stream::iter(chunks)
        .map(|chunk| async move {
            let reads =
                join_all(sides.iter().map(|side| read_narrowed(side, chunk.clone(), block_sectors, pool))).await;
            (chunk, reads)
        })
        .buffered(shape.in_flight);
    while let Some((chunk, mut buffers)) = reads.next().await {
        let (source_buf, source_bad) = buffers.remove(0);
        let source_bytes = source_buf.to_vec();
        drop(source_buf);
        found.source_unreadable.extend(&source_bad);
        for (index, (buf, bad)) in buffers.into_iter().enumerate() {
            let diff = &mut found.targets[index];
            diff.unreadable.extend(&bad);
            let left_out = |sectors: &Range<u64>| {
                source_bad.intersects(sectors)
                    || bad.intersects(sectors)
                    || skip.is_some_and(|skip| skip[index].intersects(sectors))
            };
            compare_chunk(&source_bytes, &buf, chunk.start, block_sectors, left_out, diff);
        }
        progress((chunk.end - chunk.start) * SECTOR_SIZE as u64);
    }
    found
}

/// Compares one chunk of one target with the source's bytes, segment by segment, and looks at
/// single blocks only where a segment differs.
fn compare_chunk(
    source: &[u8],
    target: &ReadBuf,
    chunk_start: u64,
    block_sectors: u64,
    left_out: impl Fn(&Range<u64>) -> bool,
    diff: &mut TargetDiff,
) {
    let block_bytes = (block_sectors as usize) * SECTOR_SIZE;
    let mut at = 0;
    let mut last_block = None;
    for segment in target.segments() {
        let expected = &source[at..at + segment.len()];
        if segment != expected {
            let mut offset = 0;
            while offset < segment.len() {
                let block = (at + offset) / block_bytes;
                let end = ((block + 1) * block_bytes - at).min(segment.len());
                if last_block != Some(block) && segment[offset..end] != expected[offset..end] {
                    let start_sector = chunk_start + (block * block_bytes / SECTOR_SIZE) as u64;
                    let sectors = start_sector..start_sector + block_sectors;
                    if !left_out(&sectors) {
                        last_block = Some(block);
                        diff.differing_blocks += 1;
                        diff.differing.insert(sectors);
                    }
                }
                offset = end;
            }
        }
        at += segment.len();
    }
}

/// Reads `chunk` (relative sectors) of one side into fresh pages. A failed read is retried in
/// halves down to single blocks; returns the buffer and the relative sectors that stayed
/// unreadable.
async fn read_narrowed(side: &Side, chunk: Range<u64>, block_sectors: u64, pool: &PagePool) -> (ReadBuf, RangeSet) {
    let len_bytes = (chunk.end - chunk.start) as usize * SECTOR_SIZE;
    let pages = pool.alloc(len_bytes.div_ceil(PAGE_SIZE)).await;
    let mut buf = ReadBuf::new(pages, len_bytes);
    if side.zero_before_read {
        buf.fill(0);
    }
    let mut unreadable = RangeSet::new();
    let mut pending = vec![chunk.clone()];
    while let Some(piece) = pending.pop() {
        let window =
            (piece.start - chunk.start) as usize * SECTOR_SIZE..(piece.end - chunk.start) as usize * SECTOR_SIZE;
        buf.set_window(window);
        let result: io::Result<()>;
        (buf, result) = side.device.read(side.start_sector + piece.start, buf).await;
        if result.is_ok() {
            continue;
        }
        let blocks = (piece.end - piece.start) / block_sectors;
        if blocks <= 1 {
            unreadable.insert(piece);
            continue;
        }
        let middle = piece.start + blocks / 2 * block_sectors;
        pending.push(middle..piece.end);
        pending.push(piece.start..middle);
    }
    buf.reset_window();
    (buf, unreadable)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use kcopyd_sim::MemDisk;

    use super::*;

    fn run<F: std::future::Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(future)
    }

    #[test]
    fn shapes_fit_the_budget() {
        assert_eq!(
            CompareShape::fit(16384, 2, 512, 2 << 20, 32),
            Ok(CompareShape { chunk_bytes: 2 << 20, in_flight: 16 })
        );
        // 129 devices in 64 MiB: 508 KiB chunks (a whole number of 4 KiB blocks), one at a time.
        let many = CompareShape::fit(16384, 129, 4096, 2 << 20, 32).unwrap();
        assert_eq!(many.chunk_bytes, 127 * 4096);
        assert!(many.in_flight * 129 * 127 <= 16384);
        assert!(CompareShape::fit(1, 2, 4096, 2 << 20, 32).is_err());
        assert_eq!(CompareShape::fit(2, 2, 4096, 2 << 20, 32), Ok(CompareShape { chunk_bytes: 4096, in_flight: 1 }));
    }

    #[test]
    fn finds_differing_blocks_and_narrows_unreadable_ones() {
        let source = Arc::new(MemDisk::with_pattern("source", 4096, 512, 1));
        let same = Arc::new(MemDisk::with_pattern("same", 4096, 512, 1));
        let changed = Arc::new(MemDisk::with_pattern("changed", 4096, 512, 1));
        changed.poke(1000, &[0; 512]);
        changed.poke(1001, &[1; 1024]); // sectors 1000..1003: three blocks
        changed.poke(4095, &[7; 512]);
        source.fail_reads(2000..2001);
        let side = |disk: &Arc<MemDisk>| Side { device: disk.clone(), start_sector: 0, zero_before_read: false };
        let pool = PagePool::new(256).unwrap();
        let shape = CompareShape { chunk_bytes: 64 * 1024, in_flight: 2 };
        let total = std::cell::Cell::new(0);
        let found = run(compare(&side(&source), &[side(&same), side(&changed)], 4096, None, shape, &pool, &|bytes| {
            total.set(total.get() + bytes)
        }));
        assert_eq!(total.get(), 4096 * 512);
        assert_eq!(found.source_unreadable, RangeSet::from_range(2000..2001));
        assert!(found.targets[0].identical());
        assert_eq!(found.targets[1].differing_blocks, 4);
        assert_eq!(found.targets[1].first_differing_sector(), Some(1000));
        assert_eq!(found.targets[1].differing.ranges(), &[1000..1003, 4095..4096]);
        assert!(!found.identical());
        assert_eq!(pool.stats().pages_in_use, 0);

        // Left out by a copy's report: no difference counted there.
        let skip = [RangeSet::new(), RangeSet::from_range(0..2048)];
        let found =
            run(compare(&side(&source), &[side(&same), side(&changed)], 4096, Some(&skip), shape, &pool, &|_| {}));
        assert_eq!(found.targets[1].differing, RangeSet::from_range(4095..4096));
    }

    #[test]
    fn counts_large_blocks_once() {
        let source = Arc::new(MemDisk::with_pattern("source", 256, 4096, 1));
        let target = Arc::new(MemDisk::with_pattern("target", 256, 4096, 1));
        target.poke(8, &[0; 4096]); // one whole 4 KiB block
        target.poke(23, &[0; 512]); // the last sector of the next block
        let side = |disk: &Arc<MemDisk>| Side { device: disk.clone(), start_sector: 0, zero_before_read: false };
        let pool = PagePool::new(64).unwrap();
        let shape = CompareShape { chunk_bytes: 32 * 1024, in_flight: 1 };
        let found = run(compare(&side(&source), &[side(&target)], 256, None, shape, &pool, &|_| {}));
        assert_eq!(found.block_bytes, 4096);
        assert_eq!(found.targets[0].differing_blocks, 2);
        assert_eq!(found.targets[0].differing, RangeSet::from_range(8..24));
    }

    #[test]
    fn headers_only_sides_compare_headers_not_what_earlier_chunks_left() {
        // Sector 0 holds different data on each side (a difference); every other sector is
        // the same pattern, of which a headers-only disk fills only the header. The second
        // chunk reads into pages that held the first one's data.
        let disk = |name: &str, data: u8| {
            let disk = MemDisk::new(kcopyd_sim::MemDiskOptions {
                name: name.into(),
                len_sectors: 16,
                sparse: true,
                headers_only: true,
                ..kcopyd_sim::MemDiskOptions::default()
            });
            disk.fill_pattern(5);
            disk.poke(0, &[data; 4096]);
            Arc::new(disk)
        };
        let (source, target) = (disk("source", 1), disk("target", 2));
        let pool = PagePool::new(2).unwrap();
        let shape = CompareShape { chunk_bytes: 4096, in_flight: 1 };
        for zero_before_read in [false, true] {
            let side = |disk: &Arc<MemDisk>| Side { device: disk.clone(), start_sector: 0, zero_before_read };
            let found = run(compare(&side(&source), &[side(&target)], 16, None, shape, &pool, &|_| {}));
            let only_the_data_differs = found.targets[0].differing == RangeSet::from_range(0..8);
            assert_eq!(only_the_data_differs, zero_before_read, "{found:?}");
        }
    }
}
