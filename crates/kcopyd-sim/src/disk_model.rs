//! A disk model as a file: the timing that `kcopyd sim calibrate` measures on a real device
//! (or that is written by hand), which scenarios and `kcopyd sim validate` build disks from.
//!
//! ```text
//!  device ─explore::calibrate─► measurements ─DiskModel::fit (fit.rs)─► DiskModel (TOML)
//!  DiskModel ─options()─► MemDiskOptions ──► MemDisk
//!            latency + one_device ─medium()─► Medium shared by a run's disks
//! ```

mod fit;

use serde::{Deserialize, Serialize};

pub(crate) use fit::median;

use crate::mem_disk::{MemDisk, MemDiskOptions};
use crate::timing::{Latency, Medium};

/// The timing of a kind of disk, and whether the disks of one run share one device.
/// Defaults: instant, separate devices, no measurements.
///
/// Example (TOML), an SSD measured through a filesystem: the files of a copy share one
/// device, so reads and writes of all of them take turns on one data path:
///
/// ```toml
/// description = "/scratch/model.img"
/// one_device = true
/// [latency.read]
/// cost_us = 60
/// bandwidth_bytes_per_s = 3600000000
/// [latency.write]
/// cost_us = 60
/// bandwidth_bytes_per_s = 3100000000
/// [latency.path]
/// shared = true
/// read_overhead_us = 15
/// write_overhead_us = 15
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiskModel {
    /// What was measured, where and how (free text).
    pub description: String,
    /// The timing of every disk made from the model.
    pub latency: Latency,
    /// The disks of one run are files on one device: they share one [`Medium`].
    pub one_device: bool,
    /// The measurements the model was fitted to (kept for the record; not used to simulate).
    pub measurements: Vec<Measurement>,
}

/// One point measured on a real device.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Measurement {
    /// `read`, `write`, or `mixed` (reads and writes at once, each at the queue depth).
    pub kind: String,
    /// Bytes per request.
    pub io_size_bytes: u64,
    /// Requests in flight (of each kind, for `mixed`).
    pub queue_depth: u32,
    /// Requests completed per second (all kinds).
    pub iops: f64,
    /// Bytes moved per second (all kinds).
    pub bandwidth_bytes_per_s: f64,
    /// Median time from issue to completion of one request.
    pub latency_us_p50: f64,
}

/// A measured point with its bandwidth worked out from `iops` (for the fit's and the
/// calibration's tests).
#[cfg(test)]
pub(crate) fn point(kind: &str, io_size_bytes: u64, queue_depth: u32, iops: f64, latency_us_p50: f64) -> Measurement {
    Measurement {
        kind: kind.into(),
        io_size_bytes,
        queue_depth,
        iops,
        bandwidth_bytes_per_s: iops * io_size_bytes as f64,
        latency_us_p50,
    }
}

impl DiskModel {
    /// Options of a plain disk with this model's timing.
    pub fn options(&self, name: &str, len_sectors: u64, seed: u64) -> MemDiskOptions {
        MemDiskOptions {
            name: name.into(),
            seed,
            len_sectors,
            latency: Latency { seed, ..self.latency.clone() },
            ..MemDiskOptions::default()
        }
    }

    /// The medium the disks of one run share, if they are on one device.
    pub fn medium(&self) -> Option<Medium> {
        self.one_device.then(Medium::new)
    }

    /// A disk from `options` (made with [`DiskModel::options`]), on `medium` if given.
    pub fn disk(options: MemDiskOptions, medium: Option<&Medium>) -> MemDisk {
        match medium {
            Some(medium) => MemDisk::on_medium(options, medium),
            None => MemDisk::new(options),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_round_trips_and_refuses_unknown_keys() {
        let mut model = DiskModel { description: "test".into(), one_device: true, ..DiskModel::default() };
        model.latency.read.bandwidth_bytes_per_s = 3_600_000_000;
        model.latency.path.shared = true;
        model.measurements.push(Measurement { kind: "read".into(), io_size_bytes: 4096, ..Measurement::default() });
        let json = serde_json::to_string(&model).unwrap();
        assert_eq!(serde_json::from_str::<DiskModel>(&json).unwrap(), model);
        assert!(serde_json::from_str::<DiskModel>(r#"{"one_devices":true}"#).is_err());
        let options = model.options("a", 2048, 9);
        assert_eq!((options.len_sectors, options.latency.seed), (2048, 9));
        assert!(options.latency.path.shared);
        assert!(model.medium().is_some());
        assert!(DiskModel::default().medium().is_none());
    }
}
