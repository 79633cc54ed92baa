//! The timing model of a simulated disk: queue slots, per-request cost, a shared data path
//! and seeded jitter, in (possibly virtual) tokio time.
//!
//! ```text
//!  issue ─► wait for a queue slot ─► cost_us ─► transfer on the data path ─► jitter ─► done
//!           (queue_depth slots)                 (bandwidth, one at a time)
//! ```

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// The timing of one kind of request (reads, or writes and write-zeroes). Every field
/// defaults to zero: instant completion.
///
/// A request waits for a free queue slot (`queue_depth` of them, 0 = unlimited), pays
/// `cost_us`, then moves its bytes over the device's one data path at
/// `bandwidth_bytes_per_s` (0 = unlimited) behind earlier transfers, and completes after up
/// to `jitter_us` more, drawn from the disk's seed.
///
/// Worked example: cost 100 µs, 100 MB/s, queue depth 1, no jitter: two 1 MB reads issued
/// together complete at 10.1 ms and 20.2 ms.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IoModel {
    /// Fixed cost of one request (seek, command overhead).
    pub cost_us: u64,
    /// Transfer rate of the data path; 0 means no transfer time.
    pub bandwidth_bytes_per_s: u64,
    /// Requests served at once; 0 means no limit.
    pub queue_depth: u32,
    /// Up to this much extra delay per request, drawn from the seed.
    pub jitter_us: u64,
}

impl IoModel {
    pub(crate) fn is_instant(&self) -> bool {
        self.cost_us == 0 && self.bandwidth_bytes_per_s == 0 && self.jitter_us == 0
    }
}

/// The timing model of a disk, in (possibly virtual) tokio time. Defaults: instant.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Latency {
    /// Reads.
    pub read: IoModel,
    /// Writes and write-zeroes.
    pub write: IoModel,
    /// Seed of the jitter.
    pub seed: u64,
}

/// The busy-until times of one direction of a disk.
#[derive(Default)]
pub(crate) struct Timeline {
    /// When each queue slot frees up.
    slots: Vec<Instant>,
    /// When the data path frees up.
    path_free: Option<Instant>,
}

impl Timeline {
    /// When a request of `len_bytes` issued `now` under `model` completes, given `jitter_us`;
    /// every model duration lasts `scale` times as long in tokio time.
    pub(crate) fn schedule(
        &mut self,
        model: &IoModel,
        now: Instant,
        len_bytes: usize,
        jitter_us: u64,
        scale: u32,
    ) -> Instant {
        let slot = if model.queue_depth == 0 {
            None
        } else {
            if self.slots.is_empty() {
                self.slots = vec![now; model.queue_depth as usize];
            }
            // The slot that frees first; ties go to the lowest index, for determinism.
            let (index, _) = self.slots.iter().enumerate().min_by_key(|&(i, t)| (*t, i)).expect("depth >= 1");
            Some(index)
        };
        let start = slot.map_or(now, |i| self.slots[i].max(now));
        let transfer_start = start + Duration::from_micros(model.cost_us) * scale;
        let transfer_end = if model.bandwidth_bytes_per_s == 0 {
            transfer_start
        } else {
            let nanos = len_bytes as u128 * 1_000_000_000 / u128::from(model.bandwidth_bytes_per_s);
            let transfer = Duration::from_nanos(nanos as u64) * scale;
            let begin = self.path_free.map_or(transfer_start, |free| free.max(transfer_start));
            self.path_free = Some(begin + transfer);
            begin + transfer
        };
        let done = transfer_end + Duration::from_micros(jitter_us) * scale;
        if let Some(i) = slot {
            self.slots[i] = done;
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_worked_example_holds() {
        let model = IoModel { cost_us: 100, bandwidth_bytes_per_s: 100_000_000, queue_depth: 1, jitter_us: 0 };
        let mut timeline = Timeline::default();
        let now = Instant::now();
        let first = timeline.schedule(&model, now, 1_000_000, 0, 1);
        let second = timeline.schedule(&model, now, 1_000_000, 0, 1);
        assert_eq!(first - now, Duration::from_micros(10_100));
        assert_eq!(second - now, Duration::from_micros(20_200));
    }

    #[test]
    fn deep_queues_overlap_costs_but_share_the_data_path() {
        let model = IoModel { cost_us: 1000, bandwidth_bytes_per_s: 1_000_000_000, queue_depth: 4, jitter_us: 0 };
        let mut timeline = Timeline::default();
        let now = Instant::now();
        let done: Vec<Duration> = (0..4).map(|_| timeline.schedule(&model, now, 1_000_000, 0, 1) - now).collect();
        // All four pay their cost at once, then transfer one after another (1 ms each).
        assert_eq!(done, [2, 3, 4, 5].map(Duration::from_millis));
    }
}
