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
//! What must hold: `config()` is the configuration given; a checked verify finds a finished
//! copy identical and a sector changed after it exactly; every accepted job completes once,
//! copies its source exactly and runs its callback on the worker (never the submitting
//! thread); from a callback, `submit_blocking` says `WouldBlockWorker` and `shutdown_timeout`
//! `OnWorker`; only a racing shutdown refuses jobs, and only with `ShutDown`; the report counts
//! every accepted job and no page in use; `shutdown_blocking` and `shutdown_timeout` return
//! only once the worker thread has exited and a prepared callback completed meanwhile has run,
//! and dropping every handle makes it exit by itself.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex, mpsc};
use std::thread::{self, ThreadId};
use std::time::{Duration, Instant};

use kcopyd_core::{
    Client, ClientConfig, Flags, Job, JobHandle, Outcome, RangeSet, SECTOR_SIZE, ShutdownError, SubmitError,
    TargetMask, Verify,
};
use kcopyd_sim::mix64;
use serde::{Deserialize, Serialize};

use crate::scenario::Draw;
use crate::util::{Gate, HookedDisk, patterned, region, zeroed};

/// How many times a case with a racing shutdown runs.
pub const RACING_ROUNDS: u64 = 40;

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
    /// No worker thread: the client runs on an actix System of the checking thread
    /// (`start_in_current_system`), which is dropped after a few turns ([`SYSTEM_TURNS`], one
    /// run each) with jobs, prepared callbacks and a shutdown still in its mailbox or running.
    SystemDropped,
}

/// The turns a System gets before it is dropped, one run of a `SystemDropped` case each: none
/// (the client's actor never started), a few, and enough for small jobs to finish.
pub const SYSTEM_TURNS: [u8; 5] = [0, 1, 2, 5, 20];

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
        let ends = [End::ShutdownBlocking, End::ShutdownTimeout, End::Drop, End::Racing, End::SystemDropped];
        let end = ends[draw.below(5) as usize];
        ThreadedCase { seed, config, threads, end }
    }

    /// Runs the case (a racing one [`RACING_ROUNDS`] times: the instant where a submission and
    /// the shutdown meet is narrow); every way it broke what the module promises.
    pub fn check(&self) -> Vec<String> {
        if self.end == End::SystemDropped {
            return SYSTEM_TURNS
                .iter()
                .map(|&turns| self.check_dropped_system(turns))
                .find(|p| !p.is_empty())
                .unwrap_or_default();
        }
        let rounds = if self.end == End::Racing { RACING_ROUNDS } else { 1 };
        (0..rounds).map(|round| self.check_round(round)).find(|problems| !problems.is_empty()).unwrap_or_default()
    }

    /// One run of the case.
    fn check_round(&self, round: u64) -> Vec<String> {
        let client = Client::new(self.config.clone()).expect("a drawn configuration is valid");
        let seen = Arc::new(Seen::default());
        let mut problems = self.check_handle(&client);
        self.plant_sentinel(&client, &seen, &mut problems);
        // The threads and this one start together, so that a racing shutdown meets submissions;
        // with it, one more thread submits one-sector zero jobs without pause until refused.
        let racing = self.end == End::Racing;
        let start = Arc::new(Barrier::new(self.threads.len() + 1 + usize::from(racing)));
        let storm = racing.then(|| {
            let (client, start) = (client.clone(), start.clone());
            thread::spawn(move || {
                start.wait();
                submit_until_refused(&client)
            })
        });
        let workers: Vec<_> = self
            .threads
            .iter()
            .enumerate()
            .map(|(index, (way, jobs))| {
                let (client, seen, jobs, way) = (client.clone(), seen.clone(), jobs.clone(), *way);
                let seed = self.seed.wrapping_add(index as u64 * 1000 + round * 100_000);
                let start = start.clone();
                thread::spawn(move || {
                    start.wait();
                    run_thread(client, &seen, way, &jobs, seed)
                })
            })
            .collect();
        start.wait();
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
        let stormed = storm.map_or(0, |storm| {
            let (accepted, found) = storm.join().expect("the storm panicked");
            problems.extend(found);
            accepted
        });
        let report = match client {
            Some(client) => {
                problems.extend(verify_copies(&client, &submitted));
                self.end_after(client, &mut problems)
            }
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
            let accepted = submitted.iter().filter(|s| s.result.is_ok()).count() as u64 + stormed;
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
    /// A prepared callback still open when the shutdown begins (another thread completes it
    /// 50 ms after it sees the client shut) has run when the shutdown returns.
    fn end_after(&self, client: Client, problems: &mut Vec<String>) -> Option<kcopyd_core::ShutdownReport> {
        let ran = Arc::new(AtomicBool::new(false));
        let flag = ran.clone();
        let open = client
            .prepare_callback(move |_| flag.store(true, Ordering::SeqCst))
            .expect("a running client prepares callbacks");
        let watcher = client.clone();
        let completer = thread::spawn(move || {
            while !matches!(watcher.try_submit(Job::zero(vec![], Flags::empty())), Err(SubmitError::ShutDown)) {
                thread::sleep(Duration::from_millis(1));
            }
            thread::sleep(Duration::from_millis(50));
            open.complete(false, TargetMask::new());
        });
        let report = if self.end == End::ShutdownTimeout {
            client
                .shutdown_timeout(Duration::from_secs(60))
                .map_err(|error| problems.push(format!("shutdown_timeout from a plain thread: {error}")))
                .ok()
        } else {
            Some(client.shutdown_blocking())
        };
        if !ran.load(Ordering::SeqCst) {
            problems.push("shutdown returned before a prepared callback it had to wait for ran".into());
        }
        completer.join().expect("the completing thread panicked");
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

impl ThreadedCase {
    /// Every job submitted (`try_submit`; those the queue refuses are left out) and two
    /// prepared callbacks (one completed, one dropped) on a System that runs `polls` turns, a
    /// shutdown begun from another thread, then the System dropped: every handle resolves,
    /// each callback runs once, a job is either done or cancelled with every sector it did not
    /// copy named, and a later shutdown returns the report.
    fn check_dropped_system(&self, polls: u8) -> Vec<String> {
        let system = actix::System::new();
        let seen = Arc::new(Seen::default());
        let prepared_ran = Arc::new(AtomicUsize::new(0));
        // Every other job, the first among them, reads a source that never answers: it is
        // still running when the System goes, whatever the turns.
        let gate = Arc::new(Gate::new());
        let (client, jobs) = system.block_on(async {
            let client = Client::start_in_current_system(self.config.clone()).expect("a System runs here");
            let draws = self.threads.iter().flat_map(|(_, jobs)| jobs);
            let jobs: Vec<_> = draws
                .enumerate()
                .filter_map(|(index, draw)| {
                    let source = patterned("source", draw.len_sectors, 512, self.seed + index as u64);
                    let target = zeroed("target", draw.len_sectors, 512);
                    let from = if index % 2 == 0 {
                        HookedDisk::new(source.clone()).hold_reads(gate.clone()).region(0, draw.len_sectors)
                    } else {
                        region(&source, 0, draw.len_sectors)
                    };
                    let job = Job::copy(from, vec![region(&target, 0, draw.len_sectors)], Flags::empty())
                        .on_complete(callback(&seen, None));
                    let handle = client.try_submit(job).ok()?;
                    Some((source, target, draw.len_sectors, handle))
                })
                .collect();
            for complete in [true, false] {
                let ran = prepared_ran.clone();
                let prepared = client
                    .prepare_callback(move |_| {
                        ran.fetch_add(1, Ordering::SeqCst);
                    })
                    .expect("a running client prepares callbacks");
                if complete {
                    prepared.complete(false, TargetMask::new());
                }
            }
            for _ in 0..polls {
                tokio::task::yield_now().await;
            }
            (client, jobs)
        });
        let mut problems = Vec::new();
        let begun = client.clone();
        let _ = thread::spawn(move || begun.shutdown_timeout(Duration::from_millis(1))).join();
        drop(system);
        for (index, (source, target, len, handle)) in jobs.iter().enumerate() {
            match handle.try_outcome() {
                None => problems.push(format!("job {index}: no outcome after its System was dropped")),
                Some(outcome) => check_done_or_cancelled(index, &outcome, source, target, *len, &mut problems),
            }
        }
        let (ran, run) = (seen.callbacks.load(Ordering::SeqCst), prepared_ran.load(Ordering::SeqCst));
        if ran != jobs.len() || run != 2 {
            problems.push(format!("{ran} job callbacks for {} jobs, {run} prepared callbacks of 2 ran", jobs.len()));
        }
        match thread::spawn(move || client.shutdown_timeout(DROPPED_WORKER_EXIT)).join().expect("shutdown panicked") {
            Ok(report) if report.jobs_completed == jobs.len() as u64 => {}
            other => problems.push(format!("shutdown after the System was dropped: {other:?}")),
        }
        problems
    }
}

/// A job whose System went away: done (ok, target equal to source) or cancelled, with every
/// sector that differs named as not copied.
fn check_done_or_cancelled(
    index: usize,
    outcome: &Outcome,
    source: &kcopyd_sim::MemDisk,
    target: &kcopyd_sim::MemDisk,
    len: u64,
    problems: &mut Vec<String>,
) {
    let not_copied = outcome.targets.first().map(|t| t.not_copied.clone()).unwrap_or_default();
    if !outcome.is_ok() && !outcome.cancelled {
        problems.push(format!("job {index}: neither done nor cancelled: {outcome:?}"));
    }
    if outcome.is_ok() != not_copied.is_empty() {
        problems.push(format!("job {index}: ok is {} with {not_copied:?} not copied", outcome.is_ok()));
    }
    let (from, to) = (source.snapshot(0, len), target.snapshot(0, len));
    let differs = (0..len).find(|&s| {
        let at = s as usize * SECTOR_SIZE..(s as usize + 1) * SECTOR_SIZE;
        from[at.clone()] != to[at] && !not_copied.contains(s)
    });
    if let Some(sector) = differs {
        problems.push(format!("job {index}: sector {sector} differs from the source yet is not named: {outcome:?}"));
    }
}

/// A checked verify of the first accepted copy finds it identical, and finds the one sector
/// then changed on its target, exactly (the sector is put back after).
fn verify_copies(client: &Client, submitted: &[Submitted]) -> Vec<String> {
    let Some(job) = submitted.iter().find(|s| s.result.as_ref().is_ok_and(Outcome::is_ok)) else {
        return Vec::new();
    };
    let runtime = tokio::runtime::Builder::new_current_thread().build().expect("a runtime");
    let compare = || {
        let verify = Verify::new(region(&job.source, 0, job.len), vec![region(&job.target, 0, job.len)]);
        let handle = client.verify(verify).expect("a valid verify");
        runtime.block_on(handle.wait())
    };
    let mut problems = Vec::new();
    match compare() {
        Ok(comparison) if comparison.identical() => {}
        other => problems.push(format!("a verify of a finished copy: {other:?}")),
    }
    let sector = job.len / 2;
    let before = job.target.snapshot(sector, 1);
    job.target.poke(sector, &before.iter().map(|b| !b).collect::<Vec<u8>>());
    match compare() {
        Ok(comparison) if comparison.targets[0].differing == RangeSet::from_range(sector..sector + 1) => {}
        other => problems.push(format!("a verify after sector {sector} changed: {other:?}")),
    }
    job.target.poke(sector, &before);
    problems
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

/// One-sector zero jobs submitted without pause (`try_submit`, again while the queue is full)
/// until the client refuses with `ShutDown`: whenever a racing shutdown begins, a submission
/// is on its way. Every job accepted must be done, none cancelled: how many were accepted, and
/// the first that was not done.
fn submit_until_refused(client: &Client) -> (u64, Vec<String>) {
    let scratch = patterned("storm", 64, 512, 1);
    let mut handles = Vec::new();
    for attempt in 0..1_000_000u64 {
        match client.try_submit(Job::zero(vec![region(&scratch, attempt % 64, 1)], Flags::empty())) {
            Ok(handle) => handles.push(handle),
            Err(SubmitError::QueueFull { .. }) => thread::yield_now(),
            Err(SubmitError::ShutDown) => break,
            Err(error) => return (handles.len() as u64, vec![format!("a one-sector zero job refused: {error}")]),
        }
    }
    let accepted = handles.len() as u64;
    let problems = handles
        .into_iter()
        .map(JobHandle::wait)
        .filter(|outcome| !outcome.is_ok())
        .take(1)
        .map(|outcome| format!("a zero job accepted while the shutdown raced: {outcome:?}"))
        .collect();
    (accepted, problems)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The first 32 seeds (half the cases CI draws) hold every end, every way to submit, and
    /// callbacks that probe the worker.
    #[test]
    fn the_generator_draws_every_end_and_way_to_submit() {
        let cases: Vec<_> = (0..32).map(ThreadedCase::from_seed).collect();
        for end in [End::ShutdownBlocking, End::ShutdownTimeout, End::Drop, End::Racing, End::SystemDropped] {
            assert!(cases.iter().any(|c| c.end == end), "{end:?}");
        }
        let threads = || cases.iter().flat_map(|c| &c.threads);
        for way in [SubmitWay::Blocking, SubmitWay::Try, SubmitWay::Async] {
            assert!(threads().any(|(w, _)| *w == way), "{way:?}");
        }
        assert!(threads().flat_map(|(_, jobs)| jobs).any(|job| job.probe));
        assert!(cases.iter().any(|c| c.config.queued_jobs_max < c.threads.iter().map(|(_, j)| j.len()).sum()));
    }
}
