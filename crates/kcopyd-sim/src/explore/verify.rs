//! After a run: does every target hold the source's data (or zeroes) wherever the engine said
//! it did? Checked through provenance, so a terabyte of sparse pattern costs a few extents.
//!
//! ```text
//!  source runs  [P(7,0,100) 100..900]           relative to the job's start, holes removed:
//!  target runs  [P(7,0,100) 5100..5600][Z ..]  ─►  compare run by run; a difference counts
//!  not_copied   5600..5900 (skipped blocks)         its sectors as mismatched
//! ```
//!
//! An entry is checked only when nothing else wrote what it reads or writes: no other entry's
//! targets and no foreground writes on its disks, no overlap among its own repetitions.

use std::collections::BTreeMap;
use std::ops::Range;

use kcopyd_core::RangeSet;
use serde::Serialize;

use super::scenario::{JobKind, Scenario};
use crate::{MemDisk, Provenance};

/// What the check of one `[[jobs]]` entry found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Verification {
    /// Whether the entry was checked (see `note` when not).
    pub checked: bool,
    /// Target sectors compared (all targets, without the ones reported not copied).
    pub sectors: u64,
    /// Target sectors that did not hold what the engine said they hold.
    pub mismatched_sectors: u64,
    /// Why the entry was not checked, if it was not.
    pub note: String,
}

/// What one run of sectors holds, independent of where the run sits: patterns by the origin
/// of the job's first sector, so a copied run and its source compare equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    Zero,
    Pattern { seed: u64, generation: u64, origin: u64 },
    Data(u64),
}

/// Runs relative to `base`, without `holes` (relative too), adjacent equal keys merged.
fn canonical(runs: &[(Range<u64>, Provenance)], base: u64, holes: &RangeSet) -> Vec<(Range<u64>, Key)> {
    let mut out: Vec<(Range<u64>, Key)> = Vec::new();
    for (range, provenance) in runs {
        let relative = range.start - base..range.end - base;
        let key = match *provenance {
            Provenance::Zero => Key::Zero,
            Provenance::Pattern { seed, generation, sector } => {
                Key::Pattern { seed, generation, origin: sector.wrapping_sub(relative.start) }
            }
            Provenance::Data(hash) => Key::Data(hash),
        };
        for piece in RangeSet::from_range(relative).difference(holes).ranges() {
            match out.last_mut() {
                Some((last, last_key)) if last.end == piece.start && *last_key == key => last.end = piece.end,
                _ => out.push((piece.clone(), key)),
            }
        }
    }
    out
}

/// Sectors where two canonical lists disagree (a sector in only one of them counts too).
fn mismatched(expected: &[(Range<u64>, Key)], found: &[(Range<u64>, Key)]) -> u64 {
    let total = |runs: &[(Range<u64>, Key)]| runs.iter().map(|(r, _)| r.end - r.start).sum::<u64>();
    let mut agreeing = 0;
    let (mut i, mut j) = (0, 0);
    while i < expected.len() && j < found.len() {
        let (a, ka) = &expected[i];
        let (b, kb) = &found[j];
        let overlap = a.start.max(b.start)..a.end.min(b.end);
        if overlap.start < overlap.end && ka == kb {
            agreeing += overlap.end - overlap.start;
        }
        if a.end <= b.end {
            i += 1;
        } else {
            j += 1;
        }
    }
    total(expected).max(total(found)) - agreeing
}

/// Sectors of one disk, by name.
type Span = (String, Range<u64>);

/// The span each entry covers on each disk: for its source, and for its targets.
fn spans(scenario: &Scenario, index: usize) -> (Vec<Span>, Vec<Span>) {
    let job = &scenario.jobs[index];
    let (len, stride) = scenario.job_regions(index).expect("validated");
    let span = stride * (job.count - 1) + len;
    let sources = job.source.iter().map(|s| (s.clone(), job.source_start_sector..job.source_start_sector + span));
    let targets = job.targets.iter().map(|t| (t.clone(), job.target_start_sector..job.target_start_sector + span));
    (sources.collect(), targets.collect())
}

fn overlaps(a: &[Span], b: &[Span]) -> Option<String> {
    a.iter()
        .find(|(disk, range)| b.iter().any(|(other, r)| other == disk && r.start < range.end && range.start < r.end))
        .map(|(disk, _)| disk.clone())
}

/// Why entry `index` cannot be checked, if it cannot.
fn unverifiable(scenario: &Scenario, index: usize) -> Option<String> {
    let job = &scenario.jobs[index];
    let (len, stride) = scenario.job_regions(index).expect("validated");
    if job.count > 1 && stride < len {
        return Some("its repetitions overlap".into());
    }
    let (sources, targets) = spans(scenario, index);
    if let Some(foreground) = &scenario.foreground {
        let written = foreground.read_percent < 100;
        if written && sources.iter().chain(&targets).any(|(disk, _)| *disk == foreground.disk) {
            return Some(format!("the foreground writes disk '{}'", foreground.disk));
        }
    }
    if let Some(disk) = overlaps(&targets, &sources) {
        return Some(format!("its targets overlap its source on disk '{disk}'"));
    }
    for other in (0..scenario.jobs.len()).filter(|&o| o != index) {
        let (_, other_targets) = spans(scenario, other);
        if let Some(disk) = overlaps(&other_targets, &sources).or_else(|| overlaps(&other_targets, &targets)) {
            return Some(format!("{} also writes disk '{disk}' there", scenario.job_name(other)));
        }
    }
    None
}

/// Checks entry `index` on `disks`, given the not-copied sectors of each job that reported
/// some (job number → per target).
pub(crate) fn verify_entry(
    scenario: &Scenario,
    index: usize,
    disks: &BTreeMap<&str, &MemDisk>,
    holes: &BTreeMap<u64, Vec<RangeSet>>,
) -> Verification {
    if let Some(note) = unverifiable(scenario, index) {
        return Verification { checked: false, note, ..Verification::default() };
    }
    let job = &scenario.jobs[index];
    let (len, stride) = scenario.job_regions(index).expect("validated");
    let mut verification = Verification { checked: true, ..Verification::default() };
    let no_holes = RangeSet::new();
    for i in 0..job.count {
        let shift = stride * i;
        for (t, target) in job.targets.iter().enumerate() {
            let job_holes = holes.get(&i).and_then(|per_target| per_target.get(t)).unwrap_or(&no_holes);
            let target_start = job.target_start_sector + shift;
            let holes_relative =
                job_holes.shifted(target_start, 0).expect("not-copied sectors lie in the target range");
            let expected = match (job.kind, &job.source) {
                (JobKind::Copy, Some(source)) => {
                    let start = job.source_start_sector + shift;
                    canonical(&disks[source.as_str()].provenance(start..start + len), start, &holes_relative)
                }
                _ => canonical(&[(0..len, Provenance::Zero)], 0, &holes_relative),
            };
            let found = canonical(
                &disks[target.as_str()].provenance(target_start..target_start + len),
                target_start,
                &holes_relative,
            );
            verification.sectors += expected.iter().map(|(r, _)| r.end - r.start).sum::<u64>();
            verification.mismatched_sectors += mismatched(&expected, &found);
        }
    }
    verification
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copied_run_compares_equal_and_damage_is_counted() {
        let source = [(100..900, Provenance::Pattern { seed: 7, generation: 0, sector: 100 })];
        let target = [
            (5000..5300, Provenance::Pattern { seed: 7, generation: 0, sector: 100 }),
            (5300..5310, Provenance::Zero),
            (5310..5800, Provenance::Pattern { seed: 7, generation: 0, sector: 410 }),
        ];
        let expected = canonical(&source, 100, &RangeSet::new());
        let found = canonical(&target, 5000, &RangeSet::new());
        assert_eq!(expected.len(), 1);
        assert_eq!(mismatched(&expected, &found), 10, "the ten zeroed sectors");
        // Reported as not copied: then they are not held against the target.
        let holes = RangeSet::from_range(300..310);
        assert_eq!(mismatched(&canonical(&source, 100, &holes), &canonical(&target, 5000, &holes)), 0);
        // A pattern from the wrong place is a mismatch, though it is a pattern.
        let shifted = [(5000..5800, Provenance::Pattern { seed: 7, generation: 0, sector: 101 })];
        assert_eq!(mismatched(&expected, &canonical(&shifted, 5000, &RangeSet::new())), 800);
    }
}
