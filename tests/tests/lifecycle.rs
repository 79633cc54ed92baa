//! A client's life around its jobs: shutdown from many threads, with a timeout, with a device
//! that keeps its buffers; handles that resolve when the runtime goes away; a client dropped
//! without shutdown; prepared callbacks ordered with job completions.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex, mpsc};
use std::thread;
use std::time::Duration;

use kcopyd_core::{
    BlockDevice, Client, ClientConfig, ConfigError, Flags, Forward, Hooks, IoFuture, Job, Outcome, RangeSet, ReadBuf,
    Region, ShutdownError, SubmitError, TargetMask, WriteBuf,
};
use kcopyd_sim::MemDisk;
use kcopyd_tests::util::{assert_same, patterned, region, zeroed};
use tokio::sync::Semaphore;

/// Long enough that only a hang reaches it.
const HANG: Duration = Duration::from_secs(60);

fn small_subjobs() -> ClientConfig {
    // 16-sector sub-jobs, one at a time, so that a job's progress is easy to predict.
    ClientConfig { subjob_size_bytes: 8192, subjobs_in_flight: 1, ..ClientConfig::default() }
}

/// The hooks of an in-memory disk whose reads at or after `gate_sector` wait until the gate
/// opens; the disk is called "gated".
#[derive(Debug)]
struct Gated {
    gate_sector: u64,
    gate: Arc<Semaphore>,
}

type GatedDisk = Forward<Gated>;

/// `inner` with a closed gate at `gate_sector`, and the gate.
fn gated(inner: &Arc<MemDisk>, gate_sector: u64) -> (Arc<GatedDisk>, Arc<Semaphore>) {
    let gate = Arc::new(Semaphore::new(0));
    (Arc::new(Forward::new(inner.clone(), Gated { gate_sector, gate: gate.clone() })), gate)
}

fn open(gate: &Semaphore) {
    gate.add_permits(Semaphore::MAX_PERMITS / 2);
}

impl Hooks for Gated {
    fn name<'a>(&'a self, _inner: &'a dyn BlockDevice) -> &'a str {
        "gated"
    }

    fn read<'a>(
        &'a self,
        inner: &'a dyn BlockDevice,
        offset_sectors: u64,
        buf: ReadBuf,
    ) -> IoFuture<'a, (ReadBuf, io::Result<()>)> {
        Box::pin(async move {
            if offset_sectors >= self.gate_sector {
                let _ = self.gate.acquire().await.unwrap();
            }
            inner.read(offset_sectors, buf).await
        })
    }
}

/// The hooks of a device that keeps every buffer it is asked to write (a zero-copy cache,
/// breaking the contract that a device drops its buffers by the time its future completes);
/// the disk is called "keeping".
#[derive(Debug, Default)]
struct Keeping {
    kept: Mutex<Vec<WriteBuf>>,
}

impl Hooks for Keeping {
    fn name<'a>(&'a self, _inner: &'a dyn BlockDevice) -> &'a str {
        "keeping"
    }

    fn write<'a>(
        &'a self,
        inner: &'a dyn BlockDevice,
        offset_sectors: u64,
        buf: WriteBuf,
    ) -> IoFuture<'a, io::Result<()>> {
        self.kept.lock().unwrap().push(buf.clone());
        inner.write(offset_sectors, buf)
    }
}

/// Runs `work` on a thread of its own and gives its result, or fails the test if it takes
/// longer than [`HANG`] (the thread is left behind).
fn within_hang<T: Send + 'static>(what: &str, work: impl FnOnce() -> T + Send + 'static) -> T {
    let (sender, receiver) = mpsc::channel();
    thread::spawn(move || {
        let _ = sender.send(work());
    });
    receiver.recv_timeout(HANG).unwrap_or_else(|_| panic!("{what} did not return (or panicked)"))
}

#[test]
fn concurrent_shutdowns_from_many_threads_all_get_the_report() {
    let client = Client::new(small_subjobs()).unwrap();
    let source = patterned("source", 64, 512, 1);
    let target = zeroed("target", 64, 512);
    let (gated, gate) = gated(&source, 32);
    let handle = client
        .submit_blocking(Job::copy(Region::new(gated, 0, 64), vec![region(&target, 0, 64)], Flags::empty()))
        .unwrap();
    let callers = 8;
    let barrier = Arc::new(Barrier::new(callers + 1));
    let threads: Vec<_> = (0..callers)
        .map(|_| {
            let (client, barrier) = (client.clone(), barrier.clone());
            thread::spawn(move || {
                barrier.wait();
                client.shutdown_blocking()
            })
        })
        .collect();
    barrier.wait();
    // Every caller is waiting (or about to) while the job is held at sector 32.
    open(&gate);
    let reports: Vec<_> = within_hang("concurrent shutdowns", move || {
        threads.into_iter().map(|t| t.join().expect("a shutdown caller panicked")).collect::<Vec<_>>()
    });
    assert!(reports.iter().all(|r| *r == reports[0]), "{reports:?}");
    assert_eq!(reports[0].jobs_completed, 1);
    assert_eq!(reports[0].pool.pages_in_use, 0);
    assert!(handle.try_outcome().expect("completed before shutdown returned").is_ok());
    assert_same(&source, 0, &target, 0, 64);
    // Shutting down again, blocking, with a timeout or async, gives the same report at once.
    assert_eq!(client.shutdown_blocking(), reports[0]);
    assert_eq!(client.shutdown_timeout(Duration::ZERO), Ok(reports[0]));
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    assert_eq!(rt.block_on(client.shutdown()), reports[0]);
}

#[test]
fn shutdowns_racing_the_actors_stop_all_get_the_report() {
    // With nothing running the first shutdown stops the actor at once, so the others arrive
    // while it stops or after: every one of them must still get the same report.
    for round in 0..20 {
        let client = Client::new(ClientConfig { page_budget: 1, ..ClientConfig::default() }).unwrap();
        let callers = 8;
        let barrier = Arc::new(Barrier::new(callers));
        let threads: Vec<_> = (0..callers)
            .map(|_| {
                let (client, barrier) = (client.clone(), barrier.clone());
                thread::spawn(move || {
                    barrier.wait();
                    client.shutdown_blocking()
                })
            })
            .collect();
        let reports: Vec<_> = within_hang("racing shutdowns", move || {
            threads.into_iter().map(|t| t.join().map_err(|_| "a caller panicked")).collect::<Vec<_>>()
        });
        let first = reports[0].unwrap_or_else(|e| panic!("round {round}: {e}"));
        for report in reports {
            assert_eq!(report, Ok(first), "round {round}");
        }
    }
}

#[test]
fn a_device_that_keeps_its_buffers_is_reported_at_shutdown_instead_of_hanging() {
    let client = Client::new(small_subjobs()).unwrap();
    let source = patterned("source", 64, 512, 2);
    let keeping = Arc::new(Forward::new(zeroed("kept", 64, 512), Keeping::default()));
    let outcome = client
        .submit_blocking(Job::copy(region(&source, 0, 64), vec![Region::new(keeping.clone(), 0, 64)], Flags::empty()))
        .unwrap()
        .wait();
    assert!(outcome.is_ok(), "{outcome:?}");
    let shutting = client.clone();
    let report = within_hang("shutdown with pages held by a device", move || shutting.shutdown_blocking());
    // Four 16-sector sub-jobs of two pages each, all kept.
    assert_eq!(report.pool.pages_in_use, 8, "{report:?}");
    assert_eq!(report.jobs_completed, 1);
    keeping.hooks().kept.lock().unwrap().clear();
    assert_eq!(client.pool_stats().pages_in_use, 0, "the pages come back when the device lets go");
}

#[test]
fn shutdown_timeout_names_the_jobs_still_running_and_can_wait_again() {
    let client = Client::new(small_subjobs()).unwrap();
    let source = patterned("source", 64, 512, 3);
    let target = zeroed("target", 64, 512);
    let (gated, gate) = gated(&source, 32);
    let handle = client
        .submit_blocking(Job::copy(Region::new(gated, 0, 64), vec![region(&target, 0, 64)], Flags::empty()))
        .unwrap();
    while handle.progress().done_sectors < 32 {
        thread::sleep(Duration::from_millis(1));
    }
    let error = client.shutdown_timeout(Duration::from_millis(20)).unwrap_err();
    let ShutdownError::TimedOut { waited, running, prepared_callbacks } = &error else {
        panic!("not a timeout: {error:?}");
    };
    assert_eq!(*waited, Duration::from_millis(20));
    assert_eq!(*prepared_callbacks, 0);
    assert_eq!(running.len(), 1, "{running:?}");
    assert_eq!(running[0].id, handle.id());
    assert_eq!(running[0].source.as_deref(), Some("gated"));
    assert_eq!(running[0].targets, ["target"]);
    assert_eq!((running[0].progress.done_sectors, running[0].progress.total_sectors), (32, 64));
    assert!(error.to_string().contains("1 jobs"), "{error}");
    // The client is shut for new jobs, the running one goes on.
    let late = Job::zero(vec![region(&target, 0, 8)], Flags::empty());
    assert_eq!(client.submit_blocking(late).unwrap_err(), SubmitError::ShutDown);
    open(&gate);
    let report = client.shutdown_timeout(HANG).expect("the job finishes once the gate opens");
    assert_eq!(report.jobs_completed, 1);
    assert!(handle.try_outcome().unwrap().is_ok());
    assert_same(&source, 0, &target, 0, 64);
}

#[test]
fn shutdown_on_the_workers_thread_is_refused_not_a_deadlock() {
    let client = Client::new(small_subjobs()).unwrap();
    let target = zeroed("target", 16, 512);
    let (sender, receiver) = mpsc::channel();
    let inside = client.clone();
    let job = Job::zero(vec![region(&target, 0, 16)], Flags::empty())
        .on_complete(move |_| sender.send(inside.shutdown_timeout(Duration::from_secs(1))).unwrap());
    client.submit_blocking(job).unwrap().wait();
    assert_eq!(receiver.recv_timeout(HANG).unwrap(), Err(ShutdownError::OnWorker));
    assert_eq!(client.shutdown_blocking().jobs_completed, 1);
}

#[test]
fn start_in_current_system_needs_a_system_and_says_so() {
    // Test threads run no actix System.
    let error = Client::start_in_current_system(small_subjobs()).unwrap_err();
    assert!(matches!(error, ConfigError::NoActixSystem), "{error:?}");
    assert!(error.to_string().contains("actix System"), "{error}");
    // With a System made but not yet running, the client starts when it runs.
    let system = actix::System::new();
    let client = Client::start_in_current_system(small_subjobs()).expect("a System exists on this thread");
    let target = zeroed("target", 16, 512);
    let outcome = system.block_on(async move {
        let outcome = client.submit(Job::zero(vec![region(&target, 0, 16)], Flags::empty())).await.unwrap().await;
        client.shutdown().await;
        outcome
    });
    assert!(outcome.is_ok(), "{outcome:?}");
}

/// Holds its sender's end until dropped, then waits for the test to release it: what a
/// worker thread runs into while it tears its runtime down.
struct SlowTeardown {
    release: Mutex<mpsc::Receiver<()>>,
    waited_out: Arc<AtomicBool>,
}

impl Drop for SlowTeardown {
    fn drop(&mut self) {
        let released = self.release.lock().unwrap().recv_timeout(Duration::from_secs(20));
        self.waited_out.store(released.is_err(), Ordering::SeqCst);
    }
}

#[test]
fn async_shutdown_returns_without_waiting_for_the_worker_thread_to_exit() {
    // A callback leaves a task on the worker's runtime that, when the runtime is torn down,
    // waits for this test to say go. If `shutdown().await` joined the worker thread, it would
    // hold the executor's only thread until that wait timed out.
    let (release, released) = mpsc::channel();
    let waited_out = Arc::new(AtomicBool::new(false));
    let teardown = SlowTeardown { release: Mutex::new(released), waited_out: waited_out.clone() };
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let client = Client::new(small_subjobs()).unwrap();
    let target = zeroed("target", 16, 512);
    rt.block_on(async {
        let job = Job::zero(vec![region(&target, 0, 16)], Flags::empty()).on_complete(move |_| {
            tokio::task::spawn_local(async move {
                let _teardown = teardown;
                std::future::pending::<()>().await;
            });
        });
        assert!(client.submit(job).await.unwrap().await.is_ok());
        let report = client.shutdown().await;
        assert_eq!(report.jobs_completed, 1);
        // Fails only if the teardown gave up waiting already, which the assertion below reports.
        let _ = release.send(());
    });
    // The blocking shutdown joins the worker: by then the teardown saw the release.
    client.shutdown_blocking();
    assert!(!waited_out.load(Ordering::SeqCst), "shutdown().await blocked its executor until the teardown gave up");
}

#[test]
fn dropping_the_system_completes_every_pending_handle_as_cancelled() {
    let system = actix::System::new();
    let source = patterned("source", 64, 512, 4);
    let target = zeroed("target", 64, 512);
    let queued_target = zeroed("queued", 64, 512);
    let (gated, _gate) = gated(&source, 32);
    let callbacks = Arc::new(AtomicUsize::new(0));
    let counted = |callbacks: &Arc<AtomicUsize>| {
        let callbacks = callbacks.clone();
        move |_: Outcome| {
            callbacks.fetch_add(1, Ordering::SeqCst);
        }
    };
    let (client, running, queued) = system.block_on(async {
        let client = Client::start_in_current_system(small_subjobs()).unwrap();
        let job = Job::copy(Region::new(gated, 0, 64), vec![region(&target, 0, 64)], Flags::empty())
            .on_complete(counted(&callbacks));
        let running = client.submit(job).await.unwrap();
        // Let it copy up to the gate: two 16-sector sub-jobs.
        while running.progress().done_sectors < 32 {
            tokio::task::yield_now().await;
        }
        // Submitted, never handled: the System goes before the actor sees it.
        let job = Job::copy(region(&source, 0, 64), vec![region(&queued_target, 0, 64)], Flags::empty())
            .on_complete(counted(&callbacks));
        let queued = client.try_submit(job).unwrap();
        (client, running, queued)
    });
    assert!(running.try_outcome().is_none(), "the job waits at the gate");
    drop(system);
    let outcome = running.try_outcome().expect("dropping the System completes the running job");
    assert!(outcome.cancelled && !outcome.is_ok(), "{outcome:?}");
    assert_eq!(outcome.targets[0].not_copied, RangeSet::from_range(32..64), "what was written is not claimed");
    assert_same(&source, 0, &target, 0, 32);
    let outcome = queued.try_outcome().expect("dropping the System completes the queued job");
    assert!(outcome.cancelled);
    assert_eq!(outcome.targets[0].not_copied, RangeSet::from_range(0..64));
    assert_eq!(callbacks.load(Ordering::SeqCst), 2, "each callback ran once");
    // The client is closed and its shutdown returns at once, from any thread.
    let job = Job::zero(vec![region(&target, 0, 8)], Flags::empty());
    assert_eq!(client.try_submit(job).unwrap_err(), SubmitError::ShutDown);
    let report = within_hang("shutdown after the System was dropped", move || client.shutdown_blocking());
    // The report was made when the actor went away, with the running job; the queued one
    // completed just after, from its undelivered message.
    assert_eq!(report.jobs_completed, 1);
}

#[test]
fn a_client_dropped_without_shutdown_finishes_its_jobs() {
    let client = Client::new(small_subjobs()).unwrap();
    let source = patterned("source", 64, 512, 5);
    let target = zeroed("target", 64, 512);
    let (gated, gate) = gated(&source, 32);
    let (sender, receiver) = mpsc::channel();
    let job = Job::copy(Region::new(gated, 0, 64), vec![region(&target, 0, 64)], Flags::empty())
        .on_complete(move |outcome| sender.send(outcome).unwrap());
    let handle = client.submit_blocking(job).unwrap();
    drop(client);
    open(&gate);
    let outcome = within_hang("a job of a dropped client", move || handle.wait());
    assert!(outcome.is_ok(), "{outcome:?}");
    assert_eq!(receiver.recv_timeout(HANG).unwrap(), outcome, "the callback ran too");
    assert_same(&source, 0, &target, 0, 64);
}

/// What each callback saw, in the order they ran.
type Log = Arc<Mutex<Vec<(String, Outcome, thread::ThreadId)>>>;

fn logging(log: &Log, busy: &Arc<AtomicBool>, name: &str, hold: Duration) -> impl FnOnce(Outcome) + Send + 'static {
    let (log, busy, name) = (log.clone(), busy.clone(), name.to_owned());
    move |outcome| {
        assert!(!busy.swap(true, Ordering::SeqCst), "{name} ran while another callback was running");
        thread::sleep(hold);
        log.lock().unwrap().push((name, outcome, thread::current().id()));
        busy.store(false, Ordering::SeqCst);
    }
}

#[test]
fn prepared_callbacks_run_in_order_with_job_callbacks_on_the_worker() {
    let client = Client::new(small_subjobs()).unwrap();
    let log: Log = Arc::default();
    let busy = Arc::new(AtomicBool::new(false));
    let target = zeroed("target", 64, 512);
    // A job whose callback takes a while: the handle resolves before its callback is done.
    let job = Job::zero(vec![region(&target, 0, 64)], Flags::empty()).on_complete(logging(
        &log,
        &busy,
        "job",
        Duration::from_millis(50),
    ));
    let prepared = client.prepare_callback(logging(&log, &busy, "prepared", Duration::ZERO)).unwrap();
    assert!(client.submit_blocking(job).unwrap().wait().is_ok());
    // The job completed before `complete`: its callback runs first, even though it is
    // still sleeping now.
    let write_err: TargetMask = [1, 3].into_iter().collect();
    prepared.complete(true, write_err);
    // One dropped without `complete` runs too, as cancelled.
    drop(client.prepare_callback(logging(&log, &busy, "dropped", Duration::ZERO)).unwrap());
    while log.lock().unwrap().len() < 3 {
        thread::sleep(Duration::from_millis(1));
    }
    // Shutdown waits for a prepared callback not yet completed.
    let late = client.prepare_callback(logging(&log, &busy, "late", Duration::ZERO)).unwrap();
    let error = client.shutdown_timeout(Duration::from_millis(20)).unwrap_err();
    assert!(
        matches!(&error, ShutdownError::TimedOut { running, prepared_callbacks: 1, .. } if running.is_empty()),
        "{error:?}"
    );
    assert_eq!(client.prepare_callback(|_| {}).unwrap_err(), SubmitError::ShutDown, "nothing new after shutdown began");
    late.complete(false, TargetMask::new());
    let report = client.shutdown_timeout(HANG).expect("the last prepared callback ran");
    assert_eq!(report.jobs_completed, 1, "prepared callbacks are not jobs");
    let log = log.lock().unwrap();
    let names: Vec<_> = log.iter().map(|(name, _, _)| name.as_str()).collect();
    assert_eq!(names, ["job", "prepared", "dropped", "late"]);
    let worker = log[0].2;
    assert!(log.iter().all(|(_, _, thread)| *thread == worker), "every callback ran on the worker");
    assert_ne!(worker, thread::current().id());
    let prepared = &log[1].1;
    assert!(prepared.read_err && prepared.write_err == write_err && !prepared.cancelled, "{prepared:?}");
    assert!(prepared.targets.is_empty());
    assert!(log[2].1.cancelled, "dropped without complete: {:?}", log[2].1);
    assert!(!log[3].1.read_err && log[3].1.write_err.is_empty() && !log[3].1.cancelled);
}

#[test]
fn prepared_callbacks_run_on_the_callers_system_and_survive_its_drop() {
    let system = actix::System::new();
    let ran = Arc::new(Mutex::new(Vec::new()));
    let here = thread::current().id();
    let (client, pending) = system.block_on({
        let ran = ran.clone();
        async move {
            let client = Client::start_in_current_system(small_subjobs()).unwrap();
            let seen = ran.clone();
            let prepared = client
                .prepare_callback(move |outcome: Outcome| seen.lock().unwrap().push((outcome, thread::current().id())))
                .unwrap();
            prepared.complete(false, TargetMask::new());
            // Run the actor's mailbox until the callback has run.
            while ran.lock().unwrap().is_empty() {
                tokio::task::yield_now().await;
            }
            let seen = ran.clone();
            let pending = client
                .prepare_callback(move |outcome: Outcome| seen.lock().unwrap().push((outcome, thread::current().id())))
                .unwrap();
            (client, pending)
        }
    });
    assert_eq!(ran.lock().unwrap()[0].1, here, "the callback ran on the System's thread");
    drop(system);
    // Queued after the System is gone: it still runs, once, with what it was given.
    pending.complete(true, TargetMask::new());
    let ran = ran.lock().unwrap();
    assert_eq!(ran.len(), 2);
    assert!(ran[1].0.read_err);
    drop(ran);
    assert_eq!(within_hang("shutdown", move || client.shutdown_blocking()).jobs_completed, 0);
}

/// Job ids are unique and dense however many threads submit at once (the client asserts it
/// where it registers each job, and where its actor starts it).
#[test]
fn job_ids_are_unique_when_many_threads_submit_at_once() {
    const THREADS: u64 = 4;
    const JOBS_PER_THREAD: u64 = 25;
    let client = Client::new(ClientConfig::default()).unwrap();
    let target = zeroed("target", THREADS * JOBS_PER_THREAD * 8, 512);
    let barrier = Arc::new(Barrier::new(THREADS as usize));
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (client, target, barrier) = (client.clone(), target.clone(), barrier.clone());
            thread::spawn(move || {
                barrier.wait();
                (0..JOBS_PER_THREAD)
                    .map(|j| {
                        let at = (t * JOBS_PER_THREAD + j) * 8;
                        client.submit_blocking(Job::zero(vec![region(&target, at, 8)], Flags::empty())).unwrap()
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let handles: Vec<_> = threads.into_iter().flat_map(|thread| thread.join().unwrap()).collect();
    let mut ids: Vec<u64> = handles.iter().map(|handle| handle.id()).collect();
    ids.sort_unstable();
    assert_eq!(ids, (0..THREADS * JOBS_PER_THREAD).collect::<Vec<_>>(), "every id once, none skipped");
    for handle in handles {
        assert!(handle.wait().is_ok());
    }
    client.shutdown_blocking();
}
