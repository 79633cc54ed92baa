//! Where a file's or block device's bytes really live, through every name the kernel gives
//! them, and which of them are mounted read-write.
//!
//! ```text
//!  /dev/loop3p1 ─ partition: start 2048 sectors ─► /dev/loop3 at 1 MiB
//!  /dev/loop3   ─ loop device: backing file, offset ─► disk.img (dev 8:1, inode 1234) at 0
//!  disk.img     ─────────────────────────────────────► itself at 0
//!  so byte 0 of /dev/loop3p1 is byte 1 MiB of disk.img: Storage { File { 2049, 1234 }, 1 MiB }
//! ```
//!
//! Everything comes from sysfs (`/sys/dev/block/MAJ:MIN/partition` and `start`,
//! `/sys/dev/block/MAJ:MIN/loop/backing_file` and `offset`) and `/proc/self/mountinfo`. A name
//! that cannot be followed (sysfs missing, a deleted backing file, device-mapper) stands for
//! itself: the answer is then never wrong about two names being the same storage, only blind
//! to a sharing it cannot see.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Loops and partitions followed at most (a loop over a partition of a loop ...).
const DEPTH_MAX: usize = 8;

/// The storage underneath: a regular file or a whole block device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StorageId {
    /// A regular file: its filesystem's device number and its inode number.
    File {
        /// `st_dev`.
        dev: u64,
        /// `st_ino`.
        inode: u64,
    },
    /// A whole block device (or one whose layers could not be followed), by device number.
    BlockDevice {
        /// `st_rdev`.
        rdev: u64,
    },
}

/// Where a device's byte 0 lies on the storage underneath.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Storage {
    /// The file or whole block device holding the bytes.
    pub id: StorageId,
    /// Bytes from the start of [`Storage::id`] to the device's byte 0.
    pub offset_bytes: u64,
    /// The layers followed, outermost first, for messages: `partition of /dev/loop3 at
    /// 1048576 bytes`, `loop device over /tmp/disk.img at 0 bytes`. Empty for a plain file or
    /// whole disk.
    pub layers: Vec<String>,
}

impl Storage {
    /// The storage of a regular file: itself.
    pub fn of_file(dev: u64, inode: u64) -> Storage {
        Storage { id: StorageId::File { dev, inode }, offset_bytes: 0, layers: Vec::new() }
    }

    /// The storage of the block device `rdev`, following partitions and loop devices.
    pub fn of_block_device(rdev: u64) -> Storage {
        let mut storage = Storage { id: StorageId::BlockDevice { rdev }, offset_bytes: 0, layers: Vec::new() };
        for _ in 0..DEPTH_MAX {
            let StorageId::BlockDevice { rdev } = storage.id else { break };
            match layer_below(rdev) {
                Some(Below { id, offset_bytes, layer }) => {
                    storage.id = id;
                    storage.offset_bytes = storage.offset_bytes.saturating_add(offset_bytes);
                    storage.layers.push(layer);
                }
                None => break,
            }
        }
        storage
    }

    /// Whether `len_bytes` from byte `offset_bytes` of this storage's device share a byte with
    /// `other_len_bytes` from `other_offset_bytes` of `other`'s.
    pub fn overlaps(
        &self,
        offset_bytes: u64,
        len_bytes: u64,
        other: &Storage,
        other_offset_bytes: u64,
        other_len_bytes: u64,
    ) -> bool {
        let start = self.offset_bytes.saturating_add(offset_bytes);
        let other_start = other.offset_bytes.saturating_add(other_offset_bytes);
        self.id == other.id
            && len_bytes > 0
            && other_len_bytes > 0
            && start < other_start.saturating_add(other_len_bytes)
            && other_start < start.saturating_add(len_bytes)
    }
}

/// One layer down from a block device.
struct Below {
    id: StorageId,
    offset_bytes: u64,
    layer: String,
}

fn sysfs_dir(rdev: u64) -> PathBuf {
    PathBuf::from(format!("/sys/dev/block/{}:{}", rustix::fs::major(rdev), rustix::fs::minor(rdev)))
}

fn read_trimmed(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok().map(|text| text.trim_end_matches('\n').to_owned())
}

fn read_number(path: &Path) -> Option<u64> {
    read_trimmed(path)?.trim().parse().ok()
}

/// `MAJ:MIN` as sysfs and mountinfo write it.
fn parse_dev(text: &str) -> Option<u64> {
    let (major, minor) = text.trim().split_once(':')?;
    Some(rustix::fs::makedev(major.parse().ok()?, minor.parse().ok()?))
}

/// The layer below `rdev`: the whole disk of a partition, or the backing file (or device) of
/// a loop device.
fn layer_below(rdev: u64) -> Option<Below> {
    let dir = sysfs_dir(rdev);
    if dir.join("partition").exists() {
        // `start` is in 512-byte sectors whatever the logical block size.
        let start_sectors = read_number(&dir.join("start"))?;
        let whole = fs::canonicalize(&dir).ok()?.parent()?.to_path_buf();
        let whole_rdev = parse_dev(&read_trimmed(&whole.join("dev"))?)?;
        let name = whole.file_name()?.to_string_lossy().into_owned();
        let offset_bytes = start_sectors.checked_mul(512)?;
        return Some(Below {
            id: StorageId::BlockDevice { rdev: whole_rdev },
            offset_bytes,
            layer: format!("partition of /dev/{name} at {offset_bytes} bytes"),
        });
    }
    let backing = read_trimmed(&dir.join("loop/backing_file"))?;
    // A deleted backing file reads "PATH (deleted)": no name reaches it any more.
    let metadata = fs::metadata(&backing).ok()?;
    let offset_bytes = read_number(&dir.join("loop/offset")).unwrap_or(0);
    let id = if metadata.file_type().is_block_device() {
        StorageId::BlockDevice { rdev: metadata.rdev() }
    } else if metadata.is_file() {
        StorageId::File { dev: metadata.dev(), inode: metadata.ino() }
    } else {
        return None;
    };
    Some(Below { id, offset_bytes, layer: format!("loop device over {backing} at {offset_bytes} bytes") })
}

/// A block device mounted read-write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mounted {
    /// The device as mountinfo names it (`/dev/loop3`).
    pub device: String,
    /// Where it is mounted.
    pub mount_point: String,
    /// Its storage.
    pub storage: Storage,
    /// Its length in bytes (sysfs `size`).
    pub len_bytes: u64,
}

/// Every block device mounted read-write, from `/proc/self/mountinfo` (empty where it cannot
/// be read). Filesystems without a block device of their own (device number 0:N: tmpfs,
/// overlayfs, also btrfs) are left out.
pub fn mounted_read_write() -> Vec<Mounted> {
    let Ok(mountinfo) = fs::read_to_string("/proc/self/mountinfo") else { return Vec::new() };
    mountinfo.lines().filter_map(parse_mountinfo_line).collect()
}

/// One line: `ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - TYPE SOURCE SUPER`.
fn parse_mountinfo_line(line: &str) -> Option<Mounted> {
    let fields: Vec<&str> = line.split(' ').collect();
    let rdev = parse_dev(fields.get(2)?)?;
    if rustix::fs::major(rdev) == 0 {
        return None;
    }
    let mount_options = fields.get(5)?;
    if !mount_options.split(',').any(|option| option == "rw") {
        return None;
    }
    let separator = fields.iter().position(|field| *field == "-")?;
    let device = unescape(fields.get(separator + 2)?);
    let len_bytes = read_number(&sysfs_dir(rdev).join("size"))?.checked_mul(512)?;
    Some(Mounted { device, mount_point: unescape(fields.get(4)?), storage: Storage::of_block_device(rdev), len_bytes })
}

/// mountinfo writes space, tab, newline and backslash as `\040`, `\011`, `\012`, `\134`.
fn unescape(field: &str) -> String {
    field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_on_the_same_storage_overlap_by_their_real_bytes() {
        let file = Storage::of_file(1, 2);
        let partition = Storage { id: StorageId::File { dev: 1, inode: 2 }, offset_bytes: 1 << 20, layers: vec![] };
        // Byte 0 of the partition is byte 1 MiB of the file.
        assert!(partition.overlaps(0, 4096, &file, (1 << 20) + 4095, 1));
        assert!(!partition.overlaps(0, 4096, &file, (1 << 20) + 4096, 1));
        assert!(!partition.overlaps(0, 4096, &file, 0, 1 << 20));
        assert!(!partition.overlaps(0, 0, &file, 0, u64::MAX), "an empty range overlaps nothing");
        assert!(!Storage::of_file(1, 3).overlaps(0, 10, &file, 0, 10), "another inode");
        assert!(!Storage::of_block_device(1).overlaps(0, 10, &Storage::of_block_device(2), 0, 10));
    }

    #[test]
    fn mountinfo_lines_give_read_write_block_devices_only() {
        assert_eq!(parse_mountinfo_line("22 27 0:21 / /proc rw,relatime - proc proc rw"), None);
        assert_eq!(parse_dev("7:3"), Some(rustix::fs::makedev(7, 3)));
        assert_eq!(unescape("/mnt/a\\040b"), "/mnt/a b");
        let read_only = "36 27 7:0 / /mnt ro,relatime shared:1 - ext4 /dev/loop0 ro";
        assert_eq!(parse_mountinfo_line(read_only), None);
    }
}
