//! `Client::stats`: jobs by how they ended, per-device I/O with latency histograms, the
//! pool's high-water mark, in virtual time where latencies are exact.

use std::sync::Arc;

use kcopyd_core::{ClientConfig, Flags, Job, LATENCY_BUCKETS, Region};
use kcopyd_sim::{IoModel, Latency, MemDisk, MemDiskOptions, Simulation};

/// A disk whose requests each take exactly `cost_us`.
fn disk(name: &str, len_sectors: u64, cost_us: u64, write_zeroes: bool) -> Arc<MemDisk> {
    let model = IoModel { cost_us, ..IoModel::default() };
    let disk = Arc::new(MemDisk::new(MemDiskOptions {
        name: name.into(),
        len_sectors,
        write_zeroes,
        latency: Latency { read: model, write: model, ..Latency::default() },
        ..MemDiskOptions::default()
    }));
    disk.fill_pattern(9);
    disk
}

#[test]
fn stats_count_jobs_by_outcome_and_io_per_device_with_exact_latencies() {
    let config = ClientConfig { subjob_size_bytes: 512 * 1024, page_budget: 512, ..ClientConfig::default() };
    let stats = Simulation::run(config, |client, _trace| async move {
        assert_eq!(client.stats().jobs_submitted, 0);
        let source = disk("source", 4096, 1000, false); // 2 MiB, 1 ms per request
        let (t0, t1) = (disk("t0", 4096, 3000, false), disk("t1", 4096, 3000, true));
        // 1 MiB to two targets: two sub-jobs, each one read and two writes.
        let copy = Job::copy(
            Region::new(source.clone(), 0, 2048),
            vec![Region::new(t0.clone(), 0, 2048), Region::new(t1.clone(), 0, 2048)],
            Flags::empty(),
        );
        assert!(client.submit(copy).await.unwrap().await.is_ok());
        // A failing read: one more read, counted as an error.
        source.fail_reads(3000..3001);
        let failing = Job::copy(
            Region::new(source.clone(), 2048, 1024),
            vec![Region::new(t0.clone(), 2048, 1024)],
            Flags::empty(),
        );
        assert!(client.submit(failing).await.unwrap().await.read_err);
        // Cancelled before it started.
        let cancelled = client
            .submit(Job::copy(
                Region::new(source.clone(), 0, 1024),
                vec![Region::new(t0.clone(), 3072, 1024)],
                Flags::empty(),
            ))
            .await
            .unwrap();
        cancelled.cancel();
        assert!(cancelled.await.cancelled);
        // An offloaded zero of t1: one write-zeroes request.
        assert!(
            client
                .submit(Job::zero(vec![Region::new(t1.clone(), 2048, 2048)], Flags::empty()))
                .await
                .unwrap()
                .await
                .is_ok()
        );
        client.stats()
    })
    .unwrap();
    assert_eq!((stats.jobs_submitted, stats.jobs_completed, stats.jobs_failed, stats.jobs_cancelled), (4, 4, 1, 1));
    assert_eq!(stats.pool.pages_in_use, 0);
    assert_eq!(stats.pool.pages_in_use_max, 256, "both 512 KiB sub-jobs at once");
    assert_eq!(stats.page_wait_us, 0, "512 pages never ran short");
    let names: Vec<&str> = stats.devices.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["source", "t0", "t1"], "in the order of their identities");
    let [source, t0, t1] = &stats.devices[..] else { unreachable!() };
    assert_eq!((source.read.count, source.read.errors, source.read.bytes), (3, 1, 1024 * 1024));
    assert_eq!(source.read.latency.buckets[10], 3, "1000 µs is in 512..1024");
    assert_eq!(source.read.latency.max_us, 1000);
    assert_eq!(source.read.latency.sum_us, 3000);
    assert_eq!(source.write.count, 0);
    assert_eq!((t0.write.count, t0.write.errors, t0.write.bytes), (2, 0, 1024 * 1024));
    assert_eq!(t0.write.latency.quantile_us(0.99), Some(3000), "bucket 2048..4096, capped at the max");
    assert_eq!((t1.write.count, t1.write_zeroes.count, t1.write_zeroes.bytes), (2, 1, 1024 * 1024));
    assert_eq!(t1.write.latency.buckets.len(), LATENCY_BUCKETS);

    // Serde: one JSON object with every field named.
    let json = serde_json::to_value(&stats).unwrap();
    for key in
        ["jobs_submitted", "jobs_failed", "jobs_cancelled", "pool", "page_wait_us", "throttle_wait_us", "devices"]
    {
        assert!(json.get(key).is_some(), "{key} in {json}");
    }
    assert_eq!(json["devices"][0]["read"]["latency"]["max_us"], 1000);
    assert_eq!(json["pool"]["pages_in_use_max"], 256);
}

#[test]
fn waiting_for_pages_is_counted() {
    // One sub-job's pages for two jobs: the second waits for the first, 2 ms (read + write).
    let config = ClientConfig { subjob_size_bytes: 64 * 1024, page_budget: 16, ..ClientConfig::default() };
    let stats = Simulation::run(config, |client, _trace| async move {
        let source = disk("source", 256, 1000, false);
        let target = disk("target", 256, 1000, false);
        let job = |start: u64| {
            Job::copy(
                Region::new(source.clone(), start, 128),
                vec![Region::new(target.clone(), start, 128)],
                Flags::empty(),
            )
        };
        let first = client.submit(job(0)).await.unwrap();
        let second = client.submit(job(128)).await.unwrap();
        assert!(first.await.is_ok() && second.await.is_ok());
        client.stats()
    })
    .unwrap();
    assert_eq!(stats.page_wait_us, 2000);
    assert_eq!(stats.pool.pages_in_use_max, 16);
}
