//! What the sparse-copy examples share: sizes, the NVMe-like disk model, one verified copy.

use std::sync::Arc;

use kcopyd_core::{ClientConfig, Flags, Job, Region, SECTOR_SIZE};
use kcopyd_sim::{IoModel, Latency, MemDisk, MemDiskOptions, Provenance, Simulation, to_model};

/// The pattern seed of the source disk.
const SOURCE_SEED: u64 = 9;

/// Reads a size like `64GiB`, `1T` or `512K` in bytes.
pub(crate) fn parse_size(text: &str) -> Option<u64> {
    let digits = text.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit: u64 = match &text[digits.len()..] {
        "" => 1,
        "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        _ => return None,
    };
    digits.parse::<u64>().ok()?.checked_mul(unit)
}

/// The process's peak resident memory in KiB (0 where `/proc` does not tell).
pub(crate) fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A sparse disk on a fast NVMe-like model: 20 µs per request, 3 GB/s reads, 2 GB/s
/// writes, 32 deep.
fn nvme_disk(name: &str, len_sectors: u64, headers_only: bool) -> MemDisk {
    let model = |bandwidth| IoModel { cost_us: 20, bandwidth_bytes_per_s: bandwidth, queue_depth: 32, jitter_us: 5 };
    MemDisk::new(MemDiskOptions {
        name: name.into(),
        len_sectors,
        sparse: true,
        headers_only,
        latency: Latency { read: model(3_000_000_000), write: model(2_000_000_000), seed: 1, ..Latency::default() },
        ..MemDiskOptions::default()
    })
}

/// What one simulated copy gave.
pub(crate) struct SimulatedCopy {
    /// The job completed without error.
    pub ok: bool,
    /// Every target sector holds the source sector of the same number (by provenance).
    pub verified: bool,
    /// Virtual seconds the copy took.
    pub virtual_seconds: f64,
    /// Extents the target holds afterwards.
    pub target_extents: usize,
}

/// Copies `len_sectors` from a pattern-filled source to a zeroed target in virtual time
/// with `config`, and verifies the target by provenance.
pub(crate) fn copy_and_verify(len_sectors: u64, config: ClientConfig, headers_only: bool) -> SimulatedCopy {
    let source = Arc::new(nvme_disk("source", len_sectors, headers_only));
    source.fill_pattern(SOURCE_SEED);
    let target = Arc::new(nvme_disk("target", len_sectors, headers_only));
    let (ok, virtual_time) = Simulation::run(config, |client, _| {
        let (source, target) = (source.clone(), target.clone());
        async move {
            let began = tokio::time::Instant::now();
            let job = Job::copy(
                Region::new(source, 0, len_sectors),
                vec![Region::new(target, 0, len_sectors)],
                Flags::empty(),
            );
            let outcome = client.submit(job).await.expect("valid job").await;
            (outcome.is_ok(), to_model(began.elapsed()))
        }
    })
    .expect("valid configuration");
    let verified = target.provenance(0..len_sectors)
        == vec![(0..len_sectors, Provenance::Pattern { seed: SOURCE_SEED, generation: 0, sector: 0 })];
    SimulatedCopy { ok, verified, virtual_seconds: virtual_time.as_secs_f64(), target_extents: target.extents() }
}

/// Sectors in `bytes`.
pub(crate) fn sectors(bytes: u64) -> u64 {
    bytes / SECTOR_SIZE as u64
}
