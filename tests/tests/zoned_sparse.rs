//! Copies to zoned simulated targets, whose writes may not cross a zone's end (the simulator
//! refuses them, as the kernel does): any sub-job size, any zone size, any allocation of a
//! sparse source, write-zeroes offloaded or not. The engine learns the zone size from the
//! target's geometry and cuts every sub-job (data or hole) at the targets' zone boundaries.

use std::sync::Arc;

use kcopyd_core::{BlockDevice, Client, ClientConfig, Device, Flags, Job, Region, Sparse, SubmitError, TargetZeroes};
use kcopyd_sim::{MemDisk, MemDiskOptions};
use proptest::prelude::*;

fn zoned(name: &str, len_sectors: u64, zone_sectors: u64, block: u32, write_zeroes: bool) -> Arc<MemDisk> {
    Arc::new(MemDisk::new(MemDiskOptions {
        name: name.into(),
        len_sectors,
        logical_block_size: block,
        zoned: true,
        zone_sectors,
        write_zeroes,
        ..MemDiskOptions::default()
    }))
}

#[derive(Debug, Clone)]
struct ZonedCase {
    /// Zone length, in target blocks.
    zone_blocks: u64,
    /// 512 or 4096-byte blocks on every disk.
    block: u32,
    subjob_blocks: u64,
    /// Source runs holding data (in blocks: start, length); the rest is holes.
    allocated: Vec<(u64, u64)>,
    skip_holes: bool,
    zero_block: bool,
    target_zeroes: TargetZeroes,
    write_zeroes: bool,
    /// Where the job starts on the source, and in which zone of the target (in blocks).
    source_start_blocks: u64,
    target_zone: u64,
    len_blocks: u64,
}

fn arb_case() -> impl Strategy<Value = ZonedCase> {
    (
        (1u64..40, prop_oneof![Just(512u32), Just(4096u32)], 1u64..48),
        proptest::collection::vec((0u64..300, 1u64..60), 0..6),
        (
            any::<bool>(),
            any::<bool>(),
            prop_oneof![Just(TargetZeroes::Write), Just(TargetZeroes::Deallocate), Just(TargetZeroes::Skip)],
            any::<bool>(),
        ),
        (0u64..50, 0u64..3, 1u64..300),
    )
        .prop_map(
            |(
                (zone_blocks, block, subjob_blocks),
                allocated,
                (skip_holes, zero_block, target_zeroes, write_zeroes),
                (source_start_blocks, target_zone, len_blocks),
            )| ZonedCase {
                zone_blocks,
                block,
                subjob_blocks,
                allocated,
                skip_holes,
                zero_block,
                target_zeroes,
                write_zeroes,
                source_start_blocks,
                target_zone,
                len_blocks,
            },
        )
}

fn check(case: &ZonedCase) -> Result<(), TestCaseError> {
    let block_sectors = u64::from(case.block) / 512;
    let sectors = |blocks: u64| blocks * block_sectors;
    let (len, zone) = (sectors(case.len_blocks), sectors(case.zone_blocks));
    let source_start = sectors(case.source_start_blocks);
    let source = Arc::new(MemDisk::new(MemDiskOptions {
        name: "source".into(),
        len_sectors: source_start + len,
        logical_block_size: case.block,
        sparse: true,
        ..MemDiskOptions::default()
    }));
    for &(at, run) in &case.allocated {
        let at = sectors(at).min(len - block_sectors);
        source.fill_pattern_range(source_start + at..source_start + (at + sectors(run)).min(len), 5, 0);
    }
    let target_start = case.target_zone * zone;
    let target_len = (target_start + len).div_ceil(zone) * zone;
    let target = zoned("target", target_len, zone, case.block, case.write_zeroes);
    let sparse = Sparse {
        skip_holes: case.skip_holes,
        zero_block_bytes: if case.zero_block { case.block } else { 0 },
        target_zeroes: case.target_zeroes,
    };
    let config = ClientConfig {
        page_budget: 64,
        subjob_size_bytes: (case.subjob_blocks * u64::from(case.block)).min(64 * 4096) as usize,
        ..ClientConfig::default()
    };
    let client = Client::new(config).unwrap();
    let job = Job::copy(
        Region::new(source.clone(), source_start, len),
        vec![Region::new(target.clone() as Device, target_start, len)],
        Flags::empty(),
    )
    .sparse(sparse);
    let outcome = client.submit_blocking(job).unwrap().wait();
    client.shutdown_blocking();
    prop_assert!(outcome.is_ok(), "{outcome:?}; faults: {:?}", target.fault_log());
    prop_assert!(target.fault_log().is_empty(), "{:?}", target.fault_log());
    prop_assert!(source.snapshot(source_start, len) == target.snapshot(target_start, len));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn zoned_copies_work_with_any_subjob_size_and_allocation(case in arb_case()) {
        check(&case)?;
    }
}

#[test]
fn a_hole_from_an_allocation_boundary_stops_at_the_zone_end() {
    // Zones of 64 sectors; data at 0..40 then a hole to the end: the hole sub-job that starts
    // at 40 used to run to 1 GiB's worth (the whole rest), across every zone end.
    let case = ZonedCase {
        zone_blocks: 64,
        block: 512,
        subjob_blocks: 16,
        allocated: vec![(0, 40)],
        skip_holes: true,
        zero_block: false,
        target_zeroes: TargetZeroes::Write,
        write_zeroes: true,
        source_start_blocks: 0,
        target_zone: 1,
        len_blocks: 256,
    };
    check(&case).unwrap();
}

#[test]
fn the_zone_size_is_part_of_the_geometry() {
    let target = zoned("target", 256, 64, 512, false);
    assert_eq!(target.geometry().zone_sectors, 64);
    assert!(target.geometry().zoned);
    let one_zone = zoned("one", 256, 0, 512, false);
    assert_eq!(one_zone.geometry().zone_sectors, 256, "0 means one zone for the whole disk");
}

#[test]
fn a_zone_that_is_not_whole_blocks_of_the_job_is_refused_before_any_io() {
    // 4 KiB blocks on the source, 512-byte zones of 12 sectors on the target: a zone boundary
    // would cut a 4 KiB block of the job.
    let source = Arc::new(MemDisk::zeroed("source", 64, 4096));
    let target = zoned("target", 96, 12, 512, false);
    let client = Client::new(ClientConfig::default()).unwrap();
    let job = Job::copy(Region::new(source, 0, 48), vec![Region::new(target.clone(), 0, 48)], Flags::empty());
    let error = client.submit_blocking(job).unwrap_err();
    assert!(
        matches!(&error, SubmitError::ZoneMisaligned { target: 0, zone_sectors: 12, block_sectors: 8, .. }),
        "{error:?}"
    );
    assert_eq!(target.stats().writes, 0);
    client.shutdown_blocking();
}

#[test]
fn an_offloaded_zero_of_several_zones_sends_one_request_per_zone() {
    for write_zeroes in [true, false] {
        let target = zoned("target", 512, 64, 512, write_zeroes);
        let client = Client::new(ClientConfig::default()).unwrap();
        // Zones 1 to 3 and half of zone 4.
        let outcome = client
            .submit_blocking(Job::zero(vec![Region::new(target.clone(), 64, 224)], Flags::empty()))
            .unwrap()
            .wait();
        client.shutdown_blocking();
        assert!(outcome.is_ok(), "offload {write_zeroes}: {outcome:?}; faults {:?}", target.fault_log());
        assert_eq!(target.write_pointer(64 * 4), Some(64 * 4 + 32), "offload {write_zeroes}");
        if write_zeroes {
            assert_eq!(target.stats().write_zeroes, 4, "one request per zone");
        }
    }
}

#[test]
fn skipping_zeroes_on_a_zoned_target_writes_them_all_the_same() {
    let case = ZonedCase {
        zone_blocks: 64,
        block: 512,
        subjob_blocks: 16,
        allocated: vec![(0, 40), (100, 8)],
        skip_holes: true,
        zero_block: true,
        target_zeroes: TargetZeroes::Skip,
        write_zeroes: false,
        source_start_blocks: 0,
        target_zone: 0,
        len_blocks: 256,
    };
    check(&case).unwrap();
}

#[test]
fn a_plain_copy_with_subjobs_larger_than_a_zone_is_cut_per_zone() {
    // The smallest case the property found before sub-jobs were cut: one-block zones,
    // two-block sub-jobs, no sparseness at all.
    let case = ZonedCase {
        zone_blocks: 1,
        block: 512,
        subjob_blocks: 2,
        allocated: vec![],
        skip_holes: false,
        zero_block: false,
        target_zeroes: TargetZeroes::Write,
        write_zeroes: false,
        source_start_blocks: 0,
        target_zone: 0,
        len_blocks: 2,
    };
    check(&case).unwrap();
}
