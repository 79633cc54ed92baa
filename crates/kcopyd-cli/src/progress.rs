//! Progress bars on a terminal, and Ctrl-C (SIGINT) and SIGTERM in every phase.
//!
//! ```text
//!  SIGINT/SIGTERM ──► watcher thread ─┬─ SignalPhase::QuitAtOnce: remove created files, one line, exit
//!                                     └─ SignalPhase::Graceful: stop flag + Interrupts::recv
//!                                          ──► JobHandle::cancel() ──► no new sub-job; I/O ends
//!  a second signal ──► quit_at_once: remove created files, the one-line summary, exit 130/143
//!  every 100 ms: JobHandle::progress() ──► bar (bytes, throughput, ETA) on stderr, if a terminal
//! ```

use std::fs;
use std::io::{self, IsTerminal};
use std::os::unix::fs::FileTypeExt;
use std::time::Duration;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kcopyd_os::FileKey;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use crate::error::CliError;
use crate::out;

/// How often the bars are redrawn.
pub const REFRESH_INTERVAL: Duration = Duration::from_millis(100);
/// The exit code after SIGINT, as shells report it (128 + 2).
pub const EXIT_SIGINT: u8 = 130;
/// The exit code after SIGTERM (128 + 15).
pub const EXIT_SIGTERM: u8 = 143;

/// Whether bars should be drawn: on a terminal, unless quiet.
pub fn bars_wanted(quiet: bool) -> bool {
    !quiet && io::stderr().is_terminal()
}

/// A byte-counting bar on stderr, or a hidden one.
pub fn byte_bar(visible: bool, total_bytes: u64, label: &str) -> ProgressBar {
    let target = if visible { ProgressDrawTarget::stderr_with_hz(10) } else { ProgressDrawTarget::hidden() };
    let bar = ProgressBar::with_draw_target(Some(total_bytes), target);
    bar.set_style(byte_style());
    bar.set_message(label.to_owned());
    bar
}

/// The style of byte bars: label, bar, bytes, throughput, ETA.
pub fn byte_style() -> ProgressStyle {
    ProgressStyle::with_template(
        "{msg:<8} [{wide_bar}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta}",
    )
    .expect("a valid template")
    .progress_chars("=> ")
}

/// What a signal does in the phase the command is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalPhase {
    /// Nothing is written yet, or nothing is worth waiting for (opening and checking devices,
    /// filling simulated disks, a scenario's run, a calibration): the first signal removes
    /// the files registered with [`CreatedGuard`] and quits at once.
    QuitAtOnce,
    /// Work that stops cleanly when asked (a job, a comparison, a sweep): the first signal
    /// asks ([`Interrupts::recv`], [`Interrupts::stop_flag`]); a second one quits at once.
    Graceful,
}

/// What a quit at once says: a closure giving the one-line summary.
type SummaryFn = Box<dyn Fn() -> String + Send>;

/// Files to remove when quitting at once, each with which file it is once known.
type Cleanup = Vec<(PathBuf, Option<FileKey>)>;

/// The state the signal watcher thread shares with the command.
struct Shared {
    /// The exit code of every signal received, in order.
    codes: Mutex<Vec<u8>>,
    /// How many signals have been received, for [`Interrupts::recv`].
    count: watch::Sender<usize>,
    /// Set by the first signal: for loops that are not async (a sweep's workers).
    stop: AtomicBool,
    /// A [`SignalPhase`], as `u8`.
    phase: AtomicU8,
    /// Files to remove when quitting at once (created by this command, not kept yet), with
    /// which file each is once known: removed only while its path still names it.
    cleanup: Mutex<Cleanup>,
    /// The one-line summary printed when quitting at once.
    summary: Mutex<Option<SummaryFn>>,
}

static SHARED: OnceLock<Shared> = OnceLock::new();

fn shared() -> Option<&'static Shared> {
    SHARED.get()
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// SIGINT and SIGTERM, caught from the start of the command by a thread of their own, so that
/// a signal is acted on in every phase, also while the command's thread is busy (opening
/// devices, a scenario running): see [`SignalPhase`].
#[derive(Debug)]
pub struct Interrupts {
    received: watch::Receiver<usize>,
    /// Signals already returned by [`Interrupts::recv`].
    consumed: usize,
}

impl Interrupts {
    /// Installs the handlers on a watcher thread and waits until they are in place; the
    /// command starts in [`SignalPhase::QuitAtOnce`]. Call once.
    ///
    /// # Errors
    /// The handlers cannot be installed.
    pub fn install() -> io::Result<Interrupts> {
        let (count, received) = watch::channel(0);
        let fresh = Shared {
            codes: Mutex::new(Vec::new()),
            count,
            stop: AtomicBool::new(false),
            phase: AtomicU8::new(SignalPhase::QuitAtOnce as u8),
            cleanup: Mutex::new(Vec::new()),
            summary: Mutex::new(None),
        };
        if SHARED.set(fresh).is_err() {
            return Err(io::Error::other("the signal handlers are installed already"));
        }
        let (ready, installed) = std::sync::mpsc::channel();
        std::thread::Builder::new().name("kcopyd-signals".into()).spawn(move || watch_signals(&ready))?;
        installed.recv().map_err(|_| io::Error::other("the signal thread stopped"))??;
        Ok(Interrupts { received, consumed: 0 })
    }

    /// Waits for the next signal and returns the exit code it calls for (a signal received
    /// before the call is returned at once).
    pub async fn recv(&mut self) -> u8 {
        let wanted = self.consumed + 1;
        if self.received.wait_for(|&count| count >= wanted).await.is_err() {
            // The watcher thread is gone: no signal will come.
            std::future::pending::<()>().await;
        }
        self.consumed = wanted;
        shared().map_or(EXIT_SIGINT, |shared| lock(&shared.codes)[wanted - 1])
    }

    /// Set by the first signal: for work that is not async and cannot wait on
    /// [`Interrupts::recv`] (a sweep's workers between points, a connection's retries).
    pub fn stop_flag(&self) -> &'static AtomicBool {
        static NEVER: AtomicBool = AtomicBool::new(false);
        shared().map_or(&NEVER, |shared| &shared.stop)
    }

    /// Enters `phase`. Entering [`SignalPhase::QuitAtOnce`] after a signal quits at once.
    pub fn set_phase(&self, phase: SignalPhase) {
        enter(phase);
    }

    /// Sets the one-line summary printed if the command quits at once (`None`: a plain
    /// "interrupted" line).
    pub fn set_summary(&self, summary: Option<SummaryFn>) {
        set_summary(summary);
    }
}

/// [`Interrupts::set_phase`], for code that does not hold the [`Interrupts`] (a runner's
/// event callback, while the command waits on them).
pub fn enter(phase: SignalPhase) {
    if let Some(shared) = shared() {
        shared.phase.store(phase as u8, Ordering::Release);
        let first = lock(&shared.codes).first().copied();
        if let (SignalPhase::QuitAtOnce, Some(code)) = (phase, first) {
            quit_at_once(code);
        }
    }
}

/// [`Interrupts::set_summary`], for code that does not hold the [`Interrupts`].
pub fn set_summary(summary: Option<SummaryFn>) {
    if let Some(shared) = shared() {
        *lock(&shared.summary) = summary;
    }
}

/// The exit code of the first signal received, if any.
pub fn first_signal() -> Option<u8> {
    shared().and_then(|shared| lock(&shared.codes).first().copied())
}

/// The watcher thread: a runtime of its own, so that signals are seen whatever the
/// command's thread is doing.
fn watch_signals(ready: &std::sync::mpsc::Sender<io::Result<()>>) {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            let _ = ready.send(Err(error));
            return;
        }
    };
    runtime.block_on(async {
        let handlers = signal(SignalKind::interrupt()).and_then(|i| Ok((i, signal(SignalKind::terminate())?)));
        let (mut sigint, mut sigterm) = match handlers {
            Ok(handlers) => handlers,
            Err(error) => {
                let _ = ready.send(Err(error));
                return;
            }
        };
        let _ = ready.send(Ok(()));
        loop {
            let code = tokio::select! {
                _ = sigint.recv() => EXIT_SIGINT,
                _ = sigterm.recv() => EXIT_SIGTERM,
            };
            on_signal(code);
        }
    });
}

fn on_signal(code: u8) {
    let Some(shared) = shared() else { return };
    let count = {
        let mut codes = lock(&shared.codes);
        codes.push(code);
        codes.len()
    };
    shared.stop.store(true, Ordering::Release);
    shared.count.send_replace(count);
    if count >= 2 || shared.phase.load(Ordering::Acquire) == SignalPhase::QuitAtOnce as u8 {
        quit_at_once(code);
    }
}

/// Removes the files this command created and has not kept, prints the one-line summary and
/// exits with `code`, without waiting for anything in flight.
pub fn quit_at_once(code: u8) -> ! {
    static QUITTING: Mutex<()> = Mutex::new(());
    // One thread quits; another that gets here waits for the exit.
    let _quitting = QUITTING.lock().unwrap_or_else(PoisonError::into_inner);
    let line = shared().and_then(|shared| lock(&shared.summary).as_ref().map(|summary| summary()));
    if let Some(shared) = shared() {
        // Held until the exit: a file being created waits, and is never left behind.
        let cleanup = lock(&shared.cleanup);
        for (path, id) in cleanup.iter() {
            kcopyd_tool::remove_created(path, *id);
        }
        out::error(&line.unwrap_or_else(|| "kcopyd: interrupted".to_owned()));
        std::process::exit(i32::from(code));
    }
    std::process::exit(i32::from(code));
}

/// A file the command is creating: registered for removal if the command quits at once, and
/// held so that a quit waits until the file is there to remove. Drop it once the file exists.
pub struct CreatedGuard {
    _held: Option<MutexGuard<'static, Cleanup>>,
}

impl CreatedGuard {
    /// Registers `path` (to be created next).
    pub fn creating(path: &Path) -> CreatedGuard {
        let mut guard = shared().map(|shared| lock(&shared.cleanup));
        if let Some(paths) = guard.as_mut() {
            paths.push((path.to_path_buf(), None));
        }
        CreatedGuard { _held: guard }
    }
}

/// Registers files that exist already, created by this command, for removal if it quits at
/// once (until [`forget_created`]), each with which file it is where known: removed only
/// while its path still names that file.
pub fn remove_on_quit(files: &[(PathBuf, Option<FileKey>)]) {
    if let Some(shared) = shared() {
        let mut cleanup = lock(&shared.cleanup);
        for (path, id) in files {
            match cleanup.iter_mut().find(|(p, _)| p == path) {
                Some(entry) => entry.1 = entry.1.or(*id),
                None => cleanup.push((path.clone(), *id)),
            }
        }
    }
}

/// Forgets `paths` for removal at a quit: they are kept, or removed already.
pub fn forget_created(paths: &[PathBuf]) {
    if let Some(shared) = shared() {
        lock(&shared.cleanup).retain(|(p, _)| !paths.contains(p));
    }
}

/// Records that `path`, registered for removal at a quit, was created as the file `id`: a
/// quit then removes it only while the path still names that file.
pub fn created_as(path: &Path, id: FileKey) {
    if let Some(shared) = shared() {
        for entry in lock(&shared.cleanup).iter_mut().filter(|(p, _)| p == path) {
            entry.1 = Some(id);
        }
    }
}

/// Checks, before the work starts, that a file the command writes at its end (`--svg`,
/// `--out`) can be written: an existing one is opened for writing (and left as it is), a
/// missing one is created and removed again. A directory, a block device or a missing folder
/// is refused, so that a long run is not thrown away at its end.
///
/// # Errors
/// The path cannot be written, naming `what` (the option) and the reason.
pub fn check_output_file(path: &Path, what: &str) -> Result<(), CliError> {
    let text = path.display().to_string();
    let refuse = |problem: String| CliError::argument(what, &text, problem);
    match fs::metadata(path) {
        Ok(meta) if meta.is_dir() => return Err(refuse("is a directory".into())),
        Ok(meta) if meta.file_type().is_block_device() => {
            return Err(refuse("is a block device: refusing to write a file over it".into()));
        }
        Ok(_) => {
            if let Some(filesystem) = kcopyd_os::pseudo_filesystem_at(path) {
                let problem =
                    format!("is a file of the {filesystem} filesystem: writing it sets something in the kernel");
                return Err(refuse(problem));
            }
            return fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map(drop)
                .map_err(|error| refuse(format!("cannot be written: {error}")));
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(refuse(format!("cannot be looked at: {error}"))),
    }
    if text.ends_with('/') {
        return Err(refuse("names a directory (it ends in '/'), not a file".into()));
    }
    let folder = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !folder.is_dir() {
        return Err(refuse(format!("its folder '{}' does not exist", folder.display())));
    }
    // Registered while it exists: a signal now does not leave it behind.
    let guard = CreatedGuard::creating(path);
    let created = fs::OpenOptions::new().write(true).create_new(true).open(path);
    if let Ok(file) = &created {
        // Only while the path names the file just made: one renamed over it is someone else's.
        kcopyd_tool::remove_made(path, file);
    }
    drop(guard);
    forget_created(&[path.to_path_buf()]);
    created.map(drop).map_err(|error| refuse(format!("cannot be created: {error}")))
}
