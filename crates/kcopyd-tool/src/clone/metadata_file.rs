//! The metadata file of a clone (`kcopyd clone --metadata FILE`): kcopyd-clone's metadata (two commit slots and their
//! bitmaps) from its start, and one last block recording what the metadata is for.
//!
//! ```text
//!  [ headers | bitmaps (kcopyd-clone, docs/CLONE.md) | identity block (4096 bytes) ]
//!  identity:  kcopyd-clone-file 1
//!             state ready                       ← `new` until the clone's metadata is written
//!             region-size 65536
//!             source disk.img                   ← the argument as given
//!             id file dev=2049 ino=131 size=… born=…   ← as a copy map records it
//!             destination clone.img
//!             id file dev=2049 ino=140 size=… born=…
//!             crc 1a2b3c4d                      ← CRC-32C of the lines above
//! ```
//!
//! The file is locked (`flock`, exclusive) for the whole run: two servers never share it. A
//! file that is not empty and holds no valid identity block is not this command's, and is
//! refused, never overwritten. The identity is written `new` before the clone's metadata and
//! `ready` after it: a run stopped in between (nothing was served yet) starts afresh.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kcopyd_os::{FileLocks, LockError, LockKind};
use thiserror::Error;

use crate::clone::MetadataError;
use crate::open::CreatedHook;

/// The first line of the identity block.
pub const IDENTITY_MAGIC: &str = "kcopyd-clone-file 1";
/// Bytes of the identity block at the end of the file.
pub const IDENTITY_BYTES: u64 = 4096;

/// Why an identity block cannot be written or read.
#[derive(Debug, Error)]
pub enum IdentityError {
    /// A name or identity holds a newline: the block's lines cannot record it.
    #[error("a device name or identity holds a newline, which the metadata file cannot record")]
    Newline,
    /// The identity does not fit one block.
    #[error("the identity of the devices takes {len_bytes} bytes, more than {IDENTITY_BYTES}")]
    TooLong {
        /// The identity's length.
        len_bytes: usize,
    },
    /// The block is not UTF-8 text.
    #[error("its identity block is not text")]
    NotText,
    /// The block does not start with [`IDENTITY_MAGIC`].
    #[error("it holds no kcopyd clone identity block at its end")]
    NoMagic,
    /// No `crc` line.
    #[error("its identity block has no checksum")]
    NoChecksum,
    /// The `crc` line does not match the lines above it.
    #[error("its identity block fails its checksum")]
    BadChecksum,
    /// A line is missing or does not start with its key.
    #[error("its identity block's line {line} is not '{key}…'")]
    Line {
        /// The line's number, from 1.
        line: usize,
        /// The key it should start with.
        key: &'static str,
    },
    /// The `state` line names no known state.
    #[error("its identity block has an unknown state {0:?}")]
    UnknownState(String),
    /// The `region-size` line holds no number.
    #[error("its identity block's region size is not a number")]
    RegionSize,
    /// The file is shorter than one block.
    #[error("it is {len_bytes} bytes long, shorter than an identity block")]
    Short {
        /// The file's length.
        len_bytes: u64,
    },
    /// The block could not be read.
    #[error("cannot read it ({0})")]
    Read(#[source] io::Error),
}

/// Whether the clone's own metadata is complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Being created: the clone's metadata may be incomplete; nothing was served.
    New,
    /// The clone's metadata was written: open it.
    Ready,
}

/// What a metadata file is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Whether the clone's metadata is complete.
    pub state: State,
    /// The clone's region size.
    pub region_size_bytes: u64,
    /// The source's argument as given.
    pub source_name: String,
    /// The source's identity (see the copy map's `id` lines).
    pub source_id: String,
    /// The destination's argument as given.
    pub destination_name: String,
    /// The destination's identity.
    pub destination_id: String,
}

impl Identity {
    /// The block: the lines, their CRC-32C, zeroes to [`IDENTITY_BYTES`].
    ///
    /// # Errors
    /// The text does not fit one block, or a name holds a newline.
    pub fn encode(&self) -> Result<Vec<u8>, IdentityError> {
        let names = [&self.source_name, &self.source_id, &self.destination_name, &self.destination_id];
        if names.iter().any(|name| name.contains('\n')) {
            return Err(IdentityError::Newline);
        }
        let state = match self.state {
            State::New => "new",
            State::Ready => "ready",
        };
        let text = format!(
            "{IDENTITY_MAGIC}\nstate {state}\nregion-size {}\nsource {}\nid {}\ndestination {}\nid {}\n",
            self.region_size_bytes, self.source_name, self.source_id, self.destination_name, self.destination_id
        );
        let text = format!("{text}crc {:08x}\n", kcopyd_clone::crc32c(text.as_bytes()));
        if text.len() as u64 > IDENTITY_BYTES {
            return Err(IdentityError::TooLong { len_bytes: text.len() });
        }
        let mut block = text.into_bytes();
        block.resize(IDENTITY_BYTES as usize, 0);
        Ok(block)
    }

    /// Reads a block written by [`Identity::encode`].
    ///
    /// # Errors
    /// No magic, a bad checksum, a missing or malformed line.
    pub fn decode(block: &[u8]) -> Result<Identity, IdentityError> {
        let end = block.iter().position(|&b| b == 0).unwrap_or(block.len());
        let text = std::str::from_utf8(&block[..end]).map_err(|_| IdentityError::NotText)?;
        if !text.starts_with(&format!("{IDENTITY_MAGIC}\n")) {
            return Err(IdentityError::NoMagic);
        }
        let crc_at = text.rfind("crc ").ok_or(IdentityError::NoChecksum)?;
        let stated = text[crc_at + 4..].trim_end();
        if u32::from_str_radix(stated, 16).ok() != Some(kcopyd_clone::crc32c(&text.as_bytes()[..crc_at])) {
            return Err(IdentityError::BadChecksum);
        }
        let lines: Vec<&str> = text[..crc_at].lines().collect();
        let field = |index: usize, key: &'static str| {
            lines
                .get(index)
                .and_then(|line| line.strip_prefix(key))
                .map(str::to_owned)
                .ok_or(IdentityError::Line { line: index + 1, key })
        };
        let state = match field(1, "state ")?.as_str() {
            "new" => State::New,
            "ready" => State::Ready,
            other => return Err(IdentityError::UnknownState(other.to_owned())),
        };
        let region_size_bytes = field(2, "region-size ")?.parse().map_err(|_| IdentityError::RegionSize)?;
        Ok(Identity {
            state,
            region_size_bytes,
            source_name: field(3, "source ")?,
            source_id: field(4, "id ")?,
            destination_name: field(5, "destination ")?,
            destination_id: field(6, "id ")?,
        })
    }
}

/// The metadata file, open and locked for the run.
#[derive(Debug)]
pub struct MetadataFile {
    /// Where it is.
    pub path: PathBuf,
    file: File,
    /// The exclusive lock on it, held while this value lives.
    _lock: FileLocks,
    /// Created by this run: removed again if the run fails before serving.
    created: bool,
    /// Told of the file while this run may still remove it.
    hook: Option<Arc<dyn CreatedHook>>,
    /// What the file says it is for (`None`: empty, new).
    pub existing: Option<Identity>,
}

impl Drop for MetadataFile {
    fn drop(&mut self) {
        if self.created {
            // Still locked: no other run has it. Only while the path names it: a file
            // renamed over it since is someone else's.
            crate::open::remove_made(&self.path, &self.file);
            if let Some(hook) = &self.hook {
                hook.forget(std::slice::from_ref(&self.path));
            }
        }
    }
}

impl MetadataFile {
    /// Opens (creating if missing) and locks the file at `path`; refuses it if it is one of
    /// `devices` (argument name and (device, inode)), busy, not a regular file, or not empty
    /// and not a metadata file. `hook` is told of a file created here until it is kept.
    ///
    /// # Errors
    /// What is wrong with the file; nothing is written, and a file created here is removed.
    pub fn open(
        path: &Path,
        devices: &[(&str, (u64, u64))],
        hook: Option<Arc<dyn CreatedHook>>,
    ) -> Result<MetadataFile, MetadataError> {
        if let Some(filesystem) = kcopyd_os::pseudo_filesystem_at(path) {
            return Err(MetadataError::PseudoFile { filesystem });
        }
        let missing = matches!(std::fs::symlink_metadata(path), Err(e) if e.kind() == io::ErrorKind::NotFound);
        // Created exclusively: if another run made it in the meantime, it is that run's (its
        // lock says so below) and not removed with this one's refusal.
        let made = if missing {
            match OpenOptions::new().read(true).write(true).create_new(true).mode(0o644).open(path) {
                Ok(file) => Some(file),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => None,
                Err(e) => return Err(MetadataError::Open(e)),
            }
        } else {
            None
        };
        let created = made.is_some();
        let file = match made {
            Some(file) => file,
            None => OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o644)
                .open(path)
                .map_err(MetadataError::Open)?,
        };
        // From here a file this run made is removed on every refusal below.
        let mut opened =
            MetadataFile { path: path.to_path_buf(), file, _lock: FileLocks::default(), created, hook, existing: None };
        let metadata = opened.file.metadata().map_err(MetadataError::Stat)?;
        if !metadata.is_file() {
            opened.created = false;
            return Err(MetadataError::NotRegular);
        }
        let key = (metadata.dev(), metadata.ino());
        if let Some((name, _)) = devices.iter().find(|(_, device)| *device == key) {
            opened.created = false;
            return Err(MetadataError::IsDevice { name: (*name).to_owned() });
        }
        opened.lock(key)?;
        if opened.created {
            // Ours and locked: removed too by a quit before the clone is served.
            if let Some(hook) = &opened.hook {
                drop(hook.creating(&opened.path));
            }
        }
        if metadata.len() > 0 {
            opened.existing = Some(opened.read_identity(metadata.len()).map_err(MetadataError::NotMetadata)?);
        }
        Ok(opened)
    }

    /// Takes the exclusive lock on the file, (device, inode) `key`.
    fn lock(&mut self, key: (u64, u64)) -> Result<(), MetadataError> {
        match self._lock.lock(&self.path, key, LockKind::Exclusive) {
            Ok(()) => Ok(()),
            Err(LockError::Busy) => {
                self.created = false;
                Err(MetadataError::Busy)
            }
            Err(LockError::Replaced) => {
                self.created = false;
                Err(MetadataError::Replaced)
            }
            Err(other) => Err(MetadataError::Lock(other)),
        }
    }

    fn read_identity(&self, len_bytes: u64) -> Result<Identity, IdentityError> {
        if len_bytes < IDENTITY_BYTES {
            return Err(IdentityError::Short { len_bytes });
        }
        let mut block = vec![0u8; IDENTITY_BYTES as usize];
        self.file.read_exact_at(&mut block, len_bytes - IDENTITY_BYTES).map_err(IdentityError::Read)?;
        Identity::decode(&block)
    }

    /// Sizes the file to `clone_bytes` of clone metadata and the identity block after it, and
    /// writes `identity` there, durably.
    ///
    /// # Errors
    /// The identity cannot be recorded, or the write or the sync failed.
    pub fn write_identity(&self, clone_bytes: u64, identity: &Identity) -> Result<(), MetadataError> {
        let block = identity.encode().map_err(MetadataError::Identity)?;
        self.file.set_len(clone_bytes + IDENTITY_BYTES).map_err(MetadataError::Write)?;
        self.file.write_all_at(&block, clone_bytes).map_err(MetadataError::Write)?;
        self.file.sync_all().map_err(MetadataError::Write)?;
        if let Some(parent) = self.path.parent().filter(|p| !p.as_os_str().is_empty()) {
            File::open(parent).and_then(|dir| dir.sync_all()).map_err(MetadataError::Write)?;
        }
        Ok(())
    }

    /// The path, for messages.
    pub fn path_text(&self) -> String {
        self.path.display().to_string()
    }

    /// The file's length now.
    ///
    /// # Errors
    /// The file cannot be looked at.
    pub fn len_bytes(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    /// Keeps the file whatever happens next (the clone is being served).
    pub fn keep(&mut self) {
        if self.created {
            if let Some(hook) = &self.hook {
                hook.forget(std::slice::from_ref(&self.path));
            }
        }
        self.created = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> Identity {
        Identity {
            state: State::Ready,
            region_size_bytes: 65536,
            source_name: "nbd://127.0.0.1:10809/disk".into(),
            source_id: "nbd size=1048576 flags=read-only:1,multi-conn:0,trim:0 block=512".into(),
            destination_name: "clone.img".into(),
            destination_id: "file dev=1 ino=2 size=1048576 born=1.000000002".into(),
        }
    }

    #[test]
    fn an_identity_block_reads_back_and_any_flipped_byte_is_refused() {
        let block = identity().encode().unwrap();
        assert_eq!(block.len() as u64, IDENTITY_BYTES);
        assert_eq!(Identity::decode(&block).unwrap(), identity());
        let text_len = block.iter().position(|&b| b == 0).unwrap();
        for at in [0, 25, 40, text_len - 12] {
            let mut bad = block.clone();
            bad[at] ^= 0x04;
            assert!(Identity::decode(&bad).is_err(), "byte {at} flipped was accepted");
        }
        assert!(matches!(Identity::decode(&[0u8; 4096]), Err(IdentityError::NoMagic)));
        let newline = Identity { source_name: "a\nb".into(), ..identity() };
        assert!(newline.encode().is_err());
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kcopyd-tool-metadata-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("clone.meta")
    }

    #[test]
    fn a_foreign_file_and_a_locked_one_are_refused_untouched_and_a_new_one_goes_unless_kept() {
        let path = scratch("refusals");
        std::fs::write(&path, b"someone else's data").unwrap();
        let refused = MetadataFile::open(&path, &[], None).unwrap_err();
        assert!(matches!(refused, MetadataError::NotMetadata(IdentityError::Short { len_bytes: 19 })), "{refused}");
        assert_eq!(std::fs::read(&path).unwrap(), b"someone else's data");
        std::fs::remove_file(&path).unwrap();

        let first = MetadataFile::open(&path, &[], None).unwrap();
        assert!(first.existing.is_none());
        let busy = MetadataFile::open(&path, &[], None).unwrap_err();
        assert!(matches!(busy, MetadataError::Busy), "{busy}");
        assert!(path.exists(), "a refused second opener removed the first one's file");
        drop(first);
        assert!(!path.exists(), "a file created and not kept stays behind");

        let mut kept = MetadataFile::open(&path, &[], None).unwrap();
        kept.write_identity(8192, &identity()).unwrap();
        kept.keep();
        drop(kept);
        let again = MetadataFile::open(&path, &[], None).unwrap();
        assert_eq!(again.existing, Some(identity()));
        assert_eq!(again.len_bytes().unwrap(), 8192 + IDENTITY_BYTES);
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }
}
