//! Opening device arguments and checking ranges against them, before anything is written.
//!
//! ```text
//!  check counts and options ─► open SOURCE (read-only) ─► length ─► open existing TARGETs
//!    ─► check each: room, alignment, overlap ─► create missing TARGET files ─► check them
//!  any failure: remove the files created here, exit 2; nothing else was written
//! ```

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kcopyd_core::{BlockDevice, ClientConfig, Device, PAGE_SIZE, SECTOR_SIZE, TARGETS_MAX};
use kcopyd_os::{DeviceKind, IoEngine, OpenOptions, OsDevice, QUEUE_DEPTH_MAX, Storage};

use crate::cli::{EngineArgs, IoEngineArg, NBD_SUBJOBS_IN_FLIGHT_DEFAULT, SUBJOBS_IN_FLIGHT_DEFAULT, ThrottleArgs};
use crate::device_arg::{Backend, DeviceArg};
use crate::error::{CliError, open_reason};
use crate::locks::{FileLocks, LockError, LockKind};
use crate::progress;
use crate::size::Bytes;
use crate::tail::Tail;

/// The largest page budget the engine takes (`ClientConfig::validate` counts pages in 32 bits):
/// 16 TiB less one page.
pub const MEMORY_PAGES_MAX: u64 = u32::MAX as u64;

/// The engine's configuration and how to open devices, from the engine options.
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
}

/// `--connect-timeout` and `--io-timeout` for NBD exports, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NbdSettings {
    /// How long connecting and the handshake of each connection may take.
    pub connect_timeout_ms: u64,
    /// Most time a request may wait for its reply (`None`: for ever).
    pub io_timeout_ms: Option<u64>,
}

impl NbdSettings {
    /// The timeouts of `args`, checked: at least a millisecond each.
    ///
    /// # Errors
    /// A timeout under 1 ms, named by its option.
    fn from_args(args: &EngineArgs) -> Result<NbdSettings, CliError> {
        let millis = |option: &'static str, us: u64| {
            if us < 1000 {
                return Err(CliError::argument(option, format!("{us}us"), "must be at least 1ms"));
            }
            Ok(us / 1000)
        };
        Ok(NbdSettings {
            connect_timeout_ms: millis("--connect-timeout", args.connect_timeout_us)?,
            io_timeout_ms: args.io_timeout_us.map(|us| millis("--io-timeout", us)).transpose()?,
        })
    }
}

impl Settings {
    /// These settings with the throttle of `args`.
    ///
    /// # Errors
    /// A limit out of bounds, named by its option.
    pub fn with_throttle(mut self, args: &ThrottleArgs) -> Result<Settings, CliError> {
        let throttle =
            kcopyd_core::Throttle { busy_percent: args.busy_percent, rate_bytes_per_s: args.rate_bytes_per_s };
        throttle.validate().map_err(|source| {
            let option = match source {
                kcopyd_core::ConfigError::ThrottleBusy { .. } => "--throttle-busy",
                _ => "--throttle-rate",
            };
            CliError::Config { option, source }
        })?;
        self.config.throttle = throttle;
        Ok(self)
    }

    /// Checks the engine options for a command on `devices` (whose kinds choose defaults:
    /// NBD exports get [`NBD_SUBJOBS_IN_FLIGHT_DEFAULT`] sub-jobs in flight).
    ///
    /// # Errors
    /// An option out of bounds, named.
    pub fn from_args<'a>(
        args: &EngineArgs,
        devices: impl IntoIterator<Item = &'a DeviceArg>,
    ) -> Result<Settings, CliError> {
        let subjobs_in_flight = args.subjobs_in_flight.unwrap_or_else(|| {
            let nbd = devices.into_iter().any(|device| matches!(device.backend, Backend::Nbd(_)));
            if nbd { NBD_SUBJOBS_IN_FLIGHT_DEFAULT } else { SUBJOBS_IN_FLIGHT_DEFAULT }
        });
        if args.memory_bytes < PAGE_SIZE as u64 {
            return Err(CliError::argument(
                "--memory",
                args.memory_bytes.to_string(),
                format!("{} is less than one {PAGE_SIZE}-byte page", Bytes(args.memory_bytes)),
            ));
        }
        let memory_bytes_max = MEMORY_PAGES_MAX * PAGE_SIZE as u64;
        if args.memory_bytes > memory_bytes_max {
            return Err(CliError::argument(
                "--memory",
                args.memory_bytes.to_string(),
                format!(
                    "{} is more than the largest budget, {} ({memory_bytes_max} bytes)",
                    Bytes(args.memory_bytes),
                    Bytes(memory_bytes_max)
                ),
            ));
        }
        let sub_job_size_bytes = usize::try_from(args.sub_job_size_bytes).unwrap_or(usize::MAX);
        let nbd = NbdSettings::from_args(args)?;
        let config = ClientConfig {
            page_budget: usize::try_from(args.memory_bytes / PAGE_SIZE as u64).unwrap_or(usize::MAX),
            sub_job_size_bytes,
            subjobs_in_flight,
            huge_pages: !args.no_huge_pages,
            io_timeout_ms: nbd.io_timeout_ms,
            ..ClientConfig::default()
        };
        config.validate().map_err(|source| {
            let option = match source {
                kcopyd_core::ConfigError::SubJobSize { .. } => "--sub-job-size",
                kcopyd_core::ConfigError::SubjobsInFlight { .. } => "--subjobs-in-flight",
                _ => "--memory",
            };
            CliError::Config { option, source }
        })?;
        let queue_depth = subjobs_in_flight.clamp(1, QUEUE_DEPTH_MAX);
        let io_engine = match args.io_engine {
            IoEngineArg::Sync => IoEngine::Sync,
            IoEngineArg::Uring if cfg!(feature = "io-uring") => IoEngine::Uring,
            IoEngineArg::Uring => {
                return Err(CliError::argument(
                    "--io-engine",
                    "uring",
                    "this kcopyd was built without io_uring support (cargo feature io-uring); use --io-engine sync",
                ));
            }
        };
        Ok(Settings { config, buffered: args.buffered, queue_depth, io_engine, nbd })
    }
}

/// Which argument a device came from, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The source.
    Source,
    /// A target.
    Target,
}

impl Role {
    /// The argument's name in messages.
    pub fn name(self) -> &'static str {
        match self {
            Role::Source => "SOURCE",
            Role::Target => "TARGET",
        }
    }
}

/// An opened device argument.
#[derive(Debug, Clone)]
pub struct Opened {
    /// The argument.
    pub arg: DeviceArg,
    /// Which argument it is.
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

/// What a file or block device argument opened.
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

impl Opened {
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
    /// requests, where the server's minimum block size allows them: see [`check_tail`]).
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

    fn error(&self, problem: impl Into<String>) -> CliError {
        CliError::argument(self.role.name(), &self.arg.text, problem)
    }

    /// Checks that `len_bytes` from the argument's offset lie on the device, the offset
    /// aligned to its logical block, and the length too unless this is a regular file (whose
    /// partial last block [`check_tail`] checks).
    ///
    /// Worked example, 4096-byte blocks: offset 8K, length 1M: aligned; offset 512: refused,
    /// although 512 is a whole sector.
    ///
    /// # Errors
    /// The offset or length is misaligned, or the range runs past the end.
    pub fn check_range(&self, len_bytes: u64) -> Result<(), CliError> {
        let block = self.block_bytes();
        let offset = self.arg.offset_bytes;
        if offset % block != 0 {
            return Err(self.error(format!(
                "offset of {offset} bytes is not a multiple of the device's {block}-byte logical block"
            )));
        }
        let device_bytes = self.len_bytes();
        if offset.checked_add(len_bytes).is_none_or(|end| end > device_bytes) {
            let problem = match self.role {
                Role::Target => format!(
                    "too small: the range ends at byte {} ({} from offset {offset}), \
                     but the device holds {device_bytes} bytes ({})",
                    offset.saturating_add(len_bytes),
                    Bytes(len_bytes),
                    Bytes(device_bytes)
                ),
                Role::Source => format!(
                    "{len_bytes} bytes from offset {offset} run past the end of the device at {device_bytes} bytes"
                ),
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
    fn misaligned_length(&self, len_bytes: u64, block: u64) -> CliError {
        CliError::argument(
            "--length",
            len_bytes.to_string(),
            match len_bytes / block * block {
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
        )
    }

    /// Whether the range of `len_bytes` ends at the end of this regular file or NBD export.
    fn ends_at_end_of_file(&self, len_bytes: u64) -> bool {
        self.takes_partial_block() && self.arg.offset_bytes.checked_add(len_bytes) == Some(self.len_bytes())
    }

    /// The largest length the source offers from its offset.
    ///
    /// # Errors
    /// The offset lies past the end.
    pub fn remaining_bytes(&self) -> Result<u64, CliError> {
        let device_bytes = self.len_bytes();
        device_bytes.checked_sub(self.arg.offset_bytes).ok_or_else(|| {
            self.error(format!(
                "offset of {} bytes lies past the end of the device at {device_bytes} bytes",
                self.arg.offset_bytes
            ))
        })
    }

    /// Refuses `self` if its range overlaps `other`'s on the same storage, whatever names
    /// reach it: the same file through a hard link, a loop device over it, a partition of a
    /// disk and the disk itself.
    ///
    /// # Errors
    /// The ranges overlap.
    pub fn check_overlap(&self, other: &Opened, len_bytes: u64) -> Result<(), CliError> {
        let (a, b) = (self.arg.offset_bytes, other.arg.offset_bytes);
        let problem = match (&self.os, &other.os) {
            (Some(mine), Some(theirs)) => {
                mine.storage.overlaps(a, len_bytes, &theirs.storage, b, len_bytes).then(|| {
                    let (a, b) = (a + mine.storage.offset_bytes, b + theirs.storage.offset_bytes);
                    let mut problem = format!(
                        "overlaps {} '{}' on the same storage: bytes {a}-{} and {b}-{} of it",
                        other.role.name(),
                        other.arg.text,
                        a + len_bytes,
                        b + len_bytes
                    );
                    for (opened, facts) in [(self, mine), (other, theirs)] {
                        if !facts.storage.layers.is_empty() {
                            problem.push_str(&format!(
                                "; '{}' is a {}",
                                opened.arg.text,
                                facts.storage.layers.join(", a ")
                            ));
                        }
                    }
                    problem
                })
            }
            (None, None) => {
                (len_bytes > 0 && self.device.id() == other.device.id() && a < b + len_bytes && b < a + len_bytes).then(
                    || {
                        format!(
                            "overlaps {} '{}' on the same device: bytes {a}-{} and {b}-{}",
                            other.role.name(),
                            other.arg.text,
                            a + len_bytes,
                            b + len_bytes
                        )
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

/// Files created by this command, removed again if it fails before writing.
#[derive(Debug, Default)]
pub struct CreatedFiles {
    paths: Vec<PathBuf>,
}

impl CreatedFiles {
    /// Records `path`, about to be created: removed when the command fails before writing or
    /// quits at once on a signal. The file is created while the returned guard lives.
    pub fn creating(&mut self, path: &Path) -> progress::CreatedGuard {
        self.paths.push(path.to_path_buf());
        progress::CreatedGuard::creating(path)
    }

    /// Keeps the files: the job has started.
    pub fn keep(&mut self) {
        progress::forget_created(&self.paths);
        self.paths.clear();
    }
}

impl Drop for CreatedFiles {
    fn drop(&mut self) {
        for path in &self.paths {
            let _ = fs::remove_file(path);
        }
        progress::forget_created(&self.paths);
    }
}

/// Refuses more targets than one job takes.
///
/// # Errors
/// More than [`TARGETS_MAX`] targets.
pub fn check_target_count(count: usize) -> Result<(), CliError> {
    if count > TARGETS_MAX {
        return Err(CliError::Arguments {
            what: "TARGET",
            problem: format!("{count} targets given: one job copies to at most {TARGETS_MAX}"),
        });
    }
    Ok(())
}

/// Opens `arg`. `write` opens for writing; `create_len_bytes` creates (or sizes) a missing
/// file or a `sim:` device without `size`. A file is locked in `locks`: exclusively when
/// written, shared when read.
///
/// # Errors
/// The device cannot be opened or locked, or a `sim:` source has no size.
pub fn open(
    arg: &DeviceArg,
    role: Role,
    write: bool,
    create_len_bytes: Option<u64>,
    settings: &Settings,
    locks: &mut FileLocks,
) -> Result<Opened, CliError> {
    match &arg.backend {
        Backend::Sim(spec) => {
            // A disk of whole sectors; a length that ends inside one is refused by the checks.
            let create_len_bytes =
                create_len_bytes.map(|len_bytes| len_bytes / SECTOR_SIZE as u64 * SECTOR_SIZE as u64);
            let Some(len_bytes) = spec.len_bytes.or(create_len_bytes) else {
                return Err(CliError::argument(role.name(), &arg.text, "sim key 'size' is needed here"));
            };
            spec.check_len(len_bytes).map_err(|error| CliError::argument(role.name(), &arg.text, error.to_string()))?;
            let disk = spec.build(len_bytes);
            Ok(Opened { arg: arg.clone(), role, device: disk, os: None, export: None, nbd: None })
        }
        Backend::Nbd(uri) => open_nbd(arg, uri, role, write, settings.nbd),
        Backend::Path(path) => {
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
            let device = OsDevice::open(path, &options).map_err(|source| CliError::Open {
                what: role.name(),
                text: arg.text.clone(),
                reason: open_reason(&source, Some("--buffered")),
                source,
            })?;
            if let (true, Some(len_bytes), DeviceKind::File) = (write, create_len_bytes, device.kind()) {
                extend_file(path, len_bytes).map_err(|error| {
                    CliError::argument(
                        role.name(),
                        &arg.text,
                        format!("extending the file to {len_bytes} bytes: {error}"),
                    )
                })?;
            }
            let len_bytes = match device.kind() {
                DeviceKind::File => fs::metadata(path)
                    .map_err(|error| {
                        CliError::argument(role.name(), &arg.text, format!("reading the file's length: {error}"))
                    })?
                    .len(),
                DeviceKind::BlockDevice => device.geometry().len_sectors * SECTOR_SIZE as u64,
            };
            if write && device.kind() == DeviceKind::File {
                check_writable_mode(path, role, &arg.text)?;
            }
            if device.kind() == DeviceKind::File {
                let id = device.id();
                let kind = if write { LockKind::Exclusive } else { LockKind::Shared };
                locks.lock(path, (id.major, id.minor), kind).map_err(|error| {
                    let problem = match error {
                        LockError::Busy => format!(
                            "{} busy: another kcopyd (or a program holding a flock lock on it) is {} it",
                            role.name().to_lowercase(),
                            if write { "using" } else { "writing" }
                        ),
                        LockError::Replaced => "the file was replaced while it was being opened".to_owned(),
                        LockError::Io(error) => format!("cannot lock the file: {error}"),
                    };
                    CliError::argument(role.name(), &arg.text, problem)
                })?;
            }
            let storage = device.storage().clone();
            let os = Some(OsFacts { path: path.clone(), kind: device.kind(), storage, len_bytes });
            Ok(Opened { arg: arg.clone(), role, device: Arc::new(device), os, export: None, nbd: None })
        }
    }
}

/// Opens the NBD export `uri` of `arg` with the command's timeouts.
///
/// # Errors
/// The export cannot be opened (named by the library's [`kcopyd_nbd::ConnectError`]).
fn open_nbd(arg: &DeviceArg, uri: &str, role: Role, write: bool, nbd: NbdSettings) -> Result<Opened, CliError> {
    let options = kcopyd_nbd::ConnectOptions {
        write,
        connect_timeout_ms: nbd.connect_timeout_ms,
        io_timeout_ms: nbd.io_timeout_ms,
        ..kcopyd_nbd::ConnectOptions::default()
    };
    let device = kcopyd_nbd::NbdDevice::connect(uri, &options)
        .map_err(|error| CliError::argument(role.name(), &arg.text, error.to_string()))?;
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

/// The tail of a range of `len_bytes` on `source` (copy, verify; `None` for zero) and
/// `targets`, moved in blocks of the largest logical block among them; refused unless every
/// device is a regular file and the range ends at the end of the source file (for zero: of
/// every target file). Block devices and simulated disks always move whole blocks.
///
/// Worked example: a 1,000,001-byte source file copied to a new file, 512-byte blocks: the
/// engine copies 999,936 bytes, the tail 65. The same source to a block device: refused,
/// naming `--length 999936`.
///
/// # Errors
/// A partial last block where one is not allowed.
fn check_tail(source: Option<&Opened>, targets: &[Opened], len_bytes: u64) -> Result<Tail, CliError> {
    let devices: Vec<&Opened> = source.into_iter().chain(targets).collect();
    let block_bytes = devices.iter().map(|d| d.block_bytes()).max().unwrap_or(SECTOR_SIZE as u64);
    let tail = Tail::of(len_bytes, block_bytes);
    if tail.is_empty() {
        return Ok(tail);
    }
    let ends_at_end_of_file = match source {
        Some(source) => source.ends_at_end_of_file(len_bytes),
        None => targets.iter().all(|target| target.ends_at_end_of_file(len_bytes)),
    };
    if !ends_at_end_of_file {
        return Err(CliError::argument(
            "--length",
            len_bytes.to_string(),
            format!(
                "{len_bytes} bytes is not a whole number of the {block_bytes}-byte blocks the job moves (the largest \
                 logical block of its devices); only a range that ends at the end of a regular {} file may end \
                 in a partial block",
                if source.is_some() { "source" } else { "target" }
            ),
        ));
    }
    for device in &devices {
        check_nbd_tail(device, tail)?;
    }
    if let Some(whole_blocks_only) = devices.iter().find(|d| !d.takes_partial_block()) {
        let what = match (&whole_blocks_only.os, &whole_blocks_only.arg.backend) {
            (Some(_), _) => "a block device",
            (None, Backend::Nbd(_)) => "an NBD export",
            (None, _) => "a simulated disk",
        };
        return Err(whole_blocks_only.error(format!(
            "is {what}, which takes whole {}-byte blocks, but the range of {len_bytes} bytes ends {} bytes into a \
             {block_bytes}-byte block: give --length {} to leave the last {} bytes out",
            whole_blocks_only.block_bytes(),
            tail.len_bytes,
            tail.offset_in_range_bytes,
            tail.len_bytes
        )));
    }
    Ok(tail)
}

/// Refuses the tail of a range on an NBD export whose server's minimum block size does not
/// allow it: a 1,000-byte export with 512-byte minimum blocks cannot give its last 488 bytes.
///
/// # Errors
/// The tail's offset or length is not a multiple of the server's minimum block size.
fn check_nbd_tail(device: &Opened, tail: Tail) -> Result<(), CliError> {
    let Some(nbd) = &device.nbd else { return Ok(()) };
    let min = u64::from(nbd.min_block_bytes());
    let at = device.arg.offset_bytes + tail.offset_in_range_bytes;
    if at % min == 0 && tail.len_bytes % min == 0 {
        return Ok(());
    }
    Err(device.error(format!(
        "the range ends {} bytes into a block, at byte {}, but the server's minimum block size is {min} bytes, \
         so those bytes cannot be {}: give --length {} to leave the last {} bytes out",
        tail.len_bytes,
        at + tail.len_bytes,
        if device.role == Role::Source { "read" } else { "written" },
        tail.offset_in_range_bytes,
        tail.len_bytes
    )))
}

/// Extends the file at `path` to `len_bytes` if it is shorter (never truncates).
fn extend_file(path: &Path, len_bytes: u64) -> io::Result<()> {
    let file = fs::OpenOptions::new().write(true).open(path)?;
    if file.metadata()?.len() < len_bytes {
        file.set_len(len_bytes)?;
    }
    Ok(())
}

/// Refuses a target file whose mode gives nobody write permission (`chmod a-w`): a file
/// marked read-only is not written, also by root, who could.
fn check_writable_mode(path: &Path, role: Role, text: &str) -> Result<(), CliError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(path).map(|m| m.permissions().mode()).unwrap_or(0o200);
    if mode & 0o222 == 0 {
        return Err(CliError::argument(
            role.name(),
            text,
            format!("read-only file (mode {:o}): refusing to write to it; make it writable first", mode & 0o7777),
        ));
    }
    Ok(())
}

/// Refuses, before anything is opened, an offset that is not a whole number of sectors and a
/// path ending in `/` that is not a directory (the system would call it missing, or create a
/// file of another name).
fn check_before_open(arg: &DeviceArg, role: Role) -> Result<(), CliError> {
    if let Backend::Path(path) = &arg.backend {
        if path.as_os_str().as_encoded_bytes().ends_with(b"/") && !path.is_dir() {
            return Err(CliError::argument(role.name(), &arg.text, "not a directory (the name ends in '/')"));
        }
    }
    if arg.offset_bytes % SECTOR_SIZE as u64 != 0 {
        return Err(CliError::argument(
            role.name(),
            &arg.text,
            format!("offset of {} bytes is not a multiple of the {SECTOR_SIZE}-byte sector", arg.offset_bytes),
        ));
    }
    Ok(())
}

/// [`plan_with_source`], interruptible while it connects (see [`open_interruptibly`]).
///
/// # Errors
/// As [`plan_with_source`], or the interruption.
pub async fn open_plan(
    source: &DeviceArg,
    targets: &[DeviceArg],
    length: Option<u64>,
    write: bool,
    settings: &Settings,
    interrupts: &mut crate::progress::Interrupts,
) -> Result<Plan, CliError> {
    let args = std::iter::once(source).chain(targets);
    let (source, targets, settings) = (source.clone(), targets.to_vec(), settings.clone());
    let open = move || plan_with_source(&source, &targets, length, write, &settings);
    open_interruptibly(args, interrupts, open).await
}

/// [`plan_zero`], interruptible while it connects (see [`open_interruptibly`]).
///
/// # Errors
/// As [`plan_zero`], or the interruption.
pub async fn open_zero_plan(
    targets: &[DeviceArg],
    length: Option<u64>,
    settings: &Settings,
    interrupts: &mut crate::progress::Interrupts,
) -> Result<ZeroPlan, CliError> {
    let (owned, settings) = (targets.to_vec(), settings.clone());
    open_interruptibly(targets, interrupts, move || plan_zero(&owned, length, &settings)).await
}

/// Runs `open` (opening devices, which for NBD exports means connecting and a handshake that
/// may take up to `--connect-timeout` per connection) on a thread of its own when `args` name
/// an NBD export, so that this thread goes on reading signals: Ctrl-C or SIGTERM ends the
/// wait at once with [`CliError::Interrupted`] (exit 130 or 143); the connecting thread is
/// left to the process's exit. Nothing is written before the devices are open, and files
/// are created only after every NBD export is open, so nothing is left behind.
///
/// # Errors
/// What `open` returns, or the interruption.
pub async fn open_interruptibly<'a, T: Send + 'static>(
    args: impl IntoIterator<Item = &'a DeviceArg>,
    interrupts: &mut crate::progress::Interrupts,
    open: impl FnOnce() -> Result<T, CliError> + Send + 'static,
) -> Result<T, CliError> {
    if !args.into_iter().any(|arg| matches!(arg.backend, Backend::Nbd(_))) {
        return open();
    }
    let (opened_tx, opened_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("kcopyd-open".into())
        .spawn(move || {
            let _ = opened_tx.send(open());
        })
        .map_err(|source| CliError::Start { what: "the thread opening the devices", source })?;
    tokio::select! {
        opened = opened_rx => opened.expect("the opening thread sends its result"),
        code = interrupts.recv() => Err(CliError::Interrupted { what: "connecting to the NBD server", code }),
    }
}

/// Whether `path` names nothing (a missing file that a copy may create).
fn is_missing(path: &Path) -> bool {
    matches!(fs::symlink_metadata(path), Err(e) if e.kind() == io::ErrorKind::NotFound)
}

/// A checked copy or verify: the source, the targets and the length.
#[derive(Debug)]
pub struct Plan {
    /// The source.
    pub source: Opened,
    /// The targets, in the order given.
    pub targets: Vec<Opened>,
    /// Bytes in the range.
    pub len_bytes: u64,
    /// The bytes after the range's whole blocks (regular files only).
    pub tail: Tail,
    /// Files created for missing targets.
    pub created: CreatedFiles,
    /// The locks on the files: held, never read, until the plan is dropped.
    #[allow(dead_code)]
    pub locks: FileLocks,
}

/// Opens and checks a source and its targets. `write` opens the targets for writing and
/// creates missing target files; otherwise every target must exist.
///
/// # Errors
/// Any check failing; files created here are removed again.
pub fn plan_with_source(
    source: &DeviceArg,
    targets: &[DeviceArg],
    length: Option<u64>,
    write: bool,
    settings: &Settings,
) -> Result<Plan, CliError> {
    check_target_count(targets.len())?;
    check_before_open(source, Role::Source)?;
    for target in targets {
        check_before_open(target, Role::Target)?;
    }
    check_headers_only(source, targets)?;
    let mut locks = FileLocks::default();
    let source = open(source, Role::Source, false, None, settings, &mut locks)?;
    let len_bytes = match length {
        Some(len_bytes) => len_bytes,
        None => source.remaining_bytes()?,
    };
    source.check_range(len_bytes)?;
    let mut created = CreatedFiles::default();
    let mut opened: Vec<Option<Opened>> = vec![None; targets.len()];
    // Existing devices first, so that a bad one stops the command before any file is created.
    // Looked at once: the same missing path given twice is created by the first of them.
    let missing: Vec<bool> =
        targets.iter().map(|arg| write && matches!(&arg.backend, Backend::Path(path) if is_missing(path))).collect();
    let passes: &[bool] = if write { &[false, true] } else { &[false] };
    for &creating in passes {
        for (index, arg) in targets.iter().enumerate() {
            let missing = missing[index];
            if missing != creating {
                continue;
            }
            let create_len = arg.offset_bytes.checked_add(len_bytes).ok_or_else(|| {
                CliError::argument("TARGET", &arg.text, "offset and length together overflow 64 bits")
            })?;
            let is_sim = matches!(arg.backend, Backend::Sim(_));
            let create_len = Some(create_len).filter(|_| missing || is_sim);
            // Before the open: a file created by an open that then fails is removed too.
            let creating = match (missing, &arg.backend) {
                (true, Backend::Path(path)) => Some(created.creating(path)),
                _ => None,
            };
            let target = open(arg, Role::Target, write, create_len, settings, &mut locks)?;
            drop(creating);
            target.check_range(len_bytes)?;
            // Reading the same bytes twice is harmless: only a copy checks for overlaps.
            if write {
                target.check_overlap(&source, len_bytes)?;
                for other in opened.iter().flatten() {
                    target.check_overlap(other, len_bytes)?;
                }
            }
            opened[index] = Some(target);
        }
    }
    let targets: Vec<Opened> =
        opened.into_iter().map(|t| t.expect("every target opened in one of the passes")).collect();
    let tail = check_tail(Some(&source), &targets, len_bytes)?;
    Ok(Plan { source, targets, len_bytes, tail, created, locks })
}

/// A checked zero job: the targets and the length.
#[derive(Debug)]
pub struct ZeroPlan {
    /// The targets, in the order given.
    pub targets: Vec<Opened>,
    /// Bytes in the range.
    pub len_bytes: u64,
    /// The bytes after the range's whole blocks (regular files only).
    pub tail: Tail,
    /// The locks on the files: held, never read, until the plan is dropped.
    #[allow(dead_code)]
    pub locks: FileLocks,
}

/// Whether `arg` is a `sim:` device with `headers-only=on`.
pub fn is_headers_only(arg: &DeviceArg) -> bool {
    matches!(&arg.backend, Backend::Sim(spec) if spec.headers_only)
}

/// Refuses a copy or verify that mixes headers-only `sim:` devices with others, before
/// anything is opened: a headers-only disk moves only the header of each pattern sector, so
/// a whole-sector device on the other end would take the untouched rest for data (and a
/// file would be written with it).
fn check_headers_only(source: &DeviceArg, targets: &[DeviceArg]) -> Result<(), CliError> {
    let args: Vec<(Role, &DeviceArg)> =
        std::iter::once((Role::Source, source)).chain(targets.iter().map(|t| (Role::Target, t))).collect();
    let (Some((role, fast)), Some((other_role, other))) =
        (args.iter().find(|(_, arg)| is_headers_only(arg)), args.iter().find(|(_, arg)| !is_headers_only(arg)))
    else {
        return Ok(());
    };
    Err(CliError::argument(
        other_role.name(),
        &other.text,
        format!(
            "{} '{}' has headers-only=on, so every device of the command must be a sim device with \
             headers-only=on (it fills only the header of each pattern sector)",
            role.name(),
            fast.text
        ),
    ))
}

/// Opens and checks the targets of a zero job and works out the length.
///
/// # Errors
/// Any check failing, or targets of different lengths without `--length`.
pub fn plan_zero(targets: &[DeviceArg], length: Option<u64>, settings: &Settings) -> Result<ZeroPlan, CliError> {
    check_target_count(targets.len())?;
    let mut locks = FileLocks::default();
    let mut opened: Vec<Opened> = Vec::with_capacity(targets.len());
    for arg in targets {
        check_before_open(arg, Role::Target)?;
        // Only a `sim:` device without `size` is sized here: files are neither made nor grown.
        let create_len = match arg.backend {
            Backend::Sim(_) => length.map(|len_bytes| arg.offset_bytes.saturating_add(len_bytes)),
            Backend::Path(_) | Backend::Nbd(_) => None,
        };
        opened.push(open(arg, Role::Target, true, create_len, settings, &mut locks)?);
    }
    let len_bytes = match length {
        Some(len_bytes) => len_bytes,
        None => {
            let first = &opened[0];
            let len_bytes = first.remaining_bytes()?;
            for other in &opened[1..] {
                let other_len = other.remaining_bytes()?;
                if other_len != len_bytes {
                    return Err(other.error(format!(
                        "holds {other_len} bytes from its offset but '{}' holds {len_bytes}: give --length",
                        first.arg.text
                    )));
                }
            }
            len_bytes
        }
    };
    for (index, target) in opened.iter().enumerate() {
        target.check_range(len_bytes)?;
        for other in &opened[..index] {
            target.check_overlap(other, len_bytes)?;
        }
    }
    let tail = check_tail(None, &opened, len_bytes)?;
    Ok(ZeroPlan { targets: opened, len_bytes, tail, locks })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    /// The engine settings of `kcopyd copy ARGS…`.
    fn copy_settings(args: &[&str]) -> Settings {
        let cli = Cli::try_parse_from(["kcopyd", "copy"].iter().chain(args)).unwrap();
        let Command::Copy(copy) = cli.command else { panic!("not a copy: {args:?}") };
        Settings::from_args(&copy.engine, std::iter::once(&copy.source).chain(&copy.targets)).unwrap()
    }

    #[test]
    fn nbd_devices_default_to_more_subjobs_in_flight_unless_asked() {
        let nbd = "nbd+unix:///?socket=/run/s.sock";
        assert_eq!(copy_settings(&["a.img", "b.img"]).config.subjobs_in_flight, SUBJOBS_IN_FLIGHT_DEFAULT);
        assert_eq!(copy_settings(&[nbd, "b.img"]).config.subjobs_in_flight, NBD_SUBJOBS_IN_FLIGHT_DEFAULT);
        assert_eq!(copy_settings(&["a.img", "b.img", nbd]).config.subjobs_in_flight, NBD_SUBJOBS_IN_FLIGHT_DEFAULT);
        let asked = copy_settings(&["--subjobs-in-flight", "2", nbd, "b.img"]);
        assert_eq!((asked.config.subjobs_in_flight, asked.queue_depth), (2, 2));
        assert_ne!(SUBJOBS_IN_FLIGHT_DEFAULT, NBD_SUBJOBS_IN_FLIGHT_DEFAULT);
    }
}
