//! Hydration: copy jobs through the kcopyd client, whose completion callbacks update the
//! regions (so a copy's end is recorded whoever awaits it, or if nobody does), and the
//! background loop that keeps `hydration_threshold` regions in flight and commits
//! periodically.
//!
//! ```text
//!  run_hydration ─► while allowed (enabled, no foreground I/O, < threshold in flight):
//!     Regions::next_batch (hints first, then the cursor) ─► start_copy ─► Client::submit
//!                                                             │ on_complete (client worker):
//!                                                             └► copy_done ─► Regions::finish_copy
//!     every commit_interval_ms: commit ─► settled: last commit, bitmap released, return
//! ```

use std::ops::Range;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use kcopyd_core::{Flags, Job, Outcome, RangeSet, Region};
use serde::Serialize;
use tokio::time::Instant;

use crate::CloneDevice;
use crate::inner::Inner;
use crate::status::Counters;

/// Why [`CloneDevice::run_hydration`] returned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub enum HydrationEnd {
    /// Every region is hydrated and committed; the bitmap is released.
    Complete,
    /// Every region is hydrated or given up on, and that is committed; these were given up on.
    GaveUp {
        /// The regions given up on.
        regions: Vec<u64>,
    },
    /// [`CloneDevice::stop_hydration`] was called.
    Stopped,
}

/// Completes a copy's regions exactly once: from the job's callback, or, if the job is dropped
/// without running (never submitted), as not copied.
struct CopyDone {
    inner: Arc<Inner>,
    regions: Range<u64>,
    sectors: Range<u64>,
    done: bool,
}

impl CopyDone {
    fn complete(mut self, outcome: Option<&Outcome>) {
        self.done = true;
        let not_copied = match outcome {
            Some(outcome) if outcome.panicked.is_none() && outcome.targets.len() == 1 => {
                outcome.targets[0].not_copied.clone()
            }
            _ => RangeSet::from_range(self.sectors.clone()),
        };
        let attempts_max = self.inner.options().hydration_attempts_max;
        let (copied, failed) = self.inner.regions().finish_copy(self.regions.clone(), &not_copied, attempts_max);
        Counters::add(&self.inner.counters.regions_copied, copied);
        Counters::add(&self.inner.counters.copy_failures, failed);
        self.inner.changed.notify_waiters();
    }
}

impl Drop for CopyDone {
    fn drop(&mut self) {
        if !self.done {
            let this = CopyDone {
                inner: self.inner.clone(),
                regions: self.regions.clone(),
                sectors: self.sectors.clone(),
                done: false,
            };
            self.done = true;
            this.complete(None);
        }
    }
}

impl Inner {
    /// Copies `regions` (already marked busy with a copy) from the source to the destination.
    pub(crate) async fn start_copy(self: &Arc<Self>, regions: Range<u64>, background: bool) {
        let sectors = {
            let state = self.regions();
            state.sectors(regions.start).start..state.sectors(regions.end - 1).end
        };
        let len = sectors.end - sectors.start;
        let done = CopyDone { inner: self.clone(), regions, sectors: sectors.clone(), done: false };
        // Unreadable blocks are skipped and reported, so one bad block fails only its region.
        let job = Job::copy(
            Region::new(self.source.clone(), sectors.start, len),
            vec![Region::new(self.destination.clone(), sectors.start, len)],
            Flags::IGNORE_ERROR,
        )
        .on_complete(move |outcome| done.complete(Some(&outcome)));
        if background {
            Counters::add(&self.counters.hydration_jobs, 1);
        }
        // A refused job is dropped with its callback, whose `CopyDone` records the failure.
        let _ = self.client.submit(job).await;
    }

    /// Starts background batches while the knobs allow.
    async fn start_batches(self: &Arc<Self>) {
        loop {
            let options = self.options();
            let paused = options.pause_on_foreground && self.foreground.load(Ordering::Acquire) > 0;
            if !options.hydration_enabled || paused || self.stop.load(Ordering::Acquire) {
                return;
            }
            let batch = {
                let mut regions = self.regions();
                let in_flight = regions.background_in_flight();
                let threshold = u64::from(options.hydration_threshold);
                if in_flight >= threshold {
                    return;
                }
                regions.next_batch(u64::from(options.hydration_batch_size).min(threshold - in_flight))
            };
            match batch {
                Some(batch) => self.start_copy(batch, true).await,
                None => return,
            }
        }
    }
}

impl CloneDevice {
    /// The background hydration: copies every region not yet hydrated, `hydration_threshold`
    /// regions at a time in jobs of up to `hydration_batch_size` contiguous regions, regions
    /// that reads asked for first, pausing while foreground I/O is in flight; commits every
    /// `commit_interval_ms`. Returns once every region is hydrated or given up on and that is
    /// committed, or when stopped.
    ///
    /// Spawn it on any runtime with a timer. Dropping the future is safe: copies in flight
    /// complete on their own.
    pub async fn run_hydration(&self) -> HydrationEnd {
        let inner = &self.inner;
        let interval = |inner: &Inner| kcopyd_core::to_tokio(Duration::from_millis(inner.options().commit_interval_ms));
        let mut next_commit = Instant::now() + interval(inner);
        loop {
            let mut notified = pin!(inner.changed.notified());
            notified.as_mut().enable();
            if inner.stop.load(Ordering::Acquire) {
                return HydrationEnd::Stopped;
            }
            let (settled, released) = {
                let regions = inner.regions();
                (regions.settled(), regions.released())
            };
            if released {
                return HydrationEnd::Complete;
            }
            if settled {
                if inner.commit().await.is_ok() {
                    let regions = inner.regions();
                    if regions.released() {
                        return HydrationEnd::Complete;
                    }
                    if regions.settled() {
                        return HydrationEnd::GaveUp { regions: regions.failed() };
                    }
                    continue;
                }
                next_commit = Instant::now() + interval(inner);
            } else {
                inner.start_batches().await;
                if Instant::now() >= next_commit {
                    // Only when a region was hydrated since; a failed commit is counted and
                    // tried again at the next interval.
                    if inner.regions().version() != inner.committed_version.load(Ordering::Acquire) {
                        let _ = inner.commit().await;
                    }
                    next_commit = Instant::now() + interval(inner);
                }
            }
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep_until(next_commit) => {}
            }
        }
    }
}
