//! Sizes, offsets and durations as people type them: the simulator's `units`, shared by the
//! command line and scenario files so that `64K` means the same everywhere.

pub use kcopyd_sim::units::*;
