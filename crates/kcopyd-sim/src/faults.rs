//! Fault plans (what may go wrong, as a serde value) and fault records (what did).
//!
//! A plan is both an explicit schedule (sector ranges, which request) and probabilities drawn
//! from the disk's seed. Every field defaults to "nothing goes wrong".

use std::ops::Range;

use serde::{Deserialize, Serialize};

/// A write fault on a sector range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteFault {
    /// Writes touching these sectors fail.
    pub sectors: Range<u64>,
    /// How many attempts fail before writes succeed again; 0 means every attempt fails.
    #[serde(default)]
    pub attempts: u32,
}

/// A write that lands somewhere else than asked, yet reports success.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Misdirect {
    /// Which write request (0 = the disk's first write) goes astray.
    pub write_index: u64,
    /// How far it lands from where it was aimed, in sectors (rounded to whole blocks and
    /// kept inside the disk).
    pub shift_sectors: i64,
}

/// A request that takes longer than the model says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlowSpike {
    /// Which request (0 = the disk's first, reads and writes counted together).
    pub io_index: u64,
    /// The extra delay.
    pub extra_us: u64,
}

/// A request the device holds: it completes only after `hold_us` more, or never (`None`), as a
/// device whose command is lost or stuck in its firmware; the buffer stays with the device
/// meanwhile. What a per-request timeout is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stall {
    /// Which request (0 = the disk's first, reads and writes counted together).
    pub io_index: u64,
    /// How much longer the request takes, µs; `None` for ever.
    #[serde(default)]
    pub hold_us: Option<u64>,
}

/// Per-request probabilities, in parts per million, drawn from the disk's seed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultOdds {
    /// A read meets a new latent sector error (one block of the request; it stays until
    /// written).
    pub read_error_ppm: u32,
    /// A write fails once.
    pub write_error_ppm: u32,
    /// A write lands a few blocks away and reports success.
    pub misdirect_ppm: u32,
    /// A request is slowed by `slow_us`.
    pub slow_ppm: u32,
    /// The delay of a slow request.
    pub slow_us: u64,
    /// A request stalls (see [`Stall`]) for `stall_us`.
    pub stall_ppm: u32,
    /// How long a stall drawn by `stall_ppm` holds its request, µs; `None` for ever.
    pub stall_us: Option<u64>,
}

/// Everything that may go wrong on one disk.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultPlan {
    /// Latent sector errors: reads touching them fail until a write covers them.
    pub latent_sectors: Vec<Range<u64>>,
    /// Write faults, persistent or for a number of attempts.
    pub write_faults: Vec<WriteFault>,
    /// The whole device fails from this request on (0 = the first).
    pub fail_after_ios: Option<u64>,
    /// The whole device fails from this (virtual) time on, in microseconds since creation.
    pub fail_at_us: Option<u64>,
    /// Requests slowed on purpose.
    pub slow_spikes: Vec<SlowSpike>,
    /// Requests held on purpose, for a while or for ever.
    pub stalls: Vec<Stall>,
    /// Writes sent astray on purpose.
    pub misdirects: Vec<Misdirect>,
    /// Serve each request one logical block at a time, yielding between blocks, so a fault in
    /// the middle leaves a partial transfer (as a device moving one block per call would).
    pub short_io: bool,
    /// A volatile write cache: on [`crash`](crate::MemDisk::crash) the writes not yet flushed
    /// may be lost and those in flight may be torn.
    pub volatile_cache: bool,
    /// Faults drawn from the seed.
    pub odds: FaultOdds,
    /// The disk cannot tell what is allocated: every allocation query fails (as a file
    /// system without `SEEK_HOLE` or an NBD server without block status that refuses), and a
    /// sparse copy must then read everything.
    pub allocation_unknown: bool,
}

/// The operation a fault hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Operation {
    /// A read.
    Read,
    /// A write.
    Write,
    /// A write-zeroes.
    WriteZeroes,
    /// A crash of the disk (no request).
    Crash,
    /// A flush.
    Flush,
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Operation::Read => "read",
            Operation::Write => "write",
            Operation::WriteZeroes => "write-zeroes",
            Operation::Crash => "crash",
            Operation::Flush => "flush",
        })
    }
}

/// What kind of fault fired.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FaultKind {
    /// A read touched a latent sector error.
    LatentSectorError,
    /// A write touched a sector set to fail writes (or drew a write error).
    WriteError,
    /// The whole device had failed.
    DeviceFailed,
    /// The disk had crashed and was not restarted.
    Crashed,
    /// The request was slowed by this many microseconds (it did not fail).
    Slow {
        /// The extra delay.
        extra_us: u64,
    },
    /// The device held the request: `hold_us` more, or for ever (`None`). Recorded when it
    /// was issued; it did not fail (unless something else failed it when it completed).
    Stalled {
        /// How much longer it took, µs; `None` for ever.
        hold_us: Option<u64>,
    },
    /// The write landed at `landed` instead and reported success.
    Misdirected {
        /// Where the data went.
        landed: Range<u64>,
    },
    /// A write in flight at a crash: only these sectors landed.
    Torn {
        /// The sectors that landed.
        landed: Vec<Range<u64>>,
    },
    /// A completed but unflushed write lost at a crash: its sectors went back to their old
    /// content.
    Lost,
    /// A write to a zoned disk that did not start at its zone's write pointer (or ran past the
    /// zone's end) was refused, as the kernel refuses it.
    ZoneViolation {
        /// The zone's write pointer when the write came.
        write_pointer: u64,
    },
}

impl FaultKind {
    /// Whether the request failed (as opposed to being slowed, misdirected or undone later).
    pub fn failed_request(&self) -> bool {
        matches!(
            self,
            FaultKind::LatentSectorError
                | FaultKind::WriteError
                | FaultKind::DeviceFailed
                | FaultKind::Crashed
                | FaultKind::ZoneViolation { .. }
        )
    }
}

/// One fault that actually fired: the oracle tests compare outcomes with.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FaultRecord {
    /// Virtual (or real) time since the disk was made, in microseconds.
    pub at_us: u64,
    /// The device's name.
    pub device: String,
    /// The operation hit.
    pub operation: Operation,
    /// The sectors of the request (the whole request, also on a short-I/O disk, where only
    /// the blocks before the failing one moved).
    pub sectors: Range<u64>,
    /// What fired.
    pub kind: FaultKind,
}
