//! Errors of the clone: what was wrong with its devices, options or metadata (typed, before
//! anything is written), and the error a foreground write gets when its region cannot be
//! hydrated.

use std::io;

use kcopyd_core::RequestRefused;
use thiserror::Error;

/// Why a clone could not be created or opened, or an option was refused. Nothing was written
/// to any device unless the variant says so.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CloneError {
    /// The region size is not a power of two from 4 KiB to 1 GiB.
    #[error("region size of {bytes} bytes: must be a power of two from 4096 to 1073741824 (4 KiB to 1 GiB)")]
    RegionSize {
        /// The size given.
        bytes: u64,
    },
    /// The region is smaller than a logical block of the source or destination.
    #[error("region size of {region_bytes} bytes is smaller than the {block_size}-byte logical block of {device}")]
    RegionSmallerThanBlock {
        /// The region size.
        region_bytes: u64,
        /// The device with the large block.
        device: String,
        /// Its logical block size.
        block_size: u32,
    },
    /// The destination is shorter than the source.
    #[error("destination {device} has {destination_sectors} sectors, fewer than the source's {source_sectors}")]
    DestinationTooSmall {
        /// The destination.
        device: String,
        /// Its length.
        destination_sectors: u64,
        /// The source's length.
        source_sectors: u64,
    },
    /// The source's length is not a whole number of the clone's logical blocks.
    #[error("source {device} has {source_sectors} sectors, not a whole number of {block_size}-byte blocks")]
    SourceLength {
        /// The source.
        device: String,
        /// Its length.
        source_sectors: u64,
        /// The clone's logical block (the larger of source's and destination's).
        block_size: u32,
    },
    /// Two of the three devices are the same storage.
    #[error("the {first} and the {second} are the same device ({device})")]
    SameDevice {
        /// Role of the first ("source", "destination", "metadata device").
        first: &'static str,
        /// Role of the second.
        second: &'static str,
        /// The device.
        device: String,
    },
    /// The metadata device cannot hold the two commit slots.
    #[error("metadata device {device} has {device_sectors} sectors; {needed_sectors} are needed for {regions} regions")]
    MetadataTooSmall {
        /// The metadata device.
        device: String,
        /// Its length.
        device_sectors: u64,
        /// Sectors the two slots need.
        needed_sectors: u64,
        /// Regions of the clone.
        regions: u64,
    },
    /// The metadata device's logical block is larger than 64 KiB.
    #[error("metadata device {device} has {block_size}-byte logical blocks: at most 65536 are supported")]
    MetadataBlock {
        /// The metadata device.
        device: String,
        /// Its logical block size.
        block_size: u32,
    },
    /// An option is out of bounds.
    #[error("{name} = {value}: must be between {min} and {max}")]
    Option {
        /// The option's name.
        name: &'static str,
        /// The value given.
        value: u64,
        /// Smallest value allowed.
        min: u64,
        /// Largest value allowed.
        max: u64,
    },
    /// Neither commit slot of the metadata device holds valid metadata.
    #[error(
        "metadata device {device} holds no valid clone metadata (no slot with the magic, a known version and good checksums)"
    )]
    NoValidMetadata {
        /// The metadata device.
        device: String,
    },
    /// The metadata was written by a newer format.
    #[error("metadata device {device} has format version {version}; this build reads version {supported}")]
    Version {
        /// The metadata device.
        device: String,
        /// The version found.
        version: u32,
        /// The version this build reads and writes.
        supported: u32,
    },
    /// The metadata describes other devices than those given.
    #[error("metadata device {device} records {field} = {recorded}, but the devices given have {actual}")]
    MetadataMismatch {
        /// The metadata device.
        device: String,
        /// What differs ("source sectors", "destination sectors", ...).
        field: &'static str,
        /// What the metadata says.
        recorded: u64,
        /// What the devices say.
        actual: u64,
    },
    /// Reading the metadata failed.
    #[error("reading the clone metadata from {device}, sectors {sectors:?}")]
    ReadMetadata {
        /// The metadata device.
        device: String,
        /// The sectors asked for.
        sectors: std::ops::Range<u64>,
        /// What the device said.
        #[source]
        source: io::Error,
    },
    /// Writing the initial metadata failed (the metadata device may hold no valid metadata).
    #[error("writing the initial clone metadata to {device}")]
    WriteMetadata {
        /// The metadata device.
        device: String,
        /// What the device said.
        #[source]
        source: io::Error,
    },
}

/// The error inside the `io::Error` of a foreground write whose region could not be hydrated.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum HydrationError {
    /// Copying the region failed on this attempt.
    #[error("{device}: hydrating region {region} (sectors {sectors:?}) failed; the write was not issued")]
    CopyFailed {
        /// The clone.
        device: String,
        /// The region.
        region: u64,
        /// Its sectors.
        sectors: std::ops::Range<u64>,
    },
    /// The region failed too often and is given up on: only a write covering it whole, or a
    /// discard, can hydrate it now (or [`CloneDevice::retry_failed`](crate::CloneDevice::retry_failed)).
    #[error("{device}: region {region} (sectors {sectors:?}) is given up on after failed hydrations")]
    GivenUp {
        /// The clone.
        device: String,
        /// The region.
        region: u64,
        /// Its sectors.
        sectors: std::ops::Range<u64>,
    },
}

impl HydrationError {
    /// As an `io::Error` (kind `Other`), carrying `self`.
    pub fn into_io(self) -> io::Error {
        io::Error::other(self)
    }

    /// The hydration error inside `error`, if it carries one.
    pub fn of(error: &io::Error) -> Option<&HydrationError> {
        error.get_ref().and_then(|inner| inner.downcast_ref())
    }
}

/// Why a [`CloneDevice`](crate::CloneDevice) refused a request before any I/O, inside the
/// `io::Error` it returns (`error.get_ref()` downcasts to it); the error's kind is the
/// refusal's (`InvalidInput`, EINVAL).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum RequestError {
    /// The request breaks the clone's geometry: misaligned or past the end.
    #[error("{device}: {operation} of sectors {:?} refused: {refused}", .refused.sectors())]
    Geometry {
        /// The clone's name.
        device: String,
        /// The operation refused.
        operation: &'static str,
        /// The rule broken, with the request and the clone's block size or length.
        refused: RequestRefused,
    },
}
