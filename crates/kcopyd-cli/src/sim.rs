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
//! `headers-only=on` makes the disk fill and check only the 40-byte provenance header of each
//! pattern sector, not its body: large simulated copies run several times faster and are still
//! verified by provenance. Every device of a copy or verify must then be a headers-only `sim:`
//! device.
//!
//! Keys apply to reads and writes alike; `write-latency`, `write-bandwidth` override the
//! write side. How requests share the data path: `shared-path=on` (reads and writes take turns
//! on one path), `path-overhead=DURATION` (each request holds the path that long besides its
//! transfer; `write-path-overhead` for writes), `seek=TRACK:FULL` with `rpm=N` (a spinning
//! disk: a request away from the previous one seeks, `TRACK` for the shortest distance up to
//! `FULL` across the disk, then waits half a revolution), `medium=NAME` (every disk of the
//! command with that name moves its bytes over one data path: files on one device). A remote
//! disk: `link-rtt=DURATION` (round trip of a network link in front of it) and
//! `link-bandwidth=RATE` (the link's payload rate each way). Fault ranges are in 512-byte sectors, half-open (`START-END`, or one sector
//! `N`), joined with `+`; a fault key may also be repeated.
//!
//! Faults beyond bad sectors: `flaky-write=RANGES` (fails once, then works), `fail-after=N`
//! (the whole device fails once N requests have been served), `fail-at=2s` (from that long after the
//! disk was made), `misdirect=W:SHIFT+...` (write number W lands SHIFT sectors away and reports
//! success), `slow=I:DURATION+...` (request number I takes that much longer), `short-io=on`
//! (requests move one block at a time), and odds drawn from the seed:
//! `read-error-ppm`, `write-error-ppm`, `misdirect-ppm`, `slow-ppm` with `slow-by=DURATION`.

use std::ops::Range;
use std::sync::Arc;

use std::collections::BTreeMap;
use std::sync::Mutex;

use kcopyd_sim::{FaultPlan, Latency, Medium, MemDisk, MemDiskOptions, Misdirect, SlowSpike, WriteFault};
use thiserror::Error;

use crate::size::{self, SECTOR_BYTES, SizeError};

/// The prefix of a simulated device.
pub const PREFIX: &str = "sim:";
/// The largest dense simulated disk: it holds its bytes in memory.
pub const SIM_LEN_BYTES_MAX: u64 = 16 << 30;
/// The largest sparse simulated disk: it holds runs of content, not bytes.
pub const SIM_SPARSE_LEN_BYTES_MAX: u64 = 1 << 50;
/// The keys a `sim:` device takes, for messages.
pub const KEYS: &str = "size, seed, block, sparse, headers-only, latency, write-latency, bandwidth, write-bandwidth, \
                        queue, jitter, shared-path, path-overhead, write-path-overhead, seek, rpm, medium, link-rtt, \
                        link-bandwidth, bad-read, bad-write, flaky-write, fail-after, fail-at, misdirect, slow, short-io, \
                        read-error-ppm, write-error-ppm, misdirect-ppm, slow-ppm, slow-by";
/// The longest delay `slow` and `slow-by` take: a simulated request must not outlast the
/// user's patience (a sleeping request is not interrupted by Ctrl-C).
pub const SLOW_MAX_US: u64 = 3_600_000_000;
/// The keys that may be given more than once (their lists add up).
const REPEATABLE: [&str; 5] = ["bad-read", "bad-write", "flaky-write", "misdirect", "slow"];

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
    /// `headers-only`: fill and check only the provenance header of each pattern sector
    /// (see [`MemDiskOptions::headers_only`]).
    pub headers_only: bool,
    /// The timing of reads and writes.
    pub latency: Latency,
    /// `medium`: disks of the command with the same name share one data path.
    pub medium: Option<String>,
    /// Every fault key: `bad-read` are the latent sectors, `bad-write` and `flaky-write` the
    /// write faults (every attempt, or the first), and so on.
    pub faults: FaultPlan,
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
            headers_only: false,
            latency: Latency::default(),
            medium: None,
            faults: FaultPlan::default(),
        };
        let mut seen: Vec<&str> = Vec::new();
        let (mut write_cost, mut write_bandwidth, mut write_overhead) = (None, None, None);
        for option in options.split(',').filter(|o| !o.trim().is_empty()) {
            let Some((key, value)) = option.split_once('=') else {
                return Err(SimError::NotKeyValue { option: option.to_owned() });
            };
            let key = key.trim();
            let value = value.trim();
            if !REPEATABLE.contains(&key) && seen.contains(&key) {
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
                "sparse" => spec.sparse = on_off("sparse", value)?,
                "headers-only" => spec.headers_only = on_off("headers-only", value)?,
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
                "shared-path" => spec.latency.path.shared = on_off("shared-path", value)?,
                "path-overhead" => {
                    let us = sized("path-overhead", size::parse_duration_us(value))?;
                    spec.latency.path.read_overhead_us = us;
                    spec.latency.path.write_overhead_us = us;
                }
                "write-path-overhead" => {
                    write_overhead = Some(sized("write-path-overhead", size::parse_duration_us(value))?);
                }
                "seek" => {
                    let (track, full) = value.split_once(':').ok_or_else(|| SimError::Invalid {
                        key: "seek",
                        problem: format!("'{value}' is not TRACK:FULL (two durations, e.g. 1ms:9ms)"),
                    })?;
                    let seek = &mut spec.latency.path.seek;
                    seek.track_us = sized("seek", size::parse_duration_us(track.trim()))?;
                    seek.full_stroke_us = sized("seek", size::parse_duration_us(full.trim()))?;
                    if seek.full_stroke_us < seek.track_us {
                        return Err(SimError::Invalid {
                            key: "seek",
                            problem: format!("the full stroke '{full}' is shorter than the track seek '{track}'"),
                        });
                    }
                }
                "rpm" => {
                    let rpm = whole("rpm", value, "revolutions per minute")?;
                    if rpm == 0 {
                        return Err(SimError::Invalid { key: "rpm", problem: "0 revolutions per minute".into() });
                    }
                    spec.latency.path.seek.rotation_us = 60_000_000 / rpm;
                }
                "link-rtt" => spec.latency.link.round_trip_us = sized("link-rtt", size::parse_duration_us(value))?,
                "link-bandwidth" => {
                    spec.latency.link.bandwidth_bytes_per_s = sized("link-bandwidth", size::parse_rate(value))?;
                }
                "medium" => {
                    if value.is_empty() {
                        return Err(SimError::Invalid { key: "medium", problem: "an empty name".into() });
                    }
                    spec.medium = Some(value.to_owned());
                }
                "bad-read" => spec.faults.latent_sectors.extend(parse_ranges("bad-read", value)?),
                "bad-write" | "flaky-write" => {
                    let (key, attempts) = if key == "bad-write" { ("bad-write", 0) } else { ("flaky-write", 1) };
                    let ranges = parse_ranges(key, value)?;
                    spec.faults.write_faults.extend(ranges.into_iter().map(|sectors| WriteFault { sectors, attempts }));
                }
                "fail-after" => spec.faults.fail_after_ios = Some(whole("fail-after", value, "a request count")?),
                "fail-at" => spec.faults.fail_at_us = Some(sized("fail-at", size::parse_duration_us(value))?),
                "misdirect" => {
                    for (index, shift) in parse_pairs("misdirect", value, "W:SHIFT (write number, sectors)")? {
                        let shift_sectors =
                            shift.parse().ok().filter(|&s: &i64| s != 0).ok_or_else(|| SimError::Invalid {
                                key: "misdirect",
                                problem: format!("shift '{shift}' is not a non-zero whole number of sectors"),
                            })?;
                        if spec.faults.misdirects.iter().any(|m| m.write_index == index) {
                            return Err(SimError::Invalid {
                                key: "misdirect",
                                problem: format!("write {index} is sent astray twice"),
                            });
                        }
                        spec.faults.misdirects.push(Misdirect { write_index: index, shift_sectors });
                    }
                }
                "slow" => {
                    for (index, delay) in parse_pairs("slow", value, "I:DURATION (request number, delay)")? {
                        let extra_us = slow_delay("slow", &delay)?;
                        spec.faults.slow_spikes.push(SlowSpike { io_index: index, extra_us });
                    }
                }
                "short-io" => spec.faults.short_io = on_off("short-io", value)?,
                "read-error-ppm" => spec.faults.odds.read_error_ppm = ppm("read-error-ppm", value)?,
                "write-error-ppm" => spec.faults.odds.write_error_ppm = ppm("write-error-ppm", value)?,
                "misdirect-ppm" => spec.faults.odds.misdirect_ppm = ppm("misdirect-ppm", value)?,
                "slow-ppm" => spec.faults.odds.slow_ppm = ppm("slow-ppm", value)?,
                "slow-by" => spec.faults.odds.slow_us = slow_delay("slow-by", value)?,
                _ => return Err(SimError::UnknownKey { key: key.to_owned() }),
            }
        }
        if let Some(us) = write_cost {
            spec.latency.write.cost_us = us;
        }
        if let Some(rate) = write_bandwidth {
            spec.latency.write.bandwidth_bytes_per_s = rate;
        }
        if let Some(us) = write_overhead {
            spec.latency.path.write_overhead_us = us;
        }
        if spec.faults.odds.slow_ppm > 0 && spec.faults.odds.slow_us == 0 {
            return Err(SimError::Invalid { key: "slow-ppm", problem: "needs slow-by=DURATION, the delay".into() });
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
        let writes = self
            .faults
            .write_faults
            .iter()
            .map(|f| (if f.attempts == 0 { "bad-write" } else { "flaky-write" }, &f.sectors));
        for (key, range) in self.faults.latent_sectors.iter().map(|r| ("bad-read", r)).chain(writes) {
            if range.end > len_sectors {
                return Err(SimError::Invalid {
                    key,
                    problem: format!(
                        "sectors {}-{} lie past the end of the {len_sectors}-sector disk",
                        range.start, range.end
                    ),
                });
            }
        }
        let block_sectors = i64::from(self.block_bytes) / SECTOR_BYTES as i64;
        for misdirect in &self.faults.misdirects {
            let shift = misdirect.shift_sectors;
            if shift % block_sectors != 0 || shift.unsigned_abs() >= len_sectors {
                return Err(SimError::Invalid {
                    key: "misdirect",
                    problem: format!(
                        "shift {shift}: must be a whole number of {block_sectors}-sector blocks, shorter than the \
                         {len_sectors}-sector disk"
                    ),
                });
            }
        }
        Ok(())
    }

    /// Builds the disk with `len_bytes` (checked with [`SimSpec::check_len`]), filled and
    /// with its faults in place.
    pub fn build(&self, len_bytes: u64) -> Arc<MemDisk> {
        let options = MemDiskOptions {
            name: self.text.clone(),
            seed: self.seed.unwrap_or(0),
            len_sectors: len_bytes / SECTOR_BYTES,
            logical_block_size: self.block_bytes,
            sparse: self.sparse,
            headers_only: self.headers_only,
            latency: Latency { seed: self.seed.unwrap_or(0), ..self.latency.clone() },
            faults: self.faults.clone(),
            ..MemDiskOptions::default()
        };
        let disk = Arc::new(match &self.medium {
            Some(name) => MemDisk::on_medium(options, &medium(name)),
            None => MemDisk::new(options),
        });
        if let Some(seed) = self.seed {
            // Filling bypasses faults: the latent sectors stay latent.
            disk.fill_pattern(seed);
        }
        disk
    }
}

/// The medium called `name` in this process: one command's disks that name it share it.
fn medium(name: &str) -> Medium {
    static MEDIA: Mutex<BTreeMap<String, Medium>> = Mutex::new(BTreeMap::new());
    let mut media = MEDIA.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    media.entry(name.to_owned()).or_default().clone()
}

fn sized(key: &'static str, result: Result<u64, SizeError>) -> Result<u64, SimError> {
    result.map_err(|source| SimError::Value { key, source })
}

/// Reads a delay of at most [`SLOW_MAX_US`].
fn slow_delay(key: &'static str, value: &str) -> Result<u64, SimError> {
    let us = sized(key, size::parse_duration_us(value))?;
    if us > SLOW_MAX_US {
        return Err(SimError::Invalid {
            key,
            problem: format!("'{value}' is longer than the 1 hour a delay may last"),
        });
    }
    Ok(us)
}

/// Reads a whole number.
fn whole(key: &'static str, value: &str, what: &str) -> Result<u64, SimError> {
    value.parse().map_err(|_| SimError::Invalid { key, problem: format!("'{value}' is not {what} (a whole number)") })
}

/// Reads parts per million, 0 to 1000000.
fn ppm(key: &'static str, value: &str) -> Result<u32, SimError> {
    value.parse().ok().filter(|&n| n <= 1_000_000).ok_or_else(|| SimError::Invalid {
        key,
        problem: format!("'{value}' is not a count of parts per million from 0 to 1000000"),
    })
}

/// Reads `on` or `off`.
fn on_off(key: &'static str, value: &str) -> Result<bool, SimError> {
    match value {
        "on" | "yes" | "true" | "1" => Ok(true),
        "off" | "no" | "false" | "0" => Ok(false),
        _ => Err(SimError::Invalid { key, problem: format!("'{value}' is not on or off") }),
    }
}

/// Reads `N:VALUE+N:VALUE+...` into request numbers and the text after each colon.
fn parse_pairs(key: &'static str, value: &str, form: &str) -> Result<Vec<(u64, String)>, SimError> {
    value
        .split('+')
        .map(|piece| {
            let (index, rest) = piece
                .split_once(':')
                .ok_or_else(|| SimError::Invalid { key, problem: format!("'{piece}' is not {form}") })?;
            Ok((whole(key, index.trim(), "a request number")?, rest.trim().to_owned()))
        })
        .collect()
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
                    // u64::MAX itself has no end sector: no disk reaches it.
                    let end = sector.checked_add(1).ok_or_else(|| {
                        invalid(format!("sector {sector} is out of range: sectors go up to {}", u64::MAX - 1))
                    })?;
                    sector..end
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
             bad-read=8-16+100,bad-read=200-208,bad-write=64-72,headers-only=on",
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
        assert_eq!(spec.faults.latent_sectors, vec![8..16, 100..101, 200..208]);
        assert_eq!(spec.faults.write_faults, vec![WriteFault { sectors: 64..72, attempts: 0 }]);
        let disk = spec.build(1 << 20);
        assert_eq!(disk.options().logical_block_size, 4096);
        assert_eq!(disk.options().len_sectors, 2048);
        assert!(disk.options().headers_only);
        assert_ne!(disk.snapshot(0, 1), vec![0; 512], "filled with the seed's pattern");
    }

    #[test]
    fn path_keys_land_in_the_path_model() {
        let spec =
            SimSpec::parse("shared-path=on,path-overhead=20us,write-path-overhead=30us,seek=1ms:9ms,rpm=7200,medium=a")
                .unwrap();
        let path = spec.latency.path;
        assert!(path.shared);
        assert_eq!((path.read_overhead_us, path.write_overhead_us), (20, 30));
        assert_eq!(path.seek, kcopyd_sim::SeekModel { track_us: 1000, full_stroke_us: 9000, rotation_us: 8333 });
        assert_eq!(spec.medium.as_deref(), Some("a"));
        let remote = SimSpec::parse("link-rtt=200us,link-bandwidth=100M").unwrap();
        assert_eq!(remote.latency.link, kcopyd_sim::LinkModel { round_trip_us: 200, bandwidth_bytes_per_s: 100 << 20 });
        assert_eq!(SimSpec::parse("").unwrap().latency.path, kcopyd_sim::PathModel::default());
    }

    #[test]
    fn disks_naming_one_medium_share_its_data_path() {
        use kcopyd_core::{BlockDevice, WriteBuf};
        // Two disks at 4 KiB/s, a 4 KiB write to each at once: apart both end after 1 s; on
        // one medium the second ends after 2 s.
        let ends = |first: &str, second: &str| {
            let (a, b) =
                (SimSpec::parse(first).unwrap().build(1 << 20), SimSpec::parse(second).unwrap().build(1 << 20));
            kcopyd_sim::Simulation::block_on(async move {
                let began = tokio::time::Instant::now();
                let write = |disk: Arc<MemDisk>| async move {
                    disk.write(0, WriteBuf::zeroes(4096)).await.unwrap();
                    kcopyd_sim::to_model(began.elapsed()).as_micros()
                };
                futures_util::future::join(write(a), write(b)).await
            })
        };
        assert_eq!(ends("bandwidth=4K", "bandwidth=4K"), (1_000_000, 1_000_000));
        assert_eq!(ends("bandwidth=4K,medium=m1", "bandwidth=4K,medium=m1"), (1_000_000, 2_000_000));
        assert_eq!(ends("bandwidth=4K,medium=m2", "bandwidth=4K,medium=m3"), (1_000_000, 1_000_000));
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
            ("shared-path=2", "'shared-path'"),
            ("path-overhead=5", "'path-overhead'"),
            ("seek=1ms", "'seek'"),
            ("seek=9ms:1ms", "'seek'"),
            ("rpm=0", "'rpm'"),
            ("medium=", "'medium'"),
            ("link-rtt=5", "'link-rtt'"),
            ("link-bandwidth=fast", "'link-bandwidth'"),
            ("headers-only=maybe", "'headers-only'"),
            ("flaky-write=5-5", "'flaky-write'"),
            ("size=1M,flaky-write=2040-2050", "'flaky-write'"),
            ("size=1M,bad-write=1-2,flaky-write=2040-2050", "'flaky-write'"),
            ("size=1M,misdirect=1:2048", "'misdirect'"),
            ("size=1M,misdirect=1:-4096", "'misdirect'"),
            ("size=1M,block=4096,misdirect=1:1", "'misdirect'"),
            ("misdirect=1:8+1:16", "'misdirect'"),
            ("slow=0:7200s", "longer than the 1 hour"),
            ("slow-by=5400s", "longer than the 1 hour"),
            ("fail-after=soon", "'fail-after'"),
            ("fail-at=3", "'fail-at'"),
            ("misdirect=3", "'misdirect'"),
            ("misdirect=3:0", "'misdirect'"),
            ("misdirect=x:8", "'misdirect'"),
            ("slow=2:fast", "'slow'"),
            ("short-io=sometimes", "'short-io'"),
            ("read-error-ppm=2000000", "'read-error-ppm'"),
            ("slow-ppm=10", "'slow-ppm'"),
            ("fail-after=1,fail-after=2", "'fail-after'"),
            ("latency=10h", "us, ms or s"),
            ("slow=0:2h", "us, ms or s"),
            ("bad-read=18446744073709551615", "out of range"),
        ];
        for (text, key) in cases {
            let message = SimSpec::parse(text).unwrap_err().to_string();
            assert!(message.contains(key), "{text}: {message}");
        }
    }

    #[test]
    fn fault_keys_build_the_fault_plan() {
        let spec = SimSpec::parse(
            "size=1M,seed=3,flaky-write=10-20,fail-after=500,fail-at=2s,misdirect=3:16+7:-8,misdirect=9:1,\
             slow=0:5ms+4:1s,short-io=on,read-error-ppm=10,write-error-ppm=20,misdirect-ppm=30,slow-ppm=40,\
             slow-by=3ms",
        )
        .unwrap();
        let plan = &spec.faults;
        assert_eq!(plan.write_faults, vec![WriteFault { sectors: 10..20, attempts: 1 }]);
        assert_eq!((plan.fail_after_ios, plan.fail_at_us), (Some(500), Some(2_000_000)));
        assert_eq!(
            plan.misdirects,
            [(3, 16), (7, -8), (9, 1)].map(|(w, s)| Misdirect { write_index: w, shift_sectors: s }).to_vec()
        );
        assert_eq!(
            plan.slow_spikes,
            [(0, 5000), (4, 1_000_000)].map(|(i, us)| SlowSpike { io_index: i, extra_us: us }).to_vec()
        );
        assert!(plan.short_io);
        let odds = &plan.odds;
        assert_eq!(
            (odds.read_error_ppm, odds.write_error_ppm, odds.misdirect_ppm, odds.slow_ppm, odds.slow_us),
            (10, 20, 30, 40, 3000)
        );
        assert_eq!(&spec.build(1 << 20).options().faults, plan, "the disk gets the whole plan");
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
