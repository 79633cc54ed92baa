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
//! microsecond resolution. [`to_tokio`] and [`to_model`] convert (they live in kcopyd-core, which
//! reads the same scale for its throttle and I/O timeouts).

pub use kcopyd_core::{time_scale, to_model, to_tokio};

/// Whether this thread runs in virtual time (inside a [`Simulation`]).
pub fn in_virtual_time() -> bool {
    time_scale() != 1
}

/// Sets the scale for the life of the guard.
struct ScaleGuard(u32);

impl ScaleGuard {
    fn set(scale: u32) -> ScaleGuard {
        ScaleGuard(kcopyd_core::set_time_scale(scale))
    }
}

impl Drop for ScaleGuard {
    fn drop(&mut self) {
        kcopyd_core::set_time_scale(self.0);
    }
}

/// Model microseconds per tokio millisecond inside a simulation.
const SIMULATION_SCALE: u32 = 1000;

use std::future::Future;

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
