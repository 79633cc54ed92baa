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

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use crate::error::CliError;

/// Why standard output could not be written.
#[derive(Debug)]
pub enum StdoutError {
    /// Its reader closed the pipe (`| head -1`): the command stops quietly, exit 141.
    Closed,
    /// Any other failure (a full disk behind a redirection).
    Failed(io::Error),
}

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

/// Checks, before the work starts, that a file the command writes at its end (`--svg`,
/// `--out`) can be written: an existing one is opened for writing (and left as it is), a
/// missing one is created and removed again. A directory, a block device or a missing folder
/// is refused, so that a long run is not thrown away at its end.
///
/// # Errors
/// The path cannot be written, naming `what` (the option) and the reason.
pub fn check_output_file(path: &Path, what: &str) -> Result<(), CliError> {
    let text = path.display().to_string();
    let refuse = |problem: String| CliError::argument(what, &text, problem);
    match fs::metadata(path) {
        Ok(meta) if meta.is_dir() => return Err(refuse("is a directory".into())),
        Ok(meta) if meta.file_type().is_block_device() => {
            return Err(refuse("is a block device: refusing to write a file over it".into()));
        }
        Ok(_) => {
            return fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map(drop)
                .map_err(|error| refuse(format!("cannot be written: {error}")));
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(refuse(format!("cannot be looked at: {error}"))),
    }
    if text.ends_with('/') {
        return Err(refuse("names a directory (it ends in '/'), not a file".into()));
    }
    let folder = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !folder.is_dir() {
        return Err(refuse(format!("its folder '{}' does not exist", folder.display())));
    }
    // Registered while it exists: a signal now does not leave it behind.
    let guard = crate::progress::CreatedGuard::creating(path);
    let created = fs::OpenOptions::new().write(true).create_new(true).open(path);
    if created.is_ok() {
        let _ = fs::remove_file(path);
    }
    drop(guard);
    crate::progress::forget_created(&[path.to_path_buf()]);
    created.map(drop).map_err(|error| refuse(format!("cannot be created: {error}")))
}
