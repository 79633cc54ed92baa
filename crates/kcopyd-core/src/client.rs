//! The client: a `Send + Sync + Clone` handle that admits jobs (validation, then the
//! queued-jobs limit) and shuts down; prepared callbacks queued on its completion context.
//!
//! ```text
//!  Client (any thread) ──validate──► admission permit ──Submit──► ClientActor (actors.rs)
//!        │                                                           │
//!        │ shutdown: close, Shutdown message,                        │ publishes the
//!        │ wait for the report (ClientShared) ◄──────────────────────┘ ShutdownReport
//!        ▼
//!  JobHandle (handle.rs)
//! ```

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, ThreadId};
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::OwnedSemaphorePermit;

use crate::actors::{ClientActor, Pending, RunCallback, Shutdown, Submit};
use crate::block_on::{block_on, block_on_timeout};
use crate::error::{ConfigError, ShutdownError, SubmitError};
use crate::handle::{JobHandle, JobShared};
use crate::io::SubjobIo;
use crate::job::{Callback, Job, JobSpec};
use crate::shared::{ClientShared, Registered, ShutdownReport};
use crate::stats::{ClientStats, StatsRecorder};
use crate::throttle::{Throttle, Throttler};
use crate::time_scale::Clock;
use crate::{ClientConfig, Outcome, PagePool, PoolStats, TargetMask};

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
                let addr = system.block_on(async move { ClientActor::new(actor_shared, true).start() });
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
        let addr = ClientActor::start_in_arbiter(&arbiter, move |_| ClientActor::new(actor_shared, false));
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

    /// Starts comparing `verify`'s source region with its targets, on the client's arbiter,
    /// in its page budget and under its throttle. Not a job: the queued-jobs limit does not
    /// count it, and a shutdown does not wait for it (its handle then says so).
    ///
    /// # Errors
    /// No target or too many, a target region not as long as the source's, one block larger
    /// than the page budget, or the client is shut down.
    pub fn verify(&self, verify: crate::Verify) -> Result<crate::VerifyHandle, crate::VerifyError> {
        if self.inner.shared.closed.load(Ordering::SeqCst) {
            return Err(crate::VerifyError::ShutDown);
        }
        let (handle, started) = crate::verify::start(verify, &self.inner.config)?;
        self.inner.addr.do_send(crate::actors::StartVerify(Some(started)));
        Ok(handle)
    }

    /// Validates `job` and submits it, waiting while the queued-jobs limit is reached.
    ///
    /// # Errors
    /// A validation error (nothing was read or written), or the client is shut down.
    pub async fn submit(&self, job: Job) -> Result<JobHandle, SubmitError> {
        let prepared = self.prepare(job)?;
        let permit = self.inner.shared.admission.clone().acquire_owned().await.map_err(|_| SubmitError::ShutDown)?;
        self.send(prepared, permit)
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
        self.send(prepared, permit)
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
        self.send(prepared, permit)
    }

    fn prepare(&self, job: Job) -> Result<(Arc<JobSpec>, Option<Callback>), SubmitError> {
        if self.inner.shared.closed.load(Ordering::Acquire) {
            return Err(SubmitError::ShutDown);
        }
        let (spec, callback) = job.validate(&self.inner.config)?;
        Ok((Arc::new(spec), callback))
    }

    /// Hands an admitted job to the client actor. A shutdown may have begun since `prepare`
    /// looked (the permit can be had until the admission semaphore closes): the job is counted
    /// in transit first and the client checked closed after, so that either the submission
    /// fails with `ShutDown` or the actor, which handles the shutdown only after `close`, sees
    /// the count and waits for the job. A submit that returned `Ok` is never cancelled by a
    /// concurrent shutdown.
    fn send(
        &self,
        (spec, callback): (Arc<JobSpec>, Option<Callback>),
        permit: OwnedSemaphorePermit,
    ) -> Result<JobHandle, SubmitError> {
        let client = &self.inner.shared;
        client.submissions_in_transit.fetch_add(1, Ordering::SeqCst);
        if client.closed.load(Ordering::SeqCst) {
            client.submissions_in_transit.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::ShutDown);
        }
        let id = client.next_job_id.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::new(JobShared::new(id, spec.len_sectors));
        let handle = JobHandle::new(shared.clone());
        client.io.stats.job_submitted();
        let previous = client.running().insert(id, Registered { spec: spec.clone(), shared: shared.clone() });
        assert!(previous.is_none(), "job id {id} was given twice");
        let pending = Pending { spec, shared, callback, client: client.clone(), permit };
        // A closed mailbox (the actor is gone) drops the message, and dropping it completes
        // the job.
        self.inner.addr.do_send(Submit(Some(pending)));
        Ok(handle)
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

fn new_io(config: &ClientConfig, clock: Clock) -> Arc<SubjobIo> {
    Arc::new(SubjobIo {
        throttler: Arc::new(Throttler::new(config.throttle, config.subjob_size_bytes as u64, clock)),
        stats: Arc::new(StatsRecorder::default()),
        timeout: config.io_timeout_ms.map(Duration::from_millis),
        clock,
        outstanding: Arc::default(),
    })
}
