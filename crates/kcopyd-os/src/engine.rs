//! The [`Engine`] a device's reads, writes and flushes go through, chosen once when the
//! device opens ([`open`]), and the thread pool every engine keeps for the blocking work no
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
//! feature appears in exactly one place (`open`), not in a variant and an arm of every match;
//! the cost, one indirect call per request, is nothing beside the syscall behind it. The
//! generic "run this closure on the pool" that a trait object cannot carry is an inherent
//! method on `dyn Engine` (`submit`) over [`Engine::pool`].

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::Arc;

use kcopyd_core::{ReadBuf, WriteBuf};
use tokio::sync::oneshot;

use crate::aligned::{MemoryRules, Transfer};
use crate::device::IoEngine;
use crate::engine_sync::SyncEngine;
use crate::error::OpenError;

/// The name of a device's I/O threads (at most 15 bytes, the kernel's limit).
const THREAD_NAME: &str = "kcopyd-io";
/// The name of a device's io_uring thread.
#[cfg(feature = "io-uring")]
const URING_THREAD_NAME: &str = "kcopyd-uring";

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
    fn pool(&self) -> &SyncEngine;
}

impl dyn Engine {
    /// Runs blocking `work` on the engine's thread pool; never blocks the caller. The work
    /// drops what it captured (the file handle) before its result goes out.
    pub(crate) fn submit<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> oneshot::Receiver<T> {
        self.pool().submit(work)
    }
}

/// Starts the engine `kind` for `queue_depth` requests in flight. The options were validated:
/// an engine that is not built in never gets here.
///
/// # Errors
/// [`OpenError::IoUringSetup`] where the kernel refuses io_uring; [`OpenError::Engine`] when
/// no I/O thread can be started.
pub(crate) fn open(path: &Path, kind: IoEngine, queue_depth: usize) -> Result<Box<dyn Engine>, OpenError> {
    assert!(kind.is_available(), "{kind:?} was validated");
    let pool = || {
        SyncEngine::new(THREAD_NAME, queue_depth)
            .map_err(|source| OpenError::Engine { path: path.to_path_buf(), source })
    };
    let engine: Box<dyn Engine> = match kind {
        IoEngine::Sync => Box::new(pool()?),
        #[cfg(feature = "io-uring")]
        IoEngine::Uring => {
            use crate::engine_uring::{Ring, UringEngine};
            let ring = Ring::start(URING_THREAD_NAME, queue_depth)
                .map_err(|source| OpenError::IoUringSetup { path: path.to_path_buf(), source })?;
            Box::new(UringEngine::new(ring, pool()?))
        }
        #[cfg(not(feature = "io-uring"))]
        IoEngine::Uring => unreachable!("refused by OpenOptions::validate"),
    };
    assert_eq!(engine.kind(), kind);
    Ok(engine)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_engine_asked_for_is_the_engine_started() {
        let path = Path::new("/nonexistent/kcopyd");
        let engine = open(path, IoEngine::Sync, 2).unwrap();
        assert_eq!(engine.kind(), IoEngine::Sync);
        assert!(std::ptr::eq(engine.pool(), engine.pool()), "one pool for the device's lifetime");
        if !IoEngine::Uring.is_available() {
            println!("SKIPPED: the io_uring half (built without the io-uring feature)");
            return;
        }
        match open(path, IoEngine::Uring, 2) {
            Ok(engine) => assert_eq!(engine.kind(), IoEngine::Uring),
            Err(OpenError::IoUringSetup { source, .. }) => println!("SKIPPED: io_uring is not available: {source}"),
            Err(error) => panic!("{error}"),
        }
    }

    #[test]
    fn blocking_work_runs_on_the_pool_of_either_engine() {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        for kind in [IoEngine::Sync, IoEngine::Uring].into_iter().filter(|kind| kind.is_available()) {
            let engine = match open(Path::new("/nonexistent/kcopyd"), kind, 1) {
                Ok(engine) => engine,
                Err(OpenError::IoUringSetup { source, .. }) => {
                    println!("SKIPPED: {kind:?}: io_uring is not available: {source}");
                    continue;
                }
                Err(error) => panic!("{kind:?}: {error}"),
            };
            let receiver = engine.submit(|| std::thread::current().name().map(str::to_owned));
            let thread_name = runtime.block_on(receiver).unwrap();
            assert_eq!(thread_name.as_deref(), Some(THREAD_NAME), "{kind:?}");
        }
    }

    /// Both engines bounce memory that breaks the rules, over several pieces, through the
    /// same shared rules: a write from memory at odd addresses and a read into a window that
    /// starts inside a page move the same bytes as plain I/O would. The file is
    /// buffered so that any filesystem takes it; the rules alone decide the bounce.
    #[test]
    fn both_engines_bounce_misaligned_memory_over_several_pieces() {
        use bytes::Bytes;
        use kcopyd_core::PagePool;

        use crate::aligned::BOUNCE_BYTES_MAX;

        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let len_bytes = 2 * BOUNCE_BYTES_MAX + 64 * 1024;
        let data: Vec<u8> = (0..len_bytes).map(|i| (i * 7 % 251) as u8).collect();
        for kind in [IoEngine::Sync, IoEngine::Uring].into_iter().filter(|kind| kind.is_available()) {
            let path = std::env::temp_dir().join(format!("kcopyd-os-bounce-{kind:?}-{}", std::process::id()));
            let file = Arc::new(
                std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap(),
            );
            std::fs::remove_file(&path).unwrap();
            let engine = match open(&path, kind, 2) {
                Ok(engine) => engine,
                Err(OpenError::IoUringSetup { source, .. }) => {
                    println!("SKIPPED: {kind:?}: io_uring is not available: {source}");
                    continue;
                }
                Err(error) => panic!("{kind:?}: {error}"),
            };
            // One byte of slack in front: the second segment starts at an odd address.
            let mut backing = vec![0u8; 1];
            backing.extend_from_slice(&data[4096..]);
            let buf =
                WriteBuf::from_segments(vec![Bytes::copy_from_slice(&data[..4096]), Bytes::from(backing).slice(1..)]);
            let rules = MemoryRules { memory_bytes: 4096, length_bytes: 4096 };
            let written = runtime.block_on(engine.write(file.clone(), 8192, buf, Some(rules))).unwrap();
            assert_eq!(written.unwrap(), Transfer::Bounced, "{kind:?}");
            // A window 512 bytes into the pages breaks 4096-byte memory alignment: the read
            // is bounced too.
            let pages = len_bytes / 4096 + 1;
            let pool = PagePool::new(pages).unwrap();
            let mut buf = ReadBuf::new(pool.try_alloc(pages).unwrap(), pages * 4096);
            buf.set_window(512..512 + len_bytes);
            let (buf, result) = runtime.block_on(engine.read(file.clone(), 8192, buf, Some(rules))).unwrap();
            assert_eq!(result.unwrap(), Transfer::Bounced, "{kind:?}");
            let read: Vec<u8> = buf.segments().flatten().copied().collect();
            assert!(read == data, "{kind:?}: the bytes read back differ from those written");
        }
    }
}
