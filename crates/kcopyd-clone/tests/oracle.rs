//! The clone's oracle, in the swarm's style: per seed, a clone over simulated disks (volatile
//! write caches, latency, sometimes faults) serves random foreground reads, writes, discards
//! and flushes from several workers while it hydrates; the disks crash at random points and
//! the clone is reopened from its metadata. A flat per-sector model checks that
//!
//! - every read returns the last acknowledged write, or the source's data where none was;
//! - after a crash and reopen, every sector holds its last write acknowledged before a flush
//!   that succeeded, or something written after it (nothing flushed is lost, and no region
//!   claims data it does not have: such a region would read as the destination's garbage);
//! - at the end every region is hydrated (or given up on, only where the source cannot be
//!   read) and the destination equals the source plus the writes.
//!
//! Seeds `0..KCOPYD_CLONE_SEEDS` (default 200); a failing seed is printed.
//!
//! ```text
//!  epoch: open/create ─► workers (read/write/discard/flush, think times) ∥ run_hydration
//!         ─► crash at a random time? ─► stop, restart the disks, reopen ─► check every sector
//!  last epoch: no crash ─► hydration to the end ─► check every sector and the destination
//! ```

use std::cell::RefCell;
use std::ops::Range;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use kcopyd_clone::{CloneDevice, CloneDevices, CloneOptions, HydrationEnd};
use kcopyd_core::{BlockDevice, Client, ClientConfig, Device, Forward, Hooks, IoFuture, ReadBuf, WriteBuf};
use kcopyd_sim::{FaultPlan, IoModel, Latency, MemDisk, MemDiskOptions, Simulation, WriteFault, mix64, to_tokio};

const SEEDS_DEFAULT: u64 = 200;
const SECTOR: usize = 512;

/// A seeded generator.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = mix64(self.0);
        self.0 % n.max(1)
    }
    fn odds(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }
}

/// What a sector holds: the source's data, zeroes, or the data of write `n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tag {
    Source,
    Zero,
    Data(u64),
}

fn data_sector(tag: u64, sector: u64) -> Vec<u8> {
    (0..SECTOR / 8).flat_map(|i| mix64(tag.wrapping_mul(0x9e37) ^ mix64(sector) ^ i as u64).to_le_bytes()).collect()
}

/// One write of the model (data or zeroes).
#[derive(Debug)]
struct WriteRecord {
    tag: Tag,
    /// The event at which it was acknowledged, if it succeeded.
    acked_at: Option<u64>,
}

/// The model: per sector, its value at the epoch's start and the writes since, in order.
struct Model {
    source: Vec<u8>,
    base: Vec<Tag>,
    history: Vec<Vec<usize>>,
    writes: Vec<WriteRecord>,
    /// Event counter: acknowledgements and flush starts.
    clock: u64,
    /// Writes acknowledged before this event are durable (the latest successful flush's start).
    durable_before: u64,
    /// Per sector: -1 a write holds it, n > 0 reads do.
    locks: Vec<i32>,
    next_tag: u64,
    /// Crashes of the disks before this epoch: more mean this epoch crashed.
    crashes_before: u64,
    switch: Arc<CrashSwitch>,
    faults: bool,
    violations: Vec<String>,
    /// What was exercised, so that a run that checks nothing shows.
    counts: Counts,
}

/// What a run exercised.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    reads_checked: u64,
    writes_acked: u64,
    flushes_ok: u64,
    reopens: u64,
    regions_given_up: u64,
}

impl std::ops::AddAssign for Counts {
    fn add_assign(&mut self, other: Counts) {
        self.reads_checked += other.reads_checked;
        self.writes_acked += other.writes_acked;
        self.flushes_ok += other.flushes_ok;
        self.reopens += other.reopens;
        self.regions_given_up += other.regions_given_up;
    }
}

impl Model {
    fn bytes(&self, tag: Tag, sector: u64) -> Vec<u8> {
        match tag {
            Tag::Source => self.source[sector as usize * SECTOR..(sector as usize + 1) * SECTOR].to_vec(),
            Tag::Zero => vec![0; SECTOR],
            Tag::Data(n) => data_sector(n, sector),
        }
    }

    /// What a read may return now: the last acknowledged write (or the base), or a failed
    /// write after it (which may have landed).
    fn readable(&self, sector: u64) -> Vec<Tag> {
        let history = &self.history[sector as usize];
        let last_ok = history.iter().rposition(|&w| self.writes[w].acked_at.is_some());
        let mut tags = vec![last_ok.map_or(self.base[sector as usize], |i| self.writes[history[i]].tag)];
        tags.extend(history[last_ok.map_or(0, |i| i + 1)..].iter().map(|&w| self.writes[w].tag));
        tags
    }

    /// What a sector may hold after a crash: its last write acknowledged before a successful
    /// flush began (or the base), or any write after that.
    fn durable(&self, sector: u64) -> Vec<Tag> {
        let history = &self.history[sector as usize];
        let floor = history.iter().rposition(|&w| self.writes[w].acked_at.is_some_and(|at| at < self.durable_before));
        let mut tags = vec![floor.map_or(self.base[sector as usize], |i| self.writes[history[i]].tag)];
        tags.extend(history[floor.map_or(0, |i| i + 1)..].iter().map(|&w| self.writes[w].tag));
        tags
    }

    /// Checks `data` read at `start` against `allowed`; returns the tags seen.
    fn check(&mut self, what: &str, start: u64, data: &[u8], allowed: impl Fn(&Model, u64) -> Vec<Tag>) -> Vec<Tag> {
        let mut seen = Vec::new();
        for (i, sector_data) in data.chunks(SECTOR).enumerate() {
            let sector = start + i as u64;
            let tags = allowed(self, sector);
            match tags.iter().find(|&&tag| self.bytes(tag, sector) == sector_data) {
                Some(&tag) => seen.push(tag),
                None => {
                    let message = format!("{what}: sector {sector} holds none of {tags:?}");
                    self.violations.push(message);
                    seen.push(tags[0]);
                }
            }
        }
        seen
    }

    fn crashed(&self) -> bool {
        self.switch.crashes.load(Ordering::SeqCst) > self.crashes_before
    }

    fn lock(&mut self, sectors: &Range<u64>, write: bool) -> bool {
        let range = sectors.start as usize..sectors.end as usize;
        let free = if write {
            self.locks[range.clone()].iter().all(|&l| l == 0)
        } else {
            self.locks[range.clone()].iter().all(|&l| l >= 0)
        };
        if free {
            self.locks[range].iter_mut().for_each(|l| *l = if write { -1 } else { *l + 1 });
        }
        free
    }

    fn unlock(&mut self, sectors: &Range<u64>, write: bool) {
        let range = sectors.start as usize..sectors.end as usize;
        self.locks[range].iter_mut().for_each(|l| *l = if write { 0 } else { *l - 1 });
    }

    /// After a crash's check: the values read become the new base; the history starts again.
    fn settle(&mut self, seen: Vec<Tag>) {
        self.base = seen;
        self.history.iter_mut().for_each(Vec::clear);
        self.writes.clear();
        self.durable_before = 0;
    }

    fn error_allowed(&mut self, what: String) {
        if !self.crashed() && !self.faults {
            self.violations.push(format!("{what} failed without a fault or a crash"));
        }
    }
}

/// Crashes every disk of a seed at once: at a virtual time, or right after the n-th request
/// of the clone to any of its devices completes (so crashes land between any two steps of a
/// commit, not only in the middle of a request).
#[derive(Debug)]
struct CrashSwitch {
    disks: [Arc<MemDisk>; 3],
    requests: AtomicU64,
    /// Crash when `requests` reaches this; `u64::MAX` = never.
    after_request: AtomicU64,
    crashes: AtomicU64,
}

impl CrashSwitch {
    fn crash(&self) {
        self.after_request.store(u64::MAX, Ordering::SeqCst);
        self.disks.iter().for_each(|d| d.crash());
        self.crashes.fetch_add(1, Ordering::SeqCst);
    }

    fn completed(&self) {
        let n = self.requests.fetch_add(1, Ordering::SeqCst) + 1;
        if n == self.after_request.load(Ordering::SeqCst) {
            self.crash();
        }
    }
}

/// A disk as the clone sees it: every request counted by the crash switch when it completes.
#[derive(Debug)]
struct CrashCounted {
    switch: Arc<CrashSwitch>,
}

impl CrashCounted {
    /// `disk` through the crash switch's count.
    fn device(disk: &Arc<MemDisk>, switch: &Arc<CrashSwitch>) -> Device {
        Arc::new(Forward::new(disk.clone(), CrashCounted { switch: switch.clone() }))
    }

    /// `request`, counted when it completes.
    fn counted<'a, T: Send + 'a>(&'a self, request: IoFuture<'a, T>) -> IoFuture<'a, T> {
        Box::pin(async move {
            let done = request.await;
            self.switch.completed();
            done
        })
    }
}

impl Hooks for CrashCounted {
    fn read<'a>(
        &'a self,
        inner: &'a dyn BlockDevice,
        offset_sectors: u64,
        buf: ReadBuf,
    ) -> IoFuture<'a, (ReadBuf, std::io::Result<()>)> {
        self.counted(inner.read(offset_sectors, buf))
    }
    fn write<'a>(
        &'a self,
        inner: &'a dyn BlockDevice,
        offset_sectors: u64,
        buf: WriteBuf,
    ) -> IoFuture<'a, std::io::Result<()>> {
        self.counted(inner.write(offset_sectors, buf))
    }
    fn write_zeroes<'a>(
        &'a self,
        inner: &'a dyn BlockDevice,
        offset_sectors: u64,
        len_sectors: u64,
    ) -> IoFuture<'a, std::io::Result<()>> {
        self.counted(inner.write_zeroes(offset_sectors, len_sectors))
    }
    fn flush<'a>(&'a self, inner: &'a dyn BlockDevice) -> IoFuture<'a, std::io::Result<()>> {
        self.counted(inner.flush())
    }
    fn deallocate<'a>(
        &'a self,
        inner: &'a dyn BlockDevice,
        offset_sectors: u64,
        len_sectors: u64,
    ) -> IoFuture<'a, std::io::Result<()>> {
        self.counted(inner.deallocate(offset_sectors, len_sectors))
    }
}

/// One seed's set-up.
struct Setup {
    len_sectors: u64,
    region_bytes: u64,
    block_sectors: u64,
    source: Arc<MemDisk>,
    destination: Arc<MemDisk>,
    metadata: Arc<MemDisk>,
    /// Source sectors that cannot be read.
    unreadable: Vec<Range<u64>>,
    options: CloneOptions,
    switch: Arc<CrashSwitch>,
    workers: u64,
    ops: u64,
    epochs: u64,
}

/// Disk timings: a fixed cost per request, jitter, a queue of four.
fn latency(rng: &mut Rng) -> Latency {
    let model = |rng: &mut Rng, bandwidth_bytes_per_s| IoModel {
        cost_us: 20 + rng.below(200),
        bandwidth_bytes_per_s,
        queue_depth: 4,
        jitter_us: 30,
    };
    Latency { read: model(rng, 500_000_000), write: model(rng, 300_000_000), ..Latency::default() }
}

/// A disk with a volatile write cache (so crashes lose and tear what was not flushed).
fn disk(seed: u64, name: &str, len_sectors: u64, block: u32, latency: Latency, plan: FaultPlan) -> Arc<MemDisk> {
    Arc::new(MemDisk::new(MemDiskOptions {
        name: name.into(),
        seed: mix64(seed ^ name.len() as u64),
        len_sectors,
        logical_block_size: block,
        write_zeroes: true,
        latency,
        faults: FaultPlan { volatile_cache: true, ..plan },
        ..MemDiskOptions::default()
    }))
}

/// A third of the seeds have faults: one unreadable source block (its region is given up on
/// unless overwritten), a destination block whose writes fail twice, metadata writes that fail
/// once or twice. Returns the unreadable sectors and the destination's and metadata's plans.
fn faults(rng: &mut Rng, len_sectors: u64, block_sectors: u64) -> (Vec<Range<u64>>, FaultPlan, FaultPlan) {
    let (mut unreadable, mut destination, mut metadata) = (Vec::new(), FaultPlan::default(), FaultPlan::default());
    if rng.odds(3) {
        let block = rng.below(len_sectors / block_sectors) * block_sectors;
        unreadable.push(block..block + block_sectors);
        let start = rng.below(len_sectors / block_sectors) * block_sectors;
        destination.write_faults.push(WriteFault { sectors: start..start + block_sectors, attempts: 2 });
        metadata.write_faults.push(WriteFault { sectors: 0..1024, attempts: 1 + rng.below(2) as u32 });
    }
    (unreadable, destination, metadata)
}

fn setup(seed: u64, rng: &mut Rng) -> Setup {
    let region_bytes = 4096u64 << rng.below(5);
    // Sometimes 512-byte blocks on both: requests then end on any sector, one short of a
    // region's end too.
    let (source_block, destination_block) = match rng.below(3) {
        0 => (512, 4096),
        1 => (4096, 512),
        _ => (512, 512),
    };
    let block_sectors = u64::from(source_block.max(destination_block)) / 512;
    let len_sectors = (8 + rng.below(40)) * region_bytes / 512 - if rng.odds(3) { region_bytes / 1024 } else { 0 };
    let len_sectors = len_sectors / block_sectors * block_sectors;
    let (unreadable, destination_plan, metadata_plan) = faults(rng, len_sectors, block_sectors);
    let source_plan = FaultPlan { latent_sectors: unreadable.clone(), ..FaultPlan::default() };
    let source = disk(seed, "source", len_sectors, source_block, latency(rng), source_plan);
    source.fill_pattern(seed);
    let destination_len = len_sectors + rng.below(2) * 64;
    let destination = disk(seed, "destination", destination_len, destination_block, latency(rng), destination_plan);
    destination.fill_pattern(!seed);
    let metadata = disk(seed, "metadata", 256, 512 << (3 * rng.below(2)), latency(rng), metadata_plan);
    metadata.fill_pattern(seed ^ 0x55);
    let options = CloneOptions {
        hydration_threshold: 1 + rng.below(4) as u32,
        hydration_batch_size: 1 + rng.below(4) as u32,
        commit_interval_ms: 1 + rng.below(20),
        pause_on_foreground: !rng.odds(4),
        ..CloneOptions::default()
    };
    let switch = Arc::new(CrashSwitch {
        disks: [source.clone(), destination.clone(), metadata.clone()],
        requests: AtomicU64::new(0),
        after_request: AtomicU64::new(u64::MAX),
        crashes: AtomicU64::new(0),
    });
    let (workers, ops, epochs) = (1 + rng.below(4), 10 + rng.below(40), 1 + rng.below(3));
    Setup {
        len_sectors,
        region_bytes,
        block_sectors,
        source,
        destination,
        metadata,
        unreadable,
        options,
        switch,
        workers,
        ops,
        epochs,
    }
}

fn devices(setup: &Setup) -> CloneDevices {
    let watched = |disk: &Arc<MemDisk>| -> Device { CrashCounted::device(disk, &setup.switch) };
    CloneDevices {
        source: watched(&setup.source),
        destination: watched(&setup.destination),
        metadata: watched(&setup.metadata),
    }
}

/// A random range: aligned to blocks, up to about two regions, sometimes whole regions, and
/// sometimes aimed at a region's edge (one block short of it, or one past it, at either end).
fn random_range(setup: &Setup, rng: &mut Rng) -> Range<u64> {
    let region_sectors = setup.region_bytes / 512;
    if rng.odds(5) {
        if let Some(range) = edge_range(setup, rng, region_sectors) {
            return range;
        }
    }
    if rng.odds(4) {
        let regions = setup.len_sectors / region_sectors;
        if regions > 0 {
            let first = rng.below(regions);
            let count = 1 + rng.below(2.min(regions - first));
            return first * region_sectors..(first + count) * region_sectors;
        }
    }
    let blocks = setup.len_sectors / setup.block_sectors;
    let start = rng.below(blocks);
    let len = 1 + rng.below((2 * region_sectors / setup.block_sectors).min(blocks - start));
    start * setup.block_sectors..(start + len) * setup.block_sectors
}

/// A whole region (or two) with one end moved by one block, in or out: the ranges where
/// "covers the region whole" is decided by a single block.
fn edge_range(setup: &Setup, rng: &mut Rng, region_sectors: u64) -> Option<Range<u64>> {
    let regions = setup.len_sectors / region_sectors;
    if regions == 0 || region_sectors <= setup.block_sectors {
        return None;
    }
    let first = rng.below(regions);
    let count = 1 + rng.below(2.min(regions - first));
    let (start, end) = (first * region_sectors, (first + count) * region_sectors);
    let block = setup.block_sectors;
    let (start, end) = match rng.below(4) {
        0 => (start, end - block),
        1 => (start + block, end),
        2 => (start.saturating_sub(block), end),
        _ => (start, (end + block).min(setup.len_sectors)),
    };
    (start < end).then_some(start..end)
}

async fn read_range(clone: &CloneDevice, sectors: &Range<u64>) -> std::io::Result<Vec<u8>> {
    let buf = ReadBuf::with_capacity((sectors.end - sectors.start) as usize * SECTOR);
    let (buf, result) = clone.read(sectors.start, buf).await;
    result.map(|()| buf.to_vec())
}

/// One worker: `ops` random requests with think times, until the disks crash.
async fn worker(setup: Rc<Setup>, clone: CloneDevice, model: Rc<RefCell<Model>>, seed: u64) {
    let mut rng = Rng(seed);
    for _ in 0..setup.ops {
        tokio::time::sleep(to_tokio(Duration::from_micros(rng.below(3000)))).await;
        if model.borrow().crashed() {
            return;
        }
        let sectors = random_range(&setup, &mut rng);
        match rng.below(20) {
            0..=7 => read_op(&clone, &model, &sectors).await,
            8..=14 => write_op(&clone, &model, &sectors, None).await,
            15..=16 => write_op(&clone, &model, &sectors, Some(rng.odds(2))).await,
            _ => flush_op(&clone, &model).await,
        }
    }
}

async fn read_op(clone: &CloneDevice, model: &Rc<RefCell<Model>>, sectors: &Range<u64>) {
    if !model.borrow_mut().lock(sectors, false) {
        return;
    }
    let result = read_range(clone, sectors).await;
    let mut model = model.borrow_mut();
    model.unlock(sectors, false);
    match result {
        Ok(data) => {
            model.counts.reads_checked += 1;
            model.check("read", sectors.start, &data, Model::readable);
        }
        Err(error) => model.error_allowed(format!("read of {sectors:?}: {error}")),
    }
}

/// A write of data (`zeroes` None), or a write-zeroes (`Some(false)`) or deallocate (`Some(true)`).
async fn write_op(clone: &CloneDevice, model: &Rc<RefCell<Model>>, sectors: &Range<u64>, zeroes: Option<bool>) {
    let index = {
        let mut model = model.borrow_mut();
        if !model.lock(sectors, true) {
            return;
        }
        model.next_tag += 1;
        let tag = if zeroes.is_some() { Tag::Zero } else { Tag::Data(model.next_tag) };
        let index = model.writes.len();
        model.writes.push(WriteRecord { tag, acked_at: None });
        (sectors.start..sectors.end).for_each(|s| model.history[s as usize].push(index));
        index
    };
    let tag = model.borrow().writes[index].tag;
    let result = match (zeroes, tag) {
        (None, Tag::Data(n)) => {
            let data: Vec<u8> = (sectors.start..sectors.end).flat_map(|s| data_sector(n, s)).collect();
            clone.write(sectors.start, WriteBuf::from_bytes(Bytes::from(data))).await
        }
        (Some(false), _) => clone.write_zeroes(sectors.start, sectors.end - sectors.start).await,
        _ => clone.deallocate(sectors.start, sectors.end - sectors.start).await,
    };
    let mut model = model.borrow_mut();
    model.unlock(sectors, true);
    match result {
        Ok(()) => {
            model.clock += 1;
            model.writes[index].acked_at = Some(model.clock);
            model.counts.writes_acked += 1;
        }
        Err(error) => model.error_allowed(format!("write of {sectors:?}: {error}")),
    }
}

async fn flush_op(clone: &CloneDevice, model: &Rc<RefCell<Model>>) {
    let started = {
        let mut model = model.borrow_mut();
        model.clock += 1;
        model.clock
    };
    let result = clone.flush().await;
    let mut model = model.borrow_mut();
    match result {
        Ok(()) => {
            model.durable_before = model.durable_before.max(started);
            model.counts.flushes_ok += 1;
        }
        Err(error) => model.error_allowed(format!("flush: {error}")),
    }
}

/// Reads every sector through `clone` and checks it with `allowed`; blocks that cannot be
/// read must be unreadable on the source. Returns the tags seen.
async fn check_all(
    setup: &Setup,
    clone: &CloneDevice,
    model: &Rc<RefCell<Model>>,
    what: &str,
    durable: bool,
) -> Vec<Tag> {
    let mut seen = Vec::new();
    let allowed = if durable { Model::durable } else { Model::readable };
    let chunk = 16 * setup.block_sectors;
    for start in (0..setup.len_sectors).step_by(chunk as usize) {
        let sectors = start..(start + chunk).min(setup.len_sectors);
        if let Ok(data) = read_range(clone, &sectors).await {
            seen.extend(model.borrow_mut().check(what, start, &data, allowed));
            continue;
        }
        // Block by block, to tell the unreadable ones.
        for start in sectors.step_by(setup.block_sectors as usize) {
            let sectors = start..start + setup.block_sectors;
            match read_range(clone, &sectors).await {
                Ok(data) => seen.extend(model.borrow_mut().check(what, start, &data, allowed)),
                Err(error) => {
                    if !setup.unreadable.iter().any(|bad| bad.start < sectors.end && sectors.start < bad.end) {
                        model.borrow_mut().violations.push(format!("{what}: read of {sectors:?} failed: {error}"));
                    }
                    seen.extend(sectors.map(|s| allowed(&model.borrow(), s)[0]));
                }
            }
        }
    }
    seen
}

fn client() -> Client {
    let config = ClientConfig { page_budget: 64, subjob_size_bytes: 64 * 1024, ..ClientConfig::default() };
    Client::start_in_current_system(config).expect("a valid configuration")
}

/// When an epoch's crash comes.
#[derive(Debug, Clone, Copy)]
enum Crash {
    /// At this virtual time from the epoch's start.
    AtUs(u64),
    /// Right after the clone's n-th request (from the epoch's start) completes.
    AfterRequest(u64),
}

/// Runs one epoch of workers and hydration; crashes the disks if `crash` says so.
async fn epoch(
    setup: &Rc<Setup>,
    clone: &CloneDevice,
    model: &Rc<RefCell<Model>>,
    rng: &mut Rng,
    crash: Option<Crash>,
) {
    let hydrator = {
        let clone = clone.clone();
        actix_rt::spawn(async move { clone.run_hydration().await })
    };
    let workers: Vec<_> = (0..setup.workers)
        .map(|w| actix_rt::spawn(worker(setup.clone(), clone.clone(), model.clone(), rng.below(u64::MAX) ^ w)))
        .collect();
    match crash {
        Some(Crash::AtUs(at)) => {
            let switch = setup.switch.clone();
            let crashes = switch.crashes.load(Ordering::SeqCst);
            actix_rt::spawn(async move {
                tokio::time::sleep(to_tokio(Duration::from_micros(at))).await;
                // Unless the epoch ended (and crashed) before its time.
                if switch.crashes.load(Ordering::SeqCst) == crashes {
                    switch.crash();
                }
            });
        }
        Some(Crash::AfterRequest(n)) => {
            let now = setup.switch.requests.load(Ordering::SeqCst);
            setup.switch.after_request.store(now + n, Ordering::SeqCst);
        }
        None => {}
    }
    for worker in workers {
        worker.await.expect("a worker does not panic");
    }
    if crash.is_some() {
        if !model.borrow().crashed() {
            // The workers are done before the crash came: crash now.
            setup.switch.crash();
        }
        while !model.borrow().crashed() {
            tokio::time::sleep(to_tokio(Duration::from_micros(100))).await;
        }
        clone.stop_hydration();
    }
    let end = hydrator.await.expect("hydration does not panic");
    if crash.is_none() {
        let expected_failed = !setup.unreadable.is_empty();
        if !matches!((&end, expected_failed), (HydrationEnd::Complete, _) | (HydrationEnd::GaveUp { .. }, true)) {
            model.borrow_mut().violations.push(format!("hydration ended with {end:?}"));
        }
    }
}

/// Runs seed `seed`; returns the violations. With `crash_after`, the seed runs two epochs and
/// the first crashes right after that many requests.
fn run_seed(seed: u64, crash_after: Option<u64>) -> (Vec<String>, Counts) {
    let mut rng = Rng(mix64(seed));
    let mut setup = setup(seed, &mut rng);
    if crash_after.is_some() {
        setup.epochs = 2;
        setup.ops = setup.ops.min(12);
    }
    let setup = Rc::new(setup);
    let faults = !setup.unreadable.is_empty();
    let len = setup.len_sectors as usize;
    let model = Rc::new(RefCell::new(Model {
        source: setup.source.snapshot(0, setup.len_sectors),
        base: vec![Tag::Source; len],
        history: vec![Vec::new(); len],
        writes: Vec::new(),
        clock: 0,
        durable_before: 0,
        locks: vec![0; len],
        next_tag: seed << 20,
        crashes_before: 0,
        switch: setup.switch.clone(),
        faults,
        violations: Vec::new(),
        counts: Counts::default(),
    }));
    Simulation::block_on(async {
        let mut engine = client();
        // A metadata write fault may fail the first attempts to create (the faults are spent).
        let mut created = None;
        for _ in 0..4 {
            match CloneDevice::create(devices(&setup), setup.region_bytes, engine.clone(), setup.options).await {
                Ok(clone) => created = Some(clone),
                Err(error) if faults => model.borrow_mut().faults &= error.to_string().contains("metadata"),
                Err(error) => panic!("create: {error}"),
            }
            if created.is_some() {
                break;
            }
        }
        let mut clone = created.expect("the faults are spent after three attempts");
        for e in 0..setup.epochs {
            let last = e + 1 == setup.epochs;
            let crash = (!last).then(|| match crash_after {
                Some(n) => Crash::AfterRequest(n),
                None if rng.odds(2) => Crash::AtUs(rng.below(40_000)),
                None => Crash::AfterRequest(1 + rng.below(300)),
            });
            epoch(&setup, &clone, &model, &mut rng, crash).await;
            if last {
                break;
            }
            engine.shutdown().await;
            engine = client();
            [&setup.source, &setup.destination, &setup.metadata].iter().for_each(|d| d.restart());
            model.borrow_mut().crashes_before = setup.switch.crashes.load(Ordering::SeqCst);
            clone = match CloneDevice::open(devices(&setup), engine.clone(), setup.options).await {
                Ok(clone) => clone,
                Err(error) => {
                    model.borrow_mut().violations.push(format!("reopen after crash {e}: {error}"));
                    return;
                }
            };
            model.borrow_mut().counts.reopens += 1;
            let seen = check_all(&setup, &clone, &model, &format!("after crash {e}"), true).await;
            model.borrow_mut().settle(seen);
        }
        final_checks(&setup, &clone, &model).await;
        engine.shutdown().await;
    });
    let mut model = model.borrow_mut();
    (std::mem::take(&mut model.violations), model.counts)
}

async fn final_checks(setup: &Setup, clone: &CloneDevice, model: &Rc<RefCell<Model>>) {
    if let Err(error) = clone.flush().await {
        model.borrow_mut().error_allowed(format!("final flush: {error}"));
        clone.flush().await.expect("a second flush succeeds once the faults are spent");
    }
    let seen = check_all(setup, clone, model, "at the end", false).await;
    let status = clone.status();
    let failed = status.regions_failed.clone();
    model.borrow_mut().counts.regions_given_up += failed.len() as u64;
    if status.regions_hydrated + failed.len() as u64 != status.regions_total {
        model.borrow_mut().violations.push(format!("not every region hydrated at the end: {status:?}"));
    }
    let region_sectors = setup.region_bytes / 512;
    for region in &failed {
        let sectors = region * region_sectors..(region + 1) * region_sectors;
        if !setup.unreadable.iter().any(|bad| bad.start < sectors.end && sectors.start < bad.end) {
            model.borrow_mut().violations.push(format!("region {region} given up on, yet its source reads"));
        }
    }
    let destination = setup.destination.snapshot(0, setup.len_sectors);
    let mut model = model.borrow_mut();
    for (sector, tag) in seen.iter().enumerate() {
        let sector = sector as u64;
        if failed.contains(&(sector / region_sectors)) {
            continue;
        }
        if destination[sector as usize * SECTOR..(sector as usize + 1) * SECTOR] != model.bytes(*tag, sector) {
            model.violations.push(format!("destination sector {sector} is not {tag:?}"));
            break;
        }
    }
}

/// `KCOPYD_CLONE_FAIL_FAST` set (mutation testing, where only "did anything fail" counts): a
/// test stops at its first failing seed instead of naming them all.
fn fail_fast() -> bool {
    std::env::var_os("KCOPYD_CLONE_FAIL_FAST").is_some()
}

#[test]
fn random_workloads_crashes_and_faults_pass_the_oracle() {
    let seeds: u64 = std::env::var("KCOPYD_CLONE_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(SEEDS_DEFAULT);
    let mut failures = Vec::new();
    let mut total = Counts::default();
    for seed in 0..seeds {
        if fail_fast() && !failures.is_empty() {
            break;
        }
        // A seed that panics (an assertion of the clone's) is a failing seed too, named.
        match std::panic::catch_unwind(|| run_seed(seed, None)) {
            Ok((violations, counts)) => {
                total += counts;
                if let Some(first) = violations.first() {
                    failures.push(format!("seed {seed}: {} violations, first: {first}", violations.len()));
                }
            }
            Err(panic) => {
                let message =
                    panic.downcast_ref::<String>().map(String::as_str).or(panic.downcast_ref::<&str>().copied());
                failures.push(format!("seed {seed}: panicked: {}", message.unwrap_or("(no message)")));
            }
        }
    }
    assert!(failures.is_empty(), "{} of {seeds} seeds failed:\n{}", failures.len(), failures.join("\n"));
    eprintln!("{seeds} seeds: {total:?}");
    assert!(
        total.reads_checked > 0 && total.writes_acked > 0 && total.flushes_ok > 0 && total.reopens > 0,
        "{total:?}"
    );
}

/// Seeds whose first epoch crashes after each request in turn: every point between two steps
/// of the clone (a copy's write and the flush, the flush and the metadata write, the metadata
/// write and its flush) is a crash point of some run.
const CRASH_POINT_SEEDS: u64 = 3;
/// Requests of the first epoch tried as crash points, per seed.
const CRASH_POINTS: u64 = 80;

#[test]
fn a_crash_right_after_any_request_loses_no_flushed_write() {
    let mut failures = Vec::new();
    for seed in 0..CRASH_POINT_SEEDS {
        for after in 1..=CRASH_POINTS {
            if fail_fast() && !failures.is_empty() {
                break;
            }
            if let Some(first) = run_seed(1000 + seed, Some(after)).0.first() {
                failures.push(format!("seed {} crashing after request {after}: {first}", 1000 + seed));
            }
        }
    }
    assert!(failures.is_empty(), "{} crash points failed:\n{}", failures.len(), failures.join("\n"));
}
