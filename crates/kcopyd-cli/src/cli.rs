//! The command line: subcommands and options (clap derive).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::size;
use kcopyd_tool::{AddressError, DeviceAddress};

/// Bytes per sub-job by default: one read of the source and one write per target. The
/// library's [`kcopyd_core::SUBJOB_SIZE_DEFAULT_BYTES`], written for `--help`.
///
/// Chosen by measurement (docs/BENCHMARKS.md): on this project's machines, alternating
/// shapes in one run, 4 × 1 MiB in flight copied fastest to 1 and to 3 targets; deeper
/// queues (8 × 2 MiB, 32 × 2 MiB) were 5–25 % slower there, because the virtual disk shares
/// one bandwidth between reads and writes. Faster storage may want more in flight. With an
/// NBD export: [`kcopyd_tool::options::NBD_SUBJOB_SIZE_DEFAULT_BYTES`].
pub const SUBJOB_SIZE_DEFAULT: &str = "1M";
/// Sub-jobs kept in flight by default: the library's.
pub const SUBJOBS_IN_FLIGHT_DEFAULT: usize = kcopyd_core::SUBJOBS_IN_FLIGHT_DEFAULT;
/// How long connecting to an NBD server and its handshake may take by default: the library's
/// [`kcopyd_nbd::CONNECT_TIMEOUT_MS_DEFAULT`], written for `--help`.
pub const CONNECT_TIMEOUT_DEFAULT: &str = "30s";
const _: () = assert!(kcopyd_nbd::CONNECT_TIMEOUT_MS_DEFAULT == 30_000);
/// The page budget by default: the library's [`kcopyd_core::PAGE_BUDGET_DEFAULT`] (four times
/// what the default sub-jobs in flight take, so that reads can run ahead while several
/// targets are still being written), written for `--help`.
pub const MEMORY_DEFAULT: &str = "16M";

/// kcopyd: copy, zero and compare block ranges on files, block devices and simulated disks,
/// with the kcopyd engine.
///
/// Devices are `PATH`, `PATH@OFFSET`, `sim:KEY=VALUE,...` or an NBD URI (`nbd://HOST[:PORT]/EXPORT`,
/// `nbd+unix:///EXPORT?socket=PATH`; `nbds://`, `nbds+unix://` through TLS), all also with `@OFFSET`. Sizes and
/// offsets are bytes, or take binary units: K, M, G, T (or KiB, MiB, ...), s for 512-byte
/// sectors. Exit status: 0 success, 1 read or write errors or differences, 2 bad usage (nothing
/// written), 130 interrupted (143 by SIGTERM), 141 standard output closed by its reader.
#[derive(Debug, Parser)]
#[command(name = "kcopyd", version, propagate_version = true, after_help = EXAMPLES)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Examples shown under `kcopyd --help`.
pub const EXAMPLES: &str = "\
Examples:
  kcopyd copy disk.img backup.img                  copy a whole file (a missing target is created)
  kcopyd copy /dev/sdb /dev/sdc /dev/sdd --verify  one read, two mirrors, then compare
  kcopyd zero /dev/sdc@1G --length 4G              zero 4 GiB from 1 GiB in
  kcopyd verify disk.img backup.img                compare, exit 1 on any difference
  kcopyd demo                                      a mirror resync with injected faults

Each command's --help shows more examples.";

/// Examples shown under `kcopyd copy --help`.
pub const COPY_EXAMPLES: &str = "\
Examples:
  kcopyd copy disk.img backup.img
      Copy every byte of disk.img (any length) to backup.img, created if missing.
  kcopyd copy /dev/sdb /dev/sdc /dev/sdd --verify
      Read /dev/sdb once, write both mirrors, then read them back and compare.
  kcopyd copy disk.img@1M /dev/sdc@64K --length 100M
      Copy 100 MiB from 1 MiB into disk.img to 64 KiB into /dev/sdc.
  kcopyd copy failing.img rescue.img --ignore-errors --json
      Copy what can be read; the report lists the unreadable sectors, never written over.
  kcopyd copy sim:size=64M,seed=1,bad-read=100-108 sim: --ignore-errors
      Try the error reports on simulated disks.
  kcopyd copy disk.img backup.img --map backup.map
      Record progress in backup.map; after a crash or Ctrl-C, the same command goes on.
  kcopyd copy disk.img backup.img --map backup.map --retry-failed
      Go over the ranges that failed before, narrowing unreadable ones down to blocks.
  kcopyd copy thin.img fresh.img --target-is-zero
      Holes and zero blocks of the source are not written at all (fresh.img reads zeroes).
  kcopyd copy /dev/sdb nbds://backup-host/disk --tls-certificates /etc/pki/nbd
      Copy to an NBD export through TLS; its certificate must chain to /etc/pki/nbd/ca-cert.pem.

Targets are locked while the copy runs; overlapping ranges, read-only or busy targets and bad
options are refused before anything is written (exit 2).";

/// Examples shown under `kcopyd zero --help`.
pub const ZERO_EXAMPLES: &str = "\
Examples:
  kcopyd zero scratch.img
      Zero the whole file (every byte, also a partial last block).
  kcopyd zero /dev/sdc@1G --length 4G
      Zero 4 GiB from 1 GiB in (BLKZEROOUT where the device offloads it).
  kcopyd zero a.img b.img --length 1M --json
      Zero the first MiB of two files, report as JSON.";

/// Examples shown under `kcopyd verify --help`.
pub const VERIFY_EXAMPLES: &str = "\
Examples:
  kcopyd verify disk.img backup.img
      Compare two files whole; exit 0 identical, 1 different or unreadable.
  kcopyd verify /dev/sdb /dev/sdc /dev/sdd --json
      Compare two mirrors with their source; the first differing sector of each.
  kcopyd verify disk.img@1M copy.img --length 100M
      Compare 100 MiB from 1 MiB into disk.img with the start of copy.img.";

/// Examples shown under `kcopyd demo --help`.
pub const DEMO_EXAMPLES: &str = "\
Examples:
  kcopyd demo
      Resync a 256 MiB mirror with faults injected, and check the report against the fault log.
  kcopyd demo --size 32M --tamper
      Change a copied sector behind the engine's back: the check must fail (exit 1).";

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Copy a range of SOURCE to every TARGET.
    #[command(after_help = COPY_EXAMPLES)]
    Copy(CopyArgs),
    /// Write zeroes over a range of every TARGET.
    #[command(after_help = ZERO_EXAMPLES)]
    Zero(ZeroArgs),
    /// Compare a range of SOURCE with every TARGET.
    #[command(after_help = VERIFY_EXAMPLES)]
    Verify(VerifyArgs),
    /// A mirror resync with injected faults on simulated disks, checked against the fault log.
    #[command(after_help = DEMO_EXAMPLES)]
    Demo(DemoArgs),
    /// Serve DEST over NBD as a clone of SOURCE, usable at once, while it hydrates.
    #[command(after_help = CLONE_EXAMPLES)]
    Clone(CloneArgs),
    /// Look at a copy map (`copy --map FILE`).
    #[command(subcommand)]
    Map(MapCommand),
    /// The simulator as a design tool: scenarios run and swept in virtual time, disk models
    /// measured on real devices, and checked against them.
    Sim {
        /// What to do.
        #[command(subcommand)]
        command: SimCommand,
    },
}

/// `kcopyd sim ...`.
#[derive(Debug, Subcommand)]
pub enum SimCommand {
    /// Measure a real file or block device and write a disk model (TOML) for the simulator.
    ///
    /// Reads and writes through O_DIRECT at I/O sizes from 4 KiB to 4 MiB and 1 to 32 requests
    /// in flight, then reads and writes at once, and fits the simulator's timing model to what
    /// it saw (see docs/SIMULATION.md).
    ///
    /// What it writes: a DEVICE that does not exist is created (--size bytes), filled, measured
    /// and removed again (--keep keeps it). A DEVICE that exists is written only between
    /// --scratch-offset and --scratch-offset + --scratch-length, and only when
    /// --scratch-length is given: everything in that range is overwritten; nothing outside it
    /// is read or written. The model goes to --out (replaced if it exists) or to stdout.
    Calibrate(CalibrateArgs),
    /// Copy SOURCE to TARGET for real and in the simulator, and compare the times.
    ///
    /// Runs several configurations (sub-job size × sub-jobs in flight × 1 or 3 targets),
    /// alternating them over --runs rounds, and prints each one's measured median time, the
    /// time the simulator predicts from the disk model, and the error of the prediction.
    ///
    /// What it writes: the whole length of SOURCE to TARGET and, for three-target
    /// configurations, to TARGET.2 and TARGET.3. Missing files are created and removed again at
    /// the end; an existing TARGET is overwritten.
    Validate(ValidateArgs),
    /// Copy SOURCE to TARGET over a network link for real and in the simulator, and compare the
    /// times: checks the simulator's link model (round trip, bandwidth, burst) in front of a
    /// disk model.
    ///
    /// The link is the user's: NBD exports behind nbdkit's `rate` and `delay` filters (see
    /// bench/netmodel.py, which starts them), or a real network. --link-rtt, --link-bandwidth
    /// and --link-burst describe it to the simulator, whose remote disk (--remote) puts that
    /// link in front of --model. Runs the configurations, alternating them over --runs rounds,
    /// and prints each one's measured median, the prediction and its error.
    ///
    /// What it writes: the whole length of SOURCE to the first TARGETs of each configuration
    /// (every TARGET must exist: an NBD export, a file or a block device; nothing is created or
    /// removed).
    ValidateLink(ValidateLinkArgs),
    /// Run a scenario file in virtual time and report duration, throughput, outcomes, queue
    /// depth and foreground latency with and without the jobs.
    Run(SimRunArgs),
    /// Run a scenario for every combination of values of some of its keys, in parallel, and
    /// rank them by a metric.
    Sweep(SimSweepArgs),
}

/// `kcopyd sim calibrate`.
#[derive(Debug, Clone, Args)]
pub struct CalibrateArgs {
    /// The file or block device to measure (see above for what is written).
    #[arg(value_name = "DEVICE")]
    pub device: PathBuf,
    /// Write the model here (TOML) instead of to stdout; checked before measuring, and never
    /// DEVICE itself or a block device.
    #[arg(long, value_name = "MODEL.toml")]
    pub out: Option<PathBuf>,
    /// Length of the file created when DEVICE does not exist.
    #[arg(long = "size", value_name = "SIZE", default_value = "1G", value_parser = size::parse_size)]
    pub size_bytes: u64,
    /// Keep the file created when DEVICE did not exist.
    #[arg(long)]
    pub keep: bool,
    /// Where the scratch range of an existing DEVICE starts.
    #[arg(long = "scratch-offset", value_name = "OFFSET", default_value = "0", value_parser = size::parse_size)]
    pub scratch_offset_bytes: u64,
    /// Bytes of an existing DEVICE that calibration may overwrite (required for one).
    #[arg(long = "scratch-length", value_name = "LEN", value_parser = size::parse_size)]
    pub scratch_length_bytes: Option<u64>,
    /// I/O sizes to measure, comma-separated.
    #[arg(long = "io-sizes", value_name = "SIZES", value_delimiter = ',', default_value = "4K,16K,64K,256K,1M,4M", value_parser = size::parse_size)]
    pub io_sizes_bytes: Vec<u64>,
    /// Requests in flight to measure, comma-separated (1 to 32).
    #[arg(long = "queue-depths", value_name = "DEPTHS", value_delimiter = ',', default_value = "1,4,16,32")]
    pub queue_depths: Vec<usize>,
    /// How long each point runs: 5ms to 60s.
    #[arg(long = "point-time", value_name = "DURATION", default_value = "250ms", value_parser = size::parse_duration_us)]
    pub point_time_us: u64,
    /// Rounds over every point (1 to 20); each point's median round counts.
    #[arg(long, value_name = "COUNT", default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=20))]
    pub rounds: u16,
    /// No progress bar and no table.
    #[arg(long, short)]
    pub quiet: bool,
}

/// `kcopyd sim validate`.
#[derive(Debug, Clone, Args)]
pub struct ValidateArgs {
    /// The file or block device to copy from (read only).
    #[arg(value_name = "SOURCE")]
    pub source: PathBuf,
    /// The file to copy to (see above for what is written).
    #[arg(value_name = "TARGET")]
    pub target: PathBuf,
    /// The disk model (from `kcopyd sim calibrate`); without it SOURCE's device is
    /// calibrated first, in a scratch file next to TARGET.
    #[arg(long, value_name = "MODEL.toml")]
    pub model: Option<PathBuf>,
    /// Configurations to run, comma-separated, each SUBJOB_SIZExIN_FLIGHTxTARGETS.
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "1Mx4x1,256Kx4x1,64Kx8x1,1Mx1x1,2Mx8x1,1Mx4x3"
    )]
    pub configs: Vec<String>,
    /// Rounds, memory and report.
    #[command(flatten)]
    pub run: ValidationRunArgs,
}

/// The rounds, memory and report of `kcopyd sim validate` and `validate-link`.
#[derive(Debug, Clone, Args)]
pub struct ValidationRunArgs {
    /// Rounds of real copies; each configuration's median counts.
    #[arg(long, value_name = "COUNT", default_value_t = 3)]
    pub runs: usize,
    /// Memory for copy buffers (the page budget) of every copy, real and simulated.
    #[arg(long = "memory", value_name = "SIZE", default_value = MEMORY_DEFAULT, value_parser = size::parse_size)]
    pub memory_bytes: u64,
    /// Print one JSON object with the results instead of the table.
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

/// Which end of a copy is behind the link (`kcopyd sim validate-link --remote`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RemoteArg {
    /// The source is read over the link.
    Source,
    /// The targets are written over the link.
    Target,
    /// Both ends, each behind a link of its own.
    Both,
}

/// `kcopyd sim validate-link`.
#[derive(Debug, Clone, Args)]
pub struct ValidateLinkArgs {
    /// The device to copy from (read only), e.g. nbd+unix:///?socket=/tmp/source.sock.
    #[arg(value_name = "SOURCE", value_parser = parse_device)]
    pub source: DeviceAddress,
    /// The devices to copy to, as many as the configurations' targets (see above).
    #[arg(value_name = "TARGET", required = true, value_parser = parse_device)]
    pub targets: Vec<DeviceAddress>,
    /// The link's round trip: the time every request waits besides its bytes (nbdkit's
    /// delay-read / delay-write), e.g. 5ms.
    #[arg(long = "link-rtt", value_name = "DURATION", value_parser = size::parse_duration_us)]
    pub link_rtt_us: u64,
    /// The link's payload rate in each direction, bytes per second (nbdkit's rate= is in
    /// bits: rate=400000000 is 50000000 here); 0: no limit.
    #[arg(long = "link-bandwidth", value_name = "RATE", value_parser = size::parse_rate)]
    pub link_bandwidth_bytes_per_s: u64,
    /// Bytes that cross at once after the link was idle (a token bucket's capacity: nbdkit's
    /// rate × burstiness, in bytes).
    #[arg(long = "link-burst", value_name = "SIZE", default_value = "0", value_parser = size::parse_size)]
    pub link_burst_bytes: u64,
    /// Which end is behind the link.
    #[arg(long, value_name = "END", value_enum, default_value_t = RemoteArg::Target)]
    pub remote: RemoteArg,
    /// The disk model behind the link and of the local end (from `kcopyd sim calibrate`, or
    /// written by hand); without it the disks take no time and the link is all there is.
    #[arg(long, value_name = "MODEL.toml")]
    pub model: Option<PathBuf>,
    /// Configurations to run, comma-separated, each SUB_JOB_SIZExIN_FLIGHTxTARGETS.
    #[arg(long, value_name = "LIST", value_delimiter = ',', default_value = "1Mx1x1,1Mx4x1,1Mx16x1")]
    pub configs: Vec<String>,
    /// Rounds, memory and report.
    #[command(flatten)]
    pub run: ValidationRunArgs,
}

/// `kcopyd map ...`.
#[derive(Debug, Subcommand)]
pub enum MapCommand {
    /// Print what a copy map records: its copy, then done, failed and remaining byte ranges.
    Show {
        /// The map file.
        #[arg(value_name = "FILE")]
        file: std::path::PathBuf,
    },
}

/// Options of the engine, shared by `copy`, `zero` and `verify`.
#[derive(Debug, Clone, Args)]
pub struct EngineArgs {
    /// Bytes per sub-job (each I/O): a multiple of 512, at most 64M [default: 1M; 2M when the
    /// source or a target is an NBD export].
    #[arg(
        long = "subjob-size",
        alias = "sub-job-size",
        value_name = "SIZE",
        value_parser = size::parse_size,
        allow_negative_numbers = true,
    )]
    pub subjob_size_bytes: Option<u64>,
    /// Sub-jobs kept in flight: 1 to 1024 [default: 4; 8 when the source or a target is an NBD
    /// export].
    #[arg(long, value_name = "COUNT")]
    pub subjobs_in_flight: Option<usize>,
    /// Memory for copy buffers (the page budget), e.g. 64M; at least 4K. Each sub-job in
    /// flight holds its size of it [default: 16M, or --subjobs-in-flight × --subjob-size when
    /// that is more, up to 1G].
    #[arg(long = "memory", value_name = "SIZE", value_parser = size::parse_size, allow_negative_numbers = true)]
    pub memory_bytes: Option<u64>,
    /// Go through the page cache instead of O_DIRECT (for filesystems without direct I/O).
    #[arg(long)]
    pub buffered: bool,
    /// How files and block devices do I/O: `sync` (blocking preadv/pwritev, a thread per
    /// sub-job in flight) or `uring` (io_uring, one ring per device; needs a kcopyd built with
    /// the `io-uring` feature).
    #[arg(long = "io-engine", value_name = "ENGINE", value_enum, default_value_t = IoEngineArg::Sync)]
    pub io_engine: IoEngineArg,
    /// Keep copy buffers on 4 KiB pages instead of transparent huge pages (each I/O then
    /// carries one scatter-gather segment per 4 KiB; for comparisons).
    #[arg(long)]
    pub no_huge_pages: bool,
    /// NBD exports: connections opened to each export whose server allows several
    /// (NBD_FLAG_CAN_MULTI_CONN), 1 to 16; requests are spread over them. A server without
    /// multi-conn gets one, and a command that asked for more says so [default: 4; 1 when the
    /// command names 3 or more NBD exports].
    #[arg(long = "connections", value_name = "COUNT", allow_negative_numbers = true)]
    pub connections: Option<u64>,
    /// NBD exports: how long connecting and the handshake of each connection may take
    /// (e.g. 500ms, 10s). A server that does not answer in time is refused (exit 2).
    #[arg(long = "connect-timeout", value_name = "DURATION", default_value = CONNECT_TIMEOUT_DEFAULT, value_parser = size::parse_duration_us)]
    pub connect_timeout_us: u64,
    /// Most time one I/O request may take (e.g. 30s); past it the request fails with ETIMEDOUT
    /// and its range is reported like any error (exit 1). An NBD server that stalls that long
    /// is disconnected. Off by default: requests wait for ever, as the kernel's do.
    #[arg(long = "io-timeout", value_name = "DURATION", value_parser = size::parse_duration_us)]
    pub io_timeout_us: Option<u64>,
    /// NBD over TLS (nbds://, nbds+unix://): the directory holding ca-cert.pem (the CA the
    /// server's certificate must chain to), and client-cert.pem with client-key.pem for
    /// servers that verify their clients. A URI's own tls-certificates wins. Without either,
    /// the system's CA bundle.
    #[arg(long = "tls-certificates", value_name = "DIR")]
    pub tls_certificates: Option<PathBuf>,
    /// NBD over TLS: whether the server's certificate is verified (on by default). Off, the
    /// data is still encrypted but the server may be anyone: kcopyd warns on standard error.
    /// A URI's own tls-verify-peer wins.
    #[arg(long = "tls-verify-peer", value_name = "on|off", value_parser = parse_on_off)]
    pub tls_verify_peer: Option<bool>,
    /// NBD over TLS: the name the server's certificate must hold (by default the URI's host;
    /// "localhost" for a unix socket). A URI's own tls-hostname wins.
    #[arg(long = "tls-hostname", value_name = "NAME")]
    pub tls_hostname: Option<String>,
    /// NBD exports: do not read the first MiBs of each export once before a long copy or
    /// verify. That read (at most 1/64 of the range) lets a server such as qemu-nbd serve the
    /// copy's requests from memory it keeps instead of mapping fresh pages for each: half its
    /// CPU (docs/NBD.md, "Warming the server up").
    #[arg(long = "no-warm-up")]
    pub no_warm_up: bool,
}

/// The engine's throttle, for `copy` and `zero`: both limits off unless given.
#[derive(Debug, Clone, Default, Args)]
pub struct ThrottleArgs {
    /// Most share of time, in percent (1 to 100), that the copy's I/O may be active, leaving
    /// the rest to other users of the devices (as dm-kcopyd's throttle).
    #[arg(long = "throttle-busy", value_name = "PERCENT")]
    pub busy_percent: Option<u32>,
    /// Most bytes per second the copy moves, e.g. 100M (sizes as elsewhere; `/s` allowed).
    #[arg(long = "throttle-rate", value_name = "SIZE", value_parser = size::parse_rate, allow_negative_numbers = true)]
    pub rate_bytes_per_s: Option<u64>,
}

/// Parses `on` or `off` (and their usual synonyms).
fn parse_on_off(text: &str) -> Result<bool, String> {
    match text {
        "on" | "yes" | "true" | "1" => Ok(true),
        "off" | "no" | "false" | "0" => Ok(false),
        _ => Err(format!("{text:?}: expected on or off")),
    }
}

/// The values of `--io-engine`. Both always parse, so that a build without io_uring can name
/// the flag when it refuses `uring`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IoEngineArg {
    /// Blocking `preadv`/`pwritev` on a pool of threads.
    Sync,
    /// io_uring.
    Uring,
}

/// Options of the report.
#[derive(Debug, Clone, Args)]
pub struct OutputArgs {
    /// Print one JSON object with the result on stdout instead of the summary.
    #[arg(long)]
    pub json: bool,
    /// No progress, and no summary unless something went wrong.
    #[arg(long, short)]
    pub quiet: bool,
}

/// `kcopyd copy`.
#[derive(Debug, Clone, Args)]
pub struct CopyArgs {
    /// The device to copy from (opened read-only).
    #[arg(value_name = "SOURCE", value_parser = parse_device)]
    pub source: DeviceAddress,
    /// The devices to copy to, 1 to 128. A missing file is created with the length it needs.
    #[arg(value_name = "TARGET", required = true, value_parser = parse_device)]
    pub targets: Vec<DeviceAddress>,
    /// Bytes to copy [default: from the source offset to the end of the source].
    #[arg(long = "length", short, value_name = "LEN", value_parser = size::parse_size, allow_negative_numbers = true)]
    pub length_bytes: Option<u64>,
    /// Keep going after read and write errors; report the blocks that failed.
    #[arg(long)]
    pub ignore_errors: bool,
    /// Write each target in increasing order (for zoned or append-only devices).
    #[arg(long)]
    pub write_seq: bool,
    /// Read the targets back after copying and compare them with the source.
    #[arg(long)]
    pub verify: bool,
    /// Sparse copy, `on` by default (as qemu-img): read only what the source has allocated
    /// (files: SEEK_DATA), and where the source reads as zeroes (holes, and zero blocks of
    /// --sparse-size) punch holes in file targets and NBD exports that can, or write-zeroes elsewhere. Never leaves old
    /// target data where the source reads as zeroes. `--sparse=off` reads and writes every byte.
    #[arg(
        long,
        value_name = "on|off",
        default_value = "on",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "on",
        value_parser = parse_on_off,
    )]
    pub sparse: bool,
    /// The same as `--sparse=off`.
    #[arg(long, conflicts_with = "sparse")]
    pub no_sparse: bool,
    /// With --sparse: blocks of this size that read as all zeroes are written as zeroes (a
    /// hole), as `qemu-img -S`; a power of two of at least 512, or 0 to scan for none
    /// [default: 4K]. Refused with --sparse=off, which scans for nothing.
    #[arg(
        long = "sparse-size",
        short = 'S',
        value_name = "SIZE",
        value_parser = size::parse_size,
        allow_negative_numbers = true,
    )]
    pub sparse_size_bytes: Option<u64>,
    /// Record in FILE which ranges are copied, failed to read and failed to write (appended
    /// and fsynced after every batch); run the same command with the same FILE again to copy
    /// only what is not done. FILE records which devices it is for (a file's inode, size and
    /// birth time; a block device's number, size and ids) and is locked for the run: a FILE
    /// written for another copy, or for a device that changed since (deleted, replaced,
    /// resized), is refused, naming it; delete FILE to start over.
    #[arg(long, value_name = "FILE")]
    pub map: Option<std::path::PathBuf>,
    /// With --map: bytes per batch (one flush of the targets and one fsync of the map); a
    /// crash redoes at most one batch.
    #[arg(
        long = "map-batch",
        value_name = "SIZE",
        default_value = kcopyd_tool::map::BATCH_DEFAULT,
        value_parser = size::parse_size,
        allow_negative_numbers = true,
    )]
    pub map_batch_bytes: u64,
    /// With --map: copy only the ranges the map records as failed, with --ignore-errors (so
    /// that unreadable blocks are narrowed down again). With no map yet, or nothing failed, it
    /// says so and exits 0.
    #[arg(long, requires = "map")]
    pub retry_failed: bool,
    /// Every target already reads as zeroes (a new file, a fresh thin volume): write nothing
    /// where the source reads as zeroes. Needs --sparse. Wrong, and the copy is wrong, if a
    /// target holds anything else.
    #[arg(long)]
    pub target_is_zero: bool,
    /// Engine options.
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Throttle options.
    #[command(flatten)]
    pub throttle: ThrottleArgs,
    /// Report options.
    #[command(flatten)]
    pub output: OutputArgs,
}

/// `kcopyd zero`.
#[derive(Debug, Clone, Args)]
pub struct ZeroArgs {
    /// The devices to zero, 1 to 128 (they must exist).
    #[arg(value_name = "TARGET", required = true, value_parser = parse_device)]
    pub targets: Vec<DeviceAddress>,
    /// Bytes to zero [default: from the offset to the end; then every target must have the
    /// same length from its offset].
    #[arg(long = "length", short, value_name = "LEN", value_parser = size::parse_size, allow_negative_numbers = true)]
    pub length_bytes: Option<u64>,
    /// Keep going after write errors.
    #[arg(long)]
    pub ignore_errors: bool,
    /// Write each target in increasing order.
    #[arg(long)]
    pub write_seq: bool,
    /// Engine options.
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Throttle options.
    #[command(flatten)]
    pub throttle: ThrottleArgs,
    /// Report options.
    #[command(flatten)]
    pub output: OutputArgs,
}

/// `kcopyd verify`.
#[derive(Debug, Clone, Args)]
pub struct VerifyArgs {
    /// The reference device.
    #[arg(value_name = "SOURCE", value_parser = parse_device)]
    pub source: DeviceAddress,
    /// The devices to compare with it, 1 to 128.
    #[arg(value_name = "TARGET", required = true, value_parser = parse_device)]
    pub targets: Vec<DeviceAddress>,
    /// Bytes to compare [default: from the source offset to the end of the source].
    #[arg(long = "length", short, value_name = "LEN", value_parser = size::parse_size, allow_negative_numbers = true)]
    pub length_bytes: Option<u64>,
    /// Engine options (sub-job size = bytes per read).
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Report options.
    #[command(flatten)]
    pub output: OutputArgs,
}

/// `kcopyd demo`.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Size of the simulated disks (each of four holds it in memory).
    #[arg(
        long = "size",
        value_name = "SIZE",
        default_value = "256M",
        value_parser = size::parse_size,
        allow_negative_numbers = true,
    )]
    pub size_bytes: u64,
    /// After the copy, change one copied sector of the first target behind the engine's back:
    /// the check must then fail (exit 1), showing that it looks at the data.
    #[arg(long)]
    pub tamper: bool,
    /// No progress bars.
    #[arg(long, short)]
    pub quiet: bool,
}

/// `kcopyd sim run`.
#[derive(Debug, Clone, Args)]
pub struct SimRunArgs {
    /// The scenario (TOML; see docs/EXPLORATION.md).
    #[arg(value_name = "SCENARIO")]
    pub scenario: std::path::PathBuf,
    /// Change a key of the scenario before running, by dotted path (e.g.
    /// `disks.primary.len_sectors=1G`); may be repeated.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Print one JSON object instead of the summary.
    #[arg(long)]
    pub json: bool,
    /// Draw throughput and foreground latency over virtual time into this SVG file.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<std::path::PathBuf>,
}

/// `kcopyd sim sweep`.
#[derive(Debug, Clone, Args)]
pub struct SimSweepArgs {
    /// The scenario (TOML; see docs/EXPLORATION.md).
    #[arg(value_name = "SCENARIO")]
    pub scenario: std::path::PathBuf,
    /// A key by dotted path and its values, e.g. `client.subjob_size_bytes=64K,256K,1M`;
    /// repeat for a cross product.
    #[arg(long = "vary", value_name = "KEY=V1,V2,...", required = true)]
    pub vary: Vec<String>,
    /// Change a key of the scenario for every point, as `run --set`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// The metric the table is sorted by, best first: throughput_mb_per_s, copy_seconds,
    /// fg_p50_ms, fg_p99_ms, fg_p999_ms, job_p50_ms, job_p99_ms, pages_in_use_max or
    /// not_copied_sectors (see docs/EXPLORATION.md).
    #[arg(long, value_name = "NAME", default_value = "throughput_mb_per_s")]
    pub metric: String,
    /// Simulations run at once [default: the number of cores].
    #[arg(long, value_name = "COUNT")]
    pub threads: Option<usize>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Plot the metric into this SVG file: a line for one varied key, a heat map for two.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<std::path::PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_commands_defaults_are_the_librarys() {
        let library = kcopyd_core::ClientConfig::default();
        assert_eq!(size::parse_size(SUBJOB_SIZE_DEFAULT).unwrap(), library.subjob_size_bytes as u64);
        assert_eq!(SUBJOBS_IN_FLIGHT_DEFAULT, library.subjobs_in_flight);
        assert_eq!(size::parse_size(MEMORY_DEFAULT).unwrap(), library.page_budget_bytes() as u64);
        // `--subjob-size`'s default is written in its help, with the NBD one.
        let mut command = <Cli as clap::CommandFactory>::command();
        let help = command.find_subcommand_mut("copy").unwrap().render_long_help().to_string();
        let nbd = kcopyd_tool::options::NBD_SUBJOB_SIZE_DEFAULT_BYTES >> 20;
        let written = format!("[default: {SUBJOB_SIZE_DEFAULT}; {nbd}M when the source or a target is an NBD export]");
        assert!(help.replace("\n ", "").split_whitespace().collect::<Vec<_>>().join(" ").contains(&written), "{help}");
    }
}

/// Reads a device argument (clap's value parser): `sim:` options by [`kcopyd_sim::spec::SimSpec`].
///
/// # Errors
/// A malformed argument, named.
pub fn parse_device(text: &str) -> Result<DeviceAddress, AddressError> {
    DeviceAddress::parse(text, &kcopyd_tool::address::parse_sim_spec)
}

/// Regions hydrated at once by default (4 MiB in flight at the default region size).
pub const HYDRATION_THRESHOLD_DEFAULT: u32 = 64;
/// Contiguous regions per copy job by default (1 MiB jobs at the default region size).
pub const HYDRATION_BATCH_SIZE_DEFAULT: u32 = 16;

/// Examples shown under `kcopyd clone --help`.
pub const CLONE_EXAMPLES: &str = "\
Examples:
  kcopyd clone nbd://backup-host/disk clone.img --metadata clone.meta --serve nbd+unix:///?socket=/run/clone.sock
      Serve clone.img at once over a unix socket while it fills from the remote export.
  kcopyd clone disk.img clone.img --metadata clone.meta --serve nbd://127.0.0.1:10809 --throttle-rate 50M
      The same on loopback TCP, hydrating at most 50 MB/s.

Run the same command again after a stop or a crash: it resumes from FILE.";

/// `kcopyd clone`.
#[derive(Debug, Clone, Args)]
pub struct CloneArgs {
    /// The device to clone (only ever read).
    #[arg(value_name = "SOURCE", value_parser = parse_device)]
    pub source: DeviceAddress,
    /// The destination: a missing file is created with SOURCE's length.
    #[arg(value_name = "DEST", value_parser = parse_device)]
    pub destination: DeviceAddress,
    /// The metadata file: created if missing; after a stop or a crash the same FILE resumes
    /// the clone. It records which SOURCE and DEST it is for and is refused for others.
    #[arg(long, value_name = "FILE")]
    pub metadata: PathBuf,
    /// Where to serve the clone: `nbd+unix:///[EXPORT]?socket=PATH` or
    /// `nbd://127.0.0.1:PORT[/EXPORT]` (loopback only: NBD has no authentication here).
    #[arg(long, value_name = "URI")]
    pub serve: String,
    /// Region size (a power of two, 4K to 1G) of a new clone [default: 64K]; a resumed clone
    /// keeps its own, and a different one given is refused.
    #[arg(long = "region-size", value_name = "SIZE", value_parser = size::parse_size)]
    pub region_size_bytes: Option<u64>,
    /// Regions hydrated at once.
    #[arg(long, value_name = "COUNT", default_value_t = HYDRATION_THRESHOLD_DEFAULT)]
    pub hydration_threshold: u32,
    /// Contiguous regions copied by one job.
    #[arg(long, value_name = "COUNT", default_value_t = HYDRATION_BATCH_SIZE_DEFAULT)]
    pub hydration_batch_size: u32,
    /// Background commits of the metadata at least this often while regions hydrate (a crash
    /// copies again what hydrated since the last commit); a flush from a client commits too.
    #[arg(long = "commit-interval", value_name = "DURATION", default_value = "1s", value_parser = size::parse_duration_us)]
    pub commit_interval_us: u64,
    /// Exit (status 0) once hydration is complete, instead of serving until a signal.
    #[arg(long)]
    pub exit_when_hydrated: bool,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
    /// Engine options (the hydration's copies).
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Throttle of the hydration.
    #[command(flatten)]
    pub throttle: ThrottleArgs,
}
