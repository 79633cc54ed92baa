//! The on-disk metadata: two alternating commit slots, each a header block and the bitmap of
//! hydrated regions, both under CRC-32C checksums (docs/CLONE.md has the format).
//!
//! ```text
//!  metadata device: [ header 0 | header 1 | bitmap 0 blocks … | bitmap 1 blocks … ]
//!  commit n goes to the slot that does not hold commit n-1, then the device is flushed:
//!  a torn or lost commit fails its checksums and the other slot (commit n-1) is used.
//! ```
//!
//! A commit writes only the bitmap blocks that changed since that slot was last written, then
//! its header; the header's bitmap checksum covers the whole bitmap, so any mix of old and new
//! blocks is refused as a whole.

use std::io;
use std::ops::Range;

use bytes::Bytes;
use kcopyd_core::{Device, ReadBuf, SECTOR_SIZE, WriteBuf};

use crate::error::CloneError;

/// The first eight bytes of a slot's header.
pub const MAGIC: [u8; 8] = *b"KCLONEv1";
/// The format version this build reads and writes.
pub const VERSION: u32 = 1;
/// Bytes of the header that carry fields (the rest of its block is zero).
pub const HEADER_BYTES: usize = 88;
/// The smallest metadata block: a header and each bitmap block take one.
pub const BLOCK_MIN_BYTES: u32 = 4096;
const BLOCK_MAX_BYTES: u32 = 65536;

/// Where things are on the metadata device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Layout {
    /// Bytes per metadata block: 4096, or the device's logical block if larger.
    pub(crate) block_bytes: u32,
    /// Regions the bitmap holds.
    pub(crate) region_count: u64,
    /// Bitmap blocks per slot.
    pub(crate) bitmap_blocks: u64,
}

impl Layout {
    /// The layout of `region_count` regions in blocks of `block_bytes`.
    pub(crate) fn of(block_bytes: u32, region_count: u64) -> Layout {
        let bitmap_blocks = region_count.div_ceil(8).div_ceil(u64::from(block_bytes));
        Layout { block_bytes, region_count, bitmap_blocks }
    }

    pub(crate) fn new(metadata: &Device, region_count: u64) -> Result<Layout, CloneError> {
        let device_block = metadata.geometry().logical_block_size;
        if device_block > BLOCK_MAX_BYTES {
            return Err(CloneError::MetadataBlock { device: metadata.name().to_owned(), block_size: device_block });
        }
        let block_bytes = device_block.max(BLOCK_MIN_BYTES);
        let layout = Layout::of(block_bytes, region_count);
        let device_sectors = metadata.geometry().len_sectors;
        if layout.total_sectors() > device_sectors {
            return Err(CloneError::MetadataTooSmall {
                device: metadata.name().to_owned(),
                device_sectors,
                needed_sectors: layout.total_sectors(),
                regions: region_count,
            });
        }
        Ok(layout)
    }

    pub(crate) fn block_sectors(&self) -> u64 {
        u64::from(self.block_bytes) / SECTOR_SIZE as u64
    }

    /// Sectors of both slots: two header blocks, then each slot's bitmap blocks.
    pub(crate) fn total_sectors(&self) -> u64 {
        (2 + 2 * self.bitmap_blocks) * self.block_sectors()
    }

    /// First sector of `slot`'s header: blocks 0 and 1, found without knowing the geometry.
    pub(crate) fn header_sector(&self, slot: usize) -> u64 {
        slot as u64 * self.block_sectors()
    }

    /// First sector of `slot`'s bitmap block `index`.
    pub(crate) fn bitmap_sector(&self, slot: usize, index: u64) -> u64 {
        (2 + slot as u64 * self.bitmap_blocks + index) * self.block_sectors()
    }

    /// Bytes of the bitmap: one bit a region, rounded up to a byte.
    pub(crate) fn bitmap_bytes(&self) -> usize {
        usize::try_from(self.region_count.div_ceil(8)).expect("the bitmap fits in memory")
    }

    /// Regions one bitmap block holds.
    pub(crate) fn regions_per_block(&self) -> u64 {
        u64::from(self.block_bytes) * 8
    }
}

/// Bytes a metadata device of `logical_block_size`-byte blocks needs for a clone of
/// `source_sectors` in regions of `region_size_bytes` (both slots: headers and bitmaps), so
/// that an embedder can size a metadata file before [`CloneDevice::create`](crate::CloneDevice::create).
///
/// ```
/// # use kcopyd_clone::metadata_bytes_needed;
/// // 1 GiB in 64 KiB regions: 16384 regions, a 2 KiB bitmap: one 4 KiB block per slot.
/// assert_eq!(metadata_bytes_needed(2 << 20, 64 * 1024, 512), 4 * 4096);
/// ```
pub fn metadata_bytes_needed(source_sectors: u64, region_size_bytes: u64, logical_block_size: u32) -> u64 {
    let region_sectors = (region_size_bytes / SECTOR_SIZE as u64).max(1);
    let layout = Layout::of(logical_block_size.max(BLOCK_MIN_BYTES), source_sectors.div_ceil(region_sectors));
    layout.total_sectors() * SECTOR_SIZE as u64
}

/// What a slot's header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) seq: u64,
    pub(crate) slot: u32,
    pub(crate) block_bytes: u32,
    pub(crate) region_sectors: u64,
    pub(crate) region_count: u64,
    pub(crate) source_sectors: u64,
    pub(crate) destination_sectors: u64,
    pub(crate) hydrated_regions: u64,
    pub(crate) bitmap_crc: u32,
}

/// Field offsets in the header (little endian).
mod at {
    pub(super) const MAGIC: usize = 0;
    pub(super) const VERSION: usize = 8;
    pub(super) const BLOCK_BYTES: usize = 12;
    pub(super) const SEQ: usize = 16;
    pub(super) const REGION_SECTORS: usize = 24;
    pub(super) const REGION_COUNT: usize = 32;
    pub(super) const SOURCE_SECTORS: usize = 40;
    pub(super) const DESTINATION_SECTORS: usize = 48;
    pub(super) const HYDRATED_REGIONS: usize = 56;
    pub(super) const SLOT: usize = 64;
    pub(super) const BITMAP_CRC: usize = 68;
    pub(super) const RESERVED: usize = 72; // 12 bytes of zeroes
    pub(super) const HEADER_CRC: usize = 84;
}
const _: () = assert!(at::HEADER_CRC + 4 == HEADER_BYTES && at::RESERVED + 12 == at::HEADER_CRC);

impl Header {
    /// The header block: fields, then zeroes to `block_bytes`.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut block = vec![0u8; self.block_bytes as usize];
        block[at::MAGIC..at::MAGIC + 8].copy_from_slice(&MAGIC);
        put32(&mut block, at::VERSION, VERSION);
        put32(&mut block, at::BLOCK_BYTES, self.block_bytes);
        put64(&mut block, at::SEQ, self.seq);
        put64(&mut block, at::REGION_SECTORS, self.region_sectors);
        put64(&mut block, at::REGION_COUNT, self.region_count);
        put64(&mut block, at::SOURCE_SECTORS, self.source_sectors);
        put64(&mut block, at::DESTINATION_SECTORS, self.destination_sectors);
        put64(&mut block, at::HYDRATED_REGIONS, self.hydrated_regions);
        put32(&mut block, at::SLOT, self.slot);
        put32(&mut block, at::BITMAP_CRC, self.bitmap_crc);
        let crc = crc32c(&block[..at::HEADER_CRC]);
        put32(&mut block, at::HEADER_CRC, crc);
        block
    }

    /// Parses a header block: `Ok(None)` when it is not a valid header (no magic, bad
    /// checksum, impossible fields), an error for a version this build does not know.
    pub(crate) fn decode(block: &[u8], device: &str) -> Result<Option<Header>, CloneError> {
        if block.len() < HEADER_BYTES || block[at::MAGIC..at::MAGIC + 8] != MAGIC {
            return Ok(None);
        }
        if crc32c(&block[..at::HEADER_CRC]) != get32(block, at::HEADER_CRC) {
            return Ok(None);
        }
        let version = get32(block, at::VERSION);
        if version != VERSION {
            return Err(CloneError::Version { device: device.to_owned(), version, supported: VERSION });
        }
        let header = Header {
            seq: get64(block, at::SEQ),
            slot: get32(block, at::SLOT),
            block_bytes: get32(block, at::BLOCK_BYTES),
            region_sectors: get64(block, at::REGION_SECTORS),
            region_count: get64(block, at::REGION_COUNT),
            source_sectors: get64(block, at::SOURCE_SECTORS),
            destination_sectors: get64(block, at::DESTINATION_SECTORS),
            hydrated_regions: get64(block, at::HYDRATED_REGIONS),
            bitmap_crc: get32(block, at::BITMAP_CRC),
        };
        let sane = header.hydrated_regions <= header.region_count
            && header.region_sectors.is_power_of_two()
            && header.block_bytes.is_power_of_two()
            && header.slot < 2;
        Ok(sane.then_some(header))
    }
}

fn put32(block: &mut [u8], offset: usize, value: u32) {
    block[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
}

fn put64(block: &mut [u8], offset: usize, value: u64) {
    block[offset..offset + 8].copy_from_slice(&value.to_le_bytes());
}

fn get32(block: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes(block[offset..offset + 4].try_into().expect("four bytes"))
}

fn get64(block: &[u8], offset: usize) -> u64 {
    u64::from_le_bytes(block[offset..offset + 8].try_into().expect("eight bytes"))
}

/// CRC-32C (Castagnoli, reflected, as iSCSI and ext4 use) lookup table.
const CRC32C_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82f6_3b78 } else { crc >> 1 };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

/// The CRC-32C of `data`.
///
/// ```
/// // The check value of the CRC-32C catalogue entry.
/// assert_eq!(kcopyd_clone::crc32c(b"123456789"), 0xe306_9283);
/// ```
pub fn crc32c(data: &[u8]) -> u32 {
    !data.iter().fold(!0u32, |crc, &byte| CRC32C_TABLE[((crc ^ u32::from(byte)) & 0xff) as usize] ^ (crc >> 8))
}

/// A commit found on the device: its header and its bitmap bytes.
#[derive(Debug)]
pub(crate) struct Loaded {
    pub(crate) header: Header,
    pub(crate) bitmap: Vec<u8>,
}

/// Reads `len_sectors` at `offset_sectors` of `device`.
pub(crate) async fn read_sectors(
    device: &Device,
    offset_sectors: u64,
    len_sectors: u64,
) -> Result<Vec<u8>, CloneError> {
    let len_bytes = usize::try_from(len_sectors).expect("metadata fits in memory") * SECTOR_SIZE;
    let (buf, result) = device.read(offset_sectors, ReadBuf::with_capacity(len_bytes)).await;
    result.map_err(|source| CloneError::ReadMetadata {
        device: device.name().to_owned(),
        sectors: offset_sectors..offset_sectors + len_sectors,
        source,
    })?;
    Ok(buf.to_vec())
}

/// Reads both slots and returns the valid one with the highest sequence number.
///
/// A slot is valid when its header's magic and checksum hold, it names its own slot and the
/// metadata block size, and its bitmap matches the header's bitmap checksum and count and has
/// no bit set past the last region.
pub(crate) async fn load(device: &Device, block_bytes: u32) -> Result<Loaded, CloneError> {
    let block_sectors = u64::from(block_bytes) / SECTOR_SIZE as u64;
    let headers = read_sectors(device, 0, 2 * block_sectors).await?;
    let mut candidates = Vec::new();
    for slot in 0..2usize {
        let block = &headers[slot * block_bytes as usize..(slot + 1) * block_bytes as usize];
        let header = Header::decode(block, device.name())?;
        candidates.extend(header.filter(|h| h.slot as usize == slot && h.block_bytes == block_bytes));
    }
    candidates.sort_by_key(|h| std::cmp::Reverse(h.seq));
    let mut valid = Vec::new();
    for header in candidates {
        let layout = Layout::of(block_bytes, header.region_count);
        if layout.total_sectors() > device.geometry().len_sectors {
            continue;
        }
        let bitmap_sectors = layout.bitmap_blocks * layout.block_sectors();
        let mut bitmap = read_sectors(device, layout.bitmap_sector(header.slot as usize, 0), bitmap_sectors).await?;
        bitmap.truncate(layout.bitmap_bytes());
        let agrees = crc32c(&bitmap) == header.bitmap_crc && count_ones(&bitmap) == header.hydrated_regions;
        if agrees && !has_bits_past(&bitmap, header.region_count) {
            valid.push(Loaded { header, bitmap });
        }
    }
    valid.into_iter().next().ok_or_else(|| CloneError::NoValidMetadata { device: device.name().to_owned() })
}

fn count_ones(bitmap: &[u8]) -> u64 {
    bitmap.iter().map(|b| u64::from(b.count_ones())).sum()
}

/// Whether `bitmap` has a bit set past its `region_count` regions (the format keeps them zero:
/// one set would count a region that does not exist as hydrated).
fn has_bits_past(bitmap: &[u8], region_count: u64) -> bool {
    let used = region_count % 8;
    used != 0 && bitmap.last().is_some_and(|last| last >> used != 0)
}

/// Writes `data` at `offset_sectors`.
pub(crate) async fn write_sectors(device: &Device, offset_sectors: u64, data: Vec<u8>) -> io::Result<()> {
    device.write(offset_sectors, WriteBuf::from_bytes(Bytes::from(data))).await
}

/// Writes one commit to `slot`: the bitmap blocks in `blocks` (indices from 0), then the
/// header, then flushes the device.
pub(crate) async fn write_commit(
    device: &Device,
    layout: &Layout,
    header: &Header,
    bitmap: &[u8],
    blocks: &[Range<u64>],
) -> io::Result<()> {
    let block_bytes = layout.block_bytes as usize;
    for run in blocks {
        let mut data = vec![0u8; (run.end - run.start) as usize * block_bytes];
        let from = run.start as usize * block_bytes;
        let to = (run.end as usize * block_bytes).min(bitmap.len());
        if from < to {
            data[..to - from].copy_from_slice(&bitmap[from..to]);
        }
        write_sectors(device, layout.bitmap_sector(header.slot as usize, run.start), data).await?;
    }
    write_sectors(device, layout.header_sector(header.slot as usize), header.encode()).await?;
    device.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            seq: 7,
            slot: 1,
            block_bytes: 4096,
            region_sectors: 8,
            region_count: 100,
            source_sectors: 800,
            destination_sectors: 1024,
            hydrated_regions: 3,
            bitmap_crc: 0xdead_beef,
        }
    }

    #[test]
    fn a_header_round_trips_and_any_flipped_byte_is_refused() {
        let block = header().encode();
        assert_eq!(block.len(), 4096);
        assert_eq!(Header::decode(&block, "m").unwrap(), Some(header()));
        for i in 0..HEADER_BYTES {
            let mut bad = block.clone();
            bad[i] ^= 0x10;
            assert_eq!(Header::decode(&bad, "m").unwrap(), None, "byte {i}");
        }
    }

    #[test]
    fn a_newer_version_is_named_not_taken_for_garbage() {
        let mut block = header().encode();
        put32(&mut block, at::VERSION, 2);
        let crc = crc32c(&block[..at::HEADER_CRC]);
        put32(&mut block, at::HEADER_CRC, crc);
        assert!(matches!(Header::decode(&block, "m"), Err(CloneError::Version { version: 2, .. })));
    }
}
