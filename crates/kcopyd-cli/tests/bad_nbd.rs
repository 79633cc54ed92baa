//! The `kcopyd` command against a misbehaving NBD server (`kcopyd_tests::bad_nbd`): for every
//! misbehaviour, `kcopyd copy` from it into the middle of a file, bounded in time, then:
//!
//! ```text
//!  no panic · finished before CASE_TIMEOUT (else killed, and the case fails) · the exit code
//!  its Expect documents · the bytes around the range untouched · every sector of the range
//!  either holds what the server really holds, or is reported failed / not copied
//! ```
//!
//! and `verify` and `zero` for the cases that need them. Cases run a few at a time. Then
//! signals aimed at a request the server holds (a stalled partial last block, a slow final
//! flush, a slow read of `copy --verify`'s comparison): the command ends as docs/CLI.md says.

use std::collections::BTreeSet;
use std::fs;
use std::io::Read;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use kcopyd_tests::bad_nbd::{BadServer, Expect, Misbehaviour};
use kcopyd_tests::fixtures::{TempDir, pattern};

/// Bytes the server holds.
const DATA_BYTES: usize = 64 << 10;
/// Bytes of the target file before and after the range, which must not change.
const GUARD_BYTES: usize = 4096;
/// The byte the target file is filled with before the copy.
const GUARD_FILL: u8 = 0x5a;
/// How long one run of the command may take before it is killed and the case fails: the
/// timeouts given to the command are 2 s.
const CASE_TIMEOUT: Duration = Duration::from_secs(30);
/// Cases run at a time.
const CASES_IN_PARALLEL: usize = 6;

/// How one run ended.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `kcopyd ARGS`, killing it after [`CASE_TIMEOUT`].
fn kcopyd_bounded(args: &[&str]) -> Result<Run, String> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kcopyd"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawning kcopyd: {e}"))?;
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let out = thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let err = thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if started.elapsed() > CASE_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("hung: killed after {CASE_TIMEOUT:?} ({args:?})"));
        }
        thread::sleep(Duration::from_millis(20));
    };
    let (stdout, stderr) = (out.join().unwrap_or_default(), err.join().unwrap_or_default());
    if stderr.contains("panicked") {
        return Err(format!("panicked: {stderr}"));
    }
    Ok(Run { code: status.code().unwrap_or(-1), stdout, stderr })
}

fn expected_code(expect: Expect) -> i32 {
    match expect {
        Expect::Copied => 0,
        Expect::Failed => 1,
        Expect::Refused => 2,
    }
}

/// Target sectors the report calls failed or not copied (source sectors mapped to the target).
fn reported_sectors(report: &serde_json::Value, target_start_sector: u64) -> BTreeSet<u64> {
    let mut sectors = BTreeSet::new();
    let mut add = |pairs: &serde_json::Value, shift: u64| {
        for pair in pairs.as_array().into_iter().flatten() {
            let (start, end) = (pair[0].as_u64().unwrap_or(0), pair[1].as_u64().unwrap_or(0));
            sectors.extend(start + shift..end + shift);
        }
    };
    add(&report["source"]["read_failed_sectors"], target_start_sector);
    add(&report["targets"][0]["not_copied_sectors"], 0);
    add(&report["targets"][0]["write_failed_sectors"], 0);
    sectors
}

/// One misbehaviour, end to end. `Err` says what went wrong.
fn copy_case(misbehaviour: Misbehaviour) -> Result<(), String> {
    if misbehaviour.is_write() {
        return write_case(misbehaviour);
    }
    copy_from(misbehaviour)?;
    verify_case(misbehaviour)
}

/// `verify` of the export against a copy of what it holds: identical only if the server
/// behaved (or its oddity is legal, or only its block status lies), else the documented
/// failure.
fn verify_case(misbehaviour: Misbehaviour) -> Result<(), String> {
    let dir = TempDir::new(&format!("bad-nbd-verify-{misbehaviour:?}"));
    let data = pattern(0x7e71 + misbehaviour as u64, DATA_BYTES);
    let server = BadServer::start("verify", misbehaviour, data.clone());
    let range = (misbehaviour.size_bytes(DATA_BYTES as u64) as usize).min(DATA_BYTES);
    let copy = dir.file_with("copy.img", &data[..range]);
    let uri = server.uri();
    let args = ["verify", "--connect-timeout", "2s", "--io-timeout", "2s", &uri, copy.to_str().unwrap()];
    let run = kcopyd_bounded(&args)?;
    // Verify reads every byte and asks nothing about allocation: block status lies do not
    // reach it, and the data it reads is right.
    let expected = if misbehaviour.is_block_status() { 0 } else { expected_code(misbehaviour.expect()) };
    if run.code != expected {
        return Err(format!("verify: exit {} (expected {expected}): {}{}", run.code, run.stderr, run.stdout));
    }
    Ok(())
}

/// A copy from a file into the export at 8 KiB, the export misbehaving on writes: what the
/// server holds is the file's data or reported, and nothing outside the range changed.
fn write_case(misbehaviour: Misbehaviour) -> Result<(), String> {
    let dir = TempDir::new(&format!("bad-nbd-write-{misbehaviour:?}"));
    let before = vec![GUARD_FILL; DATA_BYTES];
    let server = BadServer::start("write", misbehaviour, before.clone());
    let (offset, range) = (8192, DATA_BYTES / 2);
    let data = pattern(0x3417 + misbehaviour as u64, range);
    let source = dir.file_with("source.img", &data);
    let target = format!("{}@{offset}", server.uri());
    let args = ["copy", "--json", "--io-timeout", "2s", source.to_str().unwrap(), &target];
    let run = kcopyd_bounded(&args)?;
    let expected = expected_code(misbehaviour.expect());
    if run.code != expected {
        return Err(format!("exit {} (expected {expected}): {}{}", run.code, run.stderr, run.stdout));
    }
    let after = server.data();
    if after[..offset] != before[..offset] || after[offset + range..] != before[offset + range..] {
        return Err("bytes outside the range changed".into());
    }
    let report: serde_json::Value =
        serde_json::from_str(&run.stdout).map_err(|e| format!("no JSON report ({e}): {}", run.stdout))?;
    let failed = reported_sectors(&report, (offset / 512) as u64);
    if failed.is_empty() {
        return Err(format!("nothing reported: {}", run.stdout));
    }
    for (index, (got, want)) in after[offset..offset + range].chunks(512).zip(data.chunks(512)).enumerate() {
        let sector = (offset / 512 + index) as u64;
        if got != want && !failed.contains(&sector) {
            return Err(format!("sector {sector} is neither the source's data nor reported: {}", run.stdout));
        }
    }
    Ok(())
}

/// A copy from the export into the middle of a file.
fn copy_from(misbehaviour: Misbehaviour) -> Result<(), String> {
    let dir = TempDir::new(&format!("bad-nbd-cli-{misbehaviour:?}"));
    let data = pattern(0xbad0 + misbehaviour as u64, DATA_BYTES);
    let server = BadServer::start("cli", misbehaviour, data.clone());
    let range = (misbehaviour.size_bytes(DATA_BYTES as u64) as usize).min(DATA_BYTES);
    let before = vec![GUARD_FILL; GUARD_BYTES + range + GUARD_BYTES];
    let target = dir.file_with("target.img", &before);
    let target_arg = format!("{}@{GUARD_BYTES}", target.display());
    let uri = server.uri();
    let args = ["copy", "--json", "--connect-timeout", "2s", "--io-timeout", "2s", &uri, &target_arg];
    let run = kcopyd_bounded(&args)?;
    let expected = expected_code(misbehaviour.expect());
    if run.code != expected {
        return Err(format!("exit {} (expected {expected}): {}{}", run.code, run.stderr, run.stdout));
    }
    let after = fs::read(&target).map_err(|e| e.to_string())?;
    if after.len() != before.len() {
        return Err(format!("the target's length changed: {} -> {}", before.len(), after.len()));
    }
    if after[..GUARD_BYTES] != before[..GUARD_BYTES] || after[GUARD_BYTES + range..] != before[GUARD_BYTES + range..] {
        return Err("bytes outside the range changed".into());
    }
    let written = &after[GUARD_BYTES..GUARD_BYTES + range];
    let truth = &server.data()[..range];
    match misbehaviour.expect() {
        Expect::Refused if written != &before[GUARD_BYTES..GUARD_BYTES + range] => {
            Err("refused, yet the range was written".into())
        }
        Expect::Copied if written != truth => Err("exit 0, but the target does not hold the export".into()),
        Expect::Failed => {
            let report: serde_json::Value =
                serde_json::from_str(&run.stdout).map_err(|e| format!("no JSON report ({e}): {}", run.stdout))?;
            let failed = reported_sectors(&report, (GUARD_BYTES / 512) as u64);
            for (index, (got, want)) in written.chunks(512).zip(truth.chunks(512)).enumerate() {
                let sector = (GUARD_BYTES / 512 + index) as u64;
                if got != want && !failed.contains(&sector) {
                    return Err(format!("sector {sector} is neither the server's data nor reported: {}", run.stdout));
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

#[test]
fn every_misbehaviour_is_copied_exactly_or_reported() {
    let failures: Vec<String> = Misbehaviour::ALL
        .chunks(CASES_IN_PARALLEL)
        .flat_map(|cases| {
            thread::scope(|scope| {
                let runs: Vec<_> = cases.iter().map(|&m| (m, scope.spawn(move || copy_case(m)))).collect();
                runs.into_iter()
                    .filter_map(|(m, run)| match run.join() {
                        Ok(Ok(())) => None,
                        Ok(Err(problem)) => Some(format!("{m:?} ({}): {problem}", m.describe())),
                        Err(_) => Some(format!("{m:?}: the test's thread panicked")),
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        Misbehaviour::ALL.len(),
        failures.join("\n")
    );
}

#[test]
fn there_are_at_least_forty_named_misbehaviours() {
    assert!(Misbehaviour::ALL.len() >= 40, "{}", Misbehaviour::ALL.len());
    for m in Misbehaviour::ALL {
        assert!(!m.describe().is_empty(), "{m:?} has a doc line");
    }
}

#[test]
fn an_export_of_1000_bytes_is_copied_verified_and_zeroed_to_its_last_byte() {
    let dir = TempDir::new("bad-nbd-odd-size");
    let data = pattern(0x0dd, DATA_BYTES);
    let server = BadServer::start("odd", Misbehaviour::OddSizeMinOne, data.clone());
    let uri = server.uri();
    let copy = dir.join("copy.img");
    let copy_arg = copy.to_str().unwrap();
    let run = kcopyd_bounded(&["copy", "--json", &uri, copy_arg]).unwrap();
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(fs::read(&copy).unwrap(), data[..1000], "every byte, none more");
    let report: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!((report["bytes_total"].as_u64(), report["bytes_copied"].as_u64()), (Some(1000), Some(1000)));

    let run = kcopyd_bounded(&["verify", &uri, copy_arg]).unwrap();
    assert_eq!(run.code, 0, "{}", run.stderr);
    let mut changed = data[..1000].to_vec();
    changed[999] ^= 1;
    fs::write(&copy, &changed).unwrap();
    let run = kcopyd_bounded(&["verify", &uri, copy_arg]).unwrap();
    assert_eq!(run.code, 1, "the last byte differs: {}{}", run.stdout, run.stderr);

    // The other way: into the export, then zero it, to its last byte.
    let run = kcopyd_bounded(&["copy", copy_arg, &uri]).unwrap();
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(server.data()[..1000], changed[..], "the export holds the file");
    let run = kcopyd_bounded(&["zero", &uri]).unwrap();
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(server.data()[..1000].iter().all(|&b| b == 0), "zeroed to byte 999");
    assert_eq!(server.data()[1000..], data[1000..], "nothing past the export's size");
}

#[test]
fn an_export_whose_minimum_block_hides_its_tail_is_refused_not_cut() {
    let dir = TempDir::new("bad-nbd-odd-512");
    let server = BadServer::start("odd512", Misbehaviour::OddSizeMin512, pattern(0x512, DATA_BYTES));
    let copy = dir.join("copy.img");
    let run = kcopyd_bounded(&["copy", &server.uri(), copy.to_str().unwrap()]).unwrap();
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr.contains("minimum block size is 512 bytes") && run.stderr.contains("--length 512"),
        "{}",
        run.stderr
    );
    assert!(!copy.exists(), "nothing created");
    let run = kcopyd_bounded(&["copy", "--length", "512", &server.uri(), copy.to_str().unwrap()]).unwrap();
    assert_eq!(run.code, 0, "the whole blocks, when asked: {}", run.stderr);
}

#[test]
fn a_signal_while_connecting_ends_the_command_at_once() {
    let dir = TempDir::new("bad-nbd-connect-signal");
    let source = dir.file_with("source.img", &pattern(0x5167, 4096));
    let server = BadServer::start("signal", Misbehaviour::StallInHandshake, Vec::new());
    for (signal, code) in [("-INT", 130), ("-TERM", 143)] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kcopyd"))
            .args(["copy", source.to_str().unwrap(), &server.uri()])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        kcopyd_tests::fixtures::wait_for_signal_handlers(child.id());
        // Well inside the handshake, which by default may take 30 s.
        thread::sleep(Duration::from_millis(300));
        let killed = Command::new("kill").args([signal, &child.id().to_string()]).status().unwrap();
        assert!(killed.success());
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if started.elapsed() > Duration::from_secs(5) {
                let _ = child.kill();
                panic!("{signal:?} did not end the connect within 5 s");
            }
            thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(status.code(), Some(code), "{signal:?}");
    }
}

#[test]
fn the_connect_timeout_bounds_a_silent_server() {
    let dir = TempDir::new("bad-nbd-connect-timeout");
    let source = dir.file_with("source.img", &pattern(0x7173, 4096));
    let server = BadServer::start("timeout", Misbehaviour::StallInHandshake, Vec::new());
    let started = Instant::now();
    let run = kcopyd_bounded(&["copy", "--connect-timeout", "300ms", source.to_str().unwrap(), &server.uri()]).unwrap();
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains("within 300 ms (--connect-timeout)"), "{}", run.stderr);
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    let run = kcopyd_bounded(&["copy", "--connect-timeout", "0s", source.to_str().unwrap(), &server.uri()]).unwrap();
    assert_eq!(run.code, 2, "{}", run.stderr);
}

/// Waits until `server` holds a request (a stall, a slow flush).
fn wait_until_held(server: &BadServer) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.held() == 0 {
        assert!(Instant::now() < deadline, "the server never held a request");
        thread::sleep(Duration::from_millis(5));
    }
}

/// Runs `kcopyd ARGS`, sends `signal` once `server` holds a request, and returns the exit code
/// and standard output, failing if the command is still running `limit` after the signal.
fn signal_while_held(args: &[&str], server: &BadServer, signal: &str, limit: Duration) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kcopyd"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    kcopyd_tests::fixtures::wait_for_signal_handlers(child.id());
    wait_until_held(server);
    let killed = Command::new("kill").args([signal, &child.id().to_string()]).status().unwrap();
    assert!(killed.success());
    let mut stdout = child.stdout.take().expect("piped");
    let out = thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{signal} did not end {args:?} within {limit:?}");
        }
        thread::sleep(Duration::from_millis(10));
    };
    (status.code(), out.join().unwrap_or_default())
}

#[test]
fn a_signal_while_the_partial_last_block_waits_ends_the_command_with_the_tail_not_copied() {
    let dir = TempDir::new("bad-nbd-tail-signal");
    let data = pattern(0x7a11, DATA_BYTES);
    // From the export (its tail read stalls), then into it (its tail write stalls).
    let server = BadServer::start("tail-read", Misbehaviour::OddSizeStallTail, data.clone());
    let copy = dir.join("copy.img");
    let (uri, copy_arg) = (server.uri(), copy.to_str().unwrap().to_owned());
    let (code, stdout) =
        signal_while_held(&["copy", "--json", &uri, &copy_arg], &server, "-INT", Duration::from_secs(5));
    assert_eq!(code, Some(130), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("a report");
    assert_eq!(report["status"], "cancelled", "{stdout}");
    assert_eq!(report["targets"][0]["not_copied_sectors"], serde_json::json!([[1, 2]]), "{stdout}");
    assert_eq!(report["bytes_not_copied"], 488, "{stdout}");
    assert_eq!(fs::read(&copy).unwrap()[..512], data[..512], "the whole block was copied");

    let server = BadServer::start("tail-write", Misbehaviour::OddSizeStallTail, vec![0; DATA_BYTES]);
    let source = dir.file_with("source.img", &data[..1000]);
    let (uri, source_arg) = (server.uri(), source.to_str().unwrap().to_owned());
    let (code, stdout) =
        signal_while_held(&["copy", "--json", &source_arg, &uri], &server, "-TERM", Duration::from_secs(5));
    assert_eq!(code, Some(143), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("a report");
    assert_eq!(report["status"], "cancelled", "{stdout}");
    assert_eq!(report["targets"][0]["not_copied_sectors"], serde_json::json!([[1, 2]]), "{stdout}");
    assert_eq!(server.data()[..512], data[..512], "the whole block was copied");

    let server = BadServer::start("tail-zero", Misbehaviour::OddSizeStallTail, data.clone());
    let uri = server.uri();
    let (code, stdout) = signal_while_held(&["zero", "--json", &uri], &server, "-INT", Duration::from_secs(5));
    assert_eq!(code, Some(130), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("a report");
    assert_eq!((report["status"].as_str(), report["bytes_not_copied"].as_u64()), (Some("cancelled"), Some(488)));
    assert!(server.data()[..512].iter().all(|&b| b == 0), "the whole block was zeroed");
}

#[test]
fn a_signal_while_verify_waits_for_the_partial_last_block_ends_it_incomplete() {
    let dir = TempDir::new("bad-nbd-tail-verify-signal");
    let data = pattern(0x7a12, DATA_BYTES);
    let server = BadServer::start("tail-verify", Misbehaviour::OddSizeStallTail, data.clone());
    let copy = dir.file_with("copy.img", &data[..1000]);
    let (uri, copy_arg) = (server.uri(), copy.to_str().unwrap().to_owned());
    let (code, stdout) =
        signal_while_held(&["verify", "--json", &uri, &copy_arg], &server, "-INT", Duration::from_secs(5));
    assert_eq!(code, Some(130), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("a report");
    assert_eq!(report["status"], "cancelled", "{stdout}");
    assert_eq!(report["targets"][0]["status"], "incomplete", "{stdout}");
    assert_eq!(report["bytes"], 512, "the tail was not compared: {stdout}");
}

#[test]
fn a_signal_during_the_final_flush_lets_it_finish_then_ends_cancelled() {
    let dir = TempDir::new("bad-nbd-flush-signal");
    let data = pattern(0xf1a5, 4096);
    let server = BadServer::start("flush", Misbehaviour::SlowFlush, vec![0; DATA_BYTES]);
    let source = dir.file_with("source.img", &data);
    let (uri, source_arg) = (server.uri(), source.to_str().unwrap().to_owned());
    let (code, stdout) = signal_while_held(
        &["copy", "--json", "--length", "4096", &source_arg, &uri],
        &server,
        "-INT",
        Duration::from_secs(5),
    );
    assert_eq!(code, Some(130), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("a report");
    assert_eq!(report["status"], "cancelled", "{stdout}");
    assert_eq!(report["bytes_copied"], 4096, "the job had finished: {stdout}");
    assert_eq!(report["targets"][0]["flush_error"], serde_json::Value::Null, "the flush finished: {stdout}");
    assert_eq!(server.data()[..4096], data[..], "the data reached the export");
}

#[test]
fn a_signal_during_copy_verify_comparison_says_no_differences_were_found_so_far() {
    // The copy writes the export (reads are not slow there); the comparison then reads it back,
    // one 4 KiB chunk at a time, each answered after 300 ms: the signal comes while the first
    // is held, and the comparison stops after it.
    let dir = TempDir::new("bad-nbd-copy-verify-signal");
    let data = pattern(0x5e1f, 64 << 10);
    let server = BadServer::start("copy-verify", Misbehaviour::SlowReads, vec![0; DATA_BYTES]);
    let source = dir.file_with("source.img", &data);
    let (uri, source_arg) = (server.uri(), source.to_str().unwrap().to_owned());
    let args = ["copy", "--verify", "--subjob-size", "4K", "--subjobs-in-flight", "1", &source_arg, &uri];
    let (code, stdout) = signal_while_held(&args, &server, "-INT", Duration::from_secs(5));
    assert_eq!(code, Some(130), "{stdout}");
    assert!(stdout.starts_with("cancelled: copied 64 KiB of 64 KiB"), "the copy was whole: {stdout}");
    assert!(stdout.contains(": stopped before the end, no differences found so far"), "{stdout}");
    assert!(!stdout.contains("identical") && !stdout.contains("differences found\n"), "{stdout}");
    assert_eq!(server.data()[..64 << 10], data[..], "the copy was whole");
}
