//! What every handle of a client and its actor share, from any thread: the page pool, the
//! sub-jobs' I/O context, admission, the registry of running jobs and the shutdown report.
//!
//! ```text
//!  Client (any thread) ─┐                        ┌─ ClientActor (its arbiter)
//!                       ├─► ClientShared ◄───────┤
//!  PreparedCallback ────┘    pool, io, admission └─ publishes the ShutdownReport once
//!                            running jobs (by id), report (watch channel)
//! ```

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use serde::Serialize;
use tokio::sync::{Semaphore, watch};

use crate::handle::{JobShared, Progress};
use crate::io::SubjobIo;
use crate::job::{JobKind, JobSpec};
use crate::{ClientConfig, PagePool, PoolStats};

/// What the client saw when it stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// The pool when the last job completed. `pages_in_use` is the pages still held by
    /// someone else: 0 unless requests are outstanding (below), or a device kept buffers it
    /// was given after its future completed, which breaks the
    /// [`BlockDevice`](crate::BlockDevice) contract. Those pages return to the pool when the
    /// device drops them.
    pub pool: PoolStats,
    /// Jobs completed over the client's life.
    pub jobs_completed: u64,
    /// Requests that timed out ([`ClientConfig::io_timeout_ms`]) and that their devices have not
    /// completed yet: they hold the buffers, and so pages of `pool.pages_in_use`, that a
    /// device may still be using. Zero without a timeout.
    pub requests_outstanding: u64,
}

/// A job that had not completed when [`Client::shutdown_timeout`](crate::Client::shutdown_timeout) gave up waiting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct RunningJob {
    /// The job's number, as [`JobHandle::id`](crate::JobHandle::id) gives it.
    pub id: u64,
    /// The source device's name (`None` for a zero job).
    pub source: Option<String>,
    /// The target devices' names, in the order given.
    pub targets: Vec<String>,
    /// How far it got.
    pub progress: Progress,
}

/// A submitted job as the client's shared registry keeps it until it completes.
pub(crate) struct Registered {
    pub(crate) spec: Arc<JobSpec>,
    pub(crate) shared: Arc<JobShared>,
}

/// What every handle of a client and its actor share, from any thread.
pub(crate) struct ClientShared {
    pub(crate) pool: PagePool,
    /// What sub-jobs share for their device I/O: the throttle, statistics, the timeout.
    pub(crate) io: Arc<SubjobIo>,
    /// Set once shutdown begins, the last handle is dropped or the actor is gone: no job is
    /// taken after it.
    pub(crate) closed: AtomicBool,
    pub(crate) admission: Arc<Semaphore>,
    pub(crate) next_job_id: AtomicU64,
    /// Jobs submitted and not yet completed, by id: what a timed-out shutdown names.
    pub(crate) running: Mutex<BTreeMap<u64, Registered>>,
    pub(crate) jobs_completed: AtomicU64,
    /// Prepared callbacks whose message the actor has not handled yet: shutdown waits for them.
    pub(crate) prepared_callbacks: AtomicUsize,
    /// Jobs accepted (their submit returns `Ok`) whose `Submit` message the actor has not
    /// handled yet: shutdown waits for them as for running jobs. Counted before the check of
    /// `closed` (both `SeqCst`), as prepared callbacks are: a submission either sees the
    /// client closed and fails, or is counted before the actor can see the shutdown.
    pub(crate) submissions_in_transit: AtomicUsize,
    /// The report, published once when the client has stopped (or its actor is gone).
    pub(crate) report: watch::Sender<Option<ShutdownReport>>,
}

impl ClientShared {
    pub(crate) fn new(pool: PagePool, io: Arc<SubjobIo>, config: &ClientConfig) -> Arc<ClientShared> {
        Arc::new(ClientShared {
            pool,
            io,
            closed: AtomicBool::new(false),
            admission: Arc::new(Semaphore::new(config.queued_jobs_max)),
            next_job_id: AtomicU64::new(0),
            running: Mutex::new(BTreeMap::new()),
            jobs_completed: AtomicU64::new(0),
            prepared_callbacks: AtomicUsize::new(0),
            submissions_in_transit: AtomicUsize::new(0),
            report: watch::Sender::new(None),
        })
    }

    pub(crate) fn running(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Registered>> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes no more jobs. Returns whether this call closed the client.
    pub(crate) fn close(&self) -> bool {
        let first = !self.closed.swap(true, Ordering::SeqCst);
        self.admission.close();
        first
    }

    /// Publishes the shutdown report, once; later calls change nothing.
    pub(crate) fn publish_report(&self) {
        let report = ShutdownReport {
            pool: self.pool.stats(),
            jobs_completed: self.jobs_completed.load(Ordering::Acquire),
            requests_outstanding: self.io.requests_outstanding(),
        };
        self.report.send_if_modified(|slot| {
            if slot.is_some() {
                return false;
            }
            *slot = Some(report);
            true
        });
    }

    /// Waits for the published report.
    pub(crate) async fn report_ready(&self) -> ShutdownReport {
        let mut receiver = self.report.subscribe();
        let report = *receiver.wait_for(Option::is_some).await.expect("the sender lives as long as `self`");
        report.expect("waited for it")
    }

    pub(crate) fn running_jobs(&self) -> Vec<RunningJob> {
        self.running()
            .iter()
            .map(|(&id, job)| RunningJob {
                id,
                source: match &job.spec.kind {
                    JobKind::Copy { source, .. } => Some(source.device.name().to_owned()),
                    JobKind::Zero => None,
                },
                targets: job.spec.targets.iter().map(|t| t.device.name().to_owned()).collect(),
                progress: job.shared.progress(),
            })
            .collect()
    }
}
