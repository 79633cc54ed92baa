//! Model time and tokio time: the one place that knows how long a second lasts.
//!
//! ```text
//!  model duration (what a user configures: a rate, a timeout, a disk's latency)
//!        × time_scale()  ──►  tokio duration (what the engine sleeps and measures)
//!        ÷ time_scale()  ◄──
//! ```
//!
//! Normally the scale is 1. A virtual-time harness (kcopyd-sim's `Simulation`) sets it to
//! 1000 on its thread, so that one model microsecond lasts one tokio millisecond and
//! sub-millisecond events keep their resolution under tokio's millisecond timer. A client
//! fixes its scale when it starts — 1 on a worker thread of its own, the calling thread's for
//! `Client::start_in_current_system` — so a throttle rate, an I/O timeout or a latency in its
//! statistics means the same model time inside a simulation as outside one.

use std::cell::Cell;
use std::time::Duration;

thread_local! {
    static TIME_SCALE: Cell<u32> = const { Cell::new(1) };
}

/// Tokio time units per unit of model time on this thread: 1 unless a virtual-time harness
/// set it.
pub fn time_scale() -> u32 {
    TIME_SCALE.with(Cell::get)
}

/// Sets this thread's time scale and returns the previous one. For virtual-time harnesses:
/// set it before starting a client on the thread and restore it afterwards.
///
/// # Panics
/// If `scale` is zero.
pub fn set_time_scale(scale: u32) -> u32 {
    assert!(scale >= 1, "a time scale of zero would stop time");
    TIME_SCALE.with(|cell| cell.replace(scale))
}

/// A model duration as tokio time on this thread.
pub fn to_tokio(model: Duration) -> Duration {
    model.saturating_mul(time_scale())
}

/// A tokio duration as model time on this thread.
pub fn to_model(tokio: Duration) -> Duration {
    tokio / time_scale()
}

/// The time scale of the thread a client's actors run on, fixed when the client starts, so
/// that every conversion the engine makes (also from a handle on another thread) uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Clock {
    scale: u32,
}

impl Clock {
    /// Real time: a worker thread of the client's own.
    pub(crate) const REAL: Clock = Clock { scale: 1 };

    /// The scale of the calling thread (for actors started on it).
    pub(crate) fn of_this_thread() -> Clock {
        Clock { scale: time_scale() }
    }

    /// A model duration as tokio time.
    pub(crate) fn to_tokio(self, model: Duration) -> Duration {
        model.saturating_mul(self.scale)
    }

    /// A tokio duration as model time.
    pub(crate) fn to_model(self, tokio: Duration) -> Duration {
        tokio / self.scale
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scale_converts_both_ways_and_is_restored() {
        assert_eq!(time_scale(), 1);
        let previous = set_time_scale(1000);
        assert_eq!(previous, 1);
        assert_eq!(to_tokio(Duration::from_micros(3)), Duration::from_millis(3));
        assert_eq!(to_model(Duration::from_millis(3)), Duration::from_micros(3));
        set_time_scale(previous);
        assert_eq!(to_tokio(Duration::from_micros(3)), Duration::from_micros(3));
    }
}
