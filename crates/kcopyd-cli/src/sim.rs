//! `sim:KEY=VALUE,...`: simulated disks, so that every command can be tried without a disk.
//!
//! ```text
//!  sim:size=1G,seed=7,block=4096,latency=100us,bandwidth=500M,queue=32,bad-read=100-108+4000
//!      │       │      │          │             │             │        └ latent read errors,
//!      │       │      │          │             │             │          sectors [100, 108) and 4000
//!      │       │      │          │             │             └ requests served at once
//!      │       │      │          │             └ bytes per second of the data path
//!      │       │      │          └ fixed cost of every request
//!      │       │      └ logical block size in bytes
//!      │       └ fill with the pattern of seed 7 (absent: zeroes)
//!      └ length (sizes as everywhere: 1G = 1 GiB, plain numbers are bytes)
//! ```
//!
//! Keys apply to reads and writes alike; `write-latency`, `write-bandwidth` override the
//! write side. Fault ranges are in 512-byte sectors, half-open (`START-END`, or one sector
//! `N`), joined with `+`; a fault key may also be repeated.

use std::ops::Range;
use std::sync::Arc;

use kcopyd_sim::{Latency, MemDisk, MemDiskOptions};
use thiserror::Error;

use crate::size::{self, SECTOR_BYTES, SizeError};

/// The prefix of a simulated device.
pub const PREFIX: &str = "sim:";
/// The largest dense simulated disk: it holds its bytes in memory.
pub const SIM_LEN_BYTES_MAX: u64 = 16 << 30;
/// The largest sparse simulated disk: it holds runs of content, not bytes.
pub const SIM_SPARSE_LEN_BYTES_MAX: u64 = 1 << 50;
/// The keys a `sim:` device takes, for messages.
pub const KEYS: &str = "size, seed, block, sparse, latency, write-latency, bandwidth, write-bandwidth, queue, \
                        jitter, bad-read, bad-write";

/// Why a `sim:` device could not be read or built. Each names the key at fault.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SimError {
    /// An option without `=`.
    #[error("sim option '{option}' is not KEY=VALUE (keys: {KEYS})")]
    NotKeyValue {
        /// The option as given.
        option: String,
    },
    /// A key that is not known.
    #[error("unknown sim key '{key}' (keys: {KEYS})")]
    UnknownKey {
        /// The key.
        key: String,
    },
    /// A key given twice (fault keys may repeat).
    #[error("sim key '{key}' given twice")]
    Repeated {
        /// The key.
        key: String,
    },
    /// A value that does not parse.
    #[error("sim key '{key}': {source}")]
    Value {
        /// The key.
        key: &'static str,
        /// What is wrong with it.
        #[source]
        source: SizeError,
    },
    /// A value out of bounds or inconsistent with another.
    #[error("sim key '{key}': {problem}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// What is wrong.
        problem: String,
    },
}

/// A parsed `sim:` device: everything but its length is fixed by the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimSpec {
    /// The text after `sim:`, for messages.
    pub text: String,
    /// `size`: the length in bytes; `None` lets a target take the length it needs.
    pub len_bytes: Option<u64>,
    /// `seed`: fill with this pattern; `None` means zeroes.
    pub seed: Option<u64>,
    /// `block`: the logical block size in bytes.
    pub block_bytes: u32,
    /// `sparse`: keep runs of content instead of bytes (large disks in little memory).
    pub sparse: bool,
    /// The timing of reads and writes.
    pub latency: Latency,
    /// `bad-read`: latent read errors, in sectors.
    pub bad_reads: Vec<Range<u64>>,
    /// `bad-write`: sectors whose writes fail.
    pub bad_writes: Vec<Range<u64>>,
}

impl SimSpec {
    /// Reads the options after `sim:`.
    ///
    /// # Errors
    /// A malformed option, an unknown or repeated key, or a value out of bounds.
    pub fn parse(options: &str) -> Result<SimSpec, SimError> {
        let mut spec = SimSpec {
            text: format!("{PREFIX}{options}"),
            len_bytes: None,
            seed: None,
            block_bytes: 512,
            sparse: false,
            latency: Latency::default(),
            bad_reads: Vec::new(),
            bad_writes: Vec::new(),
        };
        let mut seen: Vec<&str> = Vec::new();
        let (mut write_cost, mut write_bandwidth) = (None, None);
        for option in options.split(',').filter(|o| !o.trim().is_empty()) {
            let Some((key, value)) = option.split_once('=') else {
                return Err(SimError::NotKeyValue { option: option.to_owned() });
            };
            let key = key.trim();
            let value = value.trim();
            let repeatable = matches!(key, "bad-read" | "bad-write");
            if !repeatable && seen.contains(&key) {
                return Err(SimError::Repeated { key: key.to_owned() });
            }
            seen.push(key);
            match key {
                "size" => spec.len_bytes = Some(sized("size", size::parse_size(value))?),
                "seed" => {
                    spec.seed = Some(value.parse().map_err(|_| SimError::Invalid {
                        key: "seed",
                        problem: format!("'{value}' is not a whole number from 0 to {}", u64::MAX),
                    })?)
                }
                "block" => {
                    let bytes = sized("block", size::parse_size(value))?;
                    if !bytes.is_power_of_two() || !(512..=65536).contains(&bytes) {
                        return Err(SimError::Invalid {
                            key: "block",
                            problem: format!("{bytes} bytes: must be a power of two from 512 to 65536"),
                        });
                    }
                    spec.block_bytes = bytes as u32;
                }
                "sparse" => {
                    spec.sparse = match value {
                        "on" | "yes" | "true" | "1" => true,
                        "off" | "no" | "false" | "0" => false,
                        _ => {
                            return Err(SimError::Invalid {
                                key: "sparse",
                                problem: format!("'{value}' is not on or off"),
                            });
                        }
                    }
                }
                "latency" => {
                    let us = sized("latency", size::parse_duration_us(value))?;
                    spec.latency.read.cost_us = us;
                    spec.latency.write.cost_us = us;
                }
                "write-latency" => write_cost = Some(sized("write-latency", size::parse_duration_us(value))?),
                "bandwidth" => {
                    let rate = sized("bandwidth", size::parse_rate(value))?;
                    spec.latency.read.bandwidth_bytes_per_s = rate;
                    spec.latency.write.bandwidth_bytes_per_s = rate;
                }
                "write-bandwidth" => write_bandwidth = Some(sized("write-bandwidth", size::parse_rate(value))?),
                "queue" => {
                    let depth: u32 = value.parse().map_err(|_| SimError::Invalid {
                        key: "queue",
                        problem: format!("'{value}' is not a whole number (0 = unlimited)"),
                    })?;
                    spec.latency.read.queue_depth = depth;
                    spec.latency.write.queue_depth = depth;
                }
                "jitter" => {
                    let us = sized("jitter", size::parse_duration_us(value))?;
                    spec.latency.read.jitter_us = us;
                    spec.latency.write.jitter_us = us;
                }
                "bad-read" => spec.bad_reads.extend(parse_ranges("bad-read", value)?),
                "bad-write" => spec.bad_writes.extend(parse_ranges("bad-write", value)?),
                _ => return Err(SimError::UnknownKey { key: key.to_owned() }),
            }
        }
        if let Some(us) = write_cost {
            spec.latency.write.cost_us = us;
        }
        if let Some(rate) = write_bandwidth {
            spec.latency.write.bandwidth_bytes_per_s = rate;
        }
        if let Some(len_bytes) = spec.len_bytes {
            spec.check_len(len_bytes)?;
        }
        Ok(spec)
    }

    /// Checks a length against the block size, the memory cap and the fault ranges.
    ///
    /// # Errors
    /// The length is not a whole number of blocks, too large, or a fault lies past it.
    pub fn check_len(&self, len_bytes: u64) -> Result<(), SimError> {
        if len_bytes % u64::from(self.block_bytes) != 0 {
            return Err(SimError::Invalid {
                key: "size",
                problem: format!("{len_bytes} bytes is not a whole number of {}-byte blocks", self.block_bytes),
            });
        }
        let len_bytes_max = if self.sparse { SIM_SPARSE_LEN_BYTES_MAX } else { SIM_LEN_BYTES_MAX };
        if len_bytes > len_bytes_max {
            return Err(SimError::Invalid {
                key: "size",
                problem: format!(
                    "{} is more than the {} a {} simulated disk may hold{}",
                    size::Bytes(len_bytes),
                    size::Bytes(len_bytes_max),
                    if self.sparse { "sparse" } else { "dense" },
                    if self.sparse { "" } else { " in memory (sparse=on holds more)" }
                ),
            });
        }
        let len_sectors = len_bytes / SECTOR_BYTES;
        for (key, ranges) in [("bad-read", &self.bad_reads), ("bad-write", &self.bad_writes)] {
            if let Some(range) = ranges.iter().find(|r| r.end > len_sectors) {
                return Err(SimError::Invalid {
                    key,
                    problem: format!(
                        "sectors {}-{} lie past the end of the {len_sectors}-sector disk",
                        range.start, range.end
                    ),
                });
            }
        }
        Ok(())
    }

    /// Builds the disk with `len_bytes` (checked with [`SimSpec::check_len`]), filled and
    /// with its faults in place.
    pub fn build(&self, len_bytes: u64) -> Arc<MemDisk> {
        let disk = Arc::new(MemDisk::new(MemDiskOptions {
            name: self.text.clone(),
            seed: self.seed.unwrap_or(0),
            len_sectors: len_bytes / SECTOR_BYTES,
            logical_block_size: self.block_bytes,
            sparse: self.sparse,
            latency: Latency { seed: self.seed.unwrap_or(0), ..self.latency.clone() },
            ..MemDiskOptions::default()
        }));
        if let Some(seed) = self.seed {
            disk.fill_pattern(seed);
        }
        self.bad_reads.iter().for_each(|r| disk.fail_reads(r.clone()));
        self.bad_writes.iter().for_each(|r| disk.fail_writes(r.clone()));
        disk
    }
}

fn sized(key: &'static str, result: Result<u64, SizeError>) -> Result<u64, SimError> {
    result.map_err(|source| SimError::Value { key, source })
}

/// Reads `START-END+N+...` (sectors, half-open; `N` alone is one sector).
fn parse_ranges(key: &'static str, value: &str) -> Result<Vec<Range<u64>>, SimError> {
    let invalid = |problem: String| SimError::Invalid { key, problem };
    let number = |text: &str| -> Result<u64, SimError> {
        text.trim().parse().map_err(|_| {
            invalid(format!(
                "'{text}' is not a sector number (ranges are START-END in 512-byte sectors, joined with +)"
            ))
        })
    };
    value
        .split('+')
        .map(|piece| {
            let range = match piece.split_once('-') {
                Some((start, end)) => number(start)?..number(end)?,
                None => {
                    let sector = number(piece)?;
                    sector..sector.saturating_add(1)
                }
            };
            if range.start >= range.end {
                return Err(invalid(format!("range {piece} is empty: END must be greater than START")));
            }
            Ok(range)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kcopyd_sim::IoModel;

    #[test]
    fn every_key_lands_in_the_disk_options() {
        let spec = SimSpec::parse(
            "size=1M,seed=7,block=4096,latency=100us,write-latency=2ms,bandwidth=500M,queue=32,jitter=10us,\
             bad-read=8-16+100,bad-read=200-208,bad-write=64-72",
        )
        .unwrap();
        assert_eq!(spec.len_bytes, Some(1 << 20));
        assert_eq!(spec.seed, Some(7));
        assert_eq!(spec.block_bytes, 4096);
        assert_eq!(
            spec.latency.read,
            IoModel { cost_us: 100, bandwidth_bytes_per_s: 500 << 20, queue_depth: 32, jitter_us: 10 }
        );
        assert_eq!(spec.latency.write.cost_us, 2000);
        assert_eq!(spec.latency.write.bandwidth_bytes_per_s, 500 << 20);
        assert_eq!(spec.bad_reads, vec![8..16, 100..101, 200..208]);
        assert_eq!(spec.bad_writes, vec![64..72]);
        let disk = spec.build(1 << 20);
        assert_eq!(disk.options().logical_block_size, 4096);
        assert_eq!(disk.options().len_sectors, 2048);
        assert_ne!(disk.snapshot(0, 1), vec![0; 512], "filled with the seed's pattern");
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("sise=1M", "'sise'"),
            ("size", "'size'"),
            ("size=1Q", "'size'"),
            ("size=1M,size=2M", "'size'"),
            ("block=1000", "'block'"),
            ("latency=100", "'latency'"),
            ("bandwidth=fast", "'bandwidth'"),
            ("queue=-1", "'queue'"),
            ("seed=x", "'seed'"),
            ("bad-read=9-3", "'bad-read'"),
            ("bad-write=a-b", "'bad-write'"),
            ("size=1M,bad-read=4096-4100", "'bad-read'"),
            ("size=1000", "'size'"),
            ("size=1T", "'size'"),
            ("sparse=maybe", "'sparse'"),
        ];
        for (text, key) in cases {
            let message = SimSpec::parse(text).unwrap_err().to_string();
            assert!(message.contains(key), "{text}: {message}");
        }
    }

    #[test]
    fn sparse_disks_may_be_large() {
        let spec = SimSpec::parse("size=1T,seed=1,sparse=on").unwrap();
        let disk = spec.build(1 << 40);
        assert_eq!(disk.options().len_sectors, 1 << 31);
        assert_ne!(disk.snapshot((1 << 31) - 1, 1), vec![0; 512]);
    }

    #[test]
    fn size_may_be_left_to_the_target() {
        let spec = SimSpec::parse("").unwrap();
        assert_eq!((spec.len_bytes, spec.seed, spec.block_bytes), (None, None, 512));
        assert!(spec.check_len(4096).is_ok());
    }
}
