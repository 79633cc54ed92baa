//! The page allocator: a fixed arena of 4 KiB pages reserved up front.
//!
//! ```text
//!  arena (one anonymous mapping, page aligned → O_DIRECT safe)
//!  ┌────┬────┬────┬────┬────┬────┐
//!  │ p0 │ p1 │ p2 │ p3 │ p4 │ p5 │   free list: [5, 2, 4]   permits (FIFO semaphore): 3
//!  └────┴────┴────┴────┴────┴────┘
//!  alloc(n): wait for n permits in FIFO order, then pop n indices (all at once or nothing)
//!  drop(Pages): push the indices back first, then release the permits
//! ```
//!
//! A request for `n` pages never takes part of them and waits for the rest, so any budget of
//! at least one page makes progress as long as every holder eventually drops its pages.
//!
//! **Huge pages.** By default the arena starts on a 2 MiB boundary and is advised for
//! transparent huge pages. Adjacent pages in the arena are then adjacent in physical memory
//! too, so a 1 MiB read is one scatter-gather segment instead of 256: fewer DMA descriptors
//! on real hardware, and on a virtual disk one host request instead of one per 4 KiB page
//! (measured in docs/BENCHMARKS.md: reads 1.7× and writes 1.5× faster on a virtio disk).
//! The advice is a hint; where the kernel declines it, the pool works the same with small pages.

use std::fmt;
use std::io;
use std::ops::Range;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

#[cfg(target_os = "linux")]
use memmap2::Advice;
use memmap2::MmapMut;
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::PAGE_SIZE;

/// The size and alignment of a transparent huge page on x86-64 and on 4K-page arm64.
pub const HUGE_PAGE_SIZE: usize = 2 * 1024 * 1024;

/// A fixed pool of page-aligned 4 KiB pages. Cloning shares the same pool.
#[derive(Clone)]
pub struct PagePool {
    inner: Arc<PoolInner>,
}

pub(crate) struct PoolInner {
    /// Start of the arena; valid for `pages_total * PAGE_SIZE` bytes while `_arena` lives.
    base: NonNull<u8>,
    _arena: MmapMut,
    pages_total: usize,
    huge_pages: bool,
    free: Mutex<Vec<u32>>,
    permits: Semaphore,
    in_use: AtomicUsize,
    high_water: AtomicUsize,
}

// SAFETY: `base` points into `_arena`, which lives as long as `PoolInner`. Each page is reached
// only through a `Pages` value that took the page's index from the free list (under the mutex),
// so no two owners ever touch the same page; shared read-only access happens only after a
// `Pages` is frozen behind an `Arc`, with no mutable access left.
unsafe impl Send for PoolInner {}
// SAFETY: see `Send`: all shared state is behind a mutex, atomics or the semaphore.
unsafe impl Sync for PoolInner {}

/// Occupancy of a [`PagePool`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct PoolStats {
    /// Pages in the pool.
    pub pages_total: usize,
    /// Pages handed out now.
    pub pages_in_use: usize,
    /// Most pages ever handed out at once.
    pub pages_in_use_max: usize,
}

impl PagePool {
    /// Reserves an arena of `pages` pages, backed by transparent huge pages where the kernel
    /// grants them (see the module notes).
    ///
    /// # Errors
    /// `pages` is zero, too large for the allocator, or the mapping cannot be made.
    pub fn new(pages: usize) -> io::Result<PagePool> {
        PagePool::with_huge_pages(pages, true)
    }

    /// Reserves an arena of `pages` pages; `huge_pages` chooses whether the arena is aligned to
    /// 2 MiB and advised for transparent huge pages, or left to 4 KiB pages.
    ///
    /// # Errors
    /// As for [`PagePool::new`].
    pub fn with_huge_pages(pages: usize, huge_pages: bool) -> io::Result<PagePool> {
        if pages == 0 || pages > u32::MAX as usize || pages > Semaphore::MAX_PERMITS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("page pool of {pages} pages: must be between 1 and {}", u32::MAX),
            ));
        }
        let too_large = || io::Error::new(io::ErrorKind::InvalidInput, "page pool size overflows");
        let len_bytes = pages.checked_mul(PAGE_SIZE).ok_or_else(too_large)?;
        // A huge-page arena is rounded up to whole huge pages and reserves one more, so that
        // it can start on a 2 MiB boundary; the slack before it is never touched and costs no
        // memory, the slack after it at most the rest of the last huge page.
        let huge_pages = huge_pages && cfg!(target_os = "linux") && len_bytes >= HUGE_PAGE_SIZE;
        let huge_len = len_bytes.checked_next_multiple_of(HUGE_PAGE_SIZE).ok_or_else(too_large)?;
        let map_len = if huge_pages { huge_len.checked_add(HUGE_PAGE_SIZE).ok_or_else(too_large)? } else { len_bytes };
        let mut arena = MmapMut::map_anon(map_len)?;
        let start = arena.as_ptr() as usize;
        let offset = if huge_pages { start.next_multiple_of(HUGE_PAGE_SIZE) - start } else { 0 };
        #[cfg(target_os = "linux")]
        if huge_pages {
            // A hint: a kernel without transparent huge pages refuses it, and the arena works
            // the same with small pages.
            let _ = arena.advise_range(Advice::HugePage, offset, huge_len);
        }
        let base = NonNull::new(arena[offset..].as_mut_ptr()).expect("mmap never returns null");
        assert_eq!(base.as_ptr() as usize % PAGE_SIZE, 0, "mmap returns page-aligned memory");
        // A stack popped from its end: lowest index on top, so that pages go out in ascending,
        // adjacent runs and devices can copy them in long pieces.
        let free: Vec<u32> = (0..pages as u32).rev().collect();
        Ok(PagePool {
            inner: Arc::new(PoolInner {
                base,
                _arena: arena,
                pages_total: pages,
                huge_pages,
                free: Mutex::new(free),
                permits: Semaphore::new(pages),
                in_use: AtomicUsize::new(0),
                high_water: AtomicUsize::new(0),
            }),
        })
    }

    /// Pages in the pool.
    pub fn pages_total(&self) -> usize {
        self.inner.pages_total
    }

    /// Whether the arena starts on a huge-page boundary and was advised for huge pages (the
    /// kernel may still back it with small pages).
    pub fn huge_pages(&self) -> bool {
        self.inner.huge_pages
    }

    /// Occupancy now, and the high-water mark.
    pub fn stats(&self) -> PoolStats {
        PoolStats {
            pages_total: self.inner.pages_total,
            pages_in_use: self.inner.in_use.load(Ordering::Acquire),
            pages_in_use_max: self.inner.high_water.load(Ordering::Acquire),
        }
    }

    /// Takes `count` pages at once, waiting in FIFO order behind earlier requests.
    ///
    /// # Panics
    /// If `count` is zero or larger than the pool: such a request could never be served.
    pub async fn alloc(&self, count: usize) -> Pages {
        assert!(count >= 1 && count <= self.inner.pages_total, "alloc({count}) from {}", self.inner.pages_total);
        let permit = self.inner.permits.acquire_many(count as u32).await.expect("the page semaphore is never closed");
        permit.forget();
        self.take(count)
    }

    /// Takes `count` pages if they are free now and nobody is queued before us.
    pub fn try_alloc(&self, count: usize) -> Option<Pages> {
        if count == 0 || count > self.inner.pages_total {
            return None;
        }
        let permit = self.inner.permits.try_acquire_many(count as u32).ok()?;
        permit.forget();
        Some(self.take(count))
    }

    /// Moves `count` indices off the free list; the caller holds `count` permits.
    fn take(&self, count: usize) -> Pages {
        let indices = {
            let mut free = self.inner.free.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            assert!(free.len() >= count, "permits and free list agree");
            let at = free.len() - count;
            let mut taken = free.split_off(at);
            taken.reverse();
            taken
        };
        let in_use = self.inner.in_use.fetch_add(count, Ordering::AcqRel) + count;
        assert!(in_use <= self.inner.pages_total);
        self.inner.high_water.fetch_max(in_use, Ordering::AcqRel);
        Pages { pool: self.inner.clone(), indices }
    }
}

impl fmt::Debug for PagePool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PagePool").field("stats", &self.stats()).finish()
    }
}

/// Pages taken from a [`PagePool`]; they go back to the pool when this value is dropped.
pub struct Pages {
    pool: Arc<PoolInner>,
    indices: Vec<u32>,
}

impl Pages {
    /// Number of pages held.
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    /// Whether no page is held.
    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }

    /// Gives back all but the first `count` pages now.
    pub fn truncate(&mut self, count: usize) {
        if count < self.indices.len() {
            let rest = self.indices.split_off(count);
            drop(Pages { pool: self.pool.clone(), indices: rest });
        }
    }

    /// Page `i` of this set, as a byte range of the arena.
    fn arena_range(&self, i: usize) -> Range<usize> {
        let index = self.indices[i] as usize;
        assert!(index < self.pool.pages_total);
        index * PAGE_SIZE..(index + 1) * PAGE_SIZE
    }

    /// Arena bytes `range`, read-only.
    ///
    /// The caller passes a range made of pages this set owns (from `arena_range` or `runs`).
    fn arena_slice(&self, range: Range<usize>) -> &[u8] {
        assert!(range.end <= self.pool.pages_total * PAGE_SIZE);
        // SAFETY: the range lies inside the live arena and covers pages this `Pages` owns
        // exclusively; `&self` forbids mutation for the lifetime of the slice.
        unsafe { std::slice::from_raw_parts(self.pool.base.as_ptr().add(range.start), range.len()) }
    }

    /// Page `i`, read-only.
    pub fn page(&self, i: usize) -> &[u8] {
        self.arena_slice(self.arena_range(i))
    }

    /// Page `i`, writable.
    pub fn page_mut(&mut self, i: usize) -> &mut [u8] {
        let range = self.arena_range(i);
        // SAFETY: the page lies inside the live arena, this `Pages` owns it exclusively, and
        // `&mut self` makes this the only reference to it.
        unsafe { std::slice::from_raw_parts_mut(self.pool.base.as_ptr().add(range.start), PAGE_SIZE) }
    }

    /// The bytes `window` of these pages (taken as one run, page after page), as arena byte
    /// ranges; pages that sit next to each other in the arena merge into one range, so that
    /// devices copy in long runs.
    ///
    /// Worked example: pages [7, 8, 3], window 3584..8704 → arena 7·4096+3584 .. 9·4096
    /// (the end of page 7 and all of page 8, adjacent), then 3·4096 .. 3·4096+512.
    pub(crate) fn runs(&self, window: Range<usize>) -> Vec<Range<usize>> {
        assert!(window.start <= window.end && window.end <= self.indices.len() * PAGE_SIZE);
        let mut runs: Vec<Range<usize>> = Vec::new();
        let first = window.start / PAGE_SIZE;
        let last = window.end.div_ceil(PAGE_SIZE);
        for i in first..last {
            let page_start = i * PAGE_SIZE;
            let lo = window.start.max(page_start) - page_start;
            let hi = window.end.min(page_start + PAGE_SIZE) - page_start;
            let arena = self.arena_range(i);
            let piece = arena.start + lo..arena.start + hi;
            match runs.last_mut() {
                Some(run) if run.end == piece.start => run.end = piece.end,
                _ => runs.push(piece),
            }
        }
        runs
    }

    /// The bytes `window` of these pages as writable slices, in order, all alive at once.
    pub(crate) fn segments_mut(&mut self, window: Range<usize>) -> impl Iterator<Item = &mut [u8]> + '_ {
        let base = self.pool.base.as_ptr();
        self.runs(window).into_iter().map(move |run| {
            // SAFETY: each run covers pages this `Pages` owns exclusively (its indices are
            // distinct, each taken off the free list once), so the runs never overlap and stay
            // inside the arena; they borrow `self` mutably, so nothing else touches the pages.
            unsafe { std::slice::from_raw_parts_mut(base.add(run.start), run.len()) }
        })
    }

    /// The bytes `window` of these pages, read-only, in order.
    pub(crate) fn segments(&self, window: Range<usize>) -> impl Iterator<Item = &[u8]> + '_ {
        self.runs(window).into_iter().map(|run| self.arena_slice(run))
    }

    /// Arena bytes `run`, for a frozen set (see [`ReadBuf::freeze`](crate::ReadBuf::freeze)).
    pub(crate) fn run_slice(&self, run: Range<usize>) -> &[u8] {
        self.arena_slice(run)
    }
}

impl Drop for Pages {
    fn drop(&mut self) {
        let count = self.indices.len();
        if count == 0 {
            return;
        }
        // Indices first, permits second: whoever gets the permits finds the indices there.
        // Pushed in reverse so that the next taker pops them in ascending order again.
        // The list is never left half-changed, so a poisoned lock (a panic elsewhere while it
        // was held) is still safe to use; failing here would abort during unwinding.
        self.pool.free.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend(self.indices.drain(..).rev());
        let before = self.pool.in_use.fetch_sub(count, Ordering::AcqRel);
        assert!(before >= count, "pages returned twice");
        self.pool.permits.add_permits(count);
    }
}

impl fmt::Debug for Pages {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pages").field("indices", &self.indices).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_aligned_distinct_and_return() {
        let pool = PagePool::new(8).unwrap();
        let mut a = pool.try_alloc(3).unwrap();
        let mut b = pool.try_alloc(5).unwrap();
        assert!(pool.try_alloc(1).is_none());
        assert_eq!(pool.stats().pages_in_use, 8);
        for i in 0..3 {
            let page = a.page_mut(i);
            assert_eq!(page.as_ptr() as usize % PAGE_SIZE, 0);
            page.fill(i as u8 + 1);
        }
        for page in b.segments_mut(0..5 * PAGE_SIZE) {
            page.fill(0xee);
        }
        for i in 0..3 {
            assert!(a.page(i).iter().all(|&x| x == i as u8 + 1), "page {i} was overwritten");
        }
        drop(a);
        assert_eq!(pool.stats().pages_in_use, 5);
        let ranges: Vec<Range<usize>> = (0..5).map(|i| b.arena_range(i)).collect();
        assert!(ranges.windows(2).all(|w| w[0].end == w[1].start), "a fresh pool hands out adjacent pages");
        assert_eq!(b.runs(100..3 * PAGE_SIZE).len(), 1);
        b.truncate(2);
        assert_eq!(pool.stats().pages_in_use, 2);
        drop(b);
        let stats = pool.stats();
        assert_eq!((stats.pages_in_use, stats.pages_in_use_max), (0, 8));
    }

    #[cfg(target_os = "linux")]
    /// The `THPeligible` flag and the kilobytes of `AnonHugePages` that /proc/self/smaps reports
    /// for the mapping holding `addr`.
    fn smaps_huge(addr: usize) -> Option<(bool, u64)> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let (mut inside, mut kib, mut eligible) = (false, None, None);
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ')
                && let Some((lo, hi)) = range.split_once('-')
                && let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
            {
                inside = (lo..hi).contains(&addr);
            } else if inside && let Some(value) = line.strip_prefix("AnonHugePages:") {
                kib = value.trim().trim_end_matches("kB").trim().parse().ok();
            } else if inside && let Some(value) = line.strip_prefix("THPeligible:") {
                eligible = Some(value.trim() == "1");
            }
        }
        Some((eligible?, kib?))
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_arena_starts_on_a_huge_page_and_is_backed_by_huge_pages_where_the_kernel_allows() {
        let pool = PagePool::new(1024).unwrap();
        assert!(pool.huge_pages());
        let mut pages = pool.try_alloc(1024).unwrap();
        let first = pages.page_mut(0).as_ptr() as usize;
        assert_eq!(first % HUGE_PAGE_SIZE, 0, "the arena starts on a huge-page boundary");
        for page in pages.segments_mut(0..1024 * PAGE_SIZE) {
            page.fill(0x5a);
        }
        let small = PagePool::with_huge_pages(1024, false).unwrap();
        assert!(!small.huge_pages());
        assert!(!PagePool::new(511).unwrap().huge_pages(), "an arena under 2 MiB stays on small pages");

        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
        if !(thp.contains("[always]") || thp.contains("[madvise]")) {
            eprintln!("SKIP huge-page backing: transparent huge pages are off here ({:?})", thp.trim());
            return;
        }
        let (eligible, huge) = smaps_huge(first).expect("the arena appears in /proc/self/smaps");
        if !eligible {
            eprintln!("SKIP huge-page backing: this process may not use transparent huge pages (THPeligible 0)");
            return;
        }
        assert!(huge >= 2048, "the 4 MiB arena holds {huge} KiB of huge pages");
    }

    #[test]
    fn zero_and_oversized_requests_are_refused() {
        assert!(PagePool::new(0).is_err());
        let pool = PagePool::new(2).unwrap();
        assert!(pool.try_alloc(0).is_none());
        assert!(pool.try_alloc(3).is_none());
    }

    #[test]
    fn waiters_are_served_in_fifo_order_without_head_of_line_deadlock() {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            let pool = PagePool::new(4).unwrap();
            let held = pool.try_alloc(3).unwrap();
            let order = Arc::new(Mutex::new(Vec::new()));
            let local = tokio::task::LocalSet::new();
            local
                .run_until(async {
                    let mut tasks = Vec::new();
                    for (name, count) in [("big", 4usize), ("small", 1)] {
                        let (pool, order) = (pool.clone(), order.clone());
                        tasks.push(tokio::task::spawn_local(async move {
                            let pages = pool.alloc(count).await;
                            order.lock().unwrap().push(name);
                            drop(pages);
                        }));
                        tokio::task::yield_now().await;
                    }
                    // One page is free, but "small" queued behind "big" must wait for it.
                    tokio::task::yield_now().await;
                    assert!(order.lock().unwrap().is_empty());
                    drop(held);
                    for task in tasks {
                        task.await.unwrap();
                    }
                })
                .await;
            assert_eq!(*order.lock().unwrap(), vec!["big", "small"]);
            assert_eq!(pool.stats().pages_in_use, 0);
        });
    }
}
