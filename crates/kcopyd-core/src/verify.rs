//! Verify: compare a source region with target regions, as an engine operation beside copy
//! and zero. It runs on the client's arbiter, in the client's page budget (the same pool as
//! the jobs), admitted by its throttle chunk by chunk, its reads through the client's I/O (timed
//! out, counted in the statistics) and narrowed on error down to logical blocks.
//!
//! ```text
//!  Client::verify(Verify) ─► checks (counts, lengths, one block fits the budget)
//!     ─► VerifyHandle (progress, cancel, wait) ;  on the client's arbiter:
//!  chunks of the range ──► up to `in_flight` at once: throttle admits the chunk; for each
//!                          device, pages from the client's pool, one read per device (all at
//!                          once, or in groups); a failed read is narrowed down to blocks
//!  in order ──────────────► compare each target with the source, block by block where they
//!                          differ; blocks unreadable on either side, or skipped, left out
//! ```
//!
//! The budget bounds everything at once: `in_flight × devices × chunk pages ≤ budget pages`,
//! so that no chunk's allocation waits behind another chunk's of the same verify.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use futures_util::StreamExt;
use futures_util::future::join_all;
use futures_util::stream;
use thiserror::Error;
use tokio::sync::oneshot;

use crate::shared::ClientShared;
use crate::{ClientConfig, PAGE_SIZE, RangeSet, ReadBuf, Region, SECTOR_SIZE, TARGETS_MAX};

/// How a comparison reads: bytes per read, devices read at once, chunks in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct VerifyShape {
    /// Bytes per read: a multiple of the block size.
    pub(crate) chunk_bytes: u64,
    /// Devices read at once for one chunk: every device when the budget holds a chunk for
    /// each, else groups of this many (the source in the first group).
    pub(crate) devices_at_once: usize,
    /// Chunks read at once.
    pub(crate) in_flight: usize,
}

impl VerifyShape {
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
    pub(crate) fn fit(
        budget_pages: usize,
        devices: usize,
        block_bytes: u64,
        chunk_bytes_max: u64,
        in_flight_max: usize,
    ) -> Result<VerifyShape, ()> {
        assert!(devices > 0 && block_bytes > 0 && block_bytes % SECTOR_SIZE as u64 == 0);
        let page_bytes = PAGE_SIZE as u64;
        let budget_bytes = budget_pages as u64 * page_bytes;
        if block_bytes > budget_bytes {
            return Err(());
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
        Ok(VerifyShape { chunk_bytes, devices_at_once, in_flight })
    }
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

/// A verify request: the source region and the target regions, each as long as the source.
#[derive(Debug, Clone)]
pub struct Verify {
    source: Region,
    targets: Vec<Region>,
    skip: Option<Vec<RangeSet>>,
    zero_before_read: bool,
}

impl Verify {
    /// Compares `source` with each of `targets`.
    pub fn new(source: Region, targets: Vec<Region>) -> Verify {
        Verify { source, targets, skip: None, zero_before_read: false }
    }

    /// Leaves out, per target, these sectors (relative to the region): a copy reported them
    /// as not copied, so their difference is known.
    pub fn skip(mut self, skip: Vec<RangeSet>) -> Verify {
        self.skip = Some(skip);
        self
    }

    /// The sectors left out per target, if any ([`Verify::skip`]).
    pub fn skipped(&self) -> Option<&[RangeSet]> {
        self.skip.as_deref()
    }

    /// Checks the request against `config` as [`Client::verify`](crate::Client::verify) does,
    /// without starting it: so that a copy that is to be verified can be refused before it
    /// writes.
    ///
    /// # Errors
    /// As `Client::verify`, but for a shut-down client.
    pub fn check(&self, config: &ClientConfig) -> Result<(), VerifyError> {
        shape_of(self, config).map(|_| ())
    }

    /// Zeroes each buffer before reading into it: for devices that fill only part of each
    /// sector (headers-only simulated disks), so that what a read leaves untouched is the
    /// same on both sides instead of whatever the pages held before.
    pub fn zero_before_read(mut self, on: bool) -> Verify {
        self.zero_before_read = on;
        self
    }
}

/// Why a verify was refused: nothing was read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// No target, or more than [`TARGETS_MAX`].
    #[error("{count} targets: a verify compares 1 to {TARGETS_MAX}")]
    TargetCount {
        /// Targets given.
        count: usize,
    },
    /// A target region (or the skip list) is not as long as the source's.
    #[error("target {index} does not match the source region ({problem})")]
    TargetShape {
        /// The target.
        index: usize,
        /// What differs.
        problem: &'static str,
    },
    /// One logical block of the devices does not fit in the page budget.
    #[error("{budget_bytes} bytes cannot hold one {block_bytes}-byte logical block")]
    BlockLargerThanBudget {
        /// The largest logical block of the devices.
        block_bytes: u64,
        /// The page budget in bytes.
        budget_bytes: u64,
    },
    /// The client is shut down, or stopped before the verify finished.
    #[error("the client is shut down")]
    ShutDown,
}

/// What a verify's handle and its run share.
#[derive(Debug, Default)]
struct Shared {
    compared_bytes: AtomicU64,
    cancelled: AtomicBool,
}

/// A verify in progress: its progress, a way to cancel it, and its result.
#[derive(Debug)]
pub struct VerifyHandle {
    shared: Arc<Shared>,
    result: oneshot::Receiver<Comparison>,
}

/// A cancellable view of a verify, cheap to clone, for whoever watches it.
#[derive(Debug, Clone)]
pub struct VerifyControl {
    shared: Arc<Shared>,
}

impl VerifyControl {
    /// Bytes compared so far (whole chunks).
    pub fn compared_bytes(&self) -> u64 {
        self.shared.compared_bytes.load(Ordering::Acquire)
    }

    /// Stops the verify after the chunks in flight: what they found is kept.
    pub fn cancel(&self) {
        self.shared.cancelled.store(true, Ordering::Release);
    }
}

impl VerifyHandle {
    /// The progress and cancel side of this verify.
    pub fn control(&self) -> VerifyControl {
        VerifyControl { shared: self.shared.clone() }
    }

    /// Waits for the result: what the comparison found (so far, if cancelled).
    ///
    /// # Errors
    /// The client stopped before the verify finished.
    pub async fn wait(self) -> Result<Comparison, VerifyError> {
        self.result.await.map_err(|_| VerifyError::ShutDown)
    }
}

/// A checked verify, sent to the client's arbiter.
#[derive(Debug)]
pub(crate) struct Started {
    verify: Verify,
    shape: VerifyShape,
    shared: Arc<Shared>,
    result: oneshot::Sender<Comparison>,
}

/// Checks `verify` against `config`: how it will read.
fn shape_of(verify: &Verify, config: &ClientConfig) -> Result<VerifyShape, VerifyError> {
    let count = verify.targets.len();
    if count == 0 || count > TARGETS_MAX {
        return Err(VerifyError::TargetCount { count });
    }
    let len_sectors = verify.source.len_sectors;
    for (index, target) in verify.targets.iter().enumerate() {
        if target.len_sectors != len_sectors {
            return Err(VerifyError::TargetShape { index, problem: "its length differs" });
        }
    }
    if let Some(index) = verify.skip.as_ref().filter(|skip| skip.len() != count).map(Vec::len) {
        return Err(VerifyError::TargetShape { index, problem: "the skip list names another number of targets" });
    }
    let devices = std::iter::once(&verify.source).chain(&verify.targets);
    let block_bytes = devices.map(|r| u64::from(r.device.geometry().logical_block_size)).max().unwrap_or(512);
    VerifyShape::fit(
        config.page_budget,
        count + 1,
        block_bytes,
        config.subjob_size_bytes as u64,
        config.subjobs_in_flight,
    )
    .map_err(|()| VerifyError::BlockLargerThanBudget {
        block_bytes,
        budget_bytes: config.page_budget as u64 * PAGE_SIZE as u64,
    })
}

/// Checks `verify` against `config` and makes its handle and what the arbiter runs.
pub(crate) fn start(verify: Verify, config: &ClientConfig) -> Result<(VerifyHandle, Started), VerifyError> {
    let shape = shape_of(&verify, config)?;
    let shared = Arc::new(Shared::default());
    let (sender, result) = oneshot::channel();
    let handle = VerifyHandle { shared: shared.clone(), result };
    Ok((handle, Started { verify, shape, shared, result: sender }))
}

/// Runs a started verify on the client's arbiter and sends its result.
pub(crate) async fn run(client: Arc<ClientShared>, started: Started) {
    let Started { verify, shape, shared, result } = started;
    let sides: Vec<&Region> = std::iter::once(&verify.source).chain(&verify.targets).collect();
    let block_sectors =
        sides.iter().map(|s| u64::from(s.device.geometry().logical_block_size)).max().unwrap_or(512) / 512;
    let chunk_sectors = shape.chunk_bytes / SECTOR_SIZE as u64;
    assert!(chunk_sectors > 0 && chunk_sectors % block_sectors == 0, "chunks are whole blocks");
    assert!(shape.devices_at_once >= 1, "at least one device is read at a time");
    let len_sectors = verify.source.len_sectors;
    let mut found = Comparison {
        block_bytes: block_sectors * SECTOR_SIZE as u64,
        source_unreadable: RangeSet::new(),
        targets: vec![TargetDiff::default(); verify.targets.len()],
    };
    let chunks =
        (0..len_sectors.div_ceil(chunk_sectors)).map(|i| i * chunk_sectors..((i + 1) * chunk_sectors).min(len_sectors));
    let reader = ChunkReader {
        sides: &sides,
        block_sectors,
        skip: verify.skip.as_deref(),
        devices_at_once: shape.devices_at_once,
        zero_before_read: verify.zero_before_read,
        client: &client,
    };
    let reader = &reader;
    let mut compared = stream::iter(chunks)
        .take_while(|_| std::future::ready(!shared.cancelled.load(Ordering::Acquire)))
        .map(|chunk| reader.compare(chunk))
        .buffered(shape.in_flight);
    while let Some(chunk) = compared.next().await {
        if shared.cancelled.load(Ordering::Acquire) {
            break;
        }
        found.source_unreadable.extend(&chunk.source_unreadable);
        for (total, part) in found.targets.iter_mut().zip(chunk.targets) {
            total.differing_blocks += part.differing_blocks;
            total.differing.extend(&part.differing);
            total.unreadable.extend(&part.unreadable);
        }
        let bytes = (chunk.sectors.end - chunk.sectors.start) * SECTOR_SIZE as u64;
        shared.compared_bytes.fetch_add(bytes, Ordering::AcqRel);
    }
    let _ = result.send(found);
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
    sides: &'a [&'a Region],
    block_sectors: u64,
    skip: Option<&'a [RangeSet]>,
    devices_at_once: usize,
    zero_before_read: bool,
    client: &'a ClientShared,
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
        let chunk_bytes = (chunk.end - chunk.start) * SECTOR_SIZE as u64;
        for (group_index, group) in self.sides.chunks(self.devices_at_once).enumerate() {
            // The throttle admits each group's reads as it admits a sub-job's.
            self.client.io.throttler.admit_subjob(chunk_bytes * group.len() as u64).await;
            let reads = join_all(group.iter().map(|side| self.read(side, chunk.clone())));
            let mut buffers = reads.await.into_iter();
            // Target `first_target + i` is the group's `i`th target.
            let first_target = if group_index == 0 {
                let (source_buf, source_bad) = buffers.next().expect("the first group holds the source");
                source_bytes = source_buf.map(|buf| buf.to_vec()).unwrap_or_default();
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
                if let (Some(buf), false) = (&buf, source_bytes.is_empty()) {
                    compare_chunk(&source_bytes, buf, chunk.start, self.block_sectors, left_out, diff);
                }
                diff.unreadable = bad;
            }
        }
        found
    }

    /// Reads `chunk` (relative sectors) of one side into pages of the client's pool, through
    /// the client's I/O; a failed read is retried in halves down to single blocks. Returns
    /// the buffer (`None` if a timed-out read kept it: the whole chunk is then unreadable) and
    /// the relative sectors that stayed unreadable.
    async fn read(&self, side: &Region, chunk: Range<u64>) -> (Option<ReadBuf>, RangeSet) {
        let len_bytes = (chunk.end - chunk.start) as usize * SECTOR_SIZE;
        let pages = self.client.pool.alloc(len_bytes.div_ceil(PAGE_SIZE)).await;
        let mut buf = ReadBuf::new(pages, len_bytes);
        if self.zero_before_read {
            buf.fill(0);
        }
        let on_device = side.start_sector + chunk.start..side.start_sector + chunk.end;
        let io = &self.client.io;
        let read = |start: u64, buf: ReadBuf| io.read(&side.device, start, buf);
        let (buf, unreadable) = crate::run::narrow(on_device, self.block_sectors, buf, false, read).await;
        let unreadable =
            unreadable.shifted(side.start_sector, 0).expect("unreadable sectors lie inside the range read");
        (buf, unreadable)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_fit_the_budget() {
        let all = |chunk_bytes, in_flight, devices_at_once| VerifyShape { chunk_bytes, devices_at_once, in_flight };
        assert_eq!(VerifyShape::fit(16384, 2, 512, 2 << 20, 32), Ok(all(2 << 20, 16, 2)));
        // 129 devices in 64 MiB: 508 KiB chunks (a whole number of 4 KiB blocks), one at a time.
        let many = VerifyShape::fit(16384, 129, 4096, 2 << 20, 32).unwrap();
        assert_eq!(many, all(127 * 4096, 1, 129));
        assert!(VerifyShape::fit(1, 2, 8192, 2 << 20, 32).is_err(), "a block larger than the budget");
        assert_eq!(VerifyShape::fit(2, 2, 4096, 2 << 20, 32), Ok(all(4096, 1, 2)));
        // The default 16 MiB, 1 MiB chunks and 17 devices: rounding bytes down to sectors but
        // pages up once refused this.
        assert_eq!(VerifyShape::fit(4096, 17, 512, 1 << 20, 4), Ok(all(240 * 4096, 1, 17)));
        // Fewer pages than devices: one block per read, in groups.
        assert_eq!(VerifyShape::fit(16, 129, 4096, 1 << 20, 4), Ok(all(4096, 1, 16)));
        assert_eq!(VerifyShape::fit(1, 3, 512, 1 << 20, 4), Ok(all(4096, 1, 1)));
        // A sub-job smaller than a block reads whole blocks.
        assert_eq!(VerifyShape::fit(64, 2, 4096, 512, 4), Ok(all(4096, 4, 2)));
    }

    #[test]
    fn every_budget_and_device_count_fits() {
        for budget_pages in [1, 2, 3, 16, 17, 255, 4096] {
            for devices in [1, 2, 3, 16, 17, 64, 129] {
                for block_bytes in [512, 4096] {
                    for chunk_bytes_max in [512, 4096, 65536, 1 << 20] {
                        let Ok(shape) = VerifyShape::fit(budget_pages, devices, block_bytes, chunk_bytes_max, 8) else {
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
}
