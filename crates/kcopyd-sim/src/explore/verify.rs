//! After a run: does every target hold the source's data (or zeroes) wherever the engine said
//! it did? Checked through provenance, so a terabyte of sparse pattern costs a few extents.
//!
//! ```text
//!  source runs  [P(7,0,100) 100..900]           relative to the job's start, holes removed:
//!  target runs  [P(7,0,100) 5100..5600][Z ..]  ─►  compare run by run; a difference counts
//!  not_copied   5600..5900 (skipped blocks)         its sectors as mismatched
//! ```
//!
//! Then: do the failures the engine reported agree with the faults that fired? Every failed
//! range lies under a fault the disk logged, every latent sector an IGNORE_ERROR copy read is
//! reported, and such a copy leaves exactly its failed sectors not copied:
//!
//! ```text
//!  read_failed           ⊆ read faults in the source's fault log
//!  write_failed (target) ⊆ write faults in that target's fault log
//!  latent sectors read   ⊆ read_failed                                   (IGNORE_ERROR copies)
//!  not_copied (target)   = read_failed (moved to the target) ∪ write_failed (IGNORE_ERROR copies
//!                                                              that ran to the end, not WRITE_SEQ)
//! ```
//!
//! An entry is checked only when nothing else wrote what it reads or writes: no other entry's
//! targets and no foreground writes on its disks, no overlap among its own repetitions.

use std::collections::BTreeMap;
use std::ops::Range;

use kcopyd_core::RangeSet;
use serde::Serialize;

use super::scenario::{EntryKind, Scenario};
use crate::{FaultKind, MemDisk, Operation, Provenance};

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
    /// The first sector found not holding what the engine said it holds.
    pub first_mismatch: Option<Mismatch>,
    /// Sectors reported unreadable on the source that no read fault it logged covers.
    pub unexplained_read_failed_sectors: u64,
    /// Sectors reported failed on a target that no write fault it logged covers.
    pub unexplained_write_failed_sectors: u64,
    /// Latent sectors of the source that an IGNORE_ERROR copy read without reporting them.
    pub missed_latent_sectors: u64,
    /// Sectors of an IGNORE_ERROR copy's targets where `not_copied` and the failed sectors
    /// (`read_failed` moved to the target, and `write_failed`) disagree.
    pub not_copied_disagreeing_sectors: u64,
}

impl Verification {
    /// Whether nothing checked disagreed: the data, and the failures with the fault logs.
    pub fn agrees(&self) -> bool {
        self.mismatched_sectors == 0
            && self.unexplained_read_failed_sectors == 0
            && self.unexplained_write_failed_sectors == 0
            && self.missed_latent_sectors == 0
            && self.not_copied_disagreeing_sectors == 0
    }

    /// The check's findings as claims for people, each with whether it held: that the entry
    /// was checked (only when it was not), that the failures are covered by the fault logs,
    /// that every sector outside them equals the source, that every latent error was found,
    /// and that `not_copied` is the union of the failures. A claim that does not hold says
    /// by how much.
    pub fn claims(&self) -> Vec<(bool, String)> {
        let verification = self;
        let mut checks = Vec::new();
        if !verification.checked {
            checks.push((false, format!("the entry was checked: {}", verification.note)));
        }
        // A claim holds when nothing contradicts it; otherwise the problem follows it.
        let mut check = |count: u64, claim: String, problem: String| {
            checks.push((count == 0, if count == 0 { claim } else { format!("{claim}{problem}") }));
        };
        let read = verification.unexplained_read_failed_sectors;
        check(
            read,
            "every read_failed range is covered by read faults logged on the source".into(),
            format!(": {read} sectors not covered"),
        );
        let write = verification.unexplained_write_failed_sectors;
        check(
            write,
            "every write_failed range is covered by write faults logged on its target".into(),
            format!(": {write} sectors not covered"),
        );
        let mismatched = verification.mismatched_sectors;
        let differs = match &verification.first_mismatch {
            Some(first) => format!(": {} differs at sector {} ({mismatched} sectors in all)", first.disk, first.sector),
            None => format!(": {mismatched} sectors differ"),
        };
        let compared = crate::units::Bytes(verification.sectors * kcopyd_core::SECTOR_SIZE as u64);
        check(
            mismatched,
            format!("every sector outside the failed ranges equals the source ({compared} compared)"),
            differs,
        );
        let missed = verification.missed_latent_sectors;
        check(
            missed,
            "every injected latent error was found and narrowed to its sectors".into(),
            format!(": {missed} latent sectors not reported"),
        );
        let disagreeing = verification.not_copied_disagreeing_sectors;
        check(
            disagreeing,
            "on every target, not_copied = read_failed ∪ write_failed".into(),
            format!(": {disagreeing} sectors disagree"),
        );
        checks
    }
}

/// Where a target first differed from what it should hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mismatch {
    /// The target disk.
    pub disk: String,
    /// The sector.
    pub sector: u64,
}

/// What one job that was not ok reported (sectors of the device each names).
#[derive(Debug, Clone, Default)]
pub(crate) struct JobFailures {
    /// The source's unreadable sectors.
    pub read_failed: RangeSet,
    /// Per target, the sectors whose write failed.
    pub write_failed: Vec<RangeSet>,
    /// Per target, the sectors that do not hold the source's data.
    pub not_copied: Vec<RangeSet>,
    /// The job ran to its end: not cancelled, no panic.
    pub ran_to_end: bool,
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
#[cfg(test)]
fn mismatched(expected: &[(Range<u64>, Key)], found: &[(Range<u64>, Key)]) -> u64 {
    mismatch(expected, found).0
}

/// Sectors where two canonical lists disagree, and the first of them (relative) that is in
/// both lists.
fn mismatch(expected: &[(Range<u64>, Key)], found: &[(Range<u64>, Key)]) -> (u64, Option<u64>) {
    let total = |runs: &[(Range<u64>, Key)]| runs.iter().map(|(r, _)| r.end - r.start).sum::<u64>();
    let mut agreeing = 0;
    let mut first = None;
    let (mut i, mut j) = (0, 0);
    while i < expected.len() && j < found.len() {
        let (a, ka) = &expected[i];
        let (b, kb) = &found[j];
        let overlap = a.start.max(b.start)..a.end.min(b.end);
        if overlap.start < overlap.end {
            if ka == kb {
                agreeing += overlap.end - overlap.start;
            } else {
                first = first.or(Some(overlap.start));
            }
        }
        if a.end <= b.end {
            i += 1;
        } else {
            j += 1;
        }
    }
    (total(expected).max(total(found)) - agreeing, first)
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

/// Checks entry `index` on `disks`, given what each job that was not ok reported (job number
/// → its failures).
pub(crate) fn verify_entry(
    scenario: &Scenario,
    index: usize,
    disks: &BTreeMap<&str, &MemDisk>,
    failures: &BTreeMap<u64, JobFailures>,
) -> Verification {
    if let Some(note) = unverifiable(scenario, index) {
        return Verification { checked: false, note, ..Verification::default() };
    }
    let job = &scenario.jobs[index];
    let (len, stride) = scenario.job_regions(index).expect("validated");
    let mut verification = Verification { checked: true, ..Verification::default() };
    let none = JobFailures::default();
    for i in 0..job.count {
        let shift = stride * i;
        let failed = failures.get(&i).unwrap_or(&none);
        for (t, target) in job.targets.iter().enumerate() {
            let no_holes = RangeSet::new();
            let job_holes = failed.not_copied.get(t).unwrap_or(&no_holes);
            let target_start = job.target_start_sector + shift;
            let holes_relative =
                job_holes.shifted(target_start, 0).expect("not-copied sectors lie in the target range");
            let expected = match (job.kind, &job.source) {
                (EntryKind::Copy, Some(source)) => {
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
            let (count, first) = mismatch(&expected, &found);
            verification.mismatched_sectors += count;
            if let (None, Some(sector)) = (&verification.first_mismatch, first) {
                verification.first_mismatch = Some(Mismatch { disk: target.clone(), sector: target_start + sector });
            }
        }
        check_failures(scenario, index, i, disks, failed, &mut verification);
    }
    verification
}

/// Checks job `i` of entry `index`'s reported failures against the disks' fault logs (see
/// the module's overview).
fn check_failures(
    scenario: &Scenario,
    index: usize,
    i: u64,
    disks: &BTreeMap<&str, &MemDisk>,
    failed: &JobFailures,
    verification: &mut Verification,
) {
    let job = &scenario.jobs[index];
    let (len, stride) = scenario.job_regions(index).expect("validated");
    let shift = stride * i;
    let no_failures = RangeSet::new();
    if let Some(source) = &job.source {
        let logged = logged_faults(disks[source.as_str()], &[Operation::Read]);
        verification.unexplained_read_failed_sectors += failed.read_failed.difference(&logged).len_sectors();
    }
    for (t, target) in job.targets.iter().enumerate() {
        let logged = logged_faults(disks[target.as_str()], &[Operation::Write, Operation::WriteZeroes]);
        let write_failed = failed.write_failed.get(t).unwrap_or(&no_failures);
        verification.unexplained_write_failed_sectors += write_failed.difference(&logged).len_sectors();
    }
    let (EntryKind::Copy, Some(source), true) = (job.kind, &job.source, job.ignore_error) else { return };
    let source_start = job.source_start_sector + shift;
    let read = RangeSet::from_range(source_start..source_start + len);
    let latent: RangeSet = scenario.disks[source].options.faults.latent_sectors.iter().cloned().collect();
    verification.missed_latent_sectors +=
        latent.difference(&latent.difference(&read)).difference(&failed.read_failed).len_sectors();
    if job.write_seq || !failed.ran_to_end {
        return;
    }
    let target_start = job.target_start_sector + shift;
    let unreadable =
        failed.read_failed.shifted(source_start, target_start).expect("read_failed lies in the source range");
    for t in 0..job.targets.len() {
        let mut expected = unreadable.clone();
        expected.extend(failed.write_failed.get(t).unwrap_or(&no_failures));
        let not_copied = failed.not_copied.get(t).unwrap_or(&no_failures);
        let disagreeing =
            not_copied.difference(&expected).len_sectors() + expected.difference(not_copied).len_sectors();
        verification.not_copied_disagreeing_sectors += disagreeing;
    }
}

/// The sectors of every request of `operations` that a fault failed on `disk`: every logged
/// fault but those that report success (a misdirected, torn or lost write, a slow request).
fn logged_faults(disk: &MemDisk, operations: &[Operation]) -> RangeSet {
    disk.fault_log()
        .into_iter()
        .filter(|f| f.device == disk.options().name && operations.contains(&f.operation))
        .filter(|f| {
            !matches!(
                f.kind,
                FaultKind::Misdirected { .. } | FaultKind::Torn { .. } | FaultKind::Lost | FaultKind::Slow { .. }
            )
        })
        .map(|f| f.sectors)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_hold_when_nothing_disagrees_and_say_by_how_much_when_not() {
        let clean = Verification { checked: true, sectors: 8, ..Verification::default() };
        let claims = clean.claims();
        assert_eq!(claims.len(), 5);
        assert!(claims.iter().all(|(held, _)| *held), "{claims:?}");
        assert!(claims[2].1.ends_with("(4 KiB compared)"), "{claims:?}");
        let first_mismatch = Some(Mismatch { disk: "mirror-a".into(), sector: 8 });
        let damaged = Verification { mismatched_sectors: 2, first_mismatch, missed_latent_sectors: 1, ..clean };
        let claims = damaged.claims();
        assert_eq!(claims.iter().filter(|(held, _)| !held).count(), 2, "{claims:?}");
        assert!(claims[2].1.ends_with(": mirror-a differs at sector 8 (2 sectors in all)"), "{claims:?}");
        assert!(claims[3].1.ends_with(": 1 latent sectors not reported"), "{claims:?}");
        let unchecked = Verification { note: "a zero job".into(), ..Verification::default() };
        assert_eq!(unchecked.claims()[0], (false, "the entry was checked: a zero job".into()));
    }

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

    /// A scenario of one IGNORE_ERROR copy from `source` (latent sector 100) to `target`.
    fn one_copy() -> Scenario {
        let text = r#"
            [disks.source]
            len_sectors = 1024
            [disks.source.faults]
            latent_sectors = [{ start = 100, end = 101 }]
            [disks.target]
            len_sectors = 1024
            [[jobs]]
            kind = "copy"
            source = "source"
            targets = ["target"]
            ignore_error = true
        "#;
        Scenario::from_value_in(super::super::parse_tree(text).unwrap(), std::path::Path::new(".")).unwrap()
    }

    #[test]
    fn failures_the_fault_logs_do_not_explain_are_counted() {
        let scenario = one_copy();
        let source = MemDisk::new(scenario.disks["source"].options.clone());
        let target = MemDisk::new(scenario.disks["target"].options.clone());
        let disks: BTreeMap<&str, &MemDisk> = [("source", &source), ("target", &target)].into();
        let check = |failed: &JobFailures| {
            let mut verification = Verification::default();
            check_failures(&scenario, 0, 0, &disks, failed, &mut verification);
            verification
        };
        // The truth: sector 100 unreadable, not copied; the source logged the failed read.
        crate::Simulation::block_on(async {
            use kcopyd_core::BlockDevice;
            let pages = kcopyd_core::PagePool::new(1).unwrap().alloc(1).await;
            let (_, result) = source.read(96, kcopyd_core::ReadBuf::new(pages, 4096)).await;
            assert!(result.is_err(), "sector 100 is latent");
        });
        let honest = JobFailures {
            read_failed: RangeSet::from_range(100..101),
            write_failed: vec![RangeSet::new()],
            not_copied: vec![RangeSet::from_range(100..101)],
            ran_to_end: true,
        };
        assert!(check(&honest).agrees(), "{:?}", check(&honest));
        // A read failure where no fault fired, a write failure likewise, a not-copied sector
        // that did not fail.
        let mut lying = honest.clone();
        lying.read_failed.extend(&RangeSet::from_range(500..502));
        lying.write_failed[0] = RangeSet::from_range(600..608);
        lying.not_copied[0] = RangeSet::from_range(100..101);
        lying.not_copied[0].extend(&RangeSet::from_range(700..701));
        let found = check(&lying);
        assert_eq!((found.unexplained_read_failed_sectors, found.unexplained_write_failed_sectors), (2, 8));
        // not_copied lacks 500..502 and 600..608, and holds 700 that did not fail.
        assert_eq!(found.not_copied_disagreeing_sectors, 11);
        // The latent sector read without being reported.
        let silent = JobFailures { read_failed: RangeSet::new(), not_copied: vec![RangeSet::new()], ..honest };
        assert_eq!(check(&silent).missed_latent_sectors, 1);
    }
}
