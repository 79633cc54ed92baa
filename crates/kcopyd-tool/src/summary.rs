//! The report for people: a headline (how much was done, in how long, how it ended), the
//! source's failures and one line per target, as the `kcopyd` command prints it. The data is
//! [`crate::report`]'s.
//!
//! Ranges are in 512-byte sectors of the device they name, `START-END` with END excluded, so
//! that a failed range can be pasted into a `sim:` fault.

use std::fmt::Write as _;

use kcopyd_core::SECTOR_SIZE;
use kcopyd_sim::units::Bytes;

use crate::report::{Report, TargetSummary, TargetVerify, VerifyReport};

/// Ranges listed per line in the summary; the JSON report lists all.
pub const RANGES_SHOWN_MAX: usize = 16;

/// `100-108, 4000-4001 (2 ranges, 4.50 KiB)`, at most [`RANGES_SHOWN_MAX`] ranges; past
/// them, how many more and `hint` (where to find them all).
pub fn describe_ranges(ranges: &[[u64; 2]], hint: &str) -> String {
    let mut out = String::new();
    for (i, [start, end]) in ranges.iter().take(RANGES_SHOWN_MAX).enumerate() {
        let _ = write!(out, "{}{start}-{end}", if i == 0 { "" } else { ", " });
    }
    if ranges.len() > RANGES_SHOWN_MAX {
        let _ = write!(out, ", ... ({} more; {hint})", ranges.len() - RANGES_SHOWN_MAX);
    }
    let sectors: u64 = ranges.iter().map(|[start, end]| end - start).sum();
    let plural = if ranges.len() == 1 { "" } else { "s" };
    let _ = write!(out, " ({} range{plural}, {})", ranges.len(), Bytes(sectors * SECTOR_SIZE as u64));
    out
}

/// `identical`, or how a target differs: the block count, the first differing sector and the
/// ranges, and what could not be read.
fn verify_details(verify: &TargetVerify, block_bytes: u64, hint: &str) -> String {
    let mut out = String::from(verify.status);
    if let (Some(sector), Some(offset)) = (verify.first_differing_sector, verify.first_differing_offset_bytes) {
        let plural = if verify.differing_blocks == 1 { "" } else { "s" };
        let _ = write!(
            out,
            ": {} block{plural} of {block_bytes} bytes differ{}, \
             the first at sector {sector} ({offset} bytes into the range): {}",
            verify.differing_blocks,
            if verify.differing_blocks == 1 { "s" } else { "" },
            describe_ranges(&verify.differing_sectors, hint)
        );
    }
    if !verify.read_failed_sectors.is_empty() {
        let _ = write!(out, "; unreadable at {}", describe_ranges(&verify.read_failed_sectors, hint));
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

/// The summary for people: a headline, the source's failures, one line per target. Lists of
/// more than [`RANGES_SHOWN_MAX`] ranges end with `hint`, where to find them all (the
/// `kcopyd` command says `--json lists all`).
pub fn human(report: &Report, hint: &str) -> String {
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
        let _ = writeln!(
            out,
            "source {}: read errors at {}",
            source.device,
            describe_ranges(&source.read_failed_sectors, hint)
        );
    }
    let block_bytes = report.verify.as_ref().map_or(SECTOR_SIZE as u64, |v| v.block_bytes);
    for target in &report.targets {
        let _ = writeln!(out, "target {}: {}", target.device, target_line(report, target, block_bytes, hint));
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
fn target_line(report: &Report, target: &TargetSummary, block_bytes: u64, hint: &str) -> String {
    if report.command == "verify" {
        let details = match &target.verify {
            Some(verify) => verify_details(verify, block_bytes, hint),
            None => target.status.replace('_', " "),
        };
        return match &target.path_change {
            Some(change) => format!("{}: {change}; {details}", target.status),
            None => details,
        };
    }
    let mut out = target.status.replace('_', " ");
    if let Some(change) = &target.path_change {
        // The status says "removed" or "replaced": what that means, once.
        let _ = write!(out, ": {change}");
    }
    if let Some(error) = &target.flush_error {
        // The status says "flush failed" (it comes first): the reason, once.
        let _ = write!(out, ": {error}");
    }
    if let Some(write_failed) = target.write_failed_sectors.as_ref().filter(|r| !r.is_empty()) {
        let _ = write!(out, "; write failed at {}", describe_ranges(write_failed, hint));
    }
    if let Some(not_copied) = target.not_copied_sectors.as_ref().filter(|r| !r.is_empty()) {
        let what = if report.command == "zero" { "not zeroed" } else { "not copied" };
        let _ = write!(out, "; {what}: {}", describe_ranges(not_copied, hint));
    }
    if let Some(verify) = &target.verify {
        let _ = write!(out, "; verify: {}", verify_details(verify, block_bytes, hint));
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
        let hint = "--json lists all";
        assert_eq!(describe_ranges(&[[100, 108], [4000, 4001]], hint), "100-108, 4000-4001 (2 ranges, 4.50 KiB)");
        let many: Vec<[u64; 2]> = (0..20).map(|i| [i * 10, i * 10 + 1]).collect();
        let text = describe_ranges(&many, hint);
        assert!(text.contains("(4 more; --json lists all)") && text.ends_with("(20 ranges, 10 KiB)"), "{text}");
    }

    #[test]
    fn the_summary_has_a_headline_and_a_line_per_target_naming_its_failures() {
        let mut report = crate::report::nothing_copied();
        assert_eq!(human(&report, "see all"), "copied 0 B in 0.00 s (0 B/s)\n");
        report.status = "write_errors";
        (report.bytes, report.bytes_total, report.bytes_copied, report.bytes_not_copied) =
            (3 << 20, 4 << 20, Some(3 << 20), Some(1 << 20));
        let failed: Vec<[u64; 2]> = (0..20).map(|i| [i * 100, i * 100 + 1]).collect();
        report.targets.push(TargetSummary {
            device: "b.img".into(),
            offset_bytes: 0,
            status: "write_errors",
            write_failed_sectors: Some(failed),
            not_copied_sectors: None,
            bytes_not_copied: Some(1 << 20),
            flush_error: None,
            path_change: None,
            verify: None,
        });
        let text = human(&report, "see all");
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].starts_with("copied 3 MiB of 4 MiB in 0.00 s") && lines[0].ends_with("1 MiB not copied"),
            "{text}"
        );
        assert!(lines[1].starts_with("(ranges are 512-byte sectors"), "{text}");
        assert!(lines[2].starts_with("target b.img: write errors; write failed at 0-1, 100-101"), "{text}");
        assert!(lines[2].ends_with("(4 more; see all) (20 ranges, 10 KiB)"), "{text}");
    }
}
