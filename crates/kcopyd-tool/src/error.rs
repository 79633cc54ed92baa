//! The errors of planning a job: each names the device (its role and address as given), the
//! length or the path at fault, so that a caller can map it to its own option names.
//!
//! ```text
//!  PlanError::Device  SOURCE/TARGET + address + problem   (range, alignment, overlap, tail)
//!  PlanError::Length  the range's length + problem        (not whole blocks, partial block)
//!  PlanError::Open    SOURCE/TARGET + address + OpenError (kcopyd-os)
//!  PlanError::Connect SOURCE/TARGET + address + ConnectError (kcopyd-nbd)
//! ```

use kcopyd_core::TARGETS_MAX;
use kcopyd_nbd::ConnectError;
use kcopyd_os::OpenError;
use thiserror::Error;

use crate::open::Role;

/// Why a job was refused before anything was written to any device.
#[derive(Debug, Error)]
pub enum PlanError {
    /// A device does not suit the job: its range is misaligned, runs past its end, overlaps
    /// another device's range on the same storage, or the device cannot be used.
    #[error("{role} '{text}': {problem}")]
    Device {
        /// Which end of the job.
        role: Role,
        /// The address as given.
        text: String,
        /// What is wrong.
        problem: String,
    },
    /// The range's length does not suit the devices.
    #[error("length of {len_bytes} bytes: {problem}")]
    Length {
        /// The length, in bytes.
        len_bytes: u64,
        /// What is wrong.
        problem: String,
    },
    /// More targets than one job takes.
    #[error("{count} targets given: one job copies to at most {TARGETS_MAX}")]
    TargetCount {
        /// Targets given.
        count: usize,
    },
    /// A file or block device could not be opened.
    #[error("{role} '{text}': {source}")]
    Open {
        /// Which end of the job.
        role: Role,
        /// The address as given.
        text: String,
        /// The device layer's error.
        #[source]
        source: OpenError,
    },
    /// An NBD export could not be opened.
    #[error("{role} '{text}': {source}")]
    Connect {
        /// Which end of the job.
        role: Role,
        /// The address as given.
        text: String,
        /// The NBD client's error.
        #[source]
        source: ConnectError,
    },
}

impl PlanError {
    /// A [`PlanError::Device`].
    pub fn device(role: Role, text: impl Into<String>, problem: impl Into<String>) -> PlanError {
        PlanError::Device { role, text: text.into(), problem: problem.into() }
    }
}
