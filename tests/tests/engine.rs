//! The copy engine through its public API, on in-memory disks.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use kcopyd_core::{Client, ClientConfig, Flags, Job, Outcome, RangeSet, SubmitError, TargetMask};
use kcopyd_sim::{IoModel, Latency, MemDisk, MemDiskOptions};
use kcopyd_tests::util::{HookedDisk, assert_same, patterned, region, zeroed};

fn client(config: ClientConfig) -> Client {
    Client::new(config).expect("valid configuration")
}

fn small_subjobs() -> ClientConfig {
    // 8 KiB sub-jobs, so that small disks still make many sub-jobs.
    ClientConfig { subjob_size_bytes: 8192, ..ClientConfig::default() }
}

#[test]
fn multi_target_copy_with_ragged_length_to_different_offsets() {
    let client = client(ClientConfig::default());
    // 2.5 sub-jobs of the default 1 MiB plus 3 sectors.
    let len = 2048 * 2 + 1024 + 3;
    let source = patterned("source", 8000, 512, 1);
    let t0 = zeroed("t0", len, 512);
    let t1 = patterned("t1", 12000, 512, 2);
    let t2 = zeroed("t2", 8000, 512);
    let before_t1 = t1.snapshot(0, 12000);
    let outcome = client
        .submit_blocking(Job::copy(
            region(&source, 17, len),
            vec![region(&t0, 0, len), region(&t1, 4001, len), region(&t2, 2, len)],
            Flags::empty(),
        ))
        .unwrap()
        .wait();
    assert!(outcome.is_ok(), "{outcome:?}");
    assert_eq!(outcome.targets.len(), 3);
    assert_same(&source, 17, &t0, 0, len);
    assert_same(&source, 17, &t1, 4001, len);
    assert_same(&source, 17, &t2, 2, len);
    // Nothing outside the target ranges changed.
    let after_t1 = t1.snapshot(0, 12000);
    assert_eq!(after_t1[..4001 * 512], before_t1[..4001 * 512]);
    assert_eq!(after_t1[(4001 + len as usize) * 512..], before_t1[(4001 + len as usize) * 512..]);
    assert!(t2.snapshot(0, 2).iter().all(|&b| b == 0));
    assert!(t2.snapshot(2 + len, 8000 - 2 - len).iter().all(|&b| b == 0));
    // The source was read once per sub-job, whatever the number of targets.
    assert_eq!(source.stats().reads, len.div_ceil(2048));
    client.shutdown_blocking();
}

#[test]
fn one_sector_jobs_copy_exactly_one_sector() {
    let client = client(ClientConfig::default());
    let source = patterned("source", 64, 512, 3);
    let target = zeroed("target", 64, 512);
    for sector in [0, 31, 63] {
        let outcome = client
            .submit_blocking(Job::copy(
                region(&source, sector, 1),
                vec![region(&target, 63 - sector, 1)],
                Flags::empty(),
            ))
            .unwrap()
            .wait();
        assert!(outcome.is_ok());
        assert_same(&source, sector, &target, 63 - sector, 1);
    }
    let written: u64 = target.stats().written_bytes;
    assert_eq!(written, 3 * 512);
    client.shutdown_blocking();
}

#[test]
fn a_budget_of_one_page_copies_64_mib_to_three_targets() {
    let client = client(ClientConfig { page_budget: 1, ..ClientConfig::default() });
    let len = 64 * 2048;
    let source = patterned("source", len, 512, 4);
    let targets: Vec<_> = (0..3).map(|i| zeroed(&format!("t{i}"), len, 512)).collect();
    let outcome = client
        .submit_blocking(Job::copy(
            region(&source, 0, len),
            targets.iter().map(|t| region(t, 0, len)).collect(),
            Flags::empty(),
        ))
        .unwrap()
        .wait();
    assert!(outcome.is_ok(), "{outcome:?}");
    for target in &targets {
        assert_same(&source, 0, target, 0, len);
    }
    // One page per sub-job: 16384 reads of 4 KiB.
    assert_eq!(source.stats().reads, len / 8);
    let report = client.shutdown_blocking();
    assert_eq!(report.pool.pages_in_use_max, 1);
    assert_eq!(report.pool.pages_in_use, 0);
}

#[test]
fn a_thousand_concurrent_small_jobs_each_complete_exactly_once() {
    let client = client(ClientConfig { page_budget: 16, queued_jobs_max: 64, ..small_subjobs() });
    let source = patterned("source", 1000 * 24, 512, 5);
    let target = zeroed("target", 1000 * 24, 512);
    let completions: Arc<Vec<AtomicUsize>> = Arc::new((0..1000).map(|_| AtomicUsize::new(0)).collect());
    let submitters: Vec<_> = (0..4)
        .map(|part| {
            let (client, source, target, completions) =
                (client.clone(), source.clone(), target.clone(), completions.clone());
            thread::spawn(move || {
                let mut handles = Vec::new();
                for job in (part..1000).step_by(4) {
                    let start = job as u64 * 24;
                    let completions = completions.clone();
                    let handle = client
                        .submit_blocking(
                            Job::copy(region(&source, start, 24), vec![region(&target, start, 24)], Flags::empty())
                                .on_complete(move |outcome| {
                                    assert!(outcome.is_ok());
                                    completions[job].fetch_add(1, Ordering::SeqCst);
                                }),
                        )
                        .unwrap();
                    handles.push(handle);
                }
                handles.into_iter().map(|h| h.wait()).filter(Outcome::is_ok).count()
            })
        })
        .collect();
    let ok: usize = submitters.into_iter().map(|s| s.join().unwrap()).sum();
    assert_eq!(ok, 1000);
    let report = client.shutdown_blocking();
    assert_eq!(report.jobs_completed, 1000);
    for (job, count) in completions.iter().enumerate() {
        assert_eq!(count.load(Ordering::SeqCst), 1, "job {job}");
    }
    assert_same(&source, 0, &target, 0, 1000 * 24);
    assert!(report.pool.pages_in_use_max <= 16);
}

#[test]
fn a_read_error_without_ignore_error_stops_the_job_and_reports_the_subjob() {
    let client = client(ClientConfig { subjobs_in_flight: 1, ..small_subjobs() });
    let source = patterned("source", 256, 512, 6);
    let target = patterned("target", 256, 512, 7);
    let before = target.snapshot(0, 256);
    source.fail_reads(100..101);
    let outcome = client
        .submit_blocking(Job::copy(region(&source, 0, 256), vec![region(&target, 0, 256)], Flags::empty()))
        .unwrap()
        .wait();
    assert!(outcome.read_err);
    assert!(outcome.write_err.is_empty());
    // Sub-jobs are 16 sectors: the one holding sector 100 is 96..112.
    assert_eq!(outcome.read_failed, RangeSet::from_range(96..112));
    assert_eq!(outcome.targets[0].not_copied, RangeSet::from_range(96..256));
    assert_same(&source, 0, &target, 0, 96);
    // Targets past the failure keep their old data.
    assert_eq!(target.snapshot(96, 160), before[96 * 512..]);
    client.shutdown_blocking();
}

#[test]
fn write_seq_with_a_read_error_still_writes_the_subjobs_read_before_it() {
    // 64 KiB (128-sector) sub-jobs, 8 in flight. Reads are instant and writes take 10 ms, so
    // sub-jobs 128..256 and 256..384 are read while 0..128 is being written; 256..384 fails.
    // 128..256 was read successfully and waits for its turn: it must still land. Nothing
    // from 256 on is written, so the target stays sequential.
    let config = ClientConfig { subjob_size_bytes: 64 * 1024, ..ClientConfig::default() };
    let len = 1024;
    let source = patterned("source", len, 512, 8);
    source.fail_reads(300..301);
    let target = Arc::new(MemDisk::new(MemDiskOptions {
        name: "target".into(),
        len_sectors: len,
        latency: Latency {
            write: IoModel { cost_us: 10_000, queue_depth: 1, ..IoModel::default() },
            ..Latency::default()
        },
        ..MemDiskOptions::default()
    }));
    let outcome = kcopyd_sim::Simulation::run(config, |client, _trace| {
        let job = Job::copy(region(&source, 0, len), vec![region(&target, 0, len)], Flags::WRITE_SEQ);
        async move { client.submit(job).await.unwrap().await }
    })
    .unwrap();
    assert!(outcome.read_err);
    assert_eq!(outcome.read_failed, RangeSet::from_range(256..384));
    assert_eq!(outcome.targets[0].not_copied, RangeSet::from_range(256..len), "{outcome:?}");
    assert_same(&source, 0, &target, 0, 256);
    assert!(target.snapshot(256, len - 256).iter().all(|&b| b == 0), "nothing written past the failure");
    assert_eq!(target.stats().written_bytes, 256 * 512);
}

#[test]
fn a_read_error_with_ignore_error_is_narrowed_to_single_blocks() {
    for block in [512u32, 4096] {
        let client = client(small_subjobs());
        let bs = u64::from(block) / 512;
        let source = patterned("source", 512, block, 8);
        let target = patterned("target", 512, block, 9);
        let other = patterned("other", 512, 512, 10);
        let before = target.snapshot(0, 512);
        // Two separate bad blocks in one sub-job and one in another.
        source.fail_reads(2 * bs..2 * bs + 1);
        source.fail_reads(5 * bs..5 * bs + 1);
        source.fail_reads(40 * bs..40 * bs + 1);
        let outcome = client
            .submit_blocking(Job::copy(
                region(&source, 0, 512),
                vec![region(&target, 0, 512), region(&other, 0, 512)],
                Flags::IGNORE_ERROR,
            ))
            .unwrap()
            .wait();
        let bad: RangeSet = [2 * bs..3 * bs, 5 * bs..6 * bs, 40 * bs..41 * bs].into_iter().collect();
        assert!(outcome.read_err, "block {block}");
        assert!(outcome.write_err.is_empty());
        assert_eq!(outcome.read_failed, bad, "block {block}");
        for report in &outcome.targets {
            assert_eq!(report.not_copied, bad);
            assert!(report.write_failed.is_empty());
        }
        // Every readable sector arrived; unreadable blocks kept the target's old data.
        let after = target.snapshot(0, 512);
        let src = source.snapshot(0, 512);
        for sector in 0..512u64 {
            let bytes = sector as usize * 512..(sector as usize + 1) * 512;
            let expected = if bad.contains(sector) { &before[bytes.clone()] } else { &src[bytes.clone()] };
            assert_eq!(&after[bytes], expected, "block {block}, sector {sector}");
        }
        client.shutdown_blocking();
    }
}

#[test]
fn write_errors_name_the_failing_target_and_range() {
    let client = client(ClientConfig { subjobs_in_flight: 1, ..small_subjobs() });
    let source = patterned("source", 128, 512, 11);
    let good = zeroed("good", 128, 512);
    let bad = zeroed("bad", 128, 512);
    bad.fail_writes(40..41);
    // Without IGNORE_ERROR the job stops after the failing sub-job (32..48).
    let outcome = client
        .submit_blocking(Job::copy(
            region(&source, 0, 128),
            vec![region(&good, 0, 128), region(&bad, 0, 128)],
            Flags::empty(),
        ))
        .unwrap()
        .wait();
    assert!(!outcome.read_err);
    let mut expected = TargetMask::default();
    expected.set(1);
    assert_eq!(outcome.write_err, expected);
    assert_eq!(outcome.targets[1].write_failed, RangeSet::from_range(32..48));
    assert_eq!(outcome.targets[1].not_copied, RangeSet::from_range(32..128));
    assert_eq!(outcome.targets[0].not_copied, RangeSet::from_range(48..128));
    assert!(bad.snapshot(48, 80).iter().all(|&b| b == 0), "nothing written past the failure");

    // With IGNORE_ERROR the copy goes on: only the failing write is missing.
    let outcome = client
        .submit_blocking(Job::copy(
            region(&source, 0, 128),
            vec![region(&good, 0, 128), region(&bad, 0, 128)],
            Flags::IGNORE_ERROR,
        ))
        .unwrap()
        .wait();
    assert_eq!(outcome.write_err, expected);
    assert!(outcome.targets[0].not_copied.is_empty());
    assert_eq!(outcome.targets[1].write_failed, RangeSet::from_range(32..48));
    assert_eq!(outcome.targets[1].not_copied, RangeSet::from_range(32..48));
    assert_same(&source, 0, &good, 0, 128);
    assert_same(&source, 0, &bad, 0, 32);
    assert_same(&source, 48, &bad, 48, 80);
    client.shutdown_blocking();
}

fn jittery_source(seed: u64) -> Arc<MemDisk> {
    let disk = MemDisk::new(MemDiskOptions {
        name: "jittery".into(),
        len_sectors: 1024,
        latency: Latency {
            read: IoModel { cost_us: 10, jitter_us: 2000, ..IoModel::default() },
            seed,
            ..Latency::default()
        },
        ..MemDiskOptions::default()
    });
    disk.fill_pattern(seed);
    Arc::new(disk)
}

fn zoned(name: &str) -> Arc<MemDisk> {
    Arc::new(MemDisk::new(MemDiskOptions {
        name: name.into(),
        len_sectors: 1024,
        zoned: true,
        zone_sectors: 256,
        ..MemDiskOptions::default()
    }))
}

#[test]
fn a_zoned_target_refuses_unordered_writes_and_write_seq_orders_them() {
    let client = client(small_subjobs());
    // The device itself: a write away from the write pointer fails and changes nothing.
    let target = zoned("zoned");
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    let refused = rt.block_on(kcopyd_core::BlockDevice::write(&*target, 16, kcopyd_core::WriteBuf::zeroes(512)));
    assert!(refused.is_err());
    assert_eq!(target.write_pointer(0), Some(0));
    // The refusal is a fault of the log, so an oracle sees an out-of-order write.
    let log = target.fault_log();
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(log[0].sectors, 16..17);
    assert_eq!(log[0].kind, kcopyd_sim::FaultKind::ZoneViolation { write_pointer: 0 });
    assert!(log[0].kind.failed_request());

    // Reads complete out of order (jitter up to 2 ms), yet WRITE_SEQ lands every write.
    for flags in [Flags::WRITE_SEQ, Flags::empty()] {
        let source = jittery_source(12);
        let target = zoned("zoned");
        let plain = zeroed("plain", 1024, 512);
        let outcome = client
            .submit_blocking(Job::copy(
                region(&source, 0, 1024),
                vec![region(&target, 0, 1024), region(&plain, 0, 1024)],
                flags,
            ))
            .unwrap()
            .wait();
        // WRITE_SEQ is implied by a zoned target, so both flag sets succeed.
        assert!(outcome.is_ok(), "{flags:?}: {outcome:?}");
        assert_same(&source, 0, &target, 0, 1024);
        assert_eq!(target.write_pointer(1023), Some(1024));
    }
    client.shutdown_blocking();
}

#[test]
fn without_write_seq_a_jittery_copy_writes_out_of_order() {
    // The control for the test above: on a non-zoned target the same copy does issue writes
    // out of order, which is what WRITE_SEQ prevents.
    let client = client(small_subjobs());
    let source = jittery_source(12);
    let order = Arc::new(Mutex::new(Vec::new()));
    let recorded = order.clone();
    let target =
        HookedDisk::new(zeroed("rec", 1024, 512)).on_write(move |offset, _| recorded.lock().unwrap().push(offset));
    let outcome = client
        .submit_blocking(Job::copy(region(&source, 0, 1024), vec![target.region(0, 1024)], Flags::empty()))
        .unwrap()
        .wait();
    assert!(outcome.is_ok());
    let order = order.lock().unwrap().clone();
    assert!(order.windows(2).any(|w| w[0] > w[1]), "expected unordered writes: {order:?}");
    let sorted_order = {
        let client = self::client(small_subjobs());
        let order = Arc::new(Mutex::new(Vec::new()));
        let recorded = order.clone();
        let target =
            HookedDisk::new(zeroed("rec", 1024, 512)).on_write(move |offset, _| recorded.lock().unwrap().push(offset));
        client
            .submit_blocking(Job::copy(region(&source, 0, 1024), vec![target.region(0, 1024)], Flags::WRITE_SEQ))
            .unwrap()
            .wait();
        client.shutdown_blocking();
        order.lock().unwrap().clone()
    };
    assert!(sorted_order.windows(2).all(|w| w[0] < w[1]), "{sorted_order:?}");
    client.shutdown_blocking();
}

#[test]
fn zero_uses_one_offloaded_request_per_target_or_writes_zero_buffers() {
    let client = client(small_subjobs());
    let offloaded: Vec<_> = (0..2)
        .map(|i| {
            let disk = MemDisk::new(MemDiskOptions {
                name: format!("z{i}"),
                len_sectors: 512,
                write_zeroes: true,
                ..MemDiskOptions::default()
            });
            disk.fill_pattern(i);
            Arc::new(disk)
        })
        .collect();
    let outcome = client
        .submit_blocking(Job::zero(offloaded.iter().map(|d| region(d, 100, 300)).collect(), Flags::empty()))
        .unwrap()
        .wait();
    assert!(outcome.is_ok());
    for disk in &offloaded {
        let stats = disk.stats();
        assert_eq!((stats.write_zeroes, stats.writes), (1, 0), "one request, not split");
        assert!(disk.snapshot(100, 300).iter().all(|&b| b == 0));
        assert!(disk.snapshot(99, 1).iter().any(|&b| b != 0), "the sector before is untouched");
        assert!(disk.snapshot(400, 1).iter().any(|&b| b != 0), "the sector after is untouched");
    }
    // One target without offload: every target gets plain writes of zeroes, split in sub-jobs.
    let plain = patterned("plain", 512, 512, 3);
    let mixed = vec![region(&offloaded[0], 0, 300), region(&plain, 200, 300)];
    let outcome = client.submit_blocking(Job::zero(mixed, Flags::empty())).unwrap().wait();
    assert!(outcome.is_ok());
    assert_eq!(plain.stats().writes, 300u64.div_ceil(16));
    assert_eq!(plain.stats().write_zeroes, 0);
    assert!(plain.snapshot(200, 300).iter().all(|&b| b == 0));
    assert!(offloaded[0].snapshot(0, 300).iter().all(|&b| b == 0));
    let report = client.shutdown_blocking();
    assert_eq!(report.pool.pages_in_use_max, 0, "zeroing takes no pages");
}

#[test]
fn every_validation_error_is_typed_and_touches_nothing() {
    let client = client(ClientConfig { page_budget: 1, ..ClientConfig::default() });
    let source = patterned("source", 1024, 512, 1);
    let target = patterned("target", 1024, 512, 2);
    let big_block = patterned("big", 1024, 4096, 3);
    let huge_block = Arc::new(MemDisk::zeroed("huge", 1024, 8192));
    let before = target.snapshot(0, 1024);
    let copy =
        |source: kcopyd_core::Region, targets| client.submit_blocking(Job::copy(source, targets, Flags::empty()));
    let cases: Vec<(Result<_, SubmitError>, &str)> = vec![
        (copy(region(&source, 0, 8), vec![]), "NoTargets"),
        (copy(region(&source, 0, 8), (0..129).map(|i| region(&target, i * 8, 8)).collect()), "TooManyTargets"),
        (copy(region(&source, 0, 8), vec![region(&target, 0, 16)]), "CountMismatch"),
        (copy(region(&source, 1000, 100), vec![region(&target, 0, 100)]), "OutOfRange"),
        (copy(region(&source, 0, 100), vec![region(&target, 1000, 100)]), "OutOfRange"),
        (copy(region(&source, u64::MAX - 1, 8), vec![region(&target, 0, 8)]), "OutOfRange"),
        (copy(region(&source, 1, 8), vec![region(&big_block, 1, 8)]), "Misaligned"),
        (copy(region(&source, 0, 4), vec![region(&big_block, 0, 4)]), "Misaligned"),
        (copy(region(&source, 0, 16), vec![region(&huge_block, 0, 16)]), "BlockLargerThanBudget"),
        (copy(region(&target, 0, 100), vec![region(&target, 50, 100)]), "TargetOverlapsSource"),
        (copy(region(&source, 0, 100), vec![region(&target, 0, 100), region(&target, 99, 100)]), "TargetsOverlap"),
        (client.submit_blocking(Job::zero(vec![region(&target, 1020, 8)], Flags::empty())), "OutOfRange"),
    ];
    for (result, expected) in cases {
        let error = result.expect_err(expected);
        let name = format!("{error:?}");
        assert!(name.starts_with(expected), "expected {expected}, got {name}");
        assert!(!error.to_string().is_empty());
    }
    // The messages name the device and the range.
    let error = copy(region(&source, 1000, 100), vec![region(&target, 0, 100)]).unwrap_err();
    assert_eq!(error.to_string(), "region 1000..1100 of source ends past the device's end at sector 1024");
    assert_eq!(target.snapshot(0, 1024), before);
    assert_eq!(target.stats().writes + target.stats().reads + source.stats().reads, 0, "no I/O at all");
    // Adjacent regions on one device do not overlap; a zero-length job completes at once.
    let outcome = copy(region(&target, 0, 8), vec![region(&target, 8, 8)]).unwrap().wait();
    assert!(outcome.is_ok());
    let outcome = copy(region(&source, 0, 0), vec![region(&target, 0, 0)]).unwrap().wait();
    assert!(outcome.is_ok() && !outcome.cancelled);
    client.shutdown_blocking();
    assert_eq!(
        copy(region(&source, 0, 8), vec![region(&target, 0, 8)]).unwrap_err(),
        SubmitError::ShutDown,
        "no job after shutdown"
    );
}

#[test]
fn callbacks_run_on_the_worker_one_at_a_time() {
    let client = client(ClientConfig { page_budget: 8, ..small_subjobs() });
    let source = patterned("source", 64 * 100, 512, 1);
    let target = zeroed("target", 64 * 100, 512);
    let inside = Arc::new(AtomicBool::new(false));
    let overlaps = Arc::new(AtomicUsize::new(0));
    let threads = Arc::new(Mutex::new(Vec::new()));
    let mut handles = Vec::new();
    for job in 0..100 {
        let (inside, overlaps, threads) = (inside.clone(), overlaps.clone(), threads.clone());
        let callback = move |_outcome: Outcome| {
            if inside.swap(true, Ordering::SeqCst) {
                overlaps.fetch_add(1, Ordering::SeqCst);
            }
            threads.lock().unwrap().push(thread::current().name().map(str::to_owned));
            thread::sleep(Duration::from_micros(200));
            inside.store(false, Ordering::SeqCst);
        };
        let job = Job::copy(region(&source, job * 64, 64), vec![region(&target, job * 64, 64)], Flags::empty());
        handles.push(client.submit_blocking(job.on_complete(callback)).unwrap());
    }
    handles.into_iter().for_each(|h| assert!(h.wait().is_ok()));
    client.shutdown_blocking();
    assert_eq!(overlaps.load(Ordering::SeqCst), 0);
    let threads = threads.lock().unwrap();
    assert_eq!(threads.len(), 100);
    assert!(threads.iter().all(|t| t.as_deref() == Some("kcopyd-client")), "{threads:?}");
}

#[test]
fn submitting_waits_at_the_queued_jobs_limit() {
    let client = client(ClientConfig { queued_jobs_max: 2, ..small_subjobs() });
    let source = jittery_source(3);
    let target = zeroed("target", 1024, 512);
    let job = |i: u64| Job::copy(region(&source, i * 256, 256), vec![region(&target, i * 256, 256)], Flags::empty());
    let first = client.try_submit(job(0)).unwrap();
    let second = client.try_submit(job(1)).unwrap();
    assert_eq!(client.try_submit(job(2)).unwrap_err(), SubmitError::QueueFull { max: 2 });
    // A blocking submit waits until a job completes.
    let third = client.submit_blocking(job(2)).unwrap();
    // Admission is freed once a job's work is over, just before its handles resolve: one of
    // the first two has finished every sector by now.
    let finished = |handle: &kcopyd_core::JobHandle| {
        let progress = handle.progress();
        progress.done_sectors == progress.total_sectors
    };
    assert!(finished(&first) || finished(&second));
    for handle in [first, second, third] {
        assert!(handle.wait().is_ok());
    }
    client.shutdown_blocking();
}

#[test]
fn a_resolved_handle_has_freed_its_admission_and_run_its_callback() {
    // One job admitted at a time: as soon as a handle resolves, the next try_submit must be
    // admitted, and the job's callback must have run. Many rounds, from a thread that is not
    // the worker, in both the blocking and the async way of waiting.
    let client = client(ClientConfig { queued_jobs_max: 1, ..small_subjobs() });
    let source = patterned("source", 64, 512, 2);
    let target = zeroed("target", 64, 512);
    let called = Arc::new(AtomicUsize::new(0));
    let job = |round: usize| {
        let called = called.clone();
        let sector = (round % 64) as u64;
        Job::copy(region(&source, sector, 1), vec![region(&target, sector, 1)], Flags::empty()).on_complete(
            move |outcome| {
                assert!(outcome.is_ok());
                called.fetch_add(1, Ordering::SeqCst);
            },
        )
    };
    for round in 0..2000 {
        let handle = client.try_submit(job(round)).unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert!(handle.wait().is_ok());
        assert_eq!(called.load(Ordering::SeqCst), round + 1, "round {round}: the callback ran first");
    }
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    runtime.block_on(async {
        for round in 2000..3000 {
            let handle = client.try_submit(job(round)).unwrap_or_else(|e| panic!("round {round}: {e}"));
            assert!(handle.await.is_ok());
            assert_eq!(called.load(Ordering::SeqCst), round + 1);
        }
    });
    assert_same(&source, 0, &target, 0, 64);
    assert_eq!(client.shutdown_blocking().jobs_completed, 3000);
}

#[test]
fn progress_grows_to_the_total_and_cancel_stops_new_subjobs() {
    let client = client(ClientConfig { subjobs_in_flight: 2, ..small_subjobs() });
    let source = jittery_source(4);
    let target = zeroed("target", 1024, 512);
    let handle = client
        .submit_blocking(Job::copy(region(&source, 0, 1024), vec![region(&target, 0, 1024)], Flags::empty()))
        .unwrap();
    let mut seen = Vec::new();
    while handle.try_outcome().is_none() {
        seen.push(handle.progress().done_sectors);
        thread::sleep(Duration::from_micros(500));
    }
    assert!(seen.windows(2).all(|w| w[0] <= w[1]));
    assert!(seen.iter().any(|&d| d > 0 && d < 1024), "progress moved in steps: {seen:?}");
    assert_eq!(handle.progress().done_sectors, 1024);
    assert_eq!(handle.progress().total_sectors, 1024);

    let target = zeroed("target", 1024, 512);
    let handle = client
        .submit_blocking(Job::copy(region(&source, 0, 1024), vec![region(&target, 0, 1024)], Flags::empty()))
        .unwrap();
    while handle.progress().done_sectors == 0 {
        thread::sleep(Duration::from_micros(100));
    }
    handle.cancel();
    let outcome = handle.clone().wait();
    assert!(outcome.cancelled && !outcome.is_ok());
    let not_copied = &outcome.targets[0].not_copied;
    assert!(!not_copied.is_empty() && not_copied.len_sectors() < 1024, "{not_copied:?}");
    // What the outcome says was copied was copied.
    let copied = RangeSet::from_range(0..1024).difference(not_copied);
    for range in copied.ranges() {
        assert_same(&source, range.start, &target, range.start, range.end - range.start);
    }
    let report = client.shutdown_blocking();
    assert_eq!(report.pool.pages_in_use, 0);
}

#[test]
fn shutdown_waits_for_running_jobs_and_finds_the_pool_full() {
    let client = client(ClientConfig { page_budget: 4, ..small_subjobs() });
    let source = jittery_source(5);
    let targets: Vec<_> = (0..3).map(|i| zeroed(&format!("t{i}"), 1024, 512)).collect();
    let handles: Vec<_> = targets
        .iter()
        .map(|t| {
            client
                .submit_blocking(Job::copy(region(&source, 0, 1024), vec![region(t, 0, 1024)], Flags::empty()))
                .unwrap()
        })
        .collect();
    let report = client.shutdown_blocking();
    assert_eq!(report.jobs_completed, 3);
    assert_eq!(report.pool.pages_in_use, 0);
    assert!(report.pool.pages_in_use_max <= 4 && report.pool.pages_in_use_max > 0);
    for (handle, target) in handles.into_iter().zip(&targets) {
        assert!(handle.try_outcome().expect("completed before shutdown returned").is_ok());
        assert_same(&source, 0, target, 0, 1024);
    }
}

#[test]
fn the_handle_is_usable_from_a_tokio_runtime() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let client = Client::new(small_subjobs()).unwrap();
        let source = patterned("source", 512, 512, 1);
        let targets: Vec<_> = (0..4).map(|i| zeroed(&format!("t{i}"), 512, 512)).collect();
        let mut tasks = Vec::new();
        for (i, target) in targets.iter().enumerate() {
            let (client, source, target) = (client.clone(), source.clone(), target.clone());
            tasks.push(tokio::spawn(async move {
                let start = i as u64 * 128;
                let job = Job::copy(region(&source, start, 128), vec![region(&target, start, 128)], Flags::empty());
                client.submit(job).await.unwrap().await
            }));
        }
        for task in tasks {
            assert!(task.await.unwrap().is_ok());
        }
        let report = client.shutdown().await;
        assert_eq!(report.jobs_completed, 4);
    });
}

#[test]
fn a_client_runs_in_the_callers_actix_system() {
    let system = actix::System::new();
    let worker = thread::current().id();
    let outcome = system.block_on(async move {
        let client = Client::start_in_current_system(small_subjobs()).unwrap();
        let source = patterned("source", 256, 512, 1);
        let target = zeroed("target", 256, 512);
        let ran_on = Arc::new(Mutex::new(None));
        let seen = ran_on.clone();
        let job = Job::copy(region(&source, 0, 256), vec![region(&target, 0, 256)], Flags::empty())
            .on_complete(move |_| *seen.lock().unwrap() = Some(thread::current().id()));
        let outcome = client.submit(job).await.unwrap().await;
        assert_eq!(
            client.submit_blocking(Job::zero(vec![region(&target, 0, 8)], Flags::empty())).unwrap_err(),
            SubmitError::WouldBlockWorker
        );
        client.shutdown().await;
        assert_eq!(*ran_on.lock().unwrap(), Some(worker), "callbacks run on the system's thread");
        assert_same(&source, 0, &target, 0, 256);
        outcome
    });
    assert!(outcome.is_ok());
}

#[test]
fn a_panicking_callback_does_not_stop_the_client() {
    let client = client(small_subjobs());
    let source = patterned("source", 64, 512, 1);
    let target = zeroed("target", 64, 512);
    let job = Job::copy(region(&source, 0, 32), vec![region(&target, 0, 32)], Flags::empty())
        .on_complete(|_| panic!("a user's bug"));
    let outcome = client.submit_blocking(job).unwrap().wait();
    // The copy was fine; the handle says the callback was not.
    assert!(outcome.is_ok());
    assert_eq!(outcome.callback_panicked.as_deref(), Some("a user's bug"));
    let after = client
        .submit_blocking(Job::copy(region(&source, 32, 32), vec![region(&target, 32, 32)], Flags::empty()))
        .unwrap()
        .wait();
    assert!(after.is_ok());
    assert_eq!(client.shutdown_blocking().jobs_completed, 2);
}

/// Records the `message` and `panic` fields of every event, and the level.
#[derive(Default)]
struct EventLog(Mutex<Vec<(tracing::Level, String)>>);

impl tracing::Subscriber for EventLog {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        struct Text(String);
        impl tracing::field::Visit for Text {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                self.0 += &format!("{}={value:?} ", field.name());
            }
        }
        let mut text = Text(String::new());
        event.record(&mut text);
        self.0.lock().unwrap().push((*event.metadata().level(), text.0));
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[test]
fn a_panicking_callback_is_reported_through_tracing_not_printed() {
    // The callback runs on the caller's thread here, where the subscriber is installed.
    let log = Arc::new(EventLog::default());
    let source = patterned("source", 64, 512, 1);
    let target = zeroed("target", 64, 512);
    let outcome = tracing::subscriber::with_default(log.clone(), || {
        kcopyd_sim::Simulation::run(small_subjobs(), |client, _trace| {
            let job = Job::copy(region(&source, 0, 32), vec![region(&target, 0, 32)], Flags::empty())
                .on_complete(|_| panic!("callback bug {}", 42));
            async move { client.submit(job).await.unwrap().await }
        })
        .unwrap()
    });
    assert_eq!(outcome.callback_panicked.as_deref(), Some("callback bug 42"));
    let events = log.0.lock().unwrap();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].0, tracing::Level::ERROR);
    assert!(events[0].1.contains("callback bug 42") && events[0].1.contains("completion callback"), "{events:?}");
}

/// A region of `disk` whose reads and writes panic when they cover `panic_sector`, as a buggy
/// device implementation would.
fn panicky(disk: &Arc<MemDisk>, panic_sector: u64, start_sector: u64, len_sectors: u64) -> kcopyd_core::Region {
    let hits = move |offset: u64, len_bytes: usize| (offset..offset + (len_bytes / 512) as u64).contains(&panic_sector);
    HookedDisk::new(disk.clone())
        .on_read(move |offset, len| assert!(!hits(offset, len), "a device's bug reading sector {panic_sector}"))
        .on_write(move |offset, len| assert!(!hits(offset, len), "a device's bug writing sector {panic_sector}"))
        .region(start_sector, len_sectors)
}

#[test]
fn a_panicking_device_stops_its_job_with_a_report_and_the_client_goes_on() {
    let client = client(small_subjobs()); // 16-sector sub-jobs, 8 in flight
    let len = 512;
    let source = patterned("source", len, 512, 7);
    for flags in [Flags::empty(), Flags::IGNORE_ERROR, Flags::WRITE_SEQ] {
        // Target 1 panics writing sector 200 (sub-job 192..208); target 0 is healthy.
        let (t0, t1) = (zeroed("t0", len, 512), zeroed("t1", len, 512));
        let outcome = client
            .submit_blocking(Job::copy(
                region(&source, 0, len),
                vec![region(&t0, 0, len), panicky(&t1, 200, 0, len)],
                flags,
            ))
            .unwrap()
            .wait();
        let message = outcome.panicked.as_deref().unwrap_or_else(|| panic!("{flags:?}: no panic reported"));
        assert!(message.contains("writing sector 200"), "{flags:?}: {message}");
        assert!(!outcome.is_ok());
        for (index, (report, disk)) in outcome.targets.iter().zip([&t0, &t1]).enumerate() {
            assert!(report.not_copied.contains(200), "{flags:?}: target {index} claims the panicking sub-job");
            // Whatever is not reported as not copied holds the source's data.
            for range in RangeSet::from_range(0..len).difference(&report.not_copied).ranges() {
                assert_same(&source, range.start, disk, range.start, range.end - range.start);
            }
        }
        if flags == Flags::WRITE_SEQ {
            // In order, and nothing after the panicking sub-job.
            assert!(t1.snapshot(208, len - 208).iter().all(|&b| b == 0), "WRITE_SEQ wrote past the stop");
            assert!(outcome.targets[1].not_copied.contains(len - 1));
        }
    }
    // WRITE_SEQ with reads finishing out of order: later sub-jobs are already waiting for their
    // turn when the panicking sub-job's write dies, and must be released, not left hanging.
    let jittery = jittery_source(5);
    let target = zeroed("seq", 1024, 512);
    let outcome = client
        .submit_blocking(Job::copy(region(&jittery, 0, 1024), vec![panicky(&target, 200, 0, 1024)], Flags::WRITE_SEQ))
        .unwrap()
        .wait();
    assert!(outcome.panicked.is_some(), "{outcome:?}");
    assert!(target.snapshot(208, 1024 - 208).iter().all(|&b| b == 0), "WRITE_SEQ wrote past the stop");
    assert_same(&jittery, 0, &target, 0, 192);
    // The source panics reading sector 100: the job stops, nothing claims that sub-job.
    let target = zeroed("target", len, 512);
    let outcome = client
        .submit_blocking(Job::copy(panicky(&source, 100, 0, len), vec![region(&target, 0, len)], Flags::IGNORE_ERROR))
        .unwrap()
        .wait();
    assert!(outcome.panicked.as_deref().is_some_and(|m| m.contains("reading sector 100")), "{outcome:?}");
    assert!(outcome.targets[0].not_copied.contains(100));
    // The client still copies, and every page came back.
    let after = zeroed("after", len, 512);
    let ok = client
        .submit_blocking(Job::copy(region(&source, 0, len), vec![region(&after, 0, len)], Flags::empty()))
        .unwrap()
        .wait();
    assert!(ok.is_ok() && ok.panicked.is_none(), "{ok:?}");
    assert_same(&source, 0, &after, 0, len);
    let report = client.shutdown_blocking();
    assert_eq!(report.jobs_completed, 6);
    assert_eq!(report.pool.pages_in_use, 0);
}

#[test]
fn a_job_shorter_than_a_subjob_takes_only_its_own_pages() {
    // Default shape: 1 MiB sub-jobs (256 pages). Four 64 KiB copies at once need 4 x 16 pages.
    let client = client(ClientConfig::default());
    let source = patterned("source", 1024, 512, 9);
    let target = zeroed("target", 1024, 512);
    let handles: Vec<_> = (0..4u64)
        .map(|i| {
            let job = Job::copy(region(&source, i * 128, 128), vec![region(&target, i * 128, 128)], Flags::empty());
            client.try_submit(job).unwrap()
        })
        .collect();
    for handle in handles {
        assert!(handle.wait().is_ok());
    }
    assert_same(&source, 0, &target, 0, 512);
    let pool = client.pool_stats();
    assert!(pool.pages_in_use_max <= 4 * 16, "{} pages at most in use", pool.pages_in_use_max);
    client.shutdown_blocking();
}
