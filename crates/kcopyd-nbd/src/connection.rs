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
//!  connection lost (EOF, socket error, protocol violation, a request past --io-timeout):
//!  `lose` drains `inflight`; every Pending completes with RequestError::ConnectionLost (the
//!  one whose reply broke the protocol with RequestError::ProtocolViolation), and so does
//!  every later request.
//! ```
//!
//! Replies are read and checked, and the state the reader and the writer share (requests in
//! flight, the loss) is kept, in [`reply`](crate::reply), below this file.
//!
//! A [`Pending`](crate::reply::Pending) completes exactly once: by its reply, or, if it is dropped first (the
//! connection lost, the reader cancelled while filling it), by `Drop` with the loss.
//!
//! The reactor exists because the engine polls devices' futures only while it has work of
//! its own: a connection's reader must run whether or not anybody is polling, or the
//! server's replies would stall behind an idle caller.

use std::io::{self, IoSlice};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::mpsc;

use crate::error::ConnectError;
use crate::handshake::{ExportInfo, greet, handshake, start_tls};
use crate::proto::*;
use crate::reactor::Reactor;
use crate::reply::{Completion, Loss, Reader, Request, Shared, lost_error, read_replies};
use crate::tls::{CLOSED_AFTER_TLS_HANDSHAKE, TlsClient};
use crate::tls_stream::TlsStream;
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

type Writer = Box<dyn AsyncWrite + Unpin + Send>;

/// The caller's side of a connection: where requests go.
#[derive(Debug)]
pub(crate) struct Connection {
    requests: mpsc::UnboundedSender<Request>,
    server: Arc<str>,
}

impl Connection {
    /// Connects to `address`, runs the handshake for `export` and starts serving requests, all
    /// in a task on `reactor`, inside a TLS session of its own if `tls` is given. `server`
    /// names the URI in errors. Connecting and the handshake (TLS's too) may take `timeout`;
    /// with `io_timeout`, a request without its whole reply after that long ends the
    /// connection (see [`watch_replies`]).
    pub(crate) fn open(
        reactor: &Reactor,
        (address, export, tls): (&Address, &str, Option<&TlsClient>),
        server: Arc<str>,
        (timeout, io_timeout): (Duration, Option<Duration>),
    ) -> Result<(Connection, ExportInfo), ConnectError> {
        if std::thread::current().id() == reactor.thread_id() {
            // The handshake runs on this thread: waiting for it here would wait for ever.
            let source = io::Error::new(io::ErrorKind::WouldBlock, "connecting from the reactor's own thread");
            return Err(ConnectError::Thread { server: server.to_string(), source });
        }
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let (address, export, task_server, tls) = (address.clone(), export.to_owned(), server.clone(), tls.cloned());
        reactor.spawn(async move {
            let server = task_server;
            let opening = open_stream(&address, &export, &server, tls.as_ref());
            let opened = match tokio::time::timeout(timeout, opening).await {
                Ok(opened) => opened,
                Err(_) => Err(ConnectError::Connect {
                    server: server.to_string(),
                    source: io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no connection and handshake within {} ms (--connect-timeout)", timeout.as_millis()),
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
                        serve((reader, writer), receiver, Shared::new(server, info), io_timeout).await;
                    }
                }
            }
        });
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
            let range = (offset_bytes, u64::from(len_bytes));
            let error = lost_error(self.server.to_string(), command_name(command), range, reason, false);
            let _ = reply.send(Completion { buf, result: Err(error), extents: Vec::new() });
        }
    }
}

/// Connects, secures the connection with TLS if `tls` asks, and runs the handshake.
async fn open_stream(
    address: &Address,
    export: &str,
    server: &str,
    tls: Option<&TlsClient>,
) -> Result<(Reader, Writer, ExportInfo), ConnectError> {
    let connect = |source| ConnectError::Connect { server: server.to_owned(), source };
    match address {
        Address::Tcp { host, port } => {
            let stream = tokio::net::TcpStream::connect((host.as_str(), *port)).await.map_err(connect)?;
            stream.set_nodelay(true).map_err(connect)?;
            match tls {
                Some(tls) => open_tls(stream, export, server, tls).await,
                None => {
                    let (read_half, write_half) = stream.into_split();
                    open_plain(Box::new(read_half), Box::new(write_half), export, server).await
                }
            }
        }
        Address::Unix(path) => {
            let stream = tokio::net::UnixStream::connect(path).await.map_err(connect)?;
            match tls {
                Some(tls) => open_tls(stream, export, server, tls).await,
                None => {
                    let (read_half, write_half) = stream.into_split();
                    open_plain(Box::new(read_half), Box::new(write_half), export, server).await
                }
            }
        }
    }
}

/// The handshake in plain text, on the socket's own halves: the transmission phase then reads
/// and writes the socket directly.
async fn open_plain(
    read_half: Box<dyn AsyncRead + Unpin + Send>,
    write_half: Box<dyn AsyncWrite + Unpin + Send>,
    export: &str,
    server: &str,
) -> Result<(Reader, Writer, ExportInfo), ConnectError> {
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, read_half);
    let mut writer = BufWriter::with_capacity(HANDSHAKE_BUFFER_BYTES, write_half);
    greet(&mut reader, &mut writer, server).await?;
    let info = handshake(&mut reader, &mut writer, export, (server, false)).await?;
    // The handshake waits for the server's answer to everything it sends: nothing is left.
    assert!(writer.buffer().is_empty(), "the handshake flushes what it writes");
    Ok((reader, writer.into_inner(), info))
}

/// The greeting and `NBD_OPT_STARTTLS` in plain text, straight on the socket (nothing
/// buffered: the bytes after the server's ACK are TLS's), then the TLS handshake, then the
/// rest of the handshake and the whole transmission phase inside the TLS session.
async fn open_tls<S>(
    mut socket: S,
    export: &str,
    server: &str,
    tls: &TlsClient,
) -> Result<(Reader, Writer, ExportInfo), ConnectError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    {
        let (mut read_half, mut write_half) = tokio::io::split(&mut socket);
        greet(&mut read_half, &mut write_half, server).await?;
        start_tls(&mut read_half, &mut write_half, server).await?;
    }
    let session = rustls::ClientConnection::new(tls.config.clone(), tls.name.clone())
        .map_err(|error| ConnectError::handshake_io(server, io::Error::new(io::ErrorKind::InvalidData, error)))?;
    let mut stream = TlsStream::new(socket, session);
    stream.handshake().await.map_err(|error| ConnectError::handshake_io(server, error))?;
    let (read_half, write_half) = tokio::io::split(stream);
    let mut reader: Reader = BufReader::with_capacity(READ_BUFFER_BYTES, Box::new(read_half));
    let mut writer = BufWriter::with_capacity(HANDSHAKE_BUFFER_BYTES, Box::new(write_half) as Writer);
    let info = handshake(&mut reader, &mut writer, export, (server, true)).await.map_err(|error| match error {
        // With TLS 1.3 a server that refuses the client's certificate (or the lack of one)
        // learns it after the client's side of the TLS handshake is done, and hangs up.
        ConnectError::HandshakeIo { server, source } if source.kind() == io::ErrorKind::UnexpectedEof => {
            ConnectError::TlsHandshake { server, hint: Some(CLOSED_AFTER_TLS_HANDSHAKE), source }
        }
        other => other,
    })?;
    assert!(writer.buffer().is_empty(), "the handshake flushes what it writes");
    Ok((reader, writer.into_inner(), info))
}

/// Runs the transmission phase until the device is dropped.
async fn serve(
    (reader, writer): (Reader, Writer),
    mut requests: mpsc::UnboundedReceiver<Request>,
    shared: Shared,
    io_timeout: Option<Duration>,
) {
    let (mut lost_reading, mut lost_writing, mut lost_watching) =
        (shared.lost_tx.subscribe(), shared.lost_tx.subscribe(), shared.lost_tx.subscribe());
    let reading = async {
        tokio::select! {
            broken = read_replies(reader, &shared) => shared.lose(broken.loss()),
            _ = lost_reading.wait_for(|lost| *lost) => {}
        }
    };
    let writing = async {
        // A lost connection stops the writer even in the middle of a write to a server that
        // no longer reads.
        tokio::select! {
            _ = write_requests(writer, &mut requests, &shared) => {}
            _ = lost_writing.wait_for(|lost| *lost) => {}
        }
        shared.lose(Loss { reason: "the device was closed".into(), timed_out: false });
        // Requests sent after the loss fail at once, until the device is dropped.
        while let Some(request) = requests.recv().await {
            let pending = shared.pending(request);
            drop(pending);
        }
    };
    let watching = async {
        let Some(timeout) = io_timeout else { return };
        tokio::select! {
            _ = watch_replies(&shared, timeout) => {}
            _ = lost_watching.wait_for(|lost| *lost) => {}
        }
    };
    tokio::join!(reading, writing, watching);
}

/// Ends the connection when a request has waited `timeout` for its whole reply: a server that
/// stays connected but stops answering (or answers a byte at a time) fails its requests with
/// `TimedOut` instead of holding them, and their buffers, for ever.
async fn watch_replies(shared: &Shared, timeout: Duration) {
    let tick = (timeout / 4).clamp(Duration::from_millis(5), Duration::from_secs(1));
    loop {
        tokio::time::sleep(tick).await;
        if let Some(reason) = shared.overdue(timeout) {
            shared.lose(Loss { reason, timed_out: true });
            return;
        }
    }
}

/// Sends requests as they come, writing the gathered headers whenever no more are queued;
/// ends (with `NBD_CMD_DISC`) when the device is dropped.
async fn write_requests(mut writer: Writer, requests: &mut mpsc::UnboundedReceiver<Request>, shared: &Shared) {
    let mut cookie = 0u64;
    let mut headers = Vec::with_capacity(HEADER_BUFFER_BYTES);
    while let Some(first) = requests.recv().await {
        let mut next = Some(first);
        while let Some(request) = next {
            // Cookie 0 is NBD_CMD_DISC's; a u64 never wraps at any request rate.
            cookie = cookie.checked_add(1).expect("cookies never run out");
            if let Err(error) = write_request(&mut writer, &mut headers, request, cookie, shared).await {
                shared.lose(Loss { reason: format!("sending a request: {error}"), timed_out: false });
            }
            next = requests.try_recv().ok();
        }
        if !shared.is_lost() && !headers.is_empty() {
            if let Err(error) = writer.write_all(&headers).await {
                shared.lose(Loss { reason: format!("sending requests: {error}"), timed_out: false });
            }
        }
        headers.clear();
        // Nothing queued: what was written must reach the server before the writer waits. A
        // socket's flush does nothing; a TLS session's sends the records a full socket held
        // back (its write took the data before they could all go).
        if !shared.is_lost() {
            if let Err(error) = writer.flush().await {
                shared.lose(Loss { reason: format!("sending requests: {error}"), timed_out: false });
            }
        }
    }
    if !shared.is_lost() {
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
    let mut request = request;
    let (flags, command, offset_bytes, len_bytes) =
        (request.flags, request.command, request.offset_bytes, request.len_bytes);
    let payload = request.payload.take();
    let pending = shared.pending(request);
    {
        let mut state = shared.lock();
        if shared.is_lost() {
            drop(state);
            // Its `Drop` reports the loss.
            drop(pending);
            return Ok(());
        }
        let previous = state.inflight.insert(cookie, pending);
        assert!(previous.is_none(), "cookie {cookie} is already in flight");
    }
    headers.extend_from_slice(&request_header(flags, command, cookie, offset_bytes, len_bytes));
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
