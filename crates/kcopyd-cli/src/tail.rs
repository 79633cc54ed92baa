//! The partial last block of a range on regular files (moved through the page cache) and on
//! NBD exports (byte requests, where the server's minimum block size allows them).
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
//! one `NBD_CMD_READ` (or `NBD_CMD_WRITE` and a flush) here, awaited on the command's runtime
//! against the signals: the first SIGINT or SIGTERM abandons the request
//! ([`TailError::Interrupted`]), so a stalled server holds the command up no longer than a
//! signal (`--io-timeout` bounds it otherwise). A file's tail is a buffered read or write of
//! less than a block; a signal that came before it is taken first.

use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::{FileExt, MetadataExt};

use kcopyd_core::{BlockDevice, SECTOR_SIZE};

use crate::devices::Opened;
use crate::progress::Interrupts;

/// Why a tail was not read or written.
#[derive(Debug, thiserror::Error)]
pub enum TailError {
    /// The read, the write or the flush failed.
    #[error("the partial last block: {0}")]
    Io(#[from] io::Error),
    /// A signal came first: the request (if one was sent) was abandoned. Its exit code.
    #[error("the partial last block was not finished: interrupted (exit {0})")]
    Interrupted(u8),
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
    /// ([`TailError::Io`]); a signal came before or during it ([`TailError::Interrupted`]).
    pub async fn read(&self, opened: &Opened, interrupts: &mut Interrupts) -> Result<Vec<u8>, TailError> {
        let len_bytes = usize::try_from(self.len_bytes).expect("a tail is less than a block");
        if let Some(code) = interrupts.take_pending() {
            return Err(TailError::Interrupted(code));
        }
        if let Some(nbd) = &opened.nbd {
            let at = opened.arg.offset_bytes + self.offset_in_range_bytes;
            return Ok(until_signal(nbd.read_bytes(at, len_bytes), interrupts).await??);
        }
        let file = reopen(opened, false)?;
        let mut bytes = vec![0; len_bytes];
        file.read_exact_at(&mut bytes, opened.arg.offset_bytes + self.offset_in_range_bytes)?;
        Ok(bytes)
    }

    /// Writes `bytes` (the tail's length) at the tail of `opened`'s range, and makes them
    /// durable.
    ///
    /// # Errors
    /// The file cannot be opened again as the same inode, or the write or the flush fails
    /// ([`TailError::Io`]); a signal came before or during it ([`TailError::Interrupted`]: the
    /// tail may or may not have reached the target).
    pub async fn write(&self, opened: &Opened, bytes: &[u8], interrupts: &mut Interrupts) -> Result<(), TailError> {
        assert_eq!(bytes.len() as u64, self.len_bytes, "a tail's bytes fill the tail");
        if let Some(code) = interrupts.take_pending() {
            return Err(TailError::Interrupted(code));
        }
        if let Some(nbd) = &opened.nbd {
            let at = opened.arg.offset_bytes + self.offset_in_range_bytes;
            until_signal(nbd.write_bytes(at, bytes), interrupts).await??;
            return Ok(until_signal(nbd.flush(), interrupts).await??);
        }
        let file = reopen(opened, true)?;
        file.write_all_at(bytes, opened.arg.offset_bytes + self.offset_in_range_bytes)?;
        Ok(file.sync_data()?)
    }
}

/// Awaits `future` (an NBD request: it completes on the connection's own thread) unless a
/// signal comes first: then the request is abandoned and the signal's exit code returned.
async fn until_signal<F: Future>(future: F, interrupts: &mut Interrupts) -> Result<F::Output, TailError> {
    tokio::select! {
        output = future => Ok(output),
        code = interrupts.recv() => Err(TailError::Interrupted(code)),
    }
}

/// Opens the file of `opened` again, buffered, and checks that it is still the same inode.
fn reopen(opened: &Opened, write: bool) -> io::Result<File> {
    let facts = opened.os.as_ref().expect("tails are on regular files only");
    let file = OpenOptions::new().read(true).write(write).open(&facts.path)?;
    let metadata = file.metadata()?;
    let id = opened.device.id();
    if !metadata.is_file() || (metadata.dev(), metadata.ino()) != (id.major, id.minor) {
        return Err(io::Error::other("the file was replaced during the run"));
    }
    Ok(file)
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
