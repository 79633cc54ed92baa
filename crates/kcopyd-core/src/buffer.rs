//! Owned I/O buffers: [`ReadBuf`] (pages a device fills) and [`WriteBuf`] (shared, immutable
//! bytes a device writes out).
//!
//! A buffer is never borrowed across an await: a device takes it by value and a read hands
//! it back with its result, because with O_DIRECT the kernel may still be writing into it.
//!
//! ```text
//!  ReadBuf { pages, len, window }  ──device.read──►  filled  ──freeze()──►  WriteBuf
//!                                                                 │ one Bytes per run of pages, all
//!                                                                 │ owning one Arc<Pages>:
//!  target 0 write ◄── clone ──┬───────────────────────────────────┘ the pages go back to the
//!  target 1 write ◄── clone ──┘                                     pool when the last clone drops
//! ```

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;

use crate::PAGE_SIZE;
use crate::pool::{PagePool, Pages};

/// A writable buffer made of pool pages, filled by [`BlockDevice::read`](crate::BlockDevice::read).
///
/// Its `window` is the part a read fills; it starts as the whole buffer. The engine narrows
/// it to re-read pieces of a sub-job in place ([`read_narrowed`](crate::read_narrowed)).
pub struct ReadBuf {
    pages: Pages,
    len_bytes: usize,
    window: Range<usize>,
}

impl ReadBuf {
    /// A buffer of `len_bytes` over `pages`.
    ///
    /// # Panics
    /// If the pages cannot hold `len_bytes`.
    pub fn new(pages: Pages, len_bytes: usize) -> ReadBuf {
        assert!(len_bytes <= pages.len() * PAGE_SIZE, "{len_bytes} bytes in {} pages", pages.len());
        ReadBuf { pages, len_bytes, window: 0..len_bytes }
    }

    /// A buffer of `len_bytes` on pages of its own, page aligned like the engine's (so fit for
    /// O_DIRECT), outside any client's budget: for testing a device without a client.
    ///
    /// ```
    /// # use kcopyd_core::ReadBuf;
    /// let mut buf = ReadBuf::with_capacity(1536); // three sectors, one page
    /// assert_eq!(buf.len(), 1536);
    /// buf.fill(7);
    /// assert!(buf.to_vec().iter().all(|&b| b == 7));
    /// assert_eq!(ReadBuf::with_capacity(0).len(), 0);
    /// ```
    ///
    /// # Panics
    /// If the memory cannot be mapped, as `Vec::with_capacity` does when it cannot allocate.
    pub fn with_capacity(len_bytes: usize) -> ReadBuf {
        let pages = len_bytes.div_ceil(PAGE_SIZE).max(1);
        let pool = PagePool::with_huge_pages(pages, false)
            .unwrap_or_else(|error| panic!("mapping {pages} pages for a {len_bytes}-byte buffer: {error}"));
        let pages = pool.try_alloc(pages).expect("a fresh pool has every page free");
        ReadBuf::new(pages, len_bytes)
    }

    /// Bytes in the window, which is what a read fills.
    pub fn len(&self) -> usize {
        self.window.len()
    }

    /// Whether the window is empty.
    pub fn is_empty(&self) -> bool {
        self.window.is_empty()
    }

    /// The window, in bytes from the start of the buffer.
    pub fn window(&self) -> Range<usize> {
        self.window.clone()
    }

    /// Narrows the window to `window` (bytes from the start of the buffer).
    ///
    /// # Panics
    /// If `window` does not lie inside the buffer.
    pub fn set_window(&mut self, window: Range<usize>) {
        assert!(window.start <= window.end && window.end <= self.len_bytes, "window {window:?} of {}", self.len_bytes);
        self.window = window;
    }

    /// Widens the window back to the whole buffer.
    pub fn reset_window(&mut self) {
        self.window = 0..self.len_bytes;
    }

    /// The window as writable slices, in order (one per page touched). Devices fill these.
    pub fn segments_mut(&mut self) -> impl Iterator<Item = &mut [u8]> + '_ {
        self.pages.segments_mut(self.window.clone())
    }

    /// The window as read-only slices, in order.
    pub fn segments(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.pages.segments(self.window.clone())
    }

    /// Copies `data` into the window.
    ///
    /// # Panics
    /// If `data` is not exactly as long as the window.
    pub fn copy_from_slice(&mut self, data: &[u8]) {
        assert_eq!(data.len(), self.len(), "copy into a window of another length");
        let mut at = 0;
        for segment in self.segments_mut() {
            segment.copy_from_slice(&data[at..at + segment.len()]);
            at += segment.len();
        }
    }

    /// Fills the window with `byte`.
    pub fn fill(&mut self, byte: u8) {
        self.segments_mut().for_each(|segment| segment.fill(byte));
    }

    /// The window's bytes, copied out.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len());
        self.segments().for_each(|segment| out.extend_from_slice(segment));
        out
    }

    /// Freezes the whole buffer (not only the window) into shared, immutable bytes whose
    /// pages return to the pool when the last clone is dropped.
    pub fn freeze(self) -> WriteBuf {
        let len_bytes = self.len_bytes;
        let pages = Arc::new(self.pages);
        let segments = pages
            .runs(0..len_bytes)
            .into_iter()
            .map(|run| Bytes::from_owner(FrozenRun { pages: pages.clone(), run }))
            .collect();
        WriteBuf { segments, len: len_bytes }
    }
}

impl fmt::Debug for ReadBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadBuf").field("len_bytes", &self.len_bytes).field("window", &self.window).finish()
    }
}

/// One run of adjacent pages of a frozen [`ReadBuf`], the owner behind one [`Bytes`] segment.
struct FrozenRun {
    pages: Arc<Pages>,
    /// Arena bytes of the run.
    run: Range<usize>,
}

impl AsRef<[u8]> for FrozenRun {
    fn as_ref(&self) -> &[u8] {
        self.pages.run_slice(self.run.clone())
    }
}

/// Bytes of zeroes, page aligned so that O_DIRECT can write them as they are.
#[repr(C, align(4096))]
struct ZeroBlock([u8; ZERO_BLOCK_BYTES]);
const ZERO_BLOCK_BYTES: usize = 64 * 1024;
static ZEROES: ZeroBlock = ZeroBlock([0; ZERO_BLOCK_BYTES]);

/// Immutable bytes to write, as a list of segments; cloning shares them.
#[derive(Clone, Default)]
pub struct WriteBuf {
    segments: Vec<Bytes>,
    len: usize,
}

impl WriteBuf {
    /// A buffer over the given segments, written one after the other.
    pub fn from_segments(segments: Vec<Bytes>) -> WriteBuf {
        let segments: Vec<Bytes> = segments.into_iter().filter(|s| !s.is_empty()).collect();
        let len = segments.iter().map(Bytes::len).sum();
        WriteBuf { segments, len }
    }

    /// A buffer over one run of bytes.
    pub fn from_bytes(bytes: Bytes) -> WriteBuf {
        WriteBuf::from_segments(vec![bytes])
    }

    /// `len_bytes` of zeroes from one shared, page-aligned zero block: no allocation.
    pub fn zeroes(len_bytes: usize) -> WriteBuf {
        let block = Bytes::from_static(&ZEROES.0);
        let segments = (0..len_bytes.div_ceil(ZERO_BLOCK_BYTES))
            .map(|i| block.slice(..(len_bytes - i * ZERO_BLOCK_BYTES).min(ZERO_BLOCK_BYTES)))
            .collect();
        WriteBuf { segments, len: len_bytes }
    }

    /// Bytes to write.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The segments, in order; none is empty.
    pub fn segments(&self) -> &[Bytes] {
        &self.segments
    }

    /// The bytes `range` of this buffer, sharing the same memory.
    ///
    /// # Panics
    /// If `range` does not lie inside the buffer.
    pub fn slice(&self, range: Range<usize>) -> WriteBuf {
        assert!(range.start <= range.end && range.end <= self.len, "slice {range:?} of {}", self.len);
        let mut segments = Vec::new();
        let mut at = 0;
        for segment in &self.segments {
            let (start, end) = (at, at + segment.len());
            at = end;
            if end <= range.start || start >= range.end {
                continue;
            }
            let lo = range.start.max(start) - start;
            let hi = range.end.min(end) - start;
            segments.push(segment.slice(lo..hi));
        }
        WriteBuf { segments, len: range.len() }
    }

    /// Copies the bytes into `out`.
    ///
    /// # Panics
    /// If `out` is not exactly as long as the buffer.
    pub fn copy_to_slice(&self, out: &mut [u8]) {
        assert_eq!(out.len(), self.len, "copy out of a buffer of another length");
        let mut at = 0;
        for segment in &self.segments {
            out[at..at + segment.len()].copy_from_slice(segment);
            at += segment.len();
        }
    }

    /// The bytes, copied out.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = vec![0; self.len];
        self.copy_to_slice(&mut out);
        out
    }
}

impl fmt::Debug for WriteBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriteBuf").field("len", &self.len).field("segments", &self.segments.len()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_reads_land_in_place_and_freeze_shares_pages_until_last_drop() {
        let pool = PagePool::new(3).unwrap();
        let mut buf = ReadBuf::new(pool.try_alloc(3).unwrap(), 2 * PAGE_SIZE + 512);
        buf.fill(1);
        // A window straddling the first page boundary: 3584..4608.
        buf.set_window(3584..4608);
        // A fresh pool hands out adjacent pages, so the window is one run.
        assert_eq!(buf.segments().map(<[u8]>::len).collect::<Vec<_>>(), vec![1024]);
        buf.copy_from_slice(&[9; 1024]);
        buf.reset_window();
        let bytes = buf.to_vec();
        assert!(bytes[..3584].iter().all(|&b| b == 1));
        assert!(bytes[3584..4608].iter().all(|&b| b == 9));
        assert!(bytes[4608..].iter().all(|&b| b == 1));

        let frozen = buf.freeze();
        assert_eq!(frozen.len(), 2 * PAGE_SIZE + 512);
        assert_eq!(frozen.to_vec(), bytes);
        let piece = frozen.slice(3000..5000);
        assert_eq!(piece.to_vec(), bytes[3000..5000]);
        drop(frozen);
        assert_eq!(pool.stats().pages_in_use, 3, "a slice still holds the pages");
        drop(piece);
        assert_eq!(pool.stats().pages_in_use, 0);
    }

    #[test]
    fn zero_buffers_are_aligned_and_exact() {
        for len in [0, 512, ZERO_BLOCK_BYTES, ZERO_BLOCK_BYTES + 4096, 512 * 1024] {
            let zeroes = WriteBuf::zeroes(len);
            assert_eq!(zeroes.len(), len);
            assert_eq!(zeroes.segments().iter().map(Bytes::len).sum::<usize>(), len);
            for segment in zeroes.segments() {
                assert_eq!(segment.as_ptr() as usize % PAGE_SIZE, 0);
                assert!(segment.iter().all(|&b| b == 0));
            }
        }
    }
}
