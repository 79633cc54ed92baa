//! The synchronous I/O engine: blocking positioned vectored I/O (`preadv`/`pwritev`) run on
//! the device's thread pool (`pool.rs`), so that the caller's thread (the copy engine's actors)
//! never blocks. Which memory goes to the kernel, and in which pieces, is `aligned.rs`'s.
//!
//! ```text
//!  caller thread                     pool thread
//!  read/write/flush ──submit──► read_at / write_at / fdatasync (owns the buffer and the file)
//!       │                              │  drop the file handle first,
//!       ◄──────── oneshot ◄────────────┘  then send (buffer, result) back
//! ```
//!
//! The buffer moves to the worker with the request and comes back with the completion: nothing
//! is borrowed across the blocking call, so a caller that drops its future early leaves the
//! worker holding the pages until the kernel is done with them.

use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut};
use std::sync::Arc;

use kcopyd_core::{ReadBuf, WriteBuf};
use rustix::io::Errno;
use tokio::sync::oneshot;

use crate::aligned::{Bounce, Direction, IOVECS_PER_CALL_MAX, MemoryRules, Transfer, bounce_rules, ended_early};
use crate::engine::{Engine, IoEngine, ReadReply};
use crate::pool::Pool;

/// The synchronous engine: every request is blocking work on its pool.
pub(crate) struct SyncEngine {
    pool: Pool,
}

impl SyncEngine {
    /// The engine over the pool its requests run on.
    pub(crate) fn new(pool: Pool) -> SyncEngine {
        SyncEngine { pool }
    }
}

impl Engine for SyncEngine {
    fn kind(&self) -> IoEngine {
        IoEngine::Sync
    }

    fn read(
        &self,
        file: Arc<File>,
        offset_bytes: u64,
        mut buf: ReadBuf,
        rules: Option<MemoryRules>,
    ) -> oneshot::Receiver<ReadReply> {
        self.pool.submit(move || {
            let result = read_at(&file, offset_bytes, &mut buf, rules);
            drop(file);
            (buf, result)
        })
    }

    fn write(
        &self,
        file: Arc<File>,
        offset_bytes: u64,
        buf: WriteBuf,
        rules: Option<MemoryRules>,
    ) -> oneshot::Receiver<io::Result<Transfer>> {
        self.pool.submit(move || {
            let result = write_at(&file, offset_bytes, &buf, rules);
            drop(file);
            result
        })
    }

    fn flush(&self, file: Arc<File>) -> oneshot::Receiver<io::Result<()>> {
        self.pool.submit(move || {
            let result = file.sync_data();
            drop(file);
            result
        })
    }

    fn pool(&self) -> &Pool {
        &self.pool
    }
}

/// Fills `buf`'s window from `offset_bytes`, through a bounce buffer if its segments break
/// `rules` (`None`: buffered I/O, any memory will do).
pub(crate) fn read_at(
    file: &File,
    offset_bytes: u64,
    buf: &mut ReadBuf,
    rules: Option<MemoryRules>,
) -> io::Result<Transfer> {
    let len_bytes = buf.len();
    if let Some(rules) = rules {
        rules.assert_request(offset_bytes, len_bytes);
    }
    let Some(rules) = bounce_rules(rules, buf.segments()) else {
        let mut slices: Vec<IoSliceMut<'_>> = buf.segments_mut().map(IoSliceMut::new).collect();
        preadv_exact(file, &mut slices, offset_bytes)?;
        return Ok(Transfer::Direct);
    };
    let mut bounce = Bounce::new(len_bytes, rules);
    let mut done_bytes = 0;
    while done_bytes < len_bytes {
        let piece = bounce.piece_from(done_bytes);
        preadv_exact(file, &mut [IoSliceMut::new(bounce.memory(&piece))], offset_bytes + piece.start as u64)?;
        bounce.unload(buf.segments_mut(), &piece);
        done_bytes = piece.end;
    }
    Ok(Transfer::Bounced)
}

/// Writes all of `buf` at `offset_bytes`, through a bounce buffer if its segments break
/// `rules` (`None`: buffered I/O).
pub(crate) fn write_at(
    file: &File,
    offset_bytes: u64,
    buf: &WriteBuf,
    rules: Option<MemoryRules>,
) -> io::Result<Transfer> {
    let len_bytes = buf.len();
    if let Some(rules) = rules {
        rules.assert_request(offset_bytes, len_bytes);
    }
    let segments = buf.segments();
    let Some(rules) = bounce_rules(rules, segments.iter().map(|segment| &segment[..])) else {
        let mut slices: Vec<IoSlice<'_>> = segments.iter().map(|segment| IoSlice::new(segment)).collect();
        pwritev_exact(file, &mut slices, offset_bytes)?;
        return Ok(Transfer::Direct);
    };
    let mut bounce = Bounce::new(len_bytes, rules);
    let mut done_bytes = 0;
    while done_bytes < len_bytes {
        let piece = bounce.piece_from(done_bytes);
        let memory = bounce.load(buf, &piece);
        pwritev_exact(file, &mut [IoSlice::new(memory)], offset_bytes + piece.start as u64)?;
        done_bytes = piece.end;
    }
    Ok(Transfer::Bounced)
}

/// `preadv` until every slice is full: retried on EINTR, continued after a short read, at
/// most [`IOVECS_PER_CALL_MAX`] slices per call. A read returning 0 (end of file) before the
/// slices are full is an error: the file shrank under the device.
fn preadv_exact(file: &File, mut slices: &mut [IoSliceMut<'_>], mut offset_bytes: u64) -> io::Result<()> {
    let wanted_bytes: usize = slices.iter().map(|slice| slice.len()).sum();
    let mut done_bytes = 0;
    while done_bytes < wanted_bytes {
        let batch = slices.len().min(IOVECS_PER_CALL_MAX);
        match rustix::io::preadv(file, &mut slices[..batch], offset_bytes) {
            Ok(0) => return Err(ended_early(Direction::Read, offset_bytes, wanted_bytes - done_bytes)),
            Ok(n) => {
                done_bytes += n;
                offset_bytes += n as u64;
                IoSliceMut::advance_slices(&mut slices, n);
            }
            Err(Errno::INTR) => {}
            Err(error) => return Err(error.into()),
        }
    }
    Ok(())
}

/// `pwritev` until every slice is written: retried on EINTR, continued after a short write,
/// at most [`IOVECS_PER_CALL_MAX`] slices per call. A write of 0 bytes is an error.
fn pwritev_exact(file: &File, mut slices: &mut [IoSlice<'_>], mut offset_bytes: u64) -> io::Result<()> {
    let wanted_bytes: usize = slices.iter().map(|slice| slice.len()).sum();
    let mut done_bytes = 0;
    while done_bytes < wanted_bytes {
        let batch = slices.len().min(IOVECS_PER_CALL_MAX);
        match rustix::io::pwritev(file, &slices[..batch], offset_bytes) {
            Ok(0) => return Err(ended_early(Direction::Write, offset_bytes, wanted_bytes - done_bytes)),
            Ok(n) => {
                done_bytes += n;
                offset_bytes += n as u64;
                IoSlice::advance_slices(&mut slices, n);
            }
            Err(Errno::INTR) => {}
            Err(error) => return Err(error.into()),
        }
    }
    Ok(())
}
