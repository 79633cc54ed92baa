//! What a command reports: one JSON object (`--json`) or a few lines for people.
//!
//! Ranges are in 512-byte sectors of the device they name, `START-END` with END excluded
//! (`[start, end]` pairs in JSON), so that a failed range can be pasted into a `sim:` fault.

use std::fmt::Write as _;

use kcopyd_core::{RangeSet, SECTOR_SIZE};
use serde::Serialize;

use crate::size::Bytes;
use kcopyd_core::{Comparison, TargetDiff};

/// Ranges listed per line in the summary; `--json` lists all.
pub const RANGES_SHOWN_MAX: usize = 16;

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
    pub targets: Vec<TargetReport>,
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
pub struct TargetReport {
    /// The argument as given.
    pub device: String,
    /// Where the range starts, in bytes.
    pub offset_bytes: u64,
    /// `ok`, `write_errors`, `incomplete`, `flush_failed`, `differs`, `unreadable` or
    /// `identical` (verify).
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

/// `100-108, 4000-4001 (2 ranges, 4.50 KiB)`, at most [`RANGES_SHOWN_MAX`] ranges.
pub fn describe_ranges(ranges: &[[u64; 2]]) -> String {
    let mut out = String::new();
    for (i, [start, end]) in ranges.iter().take(RANGES_SHOWN_MAX).enumerate() {
        let _ = write!(out, "{}{start}-{end}", if i == 0 { "" } else { ", " });
    }
    if ranges.len() > RANGES_SHOWN_MAX {
        let _ = write!(out, ", ... ({} more; --json lists all)", ranges.len() - RANGES_SHOWN_MAX);
    }
    let sectors: u64 = ranges.iter().map(|[start, end]| end - start).sum();
    let plural = if ranges.len() == 1 { "" } else { "s" };
    let _ = write!(out, " ({} range{plural}, {})", ranges.len(), Bytes(sectors * SECTOR_SIZE as u64));
    out
}

/// `identical`, or how a target differs: the block count, the first differing sector and the
/// ranges, and what could not be read.
fn verify_details(verify: &TargetVerify, block_bytes: u64) -> String {
    let mut out = String::from(verify.status);
    if let (Some(sector), Some(offset)) = (verify.first_differing_sector, verify.first_differing_offset_bytes) {
        let plural = if verify.differing_blocks == 1 { "" } else { "s" };
        let _ = write!(
            out,
            ": {} block{plural} of {block_bytes} bytes differ{}, \
             the first at sector {sector} ({offset} bytes into the range): {}",
            verify.differing_blocks,
            if verify.differing_blocks == 1 { "s" } else { "" },
            describe_ranges(&verify.differing_sectors)
        );
    }
    if !verify.read_failed_sectors.is_empty() {
        let _ = write!(out, "; unreadable at {}", describe_ranges(&verify.read_failed_sectors));
    }
    out
}

fn verb(command: &str) -> &'static str {
    match command {
        "copy" => "copied",
        "zero" => "zeroed",
        _ => "compared",
    }
}

/// The headline: how much was done, in how long, and how it ended.
fn headline(out: &mut String, report: &Report) {
    let rate = Bytes(report.throughput_bytes_per_s as u64);
    let done = report.bytes_copied.unwrap_or(report.bytes);
    // After a map resume, the totals hold earlier runs' work: the rate is this run's, and says so.
    let rate = match report.bytes_done_before {
        Some(_) => format!("{} by this run, {rate}/s", Bytes(report.bytes)),
        None => format!("{rate}/s"),
    };
    if report.cancelled {
        let percent = if report.bytes_total == 0 { 100.0 } else { done as f64 * 100.0 / report.bytes_total as f64 };
        let _ = writeln!(
            out,
            "cancelled: {} {} of {} ({percent:.1}%) in {:.2} s ({rate})",
            verb(report.command),
            Bytes(done),
            Bytes(report.bytes_total),
            report.seconds
        );
    } else if let Some(not_copied) = report.bytes_not_copied.filter(|&bytes| bytes > 0) {
        let _ = writeln!(
            out,
            "{} {} of {} in {:.2} s ({rate}), with errors: {} {}",
            verb(report.command),
            Bytes(done),
            Bytes(report.bytes_total),
            report.seconds,
            Bytes(not_copied),
            if report.command == "zero" { "not zeroed" } else { "not copied" }
        );
    } else {
        let _ = writeln!(
            out,
            "{} {} in {:.2} s ({rate}){}",
            verb(report.command),
            Bytes(report.bytes_total),
            report.seconds,
            match report.status {
                "ok" => "",
                "differences" => ": differences found",
                _ => ", with errors",
            }
        );
    }
    if let Some(before) = report.bytes_done_before.filter(|&before| before > 0) {
        let _ = writeln!(out, "(the map held {} as done before this run)", Bytes(before));
    }
}

/// The summary for people: a headline, the source's failures, one line per target.
pub fn human(report: &Report) -> String {
    let mut out = String::new();
    headline(&mut out, report);
    if let Some(wall_seconds) = report.wall_seconds {
        let _ = writeln!(out, "(simulated: {:.3} s of model time, {wall_seconds:.2} s wall)", report.seconds);
    }
    if report.read_errors_recovered {
        let _ =
            writeln!(out, "read errors recovered: failed reads were retried in smaller reads and every block was read");
    }
    if let Some(message) = &report.panicked {
        let _ = writeln!(out, "internal error: the job stopped after a panic: {message}");
    }
    let any_ranges = report.source.as_ref().is_some_and(|s| !s.read_failed_sectors.is_empty())
        || report.targets.iter().any(|t| t.status != "ok" && t.status != "identical");
    if any_ranges {
        let _ = writeln!(out, "(ranges are 512-byte sectors of each device, START-END with END excluded)");
    }
    if let Some(source) = report.source.as_ref().filter(|source| !source.read_failed_sectors.is_empty()) {
        let _ =
            writeln!(out, "source {}: read errors at {}", source.device, describe_ranges(&source.read_failed_sectors));
    }
    let block_bytes = report.verify.as_ref().map_or(SECTOR_SIZE as u64, |v| v.block_bytes);
    for target in &report.targets {
        let _ = writeln!(out, "target {}: {}", target.device, target_line(report, target, block_bytes));
    }
    if let Some(verify) = report.verify.as_ref().filter(|_| report.command != "verify") {
        verified_line(&mut out, report, verify);
    }
    if report.cancelled {
        for target in &report.targets {
            if let Some(first) = target.not_copied_sectors.as_ref().and_then(|r| r.first()) {
                let _ = writeln!(out, "target {}: first sector not done: {}", target.device, first[0]);
            }
        }
    }
    out
}

/// What the summary says of `target`, after its name.
fn target_line(report: &Report, target: &TargetReport, block_bytes: u64) -> String {
    if report.command == "verify" {
        return match &target.verify {
            Some(verify) => verify_details(verify, block_bytes),
            None => target.status.replace('_', " "),
        };
    }
    let mut out = target.status.replace('_', " ");
    if let Some(error) = &target.flush_error {
        // The status says "flush failed" (it comes first): the reason, once.
        let _ = write!(out, ": {error}");
    }
    if let Some(write_failed) = target.write_failed_sectors.as_ref().filter(|r| !r.is_empty()) {
        let _ = write!(out, "; write failed at {}", describe_ranges(write_failed));
    }
    if let Some(not_copied) = target.not_copied_sectors.as_ref().filter(|r| !r.is_empty()) {
        let what = if report.command == "zero" { "not zeroed" } else { "not copied" };
        let _ = write!(out, "; {what}: {}", describe_ranges(not_copied));
    }
    if let Some(verify) = &target.verify {
        let _ = write!(out, "; verify: {}", verify_details(verify, block_bytes));
    }
    out
}

/// `copy --verify`'s line: what was read back, and what it found.
fn verified_line(out: &mut String, report: &Report, verify: &VerifyReport) {
    let skipped = if verify.bytes_skipped > 0 {
        format!(" ({} skipped: not copied)", Bytes(verify.bytes_skipped))
    } else {
        String::new()
    };
    let found_differences = || {
        report
            .targets
            .iter()
            .any(|t| t.verify.as_ref().is_some_and(|v| v.status != "incomplete" && v.status != "identical"))
    };
    let _ = writeln!(
        out,
        "verified {}{skipped} in {:.2} s ({}/s): {}",
        Bytes(verify.bytes_verified),
        verify.seconds,
        Bytes(verify.throughput_bytes_per_s as u64),
        if verify.identical {
            "identical"
        } else if !report.cancelled || found_differences() {
            "differences found"
        } else {
            "stopped before the end, no differences found so far"
        }
    );
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
    fn ranges_are_listed_with_a_total_and_capped() {
        assert_eq!(describe_ranges(&[[100, 108], [4000, 4001]]), "100-108, 4000-4001 (2 ranges, 4.50 KiB)");
        let many: Vec<[u64; 2]> = (0..20).map(|i| [i * 10, i * 10 + 1]).collect();
        let text = describe_ranges(&many);
        assert!(text.contains("(4 more; --json lists all)") && text.ends_with("(20 ranges, 10 KiB)"), "{text}");
    }
}
