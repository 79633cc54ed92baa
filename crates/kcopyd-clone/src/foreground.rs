//! Foreground I/O: reads split between destination and source, writes and discards that wait
//! for their regions' copies (or claim whole regions), and flushes that commit.
//!
//! ```text
//!  read ──► plan (Regions::read_plan): hydrated runs ─► destination, others ─► source (+ hint)
//!  write/zeroes/deallocate ──► claim (Regions::claim_for_write)
//!        busy region? wait ─┘  partial unhydrated: copy it now, wait   whole: claim, no copy
//!        ──► destination write ──► claimed regions hydrated (or freed on error)
//!  flush ──► commit (commit.rs)
//!  allocated ──► hydrated runs: the destination's answer; others: source's ∪ destination's
//! ```
//!
//! Every request counts as foreground I/O while it runs, which pauses the background.

use std::io;
use std::ops::Range;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use kcopyd_core::{RangeSet, ReadBuf, SECTOR_SIZE, WriteBuf};

use crate::error::{HydrationError, RequestError};
use crate::inner::Inner;
use crate::regions::Claim;
use crate::status::Counters;

/// What a foreground write puts on the destination.
#[derive(Debug)]
pub(crate) enum Modify {
    Data(WriteBuf),
    Zeroes,
    Deallocate,
}

/// Counts a foreground request for as long as it lives.
struct Foreground<'a>(&'a Inner);

impl<'a> Foreground<'a> {
    fn new(inner: &'a Inner) -> Foreground<'a> {
        inner.foreground.fetch_add(1, Ordering::AcqRel);
        Foreground(inner)
    }
}

impl Drop for Foreground<'_> {
    fn drop(&mut self) {
        if self.0.foreground.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.changed.notify_waiters();
        }
    }
}

/// Regions a write covers whole and hydrates itself; freed (not hydrated) if the write is
/// dropped or fails.
struct Overwrite<'a> {
    inner: &'a Inner,
    regions: Vec<u64>,
    written: bool,
}

impl Drop for Overwrite<'_> {
    fn drop(&mut self) {
        if !self.regions.is_empty() {
            self.inner.regions().finish_overwrite(&self.regions, self.written);
            self.inner.changed.notify_waiters();
        }
    }
}

impl Inner {
    /// Refuses a request that is misaligned or leaves the device, by the rules every device
    /// shares ([`Geometry::check_request`](kcopyd_core::Geometry::check_request)); returns its
    /// sectors.
    fn check(&self, operation: &'static str, offset_sectors: u64, len_bytes: u128) -> io::Result<Range<u64>> {
        self.geometry.check_request(offset_sectors, len_bytes).map_err(|refused| {
            let error = RequestError::Geometry { device: self.name.clone(), operation, refused };
            io::Error::new(refused.io_kind(), error)
        })
    }

    /// A read: hydrated runs from the destination, the others from the source.
    pub(crate) async fn read(self: Arc<Self>, offset_sectors: u64, mut buf: ReadBuf) -> (ReadBuf, io::Result<()>) {
        let _foreground = Foreground::new(&self);
        Counters::add(&self.counters.reads, 1);
        let len_sectors = match self.check("read", offset_sectors, buf.len() as u128) {
            Ok(sectors) => sectors.end - sectors.start,
            Err(error) => return (buf, Err(error)),
        };
        if len_sectors == 0 {
            return (buf, Ok(()));
        }
        let (runs, hints) = {
            let mut regions = self.regions();
            if regions.released() {
                (vec![(offset_sectors..offset_sectors + len_sectors, true)], 0)
            } else {
                let hints_before = regions.hints_queued();
                let runs = regions.read_plan(offset_sectors..offset_sectors + len_sectors);
                let hints = regions.hints_queued() - hints_before;
                (runs, hints)
            }
        };
        if hints > 0 {
            Counters::add(&self.counters.hints, hints);
            self.changed.notify_waiters();
        }
        let window = buf.window();
        for (run, hydrated) in runs {
            let counter =
                if hydrated { &self.counters.read_destination_sectors } else { &self.counters.read_source_sectors };
            Counters::add(counter, run.end - run.start);
            let device = if hydrated { &self.destination } else { &self.source };
            let from = window.start + (run.start - offset_sectors) as usize * SECTOR_SIZE;
            buf.set_window(from..from + (run.end - run.start) as usize * SECTOR_SIZE);
            let (back, result) = device.read(run.start, buf).await;
            buf = back;
            if result.is_err() {
                buf.set_window(window);
                return (buf, result);
            }
        }
        buf.set_window(window);
        (buf, Ok(()))
    }

    /// A write, write-zeroes or deallocate of `len_sectors` at `offset_sectors`.
    pub(crate) async fn modify(self: Arc<Self>, offset_sectors: u64, len_bytes: u128, what: Modify) -> io::Result<()> {
        let _foreground = Foreground::new(&self);
        Counters::add(&self.counters.writes, 1);
        let operation = match what {
            Modify::Data(_) => "write",
            Modify::Zeroes => "write-zeroes",
            Modify::Deallocate => "deallocate",
        };
        let sectors = self.check(operation, offset_sectors, len_bytes)?;
        let len_sectors = sectors.end - sectors.start;
        if len_sectors == 0 {
            return Ok(());
        }
        let mut overwrite = self.prepare(&sectors).await?;
        let destination = &self.destination;
        let result = match what {
            Modify::Data(buf) => destination.write(offset_sectors, buf).await,
            Modify::Zeroes => destination.write_zeroes(offset_sectors, len_sectors).await,
            Modify::Deallocate => destination.deallocate(offset_sectors, len_sectors).await,
        };
        overwrite.written = result.is_ok();
        if overwrite.written {
            Counters::add(&self.counters.regions_overwritten, overwrite.regions.len() as u64);
        }
        result
    }

    /// Waits until every region `sectors` touches is hydrated or claimed by this write: copies
    /// the regions it covers in part, claims those it covers whole.
    async fn prepare(self: &Arc<Self>, sectors: &Range<u64>) -> io::Result<Overwrite<'_>> {
        loop {
            let mut notified = pin!(self.changed.notified());
            notified.as_mut().enable();
            let claim = {
                let mut regions = self.regions();
                if regions.released() {
                    return Ok(Overwrite { inner: self, regions: Vec::new(), written: false });
                }
                regions.claim_for_write(sectors)
            };
            match claim {
                Claim::Wait => notified.await,
                Claim::GivenUp(region) => {
                    let sectors = self.regions().sectors(region);
                    return Err(HydrationError::GivenUp { device: self.name.clone(), region, sectors }.into_io());
                }
                Claim::Ready { overwrite, copy } => {
                    let claimed = Overwrite { inner: self, regions: overwrite, written: false };
                    if !copy.is_empty() {
                        Counters::add(&self.counters.writes_waited, 1);
                        self.copy_for_write(&copy).await?;
                    }
                    return Ok(claimed);
                }
            }
        }
    }

    /// Copies `regions` (claimed for a foreground copy) and waits for them.
    async fn copy_for_write(self: &Arc<Self>, regions: &[u64]) -> io::Result<()> {
        for &region in regions {
            self.start_copy(region..region + 1, false).await;
        }
        loop {
            let mut notified = pin!(self.changed.notified());
            notified.as_mut().enable();
            let pending = {
                let state = self.regions();
                if regions.iter().any(|&r| state.is_busy(r)) {
                    None
                } else {
                    Some(regions.iter().copied().find(|&r| !state.is_hydrated(r)))
                }
            };
            match pending {
                None => notified.await,
                Some(None) => return Ok(()),
                Some(Some(region)) => {
                    let sectors = self.regions().sectors(region);
                    return Err(HydrationError::CopyFailed { device: self.name.clone(), region, sectors }.into_io());
                }
            }
        }
    }

    /// The sectors that hold data: of hydrated regions, what the destination says; of the
    /// others, what the source or the destination says (a region may hydrate, or be written,
    /// while the two are asked: the union over-reports, never under-reports).
    pub(crate) async fn allocated(self: Arc<Self>, offset_sectors: u64, len_sectors: u64) -> io::Result<RangeSet> {
        self.check("allocation query", offset_sectors, kcopyd_core::sectors_to_bytes(len_sectors))?;
        let sectors = offset_sectors..offset_sectors + len_sectors;
        if len_sectors == 0 {
            return Ok(RangeSet::new());
        }
        let runs = {
            let regions = self.regions();
            if regions.released() { vec![(sectors, true)] } else { regions.sides(sectors) }
        };
        let mut data = RangeSet::new();
        for (run, hydrated) in runs {
            let len = run.end - run.start;
            if !hydrated {
                data.extend(&self.source.allocated(run.start, len).await?);
            }
            data.extend(&self.destination.allocated(run.start, len).await?);
        }
        Ok(data)
    }

    /// A flush: every write completed before it becomes durable, with the metadata.
    pub(crate) async fn flush(self: Arc<Self>) -> io::Result<()> {
        let _foreground = Foreground::new(&self);
        Counters::add(&self.counters.flushes, 1);
        self.commit().await
    }
}
