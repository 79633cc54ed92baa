//! Copy throughput of the engine between zero-latency in-memory disks.
//!
//! ```text
//! cargo run --release -p kcopyd-sim --example engine_throughput -- --size 2GiB --targets 1
//! ```
//!
//! The disks are filled and touched before the clock starts; only the copy is timed, with
//! the default client configuration. Prints one JSON object as its last line.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use kcopyd_core::{Client, ClientConfig, Flags, Job, Region, SECTOR_SIZE};
use kcopyd_sim::MemDisk;

fn parse_size(text: &str) -> Option<u64> {
    let digits = text.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = match &text[digits.len()..] {
        "" | "B" => 1,
        "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        _ => return None,
    };
    digits.parse::<u64>().ok()?.checked_mul(unit)
}

fn main() -> ExitCode {
    let mut size_bytes = 1u64 << 30;
    let mut targets = 1usize;
    let mut runs = 3usize;
    let mut huge_pages = true;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--no-huge-pages" {
            huge_pages = false;
            continue;
        }
        let value = args.next();
        match (arg.as_str(), value) {
            ("--size", Some(v)) => match parse_size(&v) {
                Some(bytes) if bytes > 0 && bytes % SECTOR_SIZE as u64 == 0 => size_bytes = bytes,
                _ => return usage(&format!("--size {v}: want a positive multiple of 512 like 2GiB")),
            },
            ("--targets", Some(v)) => match v.parse() {
                Ok(n) if (1..=kcopyd_core::TARGETS_MAX).contains(&n) => targets = n,
                _ => return usage(&format!("--targets {v}: want 1 to {}", kcopyd_core::TARGETS_MAX)),
            },
            ("--runs", Some(v)) => match v.parse() {
                Ok(n) if n >= 1 => runs = n,
                _ => return usage(&format!("--runs {v}: want at least 1")),
            },
            (other, _) => return usage(&format!("unknown argument {other}")),
        }
    }
    let len_sectors = size_bytes / SECTOR_SIZE as u64;
    eprintln!("filling {size_bytes} bytes of source and touching {targets} target(s)");
    let source = Arc::new(MemDisk::with_pattern("source", len_sectors, 512, 1));
    let target_disks: Vec<Arc<MemDisk>> = (0..targets)
        .map(|i| {
            // Pattern-fill the targets too, so every page is touched before timing.
            Arc::new(MemDisk::with_pattern(&format!("target{i}"), len_sectors, 512, 100 + i as u64))
        })
        .collect();
    let client = Client::new(ClientConfig { huge_pages, ..ClientConfig::default() }).expect("default configuration");
    let mut seconds = Vec::new();
    for run in 0..runs {
        let regions = target_disks.iter().map(|t| Region::new(t.clone(), 0, len_sectors)).collect();
        let job = Job::copy(Region::new(source.clone(), 0, len_sectors), regions, Flags::empty());
        let start = Instant::now();
        let outcome = client.submit_blocking(job).expect("valid job").wait();
        let elapsed = start.elapsed().as_secs_f64();
        assert!(outcome.is_ok(), "copy failed: {outcome:?}");
        eprintln!("run {run}: {elapsed:.3} s");
        seconds.push(elapsed);
    }
    let report = client.shutdown_blocking();
    // Spot-check the copy: first, middle and last sector of every target.
    for target in &target_disks {
        for sector in [0, len_sectors / 2, len_sectors - 1] {
            assert_eq!(source.snapshot(sector, 1), target.snapshot(sector, 1), "sector {sector} differs");
        }
    }
    seconds.sort_by(f64::total_cmp);
    let median = seconds[seconds.len() / 2];
    let gib_per_s = size_bytes as f64 / (1u64 << 30) as f64 / median;
    println!(
        "{{\"bytes\":{size_bytes},\"targets\":{targets},\"runs\":{runs},\"seconds\":{median:.4},\"gib_per_s\":{gib_per_s:.3},\"pages_in_use_max\":{}}}",
        report.pool.pages_in_use_max
    );
    ExitCode::SUCCESS
}

fn usage(problem: &str) -> ExitCode {
    eprintln!("engine_throughput: {problem}");
    eprintln!("usage: engine_throughput [--size SIZE] [--targets N] [--runs N] [--no-huge-pages]");
    ExitCode::from(2)
}
