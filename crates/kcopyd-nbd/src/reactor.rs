//! [`Reactor`]: the thread that runs connections. By default every connection of every NBD
//! device in the process shares one ([`Reactor::shared`]); a device may be given its own.
//!
//! ```text
//!  NbdDevice A ─┬─ Connection 1 ─┐                      thread "kcopyd-nbd"
//!               └─ Connection 2 ─┼─ tasks on ─►  current-thread tokio runtime (one epoll)
//!  NbdDevice B ─── Connection 3 ─┘                 block_on(until the last Reactor is gone)
//! ```
//!
//! One thread for all connections, not one per connection: a busy reactor serves every
//! socket that is ready from one `epoll_wait`, and a request handed to it while it runs costs
//! no extra thread wake-up. Copying between two exports over four connections each used to
//! keep eight connection threads waking one another; see docs/NBD.md for what that cost.
//!
//! The thread runs an actix System around its runtime, so that the engine can run there too
//! ([`Reactor::run`], then `kcopyd_core::Client::start_in_current_system`): the engine's
//! requests and the replies that complete them then pass between tasks of one thread, with
//! no wake-up of another thread for either.
//!
//! Lifetime: each [`Reactor`] handle and each connection task holds the runtime's stop
//! sender; when the last one is gone (every device dropped and every connection closed,
//! `NBD_CMD_DISC` sent), the thread's `block_on` returns and the thread ends. The shared
//! reactor is kept behind a weak reference, so a process with no NBD devices has no thread.

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread;
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// The name of reactor threads (at most 15 bytes, the kernel's limit).
pub(crate) const THREAD_NAME: &str = "kcopyd-nbd";

/// How often [`Reactor::wait_shared_closed`] looks at the connections still running.
const CLOSE_POLL_INTERVAL: Duration = Duration::from_millis(1);

/// The process-wide reactor, while anything uses it.
static SHARED: Mutex<Weak<Inner>> = Mutex::new(Weak::new());

/// A thread with a current-thread tokio runtime on which connections run. Cloning shares it.
///
/// ```no_run
/// use kcopyd_nbd::{ConnectOptions, NbdDevice, Reactor};
/// // Two devices on a reactor of their own, apart from every other device's connections.
/// let reactor = Reactor::new().unwrap();
/// let options = ConnectOptions { reactor: Some(reactor.clone()), ..ConnectOptions::default() };
/// let a = NbdDevice::connect("nbd+unix:///?socket=/run/a.sock", &options).unwrap();
/// let b = NbdDevice::connect("nbd+unix:///?socket=/run/b.sock", &options).unwrap();
/// assert!(a.reactor() == b.reactor() && a.reactor() != &Reactor::shared().unwrap());
/// ```
#[derive(Clone)]
pub struct Reactor {
    inner: Arc<Inner>,
}

struct Inner {
    handle: Handle,
    /// The System's arbiter on the thread: runs closures there ([`Reactor::run`]).
    arbiter: actix_rt::ArbiterHandle,
    thread: thread::ThreadId,
    /// Connection tasks spawned and not yet ended.
    tasks: AtomicUsize,
    /// Dropped with the last handle: ends the thread's `block_on`.
    _stop: oneshot::Sender<()>,
}

impl Reactor {
    /// Starts a reactor thread of its own.
    ///
    /// # Errors
    /// The runtime or the thread cannot be created.
    pub fn new() -> io::Result<Reactor> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let (started, arbiter) = std::sync::mpsc::sync_channel(1);
        let thread = thread::Builder::new().name(THREAD_NAME.into()).spawn(move || {
            let system = actix_rt::System::with_tokio_rt(move || runtime);
            let _ = started.send(actix_rt::System::current().arbiter().clone());
            // Returns when every Reactor handle and connection task is gone; the runtime,
            // dropped here, has no tasks left by then (actors started by `run` have ended
            // too: a client's actor holds its jobs' devices, and they a Reactor handle).
            system.block_on(async move {
                let _ = stopped.await;
            });
        })?;
        let arbiter = arbiter.recv().map_err(|_| io::Error::other("the reactor's thread ended while starting"))?;
        let inner = Inner { handle, arbiter, thread: thread.thread().id(), tasks: AtomicUsize::new(0), _stop: stop };
        Ok(Reactor { inner: Arc::new(inner) })
    }

    /// Runs `f` on the reactor's thread, inside its actix System, and returns what it
    /// returned: there an engine can be started (`Client::start_in_current_system`) that
    /// shares the thread with the connections. What `f` starts must not block the thread,
    /// which serves every connection on the reactor. The thread ends with the last `Reactor`
    /// handle and connection, whatever else runs there: an engine whose jobs are on NBD
    /// devices of this reactor keeps it through them; one with other work only should be
    /// given a handle to keep.
    ///
    /// ```no_run
    /// use kcopyd_core::{Client, ClientConfig};
    /// use kcopyd_nbd::{ConnectOptions, NbdDevice};
    /// let source = NbdDevice::connect("nbd+unix:///?socket=/run/a.sock", &ConnectOptions::default()).unwrap();
    /// // The engine on the thread of the reactor its devices use: no thread hand-offs.
    /// let client = source.reactor().run(|| Client::start_in_current_system(ClientConfig::default())).unwrap().unwrap();
    /// # drop(client);
    /// ```
    ///
    /// # Errors
    /// Called on the reactor's thread (it would wait for itself), or `f` panicked.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> io::Result<T> {
        if thread::current().id() == self.inner.thread {
            return Err(io::Error::new(io::ErrorKind::WouldBlock, "Reactor::run on the reactor's own thread"));
        }
        let (done, result) = std::sync::mpsc::sync_channel(1);
        // This handle keeps the thread running: the arbiter takes the closure.
        self.inner.arbiter.spawn_fn(move || {
            let _ = done.send(f());
        });
        result.recv().map_err(|_| io::Error::other("the closure given to Reactor::run did not return (it panicked)"))
    }

    /// The reactor every device uses unless its [`ConnectOptions`](crate::ConnectOptions)
    /// name another: started by the first call, ended when nothing uses it any more.
    ///
    /// # Errors
    /// Starting it failed (see [`Reactor::new`]).
    pub fn shared() -> io::Result<Reactor> {
        let mut shared = SHARED.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(inner) = shared.upgrade() {
            return Ok(Reactor { inner });
        }
        let reactor = Reactor::new()?;
        *shared = Arc::downgrade(&reactor.inner);
        Ok(reactor)
    }

    /// Waits up to `timeout` for the connections on the shared reactor to close: a dropped
    /// device's connections send `NBD_CMD_DISC` (and, through TLS, the session's close_notify)
    /// on the reactor's thread, after the drop returns. A process that exits right after
    /// dropping its devices calls this first, so that servers see a clean end instead of a
    /// connection cut mid-session (nbdkit logs one cut through TLS as an error). Returns the
    /// connections still running: 0 when all closed, or when there is no shared reactor.
    pub fn wait_shared_closed(timeout: Duration) -> usize {
        let shared = SHARED.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).upgrade();
        let Some(inner) = shared else { return 0 };
        let deadline = Instant::now() + timeout;
        loop {
            let running = inner.tasks.load(Ordering::Acquire);
            if running == 0 || Instant::now() >= deadline {
                return running;
            }
            thread::sleep(CLOSE_POLL_INTERVAL);
        }
    }

    /// The id of the reactor's thread.
    pub fn thread_id(&self) -> thread::ThreadId {
        self.inner.thread
    }

    /// Connections running on this reactor: opened or being opened, and not yet closed (a
    /// device's connections close when it is dropped, after `NBD_CMD_DISC`, or when lost and
    /// the device is dropped).
    pub fn connections_running(&self) -> usize {
        self.inner.tasks.load(Ordering::Acquire)
    }

    /// Runs `task` on the reactor; the reactor's thread lives at least until it ends.
    pub(crate) fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let running = Running::new(self.clone());
        self.inner.handle.spawn(async move {
            task.await;
            drop(running);
        });
    }
}

/// One task counted in [`Reactor::connections_running`], keeping the reactor alive; dropped
/// when the task ends or is cancelled.
struct Running(Reactor);

impl Running {
    fn new(reactor: Reactor) -> Running {
        reactor.inner.tasks.fetch_add(1, Ordering::AcqRel);
        Running(reactor)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.inner.tasks.fetch_sub(1, Ordering::AcqRel);
    }
}

impl PartialEq for Reactor {
    fn eq(&self, other: &Reactor) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

impl Eq for Reactor {}

impl fmt::Debug for Reactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reactor")
            .field("thread", &self.inner.thread)
            .field("connections_running", &self.connections_running())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_shared_reactor_is_one_while_used_and_a_new_one_after() {
        let first = Reactor::shared().unwrap();
        let again = Reactor::shared().unwrap();
        assert_eq!(first, again);
        let thread = first.thread_id();
        assert_ne!(thread, thread::current().id());
        drop((first, again));
        let later = Reactor::shared().unwrap();
        assert_ne!(later.thread_id(), thread, "the first shared reactor was released");
    }

    #[test]
    fn a_running_task_keeps_the_reactor_after_its_last_handle() {
        let reactor = Reactor::new().unwrap();
        let (go, wait) = oneshot::channel::<()>();
        let (done, finished) = mpsc::channel();
        reactor.spawn(async move {
            let _ = wait.await;
            let _ = done.send(thread::current().id());
        });
        assert_eq!(reactor.connections_running(), 1);
        let thread = reactor.thread_id();
        drop(reactor);
        go.send(()).unwrap();
        assert_eq!(finished.recv_timeout(Duration::from_secs(10)).unwrap(), thread, "the task ran on the reactor");
    }

    #[test]
    fn run_calls_on_the_reactors_thread_inside_its_actix_system_and_never_from_it() {
        let reactor = Reactor::new().unwrap();
        let (thread, arbiter) =
            reactor.run(|| (thread::current().id(), actix_rt::Arbiter::try_current().is_some())).unwrap();
        assert_eq!((thread, arbiter), (reactor.thread_id(), true));
        // From a task on the reactor, run would wait for its own thread: refused.
        let (done, refused) = mpsc::channel();
        let inner = reactor.clone();
        reactor.spawn(async move {
            let _ = done.send(inner.run(|| ()).map_err(|error| error.kind()));
        });
        assert_eq!(refused.recv_timeout(Duration::from_secs(10)).unwrap(), Err(io::ErrorKind::WouldBlock));
        assert!(reactor.run(|| panic!("inside run")).is_err(), "a panic is an error, not a hang");
        assert_eq!(reactor.run(|| 7).unwrap(), 7, "the reactor outlives a panic inside run");
    }

    #[test]
    fn tasks_are_counted_until_they_end() {
        let reactor = Reactor::new().unwrap();
        let (go, wait) = oneshot::channel::<()>();
        let (done, finished) = mpsc::channel();
        reactor.spawn(async move {
            let _ = wait.await;
            let _ = done.send(());
        });
        reactor.spawn(async {});
        go.send(()).unwrap();
        finished.recv_timeout(Duration::from_secs(10)).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while reactor.connections_running() != 0 {
            assert!(std::time::Instant::now() < deadline, "{} tasks still counted", reactor.connections_running());
            thread::sleep(Duration::from_millis(5));
        }
    }
}
