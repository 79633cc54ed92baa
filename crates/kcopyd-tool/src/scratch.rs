//! The scratch range a calibration may overwrite: a file created for it, or a range of an
//! existing device named by the caller, opened O_DIRECT and checked.
//!
//! ```text
//!  path missing ─► create a file of size_bytes (removed when dropped, unless kept)
//!  path exists  ─► scratch_length_bytes from scratch_offset_bytes (required: nothing of an
//!                  existing device is overwritten unless named)
//!  check: at least SCRATCH_BYTES_MIN, aligned to the logical block, inside the device
//! ```

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kcopyd_core::{BlockDevice, SECTOR_SIZE};
use kcopyd_os::{FileKey, OpenError, OpenOptions, OsDevice};
use kcopyd_sim::explore::calibrate::{QUEUE_DEPTH_MAX, SCRATCH_BYTES_MIN};
use thiserror::Error;

use crate::open::{CreatedHook, remove_created};

/// Why a scratch range was refused; nothing was written, and a file created here is removed.
#[derive(Debug, Error)]
pub enum ScratchError {
    /// The path exists, and no scratch length names what may be overwritten.
    #[error("'{}' exists: calibration writes over what it measures; name the bytes it may overwrite", path.display())]
    Exists {
        /// The path.
        path: PathBuf,
    },
    /// A scratch offset or length was given for a path that does not exist.
    #[error("'{}': a scratch offset or length applies to an existing device", path.display())]
    RangeOfNew {
        /// The path.
        path: PathBuf,
    },
    /// The size of a new file is not whole sectors.
    #[error("size of {size_bytes} bytes: not a multiple of 512 bytes")]
    SizeNotSectors {
        /// The size.
        size_bytes: u64,
    },
    /// The device could not be opened (or the file created).
    #[error("'{}': {source}", path.display())]
    Open {
        /// The path.
        path: PathBuf,
        /// The device layer's error.
        #[source]
        source: OpenError,
    },
    /// The range is smaller than a calibration needs.
    #[error("scratch range of {len_bytes} bytes: less than {SCRATCH_BYTES_MIN}")]
    TooSmall {
        /// Whether the file was created here (its size was given).
        created: bool,
        /// The range's length.
        len_bytes: u64,
    },
    /// The range is not aligned to the device's logical block.
    #[error("scratch offset {offset_bytes}: the scratch range must be aligned to the {block_bytes}-byte logical block of '{}'", path.display())]
    Misaligned {
        /// The path.
        path: PathBuf,
        /// Where the range starts.
        offset_bytes: u64,
        /// The logical block.
        block_bytes: u64,
    },
    /// The range runs past the device's end.
    #[error("scratch range of {len_bytes} bytes: the scratch range runs past the end of '{}' at {device_bytes} bytes", path.display())]
    PastEnd {
        /// The path.
        path: PathBuf,
        /// Whether the file was created here.
        created: bool,
        /// The range's length.
        len_bytes: u64,
        /// The device's length.
        device_bytes: u64,
    },
}

/// The range calibration may overwrite, and the file it created, removed when dropped
/// unless kept.
#[derive(Debug)]
pub struct Scratch {
    /// The device.
    pub device: Arc<OsDevice>,
    /// Where the range starts.
    pub offset_bytes: u64,
    /// Its length.
    pub len_bytes: u64,
    /// The file created for it, if any, and which file it is (removed only while its path
    /// names it).
    created: Option<(PathBuf, FileKey)>,
    keep: bool,
    hook: Option<Arc<dyn CreatedHook>>,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let (Some((path, id)), false) = (&self.created, self.keep) {
            remove_created(path, Some(*id));
            if let Some(hook) = &self.hook {
                hook.forget(std::slice::from_ref(path));
            }
        }
    }
}

impl Scratch {
    /// Opens the scratch range: a new file of `size_bytes` at `path` if nothing is there
    /// (kept when dropped if `keep`; `hook` is told of it otherwise), else
    /// `scratch_length_bytes` of the existing device from `scratch_offset_bytes`.
    ///
    /// # Errors
    /// An existing device without a scratch length, a range off the device or misaligned, a
    /// size too small, or a failed open.
    pub fn open(
        path: &Path,
        size_bytes: u64,
        scratch_offset_bytes: u64,
        scratch_length_bytes: Option<u64>,
        keep: bool,
        hook: Option<Arc<dyn CreatedHook>>,
    ) -> Result<Scratch, ScratchError> {
        let open_error = |source| ScratchError::Open { path: path.to_path_buf(), source };
        let options = OpenOptions { write: true, queue_depth: QUEUE_DEPTH_MAX * 2, ..OpenOptions::default() };
        if fs::symlink_metadata(path).is_ok() {
            let len_bytes = scratch_length_bytes.ok_or_else(|| ScratchError::Exists { path: path.to_path_buf() })?;
            let device = OsDevice::open(path, &options).map_err(open_error)?;
            let scratch = Scratch {
                device: Arc::new(device),
                offset_bytes: scratch_offset_bytes,
                len_bytes,
                created: None,
                keep,
                hook: None,
            };
            scratch.check(path)?;
            return Ok(scratch);
        }
        if scratch_length_bytes.is_some() || scratch_offset_bytes != 0 {
            return Err(ScratchError::RangeOfNew { path: path.to_path_buf() });
        }
        if size_bytes % SECTOR_SIZE as u64 != 0 {
            return Err(ScratchError::SizeNotSectors { size_bytes });
        }
        let options = OpenOptions { create_len: Some(size_bytes), ..options };
        // Removed also if the caller quits at once (unless kept).
        let hook = hook.filter(|_| !keep);
        let creating = hook.as_ref().map(|hook| hook.creating(path));
        let opened = OsDevice::open(path, &options);
        drop(creating);
        // Created (or half-created) here: removed on every way out unless kept.
        let device = match opened {
            Ok(device) => device,
            // Another program created it first: its file, left alone.
            Err(source @ OpenError::CreatedElsewhere { .. }) => {
                if let Some(hook) = &hook {
                    hook.forget(&[path.to_path_buf()]);
                }
                return Err(open_error(source));
            }
            Err(source) => {
                remove_created(path, None);
                if let Some(hook) = &hook {
                    hook.forget(&[path.to_path_buf()]);
                }
                return Err(open_error(source));
            }
        };
        let id = device.id();
        if let Some(hook) = &hook {
            hook.made(path, (id.major, id.minor));
        }
        let created = Some((path.to_path_buf(), (id.major, id.minor)));
        let scratch = Scratch { device: Arc::new(device), offset_bytes: 0, len_bytes: size_bytes, created, keep, hook };
        scratch.check(path)?;
        Ok(scratch)
    }

    fn check(&self, path: &Path) -> Result<(), ScratchError> {
        let geometry = self.device.geometry();
        let block_bytes = u64::from(geometry.logical_block_size);
        let device_bytes = geometry.len_sectors * SECTOR_SIZE as u64;
        let (created, len_bytes, offset_bytes) = (self.created.is_some(), self.len_bytes, self.offset_bytes);
        if len_bytes < SCRATCH_BYTES_MIN {
            return Err(ScratchError::TooSmall { created, len_bytes });
        }
        if offset_bytes % block_bytes != 0 || len_bytes % block_bytes != 0 {
            return Err(ScratchError::Misaligned { path: path.to_path_buf(), offset_bytes, block_bytes });
        }
        if offset_bytes.checked_add(len_bytes).is_none_or(|end| end > device_bytes) {
            return Err(ScratchError::PastEnd { path: path.to_path_buf(), created, len_bytes, device_bytes });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_existing_file_needs_a_range_a_new_one_none_and_a_created_one_goes_unless_kept_or_replaced() {
        let dir = std::env::temp_dir().join(format!("kcopyd-tool-scratch-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("scratch.img");
        let refused = Scratch::open(&path, SCRATCH_BYTES_MIN, 0, Some(SCRATCH_BYTES_MIN), false, None);
        assert!(matches!(refused, Err(ScratchError::RangeOfNew { .. })), "{refused:?}");
        let small = Scratch::open(&path, SCRATCH_BYTES_MIN - 4096, 0, None, false, None);
        assert!(matches!(small, Err(ScratchError::TooSmall { created: true, .. })), "{small:?}");
        assert!(!path.exists(), "a refused scratch file stays behind");
        match Scratch::open(&path, SCRATCH_BYTES_MIN, 0, None, false, None) {
            Ok(scratch) => {
                assert!(matches!(Scratch::open(&path, 0, 0, None, false, None), Err(ScratchError::Exists { .. })));
                drop(scratch);
                assert!(!path.exists(), "a created scratch file stays behind");
                // A file renamed over the scratch file's name meanwhile is someone else's.
                let scratch = Scratch::open(&path, SCRATCH_BYTES_MIN, 0, None, false, None).unwrap();
                let other = dir.join("other.img");
                fs::write(&other, b"precious").unwrap();
                fs::rename(&other, &path).unwrap();
                drop(scratch);
                assert_eq!(fs::read(&path).unwrap(), b"precious", "removed by name");
                fs::remove_file(&path).unwrap();
            }
            // O_DIRECT is not on every filesystem (tmpfs): nothing more to check here.
            Err(ScratchError::Open { source, .. }) => eprintln!("skipped: O_DIRECT open refused here ({source})"),
            Err(other) => panic!("{other}"),
        }
        let _ = fs::remove_dir_all(&dir);
    }
}
