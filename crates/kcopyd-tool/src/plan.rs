//! The plan of a job: every check made before the first write, on every device.
//!
//! ```text
//!  count targets ─► each address: whole-sector offset, no "dir/" ─► headers-only all or none
//!   ─► open SOURCE (read-only) ─► length ─► open existing TARGETs ─► check each: room,
//!   alignment, overlap through every name of the same storage ─► create missing TARGET files
//!   ─► check them ─► the partial last block (tail): files and NBD exports only
//!  any failure: remove the files created here; nothing else was written
//! ```

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kcopyd_core::{SECTOR_SIZE, TARGETS_MAX};
use kcopyd_os::{FileKey, FileLocks, OpenError};

use crate::address::{Backend, DeviceAddress};
use crate::error::Role;
use crate::error::{DeviceProblem, PlanError};
use crate::open::{CreatedHook, Opened, Settings, open, remove_created};
use crate::tail::Tail;

/// Files created by a plan, removed again (when dropped) unless kept: a job that fails
/// before writing leaves nothing behind.
#[derive(Debug, Default)]
pub struct CreatedFiles {
    /// Each file created and, once it is open, which file it is.
    paths: Vec<(PathBuf, Option<FileKey>)>,
    hook: Option<Arc<dyn CreatedHook>>,
}

impl CreatedFiles {
    /// No files yet; `hook` is told of each.
    pub fn new(hook: Option<Arc<dyn CreatedHook>>) -> CreatedFiles {
        CreatedFiles { paths: Vec::new(), hook }
    }

    /// Records `path`, about to be created: removed when the job fails before writing. The
    /// file is created while the returned guard lives.
    pub fn creating(&mut self, path: &Path) -> Option<Box<dyn std::any::Any>> {
        self.paths.push((path.to_path_buf(), None));
        self.hook.as_ref().map(|hook| hook.creating(path))
    }

    /// Records that `path` was created as the file `id`: it is removed only while the path
    /// still names that file ([`remove_created`]).
    pub fn made(&mut self, path: &Path, id: FileKey) {
        if let Some(entry) = self.paths.iter_mut().rev().find(|(p, _)| p == path) {
            entry.1 = Some(id);
        }
        if let Some(hook) = &self.hook {
            hook.made(path, id);
        }
    }

    /// Forgets `path`, recorded by [`CreatedFiles::creating`]: another program created it
    /// first, and it is not removed with the files this plan made.
    pub fn not_created(&mut self, path: &Path) {
        if let Some(index) = self.paths.iter().rposition(|(p, _)| p == path) {
            self.paths.remove(index);
        }
        if let Some(hook) = &self.hook {
            hook.forget(&[path.to_path_buf()]);
        }
    }

    /// Keeps the files: the job has started.
    pub fn keep(&mut self) {
        self.forget();
        self.paths.clear();
    }

    fn forget(&self) {
        if let Some(hook) = &self.hook {
            hook.forget(&self.paths.iter().map(|(path, _)| path.clone()).collect::<Vec<_>>());
        }
    }
}

impl Drop for CreatedFiles {
    fn drop(&mut self) {
        for (path, id) in &self.paths {
            remove_created(path, *id);
        }
        self.forget();
    }
}

/// Refuses more targets than one job takes.
///
/// # Errors
/// More than [`TARGETS_MAX`] targets.
pub fn check_target_count(count: usize) -> Result<(), PlanError> {
    if count > TARGETS_MAX {
        return Err(PlanError::TargetCount { count });
    }
    Ok(())
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
fn check_tail(source: Option<&Opened>, targets: &[Opened], len_bytes: u64) -> Result<Tail, PlanError> {
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
        return Err(PlanError::Length {
            len_bytes,
            problem: format!(
                "{len_bytes} bytes is not a whole number of the {block_bytes}-byte blocks the job moves (the largest \
                 logical block of its devices); only a range that ends at the end of a regular {} file may end \
                 in a partial block",
                if source.is_some() { "source" } else { "target" }
            ),
        });
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
        return Err(whole_blocks_only.error(DeviceProblem::PartialBlock {
            kind: what,
            block_bytes: whole_blocks_only.block_bytes(),
            len_bytes,
            tail_bytes: tail.len_bytes,
            range_block_bytes: block_bytes,
            whole_bytes: tail.offset_in_range_bytes,
        }));
    }
    Ok(tail)
}

/// Refuses the tail of a range on an NBD export whose server's minimum block size does not
/// allow it: a 1,000-byte export with 512-byte minimum blocks cannot give its last 488 bytes.
///
/// # Errors
/// The tail's offset or length is not a multiple of the server's minimum block size.
fn check_nbd_tail(device: &Opened, tail: Tail) -> Result<(), PlanError> {
    let Some(nbd) = &device.nbd else { return Ok(()) };
    let min = u64::from(nbd.min_block_bytes());
    let at = device.arg.offset_bytes + tail.offset_in_range_bytes;
    if at % min == 0 && tail.len_bytes % min == 0 {
        return Ok(());
    }
    Err(device.error(DeviceProblem::NbdMinBlock {
        role: device.role,
        tail_bytes: tail.len_bytes,
        end_bytes: at + tail.len_bytes,
        min_block_bytes: min,
        whole_bytes: tail.offset_in_range_bytes,
    }))
}

/// Refuses, before anything is opened, an offset that is not a whole number of sectors and a
/// path ending in `/` that is not a directory (the system would call it missing, or create a
/// file of another name).
fn check_before_open(arg: &DeviceAddress, role: Role) -> Result<(), PlanError> {
    if let Backend::Path(path) = &arg.backend {
        if path.as_os_str().as_encoded_bytes().ends_with(b"/") && !path.is_dir() {
            return Err(PlanError::device(role, &arg.text, DeviceProblem::NotADirectory));
        }
    }
    if arg.offset_bytes % SECTOR_SIZE as u64 != 0 {
        let problem = DeviceProblem::OffsetNotSectors { offset_bytes: arg.offset_bytes };
        return Err(PlanError::device(role, &arg.text, problem));
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
    /// The bytes after the range's whole blocks (regular files only).
    pub tail: Tail,
    /// Files created for missing targets.
    pub created: CreatedFiles,
    /// Per target: whether this plan created it (a missing file).
    pub created_targets: Vec<bool>,
    /// The locks on the files: held until the plan is dropped.
    pub locks: FileLocks,
}

impl Plan {
    /// The source, then the targets.
    pub fn devices(&self) -> impl Iterator<Item = &Opened> {
        std::iter::once(&self.source).chain(&self.targets)
    }
}

/// Opens and checks a source and its targets. `write` opens the targets for writing and
/// creates missing target files; otherwise every target must exist.
///
/// # Errors
/// Any check failing; files created here are removed again.
pub fn plan_with_source(
    source: &DeviceAddress,
    targets: &[DeviceAddress],
    length: Option<u64>,
    write: bool,
    settings: &Settings,
) -> Result<Plan, PlanError> {
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
    let mut created = CreatedFiles::new(settings.created_hook.clone());
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
            let create_len = arg
                .offset_bytes
                .checked_add(len_bytes)
                .ok_or_else(|| PlanError::device(Role::Target, &arg.text, DeviceProblem::EndOverflows))?;
            let is_sim = matches!(arg.backend, Backend::Sim(_));
            let create_len = Some(create_len).filter(|_| missing || is_sim);
            // Before the open: a file created by an open that then fails is removed too.
            let creating = match (missing, &arg.backend) {
                (true, Backend::Path(path)) => Some(created.creating(path)),
                _ => None,
            };
            let opened_now = open(arg, Role::Target, write, create_len, settings, &mut locks);
            drop(creating);
            let target = match opened_now {
                Ok(target) => target,
                Err(error) => {
                    // Another program created it first, or locked the file this one created
                    // before this one could (another kcopyd writing the same new target): it
                    // is that program's, not to be removed with this plan's files.
                    let theirs = matches!(
                        &error,
                        PlanError::Open { source: OpenError::CreatedElsewhere { .. }, .. }
                            | PlanError::Device { problem: DeviceProblem::Busy { .. }, .. }
                    );
                    if let (true, Backend::Path(path)) = (theirs, &arg.backend) {
                        created.not_created(path);
                    }
                    return Err(error);
                }
            };
            if let (true, Backend::Path(path), true) = (missing, &arg.backend, target.is_file()) {
                let id = target.device.id();
                created.made(path, (id.major, id.minor));
            }
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
    Ok(Plan { source, targets, len_bytes, tail, created, created_targets: missing, locks })
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
    /// The locks on the files: held until the plan is dropped.
    pub locks: FileLocks,
}

/// Whether `arg` is a `sim:` device with `headers-only=on`.
pub fn is_headers_only(arg: &DeviceAddress) -> bool {
    matches!(&arg.backend, Backend::Sim(spec) if spec.headers_only())
}

/// Refuses a copy or verify that mixes headers-only `sim:` devices with others, before
/// anything is opened: a headers-only disk moves only the header of each pattern sector, so
/// a whole-sector device on the other end would take the untouched rest for data (and a
/// file would be written with it).
fn check_headers_only(source: &DeviceAddress, targets: &[DeviceAddress]) -> Result<(), PlanError> {
    let args: Vec<(Role, &DeviceAddress)> =
        std::iter::once((Role::Source, source)).chain(targets.iter().map(|t| (Role::Target, t))).collect();
    let (Some((role, fast)), Some((other_role, other))) =
        (args.iter().find(|(_, arg)| is_headers_only(arg)), args.iter().find(|(_, arg)| !is_headers_only(arg)))
    else {
        return Ok(());
    };
    let problem = DeviceProblem::HeadersOnlyMix { headers_only_role: *role, headers_only: fast.text.clone() };
    Err(PlanError::device(*other_role, &other.text, problem))
}

/// Opens and checks the targets of a zero job and works out the length.
///
/// # Errors
/// Any check failing, or targets of different lengths without `--length`.
pub fn plan_zero(targets: &[DeviceAddress], length: Option<u64>, settings: &Settings) -> Result<ZeroPlan, PlanError> {
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
                    return Err(other.error(DeviceProblem::LengthsDiffer {
                        len_bytes: other_len,
                        first: first.arg.text.clone(),
                        first_len_bytes: len_bytes,
                    }));
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
