//! Sparse copies through the engine on simulated disks: only allocated source ranges are read,
//! holes and zero blocks reach the targets as zeroes (write-zeroes, deallocated, or skipped
//! when the caller says the target is zero), never leaving stale target data behind; and the
//! time a thin-volume resync takes in virtual time.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use kcopyd_core::{
    BlockDevice, Client, ClientConfig, Device, Flags, Forward, Hooks, IoFuture, Job, Outcome, RangeSet, Region, Sparse,
    SubmitError, TargetZeroes,
};
use kcopyd_sim::{FaultPlan, IoModel, Latency, MemDisk, MemDiskOptions, Simulation, to_model};

const LEN_SECTORS: u64 = 64 * 2048; // 64 MiB

fn disk(name: &str, sparse: bool, write_zeroes: bool) -> Arc<MemDisk> {
    Arc::new(MemDisk::new(MemDiskOptions {
        name: name.into(),
        len_sectors: LEN_SECTORS,
        logical_block_size: 4096,
        sparse,
        write_zeroes,
        ..MemDiskOptions::default()
    }))
}

/// A thin source: three allocated runs (pattern data), the rest holes.
fn thin_source() -> Arc<MemDisk> {
    let source = disk("source", true, false);
    source.fill_pattern_range(0..256, 11, 0);
    source.fill_pattern_range(10_000..10_008, 11, 0);
    source.fill_pattern_range(100_000..101_000, 11, 0);
    assert_eq!(source.allocated_sectors(0..LEN_SECTORS), 256 + 8 + 1000);
    source
}

fn run(job: Job) -> Outcome {
    let client = Client::new(ClientConfig::default()).expect("a client");
    let outcome = client.submit_blocking(job).expect("the job is valid").wait();
    let report = client.shutdown_blocking();
    assert_eq!(report.pool.pages_in_use, 0);
    outcome
}

fn copy(source: Device, targets: &[Arc<MemDisk>], sparse: Sparse) -> Outcome {
    let targets = targets.iter().map(|t| Region::new(t.clone() as Device, 0, LEN_SECTORS)).collect();
    run(Job::copy(Region::new(source, 0, LEN_SECTORS), targets, Flags::empty()).sparse(sparse))
}

fn same(a: &MemDisk, b: &MemDisk) -> bool {
    a.snapshot(0, LEN_SECTORS) == b.snapshot(0, LEN_SECTORS)
}

/// Hooks of a device that cannot tell its allocation (it answers with `all_allocated`).
#[derive(Debug)]
struct CannotTell;

impl Hooks for CannotTell {
    fn allocated<'a>(
        &'a self,
        _inner: &'a dyn BlockDevice,
        offset: u64,
        len: u64,
    ) -> IoFuture<'a, io::Result<RangeSet>> {
        kcopyd_core::all_allocated(offset, len)
    }
}

const PUNCH: Sparse = Sparse { skip_holes: true, zero_block_bytes: 4096, target_zeroes: TargetZeroes::Deallocate };

#[test]
fn only_allocated_ranges_are_read_and_holes_replace_stale_target_data() {
    let source = thin_source();
    // Targets full of old data: a sparse one (deallocates), a dense one with write-zeroes
    // offload, and a dense one without (zeroes must be written as data).
    let targets = [disk("thin", true, false), disk("offload", false, true), disk("plain", false, false)];
    for target in &targets {
        target.fill_pattern(99);
    }
    let outcome = copy(source.clone(), &targets, PUNCH);
    assert!(outcome.is_ok(), "{outcome:?}");
    for target in &targets {
        assert!(same(&source, target), "{} holds the source", target.name());
    }
    let read_bytes = source.stats().read_bytes;
    assert_eq!(read_bytes, (256 + 8 + 1000) * 512, "only the allocated sectors were read");
    assert_eq!(targets[0].allocated_sectors(0..LEN_SECTORS), 256 + 8 + 1000, "the thin target stays thin");
    assert!(targets[1].stats().write_zeroes > 0, "the offloading target got write-zeroes");
    assert_eq!(targets[2].stats().write_zeroes, 0, "the plain target got zeroes as data");
}

#[test]
fn without_sparse_everything_is_read() {
    let source = thin_source();
    let target = disk("target", false, true);
    target.fill_pattern(5);
    assert!(copy(source.clone(), std::slice::from_ref(&target), Sparse::OFF).is_ok());
    assert!(same(&source, &target));
    assert_eq!(source.stats().read_bytes, LEN_SECTORS * 512);
    assert_eq!(target.stats().write_zeroes, 0);
}

#[test]
fn a_device_that_cannot_tell_its_allocation_is_read_whole() {
    // A device in front of the thin source that cannot tell: everything holds data.
    let inner = thin_source();
    let source: Device = Arc::new(Forward::new(inner.clone(), CannotTell));
    let target = disk("target", true, false);
    target.fill_pattern(5);
    assert!(copy(source, std::slice::from_ref(&target), PUNCH).is_ok());
    assert!(same(&inner, &target));
    assert_eq!(inner.stats().read_bytes, LEN_SECTORS * 512);
    // The zero scan still found the holes' zero blocks and deallocated them on the target.
    assert_eq!(target.allocated_sectors(0..LEN_SECTORS), 256 + 8 + 1000);
}

#[test]
fn zero_blocks_in_read_data_are_written_as_zeroes_where_that_is_cheap() {
    // A dense source (all allocated) with zero blocks inside its data.
    let source = disk("source", false, false);
    source.fill_pattern(3);
    source.poke(64, &[0u8; 8 * 512]); // one 4 KiB block of zeroes
    source.poke(4096, &[0u8; 128 * 512]); // sixteen more: 64 KiB, one aligned 64 KiB block
    let scan = Sparse { skip_holes: true, zero_block_bytes: 4096, target_zeroes: TargetZeroes::Write };
    let offload = disk("offload", false, true);
    offload.fill_pattern(9);
    assert!(copy(source.clone(), std::slice::from_ref(&offload), scan).is_ok());
    assert!(same(&source, &offload));
    assert_eq!(offload.stats().write_zeroes, 2, "two runs of zero blocks");
    assert_eq!(offload.stats().written_bytes, LEN_SECTORS * 512);

    // A 64 KiB scan block finds only the 64 KiB run: the lone 4 KiB block is in a block with data.
    let coarse = disk("coarse", false, true);
    let scan = Sparse { zero_block_bytes: 65536, ..scan };
    assert!(copy(source.clone(), std::slice::from_ref(&coarse), scan).is_ok());
    assert!(same(&source, &coarse));
    assert_eq!(coarse.stats().write_zeroes, 1, "only sectors 4096..4224 are one whole zero block");
}

#[test]
fn target_is_zero_writes_nothing_for_zeroes_and_trusts_the_caller() {
    let source = thin_source();
    let fresh = disk("fresh", false, false);
    let skip = Sparse { target_zeroes: TargetZeroes::Skip, ..PUNCH };
    assert!(copy(source.clone(), std::slice::from_ref(&fresh), skip).is_ok());
    assert!(same(&source, &fresh));
    assert_eq!(fresh.stats().written_bytes, (256 + 8 + 1000) * 512, "only the data was written");
    assert_eq!(fresh.stats().write_zeroes, 0);
    // On a target that is not zero, its old data shows through the holes: the caller's word
    // is taken, as documented.
    let stale = disk("stale", false, false);
    stale.fill_pattern(8);
    assert!(copy(source.clone(), std::slice::from_ref(&stale), skip).is_ok());
    assert!(!same(&source, &stale));
    assert_eq!(stale.snapshot(0, 256), source.snapshot(0, 256));
}

#[test]
fn unreadable_allocated_blocks_are_narrowed_and_never_written() {
    let source = Arc::new(MemDisk::new(MemDiskOptions {
        name: "source".into(),
        len_sectors: LEN_SECTORS,
        logical_block_size: 4096,
        sparse: true,
        faults: FaultPlan { latent_sectors: std::iter::once(104..112).collect(), ..FaultPlan::default() },
        ..MemDiskOptions::default()
    }));
    source.fill_pattern_range(0..256, 11, 0);
    let target = disk("target", true, false);
    target.fill_pattern(4);
    let before = target.snapshot(104, 8);
    let targets = vec![Region::new(target.clone() as Device, 0, LEN_SECTORS)];
    let outcome =
        run(Job::copy(Region::new(source.clone(), 0, LEN_SECTORS), targets, Flags::IGNORE_ERROR).sparse(PUNCH));
    assert_eq!(outcome.read_failed, RangeSet::from_range(104..112));
    assert_eq!(outcome.targets[0].not_copied, RangeSet::from_range(104..112));
    assert_eq!(target.snapshot(104, 8), before, "an unreadable block keeps the target's data");
    assert_eq!(target.snapshot(0, 104), source.snapshot(0, 104));
    assert_eq!(target.snapshot(112, LEN_SECTORS - 112), source.snapshot(112, LEN_SECTORS - 112));
}

#[test]
fn write_seq_writes_data_and_holes_in_order() {
    let source = thin_source();
    let target = disk("target", true, false);
    target.fill_pattern(6);
    let targets = vec![Region::new(target.clone() as Device, 0, LEN_SECTORS)];
    let outcome = run(Job::copy(Region::new(source.clone(), 0, LEN_SECTORS), targets, Flags::WRITE_SEQ).sparse(PUNCH));
    assert!(outcome.is_ok());
    assert!(same(&source, &target));
}

#[test]
fn a_bad_zero_scan_block_is_refused_before_any_io() {
    let source = thin_source();
    let target = disk("target", false, false);
    let client = Client::new(ClientConfig::default()).unwrap();
    for bytes in [256, 3000, 4097] {
        let job = Job::copy(
            Region::new(source.clone(), 0, LEN_SECTORS),
            vec![Region::new(target.clone() as Device, 0, LEN_SECTORS)],
            Flags::empty(),
        )
        .sparse(Sparse { zero_block_bytes: bytes, ..PUNCH });
        assert_eq!(client.submit_blocking(job).unwrap_err(), SubmitError::ZeroBlockSize { bytes });
    }
    client.shutdown_blocking();
    assert_eq!(source.stats().reads + target.stats().writes + target.stats().write_zeroes, 0);
}

/// A thin volume's resync in virtual time: `allocated_percent` of a 1 GiB source holds data.
fn resync_time(allocated_percent: u64, sparse: Sparse) -> Duration {
    let len_sectors = 2 * 1024 * 2048;
    // A disk of 10 000 IOPS per direction and 500 MB/s; write-zeroes cost one request.
    let model = IoModel { cost_us: 100, bandwidth_bytes_per_s: 500_000_000, queue_depth: 32, jitter_us: 0 };
    let thin = |name: &str| MemDiskOptions {
        name: name.into(),
        len_sectors,
        sparse: true,
        latency: Latency { read: model, write: model, seed: 1, ..Latency::default() },
        ..MemDiskOptions::default()
    };
    Simulation::run(ClientConfig::default(), |client, _| async move {
        let source = Arc::new(MemDisk::new(thin("source")));
        // Allocated in 4 MiB runs spread over the volume.
        let run_sectors = 8192;
        let stride = run_sectors * 100 / allocated_percent;
        for start in (0..len_sectors).step_by(stride as usize) {
            source.fill_pattern_range(start..(start + run_sectors).min(len_sectors), 21, 0);
        }
        let target = Arc::new(MemDisk::new(thin("target")));
        let began = tokio::time::Instant::now();
        let job = Job::copy(
            Region::new(source.clone(), 0, len_sectors),
            vec![Region::new(target.clone() as Device, 0, len_sectors)],
            Flags::empty(),
        )
        .sparse(sparse);
        assert!(client.submit(job).await.unwrap().await.is_ok());
        let took = to_model(began.elapsed());
        assert_eq!(target.provenance(0..len_sectors), source.provenance(0..len_sectors));
        took
    })
    .unwrap()
}

#[test]
fn resyncing_a_ten_percent_full_thin_volume_takes_about_a_tenth_of_a_full_copy() {
    let full = resync_time(10, Sparse::OFF);
    let sparse = resync_time(10, PUNCH);
    let ratio = sparse.as_secs_f64() / full.as_secs_f64();
    println!("1 GiB thin volume, 10 % allocated: full copy {full:?}, sparse {sparse:?} ({ratio:.3})");
    assert!((0.08..=0.15).contains(&ratio), "sparse / full = {ratio:.3}");
}
