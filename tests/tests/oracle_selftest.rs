//! The oracle's self-tests: can each of its rules fail?
//!
//! ```text
//!  fixed scenario ──run()──► true outcome + I/O trace + disks ──check()──► no violation
//!                                   │
//!                                   └─ one perturbation (a sector dropped from read_failed, a
//!                                      write moved before its predecessor completed, a sector
//!                                      of old data called copied, …) ──check()──► the rule
//!                                      that must refuse it, by its message
//! ```
//!
//! Running the swarm against a correct engine shows only that the oracle accepts correct runs;
//! a rule weakened to "always passes" would go unnoticed. Here every rule of the oracle (numbered
//! as in docs/SIMULATION.md, "The invariants and how they are checked") is fed known-wrong
//! outcomes and traces, derived from real runs of small hand-made scenarios (read errors, write
//! errors, IGNORE_ERROR, WRITE_SEQ, a cancel, a crash, a zoned target, several targets), and
//! must name the wrong one. These tests are also the test command of the oracle's mutation
//! testing (`tests/mutants.sh --oracle`).

use std::ops::Range;

use kcopyd_core::{Outcome, RangeSet, SubmitError, TARGETS_MAX};
use kcopyd_sim::{FaultKind, Simulation};
use kcopyd_tests::io_log::{DiskRef, IoKind, IoRecord, Mark};
use kcopyd_tests::scenario::{
    DiskInputs, FaultInputs, Inputs, JobInputs, PreparedInputs, SwarmReport, SwarmScenario, TimingInputs, check, run,
    source_seed, target_seed,
};
use kcopyd_tests::validation::{BrokenRule, RegionInputs, ValidationCase};

/// Sectors per sub-job in every scenario here (`subjob_units` of 1-sector units).
const SUBJOB_SECTORS: u64 = 8;

/// A disk with some latency, so that requests overlap and order is visible in the trace.
fn disk(faults: FaultInputs) -> DiskInputs {
    let timing = |cost_us| TimingInputs { cost_us, ..TimingInputs::default() };
    DiskInputs { read: timing(100), write: timing(150), faults, ..DiskInputs::default() }
}

/// A copy job of `len_units` sectors from source 0 to `targets`, submitted at time 0.
fn copy(len_units: u64, targets: &[usize]) -> JobInputs {
    JobInputs { targets: targets.to_vec(), len_units, ..JobInputs::default() }
}

/// One source, `targets` fault-free targets, sub-jobs of [`SUBJOB_SECTORS`] sectors, 64 pages.
fn inputs(jobs: Vec<JobInputs>, targets: usize, subjobs_in_flight: usize) -> Inputs {
    Inputs {
        seed: 11,
        page_budget: 64,
        subjob_units: SUBJOB_SECTORS,
        subjobs_in_flight,
        big_units: false,
        sources: vec![disk(FaultInputs::default())],
        targets: vec![disk(FaultInputs::default()); targets],
        jobs,
        crash_at_us: None,
        headers_only: false,
        shutdown_at_us: None,
        prepared: Vec::new(),
        throttle: kcopyd_core::Throttle::OFF,
        queued_jobs_max: 0,
        shutdown_in_callback_of: None,
        io_timeout_ms: None,
        throttle_set_after_start: false,
    }
}

/// A latent sector error at `sector` of a disk.
fn latent(sector: u64) -> FaultInputs {
    FaultInputs { latent: vec![(sector, 1)], ..FaultInputs::default() }
}

/// A persistent write error on `sectors` of a disk.
fn bad_writes(sectors: Range<u64>) -> FaultInputs {
    FaultInputs { write_faults: vec![(sectors.start, sectors.end - sectors.start, 0)], ..FaultInputs::default() }
}

/// A run the oracle accepts.
struct Accepted {
    scenario: SwarmScenario,
    report: SwarmReport,
}

impl Accepted {
    /// Runs `inputs` and checks that the oracle accepts the true run.
    fn run(what: &str, inputs: Inputs) -> Accepted {
        let scenario = inputs.layout();
        let report = run(&scenario);
        let violations = check(&scenario, &report);
        assert!(violations.is_empty(), "{what}: the oracle refuses a true run: {violations:#?}");
        Accepted { scenario, report }
    }

    /// The violations once `change` has been made to a copy of the report (the disks are
    /// shared, the rest is copied).
    fn tampered(&self, change: impl FnOnce(&mut SwarmReport)) -> Vec<String> {
        let mut report = clone_report(&self.report);
        change(&mut report);
        check(&self.scenario, &report)
    }

    /// The violations once `change` has been made to a copy of the scenario.
    fn with_scenario(&self, change: impl FnOnce(&mut SwarmScenario)) -> Vec<String> {
        let mut scenario = self.scenario.clone();
        change(&mut scenario);
        check(&scenario, &self.report)
    }

    /// Job 0's outcome.
    fn outcome(&self) -> &Outcome {
        self.report.jobs[0].outcome.as_ref().expect("an outcome")
    }
}

fn clone_report(report: &SwarmReport) -> SwarmReport {
    SwarmReport {
        jobs: report.jobs.clone(),
        trace_hash: report.trace_hash,
        trace_events: report.trace_events,
        trace: report.trace.clone(),
        deadlocked: report.deadlocked,
        pages_in_use_max: report.pages_in_use_max,
        virtual_time: report.virtual_time,
        sources: report.sources.clone(),
        targets: report.targets.clone(),
        target_logs_before_retry: report.target_logs_before_retry.clone(),
        io: report.io.clone(),
        marks: report.marks.clone(),
        mark_us: report.mark_us.clone(),
        stats: report.stats.clone(),
        shutdown_reports: report.shutdown_reports.clone(),
        prepared: report.prepared.clone(),
    }
}

/// Job 0's outcome in `report`, to change.
fn outcome(report: &mut SwarmReport) -> &mut Outcome {
    report.jobs[0].outcome.as_mut().expect("an outcome")
}

/// The index of the request of `kind` on `disk` that starts at `sector`.
fn request(report: &SwarmReport, disk: DiskRef, kind: IoKind, sector: u64) -> usize {
    report
        .io
        .iter()
        .position(|r| r.disk == disk && r.kind == kind && r.sectors.start == sector)
        .unwrap_or_else(|| panic!("no {kind:?} of {disk:?} at sector {sector} in {:#?}", report.io))
}

/// The next free position on the trace's sequence.
fn end_of_trace(report: &SwarmReport) -> u64 {
    let requests = report.io.iter().flat_map(|r| [r.issued, r.done]);
    requests.chain(report.marks.iter().map(|&(seq, _)| seq)).max().unwrap_or(0) + 1
}

/// A request appended at the end of the trace, succeeded (its model time, 0, matters only to
/// rule 17, whose test changes the times of true requests).
fn append(report: &mut SwarmReport, disk: DiskRef, kind: IoKind, sectors: Range<u64>) {
    let issued = end_of_trace(report);
    report.io.push(IoRecord {
        disk,
        kind,
        sectors,
        phase: 1,
        issued,
        issued_us: 0,
        done: issued + 1,
        done_us: 0,
        ok: true,
    });
}

/// `set` with `sectors` added.
fn with(set: &RangeSet, sectors: Range<u64>) -> RangeSet {
    let mut set = set.clone();
    set.insert(sectors);
    set
}

/// `set` without `sectors`.
fn without(set: &RangeSet, sectors: Range<u64>) -> RangeSet {
    set.difference(&RangeSet::from_range(sectors))
}

/// A `RangeSet` holding exactly `ranges`, as given (only serde can make a malformed one).
fn raw(ranges: &[Range<u64>]) -> RangeSet {
    let ranges: Vec<String> = ranges.iter().map(|r| format!(r#"{{"start":{},"end":{}}}"#, r.start, r.end)).collect();
    serde_json::from_str(&format!(r#"{{"ranges":[{}]}}"#, ranges.join(","))).expect("a RangeSet from its ranges")
}

/// Asserts that some violation contains `message` (the rule's own wording).
#[track_caller]
fn fires(rule: &str, case: &str, violations: &[String], message: &str) {
    assert!(
        violations.iter().any(|v| v.contains(message)),
        "rule {rule}, {case}: no violation says {message:?}; the oracle said {violations:#?}"
    );
}

/// A clean copy of 48 sectors (6 sub-jobs) to 3 targets, 2 sub-jobs in flight.
fn clean() -> Accepted {
    Accepted::run("clean", inputs(vec![copy(48, &[0, 1, 2])], 3, 2))
}

/// IGNORE_ERROR, 6 sub-jobs to 3 targets: sector 20 of the source unreadable, sectors 40..42
/// of target 1 unwritable.
fn ignoring_errors() -> Accepted {
    let mut inputs = inputs(vec![JobInputs { ignore_error: true, ..copy(48, &[0, 1, 2]) }], 3, 2);
    inputs.sources[0].faults = latent(20);
    inputs.targets[1].faults = bad_writes(40..42);
    let accepted = Accepted::run("IGNORE_ERROR", inputs);
    let outcome = accepted.outcome();
    assert_eq!(outcome.read_failed, RangeSet::from_range(20..21), "narrowed down to the bad sector");
    assert_eq!(outcome.write_err.iter().collect::<Vec<_>>(), vec![1]);
    assert_eq!(outcome.targets[1].write_failed, RangeSet::from_range(40..48), "the whole sub-job's write");
    accepted
}

/// No flags, 1 sub-job in flight: sector 20 (sub-job 2) of the source unreadable, so the job
/// stops there.
fn stopping_on_a_read_error() -> Accepted {
    let mut inputs = inputs(vec![copy(48, &[0, 1])], 2, 1);
    inputs.sources[0].faults = latent(20);
    let accepted = Accepted::run("read error", inputs);
    let outcome = accepted.outcome();
    assert_eq!(outcome.read_failed, RangeSet::from_range(16..24), "the whole sub-job");
    assert_eq!(outcome.targets[0].not_copied, RangeSet::from_range(16..48), "stopped");
    accepted
}

/// No flags, 1 sub-job in flight: sectors 20..22 of target 1 unwritable, so the job stops after
/// sub-job 2.
fn stopping_on_a_write_error() -> Accepted {
    let mut inputs = inputs(vec![copy(48, &[0, 1])], 2, 1);
    inputs.targets[1].faults = bad_writes(20..22);
    let accepted = Accepted::run("write error", inputs);
    let outcome = accepted.outcome();
    assert_eq!(outcome.targets[0].not_copied, RangeSet::from_range(24..48), "stopped; target 0 has sub-job 2");
    assert_eq!(outcome.targets[1].not_copied, RangeSet::from_range(16..48));
    accepted
}

/// WRITE_SEQ, 4 sub-jobs in flight, 2 targets, no fault.
fn sequential() -> Accepted {
    Accepted::run("WRITE_SEQ", inputs(vec![JobInputs { write_seq: true, ..copy(48, &[0, 1]) }], 2, 4))
}

/// WRITE_SEQ, 4 sub-jobs in flight: sector 12 (sub-job 1) unreadable; sub-job 0 is written,
/// the later sub-jobs already read are not.
fn sequential_with_a_read_error() -> Accepted {
    let mut inputs = inputs(vec![JobInputs { write_seq: true, ..copy(48, &[0]) }], 1, 4);
    inputs.sources[0].faults = latent(12);
    let accepted = Accepted::run("WRITE_SEQ, read error", inputs);
    assert_eq!(accepted.outcome().targets[0].not_copied, RangeSet::from_range(8..48));
    accepted
}

/// 1 sub-job in flight, 16 sub-jobs of 8 sectors, cancelled 1 ms after submission.
fn cancelled() -> Accepted {
    let job = JobInputs { cancel_after_us: Some(1000), ..copy(128, &[0]) };
    let accepted = Accepted::run("cancel", inputs(vec![job], 1, 1));
    let outcome = accepted.outcome();
    assert!(outcome.cancelled, "{outcome:?}");
    assert!(outcome.targets[0].not_copied.len_sectors() >= SUBJOB_SECTORS, "cancelled early: {outcome:?}");
    accepted
}

/// Every disk crashes 700 µs in, while a copy of 16 sub-jobs runs; then the liveness phase.
fn crashed() -> Accepted {
    let mut inputs = inputs(vec![copy(128, &[0, 1])], 2, 2);
    inputs.crash_at_us = Some(700);
    let accepted = Accepted::run("crash", inputs);
    assert!(!accepted.outcome().is_ok(), "the crash came before the end");
    assert!(accepted.report.jobs[0].retry.is_some());
    assert!(accepted.report.io.iter().any(|r| r.phase == 2));
    accepted
}

/// WRITE_SEQ, 2 sub-jobs in flight, 16 sub-jobs, cancelled 1 ms after submission.
fn cancelled_in_sequence() -> Accepted {
    let job = JobInputs { cancel_after_us: Some(1000), write_seq: true, ..copy(128, &[0]) };
    let accepted = Accepted::run("cancel, WRITE_SEQ", inputs(vec![job], 1, 2));
    assert!(accepted.outcome().cancelled, "{:?}", accepted.outcome());
    accepted
}

/// A zero job of 16 sub-jobs, 1 in flight, cancelled 1 ms after submission.
fn zero_cancelled() -> Accepted {
    let job = JobInputs { zero: true, cancel_after_us: Some(1000), ..copy(128, &[0]) };
    let accepted = Accepted::run("zero job, cancel", inputs(vec![job], 1, 1));
    assert!(accepted.outcome().cancelled, "{:?}", accepted.outcome());
    accepted
}

/// Harder true runs, each of which the oracle must accept: a misdirected write (its sectors
/// excused), a zero job offloaded to write-zeroes (one request for its whole region), zero and
/// copy jobs side by side on 4 KiB disks, WRITE_SEQ with write errors on several targets.
fn hard_but_true() -> Vec<Accepted> {
    let mut misdirected = inputs(vec![copy(48, &[0, 1])], 2, 2);
    misdirected.targets[0].faults.misdirects = vec![(1, 3)];
    let misdirected = Accepted::run("misdirected write", misdirected);
    let excused = misdirected.report.targets[0].fault_log();
    assert!(!excused.is_empty(), "a misdirected write happened");

    let mut offloaded = inputs(vec![JobInputs { zero: true, ..copy(48, &[0, 1]) }], 2, 2);
    offloaded.targets.iter_mut().for_each(|t| t.write_zeroes = true);
    let offloaded = Accepted::run("write-zeroes offload", offloaded);
    assert!(offloaded.report.io.iter().any(|r| r.kind == IoKind::WriteZeroes && r.sectors == (0..48)));

    let mut blocks = inputs(vec![copy(5, &[0, 1]), JobInputs { zero: true, ..copy(3, &[1]) }], 2, 3);
    blocks.big_units = true;
    blocks.targets[1].block_4k = true;
    blocks.subjob_units = 1;
    let blocks = Accepted::run("4 KiB blocks", blocks);

    let mut seq = inputs(vec![JobInputs { write_seq: true, ignore_error: true, ..copy(48, &[0, 1, 2]) }], 3, 3);
    seq.targets[1].faults = bad_writes(20..22);
    seq.targets[2].faults = bad_writes(36..37);
    let seq = Accepted::run("WRITE_SEQ, write errors", seq);
    assert_eq!(
        seq.outcome().targets[0].not_copied,
        RangeSet::from_range(24..48),
        "sub-jobs after the first failing one"
    );

    // Write-zeroes offloaded by one target of two: the zero job is not held to one request per
    // target, nor is a copy job to an offloading target, nor a zero-length zero job.
    let mut mixed = inputs(
        vec![JobInputs { zero: true, ..copy(16, &[0, 1]) }, copy(16, &[0]), JobInputs { zero: true, ..copy(0, &[0]) }],
        2,
        2,
    );
    mixed.targets[0].write_zeroes = true;
    let mixed = Accepted::run("write-zeroes on one target of two", mixed);

    // A throttle, WRITE_SEQ and a read error.
    let mut throttled = inputs(vec![JobInputs { write_seq: true, ..copy(64, &[0]) }], 1, 4);
    throttled.sources[0].faults = latent(28);
    throttled.throttle = kcopyd_core::Throttle { busy_percent: Some(30), rate_bytes_per_s: Some(4 << 20) };
    let throttled = Accepted::run("throttled, WRITE_SEQ, read error", throttled);
    assert_eq!(throttled.outcome().targets[0].not_copied, RangeSet::from_range(24..64));

    vec![misdirected, offloaded, blocks, seq, mixed, throttled]
}

#[test]
fn true_runs_of_every_scenario_are_accepted() {
    // Each builder asserts that the oracle accepts its run, and that the run has the shape the
    // perturbations below rely on.
    for build in [
        clean,
        ignoring_errors,
        stopping_on_a_read_error,
        stopping_on_a_write_error,
        sequential,
        sequential_with_a_read_error,
        cancelled,
        cancelled_in_sequence,
        zero_cancelled,
        crashed,
        shut_down_mid_run,
        callbacks_in_order,
        busy_limited,
        timing_out,
    ] {
        build();
    }
    assert_eq!(hard_but_true().len(), 6);
}

#[test]
fn rule_1_every_job_completes_exactly_once_without_a_panic() {
    let run = clean();
    let violations = run.tampered(|r| r.jobs[0].callbacks = 2);
    fires("1", "a second completion", &violations, "job 0: 2 completions, expected exactly 1");
    let violations = run.tampered(|r| r.jobs[0].callbacks = 0);
    fires("1", "no completion", &violations, "job 0: 0 completions, expected exactly 1");
    let violations = run.tampered(|r| r.jobs[0].outcome = None);
    fires("1", "no outcome", &violations, "job 0: no outcome");
    let violations = run.tampered(|r| outcome(r).panicked = Some("boom".to_owned()));
    fires("1", "a panic", &violations, "job 0: the engine panicked: boom");
    let violations = run.tampered(|r| {
        outcome(r).targets.pop();
    });
    fires("1", "a target report missing", &violations, "job 0: 2 target reports for 3 targets");
    let crash = crashed();
    let violations = crash.tampered(|r| {
        let retry = r.jobs[0].retry.as_mut().expect("resubmitted");
        retry.write_err.set(1);
    });
    fires("1", "the resubmission failed", &violations, "job 0: resubmitted with faults off, still failed");
}

#[test]
fn rule_2_targets_hold_what_the_outcome_says_and_nothing_else_changed() {
    // A sector called copied holding its old data.
    let run = clean();
    let target = &run.report.targets[0];
    target.fill_pattern_range(3..4, target_seed(0), 0);
    let violations = check(&run.scenario, &run.report);
    fires("2", "old data called copied", &violations, "job 0 target 0 (target0) sector 3: holds Old");

    // A sector not copied holding neither old nor new data.
    let run = stopping_on_a_read_error();
    let target = &run.report.targets[1];
    target.fill_pattern_range(30..31, target_seed(1), 1);
    let violations = check(&run.scenario, &run.report);
    fires("2", "other data, not copied", &violations, "job 0 target 1 (target1) sector 30: holds Other");
    // And one called copied.
    target.fill_pattern_range(2..3, source_seed(0), 1);
    let violations = check(&run.scenario, &run.report);
    fires("2", "another sector's data, copied", &violations, "job 0 target 1 (target1) sector 2: holds Other");

    // A sector outside every job changed.
    let run = clean();
    let target = &run.report.targets[2];
    let last = target.options().len_sectors - 1;
    target.fill_pattern_range(last..last + 1, source_seed(0), 0);
    let violations = check(&run.scenario, &run.report);
    fires("2", "outside every job", &violations, &format!("target2 sector {last} outside every job changed"));

    // A source changed.
    let run = clean();
    run.report.sources[0].fill_pattern_range(5..6, target_seed(0), 0);
    let violations = check(&run.scenario, &run.report);
    fires("2", "a source written", &violations, "source0 changed");

    // After a crash, the final outcome (the resubmission's) is what the contents must match.
    let run = crashed();
    run.report.targets[1].fill_pattern_range(100..101, target_seed(1), 0);
    let violations = check(&run.scenario, &run.report);
    fires("2", "old data after the resubmission", &violations, "job 0 target 1 (target1) sector 100: holds Old");
}

#[test]
fn rule_2_spares_only_the_sectors_a_logged_fault_may_have_left_anything_in() {
    // A sector a torn, lost or misdirected write touched may hold anything; the sector next to
    // it, if no fault touched it, may not.
    let run = crashed();
    let misdirected = hard_but_true().swap_remove(0);
    for (what, run) in [("crash", &run), ("misdirected write", &misdirected)] {
        for (t, disk) in run.report.targets.iter().enumerate() {
            for fault in disk.fault_log() {
                let (kind, spared) = match &fault.kind {
                    FaultKind::Torn { .. } => ("torn", vec![fault.sectors.clone()]),
                    FaultKind::Lost => ("lost", vec![fault.sectors.clone()]),
                    FaultKind::Misdirected { landed } => ("misdirected", vec![fault.sectors.clone(), landed.clone()]),
                    _ => continue,
                };
                for sectors in spared {
                    let sector = sectors.start;
                    disk.fill_pattern_range(sector..sector + 1, target_seed(t), 9);
                    let named =
                        [format!("(target{t}) sector {sector}: "), format!("target{t} sector {sector} outside")];
                    let violations = check(&run.scenario, &run.report);
                    assert!(
                        !violations.iter().any(|v| named.iter().any(|n| v.contains(n))),
                        "rule 2, {what}: sector {sector} of a {kind} write is excused: {violations:#?}"
                    );
                    disk.fill_pattern_range(sector..sector + 1, target_seed(t), 0);
                }
            }
        }
    }
    let kinds: Vec<String> = run.report.targets[0].fault_log().iter().map(|f| format!("{:?}", f.kind)).collect();
    assert!(kinds.iter().any(|k| k.starts_with("Torn")) && kinds.iter().any(|k| k == "Lost"), "{kinds:?}");
}

#[test]
fn rule_3_every_range_set_is_sorted_disjoint_and_non_adjacent() {
    let run = ignoring_errors();
    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        (
            "touching ranges in read_failed",
            run.tampered(|r| outcome(r).read_failed = raw(&[19..20, 20..21])),
            "job 0: read_failed: malformed",
        ),
        (
            "overlapping ranges in not_copied",
            run.tampered(|r| outcome(r).targets[1].not_copied = raw(&[20..21, 40..46, 44..48])),
            "job 0 target 1 (target1): not_copied: malformed",
        ),
        (
            "unsorted ranges in write_failed",
            run.tampered(|r| outcome(r).targets[1].write_failed = raw(&[44..48, 40..44])),
            "job 0 target 1 (target1): write_failed: malformed",
        ),
        (
            "an empty range in not_copied",
            run.tampered(|r| outcome(r).targets[0].not_copied = raw(&[20..21, 30..30])),
            "job 0 target 0 (target0): not_copied: malformed",
        ),
        (
            "sectors outside the region",
            run.tampered(|r| outcome(r).targets[2].not_copied = raw(&[20..21, 48..49])),
            "job 0 target 2 (target2): not_copied: {48..49} lie outside the region 0..48",
        ),
    ];
    for (case, violations, message) in cases {
        fires("3", case, &violations, message);
    }
}

#[test]
fn rule_4_read_err_and_read_failed_are_exactly_the_failed_reads() {
    let run = ignoring_errors();
    let violations = run.tampered(|r| outcome(r).read_err = false);
    fires("4", "read_err cleared", &violations, "job 0: read_err false but 4 reads failed");
    let violations = run.tampered(|r| outcome(r).read_failed = RangeSet::new());
    fires(
        "4",
        "read_failed emptied",
        &violations,
        "job 0: read_failed {}, but the failed single-block reads are [20..21]",
    );
    let violations =
        run.tampered(|r| outcome(r).read_failed = with(&r.jobs[0].outcome.as_ref().unwrap().read_failed, 21..22));
    fires("4", "a sector added to read_failed", &violations, "but the failed single-block reads are [20..21]");
    let violations = run.tampered(|r| outcome(r).read_failed = RangeSet::from_range(16..24));
    fires("4", "the whole sub-job under IGNORE_ERROR", &violations, "but the failed single-block reads are [20..21]");

    let run = clean();
    let violations = run.tampered(|r| outcome(r).read_err = true);
    fires("4", "read_err set", &violations, "job 0: read_err true but 0 reads failed");

    // Without IGNORE_ERROR: the whole failed read.
    let run = stopping_on_a_read_error();
    let violations = run.tampered(|r| outcome(r).read_failed = RangeSet::from_range(20..21));
    fires("4", "one block instead of the failed read", &violations, "but the failed reads are [16..24]");
    let violations = run.tampered(|r| outcome(r).read_failed = RangeSet::from_range(16..25));
    fires("4", "more than the failed read", &violations, "but the failed reads are [16..24]");

    // Messages give device coordinates: a region that starts at sector 4.
    let mut shifted = inputs(vec![JobInputs { gap_units: 4, ignore_error: true, ..copy(16, &[0]) }], 1, 2);
    shifted.sources[0].faults = latent(9);
    let run = Accepted::run("a region at sector 4", shifted);
    let violations = run.tampered(|r| outcome(r).read_failed = RangeSet::new());
    fires("4", "at sector 4", &violations, "job 0: read_failed {}, but the failed single-block reads are [9..10]");

    // After a crash, up to the crash: the requests the crash failed are read errors too.
    let run = crashed();
    let violations = run.tampered(|r| {
        let o = outcome(r);
        o.read_err = !o.read_err;
    });
    fires("4", "read_err flipped in a crash", &violations, "job 0: read_err");
}

#[test]
fn rule_5_write_err_and_write_failed_are_exactly_the_failed_writes() {
    let run = ignoring_errors();
    let violations = run.tampered(|r| outcome(r).write_err = std::iter::empty::<usize>().collect());
    fires("5", "write_err bit cleared", &violations, "job 0 target 1 (target1): write_err false but 1 writes failed");
    let violations = run.tampered(|r| outcome(r).write_err.set(0));
    fires("5", "write_err bit set", &violations, "job 0 target 0 (target0): write_err true but 0 writes failed");
    let violations = run.tampered(|r| outcome(r).targets[1].write_failed = RangeSet::from_range(40..44));
    fires(
        "5",
        "a sector dropped from write_failed",
        &violations,
        "job 0 target 1 (target1): write_failed {40..44}, the failed writes are [40..48]",
    );
    let violations = run.tampered(|r| outcome(r).targets[0].write_failed = RangeSet::from_range(0..1));
    fires(
        "5",
        "a sector added to write_failed",
        &violations,
        "job 0 target 0 (target0): write_failed {0..1}, the failed writes are []",
    );
}

#[test]
fn rule_6_not_copied_is_what_the_successful_writes_leave() {
    let run = ignoring_errors();
    let not_copied = |r: &SwarmReport, i: usize| r.jobs[0].outcome.as_ref().unwrap().targets[i].not_copied.clone();
    let violations = run.tampered(|r| outcome(r).targets[1].not_copied = without(&not_copied(r, 1), 41..42));
    fires(
        "6",
        "a sector dropped",
        &violations,
        "job 0 target 1 (target1): not_copied {20..21, 40..41, 42..48}, but the writes that did not succeed leave [20..21, 40..48]",
    );
    let violations = run.tampered(|r| outcome(r).targets[2].not_copied = with(&not_copied(r, 2), 0..1));
    fires(
        "6",
        "a sector added",
        &violations,
        "job 0 target 2 (target2): not_copied {0..1, 20..21}, but the writes that did not succeed leave [20..21]",
    );
    // A write that the trace says failed, though the disk took it: still not copied.
    let run = clean();
    let violations = run.tampered(|r| {
        let i = request(r, DiskRef::Target(1), IoKind::Write, 8);
        r.io[i].ok = false;
    });
    fires(
        "6",
        "a failed write",
        &violations,
        "job 0 target 1 (target1): not_copied {}, but the writes that did not succeed leave [8..16]",
    );
}

#[test]
#[allow(
    clippy::too_many_lines,
    reason = "a list of perturbations of the same true runs, each refused by this rule: split, each piece would rebuild the runs it perturbs"
)]
fn rule_7_sectors_are_not_copied_only_for_a_reason() {
    // No error, no cancel, yet a sub-job not written (the trace agrees, so rule 6 holds).
    let run = clean();
    let violations = run.tampered(|r| {
        let i = request(r, DiskRef::Target(0), IoKind::Write, 8);
        r.io.remove(i);
        outcome(r).targets[0].not_copied = RangeSet::from_range(8..16);
    });
    fires("7", "a sub-job left out", &violations, "job 0: no request failed and no cancel came, yet the outcome is");
    fires(
        "7",
        "a sub-job left out",
        &violations,
        "job 0 target 0 (target0): not_copied {8..16}, expected [] (sub-jobs never taken, unreadable, failed on this target)",
    );

    // A sub-job never started, with no cancel.
    let violations = run.tampered(|r| {
        r.io.retain(|record| !(32..40).contains(&record.sectors.start));
        for target in &mut outcome(r).targets {
            target.not_copied = RangeSet::from_range(32..40);
        }
    });
    fires(
        "7",
        "a sub-job never started",
        &violations,
        "job 0: sectors [32..40] of the source never read, with no cancel",
    );

    // IGNORE_ERROR: not copied beyond the failures and their sub-jobs.
    let run = ignoring_errors();
    let violations = run.tampered(|r| {
        let i = request(r, DiskRef::Target(0), IoKind::Write, 0);
        r.io.remove(i);
        let report = &mut outcome(r).targets[0];
        report.not_copied = with(&report.not_copied, 0..8);
    });
    fires(
        "7",
        "IGNORE_ERROR, an extra sub-job",
        &violations,
        "job 0 target 0 (target0) (IGNORE_ERROR): not_copied {0..8, 20..21} must hold",
    );
    // IGNORE_ERROR: an unreadable sector called copied.
    let violations = run.tampered(|r| {
        append(r, DiskRef::Target(0), IoKind::Write, 20..21);
        let report = &mut outcome(r).targets[0];
        report.not_copied = RangeSet::new();
    });
    fires(
        "7",
        "IGNORE_ERROR, read_failed copied",
        &violations,
        "job 0 target 0 (target0) (IGNORE_ERROR): not_copied {} must hold",
    );
    // IGNORE_ERROR: a failed write to one target kept out of another's writes.
    let violations = run.tampered(|r| {
        let i = request(r, DiskRef::Target(2), IoKind::Write, 40);
        r.io.remove(i);
        let report = &mut outcome(r).targets[2];
        report.not_copied = with(&report.not_copied, 40..48);
    });
    fires("7", "IGNORE_ERROR, another target's failure", &violations, "job 0 target 2 (target2) (IGNORE_ERROR)");

    // Without IGNORE_ERROR: a sub-job never started after the stop called copied.
    let run = stopping_on_a_read_error();
    let violations = run.tampered(|r| {
        let report = &mut outcome(r).targets[0];
        report.not_copied = without(&report.not_copied, 32..40);
    });
    fires(
        "7",
        "a sub-job after the stop",
        &violations,
        "job 0 target 0 (target0): not_copied {16..32, 40..48}, expected [16..48]",
    );
    // An unreadable sub-job called copied, though a write of it landed.
    let violations = run.tampered(|r| {
        append(r, DiskRef::Target(1), IoKind::Write, 16..24);
        let report = &mut outcome(r).targets[1];
        report.not_copied = without(&report.not_copied, 16..24);
    });
    fires(
        "7",
        "an unreadable sub-job",
        &violations,
        "job 0 target 1 (target1): not_copied {24..48}, expected [16..48]",
    );
    // A write error on target 1 keeps the sub-job from target 0 (and only from target 1).
    let run = stopping_on_a_write_error();
    let violations = run.tampered(|r| {
        let i = request(r, DiskRef::Target(0), IoKind::Write, 16);
        r.io.remove(i);
        let report = &mut outcome(r).targets[0];
        report.not_copied = with(&report.not_copied, 16..24);
    });
    fires(
        "7",
        "another target's failed write",
        &violations,
        "job 0 target 0 (target0): not_copied {16..48}, expected [24..48]",
    );

    // WRITE_SEQ: a sub-job after the first failing one written.
    let run = sequential_with_a_read_error();
    let violations = run.tampered(|r| {
        append(r, DiskRef::Target(0), IoKind::Write, 16..24);
        let report = &mut outcome(r).targets[0];
        report.not_copied = without(&report.not_copied, 16..24);
    });
    fires("7", "WRITE_SEQ, past the failure", &violations, "or after the first failure under WRITE_SEQ");
}

#[test]
#[allow(
    clippy::too_many_lines,
    reason = "a list of perturbations of the same true runs, each refused by this rule: split, each piece would rebuild the runs it perturbs"
)]
fn rule_8_without_ignore_error_no_subjob_starts_after_an_error() {
    let run = stopping_on_a_read_error();
    let violations = run.tampered(|r| append(r, DiskRef::Source(0), IoKind::Read, 32..40));
    fires(
        "8",
        "a read after a failed read",
        &violations,
        "job 0: sub-job 4 started after an error had stopped the job",
    );
    let run = stopping_on_a_write_error();
    let violations = run.tampered(|r| append(r, DiskRef::Source(0), IoKind::Read, 40..48));
    fires(
        "8",
        "a read after a failed write",
        &violations,
        "job 0: sub-job 5 started after an error had stopped the job",
    );
    // The error is known once the failing sub-job's writes have all completed: a read started
    // before that is fine, one started after is not.
    let violations = run.tampered(|r| {
        let failed = request(r, DiskRef::Target(1), IoKind::Write, 16);
        let other = request(r, DiskRef::Target(0), IoKind::Write, 16);
        let known = r.io[failed].done.max(r.io[other].done);
        r.io.push(IoRecord {
            issued_us: 0,
            done_us: 0,
            disk: DiskRef::Source(0),
            kind: IoKind::Read,
            sectors: 24..32,
            phase: 1,
            issued: known + 1,
            done: end_of_trace(r),
            ok: true,
        });
    });
    fires(
        "8",
        "a read just after the error is known",
        &violations,
        "job 0: sub-job 3 started after an error had stopped the job",
    );
    // ... but not before: the failed write alone does not stop the job while another write of
    // its sub-job is still in flight.
    let violations = run.tampered(|r| {
        let failed = request(r, DiskRef::Target(1), IoKind::Write, 16);
        let other = request(r, DiskRef::Target(0), IoKind::Write, 16);
        let end = end_of_trace(r);
        r.io[other].done = end + 10;
        let issued = r.io[failed].done + 1;
        r.io.push(IoRecord {
            issued_us: 0,
            done_us: 0,
            disk: DiskRef::Source(0),
            kind: IoKind::Read,
            sectors: 24..32,
            phase: 1,
            issued,
            done: end + 11,
            ok: true,
        });
    });
    assert!(
        !violations.iter().any(|v| v.contains("after an error had stopped")),
        "rule 8: a read issued while the failing sub-job's other write was in flight is no violation: {violations:#?}"
    );
    // The first error known stops the job, not the last.
    let run = stopping_on_a_read_error();
    let violations = run.tampered(|r| {
        let failed = request(r, DiskRef::Source(0), IoKind::Read, 16);
        let issued = r.io[failed].done + 1;
        let end = end_of_trace(r);
        r.io.push(IoRecord {
            issued_us: 0,
            done_us: 0,
            disk: DiskRef::Source(0),
            kind: IoKind::Read,
            sectors: 32..40,
            phase: 1,
            issued,
            done: end + 2,
            ok: true,
        });
        r.io.push(IoRecord {
            issued_us: 0,
            done_us: 0,
            disk: DiskRef::Source(0),
            kind: IoKind::Read,
            sectors: 40..48,
            phase: 1,
            issued: end,
            done: end + 1,
            ok: false,
        });
    });
    fires("8", "a read between two errors", &violations, "job 0: sub-job 4 started after an error had stopped the job");
    // With IGNORE_ERROR, nothing stops.
    let run = ignoring_errors();
    let violations = run.tampered(|r| {
        let failed = request(r, DiskRef::Source(0), IoKind::Read, 16);
        let issued = r.io[failed].done + 1;
        let read = request(r, DiskRef::Source(0), IoKind::Read, 40);
        r.io[read].issued = r.io[read].issued.max(issued);
    });
    assert!(
        !violations.iter().any(|v| v.contains("after an error had stopped")),
        "rule 8 does not apply under IGNORE_ERROR: {violations:#?}"
    );

    // Under WRITE_SEQ, a sub-job before the first failing one may start late (it was taken
    // before the error and waited for the throttle); one after it may not. Without WRITE_SEQ,
    // neither may.
    let late = |r: &mut SwarmReport, sector: u64| {
        let end = end_of_trace(r);
        let mut seq = end;
        for record in r.io.iter_mut().filter(|record| record.sectors.start == sector) {
            (record.issued, record.done) = (seq, seq + 1);
            seq += 2;
        }
    };
    let run = sequential_with_a_read_error(); // sub-job 1 fails
    let violations = run.tampered(|r| late(r, 0));
    assert!(
        !violations.iter().any(|v| v.contains("after an error had stopped")),
        "rule 8: under WRITE_SEQ, sub-job 0 before the failing sub-job 1 may start late: {violations:#?}"
    );
    let violations = run.tampered(|r| late(r, 16));
    fires("8", "WRITE_SEQ, a sub-job after the failing one", &violations, "job 0: sub-job 2 started after an error");
    let run = stopping_on_a_read_error(); // sub-job 2 fails
    let violations = run.tampered(|r| late(r, 8));
    fires(
        "8",
        "no WRITE_SEQ, a sub-job before the failing one",
        &violations,
        "job 0: sub-job 1 started after an error",
    );
}

#[test]
#[allow(
    clippy::too_many_lines,
    reason = "a list of perturbations of the same true runs, each refused by this rule: split, each piece would rebuild the runs it perturbs"
)]
fn rule_9_no_subjob_starts_after_a_cancel_and_cancelled_is_exact() {
    let run = cancelled();
    let first_untaken = run.outcome().targets[0].not_copied.ranges()[0].start;
    let violations =
        run.tampered(|r| append(r, DiskRef::Source(0), IoKind::Read, first_untaken..first_untaken + SUBJOB_SECTORS));
    fires(
        "9",
        "a read after the cancel",
        &violations,
        &format!("sub-job {} started after the job was cancelled", first_untaken / SUBJOB_SECTORS),
    );
    let violations = run.tampered(|r| outcome(r).cancelled = false);
    fires(
        "9",
        "cancelled cleared",
        &violations,
        "job 0: cancelled false but the cancel came before its last sub-job was taken",
    );
    // The cancel moved after the last sub-job was taken (and before completion).
    let violations = run.tampered(|r| {
        let last = r.io.iter().map(|record| record.issued).max().unwrap();
        for (seq, mark) in &mut r.marks {
            if *mark == Mark::Cancel(0) {
                *seq = last + 1;
            }
        }
        // Every sub-job taken: append the untaken ones before the cancel.
        let taken_end = first_untaken;
        let mut sector = taken_end;
        while sector < 128 {
            r.io.push(IoRecord {
                issued_us: 0,
                done_us: 0,
                disk: DiskRef::Source(0),
                kind: IoKind::Read,
                sectors: sector..sector + SUBJOB_SECTORS,
                phase: 1,
                issued: last,
                done: last + 2,
                ok: true,
            });
            sector += SUBJOB_SECTORS;
        }
    });
    fires(
        "9",
        "a cancel after the last sub-job",
        &violations,
        "job 0: cancelled true but the cancel came after its last sub-job was taken",
    );

    // The last sub-job taken after the cancel: `cancelled` must be set.
    let violations = run.tampered(|r| {
        let mut sector = first_untaken;
        while sector < 128 {
            append(r, DiskRef::Source(0), IoKind::Read, sector..sector + SUBJOB_SECTORS);
            sector += SUBJOB_SECTORS;
        }
        outcome(r).cancelled = false;
    });
    fires(
        "9",
        "the last sub-job taken after the cancel",
        &violations,
        "job 0: cancelled false but the cancel came before its last sub-job was taken",
    );

    // A job that stopped on an error and had issued its last request before the cancel came
    // (but completed after it) may say either.
    let run = stopping_on_a_read_error();
    for cancelled in [false, true] {
        let violations = run.tampered(|r| {
            let completed = r.marks.iter().find(|(_, m)| *m == Mark::Completed(0)).expect("completed").0;
            r.marks.push((completed - 1, Mark::Cancel(0)));
            outcome(r).cancelled = cancelled;
            // The statistics count what the outcome says (rule 19).
            stats(r).jobs_cancelled = u64::from(cancelled);
        });
        assert!(
            !violations.iter().any(|v| v.contains("cancel")),
            "rule 9: a cancel after the last request of a stopped job, cancelled {cancelled}: {violations:#?}"
        );
    }

    // A zero job under WRITE_SEQ, cancelled after its last sub-job was taken: not cancelled.
    let run = Accepted::run(
        "zero, WRITE_SEQ",
        inputs(vec![JobInputs { zero: true, write_seq: true, ..copy(48, &[0]) }], 1, 2),
    );
    let violations = run.tampered(|r| {
        let last = r.io.iter().map(|record| record.issued).max().unwrap();
        r.marks.push((last + 1, Mark::Cancel(0)));
        outcome(r).cancelled = true;
    });
    fires(
        "9",
        "zero WRITE_SEQ, cancelled after the last sub-job",
        &violations,
        "job 0: cancelled true but the cancel came after its last sub-job was taken",
    );

    let run = clean();
    let violations = run.tampered(|r| outcome(r).cancelled = true);
    fires("9", "cancelled set, no cancel", &violations, "job 0: cancelled true but the cancel came never");
    // A cancel mark after the completion does not count.
    let violations = run.tampered(|r| {
        let end = end_of_trace(r);
        r.marks.push((end, Mark::Cancel(0)));
        outcome(r).cancelled = true;
    });
    fires("9", "a cancel after completion", &violations, "job 0: cancelled true but the cancel came never");

    // The same of a WRITE_SEQ copy job and of a zero job.
    for (what, run) in [("WRITE_SEQ", cancelled_in_sequence()), ("zero job", zero_cancelled())] {
        let first_untaken =
            run.outcome().targets[0].not_copied.ranges().last().unwrap().start.next_multiple_of(SUBJOB_SECTORS);
        let (disk, kind) =
            if what == "zero job" { (DiskRef::Target(0), IoKind::Write) } else { (DiskRef::Source(0), IoKind::Read) };
        let violations = run.tampered(|r| append(r, disk, kind, first_untaken..first_untaken + SUBJOB_SECTORS));
        fires(
            "9",
            what,
            &violations,
            &format!("sub-job {} started after the job was cancelled", first_untaken / SUBJOB_SECTORS),
        );
        let violations = run.tampered(|r| outcome(r).cancelled = false);
        fires("9", what, &violations, "job 0: cancelled false but the cancel came before its last sub-job was taken");
    }

    let run = Accepted::run("zero-length", inputs(vec![copy(0, &[0]), copy(16, &[0])], 1, 1));
    let violations = run.tampered(|r| outcome(r).cancelled = true);
    fires("9", "a zero-length job cancelled", &violations, "job 0: a zero-length job reported cancelled");
}

#[test]
fn rule_10_write_seq_writes_one_after_another_upwards() {
    let run = sequential();
    let violations = run.tampered(|r| {
        let first = request(r, DiskRef::Target(1), IoKind::Write, 0);
        let second = request(r, DiskRef::Target(1), IoKind::Write, 8);
        r.io[second].issued = r.io[first].done - 1;
    });
    fires(
        "10",
        "overlapping in time",
        &violations,
        "job 0 target 1 (target1) (WRITE_SEQ): write 8..16 issued before write 0..8 completed",
    );
    let violations = run.tampered(|r| {
        let first = request(r, DiskRef::Target(0), IoKind::Write, 8);
        let second = request(r, DiskRef::Target(0), IoKind::Write, 16);
        r.io[first].sectors = 16..24;
        r.io[second].sectors = 8..16;
    });
    fires(
        "10",
        "downwards",
        &violations,
        "job 0 target 0 (target0) (WRITE_SEQ): write 8..16 issued before write 16..24 completed or below it",
    );

    // A zoned target logs a refused write, which the oracle reports.
    let mut zoned = inputs(vec![copy(64, &[0])], 1, 2);
    zoned.targets[0].zoned = true;
    let run = Accepted::run("zoned", zoned);
    let target = run.report.targets[0].clone();
    let refused = Simulation::block_on(async move {
        use kcopyd_core::BlockDevice as _;
        target.write(70, kcopyd_core::WriteBuf::zeroes(512)).await
    });
    assert!(refused.is_err(), "a write above the write pointer");
    let violations = check(&run.scenario, &run.report);
    fires("10", "refused by the zone", &violations, "target0: write 70..71 refused by the zone");
}

#[test]
fn rule_11_subjobs_in_flight_and_pages_stay_within_their_limits() {
    let run = stopping_on_a_write_error(); // one sub-job in flight
    let violations = run.tampered(|r| {
        let first = request(r, DiskRef::Source(0), IoKind::Read, 0);
        let second = request(r, DiskRef::Source(0), IoKind::Read, 8);
        r.io[second].issued = r.io[first].issued;
    });
    fires("11", "two sub-jobs in flight", &violations, "job 0 (phase 1): 2 sub-jobs in flight at trace position");

    // Two sub-jobs of one page each in flight, over a budget of one page (the same cut into sub-jobs:
    // budget 1 page = 8 sectors).
    let mut two_pages = inputs(vec![copy(48, &[0])], 1, 2);
    two_pages.page_budget = 2;
    let run = Accepted::run("two pages", two_pages);
    let violations = run.tampered(|r| {
        let first = request(r, DiskRef::Source(0), IoKind::Read, 0);
        let second = request(r, DiskRef::Source(0), IoKind::Read, 8);
        let third = request(r, DiskRef::Source(0), IoKind::Read, 16);
        r.io[second].issued = r.io[first].issued;
        r.io[third].issued = r.io[first].issued;
    });
    fires("11", "three sub-jobs in flight", &violations, "over subjobs_in_flight 2");
    let violations = run.with_scenario(|s| s.config.page_budget = 1);
    fires(
        "11",
        "two pages over a budget of one",
        &violations,
        "phase 1: copy sub-jobs in flight hold at least 2 pages",
    );
    let violations = run.tampered(|r| r.pages_in_use_max = 3);
    fires(
        "11",
        "the pool's own high-water mark",
        &violations,
        "the pool reports 3 pages in use at once over a budget of 2",
    );

    // Pages are counted per sub-job from its sectors: two sub-jobs of 32 sectors (4 pages each)
    // hold 8 pages, over a budget of 7 (which still allows sub-jobs of 32 sectors).
    let mut big_subjobs = inputs(vec![copy(128, &[0])], 1, 2);
    big_subjobs.subjob_units = 32;
    big_subjobs.page_budget = 8;
    let run = Accepted::run("sub-jobs of 4 pages", big_subjobs);
    let violations = run.with_scenario(|s| s.config.page_budget = 7);
    fires("11", "8 pages over a budget of 7", &violations, "phase 1: copy sub-jobs in flight hold at least 8 pages");
    // A zero job holds no pages.
    let mut zero = inputs(vec![JobInputs { zero: true, ..copy(48, &[0]) }], 1, 2);
    zero.page_budget = 1;
    Accepted::run("a zero job with one page", zero);

    // Phase 2 (after a crash) is measured too.
    let run = crashed();
    let violations = run.tampered(|r| {
        let retried: Vec<usize> =
            (0..r.io.len()).filter(|&i| r.io[i].phase == 2 && r.io[i].kind == IoKind::Read).collect();
        let (first, rest) = retried.split_first().expect("reads in phase 2");
        let issued = r.io[*first].issued;
        for &i in rest {
            r.io[i].issued = issued;
        }
    });
    fires("11", "phase 2", &violations, "(phase 2):");
}

#[test]
#[allow(
    clippy::too_many_lines,
    reason = "a list of perturbations of the same true runs, each refused by this rule: split, each piece would rebuild the runs it perturbs"
)]
fn rule_12_every_request_is_whole_blocks_of_one_subjob_of_one_region() {
    let run = clean();
    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        (
            "outside every region",
            run.tampered(|r| append(r, DiskRef::Target(0), IoKind::Write, 48..50)),
            "Target(0) Write 48..50 (phase 1): outside every job's region",
        ),
        (
            "an empty request",
            run.tampered(|r| append(r, DiskRef::Source(0), IoKind::Read, 3..3)),
            "Source(0) Read 3..3: not whole logical blocks",
        ),
        (
            "across two sub-jobs",
            run.tampered(|r| append(r, DiskRef::Source(0), IoKind::Read, 4..12)),
            "job 0: Source(0) Read 4..12 spans sub-jobs of 8 sectors",
        ),
        (
            "a read of a target",
            run.tampered(|r| {
                let i = request(r, DiskRef::Target(2), IoKind::Write, 0);
                r.io[i].kind = IoKind::Read;
            }),
            "job 0: Target(2) Read 0..8 on its Target(2)",
        ),
        (
            "a write to the source",
            run.tampered(|r| append(r, DiskRef::Source(0), IoKind::Write, 0..8)),
            "job 0: Source(0) Write 0..8 on its Source",
        ),
        (
            "a write of the whole region",
            run.tampered(|r| append(r, DiskRef::Target(0), IoKind::Write, 0..48)),
            "job 0: Target(0) Write 0..48 spans sub-jobs of 8 sectors",
        ),
    ];
    for (case, violations, message) in cases {
        fires("12", case, &violations, message);
    }

    // Misaligned on a 4 KiB disk.
    let mut big = inputs(vec![copy(6, &[0])], 1, 2);
    big.big_units = true;
    big.sources[0].block_4k = true;
    let run = Accepted::run("4 KiB source", big);
    let violations = run.tampered(|r| append(r, DiskRef::Source(0), IoKind::Read, 8..12));
    fires("12", "half a block", &violations, "Source(0) Read 8..12: not whole logical blocks");
    let violations = run.tampered(|r| append(r, DiskRef::Source(0), IoKind::Read, 4..8));
    fires("12", "half a block, aligned end", &violations, "Source(0) Read 4..8: not whole logical blocks");

    // Phase 2 too.
    let run = crashed();
    let violations = run.tampered(|r| {
        let i = r.io.iter().position(|record| record.phase == 2).expect("phase 2");
        r.io[i].sectors = 1000..1008;
    });
    fires("12", "phase 2, outside every region", &violations, "1000..1008 (phase 2): outside every job's region");

    // A zero job whose targets all offload write-zeroes sends each exactly one write-zeroes of
    // its whole region: not two, not part of it, not plain writes, not none (unless cancelled
    // before it started).
    let run = hard_but_true().swap_remove(1);
    let message = "job 0: target 0 (target0) offloads write-zeroes, yet the zero job sent";
    let violations = run.tampered(|r| append(r, DiskRef::Target(0), IoKind::WriteZeroes, 0..48));
    fires("12", "two write-zeroes", &violations, &format!("{message} [(WriteZeroes, 0..48), (WriteZeroes, 0..48)]"));
    let violations = run.tampered(|r| {
        let i = request(r, DiskRef::Target(0), IoKind::WriteZeroes, 0);
        r.io[i].sectors = 0..8;
    });
    fires("12", "part of the region", &violations, &format!("{message} [(WriteZeroes, 0..8)]"));
    let violations = run.tampered(|r| {
        let i = request(r, DiskRef::Target(0), IoKind::WriteZeroes, 0);
        r.io[i].kind = IoKind::Write;
        r.io[i].sectors = 0..8;
        for sector in (8..48).step_by(SUBJOB_SECTORS as usize) {
            append(r, DiskRef::Target(0), IoKind::Write, sector..sector + SUBJOB_SECTORS);
        }
    });
    fires("12", "plain writes", &violations, &format!("{message} [(Write, 0..8), (Write, 8..16)"));
    let removed = |r: &mut SwarmReport| {
        let i = request(r, DiskRef::Target(0), IoKind::WriteZeroes, 0);
        r.io.remove(i).issued
    };
    let violations = run.tampered(|r| {
        removed(r);
    });
    fires("12", "no request", &violations, &format!("{message} []"));
    let violations = run.tampered(|r| {
        let issued = removed(r);
        r.marks.push((issued, Mark::Cancel(0)));
    });
    assert!(
        !violations.iter().any(|v| v.contains("offloads write-zeroes")),
        "rule 12: a zero job cancelled before it started sends nothing: {violations:#?}"
    );
}

#[test]
fn rule_13_a_run_that_does_not_finish_is_a_deadlock() {
    let run = clean();
    let violations = run.tampered(|r| r.deadlocked = true);
    fires("13", "deadlocked", &violations, "deadlock: jobs still running after");
}

/// The sequence number of the first `mark` in `report`.
fn mark_at(report: &SwarmReport, mark: Mark) -> u64 {
    report.marks.iter().find(|(_, m)| *m == mark).unwrap_or_else(|| panic!("no {mark:?} in {:?}", report.marks)).0
}

/// Moves the first `mark` in `report` to sequence number `seq`.
fn move_mark(report: &mut SwarmReport, mark: Mark, seq: u64) {
    let entry = report.marks.iter_mut().find(|(_, m)| *m == mark).unwrap_or_else(|| panic!("no {mark:?}"));
    entry.0 = seq;
}

/// Removes every `mark` from `report`.
fn drop_marks(report: &mut SwarmReport, mark: Mark) {
    report.marks.retain(|(_, m)| *m != mark);
}

/// A shutdown 200 µs in, while job 0 (48 sectors, 2 sub-jobs in flight) runs; job 1 submitted at
/// 3 ms, after it, is refused. Prepared callbacks: 0 prepared at once and completed 300 µs later
/// with read_err and write_err {0, 2}, 1 prepared at 50 µs and dropped 100 µs later, 2
/// prepared at 2 ms, after the shutdown began, refused.
fn shut_down_mid_run() -> Accepted {
    let late = JobInputs { submit_at_us: 3000, gap_units: 8, ..copy(16, &[0]) };
    let mut inputs = inputs(vec![copy(48, &[0]), late], 1, 2);
    inputs.shutdown_at_us = Some(200);
    inputs.prepared = vec![
        PreparedInputs {
            at_us: 0,
            after_us: 300,
            complete: true,
            read_err: true,
            write_err_bits: 0b101,
            in_callback_of: None,
        },
        PreparedInputs { at_us: 50, after_us: 100, complete: false, ..PreparedInputs::default() },
        PreparedInputs { at_us: 2000, after_us: 100, complete: true, ..PreparedInputs::default() },
    ];
    let accepted = Accepted::run("shutdown in the middle of the run", inputs);
    let report = &accepted.report;
    assert_eq!(report.jobs[1].refused, Some(SubmitError::ShutDown), "job 1 came after the shutdown");
    assert!(report.jobs[0].refused.is_none() && accepted.outcome().is_ok());
    assert_eq!(report.shutdown_reports.len(), 2, "the one in the middle of the run, and the final one");
    assert!(mark_at(report, Mark::ShutdownBegun) < mark_at(report, Mark::Completed(0)), "job 0 ran on");
    assert_eq!(report.prepared[0].outcomes.len(), 1);
    assert!(report.prepared[1].outcomes[0].cancelled, "dropped");
    assert_eq!(report.prepared[2].refused, Some(SubmitError::ShutDown));
    accepted
}

#[test]
fn rule_15_a_shutdown_refuses_later_jobs_and_waits_for_the_accepted_ones() {
    let run = shut_down_mid_run();
    let begun = mark_at(&run.report, Mark::ShutdownBegun);
    let returned = mark_at(&run.report, Mark::ShutdownReturned);

    // Refused with another error, or before any shutdown began, or with a trace of work.
    let violations = run.tampered(|r| r.jobs[1].refused = Some(SubmitError::NoTargets));
    fires("15", "another error", &violations, "job 1: refused with NoTargets, expected ShutDown");
    let violations = run.tampered(|r| move_mark(r, Mark::Refused(1), begun - 1));
    fires(
        "15",
        "refused before the shutdown",
        &violations,
        "job 1: refused (the client is shut down) before any shutdown began",
    );
    let violations = run.tampered(|r| drop_marks(r, Mark::Refused(1)));
    fires("15", "no refusal marked", &violations, "job 1: refused (the client is shut down) before any shutdown began");
    let violations = run.tampered(|r| drop_marks(r, Mark::ShutdownBegun));
    fires("15", "no shutdown begun", &violations, "job 1: refused (the client is shut down) before any shutdown began");
    let violations = run.tampered(|r| append(r, DiskRef::Source(0), IoKind::Read, 64..72));
    fires("15", "a refused job's read", &violations, "job 1: refused, yet 1 requests, 0 completions, outcome None");
    let violations = run.tampered(|r| r.jobs[1].callbacks = 1);
    fires("15", "a refused job's completion", &violations, "job 1: refused, yet 0 requests, 1 completions");
    let violations = run.tampered(|r| r.jobs[1].outcome = r.jobs[0].outcome.clone());
    fires("15", "a refused job's outcome", &violations, "job 1: refused, yet 0 requests, 0 completions, outcome Some");

    // Accepted though submitted after the shutdown began.
    let violations = run.tampered(|r| move_mark(r, Mark::Submitting(0), begun + 1));
    fires("15", "accepted after the shutdown", &violations, "job 0: submitted after the shutdown began, yet accepted");

    // The shutdown returned before job 0 completed, or while one of its requests was in flight.
    let violations = run.tampered(|r| move_mark(r, Mark::Completed(0), returned + 1));
    fires("15", "returned before completion", &violations, "job 0: the shutdown returned before the job completed");
    let violations = run.tampered(|r| drop_marks(r, Mark::Completed(0)));
    fires("15", "never completed", &violations, "job 0: the shutdown returned before the job completed");
    let violations = run.tampered(|r| {
        let i = request(r, DiskRef::Target(0), IoKind::Write, 40);
        r.io[i].done = returned + 1;
    });
    fires(
        "15",
        "a write in flight",
        &violations,
        "job 0: request Write 40..48 still in flight when the shutdown returned",
    );

    // The shutdown reports' counts: the mid-run one counts the accepted job, so does the final.
    let violations = run.tampered(|r| r.shutdown_reports[0].jobs_completed = 0);
    fires("15", "jobs_completed", &violations, "shutdown 0: 0 jobs completed (expected 1), 0 pages in use");
    let violations = run.tampered(|r| r.shutdown_reports[1].jobs_completed = 2);
    fires("15", "jobs_completed, final", &violations, "shutdown 1: 2 jobs completed (expected 1)");
    // After a crash, the final shutdown counts the resubmissions too.
    let crash = crashed();
    let violations = crash.tampered(|r| r.shutdown_reports[0].jobs_completed = 1);
    fires("15", "resubmissions uncounted", &violations, "shutdown 0: 1 jobs completed (expected 2)");

    // Every shutdown is marked begun and returned: two with one in the middle of the run, one
    // without.
    let violations = run.tampered(|r| {
        let last = r.marks.iter().rposition(|(_, m)| *m == Mark::ShutdownBegun).expect("the final shutdown");
        r.marks.remove(last);
    });
    fires("15", "the final shutdown unmarked", &violations, "asked at Some(200) µs: 1 shutdowns begun, 2 returned");
    let violations = run.with_scenario(|s| s.shutdown_at_us = None);
    fires("15", "an unasked shutdown", &violations, "asked at None µs: 2 shutdowns begun, 2 returned");
    let violations = clean().tampered(|r| {
        let last = r.marks.iter().rposition(|(_, m)| *m == Mark::ShutdownReturned).expect("the final shutdown");
        r.marks.remove(last);
    });
    fires("15", "a shutdown that never returned", &violations, "asked at None µs: 1 shutdowns begun, 0 returned");
}

#[test]
fn rule_16_a_prepared_callback_runs_once_as_completed_before_the_shutdown_returns() {
    let run = shut_down_mid_run();
    let begun = mark_at(&run.report, Mark::ShutdownBegun);
    let returned = mark_at(&run.report, Mark::ShutdownReturned);

    // Ran 0 or 2 times.
    let violations = run.tampered(|r| drop_marks(r, Mark::PreparedRan(0)));
    fires("16", "never ran", &violations, "prepared 0: ran 0 times");
    let violations = run.tampered(|r| r.prepared[0].outcomes.clear());
    fires("16", "no outcome", &violations, "prepared 0: ran 1 times");
    let violations = run.tampered(|r| {
        let again = end_of_trace(r);
        r.marks.push((again, Mark::PreparedRan(1)));
        let outcome = r.prepared[1].outcomes[0].clone();
        r.prepared[1].outcomes.push(outcome);
    });
    fires("16", "ran twice", &violations, "prepared 1: ran 2 times");

    // Before it was queued.
    let violations = run.tampered(|r| {
        let queued = mark_at(r, Mark::PreparedQueued(0));
        move_mark(r, Mark::PreparedRan(0), queued - 1);
    });
    fires("16", "ran before it was queued", &violations, "before it was queued (Some(");
    let violations = run.tampered(|r| drop_marks(r, Mark::PreparedQueued(0)));
    fires("16", "never queued", &violations, "before it was queued (None)");

    // With another read_err, write_err, or cancelled.
    let violations = run.tampered(|r| r.prepared[0].outcomes[0].read_err = false);
    fires("16", "read_err", &violations, "prepared 0: ran with");
    fires("16", "read_err", &violations, "expected read_err true, write_err {0, 2}, cancelled false");
    let violations = run.tampered(|r| r.prepared[0].outcomes[0].write_err.set(1));
    fires("16", "write_err", &violations, "prepared 0: ran with");
    let violations = run.tampered(|r| r.prepared[0].outcomes[0].cancelled = true);
    fires("16", "cancelled, completed", &violations, "prepared 0: ran with");
    let violations = run.tampered(|r| r.prepared[1].outcomes[0].cancelled = false);
    fires("16", "not cancelled, dropped", &violations, "expected read_err false, write_err {}, cancelled true");
    let violations = run.tampered(|r| r.prepared[1].outcomes[0].read_err = true);
    fires("16", "read_err, dropped", &violations, "prepared 1: ran with");

    // After the shutdown (begun after its preparation) returned.
    let violations = run.tampered(|r| move_mark(r, Mark::PreparedRan(0), returned + 1));
    fires(
        "16",
        "after the shutdown returned",
        &violations,
        &format!(
            "prepared 0: the shutdown begun at {begun} returned at {returned}, before the callback ran at {}",
            returned + 1
        ),
    );

    // Accepted after a shutdown began; refused wrongly.
    let violations = run.tampered(|r| move_mark(r, Mark::Preparing(1), begun + 1));
    fires(
        "16",
        "accepted after the shutdown",
        &violations,
        &format!("prepared 1: prepared at {}, after a shutdown began at {begun}, yet accepted", begun + 1),
    );
    let violations = run.tampered(|r| r.prepared[2].refused = Some(SubmitError::NoTargets));
    fires("16", "another error", &violations, "prepared 2: refused with NoTargets at");
    let violations = run.tampered(|r| move_mark(r, Mark::PrepareRefused(2), begun - 1));
    fires(
        "16",
        "refused before the shutdown",
        &violations,
        &format!("prepared 2: refused with ShutDown at {}", begun - 1),
    );
    let violations = run.tampered(|r| r.prepared[2].outcomes.push(Outcome::default()));
    fires("16", "refused, yet ran", &violations, "prepared 2: refused with ShutDown at");
    fires("16", "refused, yet ran", &violations, "ran 1 times");
    // A refused one that was never prepared (its time came after the run) is not judged.
    let violations = run.tampered(|r| {
        drop_marks(r, Mark::Preparing(2));
        r.prepared[2].refused = Some(SubmitError::NoTargets);
    });
    assert!(!violations.iter().any(|v| v.contains("prepared 2")), "rule 16: never prepared: {violations:#?}");
}

/// A region of a validation case.
fn region(device: usize, start_sector: u64, len_sectors: u64) -> RegionInputs {
    RegionInputs { device, start_sector, len_sectors }
}

#[test]
fn validation_reports_an_engine_that_disagrees_with_the_reference() {
    // Devices: 64 sectors of 512-byte blocks, 64 sectors of 4 KiB blocks.
    let case = |source: Option<RegionInputs>, targets: Vec<RegionInputs>| ValidationCase {
        devices: vec![(64, 512), (64, 4096)],
        source,
        targets,
        page_budget: 8,
        zero_block_bytes: None,
        throttle: None,
    };
    let throttled = |busy_percent: Option<u32>, rate_bytes_per_s: Option<u64>| ValidationCase {
        throttle: Some(kcopyd_core::Throttle { busy_percent, rate_bytes_per_s }),
        ..case(Some(region(0, 0, 8)), vec![region(0, 8, 8)])
    };
    let sparse = |zero_block_bytes: u32| ValidationCase {
        zero_block_bytes: Some(zero_block_bytes),
        ..case(Some(region(0, 0, 8)), vec![region(0, 8, 8)])
    };
    // One case per rule: the engine's refusal must be named as that rule, with its indices,
    // device and sectors; checked against an empty list, it is a disagreement naming the rule.
    let cases: Vec<(ValidationCase, BrokenRule)> = vec![
        (case(Some(region(0, 0, 8)), vec![]), BrokenRule::NoTargets),
        (case(None, (0..=TARGETS_MAX as u64).map(|i| region(0, i % 8, 0)).collect()), BrokenRule::TooManyTargets),
        (case(Some(region(0, 0, 8)), vec![region(0, 16, 8), region(0, 32, 4)]), BrokenRule::CountMismatch(1)),
        (case(Some(region(0, 60, 8)), vec![region(0, 0, 8)]), BrokenRule::OutOfRange(0, 60..68)),
        (case(Some(region(0, 0, 8)), vec![region(1, 4, 8)]), BrokenRule::Misaligned(1, 4..12)),
        (case(Some(region(0, 8, 8)), vec![region(0, 12, 8)]), BrokenRule::TargetOverlapsSource(0)),
        (
            case(None, vec![region(1, 8, 8), region(0, 0, 8), region(1, 0, 8), region(1, 0, 8)]),
            BrokenRule::TargetsOverlap(2, 3),
        ),
        (sparse(768), BrokenRule::ZeroBlockSize(768)),
        (sparse(256), BrokenRule::ZeroBlockSize(256)),
        (throttled(Some(0), None), BrokenRule::ThrottleBusy(0)),
        (throttled(Some(101), Some(1 << 20)), BrokenRule::ThrottleBusy(101)),
        (throttled(None, Some(0)), BrokenRule::ThrottleRate),
    ];
    for (case, rule) in cases {
        let reference = case.reference();
        assert!(reference.contains(&rule), "{rule:?} not in the reference's {reference:?} for {case:?}");
        let agreed = case.check_against(std::slice::from_ref(&rule));
        assert!(agreed.is_empty(), "{rule:?}: the engine names it, yet {agreed:?}");
        let problems = case.check_against(&[]);
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("refused with") && p.contains(&format!("({rule:?}), expected one of []"))),
            "validation, {rule:?}: a refusal the reference does not expect is reported: {problems:?}"
        );
    }
    // Exactly TARGETS_MAX targets are allowed.
    let most = case(None, (0..TARGETS_MAX as u64).map(|i| region(0, i % 8, 0)).collect());
    assert_eq!(most.reference(), vec![], "{TARGETS_MAX} zero-length targets");
    assert_eq!(most.check(), Vec::<String>::new());

    // A valid case that the reference (wrongly, here) says must be refused.
    let valid = case(Some(region(0, 0, 8)), vec![region(0, 8, 8), region(1, 0, 8)]);
    assert!(valid.reference().is_empty());
    assert!(valid.check().is_empty());
    let problems = valid.check_against(&[BrokenRule::TargetsOverlap(0, 1)]);
    assert!(
        problems.iter().any(|p| p.starts_with("accepted, but it breaks [TargetsOverlap(0, 1)]")),
        "validation: an acceptance the reference does not expect is reported: {problems:?}"
    );
    // A valid throttle the reference (wrongly) says must be refused: both the client started
    // with it and the one it is set on are reported.
    let limited = throttled(Some(100), Some(u64::MAX));
    assert_eq!(limited.check(), Vec::<String>::new());
    let problems = limited.check_against(&[BrokenRule::ThrottleRate]);
    assert!(
        problems.iter().any(|p| p.contains("started, but it breaks [ThrottleRate]"))
            && problems.iter().any(|p| p.contains("set, but it breaks [ThrottleRate]")),
        "validation: a throttle accepted that the reference refuses is reported: {problems:?}"
    );
}

/// A copy of 256 sectors (32 sub-jobs of 8 sectors) throttled to 1 MiB/s: 128 KiB, about an
/// eighth of a second of model time.
fn rate_limited() -> Accepted {
    let mut throttled = inputs(vec![copy(256, &[0])], 1, 4);
    throttled.throttle = kcopyd_core::Throttle { busy_percent: None, rate_bytes_per_s: Some(1 << 20) };
    Accepted::run("rate-limited", throttled)
}

#[test]
fn rule_17_a_rate_limited_client_stays_within_its_rate() {
    let run = rate_limited();
    let last = run.report.io.iter().map(|r| r.issued_us).max().expect("requests");
    assert!(last > 100_000, "the throttle spread the copy over {last} µs of model time");
    // Every request issued at once: 128 KiB at time 0, over a bucket of two sub-jobs.
    let violations = run.tampered(|r| r.io.iter_mut().for_each(|record| record.issued_us = 0));
    fires("17", "all at once", &violations, "throttle of 1048576 B/s: ");
    // Twice as fast as allowed.
    let violations = run.tampered(|r| r.io.iter_mut().for_each(|record| record.issued_us /= 2));
    fires("17", "twice the rate", &violations, "throttle of 1048576 B/s: ");
    // The same run under a rate it did not have.
    let violations = run.with_scenario(|s| s.config.throttle.rate_bytes_per_s = Some(1 << 19));
    fires("17", "half the rate", &violations, "more than the");
    // Without a rate, nothing to check.
    let violations = run.with_scenario(|s| s.config.throttle.rate_bytes_per_s = None);
    assert!(violations.is_empty(), "{violations:#?}");
}

/// The statistics of `report`, to change.
fn stats(report: &mut SwarmReport) -> &mut kcopyd_core::ClientStats {
    report.stats.as_mut().expect("statistics after the shutdown")
}

#[test]
fn rule_19_statistics_agree_with_the_outcomes_and_the_io_log() {
    let run = ignoring_errors();
    let stats_of = |r: &SwarmReport| r.stats.clone().expect("statistics");
    assert_eq!(stats_of(&run.report).jobs_failed, 1);
    // Jobs: one more submitted, completed, failed or cancelled than the outcomes say.
    let violations = run.tampered(|r| stats(r).jobs_submitted += 1);
    fires("19", "submitted", &violations, "statistics: jobs submitted, completed, failed, cancelled (2, 1, 1, 0)");
    let violations = run.tampered(|r| stats(r).jobs_completed = 0);
    fires("19", "completed", &violations, "statistics: jobs submitted, completed, failed, cancelled (1, 0, 1, 0)");
    let violations = run.tampered(|r| stats(r).jobs_failed = 0);
    fires("19", "failed", &violations, "the outcomes say (1, 1, 1, 0)");
    let violations = cancelled().tampered(|r| stats(r).jobs_cancelled = 0);
    fires("19", "cancelled", &violations, "statistics: jobs submitted, completed, failed, cancelled (1, 1, 0, 0)");
    // Requests per device and operation.
    let device = |r: &mut SwarmReport, name: &str| -> usize {
        stats(r).devices.iter().position(|d| d.name == name).expect("the device")
    };
    let violations = run.tampered(|r| {
        let d = device(r, "source0");
        stats(r).devices[d].read.count += 1;
    });
    fires("19", "a read more", &violations, "statistics: source0 read: [count, errors, timeouts, bytes");
    let violations = run.tampered(|r| {
        let d = device(r, "source0");
        stats(r).devices[d].read.errors = 0;
    });
    fires("19", "a read error less", &violations, "statistics: source0 read:");
    let violations = run.tampered(|r| {
        let d = device(r, "target1");
        stats(r).devices[d].write.bytes += 512;
    });
    fires("19", "bytes", &violations, "statistics: target1 write:");
    let violations = run.tampered(|r| {
        let d = device(r, "target1");
        stats(r).devices[d].write.timeouts = 1;
    });
    fires("19", "a timeout that did not happen", &violations, "statistics: target1 write:");
    let violations = run.tampered(|r| {
        let d = device(r, "target0");
        stats(r).devices[d].write.latency.record(std::time::Duration::from_micros(150));
    });
    fires("19", "a latency more", &violations, "statistics: target0 write:");
    let violations = run.tampered(|r| {
        let d = device(r, "target2");
        stats(r).devices.remove(d);
    });
    fires(
        "19",
        "a device left out",
        &violations,
        "statistics: target2 write: [count, errors, timeouts, bytes, latencies, sum µs, max µs] None",
    );
    // And the other way: a request in the log the statistics do not count.
    let violations = run.tampered(|r| append(r, DiskRef::Target(2), IoKind::WriteZeroes, 0..8));
    fires("19", "a request uncounted", &violations, "statistics: target2 write_zeroes:");
}

/// Two copies of 16 sectors, one after the other (job 1 submitted at 5 ms); prepared callback 0
/// prepared at once and queued from inside job 0's callback; prepared callback 1 prepared at
/// 100 µs and queued 20 ms later, after both jobs.
fn callbacks_in_order() -> Accepted {
    let later = JobInputs { submit_at_us: 5000, gap_units: 8, ..copy(16, &[0]) };
    let mut inputs = inputs(vec![copy(16, &[0]), later], 1, 2);
    inputs.prepared = vec![
        PreparedInputs { after_us: 1_000_000, complete: true, in_callback_of: Some(0), ..PreparedInputs::default() },
        PreparedInputs { at_us: 100, after_us: 20_000, complete: true, ..PreparedInputs::default() },
    ];
    let accepted = Accepted::run("callbacks in order", inputs);
    let report = &accepted.report;
    let queued = mark_at(report, Mark::PreparedQueued(0));
    assert!(mark_at(report, Mark::Completed(0)) < queued && queued < mark_at(report, Mark::CallbackReturned(0)));
    assert!(mark_at(report, Mark::CallbackReturned(1)) < mark_at(report, Mark::PreparedRan(1)));
    accepted
}

#[test]
fn rule_20_callbacks_run_one_at_a_time_and_prepared_ones_after_the_completions_before_them() {
    let run = callbacks_in_order();
    // Prepared 0 run inside job 0's callback (as if `complete` ran it at once): the callback
    // returns only after it.
    let violations = run.tampered(|r| {
        let returned = mark_at(r, Mark::PreparedReturned(0));
        move_mark(r, Mark::CallbackReturned(0), returned + 1);
    });
    fires("20", "run inside the callback", &violations, "callbacks: prepared 0 began at");
    fires("20", "run inside the callback", &violations, "while job 0's callback ran");
    fires("20", "run inside the callback", &violations, "callbacks: prepared 0, queued at");
    fires("20", "run inside the callback", &violations, "after job 0's callback began");
    // Prepared 1, queued after both jobs' callbacks, run before job 1's (moved before it).
    let violations = run.tampered(|r| {
        let queued = mark_at(r, Mark::PreparedQueued(1));
        let returned = mark_at(r, Mark::PreparedReturned(1));
        // Job 1's callback begins just before prepared 1 is queued and returns after it ran.
        move_mark(r, Mark::Completed(1), queued - 1);
        move_mark(r, Mark::CallbackReturned(1), returned + 1);
    });
    fires(
        "20",
        "a prepared callback before a completion queued before it",
        &violations,
        "callbacks: prepared 1, queued at",
    );
    // Two callbacks at once: job 1's begins while job 0's runs.
    let violations = run.tampered(|r| {
        let inside = mark_at(r, Mark::Completed(0)) + 1;
        move_mark(r, Mark::Completed(1), inside);
    });
    fires("20", "two at once", &violations, "callbacks: job 1's callback began at");
    // A callback that never returned.
    let violations = run.tampered(|r| drop_marks(r, Mark::CallbackReturned(1)));
    fires("20", "never returned", &violations, "callbacks: job 1's callback began at");
    fires("20", "never returned", &violations, "and never returned");
}

/// A copy of 512 sectors (64 sub-jobs of 8, one in flight) on disks whose every request costs
/// 5 ms, under a busy limit of 20 %: 640 ms of I/O spread over about 3 s of model time.
fn busy_limited() -> Accepted {
    let slow = TimingInputs { cost_us: 5000, ..TimingInputs::default() };
    let mut throttled = inputs(vec![copy(512, &[0])], 1, 1);
    for disk in throttled.sources.iter_mut().chain(&mut throttled.targets) {
        (disk.read, disk.write) = (slow.clone(), slow.clone());
    }
    throttled.throttle = kcopyd_core::Throttle { busy_percent: Some(20), rate_bytes_per_s: None };
    Accepted::run("busy-limited", throttled)
}

#[test]
fn rule_18_a_busy_limited_client_stays_within_its_share_of_every_window_and_progresses() {
    let run = busy_limited();
    let last = run.report.io.iter().map(|r| r.done_us).max().expect("requests");
    assert!(last > 2_500_000, "the throttle spread the copy over {last} µs of model time");
    // Idle stretches cut to a quarter (each request moved earlier by three quarters of the idle
    // time before it): busy half of the time, not a fifth.
    let violations = run.tampered(|r| {
        let mut lives: Vec<(u64, u64)> = r.io.iter().map(|record| (record.issued_us, record.done_us)).collect();
        lives.sort_unstable();
        let (mut busy_end, mut idle) = (0, Vec::new()); // idle: (from, idle time before it ends)
        let mut idle_total = 0;
        for (from, to) in lives {
            if from > busy_end {
                idle_total += from - busy_end;
                idle.push((from, idle_total));
            }
            busy_end = busy_end.max(to);
        }
        let earlier = |us: u64| us - idle.iter().rev().find(|&&(from, _)| from <= us).map_or(0, |&(_, i)| i * 3 / 4);
        r.io.iter_mut().for_each(|record| {
            (record.issued_us, record.done_us) = (earlier(record.issued_us), earlier(record.done_us))
        });
    });
    fires("18", "idle cut to a quarter", &violations, "busy limit of 20 %: busy ");
    // The same run judged under half its limit.
    let violations = run.with_scenario(|s| s.config.throttle.busy_percent = Some(10));
    fires("18", "half the limit", &violations, "busy limit of 10 %: busy ");
    // Idle for 6 s (longer than 100 / 20 windows and a sub-job) in the middle, the job waiting.
    let violations = run.tampered(|r| {
        let middle = last / 2;
        let later = |us: &mut u64| {
            if *us > middle && *us != u64::MAX {
                *us += 6_000_000;
            }
        };
        r.io.iter_mut().for_each(|record| {
            later(&mut record.issued_us);
            later(&mut record.done_us);
        });
        r.mark_us.iter_mut().for_each(later);
    });
    fires("18", "idle while a job waits", &violations, "busy limit of 20 %: idle from");
    // Without a busy limit (or at 100 %), nothing to check.
    for percent in [None, Some(100)] {
        let violations = run.with_scenario(|s| s.config.throttle.busy_percent = percent);
        assert!(violations.is_empty(), "{percent:?}: {violations:#?}");
    }
}

/// IGNORE_ERROR, a 5 ms timeout, 3 sub-jobs of 8 sectors (one page each): the source holds its
/// second request (sub-job 1's read) for ever and its third 2 ms (within the timeout).
fn timing_out() -> Accepted {
    let mut inputs = inputs(vec![JobInputs { ignore_error: true, ..copy(24, &[0]) }], 1, 1);
    inputs.io_timeout_ms = Some(5);
    inputs.sources[0].faults.stalls = vec![(1, None), (2, Some(2000))];
    let accepted = Accepted::run("a read timing out", inputs);
    let outcome = accepted.outcome();
    assert_eq!(outcome.read_failed, RangeSet::from_range(8..16), "the whole sub-job, not narrowed");
    assert_eq!(outcome.targets[0].not_copied, RangeSet::from_range(8..16));
    let report = &accepted.report.shutdown_reports[0];
    assert_eq!((report.requests_outstanding, report.pool.pages_in_use), (1, 1), "the stuck read and its page");
    accepted
}

#[test]
fn rule_21_timed_out_requests_fail_whole_and_hold_their_pages_until_the_device_returns_them() {
    let run = timing_out();
    // The shutdown report and the statistics after it: what the device still holds.
    let violations = run.tampered(|r| r.shutdown_reports[0].requests_outstanding = 0);
    fires(
        "21",
        "nothing outstanding",
        &violations,
        "shutdown 0: 1 pages in use, 0 requests outstanding; devices held 1..=1",
    );
    let violations = run.tampered(|r| r.shutdown_reports[0].pool.pages_in_use = 0);
    fires("21", "its page back", &violations, "shutdown 0: 0 pages in use, 1 requests outstanding");
    let violations = run.tampered(|r| stats(r).requests_outstanding = 2);
    fires("21", "two outstanding", &violations, "the statistics after it: 1 pages in use, 2 requests outstanding");
    // The device returned the buffer before the shutdown: nothing may be held then.
    let violations = run.tampered(|r| {
        let stuck = request(r, DiskRef::Source(0), IoKind::Read, 8);
        let begun = mark_at(r, Mark::ShutdownBegun);
        (r.io[stuck].done, r.io[stuck].done_us) = (begun - 1, 6000);
    });
    fires(
        "21",
        "returned before the shutdown",
        &violations,
        "shutdown 0: 1 pages in use, 1 requests outstanding; devices held 0..=0",
    );
    // Rule 4 judges what the engine saw: the timed-out read failed whole, no narrowing.
    let violations = run.tampered(|r| outcome(r).read_failed = RangeSet::from_range(8..9));
    fires(
        "4",
        "a timed-out read narrowed",
        &violations,
        "job 0: read_failed {8..9}, but the failed single-block reads are [8..16]",
    );
    // The 2 ms stall, within the timeout, did not fail.
    let violations = run.tampered(|r| outcome(r).read_failed = RangeSet::from_range(8..24));
    fires("4", "a read within the timeout called failed", &violations, "job 0: read_failed {8..24}");
    // Rule 19 counts the timeout.
    let violations = run.tampered(|r| {
        let d = stats(r).devices.iter().position(|d| d.name == "source0").expect("the source");
        stats(r).devices[d].read.timeouts = 0;
    });
    fires("19", "the timeout uncounted", &violations, "statistics: source0 read:");
    // A tie: a request that completed at the very moment of its timeout failed only if the
    // outcome says so.
    let violations = run.tampered(|r| {
        let late = request(r, DiskRef::Source(0), IoKind::Read, 16);
        r.io[late].done_us = r.io[late].issued_us + 5000;
    });
    assert!(!violations.iter().any(|v| v.contains("read_failed")), "a tie the outcome calls done: {violations:#?}");
}

/// A sparse copy under WRITE_SEQ of 48 sectors whose source has a hole at 8..28, onto two
/// targets that offload write-zeroes: the hole is one sub-job (one write-zeroes per target
/// across three of the plain grid's sub-jobs), the data around it sub-jobs of 8 sectors.
fn sparse_copy() -> Accepted {
    let sparse = kcopyd_core::Sparse {
        skip_holes: true,
        zero_block_bytes: 512,
        target_zeroes: kcopyd_core::TargetZeroes::Write,
    };
    let job = JobInputs { sparse, holes: vec![(8, 20)], write_seq: true, ..copy(48, &[0, 1]) };
    let mut inputs = inputs(vec![job], 2, 2);
    inputs.targets.iter_mut().for_each(|t| t.write_zeroes = true);
    let run = Accepted::run("sparse copy", inputs);
    let zeroes: Vec<Range<u64>> =
        run.report.io.iter().filter(|r| r.kind == IoKind::WriteZeroes).map(|r| r.sectors.clone()).collect();
    assert_eq!(zeroes, [8..28, 8..28], "the hole is one write-zeroes per target");
    run
}

#[test]
fn sparse_copies_are_held_to_every_rule() {
    // A hole left with the target's stale data, called copied.
    let run = sparse_copy();
    run.report.targets[0].fill_pattern_range(10..11, target_seed(0), 0);
    let violations = check(&run.scenario, &run.report);
    fires("2", "a hole left stale", &violations, "job 0 target 0 (target0) sector 10: holds Old");

    // A hole written as data (what the source held before its hole).
    let run = sparse_copy();
    run.report.targets[1].fill_pattern_range(12..13, source_seed(0), 0);
    let violations = check(&run.scenario, &run.report);
    fires("2", "a hole written as data", &violations, "job 0 target 1 (target1) sector 12: holds Other");

    // A hole of the source filled: the source changed.
    let run = sparse_copy();
    run.report.sources[0].fill_pattern_range(9..10, source_seed(0), 0);
    let violations = check(&run.scenario, &run.report);
    fires("2", "a source hole written", &violations, "source0 changed");

    // The sub-jobs are the allocation's: on the plain grid, the hole's write-zeroes would
    // span three sub-jobs, and the zeroes would not be the source's pattern.
    let run = sparse_copy();
    let violations = run.with_scenario(|s| s.jobs[0].sparse.skip_holes = false);
    fires("12", "the hole on the plain grid", &violations, "WriteZeroes 8..28 spans sub-jobs of 8 sectors");
    let violations = run.with_scenario(|s| s.jobs[0].holes.clear());
    fires("2", "no hole in the source", &violations, "job 0 target 0 (target0) sector 8: holds Other");
    // A data write across the end of the hole into the data after it.
    let violations = run.tampered(|r| {
        let hole = request(r, DiskRef::Target(0), IoKind::WriteZeroes, 8);
        r.io[hole].sectors = 8..30;
    });
    fires("12", "across the hole's end", &violations, "WriteZeroes 8..30 spans sub-jobs");

    // A hole sub-job holds no pages: the sub-job lives it overlaps stay within a budget that
    // only the data sub-jobs fill (two in flight of 8 sectors = 2 pages)...
    let violations = run.with_scenario(|s| s.config.page_budget = 2);
    assert!(
        !violations.iter().any(|v| v.contains("pages at trace position")),
        "a hole counted as holding pages: {violations:#?}"
    );
}
