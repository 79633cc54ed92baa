//! The server against this crate's own client (a round trip of every command over several
//! connections) and against hostile clients written byte by byte: truncated handshakes,
//! garbage magic, oversized and out-of-range requests, clients that vanish mid-request.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use kcopyd_core::{BlockDevice, Device, ReadBuf, WriteBuf};
use kcopyd_nbd::{Address, ConnectOptions, NbdDevice, NbdServer, ServerOptions, ServerStats};
use kcopyd_sim::MemDisk;
use tokio::sync::oneshot;

const DISK_SECTORS: u64 = 16 * 1024; // 8 MiB
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_MAGIC: u32 = 0x668e_33ef;

/// A server of `disk` on a unix socket, on a thread of its own; stopped and joined by `stop`.
struct Running {
    uri: String,
    socket: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<ServerStats>>,
    dir: PathBuf,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Running {
    fn start(test: &str, disk: Device, options: ServerOptions) -> Running {
        let dir = std::env::temp_dir().join(format!("kcopyd-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("nbd.sock");
        let server = NbdServer::bind(&Address::Unix(socket.clone()), disk, options).unwrap();
        let uri = server.uri().to_owned();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(server.serve(async move {
                let _ = stopped.await;
            }))
        });
        Running { uri, socket, stop: Some(stop), thread: Some(thread), dir }
    }

    fn stop(mut self) -> ServerStats {
        let _ = self.stop.take().unwrap().send(());
        self.thread.take().unwrap().join().expect("the server does not panic")
    }

    fn raw(&self) -> UnixStream {
        let stream = UnixStream::connect(&self.socket).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        stream
    }
}

fn pattern_disk() -> Arc<MemDisk> {
    Arc::new(MemDisk::with_pattern("disk", DISK_SECTORS, 512, 11))
}

fn block_on<T>(future: impl Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(future)
}

fn read_all(device: &NbdDevice, sector: u64, len: usize) -> Vec<u8> {
    let (buf, result) = block_on(device.read(sector, ReadBuf::with_capacity(len)));
    result.unwrap();
    buf.to_vec()
}

#[test]
fn the_own_client_reads_writes_zeroes_trims_and_asks_block_status_over_several_connections() {
    let disk = pattern_disk();
    let server = Running::start("server-round-trip", disk.clone(), ServerOptions::default());
    let options = ConnectOptions { write: true, ..ConnectOptions::default() };
    let client = NbdDevice::connect(&server.uri, &options).unwrap();
    assert!(client.can_multi_conn() && client.connections() > 1, "multi-conn offered and used");
    assert!(client.structured_replies() && client.has_block_status() && client.has_trim());
    assert_eq!(client.geometry().len_sectors, DISK_SECTORS);
    // Whole disk, in reads split over the connections.
    assert_eq!(read_all(&client, 0, (DISK_SECTORS * 512) as usize), disk.snapshot(0, DISK_SECTORS));
    // Writes, many in flight, then read back.
    let writes = (0..32u64).map(|i| {
        let data = vec![i as u8 + 1; 64 * 1024];
        client.write(i * 256, WriteBuf::from_bytes(data.into()))
    });
    block_on(futures_util::future::join_all(writes)).into_iter().for_each(|r| r.unwrap());
    block_on(client.flush()).unwrap();
    for i in 0..32u64 {
        assert_eq!(disk.snapshot(i * 256, 128), vec![i as u8 + 1; 64 * 1024], "write {i} landed");
    }
    block_on(client.write_zeroes(8, 16)).unwrap();
    assert_eq!(read_all(&client, 8, 16 * 512), vec![0; 16 * 512]);
    block_on(client.trim(1024, 8)).unwrap();
    let extents = block_on(client.block_status(0, DISK_SECTORS)).unwrap();
    assert_eq!(extents.first().unwrap().offset_bytes, 0);
    assert_eq!(extents.iter().map(|e| e.len_bytes).sum::<u64>(), DISK_SECTORS * 512, "the whole range described");
    drop(client);
    let stats = server.stop();
    assert_eq!((stats.connections_broken, stats.errors_replied), (0, 0), "{stats:?}");
}

#[test]
fn a_read_error_comes_back_as_an_error_chunk_and_the_connection_goes_on() {
    let disk = pattern_disk();
    disk.fail_reads(100..101);
    let server = Running::start("server-read-error", disk.clone(), ServerOptions::default());
    let client = NbdDevice::connect(&server.uri, &ConnectOptions::default()).unwrap();
    let (_, result) = block_on(client.read(96, ReadBuf::with_capacity(4096)));
    let error = result.unwrap_err();
    assert!(error.to_string().contains("(errno 5)"), "EIO from the error chunk: {error}");
    assert!(error.to_string().contains("latent sector error"), "with the device's message: {error}");
    assert_eq!(read_all(&client, 0, 4096), disk.snapshot(0, 8), "the connection still serves");
    drop(client);
    assert_eq!(server.stop().errors_replied, 1);
}

/// This server speaks no TLS: `nbds+unix://` to it is refused (`NBD_REP_ERR_UNSUP` to
/// `NBD_OPT_STARTTLS`), never continued in plain text, and the disk is untouched.
#[test]
fn tls_asked_of_the_own_server_is_refused_without_plain_text() {
    let disk = pattern_disk();
    let server = Running::start("server-tls-refused", disk.clone(), ServerOptions::default());
    let tls = format!("{}&tls-verify-peer=false", server.uri.replacen("nbd+unix://", "nbds+unix://", 1));
    let options = ConnectOptions { write: true, ..ConnectOptions::default() };
    match NbdDevice::connect(&tls, &options) {
        Err(kcopyd_nbd::ConnectError::TlsRefused { reply, .. }) => assert_eq!(reply, "NBD_REP_ERR_UNSUP"),
        Err(other) => panic!("{tls}: {other}"),
        Ok(_) => panic!("{tls} was opened in plain text"),
    }
    server.stop();
    assert_eq!(disk.snapshot(0, DISK_SECTORS), pattern_disk().snapshot(0, DISK_SECTORS));
}

#[test]
fn a_read_only_export_refuses_writes_before_any_io() {
    let disk = pattern_disk();
    let options = ServerOptions { read_only: true, ..ServerOptions::default() };
    let server = Running::start("server-read-only", disk.clone(), options);
    let write = ConnectOptions { write: true, ..ConnectOptions::default() };
    assert!(NbdDevice::connect(&server.uri, &write).is_err(), "the client sees NBD_FLAG_READ_ONLY");
    // A raw client that writes anyway gets EPERM, and nothing changes.
    let mut stream = server.raw();
    handshake(&mut stream, false);
    send_request(&mut stream, 0, 1, 7, 0, 512);
    stream.write_all(&[0xee; 512]).unwrap();
    assert_eq!(simple_reply(&mut stream), (1, 7));
    assert_eq!(disk.snapshot(0, 1), pattern_disk().snapshot(0, 1));
    drop(stream);
    server.stop();
}

// ---- hostile clients, byte by byte ----

fn read_n(stream: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut data = vec![0; n];
    stream.read_exact(&mut data).unwrap();
    data
}

fn be32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes(bytes.try_into().unwrap())
}

fn send_option(stream: &mut UnixStream, option: u32, data: &[u8]) {
    let mut out = IHAVEOPT.to_be_bytes().to_vec();
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    stream.write_all(&out).unwrap();
}

/// One option reply: its type and data.
fn option_reply(stream: &mut UnixStream) -> (u32, Vec<u8>) {
    let header = read_n(stream, 20);
    assert_eq!(&header[..8], &0x0003_e889_0455_65a9u64.to_be_bytes());
    let len = be32(&header[16..20]) as usize;
    (be32(&header[12..16]), read_n(stream, len))
}

/// The greeting, then (structured replies if asked) `NBD_OPT_GO` on the default export.
fn handshake(stream: &mut UnixStream, structured: bool) {
    let greeting = read_n(stream, 18);
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    stream.write_all(&3u32.to_be_bytes()).unwrap();
    if structured {
        send_option(stream, 8, &[]);
        assert_eq!(option_reply(stream).0, 1);
    }
    send_option(stream, 7, &[0, 0, 0, 0, 0, 0]);
    loop {
        let (reply, _) = option_reply(stream);
        if reply == 1 {
            break;
        }
        assert_eq!(reply, 3, "NBD_REP_INFO until the ACK");
    }
}

fn send_request(stream: &mut UnixStream, flags: u16, command: u16, cookie: u64, offset: u64, len: u32) {
    let mut out = REQUEST_MAGIC.to_be_bytes().to_vec();
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&command.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    stream.write_all(&out).unwrap();
}

/// A simple reply: (errno, cookie).
fn simple_reply(stream: &mut UnixStream) -> (u32, u64) {
    let reply = read_n(stream, 16);
    assert_eq!(be32(&reply[..4]), SIMPLE_MAGIC);
    (be32(&reply[4..8]), u64::from_be_bytes(reply[8..16].try_into().unwrap()))
}

/// A structured chunk: (flags, type, cookie, payload).
fn chunk(stream: &mut UnixStream) -> (u16, u16, u64, Vec<u8>) {
    let header = read_n(stream, 20);
    assert_eq!(be32(&header[..4]), STRUCTURED_MAGIC);
    let flags = u16::from_be_bytes([header[4], header[5]]);
    let kind = u16::from_be_bytes([header[6], header[7]]);
    let cookie = u64::from_be_bytes(header[8..16].try_into().unwrap());
    let len = be32(&header[16..20]) as usize;
    (flags, kind, cookie, read_n(stream, len))
}

fn is_closed(stream: &mut UnixStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(stream.read(&mut byte), Ok(0) | Err(_))
}

/// The server still serves a well-behaved client, with the disk's data.
fn still_serves(server: &Running, disk: &MemDisk) {
    let client = NbdDevice::connect(&server.uri, &ConnectOptions::default()).unwrap();
    assert_eq!(read_all(&client, 64, 4096), disk.snapshot(64, 8));
}

#[test]
fn truncated_handshakes_and_garbage_magic_end_only_their_own_connection() {
    let disk = pattern_disk();
    let server = Running::start("server-hostile-handshake", disk.clone(), ServerOptions::default());
    // Gone after the greeting, and after half its flags.
    let mut stream = server.raw();
    read_n(&mut stream, 18);
    drop(stream);
    let mut stream = server.raw();
    read_n(&mut stream, 18);
    stream.write_all(&[0, 0]).unwrap();
    drop(stream);
    // Unknown client flags.
    let mut stream = server.raw();
    read_n(&mut stream, 18);
    stream.write_all(&0x8000_0001u32.to_be_bytes()).unwrap();
    assert!(is_closed(&mut stream), "unknown client flags close the connection");
    // An option with the wrong magic.
    let mut stream = server.raw();
    read_n(&mut stream, 18);
    stream.write_all(&1u32.to_be_bytes()).unwrap();
    stream.write_all(&[0x42; 16]).unwrap();
    assert!(is_closed(&mut stream), "garbage option magic closes the connection");
    // An option claiming 4 GiB of data: refused without reading it.
    let mut stream = server.raw();
    read_n(&mut stream, 18);
    stream.write_all(&1u32.to_be_bytes()).unwrap();
    let mut header = IHAVEOPT.to_be_bytes().to_vec();
    header.extend_from_slice(&7u32.to_be_bytes());
    header.extend_from_slice(&u32::MAX.to_be_bytes());
    stream.write_all(&header).unwrap();
    assert_eq!(option_reply(&mut stream).0, 0x8000_0009, "NBD_REP_ERR_TOO_BIG");
    assert!(is_closed(&mut stream));
    // An option whose inner length runs past its data, an unknown option, an unknown export:
    // refused, and the handshake goes on.
    let mut stream = server.raw();
    read_n(&mut stream, 18);
    stream.write_all(&1u32.to_be_bytes()).unwrap();
    send_option(&mut stream, 7, &[0, 0, 1, 0, 0, 0]);
    assert_eq!(option_reply(&mut stream).0, 0x8000_0003, "NBD_REP_ERR_INVALID");
    send_option(&mut stream, 99, &[1, 2, 3]);
    assert_eq!(option_reply(&mut stream).0, 0x8000_0001, "NBD_REP_ERR_UNSUP");
    send_option(&mut stream, 7, &[0, 0, 0, 3, b'x', b'y', b'z', 0, 0]);
    assert_eq!(option_reply(&mut stream).0, 0x8000_0006, "NBD_REP_ERR_UNKNOWN");
    send_option(&mut stream, 10, &[0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(option_reply(&mut stream).0, 0x8000_0003, "SET_META_CONTEXT before structured replies");
    // NBD_OPT_INFO: the export's facts, and the handshake goes on.
    send_option(&mut stream, 6, &[0, 0, 0, 0, 0, 1, 0, 3]);
    let (reply, info) = option_reply(&mut stream);
    assert_eq!((reply, &info[..2], info.len()), (3, &[0u8, 0][..], 12), "NBD_INFO_EXPORT");
    assert_eq!(u64::from_be_bytes(info[2..10].try_into().unwrap()), DISK_SECTORS * 512);
    assert_eq!(option_reply(&mut stream).0, 3, "NBD_INFO_BLOCK_SIZE");
    assert_eq!(option_reply(&mut stream).0, 1, "NBD_REP_ACK");
    send_option(&mut stream, 2, &[]);
    assert_eq!(option_reply(&mut stream).0, 1, "NBD_OPT_ABORT is acknowledged");
    assert!(is_closed(&mut stream));
    still_serves(&server, &disk);
    let stats = server.stop();
    assert!(stats.connections_broken >= 5, "{stats:?}");
}

#[test]
fn oversized_out_of_range_and_misaligned_requests_get_errors_and_nothing_is_written() {
    let disk = pattern_disk();
    let server = Running::start("server-hostile-requests", disk.clone(), ServerOptions::default());
    let mut stream = server.raw();
    handshake(&mut stream, false);
    let end = DISK_SECTORS * 512;
    // A 4 GiB read: refused, nothing allocated (EOVERFLOW).
    send_request(&mut stream, 0, 0, 1, 0, u32::MAX);
    assert_eq!(simple_reply(&mut stream), (75, 1));
    // Past the end, and overflowing 64 bits.
    send_request(&mut stream, 0, 0, 2, end - 512, 1024);
    assert_eq!(simple_reply(&mut stream), (22, 2));
    send_request(&mut stream, 0, 0, 3, u64::MAX - 511, 1024);
    assert_eq!(simple_reply(&mut stream), (22, 3));
    // Misaligned, unknown flags, unknown command.
    send_request(&mut stream, 0, 0, 4, 100, 512);
    assert_eq!(simple_reply(&mut stream), (22, 4));
    send_request(&mut stream, 0x80, 0, 5, 0, 512);
    assert_eq!(simple_reply(&mut stream), (22, 5));
    send_request(&mut stream, 0, 42, 6, 0, 0);
    assert_eq!(simple_reply(&mut stream), (22, 6));
    // A write past the end (ENOSPC) and an oversized write: payloads read and dropped, the
    // connection stays in step.
    send_request(&mut stream, 0, 1, 7, end, 512);
    stream.write_all(&[0xee; 512]).unwrap();
    assert_eq!(simple_reply(&mut stream), (28, 7));
    let big = 33 << 20;
    send_request(&mut stream, 0, 1, 8, 0, big);
    stream.write_all(&vec![0xee; big as usize]).unwrap();
    assert_eq!(simple_reply(&mut stream), (22, 8));
    // Block status without a context.
    send_request(&mut stream, 0, 7, 9, 0, 512);
    assert_eq!(simple_reply(&mut stream), (22, 9));
    // Still in step: a good read.
    send_request(&mut stream, 0, 0, 10, 0, 512);
    assert_eq!(simple_reply(&mut stream), (0, 10));
    assert_eq!(read_n(&mut stream, 512), disk.snapshot(0, 1));
    assert_eq!(disk.snapshot(0, DISK_SECTORS), pattern_disk().snapshot(0, DISK_SECTORS), "nothing written");
    // A request with the wrong magic ends the connection.
    stream.write_all(&[0x13; 28]).unwrap();
    assert!(is_closed(&mut stream));
    still_serves(&server, &disk);
    server.stop();
}

#[test]
fn requests_pipelined_are_all_answered_once_and_a_client_gone_mid_request_harms_nothing() {
    let disk = pattern_disk();
    let server = Running::start("server-pipelined", disk.clone(), ServerOptions::default());
    let mut stream = server.raw();
    handshake(&mut stream, true);
    for cookie in 0..100u64 {
        send_request(&mut stream, 0, 0, cookie, cookie * 4096, 4096);
    }
    let mut seen = [false; 100];
    for _ in 0..100 {
        let (flags, kind, cookie, payload) = chunk(&mut stream);
        assert_eq!((flags, kind), (1, 1), "one OFFSET_DATA chunk with DONE");
        assert_eq!(u64::from_be_bytes(payload[..8].try_into().unwrap()), cookie * 4096);
        assert_eq!(&payload[8..], &disk.snapshot(cookie * 8, 8)[..]);
        assert!(!std::mem::replace(&mut seen[cookie as usize], true), "cookie {cookie} answered twice");
    }
    // A 4 GiB read with structured replies: an error chunk.
    send_request(&mut stream, 0, 0, 500, 0, u32::MAX);
    let (flags, kind, cookie, payload) = chunk(&mut stream);
    assert_eq!((flags, kind, cookie, be32(&payload[..4])), (1, 0x8001, 500, 75));
    // Gone with reads in flight and in the middle of a write's payload.
    for cookie in 0..50u64 {
        send_request(&mut stream, 0, 0, cookie, 0, 1 << 20);
    }
    send_request(&mut stream, 0, 1, 99, 0, 1 << 20);
    stream.write_all(&[0xee; 1000]).unwrap();
    drop(stream);
    thread::sleep(Duration::from_millis(100));
    assert_eq!(disk.snapshot(0, 8), pattern_disk().snapshot(0, 8), "the half-sent write was not written");
    still_serves(&server, &disk);
    server.stop();
}

#[test]
fn connections_past_the_limit_are_closed_and_the_server_stops_with_clients_connected() {
    let disk = pattern_disk();
    let options = ServerOptions { connections_max: 1, ..ServerOptions::default() };
    let server = Running::start("server-connection-limit", disk.clone(), options);
    let mut first = server.raw();
    handshake(&mut first, false);
    let mut second = server.raw();
    assert!(is_closed(&mut second), "the second connection is closed at once");
    // Stopping answers nothing more and returns although a client is still connected.
    let stats = server.stop();
    assert_eq!((stats.connections, stats.connections_refused), (1, 1));
    assert!(is_closed(&mut first));
}

#[test]
fn a_stop_is_not_held_by_clients_stalled_in_the_handshake_mid_payload_or_reading_no_replies() {
    let disk = pattern_disk();
    let server = Running::start("server-stalled-clients", disk.clone(), ServerOptions::default());
    // Greeting read, nothing sent.
    let mut handshaking = server.raw();
    read_n(&mut handshaking, 18);
    // Half a write's payload, then nothing.
    let mut writing = server.raw();
    handshake(&mut writing, false);
    send_request(&mut writing, 0, 1, 1, 0, 1 << 20);
    writing.write_all(&[0xee; 4096]).unwrap();
    // 256 MiB of reads asked for, no reply read: its tasks block on a full socket.
    let mut deaf = server.raw();
    handshake(&mut deaf, false);
    for cookie in 0..64u64 {
        send_request(&mut deaf, 0, 0, cookie, 0, 4 << 20);
    }
    thread::sleep(Duration::from_millis(300));
    let started = std::time::Instant::now();
    let stats = server.stop();
    let took = started.elapsed();
    assert!(took < kcopyd_nbd::DRAIN_TIMEOUT + Duration::from_secs(5), "the stop took {took:?}");
    assert_eq!(stats.connections, 3);
    assert_eq!(disk.snapshot(0, 8), pattern_disk().snapshot(0, 8), "the half-sent write was not written");
    drop((handshaking, writing, deaf));
}

#[test]
fn block_status_tells_holes_from_data_clipped_to_the_request_and_one_extent_with_req_one() {
    let options = kcopyd_sim::MemDiskOptions {
        name: "sparse".into(),
        len_sectors: DISK_SECTORS,
        sparse: true,
        ..kcopyd_sim::MemDiskOptions::default()
    };
    let disk = Arc::new(MemDisk::new(options));
    disk.poke(16, &[5u8; 16 * 512]);
    let server = Running::start("server-block-status", disk, ServerOptions::default());
    let client = NbdDevice::connect(&server.uri, &ConnectOptions::default()).unwrap();
    let extents = block_on(client.block_status(8, 64)).unwrap();
    let seen: Vec<(u64, u64, bool, bool)> =
        extents.iter().map(|e| (e.offset_bytes / 512, e.len_bytes / 512, e.hole, e.zero)).collect();
    assert_eq!(seen, [(8, 8, true, true), (16, 16, false, false), (32, 40, true, true)]);
    drop(client);
    // REQ_ONE, byte-granular offsets, by hand.
    let mut stream = server.raw();
    let greeting = read_n(&mut stream, 18);
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    stream.write_all(&3u32.to_be_bytes()).unwrap();
    send_option(&mut stream, 8, &[]);
    assert_eq!(option_reply(&mut stream).0, 1);
    let mut query = vec![0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 15];
    query.extend_from_slice(b"base:allocation");
    send_option(&mut stream, 10, &query);
    assert_eq!(option_reply(&mut stream).0, 4, "NBD_REP_META_CONTEXT");
    assert_eq!(option_reply(&mut stream).0, 1);
    send_option(&mut stream, 7, &[0, 0, 0, 0, 0, 0]);
    while option_reply(&mut stream).0 != 1 {}
    send_request(&mut stream, 8, 7, 3, 16 * 512 + 100, 64 * 512);
    let (flags, kind, cookie, payload) = chunk(&mut stream);
    assert_eq!((flags, kind, cookie, payload.len()), (1, 5, 3, 12), "one extent with REQ_ONE");
    assert_eq!((be32(&payload[4..8]), be32(&payload[8..12])), (16 * 512 - 100, 0), "data to the run's end");
    drop(stream);
    server.stop();
}

/// An engine started on the reactor's thread (`Reactor::run`) copies between two exports with
/// its callbacks on that thread; a connect from that thread (a callback's) is refused, not a
/// wait for ever; and once the client is shut down, it lets go of the devices and their
/// connections close.
#[test]
fn an_engine_on_the_reactors_thread_copies_and_a_connect_from_there_is_refused() {
    use kcopyd_core::{Client, ClientConfig, Flags, Job, Region};
    let source = pattern_disk();
    let target = Arc::new(MemDisk::zeroed("target", DISK_SECTORS, 512));
    let servers = [
        Running::start("engine-on-reactor-a", source.clone(), ServerOptions::default()),
        Running::start("engine-on-reactor-b", target.clone(), ServerOptions::default()),
    ];
    let reactor = kcopyd_nbd::Reactor::new().unwrap();
    let options = ConnectOptions { write: true, reactor: Some(reactor.clone()), ..ConnectOptions::default() };
    let from: Arc<NbdDevice> = Arc::new(NbdDevice::connect(&servers[0].uri, &options).unwrap());
    let to: Arc<NbdDevice> = Arc::new(NbdDevice::connect(&servers[1].uri, &options).unwrap());
    let client = reactor.run(|| Client::start_in_current_system(ClientConfig::default())).unwrap().unwrap();
    let (called, on_thread) = std::sync::mpsc::channel();
    let (uri, again) = (servers[0].uri.clone(), options.clone());
    let job = Job::copy(Region::new(from, 0, DISK_SECTORS), vec![Region::new(to, 0, DISK_SECTORS)], Flags::empty())
        .on_complete(move |outcome| {
            let refused = matches!(NbdDevice::connect(&uri, &again), Err(kcopyd_nbd::ConnectError::Thread { .. }));
            let _ = called.send((outcome.is_ok(), thread::current().name().map(str::to_owned), refused));
        });
    assert!(client.submit_blocking(job).unwrap().wait().is_ok());
    let (ok, name, refused) = on_thread.recv_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!((ok, name.as_deref(), refused), (true, Some("kcopyd-nbd"), true));
    assert_eq!(target.snapshot(0, DISK_SECTORS), source.snapshot(0, DISK_SECTORS));
    client.shutdown_blocking();
    drop((client, options));
    // The stopped engine let go of its job and the job's devices: their connections close,
    // each with NBD_CMD_DISC.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while reactor.connections_running() != 0 {
        assert!(std::time::Instant::now() < deadline, "{} connections still open", reactor.connections_running());
        thread::sleep(Duration::from_millis(5));
    }
    for server in servers {
        let stats = server.stop();
        assert_eq!(stats.connections_broken, 0, "{stats:?}");
    }
}

#[test]
fn a_server_removes_its_socket_when_dropped_but_not_a_file_that_took_its_name() {
    let dir = std::env::temp_dir().join(format!("kcopyd-socket-name-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("nbd.sock");
    let disk: Device = pattern_disk();
    let server = NbdServer::bind(&Address::Unix(socket.clone()), disk.clone(), ServerOptions::default()).unwrap();
    drop(server);
    assert!(!socket.exists(), "the server's own socket is removed");
    let server = NbdServer::bind(&Address::Unix(socket.clone()), disk, ServerOptions::default()).unwrap();
    std::fs::remove_file(&socket).unwrap();
    std::fs::write(&socket, b"someone else's").unwrap();
    drop(server);
    assert_eq!(std::fs::read(&socket).unwrap(), b"someone else's", "removed by name");
    std::fs::remove_dir_all(&dir).unwrap();
}
