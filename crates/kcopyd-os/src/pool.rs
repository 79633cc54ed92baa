//! The thread pool every engine keeps for blocking work: the synchronous engine's reads,
//! writes and flushes, and, for every engine, the work no engine has an asynchronous form of
//! (BLKZEROOUT, fallocate, SEEK_DATA). It knows nothing of devices or engines.
//!
//! ```text
//!  caller thread                     pool (≤ threads_max std threads, started on demand)
//!  submit(work) ──push──► queue ──► worker: run work (owns the buffer and the file handle)
//!       │                              │  drop what the work captured first,
//!       ◄──────── oneshot ◄────────────┘  then send the result back
//!  await the receiver (Send)
//! ```

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;

use tokio::sync::oneshot;

type Work = Box<dyn FnOnce() + Send + 'static>;

/// A pool of at most `threads_max` threads running blocking work in submission order.
pub(crate) struct Pool {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    work_ready: Condvar,
    threads_max: usize,
    thread_name: String,
}

struct State {
    queue: VecDeque<Work>,
    threads: usize,
    threads_idle: usize,
    closed: bool,
}

impl Pool {
    /// A pool of up to `threads_max` threads (at least 1) named `thread_name`, with its first
    /// thread running: every submission is served even if no further thread can be started.
    pub(crate) fn new(thread_name: &str, threads_max: usize) -> io::Result<Pool> {
        assert!(threads_max >= 1, "a pool needs a thread");
        let shared = Arc::new(Shared {
            state: Mutex::new(State { queue: VecDeque::new(), threads: 1, threads_idle: 0, closed: false }),
            work_ready: Condvar::new(),
            threads_max,
            thread_name: thread_name.into(),
        });
        spawn_worker(&shared)?;
        Ok(Pool { shared })
    }

    /// Queues `work` and returns the receiver of its result; never blocks on I/O.
    ///
    /// A new thread starts when more work is queued than threads are idle, up to the limit.
    pub(crate) fn submit<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> oneshot::Receiver<T> {
        let (sender, receiver) = oneshot::channel();
        let work: Work = Box::new(move || {
            // `work` and what it captured (the file handle) are dropped before the reply
            // goes out, so that a caller who sees the reply can rely on the handle being shut.
            let output = work();
            let _ = sender.send(output);
        });
        let start_thread = {
            let mut state = self.shared.lock();
            state.queue.push_back(work);
            let start = state.queue.len() > state.threads_idle && state.threads < self.shared.threads_max;
            if start {
                state.threads += 1;
            }
            start
        };
        self.shared.work_ready.notify_one();
        if start_thread && spawn_worker(&self.shared).is_err() {
            // The threads already running serve the queue; only parallelism is lost.
            self.shared.lock().threads -= 1;
        }
        receiver
    }

    /// Threads running now.
    #[cfg(test)]
    pub(crate) fn threads(&self) -> usize {
        self.shared.lock().threads
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Workers finish what is queued (work whose caller went away still owns its buffer),
        // then exit. Nobody waits for them: a drop must not block the caller's thread.
        self.shared.lock().closed = true;
        self.shared.work_ready.notify_all();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("pool lock")
    }
}

fn spawn_worker(shared: &Arc<Shared>) -> io::Result<()> {
    let shared = shared.clone();
    thread::Builder::new().name(shared.thread_name.clone()).spawn(move || worker(&shared))?;
    Ok(())
}

fn worker(shared: &Shared) {
    let mut state = shared.lock();
    loop {
        if let Some(work) = state.queue.pop_front() {
            drop(state);
            work();
            state = shared.lock();
            continue;
        }
        if state.closed {
            state.threads -= 1;
            return;
        }
        state.threads_idle += 1;
        state = shared.work_ready.wait(state).expect("pool lock");
        state.threads_idle -= 1;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    fn block_on<F: std::future::Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(future)
    }

    #[test]
    fn submit_returns_at_once_and_work_runs_on_another_thread() {
        let pool = Pool::new("kcopyd-io-test", 2).unwrap();
        let (release, gate) = mpsc::channel::<()>();
        let caller = thread::current().id();
        let mut receiver = pool.submit(move || {
            gate.recv().unwrap();
            thread::current().id()
        });
        // The work is blocked on the gate, yet the caller got its receiver back.
        assert!(receiver.try_recv().is_err());
        release.send(()).unwrap();
        let worker = block_on(receiver).unwrap();
        assert_ne!(worker, caller);
    }

    #[test]
    fn threads_never_exceed_the_limit_and_all_work_completes() {
        const THREADS_MAX: usize = 3;
        let pool = Pool::new("kcopyd-io-test", THREADS_MAX).unwrap();
        let running = Arc::new(AtomicUsize::new(0));
        let running_max = Arc::new(AtomicUsize::new(0));
        let (release, gate) = mpsc::channel::<()>();
        let gate = Arc::new(Mutex::new(gate));
        let receivers: Vec<_> = (0..10)
            .map(|i| {
                let (running, running_max, gate) = (running.clone(), running_max.clone(), gate.clone());
                pool.submit(move || {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    running_max.fetch_max(now, Ordering::SeqCst);
                    gate.lock().unwrap().recv_timeout(Duration::from_secs(10)).unwrap();
                    running.fetch_sub(1, Ordering::SeqCst);
                    i
                })
            })
            .collect();
        assert!(pool.threads() <= THREADS_MAX);
        for _ in 0..10 {
            release.send(()).unwrap();
        }
        let results: Vec<usize> = receivers.into_iter().map(|r| block_on(r).unwrap()).collect();
        assert_eq!(results, (0..10).collect::<Vec<_>>());
        assert!(running_max.load(Ordering::SeqCst) <= THREADS_MAX);
        assert_eq!(pool.threads(), THREADS_MAX, "ten queued requests start every allowed thread");
    }

    #[test]
    fn work_queued_before_drop_still_completes() {
        let pool = Pool::new("kcopyd-io-test", 1).unwrap();
        let receivers: Vec<_> = (0..4).map(|i| pool.submit(move || i * 2)).collect();
        drop(pool);
        let results: Vec<usize> = receivers.into_iter().map(|r| block_on(r).unwrap()).collect();
        assert_eq!(results, vec![0, 2, 4, 6]);
    }
}
