//! [`NbdDevice`]: an NBD export behind the [`BlockDevice`] trait.

use std::collections::hash_map::DefaultHasher;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use kcopyd_core::{
    BlockDevice, DeviceId, Geometry, IoFuture, RangeSet, ReadBuf, SECTOR_SIZE, WriteBuf, sectors_to_bytes,
};
use tokio::sync::oneshot;

use crate::connection::Connection;
use crate::error::{ConnectError, Refusal, RequestError};
use crate::handshake::ExportInfo;
use crate::proto::*;
use crate::reactor::Reactor;
use crate::reply::{Completion, Request};
use crate::tls::TlsClient;
use crate::uri::NbdUri;
use crate::uri::TlsOptions;

/// Connections opened to a server that allows several (`NBD_FLAG_CAN_MULTI_CONN`) when none
/// is asked for: 4, as nbdcopy opens.
pub const CONNECTIONS_DEFAULT: usize = 4;
/// Most connections one device opens.
pub const CONNECTIONS_MAX: usize = 16;
/// How long connecting and the handshake may take when nothing else is asked for.
pub const CONNECT_TIMEOUT_MS_DEFAULT: u64 = 30_000;
/// The least time a further connection (after the first) may take to connect and finish its
/// handshake before the device goes on with the connections it has: see
/// [`further_connect_timeout`].
const FURTHER_CONNECT_TIMEOUT_MS_MIN: u64 = 1000;
/// Largest export size accepted: the protocol's sizes are signed 64-bit in practice (qemu,
/// libnbd); a larger one is taken as a broken server.
pub const EXPORT_BYTES_MAX: u64 = i64::MAX as u64;
/// Largest logical block size accepted (the engine's limit), in bytes.
pub const LOGICAL_BLOCK_BYTES_MAX: u32 = 65536;
/// Write-zeroes without offload writes zeroes in pieces of at most this many bytes, this many
/// pieces in flight at a time.
const ZEROES_PIECE_BYTES_MAX: u32 = 1 << 20;
const ZEROES_PIECES_IN_FLIGHT: usize = 8;
/// The message of a completion that never came: a pending request always completes (its
/// `Drop` reports the lost connection), so only a panic in the connection loses one.
const CONNECTION_REPLIES: &str = "an NBD connection completes every request";

/// How to open an export. The default opens it read-only, with up to
/// [`CONNECTIONS_DEFAULT`] connections.
///
/// ```
/// # use kcopyd_nbd::ConnectOptions;
/// // A target: refused at connect time if the export is read-only.
/// let target = ConnectOptions { write: true, ..ConnectOptions::default() };
/// assert_eq!(target.connections_max, 4);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectOptions {
    /// Open for writing: a read-only export (`NBD_FLAG_READ_ONLY`) is refused
    /// ([`ConnectError::ReadOnly`]) before any I/O. Without it, writes are refused here.
    pub write: bool,
    /// Connections to open when the server allows several (`NBD_FLAG_CAN_MULTI_CONN`):
    /// 1 to [`CONNECTIONS_MAX`]; one connection otherwise.
    pub connections_max: usize,
    /// How long connecting and the handshake of each connection may take
    /// ([`CONNECT_TIMEOUT_MS_DEFAULT`] by default).
    pub connect_timeout_ms: u64,
    /// Most milliseconds a request may wait for its whole reply; past it the connection is
    /// taken as stalled and dropped, failing its requests with `TimedOut` (their buffers come
    /// back at once). `None` (the default) waits for ever, as a local disk would.
    pub io_timeout_ms: Option<u64>,
    /// The thread the connections run on: `None` for the process's shared one
    /// ([`Reactor::shared`]).
    pub reactor: Option<Reactor>,
    /// TLS parameters for `nbds://` and `nbds+unix://` URIs whose query does not give them
    /// (the URI's own win). Unused for plain-text URIs: they never turn TLS on.
    pub tls: TlsOptions,
}

impl Default for ConnectOptions {
    fn default() -> ConnectOptions {
        ConnectOptions {
            write: false,
            connections_max: CONNECTIONS_DEFAULT,
            connect_timeout_ms: CONNECT_TIMEOUT_MS_DEFAULT,
            io_timeout_ms: None,
            reactor: None,
            tls: TlsOptions::default(),
        }
    }
}

/// How an [`NbdDevice`] makes a range read as zeroes while releasing its storage
/// ([`BlockDevice::deallocate`], for sparse targets), from what the server offers:
///
/// ```text
///  NBD_FLAG_SEND_TRIM?  ── no ──────────────────────────────► WriteZeroes
///        │ yes
///  NBD_FLAG_SEND_WRITE_ZEROES? ── yes ──────────────────────► WriteZeroesMayPunch
///        │ no
///  base:allocation? ── yes ─► TrimThenCheck, no ───────────► WriteZeroes
/// ```
///
/// `NBD_CMD_TRIM` alone promises nothing: a server may ignore it, and what reads back
/// afterwards is unspecified. It is used only where block status can tell what it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Deallocation {
    /// `NBD_CMD_WRITE_ZEROES` without `NBD_CMD_FLAG_NO_HOLE`: the server must read back
    /// zeroes and may release the storage.
    WriteZeroesMayPunch,
    /// `NBD_CMD_TRIM`, then `NBD_CMD_BLOCK_STATUS` on the same connection; zeroes are written
    /// wherever the server does not report `NBD_STATE_ZERO`.
    TrimThenCheck,
    /// No deallocation: [`BlockDevice::write_zeroes`] (a server without trim, or with trim but
    /// neither write-zeroes nor block status to make its result certain).
    WriteZeroes,
}

/// One run of the export with the same allocation state (`base:allocation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// First byte of the run.
    pub offset_bytes: u64,
    /// Bytes in the run.
    pub len_bytes: u64,
    /// `NBD_STATE_HOLE`: no storage is allocated.
    pub hole: bool,
    /// `NBD_STATE_ZERO`: the run reads as zeroes.
    pub zero: bool,
}

/// An NBD export: one or more connections to one server, many requests in flight on each.
///
/// The geometry comes from the handshake: the logical block is the server's minimum block
/// size (at least 512 bytes), the length is the export's size rounded down to whole blocks
/// (the bytes after them are reached with [`NbdDevice::read_bytes`] and
/// [`NbdDevice::write_bytes`]), write-zeroes is offloaded when the server offers
/// `NBD_CMD_WRITE_ZEROES`. Reads and writes larger than the server's maximum block size are
/// split.
pub struct NbdDevice {
    name: String,
    uri: NbdUri,
    id: DeviceId,
    geometry: Geometry,
    info: ExportInfo,
    write: bool,
    payload_bytes_max: u32,
    connections: Vec<Connection>,
    next_connection: AtomicUsize,
    reactor: Reactor,
}

impl fmt::Debug for NbdDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdDevice")
            .field("name", &self.name)
            .field("geometry", &self.geometry)
            .field("connections", &self.connections.len())
            .finish()
    }
}

/// Opens the export at `uri` read-only ([`ConnectOptions::default`]).
///
/// # Errors
/// A malformed URI, no server, a refused export, an unusable geometry.
pub fn connect(uri: &str) -> Result<NbdDevice, ConnectError> {
    NbdDevice::connect(uri, &ConnectOptions::default())
}

impl NbdDevice {
    /// Opens the export at `uri`: the first connection, then more if the server allows
    /// several and `options` asks for them.
    ///
    /// # Errors
    /// A malformed URI, no server, a refused export, a read-only export opened for writing,
    /// an unusable geometry, or a further connection seeing another export.
    pub fn connect(uri: &str, options: &ConnectOptions) -> Result<NbdDevice, ConnectError> {
        let parsed = NbdUri::parse(uri)?;
        let server: Arc<str> = Arc::from(uri);
        if options.connections_max == 0 || options.connections_max > CONNECTIONS_MAX {
            return Err(ConnectError::InvalidOptions {
                server: uri.to_owned(),
                reason: format!("{} connections (must be 1 to {CONNECTIONS_MAX})", options.connections_max),
            });
        }
        if options.connect_timeout_ms == 0 || options.io_timeout_ms == Some(0) {
            return Err(ConnectError::InvalidOptions { server: uri.to_owned(), reason: "a timeout of 0 ms".into() });
        }
        let timeouts =
            (Duration::from_millis(options.connect_timeout_ms), options.io_timeout_ms.map(Duration::from_millis));
        let reactor = match &options.reactor {
            Some(reactor) => reactor.clone(),
            None => Reactor::shared().map_err(|source| ConnectError::Thread { server: uri.to_owned(), source })?,
        };
        let tls = match &parsed.tls {
            Some(uri_tls) => Some(
                TlsClient::new(&uri_tls.clone().or(&options.tls), &parsed.address)
                    .map_err(|source| ConnectError::TlsSetup { server: uri.to_owned(), source: Box::new(source) })?,
            ),
            None => None,
        };
        let target = (&parsed.address, parsed.export.as_str(), tls.as_ref());
        let started = Instant::now();
        let (first, info) = Connection::open(&reactor, target, server.clone(), timeouts)?;
        let further_timeouts = (further_connect_timeout(timeouts.0, started.elapsed()), timeouts.1);
        if options.write && info.has(NBD_FLAG_READ_ONLY) {
            return Err(ConnectError::ReadOnly { server: uri.to_owned() });
        }
        let (geometry, payload_bytes_max) = geometry_of(uri, &info)?;
        let mut connections = vec![first];
        if info.has(NBD_FLAG_CAN_MULTI_CONN) {
            for index in 1..options.connections_max {
                let opened = Connection::open(&reactor, target, server.clone(), further_timeouts);
                let (connection, other) = match opened {
                    // A server that offers several connections but takes fewer (closes the
                    // further ones, or leaves them unanswered): use those it took.
                    Err(ConnectError::Connect { .. } | ConnectError::HandshakeIo { .. }) => break,
                    opened => opened?,
                };
                if let Some(problem) = differences(&info, &other) {
                    return Err(ConnectError::Inconsistent { server: uri.to_owned(), index, problem });
                }
                connections.push(connection);
            }
        }
        let id = DeviceId { namespace: "nbd", major: hash(&parsed.address), minor: hash(&parsed.export) };
        Ok(NbdDevice {
            name: uri.to_owned(),
            uri: parsed,
            id,
            geometry,
            info,
            write: options.write,
            payload_bytes_max,
            connections,
            next_connection: AtomicUsize::new(0),
            reactor,
        })
    }

    /// The parsed URI.
    pub fn uri(&self) -> &NbdUri {
        &self.uri
    }

    /// Connections open to the server.
    pub fn connections(&self) -> usize {
        self.connections.len()
    }

    /// The reactor the connections run on.
    pub fn reactor(&self) -> &Reactor {
        &self.reactor
    }

    /// Whether the server allows several connections (`NBD_FLAG_CAN_MULTI_CONN`).
    pub fn can_multi_conn(&self) -> bool {
        self.info.has(NBD_FLAG_CAN_MULTI_CONN)
    }

    /// Whether the export is read-only (`NBD_FLAG_READ_ONLY`).
    pub fn is_read_only_export(&self) -> bool {
        self.info.has(NBD_FLAG_READ_ONLY)
    }

    /// The export's size in bytes, as the server states it (the geometry's length is whole
    /// logical blocks of it).
    pub fn size_bytes(&self) -> u64 {
        self.info.size_bytes
    }

    /// The server's preferred block size (`NBD_INFO_BLOCK_SIZE`; 4096 when it states none).
    pub fn preferred_block_bytes(&self) -> u32 {
        self.info.block_preferred_bytes
    }

    /// The largest read or write sent in one request: the server's maximum block size (at
    /// most [`PAYLOAD_BYTES_DEFAULT_MAX`]), whole logical blocks.
    pub fn payload_bytes_max(&self) -> u32 {
        self.payload_bytes_max
    }

    /// Whether the server sends structured replies (`NBD_OPT_STRUCTURED_REPLY`).
    pub fn structured_replies(&self) -> bool {
        self.info.structured
    }

    /// Whether [`NbdDevice::block_status`] is available (the server offers `base:allocation`).
    pub fn has_block_status(&self) -> bool {
        self.info.base_allocation.is_some()
    }

    /// Whether [`NbdDevice::trim`] is available (`NBD_FLAG_SEND_TRIM`).
    pub fn has_trim(&self) -> bool {
        self.info.has(NBD_FLAG_SEND_TRIM)
    }

    /// The allocation state of `len_sectors` from `offset_sectors` (`NBD_CMD_BLOCK_STATUS`,
    /// `base:allocation`): runs in order from `offset_sectors`, covering at least a first part
    /// of the range (a server may describe less than was asked; ask again from where the
    /// answer ends), never past it.
    ///
    /// # Errors
    /// The server offers no `base:allocation`, the range is misaligned or out of range, or the
    /// server's error.
    pub async fn block_status(&self, offset_sectors: u64, len_sectors: u64) -> io::Result<Vec<Extent>> {
        self.block_status_on(self.pick(), offset_sectors, len_sectors).await
    }

    /// [`NbdDevice::block_status`] asked on `connection`.
    async fn block_status_on(
        &self,
        connection: &Connection,
        offset_sectors: u64,
        len_sectors: u64,
    ) -> io::Result<Vec<Extent>> {
        let len_bytes = self.check_sectors(NBD_CMD_BLOCK_STATUS, offset_sectors, len_sectors)?;
        if !self.has_block_status() {
            let what = "base:allocation metadata context";
            return Err(self.refused(
                NBD_CMD_BLOCK_STATUS,
                offset_sectors,
                len_bytes.into(),
                Refusal::NotOffered { what },
            ));
        }
        if len_bytes == 0 {
            return Ok(Vec::new());
        }
        let offset_bytes = offset_sectors * SECTOR_SIZE as u64;
        let ask = len_bytes.min(u64::from(self.no_payload_bytes_max())) as u32;
        let completion = self.submit(connection, NBD_CMD_BLOCK_STATUS, offset_bytes, ask, None, None).await;
        completion.result?;
        let mut extents = Vec::with_capacity(completion.extents.len());
        let mut at = offset_bytes;
        let end = offset_bytes + len_bytes;
        for (extent_bytes, flags) in completion.extents {
            if at >= end || extent_bytes == 0 {
                break;
            }
            let len_bytes = u64::from(extent_bytes).min(end - at);
            extents.push(Extent {
                offset_bytes: at,
                len_bytes,
                hole: flags & NBD_STATE_HOLE != 0,
                zero: flags & NBD_STATE_ZERO != 0,
            });
            at += len_bytes;
        }
        Ok(extents)
    }

    /// Discards `len_sectors` from `offset_sectors` (`NBD_CMD_TRIM`): the bytes read back
    /// as anything afterwards.
    ///
    /// # Errors
    /// The server offers no trim, the export was opened read-only, the range is misaligned or
    /// out of range, or the server's error.
    pub async fn trim(&self, offset_sectors: u64, len_sectors: u64) -> io::Result<()> {
        let len_bytes = self.check_sectors(NBD_CMD_TRIM, offset_sectors, len_sectors)?;
        self.check_writable(NBD_CMD_TRIM, offset_sectors, len_bytes)?;
        if !self.has_trim() {
            let what = "NBD_CMD_TRIM";
            return Err(self.refused(NBD_CMD_TRIM, offset_sectors, len_bytes.into(), Refusal::NotOffered { what }));
        }
        self.no_payload_requests(NBD_CMD_TRIM, 0, offset_sectors * SECTOR_SIZE as u64, len_bytes).await
    }

    /// The server's minimum block size as it stated it (1 when it stated none): the unit of
    /// [`NbdDevice::read_bytes`] and [`NbdDevice::write_bytes`], below the 512-byte sectors
    /// of the geometry.
    pub fn min_block_bytes(&self) -> u32 {
        self.info.block_min_bytes
    }

    /// Reads `len_bytes` from byte `offset_bytes`: any bytes of the export, its partial last
    /// sector included, in multiples of [`NbdDevice::min_block_bytes`], at most
    /// [`NbdDevice::payload_bytes_max`].
    ///
    /// # Errors
    /// Misaligned to the server's minimum block size, past the export's size or too long
    /// (refused, nothing sent), or the request failed.
    pub async fn read_bytes(&self, offset_bytes: u64, len_bytes: usize) -> io::Result<Vec<u8>> {
        self.check_bytes(NBD_CMD_READ, offset_bytes, len_bytes as u64)?;
        if len_bytes == 0 {
            return Ok(Vec::new());
        }
        let buf = ReadBuf::with_capacity(len_bytes);
        let completion = self.submit(self.pick(), NBD_CMD_READ, offset_bytes, len_bytes as u32, None, Some(buf)).await;
        completion.result?;
        Ok(completion.buf.expect("a read's buffer comes back").to_vec())
    }

    /// Writes `data` at byte `offset_bytes`, as [`NbdDevice::read_bytes`] reads.
    ///
    /// # Errors
    /// As [`NbdDevice::read_bytes`], and an export opened read-only.
    pub async fn write_bytes(&self, offset_bytes: u64, data: &[u8]) -> io::Result<()> {
        self.check_bytes(NBD_CMD_WRITE, offset_bytes, data.len() as u64)?;
        if !self.write {
            return Err(self.refused_bytes(NBD_CMD_WRITE, offset_bytes, data.len() as u64, Refusal::ReadOnly));
        }
        if data.is_empty() {
            return Ok(());
        }
        let mut buf = ReadBuf::with_capacity(data.len());
        let mut rest = data;
        for segment in buf.segments_mut() {
            let (part, after) = rest.split_at(segment.len());
            segment.copy_from_slice(part);
            rest = after;
        }
        let payload = buf.freeze();
        self.submit(self.pick(), NBD_CMD_WRITE, offset_bytes, data.len() as u32, Some(payload), None).await.result
    }

    /// Reads up to `len_bytes` from the start of the export once and drops them: what to do
    /// before a long run of requests of up to `len_bytes` in all, so that the server's
    /// request buffers come from memory it keeps (docs/NBD.md, "Warming the server up").
    ///
    /// qemu-nbd allocates each request's buffer aligned (`posix_memalign`); glibc serves
    /// an allocation past its mapping threshold (128 KiB at first) with a fresh `mmap` and
    /// raises the threshold, when one is freed, only to the freed chunk's size, which for an
    /// aligned allocation is less than the next one of the same size asks for. Requests of
    /// one size (any copy's) then take a page fault on every 4 KiB of every request, for
    /// ever; one larger request first lifts the threshold over them. Measured: the target
    /// server's faults per GiB fall from 263,000 to 10,000, its CPU by half (1 MiB writes).
    ///
    /// The read is clipped to one request ([`NbdDevice::payload_bytes_max`]) and to the
    /// export's whole minimum blocks; an empty export reads nothing. Its data is read through
    /// a 64 KiB buffer and dropped: the warm-up costs the client no memory of its length.
    ///
    /// # Errors
    /// The read failed (nothing depends on it: a caller may ignore it).
    pub async fn warm_up(&self, len_bytes: u64) -> io::Result<()> {
        let min = u64::from(self.info.block_min_bytes);
        let len = len_bytes.min(u64::from(self.payload_bytes_max)).min(self.info.size_bytes) / min * min;
        if len == 0 {
            return Ok(());
        }
        self.submit(&self.connections[0], NBD_CMD_READ, 0, len as u32, None, None).await.result
    }

    fn refused_bytes(&self, command: u16, offset_bytes: u64, len_bytes: u64, problem: Refusal) -> io::Error {
        let kind = problem.kind();
        RequestError::Refused {
            server: self.name.clone(),
            command: command_name(command),
            offset_bytes,
            len_bytes,
            problem,
        }
        .into_io(kind)
    }

    /// Checks a byte-granular request: aligned to the server's minimum block size, inside the
    /// export's size, one request long at most.
    fn check_bytes(&self, command: u16, offset_bytes: u64, len_bytes: u64) -> io::Result<()> {
        let min_bytes = self.info.block_min_bytes;
        let min = u64::from(min_bytes);
        let problem = if offset_bytes % min != 0 || len_bytes % min != 0 {
            Refusal::MinimumBlock { min_bytes }
        } else if offset_bytes.checked_add(len_bytes).is_none_or(|end| end > self.info.size_bytes) {
            Refusal::PastTheExport { size_bytes: self.info.size_bytes }
        } else if len_bytes > u64::from(self.payload_bytes_max) {
            Refusal::TooLong { bytes_max: self.payload_bytes_max }
        } else {
            return Ok(());
        };
        Err(self.refused_bytes(command, offset_bytes, len_bytes, problem))
    }

    /// The connection for the next request: round robin.
    fn pick(&self) -> &Connection {
        &self.connections[self.next_connection.fetch_add(1, Ordering::Relaxed) % self.connections.len()]
    }

    fn no_payload_bytes_max(&self) -> u32 {
        let block = self.geometry.logical_block_size;
        NO_PAYLOAD_BYTES_MAX / block * block
    }

    async fn submit(
        &self,
        connection: &Connection,
        command: u16,
        offset_bytes: u64,
        len_bytes: u32,
        payload: Option<WriteBuf>,
        buf: Option<ReadBuf>,
    ) -> Completion {
        let (reply, completion) = oneshot::channel();
        connection.send(Request { command, flags: 0, offset_bytes, len_bytes, payload, buf, reply });
        completion.await.expect(CONNECTION_REPLIES)
    }

    /// One request without payload (write-zeroes, trim) with `flags` (`NBD_CMD_FLAG_*`).
    async fn submit_no_payload(
        &self,
        connection: &Connection,
        command: u16,
        flags: u16,
        offset_bytes: u64,
        len_bytes: u32,
    ) -> io::Result<()> {
        let (reply, completion) = oneshot::channel();
        connection.send(Request { command, flags, offset_bytes, len_bytes, payload: None, buf: None, reply });
        completion.await.expect(CONNECTION_REPLIES).result
    }

    /// Requests without payload (write-zeroes, trim) with `flags` over a range, in pieces, all
    /// in flight.
    async fn no_payload_requests(&self, command: u16, flags: u16, offset_bytes: u64, len_bytes: u64) -> io::Result<()> {
        let pieces = self
            .no_payload_pieces(offset_bytes, len_bytes)
            .map(|(at, len)| self.submit_no_payload(self.pick(), command, flags, at, len));
        join_all(pieces).await.into_iter().collect()
    }

    /// `(offset_bytes, len_bytes)` of the pieces a request without payload over `len_bytes`
    /// from `offset_bytes` is sent in: at most [`NO_PAYLOAD_BYTES_MAX`] each, whole blocks.
    fn no_payload_pieces(&self, offset_bytes: u64, len_bytes: u64) -> impl Iterator<Item = (u64, u32)> + use<> {
        let piece_bytes = u64::from(self.no_payload_bytes_max());
        (0..len_bytes.div_ceil(piece_bytes)).map(move |i| {
            let at = i * piece_bytes;
            (offset_bytes + at, (len_bytes - at).min(piece_bytes) as u32)
        })
    }

    fn refused(&self, command: u16, offset_sectors: u64, len_bytes: u128, problem: Refusal) -> io::Error {
        let offset_bytes = u64::try_from(sectors_to_bytes(offset_sectors)).unwrap_or(u64::MAX);
        let len_bytes = u64::try_from(len_bytes).unwrap_or(u64::MAX);
        self.refused_bytes(command, offset_bytes, len_bytes, problem)
    }

    /// Checks `len_bytes` at `offset_sectors` by the rules every device shares
    /// ([`Geometry::check_request`]): whole logical blocks, inside the export.
    fn check(&self, command: u16, offset_sectors: u64, len_bytes: u128) -> io::Result<()> {
        match self.geometry.check_request(offset_sectors, len_bytes) {
            Ok(_) => Ok(()),
            Err(refused) => Err(self.refused(command, offset_sectors, len_bytes, Refusal::Geometry(refused))),
        }
    }

    /// [`NbdDevice::check`] for a request counted in sectors; returns its length in bytes.
    fn check_sectors(&self, command: u16, offset_sectors: u64, len_sectors: u64) -> io::Result<u64> {
        let len_bytes = sectors_to_bytes(len_sectors);
        self.check(command, offset_sectors, len_bytes)?;
        // Inside the export, whose size is a u64 of bytes.
        Ok(u64::try_from(len_bytes).expect("inside the export"))
    }

    fn check_writable(&self, command: u16, offset_sectors: u64, len_bytes: u64) -> io::Result<()> {
        if self.write {
            return Ok(());
        }
        Err(self.refused(command, offset_sectors, u128::from(len_bytes), Refusal::ReadOnly))
    }

    async fn read_whole(&self, offset_sectors: u64, mut buf: ReadBuf) -> (ReadBuf, io::Result<()>) {
        let whole = buf.window();
        if let Err(error) = self.check(NBD_CMD_READ, offset_sectors, whole.len() as u128) {
            return (buf, Err(error));
        }
        let offset_bytes = offset_sectors * SECTOR_SIZE as u64;
        let piece_bytes = self.payload_bytes_max as usize;
        let mut at = 0;
        while at < whole.len() {
            let len = (whole.len() - at).min(piece_bytes);
            buf.set_window(whole.start + at..whole.start + at + len);
            let completion =
                self.submit(self.pick(), NBD_CMD_READ, offset_bytes + at as u64, len as u32, None, Some(buf)).await;
            buf = completion.buf.expect("a read's buffer comes back");
            if let Err(error) = completion.result {
                buf.set_window(whole);
                return (buf, Err(error));
            }
            at += len;
        }
        buf.set_window(whole);
        (buf, Ok(()))
    }

    async fn write_whole(&self, offset_sectors: u64, data: WriteBuf) -> io::Result<()> {
        let len_bytes = data.len() as u64;
        self.check(NBD_CMD_WRITE, offset_sectors, len_bytes.into())?;
        self.check_writable(NBD_CMD_WRITE, offset_sectors, len_bytes)?;
        let offset_bytes = offset_sectors * SECTOR_SIZE as u64;
        let piece_bytes = self.payload_bytes_max as usize;
        let pieces = (0..data.len().div_ceil(piece_bytes)).map(|i| {
            let at = i * piece_bytes;
            let piece = data.slice(at..(at + piece_bytes).min(data.len()));
            let len = piece.len() as u32;
            self.submit(self.pick(), NBD_CMD_WRITE, offset_bytes + at as u64, len, Some(piece), None)
        });
        join_all(pieces).await.into_iter().try_for_each(|c| c.result)
    }

    async fn write_zeroes_whole(&self, offset_sectors: u64, len_sectors: u64) -> io::Result<()> {
        let len_bytes = self.check_sectors(NBD_CMD_WRITE_ZEROES, offset_sectors, len_sectors)?;
        self.check_writable(NBD_CMD_WRITE_ZEROES, offset_sectors, len_bytes)?;
        let offset_bytes = offset_sectors * SECTOR_SIZE as u64;
        if self.geometry.write_zeroes {
            // NO_HOLE: the range stays allocated, as a file's FALLOC_FL_ZERO_RANGE leaves it;
            // releasing storage is `deallocate`'s business.
            let flags = NBD_CMD_FLAG_NO_HOLE;
            return self.no_payload_requests(NBD_CMD_WRITE_ZEROES, flags, offset_bytes, len_bytes).await;
        }
        // No offload: plain writes from the shared zero block.
        let piece_bytes = u64::from(self.payload_bytes_max.min(ZEROES_PIECE_BYTES_MAX));
        let starts: Vec<u64> = (0..len_bytes.div_ceil(piece_bytes)).map(|i| i * piece_bytes).collect();
        for batch in starts.chunks(ZEROES_PIECES_IN_FLIGHT) {
            let pieces = batch.iter().map(|&at| {
                let len = (len_bytes - at).min(piece_bytes) as usize;
                self.submit(
                    self.pick(),
                    NBD_CMD_WRITE,
                    offset_bytes + at,
                    len as u32,
                    Some(WriteBuf::zeroes(len)),
                    None,
                )
            });
            join_all(pieces).await.into_iter().try_for_each(|c| c.result)?;
        }
        Ok(())
    }

    /// The sectors that do not read as zeroes, from `base:allocation` asked on `connection`
    /// (`NBD_STATE_ZERO` runs are left out, holes or not); everything when the server offers
    /// no block status. Unaligned extent edges are rounded outwards: over-reporting data is
    /// allowed.
    async fn allocated_on(
        &self,
        connection: &Connection,
        offset_sectors: u64,
        len_sectors: u64,
    ) -> io::Result<RangeSet> {
        let end = offset_sectors.saturating_add(len_sectors);
        if !self.has_block_status() || len_sectors == 0 {
            return Ok(RangeSet::from_range(offset_sectors..end));
        }
        let block_sectors = self.geometry.block_sectors();
        let sector = SECTOR_SIZE as u64;
        let mut data = RangeSet::new();
        let mut at = offset_sectors;
        while at < end {
            let extents = self.block_status_on(connection, at, end - at).await?;
            for extent in &extents {
                if !extent.zero {
                    let extent_end = (extent.offset_bytes + extent.len_bytes).div_ceil(sector);
                    data.insert(extent.offset_bytes / sector..extent_end.min(end));
                }
            }
            let answered = extents.last().map_or(at, |e| (e.offset_bytes + e.len_bytes) / sector);
            let next = answered / block_sectors * block_sectors;
            if next <= at {
                // No progress (an empty or sub-block answer): call the rest data.
                data.insert(at..end);
                break;
            }
            at = next;
        }
        Ok(data)
    }

    /// How [`BlockDevice::deallocate`] is done on this server.
    fn deallocation(&self) -> Deallocation {
        if !self.has_trim() {
            Deallocation::WriteZeroes
        } else if self.geometry.write_zeroes {
            Deallocation::WriteZeroesMayPunch
        } else if self.has_block_status() {
            Deallocation::TrimThenCheck
        } else {
            Deallocation::WriteZeroes
        }
    }

    /// Makes the range read as zeroes, releasing its storage where the server can
    /// ([`NbdDevice::deallocation`]).
    async fn deallocate_whole(&self, offset_sectors: u64, len_sectors: u64) -> io::Result<()> {
        let command = match self.deallocation() {
            Deallocation::WriteZeroes => return self.write_zeroes_whole(offset_sectors, len_sectors).await,
            Deallocation::WriteZeroesMayPunch => NBD_CMD_WRITE_ZEROES,
            Deallocation::TrimThenCheck => NBD_CMD_TRIM,
        };
        let len_bytes = self.check_sectors(command, offset_sectors, len_sectors)?;
        self.check_writable(command, offset_sectors, len_bytes)?;
        let offset_bytes = offset_sectors * SECTOR_SIZE as u64;
        if command == NBD_CMD_WRITE_ZEROES {
            // Without NBD_CMD_FLAG_NO_HOLE: the server may punch a hole, and must read zeroes.
            return self.no_payload_requests(NBD_CMD_WRITE_ZEROES, 0, offset_bytes, len_bytes).await;
        }
        let pieces = self.no_payload_pieces(offset_bytes, len_bytes).map(|(at, len)| self.trim_then_zero(at, len));
        join_all(pieces).await.into_iter().collect()
    }

    /// Trims `len_bytes` from `offset_bytes`, asks on the same connection (which has answered
    /// the trim, so its block status sees it) what does not read as zeroes now, and writes
    /// zeroes there: a trim the server ignored, in part or whole, leaves no old bytes behind.
    /// A trim or a block status that fails zeroes the whole piece.
    async fn trim_then_zero(&self, offset_bytes: u64, len_bytes: u32) -> io::Result<()> {
        let connection = self.pick();
        let sector = SECTOR_SIZE as u64;
        let sectors = offset_bytes / sector..(offset_bytes + u64::from(len_bytes)) / sector;
        let whole = || RangeSet::from_range(sectors.clone());
        let not_zero = match self.submit_no_payload(connection, NBD_CMD_TRIM, 0, offset_bytes, len_bytes).await {
            Ok(()) => self
                .allocated_on(connection, sectors.start, sectors.end - sectors.start)
                .await
                .unwrap_or_else(|_| whole()),
            Err(_) => whole(),
        };
        // Extents may end inside a logical block: zero whole blocks, inside the piece.
        let block_sectors = self.geometry.block_sectors();
        let mut blocks = RangeSet::new();
        for range in not_zero.ranges() {
            let start = (range.start / block_sectors * block_sectors).max(sectors.start);
            let end = range.end.div_ceil(block_sectors).saturating_mul(block_sectors).min(sectors.end);
            blocks.insert(start..end);
        }
        for range in blocks.ranges() {
            self.write_zeroes_whole(range.start, range.end - range.start).await?;
        }
        Ok(())
    }

    async fn flush_all(&self) -> io::Result<()> {
        if !self.info.has(NBD_FLAG_SEND_FLUSH) {
            // The server does not take NBD_CMD_FLUSH: it has nothing to flush.
            return Ok(());
        }
        let flushes = self.connections.iter().map(|c| self.submit(c, NBD_CMD_FLUSH, 0, 0, None, None));
        join_all(flushes).await.into_iter().try_for_each(|c| c.result)
    }
}

impl BlockDevice for NbdDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn id(&self) -> DeviceId {
        self.id
    }

    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn read(&self, offset_sectors: u64, buf: ReadBuf) -> IoFuture<'_, (ReadBuf, io::Result<()>)> {
        Box::pin(self.read_whole(offset_sectors, buf))
    }

    fn write(&self, offset_sectors: u64, buf: WriteBuf) -> IoFuture<'_, io::Result<()>> {
        Box::pin(self.write_whole(offset_sectors, buf))
    }

    fn write_zeroes(&self, offset_sectors: u64, len_sectors: u64) -> IoFuture<'_, io::Result<()>> {
        Box::pin(self.write_zeroes_whole(offset_sectors, len_sectors))
    }

    fn flush(&self) -> IoFuture<'_, io::Result<()>> {
        Box::pin(self.flush_all())
    }

    fn allocated(&self, offset_sectors: u64, len_sectors: u64) -> IoFuture<'_, io::Result<RangeSet>> {
        Box::pin(self.allocated_on(self.pick(), offset_sectors, len_sectors))
    }

    /// Whether the server can release storage with a promise of zeroes: it takes
    /// `NBD_CMD_TRIM`, and either `NBD_CMD_WRITE_ZEROES` or block status to check a trim by
    /// (docs/NBD.md, "Sparse targets").
    fn deallocates(&self) -> bool {
        self.deallocation() != Deallocation::WriteZeroes
    }

    fn deallocate(&self, offset_sectors: u64, len_sectors: u64) -> IoFuture<'_, io::Result<()>> {
        Box::pin(self.deallocate_whole(offset_sectors, len_sectors))
    }
}

/// How long a further connection's connect and handshake may take: the server answered the
/// first in `first`, so one that has not answered in ten times that (at least
/// [`FURTHER_CONNECT_TIMEOUT_MS_MIN`], at most `connect_timeout`) is taken as refused, as
/// qemu-nbd leaves a connection past its `-e` limit waiting, unanswered, in its listen queue.
///
/// Worked example: a 3 ms first handshake, a 30 s connect timeout: 1 s (the floor).
fn further_connect_timeout(connect_timeout: Duration, first: Duration) -> Duration {
    first.saturating_mul(10).max(Duration::from_millis(FURTHER_CONNECT_TIMEOUT_MS_MIN)).min(connect_timeout)
}

/// The geometry an export's handshake gives, and the largest payload of one request: blocks
/// of the server's minimum block size (at least 512 bytes), the size in whole blocks.
///
/// Worked example: 1,000 bytes, minimum block 1: 512-byte blocks, one of them (the 488 bytes
/// after it are reached with [`NbdDevice::read_bytes`] and [`NbdDevice::write_bytes`]).
fn geometry_of(uri: &str, info: &ExportInfo) -> Result<(Geometry, u32), ConnectError> {
    let unusable = |problem: String| Err(ConnectError::Geometry { server: uri.to_owned(), problem });
    let block_bytes = info.block_min_bytes.max(SECTOR_SIZE as u32);
    if !block_bytes.is_power_of_two() || block_bytes > LOGICAL_BLOCK_BYTES_MAX {
        return unusable(format!(
            "minimum block size {} (must be a power of two up to {LOGICAL_BLOCK_BYTES_MAX})",
            info.block_min_bytes
        ));
    }
    if info.size_bytes > EXPORT_BYTES_MAX {
        return unusable(format!("an export of {} bytes (more than {EXPORT_BYTES_MAX})", info.size_bytes));
    }
    let payload_bytes_max = info.block_max_bytes.min(PAYLOAD_BYTES_DEFAULT_MAX) / block_bytes * block_bytes;
    if payload_bytes_max == 0 {
        return unusable(format!(
            "maximum block size {} is less than the {block_bytes}-byte block",
            info.block_max_bytes
        ));
    }
    let len_sectors = info.size_bytes / u64::from(block_bytes) * u64::from(block_bytes) / SECTOR_SIZE as u64;
    let geometry = Geometry::new(len_sectors, block_bytes).with_write_zeroes(info.has(NBD_FLAG_SEND_WRITE_ZEROES));
    Ok((geometry, payload_bytes_max))
}

/// How a further connection's export differs from the first's: size, flags, block sizes,
/// structured replies or block status (the context's id may differ: each connection checks
/// its own).
fn differences(first: &ExportInfo, other: &ExportInfo) -> Option<String> {
    let facts = |info: &ExportInfo| {
        format!(
            "{} bytes, flags {:#x}, block sizes {}/{}/{}, structured replies {}, block status {}",
            info.size_bytes,
            info.transmission_flags,
            info.block_min_bytes,
            info.block_preferred_bytes,
            info.block_max_bytes,
            info.structured,
            info.base_allocation.is_some()
        )
    };
    let (mine, theirs) = (facts(other), facts(first));
    (mine != theirs).then(|| format!("{mine}; the first saw {theirs}"))
}

/// A stable hash of `value` (fixed keys: the same in every process).
fn hash(value: &impl Hash) -> u64 {
    let mut hasher = DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn further_connections_wait_ten_first_handshakes_at_least_a_second_at_most_the_timeout() {
        let (ms, timeout) = (Duration::from_millis, Duration::from_secs(30));
        assert_eq!(further_connect_timeout(timeout, ms(3)), ms(FURTHER_CONNECT_TIMEOUT_MS_MIN));
        assert_eq!(further_connect_timeout(timeout, ms(250)), ms(2500));
        assert_eq!(further_connect_timeout(timeout, ms(20_000)), timeout);
        assert_eq!(further_connect_timeout(ms(500), ms(3)), ms(500), "never past --connect-timeout");
        assert_eq!(further_connect_timeout(timeout, Duration::MAX), timeout);
    }
}
