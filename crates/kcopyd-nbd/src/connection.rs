//! One connection to the server: a task on a [`Reactor`] thread, with a writer that
//! sends requests as they come and a reader that matches replies to them by cookie, so that
//! any number of requests are in flight at once and replies may come in any order.
//!
//! ```text
//!  NbdDevice (any thread, any runtime)          connection task on the reactor ("kcopyd-nbd")
//!    request ── unbounded channel ──────────►  writer: cookie, into `inflight`, header [+ data]
//!       ▲                                      reader: reply header ─► cookie ─► Pending
//!       └──────── oneshot: Completion ◄──────────── (read data lands in the caller's ReadBuf)
//!
//!  connection lost (EOF, socket error, protocol violation): `lose` drains `inflight`; every
//!  Pending completes with RequestError::ConnectionLost, and so does every later request.
//! ```
//!
//! A [`Pending`] completes exactly once: by its reply, or, if it is dropped first (the
//! connection lost, the reader cancelled while filling it), by `Drop` with the loss.
//!
//! The reactor exists because the engine polls devices' futures only while it has work of
//! its own: a connection's reader must run whether or not anybody is polling, or the
//! server's replies would stall behind an idle caller.

use std::collections::HashMap;
use std::io::{self, IoSlice};
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use kcopyd_core::{ReadBuf, WriteBuf};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, oneshot, watch};

use crate::error::{ConnectError, RequestError};
use crate::handshake::{ExportInfo, handshake};
use crate::proto::*;
use crate::reactor::Reactor;
use crate::uri::Address;

/// Bytes of request headers gathered before they are written: headers without data (reads,
/// flushes, …) queued together go out in one write, or in front of the next write's data in
/// the same vectored write. A write's data never passes through a buffer of this client.
const HEADER_BUFFER_BYTES: usize = 64 * 1024;
/// Bytes of the handshake's write buffer (options are small).
const HANDSHAKE_BUFFER_BYTES: usize = 4096;
/// Bytes of the socket read buffer: several reply headers come in one read, while a read
/// reply's data mostly goes straight from the socket into the page buffer (what the buffer
/// has taken in past a header is copied once more: a 256 KiB buffer would take up to a
/// quarter of each 1 MiB reply through that extra copy).
const READ_BUFFER_BYTES: usize = 16 * 1024;

type Reader = BufReader<Box<dyn AsyncRead + Unpin + Send>>;
type Writer = Box<dyn AsyncWrite + Unpin + Send>;

/// One request, as the device hands it to the connection.
#[derive(Debug)]
pub(crate) struct Request {
    /// `NBD_CMD_*`.
    pub command: u16,
    /// First byte.
    pub offset_bytes: u64,
    /// Bytes (the payload's length for writes).
    pub len_bytes: u32,
    /// The data of a write.
    pub payload: Option<WriteBuf>,
    /// The buffer a read fills (its window).
    pub buf: Option<ReadBuf>,
    /// Where the completion goes.
    pub reply: oneshot::Sender<Completion>,
}

/// How a request ended.
#[derive(Debug)]
pub(crate) struct Completion {
    /// A read's buffer, back.
    pub buf: Option<ReadBuf>,
    /// The outcome; errors hold a [`RequestError`].
    pub result: io::Result<()>,
    /// `base:allocation` descriptors of a block-status request: (length in bytes, flags).
    pub extents: Vec<(u32, u32)>,
}

/// A request on the wire, waiting for its reply.
#[derive(Debug)]
struct Pending {
    command: u16,
    offset_bytes: u64,
    len_bytes: u32,
    /// A read's buffer and the window the request fills.
    buf: Option<ReadBuf>,
    window: Range<usize>,
    reply: Option<oneshot::Sender<Completion>>,
    /// The first error chunk of a structured reply.
    error: Option<io::Error>,
    /// Bytes of a structured read reply's data and hole chunks so far.
    covered_bytes: u64,
    extents: Vec<(u32, u32)>,
    server: Arc<str>,
    /// Why the connection ended, when it did with this request unanswered.
    lost: Option<String>,
}

impl Pending {
    fn complete(mut self, result: io::Result<()>) {
        let reply = self.reply.take().expect("a pending request completes once");
        let extents = std::mem::take(&mut self.extents);
        // The caller may have stopped waiting (its future dropped): nothing to tell then.
        let _ = reply.send(Completion { buf: self.buf.take(), result, extents });
    }

    /// Completes with the connection's loss, for `reason`.
    fn fail_lost(mut self, reason: String) {
        self.lost = Some(reason);
        // `Drop` reports it.
    }

    fn server_error(&self, errno: u32, message: String) -> io::Error {
        RequestError::Server {
            server: self.server.to_string(),
            command: command_name(self.command),
            offset_bytes: self.offset_bytes,
            len_bytes: u64::from(self.len_bytes),
            errno: i32::try_from(errno).unwrap_or(i32::MAX),
            message,
        }
        .server_io()
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(reply) = self.reply.take() {
            let reason = self.lost.take().unwrap_or_else(|| "the connection closed".to_owned());
            let error = lost_error(&self.server, self.command, self.offset_bytes, u64::from(self.len_bytes), reason);
            let _ = reply.send(Completion { buf: self.buf.take(), result: Err(error), extents: Vec::new() });
        }
    }
}

fn lost_error(server: &str, command: u16, offset_bytes: u64, len_bytes: u64, reason: String) -> io::Error {
    RequestError::ConnectionLost {
        server: server.to_owned(),
        command: command_name(command),
        offset_bytes,
        len_bytes,
        reason,
    }
    .into_io(io::ErrorKind::ConnectionAborted)
}

/// What the writer and the reader share.
#[derive(Debug)]
struct Shared {
    server: Arc<str>,
    state: Mutex<State>,
    /// Turns true when the connection is lost: cancels the reader.
    lost_tx: watch::Sender<bool>,
}

#[derive(Debug, Default)]
struct State {
    inflight: HashMap<u64, Pending>,
    lost: Option<String>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves a consistent map: take it over.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Marks the connection lost (the first reason sticks) and fails every request in flight.
    fn lose(&self, reason: String) {
        let (reason, drained) = {
            let mut state = self.lock();
            let reason = state.lost.get_or_insert(reason).clone();
            (reason, std::mem::take(&mut state.inflight))
        };
        self.lost_tx.send_replace(true);
        for pending in drained.into_values() {
            pending.fail_lost(reason.clone());
        }
    }

    fn take(&self, cookie: u64) -> Option<Pending> {
        self.lock().inflight.remove(&cookie)
    }
}

/// The caller's side of a connection: where requests go.
#[derive(Debug)]
pub(crate) struct Connection {
    requests: mpsc::UnboundedSender<Request>,
    server: Arc<str>,
}

impl Connection {
    /// Connects to `address`, runs the handshake for `export` and starts serving requests, all
    /// in a task on `reactor`. `server` names the URI in errors.
    pub(crate) fn open(
        reactor: &Reactor,
        address: &Address,
        export: &str,
        server: Arc<str>,
        timeout: Duration,
    ) -> Result<(Connection, ExportInfo), ConnectError> {
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let (address, export, task_server) = (address.clone(), export.to_owned(), server.clone());
        reactor.spawn(async move {
            let server = task_server;
            let opened = match tokio::time::timeout(timeout, open_stream(&address, &export, &server)).await {
                Ok(opened) => opened,
                Err(_) => Err(ConnectError::Connect {
                    server: server.to_string(),
                    source: io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no answer within {} ms", timeout.as_millis()),
                    ),
                }),
            };
            match opened {
                Err(error) => {
                    let _ = ready_tx.send(Err(error));
                }
                Ok((reader, writer, info)) => {
                    let (requests, receiver) = mpsc::unbounded_channel();
                    let connection = Connection { requests, server: server.clone() };
                    if ready_tx.send(Ok((connection, info))).is_ok() {
                        serve(reader, writer, receiver, server).await;
                    }
                }
            }
        });
        // The reactor's thread is never this one: it runs nothing but connections.
        ready_rx.recv().unwrap_or_else(|_| {
            Err(ConnectError::Thread {
                server: server.to_string(),
                source: io::Error::other("the reactor's thread ended early"),
            })
        })
    }

    /// Sends `request`; its completion comes on the oneshot it carries. A connection whose
    /// thread is gone fails it at once.
    pub(crate) fn send(&self, request: Request) {
        if let Err(mpsc::error::SendError(request)) = self.requests.send(request) {
            // The connection's task ended (only a panic ends it while the device lives).
            let Request { command, offset_bytes, len_bytes, buf, reply, .. } = request;
            let reason = "the connection's task ended".to_owned();
            let error = lost_error(&self.server, command, offset_bytes, u64::from(len_bytes), reason);
            let _ = reply.send(Completion { buf, result: Err(error), extents: Vec::new() });
        }
    }
}

/// Connects and runs the handshake.
async fn open_stream(
    address: &Address,
    export: &str,
    server: &str,
) -> Result<(Reader, Writer, ExportInfo), ConnectError> {
    let connect = |source| ConnectError::Connect { server: server.to_owned(), source };
    let (read_half, write_half): (Box<dyn AsyncRead + Unpin + Send>, Box<dyn AsyncWrite + Unpin + Send>) = match address
    {
        Address::Tcp { host, port } => {
            let stream = tokio::net::TcpStream::connect((host.as_str(), *port)).await.map_err(connect)?;
            stream.set_nodelay(true).map_err(connect)?;
            let (read_half, write_half) = stream.into_split();
            (Box::new(read_half), Box::new(write_half))
        }
        Address::Unix(path) => {
            let stream = tokio::net::UnixStream::connect(path).await.map_err(connect)?;
            let (read_half, write_half) = stream.into_split();
            (Box::new(read_half), Box::new(write_half))
        }
    };
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, read_half);
    let mut writer = BufWriter::with_capacity(HANDSHAKE_BUFFER_BYTES, write_half);
    let info = handshake(&mut reader, &mut writer, export, server).await?;
    // The handshake waits for the server's answer to everything it sends: nothing is left.
    assert!(writer.buffer().is_empty(), "the handshake flushes what it writes");
    Ok((reader, writer.into_inner(), info))
}

/// Runs the transmission phase until the device is dropped.
async fn serve(reader: Reader, writer: Writer, requests: mpsc::UnboundedReceiver<Request>, server: Arc<str>) {
    let (lost_tx, mut lost_rx) = watch::channel(false);
    let shared = Shared { server, state: Mutex::new(State::default()), lost_tx };
    let reading = async {
        tokio::select! {
            reason = read_replies(reader, &shared) => shared.lose(reason),
            _ = lost_rx.wait_for(|lost| *lost) => {}
        }
    };
    let writing = async {
        write_requests(writer, requests, &shared).await;
        shared.lose("the device was closed".into());
    };
    tokio::join!(reading, writing);
}

/// Sends requests as they come, writing the gathered headers whenever no more are queued;
/// ends (with `NBD_CMD_DISC`) when the device is dropped.
async fn write_requests(mut writer: Writer, mut requests: mpsc::UnboundedReceiver<Request>, shared: &Shared) {
    let mut cookie = 0u64;
    let mut headers = Vec::with_capacity(HEADER_BUFFER_BYTES);
    while let Some(first) = requests.recv().await {
        let mut next = Some(first);
        while let Some(request) = next {
            cookie += 1;
            if let Err(error) = write_request(&mut writer, &mut headers, request, cookie, shared).await {
                shared.lose(format!("sending a request: {error}"));
            }
            next = requests.try_recv().ok();
        }
        if shared.lock().lost.is_none() && !headers.is_empty() {
            if let Err(error) = writer.write_all(&headers).await {
                shared.lose(format!("sending requests: {error}"));
            }
        }
        headers.clear();
    }
    if shared.lock().lost.is_none() {
        let header = request_header(0, NBD_CMD_DISC, 0, 0, 0);
        // The server closes the connection on NBD_CMD_DISC; a failure here changes nothing.
        let _ = writer.write_all(&header).await;
        let _ = writer.shutdown().await;
    }
}

/// Records `request` as in flight and adds its header to `headers`; a write's data goes out
/// at once, behind the headers gathered so far. A lost connection fails the request instead.
async fn write_request(
    writer: &mut Writer,
    headers: &mut Vec<u8>,
    request: Request,
    cookie: u64,
    shared: &Shared,
) -> io::Result<()> {
    let Request { command, offset_bytes, len_bytes, payload, buf, reply } = request;
    let window = buf.as_ref().map(ReadBuf::window).unwrap_or(0..0);
    let pending = Pending {
        command,
        offset_bytes,
        len_bytes,
        buf,
        window,
        reply: Some(reply),
        error: None,
        covered_bytes: 0,
        extents: Vec::new(),
        server: shared.server.clone(),
        lost: None,
    };
    {
        let mut state = shared.lock();
        if let Some(reason) = &state.lost {
            let reason = reason.clone();
            drop(state);
            pending.fail_lost(reason);
            return Ok(());
        }
        state.inflight.insert(cookie, pending);
    }
    headers.extend_from_slice(&request_header(0, command, cookie, offset_bytes, len_bytes));
    match payload {
        // Headers and data in one vectored write, straight from the page buffer to the
        // socket, in as few system calls as it takes.
        Some(payload) => {
            let mut parts: Vec<IoSlice<'_>> = Vec::with_capacity(1 + payload.segments().len());
            parts.push(IoSlice::new(headers));
            parts.extend(payload.segments().iter().map(|segment| IoSlice::new(segment)));
            let written = write_all_vectored(writer, &mut parts).await;
            headers.clear();
            written
        }
        None if headers.len() >= HEADER_BUFFER_BYTES => {
            let written = writer.write_all(headers).await;
            headers.clear();
            written
        }
        None => Ok(()),
    }
}

/// Writes every byte of `parts`, as few calls as the socket takes.
async fn write_all_vectored(writer: &mut Writer, mut parts: &mut [IoSlice<'_>]) -> io::Result<()> {
    while !parts.is_empty() {
        let written = writer.write_vectored(parts).await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut parts, written);
    }
    Ok(())
}

/// Reads replies until the connection fails; returns why.
async fn read_replies(mut reader: Reader, shared: &Shared) -> String {
    loop {
        let magic = match reader.read_u32().await {
            Ok(magic) => magic,
            Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => {
                return "the server closed the connection".into();
            }
            Err(error) => return format!("reading a reply: {error}"),
        };
        let result = match magic {
            NBD_SIMPLE_REPLY_MAGIC => simple_reply(&mut reader, shared).await,
            NBD_STRUCTURED_REPLY_MAGIC => structured_chunk(&mut reader, shared).await,
            _ => Err(format!("a reply with magic {magic:#010x}: protocol violation")),
        };
        if let Err(reason) = result {
            return reason;
        }
    }
}

fn io_reason(error: io::Error) -> String {
    match error.kind() {
        io::ErrorKind::UnexpectedEof => "the server closed the connection in the middle of a reply".into(),
        _ => format!("reading a reply: {error}"),
    }
}

/// A simple reply: error, cookie, and a successful read's data.
async fn simple_reply(reader: &mut Reader, shared: &Shared) -> Result<(), String> {
    let errno = reader.read_u32().await.map_err(io_reason)?;
    let cookie = reader.read_u64().await.map_err(io_reason)?;
    let mut pending = shared.take(cookie).ok_or_else(|| format!("a reply to unknown cookie {cookie}"))?;
    if errno != 0 {
        let error = pending.server_error(errno, String::new());
        pending.complete(Err(error));
        return Ok(());
    }
    if pending.command == NBD_CMD_READ {
        let window = pending.window.clone();
        let buf = pending.buf.as_mut().expect("a read carries its buffer");
        if let Err(error) = read_into(reader, buf, window).await {
            let reason = io_reason(error);
            pending.lost = Some(reason.clone());
            return Err(reason);
        }
    }
    pending.complete(Ok(()));
    Ok(())
}

/// One chunk of a structured reply; the last (`NBD_REPLY_FLAG_DONE`) completes the request.
async fn structured_chunk(reader: &mut Reader, shared: &Shared) -> Result<(), String> {
    let flags = reader.read_u16().await.map_err(io_reason)?;
    let chunk_type = reader.read_u16().await.map_err(io_reason)?;
    let cookie = reader.read_u64().await.map_err(io_reason)?;
    let len_bytes = reader.read_u32().await.map_err(io_reason)?;
    let mut pending = shared.take(cookie).ok_or_else(|| format!("a reply chunk to unknown cookie {cookie}"))?;
    if let Err(reason) = chunk_payload(reader, &mut pending, chunk_type, len_bytes).await {
        pending.lost = Some(reason.clone());
        return Err(reason);
    }
    if flags & NBD_REPLY_FLAG_DONE != 0 {
        let result = match pending.error.take() {
            Some(error) => Err(error),
            // A successful read covers its whole range (chunks never overlap).
            None if pending.command == NBD_CMD_READ && pending.covered_bytes != u64::from(pending.len_bytes) => {
                let reason = format!(
                    "a successful structured read reply covered {} of {} bytes: protocol violation",
                    pending.covered_bytes, pending.len_bytes
                );
                pending.lost = Some(reason.clone());
                return Err(reason);
            }
            None => Ok(()),
        };
        pending.complete(result);
    } else {
        shared.lock().inflight.insert(cookie, pending);
    }
    Ok(())
}

async fn chunk_payload(
    reader: &mut Reader,
    pending: &mut Pending,
    chunk_type: u16,
    len_bytes: u32,
) -> Result<(), String> {
    let request = pending.offset_bytes..pending.offset_bytes + u64::from(pending.len_bytes);
    match chunk_type {
        NBD_REPLY_TYPE_NONE if len_bytes == 0 => Ok(()),
        NBD_REPLY_TYPE_OFFSET_DATA if pending.command == NBD_CMD_READ && len_bytes >= 8 => {
            let offset = reader.read_u64().await.map_err(io_reason)?;
            let data = window_of(&request, offset, u64::from(len_bytes - 8), pending)?;
            pending.covered_bytes += data.len() as u64;
            let buf = pending.buf.as_mut().expect("a read carries its buffer");
            read_into(reader, buf, data).await.map_err(io_reason)
        }
        NBD_REPLY_TYPE_OFFSET_HOLE if pending.command == NBD_CMD_READ && len_bytes == 12 => {
            let offset = reader.read_u64().await.map_err(io_reason)?;
            let hole_bytes = reader.read_u32().await.map_err(io_reason)?;
            let hole = window_of(&request, offset, u64::from(hole_bytes), pending)?;
            pending.covered_bytes += hole.len() as u64;
            let buf = pending.buf.as_mut().expect("a read carries its buffer");
            let saved = buf.window();
            buf.set_window(hole);
            buf.fill(0);
            buf.set_window(saved);
            Ok(())
        }
        NBD_REPLY_TYPE_BLOCK_STATUS
            if pending.command == NBD_CMD_BLOCK_STATUS && len_bytes >= 4 && (len_bytes - 4) % 8 == 0 =>
        {
            if len_bytes > CHUNK_BYTES_MAX {
                return Err(format!("a block-status chunk of {len_bytes} bytes"));
            }
            let _context_id = reader.read_u32().await.map_err(io_reason)?;
            for _ in 0..(len_bytes - 4) / 8 {
                let extent_bytes = reader.read_u32().await.map_err(io_reason)?;
                let flags = reader.read_u32().await.map_err(io_reason)?;
                pending.extents.push((extent_bytes, flags));
            }
            Ok(())
        }
        _ if is_reply_error(chunk_type) && len_bytes >= 6 => {
            if len_bytes > CHUNK_BYTES_MAX {
                return Err(format!("an error chunk of {len_bytes} bytes"));
            }
            let mut payload = vec![0u8; len_bytes as usize];
            reader.read_exact(&mut payload).await.map_err(io_reason)?;
            let errno = u32::from_be_bytes(payload[0..4].try_into().expect("4 bytes"));
            let message_len = usize::from(u16::from_be_bytes([payload[4], payload[5]]));
            let message = payload.get(6..6 + message_len).ok_or("an error chunk's message runs past it")?;
            let mut message = String::from_utf8_lossy(message).into_owned();
            if chunk_type == NBD_REPLY_TYPE_ERROR_OFFSET {
                if let Some(offset) = payload.get(6 + message_len..14 + message_len) {
                    let offset = u64::from_be_bytes(offset.try_into().expect("8 bytes"));
                    message = format!("{message} (at byte {offset})");
                }
            }
            if pending.error.is_none() {
                pending.error = Some(pending.server_error(errno, message));
            }
            Ok(())
        }
        _ => Err(format!(
            "a reply chunk of type {chunk_type} and {len_bytes} bytes to {}: protocol violation",
            command_name(pending.command)
        )),
    }
}

/// The part of a read's buffer that `len_bytes` at `offset_bytes` of the export fill.
fn window_of(
    request: &Range<u64>,
    offset_bytes: u64,
    len_bytes: u64,
    pending: &Pending,
) -> Result<Range<usize>, String> {
    let end = offset_bytes.checked_add(len_bytes).ok_or("a reply chunk past 2^64")?;
    if offset_bytes < request.start || end > request.end {
        return Err(format!("a reply chunk for bytes {offset_bytes}..{end}, outside the request {request:?}"));
    }
    let start = pending.window.start + (offset_bytes - request.start) as usize;
    Ok(start..start + len_bytes as usize)
}

/// Reads `window.len()` bytes of the socket into `window` of `buf`, leaving its window as it was.
async fn read_into(reader: &mut Reader, buf: &mut ReadBuf, window: Range<usize>) -> io::Result<()> {
    let saved = buf.window();
    buf.set_window(window);
    let mut result = Ok(());
    // Collected first: the segment iterator is not `Send`, and a task spawned on a runtime's
    // handle must be.
    let segments: Vec<&mut [u8]> = buf.segments_mut().collect();
    for segment in segments {
        if let Err(error) = reader.read_exact(segment).await {
            result = Err(error);
            break;
        }
    }
    buf.set_window(saved);
    result.map(drop)
}
