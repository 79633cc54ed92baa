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
use kcopyd_os::{DeviceKind, IoEngine, OpenOptions, OsDevice, QUEUE_DEPTH_MAX};

use crate::cli::{EngineArgs, IoEngineArg};
use crate::device_arg::{Backend, DeviceArg};
use crate::error::{CliError, open_reason};
use crate::size::Bytes;

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
}

impl Settings {
    /// Checks the engine options.
    ///
    /// # Errors
    /// An option out of bounds, named.
    pub fn from_args(args: &EngineArgs) -> Result<Settings, CliError> {
        if args.memory_bytes < PAGE_SIZE as u64 {
            return Err(CliError::argument(
                "--memory",
                args.memory_bytes.to_string(),
                format!("{} is less than one {PAGE_SIZE}-byte page", Bytes(args.memory_bytes)),
            ));
        }
        let sub_job_size_bytes = usize::try_from(args.sub_job_size_bytes).unwrap_or(usize::MAX);
        let config = ClientConfig {
            page_budget: usize::try_from(args.memory_bytes / PAGE_SIZE as u64).unwrap_or(usize::MAX),
            sub_job_size_bytes,
            subjobs_in_flight: args.subjobs_in_flight,
            huge_pages: !args.no_huge_pages,
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
        let queue_depth = args.subjobs_in_flight.clamp(1, QUEUE_DEPTH_MAX);
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
        Ok(Settings { config, buffered: args.buffered, queue_depth, io_engine })
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
    /// Bytes at the end of a file that do not fill a logical block: not part of the device.
    pub trailing_bytes: u64,
}

impl Opened {
    /// The device's length in bytes.
    pub fn len_bytes(&self) -> u64 {
        self.device.geometry().len_sectors * SECTOR_SIZE as u64
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

    /// Checks that `len_bytes` from the argument's offset lie on the device, aligned to its
    /// logical block.
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
        if len_bytes % block != 0 {
            return Err(CliError::argument(
                "--length",
                len_bytes.to_string(),
                format!(
                    "{len_bytes} bytes is not a multiple of the {block}-byte logical block of {} '{}'",
                    self.role.name(),
                    self.arg.text
                ),
            ));
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
        Ok(())
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

    /// Refuses `self` if its range overlaps `other`'s on the same storage.
    ///
    /// # Errors
    /// The ranges overlap.
    pub fn check_overlap(&self, other: &Opened, len_bytes: u64) -> Result<(), CliError> {
        let (a, b) = (self.arg.offset_bytes, other.arg.offset_bytes);
        if len_bytes > 0 && self.device.id() == other.device.id() && a < b + len_bytes && b < a + len_bytes {
            return Err(self.error(format!(
                "overlaps {} '{}' on the same device: bytes {a}-{} and {b}-{}",
                other.role.name(),
                other.arg.text,
                a + len_bytes,
                b + len_bytes
            )));
        }
        Ok(())
    }
}

/// Files created by this command, removed again if it fails before writing.
#[derive(Debug, Default)]
pub struct CreatedFiles {
    paths: Vec<PathBuf>,
}

impl CreatedFiles {
    /// Keeps the files: the job has started.
    pub fn keep(&mut self) {
        self.paths.clear();
    }
}

impl Drop for CreatedFiles {
    fn drop(&mut self) {
        for path in self.paths.drain(..) {
            let _ = fs::remove_file(path);
        }
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
/// file or a `sim:` device without `size`.
///
/// # Errors
/// The device cannot be opened, or a `sim:` source has no size.
pub fn open(
    arg: &DeviceArg,
    role: Role,
    write: bool,
    create_len_bytes: Option<u64>,
    settings: &Settings,
) -> Result<Opened, CliError> {
    match &arg.backend {
        Backend::Sim(spec) => {
            let Some(len_bytes) = spec.len_bytes.or(create_len_bytes) else {
                return Err(CliError::argument(role.name(), &arg.text, "sim key 'size' is needed here"));
            };
            spec.check_len(len_bytes).map_err(|error| CliError::argument(role.name(), &arg.text, error.to_string()))?;
            let disk = spec.build(len_bytes);
            Ok(Opened { arg: arg.clone(), role, device: disk, trailing_bytes: 0 })
        }
        Backend::Path(path) => {
            let options = OpenOptions {
                write,
                buffered: settings.buffered,
                queue_depth: settings.queue_depth,
                create_len: if write { create_len_bytes } else { None },
                engine: settings.io_engine,
            };
            let device = OsDevice::open(path, &options).map_err(|source| CliError::Open {
                what: role.name(),
                text: arg.text.clone(),
                reason: open_reason(&source),
                source,
            })?;
            let trailing_bytes = match device.kind() {
                DeviceKind::File => fs::metadata(path)
                    .map(|m| m.len().saturating_sub(device.geometry().len_sectors * SECTOR_SIZE as u64))
                    .unwrap_or(0),
                DeviceKind::BlockDevice => 0,
            };
            Ok(Opened { arg: arg.clone(), role, device: Arc::new(device), trailing_bytes })
        }
    }
}

/// Refuses an offset that is not a whole number of sectors, before anything is opened.
fn check_sector_offset(arg: &DeviceArg, role: Role) -> Result<(), CliError> {
    if arg.offset_bytes % SECTOR_SIZE as u64 != 0 {
        return Err(CliError::argument(
            role.name(),
            &arg.text,
            format!("offset of {} bytes is not a multiple of the {SECTOR_SIZE}-byte sector", arg.offset_bytes),
        ));
    }
    Ok(())
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
    /// Files created for missing targets.
    pub created: CreatedFiles,
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
    check_sector_offset(source, Role::Source)?;
    for target in targets {
        check_sector_offset(target, Role::Target)?;
    }
    check_headers_only(source, targets)?;
    let source = open(source, Role::Source, false, None, settings)?;
    let len_bytes = match length {
        Some(len_bytes) => len_bytes,
        None => source.remaining_bytes()?,
    };
    if len_bytes % SECTOR_SIZE as u64 != 0 {
        return Err(CliError::argument(
            "--length",
            len_bytes.to_string(),
            format!("{len_bytes} bytes is not a whole number of {SECTOR_SIZE}-byte sectors"),
        ));
    }
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
            if let (true, Backend::Path(path)) = (missing, &arg.backend) {
                // Before the open: a file created by an open that then fails is removed too.
                created.paths.push(path.clone());
            }
            let target = open(arg, Role::Target, write, create_len, settings)?;
            target.check_range(len_bytes)?;
            target.check_overlap(&source, len_bytes)?;
            for other in opened.iter().flatten() {
                target.check_overlap(other, len_bytes)?;
            }
            opened[index] = Some(target);
        }
    }
    let targets = opened.into_iter().map(|t| t.expect("every target opened in one of the passes")).collect();
    Ok(Plan { source, targets, len_bytes, created })
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
pub fn plan_zero(
    targets: &[DeviceArg],
    length: Option<u64>,
    settings: &Settings,
) -> Result<(Vec<Opened>, u64), CliError> {
    check_target_count(targets.len())?;
    let mut opened: Vec<Opened> = Vec::with_capacity(targets.len());
    for arg in targets {
        check_sector_offset(arg, Role::Target)?;
        // Only a `sim:` device without `size` is sized here: files are neither made nor grown.
        let create_len = match arg.backend {
            Backend::Sim(_) => length.map(|len_bytes| arg.offset_bytes.saturating_add(len_bytes)),
            Backend::Path(_) => None,
        };
        opened.push(open(arg, Role::Target, true, create_len, settings)?);
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
    if len_bytes % SECTOR_SIZE as u64 != 0 {
        return Err(CliError::argument(
            "--length",
            len_bytes.to_string(),
            format!("{len_bytes} bytes is not a whole number of {SECTOR_SIZE}-byte sectors"),
        ));
    }
    for (index, target) in opened.iter().enumerate() {
        target.check_range(len_bytes)?;
        for other in &opened[..index] {
            target.check_overlap(other, len_bytes)?;
        }
    }
    Ok((opened, len_bytes))
}
