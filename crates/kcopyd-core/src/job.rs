//! What a job is: the public [`Job`] request, its completion callback, and the validated
//! [`JobSpec`] the engine runs — every check made at submit, before any I/O.
//!
//! ```text
//!  Job::copy / Job::zero ──► JobSpec::validate ──► JobSpec
//!   (regions, flags,          targets: 1..=TARGETS_MAX, equal counts,
//!    callback)                inside their devices, block-aligned, no overlap,
//!                             one block within the page budget
//!                             ──► sub-job size, block size, sub-jobs in flight, flags
//! ```

use std::fmt;

use crate::error::SubmitError;
use crate::sparse::HOLE_SUBJOB_SECTORS_MAX;
use crate::{ClientConfig, Flags, Geometry, Outcome, PAGE_SIZE, Region, SECTOR_SIZE, Sparse, TARGETS_MAX};

/// A job's completion callback: called once with its outcome, on the client's worker.
pub(crate) type Callback = Box<dyn FnOnce(Outcome) + Send + 'static>;

/// A job to submit: a copy or a zero, its flags and an optional completion callback.
pub struct Job {
    kind: JobKind,
    targets: Vec<Region>,
    flags: Flags,
    callback: Option<Callback>,
}

impl Job {
    /// Copy `source` to every target; every target's count must equal the source's.
    pub fn copy(source: Region, targets: Vec<Region>, flags: Flags) -> Job {
        Job { kind: JobKind::Copy { source, sparse: Sparse::OFF }, targets, flags, callback: None }
    }

    /// Makes a copy sparse-aware: holes of the source are not read, zero blocks not written
    /// as data (see [`Sparse`]). A zero job ignores it.
    pub fn sparse(mut self, sparse: Sparse) -> Job {
        if let JobKind::Copy { sparse: ours, .. } = &mut self.kind {
            *ours = sparse;
        }
        self
    }

    /// Zero every target (all of the same count).
    pub fn zero(targets: Vec<Region>, flags: Flags) -> Job {
        Job { kind: JobKind::Zero, targets, flags, callback: None }
    }

    /// Calls `callback` with the outcome when the job completes, on the client's worker.
    /// Callbacks of one client never run concurrently with one another. The job's handle
    /// still resolves as well, after the callback has returned (so a callback that asks its
    /// own job's handle for the outcome finds none yet).
    pub fn on_complete(mut self, callback: impl FnOnce(Outcome) + Send + 'static) -> Job {
        self.callback = Some(Box::new(callback));
        self
    }

    /// Validates the job against its devices and `config` ([`JobSpec::validate`]), giving
    /// back its spec and its callback.
    pub(crate) fn validate(self, config: &ClientConfig) -> Result<(JobSpec, Option<Callback>), SubmitError> {
        let spec = JobSpec::validate(self.kind, self.targets, self.flags, config)?;
        Ok((spec, self.callback))
    }
}

impl fmt::Debug for Job {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Job")
            .field("kind", &self.kind)
            .field("targets", &self.targets)
            .field("flags", &self.flags)
            .field("callback", &self.callback.is_some())
            .finish()
    }
}

/// What a job does.
#[derive(Debug)]
pub(crate) enum JobKind {
    Copy { source: Region, sparse: Sparse },
    Zero,
}

/// A validated job: every region checked, sizes worked out.
#[derive(Debug)]
pub(crate) struct JobSpec {
    pub(crate) kind: JobKind,
    pub(crate) targets: Vec<Region>,
    /// Effective flags: WRITE_SEQ added for zoned targets, IGNORE_ERROR dropped with WRITE_SEQ.
    pub(crate) flags: Flags,
    pub(crate) len_sectors: u64,
    /// Sectors per sub-job: a multiple of `block_sectors`, within the page budget.
    pub(crate) subjob_sectors: u64,
    /// The job's logical block in sectors: the largest of its devices'.
    pub(crate) block_sectors: u64,
    /// Sub-jobs in flight at once: the client's limit, and no more than there are sub-jobs.
    pub(crate) subjobs_in_flight: usize,
    /// The zoned targets whose zones end inside the region: their start sector and geometry.
    /// Sub-jobs are cut at their zone ends.
    pub(crate) zoned_targets: Vec<(u64, Geometry)>,
}

impl JobSpec {
    /// Checks a job against its devices and the client's configuration, before any I/O.
    pub(crate) fn validate(
        kind: JobKind,
        targets: Vec<Region>,
        mut flags: Flags,
        config: &ClientConfig,
    ) -> Result<JobSpec, SubmitError> {
        if targets.is_empty() {
            return Err(SubmitError::NoTargets);
        }
        if targets.len() > TARGETS_MAX {
            return Err(SubmitError::TooManyTargets { count: targets.len(), max: TARGETS_MAX });
        }
        let source = match &kind {
            JobKind::Copy { source, sparse } => {
                if !sparse.zero_block_is_valid() {
                    return Err(SubmitError::ZeroBlockSize { bytes: sparse.zero_block_bytes });
                }
                Some(source)
            }
            JobKind::Zero => None,
        };
        let len_sectors = source.unwrap_or(&targets[0]).len_sectors;
        check_counts(&targets, len_sectors)?;
        let mut block_sectors = 1;
        for region in source.into_iter().chain(&targets) {
            block_sectors = block_sectors.max(check_region(region)?);
        }
        check_overlaps(source, &targets)?;
        let budget_sectors = (config.page_budget_bytes() / SECTOR_SIZE) as u64;
        if block_sectors > budget_sectors {
            return Err(SubmitError::BlockLargerThanBudget {
                block_size: (block_sectors * SECTOR_SIZE as u64) as u32,
                budget_bytes: config.page_budget_bytes(),
            });
        }
        // Worked example: 1 MiB sub-jobs (2048 sectors) in a 64 KiB budget (128 sectors) with
        // 4 KiB blocks (8 sectors): min(2048, 128) / 8 * 8 = 128 sectors a sub-job. A job
        // shorter than that is one sub-job of its own length, so that it takes only the pages
        // it needs (a 64 KiB copy-on-write takes 16 pages, not a whole 1 MiB sub-job's 256).
        let wanted_sectors = (config.subjob_size_bytes / SECTOR_SIZE) as u64;
        let subjob_sectors =
            (wanted_sectors.min(budget_sectors).min(len_sectors) / block_sectors * block_sectors).max(block_sectors);
        if targets.iter().any(|t| t.device.geometry().zoned) {
            flags |= Flags::WRITE_SEQ;
        }
        if flags.contains(Flags::WRITE_SEQ) {
            flags = Flags::WRITE_SEQ;
        }
        let zoned_targets = check_zones(&targets, block_sectors)?;
        let subjobs = len_sectors.div_ceil(subjob_sectors);
        let subjobs_in_flight = subjobs.min(config.subjobs_in_flight as u64) as usize;
        assert!(subjob_sectors % block_sectors == 0 && len_sectors % block_sectors == 0, "sub-jobs are whole blocks");
        Ok(JobSpec {
            kind,
            targets,
            flags,
            len_sectors,
            subjob_sectors,
            block_sectors,
            subjobs_in_flight,
            zoned_targets,
        })
    }

    /// The first job-relative sector after `start` at which a zoned target's zone ends (a
    /// sub-job from `start` stops there), or `len_sectors`.
    ///
    /// Example: a target at device sector 100 with zones of 64 sectors: from job sector 0
    /// (device 100) the zone ends at device 128, job sector 28; from 28, at 92.
    pub(crate) fn zone_end(&self, start: u64) -> u64 {
        self.zoned_targets
            .iter()
            .filter_map(|&(target_start, geometry)| {
                geometry.zone_end(target_start + start).map(|device_end| device_end - target_start)
            })
            .fold(self.len_sectors, u64::min)
    }

    /// Pages one sub-job reads into.
    pub(crate) fn subjob_pages(&self) -> usize {
        (self.subjob_sectors as usize * SECTOR_SIZE).div_ceil(PAGE_SIZE)
    }

    pub(crate) fn ignore_error(&self) -> bool {
        self.flags.contains(Flags::IGNORE_ERROR)
    }

    pub(crate) fn write_seq(&self) -> bool {
        self.flags.contains(Flags::WRITE_SEQ)
    }

    /// How the copy treats zeroes ([`Sparse::OFF`] for a zero job).
    pub(crate) fn sparse(&self) -> Sparse {
        match &self.kind {
            JobKind::Copy { sparse, .. } => *sparse,
            JobKind::Zero => Sparse::OFF,
        }
    }

    /// Whether every target takes a hole without data moving through the engine.
    pub(crate) fn holes_are_cheap(&self) -> bool {
        let sparse = self.sparse();
        self.targets.iter().all(|t| sparse.zeroes_are_cheap(&t.device.geometry(), t.device.deallocates()))
    }

    /// Most sectors of one hole sub-job: a hole is written as a zero buffer (and so within a
    /// sub-job's size) to a target whose zeroes are not cheap.
    pub(crate) fn hole_sectors_max(&self) -> u64 {
        if self.holes_are_cheap() {
            HOLE_SUBJOB_SECTORS_MAX / self.block_sectors * self.block_sectors
        } else {
            self.subjob_sectors
        }
    }
}

/// Checks that every target is `len_sectors` long.
fn check_counts(targets: &[Region], len_sectors: u64) -> Result<(), SubmitError> {
    for (index, target) in targets.iter().enumerate() {
        if target.len_sectors != len_sectors {
            return Err(SubmitError::CountMismatch {
                target: index,
                device: target.device.name().to_owned(),
                target_sectors: target.len_sectors,
                source_sectors: len_sectors,
            });
        }
    }
    Ok(())
}

/// The zoned targets whose zones end inside their regions, after checking that those ends fall
/// on the job's blocks (`block_sectors`), so that sub-jobs cut there stay whole blocks.
fn check_zones(targets: &[Region], block_sectors: u64) -> Result<Vec<(u64, Geometry)>, SubmitError> {
    let mut zoned = Vec::new();
    for (index, target) in targets.iter().enumerate() {
        let geometry = target.device.geometry();
        let Some(first_end) = geometry.zone_end(target.start_sector) else { continue };
        if first_end >= target.start_sector + target.len_sectors {
            continue;
        }
        if geometry.zone_sectors % block_sectors != 0 || (first_end - target.start_sector) % block_sectors != 0 {
            return Err(SubmitError::ZoneMisaligned {
                target: index,
                device: target.device.name().to_owned(),
                zone_sectors: geometry.zone_sectors,
                block_sectors,
            });
        }
        zoned.push((target.start_sector, geometry));
    }
    Ok(zoned)
}

/// Checks that no target overlaps the source or an earlier target.
fn check_overlaps(source: Option<&Region>, targets: &[Region]) -> Result<(), SubmitError> {
    for (index, target) in targets.iter().enumerate() {
        if let Some(source) = source {
            if overlaps(source, target) {
                return Err(SubmitError::TargetOverlapsSource {
                    target: index,
                    device: target.device.name().to_owned(),
                    target_sectors: target.sectors(),
                    source_sectors: source.sectors(),
                });
            }
        }
        if let Some(first) = targets[..index].iter().position(|earlier| overlaps(earlier, target)) {
            return Err(SubmitError::TargetsOverlap { first, second: index, device: target.device.name().to_owned() });
        }
    }
    Ok(())
}

/// Checks one region against its device; returns the device's logical block in sectors.
fn check_region(region: &Region) -> Result<u64, SubmitError> {
    let geometry = region.device.geometry();
    let block_sectors = geometry.block_sectors().max(1);
    let end = region.start_sector.checked_add(region.len_sectors);
    if end.is_none_or(|end| end > geometry.len_sectors) {
        return Err(SubmitError::OutOfRange {
            device: region.device.name().to_owned(),
            sectors: region.sectors(),
            device_sectors: geometry.len_sectors,
        });
    }
    if region.start_sector % block_sectors != 0 || region.len_sectors % block_sectors != 0 {
        return Err(SubmitError::Misaligned {
            device: region.device.name().to_owned(),
            sectors: region.sectors(),
            block_size: geometry.logical_block_size,
        });
    }
    Ok(block_sectors)
}

fn overlaps(a: &Region, b: &Region) -> bool {
    let (ra, rb) = (a.sectors(), b.sectors());
    a.device.id() == b.device.id() && ra.start < rb.end && rb.start < ra.end
}
