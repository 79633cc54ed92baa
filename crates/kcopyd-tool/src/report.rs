//! What a copy, zero or verify reports, as data: the outcome per device in sectors of the
//! device it names, built from a run's outcome; the caller prints it (as JSON, which these
//! types serialize to, or for people).
//!
//! ```text
//!  run::CopyRun / ZeroRun / VerifyRun ─► Report { status, bytes, seconds, source, targets[],
//!                                                 verify (read-back), stats }
//!  RangeSet (relative to the range) ─► pairs / target_verify / range_bytes (device sectors)
//! ```
//!
//! Ranges are in 512-byte sectors of the device they name, `START-END` with END excluded
//! (`[start, end]` pairs in JSON), so that a failed range can be pasted into a `sim:` fault.

use kcopyd_core::{Comparison, RangeSet, SECTOR_SIZE, TargetDiff};
use serde::Serialize;

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
