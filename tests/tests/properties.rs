//! Property tests: random client configurations, job sequences and fault plans (proptest
//! inputs, so they shrink), checked against the brief's invariants after every run. Each run
//! is replayed once to check that the same inputs give the same trace.
//!
//! `PROPTEST_CASES` bounds the cases (CI sets 64); failures are kept in
//! `tests/proptest-regressions/properties.txt` (the path is set below, relative to the
//! package's directory, where cargo runs tests) and replayed first on every run.

use kcopyd_tests::scenario::{Inputs, arb_inputs, check, run};
use kcopyd_tests::{sparse_case, threaded_case, validation};
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

/// A rate-limited copy of `subjobs` sub-jobs of `pages` pages, `in_flight` at a time, from one
/// disk to another whose requests each take `cost_us`: the model time from submit to
/// completion.
fn throttled_copy_seconds(rate_bytes_per_s: u64, pages: usize, subjobs: u64, in_flight: usize, cost_us: u64) -> f64 {
    use std::sync::Arc;

    use kcopyd_core::{Client, ClientConfig, Device, Flags, Job, PAGE_SIZE, Region, SECTOR_SIZE, Throttle};
    use kcopyd_sim::{IoModel, Latency, MemDisk, MemDiskOptions, Simulation, to_model};

    let subjob_bytes = pages * PAGE_SIZE;
    let len_sectors = subjobs * (subjob_bytes / SECTOR_SIZE) as u64;
    let model = IoModel { cost_us, ..IoModel::default() };
    let disk = |name: &str| {
        let latency = Latency { read: model, write: model, ..Latency::default() };
        Arc::new(MemDisk::new(MemDiskOptions { name: name.into(), len_sectors, latency, ..MemDiskOptions::default() }))
    };
    Simulation::block_on(async {
        let config = ClientConfig {
            page_budget: pages * (in_flight + 1),
            subjob_size_bytes: subjob_bytes,
            subjobs_in_flight: in_flight,
            throttle: Throttle { rate_bytes_per_s: Some(rate_bytes_per_s), ..Throttle::OFF },
            ..ClientConfig::default()
        };
        let client = Client::start_in_current_system(config).expect("a valid configuration");
        let (source, target): (Device, Device) = (disk("source"), disk("target"));
        let job =
            Job::copy(Region::new(source, 0, len_sectors), vec![Region::new(target, 0, len_sectors)], Flags::empty());
        let began = tokio::time::Instant::now();
        let outcome = client.submit(job).await.expect("a valid job").await;
        assert!(outcome.is_ok(), "{outcome:?}");
        let seconds = to_model(began.elapsed()).as_secs_f64();
        client.shutdown().await;
        seconds
    })
}

proptest! {
    #![proptest_config(ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(REGRESSIONS))),
        ..ProptestConfig::default()
    })]

    /// A rate limit is a limit, not a brake: with nothing else in the way (pages for every
    /// sub-job in flight, requests shorter than a sub-job's turn), sub-job `k` is issued at
    /// `k × size / rate` (the first from the bucket's one sub-job of credit) and the copy ends
    /// one read and one write after the last. The swarm's rule 17 bounds a throttle from
    /// above; this bounds it from below — a throttle that waits longer than its rate asks
    /// (for the credit a sub-job already has, say) makes every copy slower than the user set.
    #[test]
    fn a_rate_limited_copy_takes_as_long_as_its_rate_and_no_longer(
        rate_kib_per_s in 64u64..8192,
        pages in 1usize..16,
        subjobs in 2u64..24,
        in_flight in prop_oneof![Just(1usize), 1usize..5],
        cost_share in 1u64..25,
    ) {
        let rate = rate_kib_per_s << 10;
        let subjob_bytes = (pages * kcopyd_core::PAGE_SIZE) as u64;
        let turn_us = subjob_bytes * 1_000_000 / rate;
        // Each request takes 1–24 % of a sub-job's turn: a read and a write fit in half of it.
        let cost_us = (turn_us * cost_share / 100).max(1);
        let seconds = throttled_copy_seconds(rate, pages, subjobs, in_flight, cost_us);
        let ideal = ((subjobs - 1) * subjob_bytes) as f64 / rate as f64 + 2.0 * cost_us as f64 / 1e6;
        prop_assert!(
            seconds <= ideal * 1.01 + 0.001,
            "{subjobs} sub-jobs of {subjob_bytes} bytes at {rate} B/s, {in_flight} in flight, {cost_us} µs a \
             request: {seconds:.6} s, more than the {ideal:.6} s the rate allows"
        );
        prop_assert!(seconds >= ideal * 0.99 - 0.001, "{seconds:.6} s, less than the {ideal:.6} s the rate allows");
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(REGRESSIONS))),
        // A case that fails may wait seconds for a worker that never exits: shrink little.
        max_shrink_iters: 16,
        ..ProptestConfig::default()
    })]

    /// A client on a worker thread of its own, driven from plain threads with every way to
    /// submit and to end (see `threaded_case`): every accepted job copies its source and calls
    /// back on the worker once, blocking calls refuse to run on the worker, the configuration
    /// reads back, and the worker thread has exited when shutdown returns (or soon after the
    /// last handle is dropped).
    #[test]
    fn a_threaded_client_serves_plain_threads_and_its_worker_exits_when_it_stops(seed in any::<u64>()) {
        let case = threaded_case::ThreadedCase::from_seed(seed);
        let problems = case.check();
        prop_assert!(problems.is_empty(), "{problems:?}\ncase: {}", serde_json::to_string(&case).unwrap());
    }
}
