//! Options of a copy, zero or verify command, checked into the library's settings: the page
//! budget, NBD connections, timeouts and TLS, and sparse copies. Each check returns an
//! [`OptionError`] naming what was wrong, so that a command can name its own option for it
//! (the `kcopyd` command names `--memory`, `--connections`, `--sparse-size`, ...).
//!
//! ```text
//!  memory bytes (or none: memory_default) ──► check_memory, client_config ─► ClientConfig
//!  memory, sub-job size, sub-jobs in flight ─► subjobs_held, memory_for_subjobs
//!  connections, timeouts, TLS, NBD exports ──► nbd_settings ─► NbdSettings
//!  TLS options, devices ─────────────────────► unverified_tls_exports (what to warn about)
//!  sparse on/off, zero-scan size, target zero ► sparse ─► kcopyd_core::Sparse
//! ```

use kcopyd_core::{ClientConfig, PAGE_SIZE, SECTOR_SIZE, Sparse, TargetZeroes};
use kcopyd_nbd::{NbdUri, TlsOptions};
use kcopyd_sim::units::Bytes;

use crate::{Backend, DeviceAddress, NbdSettings};

/// Sub-jobs kept in flight by default when the source or a target is an NBD export.
///
/// Chosen by measurement (docs/BENCHMARKS.md, "NBD copies"): between qemu-nbd exports each
/// 1 MiB sub-job waits for a request's round trip through the server as well as the disk, so
/// 4 in flight left the disk idle part of the time; 8 × 1 MiB copied one export to one
/// target about 20 % faster and to three targets about 22 % faster, 16 no faster than 8.
pub const NBD_SUBJOBS_IN_FLIGHT_DEFAULT: usize = 8;
/// Bytes per sub-job by default when the source or a target is an NBD export: with
/// [`NBD_SUBJOBS_IN_FLIGHT_DEFAULT`] of them, 16 MiB in flight, the whole default page budget,
/// and as much as the disk's ceiling keeps in flight (fio, 8 × 1 MiB reads and 8 × 1 MiB
/// writes). Measured (docs/BENCHMARKS.md, "NBD copies"): between qemu-nbd exports on disk,
/// 0.98–0.99 × the disk's ceiling for one target against 1.05–1.11 × with 1 MiB.
pub const NBD_SUBJOB_SIZE_DEFAULT_BYTES: u64 = 2 << 20;
/// Connections per NBD export when the command names fewer than
/// [`NBD_MANY_EXPORTS`] exports: as nbdcopy opens. Measured in docs/NBD.md ("How many
/// connections"): between qemu-nbd exports on one machine 4 copied one target as fast as 1
/// from disk and 8 % faster from RAM.
pub const NBD_CONNECTIONS_DEFAULT: usize = kcopyd_nbd::CONNECTIONS_DEFAULT;
/// From this many NBD exports in one command (a source and two targets, say), each gets
/// [`NBD_CONNECTIONS_MANY_EXPORTS`] connection: a copy to three targets was faster with one
/// connection per export than with four in 13 of 15 alternating rounds (median 0.87 of the
/// time), and no slower from RAM.
pub const NBD_MANY_EXPORTS: usize = 3;
/// Connections per NBD export when the command names [`NBD_MANY_EXPORTS`] or more.
pub const NBD_CONNECTIONS_MANY_EXPORTS: usize = 1;
/// The largest page budget the engine takes (`ClientConfig::validate` counts pages in 32 bits):
/// 16 TiB less one page.
pub const MEMORY_PAGES_MAX: u64 = u32::MAX as u64;
/// The most the page budget grows to by itself ([`memory_default`]) to hold the sub-jobs in
/// flight that were asked for: 1 GiB. Past it fewer run at once, unless a budget is given.
pub const MEMORY_AUTO_MAX_BYTES: u64 = 1 << 30;
/// The zero-scan block of sparse copies by default (as `qemu-img convert -S`), in bytes.
pub const SPARSE_SIZE_DEFAULT_BYTES: u64 = 4096;

/// Which TLS option was given without a TLS export to use it with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsOption {
    /// The directory of certificates ([`TlsOptions::certificates`]).
    Certificates,
    /// Whether the server's certificate is verified ([`TlsOptions::verify_peer`]).
    VerifyPeer,
    /// The name the server's certificate must hold ([`TlsOptions::hostname`]).
    Hostname,
}

/// An option out of bounds, or given where it means nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    /// A page budget of less than one page.
    #[error("{} is less than one {PAGE_SIZE}-byte page", Bytes(*memory_bytes))]
    MemoryTooSmall {
        /// The budget asked for.
        memory_bytes: u64,
    },
    /// A page budget of more than [`MEMORY_PAGES_MAX`] pages.
    #[error(
        "{} is more than the largest budget, {} ({} bytes)",
        Bytes(*memory_bytes),
        Bytes(MEMORY_PAGES_MAX * PAGE_SIZE as u64),
        MEMORY_PAGES_MAX * PAGE_SIZE as u64
    )]
    MemoryTooLarge {
        /// The budget asked for.
        memory_bytes: u64,
    },
    /// Connections per export outside 1 to [`kcopyd_nbd::CONNECTIONS_MAX`].
    #[error("must be 1 to {}", kcopyd_nbd::CONNECTIONS_MAX)]
    Connections {
        /// The count asked for.
        count: u64,
    },
    /// A connect timeout under a millisecond.
    #[error("must be at least 1ms")]
    ConnectTimeout {
        /// The timeout asked for, in microseconds.
        timeout_us: u64,
    },
    /// An I/O timeout under a millisecond.
    #[error("must be at least 1ms")]
    IoTimeout {
        /// The timeout asked for, in microseconds.
        timeout_us: u64,
    },
    /// A TLS option while no device is an `nbds://` or `nbds+unix://` export.
    #[error("no nbds:// or nbds+unix:// device to use it with (nbd:// is never encrypted)")]
    TlsWithoutTlsExport {
        /// The option given.
        option: TlsOption,
        /// Its value, as written.
        text: String,
    },
    /// A zero-scan size for a copy that is not sparse.
    #[error("sets the zero scan of a sparse copy, and this copy is not sparse")]
    SparseSizeNotSparse {
        /// The size asked for.
        size_bytes: u64,
    },
    /// A zero-scan size that is neither 0 nor a power of two from 512 to 2 GiB.
    #[error("must be 0 (no zero scan) or a power of two from 512 to 2G")]
    SparseSize {
        /// The size asked for.
        size_bytes: u64,
    },
    /// Targets said to read as zeroes, for a copy that is not sparse.
    #[error("needs a sparse copy, and this copy is not sparse")]
    TargetIsZeroNotSparse,
}

/// Refuses a page budget of less than a page or more than the engine counts.
///
/// # Errors
/// [`OptionError::MemoryTooSmall`] or [`OptionError::MemoryTooLarge`].
pub fn check_memory(memory_bytes: u64) -> Result<(), OptionError> {
    if memory_bytes < PAGE_SIZE as u64 {
        return Err(OptionError::MemoryTooSmall { memory_bytes });
    }
    if memory_bytes > MEMORY_PAGES_MAX * PAGE_SIZE as u64 {
        return Err(OptionError::MemoryTooLarge { memory_bytes });
    }
    Ok(())
}

/// The page budget of a command that names none: the engine's default
/// ([`kcopyd_core::PAGE_BUDGET_DEFAULT`] pages, 16 MiB), or what `subjobs_in_flight` sub-jobs of
/// `subjob_size_bytes` hold at once when that is more, up to [`MEMORY_AUTO_MAX_BYTES`]. A
/// sub-job holds its pages until every target is written, so a budget smaller than that
/// product would quietly run fewer sub-jobs than asked for.
///
/// Worked example: 16 sub-jobs of 2 MiB take 32 MiB; 4 of 1 MiB keep the default 16 MiB;
/// 1024 of 64 MiB stop at 1 GiB (16 of them at once).
pub fn memory_default(subjob_size_bytes: u64, subjobs_in_flight: usize) -> u64 {
    let engine_default = ClientConfig::default().page_budget_bytes() as u64;
    memory_for_subjobs(subjob_size_bytes, subjobs_in_flight).min(MEMORY_AUTO_MAX_BYTES).max(engine_default)
}

/// The page budget that runs `subjobs_in_flight` sub-jobs of `subjob_size_bytes` at once: each
/// takes whole pages (saturating).
pub fn memory_for_subjobs(subjob_size_bytes: u64, subjobs_in_flight: usize) -> u64 {
    subjob_pages(subjob_size_bytes).saturating_mul(PAGE_SIZE as u64).saturating_mul(subjobs_in_flight as u64)
}

/// The whole pages one sub-job of `subjob_size_bytes` holds (at least one).
fn subjob_pages(subjob_size_bytes: u64) -> u64 {
    subjob_size_bytes.div_ceil(PAGE_SIZE as u64).max(1)
}

/// How many of `subjobs_in_flight` sub-jobs of `subjob_size_bytes` a page budget of
/// `memory_bytes` runs at once (each holds its whole size in pages): fewer than asked for
/// when the budget is too small for them all, and one when it is smaller than a sub-job (the
/// engine then cuts the sub-jobs to the budget).
pub fn subjobs_held(memory_bytes: u64, subjob_size_bytes: u64, subjobs_in_flight: usize) -> usize {
    let pages = memory_bytes / PAGE_SIZE as u64;
    usize::try_from(pages / subjob_pages(subjob_size_bytes)).unwrap_or(usize::MAX).clamp(1, subjobs_in_flight.max(1))
}

/// The engine's defaults with a page budget of `memory_bytes` (whole pages), sub-jobs of
/// `subjob_size_bytes` and `subjobs_in_flight` of them; values past `usize` saturate, for
/// [`ClientConfig::validate`] to refuse.
pub fn client_config(memory_bytes: u64, subjob_size_bytes: u64, subjobs_in_flight: usize) -> ClientConfig {
    ClientConfig {
        page_budget: usize::try_from(memory_bytes / PAGE_SIZE as u64).unwrap_or(usize::MAX),
        subjob_size_bytes: usize::try_from(subjob_size_bytes).unwrap_or(usize::MAX),
        subjobs_in_flight,
        ..ClientConfig::default()
    }
}

/// How a command's NBD exports are opened: `connections` per export (1 to
/// [`kcopyd_nbd::CONNECTIONS_MAX`]; without it [`NBD_CONNECTIONS_DEFAULT`], or
/// [`NBD_CONNECTIONS_MANY_EXPORTS`] when the command names `nbd_exports` ≥
/// [`NBD_MANY_EXPORTS`] exports), the timeouts in microseconds (at least a millisecond each,
/// kept in whole milliseconds) and `tls`.
///
/// # Errors
/// A count or a timeout out of bounds.
pub fn nbd_settings(
    connections: Option<u64>,
    connect_timeout_us: u64,
    io_timeout_us: Option<u64>,
    tls: TlsOptions,
    nbd_exports: usize,
) -> Result<NbdSettings, OptionError> {
    let connections_max = match connections.map(usize::try_from) {
        None if nbd_exports >= NBD_MANY_EXPORTS => NBD_CONNECTIONS_MANY_EXPORTS,
        None => NBD_CONNECTIONS_DEFAULT,
        Some(Ok(count @ 1..=kcopyd_nbd::CONNECTIONS_MAX)) => count,
        Some(_) => return Err(OptionError::Connections { count: connections.unwrap_or_default() }),
    };
    if connect_timeout_us < 1000 {
        return Err(OptionError::ConnectTimeout { timeout_us: connect_timeout_us });
    }
    if let Some(timeout_us) = io_timeout_us.filter(|&us| us < 1000) {
        return Err(OptionError::IoTimeout { timeout_us });
    }
    Ok(NbdSettings {
        connections_max,
        connect_timeout_ms: connect_timeout_us / 1000,
        io_timeout_ms: io_timeout_us.map(|us| us / 1000),
        tls,
        warm_up: true,
    })
}

/// The URIs of the `nbds://` and `nbds+unix://` exports among `devices` whose server's
/// certificate will not be verified (their URI's TLS options, `tls` where it gives none), for
/// the caller to warn about. A plain `nbd://` export is never encrypted, whatever the options.
///
/// # Errors
/// [`OptionError::TlsWithoutTlsExport`] when `tls` sets anything (the first of certificates,
/// verify-peer, hostname) and no device is a TLS export.
pub fn unverified_tls_exports(devices: &[&DeviceAddress], tls: &TlsOptions) -> Result<Vec<String>, OptionError> {
    let tls_devices: Vec<(&str, TlsOptions)> = devices
        .iter()
        .filter_map(|device| match &device.backend {
            Backend::Nbd(uri) => NbdUri::parse(uri).ok()?.tls.map(|own| (uri.as_str(), own.or(tls))),
            _ => None,
        })
        .collect();
    if tls_devices.is_empty() {
        let given = [
            (TlsOption::Certificates, tls.certificates.as_ref().map(|dir| dir.display().to_string())),
            (TlsOption::VerifyPeer, tls.verify_peer.map(|on| if on { "on" } else { "off" }.to_owned())),
            (TlsOption::Hostname, tls.hostname.clone()),
        ];
        if let Some((option, Some(text))) = given.into_iter().find(|(_, text)| text.is_some()) {
            return Err(OptionError::TlsWithoutTlsExport { option, text });
        }
    }
    Ok(tls_devices.into_iter().filter(|(_, own)| !own.verifies_peer()).map(|(uri, _)| uri.to_owned()).collect())
}

/// The sparse copy asked for: `on` or not, blocks of `size_bytes` (default
/// [`SPARSE_SIZE_DEFAULT_BYTES`]; 0 scans for none) written as zeroes, and whether every
/// target already reads as zeroes (then nothing is written where the source does).
///
/// # Errors
/// A size for a copy that is not sparse, a size that is not 0 or a power of two from 512 to
/// 2 GiB, or `target_is_zero` for a copy that is not sparse.
pub fn sparse(on: bool, size_bytes: Option<u64>, target_is_zero: bool) -> Result<Sparse, OptionError> {
    if let (false, Some(size_bytes)) = (on, size_bytes) {
        return Err(OptionError::SparseSizeNotSparse { size_bytes });
    }
    let size = size_bytes.unwrap_or(SPARSE_SIZE_DEFAULT_BYTES);
    if size != 0 && (!size.is_power_of_two() || size < SECTOR_SIZE as u64 || size > u64::from(u32::MAX / 2 + 1)) {
        return Err(OptionError::SparseSize { size_bytes: size });
    }
    if target_is_zero && !on {
        return Err(OptionError::TargetIsZeroNotSparse);
    }
    if !on {
        return Ok(Sparse::OFF);
    }
    let target_zeroes = if target_is_zero { TargetZeroes::Skip } else { TargetZeroes::Deallocate };
    Ok(Sparse { skip_holes: true, zero_block_bytes: size as u32, target_zeroes })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(text: &str) -> DeviceAddress {
        DeviceAddress::parse(text, &crate::address::parse_sim_spec).unwrap()
    }

    #[test]
    fn the_default_budget_grows_to_hold_the_subjobs_asked_for_up_to_a_gib() {
        let (kib, mib) = (1u64 << 10, 1u64 << 20);
        assert_eq!(memory_default(mib, 4), 16 * mib, "the engine's default when it is enough");
        assert_eq!(memory_default(2 * mib, 8), 16 * mib);
        assert_eq!(memory_default(2 * mib, 9), 18 * mib);
        assert_eq!(memory_default(2 * mib, 16), 32 * mib);
        assert_eq!(memory_default(64 * mib, 1024), MEMORY_AUTO_MAX_BYTES);
        assert_eq!(memory_default(u64::MAX, usize::MAX), MEMORY_AUTO_MAX_BYTES, "saturates");
        // Sub-jobs take whole pages: 1024 of 33 KiB take 1024 x 36 KiB.
        assert_eq!(memory_default(33 * kib, 1024), 36 * mib);
        assert_eq!(memory_for_subjobs(33 * kib, 1024), 36 * mib);
        assert_eq!(memory_for_subjobs(512, 3), 3 * PAGE_SIZE as u64);
        assert_eq!(memory_for_subjobs(u64::MAX, 2), u64::MAX);
        assert_eq!(memory_default(64 * kib, 1), 16 * mib);
        assert_eq!(
            memory_default(mib, 1),
            (kcopyd_core::ClientConfig::default().page_budget * PAGE_SIZE) as u64,
            "the engine's own default"
        );
    }

    #[test]
    fn a_budget_holds_as_many_subjobs_as_their_pages_fit_and_never_more_than_asked() {
        let mib = 1u64 << 20;
        assert_eq!(subjobs_held(16 * mib, 2 * mib, 16), 8);
        assert_eq!(subjobs_held(16 * mib, 2 * mib, 8), 8);
        assert_eq!(subjobs_held(16 * mib, 2 * mib, 3), 3);
        assert_eq!(subjobs_held(32 * mib, 2 * mib, 16), 16);
        // A sub-job of part of a page still takes the whole page.
        assert_eq!(subjobs_held(8 * PAGE_SIZE as u64, 512, 100), 8);
        assert_eq!(subjobs_held(8 * PAGE_SIZE as u64, PAGE_SIZE as u64 + 512, 100), 4);
        assert_eq!(subjobs_held(mib, 2 * mib, 4), 1, "a budget smaller than a sub-job cuts it: one at a time");
        for (size, count) in [(mib, 4), (2 * mib, 16), (64 * mib, 1024), (3 * 512, 7), (33 << 10, 1024)] {
            let held = subjobs_held(memory_default(size, count), size, count);
            assert!(held == count || memory_default(size, count) == MEMORY_AUTO_MAX_BYTES, "{size} x {count}: {held}");
        }
    }

    #[test]
    fn the_memory_budget_is_one_page_to_the_largest_count() {
        assert_eq!(check_memory(PAGE_SIZE as u64 - 1), Err(OptionError::MemoryTooSmall { memory_bytes: 4095 }));
        assert_eq!(check_memory(PAGE_SIZE as u64), Ok(()));
        let max = MEMORY_PAGES_MAX * PAGE_SIZE as u64;
        assert_eq!(check_memory(max), Ok(()));
        assert_eq!(check_memory(max + 1), Err(OptionError::MemoryTooLarge { memory_bytes: max + 1 }));
        assert_eq!(client_config(64 << 10, 1 << 20, 3).page_budget, 16);
        assert_eq!(client_config(u64::MAX, u64::MAX, 3).subjob_size_bytes, usize::MAX);
    }

    #[test]
    fn nbd_connections_default_by_exports_and_timeouts_need_a_millisecond() {
        let settings =
            |connections, exports| nbd_settings(connections, 30_000_000, None, TlsOptions::default(), exports);
        assert_eq!(settings(None, 1).unwrap().connections_max, NBD_CONNECTIONS_DEFAULT);
        assert_eq!(settings(None, NBD_MANY_EXPORTS).unwrap().connections_max, NBD_CONNECTIONS_MANY_EXPORTS);
        assert_eq!(settings(Some(2), NBD_MANY_EXPORTS).unwrap().connections_max, 2);
        for count in [0, kcopyd_nbd::CONNECTIONS_MAX as u64 + 1, u64::MAX] {
            assert_eq!(settings(Some(count), 1), Err(OptionError::Connections { count }));
        }
        let timed = nbd_settings(None, 1500, Some(2999), TlsOptions::default(), 1).unwrap();
        assert_eq!((timed.connect_timeout_ms, timed.io_timeout_ms), (1, Some(2)));
        let error = nbd_settings(None, 999, None, TlsOptions::default(), 1);
        assert_eq!(error, Err(OptionError::ConnectTimeout { timeout_us: 999 }));
        let error = nbd_settings(None, 1000, Some(0), TlsOptions::default(), 1);
        assert_eq!(error, Err(OptionError::IoTimeout { timeout_us: 0 }));
    }

    #[test]
    fn tls_options_need_a_tls_export_and_unverified_ones_are_listed() {
        let (plain, tls) = (device("nbd+unix:///?socket=/run/a.sock"), device("nbds+unix:///?socket=/run/b.sock"));
        let off = TlsOptions { verify_peer: Some(false), ..TlsOptions::default() };
        assert_eq!(unverified_tls_exports(&[&plain], &TlsOptions::default()), Ok(vec![]));
        let error = unverified_tls_exports(&[&plain], &TlsOptions { hostname: Some("h".into()), ..off.clone() });
        let given = OptionError::TlsWithoutTlsExport { option: TlsOption::VerifyPeer, text: "off".into() };
        assert_eq!(error, Err(given));
        assert_eq!(unverified_tls_exports(&[&plain, &tls], &TlsOptions::default()), Ok(vec![]));
        assert_eq!(unverified_tls_exports(&[&plain, &tls], &off), Ok(vec![tls.text.clone()]));
    }

    #[test]
    fn sparse_copies_check_their_zero_scan() {
        let on = sparse(true, None, false).unwrap();
        assert_eq!((on.skip_holes, on.zero_block_bytes, on.target_zeroes), (true, 4096, TargetZeroes::Deallocate));
        assert_eq!(sparse(true, Some(0), true).unwrap().target_zeroes, TargetZeroes::Skip);
        assert_eq!(sparse(false, None, false).unwrap(), Sparse::OFF);
        assert_eq!(sparse(true, Some(2 << 30), false).unwrap().zero_block_bytes, 2 << 30);
        for size_bytes in [256, 1000, 4 << 30] {
            assert_eq!(sparse(true, Some(size_bytes), false), Err(OptionError::SparseSize { size_bytes }));
        }
        assert_eq!(sparse(false, Some(4096), false), Err(OptionError::SparseSizeNotSparse { size_bytes: 4096 }));
        assert_eq!(sparse(false, None, true), Err(OptionError::TargetIsZeroNotSparse));
    }
}
