//! The conformance suite against every backend: the simulator, O_DIRECT and buffered files,
//! loop devices with 512- and 4096-byte sectors (root only), and tmpfs/ramfs for the
//! direct-I/O refusal. A backend that cannot run here prints `SKIPPED: reason`.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use kcopyd_core::{BlockDevice, Geometry};
use kcopyd_os::{DeviceKind, OpenError, OpenOptions, OsDevice};
use kcopyd_sim::{MemDisk, MemDiskOptions};
use kcopyd_tests::conformance::{self, DEVICE_SECTORS_MIN};
use kcopyd_tests::fixtures::{Ext4OnLoop, LoopDevice, Mount, TempDir, is_root, note, skip};

/// Bytes of every file and loop device the suite runs on.
const DEVICE_BYTES: u64 = DEVICE_SECTORS_MIN * 512;

fn writable() -> OpenOptions {
    OpenOptions { write: true, ..OpenOptions::default() }
}

fn open(path: &Path, options: &OpenOptions) -> OsDevice {
    OsDevice::open(path, options).unwrap_or_else(|error| panic!("opening {}: {error}", path.display()))
}

#[test]
fn mem_disk_512() {
    conformance::run_all(&MemDisk::zeroed("mem-512", DEVICE_SECTORS_MIN, 512));
}

#[test]
fn mem_disk_4096() {
    conformance::run_all(&MemDisk::zeroed("mem-4096", DEVICE_SECTORS_MIN, 4096));
}

#[test]
fn mem_disk_4096_with_write_zeroes_offload() {
    let options = MemDiskOptions {
        name: "mem-4096-offload".into(),
        len_sectors: DEVICE_SECTORS_MIN,
        logical_block_size: 4096,
        write_zeroes: true,
        ..MemDiskOptions::default()
    };
    conformance::run_all(&MemDisk::new(options));
}

#[test]
fn os_file_direct() {
    let dir = TempDir::new("conformance-direct");
    let path = dir.zero_file("device.img", DEVICE_BYTES);
    let device = open(&path, &writable());
    assert!(device.is_direct());
    assert_eq!(device.kind(), DeviceKind::File);
    let geometry = device.geometry();
    assert_eq!(geometry.len_sectors, DEVICE_SECTORS_MIN);
    assert!(geometry.logical_block_size >= 512);
    let metadata = fs::metadata(&path).unwrap();
    assert_eq!(
        (device.id().namespace, device.id().major, device.id().minor),
        ("file", metadata.dev(), metadata.ino()),
        "a file's id is (st_dev, st_ino)"
    );
    conformance::run_all(&device);
    let stats = device.stats();
    assert!(stats.bounced > 0, "the unaligned-memory check went through the bounce buffer: {stats:?}");
    assert!(stats.refused > 0 && stats.flushes > 0, "{stats:?}");
    drop(device);
    assert_eq!(fs::metadata(&path).unwrap().len(), DEVICE_BYTES, "the file kept its length");
}

#[test]
fn os_file_direct_queue_depth_one() {
    let dir = TempDir::new("conformance-depth-1");
    let path = dir.zero_file("device.img", DEVICE_BYTES);
    conformance::run_all(&open(&path, &OpenOptions { queue_depth: 1, ..writable() }));
}

#[test]
fn os_file_buffered() {
    let dir = TempDir::new("conformance-buffered");
    let path = dir.zero_file("device.img", DEVICE_BYTES);
    let device = open(&path, &OpenOptions { buffered: true, ..writable() });
    assert!(!device.is_direct());
    assert_eq!(device.geometry().logical_block_size, 512);
    conformance::run_all(&device);
    assert_eq!(device.stats().bounced, 0, "buffered I/O takes any memory");
}

#[test]
fn os_file_direct_on_a_filesystem_with_4096_byte_sectors() {
    let test = "os_file_direct_on_a_filesystem_with_4096_byte_sectors";
    let dir = TempDir::new("conformance-ext4-4096");
    let Some(ext4) = Ext4OnLoop::new_or_skip(test, &dir, 64 * 1024 * 1024, 4096) else { return };
    let path = ext4.join("device.img");
    fs::File::create(&path).and_then(|file| file.set_len(DEVICE_BYTES)).unwrap();
    let device = open(&path, &writable());
    assert_eq!(device.geometry().logical_block_size, 4096, "the filesystem's direct-I/O alignment");
    conformance::run_all(&device);
    drop(device);
    assert_eq!(fs::metadata(&path).unwrap().len(), DEVICE_BYTES, "the file kept its length");
}

/// Attaches a loop device of `sector_size` over a fresh file and runs the suite on it.
fn loop_device_conformance(test: &str, sector_size: u32) {
    let dir = TempDir::new(test);
    let backing = dir.zero_file("backing.img", DEVICE_BYTES);
    let Some(loop_device) = LoopDevice::attach_or_skip(test, &backing, sector_size) else { return };
    let device = open(loop_device.path(), &writable());
    assert_eq!(device.kind(), DeviceKind::BlockDevice);
    assert_eq!(
        device.geometry(),
        Geometry::new(DEVICE_SECTORS_MIN, sector_size).with_write_zeroes(true),
        "geometry from BLKGETSIZE64 and BLKSSZGET"
    );
    let rdev = fs::metadata(loop_device.path()).unwrap().rdev();
    assert_eq!((device.id().namespace, device.id().major, device.id().minor), ("block", rdev, 0));
    conformance::run_all(&device);
    let stats = device.stats();
    assert!(stats.write_zeroes_offloaded > 0 && stats.write_zeroes_written == 0, "BLKZEROOUT served: {stats:?}");
}

#[test]
fn loop_device_512() {
    loop_device_conformance("loop_device_512", 512);
}

#[test]
fn loop_device_4096() {
    loop_device_conformance("loop_device_4096", 4096);
}

/// Checks that opening `path` with O_DIRECT is refused with the typed error naming the path,
/// the filesystem and the buffered mode.
fn assert_direct_io_refused(path: &Path, filesystem_expected: &str) {
    match OsDevice::open(path, &writable()) {
        Err(error @ OpenError::DirectIoUnsupported { .. }) => {
            let OpenError::DirectIoUnsupported { path: error_path, filesystem, .. } = &error else { unreachable!() };
            assert_eq!(error_path, path);
            assert_eq!(filesystem, filesystem_expected);
            let message = error.to_string();
            assert!(message.contains(&path.display().to_string()), "the message names the path: {message}");
            assert!(message.contains("buffered: true"), "the message points to the buffered mode: {message}");
        }
        Err(other) => panic!("{}: expected DirectIoUnsupported, got {other:?}", path.display()),
        Ok(device) => panic!("{}: O_DIRECT was accepted: {device:?}", path.display()),
    }
}

#[test]
fn tmpfs_refuses_direct_io_or_accepts_it_and_buffered_mode_works() {
    let test = "tmpfs_refuses_direct_io_or_accepts_it_and_buffered_mode_works";
    let shm = Path::new("/dev/shm");
    let dir = match TempDir::new_in(shm, "tmpfs") {
        Ok(dir) => dir,
        Err(error) => return skip(test, format!("no usable /dev/shm: {error}")),
    };
    let path = dir.zero_file("device.img", DEVICE_BYTES);
    match OsDevice::open(&path, &writable()) {
        Err(OpenError::DirectIoUnsupported { .. }) => assert_direct_io_refused(&path, "tmpfs"),
        // tmpfs implements O_DIRECT since Linux 6.6; then the refusal is checked on ramfs
        // (`ramfs_refuses_direct_io_and_buffered_mode_works`).
        Ok(device) => {
            note(&format!("note: {test}: tmpfs accepts O_DIRECT on this kernel (Linux 6.6+); running the suite on it"));
            conformance::run_all(&device);
        }
        Err(other) => panic!("{}: {other:?}", path.display()),
    }
    let device = open(&path, &OpenOptions { buffered: true, ..writable() });
    assert!(!device.is_direct());
    conformance::run_all(&device);
}

#[test]
fn ramfs_refuses_direct_io_and_buffered_mode_works() {
    let test = "ramfs_refuses_direct_io_and_buffered_mode_works";
    if !is_root() {
        return skip(test, "mounting ramfs needs root");
    }
    let dir = TempDir::new("ramfs");
    let mount_point = dir.join("mnt");
    fs::create_dir(&mount_point).unwrap();
    let _mount = match Mount::new(&["-t", "ramfs", "kcopyd-test"], &mount_point) {
        Ok(mount) => mount,
        Err(error) => return skip(test, format!("cannot mount ramfs: {error}")),
    };
    let path = mount_point.join("device.img");
    fs::File::create(&path).and_then(|file| file.set_len(DEVICE_BYTES)).unwrap();
    assert_direct_io_refused(&path, "ramfs");
    let device = open(&path, &OpenOptions { buffered: true, ..writable() });
    conformance::run_all(&device);
}

/// The io_uring engine against the same suite: an O_DIRECT file (at the default queue depth
/// and at depth 1) and loop devices with 512- and 4096-byte sectors.
#[cfg(feature = "io-uring")]
mod uring {
    use kcopyd_os::IoEngine;

    use super::*;

    fn writable_uring() -> OpenOptions {
        OpenOptions { engine: IoEngine::Uring, ..writable() }
    }

    /// Opens with the io_uring engine, or prints `SKIPPED` and returns `None` where the kernel
    /// refuses io_uring.
    fn open_or_skip(test: &str, path: &Path, options: &OpenOptions) -> Option<OsDevice> {
        match OsDevice::open(path, options) {
            Ok(device) => Some(device),
            Err(error) if error.is_io_uring_unavailable() => {
                skip(test, format!("io_uring is not available here: {}", std::error::Error::source(&error).unwrap()));
                None
            }
            Err(error) => panic!("opening {}: {error}", path.display()),
        }
    }

    #[test]
    fn uring_file_direct() {
        let test = "uring_file_direct";
        let dir = TempDir::new("conformance-uring-direct");
        let path = dir.zero_file("device.img", DEVICE_BYTES);
        let Some(device) = open_or_skip(test, &path, &writable_uring()) else { return };
        assert!(device.is_direct());
        assert_eq!(device.options().engine, IoEngine::Uring);
        conformance::run_all(&device);
        let stats = device.stats();
        assert!(stats.bounced > 0, "the unaligned-memory check went through the bounce buffer: {stats:?}");
        assert!(stats.refused > 0 && stats.flushes > 0 && stats.failed == 0, "{stats:?}");
        drop(device);
        assert_eq!(fs::metadata(&path).unwrap().len(), DEVICE_BYTES, "the file kept its length");
    }

    #[test]
    fn uring_file_direct_queue_depth_one() {
        let test = "uring_file_direct_queue_depth_one";
        let dir = TempDir::new("conformance-uring-depth-1");
        let path = dir.zero_file("device.img", DEVICE_BYTES);
        let Some(device) = open_or_skip(test, &path, &OpenOptions { queue_depth: 1, ..writable_uring() }) else {
            return;
        };
        conformance::run_all(&device);
    }

    #[test]
    fn uring_file_buffered() {
        let test = "uring_file_buffered";
        let dir = TempDir::new("conformance-uring-buffered");
        let path = dir.zero_file("device.img", DEVICE_BYTES);
        let Some(device) = open_or_skip(test, &path, &OpenOptions { buffered: true, ..writable_uring() }) else {
            return;
        };
        conformance::run_all(&device);
        assert_eq!(device.stats().bounced, 0, "buffered I/O takes any memory");
    }

    fn uring_loop_device_conformance(test: &str, sector_size: u32) {
        let dir = TempDir::new(test);
        let backing = dir.zero_file("backing.img", DEVICE_BYTES);
        let Some(loop_device) = LoopDevice::attach_or_skip(test, &backing, sector_size) else { return };
        let Some(device) = open_or_skip(test, loop_device.path(), &writable_uring()) else { return };
        assert_eq!(device.kind(), DeviceKind::BlockDevice);
        assert_eq!(device.geometry().logical_block_size, sector_size);
        conformance::run_all(&device);
        let stats = device.stats();
        assert!(stats.write_zeroes_offloaded > 0 && stats.write_zeroes_written == 0, "BLKZEROOUT served: {stats:?}");
        assert_eq!(stats.failed, 0, "{stats:?}");
    }

    #[test]
    fn uring_loop_device_512() {
        uring_loop_device_conformance("uring_loop_device_512", 512);
    }

    #[test]
    fn uring_loop_device_4096() {
        uring_loop_device_conformance("uring_loop_device_4096", 4096);
    }
}
