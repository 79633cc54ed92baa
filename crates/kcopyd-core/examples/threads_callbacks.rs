//! A plain-threads program using completion callbacks, as the kernel's users do: several
//! threads submit region copies; callbacks run on the client's worker, one at a time.
//!
//! ```text
//! cargo run -p kcopyd-core --example threads_callbacks
//! ```

use std::sync::Arc;
use std::sync::mpsc;
use std::thread;

use kcopyd_core::{Client, ClientConfig, Flags, Job, Outcome, Region};
use kcopyd_sim::MemDisk;

const REGION_SECTORS: u64 = 128; // 64 KiB regions, like a mirror's resync regions
const REGIONS: u64 = 64;

fn main() {
    let source = Arc::new(MemDisk::with_pattern("primary", REGIONS * REGION_SECTORS, 512, 7));
    let mirror = Arc::new(MemDisk::zeroed("mirror", REGIONS * REGION_SECTORS, 512));
    mirror.fail_writes(10 * REGION_SECTORS..10 * REGION_SECTORS + 1); // one bad region
    let client = Client::new(ClientConfig { page_budget: 64, ..ClientConfig::default() }).expect("configuration");
    let (done_sender, done_receiver) = mpsc::channel::<(u64, Outcome)>();

    let submitters: Vec<_> = (0..4)
        .map(|part| {
            let (client, source, mirror, done) = (client.clone(), source.clone(), mirror.clone(), done_sender.clone());
            thread::spawn(move || {
                for region in (part..REGIONS).step_by(4) {
                    let start = region * REGION_SECTORS;
                    let done = done.clone();
                    let job = Job::copy(
                        Region::new(source.clone(), start, REGION_SECTORS),
                        vec![Region::new(mirror.clone(), start, REGION_SECTORS)],
                        Flags::empty(),
                    )
                    // Runs on the client's worker thread; never two at once.
                    .on_complete(move |outcome| done.send((region, outcome)).expect("main thread listens"));
                    client.submit_blocking(job).expect("valid job");
                }
            })
        })
        .collect();
    drop(done_sender);
    submitters.into_iter().for_each(|s| s.join().expect("submitter"));

    let mut failed: Vec<u64> = done_receiver
        .iter()
        .filter(|(_, outcome)| !outcome.is_ok())
        .map(|(region, outcome)| {
            println!("region {region}: write_err={:?} failed={:?}", outcome.write_err, outcome.targets[0].write_failed);
            region
        })
        .collect();
    failed.sort();
    let report = client.shutdown_blocking();
    println!(
        "{} regions copied, failed: {failed:?}; {} jobs in all",
        REGIONS as usize - failed.len(),
        report.jobs_completed
    );
    assert_eq!(failed, vec![10]);
}
