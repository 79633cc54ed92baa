//! Small helpers shared by the integration tests.

use std::io;
use std::sync::Arc;

use kcopyd_core::{BlockDevice, Forward, Hooks, IoFuture, ReadBuf, Region, SECTOR_SIZE, WriteBuf};
use kcopyd_sim::MemDisk;

/// A zero-filled in-memory disk.
pub fn zeroed(name: &str, len_sectors: u64, logical_block_size: u32) -> Arc<MemDisk> {
    Arc::new(MemDisk::zeroed(name, len_sectors, logical_block_size))
}

/// An in-memory disk filled with the pattern of `seed`.
pub fn patterned(name: &str, len_sectors: u64, logical_block_size: u32, seed: u64) -> Arc<MemDisk> {
    Arc::new(MemDisk::with_pattern(name, len_sectors, logical_block_size, seed))
}

/// A region over an in-memory disk.
pub fn region(disk: &Arc<MemDisk>, start_sector: u64, len_sectors: u64) -> Region {
    Region::new(disk.clone(), start_sector, len_sectors)
}

/// Asserts that `len` sectors of `target` from `target_start` equal `source` from
/// `source_start`, naming the first differing sector.
pub fn assert_same(source: &MemDisk, source_start: u64, target: &MemDisk, target_start: u64, len: u64) {
    let (a, b) = (source.snapshot(source_start, len), target.snapshot(target_start, len));
    if let Some(at) = a.iter().zip(&b).position(|(x, y)| x != y) {
        panic!(
            "sector {} of {:?} differs from sector {} of {:?}",
            target_start + (at / SECTOR_SIZE) as u64,
            target,
            source_start + (at / SECTOR_SIZE) as u64,
            source
        );
    }
}

/// What a [`HookedDisk`] runs on an I/O: `(offset_sectors, len_bytes)`.
pub type Hook = Box<dyn Fn(u64, usize) + Send + Sync>;

/// Holds the I/Os of a [`HookedDisk`] until opened: a device that does not complete, for as
/// long as the test likes (for ever, if it never opens the gate).
#[derive(Debug)]
pub struct Gate(tokio::sync::watch::Sender<bool>);

impl Gate {
    /// A closed gate.
    pub fn new() -> Gate {
        Gate(tokio::sync::watch::channel(false).0)
    }

    /// Lets every held I/O, and every later one, go on to the disk.
    pub fn open(&self) {
        self.0.send_replace(true);
    }

    /// I/Os waiting at the gate now.
    pub fn held(&self) -> usize {
        self.0.receiver_count()
    }

    fn pass(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut receiver = self.0.subscribe();
        async move {
            // An error means the gate was dropped: it can never open, so hold for ever.
            if receiver.wait_for(|open| *open).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

impl Default for Gate {
    fn default() -> Gate {
        Gate::new()
    }
}

/// An in-memory disk that runs `on_read` when a read is called and `on_write` when a write is
/// called, before passing the I/O on: for recording the order of I/Os, or for a device that
/// panics as a buggy implementation would. Its reads or writes can also be held at a
/// [`Gate`], as a stuck device's. A builder: [`device`](HookedDisk::device) or
/// [`region`](HookedDisk::region) makes the device, a [`Forward`] whose other methods are the
/// disk's own.
#[derive(Debug)]
pub struct HookedDisk {
    inner: Arc<MemDisk>,
    hooks: DiskHooks,
}

/// The hooks of a [`HookedDisk`].
pub struct DiskHooks {
    on_read: Hook,
    on_write: Hook,
    read_gate: Option<Arc<Gate>>,
    write_gate: Option<Arc<Gate>>,
}

impl HookedDisk {
    /// `inner` with no hooks yet.
    pub fn new(inner: Arc<MemDisk>) -> HookedDisk {
        let hooks = DiskHooks {
            on_read: Box::new(|_, _| {}),
            on_write: Box::new(|_, _| {}),
            read_gate: None,
            write_gate: None,
        };
        HookedDisk { inner, hooks }
    }

    /// Holds every read at `gate` (the buffer stays with the disk) until it opens.
    pub fn hold_reads(mut self, gate: Arc<Gate>) -> HookedDisk {
        self.hooks.read_gate = Some(gate);
        self
    }

    /// Holds every write at `gate` until it opens.
    pub fn hold_writes(mut self, gate: Arc<Gate>) -> HookedDisk {
        self.hooks.write_gate = Some(gate);
        self
    }

    /// Runs `hook` on every read.
    pub fn on_read(mut self, hook: impl Fn(u64, usize) + Send + Sync + 'static) -> HookedDisk {
        self.hooks.on_read = Box::new(hook);
        self
    }

    /// Runs `hook` on every write.
    pub fn on_write(mut self, hook: impl Fn(u64, usize) + Send + Sync + 'static) -> HookedDisk {
        self.hooks.on_write = Box::new(hook);
        self
    }

    /// The device.
    pub fn device(self) -> Arc<Forward<DiskHooks>> {
        Arc::new(Forward::new(self.inner, self.hooks))
    }

    /// A region of the device.
    pub fn region(self, start_sector: u64, len_sectors: u64) -> Region {
        Region::new(self.device(), start_sector, len_sectors)
    }
}

impl std::fmt::Debug for DiskHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskHooks")
            .field("read_gate", &self.read_gate)
            .field("write_gate", &self.write_gate)
            .finish_non_exhaustive()
    }
}

impl Hooks for DiskHooks {
    fn read<'a>(
        &'a self,
        inner: &'a dyn BlockDevice,
        offset_sectors: u64,
        buf: ReadBuf,
    ) -> IoFuture<'a, (ReadBuf, io::Result<()>)> {
        (self.on_read)(offset_sectors, buf.len());
        match &self.read_gate {
            None => inner.read(offset_sectors, buf),
            Some(gate) => {
                let pass = gate.pass();
                Box::pin(async move {
                    pass.await;
                    inner.read(offset_sectors, buf).await
                })
            }
        }
    }

    fn write<'a>(
        &'a self,
        inner: &'a dyn BlockDevice,
        offset_sectors: u64,
        buf: WriteBuf,
    ) -> IoFuture<'a, io::Result<()>> {
        (self.on_write)(offset_sectors, buf.len());
        match &self.write_gate {
            None => inner.write(offset_sectors, buf),
            Some(gate) => {
                let pass = gate.pass();
                Box::pin(async move {
                    pass.await;
                    inner.write(offset_sectors, buf).await
                })
            }
        }
    }
}
