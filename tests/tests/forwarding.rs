//! The test wrappers of this workspace (`Watched`, `HookedDisk`) are [`Forward`] devices: in
//! front of a sparse simulated disk they answer allocation queries, deallocation and identity as
//! the disk itself does, so that a sparse copy through them is what a real sparse source gives.
//! (kcopyd-core's own tests check that `Forward` passes on every method of the trait.)

use std::sync::Arc;

use kcopyd_core::{
    BlockDevice, Client, ClientConfig, Device, Flags, Forward, Job, RangeSet, Region, Sparse, TargetZeroes,
};
use kcopyd_sim::{MemDisk, MemDiskOptions, Simulation};
use kcopyd_tests::io_log::{DiskRef, IoKind, IoLog, Watched};
use kcopyd_tests::util::HookedDisk;

const LEN_SECTORS: u64 = 4096;

fn thin(name: &str) -> Arc<MemDisk> {
    let disk = Arc::new(MemDisk::new(MemDiskOptions {
        name: name.into(),
        len_sectors: LEN_SECTORS,
        sparse: true,
        ..MemDiskOptions::default()
    }));
    disk.fill_pattern_range(1000..1016, 4, 0);
    disk
}

/// What a device says about its sparseness and identity.
async fn sparseness(device: &dyn BlockDevice) -> (RangeSet, bool, kcopyd_core::DeviceId, kcopyd_core::Geometry) {
    (device.allocated(0, LEN_SECTORS).await.unwrap(), device.deallocates(), device.id(), device.geometry())
}

#[test]
fn wrappers_answer_as_the_disk_they_wrap() {
    Simulation::block_on(async {
        let disk = thin("thin");
        let expected = sparseness(&*disk).await;
        assert_eq!(expected.0, RangeSet::from_range(1000..1016));
        let watched: Forward<Watched> = Watched::new(disk.clone(), DiskRef::Source(0), IoLog::new());
        assert_eq!(sparseness(&watched).await, expected, "Watched");
        let hooked = HookedDisk::new(disk.clone()).device();
        assert_eq!(sparseness(&*hooked).await, expected, "HookedDisk");
    });
}

#[test]
fn a_sparse_copy_through_watched_disks_reads_only_the_allocated_run() {
    let log = IoLog::new();
    let (source, target) = (thin("source"), thin("target"));
    target.fill_pattern_range(0..LEN_SECTORS, 9, 1);
    let watched = |disk: &Arc<MemDisk>, which| Arc::new(Watched::new(disk.clone(), which, log.clone())) as Device;
    let job = Job::copy(
        Region::new(watched(&source, DiskRef::Source(0)), 0, LEN_SECTORS),
        vec![Region::new(watched(&target, DiskRef::Target(0)), 0, LEN_SECTORS)],
        Flags::empty(),
    )
    .sparse(Sparse { skip_holes: true, zero_block_bytes: 0, target_zeroes: TargetZeroes::Deallocate });
    let client = Client::new(ClientConfig::default()).unwrap();
    assert!(client.submit_blocking(job).unwrap().wait().is_ok());
    client.shutdown_blocking();
    let reads: Vec<_> = log.records().into_iter().filter(|r| r.kind == IoKind::Read).map(|r| r.sectors).collect();
    assert_eq!(reads, vec![1000..1016], "only the allocated run is read");
    assert_eq!(target.allocated_sectors(0..LEN_SECTORS), 16, "the holes were deallocated on the target");
    assert!(source.snapshot(0, LEN_SECTORS) == target.snapshot(0, LEN_SECTORS));
}
