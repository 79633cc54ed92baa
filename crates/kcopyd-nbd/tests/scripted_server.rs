//! The client against a scripted server on a unix socket: what real servers rarely do on
//! demand — replies out of order and in several chunks, a reply that breaks the protocol, a
//! server that vanishes with requests in flight.

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use futures_util::future::join;
use kcopyd_core::{BlockDevice, PagePool, ReadBuf};
use kcopyd_nbd::{ConnectOptions, NbdDevice, RequestError};

const SIZE_BYTES: u64 = 1 << 20;

fn read_u16(stream: &mut UnixStream) -> u16 {
    let mut b = [0; 2];
    stream.read_exact(&mut b).unwrap();
    u16::from_be_bytes(b)
}

fn read_u32(stream: &mut UnixStream) -> u32 {
    let mut b = [0; 4];
    stream.read_exact(&mut b).unwrap();
    u32::from_be_bytes(b)
}

fn read_u64(stream: &mut UnixStream) -> u64 {
    let mut b = [0; 8];
    stream.read_exact(&mut b).unwrap();
    u64::from_be_bytes(b)
}

fn option_reply(stream: &mut UnixStream, option: u32, reply: u32, data: &[u8]) {
    let mut out = 0x0003_e889_0455_65a9u64.to_be_bytes().to_vec();
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    stream.write_all(&out).unwrap();
}

/// The server's side of the handshake: structured replies yes, metadata contexts no, a
/// 1 MiB export with flush.
fn handshake(stream: &mut UnixStream) {
    let mut greeting = 0x4e42_444d_4147_4943u64.to_be_bytes().to_vec();
    greeting.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
    greeting.extend_from_slice(&3u16.to_be_bytes());
    stream.write_all(&greeting).unwrap();
    let _client_flags = read_u32(stream);
    loop {
        assert_eq!(read_u64(stream), 0x4948_4156_454f_5054);
        let option = read_u32(stream);
        let len = read_u32(stream);
        let mut data = vec![0; len as usize];
        stream.read_exact(&mut data).unwrap();
        match option {
            8 => option_reply(stream, 8, 1, &[]),               // STRUCTURED_REPLY: ACK
            10 => option_reply(stream, 10, (1 << 31) | 1, &[]), // SET_META_CONTEXT: ERR_UNSUP
            7 => {
                let mut info = 0u16.to_be_bytes().to_vec();
                info.extend_from_slice(&SIZE_BYTES.to_be_bytes());
                info.extend_from_slice(&(1u16 | 4).to_be_bytes()); // HAS_FLAGS | SEND_FLUSH
                option_reply(stream, 7, 3, &info);
                option_reply(stream, 7, 1, &[]);
                return;
            }
            other => panic!("unexpected option {other}"),
        }
    }
}

/// A read request: (cookie, offset, length).
fn read_request(stream: &mut UnixStream) -> (u64, u64, u32) {
    assert_eq!(read_u32(stream), 0x2560_9513);
    let _flags = read_u16(stream);
    assert_eq!(read_u16(stream), 0, "NBD_CMD_READ");
    (read_u64(stream), read_u64(stream), read_u32(stream))
}

fn chunk(stream: &mut UnixStream, flags: u16, chunk_type: u16, cookie: u64, payload: &[u8]) {
    let mut out = 0x668e_33efu32.to_be_bytes().to_vec();
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&chunk_type.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    stream.write_all(&out).unwrap();
}

fn data_chunk(offset: u64, byte: u8, len: usize) -> Vec<u8> {
    let mut payload = offset.to_be_bytes().to_vec();
    payload.extend(std::iter::repeat_n(byte, len));
    payload
}

/// The socket's directory, removed when dropped.
struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Serves one connection with `script` after the handshake, on a thread.
fn scripted(name: &str, script: impl FnOnce(&mut UnixStream) + Send + 'static) -> (String, Dir) {
    let dir = std::env::temp_dir().join(format!("kcopyd-nbd-scripted-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("s.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        handshake(&mut stream);
        script(&mut stream);
    });
    (format!("nbd+unix:///?socket={}", socket.display()), Dir(dir))
}

fn buf(len_bytes: usize) -> ReadBuf {
    let pages = len_bytes.div_ceil(4096);
    ReadBuf::new(PagePool::new(pages).unwrap().try_alloc(pages).unwrap(), len_bytes)
}

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(future)
}

fn request_error(error: &io::Error) -> &RequestError {
    error.get_ref().and_then(|e| e.downcast_ref::<RequestError>()).unwrap_or_else(|| panic!("{error}"))
}

#[test]
fn replies_out_of_order_and_in_chunks_land_in_their_buffers() {
    let (uri, _dir) = scripted("order", |stream| {
        let first = read_request(stream);
        let second = read_request(stream);
        // The second request first: a hole, then data, then an empty closing chunk.
        let mut hole = (second.1).to_be_bytes().to_vec();
        hole.extend_from_slice(&2048u32.to_be_bytes());
        chunk(stream, 0, 2, second.0, &hole);
        chunk(stream, 0, 1, second.0, &data_chunk(second.1 + 2048, 0xbb, 2048));
        chunk(stream, 1, 0, second.0, &[]);
        // Then the first in one chunk marked done.
        chunk(stream, 1, 1, first.0, &data_chunk(first.1, 0xaa, first.2 as usize));
        thread::sleep(Duration::from_millis(200));
    });
    let device = NbdDevice::connect(&uri, &ConnectOptions::default()).unwrap();
    assert_eq!(device.connections(), 1, "no multi-conn offered");
    let ((first, first_result), (second, second_result)) =
        block_on(join(device.read(0, buf(4096)), device.read(8, buf(4096))));
    first_result.unwrap();
    second_result.unwrap();
    assert!(first.to_vec().iter().all(|&b| b == 0xaa));
    let second = second.to_vec();
    assert!(second[..2048].iter().all(|&b| b == 0) && second[2048..].iter().all(|&b| b == 0xbb));
}

#[test]
fn a_read_reply_that_leaves_bytes_uncovered_is_a_protocol_violation() {
    let (uri, _dir) = scripted("coverage", |stream| {
        let (cookie, offset, _) = read_request(stream);
        chunk(stream, 1, 1, cookie, &data_chunk(offset, 0xcc, 1024));
        thread::sleep(Duration::from_millis(200));
    });
    let device = NbdDevice::connect(&uri, &ConnectOptions::default()).unwrap();
    let (_, result) = block_on(device.read(0, buf(4096)));
    let error = result.unwrap_err();
    assert!(matches!(request_error(&error), RequestError::ProtocolViolation { .. }), "{error}");
    assert!(error.to_string().contains("byte 1024 never sent (1024 of 4096 bytes covered)"), "{error}");
}

#[test]
fn a_server_gone_with_requests_in_flight_fails_them_all_at_once() {
    let (uri, _dir) = scripted("gone", |stream| {
        let _ = read_request(stream);
        let _ = read_request(stream);
        // Half a reply header, then the connection closes.
        stream.write_all(&0x668e_33efu32.to_be_bytes()).unwrap();
    });
    let device = NbdDevice::connect(&uri, &ConnectOptions::default()).unwrap();
    let started = Instant::now();
    let ((_, first), (second_buf, second)) = block_on(join(device.read(0, buf(4096)), device.read(16, buf(8192))));
    assert!(started.elapsed() < Duration::from_secs(10), "no hang");
    for error in [first.unwrap_err(), second.unwrap_err()] {
        assert!(matches!(request_error(&error), RequestError::ConnectionLost { .. }), "{error}");
        assert!(error.to_string().contains("NBD_CMD_READ of bytes"), "{error}");
    }
    assert_eq!(second_buf.len(), 8192, "the buffer comes back");
    // Later requests fail at once too.
    let (_, later) = block_on(device.read(0, buf(4096)));
    assert!(later.unwrap_err().to_string().contains("connection lost"));
}
