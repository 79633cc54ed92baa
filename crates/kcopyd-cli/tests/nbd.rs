//! The `kcopyd` command with NBD URIs as source and targets, against qemu-nbd and nbdkit
//! started here: copy, verify and zero, a read-only export refused as a target, TLS refused.
//! A missing server prints `SKIPPED:`.

use std::fs;
use std::process::Command;

use kcopyd_tests::fixtures::{TempDir, pattern};
use kcopyd_tests::nbd_servers::{ExternalNbdServer, Listen};

/// Exit code, stdout and stderr of one run.
fn kcopyd(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_kcopyd")).args(args).output().expect("the kcopyd binary runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn copy_verify_and_zero_through_nbd_uris() {
    let test = "copy_verify_and_zero_through_nbd_uris";
    let dir = TempDir::new(test);
    let data = pattern(21, 4 << 20);
    let source = dir.file_with("source.img", &data);
    let qemu_file = dir.zero_file("qemu.img", data.len() as u64);
    let Some(qemu) = ExternalNbdServer::qemu_nbd(test, &qemu_file, Listen::Unix, &["-x", "backup"]) else { return };
    let size = data.len().to_string();
    let Some(kit) = ExternalNbdServer::nbdkit(test, Listen::Tcp, &["memory", &size]) else { return };
    let (qemu_uri, kit_uri) = (qemu.uri("backup"), kit.uri(""));
    let source = source.to_str().unwrap();

    let (code, _, stderr) = kcopyd(&["copy", source, &qemu_uri, &kit_uri]);
    assert_eq!(code, 0, "{stderr}");
    assert!(fs::read(&qemu_file).unwrap() == data, "qemu-nbd's export holds the source");
    let (code, _, stderr) = kcopyd(&["verify", source, &qemu_uri, &kit_uri]);
    assert_eq!(code, 0, "the nbdkit export holds the source too: {stderr}");

    // NBD → file, from an offset: 1 MiB from 2 MiB of the nbdkit export.
    let back = dir.join("back.img");
    let back = back.to_str().unwrap();
    let (code, _, stderr) = kcopyd(&["copy", &format!("{kit_uri}@2M"), back, "--length", "1M"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(fs::read(back).unwrap() == data[2 << 20..3 << 20]);

    let (code, _, stderr) = kcopyd(&["zero", &qemu_uri]);
    assert_eq!(code, 0, "{stderr}");
    assert!(fs::read(&qemu_file).unwrap().iter().all(|&b| b == 0), "zero through NBD_CMD_WRITE_ZEROES");
    let (code, _, _) = kcopyd(&["verify", source, &qemu_uri]);
    assert_eq!(code, 1, "verify finds the zeroed export different");
}

#[test]
fn read_only_exports_and_tls_are_refused_before_any_io() {
    let test = "read_only_exports_and_tls_are_refused_before_any_io";
    let dir = TempDir::new(test);
    let data = pattern(22, 1 << 20);
    let source = dir.file_with("source.img", &data);
    let target_file = dir.file_with("target.img", &pattern(23, 1 << 20));
    let Some(server) = ExternalNbdServer::qemu_nbd(test, &target_file, Listen::Unix, &["-r"]) else { return };
    let size = data.len().to_string();
    let Some(writable) = ExternalNbdServer::nbdkit(test, Listen::Unix, &["memory", &size]) else { return };
    let (code, stdout, stderr) = kcopyd(&["copy", source.to_str().unwrap(), &writable.uri(""), &server.uri("")]);
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert!(stderr.contains("TARGET") && stderr.contains("read-only"), "{stderr}");
    assert!(fs::read(&target_file).unwrap() == pattern(23, 1 << 20), "the read-only export is untouched");
    let (code, _, stderr) = kcopyd(&["copy", source.to_str().unwrap(), "nbds://localhost/disk"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("TLS"), "{stderr}");
}

/// `qemu-nbd` serving `file` on the unix socket `socket` (one URI for several servers in
/// turn), killed when dropped. `None` after printing `SKIPPED:` without qemu-nbd.
struct QemuOnSocket(std::process::Child);

impl QemuOnSocket {
    fn start(test: &str, file: &std::path::Path, socket: &std::path::Path) -> Option<QemuOnSocket> {
        if !kcopyd_tests::nbd_servers::installed("qemu-nbd") {
            kcopyd_tests::fixtures::skip(test, "qemu-nbd is not installed (Debian: apt-get install qemu-utils)");
            return None;
        }
        let _ = fs::remove_file(socket);
        let child = Command::new("qemu-nbd")
            .args(["-f", "raw", "-t", "-k", socket.to_str().unwrap(), file.to_str().unwrap()])
            .spawn()
            .unwrap();
        let started = std::time::Instant::now();
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            assert!(started.elapsed() < std::time::Duration::from_secs(10), "qemu-nbd listens");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Some(QemuOnSocket(child))
    }
}

impl Drop for QemuOnSocket {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_map_refuses_an_nbd_export_of_another_size_behind_the_same_uri() {
    let test = "a_map_refuses_an_nbd_export_of_another_size_behind_the_same_uri";
    let dir = TempDir::new(test);
    let source = dir.file_with("source.img", &pattern(24, 1 << 20));
    let socket = dir.join("nbd.sock");
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    let map = dir.join("copy.map");
    let map = map.to_str().unwrap();
    let copy = ["copy", source.to_str().unwrap(), &uri, "--map", map, "--length", "1M"];
    {
        let first = dir.zero_file("first.img", 2 << 20);
        let Some(_server) = QemuOnSocket::start(test, &first, &socket) else { return };
        let (code, _, stderr) = kcopyd(&copy);
        assert_eq!(code, 0, "{stderr}");
        let text = fs::read_to_string(map).unwrap();
        assert!(text.contains("id nbd size=2097152 flags="), "{text}");
    }
    let second = dir.zero_file("second.img", 3 << 20);
    let Some(_server) = QemuOnSocket::start(test, &second, &socket) else { return };
    let (code, _, stderr) = kcopyd(&copy);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("TARGET") && stderr.contains("not the device the map was written for"), "{stderr}");
    assert!(fs::read(&second).unwrap().iter().all(|&b| b == 0), "nothing written");
}

/// The nbdkit `sh` example of docs/NBD.md, run as written: the script, then the nbdkit
/// command, with `kcopyd` on the PATH, in a directory holding `disk.img`.
#[test]
fn the_nbdkit_sh_example_of_the_docs_works_as_written() {
    let test = "the_nbdkit_sh_example_of_the_docs_works_as_written";
    if Command::new("nbdkit").arg("--version").output().is_err() {
        kcopyd_tests::fixtures::skip(test, "nbdkit is not installed (Debian: apt-get install nbdkit)");
        return;
    }
    let docs = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/NBD.md")).unwrap();
    let start = docs.find("cat > bad-sectors.sh").expect("the example's script");
    let end = start + docs[start..].find("nbdkit -U - sh").expect("the example's nbdkit command");
    let end = end + docs[end..].find('\n').unwrap();
    let example = &docs[start..end];
    let dir = TempDir::new(test);
    let data = pattern(24, 1 << 20);
    fs::write(dir.join("disk.img"), &data).unwrap();
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_kcopyd")).parent().unwrap().to_str().unwrap().to_owned();
    let output = Command::new("sh")
        .args(["-c", example])
        .current_dir(dir.path())
        .env("PATH", format!("{bin}:{}", std::env::var("PATH").unwrap_or_default()))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("read errors at 100-108"), "{stdout}");
    let copy = fs::read(dir.join("copy.img")).unwrap();
    assert!(copy[..100 * 512] == data[..100 * 512] && copy[108 * 512..] == data[108 * 512..]);
}
