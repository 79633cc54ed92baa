//! The client: a `Send + Sync + Clone` handle, the client actor that owns the page pool and
//! runs completions, and job handles.
//!
//! ```text
//!  Client (any thread) ──admission permit──► ClientActor (one arbiter) ──start──► JobActor
//!        ▲                                       │ callbacks run here, one at a time
//!  JobHandle ◄──── outcome slot + progress ──────┘ permit dropped after the callback
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context as TaskContext, Poll, Waker};
use std::thread::{self, ThreadId};
use std::time::Duration;

use actix::prelude::*;
use serde::Serialize;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, oneshot};

use crate::block_on::block_on;
use crate::error::{ConfigError, SubmitError};
use crate::io::SubJobIo;
use crate::job::{JobActor, JobKind, JobSpec};
use crate::stats::{ClientStats, StatsRecorder};
use crate::throttle::{Throttle, Throttler};
use crate::time_scale::Clock;
use crate::{ClientConfig, Flags, Outcome, PagePool, PoolStats, RangeSet, Region, TargetReport};

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
        Job { kind: JobKind::Copy { source }, targets, flags, callback: None }
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
pub struct Progress {
    /// Sectors finished (written, or given up on).
    pub done_sectors: u64,
    /// Sectors in the job.
    pub total_sectors: u64,
}

/// State shared between a job's handle, its actor and the client actor.
pub(crate) struct JobShared {
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
    fn new(total_sectors: u64) -> JobShared {
        JobShared {
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

    /// Stores the outcome and wakes every waiter. Exactly once per job.
    fn complete(&self, outcome: Outcome) {
        let mut slot = self.slot.lock().expect("outcome lock");
        assert!(slot.outcome.is_none(), "a job completed twice");
        slot.outcome = Some(outcome);
        std::mem::take(&mut slot.wakers).into_values().for_each(Waker::wake);
        self.completed.notify_all();
    }
}

/// A submitted job: await it (or [`wait`](JobHandle::wait)) for its [`Outcome`], watch its
/// progress, or cancel it. Cloning gives another handle to the same job.
pub struct JobHandle {
    shared: Arc<JobShared>,
    /// Which handle of the job this is, to keep one waker per handle.
    id: u64,
}

impl JobHandle {
    fn new(shared: Arc<JobShared>) -> JobHandle {
        let id = {
            let mut slot = shared.slot.lock().expect("outcome lock");
            slot.next_handle += 1;
            slot.next_handle
        };
        JobHandle { shared, id }
    }
}

impl Clone for JobHandle {
    fn clone(&self) -> JobHandle {
        JobHandle::new(self.shared.clone())
    }
}

impl Drop for JobHandle {
    fn drop(&mut self) {
        if let Ok(mut slot) = self.shared.slot.lock() {
            slot.wakers.remove(&self.id);
        }
    }
}

impl JobHandle {
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
        self.shared.slot.lock().expect("outcome lock").outcome.clone()
    }

    /// Blocks this thread until the job completes. Do not call it on the client's worker
    /// (from a callback): the job could never complete.
    pub fn wait(self) -> Outcome {
        let mut slot = self.shared.slot.lock().expect("outcome lock");
        loop {
            if let Some(outcome) = &slot.outcome {
                return outcome.clone();
            }
            slot = self.shared.completed.wait(slot).expect("outcome lock");
        }
    }
}

impl Future for JobHandle {
    type Output = Outcome;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Outcome> {
        let mut slot = self.shared.slot.lock().expect("outcome lock");
        match &slot.outcome {
            Some(outcome) => Poll::Ready(outcome.clone()),
            None => {
                let id = self.id;
                match slot.wakers.get_mut(&id) {
                    Some(waker) if waker.will_wake(cx.waker()) => {}
                    Some(waker) => waker.clone_from(cx.waker()),
                    None => {
                        slot.wakers.insert(id, cx.waker().clone());
                    }
                }
                Poll::Pending
            }
        }
    }
}

impl fmt::Debug for JobHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobHandle").field("progress", &self.progress()).finish()
    }
}

/// What the client saw when it shut down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ShutdownReport {
    /// The pool at shutdown: `pages_in_use` is 0 (asserted) unless requests are outstanding.
    pub pool: PoolStats,
    /// Jobs completed over the client's life.
    pub jobs_completed: u64,
    /// Requests that timed out ([`ClientConfig::io_timeout_ms`]) and that their devices have not
    /// completed yet: they hold the buffers, and so the `pool.pages_in_use` pages, that a
    /// device may still be using. Zero without a timeout.
    pub requests_outstanding: u64,
}

/// A submission travelling to the client actor. If it is dropped undelivered (the actor is
/// gone), the job still completes exactly once, as cancelled.
struct Pending {
    spec: Arc<JobSpec>,
    shared: Arc<JobShared>,
    callback: Option<Callback>,
    stats: Arc<StatsRecorder>,
    _permit: OwnedSemaphorePermit,
}

impl Pending {
    /// Completes the job: runs the callback, frees the admission permit, and only then
    /// resolves the handles, so that a caller that saw its handle resolve can submit again
    /// at once (even with `queued_jobs_max: 1`) and finds the callback's effects done.
    fn finish(self, mut outcome: Outcome) {
        let Pending { spec, shared, callback, stats, _permit: permit } = self;
        stats.job_completed(&outcome);
        if let Some(callback) = callback {
            // A panicking callback must not take the client (and every later job) down with
            // it: report it in the outcome and as a diagnostic event, and go on.
            if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| callback(outcome.clone()))) {
                let message = panic_message(&*panic);
                tracing::error!(
                    panic = %message,
                    first_target = spec.targets.first().map(|t| t.device.name()).unwrap_or(""),
                    "kcopyd: a job's completion callback panicked"
                );
                outcome.callback_panicked = Some(message);
            }
        }
        // Admission counts a job until its callback has run, and no longer than that.
        drop(permit);
        shared.complete(outcome);
    }
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

#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct JobDone {
    pub(crate) id: u64,
    pub(crate) outcome: Outcome,
}

#[derive(Message)]
#[rtype(result = "()")]
struct Shutdown(Option<oneshot::Sender<ShutdownReport>>);

/// The actor that owns the pool, starts job actors and runs completions.
pub(crate) struct ClientActor {
    pool: PagePool,
    io: Arc<SubJobIo>,
    next_id: u64,
    running: BTreeMap<u64, Pending>,
    jobs_completed: u64,
    shutdown_replies: Vec<oneshot::Sender<ShutdownReport>>,
    shutting_down: bool,
    /// Stop the actix System when done (the client owns its worker thread).
    owns_system: bool,
}

impl Actor for ClientActor {
    type Context = Context<Self>;
}

impl ClientActor {
    fn maybe_stop(&mut self, ctx: &mut Context<Self>) {
        if !self.shutting_down || !self.running.is_empty() {
            return;
        }
        let pool = self.pool.stats();
        // Only timed-out requests still in their devices may hold pages now.
        let requests_outstanding = self.io.requests_outstanding();
        assert!(
            pool.pages_in_use == 0 || requests_outstanding > 0,
            "every page is back in the pool once all jobs completed: {pool:?}"
        );
        let report = ShutdownReport { pool, jobs_completed: self.jobs_completed, requests_outstanding };
        for reply in self.shutdown_replies.drain(..) {
            let _ = reply.send(report);
        }
        ctx.stop();
        if self.owns_system {
            System::current().stop();
        }
    }
}

impl Handler<Submit> for ClientActor {
    type Result = ();

    fn handle(&mut self, mut message: Submit, ctx: &mut Context<Self>) {
        let pending = message.0.take().expect("a submission is handled once");
        if pending.spec.len_sectors == 0 {
            self.jobs_completed += 1;
            let outcome = not_started_outcome(&pending.spec);
            pending.finish(outcome);
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
        JobActor::new(
            id,
            pending.spec.clone(),
            self.pool.clone(),
            self.io.clone(),
            pending.shared.clone(),
            ctx.address(),
        )
        .start();
        self.running.insert(id, pending);
    }
}

impl Handler<JobDone> for ClientActor {
    type Result = ();

    fn handle(&mut self, done: JobDone, ctx: &mut Context<Self>) {
        let pending = self.running.remove(&done.id).expect("a job completes once");
        self.jobs_completed += 1;
        pending.finish(done.outcome);
        self.maybe_stop(ctx);
    }
}

impl Handler<Shutdown> for ClientActor {
    type Result = ();

    fn handle(&mut self, message: Shutdown, ctx: &mut Context<Self>) {
        self.shutting_down = true;
        self.shutdown_replies.extend(message.0);
        self.maybe_stop(ctx);
    }
}

struct ClientInner {
    addr: Addr<ClientActor>,
    config: ClientConfig,
    pool: PagePool,
    io: Arc<SubJobIo>,
    admission: Arc<Semaphore>,
    closed: AtomicBool,
    worker: Mutex<Option<thread::JoinHandle<()>>>,
    worker_thread: ThreadId,
    last_report: Mutex<Option<ShutdownReport>>,
}

impl Drop for ClientInner {
    fn drop(&mut self) {
        if !self.closed.load(Ordering::Acquire) {
            // Let running jobs finish, then stop; nobody is left to wait for the report.
            self.addr.do_send(Shutdown(None));
        }
    }
}

/// A copy-engine client: a page pool and the actors that run jobs on it.
///
/// The handle is `Send + Sync + Clone`; use it from async code ([`submit`](Client::submit)),
/// from plain threads ([`submit_blocking`](Client::submit_blocking)) or from a callback
/// ([`try_submit`](Client::try_submit)).
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
        let io = new_io(&config, Clock::REAL);
        let (sender, receiver) = std::sync::mpsc::channel();
        let actor_pool = pool.clone();
        let actor_io = io.clone();
        let worker = thread::Builder::new()
            .name("kcopyd-client".into())
            .spawn(move || {
                let system = System::new();
                let addr = system.block_on(async move { new_actor(actor_pool, actor_io, true).start() });
                sender.send(addr).expect("the starting thread waits for the address");
                system.run().expect("the client's actix system runs");
            })
            .map_err(ConfigError::Worker)?;
        let worker_thread = worker.thread().id();
        let addr = receiver.recv().expect("the worker sends its address");
        Ok(Client::from_parts(addr, config, pool, io, Some(worker), worker_thread))
    }

    /// Starts a client on the current actix arbiter, sharing the caller's thread (what the
    /// deterministic simulator does). Callbacks then run on this thread.
    ///
    /// # Errors
    /// The configuration is out of bounds, or the arena cannot be had.
    ///
    /// # Panics
    /// Outside a running actix `System`.
    pub fn start_in_current_system(config: ClientConfig) -> Result<Client, ConfigError> {
        config.validate()?;
        let pool = new_pool(&config)?;
        let io = new_io(&config, Clock::of_this_thread());
        let addr = new_actor(pool.clone(), io.clone(), false).start();
        Ok(Client::from_parts(addr, config, pool, io, None, thread::current().id()))
    }

    fn from_parts(
        addr: Addr<ClientActor>,
        config: ClientConfig,
        pool: PagePool,
        io: Arc<SubJobIo>,
        worker: Option<thread::JoinHandle<()>>,
        worker_thread: ThreadId,
    ) -> Client {
        let admission = Arc::new(Semaphore::new(config.queued_jobs_max));
        Client {
            inner: Arc::new(ClientInner {
                addr,
                config,
                pool,
                io,
                admission,
                closed: AtomicBool::new(false),
                worker: Mutex::new(worker),
                worker_thread,
                last_report: Mutex::new(None),
            }),
        }
    }

    /// The configuration the client runs with.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// The throttle in force now (the configuration's, or the last one set).
    pub fn throttle(&self) -> Throttle {
        self.inner.io.throttler.get()
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
        self.inner.io.throttler.set(throttle);
        Ok(())
    }

    /// What the client has done since it started: jobs, per-device I/O with latency
    /// histograms, the pool's high-water mark, time waiting for pages and for the throttle.
    /// A consistent snapshot of each counter, taken without stopping the client.
    pub fn stats(&self) -> ClientStats {
        self.inner.io.stats.snapshot(self.inner.pool.stats(), self.inner.io.requests_outstanding())
    }

    /// The page pool's occupancy and high-water mark.
    pub fn pool_stats(&self) -> PoolStats {
        self.inner.pool.stats()
    }

    /// Validates `job` and submits it, waiting while the queued-jobs limit is reached.
    ///
    /// # Errors
    /// A validation error (nothing was read or written), or the client is shut down.
    pub async fn submit(&self, job: Job) -> Result<JobHandle, SubmitError> {
        let prepared = self.prepare(job)?;
        let permit = self.inner.admission.clone().acquire_owned().await.map_err(|_| SubmitError::ShutDown)?;
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
        let permit = block_on(self.inner.admission.clone().acquire_owned()).map_err(|_| SubmitError::ShutDown)?;
        Ok(self.send(prepared, permit))
    }

    /// As [`submit`](Client::submit), but fails with [`SubmitError::QueueFull`] instead of
    /// waiting. Safe to call from a callback.
    ///
    /// # Errors
    /// As `submit`, and `QueueFull`.
    pub fn try_submit(&self, job: Job) -> Result<JobHandle, SubmitError> {
        let prepared = self.prepare(job)?;
        let permit = self.inner.admission.clone().try_acquire_owned().map_err(|error| match error {
            tokio::sync::TryAcquireError::Closed => SubmitError::ShutDown,
            tokio::sync::TryAcquireError::NoPermits => {
                SubmitError::QueueFull { max: self.inner.config.queued_jobs_max }
            }
        })?;
        Ok(self.send(prepared, permit))
    }

    fn prepare(&self, job: Job) -> Result<(Arc<JobSpec>, Option<Callback>), SubmitError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(SubmitError::ShutDown);
        }
        let spec = JobSpec::validate(job.kind, job.targets, job.flags, &self.inner.config)?;
        Ok((Arc::new(spec), job.callback))
    }

    fn send(&self, (spec, callback): (Arc<JobSpec>, Option<Callback>), permit: OwnedSemaphorePermit) -> JobHandle {
        let shared = Arc::new(JobShared::new(spec.len_sectors));
        let handle = JobHandle::new(shared.clone());
        let stats = self.inner.io.stats.clone();
        stats.job_submitted();
        self.inner.addr.do_send(Submit(Some(Pending { spec, shared, callback, stats, _permit: permit })));
        handle
    }

    /// Stops taking jobs, waits for every job to complete, checks that every page is back in
    /// the pool and stops the worker.
    pub async fn shutdown(&self) -> ShutdownReport {
        let receiver = self.begin_shutdown();
        let report = receiver.await;
        self.end_shutdown(report.ok())
    }

    /// As [`shutdown`](Client::shutdown), blocking this thread.
    ///
    /// # Panics
    /// On the client's worker thread (from a callback): it would wait for itself.
    pub fn shutdown_blocking(&self) -> ShutdownReport {
        assert_ne!(thread::current().id(), self.inner.worker_thread, "shutdown_blocking on the client's worker");
        let receiver = self.begin_shutdown();
        let report = block_on(receiver);
        self.end_shutdown(report.ok())
    }

    fn begin_shutdown(&self) -> oneshot::Receiver<ShutdownReport> {
        self.inner.closed.store(true, Ordering::Release);
        self.inner.admission.close();
        let (sender, receiver) = oneshot::channel();
        self.inner.addr.do_send(Shutdown(Some(sender)));
        receiver
    }

    fn end_shutdown(&self, report: Option<ShutdownReport>) -> ShutdownReport {
        let mut last = self.inner.last_report.lock().expect("report lock");
        if let Some(report) = report {
            *last = Some(report);
        }
        if let Some(worker) = self.inner.worker.lock().expect("worker lock").take() {
            // The system stops right after the reply, so this join is short.
            worker.join().expect("the client's worker does not panic");
        }
        last.expect("the client actor reported when it stopped")
    }
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client").field("config", &self.inner.config).field("pool", &self.inner.pool).finish()
    }
}

// The handles are for any thread and any runtime.
const _: () = {
    const fn assert_shareable<T: Send + Sync + Clone + 'static>() {}
    assert_shareable::<Client>();
    assert_shareable::<JobHandle>();
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

fn new_actor(pool: PagePool, io: Arc<SubJobIo>, owns_system: bool) -> ClientActor {
    ClientActor {
        pool,
        io,
        next_id: 0,
        running: BTreeMap::new(),
        jobs_completed: 0,
        shutdown_replies: Vec::new(),
        shutting_down: false,
        owns_system,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polling_a_handle_again_and_again_keeps_one_waker() {
        let shared = Arc::new(JobShared::new(8));
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
