//! `Client::verify` on simulated disks: differences and unreadable blocks per target, exact
//! ranges, large blocks, headers-only disks, skipped ranges, progress, cancellation, the page
//! budget held and the throttle obeyed.

use std::sync::Arc;

use kcopyd_core::{Client, ClientConfig, Comparison, RangeSet, Region, Throttle, Verify, VerifyError};
use kcopyd_sim::{MemDisk, Simulation};

fn region(disk: &Arc<MemDisk>, len_sectors: u64) -> Region {
    Region::new(disk.clone(), 0, len_sectors)
}

/// Verifies `verify` on a client of `config` (on its own worker); returns what it found and
/// the pool's high-water mark.
fn verify_with(config: ClientConfig, verify: Verify) -> (Comparison, usize) {
    let client = Client::new(config).unwrap();
    let handle = client.verify(verify).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let found = runtime.block_on(handle.wait()).unwrap();
    let pages_max = client.pool_stats().pages_in_use_max;
    assert_eq!(client.pool_stats().pages_in_use, 0, "every page came back");
    client.shutdown_blocking();
    (found, pages_max)
}

fn budget(page_budget: usize) -> ClientConfig {
    ClientConfig { page_budget, ..ClientConfig::default() }
}

#[test]
fn a_difference_and_a_read_error_on_one_target_are_found_within_a_two_page_budget() {
    let source = Arc::new(MemDisk::with_pattern("source", 1024, 512, 1));
    let targets: Vec<Arc<MemDisk>> =
        (0..5).map(|i| Arc::new(MemDisk::with_pattern(&format!("t{i}"), 1024, 512, 1))).collect();
    targets[3].poke(700, &[9; 512]);
    targets[4].fail_reads(10..11);
    source.fail_reads(20..21);
    // Six devices in two pages: one 4 KiB chunk of two devices at a time.
    let verify = Verify::new(region(&source, 1024), targets.iter().map(|t| region(t, 1024)).collect());
    let (found, pages_max) = verify_with(budget(2), verify);
    assert!((1..=2).contains(&pages_max), "{pages_max} pages of the client's own pool in use at once, budget 2");
    assert_eq!(found.source_unreadable, RangeSet::from_range(20..21));
    for (index, diff) in found.targets.iter().enumerate() {
        match index {
            3 => assert_eq!((diff.differing_blocks, &diff.differing), (1, &RangeSet::from_range(700..701))),
            4 => assert_eq!((diff.differing_blocks, diff.unreadable.clone()), (0, RangeSet::from_range(10..11))),
            _ => assert!(diff.identical(), "target {index}: {diff:?}"),
        }
    }
}

#[test]
fn differing_blocks_are_exact_and_skipped_ranges_left_out() {
    let source = Arc::new(MemDisk::with_pattern("source", 4096, 512, 1));
    let same = Arc::new(MemDisk::with_pattern("same", 4096, 512, 1));
    let changed = Arc::new(MemDisk::with_pattern("changed", 4096, 512, 1));
    changed.poke(1000, &[0; 512]);
    changed.poke(1001, &[1; 1024]); // sectors 1000..1003: three blocks
    changed.poke(4095, &[7; 512]);
    source.fail_reads(2000..2001);
    let config = ClientConfig { page_budget: 256, subjob_size_bytes: 64 * 1024, subjobs_in_flight: 2, ..budget(256) };
    let targets = || vec![region(&same, 4096), region(&changed, 4096)];
    let (found, _) = verify_with(config.clone(), Verify::new(region(&source, 4096), targets()));
    assert_eq!(found.source_unreadable, RangeSet::from_range(2000..2001));
    assert!(found.targets[0].identical());
    assert_eq!(found.targets[1].differing_blocks, 4);
    assert_eq!(found.targets[1].first_differing_sector(), Some(1000));
    assert_eq!(found.targets[1].differing.ranges(), &[1000..1003, 4095..4096]);
    assert!(!found.identical());
    // Left out by a copy's report: no difference counted there.
    let skip = vec![RangeSet::new(), RangeSet::from_range(0..2048)];
    let (found, _) = verify_with(config, Verify::new(region(&source, 4096), targets()).skip(skip));
    assert_eq!(found.targets[1].differing, RangeSet::from_range(4095..4096));
}

#[test]
fn large_blocks_count_once() {
    let source = Arc::new(MemDisk::with_pattern("source", 256, 4096, 1));
    let target = Arc::new(MemDisk::with_pattern("target", 256, 4096, 1));
    target.poke(8, &[0; 4096]); // one whole 4 KiB block
    target.poke(23, &[0; 512]); // the last sector of the next block
    let config = ClientConfig { subjob_size_bytes: 32 * 1024, subjobs_in_flight: 1, ..budget(64) };
    let (found, _) = verify_with(config, Verify::new(region(&source, 256), vec![region(&target, 256)]));
    assert_eq!(found.block_bytes, 4096);
    assert_eq!(found.targets[0].differing_blocks, 2);
    assert_eq!(found.targets[0].differing, RangeSet::from_range(8..24));
}

#[test]
fn headers_only_sides_compare_headers_not_what_earlier_chunks_left() {
    // Sector 0 differs (a difference); every other sector is the same pattern, of which a
    // headers-only disk fills only the header. The second chunk reads into pages that held
    // the first one's data.
    let disk = |name: &str, data: u8| {
        let disk = MemDisk::new(kcopyd_sim::MemDiskOptions {
            name: name.into(),
            len_sectors: 16,
            sparse: true,
            headers_only: true,
            ..kcopyd_sim::MemDiskOptions::default()
        });
        disk.fill_pattern(5);
        disk.poke(0, &[data; 4096]);
        Arc::new(disk)
    };
    let (source, target) = (disk("source", 1), disk("target", 2));
    for zero_before_read in [false, true] {
        let verify = Verify::new(region(&source, 16), vec![region(&target, 16)]).zero_before_read(zero_before_read);
        let (found, _) = verify_with(budget(2), verify);
        let only_the_data_differs = found.targets[0].differing == RangeSet::from_range(0..8);
        assert_eq!(only_the_data_differs, zero_before_read, "{found:?}");
    }
}

#[test]
fn bad_requests_are_refused_before_any_read() {
    let client = Client::new(budget(1)).unwrap();
    let small = Arc::new(MemDisk::zeroed("small", 64, 512));
    let large = Arc::new(MemDisk::zeroed("large", 64, 8192));
    let refused = client.verify(Verify::new(region(&small, 64), vec![region(&large, 64)])).unwrap_err();
    assert_eq!(refused, VerifyError::BlockLargerThanBudget { block_bytes: 8192, budget_bytes: 4096 });
    let shorter = client.verify(Verify::new(region(&small, 64), vec![region(&small, 32)])).unwrap_err();
    assert!(matches!(shorter, VerifyError::TargetShape { index: 0, .. }), "{shorter:?}");
    let none = client.verify(Verify::new(region(&small, 64), Vec::new())).unwrap_err();
    assert_eq!(none, VerifyError::TargetCount { count: 0 });
    client.shutdown_blocking();
    let closed = client.verify(Verify::new(region(&small, 64), vec![region(&small, 64)])).unwrap_err();
    assert_eq!(closed, VerifyError::ShutDown);
}

#[test]
fn the_throttle_paces_a_verify_and_a_cancel_stops_it_with_what_it_found() {
    const LEN_SECTORS: u64 = 8 * 2048; // 8 MiB
    let source = Arc::new(MemDisk::with_pattern("source", LEN_SECTORS, 512, 1));
    let target = Arc::new(MemDisk::with_pattern("target", LEN_SECTORS, 512, 1));
    target.poke(0, &[0; 512]);
    let throttle = Throttle { busy_percent: None, rate_bytes_per_s: Some(8 << 20) };
    let config = ClientConfig { throttle, ..ClientConfig::default() };
    let (seconds, found, cancelled) = Simulation::run(config, |client, _| async move {
        let started = tokio::time::Instant::now();
        let verify = || Verify::new(region(&source, LEN_SECTORS), vec![region(&target, LEN_SECTORS)]);
        let found = client.verify(verify()).unwrap().wait().await.unwrap();
        let seconds = kcopyd_core::to_model(started.elapsed()).as_secs_f64();
        let handle = client.verify(verify()).unwrap();
        handle.control().cancel();
        let control = handle.control();
        let cancelled = handle.wait().await.unwrap();
        assert_eq!(control.compared_bytes(), 0, "cancelled before its first chunk");
        (seconds, found, cancelled)
    })
    .unwrap();
    // 16 MiB read (two devices) at 8 MiB/s, less the throttle's burst.
    assert!(seconds > 1.0, "{seconds} s of model time");
    assert_eq!(found.targets[0].differing, RangeSet::from_range(0..1));
    assert!(cancelled.targets[0].differing.is_empty(), "nothing compared: nothing found");
}
