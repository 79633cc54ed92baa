//! The partial last block of a range on regular files (moved through the page cache, see
//! [`kcopyd_os::read_tail`]) and on NBD exports (byte requests, where the server's minimum
//! block size allows them).
//!
//! ```text
//!  source file of 1,000,001 bytes, 4096-byte blocks:
//!  |<──────── 244 whole blocks: the engine, O_DIRECT ────────>|<─ 577 bytes: here ─>|
//!  0                                                       999,424            1,000,001
//! ```
//!
//! O_DIRECT moves whole logical blocks only, so the engine copies, zeroes and compares the
//! whole blocks of a range and this module the bytes after them: a buffered `pread` and
//! `pwrite` (and `fdatasync`) on a second descriptor of the same file, checked to be the same
//! inode. The engine's writes end before the tail starts, so the two never touch the same
//! bytes; the kernel writes dirty cached pages back before a later O_DIRECT read of them.
//!
//! An NBD export of 1,000 bytes is one 512-byte block for the engine; its last 488 bytes are
//! one `NBD_CMD_READ` (or `NBD_CMD_WRITE` and a flush) here, awaited against a [`Cancel`]
//! token: cancelling abandons the request ([`TailError::Cancelled`]), so a stalled server holds
//! the run up no longer than a cancellation (the NBD I/O timeout bounds it otherwise). A
//! file's tail is a buffered read or write of less than a block; a token cancelled before it
//! is taken first.

use std::io;
use std::ops::Range;

use kcopyd_core::{BlockDevice, SECTOR_SIZE};

use crate::cancel::Cancel;
use crate::open::Opened;

/// Why a tail was not read or written.
#[derive(Debug, thiserror::Error)]
pub enum TailError {
    /// The read, the write or the flush failed.
    #[error("the partial last block: {0}")]
    Io(#[from] io::Error),
    /// The run was cancelled first: the request (if one was sent) was abandoned.
    #[error("the partial last block was not finished: cancelled")]
    Cancelled,
}

/// Where the tail of a range lies: `offset_in_range_bytes` bytes into the range (a whole
/// number of blocks), `len_bytes` long (less than a block).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tail {
    /// Bytes from the start of the range to the tail: the whole blocks before it.
    pub offset_in_range_bytes: u64,
    /// Bytes in the tail; 0 when the range is whole blocks.
    pub len_bytes: u64,
}

impl Tail {
    /// The tail of a range of `len_bytes` moved in `block_bytes` blocks.
    ///
    /// Worked example: 1,000,001 bytes in 4096-byte blocks: 244 blocks (999,424 bytes), then a
    /// tail of 577 bytes.
    pub fn of(len_bytes: u64, block_bytes: u64) -> Tail {
        let offset_in_range_bytes = len_bytes / block_bytes * block_bytes;
        Tail { offset_in_range_bytes, len_bytes: len_bytes - offset_in_range_bytes }
    }

    /// Whether there is anything past the whole blocks.
    pub fn is_empty(&self) -> bool {
        self.len_bytes == 0
    }

    /// The sectors of the range that hold the tail (the last one partly), relative to the
    /// range.
    pub fn range_sectors(&self) -> Range<u64> {
        let sector = SECTOR_SIZE as u64;
        self.offset_in_range_bytes / sector..(self.offset_in_range_bytes + self.len_bytes).div_ceil(sector)
    }

    /// The sectors of `opened` that hold the tail (the last one partly).
    pub fn sectors(&self, opened: &Opened) -> Range<u64> {
        let sector = SECTOR_SIZE as u64;
        let start = opened.arg.offset_bytes + self.offset_in_range_bytes;
        start / sector..(start + self.len_bytes).div_ceil(sector)
    }

    /// Reads the tail of `opened`'s range.
    ///
    /// # Errors
    /// The file cannot be opened again as the same inode, or the read fails or ends early
    /// ([`TailError::Io`]); `cancel` fired before or during it ([`TailError::Cancelled`]).
    pub async fn read(&self, opened: &Opened, cancel: &Cancel) -> Result<Vec<u8>, TailError> {
        let len_bytes = usize::try_from(self.len_bytes).expect("a tail is less than a block");
        if cancel.is_cancelled() {
            return Err(TailError::Cancelled);
        }
        if let Some(nbd) = &opened.nbd {
            let at = opened.arg.offset_bytes + self.offset_in_range_bytes;
            return Ok(until_cancelled(nbd.read_bytes(at, len_bytes), cancel).await??);
        }
        let (path, key) = file_of(opened);
        Ok(kcopyd_os::read_tail(path, key, opened.arg.offset_bytes + self.offset_in_range_bytes, len_bytes)?)
    }

    /// Writes `bytes` (the tail's length) at the tail of `opened`'s range, and makes them
    /// durable.
    ///
    /// # Errors
    /// The file cannot be opened again as the same inode, or the write or the flush fails
    /// ([`TailError::Io`]); `cancel` fired before or during it ([`TailError::Cancelled`]: the
    /// tail may or may not have reached the target).
    pub async fn write(&self, opened: &Opened, bytes: &[u8], cancel: &Cancel) -> Result<(), TailError> {
        assert_eq!(bytes.len() as u64, self.len_bytes, "a tail's bytes fill the tail");
        if cancel.is_cancelled() {
            return Err(TailError::Cancelled);
        }
        if let Some(nbd) = &opened.nbd {
            let at = opened.arg.offset_bytes + self.offset_in_range_bytes;
            until_cancelled(nbd.write_bytes(at, bytes), cancel).await??;
            return Ok(until_cancelled(nbd.flush(), cancel).await??);
        }
        let (path, key) = file_of(opened);
        Ok(kcopyd_os::write_tail(path, key, opened.arg.offset_bytes + self.offset_in_range_bytes, bytes)?)
    }
}

/// Awaits `future` (an NBD request: it completes on the connection's own thread) unless
/// `cancel` fires first: then the request is abandoned.
async fn until_cancelled<F: Future>(future: F, cancel: &Cancel) -> Result<F::Output, TailError> {
    tokio::select! {
        output = future => Ok(output),
        () = cancel.cancelled() => Err(TailError::Cancelled),
    }
}

/// The path of `opened` (a regular file) and the file it was opened as.
fn file_of(opened: &Opened) -> (&std::path::Path, kcopyd_os::FileKey) {
    let facts = opened.os.as_ref().expect("tails are on regular files only");
    let id = opened.device.id();
    (&facts.path, (id.major, id.minor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tails_are_what_whole_blocks_leave() {
        assert_eq!(Tail::of(1_000_001, 4096), Tail { offset_in_range_bytes: 999_424, len_bytes: 577 });
        assert_eq!(Tail::of(1_000_001, 512), Tail { offset_in_range_bytes: 999_936, len_bytes: 65 });
        assert!(Tail::of(8192, 4096).is_empty());
        assert_eq!(Tail::of(100, 512), Tail { offset_in_range_bytes: 0, len_bytes: 100 });
    }
}
