//! A shutdown racing submissions from other threads: a submit that returned `Ok` is a job
//! the client accepted, so it runs to its end, shutdown waits for it, and the report counts it.
//! A submit that loses the race fails with `ShutDown` and leaves nothing behind.

use std::sync::{Arc, Barrier};
use std::thread;

use kcopyd_core::{Client, ClientConfig, Flags, Job, JobHandle, SubmitError};
use kcopyd_tests::util::{assert_same, patterned, region, zeroed};

/// Threads submitting while another shuts down, per iteration.
const SUBMITTERS: usize = 3;
/// Jobs each submitter tries, one after the other.
const JOBS_EACH: usize = 4;
/// Sectors per job (each job copies to a target range of its own).
const JOB_SECTORS: u64 = 16;

/// One race: submitters and a shutdown released together; checks every accepted job. Returns
/// how many submissions were accepted, the report's job count, and how many were refused.
fn race(iteration: usize) -> (usize, u64, usize) {
    let config = ClientConfig { page_budget: 4, subjob_size_bytes: 4096, ..ClientConfig::default() };
    let client = Client::new(config).unwrap();
    let total = (SUBMITTERS * JOBS_EACH) as u64 * JOB_SECTORS;
    let source = patterned("source", total, 512, iteration as u64);
    let target = zeroed("target", total, 512);
    let barrier = Arc::new(Barrier::new(SUBMITTERS + 1));
    let submitters: Vec<_> = (0..SUBMITTERS)
        .map(|thread_index| {
            let (client, barrier, source, target) = (client.clone(), barrier.clone(), source.clone(), target.clone());
            thread::spawn(move || {
                barrier.wait();
                let mut accepted: Vec<(u64, JobHandle)> = Vec::new();
                let mut refused = 0;
                for job_index in 0..JOBS_EACH {
                    let at = (thread_index * JOBS_EACH + job_index) as u64 * JOB_SECTORS;
                    let job = Job::copy(
                        region(&source, at, JOB_SECTORS),
                        vec![region(&target, at, JOB_SECTORS)],
                        Flags::empty(),
                    );
                    match client.submit_blocking(job) {
                        Ok(handle) => accepted.push((at, handle)),
                        Err(SubmitError::ShutDown) => refused += 1,
                        Err(other) => panic!("iteration {iteration}: {other}"),
                    }
                }
                (accepted, refused)
            })
        })
        .collect();
    barrier.wait();
    let report = client.shutdown_blocking();
    let mut accepted_count = 0;
    let mut refused_count = 0;
    for submitter in submitters {
        let (accepted, refused) = submitter.join().unwrap();
        refused_count += refused;
        for (at, handle) in accepted {
            accepted_count += 1;
            let outcome = handle.try_outcome().unwrap_or_else(|| {
                panic!("iteration {iteration}: shutdown returned before accepted job at {at} completed")
            });
            assert!(outcome.is_ok() && !outcome.cancelled, "iteration {iteration}: accepted job at {at}: {outcome:?}");
            assert_same(&source, at, &target, at, JOB_SECTORS);
        }
    }
    (accepted_count, report.jobs_completed, refused_count)
}

#[test]
fn every_job_accepted_while_a_shutdown_races_runs_and_is_counted() {
    let (mut accepted_total, mut refused_total) = (0, 0);
    for iteration in 0..400 {
        let (accepted, completed, refused) = race(iteration);
        assert_eq!(completed, accepted as u64, "iteration {iteration}: the report counts every accepted job");
        accepted_total += accepted;
        refused_total += refused;
    }
    println!("accepted {accepted_total}, refused {refused_total}");
    // The race was run: some submissions came first, some after the shutdown.
    assert!(accepted_total > 0 && refused_total > 0, "accepted {accepted_total}, refused {refused_total}");
}
