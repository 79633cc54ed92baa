//! `kcopyd demo`: a mirror resync on simulated disks with injected faults, the shipped
//! scenario `scenarios/demo-mirror-resync.toml` (built in), sized and run by
//! `kcopyd_sim::explore::demo`, checked by the scenario runner, and its check printed.
//!
//! ```text
//!               latent read errors (2)
//!  source ─────────────┬──────────► mirror-a   stale data, to be resynced
//!  80 µs + 800 MB/s    ├──────────► mirror-b   + a bad write region
//!  queue 32            └──────────► mirror-c
//!                 IGNORE_ERROR      150 µs + 300 MB/s, queue 32
//!
//!  then (the runner's check, explore's verify.rs):
//!        every read_failed range ⊆ read faults logged on the source
//!        every write_failed range ⊆ write faults logged on that target
//!        every sector outside the failed ranges = the source's
//! ```
//!
//! The disks are sparse and run in virtual time: 256 MiB takes about a second of model time
//! and as much of the machine's.

use std::fmt::Write as _;

use kcopyd_core::SECTOR_SIZE;
use kcopyd_sim::IoModel;
use kcopyd_sim::explore::demo::{self, DEMO_LEN_BYTES_MAX, DEMO_LEN_BYTES_MIN, TAMPERED_SECTOR, TAMPERED_TARGET};
use kcopyd_sim::explore::{JobReport, Scenario, ScenarioReport};

use crate::cli::DemoArgs;
use crate::error::{CliError, Status};
use crate::out;
use crate::progress::Interrupts;
use crate::report::describe_ranges;
use crate::size::Bytes;

/// How the demo names the scenario in messages.
const SCENARIO_NAME: &str = "scenarios/demo-mirror-resync.toml (built in)";

/// Prints a line on stdout; a closed stdout ends the demo quietly (exit 141).
macro_rules! say {
    () => {
        out::print("\n")?
    };
    ($($arg:tt)*) => {
        out::print(&format!("{}\n", format_args!($($arg)*)))?
    };
}

/// Runs the demo. A signal quits at once (the disks are in memory; nothing is left behind).
///
/// # Errors
/// A `--size` out of bounds, or stdout closed.
pub fn run(args: &DemoArgs, interrupts: &Interrupts) -> Result<Status, CliError> {
    interrupts
        .set_summary(Some(Box::new(|| "kcopyd: interrupted: the demo stopped (its disks were in memory)".into())));
    let len_bytes = args.size_bytes;
    if !demo::len_fits(len_bytes) {
        return Err(CliError::argument(
            "--size",
            len_bytes.to_string(),
            format!(
                "must be a whole number of MiB from {} to {}",
                Bytes(DEMO_LEN_BYTES_MIN),
                Bytes(DEMO_LEN_BYTES_MAX)
            ),
        ));
    }
    let scenario_error = |source| CliError::Scenario { path: SCENARIO_NAME.into(), source };
    let scenario = demo::scenario(len_bytes).map_err(scenario_error)?;
    introduce(&scenario, len_bytes)?;
    let tamper = args.tamper;
    // With --tamper, a sector the engine copied is changed behind its back: only the data
    // check sees it.
    let report = crate::explore::off_runtime(|| demo::run(&scenario, tamper).map_err(scenario_error))?;
    let job = report.jobs.first().expect("the demo scenario has one job entry");
    results(&report, job, len_bytes)?;
    if tamper {
        say!();
        say!("--tamper: changed sector {TAMPERED_SECTOR} of {TAMPERED_TARGET} after the resync");
    }
    say!();
    say!("the scenario runner's check of the report against the disks and their fault logs:");
    let checks = job.verification.claims();
    for (passed, what) in &checks {
        say!("  [{}] {what}", if *passed { " ok " } else { "FAIL" });
    }
    say!();
    if checks.iter().all(|(passed, _)| *passed) {
        say!("PASS: the outcome matches the fault log ({:.2} s of the machine's time)", report.wall_seconds);
        Ok(Status::Success)
    } else {
        say!("FAIL: the outcome does not match the fault log");
        Ok(Status::Failed)
    }
}

/// What the demo does: the disks, the faults and the job.
fn introduce(scenario: &Scenario, len_bytes: u64) -> Result<(), CliError> {
    let rate = |model: &IoModel| {
        format!("{} µs + {} MB/s, queue {}", model.cost_us, model.bandwidth_bytes_per_s / 1_000_000, model.queue_depth)
    };
    let disk = |name: &str| &scenario.disks[name].options;
    say!(
        "kcopyd demo: resync {} from source to {} mirrors holding stale data, on simulated disks",
        Bytes(len_bytes),
        scenario.jobs[0].targets.len()
    );
    say!("  disks: reads {}; writes {}", rate(&disk("source").latency.read), rate(&disk("mirror-a").latency.write));
    let pairs = |ranges: &mut dyn Iterator<Item = &std::ops::Range<u64>>| -> Vec<[u64; 2]> {
        ranges.map(|r| [r.start, r.end]).collect()
    };
    let latent = pairs(&mut disk("source").faults.latent_sectors.iter());
    say!("  injected: latent read errors on the source at sectors {}", describe_ranges(&latent));
    let bad_writes = pairs(&mut disk("mirror-b").faults.write_faults.iter().map(|f| &f.sectors));
    say!("            a bad write region on mirror-b at sectors {}", describe_ranges(&bad_writes));
    let client = &scenario.client;
    say!(
        "  job: IGNORE_ERROR, {} sub-jobs, {} in flight, {} of buffers; the scenario {SCENARIO_NAME}",
        Bytes(client.subjob_size_bytes as u64),
        client.subjobs_in_flight,
        Bytes((client.page_budget * kcopyd_core::PAGE_SIZE) as u64)
    );
    Ok(())
}

/// The resync's time, the per-target table and the failed ranges.
fn results(report: &ScenarioReport, job: &JobReport, len_bytes: u64) -> Result<(), CliError> {
    say!();
    say!(
        "resync done: {} in {:.2} s of model time ({}/s){}",
        Bytes(len_bytes),
        report.copy_seconds,
        Bytes((len_bytes as f64 / report.copy_seconds.max(1e-9)) as u64),
        if job.ok == job.jobs { "" } else { ", with errors (as injected)" }
    );
    say!();
    out::print(&table(job, len_bytes))?;
    say!();
    say!("failed ranges (512-byte sectors, START-END with END excluded):");
    if job.read_failed_ranges.is_empty() {
        say!("  source read_failed: none");
    } else {
        say!("  source read_failed: {}", describe_ranges(&job.read_failed_ranges));
    }
    for target in job.targets.iter().filter(|t| !t.write_failed_ranges.is_empty()) {
        say!("  {} write_failed: {}", target.disk, describe_ranges(&target.write_failed_ranges));
    }
    let errors = |mirrors: bool| -> u64 {
        report.disks.iter().filter(|d| (d.disk != "source") == mirrors).map(|d| d.errors).sum()
    };
    let (reads, writes) = (errors(false), errors(true));
    let plural = |count: u64| if count == 1 { "" } else { "s" };
    say!(
        "  fault log: {reads} failed read{} on the source (the engine narrows a failed chunk in halves), \
         {writes} failed write{} on the mirrors",
        plural(reads),
        plural(writes)
    );
    Ok(())
}

/// The per-target table.
fn table(job: &JobReport, len_bytes: u64) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<10} {:<13} {:>12} {:>12}  write failed (sectors)",
        "target", "status", "copied", "not copied"
    );
    for target in &job.targets {
        let status = if target.write_failed_sectors > 0 {
            "write errors"
        } else if target.not_copied_sectors > 0 {
            "incomplete"
        } else {
            "ok"
        };
        let not_copied_bytes = target.not_copied_sectors * SECTOR_SIZE as u64;
        let write_failed: Vec<String> = target.write_failed_ranges.iter().map(|[s, e]| format!("{s}-{e}")).collect();
        let _ = writeln!(
            out,
            "{:<10} {:<13} {:>12} {:>12}  {}",
            target.disk,
            status,
            Bytes(len_bytes - not_copied_bytes).to_string(),
            Bytes(not_copied_bytes).to_string(),
            if write_failed.is_empty() { "-".to_owned() } else { write_failed.join(", ") }
        );
    }
    out
}
