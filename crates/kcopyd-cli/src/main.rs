//! `kcopyd`: copy, zero and compare block ranges with the kcopyd engine, from the shell.
//!
//! ```text
//!  kcopyd copy SOURCE TARGET...   ─┐ parse (clap) ─► check every argument against its device
//!  kcopyd zero TARGET...           │  (exit 2, nothing written) ─► engine job with progress and
//!  kcopyd verify SOURCE TARGET...  │  Ctrl-C ─► flush ─► [read back] ─► summary or --json
//!  kcopyd demo                    ─┘ simulated disks, injected faults, checked against the log
//! ```
//!
//! Devices are files and block devices (through `kcopyd-os`, O_DIRECT unless `--buffered`)
//! or `sim:KEY=VALUE,...` disks from `kcopyd-sim`. Exit status: 0 success, 1 read or write
//! errors or differences, 2 bad usage, 130 interrupted. See `docs/CLI.md`.
#![warn(missing_docs)]

mod cli;
mod commands;
mod compare;
mod demo;
mod device_arg;
mod devices;
mod error;
mod locks;
mod progress;
mod report;
mod sim;
mod size;
mod tail;

use std::process::ExitCode;

use clap::Parser;
use clap::error::ErrorKind;

use crate::cli::{Cli, Command, OutputArgs};
use crate::commands::Done;
use crate::error::{CliError, Status};
use crate::progress::Interrupts;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => return usage_error(&error),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(source) => return fail(&CliError::Start { what: "the async runtime", source }),
    };
    runtime.block_on(run(cli)).into()
}

async fn run(cli: Cli) -> Status {
    // Installed first, so that a Ctrl-C during the checks cancels the job as soon as it starts.
    let mut interrupts = match Interrupts::install() {
        Ok(interrupts) => interrupts,
        Err(source) => return fail_status(&CliError::Start { what: "the Ctrl-C handler", source }),
    };
    let result = match &cli.command {
        Command::Copy(args) => commands::copy(args, &mut interrupts).await.map(|done| emit(done, &args.output)),
        Command::Zero(args) => commands::zero(args, &mut interrupts).await.map(|done| emit(done, &args.output)),
        Command::Verify(args) => commands::verify(args, &mut interrupts).await.map(|done| emit(done, &args.output)),
        Command::Demo(args) => demo::run(args, &mut interrupts).await,
    };
    result.unwrap_or_else(|error| fail_status(&error))
}

/// Prints the report: JSON, or the summary unless quiet and successful.
fn emit(done: Done, output: &OutputArgs) -> Status {
    if output.json {
        println!("{}", serde_json::to_string(&done.report).expect("a report serializes"));
    } else if !output.quiet || done.status != Status::Success {
        print!("{}", report::human(&done.report));
    }
    done.status
}

fn fail_status(error: &CliError) -> Status {
    eprintln!("kcopyd: {error}");
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
            let _ = error.print();
            ExitCode::from(error.exit_code() as u8)
        }
        _ => {
            eprintln!("kcopyd: {}", one_line(&error.render().to_string()));
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
