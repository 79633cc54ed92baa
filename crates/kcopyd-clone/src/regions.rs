//! The in-memory state of every region: hydrated or not (the bitmap), who is working on it
//! (a copy, or a foreground write that covers it whole), failed attempts, the hints that reads
//! leave, and which bitmap blocks each commit slot lacks. Plain data under one mutex, never
//! held across an await.
//!
//! ```text
//!  unhydrated ──copy claimed──► Busy::Copy ──copied──► hydrated (bit set, blocks dirty)
//!       │   ▲                        └──failed: attempts+1 ──► attempts_max: given up (failed)
//!       │   └──────────── write failed ───┐
//!       └──write covers it whole──► Busy::Overwrite ──written──► hydrated
//!  every region hydrated and committed ──► the bitmap is released (Regions::released)
//! ```

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::Range;

use kcopyd_core::RangeSet;

use crate::config::HINTS_MAX;

/// Who is working on a region that is not hydrated yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Busy {
    /// A copy job is in flight (started by the background hydration, or for a write).
    Copy { background: bool },
    /// A foreground write or discard covering the whole region is in flight.
    Overwrite,
}

/// What a foreground write must do about the regions it touches.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Claim {
    /// Some region is busy: wait for a change and ask again.
    Wait,
    /// A region the write covers only in part is given up on.
    GivenUp(u64),
    /// Claimed: regions the write covers whole (`overwrite`, the write hydrates them) and
    /// regions to copy first (`copy`, marked busy with a foreground copy).
    Ready { overwrite: Vec<u64>, copy: Vec<u64> },
}

/// A commit's view of the bitmap.
#[derive(Debug)]
pub(crate) struct Snapshot {
    pub(crate) bitmap: Vec<u8>,
    pub(crate) hydrated: u64,
    pub(crate) version: u64,
    /// Bitmap blocks the slot lacks, as runs of block indices.
    pub(crate) blocks: Vec<Range<u64>>,
}

/// Every region's state.
#[derive(Debug)]
pub(crate) struct Regions {
    pub(crate) region_sectors: u64,
    pub(crate) region_count: u64,
    pub(crate) len_sectors: u64,
    /// One bit a region; `None` once every region is hydrated and that is committed.
    bitmap: Option<Vec<u64>>,
    hydrated: u64,
    /// Bumped on every bit set: a commit whose snapshot has the latest version lacks nothing.
    version: u64,
    busy: BTreeMap<u64, Busy>,
    attempts: BTreeMap<u64, u32>,
    failed: BTreeSet<u64>,
    hints: VecDeque<u64>,
    hints_total: u64,
    cursor: u64,
    regions_per_block: u64,
    /// Bitmap blocks changed since each slot was last written.
    dirty: [BTreeSet<u64>; 2],
}

impl Regions {
    /// The state of a clone of `len_sectors` in regions of `region_sectors`, from the bitmap
    /// bytes of its latest commit. `stale_slot`'s blocks are all marked as lacking.
    pub(crate) fn new(
        region_sectors: u64,
        len_sectors: u64,
        bitmap_bytes: &[u8],
        regions_per_block: u64,
        stale_slot: usize,
    ) -> Regions {
        let region_count = len_sectors.div_ceil(region_sectors);
        assert_eq!(bitmap_bytes.len() as u64, region_count.div_ceil(8), "bitmap of {region_count} regions");
        let mut words = vec![0u64; region_count.div_ceil(64) as usize];
        for (i, byte) in bitmap_bytes.iter().enumerate() {
            words[i / 8] |= u64::from(*byte) << (8 * (i % 8));
        }
        let hydrated = words.iter().map(|w| u64::from(w.count_ones())).sum();
        let mut dirty = [BTreeSet::new(), BTreeSet::new()];
        dirty[stale_slot] = (0..region_count.div_ceil(regions_per_block).max(1)).collect();
        let mut regions = Regions {
            region_sectors,
            region_count,
            len_sectors,
            bitmap: Some(words),
            hydrated,
            version: 0,
            busy: BTreeMap::new(),
            attempts: BTreeMap::new(),
            failed: BTreeSet::new(),
            hints: VecDeque::new(),
            hints_total: 0,
            cursor: 0,
            regions_per_block,
            dirty,
        };
        if hydrated == region_count {
            regions.release();
        }
        regions
    }

    /// Whether every region is hydrated and committed (the bitmap is gone).
    pub(crate) fn released(&self) -> bool {
        self.bitmap.is_none()
    }

    fn release(&mut self) {
        self.bitmap = None;
        self.dirty = [BTreeSet::new(), BTreeSet::new()];
        self.hints.clear();
        self.attempts.clear();
        self.failed.clear();
    }

    pub(crate) fn is_hydrated(&self, region: u64) -> bool {
        match &self.bitmap {
            None => true,
            Some(words) => words[(region / 64) as usize] & (1 << (region % 64)) != 0,
        }
    }

    fn set_hydrated(&mut self, region: u64) {
        let words = self.bitmap.as_mut().expect("a released bitmap has every region hydrated");
        let word = &mut words[(region / 64) as usize];
        if *word & (1 << (region % 64)) == 0 {
            *word |= 1 << (region % 64);
            self.hydrated += 1;
            self.version += 1;
            let block = region / self.regions_per_block;
            self.dirty[0].insert(block);
            self.dirty[1].insert(block);
        }
        self.attempts.remove(&region);
        self.failed.remove(&region);
    }

    /// The sectors of `region` (the last one may be short).
    pub(crate) fn sectors(&self, region: u64) -> Range<u64> {
        let start = region * self.region_sectors;
        start..(start + self.region_sectors).min(self.len_sectors)
    }

    /// The regions `sectors` touches (non-empty, inside the clone).
    pub(crate) fn touched(&self, sectors: &Range<u64>) -> Range<u64> {
        sectors.start / self.region_sectors..(sectors.end - 1) / self.region_sectors + 1
    }

    /// Splits a read of `sectors` into runs served by the destination (`true`, hydrated) or
    /// the source (`false`), and leaves a hint for each unhydrated region that nobody works on.
    pub(crate) fn read_plan(&mut self, sectors: Range<u64>) -> Vec<(Range<u64>, bool)> {
        let mut runs: Vec<(Range<u64>, bool)> = Vec::new();
        for region in self.touched(&sectors) {
            let hydrated = self.is_hydrated(region);
            if !hydrated {
                self.hint(region);
            }
            let part = self.sectors(region);
            let part = part.start.max(sectors.start)..part.end.min(sectors.end);
            match runs.last_mut() {
                Some((run, side)) if *side == hydrated => run.end = part.end,
                _ => runs.push((part, hydrated)),
            }
        }
        runs
    }

    /// Splits `sectors` into runs on the destination (`true`, hydrated) or the source, as
    /// [`Regions::read_plan`] does, without leaving hints (an allocation query is no read).
    pub(crate) fn sides(&self, sectors: Range<u64>) -> Vec<(Range<u64>, bool)> {
        let mut runs: Vec<(Range<u64>, bool)> = Vec::new();
        for region in self.touched(&sectors) {
            let hydrated = self.is_hydrated(region);
            let part = self.sectors(region);
            let part = part.start.max(sectors.start)..part.end.min(sectors.end);
            match runs.last_mut() {
                Some((run, side)) if *side == hydrated => run.end = part.end,
                _ => runs.push((part, hydrated)),
            }
        }
        runs
    }

    /// Hints queued so far (ever), to count them.
    pub(crate) fn hints_queued(&self) -> u64 {
        self.hints_total
    }

    /// Queues `region` to be hydrated ahead of the background order. Returns whether it was
    /// queued (not already queued, nobody on it, not given up on, room left).
    pub(crate) fn hint(&mut self, region: u64) -> bool {
        let wanted = !self.is_hydrated(region) && !self.busy.contains_key(&region) && !self.failed.contains(&region);
        if wanted && self.hints.len() < HINTS_MAX && !self.hints.contains(&region) {
            self.hints.push_back(region);
            self.hints_total += 1;
            return true;
        }
        false
    }

    /// What a write of `sectors` must do first; claims the regions when it can go on.
    pub(crate) fn claim_for_write(&mut self, sectors: &Range<u64>) -> Claim {
        let touched = self.touched(sectors);
        let mut overwrite = Vec::new();
        let mut copy = Vec::new();
        for region in touched.clone() {
            if self.is_hydrated(region) {
                continue;
            }
            if self.busy.contains_key(&region) {
                return Claim::Wait;
            }
            let whole = self.sectors(region);
            if sectors.start <= whole.start && whole.end <= sectors.end {
                overwrite.push(region);
            } else if self.failed.contains(&region) {
                return Claim::GivenUp(region);
            } else {
                copy.push(region);
            }
        }
        overwrite.iter().for_each(|&r| _ = self.busy.insert(r, Busy::Overwrite));
        copy.iter().for_each(|&r| _ = self.busy.insert(r, Busy::Copy { background: false }));
        Claim::Ready { overwrite, copy }
    }

    /// Whether `region` is being copied or overwritten.
    pub(crate) fn is_busy(&self, region: u64) -> bool {
        self.busy.contains_key(&region)
    }

    /// A write's claimed regions after the write: hydrated if it succeeded, free otherwise.
    pub(crate) fn finish_overwrite(&mut self, regions: &[u64], written: bool) {
        for &region in regions {
            assert_eq!(self.busy.remove(&region), Some(Busy::Overwrite), "region {region} was claimed");
            if written {
                self.set_hydrated(region);
            }
        }
    }

    /// A copy of `regions` has completed; `not_copied` are the destination sectors that did
    /// not get the source's data. Returns the regions hydrated and those that failed.
    pub(crate) fn finish_copy(&mut self, regions: Range<u64>, not_copied: &RangeSet, attempts_max: u32) -> (u64, u64) {
        let (mut hydrated, mut failed) = (0, 0);
        for region in regions {
            assert!(matches!(self.busy.remove(&region), Some(Busy::Copy { .. })), "region {region} was being copied");
            if not_copied.intersects(&self.sectors(region)) {
                failed += 1;
                let attempts = self.attempts.entry(region).or_insert(0);
                *attempts += 1;
                if *attempts >= attempts_max {
                    self.failed.insert(region);
                }
            } else {
                hydrated += 1;
                self.set_hydrated(region);
            }
        }
        (hydrated, failed)
    }

    /// Regions the background hydration has in flight.
    pub(crate) fn background_in_flight(&self) -> u64 {
        self.busy.values().filter(|b| matches!(b, Busy::Copy { background: true })).count() as u64
    }

    /// Regions being copied or overwritten (dm-clone's "hydrating regions").
    pub(crate) fn hydrating(&self) -> u64 {
        self.busy.len() as u64
    }

    /// Whether `region` can be hydrated in the background now.
    fn wanted(&self, region: u64) -> bool {
        !self.is_hydrated(region) && !self.busy.contains_key(&region) && !self.failed.contains(&region)
    }

    /// Claims the next batch for the background hydration: up to `max` contiguous regions,
    /// starting with the oldest hint, else the next wanted region from the cursor on.
    pub(crate) fn next_batch(&mut self, max: u64) -> Option<Range<u64>> {
        let first = self.next_hint().or_else(|| self.next_from_cursor())?;
        let mut end = first + 1;
        while end < self.region_count && end - first < max && self.wanted(end) {
            end += 1;
        }
        for region in first..end {
            self.busy.insert(region, Busy::Copy { background: true });
        }
        self.cursor = end % self.region_count;
        Some(first..end)
    }

    fn next_hint(&mut self) -> Option<u64> {
        while let Some(region) = self.hints.pop_front() {
            if self.wanted(region) {
                return Some(region);
            }
        }
        None
    }

    /// The first wanted region at or after the cursor, wrapping around once; whole words of
    /// hydrated regions are skipped at once.
    fn next_from_cursor(&self) -> Option<u64> {
        let words = self.bitmap.as_ref()?;
        let count = self.region_count;
        let mut scanned = 0;
        let mut region = self.cursor;
        while scanned < count {
            let word = words[(region / 64) as usize];
            if region % 64 == 0 && word == u64::MAX {
                let step = 64.min(count - region);
                scanned += step;
                region = (region + step) % count;
                continue;
            }
            if self.wanted(region) {
                return Some(region);
            }
            scanned += 1;
            region = (region + 1) % count;
        }
        None
    }

    /// Whether nothing is left for the background: every region hydrated or given up on, and
    /// none in flight.
    pub(crate) fn settled(&self) -> bool {
        self.busy.is_empty() && self.hydrated + self.failed.len() as u64 == self.region_count
    }

    /// Regions hydrated.
    pub(crate) fn hydrated(&self) -> u64 {
        if self.released() { self.region_count } else { self.hydrated }
    }

    /// Regions given up on.
    pub(crate) fn failed(&self) -> Vec<u64> {
        self.failed.iter().copied().collect()
    }

    /// Forgets failed attempts: given-up regions are tried again.
    pub(crate) fn retry_failed(&mut self) {
        self.failed.clear();
        self.attempts.clear();
    }

    /// The bitmap version: changes whenever a region becomes hydrated.
    pub(crate) fn version(&self) -> u64 {
        self.version
    }

    /// The bitmap for a commit to `slot`, taking the blocks that slot lacks. `None` once the
    /// bitmap is released (nothing left to commit).
    pub(crate) fn snapshot(&mut self, slot: usize) -> Option<Snapshot> {
        let words = self.bitmap.as_ref()?;
        let mut bitmap: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        bitmap.truncate(self.region_count.div_ceil(8) as usize);
        let mut blocks: Vec<Range<u64>> = Vec::new();
        for block in std::mem::take(&mut self.dirty[slot]) {
            match blocks.last_mut() {
                Some(run) if run.end == block => run.end += 1,
                _ => blocks.push(block..block + 1),
            }
        }
        Some(Snapshot { bitmap, hydrated: self.hydrated, version: self.version, blocks })
    }

    /// A commit of `snapshot` to `slot` has ended. On failure the slot lacks its blocks again;
    /// on success with every region hydrated the bitmap is released.
    pub(crate) fn committed(&mut self, slot: usize, snapshot: &Snapshot, ok: bool) {
        if self.released() {
            return;
        }
        if !ok {
            self.dirty[slot].extend(snapshot.blocks.iter().flat_map(|run| run.clone()));
        } else if snapshot.hydrated == self.region_count {
            self.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regions(count: u64) -> Regions {
        Regions::new(8, count * 8, &vec![0; count.div_ceil(8) as usize], 32768, 1)
    }

    /// A small deterministic generator (xorshift64*), for the scan's cases.
    fn next(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// The cursor's scan, against the plain definition it speeds up (the first wanted region
    /// at or after the cursor, wrapping once), over bitmaps of whole hydrated words, partial
    /// last words, regions busy and given up on, and every kind of cursor.
    #[test]
    fn the_cursor_scan_finds_what_a_region_by_region_scan_finds() {
        let mut state = 0x9e37_79b9_7f4a_7c15;
        for case in 0..4000 {
            let count = 1 + next(&mut state) % 300;
            let mut bits = vec![0u8; count.div_ceil(8) as usize];
            for word in 0..count.div_ceil(64) {
                // Half the words whole (the scan skips them), the rest mostly hydrated.
                let whole = next(&mut state) % 2 == 0;
                for region in word * 64..((word + 1) * 64).min(count) {
                    if whole || next(&mut state) % 8 != 0 {
                        bits[(region / 8) as usize] |= 1 << (region % 8);
                    }
                }
            }
            let mut r = Regions::new(8, count * 8, &bits, 32768, 1);
            if r.released() {
                continue;
            }
            for _ in 0..next(&mut state) % 4 {
                let region = next(&mut state) % count;
                if !r.is_hydrated(region) {
                    match next(&mut state) % 2 {
                        0 => r.failed.insert(region),
                        _ => r.busy.insert(region, Busy::Overwrite).is_none(),
                    };
                }
            }
            r.cursor = match next(&mut state) % 3 {
                0 => next(&mut state) % count,
                1 => (next(&mut state) % count.div_ceil(64)) * 64 % count,
                _ => count - 1,
            };
            let expected = (0..count).map(|i| (r.cursor + i) % count).find(|&region| r.wanted(region));
            assert_eq!(r.next_from_cursor(), expected, "case {case}: {count} regions, cursor {}", r.cursor);
        }
    }

    #[test]
    fn a_write_copies_the_regions_it_covers_in_part_and_claims_those_it_covers_whole() {
        let mut r = regions(4);
        // Sectors 4..20: region 0 in part, region 1 whole, region 2 in part.
        assert_eq!(r.claim_for_write(&(4..20)), Claim::Ready { overwrite: vec![1], copy: vec![0, 2] });
        assert_eq!(r.claim_for_write(&(16..17)), Claim::Wait, "region 2 is being copied");
        r.finish_copy(0..1, &RangeSet::new(), 3);
        r.finish_copy(2..3, &RangeSet::from_range(20..21), 3);
        r.finish_overwrite(&[1], true);
        assert!(r.is_hydrated(0) && r.is_hydrated(1) && !r.is_hydrated(2));
        assert_eq!(r.claim_for_write(&(16..17)), Claim::Ready { overwrite: vec![], copy: vec![2] });
    }

    #[test]
    fn a_region_is_given_up_after_its_attempts_and_a_whole_write_still_hydrates_it() {
        let mut r = regions(2);
        let mut batches = Vec::new();
        while let Some(batch) = r.next_batch(1) {
            let failing = if batch.start == 0 { RangeSet::from_range(0..8) } else { RangeSet::new() };
            r.finish_copy(batch.clone(), &failing, 2);
            batches.push(batch);
        }
        assert_eq!(batches, vec![0..1, 1..2, 0..1], "region 0 twice, then given up");
        assert_eq!(r.failed(), vec![0]);
        assert!(r.settled());
        assert_eq!(r.claim_for_write(&(0..4)), Claim::GivenUp(0));
        assert_eq!(r.claim_for_write(&(0..8)), Claim::Ready { overwrite: vec![0], copy: vec![] });
        r.finish_overwrite(&[0], true);
        assert!(r.failed().is_empty());
        let snapshot = r.snapshot(0).unwrap();
        assert_eq!(snapshot.hydrated, 2);
        r.committed(0, &snapshot, true);
        assert!(r.released(), "the bitmap goes once everything is committed");
    }

    #[test]
    fn hints_come_first_and_batches_stop_at_hydrated_or_busy_regions() {
        let mut r = regions(200);
        r.finish_overwrite(&[], true);
        assert!(r.hint(150));
        assert!(!r.hint(150), "already queued");
        assert_eq!(r.next_batch(4), Some(150..154));
        assert_eq!(r.next_batch(100), Some(154..200), "a batch does not wrap");
        assert_eq!(r.next_batch(100), Some(0..100));
        assert_eq!(r.next_batch(100), Some(100..150), "stops before the busy region 150");
    }

    #[test]
    fn a_failed_commit_leaves_its_blocks_dirty_for_the_next() {
        let mut r = Regions::new(8, 8 * 100_000, &vec![0; 12_500], 32768, 1);
        assert_eq!(r.snapshot(1).unwrap().blocks, vec![0..4], "a stale slot lacks every block");
        r.finish_overwrite(&[], true);
        assert_eq!(
            r.claim_for_write(&(8 * 70_000..8 * 70_001)),
            Claim::Ready { overwrite: vec![70_000], copy: vec![] }
        );
        r.finish_overwrite(&[70_000], true);
        let snapshot = r.snapshot(0).unwrap();
        assert_eq!(snapshot.blocks, vec![2..3]);
        r.committed(0, &snapshot, false);
        assert_eq!(r.snapshot(0).unwrap().blocks, vec![2..3]);
    }
}
