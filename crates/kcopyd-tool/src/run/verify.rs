//! Reading back and comparing: the whole blocks through [`crate::compare`], the partial last
//! block through [`crate::tail`], after a copy (leaving out what it reported as not copied)
//! or on its own.
//!
//! ```text
//!  CompareSetup::prepare (before any write): shape within the page budget + its page pool
//!  run_compare: whole blocks, chunk by chunk, until cancelled ─► tail ─► VerifyRun
//!  verify_copy: skip = each target's not_copied; the source's read failures left out
//! ```

use std::cell::Cell;

use kcopyd_core::{ConfigError, PagePool, RangeSet, SECTOR_SIZE};

use super::{Event, JobRun, Phase, RunError, Runner, not_copied_in_region};
use crate::clock::Instant;
use crate::compare::{self, CompareShape, Comparison, Side};
use crate::open::{Opened, Settings};
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
}

/// What a comparison needs, made before anything is written so that it cannot refuse
/// afterwards: its shape within the budget and its pages.
pub(super) struct CompareSetup {
    shape: CompareShape,
    pool: PagePool,
}

impl CompareSetup {
    /// Fits the comparison of `source` with `targets` into the budget and reserves its pages.
    ///
    /// # Errors
    /// One block does not fit in the budget, or the pages cannot be reserved.
    pub(super) fn prepare(settings: &Settings, source: &Opened, targets: &[Opened]) -> Result<CompareSetup, RunError> {
        let config = &settings.config;
        let devices = targets.len() + 1;
        let block_bytes = std::iter::once(source).chain(targets).map(Opened::block_bytes).max().unwrap_or(512);
        let shape = CompareShape::fit(
            config.page_budget,
            devices,
            block_bytes,
            config.sub_job_size_bytes as u64,
            config.subjobs_in_flight,
        )
        .map_err(|problem| RunError::CompareBudget { problem })?;
        let pool = PagePool::with_huge_pages(config.page_budget, config.huge_pages)
            .map_err(|source| RunError::Start { source: ConfigError::Arena { pages: config.page_budget, source } })?;
        Ok(CompareSetup { shape, pool })
    }
}

fn side(opened: &Opened) -> Side {
    Side {
        device: opened.device.clone(),
        start_sector: opened.start_sector(),
        zero_before_read: is_headers_only(&opened.arg),
    }
}

impl Runner<'_> {
    /// Compares until done or cancelled; the tail after the whole blocks.
    pub(super) async fn run_compare(
        &self,
        setup: &CompareSetup,
        source: &Opened,
        targets: &[Opened],
        (len_bytes, tail): (u64, Tail),
        skip: Option<&[RangeSet]>,
    ) -> VerifyRun {
        self.started(Phase::Verify, len_bytes, 0);
        let compared = Cell::new(0u64);
        let on_chunk = |bytes: u64| {
            compared.set(compared.get() + bytes);
            (self.on_event)(Event::Progress { done_bytes: compared.get() });
        };
        let sides: Vec<Side> = targets.iter().map(side).collect();
        let started = Instant::now();
        let len_sectors = tail.offset_in_range_bytes / SECTOR_SIZE as u64;
        let (shape, pool) = (setup.shape, &setup.pool);
        let mut comparison =
            compare::compare(&side(source), &sides, len_sectors, skip, shape, pool, &on_chunk, self.cancel).await;
        if !self.cancel.is_cancelled() && !tail.is_empty() {
            compare_tail(source, targets, tail, skip, &mut comparison, self.cancel).await;
            if !self.cancel.is_cancelled() {
                on_chunk(tail.len_bytes);
            }
        }
        self.finished(Phase::Verify);
        VerifyRun {
            comparison,
            bytes: compared.get(),
            seconds: started.elapsed().as_secs_f64(),
            cancelled: self.cancel.is_cancelled(),
            skipped: skip.map(<[RangeSet]>::to_vec).unwrap_or_default(),
        }
    }

    /// After a copy: reads the targets back and compares them with the source, leaving out
    /// what the copy reported as not copied, and the source's blocks it could not read.
    pub(super) async fn verify_copy(&self, setup: &CompareSetup, plan: &Plan, run: &JobRun) -> VerifyRun {
        // Leave out what the copy itself reported as not copied: those differences are known.
        let skip: Vec<RangeSet> = plan
            .targets
            .iter()
            .zip(&run.outcome.targets)
            .map(|(target, outcome)| not_copied_in_region(target, outcome))
            .collect();
        let range = (plan.len_bytes, plan.tail);
        let mut verify = self.run_compare(setup, &plan.source, &plan.targets, range, Some(&skip)).await;
        // The source's unreadable blocks were reported by the copy already.
        let read_failed = run
            .outcome
            .read_failed
            .shifted(plan.source.start_sector(), 0)
            .expect("read_failed lies inside the source region");
        let comparison = &mut verify.comparison;
        comparison.source_unreadable = comparison.source_unreadable.difference(&read_failed);
        verify
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
