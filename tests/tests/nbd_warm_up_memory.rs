//! The warm-up read costs the client no memory of its length: its data is read through a
//! small buffer and dropped. A binary of its own, with one test, so that the process's peak
//! resident memory moves with nothing but this test.

use kcopyd_core::ReadBuf;
use kcopyd_nbd::{ConnectOptions, NbdDevice};
use kcopyd_tests::nbd_servers::{ExternalNbdServer, Listen};

const WARM_UP_BYTES: u64 = 16 << 20;

/// The process's peak resident memory (`VmHWM`), in bytes.
fn peak_resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|line| line.starts_with("VmHWM:")).expect("VmHWM in /proc/self/status");
    let kib: u64 = line.split_whitespace().nth(1).and_then(|kib| kib.parse().ok()).expect("VmHWM: N kB");
    kib << 10
}

#[test]
fn a_16_mib_warm_up_raises_the_clients_peak_memory_by_less_than_4_mib() {
    let test = "a_16_mib_warm_up_raises_the_clients_peak_memory_by_less_than_4_mib";
    let Some(server) = ExternalNbdServer::nbdkit(test, Listen::Unix, &["pattern", "64M"]) else { return };
    let device = NbdDevice::connect(&server.uri(""), &ConnectOptions::default()).unwrap();
    assert!(u64::from(device.payload_bytes_max()) >= WARM_UP_BYTES, "the server takes a 16 MiB read");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let before = peak_resident_bytes();
    runtime.block_on(device.warm_up(WARM_UP_BYTES)).unwrap();
    let grown = peak_resident_bytes() - before;
    assert!(grown < 4 << 20, "the 16 MiB warm-up raised the peak by {grown} bytes");

    // The check of the check: a read of the same length into a buffer of its own does.
    let (buf, result) = runtime.block_on(kcopyd_core::BlockDevice::read(&device, 0, ReadBuf::with_capacity(16 << 20)));
    result.unwrap();
    assert!(peak_resident_bytes() - before >= WARM_UP_BYTES, "a 16 MiB read is resident");
    drop(buf);
}
