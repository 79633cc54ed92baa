//! `kcopyd-nbd`: an asynchronous Network Block Device client, so that a copy's source or
//! targets can be exports on any machine that serves them (qemu-nbd, nbdkit, nbd-server);
//! and a server ([`NbdServer`], `server/`) that serves any `BlockDevice` to any NBD client.
//!
//! ```text
//!  connect("nbd://host/export") ─► NbdUri ─► Connection::open ×1..N (N when CAN_MULTI_CONN)
//!     each: a task on the Reactor (one thread + current-thread runtime, shared by all
//!           connections of all devices unless asked otherwise)
//!           ─► socket ─► handshake (fixed newstyle, [STARTTLS ─► TLS session (nbds)],
//!           STRUCTURED_REPLY, SET_META_CONTEXT base:allocation, GO + INFO_BLOCK_SIZE)
//!
//!  NbdDevice (BlockDevice)  read / write / write_zeroes / flush  + block_status, trim
//!     check: aligned? inside? writable? ── no: RequestError::Refused, nothing sent
//!     └► split at the server's maximum block size ─► round robin over the connections
//!          ─► request (cookie) ─► reply (simple or structured, any order) ─► oneshot
//!                                     └ checked against the request and the handshake:
//!                                       coverage, context id, bounds (reply.rs)
//!     + read_bytes / write_bytes: the bytes past the whole blocks of an odd-sized export
//! ```
//!
//! Errors the server sends come back as `io::Error`s of the errno's kind, holding a
//! [`RequestError::Server`] with the errno, the command and the byte range; a lost connection
//! fails every request in flight and every later one with [`RequestError::ConnectionLost`].
//! A reply that breaks the protocol is not believed: its request fails with
//! [`RequestError::ProtocolViolation`] and the connection is dropped. With
//! [`ConnectOptions::io_timeout_ms`], a server that stops answering is dropped too.
//!
//! TLS: `nbds://` and `nbds+unix://` secure every connection with `NBD_OPT_STARTTLS` and
//! rustls (`tls.rs`, `tls_stream.rs`), with libnbd's `tls-certificates`, `tls-verify-peer`
//! and `tls-hostname` parameters ([`TlsOptions`]). A server that refuses TLS is refused
//! ([`ConnectError::TlsRefused`]: never plain text instead); a plain-text URI to a server that
//! requires TLS gets [`ConnectError::TlsRequired`].
//!
//! ```no_run
//! use kcopyd_core::BlockDevice;
//! let source = kcopyd_nbd::connect("nbd+unix:///disk?socket=/run/nbd.sock").unwrap();
//! println!("{} sectors", source.geometry().len_sectors);
//! ```
#![warn(missing_docs)]
#![forbid(unsafe_code)]
// Library code reports through its return values, never by printing.
#![cfg_attr(not(test), deny(clippy::print_stderr, clippy::print_stdout))]

mod connection;
mod device;
mod error;
mod handshake;
mod proto;
mod reactor;
mod reply;
mod server;
mod tls;
mod tls_stream;
mod uri;

pub use device::{
    CONNECT_TIMEOUT_MS_DEFAULT, CONNECTIONS_DEFAULT, CONNECTIONS_MAX, ConnectOptions, EXPORT_BYTES_MAX, Extent,
    LOGICAL_BLOCK_BYTES_MAX, NbdDevice, connect,
};
pub use error::{ConnectError, Refusal, RequestError};
pub use proto::{NBD_DEFAULT_PORT, NO_PAYLOAD_BYTES_MAX, PAYLOAD_BYTES_DEFAULT_MAX};
pub use reactor::Reactor;
pub use server::{
    DRAIN_TIMEOUT, EXTENTS_MAX, HANDSHAKE_TIMEOUT, NbdServer, OPTION_BYTES_MAX, OPTIONS_MAX,
    PAYLOAD_BYTES_IN_FLIGHT_DEFAULT, REQUESTS_IN_FLIGHT_DEFAULT, SERVER_CONNECTIONS_DEFAULT, ServeError, ServerOptions,
    ServerStats,
};
pub use tls::{CA_CERT_FILE, CLIENT_CERT_FILE, CLIENT_KEY_FILE, SYSTEM_CA_BUNDLES, TlsError, UNIX_SOCKET_HOSTNAME};
pub use uri::{Address, NbdUri, TlsOptions, UriError};
