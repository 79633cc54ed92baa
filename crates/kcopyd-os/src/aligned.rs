//! The buffer rules both engines share: what direct I/O asks of user memory
//! ([`MemoryRules`]), the aligned bounce buffer that memory breaking them goes through
//! ([`Bounce`], [`AlignedBuf`]), and what a transfer that ends early means
//! ([`ended_early`]).
//!
//! ```text
//!  request (offset, buf) ── rules.accept_all(segments)? ── yes ─► iovecs straight into buf
//!                                                        └ no ──► Bounce: pieces of ≤ 1 MiB
//!      write: copy piece buf[a..b] → bounce, transfer it      (each piece a multiple of the
//!      read:  transfer into bounce, copy bounce → buf[a..b]    logical block, so aligned)
//! ```
//!
//! The engines differ only in how they move bytes (blocking `preadv` on a thread, READV on a
//! ring); which memory goes to the kernel, in which pieces, is decided here once.

use std::io;
use std::ops::Range;

use kcopyd_core::WriteBuf;

/// Largest logical block size or direct-I/O alignment accepted, in bytes.
pub const ALIGNMENT_BYTES_MAX: u64 = 65536;
/// Most iovecs one `preadv`/`pwritev` call or READV/WRITEV submission takes (the kernel's
/// UIO_MAXIOV); longer lists are sent in several calls.
pub const IOVECS_PER_CALL_MAX: usize = 1024;
/// Largest bounce buffer one request allocates; a longer misaligned request goes through it
/// in pieces. A multiple of every supported block size (up to 65536).
pub const BOUNCE_BYTES_MAX: usize = 1024 * 1024;

const _: () = assert!(BOUNCE_BYTES_MAX % ALIGNMENT_BYTES_MAX as usize == 0);

/// A zero-filled buffer of `len` bytes starting at an address that is a multiple of `align`,
/// made without `unsafe`: over-allocate by the alignment and start at the first aligned byte.
///
/// Worked example: `align` 4096, `len` 8192, the allocation lands at 0x5000_0010 → 12288 bytes
/// are allocated and the buffer starts 4080 bytes in, at 0x5000_1000.
pub(crate) struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// # Panics
    /// If `align` is not a power of two.
    pub(crate) fn new(len: usize, align: usize) -> AlignedBuf {
        assert!(align.is_power_of_two(), "alignment {align}");
        let storage = vec![0u8; len + align];
        let address = storage.as_ptr() as usize;
        // Bytes from `address` up to the next multiple of `align` (0 when already aligned).
        let start = address.wrapping_neg() & (align - 1);
        debug_assert_eq!((address + start) % align, 0);
        AlignedBuf { storage, start, len }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

/// What direct I/O requires of user memory, in bytes: every segment must start at a multiple
/// of `memory_bytes` and be a multiple of `length_bytes` long. `length_bytes` is the device's
/// logical block, so requests the device accepted are multiples of it too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MemoryRules {
    pub(crate) memory_bytes: usize,
    pub(crate) length_bytes: usize,
}

impl MemoryRules {
    /// Whether one segment may go to the kernel as it is.
    pub(crate) fn accepts(&self, segment: &[u8]) -> bool {
        segment.as_ptr() as usize % self.memory_bytes == 0 && segment.len() % self.length_bytes == 0
    }

    /// Asserts what the engines rely on and the device checked before queueing: the request
    /// starts and ends on a logical block, so that every bounce piece (a multiple of
    /// [`BOUNCE_BYTES_MAX`], itself a multiple of every block) stays aligned on the device.
    pub(crate) fn assert_request(&self, offset_bytes: u64, len_bytes: usize) {
        assert!(self.memory_bytes.is_power_of_two() && self.length_bytes.is_power_of_two(), "{self:?}");
        assert_eq!(offset_bytes % self.length_bytes as u64, 0, "request at byte {offset_bytes} breaks {self:?}");
        assert_eq!(len_bytes % self.length_bytes, 0, "request of {len_bytes} bytes breaks {self:?}");
    }
}

/// The rules a request must be bounced for: `Some` when the device does direct I/O and a
/// segment breaks its rules, `None` when the segments can go to the kernel as they are
/// (always, when buffered).
pub(crate) fn bounce_rules<'a>(
    rules: Option<MemoryRules>,
    mut segments: impl Iterator<Item = &'a [u8]>,
) -> Option<MemoryRules> {
    rules.filter(|rules| !segments.all(|segment| rules.accepts(segment)))
}

/// How a transfer went through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transfer {
    /// Straight from or into the caller's buffer.
    Direct,
    /// Through an aligned bounce buffer, because a segment broke the memory rules.
    Bounced,
}

/// The aligned memory a misaligned request goes through, [`BOUNCE_BYTES_MAX`] at a time.
///
/// Worked example: 2.5 MiB → pieces 0..1 MiB, 1..2 MiB, 2..2.5 MiB, all through one 1 MiB
/// buffer; a 12 KiB request allocates only 12 KiB.
pub(crate) struct Bounce {
    memory: AlignedBuf,
    len_bytes: usize,
    rules: MemoryRules,
}

impl Bounce {
    /// A bounce buffer for a request of `len_bytes` under `rules`.
    pub(crate) fn new(len_bytes: usize, rules: MemoryRules) -> Bounce {
        Bounce { memory: AlignedBuf::new(len_bytes.min(BOUNCE_BYTES_MAX), rules.memory_bytes), len_bytes, rules }
    }

    /// The piece of the request that starts at `done_bytes` (which must be where the last
    /// piece ended): at most [`BOUNCE_BYTES_MAX`], a multiple of the logical block.
    pub(crate) fn piece_from(&self, done_bytes: usize) -> Range<usize> {
        assert!(done_bytes < self.len_bytes, "piece from byte {done_bytes} of {}", self.len_bytes);
        assert_eq!(done_bytes % BOUNCE_BYTES_MAX, 0, "pieces start on a bounce boundary");
        let piece = done_bytes..(done_bytes + BOUNCE_BYTES_MAX).min(self.len_bytes);
        assert_eq!(piece.len() % self.rules.length_bytes, 0, "piece {piece:?} breaks {:?}", self.rules);
        piece
    }

    /// The piece that ends at `done_bytes`: 2.5 MiB done → 2 MiB..2.5 MiB.
    #[cfg_attr(not(feature = "io-uring"), allow(dead_code, reason = "only the ring engine resumes after a piece"))]
    pub(crate) fn piece_to(&self, done_bytes: usize) -> Range<usize> {
        assert!(0 < done_bytes && done_bytes <= self.len_bytes, "piece to byte {done_bytes} of {}", self.len_bytes);
        (done_bytes - 1) / BOUNCE_BYTES_MAX * BOUNCE_BYTES_MAX..done_bytes
    }

    /// The aligned memory for `piece`, for the kernel to read from or write into.
    pub(crate) fn memory(&mut self, piece: &Range<usize>) -> &mut [u8] {
        &mut self.memory.as_mut_slice()[..piece.len()]
    }

    /// Write side: copies `piece` of `buf` into the bounce memory and returns that memory.
    pub(crate) fn load(&mut self, buf: &WriteBuf, piece: &Range<usize>) -> &mut [u8] {
        let memory = self.memory(piece);
        buf.slice(piece.clone()).copy_to_slice(memory);
        memory
    }

    /// Read side: copies the bounce memory of `piece`, which the kernel has filled, into
    /// `segments` (the caller's buffer, whose byte 0 is byte 0 of the request).
    pub(crate) fn unload<'a>(&mut self, segments: impl Iterator<Item = &'a mut [u8]>, piece: &Range<usize>) {
        let at = piece.start;
        copy_into_segments(segments, at, self.memory(piece));
    }
}

/// Copies `data` into a list of segments, starting `at` bytes into them.
///
/// Worked example: segments of 3, 1 and 4 bytes, `at` 2, 4 bytes of data → the last byte of
/// the first segment, the second segment, the first two bytes of the third.
///
/// # Panics
/// If the data runs past the end of the segments.
pub(crate) fn copy_into_segments<'a>(segments: impl Iterator<Item = &'a mut [u8]>, at: usize, mut data: &[u8]) {
    let mut segment_start = 0;
    for segment in segments {
        if data.is_empty() {
            return;
        }
        let segment_end = segment_start + segment.len();
        if segment_end > at {
            let within = at.max(segment_start) - segment_start;
            let n = (segment.len() - within).min(data.len());
            segment[within..within + n].copy_from_slice(&data[..n]);
            data = &data[n..];
        }
        segment_start = segment_end;
    }
    assert!(data.is_empty(), "copy past the end of the segments");
}

/// The direction of a transfer, for [`ended_early`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    Read,
    Write,
}

/// The error for a transfer the kernel ended with 0 bytes before the request was done: end of
/// file on a read (the file shrank under the device), a write that makes no progress.
/// Shorter transfers that made progress are continued, not errors.
pub(crate) fn ended_early(direction: Direction, at_bytes: u64, short_bytes: usize) -> io::Error {
    assert!(short_bytes > 0, "a transfer that is done did not end early");
    match direction {
        Direction::Read => io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("read ended at byte {at_bytes}, {short_bytes} bytes short"),
        ),
        Direction::Write => io::Error::new(
            io::ErrorKind::WriteZero,
            format!("write stopped at byte {at_bytes}, {short_bytes} bytes short"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES_4K: MemoryRules = MemoryRules { memory_bytes: 4096, length_bytes: 4096 };

    #[test]
    fn start_is_aligned_and_length_exact() {
        for align in [1, 512, 4096, 65536] {
            for len in [0, 1, 512, 4096 + 512] {
                let mut buf = AlignedBuf::new(len, align);
                let slice = buf.as_mut_slice();
                assert_eq!(slice.as_ptr() as usize % align, 0);
                assert_eq!(slice.len(), len);
                assert!(slice.iter().all(|&b| b == 0));
            }
        }
    }

    #[test]
    fn only_segments_breaking_the_rules_are_bounced() {
        let mut memory = AlignedBuf::new(3 * 4096, 4096);
        let memory = memory.as_mut_slice();
        let aligned = [&memory[..4096], &memory[4096..]];
        assert_eq!(bounce_rules(Some(RULES_4K), aligned.into_iter()), None);
        let misaligned = [&memory[..4096], &memory[4096 + 512..3 * 4096 - 512]];
        assert_eq!(bounce_rules(Some(RULES_4K), misaligned.into_iter()), Some(RULES_4K));
        let short = [&memory[..512]];
        assert_eq!(bounce_rules(Some(RULES_4K), short.into_iter()), Some(RULES_4K));
        assert_eq!(bounce_rules(None, misaligned.into_iter()), None, "buffered I/O takes any memory");
    }

    #[test]
    fn bounce_pieces_cover_the_request_in_order() {
        let len_bytes = 2 * BOUNCE_BYTES_MAX + BOUNCE_BYTES_MAX / 2;
        let bounce = Bounce::new(len_bytes, RULES_4K);
        let mut done_bytes = 0;
        let mut pieces = Vec::new();
        while done_bytes < len_bytes {
            let piece = bounce.piece_from(done_bytes);
            done_bytes = piece.end;
            assert_eq!(bounce.piece_to(done_bytes), piece);
            pieces.push(piece);
        }
        let m = BOUNCE_BYTES_MAX;
        assert_eq!(pieces, vec![0..m, m..2 * m, 2 * m..len_bytes]);
        assert_eq!(Bounce::new(4096, RULES_4K).piece_to(4096), 0..4096);
    }

    #[test]
    fn bounced_writes_and_reads_round_trip_through_segments() {
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        let mut bounce = Bounce::new(data.len(), RULES_4K);
        let piece = bounce.piece_from(0);
        let loaded = bounce.load(&WriteBuf::from_bytes(bytes::Bytes::from(data.clone())), &piece);
        assert_eq!(loaded.as_ptr() as usize % 4096, 0);
        assert_eq!(loaded, &data[..]);
        let (mut a, mut b) = (vec![0u8; 1000], vec![0u8; 7192]);
        bounce.unload([&mut a[..], &mut b[..]].into_iter(), &piece);
        assert_eq!([a, b].concat(), data);
    }

    #[test]
    #[should_panic(expected = "breaks")]
    fn a_request_off_the_logical_block_is_a_broken_invariant() {
        RULES_4K.assert_request(512, 4096);
    }

    #[test]
    fn copy_into_segments_crosses_segment_boundaries() {
        let (mut a, mut b, mut c) = ([0u8; 3], [0u8; 1], [0u8; 4]);
        copy_into_segments([&mut a[..], &mut b[..], &mut c[..]].into_iter(), 0, &[1, 2]);
        copy_into_segments([&mut a[..], &mut b[..], &mut c[..]].into_iter(), 2, &[3, 4, 5, 6]);
        copy_into_segments([&mut a[..], &mut b[..], &mut c[..]].into_iter(), 6, &[7, 8]);
        assert_eq!((a, b, c), ([1, 2, 3], [4], [5, 6, 7, 8]));
    }

    #[test]
    #[should_panic(expected = "past the end")]
    fn copy_past_the_segments_is_a_broken_invariant() {
        let mut a = [0u8; 2];
        copy_into_segments([&mut a[..]].into_iter(), 1, &[1, 2]);
    }

    #[test]
    fn a_transfer_ending_early_names_where_and_how_much() {
        let error = ended_early(Direction::Read, 8192, 4096);
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(error.to_string(), "read ended at byte 8192, 4096 bytes short");
        assert_eq!(ended_early(Direction::Write, 0, 512).kind(), io::ErrorKind::WriteZero);
    }
}
