//! A heap buffer whose start is aligned for direct I/O, made without `unsafe`: over-allocate
//! by the alignment and start at the first aligned byte.

/// A zero-filled buffer of `len` bytes starting at an address that is a multiple of `align`.
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
