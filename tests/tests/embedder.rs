//! An outside embedder: this file uses nothing but `kcopyd-core`'s public API (no simulator, no
//! helpers of this workspace), with a device of its own, on every kind of runtime a user may
//! have: tokio's current-thread and multi-thread runtimes, plain threads, and an actix System.
//! It must compile and pass as if it were a separate crate.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kcopyd_core::{
    BlockDevice, Client, ClientConfig, ConfigError, DeviceId, Flags, Geometry, IoFuture, Job, Outcome, RangeSet,
    ReadBuf, Region, SECTOR_SIZE, SubmitError, TargetMask, WriteBuf,
};

/// The embedder's own device: bytes in a vector behind a mutex, 4 KiB logical blocks, every
/// I/O yielding once to its executor so that completions interleave.
#[derive(Debug)]
struct VecDisk {
    name: String,
    id: u64,
    bytes: Mutex<Vec<u8>>,
    /// Sectors from this one on fail to write.
    bad_from_sector: Option<u64>,
}

const BLOCK_BYTES: u32 = 4096;

impl VecDisk {
    fn new(name: &str, len_sectors: u64, fill: impl Fn(usize) -> u8) -> Arc<VecDisk> {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let bytes = (0..len_sectors as usize * SECTOR_SIZE).map(fill).collect();
        Arc::new(VecDisk {
            name: name.into(),
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            bytes: Mutex::new(bytes),
            bad_from_sector: None,
        })
    }

    fn failing_from(name: &str, len_sectors: u64, bad_from_sector: u64) -> Arc<VecDisk> {
        let disk = VecDisk::new(name, len_sectors, |_| 0);
        let disk = Arc::into_inner(disk).unwrap();
        Arc::new(VecDisk { bad_from_sector: Some(bad_from_sector), ..disk })
    }

    fn bytes(&self, sectors: std::ops::Range<u64>) -> Vec<u8> {
        self.bytes.lock().unwrap()[sectors.start as usize * SECTOR_SIZE..sectors.end as usize * SECTOR_SIZE].to_vec()
    }

    /// The byte range of a request, or the error a real device would give.
    fn check(&self, offset_sectors: u64, len_bytes: usize) -> io::Result<std::ops::Range<usize>> {
        let start = offset_sectors as usize * SECTOR_SIZE;
        let end = start + len_bytes;
        if start % BLOCK_BYTES as usize != 0 || len_bytes % BLOCK_BYTES as usize != 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{}: misaligned", self.name)));
        }
        if end > self.bytes.lock().unwrap().len() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{}: past the end", self.name)));
        }
        Ok(start..end)
    }
}

/// Yields once to whatever executor polls it (a tokio runtime, actix, or the client's worker).
async fn yield_once() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            return std::task::Poll::Ready(());
        }
        yielded = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    })
    .await
}

impl BlockDevice for VecDisk {
    fn name(&self) -> &str {
        &self.name
    }
    fn id(&self) -> DeviceId {
        DeviceId { namespace: "embedder-vec", major: self.id, minor: 0 }
    }
    fn geometry(&self) -> Geometry {
        Geometry::new((self.bytes.lock().unwrap().len() / SECTOR_SIZE) as u64, BLOCK_BYTES)
    }
    fn read(&self, offset_sectors: u64, mut buf: ReadBuf) -> IoFuture<'_, (ReadBuf, io::Result<()>)> {
        Box::pin(async move {
            yield_once().await;
            let range = match self.check(offset_sectors, buf.len()) {
                Ok(range) => range,
                Err(error) => return (buf, Err(error)),
            };
            let data = self.bytes.lock().unwrap()[range].to_vec();
            buf.copy_from_slice(&data);
            (buf, Ok(()))
        })
    }
    fn write(&self, offset_sectors: u64, buf: WriteBuf) -> IoFuture<'_, io::Result<()>> {
        Box::pin(async move {
            yield_once().await;
            let range = self.check(offset_sectors, buf.len())?;
            let end_sector = (range.end / SECTOR_SIZE) as u64;
            if self.bad_from_sector.is_some_and(|bad| end_sector > bad) {
                return Err(io::Error::other(format!("{}: write at sector {offset_sectors} failed", self.name)));
            }
            // Copied out: the buffer's pages go back to the engine when this future ends.
            buf.copy_to_slice(&mut self.bytes.lock().unwrap()[range]);
            Ok(())
        })
    }
    fn write_zeroes(&self, offset_sectors: u64, len_sectors: u64) -> IoFuture<'_, io::Result<()>> {
        Box::pin(async move {
            let range = self.check(offset_sectors, len_sectors as usize * SECTOR_SIZE)?;
            self.bytes.lock().unwrap()[range].fill(0);
            Ok(())
        })
    }
    fn flush(&self) -> IoFuture<'_, io::Result<()>> {
        Box::pin(async { Ok(()) })
    }
    // Every sector holds data, and nothing is released: the dense device's answers.
    fn allocated(&self, offset_sectors: u64, len_sectors: u64) -> IoFuture<'_, io::Result<RangeSet>> {
        kcopyd_core::all_allocated(offset_sectors, len_sectors)
    }
    fn deallocates(&self) -> bool {
        false
    }
    fn deallocate(&self, offset_sectors: u64, len_sectors: u64) -> IoFuture<'_, io::Result<()>> {
        self.write_zeroes(offset_sectors, len_sectors)
    }
}

const LEN_SECTORS: u64 = 2048; // 1 MiB

fn config() -> ClientConfig {
    // Small sub-jobs so that one job has several in flight, with the rest at its defaults.
    ClientConfig { page_budget: 16, subjob_size_bytes: 16 * 1024, ..ClientConfig::default() }
}

fn source() -> Arc<VecDisk> {
    VecDisk::new("source", LEN_SECTORS, |i| (i * 31 % 251) as u8)
}

/// The jobs every runtime runs: a copy to two targets at an offset, and one with a failing
/// target; returns them with the disks to check afterwards.
struct Case {
    source: Arc<VecDisk>,
    good: Arc<VecDisk>,
    bad: Arc<VecDisk>,
}

impl Case {
    fn new() -> Case {
        Case {
            source: source(),
            good: VecDisk::new("good", LEN_SECTORS + 8, |_| 0xee),
            bad: VecDisk::failing_from("bad", LEN_SECTORS, 1024),
        }
    }

    /// Every sector to `good` at sector 8; to `bad`, whose writes fail from sector 1024.
    fn jobs(&self) -> (Job, Job) {
        let copy = Job::copy(
            Region::new(self.source.clone(), 0, LEN_SECTORS),
            vec![Region::new(self.good.clone(), 8, LEN_SECTORS)],
            Flags::empty(),
        );
        let failing = Job::copy(
            Region::new(self.source.clone(), 0, LEN_SECTORS),
            vec![Region::new(self.bad.clone(), 0, LEN_SECTORS)],
            Flags::IGNORE_ERROR,
        );
        (copy, failing)
    }

    fn check(&self, copy: &Outcome, failing: &Outcome) {
        assert!(copy.is_ok(), "{copy:?}");
        assert_eq!(self.good.bytes(8..8 + LEN_SECTORS), self.source.bytes(0..LEN_SECTORS));
        assert_eq!(self.good.bytes(0..8), vec![0xee; 8 * SECTOR_SIZE], "nothing before the target region");
        assert!(!failing.is_ok() && !failing.read_err);
        let expected: TargetMask = [0].into_iter().collect();
        assert_eq!(failing.write_err, expected);
        let report = &failing.targets[0];
        // The failing writes are the sub-jobs at and after sector 1024 (in target sectors).
        assert!(report.write_failed.contains(1024) && !report.write_failed.contains(1023));
        assert_eq!(report.not_copied, report.write_failed);
        assert_eq!(self.bad.bytes(0..1024), self.source.bytes(0..1024), "what was reported copied was");
    }
}

#[test]
fn a_device_of_its_own_is_tested_without_a_client() {
    let disk = source();
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let (buf, result) = rt.block_on(disk.read(8, ReadBuf::with_capacity(2 * BLOCK_BYTES as usize)));
    result.unwrap();
    assert_eq!(buf.to_vec(), disk.bytes(8..24));
    let (_, result) = rt.block_on(disk.read(1, ReadBuf::with_capacity(BLOCK_BYTES as usize)));
    assert_eq!(result.unwrap_err().kind(), io::ErrorKind::InvalidInput);
    let data = WriteBuf::from_bytes(bytes::Bytes::from(vec![7u8; BLOCK_BYTES as usize]));
    rt.block_on(disk.write(0, data)).unwrap();
    assert_eq!(disk.bytes(0..8), vec![7; BLOCK_BYTES as usize]);
}

#[test]
fn on_a_tokio_current_thread_runtime() {
    let case = Case::new();
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(async {
        let client = Client::new(config()).unwrap();
        let (copy, failing) = case.jobs();
        let (copy, failing) = (client.submit(copy).await.unwrap(), client.submit(failing).await.unwrap());
        let (copy, failing) = (copy.await, failing.await);
        case.check(&copy, &failing);
        let report = client.shutdown().await;
        assert_eq!(report.jobs_completed, 2);
        assert_eq!(report.pool.pages_in_use, 0);
    });
}

#[test]
fn on_a_tokio_multi_thread_runtime() {
    let case = Case::new();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).build().unwrap();
    let client = Client::new(config()).unwrap();
    rt.block_on(async {
        let (copy, failing) = case.jobs();
        let copy = tokio::spawn({
            let client = client.clone();
            async move { client.submit(copy).await.unwrap().await }
        });
        let failing = tokio::spawn({
            let client = client.clone();
            async move { client.submit(failing).await.unwrap().await }
        });
        case.check(&copy.await.unwrap(), &failing.await.unwrap());
        assert_eq!(client.shutdown().await.jobs_completed, 2);
    });
}

#[test]
fn on_plain_threads_with_callbacks() {
    let case = Case::new();
    let client = Client::new(config()).unwrap();
    let (copy, failing) = case.jobs();
    let (sender, receiver) = std::sync::mpsc::channel();
    let copy = copy.on_complete({
        let sender = sender.clone();
        move |outcome| sender.send(("copy", outcome)).unwrap()
    });
    let failing = failing.on_complete(move |outcome| sender.send(("failing", outcome)).unwrap());
    let threads: Vec<_> = [copy, failing]
        .into_iter()
        .map(|job| {
            let client = client.clone();
            std::thread::spawn(move || client.submit_blocking(job).unwrap().wait())
        })
        .collect();
    let outcomes: Vec<Outcome> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    case.check(&outcomes[0], &outcomes[1]);
    let mut called: Vec<_> = receiver.iter().take(2).collect();
    called.sort_by_key(|(name, _)| *name);
    assert_eq!(called[0], ("copy", outcomes[0].clone()));
    assert_eq!(called[1], ("failing", outcomes[1].clone()));
    assert_eq!(client.shutdown_blocking().jobs_completed, 2);
}

#[test]
fn in_the_callers_actix_system() {
    let case = Case::new();
    let system = actix::System::new();
    system.block_on(async {
        let client = Client::start_in_current_system(config()).unwrap();
        let (copy, failing) = case.jobs();
        let (copy, failing) = (client.submit(copy).await.unwrap(), client.submit(failing).await.unwrap());
        case.check(&copy.await, &failing.await);
        assert_eq!(client.shutdown().await.jobs_completed, 2);
    });
}

#[test]
fn errors_are_matched_as_a_careful_embedder_would() {
    // Public enums may grow: match what is known and keep a fallback.
    let describe = |error: &SubmitError| match error {
        SubmitError::OutOfRange { device, .. } => format!("out of range on {device}"),
        SubmitError::ShutDown => "shut down".to_string(),
        other => format!("other: {other}"),
    };
    let client = Client::new(config()).unwrap();
    let small = VecDisk::new("small", 8, |_| 0);
    let job = Job::zero(vec![Region::new(small, 0, 16)], Flags::empty());
    assert_eq!(describe(&client.submit_blocking(job).unwrap_err()), "out of range on small");
    client.shutdown_blocking();
    let job = Job::zero(vec![Region::new(source(), 0, 8)], Flags::empty());
    assert_eq!(describe(&client.try_submit(job).unwrap_err()), "shut down");
    let error = Client::start_in_current_system(config()).unwrap_err();
    assert!(matches!(error, ConfigError::NoActixSystem), "{error}");
}
