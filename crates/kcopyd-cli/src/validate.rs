//! `kcopyd sim validate`: the same copies on the real device and in the simulator, side by
//! side, so that the disk model's predictions carry a measured error.
//!
//! ```text
//!  model (--model, or calibrate a scratch file next to TARGET)
//!  real:      warm-up copy, then --runs rounds × configurations, alternating  ─► median s
//!  simulated: each configuration once in virtual time, sparse pattern disks,
//!             one Medium when SOURCE and TARGET are on one device            ─► model s
//!  error = (predicted − measured) / measured
//! ```
//!
//! The real copies go through `kcopyd copy` itself (the same checks, engine, flush and
//! timing), so a prediction is compared with exactly what a user sees. The configurations,
//! the prediction and the rows are kcopyd-sim's `explore::validate`; this file runs the real
//! copies and prints.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use kcopyd_core::{BlockDevice, SECTOR_SIZE};
use kcopyd_os::{OpenOptions, OsDevice};
use kcopyd_sim::explore::validate::{self, Config, ConfigsError, Row, Validation};

use crate::calibrate;
use crate::cli::ValidateArgs;
use crate::error::{CliError, Status, open_reason};
use crate::progress::{self, Interrupts};
use crate::{commands, devices};
use kcopyd_os::FileKey;
use kcopyd_sim::explore::calibrate::CalibrationPlan;
use kcopyd_tool::DeviceAddress;

/// A `--configs` or `--runs` refused by kcopyd-sim's `validate`, named by its option.
pub fn configs_error(error: ConfigsError) -> CliError {
    match error {
        ConfigsError::Config { text, problem } => CliError::argument("--configs", text, problem.to_string()),
        ConfigsError::NoConfig => CliError::Arguments { what: "--configs", problem: error.to_string() },
        ConfigsError::Runs { runs } => CliError::argument("--runs", runs.to_string(), error.to_string()),
    }
}

/// Target files of the configurations: TARGET, TARGET.2, TARGET.3, …; those created here are
/// removed when this is dropped.
#[derive(Debug)]
struct Targets {
    paths: Vec<PathBuf>,
    created: MadeFiles,
}

impl Targets {
    fn new(target: &Path, count: usize) -> Targets {
        let paths = validate::target_paths(target, count);
        let missing = paths.iter().filter(|p| fs::symlink_metadata(p).is_err()).map(|p| (p.clone(), None));
        let created = MadeFiles(Mutex::new(missing.collect()));
        progress::remove_on_quit(&created.files());
        Targets { paths, created }
    }
}

impl Drop for Targets {
    fn drop(&mut self) {
        let made = self.created.0.lock().unwrap_or_else(PoisonError::into_inner);
        // Only the files a copy opened, while their names still hold them: one renamed over
        // a name meanwhile is someone else's.
        for (path, id) in made.iter() {
            if let Some(id) = id {
                kcopyd_tool::remove_created(path, Some(*id));
            }
        }
        progress::forget_created(&made.iter().map(|(path, _)| path.clone()).collect::<Vec<_>>());
    }
}

/// Files to be made for the targets of the copies, and which file each is once a copy has
/// opened it (until then it is not known to be this command's, and is not removed).
#[derive(Debug, Default)]
pub struct MadeFiles(Mutex<Vec<(PathBuf, Option<FileKey>)>>);

impl MadeFiles {
    fn files(&self) -> Vec<(PathBuf, Option<FileKey>)> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Records which file each one is, from the targets `plan` created (exclusively: a file
    /// another program made there first is not taken for one of these).
    fn identify(&self, plan: &kcopyd_tool::Plan) {
        let mut made = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let created =
            plan.targets.iter().zip(&plan.created_targets).filter(|(target, created)| **created && target.is_file());
        for (target, _) in created {
            let Some(facts) = &target.os else { continue };
            let id = (target.device.id().major, target.device.id().minor);
            for (_, known) in made.iter_mut().filter(|(path, known)| *path == facts.path && known.is_none()) {
                *known = Some(id);
            }
        }
    }
}

/// What one real copy came to: its seconds, and the source's length and block size (for the
/// simulated copy).
#[derive(Debug, Clone, Copy)]
pub struct Copied {
    /// Seconds of the job and its flush, as `kcopyd copy` reports them.
    pub seconds: f64,
    /// Bytes copied.
    pub len_bytes: u64,
    /// The source's logical block size.
    pub block_bytes: u32,
}

/// Runs the copy of `config` from `source` to the first `config.targets` of `targets` through
/// `kcopyd copy` with `memory_bytes` of buffers. `created` are the files made for the targets,
/// removed if a signal quits between copies (each once a copy has opened it, while its name
/// still holds it). The copy's status when it did not succeed.
pub async fn copy_once(
    (source, targets): (&DeviceAddress, &[DeviceAddress]),
    config: Config,
    memory_bytes: u64,
    created: &MadeFiles,
    interrupts: &mut Interrupts,
) -> Result<Result<Copied, Status>, CliError> {
    kcopyd_tool::options::check_memory(memory_bytes).map_err(devices::option_error)?;
    let client_config =
        kcopyd_tool::options::client_config(memory_bytes, config.subjob_size_bytes, config.subjobs_in_flight);
    client_config.validate().map_err(|source| CliError::Config { option: "--memory", source })?;
    let settings = kcopyd_tool::Settings::new(client_config);
    // A full copy, as the simulated one: the disk model times every sector read.
    let options = kcopyd_tool::run::CopyOptions::default();
    let mut plan = devices::open_plan(source, &targets[..config.targets], None, true, &settings, interrupts).await?;
    created.identify(&plan);
    let (len_bytes, block_bytes) = (plan.len_bytes, plan.source.device.geometry().logical_block_size);
    let done = commands::copy_planned(&mut plan, &settings, options, true, interrupts).await;
    // Between copies (the simulation, the table) a signal quits at once; the files made for
    // the targets go with it (the copy forgot the ones it created when its job started).
    let files = created.files();
    progress::remove_on_quit(&files);
    let removed = if files.is_empty() { "" } else { " (the target files it created are removed)" };
    interrupts
        .set_summary(Some(Box::new(move || format!("kcopyd: interrupted: validation stopped, no table{removed}"))));
    interrupts.set_phase(progress::SignalPhase::QuitAtOnce);
    let done = done?;
    if done.status != Status::Success {
        crate::out::note_text(&crate::report::human(&done.report));
        return Ok(Err(done.status));
    }
    Ok(Ok(Copied { seconds: done.report.seconds, len_bytes, block_bytes }))
}

/// Runs the copy of `config` through `kcopyd copy` and returns its seconds.
async fn real_copy(
    args: &ValidateArgs,
    config: Config,
    targets: &Targets,
    interrupts: &mut Interrupts,
) -> Result<Result<f64, Status>, CliError> {
    let source = DeviceAddress::path(&args.source);
    let target_args: Vec<DeviceAddress> = targets.paths.iter().map(DeviceAddress::path).collect();
    let copied =
        copy_once((&source, &target_args), config, args.run.memory_bytes, &targets.created, interrupts).await?;
    Ok(copied.map(|copied| copied.seconds))
}

/// `kcopyd sim validate`.
///
/// # Errors
/// Bad arguments or model (nothing written), or a failed copy.
pub async fn run(args: &ValidateArgs, interrupts: &mut Interrupts) -> Result<Status, CliError> {
    let configs = validate::parse_configs(&args.configs).map_err(configs_error)?;
    validate::check_runs(args.run.runs).map_err(configs_error)?;
    let source_text = args.source.display().to_string();
    let source = OsDevice::open(&args.source, &OpenOptions::default()).map_err(|source| CliError::Open {
        what: "SOURCE",
        text: source_text.clone(),
        reason: open_reason(&source, None),
        source,
    })?;
    let geometry = source.geometry();
    let len_bytes = geometry.len_sectors * SECTOR_SIZE as u64;
    drop(source);
    let bars = progress::bars_wanted(args.run.quiet);
    let model = model_of(args, bars).await?;
    let target_count = configs.iter().map(|c| c.targets).max().unwrap_or(1);
    check_target(args, target_count)?;
    let targets = Targets::new(&args.target, target_count);
    let one_device = validate::on_one_device(&args.source, &args.target);
    let bar = progress::byte_bar(bars, (1 + args.run.runs * configs.len() + configs.len()) as u64, "validate");
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg:<28} [{wide_bar}] {pos}/{len} copies ETA {eta}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    // A warm-up copy to every target (creating the files), not counted.
    let widest = *configs.iter().max_by_key(|c| c.targets).expect("at least one");
    bar.set_message(format!("warm-up {}", widest));
    if let Err(status) = real_copy(args, widest, &targets, interrupts).await? {
        return Ok(status);
    }
    bar.inc(1);
    let mut measured: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    for round in 0..args.run.runs {
        for (i, &config) in configs.iter().enumerate() {
            bar.set_message(format!("run {}/{} {}", round + 1, args.run.runs, config));
            match real_copy(args, config, &targets, interrupts).await? {
                Ok(seconds) => measured[i].push(seconds),
                Err(status) => return Ok(status),
            }
            bar.inc(1);
        }
    }
    let mut rows = Vec::new();
    for (config, measured) in configs.iter().zip(measured) {
        bar.set_message(format!("simulate {}", config));
        let block_bytes = geometry.logical_block_size;
        let predicted =
            validate::predict_seconds(&model, *config, len_bytes, block_bytes, one_device, args.run.memory_bytes);
        bar.inc(1);
        rows.push(Row::new(*config, measured, predicted));
    }
    bar.finish_and_clear();
    drop(targets);
    let validation =
        Validation::new(model.description.clone(), source_text, len_bytes, one_device, args.run.runs, rows);
    if args.run.json {
        crate::out::print(&format!("{}\n", serde_json::to_string(&validation).expect("a validation serializes")))?;
    } else {
        crate::out::print(&validation.to_string())?;
    }
    Ok(Status::Success)
}

/// The model to predict with: `--model`'s file, or one calibrated now on a scratch file
/// next to TARGET.
async fn model_of(args: &ValidateArgs, bars: bool) -> Result<kcopyd_sim::DiskModel, CliError> {
    Ok(match &args.model {
        Some(path) => calibrate::load(path)?,
        None => {
            let scratch_path = PathBuf::from(format!("{}.calibrate", args.target.display()));
            let scratch = calibrate::open_scratch(&scratch_path, 1 << 30, 0, None, false)?;
            let calibrated = calibrate::calibrate(&scratch, &CalibrationPlan::for_validation(), bars).await?;
            calibrate::warn_if_busy(&calibrated);
            calibrated.model
        }
    })
}

/// TARGET.2, TARGET.3, … are files next to TARGET: configurations of several targets need
/// TARGET to be a file.
fn check_target(args: &ValidateArgs, target_count: usize) -> Result<(), CliError> {
    let target_is_other = fs::metadata(&args.target).is_ok_and(|m| !m.is_file());
    if target_is_other && target_count > 1 {
        return Err(CliError::argument(
            "TARGET",
            args.target.display().to_string(),
            "is not a regular file: configurations with more than one target write TARGET.2, TARGET.3, … \
         next to TARGET, which needs TARGET to be a file",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_configuration_is_named_by_its_option() {
        for bad in ["1Mx4", "1Mx0x1", "1Mx4x9", "1Qx4x1", "1Mx4x1x1"] {
            let error = configs_error(validate::parse_configs(&[bad.into()]).unwrap_err()).to_string();
            assert!(error.contains("--configs") && error.contains(bad), "{error}");
        }
    }
}
