//! `kcopyd sim calibrate`: measure a real device through O_DIRECT and fit the simulator's
//! timing model to it. The measuring is `kcopyd_sim::explore::calibrate` and the fit
//! `DiskModel::fit`; this file opens the scratch range, reads the arguments and prints.
//!
//! ```text
//!  DEVICE (a file created here, or --scratch-* of an existing device) ─► Scratch
//!    ─► explore::calibrate::calibrate (fill, points, engine copies, fit) ─► progress bar
//!    ─► DiskModel (TOML) to --out or stdout; the table of measurements to stderr
//! ```

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kcopyd_core::{BlockDevice, SECTOR_SIZE};
use kcopyd_os::{OpenOptions, OsDevice};
use kcopyd_sim::DiskModel;
use kcopyd_sim::explore::{
    self,
    calibrate::{CalibrateError, QUEUE_DEPTH_MAX, SCRATCH_BYTES_MIN, SPREAD_WARNING, Step},
};

pub use kcopyd_sim::explore::calibrate::Calibrated;

use crate::cli::CalibrateArgs;
use crate::error::{CliError, Status, open_reason};
use crate::progress;
use crate::progress::Interrupts;
use crate::size::Bytes;

/// What calibration measures, and whether it shows a progress bar.
#[derive(Debug, Clone)]
pub struct Plan {
    /// I/O sizes.
    pub io_sizes_bytes: Vec<u64>,
    /// Requests in flight.
    pub queue_depths: Vec<usize>,
    /// How long each point runs.
    pub point_time: Duration,
    /// Rounds over every point; each point's median counts.
    pub rounds: usize,
    /// Show a progress bar.
    pub bars: bool,
}

/// The range calibration may overwrite, and the file it created, removed when dropped
/// unless kept.
#[derive(Debug)]
pub struct Scratch {
    /// The device.
    pub device: Arc<OsDevice>,
    /// Where the range starts.
    pub offset_bytes: u64,
    /// Its length.
    pub len_bytes: u64,
    /// The file created for it, if any.
    created: Option<PathBuf>,
    keep: bool,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let (Some(path), false) = (&self.created, self.keep) {
            let _ = fs::remove_file(path);
            progress::forget_created(std::slice::from_ref(path));
        }
    }
}

impl Scratch {
    /// Opens the scratch range: a new file of `size_bytes` at `path` if nothing is there,
    /// else `scratch_length_bytes` of the existing device from `scratch_offset_bytes`.
    ///
    /// # Errors
    /// An existing device without a scratch length, a range off the device or misaligned, a
    /// size too small, or a failed open.
    pub fn open(
        path: &Path,
        size_bytes: u64,
        scratch_offset_bytes: u64,
        scratch_length_bytes: Option<u64>,
        keep: bool,
    ) -> Result<Scratch, CliError> {
        let text = path.display().to_string();
        let exists = fs::symlink_metadata(path).is_ok();
        let open_error =
            |source| CliError::Open { what: "DEVICE", text: text.clone(), reason: open_reason(&source, None), source };
        let options = OpenOptions { write: true, queue_depth: QUEUE_DEPTH_MAX * 2, ..OpenOptions::default() };
        let (device, offset_bytes, len_bytes, created) = if exists {
            let Some(len_bytes) = scratch_length_bytes else {
                return Err(CliError::argument(
                    "DEVICE",
                    &text,
                    "exists: calibration writes over what it measures; name the bytes it may overwrite with \
                     --scratch-length (and --scratch-offset), or give a path that does not exist",
                ));
            };
            let device = OsDevice::open(path, &options).map_err(open_error)?;
            (device, scratch_offset_bytes, len_bytes, None)
        } else {
            if scratch_length_bytes.is_some() || scratch_offset_bytes != 0 {
                return Err(CliError::argument(
                    "--scratch-length",
                    &text,
                    "applies to an existing device; a new file is created with --size",
                ));
            }
            if size_bytes % SECTOR_SIZE as u64 != 0 {
                return Err(CliError::argument("--size", size_bytes.to_string(), "not a multiple of 512 bytes"));
            }
            let options = OpenOptions { create_len: Some(size_bytes), ..options };
            // Removed also if a signal quits the command at once (unless kept).
            let creating = (!keep).then(|| progress::CreatedGuard::creating(path));
            let opened = OsDevice::open(path, &options);
            drop(creating);
            // Created (or half-created) here: removed on every way out unless kept.
            let created = Some(path.to_path_buf());
            let device = match opened {
                Ok(device) => device,
                Err(source) => {
                    let _ = fs::remove_file(path);
                    return Err(open_error(source));
                }
            };
            (device, 0, size_bytes, created)
        };
        let scratch = Scratch { device: Arc::new(device), offset_bytes, len_bytes, created, keep };
        scratch.check(&text)?;
        Ok(scratch)
    }

    fn check(&self, text: &str) -> Result<(), CliError> {
        let geometry = self.device.geometry();
        let block = u64::from(geometry.logical_block_size);
        let device_bytes = geometry.len_sectors * SECTOR_SIZE as u64;
        let what = if self.created.is_some() { "--size" } else { "--scratch-length" };
        if self.len_bytes < SCRATCH_BYTES_MIN {
            return Err(CliError::argument(
                what,
                self.len_bytes.to_string(),
                format!("less than {}", Bytes(SCRATCH_BYTES_MIN)),
            ));
        }
        if self.offset_bytes % block != 0 || self.len_bytes % block != 0 {
            return Err(CliError::argument(
                "--scratch-offset",
                self.offset_bytes.to_string(),
                format!("the scratch range must be aligned to the {block}-byte logical block of '{text}'"),
            ));
        }
        if self.offset_bytes.checked_add(self.len_bytes).is_none_or(|end| end > device_bytes) {
            return Err(CliError::argument(
                what,
                self.len_bytes.to_string(),
                format!("the scratch range runs past the end of '{text}' at {device_bytes} bytes"),
            ));
        }
        Ok(())
    }
}

/// Measures every point of `plan` on `scratch` and fits a model.
///
/// # Errors
/// A plan out of bounds, or an I/O error on the device.
pub async fn calibrate(scratch: &Scratch, plan: &Plan) -> Result<Calibrated, CliError> {
    let library_plan = explore::calibrate::Plan {
        io_sizes_bytes: plan.io_sizes_bytes.clone(),
        queue_depths: plan.queue_depths.clone(),
        point_time: plan.point_time,
        rounds: plan.rounds,
    };
    let range = explore::calibrate::Scratch {
        device: scratch.device.clone(),
        offset_bytes: scratch.offset_bytes,
        len_bytes: scratch.len_bytes,
    };
    library_plan.check(&range).map_err(plan_error)?;
    let bar = progress::byte_bar(plan.bars, 1, "calibrate");
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
    let calibrated = explore::calibrate::calibrate(&range, &library_plan, &mut step).await;
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

/// The model as TOML, with a header saying what it is.
pub fn to_toml(model: &DiskModel) -> String {
    let body = toml::to_string(model).expect("a disk model serializes");
    format!("# kcopyd disk model: load it with `kcopyd sim validate --model` or in a scenario.\n{body}")
}

/// Reads a model file.
///
/// # Errors
/// The file cannot be read or is not a disk model.
pub fn load(path: &Path) -> Result<DiskModel, CliError> {
    let text = path.display().to_string();
    let body = fs::read_to_string(path)
        .map_err(|error| CliError::argument("--model", text.clone(), format!("cannot be read: {error}")))?;
    toml::from_str(&body)
        .map_err(|error| CliError::argument("--model", text, error.to_string().trim_end().replace('\n', " ")))
}

/// A table of the measurements and the fitted model, for people.
pub fn human(model: &DiskModel) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ =
        writeln!(out, "{:<12} {:>8} {:>6} {:>12} {:>10} {:>10}", "kind", "io size", "depth", "MB/s", "IOPS", "p50 µs");
    for m in &model.measurements {
        let _ = writeln!(
            out,
            "{:<12} {:>8} {:>6} {:>12.1} {:>10.0} {:>10.0}",
            m.kind,
            Bytes(m.io_size_bytes).to_string(),
            m.queue_depth,
            m.bandwidth_bytes_per_s / 1e6,
            m.iops,
            m.latency_us_p50
        );
    }
    let l = &model.latency;
    let _ = writeln!(
        out,
        "model: reads {:.0} MB/s, cost {} µs, path overhead {} µs; writes {:.0} MB/s, cost {} µs, path overhead {} µs; \
         cost {:+} µs per MiB; reads and writes {}; seek {}",
        l.read.bandwidth_bytes_per_s as f64 / 1e6,
        l.read.cost_us,
        l.path.read_overhead_us,
        l.write.bandwidth_bytes_per_s as f64 / 1e6,
        l.write.cost_us,
        l.path.write_overhead_us,
        l.path.cost_us_per_mib,
        if l.path.shared { "share one data path" } else { "have a path each" },
        if l.path.seek.is_zero() {
            "none".to_owned()
        } else {
            format!("{} µs full stroke", l.path.seek.full_stroke_us)
        },
    );
    out
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
        crate::out::check_output_file(out, "--out")?;
    }
    let plan = Plan {
        io_sizes_bytes: args.io_sizes_bytes.clone(),
        queue_depths: args.queue_depths.clone(),
        point_time: Duration::from_micros(args.point_time_us),
        rounds: usize::from(args.rounds),
        bars: progress::bars_wanted(args.quiet),
    };
    let scratch =
        Scratch::open(&args.device, args.size_bytes, args.scratch_offset_bytes, args.scratch_length_bytes, args.keep)?;
    if let Some(out) = &args.out {
        refuse_out_on_device(out, &args.device)?;
    }
    let calibrated = calibrate(&scratch, &plan).await?;
    drop(scratch);
    warn_if_busy(&calibrated);
    let model = calibrated.model;
    let text = to_toml(&model);
    match &args.out {
        Some(path) => fs::write(path, &text).map_err(|source| CliError::Io {
            operation: "write the model",
            path: path.display().to_string(),
            source,
        })?,
        None => crate::out::print(&text)?,
    }
    if !args.quiet {
        crate::out::note_text(&human(&model));
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
