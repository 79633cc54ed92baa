//! The transmission phase of one connection: a reader that takes requests off the socket and
//! hands each to a task of its own, so that many run at once and their replies go out in the
//! order they finish, under two limits (requests and payload bytes in flight).
//!
//! ```text
//!  socket ─► read_request (magic checked: garbage ends the connection)
//!     DISC or stop ─► wait for the tasks ─► close
//!     WRITE ─► payload read (or, when refused, read and dropped) ─┐
//!     permits: requests_in_flight_max, payload bytes ─────────────┴► task: check ─► device ─► reply
//!  replies: one writer under a lock; READ: one OFFSET_DATA chunk (or an ERROR chunk),
//!           BLOCK_STATUS: one chunk of extents, others: NONE chunk or simple reply
//! ```
//!
//! A request is checked before any memory is given to it: flags, alignment to the export's
//! block, bounds, length against the maximum payload, a read-only export. A refused request
//! gets its error reply; only a broken header (wrong magic) or a lost socket ends the
//! connection. A client gone mid-request leaves its tasks to finish against a dead socket.

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use kcopyd_core::{ReadBuf, SECTOR_SIZE, WriteBuf};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;

use super::options::{BASE_ALLOCATION_ID, Negotiated};
use super::wire::*;
use super::{Export, Limits, Reader, Stats, Writer};
use crate::proto::*;

/// Most extents one block-status reply carries.
pub const EXTENTS_MAX: usize = 64 * 1024;
/// How long the requests in flight of a connection may take to be answered once the server
/// stops; then they are dropped (devices' futures may be dropped at any point).
pub const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Payload bytes are counted against [`Limits::payload_bytes_in_flight_max`] in units of this.
const PERMIT_BYTES: u64 = 1024;

/// One request's header.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Request {
    pub(crate) flags: u16,
    pub(crate) command: u16,
    pub(crate) cookie: u64,
    pub(crate) offset_bytes: u64,
    pub(crate) len_bytes: u32,
}

/// What every request task of a connection shares.
struct Session {
    export: Arc<Export>,
    negotiated: Negotiated,
    writer: Mutex<Writer>,
    stats: Arc<Stats>,
}

/// A refusal: the errno and a message for the error chunk.
type Refusal = (u32, String);

/// One request taken off the socket, ready for its task.
struct Taken {
    request: Request,
    refusal: Option<Refusal>,
    payload: Option<WriteBuf>,
    permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
}

/// The per-connection limits as semaphores: requests, and payload in [`PERMIT_BYTES`] units.
struct Budget {
    requests: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
}

/// Serves requests until the client disconnects, breaks the protocol or `stop` turns true.
/// After a stop the tasks in flight get [`DRAIN_TIMEOUT`] to answer (a client that reads no
/// replies cannot hold the server), then are dropped.
pub(crate) async fn serve_requests(
    mut reader: Reader,
    writer: Writer,
    export: Arc<Export>,
    negotiated: Negotiated,
    limits: Limits,
    stats: Arc<Stats>,
    mut stop: watch::Receiver<bool>,
) -> io::Result<()> {
    let session = Arc::new(Session { export, negotiated, writer: Mutex::new(writer), stats });
    let budget = Budget {
        requests: Arc::new(Semaphore::new(limits.requests_in_flight_max)),
        bytes: Arc::new(Semaphore::new((limits.payload_bytes_in_flight_max / PERMIT_BYTES) as usize)),
    };
    let mut tasks = JoinSet::new();
    let (ended, stopped) = loop {
        // Reaps the tasks done, so that the set does not grow with the connection's age.
        while tasks.try_join_next().is_some() {}
        // A stop also ends a wait for a stalled client's header or payload.
        let taken = tokio::select! {
            taken = take_request(&mut reader, &session, &budget) => taken,
            _ = stop.wait_for(|stop| *stop) => break (Ok(()), true),
        };
        let Taken { request, refusal, payload, permits } = match taken {
            Ok(Some(taken)) => taken,
            Ok(None) => break (Ok(()), false),
            Err(error) => break (Err(error), false),
        };
        let session = session.clone();
        tasks.spawn(async move {
            let _held = permits;
            session.handle(request, refusal, payload).await;
        });
    };
    // The protocol asks for every request in flight to be answered before the close.
    let drained = async { while tasks.join_next().await.is_some() {} };
    if stopped {
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, drained).await;
        tasks.shutdown().await;
    } else {
        drained.await;
    }
    let mut writer = session.writer.lock().await;
    let _ = writer.flush().await;
    let _ = writer.shutdown().await;
    ended
}

/// Reads the next request and its payload, under the budget; `None` at `NBD_CMD_DISC`.
async fn take_request(reader: &mut Reader, session: &Session, budget: &Budget) -> io::Result<Option<Taken>> {
    let request = read_request(reader).await?;
    session.stats.requests.fetch_add(1, Ordering::Relaxed);
    if request.command == NBD_CMD_DISC {
        return Ok(None);
    }
    let in_flight = budget.requests.clone().acquire_owned().await.expect("never closed");
    let refusal = session.check(&request);
    let payload_bytes = match request.command {
        NBD_CMD_READ | NBD_CMD_WRITE if refusal.is_none() => u64::from(request.len_bytes),
        _ => 0,
    };
    let permits = u32::try_from(payload_bytes.div_ceil(PERMIT_BYTES)).expect("payloads are at most 32 bits");
    let memory = budget.bytes.clone().acquire_many_owned(permits).await.expect("never closed");
    let payload = match (request.command, &refusal) {
        (NBD_CMD_WRITE, None) => Some(read_payload(reader, request.len_bytes).await?),
        (NBD_CMD_WRITE, Some(_)) => {
            // Read and dropped a piece at a time: the socket stays in step, nothing is kept.
            let discard = &mut reader.take(u64::from(request.len_bytes));
            tokio::io::copy(discard, &mut tokio::io::sink()).await?;
            None
        }
        _ => None,
    };
    Ok(Some(Taken { request, refusal, payload, permits: (in_flight, memory) }))
}

/// Reads one request header; a wrong magic is an error (the stream cannot be resynchronised).
async fn read_request(reader: &mut Reader) -> io::Result<Request> {
    let mut header = [0u8; 28];
    reader.read_exact(&mut header).await?;
    let magic = u32::from_be_bytes(header[0..4].try_into().expect("4 bytes"));
    if magic != NBD_REQUEST_MAGIC {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("request magic {magic:#010x}")));
    }
    Ok(Request {
        flags: u16::from_be_bytes([header[4], header[5]]),
        command: u16::from_be_bytes([header[6], header[7]]),
        cookie: u64::from_be_bytes(header[8..16].try_into().expect("8 bytes")),
        offset_bytes: u64::from_be_bytes(header[16..24].try_into().expect("8 bytes")),
        len_bytes: u32::from_be_bytes(header[24..28].try_into().expect("4 bytes")),
    })
}

/// Reads a write's payload into page-aligned memory (O_DIRECT devices take it as it is).
async fn read_payload(reader: &mut Reader, len_bytes: u32) -> io::Result<WriteBuf> {
    let len = len_bytes as usize;
    let mut buf = ReadBuf::with_capacity(len);
    let mut at = 0;
    while at < len {
        // One segment at a time: the segments' iterator is not to be held across an await.
        buf.set_window(at..len);
        let segment = buf.segments_mut().next().expect("a window that is not empty has a segment");
        at += segment.len();
        reader.read_exact(segment).await?;
    }
    buf.reset_window();
    Ok(buf.freeze())
}

impl Session {
    /// Why `request` is refused before anything is done for it, if it is.
    fn check(&self, request: &Request) -> Option<Refusal> {
        let export = &self.export;
        let name = command_name(request.command);
        let (offset, len) = (request.offset_bytes, u64::from(request.len_bytes));
        let allowed = match request.command {
            NBD_CMD_READ => NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_DF,
            NBD_CMD_WRITE | NBD_CMD_TRIM | NBD_CMD_FLUSH => NBD_CMD_FLAG_FUA,
            NBD_CMD_WRITE_ZEROES => NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE,
            NBD_CMD_BLOCK_STATUS => NBD_CMD_FLAG_REQ_ONE,
            _ => return Some((NBD_EINVAL, format!("unknown command {}", request.command))),
        };
        if request.flags & !allowed != 0 {
            return Some((NBD_EINVAL, format!("{name}: flags {:#x} not supported", request.flags)));
        }
        let writes = matches!(request.command, NBD_CMD_WRITE | NBD_CMD_TRIM | NBD_CMD_WRITE_ZEROES);
        if writes && export.read_only {
            return Some((NBD_EPERM, format!("{name}: the export is read-only")));
        }
        if request.command == NBD_CMD_FLUSH {
            return None;
        }
        if request.command == NBD_CMD_BLOCK_STATUS && !(self.negotiated.structured && self.negotiated.base_allocation) {
            return Some((NBD_EINVAL, format!("{name}: no metadata context was selected")));
        }
        if matches!(request.command, NBD_CMD_READ | NBD_CMD_WRITE) && request.len_bytes > export.payload_bytes_max {
            let errno = if request.command == NBD_CMD_READ { NBD_EOVERFLOW } else { NBD_EINVAL };
            return Some((
                errno,
                format!("{name} of {len} bytes: more than the maximum, {}", export.payload_bytes_max),
            ));
        }
        if offset.checked_add(len).is_none_or(|end| end > export.size_bytes) {
            let errno = if writes { NBD_ENOSPC } else { NBD_EINVAL };
            return Some((errno, format!("{name} of {len} bytes at {offset}: past the end, {}", export.size_bytes)));
        }
        let block = u64::from(export.block_bytes);
        let exact = matches!(request.command, NBD_CMD_READ | NBD_CMD_WRITE | NBD_CMD_WRITE_ZEROES);
        if exact && (offset % block != 0 || len % block != 0) {
            return Some((NBD_EINVAL, format!("{name} of {len} bytes at {offset}: not whole {block}-byte blocks")));
        }
        None
    }

    /// Runs one request and sends its reply.
    async fn handle(&self, request: Request, refusal: Option<Refusal>, payload: Option<WriteBuf>) {
        if let Some((errno, message)) = refusal {
            return self.reply_error(&request, errno, &message).await;
        }
        let device = &self.export.device;
        let sector = request.offset_bytes / SECTOR_SIZE as u64;
        let len_sectors = u64::from(request.len_bytes) / SECTOR_SIZE as u64;
        let result = match request.command {
            NBD_CMD_READ => return self.read(&request).await,
            NBD_CMD_BLOCK_STATUS => return self.block_status(&request).await,
            NBD_CMD_WRITE => device.write(sector, payload.expect("a write's payload was read")).await,
            NBD_CMD_FLUSH => device.flush().await,
            NBD_CMD_TRIM => self.trim(&request).await,
            NBD_CMD_WRITE_ZEROES if request.flags & NBD_CMD_FLAG_NO_HOLE == 0 && device.deallocates() => {
                device.deallocate(sector, len_sectors).await
            }
            NBD_CMD_WRITE_ZEROES => device.write_zeroes(sector, len_sectors).await,
            _ => unreachable!("refused by check"),
        };
        let result = match result {
            Ok(()) if request.flags & NBD_CMD_FLAG_FUA != 0 && request.command != NBD_CMD_FLUSH => device.flush().await,
            result => result,
        };
        match result {
            Ok(()) => self.reply_ok(&request).await,
            Err(error) => self.reply_error(&request, errno_of(&error), &error.to_string()).await,
        }
    }

    /// Trims the whole blocks inside the range (a trim is advisory: the edges stay).
    async fn trim(&self, request: &Request) -> io::Result<()> {
        let block = u64::from(self.export.block_bytes);
        let start = request.offset_bytes.div_ceil(block) * block;
        let end = (request.offset_bytes + u64::from(request.len_bytes)) / block * block;
        if end <= start {
            return Ok(());
        }
        let sector = SECTOR_SIZE as u64;
        self.export.device.deallocate(start / sector, (end - start) / sector).await
    }

    /// A read: one `OFFSET_DATA` chunk (or simple reply) with the data, or an error reply.
    async fn read(&self, request: &Request) {
        if request.len_bytes == 0 {
            return self.reply_ok(request).await;
        }
        let buf = ReadBuf::with_capacity(request.len_bytes as usize);
        let (buf, result) = self.export.device.read(request.offset_bytes / SECTOR_SIZE as u64, buf).await;
        match result {
            // A socket that failed is the reader's to notice.
            Ok(()) => drop(self.send_data(request, &buf).await),
            Err(error) => self.reply_error(request, errno_of(&error), &error.to_string()).await,
        }
    }

    async fn send_data(&self, request: &Request, buf: &ReadBuf) -> io::Result<()> {
        let mut writer = self.writer.lock().await;
        if self.negotiated.structured {
            let len = request.len_bytes + 8;
            writer
                .write_all(&chunk_header(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, request.cookie, len))
                .await?;
            writer.write_all(&request.offset_bytes.to_be_bytes()).await?;
        } else {
            writer.write_all(&simple_reply(0, request.cookie)).await?;
        }
        for segment in buf.segments() {
            writer.write_all(segment).await?;
        }
        writer.flush().await
    }

    /// `base:allocation` from the device's [`allocated`](kcopyd_core::BlockDevice::allocated):
    /// data where it says so, `HOLE | ZERO` elsewhere, from the request's offset, clipped to it.
    async fn block_status(&self, request: &Request) {
        let sector = SECTOR_SIZE as u64;
        let block = u64::from(self.export.block_bytes);
        let (offset, end) = (request.offset_bytes, request.offset_bytes + u64::from(request.len_bytes));
        if end == offset {
            return self.reply_error(request, NBD_EINVAL, "NBD_CMD_BLOCK_STATUS of 0 bytes").await;
        }
        let (first, last) = (offset / block * block, end.div_ceil(block) * block);
        let allocated = self.export.device.allocated(first / sector, (last - first) / sector).await;
        let data = match allocated {
            Ok(data) => data,
            Err(error) => return self.reply_error(request, errno_of(&error), &error.to_string()).await,
        };
        let mut extents: Vec<(u64, u32)> = Vec::new();
        let mut at = offset;
        for range in data.ranges() {
            let (start, stop) = ((range.start * sector).max(offset), (range.end * sector).min(end));
            if stop <= at {
                continue;
            }
            if start > at {
                extents.push((start - at, NBD_STATE_HOLE | NBD_STATE_ZERO));
            }
            extents.push((stop - start.max(at), 0));
            at = stop;
        }
        if at < end {
            extents.push((end - at, NBD_STATE_HOLE | NBD_STATE_ZERO));
        }
        let keep = if request.flags & NBD_CMD_FLAG_REQ_ONE != 0 { 1 } else { EXTENTS_MAX };
        let mut payload = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
        for (len, flags) in extents.into_iter().take(keep) {
            // Each extent is within the request, whose length fits 32 bits.
            payload.extend_from_slice(&(len as u32).to_be_bytes());
            payload.extend_from_slice(&flags.to_be_bytes());
        }
        let header =
            chunk_header(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS, request.cookie, payload.len() as u32);
        self.send(&[&header, &payload]).await;
    }

    async fn reply_ok(&self, request: &Request) {
        if self.negotiated.structured {
            self.send(&[&chunk_header(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, request.cookie, 0)]).await;
        } else {
            self.send(&[&simple_reply(0, request.cookie)]).await;
        }
    }

    async fn reply_error(&self, request: &Request, errno: u32, message: &str) {
        self.stats.errors_replied.fetch_add(1, Ordering::Relaxed);
        if self.negotiated.structured {
            let payload = error_payload(errno, message);
            let header = chunk_header(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, request.cookie, payload.len() as u32);
            self.send(&[&header, &payload]).await;
        } else {
            self.send(&[&simple_reply(errno, request.cookie)]).await;
        }
    }

    /// Writes one reply; a socket that failed is the reader's to notice.
    async fn send(&self, parts: &[&[u8]]) {
        let mut writer = self.writer.lock().await;
        for part in parts {
            if writer.write_all(part).await.is_err() {
                return;
            }
        }
        let _ = writer.flush().await;
    }
}
