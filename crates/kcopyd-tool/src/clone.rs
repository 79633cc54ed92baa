//! A clone served while it hydrates, as `kcopyd clone` starts it: SOURCE, DEST and the
//! metadata FILE opened and checked together, then kcopyd-clone's device created or resumed.
//!
//! ```text
//!  CloneRequest ─► check_request (whole devices) ─► plan (the caller's, with SOURCE's
//!     length and DEST created if missing) ─► open: FILE opened, locked, identity read
//!     ─► identity_of: what FILE must record (copy map identities), checked against FILE
//!     ─► start: CloneDevice::create (FILE new, or `new` and never served) or ::open (resume)
//!  any refusal: CloneSetupError, nothing written; DEST and FILE removed if created here
//! ```
//!
//! This lives here, not in kcopyd-clone: the clone's device is a pure library over
//! `BlockDevice`s, while this wiring needs this crate's addresses, plans, locks and copy-map
//! identities; kcopyd-clone never imports kcopyd-tool, so there is no circle.

mod metadata_file;

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use kcopyd_clone::{CloneDevice, CloneDevices, CloneOptions};
use kcopyd_core::{Client, SECTOR_SIZE};
use kcopyd_nbd::{Address, NbdUri};
use kcopyd_os::{LockError, OpenError};
use thiserror::Error;

use crate::address::{Backend, DeviceAddress};
use crate::map::MapFileError;
use crate::open::CreatedHook;
use crate::open::Opened;
use crate::plan::Plan;

pub use metadata_file::{IDENTITY_BYTES, IDENTITY_MAGIC, Identity, IdentityError, MetadataFile, State};

/// The region size of a new clone by default: 64 KiB (16 384 regions, a 2 KiB bitmap, per GiB).
pub const REGION_SIZE_BYTES_DEFAULT: u64 = 64 * 1024;

/// What to clone: the devices as given and the metadata file.
#[derive(Debug, Clone)]
pub struct CloneRequest {
    /// The device cloned (only ever read).
    pub source: DeviceAddress,
    /// The destination, created with SOURCE's length if missing.
    pub destination: DeviceAddress,
    /// The metadata file: created if missing, resumed from otherwise.
    pub metadata: PathBuf,
    /// The region size of a new clone ([`REGION_SIZE_BYTES_DEFAULT`] if `None`); a resumed
    /// clone keeps its own and refuses another.
    pub region_size_bytes: Option<u64>,
}

/// What is wrong with the metadata file (the problem, without the path).
#[derive(Debug, Error)]
pub enum MetadataError {
    /// It cannot be opened or created.
    #[error("cannot open it ({0})")]
    Open(#[source] io::Error),
    /// Its metadata (type, length) cannot be read.
    #[error("cannot look at it ({0})")]
    Stat(#[source] io::Error),
    /// Not a regular file.
    #[error("not a regular file")]
    NotRegular,
    /// A file of proc, sysfs or the like, where writing sets something in the kernel.
    #[error("a file of the {filesystem} filesystem, not a file to keep a clone's metadata in")]
    PseudoFile {
        /// The filesystem's name (`proc`).
        filesystem: &'static str,
    },
    /// It is SOURCE or DEST itself.
    #[error("is {name} itself: the metadata needs a file of its own")]
    IsDevice {
        /// Which device (`SOURCE`, `DEST`).
        name: String,
    },
    /// Another clone holds its lock.
    #[error("busy: another kcopyd clone is using it")]
    Busy,
    /// It was replaced between opening and locking.
    #[error("the file was replaced while it was being opened")]
    Replaced,
    /// The lock failed otherwise.
    #[error("cannot lock it ({0})")]
    Lock(#[source] LockError),
    /// Not empty, and no valid identity block: left as it is.
    #[error("{0}: not a kcopyd clone metadata file, or damaged; it is left as it is")]
    NotMetadata(#[source] IdentityError),
    /// It records a clone, but DEST was created by this run.
    #[error("records a clone, but DEST '{destination}' did not exist before this run: delete FILE to start over")]
    DestinationNew {
        /// DEST as given.
        destination: String,
    },
    /// It records a clone, but DEST cannot be trusted to hold that clone's data.
    #[error("records a clone, but DEST {reason}: delete FILE to start over")]
    DestinationUntrusted {
        /// Why (as a copy map says it).
        reason: &'static str,
    },
    /// It records a clone in another region size than the one asked for.
    #[error("records a clone in regions of {recorded_bytes} bytes; --region-size {asked_bytes} cannot change it")]
    RegionSizeRecorded {
        /// The clone's region size.
        recorded_bytes: u64,
        /// The region size asked for.
        asked_bytes: u64,
    },
    /// It records a clone of other devices.
    #[error(
        "is the metadata of a clone of other devices: {what} was '{found_name}' ({found_id}), now '{name}' ({id}); \
         delete FILE to start a new clone"
    )]
    OtherDevices {
        /// `SOURCE` or `DEST`.
        what: &'static str,
        /// The name recorded.
        found_name: String,
        /// The identity recorded.
        found_id: String,
        /// The name given now.
        name: String,
        /// The identity now.
        id: String,
    },
    /// The identity cannot be recorded.
    #[error("{0}")]
    Identity(#[source] IdentityError),
    /// It cannot be opened as the clone's metadata device.
    #[error("cannot open it as a device ({0})")]
    Device(#[source] OpenError),
    /// The clone's metadata in it was refused, or could not be written.
    #[error("{0}")]
    Clone(#[source] kcopyd_clone::CloneError),
    /// Writing the identity block failed.
    #[error("{0}")]
    Write(#[source] io::Error),
}

/// Why a clone was refused before it was served.
#[derive(Debug, Error)]
pub enum CloneSetupError {
    /// SOURCE or DEST has an `@OFFSET`.
    #[error("{what} '{text}': a clone is of whole devices: no @OFFSET")]
    Offset {
        /// `SOURCE` or `DEST`.
        what: &'static str,
        /// The address as given.
        text: String,
    },
    /// SOURCE's length is not whole logical blocks.
    #[error("SOURCE '{text}': its length, {len_bytes} bytes, is not whole logical blocks: a clone serves whole blocks")]
    PartialBlock {
        /// SOURCE as given.
        text: String,
        /// Its length.
        len_bytes: u64,
    },
    /// The metadata file is refused or failed.
    #[error("metadata file '{path}': {problem}")]
    Metadata {
        /// The file.
        path: String,
        /// What is wrong (boxed: some problems carry large errors).
        #[source]
        problem: Box<MetadataError>,
    },
    /// The region size is not one a clone takes.
    #[error("region size {region_size_bytes}: {source}")]
    RegionSize {
        /// The size.
        region_size_bytes: u64,
        /// kcopyd-clone's refusal.
        #[source]
        source: kcopyd_clone::CloneError,
    },
    /// SOURCE or DEST cannot be identified.
    #[error(transparent)]
    Identify(#[from] MapFileError),
}

/// Why an address to serve on is refused.
#[derive(Debug, Error)]
pub enum ServeAddressError {
    /// Not an NBD URI.
    #[error("{0}")]
    Uri(#[source] kcopyd_nbd::UriError),
    /// TCP, but not on loopback.
    #[error("only a loopback address (127.0.0.1, ::1, localhost) is served: NBD carries no authentication")]
    NotLoopback,
    /// A TLS scheme (`nbds://`, `nbds+unix://`): the server speaks plain text only, and would
    /// not keep the promise the scheme makes.
    #[error("the clone is served in plain text only: nbds:// is not served (use nbd:// on loopback or nbd+unix://)")]
    Tls,
}

/// The listening address of an NBD URI to serve on, and the export name; TCP only on
/// loopback (NBD has no authentication here).
///
/// # Errors
/// Not an NBD URI, a TLS one, or TCP elsewhere than on loopback.
pub fn serve_address(text: &str) -> Result<(Address, String), ServeAddressError> {
    let uri = NbdUri::parse(text).map_err(ServeAddressError::Uri)?;
    if uri.tls.is_some() {
        return Err(ServeAddressError::Tls);
    }
    if let Address::Tcp { host, .. } = &uri.address {
        let loopback = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
        if !loopback {
            return Err(ServeAddressError::NotLoopback);
        }
    }
    Ok((uri.address, uri.export))
}

/// What a checked clone has open.
#[derive(Debug)]
pub struct Opening {
    /// SOURCE, read-only.
    pub source: Opened,
    /// DEST.
    pub destination: Opened,
    /// The metadata file, locked.
    pub metadata: MetadataFile,
    /// Held until the end: DEST's and SOURCE's locks, DEST removed if created and refused.
    pub plan: Plan,
}

impl Opening {
    /// Keeps DEST and FILE whatever happens next: the clone is being served.
    pub fn keep(&mut self) {
        self.plan.created.keep();
        self.metadata.keep();
    }
}

impl CloneRequest {
    /// Refuses a device with an `@OFFSET`: a clone is of whole devices.
    ///
    /// # Errors
    /// [`CloneSetupError::Offset`].
    pub fn check(&self) -> Result<(), CloneSetupError> {
        for (what, arg) in [("SOURCE", &self.source), ("DEST", &self.destination)] {
            if arg.offset_bytes != 0 {
                return Err(CloneSetupError::Offset { what, text: arg.text.clone() });
            }
        }
        Ok(())
    }

    /// Whether DEST is a file path that does not exist yet (so the plan creates it). Look
    /// before planning.
    pub fn destination_missing(&self) -> bool {
        matches!(&self.destination.backend,
            Backend::Path(path) if matches!(std::fs::symlink_metadata(path), Err(e) if e.kind() == io::ErrorKind::NotFound))
    }

    fn metadata_error(&self, problem: MetadataError) -> CloneSetupError {
        CloneSetupError::Metadata { path: self.metadata.display().to_string(), problem: Box::new(problem) }
    }
}

/// Opens the metadata file and checks it with `plan` (SOURCE and one DEST, writable, made
/// from `request`); `destination_created` is [`CloneRequest::destination_missing`] as seen
/// before planning; `hook` is told of a metadata file created here.
///
/// # Errors
/// SOURCE's length is not whole blocks, or the metadata file is refused.
pub fn open(
    request: &CloneRequest,
    mut plan: Plan,
    destination_created: bool,
    hook: Option<Arc<dyn CreatedHook>>,
) -> Result<Opening, CloneSetupError> {
    if !plan.tail.is_empty() {
        return Err(CloneSetupError::PartialBlock { text: request.source.text.clone(), len_bytes: plan.len_bytes });
    }
    let source = plan.source.clone();
    let destination = plan.targets.remove(0);
    let files: Vec<(&str, (u64, u64))> = [(&source, "SOURCE"), (&destination, "DEST")]
        .into_iter()
        .filter(|(opened, _)| opened.is_file())
        .map(|(opened, name)| (name, (opened.device.id().major, opened.device.id().minor)))
        .collect();
    let metadata = MetadataFile::open(&request.metadata, &files, hook).map_err(|e| request.metadata_error(e))?;
    if destination_created && metadata.existing.as_ref().is_some_and(|identity| identity.state == State::Ready) {
        let destination = request.destination.text.clone();
        return Err(request.metadata_error(MetadataError::DestinationNew { destination }));
    }
    plan.targets.push(destination.clone());
    Ok(Opening { source, destination, metadata, plan })
}

/// The identity the metadata file must record (from the copy map's identity code), checked
/// against what it records if it exists.
///
/// # Errors
/// A device cannot be identified, the region size is refused, or the file records another
/// clone.
pub fn identity_of(request: &CloneRequest, opening: &Opening) -> Result<Identity, CloneSetupError> {
    let targets = std::slice::from_ref(&opening.destination);
    let len_bytes = opening.source.device.geometry().len_sectors * SECTOR_SIZE as u64;
    let (header, guard) = crate::map::header_of(&opening.source, targets, len_bytes, &[false])?;
    let recorded = opening.metadata.existing.as_ref().filter(|found| found.state == State::Ready);
    if let (Some(reason), Some(_)) = (guard.untrusted.first().copied().flatten(), recorded) {
        return Err(request.metadata_error(MetadataError::DestinationUntrusted { reason }));
    }
    let region_size_bytes = match (recorded, request.region_size_bytes) {
        (Some(found), Some(asked_bytes)) if found.region_size_bytes != asked_bytes => {
            let recorded_bytes = found.region_size_bytes;
            return Err(request.metadata_error(MetadataError::RegionSizeRecorded { recorded_bytes, asked_bytes }));
        }
        (Some(found), None) => found.region_size_bytes,
        (_, asked) => asked.unwrap_or(REGION_SIZE_BYTES_DEFAULT),
    };
    kcopyd_clone::check_region_size(region_size_bytes)
        .map_err(|source| CloneSetupError::RegionSize { region_size_bytes, source })?;
    let identity = Identity {
        state: State::Ready,
        region_size_bytes,
        source_name: header.source.name,
        source_id: header.source.id,
        destination_name: header.targets[0].name.clone(),
        destination_id: header.targets[0].id.clone(),
    };
    if let Some(found) = &opening.metadata.existing {
        check_same_devices(found, &identity).map_err(|e| request.metadata_error(e))?;
    }
    Ok(identity)
}

/// Refuses a file recorded for other devices: their identities differ, or, for an NBD export
/// (whose identity is only its size and flags), its URI.
fn check_same_devices(found: &Identity, now: &Identity) -> Result<(), MetadataError> {
    let pairs = [
        ("SOURCE", &found.source_name, &found.source_id, &now.source_name, &now.source_id),
        ("DEST", &found.destination_name, &found.destination_id, &now.destination_name, &now.destination_id),
    ];
    for (what, found_name, found_id, name, id) in pairs {
        let nbd = id.starts_with("nbd ");
        if found_id != id || (nbd && found_name != name) {
            return Err(MetadataError::OtherDevices {
                what,
                found_name: found_name.clone(),
                found_id: found_id.clone(),
                name: name.clone(),
                id: id.clone(),
            });
        }
    }
    Ok(())
}

/// Creates the clone (a new metadata file, or one whose creation was cut short before
/// anything was served) or opens it from the file's last commit.
///
/// # Errors
/// The metadata file cannot be written or opened as a device, or kcopyd-clone refuses it.
pub async fn start(
    opening: &Opening,
    identity: &Identity,
    client: Client,
    options: CloneOptions,
) -> Result<CloneDevice, CloneSetupError> {
    let refuse = |problem| CloneSetupError::Metadata { path: opening.metadata.path_text(), problem: Box::new(problem) };
    let source = &opening.source.device;
    let clone_bytes = kcopyd_clone::metadata_bytes_needed(
        source.geometry().len_sectors,
        identity.region_size_bytes,
        SECTOR_SIZE as u32,
    );
    let resume = opening.metadata.existing.as_ref().is_some_and(|found| found.state == State::Ready);
    if !resume {
        let new = Identity { state: State::New, ..identity.clone() };
        opening.metadata.write_identity(clone_bytes, &new).map_err(refuse)?;
    }
    // Small, and every write is followed by a flush: through the page cache on any filesystem.
    let metadata_options = kcopyd_os::OpenOptions { write: true, buffered: true, ..kcopyd_os::OpenOptions::default() };
    let metadata = kcopyd_os::OsDevice::open(&opening.metadata.path, &metadata_options)
        .map_err(|e| refuse(MetadataError::Device(e)))?;
    let devices = CloneDevices {
        source: source.clone(),
        destination: opening.destination.device.clone(),
        metadata: Arc::new(metadata),
    };
    if resume {
        return CloneDevice::open(devices, client, options).await.map_err(|e| refuse(MetadataError::Clone(e)));
    }
    let clone = CloneDevice::create(devices, identity.region_size_bytes, client, options)
        .await
        .map_err(|e| refuse(MetadataError::Clone(e)))?;
    let len_bytes = opening.metadata.len_bytes().map_err(|e| refuse(MetadataError::Stat(e)))?;
    opening.metadata.write_identity(len_bytes - IDENTITY_BYTES, identity).map_err(refuse)?;
    Ok(clone)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serve_addresses_are_plain_text_and_loopback_only() {
        let (address, export) = serve_address("nbd://127.0.0.1:10900/clone").unwrap();
        assert_eq!((address.to_string(), export.as_str()), ("127.0.0.1:10900".into(), "clone"));
        assert!(serve_address("nbd+unix:///?socket=/run/clone.sock").is_ok());
        assert!(matches!(serve_address("nbd://192.0.2.1/"), Err(ServeAddressError::NotLoopback)));
        // The server speaks no TLS: a TLS scheme would promise what it does not do.
        assert!(matches!(serve_address("nbds://127.0.0.1/"), Err(ServeAddressError::Tls)));
        assert!(matches!(serve_address("nbds+unix:///?socket=/run/clone.sock"), Err(ServeAddressError::Tls)));
    }
}
