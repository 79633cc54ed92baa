//! A `#[tokio::main]` program awaiting outcomes: mirror one disk to two, then zero a range.
//!
//! ```text
//! cargo run -p kcopyd-core --example async_copy
//! ```

use std::sync::Arc;

use kcopyd_core::{Client, ClientConfig, Flags, Job, Region};
use kcopyd_sim::MemDisk;

#[tokio::main]
async fn main() {
    let len_sectors = 16 * 2048; // 16 MiB
    let source = Arc::new(MemDisk::with_pattern("source", len_sectors, 512, 42));
    let mirrors: Vec<Arc<MemDisk>> =
        (0..2).map(|i| Arc::new(MemDisk::zeroed(&format!("mirror{i}"), len_sectors, 512))).collect();
    let client = Client::new(ClientConfig::default()).expect("default configuration");

    let targets = mirrors.iter().map(|m| Region::new(m.clone(), 0, len_sectors)).collect();
    let handle = client.submit(Job::copy(Region::new(source.clone(), 0, len_sectors), targets, Flags::empty())).await;
    let copy = handle.expect("valid job");
    let outcome = copy.await;
    println!("copy: ok={} read_err={} write_err={:?}", outcome.is_ok(), outcome.read_err, outcome.write_err);

    let zero = Job::zero(vec![Region::new(mirrors[1].clone(), 0, 2048)], Flags::empty());
    let outcome = client.submit(zero).await.expect("valid job").await;
    println!("zero: ok={}", outcome.is_ok());

    let report = client.shutdown().await;
    println!("pool high-water mark: {} of {} pages", report.pool.pages_in_use_max, report.pool.pages_total);
    assert_eq!(source.snapshot(4096, 8), mirrors[0].snapshot(4096, 8));
}
