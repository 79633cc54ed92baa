//! The [`Engine`] a device's reads, writes and flushes go through, and [`IoEngine`], the
//! name of each. Which one a device gets is chosen once when it opens (`device.rs`,
//! `open_engine`); every engine keeps a thread pool (`pool.rs`) for the blocking work no
//! engine has an asynchronous form of (BLKZEROOUT, fallocate, SEEK_DATA).
//!
//! ```text
//!  OsDevice ── checks ──► Box<dyn Engine> ──► SyncEngine  (engine_sync.rs):  thread pool
//!                                        └──► UringEngine (engine_uring.rs): ring thread
//!                                                           + a thread pool for write-zeroes
//!     ◄── oneshot: the buffer comes back with the result
//! ```
//!
//! A trait object rather than an enum: each backend is a file of its own and the `io-uring`
//! feature appears in exactly one place (the factory), not in a variant and an arm of every
//! match; the cost, one indirect call per request, is nothing beside the syscall behind it. The
//! generic "run this closure on the pool" that a trait object cannot carry is an inherent
//! method on `dyn Engine` (`submit`) over [`Engine::pool`].

use std::fs::File;
use std::io;
use std::sync::Arc;

use kcopyd_core::{ReadBuf, WriteBuf};
use tokio::sync::oneshot;

use crate::aligned::{MemoryRules, Transfer};
use crate::pool::Pool;

/// Which engine serves a device's reads, writes and flushes.
///
/// ```
/// # use kcopyd_os::{IoEngine, OpenOptions};
/// assert_eq!(OpenOptions::default().engine, IoEngine::Sync);
/// // Without the `io-uring` feature, `Uring` exists but opening with it is refused.
/// assert_eq!(IoEngine::Uring.is_available(), cfg!(feature = "io-uring"));
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum IoEngine {
    /// Blocking `preadv`/`pwritev`/`fdatasync` on a pool of up to `queue_depth` threads.
    #[default]
    Sync,
    /// One io_uring per device, driven by one thread: READV/WRITEV/FSYNC submissions, at most
    /// `queue_depth` in flight. Write-zeroes (BLKZEROOUT, fallocate, or plain writes of zeroes)
    /// stays on the thread pool: io_uring has no BLKZEROOUT. Needs the `io-uring` cargo
    /// feature: without it opening is refused ([`OpenError::InvalidOptions`](crate::OpenError::InvalidOptions)); where the kernel
    /// refuses io_uring, opening fails with [`OpenError::IoUringSetup`](crate::OpenError::IoUringSetup).
    Uring,
}

impl IoEngine {
    /// Whether this build can open devices with the engine.
    pub const fn is_available(self) -> bool {
        match self {
            IoEngine::Sync => true,
            IoEngine::Uring => cfg!(feature = "io-uring"),
        }
    }
}

/// What the caller gets back from a read: its buffer, and how the transfer went.
pub(crate) type ReadReply = (ReadBuf, io::Result<Transfer>);

/// One way of moving a device's bytes. Every request is already checked by the device:
/// aligned to the logical block, inside the device, not empty. Buffers are owned: each moves
/// into the engine with its request and comes back (or is dropped) only once the kernel is
/// done with it, so a caller that drops its future early leaves the engine holding the pages.
///
/// `file` is held until the request completes, so that its descriptor stays open.
pub(crate) trait Engine: Send + Sync {
    /// Which [`IoEngine`] this is.
    fn kind(&self) -> IoEngine;

    /// Fills `buf`'s window from `offset_bytes`; through a bounce buffer if its segments break
    /// `rules` (`None`: buffered I/O, any memory will do).
    fn read(
        &self,
        file: Arc<File>,
        offset_bytes: u64,
        buf: ReadBuf,
        rules: Option<MemoryRules>,
    ) -> oneshot::Receiver<ReadReply>;

    /// Writes all of `buf` at `offset_bytes`; through a bounce buffer if its segments break
    /// `rules`.
    fn write(
        &self,
        file: Arc<File>,
        offset_bytes: u64,
        buf: WriteBuf,
        rules: Option<MemoryRules>,
    ) -> oneshot::Receiver<io::Result<Transfer>>;

    /// `fdatasync`.
    fn flush(&self, file: Arc<File>) -> oneshot::Receiver<io::Result<()>>;

    /// The thread pool for blocking work.
    fn pool(&self) -> &Pool;
}

impl dyn Engine {
    /// Runs blocking `work` on the engine's thread pool; never blocks the caller. The work
    /// drops what it captured (the file handle) before its result goes out.
    pub(crate) fn submit<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> oneshot::Receiver<T> {
        self.pool().submit(work)
    }
}
