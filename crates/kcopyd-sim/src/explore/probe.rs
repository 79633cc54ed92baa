//! A [`BlockDevice`] in front of a [`MemDisk`] that records the engine's requests: sizes,
//! requests in flight over time, bytes moved over time and request latency.
//!
//! ```text
//!  engine ──► Observed = Forward<Probing> ──► MemDisk ◄── foreground (not observed: its
//!               │ issue: size histogram, in-flight +1         latency is kept apart)
//!               └ done:  in-flight −1, bytes and latency into the series
//!               allocation queries, flush: the disk's own (a sparse disk stays sparse)
//! ```

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use kcopyd_core::{BlockDevice, Forward, Hooks, IoFuture, ReadBuf, WriteBuf, sectors_to_bytes};
use tokio::time::Instant;

use super::series::Series;
use crate::{MemDisk, to_model};

/// Microseconds of model time since `origin`.
pub(crate) fn model_us_since(origin: Instant) -> u64 {
    to_model(Instant::now().saturating_duration_since(origin)).as_micros() as u64
}

/// What one direction (reads, or writes) of the engine's requests did.
#[derive(Debug, Default, Clone)]
pub(crate) struct Direction {
    pub(crate) requests: u64,
    pub(crate) bytes: u64,
    pub(crate) latency_us_total: u64,
    /// Bytes completed over time.
    pub(crate) bytes_series: Series,
}

/// Everything recorded about one disk.
#[derive(Debug, Default, Clone)]
pub(crate) struct Probe {
    pub(crate) reads: Direction,
    pub(crate) writes: Direction,
    /// Request sizes in bytes: (reads, writes) of each.
    pub(crate) sizes: BTreeMap<u64, (u64, u64)>,
    in_flight: u64,
    pub(crate) in_flight_max: u64,
    last_change_us: u64,
    pub(crate) busy_us: u64,
    /// Integral of requests in flight over time.
    pub(crate) in_flight_series: Series,
}

impl Probe {
    /// Moves the in-flight integral up to `now_us`.
    fn advance(&mut self, now_us: u64) {
        let from = self.last_change_us;
        if self.in_flight > 0 {
            self.busy_us += now_us.saturating_sub(from);
        }
        self.in_flight_series.add_span(from, now_us, self.in_flight as f64);
        self.last_change_us = now_us.max(from);
    }

    fn issue(&mut self, now_us: u64, write: bool, len_bytes: u64) {
        self.advance(now_us);
        self.in_flight += 1;
        self.in_flight_max = self.in_flight_max.max(self.in_flight);
        let counts = self.sizes.entry(len_bytes).or_default();
        if write {
            counts.1 += 1;
        } else {
            counts.0 += 1;
        }
    }

    fn complete(&mut self, now_us: u64, issued_us: u64, write: bool, len_bytes: u64) {
        self.advance(now_us);
        self.in_flight -= 1;
        let direction = if write { &mut self.writes } else { &mut self.reads };
        direction.requests += 1;
        direction.bytes = direction.bytes.saturating_add(len_bytes);
        direction.latency_us_total += now_us - issued_us;
        direction.bytes_series.add(now_us, len_bytes as f64);
    }

    /// Closes the in-flight integral at `now_us`.
    pub(crate) fn finish(&mut self, now_us: u64) {
        self.advance(now_us);
    }
}

/// The observed device: a [`Forward`] to the disk whose hooks record the engine's reads,
/// writes and write-zeroes (deallocations counted as write-zeroes); everything else,
/// allocation queries included, is the disk's own.
pub(crate) type Observed = Forward<Probing>;

/// An observed view of `disk`, its times counted from `origin`.
pub(crate) fn observed(disk: Arc<MemDisk>, origin: Instant) -> Observed {
    Forward::new(disk, Probing { probe: Arc::default(), origin })
}

/// The hooks of an [`Observed`] disk: the probe, and the time origin.
#[derive(Debug)]
pub(crate) struct Probing {
    probe: Arc<Mutex<Probe>>,
    origin: Instant,
}

impl Probing {
    pub(crate) fn probe(&self) -> MutexGuard<'_, Probe> {
        self.probe.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records the issue of a request and returns its issue time.
    fn issue(&self, write: bool, len_bytes: u64) -> u64 {
        let now = model_us_since(self.origin);
        self.probe().issue(now, write, len_bytes);
        now
    }

    fn complete(&self, issued_us: u64, write: bool, len_bytes: u64) {
        let now = model_us_since(self.origin);
        self.probe().complete(now, issued_us, write, len_bytes);
    }

    /// Records `request` (a write if `write`) of `len_bytes` from issue to completion.
    fn watched<'a, T: Send + 'a>(&'a self, write: bool, len_bytes: u64, request: IoFuture<'a, T>) -> IoFuture<'a, T> {
        let issued = self.issue(write, len_bytes);
        Box::pin(async move {
            let done = request.await;
            self.complete(issued, write, len_bytes);
            done
        })
    }
}

/// Bytes of `len_sectors`, saturating (a write-zeroes may cover a whole huge disk).
fn zeroes_bytes(len_sectors: u64) -> u64 {
    u64::try_from(sectors_to_bytes(len_sectors)).unwrap_or(u64::MAX)
}

impl Hooks for Probing {
    fn read<'a>(
        &'a self,
        inner: &'a dyn BlockDevice,
        offset_sectors: u64,
        buf: ReadBuf,
    ) -> IoFuture<'a, (ReadBuf, io::Result<()>)> {
        let len_bytes = buf.len() as u64;
        self.watched(false, len_bytes, inner.read(offset_sectors, buf))
    }

    fn write<'a>(
        &'a self,
        inner: &'a dyn BlockDevice,
        offset_sectors: u64,
        buf: WriteBuf,
    ) -> IoFuture<'a, io::Result<()>> {
        let len_bytes = buf.len() as u64;
        self.watched(true, len_bytes, inner.write(offset_sectors, buf))
    }

    fn write_zeroes<'a>(
        &'a self,
        inner: &'a dyn BlockDevice,
        offset_sectors: u64,
        len_sectors: u64,
    ) -> IoFuture<'a, io::Result<()>> {
        self.watched(true, zeroes_bytes(len_sectors), inner.write_zeroes(offset_sectors, len_sectors))
    }

    fn deallocate<'a>(
        &'a self,
        inner: &'a dyn BlockDevice,
        offset_sectors: u64,
        len_sectors: u64,
    ) -> IoFuture<'a, io::Result<()>> {
        self.watched(true, zeroes_bytes(len_sectors), inner.deallocate(offset_sectors, len_sectors))
    }
}

#[cfg(test)]
mod tests {
    use kcopyd_core::RangeSet;

    use super::*;
    use crate::MemDiskOptions;

    #[test]
    fn an_observed_sparse_disk_stays_sparse() {
        crate::Simulation::block_on(async {
            let disk = Arc::new(MemDisk::new(MemDiskOptions {
                name: "thin".into(),
                len_sectors: 1024,
                sparse: true,
                ..MemDiskOptions::default()
            }));
            disk.fill_pattern_range(100..108, 3, 0);
            let observed = observed(disk.clone(), Instant::now());
            // Before, the scenario's view of every disk said all allocated and no deallocation.
            assert_eq!(observed.allocated(0, 1024).await.unwrap(), RangeSet::from_range(100..108));
            assert!(observed.deallocates());
            observed.deallocate(100, 8).await.unwrap();
            assert_eq!(disk.allocated_sectors(0..1024), 0);
            let probe = observed.hooks().probe().clone();
            assert_eq!((probe.writes.requests, probe.writes.bytes), (1, 8 * 512), "the deallocation is observed");
        });
    }
}
