//! What a clone is built with: its region size (fixed when the metadata is created) and the
//! hydration knobs (changeable while it runs), with their limits.
//!
//! ```text
//!  region size: power of two, REGION_SIZE_MIN (4 KiB) ..= REGION_SIZE_MAX (1 GiB), as dm-clone
//!  CloneOptions { hydration_threshold, hydration_batch_size, hydration_attempts_max,
//!                 commit_interval_ms, pause_on_foreground, hydration_enabled }
//! ```

use serde::{Deserialize, Serialize};

use crate::error::CloneError;

/// Smallest region: 4 KiB (8 sectors), as dm-clone.
pub const REGION_SIZE_MIN: u64 = 4096;
/// Largest region: 1 GiB (2 097 152 sectors), as dm-clone.
pub const REGION_SIZE_MAX: u64 = 1 << 30;
/// Regions hydrated in the background at once by default: 1, as dm-clone.
pub const HYDRATION_THRESHOLD_DEFAULT: u32 = 1;
/// Contiguous regions per copy job by default: 1, as dm-clone.
pub const HYDRATION_BATCH_SIZE_DEFAULT: u32 = 1;
/// Most regions hydrated in the background at once (and per copy job).
pub const HYDRATION_THRESHOLD_MAX: u32 = 1 << 20;
/// Failed hydrations of one region before it is given up on, by default.
pub const HYDRATION_ATTEMPTS_DEFAULT: u32 = 3;
/// Most attempts that can be asked for.
pub const HYDRATION_ATTEMPTS_MAX: u32 = 1000;
/// Metadata commits at least this often while regions hydrate (model milliseconds), by
/// default: 1 s, dm-clone's `COMMIT_PERIOD`.
pub const COMMIT_INTERVAL_DEFAULT_MS: u64 = 1000;
/// Regions that reads may queue as hints to hydrate first; hints beyond it are dropped.
pub const HINTS_MAX: usize = 1024;

/// Checks a region size: a power of two from [`REGION_SIZE_MIN`] to [`REGION_SIZE_MAX`].
///
/// ```
/// # use kcopyd_clone::check_region_size;
/// assert!(check_region_size(4096).is_ok());
/// assert!(check_region_size(1 << 30).is_ok());
/// assert!(check_region_size(2048).is_err()); // below dm-clone's 8 sectors
/// assert!(check_region_size(12288).is_err()); // not a power of two
/// ```
///
/// # Errors
/// [`CloneError::RegionSize`] naming the size given.
pub fn check_region_size(region_size_bytes: u64) -> Result<(), CloneError> {
    if region_size_bytes.is_power_of_two() && (REGION_SIZE_MIN..=REGION_SIZE_MAX).contains(&region_size_bytes) {
        Ok(())
    } else {
        Err(CloneError::RegionSize { bytes: region_size_bytes })
    }
}

/// The hydration knobs: dm-clone's core arguments and a few of this crate's own. Every field
/// has a default; change them while the clone runs with
/// [`CloneDevice::set_options`](crate::CloneDevice::set_options).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CloneOptions {
    /// Regions the background hydration keeps in flight at once (dm-clone's
    /// `hydration_threshold`), 1 to [`HYDRATION_THRESHOLD_MAX`]. Default 1.
    pub hydration_threshold: u32,
    /// Contiguous regions copied by one engine job (dm-clone's `hydration_batch_size`), 1 to
    /// [`HYDRATION_THRESHOLD_MAX`]; a batch never takes more than the threshold leaves free.
    /// Default 1.
    pub hydration_batch_size: u32,
    /// Failed hydrations of a region before it is given up on and reported (dm-clone retries
    /// for ever), 1 to [`HYDRATION_ATTEMPTS_MAX`]. Default 3.
    pub hydration_attempts_max: u32,
    /// Background metadata commits at least this often while regions hydrate, in model
    /// milliseconds, at least 1. Default 1000.
    pub commit_interval_ms: u64,
    /// Start no background hydration while foreground I/O is in flight, as dm-clone. Default
    /// `true`.
    pub pause_on_foreground: bool,
    /// Hydrate in the background at all (dm-clone's `enable_hydration` and
    /// `disable_hydration` messages). Default `true`.
    pub hydration_enabled: bool,
}

impl Default for CloneOptions {
    fn default() -> CloneOptions {
        CloneOptions {
            hydration_threshold: HYDRATION_THRESHOLD_DEFAULT,
            hydration_batch_size: HYDRATION_BATCH_SIZE_DEFAULT,
            hydration_attempts_max: HYDRATION_ATTEMPTS_DEFAULT,
            commit_interval_ms: COMMIT_INTERVAL_DEFAULT_MS,
            pause_on_foreground: true,
            hydration_enabled: true,
        }
    }
}

impl CloneOptions {
    /// Checks every field against its limits.
    ///
    /// ```
    /// # use kcopyd_clone::CloneOptions;
    /// assert!(CloneOptions::default().validate().is_ok());
    /// assert!(CloneOptions { hydration_threshold: 0, ..CloneOptions::default() }.validate().is_err());
    /// ```
    ///
    /// # Errors
    /// [`CloneError::Option`] naming the field, the value and the bounds.
    pub fn validate(&self) -> Result<(), CloneError> {
        let check = |name: &'static str, value: u64, max: u64| {
            if (1..=max).contains(&value) { Ok(()) } else { Err(CloneError::Option { name, value, min: 1, max }) }
        };
        check("hydration_threshold", self.hydration_threshold.into(), HYDRATION_THRESHOLD_MAX.into())?;
        check("hydration_batch_size", self.hydration_batch_size.into(), HYDRATION_THRESHOLD_MAX.into())?;
        check("hydration_attempts_max", self.hydration_attempts_max.into(), HYDRATION_ATTEMPTS_MAX.into())?;
        check("commit_interval_ms", self.commit_interval_ms, u64::MAX)
    }
}
