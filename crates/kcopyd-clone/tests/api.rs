//! The clone through its public API: typed refusals before any write, metadata slots and
//! their fallback, overwrites and discards without copies, bounded retries, hints, status.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use kcopyd_clone::{CloneDevice, CloneDevices, CloneError, CloneOptions, HINTS_MAX, HydrationEnd, HydrationError};
use kcopyd_core::{BlockDevice, Client, ClientConfig, Device, ReadBuf, WriteBuf};
use kcopyd_sim::{IoModel, Latency, MemDisk, MemDiskOptions, Simulation, to_tokio};

struct Disks {
    source: Arc<MemDisk>,
    destination: Arc<MemDisk>,
    metadata: Arc<MemDisk>,
}

impl Disks {
    fn new(len_sectors: u64) -> Disks {
        let slow = Latency { read: IoModel { cost_us: 100, ..IoModel::default() }, ..Latency::default() };
        let source = Arc::new(MemDisk::new(MemDiskOptions {
            name: "source".into(),
            len_sectors,
            latency: slow,
            ..MemDiskOptions::default()
        }));
        source.fill_pattern(1);
        let destination = Arc::new(MemDisk::with_pattern("destination", len_sectors, 512, 2));
        let metadata = Arc::new(MemDisk::zeroed("metadata", 128, 512));
        Disks { source, destination, metadata }
    }

    fn devices(&self) -> CloneDevices {
        CloneDevices {
            source: self.source.clone(),
            destination: self.destination.clone(),
            metadata: self.metadata.clone(),
        }
    }
}

fn client() -> Client {
    Client::start_in_current_system(ClientConfig { page_budget: 64, ..ClientConfig::default() }).unwrap()
}

async fn read(clone: &CloneDevice, start: u64, sectors: u64) -> std::io::Result<Vec<u8>> {
    let (buf, result) = clone.read(start, ReadBuf::with_capacity(sectors as usize * 512)).await;
    result.map(|()| buf.to_vec())
}

#[test]
fn bad_region_sizes_and_devices_are_refused_before_anything_is_written() {
    Simulation::block_on(async {
        let disks = Disks::new(1024);
        let options = CloneOptions::default();
        for bytes in [0, 2048, 12288, 1 << 31] {
            let error = CloneDevice::create(disks.devices(), bytes, client(), options).await.unwrap_err();
            assert!(matches!(error, CloneError::RegionSize { bytes: b } if b == bytes), "{error}");
        }
        let short = Arc::new(MemDisk::zeroed("short", 512, 512));
        let devices = CloneDevices { destination: short, ..disks.devices() };
        let error = CloneDevice::create(devices, 4096, client(), options).await.unwrap_err();
        assert!(matches!(
            error,
            CloneError::DestinationTooSmall { destination_sectors: 512, source_sectors: 1024, .. }
        ));
        let devices = CloneDevices { metadata: disks.destination.clone(), ..disks.devices() };
        let error = CloneDevice::create(devices, 4096, client(), options).await.unwrap_err();
        assert!(
            matches!(error, CloneError::SameDevice { first: "destination", second: "metadata device", .. }),
            "{error}"
        );
        let tiny = Arc::new(MemDisk::zeroed("tiny", 16, 512));
        let devices = CloneDevices { metadata: tiny, ..disks.devices() };
        let error = CloneDevice::create(devices, 4096, client(), options).await.unwrap_err();
        assert!(matches!(error, CloneError::MetadataTooSmall { needed_sectors: 32, .. }), "{error}");
        let big_blocks = Arc::new(MemDisk::zeroed("big-blocks", 1024, 8192));
        let devices = CloneDevices { destination: big_blocks, ..disks.devices() };
        let error = CloneDevice::create(devices, 4096, client(), options).await.unwrap_err();
        assert!(matches!(error, CloneError::RegionSmallerThanBlock { block_size: 8192, .. }), "{error}");
        let bad = CloneOptions { hydration_batch_size: 0, ..options };
        let error = CloneDevice::create(disks.devices(), 4096, client(), bad).await.unwrap_err();
        assert!(matches!(error, CloneError::Option { name: "hydration_batch_size", value: 0, .. }), "{error}");
        for disk in [&disks.source, &disks.destination, &disks.metadata] {
            assert_eq!((disk.stats().writes, disk.stats().write_zeroes), (0, 0), "{} untouched", disk.name());
        }
        // The largest region dm-clone allows is taken.
        assert!(CloneDevice::create(disks.devices(), 1 << 30, client(), options).await.is_ok());
    });
}

#[test]
fn open_refuses_foreign_metadata_and_other_devices() {
    Simulation::block_on(async {
        let disks = Disks::new(1024);
        let error = CloneDevice::open(disks.devices(), client(), CloneOptions::default()).await.unwrap_err();
        assert!(matches!(error, CloneError::NoValidMetadata { .. }), "{error}");
        CloneDevice::create(disks.devices(), 4096, client(), CloneOptions::default()).await.unwrap();
        let other = Arc::new(MemDisk::with_pattern("other", 512, 512, 3));
        let devices = CloneDevices { source: other, ..disks.devices() };
        let error = CloneDevice::open(devices, client(), CloneOptions::default()).await.unwrap_err();
        assert!(
            matches!(error, CloneError::MetadataMismatch { field: "source sectors", recorded: 1024, actual: 512, .. }),
            "{error}"
        );
    });
}

/// A clone of `disks` with two commits after its first: commit 2 (slot 1) holds region 0,
/// hydrated by a whole-region write; commit 3 (slot 0, the newest) region 1 as well.
async fn two_commits(disks: &Disks) -> CloneDevice {
    let clone = CloneDevice::create(disks.devices(), 4096, client(), CloneOptions::default()).await.unwrap();
    for region in 0..2u64 {
        clone.write(region * 8, WriteBuf::from_bytes(Bytes::from(vec![7u8; 4096]))).await.unwrap();
        clone.flush().await.unwrap();
    }
    clone
}

#[test]
fn a_damaged_newest_slot_falls_back_to_the_older_commit() {
    Simulation::block_on(async {
        let disks = Disks::new(1024);
        let clone = two_commits(&disks).await;
        assert_eq!(clone.status().commit_seq, 3);
        let reopened = CloneDevice::open(disks.devices(), client(), CloneOptions::default()).await.unwrap();
        assert_eq!((reopened.status().regions_hydrated, reopened.status().commit_seq), (2, 3));
        // Tear slot 0's bitmap block (block 2 of the device): its checksum fails, slot 1 wins.
        disks.metadata.poke(16, &[0xff; 512]);
        let reopened = CloneDevice::open(disks.devices(), client(), CloneOptions::default()).await.unwrap();
        assert_eq!((reopened.status().regions_hydrated, reopened.status().commit_seq), (1, 2));
        assert_eq!(
            read(&reopened, 8, 8).await.unwrap(),
            disks.source.snapshot(8, 8),
            "region 1 reads the source again"
        );
    });
}

#[test]
fn whole_region_writes_and_discards_skip_the_copy_partial_writes_wait_for_it() {
    Simulation::block_on(async {
        let disks = Disks::new(1024);
        let options = CloneOptions { hydration_enabled: false, ..CloneOptions::default() };
        let clone = CloneDevice::create(disks.devices(), 16 * 1024, client(), options).await.unwrap();
        clone.write(0, WriteBuf::from_bytes(Bytes::from(vec![5u8; 16 * 1024]))).await.unwrap();
        clone.write_zeroes(32, 64).await.unwrap();
        assert_eq!(disks.source.stats().reads, 0, "neither a whole write nor a discard copies");
        assert_eq!(clone.stats().regions_overwritten, 3);
        clone.write(100, WriteBuf::from_bytes(Bytes::from(vec![9u8; 512]))).await.unwrap();
        assert_eq!((clone.stats().writes_waited, clone.stats().regions_copied), (1, 1));
        let mut expected = disks.source.snapshot(96, 32);
        expected[4 * 512..5 * 512].fill(9);
        assert_eq!(read(&clone, 96, 32).await.unwrap(), expected);
        assert!(read(&clone, 32, 64).await.unwrap().iter().all(|&b| b == 0));
        assert_eq!(clone.status().regions_hydrated, 4);
        assert_eq!(
            clone.status().to_string(),
            "8 4/16 32 4/32 0 1 no_hydration 4 hydration_threshold 1 hydration_batch_size 1 rw"
        );
    });
}

/// A clone of 32 regions whose source cannot read region 5: hydration gives it up.
async fn given_up_on_region_5() -> (Disks, CloneDevice) {
    let disks = Disks::new(256);
    disks.source.fail_reads(40..41); // region 5 of 8-sector regions
    let clone = CloneDevice::create(disks.devices(), 4096, client(), CloneOptions::default()).await.unwrap();
    assert_eq!(clone.run_hydration().await, HydrationEnd::GaveUp { regions: vec![5] });
    (disks, clone)
}

#[test]
fn a_region_that_keeps_failing_is_given_up_and_reported() {
    Simulation::block_on(async {
        let (disks, clone) = given_up_on_region_5().await;
        assert_eq!(clone.stats().copy_failures, 3, "hydration_attempts_max attempts, not for ever");
        assert_eq!(clone.status().regions_failed, vec![5]);
        let error = clone.write(40, WriteBuf::from_bytes(Bytes::from(vec![1u8; 512]))).await.unwrap_err();
        assert!(matches!(HydrationError::of(&error), Some(HydrationError::GivenUp { region: 5, .. })), "{error}");
        clone.write(40, WriteBuf::from_bytes(Bytes::from(vec![1u8; 4096]))).await.unwrap();
        assert_eq!(clone.run_hydration().await, HydrationEnd::Complete, "a whole write hydrated it");
        assert!(clone.status().hydration_complete);
        let reopened = CloneDevice::open(disks.devices(), client(), CloneOptions::default()).await.unwrap();
        assert!(reopened.status().hydration_complete, "complete on disk: no bitmap kept");
    });
}

#[test]
fn a_read_of_an_unhydrated_region_moves_it_to_the_front() {
    Simulation::block_on(async {
        let disks = Disks::new(8 * 64);
        let options = CloneOptions { hydration_enabled: false, ..CloneOptions::default() };
        let clone = CloneDevice::create(disks.devices(), 4096, client(), options).await.unwrap();
        assert_eq!(read(&clone, 8 * 50, 8).await.unwrap(), disks.source.snapshot(8 * 50, 8));
        assert_eq!(clone.stats().hints, 1);
        clone.set_options(CloneOptions::default()).unwrap();
        let hydrator = {
            let clone = clone.clone();
            actix_rt::spawn(async move { clone.run_hydration().await })
        };
        // One region copy later (100 µs reads), the hinted region is the one hydrated.
        tokio::time::sleep(to_tokio(Duration::from_micros(150))).await;
        assert_eq!(disks.destination.snapshot(8 * 50, 8), disks.source.snapshot(8 * 50, 8));
        assert_ne!(disks.destination.snapshot(0, 8), disks.source.snapshot(0, 8), "region 0 waits its turn");
        assert_eq!(hydrator.await.unwrap(), HydrationEnd::Complete);
    });
}

#[test]
fn the_background_waits_while_foreground_io_is_in_flight() {
    Simulation::block_on(async {
        let disks = Disks::new(8 * 16);
        let slow = Arc::new(MemDisk::new(MemDiskOptions {
            name: "slow-destination".into(),
            len_sectors: 8 * 16,
            latency: Latency { write: IoModel { cost_us: 10_000, ..IoModel::default() }, ..Latency::default() },
            ..MemDiskOptions::default()
        }));
        let destination: Device = slow.clone();
        let devices = CloneDevices { destination, ..disks.devices() };
        let clone = CloneDevice::create(devices, 4096, client(), CloneOptions::default()).await.unwrap();
        let writer = {
            let clone = clone.clone();
            actix_rt::spawn(async move { clone.write(0, WriteBuf::from_bytes(Bytes::from(vec![3u8; 4096]))).await })
        };
        tokio::task::yield_now().await;
        let hydrator = {
            let clone = clone.clone();
            actix_rt::spawn(async move { clone.run_hydration().await })
        };
        tokio::time::sleep(to_tokio(Duration::from_micros(9_000))).await;
        assert_eq!(disks.source.stats().reads, 0, "no copy starts while the write is in flight");
        writer.await.unwrap().unwrap();
        assert_eq!(hydrator.await.unwrap(), HydrationEnd::Complete);
        assert_eq!(clone.stats().regions_copied, 15);
    });
}

/// Hydrates a 16 MiB clone of 64 KiB regions from a source behind a 0.5 ms, 10 Gbit/s link;
/// returns the model time it took.
fn hydration_time(options: CloneOptions, throttle: kcopyd_core::Throttle) -> Duration {
    Simulation::block_on(async move {
        let len_sectors = 16 * 2048;
        let link = kcopyd_sim::LinkModel { round_trip_us: 500, bandwidth_bytes_per_s: 1_250_000_000, burst_bytes: 0 };
        let source = Arc::new(MemDisk::new(MemDiskOptions {
            name: "remote".into(),
            len_sectors,
            latency: Latency { link, ..Latency::default() },
            ..MemDiskOptions::default()
        }));
        source.fill_pattern(9);
        let destination = Arc::new(MemDisk::zeroed("destination", len_sectors, 512));
        let metadata = Arc::new(MemDisk::zeroed("metadata", 64, 512));
        let config = ClientConfig { throttle, ..ClientConfig::default() };
        let client = Client::start_in_current_system(config).unwrap();
        let devices = CloneDevices { source: source.clone(), destination: destination.clone(), metadata };
        let clone = CloneDevice::create(devices, 64 * 1024, client.clone(), options).await.unwrap();
        let began = tokio::time::Instant::now();
        assert_eq!(clone.run_hydration().await, HydrationEnd::Complete);
        let elapsed = kcopyd_sim::to_model(began.elapsed());
        assert_eq!(destination.snapshot(0, len_sectors), source.snapshot(0, len_sectors));
        client.shutdown().await;
        elapsed
    })
}

#[test]
fn the_threshold_fills_a_remote_link_and_the_client_throttle_paces_hydration() {
    let knobs = |threshold, batch| CloneOptions {
        hydration_threshold: threshold,
        hydration_batch_size: batch,
        ..CloneOptions::default()
    };
    let off = kcopyd_core::Throttle::default();
    let one = hydration_time(knobs(1, 1), off);
    let eight = hydration_time(knobs(8, 1), off);
    // The threshold counts regions: one batch of eight takes it all (one request on the link),
    // so batches want a threshold of several batches.
    let one_batch = hydration_time(knobs(8, 8), off);
    let batched = hydration_time(knobs(64, 8), off);
    // 256 regions one at a time pay the round trip each: 256 × (0.5 ms + 52 µs) ≈ 141 ms.
    assert!(one > Duration::from_millis(130), "{one:?}");
    assert!(eight * 4 < one, "eight in flight: {eight:?} against {one:?}");
    assert!(one_batch > eight, "one batch of eight in flight: {one_batch:?} against {eight:?}");
    assert!(batched < eight, "eight batches of eight: {batched:?} against {eight:?}");
    let rate = kcopyd_core::Throttle { rate_bytes_per_s: Some(50_000_000), ..off };
    let throttled = hydration_time(knobs(64, 8), rate);
    // 16 MiB at 50 MB/s: 335 ms.
    assert!(throttled > Duration::from_millis(300), "{throttled:?}");
    eprintln!(
        "hydration of 16 MiB over a 0.5 ms link: threshold 1: {one:?}, 8: {eight:?}, 8 with batches of 8: \
         {one_batch:?}, 64 with batches of 8: {batched:?}, the same throttled to 50 MB/s: {throttled:?}"
    );
}

#[test]
fn an_empty_source_makes_a_complete_clone_and_requests_past_the_end_are_refused() {
    Simulation::block_on(async {
        let disks = Disks::new(0);
        let clone = CloneDevice::create(disks.devices(), 4096, client(), CloneOptions::default()).await.unwrap();
        assert_eq!(clone.run_hydration().await, HydrationEnd::Complete);
        assert!(clone.status().hydration_complete);
        let error = read(&clone, 0, 1).await.unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput);
        let reopened = CloneDevice::open(disks.devices(), client(), CloneOptions::default()).await.unwrap();
        assert_eq!(reopened.status().regions_total, 0);
        let disks = Disks::new(64);
        let clone = CloneDevice::create(disks.devices(), 4096, client(), CloneOptions::default()).await.unwrap();
        let error = clone.write(60, WriteBuf::from_bytes(Bytes::from(vec![1u8; 8 * 512]))).await.unwrap_err();
        assert!(error.to_string().contains("past the end"), "{error}");
        let error = clone.write_zeroes(0, u64::MAX).await.unwrap_err();
        assert!(error.to_string().contains("past the end"), "{error}");
        assert_eq!(disks.destination.stats().writes + disks.destination.stats().write_zeroes, 0);
    });
}

/// A refused request carries the typed refusal every device shares: the operation, the rule,
/// the request and the clone's size or block, as `InvalidInput`; nothing reaches the disks.
#[test]
fn refused_requests_carry_the_shared_typed_refusal() {
    use kcopyd_clone::RequestError;
    use kcopyd_core::RequestRefused;

    Simulation::block_on(async {
        let disks = Disks::new(64);
        let clone = CloneDevice::create(disks.devices(), 4096, client(), CloneOptions::default()).await.unwrap();
        let device_sectors = clone.geometry().len_sectors;
        let refusal = |error: &std::io::Error| {
            assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput, "{error}");
            match error.get_ref().and_then(|inner| inner.downcast_ref::<RequestError>()) {
                Some(RequestError::Geometry { operation, refused, .. }) => (*operation, *refused),
                _ => panic!("not a typed refusal: {error}"),
            }
        };
        let past = clone.write(device_sectors, WriteBuf::zeroes(4096)).await.unwrap_err();
        let out = RequestRefused::OutOfRange { offset_sectors: device_sectors, len_bytes: 4096, device_sectors };
        assert_eq!(refusal(&past), ("write", out));
        let everything = clone.write_zeroes(8, u64::MAX).await.unwrap_err();
        assert!(matches!(refusal(&everything), ("write-zeroes", RequestRefused::OutOfRange { .. })), "{everything}");
        let odd = clone.write(0, WriteBuf::from_bytes(Bytes::from(vec![1u8; 100]))).await.unwrap_err();
        assert!(matches!(refusal(&odd), ("write", RequestRefused::Misaligned { block_bytes: 512, .. })), "{odd}");
        let (_, short) = clone.read(0, ReadBuf::with_capacity(100)).await;
        assert!(matches!(refusal(&short.unwrap_err()), ("read", RequestRefused::Misaligned { len_bytes: 100, .. })));
        assert_eq!(disks.destination.stats().writes + disks.destination.stats().write_zeroes, 0);
    });
}

#[test]
fn the_background_future_can_be_spawned_on_a_multi_threaded_runtime() {
    fn assert_send<T: Send + 'static>(_: T) {}
    Simulation::block_on(async {
        let disks = Disks::new(64);
        let clone = CloneDevice::create(disks.devices(), 4096, client(), CloneOptions::default()).await.unwrap();
        assert_send(async move { clone.run_hydration().await });
    });
}

#[test]
fn allocation_shows_the_sources_holes_until_their_regions_hydrate_and_asks_no_hints() {
    Simulation::block_on(async {
        let sparse = |name: &str| {
            let options =
                MemDiskOptions { name: name.into(), len_sectors: 1024, sparse: true, ..MemDiskOptions::default() };
            Arc::new(MemDisk::new(options))
        };
        let source = sparse("source");
        source.poke(64, &[7u8; 8 * 512]);
        source.poke(900, &[9u8; 8 * 512]);
        let destination = sparse("destination");
        let metadata = Arc::new(MemDisk::zeroed("metadata", 128, 512));
        let devices = CloneDevices { source: source.clone(), destination: destination.clone(), metadata };
        let clone = CloneDevice::create(devices, 4096, client(), CloneOptions::default()).await.unwrap();
        let data = clone.allocated(0, 1024).await.unwrap();
        assert_eq!(data.ranges(), &[64..72, 900..908], "the source's data, nothing else");
        assert_eq!(clone.stats().hints, 0, "an allocation query is no read");
        // A region written through the clone holds data now, on the destination.
        clone.write(500, WriteBuf::from_bytes(Bytes::from(vec![1u8; 4096]))).await.unwrap();
        let data = clone.allocated(0, 1024).await.unwrap();
        assert_eq!(data.ranges(), &[64..72, 500..508, 900..908]);
        assert_eq!(
            clone.allocated(60, 8).await.unwrap(),
            kcopyd_core::RangeSet::from_range(64..68),
            "clipped to the query"
        );
        assert!(clone.allocated(1020, 8).await.is_err(), "past the end");
        // A hydrated region (7, written) then an unhydrated one (8, the source's data): each
        // side asked for its own run.
        clone.write(56, WriteBuf::from_bytes(Bytes::from(vec![2u8; 4096]))).await.unwrap();
        assert_eq!(clone.allocated(56, 16).await.unwrap(), kcopyd_core::RangeSet::from_range(56..72));
        assert_eq!(clone.run_hydration().await, HydrationEnd::Complete);
        let data = clone.allocated(0, 1024).await.unwrap();
        assert_eq!(data, destination.allocated(0, 1024).await.unwrap(), "hydrated: the destination tells");
        for range in [64..72, 500..508, 900..908] {
            assert!(data.intersects(&range) && range.clone().all(|s| data.contains(s)), "{range:?} kept");
        }
    });
}

/// Copies a shut-down client refuses (their jobs dropped without running) are recorded as
/// failed copies: their regions come back not hydrated, so neither the background nor a
/// foreground write waiting on one hangs, and a fresh client hydrates them later.
#[test]
fn copies_a_shut_down_client_refuses_come_back_not_hydrated_and_hydrate_later() {
    Simulation::block_on(async {
        let regions = 16u64;
        let disks = Disks::new(8 * regions);
        let engine = client();
        let options = CloneOptions { hydration_threshold: 4, ..CloneOptions::default() };
        let clone = CloneDevice::create(disks.devices(), 4096, engine.clone(), options).await.unwrap();
        let hydrator = {
            let clone = clone.clone();
            actix_rt::spawn(async move { clone.run_hydration().await })
        };
        // A few copies in flight (100 µs reads), the rest still to be queued, when the client stops.
        tokio::time::sleep(to_tokio(Duration::from_micros(150))).await;
        engine.shutdown().await;
        let bound = to_tokio(Duration::from_secs(10));
        let end = tokio::time::timeout(bound, hydrator).await.expect("refused copies hang the hydration").unwrap();
        let HydrationEnd::GaveUp { regions: given_up } = end else { panic!("{end:?}") };
        let copied = clone.stats().regions_copied;
        assert!(!given_up.is_empty() && copied > 0, "copied {copied}, given up {given_up:?}");
        assert_eq!(copied + given_up.len() as u64, regions);
        assert_eq!(clone.stats().copy_failures, 3 * given_up.len() as u64, "each refused copy counted");
        assert_eq!(clone.status().regions_hydrated, copied, "a refused copy hydrates nothing");
        for &region in &given_up {
            let untouched = disks.destination.snapshot(region * 8, 8)
                == Disks::new(8 * regions).destination.snapshot(region * 8, 8);
            assert!(untouched, "region {region} was not written");
        }
        // A foreground write over part of a region whose copy the client refuses fails; it does not wait for ever.
        let stopped = client();
        stopped.shutdown().await;
        let waiting = CloneOptions { hydration_enabled: false, ..options };
        let reopened = CloneDevice::open(disks.devices(), stopped, waiting).await.unwrap();
        let region = given_up[0];
        let write = reopened.write(region * 8 + 1, WriteBuf::from_bytes(Bytes::from(vec![4u8; 512])));
        let error = tokio::time::timeout(bound, write).await.expect("a write waits for ever").unwrap_err();
        assert!(matches!(HydrationError::of(&error), Some(HydrationError::CopyFailed { .. })), "{error}");
        assert_eq!(reopened.stats().copy_failures, 1);
        assert_eq!(reopened.status().regions_hydrated, copied);
        // A fresh client hydrates every region the refused copies left.
        let resumed = CloneDevice::open(disks.devices(), client(), options).await.unwrap();
        assert_eq!(resumed.status().regions_hydrated, copied);
        let end = tokio::time::timeout(bound, resumed.run_hydration()).await.expect("hydration resumes");
        assert_eq!(end, HydrationEnd::Complete);
        let hydrated = disks.destination.snapshot(0, 8 * regions) == disks.source.snapshot(0, 8 * regions);
        assert!(hydrated, "the destination holds the source");
    });
}

#[test]
fn the_handle_tells_its_options_name_and_the_destinations_deallocation() {
    Simulation::block_on(async {
        let disks = Disks::new(64);
        let options = CloneOptions { hydration_threshold: 3, hydration_batch_size: 2, ..CloneOptions::default() };
        let clone = CloneDevice::create(disks.devices(), 4096, client(), options).await.unwrap();
        assert_eq!(clone.options(), options);
        assert_eq!(clone.name(), "clone:destination");
        assert!(!clone.deallocates(), "a dense destination frees nothing");
        let thin = Arc::new(MemDisk::new(MemDiskOptions {
            name: "thin".into(),
            len_sectors: 64,
            sparse: true,
            ..MemDiskOptions::default()
        }));
        let metadata = Arc::new(MemDisk::zeroed("metadata2", 128, 512));
        let devices = CloneDevices { destination: thin, metadata, ..disks.devices() };
        let clone = CloneDevice::create(devices, 4096, client(), options).await.unwrap();
        assert!(clone.deallocates(), "a thin destination frees what is discarded");
    });
}

#[test]
fn a_region_given_up_is_tried_again_when_asked() {
    Simulation::block_on(async {
        let (disks, clone) = given_up_on_region_5().await;
        disks.source.heal();
        clone.retry_failed();
        assert_eq!(clone.status().regions_failed, Vec::<u64>::new());
        assert_eq!(clone.run_hydration().await, HydrationEnd::Complete);
        assert_eq!(disks.destination.snapshot(40, 8), disks.source.snapshot(40, 8));
    });
}

#[test]
fn reads_count_their_sectors_by_device_and_their_hints() {
    Simulation::block_on(async {
        let disks = Disks::new(8 * 16);
        let options = CloneOptions { hydration_enabled: false, ..CloneOptions::default() };
        let clone = CloneDevice::create(disks.devices(), 4096, client(), options).await.unwrap();
        read(&clone, 8 * 3, 8).await.unwrap();
        let source_reads = disks.source.stats().reads;
        read(&clone, 8 * 9 + 2, 11).await.unwrap(); // regions 9 and 10
        assert_eq!(disks.source.stats().reads - source_reads, 1, "two unhydrated regions, one source read");
        let stats = clone.stats();
        assert_eq!((stats.reads, stats.read_source_sectors, stats.read_destination_sectors), (2, 19, 0));
        assert_eq!(stats.hints, 3, "one hint per unhydrated region read");
        clone.write(0, WriteBuf::from_bytes(Bytes::from(vec![5u8; 8 * 512]))).await.unwrap();
        read(&clone, 4, 8).await.unwrap(); // 4 sectors of region 0 (written), 4 of region 1
        let stats = clone.stats();
        assert_eq!((stats.read_source_sectors, stats.read_destination_sectors), (23, 4));
    });
}

#[test]
fn reads_queue_at_most_hints_max_hints_each_region_once() {
    Simulation::block_on(async {
        let regions = HINTS_MAX as u64 + 8;
        let disks = Disks::new(8 * regions);
        let options = CloneOptions { hydration_enabled: false, ..CloneOptions::default() };
        let clone = CloneDevice::create(disks.devices(), 4096, client(), options).await.unwrap();
        read(&clone, 0, 8 * 4).await.unwrap();
        read(&clone, 8, 8).await.unwrap();
        assert_eq!(clone.stats().hints, 4, "a region already queued is not queued again");
        // One sector of every region: the queue fills at HINTS_MAX and takes no more.
        for region in 0..regions {
            read(&clone, 8 * region + 3, 1).await.unwrap();
        }
        assert_eq!(clone.stats().hints, HINTS_MAX as u64);
    });
}

#[test]
fn the_background_copies_hydration_batch_size_contiguous_regions_per_job() {
    Simulation::block_on(async {
        for (batch, jobs) in [(8, 8), (5, 13), (3, 22), (1, 64)] {
            let disks = Disks::new(8 * 64);
            // Room for two whole batches: none is cut short by the threshold.
            let options =
                CloneOptions { hydration_threshold: 2 * batch, hydration_batch_size: batch, ..CloneOptions::default() };
            let clone = CloneDevice::create(disks.devices(), 4096, client(), options).await.unwrap();
            assert_eq!(clone.run_hydration().await, HydrationEnd::Complete);
            let stats = clone.stats();
            assert_eq!((stats.hydration_jobs, stats.regions_copied), (jobs, 64), "64 regions in batches of {batch}");
            assert_eq!(disks.destination.snapshot(0, 8 * 64), disks.source.snapshot(0, 8 * 64));
        }
    });
}

/// The cursor's scan skips whole words of hydrated regions only where a word starts: from a
/// cursor inside a full first word it must still look at the next word's first region.
#[test]
fn the_background_finds_a_region_right_after_a_full_word_from_a_cursor_inside_it() {
    Simulation::block_on(async {
        let disks = Disks::new(8 * 128);
        let options = CloneOptions { hydration_threshold: 1, hydration_batch_size: 1, ..CloneOptions::default() };
        let clone = CloneDevice::create(disks.devices(), 4096, client(), options).await.unwrap();
        // Regions 1..64 and 65..128 written whole (hydrated without a copy): 0 and 64 are left.
        for regions in [1..64u64, 65..128] {
            let bytes = vec![7u8; (regions.end - regions.start) as usize * 4096];
            clone.write(8 * regions.start, WriteBuf::from_bytes(Bytes::from(bytes))).await.unwrap();
        }
        // Region 0 is copied first and leaves the cursor at 1, inside the then full word 0.
        let end = tokio::time::timeout(to_tokio(Duration::from_secs(1)), clone.run_hydration()).await;
        assert_eq!(end.expect("hydration ended"), HydrationEnd::Complete);
        assert_eq!(clone.stats().regions_copied, 2);
        assert_eq!(disks.destination.snapshot(8 * 64, 8), disks.source.snapshot(8 * 64, 8));
    });
}

#[test]
fn the_background_resumes_when_the_last_foreground_read_ends() {
    Simulation::block_on(async {
        let disks = Disks::new(8 * 16); // source reads take 100 µs
        let clone = CloneDevice::create(disks.devices(), 4096, client(), CloneOptions::default()).await.unwrap();
        let reader = {
            let clone = clone.clone();
            actix_rt::spawn(async move { read(&clone, 8 * 7, 8).await })
        };
        tokio::task::yield_now().await;
        let hydrator = {
            let clone = clone.clone();
            actix_rt::spawn(async move { clone.run_hydration().await })
        };
        // Paused while the read is in flight; woken when it ends, with nothing else to wake it.
        let end = tokio::time::timeout(to_tokio(Duration::from_secs(1)), hydrator).await;
        assert_eq!(end.expect("hydration resumed after the read").unwrap(), HydrationEnd::Complete);
        assert_eq!(reader.await.unwrap().unwrap(), disks.source.snapshot(8 * 7, 8));
    });
}

#[test]
fn the_background_keeps_at_most_the_threshold_in_flight_and_commits_as_it_goes() {
    Simulation::block_on(async {
        let disks = Disks::new(8 * 64); // source reads take 100 µs
        // Batches of 3 under a threshold of 4: the second batch may take one region only.
        let options = CloneOptions { hydration_threshold: 4, hydration_batch_size: 3, ..CloneOptions::default() };
        let clone = CloneDevice::create(disks.devices(), 4096, client(), options).await.unwrap();
        let hydrator = {
            let clone = clone.clone();
            actix_rt::spawn(async move { clone.run_hydration().await })
        };
        let mut most = 0;
        while !hydrator.is_finished() {
            most = most.max(clone.status().regions_hydrating);
            tokio::time::sleep(to_tokio(Duration::from_micros(20))).await;
        }
        assert_eq!(hydrator.await.unwrap(), HydrationEnd::Complete);
        assert_eq!(most, 4, "the threshold is reached and never passed");
        // One region at a time with a commit every model millisecond: progress is committed
        // while the regions hydrate, not only at the end.
        let options =
            CloneOptions { hydration_threshold: 1, hydration_batch_size: 1, commit_interval_ms: 1, ..options };
        let disks = Disks::new(8 * 64);
        let clone = CloneDevice::create(disks.devices(), 4096, client(), options).await.unwrap();
        assert_eq!(clone.run_hydration().await, HydrationEnd::Complete);
        assert!(clone.stats().commits >= 4, "{} commits over 64 regions of 100 µs", clone.stats().commits);
    });
}

/// A sparse in-memory disk (nothing allocated until written).
fn sparse_disk(name: &str, len_sectors: u64) -> Arc<MemDisk> {
    Arc::new(MemDisk::new(MemDiskOptions { name: name.into(), len_sectors, sparse: true, ..MemDiskOptions::default() }))
}

/// A large clone's devices: sparse source and destination of `len_sectors`, and `metadata`.
fn sparse_devices(len_sectors: u64, metadata: Arc<MemDisk>) -> CloneDevices {
    CloneDevices {
        source: sparse_disk("source", len_sectors),
        destination: sparse_disk("destination", len_sectors),
        metadata,
    }
}

/// Whether bit `region % 8` of byte `region / 8` of `slot`'s bitmap is set, read where the
/// documented format puts it: blocks of 4096 bytes, headers in blocks 0 and 1, then `blocks`
/// bitmap blocks per slot.
fn bit_on_disk(metadata: &MemDisk, slot: u64, blocks: u64, region: u64) -> bool {
    let byte = region / 8;
    let block = 2 + slot * blocks + byte / 4096;
    let sector = block * 8 + (byte % 4096) / 512;
    metadata.snapshot(sector, 1)[(byte % 512) as usize] & (1 << (region % 8)) != 0
}

#[test]
fn a_bitmap_of_two_blocks_sits_where_the_format_says_and_sizes_its_device() {
    Simulation::block_on(async {
        // 40,000 regions of 4 KiB: a 5,000-byte bitmap, two 4 KiB blocks per slot.
        let len = 40_000 * 8;
        let needed = kcopyd_clone::metadata_bytes_needed(len, 4096, 512);
        assert_eq!(needed, (2 + 2 * 2) * 4096);
        let devices = |metadata: Arc<MemDisk>| sparse_devices(len, metadata);
        let options = CloneOptions { hydration_enabled: false, ..CloneOptions::default() };
        let short = sparse_disk("short", needed / 512 - 1);
        match CloneDevice::create(devices(short), 4096, client(), options).await {
            Err(CloneError::MetadataTooSmall { needed_sectors, .. }) => assert_eq!(needed_sectors, needed / 512),
            other => panic!("a metadata device a sector short: {other:?}"),
        }
        let metadata = sparse_disk("metadata", needed / 512);
        let devices = devices(metadata.clone());
        let clone = CloneDevice::create(devices.clone(), 4096, client(), options).await.unwrap();
        // The newest commit's slot: the header (block 0 or 1) with the larger sequence number
        // (bytes 16..24), whose own slot field (bytes 64..68) names it.
        let header = |slot: u64| metadata.snapshot(slot * 8, 1);
        let seq = |slot: u64| u64::from_le_bytes(header(slot)[16..24].try_into().unwrap());
        // Three commits: both blocks change, then (each slot in turn) only the second block,
        // which a commit then writes alone.
        let mut written = Vec::new();
        for regions in [vec![100u64, 35_000], vec![35_002], vec![35_004]] {
            for &region in &regions {
                clone.write(region * 8, WriteBuf::from_bytes(Bytes::from(vec![9u8; 4096]))).await.unwrap();
            }
            written.extend(regions);
            clone.flush().await.unwrap();
            let newest = if seq(1) > seq(0) { 1 } else { 0 };
            assert_eq!(seq(newest), clone.status().commit_seq);
            assert_eq!(u32::from_le_bytes(header(newest)[64..68].try_into().unwrap()), newest as u32);
            for &region in &written {
                assert!(bit_on_disk(&metadata, newest, 2, region), "region {region} not in slot {newest}'s bitmap");
            }
            assert!(!bit_on_disk(&metadata, newest, 2, 35_001));
        }
        let reopened = CloneDevice::open(devices, client(), options).await.unwrap();
        assert_eq!(reopened.status().regions_hydrated, 4);
    });
}

#[test]
fn flushes_that_wait_behind_a_commit_share_the_next_one() {
    Simulation::block_on(async {
        let disks = Disks::new(8 * 16);
        // Metadata writes take 1 ms: a commit yields while it writes.
        let metadata = Arc::new(MemDisk::new(MemDiskOptions {
            name: "slow-metadata".into(),
            len_sectors: 128,
            latency: Latency { write: IoModel { cost_us: 1000, ..IoModel::default() }, ..Latency::default() },
            ..MemDiskOptions::default()
        }));
        let devices = CloneDevices { metadata, ..disks.devices() };
        let options = CloneOptions { hydration_enabled: false, ..CloneOptions::default() };
        let clone = CloneDevice::create(devices, 4096, client(), options).await.unwrap();
        clone.write(0, WriteBuf::from_bytes(Bytes::from(vec![4u8; 4096]))).await.unwrap();
        let before = disks.destination.stats().flushes;
        // The first takes the commit; the three behind it arrive while it runs, so the one
        // commit that begins after them covers all three.
        let results = tokio::join!(clone.flush(), clone.flush(), clone.flush(), clone.flush());
        assert!(results.0.is_ok() && results.1.is_ok() && results.2.is_ok() && results.3.is_ok());
        assert_eq!(disks.destination.stats().flushes - before, 2, "two commits for four flushes");
    });
}

/// CRC-32C (Castagnoli, reflected), written out here as docs/CLONE.md specifies it.
fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0x82f6_3b78 } else { crc >> 1 };
        }
    }
    !crc
}

#[test]
fn a_newest_header_with_a_valid_checksum_but_impossible_fields_is_not_believed() {
    Simulation::block_on(async {
        let disks = Disks::new(1024);
        two_commits(&disks).await;
        let good = disks.metadata.snapshot(0, 1);
        assert_eq!(crc32c(&good[..84]).to_le_bytes(), good[84..88], "the checksum as the format gives it");
        // Each a field a header of this format cannot hold, the header's checksum made right.
        let forged: [(&str, usize, Vec<u8>); 6] = [
            ("another magic", 0, b"KCLONEv0".to_vec()),
            ("a count of hydrated regions that is not its bitmap's", 56, 1u64.to_le_bytes().to_vec()),
            ("more hydrated regions than regions", 56, 129u64.to_le_bytes().to_vec()),
            ("a region size of 3 sectors", 24, 3u64.to_le_bytes().to_vec()),
            ("a block of 3000 bytes", 12, 3000u32.to_le_bytes().to_vec()),
            ("slot 2", 64, 2u32.to_le_bytes().to_vec()),
        ];
        for (what, offset, bytes) in forged {
            let mut header = good.clone();
            header[offset..offset + bytes.len()].copy_from_slice(&bytes);
            let crc = crc32c(&header[..84]);
            header[84..88].copy_from_slice(&crc.to_le_bytes());
            disks.metadata.poke(0, &header);
            let reopened = CloneDevice::open(disks.devices(), client(), CloneOptions::default()).await.unwrap();
            let status = reopened.status();
            assert_eq!((status.regions_hydrated, status.commit_seq), (1, 2), "{what}: slot 1's commit is the one used");
        }
        // Slot 1's own header, sequence raised, in block 0: a valid header in the wrong place.
        let mut moved = disks.metadata.snapshot(8, 1);
        moved[16..24].copy_from_slice(&9u64.to_le_bytes());
        let crc = crc32c(&moved[..84]);
        moved[84..88].copy_from_slice(&crc.to_le_bytes());
        disks.metadata.poke(0, &moved);
        let reopened = CloneDevice::open(disks.devices(), client(), CloneOptions::default()).await.unwrap();
        assert_eq!(reopened.status().commit_seq, 2, "a header found in the other slot's block is not used");
        disks.metadata.poke(0, &good);
        let reopened = CloneDevice::open(disks.devices(), client(), CloneOptions::default()).await.unwrap();
        assert_eq!(reopened.status().commit_seq, 3, "the true header is read again");
    });
}

/// A commit writes each bitmap block its slot lacks, runs of them merged only where they
/// touch: blocks 0 and 2 changed, block 1 not, so both are written and block 1 is not needed.
#[test]
fn a_commit_writes_the_changed_bitmap_blocks_that_do_not_touch() {
    Simulation::block_on(async {
        // 70,000 regions of 4 KiB: an 8,750-byte bitmap, three 4 KiB blocks per slot.
        let len = 70_000 * 8;
        let metadata = sparse_disk("metadata", kcopyd_clone::metadata_bytes_needed(len, 4096, 512) / 512);
        let devices = sparse_devices(len, metadata.clone());
        let options = CloneOptions { hydration_enabled: false, ..CloneOptions::default() };
        let clone = CloneDevice::create(devices.clone(), 4096, client(), options).await.unwrap();
        let slot = |seq: u64| 1 - seq % 2; // create commits sequence 1 to slot 0
        for (commit, regions) in [[100u64, 68_000], [200, 69_000], [300, 67_000]].into_iter().enumerate() {
            for region in regions {
                clone.write(region * 8, WriteBuf::from_bytes(Bytes::from(vec![9u8; 4096]))).await.unwrap();
            }
            clone.flush().await.unwrap();
            let newest = slot(clone.status().commit_seq);
            for region in regions {
                assert!(
                    bit_on_disk(&metadata, newest, 3, region),
                    "commit {commit}: region {region} not in slot {newest}"
                );
            }
        }
        let reopened = CloneDevice::open(devices, client(), options).await.unwrap();
        assert_eq!((reopened.status().regions_hydrated, reopened.status().commit_seq), (6, clone.status().commit_seq));
    });
}

/// The format keeps the bits past the last region zero; a bitmap with one set there (its
/// checksums and count made to agree) would count a region that does not exist as hydrated,
/// and a real one could be taken as hydrated when it is not. It is not believed.
#[test]
fn a_bitmap_with_a_bit_past_the_last_region_is_not_believed() {
    Simulation::block_on(async {
        let disks = Disks::new(8 * 13); // 13 regions: bits 13..16 of the bitmap's 2 bytes are past them
        two_commits(&disks).await;
        let mut header = disks.metadata.snapshot(0, 1);
        let mut bitmap = disks.metadata.snapshot(16, 1); // slot 0's bitmap block
        bitmap[1] |= 1 << 5; // region 13
        header[56..64].copy_from_slice(&3u64.to_le_bytes());
        header[68..72].copy_from_slice(&crc32c(&bitmap[..2]).to_le_bytes());
        let crc = crc32c(&header[..84]);
        header[84..88].copy_from_slice(&crc.to_le_bytes());
        disks.metadata.poke(16, &bitmap);
        disks.metadata.poke(0, &header);
        let reopened = CloneDevice::open(disks.devices(), client(), CloneOptions::default()).await.unwrap();
        let status = reopened.status();
        assert_eq!((status.regions_hydrated, status.commit_seq), (1, 2), "slot 1's commit is the one used");
    });
}

#[test]
fn an_unreadable_metadata_block_is_named_by_its_sectors() {
    Simulation::block_on(async {
        let disks = Disks::new(1024);
        CloneDevice::create(disks.devices(), 4096, client(), CloneOptions::default()).await.unwrap();
        disks.metadata.fail_reads(9..10); // in slot 1's header; both headers are read at once
        match CloneDevice::open(disks.devices(), client(), CloneOptions::default()).await {
            Err(CloneError::ReadMetadata { device, sectors, .. }) => {
                assert_eq!((device.as_str(), sectors), ("metadata", 0..16));
            }
            other => panic!("an unreadable header: {other:?}"),
        }
    });
}

#[test]
fn reading_a_region_given_up_on_does_not_try_it_again() {
    Simulation::block_on(async {
        let (_disks, clone) = given_up_on_region_5().await;
        let hints = clone.stats().hints;
        assert!(read(&clone, 40, 8).await.is_err(), "the source still cannot be read there");
        read(&clone, 32, 8).await.unwrap(); // region 4, hydrated: no hint either
        assert_eq!(clone.stats().hints, hints, "no hint for a region given up on or hydrated");
        assert_eq!(clone.run_hydration().await, HydrationEnd::GaveUp { regions: vec![5] });
        assert_eq!(clone.stats().copy_failures, 3, "no attempt beyond the maximum");
    });
}
