//! Reading back and comparing: the whole blocks through the engine's verify
//! ([`Client::verify`], in the client's page budget and throttle), the partial last block
//! through [`crate::tail`], after a copy (leaving out what it reported as not copied) or on
//! its own.
//!
//! ```text
//!  request (checked before any write) ─► Client::verify ─► progress every PROGRESS_INTERVAL,
//!    cancel token ─► VerifyControl::cancel ─► tail ─► VerifyRun
//!  verify_copy: skip = each target's not_copied; the source's read failures left out
//! ```

use kcopyd_core::{Client, Comparison, RangeSet, SECTOR_SIZE, Verify};

use super::{
    Event, FinishedJob, PROGRESS_INTERVAL, Phase, RunError, Runner, not_copied_in_region, region, verify_error,
};
use crate::clock::Instant;
use crate::open::{Opened, PathChange};
use crate::plan::{Plan, is_headers_only};
use crate::tail::{Tail, TailError};

/// What a comparison came to.
#[derive(Debug)]
pub struct VerifyRun {
    /// What it found (so far, if cancelled).
    pub comparison: Comparison,
    /// Bytes compared.
    pub bytes: u64,
    /// Seconds it took.
    pub seconds: f64,
    /// The token stopped it before the end.
    pub cancelled: bool,
    /// After a copy: per target, the sectors left out (relative to the range) because the
    /// copy reported them as not copied; empty on its own.
    pub skipped: Vec<RangeSet>,
    /// `verify`: per target, what became of its path while it was compared, if it no longer
    /// names the file or device read ([`Opened::path_change`]), looked at when the comparison
    /// ends (`Runner::verify` fills it; a copy's read-back leaves it empty, the copy's job
    /// says it).
    pub path_changes: Vec<Option<PathChange>>,
}

/// The engine's request comparing the whole blocks (`len_sectors`) of `source` with `targets`.
pub(super) fn request(source: &Opened, targets: &[Opened], len_sectors: u64) -> Verify {
    let regions = targets.iter().map(|target| region(target, len_sectors)).collect();
    // Headers-only disks are all or none of a plan's devices.
    Verify::new(region(source, len_sectors), regions).zero_before_read(is_headers_only(&source.arg))
}

impl Runner<'_> {
    /// Compares until done or cancelled; the tail after the whole blocks.
    pub(super) async fn run_compare(
        &self,
        client: &Client,
        request: Verify,
        source: &Opened,
        targets: &[Opened],
        (len_bytes, tail): (u64, Tail),
    ) -> Result<VerifyRun, RunError> {
        let skip = request.skipped().map(<[RangeSet]>::to_vec);
        self.started(Phase::Verify, len_bytes, 0);
        let started = Instant::now();
        let handle = client.verify(request).map_err(verify_error)?;
        let control = handle.control();
        let waiting = handle.wait();
        tokio::pin!(waiting);
        let mut ticker = tokio::time::interval(kcopyd_sim::to_tokio(PROGRESS_INTERVAL));
        let mut cancelled = false;
        let found = loop {
            tokio::select! {
                found = &mut waiting => break found,
                () = self.cancel.cancelled(), if !cancelled => {
                    cancelled = true;
                    control.cancel();
                }
                _ = ticker.tick() => (self.on_event)(Event::Progress { done_bytes: control.compared_bytes() }),
            }
        };
        let mut comparison = found.map_err(verify_error)?;
        let mut bytes = control.compared_bytes();
        if !self.cancel.is_cancelled() && !tail.is_empty() {
            compare_tail(source, targets, tail, skip.as_deref(), &mut comparison, self.cancel).await;
            if !self.cancel.is_cancelled() {
                bytes += tail.len_bytes;
            }
        }
        (self.on_event)(Event::Progress { done_bytes: bytes });
        self.finished(Phase::Verify);
        let seconds = started.elapsed().as_secs_f64();
        let cancelled = self.cancel.is_cancelled();
        let skipped = skip.unwrap_or_default();
        Ok(VerifyRun { comparison, bytes, seconds, cancelled, skipped, path_changes: Vec::new() })
    }

    /// After a copy: reads the targets back and compares them with the source, leaving out
    /// what the copy reported as not copied, and the source's blocks it could not read.
    pub(super) async fn verify_copy(
        &self,
        client: &Client,
        plan: &Plan,
        run: &FinishedJob,
    ) -> Result<VerifyRun, RunError> {
        // Leave out what the copy itself reported as not copied: those differences are known.
        let skip: Vec<RangeSet> = plan
            .targets
            .iter()
            .zip(&run.outcome.targets)
            .map(|(target, outcome)| not_copied_in_region(target, outcome))
            .collect();
        let len_sectors = plan.tail.offset_in_range_bytes / SECTOR_SIZE as u64;
        let request = request(&plan.source, &plan.targets, len_sectors).skip(skip);
        let range = (plan.len_bytes, plan.tail);
        let mut verify = self.run_compare(client, request, &plan.source, &plan.targets, range).await?;
        // The source's unreadable blocks were reported by the copy already.
        let read_failed = run
            .outcome
            .read_failed
            .shifted(plan.source.start_sector(), 0)
            .expect("read_failed lies inside the source region");
        let comparison = &mut verify.comparison;
        comparison.source_unreadable = comparison.source_unreadable.difference(&read_failed);
        Ok(verify)
    }
}

/// Compares the tail of the range (files, NBD exports): a differing tail counts as one
/// differing block, its sectors those the tail touches. A cancellation stops it: the targets
/// not compared yet are left as they are.
async fn compare_tail(
    source: &Opened,
    targets: &[Opened],
    tail: Tail,
    skip: Option<&[RangeSet]>,
    found: &mut Comparison,
    cancel: &crate::cancel::Cancel,
) {
    let sectors = tail.range_sectors();
    let expected = match tail.read(source, cancel).await {
        Ok(bytes) => bytes,
        Err(TailError::Cancelled) => return,
        Err(TailError::Io(_)) => {
            found.source_unreadable.insert(sectors);
            return;
        }
    };
    for (index, (target, diff)) in targets.iter().zip(&mut found.targets).enumerate() {
        if skip.is_some_and(|skip| skip[index].intersects(&sectors)) {
            continue;
        }
        match tail.read(target, cancel).await {
            Ok(bytes) if bytes == expected => {}
            Ok(_) => {
                diff.differing_blocks += 1;
                diff.differing.insert(sectors.clone());
            }
            Err(TailError::Cancelled) => return,
            Err(TailError::Io(_)) => diff.unreadable.insert(sectors.clone()),
        }
    }
}
