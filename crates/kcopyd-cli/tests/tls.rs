//! `kcopyd` with `nbds://` and `nbds+unix://` exports of `nbdkit --tls=require`, with
//! certificates made by certtool: a copy there and back, byte-exact; the `--tls-*` options;
//! the refusals a user meets (a plain URI to a TLS server, a wrong CA, `--tls-*` without a TLS
//! device) with exit 2 and nothing written; the warning of `--tls-verify-peer off`. A missing
//! nbdkit or certtool prints `SKIPPED:`.

use std::fs;
use std::path::Path;
use std::process::Command;

use kcopyd_tests::fixtures::{TempDir, pattern};
use kcopyd_tests::nbd_servers::{ExternalNbdServer, Listen};
use kcopyd_tests::tls_certs::{ServerCert, TestPki, Trust};

/// Exit code, stdout and stderr of one run.
fn kcopyd(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_kcopyd")).args(args).output().expect("the kcopyd binary runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn nbdkit_tls(test: &str, listen: Listen, server_dir: &Path, size: &str) -> Option<ExternalNbdServer> {
    let certificates = format!("--tls-certificates={}", server_dir.display());
    ExternalNbdServer::nbdkit(test, listen, &["--tls=require", &certificates, "memory", size])
}

#[test]
fn copies_through_nbds_there_and_back_are_byte_exact() {
    let test = "copies_through_nbds_there_and_back_are_byte_exact";
    let Some(pki) = TestPki::new(test) else { return };
    let server_dir = pki.server("server", ServerCert::default());
    let Some(tcp) = nbdkit_tls(test, Listen::Tcp, &server_dir, "4M") else { return };
    let Some(unix) = nbdkit_tls(test, Listen::Unix, &server_dir, "4M") else { return };
    let client_dir = pki.client("client", Trust::OurCa, false);
    let dir = TempDir::new(test);
    let data = pattern(31, 4 << 20);
    let source = dir.file_with("source.img", &data);
    let back = dir.join("back.img");
    // TCP with --tls-certificates; the unix socket with the URI's own parameter.
    let tcp_uri = tcp.uri("").replacen("nbd://", "nbds://", 1);
    let unix_uri = format!(
        "{}&tls-certificates={}",
        unix.uri("").replacen("nbd+unix://", "nbds+unix://", 1),
        client_dir.display()
    );
    let certificates = client_dir.to_str().unwrap();
    let (code, _, stderr) =
        kcopyd(&["copy", "--tls-certificates", certificates, source.to_str().unwrap(), &tcp_uri, &unix_uri]);
    assert_eq!(code, 0, "{stderr}");
    let (code, _, stderr) = kcopyd(&["verify", "--tls-certificates", certificates, &tcp_uri, &unix_uri]);
    assert_eq!(code, 0, "{stderr}");
    let (code, _, stderr) = kcopyd(&["copy", &unix_uri, back.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(fs::read(&back).unwrap() == data, "the data came back through TLS unchanged");
}

#[test]
fn refusals_exit_2_say_why_and_write_nothing() {
    let test = "refusals_exit_2_say_why_and_write_nothing";
    let Some(pki) = TestPki::new(test) else { return };
    let server_dir = pki.server("server", ServerCert::default());
    let Some(server) = nbdkit_tls(test, Listen::Tcp, &server_dir, "1M") else { return };
    let dir = TempDir::new(test);
    let source = dir.file_with("source.img", &pattern(32, 1 << 20));
    let source = source.to_str().unwrap();
    let plain = server.uri("");
    let tls = plain.replacen("nbd://", "nbds://", 1);

    let (code, _, stderr) = kcopyd(&["copy", source, &plain]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("the server requires TLS") && stderr.contains(&format!("use {tls}")), "{stderr}");

    let wrong_ca = pki.client("wrong-ca", Trust::OtherCa, false);
    let (code, _, stderr) = kcopyd(&["copy", "--tls-certificates", wrong_ca.to_str().unwrap(), source, &tls]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("not signed by a trusted CA"), "{stderr}");

    let right_ca = pki.client("right-ca", Trust::OurCa, false);
    let back = dir.join("back.img");
    let (code, _, stderr) =
        kcopyd(&["copy", "--tls-certificates", right_ca.to_str().unwrap(), &tls, back.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(fs::read(&back).unwrap().iter().all(|&byte| byte == 0), "no refused run wrote the export");

    // --tls-* options with only plain devices would suggest an encryption that never happens.
    let target = dir.zero_file("target.img", 1 << 20);
    let (code, _, stderr) = kcopyd(&["copy", "--tls-verify-peer", "off", source, target.to_str().unwrap()]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--tls-verify-peer") && stderr.contains("no nbds://"), "{stderr}");
}

#[test]
fn tls_verify_peer_off_works_and_warns() {
    let test = "tls_verify_peer_off_works_and_warns";
    let Some(pki) = TestPki::new(test) else { return };
    let server_dir = pki.server("server", ServerCert { by_other_ca: true, ..ServerCert::default() });
    let Some(server) = nbdkit_tls(test, Listen::Unix, &server_dir, "1M") else { return };
    let dir = TempDir::new(test);
    let data = pattern(33, 1 << 20);
    let source = dir.file_with("source.img", &data);
    let tls = server.uri("").replacen("nbd+unix://", "nbds+unix://", 1);
    let (code, _, stderr) = kcopyd(&["copy", "--tls-verify-peer", "off", source.to_str().unwrap(), &tls]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("warning") && stderr.contains("not verified"), "{stderr}");
    let (code, _, stderr) = kcopyd(&["verify", source.to_str().unwrap(), &format!("{tls}&tls-verify-peer=false")]);
    assert_eq!(code, 0, "{stderr}");
}

/// The command ends its TLS sessions before it exits (NBD_CMD_DISC, close_notify): nbdkit,
/// which logs a TLS connection cut without close_notify as an error, logs nothing.
#[test]
fn the_command_closes_its_tls_sessions_before_it_exits() {
    let test = "the_command_closes_its_tls_sessions_before_it_exits";
    let Some(pki) = TestPki::new(test) else { return };
    if !kcopyd_tests::nbd_servers::installed("nbdkit") {
        kcopyd_tests::fixtures::skip(test, "nbdkit is not installed (Debian: apt-get install nbdkit)");
        return;
    }
    let server_dir = pki.server("server", ServerCert::default());
    let client_dir = pki.client("client", Trust::OurCa, false);
    let dir = TempDir::new(test);
    let socket = dir.join("nbd.sock");
    let log = dir.join("nbdkit.log");
    let mut nbdkit = Command::new("nbdkit")
        .args(["-f", "--exit-with-parent", "--tls=require"])
        .arg(format!("--tls-certificates={}", server_dir.display()))
        .arg("-U")
        .arg(&socket)
        .args(["memory", "4M"])
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while !socket.exists() {
        assert!(started.elapsed() < std::time::Duration::from_secs(10), "nbdkit listens");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let source = dir.file_with("source.img", &pattern(34, 4 << 20));
    let uri = format!("nbds+unix:///?socket={}&tls-certificates={}", socket.display(), client_dir.display());
    let (code, _, stderr) = kcopyd(&["copy", source.to_str().unwrap(), &uri]);
    assert_eq!(code, 0, "{stderr}");
    // nbdkit logs a cut connection when it reads from it: give it a moment.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let _ = nbdkit.kill();
    let _ = nbdkit.wait();
    let logged = fs::read_to_string(&log).unwrap();
    assert!(!logged.contains("error"), "nbdkit saw the sessions end uncleanly:\n{logged}");
}
