//! `kcopyd sim calibrate`: measure a real device through O_DIRECT and fit the simulator's
//! timing model to it. The measuring is `kcopyd_sim::explore::calibrate`, the fit
//! `DiskModel::fit` and the scratch range `kcopyd_tool::scratch`; this file reads the
//! arguments, names refusals by their options and prints.
//!
//! ```text
//!  DEVICE (a file created here, or --scratch-* of an existing device) ─► Scratch
//!    ─► explore::calibrate::calibrate (fill, points, engine copies, fit) ─► progress bar
//!    ─► DiskModel (TOML) to --out or stdout; the table of measurements to stderr
//! ```

use std::fs;
use std::path::Path;
use std::time::Duration;

use kcopyd_sim::DiskModel;
use kcopyd_sim::explore::{
    self,
    calibrate::{CalibrateError, CalibrationPlan, QUEUE_DEPTH_MAX, SCRATCH_BYTES_MIN, SPREAD_WARNING, Step},
};
use kcopyd_tool::scratch::{Scratch, ScratchError};

pub use kcopyd_sim::explore::calibrate::Calibrated;

use crate::cli::CalibrateArgs;
use crate::error::{CliError, Status, open_reason};
use crate::progress;
use crate::progress::Interrupts;
use crate::size::Bytes;

/// Opens the scratch range (see [`Scratch::open`]); a file created here is removed also if
/// a signal quits the command at once (unless kept).
///
/// # Errors
/// The refusal, named by the argument or option at fault (exit 2).
pub fn open_scratch(
    path: &Path,
    size_bytes: u64,
    scratch_offset_bytes: u64,
    scratch_length_bytes: Option<u64>,
    keep: bool,
) -> Result<Scratch, CliError> {
    let hook = Some(crate::devices::quit_cleanup());
    Scratch::open(path, size_bytes, scratch_offset_bytes, scratch_length_bytes, keep, hook).map_err(scratch_error)
}

/// The command's error for a refused scratch range.
fn scratch_error(error: ScratchError) -> CliError {
    let what = |created: bool| if created { "--size" } else { "--scratch-length" };
    match error {
        ScratchError::Exists { path } => CliError::argument(
            "DEVICE",
            path.display().to_string(),
            "exists: calibration writes over what it measures; name the bytes it may overwrite with \
             --scratch-length (and --scratch-offset), or give a path that does not exist",
        ),
        ScratchError::RangeOfNew { path } => CliError::argument(
            "--scratch-length",
            path.display().to_string(),
            "applies to an existing device; a new file is created with --size",
        ),
        ScratchError::SizeNotSectors { size_bytes } => {
            CliError::argument("--size", size_bytes.to_string(), "not a multiple of 512 bytes")
        }
        ScratchError::Open { path, source } => CliError::Open {
            what: "DEVICE",
            text: path.display().to_string(),
            reason: open_reason(&source, None),
            source,
        },
        ScratchError::TooSmall { created, len_bytes } => {
            CliError::argument(what(created), len_bytes.to_string(), format!("less than {}", Bytes(SCRATCH_BYTES_MIN)))
        }
        ScratchError::Misaligned { path, offset_bytes, block_bytes } => CliError::argument(
            "--scratch-offset",
            offset_bytes.to_string(),
            format!(
                "the scratch range must be aligned to the {block_bytes}-byte logical block of '{}'",
                path.display()
            ),
        ),
        ScratchError::PastEnd { path, created, len_bytes, device_bytes } => CliError::argument(
            what(created),
            len_bytes.to_string(),
            format!("the scratch range runs past the end of '{}' at {device_bytes} bytes", path.display()),
        ),
    }
}

/// Measures every point of `plan` on `scratch` and fits a model, with a progress bar if
/// `bars`.
///
/// # Errors
/// A plan out of bounds, or an I/O error on the device.
pub async fn calibrate(scratch: &Scratch, plan: &CalibrationPlan, bars: bool) -> Result<Calibrated, CliError> {
    let range = explore::calibrate::ScratchRange {
        device: scratch.device.clone(),
        offset_bytes: scratch.offset_bytes,
        len_bytes: scratch.len_bytes,
    };
    plan.check(&range).map_err(plan_error)?;
    let bar = progress::byte_bar(bars, 1, "calibrate");
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg:<28} [{wide_bar}] {pos}/{len} points ETA {eta}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    let mut step = |step: Step| {
        bar.set_length(step.total);
        bar.set_position(step.done);
        bar.set_message(step.message);
    };
    let calibrated = explore::calibrate::calibrate(&range, plan, &mut step).await;
    bar.finish_and_clear();
    let mut calibrated = calibrated.map_err(plan_error)?;
    calibrated.model.one_device = scratch.device.kind() == kcopyd_os::DeviceKind::File;
    Ok(calibrated)
}

/// The command's error for a calibration's: the option at fault for a plan out of bounds,
/// the device for an I/O error.
fn plan_error(error: CalibrateError) -> CliError {
    match error {
        CalibrateError::IoSize { size_bytes, block_bytes } => CliError::argument(
            "--io-sizes",
            size_bytes.to_string(),
            format!(
                "each size must be a multiple of {block_bytes} bytes, at most {} and at most half the scratch range",
                Bytes(explore::calibrate::IO_SIZE_MAX_BYTES)
            ),
        ),
        CalibrateError::NothingToMeasure => {
            CliError::Arguments { what: "--io-sizes, --queue-depths", problem: "nothing to measure".into() }
        }
        CalibrateError::QueueDepth { depth } => {
            CliError::argument("--queue-depths", depth.to_string(), format!("must be 1 to {QUEUE_DEPTH_MAX}"))
        }
        CalibrateError::PointTime { point_time } => CliError::argument(
            "--point-time",
            format!("{point_time:?}"),
            format!(
                "must be from {} ms to {} s: each point is timed in {} windows",
                explore::calibrate::POINT_TIME_MIN.as_millis(),
                explore::calibrate::POINT_TIME_MAX.as_secs(),
                explore::calibrate::WINDOWS
            ),
        ),
        CalibrateError::Arena { source } => CliError::Start { what: "the buffer arena", source },
        CalibrateError::Client { source } => CliError::Config { option: "calibrate", source },
        CalibrateError::Submit { source } => CliError::Submit { source },
        CalibrateError::Io { operation, device, source } => CliError::Io { operation, path: device, source },
        other => CliError::Io { operation: "calibrate", path: String::new(), source: std::io::Error::other(other) },
    }
}

/// Warns on stderr when the rounds of a calibration disagree.
pub fn warn_if_busy(calibrated: &Calibrated) {
    if calibrated.spread > SPREAD_WARNING {
        crate::out::note(&format!(
            "kcopyd: warning: the rounds of a point differ by {:.0} % (the median over points): other work was using \
             the machine or the device, and the model describes it so; calibrate again when it is idle",
            calibrated.spread * 100.0
        ));
    }
}

/// Reads a model file.
///
/// # Errors
/// The file cannot be read or is not a disk model, named by `--model`.
pub fn load(path: &Path) -> Result<DiskModel, CliError> {
    explore::calibrate::read_model(path)
        .map_err(|error| CliError::argument("--model", path.display().to_string(), error.to_string()))
}

/// `kcopyd sim calibrate`.
///
/// # Errors
/// Bad arguments (nothing written), or an I/O error while measuring.
pub async fn run(args: &CalibrateArgs, interrupts: &mut Interrupts) -> Result<Status, CliError> {
    // Nothing of a calibration is worth waiting for: a signal quits at once, the scratch file
    // it created removed.
    interrupts.set_summary(Some(Box::new(|| {
        "kcopyd: interrupted: calibration stopped, no model written (a scratch file it created is removed)".to_owned()
    })));
    explore::calibrate::check_point_time(Duration::from_micros(args.point_time_us)).map_err(plan_error)?;
    if let Some(out) = &args.out {
        crate::progress::check_output_file(out, "--out")?;
    }
    let plan = CalibrationPlan {
        io_sizes_bytes: args.io_sizes_bytes.clone(),
        queue_depths: args.queue_depths.clone(),
        point_time: Duration::from_micros(args.point_time_us),
        rounds: usize::from(args.rounds),
    };
    let scratch =
        open_scratch(&args.device, args.size_bytes, args.scratch_offset_bytes, args.scratch_length_bytes, args.keep)?;
    if let Some(out) = &args.out {
        refuse_out_on_device(out, &args.device)?;
    }
    let calibrated = calibrate(&scratch, &plan, progress::bars_wanted(args.quiet)).await?;
    drop(scratch);
    warn_if_busy(&calibrated);
    let model = calibrated.model;
    let text = explore::calibrate::model_toml(&model);
    match &args.out {
        Some(path) => fs::write(path, &text).map_err(|source| CliError::Io {
            operation: "write the model",
            path: path.display().to_string(),
            source,
        })?,
        None => crate::out::print(&text)?,
    }
    if !args.quiet {
        crate::out::note_text(&explore::calibrate::model_table(&model));
    }
    Ok(Status::Success)
}

/// Refuses an `--out` that is the measured DEVICE under any name (the model would overwrite
/// what is measured, or the device hold a 2 KB model).
fn refuse_out_on_device(out: &Path, device: &Path) -> Result<(), CliError> {
    use std::os::unix::fs::MetadataExt;
    let (Ok(out_meta), Ok(device_meta)) = (fs::metadata(out), fs::metadata(device)) else { return Ok(()) };
    if (out_meta.dev(), out_meta.ino()) == (device_meta.dev(), device_meta.ino()) {
        return Err(CliError::argument(
            "--out",
            out.display().to_string(),
            format!("is DEVICE '{}' itself: the model would be written over what is measured", device.display()),
        ));
    }
    Ok(())
}
