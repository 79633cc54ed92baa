//! `kcopyd sim run` and `kcopyd sim sweep` end to end: the binary on a shipped scenario,
//! scaled down with `--set`.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

fn scenario(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../../scenarios/{name}.toml")).display().to_string()
}

/// Runs kcopyd; returns (exit code, stdout, stderr).
fn kcopyd(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_kcopyd")).args(args).output().expect("kcopyd runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

const SMALL_NVME: [&str; 4] = ["--set", "disks.primary.len_sectors=64M", "--set", "disks.mirror.len_sectors=64M"];

#[test]
fn run_prints_a_summary_json_and_a_picture() {
    let nvme = scenario("nvme-resync");
    let (code, out, err) = kcopyd(&[&["sim", "run", nvme.as_str()][..], &SMALL_NVME[..]].concat());
    assert_eq!(code, 0, "{err}");
    for needle in
        ["64 MiB in", "MB/s", "pages:", "I/O sizes", "512 KiB", "queue depth over time", "with the jobs: p50", "alone:"]
    {
        assert!(out.contains(needle), "summary has '{needle}':\n{out}");
    }

    let dir = std::env::temp_dir().join(format!("kcopyd-sim-run-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let svg = dir.join("run.svg");
    let svg_arg = svg.display().to_string();
    let (code, out, err) =
        kcopyd(&[&["sim", "run", nvme.as_str(), "--json", "--svg", svg_arg.as_str()][..], &SMALL_NVME[..]].concat());
    assert_eq!(code, 0, "{err}");
    let report: Value = serde_json::from_str(&out).expect("one JSON object");
    assert_eq!(report["job_bytes"], 64 << 20);
    assert!(report["copy_seconds"].as_f64().unwrap() > 0.0 && report["wall_seconds"].as_f64().is_some());
    assert!(report["foreground"]["alone"]["p99_ms"].as_f64().is_some());
    assert!(report["timeline"].as_array().unwrap().len() > 10);
    let picture = std::fs::read_to_string(&svg).expect("the SVG is written");
    assert!(
        picture.starts_with("<svg") && picture.contains("Engine throughput") && picture.contains("Foreground latency")
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn sweep_ranks_points_by_the_metric_and_draws_a_heat_map() {
    let study = scenario("subjob-study");
    let dir = std::env::temp_dir().join(format!("kcopyd-sim-sweep-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let svg = dir.join("sweep.svg");
    let svg_arg = svg.display().to_string();
    let args = [
        "sim",
        "sweep",
        study.as_str(),
        "--set",
        "jobs.0.count=4",
        "--vary",
        "client.subjob_size_bytes=64K,512K",
        "--vary",
        "client.subjobs_in_flight=1,8",
        "--json",
        "--svg",
        svg_arg.as_str(),
    ];
    let (code, out, err) = kcopyd(&args);
    assert_eq!(code, 0, "{err}");
    let result: Value = serde_json::from_str(&out).expect("one JSON object");
    assert_eq!(result["metric"], "throughput_mb_per_s");
    let points = result["points"].as_array().unwrap();
    assert_eq!(points.len(), 4);
    let metrics: Vec<f64> = points.iter().map(|p| p["metric"].as_f64().unwrap()).collect();
    assert!(metrics.windows(2).all(|w| w[0] >= w[1]), "best first: {metrics:?}");
    assert_eq!(points[0]["values"]["client.subjob_size_bytes"], "512K");
    assert_eq!(points[0]["values"]["client.subjobs_in_flight"], "8");
    let picture = std::fs::read_to_string(&svg).expect("the SVG is written");
    assert!(picture.contains("throughput_mb_per_s") && picture.contains("512K") && picture.contains("<rect"));

    // The table, sorted the other way for a lower-is-better metric.
    let (code, out, err) = kcopyd(&[
        "sim",
        "sweep",
        study.as_str(),
        "--set",
        "jobs.0.count=2",
        "--vary",
        "client.subjob_size_bytes=64K,512K",
        "--metric",
        "copy_seconds",
    ]);
    assert_eq!(code, 0, "{err}");
    let rows: Vec<&str> = out.lines().collect();
    assert!(rows[0].contains("copy_seconds (sorted)"), "{out}");
    assert!(rows[1].trim_start().starts_with("512K") && rows[2].trim_start().starts_with("64K"), "{out}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_scenarios_keys_and_metrics_are_usage_errors() {
    let study = scenario("subjob-study");
    let (code, _, err) = kcopyd(&["sim", "run", "/nonexistent/x.toml"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("/nonexistent/x.toml"), "{err}");
    let (code, _, err) = kcopyd(&["sim", "run", study.as_str(), "--set", "client.subjob_sise_bytes=64K"]);
    assert_eq!(code, 2);
    assert!(err.contains("subjob_sise_bytes"), "names the unknown key: {err}");
    let (code, _, err) = kcopyd(&["sim", "sweep", study.as_str(), "--vary", "client.subjob_size_bytes=64Q"]);
    assert_eq!(code, 2);
    assert!(err.contains("client.subjob_size_bytes") && err.contains("64Q"), "{err}");
    let (code, _, err) =
        kcopyd(&["sim", "sweep", study.as_str(), "--vary", "client.subjobs_in_flight=1", "--metric", "speed"]);
    assert_eq!(code, 2);
    assert!(err.contains("speed") && err.contains("throughput_mb_per_s"), "lists the metrics: {err}");
}

/// A running kcopyd: its pid, and its output once it ends (waited for by a thread).
struct Running {
    pid: String,
    done: std::sync::mpsc::Receiver<std::process::Output>,
}

/// Starts kcopyd with its output piped, and waits until it catches SIGINT.
fn start(args: &[&str]) -> Running {
    let child = Command::new(env!("CARGO_BIN_EXE_kcopyd"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kcopyd starts");
    let pid = child.id().to_string();
    let (send, done) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = send.send(child.wait_with_output().unwrap());
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let caught = status
            .lines()
            .find_map(|line| line.strip_prefix("SigCgt:"))
            .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
            .unwrap_or(0);
        if caught & 2 != 0 {
            return Running { pid, done };
        }
        assert!(Instant::now() < deadline, "the SIGINT handler never appeared");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sends SIGINT after `after`, then waits at most `limit` for the command to end: (exit
/// code, stdout, stderr).
fn interrupt(running: Running, after: Duration, limit: Duration) -> (i32, String, String) {
    std::thread::sleep(after);
    assert!(Command::new("kill").args(["-INT", &running.pid]).status().unwrap().success());
    let output = running.done.recv_timeout(limit).unwrap_or_else(|_| {
        let _ = Command::new("kill").args(["-KILL", &running.pid]).status();
        panic!("still running {limit:?} after SIGINT");
    });
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn run_ends_at_a_signal_and_leaves_no_picture() {
    let nvme = scenario("nvme-resync");
    let dir = std::env::temp_dir().join(format!("kcopyd-sim-run-signal-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let svg = dir.join("run.svg");
    let svg_arg = svg.display().to_string();
    // The whole scenario takes minutes in a debug build.
    let child = start(&["sim", "run", nvme.as_str(), "--svg", svg_arg.as_str()]);
    let (code, out, err) = interrupt(child, Duration::from_millis(500), Duration::from_secs(3));
    assert_eq!(code, 130, "{err}");
    assert!(out.is_empty() && err.contains("interrupted"), "{out}{err}");
    assert!(!svg.exists(), "no picture left behind");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn sweep_stops_between_points_at_a_signal_and_prints_the_points_done() {
    let nvme = scenario("nvme-resync");
    let args = [
        &[
            "sim",
            "sweep",
            nvme.as_str(),
            "--threads",
            "1",
            "--vary",
            "client.subjobs_in_flight=1,2,3,4,5,6,7,8,9,10,11,12",
        ][..],
        &SMALL_NVME[..],
    ]
    .concat();
    let child = start(&args);
    let (code, out, err) = interrupt(child, Duration::from_millis(1500), Duration::from_secs(60));
    assert_eq!(code, 130, "{err}");
    assert!(err.contains("points ran; their table follows"), "{err}");
    let rows: Vec<&str> = out.lines().collect();
    assert!(rows[0].contains("(sorted)"), "{out}");
    assert!(rows.len() >= 2 && rows.len() < 13, "the points done, not all 12: {out}");
}

#[test]
fn a_closed_stdout_ends_run_quietly_with_141() {
    let nvme = scenario("nvme-resync");
    // A pipe whose reader, `true`, is gone before kcopyd writes.
    let mut reader = Command::new("true").stdin(std::process::Stdio::piped()).spawn().unwrap();
    let writer = reader.stdin.take().unwrap();
    reader.wait().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_kcopyd"))
        .args([&["sim", "run", nvme.as_str()][..], &SMALL_NVME[..]].concat())
        .stdout(writer)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(141), "{output:?}");
    assert!(output.stderr.is_empty(), "quietly: {output:?}");
}

#[test]
fn a_picture_or_model_is_not_written_into_a_proc_file() {
    // Writing a /proc/sys file sets something in the kernel: refused before the run.
    let sysctl = "/proc/sys/vm/swappiness";
    let before = std::fs::read(sysctl).unwrap();
    let nvme = scenario("nvme-resync");
    let (code, out, err) = kcopyd(&[&["sim", "run", nvme.as_str(), "--svg", sysctl][..], &SMALL_NVME[..]].concat());
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains(&format!("--svg '{sysctl}'")) && err.contains("proc filesystem"), "{err}");
    let (code, out, err) = kcopyd(&["sim", "calibrate", "sim:size=64M", "--out", sysctl]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains(&format!("--out '{sysctl}'")) && err.contains("proc filesystem"), "{err}");
    assert_eq!(std::fs::read(sysctl).unwrap(), before);
}
