//! The swarm: many random scenarios, each with every option and fault probability drawn from
//! its seed, checked against the engine's invariants (see docs/SIMULATION.md), and with each seed a
//! few validation cases (random regions on shared devices against a reference predicate).
//!
//! ```text
//! cargo run --release -p kcopyd-tests --bin swarm -- --seeds 300 [--seed S] [--check-determinism]
//! ```
//!
//! Seeds S, S+1, … run in turn. A failing seed prints the seed, the scenario (JSON) and the
//! broken invariant, and how to replay it. The last line is `N passed, M failed`; the exit
//! status is 1 if any failed.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::process::ExitCode;
use std::time::Instant;

use kcopyd_tests::scenario::{Inputs, SwarmReport, SwarmScenario, check, run};
use kcopyd_tests::{sparse_case, validation};

/// Validation cases per seed (random regions on shared devices, checked against a reference).
const VALIDATION_CASES: u64 = 8;

/// Sparse copies per seed (`kcopyd_tests::sparse_case`).
const SPARSE_CASES: u64 = 1;

struct Args {
    seeds: u64,
    first: u64,
    check_determinism: bool,
    verbose: bool,
}

fn parse() -> Result<Args, String> {
    let mut args = Args { seeds: 100, first: 0, check_determinism: false, verbose: false };
    let mut iter = std::env::args().skip(1);
    while let Some(arg) = iter.next() {
        let mut number = |name: &str| -> Result<u64, String> {
            let value = iter.next().ok_or(format!("{name} needs a value"))?;
            value.parse().map_err(|_| format!("{name} {value}: not a number"))
        };
        match arg.as_str() {
            "--seeds" => args.seeds = number("--seeds")?,
            "--seed" => args.first = number("--seed")?,
            "--check-determinism" => args.check_determinism = true,
            "--verbose" => args.verbose = true,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

/// Runs one seed's scenario, its validation cases and its sparse copy: the report and every
/// broken rule (and, if asked, a second run that must give the same trace).
fn run_seed(seed: u64, scenario: &SwarmScenario, check_determinism: bool) -> (SwarmReport, Vec<String>) {
    let report = run(scenario);
    let mut violations = check(scenario, &report);
    violations.extend(validation::check_seed(seed, VALIDATION_CASES));
    violations.extend(sparse_case::check_seed(seed, SPARSE_CASES));
    if check_determinism {
        let again = run(scenario);
        if again.trace_hash != report.trace_hash || again.trace_events != report.trace_events {
            violations.push(format!(
                "determinism: trace {:016x} ({} events) then {:016x} ({} events)",
                report.trace_hash, report.trace_events, again.trace_hash, again.trace_events
            ));
        }
    }
    (report, violations)
}

/// Prints a failed seed: its broken rules, the scenario and how to replay it (with
/// `--verbose`, the trace of a second run first).
fn print_failure(seed: u64, scenario: &SwarmScenario, problems: &[String], verbose: bool) {
    println!("seed {seed}: FAILED");
    if verbose {
        let report = run(scenario);
        for event in report.trace.events() {
            println!("  trace {:>6} {:>12} ns  {}", event.sequence, event.at_ns, event.what);
        }
    }
    for problem in problems.iter().take(20) {
        println!("  broken invariant: {problem}");
    }
    println!("  scenario: {}", serde_json::to_string(scenario).expect("scenarios serialize"));
    println!("  replay: cargo run --release -p kcopyd-tests --bin swarm -- --seeds 1 --seed {seed} --verbose");
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(args) => args,
        Err(problem) => {
            eprintln!("swarm: {problem}");
            eprintln!("usage: swarm [--seeds N] [--seed S] [--check-determinism] [--verbose]");
            return ExitCode::from(2);
        }
    };
    let started = Instant::now();
    let (mut passed, mut failed) = (0u64, 0u64);
    let (mut jobs, mut jobs_with_errors, mut faults_fired, mut crashes) = (0usize, 0usize, 0usize, 0usize);
    for seed in args.first..args.first + args.seeds {
        let scenario = Inputs::aimed(seed).layout();
        let verdict = catch_unwind(AssertUnwindSafe(|| run_seed(seed, &scenario, args.check_determinism)));
        match verdict {
            Ok((report, violations)) if violations.is_empty() => {
                passed += 1;
                jobs += report.jobs.len();
                jobs_with_errors += report
                    .jobs
                    .iter()
                    .filter(|j| j.outcome.as_ref().is_some_and(|o| o.read_err || !o.write_err.is_empty()))
                    .count();
                faults_fired +=
                    report.sources.iter().chain(&report.targets).map(|d| d.fault_log().len()).sum::<usize>();
                crashes += usize::from(scenario.crash_at_us.is_some());
                if args.verbose {
                    println!(
                        "seed {seed}: ok, {} jobs, {} events, trace {:016x}, {:?} virtual",
                        scenario.jobs.len(),
                        report.trace_events,
                        report.trace_hash,
                        report.virtual_time
                    );
                }
            }
            outcome => {
                failed += 1;
                let problems = match outcome {
                    Ok((_, violations)) => violations,
                    Err(panic) => vec![format!(
                        "panic: {}",
                        panic
                            .downcast_ref::<String>()
                            .cloned()
                            .or(panic.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_default()
                    )],
                };
                print_failure(seed, &scenario, &problems, args.verbose);
            }
        }
    }
    eprintln!(
        "swarm: {} seeds in {:.1} s; passing seeds ran {jobs} jobs ({jobs_with_errors} with I/O errors), {faults_fired} faults fired, {crashes} crashes",
        args.seeds,
        started.elapsed().as_secs_f64()
    );
    println!("{passed} passed, {failed} failed");
    if failed > 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}
