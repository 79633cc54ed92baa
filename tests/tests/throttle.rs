//! The client's throttle in virtual time: the busy limit, the rate limit, changing them while
//! a copy runs, and what the throttle must never slow down (other clients, callbacks).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kcopyd_core::{Client, ClientConfig, ConfigError, Flags, Job, Region, Throttle};
use kcopyd_sim::{IoModel, Latency, MemDisk, MemDiskOptions, Simulation, Trace, to_model, to_tokio};
use kcopyd_tests::util::assert_same;
use proptest::prelude::*;
use tokio::time::Instant;

/// 32 MiB.
const LEN_SECTORS: u64 = 32 * 2048;

/// An SSD-like model: 50 µs per request, 2 GB/s reads, 1 GB/s writes, 8 requests at once.
fn ssd() -> Latency {
    Latency {
        read: IoModel { cost_us: 50, bandwidth_bytes_per_s: 2_000_000_000, queue_depth: 8, jitter_us: 0 },
        write: IoModel { cost_us: 50, bandwidth_bytes_per_s: 1_000_000_000, queue_depth: 8, jitter_us: 0 },
        seed: 0,
        ..Latency::default()
    }
}

/// A slower model, so that a small copy lasts long enough to span the throttle's busy window:
/// 100 µs per request, 200 MB/s reads, 100 MB/s writes, 4 requests at once, some jitter.
fn slow() -> Latency {
    Latency {
        read: IoModel { cost_us: 100, bandwidth_bytes_per_s: 200_000_000, queue_depth: 4, jitter_us: 20 },
        write: IoModel { cost_us: 100, bandwidth_bytes_per_s: 100_000_000, queue_depth: 4, jitter_us: 20 },
        seed: 5,
        ..Latency::default()
    }
}

/// A sparse disk with the SSD model, holding the pattern of `seed`.
fn disk(name: &str, len_sectors: u64, seed: u64) -> Arc<MemDisk> {
    disk_with(name, len_sectors, seed, ssd())
}

/// A sparse disk with the timing `latency`, holding the pattern of `seed`.
fn disk_with(name: &str, len_sectors: u64, seed: u64, latency: Latency) -> Arc<MemDisk> {
    let disk = Arc::new(MemDisk::new(MemDiskOptions {
        name: name.into(),
        len_sectors,
        sparse: true,
        latency,
        ..MemDiskOptions::default()
    }));
    disk.fill_pattern(seed);
    disk
}

fn copy_job(source: &Arc<MemDisk>, target: &Arc<MemDisk>, len_sectors: u64) -> Job {
    Job::copy(
        Region::new(source.clone(), 0, len_sectors),
        vec![Region::new(target.clone(), 0, len_sectors)],
        Flags::empty(),
    )
}

fn config(throttle: Throttle) -> ClientConfig {
    // The kernel's shape (512 KiB sub-jobs, 8 in flight), which the expectations below count in.
    ClientConfig { throttle, subjob_size_bytes: 512 * 1024, subjobs_in_flight: 8, ..ClientConfig::default() }
}

/// Copies `len_sectors` between disks of timing `latency` with `throttle` and returns the
/// model time it took; `during` runs beside the copy with the client (to change the throttle,
/// say).
fn timed_copy<F, Fut>(latency: Latency, throttle: Throttle, len_sectors: u64, during: F) -> Duration
where
    F: FnOnce(Client) -> Fut + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    Simulation::run(config(throttle), |client, _trace| async move {
        let source = disk_with("source", len_sectors, 1, latency.clone());
        let target = disk_with("target", len_sectors, 2, latency);
        let began = Instant::now();
        let handle = client.submit(copy_job(&source, &target, len_sectors)).await.unwrap();
        actix_rt::spawn(during(client.clone()));
        let outcome = handle.await;
        assert!(outcome.is_ok(), "{outcome:?}");
        assert_same(&source, 0, &target, 0, len_sectors);
        to_model(began.elapsed())
    })
    .unwrap()
}

async fn nothing(_client: Client) {}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64()
}

#[test]
fn a_50_percent_busy_limit_doubles_the_time_of_a_copy() {
    // About 0.4 s of model time unthrottled, 0.8 s throttled.
    let free = timed_copy(slow(), Throttle::OFF, LEN_SECTORS, nothing);
    let half = timed_copy(slow(), Throttle { busy_percent: Some(50), ..Throttle::OFF }, LEN_SECTORS, nothing);
    let slowdown = ratio(half, free);
    println!("unthrottled {free:?}, at 50 % busy {half:?}: {slowdown:.3}×");
    assert!((1.8..=2.2).contains(&slowdown), "unthrottled {free:?}, at 50 % busy {half:?}: {slowdown:.3}×");
    // 100 % is no limit at all.
    let full = timed_copy(slow(), Throttle { busy_percent: Some(100), ..Throttle::OFF }, LEN_SECTORS, nothing);
    assert_eq!(full, free);
}

#[test]
fn a_25_percent_busy_limit_quadruples_it() {
    let free = timed_copy(slow(), Throttle::OFF, LEN_SECTORS, nothing);
    let quarter = timed_copy(slow(), Throttle { busy_percent: Some(25), ..Throttle::OFF }, LEN_SECTORS, nothing);
    let slowdown = ratio(quarter, free);
    println!("unthrottled {free:?}, at 25 % busy {quarter:?}: {slowdown:.3}×");
    assert!((3.6..=4.4).contains(&slowdown), "unthrottled {free:?}, at 25 % busy {quarter:?}: {slowdown:.3}×");
}

#[test]
fn a_100_mb_per_s_limit_copies_at_100_mb_per_s() {
    let free = timed_copy(ssd(), Throttle::OFF, LEN_SECTORS, nothing);
    let limited =
        timed_copy(ssd(), Throttle { rate_bytes_per_s: Some(100_000_000), ..Throttle::OFF }, LEN_SECTORS, nothing);
    let bytes = (LEN_SECTORS * 512) as f64;
    let rate = bytes / limited.as_secs_f64();
    println!("{rate:.0} bytes/s in {limited:?} (unthrottled {free:?})");
    assert!((rate - 1e8).abs() <= 0.05 * 1e8, "{rate:.0} bytes/s in {limited:?}");
    assert!(bytes / free.as_secs_f64() > 3e8, "the disks alone are much faster: {free:?}");
}

#[test]
fn changing_the_rate_mid_copy_takes_effect_at_once() {
    // 50 MB/s for the first 0.2 s (10 MB), then 200 MB/s for the remaining 23.6 MB.
    let fifty = Throttle { rate_bytes_per_s: Some(50_000_000), ..Throttle::OFF };
    let fast = Throttle { rate_bytes_per_s: Some(200_000_000), ..Throttle::OFF };
    let changed = timed_copy(ssd(), fifty, LEN_SECTORS, move |client| async move {
        tokio::time::sleep(to_tokio(Duration::from_millis(200))).await;
        client.set_throttle(fast).unwrap();
        assert_eq!(client.throttle(), fast);
    });
    let bytes = (LEN_SECTORS * 512) as f64;
    let expected = 0.2 + (bytes - 10e6) / 200e6;
    let error = (changed.as_secs_f64() - expected).abs() / expected;
    println!("rate raised mid-copy: {changed:?}, expected {expected:.3} s");
    assert!(error <= 0.05, "took {changed:?}, expected {expected:.3} s");

    // And the other way: the busy limit switched off mid-copy.
    let quarter = Throttle { busy_percent: Some(25), ..Throttle::OFF };
    let free = timed_copy(slow(), Throttle::OFF, LEN_SECTORS, nothing);
    let throttled = timed_copy(slow(), quarter, LEN_SECTORS, nothing);
    let released = timed_copy(slow(), quarter, LEN_SECTORS, move |client| async move {
        tokio::time::sleep(to_tokio(free)).await;
        client.set_throttle(Throttle::OFF).unwrap();
    });
    // A quarter of the copy at 25 % in `free`, the rest at full speed: 1.75 × `free`.
    let slowdown = ratio(released, free);
    println!("busy limit lifted mid-copy: {released:?} ({slowdown:.2}×), throttled throughout {throttled:?}");
    assert!((1.6..=1.9).contains(&slowdown), "released after {free:?}: {released:?} ({slowdown:.2}×)");
    assert!(released < throttled);
}

#[test]
fn another_unthrottled_client_is_not_slowed() {
    let throttled = Throttle { busy_percent: Some(10), rate_bytes_per_s: Some(10_000_000) };
    let other_alone = timed_copy(ssd(), Throttle::OFF, LEN_SECTORS, nothing);
    let other_beside = Simulation::run(config(throttled), |slow_client, _trace| async move {
        let fast_client = Client::start_in_current_system(config(Throttle::OFF)).unwrap();
        let (slow_source, slow_target) = (disk("slow-source", LEN_SECTORS, 3), disk("slow-target", LEN_SECTORS, 4));
        let (source, target) = (disk("source", LEN_SECTORS, 1), disk("target", LEN_SECTORS, 2));
        let slow = slow_client.submit(copy_job(&slow_source, &slow_target, LEN_SECTORS)).await.unwrap();
        let began = Instant::now();
        let outcome = fast_client.submit(copy_job(&source, &target, LEN_SECTORS)).await.unwrap().await;
        let took = to_model(began.elapsed());
        assert!(outcome.is_ok());
        assert!(slow.try_outcome().is_none(), "the throttled copy is still running");
        fast_client.shutdown().await;
        assert!(slow.await.is_ok());
        took
    })
    .unwrap();
    assert_eq!(other_beside, other_alone);
}

#[test]
fn a_callback_runs_when_its_last_write_lands_while_other_subjobs_wait_for_the_throttle() {
    let throttled = Throttle { busy_percent: Some(30), rate_bytes_per_s: Some(10_000_000) };
    let (callback_at, last_write_at) = Simulation::run(config(throttled), |client, trace| async move {
        let (big_source, big_target) = (disk("big-source", LEN_SECTORS, 3), disk("big-target", LEN_SECTORS, 4));
        let (source, target) = (disk("source", 2048, 1), disk("target", 2048, 2));
        target.set_trace(trace.clone());
        let big = client.submit(copy_job(&big_source, &big_target, LEN_SECTORS)).await.unwrap();
        let called: Arc<Mutex<Option<bool>>> = Arc::default();
        let small = copy_job(&source, &target, 2048).on_complete({
            let (trace, called, big) = (trace.clone(), called.clone(), big.clone());
            move |outcome| {
                trace.record("small job's callback");
                *called.lock().unwrap() = Some(outcome.is_ok() && big.try_outcome().is_none());
            }
        });
        assert!(client.submit(small).await.unwrap().await.is_ok());
        assert_eq!(*called.lock().unwrap(), Some(true), "called, ok, while the big copy still waits");
        big.cancel();
        big.await;
        event_times(&trace)
    })
    .unwrap();
    assert_eq!(callback_at, last_write_at, "the callback ran in the same instant as the last write");
}

/// The model time of the small job's callback and of the last write to its target.
fn event_times(trace: &Trace) -> (u64, u64) {
    let events = trace.events();
    let callback = events.iter().find(|e| e.what == "small job's callback").expect("the callback ran");
    let last_write = events
        .iter()
        .rfind(|e| e.what.starts_with("target ") && e.what.contains("Write"))
        .expect("the target was written");
    assert!(last_write.sequence < callback.sequence);
    (callback.at_ns, last_write.at_ns)
}

#[test]
fn cancel_completes_a_job_whose_subjobs_wait_for_the_throttle() {
    // 1 MB/s: each 512 KiB sub-job waits half a second for the bucket.
    let crawl = Throttle { rate_bytes_per_s: Some(1_000_000), ..Throttle::OFF };
    let (took, outcome) = Simulation::run(config(crawl), |client, _trace| async move {
        let (source, target) = (disk("source", LEN_SECTORS, 1), disk("target", LEN_SECTORS, 2));
        let handle = client.submit(copy_job(&source, &target, LEN_SECTORS)).await.unwrap();
        tokio::time::sleep(to_tokio(Duration::from_millis(100))).await;
        let began = Instant::now();
        handle.cancel();
        let outcome = handle.await;
        (to_model(began.elapsed()), outcome)
    })
    .unwrap();
    assert!(outcome.cancelled, "{outcome:?}");
    assert!(took < Duration::from_millis(1), "cancel took {took:?}");
    // Only the first sub-job (the bucket's burst) was copied.
    assert_eq!(outcome.targets[0].not_copied.len_sectors(), LEN_SECTORS - 1024);
}

#[test]
fn bad_throttle_values_are_refused_by_validate_and_by_set_throttle() {
    let zero_busy = config(Throttle { busy_percent: Some(0), ..Throttle::OFF });
    assert!(matches!(zero_busy.validate(), Err(ConfigError::ThrottleBusy { percent: 0 })));
    let over = config(Throttle { busy_percent: Some(150), ..Throttle::OFF });
    assert!(matches!(Client::new(over), Err(ConfigError::ThrottleBusy { percent: 150 })));
    let zero_rate = config(Throttle { rate_bytes_per_s: Some(0), ..Throttle::OFF });
    assert!(matches!(zero_rate.validate(), Err(ConfigError::ThrottleRate { bytes_per_s: 0 })));

    let kept = Throttle { busy_percent: Some(40), rate_bytes_per_s: None };
    let client = Client::new(config(kept)).unwrap();
    let error = client.set_throttle(Throttle { rate_bytes_per_s: Some(0), ..Throttle::OFF }).unwrap_err();
    assert!(matches!(error, ConfigError::ThrottleRate { .. }));
    assert_eq!(client.throttle(), kept, "a refused throttle changes nothing");
    client.shutdown_blocking();
}

#[test]
fn the_throttle_is_part_of_the_serde_config_and_off_by_default() {
    assert_eq!(ClientConfig::default().throttle, Throttle::OFF);
    let config: ClientConfig =
        serde_json::from_str(r#"{"throttle": {"busy_percent": 50, "rate_bytes_per_s": 1000}}"#).unwrap();
    assert_eq!(config.throttle, Throttle { busy_percent: Some(50), rate_bytes_per_s: Some(1000) });
    assert!(serde_json::from_str::<ClientConfig>(r#"{"throttle": {"busy": 50}}"#).is_err());
}

/// One job of a random mix: where it copies from and to, whether to cancel it and when.
#[derive(Debug, Clone)]
struct MixJob {
    start_sector: u64,
    len_sectors: u64,
    write_seq: bool,
    cancel_after_us: Option<u64>,
}

fn arb_throttle() -> impl Strategy<Value = Throttle> {
    (proptest::option::of(1u32..=100), proptest::option::of(1_000_000u64..2_000_000_000))
        .prop_map(|(busy_percent, rate_bytes_per_s)| Throttle { busy_percent, rate_bytes_per_s })
}

fn arb_job() -> impl Strategy<Value = MixJob> {
    (0u64..16, 1u64..=16, any::<bool>(), proptest::option::of(0u64..20_000)).prop_map(
        |(start, len, write_seq, cancel_after_us)| MixJob {
            start_sector: start * 128,
            len_sectors: len * 128,
            write_seq,
            cancel_after_us,
        },
    )
}

/// Runs `jobs` on one client under `throttle`, changed to `changed` after `change_after_us`;
/// checks that every job completes once, that what a job reports copied is the source's data,
/// and (in `Simulation::run`'s shutdown) that every page came back.
fn run_mix(throttle: Throttle, changed: Throttle, change_after_us: u64, page_budget: usize, jobs: Vec<MixJob>) {
    let config = ClientConfig {
        throttle,
        page_budget,
        subjob_size_bytes: 64 * 1024,
        subjobs_in_flight: 4,
        ..ClientConfig::default()
    };
    Simulation::run(config, |client, _trace| async move {
        let source = disk_with("source", 4096, 1, slow());
        let mut handles = Vec::new();
        for (index, job) in jobs.iter().enumerate() {
            // Each job its own target, so that reports can be checked one by one.
            let target = disk_with(&format!("target{index}"), 4096, 100 + index as u64, slow());
            let flags = if job.write_seq { Flags::WRITE_SEQ } else { Flags::empty() };
            let region = |disk: &Arc<MemDisk>| Region::new(disk.clone(), job.start_sector, job.len_sectors);
            let handle = client.submit(Job::copy(region(&source), vec![region(&target)], flags)).await.unwrap();
            if let Some(after) = job.cancel_after_us {
                let handle = handle.clone();
                actix_rt::spawn(async move {
                    tokio::time::sleep(to_tokio(Duration::from_micros(after))).await;
                    handle.cancel();
                });
            }
            handles.push((handle, target, job.clone()));
        }
        actix_rt::spawn({
            let client = client.clone();
            async move {
                tokio::time::sleep(to_tokio(Duration::from_micros(change_after_us))).await;
                client.set_throttle(changed).unwrap();
            }
        });
        for (handle, target, job) in handles {
            let outcome = handle.await;
            assert!(!outcome.read_err && outcome.write_err.is_empty() && outcome.panicked.is_none(), "{outcome:?}");
            assert!(outcome.cancelled || outcome.targets[0].not_copied.is_empty(), "{job:?}: {outcome:?}");
            let all = kcopyd_core::RangeSet::from_range(job.start_sector..job.start_sector + job.len_sectors);
            for copied in all.difference(&outcome.targets[0].not_copied).ranges() {
                assert_same(&source, copied.start, &target, copied.start, copied.end - copied.start);
            }
            if job.write_seq {
                // Sequential: what was copied is one run from the start.
                assert!(outcome.targets[0].not_copied.ranges().len() <= 1, "{outcome:?}");
                assert!(outcome.targets[0].not_copied.ranges().iter().all(|r| r.end == all.ranges()[0].end));
            }
        }
        let stats = client.stats();
        assert_eq!(stats.jobs_completed, jobs.len() as u64);
    })
    .unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(24), ..ProptestConfig::default() })]

    #[test]
    fn any_throttle_and_any_change_complete_every_job_once_with_true_reports(
        throttle in arb_throttle(),
        changed in arb_throttle(),
        change_after_us in 0u64..50_000,
        page_budget in 16usize..64,
        jobs in proptest::collection::vec(arb_job(), 1..6),
    ) {
        run_mix(throttle, changed, change_after_us, page_budget, jobs);
    }
}
