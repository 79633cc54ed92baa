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

use std::ops::Range;

use futures_util::StreamExt;
use futures_util::future::join_all;
use futures_util::stream;
use kcopyd_core::{Device, PAGE_SIZE, PagePool, RangeSet, ReadBuf, SECTOR_SIZE, read_narrowed};

use crate::cancel::Cancel;

/// How a comparison reads: bytes per read, devices read at once, chunks in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompareShape {
    /// Bytes per read: a multiple of the block size.
    pub chunk_bytes: u64,
    /// Devices read at once for one chunk: every device when the budget holds a chunk for
    /// each, else groups of this many (the source in the first group).
    pub devices_at_once: usize,
    /// Chunks read at once.
    pub in_flight: usize,
}

impl CompareShape {
    /// The largest chunks (up to `chunk_bytes_max`, at least one block) and the most of them in
    /// flight (up to `in_flight_max`) that fit in `budget_pages` for `devices` devices, so that
    /// `in_flight × devices_at_once × chunk pages ≤ budget_pages`: no read ever waits for pages.
    ///
    /// Worked examples: 64 MiB (16384 pages), 2 MiB chunks, 2 devices: 512 pages a chunk and
    /// device, 1024 a chunk, so 16 chunks in flight. 16 MiB (4096 pages), 1 MiB chunks, 17
    /// devices: 240 whole pages a device, so 960 KiB chunks (a multiple of 512), 4080 pages, one
    /// chunk in flight. 64 KiB (16 pages) and 129 devices of 4 KiB blocks: not one page a
    /// device, so 4 KiB chunks read 16 devices at a time.
    ///
    /// # Errors
    /// One logical block does not fit in the budget (the engine refuses such a copy too).
    pub fn fit(
        budget_pages: usize,
        devices: usize,
        block_bytes: u64,
        chunk_bytes_max: u64,
        in_flight_max: usize,
    ) -> Result<CompareShape, String> {
        assert!(devices > 0 && block_bytes > 0 && block_bytes % SECTOR_SIZE as u64 == 0);
        let page_bytes = PAGE_SIZE as u64;
        let budget_bytes = budget_pages as u64 * page_bytes;
        if block_bytes > budget_bytes {
            return Err(format!("{budget_bytes} bytes cannot hold one {block_bytes}-byte logical block"));
        }
        // Whole pages per device: a read of `n` bytes takes `ceil(n / 4096)` pages.
        let per_device_bytes = (budget_pages / devices) as u64 * page_bytes;
        let all_at_once = per_device_bytes >= block_bytes;
        let room_bytes = if all_at_once { per_device_bytes } else { block_bytes.next_multiple_of(page_bytes) };
        let chunk_bytes = (chunk_bytes_max.min(room_bytes) / block_bytes * block_bytes).max(block_bytes);
        let chunk_pages = usize::try_from(chunk_bytes.div_ceil(page_bytes)).expect("a chunk fits in the budget");
        let devices_at_once = if all_at_once { devices } else { (budget_pages / chunk_pages).min(devices) };
        let in_flight = (budget_pages / (chunk_pages * devices_at_once)).clamp(1, in_flight_max.max(1));
        assert!(devices_at_once >= 1 && in_flight * devices_at_once * chunk_pages <= budget_pages);
        Ok(CompareShape { chunk_bytes, devices_at_once, in_flight })
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
/// left out for target `i`; `progress` is told the bytes of each chunk compared. Once `stop`
/// is cancelled no chunk is added, and what the chunks compared so far found is returned: the
/// bytes `progress` was told are those compared.
#[allow(clippy::too_many_arguments)]
pub async fn compare(
    source: &Side,
    targets: &[Side],
    len_sectors: u64,
    skip: Option<&[RangeSet]>,
    shape: CompareShape,
    pool: &PagePool,
    progress: &dyn Fn(u64),
    stop: &Cancel,
) -> Comparison {
    let sides: Vec<&Side> = std::iter::once(source).chain(targets).collect();
    let block_sectors =
        sides.iter().map(|s| u64::from(s.device.geometry().logical_block_size)).max().unwrap_or(512) / 512;
    let chunk_sectors = shape.chunk_bytes / SECTOR_SIZE as u64;
    assert!(chunk_sectors > 0 && chunk_sectors % block_sectors == 0, "chunks are whole blocks");
    assert!(shape.devices_at_once >= 1, "at least one device is read at a time");
    let mut found = Comparison {
        block_bytes: block_sectors * SECTOR_SIZE as u64,
        source_unreadable: RangeSet::new(),
        targets: vec![TargetDiff::default(); targets.len()],
    };
    let chunks =
        (0..len_sectors.div_ceil(chunk_sectors)).map(|i| i * chunk_sectors..((i + 1) * chunk_sectors).min(len_sectors));
    let reader = ChunkReader { sides: &sides, block_sectors, skip, devices_at_once: shape.devices_at_once, pool };
    let reader = &reader;
    let mut compared = stream::iter(chunks).map(|chunk| reader.compare(chunk)).buffered(shape.in_flight);
    while let Some(chunk) = compared.next().await {
        if stop.is_cancelled() {
            break;
        }
        found.source_unreadable.extend(&chunk.source_unreadable);
        for (total, part) in found.targets.iter_mut().zip(chunk.targets) {
            total.differing_blocks += part.differing_blocks;
            total.differing.extend(&part.differing);
            total.unreadable.extend(&part.unreadable);
        }
        progress((chunk.sectors.end - chunk.sectors.start) * SECTOR_SIZE as u64);
    }
    found
}

/// What one chunk's comparison found.
struct ChunkFound {
    sectors: Range<u64>,
    source_unreadable: RangeSet,
    targets: Vec<TargetDiff>,
}

/// Reads and compares one chunk at a time, in groups of `devices_at_once` devices.
struct ChunkReader<'a> {
    /// The source, then the targets.
    sides: &'a [&'a Side],
    block_sectors: u64,
    skip: Option<&'a [RangeSet]>,
    devices_at_once: usize,
    pool: &'a PagePool,
}

impl ChunkReader<'_> {
    /// Reads `chunk` (relative sectors) of every device, a group at a time (the source with
    /// the first group), and compares each target with the source. A group's pages are
    /// returned before the next group reads, so the chunk never holds more than
    /// `devices_at_once` reads' pages.
    async fn compare(&self, chunk: Range<u64>) -> ChunkFound {
        let mut found = ChunkFound {
            sectors: chunk.clone(),
            source_unreadable: RangeSet::new(),
            targets: vec![TargetDiff::default(); self.sides.len() - 1],
        };
        let mut source_bytes = Vec::new();
        for (group_index, group) in self.sides.chunks(self.devices_at_once).enumerate() {
            let reads = join_all(
                group.iter().map(|side| read_narrowed_side(side, chunk.clone(), self.block_sectors, self.pool)),
            );
            let mut buffers = reads.await.into_iter();
            // Target `first_target + i` is the group's `i`th target.
            let first_target = if group_index == 0 {
                let (source_buf, source_bad) = buffers.next().expect("the first group holds the source");
                source_bytes = source_buf.to_vec();
                found.source_unreadable = source_bad;
                0
            } else {
                group_index * self.devices_at_once - 1
            };
            for (offset, (buf, bad)) in buffers.enumerate() {
                let index = first_target + offset;
                let diff = &mut found.targets[index];
                let left_out = |sectors: &Range<u64>| {
                    found.source_unreadable.intersects(sectors)
                        || bad.intersects(sectors)
                        || self.skip.is_some_and(|skip| skip[index].intersects(sectors))
                };
                compare_chunk(&source_bytes, &buf, chunk.start, self.block_sectors, left_out, diff);
                diff.unreadable = bad;
            }
        }
        found
    }
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
/// halves down to single blocks, by the engine's own narrowing re-read
/// ([`read_narrowed`]); returns the buffer and the relative sectors that stayed unreadable.
async fn read_narrowed_side(
    side: &Side,
    chunk: Range<u64>,
    block_sectors: u64,
    pool: &PagePool,
) -> (ReadBuf, RangeSet) {
    let len_bytes = (chunk.end - chunk.start) as usize * SECTOR_SIZE;
    let pages = pool.alloc(len_bytes.div_ceil(PAGE_SIZE)).await;
    let mut buf = ReadBuf::new(pages, len_bytes);
    if side.zero_before_read {
        buf.fill(0);
    }
    let on_device = side.start_sector + chunk.start..side.start_sector + chunk.end;
    let (buf, unreadable) = read_narrowed(&side.device, on_device, block_sectors, buf).await;
    let unreadable = unreadable.shifted(side.start_sector, 0).expect("unreadable sectors lie inside the range read");
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
        let all = |chunk_bytes, in_flight, devices_at_once| CompareShape { chunk_bytes, devices_at_once, in_flight };
        assert_eq!(CompareShape::fit(16384, 2, 512, 2 << 20, 32), Ok(all(2 << 20, 16, 2)));
        // 129 devices in 64 MiB: 508 KiB chunks (a whole number of 4 KiB blocks), one at a time.
        let many = CompareShape::fit(16384, 129, 4096, 2 << 20, 32).unwrap();
        assert_eq!(many, all(127 * 4096, 1, 129));
        assert!(CompareShape::fit(1, 2, 8192, 2 << 20, 32).is_err(), "a block larger than the budget");
        assert_eq!(CompareShape::fit(2, 2, 4096, 2 << 20, 32), Ok(all(4096, 1, 2)));
        // The default 16 MiB, 1 MiB chunks and 17 devices: rounding bytes down to sectors but
        // pages up once refused this.
        assert_eq!(CompareShape::fit(4096, 17, 512, 1 << 20, 4), Ok(all(240 * 4096, 1, 17)));
        // Fewer pages than devices: one block per read, in groups.
        assert_eq!(CompareShape::fit(16, 129, 4096, 1 << 20, 4), Ok(all(4096, 1, 16)));
        assert_eq!(CompareShape::fit(1, 3, 512, 1 << 20, 4), Ok(all(4096, 1, 1)));
        // A sub-job smaller than a block reads whole blocks.
        assert_eq!(CompareShape::fit(64, 2, 4096, 512, 4), Ok(all(4096, 4, 2)));
    }

    #[test]
    fn every_budget_and_device_count_fits() {
        for budget_pages in [1, 2, 3, 16, 17, 255, 4096] {
            for devices in [1, 2, 3, 16, 17, 64, 129] {
                for block_bytes in [512, 4096] {
                    for chunk_bytes_max in [512, 4096, 65536, 1 << 20] {
                        let Ok(shape) = CompareShape::fit(budget_pages, devices, block_bytes, chunk_bytes_max, 8)
                        else {
                            assert!(block_bytes > budget_pages as u64 * 4096);
                            continue;
                        };
                        let chunk_pages = shape.chunk_bytes.div_ceil(4096) as usize;
                        assert!(shape.in_flight * shape.devices_at_once * chunk_pages <= budget_pages, "{shape:?}");
                        assert!(shape.chunk_bytes % block_bytes == 0 && shape.chunk_bytes >= block_bytes);
                    }
                }
            }
        }
    }

    #[test]
    fn devices_read_in_groups_compare_the_same() {
        let source = Arc::new(MemDisk::with_pattern("source", 1024, 512, 1));
        let targets: Vec<Arc<MemDisk>> =
            (0..5).map(|i| Arc::new(MemDisk::with_pattern(&format!("t{i}"), 1024, 512, 1))).collect();
        targets[3].poke(700, &[9; 512]);
        targets[4].fail_reads(10..11);
        source.fail_reads(20..21);
        let side = |disk: &Arc<MemDisk>| Side { device: disk.clone(), start_sector: 0, zero_before_read: false };
        let target_sides: Vec<Side> = targets.iter().map(side).collect();
        let pool = PagePool::new(2).unwrap();
        let shape = CompareShape::fit(2, 6, 512, 1 << 20, 4).unwrap();
        assert_eq!((shape.devices_at_once, shape.chunk_bytes), (2, 4096));
        let found = run(compare(&side(&source), &target_sides, 1024, None, shape, &pool, &|_| {}, &Cancel::new()));
        assert_eq!(found.source_unreadable, RangeSet::from_range(20..21));
        for (index, diff) in found.targets.iter().enumerate() {
            match index {
                3 => assert_eq!(diff.differing, RangeSet::from_range(700..701)),
                4 => assert_eq!((diff.differing_blocks, diff.unreadable.clone()), (0, RangeSet::from_range(10..11))),
                _ => assert!(diff.identical(), "target {index}: {diff:?}"),
            }
        }
        assert_eq!(pool.stats().pages_in_use, 0);
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
        let shape = CompareShape { chunk_bytes: 64 * 1024, devices_at_once: 3, in_flight: 2 };
        let total = std::cell::Cell::new(0);
        let found = run(compare(
            &side(&source),
            &[side(&same), side(&changed)],
            4096,
            None,
            shape,
            &pool,
            &|bytes| total.set(total.get() + bytes),
            &Cancel::new(),
        ));
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
        let found = run(compare(
            &side(&source),
            &[side(&same), side(&changed)],
            4096,
            Some(&skip),
            shape,
            &pool,
            &|_| {},
            &Cancel::new(),
        ));
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
        let shape = CompareShape { chunk_bytes: 32 * 1024, devices_at_once: 2, in_flight: 1 };
        let found = run(compare(&side(&source), &[side(&target)], 256, None, shape, &pool, &|_| {}, &Cancel::new()));
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
        let shape = CompareShape { chunk_bytes: 4096, devices_at_once: 2, in_flight: 1 };
        for zero_before_read in [false, true] {
            let side = |disk: &Arc<MemDisk>| Side { device: disk.clone(), start_sector: 0, zero_before_read };
            let found = run(compare(&side(&source), &[side(&target)], 16, None, shape, &pool, &|_| {}, &Cancel::new()));
            let only_the_data_differs = found.targets[0].differing == RangeSet::from_range(0..8);
            assert_eq!(only_the_data_differs, zero_before_read, "{found:?}");
        }
    }
}
