//! The error a [`MemDisk`](crate::MemDisk) request fails with: which device, which operation,
//! which sectors and why, inside the `io::Error` the device trait returns.

use std::fmt;
use std::io;
use std::ops::Range;

use kcopyd_core::RequestRefused;

use crate::Operation;

/// The errno the kernel gives for misaligned direct I/O.
pub(crate) const EINVAL: i32 = 22;
/// The errno of a failed or out-of-range transfer.
pub(crate) const EIO: i32 = 5;

/// Why a [`MemDisk`](crate::MemDisk) request failed. It travels inside the returned
/// `io::Error` (find it with [`DiskError::of`]); the error's kind is the one the kernel's
/// errno maps to ([`DiskError::errno`]).
///
/// ```
/// # use kcopyd_core::{BlockDevice, WriteBuf};
/// # use kcopyd_sim::{DiskError, MemDisk};
/// let disk = MemDisk::zeroed("disk", 16, 4096);
/// let result = futures_executor_free(disk.write(4, WriteBuf::zeroes(4096)));
/// let error = result.unwrap_err();
/// assert_eq!(error.to_string(), "disk: write of sectors 4..12 refused: not aligned to the 4096-byte logical block");
/// assert_eq!(DiskError::of(&error).unwrap().errno(), 22); // EINVAL
/// # fn futures_executor_free<F: std::future::Future>(f: F) -> F::Output {
/// #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskError {
    /// The device's name.
    pub device: String,
    /// The operation that failed.
    pub operation: Operation,
    /// The sectors it asked for (the whole device for a flush).
    pub sectors: Range<u64>,
    /// Why.
    pub reason: DiskFailure,
}

/// What went wrong in a [`DiskError`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DiskFailure {
    /// Refused before any transfer: not aligned to the logical block (EINVAL).
    Misaligned {
        /// The logical block size in bytes.
        block_size: u32,
    },
    /// Refused before any transfer: past the end of the device (EIO, as the kernel's block
    /// layer fails a bio past the end; the other backends give EINVAL, see
    /// [`RequestRefused`]).
    OutOfRange {
        /// The device's length in sectors.
        device_sectors: u64,
    },
    /// Refused before any transfer by a rule of the geometry added after the two above
    /// (EINVAL, [`RequestRefused::ERRNO`]).
    Refused(RequestRefused),
    /// A latent sector error of the fault plan (EIO).
    LatentSectorError,
    /// A write error of the fault plan (EIO).
    WriteError,
    /// The whole device had failed (EIO).
    DeviceFailed,
    /// The disk had crashed (EIO).
    Crashed,
    /// A write to a sequential zone away from its write pointer (EIO).
    NotAtWritePointer {
        /// Where the zone's write pointer was.
        write_pointer: u64,
    },
}

impl DiskError {
    /// The error as the device trait returns it.
    pub(crate) fn into_io(self) -> io::Error {
        let kind = io::Error::from_raw_os_error(self.errno()).kind();
        io::Error::new(kind, self)
    }

    /// The errno the kernel would give: EINVAL (22) for a misaligned request, EIO (5) for
    /// everything else.
    pub fn errno(&self) -> i32 {
        match self.reason {
            DiskFailure::Misaligned { .. } => EINVAL,
            DiskFailure::Refused(refused) => refused.errno(),
            _ => EIO,
        }
    }

    /// The `DiskError` inside an `io::Error` a `MemDisk` returned, if it is one.
    pub fn of(error: &io::Error) -> Option<&DiskError> {
        error.get_ref().and_then(|inner| inner.downcast_ref::<DiskError>())
    }
}

impl fmt::Display for DiskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let DiskError { device, operation, sectors, reason } = self;
        write!(f, "{device}: {operation} of sectors {sectors:?} ")?;
        match reason {
            DiskFailure::Misaligned { block_size } => {
                write!(f, "refused: not aligned to the {block_size}-byte logical block")
            }
            DiskFailure::OutOfRange { device_sectors } => {
                write!(f, "refused: past the end of the device ({device_sectors} sectors)")
            }
            DiskFailure::Refused(refused) => write!(f, "refused: {refused}"),
            DiskFailure::LatentSectorError => write!(f, "failed: latent sector error"),
            DiskFailure::WriteError => write!(f, "failed: write error"),
            DiskFailure::DeviceFailed => write!(f, "failed: the device has failed"),
            DiskFailure::Crashed => write!(f, "failed: the disk has crashed"),
            DiskFailure::NotAtWritePointer { write_pointer } => {
                write!(f, "failed: not at the zone's write pointer (sector {write_pointer})")
            }
        }
    }
}

impl std::error::Error for DiskError {}

impl From<RequestRefused> for DiskFailure {
    /// The simulator's reason for a request its geometry refuses
    /// ([`Geometry::check_request`](kcopyd_core::Geometry::check_request)).
    fn from(refused: RequestRefused) -> DiskFailure {
        match refused {
            RequestRefused::Misaligned { block_bytes, .. } => DiskFailure::Misaligned { block_size: block_bytes },
            RequestRefused::OutOfRange { device_sectors, .. } => DiskFailure::OutOfRange { device_sectors },
            _ => DiskFailure::Refused(refused),
        }
    }
}
