//! A dense in-memory disk with a fault map, zoned mode and a simple latency model.

use std::fmt;
use std::io;
use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use kcopyd_core::{BlockDevice, DeviceId, Geometry, IoFuture, RangeSet, ReadBuf, SECTOR_SIZE, WriteBuf};
use serde::{Deserialize, Serialize};

use crate::mix64;

/// The errno the kernel gives for misaligned direct I/O.
const EINVAL: i32 = 22;
/// The errno of a failed or out-of-range transfer.
const EIO: i32 = 5;

static NEXT_DISK: AtomicU64 = AtomicU64::new(1);

/// The timing of one kind of request (reads, or writes and write-zeroes). Every field
/// defaults to zero: instant completion.
///
/// A request waits for a free queue slot (`queue_depth` of them, 0 = unlimited), pays
/// `cost_us`, then moves its bytes over the device's one data path at
/// `bandwidth_bytes_per_s` (0 = unlimited) behind earlier transfers, and completes after up
/// to `jitter_us` more, drawn from the disk's seed.
///
/// Worked example: cost 100 µs, 100 MB/s, queue depth 1, no jitter: two 1 MB reads issued
/// together complete at 10.1 ms and 20.2 ms.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IoModel {
    /// Fixed cost of one request (seek, command overhead).
    pub cost_us: u64,
    /// Transfer rate of the data path; 0 means no transfer time.
    pub bandwidth_bytes_per_s: u64,
    /// Requests served at once; 0 means no limit.
    pub queue_depth: u32,
    /// Up to this much extra delay per request, drawn from the seed.
    pub jitter_us: u64,
}

impl IoModel {
    fn is_instant(&self) -> bool {
        self.cost_us == 0 && self.bandwidth_bytes_per_s == 0 && self.jitter_us == 0
    }
}

/// The timing model of a disk, in (possibly virtual) tokio time. Defaults: instant.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Latency {
    /// Reads.
    pub read: IoModel,
    /// Writes and write-zeroes.
    pub write: IoModel,
    /// Seed of the jitter.
    pub seed: u64,
}

/// The busy-until times of one direction of a disk.
#[derive(Default)]
struct Timeline {
    /// When each queue slot frees up.
    slots: Vec<Instant>,
    /// When the data path frees up.
    path_free: Option<Instant>,
}

/// How to build a [`MemDisk`]. Defaults: 512-byte blocks, no offload, not zoned, no latency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MemDiskOptions {
    /// Name used in messages.
    pub name: String,
    /// Length in 512-byte sectors; a multiple of the logical block.
    pub len_sectors: u64,
    /// Logical block size in bytes: a power of two from 512 to 65536.
    pub logical_block_size: u32,
    /// Whether write-zeroes is reported as offloaded.
    pub write_zeroes: bool,
    /// Whether writes must follow each zone's write pointer.
    pub zoned: bool,
    /// Zone length in sectors when zoned; 0 means one zone for the whole disk.
    pub zone_sectors: u64,
    /// Delay per request.
    pub latency: Latency,
}

impl Default for MemDiskOptions {
    fn default() -> MemDiskOptions {
        MemDiskOptions {
            name: "mem".into(),
            len_sectors: 0,
            logical_block_size: 512,
            write_zeroes: false,
            zoned: false,
            zone_sectors: 0,
            latency: Latency::default(),
        }
    }
}

/// Requests a [`MemDisk`] has served (including refused ones).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct IoStats {
    /// Read requests.
    pub reads: u64,
    /// Write requests.
    pub writes: u64,
    /// Write-zeroes requests.
    pub write_zeroes: u64,
    /// Flush requests.
    pub flushes: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Bytes written (write-zeroes included).
    pub written_bytes: u64,
}

/// The operation a fault hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Operation {
    /// A read.
    Read,
    /// A write.
    Write,
    /// A write-zeroes.
    WriteZeroes,
}

/// What kind of fault fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FaultKind {
    /// A read touched a latent sector error.
    LatentSectorError,
    /// A write touched a sector set to fail writes.
    WriteError,
}

/// One fault that actually fired: the oracle tests compare outcomes with.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FaultRecord {
    /// Virtual (or real) time since the disk was made, in microseconds.
    pub at_us: u64,
    /// The device's name.
    pub device: String,
    /// The operation that failed.
    pub operation: Operation,
    /// The sectors of the failed request.
    pub sectors: Range<u64>,
    /// What fired.
    pub kind: FaultKind,
}

struct State {
    faults_fired: Vec<FaultRecord>,
    data: Vec<u8>,
    bad_reads: RangeSet,
    bad_writes: RangeSet,
    /// Next sector to write in each zone (zoned disks only).
    write_pointers: Vec<u64>,
    stats: IoStats,
    jitter_draws: u64,
    reads: Timeline,
    writes: Timeline,
}

/// An in-memory block device holding its bytes densely.
pub struct MemDisk {
    options: MemDiskOptions,
    created: Instant,
    id: DeviceId,
    state: Mutex<State>,
}

impl MemDisk {
    /// A zero-filled disk.
    ///
    /// # Panics
    /// If the block size is not a power of two from 512 to 65536 or the length is not a
    /// multiple of it.
    pub fn new(options: MemDiskOptions) -> MemDisk {
        let block = options.logical_block_size;
        assert!(block.is_power_of_two() && (512..=65536).contains(&block), "logical block size {block}");
        let block_sectors = u64::from(block) / SECTOR_SIZE as u64;
        assert_eq!(options.len_sectors % block_sectors, 0, "length is a whole number of blocks");
        let zone_sectors = if options.zone_sectors == 0 { options.len_sectors.max(1) } else { options.zone_sectors };
        let zones = if options.zoned { options.len_sectors.div_ceil(zone_sectors) } else { 0 };
        let write_pointers = (0..zones).map(|zone| zone * zone_sectors).collect();
        let len_bytes = usize::try_from(options.len_sectors).expect("fits in memory") * SECTOR_SIZE;
        MemDisk {
            id: DeviceId { namespace: "mem", major: NEXT_DISK.fetch_add(1, Ordering::Relaxed), minor: 0 },
            created: Instant::now(),
            state: Mutex::new(State {
                faults_fired: Vec::new(),
                data: vec![0; len_bytes],
                bad_reads: RangeSet::new(),
                bad_writes: RangeSet::new(),
                write_pointers,
                stats: IoStats::default(),
                jitter_draws: 0,
                reads: Timeline::default(),
                writes: Timeline::default(),
            }),
            options: MemDiskOptions { zone_sectors, ..options },
        }
    }

    /// A plain disk of `len_sectors` with `logical_block_size`-byte blocks, zero-filled.
    pub fn zeroed(name: &str, len_sectors: u64, logical_block_size: u32) -> MemDisk {
        MemDisk::new(MemDiskOptions { name: name.into(), len_sectors, logical_block_size, ..MemDiskOptions::default() })
    }

    /// A plain disk whose every byte comes from `seed` (see [`MemDisk::fill_pattern`]).
    pub fn with_pattern(name: &str, len_sectors: u64, logical_block_size: u32, seed: u64) -> MemDisk {
        let disk = MemDisk::zeroed(name, len_sectors, logical_block_size);
        disk.fill_pattern(seed);
        disk
    }

    /// Overwrites the whole disk with the pattern of `seed`, eight bytes at a time.
    pub fn fill_pattern(&self, seed: u64) {
        let mut state = self.lock();
        for (index, word) in state.data.chunks_mut(8).enumerate() {
            let value = mix64(seed ^ mix64(index as u64)).to_le_bytes();
            word.copy_from_slice(&value[..word.len()]);
        }
    }

    /// The options the disk was built with.
    pub fn options(&self) -> &MemDiskOptions {
        &self.options
    }

    /// Makes reads touching `sectors` fail (a latent sector error); a successful write over
    /// a sector clears it.
    pub fn fail_reads(&self, sectors: Range<u64>) {
        self.lock().bad_reads.insert(sectors);
    }

    /// Makes writes touching `sectors` fail; nothing of a failing write lands.
    pub fn fail_writes(&self, sectors: Range<u64>) {
        self.lock().bad_writes.insert(sectors);
    }

    /// Clears every injected fault.
    pub fn heal(&self) {
        let mut state = self.lock();
        state.bad_reads = RangeSet::new();
        state.bad_writes = RangeSet::new();
    }

    /// A copy of `len_sectors` sectors from `start_sector`, bypassing faults and latency.
    pub fn snapshot(&self, start_sector: u64, len_sectors: u64) -> Vec<u8> {
        self.lock().data[byte_range(start_sector, len_sectors)].to_vec()
    }

    /// Overwrites sectors from `start_sector` with `data`, bypassing faults and latency.
    pub fn poke(&self, start_sector: u64, data: &[u8]) {
        assert_eq!(data.len() % SECTOR_SIZE, 0);
        let len_sectors = (data.len() / SECTOR_SIZE) as u64;
        self.lock().data[byte_range(start_sector, len_sectors)].copy_from_slice(data);
    }

    /// Every fault that fired so far, in order.
    pub fn fault_log(&self) -> Vec<FaultRecord> {
        self.lock().faults_fired.clone()
    }

    fn record_fault(&self, state: &mut State, operation: Operation, sectors: Range<u64>, kind: FaultKind) {
        let at_us = Instant::now().saturating_duration_since(self.created).as_micros() as u64;
        state.faults_fired.push(FaultRecord { at_us, device: self.options.name.clone(), operation, sectors, kind });
    }

    /// Requests served so far.
    pub fn stats(&self) -> IoStats {
        self.lock().stats
    }

    /// The write pointer of the zone holding `sector` (zoned disks only).
    pub fn write_pointer(&self, sector: u64) -> Option<u64> {
        let zone = (sector / self.options.zone_sectors) as usize;
        self.lock().write_pointers.get(zone).copied()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("disk lock")
    }

    /// Refuses misaligned (EINVAL) and out-of-range (EIO) requests before any transfer.
    fn check(&self, offset_sectors: u64, len_bytes: usize) -> io::Result<Range<u64>> {
        let block = u64::from(self.options.logical_block_size);
        let offset_bytes = offset_sectors.checked_mul(SECTOR_SIZE as u64);
        if offset_bytes.is_none_or(|o| o % block != 0) || len_bytes as u64 % block != 0 {
            return Err(io::Error::from_raw_os_error(EINVAL));
        }
        let len_sectors = len_bytes as u64 / SECTOR_SIZE as u64;
        match offset_sectors.checked_add(len_sectors) {
            Some(end) if end <= self.options.len_sectors => Ok(offset_sectors..end),
            _ => Err(io::Error::from_raw_os_error(EIO)),
        }
    }

    /// Checks the zone rules for a write of `sectors` and advances the write pointer.
    fn advance_write_pointer(&self, state: &mut State, sectors: &Range<u64>) -> io::Result<()> {
        if !self.options.zoned {
            return Ok(());
        }
        let zone = (sectors.start / self.options.zone_sectors) as usize;
        let zone_end = (zone as u64 + 1) * self.options.zone_sectors;
        if state.write_pointers[zone] != sectors.start || sectors.end > zone_end {
            // An unaligned write to a sequential zone, as the kernel reports it.
            return Err(io::Error::from_raw_os_error(EIO));
        }
        state.write_pointers[zone] = sectors.end;
        Ok(())
    }

    /// When a request of `len_bytes` issued now completes, or `None` for an instant disk.
    fn schedule(&self, write: bool, len_bytes: usize) -> Option<Instant> {
        let latency = &self.options.latency;
        let model = if write { latency.write } else { latency.read };
        if model.is_instant() {
            return None;
        }
        let now = Instant::now();
        let mut state = self.lock();
        let jitter_us = if model.jitter_us == 0 {
            0
        } else {
            state.jitter_draws += 1;
            mix64(latency.seed ^ mix64(state.jitter_draws)) % (model.jitter_us + 1)
        };
        let timeline = if write { &mut state.writes } else { &mut state.reads };
        let slot = if model.queue_depth == 0 {
            None
        } else {
            if timeline.slots.is_empty() {
                timeline.slots = vec![now; model.queue_depth as usize];
            }
            // The slot that frees first; ties go to the lowest index, for determinism.
            let (index, _) = timeline.slots.iter().enumerate().min_by_key(|&(i, t)| (*t, i)).expect("depth >= 1");
            Some(index)
        };
        let start = slot.map_or(now, |i| timeline.slots[i].max(now));
        let transfer_start = start + Duration::from_micros(model.cost_us);
        let transfer_end = if model.bandwidth_bytes_per_s == 0 {
            transfer_start
        } else {
            let transfer = Duration::from_nanos(
                (len_bytes as u128 * 1_000_000_000 / u128::from(model.bandwidth_bytes_per_s)) as u64,
            );
            let begin = timeline.path_free.map_or(transfer_start, |free| free.max(transfer_start));
            timeline.path_free = Some(begin + transfer);
            begin + transfer
        };
        let done = transfer_end + Duration::from_micros(jitter_us);
        if let Some(i) = slot {
            timeline.slots[i] = done;
        }
        Some(done)
    }

    fn do_read(&self, offset_sectors: u64, buf: &mut ReadBuf) -> io::Result<()> {
        let sectors = self.check(offset_sectors, buf.len());
        let mut state = self.lock();
        state.stats.reads += 1;
        let result = sectors.and_then(|sectors| {
            if state.bad_reads.intersects(&sectors) {
                self.record_fault(&mut state, Operation::Read, sectors, FaultKind::LatentSectorError);
                return Err(io::Error::from_raw_os_error(EIO));
            }
            let mut at = sectors.start as usize * SECTOR_SIZE;
            for segment in buf.segments_mut() {
                segment.copy_from_slice(&state.data[at..at + segment.len()]);
                at += segment.len();
            }
            Ok(())
        });
        match &result {
            Ok(()) => state.stats.read_bytes += buf.len() as u64,
            Err(_) => state.stats.errors += 1,
        }
        result
    }

    fn do_write(&self, offset_sectors: u64, data: Option<&WriteBuf>, len_bytes: usize) -> io::Result<()> {
        let sectors = self.check(offset_sectors, len_bytes);
        let mut state = self.lock();
        match data {
            Some(_) => state.stats.writes += 1,
            None => state.stats.write_zeroes += 1,
        }
        let result = sectors.and_then(|sectors| {
            if state.bad_writes.intersects(&sectors) {
                let operation = if data.is_some() { Operation::Write } else { Operation::WriteZeroes };
                self.record_fault(&mut state, operation, sectors, FaultKind::WriteError);
                return Err(io::Error::from_raw_os_error(EIO));
            }
            self.advance_write_pointer(&mut state, &sectors)?;
            let start = sectors.start as usize * SECTOR_SIZE;
            let target = &mut state.data[start..start + len_bytes];
            match data {
                Some(data) => data.copy_to_slice(target),
                None => target.fill(0),
            }
            // A successful write repairs latent errors under it.
            state.bad_reads = state.bad_reads.difference(&RangeSet::from_range(sectors));
            Ok(())
        });
        match &result {
            Ok(()) => state.stats.written_bytes += len_bytes as u64,
            Err(_) => state.stats.errors += 1,
        }
        result
    }
}

fn byte_range(start_sector: u64, len_sectors: u64) -> Range<usize> {
    start_sector as usize * SECTOR_SIZE..(start_sector + len_sectors) as usize * SECTOR_SIZE
}

impl BlockDevice for MemDisk {
    fn name(&self) -> &str {
        &self.options.name
    }

    fn id(&self) -> DeviceId {
        self.id
    }

    fn geometry(&self) -> Geometry {
        Geometry {
            len_sectors: self.options.len_sectors,
            logical_block_size: self.options.logical_block_size,
            write_zeroes: self.options.write_zeroes,
            zoned: self.options.zoned,
        }
    }

    fn read(&self, offset_sectors: u64, mut buf: ReadBuf) -> IoFuture<'_, (ReadBuf, io::Result<()>)> {
        let done = self.schedule(false, buf.len());
        Box::pin(async move {
            if let Some(done) = done {
                tokio::time::sleep_until(done).await;
            }
            let result = self.do_read(offset_sectors, &mut buf);
            (buf, result)
        })
    }

    fn write(&self, offset_sectors: u64, buf: WriteBuf) -> IoFuture<'_, io::Result<()>> {
        let done = self.schedule(true, buf.len());
        Box::pin(async move {
            if let Some(done) = done {
                tokio::time::sleep_until(done).await;
            }
            self.do_write(offset_sectors, Some(&buf), buf.len())
        })
    }

    fn write_zeroes(&self, offset_sectors: u64, len_sectors: u64) -> IoFuture<'_, io::Result<()>> {
        // Offloaded zeroing moves no data: it costs one request, not bandwidth.
        let done = self.schedule(true, 0);
        Box::pin(async move {
            if let Some(done) = done {
                tokio::time::sleep_until(done).await;
            }
            let len_bytes = usize::try_from(len_sectors).map_or(usize::MAX, |s| s.saturating_mul(SECTOR_SIZE));
            self.do_write(offset_sectors, None, len_bytes)
        })
    }

    fn flush(&self) -> IoFuture<'_, io::Result<()>> {
        Box::pin(async move {
            self.lock().stats.flushes += 1;
            Ok(())
        })
    }
}

impl fmt::Debug for MemDisk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemDisk").field("options", &self.options).finish()
    }
}
