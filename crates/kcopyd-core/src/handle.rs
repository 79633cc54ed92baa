//! A submitted job as its submitter sees it: the [`JobHandle`] (await it or wait on it),
//! its [`Progress`], and the outcome slot that the engine fills exactly once.
//!
//! ```text
//!  JobHandle ──┐                       ┌── run: add_done (progress), cancel_requested
//!  JobHandle ──┼─► JobShared ◄─────────┤
//!  (clones)    │    progress, cancel,  └── actors: complete(outcome), once
//!              │    outcome slot + wakers (one per handle), condvar for wait()
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::task::{Context as TaskContext, Poll, Waker};

use serde::Serialize;
use tokio::sync::Notify;

use crate::Outcome;

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
    pub(crate) job_id: u64,
    total_sectors: u64,
    done_sectors: AtomicU64,
    pub(crate) cancel: AtomicBool,
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
    pub(crate) fn new(job_id: u64, total_sectors: u64) -> JobShared {
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
    pub(crate) fn complete(&self, outcome: Outcome) {
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
/// [`start_in_current_system`](crate::Client::start_in_current_system) client is dropped with the job
/// unfinished (as cancelled, `not_copied` holding every sector not written).
pub struct JobHandle {
    shared: Arc<JobShared>,
    /// Which handle of the job this is, to keep one waker per handle.
    waker_key: u64,
}

impl JobHandle {
    pub(crate) fn new(shared: Arc<JobShared>) -> JobHandle {
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
    /// [`RunningJob::id`](crate::RunningJob::id) names it.
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
