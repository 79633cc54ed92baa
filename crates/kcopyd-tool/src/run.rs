//! The runner: one copy, zero or verify of a checked plan, with or without a map, then the
//! flush, the partial last block and the read-back, with progress as a callback and
//! cancellation as a token.
//!
//! ```text
//!  Runner::copy(plan) ─► [compare pages reserved] ─► client ─► job (or batches + map) ─► flush
//!                       ─► tail (files, NBD) ─► [verify: read back, compare] ─► CopyRun
//!  Runner::zero(plan) ─► client ─► job ─► flush ─► tail ─► FinishedJob
//!  Runner::verify(plan) ─► compare ─► VerifyRun
//!     on_event: Started{phase} → Job{handle} → Progress{done_bytes}… → Finished{phase}
//!     cancel:   cancels the engine job in flight; the run stops between steps, flushes first
//! ```
//!
//! The runner reports what happened and nothing else: statuses, exit codes and messages are
//! the caller's.

mod mapped;
mod verify;

use std::time::Duration;

use futures_util::future::join_all;
use kcopyd_core::{Client, ClientStats, ConfigError, Flags, Job, JobHandle, Outcome, Region, SECTOR_SIZE, Sparse};
use kcopyd_core::{RangeSet, SubmitError};
use thiserror::Error;

pub use mapped::MappedCopy;
pub use verify::VerifyRun;

use crate::cancel::Cancel;
use crate::clock::Instant;
use crate::map::MapFileError;
use crate::open::{Opened, PathChange, Settings};
use crate::plan::{CreatedFiles, Plan, ZeroPlan};
use crate::tail::{Tail, TailError};

/// How often [`Event::Progress`] is sent while a job or a comparison runs (of the job's
/// time: model time in the simulator's virtual time).
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// Most bytes each NBD server is warmed up with before a copy or a comparison
/// ([`kcopyd_nbd::NbdDevice::warm_up`]), half glibc's largest mapping threshold.
pub const WARM_UP_BYTES_MAX: u64 = 16 << 20;

/// A warm-up is at most this fraction of its range: the extra read costs at most 1/64 of
/// the range's transfer (on a slow link, where the server's allocator is not what limits
/// the copy).
pub const WARM_UP_RANGE_RATIO: u64 = 64;

/// The bytes to warm each NBD server up with before moving `len_bytes` with `config`: the
/// bytes in flight at once, within the page budget, [`WARM_UP_BYTES_MAX`] and
/// 1/[`WARM_UP_RANGE_RATIO`] of the range, in whole sub-jobs; none when that is less than
/// two sub-jobs (a read no larger than the requests after it lifts nothing).
///
/// Worked example: 1 MiB sub-jobs, 8 in flight, 16 MiB of pages: 8 MiB before 1 GiB, 4 MiB
/// before 256 MiB, none before 100 MiB (1.56 MiB is less than two sub-jobs).
pub fn warm_up_bytes(config: &kcopyd_core::ClientConfig, len_bytes: u64) -> u64 {
    let subjob = (config.subjob_size_bytes as u64).max(1);
    let in_flight = subjob.saturating_mul(config.subjobs_in_flight as u64);
    let budget = (config.page_budget as u64).saturating_mul(kcopyd_core::PAGE_SIZE as u64);
    let bytes = in_flight.min(budget).min(WARM_UP_BYTES_MAX).min(len_bytes / WARM_UP_RANGE_RATIO) / subjob * subjob;
    if bytes < subjob.saturating_mul(2) { 0 } else { bytes }
}

/// What a run is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Copying the source to the targets.
    Copy,
    /// Zeroing the targets.
    Zero,
    /// Reading the source and the targets back and comparing them.
    Verify,
}

impl Phase {
    /// The phase's name: `copy`, `zero` or `verify`.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Copy => "copy",
            Phase::Zero => "zero",
            Phase::Verify => "verify",
        }
    }
}

/// What the runner tells its caller as it goes.
#[derive(Debug)]
pub enum Event<'a> {
    /// A phase starts: `len_bytes` in all, `done_bytes` of them done before (a resumed map).
    Started {
        /// The phase.
        phase: Phase,
        /// Bytes in the range.
        len_bytes: u64,
        /// Bytes done before this run.
        done_bytes: u64,
    },
    /// An engine job was submitted (cancelling the token cancels it); `base_bytes` of the
    /// phase were done before it.
    Job {
        /// The job.
        handle: &'a JobHandle,
        /// Bytes of the phase done before this job.
        base_bytes: u64,
    },
    /// Bytes of the phase done so far.
    Progress {
        /// Bytes done, from the start of the range.
        done_bytes: u64,
    },
    /// The phase is over (its flush and tail too).
    Finished {
        /// The phase.
        phase: Phase,
    },
}

/// Why a run did not start; nothing was written.
#[derive(Debug, Error)]
pub enum RunError {
    /// The engine's client (or the comparison's page arena) could not start.
    #[error("the engine could not start: {source}")]
    Start {
        /// The engine's error.
        #[source]
        source: ConfigError,
    },
    /// The engine refused a job.
    #[error("the job was refused: {source}")]
    Submit {
        /// The engine's error.
        #[source]
        source: SubmitError,
    },
    /// The comparison cannot fit one logical block of every device in the page budget.
    #[error("the comparison does not fit in the page budget: {problem}")]
    CompareBudget {
        /// What does not fit.
        problem: String,
    },
    /// The map could not be written.
    #[error(transparent)]
    Map(#[from] MapFileError),
    /// The engine refused the comparison.
    #[error("the comparison was refused: {source}")]
    Verify {
        /// The engine's error.
        #[source]
        source: kcopyd_core::VerifyError,
    },
}

/// How a copy runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct CopyOptions {
    /// The job's flags (`IGNORE_ERROR` also writes the tail after errors).
    pub flags: Flags,
    /// Sparse copying.
    pub sparse: Sparse,
    /// Read the targets back and compare them with the source afterwards.
    pub verify: bool,
}

/// What a copy or zero job came to.
#[derive(Debug)]
pub struct FinishedJob {
    /// The engine's outcome (merged over a map's jobs), tails included.
    pub outcome: Outcome,
    /// The token was cancelled during the job, its flush or its tail.
    pub cancelled: bool,
    /// Bytes moved (tried) in this run.
    pub done_bytes: u64,
    /// With a map: bytes the map held as done (or not to retry) when the run started.
    pub before_bytes: u64,
    /// Seconds of the job and its flush.
    pub seconds: f64,
    /// Per target: the error of its last flush, if it failed.
    pub flush_errors: Vec<Option<String>>,
    /// Per target: what became of its path while it was written, if it no longer names
    /// the device written ([`Opened::path_change`]), looked at when the command ends (empty
    /// until then: `Runner::copy` and `Runner::zero` fill it last).
    pub path_changes: Vec<Option<PathChange>>,
    /// The client's statistics.
    pub stats: ClientStats,
}

/// The reactor on which the NBD exports among `devices` run, if there are any and one
/// reactor serves them all (by default every export shares one). A client started on its
/// thread shares it with the connections: a sub-job's read request, its reply, the write it
/// leads to and that write's reply then pass between tasks of that thread, where with a
/// worker thread of the client's own each of the four wakes the other thread (docs/NBD.md,
/// "One thread for the engine and the connections").
pub fn nbd_reactor<'d>(devices: impl IntoIterator<Item = &'d Opened>) -> Option<kcopyd_nbd::Reactor> {
    let mut reactors = devices.into_iter().filter_map(|opened| opened.nbd.as_ref()).map(|nbd| nbd.reactor());
    let first = reactors.next()?;
    reactors.all(|reactor| reactor == first).then(|| first.clone())
}

/// What became of each target's path while it was written ([`Opened::path_change`]).
fn path_changes(targets: &[Opened]) -> Vec<Option<PathChange>> {
    targets.iter().map(Opened::path_change).collect()
}

/// What a copy came to: the job, and the read-back if one was asked for and the job was
/// not cancelled.
#[derive(Debug)]
pub struct CopyRun {
    /// The copy.
    pub job: FinishedJob,
    /// The comparison after it.
    pub verify: Option<VerifyRun>,
}

/// Runs jobs of plans with `settings`, telling `on_event` and heeding `cancel`.
#[derive(Clone, Copy)]
pub struct Runner<'a> {
    /// The engine's configuration.
    pub settings: &'a Settings,
    /// Told of each [`Event`].
    pub on_event: &'a dyn Fn(Event<'_>),
    /// Cancels the run.
    pub cancel: &'a Cancel,
}

impl std::fmt::Debug for Runner<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner").field("settings", self.settings).field("cancel", self.cancel).finish()
    }
}

impl Runner<'_> {
    /// Copies `plan` (through `map`'s batches if given), flushes, writes the tail and, if
    /// asked, verifies.
    ///
    /// # Errors
    /// The engine or the comparison could not start, a job was refused, or the map could not
    /// be written.
    pub async fn copy(
        &self,
        plan: &mut Plan,
        options: CopyOptions,
        map: Option<MappedCopy<'_>>,
    ) -> Result<CopyRun, RunError> {
        let len_sectors = plan.tail.offset_in_range_bytes / SECTOR_SIZE as u64;
        if options.verify {
            // Before anything is written: a comparison that cannot run refuses the copy.
            verify::request(&plan.source, &plan.targets, len_sectors)
                .check(&self.settings.config)
                .map_err(verify_error)?;
        }
        self.warm_up(plan).await;
        let client = self.start_client(plan.devices())?;
        self.started(Phase::Copy, plan.len_bytes, 0);
        let job = match map {
            None => {
                let regions = plan.targets.iter().map(|t| region(t, len_sectors)).collect();
                let job = Job::copy(region(&plan.source, len_sectors), regions, options.flags).sparse(options.sparse);
                let source_start = plan.source.start_sector();
                self.run_job(&client, job, &plan.targets, source_start, &mut plan.created).await
            }
            Some(map) => self.run_mapped(&client, map, plan, options, len_sectors).await,
        };
        let mut job = match job {
            Ok(job) => job,
            Err(error) => {
                client.shutdown().await;
                return Err(error);
            }
        };
        let keep_going = options.flags.contains(Flags::IGNORE_ERROR);
        self.finish_tail(plan.tail, Some(&plan.source), &plan.targets, keep_going, &mut job).await;
        self.finished(Phase::Copy);
        let verify = match options.verify && !job.cancelled {
            true => Some(self.verify_copy(&client, plan, &job).await),
            false => None,
        };
        // Looked at last: a path may change while the targets are read back too.
        job.path_changes = path_changes(&plan.targets);
        client.shutdown().await;
        Ok(CopyRun { job, verify: verify.transpose()? })
    }

    /// Zeroes `plan`'s targets, flushes and zeroes the tail.
    ///
    /// # Errors
    /// The engine could not start or refused the job.
    pub async fn zero(&self, plan: &ZeroPlan, flags: Flags) -> Result<FinishedJob, RunError> {
        let len_sectors = plan.tail.offset_in_range_bytes / SECTOR_SIZE as u64;
        let job = Job::zero(plan.targets.iter().map(|t| region(t, len_sectors)).collect(), flags);
        self.started(Phase::Zero, plan.len_bytes, 0);
        let mut nothing_created = CreatedFiles::default();
        let client = self.start_client(&plan.targets)?;
        let run = self.run_job(&client, job, &plan.targets, 0, &mut nothing_created).await;
        client.shutdown().await;
        let mut run = run?;
        let keep_going = flags.contains(Flags::IGNORE_ERROR);
        self.finish_tail(plan.tail, None, &plan.targets, keep_going, &mut run).await;
        run.path_changes = path_changes(&plan.targets);
        self.finished(Phase::Zero);
        Ok(run)
    }

    /// Compares `plan`'s targets with its source.
    ///
    /// # Errors
    /// The comparison does not fit in the page budget, or the engine could not start.
    pub async fn verify(&self, plan: &Plan) -> Result<VerifyRun, RunError> {
        let len_sectors = plan.tail.offset_in_range_bytes / SECTOR_SIZE as u64;
        let request = verify::request(&plan.source, &plan.targets, len_sectors);
        request.check(&self.settings.config).map_err(verify_error)?;
        self.warm_up(plan).await;
        let client = self.start_client(plan.devices())?;
        let range = (plan.len_bytes, plan.tail);
        let run = self.run_compare(&client, request, &plan.source, &plan.targets, range).await;
        client.shutdown().await;
        let mut run = run?;
        run.path_changes = path_changes(&plan.targets);
        Ok(run)
    }

    /// Warms up the servers of `plan`'s NBD exports ([`warm_up_bytes`]), all at once; a
    /// failed warm-up is left for the copy to meet, a cancellation ends it.
    async fn warm_up(&self, plan: &Plan) {
        let bytes = warm_up_bytes(&self.settings.config, plan.len_bytes);
        if bytes == 0 || !self.settings.nbd.warm_up {
            return;
        }
        let exports = plan.devices().filter_map(|opened| opened.nbd.as_ref());
        let warm_ups = join_all(exports.map(|nbd| nbd.warm_up(bytes)));
        tokio::select! {
            _ = warm_ups => {}
            () = self.cancel.cancelled() => {}
        }
    }

    fn started(&self, phase: Phase, len_bytes: u64, done_bytes: u64) {
        (self.on_event)(Event::Started { phase, len_bytes, done_bytes });
    }

    fn finished(&self, phase: Phase) {
        (self.on_event)(Event::Finished { phase });
    }

    /// Starts a client with the settings: on this thread's actix System when the run is in
    /// the simulator's virtual time; on the thread of the NBD reactor that serves `devices`'
    /// exports, if one serves them all ([`nbd_reactor`]); else on a worker thread of its own.
    fn start_client<'d>(&self, devices: impl IntoIterator<Item = &'d Opened>) -> Result<Client, RunError> {
        let config = self.settings.config.clone();
        let started = if kcopyd_sim::in_virtual_time() {
            Client::start_in_current_system(config)
        } else if let Some(reactor) = nbd_reactor(devices) {
            reactor
                .run(move || Client::start_in_current_system(config))
                .unwrap_or_else(|error| Err(ConfigError::Worker(error)))
        } else {
            Client::new(config)
        };
        started.map_err(|source| RunError::Start { source })
    }

    /// Submits `job`, keeps `created`, and tells the caller.
    async fn submit(
        &self,
        client: &Client,
        job: Job,
        created: &mut CreatedFiles,
        base_bytes: u64,
    ) -> Result<JobHandle, RunError> {
        let handle = client.submit(job).await.map_err(|source| RunError::Submit { source })?;
        created.keep();
        (self.on_event)(Event::Job { handle: &handle, base_bytes });
        Ok(handle)
    }

    /// Waits for `handle`, telling its progress (from `base_bytes`) every
    /// [`PROGRESS_INTERVAL`] and cancelling it when the token is.
    async fn wait(&self, handle: &JobHandle, base_bytes: u64) -> Outcome {
        let mut ticker = tokio::time::interval(kcopyd_sim::to_tokio(PROGRESS_INTERVAL));
        let mut waiting = handle.clone();
        let mut cancelled = false;
        let done_bytes = |handle: &JobHandle| base_bytes + handle.progress().done_sectors * SECTOR_SIZE as u64;
        loop {
            tokio::select! {
                outcome = &mut waiting => {
                    (self.on_event)(Event::Progress { done_bytes: done_bytes(handle) });
                    return outcome;
                }
                () = self.cancel.cancelled(), if !cancelled => {
                    cancelled = true;
                    handle.cancel();
                }
                _ = ticker.tick() => (self.on_event)(Event::Progress { done_bytes: done_bytes(handle) }),
            }
        }
    }

    /// Submits `job`, waits (cancelling when asked), then flushes every target.
    async fn run_job(
        &self,
        client: &Client,
        job: Job,
        targets: &[Opened],
        source_start: u64,
        created: &mut CreatedFiles,
    ) -> Result<FinishedJob, RunError> {
        let started = Instant::now();
        let handle = self.submit(client, job, created, 0).await?;
        let outcome = self.wait(&handle, 0).await;
        // Whatever was written is made durable, also after errors or a cancellation.
        let flushes = join_all(targets.iter().map(|t| t.device.flush())).await;
        let seconds = started.elapsed().as_secs_f64();
        let stats = client.stats();
        let done_bytes = moved_bytes(&handle, &outcome, source_start, targets.first().map(Opened::start_sector));
        Ok(FinishedJob {
            outcome,
            cancelled: self.cancel.is_cancelled(),
            done_bytes,
            before_bytes: 0,
            seconds,
            flush_errors: flushes.into_iter().map(|r| r.err().map(|e| e.to_string())).collect(),
            path_changes: Vec::new(),
            stats,
        })
    }

    /// After a copy or zero job, writes the tail of the range with `bytes` read from the
    /// source (`None`: zeroes), if the job went on to its end: finished, or failed with
    /// `keep_going`. Otherwise, or where it fails, the tail is reported as the job reports
    /// blocks: read failed, write failed, not copied. A cancellation during it stops it: the
    /// tail is not copied where it was not written.
    async fn finish_tail(
        &self,
        tail: Tail,
        source: Option<&Opened>,
        targets: &[Opened],
        keep_going: bool,
        run: &mut FinishedJob,
    ) {
        if tail.is_empty() {
            return;
        }
        let outcome = &mut run.outcome;
        let went_on =
            !run.cancelled && !outcome.cancelled && outcome.panicked.is_none() && (keep_going || job_ok(outcome));
        let mut bytes = match (went_on, source) {
            (false, _) => None,
            (true, None) => Some(vec![0; tail.len_bytes as usize]),
            (true, Some(source)) => match tail.read(source, self.cancel).await {
                Ok(bytes) => Some(bytes),
                Err(TailError::Cancelled) => None,
                Err(TailError::Io(_)) => {
                    outcome.read_err = true;
                    outcome.read_failed.insert(tail.sectors(source));
                    None
                }
            },
        };
        let mut written = 0;
        for (target, report) in targets.iter().zip(&mut outcome.targets) {
            let sectors = tail.sectors(target);
            let Some(data) = &bytes else {
                report.not_copied.insert(sectors);
                continue;
            };
            match tail.write(target, data, self.cancel).await {
                Ok(()) => written += 1,
                Err(TailError::Cancelled) => {
                    // Written or not, it was not made sure of: the rest is not started.
                    report.not_copied.insert(sectors);
                    bytes = None;
                }
                Err(TailError::Io(_)) => {
                    report.write_failed.insert(sectors.clone());
                    report.not_copied.insert(sectors);
                }
            }
        }
        run.cancelled |= self.cancel.is_cancelled();
        if written == targets.len() {
            run.done_bytes += tail.len_bytes;
        }
    }
}

/// The engine's refusal of a comparison; one that does not fit in the budget by name.
fn verify_error(source: kcopyd_core::VerifyError) -> RunError {
    match source {
        kcopyd_core::VerifyError::BlockLargerThanBudget { .. } => {
            RunError::CompareBudget { problem: source.to_string() }
        }
        source => RunError::Verify { source },
    }
}

/// The region of `len_sectors` of `opened` from its address's offset.
fn region(opened: &Opened, len_sectors: u64) -> Region {
    Region::new(opened.device.clone(), opened.start_sector(), len_sectors)
}

/// Whether the job copied everything: as [`Outcome::is_ok`], except that a read error that
/// narrowing recovered from (every block read on retry, nothing unreadable) is no error.
pub fn job_ok(outcome: &Outcome) -> bool {
    outcome.read_failed.is_empty()
        && outcome.write_err.is_empty()
        && !outcome.cancelled
        && outcome.panicked.is_none()
        && outcome.targets.iter().all(|t| t.not_copied.is_empty())
}

/// A target's `not_copied` (target-device sectors) relative to the start of its region.
pub fn not_copied_in_region(target: &Opened, outcome: &kcopyd_core::TargetReport) -> RangeSet {
    outcome.not_copied.shifted(target.start_sector(), 0).expect("not_copied lies inside the target region")
}

/// Bytes the job moved: its sectors less those it gave up on without trying (a cancel, or an
/// error without `IGNORE_ERROR`, skips the sub-jobs not started; the engine's progress counts
/// some of those as finished). Failed blocks count: they were tried.
///
/// Worked example: 64 MiB cancelled after 5 MiB, with 4 MiB of sub-jobs waiting for the
/// throttle when it came: the progress says 9 MiB finished; the first target's not_copied
/// holds the other 59 MiB, none of it failed: 5 MiB.
fn moved_bytes(handle: &JobHandle, outcome: &Outcome, source_start: u64, first_target_start: Option<u64>) -> u64 {
    let progress = handle.progress();
    let given_up = match (first_target_start, outcome.targets.first()) {
        (Some(target_start), Some(report)) => {
            // In the first target's sectors: read_failed is in the source's.
            let read_failed = outcome.read_failed.shifted(source_start, target_start).unwrap_or_default();
            report.not_copied.difference(&report.write_failed).difference(&read_failed).len_sectors()
        }
        _ => 0,
    };
    progress.total_sectors.saturating_sub(given_up).min(progress.done_sectors) * SECTOR_SIZE as u64
}
