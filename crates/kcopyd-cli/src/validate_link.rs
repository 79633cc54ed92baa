//! `kcopyd sim validate-link`: copies over a real (or rate-limited and delayed) network link
//! and the same copies in the simulator, with the link's model in front of a disk model, side
//! by side: the link model's predictions carry a measured error.
//!
//! ```text
//!  SOURCE ─► TARGET (the user's exports: e.g. nbdkit + rate + delay filters)
//!  real:      warm-up copy, then --runs rounds × configurations, alternating  ─► median s
//!  simulated: --model with LinkModel { --link-rtt, --link-bandwidth, --link-burst }
//!             in front of the --remote end(s), each configuration once        ─► model s
//!  error = (predicted − measured) / measured
//! ```
//!
//! The command starts no server: what the link is, is the user's to set up and to describe.
//! The real copies are `kcopyd copy`'s (see `validate::copy_once`); the prediction is
//! kcopyd-sim's `explore::validate::LinkSetup`.

use kcopyd_sim::LinkModel;
use kcopyd_sim::explore::validate::{self, Config, LinkSetup, LinkValidation, Remote, Row, Validation};

use crate::cli::{RemoteArg, ValidateLinkArgs};
use crate::error::{CliError, Status};
use crate::progress::{self, Interrupts};
use crate::validate::{Copied, MadeFiles, configs_error, copy_once};

/// The link the arguments describe.
fn setup(args: &ValidateLinkArgs) -> LinkSetup {
    let remote = match args.remote {
        RemoteArg::Source => Remote::Source,
        RemoteArg::Target => Remote::Target,
        RemoteArg::Both => Remote::Both,
    };
    let link = LinkModel {
        round_trip_us: args.link_rtt_us,
        bandwidth_bytes_per_s: args.link_bandwidth_bytes_per_s,
        burst_bytes: args.link_burst_bytes,
    };
    LinkSetup { link, remote }
}

/// The configurations, checked against the targets given (nothing is run before they are).
fn configs_of(args: &ValidateLinkArgs) -> Result<Vec<Config>, CliError> {
    let configs = validate::parse_configs(&args.configs).map_err(configs_error)?;
    if let Some((text, config)) = args.configs.iter().zip(&configs).find(|(_, c)| c.targets > args.targets.len()) {
        return Err(CliError::argument(
            "--configs",
            text,
            format!("writes {} targets, but {} TARGET(s) are given", config.targets, args.targets.len()),
        ));
    }
    validate::check_runs(args.run.runs).map_err(configs_error)?;
    Ok(configs)
}

/// `kcopyd sim validate-link`.
///
/// # Errors
/// Bad arguments or model (nothing written), a device that does not open, or a failed copy.
pub async fn run(args: &ValidateLinkArgs, interrupts: &mut Interrupts) -> Result<Status, CliError> {
    let configs = configs_of(args)?;
    let model = match &args.model {
        Some(path) => crate::calibrate::load(path)?,
        None => kcopyd_sim::DiskModel { description: "instant disks".into(), ..kcopyd_sim::DiskModel::default() },
    };
    let setup = setup(args);
    let bars = progress::bars_wanted(args.run.quiet || args.run.json);
    let bar = progress::byte_bar(bars, (1 + args.run.runs * configs.len() + configs.len()) as u64, "validate-link");
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg:<28} [{wide_bar}] {pos}/{len} copies ETA {eta}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    let ends = (&args.source, args.targets.as_slice());
    // A warm-up copy (connections, the server's memory, caches), not counted.
    let widest = *configs.iter().max_by_key(|c| c.targets).expect("at least one");
    bar.set_message(format!("warm-up {}", widest));
    let first = match copy_once(ends, widest, args.run.memory_bytes, &MadeFiles::default(), interrupts).await? {
        Ok(copied) => copied,
        Err(status) => return Ok(status),
    };
    bar.inc(1);
    let mut measured: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    for round in 0..args.run.runs {
        for (i, &config) in configs.iter().enumerate() {
            bar.set_message(format!("run {}/{} {}", round + 1, args.run.runs, config));
            match copy_once(ends, config, args.run.memory_bytes, &MadeFiles::default(), interrupts).await? {
                Ok(Copied { seconds, .. }) => measured[i].push(seconds),
                Err(status) => return Ok(status),
            }
            bar.inc(1);
        }
    }
    let mut rows = Vec::new();
    for (config, measured) in configs.iter().zip(measured) {
        bar.set_message(format!("simulate {}", config));
        let predicted =
            setup.predict_seconds(&model, *config, first.len_bytes, first.block_bytes, args.run.memory_bytes);
        bar.inc(1);
        rows.push(Row::new(*config, measured, predicted));
    }
    bar.finish_and_clear();
    let validation = LinkValidation {
        setup,
        targets: args.targets.iter().map(|t| t.text.clone()).collect(),
        validation: Validation::new(
            model.description.clone(),
            args.source.text.clone(),
            first.len_bytes,
            model.one_device,
            args.run.runs,
            rows,
        ),
    };
    if args.run.json {
        crate::out::print(&format!("{}\n", serde_json::to_string(&validation).expect("a validation serializes")))?;
    } else {
        crate::out::print(&validation.to_string())?;
    }
    Ok(Status::Success)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(line: &[&str]) -> ValidateLinkArgs {
        let cli = crate::cli::Cli::try_parse_from(line).expect("the arguments parse");
        match cli.command {
            crate::cli::Command::Sim { command: crate::cli::SimCommand::ValidateLink(args) } => args,
            other => panic!("not validate-link: {other:?}"),
        }
    }

    #[test]
    fn the_link_arguments_become_the_model_link() {
        let parsed = args(&[
            "kcopyd",
            "sim",
            "validate-link",
            "a.img",
            "b.img",
            "--link-rtt",
            "5ms",
            "--link-bandwidth",
            "50000000",
            "--link-burst",
            "500K",
            "--remote",
            "source",
        ]);
        let setup = setup(&parsed);
        assert_eq!(
            setup.link,
            LinkModel { round_trip_us: 5000, bandwidth_bytes_per_s: 50_000_000, burst_bytes: 500 << 10 }
        );
        assert_eq!(setup.remote, Remote::Source);
        assert_eq!(configs_of(&parsed).unwrap().len(), 3, "the default configurations");
    }

    #[test]
    fn more_targets_than_given_or_no_runs_are_refused_before_any_copy() {
        let base = ["kcopyd", "sim", "validate-link", "a.img", "b.img", "--link-rtt", "1ms", "--link-bandwidth", "1M"];
        let with = |extra: &[&str]| args(&[&base[..], extra].concat());
        let error = configs_of(&with(&["--configs", "1Mx4x2"])).unwrap_err().to_string();
        assert!(error.contains("--configs") && error.contains("1Mx4x2") && error.contains("2 targets"), "{error}");
        let error = configs_of(&with(&["--runs", "0"])).unwrap_err().to_string();
        assert!(error.contains("--runs"), "{error}");
        let error = configs_of(&with(&["--configs", "1Mx0x1"])).unwrap_err().to_string();
        assert!(error.contains("--configs") && error.contains("1Mx0x1"), "{error}");
    }
}
