//! A client on a worker thread of its own (`Client::new`), driven from plain threads: what an
//! embedder does, and what the swarm (one thread, `Client::start_in_current_system`) never
//! does. A property test draws cases from seeds.
//!
//! ```text
//!  thread 0 ─ submit_blocking / try_submit / submit ──┐
//!  thread 1 ─ …                                       ├─► Client ──► worker thread ──► callbacks
//!  main ─ prepare_callback, then shutdown_blocking,   │             (plants a thread-local whose
//!         shutdown_timeout, a racing shutdown or drop ┘              destructor says "exited")
//! ```
//!
//! What must hold: `config()` is the configuration given; every accepted job completes once,
//! copies its source exactly and runs its callback on the worker (never the submitting
//! thread); from a callback, `submit_blocking` says `WouldBlockWorker` and `shutdown_timeout`
//! `OnWorker`; only a racing shutdown refuses jobs, and only with `ShutDown`; the report counts
//! every accepted job and no page in use; `shutdown_blocking` and `shutdown_timeout` return
//! only once the worker thread has exited, and dropping every handle makes it exit by itself.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::{self, ThreadId};
use std::time::{Duration, Instant};

use kcopyd_core::{Client, ClientConfig, Flags, Job, JobHandle, Outcome, ShutdownError, SubmitError, TargetMask};
use kcopyd_sim::mix64;
use serde::{Deserialize, Serialize};

use crate::scenario::Draw;
use crate::util::{patterned, region, zeroed};

/// How long a dropped client's worker may take to exit by itself.
const DROPPED_WORKER_EXIT: Duration = Duration::from_secs(10);

/// How a thread submits its jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SubmitWay {
    /// `submit_blocking`.
    Blocking,
    /// `try_submit`, again after a short sleep while the queue is full.
    Try,
    /// `submit`, on a current-thread runtime of the thread's own.
    Async,
}

/// How the case ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum End {
    /// `shutdown_blocking` once every thread has submitted and waited.
    ShutdownBlocking,
    /// `shutdown_timeout` (a minute) once every thread has submitted and waited.
    ShutdownTimeout,
    /// Every handle dropped, without shutdown, once every thread has submitted and waited.
    Drop,
    /// `shutdown_blocking` while the threads still submit.
    Racing,
}

/// One job: a copy of `len_sectors` between two disks of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobDraw {
    /// Length in sectors.
    pub len_sectors: u64,
    /// Its callback calls `submit_blocking` and `shutdown_timeout` on the worker.
    pub probe: bool,
}

/// One case: a configuration, the jobs of each thread and the way it ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadedCase {
    /// The seed it was drawn from.
    pub seed: u64,
    /// The client's configuration.
    pub config: ClientConfig,
    /// Per thread: how it submits and its jobs.
    pub threads: Vec<(SubmitWay, Vec<JobDraw>)>,
    /// How it ends.
    pub end: End,
}

/// What the worker's thread-local tells when the thread exits: its destructor waits a little
/// first, so that a caller not joining the thread returns before it is set.
struct ExitSentinel(Arc<AtomicBool>);

impl Drop for ExitSentinel {
    fn drop(&mut self) {
        thread::sleep(Duration::from_millis(20));
        self.0.store(true, Ordering::SeqCst);
    }
}

thread_local! {
    static SENTINEL: RefCell<Option<ExitSentinel>> = const { RefCell::new(None) };
}

/// What the callbacks saw, shared with the checking thread.
#[derive(Default)]
struct Seen {
    worker: Mutex<Option<ThreadId>>,
    exited: Arc<AtomicBool>,
    callbacks: AtomicUsize,
    problems: Mutex<Vec<String>>,
}

impl Seen {
    fn problem(&self, problem: String) {
        self.problems.lock().unwrap().push(problem);
    }

    /// Notes the thread a callback runs on: the same worker every time.
    fn on_worker(&self, what: &str) {
        let here = thread::current().id();
        let mut worker = self.worker.lock().unwrap();
        match *worker {
            None => *worker = Some(here),
            Some(id) if id != here => self.problem(format!("{what} ran on {here:?}, not the worker {id:?}")),
            Some(_) => {}
        }
    }
}

/// A job that ran: its disks, and its handle or why it was refused.
struct Submitted {
    source: Arc<kcopyd_sim::MemDisk>,
    target: Arc<kcopyd_sim::MemDisk>,
    len: u64,
    submitter: ThreadId,
    result: Result<Outcome, SubmitError>,
}

impl ThreadedCase {
    /// The case of `seed`.
    pub fn from_seed(seed: u64) -> ThreadedCase {
        let mut draw = Draw(mix64(seed ^ 0x7468_7265_6164));
        let config = ClientConfig {
            page_budget: 1 + draw.below(48) as usize,
            subjob_size_bytes: [4096, 8192, 65536][draw.below(3) as usize],
            subjobs_in_flight: 1 + draw.below(4) as usize,
            queued_jobs_max: 1 + draw.below(6) as usize,
            huge_pages: draw.below(2) == 0,
            ..ClientConfig::default()
        };
        let threads = (0..1 + draw.below(4))
            .map(|_| {
                let way = [SubmitWay::Blocking, SubmitWay::Try, SubmitWay::Async][draw.below(3) as usize];
                let jobs = (0..1 + draw.below(4))
                    .map(|_| JobDraw { len_sectors: 1 + draw.below(300), probe: draw.below(3) == 0 })
                    .collect();
                (way, jobs)
            })
            .collect();
        let end = [End::ShutdownBlocking, End::ShutdownTimeout, End::Drop, End::Racing][draw.below(4) as usize];
        ThreadedCase { seed, config, threads, end }
    }

    /// Runs the case; every way it broke what the module promises.
    pub fn check(&self) -> Vec<String> {
        let client = Client::new(self.config.clone()).expect("a drawn configuration is valid");
        let seen = Arc::new(Seen::default());
        let mut problems = self.check_handle(&client);
        self.plant_sentinel(&client, &seen, &mut problems);
        let workers: Vec<_> = self
            .threads
            .iter()
            .enumerate()
            .map(|(index, (way, jobs))| {
                let (client, seen, jobs, way) = (client.clone(), seen.clone(), jobs.clone(), *way);
                let seed = self.seed.wrapping_add(index as u64 * 1000);
                thread::spawn(move || run_thread(client, &seen, way, &jobs, seed))
            })
            .collect();
        // A racing shutdown now; a drop now too, while the threads still submit (they drop
        // their handles once their jobs are in, before waiting for them).
        let (report, client) = match self.end {
            End::Racing => (Some(client.shutdown_blocking()), None),
            End::Drop => {
                drop(client);
                (None, None)
            }
            _ => (None, Some(client)),
        };
        let submitted: Vec<Submitted> =
            workers.into_iter().flat_map(|w| w.join().expect("a thread panicked")).collect();
        let report = match client {
            Some(client) => self.end_after(client, &mut problems),
            None => report,
        };
        if self.end == End::Drop {
            wait_for_exit(&seen, &mut problems);
        }
        if self.end != End::Drop && !seen.exited.load(Ordering::SeqCst) {
            problems.push(format!("{:?} returned before the worker thread exited", self.end));
        }
        problems.extend(self.check_jobs(&submitted, &seen));
        if let Some(report) = report {
            let accepted = submitted.iter().filter(|s| s.result.is_ok()).count() as u64;
            if report.jobs_completed != accepted || report.pool.pages_in_use != 0 {
                problems.push(format!("report {report:?} for {accepted} accepted jobs"));
            }
        }
        problems.extend(seen.problems.lock().unwrap().drain(..));
        problems
    }

    /// `config()` and the `Debug` texts of the client and of a prepared callback.
    fn check_handle(&self, client: &Client) -> Vec<String> {
        let mut problems = Vec::new();
        if client.config() != &self.config {
            problems.push(format!("config() is {:?}, not the configuration given", client.config()));
        }
        let text = format!("{client:?}");
        if !text.starts_with("Client") || !text.contains(&format!("page_budget: {}", self.config.page_budget)) {
            problems.push(format!("the client's Debug text {text:?} names neither it nor its page budget"));
        }
        problems
    }

    /// A prepared callback, completed and waited for: it plants the worker's thread-local.
    fn plant_sentinel(&self, client: &Client, seen: &Arc<Seen>, problems: &mut Vec<String>) {
        let (sender, receiver) = mpsc::channel();
        let flag = seen.exited.clone();
        let seen_here = seen.clone();
        let prepared = client
            .prepare_callback(move |outcome| {
                seen_here.on_worker("a prepared callback");
                SENTINEL.with(|s| *s.borrow_mut() = Some(ExitSentinel(flag)));
                sender.send(outcome).expect("the case waits for it");
            })
            .expect("a running client prepares callbacks");
        let text = format!("{prepared:?}");
        if !text.contains("PreparedCallback") || !text.contains("queued: false") {
            problems.push(format!("a prepared callback's Debug text is {text:?}"));
        }
        prepared.complete(true, TargetMask::new());
        match receiver.recv_timeout(DROPPED_WORKER_EXIT) {
            Ok(outcome) if outcome.read_err && !outcome.cancelled => {}
            other => problems.push(format!("the prepared callback got {other:?}")),
        }
    }

    /// Shuts the client down once every thread has finished: the report.
    fn end_after(&self, client: Client, problems: &mut Vec<String>) -> Option<kcopyd_core::ShutdownReport> {
        let report = if self.end == End::ShutdownTimeout {
            client
                .shutdown_timeout(Duration::from_secs(60))
                .map_err(|error| problems.push(format!("shutdown_timeout from a plain thread: {error}")))
                .ok()
        } else {
            Some(client.shutdown_blocking())
        };
        if !matches!(client.try_submit(Job::zero(vec![], Flags::empty())), Err(SubmitError::ShutDown)) {
            problems.push("a shut client took a job".into());
        }
        report
    }

    /// Every accepted job copied its source and ran its callback once; refusals only from a
    /// racing shutdown.
    fn check_jobs(&self, submitted: &[Submitted], seen: &Seen) -> Vec<String> {
        let mut problems = Vec::new();
        let mut accepted = 0;
        for (index, job) in submitted.iter().enumerate() {
            match &job.result {
                Ok(outcome) => {
                    accepted += 1;
                    if !outcome.is_ok() {
                        problems.push(format!("job {index}: {outcome:?}"));
                    } else if job.source.snapshot(0, job.len) != job.target.snapshot(0, job.len) {
                        problems.push(format!("job {index}: the target differs from its source"));
                    }
                }
                Err(SubmitError::ShutDown) if self.end == End::Racing => {}
                Err(error) => problems.push(format!("job {index} refused: {error}")),
            }
            if seen.worker.lock().unwrap().is_some_and(|worker| worker == job.submitter) {
                problems.push(format!("job {index} was submitted from the worker"));
            }
        }
        let ran = seen.callbacks.load(Ordering::SeqCst);
        if ran != accepted {
            problems.push(format!("{ran} job callbacks ran for {accepted} accepted jobs"));
        }
        problems
    }
}

/// The worker of a client whose every handle is gone exits by itself, soon.
fn wait_for_exit(seen: &Seen, problems: &mut Vec<String>) {
    let since = Instant::now();
    while !seen.exited.load(Ordering::SeqCst) && since.elapsed() < DROPPED_WORKER_EXIT {
        thread::sleep(Duration::from_millis(5));
    }
    if !seen.exited.load(Ordering::SeqCst) {
        problems.push(format!("the worker of a dropped client still runs after {DROPPED_WORKER_EXIT:?}"));
    }
}

/// One submitting thread: its jobs, submitted its way; its handle on the client dropped; then
/// the jobs waited for.
fn run_thread(client: Client, seen: &Arc<Seen>, way: SubmitWay, jobs: &[JobDraw], seed: u64) -> Vec<Submitted> {
    let runtime = tokio::runtime::Builder::new_current_thread().build().expect("a runtime");
    let handles: Vec<_> = jobs
        .iter()
        .enumerate()
        .map(|(index, draw)| {
            let source = patterned("source", draw.len_sectors, 512, seed + index as u64);
            let target = zeroed("target", draw.len_sectors, 512);
            let make = || {
                Job::copy(
                    region(&source, 0, draw.len_sectors),
                    vec![region(&target, 0, draw.len_sectors)],
                    Flags::empty(),
                )
                .on_complete(callback(seen, draw.probe.then(|| client.clone())))
            };
            let result = match way {
                SubmitWay::Blocking => client.submit_blocking(make()),
                SubmitWay::Try => try_until_admitted(&client, make),
                SubmitWay::Async => runtime.block_on(client.submit(make())),
            };
            (source, target, draw.len_sectors, result)
        })
        .collect();
    drop(client);
    let submitter = thread::current().id();
    handles
        .into_iter()
        .map(|(source, target, len, result)| Submitted {
            source,
            target,
            len,
            submitter,
            result: result.map(JobHandle::wait),
        })
        .collect()
}

/// `try_submit` until the queue has room: a refused job is gone, so each try makes it anew.
fn try_until_admitted(client: &Client, make: impl Fn() -> Job) -> Result<JobHandle, SubmitError> {
    loop {
        match client.try_submit(make()) {
            Err(SubmitError::QueueFull { .. }) => thread::sleep(Duration::from_millis(1)),
            other => return other,
        }
    }
}

/// A job's callback: counts itself, checks its thread and, when given the client, that
/// blocking calls refuse to run on the worker.
fn callback(seen: &Arc<Seen>, client: Option<Client>) -> impl FnOnce(Outcome) + Send + 'static {
    let seen = seen.clone();
    move |_| {
        seen.on_worker("a job's callback");
        seen.callbacks.fetch_add(1, Ordering::SeqCst);
        if let Some(client) = client {
            if !matches!(client.submit_blocking(Job::zero(vec![], Flags::empty())), Err(SubmitError::WouldBlockWorker))
            {
                seen.problem("submit_blocking on the worker did not say WouldBlockWorker".into());
            }
            if !matches!(client.shutdown_timeout(Duration::ZERO), Err(ShutdownError::OnWorker)) {
                seen.problem("shutdown_timeout on the worker did not say OnWorker".into());
            }
        }
    }
}
