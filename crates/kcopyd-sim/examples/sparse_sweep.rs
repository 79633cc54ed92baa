//! A design sweep: the same large copy simulated at many client configurations, in
//! parallel, each verified. This is the speed a user exploring sub-job sizes and queue
//! depths waits for.
//!
//! ```text
//! cargo run --release -p kcopyd-sim --example sparse_sweep -- --size 64GiB --threads 2 [--whole-sectors]
//! ```
//!
//! Twenty points: sub-jobs of 128 KiB to 2 MiB × 2 to 16 sub-jobs in flight, each with a
//! page budget that holds all its sub-jobs, on headers-only sparse disks (`--whole-sectors`
//! moves every byte instead). Each point is one [`Simulation`](kcopyd_sim::Simulation) on
//! its own thread's runtime; `--threads` of them run at once. Prints one line per point,
//! fastest first, then one JSON line with the wall time and peak resident memory.

mod common;

use std::process::ExitCode;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use kcopyd_core::{ClientConfig, PAGE_SIZE};

/// Sub-job sizes of the sweep, in KiB.
const SUBJOB_KIB: [usize; 5] = [128, 256, 512, 1024, 2048];
/// Sub-jobs in flight of the sweep.
const IN_FLIGHT: [usize; 4] = [2, 4, 8, 16];

/// One point of the sweep and what it gave.
struct Point {
    subjob_kib: usize,
    subjobs_in_flight: usize,
    run: common::SimulatedCopy,
    wall_seconds: f64,
}

/// `--size`, `--threads` and `--whole-sectors`: `(size_bytes, threads, headers_only)`, or the
/// exit code of a bad argument (its message printed).
fn parse_args() -> Result<(u64, usize, bool), ExitCode> {
    let mut args = std::env::args().skip(1);
    let mut size_bytes: u64 = 64 << 30;
    let mut threads = 2usize;
    let mut headers_only = true;
    while let Some(arg) = args.next() {
        let value = matches!(arg.as_str(), "--size" | "--threads").then(|| args.next()).flatten();
        match (arg.as_str(), value) {
            ("--whole-sectors", _) => headers_only = false,
            ("--size", Some(v)) => match common::parse_size(&v) {
                Some(bytes) if bytes > 0 && bytes % (2 << 20) == 0 => size_bytes = bytes,
                _ => {
                    eprintln!("sparse_sweep: --size {v}: want a positive multiple of 2 MiB like 64GiB");
                    return Err(ExitCode::from(2));
                }
            },
            ("--threads", Some(v)) => match v.parse() {
                Ok(n) if n > 0 => threads = n,
                _ => {
                    eprintln!("sparse_sweep: --threads {v}: want a positive whole number");
                    return Err(ExitCode::from(2));
                }
            },
            _ => {
                eprintln!("usage: sparse_sweep [--size SIZE] [--threads N] [--whole-sectors]");
                return Err(ExitCode::from(2));
            }
        }
    }
    Ok((size_bytes, threads, headers_only))
}

fn main() -> ExitCode {
    let (size_bytes, threads, headers_only) = match parse_args() {
        Ok(args) => args,
        Err(code) => return code,
    };
    let grid: Vec<(usize, usize)> =
        SUBJOB_KIB.iter().flat_map(|&kib| IN_FLIGHT.iter().map(move |&n| (kib, n))).collect();
    let next = AtomicUsize::new(0);
    let points = Mutex::new(Vec::new());
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                while let Some(&(subjob_kib, subjobs_in_flight)) = grid.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let subjob_size_bytes = subjob_kib << 10;
                    let config = ClientConfig {
                        page_budget: subjob_size_bytes / PAGE_SIZE * subjobs_in_flight,
                        subjob_size_bytes,
                        subjobs_in_flight,
                        ..ClientConfig::default()
                    };
                    let began = Instant::now();
                    let run = common::copy_and_verify(common::sectors(size_bytes), config, headers_only);
                    let wall_seconds = began.elapsed().as_secs_f64();
                    let point = Point { subjob_kib, subjobs_in_flight, run, wall_seconds };
                    points.lock().expect("no thread panicked").push(point);
                }
            });
        }
    });
    let wall_seconds = started.elapsed().as_secs_f64();
    let mut points = points.into_inner().expect("no thread panicked");
    points.sort_by(|a, b| a.run.virtual_seconds.total_cmp(&b.run.virtual_seconds));
    println!("sub-job  in flight  virtual s   GB/s  verified  extents  wall s");
    for point in &points {
        println!(
            "{:>5}K  {:>9}  {:>9.3}  {:>5.2}  {:>8}  {:>7}  {:>6.1}",
            point.subjob_kib,
            point.subjobs_in_flight,
            point.run.virtual_seconds,
            size_bytes as f64 / point.run.virtual_seconds / 1e9,
            point.run.ok && point.run.verified,
            point.run.target_extents,
            point.wall_seconds
        );
    }
    let all_verified = points.iter().all(|p| p.run.ok && p.run.verified);
    println!(
        "{{\"points\":{},\"bytes_each\":{size_bytes},\"threads\":{threads},\"headers_only\":{headers_only},\"all_verified\":{all_verified},\"wall_seconds\":{wall_seconds:.1},\"peak_rss_mib\":{}}}",
        points.len(),
        common::peak_rss_kib() / 1024
    );
    if all_verified { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
