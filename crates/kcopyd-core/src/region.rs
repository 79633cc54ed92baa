//! Regions, flags and sets of sector ranges.

use std::fmt;
use std::ops::{BitOr, BitOrAssign, Range};

use serde::{Deserialize, Serialize};

use crate::{Device, IntoDevice, ShiftError};

/// A range of sectors on a device: `(device, start sector, sector count)`.
#[derive(Clone)]
pub struct Region {
    /// The device.
    pub device: Device,
    /// First sector.
    pub start_sector: u64,
    /// Number of sectors.
    pub len_sectors: u64,
}

impl Region {
    /// A region of `len_sectors` sectors from `start_sector` on `device`: any
    /// `Arc<D: BlockDevice>`, or an already shared [`Device`].
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use kcopyd_core::{Device, Region};
    /// # use kcopyd_sim::MemDisk;
    /// let disk = Arc::new(MemDisk::zeroed("disk", 64, 512));
    /// let first = Region::new(disk.clone(), 0, 8); // no `as Device` needed
    /// let shared: Device = disk;
    /// let second = Region::new(shared, 8, 8);
    /// assert_eq!(first.device.id(), second.device.id());
    /// ```
    pub fn new(device: impl IntoDevice, start_sector: u64, len_sectors: u64) -> Region {
        Region { device: device.into_device(), start_sector, len_sectors }
    }

    /// The sectors, as a range (saturating at `u64::MAX`).
    pub fn sectors(&self) -> Range<u64> {
        self.start_sector..self.start_sector.saturating_add(self.len_sectors)
    }
}

impl fmt::Debug for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}..+{}]", self.device.name(), self.start_sector, self.len_sectors)
    }
}

/// Job flags, combined with `|`.
///
/// ```
/// # use kcopyd_core::Flags;
/// let flags = Flags::IGNORE_ERROR | Flags::WRITE_SEQ;
/// assert!(flags.contains(Flags::WRITE_SEQ));
/// assert!(!Flags::empty().contains(Flags::IGNORE_ERROR));
/// ```
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Flags(u32);

impl Flags {
    /// Keep copying after an error; unreadable blocks are narrowed down, skipped on every
    /// target and reported. Ignored (errors stop the job) together with `WRITE_SEQ`, because a
    /// skipped block would leave a hole that a sequential target cannot take.
    pub const IGNORE_ERROR: Flags = Flags(1);
    /// Issue the writes to each target in increasing sector order. Implied when a target is
    /// zoned.
    pub const WRITE_SEQ: Flags = Flags(2);

    /// No flags.
    pub const fn empty() -> Flags {
        Flags(0)
    }

    /// Whether every flag of `other` is set.
    pub const fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }
}

impl BitOr for Flags {
    type Output = Flags;
    fn bitor(self, other: Flags) -> Flags {
        Flags(self.0 | other.0)
    }
}

impl BitOrAssign for Flags {
    fn bitor_assign(&mut self, other: Flags) {
        self.0 |= other.0;
    }
}

impl fmt::Debug for Flags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names = Vec::new();
        if self.contains(Flags::IGNORE_ERROR) {
            names.push("IGNORE_ERROR");
        }
        if self.contains(Flags::WRITE_SEQ) {
            names.push("WRITE_SEQ");
        }
        write!(f, "Flags({})", names.join(" | "))
    }
}

/// A set of sector numbers kept as sorted, disjoint, non-adjacent ranges.
///
/// ```
/// # use kcopyd_core::RangeSet;
/// let mut set = RangeSet::new();
/// set.insert(8..16);
/// set.insert(0..8);     // touches 8..16: merged
/// set.insert(20..24);
/// assert_eq!(set.ranges(), &[0..16, 20..24]);
/// assert_eq!(set.len_sectors(), 20);
/// assert_eq!(RangeSet::from_range(0..32).difference(&set).ranges(), &[16..20, 24..32]);
/// ```
#[derive(Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RangeSet {
    /// Sorted, disjoint, non-touching and non-empty ([`RangeSet::is_well_formed`]) after every
    /// mutation. (A set read through serde is taken as written: readers of saved sets check
    /// it, as the tests' `Sectors::of` does.)
    ranges: Vec<Range<u64>>,
}

impl RangeSet {
    /// The empty set.
    pub const fn new() -> RangeSet {
        RangeSet { ranges: Vec::new() }
    }

    /// Whether `ranges` keeps the set's invariant: each range non-empty, each ending before
    /// the next one starts (sorted, disjoint, and not touching: touching ranges are merged).
    fn is_well_formed(ranges: &[Range<u64>]) -> bool {
        ranges.iter().all(|r| r.start < r.end) && ranges.windows(2).all(|w| w[0].end < w[1].start)
    }

    /// Checks the invariant of a whole set, after an operation that rebuilt it (debug builds).
    fn debug_assert_well_formed(&self) {
        debug_assert!(RangeSet::is_well_formed(&self.ranges), "a RangeSet lost its order: {self:?}");
    }

    /// Checks the invariant around `at`, the one range an insert added or grew, and its two
    /// neighbours: the rest did not change, so a full scan (quadratic over many inserts) is
    /// not needed (debug builds).
    fn debug_assert_well_formed_at(&self, at: usize) {
        let around = &self.ranges[at.saturating_sub(1)..(at + 2).min(self.ranges.len())];
        debug_assert!(RangeSet::is_well_formed(around), "a RangeSet lost its order at {around:?}");
    }

    /// The set holding one range.
    pub fn from_range(range: Range<u64>) -> RangeSet {
        let mut set = RangeSet::new();
        set.insert(range);
        set
    }

    /// The ranges, sorted, disjoint and non-adjacent.
    pub fn ranges(&self) -> &[Range<u64>] {
        &self.ranges
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Number of sectors in the set.
    pub fn len_sectors(&self) -> u64 {
        self.ranges.iter().map(|r| r.end - r.start).sum()
    }

    /// Whether `sector` is in the set.
    pub fn contains(&self, sector: u64) -> bool {
        let at = self.ranges.partition_point(|r| r.end <= sector);
        self.ranges.get(at).is_some_and(|r| r.start <= sector)
    }

    /// Whether any sector of `range` is in the set.
    pub fn intersects(&self, range: &Range<u64>) -> bool {
        let at = self.ranges.partition_point(|r| r.end <= range.start);
        self.ranges.get(at).is_some_and(|r| r.start < range.end) && range.start < range.end
    }

    /// Adds `range`, merging with ranges it overlaps or touches.
    pub fn insert(&mut self, range: Range<u64>) {
        if range.start >= range.end {
            return;
        }
        // First range that ends at or after the new start (touching counts), and first that
        // starts after the new end.
        let lo = self.ranges.partition_point(|r| r.end < range.start);
        let hi = self.ranges.partition_point(|r| r.start <= range.end);
        if lo == hi {
            self.ranges.insert(lo, range);
        } else {
            let start = range.start.min(self.ranges[lo].start);
            let end = range.end.max(self.ranges[hi - 1].end);
            self.ranges.splice(lo..hi, std::iter::once(start..end));
        }
        self.debug_assert_well_formed_at(lo);
    }

    /// Adds every range of `other`.
    pub fn extend(&mut self, other: &RangeSet) {
        other.ranges.iter().for_each(|r| self.insert(r.clone()));
    }

    /// The sectors of `self` that are not in `other`.
    pub fn difference(&self, other: &RangeSet) -> RangeSet {
        let mut out = RangeSet::new();
        for range in &self.ranges {
            let mut start = range.start;
            let first = other.ranges.partition_point(|r| r.end <= range.start);
            for cut in &other.ranges[first..] {
                if cut.start >= range.end {
                    break;
                }
                if cut.start > start {
                    out.ranges.push(start..cut.start);
                }
                start = start.max(cut.end);
            }
            if start < range.end {
                out.ranges.push(start..range.end);
            }
        }
        out.debug_assert_well_formed();
        debug_assert!(out.len_sectors() <= self.len_sectors(), "{self:?} minus {other:?} grew: {out:?}");
        out
    }

    /// Every range moved so that sector `from` lands on sector `to` (from one device's
    /// coordinates to another's).
    ///
    /// ```
    /// # use kcopyd_core::RangeSet;
    /// let on_source = RangeSet::from_range(1000..1008);
    /// // The source region starts at 1000, the target region at 0.
    /// assert_eq!(on_source.shifted(1000, 0).unwrap().ranges(), &[0..8]);
    /// // A range before `from` would land below sector 0.
    /// assert!(on_source.shifted(1004, 0).is_err());
    /// ```
    ///
    /// # Errors
    /// A range would start below sector 0 or end past `u64::MAX`; the error names it.
    pub fn shifted(&self, from: u64, to: u64) -> Result<RangeSet, ShiftError> {
        let shift = |r: &Range<u64>| {
            let start = r.start.checked_sub(from)?.checked_add(to)?;
            let end = r.end.checked_sub(from)?.checked_add(to)?;
            Some(start..end)
        };
        let ranges = self
            .ranges
            .iter()
            .map(|r| shift(r).ok_or(ShiftError { range: r.clone(), from, to }))
            .collect::<Result<_, _>>()?;
        let shifted = RangeSet { ranges };
        shifted.debug_assert_well_formed();
        Ok(shifted)
    }
}

impl fmt::Debug for RangeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.ranges.iter()).finish()
    }
}

impl FromIterator<Range<u64>> for RangeSet {
    fn from_iter<I: IntoIterator<Item = Range<u64>>>(iter: I) -> RangeSet {
        let mut set = RangeSet::new();
        iter.into_iter().for_each(|r| set.insert(r));
        set
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_merges_overlapping_and_touching_ranges() {
        let mut set: RangeSet = [10..20, 30..40, 50..60].into_iter().collect();
        set.insert(15..35);
        assert_eq!(set.ranges(), &[10..40, 50..60]);
        set.insert(40..50);
        assert_eq!(set, RangeSet::from_range(10..60));
        set.insert(5..5);
        assert_eq!(set, RangeSet::from_range(10..60));
        set.insert(0..2);
        assert_eq!(set.ranges(), &[0..2, 10..60]);
        assert!(set.contains(1) && !set.contains(2) && set.contains(59) && !set.contains(60));
        assert!(set.intersects(&(2..11)) && !set.intersects(&(2..10)));
    }

    #[test]
    fn shifting_out_of_the_sector_numbers_is_an_error_not_a_panic() {
        let set: RangeSet = [10..20, 30..40].into_iter().collect();
        assert_eq!(set.shifted(10, 100).unwrap().ranges(), &[100..110, 120..130]);
        assert_eq!(set.shifted(10, 0).unwrap().ranges(), &[0..10, 20..30]);
        assert_eq!(set.shifted(11, 0), Err(ShiftError { range: 10..20, from: 11, to: 0 }));
        assert_eq!(set.shifted(0, u64::MAX - 35), Err(ShiftError { range: 30..40, from: 0, to: u64::MAX - 35 }));
        assert_eq!(RangeSet::new().shifted(5, 0), Ok(RangeSet::new()));
    }

    #[test]
    fn insert_agrees_with_a_flat_model() {
        // A deterministic walk over many small inserts, checked against a bitmap.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut set = RangeSet::new();
        let mut model = [false; 200];
        for _ in 0..2000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let start = state % 190;
            let len = (state >> 32) % 10;
            set.insert(start..start + len);
            model[start as usize..(start + len) as usize].fill(true);
            for (sector, &bit) in model.iter().enumerate() {
                assert_eq!(set.contains(sector as u64), bit, "sector {sector} in {set:?}");
            }
            assert!(set.ranges().windows(2).all(|w| w[0].end < w[1].start), "{set:?}");
        }
    }

    /// The check itself: a set whose ranges touch, overlap, are out of order or empty is
    /// refused, and the debug assertion after a mutation trips on it.
    #[test]
    fn a_broken_set_is_caught_by_the_invariant_check() {
        assert!(RangeSet::is_well_formed(&[0..2, 3..5]));
        // Touching, overlapping, out of order, then an empty and a reversed range after a good one.
        let broken: [&[Range<u64>]; 5] =
            [&[0..2, 2..5], &[0..4, 3..5], &[3..5, 0..2], &[0..1, 4..4], &[0..1, Range { start: 5, end: 3 }]];
        for ranges in broken {
            assert!(!RangeSet::is_well_formed(ranges), "{ranges:?}");
        }
        if cfg!(debug_assertions) {
            let broken = RangeSet { ranges: vec![0..2, 2..5, 9..10] };
            let tripped = std::panic::catch_unwind(|| broken.debug_assert_well_formed());
            assert!(tripped.is_err(), "the debug assertion trips on a broken set");
            let tripped = std::panic::catch_unwind(|| broken.debug_assert_well_formed_at(0));
            assert!(tripped.is_err(), "the local check sees the range after the one inserted");
            assert!(std::panic::catch_unwind(|| broken.debug_assert_well_formed_at(2)).is_ok(), "9..10 is fine");
        } else {
            println!("SKIPPED: the assertion half (a release build has no debug assertions)");
        }
    }

    /// Inserts and differences of random sets keep the invariant (asserted inside each) and
    /// agree with a bitmap.
    #[test]
    fn difference_agrees_with_a_flat_model_and_stays_well_formed() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut draw = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..300 {
            let mut sets = [RangeSet::new(), RangeSet::new()];
            let mut models = [[false; 128]; 2];
            for (set, model) in sets.iter_mut().zip(&mut models) {
                for _ in 0..draw() % 8 {
                    let start = draw() % 120;
                    let len = draw() % 9;
                    set.insert(start..start + len);
                    model[start as usize..(start + len) as usize].fill(true);
                }
            }
            let difference = sets[0].difference(&sets[1]);
            assert!(RangeSet::is_well_formed(difference.ranges()), "{difference:?}");
            for (sector, (&in_first, &in_second)) in models[0].iter().zip(&models[1]).enumerate() {
                let expected = in_first && !in_second;
                assert_eq!(difference.contains(sector as u64), expected, "{sets:?}: sector {sector}");
            }
        }
    }
}
