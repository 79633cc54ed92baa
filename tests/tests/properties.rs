//! Property tests: random client configurations, job sequences and fault plans (proptest
//! inputs, so they shrink), checked against the brief's invariants after every run. Each run
//! is replayed once to check that the same inputs give the same trace.
//!
//! `PROPTEST_CASES` bounds the cases (CI sets 64); failures are kept under
//! `tests/proptest-regressions/` and replayed first on every run.

use kcopyd_tests::scenario::{Inputs, arb_inputs, check, run};
use proptest::prelude::*;

fn assert_invariants(inputs: &Inputs) -> Result<(), TestCaseError> {
    let scenario = inputs.layout();
    let report = run(&scenario);
    let violations = check(&scenario, &report);
    prop_assert!(
        violations.is_empty(),
        "seed {}: {} violations, first: {:?}\nscenario: {}",
        inputs.seed,
        violations.len(),
        violations.iter().take(5).collect::<Vec<_>>(),
        serde_json::to_string(&scenario).unwrap()
    );
    let again = run(&scenario);
    prop_assert_eq!(again.trace_hash, report.trace_hash, "the same inputs gave another trace");
    Ok(())
}

proptest! {
    #[test]
    fn every_job_completes_once_with_exact_reports_and_contents(inputs in arb_inputs()) {
        assert_invariants(&inputs)?;
    }

    #[test]
    fn after_a_crash_blocks_are_old_or_new_and_resubmitted_jobs_finish(
        inputs in arb_inputs(),
        crash_at_us in 0u64..20_000,
    ) {
        let mut inputs = inputs;
        inputs.crash_at_us = Some(crash_at_us);
        // A zoned target's write pointer is not rolled back by a crash, so a resubmitted job
        // could never rewrite its zone: crash scenarios use conventional targets.
        inputs.targets.iter_mut().for_each(|t| t.zoned = false);
        assert_invariants(&inputs)?;
    }
}
