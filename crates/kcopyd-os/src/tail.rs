//! The bytes of a regular file past its last whole logical block: buffered `pread` and
//! `pwrite` on a second descriptor of the same file, checked to be the same inode.
//!
//! ```text
//!  file of 1,000,001 bytes, 4096-byte blocks:
//!  |<──── 244 whole blocks: O_DIRECT (OsDevice) ────>|<─ 577 bytes: read_tail / write_tail ─>|
//!  0                                             999,424                              1,000,001
//! ```
//!
//! O_DIRECT moves whole logical blocks only. The partial last block of a file goes through
//! the page cache instead; the O_DIRECT writes end before it starts, so the two never touch
//! the same bytes, and the kernel writes dirty cached pages back before a later O_DIRECT
//! read of them.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use crate::FileKey;

/// Reads `len_bytes` at byte `at_bytes` of the file at `path`, which must still be the file
/// `id` (its filesystem's device number and inode number).
///
/// # Errors
/// The path names another file now, or the read fails or ends early.
pub fn read_tail(path: &Path, id: FileKey, at_bytes: u64, len_bytes: usize) -> io::Result<Vec<u8>> {
    let file = reopen(path, id, false)?;
    let mut bytes = vec![0; len_bytes];
    file.read_exact_at(&mut bytes, at_bytes)?;
    Ok(bytes)
}

/// Writes `bytes` at byte `at_bytes` of the file at `path` (still the file `id`) and makes
/// them durable (`fdatasync`).
///
/// # Errors
/// The path names another file now, or the write or the flush fails.
pub fn write_tail(path: &Path, id: FileKey, at_bytes: u64, bytes: &[u8]) -> io::Result<()> {
    let file = reopen(path, id, true)?;
    file.write_all_at(bytes, at_bytes)?;
    file.sync_data()
}

/// Opens the file at `path` again, buffered, and checks that it is still the file `id`.
fn reopen(path: &Path, id: FileKey, write: bool) -> io::Result<File> {
    let file = OpenOptions::new().read(true).write(write).open(path)?;
    let metadata = file.metadata()?;
    if !metadata.is_file() || (metadata.dev(), metadata.ino()) != id {
        return Err(io::Error::other("the file was replaced during the run"));
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tails_round_trip_and_a_replaced_file_is_refused() {
        let path = std::env::temp_dir().join(format!("kcopyd-os-tail-{}", std::process::id()));
        std::fs::write(&path, [7u8; 1000]).unwrap();
        let metadata = std::fs::metadata(&path).unwrap();
        let id = (metadata.dev(), metadata.ino());
        write_tail(&path, id, 990, &[1; 10]).unwrap();
        assert_eq!(read_tail(&path, id, 988, 12).unwrap(), [7, 7, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]);
        assert!(read_tail(&path, id, 995, 10).is_err(), "a read past the end ends early");
        let other = (id.0, id.1 + 1);
        assert!(read_tail(&path, other, 0, 1).is_err() && write_tail(&path, other, 0, &[0]).is_err());
        std::fs::remove_file(&path).unwrap();
    }
}
