//! What a finished job reports.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{RangeSet, TARGETS_MAX};

/// A set of target indices (bit `i` = target `i`), as the kernel's `write_err`; up to
/// [`TARGETS_MAX`] targets.
///
/// ```
/// # use kcopyd_core::TargetMask;
/// let mut mask = TargetMask::new();
/// mask.set(0);
/// mask.set(127); // the last target a job may have
/// assert_eq!(mask.iter().collect::<Vec<_>>(), [0, 127]);
/// assert_eq!(mask.len(), 2);
/// assert!(!mask.contains(128)); // past the end: never in the set
/// assert_eq!(mask, [0, 127].into_iter().collect());
/// ```
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TargetMask(u128);

impl TargetMask {
    /// The empty set.
    pub const fn new() -> TargetMask {
        TargetMask(0)
    }

    /// Number of targets in the set.
    pub fn len(&self) -> usize {
        self.0.count_ones() as usize
    }

    /// Adds target `index`.
    ///
    /// # Panics
    /// If `index >= TARGETS_MAX`.
    pub fn set(&mut self, index: usize) {
        assert!(index < TARGETS_MAX);
        self.0 |= 1 << index;
    }

    /// Whether target `index` is in the set.
    pub fn contains(&self, index: usize) -> bool {
        index < TARGETS_MAX && self.0 & (1 << index) != 0
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0 == 0
    }

    /// The indices in the set, in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        (0..TARGETS_MAX).filter(|&i| self.contains(i))
    }
}

impl FromIterator<usize> for TargetMask {
    /// # Panics
    /// If an index is `TARGETS_MAX` or more.
    fn from_iter<I: IntoIterator<Item = usize>>(indices: I) -> TargetMask {
        let mut mask = TargetMask::new();
        indices.into_iter().for_each(|index| mask.set(index));
        mask
    }
}

impl fmt::Debug for TargetMask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

/// The result of one target of a job. Its ranges are sectors of the *target* device, in that
/// device's own numbering (a target region starting at sector 1000 reports its first sector
/// as 1000, not 0).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct TargetReport {
    /// Target-device sectors whose write failed.
    pub write_failed: RangeSet,
    /// Target-device sectors that do not hold the source's data after the job: failed
    /// writes, blocks skipped because the source could not read them, and what a stopped or
    /// cancelled job never reached. Empty when the target got every sector.
    pub not_copied: RangeSet,
}

/// The one completion of a job.
///
/// Sector ranges are in device coordinates: `read_failed` in the source device's sectors,
/// each [`TargetReport`] in its target device's sectors.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Outcome {
    /// A read of the source failed.
    pub read_err: bool,
    /// The targets where a write failed.
    pub write_err: TargetMask,
    /// Source-device sectors that could not be read (narrowed down to logical blocks with
    /// `IGNORE_ERROR`, whole sub-jobs without it). To find them on a target, shift by the
    /// difference of the regions' starts.
    pub read_failed: RangeSet,
    /// One report per target, in the order the targets were given.
    pub targets: Vec<TargetReport>,
    /// The job was cancelled before it finished.
    pub cancelled: bool,
    /// A device or the engine panicked while running the job, with the panic's message. The
    /// job stopped there: the sub-job being worked on counts as not copied on every target, and
    /// writes that other targets had in flight for it were abandoned (they may still land).
    /// The client goes on serving other jobs.
    #[serde(default)]
    pub panicked: Option<String>,
    /// The job's completion callback panicked, with the panic's message. The copy itself is
    /// what the other fields say ([`is_ok`](Outcome::is_ok) does not look at this); the
    /// callback gets the outcome without it, the job's handles with it. The panic is also
    /// reported as a `tracing` error event. The client goes on.
    #[serde(default)]
    pub callback_panicked: Option<String>,
}

impl Outcome {
    /// Whether every target got every sector, with no error and no cancellation.
    pub fn is_ok(&self) -> bool {
        !self.read_err
            && self.write_err.is_empty()
            && !self.cancelled
            && self.panicked.is_none()
            && self.targets.iter().all(|t| t.not_copied.is_empty())
    }
}
