//! Errors of the command, each one line naming the argument at fault, and the exit codes.

use std::io;
use std::process::ExitCode;

use kcopyd_core::{ConfigError, SubmitError};
use kcopyd_os::OpenError;
use kcopyd_sim::explore::ScenarioError;
use thiserror::Error;

/// The command's exit statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Everything was copied, zeroed or found identical.
    Success,
    /// The job ran but had read or write errors, or verification found differences.
    Failed,
    /// Bad usage or a validation failure: nothing was written.
    Usage,
    /// Stopped by a signal (130 for SIGINT, as shells report it).
    Interrupted(u8),
    /// Standard output was closed by its reader (`| head -1`): 141, as a shell reports a
    /// command killed by SIGPIPE.
    StdoutClosed,
}

/// The exit code when standard output was closed by its reader (128 + SIGPIPE).
pub const EXIT_STDOUT_CLOSED: u8 = 141;

impl Status {
    /// The process exit code.
    pub fn code(self) -> u8 {
        match self {
            Status::Success => 0,
            Status::Failed => 1,
            Status::Usage => 2,
            Status::Interrupted(code) => code,
            Status::StdoutClosed => EXIT_STDOUT_CLOSED,
        }
    }
}

impl From<Status> for ExitCode {
    fn from(status: Status) -> ExitCode {
        ExitCode::from(status.code())
    }
}

/// Why the command stopped before (or instead of) running a job.
#[derive(Debug, Error)]
pub enum CliError {
    /// An argument is malformed, out of range or inconsistent with a device.
    #[error("{what} '{text}': {problem}")]
    Argument {
        /// Which argument (`SOURCE`, `TARGET`, `--length`, ...).
        what: String,
        /// The argument as given.
        text: String,
        /// What is wrong.
        problem: String,
    },
    /// Too many or too few arguments of a kind.
    #[error("{what}: {problem}")]
    Arguments {
        /// Which arguments.
        what: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// A file or block device could not be opened.
    #[error("{what} '{text}': {reason}")]
    Open {
        /// `SOURCE` or `TARGET`.
        what: &'static str,
        /// The argument as given.
        text: String,
        /// What went wrong, in a few words.
        reason: String,
        /// The device layer's error.
        #[source]
        source: OpenError,
    },
    /// The engine could not start with the options given.
    #[error("{option}: {source}")]
    Config {
        /// The option at fault (or `--memory` for the arena).
        option: &'static str,
        /// The engine's error.
        #[source]
        source: ConfigError,
    },
    /// The engine refused the job at submission; nothing was read or written.
    #[error("the job was refused: {source}")]
    Submit {
        /// The engine's error.
        #[source]
        source: SubmitError,
    },
    /// Reading or writing a device or file failed while measuring (`kcopyd sim`), or
    /// appending to a copy map (`copy --map`).
    #[error("{operation} '{path}': {source}")]
    Io {
        /// What was being done.
        operation: &'static str,
        /// The device or file.
        path: String,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// A scenario file that cannot be read, does not hold together, or whose run failed.
    #[error("scenario '{path}': {source}")]
    Scenario {
        /// The file.
        path: String,
        /// What is wrong.
        #[source]
        source: ScenarioError,
    },
    /// A scenario file that cannot be read.
    #[error("{what} '{path}': {source}")]
    File {
        /// What the file is for.
        what: &'static str,
        /// The file.
        path: String,
        /// The system's reason.
        #[source]
        source: io::Error,
    },
    /// A plot that cannot be drawn.
    #[error("plot '{path}': {problem}")]
    Plot {
        /// The SVG file.
        path: String,
        /// What went wrong.
        problem: String,
    },
    /// A signal came while devices were being opened (an NBD server still connecting):
    /// nothing was written.
    #[error("interrupted while {what}: nothing was written")]
    Interrupted {
        /// What was going on.
        what: &'static str,
        /// The signal's exit code (130 SIGINT, 143 SIGTERM).
        code: u8,
    },
    /// The async runtime or the signal handler could not start.
    #[error("starting {what}: {source}")]
    Start {
        /// What could not start.
        what: &'static str,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// Standard output was closed by its reader: the command stops quietly.
    #[error("standard output was closed")]
    StdoutClosed,
    /// Standard output could not be written for another reason.
    #[error("writing to standard output: {source}")]
    Stdout {
        /// What the system said.
        #[source]
        source: io::Error,
    },
}

/// Why standard output could not be written.
#[derive(Debug)]
pub enum StdoutError {
    /// Its reader closed the pipe (`| head -1`): the command stops quietly, exit 141.
    Closed,
    /// Any other failure (a full disk behind a redirection).
    Failed(io::Error),
}

impl From<StdoutError> for CliError {
    fn from(error: StdoutError) -> CliError {
        match error {
            StdoutError::Closed => CliError::StdoutClosed,
            StdoutError::Failed(source) => CliError::Stdout { source },
        }
    }
}

impl CliError {
    /// The exit status the error leads to.
    pub fn status(&self) -> Status {
        match self {
            CliError::Argument { .. }
            | CliError::Arguments { .. }
            | CliError::Open { .. }
            | CliError::Config { .. }
            | CliError::Submit { .. }
            | CliError::Scenario { .. }
            | CliError::File { .. } => Status::Usage,
            CliError::Interrupted { code, .. } => Status::Interrupted(*code),
            CliError::Start { .. } | CliError::Io { .. } | CliError::Plot { .. } | CliError::Stdout { .. } => {
                Status::Failed
            }
            CliError::StdoutClosed => Status::StdoutClosed,
        }
    }

    /// An argument error.
    pub fn argument(what: impl Into<String>, text: impl Into<String>, problem: impl Into<String>) -> CliError {
        CliError::Argument { what: what.into(), text: text.into(), problem: problem.into() }
    }
}

/// What an open error means, in a few words, without the path (the message names the
/// argument already) and with the command's own way out where there is one: `buffered` names
/// the option that goes through the page cache, where the command has one.
pub fn open_reason(error: &OpenError, buffered: Option<&str>) -> String {
    let with_cause = |what: &str, cause: &io::Error| format!("{what} ({cause})");
    match error {
        OpenError::NotFound { .. } => "no such file or device".into(),
        OpenError::PermissionDenied { source, .. } => with_cause("permission denied", source),
        OpenError::ReadOnly { .. } => "read-only filesystem or device: cannot write to it".into(),
        OpenError::Busy { .. } => {
            "device is busy (mounted or opened exclusively elsewhere): refusing to write to it".into()
        }
        OpenError::DirectIoUnsupported { filesystem, .. } => match buffered {
            Some(option) => format!("the {filesystem} filesystem does not support direct I/O (O_DIRECT); use {option}"),
            None => format!(
                "the {filesystem} filesystem does not support direct I/O (O_DIRECT), which this command measures: \
                 use a file on another filesystem"
            ),
        },
        OpenError::NotABlockDeviceOrFile { kind, .. } => format!("is a {kind}, not a regular file or block device"),
        other => {
            // The device layer's message starts with the path: keep what follows it.
            let message = other.to_string();
            let path = other.path().display().to_string();
            let what = message.strip_prefix(&path).map_or(message.as_str(), |rest| rest.trim_start_matches(": "));
            match std::error::Error::source(other) {
                Some(cause) => format!("{what}: {cause}"),
                None => what.to_owned(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_order_and_codes() {
        assert_eq!(Status::Interrupted(130).code(), 130);
        assert_eq!([Status::Success, Status::Failed, Status::Usage].map(Status::code), [0, 1, 2]);
        let error = CliError::argument("--length", "1Q", "bad");
        assert_eq!(error.to_string(), "--length '1Q': bad");
        assert_eq!(error.status(), Status::Usage);
        assert_eq!((Status::StdoutClosed.code(), CliError::StdoutClosed.status()), (141, Status::StdoutClosed));
    }

    #[test]
    fn buffered_is_suggested_only_where_the_command_has_it() {
        let unsupported = || OpenError::DirectIoUnsupported {
            path: "/dev/shm/x.img".into(),
            filesystem: "tmpfs".into(),
            source: io::Error::new(io::ErrorKind::Unsupported, "no direct I/O"),
        };
        assert!(open_reason(&unsupported(), Some("--buffered")).ends_with("use --buffered"));
        let calibrate = open_reason(&unsupported(), None);
        assert!(!calibrate.contains("--buffered") && calibrate.contains("another filesystem"), "{calibrate}");
    }
}
