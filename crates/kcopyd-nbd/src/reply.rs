//! Replies: read off the socket and checked against the request they answer and against
//! what the handshake agreed, so that nothing the server did not prove is believed.
//!
//! ```text
//!  magic ─┬─ simple:     errno cookie [data]      only where structured replies were not agreed
//!         │                                       (or for commands other than read/block status)
//!         └─ structured: flags type cookie length payload   (chunks until NBD_REPLY_FLAG_DONE)
//!               OFFSET_DATA / OFFSET_HOLE ─► Coverage: inside the request, no overlap;
//!                                            DONE without an error needs every byte covered
//!               BLOCK_STATUS ─► the agreed context id, one chunk, extents non-empty,
//!                               a prefix of the request (the last one cut at its end),
//!                               known flags only
//!               ERROR*       ─► errno ≠ 0, its offset inside the request
//!               every reply  ─► at most REPLY_CHUNKS_MAX chunks, REPLY_OVERHEAD_BYTES_MAX bytes
//!                               besides read data
//!  anything else: a protocol violation ─► that request fails with
//!  RequestError::ProtocolViolation, the connection is dropped (the others fail as lost)
//! ```
//!
//! A read is complete only when its chunks covered each of its bytes exactly once: chunk
//! lengths that merely add up to the request (the first half sent twice, the second never)
//! are refused, so a copy never takes a buffer's stale bytes for data the server sent.
//!
//! The state the connection's writer, reader and watchdog share lives here too, below
//! `connection.rs`, which drives it:
//!
//! ```text
//!  Request ─► Shared::pending ─► Pending in Shared's `inflight` (by cookie) ─► Completion
//!             Shared::lose(Loss): drains `inflight`, each Pending completes with the loss
//! ```

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use kcopyd_core::{ReadBuf, WriteBuf};
use tokio::io::{AsyncRead, AsyncReadExt, BufReader};
use tokio::sync::{oneshot, watch};

use crate::error::RequestError;
use crate::handshake::ExportInfo;
use crate::proto::*;

/// Most chunks in one structured reply: a read of 32 MiB in 512-byte pieces alternating data
/// and holes takes 65,536; a server sending more is broken (or endless).
pub(crate) const REPLY_CHUNKS_MAX: u32 = 1 << 17;
/// Most bytes of one structured reply besides read data (chunk headers, offsets, block status,
/// error messages): one chunk of the largest size and room for the headers of many more.
/// With read data bounded by the request, this bounds every reply.
pub(crate) const REPLY_OVERHEAD_BYTES_MAX: u64 = 2 * CHUNK_BYTES_MAX as u64;
/// Bytes of a structured reply chunk's header.
const CHUNK_HEADER_BYTES: u64 = 20;
/// Bytes of the buffer a read without one (the warm-up) drops its data through: below
/// glibc's mapping threshold, so it comes from the heap, and few calls for a 16 MiB read.
const DROPPED_CHUNK_BYTES: usize = 64 * 1024;

/// The socket's reading half, buffered.
pub(crate) type Reader = BufReader<Box<dyn AsyncRead + Unpin + Send>>;

/// One request, as the device hands it to the connection.
#[derive(Debug)]
pub(crate) struct Request {
    /// `NBD_CMD_*`.
    pub command: u16,
    /// `NBD_CMD_FLAG_*`.
    pub flags: u16,
    /// First byte.
    pub offset_bytes: u64,
    /// Bytes (the payload's length for writes).
    pub len_bytes: u32,
    /// The data of a write.
    pub payload: Option<WriteBuf>,
    /// The buffer a read fills (its window); none for a read whose data is dropped.
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

/// What the writer, the reader and the watchdog share.
#[derive(Debug)]
pub(crate) struct Shared {
    server: Arc<str>,
    /// What the handshake agreed: replies are checked against it.
    pub info: ExportInfo,
    state: Mutex<State>,
    /// Why the connection ended (the first reason sticks); every request reads it.
    loss: Arc<OnceLock<Loss>>,
    /// Turns true when the connection is lost: cancels the reader, the writer, the watchdog.
    pub(crate) lost_tx: watch::Sender<bool>,
}

#[derive(Debug, Default)]
pub(crate) struct State {
    pub(crate) inflight: HashMap<u64, Pending>,
    /// The request whose reply is being read (out of `inflight` meanwhile): when it was sent
    /// and what it is (command, offset, length), for the watchdog.
    reading: Option<(Instant, (u16, u64, u32))>,
}

impl Shared {
    pub(crate) fn new(server: Arc<str>, info: ExportInfo) -> Shared {
        let (lost_tx, _) = watch::channel(false);
        Shared { server, info, state: Mutex::new(State::default()), loss: Arc::new(OnceLock::new()), lost_tx }
    }

    /// `request` as a request in flight (its data, if any, stays with the writer).
    pub(crate) fn pending(&self, request: Request) -> Pending {
        let Request { command, offset_bytes, len_bytes, buf, reply, .. } = request;
        Pending::new((command, offset_bytes, len_bytes), buf, reply, self.server.clone(), self.loss.clone())
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves a consistent map: take it over.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn is_lost(&self) -> bool {
        self.loss.get().is_some()
    }

    /// Marks the connection lost (the first reason sticks) and fails every request in flight.
    pub(crate) fn lose(&self, loss: Loss) {
        let _ = self.loss.set(loss);
        let drained = std::mem::take(&mut self.lock().inflight);
        self.lost_tx.send_replace(true);
        // Each reports the loss from its `Drop`, outside the lock.
        drop(drained);
    }

    /// The request `cookie` answers, out of the requests in flight.
    pub(crate) fn take(&self, cookie: u64) -> Option<Pending> {
        self.lock().inflight.remove(&cookie)
    }

    /// Puts back a request whose reply goes on.
    pub(crate) fn put_back(&self, cookie: u64, pending: Pending) {
        let previous = self.lock().inflight.insert(cookie, pending);
        assert!(previous.is_none(), "cookie {cookie} was put back while in flight");
    }

    /// Notes the request whose reply is being read, or that none is.
    pub(crate) fn reading(&self, pending: Option<&Pending>) {
        self.lock().reading = pending.map(|p| (p.sent_at, (p.command, p.offset_bytes, p.len_bytes)));
    }

    /// The oldest request without a reply after `timeout`, described.
    pub(crate) fn overdue(&self, timeout: Duration) -> Option<String> {
        let state = self.lock();
        let waiting = state.inflight.values().map(|p| (p.sent_at, (p.command, p.offset_bytes, p.len_bytes)));
        let (sent_at, (command, offset_bytes, len_bytes)) =
            waiting.chain(state.reading).min_by_key(|(sent_at, _)| *sent_at)?;
        (sent_at.elapsed() >= timeout).then(|| {
            format!(
                "no reply to {} of bytes {offset_bytes}..{} within {} ms (--io-timeout): the server stalled",
                command_name(command),
                offset_bytes + u64::from(len_bytes),
                timeout.as_millis()
            )
        })
    }
}

/// Why a connection ended, as every request still in flight on it reports it.
#[derive(Debug, Clone)]
pub(crate) struct Loss {
    /// What happened.
    pub reason: String,
    /// A request got no reply in time (the requests fail with `TimedOut`).
    pub timed_out: bool,
}

/// How reading a reply failed.
#[derive(Debug, Clone)]
pub(crate) enum Broken {
    /// The socket failed or closed.
    Lost(String),
    /// The server broke the protocol.
    Violation(String),
}

impl Broken {
    /// The connection's loss this causes.
    pub(crate) fn loss(&self) -> Loss {
        let reason = match self {
            Broken::Lost(reason) => reason.clone(),
            Broken::Violation(problem) => format!("protocol violation: {problem}"),
        };
        Loss { reason, timed_out: false }
    }
}

fn violation(problem: String) -> Broken {
    Broken::Violation(problem)
}

fn io_broken(error: io::Error) -> Broken {
    match error.kind() {
        io::ErrorKind::UnexpectedEof => {
            Broken::Lost("the server closed the connection in the middle of a reply".into())
        }
        _ => Broken::Lost(format!("reading a reply: {error}")),
    }
}

/// The bytes of a read that its reply has filled, as disjoint runs (offsets in the export).
#[derive(Debug, Default)]
struct Coverage {
    runs: BTreeMap<u64, u64>,
    bytes: u64,
}

impl Coverage {
    /// Adds `start..end`, merged with the runs it touches; an overlap is refused with the run
    /// it overlaps.
    fn add(&mut self, start: u64, end: u64) -> Result<(), Range<u64>> {
        if let Some((&s, &e)) = self.runs.range(..=start).next_back() {
            if e > start {
                return Err(s..e);
            }
        }
        if let Some((&s, &e)) = self.runs.range(start..).next() {
            if s < end {
                return Err(s..e);
            }
        }
        let (mut run_start, mut run_end) = (start, end);
        if let Some((&s, &e)) = self.runs.range(..start).next_back() {
            if e == start {
                self.runs.remove(&s);
                run_start = s;
            }
        }
        if let Some(e) = self.runs.remove(&end) {
            run_end = e;
        }
        self.runs.insert(run_start, run_end);
        self.bytes += end - start;
        Ok(())
    }

    /// The first byte of `request` no run covers.
    fn first_gap(&self, request: &Range<u64>) -> Option<u64> {
        let mut at = request.start;
        for (&s, &e) in &self.runs {
            if s > at {
                break;
            }
            at = at.max(e);
        }
        (at < request.end).then_some(at)
    }
}

/// A request on the wire, waiting for its reply. It completes exactly once: by its reply, or
/// by `Drop` with the reason the connection gave.
#[derive(Debug)]
pub(crate) struct Pending {
    pub command: u16,
    pub offset_bytes: u64,
    pub len_bytes: u32,
    /// When it was queued: the per-request timeout runs from here.
    pub sent_at: Instant,
    /// A read's buffer and the window the request fills; a read without one (the warm-up)
    /// has its data read and dropped, its window then the request's length.
    buf: Option<ReadBuf>,
    window: Range<usize>,
    reply: Option<oneshot::Sender<Completion>>,
    server: Arc<str>,
    /// Why the connection ended, once it has.
    loss: Arc<OnceLock<Loss>>,
    /// The first error chunk of a structured reply.
    error: Option<io::Error>,
    coverage: Coverage,
    chunks: u32,
    overhead_bytes: u64,
    block_status_chunks: u32,
    extents: Vec<(u32, u32)>,
    /// How this request's own reply broke, if it did.
    broken: Option<Broken>,
}

impl Pending {
    /// A request about to be sent.
    pub(crate) fn new(
        (command, offset_bytes, len_bytes): (u16, u64, u32),
        buf: Option<ReadBuf>,
        reply: oneshot::Sender<Completion>,
        server: Arc<str>,
        loss: Arc<OnceLock<Loss>>,
    ) -> Pending {
        let window = buf.as_ref().map_or(0..len_bytes as usize, ReadBuf::window);
        Pending {
            command,
            offset_bytes,
            len_bytes,
            sent_at: Instant::now(),
            buf,
            window,
            reply: Some(reply),
            server,
            loss,
            error: None,
            coverage: Coverage::default(),
            chunks: 0,
            overhead_bytes: 0,
            block_status_chunks: 0,
            extents: Vec::new(),
            broken: None,
        }
    }

    /// The request's bytes in the export.
    pub(crate) fn request(&self) -> Range<u64> {
        self.offset_bytes..self.offset_bytes + u64::from(self.len_bytes)
    }

    /// The request, for messages: "NBD_CMD_READ of bytes 0..4096".
    pub(crate) fn describe(&self) -> String {
        format!("{} of bytes {:?}", command_name(self.command), self.request())
    }

    fn complete(mut self, result: io::Result<()>) {
        let reply = self.reply.take().expect("a pending request completes once");
        let extents = std::mem::take(&mut self.extents);
        // The caller may have stopped waiting (its future dropped): nothing to tell then.
        let _ = reply.send(Completion { buf: self.buf.take(), result, extents });
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

    /// Counts one chunk of `len_bytes` against the reply's bounds.
    fn count_chunk(&mut self, chunk_type: u16, len_bytes: u32) -> Result<(), Broken> {
        self.chunks += 1;
        let besides_data = if chunk_type == NBD_REPLY_TYPE_OFFSET_DATA { 8 } else { u64::from(len_bytes) };
        self.overhead_bytes += CHUNK_HEADER_BYTES + besides_data;
        if self.chunks > REPLY_CHUNKS_MAX || self.overhead_bytes > REPLY_OVERHEAD_BYTES_MAX {
            return Err(violation(format!(
                "the reply to {} runs past {} chunks or {REPLY_OVERHEAD_BYTES_MAX} bytes besides data",
                self.describe(),
                REPLY_CHUNKS_MAX
            )));
        }
        Ok(())
    }

    /// Takes `len_bytes` at `offset_bytes` of a read's reply as covered and returns the part
    /// of the buffer they fill: inside the request, overlapping nothing sent before.
    fn claim(&mut self, offset_bytes: u64, len_bytes: u64, what: &str) -> Result<Range<usize>, Broken> {
        let request = self.request();
        let end = offset_bytes.checked_add(len_bytes).ok_or_else(|| violation(format!("a {what} chunk past 2^64")))?;
        if len_bytes == 0 || offset_bytes < request.start || end > request.end {
            return Err(violation(format!(
                "a {what} chunk for bytes {offset_bytes}..{end}, not a non-empty part of the request {request:?}"
            )));
        }
        if let Err(overlapped) = self.coverage.add(offset_bytes, end) {
            return Err(violation(format!(
                "a {what} chunk for bytes {offset_bytes}..{end} overlaps bytes {overlapped:?} of the same reply"
            )));
        }
        let start = self.window.start + (offset_bytes - request.start) as usize;
        Ok(start..start + len_bytes as usize)
    }

    /// Checks a reply that ended (`NBD_REPLY_FLAG_DONE`) without an error chunk.
    fn check_done(&self) -> Result<(), Broken> {
        match self.command {
            NBD_CMD_READ => match self.coverage.first_gap(&self.request()) {
                Some(gap) => Err(violation(format!(
                    "the reply to {} ended with byte {gap} never sent ({} of {} bytes covered)",
                    self.describe(),
                    self.coverage.bytes,
                    self.len_bytes
                ))),
                None => Ok(()),
            },
            NBD_CMD_BLOCK_STATUS if self.block_status_chunks == 0 => {
                Err(violation(format!("the reply to {} ended without a block-status chunk", self.describe())))
            }
            _ => Ok(()),
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let Some(reply) = self.reply.take() else { return };
        let (command, offset_bytes, len_bytes) = (command_name(self.command), self.offset_bytes, self.len_bytes);
        let server = self.server.to_string();
        let len_bytes = u64::from(len_bytes);
        let error = match self.broken.take() {
            Some(Broken::Violation(problem)) => {
                RequestError::ProtocolViolation { server, command, offset_bytes, len_bytes, problem }
                    .into_io(io::ErrorKind::InvalidData)
            }
            Some(Broken::Lost(reason)) => lost_error(server, command, (offset_bytes, len_bytes), reason, false),
            None => {
                let loss = self.loss.get().cloned();
                let loss = loss.unwrap_or(Loss { reason: "the connection closed".into(), timed_out: false });
                lost_error(server, command, (offset_bytes, len_bytes), loss.reason, loss.timed_out)
            }
        };
        let _ = reply.send(Completion { buf: self.buf.take(), result: Err(error), extents: Vec::new() });
    }
}

/// A request failed by the connection's loss.
pub(crate) fn lost_error(
    server: String,
    command: &'static str,
    (offset_bytes, len_bytes): (u64, u64),
    reason: String,
    timed_out: bool,
) -> io::Error {
    let kind = if timed_out { io::ErrorKind::TimedOut } else { io::ErrorKind::ConnectionAborted };
    RequestError::ConnectionLost { server, command, offset_bytes, len_bytes, reason }.into_io(kind)
}

/// Reads replies until the connection fails; returns why.
pub(crate) async fn read_replies(mut reader: Reader, shared: &Shared) -> Broken {
    loop {
        let magic = match reader.read_u32().await {
            Ok(magic) => magic,
            Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => {
                return Broken::Lost("the server closed the connection".into());
            }
            Err(error) => return Broken::Lost(format!("reading a reply: {error}")),
        };
        let result = match magic {
            NBD_SIMPLE_REPLY_MAGIC => simple_reply(&mut reader, shared).await,
            NBD_STRUCTURED_REPLY_MAGIC => structured_chunk(&mut reader, shared).await,
            _ => Err(violation(format!("a reply with magic {magic:#010x}"))),
        };
        if let Err(broken) = result {
            return broken;
        }
    }
}

/// Takes the request `cookie` answers out of the requests in flight.
fn take(shared: &Shared, cookie: u64, what: &str) -> Result<Pending, Broken> {
    shared.take(cookie).ok_or_else(|| violation(format!("{what} to cookie {cookie}, which no request in flight has")))
}

/// A simple reply: error, cookie, and a successful read's data.
async fn simple_reply(reader: &mut Reader, shared: &Shared) -> Result<(), Broken> {
    let errno = reader.read_u32().await.map_err(io_broken)?;
    let cookie = reader.read_u64().await.map_err(io_broken)?;
    let mut pending = take(shared, cookie, "a simple reply")?;
    // Structured replies agreed, reads and block status must use them; other commands may
    // still be answered simply (qemu-nbd does so for writes and flushes).
    if shared.info.structured && matches!(pending.command, NBD_CMD_READ | NBD_CMD_BLOCK_STATUS) {
        let broken = violation(format!("a simple reply to {}, but structured replies were agreed", pending.describe()));
        pending.broken = Some(broken.clone());
        return Err(broken);
    }
    if errno != 0 {
        let error = pending.server_error(errno, String::new());
        pending.complete(Err(error));
        return Ok(());
    }
    if pending.command == NBD_CMD_READ {
        shared.reading(Some(&pending));
        let window = pending.window.clone();
        let read = read_into(reader, pending.buf.as_mut(), window).await;
        shared.reading(None);
        if let Err(error) = read {
            let broken = io_broken(error);
            pending.broken = Some(broken.clone());
            return Err(broken);
        }
    }
    pending.complete(Ok(()));
    Ok(())
}

/// One chunk of a structured reply; the last (`NBD_REPLY_FLAG_DONE`) completes the request.
async fn structured_chunk(reader: &mut Reader, shared: &Shared) -> Result<(), Broken> {
    let flags = reader.read_u16().await.map_err(io_broken)?;
    let chunk_type = reader.read_u16().await.map_err(io_broken)?;
    let cookie = reader.read_u64().await.map_err(io_broken)?;
    let len_bytes = reader.read_u32().await.map_err(io_broken)?;
    if !shared.info.structured {
        return Err(violation(format!(
            "a structured reply chunk (type {chunk_type}) to cookie {cookie}, but structured replies were not agreed"
        )));
    }
    let mut pending = take(shared, cookie, "a structured reply chunk")?;
    let done = flags & NBD_REPLY_FLAG_DONE != 0;
    shared.reading(Some(&pending));
    let mut result = pending.count_chunk(chunk_type, len_bytes);
    if result.is_ok() {
        result = chunk_payload(reader, &mut pending, (chunk_type, len_bytes, done), shared.info.base_allocation).await;
    }
    if result.is_ok() && done && pending.error.is_none() {
        result = pending.check_done();
    }
    shared.reading(None);
    if let Err(broken) = result {
        pending.broken = Some(broken.clone());
        return Err(broken);
    }
    if done {
        let result = pending.error.take().map_or(Ok(()), Err);
        pending.complete(result);
    } else {
        shared.put_back(cookie, pending);
    }
    Ok(())
}

/// Reads and checks the payload of one chunk.
async fn chunk_payload(
    reader: &mut Reader,
    pending: &mut Pending,
    (chunk_type, len_bytes, done): (u16, u32, bool),
    context: Option<u32>,
) -> Result<(), Broken> {
    match chunk_type {
        NBD_REPLY_TYPE_NONE if len_bytes == 0 && done => Ok(()),
        NBD_REPLY_TYPE_OFFSET_DATA if pending.command == NBD_CMD_READ && len_bytes > 8 => {
            let offset = reader.read_u64().await.map_err(io_broken)?;
            let data = pending.claim(offset, u64::from(len_bytes - 8), "data")?;
            read_into(reader, pending.buf.as_mut(), data).await.map_err(io_broken)
        }
        NBD_REPLY_TYPE_OFFSET_HOLE if pending.command == NBD_CMD_READ && len_bytes == 12 => {
            let offset = reader.read_u64().await.map_err(io_broken)?;
            let hole_bytes = reader.read_u32().await.map_err(io_broken)?;
            let hole = pending.claim(offset, u64::from(hole_bytes), "hole")?;
            if let Some(buf) = pending.buf.as_mut() {
                let saved = buf.window();
                buf.set_window(hole);
                buf.fill(0);
                buf.set_window(saved);
            }
            Ok(())
        }
        NBD_REPLY_TYPE_BLOCK_STATUS if pending.command == NBD_CMD_BLOCK_STATUS => {
            block_status_chunk(reader, pending, len_bytes, context).await
        }
        _ if is_reply_error(chunk_type) => error_chunk(reader, pending, chunk_type, len_bytes).await,
        _ => Err(violation(format!(
            "a reply chunk of type {chunk_type} and {len_bytes} bytes{} to {}",
            if done { " (done)" } else { "" },
            pending.describe()
        ))),
    }
}

/// A block-status chunk: for the agreed context, the only one, extents of known flags that
/// cover a non-empty prefix of the request and nothing past it.
async fn block_status_chunk(
    reader: &mut Reader,
    pending: &mut Pending,
    len_bytes: u32,
    context: Option<u32>,
) -> Result<(), Broken> {
    if len_bytes < 12 || (len_bytes - 4) % 8 != 0 || len_bytes > CHUNK_BYTES_MAX {
        return Err(violation(format!(
            "a block-status chunk of {len_bytes} bytes to {} (one or more 8-byte extents after the context id)",
            pending.describe()
        )));
    }
    let id = reader.read_u32().await.map_err(io_broken)?;
    if Some(id) != context {
        return Err(violation(format!(
            "block status for metadata context {id} to {}, but {BASE_ALLOCATION} was agreed as context {}",
            pending.describe(),
            context.map_or("none".to_owned(), |c| c.to_string())
        )));
    }
    pending.block_status_chunks += 1;
    if pending.block_status_chunks > 1 {
        return Err(violation(format!("a second block-status chunk for context {id} to {}", pending.describe())));
    }
    let request_bytes = u64::from(pending.len_bytes);
    let mut described_bytes = 0u64;
    for _ in 0..(len_bytes - 4) / 8 {
        let extent_bytes = reader.read_u32().await.map_err(io_broken)?;
        let flags = reader.read_u32().await.map_err(io_broken)?;
        // The protocol lets the last extent run past the request (nbdkit's do): it is cut at
        // the request's end, and nothing past it is believed. An extent that starts there is
        // not the last, or describes what was not asked.
        if extent_bytes == 0 || described_bytes >= request_bytes || flags & !(NBD_STATE_HOLE | NBD_STATE_ZERO) != 0 {
            return Err(violation(format!(
                "an extent of {extent_bytes} bytes with flags {flags:#x} starting {described_bytes} bytes into {} \
                 (extents are non-empty, start inside the request, only the last may end past it, and use the \
                 flags of {BASE_ALLOCATION} only)",
                pending.describe()
            )));
        }
        let inside_bytes = u64::from(extent_bytes).min(request_bytes - described_bytes);
        described_bytes += inside_bytes;
        pending.extents.push((inside_bytes as u32, flags));
    }
    Ok(())
}

/// An error chunk: a nonzero errno, a message that fits, an offset inside the request.
async fn error_chunk(
    reader: &mut Reader,
    pending: &mut Pending,
    chunk_type: u16,
    len_bytes: u32,
) -> Result<(), Broken> {
    if !(6..=CHUNK_BYTES_MAX).contains(&len_bytes) {
        return Err(violation(format!("an error chunk of {len_bytes} bytes to {}", pending.describe())));
    }
    let mut payload = vec![0u8; len_bytes as usize];
    reader.read_exact(&mut payload).await.map_err(io_broken)?;
    let errno = u32::from_be_bytes(payload[0..4].try_into().expect("4 bytes"));
    if errno == 0 {
        return Err(violation(format!("an error chunk with errno 0 to {}", pending.describe())));
    }
    let message_len = usize::from(u16::from_be_bytes([payload[4], payload[5]]));
    let message = payload
        .get(6..6 + message_len)
        .ok_or_else(|| violation(format!("an error chunk's message runs past it, to {}", pending.describe())))?;
    let mut message = String::from_utf8_lossy(message).into_owned();
    if chunk_type == NBD_REPLY_TYPE_ERROR_OFFSET {
        let offset = payload
            .get(6 + message_len..)
            .filter(|rest| rest.len() == 8)
            .map(|rest| u64::from_be_bytes(rest.try_into().expect("8 bytes")))
            .ok_or_else(|| violation(format!("an NBD_REPLY_TYPE_ERROR_OFFSET chunk of {len_bytes} bytes")))?;
        if !pending.request().contains(&offset) {
            return Err(violation(format!(
                "an error at byte {offset}, outside the request, to {}",
                pending.describe()
            )));
        }
        message = format!("{message} (at byte {offset})");
    }
    if pending.error.is_none() {
        pending.error = Some(pending.server_error(errno, message));
    }
    Ok(())
}

/// Reads `window.len()` bytes of the socket into `window` of `buf`, leaving its window as it
/// was; without a buffer, reads them and drops them.
async fn read_into(reader: &mut Reader, buf: Option<&mut ReadBuf>, window: Range<usize>) -> io::Result<()> {
    let Some(buf) = buf else { return drop_bytes(reader, window.len()).await };
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

/// Reads `len` bytes of the socket and drops them, through a buffer of at most
/// [`DROPPED_CHUNK_BYTES`]: a warm-up read costs no memory of its length.
async fn drop_bytes(reader: &mut Reader, len: usize) -> io::Result<()> {
    let mut chunk = vec![0u8; len.min(DROPPED_CHUNK_BYTES)];
    let mut left = len;
    while left > 0 {
        let part = left.min(chunk.len());
        reader.read_exact(&mut chunk[..part]).await?;
        left -= part;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coverage_refuses_overlaps_and_finds_gaps() {
        let mut coverage = Coverage::default();
        let request = 0..4096;
        coverage.add(0, 2048).unwrap();
        assert_eq!(coverage.add(0, 2048), Err(0..2048), "the first half twice");
        assert_eq!(coverage.add(1024, 3072), Err(0..2048));
        assert_eq!(coverage.first_gap(&request), Some(2048));
        coverage.add(3072, 4096).unwrap();
        assert_eq!(coverage.first_gap(&request), Some(2048));
        assert_eq!(coverage.add(2000, 3100), Err(0..2048));
        coverage.add(2048, 3072).unwrap();
        assert_eq!((coverage.first_gap(&request), coverage.bytes, coverage.runs.len()), (None, 4096, 1));
    }
}
