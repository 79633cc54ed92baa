//! `kcopyd sim calibrate`: measure a real device through O_DIRECT and fit the simulator's
//! timing model to it.
//!
//! ```text
//!  scratch range (a file created here, or --scratch-* of an existing device)
//!    ─► fill it (sequential 1 MiB writes: reads must not hit holes)
//!    ─► points: read, write × io size × requests in flight, sequential, each for --point-time
//!    ─► mixed: reads and writes at once (do they share one data path?)
//!    ─► random 4 KiB reads, one at a time (does distance cost? a seek)
//!    ─► the engine: copies of 64 KiB … 4 MiB sub-jobs, one at a time, inside the range
//!    ─► fit: bandwidth, path overhead, cost, shared path, seek ─► DiskModel (TOML)
//! ```
//!
//! The fit follows the model's structure (kcopyd-sim `timing.rs`): at the deepest queue a
//! request holds the data path for `overhead + size / bandwidth`, so the time per request
//! there gives the overhead once the bandwidth is known from the largest requests; alone, one
//! request takes `cost + overhead + size / bandwidth`, which gives the cost. The simulated
//! engine spends no time between a completion and the request it leads to; the real one
//! does (actor messages, waking threads), and copies with one sub-job in flight show how
//! much. That time is not constant: on a virtio disk it shrinks with the sub-job's size and
//! turns negative at 1 MiB and more (a copy's large requests go faster than the same requests
//! measured alone). It is fitted as a line over the sub-job sizes and added to the requests'
//! cost, half each: a constant, and `path.cost_us_per_mib` per MiB of the request.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use kcopyd_core::{
    BlockDevice, Client, ClientConfig, Device, Flags, Job, PAGE_SIZE, PagePool, ReadBuf, Region, SECTOR_SIZE, WriteBuf,
};
use kcopyd_os::{OpenOptions, OsDevice};
use kcopyd_sim::{DiskModel, IoModel, Latency, Measurement, PathModel, SeekModel, mix64};
use std::future::Future;

use crate::cli::CalibrateArgs;
use crate::error::{CliError, Status, open_reason};
use crate::progress::{self, Interrupts};
use crate::size::Bytes;

/// The largest I/O size measured.
pub const IO_SIZE_MAX_BYTES: u64 = 64 << 20;
/// The most requests in flight measured.
pub const QUEUE_DEPTH_MAX: usize = 32;
/// The smallest scratch range: room for the largest requests of a point to move on.
pub const SCRATCH_BYTES_MIN: u64 = 16 << 20;
/// Sub-job sizes of the engine's copies: the time around each request is fitted over them.
const ENGINE_SUB_JOB_BYTES: [u64; 4] = [64 << 10, 256 << 10, 1 << 20, 4 << 20];
/// Bytes each engine copy moves (at most half the scratch range).
const ENGINE_COPY_BYTES_MAX: u64 = 32 << 20;
/// Engine copies; the median counts.
const ENGINE_COPIES: usize = 5;
/// Windows a point's time is cut into (see [`window_rate`]).
const WINDOWS: usize = 5;
/// Completions the median window needs; with fewer the whole point's mean rate counts.
const WINDOW_COMPLETIONS_MIN: u64 = 4;
/// Points with requests this large or larger…
const SATURATING_IO_BYTES: u64 = 1 << 20;
/// …and this many in flight or more saturate the data path: their bandwidth is the path's.
const SATURATING_DEPTH: u32 = 4;
/// Bytes per write while filling the scratch range.
const FILL_IO_BYTES: u64 = 1 << 20;
/// Mixed reads and writes are at least this much slower than alone (sum of the shares of
/// each alone-bandwidth they reach below this) when they share one data path.
const SHARED_SHARE_MAX: f64 = 1.5;
/// Random one-at-a-time reads slower than sequential ones by this factor reveal a seek.
const SEEK_FACTOR_MIN: f64 = 1.5;
/// The mean of `√|u - v|` for `u`, `v` uniform on [0, 1]: the mean arm travel of random
/// requests as a share of a full stroke, in the seek model's square-root law.
const MEAN_SQRT_DISTANCE: f64 = 8.0 / 15.0;

/// What calibration measures, and where.
#[derive(Debug, Clone)]
pub struct Plan {
    /// I/O sizes.
    pub io_sizes_bytes: Vec<u64>,
    /// Requests in flight.
    pub queue_depths: Vec<usize>,
    /// How long each point runs.
    pub point_time: Duration,
    /// Rounds over every point; each point's median counts.
    pub rounds: usize,
    /// Show a progress bar.
    pub bars: bool,
}

/// The range calibration may overwrite, and the file it created, removed when dropped
/// unless kept.
#[derive(Debug)]
pub struct Scratch {
    /// The device.
    pub device: Arc<OsDevice>,
    /// Where the range starts.
    pub offset_bytes: u64,
    /// Its length.
    pub len_bytes: u64,
    /// The file created for it, if any.
    created: Option<PathBuf>,
    keep: bool,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let (Some(path), false) = (&self.created, self.keep) {
            let _ = fs::remove_file(path);
            progress::forget_created(std::slice::from_ref(path));
        }
    }
}

impl Scratch {
    /// Opens the scratch range: a new file of `size_bytes` at `path` if nothing is there,
    /// else `scratch_length_bytes` of the existing device from `scratch_offset_bytes`.
    ///
    /// # Errors
    /// An existing device without a scratch length, a range off the device or misaligned, a
    /// size too small, or a failed open.
    pub fn open(
        path: &Path,
        size_bytes: u64,
        scratch_offset_bytes: u64,
        scratch_length_bytes: Option<u64>,
        keep: bool,
    ) -> Result<Scratch, CliError> {
        let text = path.display().to_string();
        let exists = fs::symlink_metadata(path).is_ok();
        let open_error =
            |source| CliError::Open { what: "DEVICE", text: text.clone(), reason: open_reason(&source, None), source };
        let options = OpenOptions { write: true, queue_depth: QUEUE_DEPTH_MAX * 2, ..OpenOptions::default() };
        let (device, offset_bytes, len_bytes, created) = if exists {
            let Some(len_bytes) = scratch_length_bytes else {
                return Err(CliError::argument(
                    "DEVICE",
                    &text,
                    "exists: calibration writes over what it measures; name the bytes it may overwrite with \
                     --scratch-length (and --scratch-offset), or give a path that does not exist",
                ));
            };
            let device = OsDevice::open(path, &options).map_err(open_error)?;
            (device, scratch_offset_bytes, len_bytes, None)
        } else {
            if scratch_length_bytes.is_some() || scratch_offset_bytes != 0 {
                return Err(CliError::argument(
                    "--scratch-length",
                    &text,
                    "applies to an existing device; a new file is created with --size",
                ));
            }
            if size_bytes % SECTOR_SIZE as u64 != 0 {
                return Err(CliError::argument("--size", size_bytes.to_string(), "not a multiple of 512 bytes"));
            }
            let options = OpenOptions { create_len: Some(size_bytes), ..options };
            // Removed also if a signal quits the command at once (unless kept).
            let creating = (!keep).then(|| progress::CreatedGuard::creating(path));
            let opened = OsDevice::open(path, &options);
            drop(creating);
            // Created (or half-created) here: removed on every way out unless kept.
            let created = Some(path.to_path_buf());
            let device = match opened {
                Ok(device) => device,
                Err(source) => {
                    let _ = fs::remove_file(path);
                    return Err(open_error(source));
                }
            };
            (device, 0, size_bytes, created)
        };
        let scratch = Scratch { device: Arc::new(device), offset_bytes, len_bytes, created, keep };
        scratch.check(&text)?;
        Ok(scratch)
    }

    fn check(&self, text: &str) -> Result<(), CliError> {
        let geometry = self.device.geometry();
        let block = u64::from(geometry.logical_block_size);
        let device_bytes = geometry.len_sectors * SECTOR_SIZE as u64;
        let what = if self.created.is_some() { "--size" } else { "--scratch-length" };
        if self.len_bytes < SCRATCH_BYTES_MIN {
            return Err(CliError::argument(
                what,
                self.len_bytes.to_string(),
                format!("less than {}", Bytes(SCRATCH_BYTES_MIN)),
            ));
        }
        if self.offset_bytes % block != 0 || self.len_bytes % block != 0 {
            return Err(CliError::argument(
                "--scratch-offset",
                self.offset_bytes.to_string(),
                format!("the scratch range must be aligned to the {block}-byte logical block of '{text}'"),
            ));
        }
        if self.offset_bytes.checked_add(self.len_bytes).is_none_or(|end| end > device_bytes) {
            return Err(CliError::argument(
                what,
                self.len_bytes.to_string(),
                format!("the scratch range runs past the end of '{text}' at {device_bytes} bytes"),
            ));
        }
        Ok(())
    }
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

/// What one kind did during a point.
#[derive(Debug, Default)]
struct Tally {
    latencies_us: Vec<u64>,
}

type Pending<'a> = Pin<Box<dyn Future<Output = (Kind, Instant, io::Result<()>)> + 'a>>;

/// Runs one point on the scratch range: `queue_depth` requests of each kind in flight (reads
/// in the first half, writes in the second when both run) for `time`.
async fn measure(scratch: &Scratch, pool: &PagePool, spec: PointSpec, time: Duration) -> Result<Measurement, CliError> {
    let device = &*scratch.device;
    let size = spec.io_size_bytes;
    let slots = scratch.len_bytes / size;
    let halves = spec.kinds.len() as u64;
    let stream_slots = (slots / halves).max(1);
    let pages = usize::try_from(size).expect("io size fits").div_ceil(PAGE_SIZE);
    let template = {
        let mut buf = ReadBuf::new(pool.alloc(pages).await, size as usize);
        let noise: Vec<u8> = (0..size).map(|i| mix64(i / 8) as u8).collect();
        buf.copy_from_slice(&noise);
        buf.freeze()
    };
    let mut cursors = [0u64; 2];
    let mut draws = 0u64;
    let mut next_offset = |kind: Kind| -> u64 {
        let stream = usize::from(kind == Kind::Write && halves == 2);
        let slot = match spec.walk {
            Walk::Sequential => {
                let slot = cursors[stream] % stream_slots;
                cursors[stream] += 1;
                slot
            }
            Walk::Random => {
                draws += 1;
                mix64(draws) % stream_slots
            }
        };
        scratch.offset_bytes + (stream as u64 * stream_slots + slot) * size
    };
    let issue = |kind: Kind, offset: u64, buf: Option<ReadBuf>, write: &WriteBuf| -> Pending<'_> {
        let at = offset / SECTOR_SIZE as u64;
        let started = Instant::now();
        match kind {
            Kind::Read => {
                let buf = buf.expect("a read has a buffer");
                Box::pin(async move { (kind, started, device.read(at, buf).await.1) })
            }
            Kind::Write => {
                let write = write.clone();
                Box::pin(async move { (kind, started, device.write(at, write).await) })
            }
        }
    };
    let mut in_flight = FuturesUnordered::new();
    let began = Instant::now();
    for &kind in spec.kinds {
        for _ in 0..spec.queue_depth {
            let buf = match kind {
                Kind::Read => Some(ReadBuf::new(pool.alloc(pages).await, size as usize)),
                Kind::Write => None,
            };
            in_flight.push(issue(kind, next_offset(kind), buf, &template));
        }
    }
    let mut tallies = [Tally::default(), Tally::default()];
    let mut completed_at = Vec::new();
    let mut failure = None;
    while let Some((kind, started, result)) = in_flight.next().await {
        let tally = &mut tallies[usize::from(kind == Kind::Write)];
        if let Err(source) = result {
            failure.get_or_insert(source);
            continue;
        }
        tally.latencies_us.push(started.elapsed().as_micros() as u64);
        completed_at.push(began.elapsed());
        if began.elapsed() < time && failure.is_none() {
            let buf = match kind {
                Kind::Read => Some(ReadBuf::new(pool.alloc(pages).await, size as usize)),
                Kind::Write => None,
            };
            in_flight.push(issue(kind, next_offset(kind), buf, &template));
        }
    }
    if let Some(source) = failure {
        return Err(CliError::Io { operation: spec.name, path: device.path().display().to_string(), source });
    }
    let iops = window_rate(&completed_at, time);
    let mut latencies: Vec<u64> = tallies.into_iter().flat_map(|t| t.latencies_us).collect();
    latencies.sort_unstable();
    Ok(Measurement {
        kind: spec.name.into(),
        io_size_bytes: size,
        queue_depth: spec.queue_depth as u32,
        iops,
        bandwidth_bytes_per_s: iops * size as f64,
        latency_us_p50: latencies.get(latencies.len() / 2).copied().unwrap_or(0) as f64,
    })
}

/// Completions per second: the median over [`WINDOWS`] equal windows of the point's
/// `time`, so that a stall of the machine (other work on the CPUs) in one window does not
/// count. Requests drained after the point's time are left out.
///
/// Worked example: 100 completions in each of four windows of 10 ms and 20 in the fifth: the
/// median window has 100, 10 000 per second (the mean would say 8 400). With 3, 3, 0, 0, 0
/// the median window has too few: the mean, 120 per second; with one completion at 70 ms,
/// after a point of 50 ms, 1 / 70 ms.
fn window_rate(completed_at: &[Duration], time: Duration) -> f64 {
    let window = time / WINDOWS as u32;
    if window.is_zero() {
        return 0.0;
    }
    let mut counts = [0u64; WINDOWS];
    for at in completed_at {
        let index = (at.as_nanos() / window.as_nanos()) as usize;
        if let Some(count) = counts.get_mut(index) {
            *count += 1;
        }
    }
    counts.sort_unstable();
    if counts[WINDOWS / 2] < WINDOW_COMPLETIONS_MIN {
        // Too few completions for windows to mean anything (a short point, large requests):
        // every completion, drained ones too, over the whole time.
        let end = completed_at.iter().copied().max().unwrap_or_default().max(window * WINDOWS as u32);
        return completed_at.len() as f64 / end.as_secs_f64();
    }
    counts[WINDOWS / 2] as f64 / window.as_secs_f64()
}

/// The sub-job sizes of the engine's copies that fit the scratch range (two sub-jobs at least).
fn engine_sizes(scratch: &Scratch) -> Vec<u64> {
    let room = (scratch.len_bytes / 2).min(ENGINE_COPY_BYTES_MAX);
    ENGINE_SUB_JOB_BYTES.into_iter().filter(|&size| room >= 2 * size).collect()
}

/// Copies the first part of the scratch range to the next with the engine, one `size`
/// sub-job at a time, [`ENGINE_COPIES`] times; the median time per sub-job is the
/// measurement's `latency_us_p50`.
async fn engine_copies(scratch: &Scratch, size: u64) -> Result<Measurement, CliError> {
    let len_bytes = (scratch.len_bytes / 2).min(ENGINE_COPY_BYTES_MAX) / size * size;
    let config = ClientConfig {
        sub_job_size_bytes: size as usize,
        subjobs_in_flight: 1,
        page_budget: (4 * size as usize).div_ceil(PAGE_SIZE),
        ..ClientConfig::default()
    };
    let client = Client::new(config).map_err(|source| CliError::Config { option: "calibrate", source })?;
    let device: Device = scratch.device.clone();
    let (start, len) = (scratch.offset_bytes / SECTOR_SIZE as u64, len_bytes / SECTOR_SIZE as u64);
    let path = scratch.device.path().display().to_string();
    let mut per_subjob_us = Vec::new();
    for _ in 0..ENGINE_COPIES {
        let job = Job::copy(
            Region::new(device.clone(), start, len),
            vec![Region::new(device.clone(), start + len, len)],
            Flags::empty(),
        );
        let began = Instant::now();
        let handle = client.submit(job).await.map_err(|source| CliError::Submit { source })?;
        let outcome = handle.await;
        let seconds = began.elapsed().as_secs_f64();
        if !outcome.is_ok() {
            let source = std::io::Error::other(format!("the engine's copy failed: {outcome:?}"));
            return Err(CliError::Io { operation: "copy", path, source });
        }
        per_subjob_us.push(seconds * 1e6 / (len_bytes / size) as f64);
    }
    client.shutdown().await;
    let latency_us_p50 = median(per_subjob_us);
    Ok(Measurement {
        kind: "copy".into(),
        io_size_bytes: size,
        queue_depth: 1,
        iops: 1e6 / latency_us_p50,
        bandwidth_bytes_per_s: size as f64 * 1e6 / latency_us_p50,
        latency_us_p50,
    })
}

/// Fills the scratch range with sequential 1 MiB writes, 4 in flight.
async fn fill(scratch: &Scratch, pool: &PagePool) -> Result<(), CliError> {
    let size = FILL_IO_BYTES.min(scratch.len_bytes);
    let template = ReadBuf::new(pool.alloc((size as usize).div_ceil(PAGE_SIZE)).await, size as usize).freeze();
    let device = &*scratch.device;
    let mut in_flight = FuturesUnordered::new();
    let mut offset = scratch.offset_bytes;
    let end = scratch.offset_bytes + scratch.len_bytes;
    loop {
        while in_flight.len() < 4 && offset < end {
            let len = size.min(end - offset) as usize;
            in_flight.push(device.write(offset / SECTOR_SIZE as u64, template.slice(0..len)));
            offset += len as u64;
        }
        match in_flight.next().await {
            Some(Ok(())) => {}
            Some(Err(source)) => {
                return Err(CliError::Io { operation: "fill", path: device.path().display().to_string(), source });
            }
            None => break,
        }
    }
    device.flush().await.map_err(|source| CliError::Io {
        operation: "flush",
        path: device.path().display().to_string(),
        source,
    })
}

/// The points of a plan, in the order they run.
fn points(plan: &Plan) -> Vec<PointSpec> {
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
        specs.push(PointSpec {
            name: "mixed",
            kinds: &[Kind::Read, Kind::Write],
            io_size_bytes: largest,
            queue_depth,
            walk: Walk::Sequential,
        });
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

/// Checks a plan's sizes and depths against the device and the limits.
fn check_plan(plan: &Plan, scratch: &Scratch) -> Result<(), CliError> {
    let block = u64::from(scratch.device.geometry().logical_block_size).max(PAGE_SIZE as u64);
    for &size in &plan.io_sizes_bytes {
        if size == 0 || size % block != 0 || size > IO_SIZE_MAX_BYTES || size * 2 > scratch.len_bytes {
            return Err(CliError::argument(
                "--io-sizes",
                size.to_string(),
                format!(
                    "each size must be a multiple of {block} bytes, at most {} and at most half the scratch range",
                    Bytes(IO_SIZE_MAX_BYTES)
                ),
            ));
        }
    }
    if plan.io_sizes_bytes.is_empty() || plan.queue_depths.is_empty() {
        return Err(CliError::Arguments { what: "--io-sizes, --queue-depths", problem: "nothing to measure".into() });
    }
    if let Some(&depth) = plan.queue_depths.iter().find(|&&d| d == 0 || d > QUEUE_DEPTH_MAX) {
        return Err(CliError::argument("--queue-depths", depth.to_string(), format!("must be 1 to {QUEUE_DEPTH_MAX}")));
    }
    Ok(())
}

/// Measures every point of `plan` on `scratch` and fits a model.
///
/// # Errors
/// A plan out of bounds, or an I/O error on the device.
pub async fn calibrate(scratch: &Scratch, plan: &Plan) -> Result<Calibrated, CliError> {
    check_plan(plan, scratch)?;
    let specs = points(plan);
    let largest = plan.io_sizes_bytes.iter().copied().max().unwrap_or(0);
    let deepest = plan.queue_depths.iter().copied().max().unwrap_or(1);
    // Reads of the deepest point, each in its own buffer, plus one write buffer (and the
    // fill's 1 MiB buffer).
    let pages = (largest.max(FILL_IO_BYTES) as usize).div_ceil(PAGE_SIZE) * (2 * deepest + 2);
    let pool = PagePool::new(pages).map_err(|source| CliError::Start { what: "the buffer arena", source })?;
    let rounds = plan.rounds.max(1);
    let engine = engine_sizes(scratch);
    let bar = progress::byte_bar(plan.bars, (rounds * (specs.len() + engine.len()) + 1) as u64, "calibrate");
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg:<28} [{wide_bar}] {pos}/{len} points ETA {eta}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_message("fill the scratch range");
    fill(scratch, &pool).await?;
    bar.inc(1);
    // Rounds over all points, so that a busy spell of the machine falls on one round of a
    // point rather than on all of it; each point's median round counts.
    let mut rounds_of: Vec<Vec<Measurement>> = vec![Vec::new(); specs.len() + engine.len()];
    for round in 0..rounds {
        for (i, &spec) in specs.iter().enumerate() {
            bar.set_message(format!(
                "{}/{rounds} {} {} ×{}",
                round + 1,
                spec.name,
                Bytes(spec.io_size_bytes),
                spec.queue_depth
            ));
            rounds_of[i].push(measure(scratch, &pool, spec, plan.point_time).await?);
            bar.inc(1);
        }
        for (i, &size) in engine.iter().enumerate() {
            bar.set_message(format!("{}/{rounds} engine copies {}", round + 1, Bytes(size)));
            rounds_of[specs.len() + i].push(engine_copies(scratch, size).await?);
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let spread = median(rounds_of.iter().map(|rounds| spread(rounds)).collect());
    let measurements: Vec<Measurement> = rounds_of.into_iter().map(median_round).collect();
    let description = format!(
        "calibrated on {} ({} scratch bytes from offset {}) by kcopyd sim calibrate; {rounds} rounds, \
         their spread {:.0} %",
        scratch.device.path().display(),
        scratch.len_bytes,
        scratch.offset_bytes,
        spread * 100.0
    );
    let mut model = fit(&measurements);
    model.description = description;
    model.one_device = scratch.device.kind() == kcopyd_os::DeviceKind::File;
    Ok(Calibrated { model, spread })
}

/// A calibration's result.
#[derive(Debug, Clone)]
pub struct Calibrated {
    /// The fitted model.
    pub model: DiskModel,
    /// How much the rounds of a point disagree: `(max − min) / median` of its rates, the median
    /// over points (0 with one round). Above [`SPREAD_WARNING`] something else was using the
    /// machine or the device.
    pub spread: f64,
}

/// The spread of rounds above which calibration warns that the model is of a busy machine.
pub const SPREAD_WARNING: f64 = 0.25;

/// `(max − min) / median` of the rates of one point's rounds.
///
/// Worked example: 900, 1000 and 1200 requests per second: 300 / 1000 = 30 %.
fn spread(rounds: &[Measurement]) -> f64 {
    let rates: Vec<f64> = rounds.iter().map(|m| m.iops).collect();
    let middle = median(rates.clone());
    let (low, high) = rates.iter().fold((f64::INFINITY, 0.0f64), |(l, h), &r| (l.min(r), h.max(r)));
    if middle > 0.0 { (high - low) / middle } else { 0.0 }
}

/// Warns on stderr when the rounds of a calibration disagree.
pub fn warn_if_busy(calibrated: &Calibrated) {
    if calibrated.spread > SPREAD_WARNING {
        crate::out::note(&format!(
            "kcopyd: warning: the rounds of a point differ by {:.0} % (the median over points): other work was using \
             the machine or the device, and the model describes it so; calibrate again when it is idle",
            calibrated.spread * 100.0
        ));
    }
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

/// The median of `values` (0 when empty).
fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Fits the timing model to the measurements (see the module's overview).
///
/// Every statistic is a median, as the validation's are: calibration and validation on the
/// same (possibly busy) machine describe it the same way.
///
/// Worked example: reads at 4 MiB and 8 in flight reach 3.6 GB/s; 64 KiB reads run at 30 000,
/// 40 000 and 45 000 per second at depths 4, 8 and 16: the median, 25 µs each, of which
/// 18.2 µs move bytes, gives an overhead of 6.8 µs; one 4 KiB read alone takes 70 µs, so the
/// cost is 70 − 6.8 − 1.1 = 62 µs.
pub fn fit(measurements: &[Measurement]) -> DiskModel {
    let of = |kind: &'static str| measurements.iter().filter(move |m| m.kind == kind);
    let direction = |kind: &'static str| -> (IoModel, u64) {
        // The median of the points that saturate the path (1 MiB or more, 4 or more in
        // flight); a plan without any takes its best point.
        let saturated: Vec<f64> = of(kind)
            .filter(|m| m.io_size_bytes >= SATURATING_IO_BYTES && m.queue_depth >= SATURATING_DEPTH)
            .map(|m| m.bandwidth_bytes_per_s)
            .collect();
        let bandwidth = if saturated.is_empty() {
            of(kind).map(|m| m.bandwidth_bytes_per_s).fold(0.0, f64::max)
        } else {
            median(saturated)
        };
        let transfer_us = |size: u64| if bandwidth > 0.0 { size as f64 * 1e6 / bandwidth } else { 0.0 };
        // Per size, the median over the depths above 1, then the median over the small sizes.
        let mut sizes: Vec<u64> = of(kind).map(|m| m.io_size_bytes).filter(|&s| s <= 256 << 10).collect();
        sizes.sort_unstable();
        sizes.dedup();
        let overhead_us = median(
            sizes
                .iter()
                .filter_map(|&size| {
                    let per_request_us: Vec<f64> = of(kind)
                        .filter(|m| m.io_size_bytes == size && m.queue_depth > 1 && m.iops > 0.0)
                        .map(|m| (1e6 / m.iops - transfer_us(size)).max(0.0))
                        .collect();
                    (!per_request_us.is_empty()).then(|| median(per_request_us))
                })
                .collect(),
        );
        let cost_us = median(
            of(kind)
                .filter(|m| m.queue_depth == 1 && m.io_size_bytes <= 64 << 10)
                .map(|m| (m.latency_us_p50 - overhead_us - transfer_us(m.io_size_bytes)).max(0.0))
                .collect(),
        );
        let model = IoModel {
            cost_us: cost_us.round() as u64,
            bandwidth_bytes_per_s: bandwidth.round() as u64,
            queue_depth: 0,
            jitter_us: 0,
        };
        (model, overhead_us.round() as u64)
    };
    let (read, read_overhead_us) = direction("read");
    let (write, write_overhead_us) = direction("write");
    // Mixed, at its deepest point: the share of each direction's best bandwidth reached
    // together (reads and writes move equal bytes). Two independent paths reach about
    // 1 + 1; one shared path at most 1. The best bandwidths, not those alone at the same
    // depth: a stall of the machine during one point alone must not decide.
    let share = of("mixed").max_by_key(|m| m.queue_depth).and_then(|m| {
        let (r, w) = (read.bandwidth_bytes_per_s as f64, write.bandwidth_bytes_per_s as f64);
        (r > 0.0 && w > 0.0).then(|| m.bandwidth_bytes_per_s / 2.0 * (1.0 / r + 1.0 / w))
    });
    let shared = share.is_some_and(|share| share < SHARED_SHARE_MAX);
    // Random small reads much slower than sequential ones at the same depth: the difference
    // is a seek, spread over the square-root law (no separate rotation can be told apart).
    let sequential =
        of("read").filter(|m| m.queue_depth == 1).min_by_key(|m| m.io_size_bytes).map(|m| m.latency_us_p50);
    let random = of("random-read").map(|m| m.latency_us_p50).next();
    let seek = match (sequential, random) {
        (Some(s), Some(r)) if s > 0.0 && r > s * SEEK_FACTOR_MIN => {
            SeekModel { track_us: 0, full_stroke_us: ((r - s) / MEAN_SQRT_DISTANCE).round() as u64, rotation_us: 0 }
        }
        _ => SeekModel::default(),
    };
    // The engine's time around requests: what a copy with one sub-job in flight takes beyond
    // one read and one write alone, per sub-job size, as a line over the size (fitted to
    // relative errors: a few µs matter at 64 KiB, not at 4 MiB), half of it on each request.
    let (mut read, mut write) = (read, write);
    let alone_us = |model: &IoModel, overhead_us: u64, size: u64| {
        let transfer_us =
            if model.bandwidth_bytes_per_s > 0 { size as f64 * 1e6 / model.bandwidth_bytes_per_s as f64 } else { 0.0 };
        model.cost_us as f64 + overhead_us as f64 + transfer_us
    };
    let gaps: Vec<(f64, f64, f64)> = of("copy")
        .filter(|copy| copy.latency_us_p50 > 0.0)
        .map(|copy| {
            let size = copy.io_size_bytes;
            let gap_us = copy.latency_us_p50
                - alone_us(&read, read_overhead_us, size)
                - alone_us(&write, write_overhead_us, size);
            (size as f64 / MIB, gap_us, 1.0 / (copy.latency_us_p50 * copy.latency_us_p50))
        })
        .collect();
    let (gap_us, gap_us_per_mib) = line(&gaps);
    // One size alone (a model of an older calibration): a constant, and only a positive one.
    let gap_us = if gaps.len() < 2 { gap_us.max(0.0) } else { gap_us };
    let half = |cost_us: u64| (cost_us as f64 + gap_us / 2.0).round().max(0.0) as u64;
    (read.cost_us, write.cost_us) = (half(read.cost_us), half(write.cost_us));
    let cost_us_per_mib = (gap_us_per_mib / 2.0).round() as i64;
    DiskModel {
        description: String::new(),
        latency: Latency {
            read,
            write,
            path: PathModel { shared, read_overhead_us, write_overhead_us, cost_us_per_mib, seek },
            ..Latency::default()
        },
        one_device: false,
        measurements: measurements.to_vec(),
    }
}

/// Bytes in a MiB, as a float.
const MIB: f64 = (1 << 20) as f64;

/// The weighted least-squares line `y = a + b·x` through `(x, y, weight)` points: `(a, b)`.
/// One point (or all at one `x`): `b` = 0 and `a` the weighted mean; none: `(0, 0)`.
///
/// Worked example: (0, 1), (1, 3) and (2, 5), equal weights: `y = 1 + 2x`.
fn line(points: &[(f64, f64, f64)]) -> (f64, f64) {
    let total: f64 = points.iter().map(|p| p.2).sum();
    if total <= 0.0 {
        return (0.0, 0.0);
    }
    let mean_x = points.iter().map(|p| p.0 * p.2).sum::<f64>() / total;
    let mean_y = points.iter().map(|p| p.1 * p.2).sum::<f64>() / total;
    let sxx: f64 = points.iter().map(|p| p.2 * (p.0 - mean_x).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| p.2 * (p.0 - mean_x) * (p.1 - mean_y)).sum();
    let slope = if sxx > 0.0 { sxy / sxx } else { 0.0 };
    (mean_y - slope * mean_x, slope)
}

/// The model as TOML, with a header saying what it is.
pub fn to_toml(model: &DiskModel) -> String {
    let body = toml::to_string(model).expect("a disk model serializes");
    format!("# kcopyd disk model: load it with `kcopyd sim validate --model` or in a scenario.\n{body}")
}

/// Reads a model file.
///
/// # Errors
/// The file cannot be read or is not a disk model.
pub fn load(path: &Path) -> Result<DiskModel, CliError> {
    let text = path.display().to_string();
    let body = fs::read_to_string(path)
        .map_err(|error| CliError::argument("--model", text.clone(), format!("cannot be read: {error}")))?;
    toml::from_str(&body)
        .map_err(|error| CliError::argument("--model", text, error.to_string().trim_end().replace('\n', " ")))
}

/// A table of the measurements and the fitted model, for people.
pub fn human(model: &DiskModel) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ =
        writeln!(out, "{:<12} {:>8} {:>6} {:>12} {:>10} {:>10}", "kind", "io size", "depth", "MB/s", "IOPS", "p50 µs");
    for m in &model.measurements {
        let _ = writeln!(
            out,
            "{:<12} {:>8} {:>6} {:>12.1} {:>10.0} {:>10.0}",
            m.kind,
            Bytes(m.io_size_bytes).to_string(),
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

/// `kcopyd sim calibrate`.
///
/// # Errors
/// Bad arguments (nothing written), or an I/O error while measuring.
pub async fn run(args: &CalibrateArgs, interrupts: &mut Interrupts) -> Result<Status, CliError> {
    // Nothing of a calibration is worth waiting for: a signal quits at once, the scratch file
    // it created removed.
    interrupts.set_summary(Some(Box::new(|| {
        "kcopyd: interrupted: calibration stopped, no model written (a scratch file it created is removed)".to_owned()
    })));
    check_point_time(args.point_time_us)?;
    if let Some(out) = &args.out {
        crate::out::check_output_file(out, "--out")?;
    }
    let plan = Plan {
        io_sizes_bytes: args.io_sizes_bytes.clone(),
        queue_depths: args.queue_depths.clone(),
        point_time: Duration::from_micros(args.point_time_us),
        rounds: usize::from(args.rounds),
        bars: progress::bars_wanted(args.quiet),
    };
    let scratch =
        Scratch::open(&args.device, args.size_bytes, args.scratch_offset_bytes, args.scratch_length_bytes, args.keep)?;
    if let Some(out) = &args.out {
        refuse_out_on_device(out, &args.device)?;
    }
    let calibrated = calibrate(&scratch, &plan).await?;
    drop(scratch);
    warn_if_busy(&calibrated);
    let model = calibrated.model;
    let text = to_toml(&model);
    match &args.out {
        Some(path) => fs::write(path, &text).map_err(|source| CliError::Io {
            operation: "write the model",
            path: path.display().to_string(),
            source,
        })?,
        None => crate::out::print(&text)?,
    }
    if !args.quiet {
        crate::out::note_text(&human(&model));
    }
    Ok(Status::Success)
}

/// The shortest `--point-time`: [`WINDOWS`] windows of a millisecond each.
pub const POINT_TIME_MIN: Duration = Duration::from_millis(WINDOWS as u64);
/// The longest `--point-time`: a calibration of hours measures nothing more.
pub const POINT_TIME_MAX: Duration = Duration::from_secs(60);

/// Refuses a `--point-time` that measures nothing (0, or shorter than one millisecond per
/// window) or that would run for hours.
fn check_point_time(point_time_us: u64) -> Result<(), CliError> {
    let time = Duration::from_micros(point_time_us);
    if (POINT_TIME_MIN..=POINT_TIME_MAX).contains(&time) {
        return Ok(());
    }
    Err(CliError::argument(
        "--point-time",
        format!("{time:?}"),
        format!(
            "must be from {} ms to {} s: each point is timed in {WINDOWS} windows",
            POINT_TIME_MIN.as_millis(),
            POINT_TIME_MAX.as_secs()
        ),
    ))
}

/// Refuses an `--out` that is the measured DEVICE under any name (the model would overwrite
/// what is measured, or the device hold a 2 KB model).
fn refuse_out_on_device(out: &Path, device: &Path) -> Result<(), CliError> {
    use std::os::unix::fs::MetadataExt;
    let (Ok(out_meta), Ok(device_meta)) = (fs::metadata(out), fs::metadata(device)) else { return Ok(()) };
    if (out_meta.dev(), out_meta.ino()) == (device_meta.dev(), device_meta.ino()) {
        return Err(CliError::argument(
            "--out",
            out.display().to_string(),
            format!("is DEVICE '{}' itself: the model would be written over what is measured", device.display()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_worked_example_holds() {
        let (a, b) = line(&[(0.0, 1.0, 1.0), (1.0, 3.0, 1.0), (2.0, 5.0, 1.0)]);
        assert!((a - 1.0).abs() < 1e-9 && (b - 2.0).abs() < 1e-9);
        // Weights pull the line towards the heavier points.
        let (a, b) = line(&[(0.0, 0.0, 1.0), (1.0, 0.0, 1.0), (2.0, 3.0, 100.0)]);
        assert!(a + 2.0 * b > 2.9 && b > 0.0);
        assert_eq!(line(&[(1.0, 7.0, 2.0)]), (7.0, 0.0));
        assert_eq!(line(&[]), (0.0, 0.0));
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
        let sparse: Vec<Duration> = (0..6).map(|i| window * (i / 3) + window / 2).collect();
        assert!((window_rate(&sparse, window * 5) - 120.0).abs() < 1e-6);
        assert!((window_rate(&[window * 7], window * 5) - 1.0 / 0.07).abs() < 1e-6);
    }

    fn point(kind: &str, io_size_bytes: u64, queue_depth: u32, iops: f64, latency_us_p50: f64) -> Measurement {
        Measurement {
            kind: kind.into(),
            io_size_bytes,
            queue_depth,
            iops,
            bandwidth_bytes_per_s: iops * io_size_bytes as f64,
            latency_us_p50,
        }
    }

    #[test]
    fn the_fit_worked_example_holds_and_mixed_points_decide_sharing() {
        // Reads: 3.6 GB/s at 4 MiB; 64 KiB at 40 000 per second at depth 8 (the median of 4,
        // 8 and 16);
        // one 4 KiB read alone in 70 µs. Writes likewise.
        let bandwidth = 3.6e9;
        let mut points = Vec::new();
        for kind in ["read", "write"] {
            points.push(point(kind, 4 << 20, 8, bandwidth / (4 << 20) as f64, 2000.0));
            points.push(point(kind, 64 << 10, 8, 40_000.0, 200.0));
            points.push(point(kind, 64 << 10, 4, 30_000.0, 130.0));
            points.push(point(kind, 64 << 10, 16, 45_000.0, 350.0));
            points.push(point(kind, 4 << 10, 1, 14_000.0, 70.0));
        }
        // Together at depth 8, 4 MiB: 1.8 GB/s in all, half of what each reaches alone.
        points.push(point("mixed", 4 << 20, 8, 1.8e9 / (4 << 20) as f64, 4000.0));
        let model = fit(&points);
        assert_eq!(model.latency.read.bandwidth_bytes_per_s, 3_600_000_000);
        // 25 µs − 65536 / 3600 µs = 6.8 µs; 70 − 7 − 1.14 = 61.9 µs.
        assert_eq!(model.latency.path.read_overhead_us, 7);
        assert_eq!(model.latency.read.cost_us, 62);
        assert!(model.latency.path.shared, "1.8 GB/s together: one path");
        assert!(model.latency.path.seek.is_zero());
        // Together at 7.2 GB/s in all: each direction as fast as alone, two paths.
        let last = points.len() - 1;
        points[last] = point("mixed", 4 << 20, 8, 7.2e9 / (4 << 20) as f64, 4000.0);
        assert!(!fit(&points).latency.path.shared);
        // The engine copies 256 KiB sub-jobs one at a time in 500 µs each, where a read and
        // a write alone take 2 × (62 + 7 + 72.8) = 283.6 µs: the 216.4 µs between requests go
        // to the cost, half each.
        points.push(point("copy", 256 << 10, 1, 2000.0, 500.0));
        let with_engine = fit(&points);
        assert_eq!((with_engine.latency.read.cost_us, with_engine.latency.write.cost_us), (170, 170));
        assert_eq!(with_engine.latency.path.cost_us_per_mib, 0, "one size: a constant");
        points.pop();
        // Copies at 64 KiB … 4 MiB that take 100 − 40 µs per MiB beyond a read and a write
        // alone: 50 µs more cost on each request, less 20 µs per MiB.
        let engine = points.len();
        for size in [64u64 << 10, 256 << 10, 1 << 20, 4 << 20] {
            let alone_us = 2.0 * (62.0 + 7.0 + size as f64 * 1e6 / bandwidth);
            let copy_us = alone_us + 100.0 - 40.0 * size as f64 / MIB;
            points.push(point("copy", size, 1, 1e6 / copy_us, copy_us));
        }
        let sized = fit(&points).latency;
        assert_eq!((sized.read.cost_us, sized.write.cost_us, sized.path.cost_us_per_mib), (112, 112, -20));
        points.truncate(engine);
        // Random 4 KiB reads one at a time in 5 ms instead of 70 µs: a seek.
        points.push(point("random-read", 4 << 10, 1, 200.0, 5070.0));
        let seek = fit(&points).latency.path.seek;
        assert_eq!(seek.full_stroke_us, (5000.0 / MEAN_SQRT_DISTANCE).round() as u64);
    }
}
