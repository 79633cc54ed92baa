//! Write-zeroes in one place: the offload a device has (BLKZEROOUT on a block device,
//! `FALLOC_FL_ZERO_RANGE` on a file), and the fallback to plain writes of zeroes when there is
//! none or the filesystem refuses it. Runs on the device's thread pool: every call blocks.
//!
//! ```text
//!  zero(file, range, offload?) ── offload ── ok ──────────────────────► Offloaded
//!                                 │          └ unsupported ─► writes ─► WrittenAfterRefusal
//!                                 │          └ other error ─────────► Err
//!                                 └ none ─────────────────► writes ─► Written
//!  writes: WriteBuf::zeroes pieces of ≤ ZEROES_BYTES_PER_WRITE_MAX through write_at
//! ```

use std::fs::File;
use std::io;

use kcopyd_core::WriteBuf;

use crate::aligned::{ALIGNMENT_BYTES_MAX, MemoryRules};
use crate::engine_sync::write_at;
use crate::sys;

/// Largest write of zeroes one call issues when zeroing without offload.
pub const ZEROES_BYTES_PER_WRITE_MAX: usize = 1024 * 1024;

const _: () = assert!(ZEROES_BYTES_PER_WRITE_MAX % ALIGNMENT_BYTES_MAX as usize == 0);

/// How a device can zero a range without sending zeroes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Offload {
    /// `BLKZEROOUT` on a block device.
    BlockDeviceZeroOut,
    /// `fallocate(FALLOC_FL_ZERO_RANGE)` on a regular file.
    FileZeroRange,
}

/// How a write-zeroes request was served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Zeroed {
    /// The offload did it.
    Offloaded,
    /// Plain writes of zeroes did it (no offload was asked for).
    Written,
    /// Written after the filesystem refused the offload: do not ask it again.
    WrittenAfterRefusal,
}

/// Zeroes `len_bytes` at `offset_bytes` (already checked against the device): through
/// `offload` if given, falling back to plain writes when the offload is unsupported.
pub(crate) fn zero(
    file: &File,
    offset_bytes: u64,
    len_bytes: u64,
    offload: Option<Offload>,
    rules: Option<MemoryRules>,
) -> io::Result<Zeroed> {
    let Some(offload) = offload else {
        return write_zeroes_at(file, offset_bytes, len_bytes, rules).map(|()| Zeroed::Written);
    };
    let offloaded = match offload {
        Offload::BlockDeviceZeroOut => sys::block_device_zero_out(file, offset_bytes, len_bytes),
        Offload::FileZeroRange => sys::file_zero_range(file, offset_bytes, len_bytes),
    };
    match offloaded {
        Ok(()) => Ok(Zeroed::Offloaded),
        Err(error) if sys::is_unsupported(&error) => {
            write_zeroes_at(file, offset_bytes, len_bytes, rules).map(|()| Zeroed::WrittenAfterRefusal)
        }
        Err(error) => Err(error),
    }
}

/// Writes `len_bytes` of zeroes at `offset_bytes` with plain writes from the shared, page
/// aligned zero block, at most [`ZEROES_BYTES_PER_WRITE_MAX`] per call.
fn write_zeroes_at(file: &File, offset_bytes: u64, len_bytes: u64, rules: Option<MemoryRules>) -> io::Result<()> {
    let mut done_bytes = 0;
    while done_bytes < len_bytes {
        let piece_bytes = (len_bytes - done_bytes).min(ZEROES_BYTES_PER_WRITE_MAX as u64);
        write_at(file, offset_bytes + done_bytes, &WriteBuf::zeroes(piece_bytes as usize), rules)?;
        done_bytes += piece_bytes;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled_file(len_bytes: usize) -> File {
        let path = std::env::temp_dir().join(format!("kcopyd-os-zeroes-{}-{len_bytes}", std::process::id()));
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        rustix::io::pwrite(&file, &vec![0xa5; len_bytes], 0).unwrap();
        file
    }

    fn assert_zeroed_inside(file: &File, file_bytes: usize, range: std::ops::Range<usize>) {
        let mut back = vec![0u8; file_bytes];
        rustix::io::pread(file, &mut back, 0).unwrap();
        assert!(back[..range.start].iter().all(|&byte| byte == 0xa5), "bytes before the range kept");
        assert!(back[range.clone()].iter().all(|&byte| byte == 0), "the range is zero");
        assert!(back[range.end..].iter().all(|&byte| byte == 0xa5), "bytes after the range kept");
    }

    /// Without an offload the range is written, over several writes; the bytes around it stay.
    #[test]
    fn without_an_offload_the_zeroes_are_written_in_pieces() {
        let len_bytes = 2 * ZEROES_BYTES_PER_WRITE_MAX + 4096;
        let file_bytes = len_bytes + 8192;
        let file = filled_file(file_bytes);
        assert_eq!(zero(&file, 4096, len_bytes as u64, None, None).unwrap(), Zeroed::Written);
        assert_zeroed_inside(&file, file_bytes, 4096..4096 + len_bytes);
    }

    /// A filesystem's zero-range either works or is refused as unsupported and written
    /// instead; the bytes are zero either way.
    #[test]
    fn a_file_zero_range_is_offloaded_or_falls_back_to_writes() {
        let file = filled_file(16384);
        let zeroed = zero(&file, 4096, 8192, Some(Offload::FileZeroRange), None).unwrap();
        assert!(matches!(zeroed, Zeroed::Offloaded | Zeroed::WrittenAfterRefusal), "{zeroed:?}");
        assert_zeroed_inside(&file, 16384, 4096..12288);
    }

    /// An offload failing for another reason than "unsupported" (BLKZEROOUT on a regular file:
    /// ENOTTY) is an error, not a silent fallback; nothing is written.
    #[test]
    fn an_offload_failing_otherwise_is_an_error_and_writes_nothing() {
        let file = filled_file(8192);
        let error = zero(&file, 0, 4096, Some(Offload::BlockDeviceZeroOut), None).unwrap_err();
        assert_eq!(rustix::io::Errno::from_io_error(&error), Some(rustix::io::Errno::NOTTY), "{error}");
        assert_zeroed_inside(&file, 8192, 0..0);
    }
}
