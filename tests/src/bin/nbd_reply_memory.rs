//! The peak memory of an NBD client fed a hostile reply: a misbehaving server
//! (`kcopyd_tests::bad_nbd`, in a child process of its own so that its buffers are not
//! counted) answers one block-status request with a flood of chunks, and this prints the
//! client's peak resident set before and after the request, and how it ended.
//! `bench/nbd_reply_memory.sh` runs it several times and reports the median.
//!
//! ```text
//!  nbd_reply_memory [MISBEHAVIOUR]   (default BlockStatusFlood)
//!    └► nbd_reply_memory --serve MISBEHAVIOUR  (prints its URI, serves until stdin closes)
//!  ─► {"misbehaviour":"BlockStatusFlood","peak_rss_kib_before":…,"peak_rss_kib_after":…,"seconds":…,"result":"…"}
//! ```

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::Instant;

use kcopyd_nbd::{ConnectOptions, NbdDevice};
use kcopyd_tests::bad_nbd::{BadServer, Misbehaviour};

/// The process's peak resident set (`VmHWM`), in KiB.
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let line = status.lines().find_map(|line| line.strip_prefix("VmHWM:")).unwrap_or("0");
    line.trim().trim_end_matches("kB").trim().parse().unwrap_or(0)
}

fn misbehaviour(name: &str) -> Misbehaviour {
    *Misbehaviour::ALL.iter().find(|m| format!("{m:?}") == name).unwrap_or_else(|| panic!("no misbehaviour {name}"))
}

/// The server side: serves until stdin closes.
fn serve(name: &str) {
    let server = BadServer::start("reply-memory", misbehaviour(name), vec![0x5a; 64 << 10]);
    println!("{}", server.uri());
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--serve") {
        return serve(&args[2]);
    }
    let name = args.get(1).cloned().unwrap_or_else(|| "BlockStatusFlood".into());
    let mut child = Command::new(&args[0])
        .args(["--serve", &name])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("the server process starts");
    let mut uri = String::new();
    BufReader::new(child.stdout.take().expect("piped")).read_line(&mut uri).expect("the server's URI");
    let device = NbdDevice::connect(uri.trim(), &ConnectOptions::default()).expect("the server opens");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    let before = peak_rss_kib();
    let started = Instant::now();
    let result = runtime.block_on(device.block_status(0, 128));
    let seconds = started.elapsed().as_secs_f64();
    let after = peak_rss_kib();
    let result = match result {
        Ok(extents) => format!("{} extents", extents.len()),
        Err(error) => error.to_string().replace('"', "'"),
    };
    println!(
        "{{\"misbehaviour\":\"{name}\",\"peak_rss_kib_before\":{before},\"peak_rss_kib_after\":{after},\
         \"seconds\":{seconds:.3},\"result\":\"{result}\"}}"
    );
    drop(child.stdin.take());
    let _ = child.wait();
}
