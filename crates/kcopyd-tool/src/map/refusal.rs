//! Why a copy map or a device of its copy is refused: typed, each naming what was found, with
//! the messages `kcopyd copy --map` prints after `map 'FILE': ` or `SOURCE/TARGET 'ADDRESS': `.
//!
//! ```text
//!  MapFileError::Refused { path, MapRefusal }     the map file: busy, not a file, read-only,
//!                                                 another copy's, other devices', unreadable
//!  MapFileError::Device  { role, text, DeviceRefusal }   a device a map line cannot record
//! ```

use std::io;

use rustix::io::Errno;
use thiserror::Error;

use super::MapError;

/// What a map that cannot vouch for what it holds tells the user to do.
const START_OVER: &str = "the map cannot vouch for what it holds: to start over, delete the map";

/// Why a map file cannot be used ([`MapFileError::Refused`](super::MapFileError::Refused)).
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum MapRefusal {
    /// Its metadata cannot be read.
    #[error("cannot read it ({0})")]
    Stat(#[source] io::Error),
    /// It cannot be opened (or created) for appending.
    #[error("cannot open it for appending ({0})")]
    OpenAppend(#[source] io::Error),
    /// Another file took its name while it was being opened, or it was removed.
    #[error("the map was replaced or removed while it was being opened")]
    Replaced,
    /// A directory, a device or another special file.
    #[error("not a regular file: a map is a file of its own")]
    NotAFile,
    /// A file of proc, sysfs or the like, where writing sets something in the kernel.
    #[error("a file of the {filesystem} filesystem, not a file to keep a map in")]
    PseudoFile {
        /// The filesystem's name (`proc`).
        filesystem: &'static str,
    },
    /// It is a file of the copy itself.
    #[error("is {role} '{text}' itself: the map must be a file of its own")]
    DeviceOfTheCopy {
        /// `SOURCE` or `TARGET`.
        role: &'static str,
        /// The device as given.
        text: String,
    },
    /// Its mode lets nobody write it.
    #[error("read-only file (mode {mode:o}): refusing to append to it, also as root; make it writable first")]
    ReadOnly {
        /// The permission bits.
        mode: u32,
    },
    /// Another run holds its lock.
    #[error("map busy: another kcopyd (or a program holding a flock lock on it) is using it")]
    Busy,
    /// It cannot be locked.
    #[error("cannot lock it: {0}")]
    Lock(Errno),
    /// A torn last line (a crash during an append) cannot be cut off.
    #[error("cannot cut off its torn last line ({0})")]
    CutTornLine(#[source] io::Error),
    /// Its header cannot be written.
    #[error("cannot write it ({0})")]
    Write(#[source] io::Error),
    /// It does not read as a map.
    #[error("{0}")]
    Read(#[source] MapError),
    /// It records another copy (other lengths, offsets or target count).
    #[error("the map is for another copy ({found}); this copy is {expected}")]
    OtherCopy {
        /// The copy the map records.
        found: String,
        /// This copy.
        expected: String,
    },
    /// A device is not the one the map was written for.
    #[error(
        "{role} '{name}' is not the device the map was written for (the map: {recorded}; now: {now}): {START_OVER}"
    )]
    OtherDevice {
        /// `SOURCE` or `TARGET`.
        role: &'static str,
        /// The device as given.
        name: String,
        /// Its identity in the map.
        recorded: String,
        /// Its identity now.
        now: String,
    },
    /// A target whose data the map cannot vouch for (created by this run, or a disk that does
    /// not outlive it).
    #[error("TARGET '{name}' {why}: {START_OVER}")]
    Untrusted {
        /// The target as given.
        name: String,
        /// Why its data cannot be vouched for.
        why: &'static str,
    },
}

/// Why a device of the copy cannot be recorded in a map
/// ([`MapFileError::Device`](super::MapFileError::Device)).
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum DeviceRefusal {
    /// Its name holds a newline, which a line of the map cannot hold.
    #[error("the name holds a newline, which a --map line cannot record")]
    NewlineInName,
    /// The file cannot be looked at (statx).
    #[error("cannot look at the file: {0}")]
    Statx(Errno),
    /// The file cannot be looked at (stat).
    #[error("cannot look at the file: {0}")]
    Stat(#[source] io::Error),
    /// The path names another file than the one opened.
    #[error("the file was replaced while it was being opened")]
    Replaced,
}
