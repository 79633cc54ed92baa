//! `kcopyd clone SOURCE DEST --metadata FILE --serve URI`: DEST becomes a copy of SOURCE
//! that is usable at once, served over NBD while it hydrates in the background (device-mapper's
//! dm-clone, as a command; the library is kcopyd-clone, the server kcopyd-nbd's).
//!
//! ```text
//!  arguments ─► open SOURCE (read-only) and DEST (created with SOURCE's length if missing)
//!     ─► FILE: open, flock, identity checked (clone/metadata_file.rs) ─► bind --serve
//!     ─► CloneDevice::create (new FILE) or ::open (resume from FILE's last commit)
//!     ─► serve over NBD ┬ hydrate in the background (progress: hydrated/total regions)
//!                       └ "hydration complete: DEST can be used directly" when done
//!  SIGINT/SIGTERM (or hydration complete with --exit-when-hydrated) ─► stop serving
//!     (requests read are answered) ─► flush: destination and metadata committed ─► exit
//! ```
//!
//! Exit status: 0 with `--exit-when-hydrated` once hydration is complete; 130 (SIGINT) or
//! 143 (SIGTERM) after a clean stop; 1 if the final flush failed, or with
//! `--exit-when-hydrated` if regions were given up on; 2 for bad usage (nothing written).

mod metadata_file;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kcopyd_clone::{CloneDevice, CloneDevices, CloneOptions, HydrationEnd};
use kcopyd_core::{BlockDevice, Client, Device, SECTOR_SIZE};
use kcopyd_nbd::{Address, NbdServer, NbdUri, ServerOptions};

use crate::cli::{EngineArgs, ThrottleArgs};
use crate::devices;
use crate::error::{CliError, Status};
use crate::progress::{self, Interrupts, Phase};
use crate::{out, size};
use kcopyd_tool::{Backend, DeviceAddress, Opened, Plan, Settings};
use metadata_file::{Identity, MetadataFile, State};

/// The region size by default: 64 KiB (16 384 regions, a 2 KiB bitmap, per GiB).
pub const REGION_SIZE_DEFAULT: &str = "64K";
/// Regions hydrated at once by default (4 MiB in flight at the default region size).
pub const HYDRATION_THRESHOLD_DEFAULT: u32 = 64;
/// Contiguous regions per copy job by default (1 MiB jobs at the default region size).
pub const HYDRATION_BATCH_SIZE_DEFAULT: u32 = 16;

/// Examples shown under `kcopyd clone --help`.
pub const CLONE_EXAMPLES: &str = "\
Examples:
  kcopyd clone nbd://backup-host/disk clone.img --metadata clone.meta --serve nbd+unix:///?socket=/run/clone.sock
      Serve clone.img at once over a unix socket while it fills from the remote export.
  kcopyd clone disk.img clone.img --metadata clone.meta --serve nbd://127.0.0.1:10809 --throttle-rate 50M
      The same on loopback TCP, hydrating at most 50 MB/s.

Run the same command again after a stop or a crash: it resumes from FILE.";

/// `kcopyd clone`.
#[derive(Debug, Clone, Args)]
pub struct CloneArgs {
    /// The device to clone (only ever read).
    #[arg(value_name = "SOURCE", value_parser = devices::parse_device)]
    pub source: DeviceAddress,
    /// The destination: a missing file is created with SOURCE's length.
    #[arg(value_name = "DEST", value_parser = devices::parse_device)]
    pub destination: DeviceAddress,
    /// The metadata file: created if missing; after a stop or a crash the same FILE resumes
    /// the clone. It records which SOURCE and DEST it is for and is refused for others.
    #[arg(long, value_name = "FILE")]
    pub metadata: PathBuf,
    /// Where to serve the clone: `nbd+unix:///[EXPORT]?socket=PATH` or
    /// `nbd://127.0.0.1:PORT[/EXPORT]` (loopback only: NBD has no authentication here).
    #[arg(long, value_name = "URI")]
    pub serve: String,
    /// Region size (a power of two, 4K to 1G) of a new clone [default: 64K]; a resumed clone
    /// keeps its own, and a different one given is refused.
    #[arg(long = "region-size", value_name = "SIZE", value_parser = size::parse_size)]
    pub region_size_bytes: Option<u64>,
    /// Regions hydrated at once.
    #[arg(long, value_name = "COUNT", default_value_t = HYDRATION_THRESHOLD_DEFAULT)]
    pub hydration_threshold: u32,
    /// Contiguous regions copied by one job.
    #[arg(long, value_name = "COUNT", default_value_t = HYDRATION_BATCH_SIZE_DEFAULT)]
    pub hydration_batch_size: u32,
    /// Background commits of the metadata at least this often while regions hydrate (a crash
    /// copies again what hydrated since the last commit); a flush from a client commits too.
    #[arg(long = "commit-interval", value_name = "DURATION", default_value = "1s", value_parser = size::parse_duration_us)]
    pub commit_interval_us: u64,
    /// Exit (status 0) once hydration is complete, instead of serving until a signal.
    #[arg(long)]
    pub exit_when_hydrated: bool,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
    /// Engine options (the hydration's copies).
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Throttle of the hydration.
    #[command(flatten)]
    pub throttle: ThrottleArgs,
}

/// What a checked clone has open.
struct Opening {
    source: Opened,
    destination: Opened,
    metadata: MetadataFile,
    /// Held until the end: DEST's and SOURCE's locks, DEST removed if created and refused.
    plan: Plan,
}

/// Runs `kcopyd clone`.
///
/// # Errors
/// Bad usage (exit 2, nothing written) or a failure to start.
pub async fn run(args: &CloneArgs, interrupts: &mut Interrupts) -> Result<Status, CliError> {
    let address = serve_address(&args.serve)?;
    let options = CloneOptions {
        hydration_threshold: args.hydration_threshold,
        hydration_batch_size: args.hydration_batch_size,
        commit_interval_ms: args.commit_interval_us / 1000,
        ..CloneOptions::default()
    };
    options.validate().map_err(|error| {
        let (option, value) = match &error {
            kcopyd_clone::CloneError::Option { name: "hydration_batch_size", value, .. } => {
                ("--hydration-batch-size", value)
            }
            kcopyd_clone::CloneError::Option { name: "commit_interval_ms", value, .. } => ("--commit-interval", value),
            kcopyd_clone::CloneError::Option { value, .. } => ("--hydration-threshold", value),
            _ => ("--hydration-threshold", &0),
        };
        CliError::argument(option, value.to_string(), error.to_string())
    })?;
    let mut settings =
        devices::with_throttle(devices::settings(&args.engine, [&args.source, &args.destination])?, &args.throttle)?;
    // A copy's write that timed out could land after a newer write from a client
    // (docs/CLONE.md): --io-timeout bounds only an NBD SOURCE's requests.
    settings.config.io_timeout_ms = None;
    let mut opening = open(args, &settings, interrupts).await?;
    let identity = identity_of(args, &opening)?;
    let server_options = ServerOptions { export_name: address.1.clone(), ..ServerOptions::default() };
    let client =
        Client::new(settings.config.clone()).map_err(|source| CliError::Config { option: "--memory", source })?;
    let clone = start_clone(&opening, &identity, client.clone(), options).await?;
    let device: Device = Arc::new(clone.clone());
    let server = NbdServer::bind(&address.0, device, server_options)
        .map_err(|e| CliError::argument("--serve", &args.serve, e.to_string()))?;
    // Serving: clients may write from now on; DEST and FILE stay whatever happens.
    opening.plan.created.keep();
    opening.metadata.keep();
    interrupts.set_phase(Phase::Graceful);
    out::note(&format!("kcopyd: serving the clone of '{}' at {}", args.destination.text, server.uri()));
    let status = serve(args, &clone, server, interrupts).await;
    let status = finish(&clone, status).await;
    client.shutdown().await;
    drop(opening);
    Ok(status)
}

/// The listening address of `--serve` and the export name; TCP only on loopback.
fn serve_address(text: &str) -> Result<(Address, String), CliError> {
    let uri = NbdUri::parse(text).map_err(|e| CliError::argument("--serve", text, e.to_string()))?;
    if let Address::Tcp { host, .. } = &uri.address {
        let loopback = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
        if !loopback {
            return Err(CliError::argument(
                "--serve",
                text,
                "only a loopback address (127.0.0.1, ::1, localhost) is served: NBD carries no authentication",
            ));
        }
    }
    Ok((uri.address, uri.export))
}

/// Opens SOURCE, DEST and FILE, and checks them together.
async fn open(args: &CloneArgs, settings: &Settings, interrupts: &mut Interrupts) -> Result<Opening, CliError> {
    for (what, arg) in [("SOURCE", &args.source), ("DEST", &args.destination)] {
        if arg.offset_bytes != 0 {
            return Err(CliError::argument(what, &arg.text, "a clone is of whole devices: no @OFFSET"));
        }
    }
    let created = matches!(&args.destination.backend,
        Backend::Path(path) if matches!(std::fs::symlink_metadata(path), Err(e) if e.kind() == std::io::ErrorKind::NotFound));
    let destination = std::slice::from_ref(&args.destination);
    let mut plan = devices::open_plan(&args.source, destination, None, true, settings, interrupts).await?;
    if !plan.tail.is_empty() {
        return Err(CliError::argument(
            "SOURCE",
            &args.source.text,
            format!("its length, {} bytes, is not whole logical blocks: a clone serves whole blocks", plan.len_bytes),
        ));
    }
    let source = plan.source.clone();
    let destination = plan.targets.remove(0);
    let files: Vec<(&str, (u64, u64))> = [(&source, "SOURCE"), (&destination, "DEST")]
        .into_iter()
        .filter(|(opened, _)| opened.is_file())
        .map(|(opened, name)| (name, (opened.device.id().major, opened.device.id().minor)))
        .collect();
    let metadata = MetadataFile::open(&args.metadata, &files)?;
    if created && metadata.existing.as_ref().is_some_and(|identity| identity.state == State::Ready) {
        return Err(CliError::argument(
            "--metadata",
            args.metadata.display().to_string(),
            format!(
                "records a clone, but DEST '{}' did not exist before this run: delete FILE to start over",
                args.destination.text
            ),
        ));
    }
    plan.targets.push(destination.clone());
    Ok(Opening { source, destination, metadata, plan })
}

/// The identity FILE must record (from the copy map's identity code), checked against what
/// FILE records if it exists.
fn identity_of(args: &CloneArgs, opening: &Opening) -> Result<Identity, CliError> {
    let targets = std::slice::from_ref(&opening.destination);
    let len_bytes = opening.source.device.geometry().len_sectors * SECTOR_SIZE as u64;
    let (header, guard) = kcopyd_tool::map::header_of(&opening.source, targets, len_bytes, &[false])?;
    let refuse = |problem: String| CliError::argument("--metadata", args.metadata.display().to_string(), problem);
    if let Some(reason) = guard.untrusted.first().copied().flatten() {
        if opening.metadata.existing.as_ref().is_some_and(|found| found.state == State::Ready) {
            return Err(refuse(format!("records a clone, but DEST {reason}: delete FILE to start over")));
        }
    }
    let region_size_bytes = match (&opening.metadata.existing, args.region_size_bytes) {
        (Some(found), Some(asked)) if found.state == State::Ready && found.region_size_bytes != asked => {
            return Err(refuse(format!(
                "records a clone in regions of {} bytes; --region-size {asked} cannot change it",
                found.region_size_bytes
            )));
        }
        (Some(found), None) if found.state == State::Ready => found.region_size_bytes,
        (_, asked) => asked.unwrap_or_else(|| size::parse_size(REGION_SIZE_DEFAULT).expect("a valid default")),
    };
    kcopyd_clone::check_region_size(region_size_bytes)
        .map_err(|e| CliError::argument("--region-size", region_size_bytes.to_string(), e.to_string()))?;
    let identity = Identity {
        state: State::Ready,
        region_size_bytes,
        source_name: header.source.name,
        source_id: header.source.id,
        destination_name: header.targets[0].name.clone(),
        destination_id: header.targets[0].id.clone(),
    };
    if let Some(found) = &opening.metadata.existing {
        check_same_devices(found, &identity).map_err(refuse)?;
    }
    Ok(identity)
}

/// Refuses a FILE recorded for other devices: their identities differ, or, for an NBD export
/// (whose identity is only its size and flags), its URI.
fn check_same_devices(found: &Identity, now: &Identity) -> Result<(), String> {
    let pairs = [
        ("SOURCE", &found.source_name, &found.source_id, &now.source_name, &now.source_id),
        ("DEST", &found.destination_name, &found.destination_id, &now.destination_name, &now.destination_id),
    ];
    for (what, found_name, found_id, name, id) in pairs {
        let nbd = id.starts_with("nbd ");
        if found_id != id || (nbd && found_name != name) {
            return Err(format!(
                "is the metadata of a clone of other devices: {what} was '{found_name}' ({found_id}), \
                 now '{name}' ({id}); delete FILE to start a new clone"
            ));
        }
    }
    Ok(())
}

/// Creates the clone (a new FILE, or one whose creation was cut short before anything was
/// served) or opens it from FILE's last commit.
async fn start_clone(
    opening: &Opening,
    identity: &Identity,
    client: Client,
    options: CloneOptions,
) -> Result<CloneDevice, CliError> {
    let path = opening.metadata.path_text();
    let refuse = |problem: String| CliError::argument("--metadata", &path, problem);
    let source = &opening.source.device;
    // Small, and every write is followed by a flush: through the page cache on any filesystem.
    let clone_bytes = kcopyd_clone::metadata_bytes_needed(
        source.geometry().len_sectors,
        identity.region_size_bytes,
        SECTOR_SIZE as u32,
    );
    let resume = opening.metadata.existing.as_ref().is_some_and(|found| found.state == State::Ready);
    if !resume {
        opening.metadata.write_identity(clone_bytes, &Identity { state: State::New, ..identity.clone() })?;
    }
    let metadata_options = kcopyd_os::OpenOptions { write: true, buffered: true, ..kcopyd_os::OpenOptions::default() };
    let metadata = kcopyd_os::OsDevice::open(&opening.metadata.path, &metadata_options)
        .map_err(|e| refuse(format!("cannot open it as a device ({e})")))?;
    let devices = CloneDevices {
        source: source.clone(),
        destination: opening.destination.device.clone(),
        metadata: Arc::new(metadata),
    };
    if resume {
        return CloneDevice::open(devices, client, options).await.map_err(|e| refuse(e.to_string()));
    }
    let clone = CloneDevice::create(devices, identity.region_size_bytes, client, options)
        .await
        .map_err(|e| refuse(e.to_string()))?;
    let len_bytes = opening.metadata.len_bytes().map_err(|e| refuse(format!("cannot look at it ({e})")))?;
    opening.metadata.write_identity(len_bytes - metadata_file::IDENTITY_BYTES, identity)?;
    Ok(clone)
}

/// Serves until a signal, or until hydration is complete with `--exit-when-hydrated`; shows
/// the hydration's progress meanwhile.
async fn serve(args: &CloneArgs, clone: &CloneDevice, server: NbdServer, interrupts: &mut Interrupts) -> Status {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.serve(async move {
        let _ = stopped.await;
    }));
    let mut hydration = Some(tokio::spawn({
        let clone = clone.clone();
        async move { clone.run_hydration().await }
    }));
    let bar = region_bar(!args.quiet && progress::bars_wanted(args.quiet), clone.status().regions_total);
    let mut tick = tokio::time::interval(progress::REFRESH_INTERVAL);
    let status = loop {
        tokio::select! {
            code = interrupts.recv() => break Status::Interrupted(code),
            end = async { hydration.as_mut().expect("polled only while running").await }, if hydration.is_some() => {
                hydration = None;
                bar.set_position(clone.status().regions_hydrated);
                bar.finish_and_clear();
                match hydration_ended(args, end) {
                    Some(status) => break status,
                    None => continue,
                }
            }
            _ = tick.tick() => bar.set_position(clone.status().regions_hydrated),
        }
    };
    bar.finish_and_clear();
    let _ = stop.send(());
    let _ = serving.await;
    clone.stop_hydration();
    if let Some(hydration) = hydration {
        let _ = hydration.await;
    }
    status
}

/// Tells how hydration ended; the status to exit with if the command ends here.
fn hydration_ended(args: &CloneArgs, end: Result<HydrationEnd, tokio::task::JoinError>) -> Option<Status> {
    match end {
        Ok(HydrationEnd::Complete) => {
            out::note(&format!("kcopyd: hydration complete: DEST '{}' can be used directly", args.destination.text));
            args.exit_when_hydrated.then_some(Status::Success)
        }
        Ok(HydrationEnd::GaveUp { regions }) => {
            let shown: Vec<String> = regions.iter().take(10).map(u64::to_string).collect();
            out::error(&format!(
                "kcopyd: hydration gave up on {} regions (the source could not be read there): {}{}; they are still \
                 read from the source",
                regions.len(),
                shown.join(", "),
                if regions.len() > 10 { ", …" } else { "" }
            ));
            args.exit_when_hydrated.then_some(Status::Failed)
        }
        Ok(_) => None,
        Err(error) => {
            out::error(&format!("kcopyd: the hydration stopped: {error}"));
            args.exit_when_hydrated.then_some(Status::Failed)
        }
    }
}

/// The final flush (destination, then the metadata's commit) and the last line.
async fn finish(clone: &CloneDevice, status: Status) -> Status {
    let flushed = clone.flush().await;
    let state = clone.status();
    match flushed {
        Ok(()) => {
            out::note(&format!(
                "kcopyd: clone stopped: {}/{} regions hydrated{}; metadata committed",
                state.regions_hydrated,
                state.regions_total,
                if state.hydration_complete { " (complete)" } else { "" }
            ));
            status
        }
        Err(error) => {
            out::error(&format!("kcopyd: the final flush failed: {error}; the next run resumes from the last commit"));
            Status::Failed
        }
    }
}

/// A bar of hydrated regions on stderr, or a hidden one.
fn region_bar(visible: bool, total_regions: u64) -> ProgressBar {
    let target = if visible { ProgressDrawTarget::stderr_with_hz(10) } else { ProgressDrawTarget::hidden() };
    let bar = ProgressBar::with_draw_target(Some(total_regions), target);
    let style = ProgressStyle::with_template("hydrating [{wide_bar}] {pos}/{len} regions ETA {eta}")
        .expect("a valid template")
        .progress_chars("=> ");
    bar.set_style(style);
    bar.enable_steady_tick(Duration::from_millis(500));
    bar
}
