//! Opening device addresses into typed devices: files and block devices through
//! `kcopyd-os`, NBD exports through `kcopyd-nbd`, `sim:` disks through their [`SimDisk`].
//!
//! ```text
//!  DeviceAddress ──► open(role, write, create_len) ──► Opened { device, os facts, export }
//!    Path  ─► OsDevice (O_DIRECT or buffered), extended if created, flock'd (shared/exclusive)
//!    Nbd   ─► NbdDevice (connect, handshake) with its export's size and flags
//!    Sim   ─► SimDisk::build(len)
//! ```
//!
//! Each [`Opened`] checks its own range ([`Opened::check_range`]) and overlap with another
//! device through every name of the same storage ([`Opened::check_overlap`]).

use std::fmt;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kcopyd_core::{BlockDevice, ClientConfig, Device, SECTOR_SIZE};
use kcopyd_os::{DeviceKind, FileKey, FileLocks, IoEngine, LockError, LockKind, OpenOptions, OsDevice, Storage};

use crate::address::{Backend, DeviceAddress, SimDisk};
use crate::error::{DeviceProblem, PlanError, Role};

/// The engine's configuration and how to open devices.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The client's configuration.
    pub config: ClientConfig,
    /// Use the page cache instead of O_DIRECT.
    pub buffered: bool,
    /// I/O threads (or ring slots) per opened device: one per sub-job in flight.
    pub queue_depth: usize,
    /// The I/O engine of opened files and block devices.
    pub io_engine: IoEngine,
    /// How NBD exports are opened: connect timeout, per-request timeout.
    pub nbd: NbdSettings,
    /// Told of each file a plan creates (see [`CreatedHook`]).
    pub created_hook: Option<Arc<dyn CreatedHook>>,
}

/// How NBD exports are opened: connections, timeouts in milliseconds, TLS parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdSettings {
    /// Connections opened to each export whose server allows several
    /// ([`kcopyd_nbd::ConnectOptions::connections_max`]: 1 to [`kcopyd_nbd::CONNECTIONS_MAX`]).
    pub connections_max: usize,
    /// How long connecting and the handshake of each connection may take.
    pub connect_timeout_ms: u64,
    /// Most time a request may wait for its reply (`None`: for ever).
    pub io_timeout_ms: Option<u64>,
    /// TLS parameters for `nbds://` and `nbds+unix://` exports whose URI does not give them.
    pub tls: kcopyd_nbd::TlsOptions,
    /// Warm each export's server up before a long copy or comparison
    /// ([`crate::run::warm_up_bytes`]; on by default).
    pub warm_up: bool,
}

impl Settings {
    /// Settings of `config` for files and block devices through O_DIRECT with the synchronous
    /// engine, one I/O thread per sub-job in flight, and NBD's default timeouts.
    pub fn new(config: ClientConfig) -> Settings {
        let queue_depth = config.subjobs_in_flight.clamp(1, kcopyd_os::QUEUE_DEPTH_MAX);
        let nbd = NbdSettings {
            connections_max: kcopyd_nbd::CONNECTIONS_DEFAULT,
            connect_timeout_ms: kcopyd_nbd::CONNECT_TIMEOUT_MS_DEFAULT,
            io_timeout_ms: config.io_timeout_ms,
            tls: kcopyd_nbd::TlsOptions::default(),
            warm_up: true,
        };
        Settings { config, buffered: false, queue_depth, io_engine: IoEngine::Sync, nbd, created_hook: None }
    }
}

/// Told of the files a plan creates, so that a process that quits at once (without
/// unwinding, as on a second Ctrl-C) can remove them too.
pub trait CreatedHook: fmt::Debug + Send + Sync {
    /// `path` is about to be created; the returned guard is held until it exists.
    fn creating(&self, path: &Path) -> Box<dyn std::any::Any>;
    /// `paths` are kept, or removed already: forget them.
    fn forget(&self, paths: &[PathBuf]);
    /// `path` was created as the file `id` (its filesystem's device number and its inode
    /// number): remove it only while the path still names that file ([`remove_created`]).
    fn made(&self, _path: &Path, _id: FileKey) {}
}

/// Removes `path`, a file this process created, if it still is that file: with `id` known,
/// only while the path names the file `id` (another file renamed over it in the meantime is
/// someone else's and stays); without it (the open that created it failed), by name.
pub fn remove_created(path: &Path, id: Option<FileKey>) {
    let ours = match id {
        Some(id) => fs::symlink_metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == id),
        None => true,
    };
    if ours {
        let _ = fs::remove_file(path);
    }
}

/// Removes `path`, a file this process created and holds open as `file`, while the path
/// still names that file ([`remove_created`]); left as it is when `file` cannot be looked at.
pub fn remove_made(path: &Path, file: &fs::File) {
    if let Ok(made) = file.metadata() {
        remove_created(path, Some((made.dev(), made.ino())));
    }
}

/// An opened device address.
#[derive(Debug, Clone)]
pub struct Opened {
    /// The address it was opened from.
    pub arg: DeviceAddress,
    /// Which end of the job it is.
    pub role: Role,
    /// The device.
    pub device: Device,
    /// Files and block devices: what was opened.
    pub os: Option<OsFacts>,
    /// NBD exports: what the server said of the export (its exact size and flags), for a
    /// copy map to recognise it by.
    pub export: Option<String>,
    /// NBD exports: the export, for the bytes past its whole blocks (see [`crate::tail`]).
    pub nbd: Option<Arc<kcopyd_nbd::NbdDevice>>,
}

/// What a file or block device address opened.
#[derive(Debug, Clone)]
pub struct OsFacts {
    /// The path given.
    pub path: PathBuf,
    /// A regular file or a block device.
    pub kind: DeviceKind,
    /// The file or whole disk underneath (through partitions and loop devices).
    pub storage: Storage,
    /// The bytes a range may use: a file's whole length (its partial last block too), a
    /// block device's length.
    pub len_bytes: u64,
}

/// What became of a file or block device's path while it was in use: the device written
/// (through the descriptor opened at the start) is no longer what the path names, so the
/// path does not hold what was written ([`Opened::path_change`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathChange {
    /// Nothing is at the path any more (removed or renamed away), or it cannot be looked up:
    /// the reason.
    Removed(String),
    /// Another file or device node took the path (renamed over it, or removed and created
    /// again).
    Replaced,
}

impl PathChange {
    /// `removed` or `replaced`: the target's status in a report.
    pub fn status(&self) -> &'static str {
        match self {
            PathChange::Removed(_) => "removed",
            PathChange::Replaced => "replaced",
        }
    }
}

impl fmt::Display for PathChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathChange::Removed(reason) => write!(f, "the path no longer names the file opened ({reason})"),
            PathChange::Replaced => f.write_str("the path names another file than the one opened"),
        }
    }
}

impl Opened {
    /// Whether the path of a file or block device still names what was opened from it: for
    /// a file, the same filesystem and inode; for a block device, the same device number.
    /// `None` when it does, and for NBD exports and simulated disks (no path). A copy asks
    /// at its end: a target renamed over or removed while it was written holds nothing of
    /// the copy at its path, however well the writes went.
    pub fn path_change(&self) -> Option<PathChange> {
        let facts = self.os.as_ref()?;
        let metadata = match fs::metadata(&facts.path) {
            Ok(metadata) => metadata,
            Err(error) => return Some(PathChange::Removed(error.to_string())),
        };
        let id = self.device.id();
        let same = match facts.kind {
            DeviceKind::File => (metadata.dev(), metadata.ino()) == (id.major, id.minor),
            DeviceKind::BlockDevice => metadata.rdev() == id.major,
        };
        (!same).then_some(PathChange::Replaced)
    }

    /// The bytes a range may use: a regular file's whole length, partial last block
    /// included; an NBD export's size, whole blocks or not; a block device's or simulated
    /// disk's length.
    pub fn len_bytes(&self) -> u64 {
        match (&self.os, &self.nbd) {
            (Some(facts), _) => facts.len_bytes,
            (None, Some(nbd)) => nbd.size_bytes(),
            (None, None) => self.device.geometry().len_sectors * SECTOR_SIZE as u64,
        }
    }

    /// Whether this is a regular file, which takes a partial last block (through the page
    /// cache, see [`crate::tail`]).
    pub fn is_file(&self) -> bool {
        self.os.as_ref().is_some_and(|facts| facts.kind == DeviceKind::File)
    }

    /// Whether a range may end in a partial block here: regular files, and NBD exports (byte
    /// requests, where the server's minimum block size allows them: see [`crate::plan`]).
    pub fn takes_partial_block(&self) -> bool {
        self.is_file() || self.nbd.is_some()
    }

    /// The device's logical block size in bytes.
    pub fn block_bytes(&self) -> u64 {
        u64::from(self.device.geometry().logical_block_size)
    }

    /// The first sector of the range.
    pub fn start_sector(&self) -> u64 {
        self.arg.offset_bytes / SECTOR_SIZE as u64
    }

    /// The error naming this device and `problem`.
    pub fn error(&self, problem: DeviceProblem) -> PlanError {
        PlanError::device(self.role, &self.arg.text, problem)
    }

    /// Checks that `len_bytes` from the argument's offset lie on the device, the offset
    /// aligned to its logical block, and the length too unless this is a regular file (whose
    /// partial last block the plan checks).
    ///
    /// Worked example, 4096-byte blocks: offset 8K, length 1M: aligned; offset 512: refused,
    /// although 512 is a whole sector.
    ///
    /// # Errors
    /// The offset or length is misaligned, or the range runs past the end.
    pub fn check_range(&self, len_bytes: u64) -> Result<(), PlanError> {
        let block = self.block_bytes();
        let offset = self.arg.offset_bytes;
        if offset % block != 0 {
            return Err(self.error(DeviceProblem::OffsetNotBlocks { offset_bytes: offset, block_bytes: block }));
        }
        let device_bytes = self.len_bytes();
        if offset.checked_add(len_bytes).is_none_or(|end| end > device_bytes) {
            let problem = match self.role {
                Role::Target => DeviceProblem::TooSmall { offset_bytes: offset, len_bytes, device_bytes },
                Role::Source => DeviceProblem::PastEnd { offset_bytes: offset, len_bytes, device_bytes },
            };
            return Err(self.error(problem));
        }
        // After the bounds: a length past the end is refused as such, not as misaligned.
        if len_bytes % block != 0 && !self.takes_partial_block() {
            return Err(self.misaligned_length(len_bytes, block));
        }
        Ok(())
    }

    /// The error for a length that is not whole blocks of this device, with the length that is.
    fn misaligned_length(&self, len_bytes: u64, block: u64) -> PlanError {
        PlanError::Length {
            len_bytes,
            problem: match len_bytes / block * block {
                0 => format!(
                    "{len_bytes} bytes is less than one {block}-byte logical block of {} '{}', which \
                     takes whole blocks: there is no whole block to move",
                    self.role.name(),
                    self.arg.text,
                ),
                whole => format!(
                    "{len_bytes} bytes is not a multiple of the {block}-byte logical block of {} '{}', \
                     which takes whole blocks (--length {whole} leaves the last {} bytes out)",
                    self.role.name(),
                    self.arg.text,
                    len_bytes % block
                ),
            },
        }
    }

    /// Whether the range of `len_bytes` ends at the end of this regular file or NBD export.
    pub(crate) fn ends_at_end_of_file(&self, len_bytes: u64) -> bool {
        self.takes_partial_block() && self.arg.offset_bytes.checked_add(len_bytes) == Some(self.len_bytes())
    }

    /// The largest length the source offers from its offset.
    ///
    /// # Errors
    /// The offset lies past the end.
    pub fn remaining_bytes(&self) -> Result<u64, PlanError> {
        let device_bytes = self.len_bytes();
        let offset_bytes = self.arg.offset_bytes;
        device_bytes
            .checked_sub(offset_bytes)
            .ok_or_else(|| self.error(DeviceProblem::OffsetPastEnd { offset_bytes, device_bytes }))
    }

    /// Refuses `self` if its range overlaps `other`'s on the same storage, whatever names
    /// reach it: the same file through a hard link, a loop device over it, a partition of a
    /// disk and the disk itself.
    ///
    /// # Errors
    /// The ranges overlap.
    pub fn check_overlap(&self, other: &Opened, len_bytes: u64) -> Result<(), PlanError> {
        let (a, b) = (self.arg.offset_bytes, other.arg.offset_bytes);
        let problem = match (&self.os, &other.os) {
            (Some(mine), Some(theirs)) => {
                mine.storage.overlaps(a, len_bytes, &theirs.storage, b, len_bytes).then(|| {
                    let (a, b) = (a + mine.storage.offset_bytes, b + theirs.storage.offset_bytes);
                    let layers = [(self, mine), (other, theirs)]
                        .into_iter()
                        .filter(|(_, facts)| !facts.storage.layers.is_empty())
                        .map(|(opened, facts)| (opened.arg.text.clone(), facts.storage.layers.clone()))
                        .collect();
                    DeviceProblem::OverlapsStorage {
                        other_role: other.role,
                        other: other.arg.text.clone(),
                        ranges: [[a, a + len_bytes], [b, b + len_bytes]],
                        layers,
                    }
                })
            }
            (None, None) => {
                (len_bytes > 0 && self.device.id() == other.device.id() && a < b + len_bytes && b < a + len_bytes).then(
                    || DeviceProblem::OverlapsDevice {
                        other_role: other.role,
                        other: other.arg.text.clone(),
                        ranges: [[a, a + len_bytes], [b, b + len_bytes]],
                    },
                )
            }
            _ => None,
        };
        match problem {
            Some(problem) => Err(self.error(problem)),
            None => Ok(()),
        }
    }

    /// A note when this NBD export was opened with fewer connections than `asked`: its server
    /// does not allow several (no `NBD_FLAG_CAN_MULTI_CONN`), or took fewer than were asked
    /// for. Its requests then share those. `None` for other devices, and when it has what was
    /// asked for.
    pub fn connections_note(&self, asked: usize) -> Option<String> {
        let nbd = self.nbd.as_ref()?;
        let opened = nbd.connections();
        if opened >= asked {
            return None;
        }
        let why = if nbd.can_multi_conn() {
            format!("its server took {opened}")
        } else {
            format!("its server does not allow several (no NBD_FLAG_CAN_MULTI_CONN): {opened}")
        };
        let noun = if opened == 1 { "connection" } else { "connections" };
        Some(format!("{} '{}': {why} {noun}, not the {asked} asked for", self.role.name(), self.arg.text))
    }

    /// A note when this file or block device runs fewer I/Os at once (`queue_depth`: its I/O
    /// threads or ring slots, at most [`kcopyd_os::QUEUE_DEPTH_MAX`]) than the `asked`
    /// sub-jobs in flight: the I/Os of the others wait in its queue. `None` for NBD exports
    /// and simulated disks, and when it runs them all.
    pub fn queue_depth_note(&self, queue_depth: usize, asked: usize) -> Option<String> {
        if self.os.is_none() || queue_depth >= asked {
            return None;
        }
        Some(format!(
            "{} '{}': a file or block device runs at most {queue_depth} I/Os at once, \
             not the {asked} sub-jobs asked for (the others wait in its queue)",
            self.role.name(),
            self.arg.text
        ))
    }

    /// A warning when the range of this device (a source) lies on a block device mounted
    /// read-write: its content may change while it is read.
    pub fn mounted_warning(&self, len_bytes: u64) -> Option<String> {
        let facts = self.os.as_ref()?;
        let mounted = kcopyd_os::mounted_read_write();
        let mount = mounted
            .iter()
            .find(|m| facts.storage.overlaps(self.arg.offset_bytes, len_bytes, &m.storage, 0, m.len_bytes))?;
        Some(format!(
            "{} '{}' lies on {}, mounted read-write at {}: its content may change while it is read; \
             unmount it or remount it read-only for a consistent copy",
            self.role.name(),
            self.arg.text,
            mount.device,
            mount.mount_point,
        ))
    }
}

/// Opens `arg`. `write` opens for writing; `create_len_bytes` creates (or sizes) a missing
/// file or a `sim:` device without `size`. A file is locked in `locks`: exclusively when
/// written, shared when read.
///
/// # Errors
/// The device cannot be opened or locked, or a `sim:` source has no size.
pub fn open(
    arg: &DeviceAddress,
    role: Role,
    write: bool,
    create_len_bytes: Option<u64>,
    settings: &Settings,
    locks: &mut FileLocks,
) -> Result<Opened, PlanError> {
    match &arg.backend {
        Backend::Sim(spec) => open_sim(arg, spec.as_ref(), role, create_len_bytes),
        Backend::Nbd(uri) => open_nbd(arg, uri, role, write, &settings.nbd),
        Backend::Path(path) => open_path(arg, path, role, (write, create_len_bytes), settings, locks),
    }
}

/// Builds the `sim:` disk of `arg`: of its own `size`, else of `create_len_bytes`.
fn open_sim(
    arg: &DeviceAddress,
    spec: &dyn SimDisk,
    role: Role,
    create_len_bytes: Option<u64>,
) -> Result<Opened, PlanError> {
    // A disk of whole sectors; a length that ends inside one is refused by the checks.
    let create_len_bytes = create_len_bytes.map(|len_bytes| len_bytes / SECTOR_SIZE as u64 * SECTOR_SIZE as u64);
    let Some(len_bytes) = spec.len_bytes().or(create_len_bytes) else {
        return Err(PlanError::device(role, &arg.text, DeviceProblem::SimSizeNeeded));
    };
    spec.check_len(len_bytes).map_err(|error| PlanError::device(role, &arg.text, DeviceProblem::SimLen(error)))?;
    let disk = spec.build(len_bytes);
    Ok(Opened { arg: arg.clone(), role, device: disk, os: None, export: None, nbd: None })
}

/// Opens the file or block device `path` of `arg` (creating, extending and locking a file).
fn open_path(
    arg: &DeviceAddress,
    path: &Path,
    role: Role,
    (write, create_len_bytes): (bool, Option<u64>),
    settings: &Settings,
    locks: &mut FileLocks,
) -> Result<Opened, PlanError> {
    let options = OpenOptions {
        write,
        buffered: settings.buffered,
        queue_depth: settings.queue_depth,
        // Whole sectors here; a partial last sector is added below.
        create_len: if write {
            create_len_bytes.map(|len_bytes| len_bytes / SECTOR_SIZE as u64 * SECTOR_SIZE as u64)
        } else {
            None
        },
        engine: settings.io_engine,
    };
    let device =
        OsDevice::open(path, &options).map_err(|source| PlanError::Open { role, text: arg.text.clone(), source })?;
    let refuse = |problem: DeviceProblem| PlanError::device(role, &arg.text, problem);
    // Locked before it is sized: another kcopyd that opens a file this one has just created
    // finds it locked (or, having locked it first to look at it, lets go of it soon).
    if device.kind() == DeviceKind::File {
        if write {
            check_writable_mode(path, role, &arg.text)?;
        }
        let created_here = write && create_len_bytes.is_some();
        lock_file(&device, path, (role, write, created_here), locks).map_err(refuse)?;
    }
    // Through the descriptor opened, not the path: the file written is the file sized.
    if let (true, Some(len_bytes), DeviceKind::File) = (write, create_len_bytes, device.kind()) {
        device.extend_to(len_bytes).map_err(|source| refuse(DeviceProblem::Extend { len_bytes, source }))?;
    }
    let len_bytes = match device.kind() {
        DeviceKind::File => device.file_len_bytes().map_err(|source| refuse(DeviceProblem::FileLength { source }))?,
        DeviceKind::BlockDevice => device.geometry().len_sectors * SECTOR_SIZE as u64,
    };
    let storage = device.storage().clone();
    let os = Some(OsFacts { path: path.to_path_buf(), kind: device.kind(), storage, len_bytes });
    Ok(Opened { arg: arg.clone(), role, device: Arc::new(device), os, export: None, nbd: None })
}

/// Locks the file `device` (opened at `path`) in `locks`: exclusively when written.
fn lock_file(
    device: &OsDevice,
    path: &Path,
    (role, write, created_here): (Role, bool, bool),
    locks: &mut FileLocks,
) -> Result<(), DeviceProblem> {
    let id = device.id();
    let kind = if write { LockKind::Exclusive } else { LockKind::Shared };
    // A file this run has just created (exclusively) is its own; another kcopyd that opened
    // it in the instant before it was locked holds the lock only while it looks at it (an
    // empty file is too small for its copy), so it is waited for, a second at most.
    let patience = std::time::Instant::now() + CREATED_LOCK_WAIT;
    loop {
        match locks.lock(path, (id.major, id.minor), kind) {
            Err(LockError::Busy) if created_here && std::time::Instant::now() < patience => {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Ok(()) => return Ok(()),
            Err(LockError::Busy) => return Err(DeviceProblem::Busy { role, write }),
            Err(other) => return Err(DeviceProblem::Lock(other)),
        }
    }
}

/// How long a run waits for the lock of a file it has just created ([`lock_file`]).
const CREATED_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Opens the NBD export `uri` of `arg` with the command's connections, timeouts and TLS
/// parameters.
///
/// # Errors
/// The export cannot be opened (named by the library's [`kcopyd_nbd::ConnectError`]).
fn open_nbd(arg: &DeviceAddress, uri: &str, role: Role, write: bool, nbd: &NbdSettings) -> Result<Opened, PlanError> {
    let options = kcopyd_nbd::ConnectOptions {
        write,
        connections_max: nbd.connections_max,
        connect_timeout_ms: nbd.connect_timeout_ms,
        io_timeout_ms: nbd.io_timeout_ms,
        tls: nbd.tls.clone(),
        ..kcopyd_nbd::ConnectOptions::default()
    };
    let device = kcopyd_nbd::NbdDevice::connect(uri, &options).map_err(|source| PlanError::Connect {
        role,
        text: arg.text.clone(),
        source,
    })?;
    // What the server said of the export (its exact size and flags), for a copy map to
    // recognise it by.
    let export = format!(
        "size={} flags=read-only:{},multi-conn:{},trim:{}",
        device.size_bytes(),
        u8::from(device.is_read_only_export()),
        u8::from(device.can_multi_conn()),
        u8::from(device.has_trim())
    );
    let device = Arc::new(device);
    Ok(Opened { arg: arg.clone(), role, device: device.clone(), os: None, export: Some(export), nbd: Some(device) })
}

/// Extends the file at `path` to `len_bytes` if it is shorter (never truncates).
/// Refuses a target file whose mode gives nobody write permission (`chmod a-w`): a file
/// marked read-only is not written, also by root, who could.
fn check_writable_mode(path: &Path, role: Role, text: &str) -> Result<(), PlanError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(path).map(|m| m.permissions().mode()).unwrap_or(0o200);
    if mode & 0o222 == 0 {
        return Err(PlanError::device(role, text, DeviceProblem::ReadOnlyMode { mode: mode & 0o7777 }));
    }
    Ok(())
}
