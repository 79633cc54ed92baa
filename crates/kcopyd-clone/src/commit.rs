//! Metadata commits: flush the destination, then write the bitmap to the other slot and
//! flush the metadata device. One at a time; a flush that arrives while a commit runs waits
//! for the next one (a commit that began before the flush cannot vouch for its writes).
//!
//! ```text
//!  snapshot the bitmap ──► destination.flush() ──► write slot (changed blocks, header)
//!  (regions hydrated so far:    (their data is         ──► metadata.flush() ──► slot current
//!   their copies completed)      durable first)
//! ```
//!
//! The order is the clone's crash guarantee: a bit is only ever durable after the data it
//! vouches for.

use std::io;
use std::sync::atomic::Ordering;

use crate::inner::Inner;
use crate::metadata::{self, Header};
use crate::status::Counters;

impl Inner {
    /// Makes every write completed before the call durable, with the bits of every region
    /// hydrated before it.
    pub(crate) async fn commit(&self) -> io::Result<()> {
        let arrival = self.commits_begun.load(Ordering::Acquire);
        let mut store = self.store.lock().await;
        if self.commits_done.load(Ordering::Acquire) > arrival {
            return Ok(()); // a commit that began after our arrival succeeded meanwhile
        }
        let index = self.commits_begun.fetch_add(1, Ordering::AcqRel) + 1;
        let slot = 1 - store.current_slot;
        let snapshot = {
            let mut regions = self.regions();
            if regions.version() == store.committed_version { None } else { regions.snapshot(slot) }
        };
        let flushed = self.destination.flush().await;
        let written = match (&flushed, &snapshot) {
            (Ok(()), Some(snapshot)) => {
                let header = Header {
                    seq: store.seq + 1,
                    slot: slot as u32,
                    hydrated_regions: snapshot.hydrated,
                    bitmap_crc: metadata::crc32c(&snapshot.bitmap),
                    ..store.template
                };
                metadata::write_commit(&self.metadata, &store.layout, &header, &snapshot.bitmap, &snapshot.blocks).await
            }
            (Ok(()), None) => Ok(()),
            (Err(_), _) => Err(io::Error::other("not written")),
        };
        if let Some(snapshot) = &snapshot {
            self.regions().committed(slot, snapshot, written.is_ok());
        }
        if let Err(error) = flushed.and(written) {
            Counters::add(&self.counters.commit_failures, 1);
            return Err(error);
        }
        if let Some(snapshot) = snapshot {
            store.current_slot = slot;
            store.seq += 1;
            self.commit_seq.store(store.seq, Ordering::Release);
            store.committed_version = snapshot.version;
            self.committed_version.store(snapshot.version, Ordering::Release);
            Counters::add(&self.counters.commits, 1);
        }
        self.commits_done.fetch_max(index, Ordering::AcqRel);
        drop(store);
        self.changed.notify_waiters();
        Ok(())
    }
}
