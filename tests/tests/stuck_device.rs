//! A device that does not complete: the per-I/O timeout, where the buffer's pages go, and
//! cancelling a job that waits for pages a stuck job holds. In virtual time.

use std::sync::Arc;
use std::time::Duration;

use kcopyd_core::{ClientConfig, ConfigError, Flags, Job, RangeSet, TargetMask};
use kcopyd_sim::{Simulation, to_model, to_tokio};
use kcopyd_tests::util::{Gate, HookedDisk, assert_same, patterned, region, zeroed};
use tokio::time::Instant;

/// 64 KiB sub-jobs (16 pages), a 100 ms timeout.
fn config() -> ClientConfig {
    ClientConfig { subjob_size_bytes: 64 * 1024, io_timeout_ms: Some(100), ..ClientConfig::default() }
}

/// Lets the simulation run for `ms` of model time.
async fn pass_ms(ms: u64) {
    tokio::time::sleep(to_tokio(Duration::from_millis(ms))).await;
}

#[test]
fn a_read_that_never_completes_times_out_and_keeps_its_pages_until_the_device_returns_them() {
    for flags in [Flags::empty(), Flags::IGNORE_ERROR] {
        let source = patterned("source", 256, 512, 1);
        let target = zeroed("target", 256, 512);
        let gate = Arc::new(Gate::new());
        // Every read is held: two sub-jobs of 128 sectors, both stuck.
        let stuck = HookedDisk::new(source.clone()).hold_reads(gate.clone());
        let stuck_region = stuck.region(0, 256);
        Simulation::run(ClientConfig { page_budget: 64, ..config() }, |client, _trace| {
            let (target, gate, source) = (target.clone(), gate.clone(), source.clone());
            async move {
                let began = Instant::now();
                let job = Job::copy(stuck_region, vec![region(&target, 0, 256)], flags);
                let outcome = client.submit(job).await.unwrap().await;
                let took = to_model(began.elapsed());
                assert!(outcome.read_err, "{flags:?}: {outcome:?}");
                // Both sub-jobs' reads were held, so both timed out, whole (no narrowing).
                assert_eq!(outcome.read_failed, RangeSet::from_range(0..256), "{flags:?}");
                assert_eq!(outcome.targets[0].not_copied, RangeSet::from_range(0..256));
                assert!(took >= Duration::from_millis(100) && took < Duration::from_millis(101), "{took:?}");
                let stats = client.stats();
                let reads = &stats.devices.iter().find(|d| d.name == "source").unwrap().read;
                assert_eq!((reads.count, reads.timeouts, reads.errors), (2, 2, 2), "{flags:?}");
                // The device still holds both buffers: 2 × 16 pages.
                assert_eq!(client.pool_stats().pages_in_use, 32);
                assert_eq!(gate.held(), 2);
                assert_eq!(stats.requests_outstanding, 2);
                gate.open();
                pass_ms(1).await;
                assert_eq!(client.stats().requests_outstanding, 0);
                assert_eq!(client.pool_stats().pages_in_use, 0, "the pages came back with the buffers");
                // The late reads changed nothing on the target.
                assert!(target.snapshot(0, 256).iter().all(|&b| b == 0));
                assert_eq!(source.stats().reads, 2);
            }
        })
        .unwrap();
    }
}

#[test]
fn a_write_that_never_completes_fails_its_target_only() {
    let source = patterned("source", 256, 512, 2);
    let (healthy, stuck_disk) = (zeroed("healthy", 256, 512), zeroed("stuck", 256, 512));
    let gate = Arc::new(Gate::new());
    let stuck = HookedDisk::new(stuck_disk.clone()).hold_writes(gate.clone()).region(0, 256);
    Simulation::run(config(), |client, _trace| {
        let (source, healthy, gate) = (source.clone(), healthy.clone(), gate.clone());
        async move {
            let job = Job::copy(region(&source, 0, 256), vec![region(&healthy, 0, 256), stuck], Flags::IGNORE_ERROR);
            let outcome = client.submit(job).await.unwrap().await;
            assert!(!outcome.read_err);
            let mut failed = TargetMask::default();
            failed.set(1);
            assert_eq!(outcome.write_err, failed);
            assert!(outcome.targets[0].not_copied.is_empty());
            assert_eq!(outcome.targets[1].write_failed, RangeSet::from_range(0..256));
            assert_eq!(outcome.targets[1].not_copied, RangeSet::from_range(0..256));
            assert_same(&source, 0, &healthy, 0, 256);
            let stats = client.stats();
            let writes = &stats.devices.iter().find(|d| d.name == "stuck").unwrap().write;
            assert_eq!(writes.timeouts, 2);
            assert!(client.pool_stats().pages_in_use > 0, "the stuck writes still hold their data");
            gate.open();
            pass_ms(1).await;
            assert_eq!(client.pool_stats().pages_in_use, 0);
        }
    })
    .unwrap();
}

#[test]
fn cancel_completes_a_job_waiting_for_pages_that_a_stuck_job_holds() {
    // No timeout. One sub-job's worth of pages: the stuck job holds them all.
    let config = ClientConfig { page_budget: 16, io_timeout_ms: None, ..config() };
    let source = patterned("source", 256, 512, 3);
    let (target, other) = (zeroed("target", 256, 512), zeroed("other", 256, 512));
    let gate = Arc::new(Gate::new());
    let stuck = HookedDisk::new(source.clone()).hold_reads(gate.clone()).region(0, 128);
    Simulation::run(config, |client, _trace| {
        let (source, target, other, gate) = (source.clone(), target.clone(), other.clone(), gate.clone());
        async move {
            let stuck_job =
                client.submit(Job::copy(stuck, vec![region(&target, 0, 128)], Flags::empty())).await.unwrap();
            let waiting = client
                .submit(Job::copy(region(&source, 0, 256), vec![region(&other, 0, 256)], Flags::empty()))
                .await
                .unwrap();
            pass_ms(1000).await;
            assert!(stuck_job.try_outcome().is_none() && waiting.try_outcome().is_none());
            assert_eq!(client.stats().page_wait_us, 0, "still waiting: counted when the wait ends");
            let began = Instant::now();
            waiting.cancel();
            let outcome = waiting.await;
            assert_eq!(to_model(began.elapsed()), Duration::ZERO, "cancelled at once");
            assert!(outcome.cancelled);
            assert_eq!(outcome.targets[0].not_copied, RangeSet::from_range(0..256));
            assert!(other.snapshot(0, 256).iter().all(|&b| b == 0));
            let stats = client.stats();
            assert!(stats.page_wait_us >= 1_000_000, "{stats:?}");
            assert_eq!((stats.jobs_completed, stats.jobs_cancelled), (1, 1));
            // The stuck job finishes when its device does.
            gate.open();
            assert!(stuck_job.await.is_ok());
            assert_same(&source, 0, &target, 0, 128);
        }
    })
    .unwrap();
}

#[test]
fn a_zero_timeout_is_refused() {
    let config = ClientConfig { io_timeout_ms: Some(0), ..ClientConfig::default() };
    assert!(matches!(config.validate(), Err(ConfigError::IoTimeout { ms: 0 })));
    assert!(ClientConfig { io_timeout_ms: Some(1), ..ClientConfig::default() }.validate().is_ok());
}

#[test]
fn shutdown_reports_requests_still_held_by_a_stuck_device_instead_of_failing() {
    let source = patterned("source", 128, 512, 4);
    let target = zeroed("target", 128, 512);
    let gate = Arc::new(Gate::new());
    let stuck = HookedDisk::new(source.clone()).hold_reads(gate.clone()).region(0, 128);
    Simulation::block_on(async move {
        let client = kcopyd_core::Client::start_in_current_system(config()).unwrap();
        let outcome =
            client.submit(Job::copy(stuck, vec![region(&target, 0, 128)], Flags::empty())).await.unwrap().await;
        assert!(outcome.read_err);
        let report = client.shutdown().await;
        assert_eq!(report.requests_outstanding, 1);
        assert_eq!(report.pool.pages_in_use, 16, "the stuck read's buffer");
        assert_eq!(report.jobs_completed, 1);
        // The device returns the buffer late: the pages come back and nothing is outstanding.
        assert_eq!(client.stats().requests_outstanding, 1);
        gate.open();
        pass_ms(1).await;
        assert_eq!(client.pool_stats().pages_in_use, 0);
        assert_eq!(client.stats().requests_outstanding, 0);
    });
}
