//! What a finished job reports.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{RangeSet, TARGETS_MAX};

/// A set of target indices (bit `i` = target `i`), as the kernel's `write_err`.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TargetMask(pub u128);

impl TargetMask {
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

impl fmt::Debug for TargetMask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

/// The result of one target of a job.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetReport {
    /// Target sectors whose write failed.
    pub write_failed: RangeSet,
    /// Target sectors that do not hold the source's data after the job: failed writes,
    /// blocks skipped because the source could not read them, and what a stopped or
    /// cancelled job never reached. Empty when the target got every sector.
    pub not_copied: RangeSet,
}

/// The one completion of a job.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// A read of the source failed.
    pub read_err: bool,
    /// The targets where a write failed.
    pub write_err: TargetMask,
    /// Source sectors that could not be read (narrowed down to logical blocks with
    /// `IGNORE_ERROR`, whole chunks without it).
    pub read_failed: RangeSet,
    /// One report per target, in the order the targets were given.
    pub targets: Vec<TargetReport>,
    /// The job was cancelled before it finished.
    pub cancelled: bool,
    /// A device or the engine panicked while running the job, with the panic's message. The
    /// job stopped there: the chunk being worked on counts as not copied on every target, and
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
