//! The throttle: a per-client limit on the share of time its I/O is active (busy percent, as
//! dm-kcopyd's throttle) and on the bytes it moves per second (a token bucket).
//!
//! ```text
//!  sub-job taken ──► Throttler::admit_subjob(len) ──► read / write the targets
//!                     │ busy share > limit? wait until idle time brings it back
//!                     │ bucket short of len? wait until it refills
//!                     │ (re-checked at once when the limit changes)
//!  every device I/O ──► Throttler::io_started() … guard dropped: busy time accounted
//! ```
//!
//! Only the *issue* of a new sub-job waits, and it waits as a timer in the job's own task:
//! completions, callbacks, the other jobs' in-flight I/O and other clients go on. dm-kcopyd
//! instead sleeps its whole worker thread (`fsleep` in `io_job_start`), which stalls every
//! completion queued behind it.
//!
//! **Busy time** is the time during which at least one device I/O of the client (a read, a
//! write, a write-zeroes) is in flight, from the call to the device until its future
//! completes, including time queued inside the device. It is kept, with the total time,
//! over a decaying window: when the total reaches [`BUSY_WINDOW`] both are halved, so the
//! share reflects the last second or two, as the kernel's `ACCOUNT_INTERVAL_SHIFT` does. A
//! sub-job is issued only while `busy ≤ percent × total`; otherwise it waits for exactly
//! the idle time that brings the share back under the limit, `busy / percent − total`, and
//! checks again (I/O still in flight keeps adding busy time meanwhile).
//!
//! **Rate** counts each sub-job's length once (the bytes copied or zeroed, whatever the
//! number of targets), charged when the sub-job is issued. The bucket holds at most one
//! sub-job's worth (`subjob_size_bytes`, or the sub-job itself if larger) and starts full:
//! a burst is one sub-job, then sub-jobs go out one every `len / rate`. An offloaded
//! write-zeroes (one request per target for the whole job, no data through the engine) cannot
//! be paced: it waits for the busy limit only.
//!
//! Worked example: 512 KiB sub-jobs at 100 MB/s (100 000 000 bytes/s): the first is issued
//! at once, the next when 524 288 bytes have refilled, 5.24 ms later, and so on; 64 MiB
//! (128 sub-jobs) is issued over 127 × 5.24 ms = 666 ms and done one sub-job's I/O later.
//!
//! All durations are model time ([`crate::time_scale`]): in a simulation the limits mean
//! the same as on real disks.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::error::ConfigError;
use crate::time_scale::Clock;

/// The window over which the busy share is kept (model time): when the total time reaches
/// it, busy and total time are halved.
pub const BUSY_WINDOW: Duration = Duration::from_secs(1);

/// Token-bucket units per byte: the bucket counts bytes × 10⁹, so that a refill of
/// `rate_bytes_per_s` units per nanosecond stays an integer.
const UNITS_PER_BYTE: i128 = 1_000_000_000;

/// A client's throttle: both limits off by default. Set it in
/// [`ClientConfig::throttle`](crate::ClientConfig::throttle) or change it while jobs run with
/// [`Client::set_throttle`](crate::Client::set_throttle).
///
/// ```
/// # use kcopyd_core::Throttle;
/// // At most half of the time busy, and at most 100 MB/s.
/// let throttle = Throttle { busy_percent: Some(50), rate_bytes_per_s: Some(100_000_000) };
/// assert!(throttle.validate().is_ok());
/// // 0 % would never issue anything: refused (leave the field `None` for no limit).
/// assert!(Throttle { busy_percent: Some(0), ..Throttle::OFF }.validate().is_err());
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Throttle {
    /// Most share of time, in percent (1 to 100), that the client's I/O may be active; `None`
    /// (or 100) for no limit.
    pub busy_percent: Option<u32>,
    /// Most bytes per second that the client's sub-jobs may move (each sub-job's length
    /// counted once, however many targets), at least 1; `None` for no limit.
    pub rate_bytes_per_s: Option<u64>,
}

impl Throttle {
    /// No limit.
    pub const OFF: Throttle = Throttle { busy_percent: None, rate_bytes_per_s: None };

    /// Checks both limits.
    ///
    /// # Errors
    /// [`ConfigError::ThrottleBusy`] for a percentage outside 1..=100,
    /// [`ConfigError::ThrottleRate`] for a rate of 0.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(percent) = self.busy_percent {
            if !(1..=100).contains(&percent) {
                return Err(ConfigError::ThrottleBusy { percent });
            }
        }
        if self.rate_bytes_per_s == Some(0) {
            return Err(ConfigError::ThrottleRate { bytes_per_s: 0 });
        }
        Ok(())
    }

    /// The busy limit, if it limits anything (100 % does not).
    fn busy_limit(&self) -> Option<u32> {
        self.busy_percent.filter(|&percent| percent < 100)
    }
}

/// A client's throttle state, shared by its jobs (on the client's arbiter) and by the
/// client's handles (which may change the limits from any thread).
#[derive(Debug)]
pub(crate) struct Throttler {
    state: Mutex<ThrottleState>,
    /// Woken when the limits change, so that waiting sub-jobs re-check at once.
    changed: Notify,
    /// The bucket's capacity in bytes (before a larger sub-job raises it for itself).
    burst_bytes: u64,
}

#[derive(Debug)]
struct ThrottleState {
    /// Model time on the client's arbiter.
    clock: Clock,
    throttle: Throttle,
    /// Device I/Os in flight now.
    ios_in_flight: u64,
    /// When busy and total time were last brought up to date; `None` before the first event.
    accounted_at: Option<Instant>,
    /// Model time with at least one I/O in flight, within the window.
    busy: Duration,
    /// Model time accounted, within the window.
    total: Duration,
    /// Bucket content in bytes × [`UNITS_PER_BYTE`].
    tokens: i128,
    /// When the bucket was last refilled; `None` while no rate limit applied.
    refilled_at: Option<Instant>,
    /// Sub-jobs are admitted in the order they asked: the next ticket to hand out …
    next_ticket: u64,
    /// … the ticket that may be admitted now …
    serving: u64,
    /// … and tickets whose sub-job stopped waiting (its job was cancelled), skipped.
    abandoned: std::collections::BTreeSet<u64>,
}

impl Throttler {
    pub(crate) fn new(throttle: Throttle, burst_bytes: u64, clock: Clock) -> Throttler {
        throttle.validate().expect("the throttle is validated with the client's configuration");
        Throttler {
            state: Mutex::new(ThrottleState {
                clock,
                throttle,
                ios_in_flight: 0,
                accounted_at: None,
                busy: Duration::ZERO,
                total: Duration::ZERO,
                tokens: i128::from(burst_bytes) * UNITS_PER_BYTE,
                refilled_at: None,
                next_ticket: 0,
                serving: 0,
                abandoned: std::collections::BTreeSet::new(),
            }),
            changed: Notify::new(),
            burst_bytes,
        }
    }

    /// The limits now.
    pub(crate) fn get(&self) -> Throttle {
        self.lock().throttle
    }

    /// Changes the limits; sub-jobs waiting re-check at once. The busy history and the
    /// bucket's content in bytes carry over.
    pub(crate) fn set(&self, throttle: Throttle) {
        throttle.validate().expect("validated by the caller");
        {
            let mut state = self.lock();
            let now = Instant::now();
            // The busy history starts with the first I/O, as for a configured throttle: a
            // throttle set before any I/O must not count the time before it as idle.
            if state.accounted_at.is_some() {
                state.account(now);
            }
            state.refill(now, self.burst_bytes, 0);
            state.throttle = throttle;
            if throttle.rate_bytes_per_s.is_none() {
                state.refilled_at = None;
            }
        }
        self.changed.notify_waiters();
    }

    /// Waits until a sub-job of `len_bytes` may be issued under both limits, and charges it
    /// to the bucket. Sub-jobs of all the client's jobs are admitted first come, first served,
    /// so that a large job cannot starve a small one. Returns at once when no limit applies
    /// and nobody is waiting.
    pub(crate) async fn admit_subjob(&self, len_bytes: u64) {
        let mut ticket = Ticket { throttler: self, number: None };
        loop {
            let changed = self.changed.notified();
            let mut changed = std::pin::pin!(changed);
            // Registered before the check: a change after it still wakes this waiter.
            changed.as_mut().enable();
            let wait = {
                let mut state = self.lock();
                let number = *ticket.number.get_or_insert_with(|| state.take_ticket());
                if number != state.serving {
                    // Not yet this sub-job's turn: the one ahead wakes everyone when it goes.
                    None
                } else {
                    match state.try_admit(Instant::now(), len_bytes, self.burst_bytes) {
                        None => {
                            state.advance_serving();
                            ticket.number = None;
                            drop(state);
                            self.changed.notify_waiters();
                            return;
                        }
                        Some(wait) => Some(state.clock.to_tokio(wait)),
                    }
                }
            };
            match wait {
                None => changed.await,
                Some(wait_tokio) => {
                    let sleep = tokio::time::sleep(wait_tokio);
                    futures_util::future::select(std::pin::pin!(sleep), changed).await;
                }
            }
        }
    }

    /// Marks one device I/O in flight until the guard drops (busy-time accounting).
    pub(crate) fn io_started(self: &Arc<Self>) -> BusyGuard {
        let mut state = self.lock();
        state.account(Instant::now());
        state.ios_in_flight += 1;
        BusyGuard { throttler: self.clone() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ThrottleState> {
        // The state is plain numbers, consistent after every statement: a panic elsewhere
        // while it was held leaves nothing half-changed.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A place in the admission queue; a sub-job that stops waiting gives its place up.
struct Ticket<'a> {
    throttler: &'a Throttler,
    /// `None` once admitted.
    number: Option<u64>,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let Some(number) = self.number else { return };
        let mut state = self.throttler.lock();
        state.abandoned.insert(number);
        if state.serving == number {
            state.advance_serving();
        }
        drop(state);
        self.throttler.changed.notify_waiters();
    }
}

/// Counts one I/O as in flight until dropped.
#[derive(Debug)]
pub(crate) struct BusyGuard {
    throttler: Arc<Throttler>,
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        let mut state = self.throttler.lock();
        state.account(Instant::now());
        assert!(state.ios_in_flight > 0, "an I/O finished that never started");
        state.ios_in_flight -= 1;
    }
}

impl ThrottleState {
    fn take_ticket(&mut self) -> u64 {
        let number = self.next_ticket;
        self.next_ticket += 1;
        number
    }

    /// Moves the turn to the next ticket still waiting.
    fn advance_serving(&mut self) {
        self.serving += 1;
        while self.abandoned.remove(&self.serving) {
            self.serving += 1;
        }
        assert!(self.serving <= self.next_ticket, "the turn never passes tickets not handed out");
    }

    /// Brings busy and total time up to `now`, halving both when the window is full.
    fn account(&mut self, now: Instant) {
        let since = self.accounted_at.replace(now).unwrap_or(now);
        let elapsed = self.clock.to_model(now.saturating_duration_since(since));
        if self.ios_in_flight > 0 {
            self.busy += elapsed;
        }
        self.total += elapsed;
        while self.total >= BUSY_WINDOW {
            self.total /= 2;
            self.busy /= 2;
        }
        assert!(self.busy <= self.total, "busy {:?} over total {:?}", self.busy, self.total);
    }

    /// Adds what the rate limit refilled since the last refill, up to the capacity (at least
    /// `len_bytes`, so that a sub-job larger than the burst can still go).
    fn refill(&mut self, now: Instant, burst_bytes: u64, len_bytes: u64) {
        let capacity = i128::from(burst_bytes.max(len_bytes)) * UNITS_PER_BYTE;
        let Some(rate) = self.throttle.rate_bytes_per_s else {
            self.tokens = capacity;
            return;
        };
        let since = self.refilled_at.replace(now).unwrap_or(now);
        let elapsed_ns = self.clock.to_model(now.saturating_duration_since(since)).as_nanos() as i128;
        self.tokens = (self.tokens + elapsed_ns * i128::from(rate)).min(capacity);
    }

    /// `None` if a sub-job of `len_bytes` may go now (and charges it), else the model time to
    /// wait before checking again.
    fn try_admit(&mut self, now: Instant, len_bytes: u64, burst_bytes: u64) -> Option<Duration> {
        self.account(now);
        self.refill(now, burst_bytes, len_bytes);
        let mut wait = Duration::ZERO;
        if let Some(percent) = self.throttle.busy_limit() {
            let allowed = self.total * percent / 100;
            if self.busy > allowed {
                // Idle for `d`: busy ≤ percent × (total + d) ⇔ d ≥ busy × 100 / percent − total.
                let idle_needed = (self.busy * 100 / percent).saturating_sub(self.total);
                wait = wait.max(idle_needed.max(Duration::from_micros(1)));
            }
        }
        let need = i128::from(len_bytes) * UNITS_PER_BYTE;
        if let Some(rate) = self.throttle.rate_bytes_per_s {
            if self.tokens < need {
                let ns = (need - self.tokens + i128::from(rate) - 1) / i128::from(rate);
                wait = wait.max(Duration::from_nanos(ns.min(i128::from(u64::MAX)) as u64));
            }
        }
        if wait > Duration::ZERO {
            return Some(wait);
        }
        if self.throttle.rate_bytes_per_s.is_some() {
            self.tokens -= need;
            assert!(self.tokens >= 0, "the bucket never goes into debt");
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(throttle: Throttle) -> ThrottleState {
        ThrottleState {
            clock: Clock::REAL,
            throttle,
            ios_in_flight: 0,
            accounted_at: None,
            busy: Duration::ZERO,
            total: Duration::ZERO,
            tokens: 0,
            refilled_at: None,
            next_ticket: 0,
            serving: 0,
            abandoned: std::collections::BTreeSet::new(),
        }
    }

    #[test]
    fn the_worked_example_of_the_rate_holds() {
        let throttle = Throttle { rate_bytes_per_s: Some(100_000_000), ..Throttle::OFF };
        let mut state = state(throttle);
        state.tokens = 524_288 * UNITS_PER_BYTE;
        let now = Instant::now();
        assert_eq!(state.try_admit(now, 524_288, 524_288), None, "the first sub-job goes at once");
        let wait = state.try_admit(now, 524_288, 524_288).expect("the second waits");
        assert_eq!(wait, Duration::from_nanos(5_242_880));
        assert_eq!(state.try_admit(now + wait, 524_288, 524_288), None);
    }

    #[test]
    fn busy_over_the_limit_waits_for_exactly_the_idle_time_needed() {
        let mut state = state(Throttle { busy_percent: Some(25), ..Throttle::OFF });
        let start = Instant::now();
        state.account(start);
        state.ios_in_flight = 1;
        state.account(start + Duration::from_millis(100));
        state.ios_in_flight = 0;
        // Busy 100 ms of 100 ms: at 25 % it needs 300 ms idle.
        assert_eq!(state.try_admit(start + Duration::from_millis(100), 1, 1), Some(Duration::from_millis(300)));
        assert_eq!(state.try_admit(start + Duration::from_millis(400), 1, 1), None);
    }

    #[test]
    fn the_window_halves_busy_and_total_alike() {
        let mut state = state(Throttle::OFF);
        let start = Instant::now();
        state.account(start);
        state.ios_in_flight = 1;
        state.account(start + Duration::from_millis(600));
        state.ios_in_flight = 0;
        state.account(start + Duration::from_millis(1200));
        assert_eq!((state.busy, state.total), (Duration::from_millis(300), Duration::from_millis(600)));
    }

    #[test]
    fn bad_values_are_refused_by_name() {
        for percent in [0, 101, u32::MAX] {
            let error = Throttle { busy_percent: Some(percent), ..Throttle::OFF }.validate().unwrap_err();
            assert!(matches!(error, ConfigError::ThrottleBusy { percent: p } if p == percent));
        }
        let error = Throttle { rate_bytes_per_s: Some(0), ..Throttle::OFF }.validate().unwrap_err();
        assert!(matches!(error, ConfigError::ThrottleRate { bytes_per_s: 0 }));
        assert!(Throttle { busy_percent: Some(100), rate_bytes_per_s: Some(1) }.validate().is_ok());
    }

    #[test]
    fn a_throttle_set_before_any_io_starts_its_history_with_the_first_io_as_a_configured_one() {
        let busy = Throttle { busy_percent: Some(50), ..Throttle::OFF };
        let configured = Arc::new(Throttler::new(busy, 4096, Clock::REAL));
        let set = Arc::new(Throttler::new(Throttle::OFF, 4096, Clock::REAL));
        set.set(busy);
        // Idle for a while, then one I/O of a few milliseconds on each.
        std::thread::sleep(Duration::from_millis(30));
        let guards = (configured.io_started(), set.io_started());
        std::thread::sleep(Duration::from_millis(5));
        drop(guards);
        for (name, throttler) in [("configured", &configured), ("set", &set)] {
            let state = throttler.lock();
            // The history is the I/O alone: all busy, no idle time before it counted.
            assert!(state.total < Duration::from_millis(20), "{name}: {:?} accounted", state.total);
            assert_eq!(state.busy, state.total, "{name}");
        }
    }
}
