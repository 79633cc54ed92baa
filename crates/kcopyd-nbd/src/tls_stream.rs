//! A socket of the reactor's runtime inside a rustls client session: [`TlsStream`] is an
//! `AsyncRead + AsyncWrite` like the socket it wraps, so the handshake's option haggling and
//! the whole transmission phase run over it unchanged.
//!
//! ```text
//!  caller ── plaintext ──► rustls::ClientConnection ── TLS records ──► socket
//!         ◄─ plaintext ───                          ◄─ TLS records ───
//!             (reader()/writer())                  (read_tls through ReadAhead, write_tls
//!                                                   through SyncSocket: Pending is WouldBlock)
//! ```
//!
//! rustls does no I/O itself: it takes the bytes the socket gave (`read_tls`) and hands back
//! the bytes to send (`write_tls`). The adapters below let it call the socket's `poll_*`
//! methods with the task's context, and turn a socket that is not ready into `WouldBlock`,
//! which rustls passes back up and this file turns into `Poll::Pending` again.
//!
//! Plain-text connections never come here: their sockets are split and used directly, so
//! their throughput path is unchanged.

use std::io::{self, IoSlice, Read, Write};
use std::ops::Range;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use rustls::ClientConnection;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes taken from the socket in one read, ahead of what rustls asks for (it asks for at
/// most 4 KiB at a time): a 1 MiB read reply then costs 16 system calls, not 256.
const READ_AHEAD_BYTES: usize = 64 * 1024;

/// A client TLS session over `socket`.
#[derive(Debug)]
pub(crate) struct TlsStream<S> {
    socket: S,
    session: ClientConnection,
    /// Ciphertext read from the socket that rustls has not taken yet: `incoming[waiting]`.
    incoming: Box<[u8]>,
    waiting: Range<usize>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream<S> {
    /// `session` (not yet handshaken) over `socket`.
    pub(crate) fn new(socket: S, session: ClientConnection) -> TlsStream<S> {
        TlsStream { socket, session, incoming: vec![0; READ_AHEAD_BYTES].into_boxed_slice(), waiting: 0..0 }
    }

    /// Runs the TLS handshake to its end: the server's certificate is verified here.
    pub(crate) async fn handshake(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_handshake(cx)).await
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.session.is_handshaking() {
            ready!(self.poll_send_records(cx))?;
            if !self.session.is_handshaking() {
                break;
            }
            if ready!(self.poll_receive_records(cx))? == 0 {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection during the TLS handshake",
                )));
            }
        }
        // The client's last handshake message (its Finished) goes out now.
        self.poll_send_records(cx)
    }

    /// Takes what the socket has into the session and decrypts it: the bytes read (0 at the
    /// socket's end). A record that fails (a bad certificate, a corrupt record) is an error
    /// holding rustls's [`rustls::Error`]; the alert that tells the server goes out first.
    fn poll_receive_records(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let mut ahead =
            ReadAhead { socket: &mut self.socket, cx, buffer: &mut self.incoming, waiting: &mut self.waiting };
        let received = match self.session.read_tls(&mut ahead) {
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
            received => received?,
        };
        if let Err(error) = self.session.process_new_packets() {
            // Best effort: the server learns why, if it still listens.
            let _ = self.session.write_tls(&mut SyncSocket { socket: &mut self.socket, cx });
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, error)));
        }
        Poll::Ready(Ok(received))
    }

    /// Sends every TLS record the session has ready.
    fn poll_send_records(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.session.wants_write() {
            let sent = match self.session.write_tls(&mut SyncSocket { socket: &mut self.socket, cx }) {
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
                sent => sent?,
            };
            if sent == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Puts plaintext into the session with `put` and sends the records: how much was taken.
    /// Taken bytes count as written even if the socket is not ready for all their records
    /// yet (the rest go out on the next write or flush).
    fn poll_put(
        &mut self,
        cx: &mut Context<'_>,
        len_bytes: usize,
        mut put: impl FnMut(&mut ClientConnection) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        if len_bytes == 0 {
            return Poll::Ready(Ok(0));
        }
        // Twice at most: once the records ahead have gone out, the session takes more.
        for _ in 0..2 {
            let taken = put(&mut self.session)?;
            match self.poll_send_records(cx) {
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending if taken == 0 => return Poll::Pending,
                _ if taken > 0 => return Poll::Ready(Ok(taken)),
                _ => {}
            }
        }
        Poll::Ready(Err(io::Error::other("the TLS session takes no more data")))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            match this.session.reader().read(buf.initialize_unfilled()) {
                // 0: the server closed the session (close_notify), or `buf` is full.
                Ok(read) => {
                    buf.advance(read);
                    return Poll::Ready(Ok(()));
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                // The socket ended without close_notify: a truncation, reported as such.
                Err(error) => return Poll::Ready(Err(error)),
            }
            // Records waiting to go out (a write's, an alert, a key update) are pushed, but a
            // full socket must not stop reading: the server may be waiting for us to read
            // before it reads the rest of our writes.
            if let Poll::Ready(Err(error)) = this.poll_send_records(cx) {
                return Poll::Ready(Err(error));
            }
            ready!(this.poll_receive_records(cx))?;
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.get_mut().poll_put(cx, buf.len(), |session| session.writer().write(buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let len_bytes = bufs.iter().map(|buf| buf.len()).sum();
        self.get_mut().poll_put(cx, len_bytes, |session| session.writer().write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.session.writer().flush()?;
        ready!(this.poll_send_records(cx))?;
        Pin::new(&mut this.socket).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.session.send_close_notify();
        ready!(this.poll_send_records(cx))?;
        Pin::new(&mut this.socket).poll_shutdown(cx)
    }
}

/// The socket as the blocking `Read` rustls takes, for one poll, through the read-ahead
/// buffer: the socket is read only when the buffer is empty (so a task never waits on the
/// socket while ciphertext is at hand), and not ready is `WouldBlock`.
struct ReadAhead<'a, 'b, S> {
    socket: &'a mut S,
    cx: &'a mut Context<'b>,
    buffer: &'a mut [u8],
    waiting: &'a mut Range<usize>,
}

impl<S: AsyncRead + Unpin> Read for ReadAhead<'_, '_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.waiting.start == self.waiting.end {
            let mut ahead = ReadBuf::new(self.buffer);
            match Pin::new(&mut *self.socket).poll_read(self.cx, &mut ahead) {
                Poll::Ready(Ok(())) => *self.waiting = 0..ahead.filled().len(),
                Poll::Ready(Err(error)) => return Err(error),
                Poll::Pending => return Err(io::ErrorKind::WouldBlock.into()),
            }
        }
        let len_bytes = buf.len().min(self.waiting.end - self.waiting.start);
        let from = self.waiting.start;
        buf[..len_bytes].copy_from_slice(&self.buffer[from..from + len_bytes]);
        self.waiting.start += len_bytes;
        // 0 only at the socket's end (or for an empty `buf`).
        Ok(len_bytes)
    }
}

/// The socket as the blocking `Write` rustls takes, for one poll: not ready is `WouldBlock`.
struct SyncSocket<'a, 'b, S> {
    socket: &'a mut S,
    cx: &'a mut Context<'b>,
}

impl<S: AsyncWrite + Unpin> Write for SyncSocket<'_, '_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match Pin::new(&mut *self.socket).poll_write(self.cx, buf) {
            Poll::Ready(written) => written,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match Pin::new(&mut *self.socket).poll_write_vectored(self.cx, bufs) {
            Poll::Ready(written) => written,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match Pin::new(&mut *self.socket).poll_flush(self.cx) {
            Poll::Ready(flushed) => flushed,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}
