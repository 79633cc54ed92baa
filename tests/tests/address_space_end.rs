//! Jobs at the very end of the address space: simulated disks of `u64::MAX` sectors (sparse, so
//! they cost nothing), regions ending at sector `u64::MAX`. Copies, sparse copies and zeroes
//! (offloaded or written) must complete, move the right data and count the right bytes: no
//! sector-to-byte product or sector sum may overflow on the way.

use std::sync::Arc;

use kcopyd_core::{Client, ClientConfig, Device, Flags, Job, Outcome, Region, Sparse, TargetZeroes, sectors_to_bytes};
use kcopyd_sim::{MemDisk, MemDiskOptions};
use proptest::prelude::*;

/// The largest disk there can be.
const END: u64 = u64::MAX;

/// A sparse disk of `u64::MAX` sectors (512-byte blocks: `u64::MAX` is odd).
fn huge(name: &str, write_zeroes: bool) -> Arc<MemDisk> {
    Arc::new(MemDisk::new(MemDiskOptions {
        name: name.into(),
        len_sectors: END,
        sparse: true,
        write_zeroes,
        ..MemDiskOptions::default()
    }))
}

fn run(config: ClientConfig, job: Job) -> (Outcome, kcopyd_core::ClientStats) {
    let client = Client::new(config).unwrap();
    let outcome = client.submit_blocking(job).unwrap().wait();
    let stats = client.stats();
    let report = client.shutdown_blocking();
    assert_eq!(report.pool.pages_in_use, 0);
    (outcome, stats)
}

fn config(subjob_sectors: u64) -> ClientConfig {
    ClientConfig { page_budget: 64, subjob_size_bytes: subjob_sectors as usize * 512, ..ClientConfig::default() }
}

#[test]
fn an_offloaded_zero_of_the_whole_address_space_counts_its_bytes() {
    let target = huge("target", true);
    target.fill_pattern_range(END - 100..END, 7, 1);
    target.fill_pattern_range(0..100, 7, 1);
    let (outcome, stats) = run(config(8), Job::zero(vec![Region::new(target.clone(), 0, END)], Flags::empty()));
    assert!(outcome.is_ok(), "{outcome:?}");
    assert_eq!(target.allocated_sectors(0..END), 0, "every sector reads as zeroes");
    let zeroes = &stats.devices[0].write_zeroes;
    assert_eq!((zeroes.count, zeroes.bytes), (1, u128::from(END) * 512));
    assert_eq!(target.stats().written_bytes, u64::MAX, "the disk's own count saturates");
}

/// What a case does at the end of the address space.
#[derive(Debug, Clone)]
enum Case {
    /// A plain copy.
    Copy,
    /// A sparse copy: the source holds data only in these job-relative ranges.
    Sparse { allocated: Vec<(u64, u64)>, target_zeroes: TargetZeroes, offload: bool },
    /// A zero job, offloaded or written.
    Zero { offload: bool },
}

fn arb_case() -> impl Strategy<Value = Case> {
    let zeroes = prop_oneof![Just(TargetZeroes::Write), Just(TargetZeroes::Deallocate), Just(TargetZeroes::Skip)];
    prop_oneof![
        Just(Case::Copy),
        (proptest::collection::vec((0u64..600, 1u64..80), 0..5), zeroes, any::<bool>())
            .prop_map(|(allocated, target_zeroes, offload)| Case::Sparse { allocated, target_zeroes, offload }),
        any::<bool>().prop_map(|offload| Case::Zero { offload }),
    ]
}

/// Runs `case` on a region of `len` sectors ending `gap` sectors before `u64::MAX`.
fn check_case(case: &Case, len: u64, gap: u64, subjob_sectors: u64) -> Result<(), TestCaseError> {
    let start = END - gap - len;
    let source = huge("source", false);
    let offload = matches!(case, Case::Sparse { offload: true, .. } | Case::Zero { offload: true });
    let target = huge("target", offload);
    // Stale data all around and inside the target region, which nothing may leave behind.
    target.fill_pattern_range(start.saturating_sub(16)..END, 9, 3);
    let target_region = Region::new(target.clone() as Device, start, len);
    let job = match case {
        Case::Copy => {
            source.fill_pattern_range(start..start + len, 5, 0);
            Job::copy(Region::new(source.clone(), start, len), vec![target_region], Flags::empty())
        }
        Case::Sparse { allocated, target_zeroes, .. } => {
            for &(at, run) in allocated {
                let at = at.min(len - 1);
                source.fill_pattern_range(start + at..start + (at + run).min(len), 5, 0);
            }
            let sparse = Sparse { skip_holes: true, zero_block_bytes: 512, target_zeroes: *target_zeroes };
            Job::copy(Region::new(source.clone(), start, len), vec![target_region], Flags::empty()).sparse(sparse)
        }
        Case::Zero { .. } => Job::zero(vec![target_region], Flags::empty()),
    };
    let (outcome, stats) = run(config(subjob_sectors), job);
    prop_assert!(outcome.is_ok(), "{outcome:?}");
    let skipped = matches!(case, Case::Sparse { target_zeroes: TargetZeroes::Skip, .. });
    if !skipped {
        prop_assert!(source.snapshot(start, len) == target.snapshot(start, len), "the target region is the source's");
    }
    // Outside the region nothing changed.
    let stale = MemDisk::new(MemDiskOptions {
        name: "stale".into(),
        len_sectors: END,
        sparse: true,
        ..MemDiskOptions::default()
    });
    stale.fill_pattern_range(start.saturating_sub(16)..END, 9, 3);
    prop_assert!(stale.snapshot(start - 16, 16) == target.snapshot(start - 16, 16));
    prop_assert!(stale.snapshot(start + len, gap) == target.snapshot(start + len, gap));
    // Every byte the engine moved or zeroed is counted once.
    let target_stats =
        stats.devices.iter().find(|d| d.name == "target").map_or(0, |d| d.write.bytes + d.write_zeroes.bytes);
    if !skipped {
        prop_assert_eq!(target_stats, sectors_to_bytes(len));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn jobs_ending_at_the_last_sector_complete_and_count_right(
        case in arb_case(),
        len in 1u64..700,
        gap in prop_oneof![Just(0u64), 0u64..40],
        subjob_sectors in prop_oneof![Just(8u64), 1u64..64],
    ) {
        check_case(&case, len, gap, subjob_sectors)?;
    }
}
