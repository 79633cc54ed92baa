//! `kcopyd clone SOURCE DEST --metadata FILE --serve URI`: DEST becomes a copy of SOURCE
//! that is usable at once, served over NBD while it hydrates in the background (device-mapper's
//! dm-clone, as a command; the library is kcopyd-clone, the server kcopyd-nbd's).
//!
//! ```text
//!  arguments ─► open SOURCE (read-only) and DEST (created with SOURCE's length if missing)
//!     ─► FILE: open, flock, identity checked (kcopyd_tool::clone) ─► bind --serve
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

use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kcopyd_clone::{CloneDevice, CloneOptions, HydrationEnd};
use kcopyd_core::{BlockDevice, Client, Device};
use kcopyd_nbd::{NbdServer, ServerOptions};

use crate::cli::CloneArgs;
use crate::devices;
use crate::error::{CliError, Status};
use crate::out;
use crate::progress::{self, Interrupts, SignalPhase};
use kcopyd_tool::clone::{self, CloneRequest, CloneSetupError, MetadataError};

/// Runs `kcopyd clone`.
///
/// # Errors
/// Bad usage (exit 2, nothing written) or a failure to start.
pub async fn run(args: &CloneArgs, interrupts: &mut Interrupts) -> Result<Status, CliError> {
    let address =
        clone::serve_address(&args.serve).map_err(|e| CliError::argument("--serve", &args.serve, e.to_string()))?;
    let options = CloneOptions {
        hydration_threshold: args.hydration_threshold,
        hydration_batch_size: args.hydration_batch_size,
        commit_interval_ms: args.commit_interval_us / 1000,
        ..CloneOptions::default()
    };
    options.validate().map_err(option_error)?;
    let mut settings =
        devices::with_throttle(devices::settings(&args.engine, [&args.source, &args.destination])?, &args.throttle)?;
    // A copy's write that timed out could land after a newer write from a client
    // (docs/CLONE.md): --io-timeout bounds only an NBD SOURCE's requests.
    settings.config.io_timeout_ms = None;
    let request = CloneRequest {
        source: args.source.clone(),
        destination: args.destination.clone(),
        metadata: args.metadata.clone(),
        region_size_bytes: args.region_size_bytes,
    };
    request.check().map_err(setup_error)?;
    let created = request.destination_missing();
    let destination = std::slice::from_ref(&args.destination);
    let plan = devices::open_plan(&args.source, destination, None, true, &settings, interrupts).await?;
    let mut opening = clone::open(&request, plan, created, settings.created_hook.clone()).map_err(setup_error)?;
    let identity = clone::identity_of(&request, &opening).map_err(setup_error)?;
    let server_options = ServerOptions { export_name: address.1.clone(), ..ServerOptions::default() };
    let client =
        Client::new(settings.config.clone()).map_err(|source| CliError::Config { option: "--memory", source })?;
    let clone = clone::start(&opening, &identity, client.clone(), options).await.map_err(setup_error)?;
    let device: Device = Arc::new(clone.clone());
    let server = NbdServer::bind(&address.0, device, server_options)
        .map_err(|e| CliError::argument("--serve", &args.serve, e.to_string()))?;
    // Serving: clients may write from now on; DEST and FILE stay whatever happens.
    opening.keep();
    interrupts.set_phase(SignalPhase::Graceful);
    out::note(&format!("kcopyd: serving the clone of '{}' at {}", args.destination.text, server.uri()));
    let status = serve(args, &clone, server, interrupts).await;
    let status = finish(&clone, status).await;
    client.shutdown().await;
    drop(opening);
    Ok(status)
}

/// A refused clone option, named by its command-line option.
fn option_error(error: kcopyd_clone::CloneError) -> CliError {
    let (option, value) = match &error {
        kcopyd_clone::CloneError::Option { name: "hydration_batch_size", value, .. } => {
            ("--hydration-batch-size", value)
        }
        kcopyd_clone::CloneError::Option { name: "commit_interval_ms", value, .. } => ("--commit-interval", value),
        kcopyd_clone::CloneError::Option { value, .. } => ("--hydration-threshold", value),
        _ => ("--hydration-threshold", &0),
    };
    CliError::argument(option, value.to_string(), error.to_string())
}

/// A refused clone, named by the argument at fault (exit 2), or a failed write (exit 1).
fn setup_error(error: CloneSetupError) -> CliError {
    match error {
        CloneSetupError::Offset { what, text } => {
            CliError::argument(what, text, "a clone is of whole devices: no @OFFSET")
        }
        CloneSetupError::PartialBlock { text, len_bytes } => {
            let problem =
                format!("its length, {len_bytes} bytes, is not whole logical blocks: a clone serves whole blocks");
            CliError::argument("SOURCE", text, problem)
        }
        CloneSetupError::Metadata { path, problem } => match *problem {
            MetadataError::Write(source) => CliError::Io { operation: "writing", path, source },
            problem => CliError::argument("--metadata", path, problem.to_string()),
        },
        CloneSetupError::RegionSize { region_size_bytes, source } => {
            CliError::argument("--region-size", region_size_bytes.to_string(), source.to_string())
        }
        CloneSetupError::Identify(error) => error.into(),
    }
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
