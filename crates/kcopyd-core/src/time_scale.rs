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
//! sub-millisecond events keep their resolution under tokio's millisecond timer. The engine
//! reads the scale on the thread its actors run on, so a throttle rate or an I/O timeout
//! means the same model time inside a simulation as outside one.

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
