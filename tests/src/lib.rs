//! Workspace-level tests of kcopyd: integration tests of the engine through its public API,
//! the conformance suite every backend runs, and property tests.
//!
//! ```text
//!  tests/tests/*.rs ──► kcopyd-core (Client, Job) ──► kcopyd-sim / kcopyd-os devices
//!        │                                                   ▲
//!        └── helpers here (disks, regions, checks) ──────────┘
//! ```
#![warn(missing_docs)]

pub mod bad_nbd;
pub mod conformance;
pub mod fixtures;
pub mod io_log;
pub mod layers;
pub mod nbd_servers;
pub mod oracle;
pub mod scenario;
pub mod sectors;
pub mod sparse_case;
pub mod threaded_case;
pub mod tls_certs;
pub mod util;
pub mod validation;
