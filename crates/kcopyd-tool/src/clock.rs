//! The runner's clock: wall time for real devices, the simulator's model time when every
//! device is simulated and the run is in virtual time.
//!
//! ```text
//!  real devices:  Instant::now() … elapsed()  = wall seconds
//!  all sim:       paused tokio clock / time_scale = model seconds (1 model µs = 1 tokio ms)
//! ```

use std::time::Duration;

/// A point in the runner's time.
#[derive(Debug, Clone, Copy)]
pub struct Instant(tokio::time::Instant);

impl Instant {
    /// Now, on the clock of the current runtime.
    pub fn now() -> Instant {
        Instant(tokio::time::Instant::now())
    }

    /// Time since `self`: model time in a simulation, wall time otherwise.
    pub fn elapsed(&self) -> Duration {
        kcopyd_sim::to_model(self.0.elapsed())
    }
}
