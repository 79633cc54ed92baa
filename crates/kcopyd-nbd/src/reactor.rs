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
//! Lifetime: each [`Reactor`] handle and each connection task holds the runtime's stop
//! sender; when the last one is gone (every device dropped and every connection closed,
//! `NBD_CMD_DISC` sent), the thread's `block_on` returns and the thread ends. The shared
//! reactor is kept behind a weak reference, so a process with no NBD devices has no thread.

use std::fmt;
use std::io;
use std::sync::{Arc, Mutex, Weak};
use std::thread;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// The name of reactor threads (at most 15 bytes, the kernel's limit).
pub(crate) const THREAD_NAME: &str = "kcopyd-nbd";

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
    thread: thread::ThreadId,
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
        let thread = thread::Builder::new().name(THREAD_NAME.into()).spawn(move || {
            // Returns when every Reactor handle and connection task is gone; the runtime,
            // dropped here, has no tasks left by then.
            runtime.block_on(async move {
                let _ = stopped.await;
            });
        })?;
        Ok(Reactor { inner: Arc::new(Inner { handle, thread: thread.thread().id(), _stop: stop }) })
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

    /// The id of the reactor's thread.
    pub fn thread_id(&self) -> thread::ThreadId {
        self.inner.thread
    }

    /// Runs `task` on the reactor; the reactor's thread lives at least until it ends.
    pub(crate) fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let keep = self.clone();
        self.inner.handle.spawn(async move {
            task.await;
            drop(keep);
        });
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
        f.debug_struct("Reactor").field("thread", &self.inner.thread).finish()
    }
}
