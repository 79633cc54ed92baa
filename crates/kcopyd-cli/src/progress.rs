//! Progress bars on a terminal, and Ctrl-C.
//!
//! ```text
//!  SIGINT ──► Interrupts::recv ──► JobHandle::cancel() ──► no new sub-job; in-flight I/O ends
//!  SIGINT again ──────────────────► exit 130 at once
//!  every 100 ms: JobHandle::progress() ──► bar (bytes, throughput, ETA) on stderr, if a terminal
//! ```

use std::io::{self, IsTerminal};
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use kcopyd_core::{JobHandle, Outcome, SECTOR_SIZE};
use tokio::signal::unix::{Signal, SignalKind, signal};

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

/// A group of bars drawn together, or hidden.
pub fn multi(visible: bool) -> MultiProgress {
    let target = if visible { ProgressDrawTarget::stderr_with_hz(10) } else { ProgressDrawTarget::hidden() };
    MultiProgress::with_draw_target(target)
}

/// SIGINT and SIGTERM, caught from the start of the command so that an early Ctrl-C is not
/// lost (it cancels the job as soon as one runs).
#[derive(Debug)]
pub struct Interrupts {
    sigint: Signal,
    sigterm: Signal,
}

impl Interrupts {
    /// Installs the handlers. Call inside the runtime.
    ///
    /// # Errors
    /// The handlers cannot be installed.
    pub fn install() -> io::Result<Interrupts> {
        Ok(Interrupts { sigint: signal(SignalKind::interrupt())?, sigterm: signal(SignalKind::terminate())? })
    }

    /// Waits for the next signal and returns the exit code it calls for.
    pub async fn recv(&mut self) -> u8 {
        tokio::select! {
            _ = self.sigint.recv() => EXIT_SIGINT,
            _ = self.sigterm.recv() => EXIT_SIGTERM,
        }
    }
}

/// How a watched job ended.
#[derive(Debug)]
pub struct Watched {
    /// The job's outcome.
    pub outcome: Outcome,
    /// The exit code of the signal that cancelled it, if one did.
    pub interrupted: Option<u8>,
}

/// What [`watch`] drives: bars moved on each tick, and a way to print a line past them.
pub trait WatchUi {
    /// The job has done `done_bytes`.
    fn tick(&self, done_bytes: u64);
    /// Prints `line` on stderr without tearing the bars.
    fn note(&self, line: &str);
}

impl WatchUi for ProgressBar {
    fn tick(&self, done_bytes: u64) {
        self.set_position(done_bytes);
    }

    fn note(&self, line: &str) {
        self.suspend(|| eprintln!("{line}"));
    }
}

/// Waits for `handle`, ticking `ui` every [`REFRESH_INTERVAL`] and cancelling the job on the
/// first signal; a second signal exits at once.
pub async fn watch(handle: &JobHandle, ui: &dyn WatchUi, interrupts: &mut Interrupts) -> Watched {
    // Every REFRESH_INTERVAL of the job's time: in virtual time, of model time (a tokio
    // interval of 100 ms there would tick every 100 model µs, thousands of times a second).
    let mut ticker = tokio::time::interval(kcopyd_sim::to_tokio(REFRESH_INTERVAL));
    let mut waiting = handle.clone();
    let mut interrupted = None;
    let done_bytes = |handle: &JobHandle| handle.progress().done_sectors * SECTOR_SIZE as u64;
    loop {
        tokio::select! {
            outcome = &mut waiting => {
                ui.tick(done_bytes(handle));
                return Watched { outcome, interrupted };
            }
            code = interrupts.recv() => {
                if interrupted.is_some() {
                    ui.note("kcopyd: interrupted again: quitting without waiting for the I/O in flight");
                    std::process::exit(i32::from(code));
                }
                interrupted = Some(code);
                handle.cancel();
                ui.note(
                    "kcopyd: interrupted: finishing the I/O in flight, then stopping \
                     (interrupt again to quit at once)",
                );
            }
            _ = ticker.tick() => ui.tick(done_bytes(handle)),
        }
    }
}
