//! `kcopyd-os`: real regular files and block devices as [`kcopyd_core::BlockDevice`]s,
//! through O_DIRECT.
//!
//! ```text
//!  OsDevice::open(path, options)
//!    stat ─► regular file ─► open(O_DIRECT [, O_CREAT]) ─► size, statx DIOALIGN (or probe)
//!         └► block device ─► open(O_DIRECT [, O_EXCL if writing]) ─► BLKGETSIZE64, BLKSSZGET
//!
//!  read / write / write_zeroes / flush   (caller's thread: checks only, never blocks)
//!    check: writable? aligned to the logical block? inside the device?  ── no: refused, no I/O
//!    └► Box<dyn Engine> (engine.rs), chosen once at open by the factory (device.rs)
//!       ├► engine_sync: pool.rs queue ─► ≤ queue_depth threads ─► preadv / pwritev (EINTR, short I/O)
//!       └► engine_uring (IoEngine::Uring, feature `io-uring`): channel ─► one ring thread
//!            ─► READV / WRITEV / FSYNC, ≤ queue_depth in flight (short I/O, EINTR, EAGAIN)
//!       both: misaligned user memory ─► bounce buffer in pieces (aligned.rs, shared rules)
//!       the engine's thread pool (pool.rs): zeroes.rs: BLKZEROOUT / fallocate(ZERO_RANGE),
//!       falling back to writes of zeroes
//!       ◄── oneshot: the buffer comes back with the result
//! ```
//!
//! Safety rules: sources are opened read-only; a block device opened for writing is opened
//! exclusively, so a mounted or claimed device is refused ([`OpenError::Busy`]); a target
//! file is never truncated, and only extended when [`OpenOptions::create_len`] asks for it.
//! A block device opened for writing that is marked read-only (BLKROGET) is refused at open.
//! [`OsDevice::storage`] follows partitions and loop devices down to the file or whole disk
//! that holds the bytes, so that callers can see two names of the same storage.
//! A filesystem that refuses O_DIRECT gets [`OpenError::DirectIoUnsupported`], which points to
//! the buffered mode ([`OpenOptions::buffered`]).
#![warn(missing_docs)]
// Library code reports through its return values, never by printing.
#![cfg_attr(not(test), deny(clippy::print_stderr, clippy::print_stdout))]

mod aligned;
mod device;
mod engine;
mod engine_sync;
#[cfg(feature = "io-uring")]
mod engine_uring;
mod error;
mod lock;
mod pool;
mod storage;
mod sys;
mod tail;
mod zeroes;

pub use aligned::{ALIGNMENT_BYTES_MAX, BOUNCE_BYTES_MAX, IOVECS_PER_CALL_MAX};
pub use device::{DeviceKind, OpenOptions, OsDevice, OsIoStats, QUEUE_DEPTH_DEFAULT, QUEUE_DEPTH_MAX};
pub use engine::IoEngine;
pub use error::{OpenError, RequestError};
pub use lock::{FileKey, FileLocks, LockError, LockKind};
pub use storage::{Mounted, Storage, StorageId, mounted_read_write};
pub use sys::pseudo_filesystem_at;
pub use tail::{read_tail, write_tail};
pub use zeroes::ZEROES_BYTES_PER_WRITE_MAX;
