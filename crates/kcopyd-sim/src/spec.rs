//! `sim:KEY=VALUE,...`: a simulated disk as one line of text, so that every command (and every
//! program embedding the simulator) can name a disk without a disk.
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
//! Every key is one row of [`KEYS`]: its name, what it says ([`Key::doc`]), how its value
//! reads ([`Key::parse`]: a size, a duration, a rate, on/off, sector ranges, ...) and where the
//! value lands ([`Key::set`]). [`SimSpec::parse`] splits the options and looks each key up:
//!
//! ```text
//!  "latency=100us" ─split─► ("latency", "100us") ─KEYS─► parse: duration ─► Value::Us(100)
//!                                                        set: read.cost_us = write.cost_us = 100
//!  after every option: write-side overrides, slow-ppm needs slow-by, size against the faults
//! ```
//!
//! `headers-only=on` makes the disk fill and check only the 40-byte provenance header of each
//! pattern sector, not its body: large simulated copies run several times faster and are still
//! verified by provenance.
//!
//! Keys apply to reads and writes alike; `write-latency`, `write-bandwidth` override the
//! write side. How requests share the data path: `shared-path=on` (reads and writes take turns
//! on one path), `path-overhead=DURATION` (each request holds the path that long besides its
//! transfer; `write-path-overhead` for writes), `seek=TRACK:FULL` with `rpm=N` (a spinning
//! disk: a request away from the previous one seeks, `TRACK` for the shortest distance up to
//! `FULL` across the disk, then waits half a revolution), `medium=NAME` (every disk of the
//! process with that name moves its bytes over one data path: files on one device). A remote
//! disk: `link-rtt=DURATION` (round trip of a network link in front of it) and
//! `link-bandwidth=RATE` (the link's payload rate each way), `link-burst=SIZE` (bytes that
//! cross at once after the link was idle: a token bucket's capacity). Fault ranges are in 512-byte
//! sectors, half-open (`START-END`, or one sector `N`), joined with `+`; a fault key may also
//! be repeated.
//!
//! Faults beyond bad sectors: `flaky-write=RANGES` (fails once, then works), `fail-after=N`
//! (the whole device fails once N requests have been served), `fail-at=2s` (from that long
//! after the disk was made), `misdirect=W:SHIFT+...` (write number W lands SHIFT sectors away
//! and reports success), `slow=I:DURATION+...` (request number I takes that much longer),
//! `short-io=on` (requests move one block at a time), and odds drawn from the seed:
//! `read-error-ppm`, `write-error-ppm`, `misdirect-ppm`, `slow-ppm` with `slow-by=DURATION`.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use thiserror::Error;

use crate::units::{self, Bytes, SECTOR_BYTES, SizeError};
use crate::{FaultPlan, Latency, Medium, MemDisk, MemDiskOptions, Misdirect, SlowSpike, WriteFault};

/// The prefix of a simulated device.
pub const PREFIX: &str = "sim:";
/// The largest dense simulated disk: it holds its bytes in memory.
pub const SIM_LEN_BYTES_MAX: u64 = 16 << 30;
/// The largest sparse simulated disk: it holds runs of content, not bytes.
pub const SIM_SPARSE_LEN_BYTES_MAX: u64 = 1 << 50;
/// The longest delay `slow` and `slow-by` take: a simulated request must not outlast the
/// user's patience (a sleeping request is not interrupted by Ctrl-C).
pub const SLOW_MAX_US: u64 = 3_600_000_000;
/// The smallest and largest logical block, in bytes.
const BLOCK_BYTES_RANGE: std::ops::RangeInclusive<u64> = 512..=65536;

/// Why a `sim:` device could not be read or built. Each names the key at fault.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum SpecError {
    /// An option without `=`.
    #[error("sim option '{option}' is not KEY=VALUE (keys: {})", key_names())]
    NotKeyValue {
        /// The option as given.
        option: String,
    },
    /// A key that is not known.
    #[error("unknown sim key '{key}' (keys: {})", key_names())]
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
    /// A value that does not read as its unit.
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
    /// The text, `sim:` included, for messages and the disk's name.
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
    /// `medium`: disks of the process with the same name share one data path.
    pub medium: Option<String>,
    /// Every fault key: `bad-read` are the latent sectors, `bad-write` and `flaky-write` the
    /// write faults (every attempt, or the first), and so on.
    pub faults: FaultPlan,
}

/// A value as a key's parser read it, before its setter puts it in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// A byte count (`size`, `block`).
    Bytes(u64),
    /// A duration in microseconds.
    Us(u64),
    /// A rate in bytes per second.
    Rate(u64),
    /// A whole number (a seed, a count, a queue depth).
    Whole(u64),
    /// Parts per million, 0 to 1 000 000.
    Ppm(u32),
    /// `on` or `off`.
    Flag(bool),
    /// Two durations in microseconds (`seek=TRACK:FULL`).
    UsPair(u64, u64),
    /// Half-open sector ranges.
    Ranges(Vec<Range<u64>>),
    /// Request numbers with a whole number each (`misdirect`: write number and shift).
    Shifts(Vec<(u64, i64)>),
    /// Request numbers with a delay in microseconds each (`slow`).
    Delays(Vec<(u64, u64)>),
    /// A name.
    Name(String),
}

/// A spec being read: the spec, and the write-side overrides applied after every option (so
/// that `write-latency=2ms,latency=100us` means writes cost 2 ms, whatever the order).
#[derive(Debug)]
pub struct Draft {
    spec: SimSpec,
    write_cost_us: Option<u64>,
    write_bandwidth_bytes_per_s: Option<u64>,
    write_overhead_us: Option<u64>,
}

/// Reads a key's value; the key is passed for messages.
pub type Parser = fn(&'static str, &str) -> Result<Value, SpecError>;
/// Puts a key's value in place (and checks it against what is already there).
pub type Setter = fn(&mut Draft, Value) -> Result<(), SpecError>;

/// One key of a `sim:` device.
#[derive(Debug, Clone, Copy)]
pub struct Key {
    /// The key as typed.
    pub name: &'static str,
    /// What the key does, for people.
    pub doc: &'static str,
    /// Whether the key may be given more than once (its lists add up).
    pub repeatable: bool,
    /// How the value reads.
    pub parse: Parser,
    /// Where the value lands.
    pub set: Setter,
}

/// A non-repeatable key.
const fn key(name: &'static str, doc: &'static str, parse: Parser, set: Setter) -> Key {
    Key { name, doc, repeatable: false, parse, set }
}

/// A key that may be given more than once.
const fn list(name: &'static str, doc: &'static str, parse: Parser, set: Setter) -> Key {
    Key { name, doc, repeatable: true, parse, set }
}

/// Every key of a `sim:` device, in the order messages list them.
pub const KEYS: &[Key] = &[
    key("size", "length in bytes (absent: a target takes the length it needs)", parse_bytes, |d, v| {
        d.spec.len_bytes = Some(v.bytes());
        Ok(())
    }),
    key("seed", "fill with the pattern of this seed (absent: zeroes)", parse_seed, |d, v| {
        d.spec.seed = Some(v.whole());
        Ok(())
    }),
    key("block", "logical block size in bytes, a power of two from 512 to 65536", parse_block, |d, v| {
        d.spec.block_bytes = u32::try_from(v.bytes()).expect("checked by parse_block");
        Ok(())
    }),
    key("sparse", "keep runs of content, not bytes (large disks in little memory)", parse_flag, |d, v| {
        d.spec.sparse = v.flag();
        Ok(())
    }),
    key("headers-only", "fill and check only the provenance header of each sector", parse_flag, |d, v| {
        d.spec.headers_only = v.flag();
        Ok(())
    }),
    key("latency", "fixed cost of every request", parse_us, |d, v| {
        let us = v.us();
        (d.spec.latency.read.cost_us, d.spec.latency.write.cost_us) = (us, us);
        Ok(())
    }),
    key("write-latency", "fixed cost of every write (overrides latency)", parse_us, |d, v| {
        d.write_cost_us = Some(v.us());
        Ok(())
    }),
    key("bandwidth", "bytes per second of the data path", parse_rate, |d, v| {
        let rate = v.rate();
        (d.spec.latency.read.bandwidth_bytes_per_s, d.spec.latency.write.bandwidth_bytes_per_s) = (rate, rate);
        Ok(())
    }),
    key("write-bandwidth", "bytes per second of writes (overrides bandwidth)", parse_rate, |d, v| {
        d.write_bandwidth_bytes_per_s = Some(v.rate());
        Ok(())
    }),
    key("queue", "requests served at once (0 = unlimited)", parse_queue, |d, v| {
        let depth = u32::try_from(v.whole()).expect("checked by parse_queue");
        (d.spec.latency.read.queue_depth, d.spec.latency.write.queue_depth) = (depth, depth);
        Ok(())
    }),
    key("jitter", "seeded extra time of each request, up to this", parse_us, |d, v| {
        let us = v.us();
        (d.spec.latency.read.jitter_us, d.spec.latency.write.jitter_us) = (us, us);
        Ok(())
    }),
    key("shared-path", "reads and writes take turns on one data path", parse_flag, |d, v| {
        d.spec.latency.path.shared = v.flag();
        Ok(())
    }),
    key("path-overhead", "each request holds the data path this long besides its transfer", parse_us, |d, v| {
        let us = v.us();
        (d.spec.latency.path.read_overhead_us, d.spec.latency.path.write_overhead_us) = (us, us);
        Ok(())
    }),
    key("write-path-overhead", "path overhead of writes (overrides path-overhead)", parse_us, |d, v| {
        d.write_overhead_us = Some(v.us());
        Ok(())
    }),
    key("seek", "TRACK:FULL, the shortest and the longest seek of a spinning disk", parse_seek, |d, v| {
        let Value::UsPair(track_us, full_stroke_us) = v else { unreachable!("parse_seek gives a pair") };
        let seek = &mut d.spec.latency.path.seek;
        (seek.track_us, seek.full_stroke_us) = (track_us, full_stroke_us);
        Ok(())
    }),
    key("rpm", "revolutions per minute of a spinning disk (half a revolution after a seek)", parse_rpm, |d, v| {
        d.spec.latency.path.seek.rotation_us = 60_000_000 / v.whole();
        Ok(())
    }),
    key("medium", "disks of the process naming one medium share one data path", parse_name, |d, v| {
        let Value::Name(name) = v else { unreachable!("parse_name gives a name") };
        d.spec.medium = Some(name);
        Ok(())
    }),
    key("link-rtt", "round trip of a network link in front of the disk", parse_us, |d, v| {
        d.spec.latency.link.round_trip_us = v.us();
        Ok(())
    }),
    key("link-bandwidth", "payload rate of that link, each way", parse_rate, |d, v| {
        d.spec.latency.link.bandwidth_bytes_per_s = v.rate();
        Ok(())
    }),
    key("link-burst", "bytes that cross that link at once after it was idle (a token bucket)", parse_bytes, |d, v| {
        d.spec.latency.link.burst_bytes = v.bytes();
        Ok(())
    }),
    list("bad-read", "latent sectors: reads fail until a write clears them", parse_ranges, |d, v| {
        d.spec.faults.latent_sectors.extend(v.ranges());
        Ok(())
    }),
    list("bad-write", "sectors whose every write fails", parse_ranges, |d, v| {
        d.spec.faults.write_faults.extend(v.ranges().into_iter().map(|sectors| WriteFault { sectors, attempts: 0 }));
        Ok(())
    }),
    list("flaky-write", "sectors whose first write fails, then works", parse_ranges, |d, v| {
        d.spec.faults.write_faults.extend(v.ranges().into_iter().map(|sectors| WriteFault { sectors, attempts: 1 }));
        Ok(())
    }),
    key("fail-after", "the whole device fails once this many requests were served", parse_count, |d, v| {
        d.spec.faults.fail_after_ios = Some(v.whole());
        Ok(())
    }),
    key("fail-at", "the whole device fails this long after it was made", parse_us, |d, v| {
        d.spec.faults.fail_at_us = Some(v.us());
        Ok(())
    }),
    list("misdirect", "W:SHIFT+...: write number W lands SHIFT sectors away", parse_shifts, set_misdirects),
    list("slow", "I:DURATION+...: request number I takes that much longer", parse_delays, |d, v| {
        let Value::Delays(delays) = v else { unreachable!("parse_delays gives delays") };
        let spikes = delays.into_iter().map(|(io_index, extra_us)| SlowSpike { io_index, extra_us });
        d.spec.faults.slow_spikes.extend(spikes);
        Ok(())
    }),
    key("short-io", "requests move one block at a time", parse_flag, |d, v| {
        d.spec.faults.short_io = v.flag();
        Ok(())
    }),
    key("read-error-ppm", "odds of a read error, per million reads", parse_ppm, |d, v| {
        d.spec.faults.odds.read_error_ppm = v.ppm();
        Ok(())
    }),
    key("write-error-ppm", "odds of a write error, per million writes", parse_ppm, |d, v| {
        d.spec.faults.odds.write_error_ppm = v.ppm();
        Ok(())
    }),
    key("misdirect-ppm", "odds of a misdirected write, per million writes", parse_ppm, |d, v| {
        d.spec.faults.odds.misdirect_ppm = v.ppm();
        Ok(())
    }),
    key("slow-ppm", "odds of a slow request, per million (needs slow-by)", parse_ppm, |d, v| {
        d.spec.faults.odds.slow_ppm = v.ppm();
        Ok(())
    }),
    key("slow-by", "how much longer a slow request of slow-ppm takes", parse_slow_delay, |d, v| {
        d.spec.faults.odds.slow_us = v.us();
        Ok(())
    }),
];

/// The names of [`KEYS`], joined with `, ` (for messages).
pub fn key_names() -> String {
    KEYS.iter().map(|k| k.name).collect::<Vec<_>>().join(", ")
}

/// The key called `name`.
pub fn find_key(name: &str) -> Option<&'static Key> {
    KEYS.iter().find(|k| k.name == name)
}

impl Value {
    fn bytes(self) -> u64 {
        let Value::Bytes(bytes) = self else { unreachable!("a byte count, not {self:?}") };
        bytes
    }
    fn us(self) -> u64 {
        let Value::Us(us) = self else { unreachable!("a duration, not {self:?}") };
        us
    }
    fn rate(self) -> u64 {
        let Value::Rate(rate) = self else { unreachable!("a rate, not {self:?}") };
        rate
    }
    fn whole(self) -> u64 {
        let Value::Whole(n) = self else { unreachable!("a whole number, not {self:?}") };
        n
    }
    fn ppm(self) -> u32 {
        let Value::Ppm(ppm) = self else { unreachable!("parts per million, not {self:?}") };
        ppm
    }
    fn flag(self) -> bool {
        let Value::Flag(on) = self else { unreachable!("on or off, not {self:?}") };
        on
    }
    fn ranges(self) -> Vec<Range<u64>> {
        let Value::Ranges(ranges) = self else { unreachable!("sector ranges, not {self:?}") };
        ranges
    }
}

impl SimSpec {
    /// Reads the options after `sim:`.
    ///
    /// # Errors
    /// A malformed option, an unknown or repeated key, or a value out of bounds.
    pub fn parse(options: &str) -> Result<SimSpec, SpecError> {
        let mut draft = Draft {
            spec: SimSpec {
                text: format!("{PREFIX}{options}"),
                len_bytes: None,
                seed: None,
                block_bytes: 512,
                sparse: false,
                headers_only: false,
                latency: Latency::default(),
                medium: None,
                faults: FaultPlan::default(),
            },
            write_cost_us: None,
            write_bandwidth_bytes_per_s: None,
            write_overhead_us: None,
        };
        let mut seen: Vec<&str> = Vec::new();
        for option in options.split(',').filter(|o| !o.trim().is_empty()) {
            let Some((name, text)) = option.split_once('=') else {
                return Err(SpecError::NotKeyValue { option: option.to_owned() });
            };
            let (name, text) = (name.trim(), text.trim());
            let key = find_key(name);
            if !key.is_some_and(|k| k.repeatable) && seen.contains(&name) {
                return Err(SpecError::Repeated { key: name.to_owned() });
            }
            seen.push(name);
            let key = key.ok_or_else(|| SpecError::UnknownKey { key: name.to_owned() })?;
            let value = (key.parse)(key.name, text)?;
            (key.set)(&mut draft, value)?;
        }
        draft.finish()
    }

    /// Checks a length against the block size, the memory cap and the fault ranges.
    ///
    /// # Errors
    /// The length is not a whole number of blocks, too large, or a fault lies past it.
    pub fn check_len(&self, len_bytes: u64) -> Result<(), SpecError> {
        if len_bytes % u64::from(self.block_bytes) != 0 {
            return Err(SpecError::Invalid {
                key: "size",
                problem: format!("{len_bytes} bytes is not a whole number of {}-byte blocks", self.block_bytes),
            });
        }
        let len_bytes_max = if self.sparse { SIM_SPARSE_LEN_BYTES_MAX } else { SIM_LEN_BYTES_MAX };
        if len_bytes > len_bytes_max {
            return Err(SpecError::Invalid {
                key: "size",
                problem: format!(
                    "{} is more than the {} a {} simulated disk may hold{}",
                    Bytes(len_bytes),
                    Bytes(len_bytes_max),
                    if self.sparse { "sparse" } else { "dense" },
                    if self.sparse { "" } else { " in memory (sparse=on holds more)" }
                ),
            });
        }
        self.check_faults_fit(len_bytes / SECTOR_BYTES)
    }

    /// Checks that every fault range lies on a disk of `len_sectors`, and every misdirect
    /// shift is whole blocks shorter than it.
    fn check_faults_fit(&self, len_sectors: u64) -> Result<(), SpecError> {
        let writes = self
            .faults
            .write_faults
            .iter()
            .map(|f| (if f.attempts == 0 { "bad-write" } else { "flaky-write" }, &f.sectors));
        for (key, range) in self.faults.latent_sectors.iter().map(|r| ("bad-read", r)).chain(writes) {
            if range.end > len_sectors {
                return Err(SpecError::Invalid {
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
                return Err(SpecError::Invalid {
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

impl Draft {
    /// Applies the write-side overrides and the checks between keys.
    fn finish(self) -> Result<SimSpec, SpecError> {
        let Draft { mut spec, write_cost_us, write_bandwidth_bytes_per_s, write_overhead_us } = self;
        if let Some(us) = write_cost_us {
            spec.latency.write.cost_us = us;
        }
        if let Some(rate) = write_bandwidth_bytes_per_s {
            spec.latency.write.bandwidth_bytes_per_s = rate;
        }
        if let Some(us) = write_overhead_us {
            spec.latency.path.write_overhead_us = us;
        }
        if spec.faults.odds.slow_ppm > 0 && spec.faults.odds.slow_us == 0 {
            return Err(SpecError::Invalid { key: "slow-ppm", problem: "needs slow-by=DURATION, the delay".into() });
        }
        if let Some(len_bytes) = spec.len_bytes {
            spec.check_len(len_bytes)?;
        }
        Ok(spec)
    }
}

/// The medium called `name` in this process: the disks that name it share it.
fn medium(name: &str) -> Medium {
    static MEDIA: Mutex<BTreeMap<String, Medium>> = Mutex::new(BTreeMap::new());
    let mut media = MEDIA.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    media.entry(name.to_owned()).or_default().clone()
}

/// `misdirect`'s setter: a write is sent astray once at most.
fn set_misdirects(draft: &mut Draft, value: Value) -> Result<(), SpecError> {
    let Value::Shifts(shifts) = value else { unreachable!("parse_shifts gives shifts") };
    for (write_index, shift_sectors) in shifts {
        if draft.spec.faults.misdirects.iter().any(|m| m.write_index == write_index) {
            return Err(SpecError::Invalid {
                key: "misdirect",
                problem: format!("write {write_index} is sent astray twice"),
            });
        }
        draft.spec.faults.misdirects.push(Misdirect { write_index, shift_sectors });
    }
    Ok(())
}

// ---- parsers ---------------------------------------------------------------------------------

fn unit(key: &'static str, result: Result<u64, SizeError>) -> Result<u64, SpecError> {
    result.map_err(|source| SpecError::Value { key, source })
}

fn parse_bytes(key: &'static str, text: &str) -> Result<Value, SpecError> {
    unit(key, units::parse_size(text)).map(Value::Bytes)
}

fn parse_us(key: &'static str, text: &str) -> Result<Value, SpecError> {
    unit(key, units::parse_duration_us(text)).map(Value::Us)
}

fn parse_rate(key: &'static str, text: &str) -> Result<Value, SpecError> {
    unit(key, units::parse_rate(text)).map(Value::Rate)
}

fn parse_seed(key: &'static str, text: &str) -> Result<Value, SpecError> {
    text.parse().map(Value::Whole).map_err(|_| SpecError::Invalid {
        key,
        problem: format!("'{text}' is not a whole number from 0 to {}", u64::MAX),
    })
}

fn parse_block(key: &'static str, text: &str) -> Result<Value, SpecError> {
    let bytes = unit(key, units::parse_size(text))?;
    if !bytes.is_power_of_two() || !BLOCK_BYTES_RANGE.contains(&bytes) {
        return Err(SpecError::Invalid {
            key,
            problem: format!("{bytes} bytes: must be a power of two from 512 to 65536"),
        });
    }
    Ok(Value::Bytes(bytes))
}

fn parse_queue(key: &'static str, text: &str) -> Result<Value, SpecError> {
    let depth: u32 = text
        .parse()
        .map_err(|_| SpecError::Invalid { key, problem: format!("'{text}' is not a whole number (0 = unlimited)") })?;
    Ok(Value::Whole(u64::from(depth)))
}

fn parse_seek(key: &'static str, text: &str) -> Result<Value, SpecError> {
    let (track, full) = text.split_once(':').ok_or_else(|| SpecError::Invalid {
        key,
        problem: format!("'{text}' is not TRACK:FULL (two durations, e.g. 1ms:9ms)"),
    })?;
    let track_us = unit(key, units::parse_duration_us(track.trim()))?;
    let full_stroke_us = unit(key, units::parse_duration_us(full.trim()))?;
    if full_stroke_us < track_us {
        return Err(SpecError::Invalid {
            key,
            problem: format!("the full stroke '{full}' is shorter than the track seek '{track}'"),
        });
    }
    Ok(Value::UsPair(track_us, full_stroke_us))
}

fn parse_rpm(key: &'static str, text: &str) -> Result<Value, SpecError> {
    let rpm = whole(key, text, "revolutions per minute")?;
    if rpm == 0 {
        return Err(SpecError::Invalid { key, problem: "0 revolutions per minute".into() });
    }
    Ok(Value::Whole(rpm))
}

fn parse_name(key: &'static str, text: &str) -> Result<Value, SpecError> {
    if text.is_empty() {
        return Err(SpecError::Invalid { key, problem: "an empty name".into() });
    }
    Ok(Value::Name(text.to_owned()))
}

fn parse_count(key: &'static str, text: &str) -> Result<Value, SpecError> {
    whole(key, text, "a request count").map(Value::Whole)
}

fn parse_shifts(key: &'static str, text: &str) -> Result<Value, SpecError> {
    let shifts = parse_pairs(key, text, "W:SHIFT (write number, sectors)")?
        .into_iter()
        .map(|(index, shift)| {
            let shift_sectors = shift.parse().ok().filter(|&s: &i64| s != 0).ok_or_else(|| SpecError::Invalid {
                key,
                problem: format!("shift '{shift}' is not a non-zero whole number of sectors"),
            })?;
            Ok((index, shift_sectors))
        })
        .collect::<Result<_, SpecError>>()?;
    Ok(Value::Shifts(shifts))
}

fn parse_delays(key: &'static str, text: &str) -> Result<Value, SpecError> {
    let delays = parse_pairs(key, text, "I:DURATION (request number, delay)")?
        .into_iter()
        .map(|(index, delay)| Ok((index, slow_delay(key, &delay)?)))
        .collect::<Result<_, SpecError>>()?;
    Ok(Value::Delays(delays))
}

fn parse_slow_delay(key: &'static str, text: &str) -> Result<Value, SpecError> {
    slow_delay(key, text).map(Value::Us)
}

fn parse_ppm(key: &'static str, text: &str) -> Result<Value, SpecError> {
    text.parse().ok().filter(|&n| n <= 1_000_000).map(Value::Ppm).ok_or_else(|| SpecError::Invalid {
        key,
        problem: format!("'{text}' is not a count of parts per million from 0 to 1000000"),
    })
}

/// Reads `on` or `off` (or yes/no, true/false, 1/0).
fn parse_flag(key: &'static str, text: &str) -> Result<Value, SpecError> {
    match text {
        "on" | "yes" | "true" | "1" => Ok(Value::Flag(true)),
        "off" | "no" | "false" | "0" => Ok(Value::Flag(false)),
        _ => Err(SpecError::Invalid { key, problem: format!("'{text}' is not on or off") }),
    }
}

/// Reads a delay of at most [`SLOW_MAX_US`].
fn slow_delay(key: &'static str, text: &str) -> Result<u64, SpecError> {
    let us = unit(key, units::parse_duration_us(text))?;
    if us > SLOW_MAX_US {
        return Err(SpecError::Invalid {
            key,
            problem: format!("'{text}' is longer than the 1 hour a delay may last"),
        });
    }
    Ok(us)
}

/// Reads a whole number.
fn whole(key: &'static str, text: &str, what: &str) -> Result<u64, SpecError> {
    text.parse().map_err(|_| SpecError::Invalid { key, problem: format!("'{text}' is not {what} (a whole number)") })
}

/// Reads `N:VALUE+N:VALUE+...` into request numbers and the text after each colon.
fn parse_pairs(key: &'static str, text: &str, form: &str) -> Result<Vec<(u64, String)>, SpecError> {
    text.split('+')
        .map(|piece| {
            let (index, rest) = piece
                .split_once(':')
                .ok_or_else(|| SpecError::Invalid { key, problem: format!("'{piece}' is not {form}") })?;
            Ok((whole(key, index.trim(), "a request number")?, rest.trim().to_owned()))
        })
        .collect()
}

/// Reads `START-END+N+...` (sectors, half-open; `N` alone is one sector).
fn parse_ranges(key: &'static str, text: &str) -> Result<Value, SpecError> {
    let invalid = |problem: String| SpecError::Invalid { key, problem };
    let number = |text: &str| -> Result<u64, SpecError> {
        text.trim().parse().map_err(|_| {
            invalid(format!(
                "'{text}' is not a sector number (ranges are START-END in 512-byte sectors, joined with +)"
            ))
        })
    };
    let ranges = text
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
        .collect::<Result<_, SpecError>>()?;
    Ok(Value::Ranges(ranges))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::IoModel;

    #[test]
    fn the_key_table_lists_every_key_once_with_its_doc() {
        assert_eq!(
            key_names(),
            "size, seed, block, sparse, headers-only, latency, write-latency, bandwidth, write-bandwidth, queue, \
             jitter, shared-path, path-overhead, write-path-overhead, seek, rpm, medium, link-rtt, link-bandwidth, \
             link-burst, bad-read, bad-write, flaky-write, fail-after, fail-at, misdirect, slow, short-io, read-error-ppm, \
             write-error-ppm, misdirect-ppm, slow-ppm, slow-by"
        );
        for (i, key) in KEYS.iter().enumerate() {
            assert!(!key.doc.is_empty(), "{} has no doc", key.name);
            assert!(KEYS[..i].iter().all(|k| k.name != key.name), "{} twice", key.name);
        }
        let repeatable: Vec<&str> = KEYS.iter().filter(|k| k.repeatable).map(|k| k.name).collect();
        assert_eq!(repeatable, ["bad-read", "bad-write", "flaky-write", "misdirect", "slow"]);
        let message = SimSpec::parse("colour=red").unwrap_err().to_string();
        assert!(message.starts_with("unknown sim key 'colour' (keys: size, seed,"), "{message}");
    }

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
        assert_eq!(path.seek, crate::SeekModel { track_us: 1000, full_stroke_us: 9000, rotation_us: 8333 });
        assert_eq!(spec.medium.as_deref(), Some("a"));
        let remote = SimSpec::parse("link-rtt=200us,link-bandwidth=100M,link-burst=1M").unwrap();
        let link = crate::LinkModel { round_trip_us: 200, bandwidth_bytes_per_s: 100 << 20, burst_bytes: 1 << 20 };
        assert_eq!(remote.latency.link, link);
        assert_eq!(SimSpec::parse("").unwrap().latency.path, crate::PathModel::default());
    }

    #[test]
    fn disks_naming_one_medium_share_its_data_path() {
        use kcopyd_core::{BlockDevice, WriteBuf};
        // Two disks at 4 KiB/s, a 4 KiB write to each at once: apart both end after 1 s; on
        // one medium the second ends after 2 s.
        let ends = |first: &str, second: &str| {
            let (a, b) =
                (SimSpec::parse(first).unwrap().build(1 << 20), SimSpec::parse(second).unwrap().build(1 << 20));
            crate::Simulation::block_on(async move {
                let began = tokio::time::Instant::now();
                let write = |disk: Arc<MemDisk>| async move {
                    disk.write(0, WriteBuf::zeroes(4096)).await.unwrap();
                    crate::to_model(began.elapsed()).as_micros()
                };
                tokio::join!(write(a), write(b))
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
            ("link-burst=lots", "'link-burst'"),
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
