//! The fit: from measured points ([`Measurement`]) to the timing model ([`DiskModel`]).
//!
//! ```text
//!  read / write points ─► bandwidth (saturating points) ─► overhead (deep small points)
//!                                                        └► cost (one small request alone)
//!  mixed points ───────► shared path?      random-read ─► seek
//!  copy points (the engine, one sub-job in flight) ─► time around requests: cost + per MiB
//! ```
//!
//! The fit follows the model's structure (`timing.rs`): at the deepest queue a request holds
//! the data path for `overhead + size / bandwidth`, so the time per request there gives the
//! overhead once the bandwidth is known from the largest requests; alone, one request takes
//! `cost + overhead + size / bandwidth`, which gives the cost. The simulated engine spends no
//! time between a completion and the request it leads to; a real one does (actor messages,
//! waking threads), and copies with one sub-job in flight show how much. That time is not
//! constant: on a virtio disk it shrinks with the sub-job's size and turns negative at 1 MiB
//! and more (a copy's large requests go faster than the same requests measured alone). It is
//! fitted as a line over the sub-job sizes and added to the requests' cost, half each: a
//! constant, and `path.cost_us_per_mib` per MiB of the request.

use super::{DiskModel, Measurement};
use crate::timing::{IoModel, Latency, PathModel, SeekModel};

/// Points with requests this large or larger…
const SATURATING_IO_BYTES: u64 = 1 << 20;
/// …and this many in flight or more saturate the data path: their bandwidth is the path's.
const SATURATING_DEPTH: u32 = 4;
/// Sizes up to this give the path overhead (larger ones are all transfer).
const OVERHEAD_IO_BYTES_MAX: u64 = 256 << 10;
/// Sizes up to this, alone, give the cost.
const COST_IO_BYTES_MAX: u64 = 64 << 10;
/// Mixed reads and writes are at least this much slower than alone (sum of the shares of
/// each alone-bandwidth they reach below this) when they share one data path.
const SHARED_SHARE_MAX: f64 = 1.5;
/// Random one-at-a-time reads slower than sequential ones by this factor reveal a seek.
const SEEK_FACTOR_MIN: f64 = 1.5;
/// The mean of `√|u - v|` for `u`, `v` uniform on [0, 1]: the mean arm travel of random
/// requests as a share of a full stroke, in the seek model's square-root law.
pub(super) const MEAN_SQRT_DISTANCE: f64 = 8.0 / 15.0;
/// Rounds of taking the path overhead out of the saturating points' bandwidth (each round
/// shrinks the error by the overhead's share of a small request's time, a few per cent).
const BANDWIDTH_ROUNDS: usize = 3;
/// Bytes in a MiB, as a float.
const MIB: f64 = (1 << 20) as f64;

/// The measurements of one kind (`read`, `write`, `mixed`, `random-read`, `copy`).
fn of<'a>(measurements: &'a [Measurement], kind: &'a str) -> impl Iterator<Item = &'a Measurement> + 'a {
    measurements.iter().filter(move |m| m.kind == kind)
}

impl DiskModel {
    /// Fits the timing model to the measurements (see the module's overview).
    ///
    /// Every statistic is a median, as the validation's are: calibration and validation on
    /// the same (possibly busy) machine describe it the same way.
    ///
    /// Worked example: reads at 4 MiB and 8 in flight reach 3.6 GB/s; 64 KiB reads run at
    /// 30 000, 40 000 and 45 000 per second at depths 4, 8 and 16: the median, 25 µs each, of
    /// which 18.2 µs move bytes, gives an overhead of 6.8 µs; one 4 KiB read alone takes
    /// 70 µs, so the cost is 70 − 6.8 − 1.1 = 62 µs.
    pub fn fit(measurements: &[Measurement]) -> DiskModel {
        let (mut read, read_overhead_us) = direction(measurements, "read");
        let (mut write, write_overhead_us) = direction(measurements, "write");
        let shared = shares_one_path(measurements, &read, &write);
        let seek = seek(measurements);
        let (gap_us, gap_us_per_mib) = engine_gap(measurements, (&read, read_overhead_us), (&write, write_overhead_us));
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
}

/// One direction's bandwidth, cost and path overhead (before the engine's time is added).
///
/// A saturated request holds the path for `overhead + size / bandwidth`, so the bandwidth of
/// the saturating points is a little below the path's: the overhead of each request is taken
/// out and the overhead found again with the corrected bandwidth, [`BANDWIDTH_ROUNDS`] times
/// (a simulated disk of 400 MB/s and 15 µs an overhead measures 399.4 MB/s at 4 MiB; without
/// the correction a copy of 4 MiB sub-jobs is predicted 50 µs slower than the disk runs it).
fn direction(measurements: &[Measurement], kind: &str) -> (IoModel, u64) {
    // The points that saturate the path (1 MiB or more, 4 or more in flight); a plan without
    // any takes its best point as it is.
    let saturated: Vec<&Measurement> = of(measurements, kind)
        .filter(|m| m.io_size_bytes >= SATURATING_IO_BYTES && m.queue_depth >= SATURATING_DEPTH && m.iops > 0.0)
        .collect();
    let mut bandwidth = if saturated.is_empty() {
        of(measurements, kind).map(|m| m.bandwidth_bytes_per_s).fold(0.0, f64::max)
    } else {
        median(saturated.iter().map(|m| m.bandwidth_bytes_per_s).collect())
    };
    let mut overhead_us = overhead_us(measurements, kind, bandwidth);
    for _ in 0..BANDWIDTH_ROUNDS {
        if saturated.is_empty() {
            break;
        }
        bandwidth = median(
            saturated
                .iter()
                .map(|m| {
                    let transfer_us = (1e6 / m.iops - overhead_us).max(1e6 / m.iops / 2.0);
                    m.io_size_bytes as f64 * 1e6 / transfer_us
                })
                .collect(),
        );
        overhead_us = self::overhead_us(measurements, kind, bandwidth);
    }
    let transfer_us = |size: u64| if bandwidth > 0.0 { size as f64 * 1e6 / bandwidth } else { 0.0 };
    let cost_us = median(
        of(measurements, kind)
            .filter(|m| m.queue_depth == 1 && m.io_size_bytes <= COST_IO_BYTES_MAX)
            .map(|m| (m.latency_us_p50 - overhead_us - transfer_us(m.io_size_bytes)).max(0.0))
            .collect(),
    );
    let model = IoModel {
        cost_us: cost_us.round() as u64,
        bandwidth_bytes_per_s: bandwidth.round() as u64,
        ..IoModel::default()
    };
    (model, overhead_us.round() as u64)
}

/// The path overhead at `bandwidth`: per small size, the median over the depths above 1 of
/// the time per request beyond its transfer, then the median over the sizes.
fn overhead_us(measurements: &[Measurement], kind: &str, bandwidth: f64) -> f64 {
    let transfer_us = |size: u64| if bandwidth > 0.0 { size as f64 * 1e6 / bandwidth } else { 0.0 };
    let mut sizes: Vec<u64> =
        of(measurements, kind).map(|m| m.io_size_bytes).filter(|&s| s <= OVERHEAD_IO_BYTES_MAX).collect();
    sizes.sort_unstable();
    sizes.dedup();
    median(
        sizes
            .iter()
            .filter_map(|&size| {
                let per_request_us: Vec<f64> = of(measurements, kind)
                    .filter(|m| m.io_size_bytes == size && m.queue_depth > 1 && m.iops > 0.0)
                    .map(|m| (1e6 / m.iops - transfer_us(size)).max(0.0))
                    .collect();
                (!per_request_us.is_empty()).then(|| median(per_request_us))
            })
            .collect(),
    )
}

/// Whether reads and writes share one data path: mixed, at its deepest point, the share of
/// each direction's best bandwidth reached together (reads and writes move equal bytes). Two
/// independent paths reach about 1 + 1; one shared path at most 1. The best bandwidths, not
/// those alone at the same depth: a stall of the machine during one point alone must not
/// decide.
fn shares_one_path(measurements: &[Measurement], read: &IoModel, write: &IoModel) -> bool {
    let share = of(measurements, "mixed").max_by_key(|m| m.queue_depth).and_then(|m| {
        let (r, w) = (read.bandwidth_bytes_per_s as f64, write.bandwidth_bytes_per_s as f64);
        (r > 0.0 && w > 0.0).then(|| m.bandwidth_bytes_per_s / 2.0 * (1.0 / r + 1.0 / w))
    });
    share.is_some_and(|share| share < SHARED_SHARE_MAX)
}

/// Random small reads much slower than sequential ones at the same depth: the difference is
/// a seek, spread over the square-root law (no separate rotation can be told apart).
fn seek(measurements: &[Measurement]) -> SeekModel {
    let sequential = of(measurements, "read")
        .filter(|m| m.queue_depth == 1)
        .min_by_key(|m| m.io_size_bytes)
        .map(|m| m.latency_us_p50);
    let random = of(measurements, "random-read").map(|m| m.latency_us_p50).next();
    match (sequential, random) {
        (Some(s), Some(r)) if s > 0.0 && r > s * SEEK_FACTOR_MIN => {
            SeekModel { track_us: 0, full_stroke_us: ((r - s) / MEAN_SQRT_DISTANCE).round() as u64, rotation_us: 0 }
        }
        _ => SeekModel::default(),
    }
}

/// The engine's time around requests, `(µs, µs per MiB)`: what a copy with one sub-job in
/// flight takes beyond one read and one write alone, per sub-job size, as a line over the size
/// (fitted to relative errors: a few µs matter at 64 KiB, not at 4 MiB). One size alone (a
/// model of an older calibration) gives a constant, and only a positive one.
fn engine_gap(measurements: &[Measurement], read: (&IoModel, u64), write: (&IoModel, u64)) -> (f64, f64) {
    let alone_us = |(model, overhead_us): (&IoModel, u64), size: u64| {
        let transfer_us =
            if model.bandwidth_bytes_per_s > 0 { size as f64 * 1e6 / model.bandwidth_bytes_per_s as f64 } else { 0.0 };
        model.cost_us as f64 + overhead_us as f64 + transfer_us
    };
    let gaps: Vec<(f64, f64, f64)> = of(measurements, "copy")
        .filter(|copy| copy.latency_us_p50 > 0.0)
        .map(|copy| {
            let size = copy.io_size_bytes;
            let gap_us = copy.latency_us_p50 - alone_us(read, size) - alone_us(write, size);
            (size as f64 / MIB, gap_us, 1.0 / (copy.latency_us_p50 * copy.latency_us_p50))
        })
        .collect();
    let (gap_us, gap_us_per_mib) = line(&gaps);
    if gaps.len() < 2 { (gap_us.max(0.0), gap_us_per_mib) } else { (gap_us, gap_us_per_mib) }
}

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

/// The median of `values` (the upper one of an even count; 0 when empty).
pub(crate) fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk_model::point;

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
    fn the_fit_worked_example_holds_and_mixed_points_decide_sharing() {
        // Reads: 3.6 GB/s at 4 MiB; 64 KiB at 40 000 per second at depth 8 (the median of 4,
        // 8 and 16); one 4 KiB read alone in 70 µs. Writes likewise.
        let bandwidth = 3.6e9;
        // At 4 MiB each request holds the path for its overhead, 25 − 65536 / 3600 µs, too.
        let overhead_us = 25.0 - 65536.0 / 3600.0;
        let large_iops = 1e6 / (overhead_us + (4 << 20) as f64 * 1e6 / bandwidth);
        let mut points = Vec::new();
        for kind in ["read", "write"] {
            points.push(point(kind, 4 << 20, 8, large_iops, 2000.0));
            points.push(point(kind, 64 << 10, 8, 40_000.0, 200.0));
            points.push(point(kind, 64 << 10, 4, 30_000.0, 130.0));
            points.push(point(kind, 64 << 10, 16, 45_000.0, 350.0));
            points.push(point(kind, 4 << 10, 1, 14_000.0, 70.0));
        }
        // Together at depth 8, 4 MiB: 1.8 GB/s in all, half of what each reaches alone.
        points.push(point("mixed", 4 << 20, 8, 1.8e9 / (4 << 20) as f64, 4000.0));
        let model = DiskModel::fit(&points);
        // 3.588 GB/s measured at 4 MiB; 3.6 GB/s once the 6.8 µs of overhead is taken out.
        assert!((model.latency.read.bandwidth_bytes_per_s as f64 - bandwidth).abs() <= 1e3, "{model:?}");
        // 25 µs − 65536 / 3600 µs = 6.8 µs; 70 − 7 − 1.14 = 61.9 µs.
        assert_eq!(model.latency.path.read_overhead_us, 7);
        assert_eq!(model.latency.read.cost_us, 62);
        assert!(model.latency.path.shared, "1.8 GB/s together: one path");
        assert!(model.latency.path.seek.is_zero());
        // Together at 7.2 GB/s in all: each direction as fast as alone, two paths.
        let last = points.len() - 1;
        points[last] = point("mixed", 4 << 20, 8, 7.2e9 / (4 << 20) as f64, 4000.0);
        assert!(!DiskModel::fit(&points).latency.path.shared);
        // The engine copies 256 KiB sub-jobs one at a time in 500 µs each, where a read and
        // a write alone take 2 × (62 + 7 + 72.8) = 283.6 µs: the 216.4 µs between requests go
        // to the cost, half each.
        points.push(point("copy", 256 << 10, 1, 2000.0, 500.0));
        let with_engine = DiskModel::fit(&points);
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
        let sized = DiskModel::fit(&points).latency;
        assert_eq!((sized.read.cost_us, sized.write.cost_us, sized.path.cost_us_per_mib), (112, 112, -20));
        points.truncate(engine);
        // Random 4 KiB reads one at a time in 5 ms instead of 70 µs: a seek.
        points.push(point("random-read", 4 << 10, 1, 200.0, 5070.0));
        let seek = DiskModel::fit(&points).latency.path.seek;
        assert_eq!(seek.full_stroke_us, (5000.0 / MEAN_SQRT_DISTANCE).round() as u64);
    }
}
