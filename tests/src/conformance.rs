//! The conformance suite: what every [`BlockDevice`] backend must do, written once against the
//! trait and run against the simulator, O_DIRECT files and loop devices alike.
//!
//! ```text
//!  run_all(&dyn BlockDevice)            device of ≥ DEVICE_SECTORS_MIN sectors, contents overwritten
//!   ├─ geometry_is_sane                 power-of-two block, whole blocks, stable
//!   ├─ round_trip_at_edges              first block, last block, a span ending at the end
//!   ├─ window_read_fills_only_the_window
//!   ├─ scattered_pages_round_trip       > IOV_MAX non-adjacent pages in one request
//!   ├─ unaligned_user_memory_round_trips heap segments of odd lengths and addresses
//!   ├─ misaligned_requests_are_refused  EINVAL-like, nothing written
//!   ├─ out_of_range_requests_are_refused past the end, straddling it, overflowing
//!   ├─ write_zeroes_zeroes_exactly_the_range
//!   ├─ flush_succeeds
//!   └─ concurrent_requests_complete     many requests in flight at once
//! ```
//!
//! Each check panics with the device's name on failure.

use std::future::Future;
use std::io;

use bytes::Bytes;
use futures_util::future::join_all;
use kcopyd_core::{BlockDevice, PAGE_SIZE, PagePool, Pages, ReadBuf, SECTOR_SIZE, WriteBuf};

use crate::fixtures::pattern;

/// Smallest device [`run_all`] accepts: 8 MiB.
pub const DEVICE_SECTORS_MIN: u64 = 16384;
/// Most iovecs one Linux `preadv`/`pwritev` call takes; the scattered check goes past it.
pub const IOV_MAX: usize = 1024;

/// Runs every check against `device`, overwriting its contents.
///
/// # Panics
/// On the first check that fails, naming the device; if the device is smaller than
/// [`DEVICE_SECTORS_MIN`].
pub fn run_all(device: &dyn BlockDevice) {
    geometry_is_sane(device);
    round_trip_at_edges(device);
    window_read_fills_only_the_window(device);
    scattered_pages_round_trip(device);
    unaligned_user_memory_round_trips(device);
    misaligned_requests_are_refused(device);
    out_of_range_requests_are_refused(device);
    write_zeroes_zeroes_exactly_the_range(device);
    deallocate_zeroes_exactly_the_range_and_allocation_covers_data(device);
    flush_succeeds(device);
    concurrent_requests_complete(device);
}

/// Runs `future` to completion on a fresh current-thread runtime (with a clock, for devices
/// that model latency).
pub fn block_on<F: Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_time().build().expect("a tokio runtime").block_on(future)
}

/// A [`ReadBuf`] of `len_bytes` over adjacent pages of a pool of its own.
pub fn read_buf(len_bytes: usize) -> ReadBuf {
    let pages = len_bytes.div_ceil(PAGE_SIZE).max(1);
    let pool = PagePool::new(pages).expect("a page pool");
    ReadBuf::new(pool.try_alloc(pages).expect("a fresh pool has every page free"), len_bytes)
}

/// `count` pages of a pool of their own, no two adjacent, so that a buffer over them is
/// `count` separate segments.
///
/// Worked example, `count` 3: a pool of 6 pages is taken page by page (0..6), pages 1, 3 and
/// 5 are given back, and taking 3 pages now yields [5, 3, 1].
pub fn scattered_pages(count: usize) -> (Vec<Pages>, Pages) {
    let pool = PagePool::new(2 * count).expect("a page pool");
    let mut singles: Vec<Option<Pages>> = (0..2 * count).map(|_| pool.try_alloc(1)).collect();
    for odd in singles.iter_mut().skip(1).step_by(2) {
        *odd = None;
    }
    let scattered = pool.try_alloc(count).expect("the odd pages are free");
    (singles.into_iter().flatten().collect(), scattered)
}

/// Reads `len_bytes` at `offset_sectors` into a fresh buffer.
///
/// # Errors
/// The device's error.
pub async fn read_at(device: &dyn BlockDevice, offset_sectors: u64, len_bytes: usize) -> io::Result<Vec<u8>> {
    let (buf, result) = device.read(offset_sectors, read_buf(len_bytes)).await;
    assert_eq!(buf.len(), len_bytes, "{}: a read gives its buffer back whole", device.name());
    result.map(|()| buf.to_vec())
}

/// Writes `data` at `offset_sectors` from page-aligned memory.
///
/// # Errors
/// The device's error.
pub async fn write_at(device: &dyn BlockDevice, offset_sectors: u64, data: &[u8]) -> io::Result<()> {
    let mut buf = read_buf(data.len());
    buf.copy_from_slice(data);
    device.write(offset_sectors, buf.freeze()).await
}

/// `read_at` that must succeed.
pub fn read_ok(device: &dyn BlockDevice, offset_sectors: u64, len_bytes: usize) -> Vec<u8> {
    block_on(read_at(device, offset_sectors, len_bytes)).unwrap_or_else(|error| {
        panic!("{}: read of {len_bytes} bytes at sector {offset_sectors}: {error}", device.name())
    })
}

/// `write_at` that must succeed.
pub fn write_ok(device: &dyn BlockDevice, offset_sectors: u64, data: &[u8]) {
    block_on(write_at(device, offset_sectors, data)).unwrap_or_else(|error| {
        panic!("{}: write of {} bytes at sector {offset_sectors}: {error}", device.name(), data.len())
    });
}

fn block_bytes(device: &dyn BlockDevice) -> usize {
    device.geometry().logical_block_size as usize
}

fn block_sectors(device: &dyn BlockDevice) -> u64 {
    device.geometry().block_sectors()
}

/// Asserts that `result` is a refusal of the "invalid argument" kind (EINVAL).
fn assert_invalid(device: &dyn BlockDevice, what: &str, result: io::Result<()>) {
    match result {
        Err(error) => assert_eq!(
            error.kind(),
            io::ErrorKind::InvalidInput,
            "{}: {what} was refused, but not as an invalid argument: {error}",
            device.name()
        ),
        Ok(()) => panic!("{}: {what} was accepted", device.name()),
    }
}

/// Asserts that `result` is an error.
fn assert_refused(device: &dyn BlockDevice, what: &str, result: io::Result<()>) {
    assert!(result.is_err(), "{}: {what} was accepted", device.name());
}

/// The block size is a power of two from 512 to 65536, the length is whole blocks and at
/// least [`DEVICE_SECTORS_MIN`], and the geometry does not change between calls.
pub fn geometry_is_sane(device: &dyn BlockDevice) {
    let geometry = device.geometry();
    let name = device.name();
    assert!(!name.is_empty(), "a device has a name");
    let block = geometry.logical_block_size;
    assert!(block.is_power_of_two() && (512..=65536).contains(&block), "{name}: logical block size {block}");
    assert_eq!(geometry.len_sectors % geometry.block_sectors(), 0, "{name}: length is whole blocks");
    assert!(
        geometry.len_sectors >= DEVICE_SECTORS_MIN,
        "{name}: the suite needs {DEVICE_SECTORS_MIN} sectors, the device has {}",
        geometry.len_sectors
    );
    assert_eq!(device.geometry(), geometry, "{name}: geometry is stable");
    assert_eq!(device.id(), device.id(), "{name}: id is stable");
}

/// Writes and reads back the first block, the last block and a span of three blocks that
/// ends at the end of the device; none disturbs another.
pub fn round_trip_at_edges(device: &dyn BlockDevice) {
    let (bytes, sectors, len) = (block_bytes(device), block_sectors(device), device.geometry().len_sectors);
    let first = pattern(1, bytes);
    let last = pattern(2, bytes);
    let span = pattern(3, 3 * bytes);
    write_ok(device, 0, &first);
    write_ok(device, len - sectors, &last);
    assert_eq!(read_ok(device, 0, bytes), first, "{}: first block", device.name());
    assert_eq!(read_ok(device, len - sectors, bytes), last, "{}: last block", device.name());
    write_ok(device, len - 3 * sectors, &span);
    assert_eq!(read_ok(device, len - 3 * sectors, 3 * bytes), span, "{}: span ending at the end", device.name());
    assert_eq!(read_ok(device, 0, bytes), first, "{}: first block after writing the end", device.name());
}

/// A read into a narrowed window fills the window and nothing around it; the window
/// straddles a page boundary where the block size allows.
pub fn window_read_fills_only_the_window(device: &dyn BlockDevice) {
    let bytes = block_bytes(device);
    let data = pattern(4, 2 * bytes.max(PAGE_SIZE));
    write_ok(device, 0, &data);
    // 512-byte blocks: window 512..4608 (crosses the first page boundary).
    let window_len = bytes.max(PAGE_SIZE);
    let window = bytes..bytes + window_len;
    let mut buf = read_buf(window.end + bytes);
    buf.fill(0xa5);
    buf.set_window(window.clone());
    let (mut buf, result) = block_on(device.read(0, buf));
    result.unwrap_or_else(|error| panic!("{}: read into a window: {error}", device.name()));
    assert_eq!(buf.to_vec(), data[..window_len], "{}: the window holds the data", device.name());
    buf.reset_window();
    let all = buf.to_vec();
    assert!(all[..window.start].iter().all(|&b| b == 0xa5), "{}: bytes before the window untouched", device.name());
    assert!(all[window.end..].iter().all(|&b| b == 0xa5), "{}: bytes after the window untouched", device.name());
}

/// One write and one read over more non-adjacent pages than one `preadv` call takes.
pub fn scattered_pages_round_trip(device: &dyn BlockDevice) {
    let name = device.name();
    let count = IOV_MAX + 100;
    let len_bytes = count * PAGE_SIZE;
    let data = pattern(5, len_bytes);
    let offset_sectors = block_sectors(device);
    let (_held, pages) = scattered_pages(count);
    let mut buf = ReadBuf::new(pages, len_bytes);
    assert_eq!(buf.segments().count(), count, "{name}: the pages are scattered");
    buf.copy_from_slice(&data);
    let frozen = buf.freeze();
    assert_eq!(frozen.segments().len(), count);
    block_on(device.write(offset_sectors, frozen)).unwrap_or_else(|error| panic!("{name}: scattered write: {error}"));
    assert!(read_ok(device, offset_sectors, len_bytes) == data, "{name}: scattered write landed");

    let (_held, pages) = scattered_pages(count);
    let (buf, result) = block_on(device.read(offset_sectors, ReadBuf::new(pages, len_bytes)));
    result.unwrap_or_else(|error| panic!("{name}: scattered read: {error}"));
    assert!(buf.to_vec() == data, "{name}: scattered read filled every page in order");
}

/// A write from heap memory whose segments have odd lengths and addresses lands intact
/// (a direct-I/O device copies it through aligned memory).
pub fn unaligned_user_memory_round_trips(device: &dyn BlockDevice) {
    let bytes = block_bytes(device);
    let data = pattern(6, 2 * bytes);
    // One byte of slack in front, so that the second segment starts at an odd address.
    let mut backing = vec![0u8; 1];
    backing.extend_from_slice(&data[300..]);
    let segments = vec![Bytes::copy_from_slice(&data[..300]), Bytes::from(backing).slice(1..)];
    let buf = WriteBuf::from_segments(segments);
    assert_eq!(buf.len(), data.len());
    let offset_sectors = 2 * block_sectors(device);
    block_on(device.write(offset_sectors, buf))
        .unwrap_or_else(|error| panic!("{}: write from unaligned memory: {error}", device.name()));
    assert_eq!(read_ok(device, offset_sectors, data.len()), data, "{}: unaligned write landed", device.name());
}

/// Requests whose length (any device) or offset (blocks larger than 512 bytes) is not a
/// multiple of the logical block are refused as invalid, and write nothing.
pub fn misaligned_requests_are_refused(device: &dyn BlockDevice) {
    let (bytes, sectors) = (block_bytes(device), block_sectors(device));
    let before = pattern(7, 2 * bytes);
    write_ok(device, 0, &before);

    assert_invalid(
        device,
        "a write of 100 bytes",
        block_on(device.write(0, WriteBuf::from_bytes(vec![1u8; 100].into()))),
    );
    let (buf, result) = block_on(device.read(0, read_buf(100)));
    assert_eq!(buf.len(), 100, "{}: a refused read gives its buffer back", device.name());
    assert_invalid(device, "a read of 100 bytes", result);
    if bytes > SECTOR_SIZE {
        assert_invalid(device, "a read at sector 1", block_on(read_at(device, 1, bytes)).map(drop));
        assert_invalid(device, "a write at sector 1", block_on(write_at(device, 1, &vec![2u8; bytes])));
        assert_invalid(device, "a write of one sector", block_on(write_at(device, 0, &[3u8; SECTOR_SIZE])));
        assert_invalid(device, "write-zeroes at sector 1", block_on(device.write_zeroes(1, sectors)));
        assert_invalid(device, "write-zeroes of one sector", block_on(device.write_zeroes(0, 1)));
    }
    assert_eq!(read_ok(device, 0, 2 * bytes), before, "{}: refused requests wrote nothing", device.name());
}

/// Reads, writes and write-zeroes past the end, straddling it, or whose end overflows are
/// refused, and write nothing; the device keeps its size.
pub fn out_of_range_requests_are_refused(device: &dyn BlockDevice) {
    let geometry = device.geometry();
    let (bytes, sectors, len) = (block_bytes(device), block_sectors(device), geometry.len_sectors);
    let last = pattern(8, bytes);
    write_ok(device, len - sectors, &last);

    assert_refused(device, "a read one block past the end", block_on(read_at(device, len, bytes)).map(drop));
    assert_refused(device, "a read straddling the end", block_on(read_at(device, len - sectors, 2 * bytes)).map(drop));
    let huge = u64::MAX / sectors * sectors;
    assert_refused(device, "a read at sector 2^64 - 1", block_on(read_at(device, huge, bytes)).map(drop));
    assert_refused(device, "a write one block past the end", block_on(write_at(device, len, &vec![9u8; bytes])));
    assert_refused(
        device,
        "a write straddling the end",
        block_on(write_at(device, len - sectors, &vec![9u8; 2 * bytes])),
    );
    assert_refused(device, "a write at sector 2^64 - 1", block_on(write_at(device, huge, &vec![9u8; bytes])));
    assert_refused(
        device,
        "write-zeroes straddling the end",
        block_on(device.write_zeroes(len - sectors, 2 * sectors)),
    );
    assert_refused(device, "write-zeroes past the end", block_on(device.write_zeroes(len, sectors)));
    let all = u64::MAX / sectors * sectors;
    assert_refused(device, "write-zeroes of 2^64 sectors", block_on(device.write_zeroes(0, all)));

    assert_eq!(read_ok(device, len - sectors, bytes), last, "{}: the last block is intact", device.name());
    assert_eq!(device.geometry(), geometry, "{}: the device kept its size", device.name());
}

/// Write-zeroes zeroes exactly its range: inside a patterned span, at the last block, and
/// over a range longer than one plain write of zeroes; an empty request succeeds.
pub fn write_zeroes_zeroes_exactly_the_range(device: &dyn BlockDevice) {
    let name = device.name();
    let (bytes, sectors, len) = (block_bytes(device), block_sectors(device), device.geometry().len_sectors);
    let base = 4 * sectors;
    let data = pattern(10, 6 * bytes);
    write_ok(device, base, &data);
    block_on(device.write_zeroes(base + sectors, 4 * sectors))
        .unwrap_or_else(|error| panic!("{name}: write-zeroes: {error}"));
    let after = read_ok(device, base, 6 * bytes);
    assert_eq!(after[..bytes], data[..bytes], "{name}: the block before the range is intact");
    assert!(after[bytes..5 * bytes].iter().all(|&b| b == 0), "{name}: the range is zero");
    assert_eq!(after[5 * bytes..], data[5 * bytes..], "{name}: the block after the range is intact");

    write_ok(device, len - 2 * sectors, &pattern(11, 2 * bytes));
    block_on(device.write_zeroes(len - sectors, sectors))
        .unwrap_or_else(|error| panic!("{name}: write-zeroes of the last block: {error}"));
    let end = read_ok(device, len - 2 * sectors, 2 * bytes);
    assert_eq!(end[..bytes], pattern(11, 2 * bytes)[..bytes], "{name}: the block before the last is intact");
    assert!(end[bytes..].iter().all(|&b| b == 0), "{name}: the last block is zero");

    // 3 MiB: longer than one plain write of zeroes in the OS backend (1 MiB).
    let long_bytes = 3 * 1024 * 1024;
    let long_start = 64 * sectors;
    write_ok(device, long_start, &pattern(12, long_bytes + bytes));
    let long_sectors = (long_bytes / SECTOR_SIZE) as u64;
    block_on(device.write_zeroes(long_start, long_sectors))
        .unwrap_or_else(|error| panic!("{name}: long write-zeroes: {error}"));
    let long = read_ok(device, long_start, long_bytes + bytes);
    assert!(long[..long_bytes].iter().all(|&b| b == 0), "{name}: the long range is zero");
    assert_eq!(
        long[long_bytes..],
        pattern(12, long_bytes + bytes)[long_bytes..],
        "{name}: the block after it is intact"
    );

    block_on(device.write_zeroes(0, 0)).unwrap_or_else(|error| panic!("{name}: empty write-zeroes: {error}"));
}

/// Deallocate makes exactly its range read as zeroes (a hole punched, or zeroes written), and
/// `allocated` never reports written data as a hole, before or after.
pub fn deallocate_zeroes_exactly_the_range_and_allocation_covers_data(device: &dyn BlockDevice) {
    let name = device.name();
    let (bytes, sectors) = (block_bytes(device), block_sectors(device));
    let base = 8 * sectors;
    let data = pattern(13, 6 * bytes);
    write_ok(device, base, &data);
    let covers = |range: std::ops::Range<u64>, what: &str| {
        let allocated =
            block_on(device.allocated(base, 6 * sectors)).unwrap_or_else(|error| panic!("{name}: allocated: {error}"));
        let missing = kcopyd_core::RangeSet::from_range(range).difference(&allocated);
        assert!(missing.is_empty(), "{name}: {what}: data at {:?} reported as a hole", missing.ranges());
    };
    covers(base..base + 6 * sectors, "after the write");
    block_on(device.deallocate(base + sectors, 4 * sectors))
        .unwrap_or_else(|error| panic!("{name}: deallocate: {error}"));
    let after = read_ok(device, base, 6 * bytes);
    assert_eq!(after[..bytes], data[..bytes], "{name}: the block before the range is intact");
    assert!(after[bytes..5 * bytes].iter().all(|&b| b == 0), "{name}: the deallocated range reads zeroes");
    assert_eq!(after[5 * bytes..], data[5 * bytes..], "{name}: the block after the range is intact");
    covers(base..base + sectors, "the block before the hole");
    covers(base + 5 * sectors..base + 6 * sectors, "the block after the hole");
    block_on(device.deallocate(0, 0)).unwrap_or_else(|error| panic!("{name}: empty deallocate: {error}"));
}

/// A flush after a write succeeds and the data stays readable.
pub fn flush_succeeds(device: &dyn BlockDevice) {
    let data = pattern(13, block_bytes(device));
    write_ok(device, 0, &data);
    block_on(device.flush()).unwrap_or_else(|error| panic!("{}: flush: {error}", device.name()));
    assert_eq!(read_ok(device, 0, data.len()), data, "{}: data after a flush", device.name());
}

/// 64 writes, then 64 reads, all in flight at once, each of its own block.
pub fn concurrent_requests_complete(device: &dyn BlockDevice) {
    const REQUESTS: u64 = 64;
    let (bytes, sectors) = (block_bytes(device), block_sectors(device));
    let base = 1024 * sectors.max(8) / 8;
    let data: Vec<Vec<u8>> = (0..REQUESTS).map(|i| pattern(100 + i, bytes)).collect();
    let writes = data.iter().enumerate().map(|(i, block)| write_at(device, base + i as u64 * sectors, block));
    for (i, result) in block_on(join_all(writes)).into_iter().enumerate() {
        result.unwrap_or_else(|error| panic!("{}: concurrent write {i}: {error}", device.name()));
    }
    let reads = (0..REQUESTS).map(|i| read_at(device, base + i * sectors, bytes));
    for (i, result) in block_on(join_all(reads)).into_iter().enumerate() {
        let read = result.unwrap_or_else(|error| panic!("{}: concurrent read {i}: {error}", device.name()));
        assert_eq!(read, data[i], "{}: concurrent block {i}", device.name());
    }
}
