//! The virtual-time harness: one thread, paused tokio time, an actix System, a client.
//!
//! ```text
//!  Simulation::run(config, |client, trace| async { … })
//!    └─ current-thread tokio runtime, time paused (auto-advances when every task waits)
//!        └─ actix System on it ── Client::start_in_current_system ── jobs, disks, callbacks
//! ```
//!
//! Nothing reads the real clock and nothing runs on another thread, so the order of events
//! is a function of the inputs alone: the same seed replays the same trace.
//!
//! tokio's timer counts whole milliseconds, so inside a simulation one microsecond of the disk
//! model lasts one millisecond of tokio time ([`time_scale`] is 1000): completions keep
//! microsecond resolution. [`to_tokio`] and [`to_model`] convert.

thread_local! {
    static TIME_SCALE: Cell<u32> = const { Cell::new(1) };
}

/// Tokio time units per unit of model time on this thread: 1, or 1000 inside a
/// [`Simulation`].
pub fn time_scale() -> u32 {
    TIME_SCALE.with(Cell::get)
}

/// Whether this thread runs in virtual time (inside a [`Simulation`]).
pub fn in_virtual_time() -> bool {
    time_scale() != 1
}

/// A model duration as tokio time on this thread.
pub fn to_tokio(model: Duration) -> Duration {
    model * time_scale()
}

/// A tokio duration as model time on this thread.
pub fn to_model(tokio: Duration) -> Duration {
    tokio / time_scale()
}

/// Sets the scale for the life of the guard.
struct ScaleGuard(u32);

impl ScaleGuard {
    fn set(scale: u32) -> ScaleGuard {
        ScaleGuard(TIME_SCALE.with(|cell| cell.replace(scale)))
    }
}

impl Drop for ScaleGuard {
    fn drop(&mut self) {
        TIME_SCALE.with(|cell| cell.set(self.0));
    }
}

/// Model microseconds per tokio millisecond inside a simulation.
const SIMULATION_SCALE: u32 = 1000;

use std::cell::Cell;
use std::future::Future;
use std::time::Duration;

use kcopyd_core::{Client, ClientConfig, ConfigError};

use crate::Trace;

/// Runs simulations in virtual time.
#[derive(Debug, Clone, Copy, Default)]
pub struct Simulation;

impl Simulation {
    /// Runs `body` with a client started on a single-threaded actix System over paused tokio
    /// time, then shuts the client down (asserting that its pool is full again).
    ///
    /// # Errors
    /// The client configuration is out of bounds.
    pub fn run<F, Fut, T>(config: ClientConfig, body: F) -> Result<T, ConfigError>
    where
        F: FnOnce(Client, Trace) -> Fut,
        Fut: Future<Output = T>,
    {
        let _scale = ScaleGuard::set(SIMULATION_SCALE);
        let system = paused_system(tokio::runtime::Builder::new_current_thread());
        system.block_on(async move {
            let client = Client::start_in_current_system(config)?;
            let trace = Trace::new();
            let output = body(client.clone(), trace).await;
            client.shutdown().await;
            Ok(output)
        })
    }

    /// Runs `body` on a fresh single-threaded actix System over paused tokio time, without a
    /// client (for tests that make their own).
    pub fn block_on<Fut: Future>(body: Fut) -> Fut::Output {
        Simulation::block_on_with(tokio::runtime::Builder::new_current_thread(), body)
    }

    /// As [`Simulation::block_on`], on a runtime from `builder` (a current-thread builder;
    /// time is enabled and paused here), e.g. with the I/O driver that signals need.
    ///
    /// # Panics
    /// The runtime does not build.
    pub fn block_on_with<Fut: Future>(builder: tokio::runtime::Builder, body: Fut) -> Fut::Output {
        let _scale = ScaleGuard::set(SIMULATION_SCALE);
        let system = paused_system(builder);
        system.block_on(body)
    }
}

/// An actix System on a current-thread tokio runtime whose time starts paused.
fn paused_system(mut builder: tokio::runtime::Builder) -> actix_rt::SystemRunner {
    actix_rt::System::with_tokio_rt(move || {
        builder.enable_time().start_paused(true).build().expect("a current-thread runtime builds")
    })
}
