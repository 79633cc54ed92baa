//! `kcopyd map show FILE`: the map's copy, then done / failed / remaining by byte ranges.
//!
//! ```text
//!  reader thread: FILE ─► line by line (each at most LINE_BYTES_MAX) ─► B-tree sets ─┐
//!  command: waits for the sets, or for SIGINT/SIGTERM (exit 130/143 at once) ◄───────┘
//!           ─► five lines on stdout
//!  stdout closed by its reader ─► stop quietly, exit 141
//! ```

use std::fs::File;
use std::io::{self, BufReader, Write};
use std::ops::Range;
use std::path::Path;

use kcopyd_core::SECTOR_SIZE;

use super::{Intervals, MapHeader, MapLines, MapParser, MapState, complement, describe};
use crate::error::{CliError, Status};
use crate::progress::Interrupts;

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
    // Read on a thread of its own, so that a signal ends the command at once even while a
    // read waits (a FIFO, a hung network filesystem): the process exits without it.
    let (sender, receiver) = tokio::sync::oneshot::channel();
    let owned = path.to_path_buf();
    std::thread::Builder::new()
        .name("map-show".into())
        .spawn(move || {
            let _ = sender.send(read_map(&owned));
        })
        .map_err(|source| CliError::Start { what: "the map reader", source })?;
    let (header, state) = tokio::select! {
        read = receiver => read.expect("the reader sends before it ends").map_err(error)?,
        code = interrupts.recv() => return Ok(Status::Interrupted(code)),
    };
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

/// Reads the map at `path`, line by line.
fn read_map(path: &Path) -> Result<(MapHeader, MapState), String> {
    let file = File::open(path).map_err(|e| format!("cannot read it ({e})"))?;
    let mut lines = MapLines::new(BufReader::new(file));
    let mut parser = MapParser::default();
    while let Some((number, line)) = lines.next_line().map_err(|e| e.to_string())? {
        parser.feed(number, line).map_err(|e| e.to_string())?;
    }
    parser.finish().map_err(|e| e.to_string())
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
