//! The shipped scenarios (`scenarios/*.toml`): each parses, and each runs (scaled down where
//! the full size takes minutes) and shows the property it was written to show. Plus the
//! scenario format's errors, determinism and sweeps.

use std::path::PathBuf;

use kcopyd_sim::explore::{self, Scenario, ScenarioError, ScenarioReport, Vary, parse_tree, parse_value, set_path};

fn scenarios_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scenarios")
}

fn text(name: &str) -> String {
    let path = scenarios_dir().join(format!("{name}.toml"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The shipped scenario `name` with `edits` (dotted key, value as typed on the command line).
fn scenario(name: &str, edits: &[(&str, &str)]) -> Scenario {
    let mut tree = parse_tree(&text(name)).expect("valid TOML");
    for (key, value) in edits {
        set_path(&mut tree, key, parse_value(value)).expect("a settable key");
    }
    Scenario::from_value_in(tree, &scenarios_dir()).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn run(name: &str, edits: &[(&str, &str)]) -> ScenarioReport {
    explore::run(&scenario(name, edits)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn disk<'a>(report: &'a ScenarioReport, name: &str) -> &'a explore::DiskReport {
    report.disks.iter().find(|d| d.disk == name).expect("the disk is reported")
}

#[test]
fn every_shipped_scenario_parses() {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(scenarios_dir()).expect("the scenarios folder") {
        let path = entry.expect("a directory entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path).expect("readable");
            let tree = parse_tree(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            if tree.get("clone").is_some() {
                // A clone's scenario (a [clone] table): kcopyd-clone's explore tests parse those.
                continue;
            }
            let scenario =
                Scenario::from_value_in(tree, &scenarios_dir()).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(!scenario.description.is_empty(), "{} says what it models", path.display());
            names.push(path.file_stem().expect("a name").to_string_lossy().into_owned());
        }
    }
    names.sort();
    for wanted in [
        "hdd-mirror-resync",
        "nvme-resync",
        "snapshot-cow",
        "three-target-mixed",
        "subjob-study",
        "subjob-study-hdd",
        "remote-copy",
        "file-copy-measured",
        "demo-mirror-resync",
    ] {
        assert!(names.iter().any(|n| n == wanted), "scenarios/{wanted}.toml is shipped (found {names:?})");
    }
}

#[test]
fn subjob_study_on_the_ssd_model_shows_the_kernels_shape() {
    // The kernel measured about 240 → 540 MB/s (+96 %) from 64 KiB to 512 KiB sub-jobs.
    let throughput: Vec<f64> = ["64K", "128K", "256K", "512K"]
        .iter()
        .map(|size| {
            run("subjob-study", &[("jobs.0.count", "24"), ("client.subjob_size_bytes", size)]).throughput_mb_per_s
        })
        .collect();
    assert!(throughput.windows(2).all(|w| w[1] > w[0] * 0.97), "grows from 64K to 512K: {throughput:?}");
    let gain = throughput[3] / throughput[0];
    assert!((1.7..2.5).contains(&gain), "64K → 512K gains about 2x, as the kernel's +96 %: {throughput:?}");
    assert!((150.0..350.0).contains(&throughput[0]), "64K near the kernel's 240 MB/s: {throughput:?}");
}

#[test]
fn subjob_study_on_the_hdd_model_wants_bytes_in_flight() {
    let at = |size: &str, depth: &str| {
        run(
            "subjob-study-hdd",
            &[("jobs.0.count", "2"), ("client.subjob_size_bytes", size), ("client.subjobs_in_flight", depth)],
        )
        .throughput_mb_per_s
    };
    // The head seeks between the shared block and the fresh one: each turn costs ~9-16 ms, and
    // what it moves per turn is the bytes in flight, however they are cut.
    let (one_big, two, four_small) = (at("1M", "1"), at("512K", "2"), at("256K", "4"));
    for other in [two, four_small] {
        assert!((other / one_big - 1.0).abs() < 0.03, "1M×1 {one_big}, 512K×2 {two}, 256K×4 {four_small}");
    }
    // Unlike the SSD model, where 1 × 2 MiB ran at half the speed of 8 × 256 KiB.
    let (one_2m, eight_256k) = (at("2M", "1"), at("256K", "8"));
    assert!((one_2m / eight_256k - 1.0).abs() < 0.03, "2M×1 {one_2m} vs 256K×8 {eight_256k}");
    // More in flight keeps paying, far past the SSD's best (the page budget is the limit).
    assert!(at("1M", "4") > 1.5 * one_big, "4 MiB in flight beats 1 MiB");
}

#[test]
fn hdd_mirror_resync_reports_what_latent_errors_left_uncopied() {
    // 256 MiB instead of 4 TiB; errors made common enough to fire at that size.
    let report = run(
        "hdd-mirror-resync",
        &[
            ("disks.primary.len_sectors", "256M"),
            ("disks.mirror.len_sectors", "256M"),
            ("disks.primary.faults.odds.read_error_ppm", "20000"),
        ],
    );
    let job = &report.jobs[0];
    assert_eq!(job.jobs, 1);
    assert!(job.read_failed_sectors > 0, "some latent errors fired: {job:?}");
    // IGNORE_ERROR: exactly the unreadable blocks are left, narrowed to 512-byte blocks.
    assert_eq!(job.targets[0].not_copied_sectors, job.read_failed_sectors);
    // Everything else on the mirror is the primary's data (checked through provenance).
    assert!(job.verification.checked && job.verification.mismatched_sectors == 0, "{:?}", job.verification);
    assert_eq!(job.verification.sectors, 256 * 2048 - job.targets[0].not_copied_sectors);
    assert!(job.read_failed_sectors < 256 * 2048 / 100, "narrowed down, not whole chunks: {job:?}");
    let foreground = report.foreground.as_ref().expect("a foreground");
    let alone = foreground.alone.expect("a baseline");
    assert!(foreground.with_jobs.p99_ms > 2.0 * alone.p99_ms, "the resync hurts the reader: {foreground:?}");
    // The open loop keeps its rate (20 per second) and the baseline runs as long.
    assert!((foreground.iops - 20.0).abs() < 1.0, "{foreground:?}");
    assert!(alone.count.abs_diff(foreground.with_jobs.count) <= 1, "{foreground:?}");
    // The narrowing re-reads show in the request sizes: halves of 512 KiB down to 512 bytes.
    assert!(report.io_sizes.iter().any(|s| s.size_bytes == 512 && s.reads > 0), "{:?}", report.io_sizes);
    // Under 180 MB/s: the narrowing re-reads of 2 % failing requests cost time as well.
    assert!(report.throughput_mb_per_s > 30.0 && report.throughput_mb_per_s < 180.0, "{}", report.throughput_mb_per_s);
    let primary = disk(&report, "primary");
    assert!(primary.busy_percent > 95.0, "the primary bounds the resync: {primary:?}");
    // Alone, a random read pays a seek by distance and half a revolution: 5 to 21 ms.
    assert!((5.0..21.0).contains(&alone.p99_ms), "{alone:?}");
}

#[test]
fn hdd_mirror_resync_loses_half_the_head_to_the_readers_seeks() {
    // With the scenario's own error rate: 180 MB/s at best while the resync's reads follow each
    // other; every random read of the application costs a seek there and one back (about
    // 25 ms), so 20 a second take about half the head's time, and 2 a second hardly any.
    let at = |rate: &str| {
        run(
            "hdd-mirror-resync",
            &[
                ("disks.primary.len_sectors", "256M"),
                ("disks.mirror.len_sectors", "256M"),
                ("foreground.rate_per_s", rate),
            ],
        )
        .throughput_mb_per_s
    };
    let (twenty, two) = (at("20"), at("2"));
    assert!((60.0..120.0).contains(&twenty), "20 reads per second: {twenty}");
    assert!(two > 150.0 && two < 180.0, "2 reads per second: near the platter's 180 MB/s: {two}");
}

#[test]
fn nvme_resync_runs_at_the_write_bandwidth() {
    let report = run("nvme-resync", &[("disks.primary.len_sectors", "256M"), ("disks.mirror.len_sectors", "256M")]);
    assert!(report.all_ok);
    assert_eq!(report.jobs[0].verification.sectors, 256 * 2048);
    assert!(
        (1800.0..=2000.0).contains(&report.throughput_mb_per_s),
        "bounded by 2 GB/s writes: {}",
        report.throughput_mb_per_s
    );
    assert!(disk(&report, "mirror").busy_percent > 95.0);
    // Over time: the writes keep about seven of the eight sub-jobs queued on the mirror.
    let index = report.disks.iter().position(|d| d.disk == "mirror").unwrap();
    let middle = &report.timeline[report.timeline.len() / 2];
    assert!((6.0..=8.0).contains(&middle.queue_depth[index]), "{middle:?}");
    assert!(middle.foreground_ms_mean.is_some() && middle.foreground_alone_ms_mean.is_some());
    assert_eq!(report.io_sizes.len(), 1, "every request is one 512 KiB sub-job: {:?}", report.io_sizes);
    assert_eq!(report.io_sizes[0].size_bytes, 512 * 1024);
}

#[test]
fn snapshot_cow_writers_wait_on_chunk_copies() {
    let report = run("snapshot-cow", &[("jobs.0.count", "512")]);
    let job = &report.jobs[0];
    assert_eq!((job.jobs, job.ok), (512, 512));
    assert_eq!((job.verification.sectors, job.verification.mismatched_sectors), (512 * 128, 0));
    // A 64 KiB chunk: one read (80 µs + 22 µs) then one write (20 µs + 44 µs), under 1 ms.
    assert!(job.latency.p50_ms > 0.15 && job.latency.p99_ms < 1.0, "{:?}", job.latency);
    // Four copies of 16 pages at most; a sub-job first takes a whole sub-job's pages (128) and
    // then gives back what a short chunk does not need, so one of them may briefly hold 128.
    assert!(report.pages_in_use_max <= 128 + 3 * 16, "four 64 KiB copies at most: {}", report.pages_in_use_max);
    assert!(report.pages_in_use_max >= 4 * 16, "four copies in flight: {}", report.pages_in_use_max);
    let foreground = report.foreground.as_ref().expect("a foreground");
    assert!(foreground.with_jobs.p50_ms >= foreground.alone.expect("a baseline").p50_ms);
}

#[test]
fn three_targets_the_slowest_bounds_the_copy() {
    let edits = [
        ("disks.source.len_sectors", "128M"),
        ("disks.nvme.len_sectors", "128M"),
        ("disks.ssd.len_sectors", "128M"),
        ("disks.hdd.len_sectors", "128M"),
    ];
    let report = run("three-target-mixed", &edits);
    let (hdd, ssd, nvme) = (disk(&report, "hdd"), disk(&report, "ssd"), disk(&report, "nvme"));
    assert!(hdd.busy_percent > 95.0 && ssd.busy_percent < 50.0 && nvme.busy_percent < 50.0, "{:?}", report.disks);
    assert!(hdd.write_latency_ms_mean > 10.0 * ssd.write_latency_ms_mean);
    // The HDD receives one sequential stream: with the seek model it streams (no seek per
    // request), so the copy runs close to, and no faster than, its 180 MB/s.
    assert!(
        report.throughput_mb_per_s > 150.0 && report.throughput_mb_per_s < 180.0,
        "the HDD's streaming rate: {}",
        report.throughput_mb_per_s
    );
    assert_eq!(report.jobs[0].verification.sectors, 3 * 128 * 2048, "every target checked");
    // More sub-jobs in flight wait in the HDD's queue: the copy is no faster.
    let mut deeper = edits.to_vec();
    deeper.push(("client.subjobs_in_flight", "32"));
    let deep = run("three-target-mixed", &deeper);
    assert!((deep.throughput_mb_per_s / report.throughput_mb_per_s - 1.0).abs() < 0.05);
    assert!(disk(&deep, "hdd").queue_depth_mean > 3.0 * hdd.queue_depth_mean, "only the HDD's queue grows");
}

#[test]
fn a_remote_target_needs_the_links_bandwidth_delay_product_in_flight() {
    let size = [("disks.local.len_sectors", "256M"), ("disks.remote.len_sectors", "256M")];
    let at = |depth: &str, extra: &[(&str, &str)]| {
        let mut edits = size.to_vec();
        edits.push(("client.subjobs_in_flight", depth));
        edits.extend_from_slice(extra);
        run("remote-copy", &edits)
    };
    let link_mb_per_s = 1250.0;
    let throughput: Vec<f64> =
        ["1", "2", "4", "8", "16"].iter().map(|depth| at(depth, &[]).throughput_mb_per_s).collect();
    // One 512 KiB sub-job pays a round trip (0.5 ms), its bytes on the link (0.42 ms), the
    // local read and the remote write: about 1.4 ms, so one in flight fills under a third of
    // the link, and each more adds as much until the link is full.
    assert!(throughput[0] < 0.35 * link_mb_per_s, "one in flight: {throughput:?}");
    assert!((throughput[1] / throughput[0] - 2.0).abs() < 0.1, "two in flight, twice: {throughput:?}");
    // 4 × 512 KiB covers the link's bandwidth × the sub-job's cycle: the link's rate, and no
    // more however deep.
    for (depth, mb_per_s) in [4, 8, 16].iter().zip(&throughput[2..]) {
        assert!((mb_per_s / link_mb_per_s - 1.0).abs() < 0.02, "{depth} in flight at the link's rate: {throughput:?}");
    }
    assert!((throughput[4] / throughput[2] - 1.0).abs() < 0.01, "flat past 4: {throughput:?}");
    // The link is what bounds it: without it the same disks copy at the drive's 2 GB/s, and
    // one sub-job in flight goes faster without the round trip.
    let no_round_trip = [("disks.remote.latency.link.round_trip_us", "0")];
    assert!(at("1", &no_round_trip).throughput_mb_per_s > 1.3 * throughput[0]);
    let local =
        [("disks.remote.latency.link.round_trip_us", "0"), ("disks.remote.latency.link.bandwidth_bytes_per_s", "0")];
    let local = at("8", &local);
    assert!(local.throughput_mb_per_s > 1.5 * link_mb_per_s, "{}", local.throughput_mb_per_s);
    assert!(local.all_ok);
}

#[test]
fn the_measured_model_copies_over_one_shared_path() {
    // scenarios/models/vm-ext4.toml: reads 4027 MB/s, writes 9395 MB/s, measured as one
    // device, so a file-to-file copy reads and writes over one path: at most
    // 1 / (1/4027 + 1/9395) = 2819 MB/s, where two separate devices would reach the reads' 4027.
    let report = run("file-copy-measured", &[]);
    assert!(report.all_ok);
    assert_eq!(report.jobs[0].verification.sectors, 2 * 1024 * 1024);
    assert!(
        report.throughput_mb_per_s > 2000.0 && report.throughput_mb_per_s < 2819.0,
        "{}",
        report.throughput_mb_per_s
    );
}

#[test]
fn the_demo_resync_agrees_with_its_fault_logs_and_a_tampered_sector_is_found() {
    // `kcopyd demo` runs this scenario: its latent errors and bad write region are reported
    // where they were injected, and the runner's check agrees with every disk's fault log.
    let report = run("demo-mirror-resync", &[]);
    let job = &report.jobs[0];
    assert!(job.verification.checked && job.verification.agrees(), "{:?}", job.verification);
    assert_eq!(job.read_failed_ranges, [[104857, 104858], [314585, 314593]]);
    let write_failed: Vec<_> = job.targets.iter().map(|t| t.write_failed_ranges.clone()).collect();
    assert_eq!(write_failed, [vec![], vec![[208896, 210944]], vec![]], "the bad region's 1 MiB sub-job");
    assert!(!report.all_ok, "the jobs met the injected faults");
    // A sector changed behind the engine's back after the copy: the check finds it.
    let scenario = scenario("demo-mirror-resync", &[]);
    let tampered = explore::run_with(&scenario, &|disks| disks["mirror-a"].poke(8, &[0xa5; 512])).unwrap();
    let verification = &tampered.jobs[0].verification;
    assert_eq!(verification.mismatched_sectors, 1, "{verification:?}");
    assert_eq!(verification.first_mismatch, Some(explore::Mismatch { disk: "mirror-a".into(), sector: 8 }));
}

#[test]
fn a_write_that_lands_elsewhere_is_found_by_the_check() {
    // The mirror sends its fourth write 1 MiB off and reports success: the engine cannot know,
    // the check after the run does.
    let clean = run("nvme-resync", &[("disks.primary.len_sectors", "64M"), ("disks.mirror.len_sectors", "64M")]);
    assert!(clean.all_ok && clean.jobs[0].verification.mismatched_sectors == 0);
    let report = run(
        "nvme-resync",
        &[
            ("disks.primary.len_sectors", "64M"),
            ("disks.mirror.len_sectors", "64M"),
            ("disks.mirror.faults.misdirects", "[{ write_index = 3, shift_sectors = 2048 }]"),
        ],
    );
    let job = &report.jobs[0];
    assert_eq!(job.ok, 1, "the engine saw no error");
    // The 512 KiB never written where it belonged, and the 512 KiB it overwrote further on
    // (unless a later write of the copy covered it again).
    assert!(job.verification.mismatched_sectors >= 1024, "{:?}", job.verification);
    assert!(!report.all_ok);
    // Writes of the foreground or of another job make an entry unverifiable, with the reason.
    let written = run(
        "nvme-resync",
        &[("disks.primary.len_sectors", "64M"), ("disks.mirror.len_sectors", "64M"), ("foreground.read_percent", "50")],
    );
    assert!(!written.jobs[0].verification.checked);
    assert!(written.jobs[0].verification.note.contains("foreground writes disk 'primary'"));
}

#[test]
fn the_same_seed_gives_the_same_report() {
    let edits = [("jobs.0.count", "256")];
    let mut first = run("snapshot-cow", &edits);
    let mut second = run("snapshot-cow", &edits);
    first.wall_seconds = 0.0;
    second.wall_seconds = 0.0;
    assert_eq!(serde_json::to_string(&first).unwrap(), serde_json::to_string(&second).unwrap());
    let mut other = run("snapshot-cow", &[("jobs.0.count", "256"), ("seed", "4")]);
    other.wall_seconds = 0.0;
    assert_ne!(serde_json::to_string(&first).unwrap(), serde_json::to_string(&other).unwrap(), "the seed matters");
}

const SMALL: &str = r#"
seed = 1
[disks.a]
len_sectors = "4M"
latency.read = { cost_us = 10, bandwidth_bytes_per_s = "1G" }
[disks.b]
len_sectors = "4M"
content = "zero"
latency.write = { cost_us = 10, bandwidth_bytes_per_s = "1G" }
[[jobs]]
kind = "copy"
source = "a"
targets = ["b"]
"#;

#[test]
fn bad_scenarios_name_what_is_wrong() {
    let error = |text: &str| Scenario::from_toml(text).unwrap_err();
    let unknown_key = error(&SMALL.replace("seed = 1", "seed = 1\n[client]\nsubjob_size = 4096")).to_string();
    assert!(unknown_key.contains("subjob_size"), "{unknown_key}");
    let unknown_disk_key = error(&SMALL.replace("content = \"zero\"", "colour = \"zero\"")).to_string();
    assert!(unknown_disk_key.contains("colour"), "{unknown_disk_key}");
    assert!(
        matches!(error(&SMALL.replace("targets = [\"b\"]", "targets = [\"c\"]")), ScenarioError::UnknownDisk { disk, .. } if disk == "c")
    );
    assert!(matches!(
        error(&format!("{SMALL}len_sectors = \"2M\"\nsource_start_sector = \"3M\"\n")),
        ScenarioError::OutOfRange { start_sector: 6144, .. }
    ));
    assert!(matches!(error(&format!("{SMALL}count = 0\n")), ScenarioError::Invalid { .. }));
    assert!(matches!(
        error(&SMALL.replace("len_sectors = \"4M\"", "len_sectors = \"1000\"")),
        ScenarioError::Unit { .. } | ScenarioError::Key { .. }
    ));
    assert!(matches!(
        error(&format!("{SMALL}[foreground]\ndisk = \"a\"\nio_size_bytes = 1000\n")),
        ScenarioError::Invalid { what, .. } if what == "foreground"
    ));
    let no_timing = SMALL.replace("latency.read = { cost_us = 10, bandwidth_bytes_per_s = \"1G\" }", "");
    assert!(error(&format!("{no_timing}[foreground]\ndisk = \"a\"\n")).to_string().contains("timing model"));
    let dense = SMALL.replace("[disks.a]\nlen_sectors = \"4M\"", "[disks.a]\nsparse = false\nlen_sectors = \"8G\"");
    assert!(error(&dense).to_string().contains("dense"));
    assert!(matches!(error("[disks.a]\nlen_sectors = 8\n"), ScenarioError::Invalid { .. }), "nothing to run");
    let mixed =
        SMALL.replace("[disks.a]\nlen_sectors = \"4M\"", "[disks.a]\nheaders_only = true\nlen_sectors = \"4M\"");
    assert!(error(&mixed).to_string().contains("headers_only"), "one disk alone cannot be headers-only");
    assert!(matches!(
        error(&SMALL.replace("seed = 1", "seed = 1\n[client]\npage_budget = 0")),
        ScenarioError::Client { .. }
    ));
}

#[test]
fn sparse_scenarios_run_headers_only_unless_told_and_the_answer_is_the_same() {
    let fast = Scenario::from_toml(SMALL).unwrap();
    assert!(fast.disks.values().all(|d| d.options.sparse && d.options.headers_only));
    let whole = Scenario::from_toml(&SMALL.replace("seed = 1", "seed = 1\n[disks.c]\nlen_sectors = 8\nsparse = false"))
        .unwrap();
    assert!(whole.disks.values().all(|d| !d.options.headers_only), "a dense disk: whole sectors everywhere");
    let told = SMALL
        .replace("[disks.b]\n", "[disks.b]\nheaders_only = false\n")
        .replace("[disks.a]\n", "[disks.a]\nheaders_only = false\n");
    let told = Scenario::from_toml(&told).unwrap();
    assert!(told.disks.values().all(|d| !d.options.headers_only));
    let (mut a, mut b) = (explore::run(&fast).unwrap(), explore::run(&told).unwrap());
    a.wall_seconds = 0.0;
    b.wall_seconds = 0.0;
    assert_eq!(serde_json::to_string(&a).unwrap(), serde_json::to_string(&b).unwrap(), "same requests, same times");
}

#[test]
fn a_sweep_runs_the_cross_product_in_order() {
    let tree = parse_tree(SMALL).unwrap();
    let varies = [
        Vary::parse("client.subjob_size_bytes=64K,256K").unwrap(),
        Vary::parse("client.subjobs_in_flight=1,4").unwrap(),
    ];
    let done = std::sync::atomic::AtomicUsize::new(0);
    let points = explore::sweep(&tree, std::path::Path::new("."), &varies, 2, &|_| {
        done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    })
    .unwrap();
    assert_eq!(done.into_inner(), 4);
    let chosen: Vec<Vec<&str>> = points.iter().map(|p| p.values.iter().map(|(_, v)| v.as_str()).collect()).collect();
    assert_eq!(chosen, [["64K", "1"], ["64K", "4"], ["256K", "1"], ["256K", "4"]]);
    // Each point ran with its own values: the request sizes say so.
    assert_eq!(points[0].report.io_sizes[0].size_bytes, 64 * 1024);
    assert_eq!(points[3].report.io_sizes[0].size_bytes, 256 * 1024);
    assert!(points[1].report.throughput_mb_per_s > points[0].report.throughput_mb_per_s, "deeper is faster here");
    // A bad value is found before anything runs, and the point is named.
    let bad = [Vary::parse("client.subjobs_in_flight=4,0").unwrap()];
    let error =
        explore::sweep(&tree, std::path::Path::new("."), &bad, 2, &|_| panic!("nothing runs")).unwrap_err().to_string();
    assert!(error.contains("client.subjobs_in_flight=0"), "{error}");
    assert!(Vary::parse("client.subjobs_in_flight").is_err());
    assert!(Vary::parse("=1,2").is_err());
}

#[test]
fn a_sweep_asked_to_stop_runs_no_new_point_and_returns_those_done() {
    let tree = parse_tree(SMALL).unwrap();
    let varies = [Vary::parse("client.subjobs_in_flight=1,2,3,4").unwrap()];
    let stop = std::sync::atomic::AtomicBool::new(false);
    // One thread: the first point done asks to stop, so the other three never start.
    let points = explore::sweep_until(
        &tree,
        std::path::Path::new("."),
        &varies,
        1,
        &|_| stop.store(true, std::sync::atomic::Ordering::Release),
        &stop,
    )
    .unwrap();
    let chosen: Vec<&str> = points.iter().map(|p| p.values[0].1.as_str()).collect();
    assert_eq!(chosen, ["1"]);
}

#[test]
fn a_disk_longer_than_64_bits_of_bytes_is_refused() {
    // 2^55 sectors are 2^64 bytes: one past the largest byte offset.
    let huge = SMALL.replace("[disks.a]\nlen_sectors = \"4M\"", "[disks.a]\nlen_sectors = 36028797018963968");
    assert_ne!(huge, SMALL);
    let error = Scenario::from_toml(&huge).unwrap_err();
    assert!(
        matches!(&error, ScenarioError::DiskTooLarge { disk, len_sectors: 36028797018963968 } if disk == "a"),
        "{error}"
    );
    // One block less fits (a sparse disk), and is no error of its own.
    let largest = SMALL.replace("[disks.a]\nlen_sectors = \"4M\"", "[disks.a]\nlen_sectors = 36028797018963960");
    assert!(!matches!(Scenario::from_toml(&largest), Err(ScenarioError::DiskTooLarge { .. })));
}

#[test]
fn a_throttled_resync_hurts_the_reader_less() {
    let edits = [("disks.primary.len_sectors", "256M"), ("disks.mirror.len_sectors", "256M")];
    let mut tree = parse_tree(&text("hdd-mirror-resync")).unwrap();
    for (key, value) in edits.iter().chain(&[("client.throttle.rate_bytes_per_s", "10M")]) {
        set_path(&mut tree, key, parse_value(value)).unwrap();
    }
    let throttled = match Scenario::from_value(tree) {
        Ok(scenario) => explore::run(&scenario).unwrap(),
        Err(error) if error.to_string().contains("throttle") => {
            println!("SKIPPED: this engine's ClientConfig has no throttle ({error})");
            return;
        }
        Err(error) => panic!("{error}"),
    };
    let free = run("hdd-mirror-resync", &edits);
    let (throttled_p99, free_p99) =
        (throttled.foreground.unwrap().with_jobs.p99_ms, free.foreground.unwrap().with_jobs.p99_ms);
    assert!(throttled_p99 < free_p99, "throttled p99 {throttled_p99} ms, unthrottled {free_p99} ms");
    assert!(
        (throttled.throughput_mb_per_s - 10.0 * 1.048_576).abs() < 1.0,
        "10 MiB/s: {}",
        throttled.throughput_mb_per_s
    );
}

#[test]
fn disks_take_their_timing_from_a_model_file_and_may_share_one_device() {
    let dir = std::env::temp_dir().join(format!("kcopyd-scenario-models-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let model = "description = \"test\"\n[latency.read]\ncost_us = 10\nbandwidth_bytes_per_s = 1_000_000_000\n\
                 [latency.write]\ncost_us = 10\nbandwidth_bytes_per_s = 1_000_000_000\n[latency.path]\nshared = true\n";
    std::fs::write(dir.join("ssd.toml"), model).unwrap();
    std::fs::write(dir.join("one-device.toml"), format!("one_device = true\n{model}")).unwrap();
    std::fs::write(dir.join("bad.toml"), format!("{model}colour = 1\n")).unwrap();
    let scenario = |a: &str, b: &str| {
        format!(
            "[disks.a]\nlen_sectors = \"64M\"\n{a}\n[disks.b]\nlen_sectors = \"64M\"\ncontent = \"zero\"\n{b}\n\
             [[jobs]]\nkind = \"copy\"\nsource = \"a\"\ntargets = [\"b\"]\n"
        )
    };
    let throughput = |a: &str, b: &str| {
        let scenario = Scenario::from_value_in(parse_tree(&scenario(a, b)).unwrap(), &dir).unwrap();
        explore::run(&scenario).unwrap().throughput_mb_per_s
    };
    // Two devices: reads of one and writes of the other overlap, near 1 GB/s.
    let separate = throughput("model = \"ssd.toml\"", "model = \"ssd.toml\"");
    assert!(separate > 900.0, "{separate}");
    // One device whose reads and writes share a path: half.
    let shared = throughput("model = \"ssd.toml\"\nmedium = \"dev\"", "model = \"ssd.toml\"\nmedium = \"dev\"");
    assert!((shared / separate - 0.5).abs() < 0.05, "{shared} vs {separate}");
    // A model measured as one device puts its disks on one medium by itself.
    let one_device = throughput("model = \"one-device.toml\"", "model = \"one-device.toml\"");
    assert!((one_device / shared - 1.0).abs() < 0.01, "{one_device} vs {shared}");
    // The disk's own keys override the model's.
    let slow =
        throughput("model = \"ssd.toml\"", "model = \"ssd.toml\"\nlatency.write.bandwidth_bytes_per_s = 100_000_000");
    assert!((slow - 100.0).abs() < 5.0, "{slow}");
    // A model file with a key the model does not have, or no file at all, is refused by name.
    for (file, needle) in [("bad.toml", "colour"), ("missing.toml", "missing.toml")] {
        let error = Scenario::from_value_in(parse_tree(&scenario(&format!("model = \"{file}\""), "")).unwrap(), &dir)
            .unwrap_err();
        assert!(matches!(&error, ScenarioError::Model { disk, .. } if disk == "a"), "{error}");
        assert!(error.to_string().contains(needle), "{error}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_scenario_with_the_old_key_names_still_reads_and_old_edits_set_the_new_key() {
    let new = Scenario::from_toml(&format!("{SMALL}[client]\nsubjob_size_bytes = \"64K\"\n")).unwrap();
    let old = Scenario::from_toml(&format!("{SMALL}[client]\nsub_job_size_bytes = \"64K\"\n")).unwrap();
    assert_eq!(old.client.subjob_size_bytes, 64 << 10);
    assert_eq!(old.client, new.client);
    // An edit by the old name (`--vary client.sub_job_size_bytes=…`) replaces the key, in a
    // file of either spelling.
    for file in ["subjob_size_bytes", "sub_job_size_bytes"] {
        let mut tree = parse_tree(&format!("{SMALL}[client]\n{file} = \"64K\"\n")).unwrap();
        set_path(&mut tree, "client.sub_job_size_bytes", parse_value("256K")).unwrap();
        assert_eq!(Scenario::from_value(tree).unwrap().client.subjob_size_bytes, 256 << 10, "{file}");
    }
    let both = format!("{SMALL}[client]\nsub_job_size_bytes = \"64K\"\nsubjob_size_bytes = \"64K\"\n");
    let error = Scenario::from_toml(&both).unwrap_err().to_string();
    assert!(error.contains("client.subjob_size_bytes") && error.contains("old name 'sub_job_size_bytes'"), "{error}");
    // The engine's own configuration reads the old name too.
    let config: kcopyd_core::ClientConfig = serde_json::from_str(r#"{ "sub_job_size_bytes": 65536 }"#).unwrap();
    assert_eq!(config.subjob_size_bytes, 64 << 10);
}
