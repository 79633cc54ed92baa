//! The `kcopyd` command, run as a program: copies, zeroes, comparisons, the demo, Ctrl-C,
//! progress, exit codes and one-line errors that leave every target as it was.
//!
//! Tests that need root, a loop device, `chattr`, `script` or `strace` print `SKIPPED: reason`
//! where they cannot run.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use kcopyd_tests::fixtures::{Ext4OnLoop, LoopDevice, Mount, TempDir, is_root, pattern, run, skip};
use serde_json::Value;

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

/// What one run of the command did.
#[derive(Debug)]
struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
}

fn kcopyd(args: &[&str]) -> Ran {
    let output = Command::new(env!("CARGO_BIN_EXE_kcopyd")).args(args).output().expect("the kcopyd binary runs");
    ran(output)
}

fn ran(output: Output) -> Ran {
    Ran {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn s(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 path")
}

fn json(ran: &Ran) -> Value {
    serde_json::from_str(&ran.stdout).unwrap_or_else(|e| panic!("one JSON object on stdout ({e}): {ran:?}"))
}

/// Exit 2, nothing on stdout, and exactly one line on stderr holding every needle.
fn assert_usage_error(ran: &Ran, needles: &[&str]) {
    assert_eq!(ran.code, 2, "{ran:?}");
    assert!(ran.stdout.is_empty(), "nothing on stdout: {ran:?}");
    let lines: Vec<&str> = ran.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line on stderr: {:?}", ran.stderr);
    for needle in needles {
        assert!(lines[0].contains(needle), "{needle:?} in {:?}", lines[0]);
    }
}

/// The bytes of each path (`None` if it does not exist).
fn contents(paths: &[&Path]) -> Vec<Option<Vec<u8>>> {
    paths.iter().map(|p| fs::read(p).ok()).collect()
}

fn ranges(value: &Value) -> Vec<[u64; 2]> {
    value
        .as_array()
        .expect("an array of ranges")
        .iter()
        .map(|r| [r[0].as_u64().unwrap(), r[1].as_u64().unwrap()])
        .collect()
}

fn covers(outer: &[[u64; 2]], inner: [u64; 2]) -> bool {
    outer.iter().any(|[start, end]| *start <= inner[0] && inner[1] <= *end)
}

// ---- copy ---------------------------------------------------------------------------------

#[test]
fn a_copy_asking_for_more_subjobs_than_its_memory_holds_says_so_and_a_default_budget_holds_them() {
    let dir = TempDir::new("cli-budget");
    let (source, target) = (dir.path().join("source.img"), dir.path().join("target.img"));
    fs::write(&source, pattern(7, 8 * MIB)).unwrap();
    let copy = |extra: &[&str]| {
        let mut args = vec!["copy", s(&source), s(&target), "--json"];
        args.extend_from_slice(extra);
        let ran = kcopyd(&args);
        assert_eq!(ran.code, 0, "{ran:?}");
        assert_eq!(fs::read(&target).unwrap(), fs::read(&source).unwrap());
        let pages = json(&ran)["stats"]["pool"]["pages_total"].as_u64().unwrap();
        (pages * 4096, ran.stderr)
    };
    let (budget, stderr) = copy(&["--subjob-size", "2M", "--subjobs-in-flight", "16"]);
    assert_eq!((budget, stderr.as_str()), (32 << 20, ""), "the default budget holds 16 sub-jobs of 2M");
    let (budget, stderr) = copy(&["--subjob-size", "2M", "--subjobs-in-flight", "16", "--memory", "16M"]);
    assert_eq!(budget, 16 << 20, "a given budget is kept");
    assert_eq!(
        stderr.trim_end(),
        "kcopyd: note: --memory 16M holds 8 sub-jobs of 2M at once, not the 16 asked for (--memory 32M holds them all)"
    );
    let (_, stderr) = copy(&["--subjob-size", "2M", "--subjobs-in-flight", "8", "--memory", "16M"]);
    assert_eq!(stderr, "", "8 sub-jobs of 2M fit 16M");
    let (_, stderr) = copy(&["--subjob-size", "2M", "--subjobs-in-flight", "16", "--memory", "16M", "--quiet"]);
    assert_eq!(stderr, "", "--quiet says nothing");
    // Sub-jobs take whole pages: 4 of 6K take 32K, not 24K.
    let (budget, stderr) = copy(&["--subjob-size", "6K", "--subjobs-in-flight", "4", "--memory", "24K"]);
    assert_eq!(budget, 24 << 10);
    assert_eq!(
        stderr.trim_end(),
        "kcopyd: note: --memory 24K holds 3 sub-jobs of 6K at once, not the 4 asked for (--memory 32K holds them all)"
    );
}

#[test]
fn more_subjobs_in_flight_than_a_file_runs_at_once_are_noted_for_each_file_and_still_copied() {
    let dir = TempDir::new("cli-queue-depth");
    let (source, target) = (dir.path().join("source.img"), dir.path().join("target.img"));
    fs::write(&source, pattern(8, 3 * MIB)).unwrap();
    let run = |command: &str, count: &str, extra: &[&str]| {
        let mut args = vec![command, s(&source), s(&target), "--subjob-size", "4K", "--subjobs-in-flight", count];
        args.extend_from_slice(extra);
        let ran = kcopyd(&args);
        assert_eq!(ran.code, 0, "{ran:?}");
        assert_eq!(fs::read(&target).unwrap(), fs::read(&source).unwrap());
        ran.stderr
    };
    let note = |role: &str, path: &Path, asked: u32| {
        format!(
            "kcopyd: note: {role} '{}': a file or block device runs at most 256 I/Os at once, not the {asked} \
             sub-jobs asked for (the others wait in its queue)\n",
            path.display()
        )
    };
    let both = format!("{}{}", note("SOURCE", &source, 300), note("TARGET", &target, 300));
    assert_eq!(run("copy", "300", &[]), both);
    assert_eq!(run("verify", "300", &[]), both, "verify runs sub-jobs on the same devices");
    assert_eq!(run("copy", "256", &[]), "", "256 at once: every sub-job asked for");
    assert_eq!(run("copy", "300", &["--quiet"]), "", "--quiet says nothing");
    let zeroed = kcopyd(&["zero", s(&target), "--subjob-size", "4K", "--subjobs-in-flight", "300"]);
    assert_eq!(zeroed.code, 0, "{zeroed:?}");
    assert_eq!(zeroed.stderr, note("TARGET", &target, 300), "zero opens only its targets");
    assert!(fs::read(&target).unwrap().iter().all(|&b| b == 0));
}

#[test]
fn copy_to_a_new_file_and_an_offset_then_verify() {
    let dir = TempDir::new("cli-copy");
    let data = pattern(1, 3 * MIB);
    let source = dir.file_with("source.img", &data);
    let old = pattern(2, 5 * MIB);
    let existing = dir.file_with("existing.img", &old);
    let created = dir.join("created.img");
    let target_at_1m = format!("{}@1M", s(&existing));
    let ran = kcopyd(&["copy", s(&source), s(&created), &target_at_1m, "--verify"]);
    assert_eq!(ran.code, 0, "{ran:?}");
    assert!(ran.stderr.is_empty(), "no progress off a terminal: {ran:?}");
    assert!(ran.stdout.contains("copied 3 MiB"), "{}", ran.stdout);
    assert!(ran.stdout.contains("verify: identical"), "{}", ran.stdout);
    assert_eq!(fs::read(&created).unwrap(), data, "a missing target is created with the length it needs");
    let after = fs::read(&existing).unwrap();
    assert_eq!(after.len(), old.len(), "an existing target keeps its length");
    assert_eq!(&after[..MIB], &old[..MIB]);
    assert_eq!(&after[MIB..4 * MIB], &data[..]);
    assert_eq!(&after[4 * MIB..], &old[4 * MIB..]);
}

#[test]
fn sizes_and_offsets_take_binary_units_and_sectors() {
    let dir = TempDir::new("cli-units");
    let data = pattern(3, 2 * MIB);
    let source = dir.file_with("source.img", &data);
    let old = pattern(4, 2 * MIB);
    let target = dir.file_with("target.img", &old);
    let cases: [(&str, &str, &str, usize, usize, usize); 4] = [
        // source offset, target offset, length, and the same in bytes
        ("@8s", "@1KiB", "1.5K", 4096, 1024, 1536),
        ("@0", "@1M", "4K", 0, MIB, 4096),
        ("@64K", "@0", "16s", 64 * KIB, 0, 8192),
        ("@1MiB", "@512K", "512", MIB, 512 * KIB, 512),
    ];
    let mut expected = old.clone();
    for (source_at, target_at, length, source_offset, target_offset, len) in cases {
        let ran = kcopyd(&[
            "copy",
            &format!("{}{source_at}", s(&source)),
            &format!("{}{target_at}", s(&target)),
            "--length",
            length,
            "--json",
        ]);
        assert_eq!(ran.code, 0, "{ran:?}");
        assert_eq!(json(&ran)["bytes"], len as u64, "{length}");
        expected[target_offset..target_offset + len].copy_from_slice(&data[source_offset..source_offset + len]);
        assert_eq!(fs::read(&target).unwrap(), expected, "{source_at} {target_at} {length}");
    }
}

#[test]
fn engine_options_and_buffered_mode_copy_the_same_bytes() {
    let dir = TempDir::new("cli-options");
    let data = pattern(5, 3 * MIB + 4 * KIB);
    let source = dir.file_with("source.img", &data);
    for (name, extra) in [
        ("small.img", vec!["--subjob-size", "64K", "--subjobs-in-flight", "3", "--memory", "128K"]),
        ("one-page.img", vec!["--subjob-size", "4K", "--subjobs-in-flight", "1", "--memory", "4K"]),
        ("buffered.img", vec!["--buffered", "--write-seq"]),
        ("ignore.img", vec!["--ignore-errors", "--quiet"]),
    ] {
        let target = dir.join(name);
        let mut args = vec!["copy", s(&source), s(&target)];
        args.extend(extra.iter().copied());
        let ran = kcopyd(&args);
        assert_eq!(ran.code, 0, "{extra:?}: {ran:?}");
        assert_eq!(fs::read(&target).unwrap(), data, "{extra:?}");
        if extra.contains(&"--quiet") {
            assert!(ran.stdout.is_empty() && ran.stderr.is_empty(), "quiet: {ran:?}");
        }
    }
}

#[test]
fn io_engine_takes_sync_or_uring_and_names_the_flag_otherwise() {
    let dir = TempDir::new("cli-io-engine");
    let data = pattern(25, 2 * MIB);
    let source = dir.file_with("source.img", &data);
    let target = dir.join("sync.img");
    let ran = kcopyd(&["copy", s(&source), s(&target), "--io-engine", "sync"]);
    assert_eq!(ran.code, 0, "{ran:?}");
    assert_eq!(fs::read(&target).unwrap(), data);
    let other = dir.join("other.img");
    let ran = kcopyd(&["copy", s(&source), s(&other), "--io-engine", "aio"]);
    assert_usage_error(&ran, &["--io-engine", "aio"]);
    assert!(!other.exists(), "nothing was created");
}

/// Built without the `io-uring` feature, `--io-engine uring` is a usage error naming the flag,
/// and no target is created.
#[cfg(not(feature = "io-uring"))]
#[test]
fn io_engine_uring_without_the_feature_is_a_usage_error() {
    let dir = TempDir::new("cli-io-engine-uring");
    let source = dir.file_with("source.img", &pattern(26, MIB));
    let target = dir.join("target.img");
    let ran = kcopyd(&["copy", s(&source), s(&target), "--io-engine", "uring"]);
    assert_usage_error(&ran, &["--io-engine", "uring", "io-uring"]);
    assert!(!target.exists(), "nothing was created");
}

/// Built with the `io-uring` feature, `--io-engine uring` copies to three targets byte for
/// byte (or, where the kernel refuses io_uring, fails to open naming it).
#[cfg(feature = "io-uring")]
#[test]
fn io_engine_uring_copies_to_three_targets() {
    let dir = TempDir::new("cli-io-engine-uring");
    let data = pattern(27, 5 * MIB + 4 * KIB);
    let source = dir.file_with("source.img", &data);
    let targets: Vec<PathBuf> = (0..3).map(|i| dir.join(&format!("target-{i}.img"))).collect();
    let mut args = vec!["copy", s(&source)];
    args.extend(targets.iter().map(|target| s(target)));
    args.extend(["--io-engine", "uring", "--subjob-size", "256K", "--verify"]);
    let ran = kcopyd(&args);
    if ran.code == 2 && ran.stderr.contains("setting up io_uring") {
        return skip("io_engine_uring_copies_to_three_targets", format!("io_uring is not available: {}", ran.stderr));
    }
    assert_eq!(ran.code, 0, "{ran:?}");
    assert!(ran.stdout.contains("verify: identical"), "{}", ran.stdout);
    for target in &targets {
        assert_eq!(fs::read(target).unwrap(), data, "{}", target.display());
    }
}

#[test]
fn json_report_has_bytes_seconds_throughput_and_per_target_status() {
    let dir = TempDir::new("cli-json");
    let source = dir.file_with("source.img", &pattern(6, 2 * MIB));
    let target = dir.join("target.img");
    let ran = kcopyd(&["copy", s(&source), s(&target), "sim:", "--json", "--verify"]);
    assert_eq!(ran.code, 0, "{ran:?}");
    let report = json(&ran);
    assert_eq!(report["command"], "copy");
    assert_eq!(report["status"], "ok");
    assert_eq!(report["exit_code"], 0);
    assert_eq!(report["bytes"], 2 * MIB as u64);
    assert_eq!(report["bytes_total"], 2 * MIB as u64);
    assert!(report["seconds"].as_f64().unwrap() > 0.0);
    assert!(report["throughput_bytes_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(report["cancelled"], false);
    assert_eq!(report["source"]["device"], s(&source));
    assert!(ranges(&report["source"]["read_failed_sectors"]).is_empty());
    let targets = report["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 2);
    assert_eq!(targets[0]["device"], s(&target));
    assert_eq!(targets[1]["device"], "sim:");
    for target in targets {
        assert_eq!(target["status"], "ok");
        assert!(ranges(&target["write_failed_sectors"]).is_empty());
        assert!(ranges(&target["not_copied_sectors"]).is_empty());
        assert_eq!(target["verify"]["status"], "identical");
    }
    assert_eq!(report["verify"]["identical"], true);
    assert_eq!(report["verify"]["bytes"], 2 * MIB as u64);
}

#[test]
fn simulated_faults_give_exit_1_and_the_failed_ranges() {
    // 8 MiB in 2 MiB sub-jobs: a latent error in the first chunk, a bad write in the third.
    let source = "sim:size=8M,seed=3,bad-read=100-108";
    let ran = kcopyd(&["copy", source, "sim:", "sim:bad-write=9000-9010", "--ignore-errors", "--json", "--verify"]);
    assert_eq!(ran.code, 1, "{ran:?}");
    let report = json(&ran);
    assert_eq!(report["status"], "errors");
    assert_eq!(report["exit_code"], 1);
    assert_eq!(ranges(&report["source"]["read_failed_sectors"]), vec![[100, 108]], "narrowed to the bad sectors");
    let targets = report["targets"].as_array().unwrap();
    assert_eq!(targets[0]["status"], "incomplete");
    assert_eq!(ranges(&targets[0]["not_copied_sectors"]), vec![[100, 108]]);
    assert!(ranges(&targets[0]["write_failed_sectors"]).is_empty());
    assert_eq!(targets[1]["status"], "write_errors");
    let write_failed = ranges(&targets[1]["write_failed_sectors"]);
    assert!(covers(&write_failed, [9000, 9010]), "{write_failed:?}");
    let not_copied = ranges(&targets[1]["not_copied_sectors"]);
    assert!(covers(&not_copied, [100, 108]) && covers(&not_copied, [9000, 9010]), "{not_copied:?}");
    // Read back, the targets match wherever the copy said it copied.
    assert_eq!(report["verify"]["identical"], true, "{report}");

    let text = kcopyd(&["copy", source, "sim:", "sim:bad-write=9000-9010", "--ignore-errors"]);
    assert_eq!(text.code, 1, "{text:?}");
    assert!(text.stdout.contains("with errors"), "{}", text.stdout);
    assert!(text.stdout.contains("read errors at 100-108"), "{}", text.stdout);
    assert!(text.stdout.contains("target sim:bad-write=9000-9010: write errors; write failed at"), "{}", text.stdout);

    // Without --ignore-errors the job stops at the first error: still exit 1, with a report.
    let stopped = kcopyd(&["copy", source, "sim:", "--json"]);
    assert_eq!(stopped.code, 1, "{stopped:?}");
    let report = json(&stopped);
    assert_eq!(report["status"], "errors");
    assert!(!ranges(&report["targets"][0]["not_copied_sectors"]).is_empty());
}

#[test]
fn the_summary_says_how_much_was_copied_and_verified() {
    // Without --ignore-errors the first sub-job fails and nothing lands.
    let failing = "sim:size=64M,seed=1,bad-read=100-108";
    let ran = kcopyd(&["copy", failing, "sim:"]);
    assert_eq!(ran.code, 1, "{ran:?}");
    let headline = ran.stdout.lines().next().unwrap();
    assert!(headline.starts_with("copied 0 B of 64 MiB") && headline.contains("64 MiB not copied"), "{headline}");
    let report = json(&kcopyd(&["copy", failing, "sim:", "--json"]));
    assert_eq!((report["bytes_copied"].as_u64(), report["bytes_not_copied"].as_u64()), (Some(0), Some(64 << 20)));
    assert_eq!(report["targets"][0]["bytes_not_copied"], 64 << 20);
    // With it, all but the unreadable 4 KiB; the verification says what it skipped.
    let ran = kcopyd(&["copy", failing, "sim:", "--ignore-errors", "--verify"]);
    assert_eq!(ran.code, 1, "{ran:?}");
    assert!(ran.stdout.starts_with("copied 63.99 MiB of 64 MiB"), "{}", ran.stdout);
    assert!(ran.stdout.contains("with errors: 4 KiB not copied"), "{}", ran.stdout);
    assert!(ran.stdout.contains("verified 63.99 MiB (4 KiB skipped: not copied)"), "{}", ran.stdout);
    let report = json(&kcopyd(&["copy", failing, "sim:", "--ignore-errors", "--verify", "--json"]));
    assert_eq!(report["bytes_copied"].as_u64(), Some((64 << 20) - 4096));
    assert_eq!(
        (report["verify"]["bytes_skipped"].as_u64(), report["verify"]["bytes_verified"].as_u64()),
        (Some(4096), Some((64 << 20) - 4096))
    );
    // A clean copy says so.
    let report = json(&kcopyd(&["copy", "sim:size=1M,seed=1", "sim:", "--json"]));
    assert_eq!((report["bytes_copied"].as_u64(), report["bytes_not_copied"].as_u64()), (Some(MIB as u64), Some(0)));
}

#[test]
fn a_failing_device_and_a_misdirected_write_are_reported_and_caught_by_verify() {
    // The target fails from its fourth request on: 1 MiB sub-jobs, so 3 MiB land and 5 MiB
    // fail, and the report says exactly which.
    let ran = kcopyd(&["copy", "sim:size=8M,seed=3", "sim:fail-after=3", "--ignore-errors", "--json", "--verify"]);
    assert_eq!(ran.code, 1, "{ran:?}");
    let report = json(&ran);
    let target = &report["targets"][0];
    assert_eq!(target["status"], "write_errors", "{report}");
    let failed = ranges(&target["write_failed_sectors"]);
    assert_eq!(failed.iter().map(|[a, b]| b - a).sum::<u64>(), 5 * 2048, "{failed:?}");
    assert_eq!(ranges(&target["not_copied_sectors"]), failed);
    // The failed device cannot be read back either, and verify says so.
    assert_eq!(target["verify"]["status"], "unreadable", "{report}");
    assert_eq!(ranges(&target["verify"]["read_failed_sectors"]), vec![[0, 16384]]);

    // The second write lands 8 MiB further on, past the copied range, and reports success:
    // the copy believes it, the read-back does not.
    let ran = kcopyd(&["copy", "sim:size=8M,seed=3", "sim:size=16M,misdirect=1:16384", "--json", "--verify"]);
    assert_eq!(ran.code, 1, "{ran:?}");
    let report = json(&ran);
    assert_eq!(report["status"], "differences", "{report}");
    let target = &report["targets"][0];
    assert!(ranges(&target["not_copied_sectors"]).is_empty(), "the engine saw no error: {report}");
    // Exactly one 1 MiB sub-job never arrived (the second write issued; which chunk that is
    // depends on the order the slots run in).
    let differing = ranges(&target["verify"]["differing_sectors"]);
    assert!(matches!(differing[..], [[start, end]] if start % 2048 == 0 && end == start + 2048), "{report}");
}

#[test]
fn headers_only_sim_devices_copy_verify_and_catch_a_misdirected_write() {
    // 32 MiB through 2 MiB of pages: copy and read-back reuse their pages many times over.
    let fast = ["--memory", "2M", "--subjob-size", "256K", "--json", "--verify"];
    let ran = kcopyd(
        &[&["copy", "sim:size=32M,seed=3,sparse=on,headers-only=on", "sim:headers-only=on"][..], &fast].concat(),
    );
    assert_eq!(ran.code, 0, "{ran:?}");
    assert_eq!(json(&ran)["targets"][0]["verify"]["status"], "identical", "{ran:?}");

    let astray = "sim:size=32M,headers-only=on,misdirect=1:1024";
    let ran = kcopyd(&[&["copy", "sim:size=32M,seed=3,headers-only=on", astray][..], &fast].concat());
    assert_eq!(ran.code, 1, "{ran:?}");
    let report = json(&ran);
    assert_eq!(report["status"], "differences", "{report}");
    // Where the second write was aimed nothing else writes: at least its 512 sectors differ.
    let differing = ranges(&report["targets"][0]["verify"]["differing_sectors"]);
    assert!(differing.iter().map(|[a, b]| b - a).sum::<u64>() >= 512, "{report}");

    // Mixed with a whole-sector device: refused before anything is opened.
    let ran = kcopyd(&["copy", "sim:size=1M,seed=3,headers-only=on", "sim:"]);
    assert_usage_error(&ran, &["TARGET 'sim:'", "headers-only=on"]);
    let ran = kcopyd(&["verify", "sim:size=1M,seed=3", "sim:size=1M,headers-only=on"]);
    assert_usage_error(&ran, &["SOURCE 'sim:size=1M,seed=3'", "headers-only=on"]);
}

#[test]
fn files_of_any_size_are_copied_zeroed_and_verified_whole() {
    let test = "files_of_any_size_are_copied_zeroed_and_verified_whole";
    let dir = TempDir::new("cli-any-size");
    let data = pattern(7, 1_000_001);
    let source = dir.file_with("source.img", &data);
    for (name, mode) in [("direct.img", None), ("buffered.img", Some("--buffered"))] {
        let target = dir.join(name);
        let mut args = vec!["copy", s(&source), s(&target), "--verify", "--json"];
        args.extend(mode);
        let ran = kcopyd(&args);
        assert_eq!(ran.code, 0, "{ran:?}");
        assert!(ran.stderr.is_empty(), "nothing left out, nothing to warn about: {ran:?}");
        let report = json(&ran);
        assert_eq!((report["bytes"].as_u64(), report["bytes_total"].as_u64()), (Some(1_000_001), Some(1_000_001)));
        assert_eq!(report["verify"]["bytes"], 1_000_001);
        assert_eq!(fs::read(&target).unwrap(), data, "{name}: every byte, and the same length");
    }
    // A file of under one block, into an existing longer file at an offset.
    let small = dir.file_with("small.img", &pattern(8, 1000));
    let old = pattern(9, 8192);
    let existing = dir.file_with("existing.img", &old);
    let ran = kcopyd(&["copy", s(&small), &format!("{}@4K", s(&existing)), "--verify"]);
    assert_eq!(ran.code, 0, "{ran:?}");
    let after = fs::read(&existing).unwrap();
    assert_eq!(
        (&after[..4096], &after[4096..5096], &after[5096..]),
        (&old[..4096], &pattern(8, 1000)[..], &old[5096..])
    );
    // A difference in the last, partial block is found.
    let target = dir.join("direct.img");
    let mut changed = data.clone();
    changed[1_000_000] ^= 1;
    fs::write(&target, &changed).unwrap();
    let report = json(&kcopyd(&["verify", s(&source), s(&target), "--json"]));
    assert_eq!(report["status"], "differences");
    assert_eq!(report["targets"][0]["verify"]["differing_blocks"], 1);
    assert_eq!(report["targets"][0]["verify"]["first_differing_sector"], 1_000_000 / 512);
    // Zeroed whole, partial last block too.
    let ran = kcopyd(&["zero", s(&target)]);
    assert_eq!(ran.code, 0, "{ran:?}");
    assert_eq!(fs::read(&target).unwrap(), vec![0; 1_000_001]);
    // A length that ends inside a block and not at the end of the source: refused as before.
    let ran = kcopyd(&["copy", s(&source), s(&dir.join("short.img")), "--length", "1000"]);
    assert_usage_error(&ran, &["--length", "1000", "partial block"]);
    // A block device takes whole blocks only: refused, naming the length that fits.
    let backing = dir.zero_file("backing.img", 2 * MIB as u64);
    let Some(device) = LoopDevice::attach_or_skip(test, &backing, 512) else { return };
    let ran = kcopyd(&["copy", s(&source), s(device.path())]);
    assert_usage_error(&ran, &["--length", "1000001", "whole blocks", "--length 999936"]);
    assert_eq!(fs::read(&backing).unwrap(), vec![0; 2 * MIB], "nothing written");
    let ran = kcopyd(&["copy", s(&source), s(device.path()), "--length", "999936"]);
    assert_eq!(ran.code, 0, "{ran:?}");
}

#[test]
fn the_engine_limit_of_128_targets_is_reachable() {
    let mut args = vec!["copy", "sim:size=1M,seed=9", "--json"];
    args.extend(std::iter::repeat_n("sim:", 128));
    let ran = kcopyd(&args);
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    assert_eq!(json(&ran)["targets"].as_array().unwrap().len(), 128);
}

// ---- bad input: exit 2, one line, nothing written -----------------------------------------

#[test]
fn a_missing_source_changes_nothing() {
    let dir = TempDir::new("cli-missing");
    let existing = dir.file_with("existing.img", &pattern(8, MIB));
    let would_be_created = dir.join("new.img");
    let missing = dir.join("missing.img");
    let before = contents(&[&existing, &would_be_created]);
    let ran = kcopyd(&["copy", s(&missing), s(&existing), s(&would_be_created)]);
    assert_usage_error(&ran, &["SOURCE", "missing.img", "no such file"]);
    assert_eq!(contents(&[&existing, &would_be_created]), before);
    // A target in a missing directory: the file created for the other target goes again.
    let source = dir.file_with("source.img", &pattern(9, MIB));
    let in_missing_dir = dir.join("no-such-dir/target.img");
    let ran = kcopyd(&["copy", s(&source), s(&existing), s(&would_be_created), s(&in_missing_dir)]);
    assert_usage_error(&ran, &["TARGET", "no-such-dir/target.img", "no such file"]);
    assert_eq!(contents(&[&existing, &would_be_created]), before);
}

/// Makes `path` impossible to open for writing, also for root; undone on drop.
enum ReadOnly {
    Immutable(PathBuf),
    Mount(#[allow(dead_code)] Mount),
    Mode,
}

impl ReadOnly {
    /// `chattr +i` as root (permission bits do not stop root), a read-only bind mount of the
    /// directory where `chattr` fails, mode 0444 for other users.
    fn make(test: &str, dir: &Path, path: &Path) -> Option<ReadOnly> {
        if !is_root() {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(path, fs::Permissions::from_mode(0o444)).unwrap();
            return Some(ReadOnly::Mode);
        }
        match run("chattr", &["+i", s(path)]) {
            Ok(_) => return Some(ReadOnly::Immutable(path.to_path_buf())),
            Err(error) => eprintln!("chattr +i failed ({error}); trying a read-only bind mount"),
        }
        let mount = match Mount::new(&["--bind", s(dir)], dir) {
            Ok(mount) => mount,
            Err(error) => {
                skip(test, format!("neither chattr +i nor a bind mount works here: {error}"));
                return None;
            }
        };
        if let Err(error) = mount.remount_read_only() {
            skip(test, format!("cannot remount read-only: {error}"));
            return None;
        }
        Some(ReadOnly::Mount(mount))
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        if let ReadOnly::Immutable(path) = self {
            let _ = run("chattr", &["-i", s(path)]);
        }
    }
}

#[test]
fn a_read_only_target_is_refused_and_no_target_is_written() {
    let test = "a_read_only_target_is_refused_and_no_target_is_written";
    let dir = TempDir::new("cli-readonly");
    let other_dir = TempDir::new("cli-readonly-other");
    let source = other_dir.file_with("source.img", &pattern(10, MIB));
    let writable = other_dir.file_with("writable.img", &pattern(11, MIB));
    let read_only = dir.file_with("read-only.img", &pattern(12, MIB));
    let before = contents(&[&writable, &read_only]);
    let Some(_guard) = ReadOnly::make(test, dir.path(), &read_only) else { return };
    assert!(fs::OpenOptions::new().write(true).open(&read_only).is_err(), "the file really is read-only");
    let ran = kcopyd(&["copy", s(&source), s(&writable), s(&read_only)]);
    assert_usage_error(&ran, &["TARGET", "read-only.img"]);
    assert!(ran.stderr.contains("permission denied") || ran.stderr.contains("read-only"), "{}", ran.stderr);
    assert_eq!(contents(&[&writable, &read_only]), before, "no target was written");
}

#[test]
fn a_target_smaller_than_the_range_is_refused() {
    let dir = TempDir::new("cli-small");
    let source = dir.file_with("source.img", &pattern(13, 2 * MIB));
    let big = dir.file_with("big.img", &pattern(14, 4 * MIB));
    let small = dir.file_with("small.img", &pattern(15, MIB));
    let before = contents(&[&big, &small]);
    let ran = kcopyd(&["copy", s(&source), s(&big), s(&small)]);
    assert_usage_error(&ran, &["TARGET", "small.img", "too small", "2 MiB"]);
    // The same with room, but not from the offset given.
    let offset = format!("{}@3M", s(&big));
    let ran = kcopyd(&["copy", s(&source), &offset]);
    assert_usage_error(&ran, &["TARGET", "big.img@3M", "too small"]);
    let ran = kcopyd(&["copy", s(&source), "sim:size=1M"]);
    assert_usage_error(&ran, &["TARGET", "sim:size=1M", "too small"]);
    assert_eq!(contents(&[&big, &small]), before);
}

#[test]
fn offsets_misaligned_for_the_device_are_refused() {
    let dir = TempDir::new("cli-misaligned");
    let source = dir.file_with("source.img", &pattern(16, MIB));
    let target = dir.file_with("target.img", &pattern(17, 2 * MIB));
    let before = contents(&[&target]);
    // Not a whole sector, on a 512-byte device.
    let ran = kcopyd(&["copy", s(&source), &format!("{}@100", s(&target))]);
    assert_usage_error(&ran, &["TARGET", "target.img@100", "512-byte sector"]);
    let ran = kcopyd(&["copy", s(&source), s(&target), "--length", "1000"]);
    assert_usage_error(&ran, &["--length", "1000"]);
    // A whole sector, but not a whole block of a 4096-byte device.
    let ran = kcopyd(&["copy", "sim:size=1M,seed=1", "sim:size=2M,block=4096@512"]);
    assert_usage_error(&ran, &["TARGET", "sim:size=2M,block=4096@512", "4096-byte logical block"]);
    let ran = kcopyd(&["copy", "sim:size=1M,seed=1,block=4096@4K", s(&target), "--length", "2K"]);
    assert_usage_error(&ran, &["--length", "4096-byte logical block", "SOURCE"]);
    assert_eq!(contents(&[&target]), before);
    let ran = kcopyd(&["copy", "sim:size=1M,seed=1", "sim:size=2M,block=4096@4K"]);
    assert_eq!(ran.code, 0, "aligned: {ran:?}");
}

#[test]
fn offsets_misaligned_on_a_4096_byte_loop_device_are_refused() {
    let test = "offsets_misaligned_on_a_4096_byte_loop_device_are_refused";
    let dir = TempDir::new("cli-loop4k");
    let backing = dir.file_with("backing.img", &pattern(18, 4 * MIB));
    let Some(device) = LoopDevice::attach_or_skip(test, &backing, 4096) else { return };
    let source = dir.file_with("source.img", &pattern(19, MIB));
    let before = fs::read(&backing).unwrap();
    let ran = kcopyd(&["copy", s(&source), &format!("{}@512", s(device.path()))]);
    assert_usage_error(&ran, &["TARGET", "@512", "4096-byte logical block"]);
    let ran = kcopyd(&["copy", s(&source), s(device.path()), "--length", "2K"]);
    assert_usage_error(&ran, &["--length", "4096-byte logical block"]);
    assert_eq!(fs::read(&backing).unwrap(), before, "the device is unchanged");
    // Aligned, the copy lands where asked.
    let ran = kcopyd(&["copy", s(&source), &format!("{}@8K", s(device.path())), "--verify"]);
    assert_eq!(ran.code, 0, "{ran:?}");
    let mut device_bytes = vec![0; 8 * KIB + MIB];
    fs::File::open(device.path()).unwrap().read_exact(&mut device_bytes).unwrap();
    assert_eq!(&device_bytes[8 * KIB..], &pattern(19, MIB)[..]);
}

#[test]
fn a_target_overlapping_the_source_in_the_same_file_is_refused() {
    let dir = TempDir::new("cli-overlap");
    let data = pattern(20, 4 * MIB);
    let file = dir.file_with("disk.img", &data);
    let ran = kcopyd(&["copy", s(&file), &format!("{}@1M", s(&file)), "--length", "2M"]);
    assert_usage_error(&ran, &["TARGET", "disk.img@1M", "overlaps SOURCE"]);
    // Through another name of the same file, too.
    let link = dir.join("link.img");
    fs::hard_link(&file, &link).unwrap();
    let ran = kcopyd(&["copy", &format!("{}@1M", s(&file)), s(&link), "--length", "2M"]);
    assert_usage_error(&ran, &["TARGET", "link.img", "overlaps SOURCE"]);
    // Two targets overlapping each other.
    let ran = kcopyd(&["copy", "sim:size=1M,seed=1", &format!("{}@2M", s(&file)), &format!("{}@2560K", s(&file))]);
    assert_usage_error(&ran, &["TARGET", "overlaps TARGET"]);
    assert_eq!(fs::read(&file).unwrap(), data);
    // A new file named twice: refused, and not left behind.
    let new = dir.join("new.img");
    let ran = kcopyd(&["copy", s(&file), s(&new), s(&new)]);
    assert_usage_error(&ran, &["TARGET", "new.img", "overlaps TARGET"]);
    assert!(!new.exists(), "the file created for the job is removed again");
    // Side by side in one file is fine.
    let ran = kcopyd(&["copy", s(&file), &format!("{}@2M", s(&file)), "--length", "2M"]);
    assert_eq!(ran.code, 0, "{ran:?}");
    let after = fs::read(&file).unwrap();
    assert_eq!(&after[2 * MIB..], &data[..2 * MIB]);
}

#[test]
fn more_targets_than_the_engine_takes_are_refused_before_any_file_is_made() {
    let dir = TempDir::new("cli-129");
    let source = dir.file_with("source.img", &pattern(21, 64 * KIB));
    let targets: Vec<String> = (0..129).map(|i| s(&dir.join(&format!("t{i}.img"))).to_owned()).collect();
    let mut args = vec!["copy", s(&source)];
    args.extend(targets.iter().map(String::as_str));
    let ran = kcopyd(&args);
    assert_usage_error(&ran, &["TARGET", "129 targets", "at most 128"]);
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "only the source is there");
}

#[test]
fn malformed_sizes_are_usage_errors_naming_the_option() {
    let dir = TempDir::new("cli-sizes");
    let source = dir.file_with("source.img", &pattern(22, MIB));
    let target = dir.file_with("target.img", &pattern(23, MIB));
    let before = contents(&[&target]);
    let cases: [(&[&str], &[&str]); 9] = [
        (&["--length", "12Q"], &["--length", "12Q", "unknown unit"]),
        (&["--memory", "100T"], &["--memory", "100 TiB", "more than the largest budget, 15.99 TiB"]),
        (&["--length", "1MB"], &["--length", "1MB"]),
        (&["--length", "-5"], &["--length"]),
        (&["--memory", "lots"], &["--memory", "lots", "not a number"]),
        (&["--memory", "1K"], &["--memory", "less than one 4096-byte page"]),
        (&["--subjob-size", "1000"], &["--subjob-size", "multiple of 512"]),
        (&["--subjobs-in-flight", "0"], &["--subjobs-in-flight"]),
        (&["--subjob-size", "0.3K"], &["--subjob-size", "whole number of bytes"]),
    ];
    for (options, needles) in cases {
        let mut args = vec!["copy", s(&source), s(&target)];
        args.extend(options);
        assert_usage_error(&kcopyd(&args), needles);
    }
    let ran = kcopyd(&["copy", s(&source), &format!("{}@1Q", s(&target))]);
    assert_usage_error(&ran, &["TARGET", "offset '1Q'"]);
    let ran = kcopyd(&["copy", s(&source)]);
    assert_usage_error(&ran, &["TARGET", "not provided"]);
    // A name ending in '/' asks for a directory.
    for (role, args) in [
        ("TARGET", vec!["copy", s(&source), &format!("{}/", s(&target))[..]]),
        ("TARGET", vec!["copy", s(&source), &format!("{}/", s(&dir.join("new.img")))[..]]),
        ("SOURCE", vec!["verify", &format!("{}/", s(&source))[..], s(&target)]),
    ] {
        assert_usage_error(&kcopyd(&args), &[role, "not a directory"]);
    }
    assert!(!dir.join("new.img").exists());
    assert_eq!(contents(&[&target]), before);
}

#[test]
fn malformed_sim_options_are_usage_errors_naming_the_key() {
    let dir = TempDir::new("cli-sim-options");
    let target = dir.file_with("target.img", &pattern(24, MIB));
    let before = contents(&[&target]);
    let cases = [
        ("sim:sise=1M", "'sise'"),
        ("sim:size=1Q", "'size'"),
        ("sim:size=1M,seed=minus", "'seed'"),
        ("sim:size=1M,block=1000", "'block'"),
        ("sim:size=1M,latency=100", "'latency'"),
        ("sim:size=1M,bandwidth=fast", "'bandwidth'"),
        ("sim:size=1M,queue=deep", "'queue'"),
        ("sim:size=1M,jitter=5", "'jitter'"),
        ("sim:size=1M,bad-read=9-3", "'bad-read'"),
        ("sim:size=1M,bad-write=x", "'bad-write'"),
        ("sim:size=1M,bad-read=4000-4100", "'bad-read'"),
        ("sim:size=1M,size=2M", "'size'"),
        ("sim:size", "'size'"),
        ("sim:size=1000", "'size'"),
    ];
    for (source, key) in cases {
        let ran = kcopyd(&["copy", source, s(&target)]);
        assert_usage_error(&ran, &[key]);
    }
    let ran = kcopyd(&["copy", "sim:seed=1", s(&target)]);
    assert_usage_error(&ran, &["SOURCE", "sim key 'size' is needed"]);
    assert_eq!(contents(&[&target]), before);
}

// ---- zero ---------------------------------------------------------------------------------

#[test]
fn zero_writes_zeroes_over_exactly_the_range() {
    let dir = TempDir::new("cli-zero");
    let old = pattern(25, 2 * MIB);
    let a = dir.file_with("a.img", &old);
    let b = dir.file_with("b.img", &old);
    let ran = kcopyd(&["zero", &format!("{}@4K", s(&a)), &format!("{}@1M", s(&b)), "--length", "12K"]);
    assert_eq!(ran.code, 0, "{ran:?}");
    assert!(ran.stdout.contains("zeroed 12 KiB"), "{}", ran.stdout);
    for (path, offset) in [(&a, 4 * KIB), (&b, MIB)] {
        let after = fs::read(path).unwrap();
        assert_eq!(&after[..offset], &old[..offset]);
        assert!(after[offset..offset + 12 * KIB].iter().all(|&b| b == 0));
        assert_eq!(&after[offset + 12 * KIB..], &old[offset + 12 * KIB..]);
    }
    // Whole devices of one length.
    let ran = kcopyd(&["zero", s(&a), s(&b), "--json"]);
    assert_eq!(ran.code, 0, "{ran:?}");
    assert_eq!(json(&ran)["bytes"], 2 * MIB as u64);
    assert!(fs::read(&a).unwrap().iter().chain(&fs::read(&b).unwrap()).all(|&b| b == 0));
}

#[test]
fn zero_refuses_unequal_lengths_and_missing_targets() {
    let dir = TempDir::new("cli-zero-bad");
    let a = dir.file_with("a.img", &pattern(26, MIB));
    let b = dir.file_with("b.img", &pattern(27, 2 * MIB));
    let missing = dir.join("missing.img");
    let before = contents(&[&a, &b, &missing]);
    assert_usage_error(&kcopyd(&["zero", s(&a), s(&b)]), &["TARGET", "b.img", "give --length"]);
    assert_usage_error(&kcopyd(&["zero", s(&a), s(&missing), "--length", "4K"]), &["missing.img", "no such file"]);
    assert_usage_error(&kcopyd(&["zero", s(&a), "--length", "2M"]), &["a.img", "too small"]);
    assert_eq!(contents(&[&a, &b, &missing]), before);
    let ran = kcopyd(&["zero", "sim:size=1M,bad-write=8-9", "--ignore-errors", "--json"]);
    assert_eq!(ran.code, 1, "{ran:?}");
    assert!(covers(&ranges(&json(&ran)["targets"][0]["write_failed_sectors"]), [8, 9]));
}

// ---- verify -------------------------------------------------------------------------------

#[test]
fn verify_reports_the_first_differing_sector_and_the_blocks() {
    let dir = TempDir::new("cli-verify");
    let data = pattern(28, 4 * MIB);
    let source = dir.file_with("source.img", &data);
    let same = dir.file_with("same.img", &data);
    let mut changed_data = data.clone();
    for sector in [3000usize, 3001, 6000] {
        changed_data[sector * 512 + 17] ^= 0xff;
    }
    let changed = dir.file_with("changed.img", &changed_data);
    let identical = kcopyd(&["verify", s(&source), s(&same)]);
    assert_eq!(identical.code, 0, "{identical:?}");
    assert!(identical.stdout.contains(": identical"), "{}", identical.stdout);

    let ran = kcopyd(&["verify", s(&source), s(&same), s(&changed)]);
    assert_eq!(ran.code, 1, "{ran:?}");
    assert!(ran.stdout.contains("3 blocks of 512 bytes differ, the first at sector 3000"), "{}", ran.stdout);
    let report = json(&kcopyd(&["verify", s(&source), s(&same), s(&changed), "--json"]));
    assert_eq!(report["status"], "differences");
    assert_eq!(report["exit_code"], 1);
    assert_eq!(report["targets"][0]["status"], "identical");
    let diff = &report["targets"][1]["verify"];
    assert_eq!(diff["differing_blocks"], 3);
    assert_eq!(diff["first_differing_sector"], 3000);
    assert_eq!(diff["first_differing_offset_bytes"], 3000 * 512);
    assert_eq!(ranges(&diff["differing_sectors"]), vec![[3000, 3002], [6000, 6001]]);

    // With offsets: the range of the source at 1 MiB against the target at 0.
    let ran = kcopyd(&["verify", &format!("{}@1M", s(&source)), s(&changed), "--length", "1M", "--json"]);
    assert_eq!(json(&ran)["targets"][0]["verify"]["first_differing_sector"], 0, "everything differs");
    let ran = kcopyd(&["verify", &format!("{}@3M", s(&source)), &format!("{}@3M", s(&changed)), "--length", "1M"]);
    assert_eq!(ran.code, 0, "{ran:?}");
}

#[test]
fn verify_counts_logical_blocks_and_reports_unreadable_ones() {
    let ran = kcopyd(&["verify", "sim:size=1M,seed=1,block=4096", "sim:size=1M,seed=2,block=4096", "--json"]);
    assert_eq!(ran.code, 1, "{ran:?}");
    let report = json(&ran);
    assert_eq!(report["verify"]["block_bytes"], 4096);
    assert_eq!(report["targets"][0]["verify"]["differing_blocks"], 256);

    let ran = kcopyd(&["verify", "sim:size=1M,seed=1,bad-read=8-9", "sim:size=1M,seed=1", "--json"]);
    assert_eq!(ran.code, 1, "{ran:?}");
    let report = json(&ran);
    assert_eq!(report["status"], "errors");
    assert_eq!(ranges(&report["source"]["read_failed_sectors"]), vec![[8, 9]], "narrowed to the bad block");
    assert_eq!(report["targets"][0]["verify"]["differing_blocks"], 0);
    assert_usage_error(&kcopyd(&["verify", "sim:size=1M", "sim:size=512K"]), &["TARGET", "too small"]);
}

#[test]
fn verify_compares_a_file_with_itself() {
    let dir = TempDir::new("cli-verify-self");
    let file = dir.file_with("x.img", &pattern(41, 2 * MIB));
    let ran = kcopyd(&["verify", s(&file), s(&file)]);
    assert_eq!(ran.code, 0, "reading twice is harmless: {ran:?}");
    assert!(ran.stdout.contains("identical"), "{}", ran.stdout);
    let ran = kcopyd(&["verify", s(&file), &format!("{}@512K", s(&file)), "--length", "1M", "--json"]);
    assert_eq!(ran.code, 1, "overlapping ranges are compared: {ran:?}");
    assert_eq!(json(&ran)["targets"][0]["verify"]["first_differing_sector"], 1024);
}

#[test]
fn verify_reads_in_large_chunks_with_several_in_flight() {
    // Every read costs 100 ms, 8 at a time. 64 MiB in 2 MiB reads, 16 in flight: 32 reads a
    // disk, 4 rounds, about 0.4 s. One read at a time would take 3.2 s; 4 KiB reads, minutes.
    let disk = "sim:size=64M,seed=5,latency=100ms,queue=8";
    let ran = kcopyd(&["verify", disk, disk, "--json"]);
    assert_eq!(ran.code, 0, "{ran:?}");
    let report = json(&ran);
    assert_eq!(report["bytes"], 64 * MIB as u64);
    let seconds = report["seconds"].as_f64().unwrap();
    assert!(seconds < 2.0, "compared in {seconds} s");
}

#[test]
fn verify_takes_every_target_count_and_every_budget_copy_takes() {
    for memory in ["4K", "64K", "16M"] {
        for count in [1usize, 2, 16, 17, 128] {
            let mut args = vec!["verify", "sim:size=1M,seed=1", "--memory", memory, "--json"];
            args.extend(std::iter::repeat_n("sim:size=1M,seed=1", count));
            let ran = kcopyd(&args);
            assert_eq!(ran.code, 0, "{count} targets, --memory {memory}: {}", ran.stderr);
            let report = json(&ran);
            assert_eq!(report["bytes"], MIB as u64);
            assert_eq!(report["targets"].as_array().unwrap().len(), count);
        }
    }
    // A difference in the last of 128 targets, read in groups of one page's worth.
    let mut args = vec!["verify", "sim:size=1M,seed=1", "--memory", "64K", "--json"];
    args.extend(std::iter::repeat_n("sim:size=1M,seed=1", 127));
    args.push("sim:size=1M,seed=2");
    let report = json(&kcopyd(&args));
    assert_eq!(report["status"], "differences");
    assert_eq!(report["targets"][127]["verify"]["first_differing_sector"], 0);
    assert_eq!(report["targets"][126]["status"], "identical");
}

#[test]
fn copy_verify_to_many_targets_in_a_small_budget_then_nothing_refused_after_writing() {
    let dir = TempDir::new("cli-verify-many");
    let data = pattern(40, 256 * KIB);
    let source = dir.file_with("source.img", &data);
    let targets: Vec<PathBuf> = (0..17).map(|i| dir.join(&format!("t{i}.img"))).collect();
    for memory in ["4K", "64K"] {
        let mut args = vec!["copy", s(&source), "--verify", "--memory", memory, "--buffered"];
        args.extend(targets.iter().map(|t| s(t)));
        let ran = kcopyd(&args);
        assert_eq!(ran.code, 0, "--memory {memory}: {ran:?}");
        assert!(ran.stdout.contains("identical"), "{}", ran.stdout);
    }
    for target in &targets {
        assert_eq!(fs::read(target).unwrap(), data);
    }
    // A block larger than the budget is refused before anything is written.
    let fresh = dir.join("fresh.img");
    let ran = kcopyd(&["copy", "sim:size=1M,seed=1,block=8192", s(&fresh), "--verify", "--memory", "4K"]);
    assert_usage_error(&ran, &["8192"]);
    assert!(!fresh.exists(), "nothing was written: {ran:?}");
}

// ---- demo, progress, Ctrl-C, flush --------------------------------------------------------

#[test]
fn demo_matches_the_fault_log_and_a_tampered_target_fails_the_check() {
    let started = Instant::now();
    let ran = kcopyd(&["demo", "--size", "32M"]);
    assert_eq!(ran.code, 0, "{ran:?}");
    for needle in [
        "target     status",
        "mirror-a   incomplete",
        "mirror-b   write errors",
        "source read_failed:",
        "mirror-b write_failed:",
        "[ ok ] every read_failed range is covered",
        "[ ok ] every write_failed range is covered",
        "[ ok ] every sector outside the failed ranges equals the source",
        "PASS",
    ] {
        assert!(ran.stdout.contains(needle), "{needle:?} in\n{}", ran.stdout);
    }
    assert!(started.elapsed() < Duration::from_secs(50), "took {:?}", started.elapsed());

    assert_usage_error(&kcopyd(&["demo", "--size", "1M"]), &["--size", "16 MiB"]);
    let tampered = kcopyd(&["demo", "--size", "32M", "--tamper"]);
    assert_eq!(tampered.code, 1, "{tampered:?}");
    assert!(tampered.stdout.contains("[FAIL] every sector outside the failed ranges"), "{}", tampered.stdout);
    assert!(tampered.stdout.contains("mirror-a differs at sector 8"), "{}", tampered.stdout);
}

/// Runs `command` under a pseudo-terminal (`script`), returning what the terminal showed.
fn on_a_terminal(test: &str, command: &str) -> Option<String> {
    if run("script", &["--version"]).is_err() {
        skip(test, "`script` (util-linux) is missing: no pseudo-terminal");
        return None;
    }
    // A terminal that can redraw: without TERM (or with TERM=dumb) bars stay hidden.
    let output =
        Command::new("script").env("TERM", "xterm").args(["-qec", command, "/dev/null"]).output().expect("script runs");
    assert!(output.status.success(), "{output:?}");
    Some(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[test]
fn progress_shows_on_a_terminal_only() {
    let test = "progress_shows_on_a_terminal_only";
    let bin = env!("CARGO_BIN_EXE_kcopyd");
    let copy = "copy sim:size=16M,seed=1,bandwidth=32M sim:";
    let Some(shown) = on_a_terminal(test, &format!("{bin} {copy}")) else { return };
    assert!(shown.contains("ETA") && shown.contains("MiB/s") && shown.contains("/16.00 MiB"), "{shown}");
    let quiet = on_a_terminal(test, &format!("{bin} {copy} --quiet")).unwrap();
    assert!(!quiet.contains("ETA") && !quiet.contains("copied"), "{quiet}");
    let piped = kcopyd(&copy.split(' ').collect::<Vec<_>>());
    assert_eq!(piped.code, 0, "{piped:?}");
    assert!(piped.stderr.is_empty(), "no progress when stderr is not a terminal: {piped:?}");
}

#[test]
fn ctrl_c_cancels_the_job_reports_how_far_it_got_and_exits_130() {
    // 16 MiB at 2 MiB/s would take 8 s; interrupted after about one. The target is a file,
    // so the command runs in real time (with only simulated disks it would run in virtual
    // time and finish at once).
    let dir = TempDir::new("cli-ctrl-c");
    let target = dir.join("target.img");
    let child = Command::new(env!("CARGO_BIN_EXE_kcopyd"))
        .args([
            "copy",
            "sim:size=16M,seed=1,bandwidth=2M",
            s(&target),
            "--subjob-size",
            "64K",
            "--subjobs-in-flight",
            "2",
        ])
        .arg("--json")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kcopyd starts");
    let started = Instant::now();
    kcopyd_tests::fixtures::wait_for_signal_handlers(child.id());
    std::thread::sleep(Duration::from_millis(1500));
    let killed = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(killed.success());
    let interrupted_at = Instant::now();
    let ran = ran(child.wait_with_output().unwrap());
    assert_eq!(ran.code, 130, "{ran:?}");
    assert!(interrupted_at.elapsed() < Duration::from_secs(3), "in-flight I/O only: {:?}", interrupted_at.elapsed());
    assert!(started.elapsed() < Duration::from_secs(30));
    assert!(ran.stderr.contains("interrupted"), "{ran:?}");
    let report = json(&ran);
    assert_eq!(report["status"], "cancelled");
    assert_eq!(report["cancelled"], true);
    assert_eq!(report["exit_code"], 130);
    let (bytes, total) = (report["bytes"].as_u64().unwrap(), report["bytes_total"].as_u64().unwrap());
    assert!(bytes > 0 && bytes < total, "{bytes} of {total}");
    let not_copied = ranges(&report["targets"][0]["not_copied_sectors"]);
    let not_copied_sectors: u64 = not_copied.iter().map(|[a, b]| b - a).sum();
    assert_eq!(not_copied_sectors * 512, total - bytes, "what was not done is listed");
    assert_eq!(not_copied.last().unwrap()[1], total / 512);
}

#[test]
fn every_target_is_flushed_after_the_copy() {
    let test = "every_target_is_flushed_after_the_copy";
    if run("strace", &["-V"]).is_err() {
        skip(test, "strace is missing");
        return;
    }
    let dir = TempDir::new("cli-flush");
    let source = dir.file_with("source.img", &pattern(29, 4 * MIB));
    let targets = [dir.join("a.img"), dir.join("b.img")];
    let log = dir.join("strace.log");
    let output = Command::new("strace")
        .args(["-f", "-qq", "-e", "trace=openat,pwritev,pwrite64,fdatasync,fsync", "-o", s(&log)])
        .args([env!("CARGO_BIN_EXE_kcopyd"), "copy", s(&source), s(&targets[0]), s(&targets[1])])
        .output()
        .unwrap();
    if !output.status.success() && String::from_utf8_lossy(&output.stderr).contains("ptrace") {
        skip(test, format!("strace cannot trace here: {}", String::from_utf8_lossy(&output.stderr).trim()));
        return;
    }
    assert!(output.status.success(), "{output:?}");
    let log = fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    for target in &targets {
        let opened = format!("\"{}\"", s(target));
        let fd = lines
            .iter()
            .filter(|l| l.contains(&opened) && l.contains("O_RDWR"))
            .find_map(|l| l.rsplit("= ").next().and_then(|fd| fd.trim().parse::<i32>().ok()))
            .unwrap_or_else(|| panic!("{opened} opened for writing in\n{log}"));
        let last_write = lines.iter().rposition(|l| l.contains(&format!("pwritev({fd},")));
        // "fdatasync(11) = 0", or "fdatasync(11 <unfinished ...>" when threads interleave.
        let calls =
            [format!("fdatasync({fd})"), format!("fdatasync({fd} "), format!("fsync({fd})"), format!("fsync({fd} ")];
        let flush = lines.iter().rposition(|l| calls.iter().any(|call| l.contains(call.as_str())));
        let (Some(last_write), Some(flush)) = (last_write, flush) else {
            panic!("fd {fd} of {opened}: a write and a flush in\n{log}");
        };
        assert!(flush > last_write, "the flush of {opened} comes after its last write");
    }
}

#[test]
fn a_copy_between_simulated_disks_runs_in_virtual_time() {
    // 16 MiB read at 1 MiB/s: 16 s of model time, reported as such, in far less wall time;
    // 4 KiB requests of 50 µs each keep their length (a millisecond timer would round them up).
    let ran = kcopyd(&["copy", "sim:size=16M,seed=1,bandwidth=1M", "sim:", "--json"]);
    assert_eq!(ran.code, 0, "{ran:?}");
    let report = json(&ran);
    let (seconds, wall) = (report["seconds"].as_f64().unwrap(), report["wall_seconds"].as_f64().unwrap());
    assert!((seconds - 16.0).abs() < 0.1, "model seconds {seconds}");
    assert!(wall < 8.0, "wall seconds {wall}");
    let small = kcopyd(&[
        "copy",
        "sim:size=4M,seed=1,latency=50us,queue=1",
        "sim:",
        "--subjob-size",
        "4K",
        "--subjobs-in-flight",
        "1",
        "--json",
    ]);
    assert_eq!(small.code, 0, "{small:?}");
    // 1024 reads of 50 µs one after another.
    let seconds = json(&small)["seconds"].as_f64().unwrap();
    assert!((seconds - 0.0512).abs() < 0.001, "model seconds {seconds}");
    let human = kcopyd(&["copy", "sim:size=1M,seed=1,bandwidth=1M", "sim:"]);
    assert!(human.stdout.contains("(simulated: 1.000 s of model time"), "{}", human.stdout);
    // A real file among the devices keeps real time: no wall_seconds.
    let dir = TempDir::new("cli-virtual");
    let target = dir.join("t.img");
    let real = kcopyd(&["copy", "sim:size=1M,seed=1", s(&target), "--json"]);
    assert!(json(&real).get("wall_seconds").is_none(), "{real:?}");
}

// ---- sim calibrate, sim validate ------------------------------------------------------------

/// A quick calibration: two sizes, two depths, 10 ms a point, two rounds.
const QUICK_CALIBRATION: [&str; 8] =
    ["--io-sizes", "64K,1M", "--queue-depths", "1,2", "--point-time", "10ms", "--rounds", "2"];

#[test]
fn calibrate_measures_a_file_it_creates_and_removes_it() {
    let dir = TempDir::new("cli-calibrate");
    let (device, out) = (dir.join("scratch.img"), dir.join("model.toml"));
    let mut args = vec!["sim", "calibrate", s(&device), "--size", "16M", "--out", s(&out), "-q"];
    args.extend(QUICK_CALIBRATION);
    let ran = kcopyd(&args);
    assert_eq!(ran.code, 0, "{ran:?}");
    assert!(!device.exists(), "the scratch file is removed");
    let model: kcopyd_sim::DiskModel = toml::from_str(&fs::read_to_string(&out).unwrap()).unwrap();
    // read and write × 2 sizes × 2 depths, mixed at 2 depths, random reads, engine copies at
    // 64 KiB, 256 KiB, 1 MiB and 4 MiB (two 4 MiB sub-jobs fit half the 16 MiB scratch range).
    assert_eq!(model.measurements.len(), 15, "{model:?}");
    let kinds: Vec<&str> = model.measurements.iter().map(|m| m.kind.as_str()).collect();
    assert_eq!(kinds.iter().filter(|&&k| k == "mixed").count(), 2);
    assert_eq!(kinds.iter().filter(|&&k| k == "random-read").count(), 1);
    let copies: Vec<u64> = model.measurements.iter().filter(|m| m.kind == "copy").map(|m| m.io_size_bytes).collect();
    assert_eq!(copies, [64 << 10, 256 << 10, 1 << 20, 4 << 20]);
    assert!(
        model.measurements.iter().all(|m| m.iops > 0.0 && m.bandwidth_bytes_per_s > 0.0 && m.latency_us_p50 > 0.0),
        "{:?}",
        model.measurements
    );
    assert!(model.latency.read.bandwidth_bytes_per_s > 0 && model.latency.write.bandwidth_bytes_per_s > 0);
    assert!(model.one_device, "calibrated on a file");
    // --keep keeps the file; the model goes to stdout without --out.
    let mut args = vec!["sim", "calibrate", s(&device), "--size", "16M", "--keep", "-q"];
    args.extend(QUICK_CALIBRATION);
    let kept = kcopyd(&args);
    assert_eq!(kept.code, 0, "{kept:?}");
    assert_eq!(fs::metadata(&device).unwrap().len(), 16 * MIB as u64);
    assert!(toml::from_str::<kcopyd_sim::DiskModel>(&kept.stdout).is_ok(), "{}", kept.stdout);
}

#[test]
fn calibrate_writes_an_existing_device_only_inside_the_scratch_range_it_is_given() {
    let dir = TempDir::new("cli-calibrate-existing");
    let before = pattern(41, 32 * MIB);
    let device = dir.file_with("data.img", &before);
    let mut args = vec!["sim", "calibrate", s(&device), "-q"];
    args.extend(QUICK_CALIBRATION);
    assert_usage_error(&kcopyd(&args), &["DEVICE", "exists", "--scratch-length"]);
    assert_eq!(fs::read(&device).unwrap(), before, "untouched");
    let mut too_far = vec!["sim", "calibrate", s(&device), "--scratch-offset", "24M", "--scratch-length", "16M", "-q"];
    too_far.extend(QUICK_CALIBRATION);
    assert_usage_error(&kcopyd(&too_far), &["--scratch-length", "past the end"]);
    assert_eq!(fs::read(&device).unwrap(), before, "untouched");
    let mut args = vec!["sim", "calibrate", s(&device), "--scratch-offset", "8M", "--scratch-length", "16M", "-q"];
    args.extend(QUICK_CALIBRATION);
    let ran = kcopyd(&args);
    assert_eq!(ran.code, 0, "{ran:?}");
    let after = fs::read(&device).unwrap();
    assert_eq!(after.len(), before.len());
    assert_eq!(after[..8 * MIB], before[..8 * MIB], "before the scratch range");
    assert_eq!(after[24 * MIB..], before[24 * MIB..], "after the scratch range");
    assert_ne!(after[8 * MIB..24 * MIB], before[8 * MIB..24 * MIB], "the scratch range was written");
    let mut no_scratch_for_new = vec!["sim", "calibrate", "--scratch-length", "16M"];
    let new = dir.join("new.img");
    no_scratch_for_new.push(s(&new));
    assert_usage_error(&kcopyd(&no_scratch_for_new), &["--scratch-length", "existing device"]);
    assert!(!new.exists());
}

#[test]
#[allow(
    clippy::too_many_lines,
    reason = "one end-to-end story: a real copy, its prediction and every refusal of the command, in order"
)]
fn validate_runs_real_and_simulated_copies_and_computes_each_error() {
    let dir = TempDir::new("cli-validate");
    let source = dir.file_with("source.img", &pattern(43, 16 * MIB));
    let target = dir.join("target.img");
    // A model with an analytic answer: 1 GB/s each way on one shared path, nothing else. The
    // disks are files on one device, so source and targets share it: one target moves
    // 2 × 16 MiB over the path, three targets 4 × 16 MiB.
    let model = dir.file_with(
        "model.toml",
        b"description = \"by hand\"\n[latency.read]\nbandwidth_bytes_per_s = 1000000000\n\
          [latency.write]\nbandwidth_bytes_per_s = 1000000000\n[latency.path]\nshared = true\n",
    );
    let ran = kcopyd(&[
        "sim",
        "validate",
        s(&source),
        s(&target),
        "--model",
        s(&model),
        "--runs",
        "2",
        "--configs",
        "1Mx4x1,256Kx2x3",
        "--json",
        "-q",
    ]);
    assert_eq!(ran.code, 0, "{ran:?}");
    let report = json(&ran);
    assert_eq!(report["model"], "by hand");
    assert_eq!(report["len_bytes"], 16 * MIB as u64);
    assert_eq!(report["one_device"], true);
    let rows = report["configs"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!((rows[0]["subjob_size_bytes"].as_u64(), rows[0]["targets"].as_u64()), (Some(MIB as u64), Some(1)));
    assert_eq!((rows[1]["subjobs_in_flight"].as_u64(), rows[1]["targets"].as_u64()), (Some(2), Some(3)));
    let mib = MIB as f64;
    for (row, bytes_on_path) in rows.iter().zip([2.0 * 16.0 * mib, 4.0 * 16.0 * mib]) {
        let measured: Vec<f64> =
            row["measured_seconds"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert_eq!(measured.len(), 2);
        assert!(measured.iter().all(|&m| m > 0.0));
        let median = row["measured_median_seconds"].as_f64().unwrap();
        assert_eq!(median, measured[0].max(measured[1]), "the upper median of two");
        assert_eq!(row["measured_min_seconds"].as_f64().unwrap(), measured[0].min(measured[1]));
        let predicted = row["predicted_seconds"].as_f64().unwrap();
        let expected = bytes_on_path / 1e9;
        assert!(
            (predicted - expected).abs() / expected < 0.05,
            "predicted {predicted} s, the model gives {expected} s"
        );
        let error = row["error_percent"].as_f64().unwrap();
        assert!((error - (predicted - median) / median * 100.0).abs() < 1e-6, "{row}");
    }
    let largest = rows.iter().map(|r| r["error_percent"].as_f64().unwrap().abs()).fold(0.0, f64::max);
    assert_eq!(report["max_abs_error_percent"].as_f64().unwrap(), largest);
    for created in ["target.img", "target.img.2", "target.img.3"] {
        assert!(!dir.join(created).exists(), "{created} was created by validate and removed");
    }
    // The table for people, and a bad configuration refused before anything runs.
    let human = kcopyd(&[
        "sim",
        "validate",
        s(&source),
        s(&target),
        "--model",
        s(&model),
        "--runs",
        "1",
        "--configs",
        "1Mx4x1",
        "-q",
    ]);
    assert_eq!(human.code, 0, "{human:?}");
    assert!(human.stdout.contains("predicted s") && human.stdout.contains("largest error"), "{}", human.stdout);
    assert_usage_error(
        &kcopyd(&["sim", "validate", s(&source), s(&target), "--model", s(&model), "--configs", "1Mx4"]),
        &["--configs", "1Mx4"],
    );
    assert_usage_error(
        &kcopyd(&["sim", "validate", s(&source), s(&target), "--model", s(&dir.join("none.toml"))]),
        &["--model"],
    );
    assert_usage_error(
        &kcopyd(&["sim", "validate", s(&source), s(dir.path()), "--model", s(&model), "--configs", "1Mx4x3"]),
        &["TARGET", "not a regular file"],
    );
    let unknown = dir.file_with("unknown.toml", b"[latency.read]\nbandwith_bytes_per_s = 1\n");
    assert_usage_error(
        &kcopyd(&["sim", "validate", s(&source), s(&target), "--model", s(&unknown)]),
        &["--model", "bandwith"],
    );
    assert!(!target.exists());
}

#[test]
fn throttle_options_limit_the_rate_and_bad_values_are_usage_errors() {
    // 4 MiB at 4 MiB/s in 1 MiB sub-jobs: the first goes at once, the other three a quarter
    // of a second apart, so the copy cannot take less than 0.75 s; unthrottled it takes a
    // fraction of that.
    let (source, target) = ("sim:size=4M,seed=3", "sim:size=4M");
    let ran = kcopyd(&["copy", source, target, "--json", "--throttle-rate", "4M/s", "--throttle-busy", "100"]);
    assert_eq!(ran.code, 0, "{ran:?}");
    let report = json(&ran);
    assert_eq!(report["bytes"], 4 * MIB as u64);
    let seconds = report["seconds"].as_f64().unwrap();
    assert!(seconds >= 0.74, "a 4 MiB/s throttle copied 4 MiB in {seconds} s");
    let ran = kcopyd(&["zero", "sim:size=4M", "--json", "--throttle-rate", "8M"]);
    assert_eq!(ran.code, 0, "{ran:?}");
    assert!(json(&ran)["seconds"].as_f64().unwrap() >= 0.37, "three 1 MiB sub-jobs an eighth of a second apart");

    let dir = TempDir::new("cli-throttle");
    let file_source = dir.file_with("source.img", &pattern(31, MIB));
    let file_target = dir.file_with("target.img", &pattern(32, MIB));
    let before = contents(&[&file_target]);
    let cases: [(&[&str], &[&str]); 4] = [
        (&["--throttle-busy", "0"], &["--throttle-busy", "between 1 and 100"]),
        (&["--throttle-busy", "101"], &["--throttle-busy", "between 1 and 100"]),
        (&["--throttle-rate", "0"], &["--throttle-rate", "at least 1"]),
        (&["--throttle-rate", "fast"], &["--throttle-rate", "fast"]),
    ];
    for (options, needles) in cases {
        let mut args = vec!["copy", s(&file_source), s(&file_target)];
        args.extend(options);
        assert_usage_error(&kcopyd(&args), needles);
    }
    assert_eq!(contents(&[&file_target]), before);
}

#[test]
fn the_json_report_of_copy_and_zero_carries_the_engine_statistics() {
    let ran = kcopyd(&["copy", "sim:size=2M,seed=4", "sim:", "sim:", "--json", "--subjob-size", "512K"]);
    assert_eq!(ran.code, 0, "{ran:?}");
    let stats = &json(&ran)["stats"];
    assert_eq!(stats["jobs_submitted"], 1);
    assert_eq!(stats["jobs_completed"], 1);
    assert_eq!(stats["jobs_failed"], 0);
    let devices = stats["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 3, "the source and two targets, though two share a name");
    assert_eq!(devices[0]["read"]["count"], 4);
    assert_eq!(devices[0]["read"]["bytes"], 2 * MIB as u64);
    for target in &devices[1..] {
        assert_eq!(target["write"]["bytes"], 2 * MIB as u64);
        let buckets: u64 =
            target["write"]["latency"]["buckets"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap()).sum();
        assert_eq!(buckets, 4, "one latency per write");
    }
    assert!(stats["pool"]["pages_in_use_max"].as_u64().unwrap() >= 128);
    let ran = kcopyd(&["zero", "sim:size=1M", "--json"]);
    assert_eq!(json(&ran)["stats"]["jobs_completed"], 1);
    let ran = kcopyd(&["verify", "sim:size=1M", "sim:size=1M", "--json"]);
    assert!(json(&ran).get("stats").is_none(), "verify runs no engine job");
}

// ---- the project's own instructions -------------------------------------------------------

#[test]
fn the_readme_test_command_needs_only_rust_and_ci_runs_it_without_nextest() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let readme = fs::read_to_string(root.join("README.md")).unwrap();
    let commands = readme.split("## Two commands").nth(1).and_then(|rest| rest.split("## ").next()).unwrap();
    let block = commands.split("```").nth(1).expect("a code block of commands");
    assert!(block.lines().any(|line| line.starts_with("cargo test --workspace")), "{block}");
    assert!(!block.contains("nextest"), "a fresh machine has no cargo-nextest: {block}");
    let ci = fs::read_to_string(root.join(".ci/run")).unwrap();
    assert!(ci.contains("command -v cargo-nextest"), ".ci/run checks for nextest before using it");
    assert!(ci.contains("cargo test --no-fail-fast \"$@\""), ".ci/run falls back to cargo test");
}

#[test]
fn help_shows_examples_for_every_command() {
    let ran = kcopyd(&["--help"]);
    assert_eq!(ran.code, 0, "{ran:?}");
    assert!(
        ran.stdout.contains("Examples:") && ran.stdout.contains("kcopyd copy disk.img backup.img"),
        "{}",
        ran.stdout
    );
    for command in ["copy", "zero", "verify", "demo"] {
        let ran = kcopyd(&[command, "--help"]);
        assert_eq!(ran.code, 0, "{ran:?}");
        let examples = ran.stdout.split("Examples:").nth(1).unwrap_or_else(|| panic!("{command}: {}", ran.stdout));
        assert!(examples.contains(&format!("kcopyd {command} ")), "{command}: {examples}");
    }
}

// ---- safety against other programs and other names -----------------------------------------

/// Whether `/proc/locks` shows a write lock on the file at `path`.
fn write_locked(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let inode = fs::metadata(path).unwrap().ino();
    let locks = fs::read_to_string("/proc/locks").unwrap_or_default();
    locks.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.contains(&"WRITE") && fields.iter().any(|f| f.rsplit(':').next() == Some(&inode.to_string()))
    })
}

#[test]
fn a_second_run_writing_the_same_file_is_refused_as_busy() {
    let dir = TempDir::new("cli-lock");
    let old = pattern(42, 4 * MIB);
    let target = dir.file_with("target.img", &old);
    // 32 reads of 64 KiB, one at a time, 100 ms each: the first run holds the file 3.2 s.
    let mut first = Command::new(env!("CARGO_BIN_EXE_kcopyd"))
        .args(["copy", "sim:size=2M,seed=1,latency=100ms", s(&target), "--subjob-size", "64K"])
        .args(["--subjobs-in-flight", "1", "--quiet"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !write_locked(&target) {
        assert!(started.elapsed() < Duration::from_secs(10), "the first run locks its target");
        assert!(first.try_wait().unwrap().is_none(), "the first run is still running");
        std::thread::sleep(Duration::from_millis(10));
    }
    let second = kcopyd(&["copy", "sim:size=1M,seed=2", &format!("{}@2M", s(&target))]);
    assert_usage_error(&second, &["TARGET", "target busy"]);
    let zero = kcopyd(&["zero", &format!("{}@2M", s(&target))]);
    assert_usage_error(&zero, &["TARGET", "target busy"]);
    let reader = kcopyd(&["copy", s(&target), "sim:"]);
    assert_usage_error(&reader, &["SOURCE", "busy"]);
    let first = ran(first.wait_with_output().unwrap());
    assert_eq!(first.code, 0, "{first:?}");
    let after = fs::read(&target).unwrap();
    assert_eq!(&after[2 * MIB..], &old[2 * MIB..], "the second run wrote nothing");
    // Once the first run is over, the file is free again.
    let ran = kcopyd(&["zero", &format!("{}@2M", s(&target))]);
    assert_eq!(ran.code, 0, "{ran:?}");
}

#[test]
fn read_only_targets_are_refused_before_any_io() {
    let test = "read_only_targets_are_refused_before_any_io";
    let dir = TempDir::new("cli-ro-targets");
    let source = dir.file_with("source.img", &pattern(43, MIB));
    let writable = dir.file_with("writable.img", &pattern(44, MIB));
    // A file nobody may write: refused also for root.
    let marked = dir.file_with("marked.img", &pattern(45, MIB));
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&marked, fs::Permissions::from_mode(0o444)).unwrap();
    }
    let before = contents(&[&writable, &marked]);
    let ran = kcopyd(&["copy", s(&source), s(&writable), s(&marked)]);
    assert_usage_error(&ran, &["TARGET", "marked.img"]);
    assert!(ran.stderr.contains("read-only") || ran.stderr.contains("permission denied"), "{}", ran.stderr);
    assert_usage_error(&kcopyd(&["zero", s(&marked)]), &["TARGET", "marked.img"]);
    assert_eq!(contents(&[&writable, &marked]), before, "nothing written");
    // A read-only loop device: the open succeeds but every write would fail.
    let backing = dir.file_with("backing.img", &pattern(46, MIB));
    let Some(device) = LoopDevice::attach_with_or_skip(test, &backing, 512, &["--read-only"]) else { return };
    let before = contents(&[&writable, &backing]);
    let ran = kcopyd(&["copy", s(&source), s(&writable), s(device.path())]);
    assert_usage_error(&ran, &["TARGET", s(device.path()), "read-only"]);
    assert_usage_error(&kcopyd(&["zero", s(device.path())]), &["TARGET", "read-only"]);
    assert_eq!(contents(&[&writable, &backing]), before, "nothing written");
    // Reading from it is fine.
    let ran = kcopyd(&["verify", s(device.path()), s(&backing)]);
    assert_eq!(ran.code, 0, "{ran:?}");
}

/// An image with an MBR whose one partition starts at `start_sectors` and holds `len_sectors`.
fn partitioned_image(data: &mut [u8], start_sectors: u32, len_sectors: u32) {
    // Four 16-byte entries; the last three empty.
    data[446..510].fill(0);
    let entry = &mut data[446..462];
    entry[4] = 0x83; // Linux
    entry[8..12].copy_from_slice(&start_sectors.to_le_bytes());
    entry[12..16].copy_from_slice(&len_sectors.to_le_bytes());
    data[510] = 0x55;
    data[511] = 0xaa;
}

#[test]
fn overlap_is_seen_through_loop_devices_and_partitions() {
    let test = "overlap_is_seen_through_loop_devices_and_partitions";
    let dir = TempDir::new("cli-overlap-names");
    let mut data = pattern(47, 8 * MIB);
    // One partition from 1 MiB (sector 2048) to 5 MiB.
    partitioned_image(&mut data, 2048, 8192);
    let disk = dir.file_with("disk.img", &data);
    let Some(whole) = LoopDevice::attach_with_or_skip(test, &disk, 512, &["--partscan"]) else { return };
    let partition = PathBuf::from(format!("{}p1", s(whole.path())));
    let started = Instant::now();
    while !partition.exists() && started.elapsed() < Duration::from_secs(1) {
        std::thread::sleep(Duration::from_millis(20));
    }
    if !partition.exists() {
        // A kernel without the MBR parser: partx reads the table and adds the partition.
        if let Err(error) = run("partx", &["--add", s(whole.path())]) {
            return skip(test, format!("{} did not appear and partx cannot add it: {error}", partition.display()));
        }
    }
    let cases: [(String, String, &str); 4] = [
        // A loop device over the source file, written 512 KiB in.
        (s(&disk).into(), format!("{}@512K", s(whole.path())), "loop device over"),
        // The partition's byte 0 is byte 1 MiB of the file.
        (format!("{}@1536K", s(&disk)), s(&partition).into(), "partition of"),
        (s(&partition).into(), format!("{}@1536K", s(&disk)), "partition of"),
        (format!("{}@2M", s(whole.path())), format!("{}@512K", s(&partition)), "partition of"),
    ];
    for (source, target, layer) in cases {
        let ran = kcopyd(&["copy", &source, &target, "--length", "1M"]);
        assert_usage_error(&ran, &["TARGET", "overlaps SOURCE", "on the same storage", layer]);
    }
    assert_eq!(fs::read(&disk).unwrap(), data, "nothing was written");
    // Ranges side by side on the same storage are fine: the partition's first MiB lies at
    // 1-2 MiB of the file, copied to 6 MiB of the file.
    let ran = kcopyd(&["copy", s(&partition), &format!("{}@6M", s(&disk)), "--length", "1M", "--verify"]);
    assert_eq!(ran.code, 0, "{ran:?}");
    assert_eq!(&fs::read(&disk).unwrap()[6 * MIB..7 * MIB], &data[MIB..2 * MIB]);
}

#[test]
fn a_source_mounted_read_write_gets_a_warning() {
    let test = "a_source_mounted_read_write_gets_a_warning";
    let dir = TempDir::new("cli-mounted-source");
    let Some(ext4) = Ext4OnLoop::new_or_skip(test, &dir, 16 * MIB as u64, 512) else { return };
    let target = dir.join("copy.img");
    let ran = kcopyd(&["copy", s(ext4.device()), s(&target), "--length", "1M"]);
    assert_eq!(ran.code, 0, "{ran:?}");
    assert!(ran.stderr.contains("warning") && ran.stderr.contains("mounted read-write"), "{ran:?}");
    // Through the image file under the loop device, too.
    let ran = kcopyd(&["verify", s(&dir.join("ext4.img")), s(&target), "--length", "1M"]);
    assert!(ran.stderr.contains("mounted read-write"), "{ran:?}");
    // An unmounted device reads without a warning.
    let plain = dir.file_with("plain.img", &pattern(48, MIB));
    let ran = kcopyd(&["copy", s(&plain), s(&dir.join("plain-copy.img"))]);
    assert!(ran.stderr.is_empty(), "{ran:?}");
}

// ---- sparse copies ------------------------------------------------------------------------

fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).unwrap().blocks() * 512
}

/// A 16 MiB file with 192 KiB of data in three places; holes elsewhere.
fn sparse_file(dir: &TempDir) -> PathBuf {
    use std::os::unix::fs::FileExt;
    let path = dir.join("sparse.img");
    let file = fs::File::create(&path).unwrap();
    file.set_len(16 * MIB as u64).unwrap();
    for (i, at) in [0, 5 * MIB, 16 * MIB - 64 * KIB].into_iter().enumerate() {
        file.write_all_at(&pattern(i as u64 + 1, 64 * KIB), at as u64).unwrap();
    }
    file.sync_all().unwrap();
    path
}

#[test]
fn copy_is_sparse_by_default_and_replaces_stale_data_with_holes() {
    let dir = TempDir::new("cli-sparse");
    let source = sparse_file(&dir);
    if allocated_bytes(&source) >= 16 * MIB as u64 {
        return skip("copy_is_sparse_by_default_and_replaces_stale_data_with_holes", "the filesystem keeps no holes");
    }
    let stale = dir.join("stale.img");
    fs::write(&stale, pattern(9, 16 * MIB)).unwrap();
    let fresh = dir.join("fresh.img");
    let ran = kcopyd(&["copy", s(&source), s(&stale), s(&fresh), "--verify", "--json"]);
    assert_eq!(ran.code, 0, "{ran:?}");
    assert_eq!(json(&ran)["verify"]["identical"], true);
    let expected = fs::read(&source).unwrap();
    for target in [&stale, &fresh] {
        assert!(fs::read(target).unwrap() == expected, "{} holds the source", target.display());
        let (source_bytes, target_bytes) = (allocated_bytes(&source), allocated_bytes(target));
        assert!(target_bytes <= source_bytes + 64 * KIB as u64, "{}: {target_bytes} allocated", target.display());
    }
    // --sparse=off and --no-sparse write every byte: the new target is fully allocated.
    for off in ["--sparse=off", "--no-sparse"] {
        let full = dir.join(&format!("full{off}.img"));
        let ran = kcopyd(&["copy", s(&source), s(&full), off, "-q"]);
        assert_eq!(ran.code, 0, "{ran:?}");
        assert!(fs::read(&full).unwrap() == expected);
        assert!(allocated_bytes(&full) >= 16 * MIB as u64, "{off}: {} allocated", allocated_bytes(&full));
    }
    // --target-is-zero writes nothing for zeroes: right on a new file.
    let zero = dir.join("zero.img");
    let ran = kcopyd(&["copy", s(&source), s(&zero), "--target-is-zero", "-q"]);
    assert_eq!(ran.code, 0, "{ran:?}");
    assert!(fs::read(&zero).unwrap() == expected);
}

#[test]
fn sparse_options_are_checked_before_anything_is_written() {
    let dir = TempDir::new("cli-sparse-options");
    let source = dir.file_with("source.img", &pattern(1, 64 * KIB));
    let target = dir.file_with("target.img", &pattern(2, 64 * KIB));
    let before = contents(&[&target]);
    let ran = kcopyd(&["copy", s(&source), s(&target), "--sparse-size", "3000"]);
    assert_usage_error(&ran, &["--sparse-size", "3000", "power of two"]);
    let ran = kcopyd(&["copy", s(&source), s(&target), "--sparse=off", "--target-is-zero"]);
    assert_usage_error(&ran, &["--target-is-zero", "--sparse=off"]);
    let ran = kcopyd(&["copy", s(&source), s(&target), "--sparse=maybe"]);
    assert_eq!(ran.code, 2, "{ran:?}");
    let ran = kcopyd(&["copy", s(&source), s(&target), "--sparse=on", "--no-sparse"]);
    assert_eq!(ran.code, 2, "{ran:?}");
    assert_eq!(contents(&[&target]), before);
}

// ---- copy maps ----------------------------------------------------------------------------

/// The line of `map show` output starting with `label`, its spaces collapsed.
fn show_line(stdout: &str, label: &str) -> String {
    let line =
        stdout.lines().map(str::trim).find(|l| l.starts_with(label)).unwrap_or_else(|| panic!("{label}: {stdout}"));
    line.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The map's `done` lines as sector ranges, replayed (later lines win, as the format says).
fn map_done_bytes(map: &Path) -> Vec<[u64; 2]> {
    let text = fs::read_to_string(map).unwrap();
    let mut done: Vec<[u64; 2]> = Vec::new();
    for line in text.lines().filter(|l| l.starts_with("done ")) {
        let v: Vec<u64> = line.split(' ').skip(1).map(|n| n.parse().unwrap()).collect();
        done.push([v[0] * 512, v[1] * 512]);
    }
    done
}

/// The header a `copy SOURCE TARGET --map MAP` run writes (the run copies everything).
fn map_header_of(source: &Path, target: &Path, map: &Path) -> String {
    let ran = kcopyd(&["copy", s(source), s(target), "--map", s(map), "-q"]);
    assert_eq!(ran.code, 0, "{ran:?}");
    let text = fs::read_to_string(map).unwrap();
    let end = text.find("\nlength ").unwrap();
    let end = end + 1 + text[end + 1..].find('\n').unwrap() + 1;
    text[..end].to_owned()
}

#[test]
fn a_copy_killed_at_random_points_resumes_from_its_map_and_redoes_at_most_one_batch() {
    let dir = TempDir::new("cli-map-kill");
    let len = 96 * MIB;
    let batch = 4 * MIB;
    let source_bytes = pattern(77, len);
    let source = dir.file_with("source.img", &source_bytes);
    let marker = pattern(78, len);
    // Random kill points from a fixed seed, between 0 and 400 ms into the copy.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for round in 0..4 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let delay = Duration::from_millis(seed % 400);
        let target = dir.file_with(&format!("target{round}.img"), &marker);
        let map = dir.join(&format!("copy{round}.map"));
        let args = ["copy", s(&source), s(&target), "--map", s(&map), "--map-batch", "4M", "-q", "--sparse=off"];
        let mut child = Command::new(env!("CARGO_BIN_EXE_kcopyd")).args(args).spawn().unwrap();
        std::thread::sleep(delay);
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let after_kill = fs::read(&target).unwrap();
        let done = map_done_bytes(&map);
        // What the map says is done is on the target.
        for [start, end] in &done {
            let (start, end) = (*start as usize, *end as usize);
            assert!(after_kill[start..end] == source_bytes[start..end], "round {round}: done {start}..{end} differs");
        }
        // Batches run in order, one at a time: nothing past the end of the done prefix plus one
        // batch was written, so resuming redoes at most one batch.
        let done_end = done.iter().map(|[_, end]| *end as usize).max().unwrap_or(0);
        let untouched = (done_end + batch).min(len);
        assert!(after_kill[untouched..] == marker[untouched..], "round {round}: written past one batch");
        let done_bytes: u64 = done.iter().map(|[a, b]| b - a).sum();
        let ran = kcopyd(&["copy", s(&source), s(&target), "--map", s(&map), "--map-batch", "4M", "--json"]);
        assert_eq!(ran.code, 0, "round {round} after {delay:?}: {ran:?}");
        let report = json(&ran);
        assert_eq!(report["bytes"].as_u64().unwrap(), len as u64 - done_bytes, "only what was not done is copied");
        assert!(fs::read(&target).unwrap() == source_bytes, "round {round}: the target ends identical");
        let shown = kcopyd(&["map", "show", s(&map)]);
        assert_eq!(shown.code, 0);
        assert_eq!(show_line(&shown.stdout, "done"), format!("done {len} bytes in 1 ranges 0..{len}"));
        assert_eq!(show_line(&shown.stdout, "remaining"), "remaining 0 bytes in 0 ranges");
    }
}

#[test]
fn a_map_for_another_copy_is_refused_and_nothing_is_written() {
    let dir = TempDir::new("cli-map-other");
    let source = dir.file_with("source.img", &pattern(1, 4 * MIB));
    let target = dir.file_with("target.img", &pattern(2, 4 * MIB));
    let other = dir.file_with("other.img", &pattern(3, 4 * MIB));
    let map = dir.join("copy.map");
    let ran = kcopyd(&["copy", s(&source), s(&target), "--map", s(&map), "--length", "2M", "-q"]);
    assert_eq!(ran.code, 0, "{ran:?}");
    let before = contents(&[&target, &other]);
    for args in [
        vec!["copy", s(&source), s(&other), "--map", s(&map), "--length", "2M"],
        vec!["copy", s(&source), s(&target), "--map", s(&map), "--length", "1M"],
        vec!["copy", &format!("{}@1M", s(&source)), s(&target), "--map", s(&map), "--length", "2M"],
    ] {
        let ran = kcopyd(&args);
        assert_usage_error(&ran, &["--map", "another copy"]);
    }
    assert_eq!(contents(&[&target, &other]), before);
    let ran = kcopyd(&["copy", s(&source), s(&target), "--map", s(&dir.join("missing/x.map"))]);
    assert_eq!(ran.code, 2, "{ran:?}");
    let ran = kcopyd(&["copy", s(&source), s(&target), "--retry-failed"]);
    assert_eq!(ran.code, 2, "--retry-failed needs --map: {ran:?}");
    let ran = kcopyd(&["map", "show", s(&source)]);
    assert_usage_error(&ran, &["not a kcopyd map"]);
}

#[test]
fn retry_failed_copies_only_the_failed_ranges_and_a_torn_last_line_is_ignored() {
    let dir = TempDir::new("cli-map-retry");
    let source_bytes = pattern(5, 4 * MIB);
    let source = dir.file_with("source.img", &source_bytes);
    let marker = pattern(6, 4 * MIB);
    let target = dir.file_with("target.img", &marker);
    // A map as a failed run leaves it: most done, a read failure and a write failure, and a
    // last line torn by a crash. Its header (with the devices' ids) from a real run; the
    // target then gets its old bytes back, in place (the same file).
    let map = dir.join("copy.map");
    let header = map_header_of(&source, &target, &map);
    fs::write(&target, &marker).unwrap();
    let records = "done 0 8192\nread-failed 2048 2056\nwrite-failed 0 4000 4008\ndone 81";
    fs::write(&map, header + records).unwrap();
    let shown = kcopyd(&["map", "show", s(&map)]);
    assert_eq!(show_line(&shown.stdout, "read failed"), "read failed 4096 bytes in 1 ranges 1048576..1052672");
    assert_eq!(show_line(&shown.stdout, "write failed"), "write failed 4096 bytes in 1 ranges 2048000..2052096");
    assert_eq!(show_line(&shown.stdout, "remaining"), "remaining 0 bytes in 0 ranges", "the torn line is ignored");
    let ran = kcopyd(&["copy", s(&source), s(&target), "--map", s(&map), "--retry-failed", "--json"]);
    assert_eq!(ran.code, 0, "{ran:?}");
    assert_eq!(json(&ran)["bytes"], 8192);
    let after = fs::read(&target).unwrap();
    for (range, from) in [(2048 * 512..2056 * 512, &source_bytes), (4000 * 512..4008 * 512, &source_bytes)] {
        assert!(after[range.clone()] == from[range.clone()], "{range:?} retried");
    }
    // Everything else was done before: not written again.
    assert!(after[..2048 * 512] == marker[..2048 * 512]);
    assert!(after[2056 * 512..4000 * 512] == marker[2056 * 512..4000 * 512]);
    let shown = kcopyd(&["map", "show", s(&map)]);
    assert_eq!(show_line(&shown.stdout, "read failed"), "read failed 0 bytes in 0 ranges");
    assert_eq!(show_line(&shown.stdout, "done"), format!("done {} bytes in 1 ranges 0..{}", 4 * MIB, 4 * MIB));
}

/// Runs `copy SOURCE TARGET --map MAP` plus `extra`.
fn copy_mapped(source: &Path, target: &Path, map: &Path, extra: &[&str]) -> Ran {
    let mut args = vec!["copy", s(source), s(target), "--map", s(map)];
    args.extend(extra);
    kcopyd(&args)
}

#[test]
fn a_map_refuses_devices_that_are_not_the_ones_it_was_written_for() {
    let dir = TempDir::new("cli-map-identity");
    let data = pattern(11, 2 * MIB);
    let source = dir.file_with("source.img", &data);
    let target = dir.join("target.img");
    let map = dir.join("copy.map");
    assert_eq!(copy_mapped(&source, &target, &map, &["-q"]).code, 0);
    let map_before = fs::read(&map).unwrap();
    // The target deleted: the same command would create it afresh and trust the map.
    fs::remove_file(&target).unwrap();
    let ran = copy_mapped(&source, &target, &map, &[]);
    assert_usage_error(&ran, &["--map", "TARGET", "delete the map"]);
    assert!(!target.exists(), "the target created for the refused run is removed again");
    // Recreated by hand, same size (its inode number may well be the old one's).
    fs::write(&target, vec![0u8; 2 * MIB]).unwrap();
    let ran = copy_mapped(&source, &target, &map, &[]);
    assert_usage_error(&ran, &["--map", "TARGET", "target.img", "not the device the map was written for"]);
    assert!(fs::read(&target).unwrap().iter().all(|&b| b == 0), "nothing written");
    // A target of another size; a source replaced by another file of the same size.
    let other = dir.join("other.img");
    let map2 = dir.join("second.map");
    fs::write(&other, pattern(12, 2 * MIB)).unwrap();
    assert_eq!(copy_mapped(&source, &other, &map2, &["-q", "--length", "1M"]).code, 0);
    fs::OpenOptions::new().write(true).open(&other).unwrap().set_len(3 * MIB as u64).unwrap();
    assert_usage_error(&copy_mapped(&source, &other, &map2, &["--length", "1M"]), &["TARGET", "delete the map"]);
    fs::write(dir.join("new-source.img"), &data).unwrap();
    fs::rename(dir.join("new-source.img"), &source).unwrap();
    assert_usage_error(&copy_mapped(&source, &target, &map, &[]), &["SOURCE", "source.img", "delete the map"]);
    assert_eq!(fs::read(&map).unwrap(), map_before, "a refused run leaves the map as it was");
    // A map from before maps recorded identities cannot vouch for anything.
    let old = dir.join("old.map");
    let header =
        format!("kcopyd-map 1\nsource 0 {}\ntarget 0 {}\nlength {}\ndone 0 4096\n", s(&source), s(&target), 2 * MIB);
    fs::write(&old, header).unwrap();
    assert_usage_error(&copy_mapped(&source, &target, &old, &[]), &["--map", "no identity", "delete it"]);
    assert!(fs::read(&target).unwrap().iter().all(|&b| b == 0), "nothing written");
}

#[test]
fn two_targets_swapped_between_runs_are_refused() {
    let dir = TempDir::new("cli-map-swap");
    let source = dir.file_with("source.img", &pattern(13, MIB));
    let (a, b) = (dir.join("a.img"), dir.join("b.img"));
    let map = dir.join("copy.map");
    let ran = kcopyd(&["copy", s(&source), s(&a), s(&b), "--map", s(&map), "-q"]);
    assert_eq!(ran.code, 0, "{ran:?}");
    let swapped = dir.join("swap.img");
    fs::rename(&a, &swapped).unwrap();
    fs::rename(&b, &a).unwrap();
    fs::rename(&swapped, &b).unwrap();
    let ran = kcopyd(&["copy", s(&source), s(&a), s(&b), "--map", s(&map)]);
    assert_usage_error(&ran, &["TARGET", "a.img", "not the device"]);
}

#[test]
fn two_runs_sharing_one_map_the_second_is_refused_as_busy() {
    let dir = TempDir::new("cli-map-busy");
    let source = dir.file_with("source.img", &pattern(14, 4 * MIB));
    let map = dir.join("copy.map");
    // Simulated targets take no file lock: only the map's lock keeps the runs apart. About
    // 4 s at 1 MiB/s.
    let args = ["copy", s(&source), "sim:", "--map", s(&map), "--map-batch", "512K", "--throttle-rate", "1M", "-q"];
    let mut first = Command::new(env!("CARGO_BIN_EXE_kcopyd")).args(args).stdout(Stdio::piped()).spawn().unwrap();
    let started = Instant::now();
    while !(map.exists() && write_locked(&map)) {
        assert!(started.elapsed() < Duration::from_secs(10), "the first run locks its map");
        assert!(first.try_wait().unwrap().is_none(), "the first run is still running");
        std::thread::sleep(Duration::from_millis(10));
    }
    let before = fs::read(&map).unwrap();
    let second = kcopyd(&args);
    assert_usage_error(&second, &["--map", "map busy"]);
    let now = fs::read(&map).unwrap();
    assert!(now.starts_with(&before) && first.try_wait().unwrap().is_none(), "only the first run appends");
    assert_eq!(first.wait().unwrap().code(), Some(0));
}

#[test]
fn a_map_that_cannot_hold_the_copy_is_refused_before_any_write_and_leaves_nothing() {
    let dir = TempDir::new("cli-map-refuse");
    let data = pattern(15, 2 * MIB);
    let source = dir.file_with("source.img", &data);
    let marker = pattern(16, 2 * MIB);
    let target = dir.file_with("target.img", &marker);
    let map = dir.join("copy.map");
    let header = map_header_of(&source, &target, &map);
    fs::write(&target, &marker).unwrap();
    // Records past the copy's 4096 sectors, reversed, or past 64 bits.
    for record in ["done 0 999999999\n", "done 8 4\n", "read-failed 0 99999999999999999999\n"] {
        fs::write(&map, header.clone() + record).unwrap();
        assert_usage_error(&copy_mapped(&source, &target, &map, &[]), &["--map", "line 7"]);
        assert_eq!(fs::read(&target).unwrap(), marker, "{record}: nothing written");
    }
    // The map is the target or the source, by another name.
    fs::hard_link(&target, dir.join("link.map")).unwrap();
    assert_usage_error(&copy_mapped(&source, &target, &dir.join("link.map"), &[]), &["TARGET", "itself"]);
    assert_usage_error(&copy_mapped(&source, &target, &source, &[]), &["SOURCE", "itself"]);
    let created = dir.join("created.img");
    assert_usage_error(&copy_mapped(&source, &created, &created, &[]), &["TARGET", "itself"]);
    assert!(!created.exists(), "the target created for the refused run is removed again");
    // A target whose name a map line cannot hold.
    let newline = dir.join("new\nline.img");
    assert_usage_error(&copy_mapped(&source, &newline, &dir.join("n.map"), &[]), &["TARGET", "newline"]);
    assert!(!newline.exists() && !dir.join("n.map").exists());
    // A map nobody may write.
    use std::os::unix::fs::PermissionsExt;
    fs::write(&map, &header).unwrap();
    fs::set_permissions(&map, fs::Permissions::from_mode(0o444)).unwrap();
    assert_usage_error(&copy_mapped(&source, &target, &map, &[]), &["--map", "read-only", "also as root"]);
    assert_eq!(fs::read(&target).unwrap(), marker);
    // A refused run leaves no map behind, and the next run is not refused.
    let fresh = dir.join("fresh.map");
    assert_usage_error(&copy_mapped(&source, &target, &fresh, &["--map-batch", "100"]), &["--map-batch"]);
    assert!(!fresh.exists(), "no map left behind");
    assert_eq!(copy_mapped(&source, &target, &fresh, &["-q"]).code, 0);
    assert_eq!(fs::read(&target).unwrap(), data);
}

#[test]
fn retry_failed_with_nothing_failed_or_no_map_says_so_and_exits_0() {
    let dir = TempDir::new("cli-map-nothing");
    let source = dir.file_with("source.img", &pattern(17, MIB));
    let target = dir.join("target.img");
    let map = dir.join("copy.map");
    let ran = copy_mapped(&source, &target, &map, &["--retry-failed"]);
    assert_eq!(ran.code, 0, "{ran:?}");
    assert!(ran.stderr.contains("no map") && ran.stderr.contains("nothing to retry"), "{ran:?}");
    assert!(!map.exists() && !target.exists(), "nothing created");
    assert_eq!(copy_mapped(&source, &target, &map, &["-q"]).code, 0);
    let ran = copy_mapped(&source, &target, &map, &["--retry-failed", "--json"]);
    assert_eq!(ran.code, 0, "{ran:?}");
    assert!(ran.stderr.contains("records nothing failed"), "{ran:?}");
    assert_eq!(json(&ran)["bytes"], 0);
}

/// A FIFO at `path`, fed `bytes` by a thread that then keeps it open for `hold` (a map
/// show reading to the end would wait that long).
fn fifo_feeding(path: &Path, bytes: Vec<u8>, hold: Duration) -> std::thread::JoinHandle<()> {
    assert!(Command::new("mkfifo").arg(path).status().unwrap().success());
    let path = path.to_path_buf();
    std::thread::spawn(move || {
        use std::io::Write;
        let mut fifo = fs::OpenOptions::new().write(true).open(&path).unwrap();
        let _ = fifo.write_all(&bytes);
        std::thread::sleep(hold);
    })
}

#[test]
fn map_show_refuses_a_file_that_is_not_a_map_after_its_first_line() {
    let dir = TempDir::new("cli-map-show-big");
    // 64 MiB of no newline, and more to come: only the first line's bound is read.
    let fifo = dir.join("endless");
    let feeder = fifo_feeding(&fifo, vec![b'x'; 64 * MIB], Duration::from_secs(8));
    let started = Instant::now();
    let ran = kcopyd(&["map", "show", s(&fifo)]);
    assert_usage_error(&ran, &["FILE", "not a kcopyd map"]);
    assert!(started.elapsed() < Duration::from_secs(4), "refused after the first line: {:?}", started.elapsed());
    drop(feeder);
}

#[test]
fn map_show_ends_at_once_on_sigint_and_sigterm_while_it_reads() {
    let dir = TempDir::new("cli-map-show-signal");
    for (signal, code) in [("-INT", 130), ("-TERM", 143)] {
        let fifo = dir.join(&format!("map{code}"));
        let feeder = fifo_feeding(&fifo, b"kcopyd-map 2\nsource 0 a\n".to_vec(), Duration::from_secs(8));
        let child = Command::new(env!("CARGO_BIN_EXE_kcopyd"))
            .args(["map", "show", s(&fifo)])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        kcopyd_tests::fixtures::wait_for_signal_handlers(child.id());
        std::thread::sleep(Duration::from_millis(200));
        assert!(Command::new("kill").args([signal, &child.id().to_string()]).status().unwrap().success());
        let signalled = Instant::now();
        let ran = ran(child.wait_with_output().unwrap());
        assert_eq!(ran.code, code, "{signal}: {ran:?}");
        assert!(signalled.elapsed() < Duration::from_secs(2), "{signal}: at once, not {:?}", signalled.elapsed());
        drop(feeder);
    }
}

#[test]
fn map_show_to_a_closed_stdout_exits_141_quietly() {
    let dir = TempDir::new("cli-map-show-pipe");
    let source = dir.file_with("source.img", &pattern(18, MIB));
    let map = dir.join("copy.map");
    assert_eq!(copy_mapped(&source, &dir.join("target.img"), &map, &["-q"]).code, 0);
    // The map comes through a FIFO only once stdout's reader has gone.
    let fifo = dir.join("map.fifo");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let mut child = Command::new(env!("CARGO_BIN_EXE_kcopyd"))
        .args(["map", "show", s(&fifo)])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    fs::write(&fifo, fs::read(&map).unwrap()).unwrap();
    let ran = ran(child.wait_with_output().unwrap());
    assert_eq!(ran.code, 141, "{ran:?}");
    assert!(ran.stderr.is_empty(), "quiet: {ran:?}");
}

#[test]
fn a_map_refuses_a_block_device_that_now_holds_another_file() {
    let test = "a_map_refuses_a_block_device_that_now_holds_another_file";
    let dir = TempDir::new("cli-map-loop");
    let source = dir.file_with("source.img", &pattern(19, 2 * MIB));
    let (first, second) = (dir.file_with("first.img", &[0u8; 2 * MIB]), dir.file_with("second.img", &[0u8; 2 * MIB]));
    let map = dir.join("copy.map");
    let path = {
        let Some(device) = LoopDevice::attach_or_skip(test, &first, 512) else { return };
        let path = device.path().to_path_buf();
        assert_eq!(copy_mapped(&source, &path, &map, &["-q"]).code, 0);
        path
    };
    // The same loop device, the same size, another file behind it.
    let Some(device) = LoopDevice::attach_or_skip(test, &second, 512) else { return };
    if device.path() != path {
        skip(test, "the loop device came back under another name");
        return;
    }
    let ran = copy_mapped(&source, device.path(), &map, &[]);
    assert_usage_error(&ran, &["TARGET", "not the device the map was written for", "delete the map"]);
    assert!(fs::read(&second).unwrap().iter().all(|&b| b == 0), "nothing written");
}

#[test]
fn a_mapped_copy_with_no_whole_block_keeps_the_target_and_the_map_it_created() {
    let dir = TempDir::new("cli-map-tail");
    // 100 bytes: no whole block for the engine, only the tail.
    let data = pattern(25, 100);
    let source = dir.file_with("source.img", &data);
    let (target, map) = (dir.join("target.img"), dir.join("copy.map"));
    let ran = copy_mapped(&source, &target, &map, &["-q"]);
    assert_eq!(ran.code, 0, "{ran:?}");
    assert_eq!(fs::read(&target).ok(), Some(data), "the created target stays");
    assert!(map.exists(), "the map stays");
    assert_eq!(copy_mapped(&source, &target, &map, &["-q"]).code, 0, "and the same command runs again");
}

// ---- signals in every phase, closed pipes, output files, exact reports ----------------------

/// A running kcopyd whose output is collected by a thread of its own.
struct Running {
    pid: u32,
    done: std::sync::mpsc::Receiver<Output>,
    started: Instant,
}

/// Starts kcopyd with `stdout` and `stderr` as given, and waits until it catches SIGINT.
fn start(args: &[&str], stdout: Stdio, stderr: Stdio) -> Running {
    let child = Command::new(env!("CARGO_BIN_EXE_kcopyd"))
        .args(args)
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .expect("kcopyd starts");
    let pid = child.id();
    let (send, done) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = send.send(child.wait_with_output().expect("kcopyd is waited for"));
    });
    kcopyd_tests::fixtures::wait_for_signal_handlers(pid);
    Running { pid, done, started: Instant::now() }
}

fn send_signal(pid: u32, signal: &str) {
    let sent = Command::new("kill").args([&format!("-{signal}"), &pid.to_string()]).status().unwrap();
    assert!(sent.success(), "kill -{signal} {pid}");
}

impl Running {
    /// Its output, if it ends within `limit`; otherwise it is killed and the test fails.
    fn ends_within(self, limit: Duration, what: &str) -> Ran {
        match self.done.recv_timeout(limit) {
            Ok(output) => ran(output),
            Err(_) => {
                send_signal(self.pid, "KILL");
                panic!("{what}: still running {:?} after it was asked to stop", self.started.elapsed());
            }
        }
    }
}

/// Waits until `path` exists (a command has created its target).
fn wait_for_file(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        assert!(Instant::now() < deadline, "{} appears", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A pipe whose reader is already gone: every write to it fails with EPIPE. The reader is
/// `true`, which exits at once; this process never held the read end.
fn closed_pipe() -> Stdio {
    let mut reader = Command::new("true").stdin(Stdio::piped()).spawn().expect("true runs");
    let writer = reader.stdin.take().expect("a pipe to true");
    reader.wait().expect("true exits");
    Stdio::from(writer)
}

fn output_with(args: &[&str], stdout: Stdio, stderr: Stdio) -> Ran {
    let output = Command::new(env!("CARGO_BIN_EXE_kcopyd"))
        .args(args)
        .stdout(stdout)
        .stderr(stderr)
        .output()
        .expect("kcopyd runs");
    ran(output)
}

#[test]
fn a_closed_stdout_or_stderr_never_panics_and_the_report_is_not_lost() {
    // copy's report goes to stderr when stdout is gone; its exit status stays its own.
    let copy = output_with(&["copy", "sim:size=1M,seed=1", "sim:", "--json"], closed_pipe(), Stdio::piped());
    assert_eq!(copy.code, 0, "{copy:?}");
    assert!(copy.stderr.contains("\"command\":\"copy\""), "the report on stderr: {copy:?}");
    let failed = output_with(
        &["copy", "sim:size=1M,seed=1,bad-read=8-9", "sim:", "--ignore-errors"],
        closed_pipe(),
        Stdio::piped(),
    );
    assert_eq!(failed.code, 1, "{failed:?}");
    assert!(failed.stderr.contains("read errors at 8-9"), "{failed:?}");
    // A command whose job is printing stops quietly at the first failed write: 141.
    let demo = output_with(&["demo", "--size", "16M", "--quiet"], closed_pipe(), Stdio::piped());
    assert_eq!(demo.code, 141, "{demo:?}");
    assert!(demo.stderr.is_empty(), "quietly: {demo:?}");
    // An error line goes to stdout when stderr is gone.
    let dir = TempDir::new("cli-closed-pipes");
    let missing = dir.join("missing.img");
    let usage = output_with(&["copy", s(&missing), s(&dir.join("t.img"))], Stdio::piped(), closed_pipe());
    assert_eq!(usage.code, 2, "{usage:?}");
    assert!(usage.stdout.contains("no such file or device"), "{usage:?}");
    // Both gone: still no panic, still the command's own status.
    let both = output_with(&["copy", "sim:size=1M,seed=1", "sim:", "--json"], closed_pipe(), closed_pipe());
    assert_eq!(both.code, 0, "{both:?}");
}

#[test]
fn a_signal_while_devices_are_opened_ends_the_command_at_once_and_removes_what_it_created() {
    // Filling a dense 1 GiB simulated source takes seconds in a debug build: the signal comes
    // while the command is opening its devices, before anything is written.
    let dir = TempDir::new("cli-signal-opening");
    let target = dir.join("target.img");
    let running = start(&["copy", "sim:size=1G,seed=1", s(&target), "--json"], Stdio::piped(), Stdio::piped());
    send_signal(running.pid, "TERM");
    let ran = running.ends_within(Duration::from_secs(3), "copy while opening");
    assert_eq!(ran.code, 143, "{ran:?}");
    assert_eq!(ran.stderr.lines().count(), 1, "one line: {ran:?}");
    assert!(ran.stderr.contains("interrupted before anything was written"), "{ran:?}");
    assert!(!target.exists(), "nothing is left behind");
}

#[test]
fn a_second_signal_quits_at_once_with_a_one_line_summary() {
    // Each read takes 4 s: the first signal waits for the reads in flight, the second does not.
    let dir = TempDir::new("cli-signal-twice");
    let target = dir.join("target.img");
    let running = start(
        &["copy", "sim:size=8M,seed=1,sparse=on,latency=4s", s(&target), "--subjob-size", "1M", "--json"],
        Stdio::piped(),
        Stdio::piped(),
    );
    wait_for_file(&target);
    std::thread::sleep(Duration::from_millis(1000));
    send_signal(running.pid, "INT");
    std::thread::sleep(Duration::from_millis(300));
    send_signal(running.pid, "INT");
    let ran = running.ends_within(Duration::from_secs(2), "copy after two signals");
    assert_eq!(ran.code, 130, "{ran:?}");
    assert!(ran.stderr.contains("quit at once: copy reached 0 B of 8 MiB"), "{ran:?}");
}

#[test]
fn an_interrupted_verify_reports_the_differences_it_found() {
    let dir = TempDir::new("cli-verify-interrupted");
    let target = dir.join("target.img");
    assert_eq!(kcopyd(&["copy", "sim:size=16M,seed=1,sparse=on", s(&target), "-q"]).code, 0);
    let mut bytes = fs::read(&target).unwrap();
    bytes[100 * 512] ^= 0xff;
    fs::write(&target, &bytes).unwrap();
    // 16 MiB at 2 MiB/s: 8 s; interrupted after about two, long after sector 100.
    let running = start(
        &["verify", "sim:size=16M,seed=1,sparse=on,bandwidth=2M", s(&target), "--subjob-size", "64K", "--json"],
        Stdio::piped(),
        Stdio::piped(),
    );
    std::thread::sleep(Duration::from_millis(2000));
    send_signal(running.pid, "INT");
    let ran = running.ends_within(Duration::from_secs(3), "verify");
    assert_eq!(ran.code, 130, "{ran:?}");
    let report = json(&ran);
    assert_eq!(report["status"], "cancelled");
    let compared = report["bytes"].as_u64().unwrap();
    assert!(compared > 51200 && compared < 16 << 20, "compared {compared}");
    let verify = &report["targets"][0]["verify"];
    assert_eq!(report["targets"][0]["status"], "differs", "{report}");
    assert_eq!(ranges(&verify["differing_sectors"]), [[100, 101]]);
    assert_eq!(report["verify"]["identical"], false);
}

#[test]
fn a_cancelled_throttled_copy_reports_the_bytes_it_moved() {
    // At 2 MiB/s, sub-jobs wait for the throttle; a cancel gives them up. They were not moved.
    let dir = TempDir::new("cli-throttle-cancel");
    let target = dir.join("target.img");
    let running = start(
        &[
            "copy",
            "sim:size=64M,seed=1,sparse=on",
            s(&target),
            "--throttle-rate",
            "2M",
            "--subjob-size",
            "256K",
            "--json",
        ],
        Stdio::piped(),
        Stdio::piped(),
    );
    wait_for_file(&target);
    std::thread::sleep(Duration::from_millis(1500));
    send_signal(running.pid, "INT");
    let ran = running.ends_within(Duration::from_secs(3), "throttled copy");
    assert_eq!(ran.code, 130, "{ran:?}");
    let report = json(&ran);
    let (bytes, copied) = (report["bytes"].as_u64().unwrap(), report["bytes_copied"].as_u64().unwrap());
    assert!(copied > 0, "{report}");
    assert_eq!(bytes, copied, "one target, no errors: every byte moved is copied");
    let rate = report["throughput_bytes_per_s"].as_f64().unwrap();
    assert!(rate < 3.0 * 1024.0 * 1024.0, "the rate is the throttle's, not more: {rate}");
}

#[test]
fn calibrate_stops_at_a_signal_and_removes_its_scratch_file() {
    let dir = TempDir::new("cli-calibrate-signal");
    let scratch = dir.join("scratch.img");
    let model = dir.join("model.toml");
    let running = start(
        &["sim", "calibrate", s(&scratch), "--size", "64M", "--point-time", "200ms", "--out", s(&model), "-q"],
        Stdio::piped(),
        Stdio::piped(),
    );
    wait_for_file(&scratch);
    std::thread::sleep(Duration::from_millis(500));
    send_signal(running.pid, "INT");
    let ran = running.ends_within(Duration::from_secs(3), "calibrate");
    assert_eq!(ran.code, 130, "{ran:?}");
    assert!(ran.stderr.contains("no model written"), "{ran:?}");
    assert!(!scratch.exists(), "the scratch file is removed");
    assert!(!model.exists(), "no model");
}

#[test]
fn output_files_are_checked_before_the_work_starts() {
    let dir = TempDir::new("cli-output-files");
    let device = dir.file_with("device.img", &pattern(5, 16 * MIB));
    let before = fs::read(&device).unwrap();
    let link = dir.join("link.img");
    fs::hard_link(&device, &link).unwrap();
    let calibrate = |out: &Path| {
        let started = Instant::now();
        let ran = kcopyd(&[
            "sim",
            "calibrate",
            s(&device),
            "--scratch-length",
            "16M",
            "--io-sizes",
            "64K",
            "--queue-depths",
            "1",
            "--point-time",
            "10ms",
            "--rounds",
            "1",
            "--out",
            s(out),
            "-q",
        ]);
        (ran, started.elapsed())
    };
    for out in [&device, &link] {
        let (ran, _) = calibrate(out);
        assert_usage_error(&ran, &["--out", "is DEVICE"]);
    }
    assert!(fs::read(&device).unwrap() == before, "nothing was written");
    let (ran, _) = calibrate(&dir.join("no-such-folder/model.toml"));
    assert_usage_error(&ran, &["--out", "does not exist"]);
    let (ran, _) = calibrate(dir.path());
    assert_usage_error(&ran, &["--out", "is a directory"]);
    // A scenario is not run for a picture that cannot be drawn.
    let scenario = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scenarios/nvme-resync.toml");
    let started = Instant::now();
    let svg = dir.join("missing/run.svg");
    let ran = kcopyd(&["sim", "run", s(&scenario), "--svg", s(&svg)]);
    assert_usage_error(&ran, &["--svg", "does not exist"]);
    assert!(started.elapsed() < Duration::from_secs(5), "refused before running: {:?}", started.elapsed());
}

#[test]
fn small_messages_name_the_real_problem() {
    let cases: [(&[&str], &[&str]); 9] = [
        (
            &["copy", "sim:size=1M,seed=1", "sim:", "--target-is-zero", "--no-sparse"],
            &["--target-is-zero: needs a sparse copy"],
        ),
        (
            &["copy", "sim:size=1M,seed=1", "sim:", "--no-sparse", "-S", "64K"],
            &["--sparse-size '65536'", "turns sparse copies off"],
        ),
        (&["copy", "sim:size=1M,latency=99999999999999999999", "sim:"], &["is too large"]),
        (&["copy", "NBD://host/", "sim:"], &["'NBD'", "lower case", "'nbd://'"]),
        (&["copy", "nbd://host:0/x", "sim:"], &["port 0"]),
        (
            &["copy", "sim:size=1M,seed=1,block=4096", "sim:", "--length", "1000"],
            &["less than one 4096-byte logical block"],
        ),
        (
            &["copy", "sim:size=1M,seed=1,block=4096", "sim:", "--length", "5000"],
            &["--length 4096 leaves the last 904 bytes out"],
        ),
        (&["sim", "calibrate", "/nonexistent-dir/x.img", "--point-time", "0s"], &["--point-time", "must be from"]),
        // Past the end is the problem, not the alignment of a length no device holds.
        (&["zero", "sim:size=1M", "--length", "18446744073709551615"], &["too small", "holds 1048576 bytes"]),
    ];
    for (args, needles) in cases {
        let ran = kcopyd(args);
        assert_usage_error(&ran, needles);
        assert!(!ran.stderr.contains("''"), "no empty quotes: {ran:?}");
    }
    let dir = TempDir::new("cli-small-messages");
    let scenario = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scenarios/nvme-resync.toml");
    let vary = [
        "sim",
        "sweep",
        s(&scenario),
        "--vary",
        "client.subjobs_in_flight=1,2",
        "--vary",
        "client.subjobs_in_flight=4",
    ];
    assert_usage_error(&kcopyd(&vary), &["--vary", "varied twice"]);
    drop(dir);
}

#[test]
fn a_recovered_read_error_and_a_failed_flush_are_reported_as_they_happened() {
    let test = "a_recovered_read_error_and_a_failed_flush_are_reported_as_they_happened";
    if run("strace", &["-V"]).is_err() {
        skip(test, "strace is missing");
        return;
    }
    let dir = TempDir::new("cli-exact-reports");
    let source = dir.file_with("source.img", &pattern(31, 4 * MIB));
    let strace = |inject: &[&str], target: &Path, extra: &[&str]| {
        let output = Command::new("strace")
            .args(["-f", "-qq", "-o", "/dev/null"])
            .args(inject)
            .args([env!("CARGO_BIN_EXE_kcopyd"), "copy", s(&source), s(target), "--json"])
            .args(extra)
            .output()
            .unwrap();
        ran(output)
    };
    // The second preadv of the one I/O thread (strace counts per thread) fails once;
    // narrowing reads every block again: nothing is missing.
    let recovered = dir.join("recovered.img");
    let ran = strace(
        &["-e", "trace=preadv", "-e", "inject=preadv:error=EIO:when=2"],
        &recovered,
        &["--ignore-errors", "--subjobs-in-flight", "1"],
    );
    if ran.stderr.contains("ptrace") {
        skip(test, format!("strace cannot trace here: {}", ran.stderr.trim()));
        return;
    }
    assert_eq!(ran.code, 0, "{ran:?}");
    let report = json(&ran);
    assert_eq!((report["status"].as_str(), report["read_errors_recovered"].as_bool()), (Some("ok"), Some(true)));
    assert_eq!(fs::read(&recovered).unwrap(), fs::read(&source).unwrap());
    // Every flush fails: the target holds nothing for sure, and bytes_copied says so.
    let unflushed = dir.join("unflushed.img");
    let ran = strace(
        &["-e", "trace=fdatasync,fsync", "-e", "inject=fdatasync:error=EIO", "-e", "inject=fsync:error=EIO"],
        &unflushed,
        &[],
    );
    assert_eq!(ran.code, 1, "{ran:?}");
    let report = json(&ran);
    assert_eq!(report["targets"][0]["status"], "flush_failed");
    assert_eq!((report["bytes_copied"].as_u64(), report["bytes_not_copied"].as_u64()), (Some(0), Some(4 << 20)));
}

#[test]
fn a_resumed_map_copy_reports_this_runs_bytes_beside_the_total() {
    let dir = TempDir::new("cli-map-headline");
    let (target, map) = (dir.join("target.img"), dir.join("copy.map"));
    let args =
        ["copy", "sim:size=16M,seed=1,sparse=on,bandwidth=4M", s(&target), "--map", s(&map), "--map-batch", "1M"];
    let running = start(&args, Stdio::piped(), Stdio::piped());
    wait_for_file(&target);
    std::thread::sleep(Duration::from_millis(1500));
    send_signal(running.pid, "INT");
    let first = running.ends_within(Duration::from_secs(3), "the first run");
    assert_eq!(first.code, 130, "{first:?}");
    let resumed = kcopyd(&[&args[..], &["--json"]].concat());
    assert_eq!(resumed.code, 0, "{resumed:?}");
    let report = json(&resumed);
    let (bytes, before, copied) = (
        report["bytes"].as_u64().unwrap(),
        report["bytes_done_before"].as_u64().unwrap(),
        report["bytes_copied"].as_u64().unwrap(),
    );
    assert!(before > 0 && bytes > 0, "{report}");
    assert_eq!(bytes + before, copied, "this run's bytes and the earlier runs' add up: {report}");
    assert_eq!(copied, 16 << 20);
    let rate = report["throughput_bytes_per_s"].as_f64().unwrap();
    let seconds = report["seconds"].as_f64().unwrap();
    assert!((rate * seconds - bytes as f64).abs() < 1.0, "the rate is this run's");
    let again = kcopyd(&args);
    assert!(again.stdout.starts_with("copied 16 MiB in") && again.stdout.contains("(0 B by this run"), "{again:?}");
}

#[test]
fn a_signal_during_validation_removes_the_target_files_it_created() {
    // Nothing announces "between two copies" outside a terminal, so the signal is aimed at the
    // copies as a whole: once the last target file exists, many rounds of copies are left.
    // Whether it lands in a copy (cancelled, then the run ends) or between two (quit at
    // once), the command ends with 130, no table, and none of the files it made.
    let dir = TempDir::new("cli-validate-signal");
    let source = dir.file_with("source.img", &pattern(47, 4 * MIB));
    let target = dir.join("target.img");
    let model = dir.file_with(
        "model.toml",
        b"description = \"by hand\"\n[latency.read]\nbandwidth_bytes_per_s = 1000000000\n\
          [latency.write]\nbandwidth_bytes_per_s = 1000000000\n",
    );
    let args =
        ["sim", "validate", s(&source), s(&target), "--model", s(&model), "--configs", "64Kx1x3", "--runs", "50"];
    for signal in ["INT", "TERM"] {
        let running = start(&args, Stdio::piped(), Stdio::piped());
        let last = PathBuf::from(format!("{}.3", target.display()));
        wait_for_file(&last);
        send_signal(running.pid, signal);
        let ran = running.ends_within(Duration::from_secs(5), "sim validate");
        assert_eq!(ran.code, if signal == "INT" { 130 } else { 143 }, "{ran:?}");
        assert_eq!(ran.stdout, "", "no table: {ran:?}");
        for path in [target.clone(), PathBuf::from(format!("{}.2", target.display())), last] {
            assert!(!path.exists(), "{} was left behind", path.display());
        }
    }
}

#[test]
fn a_target_renamed_over_while_it_is_copied_is_not_reported_as_copied() {
    // 8 MiB at 2 MiB/s takes over 3 s; the target is replaced as soon as the command has
    // opened it (created and sized to the range). The copy's writes go to the file opened,
    // which no longer has the name: the command must not say the name holds the copy.
    let dir = TempDir::new("cli-target-replaced");
    let source = dir.file_with("source.img", &pattern(41, 8 * MIB));
    let target = dir.join("target.img");
    let other = dir.file_with("other.img", &pattern(42, 8 * MIB));
    let args = ["copy", s(&source), s(&target), "--json", "--throttle-rate", "2M", "--subjob-size", "1M"];
    let child = Command::new(env!("CARGO_BIN_EXE_kcopyd")).args(args).stdout(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while fs::metadata(&target).map_or(true, |m| m.len() < 8 * MIB as u64) {
        assert!(Instant::now() < deadline, "the command did not open its target");
        std::thread::sleep(Duration::from_millis(1));
    }
    fs::rename(&other, &target).unwrap();
    let ran = ran(child.wait_with_output().unwrap());
    assert_eq!(ran.code, 1, "{ran:?}");
    let report = json(&ran);
    assert_eq!(report["status"], "errors", "{report}");
    assert_eq!((report["bytes_copied"].as_u64(), report["bytes_not_copied"].as_u64()), (Some(0), Some(8 * MIB as u64)));
    assert_eq!(report["targets"][0]["status"], "replaced", "{report}");
    let change = report["targets"][0]["path_change"].as_str().unwrap();
    assert!(change.contains("another file") && change.contains("not there"), "{change}");
    assert_eq!(fs::read(&target).unwrap(), pattern(42, 8 * MIB), "the file now at the name is untouched");
}

#[test]
fn a_proc_or_sysfs_file_is_refused_as_source_target_or_map_and_nothing_is_made() {
    // A /proc file says 0 bytes: copied by its size, it made an empty target and said "ok".
    let dir = TempDir::new("cli-pseudo-file");
    let target = dir.join("target.img");
    for buffered in [&[][..], &["--buffered"][..]] {
        let ran = kcopyd(&[&["copy", "/proc/self/status", s(&target)][..], buffered].concat());
        assert_usage_error(&ran, &["SOURCE '/proc/self/status'", "proc filesystem", "do not hold the size they say"]);
        assert!(!target.exists(), "no target made");
    }
    let source = dir.file_with("source.img", &pattern(43, 4 * KIB));
    // Nor is a map kept there: writing a /proc/sys file sets something in the kernel.
    let sysctl = "/proc/sys/vm/swappiness";
    let before = fs::read(sysctl).unwrap();
    let ran = kcopyd(&["copy", s(&source), s(&target), "--map", sysctl]);
    assert_usage_error(&ran, &[&format!("--map '{sysctl}'"), "proc filesystem", "not a file to keep a map in"]);
    assert_eq!(fs::read(sysctl).unwrap(), before);
    assert!(!target.exists(), "no target made");
    let sysfs = "/sys/kernel/mm/transparent_hugepage/enabled";
    if !Path::new(sysfs).exists() {
        return skip("a_proc_or_sysfs_file_is_refused_as_source_target_or_map", format!("{sysfs} is not here"));
    }
    let before = fs::read(sysfs).unwrap();
    let ran = kcopyd(&["copy", "--buffered", s(&source), sysfs]);
    assert_usage_error(&ran, &[&format!("TARGET '{sysfs}'"), "sysfs filesystem"]);
    assert_eq!(fs::read(sysfs).unwrap(), before);
}

#[test]
fn two_copies_started_together_onto_one_missing_target_leave_the_winners_copy_whole() {
    // Both see the target missing. The one that creates it (exclusively) and locks it copies;
    // the other is refused and removes nothing: it once removed the file the first was
    // writing, by name, when it found it busy (the first then said the name was gone); or
    // both were refused, one having locked the other's new, still empty file to look at it.
    let dir = TempDir::new("cli-two-creators");
    let source = dir.file_with("source.img", &pattern(44, 4 * MIB));
    let target = dir.join("target.img");
    for round in 0..20 {
        let _ = fs::remove_file(&target);
        let start = || {
            Command::new(env!("CARGO_BIN_EXE_kcopyd"))
                .args(["copy", "-q", s(&source), s(&target)])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        };
        let (first, second) = (start(), start());
        let runs = [ran(first.wait_with_output().unwrap()), ran(second.wait_with_output().unwrap())];
        // One copies; the other is refused (exit 2, naming the target), or copies after it
        // when it finds the whole file already there and no longer locked.
        assert!(runs.iter().any(|r| r.code == 0), "round {round}: one copies: {runs:?}");
        for refused in runs.iter().filter(|r| r.code != 0) {
            assert_eq!(refused.code, 2, "round {round}: {runs:?}");
            assert!(refused.stderr.contains("TARGET"), "round {round}: {refused:?}");
        }
        assert_eq!(fs::read(&target).ok(), Some(pattern(44, 4 * MIB)), "round {round}: {runs:?}");
    }
}
