//! The command line: subcommands and options (clap derive).

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::device_arg::DeviceArg;
use crate::size;

/// Bytes per sub-job by default: one read of the source and one write per target. The
/// library's [`kcopyd_core::SUB_JOB_SIZE_DEFAULT_BYTES`], written for `--help`.
///
/// Chosen by measurement (docs/BENCHMARKS.md): on this project's machines, alternating
/// shapes in one run, 4 × 1 MiB in flight copied fastest to 1 and to 3 targets; deeper
/// queues (8 × 2 MiB, 32 × 2 MiB) were 5–25 % slower there, because the virtual disk shares
/// one bandwidth between reads and writes. Faster storage may want more in flight.
pub const SUB_JOB_SIZE_DEFAULT: &str = "1M";
/// Sub-jobs kept in flight by default: the library's.
pub const SUBJOBS_IN_FLIGHT_DEFAULT: usize = kcopyd_core::SUBJOBS_IN_FLIGHT_DEFAULT;
/// The page budget by default: the library's [`kcopyd_core::PAGE_BUDGET_DEFAULT`] (four times
/// what the default sub-jobs in flight take, so that reads can run ahead while several
/// targets are still being written), written for `--help`.
pub const MEMORY_DEFAULT: &str = "16M";

/// kcopyd: copy, zero and compare block ranges on files, block devices and simulated disks,
/// with the kcopyd engine.
///
/// Devices are `PATH`, `PATH@OFFSET` or `sim:KEY=VALUE,...` (also with `@OFFSET`). Sizes and
/// offsets are bytes, or take binary units: K, M, G, T (or KiB, MiB, ...), s for 512-byte
/// sectors. Exit status: 0 success, 1 read or write errors or differences, 2 bad usage (nothing
/// written), 130 interrupted.
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
}

/// Options of the engine, shared by `copy`, `zero` and `verify`.
#[derive(Debug, Clone, Args)]
pub struct EngineArgs {
    /// Bytes per sub-job (each I/O): a multiple of 512, at most 64M.
    #[arg(
        long = "sub-job-size",
        value_name = "SIZE",
        default_value = SUB_JOB_SIZE_DEFAULT,
        value_parser = size::parse_size,
        allow_negative_numbers = true,
    )]
    pub sub_job_size_bytes: u64,
    /// Sub-jobs kept in flight: 1 to 1024.
    #[arg(long, value_name = "COUNT", default_value_t = SUBJOBS_IN_FLIGHT_DEFAULT)]
    pub subjobs_in_flight: usize,
    /// Memory for copy buffers (the page budget), e.g. 64M; at least 4K.
    #[arg(
        long = "memory",
        value_name = "SIZE",
        default_value = MEMORY_DEFAULT,
        value_parser = size::parse_size,
        allow_negative_numbers = true,
    )]
    pub memory_bytes: u64,
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
    #[arg(value_name = "SOURCE", value_parser = DeviceArg::parse)]
    pub source: DeviceArg,
    /// The devices to copy to, 1 to 128. A missing file is created with the length it needs.
    #[arg(value_name = "TARGET", required = true, value_parser = DeviceArg::parse)]
    pub targets: Vec<DeviceArg>,
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
    #[arg(value_name = "TARGET", required = true, value_parser = DeviceArg::parse)]
    pub targets: Vec<DeviceArg>,
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
    #[arg(value_name = "SOURCE", value_parser = DeviceArg::parse)]
    pub source: DeviceArg,
    /// The devices to compare with it, 1 to 128.
    #[arg(value_name = "TARGET", required = true, value_parser = DeviceArg::parse)]
    pub targets: Vec<DeviceArg>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_commands_defaults_are_the_librarys() {
        let library = kcopyd_core::ClientConfig::default();
        assert_eq!(size::parse_size(SUB_JOB_SIZE_DEFAULT).unwrap(), library.sub_job_size_bytes as u64);
        assert_eq!(SUBJOBS_IN_FLIGHT_DEFAULT, library.subjobs_in_flight);
        assert_eq!(size::parse_size(MEMORY_DEFAULT).unwrap(), library.page_budget_bytes() as u64);
    }
}
