//! End-to-end tests through the real engine on real files and loop devices: copies to one and
//! three targets checked byte for byte, zeroing with BLKZEROOUT, and the safety rules of
//! `kcopyd-os` (busy devices, read-only sources, targets never extended).
//!
//! Loop-device tests need root and `losetup`; elsewhere they print `SKIPPED: reason`.

use std::fs;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use kcopyd_core::{
    BlockDevice, Client, ClientConfig, Flags, Job, Outcome, Region, Sparse, SubmitError, TargetZeroes, WriteBuf,
};
use kcopyd_os::{OpenError, OpenOptions, OsDevice, Storage, StorageId};
use kcopyd_tests::conformance::{block_on, read_ok, write_ok};
use kcopyd_tests::fixtures::{Ext4OnLoop, LoopDevice, Mount, TempDir, is_root, pattern, skip};

/// 8 MiB: long enough for many sub-jobs of the default 512 KiB.
const LEN_BYTES: usize = 8 * 1024 * 1024;
const LEN_SECTORS: u64 = (LEN_BYTES / 512) as u64;

fn read_only() -> OpenOptions {
    OpenOptions::default()
}

fn writable() -> OpenOptions {
    OpenOptions { write: true, ..OpenOptions::default() }
}

fn open(path: &Path, options: &OpenOptions) -> Arc<OsDevice> {
    Arc::new(OsDevice::open(path, options).unwrap_or_else(|error| panic!("opening {}: {error}", path.display())))
}

fn run(job: Job) -> Outcome {
    let client = Client::new(ClientConfig::default()).expect("a client");
    let outcome = client.submit_blocking(job).expect("the job is valid").wait();
    let report = client.shutdown_blocking();
    assert_eq!(report.pool.pages_in_use, 0);
    outcome
}

fn region(device: &Arc<OsDevice>, start_sector: u64, len_sectors: u64) -> Region {
    Region::new(device.clone(), start_sector, len_sectors)
}

/// Asserts that `actual` equals `expected`, naming the first differing byte rather than
/// printing megabytes.
fn assert_same_bytes(actual: &[u8], expected: &[u8], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    if let Some(at) = actual.iter().zip(expected).position(|(a, e)| a != e) {
        panic!("{what}: byte {at} (sector {}) differs", at / 512);
    }
}

fn contents(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|error| panic!("reading {}: {error}", path.display()))
}

#[test]
fn copy_file_to_one_file() {
    let dir = TempDir::new("copy-file-file");
    let data = pattern(1, LEN_BYTES);
    let source_path = dir.file_with("source.img", &data);
    // The target is 1 MiB longer and takes the copy at 1 MiB in.
    let target_path = dir.zero_file("target.img", (LEN_BYTES + 1024 * 1024) as u64);
    let source = open(&source_path, &read_only());
    let target = open(&target_path, &writable());
    assert!(source.is_direct() && target.is_direct());

    let outcome =
        run(Job::copy(region(&source, 0, LEN_SECTORS), vec![region(&target, 2048, LEN_SECTORS)], Flags::empty()));
    assert!(outcome.is_ok(), "{outcome:?}");
    assert!(source.stats().reads > 0 && target.stats().writes > 0);
    drop((source, target));

    let copied = contents(&target_path);
    assert!(copied[..1024 * 1024].iter().all(|&b| b == 0), "the target before the copy is untouched");
    assert_same_bytes(&copied[1024 * 1024..], &data, "target");
    assert_same_bytes(&contents(&source_path), &data, "source (unchanged)");
}

#[test]
fn copy_file_to_three_files_with_a_small_page_budget() {
    let dir = TempDir::new("copy-file-3-files");
    let data = pattern(2, LEN_BYTES);
    let source = open(&dir.file_with("source.img", &data), &read_only());
    let paths: Vec<_> = (0..3).map(|i| dir.zero_file(&format!("target-{i}.img"), LEN_BYTES as u64)).collect();
    let targets: Vec<_> = paths.iter().map(|path| open(path, &writable())).collect();
    let job = Job::copy(
        region(&source, 0, LEN_SECTORS),
        targets.iter().map(|target| region(target, 0, LEN_SECTORS)).collect(),
        Flags::empty(),
    );
    let client = Client::new(ClientConfig { page_budget: 16, subjob_size_bytes: 64 * 1024, ..ClientConfig::default() })
        .expect("a client");
    let outcome = client.submit_blocking(job).unwrap().wait();
    client.shutdown_blocking();
    assert!(outcome.is_ok(), "{outcome:?}");
    drop(targets);
    for path in &paths {
        assert_same_bytes(&contents(path), &data, &path.display().to_string());
    }
}

#[test]
fn copy_between_files_and_loop_devices() {
    let test = "copy_between_files_and_loop_devices";
    let dir = TempDir::new("copy-loop");
    let data = pattern(3, LEN_BYTES);
    let source_path = dir.file_with("source.img", &data);
    let Some(loop_512) = LoopDevice::attach_or_skip(test, &dir.zero_file("loop-512.img", LEN_BYTES as u64), 512) else {
        return;
    };
    let Some(loop_4096) = LoopDevice::attach_or_skip(test, &dir.zero_file("loop-4096.img", LEN_BYTES as u64), 4096)
    else {
        return;
    };

    // File → loop device (512-byte sectors), one target.
    let source = open(&source_path, &read_only());
    let first = open(loop_512.path(), &writable());
    let outcome = run(Job::copy(region(&source, 0, LEN_SECTORS), vec![region(&first, 0, LEN_SECTORS)], Flags::empty()));
    assert!(outcome.is_ok(), "{outcome:?}");
    drop((source, first));
    assert_same_bytes(&contents(loop_512.path()), &data, "file → loop-512");

    // Loop device → a file, a 4096-byte-sector loop device and a second file at an offset:
    // three targets, the job's block is 4096 bytes.
    let source = open(loop_512.path(), &read_only());
    let file_target_path = dir.zero_file("target-file.img", LEN_BYTES as u64);
    let offset_target_path = dir.zero_file("target-offset.img", (LEN_BYTES * 2) as u64);
    let file_target = open(&file_target_path, &writable());
    let loop_target = open(loop_4096.path(), &writable());
    let offset_target = open(&offset_target_path, &writable());
    let half = LEN_SECTORS / 2;
    let outcome = run(Job::copy(
        region(&source, 0, LEN_SECTORS),
        vec![
            region(&file_target, 0, LEN_SECTORS),
            region(&loop_target, 0, LEN_SECTORS),
            region(&offset_target, half, LEN_SECTORS),
        ],
        Flags::empty(),
    ));
    assert!(outcome.is_ok(), "{outcome:?}");
    drop((source, file_target, loop_target, offset_target));
    assert_same_bytes(&contents(&file_target_path), &data, "loop-512 → file");
    assert_same_bytes(&contents(loop_4096.path()), &data, "loop-512 → loop-4096");
    let offset_copy = contents(&offset_target_path);
    let start = half as usize * 512;
    assert!(offset_copy[..start].iter().all(|&b| b == 0) && offset_copy[start + LEN_BYTES..].iter().all(|&b| b == 0));
    assert_same_bytes(&offset_copy[start..start + LEN_BYTES], &data, "loop-512 → file at an offset");
}

#[test]
fn zero_on_a_loop_device_is_offloaded_with_blkzeroout() {
    let test = "zero_on_a_loop_device_is_offloaded_with_blkzeroout";
    let dir = TempDir::new("zero-loop");
    let data = pattern(4, LEN_BYTES);
    let backing = dir.file_with("backing.img", &data);
    let Some(loop_device) = LoopDevice::attach_or_skip(test, &backing, 4096) else { return };
    let device = open(loop_device.path(), &writable());
    assert!(device.geometry().write_zeroes, "block devices offload write-zeroes");
    // Zero 1 MiB .. 5 MiB.
    let outcome = run(Job::zero(vec![region(&device, 2048, 8192)], Flags::empty()));
    assert!(outcome.is_ok(), "{outcome:?}");
    let stats = device.stats();
    assert_eq!((stats.write_zeroes_offloaded, stats.write_zeroes_written, stats.writes), (1, 0, 0), "{stats:?}");
    drop(device);
    let after = contents(loop_device.path());
    let (start, end) = (1024 * 1024, 5 * 1024 * 1024);
    assert!(after[start..end].iter().all(|&b| b == 0), "the range is zero");
    assert_same_bytes(&after[..start], &data[..start], "before the range");
    assert_same_bytes(&after[end..], &data[end..], "after the range");
}

#[test]
fn zero_on_a_file_uses_zero_range_where_the_filesystem_has_it() {
    let dir = TempDir::new("zero-file");
    let data = pattern(5, LEN_BYTES);
    let path = dir.file_with("target.img", &data);
    let device = open(&path, &writable());
    let offloaded = device.geometry().write_zeroes;
    let outcome = run(Job::zero(vec![region(&device, 2048, 8192)], Flags::empty()));
    assert!(outcome.is_ok(), "{outcome:?}");
    let stats = device.stats();
    if offloaded {
        assert_eq!((stats.write_zeroes_offloaded, stats.write_zeroes_written, stats.writes), (1, 0, 0), "{stats:?}");
    } else {
        skip("zero_on_a_file_uses_zero_range", "this filesystem has no FALLOC_FL_ZERO_RANGE: zeroed by writes");
        assert!(stats.writes > 0, "{stats:?}");
    }
    drop(device);
    let after = contents(&path);
    assert_eq!(after.len(), LEN_BYTES, "zeroing never changes the file's length");
    let (start, end) = (1024 * 1024, 5 * 1024 * 1024);
    assert!(after[start..end].iter().all(|&b| b == 0), "the range is zero");
    assert_same_bytes(&after[..start], &data[..start], "before the range");
    assert_same_bytes(&after[end..], &data[end..], "after the range");
}

#[test]
fn a_busy_block_device_is_refused_for_writing() {
    let test = "a_busy_block_device_is_refused_for_writing";
    let dir = TempDir::new("busy");
    let Some(loop_device) = LoopDevice::attach_or_skip(test, &dir.zero_file("backing.img", LEN_BYTES as u64), 512)
    else {
        return;
    };
    let path = loop_device.path();
    let assert_busy = |holder: &str| match OsDevice::open(path, &writable()) {
        Err(error @ OpenError::Busy { .. }) => {
            assert_eq!(error.path(), path);
            let message = error.to_string();
            assert!(message.contains(&path.display().to_string()) && message.contains("busy"), "{message}");
        }
        other => panic!("{}: held by {holder}, expected Busy, got {other:?}", path.display()),
    };

    // Held by a plain exclusive open (what mount, md or device-mapper do).
    let holder = fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::EXCL.bits() as i32)
        .open(path)
        .expect("an exclusive open");
    assert_busy("an O_EXCL descriptor");
    // A source is opened without O_EXCL: reading a claimed device is allowed.
    let reader = open(path, &read_only());
    assert_eq!(reader.geometry().len_sectors, LEN_SECTORS);
    drop(reader);
    drop(holder);

    // Held by a writable OsDevice: a second writer is refused, and released on drop.
    let writer = open(path, &writable());
    assert_busy("a writable OsDevice");
    write_ok(writer.as_ref(), 0, &pattern(6, 4096));
    drop(writer);
    let again = open(path, &writable());
    assert_eq!(read_ok(again.as_ref(), 0, 4096), pattern(6, 4096));
}

#[test]
fn a_mounted_block_device_is_refused_for_writing_but_readable() {
    let test = "a_mounted_block_device_is_refused_for_writing_but_readable";
    let dir = TempDir::new("mounted");
    let Some(ext4) = Ext4OnLoop::new_or_skip(test, &dir, 32 * 1024 * 1024, 512) else { return };
    match OsDevice::open(ext4.device(), &writable()) {
        Err(error @ OpenError::Busy { .. }) => assert_eq!(error.path(), ext4.device()),
        other => panic!("{}: mounted, expected Busy, got {other:?}", ext4.device().display()),
    }
    let source = open(ext4.device(), &read_only());
    assert_eq!(source.geometry().len_sectors, 65536);
    // ext4's superblock magic (0xef53) sits at byte 1080.
    let start = read_ok(source.as_ref(), 0, 4096);
    assert_eq!(start[1080..1082], [0x53, 0xef]);
}

#[test]
fn a_read_only_source_file_is_refused_for_writing() {
    let test = "a_read_only_source_file_is_refused_for_writing";
    let dir = TempDir::new("read-only");
    let data = pattern(7, 1024 * 1024);
    let path = dir.file_with("source.img", &data);
    fs::set_permissions(&path, fs::Permissions::from_mode(0o444)).unwrap();

    // Read-only access works and reads the data.
    let source = open(&path, &read_only());
    assert_eq!(read_ok(source.as_ref(), 0, 4096), data[..4096]);
    // A device opened read-only refuses writes before any I/O.
    let error = block_on(source.write(0, WriteBuf::zeroes(4096))).unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::PermissionDenied, "{error}");
    let error = block_on(source.write_zeroes(0, 8)).unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::PermissionDenied, "{error}");
    drop(source);
    assert_same_bytes(&contents(&path), &data, "the read-only source");

    if !is_root() {
        // Mode 0444 stops anyone but root.
        match OsDevice::open(&path, &writable()) {
            Err(error @ OpenError::PermissionDenied { .. }) => assert_eq!(error.path(), path),
            other => panic!("expected PermissionDenied, got {other:?}"),
        }
        return;
    }
    // Root ignores mode bits: make the file read-only with a read-only bind mount instead.
    let mount_point = dir.join("ro");
    fs::create_dir(&mount_point).unwrap();
    let mount = match Mount::new(&["--bind", dir.path().to_str().unwrap()], &mount_point) {
        Ok(mount) => mount,
        Err(error) => return skip(test, format!("cannot bind-mount: {error}")),
    };
    if let Err(error) = mount.remount_read_only() {
        return skip(test, format!("cannot remount read-only: {error}"));
    }
    let read_only_path = mount_point.join("source.img");
    match OsDevice::open(&read_only_path, &writable()) {
        Err(error @ OpenError::ReadOnly { .. }) => {
            assert_eq!(error.path(), read_only_path);
            assert!(error.to_string().contains("read-only"), "{error}");
        }
        other => panic!("expected ReadOnly, got {other:?}"),
    }
    assert!(OsDevice::open(&read_only_path, &read_only()).is_ok(), "reading from a read-only mount works");
}

#[test]
fn a_read_only_loop_device_is_refused_for_writing_at_open() {
    let test = "a_read_only_loop_device_is_refused_for_writing_at_open";
    let dir = TempDir::new("read-only-loop");
    let data = pattern(9, 1024 * 1024);
    let backing = dir.file_with("backing.img", &data);
    let Some(device) = LoopDevice::attach_with_or_skip(test, &backing, 512, &["--read-only"]) else { return };
    // The kernel lets the open succeed and fails every write (EPERM): refused at open instead.
    match OsDevice::open(device.path(), &writable()) {
        Err(error @ OpenError::ReadOnly { .. }) => {
            assert_eq!(error.path(), device.path());
            assert!(error.to_string().contains("read-only"), "{error}");
        }
        other => panic!("expected ReadOnly, got {other:?}"),
    }
    let source = open(device.path(), &read_only());
    assert_eq!(read_ok(source.as_ref(), 0, 4096), data[..4096], "reading works");
    drop(source);
    assert_same_bytes(&contents(&backing), &data, "the backing file");
}

#[test]
fn storage_follows_loop_devices_to_their_backing_file_and_offset() {
    use std::os::unix::fs::MetadataExt;
    let test = "storage_follows_loop_devices_to_their_backing_file_and_offset";
    let dir = TempDir::new("storage-loop");
    let backing = dir.zero_file("backing.img", 4 * 1024 * 1024);
    let metadata = fs::metadata(&backing).unwrap();
    let file = StorageId::File { dev: metadata.dev(), inode: metadata.ino() };
    assert_eq!(open(&backing, &read_only()).storage(), &Storage::of_file(metadata.dev(), metadata.ino()));
    let Some(plain) = LoopDevice::attach_or_skip(test, &backing, 512) else { return };
    let Some(shifted) = LoopDevice::attach_with_or_skip(test, &backing, 512, &["--offset", "1048576"]) else {
        return;
    };
    let plain_storage = open(plain.path(), &read_only()).storage().clone();
    assert_eq!((plain_storage.id, plain_storage.offset_bytes), (file, 0));
    assert!(plain_storage.layers[0].starts_with("loop device over"), "{plain_storage:?}");
    let shifted_storage = open(shifted.path(), &read_only()).storage().clone();
    assert_eq!((shifted_storage.id, shifted_storage.offset_bytes), (file, 1024 * 1024));
    // Byte 0 of the shifted device is byte 1 MiB of the plain one.
    assert!(shifted_storage.overlaps(0, 512, &plain_storage, 1024 * 1024, 512));
    assert!(!shifted_storage.overlaps(0, 512, &plain_storage, 0, 1024 * 1024));
}

#[test]
fn a_target_file_is_never_extended_or_truncated() {
    let dir = TempDir::new("never-extended");
    let data = pattern(8, LEN_BYTES);
    let source = open(&dir.file_with("source.img", &data), &read_only());

    // A target of 1 MiB + 300 bytes: the device is its 2048 whole sectors; the tail is not
    // part of it and keeps its bytes.
    let tail = vec![0x5a; 300];
    let mut initial = vec![0u8; 1024 * 1024];
    initial.extend_from_slice(&tail);
    let target_path = dir.file_with("target.img", &initial);
    let target = open(&target_path, &writable());
    assert_eq!(target.geometry().len_sectors, 2048);

    let outcome = run(Job::copy(region(&source, 0, 2048), vec![region(&target, 0, 2048)], Flags::empty()));
    assert!(outcome.is_ok(), "{outcome:?}");

    // A job reaching past the end is refused at submission: nothing is written.
    let client = Client::new(ClientConfig::default()).unwrap();
    let error = client
        .submit_blocking(Job::copy(region(&source, 0, 4096), vec![region(&target, 0, 4096)], Flags::empty()))
        .unwrap_err();
    assert!(matches!(error, SubmitError::OutOfRange { .. }), "{error:?}");
    client.shutdown_blocking();
    // So is a write past the end sent to the device directly.
    assert!(block_on(target.write(2048, WriteBuf::zeroes(4096))).is_err());
    assert!(block_on(target.write_zeroes(2040, 16)).is_err());
    drop(target);

    let after = contents(&target_path);
    assert_eq!(after.len(), initial.len(), "the target keeps its length");
    assert_same_bytes(&after[..1024 * 1024], &data[..1024 * 1024], "the copied part");
    assert_eq!(after[1024 * 1024..], tail, "the tail past the last whole sector is untouched");
}

#[test]
fn create_len_creates_and_extends_but_never_truncates() {
    let dir = TempDir::new("create-len");
    let missing = dir.join("missing.img");
    match OsDevice::open(&missing, &writable()) {
        Err(error @ OpenError::NotFound { .. }) => assert_eq!(error.path(), missing),
        other => panic!("expected NotFound, got {other:?}"),
    }
    assert!(!missing.exists(), "a missing target is not created without create_len");

    let created = open(&missing, &OpenOptions { create_len: Some(1024 * 1024), ..writable() });
    assert_eq!(created.geometry().len_sectors, 2048);
    drop(created);
    assert_eq!(fs::metadata(&missing).unwrap().len(), 1024 * 1024);

    let extended = open(&missing, &OpenOptions { create_len: Some(2 * 1024 * 1024), ..writable() });
    assert_eq!(extended.geometry().len_sectors, 4096);
    drop(extended);
    assert_eq!(fs::metadata(&missing).unwrap().len(), 2 * 1024 * 1024);

    let longer = open(&missing, &OpenOptions { create_len: Some(4096), ..writable() });
    assert_eq!(longer.geometry().len_sectors, 4096, "a longer file keeps its length");
    drop(longer);
    assert_eq!(fs::metadata(&missing).unwrap().len(), 2 * 1024 * 1024, "never truncated");
}

#[test]
fn a_file_that_shrank_gives_a_read_error_not_short_data() {
    let dir = TempDir::new("shrunk");
    let data = pattern(9, 1024 * 1024);
    let path = dir.file_with("source.img", &data);
    let device = open(&path, &read_only());
    fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(512 * 1024).unwrap();
    // The first half reads; a read crossing the new end stops short and fails.
    assert_eq!(read_ok(device.as_ref(), 0, 4096), data[..4096]);
    let (_, result) = block_on(device.read(1000, kcopyd_tests::conformance::read_buf(64 * 1024)));
    let error = result.expect_err("a read past the shrunk end fails");
    assert_eq!(error.kind(), std::io::ErrorKind::UnexpectedEof, "{error}");
}

/// The same copies with every device on the io_uring engine.
#[cfg(feature = "io-uring")]
mod uring {
    use kcopyd_os::IoEngine;

    use super::*;

    /// Opens with the io_uring engine, or prints `SKIPPED` and returns `None` where the kernel
    /// refuses io_uring.
    fn open_or_skip(test: &str, path: &Path, options: &OpenOptions) -> Option<Arc<OsDevice>> {
        let options = OpenOptions { engine: IoEngine::Uring, ..options.clone() };
        match OsDevice::open(path, &options) {
            Ok(device) => Some(Arc::new(device)),
            Err(error) if error.is_io_uring_unavailable() => {
                skip(test, format!("io_uring is not available here: {}", std::error::Error::source(&error).unwrap()));
                None
            }
            Err(error) => panic!("opening {}: {error}", path.display()),
        }
    }

    #[test]
    fn uring_copy_file_to_three_files() {
        let test = "uring_copy_file_to_three_files";
        let dir = TempDir::new("uring-copy-file-3-files");
        let data = pattern(21, LEN_BYTES);
        let Some(source) = open_or_skip(test, &dir.file_with("source.img", &data), &read_only()) else { return };
        // The third target is longer and takes the copy at 1 MiB in.
        let paths: Vec<_> =
            (0..3).map(|i| dir.zero_file(&format!("target-{i}.img"), (LEN_BYTES + i * 512 * 1024) as u64)).collect();
        let targets: Vec<_> = paths
            .iter()
            .map(|path| open_or_skip(test, path, &writable()).expect("io_uring worked for the source"))
            .collect();
        let job = Job::copy(
            region(&source, 0, LEN_SECTORS),
            targets.iter().enumerate().map(|(i, target)| region(target, i as u64 * 1024, LEN_SECTORS)).collect(),
            Flags::empty(),
        );
        // Small sub-jobs, several in flight, and a budget that makes reads wait for writes.
        let client =
            Client::new(ClientConfig { page_budget: 64, subjob_size_bytes: 128 * 1024, ..ClientConfig::default() })
                .expect("a client");
        let outcome = client.submit_blocking(job).unwrap().wait();
        assert_eq!(client.shutdown_blocking().pool.pages_in_use, 0);
        assert!(outcome.is_ok(), "{outcome:?}");
        let reads = source.stats().reads;
        assert!(reads >= (LEN_BYTES / (128 * 1024)) as u64, "{reads} reads");
        for target in &targets {
            let stats = target.stats();
            assert!(stats.writes > 0 && stats.failed == 0, "{stats:?}");
        }
        drop((source, targets));
        for (i, path) in paths.iter().enumerate() {
            let copied = contents(path);
            let start = i * 512 * 1024;
            assert!(copied[..start].iter().all(|&b| b == 0), "target {i} before the copy is untouched");
            assert_same_bytes(&copied[start..], &data, &path.display().to_string());
        }
    }

    #[test]
    fn uring_copy_file_to_a_loop_device_and_back() {
        let test = "uring_copy_file_to_a_loop_device_and_back";
        let dir = TempDir::new("uring-copy-loop");
        let data = pattern(22, LEN_BYTES);
        let source_path = dir.file_with("source.img", &data);
        let Some(loop_4096) = LoopDevice::attach_or_skip(test, &dir.zero_file("loop.img", LEN_BYTES as u64), 4096)
        else {
            return;
        };
        let Some(source) = open_or_skip(test, &source_path, &read_only()) else { return };
        let target = open_or_skip(test, loop_4096.path(), &writable()).expect("io_uring worked for the source");
        let outcome =
            run(Job::copy(region(&source, 0, LEN_SECTORS), vec![region(&target, 0, LEN_SECTORS)], Flags::empty()));
        assert!(outcome.is_ok(), "{outcome:?}");
        drop((source, target));
        assert_same_bytes(&contents(loop_4096.path()), &data, "file → loop-4096");

        // Back: the loop device (reopened read-only, so the exclusive open above is gone) to a file.
        let back_path = dir.zero_file("back.img", LEN_BYTES as u64);
        let source = open_or_skip(test, loop_4096.path(), &read_only()).expect("io_uring worked before");
        let target = open_or_skip(test, &back_path, &writable()).expect("io_uring worked before");
        let outcome =
            run(Job::copy(region(&source, 0, LEN_SECTORS), vec![region(&target, 0, LEN_SECTORS)], Flags::empty()));
        assert!(outcome.is_ok(), "{outcome:?}");
        drop((source, target));
        assert_same_bytes(&contents(&back_path), &data, "loop-4096 → file");
    }

    #[test]
    fn uring_a_file_that_shrank_gives_a_read_error_not_short_data() {
        let test = "uring_a_file_that_shrank_gives_a_read_error_not_short_data";
        let dir = TempDir::new("uring-shrunk");
        let data = pattern(23, 1024 * 1024);
        let path = dir.file_with("source.img", &data);
        let Some(device) = open_or_skip(test, &path, &read_only()) else { return };
        fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(512 * 1024).unwrap();
        // A read crossing the new end comes back short; the rest, resubmitted, reads nothing.
        assert_eq!(read_ok(device.as_ref(), 0, 4096), data[..4096]);
        let (_, result) = block_on(device.read(1000, kcopyd_tests::conformance::read_buf(64 * 1024)));
        let error = result.expect_err("a read past the shrunk end fails");
        assert_eq!(error.kind(), std::io::ErrorKind::UnexpectedEof, "{error}");
        assert_eq!(device.stats().failed, 1);
    }
}

/// Sparse file of `LEN_BYTES`: pattern data at 1 MiB (64 KiB) and at 5 MiB (4 KiB), the rest
/// holes. Returns its path and its bytes.
fn sparse_source(dir: &TempDir) -> (std::path::PathBuf, Vec<u8>) {
    use std::os::unix::fs::FileExt;
    let path = dir.zero_file("source", LEN_BYTES as u64);
    let file = fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(&pattern(1, 65536), 1 << 20).unwrap();
    file.write_all_at(&pattern(2, 4096), 5 << 20).unwrap();
    file.sync_all().unwrap();
    (path.clone(), contents(&path))
}

fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn a_file_reports_its_data_ranges_with_seek_data() {
    let dir = TempDir::new("seek-data");
    let (path, _) = sparse_source(&dir);
    let device = open(&path, &read_only());
    let allocated = block_on(device.allocated(0, LEN_SECTORS)).unwrap();
    if allocated.len_sectors() == LEN_SECTORS {
        skip("a_file_reports_its_data_ranges_with_seek_data", "the filesystem reports no holes (SEEK_DATA)");
        return;
    }
    for data in [2048..2176, 10240..10248] {
        assert!(kcopyd_core::RangeSet::from_range(data.clone()).difference(&allocated).is_empty(), "{data:?}");
    }
    // Filesystems allocate in blocks of up to 64 KiB; nothing near the whole file.
    assert!(allocated.len_sectors() <= 4 * 136, "{:?}", allocated.ranges());
    // A window of the file: clipped to it.
    let window = block_on(device.allocated(2100, 100)).unwrap();
    assert_eq!(window.ranges().to_vec(), vec![2100..2176]);
    let none = block_on(device.allocated(4096, 2048)).unwrap();
    assert!(none.is_empty(), "{:?}", none.ranges());
}

#[test]
fn a_sparse_copy_punches_holes_over_stale_data_and_leaves_the_target_as_sparse_as_the_source() {
    let dir = TempDir::new("sparse-copy");
    let (path, expected) = sparse_source(&dir);
    let target_path = dir.file_with("target", &pattern(9, LEN_BYTES));
    let (source, target) = (open(&path, &read_only()), open(&target_path, &writable()));
    let sparse = Sparse { skip_holes: true, zero_block_bytes: 4096, target_zeroes: TargetZeroes::Deallocate };
    let job = Job::copy(region(&source, 0, LEN_SECTORS), vec![region(&target, 0, LEN_SECTORS)], Flags::empty());
    assert!(run(job.sparse(sparse)).is_ok());
    block_on(target.flush()).unwrap();
    assert_same_bytes(&contents(&target_path), &expected, "target");
    assert!(target.stats().holes_punched > 0, "{:?}", target.stats());
    let (source_bytes, target_bytes) = (allocated_bytes(&path), allocated_bytes(&target_path));
    assert!(target_bytes <= source_bytes + 65536, "target {target_bytes} bytes allocated, source {source_bytes}");
    assert!(source.stats().reads <= 4, "only the data was read: {:?}", source.stats());
}
