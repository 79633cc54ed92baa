//! The `kcopyd` command with NBD URIs as source and targets, against qemu-nbd and nbdkit
//! started here: copy, verify and zero, a read-only export refused as a target, unreadable
//! TLS certificates refused (TLS itself: `tls.rs`).
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
fn read_only_exports_and_unreadable_tls_certificates_are_refused_before_any_io() {
    let test = "read_only_exports_and_unreadable_tls_certificates_are_refused_before_any_io";
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
    let tls = format!(
        "nbds+unix:///?socket={}&tls-certificates={}",
        dir.join("none.sock").display(),
        dir.join("none").display()
    );
    let (code, _, stderr) = kcopyd(&["copy", source.to_str().unwrap(), &tls]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("TLS: cannot read") && stderr.contains("ca-cert.pem"), "{stderr}");
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

/// `kcopyd sim validate-link` over nbdkit's rate and delay filters, on a tiny export: one row
/// with a finite prediction, measurement and error, and the target holds the source. Timing
/// is not asserted here (bench/netmodel.py measures it); skipped with a printed reason
/// without nbdkit or its filters.
#[test]
fn validate_link_over_nbdkit_filters_reports_a_row_and_copies_the_data() {
    let test = "validate_link_over_nbdkit_filters_reports_a_row_and_copies_the_data";
    let size = (4 << 20).to_string();
    let probe = ["--filter=rate", "--filter=delay", "memory", "1M", "--dump-plugin"];
    if !kcopyd_tests::nbd_servers::installed("nbdkit")
        || !Command::new("nbdkit").args(probe).output().is_ok_and(|o| o.status.success())
    {
        kcopyd_tests::fixtures::skip(test, "nbdkit with its rate and delay filters is not installed");
        return;
    }
    let Some(source) = ExternalNbdServer::nbdkit(test, Listen::Unix, &["pattern", &size]) else { return };
    // 10 MB/s (rate= counts bits), a bucket of 10 ms, 1 ms per write.
    let filtered = ["--filter=rate", "--filter=delay", "memory", &size, "rate=80000000", "burstiness=0.01"];
    let Some(target) = ExternalNbdServer::nbdkit(test, Listen::Unix, &[&filtered[..], &["delay-write=1ms"]].concat())
    else {
        return;
    };
    let (source_uri, target_uri) = (source.uri(""), target.uri(""));
    let link = ["--link-rtt", "1ms", "--link-bandwidth", "10000000", "--link-burst", "100000"];
    let run = [&["sim", "validate-link", &source_uri, &target_uri][..], &link, &["--configs", "256Kx2x1"]].concat();
    let (code, stdout, stderr) = kcopyd(&[&run[..], &["--runs", "1", "--json"]].concat());
    assert_eq!(code, 0, "{stderr}");
    let result: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON object");
    assert_eq!(result["remote"], "target");
    assert_eq!(result["link"]["bandwidth_bytes_per_s"], 10_000_000);
    let rows = result["configs"].as_array().expect("rows");
    assert_eq!(rows.len(), 1, "{stdout}");
    let number = |key: &str| rows[0][key].as_f64().unwrap_or(f64::NAN);
    for key in ["predicted_seconds", "measured_median_seconds"] {
        assert!(number(key).is_finite() && number(key) > 0.0, "{key}: {stdout}");
    }
    assert!(number("error_percent").is_finite(), "{stdout}");
    assert_eq!(result["max_abs_error_percent"].as_f64(), Some(number("error_percent").abs()));
    let (code, _, stderr) = kcopyd(&["verify", &source_uri, &target_uri]);
    assert_eq!(code, 0, "the target export holds the source's pattern: {stderr}");
    // The table for people names the link and the row.
    let (code, stdout, stderr) = kcopyd(&[&run[..], &["--runs", "1"]].concat());
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("round trip 1000 µs, 10.0 MB/s") && stdout.contains("largest error"), "{stdout}");
}

/// A sparse source of 8 MiB: data at 0..1M and 5M..6M (with a 64 KiB zero block at 5M+64K),
/// holes elsewhere; and how many bytes of it are data (what a sparse target keeps allocated).
fn sparse_source(dir: &TempDir) -> (std::path::PathBuf, Vec<u8>, u64) {
    let mut data = vec![0u8; 8 << 20];
    data[..1 << 20].copy_from_slice(&pattern(31, 1 << 20));
    data[5 << 20..6 << 20].copy_from_slice(&pattern(32, 1 << 20));
    data[(5 << 20) + (64 << 10)..(5 << 20) + (128 << 10)].fill(0);
    let path = dir.join("sparse.img");
    let file = fs::File::create(&path).unwrap();
    file.set_len(data.len() as u64).unwrap();
    use std::os::unix::fs::FileExt;
    file.write_all_at(&data[..1 << 20], 0).unwrap();
    file.write_all_at(&data[5 << 20..6 << 20], 5 << 20).unwrap();
    (path, data, (2 << 20) - (64 << 10))
}

/// Bytes of storage `path` holds (its allocated blocks).
fn allocated_bytes(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).unwrap().blocks() * 512
}

/// A sparse copy onto NBD exports leaves holes as it does on files, whichever way the server
/// releases storage: qemu-nbd (`--discard=unmap`) and nbdkit's file plugin through
/// NBD_CMD_WRITE_ZEROES without NBD_CMD_FLAG_NO_HOLE, nbdkit without write-zeroes
/// (`--filter=nozero`) through NBD_CMD_TRIM checked by block status. Each target held other
/// bytes before: every byte ends up the source's.
#[test]
fn a_sparse_copy_onto_nbd_exports_leaves_holes() {
    let test = "a_sparse_copy_onto_nbd_exports_leaves_holes";
    let dir = TempDir::new(test);
    let (source, data, data_bytes) = sparse_source(&dir);
    let old = pattern(33, data.len());
    let files = [dir.file_with("qemu.img", &old), dir.file_with("kit.img", &old), dir.file_with("trim.img", &old)];
    let unmap = ["--discard=unmap"];
    let Some(qemu) = ExternalNbdServer::qemu_nbd(test, &files[0], Listen::Unix, &unmap) else { return };
    let kit_file = format!("file={}", files[1].display());
    let Some(kit) = ExternalNbdServer::nbdkit(test, Listen::Tcp, &["file", &kit_file]) else { return };
    let trim_file = format!("file={}", files[2].display());
    let Some(trim) = ExternalNbdServer::nbdkit(test, Listen::Unix, &["--filter=nozero", "file", &trim_file]) else {
        return;
    };
    let (code, _, stderr) = kcopyd(&["copy", source.to_str().unwrap(), &qemu.uri(""), &kit.uri(""), &trim.uri("")]);
    assert_eq!(code, 0, "{stderr}");
    for file in &files {
        assert!(fs::read(file).unwrap() == data, "{} holds the source", file.display());
        let allocated = allocated_bytes(file);
        assert!(
            allocated <= data_bytes,
            "{}: {allocated} bytes allocated, the source has {data_bytes}",
            file.display()
        );
    }
}

/// The same onto a qcow2 image behind qemu-nbd: its clusters are released (`qemu-img map`
/// shows data only where the source has it) and the image reads as the source.
#[test]
fn a_sparse_copy_onto_a_qcow2_export_releases_its_clusters() {
    let test = "a_sparse_copy_onto_a_qcow2_export_releases_its_clusters";
    let dir = TempDir::new(test);
    let (source, data, data_bytes) = sparse_source(&dir);
    let image = dir.join("target.qcow2");
    let image_text = image.to_str().unwrap();
    if let Err(error) = kcopyd_tests::fixtures::run("qemu-img", &["create", "-q", "-f", "qcow2", image_text, "8M"]) {
        kcopyd_tests::fixtures::skip(test, format!("qemu-img create: {error}"));
        return;
    }
    let options = ["-f", "qcow2", "--discard=unmap"];
    let Some(qemu) = ExternalNbdServer::qemu_nbd(test, &image, Listen::Unix, &options) else { return };
    let old = dir.file_with("old.img", &pattern(34, data.len()));
    let (code, _, stderr) = kcopyd(&["copy", "--no-sparse", old.to_str().unwrap(), &qemu.uri("")]);
    assert_eq!(code, 0, "{stderr}");
    let (code, _, stderr) = kcopyd(&["copy", source.to_str().unwrap(), &qemu.uri("")]);
    assert_eq!(code, 0, "{stderr}");
    drop(qemu);
    let map = kcopyd_tests::fixtures::run("qemu-img", &["map", "--output=json", "-f", "qcow2", image_text]).unwrap();
    let data_in_map: u64 = map
        .lines()
        .filter(|line| line.contains("\"data\": true"))
        .map(|line| {
            let length = line.split("\"length\": ").nth(1).unwrap();
            length[..length.find(|c: char| !c.is_ascii_digit()).unwrap()].parse::<u64>().unwrap()
        })
        .sum();
    assert_eq!(data_in_map, data_bytes, "data clusters: {map}");
    let compare = ["compare", "-q", "-f", "raw", "-F", "qcow2", source.to_str().unwrap(), image_text];
    kcopyd_tests::fixtures::run("qemu-img", &compare).expect("the image reads as the source");
}

/// Servers that cannot promise zeroes by releasing storage still get the right bytes: one
/// without NBD_CMD_TRIM or write-zeroes, one whose trim does nothing (legal: trim is
/// advisory) and which has no write-zeroes, so that only block status shows the old bytes are
/// still there (both nbdkit's `eval` plugin), and one without write-zeroes whose every trim
/// fails with EIO (nbdkit's error filter). Each over a file of other bytes.
#[test]
fn servers_whose_trim_is_missing_idle_or_failing_get_zeroes_written() {
    let test = "servers_whose_trim_is_missing_idle_or_failing_get_zeroes_written";
    let dir = TempDir::new(test);
    let (source, data, _) = sparse_source(&dir);
    let old = pattern(35, data.len());
    let files =
        [dir.file_with("no-trim.img", &old), dir.file_with("idle-trim.img", &old), dir.file_with("eio-trim.img", &old)];
    let eval = |file: &std::path::Path, trim: bool| {
        let file = file.display();
        let mut args = vec![
            "--filter=nozero".to_owned(),
            "eval".to_owned(),
            format!("get_size=stat -c %s {file}"),
            "can_write=exit 0".to_owned(),
            format!("pread=dd if={file} skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none"),
            format!("pwrite=dd of={file} seek=$4 oflag=seek_bytes conv=notrunc status=none"),
        ];
        if trim {
            args.extend(["can_trim=exit 0".to_owned(), "trim=exit 0".to_owned()]);
        }
        args
    };
    let no_trim = eval(&files[0], false);
    let no_trim: Vec<&str> = no_trim.iter().map(String::as_str).collect();
    let Some(first) = ExternalNbdServer::nbdkit(test, Listen::Unix, &no_trim) else { return };
    let idle_trim = eval(&files[1], true);
    let idle_trim: Vec<&str> = idle_trim.iter().map(String::as_str).collect();
    let Some(second) = ExternalNbdServer::nbdkit(test, Listen::Unix, &idle_trim) else { return };
    let failing = format!("file={}", files[2].display());
    let failing = ["--filter=nozero", "--filter=error", "file", &failing, "error-trim=EIO", "error-trim-rate=100%"];
    let Some(third) = ExternalNbdServer::nbdkit(test, Listen::Unix, &failing) else { return };
    let targets = [first.uri(""), second.uri(""), third.uri("")];
    let (code, _, stderr) = kcopyd(&["copy", source.to_str().unwrap(), &targets[0], &targets[1], &targets[2]]);
    assert_eq!(code, 0, "{stderr}");
    for file in &files {
        assert!(fs::read(file).unwrap() == data, "{} holds the source, zeroes included", file.display());
    }
}

/// Write-zeroes where no sparse target was asked for (`kcopyd zero`) keeps the export's
/// storage (NBD_CMD_FLAG_NO_HOLE), as `FALLOC_FL_ZERO_RANGE` keeps a file's, also on a server
/// that would release it.
#[test]
fn zero_through_nbd_keeps_the_storage_allocated() {
    let test = "zero_through_nbd_keeps_the_storage_allocated";
    let dir = TempDir::new(test);
    let file = dir.file_with("target.img", &pattern(36, 4 << 20));
    let Some(qemu) = ExternalNbdServer::qemu_nbd(test, &file, Listen::Unix, &["--discard=unmap"]) else { return };
    let (code, _, stderr) = kcopyd(&["zero", &qemu.uri("")]);
    assert_eq!(code, 0, "{stderr}");
    assert!(fs::read(&file).unwrap().iter().all(|&b| b == 0));
    assert_eq!(allocated_bytes(&file), 4 << 20, "zeroed in place, not released");
}

/// `--connections N` opens N connections to a multi-conn server (nbdkit's log filter counts
/// them); by default 4, or 1 when the command names three NBD exports or more; out of 1 to 16
/// it is refused before anything is opened.
#[test]
fn connections_sets_how_many_connections_open() {
    let test = "connections_sets_how_many_connections_open";
    let dir = TempDir::new(test);
    let source = dir.file_with("source.img", &pattern(37, 1 << 20));
    let log = dir.join("nbdkit.log");
    let log_arg = format!("logfile={}", log.display());
    let Some(kit) = ExternalNbdServer::nbdkit(test, Listen::Unix, &["--filter=log", "memory", "1M", &log_arg]) else {
        return;
    };
    let opened = || fs::read_to_string(&log).unwrap_or_default().matches(" Connect ").count();
    // The server's readiness probe opened one connection before the copies.
    let before = opened();
    for (count, expected) in [("1", 1), ("3", 3), ("16", 16)] {
        let at = opened();
        let (code, _, stderr) = kcopyd(&["copy", "--connections", count, source.to_str().unwrap(), &kit.uri("")]);
        assert_eq!(code, 0, "{stderr}");
        assert_eq!(opened() - at, expected, "--connections {count} (probe: {before})");
    }
    let at = opened();
    let (code, _, stderr) = kcopyd(&["copy", source.to_str().unwrap(), &kit.uri("")]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(opened() - at, 4, "the default: 4 per export");
    // Three NBD exports in one command: one connection each by default.
    let targets: Vec<ExternalNbdServer> =
        (0..2).filter_map(|_| ExternalNbdServer::nbdkit(test, Listen::Unix, &["memory", "1M"])).collect();
    let at = opened();
    let (code, _, stderr) = kcopyd(&["copy", &kit.uri(""), &targets[0].uri(""), &targets[1].uri("")]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(opened() - at, 1, "three exports: 1 each");
    let at = opened();
    let (code, _, stderr) =
        kcopyd(&["copy", "--connections", "2", &kit.uri(""), &targets[0].uri(""), &targets[1].uri("")]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(opened() - at, 2, "--connections overrides it");
    let at = opened();
    for bad in ["0", "17", "18446744073709551616", "-1"] {
        let (code, _, stderr) = kcopyd(&["copy", "--connections", bad, source.to_str().unwrap(), &kit.uri("")]);
        assert_eq!(code, 2, "--connections {bad}: {stderr}");
        assert!(stderr.contains("--connections"), "{stderr}");
    }
    assert_eq!(opened(), at, "refused before connecting");
}

/// More connections asked for than the server takes: qemu-nbd past its `-e 2` leaves the
/// third unanswered in its listen queue. The copy goes on with two after about a second
/// (ten first handshakes, at least 1 s), not after the 30 s connect timeout.
#[test]
fn more_connections_than_the_server_takes_cost_about_a_second() {
    let test = "more_connections_than_the_server_takes_cost_about_a_second";
    let dir = TempDir::new(test);
    let data = pattern(38, 1 << 20);
    let source = dir.file_with("source.img", &data);
    let file = dir.zero_file("target.img", data.len() as u64);
    let Some(qemu) = ExternalNbdServer::qemu_nbd(test, &file, Listen::Unix, &["-e", "2"]) else { return };
    let started = std::time::Instant::now();
    let (code, _, stderr) = kcopyd(&["copy", "--connections", "8", source.to_str().unwrap(), &qemu.uri("")]);
    let took = started.elapsed();
    assert_eq!(code, 0, "{stderr}");
    assert!(fs::read(&file).unwrap() == data);
    assert!(took < std::time::Duration::from_secs(10), "took {took:?}");
    let note = format!("kcopyd: note: TARGET '{}': its server took 2 connections, not the 8 asked for", qemu.uri(""));
    assert_eq!(stderr.trim_end(), note, "says it has fewer");
}

/// A server that does not allow several connections (nbdkit's multi-conn filter with
/// `multi-conn-mode=disable`) gets one; when `--connections` asked for more, the command says
/// so on stderr (not with `--quiet`, nor when nothing was asked for).
#[test]
fn a_server_without_multi_conn_gets_one_connection_and_a_count_asked_for_is_noted() {
    let test = "a_server_without_multi_conn_gets_one_connection_and_a_count_asked_for_is_noted";
    let dir = TempDir::new(test);
    let data = pattern(39, 1 << 20);
    let source = dir.file_with("source.img", &data);
    let log = dir.join("nbdkit.log");
    let log_arg = format!("logfile={}", log.display());
    let args = ["--filter=log", "--filter=multi-conn", "memory", "1M", "multi-conn-mode=disable", &log_arg];
    let Some(kit) = ExternalNbdServer::nbdkit(test, Listen::Unix, &args) else { return };
    let opened = || fs::read_to_string(&log).unwrap_or_default().matches(" Connect ").count();
    let (source, uri) = (source.to_str().unwrap(), kit.uri(""));
    let at = opened();
    let (code, _, stderr) = kcopyd(&["copy", "--connections", "4", source, &uri]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(opened() - at, 1, "one connection");
    let note = format!(
        "kcopyd: note: TARGET '{uri}': its server does not allow several (no NBD_FLAG_CAN_MULTI_CONN): \
         1 connection, not the 4 asked for"
    );
    assert_eq!(stderr.trim_end(), note);
    let (code, _, stderr) = kcopyd(&["verify", "--connections", "2", source, &uri]);
    assert_eq!((code, stderr.trim_end()), (0, note.replace("the 4", "the 2").as_str()), "verify says it too");
    let (code, _, stderr) = kcopyd(&["zero", "--connections", "3", &uri]);
    assert_eq!((code, stderr.trim_end()), (0, note.replace("the 4", "the 3").as_str()), "and zero");
    for quiet in [&["copy", source, &uri][..], &["copy", "--quiet", "--connections", "4", source, &uri]] {
        let (code, _, stderr) = kcopyd(quiet);
        assert_eq!((code, stderr.as_str()), (0, ""), "{quiet:?}");
    }
}

#[test]
fn more_subjobs_in_flight_than_256_are_noted_for_a_file_and_not_for_an_nbd_export() {
    let test = "more_subjobs_in_flight_than_256_are_noted_for_a_file_and_not_for_an_nbd_export";
    let dir = TempDir::new(test);
    let data = pattern(41, 1 << 20);
    let source = dir.file_with("source.img", &data);
    let Some(kit) = ExternalNbdServer::nbdkit(test, Listen::Unix, &["memory", "1M"]) else { return };
    let (source, uri) = (source.to_str().unwrap(), kit.uri(""));
    let (code, _, stderr) =
        kcopyd(&["copy", "--verify", "--subjob-size", "4K", "--subjobs-in-flight", "300", source, &uri]);
    assert_eq!(code, 0, "{stderr}");
    let note = format!(
        "kcopyd: note: SOURCE '{source}': a file or block device runs at most 256 I/Os at once, not the 300 \
         sub-jobs asked for (the others wait in its queue)"
    );
    assert_eq!(stderr.trim_end(), note, "the export runs every request it is sent: no note for it");
}

/// Page faults process `pid` has taken so far (`minflt` of /proc/PID/stat).
fn minor_faults(pid: u32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("the server's /proc/PID/stat");
    let after_name = &stat[stat.rfind(')').expect("stat names the command in parentheses") + 2..];
    after_name.split(' ').nth(7).and_then(|field| field.parse().ok()).expect("minflt is the 10th field")
}

/// The target server's page faults while kcopyd copies `len` bytes of `source` to a fresh
/// qemu-nbd in 256 KiB writes, 4 in flight (a warm-up of two of them or more, up to 1 MiB,
/// from a 32 MiB range on), with `extra` options.
fn target_server_faults(test: &str, dir: &TempDir, source: &str, len: usize, extra: &[&str]) -> Option<u64> {
    let name = format!("target-{len}{}.img", extra.join(""));
    let target = dir.zero_file(&name, len as u64);
    let server = ExternalNbdServer::qemu_nbd(test, &target, Listen::Unix, &[])?;
    let pid = server.pid().expect("the server runs");
    let before = minor_faults(pid);
    let (length, uri) = (len.to_string(), server.uri(""));
    let options = ["--subjob-size", "256K", "--subjobs-in-flight", "4", "--memory", "1M", "--length", &length];
    let (code, _, stderr) = kcopyd(&[&["copy", "-q", source, &uri][..], &options, extra].concat());
    assert_eq!(code, 0, "{stderr}");
    Some(minor_faults(pid) - before)
}

#[test]
fn a_long_copy_warms_qemu_nbd_up_so_that_its_request_buffers_stop_faulting() {
    let test = "a_long_copy_warms_qemu_nbd_up_so_that_its_request_buffers_stop_faulting";
    let dir = TempDir::new(test);
    let data = pattern(24, 64 << 20);
    let source = dir.file_with("source.img", &data);
    let source = source.to_str().unwrap();
    // 31 MiB is too short for a warm-up (a 64th of it is less than two 256 KiB writes): every
    // write gets a fresh mapping in qemu-nbd, a fault on each of its pages.
    let pages = (31 << 20) / 4096;
    let Some(cold) = target_server_faults(test, &dir, source, 31 << 20, &[]) else { return };
    assert!(cold >= pages / 2, "{cold} faults for {pages} pages written: without a warm-up, qemu-nbd faults on each");
    // 64 MiB: one 1 MiB read first, and the writes come from the server's heap.
    let pages = (64 << 20) / 4096;
    let Some(warm) = target_server_faults(test, &dir, source, 64 << 20, &[]) else { return };
    assert!(warm < pages / 4, "{warm} faults for {pages} pages written: the warm-up did not lift qemu-nbd's threshold");
    // Unless the user says no.
    let Some(refused) = target_server_faults(test, &dir, source, 64 << 20, &["--no-warm-up"]) else { return };
    assert!(refused >= pages / 2, "{refused} faults for {pages} pages written with --no-warm-up");
}
