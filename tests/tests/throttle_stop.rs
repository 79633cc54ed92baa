//! A rate-limited job stopped by an error gives up the sub-jobs still waiting for the throttle
//! at once: it completes when its failed sub-job does, nothing is charged to the rate for the
//! sub-jobs it gave up, and another job's sub-jobs queued behind them move up. In virtual time.

use std::sync::Arc;
use std::time::Duration;

use kcopyd_core::{ClientConfig, Flags, Job, Region, Throttle};
use kcopyd_sim::{IoModel, Latency, MemDisk, MemDiskOptions, Simulation, to_model};
use tokio::time::Instant;

/// 512 KiB sub-jobs.
const SUBJOB_SECTORS: u64 = 1024;
/// 10 MB/s: one 512 KiB sub-job every 52.4 ms.
const RATE_BYTES_PER_S: u64 = 10_000_000;

fn interval() -> Duration {
    Duration::from_nanos(SUBJOB_SECTORS * 512 * 1_000_000_000 / RATE_BYTES_PER_S)
}

/// A sparse disk with a fast model (50 µs a request), holding the pattern of `seed`.
fn disk(name: &str, len_sectors: u64, seed: u64) -> Arc<MemDisk> {
    let model = IoModel { cost_us: 50, bandwidth_bytes_per_s: 2_000_000_000, queue_depth: 8, jitter_us: 0 };
    let disk = Arc::new(MemDisk::new(MemDiskOptions {
        name: name.into(),
        len_sectors,
        sparse: true,
        latency: Latency { read: model, write: model, ..Latency::default() },
        ..MemDiskOptions::default()
    }));
    disk.fill_pattern(seed);
    disk
}

fn copy(source: &Arc<MemDisk>, target: &Arc<MemDisk>, len_sectors: u64) -> Job {
    Job::copy(
        Region::new(source.clone(), 0, len_sectors),
        vec![Region::new(target.clone(), 0, len_sectors)],
        Flags::empty(),
    )
}

#[test]
fn a_stopped_throttled_job_gives_up_its_waiting_subjobs_at_once() {
    let throttle = Throttle { rate_bytes_per_s: Some(RATE_BYTES_PER_S), ..Throttle::OFF };
    let config =
        ClientConfig { throttle, subjob_size_bytes: 512 * 1024, subjobs_in_flight: 8, ..ClientConfig::default() };
    let len_sectors = 16 * SUBJOB_SECTORS;
    let (failed_at, other_at, outcome, other_ok) = Simulation::run(config, |client, _trace| async move {
        let (source, target) = (disk("source", len_sectors, 1), disk("target", len_sectors, 2));
        // Sub-job 3 cannot be read: issued at 3 intervals, it stops the job while sub-jobs
        // 4 to 7 wait for the rate.
        source.fail_reads(3 * SUBJOB_SECTORS..3 * SUBJOB_SECTORS + 1);
        let (other_source, other_target) =
            (disk("other-source", SUBJOB_SECTORS, 3), disk("other-target", SUBJOB_SECTORS, 4));
        let began = Instant::now();
        let failing = client.submit(copy(&source, &target, len_sectors)).await.unwrap();
        // Queued behind the failing job's waiting sub-jobs.
        let other = client.submit(copy(&other_source, &other_target, SUBJOB_SECTORS)).await.unwrap();
        let outcome = failing.await;
        let failed_at = to_model(began.elapsed());
        let other_ok = other.await.is_ok();
        (failed_at, to_model(began.elapsed()), outcome, other_ok)
    })
    .unwrap();
    let interval = interval();
    println!("interval {interval:?}: the failing job completed at {failed_at:?}, the other at {other_at:?}");
    assert!(outcome.read_err && !outcome.cancelled, "{outcome:?}");
    assert_eq!(outcome.targets[0].not_copied.len_sectors(), len_sectors - 3 * SUBJOB_SECTORS, "{outcome:?}");
    assert!(other_ok);
    // The failed read was issued at 3 intervals and took well under a millisecond.
    assert!(failed_at < interval * 3 + Duration::from_millis(2), "the failing job completed at {failed_at:?}");
    // The other job's sub-job is the next one the rate lets go: at 4 intervals, not after four
    // phantom sub-jobs of the failed job (8 intervals).
    assert!(other_at < interval * 4 + Duration::from_millis(2), "the other job completed at {other_at:?}");
}
