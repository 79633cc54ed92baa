//! `kcopyd_nbd` against the misbehaving server of `kcopyd_tests::bad_nbd`, through the
//! library: every misbehaviour is either refused at connect time, or read back exactly, or
//! fails with the error that names what the server did (a protocol violation, a timeout, the
//! server's errno). Nothing the server did not send is ever returned as data.

use std::io;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use kcopyd_core::{BlockDevice, ReadBuf};
use kcopyd_nbd::{ConnectError, ConnectOptions, NbdDevice, RequestError};
use kcopyd_tests::bad_nbd::{BadServer, EIO_RANGE, Expect, Misbehaviour};
use kcopyd_tests::fixtures::pattern;

const DATA_BYTES: usize = 64 << 10;
/// How long one case may take before it counts as hung.
const CASE_TIMEOUT: Duration = Duration::from_secs(30);

fn options() -> ConnectOptions {
    ConnectOptions { write: true, connect_timeout_ms: 2000, io_timeout_ms: Some(2000), ..ConnectOptions::default() }
}

fn block_on<F: Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(future)
}

/// Runs `case` on a thread of its own; a case that outlives [`CASE_TIMEOUT`] fails.
fn bounded<T: Send + 'static>(name: &str, case: impl FnOnce() -> T + Send + 'static) -> T {
    let (done, result) = mpsc::channel();
    thread::spawn(move || {
        let _ = done.send(case());
    });
    result.recv_timeout(CASE_TIMEOUT).unwrap_or_else(|_| panic!("{name}: hung (or panicked) past {CASE_TIMEOUT:?}"))
}

fn request_error(error: &io::Error) -> Option<&RequestError> {
    error.get_ref().and_then(|inner| inner.downcast_ref::<RequestError>())
}

/// Whether `error` says the server broke the protocol (on this request or on the connection).
fn is_violation(error: &io::Error) -> bool {
    match request_error(error) {
        Some(RequestError::ProtocolViolation { .. }) => true,
        Some(RequestError::ConnectionLost { reason, .. }) => reason.contains("protocol violation"),
        _ => false,
    }
}

/// Reads the whole export: the engine's blocks, then the bytes after them.
fn read_all(device: &NbdDevice) -> io::Result<Vec<u8>> {
    let whole_bytes = device.geometry().len_sectors as usize * 512;
    let (buf, result) = block_on(device.read(0, ReadBuf::with_capacity(whole_bytes)));
    result?;
    let mut data = buf.to_vec();
    let tail = device.size_bytes() as usize - whole_bytes;
    data.extend(block_on(device.read_bytes(whole_bytes as u64, tail))?);
    Ok(data)
}

/// One misbehaviour through the library; `Err` says what went wrong.
fn library_case(misbehaviour: Misbehaviour) -> Result<(), String> {
    let data = pattern(0x11b + misbehaviour as u64, DATA_BYTES);
    let server = BadServer::start("lib", misbehaviour, data.clone());
    let device = match (NbdDevice::connect(&server.uri(), &options()), misbehaviour.expect()) {
        (Err(_), Expect::Refused) => return Ok(()),
        (Err(error), _) => return Err(format!("refused at connect time: {error}")),
        // Its whole blocks are usable through the library; its last 488 bytes are refused (the
        // command refuses the export for a copy of all of it).
        (Ok(device), Expect::Refused) if misbehaviour == Misbehaviour::OddSizeMin512 => {
            let tail = block_on(device.read_bytes(512, 488)).unwrap_err();
            return match request_error(&tail) {
                Some(RequestError::Refused { .. }) => Ok(()),
                _ => Err(format!("the tail read failed otherwise: {tail}")),
            };
        }
        (Ok(device), Expect::Refused) => {
            return Err(format!("opened ({} bytes), should be refused", device.size_bytes()));
        }
        (Ok(device), _) => device,
    };
    if misbehaviour.is_write() {
        let written = pattern(0x3417, DATA_BYTES);
        let result = block_on(device.write(0, kcopyd_core::WriteBuf::from_bytes(written.into())));
        return match result {
            Ok(()) => Err("a write the server failed or never answered succeeded".into()),
            Err(error) => check_failure(misbehaviour, &error),
        };
    }
    let size = misbehaviour.size_bytes(DATA_BYTES as u64) as usize;
    let allocated = block_on(device.allocated(0, device.geometry().len_sectors));
    let read = read_all(&device);
    match (misbehaviour.expect(), &allocated, &read) {
        (Expect::Copied, Ok(_), Ok(read)) if read[..] == data[..size] => Ok(()),
        (Expect::Failed, _, Ok(read)) if read[..] != data[..size] => {
            Err("returned data the server did not send".into())
        }
        (Expect::Failed, Err(error), _) if misbehaviour.is_block_status() && is_violation(error) => Ok(()),
        (Expect::Failed, _, Err(error)) => check_failure(misbehaviour, error),
        _ => Err(format!("allocated {allocated:?}, read {:?}", read.as_ref().map(|r| r.len()))),
    }
}

/// Whether a failed read failed the way `misbehaviour` calls for.
fn check_failure(misbehaviour: Misbehaviour, error: &io::Error) -> Result<(), String> {
    use Misbehaviour::*;
    let right = match misbehaviour {
        MissingDone | StallBeforeReply | StallMidPayload | SlowDrip | StallOnWrite | OddSizeStallTail => {
            error.kind() == io::ErrorKind::TimedOut
        }
        ErrorWithoutDone | WriteEioOnRange => request_error(error).and_then(RequestError::server_errno) == Some(5),
        EioOnRange => {
            request_error(error).and_then(RequestError::server_errno) == Some(5)
                && error.to_string().contains(&format!("at byte {}", EIO_RANGE.start))
        }
        CloseMidReply => matches!(request_error(error), Some(RequestError::ConnectionLost { .. })),
        _ => is_violation(error),
    };
    if right { Ok(()) } else { Err(format!("failed otherwise than expected: {error}")) }
}

#[test]
fn every_misbehaviour_is_refused_read_exactly_or_named() {
    let cases: Vec<_> = Misbehaviour::ALL
        .iter()
        .map(|&m| (m, thread::spawn(move || bounded(&format!("{m:?}"), move || library_case(m)))))
        .collect();
    let failures: Vec<String> = cases
        .into_iter()
        .filter_map(|(m, case)| match case.join() {
            Ok(Ok(())) => None,
            Ok(Err(problem)) => Some(format!("{m:?} ({}): {problem}", m.describe())),
            Err(_) => Some(format!("{m:?}: panicked")),
        })
        .collect();
    assert!(failures.is_empty(), "{} cases failed:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn a_read_whose_first_half_comes_twice_is_a_protocol_violation_not_data() {
    let server = BadServer::start("overlap", Misbehaviour::ReadOverlap, pattern(1, DATA_BYTES));
    let device = NbdDevice::connect(&server.uri(), &ConnectOptions::default()).unwrap();
    let mut buf = ReadBuf::with_capacity(8192);
    buf.fill(0xee);
    let (_, result) = block_on(device.read(0, buf));
    let error = result.unwrap_err();
    let Some(RequestError::ProtocolViolation { problem, .. }) = request_error(&error) else { panic!("{error}") };
    assert!(problem.contains("overlaps bytes 0..4096"), "{problem}");
}

#[test]
fn block_status_for_another_context_or_in_two_chunks_is_refused() {
    for (misbehaviour, words) in [
        (Misbehaviour::BlockStatusWrongContext, "metadata context 2"),
        (Misbehaviour::BlockStatusTwoChunks, "a second block-status chunk"),
        (Misbehaviour::BlockStatusBeyondRequest, "extent"),
        (Misbehaviour::BlockStatusZeroLengthExtent, "extent of 0 bytes"),
        (Misbehaviour::BlockStatusEmpty, "block-status chunk of 4 bytes"),
    ] {
        let server = BadServer::start("status", misbehaviour, pattern(2, DATA_BYTES));
        let device = NbdDevice::connect(&server.uri(), &ConnectOptions::default()).unwrap();
        let error = block_on(device.block_status(0, 128)).unwrap_err();
        let Some(RequestError::ProtocolViolation { problem, .. }) = request_error(&error) else {
            panic!("{misbehaviour:?}: {error}")
        };
        assert!(problem.contains(words), "{misbehaviour:?}: {problem}");
    }
}

#[test]
fn an_endless_reply_is_cut_off_by_its_bound_without_any_timeout() {
    let server = BadServer::start("endless", Misbehaviour::EndlessChunks, pattern(3, DATA_BYTES));
    let uri = server.uri();
    let started = Instant::now();
    let error = bounded("endless", move || {
        let device = NbdDevice::connect(&uri, &ConnectOptions::default()).unwrap();
        block_on(device.read(0, ReadBuf::with_capacity(4096))).1.unwrap_err()
    });
    let Some(RequestError::ProtocolViolation { problem, .. }) = request_error(&error) else { panic!("{error}") };
    assert!(problem.contains("bytes besides data"), "{problem} after {:?}", started.elapsed());
}

#[test]
fn errno_zero_and_replies_of_the_wrong_kind_are_protocol_violations() {
    for (misbehaviour, words) in [
        (Misbehaviour::ErrnoZero, "errno 0"),
        (Misbehaviour::SimpleReplyWhenStructured, "structured replies were agreed"),
        (Misbehaviour::StructuredWhenNotAgreed, "structured replies were not agreed"),
        (Misbehaviour::ErrorOffsetOutsideRequest, "outside the request"),
    ] {
        let server = BadServer::start("kinds", misbehaviour, pattern(4, DATA_BYTES));
        let device = NbdDevice::connect(&server.uri(), &ConnectOptions::default()).unwrap();
        let (_, result) = block_on(device.read(0, ReadBuf::with_capacity(4096)));
        let error = result.unwrap_err();
        assert!(is_violation(&error) && error.to_string().contains(words), "{misbehaviour:?}: {error}");
    }
}

#[test]
fn extra_connections_with_other_block_sizes_or_flags_are_refused() {
    for misbehaviour in [Misbehaviour::MultiConnDifferentBlockSizes, Misbehaviour::MultiConnDifferentFlags] {
        let server = BadServer::start("multi", misbehaviour, pattern(5, DATA_BYTES));
        let error = NbdDevice::connect(&server.uri(), &ConnectOptions::default()).unwrap_err();
        assert!(matches!(error, ConnectError::Inconsistent { index: 1, .. }), "{misbehaviour:?}: {error}");
    }
    let server = BadServer::start("multi", Misbehaviour::MultiConnRefuseExtra, pattern(5, DATA_BYTES));
    let device = NbdDevice::connect(&server.uri(), &ConnectOptions::default()).unwrap();
    assert_eq!(device.connections(), 1, "the connections the server took");
}

#[test]
fn an_odd_sized_export_gives_every_byte_when_its_minimum_block_allows() {
    let data = pattern(6, DATA_BYTES);
    let server = BadServer::start("odd", Misbehaviour::OddSizeMinOne, data.clone());
    let options = ConnectOptions { write: true, ..ConnectOptions::default() };
    let device = NbdDevice::connect(&server.uri(), &options).unwrap();
    assert_eq!((device.size_bytes(), device.geometry().len_sectors, device.min_block_bytes()), (1000, 1, 1));
    assert_eq!(block_on(device.read_bytes(512, 488)).unwrap(), data[512..1000]);
    block_on(device.write_bytes(999, &[0x42])).unwrap();
    assert_eq!(server.data()[999], 0x42);
    let past = block_on(device.read_bytes(512, 489)).unwrap_err();
    assert!(matches!(request_error(&past), Some(RequestError::Refused { .. })), "{past}");

    let server = BadServer::start("odd512", Misbehaviour::OddSizeMin512, data);
    let error = NbdDevice::connect(&server.uri(), &ConnectOptions::default()).map(|d| d.size_bytes());
    // Opened (its whole blocks are usable), but its last 488 bytes are out of reach.
    let device = NbdDevice::connect(&server.uri(), &ConnectOptions::default()).unwrap();
    let tail = block_on(device.read_bytes(512, 488)).unwrap_err();
    assert!(tail.to_string().contains("512-byte minimum block size"), "{tail} ({error:?})");
}

#[test]
fn a_stalled_server_fails_the_request_within_the_io_timeout_and_returns_the_buffer() {
    let server = BadServer::start("stall", Misbehaviour::StallBeforeReply, pattern(7, DATA_BYTES));
    let options = ConnectOptions { io_timeout_ms: Some(300), ..ConnectOptions::default() };
    let device = NbdDevice::connect(&server.uri(), &options).unwrap();
    let started = Instant::now();
    let (buf, result) = block_on(device.read(0, ReadBuf::with_capacity(4096)));
    let error = result.unwrap_err();
    assert_eq!(error.kind(), io::ErrorKind::TimedOut, "{error}");
    assert!(error.to_string().contains("within 300 ms"), "{error}");
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    assert_eq!(buf.len(), 4096, "the buffer came back");
}

#[test]
fn a_last_extent_past_the_request_is_cut_at_its_end() {
    let server =
        BadServer::start("last-extent", Misbehaviour::BlockStatusLastExtentPastRequest, pattern(8, DATA_BYTES));
    let device = NbdDevice::connect(&server.uri(), &ConnectOptions::default()).unwrap();
    let extents = block_on(device.block_status(8, 16)).unwrap();
    let described: u64 = extents.iter().map(|e| e.len_bytes).sum();
    assert_eq!((extents[0].offset_bytes, described), (4096, 8192), "{extents:?}");
}

#[test]
fn hole_chunks_zero_exactly_their_bytes() {
    let mut data = pattern(9, DATA_BYTES);
    data[1024..3072].fill(0);
    data[8192..8704].fill(0);
    let server = BadServer::start("holes", Misbehaviour::HolesForZeroes, data.clone());
    let device = NbdDevice::connect(&server.uri(), &ConnectOptions::default()).unwrap();
    let mut buf = ReadBuf::with_capacity(16384);
    buf.fill(0xee);
    let (buf, result) = block_on(device.read(0, buf));
    result.unwrap();
    assert!(buf.to_vec() == data[..16384], "holes zeroed, data placed, nothing of the old buffer left");
}

/// Requests refused before anything is sent name the rule they break, typed: the geometry's
/// (misaligned, past the end: `InvalidInput`, EINVAL, as on every backend), a read-only export
/// (`PermissionDenied`), a byte request past the export.
#[test]
fn refusals_name_the_rule_broken_and_send_nothing() {
    use kcopyd_core::{RequestRefused, WriteBuf};
    use kcopyd_nbd::Refusal;

    let server = BadServer::start("refusals", Misbehaviour::WellBehaved, pattern(7, DATA_BYTES));
    let device = NbdDevice::connect(&server.uri(), &options()).unwrap();
    let sectors = (DATA_BYTES / 512) as u64;
    let problem = |error: &io::Error| match request_error(error) {
        Some(RequestError::Refused { problem, .. }) => problem.clone(),
        _ => panic!("not a refusal: {error}"),
    };
    let past = block_on(device.write(sectors, WriteBuf::zeroes(512))).unwrap_err();
    assert_eq!(past.kind(), io::ErrorKind::InvalidInput, "{past}");
    let out = RequestRefused::OutOfRange { offset_sectors: sectors, len_bytes: 512, device_sectors: sectors };
    assert_eq!(problem(&past), Refusal::Geometry(out));
    let everything = block_on(device.write_zeroes(1, u64::MAX)).unwrap_err();
    assert!(matches!(problem(&everything), Refusal::Geometry(RequestRefused::OutOfRange { .. })), "{everything}");
    let (_, odd) = block_on(device.read(0, ReadBuf::with_capacity(100)));
    let odd = odd.unwrap_err();
    assert!(matches!(problem(&odd), Refusal::Geometry(RequestRefused::Misaligned { .. })), "{odd}");
    let bytes_past = block_on(device.read_bytes(DATA_BYTES as u64, 1)).unwrap_err();
    assert!(matches!(problem(&bytes_past), Refusal::PastTheExport { .. }), "{bytes_past}");

    let reader = NbdDevice::connect(&server.uri(), &ConnectOptions { write: false, ..options() }).unwrap();
    let read_only = block_on(reader.write(0, WriteBuf::zeroes(512))).unwrap_err();
    assert_eq!(read_only.kind(), io::ErrorKind::PermissionDenied, "{read_only}");
    assert_eq!(problem(&read_only), Refusal::ReadOnly);
    assert_eq!(server.data(), pattern(7, DATA_BYTES), "nothing was written");
}

/// A warm-up read drops its data, but its reply is checked as any read's: legal replies
/// (simple, out of order, holes) leave the connection in step, so that a read after it gets
/// exactly its bytes; a reply with an overlap, a gap, a chunk past the request or a chunk sent
/// twice fails it as a protocol violation.
#[test]
fn a_warm_up_drops_its_data_but_checks_its_reply_as_any_read() {
    use Misbehaviour::*;
    let legal = [WellBehaved, SimpleRepliesOnly, ChunksOutOfOrder, HolesForZeroes];
    let broken = [ReadOverlap, ReadGap, ReadChunkBeyondRequest, ReadDuplicateChunk];
    for misbehaviour in legal.into_iter().chain(broken) {
        let outcome = bounded(&format!("{misbehaviour:?}"), move || {
            let data = pattern(0x3a7 + misbehaviour as u64, DATA_BYTES);
            let server = BadServer::start("warm-up", misbehaviour, data.clone());
            let device = NbdDevice::connect(&server.uri(), &options()).unwrap();
            let warmed = block_on(device.warm_up(DATA_BYTES as u64));
            let after = warmed.is_ok().then(|| read_all(&device).map(|read| read == data));
            (warmed.map_err(|error| (is_violation(&error), error.to_string())), after)
        });
        match (legal.contains(&misbehaviour), outcome) {
            (true, (Ok(()), Some(Ok(true)))) => {}
            (false, (Err((true, _)), None)) => {}
            (_, outcome) => panic!("{misbehaviour:?} ({}): {outcome:?}", misbehaviour.describe()),
        }
    }
}
