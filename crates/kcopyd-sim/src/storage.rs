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
//!
//! With `headers_only`, a disk fills and checks only the 40-byte header of each pattern
//! sector on its data path; the 472-byte body of a read is left as the buffer held it:
//!
//! ```text
//!  whole sector:  [ MAGIC seed sector generation check | body body body … body ]  512 bytes
//!  headers_only:  [ MAGIC seed sector generation check | (untouched)           ]  40 bytes moved
//! ```
//!
//! Provenance (which disk, sector and generation a sector came from) still travels with
//! every sector, so a misdirected, skipped or stale write is still caught; damage to a body
//! is not. Zero and data sectors move whole in both modes.

use std::collections::BTreeMap;
use std::ops::Range;

use bytes::Bytes;
use kcopyd_core::{RangeSet, SECTOR_SIZE};
use serde::{Deserialize, Serialize};

use crate::mix64;

const MAGIC: u64 = 0x6b63_6f70_7964_2d73; // "kcopyd-s"
const WORDS: usize = SECTOR_SIZE / 8;
const HEADER_WORDS: usize = 5;
/// Bytes of a pattern sector's header: all that a `headers_only` disk fills and checks.
const HEADER_BYTES: usize = HEADER_WORDS * 8;
const _: () = assert!(HEADER_BYTES < SECTOR_SIZE && SECTOR_SIZE % 8 == 0);

/// Spreads a sector number over the check word. Odd, so multiplying by it is a bijection:
/// two sector numbers never give the same product.
const SECTOR_SPREAD: u64 = 0x9e37_79b9_7f4a_7c15;

/// The constants of one run of pattern sectors: its seed and generation, and the part of
/// the check word that all its sectors share (computed once per run, not once per sector).
#[derive(Debug, Clone, Copy)]
struct PatternRun {
    seed: u64,
    generation: u64,
    run_check: u64,
}

impl PatternRun {
    fn new(seed: u64, generation: u64) -> PatternRun {
        PatternRun { seed, generation, run_check: mix64(MAGIC ^ seed ^ mix64(generation)) }
    }

    /// The check word of sector `sector`. Damage to any one header word breaks the match:
    /// the seed and generation go through `mix64` (a bijection), the sector number through
    /// an odd multiplier (a bijection too).
    fn check_word(&self, sector: u64) -> u64 {
        self.run_check ^ sector.wrapping_mul(SECTOR_SPREAD)
    }

    /// Writes sector `sector` of the run into `out` (512 bytes): the header, and the body
    /// unless `header_only`.
    fn fill(&self, sector: u64, out: &mut [u8], header_only: bool) {
        let check = self.check_word(sector);
        write_header(self.seed, self.generation, sector, check, out);
        if !header_only {
            let body = mix64(check).to_le_bytes();
            for word in out[HEADER_BYTES..].chunks_exact_mut(8) {
                word.copy_from_slice(&body);
            }
        }
    }

    /// How many sectors from the start of `sectors` are sectors `first`, `first + 1`, … of
    /// the run: headers always checked, bodies unless `header_only`.
    fn continued_by(&self, sectors: &[u8], first: u64, header_only: bool) -> u64 {
        let mut count = 0;
        for sector in sectors.chunks_exact(SECTOR_SIZE) {
            let number = first + count;
            let check = self.check_word(number);
            let expected = [MAGIC, self.seed, number, self.generation, check];
            let mut words = sector.chunks_exact(8).map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")));
            if !expected.iter().all(|&value| words.next() == Some(value)) {
                break;
            }
            let body = mix64(check);
            if !header_only && !words.all(|word| word == body) {
                break;
            }
            count += 1;
        }
        count
    }
}

/// Writes the 40-byte header of pattern sector `sector` into the start of `out`.
fn write_header(seed: u64, generation: u64, sector: u64, check: u64, out: &mut [u8]) {
    let header = [MAGIC, seed, sector, generation, check];
    for (word, value) in out[..HEADER_BYTES].chunks_exact_mut(8).zip(header) {
        word.copy_from_slice(&value.to_le_bytes());
    }
}

/// The pattern sector named by a sector's header, if the header is a valid one (the body
/// is not looked at).
fn header_provenance(sector: &[u8]) -> Option<Provenance> {
    let word = |i: usize| u64::from_le_bytes(sector[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    if word(0) != MAGIC {
        return None;
    }
    let (seed, sector_number, generation, check) = (word(1), word(2), word(3), word(4));
    (check == PatternRun::new(seed, generation).check_word(sector_number)).then_some(Provenance::Pattern {
        seed,
        generation,
        sector: sector_number,
    })
}

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
    PatternRun::new(seed, generation).fill(sector, out, false);
}

/// Tells what a 512-byte sector holds.
pub fn provenance_of(sector: &[u8]) -> Provenance {
    assert_eq!(sector.len(), SECTOR_SIZE);
    let word = |i: usize| u64::from_le_bytes(sector[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    if let Some(pattern) = header_provenance(sector) {
        let body = mix64(word(4));
        if (HEADER_WORDS..WORDS).all(|i| word(i) == body) {
            return pattern;
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
pub(crate) enum RunContent {
    Zero,
    /// Sector `origin + i` of the pattern (seed, generation) at the run's sector `i`.
    Pattern {
        seed: u64,
        generation: u64,
        origin: u64,
    },
    Data(Bytes),
}

/// How a disk holds its sectors.
enum Layout {
    Dense(Vec<u8>),
    /// Runs keyed by start sector; they cover the disk without gaps or overlaps.
    Extents(BTreeMap<u64, (u64, RunContent)>),
}

/// A disk's bytes, and how much of each pattern sector its data path moves.
pub(crate) struct Storage {
    layout: Layout,
    /// Fill and check only the header of pattern sectors (see the module's overview).
    headers_only: bool,
}

impl Storage {
    pub(crate) fn new(len_sectors: u64, sparse: bool, headers_only: bool) -> Storage {
        let layout = if sparse {
            let mut map = BTreeMap::new();
            if len_sectors > 0 {
                map.insert(0, (len_sectors, RunContent::Zero));
            }
            Layout::Extents(map)
        } else {
            let len_bytes = usize::try_from(len_sectors).expect("fits in memory") * SECTOR_SIZE;
            Layout::Dense(vec![0; len_bytes])
        };
        Storage { layout, headers_only }
    }

    /// Number of runs held (1 per contiguous provenance run); 0 for dense storage.
    pub(crate) fn extents(&self) -> usize {
        match &self.layout {
            Layout::Dense(_) => 0,
            Layout::Extents(map) => map.len(),
        }
    }

    /// What one written sector holds, as this storage looks at it: a `headers_only` storage
    /// takes a valid pattern header for the whole pattern sector.
    fn classify(&self, sector: &[u8]) -> Provenance {
        match self.headers_only.then(|| header_provenance(sector)).flatten() {
            Some(pattern) => pattern,
            None => provenance_of(sector),
        }
    }

    /// Reads sectors from `start` into `out` (a whole number of sectors), as the data path
    /// does: a `headers_only` storage fills only the header of each pattern sector.
    pub(crate) fn read(&self, start: u64, out: &mut [u8]) {
        assert_eq!(out.len() % SECTOR_SIZE, 0);
        match &self.layout {
            Layout::Dense(bytes) => {
                let at = start as usize * SECTOR_SIZE;
                out.copy_from_slice(&bytes[at..at + out.len()]);
            }
            Layout::Extents(map) => {
                let end = start + (out.len() / SECTOR_SIZE) as u64;
                for (run_start, (run_len, content)) in overlapping(map, start..end) {
                    let lo = run_start.max(start);
                    let hi = (run_start + run_len).min(end);
                    let piece = &mut out[(lo - start) as usize * SECTOR_SIZE..(hi - start) as usize * SECTOR_SIZE];
                    match content {
                        RunContent::Zero => piece.fill(0),
                        RunContent::Pattern { seed, generation, origin } => {
                            let run = PatternRun::new(*seed, *generation);
                            let first = origin + (lo - run_start);
                            for (i, sector) in piece.chunks_exact_mut(SECTOR_SIZE).enumerate() {
                                run.fill(first + i as u64, sector, self.headers_only);
                            }
                        }
                        RunContent::Data(data) => {
                            let from = (lo - run_start) as usize * SECTOR_SIZE;
                            piece.copy_from_slice(&data[from..from + piece.len()]);
                        }
                    }
                }
            }
        }
    }

    /// Reads sectors from `start` into `out` whole: what the disk holds, every pattern
    /// sector with its body (for snapshots, whatever the data path moves).
    pub(crate) fn read_whole(&self, start: u64, out: &mut [u8]) {
        self.read(start, out);
        if self.headers_only {
            for sector in out.chunks_exact_mut(SECTOR_SIZE) {
                if let Some(Provenance::Pattern { seed, generation, sector: number }) = header_provenance(sector) {
                    pattern_sector(seed, generation, number, sector);
                }
            }
        }
    }

    /// Writes `data` (a whole number of sectors) at `start`.
    pub(crate) fn write(&mut self, start: u64, data: &[u8]) {
        assert_eq!(data.len() % SECTOR_SIZE, 0);
        if let Layout::Dense(bytes) = &mut self.layout {
            let at = start as usize * SECTOR_SIZE;
            bytes[at..at + data.len()].copy_from_slice(data);
            return;
        }
        // Split the data into runs of one provenance each: classify a sector, then take
        // every following sector that continues its pattern run in one sweep.
        let count = data.len() / SECTOR_SIZE;
        let sector_at = |i: usize| &data[i * SECTOR_SIZE..(i + 1) * SECTOR_SIZE];
        let mut runs: Vec<(u64, u64, RunContent)> = Vec::new();
        let mut i = 0;
        while i < count {
            let (content, len) = match self.classify(sector_at(i)) {
                Provenance::Zero => (RunContent::Zero, 1),
                Provenance::Pattern { seed, generation, sector } => {
                    let rest = &data[(i + 1) * SECTOR_SIZE..];
                    let more = PatternRun::new(seed, generation).continued_by(rest, sector + 1, self.headers_only);
                    (RunContent::Pattern { seed, generation, origin: sector }, 1 + more)
                }
                Provenance::Data(_) => {
                    // Data runs on to the next sector that is not data; copied once.
                    let mut end = i + 1;
                    while end < count && matches!(self.classify(sector_at(end)), Provenance::Data(_)) {
                        end += 1;
                    }
                    let bytes = Bytes::copy_from_slice(&data[i * SECTOR_SIZE..end * SECTOR_SIZE]);
                    (RunContent::Data(bytes), (end - i) as u64)
                }
            };
            let at = start + i as u64;
            match runs.last_mut() {
                Some((_, run_len, last)) if matches!((&*last, &content), (RunContent::Zero, RunContent::Zero)) => {
                    *run_len += len
                }
                _ => runs.push((at, len, content)),
            }
            i += len as usize;
        }
        for (run_start, run_len, content) in runs {
            self.set(run_start..run_start + run_len, content);
        }
    }

    /// Zeroes `sectors`.
    pub(crate) fn zero(&mut self, sectors: Range<u64>) {
        match &mut self.layout {
            Layout::Dense(bytes) => {
                bytes[sectors.start as usize * SECTOR_SIZE..sectors.end as usize * SECTOR_SIZE].fill(0)
            }
            Layout::Extents(_) => self.set(sectors, RunContent::Zero),
        }
    }

    /// Fills `sectors` with generation `generation` of the pattern of `seed`, each sector
    /// holding its own number.
    pub(crate) fn fill_pattern(&mut self, sectors: Range<u64>, seed: u64, generation: u64) {
        match &mut self.layout {
            Layout::Dense(bytes) => {
                let area = &mut bytes[sectors.start as usize * SECTOR_SIZE..sectors.end as usize * SECTOR_SIZE];
                for (i, sector) in area.chunks_exact_mut(SECTOR_SIZE).enumerate() {
                    pattern_sector(seed, generation, sectors.start + i as u64, sector);
                }
            }
            Layout::Extents(_) => {
                let origin = sectors.start;
                self.set(sectors, RunContent::Pattern { seed, generation, origin })
            }
        }
    }

    /// Replaces the content of `sectors` with `content`, merging with neighbours.
    fn set(&mut self, sectors: Range<u64>, content: RunContent) {
        let Layout::Extents(map) = &mut self.layout else { unreachable!("set is for extents") };
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
        match &self.layout {
            Layout::Dense(_) => set.insert(sectors),
            Layout::Extents(map) => {
                for (run_start, (run_len, content)) in overlapping(map, sectors.clone()) {
                    if !matches!(content, RunContent::Zero) {
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
        match &self.layout {
            Layout::Dense(bytes) => {
                for sector in sectors {
                    let at = sector as usize * SECTOR_SIZE;
                    push(sector..sector + 1, self.classify(&bytes[at..at + SECTOR_SIZE]));
                }
            }
            Layout::Extents(map) => {
                for (run_start, (run_len, content)) in overlapping(map, sectors.clone()) {
                    let lo = run_start.max(sectors.start);
                    let hi = (run_start + run_len).min(sectors.end);
                    match content {
                        RunContent::Zero => push(lo..hi, Provenance::Zero),
                        RunContent::Pattern { seed, generation, origin } => push(
                            lo..hi,
                            Provenance::Pattern {
                                seed: *seed,
                                generation: *generation,
                                sector: origin + (lo - run_start),
                            },
                        ),
                        RunContent::Data(data) => {
                            for sector in lo..hi {
                                let at = (sector - run_start) as usize * SECTOR_SIZE;
                                push(sector..sector + 1, self.classify(&data[at..at + SECTOR_SIZE]));
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
fn continues(content: &RunContent, len: u64, next: &RunContent) -> bool {
    match (content, next) {
        (RunContent::Zero, RunContent::Zero) | (RunContent::Data(_), RunContent::Data(_)) => true,
        (
            RunContent::Pattern { seed, generation, origin },
            RunContent::Pattern { seed: next_seed, generation: next_generation, origin: next_origin },
        ) => seed == next_seed && generation == next_generation && origin + len == *next_origin,
        _ => false,
    }
}

/// Two adjacent runs that `continues` accepted, as one.
fn joined(first: RunContent, second: RunContent) -> RunContent {
    match (first, second) {
        (RunContent::Data(a), RunContent::Data(b)) => {
            let mut bytes = Vec::with_capacity(a.len() + b.len());
            bytes.extend_from_slice(&a);
            bytes.extend_from_slice(&b);
            RunContent::Data(Bytes::from(bytes))
        }
        (first, _) => first,
    }
}

/// Splits the run containing `at` (if any starts before it) so that a run starts at `at`.
fn split_at(map: &mut BTreeMap<u64, (u64, RunContent)>, at: u64) {
    let Some((&start, &(len, _))) = map.range(..at).next_back() else { return };
    if start + len <= at {
        return;
    }
    let (_, content) = map.remove(&start).expect("present");
    let head = at - start;
    let (first, second) = match content {
        RunContent::Zero => (RunContent::Zero, RunContent::Zero),
        RunContent::Pattern { seed, generation, origin } => (
            RunContent::Pattern { seed, generation, origin },
            RunContent::Pattern { seed, generation, origin: origin + head },
        ),
        RunContent::Data(bytes) => {
            let cut = head as usize * SECTOR_SIZE;
            (RunContent::Data(bytes.slice(..cut)), RunContent::Data(bytes.slice(cut..)))
        }
    };
    map.insert(start, (head, first));
    map.insert(at, (len - head, second));
}

/// The runs of `map` that overlap `sectors`, in order.
fn overlapping(
    map: &BTreeMap<u64, (u64, RunContent)>,
    sectors: Range<u64>,
) -> impl Iterator<Item = (u64, &(u64, RunContent))> {
    let first = map.range(..=sectors.start).next_back().map_or(sectors.start, |(&s, _)| s);
    map.range(first..sectors.end).filter(move |(s, (len, _))| *s + len > sectors.start).map(|(&s, run)| (s, run))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every layout and mode against dense whole-sector storage (the flat model of sectors
    /// as bytes): the same content as the disk holds it, the same provenance. Copies go
    /// through one buffer per storage that keeps whatever earlier copies left in it, as pool
    /// pages do, so a `headers_only` storage sees stale bodies behind fresh headers.
    fn check_against_dense(ops: &[(u8, u64, u64)]) {
        let len = 64u64;
        let len_bytes = len as usize * SECTOR_SIZE;
        let mut reference = Storage::new(len, false, false);
        let mut others = [(true, false), (true, true), (false, true)]
            .map(|(sparse, headers_only)| (Storage::new(len, sparse, headers_only), vec![0xa5; len_bytes]));
        for &(kind, start, count) in ops {
            let start = start % len;
            let count = count % (len - start) + 1;
            let sectors = start..start + count;
            let bytes = count as usize * SECTOR_SIZE;
            let to = (start * 7) % (len - count + 1);
            let data: Vec<u8> = (0..bytes).map(|i| (i as u64 ^ start) as u8 | 1).collect();
            let storages = std::iter::once((&mut reference, None)).chain(others.iter_mut().map(|(s, b)| (s, Some(b))));
            for (storage, stale) in storages {
                match kind % 4 {
                    0 => storage.zero(sectors.clone()),
                    1 => storage.fill_pattern(sectors.clone(), 9, u64::from(kind)),
                    2 => storage.write(start, &data),
                    _ => {
                        // Copy a range within the disk, as the engine would: read then write.
                        let mut fresh = vec![0; bytes];
                        let buf = stale.map_or(&mut fresh[..], |stale| &mut stale[..bytes]);
                        storage.read(start, buf);
                        storage.write(to, buf);
                    }
                }
            }
            let mut expected = vec![0; len_bytes];
            reference.read_whole(0, &mut expected);
            for (storage, _) in &others {
                let mut actual = vec![0; len_bytes];
                storage.read_whole(0, &mut actual);
                assert!(actual == expected, "content after {ops:?}");
                assert_eq!(storage.provenance(0..len), reference.provenance(0..len), "after {ops:?}");
            }
        }
    }

    #[test]
    fn every_layout_and_mode_agrees_with_dense_whole_sectors() {
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
    fn a_headers_only_read_fills_the_header_and_leaves_the_body() {
        let mut storage = Storage::new(4, true, true);
        storage.fill_pattern(0..4, 3, 1);
        let mut buf = vec![0xee; 2 * SECTOR_SIZE];
        storage.read(1, &mut buf);
        for (i, sector) in buf.chunks_exact(SECTOR_SIZE).enumerate() {
            let mut whole = [0; SECTOR_SIZE];
            pattern_sector(3, 1, 1 + i as u64, &mut whole);
            assert_eq!(sector[..HEADER_BYTES], whole[..HEADER_BYTES], "the header is the pattern's");
            assert!(sector[HEADER_BYTES..].iter().all(|&b| b == 0xee), "the body is untouched");
        }
        let mut whole = vec![0; 2 * SECTOR_SIZE];
        storage.read_whole(1, &mut whole);
        assert_eq!(provenance_of(&whole[..SECTOR_SIZE]), Provenance::Pattern { seed: 3, generation: 1, sector: 1 });
    }

    #[test]
    fn a_headers_only_write_checks_the_header_and_not_the_body() {
        let mut sector = [0; SECTOR_SIZE];
        pattern_sector(3, 0, 10, &mut sector);
        sector[HEADER_BYTES + 7] ^= 1; // damage in the body
        let (mut headers, mut whole) = (Storage::new(1, true, true), Storage::new(1, true, false));
        headers.write(0, &sector);
        whole.write(0, &sector);
        assert_eq!(headers.provenance(0..1), vec![(0..1, Provenance::Pattern { seed: 3, generation: 0, sector: 10 })]);
        assert!(matches!(whole.provenance(0..1)[..], [(_, Provenance::Data(_))]), "whole sectors see the damage");
        for byte in 0..HEADER_BYTES {
            let mut damaged = sector;
            damaged[byte] ^= 0x10; // damage in the header: the sector is no pattern sector
            headers.write(0, &damaged);
            assert!(matches!(headers.provenance(0..1)[..], [(_, Provenance::Data(_))]), "header byte {byte}");
        }
    }

    #[test]
    fn a_copied_pattern_is_kept_as_one_extent() {
        let len = 1 << 30; // 512 GiB of sectors, in a few hundred bytes
        let mut source = Storage::new(len, true, false);
        source.fill_pattern(0..len, 5, 0);
        let mut target = Storage::new(len, true, false);
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
