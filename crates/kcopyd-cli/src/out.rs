//! Standard output and standard error that never panic.
//!
//! ```text
//!  printing commands (demo, sim run/sweep)    print(text) ── Err(StdoutClosed) ──► exit 141, quietly
//!  copy / zero / verify reports               report(text) ─ stdout closed ──► stderr instead
//!  messages, warnings, progress notes         note(line) ─── stderr closed ──► dropped
//!  error lines                                error(line) ── stderr closed ──► stdout instead
//! ```
//!
//! Every write is flushed at once: a write that fails is seen where it happens, not at exit
//! (where the standard library would drop the error). The standard library ignores SIGPIPE,
//! so a reader that went away shows up as `BrokenPipe`.

use std::io::{self, Write};

use crate::error::StdoutError;

fn write_to(mut stream: impl Write, text: &str) -> io::Result<()> {
    stream.write_all(text.as_bytes())?;
    stream.flush()
}

/// Writes `text` to standard output.
///
/// # Errors
/// The pipe was closed by its reader, or another write error.
pub fn print(text: &str) -> Result<(), StdoutError> {
    write_to(io::stdout().lock(), text).map_err(|error| match error.kind() {
        io::ErrorKind::BrokenPipe => StdoutError::Closed,
        _ => StdoutError::Failed(error),
    })
}

/// Writes a line of a message to standard error; a closed stderr drops it.
pub fn note(line: &str) {
    let _ = write_to(io::stderr().lock(), &format!("{line}\n"));
}

/// Writes an error line to standard error, or to standard output where stderr is gone, so
/// that the reason for a failure is not lost.
pub fn error(line: &str) {
    let line = format!("{line}\n");
    if write_to(io::stderr().lock(), &line).is_err() {
        let _ = write_to(io::stdout().lock(), &line);
    }
}

/// Writes a command's final report to standard output, or to standard error where stdout is
/// gone. Returns whether it was written anywhere.
pub fn report(text: &str) -> bool {
    print(text).is_ok() || write_to(io::stderr().lock(), text).is_ok()
}

/// Writes a text to standard error (a table for people beside a model on stdout); a closed
/// stderr drops it.
pub fn note_text(text: &str) {
    let _ = write_to(io::stderr().lock(), text);
}
