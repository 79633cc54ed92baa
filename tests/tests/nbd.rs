//! The NBD client against two real servers, qemu-nbd and nbdkit, started here on unix
//! sockets and loopback TCP ports: the conformance suite, copies file↔NBD and NBD↔NBD under
//! the engine (its own worker thread, and a multi-thread tokio runtime), the handshake's
//! facts (export names, read-only exports, multi-conn, block sizes, block status, trim), and
//! faults injected by the server (nbdkit's error filter, a sh-script plugin failing chosen
//! offsets, the delay filter, a server killed mid-copy), and the reactor the connections of
//! many devices share. A missing server prints `SKIPPED:`.

use std::fs;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use kcopyd_core::{BlockDevice, Client, ClientConfig, Device, Flags, Job, Outcome, RangeSet, Region};
use kcopyd_nbd::{ConnectError, ConnectOptions, NbdDevice, Reactor, RequestError};
use kcopyd_os::{OpenOptions, OsDevice};
use kcopyd_tests::conformance::{self, DEVICE_SECTORS_MIN, block_on, read_ok, write_ok};
use kcopyd_tests::fixtures::{TempDir, pattern};
use kcopyd_tests::nbd_servers::{ExternalNbdServer, Listen};

const DEVICE_BYTES: u64 = DEVICE_SECTORS_MIN * 512;

fn writable() -> ConnectOptions {
    ConnectOptions { write: true, ..ConnectOptions::default() }
}

fn open(uri: &str, options: &ConnectOptions) -> NbdDevice {
    NbdDevice::connect(uri, options).unwrap_or_else(|error| panic!("connecting to {uri}: {error}"))
}

/// The `RequestError` inside a device's `io::Error`.
fn request_error(error: &io::Error) -> &RequestError {
    error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<RequestError>())
        .unwrap_or_else(|| panic!("not a RequestError: {error}"))
}

/// Waits for `job` on another thread, failing the test if it takes longer than `limit`.
fn wait_within(job: kcopyd_core::JobHandle, limit: Duration) -> Outcome {
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = sender.send(job.wait());
    });
    receiver.recv_timeout(limit).unwrap_or_else(|_| panic!("the job did not complete within {limit:?}"))
}

fn copy(source: Device, targets: Vec<Device>, len_sectors: u64, flags: Flags, config: ClientConfig) -> Outcome {
    let client = Client::new(config).unwrap();
    let job = client
        .submit_blocking(Job::copy(
            Region::new(source, 0, len_sectors),
            targets.into_iter().map(|t| Region::new(t, 0, len_sectors)).collect(),
            flags,
        ))
        .unwrap();
    let outcome = wait_within(job, Duration::from_secs(60));
    client.shutdown_blocking();
    outcome
}

// ---- conformance over both servers, both transports ------------------------------------

fn qemu_conformance(test: &str, listen: Listen) {
    let dir = TempDir::new(test);
    let file = dir.zero_file("export.img", DEVICE_BYTES);
    let Some(server) = ExternalNbdServer::qemu_nbd(test, &file, listen, &[]) else { return };
    let device = open(&server.uri(""), &writable());
    assert_eq!(device.geometry().len_sectors, DEVICE_SECTORS_MIN);
    assert!(device.structured_replies(), "qemu-nbd negotiates structured replies");
    assert!(device.deallocates(), "NBD_CMD_WRITE_ZEROES without NBD_CMD_FLAG_NO_HOLE");
    conformance::run_all(&device);
}

#[test]
fn conformance_qemu_nbd_unix() {
    qemu_conformance("conformance_qemu_nbd_unix", Listen::Unix);
}

#[test]
fn conformance_qemu_nbd_tcp() {
    qemu_conformance("conformance_qemu_nbd_tcp", Listen::Tcp);
}

#[test]
fn conformance_nbdkit_memory_unix() {
    let size = DEVICE_BYTES.to_string();
    let Some(server) = ExternalNbdServer::nbdkit("conformance_nbdkit_memory_unix", Listen::Unix, &["memory", &size])
    else {
        return;
    };
    conformance::run_all(&open(&server.uri(""), &writable()));
}

#[test]
fn conformance_nbdkit_memory_tcp() {
    let size = DEVICE_BYTES.to_string();
    let Some(server) = ExternalNbdServer::nbdkit("conformance_nbdkit_memory_tcp", Listen::Tcp, &["memory", &size])
    else {
        return;
    };
    conformance::run_all(&open(&server.uri(""), &writable()));
}

/// 4096-byte minimum blocks (the blocksize-policy filter) become the logical block; the suite then
/// checks that misaligned requests are refused.
#[test]
fn conformance_nbdkit_4096_byte_blocks() {
    let size = DEVICE_BYTES.to_string();
    let args = [
        "--filter=blocksize-policy",
        "memory",
        &size,
        "blocksize-minimum=4096",
        "blocksize-preferred=4096",
        "blocksize-maximum=65536",
    ];
    let Some(server) = ExternalNbdServer::nbdkit("conformance_nbdkit_4096_byte_blocks", Listen::Unix, &args) else {
        return;
    };
    let device = open(&server.uri(""), &writable());
    assert_eq!(device.geometry().logical_block_size, 4096);
    assert_eq!(device.payload_bytes_max(), 65536, "the server's maximum block size splits larger requests");
    conformance::run_all(&device);
}

/// Without NBD_CMD_WRITE_ZEROES (the nozero filter) write-zeroes writes zeroes.
#[test]
fn conformance_nbdkit_without_write_zeroes() {
    let size = DEVICE_BYTES.to_string();
    let args = ["--filter=nozero", "memory", &size];
    let Some(server) = ExternalNbdServer::nbdkit("conformance_nbdkit_without_write_zeroes", Listen::Unix, &args) else {
        return;
    };
    let device = open(&server.uri(""), &writable());
    assert!(!device.geometry().write_zeroes);
    assert!(device.deallocates(), "NBD_CMD_TRIM checked by block status");
    conformance::run_all(&device);
}

/// Trim and block status without write-zeroes on 4096-byte blocks: a deallocation's trim,
/// block status and zero writes keep to whole blocks.
#[test]
fn conformance_nbdkit_trim_on_4096_byte_blocks() {
    let test = "conformance_nbdkit_trim_on_4096_byte_blocks";
    let size = DEVICE_BYTES.to_string();
    let args = [
        "--filter=nozero",
        "--filter=blocksize-policy",
        "memory",
        &size,
        "blocksize-minimum=4096",
        "blocksize-preferred=4096",
        "blocksize-maximum=65536",
    ];
    let Some(server) = ExternalNbdServer::nbdkit(test, Listen::Unix, &args) else { return };
    let device = open(&server.uri(""), &writable());
    assert_eq!(device.geometry().logical_block_size, 4096);
    assert!(device.deallocates() && !device.geometry().write_zeroes);
    conformance::run_all(&device);
}

/// Trim and block status, but block status that calls everything data (the noextents
/// filter): a deallocation trims, sees data still there, and writes zeroes.
#[test]
fn conformance_nbdkit_trim_with_block_status_saying_data() {
    let test = "conformance_nbdkit_trim_with_block_status_saying_data";
    let size = DEVICE_BYTES.to_string();
    let args = ["--filter=nozero", "--filter=noextents", "memory", &size];
    let Some(server) = ExternalNbdServer::nbdkit(test, Listen::Unix, &args) else { return };
    let device = open(&server.uri(""), &writable());
    assert!(device.has_trim() && device.has_block_status() && !device.geometry().write_zeroes);
    conformance::run_all(&device);
}

// ---- copies ------------------------------------------------------------------------------

#[test]
fn file_to_nbd_to_nbd_copies_are_byte_exact_on_the_engine_worker() {
    let test = "file_to_nbd_to_nbd_copies_are_byte_exact_on_the_engine_worker";
    let dir = TempDir::new("nbd-copies");
    let data = pattern(42, 4 << 20);
    let source_file = dir.file_with("source.img", &data);
    let qemu_file = dir.zero_file("qemu.img", data.len() as u64);
    let Some(qemu) = ExternalNbdServer::qemu_nbd(test, &qemu_file, Listen::Unix, &["-x", "disk"]) else { return };
    let size = data.len().to_string();
    let Some(kit) = ExternalNbdServer::nbdkit(test, Listen::Tcp, &["memory", &size]) else { return };
    let len_sectors = data.len() as u64 / 512;

    // file → qemu-nbd
    let source: Device = Arc::new(OsDevice::open(&source_file, &OpenOptions::default()).unwrap());
    let qemu: Device = Arc::new(open(&qemu.uri("disk"), &writable()));
    let outcome = copy(source, vec![qemu.clone()], len_sectors, Flags::empty(), ClientConfig::default());
    assert!(outcome.is_ok(), "{outcome:?}");
    assert!(fs::read(&qemu_file).unwrap() == data, "qemu-nbd's file holds the source");

    // qemu-nbd → nbdkit and back to a file, with small sub-jobs (many requests in flight)
    let kit: Device = Arc::new(open(&kit.uri(""), &writable()));
    let back_file = dir.zero_file("back.img", data.len() as u64);
    let back: Device =
        Arc::new(OsDevice::open(&back_file, &OpenOptions { write: true, ..OpenOptions::default() }).unwrap());
    let config = ClientConfig { subjob_size_bytes: 64 * 1024, subjobs_in_flight: 32, ..ClientConfig::default() };
    let outcome = copy(qemu, vec![kit.clone()], len_sectors, Flags::empty(), config);
    assert!(outcome.is_ok(), "{outcome:?}");
    let outcome = copy(kit, vec![back], len_sectors, Flags::empty(), ClientConfig::default());
    assert!(outcome.is_ok(), "{outcome:?}");
    assert!(fs::read(&back_file).unwrap() == data, "file → qemu-nbd → nbdkit → file is byte-exact");
}

/// Devices' futures polled by a multi-thread tokio runtime directly, and the engine's handle
/// awaited there.
#[test]
fn nbd_device_works_on_a_multi_thread_runtime() {
    let test = "nbd_device_works_on_a_multi_thread_runtime";
    let size = (2 << 20).to_string();
    let Some(source) = ExternalNbdServer::nbdkit(test, Listen::Unix, &["memory", &size]) else { return };
    let Some(target) = ExternalNbdServer::nbdkit(test, Listen::Unix, &["memory", &size]) else { return };
    let data = pattern(7, 2 << 20);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let source = Arc::new(open(&source.uri(""), &writable()));
        let target = Arc::new(open(&target.uri(""), &writable()));
        conformance::write_at(source.as_ref(), 0, &data).await.unwrap();
        let client = Client::new(ClientConfig::default()).unwrap();
        let job = client
            .submit(Job::copy(
                Region::new(source.clone(), 0, 4096),
                vec![Region::new(target.clone(), 0, 4096)],
                Flags::empty(),
            ))
            .await
            .unwrap();
        let outcome = tokio::time::timeout(Duration::from_secs(60), job).await.expect("the job completes");
        assert!(outcome.is_ok(), "{outcome:?}");
        assert!(conformance::read_at(target.as_ref(), 0, data.len()).await.unwrap() == data);
        client.shutdown().await;
    });
}

#[test]
fn one_source_to_three_nbd_targets() {
    let test = "one_source_to_three_nbd_targets";
    let size = (4 << 20).to_string();
    let data = pattern(9, 4 << 20);
    let Some(source) = ExternalNbdServer::nbdkit(test, Listen::Unix, &["memory", &size]) else { return };
    let servers: Vec<ExternalNbdServer> =
        (0..3).filter_map(|_| ExternalNbdServer::nbdkit(test, Listen::Tcp, &["memory", &size])).collect();
    let source = Arc::new(open(&source.uri(""), &writable()));
    write_ok(source.as_ref(), 0, &data);
    let targets: Vec<Arc<NbdDevice>> = servers.iter().map(|s| Arc::new(open(&s.uri(""), &writable()))).collect();
    let outcome = copy(
        source,
        targets.iter().map(|t| t.clone() as Device).collect(),
        8192,
        Flags::empty(),
        ClientConfig::default(),
    );
    assert!(outcome.is_ok(), "{outcome:?}");
    for target in &targets {
        assert!(read_ok(target.as_ref(), 0, data.len()) == data, "{}", target.name());
    }
}

// ---- handshake facts ---------------------------------------------------------------------

#[test]
fn export_names_select_the_export_and_unknown_ones_are_refused() {
    let test = "export_names_select_the_export_and_unknown_ones_are_refused";
    let dir = TempDir::new(test);
    let file = dir.file_with("disk.img", &pattern(3, 1 << 20));
    let Some(server) = ExternalNbdServer::qemu_nbd(test, &file, Listen::Unix, &["-x", "disk"]) else { return };
    let device = open(&server.uri("disk"), &ConnectOptions::default());
    assert_eq!(read_ok(&device, 0, 4096), pattern(3, 1 << 20)[..4096]);
    let error = NbdDevice::connect(&server.uri("other"), &ConnectOptions::default()).unwrap_err();
    assert!(
        matches!(error, ConnectError::OptionRefused { option: "NBD_OPT_GO", reply: "NBD_REP_ERR_UNKNOWN", .. }),
        "{error}"
    );
    let missing = NbdDevice::connect("nbd+unix:///?socket=/nonexistent/nbd.sock", &ConnectOptions::default());
    assert!(matches!(missing, Err(ConnectError::Connect { .. })), "{missing:?}");
}

#[test]
fn read_only_exports_are_refused_as_targets_before_any_io() {
    let test = "read_only_exports_are_refused_as_targets_before_any_io";
    let dir = TempDir::new(test);
    let data = pattern(4, 1 << 20);
    let file = dir.file_with("disk.img", &data);
    let Some(server) = ExternalNbdServer::qemu_nbd(test, &file, Listen::Unix, &["-r"]) else { return };
    let error = NbdDevice::connect(&server.uri(""), &writable()).unwrap_err();
    assert!(matches!(error, ConnectError::ReadOnly { .. }), "{error}");
    assert!(error.to_string().contains("read-only"), "{error}");
    // Opened for reading: reads work, writes are refused here and nothing changes.
    let device = open(&server.uri(""), &ConnectOptions::default());
    assert!(device.is_read_only_export());
    let refused = block_on(conformance::write_at(&device, 0, &[1u8; 512])).unwrap_err();
    assert_eq!(refused.kind(), io::ErrorKind::PermissionDenied, "{refused}");
    assert!(matches!(request_error(&refused), RequestError::Refused { .. }));
    assert!(fs::read(&file).unwrap() == data);
}

#[test]
fn multi_conn_opens_several_connections_only_when_the_server_allows() {
    let test = "multi_conn_opens_several_connections_only_when_the_server_allows";
    let size = (1 << 20).to_string();
    let Some(allowed) = ExternalNbdServer::nbdkit(test, Listen::Unix, &["memory", &size]) else { return };
    let args = ["--filter=multi-conn", "memory", &size, "multi-conn-mode=disable"];
    let Some(refused) = ExternalNbdServer::nbdkit(test, Listen::Unix, &args) else { return };
    let many = open(&allowed.uri(""), &ConnectOptions { connections_max: 3, ..writable() });
    assert!(many.can_multi_conn());
    assert_eq!(many.connections(), 3);
    // Writes spread over the connections are all visible through any one of them.
    let data = pattern(5, 256 * 1024);
    for (i, block) in data.chunks(4096).enumerate() {
        write_ok(&many, i as u64 * 8, block);
    }
    block_on(many.flush()).unwrap();
    let one = open(&allowed.uri(""), &ConnectOptions { connections_max: 1, ..writable() });
    assert_eq!(one.connections(), 1);
    assert!(read_ok(&one, 0, data.len()) == data);
    let single = open(&refused.uri(""), &ConnectOptions { connections_max: 3, ..writable() });
    assert!(!single.can_multi_conn());
    assert_eq!(single.connections(), 1);
}

#[test]
fn block_status_reports_data_and_holes() {
    let test = "block_status_reports_data_and_holes";
    let dir = TempDir::new(test);
    let file = dir.zero_file("sparse.img", 8 << 20);
    let Some(server) = ExternalNbdServer::qemu_nbd(test, &file, Listen::Unix, &[]) else { return };
    let device = open(&server.uri(""), &writable());
    assert!(device.has_block_status());
    // 1 MiB of data at 4 MiB.
    write_ok(&device, 8192, &pattern(6, 1 << 20));
    block_on(device.flush()).unwrap();
    let mut extents = Vec::new();
    let mut at_sectors = 0;
    while at_sectors < 16384 {
        let answer = block_on(device.block_status(at_sectors, 16384 - at_sectors)).unwrap();
        assert!(!answer.is_empty());
        at_sectors = (answer.last().unwrap().offset_bytes + answer.last().unwrap().len_bytes) / 512;
        extents.extend(answer);
    }
    let mut data = RangeSet::new();
    let mut expected_at = 0;
    for extent in &extents {
        assert_eq!(extent.offset_bytes, expected_at, "extents are contiguous: {extents:?}");
        expected_at += extent.len_bytes;
        if !extent.hole {
            data.insert(extent.offset_bytes / 512..(extent.offset_bytes + extent.len_bytes) / 512);
        }
    }
    assert_eq!(expected_at, 8 << 20);
    assert_eq!(data, RangeSet::from_range(8192..10240), "only the written MiB is allocated: {extents:?}");
    // The same through the device contract, as sparse copies ask.
    let allocated = block_on(device.allocated(0, 16384)).unwrap();
    assert_eq!(allocated, RangeSet::from_range(8192..10240), "allocated() from base:allocation");
    // Out of range: refused here.
    let refused = block_on(device.block_status(16384, 8)).unwrap_err();
    assert_eq!(refused.kind(), io::ErrorKind::InvalidInput);
}

#[test]
fn trim_discards_on_the_server() {
    let test = "trim_discards_on_the_server";
    let size = (1 << 20).to_string();
    let Some(server) = ExternalNbdServer::nbdkit(test, Listen::Unix, &["memory", &size]) else { return };
    let device = open(&server.uri(""), &writable());
    assert!(device.has_trim());
    write_ok(&device, 0, &pattern(8, 64 * 1024));
    block_on(device.trim(16, 64)).unwrap();
    let after = read_ok(&device, 0, 64 * 1024);
    // The memory plugin reads trimmed bytes as zeroes.
    assert!(after[8192..40960].iter().all(|&b| b == 0));
    assert_eq!(after[..8192], pattern(8, 64 * 1024)[..8192]);
    assert_eq!(after[40960..], pattern(8, 64 * 1024)[40960..]);
}

// ---- faults the server injects -----------------------------------------------------------

#[test]
fn server_errors_carry_the_errno_and_the_range() {
    let test = "server_errors_carry_the_errno_and_the_range";
    let size = (1 << 20).to_string();
    let args = [
        "--filter=error",
        "memory",
        &size,
        "error-pread=EIO",
        "error-pread-rate=100%",
        "error-pwrite=ENOSPC",
        "error-pwrite-rate=100%",
    ];
    let Some(server) = ExternalNbdServer::nbdkit(test, Listen::Unix, &args) else { return };
    let device = open(&server.uri(""), &writable());
    let read = block_on(conformance::read_at(&device, 64, 4096)).unwrap_err();
    assert_eq!(request_error(&read).server_errno(), Some(5), "{read}");
    assert!(read.to_string().contains("NBD_CMD_READ of bytes 32768..36864 (sectors 64..72)"), "{read}");
    let write = block_on(conformance::write_at(&device, 8, &[1u8; 1024])).unwrap_err();
    assert_eq!(request_error(&write).server_errno(), Some(28), "{write}");
    assert_eq!(write.kind(), io::ErrorKind::StorageFull, "{write}");
    assert!(write.to_string().contains("NBD_CMD_WRITE of bytes 4096..5120 (sectors 8..10)"), "{write}");
}

/// An nbdkit `sh` plugin over a file that fails reads or writes touching chosen sector
/// ranges: exactly what the server was told to fail.
fn failing_sh_server(
    test: &str,
    dir: &TempDir,
    file: &Path,
    bad: &[(u64, u64)],
    fail: &str,
) -> Option<ExternalNbdServer> {
    let conditions: Vec<String> = bad
        .iter()
        .map(|(start, end)| format!("{{ [ \"$4\" -lt {} ] && [ $(($4 + $3)) -gt {} ]; }}", end * 512, start * 512))
        .collect();
    let check = format!("if {{ {}; }}; then echo 'EIO injected fault' >&2; exit 1; fi", conditions.join(" || "));
    let pread_check = if fail == "pread" { check.as_str() } else { "" };
    let pwrite_check = if fail == "pwrite" { check.as_str() } else { "" };
    let script = format!(
        r#"#!/bin/sh
file={file}
case "$1" in
  get_size) stat -c %s "$file" ;;
  can_write|can_flush) exit 0 ;;
  flush) ;;
  pread) {pread_check}
         dd if="$file" skip="$4" count="$3" iflag=skip_bytes,count_bytes status=none ;;
  pwrite) {pwrite_check}
          dd of="$file" seek="$4" oflag=seek_bytes conv=notrunc status=none ;;
  *) exit 2 ;;
esac
"#,
        file = file.display()
    );
    let script_path = dir.file_with("plugin.sh", script.as_bytes());
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&script_path, fs::Permissions::from_mode(0o755)).unwrap();
    ExternalNbdServer::nbdkit(test, Listen::Unix, &["sh", &script_path.display().to_string()])
}

#[test]
fn read_faults_at_chosen_offsets_are_reported_exactly() {
    let test = "read_faults_at_chosen_offsets_are_reported_exactly";
    let dir = TempDir::new(test);
    let data = pattern(11, 2 << 20);
    let file = dir.file_with("source.img", &data);
    // Sectors the server fails: two runs, one across a sub-job boundary (1024 sectors).
    let bad = [(100, 108), (1020, 1030)];
    let Some(server) = failing_sh_server(test, &dir, &file, &bad, "pread") else { return };
    let source: Device = Arc::new(open(&server.uri(""), &ConnectOptions::default()));
    let target_file = dir.zero_file("target.img", data.len() as u64);
    let target: Device =
        Arc::new(OsDevice::open(&target_file, &OpenOptions { write: true, ..OpenOptions::default() }).unwrap());
    let config = ClientConfig { subjob_size_bytes: 512 * 1024, ..ClientConfig::default() };
    let outcome = copy(source, vec![target], 4096, Flags::IGNORE_ERROR, config);
    assert!(outcome.read_err && outcome.write_err.is_empty(), "{outcome:?}");
    let mut expected = RangeSet::new();
    for (start, end) in bad {
        expected.insert(start..end);
    }
    assert_eq!(outcome.read_failed, expected, "the failed ranges are what the server was told to fail");
    let copied = fs::read(&target_file).unwrap();
    for sector in 0..4096u64 {
        let range = sector as usize * 512..(sector as usize + 1) * 512;
        if expected.contains(sector) {
            assert!(copied[range].iter().all(|&b| b == 0), "sector {sector} was not written");
        } else {
            assert_eq!(copied[range.clone()], data[range], "sector {sector}");
        }
    }
}

#[test]
fn write_faults_at_chosen_offsets_are_reported_exactly() {
    let test = "write_faults_at_chosen_offsets_are_reported_exactly";
    let dir = TempDir::new(test);
    let data = pattern(12, 2 << 20);
    let source_file = dir.file_with("source.img", &data);
    let target_file = dir.zero_file("target.img", data.len() as u64);
    let bad = [(2100, 2101)];
    let Some(server) = failing_sh_server(test, &dir, &target_file, &bad, "pwrite") else { return };
    let size = data.len().to_string();
    let Some(good) = ExternalNbdServer::nbdkit(test, Listen::Unix, &["memory", &size]) else { return };
    let source: Device = Arc::new(OsDevice::open(&source_file, &OpenOptions::default()).unwrap());
    let failing: Device = Arc::new(open(&server.uri(""), &writable()));
    let good_device = Arc::new(open(&good.uri(""), &writable()));
    // Sub-jobs of 1024 sectors: the failing write is the one of sectors 2048..3072.
    let config = ClientConfig { subjob_size_bytes: 512 * 1024, ..ClientConfig::default() };
    let outcome = copy(source, vec![failing, good_device.clone()], 4096, Flags::IGNORE_ERROR, config);
    assert!(!outcome.read_err, "{outcome:?}");
    assert_eq!(outcome.write_err.iter().collect::<Vec<_>>(), vec![0], "only the failing server's target");
    // The engine reports a failed write as the whole sub-job it was writing.
    assert_eq!(outcome.targets[0].write_failed, RangeSet::from_range(2048..3072), "{outcome:?}");
    assert!(outcome.targets[1].write_failed.is_empty());
    assert!(read_ok(good_device.as_ref(), 0, data.len()) == data, "the other target got everything");
}

#[test]
fn delayed_replies_still_copy_byte_exact() {
    let test = "delayed_replies_still_copy_byte_exact";
    let size = (2 << 20).to_string();
    let data = pattern(13, 2 << 20);
    let args = ["--filter=delay", "memory", &size, "rdelay=5ms", "wdelay=5ms"];
    let Some(source) = ExternalNbdServer::nbdkit(test, Listen::Tcp, &args) else { return };
    let Some(target) = ExternalNbdServer::nbdkit(test, Listen::Unix, &args) else { return };
    let source = Arc::new(open(&source.uri(""), &writable()));
    let target = Arc::new(open(&target.uri(""), &writable()));
    write_ok(source.as_ref(), 0, &data);
    let config = ClientConfig { subjob_size_bytes: 32 * 1024, subjobs_in_flight: 16, ..ClientConfig::default() };
    let outcome = copy(source, vec![target.clone()], 4096, Flags::empty(), config);
    assert!(outcome.is_ok(), "{outcome:?}");
    assert!(read_ok(target.as_ref(), 0, data.len()) == data);
}

#[test]
fn a_server_killed_mid_copy_fails_the_io_in_flight_and_nothing_hangs() {
    let test = "a_server_killed_mid_copy_fails_the_io_in_flight_and_nothing_hangs";
    let size = (8 << 20).to_string();
    let Some(source) = ExternalNbdServer::nbdkit(test, Listen::Unix, &["memory", &size]) else { return };
    // Slow writes: the copy takes seconds, so the kill lands in the middle of it.
    let args = ["--filter=delay", "memory", &size, "wdelay=100ms"];
    let Some(mut target_server) = ExternalNbdServer::nbdkit(test, Listen::Tcp, &args) else { return };
    let source = Arc::new(open(&source.uri(""), &writable()));
    write_ok(source.as_ref(), 0, &pattern(14, 8 << 20));
    let target = Arc::new(open(&target_server.uri(""), &writable()));
    let client = Client::new(ClientConfig { subjob_size_bytes: 64 * 1024, ..ClientConfig::default() }).unwrap();
    let job = client
        .submit_blocking(Job::copy(
            Region::new(source, 0, 16384),
            vec![Region::new(target.clone(), 0, 16384)],
            Flags::IGNORE_ERROR,
        ))
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(job.try_outcome().is_none(), "the copy is still running when the server dies");
    target_server.kill();
    let outcome = wait_within(job, Duration::from_secs(30));
    assert!(outcome.write_err.contains(0), "{outcome:?}");
    assert!(!outcome.targets[0].write_failed.is_empty() && !outcome.targets[0].not_copied.is_empty());
    // Later requests fail at once, naming the loss.
    let later = block_on(conformance::read_at(target.as_ref(), 0, 4096)).unwrap_err();
    assert!(matches!(request_error(&later), RequestError::ConnectionLost { .. }), "{later}");
    assert!(later.to_string().contains("connection lost"), "{later}");
    client.shutdown_blocking();
}

/// A server that stays connected but does not answer (the delay filter holding every read for
/// a minute): the engine's per-I/O timeout fails the reads, and the buffers come back once the
/// server is gone.
#[test]
fn a_server_that_never_answers_is_cut_off_by_the_engines_io_timeout() {
    let test = "a_server_that_never_answers_is_cut_off_by_the_engines_io_timeout";
    let size = (1 << 20).to_string();
    let args = ["--filter=delay", "memory", &size, "rdelay=60"];
    let Some(mut server) = ExternalNbdServer::nbdkit(test, Listen::Unix, &args) else { return };
    let source: Device = Arc::new(open(&server.uri(""), &ConnectOptions::default()));
    let target: Device = Arc::new(kcopyd_sim::MemDisk::zeroed("target", 2048, 512));
    let config = ClientConfig { io_timeout_ms: Some(300), ..ClientConfig::default() };
    let client = Client::new(config).unwrap();
    let job = client
        .submit_blocking(Job::copy(Region::new(source, 0, 2048), vec![Region::new(target, 0, 2048)], Flags::empty()))
        .unwrap();
    let outcome = wait_within(job, Duration::from_secs(30));
    assert!(outcome.read_err && !outcome.read_failed.is_empty(), "{outcome:?}");
    server.kill();
    // The lost connection completes the held reads: their pages return to the pool.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while client.pool_stats().pages_in_use > 0 {
        assert!(std::time::Instant::now() < deadline, "pages still held: {:?}", client.pool_stats());
        std::thread::sleep(Duration::from_millis(20));
    }
    let report = client.shutdown_blocking();
    assert_eq!(report.requests_outstanding, 0, "{report:?}");
}

// ---- the reactor ----------------------------------------------------------------------

/// Waits until `reactor` runs `count` connections, failing the test after 10 s.
fn wait_for_connections(reactor: &Reactor, count: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while reactor.connections_running() != count {
        assert!(std::time::Instant::now() < deadline, "{} connections, not {count}", reactor.connections_running());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Every connection of several devices on two servers runs on one reactor; a copy between
/// them under the engine is byte-exact; the connections end with their devices. Devices
/// opened with the default options share the process's reactor instead.
#[test]
fn many_devices_share_one_reactor_and_their_connections_end_with_them() {
    let test = "many_devices_share_one_reactor_and_their_connections_end_with_them";
    let size = (4 << 20).to_string();
    let Some(first) = ExternalNbdServer::nbdkit(test, Listen::Unix, &["memory", &size]) else { return };
    let Some(second) = ExternalNbdServer::nbdkit(test, Listen::Tcp, &["memory", &size]) else { return };
    let reactor = Reactor::new().unwrap();
    let options = ConnectOptions { reactor: Some(reactor.clone()), ..writable() };
    let source: Arc<NbdDevice> = Arc::new(open(&first.uri(""), &options));
    let targets: Vec<Arc<NbdDevice>> = vec![
        Arc::new(open(&second.uri(""), &options)),
        Arc::new(open(&first.uri(""), &ConnectOptions { connections_max: 2, ..options.clone() })),
    ];
    let devices = || std::iter::once(&source).chain(&targets);
    assert!(devices().all(|device| device.reactor() == &reactor));
    let connections: usize = devices().map(|device| device.connections()).sum();
    assert_eq!(connections, 4 + 4 + 2, "nbdkit's memory plugin allows multi-conn");
    assert_eq!(reactor.connections_running(), connections);

    // The second target shares the source's server: it gets the upper half.
    let data = pattern(21, 2 << 20);
    write_ok(source.as_ref(), 0, &data);
    let half_sectors = (2 << 20) / 512;
    let client =
        Client::new(ClientConfig { subjob_size_bytes: 64 * 1024, subjobs_in_flight: 16, ..ClientConfig::default() })
            .unwrap();
    let job = client
        .submit_blocking(Job::copy(
            Region::new(source.clone(), 0, half_sectors),
            vec![
                Region::new(targets[0].clone(), 0, half_sectors),
                Region::new(targets[1].clone(), half_sectors, half_sectors),
            ],
            Flags::empty(),
        ))
        .unwrap();
    let outcome = wait_within(job, Duration::from_secs(60));
    client.shutdown_blocking();
    assert!(outcome.is_ok(), "{outcome:?}");
    assert!(read_ok(targets[0].as_ref(), 0, 2 << 20) == data[..2 << 20]);
    assert!(read_ok(targets[1].as_ref(), half_sectors, 2 << 20) == data[..2 << 20]);

    let shared = (open(&first.uri(""), &writable()), open(&second.uri(""), &ConnectOptions::default()));
    assert!(shared.0.reactor() == shared.1.reactor() && shared.0.reactor() != &reactor);
    assert_eq!(shared.0.reactor(), &Reactor::shared().unwrap());
    assert_eq!(shared.0.reactor().thread_id(), shared.1.reactor().thread_id());
    assert_ne!(shared.0.reactor().thread_id(), reactor.thread_id());

    drop((source, targets));
    wait_for_connections(&reactor, 0);
    // At least these two devices' (other tests of this process may share it too).
    assert!(shared.0.reactor().connections_running() >= shared.0.connections() + shared.1.connections());
}

/// Two devices on one reactor, both with reads in flight; one server dies: that device's
/// reads fail at once with the loss, the other's complete with their data, and the other
/// device keeps working.
#[test]
fn a_connection_lost_on_a_shared_reactor_fails_only_its_own_requests() {
    let test = "a_connection_lost_on_a_shared_reactor_fails_only_its_own_requests";
    let size = (1 << 20).to_string();
    // Reads held for a minute on the server that dies, for half a second on the one that lives.
    let dying_args = ["--filter=delay", "memory", &size, "rdelay=60"];
    let Some(mut dying_server) = ExternalNbdServer::nbdkit(test, Listen::Tcp, &dying_args) else { return };
    let living_args = ["--filter=delay", "memory", &size, "rdelay=500ms"];
    let Some(living_server) = ExternalNbdServer::nbdkit(test, Listen::Unix, &living_args) else { return };
    let reactor = Reactor::new().unwrap();
    let options = ConnectOptions { reactor: Some(reactor.clone()), ..writable() };
    let dying = Arc::new(open(&dying_server.uri(""), &options));
    let living = Arc::new(open(&living_server.uri(""), &options));
    let data = pattern(22, 64 * 1024);
    write_ok(living.as_ref(), 0, &data);

    let read_later = |device: &Arc<NbdDevice>, offset_sectors: u64| {
        let device = device.clone();
        std::thread::spawn(move || {
            let started = std::time::Instant::now();
            (block_on(conformance::read_at(device.as_ref(), offset_sectors, 64 * 1024)), started.elapsed())
        })
    };
    let dying_reads: Vec<_> = (0..4).map(|i| read_later(&dying, i * 128)).collect();
    let living_reads: Vec<_> = (0..4).map(|_| read_later(&living, 0)).collect();
    std::thread::sleep(Duration::from_millis(200));
    dying_server.kill();
    for read in dying_reads {
        let (result, elapsed) = read.join().unwrap();
        let error = result.unwrap_err();
        assert!(matches!(request_error(&error), RequestError::ConnectionLost { .. }), "{error}");
        assert!(elapsed < Duration::from_secs(30), "the lost read took {elapsed:?}");
    }
    for read in living_reads {
        let (result, elapsed) = read.join().unwrap();
        assert!(result.unwrap() == data);
        assert!(elapsed >= Duration::from_millis(500), "the read was in flight across the loss");
    }
    assert!(read_ok(living.as_ref(), 0, data.len()) == data);
    // The lost device's connections end when it is dropped; the living ones stay.
    drop(dying);
    wait_for_connections(&reactor, living.connections());
}

/// More requests at once on one connection than the client gathers headers for in one write
/// (4096 reads of 512 bytes: 112 KiB of headers), between writes whose headers go out in
/// front of their data: every read returns its own block.
#[test]
fn thousands_of_requests_at_once_on_one_connection_each_get_their_reply() {
    let test = "thousands_of_requests_at_once_on_one_connection_each_get_their_reply";
    // Reads of the first 2 MiB, writes to the next.
    let size = (4 << 20).to_string();
    let Some(server) = ExternalNbdServer::nbdkit(test, Listen::Unix, &["memory", &size]) else { return };
    let device = open(&server.uri(""), &ConnectOptions { connections_max: 1, ..writable() });
    let data = pattern(23, 2 << 20);
    write_ok(&device, 0, &data);
    let reads = (0..4096u64).map(|i| conformance::read_at(&device, i, 512));
    let writes = (0..8u64).map(|i| conformance::write_at(&device, 4096 + i * 128, &data[..64 * 1024]));
    let (read, written) = block_on(futures_util::future::join(
        futures_util::future::join_all(reads),
        futures_util::future::join_all(writes),
    ));
    for (i, block) in read.into_iter().enumerate() {
        assert!(block.unwrap() == data[i * 512..(i + 1) * 512], "block {i}");
    }
    written.into_iter().for_each(|result| result.unwrap());
    assert!(read_ok(&device, 4096 + 7 * 128, 64 * 1024) == data[..64 * 1024]);
}

/// The warm-up read stays inside what the server allows: whole minimum blocks of the export,
/// one request at most; an empty export is sent nothing. The server refuses anything else
/// (`blocksize-error-policy=error`), failing the warm-up.
#[test]
fn a_warm_up_reads_whole_blocks_inside_the_export_in_one_request() {
    let test = "a_warm_up_reads_whole_blocks_inside_the_export_in_one_request";
    let policy = |size: &str| {
        let args = [
            "--filter=blocksize-policy",
            "memory",
            size,
            "blocksize-minimum=4096",
            "blocksize-preferred=4096",
            "blocksize-maximum=65536",
            "blocksize-error-policy=error",
        ];
        ExternalNbdServer::nbdkit(test, Listen::Unix, &args)
    };
    // 10,000 bytes: 8,192 of whole 4 KiB blocks.
    let Some(short) = policy("10000") else { return };
    let device = open(&short.uri(""), &ConnectOptions::default());
    block_on(device.warm_up(1 << 20)).expect("8 KiB read, not 10,000 bytes or 1 MiB");
    block_on(device.warm_up(4096)).expect("less than asked is never more");
    // 1 MiB: one request of the 64 KiB maximum.
    let Some(long) = policy("1M") else { return };
    let device = open(&long.uri(""), &ConnectOptions::default());
    block_on(device.warm_up(u64::MAX)).expect("64 KiB read, not the export");
    let Some(empty) = ExternalNbdServer::nbdkit(test, Listen::Unix, &["memory", "0"]) else { return };
    let device = open(&empty.uri(""), &ConnectOptions::default());
    block_on(device.warm_up(1 << 20)).expect("nothing to read");
}
