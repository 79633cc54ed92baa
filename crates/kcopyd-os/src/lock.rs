//! Advisory locks on the files a copy uses, held until it ends.
//!
//! ```text
//!  TARGET file of copy or zero ─► flock(LOCK_EX | LOCK_NB) ─► held: another kcopyd is refused
//!  SOURCE file, verify's files  ─► flock(LOCK_SH | LOCK_NB)    (exit 2, "busy"), nothing written
//!  the same file twice          ─► one lock per file: shared, raised to exclusive if written
//! ```
//!
//! Where the filesystem has no locks at all (`ENOLCK`, `EOPNOTSUPP`), the file is used unlocked.
//! Block devices are not locked here: a block device opened for writing is opened with O_EXCL
//! (see `kcopyd-os`), which the kernel enforces. The locks are advisory: they keep two kcopyd
//! runs (or any program that takes `flock` locks, such as `flock(1)`) from mixing their
//! writes, not a program that takes none.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use rustix::fs::FlockOperation;
use rustix::io::Errno;

/// A file's identity: its filesystem's device number and its inode number.
pub type FileKey = (u64, u64);

/// The lock a command takes on a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LockKind {
    /// Read: others may read, nobody may write.
    Shared,
    /// Written: nobody else may read or write.
    Exclusive,
}

/// Why a lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds a conflicting lock.
    #[error("another process holds a conflicting lock")]
    Busy,
    /// The file changed between opening it and locking it (renamed or replaced).
    #[error("the file was replaced while it was being opened")]
    Replaced,
    /// Opening or locking failed otherwise.
    #[error("cannot lock the file: {0}")]
    Io(#[source] std::io::Error),
}

/// The locks held, one per file.
#[derive(Debug, Default)]
pub struct FileLocks {
    held: Vec<(FileKey, LockKind, File)>,
}

impl FileLocks {
    /// Locks the file at `path`, which was opened as the file `id`, for `kind` (or keeps
    /// the lock already held on it, raised to exclusive if `kind` asks for it).
    ///
    /// # Errors
    /// Another process holds a conflicting lock, the path names another file now, or the
    /// system refused.
    pub fn lock(&mut self, path: &Path, id: FileKey, kind: LockKind) -> Result<(), LockError> {
        if let Some((_, held, file)) = self.held.iter_mut().find(|(held_id, _, _)| *held_id == id) {
            if *held < kind {
                try_lock(file, kind)?;
                *held = kind;
            }
            return Ok(());
        }
        let file = File::open(path).map_err(LockError::Io)?;
        let metadata = file.metadata().map_err(LockError::Io)?;
        if (metadata.dev(), metadata.ino()) != id {
            return Err(LockError::Replaced);
        }
        try_lock(&file, kind)?;
        self.held.push((id, kind, file));
        Ok(())
    }
}

fn try_lock(file: &File, kind: LockKind) -> Result<(), LockError> {
    let operation = match kind {
        LockKind::Shared => FlockOperation::NonBlockingLockShared,
        LockKind::Exclusive => FlockOperation::NonBlockingLockExclusive,
    };
    loop {
        match rustix::fs::flock(file, operation) {
            Ok(()) => return Ok(()),
            Err(Errno::INTR) => continue,
            Err(Errno::WOULDBLOCK) => return Err(LockError::Busy),
            // A filesystem without locks (NFS without lockd, say): nothing to take, nothing
            // to keep other runs out with; the copy itself works as before.
            Err(Errno::NOLCK | Errno::OPNOTSUPP | Errno::NOSYS) => return Ok(()),
            Err(error) => return Err(LockError::Io(error.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id_of(path: &Path) -> FileKey {
        let metadata = std::fs::metadata(path).unwrap();
        (metadata.dev(), metadata.ino())
    }

    #[test]
    fn one_lock_per_file_raised_when_written_and_refused_to_others() {
        let path = std::env::temp_dir().join(format!("kcopyd-locks-{}", std::process::id()));
        std::fs::write(&path, [0u8; 512]).unwrap();
        let id = id_of(&path);
        let mut ours = FileLocks::default();
        ours.lock(&path, id, LockKind::Shared).unwrap();
        ours.lock(&path, id, LockKind::Exclusive).unwrap();
        ours.lock(&path, id, LockKind::Shared).unwrap();
        assert_eq!(ours.held.len(), 1);
        assert_eq!(ours.held[0].1, LockKind::Exclusive);
        // Another set of locks stands for another run.
        let mut theirs = FileLocks::default();
        assert!(matches!(theirs.lock(&path, id, LockKind::Shared), Err(LockError::Busy)));
        drop(ours);
        theirs.lock(&path, id, LockKind::Shared).unwrap();
        let mut third = FileLocks::default();
        third.lock(&path, id, LockKind::Shared).unwrap();
        assert!(matches!(third.lock(&path, id, LockKind::Exclusive), Err(LockError::Busy)), "readers keep writers out");
        let other = (id.0, id.1 + 1);
        assert!(matches!(FileLocks::default().lock(&path, other, LockKind::Shared), Err(LockError::Replaced)));
        std::fs::remove_file(&path).unwrap();
    }
}
