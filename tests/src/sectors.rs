//! The oracle's own set of sectors, independent of the engine's `RangeSet`.
//!
//! ```text
//!  ranges in any order, overlapping or touching ──normalize()──► sorted, disjoint, non-adjacent
//!  [8..16, 0..8, 20..24, 22..23]                                 [0..16, 20..24]
//! ```
//!
//! The oracle compares the engine's reports with sets it builds itself. Were it to build them
//! with the engine's `RangeSet`, a bug in `RangeSet` would be a bug on both sides of every
//! comparison, and invisible. This type is deliberately simple (every operation re-normalises a
//! sorted vector) rather than fast; [`Sectors::of`] also checks that a `RangeSet` the engine
//! reports is well formed.

use std::fmt;
use std::ops::Range;

use kcopyd_core::RangeSet;

/// Why a `RangeSet` of the engine is not a well-formed set of sectors ([`Sectors::of`]); each
/// carries the set as the engine shows it (`Debug`) and the ranges at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MalformedSet {
    /// A range with its start not below its end.
    Empty {
        /// The set.
        set: String,
        /// The empty range.
        range: Range<u64>,
    },
    /// Two neighbouring ranges that touch (they should have been merged).
    Touching {
        /// The set.
        set: String,
        /// The first range.
        first: Range<u64>,
        /// The range after it.
        second: Range<u64>,
    },
    /// Two neighbouring ranges out of order or overlapping.
    Unsorted {
        /// The set.
        set: String,
        /// The first range.
        first: Range<u64>,
        /// The range after it.
        second: Range<u64>,
    },
}

impl fmt::Display for MalformedSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MalformedSet::Empty { set, range } => write!(f, "{set} holds the empty range {range:?}"),
            MalformedSet::Touching { set, first, second } => {
                write!(f, "{set} holds touching ranges {first:?} and {second:?}")
            }
            MalformedSet::Unsorted { set, first, second } => {
                write!(f, "{set} holds unsorted or overlapping ranges {first:?} and {second:?}")
            }
        }
    }
}

impl std::error::Error for MalformedSet {}

/// A set of sectors, kept as sorted, disjoint, non-adjacent, non-empty ranges.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Sectors {
    ranges: Vec<Range<u64>>,
}

impl Sectors {
    /// The empty set.
    pub fn new() -> Sectors {
        Sectors::default()
    }

    /// The set of every sector of `ranges` (in any order, overlapping or not).
    pub fn from_ranges(ranges: impl IntoIterator<Item = Range<u64>>) -> Sectors {
        let mut all: Vec<Range<u64>> = ranges.into_iter().filter(|r| r.start < r.end).collect();
        all.sort_by_key(|r| (r.start, r.end));
        let mut out: Vec<Range<u64>> = Vec::with_capacity(all.len());
        for range in all {
            match out.last_mut() {
                Some(last) if range.start <= last.end => last.end = last.end.max(range.end),
                _ => out.push(range),
            }
        }
        Sectors { ranges: out }
    }

    /// The engine's `set` as a `Sectors`, or what is wrong with it: its ranges must be
    /// non-empty, sorted, disjoint and non-adjacent (touching ranges merged).
    ///
    /// # Errors
    /// The first range that is empty, or the first pair out of order, overlapping or touching.
    pub fn of(set: &RangeSet) -> Result<Sectors, MalformedSet> {
        let ranges = set.ranges();
        if let Some(empty) = ranges.iter().find(|r| r.start >= r.end) {
            return Err(MalformedSet::Empty { set: format!("{set:?}"), range: empty.clone() });
        }
        if let Some(pair) = ranges.windows(2).find(|w| w[0].end >= w[1].start) {
            let (first, second) = (pair[0].clone(), pair[1].clone());
            let set = format!("{set:?}");
            return Err(if first.end == second.start {
                MalformedSet::Touching { set, first, second }
            } else {
                MalformedSet::Unsorted { set, first, second }
            });
        }
        Ok(Sectors { ranges: ranges.to_vec() })
    }

    /// The ranges: sorted, disjoint, non-adjacent.
    pub fn ranges(&self) -> &[Range<u64>] {
        &self.ranges
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Number of sectors.
    pub fn len_sectors(&self) -> u64 {
        self.ranges.iter().map(|r| r.end - r.start).sum()
    }

    /// Whether `sector` is in the set.
    pub fn contains(&self, sector: u64) -> bool {
        // Binary search for the last range starting at or before `sector`.
        match self.ranges.binary_search_by(|r| r.start.cmp(&sector)) {
            Ok(_) => true,
            Err(0) => false,
            Err(at) => sector < self.ranges[at - 1].end,
        }
    }

    /// Every sector of either set.
    pub fn union(&self, other: &Sectors) -> Sectors {
        Sectors::from_ranges(self.ranges.iter().chain(&other.ranges).cloned())
    }

    /// The sectors of `self` that are not in `other`, by walking both lists.
    pub fn difference(&self, other: &Sectors) -> Sectors {
        let mut out = Vec::new();
        let mut cuts = other.ranges.iter().peekable();
        for range in &self.ranges {
            let mut start = range.start;
            while let Some(cut) = cuts.peek() {
                if cut.end <= start {
                    cuts.next();
                    continue;
                }
                if cut.start >= range.end {
                    break;
                }
                if cut.start > start {
                    out.push(start..cut.start);
                }
                start = cut.end;
                if start >= range.end {
                    break;
                }
                cuts.next();
            }
            if start < range.end {
                out.push(start..range.end);
            }
        }
        Sectors::from_ranges(out)
    }

    /// Whether every sector of `self` is in `other`.
    pub fn is_subset(&self, other: &Sectors) -> bool {
        self.difference(other).is_empty()
    }

    /// The sectors in both sets.
    pub fn intersection(&self, other: &Sectors) -> Sectors {
        self.difference(&self.difference(other))
    }
}

impl fmt::Debug for Sectors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.ranges.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    /// Sectors the brute-force model covers.
    const DOMAIN: u64 = 160;

    /// The brute-force model: the sectors themselves.
    fn model(ranges: &[Range<u64>]) -> BTreeSet<u64> {
        ranges.iter().flat_map(|r| r.clone()).collect()
    }

    fn sectors_of(set: &Sectors) -> BTreeSet<u64> {
        model(set.ranges())
    }

    /// Up to 8 ranges anywhere in the domain, in any order, empty, overlapping or touching.
    fn arb_ranges() -> impl Strategy<Value = Vec<Range<u64>>> {
        proptest::collection::vec((0..DOMAIN, 0u64..24).prop_map(|(start, len)| start..(start + len).min(DOMAIN)), 0..8)
    }

    /// A `RangeSet` holding exactly `ranges`, as given (serde does not normalise).
    fn raw(ranges: &[Range<u64>]) -> RangeSet {
        serde_json::from_value(serde_json::json!({
            "ranges": ranges.iter().map(|r| serde_json::json!({"start": r.start, "end": r.end})).collect::<Vec<_>>()
        }))
        .expect("a RangeSet deserializes from its ranges")
    }

    proptest! {
        // Cheap cases: as many as it takes whatever PROPTEST_CASES says (mutation testing
        // lowers it for the expensive properties).
        #![proptest_config(ProptestConfig::with_cases(1024))]

        /// Every operation agrees with a `BTreeSet` of sectors, and every result is normalised.
        #[test]
        fn operations_agree_with_a_set_of_sectors(a in arb_ranges(), b in arb_ranges()) {
            let (sa, sb) = (Sectors::from_ranges(a.clone()), Sectors::from_ranges(b.clone()));
            let (ma, mb) = (model(&a), model(&b));
            for set in [&sa, &sb, &sa.union(&sb), &sa.difference(&sb), &sa.intersection(&sb)] {
                prop_assert!(set.ranges().iter().all(|r| r.start < r.end), "an empty range in {:?}", set);
                prop_assert!(set.ranges().windows(2).all(|w| w[0].end < w[1].start), "not normalised: {:?}", set);
            }
            prop_assert_eq!(sectors_of(&sa), ma.clone());
            prop_assert_eq!(sectors_of(&sa.union(&sb)), ma.union(&mb).copied().collect::<BTreeSet<u64>>());
            prop_assert_eq!(sectors_of(&sa.difference(&sb)), ma.difference(&mb).copied().collect::<BTreeSet<u64>>());
            prop_assert_eq!(sectors_of(&sa.intersection(&sb)), ma.intersection(&mb).copied().collect::<BTreeSet<u64>>());
            prop_assert_eq!(sa.is_subset(&sb), ma.is_subset(&mb));
            prop_assert_eq!(sa.is_empty(), ma.is_empty());
            prop_assert_eq!(sa.len_sectors(), ma.len() as u64);
            for sector in 0..DOMAIN + 2 {
                prop_assert_eq!(sa.contains(sector), ma.contains(&sector), "sector {} of {:?}", sector, sa);
            }
            // Equal sets are equal values, however they were built.
            prop_assert!(sa.union(&sb) == sb.union(&sa));
            prop_assert_eq!(sa == sb, ma == mb);
        }

        /// `of` accepts exactly the normalised lists (non-empty, sorted, disjoint, non-adjacent
        /// ranges) and keeps their sectors; it refuses every other list, naming touching ranges.
        #[test]
        fn of_accepts_exactly_normalised_range_sets(ranges in arb_ranges()) {
            let set = raw(&ranges);
            let normalised = ranges.iter().all(|r| r.start < r.end) && ranges.windows(2).all(|w| w[0].end < w[1].start);
            match Sectors::of(&set) {
                Ok(sectors) => {
                    prop_assert!(normalised, "{:?} accepted", ranges);
                    prop_assert_eq!(sectors.ranges(), &ranges[..]);
                }
                Err(problem) => {
                    prop_assert!(!normalised, "{:?} refused: {}", ranges, problem);
                    let empty = ranges.iter().any(|r| r.start >= r.end);
                    let first_bad = ranges.windows(2).find(|w| w[0].end >= w[1].start);
                    if !empty && first_bad.is_some_and(|w| w[0].end == w[1].start) {
                        prop_assert!(problem.to_string().contains("touching"), "{}", problem);
                        prop_assert!(matches!(problem, MalformedSet::Touching { .. }), "{}", problem);
                    } else if !empty {
                        prop_assert!(problem.to_string().contains("unsorted or overlapping"), "{}", problem);
                        prop_assert!(matches!(problem, MalformedSet::Unsorted { .. }), "{}", problem);
                    } else {
                        prop_assert!(problem.to_string().contains("empty range"), "{}", problem);
                        prop_assert!(matches!(problem, MalformedSet::Empty { .. }), "{}", problem);
                    }
                }
            }
        }
    }

    /// A bitmap of 64 sectors, the model of the model.
    fn bits(set: &Sectors) -> u64 {
        (0..64).filter(|&s| set.contains(s)).fold(0, |acc, s| acc | 1 << s)
    }

    fn draw(state: &mut u64) -> Vec<Range<u64>> {
        (0..*state % 5)
            .map(|_| {
                *state = kcopyd_sim::mix64(*state);
                let start = *state % 56;
                start..start + (*state >> 20) % 8
            })
            .collect()
    }

    #[test]
    fn operations_agree_with_bitmaps() {
        let mut state = 7;
        for _ in 0..3000 {
            state = kcopyd_sim::mix64(state);
            let (a, b) = (draw(&mut state), draw(&mut state));
            let mask = |ranges: &[Range<u64>]| ranges.iter().flat_map(|r| r.clone()).fold(0u64, |m, s| m | 1 << s);
            let (sa, sb) = (Sectors::from_ranges(a.clone()), Sectors::from_ranges(b.clone()));
            assert_eq!(bits(&sa), mask(&a), "{a:?}");
            assert!(sa.ranges().windows(2).all(|w| w[0].end < w[1].start), "{sa:?}");
            assert_eq!(bits(&sa.union(&sb)), mask(&a) | mask(&b));
            assert_eq!(bits(&sa.difference(&sb)), mask(&a) & !mask(&b), "{sa:?} - {sb:?}");
            assert_eq!(bits(&sa.intersection(&sb)), mask(&a) & mask(&b));
            assert_eq!(sa.is_subset(&sb), mask(&a) & !mask(&b) == 0);
            assert_eq!(sa.len_sectors(), u64::from(mask(&a).count_ones()));
        }
    }

    #[test]
    fn a_range_set_with_touching_ranges_is_refused() {
        let set: RangeSet = [0..8, 8..16, 20..24].into_iter().collect();
        assert_eq!(Sectors::of(&set).unwrap().ranges(), &[0..16, 20..24]);
        // A malformed set can only come from serde (the engine's type keeps its own invariant).
        let touching: RangeSet = serde_json::from_str(r#"{"ranges":[{"start":0,"end":8},{"start":8,"end":16}]}"#)
            .expect("a RangeSet deserializes from its ranges");
        let error = Sectors::of(&touching).unwrap_err();
        assert!(matches!(error, MalformedSet::Touching { .. }) && error.to_string().contains("touching"), "{error}");
        let unsorted: RangeSet = serde_json::from_str(r#"{"ranges":[{"start":9,"end":12},{"start":0,"end":8}]}"#)
            .expect("a RangeSet deserializes from its ranges");
        assert!(Sectors::of(&unsorted).is_err());
    }
}
