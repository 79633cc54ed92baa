//! TLS (`nbds://`, `nbds+unix://`) against real servers that require it — `nbdkit --tls=require`
//! and `qemu-nbd --tls-creds` — with certificates made here by certtool (`tls_certs`): the
//! conformance suite and engine copies through TLS, a client certificate, and every refusal:
//! a wrong CA, an expired certificate, a certificate for another name, a server without TLS
//! when TLS was asked for, a plain URI to a server that requires TLS, a server that agrees to
//! TLS and then speaks plain text. A missing server or certtool prints `SKIPPED:`.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::Duration;

use kcopyd_core::{BlockDevice, Client, ClientConfig, Device, Flags, Job, Region};
use kcopyd_nbd::{ConnectError, ConnectOptions, NbdDevice, TlsError};
use kcopyd_os::{OpenOptions, OsDevice};
use kcopyd_tests::conformance::{self, DEVICE_SECTORS_MIN, read_ok, write_ok};
use kcopyd_tests::fixtures::{TempDir, pattern};
use kcopyd_tests::nbd_servers::{ExternalNbdServer, Listen};
use kcopyd_tests::tls_certs::{ServerCert, TestPki, Trust};

const DEVICE_BYTES: u64 = DEVICE_SECTORS_MIN * 512;

fn writable() -> ConnectOptions {
    ConnectOptions { write: true, ..ConnectOptions::default() }
}

/// The server's URI for `export` with the TLS scheme and `params` in its query.
fn tls_uri(server: &ExternalNbdServer, export: &str, params: &[String]) -> String {
    let mut uri = server.uri(export).replacen("nbd", "nbds", 1);
    for param in params {
        uri.push(if uri.contains('?') { '&' } else { '?' });
        uri.push_str(param);
    }
    uri
}

fn certificates(dir: &Path) -> String {
    format!("tls-certificates={}", dir.display())
}

/// `nbdkit --tls=require` with the certificates of `server_dir`, serving `memory SIZE`.
fn nbdkit_tls(test: &str, listen: Listen, server_dir: &Path, size: &str) -> Option<ExternalNbdServer> {
    let certificates = format!("--tls-certificates={}", server_dir.display());
    ExternalNbdServer::nbdkit(test, listen, &["--tls=require", &certificates, "memory", size])
}

fn connect(uri: &str, options: &ConnectOptions) -> NbdDevice {
    NbdDevice::connect(uri, options).unwrap_or_else(|error| panic!("connecting to {uri}: {error}"))
}

fn refused(uri: &str, options: &ConnectOptions) -> ConnectError {
    match NbdDevice::connect(uri, options) {
        Ok(_) => panic!("{uri} was opened"),
        Err(error) => {
            // The messages are what a user reads: shown with --no-capture.
            eprintln!("refused: {error}");
            error
        }
    }
}

/// Whether the export reads as zeroes, through a client that trusts the server: nothing was
/// written by a connection that was refused.
fn assert_still_zeroes(uri: &str, len_bytes: usize) {
    let device = connect(uri, &ConnectOptions::default());
    assert!(read_ok(&device, 0, len_bytes).iter().all(|&byte| byte == 0), "{uri} was written");
}

// ---- working TLS ---------------------------------------------------------------------------

#[test]
fn conformance_over_tls_to_nbdkit_on_a_unix_socket() {
    let test = "conformance_over_tls_to_nbdkit_on_a_unix_socket";
    let Some(pki) = TestPki::new(test) else { return };
    let server_dir = pki.server("server", ServerCert::default());
    let Some(server) = nbdkit_tls(test, Listen::Unix, &server_dir, &DEVICE_BYTES.to_string()) else { return };
    let client_dir = pki.client("client", Trust::OurCa, false);
    // A unix socket has no host: the certificate is checked for "localhost".
    let device = connect(&tls_uri(&server, "", &[certificates(&client_dir)]), &writable());
    assert!(device.structured_replies(), "the handshake went on inside TLS");
    conformance::run_all(&device);
}

/// Engine copies file → nbds (4 connections, each its own TLS session) → file, byte-exact;
/// the certificate directory comes from `ConnectOptions::tls` (the URI gives none).
#[test]
fn engine_copies_through_tls_on_every_connection_are_byte_exact() {
    let test = "engine_copies_through_tls_on_every_connection_are_byte_exact";
    let Some(pki) = TestPki::new(test) else { return };
    let server_dir = pki.server("server", ServerCert::default());
    let Some(server) = nbdkit_tls(test, Listen::Tcp, &server_dir, "16M") else { return };
    let dir = TempDir::new(test);
    let data = pattern(71, 16 << 20);
    let source_file = dir.file_with("source.img", &data);
    let back_file = dir.zero_file("back.img", data.len() as u64);
    let mut options = writable();
    options.tls.certificates = Some(pki.client("client", Trust::OurCa, false));
    let remote = connect(&tls_uri(&server, "", &[]), &options);
    assert_eq!(remote.connections(), 4, "nbdkit's memory plugin allows multi-conn");
    let remote: Device = std::sync::Arc::new(remote);
    let open_file = |path: &Path| -> Device {
        std::sync::Arc::new(OsDevice::open(path, &OpenOptions { write: true, ..OpenOptions::default() }).unwrap())
    };
    let len_sectors = data.len() as u64 / 512;
    for (source, target) in [(open_file(&source_file), remote.clone()), (remote.clone(), open_file(&back_file))] {
        let client = Client::new(ClientConfig::default()).unwrap();
        let job = Region::new(source, 0, len_sectors);
        let handle = client
            .submit_blocking(Job::copy(job, vec![Region::new(target, 0, len_sectors)], Flags::default()))
            .unwrap();
        let outcome = handle.wait();
        client.shutdown_blocking();
        assert!(outcome.is_ok(), "{outcome:?}");
    }
    assert!(fs::read(&back_file).unwrap() == data, "the round trip through TLS changed the data");
}

/// qemu-nbd verifies its clients (`verify-peer=on`): a client certificate issued by the CA is
/// taken, and the data lands in qemu-nbd's file.
#[test]
fn qemu_nbd_with_tls_creds_takes_a_client_certificate() {
    let test = "qemu_nbd_with_tls_creds_takes_a_client_certificate";
    let Some(pki) = TestPki::new(test) else { return };
    let server_dir = pki.server("server", ServerCert::default());
    let dir = TempDir::new(test);
    let file = dir.zero_file("export.img", DEVICE_BYTES);
    let object = format!("tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=on", server_dir.display());
    let extra = ["--object", &object, "--tls-creds", "tls0"];
    let Some(server) = ExternalNbdServer::qemu_nbd(test, &file, Listen::Tcp, &extra) else { return };
    let with_identity = pki.client("with-identity", Trust::OurCa, true);
    let device = connect(&tls_uri(&server, "", &[certificates(&with_identity)]), &writable());
    let data = pattern(5, 64 * 1024);
    write_ok(&device, 8, &data);
    kcopyd_tests::conformance::block_on(device.flush()).unwrap();
    drop(device);
    assert!(fs::read(&file).unwrap()[4096..4096 + data.len()] == data[..], "qemu-nbd's file holds the data");

    // Without a client certificate qemu-nbd ends the session: a TLS error saying so.
    let without = pki.client("without-identity", Trust::OurCa, false);
    let error = refused(&tls_uri(&server, "", &[certificates(&without)]), &ConnectOptions::default());
    let ConnectError::TlsHandshake { hint: Some(hint), .. } = &error else { panic!("{error}") };
    assert!(hint.contains("client certificate"), "{error}");
}

/// `tls-verify-peer=false`: a certificate from a CA the client does not know is taken (the
/// session is still encrypted), with no tls-certificates at all.
#[test]
fn verify_peer_false_takes_an_unknown_certificate() {
    let test = "verify_peer_false_takes_an_unknown_certificate";
    let Some(pki) = TestPki::new(test) else { return };
    let server_dir = pki.server("server", ServerCert { by_other_ca: true, ..ServerCert::default() });
    let Some(server) = nbdkit_tls(test, Listen::Tcp, &server_dir, "1M") else { return };
    let device = connect(&tls_uri(&server, "", &["tls-verify-peer=false".into()]), &writable());
    write_ok(&device, 0, &pattern(3, 4096));
    assert_eq!(read_ok(&device, 0, 4096), pattern(3, 4096));
    // The same server with verification on is refused.
    let trusting_ours = pki.client("client", Trust::OurCa, false);
    let error = refused(&tls_uri(&server, "", &[certificates(&trusting_ours)]), &ConnectOptions::default());
    assert!(matches!(error, ConnectError::TlsHandshake { .. }), "{error}");
}

/// Many large reads and writes at once on one TLS connection: the server blocks writing read
/// replies until the client reads them, while the client's socket is full of writes. The
/// client must read whatever its write side is waiting for (a read side that first waits to
/// send its pending records would deadlock with the server).
#[test]
fn reads_and_writes_at_once_on_one_tls_connection_do_not_deadlock() {
    let test = "reads_and_writes_at_once_on_one_tls_connection_do_not_deadlock";
    let Some(pki) = TestPki::new(test) else { return };
    let server_dir = pki.server("server", ServerCert::default());
    // One server thread: while it writes a read reply it reads nothing.
    let certificates_arg = format!("--tls-certificates={}", server_dir.display());
    let args = ["--threads=1", "--tls=require", &certificates_arg, "memory", "64M"];
    let Some(server) = ExternalNbdServer::nbdkit(test, Listen::Unix, &args) else { return };
    let client_dir = pki.client("client", Trust::OurCa, false);
    let options = ConnectOptions { connections_max: 1, ..writable() };
    let device = connect(&tls_uri(&server, "", &[certificates(&client_dir)]), &options);
    const PIECE_BYTES: usize = 4 << 20;
    let data = pattern(9, PIECE_BYTES);
    write_ok(&device, 0, &data);
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let piece_sectors = (PIECE_BYTES / 512) as u64;
        let work = (0..16u64).map(|index| {
            let (device, data) = (&device, &data);
            async move {
                if index % 2 == 0 {
                    let read = conformance::read_at(device, 0, PIECE_BYTES).await.unwrap();
                    assert!(read == *data, "read {index} came back wrong");
                } else {
                    conformance::write_at(device, index * piece_sectors, data).await.unwrap();
                }
            }
        });
        conformance::block_on(futures_util::future::join_all(work));
        let _ = done.send(());
    });
    finished.recv_timeout(Duration::from_secs(120)).expect("64 MiB of reads and writes at once finish");
}

// ---- refusals ------------------------------------------------------------------------------

#[test]
fn a_server_certificate_from_another_ca_is_refused() {
    let test = "a_server_certificate_from_another_ca_is_refused";
    let Some(pki) = TestPki::new(test) else { return };
    let server_dir = pki.server("server", ServerCert::default());
    let Some(server) = nbdkit_tls(test, Listen::Tcp, &server_dir, "1M") else { return };
    let wrong_ca = pki.client("wrong-ca", Trust::OtherCa, false);
    let error = refused(&tls_uri(&server, "", &[certificates(&wrong_ca)]), &writable());
    let ConnectError::TlsHandshake { hint: Some(hint), .. } = &error else { panic!("{error}") };
    assert!(hint.contains("not signed by a trusted CA"), "{error}");
    let right_ca = pki.client("right-ca", Trust::OurCa, false);
    assert_still_zeroes(&tls_uri(&server, "", &[certificates(&right_ca)]), 4096);
}

#[test]
fn an_expired_server_certificate_is_refused() {
    let test = "an_expired_server_certificate_is_refused";
    let Some(pki) = TestPki::new(test) else { return };
    let server_dir = pki.server("server", ServerCert { expired: true, ..ServerCert::default() });
    let Some(server) = nbdkit_tls(test, Listen::Unix, &server_dir, "1M") else { return };
    let client_dir = pki.client("client", Trust::OurCa, false);
    let error = refused(&tls_uri(&server, "", &[certificates(&client_dir)]), &writable());
    let ConnectError::TlsHandshake { hint: Some(hint), .. } = &error else { panic!("{error}") };
    assert!(hint.contains("expired"), "{error}");
}

/// A certificate for `disk.example` only: refused at 127.0.0.1, taken with
/// `tls-hostname=disk.example`.
#[test]
fn a_certificate_for_another_name_is_refused_unless_tls_hostname_names_it() {
    let test = "a_certificate_for_another_name_is_refused_unless_tls_hostname_names_it";
    let Some(pki) = TestPki::new(test) else { return };
    let server_dir = pki.server("server", ServerCert { names: &["disk.example"], ..ServerCert::default() });
    let Some(server) = nbdkit_tls(test, Listen::Tcp, &server_dir, "1M") else { return };
    let client_dir = pki.client("client", Trust::OurCa, false);
    let error = refused(&tls_uri(&server, "", &[certificates(&client_dir)]), &writable());
    let ConnectError::TlsHandshake { hint: Some(hint), .. } = &error else { panic!("{error}") };
    assert!(hint.contains("another name"), "{error}");
    let named = [certificates(&client_dir), "tls-hostname=disk.example".into()];
    let device = connect(&tls_uri(&server, "", &named), &ConnectOptions::default());
    assert_eq!(device.size_bytes(), 1 << 20);
}

/// nbds:// to servers without TLS (nbdkit, qemu-nbd): refused, never plain text, nothing written.
#[test]
fn tls_asked_of_a_server_without_tls_is_refused_without_falling_back() {
    let test = "tls_asked_of_a_server_without_tls_is_refused_without_falling_back";
    let Some(pki) = TestPki::new(test) else { return };
    let client_dir = pki.client("client", Trust::OurCa, false);
    let Some(nbdkit) = ExternalNbdServer::nbdkit(test, Listen::Unix, &["memory", "1M"]) else { return };
    let error = refused(&tls_uri(&nbdkit, "", &[certificates(&client_dir)]), &writable());
    let ConnectError::TlsRefused { reply, .. } = &error else { panic!("{error}") };
    assert!(reply.starts_with("NBD_REP_ERR_"), "{error}");
    assert!(error.to_string().contains("not falling back to plain text"), "{error}");
    assert_still_zeroes(&nbdkit.uri(""), 4096);

    let dir = TempDir::new(test);
    let file = dir.zero_file("export.img", DEVICE_BYTES);
    let Some(qemu) = ExternalNbdServer::qemu_nbd(test, &file, Listen::Tcp, &[]) else { return };
    let error = refused(&tls_uri(&qemu, "", &[certificates(&client_dir)]), &writable());
    assert!(matches!(error, ConnectError::TlsRefused { .. }), "{error}");
}

/// nbd:// (plain) to servers that require TLS: a clear message naming the nbds:// URI.
#[test]
fn a_plain_uri_to_a_server_that_requires_tls_says_to_use_nbds() {
    let test = "a_plain_uri_to_a_server_that_requires_tls_says_to_use_nbds";
    let Some(pki) = TestPki::new(test) else { return };
    let server_dir = pki.server("server", ServerCert::default());
    let Some(nbdkit) = nbdkit_tls(test, Listen::Tcp, &server_dir, "1M") else { return };
    let plain = nbdkit.uri("");
    let error = refused(&plain, &writable());
    let ConnectError::TlsRequired { tls_uri, .. } = &error else { panic!("{error}") };
    assert_eq!(*tls_uri, plain.replacen("nbd://", "nbds://", 1));
    assert!(error.to_string().contains("the server requires TLS"), "{error}");

    let dir = TempDir::new(test);
    let file = dir.zero_file("export.img", DEVICE_BYTES);
    let object = format!("tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=off", server_dir.display());
    let extra = ["--object", &object, "--tls-creds", "tls0"];
    let Some(qemu) = ExternalNbdServer::qemu_nbd(test, &file, Listen::Unix, &extra) else { return };
    let error = refused(&qemu.uri(""), &writable());
    let ConnectError::TlsRequired { tls_uri, .. } = &error else { panic!("{error}") };
    assert!(tls_uri.starts_with("nbds+unix:///"), "{error}");
}

/// A scripted server on `socket`: the greeting, then `reply` (type, data) to the first option,
/// followed by `after` (bytes where the TLS handshake should be). It returns the option and
/// the first byte the client sent after the reply (`None`: it hung up).
fn starttls_liar(socket: &Path, reply: (u32, Vec<u8>), after: Vec<u8>) -> std::thread::JoinHandle<(u32, Option<u8>)> {
    let listener = UnixListener::bind(socket).unwrap();
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut greeting = 0x4e42_444d_4147_4943u64.to_be_bytes().to_vec();
        greeting.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
        greeting.extend_from_slice(&1u16.to_be_bytes());
        stream.write_all(&greeting).unwrap();
        let mut client_flags_and_option = [0u8; 4 + 16];
        stream.read_exact(&mut client_flags_and_option).unwrap();
        let option = u32::from_be_bytes(client_flags_and_option[12..16].try_into().unwrap());
        let mut message = 0x0003_e889_0455_65a9u64.to_be_bytes().to_vec();
        message.extend_from_slice(&option.to_be_bytes());
        message.extend_from_slice(&reply.0.to_be_bytes());
        message.extend_from_slice(&(reply.1.len() as u32).to_be_bytes());
        message.extend_from_slice(&reply.1);
        message.extend_from_slice(&after);
        stream.write_all(&message).unwrap();
        let mut next = [0u8; 1];
        let sent = stream.read(&mut next).ok().filter(|&read| read == 1).map(|_| next[0]);
        (option, sent)
    })
}

/// A server that agrees to NBD_OPT_STARTTLS and then goes on in plain text: the TLS handshake
/// fails, and the client never sends an option in plain text after asking for TLS.
#[test]
fn a_server_that_agrees_to_tls_then_speaks_plain_text_is_refused() {
    let test = "a_server_that_agrees_to_tls_then_speaks_plain_text_is_refused";
    let dir = TempDir::new(test);
    let socket = dir.join("liar.sock");
    // ACK to STARTTLS, then a plain NBD option reply where the TLS ServerHello should be.
    let mut plain_reply = 0x0003_e889_0455_65a9u64.to_be_bytes().to_vec();
    plain_reply.extend_from_slice(&[0, 0, 0, 5, 0, 0, 0, 1, 0, 0, 0, 0]);
    let liar = starttls_liar(&socket, (1, Vec::new()), plain_reply);
    let uri = format!("nbds+unix:///?socket={}&tls-verify-peer=false", socket.display());
    let error = refused(&uri, &writable());
    assert!(matches!(error, ConnectError::TlsHandshake { .. }), "{error}");
    let (option, after_ack) = liar.join().unwrap();
    assert_eq!(option, 5, "the first option is NBD_OPT_STARTTLS");
    assert_eq!(after_ack, Some(0x16), "after the ACK the client speaks TLS (a handshake record), nothing else");
}

/// Replies to NBD_OPT_STARTTLS that are neither an ACK nor an error (an ACK with data, an
/// information reply): a protocol error, and the client hangs up without a plain-text option.
#[test]
fn a_malformed_answer_to_starttls_is_a_protocol_error() {
    let test = "a_malformed_answer_to_starttls_is_a_protocol_error";
    let dir = TempDir::new(test);
    for (index, reply) in [(1u32, vec![0u8; 4]), (3, vec![0u8; 12])].into_iter().enumerate() {
        let socket = dir.join(&format!("liar-{index}.sock"));
        let liar = starttls_liar(&socket, reply, Vec::new());
        let uri = format!("nbds+unix:///?socket={}&tls-verify-peer=false", socket.display());
        let error = refused(&uri, &writable());
        let ConnectError::Protocol { problem, .. } = &error else { panic!("{error}") };
        assert!(problem.contains("NBD_OPT_STARTTLS"), "{error}");
        assert_eq!(liar.join().unwrap(), (5, None), "nothing is sent after a malformed answer");
    }
}

/// Certificates missing or half there: a typed error before anything is sent.
#[test]
fn unreadable_certificates_are_refused_before_connecting() {
    let test = "unreadable_certificates_are_refused_before_connecting";
    let Some(pki) = TestPki::new(test) else { return };
    let no_socket = "nbds+unix:///?socket=/nonexistent/kcopyd-tls.sock";
    let empty = TempDir::new(test);
    let error = refused(&format!("{no_socket}&{}", certificates(empty.path())), &ConnectOptions::default());
    let ConnectError::TlsSetup { source, .. } = &error else { panic!("{error}") };
    let TlsError::Read { path, .. } = source.as_ref() else { panic!("{error}") };
    assert!(path.ends_with("ca-cert.pem"), "{error}");

    let half = pki.client("half", Trust::OurCa, true);
    fs::remove_file(half.join("client-key.pem")).unwrap();
    let error = refused(&format!("{no_socket}&{}", certificates(&half)), &ConnectOptions::default());
    let ConnectError::TlsSetup { source, .. } = &error else { panic!("{error}") };
    assert!(matches!(source.as_ref(), TlsError::HalfClientIdentity { .. }), "{error}");

    let garbage = pki.client("garbage", Trust::OurCa, false);
    fs::write(garbage.join("ca-cert.pem"), "not a certificate\n").unwrap();
    let error = refused(&format!("{no_socket}&{}", certificates(&garbage)), &ConnectOptions::default());
    let ConnectError::TlsSetup { source, .. } = &error else { panic!("{error}") };
    assert!(matches!(source.as_ref(), TlsError::Pem { .. }), "{error}");
}
