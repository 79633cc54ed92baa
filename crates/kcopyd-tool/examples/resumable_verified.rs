//! Copies a file to two targets resumably (a map records what is durable; run it again after a
//! crash and it copies only the rest) and verified (the targets are read back and compared).
//!
//! Usage: `cargo run -p kcopyd-tool --example resumable_verified -- SOURCE TARGET1 TARGET2 MAP`
use std::path::Path;

use kcopyd_core::ClientConfig;
use kcopyd_tool::run::{CopyOptions, MappedCopy, Runner, job_ok};
use kcopyd_tool::{Cancel, DeviceAddress, Settings, map, plan_with_source};

/// Copies `source` to `targets` through the map at `map_path`: whether all is copied and
/// identical.
pub(crate) fn copy_resumable_verified(
    source: &Path,
    targets: [&Path; 2],
    map_path: &Path,
) -> Result<bool, Box<dyn std::error::Error>> {
    let settings = Settings::new(ClientConfig::default());
    let targets = targets.map(DeviceAddress::path);
    let mut plan = plan_with_source(&DeviceAddress::path(source), &targets, None, true, &settings)?;
    let (mut copy_map, batch_sectors) = map::open_for(map_path, &plan, 64 << 20)?;
    let mapped = MappedCopy { map: &mut copy_map, batch_sectors, retry_failed: false };
    let cancel = Cancel::new();
    let runner = Runner { settings: &settings, on_event: &|_| {}, cancel: &cancel };
    let options = CopyOptions { verify: true, ..CopyOptions::default() };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let run = runtime.block_on(runner.copy(&mut plan, options, Some(mapped)))?;
    Ok(job_ok(&run.job.outcome) && run.verify.is_some_and(|verify| verify.comparison.identical()))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [source, first, second, map_path] = args.as_slice() else {
        return Err("usage: resumable_verified SOURCE TARGET1 TARGET2 MAP".into());
    };
    let identical = copy_resumable_verified(source.as_ref(), [first.as_ref(), second.as_ref()], map_path.as_ref())?;
    println!("{}", if identical { "copied and verified" } else { "errors or differences: run again" });
    Ok(())
}
