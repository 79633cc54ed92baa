//! The engine's narrowing re-read, [`kcopyd_core::read_narrowed`], through the public API: the
//! reads it issues, what it finds unreadable, and that the rest of the buffer holds the data.

use std::sync::Arc;

use kcopyd_core::{Device, RangeSet, ReadBuf, read_narrowed};
use kcopyd_sim::MemDisk;

fn run<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(future)
}

#[test]
fn bisects_a_failed_read_down_to_the_block_and_keeps_the_rest() {
    // 2 KiB blocks: 4 sectors. Sector 109 unreadable, in the block 108..112.
    let disk = Arc::new(MemDisk::with_pattern("source", 256, 2048, 3));
    disk.fail_reads(109..110);
    let device: Device = disk.clone();
    let before = disk.stats().reads;
    let (buf, unreadable) = run(read_narrowed(&device, 100..116, 4, ReadBuf::with_capacity(16 * 512)));
    assert_eq!(unreadable, RangeSet::from_range(108..112));
    // 100..116 (fails), 100..108, 108..116 (fails), 108..112 (fails), 112..116.
    assert_eq!(disk.stats().reads - before, 5);
    assert_eq!(buf.len(), 16 * 512, "the window is whole again");
    let data = buf.to_vec();
    assert_eq!(&data[..8 * 512], &disk.snapshot(100, 8)[..]);
    assert_eq!(&data[12 * 512..], &disk.snapshot(112, 4)[..]);
}

#[test]
fn a_clean_range_is_read_once() {
    let disk = Arc::new(MemDisk::with_pattern("source", 64, 512, 4));
    let device: Device = disk.clone();
    let (buf, unreadable) = run(read_narrowed(&device, 8..40, 1, ReadBuf::with_capacity(32 * 512)));
    assert!(unreadable.is_empty());
    assert_eq!(disk.stats().reads, 1);
    assert_eq!(buf.to_vec(), disk.snapshot(8, 32));
}

#[test]
fn a_partial_last_block_stays_with_the_piece_before_it() {
    // 10 sectors in blocks of 4: 0..4 reads, 4..10 (one block and a half) is the last piece.
    let disk = Arc::new(MemDisk::with_pattern("source", 64, 512, 5));
    disk.fail_reads(9..10);
    let device: Device = disk.clone();
    let (_, unreadable) = run(read_narrowed(&device, 0..10, 4, ReadBuf::with_capacity(10 * 512)));
    assert_eq!(unreadable, RangeSet::from_range(4..10));
}

#[test]
#[should_panic(expected = "the buffer holds the range being read")]
fn a_buffer_of_another_length_is_refused() {
    let disk: Device = Arc::new(MemDisk::with_pattern("source", 64, 512, 6));
    run(read_narrowed(&disk, 0..8, 1, ReadBuf::with_capacity(4 * 512)));
}
