//! [`OsDevice`]: a regular file or block device behind the [`BlockDevice`] trait.

use std::fmt;
use std::fs::{File, Metadata};
use std::future::ready;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use kcopyd_core::{
    BlockDevice, DeviceId, Geometry, IoFuture, RangeSet, ReadBuf, SECTOR_SIZE, WriteBuf, sectors_to_bytes,
};
use rustix::fs::OFlags;

use crate::aligned::{ALIGNMENT_BYTES_MAX, MemoryRules, Transfer};
use crate::engine::{Engine, IoEngine};
use crate::engine_sync::SyncEngine;
#[cfg(feature = "io-uring")]
use crate::engine_uring::{Ring, UringEngine};
use crate::error::{OpenError, RequestError, classify};
use crate::pool::Pool;
use crate::storage::Storage;
use crate::sys;
use crate::zeroes::{self, Offload, Zeroed};

/// Queue depth (I/O threads per device) when none is given.
pub const QUEUE_DEPTH_DEFAULT: usize = 16;
/// Largest queue depth accepted.
pub const QUEUE_DEPTH_MAX: usize = 256;

/// How to open a path. The default opens read-only, with O_DIRECT, at the default queue depth.
///
/// ```
/// # use kcopyd_os::OpenOptions;
/// // A target file that is created (or extended) to 1 GiB if it is shorter; never truncated.
/// let target = OpenOptions { write: true, create_len: Some(1 << 30), ..OpenOptions::default() };
/// assert!(!target.buffered);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenOptions {
    /// Open for writing as well as reading. A block device opened for writing is opened with
    /// O_EXCL, so that a mounted or otherwise claimed device is refused
    /// ([`OpenError::Busy`]). Sources are opened without it: read-only.
    pub write: bool,
    /// Use the page cache instead of O_DIRECT: for filesystems that refuse direct I/O (tmpfs
    /// before Linux 6.6). Logical blocks are then 512 bytes on files.
    pub buffered: bool,
    /// I/O threads (requests in flight) for this device: 1 to [`QUEUE_DEPTH_MAX`], default
    /// [`QUEUE_DEPTH_DEFAULT`]. Threads start on demand.
    pub queue_depth: usize,
    /// Regular files only, with `write`: create the file if it is missing and extend it to
    /// this many bytes (a multiple of 512) if it is shorter. A longer file is left as it is:
    /// nothing is ever truncated. Without it a missing target is [`OpenError::NotFound`] and
    /// the file keeps its length. A file created here stays if the open fails afterwards
    /// (a filesystem refusing O_DIRECT, say).
    pub create_len: Option<u64>,
    /// The I/O engine, default [`IoEngine::Sync`].
    pub engine: IoEngine,
}

impl Default for OpenOptions {
    fn default() -> OpenOptions {
        OpenOptions {
            write: false,
            buffered: false,
            queue_depth: QUEUE_DEPTH_DEFAULT,
            create_len: None,
            engine: IoEngine::Sync,
        }
    }
}

impl OpenOptions {
    fn validate(&self, path: &Path) -> Result<(), OpenError> {
        let invalid = |reason: String| Err(OpenError::InvalidOptions { path: path.to_path_buf(), reason });
        if self.queue_depth == 0 || self.queue_depth > QUEUE_DEPTH_MAX {
            return invalid(format!("queue depth {} (must be 1 to {QUEUE_DEPTH_MAX})", self.queue_depth));
        }
        if !self.engine.is_available() {
            return invalid(format!("the {:?} I/O engine is not built in (cargo feature io-uring)", self.engine));
        }
        match self.create_len {
            Some(_) if !self.write => invalid("create_len needs write access".into()),
            Some(len_bytes) if len_bytes % SECTOR_SIZE as u64 != 0 => {
                invalid(format!("create_len of {len_bytes} bytes is not a multiple of {SECTOR_SIZE}"))
            }
            _ => Ok(()),
        }
    }
}

/// What kind of path an [`OsDevice`] has open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// A regular file.
    File,
    /// A block device.
    BlockDevice,
}

/// Requests an [`OsDevice`] has served, including refused ones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OsIoStats {
    /// Read requests that completed.
    pub reads: u64,
    /// Write requests that completed.
    pub writes: u64,
    /// Write-zeroes requests offloaded (BLKZEROOUT, `FALLOC_FL_ZERO_RANGE`).
    pub write_zeroes_offloaded: u64,
    /// Write-zeroes requests served by writing zeroes.
    pub write_zeroes_written: u64,
    /// Holes punched in a file (`FALLOC_FL_PUNCH_HOLE`) by deallocate requests.
    pub holes_punched: u64,
    /// Flushes that completed.
    pub flushes: u64,
    /// Reads and writes that went through a bounce buffer (misaligned user memory).
    pub bounced: u64,
    /// Requests refused before any I/O (misaligned, out of range, read-only).
    pub refused: u64,
    /// Requests whose I/O failed.
    pub failed: u64,
}

#[derive(Default)]
struct Counters {
    reads: AtomicU64,
    writes: AtomicU64,
    write_zeroes_offloaded: AtomicU64,
    write_zeroes_written: AtomicU64,
    holes_punched: AtomicU64,
    flushes: AtomicU64,
    bounced: AtomicU64,
    refused: AtomicU64,
    failed: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// The kinds of request, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Write,
    WriteZeroes,
}

impl Op {
    const fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::WriteZeroes => "write-zeroes",
        }
    }
}

/// A regular file or block device, read and written with O_DIRECT (or through the page cache
/// when asked) by a pool of I/O threads.
///
/// ```no_run
/// # use std::{path::Path, sync::Arc};
/// # use kcopyd_core::Device;
/// use kcopyd_os::{OpenOptions, OsDevice};
/// let source: Device = Arc::new(OsDevice::open(Path::new("/dev/sdb"), &OpenOptions::default())?);
/// let target = OsDevice::open(Path::new("/var/tmp/copy.img"), &OpenOptions {
///     write: true,
///     create_len: Some(source.geometry().len_sectors * 512),
///     ..OpenOptions::default()
/// })?;
/// # Ok::<(), kcopyd_os::OpenError>(())
/// ```
pub struct OsDevice {
    path: PathBuf,
    name: String,
    kind: DeviceKind,
    options: OpenOptions,
    /// Shared with the I/O threads; each request holds a clone only while it runs.
    file: Arc<File>,
    geometry: Geometry,
    id: DeviceId,
    /// The file or whole disk underneath, and where byte 0 lies on it.
    storage: Storage,
    /// What user memory must look like for O_DIRECT; `None` when buffered.
    rules: Option<MemoryRules>,
    /// Files: whether `FALLOC_FL_ZERO_RANGE` is still believed to work.
    zero_range: AtomicBool,
    /// Files: whether `FALLOC_FL_PUNCH_HOLE` is still believed to work.
    punch_hole: AtomicBool,
    /// Serves reads, writes and flushes ([`OpenOptions::engine`], chosen at open), and runs
    /// the blocking work (write-zeroes) on its thread pool.
    engine: Box<dyn Engine>,
    counters: Counters,
}

impl OsDevice {
    /// Opens a regular file or block device.
    ///
    /// Files get their size and the filesystem's direct-I/O alignment (the logical block);
    /// block devices their size (BLKGETSIZE64) and logical block size (BLKSSZGET). A file's
    /// bytes past its last whole logical block are not part of the device.
    ///
    /// # Errors
    /// See [`OpenError`]: a missing path, refused access, a busy block device, a filesystem
    /// without direct I/O, a path of another kind, or a failing ioctl.
    pub fn open(path: &Path, options: &OpenOptions) -> Result<OsDevice, OpenError> {
        options.validate(path)?;
        let kind = match std::fs::metadata(path) {
            Ok(metadata) => kind_of(path, &metadata)?,
            Err(error) if error.kind() == io::ErrorKind::NotFound && options.create_len.is_some() => DeviceKind::File,
            Err(error) => {
                let metadata_error = |path, source| OpenError::Metadata { path, source };
                return Err(classify(path, error, false, String::new, metadata_error));
            }
        };
        if kind == DeviceKind::BlockDevice && options.create_len.is_some() {
            return Err(OpenError::InvalidOptions {
                path: path.to_path_buf(),
                reason: "create_len applies to regular files, not block devices".into(),
            });
        }
        // Asked before opening too: O_DIRECT would fail first, with a way out that is none.
        if let Some(filesystem) = (kind == DeviceKind::File).then(|| sys::pseudo_filesystem_at(path)).flatten() {
            return Err(OpenError::PseudoFile { path: path.to_path_buf(), filesystem });
        }
        // A file to create is created exclusively: one that another program (another kcopyd
        // creating the same target) made in the meantime is not taken for this one's own.
        let creating = kind == DeviceKind::File
            && options.create_len.is_some()
            && matches!(std::fs::symlink_metadata(path), Err(e) if e.kind() == io::ErrorKind::NotFound);
        let file = open_descriptor(path, kind, options, creating)?;
        if kind == DeviceKind::BlockDevice && options.write {
            refuse_read_only_block_device(path, &file)?;
        }
        let metadata = file.metadata().map_err(|source| OpenError::Metadata { path: path.to_path_buf(), source })?;
        if kind_of(path, &metadata)? != kind {
            return Err(OpenError::Open {
                path: path.to_path_buf(),
                source: io::Error::other("the path changed type while it was being opened"),
            });
        }
        if let Some(filesystem) = (kind == DeviceKind::File).then(|| sys::pseudo_filesystem(&file)).flatten() {
            return Err(OpenError::PseudoFile { path: path.to_path_buf(), filesystem });
        }
        let (geometry, rules, id, storage) = match kind {
            DeviceKind::File => {
                let (geometry, rules) = file_geometry(path, &file, metadata.len(), options)?;
                let id = DeviceId { namespace: "file", major: metadata.dev(), minor: metadata.ino() };
                (geometry, rules, id, Storage::of_file(metadata.dev(), metadata.ino()))
            }
            DeviceKind::BlockDevice => {
                let (geometry, rules) = block_device_geometry(path, &file, metadata.rdev(), options)?;
                let id = DeviceId { namespace: "block", major: metadata.rdev(), minor: 0 };
                (geometry, rules, id, Storage::of_block_device(metadata.rdev()))
            }
        };
        let engine = open_engine(path, options.engine, options.queue_depth)?;
        Ok(OsDevice {
            path: path.to_path_buf(),
            name: path.display().to_string(),
            kind,
            options: options.clone(),
            file: Arc::new(file),
            zero_range: AtomicBool::new(kind == DeviceKind::File && geometry.write_zeroes),
            punch_hole: AtomicBool::new(kind == DeviceKind::File),
            geometry,
            id,
            storage,
            rules,
            engine,
            counters: Counters::default(),
        })
    }

    /// The path it was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A regular file or a block device.
    pub fn kind(&self) -> DeviceKind {
        self.kind
    }

    /// The options it was opened with.
    pub fn options(&self) -> &OpenOptions {
        &self.options
    }

    /// The file or whole disk that holds this device's bytes, through partitions and loop
    /// devices, and where byte 0 lies on it (found when the device opened).
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// A regular file's length in bytes now, through the descriptor opened (not the path,
    /// which another program may have renamed something over since).
    ///
    /// # Errors
    /// fstat failed.
    pub fn file_len_bytes(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    /// Extends a regular file to at least `len_bytes` (a hole), through the descriptor opened;
    /// a longer file is left as it is.
    ///
    /// # Errors
    /// Not a regular file, or the filesystem refused the length (EFBIG past its largest file).
    pub fn extend_to(&self, len_bytes: u64) -> io::Result<()> {
        if self.kind != DeviceKind::File {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "only a regular file is extended"));
        }
        if self.file_len_bytes()? < len_bytes {
            self.file.set_len(len_bytes)?;
        }
        Ok(())
    }

    /// Whether I/O bypasses the page cache (O_DIRECT).
    pub fn is_direct(&self) -> bool {
        self.rules.is_some()
    }

    /// The alignment user memory needs for direct I/O, in bytes (1 when buffered). Writes
    /// from memory that breaks it go through a bounce buffer.
    pub fn memory_alignment_bytes(&self) -> usize {
        self.rules.map_or(1, |rules| rules.memory_bytes)
    }

    /// Requests served so far.
    pub fn stats(&self) -> OsIoStats {
        let c = &self.counters;
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        OsIoStats {
            reads: load(&c.reads),
            writes: load(&c.writes),
            write_zeroes_offloaded: load(&c.write_zeroes_offloaded),
            write_zeroes_written: load(&c.write_zeroes_written),
            holes_punched: load(&c.holes_punched),
            flushes: load(&c.flushes),
            bounced: load(&c.bounced),
            refused: load(&c.refused),
            failed: load(&c.failed),
        }
    }

    /// Refuses a request before any I/O unless the device is writable (for writes), the
    /// request is aligned to the logical block and lies inside the device. Returns the
    /// offset in bytes.
    ///
    /// Worked example, 4096-byte blocks: sector 8 → byte 4096, aligned; sector 4 → byte
    /// 2048, refused; 4096 bytes at sector 8 on a 16-sector device end at byte 8192, the end:
    /// accepted; at sector 16, refused.
    fn check(&self, op: Op, offset_sectors: u64, len_bytes: u128) -> io::Result<u64> {
        let result = self.check_inner(op, offset_sectors, len_bytes);
        if result.is_err() {
            bump(&self.counters.refused);
        }
        result
    }

    fn check_inner(&self, op: Op, offset_sectors: u64, len_bytes: u128) -> io::Result<u64> {
        let device = self.name.clone();
        let operation = op.name();
        if op != Op::Read && !self.options.write {
            return Err(RequestError::ReadOnly { device, operation }.into_io());
        }
        let sectors = self
            .geometry
            .check_request(offset_sectors, len_bytes)
            .map_err(|refused| RequestError::Geometry { device, operation, refused }.into_io())?;
        // Inside the device, whose bytes a file's or block device's u64 size holds.
        Ok(sectors.start * SECTOR_SIZE as u64)
    }

    /// Counts a finished read or write.
    fn finish_transfer(&self, counter: &AtomicU64, result: io::Result<Transfer>) -> io::Result<()> {
        match result {
            Ok(transfer) => {
                bump(counter);
                if transfer == Transfer::Bounced {
                    bump(&self.counters.bounced);
                }
                Ok(())
            }
            Err(error) => {
                bump(&self.counters.failed);
                Err(error)
            }
        }
    }
}

/// What kind of path `metadata` describes, or the error for a kind we do not open.
fn kind_of(path: &Path, metadata: &Metadata) -> Result<DeviceKind, OpenError> {
    let file_type = metadata.file_type();
    let other = |kind| Err(OpenError::NotABlockDeviceOrFile { path: path.to_path_buf(), kind });
    if file_type.is_file() {
        Ok(DeviceKind::File)
    } else if file_type.is_block_device() {
        Ok(DeviceKind::BlockDevice)
    } else if file_type.is_dir() {
        other("directory")
    } else if file_type.is_char_device() {
        other("character device")
    } else if file_type.is_fifo() {
        other("FIFO")
    } else if file_type.is_socket() {
        other("socket")
    } else {
        other("special file")
    }
}

/// Refuses a block device marked read-only (BLKROGET) that is to be written: the open
/// succeeds on it, and then every write fails (EPERM), so refuse it now, before any I/O.
fn refuse_read_only_block_device(path: &Path, file: &File) -> Result<(), OpenError> {
    let read_only = sys::block_device_is_read_only(file)
        .map_err(|source| OpenError::ReadOnlyFlag { path: path.to_path_buf(), source })?;
    if read_only {
        return Err(OpenError::ReadOnly {
            path: path.to_path_buf(),
            source: io::Error::new(io::ErrorKind::PermissionDenied, "the block device is read-only (BLKROGET)"),
        });
    }
    Ok(())
}

/// Opens the descriptor: read-only or read-write, O_DIRECT unless buffered, O_EXCL for a block
/// device opened for writing, O_CREAT for a file with `create_len`. Never O_TRUNC.
fn open_descriptor(path: &Path, kind: DeviceKind, options: &OpenOptions, creating: bool) -> Result<File, OpenError> {
    let direct = !options.buffered;
    let mut flags = OFlags::empty();
    if direct {
        flags |= OFlags::DIRECT;
    }
    if kind == DeviceKind::BlockDevice && options.write {
        // Exclusive open: EBUSY if the device is mounted or claimed, and nobody else may
        // mount or claim it while we write.
        flags |= OFlags::EXCL;
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(options.write)
        .create(kind == DeviceKind::File && options.create_len.is_some() && !creating)
        .create_new(creating)
        .custom_flags(flags.bits() as i32)
        .open(path)
        .map_err(|error| {
            if creating && error.kind() == io::ErrorKind::AlreadyExists {
                return OpenError::CreatedElsewhere { path: path.to_path_buf() };
            }
            let open_error = |path, source| OpenError::Open { path, source };
            classify(path, error, direct, || sys::filesystem_name(path), open_error)
        })
}

/// A regular file's geometry and memory rules, after extending it to `create_len` if it is
/// shorter.
fn file_geometry(
    path: &Path,
    file: &File,
    mut size_bytes: u64,
    options: &OpenOptions,
) -> Result<(Geometry, Option<MemoryRules>), OpenError> {
    if let Some(len_bytes) = options.create_len.filter(|&len_bytes| len_bytes > size_bytes) {
        file.set_len(len_bytes).map_err(|source| OpenError::Extend { path: path.to_path_buf(), len_bytes, source })?;
        size_bytes = len_bytes;
    }
    let (block_bytes, rules) = if options.buffered { (SECTOR_SIZE as u64, None) } else { file_alignment(path, file)? };
    let geometry = Geometry::new(whole_blocks_sectors(size_bytes, block_bytes), block_bytes as u32)
        .with_write_zeroes(sys::filesystem_zeroes_ranges(file));
    Ok((geometry, rules))
}

/// A block device's geometry (BLKSSZGET, BLKGETSIZE64, sysfs) and memory rules.
fn block_device_geometry(
    path: &Path,
    file: &File,
    rdev: u64,
    options: &OpenOptions,
) -> Result<(Geometry, Option<MemoryRules>), OpenError> {
    let block_bytes = sys::block_device_logical_block_size(file)
        .map_err(|source| OpenError::LogicalBlockSize { path: path.to_path_buf(), source })?;
    let block_bytes = check_alignment(path, u64::from(block_bytes))?;
    let size_bytes = sys::block_device_size_bytes(file)
        .map_err(|source| OpenError::DeviceSize { path: path.to_path_buf(), source })?;
    // Memory aligned to the logical block satisfies every device's DMA alignment (which is
    // at most the logical block size).
    let rules = (!options.buffered)
        .then_some(MemoryRules { memory_bytes: block_bytes as usize, length_bytes: block_bytes as usize });
    let geometry = Geometry::new(whole_blocks_sectors(size_bytes, block_bytes), block_bytes as u32)
        .with_write_zeroes(true)
        .with_zoned(sys::block_device_is_zoned(rdev));
    let geometry =
        if geometry.zoned { geometry.with_zone_sectors(sys::block_device_zone_sectors(rdev)) } else { geometry };
    Ok((geometry, rules))
}

/// Checks that an alignment is a power of two up to [`ALIGNMENT_BYTES_MAX`]; at least 512.
fn check_alignment(path: &Path, bytes: u64) -> Result<u64, OpenError> {
    if !bytes.is_power_of_two() || bytes > ALIGNMENT_BYTES_MAX {
        return Err(OpenError::UnsupportedAlignment { path: path.to_path_buf(), bytes });
    }
    Ok(bytes.max(SECTOR_SIZE as u64))
}

/// The logical block and memory rules of a file opened with O_DIRECT.
fn file_alignment(path: &Path, file: &File) -> Result<(u64, Option<MemoryRules>), OpenError> {
    let alignment = sys::file_direct_io_alignment(file)
        .map_err(|source| OpenError::DirectIoAlignment { path: path.to_path_buf(), source })?
        .ok_or_else(|| OpenError::DirectIoUnsupported {
            path: path.to_path_buf(),
            filesystem: sys::filesystem_name(path),
            source: io::Error::new(io::ErrorKind::Unsupported, "the filesystem reports no direct-I/O alignment"),
        })?;
    let block_bytes = check_alignment(path, alignment.offset_bytes)?;
    let memory_bytes = alignment.memory_bytes;
    if !memory_bytes.is_power_of_two() || memory_bytes > ALIGNMENT_BYTES_MAX {
        return Err(OpenError::UnsupportedAlignment { path: path.to_path_buf(), bytes: memory_bytes });
    }
    Ok((block_bytes, Some(MemoryRules { memory_bytes: memory_bytes as usize, length_bytes: block_bytes as usize })))
}

/// Sectors in the whole logical blocks of `size_bytes`: 4096-byte blocks, 10000 bytes → two
/// blocks → 16 sectors.
fn whole_blocks_sectors(size_bytes: u64, block_bytes: u64) -> u64 {
    size_bytes / block_bytes * block_bytes / SECTOR_SIZE as u64
}

/// The name of a device's I/O threads (at most 15 bytes, the kernel's limit).
const THREAD_NAME: &str = "kcopyd-io";
/// The name of a device's io_uring thread.
#[cfg(feature = "io-uring")]
const URING_THREAD_NAME: &str = "kcopyd-uring";

/// The engine factory: starts the engine `kind` for `queue_depth` requests in flight. The options were validated:
/// an engine that is not built in never gets here.
///
/// # Errors
/// [`OpenError::IoUringSetup`] where the kernel refuses io_uring; [`OpenError::Engine`] when
/// no I/O thread can be started.
fn open_engine(path: &Path, kind: IoEngine, queue_depth: usize) -> Result<Box<dyn Engine>, OpenError> {
    assert!(kind.is_available(), "{kind:?} was validated");
    let pool =
        || Pool::new(THREAD_NAME, queue_depth).map_err(|source| OpenError::Engine { path: path.to_path_buf(), source });
    let engine: Box<dyn Engine> = match kind {
        IoEngine::Sync => Box::new(SyncEngine::new(pool()?)),
        #[cfg(feature = "io-uring")]
        IoEngine::Uring => {
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

/// The message of a reply that never came: only a panicking I/O or ring thread drops one.
const WORKER_REPLIES: &str = "an I/O thread replies to every request";

impl BlockDevice for OsDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn id(&self) -> DeviceId {
        self.id
    }

    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn read(&self, offset_sectors: u64, buf: ReadBuf) -> IoFuture<'_, (ReadBuf, io::Result<()>)> {
        let offset_bytes = match self.check(Op::Read, offset_sectors, buf.len() as u128) {
            Ok(offset_bytes) => offset_bytes,
            Err(error) => return Box::pin(ready((buf, Err(error)))),
        };
        if buf.is_empty() {
            return Box::pin(ready((buf, Ok(()))));
        }
        let reply = self.engine.read(self.file.clone(), offset_bytes, buf, self.rules);
        Box::pin(async move {
            let (buf, result) = reply.await.expect(WORKER_REPLIES);
            (buf, self.finish_transfer(&self.counters.reads, result))
        })
    }

    fn write(&self, offset_sectors: u64, buf: WriteBuf) -> IoFuture<'_, io::Result<()>> {
        let offset_bytes = match self.check(Op::Write, offset_sectors, buf.len() as u128) {
            Ok(offset_bytes) => offset_bytes,
            Err(error) => return Box::pin(ready(Err(error))),
        };
        if buf.is_empty() {
            return Box::pin(ready(Ok(())));
        }
        let reply = self.engine.write(self.file.clone(), offset_bytes, buf, self.rules);
        Box::pin(async move {
            let result = reply.await.expect(WORKER_REPLIES);
            self.finish_transfer(&self.counters.writes, result)
        })
    }

    fn write_zeroes(&self, offset_sectors: u64, len_sectors: u64) -> IoFuture<'_, io::Result<()>> {
        let offset_bytes = match self.check(Op::WriteZeroes, offset_sectors, sectors_to_bytes(len_sectors)) {
            Ok(offset_bytes) => offset_bytes,
            Err(error) => return Box::pin(ready(Err(error))),
        };
        // Inside the device: the product fits.
        let len_bytes = len_sectors * SECTOR_SIZE as u64;
        if len_bytes == 0 {
            return Box::pin(ready(Ok(())));
        }
        let offload = match self.kind {
            DeviceKind::BlockDevice => Some(Offload::BlockDeviceZeroOut),
            DeviceKind::File if self.zero_range.load(Ordering::Relaxed) => Some(Offload::FileZeroRange),
            DeviceKind::File => None,
        };
        let (file, rules) = (self.file.clone(), self.rules);
        let reply = self.engine.submit(move || {
            let result = zeroes::zero(&file, offset_bytes, len_bytes, offload, rules);
            drop(file);
            result
        });
        Box::pin(async move {
            match reply.await.expect(WORKER_REPLIES) {
                Ok(Zeroed::Offloaded) => bump(&self.counters.write_zeroes_offloaded),
                Ok(Zeroed::Written) => bump(&self.counters.write_zeroes_written),
                Ok(Zeroed::WrittenAfterRefusal) => {
                    self.zero_range.store(false, Ordering::Relaxed);
                    bump(&self.counters.write_zeroes_written);
                }
                Err(error) => {
                    bump(&self.counters.failed);
                    return Err(error);
                }
            }
            Ok(())
        })
    }

    fn allocated(&self, offset_sectors: u64, len_sectors: u64) -> IoFuture<'_, io::Result<RangeSet>> {
        let sector_bytes = SECTOR_SIZE as u64;
        let end_sectors = offset_sectors.saturating_add(len_sectors).min(self.geometry.len_sectors);
        if self.kind == DeviceKind::BlockDevice || offset_sectors >= end_sectors {
            // A block device says nothing about allocation: all of it holds data.
            return Box::pin(ready(Ok(RangeSet::from_range(
                offset_sectors..offset_sectors.saturating_add(len_sectors),
            ))));
        }
        let file = self.file.clone();
        let reply = self.engine.submit(move || {
            let ranges = sys::file_data_ranges(&file, offset_sectors * sector_bytes, end_sectors * sector_bytes);
            drop(file);
            ranges
        });
        Box::pin(async move {
            let ranges = reply.await.expect(WORKER_REPLIES)?;
            let mut set = RangeSet::new();
            for range in ranges {
                // Rounded out to whole sectors: data is never reported as a hole.
                set.insert(range.start / sector_bytes..range.end.div_ceil(sector_bytes));
            }
            Ok(set)
        })
    }

    fn deallocates(&self) -> bool {
        self.kind == DeviceKind::File
    }

    fn deallocate(&self, offset_sectors: u64, len_sectors: u64) -> IoFuture<'_, io::Result<()>> {
        if self.kind != DeviceKind::File || !self.punch_hole.load(Ordering::Relaxed) {
            return self.write_zeroes(offset_sectors, len_sectors);
        }
        let offset_bytes = match self.check(Op::WriteZeroes, offset_sectors, sectors_to_bytes(len_sectors)) {
            Ok(offset_bytes) => offset_bytes,
            Err(error) => return Box::pin(ready(Err(error))),
        };
        // Inside the device: the product fits.
        let len_bytes = len_sectors * SECTOR_SIZE as u64;
        if len_bytes == 0 {
            return Box::pin(ready(Ok(())));
        }
        let file = self.file.clone();
        let reply = self.engine.submit(move || {
            let result = sys::file_punch_hole(&file, offset_bytes, len_bytes);
            drop(file);
            result
        });
        Box::pin(async move {
            match reply.await.expect(WORKER_REPLIES) {
                Ok(()) => {
                    bump(&self.counters.holes_punched);
                    Ok(())
                }
                Err(error) if sys::is_unsupported(&error) => {
                    // The filesystem cannot punch holes: zero the range instead, from now on.
                    self.punch_hole.store(false, Ordering::Relaxed);
                    self.write_zeroes(offset_sectors, len_sectors).await
                }
                Err(error) => {
                    bump(&self.counters.failed);
                    Err(error)
                }
            }
        })
    }

    fn flush(&self) -> IoFuture<'_, io::Result<()>> {
        let reply = self.engine.flush(self.file.clone());
        Box::pin(async move {
            let result = reply.await.expect(WORKER_REPLIES);
            bump(if result.is_ok() { &self.counters.flushes } else { &self.counters.failed });
            result
        })
    }
}

impl fmt::Debug for OsDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OsDevice")
            .field("path", &self.path)
            .field("kind", &self.kind)
            .field("geometry", &self.geometry)
            .field("direct", &self.is_direct())
            .field("options", &self.options)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_out_of_bounds_are_refused_before_anything_is_opened() {
        let path = Path::new("/nonexistent/kcopyd");
        let open = |options: OpenOptions| OsDevice::open(path, &options).unwrap_err();
        for depth in [0, QUEUE_DEPTH_MAX + 1] {
            let error = open(OpenOptions { queue_depth: depth, ..OpenOptions::default() });
            assert!(matches!(error, OpenError::InvalidOptions { .. }), "{error}");
        }
        let error = open(OpenOptions { create_len: Some(4096), ..OpenOptions::default() });
        assert!(matches!(error, OpenError::InvalidOptions { .. }), "create_len without write: {error}");
        let error = open(OpenOptions { write: true, create_len: Some(1000), ..OpenOptions::default() });
        assert!(matches!(error, OpenError::InvalidOptions { .. }), "create_len of 1000 bytes: {error}");
        // At the edge the options are fine and the missing path is what fails.
        let error = open(OpenOptions { queue_depth: QUEUE_DEPTH_MAX, ..OpenOptions::default() });
        assert!(matches!(error, OpenError::NotFound { .. }), "{error}");
    }

    #[test]
    fn only_files_and_block_devices_are_opened() {
        for (path, kind) in [("/", "directory"), ("/dev/null", "character device")] {
            let error = OsDevice::open(Path::new(path), &OpenOptions::default()).unwrap_err();
            assert!(matches!(error, OpenError::NotABlockDeviceOrFile { kind: k, .. } if k == kind), "{path}: {error}");
        }
    }

    #[test]
    fn files_whose_size_is_not_their_contents_are_refused_buffered_or_not() {
        // /proc/version says 0 bytes and holds a line; a sysfs file says 4096 and holds less.
        let cases = [("/proc/version", "proc"), ("/sys/kernel/mm/transparent_hugepage/enabled", "sysfs")];
        for (path, name) in cases {
            if !Path::new(path).exists() {
                println!("SKIPPED: {path} is not here");
                continue;
            }
            for buffered in [false, true] {
                let error = OsDevice::open(Path::new(path), &OpenOptions { buffered, ..OpenOptions::default() });
                let error = error.unwrap_err();
                assert!(matches!(error, OpenError::PseudoFile { filesystem, .. } if filesystem == name), "{error}");
                assert!(error.to_string().contains("do not hold the size they say"), "{error}");
            }
        }
    }

    #[test]
    fn whole_blocks_only() {
        assert_eq!(whole_blocks_sectors(10000, 4096), 16);
        assert_eq!(whole_blocks_sectors(4095, 4096), 0);
        assert_eq!(whole_blocks_sectors(1024 + 511, 512), 2);
    }

    #[test]
    fn the_engine_asked_for_is_the_engine_started() {
        let path = Path::new("/nonexistent/kcopyd");
        let engine = open_engine(path, IoEngine::Sync, 2).unwrap();
        assert_eq!(engine.kind(), IoEngine::Sync);
        assert!(std::ptr::eq(engine.pool(), engine.pool()), "one pool for the device's lifetime");
        if !IoEngine::Uring.is_available() {
            println!("SKIPPED: the io_uring half (built without the io-uring feature)");
            return;
        }
        match open_engine(path, IoEngine::Uring, 2) {
            Ok(engine) => assert_eq!(engine.kind(), IoEngine::Uring),
            Err(OpenError::IoUringSetup { source, .. }) => println!("SKIPPED: io_uring is not available: {source}"),
            Err(error) => panic!("{error}"),
        }
    }

    #[test]
    fn blocking_work_runs_on_the_pool_of_either_engine() {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        for kind in [IoEngine::Sync, IoEngine::Uring].into_iter().filter(|kind| kind.is_available()) {
            let engine = match open_engine(Path::new("/nonexistent/kcopyd"), kind, 1) {
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
            let engine = match open_engine(&path, kind, 2) {
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

    /// Refusals are typed: read-only, misaligned and out-of-range requests carry a
    /// [`RequestError`] naming the device, the operation and the geometry's rule, with the
    /// errno kind of the shared mapping; nothing is written.
    #[test]
    fn refused_requests_carry_a_typed_error_and_write_nothing() {
        use kcopyd_core::RequestRefused;

        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let path = std::env::temp_dir().join(format!("kcopyd-os-refusals-{}", std::process::id()));
        let writable = OpenOptions { write: true, buffered: true, create_len: Some(8192), ..OpenOptions::default() };
        let target = OsDevice::open(&path, &writable).unwrap();
        let source = OsDevice::open(&path, &OpenOptions { buffered: true, ..OpenOptions::default() }).unwrap();
        std::fs::remove_file(&path).unwrap();
        let name = path.display().to_string();

        let error = runtime.block_on(source.write(0, WriteBuf::zeroes(512))).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::PermissionDenied, "{error}");
        let expected = RequestError::ReadOnly { device: name.clone(), operation: "write" };
        assert_eq!(RequestError::of(&error), Some(&expected));

        let error = runtime.block_on(target.write(16, WriteBuf::zeroes(512))).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput, "{error}");
        let refused = RequestRefused::OutOfRange { offset_sectors: 16, len_bytes: 512, device_sectors: 16 };
        let expected = RequestError::Geometry { device: name.clone(), operation: "write", refused };
        assert_eq!(RequestError::of(&error), Some(&expected));
        assert_eq!(
            error.to_string(),
            format!("{name}: write of sectors 16..17 refused: past the end of the device (16 sectors)")
        );

        let error = runtime.block_on(target.write_zeroes(15, u64::MAX)).unwrap_err();
        assert!(
            matches!(
                RequestError::of(&error),
                Some(RequestError::Geometry {
                    refused: RequestRefused::OutOfRange { .. },
                    operation: "write-zeroes",
                    ..
                })
            ),
            "{error}"
        );
        let (_, result) = runtime.block_on(target.read(0, ReadBuf::with_capacity(100)));
        let error = result.unwrap_err();
        assert!(
            matches!(
                RequestError::of(&error),
                Some(RequestError::Geometry { refused: RequestRefused::Misaligned { block_bytes: 512, .. }, .. })
            ),
            "{error}"
        );
        assert_eq!(target.stats().refused, 3);
        assert_eq!(source.stats().refused, 1);
        assert_eq!(target.stats().writes, 0, "nothing was written");
    }
}
