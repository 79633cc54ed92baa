//! The timing model of a simulated disk: queue slots, per-request cost, a data path (its own
//! per direction, shared by reads and writes, or a [`Medium`] shared by several disks) with
//! a per-request overhead and a seek that grows with distance, and seeded jitter, behind an
//! optional network link, in (possibly virtual) tokio time.
//!
//! ```text
//!  issue ─► wait for a queue slot ─► [link out] ─► cost_us ─► hold the data path: ─► [link back] ─► jitter ─► done
//!           (queue_depth slots)     ½ round trip  overlaps   overhead + seek +       ½ round trip
//!                                   + a write's   with other bytes/bandwidth        + a read's bytes
//!                                   bytes         requests   (one request at a time; per direction,
//!                                                            or shared by reads and writes, or by
//!                                                            every disk on one Medium)
//! ```
//!
//! Everything defaults to zero and to separate paths per direction: a default model is
//! instant, and a model that sets only [`IoModel`] behaves as it always did.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// The timing of one kind of request (reads, or writes and write-zeroes). Every field
/// defaults to zero: instant completion.
///
/// A request waits for a free queue slot (`queue_depth` of them, 0 = unlimited), pays
/// `cost_us`, then moves its bytes over the device's data path at
/// `bandwidth_bytes_per_s` (0 = unlimited) behind earlier transfers, and completes after up
/// to `jitter_us` more, drawn from the disk's seed.
///
/// Worked example: cost 100 µs, 100 MB/s, queue depth 1, no jitter: two 1 MB reads issued
/// together complete at 10.1 ms and 20.2 ms.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IoModel {
    /// Fixed cost of one request (command latency); requests in different queue slots pay it
    /// at the same time.
    pub cost_us: u64,
    /// Transfer rate of the data path; 0 means no transfer time.
    pub bandwidth_bytes_per_s: u64,
    /// Requests served at once; 0 means no limit.
    pub queue_depth: u32,
    /// Up to this much extra delay per request, drawn from the seed.
    pub jitter_us: u64,
}

impl IoModel {
    /// The time `len_bytes` take on the data path at this model's bandwidth.
    fn transfer(&self, len_bytes: usize) -> Duration {
        if self.bandwidth_bytes_per_s == 0 {
            return Duration::ZERO;
        }
        let nanos = len_bytes as u128 * 1_000_000_000 / u128::from(self.bandwidth_bytes_per_s);
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }
}

/// The seek of a spinning disk: a request that does not start where the previous one on the
/// data path ended moves the head first. Every field defaults to zero: no seek.
///
/// A seek over `d` of a disk's `n` sectors (`0 < d`) costs
/// `track_us + (full_stroke_us - track_us) × √(d / n) + rotation_us / 2`: the arm accelerates
/// over short distances (the square root), and then waits half a revolution on average. A
/// request that starts where the last one ended costs nothing. A request on another disk of
/// the same [`Medium`] seeks a third of the way across (the mean distance between two random
/// points).
///
/// Worked example, a 7200 rpm disk (`rotation_us` 8333), `track_us` 1000,
/// `full_stroke_us` 9000: a quarter of the disk away costs 1000 + 8000 × 0.5 + 4166 =
/// 9166 µs; the whole disk 13166 µs; the next sector 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SeekModel {
    /// The shortest seek (to the next track).
    pub track_us: u64,
    /// A seek across the whole disk.
    pub full_stroke_us: u64,
    /// One revolution; a request that seeks waits half of it.
    pub rotation_us: u64,
}

impl SeekModel {
    /// Whether no request ever pays a seek.
    pub fn is_zero(&self) -> bool {
        self.track_us == 0 && self.full_stroke_us == 0 && self.rotation_us == 0
    }

    /// The seek over `distance_sectors` of a disk of `span_sectors`.
    pub fn seek_us(&self, distance_sectors: u64, span_sectors: u64) -> u64 {
        if distance_sectors == 0 || self.is_zero() {
            return 0;
        }
        let fraction = (distance_sectors as f64 / span_sectors.max(1) as f64).min(1.0);
        let arm = self.full_stroke_us.saturating_sub(self.track_us) as f64 * fraction.sqrt();
        self.track_us + arm.round() as u64 + self.rotation_us / 2
    }
}

/// How a disk's requests use its data path, besides their bytes. Defaults: one path per
/// direction, no overhead, no seek.
///
/// Worked example (measured on an SSD behind a filesystem, see docs/SIMULATION.md): reads
/// alone at 3.6 GB/s and writes alone at 3.1 GB/s, but a copy gets 1.76 GB/s each way. With
/// `shared` set, a copy of 1 GB reads 1 GB and writes 1 GB over one path: 1/3.6 + 1/3.1 =
/// 0.60 s, 1.66 GB/s each way; with separate paths it would take 0.32 s.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PathModel {
    /// Reads and writes move over one data path, one request at a time (a disk, an SSD's
    /// controller, a link); otherwise each direction has its own.
    pub shared: bool,
    /// Time each read holds the data path besides its transfer: per-request work the device
    /// does for one request at a time, which more requests in flight cannot hide.
    pub read_overhead_us: u64,
    /// The same for writes and write-zeroes.
    pub write_overhead_us: u64,
    /// Added to every request's `cost_us` per MiB of the request (reads and writes alike;
    /// negative: large requests cost less than small ones), the cost never below zero. The
    /// time a real engine spends around each request grows more slowly with its size than
    /// single requests measured alone say (see docs/SIMULATION.md, "Calibration and
    /// validation"); 0, the default, keeps the cost the same at every size.
    ///
    /// Worked example: `cost_us` 140 and −40 µs per MiB: a 256 KiB request costs 130 µs, a
    /// 1 MiB one 100 µs, a 4 MiB one 0 µs (140 − 160, never below zero).
    pub cost_us_per_mib: i64,
    /// The head's movement between requests (spinning disks).
    pub seek: SeekModel,
}

impl PathModel {
    /// The cost of one request of `len_bytes` whose cost at size zero is `cost_us`: with
    /// [`PathModel::cost_us_per_mib`] added per MiB, never below zero.
    pub fn cost(&self, cost_us: u64, len_bytes: usize) -> Duration {
        let base_ns = i128::from(cost_us) * 1000;
        let size_ns = i128::from(self.cost_us_per_mib) * 1000 * len_bytes as i128 / (1 << 20);
        Duration::from_nanos(u64::try_from((base_ns + size_ns).max(0)).unwrap_or(u64::MAX))
    }
}

/// A network link in front of the disk (a remote disk: NBD, iSCSI, a cloud volume). Defaults:
/// none.
///
/// A request crosses to the server in half the round trip, a write's bytes first crossing at
/// the link's bandwidth behind earlier writes; the disk model serves it; it comes back in
/// half the round trip, a read's bytes first crossing back behind earlier reads. The link is
/// full duplex: reads and writes do not wait for each other on it.
///
/// Worked example: round trip 200 µs, 125 MB/s (1 Gbit/s), a disk that takes no time: a 1 MB
/// read completes after 100 + 8000 + 100 = 8200 µs, and a second one issued with it at
/// 16 200 µs, its bytes behind the first's; a 4 KiB read after 232.8 µs.
///
/// With `burst_bytes` the bandwidth is a token bucket (a rate limiter, such as nbdkit's rate
/// filter, or a cloud volume's burst credit): each direction holds up to `burst_bytes` of
/// credit, starts full and refills at the bandwidth; bytes cross at once while credit lasts
/// and the rest at the bandwidth. Worked example: 100 MB/s, a burst of 1 MB, no round trip:
/// two 1 MB reads issued together cross at 0 and 10 ms; a third issued 30 ms later (the
/// bucket full again) at once; a 3 MB read on a full bucket takes 20 ms.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LinkModel {
    /// Time for a message to the server and back, without payload.
    pub round_trip_us: u64,
    /// Payload bytes per second in each direction; 0 means no transfer time.
    pub bandwidth_bytes_per_s: u64,
    /// Bytes that may cross at once after the link was idle (a token bucket's capacity, per
    /// direction); 0, the default, makes the link a plain pipe.
    pub burst_bytes: u64,
}

impl LinkModel {
    fn is_none(&self) -> bool {
        self.round_trip_us == 0 && self.bandwidth_bytes_per_s == 0
    }

    fn transfer(&self, len_bytes: usize) -> Duration {
        IoModel { bandwidth_bytes_per_s: self.bandwidth_bytes_per_s, ..IoModel::default() }.transfer(len_bytes)
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
    /// How requests share the data path.
    pub path: PathModel,
    /// A network link in front of the disk.
    pub link: LinkModel,
    /// Seed of the jitter.
    pub seed: u64,
}

impl Latency {
    /// Whether a request of this kind completes at once (no sleep at all).
    pub(crate) fn is_instant(&self, write: bool) -> bool {
        let (model, overhead_us) =
            if write { (&self.write, self.path.write_overhead_us) } else { (&self.read, self.path.read_overhead_us) };
        model.cost_us == 0
            && self.path.cost_us_per_mib <= 0
            && model.bandwidth_bytes_per_s == 0
            && model.jitter_us == 0
            && overhead_us == 0
            && self.path.seek.is_zero()
            && self.link.is_none()
    }
}

/// A data path: when it frees up and where the head stopped.
#[derive(Debug, Default)]
pub(crate) struct DataPath {
    free_at: Option<Instant>,
    /// The disk and the sector after the last request served.
    head: Option<(u64, u64)>,
}

/// The data paths of one device that several disks move their bytes over, one request at a
/// time: files on one device, disks behind one controller or link. Clones share the paths.
///
/// A disk made with [`MemDisk::on_medium`](crate::MemDisk::on_medium) keeps its own queue
/// slots and costs, and its own bandwidths set how long each of its transfers holds a path;
/// the medium serialises the transfers of all its disks: the reads of all of them on one
/// path and the writes on another, or everything on one path when the disks' model says
/// [`PathModel::shared`].
///
/// Worked example: two disks on one medium, each with 100 MB/s writes and no cost; a 1 MB
/// write to each, issued together, completes at 10 ms and 20 ms (on separate disks both
/// would complete at 10 ms).
#[derive(Debug, Clone, Default)]
pub struct Medium {
    paths: Arc<Mutex<DevicePaths>>,
}

impl Medium {
    /// A medium nobody uses yet.
    pub fn new() -> Medium {
        Medium::default()
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, DevicePaths> {
        self.paths.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// When each queue slot of one direction of a disk frees up.
#[derive(Debug, Default)]
pub(crate) struct Slots {
    free_at: Vec<Instant>,
}

/// The data paths of a device: one per direction; writes use the read path too when the
/// model says `shared`. And when its link is free again in each direction.
#[derive(Debug, Default)]
pub(crate) struct DevicePaths {
    read: DataPath,
    write: DataPath,
    link_read_free: Option<Instant>,
    link_write_free: Option<Instant>,
}

impl DevicePaths {
    fn select(&mut self, write: bool, shared: bool) -> &mut DataPath {
        if write && !shared { &mut self.write } else { &mut self.read }
    }
}

/// The data paths a disk uses.
#[derive(Debug)]
pub(crate) enum Paths {
    /// Its own.
    Own(DevicePaths),
    /// Those of a medium shared with other disks.
    Medium(Medium),
}

/// One request as the timing model sees it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Request {
    /// When it was issued.
    pub now: Instant,
    /// Whether it writes.
    pub write: bool,
    /// Bytes it moves over the data path (0 for write-zeroes).
    pub len_bytes: usize,
    /// Where it starts and ends on the disk.
    pub start_sector: u64,
    pub end_sector: u64,
    /// The disk (its id's number) and its length, for seeks.
    pub disk: u64,
    pub disk_len_sectors: u64,
    /// Jitter drawn for it.
    pub jitter_us: u64,
    /// Tokio time per model time.
    pub scale: u32,
}

/// When `request` completes under `latency`, given the direction's queue `slots` and the
/// disk's `paths`: a queue slot, out over the link, the device's cost, a data path, back over
/// the link, jitter.
pub(crate) fn schedule(latency: &Latency, slots: &mut Slots, paths: &mut Paths, request: Request) -> Instant {
    let model = if request.write { &latency.write } else { &latency.read };
    let scale = request.scale;
    let slot = queue_slot(model, slots, request.now);
    let start = slot.map_or(request.now, |i| slots.free_at[i].max(request.now));
    let link = &latency.link;
    let half_trip = Duration::from_micros(link.round_trip_us) * scale / 2;
    let mut medium_guard;
    let device_paths = match paths {
        Paths::Own(own) => own,
        Paths::Medium(medium) => {
            medium_guard = medium.lock();
            &mut *medium_guard
        }
    };
    // Out over the link: a write's bytes cross first, behind earlier writes.
    let arrived = if request.write && link.bandwidth_bytes_per_s > 0 {
        cross_link(&mut device_paths.link_write_free, start, link, &request) + half_trip
    } else {
        start + half_trip
    };
    let ready = arrived + latency.path.cost(model.cost_us, request.len_bytes) * scale;
    let released = occupy_path(latency, device_paths, ready, &request);
    // Back over the link: a read's bytes cross first, behind earlier reads.
    let returned = if !request.write && link.bandwidth_bytes_per_s > 0 {
        cross_link(&mut device_paths.link_read_free, released, link, &request) + half_trip
    } else {
        released + half_trip
    };
    let done = returned + Duration::from_micros(request.jitter_us) * scale;
    // Each step starts where the one before it ended: time only moves forward.
    debug_assert!(
        request.now <= start
            && start <= arrived
            && arrived <= ready
            && ready <= released
            && released <= returned
            && returned <= done,
        "a request's schedule went back in time"
    );
    if let Some(i) = slot {
        debug_assert!(slots.free_at[i] <= done, "a queue slot frees earlier than before");
        slots.free_at[i] = done;
    }
    done
}

/// The queue slot that frees first (ties to the lowest index, for determinism), or `None`
/// when the model has no queue limit.
fn queue_slot(model: &IoModel, slots: &mut Slots, now: Instant) -> Option<usize> {
    if model.queue_depth == 0 {
        return None;
    }
    if slots.free_at.is_empty() {
        slots.free_at = vec![now; model.queue_depth as usize];
    }
    let (index, _) = slots.free_at.iter().enumerate().min_by_key(|&(i, t)| (*t, i)).expect("depth >= 1");
    Some(index)
}

/// Moves the request's bytes over one direction of the link, behind what crosses it already;
/// returns when the last byte has crossed.
///
/// `free` is when that direction would have moved everything asked of it at the bandwidth
/// (a token bucket's "theoretical arrival time"): the bucket is full from `burst_bytes` worth
/// of bandwidth after it. A request moves the mark on by its own transfer and has crossed once
/// the mark is no more than a burst ahead of it. Worked example: 100 MB/s, a 1 MB burst, a
/// 3 MB request on a full bucket (mark in the past): the mark moves to now + 30 ms, and the
/// bytes have crossed at now + 30 − 10 = 20 ms. Without a burst this is a pipe: the bytes
/// cross behind the earlier ones.
fn cross_link(free: &mut Option<Instant>, from: Instant, link: &LinkModel, request: &Request) -> Instant {
    let mark = free.map_or(from, |at| at.max(from)) + link.transfer(request.len_bytes) * request.scale;
    let burst = link.transfer(usize::try_from(link.burst_bytes).unwrap_or(usize::MAX)) * request.scale;
    let end = mark.checked_sub(burst).map_or(from, |at| at.max(from));
    debug_assert!(free.is_none_or(|at| at <= mark), "a link's mark moves back");
    *free = Some(mark);
    end
}

/// Holds the device's data path for the request's overhead, seek and transfer, from when
/// it is `ready` and the path is free; returns when the path lets go of it.
fn occupy_path(latency: &Latency, device_paths: &mut DevicePaths, ready: Instant, request: &Request) -> Instant {
    let (model, overhead_us) = if request.write {
        (&latency.write, latency.path.write_overhead_us)
    } else {
        (&latency.read, latency.path.read_overhead_us)
    };
    let uses_path = model.bandwidth_bytes_per_s > 0 || overhead_us > 0 || !latency.path.seek.is_zero();
    if !uses_path {
        return ready;
    }
    let path = device_paths.select(request.write, latency.path.shared);
    let begin = path.free_at.map_or(ready, |free| free.max(ready));
    let seek_us = match path.head {
        None => 0,
        Some((disk, sector)) if disk == request.disk => {
            latency.path.seek.seek_us(sector.abs_diff(request.start_sector), request.disk_len_sectors)
        }
        Some(_) => latency.path.seek.seek_us(request.disk_len_sectors / 3, request.disk_len_sectors),
    };
    let hold = Duration::from_micros(overhead_us + seek_us) + model.transfer(request.len_bytes);
    let end = begin + hold * request.scale;
    debug_assert!(path.free_at.is_none_or(|free| free <= end), "a path frees earlier than before");
    path.free_at = Some(end);
    path.head = Some((request.disk, request.end_sector));
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own() -> Paths {
        Paths::Own(DevicePaths::default())
    }

    fn request(now: Instant, write: bool, len_bytes: usize, start_sector: u64) -> Request {
        Request {
            now,
            write,
            len_bytes,
            start_sector,
            end_sector: start_sector + (len_bytes as u64).div_ceil(512),
            disk: 1,
            disk_len_sectors: 1 << 30,
            jitter_us: 0,
            scale: 1,
        }
    }

    fn read_only(model: IoModel) -> Latency {
        Latency { read: model, ..Latency::default() }
    }

    #[test]
    fn the_worked_example_holds() {
        let latency =
            read_only(IoModel { cost_us: 100, bandwidth_bytes_per_s: 100_000_000, queue_depth: 1, jitter_us: 0 });
        let (mut slots, mut paths) = (Slots::default(), own());
        let now = Instant::now();
        let first = schedule(&latency, &mut slots, &mut paths, request(now, false, 1_000_000, 0));
        let second = schedule(&latency, &mut slots, &mut paths, request(now, false, 1_000_000, 0));
        assert_eq!(first - now, Duration::from_micros(10_100));
        assert_eq!(second - now, Duration::from_micros(20_200));
    }

    #[test]
    fn deep_queues_overlap_costs_but_share_the_data_path() {
        let latency =
            read_only(IoModel { cost_us: 1000, bandwidth_bytes_per_s: 1_000_000_000, queue_depth: 4, jitter_us: 0 });
        let (mut slots, mut paths) = (Slots::default(), own());
        let now = Instant::now();
        let done: Vec<Duration> = (0..4)
            .map(|_| schedule(&latency, &mut slots, &mut paths, request(now, false, 1_000_000, 0)) - now)
            .collect();
        // All four pay their cost at once, then transfer one after another (1 ms each).
        assert_eq!(done, [2, 3, 4, 5].map(Duration::from_millis));
    }

    /// 100 MB/s both ways: a 1 MB read and a 1 MB write issued together.
    fn read_and_write_together(path: PathModel) -> (Duration, Duration) {
        let model = IoModel { bandwidth_bytes_per_s: 100_000_000, ..IoModel::default() };
        let latency = Latency { read: model, write: model, path, ..Latency::default() };
        let (mut read_slots, mut write_slots, mut paths) = (Slots::default(), Slots::default(), own());
        let now = Instant::now();
        let read = schedule(&latency, &mut read_slots, &mut paths, request(now, false, 1_000_000, 0));
        let write = schedule(&latency, &mut write_slots, &mut paths, request(now, true, 1_000_000, 4096));
        (read - now, write - now)
    }

    #[test]
    fn reads_and_writes_overlap_on_separate_paths_and_queue_on_a_shared_one() {
        let ten = Duration::from_millis(10);
        assert_eq!(read_and_write_together(PathModel::default()), (ten, ten));
        assert_eq!(read_and_write_together(PathModel { shared: true, ..PathModel::default() }), (ten, 2 * ten));
    }

    #[test]
    fn the_path_overhead_is_paid_one_request_at_a_time() {
        // Cost 50 µs overlaps across 4 slots; the overhead of 20 µs does not: 4 reads of 1 MB
        // at 1 GB/s issued together end at 50 + 1020, + 1020, + 1020, + 1020 µs.
        let model = IoModel { cost_us: 50, bandwidth_bytes_per_s: 1_000_000_000, queue_depth: 4, jitter_us: 0 };
        let latency = Latency {
            read: model,
            path: PathModel { read_overhead_us: 20, ..PathModel::default() },
            ..Latency::default()
        };
        let (mut slots, mut paths) = (Slots::default(), own());
        let now = Instant::now();
        let done: Vec<u128> = (0..4)
            .map(|_| (schedule(&latency, &mut slots, &mut paths, request(now, false, 1_000_000, 0)) - now).as_micros())
            .collect();
        assert_eq!(done, [1070, 2090, 3110, 4130]);
        // Without bandwidth the overhead alone still serialises requests.
        let latency = Latency { read: IoModel::default(), ..latency };
        let (mut slots, mut paths) = (Slots::default(), own());
        let done: Vec<u128> = (0..3)
            .map(|_| (schedule(&latency, &mut slots, &mut paths, request(now, false, 4096, 0)) - now).as_micros())
            .collect();
        assert_eq!(done, [20, 40, 60]);
    }

    #[test]
    fn the_cost_per_mib_worked_example_holds() {
        let path = PathModel { cost_us_per_mib: -40, ..PathModel::default() };
        let cost_us = |len_bytes: usize| path.cost(140, len_bytes).as_micros();
        assert_eq!((cost_us(256 << 10), cost_us(1 << 20), cost_us(4 << 20)), (130, 100, 0));
        assert_eq!(PathModel::default().cost(140, 4 << 20).as_micros(), 140, "the default: the same at every size");
        // One 1 MiB read alone, 1 GB/s: 100 µs of cost, then 1048.576 µs of transfer.
        let latency = Latency {
            path,
            ..read_only(IoModel { cost_us: 140, bandwidth_bytes_per_s: 1_000_000_000, ..IoModel::default() })
        };
        let now = Instant::now();
        let done = schedule(&latency, &mut Slots::default(), &mut own(), request(now, false, 1 << 20, 0));
        assert_eq!(done - now, Duration::from_nanos(100_000 + 1_048_576));
    }

    #[test]
    fn the_seek_worked_example_holds() {
        let seek = SeekModel { track_us: 1000, full_stroke_us: 9000, rotation_us: 8333 };
        assert_eq!(seek.seek_us(0, 1000), 0);
        assert_eq!(seek.seek_us(250, 1000), 9166);
        assert_eq!(seek.seek_us(1000, 1000), 13_166);
        assert_eq!(seek.seek_us(5000, 1000), 13_166, "clamped to the whole disk");
        assert_eq!(SeekModel::default().seek_us(500, 1000), 0);
    }

    #[test]
    fn sequential_requests_pay_no_seek_and_scattered_ones_pay_by_distance() {
        let seek = SeekModel { track_us: 1000, full_stroke_us: 9000, rotation_us: 0 };
        let latency = Latency { path: PathModel { shared: true, seek, ..PathModel::default() }, ..Latency::default() };
        let (mut slots, mut paths) = (Slots::default(), own());
        let now = Instant::now();
        let span = 1 << 30;
        let mut at = |start: u64, write: bool| {
            (schedule(&latency, &mut slots, &mut paths, request(now, write, 4096, start)) - now).as_micros()
        };
        assert_eq!(at(0, false), 0, "the head starts where the first request is");
        assert_eq!(at(8, false), 0, "the next request follows on");
        assert_eq!(at(16, true), 0, "a write that follows on, on a shared path, too");
        // A quarter of the disk away: 1000 + 8000 × 0.5.
        assert_eq!(at(24 + span / 4, false), 5000);
        assert_eq!(at(32 + span / 4, false), 5000, "sequential again");
    }

    #[test]
    fn disks_on_one_medium_share_its_path() {
        // The worked example of Medium: two disks, 100 MB/s writes, a 1 MB write each.
        let latency = Latency {
            write: IoModel { bandwidth_bytes_per_s: 100_000_000, ..IoModel::default() },
            ..Latency::default()
        };
        let medium = Medium::new();
        let (mut a, mut b) = (Paths::Medium(medium.clone()), Paths::Medium(medium));
        let now = Instant::now();
        let first = schedule(&latency, &mut Slots::default(), &mut a, request(now, true, 1_000_000, 0));
        let mut other = request(now, true, 1_000_000, 0);
        other.disk = 2;
        let second = schedule(&latency, &mut Slots::default(), &mut b, other);
        assert_eq!((first - now, second - now), (Duration::from_millis(10), Duration::from_millis(20)));
        // Apart, both take 10 ms.
        let (mut a, mut b) = (own(), own());
        let first = schedule(&latency, &mut Slots::default(), &mut a, request(now, true, 1_000_000, 0));
        let second = schedule(&latency, &mut Slots::default(), &mut b, other);
        assert_eq!(first, second);
        // A read on one disk and a write on the other overlap on a medium with a path per
        // direction, and queue when the model shares one path.
        for (shared, write_done_ms) in [(false, 10), (true, 20)] {
            let latency = Latency {
                read: IoModel { bandwidth_bytes_per_s: 100_000_000, ..IoModel::default() },
                write: IoModel { bandwidth_bytes_per_s: 100_000_000, ..IoModel::default() },
                path: PathModel { shared, ..PathModel::default() },
                ..Latency::default()
            };
            let medium = Medium::new();
            let (mut a, mut b) = (Paths::Medium(medium.clone()), Paths::Medium(medium));
            let read = schedule(&latency, &mut Slots::default(), &mut a, request(now, false, 1_000_000, 0));
            let write = schedule(&latency, &mut Slots::default(), &mut b, other);
            assert_eq!(read - now, Duration::from_millis(10));
            assert_eq!(write - now, Duration::from_millis(write_done_ms), "shared: {shared}");
        }
    }

    #[test]
    fn another_disk_on_the_medium_costs_a_third_of_a_stroke() {
        let seek = SeekModel { track_us: 0, full_stroke_us: 9000, rotation_us: 0 };
        let latency = Latency { path: PathModel { seek, ..PathModel::default() }, ..Latency::default() };
        let medium = Medium::new();
        let mut paths = Paths::Medium(medium);
        let now = Instant::now();
        let first = schedule(&latency, &mut Slots::default(), &mut paths, request(now, false, 4096, 0));
        let mut other = request(now, false, 4096, 8);
        other.disk = 2;
        let second = schedule(&latency, &mut Slots::default(), &mut paths, other);
        // 9000 × √(1/3) = 5196.2 µs.
        assert_eq!((second - first).as_micros(), 5196);
    }

    #[test]
    fn the_link_worked_example_holds() {
        let latency = Latency {
            link: LinkModel { round_trip_us: 200, bandwidth_bytes_per_s: 125_000_000, burst_bytes: 0 },
            ..Latency::default()
        };
        assert!(!latency.is_instant(false));
        let (mut slots, mut paths) = (Slots::default(), own());
        let now = Instant::now();
        let mut at = |write: bool, len_bytes: usize| {
            (schedule(&latency, &mut slots, &mut paths, request(now, write, len_bytes, 0)) - now).as_nanos()
        };
        assert_eq!(at(false, 1_000_000), 8_200_000);
        assert_eq!(at(false, 1_000_000), 16_200_000, "behind the first read's bytes");
        assert_eq!(at(true, 1_000_000), 8_200_000, "writes cross the other way, at once");
        let (mut slots, mut paths) = (Slots::default(), own());
        let small = schedule(&latency, &mut slots, &mut paths, request(now, false, 4096, 0)) - now;
        assert_eq!(small.as_nanos(), 232_768);
        // A round trip alone delays, but does not serialise.
        let latency = Latency { link: LinkModel { round_trip_us: 200, ..LinkModel::default() }, ..Latency::default() };
        let (mut slots, mut paths) = (Slots::default(), own());
        for _ in 0..3 {
            let done = schedule(&latency, &mut slots, &mut paths, request(now, true, 1 << 20, 0));
            assert_eq!(done - now, Duration::from_micros(200));
        }
    }

    #[test]
    fn the_link_burst_worked_example_holds() {
        let link = LinkModel { bandwidth_bytes_per_s: 100_000_000, burst_bytes: 1_000_000, ..LinkModel::default() };
        let latency = Latency { link, ..Latency::default() };
        let (mut slots, mut paths) = (Slots::default(), own());
        let now = Instant::now();
        let mut at = |issued: Instant, len_bytes: usize| {
            (schedule(&latency, &mut slots, &mut paths, request(issued, false, len_bytes, 0)) - now).as_millis()
        };
        assert_eq!(at(now, 1_000_000), 0, "the full bucket lets the first megabyte through");
        assert_eq!(at(now, 1_000_000), 10, "the second waits for the bucket to refill");
        assert_eq!(at(now + Duration::from_millis(30), 1_000_000), 30, "idle 20 ms: full again");
        assert_eq!(at(now + Duration::from_millis(30), 1_000_000), 40);
        assert_eq!(at(now + Duration::from_millis(100), 3_000_000), 120, "the burst, then 2 MB at 100 MB/s");
        // Without a burst the same requests queue as on a pipe.
        let latency = Latency { link: LinkModel { burst_bytes: 0, ..link }, ..Latency::default() };
        let (mut slots, mut paths) = (Slots::default(), own());
        let mut at = |issued: Instant, len_bytes: usize| {
            (schedule(&latency, &mut slots, &mut paths, request(issued, false, len_bytes, 0)) - now).as_millis()
        };
        assert_eq!([at(now, 1_000_000), at(now, 1_000_000)], [10, 20]);
        assert_eq!(at(now + Duration::from_millis(100), 3_000_000), 130);
    }

    #[test]
    fn a_burst_larger_than_a_copy_leaves_only_the_round_trips() {
        // A bucket holding more than everything asked: the bandwidth never counts.
        let link = LinkModel { round_trip_us: 1000, bandwidth_bytes_per_s: 1_000_000, burst_bytes: 1 << 30 };
        let latency = Latency { link, ..Latency::default() };
        let (mut slots, mut paths) = (Slots::default(), own());
        let now = Instant::now();
        for write in [false, true, false, true] {
            let done = schedule(&latency, &mut slots, &mut paths, request(now, write, 1 << 20, 0));
            assert_eq!(done - now, Duration::from_millis(1), "write: {write}");
        }
    }

    #[test]
    fn defaults_are_instant_and_deny_unknown_keys() {
        assert!(Latency::default().is_instant(false) && Latency::default().is_instant(true));
        let with_seek = Latency {
            path: PathModel { seek: SeekModel { track_us: 1, ..SeekModel::default() }, ..PathModel::default() },
            ..Latency::default()
        };
        assert!(!with_seek.is_instant(false));
        let parsed: Latency = serde_json::from_str(r#"{"path":{"shared":true}}"#).unwrap();
        assert!(parsed.path.shared);
        assert!(serde_json::from_str::<Latency>(r#"{"path":{"share":true}}"#).is_err());
    }

    /// A long mixed walk over every part of the model (queue slots, a shared path with seeks,
    /// a link both ways, jitter) with the clock moving on: every completion lies at or after
    /// its issue, and completions on one queue slot never move back (the schedule's debug
    /// assertions check each step of each request as it goes).
    #[test]
    fn schedules_never_go_back_in_time() {
        let model = IoModel { cost_us: 50, bandwidth_bytes_per_s: 200_000_000, queue_depth: 3, jitter_us: 0 };
        let path = PathModel {
            shared: true,
            read_overhead_us: 5,
            write_overhead_us: 7,
            seek: SeekModel { track_us: 100, full_stroke_us: 8000, rotation_us: 4000 },
            ..PathModel::default()
        };
        let link = LinkModel { round_trip_us: 30, bandwidth_bytes_per_s: 1_000_000_000, burst_bytes: 64 << 10 };
        let latency = Latency { read: model, write: model, path, link, ..Latency::default() };
        let (mut read_slots, mut write_slots, mut paths) = (Slots::default(), Slots::default(), own());
        let mut now = Instant::now();
        let mut state = 0x853c_49e6_748f_ea9bu64;
        for _ in 0..2000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let write = state % 3 == 0;
            let len_bytes = 512 * (1 + (state >> 8) as usize % 256);
            let mut asked = request(now, write, len_bytes, (state >> 20) % (1 << 29));
            asked.jitter_us = (state >> 40) % 20;
            let slots = if write { &mut write_slots } else { &mut read_slots };
            let before = slots.free_at.clone();
            let done = schedule(&latency, slots, &mut paths, asked);
            assert!(done >= now, "completed before it was issued");
            let moved_back = before.iter().zip(&slots.free_at).any(|(old, new)| new < old);
            assert!(!moved_back, "a slot frees earlier than before");
            now += Duration::from_micros((state >> 50) % 400);
        }
    }
}
