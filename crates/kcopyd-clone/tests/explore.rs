//! The clone in the simulator (feature `explore`): a small clone scenario hydrates to the end
//! in virtual time with the application through the clone, the numbers follow the models, the
//! same seed gives the same report, and malformed scenarios are refused by name.

#![cfg(feature = "explore")]

use kcopyd_clone::explore::{self, CloneScenario, CloneScenarioError};

/// 16 MiB behind a 2 ms, 100 MB/s link; a local destination; 200 requests a second.
const SCENARIO: &str = r#"
seed = 5
[clone]
region_size_bytes = "64K"
[clone.options]
hydration_threshold = 16
hydration_batch_size = 4
[client]
subjob_size_bytes = "256K"
subjobs_in_flight = 4
[disks.source]
content = "pattern"
len_sectors = "16M"
[disks.source.latency.read]
cost_us = 50
[disks.source.latency.link]
round_trip_us = 2000
bandwidth_bytes_per_s = 100_000_000
[disks.destination]
len_sectors = "16M"
[disks.destination.latency.read]
cost_us = 50
[disks.destination.latency.write]
cost_us = 20
[foreground]
disk = "clone"
read_percent = 70
rate_per_s = 200
queue_depth = 8
"#;

fn without_wall(mut report: explore::CloneReport) -> explore::CloneReport {
    report.wall_seconds = 0.0;
    report
}

#[test]
fn a_clone_hydrates_in_virtual_time_and_the_application_pays_for_the_link() {
    let scenario = CloneScenario::from_toml(SCENARIO).unwrap();
    let report = explore::run(&scenario).unwrap();
    assert_eq!(report.hydration_end, "complete");
    assert_eq!(report.hydrated_fraction, 1.0);
    assert_eq!(report.source_bytes, 16 << 20);
    // The link moves 100 MB/s: 16 MiB take at least 0.168 s, and the hints, the batches of 4
    // and the pauses for the application keep it from being much slower than a few times that.
    assert!(report.hydration_seconds > 0.167, "{report}");
    assert!(report.hydration_seconds < 2.0, "{report}");
    assert_eq!(report.stats.regions_copied + report.stats.regions_overwritten, 256, "{report}");
    let during = report.foreground.unwrap();
    let after = report.baseline.unwrap();
    assert!(during.count > 0 && after.count > 0);
    // A read of a region not yet hydrated crosses the link (2 ms); the destination alone
    // answers in its 50 µs (reads) or 20 µs (writes).
    assert!(during.p99_ms >= 2.0, "{report}");
    assert!(after.p99_ms < 0.1, "{report}");
    let hours = report.hydration_seconds * f64::from(1u32 << 16) / 3600.0;
    assert!((report.hours_per_tib - hours).abs() < 1e-9 * hours);
    // The same seed, the same run.
    assert_eq!(without_wall(explore::run(&scenario).unwrap()), without_wall(report));
}

#[test]
fn a_time_limit_stops_the_hydration_and_extrapolates_from_the_share_done() {
    let mut scenario = CloneScenario::from_toml(SCENARIO).unwrap();
    scenario.clone.time_limit_s = Some(0);
    let report = explore::run(&scenario).unwrap();
    assert_ne!(report.hydration_end, "complete");
    assert!(report.hydrated_fraction < 1.0, "{report}");
}

#[test]
fn the_throttle_slows_the_hydration() {
    let fast = explore::run(&CloneScenario::from_toml(SCENARIO).unwrap()).unwrap();
    let throttled = SCENARIO.replace("[client]\n", "[client]\nthrottle = { rate_bytes_per_s = 20_000_000 }\n");
    let slow = explore::run(&CloneScenario::from_toml(&throttled).unwrap()).unwrap();
    // 16 MiB at 20 MB/s: at least 0.8 s.
    assert!(slow.hydration_seconds > 0.8, "{slow}");
    assert!(slow.hydration_seconds > fast.hydration_seconds * 2.0, "{fast}\n{slow}");
}

#[test]
fn malformed_clone_scenarios_are_refused_by_name() {
    let no_clone = SCENARIO.replace("[clone]\nregion_size_bytes = \"64K\"\n[clone.options]", "[unused]");
    assert!(matches!(
        CloneScenario::from_toml(&no_clone),
        Err(CloneScenarioError::Scenario(_) | CloneScenarioError::CloneTable { .. })
    ));
    let on_disk = SCENARIO.replace("disk = \"clone\"", "disk = \"destination\"");
    let error = CloneScenario::from_toml(&on_disk).unwrap_err();
    assert!(error.to_string().contains("'destination'"), "{error}");
    let region = SCENARIO.replace("\"64K\"", "\"3K\"");
    assert!(matches!(CloneScenario::from_toml(&region), Err(CloneScenarioError::Clone { .. })));
    let unknown = SCENARIO.replace("hydration_threshold = 16", "hydration_treshold = 16");
    let error = CloneScenario::from_toml(&unknown).unwrap_err();
    assert!(error.to_string().contains("hydration_treshold"), "{error}");
    let third_disk = format!("{SCENARIO}\n[disks.spare]\nlen_sectors = \"16M\"\n");
    assert!(matches!(CloneScenario::from_toml(&third_disk), Err(CloneScenarioError::Shape { .. })));
    let no_foreground = SCENARIO.split("[foreground]").next().unwrap().to_owned();
    assert!(matches!(CloneScenario::from_toml(&no_foreground), Err(CloneScenarioError::Shape { .. })));
}

#[test]
fn every_shipped_clone_scenario_parses() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scenarios");
    let mut parsed = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("the scenarios folder") {
        let path = entry.expect("a directory entry").path();
        let Ok(text) = std::fs::read_to_string(&path) else { continue };
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let tree = kcopyd_sim::explore::parse_tree(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if tree.get("clone").is_some() {
            CloneScenario::from_value_in(tree, &dir).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            parsed.push(path.file_stem().expect("a name").to_string_lossy().into_owned());
        }
    }
    parsed.sort();
    assert_eq!(parsed, ["clone-hydration", "clone-hydration-measured"], "the shipped clone scenarios");
}
