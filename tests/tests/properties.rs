//! Property tests: random client configurations, job sequences and fault plans (proptest
//! inputs, so they shrink), checked against the brief's invariants after every run. Each run
//! is replayed once to check that the same inputs give the same trace.
//!
//! `PROPTEST_CASES` bounds the cases (CI sets 64); failures are kept in
//! `tests/proptest-regressions/properties.txt` (the path is set below, relative to the
//! package's directory, where cargo runs tests) and replayed first on every run.

use kcopyd_tests::scenario::{Inputs, arb_inputs, check, run};
use kcopyd_tests::{sparse_case, validation};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

/// Where failing cases are kept: the one place docs/SIMULATION.md names.
const REGRESSIONS: &str = "proptest-regressions/properties.txt";

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
    #![proptest_config(ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(REGRESSIONS))),
        ..ProptestConfig::default()
    })]

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

proptest! {
    #![proptest_config(ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(REGRESSIONS))),
        ..ProptestConfig::default()
    })]

    /// Random regions on shared devices (containment both ways, adjacency, zero length,
    /// misalignment on 4 KiB devices, out of range, too many targets): the engine refuses
    /// exactly the cases the reference predicate refuses, with one of the rules it names, and
    /// touches no device when it does.
    #[test]
    fn submit_refuses_exactly_what_the_reference_refuses(seed in any::<u64>()) {
        let case = validation::ValidationCase::from_seed(seed);
        let problems = case.check();
        prop_assert!(problems.is_empty(), "{problems:?}\ncase: {}", serde_json::to_string(&case).unwrap());
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(REGRESSIONS))),
        ..ProptestConfig::default()
    })]

    /// Sparse copies (data runs, zero runs and holes on a sparse or dense source; thin,
    /// offloading and plain targets; every `Sparse` setting): the source is read exactly where
    /// it is allocated, every target reads as the source, holes go cheaply and in few requests
    /// where zeroes are cheap, and not at all onto a target said to be zero.
    #[test]
    fn sparse_copies_read_what_is_allocated_and_leave_targets_equal_to_the_source(seed in any::<u64>()) {
        let case = sparse_case::SparseCase::from_seed(seed);
        let problems = case.check();
        prop_assert!(problems.is_empty(), "{problems:?}\ncase: {}", serde_json::to_string(&case).unwrap());
    }
}
