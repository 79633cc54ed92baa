//! A copy in batches recorded in a map: what the map says is not done (or, retrying, what
//! failed), one engine job per range of a batch, then one flush and one map append.
//!
//! ```text
//!  map.remaining() ─► batches ─► [job, job, …] ─► flush targets ─► append to map ─► next batch
//!                                  └─ stop: a job with errors (unless IGNORE_ERROR), a
//!                                     cancellation, a failed flush
//! ```

use std::ops::Range;

use kcopyd_core::{Client, Device, Flags, Outcome, RangeSet, SECTOR_SIZE};

use super::{Event, FinishedJob, Runner};
use crate::map::{self, CopyMap};
use crate::open::Opened;
use crate::plan::{CreatedFiles, Plan};
use crate::run::{CopyOptions, RunError, moved_bytes};

/// A copy through a map: the open map, the batch size, and whether to retry only what failed.
#[derive(Debug)]
pub struct MappedCopy<'a> {
    /// The map, opened for this copy ([`map::open_for`]).
    pub map: &'a mut CopyMap,
    /// Sectors per batch (one flush and one map append each).
    pub batch_sectors: u64,
    /// Copy only what the map records as failed (errors ignored).
    pub retry_failed: bool,
}

/// What the jobs of a mapped copy came to so far.
struct MappedRun {
    outcome: Outcome,
    done_bytes: u64,
    flush_errors: Vec<Option<String>>,
    /// Bytes of the phase told so far: where the next job's progress starts.
    position: u64,
}

impl MappedRun {
    /// Adds a job's outcome; returns whether the copy stops after it.
    fn add(&mut self, job: &Outcome, flags: Flags, cancelled: bool) -> bool {
        let outcome = &mut self.outcome;
        outcome.read_err |= job.read_err;
        for index in job.write_err.iter() {
            outcome.write_err.set(index);
        }
        outcome.read_failed.extend(&job.read_failed);
        for (merged, report) in outcome.targets.iter_mut().zip(&job.targets) {
            merged.write_failed.extend(&report.write_failed);
        }
        outcome.cancelled |= job.cancelled;
        outcome.panicked = outcome.panicked.take().or(job.panicked.clone());
        let stop = !job.is_ok() && !flags.contains(Flags::IGNORE_ERROR);
        cancelled || stop || job.cancelled || job.panicked.is_some()
    }
}

/// The devices of a mapped copy: the source and its first sector, each target and its first.
struct Ends<'a> {
    source: &'a Opened,
    targets: Vec<(Device, u64)>,
}

impl Runner<'_> {
    /// Runs one batch: its jobs one after another, then one flush and one map append.
    /// Returns whether the copy stops after it.
    async fn run_batch(
        &self,
        client: &Client,
        (mapped, flags, sparse): (&mut MappedCopy<'_>, Flags, kcopyd_core::Sparse),
        (batch, ends): (&[Range<u64>], &Ends<'_>),
        created: &mut CreatedFiles,
        run: &mut MappedRun,
    ) -> Result<bool, RunError> {
        let mut jobs = Vec::with_capacity(batch.len());
        let mut stop = false;
        let source_start = ends.source.start_sector();
        for range in batch {
            let job = map::batch_job(range, (&ends.source.device, source_start), &ends.targets, flags, sparse);
            let base_bytes = run.position;
            let handle = self.submit(client, job, created, base_bytes).await?;
            mapped.map.keep();
            let outcome = self.wait(&handle, base_bytes).await;
            run.position = base_bytes + handle.progress().done_sectors * SECTOR_SIZE as u64;
            let first_target_start = ends.targets.first().map(|(_, start)| *start);
            run.done_bytes += moved_bytes(&handle, &outcome, source_start, first_target_start);
            stop = run.add(&outcome, flags, self.cancel.is_cancelled());
            jobs.push((range.clone(), outcome));
            if stop {
                break;
            }
        }
        // Durable on every target before the map says so.
        let flushes = map::finish_batch(mapped.map, &jobs, source_start, &ends.targets).await?;
        let flushed = flushes.iter().all(Option::is_none);
        for (slot, error) in run.flush_errors.iter_mut().zip(flushes) {
            if let Some(error) = error {
                *slot = Some(error.to_string());
            }
        }
        Ok(stop || !flushed)
    }

    /// Copies what the map says is not done (or, retrying, what failed) in batches; after
    /// each batch flushes the targets, then records the batch in the map. Stops at the first
    /// job with errors unless errors are ignored, and when cancelled.
    pub(super) async fn run_mapped(
        &self,
        client: &Client,
        mut mapped: MappedCopy<'_>,
        plan: &mut Plan,
        options: CopyOptions,
        len_sectors: u64,
    ) -> Result<FinishedJob, RunError> {
        let failed = mapped.map.state.failed();
        let work = if mapped.retry_failed { failed.clone() } else { mapped.map.state.remaining(len_sectors) };
        let started = crate::clock::Instant::now();
        let before_bytes = plan.len_bytes.saturating_sub(work.len_sectors() * SECTOR_SIZE as u64);
        self.started(super::Phase::Copy, plan.len_bytes, before_bytes);
        let ends = Ends {
            source: &plan.source,
            targets: plan.targets.iter().map(|t| (t.device.clone(), t.start_sector())).collect(),
        };
        let mut flags = options.flags;
        if mapped.retry_failed {
            flags |= Flags::IGNORE_ERROR;
        }
        let mut outcome = Outcome::default();
        outcome.targets = vec![Default::default(); plan.targets.len()];
        let mut run =
            MappedRun { outcome, done_bytes: 0, flush_errors: vec![None; plan.targets.len()], position: before_bytes };
        (self.on_event)(Event::Progress { done_bytes: before_bytes });
        for batch in map::batches(&work, &failed, mapped.batch_sectors) {
            let how = (&mut mapped, flags, options.sparse);
            if self.run_batch(client, how, (&batch, &ends), &mut plan.created, &mut run).await? {
                break;
            }
        }
        // The run went through, also with nothing to copy: what it created stays.
        plan.created.keep();
        mapped.map.keep();
        // Whatever the map does not hold as done is not copied, on every target.
        let not_done: RangeSet = map::complement(&mapped.map.state.done.to_range_set(), len_sectors).collect();
        for (report, target) in run.outcome.targets.iter_mut().zip(&plan.targets) {
            report.not_copied = not_done.shifted(0, target.start_sector()).expect("the copy lies inside every target");
        }
        let seconds = started.elapsed().as_secs_f64();
        let stats = client.stats();
        let MappedRun { outcome, done_bytes, flush_errors, .. } = run;
        let cancelled = self.cancel.is_cancelled();
        let path_changes = Vec::new(); // filled by `Runner::copy` when the command ends
        Ok(FinishedJob { outcome, cancelled, done_bytes, before_bytes, seconds, flush_errors, path_changes, stats })
    }
}
