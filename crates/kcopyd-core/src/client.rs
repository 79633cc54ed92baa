//! The client: a `Send + Sync + Clone` handle, the client actor that owns the page pool and
//! runs completions, and job handles.
//!
//! ```text
//!  Client (any thread) ──admission permit──► ClientActor (one arbiter) ──start──► JobActor
//!        │                                       │ callbacks (and prepared callbacks)
//!        │ ClientShared: running jobs,           │ run here, one at a time
//!        │ shutdown report (any thread)          │ permit dropped after the callback
//!  JobHandle ◄──── outcome slot + progress ──────┘
//! ```
//!
//! Every job completes exactly once, whatever happens to the runtime: a submission that never
//! reaches the actor completes from the message's `Drop`, and an actor dropped with jobs still
//! running (its actix System was dropped) completes them from its own `Drop`, as cancelled.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::task::{Context as TaskContext, Poll, Waker};
use std::thread::{self, ThreadId};
use std::time::Duration;

use actix::prelude::*;
use serde::Serialize;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};

use crate::block_on::{block_on, block_on_timeout};
use crate::error::{ConfigError, ShutdownError, SubmitError};
use crate::io::SubJobIo;
use crate::job::{JobActor, JobKind, JobRun, JobSpec};
use crate::stats::{ClientStats, StatsRecorder};
use crate::throttle::{Throttle, Throttler};
use crate::time_scale::Clock;
use crate::{ClientConfig, Flags, Outcome, PagePool, PoolStats, RangeSet, Region, Sparse, TargetMask, TargetReport};

type Callback = Box<dyn FnOnce(Outcome) + Send + 'static>;

/// A job to submit: a copy or a zero, its flags and an optional completion callback.
pub struct Job {
    kind: JobKind,
    targets: Vec<Region>,
    flags: Flags,
    callback: Option<Callback>,
}

impl Job {
    /// Copy `source` to every target; every target's count must equal the source's.
    pub fn copy(source: Region, targets: Vec<Region>, flags: Flags) -> Job {
        Job { kind: JobKind::Copy { source, sparse: Sparse::OFF }, targets, flags, callback: None }
    }

    /// Makes a copy sparse-aware: holes of the source are not read, zero blocks not written
    /// as data (see [`Sparse`]). A zero job ignores it.
    pub fn sparse(mut self, sparse: Sparse) -> Job {
        if let JobKind::Copy { sparse: ours, .. } = &mut self.kind {
            *ours = sparse;
        }
        self
    }

    /// Zero every target (all of the same count).
    pub fn zero(targets: Vec<Region>, flags: Flags) -> Job {
        Job { kind: JobKind::Zero, targets, flags, callback: None }
    }

    /// Calls `callback` with the outcome when the job completes, on the client's worker.
    /// Callbacks of one client never run concurrently with one another. The job's handle
    /// still resolves as well, after the callback has returned (so a callback that asks its
    /// own job's handle for the outcome finds none yet).
    pub fn on_complete(mut self, callback: impl FnOnce(Outcome) + Send + 'static) -> Job {
        self.callback = Some(Box::new(callback));
        self
    }
}

impl fmt::Debug for Job {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Job")
            .field("kind", &self.kind)
            .field("targets", &self.targets)
            .field("flags", &self.flags)
            .field("callback", &self.callback.is_some())
            .finish()
    }
}

/// How far a job got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Progress {
    /// Sectors finished (written, or given up on).
    pub done_sectors: u64,
    /// Sectors in the job.
    pub total_sectors: u64,
}

/// State shared between a job's handle, its actor and the client actor.
pub(crate) struct JobShared {
    /// The job's number in its client, in submission order.
    job_id: u64,
    total_sectors: u64,
    done_sectors: AtomicU64,
    cancel: AtomicBool,
    /// Woken when the job is cancelled, for sub-jobs waiting on the throttle.
    cancel_requested: Notify,
    slot: Mutex<OutcomeSlot>,
    completed: Condvar,
}

#[derive(Default)]
struct OutcomeSlot {
    outcome: Option<Outcome>,
    /// The latest waker of each handle that is waiting, keyed by handle: a handle polled
    /// again replaces its waker, so polling never grows this.
    wakers: BTreeMap<u64, Waker>,
    /// Identity for the next handle made of this job.
    next_handle: u64,
}

impl JobShared {
    fn new(job_id: u64, total_sectors: u64) -> JobShared {
        JobShared {
            job_id,
            total_sectors,
            done_sectors: AtomicU64::new(0),
            cancel: AtomicBool::new(false),
            cancel_requested: Notify::new(),
            slot: Mutex::new(OutcomeSlot::default()),
            completed: Condvar::new(),
        }
    }

    pub(crate) fn add_done(&self, sectors: u64) {
        let done = self.done_sectors.fetch_add(sectors, Ordering::AcqRel) + sectors;
        assert!(done <= self.total_sectors, "progress past the end: {done} of {}", self.total_sectors);
    }

    pub(crate) fn cancel_requested(&self) -> bool {
        self.cancel.load(Ordering::Acquire)
    }

    /// Resolves once the job is cancelled (at once if it already is).
    pub(crate) async fn cancelled(&self) {
        loop {
            let notified = self.cancel_requested.notified();
            let mut notified = std::pin::pin!(notified);
            // Registered before the check, so a cancel between the two still wakes it.
            notified.as_mut().enable();
            if self.cancel_requested() {
                return;
            }
            notified.await;
        }
    }

    pub(crate) fn progress(&self) -> Progress {
        Progress { done_sectors: self.done_sectors.load(Ordering::Acquire), total_sectors: self.total_sectors }
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, OutcomeSlot> {
        // The slot is consistent at every unlock: a panic elsewhere does not spoil it.
        self.slot.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stores the outcome and wakes every waiter. Exactly once per job.
    fn complete(&self, outcome: Outcome) {
        let mut slot = self.slot();
        assert!(slot.outcome.is_none(), "a job completed twice");
        slot.outcome = Some(outcome);
        std::mem::take(&mut slot.wakers).into_values().for_each(Waker::wake);
        self.completed.notify_all();
    }
}

/// A submitted job: await it (or [`wait`](JobHandle::wait)) for its [`Outcome`], watch its
/// progress, or cancel it. Cloning gives another handle to the same job.
///
/// A handle always resolves, exactly once per job: when the job completes, when the client
/// stops before running it (as cancelled), or when the actix System running a
/// [`start_in_current_system`](Client::start_in_current_system) client is dropped with the job
/// unfinished (as cancelled, `not_copied` holding every sector not written).
pub struct JobHandle {
    shared: Arc<JobShared>,
    /// Which handle of the job this is, to keep one waker per handle.
    waker_key: u64,
}

impl JobHandle {
    fn new(shared: Arc<JobShared>) -> JobHandle {
        let waker_key = {
            let mut slot = shared.slot();
            slot.next_handle += 1;
            slot.next_handle
        };
        JobHandle { shared, waker_key }
    }
}

impl Clone for JobHandle {
    fn clone(&self) -> JobHandle {
        JobHandle::new(self.shared.clone())
    }
}

impl Drop for JobHandle {
    fn drop(&mut self) {
        self.shared.slot().wakers.remove(&self.waker_key);
    }
}

impl JobHandle {
    /// The job's number in its client (0, 1, 2, … in submission order), as
    /// [`RunningJob::id`] names it.
    pub fn id(&self) -> u64 {
        self.shared.job_id
    }

    /// Sectors done and total, without blocking.
    pub fn progress(&self) -> Progress {
        self.shared.progress()
    }

    /// Asks the job to stop: no new sub-job starts, the ones in flight finish, sub-jobs waiting
    /// for pages or for the throttle give up at once, and the outcome says `cancelled` if some
    /// part was never started.
    pub fn cancel(&self) {
        self.shared.cancel.store(true, Ordering::Release);
        self.shared.cancel_requested.notify_waiters();
    }

    /// The outcome, if the job has completed.
    pub fn try_outcome(&self) -> Option<Outcome> {
        self.shared.slot().outcome.clone()
    }

    /// Blocks this thread until the job completes. Do not call it on the client's worker
    /// (from a callback): the job could never complete.
    pub fn wait(self) -> Outcome {
        let mut slot = self.shared.slot();
        loop {
            if let Some(outcome) = &slot.outcome {
                return outcome.clone();
            }
            slot = self.shared.completed.wait(slot).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

impl Future for JobHandle {
    type Output = Outcome;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Outcome> {
        let mut slot = self.shared.slot();
        match &slot.outcome {
            Some(outcome) => Poll::Ready(outcome.clone()),
            None => {
                let key = self.waker_key;
                match slot.wakers.get_mut(&key) {
                    Some(waker) if waker.will_wake(cx.waker()) => {}
                    Some(waker) => waker.clone_from(cx.waker()),
                    None => {
                        slot.wakers.insert(key, cx.waker().clone());
                    }
                }
                Poll::Pending
            }
        }
    }
}

impl fmt::Debug for JobHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobHandle").field("id", &self.id()).field("progress", &self.progress()).finish()
    }
}

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

/// A job that had not completed when [`Client::shutdown_timeout`] gave up waiting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct RunningJob {
    /// The job's number, as [`JobHandle::id`] gives it.
    pub id: u64,
    /// The source device's name (`None` for a zero job).
    pub source: Option<String>,
    /// The target devices' names, in the order given.
    pub targets: Vec<String>,
    /// How far it got.
    pub progress: Progress,
}

/// A submitted job as the client's shared registry keeps it until it completes.
struct Registered {
    spec: Arc<JobSpec>,
    shared: Arc<JobShared>,
}

/// What every handle of a client and its actor share, from any thread.
pub(crate) struct ClientShared {
    pool: PagePool,
    /// What sub-jobs share for their device I/O: the throttle, statistics, the timeout.
    io: Arc<SubJobIo>,
    /// Set once shutdown begins, the last handle is dropped or the actor is gone: no job is
    /// taken after it.
    closed: AtomicBool,
    admission: Arc<Semaphore>,
    next_job_id: AtomicU64,
    /// Jobs submitted and not yet completed, by id: what a timed-out shutdown names.
    running: Mutex<BTreeMap<u64, Registered>>,
    jobs_completed: AtomicU64,
    /// Prepared callbacks whose message the actor has not handled yet: shutdown waits for them.
    prepared_callbacks: AtomicUsize,
    /// The report, published once when the client has stopped (or its actor is gone).
    report: watch::Sender<Option<ShutdownReport>>,
}

impl ClientShared {
    fn new(pool: PagePool, io: Arc<SubJobIo>, config: &ClientConfig) -> Arc<ClientShared> {
        Arc::new(ClientShared {
            pool,
            io,
            closed: AtomicBool::new(false),
            admission: Arc::new(Semaphore::new(config.queued_jobs_max)),
            next_job_id: AtomicU64::new(0),
            running: Mutex::new(BTreeMap::new()),
            jobs_completed: AtomicU64::new(0),
            prepared_callbacks: AtomicUsize::new(0),
            report: watch::Sender::new(None),
        })
    }

    fn running(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Registered>> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes no more jobs. Returns whether this call closed the client.
    fn close(&self) -> bool {
        let first = !self.closed.swap(true, Ordering::SeqCst);
        self.admission.close();
        first
    }

    /// Publishes the shutdown report, once; later calls change nothing.
    fn publish_report(&self) {
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
    async fn report_ready(&self) -> ShutdownReport {
        let mut receiver = self.report.subscribe();
        let report = *receiver.wait_for(Option::is_some).await.expect("the sender lives as long as `self`");
        report.expect("waited for it")
    }

    fn running_jobs(&self) -> Vec<RunningJob> {
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

/// A submission travelling to the client actor. If it is dropped undelivered (the actor is
/// gone), the job still completes exactly once, as cancelled.
struct Pending {
    spec: Arc<JobSpec>,
    shared: Arc<JobShared>,
    callback: Option<Callback>,
    client: Arc<ClientShared>,
    _permit: OwnedSemaphorePermit,
}

impl Pending {
    /// Completes the job: runs the callback, frees the admission permit, and only then
    /// resolves the handles, so that a caller that saw its handle resolve can submit again
    /// at once (even with `queued_jobs_max: 1`) and finds the callback's effects done.
    fn finish(self, mut outcome: Outcome) {
        let Pending { spec, shared, callback, client, _permit: permit } = self;
        client.io.stats.job_completed(&outcome);
        if let Some(callback) = callback {
            let first_target = spec.targets.first().map(|t| t.device.name()).unwrap_or("");
            outcome.callback_panicked = run_callback(callback, outcome.clone(), first_target);
        }
        // Admission counts a job until its callback has run, and no longer than that.
        drop(permit);
        client.running().remove(&shared.job_id);
        client.jobs_completed.fetch_add(1, Ordering::AcqRel);
        shared.complete(outcome);
    }
}

/// Runs a completion callback (a job's, or a prepared one with no target). A panicking
/// callback must not take the client (and every later job) down with it: report it as a
/// diagnostic event, return its message, and go on.
fn run_callback(callback: Callback, outcome: Outcome, first_target: &str) -> Option<String> {
    let panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| callback(outcome))).err()?;
    let message = panic_message(&*panic);
    tracing::error!(panic = %message, first_target, "kcopyd: a completion callback panicked");
    Some(message)
}

#[derive(Message)]
#[rtype(result = "()")]
struct Submit(Option<Pending>);

impl Drop for Submit {
    fn drop(&mut self) {
        if let Some(pending) = self.0.take() {
            let outcome = not_started_outcome(&pending.spec);
            pending.finish(outcome);
        }
    }
}

/// The message a panic carried (`panic!` with a literal or a formatted string), or a
/// placeholder for other payloads.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string())
}

/// The outcome of a job that never ran: nothing copied, and cancelled unless it was empty.
fn not_started_outcome(spec: &JobSpec) -> Outcome {
    Outcome {
        targets: spec
            .targets
            .iter()
            .map(|t| TargetReport { write_failed: RangeSet::new(), not_copied: RangeSet::from_range(t.sectors()) })
            .collect(),
        cancelled: spec.len_sectors > 0,
        ..Outcome::default()
    }
}

/// A job actor finished: its outcome is in its [`JobRun`].
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct JobDone {
    pub(crate) id: u64,
}

/// Begin stopping. Carries the shared state so that a message dropped undelivered (the actor
/// is gone) still publishes a report and no shutdown waits for ever.
#[derive(Message)]
#[rtype(result = "()")]
struct Shutdown(Option<Arc<ClientShared>>);

impl Drop for Shutdown {
    fn drop(&mut self) {
        if let Some(shared) = self.0.take() {
            shared.publish_report();
        }
    }
}

/// A prepared callback, queued: run it in turn with job completions.
#[derive(Message)]
#[rtype(result = "()")]
struct RunCallback(Option<(Callback, Outcome, Arc<ClientShared>)>);

impl Drop for RunCallback {
    fn drop(&mut self) {
        // Undelivered (the actor is gone): the callback still runs, once, here.
        if let Some((callback, outcome, shared)) = self.0.take() {
            shared.prepared_callbacks.fetch_sub(1, Ordering::SeqCst);
            run_callback(callback, outcome, "");
        }
    }
}

/// The actor that owns the pool, starts job actors and runs completions.
pub(crate) struct ClientActor {
    shared: Arc<ClientShared>,
    /// Jobs started and not completed, with their state (read if the actor is dropped first).
    running: BTreeMap<u64, (Pending, Rc<JobRun>)>,
    shutting_down: bool,
    /// Stop the actix System when done (the client owns its worker thread).
    owns_system: bool,
}

impl Actor for ClientActor {
    type Context = Context<Self>;
}

impl ClientActor {
    fn maybe_stop(&mut self, ctx: &mut Context<Self>) {
        if !self.shutting_down || !self.running.is_empty() || self.shared.prepared_callbacks.load(Ordering::SeqCst) > 0
        {
            return;
        }
        // Pages still in use are reported, not asserted: a device that keeps its buffers
        // breaks its contract, and the shutdown still has to return.
        self.shared.publish_report();
        ctx.stop();
        if self.owns_system {
            System::current().stop();
        }
    }
}

impl Drop for ClientActor {
    /// The actor goes away: normally after shutdown with nothing running, but also when the
    /// actix System running it is dropped, or a handler panicked. Jobs still running complete
    /// here, as cancelled, with what they wrote; nobody waits for ever.
    fn drop(&mut self) {
        self.shared.close();
        for (_, (pending, run)) in std::mem::take(&mut self.running) {
            pending.shared.cancel.store(true, Ordering::Release);
            let outcome = run.take_outcome().unwrap_or_else(|| run.abandoned_outcome());
            pending.finish(outcome);
        }
        self.shared.publish_report();
        if self.owns_system {
            if let Some(system) = System::try_current() {
                system.stop();
            }
        }
    }
}

impl Handler<Submit> for ClientActor {
    type Result = ();

    fn handle(&mut self, mut message: Submit, ctx: &mut Context<Self>) {
        let pending = message.0.take().expect("a submission is handled once");
        if pending.spec.len_sectors == 0 {
            let outcome = not_started_outcome(&pending.spec);
            pending.finish(outcome);
            return;
        }
        let id = pending.shared.job_id;
        let actor = JobActor::new(
            id,
            pending.spec.clone(),
            self.shared.pool.clone(),
            self.shared.io.clone(),
            pending.shared.clone(),
            ctx.address(),
        );
        let run = actor.run();
        actor.start();
        self.running.insert(id, (pending, run));
    }
}

impl Handler<JobDone> for ClientActor {
    type Result = ();

    fn handle(&mut self, done: JobDone, ctx: &mut Context<Self>) {
        let (pending, run) = self.running.remove(&done.id).expect("a job completes once");
        let outcome = run.take_outcome().expect("a job actor stores its outcome before it reports");
        pending.finish(outcome);
        self.maybe_stop(ctx);
    }
}

impl Handler<Shutdown> for ClientActor {
    type Result = ();

    fn handle(&mut self, mut message: Shutdown, ctx: &mut Context<Self>) {
        message.0 = None;
        self.shutting_down = true;
        self.maybe_stop(ctx);
    }
}

impl Handler<RunCallback> for ClientActor {
    type Result = ();

    fn handle(&mut self, mut message: RunCallback, ctx: &mut Context<Self>) {
        let (callback, outcome, shared) = message.0.take().expect("a callback is handled once");
        run_callback(callback, outcome, "");
        shared.prepared_callbacks.fetch_sub(1, Ordering::SeqCst);
        self.maybe_stop(ctx);
    }
}

struct ClientInner {
    addr: Addr<ClientActor>,
    config: ClientConfig,
    shared: Arc<ClientShared>,
    worker: Mutex<Option<thread::JoinHandle<()>>>,
    worker_thread: ThreadId,
}

impl ClientInner {
    /// Closes the client and asks the actor to stop once every job is done (the first time).
    fn begin_shutdown(&self) {
        if self.shared.close() {
            self.addr.do_send(Shutdown(Some(self.shared.clone())));
        }
    }
}

impl Drop for ClientInner {
    fn drop(&mut self) {
        // Let running jobs finish, then stop; nobody is left to wait for the report, and the
        // worker thread (if any) exits on its own.
        self.begin_shutdown();
    }
}

/// A copy-engine client: a page pool and the actors that run jobs on it.
///
/// The handle is `Send + Sync + Clone`; use it from async code ([`submit`](Client::submit)),
/// from plain threads ([`submit_blocking`](Client::submit_blocking)) or from a callback
/// ([`try_submit`](Client::try_submit)).
///
/// **Dropped without shutdown.** When the last handle is dropped the client takes no new job
/// and stops as [`shutdown`](Client::shutdown) would, without anyone waiting: jobs already
/// submitted run to the end, their handles resolve and their callbacks run; then the actor
/// stops and a worker thread of its own exits by itself (nobody joins it).
///
/// **Shutdown** may be called from any thread except the client's worker, any number of times,
/// concurrently: every caller gets the same [`ShutdownReport`].
#[derive(Clone)]
pub struct Client {
    inner: Arc<ClientInner>,
}

impl Client {
    /// Starts a client on a worker thread of its own (like the kernel's per-client workqueue).
    ///
    /// # Errors
    /// The configuration is out of bounds, or the arena or thread cannot be had.
    pub fn new(config: ClientConfig) -> Result<Client, ConfigError> {
        config.validate()?;
        let pool = new_pool(&config)?;
        // The worker is a fresh thread: real time.
        let shared = ClientShared::new(pool, new_io(&config, Clock::REAL), &config);
        let (sender, receiver) = std::sync::mpsc::channel();
        let actor_shared = shared.clone();
        let worker = thread::Builder::new()
            .name("kcopyd-client".into())
            .spawn(move || {
                let system = System::new();
                let published = actor_shared.clone();
                let addr = system.block_on(async move { new_actor(actor_shared, true).start() });
                sender.send(addr).expect("the starting thread waits for the address");
                let _ = system.run();
                // Normally the actor published the report before stopping the system; if the
                // system stopped some other way, shutdown still returns.
                published.publish_report();
            })
            .map_err(ConfigError::Worker)?;
        let worker_thread = worker.thread().id();
        let addr = receiver.recv().expect("the worker sends its address");
        Ok(Client::from_parts(addr, config, shared, Some(worker), worker_thread))
    }

    /// Starts a client on the current actix arbiter, sharing the caller's thread (what the
    /// deterministic simulator does). Callbacks then run on this thread.
    ///
    /// If that actix System is dropped while jobs are still running, every one of them
    /// completes (as cancelled, with `not_copied` = every sector not written) and shutdown
    /// returns.
    ///
    /// # Errors
    /// The configuration is out of bounds, the arena cannot be had, or this thread runs no
    /// actix System ([`ConfigError::NoActixSystem`]).
    pub fn start_in_current_system(config: ClientConfig) -> Result<Client, ConfigError> {
        config.validate()?;
        let arbiter = actix_rt::Arbiter::try_current().ok_or(ConfigError::NoActixSystem)?;
        let pool = new_pool(&config)?;
        let shared = ClientShared::new(pool, new_io(&config, Clock::of_this_thread()), &config);
        let actor_shared = shared.clone();
        // Started through the arbiter rather than spawned here, so that this works anywhere on
        // the System's thread, inside or outside its `block_on`.
        let addr = ClientActor::start_in_arbiter(&arbiter, move |_| new_actor(actor_shared, false));
        Ok(Client::from_parts(addr, config, shared, None, thread::current().id()))
    }

    fn from_parts(
        addr: Addr<ClientActor>,
        config: ClientConfig,
        shared: Arc<ClientShared>,
        worker: Option<thread::JoinHandle<()>>,
        worker_thread: ThreadId,
    ) -> Client {
        Client { inner: Arc::new(ClientInner { addr, config, shared, worker: Mutex::new(worker), worker_thread }) }
    }

    /// The configuration the client runs with.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// The throttle in force now (the configuration's, or the last one set).
    pub fn throttle(&self) -> Throttle {
        self.inner.shared.io.throttler.get()
    }

    /// Changes the throttle while jobs run. Sub-jobs waiting for the throttle re-check at once;
    /// sub-jobs already issued are not affected. The busy history and the rate's bucket carry
    /// over, so a new limit applies from now on, not retroactively.
    ///
    /// # Errors
    /// [`ConfigError::ThrottleBusy`] or [`ConfigError::ThrottleRate`]; the throttle is then
    /// unchanged.
    pub fn set_throttle(&self, throttle: Throttle) -> Result<(), ConfigError> {
        throttle.validate()?;
        self.inner.shared.io.throttler.set(throttle);
        Ok(())
    }

    /// What the client has done since it started: jobs, per-device I/O with latency
    /// histograms, the pool's high-water mark, time waiting for pages and for the throttle.
    /// A consistent snapshot of each counter, taken without stopping the client.
    pub fn stats(&self) -> ClientStats {
        let shared = &self.inner.shared;
        shared.io.stats.snapshot(shared.pool.stats(), shared.io.requests_outstanding())
    }

    /// The page pool's occupancy and high-water mark.
    pub fn pool_stats(&self) -> PoolStats {
        self.inner.shared.pool.stats()
    }

    /// Validates `job` and submits it, waiting while the queued-jobs limit is reached.
    ///
    /// # Errors
    /// A validation error (nothing was read or written), or the client is shut down.
    pub async fn submit(&self, job: Job) -> Result<JobHandle, SubmitError> {
        let prepared = self.prepare(job)?;
        let permit = self.inner.shared.admission.clone().acquire_owned().await.map_err(|_| SubmitError::ShutDown)?;
        Ok(self.send(prepared, permit))
    }

    /// As [`submit`](Client::submit), blocking this thread while the limit is reached.
    ///
    /// # Errors
    /// As `submit`, and [`SubmitError::WouldBlockWorker`] on the client's own worker thread.
    pub fn submit_blocking(&self, job: Job) -> Result<JobHandle, SubmitError> {
        if thread::current().id() == self.inner.worker_thread {
            return Err(SubmitError::WouldBlockWorker);
        }
        let prepared = self.prepare(job)?;
        let permit =
            block_on(self.inner.shared.admission.clone().acquire_owned()).map_err(|_| SubmitError::ShutDown)?;
        Ok(self.send(prepared, permit))
    }

    /// As [`submit`](Client::submit), but fails with [`SubmitError::QueueFull`] instead of
    /// waiting. Safe to call from a callback.
    ///
    /// # Errors
    /// As `submit`, and `QueueFull`.
    pub fn try_submit(&self, job: Job) -> Result<JobHandle, SubmitError> {
        let prepared = self.prepare(job)?;
        let permit = self.inner.shared.admission.clone().try_acquire_owned().map_err(|error| match error {
            tokio::sync::TryAcquireError::Closed => SubmitError::ShutDown,
            tokio::sync::TryAcquireError::NoPermits => {
                SubmitError::QueueFull { max: self.inner.config.queued_jobs_max }
            }
        })?;
        Ok(self.send(prepared, permit))
    }

    fn prepare(&self, job: Job) -> Result<(Arc<JobSpec>, Option<Callback>), SubmitError> {
        if self.inner.shared.closed.load(Ordering::Acquire) {
            return Err(SubmitError::ShutDown);
        }
        let spec = JobSpec::validate(job.kind, job.targets, job.flags, &self.inner.config)?;
        Ok((Arc::new(spec), job.callback))
    }

    fn send(&self, (spec, callback): (Arc<JobSpec>, Option<Callback>), permit: OwnedSemaphorePermit) -> JobHandle {
        let client = &self.inner.shared;
        let id = client.next_job_id.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::new(JobShared::new(id, spec.len_sectors));
        let handle = JobHandle::new(shared.clone());
        client.io.stats.job_submitted();
        client.running().insert(id, Registered { spec: spec.clone(), shared: shared.clone() });
        let pending = Pending { spec, shared, callback, client: client.clone(), _permit: permit };
        // A closed mailbox drops the message, and dropping it completes the job.
        self.inner.addr.do_send(Submit(Some(pending)));
        handle
    }

    /// Prepares a callback that runs on the client's completion context, like device-mapper's
    /// `dm_kcopyd_prepare_callback`: for work that needed no I/O but must complete in order
    /// with the client's jobs. [`PreparedCallback::complete`] (the kernel's
    /// `dm_kcopyd_do_callback`) then queues it with the `read_err` and `write_err` to pass on.
    ///
    /// The callback runs on the client's worker, never concurrently with a job's callback, and
    /// after the callbacks of every job that completed before `complete` was called. Shutdown
    /// waits for prepared callbacks as it waits for jobs.
    ///
    /// ```
    /// # use kcopyd_core::{Client, ClientConfig, TargetMask};
    /// let client = Client::new(ClientConfig { page_budget: 1, ..ClientConfig::default() }).unwrap();
    /// let (sender, receiver) = std::sync::mpsc::channel();
    /// let prepared = client.prepare_callback(move |outcome| sender.send(outcome.read_err).unwrap()).unwrap();
    /// prepared.complete(true, TargetMask::new());
    /// assert!(receiver.recv().unwrap());
    /// client.shutdown_blocking();
    /// ```
    ///
    /// # Errors
    /// [`SubmitError::ShutDown`] once shutdown has begun.
    pub fn prepare_callback(
        &self,
        callback: impl FnOnce(Outcome) + Send + 'static,
    ) -> Result<PreparedCallback, SubmitError> {
        let shared = &self.inner.shared;
        // Counted before the check: a shutdown that closes the client after this sees the
        // count and waits for the callback (both sides use SeqCst).
        shared.prepared_callbacks.fetch_add(1, Ordering::SeqCst);
        if shared.closed.load(Ordering::SeqCst) {
            shared.prepared_callbacks.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::ShutDown);
        }
        Ok(PreparedCallback {
            callback: Some(Box::new(callback)),
            addr: self.inner.addr.clone(),
            shared: shared.clone(),
        })
    }

    /// Stops taking jobs, waits for every job to complete and for the client's actor to stop.
    /// Never blocks the executor's thread. Every caller gets the report; after the first
    /// shutdown, later calls return it at once.
    ///
    /// To bound the wait, wrap it in your runtime's timeout or use
    /// [`shutdown_timeout`](Client::shutdown_timeout).
    pub async fn shutdown(&self) -> ShutdownReport {
        self.inner.begin_shutdown();
        self.inner.shared.report_ready().await
    }

    /// As [`shutdown`](Client::shutdown), blocking this thread, and then joining the client's
    /// worker thread.
    ///
    /// # Panics
    /// On the client's worker thread (from a callback): it would wait for itself.
    pub fn shutdown_blocking(&self) -> ShutdownReport {
        assert_ne!(thread::current().id(), self.inner.worker_thread, "shutdown_blocking on the client's worker");
        self.inner.begin_shutdown();
        let report = block_on(self.inner.shared.report_ready());
        self.join_worker();
        report
    }

    /// As [`shutdown_blocking`](Client::shutdown_blocking), giving up after `timeout`. The
    /// client stays shut (it takes no new job) and its jobs go on; a later shutdown call can
    /// wait again.
    ///
    /// # Errors
    /// [`ShutdownError::TimedOut`] with the jobs still running and the prepared callbacks
    /// not yet run; [`ShutdownError::OnWorker`] on the client's worker thread (nothing is
    /// done then).
    pub fn shutdown_timeout(&self, timeout: Duration) -> Result<ShutdownReport, ShutdownError> {
        if thread::current().id() == self.inner.worker_thread {
            return Err(ShutdownError::OnWorker);
        }
        self.inner.begin_shutdown();
        let shared = &self.inner.shared;
        match block_on_timeout(shared.report_ready(), timeout) {
            Some(report) => {
                self.join_worker();
                Ok(report)
            }
            None => Err(ShutdownError::TimedOut {
                waited: timeout,
                running: shared.running_jobs(),
                prepared_callbacks: shared.prepared_callbacks.load(Ordering::SeqCst),
            }),
        }
    }

    /// Joins the worker thread, if this client has one and nobody joined it yet. Called once
    /// the report is out: the worker's system is stopping, so the wait is short.
    fn join_worker(&self) {
        let worker = self.inner.worker.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(worker) = worker {
            // The report is already out; a panic while the thread tore down changes nothing.
            let _ = worker.join();
        }
    }
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client").field("config", &self.inner.config).field("pool", &self.inner.shared.pool).finish()
    }
}

/// A callback prepared with [`Client::prepare_callback`], not yet queued.
///
/// Dropping it without [`complete`](PreparedCallback::complete) queues it all the same, with
/// an outcome that says `cancelled`: the callback runs exactly once either way.
pub struct PreparedCallback {
    callback: Option<Callback>,
    addr: Addr<ClientActor>,
    shared: Arc<ClientShared>,
}

impl PreparedCallback {
    /// Queues the callback (the kernel's `dm_kcopyd_do_callback`): it runs on the client's
    /// worker with an [`Outcome`] carrying `read_err` and `write_err` (and no targets), after
    /// the callbacks of every job completed before this call. Never blocks.
    pub fn complete(mut self, read_err: bool, write_err: TargetMask) {
        let outcome = Outcome { read_err, write_err, ..Outcome::default() };
        self.queue(outcome);
    }

    fn queue(&mut self, outcome: Outcome) {
        if let Some(callback) = self.callback.take() {
            // Undelivered, the message runs the callback from its `Drop`.
            self.addr.do_send(RunCallback(Some((callback, outcome, self.shared.clone()))));
        }
    }
}

impl Drop for PreparedCallback {
    fn drop(&mut self) {
        self.queue(Outcome { cancelled: true, ..Outcome::default() });
    }
}

impl fmt::Debug for PreparedCallback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PreparedCallback").field("queued", &self.callback.is_none()).finish()
    }
}

// The handles are for any thread and any runtime.
const _: () = {
    const fn assert_shareable<T: Send + Sync + Clone + 'static>() {}
    const fn assert_sendable<T: Send + 'static>() {}
    assert_shareable::<Client>();
    assert_shareable::<JobHandle>();
    assert_sendable::<PreparedCallback>();
};

fn new_pool(config: &ClientConfig) -> Result<PagePool, ConfigError> {
    PagePool::with_huge_pages(config.page_budget, config.huge_pages)
        .map_err(|source| ConfigError::Arena { pages: config.page_budget, source })
}

fn new_io(config: &ClientConfig, clock: Clock) -> Arc<SubJobIo> {
    Arc::new(SubJobIo {
        throttler: Arc::new(Throttler::new(config.throttle, config.sub_job_size_bytes as u64, clock)),
        stats: Arc::new(StatsRecorder::default()),
        timeout: config.io_timeout_ms.map(Duration::from_millis),
        clock,
        outstanding: Arc::default(),
    })
}

fn new_actor(shared: Arc<ClientShared>, owns_system: bool) -> ClientActor {
    ClientActor { shared, running: BTreeMap::new(), shutting_down: false, owns_system }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polling_a_handle_again_and_again_keeps_one_waker() {
        let shared = Arc::new(JobShared::new(0, 8));
        let mut handle = JobHandle::new(shared.clone());
        let other = handle.clone();
        for _ in 0..10_000 {
            // A fresh waker every time, as some executors give.
            let waker = Waker::from(Arc::new(CountingWaker(AtomicU64::new(0))));
            let mut cx = TaskContext::from_waker(&waker);
            assert!(Pin::new(&mut handle).poll(&mut cx).is_pending());
        }
        assert_eq!(shared.slot.lock().unwrap().wakers.len(), 1);
        drop(other);
        let waker = Arc::new(CountingWaker(AtomicU64::new(0)));
        let std_waker = Waker::from(waker.clone());
        let mut cx = TaskContext::from_waker(&std_waker);
        assert!(Pin::new(&mut handle).poll(&mut cx).is_pending());
        shared.complete(Outcome::default());
        assert_eq!(waker.0.load(Ordering::SeqCst), 1, "the latest waker is woken");
        assert!(Pin::new(&mut handle).poll(&mut cx).is_ready());
        drop(handle);
        assert!(shared.slot.lock().unwrap().wakers.is_empty());
    }

    struct CountingWaker(AtomicU64);

    impl std::task::Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}
