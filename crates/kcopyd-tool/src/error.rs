//! The errors of planning a job: each names the device (its role and address as given), the
//! length or the path at fault, so that a caller can map it to its own option names.
//!
//! ```text
//!  PlanError::Device  SOURCE/TARGET + address + DeviceProblem (range, alignment, overlap, tail)
//!  PlanError::Length  the range's length + problem        (not whole blocks, partial block)
//!  PlanError::Open    SOURCE/TARGET + address + OpenError (kcopyd-os)
//!  PlanError::Connect SOURCE/TARGET + address + ConnectError (kcopyd-nbd)
//! ```

use std::io;

use kcopyd_core::{SECTOR_SIZE, TARGETS_MAX};
use kcopyd_nbd::ConnectError;
use kcopyd_os::{LockError, OpenError};
use kcopyd_sim::spec::SpecError;
use kcopyd_sim::units::Bytes;
use thiserror::Error;

/// Which end of a job a device is: its name in messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The source.
    Source,
    /// A target.
    Target,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Role {
    /// The name in messages: `SOURCE` or `TARGET`.
    pub fn name(self) -> &'static str {
        match self {
            Role::Source => "SOURCE",
            Role::Target => "TARGET",
        }
    }
}

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
        problem: DeviceProblem,
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
    pub fn device(role: Role, text: impl Into<String>, problem: DeviceProblem) -> PlanError {
        PlanError::Device { role, text: text.into(), problem }
    }
}

/// What does not suit the job about one device ([`PlanError::Device`]). Byte offsets and
/// lengths are of the device as addressed (after its `@OFFSET`) unless said otherwise.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum DeviceProblem {
    /// A path ending in `/` that is not a directory.
    #[error("not a directory (the name ends in '/')")]
    NotADirectory,
    /// An offset that is not whole sectors.
    #[error("offset of {offset_bytes} bytes is not a multiple of the {SECTOR_SIZE}-byte sector")]
    OffsetNotSectors {
        /// The offset given.
        offset_bytes: u64,
    },
    /// An offset that is not whole logical blocks of the device.
    #[error("offset of {offset_bytes} bytes is not a multiple of the device's {block_bytes}-byte logical block")]
    OffsetNotBlocks {
        /// The offset given.
        offset_bytes: u64,
        /// The device's logical block.
        block_bytes: u64,
    },
    /// A target's offset and the length overflow 64 bits.
    #[error("offset and length together overflow 64 bits")]
    EndOverflows,
    /// A target too small for the range.
    #[error(
        "too small: the range ends at byte {} ({} from offset {offset_bytes}), but the device holds \
         {device_bytes} bytes ({})",
        offset_bytes.saturating_add(*len_bytes), Bytes(*len_bytes), Bytes(*device_bytes)
    )]
    TooSmall {
        /// Where the range starts.
        offset_bytes: u64,
        /// The range's length.
        len_bytes: u64,
        /// The device's length.
        device_bytes: u64,
    },
    /// A source range past the device's end.
    #[error("{len_bytes} bytes from offset {offset_bytes} run past the end of the device at {device_bytes} bytes")]
    PastEnd {
        /// Where the range starts.
        offset_bytes: u64,
        /// The range's length.
        len_bytes: u64,
        /// The device's length.
        device_bytes: u64,
    },
    /// An offset past the device's end (no length given).
    #[error("offset of {offset_bytes} bytes lies past the end of the device at {device_bytes} bytes")]
    OffsetPastEnd {
        /// The offset given.
        offset_bytes: u64,
        /// The device's length.
        device_bytes: u64,
    },
    /// Targets of a zero job without `--length` that hold different lengths.
    #[error("holds {len_bytes} bytes from its offset but '{first}' holds {first_len_bytes}: give --length")]
    LengthsDiffer {
        /// This target's length from its offset.
        len_bytes: u64,
        /// The first target, as given.
        first: String,
        /// Its length from its offset.
        first_len_bytes: u64,
    },
    /// The range overlaps another device's on the same storage (hard links, loop devices,
    /// partitions); `ranges` are byte ranges of that storage, `[start, end)`.
    #[error(
        "overlaps {other_role} '{other}' on the same storage: bytes {}-{} and {}-{} of it{}",
        ranges[0][0], ranges[0][1], ranges[1][0], ranges[1][1], layer_notes(layers)
    )]
    OverlapsStorage {
        /// The other device's role.
        other_role: Role,
        /// The other device, as given.
        other: String,
        /// This range and the other's, in bytes of the storage.
        ranges: [[u64; 2]; 2],
        /// Per device (as given) the layers between it and the storage, if any.
        layers: Vec<(String, Vec<String>)>,
    },
    /// The range overlaps another device's range on the same (simulated or network) device.
    #[error("overlaps {other_role} '{other}' on the same device: bytes {}-{} and {}-{}", ranges[0][0], ranges[0][1], ranges[1][0], ranges[1][1])]
    OverlapsDevice {
        /// The other device's role.
        other_role: Role,
        /// The other device, as given.
        other: String,
        /// This range and the other's, in bytes, `[start, end)`.
        ranges: [[u64; 2]; 2],
    },
    /// A range that ends inside a block of a device that takes whole blocks only.
    #[error(
        "is {kind}, which takes whole {block_bytes}-byte blocks, but the range of {len_bytes} bytes ends \
         {tail_bytes} bytes into a {range_block_bytes}-byte block: give --length {whole_bytes} to leave the last \
         {tail_bytes} bytes out"
    )]
    PartialBlock {
        /// What the device is: `a block device`, `an NBD export`, `a simulated disk`.
        kind: &'static str,
        /// The device's logical block.
        block_bytes: u64,
        /// The range's length.
        len_bytes: u64,
        /// Bytes of the range in its last, partial block.
        tail_bytes: u64,
        /// The block the range is cut in (the largest of the job's devices').
        range_block_bytes: u64,
        /// The length of the range's whole blocks.
        whole_bytes: u64,
    },
    /// A range that ends inside an NBD server's minimum block.
    #[error(
        "the range ends {tail_bytes} bytes into a block, at byte {end_bytes}, but the server's minimum block size \
         is {min_block_bytes} bytes, so those bytes cannot be {}: give --length {whole_bytes} to leave the last \
         {tail_bytes} bytes out",
        if *role == Role::Source { "read" } else { "written" }
    )]
    NbdMinBlock {
        /// Which end of the job (what cannot be done: read or written).
        role: Role,
        /// Bytes of the range in its last, partial block.
        tail_bytes: u64,
        /// Where the range ends on the export.
        end_bytes: u64,
        /// The server's minimum block size.
        min_block_bytes: u64,
        /// The length of the range's whole blocks.
        whole_bytes: u64,
    },
    /// A device mixed with a headers-only simulated disk, which only its like can copy.
    #[error(
        "{headers_only_role} '{headers_only}' has headers-only=on, so every device of the command must be a sim \
         device with headers-only=on (it fills only the header of each pattern sector)"
    )]
    HeadersOnlyMix {
        /// The headers-only device's role.
        headers_only_role: Role,
        /// The headers-only device, as given.
        headers_only: String,
    },
    /// A `sim:` device without `size` where nothing else gives its length.
    #[error("sim key 'size' is needed here")]
    SimSizeNeeded,
    /// A `sim:` device that cannot have the length asked.
    #[error("{0}")]
    SimLen(#[source] SpecError),
    /// A file target could not be extended to the range's end.
    #[error("extending the file to {len_bytes} bytes: {source}")]
    Extend {
        /// The length asked.
        len_bytes: u64,
        /// The system's error.
        #[source]
        source: io::Error,
    },
    /// A file's length could not be read.
    #[error("reading the file's length: {source}")]
    FileLength {
        /// The system's error.
        #[source]
        source: io::Error,
    },
    /// Another kcopyd or a flock holder uses the file (`write`: this one writes it).
    #[error(
        "{} busy: another kcopyd (or a program holding a flock lock on it) is {} it",
        role.name().to_lowercase(), if *write { "using" } else { "writing" }
    )]
    Busy {
        /// Which end of the job.
        role: Role,
        /// Whether this job writes the file.
        write: bool,
    },
    /// The file could not be locked.
    #[error("{0}")]
    Lock(#[source] LockError),
    /// A target file whose mode lets nobody write it.
    #[error("read-only file (mode {mode:o}): refusing to write to it; make it writable first")]
    ReadOnlyMode {
        /// The permission bits.
        mode: u32,
    },
}

/// `; 'A' is a loop device, a partition` per device with layers.
fn layer_notes(layers: &[(String, Vec<String>)]) -> String {
    layers.iter().map(|(text, layers)| format!("; '{text}' is a {}", layers.join(", a "))).collect()
}
