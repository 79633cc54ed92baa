//! Headers-only disks (`MemDiskOptions::headers_only`): the engine's path is the same, only
//! the simulated disks fill and check less of each sector. These tests hold the fast mode to
//! what the whole-sector mode catches: a misdirected or skipped write leaves exactly the same
//! wrong sectors in both, found by provenance; and the mode changes no timing.

use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kcopyd_core::{BlockDevice, ClientConfig, Device, Flags, Forward, Hooks, IoFuture, Job, Region, WriteBuf};
use kcopyd_sim::{FaultKind, FaultPlan, IoModel, Latency, MemDisk, MemDiskOptions, Misdirect, Provenance, Simulation};

/// The source's pattern seed.
const SOURCE_SEED: u64 = 11;
/// 8 MiB disks.
const LEN_SECTORS: u64 = 16 * 1024;

fn disk(name: &str, headers_only: bool, faults: FaultPlan) -> Arc<MemDisk> {
    let model = IoModel { cost_us: 30, bandwidth_bytes_per_s: 1_000_000_000, queue_depth: 4, jitter_us: 7 };
    Arc::new(MemDisk::new(MemDiskOptions {
        name: name.into(),
        seed: 3,
        len_sectors: LEN_SECTORS,
        sparse: true,
        headers_only,
        latency: Latency { read: model, write: model, seed: 5, ..Latency::default() },
        faults,
        ..MemDiskOptions::default()
    }))
}

/// 64 KiB sub-jobs, 4 in flight: 128 reads and 128 writes, several at once.
fn config() -> ClientConfig {
    ClientConfig { page_budget: 64, subjob_size_bytes: 64 << 10, subjobs_in_flight: 4, ..ClientConfig::default() }
}

/// Copies the whole source onto `target` (through `target_device`, which may wrap it).
fn copy(source: Arc<MemDisk>, target_device: Device) -> bool {
    Simulation::run(config(), |client, _| async move {
        let job = Job::copy(
            Region::new(source, 0, LEN_SECTORS),
            vec![Region::new(target_device, 0, LEN_SECTORS)],
            Flags::empty(),
        );
        client.submit(job).await.unwrap().await.is_ok()
    })
    .unwrap()
}

/// The target sectors that do not hold the source sector of the same number.
fn wrong_sectors(target: &MemDisk) -> Vec<Range<u64>> {
    let mut wrong: Vec<Range<u64>> = Vec::new();
    for (range, provenance) in target.provenance(0..LEN_SECTORS) {
        let right = matches!(provenance, Provenance::Pattern { seed: SOURCE_SEED, generation: 0, sector }
            if sector == range.start);
        if right {
            continue;
        }
        match wrong.last_mut() {
            Some(last) if last.end == range.start => last.end = range.end,
            _ => wrong.push(range),
        }
    }
    wrong
}

#[test]
fn a_headers_only_copy_verifies_and_snapshots_whole_sectors() {
    let source = disk("source", true, FaultPlan::default());
    source.fill_pattern(SOURCE_SEED);
    let target = disk("target", true, FaultPlan::default());
    assert!(copy(source.clone(), target.clone()));
    assert_eq!(wrong_sectors(&target), vec![]);
    assert_eq!(target.extents(), 1);
    // Snapshots are whole sectors, as a whole-sector disk holds them.
    let whole = disk("whole", false, FaultPlan::default());
    whole.fill_pattern(SOURCE_SEED);
    assert!(target.snapshot(100, 300) == whole.snapshot(100, 300));
}

#[test]
fn a_misdirected_write_is_caught_as_in_whole_sector_mode() {
    let mut found = Vec::new();
    for headers_only in [false, true] {
        let source = disk("source", headers_only, FaultPlan::default());
        source.fill_pattern(SOURCE_SEED);
        let astray =
            FaultPlan { misdirects: vec![Misdirect { write_index: 37, shift_sectors: 40 }], ..FaultPlan::default() };
        let target = disk("target", headers_only, astray);
        assert!(copy(source, target.clone()), "a misdirected write reports success");
        let log = target.fault_log();
        let [record] = &log[..] else { panic!("one fault fired: {log:?}") };
        let FaultKind::Misdirected { landed } = record.kind.clone() else { panic!("{record:?}") };
        let aimed = record.sectors.clone();
        let wrong = wrong_sectors(&target);
        // Nothing else writes where the write was aimed: all of it is wrong (zeroes, then
        // source sectors 40 too early); past it, the stray sectors may have been overwritten.
        assert_eq!(wrong.first().map(|r| r.start), Some(aimed.start), "headers_only {headers_only}: {wrong:?}");
        assert!(wrong[0].end >= aimed.end && wrong[0].end <= landed.end, "headers_only {headers_only}: {wrong:?}");
        assert_eq!(wrong.len(), 1, "headers_only {headers_only}: {wrong:?}");
        found.push((aimed, landed, wrong));
    }
    assert_eq!(found[0], found[1], "both modes find the same wrong sectors");
}

/// The hooks of a device that reports success for its `skip`-th write without passing it on:
/// a lost write that no fault log records.
#[derive(Debug)]
struct SkipOneWrite {
    skip: u64,
    writes: AtomicU64,
    skipped: Mutex<Option<Range<u64>>>,
}

impl Hooks for SkipOneWrite {
    fn write<'a>(
        &'a self,
        inner: &'a dyn BlockDevice,
        offset_sectors: u64,
        buf: WriteBuf,
    ) -> IoFuture<'a, io::Result<()>> {
        if self.writes.fetch_add(1, Ordering::Relaxed) == self.skip {
            let len_sectors = buf.len() as u64 / 512;
            *self.skipped.lock().unwrap() = Some(offset_sectors..offset_sectors + len_sectors);
            return Box::pin(async { Ok(()) });
        }
        inner.write(offset_sectors, buf)
    }
}

#[test]
fn a_skipped_write_is_caught_as_in_whole_sector_mode() {
    let mut found = Vec::new();
    for headers_only in [false, true] {
        let source = disk("source", headers_only, FaultPlan::default());
        source.fill_pattern(SOURCE_SEED);
        let target = disk("target", headers_only, FaultPlan::default());
        // The target holds generation 1 of its own pattern: a skipped write leaves it stale.
        target.fill_pattern_range(0..LEN_SECTORS, 99, 1);
        let hooks = SkipOneWrite { skip: 100, writes: AtomicU64::new(0), skipped: Mutex::new(None) };
        let skipping = Arc::new(Forward::new(target.clone(), hooks));
        assert!(copy(source, skipping.clone()));
        let skipped = skipping.hooks().skipped.lock().unwrap().clone().expect("the write was skipped");
        assert_eq!(wrong_sectors(&target), vec![skipped.clone()], "headers_only {headers_only}");
        assert_eq!(
            target.provenance(skipped.clone()),
            vec![(skipped.clone(), Provenance::Pattern { seed: 99, generation: 1, sector: skipped.start })],
            "headers_only {headers_only}: the old content"
        );
        found.push(skipped);
    }
    assert_eq!(found[0], found[1]);
}

#[test]
fn headers_only_changes_no_timing() {
    let mut runs = Vec::new();
    for headers_only in [false, true] {
        let source = disk("source", headers_only, FaultPlan::default());
        source.fill_pattern(SOURCE_SEED);
        let target = disk("target", headers_only, FaultPlan::default());
        let (ok, events) = Simulation::run(config(), |client, trace| async move {
            source.set_trace(trace.clone());
            target.set_trace(trace.clone());
            let job = Job::copy(
                Region::new(source, 0, LEN_SECTORS),
                vec![Region::new(target as Device, 0, LEN_SECTORS)],
                Flags::empty(),
            );
            let ok = client.submit(job).await.unwrap().await.is_ok();
            (ok, trace.events())
        })
        .unwrap();
        assert!(ok);
        assert_eq!(events.len(), 2 * 128, "every read and write is traced");
        runs.push(events);
    }
    assert!(runs[0] == runs[1], "the same requests at the same virtual times");
}
