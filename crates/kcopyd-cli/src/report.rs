//! What a command reports: one JSON object (`--json`) or a few lines for people. The
//! report's data and how it is built are kcopyd-tool's `report`; this file prints it.
//!
//! Ranges are in 512-byte sectors of the device they name, `START-END` with END excluded
//! (`[start, end]` pairs in JSON), so that a failed range can be pasted into a `sim:` fault.

use std::fmt::Write as _;

use kcopyd_core::SECTOR_SIZE;

use crate::size::Bytes;
pub use kcopyd_tool::report::{Report, TargetSummary, TargetVerify, VerifyReport};

/// Ranges listed per line in the summary; `--json` lists all.
pub const RANGES_SHOWN_MAX: usize = 16;

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
fn target_line(report: &Report, target: &TargetSummary, block_bytes: u64) -> String {
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
    fn ranges_are_listed_with_a_total_and_capped() {
        assert_eq!(describe_ranges(&[[100, 108], [4000, 4001]]), "100-108, 4000-4001 (2 ranges, 4.50 KiB)");
        let many: Vec<[u64; 2]> = (0..20).map(|i| [i * 10, i * 10 + 1]).collect();
        let text = describe_ranges(&many);
        assert!(text.contains("(4 more; --json lists all)") && text.ends_with("(20 ranges, 10 KiB)"), "{text}");
    }
}
