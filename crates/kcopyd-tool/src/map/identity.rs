//! What a map records of each device, so that a later run can tell whether the device it
//! opens is the one the map was written for.
//!
//! ```text
//!  regular file  file dev=2049 ino=131 size=8589934592 born=1765080000.123456789
//!  block device  block rdev=8:16 size=1000204886016 wwid=naa.5000c500a1b2c3d4
//!  NBD export    nbd size=1073741824 flags=read-only:0,multi-conn:1,trim:1 block=512
//!  sim: disk     sim size=1073741824                (lives for one run: never resumed)
//! ```
//!
//! A file's inode number alone is not enough: a deleted file's inode is soon given to the
//! next file created there, of the same size if `copy` created it. Its birth time (`statx`
//! `STATX_BTIME`, where the filesystem keeps one) tells the two apart.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use kcopyd_core::SECTOR_SIZE;
use kcopyd_os::DeviceKind;
use rustix::fs::{AtFlags, CWD, StatxFlags};

use super::DeviceRefusal;
use crate::address::Backend;
use crate::open::Opened;

/// The identity of `opened` as the map records it (one line's text, no newline), and whether
/// the device outlives this run (a `sim:` disk does not).
///
/// # Errors
/// The file was replaced while it was being opened, or cannot be looked at.
pub fn of(opened: &Opened) -> Result<(String, bool), DeviceRefusal> {
    let Some(facts) = &opened.os else {
        let geometry = opened.device.geometry();
        let len_bytes = geometry.len_sectors * SECTOR_SIZE as u64;
        return Ok(match &opened.arg.backend {
            Backend::Nbd(_) => {
                let export = opened.export.as_deref().unwrap_or("size=unknown");
                (format!("nbd {export} block={}", geometry.logical_block_size), true)
            }
            _ => (format!("sim size={len_bytes}"), false),
        });
    };
    let id = opened.device.id();
    match facts.kind {
        DeviceKind::File => {
            let born = birth(&facts.path, (id.major, id.minor))?;
            Ok((format!("file dev={} ino={} size={} born={born}", id.major, id.minor, facts.len_bytes), true))
        }
        DeviceKind::BlockDevice => {
            let (major, minor) = (rustix::fs::major(id.major), rustix::fs::minor(id.major));
            let mut text = format!("block rdev={major}:{minor} size={}", facts.len_bytes);
            if let Some(stable) = stable_block_id(major, minor) {
                text.push(' ');
                text.push_str(&stable);
            }
            Ok((text, true))
        }
    }
}

/// The birth time of the file at `path` (`SECONDS.NANOSECONDS`), or `unknown` where the
/// filesystem keeps none; checks that `path` is still the file `key` (device, inode).
fn birth(path: &Path, key: (u64, u64)) -> Result<String, DeviceRefusal> {
    let statx = rustix::fs::statx(CWD, path, AtFlags::empty(), StatxFlags::BASIC_STATS | StatxFlags::BTIME)
        .map_err(DeviceRefusal::Statx)?;
    let dev = rustix::fs::makedev(statx.stx_dev_major, statx.stx_dev_minor);
    let metadata = std::fs::metadata(path).map_err(DeviceRefusal::Stat)?;
    if (dev, statx.stx_ino) != key || (metadata.dev(), metadata.ino()) != key {
        return Err(DeviceRefusal::Replaced);
    }
    if statx.stx_mask & StatxFlags::BTIME.bits() == 0 {
        return Ok("unknown".into());
    }
    Ok(format!("{}.{:09}", statx.stx_btime.tv_sec, statx.stx_btime.tv_nsec))
}

/// A stable name of the block device `major:minor` from sysfs, where it has one: the disk's
/// WWID or serial number, a device-mapper UUID, a loop device's backing file and offset, a
/// partition's number and start (and its disk's).
fn stable_block_id(major: u32, minor: u32) -> Option<String> {
    let base = Path::new("/sys/dev/block").join(format!("{major}:{minor}"));
    let read = |name: &str| -> Option<String> {
        let text = std::fs::read_to_string(base.join(name)).ok()?;
        let text = text.trim();
        (!text.is_empty()).then(|| text.replace(['\n', ' '], "_"))
    };
    let mut parts = Vec::new();
    for (key, file) in [
        ("wwid", "device/wwid"),
        ("serial", "device/serial"),
        ("dm-uuid", "dm/uuid"),
        ("loop", "loop/backing_file"),
        ("loop-offset", "loop/offset"),
        ("partition", "partition"),
        ("start", "start"),
        ("disk-wwid", "../device/wwid"),
        ("disk-serial", "../device/serial"),
    ] {
        if let Some(value) = read(file) {
            parts.push(format!("{key}={value}"));
        }
    }
    (!parts.is_empty()).then(|| parts.join(" "))
}
