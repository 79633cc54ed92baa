//! `kcopyd`: copy, zero and compare block ranges with the kcopyd engine, from the shell.
//!
//! ```text
//!  kcopyd copy SOURCE TARGET...   ─┐ parse (clap) ─► check every argument against its device
//!  kcopyd zero TARGET...           │  (exit 2, nothing written) ─► engine job with progress and
//!  kcopyd verify SOURCE TARGET...  │  Ctrl-C ─► flush ─► [read back] ─► summary or --json
//!  kcopyd demo                    ─┘ simulated disks, injected faults, checked against the log
//!  kcopyd sim run|sweep SCENARIO     scenarios in virtual time (kcopyd-sim's explore module)
//! ```
//!
//! Devices are files and block devices (through `kcopyd-os`, O_DIRECT unless `--buffered`)
//! or `sim:KEY=VALUE,...` disks from `kcopyd-sim`. A command whose devices are all simulated
//! runs in the simulator's virtual time and reports model seconds, with wall seconds beside
//! them. Exit status: 0 success, 1 read or write errors or differences, 2 bad usage, 130
//! interrupted (143 by SIGTERM), 141 standard output closed by its reader. See `docs/CLI.md`.
#![warn(missing_docs)]
// A binary's items are reachable from no other crate, so `unreachable_pub` would ask for
// `pub(crate)` on each of its modules' items; they keep `pub`, the visibility they need once
// moved into a library crate.
#![allow(unreachable_pub)]

mod calibrate;
mod cli;
mod clone;
mod commands;
mod demo;
mod devices;
mod error;
mod explore;
mod map;
mod out;
mod progress;
mod report;
mod size;
mod validate;
mod validate_link;

use std::process::ExitCode;

use clap::Parser;
use clap::error::ErrorKind;

use crate::cli::{Cli, Command, MapCommand, OutputArgs, SimCommand};
use crate::commands::Done;
use crate::error::{CliError, Status};
use crate::progress::Interrupts;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => return usage_error(&error),
    };
    let mut builder = tokio::runtime::Builder::new_current_thread();
    builder.enable_all();
    if all_simulated(&cli.command) {
        // Nothing real to wait for: run on paused time, one model µs per tokio ms, so that
        // sub-millisecond requests keep their length and the copy takes model time, not wall.
        return kcopyd_sim::Simulation::block_on_with(builder, run(cli)).into();
    }
    let runtime = match builder.build() {
        Ok(runtime) => runtime,
        Err(source) => return fail(&CliError::Start { what: "the async runtime", source }),
    };
    let status = runtime.block_on(run(cli));
    // Every device is dropped by now; their NBD connections say goodbye on the reactor's
    // thread (NBD_CMD_DISC, TLS's close_notify): let them, briefly, before the process ends.
    kcopyd_nbd::Reactor::wait_shared_closed(NBD_CLOSE_TIMEOUT);
    status.into()
}

/// Most time the command waits at its end for its NBD connections to close cleanly.
const NBD_CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Whether every device of `command` is a `sim:` disk (the demo and the `sim` commands run
/// their own simulations, off this runtime).
fn all_simulated(command: &Command) -> bool {
    let sim = |arg: &kcopyd_tool::DeviceAddress| matches!(arg.backend, kcopyd_tool::Backend::Sim(_));
    match command {
        Command::Copy(args) => sim(&args.source) && args.targets.iter().all(sim),
        Command::Zero(args) => args.targets.iter().all(sim),
        Command::Verify(args) => sim(&args.source) && args.targets.iter().all(sim),
        Command::Demo(_) | Command::Sim { .. } | Command::Map(_) | Command::Clone(_) => false,
    }
}

async fn run(cli: Cli) -> Status {
    // Installed first: a signal during the checks quits at once (nothing is written yet), one
    // during a job cancels it (progress::SignalPhase).
    let mut interrupts = match Interrupts::install() {
        Ok(interrupts) => interrupts,
        Err(source) => return fail_status(&CliError::Start { what: "the Ctrl-C handler", source }),
    };
    interrupts.set_summary(Some(Box::new(|| {
        "kcopyd: interrupted before anything was written (files it created are removed)".to_owned()
    })));
    let started = std::time::Instant::now();
    let emit = |done, output| emit(done, output, started);
    let result = match &cli.command {
        Command::Copy(args) => commands::copy(args, &mut interrupts).await.map(|done| emit(done, &args.output)),
        Command::Zero(args) => commands::zero(args, &mut interrupts).await.map(|done| emit(done, &args.output)),
        Command::Verify(args) => commands::verify(args, &mut interrupts).await.map(|done| emit(done, &args.output)),
        Command::Demo(args) => demo::run(args, &interrupts),
        Command::Clone(args) => clone::run(args, &mut interrupts).await,
        Command::Map(MapCommand::Show { file }) => map::show(file, &mut interrupts).await,
        Command::Sim { command: SimCommand::Calibrate(args) } => calibrate::run(args, &mut interrupts).await,
        Command::Sim { command: SimCommand::Validate(args) } => validate::run(args, &mut interrupts).await,
        Command::Sim { command: SimCommand::ValidateLink(args) } => validate_link::run(args, &mut interrupts).await,
        Command::Sim { command: SimCommand::Run(args) } => explore::run(args, &interrupts),
        Command::Sim { command: SimCommand::Sweep(args) } => explore::sweep(args, &interrupts),
    };
    result.unwrap_or_else(|error| fail_status(&error))
}

/// Prints the report: JSON, or the summary unless quiet and successful. In virtual time the
/// report carries the wall seconds since `started` beside its model seconds.
fn emit(mut done: Done, output: &OutputArgs, started: std::time::Instant) -> Status {
    if kcopyd_sim::in_virtual_time() {
        done.report.wall_seconds = Some(started.elapsed().as_secs_f64());
    }
    // Written to stderr if stdout is gone: the data work is done, its report is not lost.
    if output.json {
        out::report(&format!("{}\n", serde_json::to_string(&done.report).expect("a report serializes")));
    } else if !output.quiet || done.status != Status::Success {
        out::report(&report::human(&done.report));
    }
    done.status
}

fn fail_status(error: &CliError) -> Status {
    // A closed stdout ends a printing command quietly, as coreutils do.
    if !matches!(error, CliError::StdoutClosed) {
        out::error(&format!("kcopyd: {error}"));
    }
    error.status()
}

fn fail(error: &CliError) -> ExitCode {
    fail_status(error).into()
}

/// Help and version as clap prints them; any other parse error as one line naming the
/// argument, exit 2.
fn usage_error(error: &clap::Error) -> ExitCode {
    match error.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            // Help on a closed stdout is no failure worth a panic.
            let text = error.render().to_string();
            if error.use_stderr() {
                out::note_text(&text);
            } else if out::print(&text).is_err() {
                return ExitCode::from(error::EXIT_STDOUT_CLOSED);
            }
            ExitCode::from(error.exit_code() as u8)
        }
        _ => {
            out::error(&format!("kcopyd: {}", one_line(&error.render().to_string())));
            Status::Usage.into()
        }
    }
}

/// clap's message on one line: without the usage and the pointer to `--help`.
///
/// `error: invalid value 'x' for '--length <LEN>': ...`, a blank line and `For more
/// information, try '--help'.` become `invalid value 'x' for '--length <LEN>': ...`.
fn one_line(rendered: &str) -> String {
    let mut out = String::new();
    for line in rendered.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.starts_with("Usage:") || line.starts_with("For more information") {
            continue;
        }
        let line = line.strip_prefix("error: ").unwrap_or(line);
        if !out.is_empty() {
            out.push_str(if out.ends_with(':') { " " } else { "; " });
        }
        out.push_str(line);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clap_messages_fold_into_one_line() {
        let rendered = "error: the following required arguments were not provided:\n  <TARGET>...\n\n\
                        Usage: kcopyd copy <SOURCE> <TARGET>...\n\nFor more information, try '--help'.\n";
        assert_eq!(one_line(rendered), "the following required arguments were not provided: <TARGET>...");
        let tip = "error: unexpected argument '--lenght' found\n\n  tip: a similar argument exists: '--length'\n";
        assert_eq!(one_line(tip), "unexpected argument '--lenght' found; tip: a similar argument exists: '--length'");
    }
}
