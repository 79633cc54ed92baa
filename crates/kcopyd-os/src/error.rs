//! Why a file or block device could not be opened ([`OpenError`]), and why a request was
//! refused before any I/O ([`RequestError`]).

use std::io;
use std::path::{Path, PathBuf};

use kcopyd_core::RequestRefused;
use rustix::io::Errno;
use thiserror::Error;

/// Why [`OsDevice::open`](crate::OsDevice::open) refused a path. Every variant names the path;
/// those caused by a system call carry its error as the `source`.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The options contradict each other or are out of bounds; nothing was opened.
    #[error("{}: invalid open options: {reason}", .path.display())]
    InvalidOptions {
        /// The path given.
        path: PathBuf,
        /// What is wrong with the options.
        reason: String,
    },
    /// The path does not exist (and `create_len` was not given).
    #[error("{}: no such file or device", .path.display())]
    NotFound {
        /// The path given.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// Permission bits, an immutable file or a security module refused the access asked for.
    #[error("{}: permission denied", .path.display())]
    PermissionDenied {
        /// The path given.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The file lies on a read-only filesystem, or the block device is read-only (refused
    /// at open, or marked read-only: BLKROGET), and write access was asked for.
    #[error("{}: read-only filesystem or device, cannot open it for writing", .path.display())]
    ReadOnly {
        /// The path given.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The block device is mounted, held by device-mapper, md or swap, or opened exclusively by
    /// another program: writing to it would corrupt what uses it.
    #[error("{}: device is busy (mounted or opened exclusively elsewhere); refusing to write to it", .path.display())]
    Busy {
        /// The path given.
        path: PathBuf,
        /// What the system said (EBUSY).
        #[source]
        source: io::Error,
    },
    /// The filesystem refuses O_DIRECT (tmpfs before Linux 6.6, ramfs, some FUSE mounts).
    #[error(
        "{}: the {filesystem} filesystem does not support direct I/O (O_DIRECT); \
         open it in buffered mode instead (OpenOptions {{ buffered: true, .. }})",
        .path.display()
    )]
    DirectIoUnsupported {
        /// The path given.
        path: PathBuf,
        /// The filesystem's name (`tmpfs`) or magic number.
        filesystem: String,
        /// What the system said (EINVAL).
        #[source]
        source: io::Error,
    },
    /// The path is a directory, character device, FIFO or socket.
    #[error("{}: is a {kind}, not a regular file or block device", .path.display())]
    NotABlockDeviceOrFile {
        /// The path given.
        path: PathBuf,
        /// What it is instead.
        kind: &'static str,
    },
    /// A regular file of a filesystem whose files' sizes say nothing of their contents
    /// (proc, sysfs, debugfs and their kind: a /proc file says 0 bytes and holds more, a
    /// sysfs file says 4096 and holds less): a copy of the size it says would be wrong.
    #[error(
        "{}: a file of the {filesystem} filesystem, whose files do not hold the size they say: \
         not a device to copy from or to",
        .path.display()
    )]
    PseudoFile {
        /// The path given.
        path: PathBuf,
        /// The filesystem's name (`proc`).
        filesystem: &'static str,
    },
    /// The file was missing and was to be created here, but another program created it
    /// first (another kcopyd making the same target, say): it is that program's, and is
    /// neither opened nor removed.
    #[error("{}: another program created it while this one was creating it: left to that program", .path.display())]
    CreatedElsewhere {
        /// The path given.
        path: PathBuf,
    },
    /// Reading the path's metadata (stat) failed for another reason.
    #[error("{}: reading metadata", .path.display())]
    Metadata {
        /// The path given.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// Opening failed for another reason.
    #[error("{}: opening", .path.display())]
    Open {
        /// The path given.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The BLKGETSIZE64 ioctl (device size) failed.
    #[error("{}: reading the device size (BLKGETSIZE64)", .path.display())]
    DeviceSize {
        /// The path given.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The BLKROGET ioctl (read-only flag of a block device opened for writing) failed.
    #[error("{}: reading the read-only flag (BLKROGET)", .path.display())]
    ReadOnlyFlag {
        /// The path given.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The BLKSSZGET ioctl (logical block size) failed.
    #[error("{}: reading the logical block size (BLKSSZGET)", .path.display())]
    LogicalBlockSize {
        /// The path given.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The device's block size or the filesystem's direct-I/O alignment is not a power of two
    /// from 512 to 65536 bytes.
    #[error("{}: unsupported I/O alignment of {bytes} bytes (must be a power of two from 512 to 65536)", .path.display())]
    UnsupportedAlignment {
        /// The path given.
        path: PathBuf,
        /// The alignment the device or filesystem asks for.
        bytes: u64,
    },
    /// Finding the filesystem's direct-I/O alignment (statx, then a probe read) failed for a
    /// reason other than missing support.
    #[error("{}: finding the direct-I/O alignment (statx STATX_DIOALIGN, probe read)", .path.display())]
    DirectIoAlignment {
        /// The path given.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// Extending the target file to `create_len` failed.
    #[error("{}: extending the file to {len_bytes} bytes", .path.display())]
    Extend {
        /// The path given.
        path: PathBuf,
        /// The length asked for.
        len_bytes: u64,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// Setting up the io_uring of [`IoEngine::Uring`](crate::IoEngine::Uring) failed:
    /// `io_uring_setup` refused (EPERM where io_uring is disabled by
    /// `kernel.io_uring_disabled` or a seccomp filter, ENOSYS on kernels without it, ENOMEM
    /// past the locked-memory limit), or its eventfd or thread could not be made.
    #[error("{}: setting up io_uring", .path.display())]
    IoUringSetup {
        /// The path given.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The first I/O thread could not be started.
    #[error("{}: starting the I/O threads", .path.display())]
    Engine {
        /// The path given.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
}

impl OpenError {
    /// Whether this is [`OpenError::IoUringSetup`] because the kernel has no io_uring for us
    /// (EPERM: disabled; ENOSYS: missing), rather than a failure worth reporting as a bug.
    pub fn is_io_uring_unavailable(&self) -> bool {
        match self {
            OpenError::IoUringSetup { source, .. } => {
                matches!(Errno::from_io_error(source), Some(Errno::PERM | Errno::NOSYS))
            }
            _ => false,
        }
    }

    /// The path the error is about.
    pub fn path(&self) -> &Path {
        match self {
            OpenError::InvalidOptions { path, .. }
            | OpenError::NotFound { path, .. }
            | OpenError::PermissionDenied { path, .. }
            | OpenError::ReadOnly { path, .. }
            | OpenError::Busy { path, .. }
            | OpenError::DirectIoUnsupported { path, .. }
            | OpenError::NotABlockDeviceOrFile { path, .. }
            | OpenError::PseudoFile { path, .. }
            | OpenError::CreatedElsewhere { path }
            | OpenError::Metadata { path, .. }
            | OpenError::Open { path, .. }
            | OpenError::DeviceSize { path, .. }
            | OpenError::LogicalBlockSize { path, .. }
            | OpenError::ReadOnlyFlag { path, .. }
            | OpenError::UnsupportedAlignment { path, .. }
            | OpenError::DirectIoAlignment { path, .. }
            | OpenError::Extend { path, .. }
            | OpenError::IoUringSetup { path, .. }
            | OpenError::Engine { path, .. } => path,
        }
    }
}

/// Why an [`OsDevice`](crate::OsDevice) refused a request before any I/O. It travels inside
/// the `io::Error` the device trait returns (`error.get_ref()` downcasts to it); the error's
/// kind is [`RequestError::kind`]. Every variant names the device and the operation.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum RequestError {
    /// A write, write-zeroes or deallocate to a device opened read-only (`PermissionDenied`).
    #[error("{device}: {operation} refused: the device was opened read-only")]
    ReadOnly {
        /// The device's name (its path).
        device: String,
        /// The operation refused.
        operation: &'static str,
    },
    /// The request breaks the device's geometry: misaligned or past the end (`InvalidInput`,
    /// EINVAL, as the kernel refuses a misaligned O_DIRECT request).
    #[error("{device}: {operation} of sectors {:?} refused: {refused}", .refused.sectors())]
    Geometry {
        /// The device's name (its path).
        device: String,
        /// The operation refused.
        operation: &'static str,
        /// The rule broken, with the request and the device's block size or length.
        refused: RequestRefused,
    },
}

impl RequestError {
    /// The `io::ErrorKind` the refusal is returned as.
    pub fn kind(&self) -> io::ErrorKind {
        match self {
            RequestError::ReadOnly { .. } => io::ErrorKind::PermissionDenied,
            RequestError::Geometry { refused, .. } => refused.io_kind(),
        }
    }

    /// The `RequestError` inside an `io::Error` an `OsDevice` returned, if it is one.
    pub fn of(error: &io::Error) -> Option<&RequestError> {
        error.get_ref().and_then(|inner| inner.downcast_ref::<RequestError>())
    }

    /// As the device trait returns it: an `io::Error` of [`RequestError::kind`].
    pub(crate) fn into_io(self) -> io::Error {
        io::Error::new(self.kind(), self)
    }
}

/// What a failed stat or open means, by errno.
///
/// `direct` says whether the open asked for O_DIRECT: then EINVAL means the filesystem refuses
/// it (`filesystem` names the filesystem for the message). `fallback` builds the variant for
/// any other errno ([`OpenError::Open`] or [`OpenError::Metadata`]).
pub(crate) fn classify(
    path: &Path,
    source: io::Error,
    direct: bool,
    filesystem: impl FnOnce() -> String,
    fallback: fn(PathBuf, io::Error) -> OpenError,
) -> OpenError {
    let path = path.to_path_buf();
    match Errno::from_io_error(&source) {
        Some(Errno::NOENT | Errno::NOTDIR | Errno::NXIO | Errno::NODEV) => OpenError::NotFound { path, source },
        Some(Errno::ACCESS | Errno::PERM) => OpenError::PermissionDenied { path, source },
        Some(Errno::ROFS) => OpenError::ReadOnly { path, source },
        Some(Errno::BUSY) => OpenError::Busy { path, source },
        Some(Errno::INVAL) if direct => OpenError::DirectIoUnsupported { path, filesystem: filesystem(), source },
        _ => fallback(path, source),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open_error(errno: Errno, direct: bool) -> OpenError {
        let fallback = |path, source| OpenError::Open { path, source };
        classify(Path::new("/dev/x"), io::Error::from(errno), direct, || "tmpfs".into(), fallback)
    }

    #[test]
    fn errnos_map_to_the_variant_named_after_the_failure() {
        assert!(matches!(open_error(Errno::NOENT, true), OpenError::NotFound { .. }));
        assert!(matches!(open_error(Errno::ACCESS, false), OpenError::PermissionDenied { .. }));
        assert!(matches!(open_error(Errno::PERM, false), OpenError::PermissionDenied { .. }));
        assert!(matches!(open_error(Errno::ROFS, false), OpenError::ReadOnly { .. }));
        assert!(matches!(open_error(Errno::BUSY, true), OpenError::Busy { .. }));
        assert!(matches!(open_error(Errno::INVAL, false), OpenError::Open { .. }));
        assert!(matches!(open_error(Errno::IO, true), OpenError::Open { .. }));
        let error = open_error(Errno::INVAL, true);
        assert!(matches!(&error, OpenError::DirectIoUnsupported { filesystem, .. } if filesystem == "tmpfs"));
        let message = error.to_string();
        assert!(message.starts_with("/dev/x: the tmpfs filesystem"), "{message}");
        assert!(message.contains("buffered: true"), "the message points to the buffered mode: {message}");
        assert_eq!(error.path(), Path::new("/dev/x"));
        let busy = open_error(Errno::BUSY, false).to_string();
        assert!(busy.contains("/dev/x") && busy.contains("busy"), "{busy}");
        assert!(
            std::error::Error::source(&open_error(Errno::BUSY, false)).is_some(),
            "the errno is kept as the source"
        );
    }
}
