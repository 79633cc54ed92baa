//! The simulated disk: true data in memory, a separate fault map applied on access, zoned
//! mode, a timing model and a volatile write cache that a crash can tear.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use kcopyd_core::{
    BlockDevice, DeviceId, Geometry, IoFuture, RangeSet, ReadBuf, SECTOR_SIZE, WriteBuf, sectors_to_bytes,
};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::error::{DiskError, DiskFailure, EINVAL};
use crate::faults::{FaultKind, FaultPlan, FaultRecord, Operation, WriteFault};
use crate::mix64;
use crate::simulation::{time_scale, to_model};
use crate::storage::{Provenance, Storage};
use crate::timing::{self, DevicePaths, Latency, Medium, Paths, Request, Slots};
use crate::trace::Trace;

static NEXT_DISK: AtomicU64 = AtomicU64::new(1);

/// How to build a [`MemDisk`]: a serde value, so that scenarios can be saved and replayed.
/// Defaults: 512-byte blocks, dense, no offload, not zoned, no latency, no faults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MemDiskOptions {
    /// Name used in messages and traces.
    pub name: String,
    /// Seed of everything drawn at random on this disk (jitter, fault odds, crash tearing).
    pub seed: u64,
    /// Length in 512-byte sectors; a multiple of the logical block.
    pub len_sectors: u64,
    /// Logical block size in bytes: a power of two from 512 to 65536.
    pub logical_block_size: u32,
    /// Keep content as extents of provenance instead of bytes: unwritten sectors cost
    /// nothing and copied pattern data costs one extent per run.
    pub sparse: bool,
    /// Move only the 40-byte provenance header of each pattern sector on reads and look only
    /// at the header on writes; bodies are neither filled nor checked. Copies of pattern
    /// data stay verified by provenance (disk seed, sector, generation: a misdirected,
    /// skipped or stale write is caught) at a fraction of the cost, but damage to a body is
    /// not seen. Give it to every disk of a copy: a whole-sector disk takes a header-only
    /// sector for data. Zero and data sectors move whole either way.
    pub headers_only: bool,
    /// Whether write-zeroes is reported as offloaded.
    pub write_zeroes: bool,
    /// Whether writes must follow each zone's write pointer.
    pub zoned: bool,
    /// Zone length in sectors when zoned; 0 means one zone for the whole disk.
    pub zone_sectors: u64,
    /// The timing model.
    pub latency: Latency,
    /// What goes wrong.
    pub faults: FaultPlan,
}

impl Default for MemDiskOptions {
    fn default() -> MemDiskOptions {
        MemDiskOptions {
            name: "mem".into(),
            seed: 0,
            len_sectors: 0,
            logical_block_size: 512,
            sparse: false,
            headers_only: false,
            write_zeroes: false,
            zoned: false,
            zone_sectors: 0,
            latency: Latency::default(),
            faults: FaultPlan::default(),
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
    /// Bytes written (write-zeroes included), saturating at `u64::MAX`: a write-zeroes of a
    /// whole disk of up to `u64::MAX` sectors is up to 2⁷³ bytes.
    pub written_bytes: u64,
}

/// A write issued and not yet applied: what a crash may tear.
struct InFlight {
    sectors: Range<u64>,
    data: Option<WriteBuf>,
}

/// A completed write not yet flushed, with what it overwrote: what a crash may lose.
struct Unflushed {
    sectors: Range<u64>,
    old: Vec<u8>,
}

struct State {
    storage: Storage,
    plan: FaultPlan,
    latent: RangeSet,
    faults_fired: Vec<FaultRecord>,
    /// Next sector to write in each zone (zoned disks only).
    write_pointers: Vec<u64>,
    stats: IoStats,
    draws: u64,
    ios_issued: u64,
    writes_issued: u64,
    read_slots: Slots,
    write_slots: Slots,
    paths: Paths,
    next_in_flight: u64,
    in_flight: BTreeMap<u64, InFlight>,
    unflushed: Vec<Unflushed>,
    crashed: bool,
    trace: Option<Trace>,
}

impl State {
    /// The next seeded draw of this disk.
    fn draw(&mut self, seed: u64) -> u64 {
        self.draws += 1;
        mix64(seed ^ mix64(self.draws))
    }

    fn hits(&mut self, seed: u64, ppm: u32) -> bool {
        ppm > 0 && self.draw(seed) % 1_000_000 < u64::from(ppm)
    }
}

/// What was decided about a request when it was issued.
struct Issued {
    done: Option<Instant>,
    /// A stall holds the request for ever: it never completes.
    for_ever: bool,
    io_index: u64,
    in_flight: Option<u64>,
    misdirect_to: Option<u64>,
}

/// An in-memory block device: true data plus a fault map, in (virtual) tokio time.
pub struct MemDisk {
    options: MemDiskOptions,
    created: Instant,
    id: DeviceId,
    block_sectors: u64,
    state: Mutex<State>,
}

impl MemDisk {
    /// A zero-filled disk.
    ///
    /// # Panics
    /// If the block size is not a power of two from 512 to 65536 or the length is not a
    /// multiple of it.
    pub fn new(options: MemDiskOptions) -> MemDisk {
        MemDisk::build(options, Paths::Own(DevicePaths::default()))
    }

    /// A zero-filled disk whose transfers share `medium`'s data paths with every other disk
    /// on it (files on one device; see [`Medium`]).
    ///
    /// # Panics
    /// As [`MemDisk::new`].
    pub fn on_medium(options: MemDiskOptions, medium: &Medium) -> MemDisk {
        MemDisk::build(options, Paths::Medium(medium.clone()))
    }

    fn build(options: MemDiskOptions, paths: Paths) -> MemDisk {
        let block = options.logical_block_size;
        assert!(block.is_power_of_two() && (512..=65536).contains(&block), "logical block size {block}");
        let block_sectors = u64::from(block) / SECTOR_SIZE as u64;
        assert_eq!(options.len_sectors % block_sectors, 0, "length is a whole number of blocks");
        let zone_sectors = if options.zone_sectors == 0 { options.len_sectors.max(1) } else { options.zone_sectors };
        let zones = if options.zoned { options.len_sectors.div_ceil(zone_sectors) } else { 0 };
        let latent = options.faults.latent_sectors.iter().cloned().collect();
        MemDisk {
            id: DeviceId { namespace: "mem", major: NEXT_DISK.fetch_add(1, Ordering::Relaxed), minor: 0 },
            created: Instant::now(),
            block_sectors,
            state: Mutex::new(State {
                storage: Storage::new(options.len_sectors, options.sparse, options.headers_only),
                plan: options.faults.clone(),
                latent,
                faults_fired: Vec::new(),
                write_pointers: (0..zones).map(|zone| zone.saturating_mul(zone_sectors)).collect(),
                stats: IoStats::default(),
                draws: 0,
                ios_issued: 0,
                writes_issued: 0,
                read_slots: Slots::default(),
                write_slots: Slots::default(),
                paths,
                next_in_flight: 0,
                in_flight: BTreeMap::new(),
                unflushed: Vec::new(),
                crashed: false,
                trace: None,
            }),
            options: MemDiskOptions { zone_sectors, ..options },
        }
    }

    /// A plain disk of `len_sectors` with `logical_block_size`-byte blocks, zero-filled.
    pub fn zeroed(name: &str, len_sectors: u64, logical_block_size: u32) -> MemDisk {
        MemDisk::new(MemDiskOptions { name: name.into(), len_sectors, logical_block_size, ..MemDiskOptions::default() })
    }

    /// A plain disk filled with generation 0 of the pattern of `seed`.
    pub fn with_pattern(name: &str, len_sectors: u64, logical_block_size: u32, seed: u64) -> MemDisk {
        let disk = MemDisk::zeroed(name, len_sectors, logical_block_size);
        disk.fill_pattern(seed);
        disk
    }

    /// Overwrites the whole disk with generation 0 of the pattern of `seed` (see
    /// [`pattern_sector`](crate::pattern_sector)): each sector names its seed and number.
    pub fn fill_pattern(&self, seed: u64) {
        self.fill_pattern_range(0..self.options.len_sectors, seed, 0);
    }

    /// Overwrites `sectors` with generation `generation` of the pattern of `seed`, bypassing
    /// faults and latency.
    pub fn fill_pattern_range(&self, sectors: Range<u64>, seed: u64, generation: u64) {
        assert!(sectors.end <= self.options.len_sectors);
        self.lock().storage.fill_pattern(sectors, seed, generation);
    }

    /// The options the disk was built with.
    pub fn options(&self) -> &MemDiskOptions {
        &self.options
    }

    /// Makes reads touching `sectors` fail (a latent sector error); a successful write over
    /// a sector clears it.
    pub fn fail_reads(&self, sectors: Range<u64>) {
        self.lock().latent.insert(sectors);
    }

    /// Makes every write touching `sectors` fail; nothing of a failing write lands.
    pub fn fail_writes(&self, sectors: Range<u64>) {
        self.lock().plan.write_faults.push(WriteFault { sectors, attempts: 0 });
    }

    /// Clears every injected fault: the plan, latent errors, a failed device and a crash.
    /// What the disk is stays: a volatile cache, an allocation it cannot tell. The log of
    /// faults that fired stays.
    pub fn heal(&self) {
        let mut state = self.lock();
        let FaultPlan { volatile_cache, allocation_unknown, .. } = state.plan;
        state.plan = FaultPlan { volatile_cache, allocation_unknown, ..FaultPlan::default() };
        state.latent = RangeSet::new();
        state.crashed = false;
    }

    /// A copy of `len_sectors` sectors from `start_sector`, bypassing faults and latency:
    /// whole sectors, also on a [`headers_only`](MemDiskOptions::headers_only) disk (whose
    /// pattern sectors come with the bodies their headers name).
    pub fn snapshot(&self, start_sector: u64, len_sectors: u64) -> Vec<u8> {
        let mut out = vec![0; usize::try_from(len_sectors).expect("fits in memory") * SECTOR_SIZE];
        self.lock().storage.read_whole(start_sector, &mut out);
        out
    }

    /// What each run of `sectors` holds, without materialising bytes: cheap on sparse disks.
    pub fn provenance(&self, sectors: Range<u64>) -> Vec<(Range<u64>, Provenance)> {
        self.lock().storage.provenance(sectors)
    }

    /// Sectors of `sectors` holding anything but zero extents (see [`BlockDevice::allocated`]):
    /// what a thin volume would have mapped.
    pub fn allocated_sectors(&self, sectors: Range<u64>) -> u64 {
        self.lock().storage.allocated(sectors).len_sectors()
    }

    /// Runs of content a sparse disk holds (0 for a dense disk): its memory in units.
    pub fn extents(&self) -> usize {
        self.lock().storage.extents()
    }

    /// Overwrites sectors from `start_sector` with `data`, bypassing faults and latency. A
    /// [`headers_only`](MemDiskOptions::headers_only) disk takes a sector with a valid pattern
    /// header for that whole pattern sector, whatever its body holds.
    pub fn poke(&self, start_sector: u64, data: &[u8]) {
        assert_eq!(data.len() % SECTOR_SIZE, 0);
        self.lock().storage.write(start_sector, data);
    }

    /// Every fault that fired so far, in order.
    pub fn fault_log(&self) -> Vec<FaultRecord> {
        self.lock().faults_fired.clone()
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

    /// Records every completed request of this disk in `trace`.
    pub fn set_trace(&self, trace: Trace) {
        self.lock().trace = Some(trace);
    }

    /// Crashes the disk: with a volatile cache, each write in flight lands only in part (each
    /// block with even odds) and each completed write not yet flushed is lost with even odds,
    /// newest first; without one, writes in flight are dropped. Every later request fails
    /// until [`restart`](MemDisk::restart). Every torn or lost write is in the fault log.
    pub fn crash(&self) {
        let mut state = self.lock();
        let seed = self.options.seed;
        let in_flight = std::mem::take(&mut state.in_flight);
        for (_, write) in in_flight {
            if !state.plan.volatile_cache {
                continue;
            }
            let mut landed = RangeSet::new();
            for block in (write.sectors.start..write.sectors.end).step_by(self.block_sectors as usize) {
                if state.draw(seed) % 2 == 0 {
                    continue;
                }
                let block_range = block..block + self.block_sectors;
                match &write.data {
                    Some(data) => {
                        let at = (block - write.sectors.start) as usize * SECTOR_SIZE;
                        let bytes = data.slice(at..at + self.block_sectors as usize * SECTOR_SIZE).to_vec();
                        state.storage.write(block, &bytes);
                    }
                    None => state.storage.zero(block_range.clone()),
                }
                landed.insert(block_range);
            }
            let kind = FaultKind::Torn { landed: landed.ranges().to_vec() };
            self.record_fault(&mut state, Operation::Write, write.sectors, kind);
        }
        let unflushed = std::mem::take(&mut state.unflushed);
        for write in unflushed.into_iter().rev() {
            if state.draw(seed) % 2 == 0 {
                state.storage.write(write.sectors.start, &write.old);
                self.record_fault(&mut state, Operation::Write, write.sectors, FaultKind::Lost);
            }
        }
        state.crashed = true;
        self.trace(&state, format!("{} crash", self.options.name));
    }

    /// Brings a crashed disk back: requests work again (the fault plan still applies).
    pub fn restart(&self) {
        self.lock().crashed = false;
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while the lock was held (a bug, or a caller's panic) leaves the state as
        // consistent as any fault would: keep serving rather than cascade the panic.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Model time since the disk was made.
    fn now_us(&self) -> u64 {
        to_model(Instant::now().saturating_duration_since(self.created)).as_micros() as u64
    }

    fn record_fault(&self, state: &mut State, operation: Operation, sectors: Range<u64>, kind: FaultKind) {
        let at_us = self.now_us();
        state.faults_fired.push(FaultRecord { at_us, device: self.options.name.clone(), operation, sectors, kind });
    }

    fn trace(&self, state: &State, what: String) {
        if let Some(trace) = &state.trace {
            trace.record(what);
        }
    }

    /// The error of `operation` on `sectors`, naming this device.
    fn error(&self, operation: Operation, sectors: Range<u64>, reason: DiskFailure) -> io::Error {
        DiskError { device: self.options.name.clone(), operation, sectors, reason }.into_io()
    }

    /// Refuses misaligned (EINVAL) and out-of-range (EIO) requests before any transfer, by
    /// the rules every backend shares ([`Geometry::check_request`]); only the errno of a
    /// request past the end is the simulator's own ([`DiskFailure::OutOfRange`]).
    fn check(&self, operation: Operation, offset_sectors: u64, len_bytes: u128) -> io::Result<Range<u64>> {
        self.geometry()
            .check_request(offset_sectors, len_bytes)
            .map_err(|refused| self.error(operation, refused.sectors(), refused.into()))
    }

    /// Decides, at issue time, when a request completes and what the plan does to it.
    fn issue(&self, operation: Operation, sectors: &Range<u64>, len_bytes: usize, data: Option<&WriteBuf>) -> Issued {
        let seed = self.options.seed;
        let now = Instant::now();
        let mut state = self.lock();
        let io_index = state.ios_issued;
        state.ios_issued += 1;
        let write = operation != Operation::Read;
        let mut extra_us: u64 =
            state.plan.slow_spikes.iter().filter(|s| s.io_index == io_index).map(|s| s.extra_us).sum();
        let (slow_ppm, slow_us) = (state.plan.odds.slow_ppm, state.plan.odds.slow_us);
        if state.hits(seed, slow_ppm) {
            extra_us += slow_us;
        }
        let stall = self.stall(&mut state, io_index);
        let mut misdirect_to = None;
        let mut in_flight = None;
        if write {
            let write_index = state.writes_issued;
            state.writes_issued += 1;
            if data.is_some() {
                let mut shift =
                    state.plan.misdirects.iter().find(|m| m.write_index == write_index).map(|m| m.shift_sectors);
                let misdirect_ppm = state.plan.odds.misdirect_ppm;
                if shift.is_none() && state.hits(seed, misdirect_ppm) {
                    let blocks = (state.draw(seed) % 8 + 1) as i64;
                    shift = Some(if state.draw(seed) % 2 == 0 { blocks } else { -blocks } * self.block_sectors as i64);
                }
                misdirect_to = shift.and_then(|shift| self.misdirected_start(sectors, shift));
            }
            let id = state.next_in_flight;
            state.next_in_flight += 1;
            state.in_flight.insert(id, InFlight { sectors: sectors.clone(), data: data.cloned() });
            in_flight = Some(id);
        }
        let latency = &self.options.latency;
        let hold_us = stall.flatten().unwrap_or(0);
        let done = if latency.is_instant(write) && extra_us == 0 && hold_us == 0 {
            None
        } else {
            let model = if write { latency.write } else { latency.read };
            let jitter_us = if model.jitter_us == 0 { 0 } else { state.draw(seed) % (model.jitter_us + 1) };
            let scale = time_scale();
            let request = Request {
                now,
                write,
                len_bytes,
                start_sector: sectors.start,
                end_sector: sectors.end,
                disk: self.id.major,
                disk_len_sectors: self.options.len_sectors,
                jitter_us,
                scale,
            };
            let state = &mut *state;
            let slots = if write { &mut state.write_slots } else { &mut state.read_slots };
            let extra = Duration::from_micros(extra_us.saturating_add(hold_us)) * scale;
            Some(timing::schedule(latency, slots, &mut state.paths, request) + extra)
        };
        if extra_us > 0 {
            self.record_fault(&mut state, operation, sectors.clone(), FaultKind::Slow { extra_us });
        }
        if let Some(hold_us) = stall {
            self.record_fault(&mut state, operation, sectors.clone(), FaultKind::Stalled { hold_us });
        }
        Issued { done, for_ever: stall == Some(None), io_index, in_flight, misdirect_to }
    }

    /// Whether request `io_index` stalls (from the plan's schedule, else drawn from its odds),
    /// and for how long (`Some(None)`: for ever).
    fn stall(&self, state: &mut State, io_index: u64) -> Option<Option<u64>> {
        let scheduled = state.plan.stalls.iter().find(|s| s.io_index == io_index).map(|s| s.hold_us);
        let (stall_ppm, stall_us) = (state.plan.odds.stall_ppm, state.plan.odds.stall_us);
        scheduled.or_else(|| state.hits(self.options.seed, stall_ppm).then_some(stall_us))
    }

    /// Counts and traces a request refused before any transfer (misaligned or out of range),
    /// as the kernel refuses it: at once, with no queueing and no fault drawn.
    fn refuse(&self, operation: Operation, offset_sectors: u64, error: io::Error) -> io::Error {
        self.finish(operation, &(offset_sectors..offset_sectors), &Err(io::Error::from_raw_os_error(EINVAL)));
        error
    }

    /// Where a write of `sectors` shifted by `shift` lands: whole blocks, inside the disk, and
    /// not where it was aimed.
    fn misdirected_start(&self, sectors: &Range<u64>, shift: i64) -> Option<u64> {
        let len = sectors.end - sectors.start;
        let block = self.block_sectors as i64;
        let shift = shift / block * block;
        let last_start = i64::try_from(self.options.len_sectors - len).unwrap_or(i64::MAX);
        let start = i64::try_from(sectors.start).unwrap_or(i64::MAX).saturating_add(shift).clamp(0, last_start) as u64;
        let start = start / self.block_sectors * self.block_sectors;
        (start != sectors.start && !self.options.zoned).then_some(start)
    }

    /// A whole-device failure or crash in force for request `io_index`, if any.
    fn device_down(&self, state: &State, io_index: u64) -> Option<FaultKind> {
        if state.crashed {
            return Some(FaultKind::Crashed);
        }
        let failed_by_count = state.plan.fail_after_ios.is_some_and(|n| io_index >= n);
        let failed_by_time = state.plan.fail_at_us.is_some_and(|t| self.now_us() >= t);
        (failed_by_count || failed_by_time).then_some(FaultKind::DeviceFailed)
    }

    /// The read of `sectors` into `buf` (the whole window, or the part for `sectors`).
    fn complete_read(
        &self,
        issued: &Issued,
        request: &Range<u64>,
        sectors: Range<u64>,
        buf: &mut ReadBuf,
        window_offset: usize,
    ) -> io::Result<()> {
        let seed = self.options.seed;
        let mut state = self.lock();
        if let Some(kind) = self.device_down(&state, issued.io_index) {
            let reason = down_failure(&kind);
            self.record_fault(&mut state, Operation::Read, request.clone(), kind);
            return Err(self.error(Operation::Read, request.clone(), reason));
        }
        let read_error_ppm = state.plan.odds.read_error_ppm;
        if state.hits(seed, read_error_ppm) {
            let blocks = (sectors.end - sectors.start) / self.block_sectors;
            let block = sectors.start + state.draw(seed) % blocks * self.block_sectors;
            state.latent.insert(block..block + self.block_sectors);
        }
        if state.latent.intersects(&sectors) {
            self.record_fault(&mut state, Operation::Read, request.clone(), FaultKind::LatentSectorError);
            return Err(self.error(Operation::Read, request.clone(), DiskFailure::LatentSectorError));
        }
        let len = (sectors.end - sectors.start) as usize * SECTOR_SIZE;
        // Segments that split sectors (a user's window): read whole sectors once, then scatter.
        let bounce = buf.segments().any(|s| s.len() % SECTOR_SIZE != 0).then(|| {
            let mut bounce = vec![0; len];
            state.storage.read(sectors.start, &mut bounce);
            bounce
        });
        let mut skip = window_offset;
        let mut done = 0;
        for segment in buf.segments_mut() {
            if skip >= segment.len() {
                skip -= segment.len();
                continue;
            }
            let piece = &mut segment[skip..];
            skip = 0;
            let take = piece.len().min(len - done);
            match &bounce {
                Some(bounce) => piece[..take].copy_from_slice(&bounce[done..done + take]),
                None => state.storage.read(sectors.start + (done / SECTOR_SIZE) as u64, &mut piece[..take]),
            }
            done += take;
            if done == len {
                break;
            }
        }
        state.stats.read_bytes += len as u64;
        Ok(())
    }

    /// The write of `sectors` (data at `data_offset` bytes of `data`, or zeroes): first which
    /// fault fires, if any ([`MemDisk::write_fault`]), then where the bytes land
    /// ([`MemDisk::land_write`]).
    fn complete_write(
        &self,
        issued: &Issued,
        operation: Operation,
        request: &Range<u64>,
        sectors: Range<u64>,
        data: Option<(&WriteBuf, usize)>,
        last_piece: bool,
    ) -> io::Result<()> {
        let mut state = self.lock();
        self.write_fault(&mut state, issued, operation, request, &sectors, last_piece)?;
        self.land_write(&mut state, issued, operation, request, sectors, data);
        Ok(())
    }

    /// The fault a write of `sectors` (part of `request`) meets, in this order: a crash took
    /// it in flight, the device is down, a write fault of the plan or the odds, a zoned
    /// disk's write pointer elsewhere. The fault is logged and returned as the error; without
    /// one a zone's write pointer moves past the write.
    fn write_fault(
        &self,
        state: &mut State,
        issued: &Issued,
        operation: Operation,
        request: &Range<u64>,
        sectors: &Range<u64>,
        last_piece: bool,
    ) -> io::Result<()> {
        if let Some(id) = issued.in_flight {
            let known =
                if last_piece { state.in_flight.remove(&id).is_some() } else { state.in_flight.contains_key(&id) };
            if !known {
                // A crash took this write while it was in flight.
                self.record_fault(state, operation, request.clone(), FaultKind::Crashed);
                return Err(self.error(operation, request.clone(), DiskFailure::Crashed));
            }
        }
        if let Some(kind) = self.device_down(state, issued.io_index) {
            let reason = down_failure(&kind);
            self.record_fault(state, operation, request.clone(), kind);
            return Err(self.error(operation, request.clone(), reason));
        }
        let planned = spend_write_faults(&mut state.plan.write_faults, sectors);
        let write_error_ppm = state.plan.odds.write_error_ppm;
        if planned || state.hits(self.options.seed, write_error_ppm) {
            self.record_fault(state, operation, request.clone(), FaultKind::WriteError);
            return Err(self.error(operation, request.clone(), DiskFailure::WriteError));
        }
        if self.options.zoned {
            let zone = (sectors.start / self.options.zone_sectors) as usize;
            // The last zone may be short: its end saturates at the end of the address space.
            let zone_end = (zone as u64 + 1).saturating_mul(self.options.zone_sectors);
            let write_pointer = state.write_pointers[zone];
            if write_pointer != sectors.start || sectors.end > zone_end {
                // An unaligned write to a sequential zone, as the kernel reports it; logged, so
                // that an oracle sees an engine's out-of-order write as the fault it caused.
                self.record_fault(state, operation, request.clone(), FaultKind::ZoneViolation { write_pointer });
                return Err(self.error(operation, request.clone(), DiskFailure::NotAtWritePointer { write_pointer }));
            }
            state.write_pointers[zone] = sectors.end;
        }
        Ok(())
    }

    /// Puts a write that met no fault in place: where it lands (a misdirect sends it
    /// elsewhere, logged), the old bytes kept for a crash when the cache is volatile, the
    /// bytes (or zeroes) stored, latent errors under it repaired, the bytes counted.
    fn land_write(
        &self,
        state: &mut State,
        issued: &Issued,
        operation: Operation,
        request: &Range<u64>,
        sectors: Range<u64>,
        data: Option<(&WriteBuf, usize)>,
    ) {
        let landed = match issued.misdirect_to {
            Some(request_start) => {
                let start = request_start + (sectors.start - request.start);
                let landed = start..start + (sectors.end - sectors.start);
                self.record_fault(state, operation, sectors.clone(), FaultKind::Misdirected { landed: landed.clone() });
                landed
            }
            None => sectors.clone(),
        };
        if state.plan.volatile_cache {
            let mut old = vec![0; (landed.end - landed.start) as usize * SECTOR_SIZE];
            state.storage.read(landed.start, &mut old);
            state.unflushed.push(Unflushed { sectors: landed.clone(), old });
        }
        match data {
            Some((data, offset)) => {
                let len = (landed.end - landed.start) as usize * SECTOR_SIZE;
                let bytes = data.slice(offset..offset + len);
                if bytes.segments().iter().all(|s| s.len() % SECTOR_SIZE == 0) {
                    let mut at = landed.start;
                    for segment in bytes.segments() {
                        state.storage.write(at, segment);
                        at += (segment.len() / SECTOR_SIZE) as u64;
                    }
                } else {
                    // Segments that split sectors (user data): gather them first.
                    state.storage.write(landed.start, &bytes.to_vec());
                }
            }
            None => state.storage.zero(landed.clone()),
        }
        // A successful write repairs latent errors under it.
        state.latent = state.latent.difference(&RangeSet::from_range(landed));
        let written = u64::try_from(sectors_to_bytes(sectors.end - sectors.start)).unwrap_or(u64::MAX);
        state.stats.written_bytes = state.stats.written_bytes.saturating_add(written);
    }

    /// Counts a finished request and traces it.
    fn finish(&self, operation: Operation, sectors: &Range<u64>, result: &io::Result<()>) {
        let mut state = self.lock();
        match operation {
            Operation::Read => state.stats.reads += 1,
            Operation::Write => state.stats.writes += 1,
            Operation::WriteZeroes => state.stats.write_zeroes += 1,
            Operation::Crash | Operation::Flush => {}
        }
        if result.is_err() {
            state.stats.errors += 1;
        }
        if state.trace.is_some() {
            let verdict = if result.is_ok() { "ok" } else { "err" };
            self.trace(&state, format!("{} {operation:?} {sectors:?} {verdict}", self.options.name));
        }
    }

    /// The pieces a request is served in: the whole, or one block each on a short-I/O disk.
    fn pieces(&self, sectors: &Range<u64>) -> Vec<Range<u64>> {
        if self.lock().plan.short_io && sectors.end - sectors.start > self.block_sectors {
            (sectors.start..sectors.end)
                .step_by(self.block_sectors as usize)
                .map(|s| s..s + self.block_sectors)
                .collect()
        } else {
            vec![sectors.clone()]
        }
    }
}

/// Whether a write of `sectors` meets a write fault of the plan; each fault it touches that
/// fails a number of attempts spends one (and, spent, never fires again). Every touching
/// fault is visited, so two overlapping faults both count the attempt.
fn spend_write_faults(faults: &mut [WriteFault], sectors: &Range<u64>) -> bool {
    let mut failed = false;
    for fault in faults.iter_mut() {
        if fault.sectors.start < sectors.end && sectors.start < fault.sectors.end {
            if fault.attempts == 0 {
                failed = true;
            } else if fault.attempts != u32::MAX {
                failed = true;
                fault.attempts -= 1;
                if fault.attempts == 0 {
                    fault.attempts = u32::MAX; // spent: never fires again
                }
            }
        }
    }
    failed
}

/// The failure a whole-device fault gives a request.
fn down_failure(kind: &FaultKind) -> DiskFailure {
    match kind {
        FaultKind::Crashed => DiskFailure::Crashed,
        _ => DiskFailure::DeviceFailed,
    }
}

/// Waits until a request issued as `issued` is due: its completion time, or for ever if a
/// stall holds it for ever.
async fn wait_until(issued: &Issued) {
    if let Some(done) = issued.done {
        tokio::time::sleep_until(done).await;
    }
    if issued.for_ever {
        std::future::pending::<()>().await;
    }
}

impl BlockDevice for MemDisk {
    fn name(&self) -> &str {
        &self.options.name
    }

    fn id(&self) -> DeviceId {
        self.id
    }

    fn geometry(&self) -> Geometry {
        Geometry::new(self.options.len_sectors, self.options.logical_block_size)
            .with_write_zeroes(self.options.write_zeroes)
            .with_zoned(self.options.zoned)
            .with_zone_sectors(if self.options.zoned { self.options.zone_sectors } else { 0 })
    }

    fn read(&self, offset_sectors: u64, mut buf: ReadBuf) -> IoFuture<'_, (ReadBuf, io::Result<()>)> {
        let sectors = match self.check(Operation::Read, offset_sectors, buf.len() as u128) {
            Ok(sectors) => sectors,
            Err(error) => {
                return Box::pin(async move { (buf, Err(self.refuse(Operation::Read, offset_sectors, error))) });
            }
        };
        let issued = self.issue(Operation::Read, &sectors, buf.len(), None);
        Box::pin(async move {
            wait_until(&issued).await;
            let mut result = Ok(());
            let pieces = self.pieces(&sectors);
            let short = pieces.len() > 1;
            for piece in pieces {
                let offset = (piece.start - sectors.start) as usize * SECTOR_SIZE;
                result = self.complete_read(&issued, &sectors, piece, &mut buf, offset);
                if result.is_err() {
                    break;
                }
                if short {
                    tokio::task::yield_now().await;
                }
            }
            self.finish(Operation::Read, &sectors, &result);
            (buf, result)
        })
    }

    fn write(&self, offset_sectors: u64, buf: WriteBuf) -> IoFuture<'_, io::Result<()>> {
        let sectors = match self.check(Operation::Write, offset_sectors, buf.len() as u128) {
            Ok(sectors) => sectors,
            Err(error) => return Box::pin(async move { Err(self.refuse(Operation::Write, offset_sectors, error)) }),
        };
        let issued = self.issue(Operation::Write, &sectors, buf.len(), Some(&buf));
        Box::pin(async move {
            wait_until(&issued).await;
            self.serve_write(&issued, Operation::Write, sectors, Some(&buf)).await
        })
    }

    fn write_zeroes(&self, offset_sectors: u64, len_sectors: u64) -> IoFuture<'_, io::Result<()>> {
        let sectors = match self.check(Operation::WriteZeroes, offset_sectors, sectors_to_bytes(len_sectors)) {
            Ok(sectors) => sectors,
            Err(error) => {
                return Box::pin(async move { Err(self.refuse(Operation::WriteZeroes, offset_sectors, error)) });
            }
        };
        // Offloaded zeroing moves no data: it costs one request, not bandwidth.
        let issued = self.issue(Operation::WriteZeroes, &sectors, 0, None);
        Box::pin(async move {
            wait_until(&issued).await;
            self.serve_write(&issued, Operation::WriteZeroes, sectors, None).await
        })
    }

    /// A sparse disk's allocation is its non-zero extents (a thin volume's mapped blocks);
    /// a dense disk is all allocated. Answering costs no virtual time (metadata).
    /// A plan with `allocation_unknown` fails the query.
    fn allocated(&self, offset_sectors: u64, len_sectors: u64) -> IoFuture<'_, io::Result<RangeSet>> {
        let end = offset_sectors.saturating_add(len_sectors).min(self.options.len_sectors);
        let state = self.lock();
        let answer = if state.plan.allocation_unknown {
            Err(io::Error::new(io::ErrorKind::Unsupported, format!("{}: allocation unknown", self.options.name)))
        } else if offset_sectors < end {
            Ok(state.storage.allocated(offset_sectors..end))
        } else {
            Ok(RangeSet::new())
        };
        Box::pin(std::future::ready(answer))
    }

    /// A sparse disk frees what it zeroes (its write-zeroes drops the extents).
    fn deallocates(&self) -> bool {
        self.options.sparse
    }

    /// A write-zeroes: on a sparse disk it drops the extents, which is the deallocation.
    fn deallocate(&self, offset_sectors: u64, len_sectors: u64) -> IoFuture<'_, io::Result<()>> {
        self.write_zeroes(offset_sectors, len_sectors)
    }

    fn flush(&self) -> IoFuture<'_, io::Result<()>> {
        Box::pin(async move {
            let mut state = self.lock();
            state.stats.flushes += 1;
            if state.crashed {
                return Err(self.error(Operation::Flush, 0..self.options.len_sectors, DiskFailure::Crashed));
            }
            state.unflushed.clear();
            Ok(())
        })
    }
}

impl MemDisk {
    async fn serve_write(
        &self,
        issued: &Issued,
        operation: Operation,
        sectors: Range<u64>,
        data: Option<&WriteBuf>,
    ) -> io::Result<()> {
        let pieces = self.pieces(&sectors);
        let count = pieces.len();
        let mut result = Ok(());
        for (i, piece) in pieces.into_iter().enumerate() {
            let offset = (piece.start - sectors.start) as usize * SECTOR_SIZE;
            result = self.complete_write(issued, operation, &sectors, piece, data.map(|d| (d, offset)), i + 1 == count);
            if result.is_err() {
                break;
            }
            if count > 1 {
                tokio::task::yield_now().await;
            }
        }
        if result.is_err() {
            if let Some(id) = issued.in_flight {
                self.lock().in_flight.remove(&id);
            }
        }
        self.finish(operation, &sectors, &result);
        result
    }
}

impl fmt::Debug for MemDisk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemDisk")
            .field("name", &self.options.name)
            .field("len_sectors", &self.options.len_sectors)
            .finish()
    }
}
