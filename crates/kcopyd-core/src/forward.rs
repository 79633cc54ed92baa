//! A device in front of another: [`Forward`] passes every [`BlockDevice`] method to the device
//! it wraps, and lets [`Hooks`] watch, delay, change or replace each call on the way.
//!
//! ```text
//!  engine ──► Forward { inner, hooks } ──► inner (any BlockDevice)
//!               │ name, read, write, write_zeroes, flush, allocated, deallocate:
//!               │   hooks.<method>(inner, …)  (default: inner.<method>(…))
//!               │ id, geometry, deallocates: always the inner device's
//! ```
//!
//! Wrappers that forwarded the trait by hand forgot the methods that had default bodies
//! (`allocated`, `deallocates`, `deallocate`), so a sparse source looked dense through them.
//! Now the trait has no default bodies, so every implementor — this adapter included — must
//! write each method, and a method added to the trait does not compile until `Forward`
//! forwards it. A hook that is not overridden forwards; the identity, geometry and
//! deallocation ability are never hooked, so the engine's overlap checks and its choices see
//! the inner device.

use std::fmt;
use std::io;

use crate::{BlockDevice, Device, DeviceId, Geometry, IntoDevice, IoFuture, RangeSet, ReadBuf, WriteBuf};

/// Per-call hooks of a [`Forward`] device. Each method gets the inner device and the call's
/// arguments; its default passes the call on unchanged. Override the ones to watch (record a
/// request and its completion), delay (hold it at a gate), change or replace (skip a write).
///
/// `()` is the hooks of a plain forwarding device.
pub trait Hooks: Send + Sync + fmt::Debug {
    /// The name the device goes by.
    fn name<'a>(&'a self, inner: &'a dyn BlockDevice) -> &'a str {
        inner.name()
    }

    /// A read ([`BlockDevice::read`]).
    fn read<'a>(
        &'a self,
        inner: &'a dyn BlockDevice,
        offset_sectors: u64,
        buf: ReadBuf,
    ) -> IoFuture<'a, (ReadBuf, io::Result<()>)> {
        inner.read(offset_sectors, buf)
    }

    /// A write ([`BlockDevice::write`]).
    fn write<'a>(
        &'a self,
        inner: &'a dyn BlockDevice,
        offset_sectors: u64,
        buf: WriteBuf,
    ) -> IoFuture<'a, io::Result<()>> {
        inner.write(offset_sectors, buf)
    }

    /// A write-zeroes ([`BlockDevice::write_zeroes`]).
    fn write_zeroes<'a>(
        &'a self,
        inner: &'a dyn BlockDevice,
        offset_sectors: u64,
        len_sectors: u64,
    ) -> IoFuture<'a, io::Result<()>> {
        inner.write_zeroes(offset_sectors, len_sectors)
    }

    /// A flush ([`BlockDevice::flush`]).
    fn flush<'a>(&'a self, inner: &'a dyn BlockDevice) -> IoFuture<'a, io::Result<()>> {
        inner.flush()
    }

    /// An allocation query ([`BlockDevice::allocated`]).
    fn allocated<'a>(
        &'a self,
        inner: &'a dyn BlockDevice,
        offset_sectors: u64,
        len_sectors: u64,
    ) -> IoFuture<'a, io::Result<RangeSet>> {
        inner.allocated(offset_sectors, len_sectors)
    }

    /// A deallocation ([`BlockDevice::deallocate`]).
    fn deallocate<'a>(
        &'a self,
        inner: &'a dyn BlockDevice,
        offset_sectors: u64,
        len_sectors: u64,
    ) -> IoFuture<'a, io::Result<()>> {
        inner.deallocate(offset_sectors, len_sectors)
    }
}

/// No hooks: every call goes to the inner device unchanged.
impl Hooks for () {}

/// A device that forwards every [`BlockDevice`] method to `inner`, through `hooks`.
///
/// ```
/// # use std::sync::Arc;
/// # use std::sync::atomic::{AtomicU64, Ordering};
/// # use kcopyd_core::{BlockDevice, Device, Forward, Hooks, IoFuture, WriteBuf};
/// /// Counts writes; everything else passes through untouched.
/// #[derive(Debug, Default)]
/// struct CountWrites(AtomicU64);
///
/// impl Hooks for CountWrites {
///     fn write<'a>(&'a self, inner: &'a dyn BlockDevice, at: u64, buf: WriteBuf) -> IoFuture<'a, std::io::Result<()>> {
///         self.0.fetch_add(1, Ordering::Relaxed);
///         inner.write(at, buf)
///     }
/// }
///
/// fn counted(disk: Device) -> Arc<Forward<CountWrites>> {
///     Arc::new(Forward::new(disk, CountWrites::default()))
/// }
/// ```
pub struct Forward<H> {
    inner: Device,
    hooks: H,
}

impl<H: Hooks> Forward<H> {
    /// `inner`, its calls going through `hooks`.
    pub fn new(inner: impl IntoDevice, hooks: H) -> Forward<H> {
        Forward { inner: inner.into_device(), hooks }
    }

    /// The device calls go to.
    pub fn inner(&self) -> &Device {
        &self.inner
    }

    /// The hooks.
    pub fn hooks(&self) -> &H {
        &self.hooks
    }
}

impl<H: Hooks> BlockDevice for Forward<H> {
    fn name(&self) -> &str {
        self.hooks.name(&*self.inner)
    }

    fn id(&self) -> DeviceId {
        // The inner device's identity, so that overlap checks see one device.
        self.inner.id()
    }

    fn geometry(&self) -> Geometry {
        self.inner.geometry()
    }

    fn read(&self, offset_sectors: u64, buf: ReadBuf) -> IoFuture<'_, (ReadBuf, io::Result<()>)> {
        self.hooks.read(&*self.inner, offset_sectors, buf)
    }

    fn write(&self, offset_sectors: u64, buf: WriteBuf) -> IoFuture<'_, io::Result<()>> {
        self.hooks.write(&*self.inner, offset_sectors, buf)
    }

    fn write_zeroes(&self, offset_sectors: u64, len_sectors: u64) -> IoFuture<'_, io::Result<()>> {
        self.hooks.write_zeroes(&*self.inner, offset_sectors, len_sectors)
    }

    fn flush(&self) -> IoFuture<'_, io::Result<()>> {
        self.hooks.flush(&*self.inner)
    }

    fn allocated(&self, offset_sectors: u64, len_sectors: u64) -> IoFuture<'_, io::Result<RangeSet>> {
        self.hooks.allocated(&*self.inner, offset_sectors, len_sectors)
    }

    fn deallocates(&self) -> bool {
        self.inner.deallocates()
    }

    fn deallocate(&self, offset_sectors: u64, len_sectors: u64) -> IoFuture<'_, io::Result<()>> {
        self.hooks.deallocate(&*self.inner, offset_sectors, len_sectors)
    }
}

impl<H: Hooks> fmt::Debug for Forward<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Forward").field("inner", &self.inner).field("hooks", &self.hooks).finish()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll, Waker};

    use super::*;

    /// A device that records which of its methods were called, with their arguments.
    #[derive(Debug, Default)]
    struct Recording {
        calls: Mutex<Vec<String>>,
    }

    impl Recording {
        fn record(&self, call: String) {
            self.calls.lock().unwrap().push(call);
        }
    }

    fn ready<'a, T: Send + 'a>(value: T) -> IoFuture<'a, T> {
        Box::pin(std::future::ready(value))
    }

    impl BlockDevice for Recording {
        fn name(&self) -> &str {
            self.record("name".into());
            "recording"
        }
        fn id(&self) -> DeviceId {
            self.record("id".into());
            DeviceId { namespace: "recording", major: 7, minor: 9 }
        }
        fn geometry(&self) -> Geometry {
            self.record("geometry".into());
            Geometry::new(1000, 512).with_write_zeroes(true).with_zoned(true).with_zone_sectors(100)
        }
        fn read(&self, offset_sectors: u64, buf: ReadBuf) -> IoFuture<'_, (ReadBuf, io::Result<()>)> {
            self.record(format!("read {offset_sectors} {}", buf.len()));
            ready((buf, Ok(())))
        }
        fn write(&self, offset_sectors: u64, buf: WriteBuf) -> IoFuture<'_, io::Result<()>> {
            self.record(format!("write {offset_sectors} {}", buf.len()));
            ready(Ok(()))
        }
        fn write_zeroes(&self, offset_sectors: u64, len_sectors: u64) -> IoFuture<'_, io::Result<()>> {
            self.record(format!("write_zeroes {offset_sectors} {len_sectors}"));
            ready(Ok(()))
        }
        fn flush(&self) -> IoFuture<'_, io::Result<()>> {
            self.record("flush".into());
            ready(Ok(()))
        }
        fn allocated(&self, offset_sectors: u64, len_sectors: u64) -> IoFuture<'_, io::Result<RangeSet>> {
            self.record(format!("allocated {offset_sectors} {len_sectors}"));
            ready(Ok(RangeSet::from_range(offset_sectors + 1..offset_sectors + 2)))
        }
        fn deallocates(&self) -> bool {
            self.record("deallocates".into());
            true
        }
        fn deallocate(&self, offset_sectors: u64, len_sectors: u64) -> IoFuture<'_, io::Result<()>> {
            self.record(format!("deallocate {offset_sectors} {len_sectors}"));
            ready(Ok(()))
        }
    }

    fn now<T>(mut future: IoFuture<'_, T>) -> T {
        match future.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(value) => value,
            Poll::Pending => panic!("the recording device answers at once"),
        }
    }

    /// Calls every method of the trait on `device` once, with distinct arguments, and returns
    /// what came back that a forwarding device must pass on unchanged.
    fn call_every_method(device: &dyn BlockDevice) -> (String, DeviceId, Geometry, RangeSet, bool) {
        let name = device.name().to_owned();
        let id = device.id();
        let geometry = device.geometry();
        let (buf, result) = now(device.read(8, ReadBuf::with_capacity(1024)));
        assert!(result.is_ok() && buf.len() == 1024);
        now(device.write(16, WriteBuf::zeroes(512))).unwrap();
        now(device.write_zeroes(24, 3)).unwrap();
        now(device.flush()).unwrap();
        let allocated = now(device.allocated(40, 5)).unwrap();
        let deallocates = device.deallocates();
        now(device.deallocate(48, 6)).unwrap();
        (name, id, geometry, allocated, deallocates)
    }

    #[test]
    fn every_method_of_the_trait_is_forwarded() {
        let direct = Arc::new(Recording::default());
        let expected = call_every_method(&*direct);
        let direct_calls = direct.calls.lock().unwrap().clone();
        let inner = Arc::new(Recording::default());
        let forward = Forward::new(inner.clone(), ());
        assert_eq!(call_every_method(&forward), expected, "the same answers through the adapter");
        assert_eq!(*inner.calls.lock().unwrap(), direct_calls, "every call reached the inner device, unchanged");
        // Every method of the trait, once each.
        assert_eq!(direct_calls.len(), 10);
    }

    /// Hooks that rename the device and answer allocation queries themselves.
    #[derive(Debug)]
    struct Renamed;

    impl Hooks for Renamed {
        fn name<'a>(&'a self, _inner: &'a dyn BlockDevice) -> &'a str {
            "renamed"
        }
        fn allocated<'a>(
            &'a self,
            _inner: &'a dyn BlockDevice,
            offset: u64,
            len: u64,
        ) -> IoFuture<'a, io::Result<RangeSet>> {
            crate::all_allocated(offset, len)
        }
    }

    #[test]
    fn a_hook_replaces_only_its_own_call() {
        let inner = Arc::new(Recording::default());
        let forward = Forward::new(inner.clone(), Renamed);
        let (name, _, _, allocated, deallocates) = call_every_method(&forward);
        assert_eq!((name.as_str(), allocated, deallocates), ("renamed", RangeSet::from_range(40..45), true));
        let calls = inner.calls.lock().unwrap().clone();
        assert!(!calls.iter().any(|c| c == "name" || c.starts_with("allocated")), "{calls:?}");
        assert_eq!(calls.len(), 8, "the other eight methods still reach the inner device: {calls:?}");
    }
}
