//! From the command's arguments to a plan: the engine options checked into [`Settings`], the
//! plan of `kcopyd-tool` opened interruptibly, and its errors named by the options at fault.
//!
//! ```text
//!  EngineArgs, ThrottleArgs ─► settings() ─► Settings (+ the Ctrl-C handler's file cleanup)
//!  SOURCE TARGET... --length ─► open_plan / open_zero_plan ─► kcopyd_tool::plan_* (on a
//!    thread of its own when an NBD export must connect, so that Ctrl-C ends the wait)
//!  PlanError ─► CliError (exit 2, nothing written)
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kcopyd_core::{ClientConfig, PAGE_SIZE};
use kcopyd_nbd::{NbdUri, TlsOptions};
use kcopyd_os::{IoEngine, QUEUE_DEPTH_MAX};
use kcopyd_tool::{
    AddressError, Backend, CreatedHook, DeviceAddress, NbdSettings, Plan, PlanError, Settings, ZeroPlan,
};
use kcopyd_tool::{plan_with_source, plan_zero};

use crate::cli::{
    EngineArgs, IoEngineArg, NBD_CONNECTIONS_DEFAULT, NBD_CONNECTIONS_MANY_EXPORTS, NBD_MANY_EXPORTS,
    NBD_SUBJOBS_IN_FLIGHT_DEFAULT, SUBJOBS_IN_FLIGHT_DEFAULT, ThrottleArgs,
};
use crate::error::{CliError, open_reason};
use crate::size::Bytes;
use crate::{out, progress};

/// The largest page budget the engine takes (`ClientConfig::validate` counts pages in 32 bits):
/// 16 TiB less one page.
pub const MEMORY_PAGES_MAX: u64 = u32::MAX as u64;

/// Reads a device argument (clap's value parser): `sim:` options by [`kcopyd_sim::spec::SimSpec`].
///
/// # Errors
/// A malformed argument, named.
pub fn parse_device(text: &str) -> Result<DeviceAddress, AddressError> {
    DeviceAddress::parse(text, &kcopyd_tool::address::parse_sim_spec)
}

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

/// `--connections`, `--connect-timeout` and `--io-timeout`, checked: 1 to
/// [`kcopyd_nbd::CONNECTIONS_MAX`] connections, at least a millisecond each timeout. Without
/// `--connections`, a command naming `nbd_exports` exports gets [`NBD_CONNECTIONS_DEFAULT`]
/// per export, or [`NBD_CONNECTIONS_MANY_EXPORTS`] from [`NBD_MANY_EXPORTS`] exports on.
///
/// # Errors
/// A count or a timeout out of bounds, named by its option.
fn nbd_settings(args: &EngineArgs, nbd_exports: usize) -> Result<NbdSettings, CliError> {
    let millis = |option: &'static str, us: u64| {
        if us < 1000 {
            return Err(CliError::argument(option, format!("{us}us"), "must be at least 1ms"));
        }
        Ok(us / 1000)
    };
    let connections_max = match args.connections.map(usize::try_from) {
        None if nbd_exports >= NBD_MANY_EXPORTS => NBD_CONNECTIONS_MANY_EXPORTS,
        None => NBD_CONNECTIONS_DEFAULT,
        Some(Ok(count @ 1..=kcopyd_nbd::CONNECTIONS_MAX)) => count,
        Some(_) => {
            return Err(CliError::argument(
                "--connections",
                args.connections.unwrap_or_default().to_string(),
                format!("must be 1 to {}", kcopyd_nbd::CONNECTIONS_MAX),
            ));
        }
    };
    Ok(NbdSettings {
        connections_max,
        connect_timeout_ms: millis("--connect-timeout", args.connect_timeout_us)?,
        io_timeout_ms: args.io_timeout_us.map(|us| millis("--io-timeout", us)).transpose()?,
        tls: TlsOptions {
            certificates: args.tls_certificates.clone(),
            verify_peer: args.tls_verify_peer,
            hostname: args.tls_hostname.clone(),
        },
    })
}

/// Refuses `--tls-*` options when no device is an `nbds://` or `nbds+unix://` export (a
/// plain `nbd://` one is never encrypted, whatever the options say), and warns on standard
/// error of each TLS export whose server's certificate will not be verified.
///
/// # Errors
/// A `--tls-*` option without a TLS device, named.
fn check_tls(args: &EngineArgs, defaults: &TlsOptions, devices: &[&DeviceAddress]) -> Result<(), CliError> {
    let tls_devices: Vec<(&str, TlsOptions)> = devices
        .iter()
        .filter_map(|device| match &device.backend {
            Backend::Nbd(uri) => NbdUri::parse(uri).ok()?.tls.map(|tls| (uri.as_str(), tls.or(defaults))),
            _ => None,
        })
        .collect();
    if tls_devices.is_empty() {
        let given = [
            ("--tls-certificates", args.tls_certificates.as_ref().map(|dir| dir.display().to_string())),
            ("--tls-verify-peer", args.tls_verify_peer.map(|on| if on { "on" } else { "off" }.to_owned())),
            ("--tls-hostname", args.tls_hostname.clone()),
        ];
        if let Some((option, Some(text))) = given.into_iter().find(|(_, text)| text.is_some()) {
            return Err(CliError::argument(
                option,
                text,
                "no nbds:// or nbds+unix:// device to use it with (nbd:// is never encrypted)",
            ));
        }
    }
    for (uri, _) in tls_devices.iter().filter(|(_, tls)| !tls.verifies_peer()) {
        out::note(&format!(
            "kcopyd: warning: {uri}: the server's certificate is not verified (tls-verify-peer off): \
             the data is encrypted, but the server may be anyone"
        ));
    }
    Ok(())
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

/// Refuses a `--memory` of less than a page or more than the engine counts.
///
/// # Errors
/// `--memory` out of bounds.
pub fn check_memory(memory_bytes: u64) -> Result<(), CliError> {
    let refuse = |problem: String| Err(CliError::argument("--memory", memory_bytes.to_string(), problem));
    if memory_bytes < PAGE_SIZE as u64 {
        return refuse(format!("{} is less than one {PAGE_SIZE}-byte page", Bytes(memory_bytes)));
    }
    let memory_bytes_max = MEMORY_PAGES_MAX * PAGE_SIZE as u64;
    if memory_bytes > memory_bytes_max {
        return refuse(format!(
            "{} is more than the largest budget, {} ({memory_bytes_max} bytes)",
            Bytes(memory_bytes),
            Bytes(memory_bytes_max)
        ));
    }
    Ok(())
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
/// NBD exports get [`NBD_SUBJOBS_IN_FLIGHT_DEFAULT`] sub-jobs in flight).
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
    check_memory(args.memory_bytes)?;
    let nbd = nbd_settings(args, nbd_exports)?;
    check_tls(args, &nbd.tls, &devices)?;
    let config = ClientConfig {
        page_budget: usize::try_from(args.memory_bytes / PAGE_SIZE as u64).unwrap_or(usize::MAX),
        subjob_size_bytes: usize::try_from(args.subjob_size_bytes).unwrap_or(usize::MAX),
        subjobs_in_flight,
        huge_pages: !args.no_huge_pages,
        io_timeout_ms: nbd.io_timeout_ms,
        ..ClientConfig::default()
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
