//! Where a simulated disk keeps its bytes: densely, or as extents of provenance.
//!
//! ```text
//!  Dense:   [ bytes ........................................................ ]
//!  Extents: [ Zero 0..100 ][ Pattern{seed 7, gen 0, origin 500} 100..900 ][ Data 900..908 ]
//! ```
//!
//! A pattern sector carries its own provenance (seed, generation, origin sector) in a
//! checked header, and its body is derived from the header. A sparse disk that receives
//! pattern sectors recognises them and keeps one extent per run instead of the bytes, so a
//! terabyte-scale copy takes memory in proportion to its runs, and can still be verified.

use std::collections::BTreeMap;
use std::ops::Range;

use bytes::Bytes;
use kcopyd_core::{RangeSet, SECTOR_SIZE};
use serde::{Deserialize, Serialize};

use crate::mix64;

const MAGIC: u64 = 0x6b63_6f70_7964_2d73; // "kcopyd-s"
const WORDS: usize = SECTOR_SIZE / 8;
const HEADER_WORDS: usize = 5;

/// What one sector holds, as far as the simulator can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Provenance {
    /// All zeroes.
    Zero,
    /// Pattern sector `sector` of generation `generation` of the disk seeded `seed`.
    Pattern {
        /// Seed of the disk the pattern came from.
        seed: u64,
        /// How many times that sector had been rewritten.
        generation: u64,
        /// The sector number the pattern was made for.
        sector: u64,
    },
    /// Anything else, identified by a hash of its bytes.
    Data(u64),
}

/// Writes pattern sector `sector` of (`seed`, `generation`) into `out` (512 bytes).
///
/// ```
/// # use kcopyd_sim::{pattern_sector, provenance_of, Provenance};
/// let mut sector = [0u8; 512];
/// pattern_sector(7, 0, 42, &mut sector);
/// assert_eq!(provenance_of(&sector), Provenance::Pattern { seed: 7, generation: 0, sector: 42 });
/// sector[300] ^= 1; // any damage is detected
/// assert!(matches!(provenance_of(&sector), Provenance::Data(_)));
/// ```
pub fn pattern_sector(seed: u64, generation: u64, sector: u64, out: &mut [u8]) {
    assert_eq!(out.len(), SECTOR_SIZE);
    let check = mix64(MAGIC ^ seed ^ mix64(sector ^ mix64(generation)));
    let body = mix64(check).to_le_bytes();
    let header = [MAGIC, seed, sector, generation, check];
    for (i, word) in out.chunks_exact_mut(8).enumerate() {
        if i < HEADER_WORDS {
            word.copy_from_slice(&header[i].to_le_bytes());
        } else {
            word.copy_from_slice(&body);
        }
    }
}

/// Tells what a 512-byte sector holds.
pub fn provenance_of(sector: &[u8]) -> Provenance {
    assert_eq!(sector.len(), SECTOR_SIZE);
    let word = |i: usize| u64::from_le_bytes(sector[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    if word(0) == MAGIC {
        let (seed, sector_number, generation, check) = (word(1), word(2), word(3), word(4));
        let expected = mix64(MAGIC ^ seed ^ mix64(sector_number ^ mix64(generation)));
        let body = mix64(check);
        if check == expected && (HEADER_WORDS..WORDS).all(|i| word(i) == body) {
            return Provenance::Pattern { seed, generation, sector: sector_number };
        }
    }
    if sector.iter().all(|&b| b == 0) {
        return Provenance::Zero;
    }
    let mut hash = 0u64;
    for i in 0..WORDS {
        hash = mix64(hash ^ word(i));
    }
    Provenance::Data(hash)
}

/// The content of a run of sectors.
#[derive(Debug, Clone)]
pub(crate) enum Content {
    Zero,
    /// Sector `origin + i` of the pattern (seed, generation) at the run's sector `i`.
    Pattern {
        seed: u64,
        generation: u64,
        origin: u64,
    },
    Data(Bytes),
}

/// A disk's bytes.
pub(crate) enum Storage {
    Dense(Vec<u8>),
    /// Runs keyed by start sector; they cover the disk without gaps or overlaps.
    Extents(BTreeMap<u64, (u64, Content)>),
}

impl Storage {
    pub(crate) fn new(len_sectors: u64, sparse: bool) -> Storage {
        if sparse {
            let mut map = BTreeMap::new();
            if len_sectors > 0 {
                map.insert(0, (len_sectors, Content::Zero));
            }
            Storage::Extents(map)
        } else {
            let len_bytes = usize::try_from(len_sectors).expect("fits in memory") * SECTOR_SIZE;
            Storage::Dense(vec![0; len_bytes])
        }
    }

    /// Number of runs held (1 per contiguous provenance run); 0 for dense storage.
    pub(crate) fn extents(&self) -> usize {
        match self {
            Storage::Dense(_) => 0,
            Storage::Extents(map) => map.len(),
        }
    }

    /// Reads sectors from `start` into `out` (a whole number of sectors).
    pub(crate) fn read(&self, start: u64, out: &mut [u8]) {
        assert_eq!(out.len() % SECTOR_SIZE, 0);
        match self {
            Storage::Dense(bytes) => {
                let at = start as usize * SECTOR_SIZE;
                out.copy_from_slice(&bytes[at..at + out.len()]);
            }
            Storage::Extents(map) => {
                let end = start + (out.len() / SECTOR_SIZE) as u64;
                for (run_start, (run_len, content)) in overlapping(map, start..end) {
                    let lo = run_start.max(start);
                    let hi = (run_start + run_len).min(end);
                    let piece = &mut out[(lo - start) as usize * SECTOR_SIZE..(hi - start) as usize * SECTOR_SIZE];
                    match content {
                        Content::Zero => piece.fill(0),
                        Content::Pattern { seed, generation, origin } => {
                            for (i, sector) in piece.chunks_exact_mut(SECTOR_SIZE).enumerate() {
                                pattern_sector(*seed, *generation, origin + (lo - run_start) + i as u64, sector);
                            }
                        }
                        Content::Data(data) => {
                            let from = (lo - run_start) as usize * SECTOR_SIZE;
                            piece.copy_from_slice(&data[from..from + piece.len()]);
                        }
                    }
                }
            }
        }
    }

    /// Writes `data` (a whole number of sectors) at `start`.
    pub(crate) fn write(&mut self, start: u64, data: &[u8]) {
        assert_eq!(data.len() % SECTOR_SIZE, 0);
        match self {
            Storage::Dense(bytes) => {
                let at = start as usize * SECTOR_SIZE;
                bytes[at..at + data.len()].copy_from_slice(data);
            }
            Storage::Extents(_) => {
                // Split the data into runs of one provenance each.
                let mut runs: Vec<(u64, u64, Content)> = Vec::new();
                for (i, sector) in data.chunks_exact(SECTOR_SIZE).enumerate() {
                    let at = start + i as u64;
                    let content = match provenance_of(sector) {
                        Provenance::Zero => Content::Zero,
                        Provenance::Pattern { seed, generation, sector } => {
                            Content::Pattern { seed, generation, origin: sector }
                        }
                        Provenance::Data(_) => Content::Data(Bytes::copy_from_slice(sector)),
                    };
                    match runs.last_mut() {
                        Some((run_start, run_len, last)) if continues(last, *run_len, &content) => {
                            if let (Content::Data(bytes), Content::Data(more)) = (last, &content) {
                                let mut joined = Vec::with_capacity(bytes.len() + more.len());
                                joined.extend_from_slice(bytes);
                                joined.extend_from_slice(more);
                                *bytes = Bytes::from(joined);
                            }
                            debug_assert_eq!(*run_start + *run_len, at);
                            *run_len += 1;
                        }
                        _ => runs.push((at, 1, content)),
                    }
                }
                for (run_start, run_len, content) in runs {
                    self.set(run_start..run_start + run_len, content);
                }
            }
        }
    }

    /// Zeroes `sectors`.
    pub(crate) fn zero(&mut self, sectors: Range<u64>) {
        match self {
            Storage::Dense(bytes) => {
                bytes[sectors.start as usize * SECTOR_SIZE..sectors.end as usize * SECTOR_SIZE].fill(0)
            }
            Storage::Extents(_) => self.set(sectors, Content::Zero),
        }
    }

    /// Fills `sectors` with generation `generation` of the pattern of `seed`, each sector
    /// holding its own number.
    pub(crate) fn fill_pattern(&mut self, sectors: Range<u64>, seed: u64, generation: u64) {
        match self {
            Storage::Dense(bytes) => {
                let area = &mut bytes[sectors.start as usize * SECTOR_SIZE..sectors.end as usize * SECTOR_SIZE];
                for (i, sector) in area.chunks_exact_mut(SECTOR_SIZE).enumerate() {
                    pattern_sector(seed, generation, sectors.start + i as u64, sector);
                }
            }
            Storage::Extents(_) => {
                let origin = sectors.start;
                self.set(sectors, Content::Pattern { seed, generation, origin })
            }
        }
    }

    /// Replaces the content of `sectors` with `content`, merging with neighbours.
    fn set(&mut self, sectors: Range<u64>, content: Content) {
        let Storage::Extents(map) = self else { unreachable!("set is for extents") };
        if sectors.is_empty() {
            return;
        }
        // Cut the runs that straddle either end, then drop everything inside.
        split_at(map, sectors.start);
        split_at(map, sectors.end);
        let inside: Vec<u64> = map.range(sectors.clone()).map(|(&s, _)| s).collect();
        for start in inside {
            map.remove(&start);
        }
        let mut start = sectors.start;
        let mut len = sectors.end - sectors.start;
        let mut content = content;
        // Merge with the run before.
        if let Some((&before, (before_len, before_content))) = map.range(..start).next_back() {
            if before + before_len == start && continues(before_content, *before_len, &content) {
                let (before_len, before_content) = map.remove(&before).expect("present");
                content = joined(before_content, content);
                start = before;
                len += before_len;
            }
        }
        // Merge with the run after.
        let end = start + len;
        if let Some((after_len, after_content)) = map.get(&end) {
            if continues(&content, len, after_content) {
                let after_len = *after_len;
                let (_, after_content) = map.remove(&end).expect("present");
                content = joined(content, after_content);
                len += after_len;
            }
        }
        map.insert(start, (len, content));
    }

    /// The sectors of `sectors` that hold anything but zero extents: everything on dense
    /// storage, the non-zero runs on sparse storage (a thin volume's allocation).
    pub(crate) fn allocated(&self, sectors: Range<u64>) -> RangeSet {
        let mut set = RangeSet::new();
        match self {
            Storage::Dense(_) => set.insert(sectors),
            Storage::Extents(map) => {
                for (run_start, (run_len, content)) in overlapping(map, sectors.clone()) {
                    if !matches!(content, Content::Zero) {
                        set.insert(run_start.max(sectors.start)..(run_start + run_len).min(sectors.end));
                    }
                }
            }
        }
        set
    }

    /// The provenance of every run overlapping `sectors`, clipped to it.
    pub(crate) fn provenance(&self, sectors: Range<u64>) -> Vec<(Range<u64>, Provenance)> {
        let mut out: Vec<(Range<u64>, Provenance)> = Vec::new();
        let mut push = |range: Range<u64>, provenance: Provenance| match out.last_mut() {
            Some((last, Provenance::Pattern { seed, generation, sector }))
                if last.end == range.start
                    && matches!(provenance, Provenance::Pattern { seed: s, generation: g, sector: o }
                        if s == *seed && g == *generation && o == *sector + (last.end - last.start)) =>
            {
                last.end = range.end
            }
            Some((last, p)) if last.end == range.start && *p == provenance && provenance == Provenance::Zero => {
                last.end = range.end
            }
            _ => out.push((range, provenance)),
        };
        match self {
            Storage::Dense(bytes) => {
                for sector in sectors {
                    let at = sector as usize * SECTOR_SIZE;
                    push(sector..sector + 1, provenance_of(&bytes[at..at + SECTOR_SIZE]));
                }
            }
            Storage::Extents(map) => {
                for (run_start, (run_len, content)) in overlapping(map, sectors.clone()) {
                    let lo = run_start.max(sectors.start);
                    let hi = (run_start + run_len).min(sectors.end);
                    match content {
                        Content::Zero => push(lo..hi, Provenance::Zero),
                        Content::Pattern { seed, generation, origin } => push(
                            lo..hi,
                            Provenance::Pattern {
                                seed: *seed,
                                generation: *generation,
                                sector: origin + (lo - run_start),
                            },
                        ),
                        Content::Data(data) => {
                            for sector in lo..hi {
                                let at = (sector - run_start) as usize * SECTOR_SIZE;
                                push(sector..sector + 1, provenance_of(&data[at..at + SECTOR_SIZE]));
                            }
                        }
                    }
                }
            }
        }
        out
    }
}

/// Whether `next` continues a run of `len` sectors of `content` without a break.
fn continues(content: &Content, len: u64, next: &Content) -> bool {
    match (content, next) {
        (Content::Zero, Content::Zero) | (Content::Data(_), Content::Data(_)) => true,
        (
            Content::Pattern { seed, generation, origin },
            Content::Pattern { seed: next_seed, generation: next_generation, origin: next_origin },
        ) => seed == next_seed && generation == next_generation && origin + len == *next_origin,
        _ => false,
    }
}

/// Two adjacent runs that `continues` accepted, as one.
fn joined(first: Content, second: Content) -> Content {
    match (first, second) {
        (Content::Data(a), Content::Data(b)) => {
            let mut bytes = Vec::with_capacity(a.len() + b.len());
            bytes.extend_from_slice(&a);
            bytes.extend_from_slice(&b);
            Content::Data(Bytes::from(bytes))
        }
        (first, _) => first,
    }
}

/// Splits the run containing `at` (if any starts before it) so that a run starts at `at`.
fn split_at(map: &mut BTreeMap<u64, (u64, Content)>, at: u64) {
    let Some((&start, &(len, _))) = map.range(..at).next_back() else { return };
    if start + len <= at {
        return;
    }
    let (_, content) = map.remove(&start).expect("present");
    let head = at - start;
    let (first, second) = match content {
        Content::Zero => (Content::Zero, Content::Zero),
        Content::Pattern { seed, generation, origin } => (
            Content::Pattern { seed, generation, origin },
            Content::Pattern { seed, generation, origin: origin + head },
        ),
        Content::Data(bytes) => {
            let cut = head as usize * SECTOR_SIZE;
            (Content::Data(bytes.slice(..cut)), Content::Data(bytes.slice(cut..)))
        }
    };
    map.insert(start, (head, first));
    map.insert(at, (len - head, second));
}

/// The runs of `map` that overlap `sectors`, in order.
fn overlapping(
    map: &BTreeMap<u64, (u64, Content)>,
    sectors: Range<u64>,
) -> impl Iterator<Item = (u64, &(u64, Content))> {
    let first = map.range(..=sectors.start).next_back().map_or(sectors.start, |(&s, _)| s);
    map.range(first..sectors.end).filter(move |(s, (len, _))| *s + len > sectors.start).map(|(&s, run)| (s, run))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flat model of sectors as bytes, against which both storages must agree.
    fn check_against_dense(ops: &[(u8, u64, u64)]) {
        let len = 64u64;
        let mut sparse = Storage::new(len, true);
        let mut dense = Storage::new(len, false);
        for &(kind, start, count) in ops {
            let start = start % len;
            let count = count % (len - start) + 1;
            match kind % 4 {
                0 => {
                    sparse.zero(start..start + count);
                    dense.zero(start..start + count);
                }
                1 => {
                    sparse.fill_pattern(start..start + count, 9, u64::from(kind));
                    dense.fill_pattern(start..start + count, 9, u64::from(kind));
                }
                2 => {
                    let data: Vec<u8> =
                        (0..count as usize * SECTOR_SIZE).map(|i| (i as u64 ^ start) as u8 | 1).collect();
                    sparse.write(start, &data);
                    dense.write(start, &data);
                }
                _ => {
                    // Copy a range within the disk, as the engine would: read then write.
                    let mut buf = vec![0; count as usize * SECTOR_SIZE];
                    let to = (start * 7) % (len - count + 1);
                    sparse.read(start, &mut buf);
                    sparse.write(to, &buf);
                    dense.read(start, &mut buf);
                    dense.write(to, &buf);
                }
            }
            let (mut a, mut b) = (vec![0; len as usize * SECTOR_SIZE], vec![0; len as usize * SECTOR_SIZE]);
            sparse.read(0, &mut a);
            dense.read(0, &mut b);
            assert_eq!(a, b, "after {ops:?}");
            assert_eq!(sparse.provenance(0..len), dense.provenance(0..len));
        }
    }

    #[test]
    fn sparse_and_dense_storage_agree() {
        let mut state = 1u64;
        for _ in 0..200 {
            let ops: Vec<(u8, u64, u64)> = (0..12)
                .map(|_| {
                    state = mix64(state);
                    (state as u8, state >> 8 & 0xff, state >> 16 & 0xff)
                })
                .collect();
            check_against_dense(&ops);
        }
    }

    #[test]
    fn a_copied_pattern_is_kept_as_one_extent() {
        let len = 1 << 30; // 512 GiB of sectors, in a few hundred bytes
        let mut source = Storage::new(len, true);
        source.fill_pattern(0..len, 5, 0);
        let mut target = Storage::new(len, true);
        let mut buf = vec![0; 1024 * SECTOR_SIZE];
        for chunk in 0..256u64 {
            source.read(chunk * 1024, &mut buf);
            target.write(chunk * 1024 + 8, &buf);
        }
        assert_eq!(target.extents(), 3, "zero head, one pattern run, zero tail");
        assert_eq!(
            target.provenance(8..8 + 256 * 1024),
            vec![(8..8 + 256 * 1024, Provenance::Pattern { seed: 5, generation: 0, sector: 0 })]
        );
    }
}
