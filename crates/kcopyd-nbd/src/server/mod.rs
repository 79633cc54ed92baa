//! The server side: any [`BlockDevice`](kcopyd_core::BlockDevice) served as an NBD export, on a
//! unix socket or a TCP port, to any number of clients at once.
//!
//! ```text
//!  NbdServer::bind(address, device, ServerOptions) ─► listener (a stale unix socket replaced)
//!  serve(shutdown) ─► accept ─► (≤ connections_max, else closed at once) one task each:
//!     handshake (options.rs, within HANDSHAKE_TIMEOUT) ─► transmission (transmission.rs):
//!     requests in flight at once, replies in any order ─► device (shared by all connections)
//!  shutdown resolves ─► stop accepting, every connection answers what it has read, closes
//! ```
//!
//! Every connection serves the same device handle, and a flush flushes the device, not one
//! connection's writes: a flush on one connection makes the writes completed on every other
//! durable too, which is what `NBD_FLAG_CAN_MULTI_CONN` promises, so it is offered by default.

mod options;
mod transmission;
mod wire;

use std::fmt;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kcopyd_core::{Device, SECTOR_SIZE};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, BufReader, BufWriter};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::proto::*;
use crate::uri::Address;
pub use options::{OPTION_BYTES_MAX, OPTIONS_MAX};
pub use transmission::{DRAIN_TIMEOUT, EXTENTS_MAX};
use wire::NBD_FLAG_SEND_FUA;

/// Connections served at once by default; more are closed as soon as they are accepted.
pub const SERVER_CONNECTIONS_DEFAULT: usize = 16;
/// Requests of one connection in flight at once by default; the next waits for one to end.
pub const REQUESTS_IN_FLIGHT_DEFAULT: usize = 64;
/// Payload bytes (reads and writes) of one connection in flight at once by default.
pub const PAYLOAD_BYTES_IN_FLIGHT_DEFAULT: u64 = 128 << 20;
/// How long a client may take over its handshake before it is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// How to serve an export. The default serves it writable under the empty (default) name,
/// with multi-conn, payloads up to [`PAYLOAD_BYTES_DEFAULT_MAX`].
///
/// ```
/// # use kcopyd_nbd::ServerOptions;
/// let read_only = ServerOptions { read_only: true, ..ServerOptions::default() };
/// assert!(read_only.validate().is_ok());
/// assert!(ServerOptions { connections_max: 0, ..ServerOptions::default() }.validate().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerOptions {
    /// The export's name; the empty (default) name reaches it too.
    pub export_name: String,
    /// Refuse writes, trims and write-zeroes (`NBD_FLAG_READ_ONLY`).
    pub read_only: bool,
    /// Offer `NBD_FLAG_CAN_MULTI_CONN` (safe: every connection shares the device and a flush
    /// flushes all of it).
    pub multi_conn: bool,
    /// Connections served at once, 1 to 1024.
    pub connections_max: usize,
    /// Requests of one connection in flight at once, 1 to 4096.
    pub requests_in_flight_max: usize,
    /// The largest read or write payload (`NBD_INFO_BLOCK_SIZE` maximum): whole blocks of the
    /// device, at most [`PAYLOAD_BYTES_DEFAULT_MAX`]; larger requests get `EOVERFLOW` (reads)
    /// or `EINVAL` (writes, whose payload is read and dropped).
    pub payload_bytes_max: u32,
    /// Payload bytes of one connection in flight at once; at least `payload_bytes_max`.
    pub payload_bytes_in_flight_max: u64,
}

impl Default for ServerOptions {
    fn default() -> ServerOptions {
        ServerOptions {
            export_name: String::new(),
            read_only: false,
            multi_conn: true,
            connections_max: SERVER_CONNECTIONS_DEFAULT,
            requests_in_flight_max: REQUESTS_IN_FLIGHT_DEFAULT,
            payload_bytes_max: PAYLOAD_BYTES_DEFAULT_MAX,
            payload_bytes_in_flight_max: PAYLOAD_BYTES_IN_FLIGHT_DEFAULT,
        }
    }
}

impl ServerOptions {
    /// Checks every field against its bounds.
    ///
    /// # Errors
    /// [`ServeError::Options`] naming the field.
    pub fn validate(&self) -> Result<(), ServeError> {
        let refuse = |reason: String| Err(ServeError::Options { reason });
        if self.export_name.len() > 4096 {
            return refuse(format!("an export name of {} bytes (at most 4096)", self.export_name.len()));
        }
        if !(1..=1024).contains(&self.connections_max) {
            return refuse(format!("connections_max {} (1 to 1024)", self.connections_max));
        }
        if !(1..=4096).contains(&self.requests_in_flight_max) {
            return refuse(format!("requests_in_flight_max {} (1 to 4096)", self.requests_in_flight_max));
        }
        if !(SECTOR_SIZE as u32..=PAYLOAD_BYTES_DEFAULT_MAX).contains(&self.payload_bytes_max) {
            return refuse(format!(
                "payload_bytes_max {} (512 to {PAYLOAD_BYTES_DEFAULT_MAX})",
                self.payload_bytes_max
            ));
        }
        if self.payload_bytes_in_flight_max < u64::from(self.payload_bytes_max) {
            return refuse(format!(
                "payload_bytes_in_flight_max {} is less than payload_bytes_max {}",
                self.payload_bytes_in_flight_max, self.payload_bytes_max
            ));
        }
        Ok(())
    }
}

/// Why a server could not start.
#[derive(Debug, Error)]
pub enum ServeError {
    /// The options are out of bounds.
    #[error("invalid server options: {reason}")]
    Options {
        /// What is wrong.
        reason: String,
    },
    /// The device cannot be served (a block larger than the protocol's 64 KiB minimum).
    #[error("{device}: cannot be served: {reason}")]
    Device {
        /// The device's name.
        device: String,
        /// What is wrong.
        reason: String,
    },
    /// The address could not be listened on.
    #[error("cannot listen on {address}: {source}")]
    Listen {
        /// The address.
        address: String,
        /// What the system said.
        #[source]
        source: io::Error,
    },
}

/// Counters of a server's life, read with [`NbdServer::stats`] or returned by `serve`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerStats {
    /// Connections accepted and served.
    pub connections: u64,
    /// Connections closed at once: [`ServerOptions::connections_max`] were being served.
    pub connections_refused: u64,
    /// Connections that ended with a broken handshake or request (wrong magic, unknown
    /// flags, an option too long, a lost socket mid-request, a handshake timeout).
    pub connections_broken: u64,
    /// Requests read.
    pub requests: u64,
    /// Requests answered with an error.
    pub errors_replied: u64,
}

/// The live counters.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    connections: AtomicU64,
    connections_refused: AtomicU64,
    connections_broken: AtomicU64,
    pub(crate) requests: AtomicU64,
    pub(crate) errors_replied: AtomicU64,
}

impl Stats {
    fn snapshot(&self) -> ServerStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ServerStats {
            connections: get(&self.connections),
            connections_refused: get(&self.connections_refused),
            connections_broken: get(&self.connections_broken),
            requests: get(&self.requests),
            errors_replied: get(&self.errors_replied),
        }
    }
}

/// What the server says of its export, fixed at bind time.
pub(crate) struct Export {
    pub(crate) device: Device,
    pub(crate) name: String,
    pub(crate) size_bytes: u64,
    pub(crate) block_bytes: u32,
    pub(crate) block_preferred_bytes: u32,
    pub(crate) payload_bytes_max: u32,
    pub(crate) flags: u16,
    pub(crate) read_only: bool,
}

/// The per-connection limits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) requests_in_flight_max: usize,
    pub(crate) payload_bytes_in_flight_max: u64,
}

pub(crate) type Reader = BufReader<Box<dyn AsyncRead + Unpin + Send>>;
pub(crate) type Writer = BufWriter<Box<dyn AsyncWrite + Unpin + Send>>;

enum Listener {
    Unix(std::os::unix::net::UnixListener),
    Tcp(std::net::TcpListener),
}

/// An NBD server of one device, bound and ready to [`serve`](NbdServer::serve).
///
/// ```no_run
/// # async fn example(device: kcopyd_core::Device) -> Result<(), kcopyd_nbd::ServeError> {
/// use kcopyd_nbd::{Address, NbdServer, ServerOptions};
/// let address = Address::Unix("/run/clone.sock".into());
/// let server = NbdServer::bind(&address, device, ServerOptions::default())?;
/// println!("serving {}", server.uri());
/// let stats = server.serve(async { let _ = tokio::signal::ctrl_c().await; }).await;
/// # Ok(()) }
/// ```
pub struct NbdServer {
    listener: Listener,
    export: Arc<Export>,
    limits: Limits,
    connections_max: usize,
    uri: String,
    /// The unix socket this server made and which file it is (device and inode numbers),
    /// removed when the server is dropped while its path still names it.
    socket: Option<(PathBuf, (u64, u64))>,
    stats: Arc<Stats>,
}

impl fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdServer").field("uri", &self.uri).field("size_bytes", &self.export.size_bytes).finish()
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        // Only while the path names the socket made: what took its name since is someone else's.
        if let Some((path, made)) = &self.socket
            && std::fs::symlink_metadata(path).is_ok_and(|now| (now.dev(), now.ino()) == *made)
        {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl NbdServer {
    /// Listens on `address` to serve `device` (a unix socket left by a server that is gone is
    /// replaced; one that answers, or any other file, is not).
    ///
    /// # Errors
    /// Options out of bounds, a device whose block the protocol cannot state, or the address
    /// cannot be listened on.
    pub fn bind(address: &Address, device: Device, options: ServerOptions) -> Result<NbdServer, ServeError> {
        options.validate()?;
        let geometry = device.geometry();
        let block_bytes = geometry.logical_block_size;
        if !block_bytes.is_power_of_two() || block_bytes > 65536 {
            let reason = format!("a {block_bytes}-byte block (the protocol's minimum block is at most 64 KiB)");
            return Err(ServeError::Device { device: device.name().to_owned(), reason });
        }
        let payload_bytes_max = options.payload_bytes_max / block_bytes * block_bytes;
        if payload_bytes_max == 0 {
            let reason = format!("payload_bytes_max {} is less than its block", options.payload_bytes_max);
            return Err(ServeError::Device { device: device.name().to_owned(), reason });
        }
        let mut flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA;
        if options.read_only {
            flags |= NBD_FLAG_READ_ONLY;
        } else {
            flags |= NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES;
        }
        if options.multi_conn {
            flags |= NBD_FLAG_CAN_MULTI_CONN;
        }
        let listen_error = |source| ServeError::Listen { address: address.to_string(), source };
        let (listener, uri, socket) = match address {
            Address::Unix(path) => {
                replace_stale_socket(path).map_err(listen_error)?;
                let listener = std::os::unix::net::UnixListener::bind(path).map_err(listen_error)?;
                let made = std::fs::symlink_metadata(path).map_err(listen_error)?;
                (
                    Listener::Unix(listener),
                    format!("nbd+unix:///{}?socket={}", options.export_name, path.display()),
                    Some((path.clone(), (made.dev(), made.ino()))),
                )
            }
            Address::Tcp { host, port } => {
                let listener = std::net::TcpListener::bind((host.as_str(), *port)).map_err(listen_error)?;
                let local = listener.local_addr().map_err(listen_error)?;
                (Listener::Tcp(listener), format!("nbd://{local}/{}", options.export_name), None)
            }
        };
        let export = Export {
            name: options.export_name,
            size_bytes: geometry.len_sectors * SECTOR_SIZE as u64,
            block_bytes,
            block_preferred_bytes: block_bytes.max(4096),
            payload_bytes_max,
            flags,
            read_only: options.read_only,
            device,
        };
        let limits = Limits {
            requests_in_flight_max: options.requests_in_flight_max,
            payload_bytes_in_flight_max: options.payload_bytes_in_flight_max,
        };
        let stats = Arc::default();
        let connections_max = options.connections_max;
        Ok(NbdServer { listener, export: Arc::new(export), limits, connections_max, uri, socket, stats })
    }

    /// The URI clients reach the export at (`nbd+unix:///NAME?socket=PATH`, or
    /// `nbd://ADDRESS:PORT/NAME` with the port actually bound).
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The counters so far.
    pub fn stats(&self) -> ServerStats {
        self.stats.snapshot()
    }

    /// Serves clients until `shutdown` resolves: then accepts no more, lets every connection
    /// answer the requests it has read, closes them and returns the counters. Runs on the
    /// current tokio runtime (which needs IO and time enabled); connections are tasks on it.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> ServerStats {
        let accept = match self.tokio_listener() {
            Ok(accept) => accept,
            Err(_) => return self.stats(),
        };
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut connections = JoinSet::new();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let stream = tokio::select! {
                () = &mut shutdown => break,
                Some(_) = connections.join_next() => continue,
                stream = accept.accept() => stream,
            };
            let Ok((reader, writer)) = stream else { continue };
            if connections.len() >= self.connections_max {
                self.stats.connections_refused.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            self.stats.connections.fetch_add(1, Ordering::Relaxed);
            let (export, limits, stats, stop) = (self.export.clone(), self.limits, self.stats.clone(), stop_rx.clone());
            connections.spawn(async move {
                if connection(reader, writer, export, limits, stats.clone(), stop).await.is_err() {
                    stats.connections_broken.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        let _ = stop_tx.send(true);
        while connections.join_next().await.is_some() {}
        self.stats()
    }

    fn tokio_listener(&self) -> io::Result<Accept> {
        Ok(match &self.listener {
            Listener::Unix(listener) => {
                let listener = listener.try_clone()?;
                listener.set_nonblocking(true)?;
                Accept::Unix(tokio::net::UnixListener::from_std(listener)?)
            }
            Listener::Tcp(listener) => {
                let listener = listener.try_clone()?;
                listener.set_nonblocking(true)?;
                Accept::Tcp(tokio::net::TcpListener::from_std(listener)?)
            }
        })
    }
}

/// The listener on the runtime.
enum Accept {
    Unix(tokio::net::UnixListener),
    Tcp(tokio::net::TcpListener),
}

type Halves = (Box<dyn AsyncRead + Unpin + Send>, Box<dyn AsyncWrite + Unpin + Send>);

impl Accept {
    async fn accept(&self) -> io::Result<Halves> {
        Ok(match self {
            Accept::Unix(listener) => {
                let (stream, _) = listener.accept().await?;
                let (reader, writer) = stream.into_split();
                (Box::new(reader), Box::new(writer))
            }
            Accept::Tcp(listener) => {
                let (stream, _) = listener.accept().await?;
                stream.set_nodelay(true)?;
                let (reader, writer) = stream.into_split();
                (Box::new(reader), Box::new(writer))
            }
        })
    }
}

/// One connection: the handshake (bounded in time), then its requests.
async fn connection(
    reader: Box<dyn AsyncRead + Unpin + Send>,
    writer: Box<dyn AsyncWrite + Unpin + Send>,
    export: Arc<Export>,
    limits: Limits,
    stats: Arc<Stats>,
    stop: watch::Receiver<bool>,
) -> io::Result<()> {
    let mut reader: Reader = BufReader::with_capacity(64 * 1024, reader);
    let mut writer: Writer = BufWriter::with_capacity(64 * 1024, writer);
    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, options::negotiate(&mut reader, &mut writer, &export));
    let mut stopping = stop.clone();
    let handshake = tokio::select! {
        handshake = handshake => handshake,
        _ = stopping.wait_for(|stop| *stop) => return Ok(()),
    };
    let negotiated = match handshake {
        Ok(Ok(Some(negotiated))) => negotiated,
        Ok(Ok(None)) => return Ok(()),
        Ok(Err(error)) => return Err(error),
        Err(elapsed) => return Err(io::Error::new(io::ErrorKind::TimedOut, elapsed)),
    };
    transmission::serve_requests(reader, writer, export, negotiated, limits, stats, stop).await
}

/// Removes a unix socket at `path` that no server answers on any more; refuses anything else
/// there (a live socket, a file).
fn replace_stale_socket(path: &std::path::Path) -> io::Result<()> {
    let Ok(metadata) = std::fs::symlink_metadata(path) else { return Ok(()) };
    if !metadata.file_type().is_socket() {
        return Err(io::Error::new(io::ErrorKind::AlreadyExists, "a file that is not a socket is there"));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(io::ErrorKind::AddrInUse, "a server is listening there")),
        Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(path),
        Err(error) => Err(error),
    }
}
