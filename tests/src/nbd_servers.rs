//! Real NBD servers for the tests of `kcopyd-nbd`: `qemu-nbd` and `nbdkit`, started by the
//! tests on a unix socket or a free loopback TCP port, killed when dropped.
//!
//! ```text
//!  ExternalNbdServer::qemu_nbd(test, file, Listen::Unix, &["-r"])  ─► qemu-nbd -f raw -t … -k DIR/nbd.sock FILE
//!  ExternalNbdServer::nbdkit(test, Listen::Tcp, &["memory", "8M"]) ─► nbdkit -f -i 127.0.0.1 -p PORT memory 8M
//!    wait until a connection is accepted (≤ 10 s) ─► uri(): nbd+unix:///?socket=… or nbd://127.0.0.1:PORT/
//! ```
//!
//! A missing binary prints `SKIPPED:` and the test returns; `.ci/run` installs both.

use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::fixtures::{TempDir, skip};

/// How long a server may take to accept its first connection.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a server listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    /// A unix socket in a scratch directory.
    Unix,
    /// A free TCP port on 127.0.0.1.
    Tcp,
}

/// A running NBD server, killed (and reaped) when dropped.
#[derive(Debug)]
pub struct ExternalNbdServer {
    child: Option<Child>,
    /// Where it listens, as an URI without the export name.
    address: String,
    socket: Option<PathBuf>,
    _dir: TempDir,
}

impl ExternalNbdServer {
    /// `qemu-nbd` serving the raw `file` (persistent, up to 16 clients) with `extra` options.
    /// `None` after printing `SKIPPED:` when qemu-nbd is not installed.
    pub fn qemu_nbd(test: &str, file: &Path, listen: Listen, extra: &[&str]) -> Option<ExternalNbdServer> {
        let mut args: Vec<String> = ["-f", "raw", "-t", "-e", "16"].iter().map(|s| s.to_string()).collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        ExternalNbdServer::start(
            test,
            "qemu-nbd",
            listen,
            args,
            |listen_args: &Listen, dir: &Path, port: u16| match listen_args {
                Listen::Unix => vec!["-k".into(), dir.join("nbd.sock").display().to_string()],
                Listen::Tcp => vec!["-b".into(), "127.0.0.1".into(), "-p".into(), port.to_string()],
            },
            Some(file.display().to_string()),
        )
    }

    /// `nbdkit` in the foreground with `args` (filters, plugin and its parameters).
    /// `None` after printing `SKIPPED:` when nbdkit is not installed.
    pub fn nbdkit(test: &str, listen: Listen, args: &[&str]) -> Option<ExternalNbdServer> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        ExternalNbdServer::start(
            test,
            "nbdkit",
            listen,
            Vec::new(),
            move |listen_args: &Listen, dir: &Path, port: u16| {
                let mut front = vec!["-f".to_string(), "--exit-with-parent".into()];
                match listen_args {
                    Listen::Unix => front.extend(["-U".into(), dir.join("nbd.sock").display().to_string()]),
                    Listen::Tcp => front.extend(["-i".into(), "127.0.0.1".into(), "-p".into(), port.to_string()]),
                }
                front.extend(args.iter().cloned());
                front
            },
            None,
        )
    }

    fn start(
        test: &str,
        program: &str,
        listen: Listen,
        mut args: Vec<String>,
        listen_args: impl Fn(&Listen, &Path, u16) -> Vec<String>,
        last: Option<String>,
    ) -> Option<ExternalNbdServer> {
        if !installed(program) {
            skip(test, format!("{program} is not installed (Debian: apt-get install qemu-utils nbdkit)"));
            return None;
        }
        let dir = TempDir::new(&format!("nbd-{program}"));
        let port = match listen {
            Listen::Unix => 0,
            Listen::Tcp => free_port(),
        };
        args.extend(listen_args(&listen, dir.path(), port));
        args.extend(last);
        let child = Command::new(program)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| panic!("starting {program} {args:?}: {error}"));
        let (address, socket) = match listen {
            Listen::Unix => {
                let socket = dir.join("nbd.sock");
                (format!("nbd+unix:///{{}}?socket={}", socket.display()), Some(socket))
            }
            Listen::Tcp => (format!("nbd://127.0.0.1:{port}/{{}}"), None),
        };
        let mut server = ExternalNbdServer { child: Some(child), address, socket, _dir: dir };
        server.wait_ready(program, &args, port);
        Some(server)
    }

    fn wait_ready(&mut self, program: &str, args: &[String], port: u16) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let ready = match &self.socket {
                Some(socket) => UnixStream::connect(socket).is_ok(),
                None => TcpStream::connect(("127.0.0.1", port)).is_ok(),
            };
            if ready {
                return;
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("{program} {args:?} exited before serving: {status}");
            }
            assert!(Instant::now() < deadline, "{program} {args:?} did not listen within {READY_TIMEOUT:?}");
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The URI of `export` on this server.
    pub fn uri(&self, export: &str) -> String {
        self.address.replace("{}", export)
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server at once (SIGKILL), as a crash or a lost link would end it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ExternalNbdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether `program` is on the PATH.
pub fn installed(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
fn free_port() -> u16 {
    let listener = TcpListener::bind(("127.0.0.1", 0)).expect("binding a loopback port");
    listener.local_addr().expect("a bound address").port()
}
