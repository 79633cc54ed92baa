//! Real files, loop devices and mounts for the tests of `kcopyd-os`, each undone when dropped
//! (also when the test fails), and the `SKIPPED:` line for a backend that cannot run here.
//!
//! ```text
//!  TempDir (/var/tmp/kcopyd-test-PID-N-label, removed on drop)
//!    └─ backing.img ──losetup --find --show --direct-io=on──► LoopDevice (/dev/loopN, detached on drop)
//!    └─ mnt/ ──mount──► Mount (unmounted on drop, before the directory goes)
//!  Ext4OnLoop = LoopDevice + mkfs.ext4 + Mount (unmounted, then detached)
//! ```

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use kcopyd_sim::mix64;

/// Says, on stderr, that a backend or check is skipped and why: a skip is never silent.
///
/// Written to the stderr handle rather than with `eprintln!`, which the test harness
/// captures and shows only for failing tests.
pub fn skip(test: &str, reason: impl fmt::Display) {
    note(&format!("SKIPPED: {test}: {reason}"));
}

/// Writes one line to stderr past the test harness's capture.
pub fn note(line: &str) {
    let _ = writeln!(io::stderr(), "{line}");
}

/// Whether this process runs with effective user id 0 (from `/proc/self/status`).
pub fn is_root() -> bool {
    let Ok(status) = fs::read_to_string("/proc/self/status") else { return false };
    // "Uid:\treal\teffective\tsaved\tfs"
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1).map(|effective| effective == "0"))
        .unwrap_or(false)
}

/// `len` bytes of the pattern of `seed`: eight bytes at a time from [`mix64`].
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    let mut index = 0u64;
    while out.len() < len {
        out.extend_from_slice(&mix64(seed ^ mix64(index)).to_le_bytes());
        index += 1;
    }
    out.truncate(len);
    out
}

static NEXT_DIR: AtomicU64 = AtomicU64::new(0);

/// A scratch directory, removed with its contents when dropped.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// A fresh directory under `$KCOPYD_TEST_DIR`, else `/var/tmp` (a disk filesystem that
    /// supports O_DIRECT, unlike `/tmp` on some systems and `/dev/shm`).
    pub fn new(label: &str) -> TempDir {
        let base = std::env::var_os("KCOPYD_TEST_DIR").map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
        TempDir::new_in(&base, label)
            .unwrap_or_else(|error| panic!("scratch directory under {}: {error}", base.display()))
    }

    /// A fresh directory under `base`.
    ///
    /// # Errors
    /// The directory cannot be made.
    pub fn new_in(base: &Path, label: &str) -> io::Result<TempDir> {
        let n = NEXT_DIR.fetch_add(1, Ordering::Relaxed);
        let path = base.join(format!("kcopyd-test-{}-{n}-{label}", std::process::id()));
        fs::create_dir_all(&path)?;
        Ok(TempDir { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Writes `data` to a new file `name` and returns its path.
    pub fn file_with(&self, name: &str, data: &[u8]) -> PathBuf {
        let path = self.join(name);
        fs::write(&path, data).unwrap_or_else(|error| panic!("writing {}: {error}", path.display()));
        path
    }

    /// A new file `name` of `len_bytes` zeroes (sparse) and its path.
    pub fn zero_file(&self, name: &str, len_bytes: u64) -> PathBuf {
        let path = self.join(name);
        File::create(&path)
            .and_then(|file| file.set_len(len_bytes))
            .unwrap_or_else(|error| panic!("creating {}: {error}", path.display()));
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Why a command of a fixture did not do its work ([`run`]).
#[derive(Debug)]
pub enum CommandError {
    /// The program could not be started (missing, not executable).
    Spawn {
        /// The program.
        program: String,
        /// The system's error.
        source: io::Error,
    },
    /// The program ran and failed.
    Failed {
        /// The program and its arguments, as one line.
        command: String,
        /// How it ended.
        status: std::process::ExitStatus,
        /// What it wrote on standard error, trimmed.
        stderr: String,
    },
}

impl fmt::Display for CommandError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CommandError::Spawn { program, source } => write!(f, "running {program}: {source}"),
            CommandError::Failed { command, status, stderr } => write!(f, "{command}: {status}: {stderr}"),
        }
    }
}

impl std::error::Error for CommandError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CommandError::Spawn { source, .. } => Some(source),
            CommandError::Failed { .. } => None,
        }
    }
}

/// Runs a command, returning its standard output.
///
/// # Errors
/// The command is missing or fails (with its standard error).
pub fn run(program: &str, args: &[&str]) -> Result<String, CommandError> {
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| CommandError::Spawn { program: program.to_owned(), source })?;
    if !output.status.success() {
        return Err(CommandError::Failed {
            command: format!("{program} {}", args.join(" ")),
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

/// Why loop devices cannot be used here, if they cannot: not root, no `losetup`, no loop
/// driver.
pub fn loop_devices_unavailable() -> Option<String> {
    if !is_root() {
        return Some("loop devices need root".into());
    }
    if let Err(error) = run("losetup", &["--version"]) {
        return Some(format!("losetup is missing ({error})"));
    }
    if !Path::new("/dev/loop-control").exists() {
        return Some("no /dev/loop-control (loop driver not loaded)".into());
    }
    None
}

/// A loop device over a backing file with direct I/O on, detached when dropped.
#[derive(Debug)]
pub struct LoopDevice {
    path: PathBuf,
}

impl LoopDevice {
    /// Attaches `backing` with `--direct-io=on` and `--sector-size sector_size`, or says
    /// `SKIPPED` (naming `test`) and returns `None` where loop devices cannot be used.
    ///
    /// # Panics
    /// If loop devices are available but `losetup` fails.
    pub fn attach_or_skip(test: &str, backing: &Path, sector_size: u32) -> Option<LoopDevice> {
        LoopDevice::attach_with_or_skip(test, backing, sector_size, &[])
    }

    /// As [`LoopDevice::attach_or_skip`], with more `losetup` options: `--read-only`,
    /// `--offset BYTES`, `--partscan`.
    ///
    /// # Panics
    /// If loop devices are available but `losetup` fails.
    pub fn attach_with_or_skip(test: &str, backing: &Path, sector_size: u32, options: &[&str]) -> Option<LoopDevice> {
        if let Some(reason) = loop_devices_unavailable() {
            skip(test, reason);
            return None;
        }
        let backing = backing.to_str().expect("a UTF-8 path");
        let sector_size = sector_size.to_string();
        let mut args = vec!["--find", "--show", "--direct-io=on", "--sector-size", &sector_size];
        args.extend_from_slice(options);
        args.push(backing);
        let path = run("losetup", &args).unwrap_or_else(|error| panic!("attaching a loop device: {error}"));
        assert!(path.starts_with("/dev/loop"), "losetup printed {path:?}");
        Some(LoopDevice { path: PathBuf::from(path) })
    }

    /// The device node (`/dev/loopN`).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let path = self.path.to_str().expect("a UTF-8 path");
        if let Err(error) = run("losetup", &["--detach", path]) {
            eprintln!("detaching {path}: {error}");
        }
    }
}

/// A mount, unmounted when dropped.
#[derive(Debug)]
pub struct Mount {
    target: PathBuf,
}

impl Mount {
    /// Runs `mount ARGS... TARGET` (root only).
    ///
    /// # Errors
    /// `mount`'s message.
    pub fn new(args: &[&str], target: &Path) -> Result<Mount, CommandError> {
        let target_str = target.to_str().expect("a UTF-8 path");
        let mut all = args.to_vec();
        all.push(target_str);
        run("mount", &all)?;
        Ok(Mount { target: target.to_path_buf() })
    }

    /// Remounts the bind mount at `target` read-only.
    ///
    /// # Errors
    /// `mount`'s message.
    pub fn remount_read_only(&self) -> Result<(), CommandError> {
        let target = self.target.to_str().expect("a UTF-8 path");
        run("mount", &["-o", "remount,bind,ro", target]).map(drop)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let target = self.target.to_str().expect("a UTF-8 path");
        if run("umount", &[target]).is_err() {
            // Still busy (an open file): detach it now, the kernel finishes later.
            let _ = run("umount", &["--lazy", target]);
        }
    }
}

/// An ext4 filesystem on a loop device, mounted; unmounted and detached when dropped.
#[derive(Debug)]
pub struct Ext4OnLoop {
    // Fields drop in order: unmount first, then detach.
    mount: Mount,
    loop_device: LoopDevice,
}

impl Ext4OnLoop {
    /// Makes a `len_bytes` backing file in `dir`, attaches it with `sector_size`-byte sectors,
    /// formats it ext4 and mounts it at `dir/mnt`; or says `SKIPPED` (naming `test`) and
    /// returns `None` where loop devices, `mkfs.ext4` or mounting are not available.
    ///
    /// # Panics
    /// If loop devices are available but `losetup` fails.
    pub fn new_or_skip(test: &str, dir: &TempDir, len_bytes: u64, sector_size: u32) -> Option<Ext4OnLoop> {
        let backing = dir.zero_file("ext4.img", len_bytes);
        let loop_device = LoopDevice::attach_or_skip(test, &backing, sector_size)?;
        let device = loop_device.path().to_str().expect("a UTF-8 path");
        if let Err(error) = run("mkfs.ext4", &["-q", "-F", device]) {
            skip(test, format!("cannot make an ext4 filesystem: {error}"));
            return None;
        }
        let mount_point = dir.join("mnt");
        fs::create_dir_all(&mount_point).expect("a mount point");
        match Mount::new(&["-t", "ext4", device], &mount_point) {
            Ok(mount) => Some(Ext4OnLoop { mount, loop_device }),
            Err(error) => {
                skip(test, format!("cannot mount ext4: {error}"));
                None
            }
        }
    }

    /// The loop device (mounted, so busy).
    pub fn device(&self) -> &Path {
        self.loop_device.path()
    }

    /// A path inside the mounted filesystem.
    pub fn join(&self, name: &str) -> PathBuf {
        self.mount.target.join(name)
    }
}

/// Waits (up to 20 s) until process `pid` catches SIGINT and SIGTERM, read from
/// `/proc/PID/status`, so that a test's signal reaches an installed handler rather than
/// killing the process.
///
/// # Panics
/// The handlers do not appear within 20 s.
pub fn wait_for_signal_handlers(pid: u32) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    // SIGINT is signal 2, SIGTERM 15; bit n-1 of the mask stands for signal n.
    let wanted: u64 = (1 << (2 - 1)) | (1 << (15 - 1));
    loop {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let caught = status
            .lines()
            .find_map(|line| line.strip_prefix("SigCgt:"))
            .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
            .unwrap_or(0);
        if caught & wanted == wanted {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "the signal handlers never appeared: {status}");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
