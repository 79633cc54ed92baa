//! A [`BlockDevice`] in front of a [`MemDisk`] that records the engine's requests: sizes,
//! requests in flight over time, bytes moved over time and request latency.
//!
//! ```text
//!  engine ──► Observed ──► MemDisk ◄── foreground (not observed: its latency is kept apart)
//!               │ issue: size histogram, in-flight +1
//!               └ done:  in-flight −1, bytes and latency into the series
//! ```

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use kcopyd_core::{BlockDevice, DeviceId, Geometry, IoFuture, ReadBuf, SECTOR_SIZE, WriteBuf};
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

/// The observed device: forwards everything to the disk and records the engine's requests.
#[derive(Debug)]
pub(crate) struct Observed {
    disk: Arc<MemDisk>,
    probe: Arc<Mutex<Probe>>,
    origin: Instant,
}

impl Observed {
    pub(crate) fn new(disk: Arc<MemDisk>, origin: Instant) -> Observed {
        Observed { disk, probe: Arc::default(), origin }
    }

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
}

impl BlockDevice for Observed {
    fn name(&self) -> &str {
        self.disk.name()
    }

    fn id(&self) -> DeviceId {
        // The disk's own identity, so the engine's overlap checks see one device.
        self.disk.id()
    }

    fn geometry(&self) -> Geometry {
        self.disk.geometry()
    }

    fn read(&self, offset_sectors: u64, buf: ReadBuf) -> IoFuture<'_, (ReadBuf, io::Result<()>)> {
        let len_bytes = buf.len() as u64;
        let issued = self.issue(false, len_bytes);
        let request = self.disk.read(offset_sectors, buf);
        Box::pin(async move {
            let done = request.await;
            self.complete(issued, false, len_bytes);
            done
        })
    }

    fn write(&self, offset_sectors: u64, buf: WriteBuf) -> IoFuture<'_, io::Result<()>> {
        let len_bytes = buf.len() as u64;
        let issued = self.issue(true, len_bytes);
        let request = self.disk.write(offset_sectors, buf);
        Box::pin(async move {
            let done = request.await;
            self.complete(issued, true, len_bytes);
            done
        })
    }

    fn write_zeroes(&self, offset_sectors: u64, len_sectors: u64) -> IoFuture<'_, io::Result<()>> {
        let len_bytes = len_sectors.saturating_mul(SECTOR_SIZE as u64);
        let issued = self.issue(true, len_bytes);
        let request = self.disk.write_zeroes(offset_sectors, len_sectors);
        Box::pin(async move {
            let done = request.await;
            self.complete(issued, true, len_bytes);
            done
        })
    }

    fn flush(&self) -> IoFuture<'_, io::Result<()>> {
        self.disk.flush()
    }
}
