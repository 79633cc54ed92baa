//! Calibration: measure a block device (a real one, or a simulated one in virtual time) and
//! fit the simulator's timing model to it ([`DiskModel::fit`]).
//!
//! ```text
//!  scratch range (ScratchRange: any BlockDevice, an offset and a length it may overwrite)
//!    ─► fill it (sequential 1 MiB writes: reads must not hit holes)
//!    ─► points: read, write × io size × requests in flight, sequential, each for point_time
//!    ─► mixed: reads and writes at once (do they share one data path?)
//!    ─► random 4 KiB reads, one at a time (does distance cost? a seek)
//!    ─► the engine: copies of 64 KiB … 4 MiB sub-jobs, one at a time, inside the range
//!    ─► DiskModel::fit: bandwidth, path overhead, cost, shared path, seek
//! ```
//!
//! Times are read from tokio's clock in the model's units ([`to_model`]): on a real device
//! that is the wall clock; inside a [`Simulation`](crate::Simulation) it is virtual time, so a
//! simulated disk of a known model can be calibrated and the fit checked against the truth.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use kcopyd_core::{
    BlockDevice, Client, ClientConfig, ConfigError, Device, Flags, Job, PAGE_SIZE, PagePool, ReadBuf, Region,
    SECTOR_SIZE, SubmitError, WriteBuf,
};
use thiserror::Error;
use tokio::time::Instant;

use crate::disk_model::median;
use crate::{DiskModel, Measurement, in_virtual_time, mix64, to_model};

/// The largest I/O size measured.
pub const IO_SIZE_MAX_BYTES: u64 = 64 << 20;
/// The most requests in flight measured.
pub const QUEUE_DEPTH_MAX: usize = 32;
/// The smallest scratch range: room for the largest requests of a point to move on.
pub const SCRATCH_BYTES_MIN: u64 = 16 << 20;
/// Windows a point's time is cut into (see [`window_rate`]).
pub const WINDOWS: usize = 5;
/// The shortest point time: [`WINDOWS`] windows of a millisecond each.
pub const POINT_TIME_MIN: Duration = Duration::from_millis(WINDOWS as u64);
/// The longest point time: a calibration of hours measures nothing more.
pub const POINT_TIME_MAX: Duration = Duration::from_secs(60);
/// The spread of rounds above which a calibration describes a busy machine.
pub const SPREAD_WARNING: f64 = 0.25;
/// Sub-job sizes of the engine's copies: the time around each request is fitted over them.
const ENGINE_SUBJOB_BYTES: [u64; 4] = [64 << 10, 256 << 10, 1 << 20, 4 << 20];
/// Bytes each engine copy moves (at most half the scratch range).
const ENGINE_COPY_BYTES_MAX: u64 = 32 << 20;
/// Engine copies; the median counts.
const ENGINE_COPIES: usize = 5;
/// Completions the median window needs; with fewer the whole point's mean rate counts.
const WINDOW_COMPLETIONS_MIN: u64 = 4;
/// Bytes per write while filling the scratch range.
const FILL_IO_BYTES: u64 = 1 << 20;
/// Writes in flight while filling.
const FILL_DEPTH: usize = 4;

/// What calibration measures.
#[derive(Debug, Clone, PartialEq)]
pub struct CalibrationPlan {
    /// I/O sizes.
    pub io_sizes_bytes: Vec<u64>,
    /// Requests in flight.
    pub queue_depths: Vec<usize>,
    /// How long each point runs (in the model's time: virtual inside a simulation).
    pub point_time: Duration,
    /// Rounds over every point; each point's median counts.
    pub rounds: usize,
}

/// The range of a device that calibration may overwrite.
#[derive(Debug)]
pub struct ScratchRange<D> {
    /// The device.
    pub device: Arc<D>,
    /// Where the range starts.
    pub offset_bytes: u64,
    /// Its length.
    pub len_bytes: u64,
}

/// A calibration's result.
#[derive(Debug, Clone)]
pub struct Calibrated {
    /// The fitted model (with the median measurements it was fitted to).
    pub model: DiskModel,
    /// How much the rounds of a point disagree: `(max − min) / median` of its rates, the
    /// median over points (0 with one round). Above [`SPREAD_WARNING`] something else was
    /// using the machine or the device.
    pub spread: f64,
}

/// What a calibration reports as it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Steps done, the fill included.
    pub done: u64,
    /// Steps in all.
    pub total: u64,
    /// What runs next.
    pub message: String,
}

/// Why a calibration could not run. Nothing is written outside the scratch range.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CalibrateError {
    /// An I/O size that is not whole blocks, too large, or more than half the scratch range.
    #[error(
        "io size {size_bytes}: each size must be a multiple of {block_bytes} bytes, at most {} and at most half \
         the scratch range",
        crate::units::Bytes(IO_SIZE_MAX_BYTES)
    )]
    IoSize {
        /// The size.
        size_bytes: u64,
        /// The unit it must be a multiple of: the device's block, at least a page.
        block_bytes: u64,
    },
    /// No sizes or no depths.
    #[error("nothing to measure: no io sizes or no queue depths")]
    NothingToMeasure,
    /// A queue depth of 0 or above [`QUEUE_DEPTH_MAX`].
    #[error("queue depth {depth}: must be 1 to {QUEUE_DEPTH_MAX}")]
    QueueDepth {
        /// The depth.
        depth: usize,
    },
    /// A point time outside [`POINT_TIME_MIN`]..=[`POINT_TIME_MAX`].
    #[error(
        "point time {point_time:?}: must be from {} ms to {} s: each point is timed in {WINDOWS} windows",
        POINT_TIME_MIN.as_millis(),
        POINT_TIME_MAX.as_secs()
    )]
    PointTime {
        /// The time given.
        point_time: Duration,
    },
    /// The buffer arena could not be mapped.
    #[error("the buffer arena: {source}")]
    Arena {
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The engine's client for the copies could not start.
    #[error("the engine's client: {source}")]
    Client {
        /// Why.
        #[source]
        source: ConfigError,
    },
    /// The engine refused a copy.
    #[error("the engine refused a copy: {source}")]
    Submit {
        /// Why.
        #[source]
        source: SubmitError,
    },
    /// A request on the device failed.
    #[error("{operation} on '{device}': {source}")]
    Io {
        /// What was being done: `read`, `write`, `mixed`, `fill`, `flush`, `copy`.
        operation: &'static str,
        /// The device's name.
        device: String,
        /// The device's error.
        #[source]
        source: io::Error,
    },
}

impl CalibrationPlan {
    /// The plan of a validation given no model (`kcopyd sim validate` without `--model`):
    /// five I/O sizes from 4 KiB to 4 MiB, 1 to 32 requests in flight, 250 ms per point,
    /// three rounds.
    pub fn for_validation() -> CalibrationPlan {
        CalibrationPlan {
            io_sizes_bytes: vec![4 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20],
            queue_depths: vec![1, 4, 16, 32],
            point_time: Duration::from_millis(250),
            rounds: 3,
        }
    }

    /// Checks the plan's sizes, depths and time against the scratch range and the limits.
    ///
    /// # Errors
    /// The first size, depth or time out of bounds.
    pub fn check<D: BlockDevice>(&self, scratch: &ScratchRange<D>) -> Result<(), CalibrateError> {
        let block_bytes = u64::from(scratch.device.geometry().logical_block_size).max(PAGE_SIZE as u64);
        for &size_bytes in &self.io_sizes_bytes {
            if size_bytes == 0
                || size_bytes % block_bytes != 0
                || size_bytes > IO_SIZE_MAX_BYTES
                || size_bytes * 2 > scratch.len_bytes
            {
                return Err(CalibrateError::IoSize { size_bytes, block_bytes });
            }
        }
        if self.io_sizes_bytes.is_empty() || self.queue_depths.is_empty() {
            return Err(CalibrateError::NothingToMeasure);
        }
        if let Some(&depth) = self.queue_depths.iter().find(|&&d| d == 0 || d > QUEUE_DEPTH_MAX) {
            return Err(CalibrateError::QueueDepth { depth });
        }
        check_point_time(self.point_time)
    }
}

/// Refuses a point time that measures nothing (0, or shorter than one millisecond per window)
/// or that would run for hours.
///
/// # Errors
/// [`CalibrateError::PointTime`].
pub fn check_point_time(point_time: Duration) -> Result<(), CalibrateError> {
    if (POINT_TIME_MIN..=POINT_TIME_MAX).contains(&point_time) {
        return Ok(());
    }
    Err(CalibrateError::PointTime { point_time })
}

/// What a request of a point does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
}

/// How a point walks the scratch range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Walk {
    Sequential,
    Random,
}

/// One point: which kinds run at once, how big and how deep.
#[derive(Debug, Clone, Copy)]
struct PointSpec {
    name: &'static str,
    kinds: &'static [Kind],
    io_size_bytes: u64,
    queue_depth: usize,
    walk: Walk,
}

/// Measures every point of `plan` on `scratch` and fits a model; `step` hears of each point
/// before it runs. The model's description names the device and the range; `one_device` is
/// left to the caller (it knows whether the device is a file).
///
/// # Errors
/// A plan out of bounds ([`CalibrationPlan::check`]), or an I/O error on the device.
pub async fn calibrate<D: BlockDevice + 'static>(
    scratch: &ScratchRange<D>,
    plan: &CalibrationPlan,
    step: &mut dyn FnMut(Step),
) -> Result<Calibrated, CalibrateError> {
    plan.check(scratch)?;
    let specs = points(plan);
    let largest = plan.io_sizes_bytes.iter().copied().max().unwrap_or(0);
    let deepest = plan.queue_depths.iter().copied().max().unwrap_or(1);
    // Reads of the deepest point, each in its own buffer, plus one write buffer (and the
    // fill's 1 MiB buffer).
    let pages = (largest.max(FILL_IO_BYTES) as usize).div_ceil(PAGE_SIZE) * (2 * deepest + 2);
    let pool = PagePool::new(pages).map_err(|source| CalibrateError::Arena { source })?;
    let rounds = plan.rounds.max(1);
    let engine = engine_sizes(scratch);
    let total = (rounds * (specs.len() + engine.len()) + 1) as u64;
    let mut done = 0;
    let mut report = |message: String| {
        step(Step { done, total, message });
        done += 1;
    };
    report("fill the scratch range".into());
    fill(scratch, &pool).await?;
    // Rounds over all points, so that a busy spell of the machine falls on one round of a
    // point rather than on all of it; each point's median round counts.
    let mut rounds_of: Vec<Vec<Measurement>> = vec![Vec::new(); specs.len() + engine.len()];
    for round in 1..=rounds {
        for (i, &spec) in specs.iter().enumerate() {
            let (name, size, depth) = (spec.name, crate::units::Bytes(spec.io_size_bytes), spec.queue_depth);
            report(format!("{round}/{rounds} {name} {size} ×{depth}"));
            rounds_of[i].push(measure(scratch, &pool, spec, plan.point_time).await?);
        }
        for (i, &size) in engine.iter().enumerate() {
            report(format!("{round}/{rounds} engine copies {}", crate::units::Bytes(size)));
            rounds_of[specs.len() + i].push(engine_copies(scratch, size).await?);
        }
    }
    step(Step { done: total, total, message: "fit".into() });
    let spread = median(rounds_of.iter().map(|rounds| spread(rounds)).collect());
    let measurements: Vec<Measurement> = rounds_of.into_iter().map(median_round).collect();
    let mut model = DiskModel::fit(&measurements);
    model.description = format!(
        "calibrated on {} ({} scratch bytes from offset {}) by kcopyd sim calibrate; {rounds} rounds, \
         their spread {:.0} %",
        scratch.device.name(),
        scratch.len_bytes,
        scratch.offset_bytes,
        spread * 100.0
    );
    Ok(Calibrated { model, spread })
}

/// The points of a plan, in the order they run.
fn points(plan: &CalibrationPlan) -> Vec<PointSpec> {
    let mut specs = Vec::new();
    for &io_size_bytes in &plan.io_sizes_bytes {
        for &queue_depth in &plan.queue_depths {
            for (name, kinds) in [("read", &[Kind::Read][..]), ("write", &[Kind::Write][..])] {
                specs.push(PointSpec { name, kinds, io_size_bytes, queue_depth, walk: Walk::Sequential });
            }
        }
    }
    let largest = plan.io_sizes_bytes.iter().copied().filter(|&s| s <= 1 << 20).max().unwrap_or(1 << 20);
    // Mixed at one request each way and at the deepest measured depth up to 8 (to compare
    // with the same depth alone).
    let deep = plan.queue_depths.iter().copied().filter(|&d| d <= 8).max().unwrap_or(1);
    let mut mixed_depths = vec![1, deep];
    mixed_depths.dedup();
    for queue_depth in mixed_depths {
        let kinds = &[Kind::Read, Kind::Write];
        specs.push(PointSpec { name: "mixed", kinds, io_size_bytes: largest, queue_depth, walk: Walk::Sequential });
    }
    let smallest = plan.io_sizes_bytes.iter().copied().min().unwrap_or(4096);
    specs.push(PointSpec {
        name: "random-read",
        kinds: &[Kind::Read],
        io_size_bytes: smallest,
        queue_depth: 1,
        walk: Walk::Random,
    });
    specs
}

type Pending<'a> = Pin<Box<dyn Future<Output = (Kind, Instant, io::Result<()>)> + 'a>>;

/// One point as it runs: where each kind's next request goes, and what to write.
struct Point<'a, D> {
    scratch: &'a ScratchRange<D>,
    pool: &'a PagePool,
    spec: PointSpec,
    /// Slots of `io_size_bytes` in each kind's part of the range.
    stream_slots: u64,
    cursors: [u64; 2],
    draws: u64,
    template: WriteBuf,
}

impl<'a, D: BlockDevice> Point<'a, D> {
    async fn new(scratch: &'a ScratchRange<D>, pool: &'a PagePool, spec: PointSpec) -> Point<'a, D> {
        let size = spec.io_size_bytes;
        let halves = spec.kinds.len() as u64;
        let template = {
            let mut buf = ReadBuf::new(pool.alloc(pages_of(size)).await, size as usize);
            let noise: Vec<u8> = (0..size).map(|i| mix64(i / 8) as u8).collect();
            buf.copy_from_slice(&noise);
            buf.freeze()
        };
        let stream_slots = (scratch.len_bytes / size / halves).max(1);
        Point { scratch, pool, spec, stream_slots, cursors: [0; 2], draws: 0, template }
    }

    /// Where the next request of `kind` goes: reads in the first half, writes in the second
    /// when both run.
    fn next_offset(&mut self, kind: Kind) -> u64 {
        let stream = usize::from(kind == Kind::Write && self.spec.kinds.len() == 2);
        let slot = match self.spec.walk {
            Walk::Sequential => {
                let slot = self.cursors[stream] % self.stream_slots;
                self.cursors[stream] += 1;
                slot
            }
            Walk::Random => {
                self.draws += 1;
                mix64(self.draws) % self.stream_slots
            }
        };
        self.scratch.offset_bytes + (stream as u64 * self.stream_slots + slot) * self.spec.io_size_bytes
    }

    /// Issues the next request of `kind`.
    async fn issue(&mut self, kind: Kind) -> Pending<'a> {
        let at = self.next_offset(kind) / SECTOR_SIZE as u64;
        let scratch: &'a ScratchRange<D> = self.scratch;
        let device: &'a D = &scratch.device;
        let size = self.spec.io_size_bytes;
        let started = Instant::now();
        match kind {
            Kind::Read => {
                let buf = ReadBuf::new(self.pool.alloc(pages_of(size)).await, size as usize);
                Box::pin(async move { (kind, started, device.read(at, buf).await.1) })
            }
            Kind::Write => {
                let write = self.template.clone();
                Box::pin(async move { (kind, started, device.write(at, write).await) })
            }
        }
    }
}

/// Pages of a buffer of `size` bytes.
fn pages_of(size: u64) -> usize {
    usize::try_from(size).expect("io size fits").div_ceil(PAGE_SIZE)
}

/// Runs one point on the scratch range: `queue_depth` requests of each kind in flight for
/// `time`.
async fn measure<D: BlockDevice>(
    scratch: &ScratchRange<D>,
    pool: &PagePool,
    spec: PointSpec,
    time: Duration,
) -> Result<Measurement, CalibrateError> {
    let mut point = Point::new(scratch, pool, spec).await;
    let mut in_flight = FuturesUnordered::new();
    let began = Instant::now();
    for &kind in spec.kinds {
        for _ in 0..spec.queue_depth {
            in_flight.push(point.issue(kind).await);
        }
    }
    let mut latencies_us = Vec::new();
    let mut completed_at = Vec::new();
    let mut failure = None;
    while let Some((kind, started, result)) = in_flight.next().await {
        if let Err(source) = result {
            failure.get_or_insert(source);
            continue;
        }
        latencies_us.push(to_model(started.elapsed()).as_micros() as u64);
        completed_at.push(to_model(began.elapsed()));
        if to_model(began.elapsed()) < time && failure.is_none() {
            in_flight.push(point.issue(kind).await);
        }
    }
    if let Some(source) = failure {
        return Err(CalibrateError::Io { operation: spec.name, device: scratch.device.name().to_owned(), source });
    }
    let iops = window_rate(&completed_at, time);
    latencies_us.sort_unstable();
    Ok(Measurement {
        kind: spec.name.into(),
        io_size_bytes: spec.io_size_bytes,
        queue_depth: spec.queue_depth as u32,
        iops,
        bandwidth_bytes_per_s: iops * spec.io_size_bytes as f64,
        latency_us_p50: latencies_us.get(latencies_us.len() / 2).copied().unwrap_or(0) as f64,
    })
}

/// Completions per second: the median over [`WINDOWS`] equal windows of the point's
/// `time`, so that a stall of the machine (other work on the CPUs) in one window does not
/// count. Requests drained after the point's time are left out.
///
/// A window's rate is its completions over the time from the last completion before it (the
/// point's start for the first) to its own last completion: a count of whole completions in
/// a fixed window would round the rate to a multiple of `1 / window` (3 or 4 completions of
/// 2.6 ms each in a 10 ms window: 300 or 400 per second, where the truth is 381).
///
/// Worked example: 100 completions evenly spread over each of four windows of 10 ms (one
/// every 0.1 ms from the window's start) and 20 in the fifth (one every 0.5 ms): the windows
/// have 10 101, 10 000, 10 000, 10 000 and 2 083 per second, the median 10 000 (the mean
/// count would say 8 400). With 3, 3, 0, 0, 0 the median window has too few completions to
/// mean anything: the mean, 120 per second; with one completion at 70 ms, after a point of
/// 50 ms, 1 / 70 ms.
pub fn window_rate(completed_at: &[Duration], time: Duration) -> f64 {
    let window = time / WINDOWS as u32;
    if window.is_zero() {
        return 0.0;
    }
    let mut counts = [0u64; WINDOWS];
    let mut last_at = [None::<Duration>; WINDOWS];
    for &at in completed_at {
        let index = (at.as_nanos() / window.as_nanos()) as usize;
        if let Some(count) = counts.get_mut(index) {
            *count += 1;
            last_at[index] = Some(last_at[index].map_or(at, |last| last.max(at)));
        }
    }
    let mut sorted = counts;
    sorted.sort_unstable();
    if sorted[WINDOWS / 2] < WINDOW_COMPLETIONS_MIN {
        // Too few completions for windows to mean anything (a short point, large requests):
        // every completion, drained ones too, over the whole time.
        let end = completed_at.iter().copied().max().unwrap_or_default().max(window * WINDOWS as u32);
        return completed_at.len() as f64 / end.as_secs_f64();
    }
    let mut before = Duration::ZERO;
    let mut rates = [0.0; WINDOWS];
    for (rate, (&count, last)) in rates.iter_mut().zip(counts.iter().zip(last_at)) {
        if let Some(last) = last {
            let span = last.saturating_sub(before);
            *rate =
                if span.is_zero() { count as f64 / window.as_secs_f64() } else { count as f64 / span.as_secs_f64() };
            before = last;
        }
    }
    rates.sort_by(f64::total_cmp);
    rates[WINDOWS / 2]
}

/// The sub-job sizes of the engine's copies that fit the scratch range (two sub-jobs at least).
fn engine_sizes<D>(scratch: &ScratchRange<D>) -> Vec<u64> {
    let room = (scratch.len_bytes / 2).min(ENGINE_COPY_BYTES_MAX);
    ENGINE_SUBJOB_BYTES.into_iter().filter(|&size| room >= 2 * size).collect()
}

/// Copies the first part of the scratch range to the next with the engine, one `size`
/// sub-job at a time: [`ENGINE_COPIES`] copies of all the sub-jobs that fit and as many of
/// half of them, alternately. The measurement's `latency_us_p50` is the difference of their
/// median times over the difference of their sub-jobs: what is paid once per copy (starting
/// the job, completing it, and on a spinning disk the seek back to the copy's start) cancels
/// out. Timed over the whole copy alone, a disk of 8 ms full stroke adds 5.7 ms twice to each
/// copy of eight 4 MiB sub-jobs, 1.4 ms a sub-job that the fit took for the engine's time.
async fn engine_copies<D: BlockDevice + 'static>(
    scratch: &ScratchRange<D>,
    size: u64,
) -> Result<Measurement, CalibrateError> {
    let subjobs = (scratch.len_bytes / 2).min(ENGINE_COPY_BYTES_MAX) / size;
    let half = subjobs / 2;
    assert!(half >= 1, "engine_sizes keeps sizes with two sub-jobs at least");
    let config = ClientConfig {
        subjob_size_bytes: size as usize,
        subjobs_in_flight: 1,
        page_budget: (4 * size as usize).div_ceil(PAGE_SIZE),
        ..ClientConfig::default()
    };
    // In virtual time the client's actors run on this thread's System, under its clock.
    let client = if in_virtual_time() { Client::start_in_current_system(config) } else { Client::new(config) }
        .map_err(|source| CalibrateError::Client { source })?;
    let (mut whole_us, mut half_us) = (Vec::new(), Vec::new());
    // The half copy is the middle of the whole one: each starts as far from where the other
    // ended (three quarters of the whole), so a seek back costs both the same.
    let middle = (subjobs - half) / 2 * size;
    for _ in 0..ENGINE_COPIES {
        whole_us.push(engine_copy(scratch, &client, 0, subjobs * size, subjobs * size).await?);
        half_us.push(engine_copy(scratch, &client, middle, subjobs * size, half * size).await?);
    }
    client.shutdown().await;
    let latency_us_p50 = ((median(whole_us) - median(half_us)) / (subjobs - half) as f64).max(1.0);
    Ok(Measurement {
        kind: "copy".into(),
        io_size_bytes: size,
        queue_depth: 1,
        iops: 1e6 / latency_us_p50,
        bandwidth_bytes_per_s: size as f64 * 1e6 / latency_us_p50,
        latency_us_p50,
    })
}

/// Copies `len_bytes` from `offset_bytes` into the scratch range to `distance_bytes` further
/// on; the time it took, in microseconds.
async fn engine_copy<D: BlockDevice + 'static>(
    scratch: &ScratchRange<D>,
    client: &Client,
    offset_bytes: u64,
    distance_bytes: u64,
    len_bytes: u64,
) -> Result<f64, CalibrateError> {
    let device: Device = scratch.device.clone();
    let start = (scratch.offset_bytes + offset_bytes) / SECTOR_SIZE as u64;
    let (target, len) = (start + distance_bytes / SECTOR_SIZE as u64, len_bytes / SECTOR_SIZE as u64);
    let job = Job::copy(
        Region::new(device.clone(), start, len),
        vec![Region::new(device.clone(), target, len)],
        Flags::empty(),
    );
    let began = Instant::now();
    let handle = client.submit(job).await.map_err(|source| CalibrateError::Submit { source })?;
    let outcome = handle.await;
    let took_us = to_model(began.elapsed()).as_secs_f64() * 1e6;
    if !outcome.is_ok() {
        let source = io::Error::other(format!("the engine's copy failed: {outcome:?}"));
        return Err(CalibrateError::Io { operation: "copy", device: device.name().to_owned(), source });
    }
    Ok(took_us)
}

/// Fills the scratch range with sequential 1 MiB writes, [`FILL_DEPTH`] in flight.
async fn fill<D: BlockDevice>(scratch: &ScratchRange<D>, pool: &PagePool) -> Result<(), CalibrateError> {
    let size = FILL_IO_BYTES.min(scratch.len_bytes);
    let template = ReadBuf::new(pool.alloc(pages_of(size)).await, size as usize).freeze();
    let device = &*scratch.device;
    let failed = |operation, source| CalibrateError::Io { operation, device: device.name().to_owned(), source };
    let mut in_flight = FuturesUnordered::new();
    let mut offset = scratch.offset_bytes;
    let end = scratch.offset_bytes + scratch.len_bytes;
    loop {
        while in_flight.len() < FILL_DEPTH && offset < end {
            let len = size.min(end - offset) as usize;
            in_flight.push(device.write(offset / SECTOR_SIZE as u64, template.slice(0..len)));
            offset += len as u64;
        }
        match in_flight.next().await {
            Some(Ok(())) => {}
            Some(Err(source)) => return Err(failed("fill", source)),
            None => break,
        }
    }
    device.flush().await.map_err(|source| failed("flush", source))
}

/// `(max − min) / median` of the rates of one point's rounds.
///
/// Worked example: 900, 1000 and 1200 requests per second: 300 / 1000 = 30 %.
fn spread(rounds: &[Measurement]) -> f64 {
    let rates: Vec<f64> = rounds.iter().map(|m| m.iops).collect();
    let middle = median(rates.clone());
    let (low, high) = rates.iter().fold((f64::INFINITY, 0.0f64), |(l, h), &r| (l.min(r), h.max(r)));
    if middle > 0.0 { (high - low) / middle } else { 0.0 }
}

/// One point's rounds as one measurement: the median of each figure.
fn median_round(rounds: Vec<Measurement>) -> Measurement {
    let figure = |f: fn(&Measurement) -> f64| median(rounds.iter().map(f).collect());
    Measurement {
        iops: figure(|m| m.iops),
        bandwidth_bytes_per_s: figure(|m| m.bandwidth_bytes_per_s),
        latency_us_p50: figure(|m| m.latency_us_p50),
        ..rounds[0].clone()
    }
}

/// Why a model file could not be read.
#[derive(Debug, Error)]
pub enum ModelFileError {
    /// The file could not be read.
    #[error("cannot be read: {source}")]
    Read {
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The file is not a disk model (unknown keys, wrong types, not TOML).
    #[error("{problem}")]
    Parse {
        /// What the TOML reader said, on one line.
        problem: String,
    },
}

/// A table of a model's measurements (one row per kind, I/O size and depth: MB/s, IOPS,
/// median latency) and a line of the fitted model, for people.
pub fn model_table(model: &DiskModel) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ =
        writeln!(out, "{:<12} {:>8} {:>6} {:>12} {:>10} {:>10}", "kind", "io size", "depth", "MB/s", "IOPS", "p50 µs");
    for m in &model.measurements {
        let _ = writeln!(
            out,
            "{:<12} {:>8} {:>6} {:>12.1} {:>10.0} {:>10.0}",
            m.kind,
            crate::units::Bytes(m.io_size_bytes).to_string(),
            m.queue_depth,
            m.bandwidth_bytes_per_s / 1e6,
            m.iops,
            m.latency_us_p50
        );
    }
    let l = &model.latency;
    let _ = writeln!(
        out,
        "model: reads {:.0} MB/s, cost {} µs, path overhead {} µs; writes {:.0} MB/s, cost {} µs, path overhead {} µs; \
         cost {:+} µs per MiB; reads and writes {}; seek {}",
        l.read.bandwidth_bytes_per_s as f64 / 1e6,
        l.read.cost_us,
        l.path.read_overhead_us,
        l.write.bandwidth_bytes_per_s as f64 / 1e6,
        l.write.cost_us,
        l.path.write_overhead_us,
        l.path.cost_us_per_mib,
        if l.path.shared { "share one data path" } else { "have a path each" },
        if l.path.seek.is_zero() {
            "none".to_owned()
        } else {
            format!("{} µs full stroke", l.path.seek.full_stroke_us)
        },
    );
    out
}

/// The model as TOML, with a header saying what it is.
pub fn model_toml(model: &DiskModel) -> String {
    let body = toml::to_string(model).expect("a disk model serializes");
    format!("# kcopyd disk model: load it with `kcopyd sim validate --model` or in a scenario.\n{body}")
}

/// Reads a model file written by [`model_toml`].
///
/// # Errors
/// The file cannot be read or is not a disk model.
pub fn read_model(path: &std::path::Path) -> Result<DiskModel, ModelFileError> {
    let body = std::fs::read_to_string(path).map_err(|source| ModelFileError::Read { source })?;
    toml::from_str(&body)
        .map_err(|error| ModelFileError::Parse { problem: error.to_string().trim_end().replace('\n', " ") })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk_model::point;

    #[test]
    fn the_model_table_has_a_row_per_measurement_and_the_fit() {
        let measurements = vec![point("read", 4096, 1, 10_000.0, 95.0), point("write", 1 << 20, 4, 100.0, 4000.0)];
        let model = DiskModel { measurements, ..DiskModel::default() };
        let table = model_table(&model);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert!(lines[0].starts_with("kind") && lines[0].ends_with("p50 µs"), "{table}");
        assert!(lines[1].starts_with("read") && lines[1].contains("4 KiB") && lines[1].contains("41.0"), "{table}");
        assert!(lines[2].contains("1 MiB") && lines[2].contains("104.9") && lines[2].ends_with("4000"), "{table}");
        assert!(lines[3].starts_with("model: reads ") && lines[3].contains("seek"), "{table}");
    }

    #[test]
    fn a_model_file_reads_back_and_a_foreign_one_is_refused_on_one_line() {
        let path = std::env::temp_dir().join(format!("kcopyd-sim-model-{}.toml", std::process::id()));
        let model = DiskModel::default();
        std::fs::write(&path, model_toml(&model)).unwrap();
        assert_eq!(read_model(&path).unwrap().description, model.description);
        std::fs::write(&path, "unknown = 1\n[latency]\n").unwrap();
        let refused = read_model(&path).unwrap_err();
        assert!(matches!(&refused, ModelFileError::Parse { problem } if !problem.contains('\n')), "{refused}");
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(read_model(&path), Err(ModelFileError::Read { .. })));
    }

    #[test]
    fn the_spread_worked_example_holds() {
        let rounds = [900.0, 1000.0, 1200.0].map(|iops| point("read", 4096, 2, iops, 10.0)).to_vec();
        assert!((spread(&rounds) - 0.3).abs() < 1e-9);
        assert_eq!(spread(&rounds[..1]), 0.0);
    }

    #[test]
    fn rounds_of_a_point_give_their_median() {
        let rounds =
            [(100.0, 30.0), (300.0, 10.0), (200.0, 20.0)].map(|(iops, p50)| point("read", 4096, 2, iops, p50)).to_vec();
        let one = median_round(rounds);
        assert_eq!((one.kind.as_str(), one.io_size_bytes, one.queue_depth), ("read", 4096, 2));
        assert_eq!((one.iops, one.bandwidth_bytes_per_s, one.latency_us_p50), (200.0, 200.0 * 4096.0, 20.0));
    }

    #[test]
    fn the_window_rate_worked_example_holds() {
        let window = Duration::from_millis(10);
        let mut completed_at = Vec::new();
        for (w, count) in [100u32, 100, 100, 100, 20].into_iter().enumerate() {
            completed_at.extend((0..count).map(|i| window * w as u32 + window * i / count));
        }
        completed_at.push(window * 7); // drained after the point's time: left out
        assert!((window_rate(&completed_at, window * 5) - 10_000.0).abs() < 1e-6);
        // Not a multiple of 1 / window: one completion every 2.625 ms, 3 or 4 a window.
        let every = Duration::from_micros(2625);
        let steady: Vec<Duration> = (1..=19).map(|i| every * i).collect();
        assert!((window_rate(&steady, window * 5) - 1e6 / 2625.0).abs() < 1e-6);
        let sparse: Vec<Duration> = (0..6).map(|i| window * (i / 3) + window / 2).collect();
        assert!((window_rate(&sparse, window * 5) - 120.0).abs() < 1e-6);
        assert!((window_rate(&[window * 7], window * 5) - 1.0 / 0.07).abs() < 1e-6);
    }
}
