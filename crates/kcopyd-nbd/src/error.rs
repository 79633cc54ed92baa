//! Errors: [`ConnectError`] for opening an export, [`RequestError`] inside the `io::Error` of
//! every failed request.

use std::io;

use kcopyd_core::{RequestRefused, SECTOR_SIZE};
use thiserror::Error;

use crate::tls::{TlsError, handshake_hint};
use crate::uri::UriError;

/// Why [`connect`](crate::connect) could not open an export. Every variant names the server.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The URI is malformed or asks for something unsupported.
    #[error(transparent)]
    Uri(#[from] UriError),
    /// The options are out of bounds.
    #[error("{server}: invalid connect options: {reason}")]
    InvalidOptions {
        /// The URI.
        server: String,
        /// What is wrong.
        reason: String,
    },
    /// The socket could not be connected (no server, refused, unreachable, timed out).
    #[error("{server}: cannot connect: {source}")]
    Connect {
        /// The URI.
        server: String,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The socket failed or closed during the handshake.
    #[error("{server}: connection lost during the handshake: {source}")]
    HandshakeIo {
        /// The URI.
        server: String,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The server does not speak the protocol as this client needs (not fixed newstyle, no
    /// `NBD_OPT_GO`, a malformed reply).
    #[error("{server}: {problem}")]
    Protocol {
        /// The URI.
        server: String,
        /// What was wrong.
        problem: String,
    },
    /// The server refused an option: an unknown export (`NBD_REP_ERR_UNKNOWN`), TLS required
    /// (`NBD_REP_ERR_TLS_REQD`), ….
    #[error("{server}: the server refused {option}: {reply}{}", if .message.is_empty() { String::new() } else { format!(" ({})", .message) })]
    OptionRefused {
        /// The URI.
        server: String,
        /// The option, by its protocol name.
        option: &'static str,
        /// The error reply, by its protocol name.
        reply: &'static str,
        /// The server's message.
        message: String,
    },
    /// The server requires TLS (`NBD_REP_ERR_TLS_REQD`) and the URI is plain text.
    #[error(
        "{server}: the server requires TLS (NBD_REP_ERR_TLS_REQD): use {tls_uri} (with tls-certificates=DIR naming its CA)"
    )]
    TlsRequired {
        /// The URI.
        server: String,
        /// The same URI with the TLS scheme.
        tls_uri: String,
    },
    /// TLS was asked for (`nbds`) and the server refused `NBD_OPT_STARTTLS` (it offers no
    /// TLS): the connection is dropped, never continued in plain text.
    #[error(
        "{server}: TLS was asked for but the server refused NBD_OPT_STARTTLS with {reply}{}: not falling back to plain text",
        if .message.is_empty() { String::new() } else { format!(" ({})", .message) }
    )]
    TlsRefused {
        /// The URI.
        server: String,
        /// The error reply, by its protocol name.
        reply: &'static str,
        /// The server's message.
        message: String,
    },
    /// The TLS configuration could not be built (certificates unreadable or malformed, no
    /// trust roots): nothing was sent.
    #[error("{server}: TLS: {source}")]
    TlsSetup {
        /// The URI.
        server: String,
        /// What is wrong (boxed: rustls's errors are large, and every `ConnectError` would
        /// carry their size).
        #[source]
        source: Box<TlsError>,
    },
    /// The TLS handshake failed: the server's certificate is not trusted, has expired, is for
    /// another name, or the server refused this client.
    #[error("{server}: TLS handshake failed: {}{source}", .hint.map(|hint| format!("{hint}: ")).unwrap_or_default())]
    TlsHandshake {
        /// The URI.
        server: String,
        /// What the failure most likely means, when rustls's error tells.
        hint: Option<&'static str>,
        /// What rustls or the system said (rustls's [`rustls::Error`] inside, when it is its).
        #[source]
        source: io::Error,
    },
    /// The export is read-only and was to be written: refused before any I/O.
    #[error("{server}: the export is read-only (NBD_FLAG_READ_ONLY), refusing it as a target")]
    ReadOnly {
        /// The URI.
        server: String,
    },
    /// The export's size or block sizes cannot be used.
    #[error("{server}: unusable export geometry: {problem}")]
    Geometry {
        /// The URI.
        server: String,
        /// What is wrong.
        problem: String,
    },
    /// A further connection (multi-conn) saw another export than the first.
    #[error("{server}: connection {index} sees another export than the first: {problem}")]
    Inconsistent {
        /// The URI.
        server: String,
        /// Which connection (from 0).
        index: usize,
        /// What differs.
        problem: String,
    },
    /// The reactor's thread (see [`Reactor`](crate::Reactor)) could not be started, or it
    /// ended before the connection was open, or the connect was called on that thread (from
    /// an engine started there, which would wait for itself).
    #[error("{server}: no reactor thread for the connection: {source}")]
    Thread {
        /// The URI.
        server: String,
        /// What the system said.
        #[source]
        source: io::Error,
    },
}

impl ConnectError {
    /// A failure while talking to the server during the handshake: a TLS failure (rustls's
    /// error inside) as [`ConnectError::TlsHandshake`], anything else as
    /// [`ConnectError::HandshakeIo`].
    pub(crate) fn handshake_io(server: &str, source: io::Error) -> ConnectError {
        let from_rustls = source.get_ref().is_some_and(|inner| inner.is::<rustls::Error>());
        match from_rustls {
            true => ConnectError::TlsHandshake { server: server.to_owned(), hint: handshake_hint(&source), source },
            false => ConnectError::HandshakeIo { server: server.to_owned(), source },
        }
    }
}

/// Why one request failed, inside the `io::Error` a [`NbdDevice`](crate::NbdDevice) operation
/// returns (`error.get_ref()` downcasts to it). Every variant names the server, the command
/// and the byte range of the request.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum RequestError {
    /// The server answered with an error: `errno` is the value it sent (the protocol's values
    /// are Linux's: EPERM 1, EIO 5, ENOMEM 12, EINVAL 22, ENOSPC 28, EOVERFLOW 75, ENOTSUP 95,
    /// ESHUTDOWN 108), and the `io::Error`'s kind is that errno's.
    #[error(
        "{server}: {command} of bytes {offset_bytes}..{} (sectors {}) failed on the server: {} (errno {errno}){}",
        .offset_bytes + .len_bytes, sectors(*.offset_bytes, *.len_bytes), io::Error::from_raw_os_error(*.errno),
        if .message.is_empty() { String::new() } else { format!(": {}", .message) }
    )]
    Server {
        /// The URI.
        server: String,
        /// The command, by its protocol name.
        command: &'static str,
        /// First byte of the request.
        offset_bytes: u64,
        /// Bytes in the request.
        len_bytes: u64,
        /// The error the server sent.
        errno: i32,
        /// The server's message (structured replies only).
        message: String,
    },
    /// The connection was lost (or broke the protocol) before the reply came: the request
    /// may or may not have been carried out.
    #[error(
        "{server}: {command} of bytes {offset_bytes}..{} (sectors {}) failed: connection lost: {reason}",
        .offset_bytes + .len_bytes, sectors(*.offset_bytes, *.len_bytes)
    )]
    ConnectionLost {
        /// The URI.
        server: String,
        /// The command, by its protocol name.
        command: &'static str,
        /// First byte of the request.
        offset_bytes: u64,
        /// Bytes in the request.
        len_bytes: u64,
        /// Why the connection ended.
        reason: String,
    },
    /// The server's reply to this request broke the protocol (a read not covered exactly once,
    /// block status for a context not agreed, an error chunk with errno 0, …): nothing of it
    /// is believed, and the connection is dropped (its other requests fail as lost).
    #[error(
        "{server}: {command} of bytes {offset_bytes}..{} (sectors {}) failed: the server broke the NBD protocol: {problem}",
        .offset_bytes + .len_bytes, sectors(*.offset_bytes, *.len_bytes)
    )]
    ProtocolViolation {
        /// The URI.
        server: String,
        /// The command, by its protocol name.
        command: &'static str,
        /// First byte of the request.
        offset_bytes: u64,
        /// Bytes in the request.
        len_bytes: u64,
        /// What the server did wrong.
        problem: String,
    },
    /// Refused here, before anything was sent: misaligned, out of range, a write to an export
    /// opened read-only, a command the server does not offer.
    #[error(
        "{server}: {command} of bytes {offset_bytes}..{} (sectors {}) refused: {problem}",
        .offset_bytes.saturating_add(*.len_bytes), sectors(*.offset_bytes, *.len_bytes)
    )]
    Refused {
        /// The URI.
        server: String,
        /// The command, by its protocol name.
        command: &'static str,
        /// First byte of the request.
        offset_bytes: u64,
        /// Bytes in the request (saturating at `u64::MAX`).
        len_bytes: u64,
        /// Why.
        problem: Refusal,
    },
}

impl RequestError {
    /// The errno the server sent, for [`RequestError::Server`].
    pub fn server_errno(&self) -> Option<i32> {
        match self {
            RequestError::Server { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    /// Into an `io::Error` of the right kind, with `self` inside.
    pub(crate) fn into_io(self, kind: io::ErrorKind) -> io::Error {
        io::Error::new(kind, self)
    }

    /// A server error as an `io::Error` of its errno's kind.
    pub(crate) fn server_io(self) -> io::Error {
        let kind = match &self {
            RequestError::Server { errno, .. } => io::Error::from_raw_os_error(*errno).kind(),
            _ => io::ErrorKind::Other,
        };
        self.into_io(kind)
    }
}

/// Why a request was refused before anything was sent ([`RequestError::Refused`]).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The request breaks the export's geometry: not whole logical blocks, or past the end of
    /// its whole blocks (the rules every device shares).
    #[error(transparent)]
    Geometry(RequestRefused),
    /// A byte-granular request not aligned to the server's minimum block size.
    #[error("not aligned to the server's {min_bytes}-byte minimum block size")]
    MinimumBlock {
        /// The server's minimum block size.
        min_bytes: u32,
    },
    /// A byte-granular request past the export's size.
    #[error("runs past the end of the export at byte {size_bytes}")]
    PastTheExport {
        /// The export's size in bytes.
        size_bytes: u64,
    },
    /// A byte-granular request longer than one request may be.
    #[error("longer than the {bytes_max}-byte largest request")]
    TooLong {
        /// The largest payload of one request.
        bytes_max: u32,
    },
    /// A write to an export opened read-only.
    #[error("the export was opened read-only")]
    ReadOnly,
    /// The server does not offer the command.
    #[error("the server offers no {what}")]
    NotOffered {
        /// What is missing.
        what: &'static str,
    },
}

impl Refusal {
    /// The `io::ErrorKind` of the refusal: `InvalidInput` for the request's own faults (EINVAL,
    /// as [`RequestRefused::errno`]), `PermissionDenied` for a read-only export, `Unsupported`
    /// for a command the server lacks.
    pub fn kind(&self) -> io::ErrorKind {
        match self {
            Refusal::Geometry(refused) => refused.io_kind(),
            Refusal::MinimumBlock { .. } | Refusal::PastTheExport { .. } | Refusal::TooLong { .. } => {
                io::ErrorKind::InvalidInput
            }
            Refusal::ReadOnly => io::ErrorKind::PermissionDenied,
            Refusal::NotOffered { .. } => io::ErrorKind::Unsupported,
        }
    }
}

/// `first..end` in sectors, for messages.
fn sectors(offset_bytes: u64, len_bytes: u64) -> String {
    let sector = SECTOR_SIZE as u64;
    format!("{}..{}", offset_bytes / sector, offset_bytes.saturating_add(len_bytes).div_ceil(sector))
}
