//! What a copy, zero or verify reports, as data: the outcome per device in sectors of the
//! device it names, built from a run's outcome; the caller prints it (as JSON, which these
//! types serialize to, or for people).
//!
//! ```text
//!  run::CopyRun / ZeroRun / VerifyRun ─► Report { status, bytes, seconds, source, targets[],
//!                                                 verify (read-back), stats }
//!  RangeSet (relative to the range) ─► pairs / target_verify / range_bytes (device sectors)
//!  copy_report / zero_report / verify_command_report: the whole report of a run, its status
//!  (`ok`, `errors`, `differences`, `cancelled`) and exit code (0, 1, the caller's code for a
//!  cancelled run)
//! ```
//!
//! Ranges are in 512-byte sectors of the device they name, `START-END` with END excluded
//! (`[start, end]` pairs in JSON), so that a failed range can be pasted into a `sim:` fault.

use kcopyd_core::{Comparison, Outcome, RangeSet, SECTOR_SIZE, TargetDiff};
use serde::Serialize;

use crate::open::{Opened, PathChange};
use crate::plan::{Plan, ZeroPlan};
use crate::run::{CopyRun, FinishedJob, VerifyRun, job_ok, not_copied_in_region};

/// The whole result of a command.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `copy`, `zero` or `verify`.
    pub command: &'static str,
    /// `ok`, `errors`, `differences` or `cancelled`.
    pub status: &'static str,
    /// The process exit code.
    pub exit_code: u8,
    /// Bytes done (copied, zeroed or compared, failed blocks included).
    pub bytes: u64,
    /// Bytes in the range.
    pub bytes_total: u64,
    /// `copy`, `zero`: bytes of the range that every target now holds (copied or zeroed):
    /// `bytes_total - bytes_not_copied`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_copied: Option<u64>,
    /// `copy`, `zero`: bytes of the range that at least one target does not hold (the union
    /// of the targets' `not_copied_sectors`, in bytes of the range).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_not_copied: Option<u64>,
    /// Seconds of the job (with the final flush, without verification): wall-clock time, or
    /// the simulator's model time when every device is simulated (then `wall_seconds` is set).
    pub seconds: f64,
    /// `bytes / seconds`.
    pub throughput_bytes_per_s: f64,
    /// The job was cancelled (Ctrl-C) before it finished.
    pub cancelled: bool,
    /// The engine or a device panicked and the job stopped there (a bug; the message).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub panicked: Option<String>,
    /// `copy`: a read failed and was retried in smaller reads until every block was read:
    /// nothing is missing, and the status is not `errors` for it.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub read_errors_recovered: bool,
    /// `copy --map`: bytes the map held as done when this run started (with --retry-failed:
    /// all but the failed ranges). `bytes` and the rate count this run only; `bytes_copied`
    /// counts what every target holds now, this run's and the earlier runs' work.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_done_before: Option<u64>,
    /// The source (`copy`, `verify`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<SourceReport>,
    /// One entry per target, in the order given.
    pub targets: Vec<TargetSummary>,
    /// The read-back comparison (`copy --verify`, `verify`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify: Option<VerifyReport>,
    /// The engine's statistics for the job (`copy`, `zero`): per-device I/O counts, bytes and
    /// latency histograms, the page high-water mark, time waiting for pages and the throttle.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats: Option<kcopyd_core::ClientStats>,
    /// Set when every device was simulated and the command ran in virtual time: the wall-clock
    /// seconds of the whole command, beside the model `seconds`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wall_seconds: Option<f64>,
}

/// The source's part of a report.
#[derive(Debug, Clone, Serialize)]
pub struct SourceReport {
    /// The argument as given.
    pub device: String,
    /// Where the range starts, in bytes.
    pub offset_bytes: u64,
    /// Source sectors that could not be read.
    pub read_failed_sectors: Vec<[u64; 2]>,
}

/// One target's part of a report.
#[derive(Debug, Clone, Serialize)]
pub struct TargetSummary {
    /// The argument as given.
    pub device: String,
    /// Where the range starts, in bytes.
    pub offset_bytes: u64,
    /// `ok`, `write_errors`, `incomplete`, `flush_failed`, `removed`, `replaced` (its path
    /// no longer names the file or device written: see `path_change`), `differs`,
    /// `unreadable` or `identical` (verify).
    pub status: &'static str,
    /// Target sectors whose write failed (`copy`, `zero`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub write_failed_sectors: Option<Vec<[u64; 2]>>,
    /// Target sectors that do not hold the source's data (`copy`) or zeroes (`zero`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_copied_sectors: Option<Vec<[u64; 2]>>,
    /// The same in bytes of the range (a partial last sector counts its bytes only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_not_copied: Option<u64>,
    /// The final flush failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flush_error: Option<String>,
    /// The path was removed or replaced while the command ran (looked at when it ends): the
    /// file or device opened is no longer what the path names. `copy`, `zero`: the path holds
    /// nothing of what was written, so all of the range counts as not copied; `verify`: what
    /// was compared is not what the path names now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_change: Option<String>,
    /// The read-back comparison of this target.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify: Option<TargetVerify>,
}

/// A comparison's summary.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// Bytes of the range read back (skipped ones included).
    pub bytes: u64,
    /// Bytes of the range left out for at least one target because the copy reported them
    /// not copied (`copy --verify`; 0 for `verify`).
    pub bytes_skipped: u64,
    /// `bytes - bytes_skipped`: compared on every target.
    pub bytes_verified: u64,
    /// Seconds of the comparison (model time when every device is simulated).
    pub seconds: f64,
    /// `bytes / seconds`.
    pub throughput_bytes_per_s: f64,
    /// The unit blocks are counted in.
    pub block_bytes: u64,
    /// Every target matched and every sector could be read.
    pub identical: bool,
}

/// One target's comparison.
#[derive(Debug, Clone, Serialize)]
pub struct TargetVerify {
    /// `identical`, `differs` or `unreadable`.
    pub status: &'static str,
    /// Blocks that differ.
    pub differing_blocks: u64,
    /// The first differing sector of the target device.
    pub first_differing_sector: Option<u64>,
    /// The same place, in bytes from the start of the range.
    pub first_differing_offset_bytes: Option<u64>,
    /// Target sectors that differ (whole blocks).
    pub differing_sectors: Vec<[u64; 2]>,
    /// Target sectors that could not be read.
    pub read_failed_sectors: Vec<[u64; 2]>,
}

/// Ranges as `[start, end]` pairs.
pub fn pairs(set: &RangeSet) -> Vec<[u64; 2]> {
    set.ranges().iter().map(|r| [r.start, r.end]).collect()
}

/// `throughput = bytes / seconds`, 0 for an instant job.
pub fn throughput(bytes: u64, seconds: f64) -> f64 {
    if seconds > 0.0 { bytes as f64 / seconds } else { 0.0 }
}

/// A target's comparison in device sectors (`diff` is relative to the range).
pub fn target_verify(diff: &TargetDiff, start_sector: u64) -> TargetVerify {
    let status = if !diff.unreadable.is_empty() {
        "unreadable"
    } else if diff.differing_blocks > 0 {
        "differs"
    } else {
        "identical"
    };
    const INSIDE_THE_DEVICE: &str = "a compared region lies inside its device";
    let first = diff.first_differing_sector();
    TargetVerify {
        status,
        differing_blocks: diff.differing_blocks,
        first_differing_sector: first.map(|s| s + start_sector),
        first_differing_offset_bytes: first.map(|s| s * SECTOR_SIZE as u64),
        differing_sectors: pairs(&diff.differing.shifted(0, start_sector).expect(INSIDE_THE_DEVICE)),
        read_failed_sectors: pairs(&diff.unreadable.shifted(0, start_sector).expect(INSIDE_THE_DEVICE)),
    }
}

/// Bytes of a range of `len_bytes` in `sectors` (relative to the range): whole sectors, but
/// only the bytes of the range in a partial last sector.
///
/// Worked example: a range of 1000 bytes, sectors 0..2: 1000 bytes, not 1024.
pub fn range_bytes(sectors: &RangeSet, len_bytes: u64) -> u64 {
    let sector = SECTOR_SIZE as u64;
    sectors
        .ranges()
        .iter()
        .map(|r| r.end.saturating_mul(sector).min(len_bytes).saturating_sub(r.start.saturating_mul(sector)))
        .sum()
}

/// A comparison's summary; `skipped_bytes` were left out as not copied.
pub fn verify_report(comparison: &Comparison, bytes: u64, skipped_bytes: u64, seconds: f64) -> VerifyReport {
    VerifyReport {
        bytes,
        bytes_skipped: skipped_bytes,
        bytes_verified: bytes.saturating_sub(skipped_bytes),
        seconds,
        throughput_bytes_per_s: throughput(bytes, seconds),
        block_bytes: comparison.block_bytes,
        identical: comparison.identical(),
    }
}

/// The exit code of a report whose job (or comparison) succeeded.
pub const EXIT_OK: u8 = 0;
/// The exit code of a report with read or write errors, or differences.
pub const EXIT_FAILED: u8 = 1;

/// A read failed and was retried in smaller reads that all succeeded: nothing is missing.
fn read_errors_recovered(outcome: &Outcome) -> bool {
    outcome.read_err && outcome.read_failed.is_empty()
}

/// Each target's part of a copy or zero job's report (its status still `ok`).
fn job_targets(opened: &[Opened], run: &FinishedJob, len_bytes: u64) -> Vec<TargetSummary> {
    opened
        .iter()
        .zip(&run.outcome.targets)
        .zip(&run.flush_errors)
        .enumerate()
        .map(|(i, ((target, outcome), flush_error))| {
            let change = run.path_changes.get(i).and_then(Option::as_ref);
            TargetSummary {
                device: target.arg.text.clone(),
                offset_bytes: target.arg.offset_bytes,
                status: change.map_or("ok", PathChange::status),
                write_failed_sectors: Some(pairs(&outcome.write_failed)),
                not_copied_sectors: Some(pairs(&outcome.not_copied)),
                bytes_not_copied: Some(match change {
                    Some(_) => len_bytes,
                    None => range_bytes(&not_copied_in_region(target, outcome), len_bytes),
                }),
                flush_error: flush_error.clone(),
                path_change: change.map(|change| format!("{change}: what was written is not there")),
                verify: None,
            }
        })
        .collect()
}

/// The headline status of a finished job and its exit status.
fn job_status(
    run: &FinishedJob,
    targets: &[TargetSummary],
    verify_identical: Option<bool>,
    cancel_code: u8,
) -> (&'static str, u8) {
    if run.cancelled {
        return ("cancelled", cancel_code);
    }
    if !job_ok(&run.outcome) || targets.iter().any(|t| t.flush_error.is_some() || t.path_change.is_some()) {
        return ("errors", EXIT_FAILED);
    }
    if verify_identical == Some(false) {
        return ("differences", EXIT_FAILED);
    }
    ("ok", EXIT_OK)
}

/// A target's comparison, marked `incomplete` where a signal stopped it before it found
/// anything: what it found is reported, whatever it did not reach is not called identical.
fn partial_verify(mut verify: TargetVerify, interrupted: bool) -> TargetVerify {
    if interrupted && verify.status == "identical" {
        verify.status = "incomplete";
    }
    verify
}

/// `verify`'s per-target reports, from what the comparison found (so far, if a signal stopped
/// it).
fn verify_targets(targets: &[Opened], run: &VerifyRun, interrupted: bool) -> Vec<TargetSummary> {
    targets
        .iter()
        .enumerate()
        .map(|(index, target)| {
            let verify = run
                .comparison
                .targets
                .get(index)
                .map(|diff| partial_verify(target_verify(diff, target.start_sector()), interrupted));
            let path_change = run.path_changes.get(index).and_then(Option::as_ref);
            TargetSummary {
                device: target.arg.text.clone(),
                offset_bytes: target.arg.offset_bytes,
                status: match path_change {
                    Some(change) => change.status(),
                    None => verify.as_ref().map_or("incomplete", |v| v.status),
                },
                write_failed_sectors: None,
                not_copied_sectors: None,
                bytes_not_copied: None,
                flush_error: None,
                path_change: path_change
                    .map(|change| format!("{change}: what was compared is not what the path names now")),
                verify,
            }
        })
        .collect()
}

/// A target's status from what its report holds.
fn target_status(target: &TargetSummary) -> &'static str {
    let nonempty = |ranges: &Option<Vec<[u64; 2]>>| ranges.as_ref().is_some_and(|r| !r.is_empty());
    if target.path_change.is_some() {
        // Set with the summary (`removed` or `replaced`): nothing else about it matters.
        target.status
    } else if target.flush_error.is_some() {
        "flush_failed"
    } else if nonempty(&target.write_failed_sectors) {
        "write_errors"
    } else if nonempty(&target.not_copied_sectors) {
        "incomplete"
    } else {
        match &target.verify {
            // A comparison stopped by a signal says so in its own status; the copy is whole.
            Some(TargetVerify { status, .. }) if *status != "identical" && *status != "incomplete" => status,
            _ => "ok",
        }
    }
}

/// Bytes of the range that at least one target does not hold. A target whose final flush
/// failed holds nothing for sure, nor one whose path was removed or replaced: all of its
/// range counts.
fn not_copied_bytes(opened: &[Opened], run: &FinishedJob, len_bytes: u64) -> u64 {
    if run.path_changes.iter().any(Option::is_some) {
        return len_bytes;
    }
    let mut union = RangeSet::new();
    for ((target, outcome), flush_error) in opened.iter().zip(&run.outcome.targets).zip(&run.flush_errors) {
        if flush_error.is_some() {
            return len_bytes;
        }
        union.extend(&not_copied_in_region(target, outcome));
    }
    range_bytes(&union, len_bytes)
}

/// `copy --verify`'s summary, and each target's `verify`.
fn verify_summary(
    verify: &VerifyRun,
    targets: &mut [TargetSummary],
    opened: &[Opened],
    len_bytes: u64,
) -> VerifyReport {
    let signal = verify.cancelled;
    for ((target, opened), diff) in targets.iter_mut().zip(opened).zip(&verify.comparison.targets) {
        target.verify = Some(partial_verify(target_verify(diff, opened.start_sector()), signal));
    }
    let mut skipped = RangeSet::new();
    for set in &verify.skipped {
        skipped.extend(set);
    }
    let skipped_bytes = range_bytes(&skipped, len_bytes);
    let mut summary = verify_report(&verify.comparison, verify.bytes, skipped_bytes, verify.seconds);
    summary.identical &= !signal;
    summary
}

/// The report of a copy (`mapped`: through a map), with its status and exit code
/// (`cancel_code` if it was cancelled).
pub fn copy_report(plan: &Plan, run: &CopyRun, mapped: bool, cancel_code: u8) -> Report {
    let mut targets = job_targets(&plan.targets, &run.job, plan.len_bytes);
    let verify = run.verify.as_ref().map(|verify| verify_summary(verify, &mut targets, &plan.targets, plan.len_bytes));
    for target in &mut targets {
        target.status = target_status(target);
    }
    let identical = verify.as_ref().map(|v| v.identical);
    let (mut status_name, mut exit_code) = job_status(&run.job, &targets, identical, cancel_code);
    let interrupted = run.job.cancelled || run.verify.as_ref().is_some_and(|v| v.cancelled);
    if interrupted {
        (status_name, exit_code) = ("cancelled", cancel_code);
    }
    let job = &run.job;
    let mut report = job_report("copy", &plan.targets, job, plan.len_bytes, targets, cancel_code);
    report.status = status_name;
    report.exit_code = exit_code;
    report.cancelled |= interrupted;
    report.read_errors_recovered = read_errors_recovered(&job.outcome);
    report.bytes_done_before = mapped.then_some(job.before_bytes);
    report.source = Some(SourceReport {
        device: plan.source.arg.text.clone(),
        offset_bytes: plan.source.arg.offset_bytes,
        read_failed_sectors: pairs(&job.outcome.read_failed),
    });
    report.verify = verify;
    report
}

/// The report of a copy or zero job, with the job's own status (copy adds the rest).
fn job_report(
    command: &'static str,
    opened: &[Opened],
    run: &FinishedJob,
    len_bytes: u64,
    targets: Vec<TargetSummary>,
    cancel_code: u8,
) -> Report {
    let not_copied = not_copied_bytes(opened, run, len_bytes);
    let (status_name, exit_code) = job_status(run, &targets, None, cancel_code);
    Report {
        command,
        status: status_name,
        exit_code,
        bytes: run.done_bytes,
        bytes_total: len_bytes,
        bytes_copied: Some(len_bytes - not_copied),
        bytes_not_copied: Some(not_copied),
        seconds: run.seconds,
        throughput_bytes_per_s: throughput(run.done_bytes, run.seconds),
        cancelled: run.outcome.cancelled || run.cancelled,
        panicked: run.outcome.panicked.clone(),
        read_errors_recovered: false,
        bytes_done_before: None,
        source: None,
        targets,
        verify: None,
        stats: Some(run.stats.clone()),
        wall_seconds: None,
    }
}

/// `verify`'s headline status and exit status.
fn verify_status(verify: &VerifyRun, cancel_code: u8) -> (&'static str, u8) {
    let comparison = &verify.comparison;
    let readable =
        comparison.targets.iter().all(|t| t.unreadable.is_empty()) && comparison.source_unreadable.is_empty();
    if verify.cancelled {
        ("cancelled", cancel_code)
    } else if verify.path_changes.iter().any(Option::is_some) {
        // The comparison was of files the paths no longer name: it says nothing of them.
        ("errors", EXIT_FAILED)
    } else if comparison.identical() {
        ("ok", EXIT_OK)
    } else if readable {
        ("differences", EXIT_FAILED)
    } else {
        ("errors", EXIT_FAILED)
    }
}

/// The report of a copy that had nothing to do (a retry of failed ranges before any map
/// recorded one): `ok`, exit code 0, no bytes.
pub fn nothing_copied() -> Report {
    Report {
        command: "copy",
        status: "ok",
        exit_code: EXIT_OK,
        bytes: 0,
        bytes_total: 0,
        bytes_copied: Some(0),
        bytes_not_copied: Some(0),
        seconds: 0.0,
        throughput_bytes_per_s: 0.0,
        bytes_done_before: None,
        cancelled: false,
        read_errors_recovered: false,
        panicked: None,
        source: None,
        targets: Vec::new(),
        verify: None,
        stats: None,
        wall_seconds: None,
    }
}

/// The report of a zero job, with its status and exit code (`cancel_code` if cancelled).
pub fn zero_report(plan: &ZeroPlan, run: &FinishedJob, cancel_code: u8) -> Report {
    let mut targets = job_targets(&plan.targets, run, plan.len_bytes);
    for target in &mut targets {
        target.status = target_status(target);
    }
    job_report("zero", &plan.targets, run, plan.len_bytes, targets, cancel_code)
}

/// The report of `verify` (a comparison on its own), with its status and exit code
/// (`cancel_code` if cancelled).
pub fn verify_command_report(plan: &Plan, run: &VerifyRun, cancel_code: u8) -> Report {
    let (status_name, exit_code) = verify_status(run, cancel_code);
    let interrupted = run.cancelled;
    let source_unreadable = run
        .comparison
        .source_unreadable
        .shifted(0, plan.source.start_sector())
        .expect("the source region lies inside its device");
    let mut summary = verify_report(&run.comparison, run.bytes, 0, run.seconds);
    summary.identical &= !interrupted;
    Report {
        command: "verify",
        status: status_name,
        exit_code,
        bytes: run.bytes,
        bytes_total: plan.len_bytes,
        bytes_copied: None,
        bytes_not_copied: None,
        seconds: run.seconds,
        throughput_bytes_per_s: throughput(run.bytes, run.seconds),
        cancelled: interrupted,
        panicked: None,
        read_errors_recovered: false,
        bytes_done_before: None,
        source: Some(SourceReport {
            device: plan.source.arg.text.clone(),
            offset_bytes: plan.source.arg.offset_bytes,
            read_failed_sectors: pairs(&source_unreadable),
        }),
        targets: verify_targets(&plan.targets, run, interrupted),
        verify: Some(summary),
        stats: None,
        wall_seconds: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_bytes_count_only_the_range() {
        assert_eq!(range_bytes(&RangeSet::from_range(0..2), 1000), 1000);
        assert_eq!(range_bytes(&RangeSet::from_range(1..2), 1000), 488);
        assert_eq!(range_bytes(&RangeSet::from_range(0..8), 1 << 20), 4096);
        assert_eq!(range_bytes(&RangeSet::new(), 1 << 20), 0);
    }

    #[test]
    fn throughput_of_an_instant_job_is_zero() {
        assert_eq!(throughput(1000, 0.0), 0.0);
        assert_eq!(throughput(1000, 2.0), 500.0);
    }
}
