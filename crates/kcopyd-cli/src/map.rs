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
use std::path::Path;

use kcopyd_core::{RangeSet, SECTOR_SIZE};

use crate::error::{CliError, Status};
use crate::progress::Interrupts;
use kcopyd_tool::map::{MapFileError, MapHeader, MapLines, MapParser, MapState, describe};

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
        line(&mut stdout, "done", &state.done.to_range_set())?;
        line(&mut stdout, "read failed", &state.read_failed.to_range_set())?;
        line(&mut stdout, "write failed", &state.write_failed_any())?;
        line(&mut stdout, "remaining", &state.remaining(header.len_sectors()))?;
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
fn line(out: &mut impl Write, label: &str, set: &RangeSet) -> io::Result<()> {
    let sector = SECTOR_SIZE as u64;
    let bytes = set.len_sectors() * sector;
    let count = set.ranges().len();
    let mut text = format!("  {label:<13} {bytes:>15} bytes in {count:>6} ranges ");
    for range in set.ranges().iter().take(RANGES_SHOWN) {
        text += &format!(" {}..{}", range.start * sector, range.end * sector);
    }
    if count > RANGES_SHOWN {
        text += &format!(" and {} more", count - RANGES_SHOWN);
    }
    writeln!(out, "{}", text.trim_end())
}

impl From<MapFileError> for CliError {
    fn from(error: MapFileError) -> CliError {
        match error {
            MapFileError::Device { role, text, problem } => CliError::argument(role.name(), text, problem.to_string()),
            MapFileError::Refused { path, problem } => {
                CliError::argument("--map", path.display().to_string(), problem.to_string())
            }
            MapFileError::BatchTooSmall { batch_bytes, block_bytes } => CliError::argument(
                "--map-batch",
                batch_bytes.to_string(),
                format!("smaller than one {block_bytes}-byte logical block"),
            ),
            MapFileError::Append { path, source } => {
                CliError::Io { operation: "appending to the map", path: path.display().to_string(), source }
            }
        }
    }
}
