//! Thin wrappers over the system calls that the standard library lacks: block-device ioctls,
//! statx's direct-I/O alignment, fallocate and statfs.
//!
//! The only `unsafe` code of the crate is here, in the two ioctls rustix has no safe wrapper
//! for.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::path::Path;

use rustix::fs::{AtFlags, FallocateFlags, SeekFrom, StatxFlags};
use rustix::io::Errno;
use rustix::ioctl::{Getter, Opcode, Setter, ioctl, opcode};

use crate::aligned::AlignedBuf;

/// `BLKGETSIZE64`: `_IOR(0x12, 114, size_t)`; the kernel writes the size in bytes as a u64.
const BLKGETSIZE64: Opcode = opcode::read::<usize>(0x12, 114);
/// `BLKZEROOUT`: `_IO(0x12, 127)`; the argument points to `u64 range[2] = { start, len }` in
/// bytes, both multiples of the logical block size.
const BLKZEROOUT: Opcode = opcode::none(0x12, 127);

/// `BLKROGET`: `_IO(0x12, 94)`; the kernel writes 1 (read-only) or 0 as a C int through the
/// pointer argument.
const BLKROGET: Opcode = opcode::none(0x12, 94);

/// Whether a block device is read-only (BLKROGET): `losetup -r`, `blockdev --setro`, a
/// write-protected medium. Opening such a device for writing succeeds; every write fails.
pub(crate) fn block_device_is_read_only(file: &File) -> io::Result<bool> {
    // SAFETY: BLKROGET writes one C int through its pointer argument (`put_int`) and reads
    // nothing; `Getter<_, c_int>` passes a pointer to such an int and reads it only after a
    // successful call. `file` is a valid open descriptor for the whole call.
    let read_only = unsafe { ioctl(file, Getter::<BLKROGET, std::ffi::c_int>::new()) }?;
    Ok(read_only != 0)
}

/// Size of a block device in bytes (BLKGETSIZE64).
pub(crate) fn block_device_size_bytes(file: &File) -> io::Result<u64> {
    // SAFETY: BLKGETSIZE64 is a read-direction ioctl whose argument is a pointer to a u64 the
    // kernel fills in (`put_u64`); `Getter<_, u64>` passes a pointer to such a u64 and reads it
    // only after a successful call. `file` is a valid open descriptor for the whole call.
    let size_bytes = unsafe { ioctl(file, Getter::<BLKGETSIZE64, u64>::new()) }?;
    Ok(size_bytes)
}

/// Logical block size of a block device in bytes (BLKSSZGET).
pub(crate) fn block_device_logical_block_size(file: &File) -> io::Result<u32> {
    Ok(rustix::fs::ioctl_blksszget(file)?)
}

/// Zeroes `len_bytes` from `offset_bytes` on a block device (BLKZEROOUT): the device offloads
/// it (WRITE ZEROES, UNMAP) or the kernel writes zero pages itself.
pub(crate) fn block_device_zero_out(file: &File, offset_bytes: u64, len_bytes: u64) -> io::Result<()> {
    // SAFETY: BLKZEROOUT reads exactly `u64 range[2]` (start, length) through its pointer
    // argument and writes nothing back; `Setter<_, [u64; 2]>` owns such an array for the call.
    // `file` is a valid open descriptor for the whole call.
    unsafe { ioctl(file, Setter::<BLKZEROOUT, [u64; 2]>::new([offset_bytes, len_bytes])) }?;
    Ok(())
}

/// Zeroes `len_bytes` from `offset_bytes` of a regular file with
/// `fallocate(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)`: no data moves and the file never
/// grows. EOPNOTSUPP when the filesystem (or this file's layout) cannot do it.
pub(crate) fn file_zero_range(file: &File, offset_bytes: u64, len_bytes: u64) -> io::Result<()> {
    Ok(rustix::fs::fallocate(file, FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE, offset_bytes, len_bytes)?)
}

/// Punches a hole of `len_bytes` from `offset_bytes` in a regular file with
/// `fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)`: the range reads as zeroes and its
/// blocks are freed. EOPNOTSUPP when the filesystem cannot.
pub(crate) fn file_punch_hole(file: &File, offset_bytes: u64, len_bytes: u64) -> io::Result<()> {
    Ok(rustix::fs::fallocate(file, FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE, offset_bytes, len_bytes)?)
}

/// The byte ranges of `start_bytes..end_bytes` in a regular file that hold data, by
/// `lseek(SEEK_DATA)` and `lseek(SEEK_HOLE)`. A filesystem without holes reports everything
/// as data. Only the returned offsets matter: the file position is never used for I/O here.
pub(crate) fn file_data_ranges(file: &File, start_bytes: u64, end_bytes: u64) -> io::Result<Vec<Range<u64>>> {
    let mut ranges = Vec::new();
    let mut at = start_bytes;
    while at < end_bytes {
        let data = match rustix::fs::seek(file, SeekFrom::Data(at)) {
            Ok(data) => data,
            // ENXIO: no data from `at` to the end of the file.
            Err(Errno::NXIO) => break,
            Err(error) => return Err(error.into()),
        };
        if data >= end_bytes {
            break;
        }
        let hole = rustix::fs::seek(file, SeekFrom::Hole(data))?;
        assert!(hole > data, "SEEK_HOLE from data at {data} gave {hole}");
        ranges.push(data..hole.min(end_bytes));
        at = hole;
    }
    Ok(ranges)
}

/// Whether `error` says that an operation is not supported here.
pub(crate) fn is_unsupported(error: &io::Error) -> bool {
    matches!(Errno::from_io_error(error), Some(Errno::OPNOTSUPP | Errno::NOSYS))
}

/// What direct I/O on a file requires, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DirectIoAlignment {
    /// Alignment of file offsets and transfer lengths.
    pub(crate) offset_bytes: u64,
    /// Alignment of user memory.
    pub(crate) memory_bytes: u64,
}

/// The direct-I/O alignment of an open regular file: `statx(STATX_DIOALIGN)` where the kernel
/// (6.1+) and filesystem report it, else a probe read of 512 bytes, then 4096 bytes, at offset
/// 0 into a page-aligned buffer (the first accepted size wins; memory is then assumed to need
/// the same alignment). `Ok(None)`: the filesystem does not support direct I/O on this file.
pub(crate) fn file_direct_io_alignment(file: &File) -> io::Result<Option<DirectIoAlignment>> {
    match rustix::fs::statx(file, "", AtFlags::EMPTY_PATH, StatxFlags::DIOALIGN) {
        Ok(stat) if StatxFlags::from_bits_retain(stat.stx_mask).contains(StatxFlags::DIOALIGN) => {
            if stat.stx_dio_offset_align == 0 {
                return Ok(None);
            }
            return Ok(Some(DirectIoAlignment {
                offset_bytes: u64::from(stat.stx_dio_offset_align),
                memory_bytes: u64::from(stat.stx_dio_mem_align.max(1)),
            }));
        }
        Ok(_) | Err(Errno::NOSYS | Errno::INVAL | Errno::PERM) => {}
        Err(error) => return Err(error.into()),
    }
    probe_direct_io_alignment(file)
}

/// The probe half of [`file_direct_io_alignment`].
fn probe_direct_io_alignment(file: &File) -> io::Result<Option<DirectIoAlignment>> {
    const PROBE_SIZES: [usize; 2] = [512, 4096];
    let mut buf = AlignedBuf::new(4096, 4096);
    for size in PROBE_SIZES {
        loop {
            match rustix::io::pread(file, &mut buf.as_mut_slice()[..size], 0) {
                // A short or empty read (a small or empty file) still proves the alignment.
                Ok(_) => {
                    let bytes = size as u64;
                    return Ok(Some(DirectIoAlignment { offset_bytes: bytes, memory_bytes: bytes }));
                }
                Err(Errno::INTR) => continue,
                Err(Errno::INVAL) => break,
                Err(error) => return Err(error.into()),
            }
        }
    }
    Ok(None)
}

/// Whether the filesystem holding `file` implements `FALLOC_FL_ZERO_RANGE` (decided by its
/// type; a file that still refuses it is zeroed by plain writes).
pub(crate) fn filesystem_zeroes_ranges(file: &File) -> bool {
    rustix::fs::fstatfs(file).is_ok_and(|stat| {
        matches!(magic(f_type(&stat)), EXT4_MAGIC | XFS_MAGIC | BTRFS_MAGIC | F2FS_MAGIC | BCACHEFS_MAGIC)
    })
}

const EXT4_MAGIC: u32 = 0xef53;
const XFS_MAGIC: u32 = 0x5846_5342;
const BTRFS_MAGIC: u32 = 0x9123_683e;
const F2FS_MAGIC: u32 = 0xf2f5_2010;
const BCACHEFS_MAGIC: u32 = 0xca45_1a4e;
const TMPFS_MAGIC: u32 = 0x0102_1994;
const RAMFS_MAGIC: u32 = 0x8584_58f6;
const NFS_MAGIC: u32 = 0x6969;
const FUSE_MAGIC: u32 = 0x6573_5546;
const OVERLAYFS_MAGIC: u32 = 0x794c_7630;
const ZFS_MAGIC: u32 = 0x2fc1_2fc1;
const PROC_MAGIC: u32 = 0x9fa0;
const SYSFS_MAGIC: u32 = 0x6265_6572;

/// `f_type` widened to i64: its C type differs between architectures (a long on x86_64, an
/// unsigned int on s390x).
#[allow(clippy::unnecessary_cast)]
fn f_type(stat: &rustix::fs::StatFs) -> i64 {
    stat.f_type as i64
}

/// The low 32 bits of `f_type`: the kernel's magic numbers are 32-bit, but some C libraries
/// sign-extend them.
fn magic(f_type: i64) -> u32 {
    f_type as u32
}

/// Filesystems whose files' sizes say nothing of their contents.
const PSEUDO_FILESYSTEMS: [(u32, &str); 11] = [
    (PROC_MAGIC, "proc"),
    (SYSFS_MAGIC, "sysfs"),
    (0x6462_6720, "debugfs"),
    (0x7472_6163, "tracefs"),
    (0x7363_6673, "securityfs"),
    (0x6265_6570, "configfs"),
    (0x6367_7270, "cgroup2"),
    (0x0027_e0eb, "cgroup"),
    (0xde5e_81e4, "efivarfs"),
    (0x6165_676c, "pstore"),
    (0xcafe_4a11, "bpf"),
];

/// The name of the pseudo filesystem (proc, sysfs, …) the open file `file` lies on, if it
/// does: its files' sizes are not their contents.
pub(crate) fn pseudo_filesystem(file: &std::fs::File) -> Option<&'static str> {
    pseudo_filesystem_of(&rustix::fs::fstatfs(file).ok()?)
}

/// The name of the pseudo filesystem (proc, sysfs, debugfs, cgroup, …) the file at `path`
/// lies on, if it does: its files' sizes are not their contents, and writing one sets
/// something in the kernel. Asked before opening, so that a proc file is named as such, not
/// as a filesystem without O_DIRECT.
pub fn pseudo_filesystem_at(path: &Path) -> Option<&'static str> {
    pseudo_filesystem_of(&rustix::fs::statfs(path).ok()?)
}

fn pseudo_filesystem_of(stat: &rustix::fs::StatFs) -> Option<&'static str> {
    let magic = magic(f_type(stat));
    PSEUDO_FILESYSTEMS.iter().find(|(m, _)| *m == magic).map(|(_, name)| *name)
}

/// The name of the filesystem holding `path` (or, when `path` does not exist, its directory),
/// for messages: "tmpfs", or the magic number.
pub(crate) fn filesystem_name(path: &Path) -> String {
    let stat = rustix::fs::statfs(path).or_else(|error| match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => rustix::fs::statfs(parent),
        _ => Err(error),
    });
    let Ok(stat) = stat else { return "unknown".into() };
    let name = match magic(f_type(&stat)) {
        EXT4_MAGIC => "ext2/3/4",
        XFS_MAGIC => "xfs",
        BTRFS_MAGIC => "btrfs",
        F2FS_MAGIC => "f2fs",
        BCACHEFS_MAGIC => "bcachefs",
        TMPFS_MAGIC => "tmpfs",
        RAMFS_MAGIC => "ramfs",
        NFS_MAGIC => "nfs",
        FUSE_MAGIC => "fuse",
        OVERLAYFS_MAGIC => "overlayfs",
        ZFS_MAGIC => "zfs",
        PROC_MAGIC => "proc",
        SYSFS_MAGIC => "sysfs",
        other => return format!("type {other:#x}"),
    };
    name.into()
}

/// Whether the block device `rdev` is zoned, from `/sys/dev/block/MAJOR:MINOR/queue/zoned`
/// ("none" or absent: not zoned).
pub(crate) fn block_device_is_zoned(rdev: u64) -> bool {
    let sysfs = format!("/sys/dev/block/{}:{}/queue/zoned", rustix::fs::major(rdev), rustix::fs::minor(rdev));
    std::fs::read_to_string(sysfs).is_ok_and(|model| !matches!(model.trim(), "" | "none"))
}

/// The zone length in sectors of the zoned block device `rdev`, from
/// `/sys/dev/block/MAJOR:MINOR/queue/chunk_sectors` (the kernel's zone size for zoned
/// devices); 0 when absent or unreadable (the engine then cuts no sub-job at zone ends).
pub(crate) fn block_device_zone_sectors(rdev: u64) -> u64 {
    let sysfs = format!("/sys/dev/block/{}:{}/queue/chunk_sectors", rustix::fs::major(rdev), rustix::fs::minor(rdev));
    std::fs::read_to_string(sysfs).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        // From <linux/fs.h> on x86_64 and arm64 (generic ioctl encoding, 64-bit size_t).
        #[cfg(all(any(target_arch = "x86_64", target_arch = "aarch64"), target_pointer_width = "64"))]
        {
            assert_eq!(BLKGETSIZE64 as u64, 0x8008_1272);
            assert_eq!(BLKZEROOUT as u64, 0x127f);
            assert_eq!(BLKROGET as u64, 0x125e);
        }
        assert_eq!(BLKZEROOUT as u64 & 0xffff, 0x127f);
        assert_eq!(BLKGETSIZE64 as u64 & 0xffff, 0x1272);
    }

    #[test]
    fn the_probe_finds_an_alignment_statx_agrees_with() {
        use std::os::unix::fs::OpenOptionsExt;
        // /var/tmp: a disk filesystem with O_DIRECT on the machines this runs on.
        let path = std::path::PathBuf::from(format!("/var/tmp/kcopyd-os-probe-{}", std::process::id()));
        for len_bytes in [0, 8192] {
            std::fs::write(&path, vec![7u8; len_bytes]).unwrap();
            let file = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
                .open(&path)
                .unwrap();
            let probed = probe_direct_io_alignment(&file).unwrap().expect("O_DIRECT works here");
            assert!([512, 4096].contains(&probed.offset_bytes), "{probed:?}");
            let reported = file_direct_io_alignment(&file).unwrap().expect("O_DIRECT works here");
            assert!(probed.offset_bytes >= reported.offset_bytes, "{probed:?} vs {reported:?}");
        }
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn magic_numbers_ignore_sign_extension() {
        assert_eq!(magic(0x8584_58f6_u32 as i32 as i64), RAMFS_MAGIC);
        assert_eq!(magic(i64::from(TMPFS_MAGIC)), TMPFS_MAGIC);
    }
}
