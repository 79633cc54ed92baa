//! The demo (`kcopyd demo`): a mirror resync on simulated disks with injected faults, the
//! shipped scenario `scenarios/demo-mirror-resync.toml`, sized and run by the scenario runner,
//! which checks the report against the disks and their fault logs.
//!
//! ```text
//!  len_bytes ─► scenario: the file, every disk that long, the faults at the same fractions
//!     ─► run (optionally one target sector changed after the copy: only the data check
//!        sees it) ─► ScenarioReport, with the runner's Verification of the job
//! ```

use std::path::Path;

use kcopyd_core::SECTOR_SIZE;

use crate::explore::{self, Disks, Scenario, ScenarioError, ScenarioReport};

/// The scenario the demo runs, as shipped in `scenarios/`.
pub const SCENARIO: &str = include_str!("../../../../scenarios/demo-mirror-resync.toml");
/// The smallest disk the demo takes.
pub const DEMO_LEN_BYTES_MIN: u64 = 16 << 20;
/// The largest disk the demo takes.
pub const DEMO_LEN_BYTES_MAX: u64 = 1 << 30;
/// The target whose copy a tampered run changes.
pub const TAMPERED_TARGET: &str = "mirror-a";
/// The sector a tampered run changes.
pub const TAMPERED_SECTOR: u64 = 8;

/// Whether the demo takes disks `len_bytes` long: whole MiB from [`DEMO_LEN_BYTES_MIN`] to
/// [`DEMO_LEN_BYTES_MAX`].
pub fn len_fits(len_bytes: u64) -> bool {
    (DEMO_LEN_BYTES_MIN..=DEMO_LEN_BYTES_MAX).contains(&len_bytes) && len_bytes % (1 << 20) == 0
}

/// The built-in scenario with its disks `len_bytes` long and the faults at the same
/// fractions of them as in the file (two, four and six tenths in).
///
/// # Errors
/// The edited scenario does not read (a broken shipped file).
pub fn scenario(len_bytes: u64) -> Result<Scenario, ScenarioError> {
    let len_sectors = len_bytes / SECTOR_SIZE as u64;
    let at = |tenths: u64| len_sectors / 10 * tenths;
    let mut tree = explore::parse_tree(SCENARIO)?;
    let edits = [
        ("disks.source.len_sectors".to_owned(), len_sectors.to_string()),
        ("disks.mirror-a.len_sectors".to_owned(), len_sectors.to_string()),
        ("disks.mirror-b.len_sectors".to_owned(), len_sectors.to_string()),
        ("disks.mirror-c.len_sectors".to_owned(), len_sectors.to_string()),
        (
            "disks.source.faults.latent_sectors".to_owned(),
            format!(
                "[{{ start = {}, end = {} }}, {{ start = {}, end = {} }}]",
                at(2) + 1,
                at(2) + 2,
                at(6) + 17,
                at(6) + 25
            ),
        ),
        (
            "disks.mirror-b.faults.write_faults".to_owned(),
            format!("[{{ sectors = {{ start = {}, end = {} }}, attempts = 0 }}]", at(4) + 100, at(4) + 164),
        ),
    ];
    for (key, value) in edits {
        explore::set_path(&mut tree, &key, explore::parse_value(&value))?;
    }
    Scenario::from_value_in(tree, Path::new("."))
}

/// Runs `scenario` (from [`scenario`]); with `tamper`, [`TAMPERED_SECTOR`] of
/// [`TAMPERED_TARGET`] is changed after the copy, behind the engine's back.
///
/// # Errors
/// The scenario cannot run.
pub fn run(scenario: &Scenario, tamper: bool) -> Result<ScenarioReport, ScenarioError> {
    explore::run_with(scenario, &|disks: &Disks<'_>| {
        if tamper {
            disks[TAMPERED_TARGET].poke(TAMPERED_SECTOR, &[0xa5; SECTOR_SIZE]);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_whole_mib_in_bounds_fit_and_the_faults_scale_with_the_disks() {
        assert!(len_fits(DEMO_LEN_BYTES_MIN) && len_fits(DEMO_LEN_BYTES_MAX) && len_fits(64 << 20));
        assert!(!len_fits(DEMO_LEN_BYTES_MIN - (1 << 20)) && !len_fits(DEMO_LEN_BYTES_MAX + (1 << 20)));
        assert!(!len_fits((64 << 20) + 512));
        let scenario = scenario(16 << 20).unwrap();
        let source = &scenario.disks["source"].options;
        assert_eq!(source.len_sectors, 32768);
        let latent = source.faults.latent_sectors.to_vec();
        assert_eq!(latent, [6553..6554, 19673..19681]);
    }
}
