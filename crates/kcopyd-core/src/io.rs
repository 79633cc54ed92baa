//! Device I/O on behalf of sub-jobs: the one place a job calls a [`BlockDevice`], where each
//! request is counted as busy time for the throttle, bounded by the client's I/O timeout and
//! recorded in the client's statistics.
//!
//! ```text
//!  sub-job ──► SubjobIo::read / write / write_zeroes
//!               │ busy guard (throttle) ─────────────────────────────┐
//!               │ no timeout: await the device                       │
//!               │ timeout: the request runs as a task of its own;    │ latency, result,
//!               │   the sub-job waits for it or for the timer,       ├─► statistics
//!               │   whichever comes first. On the timer it goes on   │
//!               │   with ETIMEDOUT; the task keeps the buffer until  │
//!               │   the device gives it back, then drops it ─────────┘
//! ```
//!
//! A timed-out request is never dropped half-way: a device (an O_DIRECT backend, say) may
//! still be writing into the buffer, so its pages come back to the pool only when the device
//! completes. A device that never completes keeps them for ever; the job does not wait for it.
//!
//! [`BlockDevice`]: crate::BlockDevice

use std::future::Future;
use std::io;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::stats::{Ended, Op, StatsRecorder};
use crate::throttle::Throttler;
use crate::time_scale::Clock;
use crate::{Device, ReadBuf, WriteBuf, sectors_to_bytes};

/// What every sub-job of a client shares for its device I/O.
#[derive(Debug)]
pub(crate) struct SubjobIo {
    pub(crate) throttler: Arc<Throttler>,
    pub(crate) stats: Arc<StatsRecorder>,
    /// Most model time one request may take; `None` waits for ever.
    pub(crate) timeout: Option<Duration>,
    /// Model time on the client's arbiter.
    pub(crate) clock: Clock,
    /// Requests that timed out and that their devices have not completed yet.
    pub(crate) outstanding: Arc<AtomicU64>,
}

/// The error of a request that timed out.
fn timed_out(timeout: Duration) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("no completion within {timeout:?}"))
}

impl SubjobIo {
    /// Timed-out requests that their devices still hold.
    pub(crate) fn requests_outstanding(&self) -> u64 {
        self.outstanding.load(Ordering::Acquire)
    }

    /// Reads `buf.len()` bytes of `device` at `offset_sectors`. The buffer comes back unless
    /// the request timed out (it then stays with the device until it completes).
    pub(crate) async fn read(
        &self,
        device: &Device,
        offset_sectors: u64,
        buf: ReadBuf,
    ) -> (Option<ReadBuf>, io::Result<()>) {
        let len_bytes = buf.len() as u128;
        let owned = device.clone();
        let request = async move { owned.read(offset_sectors, buf).await };
        match self.run(device, Op::Read, len_bytes, request, |(_, result)| result.is_ok()).await {
            Ok((buf, result)) => (Some(buf), result),
            Err(error) => (None, Err(error)),
        }
    }

    /// Writes `data` to `device` at `offset_sectors`.
    pub(crate) async fn write(&self, device: &Device, offset_sectors: u64, data: WriteBuf) -> io::Result<()> {
        let len_bytes = data.len() as u128;
        let owned = device.clone();
        let request = async move { owned.write(offset_sectors, data).await };
        self.run(device, Op::Write, len_bytes, request, io::Result::is_ok).await.and_then(|result| result)
    }

    /// Zeroes `len_sectors` of `device` at `offset_sectors` (offloaded).
    pub(crate) async fn write_zeroes(&self, device: &Device, offset_sectors: u64, len_sectors: u64) -> io::Result<()> {
        let owned = device.clone();
        let request = async move { owned.write_zeroes(offset_sectors, len_sectors).await };
        let len_bytes = sectors_to_bytes(len_sectors);
        self.run(device, Op::WriteZeroes, len_bytes, request, io::Result::is_ok).await.and_then(|result| result)
    }

    /// Makes `len_sectors` of `device` at `offset_sectors` read as zeroes, releasing their
    /// storage (recorded as a write-zeroes).
    pub(crate) async fn deallocate(&self, device: &Device, offset_sectors: u64, len_sectors: u64) -> io::Result<()> {
        let owned = device.clone();
        let request = async move { owned.deallocate(offset_sectors, len_sectors).await };
        let len_bytes = sectors_to_bytes(len_sectors);
        self.run(device, Op::WriteZeroes, len_bytes, request, io::Result::is_ok).await.and_then(|result| result)
    }

    /// Runs one request: busy while in flight, bounded by the timeout, recorded. `Err` only
    /// when it timed out.
    async fn run<T: 'static>(
        &self,
        device: &Device,
        op: Op,
        len_bytes: u128,
        request: impl Future<Output = T> + 'static,
        succeeded: impl Fn(&T) -> bool,
    ) -> io::Result<T> {
        let began = Instant::now();
        let result = {
            let _busy = self.throttler.io_started();
            match self.timeout {
                None => Ok(request.await),
                Some(timeout) => bounded(request, self.clock.to_tokio(timeout), timeout, &self.outstanding).await,
            }
        };
        let ended = match &result {
            Ok(value) if succeeded(value) => Ended::Ok,
            Ok(_) => Ended::Failed,
            Err(_) => Ended::TimedOut,
        };
        self.stats.io(device.id(), device.name(), op, len_bytes, self.clock.to_model(began.elapsed()), ended);
        result
    }
}

/// Runs `request` as a task of its own on this arbiter and waits for it at most
/// `timeout_tokio` (`timeout` in model time, for the error). On time out the task goes on, holding whatever the request owns, and its
/// result is dropped when it comes. A panic in the request is raised here, in the sub-job,
/// as if the request had run inline.
async fn bounded<T: 'static>(
    request: impl Future<Output = T> + 'static,
    timeout_tokio: Duration,
    timeout: Duration,
    outstanding: &Arc<AtomicU64>,
) -> io::Result<T> {
    let (sender, receiver) = oneshot::channel();
    let task_outstanding = outstanding.clone();
    actix_rt::spawn(async move {
        let result = AssertUnwindSafe(request).catch_unwind().await;
        // The sub-job may have stopped waiting: then the result (and the buffer) drop here.
        if sender.send(result).is_err() {
            let before = task_outstanding.fetch_sub(1, Ordering::AcqRel);
            assert!(before > 0, "a timed-out request completed twice");
        }
    });
    match tokio::time::timeout(timeout_tokio, receiver).await {
        Ok(Ok(Ok(value))) => Ok(value),
        Ok(Ok(Err(panic))) => std::panic::resume_unwind(panic),
        // The runtime dropped the task (it is going away): the request never completed.
        Ok(Err(_)) => Err(io::Error::other("the request's task was dropped before it completed")),
        Err(_) => {
            // The receiver is gone; the task, on this same thread, has not run since: it will
            // find the send failing and count this request back.
            outstanding.fetch_add(1, Ordering::AcqRel);
            Err(timed_out(timeout))
        }
    }
}
