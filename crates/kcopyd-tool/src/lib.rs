//! Copy, zero and verify whole devices with the kcopyd engine, as the `kcopyd` command does,
//! from any program: device addresses, the checks made before the first write, resumable
//! copy maps, partial last blocks, and a runner with progress and cancellation.
//!
//! ```text
//!  "disk.img@1M", "sim:size=1G", "nbd://host/x"      address::DeviceAddress::parse
//!        │
//!        ▼
//!  plan::plan_with_source / plan_zero   open every device, check ranges, alignment, overlap
//!        │                              through every name of the same storage, tails;
//!        │                              PlanError (nothing written) or a Plan
//!        ▼
//!  run::copy / run::zero / run::verify  engine jobs (optionally in batches recorded in a
//!        │                              map::CopyMap), flush, tails, Client::verify;
//!        │                              progress as a callback, cancellation as a token
//!        ▼
//!  run::CopyRun / ZeroRun / VerifyRun   outcomes per device, for the caller to report
//!        │
//!        ▼
//!  report::Report                       the outcome as data (serializes to the JSON report)
//!        │
//!        ▼
//!  summary::human                       the outcome as lines for people
//! ```
//!
//! `clone` starts a clone served while it hydrates (kcopyd-clone's device) from the same
//! addresses and plan, with its metadata file checked against the devices.
//!
//! `options` checks a command's options (page budget, NBD connections, timeouts and TLS,
//! sparse copies) into these settings, with typed errors.
//!
//! Nothing here prints: the caller reports.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod address;
pub mod cancel;
pub mod clock;
pub mod clone;
pub mod error;
pub mod map;
pub mod open;
pub mod options;
pub mod plan;
pub mod report;
pub mod run;
pub mod scratch;
pub mod summary;
pub mod tail;

pub use address::{AddressError, Backend, DeviceAddress, SimDisk};
pub use cancel::Cancel;
pub use error::{DeviceProblem, PlanError, Role};
pub use open::{CreatedHook, NbdSettings, Opened, OsFacts, PathChange, Settings, remove_created, remove_made};
pub use options::{OptionError, TlsOption};
pub use plan::{CreatedFiles, Plan, ZeroPlan, plan_with_source, plan_zero};
pub use tail::{Tail, TailError};
