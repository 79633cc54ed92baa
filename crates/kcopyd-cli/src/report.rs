//! What a command reports: one JSON object (`--json`) or a few lines for people. The
//! report's data and how it is built are kcopyd-tool's `report`, its lines for people
//! kcopyd-tool's `summary`; this file names where all ranges are listed.
//!
//! Ranges are in 512-byte sectors of the device they name, `START-END` with END excluded
//! (`[start, end]` pairs in JSON), so that a failed range can be pasted into a `sim:` fault.

pub use kcopyd_tool::report::Report;

/// Where a summary that lists only some ranges sends the reader for all of them.
const ALL_RANGES: &str = "--json lists all";

/// `100-108, 4000-4001 (2 ranges, 4.50 KiB)`, at most
/// [`kcopyd_tool::summary::RANGES_SHOWN_MAX`] ranges.
pub fn describe_ranges(ranges: &[[u64; 2]]) -> String {
    kcopyd_tool::summary::describe_ranges(ranges, ALL_RANGES)
}

/// The summary for people: a headline, the source's failures, one line per target.
pub fn human(report: &Report) -> String {
    kcopyd_tool::summary::human(report, ALL_RANGES)
}
