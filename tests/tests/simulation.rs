//! The simulator itself: virtual time against the analytic model, determinism, sparse
//! terabyte-scale disks, crashes and the fault kinds.

use std::sync::Arc;
use std::time::Duration;

use kcopyd_core::{BlockDevice, ClientConfig, Device, Flags, Job, PagePool, ReadBuf, Region, WriteBuf};
use kcopyd_sim::{
    FaultKind, FaultPlan, IoModel, Latency, MemDisk, MemDiskOptions, Misdirect, Provenance, Simulation, to_model,
};
use kcopyd_tests::scenario::{Inputs, run};

/// Copies `len_sectors` from a source with `read` timing to a target with `write` timing, in
/// virtual time; returns the model time the job took.
fn timed_copy(read: IoModel, write: IoModel, len_sectors: u64) -> Duration {
    // The kernel's shape, which the models below are worked out for.
    let config = ClientConfig { subjob_size_bytes: 512 * 1024, subjobs_in_flight: 8, ..ClientConfig::default() };
    Simulation::run(config, |client, _trace| async move {
        let source = Arc::new(MemDisk::new(MemDiskOptions {
            name: "source".into(),
            len_sectors,
            latency: Latency { read, ..Latency::default() },
            ..MemDiskOptions::default()
        }));
        let target = Arc::new(MemDisk::new(MemDiskOptions {
            name: "target".into(),
            len_sectors,
            latency: Latency { write, ..Latency::default() },
            ..MemDiskOptions::default()
        }));
        let began = tokio::time::Instant::now();
        let job =
            Job::copy(Region::new(source, 0, len_sectors), vec![Region::new(target, 0, len_sectors)], Flags::empty());
        let outcome = client.submit(job).await.unwrap().await;
        assert!(outcome.is_ok());
        to_model(began.elapsed())
    })
    .unwrap()
}

fn assert_within_5_percent(measured: Duration, model_us: f64) {
    let measured_us = measured.as_secs_f64() * 1e6;
    let error = (measured_us - model_us).abs() / model_us;
    assert!(
        error <= 0.05,
        "virtual {measured_us:.0} µs against the model's {model_us:.0} µs ({:.1} % off)",
        error * 100.0
    );
}

#[test]
fn virtual_duration_matches_the_analytic_model_when_writes_are_the_bottleneck() {
    // 64 MiB in 128 sub-jobs of 512 KiB; reads stay ahead, so the copy takes one read and
    // then one write after another: r + 128 w.
    let read = IoModel { cost_us: 100, bandwidth_bytes_per_s: 200_000_000, queue_depth: 1, jitter_us: 0 };
    let write = IoModel { cost_us: 200, bandwidth_bytes_per_s: 100_000_000, queue_depth: 1, jitter_us: 0 };
    let chunk = 512.0 * 1024.0;
    let r = 100.0 + chunk / 200.0; // bytes / (bytes per µs)
    let w = 200.0 + chunk / 100.0;
    assert_within_5_percent(timed_copy(read, write, 64 * 2048), r + 128.0 * w);
}

#[test]
fn virtual_duration_matches_the_analytic_model_when_reads_are_the_bottleneck() {
    let read = IoModel { cost_us: 300, bandwidth_bytes_per_s: 50_000_000, queue_depth: 1, jitter_us: 0 };
    let write = IoModel { cost_us: 50, bandwidth_bytes_per_s: 1_000_000_000, queue_depth: 1, jitter_us: 0 };
    let chunk = 512.0 * 1024.0;
    let r = 300.0 + chunk / 50.0;
    let w = 50.0 + chunk / 1000.0;
    assert_within_5_percent(timed_copy(read, write, 32 * 2048), 64.0 * r + w);
}

#[test]
fn the_same_seed_gives_the_same_trace_and_another_seed_another() {
    for seed in [1, 7, 42] {
        let scenario = Inputs::from_seed(seed).layout();
        let (first, second) = (run(&scenario), run(&scenario));
        assert!(first.trace_events > 0);
        assert_eq!(first.trace.events(), second.trace.events(), "seed {seed}");
        assert_eq!(first.trace_hash, second.trace_hash);
        let other = run(&Inputs::from_seed(seed + 1000).layout());
        assert_ne!(first.trace_hash, other.trace_hash);
    }
}

#[test]
fn a_terabyte_sparse_copy_region_costs_a_few_extents_and_verifies() {
    let len_sectors = 1u64 << 31; // 1 TiB
    let sparse =
        |name: &str| MemDiskOptions { name: name.into(), len_sectors, sparse: true, ..MemDiskOptions::default() };
    let source = Arc::new(MemDisk::new(sparse("source")));
    source.fill_pattern(77);
    let target = Arc::new(MemDisk::new(sparse("target")));
    // 64 MiB at the very end of the source, into the middle of the target.
    let copy_sectors = 64 * 2048;
    let (from, to) = (len_sectors - copy_sectors, len_sectors / 2);
    let outcome = Simulation::run(ClientConfig::default(), |client, _| {
        let (source, target) = (source.clone(), target.clone());
        async move {
            let job = Job::copy(
                Region::new(source, from, copy_sectors),
                vec![Region::new(target, to, copy_sectors)],
                Flags::empty(),
            );
            client.submit(job).await.unwrap().await
        }
    })
    .unwrap();
    assert!(outcome.is_ok());
    assert_eq!(source.extents(), 1);
    assert_eq!(target.extents(), 3, "zero, one run of copied pattern, zero");
    assert_eq!(
        target.provenance(to..to + copy_sectors),
        vec![(to..to + copy_sectors, Provenance::Pattern { seed: 77, generation: 0, sector: from })]
    );
    assert_eq!(target.provenance(0..to), vec![(0..to, Provenance::Zero)]);
}

fn read_all(disk: &MemDisk, start: u64, sectors: u64) -> std::io::Result<Vec<u8>> {
    let pool = PagePool::new((sectors as usize * 512).div_ceil(4096)).unwrap();
    let buf = ReadBuf::new(pool.try_alloc(pool.pages_total()).unwrap(), sectors as usize * 512);
    let (buf, result) = Simulation::block_on(disk.read(start, buf));
    result.map(|()| buf.to_vec())
}

#[test]
fn short_io_moves_one_block_per_call_so_a_failing_block_leaves_a_partial_write() {
    let disk = MemDisk::new(MemDiskOptions {
        name: "short".into(),
        len_sectors: 64,
        faults: FaultPlan { short_io: true, ..FaultPlan::default() },
        ..MemDiskOptions::default()
    });
    disk.fail_writes(5..6);
    let result = Simulation::block_on(disk.write(0, WriteBuf::from_bytes(vec![7u8; 8 * 512].into())));
    assert!(result.is_err());
    let data = disk.snapshot(0, 8);
    assert!(data[..5 * 512].iter().all(|&b| b == 7), "blocks before the failure landed");
    assert!(data[5 * 512..].iter().all(|&b| b == 0), "the failing block and those after did not");
    let log = disk.fault_log();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].sectors, 0..8, "the log names the whole request");
    assert!(read_all(&disk, 0, 8).is_ok());
}

#[test]
fn latent_errors_clear_on_write_and_write_faults_spend_their_attempts() {
    let disk = MemDisk::new(MemDiskOptions {
        name: "faulty".into(),
        len_sectors: 64,
        faults: FaultPlan {
            latent_sectors: std::iter::once(3..4).collect(),
            write_faults: vec![kcopyd_sim::WriteFault { sectors: 10..12, attempts: 2 }],
            ..FaultPlan::default()
        },
        ..MemDiskOptions::default()
    });
    assert!(read_all(&disk, 0, 8).is_err());
    assert!(read_all(&disk, 4, 4).is_ok());
    Simulation::block_on(disk.write(0, WriteBuf::zeroes(8 * 512))).unwrap();
    assert!(read_all(&disk, 0, 8).is_ok(), "the write cleared the latent error");
    for attempt in 0..3 {
        let result = Simulation::block_on(disk.write(8, WriteBuf::zeroes(8 * 512)));
        assert_eq!(result.is_ok(), attempt == 2, "attempt {attempt}");
    }
    let kinds: Vec<FaultKind> = disk.fault_log().into_iter().map(|r| r.kind).collect();
    assert_eq!(kinds, vec![FaultKind::LatentSectorError, FaultKind::WriteError, FaultKind::WriteError]);
}

#[test]
fn a_device_fails_after_n_requests_and_at_a_virtual_time() {
    let disk = MemDisk::new(MemDiskOptions {
        name: "dying".into(),
        len_sectors: 64,
        faults: FaultPlan { fail_after_ios: Some(2), ..FaultPlan::default() },
        ..MemDiskOptions::default()
    });
    assert!(read_all(&disk, 0, 1).is_ok());
    assert!(read_all(&disk, 0, 1).is_ok());
    assert!(read_all(&disk, 0, 1).is_err());
    assert_eq!(disk.fault_log()[0].kind, FaultKind::DeviceFailed);

    Simulation::block_on(async {
        let disk = MemDisk::new(MemDiskOptions {
            name: "timed".into(),
            len_sectors: 64,
            faults: FaultPlan { fail_at_us: Some(5_000), ..FaultPlan::default() },
            ..MemDiskOptions::default()
        });
        assert!(disk.write(0, WriteBuf::zeroes(512)).await.is_ok());
        tokio::time::sleep(kcopyd_sim::to_tokio(Duration::from_millis(6))).await;
        assert!(disk.write(0, WriteBuf::zeroes(512)).await.is_err());
        assert_eq!(disk.fault_log()[0].at_us, 6_000);
    });
}

#[test]
fn a_stalled_request_is_held_for_its_time_or_for_ever_and_logged() {
    Simulation::block_on(async {
        let disk = MemDisk::new(MemDiskOptions {
            name: "stuck".into(),
            len_sectors: 64,
            faults: FaultPlan {
                stalls: vec![
                    kcopyd_sim::Stall { io_index: 1, hold_us: Some(7_000) },
                    kcopyd_sim::Stall { io_index: 2, hold_us: None },
                ],
                ..FaultPlan::default()
            },
            ..MemDiskOptions::default()
        });
        let began = tokio::time::Instant::now();
        let took = || kcopyd_sim::to_model(began.elapsed());
        assert!(disk.write(0, WriteBuf::zeroes(512)).await.is_ok());
        assert_eq!(took(), Duration::ZERO, "request 0 is not held");
        assert!(disk.write(0, WriteBuf::zeroes(512)).await.is_ok(), "held, then done");
        assert_eq!(took(), Duration::from_millis(7));
        let held =
            tokio::time::timeout(kcopyd_sim::to_tokio(Duration::from_secs(3600)), disk.write(0, WriteBuf::zeroes(512)));
        assert!(held.await.is_err(), "request 2 never completes");
        let kinds: Vec<FaultKind> = disk.fault_log().into_iter().map(|r| r.kind).collect();
        assert_eq!(kinds, vec![FaultKind::Stalled { hold_us: Some(7_000) }, FaultKind::Stalled { hold_us: None }]);
    });
    // Drawn from the odds: every request, for ever.
    let odds = FaultPlan {
        odds: kcopyd_sim::FaultOdds { stall_ppm: 1_000_000, stall_us: Some(500), ..Default::default() },
        ..FaultPlan::default()
    };
    let disk =
        MemDisk::new(MemDiskOptions { name: "odd".into(), len_sectors: 64, faults: odds, ..MemDiskOptions::default() });
    Simulation::block_on(async {
        let began = tokio::time::Instant::now();
        assert!(disk.write(0, WriteBuf::zeroes(512)).await.is_ok());
        assert_eq!(kcopyd_sim::to_model(began.elapsed()), Duration::from_micros(500));
    });
    assert_eq!(disk.fault_log()[0].kind, FaultKind::Stalled { hold_us: Some(500) });
}

#[test]
fn a_misdirected_write_lands_elsewhere_and_is_logged() {
    let disk = MemDisk::new(MemDiskOptions {
        name: "astray".into(),
        len_sectors: 64,
        faults: FaultPlan { misdirects: vec![Misdirect { write_index: 1, shift_sectors: 16 }], ..FaultPlan::default() },
        ..MemDiskOptions::default()
    });
    Simulation::block_on(disk.write(0, WriteBuf::from_bytes(vec![1u8; 512].into()))).unwrap();
    Simulation::block_on(disk.write(8, WriteBuf::from_bytes(vec![2u8; 512].into()))).unwrap();
    assert!(disk.snapshot(8, 1).iter().all(|&b| b == 0), "not where it was aimed");
    assert!(disk.snapshot(24, 1).iter().all(|&b| b == 2), "16 sectors further");
    assert_eq!(disk.fault_log()[0].kind, FaultKind::Misdirected { landed: 24..25 });
}

#[test]
fn a_crash_loses_unflushed_writes_or_tears_the_ones_in_flight() {
    Simulation::block_on(async {
        let disk = Arc::new(MemDisk::new(MemDiskOptions {
            name: "cached".into(),
            seed: 3,
            len_sectors: 256,
            latency: Latency { write: IoModel { cost_us: 1000, ..IoModel::default() }, ..Latency::default() },
            faults: FaultPlan { volatile_cache: true, ..FaultPlan::default() },
            ..MemDiskOptions::default()
        }));
        // Flushed data survives any crash.
        disk.write(0, WriteBuf::from_bytes(vec![1u8; 64 * 512].into())).await.unwrap();
        disk.flush().await.unwrap();
        // Unflushed writes may be lost; a write in flight may be torn.
        for i in 0..8u64 {
            disk.write(64 + i * 8, WriteBuf::from_bytes(vec![2u8; 8 * 512].into())).await.unwrap();
        }
        let in_flight = {
            let disk = disk.clone();
            actix_rt::spawn(async move { disk.write(128, WriteBuf::from_bytes(vec![3u8; 64 * 512].into())).await })
        };
        tokio::task::yield_now().await;
        disk.crash();
        assert!(in_flight.await.unwrap().is_err(), "a write cut by the crash fails");
        assert!(disk.write(0, WriteBuf::zeroes(512)).await.is_err(), "a crashed disk refuses requests");
        disk.restart();
        assert!(disk.snapshot(0, 64).iter().all(|&b| b == 1));
        let log = disk.fault_log();
        for i in 0..8u64 {
            let sectors = 64 + i * 8..64 + (i + 1) * 8;
            let data = disk.snapshot(sectors.start, 8);
            let lost = log.iter().any(|r| r.kind == FaultKind::Lost && r.sectors == sectors);
            let expected = if lost { 0 } else { 2 };
            assert!(data.iter().all(|&b| b == expected), "sectors {sectors:?}: lost={lost}");
        }
        let landed = log
            .iter()
            .find_map(|r| match &r.kind {
                FaultKind::Torn { landed } => Some(landed.clone()),
                _ => None,
            })
            .expect("the write in flight was torn");
        for sector in 128..192u64 {
            let byte = disk.snapshot(sector, 1)[0];
            let in_landed = landed.iter().any(|r| r.contains(&sector));
            assert_eq!(byte, if in_landed { 3 } else { 0 }, "sector {sector}");
        }
        assert!(log.iter().any(|r| r.kind == FaultKind::Lost), "with 8 writes at even odds, some are lost");
    });
}

/// Runs one device operation to its end on a throwaway runtime.
fn io<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(future)
}

#[test]
fn mem_disk_errors_name_the_device_the_operation_and_the_sectors() {
    use kcopyd_sim::{DiskError, DiskFailure, Operation};
    let disk = MemDisk::zeroed("sim-a", 64, 4096);
    let check = |error: std::io::Error, message: &str, errno: i32| {
        assert_eq!(error.to_string(), message);
        let inner = DiskError::of(&error).expect("a MemDisk error carries a DiskError");
        assert_eq!(inner.errno(), errno);
        assert_eq!(error.kind(), std::io::Error::from_raw_os_error(errno).kind());
        inner.clone()
    };
    // Refused before any transfer: misaligned (EINVAL), past the end (EIO).
    let error = io(disk.write(4, WriteBuf::zeroes(4096))).unwrap_err();
    let inner = check(error, "sim-a: write of sectors 4..12 refused: not aligned to the 4096-byte logical block", 22);
    assert_eq!(inner.operation, Operation::Write);
    assert_eq!(inner.reason, DiskFailure::Misaligned { block_size: 4096 });
    let (_, result) = io(disk.read(64, ReadBuf::with_capacity(4096)));
    check(result.unwrap_err(), "sim-a: read of sectors 64..72 refused: past the end of the device (64 sectors)", 5);
    let error = io(disk.write_zeroes(0, 3)).unwrap_err();
    check(error, "sim-a: write-zeroes of sectors 0..3 refused: not aligned to the 4096-byte logical block", 22);
    // Faults of the plan: the request's sectors, not only the failing block.
    disk.fail_reads(16..24);
    let (_, result) = io(disk.read(8, ReadBuf::with_capacity(3 * 4096)));
    check(result.unwrap_err(), "sim-a: read of sectors 8..32 failed: latent sector error", 5);
    disk.fail_writes(40..48);
    let error = io(disk.write(40, WriteBuf::zeroes(4096))).unwrap_err();
    check(error, "sim-a: write of sectors 40..48 failed: write error", 5);
    disk.crash();
    let error = io(disk.flush()).unwrap_err();
    check(error, "sim-a: flush of sectors 0..64 failed: the disk has crashed", 5);
    // A zoned disk names the write pointer.
    let zoned = MemDisk::new(MemDiskOptions {
        name: "sim-z".into(),
        len_sectors: 64,
        zoned: true,
        zone_sectors: 32,
        ..MemDiskOptions::default()
    });
    let error = io(zoned.write(8, WriteBuf::zeroes(512))).unwrap_err();
    check(error, "sim-z: write of sectors 8..9 failed: not at the zone's write pointer (sector 0)", 5);
}

/// Copies 64 MiB from a source to a target in 1 MiB sub-jobs, `subjobs_in_flight` at a time,
/// with both disks built by `make`; returns the model time.
fn timed_copy_with(
    make: impl Fn(MemDiskOptions) -> MemDisk + 'static,
    latency: Latency,
    subjobs_in_flight: usize,
) -> Duration {
    let len_sectors = 64 * 2048;
    let config = ClientConfig { subjob_size_bytes: 1 << 20, subjobs_in_flight, ..ClientConfig::default() };
    Simulation::run(config, |client, _trace| async move {
        let options = |name: &str| MemDiskOptions {
            name: name.into(),
            len_sectors,
            latency: latency.clone(),
            ..MemDiskOptions::default()
        };
        let source = Arc::new(make(options("source")));
        let target = Arc::new(make(options("target")));
        let began = tokio::time::Instant::now();
        let job =
            Job::copy(Region::new(source, 0, len_sectors), vec![Region::new(target, 0, len_sectors)], Flags::empty());
        assert!(client.submit(job).await.unwrap().await.is_ok());
        to_model(began.elapsed())
    })
    .unwrap()
}

#[test]
fn two_disks_on_one_medium_take_turns_on_its_data_paths() {
    // Reads 200 MB/s, writes 100 MB/s; 64 sub-jobs of 1 MiB.
    let model = |bandwidth| IoModel { bandwidth_bytes_per_s: bandwidth, ..IoModel::default() };
    let latency = Latency { read: model(200_000_000), write: model(100_000_000), ..Latency::default() };
    let shared =
        Latency { path: kcopyd_sim::PathModel { shared: true, ..kcopyd_sim::PathModel::default() }, ..latency.clone() };
    let mib = 1_048_576.0;
    let serial_us = 64.0 * (mib / 200.0 + mib / 100.0);
    // One sub-job at a time reads then writes: nothing to overlap, every layout agrees.
    assert_within_5_percent(timed_copy_with(MemDisk::new, latency.clone(), 1), serial_us);
    let medium = kcopyd_sim::Medium::new();
    assert_within_5_percent(timed_copy_with(move |o| MemDisk::on_medium(o, &medium), shared.clone(), 1), serial_us);
    // Four in flight: the reads of the source overlap the writes of the target unless the
    // two disks are on one medium whose model shares one path for reads and writes. Apart,
    // or on a medium with a path per direction, the writes bound the copy (64 w + one r).
    let writes_bound_us = 64.0 * mib / 100.0 + mib / 200.0;
    assert_within_5_percent(timed_copy_with(MemDisk::new, latency.clone(), 4), writes_bound_us);
    assert_within_5_percent(timed_copy_with(MemDisk::new, shared.clone(), 4), writes_bound_us);
    let medium = kcopyd_sim::Medium::new();
    assert_within_5_percent(timed_copy_with(move |o| MemDisk::on_medium(o, &medium), latency, 4), writes_bound_us);
    let medium = kcopyd_sim::Medium::new();
    assert_within_5_percent(timed_copy_with(move |o| MemDisk::on_medium(o, &medium), shared, 4), serial_us);
}

#[test]
fn a_shared_path_on_one_disk_serialises_its_reads_and_writes() {
    // A copy within one disk (source and target ranges apart), 4 sub-jobs in flight: with
    // `shared` the reads and writes take turns.
    let model = IoModel { bandwidth_bytes_per_s: 100_000_000, ..IoModel::default() };
    let copy_within = |shared: bool| {
        let latency = Latency {
            read: model,
            write: model,
            path: kcopyd_sim::PathModel { shared, ..kcopyd_sim::PathModel::default() },
            ..Latency::default()
        };
        let config = ClientConfig { subjob_size_bytes: 1 << 20, subjobs_in_flight: 4, ..ClientConfig::default() };
        Simulation::run(config, |client, _trace| async move {
            let half = 64 * 2048;
            let disk: Device =
                Arc::new(MemDisk::new(MemDiskOptions { len_sectors: 2 * half, latency, ..MemDiskOptions::default() }));
            let began = tokio::time::Instant::now();
            let job =
                Job::copy(Region::new(disk.clone(), 0, half), vec![Region::new(disk, half, half)], Flags::empty());
            assert!(client.submit(job).await.unwrap().await.is_ok());
            to_model(began.elapsed())
        })
        .unwrap()
    };
    let mib_us = 1_048_576.0 / 100.0;
    assert_within_5_percent(copy_within(false), 65.0 * mib_us);
    assert_within_5_percent(copy_within(true), 128.0 * mib_us);
}

#[test]
fn a_spinning_disk_pays_a_seek_each_time_a_copy_switches_between_two_areas() {
    // One disk, source in the first half, target in the second, one sub-job at a time: every
    // request after the first moves the head half the disk (√½ of the stroke); reads and
    // writes both follow on from where the previous one of their area ended, but the head
    // was elsewhere in between.
    let seek = kcopyd_sim::SeekModel { track_us: 500, full_stroke_us: 8500, rotation_us: 8000 };
    let latency = Latency {
        path: kcopyd_sim::PathModel { shared: true, seek, ..kcopyd_sim::PathModel::default() },
        ..Latency::default()
    };
    let config = ClientConfig { subjob_size_bytes: 1 << 20, subjobs_in_flight: 1, ..ClientConfig::default() };
    let elapsed = Simulation::run(config, |client, _trace| async move {
        let half = 16 * 2048;
        let disk: Device =
            Arc::new(MemDisk::new(MemDiskOptions { len_sectors: 2 * half, latency, ..MemDiskOptions::default() }));
        let began = tokio::time::Instant::now();
        let job = Job::copy(Region::new(disk.clone(), 0, half), vec![Region::new(disk, half, half)], Flags::empty());
        assert!(client.submit(job).await.unwrap().await.is_ok());
        to_model(began.elapsed())
    })
    .unwrap();
    // 16 reads and 16 writes of 2048 sectors; the first read pays nothing (the head starts
    // there). Each write seeks from the end of the read before it to the target area
    // (32768 - 2048 sectors away), each later read from the end of the write before it back
    // to the source area (32768 + 2048 - 2048 sectors away).
    let seek_us = |distance: u64| seek.seek_us(distance, 32 * 2048) as f64;
    let expected = 16.0 * seek_us(32768 - 2048) + 15.0 * seek_us(32768);
    assert_within_5_percent(elapsed, expected);
    // With the head moving 0 sectors there is no cost: sequential reads of one area are free.
    assert_eq!(seek.seek_us(0, 32 * 2048), 0);
}

#[test]
fn a_remote_source_needs_requests_in_flight_to_fill_its_link() {
    // A 10 Gbit/s link (1.25 GB/s) with a 0.5 ms round trip in front of an instant disk;
    // 64 MiB in 1 MiB sub-jobs to a local, instant target. One read at a time pays the round
    // trip every time: 64 × (500 + 838.9) µs. Eight in flight keep the link busy: its bytes
    // bound the copy, 64 × 838.9 µs plus one round trip.
    let remote = Latency {
        link: kcopyd_sim::LinkModel { round_trip_us: 500, bandwidth_bytes_per_s: 1_250_000_000, burst_bytes: 0 },
        ..Latency::default()
    };
    let copy_with = |in_flight: usize| {
        let latency = remote.clone();
        let config =
            ClientConfig { subjob_size_bytes: 1 << 20, subjobs_in_flight: in_flight, ..ClientConfig::default() };
        Simulation::run(config, |client, _trace| async move {
            let len_sectors = 64 * 2048;
            let source: Device =
                Arc::new(MemDisk::new(MemDiskOptions { len_sectors, latency, ..MemDiskOptions::default() }));
            let target: Device = Arc::new(MemDisk::zeroed("target", len_sectors, 512));
            let began = tokio::time::Instant::now();
            let job = Job::copy(
                Region::new(source, 0, len_sectors),
                vec![Region::new(target, 0, len_sectors)],
                Flags::empty(),
            );
            assert!(client.submit(job).await.unwrap().await.is_ok());
            to_model(began.elapsed())
        })
        .unwrap()
    };
    let transfer_us = 1_048_576.0 / 1250.0;
    assert_within_5_percent(copy_with(1), 64.0 * (500.0 + transfer_us));
    assert_within_5_percent(copy_with(8), 64.0 * transfer_us + 500.0);
}

/// A disk that cannot tell its allocation fails every query, also after `heal` (it is what the
/// disk is, not a fault); a sparse copy from it reads everything and copies it exactly.
#[test]
fn a_source_that_cannot_tell_its_allocation_is_read_whole() {
    let options = MemDiskOptions {
        name: "opaque".into(),
        len_sectors: 256,
        sparse: true,
        faults: FaultPlan { allocation_unknown: true, ..FaultPlan::default() },
        ..MemDiskOptions::default()
    };
    let source = Arc::new(MemDisk::new(options));
    source.fill_pattern_range(64..72, 5, 0); // one data run; the rest are holes
    let target =
        Arc::new(MemDisk::new(MemDiskOptions { name: "target".into(), len_sectors: 256, ..MemDiskOptions::default() }));
    target.fill_pattern(9);
    let (query, outcome) = Simulation::block_on({
        let (source, target) = (source.clone(), target.clone());
        async move {
            source.heal();
            let query = source.allocated(0, 256).await;
            let client = kcopyd_core::Client::start_in_current_system(ClientConfig::default()).unwrap();
            let job = Job::copy(
                Region::new(source.clone(), 0, 256),
                vec![Region::new(target.clone(), 0, 256)],
                Flags::empty(),
            )
            .sparse(kcopyd_core::Sparse { skip_holes: true, ..kcopyd_core::Sparse::OFF });
            let outcome = client.submit(job).await.unwrap().await;
            client.shutdown().await;
            (query, outcome)
        }
    });
    let error = query.expect_err("the query fails");
    assert!(error.to_string().contains("opaque: allocation unknown"), "{error}");
    assert!(outcome.is_ok(), "{outcome:?}");
    assert_eq!(source.stats().read_bytes, 256 * 512, "every sector read: the allocation was not known");
    assert_eq!(target.snapshot(0, 256), source.snapshot(0, 256));
}
