//! A terabyte-scale copy on sparse, pattern-backed disks, in virtual time.
//!
//! ```text
//! cargo run --release -p kcopyd-sim --example sparse_copy -- --size 1TiB [--headers-only] \
//!     [--sub-job 1MiB] [--in-flight 16]
//! ```
//!
//! The source holds a pattern; the target keeps one extent per contiguous run of copied
//! pattern, so memory stays flat however large the copy. With `--headers-only` both disks
//! move and check only each sector's provenance header, not its body. Prints wall time,
//! virtual time, extents and the process's peak resident memory as one JSON line.

mod common;

use std::process::ExitCode;
use std::time::Instant;

use kcopyd_core::{ClientConfig, PAGE_SIZE};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut size_bytes = 16 << 30;
    let mut headers_only = false;
    let mut config = ClientConfig {
        page_budget: 4096,
        subjob_size_bytes: 1 << 20,
        subjobs_in_flight: 16,
        ..ClientConfig::default()
    };
    while let Some(arg) = args.next() {
        let value = matches!(arg.as_str(), "--size" | "--sub-job" | "--in-flight").then(|| args.next()).flatten();
        match (arg.as_str(), value) {
            ("--headers-only", _) => headers_only = true,
            ("--sub-job", Some(v)) => match common::parse_size(&v) {
                Some(bytes) if bytes > 0 && bytes % PAGE_SIZE as u64 == 0 => config.subjob_size_bytes = bytes as usize,
                _ => {
                    eprintln!("sparse_copy: --sub-job {v}: want a positive number of 4 KiB pages like 512KiB");
                    return ExitCode::from(2);
                }
            },
            ("--in-flight", Some(v)) => match v.parse() {
                Ok(n) if n > 0 => config.subjobs_in_flight = n,
                _ => {
                    eprintln!("sparse_copy: --in-flight {v}: want a positive whole number");
                    return ExitCode::from(2);
                }
            },
            ("--size", Some(v)) => match common::parse_size(&v) {
                Some(bytes) if bytes > 0 && bytes % (1 << 20) == 0 => size_bytes = bytes,
                _ => {
                    eprintln!("sparse_copy: --size {v}: want a positive number of MiB like 1TiB");
                    return ExitCode::from(2);
                }
            },
            _ => {
                eprintln!("usage: sparse_copy [--size SIZE] [--headers-only] [--sub-job SIZE] [--in-flight N]");
                return ExitCode::from(2);
            }
        }
    }
    // A budget that holds every sub-job in flight: the pool is not what limits the copy.
    config.page_budget = config.subjob_size_bytes / PAGE_SIZE * config.subjobs_in_flight;
    if let Err(error) = config.validate() {
        eprintln!("sparse_copy: {error}");
        return ExitCode::from(2);
    }
    let started = Instant::now();
    let run = common::copy_and_verify(common::sectors(size_bytes), config, headers_only);
    println!(
        "{{\"bytes\":{size_bytes},\"headers_only\":{headers_only},\"ok\":{},\"verified\":{},\"wall_seconds\":{:.1},\"virtual_seconds\":{:.3},\"target_extents\":{},\"peak_rss_mib\":{}}}",
        run.ok,
        run.verified,
        started.elapsed().as_secs_f64(),
        run.virtual_seconds,
        run.target_extents,
        common::peak_rss_kib() / 1024
    );
    if run.ok && run.verified { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
