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
//! one `NBD_CMD_READ` (or `NBD_CMD_WRITE` and a flush) here, awaited on this thread (bounded
//! by `--io-timeout` when given).

use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::{FileExt, MetadataExt};

use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use kcopyd_core::{BlockDevice, SECTOR_SIZE};

use crate::devices::Opened;

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
    /// The file cannot be opened again as the same inode, or the read fails or ends early.
    pub fn read(&self, opened: &Opened) -> io::Result<Vec<u8>> {
        let len_bytes = usize::try_from(self.len_bytes).expect("a tail is less than a block");
        if let Some(nbd) = &opened.nbd {
            return block_on(nbd.read_bytes(opened.arg.offset_bytes + self.offset_in_range_bytes, len_bytes));
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
    /// The file cannot be opened again as the same inode, or the write or the flush fails.
    pub fn write(&self, opened: &Opened, bytes: &[u8]) -> io::Result<()> {
        assert_eq!(bytes.len() as u64, self.len_bytes, "a tail's bytes fill the tail");
        if let Some(nbd) = &opened.nbd {
            block_on(nbd.write_bytes(opened.arg.offset_bytes + self.offset_in_range_bytes, bytes))?;
            return block_on(nbd.flush());
        }
        let file = reopen(opened, true)?;
        file.write_all_at(bytes, opened.arg.offset_bytes + self.offset_in_range_bytes)?;
        file.sync_data()
    }
}

/// Runs `future` to its end on this thread. NBD requests complete on the connection's own
/// thread, so nothing here needs a runtime.
fn block_on<F: Future>(future: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut context = Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut context) {
            return output;
        }
        std::thread::park();
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
