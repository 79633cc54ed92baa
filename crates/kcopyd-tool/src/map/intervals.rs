//! A set of sector ranges kept in a B-tree, so that replaying a map of a million records
//! costs O(log n) per record wherever it lands (a sorted vector shifts its tail on every
//! insert in the middle, and `RangeSet::difference` walks the whole set).
//!
//! ```text
//!  start ─► end          insert 8..12 into {0..8, 12..20, 30..40}  ─► {0..20, 30..40}
//!  0   ─►  8             remove 4..32 from {0..20, 30..40}         ─► {0..4, 32..40}
//!  12  ─► 20
//!  30  ─► 40
//! ```

use std::collections::BTreeMap;
use std::ops::Range;

use kcopyd_core::RangeSet;

/// Disjoint, non-adjacent ranges `start..end`, keyed by start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Intervals {
    by_start: BTreeMap<u64, u64>,
}

impl Intervals {
    /// Adds `range`, merging it with every range it overlaps or touches.
    pub fn insert(&mut self, range: Range<u64>) {
        if range.start >= range.end {
            return;
        }
        let (mut start, mut end) = (range.start, range.end);
        // A range starting before `start` that reaches it (touching counts).
        if let Some((&before, &before_end)) = self.by_start.range(..start).next_back() {
            if before_end >= start {
                start = before;
                end = end.max(before_end);
            }
        }
        // Every range starting inside start..=end is swallowed (one at a time: no allocation).
        while let Some((&at, &at_end)) = self.by_start.range(start..=end).next() {
            end = end.max(at_end);
            self.by_start.remove(&at);
        }
        self.by_start.insert(start, end);
    }

    /// Takes `range` out, cutting the ranges it overlaps.
    pub fn remove(&mut self, range: Range<u64>) {
        if range.start >= range.end {
            return;
        }
        if let Some((&before, &before_end)) = self.by_start.range(..range.start).next_back() {
            if before_end > range.start {
                self.by_start.insert(before, range.start);
                if before_end > range.end {
                    self.by_start.insert(range.end, before_end);
                    return;
                }
            }
        }
        while let Some((&at, &at_end)) = self.by_start.range(range.clone()).next() {
            self.by_start.remove(&at);
            if at_end > range.end {
                self.by_start.insert(range.end, at_end);
            }
        }
    }

    /// The ranges in order.
    pub fn iter(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        self.by_start.iter().map(|(&start, &end)| start..end)
    }

    /// The same ranges as a [`RangeSet`] (built in order: each push is O(log n)).
    pub fn to_range_set(&self) -> RangeSet {
        self.iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flat model: one bool per sector.
    fn model(set: &Intervals, len: u64) -> Vec<bool> {
        (0..len).map(|sector| set.iter().any(|r| r.contains(&sector))).collect()
    }

    #[test]
    fn inserts_and_removes_match_a_flat_model_and_stay_disjoint_and_apart() {
        const LEN: u64 = 64;
        let mut set = Intervals::default();
        let mut flat = vec![false; LEN as usize];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..4000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let (a, b) = (seed % LEN, (seed >> 8) % (LEN + 1));
            let range = a.min(b)..a.max(b);
            let add = (seed >> 20) % 3 != 0;
            if add {
                set.insert(range.clone())
            } else {
                set.remove(range.clone())
            }
            for sector in range {
                flat[sector as usize] = add;
            }
            assert_eq!(model(&set, LEN), flat);
            let ranges: Vec<Range<u64>> = set.iter().collect();
            assert!(ranges.windows(2).all(|w| w[0].end < w[1].start), "{ranges:?}");
            assert!(ranges.iter().all(|r| r.start < r.end));
        }
        assert_eq!(set.to_range_set().ranges(), set.iter().collect::<Vec<_>>().as_slice());
    }
}
