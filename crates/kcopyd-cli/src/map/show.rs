//! `kcopyd map show FILE`: the map's copy, then done / failed / remaining by byte ranges.
//!
//! ```text
//!  FILE ─► line by line (each at most LINE_BYTES_MAX) ─► B-tree sets ─► five lines on stdout
//!           every SIGNAL_CHECK_LINES lines: yield, look for SIGINT/SIGTERM (exit 130/143)
//!  stdout closed by its reader ─► stop quietly, exit 141
//! ```

use std::fs::File;
use std::io::{self, BufReader, Write};
use std::ops::Range;
use std::path::Path;

use kcopyd_core::SECTOR_SIZE;

use super::{Intervals, MapError, MapLines, MapParser, complement, describe};
use crate::error::{CliError, Status};
use crate::progress::Interrupts;

/// Lines read between two looks for a signal.
pub const SIGNAL_CHECK_LINES: u64 = 64 * 1024;
/// The exit code when standard output was closed by its reader (128 + SIGPIPE), as a shell
/// reports a program killed by SIGPIPE.
pub const EXIT_STDOUT_CLOSED: u8 = 141;
/// Ranges listed per line.
pub const RANGES_SHOWN: usize = 8;

/// `kcopyd map show FILE`, printed on stdout as it goes.
///
/// # Errors
/// The file cannot be read or is not a map.
pub async fn show(path: &Path, interrupts: &mut Interrupts) -> Result<Status, CliError> {
    let error = |problem: String| CliError::argument("FILE", path.display().to_string(), problem);
    let file = File::open(path).map_err(|e| error(format!("cannot read it ({e})")))?;
    let mut lines = MapLines::new(BufReader::new(file));
    let mut parser = MapParser::default();
    loop {
        let next = lines.next_line().map_err(|e| error(e.to_string()))?;
        let Some((number, line)) = next else { break };
        parser.feed(number, line).map_err(|e| error(e.to_string()))?;
        if number % SIGNAL_CHECK_LINES == 0 {
            // Let the runtime take in a signal, then look for one.
            tokio::task::yield_now().await;
            if let Some(code) = interrupts.try_recv() {
                return Ok(Status::Interrupted(code));
            }
        }
    }
    let (header, state) = parser.finish().map_err(|e: MapError| error(e.to_string()))?;
    let mut stdout = io::stdout().lock();
    let written = (|| -> io::Result<()> {
        writeln!(stdout, "map {}: {}", path.display(), describe(&header))?;
        line(&mut stdout, "done", &state.done)?;
        line(&mut stdout, "read failed", &state.read_failed)?;
        line(&mut stdout, "write failed", &state.write_failed_any())?;
        let mut covered = state.failed();
        covered.extend(&state.done);
        let remaining: Intervals = {
            let mut set = Intervals::default();
            complement(&covered, header.len_sectors()).for_each(|r| set.insert(r));
            set
        };
        line(&mut stdout, "remaining", &remaining)?;
        stdout.flush()
    })();
    match written {
        Ok(()) => Ok(Status::Success),
        // The reader went away (`| head -1`): nothing more to say, to anyone.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(Status::Interrupted(EXIT_STDOUT_CLOSED)),
        Err(e) => Err(CliError::Io { operation: "writing the map's summary to", path: "stdout".into(), source: e }),
    }
}

/// One line: bytes, ranges and the first [`RANGES_SHOWN`] ranges of `set` (in bytes).
fn line(out: &mut impl Write, label: &str, set: &Intervals) -> io::Result<()> {
    let sector = SECTOR_SIZE as u64;
    let bytes = set.len_sectors() * sector;
    let mut text = format!("  {label:<13} {bytes:>15} bytes in {:>6} ranges ", set.count());
    let shown: Vec<Range<u64>> = set.iter().take(RANGES_SHOWN).collect();
    for range in &shown {
        text += &format!(" {}..{}", range.start * sector, range.end * sector);
    }
    if set.count() > RANGES_SHOWN {
        text += &format!(" and {} more", set.count() - RANGES_SHOWN);
    }
    writeln!(out, "{}", text.trim_end())
}
