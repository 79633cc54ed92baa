//! `kcopyd clone … --serve`, checked with NBD clients this project did not write: qemu-img,
//! nbdcopy and nbdinfo read the served clone, qemu-io writes and reads it, and fio's nbd engine
//! runs a verifying random-write workload (with readers beside it) while hydration is still
//! running; then the server is stopped (SIGTERM) and killed (SIGKILL) mid-hydration, restarted,
//! and fio's verify pass must still find its data. A missing tool prints `SKIPPED:`;
//! `.ci/run` installs them.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kcopyd_tests::fixtures::{TempDir, pattern, skip, wait_for_signal_handlers};

/// How long a server may take to say it serves, or to hydrate when unthrottled.
const WAIT: Duration = Duration::from_secs(60);

/// A `kcopyd clone` running in the background, its stderr in a file; killed when dropped.
struct Clone {
    child: Option<Child>,
    stderr: PathBuf,
    uri: String,
}

impl Clone {
    /// Starts `kcopyd clone SOURCE DEST --metadata META --serve URI EXTRA…` and waits until it
    /// serves.
    fn start(dir: &TempDir, run: &str, uri: &str, extra: &[&str]) -> Clone {
        let stderr = dir.join(&format!("stderr-{run}.txt"));
        let (source, dest, meta) = (dir.join("source.img"), dir.join("dest.img"), dir.join("clone.meta"));
        let mut args: Vec<String> = ["clone", path(&source), path(&dest), "--metadata", path(&meta), "--serve", uri]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = Command::new(env!("CARGO_BIN_EXE_kcopyd"))
            .args(&args)
            .stdout(Stdio::null())
            .stderr(fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("the kcopyd binary runs");
        let mut clone = Clone { child: Some(child), stderr, uri: uri.to_owned() };
        clone.wait_for("kcopyd: serving the clone");
        wait_for_signal_handlers(clone.child.as_ref().unwrap().id());
        clone
    }

    fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits until stderr holds `text` (panics if the process ends first or after [`WAIT`]).
    fn wait_for(&mut self, text: &str) {
        let deadline = Instant::now() + WAIT;
        while !self.stderr().contains(text) {
            if let Ok(Some(status)) = self.child.as_mut().unwrap().try_wait() {
                panic!("kcopyd clone ended ({status}) before saying {text:?}: {}", self.stderr());
            }
            assert!(Instant::now() < deadline, "no {text:?} after {WAIT:?}: {}", self.stderr());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn hydrated(&self) -> bool {
        self.stderr().contains("hydration complete: DEST")
    }

    /// Sends `signal` and returns the exit code.
    fn signal(mut self, signal: &str) -> i32 {
        let child = self.child.take().unwrap();
        let status = Command::new("kill").args(["-s", signal, &child.id().to_string()]).status().unwrap();
        assert!(status.success());
        wait_exit(child)
    }
}

impl Drop for Clone {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn wait_exit(mut child: Child) -> i32 {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code().unwrap_or(-1);
        }
        assert!(Instant::now() < deadline, "kcopyd clone did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn path(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A unix socket URI: in /tmp, short enough for `sun_path` (108 bytes), unique per test.
fn unix_uri(test: &str) -> String {
    let name = format!("/tmp/kcopyd-clone-{}-{}.sock", std::process::id(), &test[..12]);
    format!("nbd+unix:///?socket={name}")
}

/// Whether every tool is installed; prints `SKIPPED:` naming the first missing one.
fn tools(test: &str, tools: &[&str]) -> bool {
    for tool in tools {
        let found = Command::new("sh").args(["-c", &format!("command -v {tool}")]).stdout(Stdio::null()).status();
        if !found.is_ok_and(|s| s.success()) {
            skip(test, format!("{tool} is not installed (.ci/run installs it)"));
            return false;
        }
    }
    true
}

/// Runs a tool, panicking with its output if it fails; returns its stdout.
fn tool(program: &str, args: &[&str]) -> String {
    let output = Command::new(program).args(args).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "{program} {args:?} failed ({}): {stdout}\n{stderr}", output.status);
    stdout.into_owned()
}

#[test]
fn qemu_img_nbdcopy_nbdinfo_and_qemu_io_read_and_write_the_served_clone() {
    let test = "qemu_img_nbdcopy_nbdinfo_and_qemu_io_read_and_write_the_served_clone";
    if !tools(test, &["qemu-img", "qemu-io", "nbdcopy", "nbdinfo"]) {
        return;
    }
    let dir = TempDir::new(test);
    // 16 MiB of data, then a 4 MiB hole (where the filesystem keeps holes).
    let mut data = pattern(31, 16 << 20);
    fs::write(dir.join("source.img"), &data).unwrap();
    fs::OpenOptions::new().write(true).open(dir.join("source.img")).unwrap().set_len(20 << 20).unwrap();
    data.resize(20 << 20, 0);
    let holes = tool("qemu-img", &["map", "--output=json", "-f", "raw", path(&dir.join("source.img"))]);
    // Slow hydration: the clients read a clone that is still mostly on the source.
    let server = Clone::start(&dir, "unix", &unix_uri(test), &["--throttle-rate", "1M", "-q"]);
    // Asked first: nothing has hydrated the tail yet (reads would move it to the front).
    let map = tool("nbdinfo", &["--map", &server.uri]);
    if holes.contains("\"data\": false") {
        assert!(map.contains(&format!("{}     4194304    3  hole,zero", 16 << 20)), "the source's hole shows: {map}");
    } else {
        skip(test, "the scratch filesystem keeps no holes: the hole through the clone is not checked");
    }
    let info = tool("nbdinfo", &[&server.uri]);
    assert!(info.contains(&format!("export-size: {}", data.len())), "{info}");
    assert!(info.contains("base:allocation") && info.contains("can_multi_conn: true"), "{info}");
    let contexts = tool("nbdinfo", &["--list", "--content", &server.uri]);
    assert!(contexts.contains("export=\"\""), "{contexts}");
    let converted = dir.join("qemu-img.img");
    tool("qemu-img", &["convert", "-f", "raw", "-O", "raw", &server.uri, path(&converted)]);
    assert!(fs::read(&converted).unwrap() == data, "qemu-img convert read the source's bytes");
    let copied = dir.join("nbdcopy.img");
    tool("nbdcopy", &[&server.uri, path(&copied)]);
    assert!(fs::read(&copied).unwrap() == data, "nbdcopy read the source's bytes");
    let io = tool(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0xab 1M 68k", "-c", "read -P 0xab 1M 68k", "-c", "read -P 0 0 0", &server.uri],
    );
    assert!(!io.contains("Pattern verification failed"), "{io}");
    assert!(!server.hydrated(), "hydration was still running while the clients worked");
    assert_eq!(server.signal("INT"), 130);
    // TCP on loopback, the same clone resumed: qemu-io's bytes are there.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let tcp = format!("nbd://127.0.0.1:{port}/clone");
    let mut server = Clone::start(&dir, "tcp", &tcp, &["-q"]);
    server.wait_for("hydration complete: DEST");
    let io = tool("qemu-io", &["-f", "raw", "-c", "read -P 0xab 1M 68k", &tcp]);
    assert!(!io.contains("Pattern verification failed"), "{io}");
    assert_eq!(server.signal("TERM"), 143);
    let mut expected = data.clone();
    expected[1 << 20..(1 << 20) + 68 * 1024].fill(0xab);
    assert!(fs::read(dir.join("dest.img")).unwrap() == expected, "DEST is the source plus qemu-io's write");
}

/// fio's verifying write job (every 4 KiB block of [4 MiB, 12 MiB) written once, with a
/// CRC-32C header, flushed at the end), with a random reader over the whole clone beside it.
fn fio_write(uri: &str) -> String {
    tool(
        "fio",
        &[
            "--name=writer",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--offset=4M",
            "--size=8M",
            "--iodepth=16",
            "--verify=crc32c",
            "--verify_fatal=1",
            // No state file left in the working directory.
            "--verify_state_save=0",
            "--end_fsync=1",
            "--name=reader",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randread",
            "--bs=64k",
            "--offset=0",
            "--size=32M",
            "--iodepth=4",
            "--time_based",
            "--runtime=2",
        ],
    )
}

/// fio's verify pass alone over what [`fio_write`] wrote, through `engine` (`nbd` with a URI,
/// or `psync` on a file).
fn fio_verify(target: &[&str]) -> String {
    let mut args = vec!["--name=verify", "--rw=randwrite", "--bs=4k", "--offset=4M", "--size=8M"];
    args.extend(["--verify=crc32c", "--verify_fatal=1", "--verify_only", "--verify_state_save=0"]);
    args.extend(target);
    tool("fio", &args)
}

#[test]
fn fio_verifies_its_writes_during_hydration_and_after_sigterm_and_sigkill_restarts() {
    let test = "fio_verifies_its_writes_during_hydration_and_after_sigterm_and_sigkill_restarts";
    if !tools(test, &["fio"]) {
        return;
    }
    let engines = tool("fio", &["--enghelp"]);
    if !engines.contains("nbd") {
        return skip(test, "this fio has no nbd engine");
    }
    let dir = TempDir::new(test);
    let data = pattern(32, 32 << 20);
    fs::write(dir.join("source.img"), &data).unwrap();
    let uri = unix_uri(test);
    let nbd_target = ["--ioengine=nbd".to_owned(), format!("--uri={uri}")];
    let nbd_target: Vec<&str> = nbd_target.iter().map(String::as_str).collect();
    // 32 MiB at 2 MB/s: about 16 s of hydration, far longer than fio's run. No background
    // commit in the first run: only fio's flush (end_fsync) makes its writes durable.
    let server = Clone::start(&dir, "first", &uri, &["--throttle-rate", "2M", "--commit-interval", "3600s", "-q"]);
    assert!(!server.hydrated(), "hydration was incomplete when fio started");
    let output = fio_write(&uri);
    assert!(output.contains("err= 0"), "{output}");
    assert!(!server.hydrated(), "hydration was still running when fio ended");
    // Killed outright mid-hydration: fio's flushed writes survive; the rest is hydrated again.
    assert_eq!(server.signal("KILL"), -1, "killed by SIGKILL");
    let server = Clone::start(&dir, "second", &uri, &["--throttle-rate", "2M", "-q"]);
    let output = fio_verify(&nbd_target);
    assert!(output.contains("err= 0"), "{output}");
    assert!(!server.hydrated());
    // Stopped by SIGTERM mid-hydration, restarted: fio's data is still there.
    assert_eq!(server.signal("TERM"), 143);
    let mut server = Clone::start(&dir, "third", &uri, &["-q"]);
    server.wait_for("hydration complete: DEST");
    let output = fio_verify(&nbd_target);
    assert!(output.contains("err= 0"), "{output}");
    assert_eq!(server.signal("INT"), 130);
    // DEST on its own: the source outside fio's range, fio's verified blocks inside it.
    let dest = fs::read(dir.join("dest.img")).unwrap();
    assert!(dest[..4 << 20] == data[..4 << 20] && dest[12 << 20..] == data[12 << 20..], "DEST is the source there");
    let file = format!("--filename={}", path(&dir.join("dest.img")));
    let output = fio_verify(&["--ioengine=psync", &file]);
    assert!(output.contains("err= 0"), "{output}");
}

#[test]
fn metadata_of_other_devices_a_busy_one_and_a_foreign_file_are_refused_untouched() {
    let test = "metadata_of_other_devices_a_busy_one_and_a_foreign_file_are_refused_untouched";
    let dir = TempDir::new(test);
    fs::write(dir.join("source.img"), pattern(33, 4 << 20)).unwrap();
    let uri = unix_uri(test);
    let server = Clone::start(&dir, "first", &uri, &["-q", "--throttle-rate", "1M"]);
    let meta = dir.join("clone.meta");
    let before = fs::read(&meta).unwrap();
    let run = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_kcopyd")).args(args).output().unwrap();
        (output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stderr).into_owned())
    };
    let (source, dest) = (dir.join("source.img"), dir.join("dest.img"));
    let other_uri = unix_uri("other-socket");
    // A second server on the same metadata: busy (DEST is locked first, or the metadata).
    let (code, stderr) = run(&["clone", path(&source), path(&dest), "--metadata", path(&meta), "--serve", &other_uri]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("busy"), "{stderr}");
    assert_eq!(server.signal("TERM"), 143);
    // The metadata of another source, and of another destination.
    let other = dir.join("other.img");
    fs::write(&other, pattern(34, 4 << 20)).unwrap();
    let (code, stderr) = run(&["clone", path(&other), path(&dest), "--metadata", path(&meta), "--serve", &other_uri]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("other devices"), "{stderr}");
    let other_dest = dir.join("other-dest.img");
    let (code, stderr) =
        run(&["clone", path(&source), path(&other_dest), "--metadata", path(&meta), "--serve", &other_uri]);
    assert_eq!(code, 2, "{stderr}");
    assert!(!other_dest.exists(), "the refused run removed the DEST it created");
    // A file that is not a clone's metadata is left as it is; a region size that differs.
    let foreign = dir.file_with("foreign.bin", b"precious data");
    let (code, stderr) =
        run(&["clone", path(&source), path(&dest), "--metadata", path(&foreign), "--serve", &other_uri]);
    assert_eq!(code, 2, "{stderr}");
    assert_eq!(fs::read(&foreign).unwrap(), b"precious data");
    let args = ["clone", path(&source), path(&dest), "--metadata", path(&meta), "--serve", &other_uri];
    let (code, stderr) = run(&[&args[..], &["--region-size", "4K"]].concat());
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--region-size"), "{stderr}");
    // Not loopback; the metadata given as DEST itself.
    let (code, stderr) = run(&[&args[..6], &["--serve", "nbd://192.0.2.1:10809"]].concat());
    assert_eq!(code, 2, "{stderr}");
    let (code, stderr) = run(&["clone", path(&source), path(&dest), "--metadata", path(&dest), "--serve", &other_uri]);
    assert_eq!(code, 2, "{stderr}");
    // A /proc/sys file: writing it sets something in the kernel.
    let sysctl = "/proc/sys/vm/swappiness";
    let setting = fs::read(sysctl).unwrap();
    let (code, stderr) = run(&["clone", path(&source), path(&other_dest), "--metadata", sysctl, "--serve", &other_uri]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("proc filesystem"), "{stderr}");
    assert_eq!(fs::read(sysctl).unwrap(), setting);
    assert!(!other_dest.exists(), "nothing made");
    let after = fs::read(&meta).unwrap();
    assert_eq!(before.len(), after.len(), "the metadata kept its size");
    let identity = String::from_utf8_lossy(&after[after.len() - 4096..]);
    assert!(identity.starts_with("kcopyd-clone-file 1\nstate ready\n"), "{identity}");
}

#[test]
fn exit_when_hydrated_ends_0_with_dest_equal_to_source_and_a_busy_socket_is_refused_leaving_nothing() {
    let test = "exit_when_hydrated_ends_0_with_dest_equal_to_source_and_a_busy_socket_is_refused_leaving_nothing";
    let dir = TempDir::new(test);
    let data = pattern(35, 8 << 20);
    let source = dir.file_with("source.img", &data);
    let uri = unix_uri(test);
    let socket = uri.split("socket=").nth(1).unwrap().to_owned();
    let server = Clone::start(&dir, "held", &uri, &["-q", "--throttle-rate", "1M"]);
    // Another clone on the same socket: refused, and its new DEST and FILE are removed.
    let (dest, meta) = (dir.join("second.img"), dir.join("second.meta"));
    let args = ["clone", path(&source), path(&dest), "--metadata", path(&meta), "--serve", &uri];
    let output = Command::new(env!("CARGO_BIN_EXE_kcopyd")).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("a server is listening there"), "{stderr}");
    assert!(!dest.exists() && !meta.exists(), "nothing left behind");
    assert_eq!(server.signal("TERM"), 143);
    assert!(!Path::new(&socket).exists(), "the socket is removed at the end");
    // Resumed, unthrottled, until hydrated.
    let output = Command::new(env!("CARGO_BIN_EXE_kcopyd"))
        .args(["clone", path(&source), path(&dir.join("dest.img")), "--metadata", path(&dir.join("clone.meta"))])
        .args(["--serve", &uri, "--exit-when-hydrated", "-q"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("hydration complete: DEST") && stderr.contains("(complete); metadata committed"),
        "{stderr}"
    );
    assert!(fs::read(dir.join("dest.img")).unwrap() == data);
    assert!(!Path::new(&socket).exists());
}
