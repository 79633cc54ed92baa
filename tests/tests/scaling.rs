//! The engine's work per request does not grow with the number of sub-jobs in flight: a
//! request's future is polled when it is woken, not whenever any other sub-job of the job is.
//! Counted in polls in virtual time, so the test is exact and independent of the machine.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use kcopyd_core::{BlockDevice, ClientConfig, Device, Flags, Forward, Hooks, IoFuture, Job, ReadBuf, Region, WriteBuf};
use kcopyd_sim::{IoModel, Latency, MemDisk, MemDiskOptions, Simulation};

/// A future that counts its polls.
struct Counted<'a, F> {
    inner: F,
    polls: &'a AtomicU64,
}

impl<F: Future + Unpin> Future for Counted<'_, F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.polls.fetch_add(1, Ordering::Relaxed);
        Pin::new(&mut self.inner).poll(cx)
    }
}

/// The hooks of a disk whose request futures count their polls.
#[derive(Debug, Default)]
struct Counting {
    requests: AtomicU64,
    polls: AtomicU64,
}

/// A disk whose request futures count their polls; the rest is the disk's own.
type CountingDisk = Forward<Counting>;

fn counting(inner: MemDisk) -> Arc<CountingDisk> {
    Arc::new(Forward::new(Arc::new(inner), Counting::default()))
}

impl Counting {
    fn count<'a, T: 'a>(&'a self, future: IoFuture<'a, T>) -> IoFuture<'a, T> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        Box::pin(Counted { inner: future, polls: &self.polls })
    }

    fn polls_per_request(&self) -> f64 {
        self.polls.load(Ordering::Relaxed) as f64 / self.requests.load(Ordering::Relaxed) as f64
    }
}

impl Hooks for Counting {
    fn read<'a>(
        &'a self,
        inner: &'a dyn BlockDevice,
        offset_sectors: u64,
        buf: ReadBuf,
    ) -> IoFuture<'a, (ReadBuf, io::Result<()>)> {
        self.count(inner.read(offset_sectors, buf))
    }

    fn write<'a>(
        &'a self,
        inner: &'a dyn BlockDevice,
        offset_sectors: u64,
        buf: WriteBuf,
    ) -> IoFuture<'a, io::Result<()>> {
        self.count(inner.write(offset_sectors, buf))
    }

    fn write_zeroes<'a>(
        &'a self,
        inner: &'a dyn BlockDevice,
        offset_sectors: u64,
        len_sectors: u64,
    ) -> IoFuture<'a, io::Result<()>> {
        self.count(inner.write_zeroes(offset_sectors, len_sectors))
    }

    fn deallocate<'a>(
        &'a self,
        inner: &'a dyn BlockDevice,
        offset_sectors: u64,
        len_sectors: u64,
    ) -> IoFuture<'a, io::Result<()>> {
        self.count(inner.deallocate(offset_sectors, len_sectors))
    }
}

#[test]
fn a_request_is_polled_a_few_times_however_many_subjobs_are_in_flight() {
    let len_sectors = 32 * 2048; // 32 MiB in 512 sub-jobs of 64 KiB
    // Requests take time and overlap (64 deep), so that many wait at once.
    let model = IoModel { cost_us: 50, bandwidth_bytes_per_s: 2_000_000_000, queue_depth: 64, jitter_us: 20 };
    let disk = |name: &str| {
        MemDisk::new(MemDiskOptions {
            name: name.into(),
            len_sectors,
            latency: Latency { read: model, write: model, seed: 3, ..Latency::default() },
            ..MemDiskOptions::default()
        })
    };
    for subjobs_in_flight in [1, 8, 64] {
        let source_disk = disk("source");
        source_disk.fill_pattern(4);
        let source = counting(source_disk);
        let target = counting(disk("target"));
        let config = ClientConfig {
            page_budget: 16 * subjobs_in_flight,
            subjob_size_bytes: 64 << 10,
            subjobs_in_flight,
            ..ClientConfig::default()
        };
        let ok = Simulation::run(config, |client, _| {
            let (source, target) = (source.clone(), target.clone());
            async move {
                let job = Job::copy(
                    Region::new(source as Device, 0, len_sectors),
                    vec![Region::new(target as Device, 0, len_sectors)],
                    Flags::empty(),
                );
                client.submit(job).await.unwrap().await.is_ok()
            }
        })
        .unwrap();
        assert!(ok);
        assert_eq!(source.hooks().requests.load(Ordering::Relaxed), 512);
        for (side, disk) in [("reads", &source), ("writes", &target)] {
            let polls = disk.hooks().polls_per_request();
            assert!(polls <= 3.0, "{subjobs_in_flight} in flight: {polls:.1} polls per request ({side})");
        }
    }
}
