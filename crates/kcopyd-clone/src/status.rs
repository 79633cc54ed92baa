//! What a clone reports: a [`CloneStatus`] in dm-clone's terms and [`CloneStats`] counters,
//! both serde values read without stopping anything.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use crate::CloneOptions;

/// Where the clone stands, as dm-clone's status line tells it, and the regions given up on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct CloneStatus {
    /// Sectors in a metadata block.
    pub metadata_block_sectors: u64,
    /// Metadata blocks the two commit slots use.
    pub metadata_blocks_used: u64,
    /// Metadata blocks the metadata device holds.
    pub metadata_blocks_total: u64,
    /// Sectors in a region.
    pub region_sectors: u64,
    /// Regions hydrated (in memory; committed by the next flush or background commit).
    pub regions_hydrated: u64,
    /// Regions in the clone.
    pub regions_total: u64,
    /// Regions being copied or overwritten now.
    pub regions_hydrating: u64,
    /// Regions given up on after `hydration_attempts_max` failed hydrations.
    pub regions_failed: Vec<u64>,
    /// Every region is hydrated and committed, and the bitmap has been released.
    pub hydration_complete: bool,
    /// The sequence number of the latest metadata commit.
    pub commit_seq: u64,
    /// The knobs in force.
    pub options: CloneOptions,
}

impl fmt::Display for CloneStatus {
    /// dm-clone's status line: `<metadata block size> <used>/<total metadata blocks> <region
    /// size> <hydrated>/<total regions> <hydrating regions> <#features> <features>* <#core
    /// args> <core args>* <metadata mode>`, sizes in sectors.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}/{} {} {}/{} {} ",
            self.metadata_block_sectors,
            self.metadata_blocks_used,
            self.metadata_blocks_total,
            self.region_sectors,
            self.regions_hydrated,
            self.regions_total,
            self.regions_hydrating
        )?;
        if self.options.hydration_enabled {
            f.write_str("0 ")?
        } else {
            f.write_str("1 no_hydration ")?
        }
        write!(
            f,
            "4 hydration_threshold {} hydration_batch_size {} rw",
            self.options.hydration_threshold, self.options.hydration_batch_size
        )
    }
}

/// Counters since the clone was opened.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct CloneStats {
    /// Read requests.
    pub reads: u64,
    /// Sectors read from the source (regions not hydrated).
    pub read_source_sectors: u64,
    /// Sectors read from the destination.
    pub read_destination_sectors: u64,
    /// Reads of unhydrated regions queued as hints.
    pub hints: u64,
    /// Write, write-zeroes and deallocate requests.
    pub writes: u64,
    /// Of those, the ones that waited for a region to be copied first.
    pub writes_waited: u64,
    /// Regions hydrated by a write or discard covering them whole, without a copy.
    pub regions_overwritten: u64,
    /// Copy jobs the background hydration started.
    pub hydration_jobs: u64,
    /// Regions copied from the source.
    pub regions_copied: u64,
    /// Failed region copies (each attempt counts).
    pub copy_failures: u64,
    /// Flush requests.
    pub flushes: u64,
    /// Metadata commits written.
    pub commits: u64,
    /// Commits that failed (destination flush or metadata write).
    pub commit_failures: u64,
}

/// The live counters behind [`CloneStats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) reads: AtomicU64,
    pub(crate) read_source_sectors: AtomicU64,
    pub(crate) read_destination_sectors: AtomicU64,
    pub(crate) hints: AtomicU64,
    pub(crate) writes: AtomicU64,
    pub(crate) writes_waited: AtomicU64,
    pub(crate) regions_overwritten: AtomicU64,
    pub(crate) hydration_jobs: AtomicU64,
    pub(crate) regions_copied: AtomicU64,
    pub(crate) copy_failures: AtomicU64,
    pub(crate) flushes: AtomicU64,
    pub(crate) commits: AtomicU64,
    pub(crate) commit_failures: AtomicU64,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> CloneStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CloneStats {
            reads: get(&self.reads),
            read_source_sectors: get(&self.read_source_sectors),
            read_destination_sectors: get(&self.read_destination_sectors),
            hints: get(&self.hints),
            writes: get(&self.writes),
            writes_waited: get(&self.writes_waited),
            regions_overwritten: get(&self.regions_overwritten),
            hydration_jobs: get(&self.hydration_jobs),
            regions_copied: get(&self.regions_copied),
            copy_failures: get(&self.copy_failures),
            flushes: get(&self.flushes),
            commits: get(&self.commits),
            commit_failures: get(&self.commit_failures),
        }
    }
}
