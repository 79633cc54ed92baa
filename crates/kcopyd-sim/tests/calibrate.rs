//! The fitter against a truth: calibrate a simulated disk of a known [`DiskModel`] in virtual
//! time, and check that the fitted model gives back the parameters the disk was built with.
//!
//! ```text
//!  truth: DiskModel ─► MemDisk (virtual time) ─► explore::calibrate ─► fitted DiskModel
//!                                                                      ≈ truth, within TOLERANCE
//! ```
//!
//! The tolerance (docs/EXPLORATION.md, "Calibration against a known disk"): every fitted
//! time within 1 µs of the truth, every bandwidth within 0.1 %, the path's sharing exactly,
//! no seek, and no engine time (the simulated engine spends none between requests). The
//! simulator's clock ends each request on a whole model microsecond, hence the 1 µs.

use std::sync::Arc;
use std::time::Duration;

use kcopyd_sim::explore::calibrate::{Calibrated, CalibrationPlan, ScratchRange, calibrate};
use kcopyd_sim::{DiskModel, IoModel, Latency, PathModel, SeekModel, Simulation};

/// A fitted time (cost, path overhead, engine time per MiB) may differ from the truth by
/// this many microseconds: the simulator's clock ends each request on a whole microsecond,
/// so a request alone of 105.24 µs is measured as 106 and its cost as 1 µs more.
const TIME_TOLERANCE_US: f64 = 1.0;
/// A fitted bandwidth may differ from the truth by this share of it.
const BANDWIDTH_TOLERANCE_SHARE: f64 = 0.001;
/// The scratch range: the whole simulated disk.
const DISK_BYTES: u64 = 64 << 20;

/// A disk with these timings, everything else zero.
fn truth(read: (u64, u64, u64), write: (u64, u64, u64), shared: bool) -> DiskModel {
    let io = |(cost_us, bandwidth_bytes_per_s, _): (u64, u64, u64)| IoModel {
        cost_us,
        bandwidth_bytes_per_s,
        ..IoModel::default()
    };
    DiskModel {
        description: "the truth".into(),
        latency: Latency {
            read: io(read),
            write: io(write),
            path: PathModel { shared, read_overhead_us: read.2, write_overhead_us: write.2, ..PathModel::default() },
            ..Latency::default()
        },
        ..DiskModel::default()
    }
}

/// Calibrates a fresh simulated disk of `model` in virtual time.
fn calibrate_simulated(model: &DiskModel) -> Calibrated {
    let options = model.options("truth", DISK_BYTES / 512, 1);
    let plan = CalibrationPlan {
        io_sizes_bytes: vec![4 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20],
        queue_depths: vec![1, 4, 16, 32],
        point_time: Duration::from_millis(200),
        rounds: 1,
    };
    Simulation::block_on(async move {
        let scratch =
            ScratchRange { device: Arc::new(DiskModel::disk(options, None)), offset_bytes: 0, len_bytes: DISK_BYTES };
        calibrate(&scratch, &plan, &mut |_| {}).await.expect("a simulated disk calibrates")
    })
}

fn assert_time_near(what: &str, fitted: f64, truth: f64) {
    let tolerance = TIME_TOLERANCE_US;
    assert!((fitted - truth).abs() <= tolerance, "{what}: fitted {fitted} µs, truth {truth} µs (± {tolerance})");
}

fn assert_bandwidth_near(what: &str, fitted: u64, truth: u64) {
    let error = (fitted as f64 - truth as f64).abs() / truth as f64;
    assert!(error <= BANDWIDTH_TOLERANCE_SHARE, "{what}: fitted {fitted} B/s, truth {truth} B/s ({error:.4})");
}

/// Every parameter the fit produces, against the truth.
fn assert_recovers(truth: &DiskModel) {
    let calibrated = calibrate_simulated(truth);
    let (fitted, truth) = (&calibrated.model.latency, &truth.latency);
    eprintln!("truth  {truth:?}\nfitted {fitted:?}");
    assert_bandwidth_near("read bandwidth", fitted.read.bandwidth_bytes_per_s, truth.read.bandwidth_bytes_per_s);
    assert_bandwidth_near("write bandwidth", fitted.write.bandwidth_bytes_per_s, truth.write.bandwidth_bytes_per_s);
    assert_time_near("read cost", fitted.read.cost_us as f64, truth.read.cost_us as f64);
    assert_time_near("write cost", fitted.write.cost_us as f64, truth.write.cost_us as f64);
    assert_time_near("read overhead", fitted.path.read_overhead_us as f64, truth.path.read_overhead_us as f64);
    assert_time_near("write overhead", fitted.path.write_overhead_us as f64, truth.path.write_overhead_us as f64);
    assert_time_near("engine time per MiB", fitted.path.cost_us_per_mib as f64, 0.0);
    assert_eq!(fitted.path.shared, truth.path.shared, "shared path");
    assert_eq!(fitted.path.seek, SeekModel::default(), "no seek");
    assert_eq!(calibrated.spread, 0.0, "virtual time: every round alike");
}

#[test]
fn the_fit_recovers_a_disk_with_a_path_each_way() {
    // Reads: 80 µs, 400 MB/s, 15 µs a request on the path; writes: 120 µs, 250 MB/s, 25 µs.
    assert_recovers(&truth((80, 400_000_000, 15), (120, 250_000_000, 25), false));
}

#[test]
fn the_fit_recovers_a_disk_whose_reads_and_writes_share_one_path() {
    assert_recovers(&truth((60, 800_000_000, 10), (90, 500_000_000, 20), true));
}

/// A fitted full stroke may differ from the truth by this share of it (random reads sample
/// the distances; their mean is the square-root law's 8/15 of a full stroke only on average).
const SEEK_TOLERANCE_SHARE: f64 = 0.01;

#[test]
fn the_fit_recovers_a_spinning_disk_and_its_seek() {
    // 150 MB/s each way, 100 µs a request, 5 µs on the path, an 8 ms full stroke.
    let mut truth = truth((100, 150_000_000, 5), (100, 150_000_000, 5), false);
    truth.latency.path.seek = SeekModel { track_us: 0, full_stroke_us: 8000, rotation_us: 0 };
    let calibrated = calibrate_simulated(&truth);
    let (fitted, truth) = (&calibrated.model.latency, &truth.latency);
    eprintln!("truth  {truth:?}\nfitted {fitted:?}");
    assert_bandwidth_near("read bandwidth", fitted.read.bandwidth_bytes_per_s, truth.read.bandwidth_bytes_per_s);
    assert_time_near("read cost", fitted.read.cost_us as f64, truth.read.cost_us as f64);
    assert_time_near("read overhead", fitted.path.read_overhead_us as f64, truth.path.read_overhead_us as f64);
    assert_time_near("engine time per MiB", fitted.path.cost_us_per_mib as f64, 0.0);
    let (full, truth_full) = (fitted.path.seek.full_stroke_us as f64, truth.path.seek.full_stroke_us as f64);
    assert!(
        (full - truth_full).abs() <= truth_full * SEEK_TOLERANCE_SHARE,
        "full stroke {full} µs, truth {truth_full}"
    );
}

#[test]
fn a_jittery_disk_fits_its_mean_jitter_into_the_cost() {
    // The model has no jitter: up to 20 µs more per request, uniformly drawn, is 10 µs more
    // cost on the median request; bandwidths and overheads are those of the truth.
    let mut truth = truth((80, 400_000_000, 15), (120, 250_000_000, 25), false);
    (truth.latency.read.jitter_us, truth.latency.write.jitter_us) = (20, 20);
    let calibrated = calibrate_simulated(&truth);
    let (fitted, truth) = (&calibrated.model.latency, &truth.latency);
    eprintln!("truth  {truth:?}\nfitted {fitted:?}");
    assert_bandwidth_near("read bandwidth", fitted.read.bandwidth_bytes_per_s, truth.read.bandwidth_bytes_per_s);
    assert_bandwidth_near("write bandwidth", fitted.write.bandwidth_bytes_per_s, truth.write.bandwidth_bytes_per_s);
    assert_time_near("read cost", fitted.read.cost_us as f64, truth.read.cost_us as f64 + 10.0);
    assert_time_near("write cost", fitted.write.cost_us as f64, truth.write.cost_us as f64 + 10.0);
    assert_time_near("read overhead", fitted.path.read_overhead_us as f64, truth.path.read_overhead_us as f64);
    assert_time_near("write overhead", fitted.path.write_overhead_us as f64, truth.path.write_overhead_us as f64);
    assert_time_near("engine time per MiB", fitted.path.cost_us_per_mib as f64, 0.0);
}
