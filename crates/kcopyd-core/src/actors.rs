//! All the actix code: the client actor, which owns the completions of a client's jobs, and
//! the job actor, which drives one job's [`JobRun`] on the client's arbiter; and the
//! messages between them and the client's handles.
//!
//! ```text
//!  Client ──Submit──► ClientActor ──start──► JobActor ──spawn──► JobRun::run (run.rs)
//!         ──Shutdown─►    │ running jobs        │                   │
//!  PreparedCallback       │ callbacks run here, │◄──── outcome ─────┘
//!         ──RunCallback─► │ one at a time       │
//!                         │◄──── JobDone ───────┘
//!                         ▼
//!  Pending::finish: callback, admission permit dropped, then JobShared::complete (handles)
//! ```
//!
//! Every job completes exactly once, whatever happens to the runtime: a submission that never
//! reaches the actor completes from the message's `Drop`, and an actor dropped with jobs still
//! running (its actix System was dropped) completes them from its own `Drop`, as cancelled.

use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use actix::prelude::*;
use tokio::sync::OwnedSemaphorePermit;

use crate::handle::JobShared;
use crate::job::{Callback, JobSpec};
use crate::run::{JobRun, panic_message};
use crate::shared::ClientShared;
use crate::{Outcome, RangeSet, TargetReport};

/// A submission travelling to the client actor. If it is dropped undelivered (the actor is
/// gone), the job still completes exactly once, as cancelled.
pub(crate) struct Pending {
    pub(crate) spec: Arc<JobSpec>,
    pub(crate) shared: Arc<JobShared>,
    pub(crate) callback: Option<Callback>,
    pub(crate) client: Arc<ClientShared>,
    pub(crate) permit: OwnedSemaphorePermit,
}

impl Pending {
    /// Completes the job: runs the callback, frees the admission permit, and only then
    /// resolves the handles, so that a caller that saw its handle resolve can submit again
    /// at once (even with `queued_jobs_max: 1`) and finds the callback's effects done.
    fn finish(self, mut outcome: Outcome) {
        let Pending { spec, shared, callback, client, permit } = self;
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
pub(crate) struct Submit(pub(crate) Option<Pending>);

impl Drop for Submit {
    fn drop(&mut self) {
        if let Some(pending) = self.0.take() {
            pending.client.submissions_in_transit.fetch_sub(1, Ordering::SeqCst);
            let outcome = not_started_outcome(&pending.spec);
            pending.finish(outcome);
        }
    }
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
pub(crate) struct Shutdown(pub(crate) Option<Arc<ClientShared>>);

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
pub(crate) struct RunCallback(pub(crate) Option<(Callback, Outcome, Arc<ClientShared>)>);

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
    /// Stops once shutting down with no job running, none accepted and still on its way here,
    /// and no prepared callback outstanding.
    fn maybe_stop(&mut self, ctx: &mut Context<Self>) {
        let waiting = !self.running.is_empty()
            || self.shared.submissions_in_transit.load(Ordering::SeqCst) > 0
            || self.shared.prepared_callbacks.load(Ordering::SeqCst) > 0;
        if !self.shutting_down || waiting {
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
        // Running (or done) from here on: no longer in transit. The actor is one thread, so
        // `maybe_stop` sees the job either in transit or running.
        self.shared.submissions_in_transit.fetch_sub(1, Ordering::SeqCst);
        if pending.spec.len_sectors == 0 {
            let outcome = not_started_outcome(&pending.spec);
            pending.finish(outcome);
            // A shutdown handled before this submission arrived waited for it.
            self.maybe_stop(ctx);
            return;
        }
        let id = pending.shared.job_id;
        let run =
            JobRun::new(pending.spec.clone(), self.shared.pool.clone(), self.shared.io.clone(), pending.shared.clone());
        JobActor { id, run: run.clone(), client: ctx.address() }.start();
        let previous = self.running.insert(id, (pending, run));
        assert!(previous.is_none(), "job id {id} started twice");
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

/// A checked verify, to run on the client's arbiter (where its reads' timeouts and the
/// throttle's clock live).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct StartVerify(pub(crate) Option<crate::verify::Started>);

impl Handler<StartVerify> for ClientActor {
    type Result = ();

    fn handle(&mut self, mut message: StartVerify, _: &mut Context<Self>) {
        let started = message.0.take().expect("a verify is started once");
        actix_rt::spawn(crate::verify::run(self.shared.clone(), started));
    }
}

/// The actor that drives one job's [`JobRun`] on the client's arbiter.
pub(crate) struct JobActor {
    id: u64,
    run: Rc<JobRun>,
    client: Addr<ClientActor>,
}

impl Actor for JobActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        match self.run.query_allocation() {
            // A sparse copy asks the source for its allocation first; the sub-jobs follow it.
            Some(query) => {
                ctx.spawn(query.into_actor(self).map(|(), actor, ctx| actor.start_run(ctx)));
            }
            None => self.start_run(ctx),
        }
    }
}

impl JobActor {
    /// Starts the job's sub-jobs; when the last is done, tells the client actor and stops.
    fn start_run(&mut self, ctx: &mut Context<Self>) {
        let work = self.run.clone().run();
        ctx.spawn(work.into_actor(self).map(|(), actor, ctx| {
            // The run stored its outcome; the client actor takes it.
            actor.client.do_send(JobDone { id: actor.id });
            ctx.stop();
        }));
    }
}

impl ClientActor {
    pub(crate) fn new(shared: Arc<ClientShared>, owns_system: bool) -> ClientActor {
        ClientActor { shared, running: BTreeMap::new(), shutting_down: false, owns_system }
    }
}
