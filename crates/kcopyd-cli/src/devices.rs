//! From the command's arguments to a plan: the engine options checked into [`Settings`], the
//! plan of `kcopyd-tool` opened interruptibly, and its errors named by the options at fault.
//!
//! ```text
//!  EngineArgs, ThrottleArgs ─► settings() ─► Settings (+ the Ctrl-C handler's file cleanup)
//!  SOURCE TARGET... --length ─► open_plan / open_zero_plan ─► kcopyd_tool::plan_* (on a
//!    thread of its own when an NBD export must connect, so that Ctrl-C ends the wait)
//!  PlanError, OptionError ─► CliError (exit 2, nothing written)
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kcopyd_core::ClientConfig;
use kcopyd_nbd::TlsOptions;
use kcopyd_os::{IoEngine, QUEUE_DEPTH_MAX};
use kcopyd_tool::options::{self, NBD_SUBJOB_SIZE_DEFAULT_BYTES, NBD_SUBJOBS_IN_FLIGHT_DEFAULT};
use kcopyd_tool::{Backend, CreatedHook, DeviceAddress, OptionError, Plan, PlanError, Settings, ZeroPlan};
use kcopyd_tool::{TlsOption, plan_with_source, plan_zero};

use crate::cli::{EngineArgs, IoEngineArg, SUBJOB_SIZE_DEFAULT, SUBJOBS_IN_FLIGHT_DEFAULT, ThrottleArgs};
use crate::error::{CliError, open_reason};
use crate::{out, progress};

/// The Ctrl-C handler's list of files to remove when the command quits at once.
#[derive(Debug)]
struct QuitCleanup;

/// The Ctrl-C handler's file cleanup, for a library type that creates files.
pub fn quit_cleanup() -> Arc<dyn CreatedHook> {
    Arc::new(QuitCleanup)
}

impl CreatedHook for QuitCleanup {
    fn creating(&self, path: &Path) -> Box<dyn std::any::Any> {
        Box::new(progress::CreatedGuard::creating(path))
    }
    fn forget(&self, paths: &[PathBuf]) {
        progress::forget_created(paths);
    }
    fn made(&self, path: &Path, id: kcopyd_os::FileKey) {
        progress::created_as(path, id);
    }
}

impl From<PlanError> for CliError {
    fn from(error: PlanError) -> CliError {
        match error {
            PlanError::Device { role, text, problem } => CliError::argument(role.name(), text, problem.to_string()),
            PlanError::Length { len_bytes, problem } => CliError::argument("--length", len_bytes.to_string(), problem),
            error @ PlanError::TargetCount { .. } => CliError::Arguments { what: "TARGET", problem: error.to_string() },
            PlanError::Open { role, text, source } => {
                CliError::Open { what: role.name(), text, reason: open_reason(&source, Some("--buffered")), source }
            }
            PlanError::Connect { role, text, source } => CliError::argument(role.name(), text, source.to_string()),
        }
    }
}

/// An option of `args` refused by [`kcopyd_tool::options`], named by the option at fault.
pub fn option_error(error: OptionError) -> CliError {
    let (option, text) = match &error {
        OptionError::MemoryTooSmall { memory_bytes } | OptionError::MemoryTooLarge { memory_bytes } => {
            ("--memory", memory_bytes.to_string())
        }
        OptionError::Connections { count } => ("--connections", count.to_string()),
        OptionError::ConnectTimeout { timeout_us } => ("--connect-timeout", format!("{timeout_us}us")),
        OptionError::IoTimeout { timeout_us } => ("--io-timeout", format!("{timeout_us}us")),
        OptionError::TlsWithoutTlsExport { option, text } => match option {
            TlsOption::Certificates => ("--tls-certificates", text.clone()),
            TlsOption::VerifyPeer => ("--tls-verify-peer", text.clone()),
            TlsOption::Hostname => ("--tls-hostname", text.clone()),
        },
        OptionError::SparseSize { size_bytes } => ("--sparse-size", size_bytes.to_string()),
        OptionError::SparseSizeNotSparse { size_bytes } => {
            let problem = "sets the zero scan of a sparse copy, and --sparse=off / --no-sparse turns sparse copies off";
            return CliError::argument("--sparse-size", size_bytes.to_string(), problem);
        }
        OptionError::TargetIsZeroNotSparse => {
            let problem = "needs a sparse copy, and --sparse=off / --no-sparse turns it off".into();
            return CliError::Arguments { what: "--target-is-zero", problem };
        }
    };
    CliError::argument(option, text, error.to_string())
}

/// `settings` with the throttle of `args`.
///
/// # Errors
/// A limit out of bounds, named by its option.
pub fn with_throttle(mut settings: Settings, args: &ThrottleArgs) -> Result<Settings, CliError> {
    let throttle = kcopyd_core::Throttle { busy_percent: args.busy_percent, rate_bytes_per_s: args.rate_bytes_per_s };
    throttle.validate().map_err(|source| {
        let option = match source {
            kcopyd_core::ConfigError::ThrottleBusy { .. } => "--throttle-busy",
            _ => "--throttle-rate",
        };
        CliError::Config { option, source }
    })?;
    settings.config.throttle = throttle;
    Ok(settings)
}

/// The I/O engine of `--io-engine`, if this build has it.
fn io_engine(arg: IoEngineArg) -> Result<IoEngine, CliError> {
    match arg {
        IoEngineArg::Sync => Ok(IoEngine::Sync),
        IoEngineArg::Uring if cfg!(feature = "io-uring") => Ok(IoEngine::Uring),
        IoEngineArg::Uring => Err(CliError::argument(
            "--io-engine",
            "uring",
            "this kcopyd was built without io_uring support (cargo feature io-uring); use --io-engine sync",
        )),
    }
}

/// Checks the engine options for a command on `devices` (whose kinds choose defaults:
/// NBD exports get [`NBD_SUBJOBS_IN_FLIGHT_DEFAULT`] sub-jobs of [`NBD_SUBJOB_SIZE_DEFAULT_BYTES`]
/// in flight).
///
/// # Errors
/// An option out of bounds, named.
pub fn settings<'a>(
    args: &EngineArgs,
    devices: impl IntoIterator<Item = &'a DeviceAddress>,
) -> Result<Settings, CliError> {
    let devices: Vec<&DeviceAddress> = devices.into_iter().collect();
    let nbd_exports = devices.iter().filter(|device| matches!(device.backend, Backend::Nbd(_))).count();
    let subjobs_default = if nbd_exports > 0 { NBD_SUBJOBS_IN_FLIGHT_DEFAULT } else { SUBJOBS_IN_FLIGHT_DEFAULT };
    let subjobs_in_flight = args.subjobs_in_flight.unwrap_or(subjobs_default);
    let subjob_default = match nbd_exports {
        0 => crate::size::parse_size(SUBJOB_SIZE_DEFAULT).expect("the default size parses"),
        _ => NBD_SUBJOB_SIZE_DEFAULT_BYTES,
    };
    let subjob_size_bytes = args.subjob_size_bytes.unwrap_or(subjob_default);
    let memory_bytes =
        args.memory_bytes.unwrap_or_else(|| options::memory_default(subjob_size_bytes, subjobs_in_flight));
    options::check_memory(memory_bytes).map_err(option_error)?;
    let tls = TlsOptions {
        certificates: args.tls_certificates.clone(),
        verify_peer: args.tls_verify_peer,
        hostname: args.tls_hostname.clone(),
    };
    let nbd = options::nbd_settings(args.connections, args.connect_timeout_us, args.io_timeout_us, tls, nbd_exports)
        .map_err(option_error)?;
    let nbd = kcopyd_tool::NbdSettings { warm_up: !args.no_warm_up, ..nbd };
    for uri in options::unverified_tls_exports(&devices, &nbd.tls).map_err(option_error)? {
        out::note(&format!(
            "kcopyd: warning: {uri}: the server's certificate is not verified (tls-verify-peer off): \
             the data is encrypted, but the server may be anyone"
        ));
    }
    let config = ClientConfig {
        huge_pages: !args.no_huge_pages,
        io_timeout_ms: nbd.io_timeout_ms,
        ..options::client_config(memory_bytes, subjob_size_bytes, subjobs_in_flight)
    };
    config.validate().map_err(|source| {
        let option = match source {
            kcopyd_core::ConfigError::SubjobSize { .. } => "--subjob-size",
            kcopyd_core::ConfigError::SubjobsInFlight { .. } => "--subjobs-in-flight",
            _ => "--memory",
        };
        CliError::Config { option, source }
    })?;
    Ok(Settings {
        config,
        buffered: args.buffered,
        queue_depth: subjobs_in_flight.clamp(1, QUEUE_DEPTH_MAX),
        io_engine: io_engine(args.io_engine)?,
        nbd,
        created_hook: Some(Arc::new(QuitCleanup)),
    })
}

/// [`plan_with_source`], interruptible while it connects (see [`open_interruptibly`]).
///
/// # Errors
/// As [`plan_with_source`], or the interruption.
pub async fn open_plan(
    source: &DeviceAddress,
    targets: &[DeviceAddress],
    length: Option<u64>,
    write: bool,
    settings: &Settings,
    interrupts: &mut crate::progress::Interrupts,
) -> Result<Plan, CliError> {
    let args = std::iter::once(source).chain(targets);
    let (source, targets, settings) = (source.clone(), targets.to_vec(), settings.clone());
    let open = move || Ok(plan_with_source(&source, &targets, length, write, &settings)?);
    open_interruptibly(args, interrupts, open).await
}

/// [`plan_zero`], interruptible while it connects (see [`open_interruptibly`]).
///
/// # Errors
/// As [`plan_zero`], or the interruption.
pub async fn open_zero_plan(
    targets: &[DeviceAddress],
    length: Option<u64>,
    settings: &Settings,
    interrupts: &mut crate::progress::Interrupts,
) -> Result<ZeroPlan, CliError> {
    let (owned, settings) = (targets.to_vec(), settings.clone());
    open_interruptibly(targets, interrupts, move || Ok(plan_zero(&owned, length, &settings)?)).await
}

/// Runs `open` (opening devices, which for NBD exports means connecting and a handshake that
/// may take up to `--connect-timeout` per connection) on a thread of its own when `args` name
/// an NBD export, so that this thread goes on reading signals: Ctrl-C or SIGTERM ends the
/// wait at once with [`CliError::Interrupted`] (exit 130 or 143); the connecting thread is
/// left to the process's exit. Nothing is written before the devices are open, and files
/// are created only after every NBD export is open, so nothing is left behind.
///
/// # Errors
/// What `open` returns, or the interruption.
pub async fn open_interruptibly<'a, T: Send + 'static>(
    args: impl IntoIterator<Item = &'a DeviceAddress>,
    interrupts: &mut crate::progress::Interrupts,
    open: impl FnOnce() -> Result<T, CliError> + Send + 'static,
) -> Result<T, CliError> {
    if !args.into_iter().any(|arg| matches!(arg.backend, Backend::Nbd(_))) {
        return open();
    }
    let (opened_tx, opened_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("kcopyd-open".into())
        .spawn(move || {
            let _ = opened_tx.send(open());
        })
        .map_err(|source| CliError::Start { what: "the thread opening the devices", source })?;
    tokio::select! {
        opened = opened_rx => opened.expect("the opening thread sends its result"),
        code = interrupts.recv() => Err(CliError::Interrupted { what: "connecting to the NBD server", code }),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    /// The engine settings of `kcopyd copy ARGS…`.
    fn copy_settings(args: &[&str]) -> Settings {
        let cli = Cli::try_parse_from(["kcopyd", "copy"].iter().chain(args)).unwrap();
        let Command::Copy(copy) = cli.command else { panic!("not a copy: {args:?}") };
        settings(&copy.engine, std::iter::once(&copy.source).chain(&copy.targets)).unwrap()
    }

    #[test]
    fn nbd_devices_default_to_more_subjobs_in_flight_unless_asked() {
        let nbd = "nbd+unix:///?socket=/run/s.sock";
        assert_eq!(copy_settings(&["a.img", "b.img"]).config.subjobs_in_flight, SUBJOBS_IN_FLIGHT_DEFAULT);
        assert_eq!(copy_settings(&[nbd, "b.img"]).config.subjobs_in_flight, NBD_SUBJOBS_IN_FLIGHT_DEFAULT);
        assert_eq!(copy_settings(&["a.img", "b.img", nbd]).config.subjobs_in_flight, NBD_SUBJOBS_IN_FLIGHT_DEFAULT);
        let asked = copy_settings(&["--subjobs-in-flight", "2", nbd, "b.img"]);
        assert_eq!((asked.config.subjobs_in_flight, asked.queue_depth), (2, 2));
        assert_ne!(SUBJOBS_IN_FLIGHT_DEFAULT, NBD_SUBJOBS_IN_FLIGHT_DEFAULT);
        // And larger sub-jobs, as many as the default budget holds.
        let subjob = |args: &[&str]| copy_settings(args).config.subjob_size_bytes as u64;
        assert_eq!(subjob(&["a.img", "b.img"]), kcopyd_core::SUBJOB_SIZE_DEFAULT_BYTES as u64);
        assert_eq!(subjob(&[nbd, "b.img"]), NBD_SUBJOB_SIZE_DEFAULT_BYTES);
        assert_eq!(subjob(&["a.img", nbd]), NBD_SUBJOB_SIZE_DEFAULT_BYTES);
        assert_eq!(subjob(&["--subjob-size", "64K", nbd, "b.img"]), 64 << 10);
        let budget = kcopyd_core::ClientConfig::default().page_budget as u64 * kcopyd_core::PAGE_SIZE as u64;
        assert_eq!(NBD_SUBJOB_SIZE_DEFAULT_BYTES * NBD_SUBJOBS_IN_FLIGHT_DEFAULT as u64, budget);
    }

    #[test]
    fn the_budget_follows_the_subjobs_in_flight_unless_memory_is_given() {
        let nbd = "nbd+unix:///?socket=/run/s.sock";
        let budget = |args: &[&str]| copy_settings(args).config.page_budget * kcopyd_core::PAGE_SIZE;
        let mib = 1 << 20;
        assert_eq!(budget(&["a.img", "b.img"]), 16 * mib);
        assert_eq!(budget(&[nbd, "b.img"]), 16 * mib, "8 sub-jobs of 2M fit the default");
        assert_eq!(budget(&["--subjobs-in-flight", "16", nbd, "b.img"]), 32 * mib);
        assert_eq!(budget(&["--subjobs-in-flight", "16", "--subjob-size", "4M", "a.img", "b.img"]), 64 * mib);
        assert_eq!(budget(&["--subjobs-in-flight", "1024", "--subjob-size", "64M", "a.img", "b.img"]), 1024 * mib);
        assert_eq!(budget(&["--subjobs-in-flight", "2", "a.img", "b.img"]), 16 * mib, "never below the default");
        assert_eq!(budget(&["--memory", "16M", "--subjobs-in-flight", "16", nbd, "b.img"]), 16 * mib, "as given");
        assert_eq!(budget(&["--memory", "4K", "--subjob-size", "4K", "a.img", "b.img"]), 4096);
    }

    #[test]
    fn the_old_spelling_of_subjob_size_still_works_unlisted() {
        for option in ["--subjob-size", "--sub-job-size"] {
            assert_eq!(copy_settings(&[option, "64K", "a.img", "b.img"]).config.subjob_size_bytes, 64 << 10);
        }
        let mut command = <Cli as clap::CommandFactory>::command();
        let help = command.find_subcommand_mut("copy").unwrap().render_long_help().to_string();
        assert!(help.contains("--subjob-size") && !help.contains("sub-job-size"), "{help}");
    }
}
