//! Client statistics: what [`Client::stats`](crate::Client::stats) returns, and the counters
//! behind it.
//!
//! ```text
//!  Client::send ───────────── jobs_submitted
//!  sub-job waits for pages ── page_wait_us           ┐
//!  each device I/O ────────── per device, per op:    │  StatsRecorder (one per client,
//!                              count, errors,        │  behind a mutex: updated on the
//!                              timeouts, bytes,      │  client's arbiter, read from any
//!                              latency histogram     │  thread)
//!  a job's completion ─────── completed / failed /   ┘
//!                              cancelled
//! ```
//!
//! Times are model time ([`crate::time_scale`]): in a simulation they are the simulated
//! disk's, not tokio's scaled clock.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

use crate::{DeviceId, Outcome, PoolStats};

/// Buckets of a [`LatencyHistogram`]: bucket 0 counts latencies under 1 µs, bucket `i` those
/// from 2^(i−1) to 2^i µs; the last one holds everything longer (2^38 µs is over three days).
pub const LATENCY_BUCKETS: usize = 40;

/// Latencies in power-of-two buckets of microseconds.
///
/// Worked example: latencies of 0.5 µs, 3 µs and 3000 µs land in buckets 0 (< 1 µs),
/// 2 (2–4 µs) and 12 (2048–4096 µs); `quantile_us(0.5)` is then 4 (the upper bound of the
/// bucket holding the middle one), and `max_us` is 3000.
///
/// ```
/// # use std::time::Duration;
/// # use kcopyd_core::LatencyHistogram;
/// let mut histogram = LatencyHistogram::default();
/// for us in [0.5, 3.0, 3000.0] {
///     histogram.record(Duration::from_secs_f64(us / 1e6));
/// }
/// assert_eq!((histogram.buckets[0], histogram.buckets[2], histogram.buckets[12]), (1, 1, 1));
/// assert_eq!(histogram.quantile_us(0.5), Some(4));
/// assert_eq!(histogram.max_us, 3000);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct LatencyHistogram {
    /// Counts per bucket (see [`LATENCY_BUCKETS`]).
    pub buckets: Vec<u64>,
    /// Sum of all latencies, in microseconds (for the mean).
    pub sum_us: u64,
    /// The longest latency, in microseconds.
    pub max_us: u64,
}

impl Default for LatencyHistogram {
    fn default() -> LatencyHistogram {
        LatencyHistogram { buckets: vec![0; LATENCY_BUCKETS], sum_us: 0, max_us: 0 }
    }
}

impl LatencyHistogram {
    /// Counts one latency.
    pub fn record(&mut self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let bucket = if latency < Duration::from_micros(1) {
            0
        } else {
            // 1 µs → bucket 1, 2–3 µs → 2, 4–7 µs → 3: the bit length of the microseconds.
            ((u64::BITS - us.leading_zeros()) as usize).min(LATENCY_BUCKETS - 1)
        };
        self.buckets[bucket] += 1;
        self.sum_us = self.sum_us.saturating_add(us);
        self.max_us = self.max_us.max(us);
    }

    /// Latencies counted.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// An upper bound, in microseconds, of the `quantile` (0 to 1) of the latencies: the upper
    /// edge of the bucket that holds it (at most `max_us`). `None` when nothing was counted.
    pub fn quantile_us(&self, quantile: f64) -> Option<u64> {
        let count = self.count();
        if count == 0 {
            return None;
        }
        let rank = ((quantile.clamp(0.0, 1.0) * count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (bucket, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(if bucket == 0 { 1 } else { (1u64 << bucket).min(self.max_us.max(1)) });
            }
        }
        Some(self.max_us)
    }
}

/// The I/Os of one kind on one device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct OpStats {
    /// Requests completed (successful or not, timed out included).
    pub count: u64,
    /// Requests that failed, timed out included.
    pub errors: u64,
    /// Requests that timed out ([`ClientConfig::io_timeout_ms`](crate::ClientConfig::io_timeout_ms)).
    pub timeouts: u64,
    /// Bytes of the requests that succeeded. A `u128`: one offloaded write-zeroes of a whole
    /// device of up to `u64::MAX` sectors is up to 2⁷³ bytes.
    pub bytes: u128,
    /// Time from the call to the device to its completion (or to the timeout).
    pub latency: LatencyHistogram,
}

/// One device's I/O, by operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct DeviceStats {
    /// The device's name.
    pub name: String,
    /// The device's identity (two names can share it, and one name can be on two devices).
    pub id: DeviceId,
    /// Reads.
    pub read: OpStats,
    /// Writes.
    pub write: OpStats,
    /// Write-zeroes requests (offloaded zeroing; zeroes written from a buffer are writes).
    pub write_zeroes: OpStats,
}

/// What a client has done since it started. See docs/DESIGN.md for how to read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ClientStats {
    /// Jobs accepted by `submit`, `submit_blocking` or `try_submit`.
    pub jobs_submitted: u64,
    /// Jobs completed, whatever their outcome: `jobs_submitted − jobs_completed` are queued or
    /// running.
    pub jobs_completed: u64,
    /// Completed jobs with a read or write error or a panic (not counting cancelled ones
    /// without an error).
    pub jobs_failed: u64,
    /// Completed jobs whose outcome says cancelled.
    pub jobs_cancelled: u64,
    /// The page pool now, with its high-water mark (`pages_in_use_max`).
    pub pool: PoolStats,
    /// Total time sub-jobs spent waiting for pages, in microseconds, summed over sub-jobs (two
    /// waiting together for 1 ms count 2 ms). Large against the copy's duration: the page
    /// budget limits the copy.
    pub page_wait_us: u64,
    /// Total time sub-jobs spent waiting for the throttle, in microseconds, summed likewise.
    pub throttle_wait_us: u64,
    /// Requests that timed out and that their devices still hold (with their buffers' pages).
    pub requests_outstanding: u64,
    /// Per device the client did I/O on, in the order of their identities.
    pub devices: Vec<DeviceStats>,
}

/// The kind of a device request, for statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Read,
    Write,
    WriteZeroes,
}

/// How one request ended, for statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    Ok,
    Failed,
    TimedOut,
}

#[derive(Debug, Default)]
struct Counters {
    jobs_submitted: u64,
    jobs_completed: u64,
    jobs_failed: u64,
    jobs_cancelled: u64,
    page_wait: Duration,
    throttle_wait: Duration,
    devices: BTreeMap<DeviceId, DeviceStats>,
}

/// A client's counters, shared by its handles and actors.
#[derive(Debug, Default)]
pub(crate) struct StatsRecorder {
    counters: Mutex<Counters>,
}

impl StatsRecorder {
    fn lock(&self) -> std::sync::MutexGuard<'_, Counters> {
        // Plain counters, consistent after every statement.
        self.counters.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn job_submitted(&self) {
        self.lock().jobs_submitted += 1;
    }

    pub(crate) fn job_completed(&self, outcome: &Outcome) {
        let mut counters = self.lock();
        counters.jobs_completed += 1;
        if outcome.read_err || !outcome.write_err.is_empty() || outcome.panicked.is_some() {
            counters.jobs_failed += 1;
        }
        if outcome.cancelled {
            counters.jobs_cancelled += 1;
        }
    }

    pub(crate) fn waited_for_pages(&self, waited: Duration) {
        self.lock().page_wait += waited;
    }

    pub(crate) fn waited_for_throttle(&self, waited: Duration) {
        self.lock().throttle_wait += waited;
    }

    /// Counts one device request of `len_bytes` that took `latency` (model time).
    pub(crate) fn io(&self, device: DeviceId, name: &str, op: Op, len_bytes: u128, latency: Duration, ended: Ended) {
        let mut counters = self.lock();
        let stats = counters.devices.entry(device).or_insert_with(|| DeviceStats {
            name: name.to_owned(),
            id: device,
            read: OpStats::default(),
            write: OpStats::default(),
            write_zeroes: OpStats::default(),
        });
        let op = match op {
            Op::Read => &mut stats.read,
            Op::Write => &mut stats.write,
            Op::WriteZeroes => &mut stats.write_zeroes,
        };
        op.count += 1;
        match ended {
            Ended::Ok => op.bytes = op.bytes.saturating_add(len_bytes),
            Ended::Failed => op.errors += 1,
            Ended::TimedOut => {
                op.errors += 1;
                op.timeouts += 1;
            }
        }
        op.latency.record(latency);
    }

    pub(crate) fn snapshot(&self, pool: PoolStats, requests_outstanding: u64) -> ClientStats {
        let counters = self.lock();
        ClientStats {
            jobs_submitted: counters.jobs_submitted,
            jobs_completed: counters.jobs_completed,
            jobs_failed: counters.jobs_failed,
            jobs_cancelled: counters.jobs_cancelled,
            pool,
            page_wait_us: u64::try_from(counters.page_wait.as_micros()).unwrap_or(u64::MAX),
            throttle_wait_us: u64::try_from(counters.throttle_wait.as_micros()).unwrap_or(u64::MAX),
            requests_outstanding,
            devices: counters.devices.values().cloned().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_follow_the_bit_length_of_the_microseconds() {
        let mut histogram = LatencyHistogram::default();
        for (us, bucket) in [(1, 1), (2, 2), (3, 2), (4, 3), (1023, 10), (1024, 11)] {
            let before = histogram.buckets[bucket];
            histogram.record(Duration::from_micros(us));
            assert_eq!(histogram.buckets[bucket], before + 1, "{us} µs");
        }
        histogram.record(Duration::from_secs(1 << 40));
        assert_eq!(histogram.buckets[LATENCY_BUCKETS - 1], 1, "the last bucket holds the rest");
        assert_eq!(histogram.count(), 7);
        assert_eq!(LatencyHistogram::default().quantile_us(0.99), None);
    }
}
