//! Device addresses: `PATH`, `PATH@OFFSET`, `sim:KEY=VALUE,...[@OFFSET]`, NBD URIs.
//!
//! ```text
//!  "disk.img"              path disk.img, offset 0
//!  "mirror.img@1G"         path mirror.img, offset 1 GiB (the text after the last '@' is a size)
//!  "a@b.img@0"             path a@b.img: a path holding '@' needs an explicit offset
//!  "sim:size=1G,seed=7@4K" simulated disk, offset 4 KiB
//!  "nbd://host/disk@1M"    NBD export 'disk' on host:10809, offset 1 MiB
//!  "nbd+unix:///?socket=/run/nbd.sock"  the default export on a unix socket
//!  "nbds://host/disk?tls-certificates=/etc/pki/nbd@1M"  the same through TLS
//! ```
//!
//! The `sim:` options are read by a [`SimParser`] the caller gives: this crate knows a
//! simulated disk only through the [`SimDisk`] trait (its length, whether it is headers-only,
//! and how to build it).

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use kcopyd_core::Device;
use kcopyd_sim::spec::SpecError;
use kcopyd_sim::units::{self as size, SizeError};
use thiserror::Error;

/// What a `sim:` address starts with.
pub const SIM_PREFIX: &str = "sim:";

/// A simulated disk as a `sim:` address describes it, built when it is opened.
pub trait SimDisk: fmt::Debug + Send + Sync {
    /// The disk's length in bytes, if the address gives one.
    fn len_bytes(&self) -> Option<u64>;
    /// Whether the disk moves only the header of each pattern sector.
    fn headers_only(&self) -> bool;
    /// Refuses a length the disk cannot have, saying why.
    ///
    /// # Errors
    /// The length is not whole sectors, or too large for this kind of disk.
    fn check_len(&self, len_bytes: u64) -> Result<(), SpecError>;
    /// Builds the disk, `len_bytes` long (checked by [`SimDisk::check_len`]).
    fn build(&self, len_bytes: u64) -> Device;
}

/// Reads the options of a `sim:` address (the text after `sim:`), or says what is wrong.
pub type SimParser = dyn Fn(&str) -> Result<Arc<dyn SimDisk>, String>;

/// The `sim:` grammar of kcopyd-sim ([`kcopyd_sim::spec`]) as a [`SimParser`].
///
/// # Errors
/// A malformed option, as kcopyd-sim names it.
pub fn parse_sim_spec(options: &str) -> Result<Arc<dyn SimDisk>, String> {
    let spec = kcopyd_sim::spec::SimSpec::parse(options).map_err(|error| error.to_string())?;
    Ok(Arc::new(spec))
}

impl SimDisk for kcopyd_sim::spec::SimSpec {
    fn len_bytes(&self) -> Option<u64> {
        self.len_bytes
    }
    fn headers_only(&self) -> bool {
        self.headers_only
    }
    fn check_len(&self, len_bytes: u64) -> Result<(), SpecError> {
        kcopyd_sim::spec::SimSpec::check_len(self, len_bytes)
    }
    fn build(&self, len_bytes: u64) -> Device {
        kcopyd_sim::spec::SimSpec::build(self, len_bytes)
    }
}

/// What backs a device address.
#[derive(Debug, Clone)]
pub enum Backend {
    /// A regular file or a block device.
    Path(PathBuf),
    /// A simulated disk.
    Sim(Arc<dyn SimDisk>),
    /// An NBD export, by its URI (checked by [`kcopyd_nbd::NbdUri::parse`]).
    Nbd(String),
}

impl PartialEq for Backend {
    /// Paths and URIs by their text; simulated disks by their description.
    fn eq(&self, other: &Backend) -> bool {
        match (self, other) {
            (Backend::Path(a), Backend::Path(b)) => a == b,
            (Backend::Nbd(a), Backend::Nbd(b)) => a == b,
            (Backend::Sim(a), Backend::Sim(b)) => format!("{a:?}") == format!("{b:?}"),
            _ => false,
        }
    }
}

impl Eq for Backend {}

/// A parsed device address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceAddress {
    /// The address as given, for messages.
    pub text: String,
    /// The device.
    pub backend: Backend,
    /// Where the range starts on the device, in bytes.
    pub offset_bytes: u64,
}

/// Why a device address could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AddressError {
    /// Nothing before the `@`, or nothing at all.
    #[error("no path given")]
    Empty,
    /// The text after the last `@` is not a size.
    #[error("offset '{offset}' after '@': {source} (a path that holds '@' needs an explicit offset, as in NAME@0)")]
    Offset {
        /// The text after the `@`.
        offset: String,
        /// What is wrong with it.
        #[source]
        source: SizeError,
    },
    /// A malformed `sim:` device: what the [`SimParser`] said.
    #[error("{0}")]
    Sim(String),
    /// A malformed or unsupported NBD URI.
    #[error(transparent)]
    Nbd(#[from] kcopyd_nbd::UriError),
    /// An NBD URI whose scheme is not written in lower case (`NBD://`).
    #[error("URI scheme '{scheme}' is written in lower case: '{lower}://'")]
    UriSchemeCase {
        /// The scheme as given.
        scheme: String,
        /// The same in lower case.
        lower: String,
    },
    /// An NBD URI naming TCP port 0, where no server listens.
    #[error("port 0 in '{uri}': give the server's port (10809 by default)")]
    PortZero {
        /// The URI.
        uri: String,
    },
}

/// Refuses an NBD URI with its scheme in capitals (`NBD://host/x`), which would otherwise be
/// taken for a path.
fn check_scheme_case(device: &str) -> Result<(), AddressError> {
    let Some((scheme, _)) = device.split_once("://") else { return Ok(()) };
    let lower = scheme.to_ascii_lowercase();
    if lower != scheme && kcopyd_nbd::NbdUri::is_nbd_uri(&format!("{lower}://")) {
        return Err(AddressError::UriSchemeCase { scheme: scheme.to_owned(), lower });
    }
    Ok(())
}

impl DeviceAddress {
    /// The file or block device at `path`, from its start (no `@OFFSET` parsing: a path may
    /// hold `@`).
    pub fn path(path: impl Into<PathBuf>) -> DeviceAddress {
        let path = path.into();
        DeviceAddress { text: path.display().to_string(), backend: Backend::Path(path), offset_bytes: 0 }
    }

    /// Reads a device address; `sim` reads the options of a `sim:` one.
    ///
    /// # Errors
    /// An empty path, a malformed offset or a malformed `sim:` option.
    pub fn parse(text: &str, sim: &SimParser) -> Result<DeviceAddress, AddressError> {
        let (device, offset_bytes) = match text.rsplit_once('@') {
            Some((device, offset)) => {
                let offset_bytes = size::parse_size(offset)
                    .map_err(|source| AddressError::Offset { offset: offset.to_owned(), source })?;
                (device, offset_bytes)
            }
            None => (text, 0),
        };
        check_scheme_case(device)?;
        let backend = match device.strip_prefix(SIM_PREFIX) {
            Some(options) => Backend::Sim(sim(options).map_err(AddressError::Sim)?),
            None if kcopyd_nbd::NbdUri::is_nbd_uri(device) => {
                let uri = kcopyd_nbd::NbdUri::parse(device)?;
                if matches!(uri.address, kcopyd_nbd::Address::Tcp { port: 0, .. }) {
                    return Err(AddressError::PortZero { uri: device.to_owned() });
                }
                Backend::Nbd(device.to_owned())
            }
            None if device.is_empty() => return Err(AddressError::Empty),
            None => Backend::Path(PathBuf::from(device)),
        };
        Ok(DeviceAddress { text: text.to_owned(), backend, offset_bytes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A disk of the size its only option gives.
    #[derive(Debug)]
    struct Sized(u64);

    impl SimDisk for Sized {
        fn len_bytes(&self) -> Option<u64> {
            Some(self.0)
        }
        fn headers_only(&self) -> bool {
            false
        }
        fn check_len(&self, _: u64) -> Result<(), kcopyd_sim::spec::SpecError> {
            Ok(())
        }
        fn build(&self, len_bytes: u64) -> Device {
            std::sync::Arc::new(kcopyd_sim::MemDisk::zeroed("sized", len_bytes / 512, 512))
        }
    }

    fn parse_sim(options: &str) -> Result<Arc<dyn SimDisk>, String> {
        let mut len_bytes = 0;
        for option in options.split(',') {
            match option.split_once('=') {
                Some(("size", value)) => len_bytes = size::parse_size(value).map_err(|e| e.to_string())?,
                Some(("seed", _)) => {}
                Some((key, _)) => return Err(format!("unknown key '{key}'")),
                None => return Err(format!("not KEY=VALUE: '{option}'")),
            }
        }
        Ok(Arc::new(Sized(len_bytes)))
    }

    #[test]
    fn paths_offsets_and_sim_devices() {
        let plain = DeviceAddress::parse("disk.img", &parse_sim).unwrap();
        assert_eq!((plain.backend, plain.offset_bytes), (Backend::Path("disk.img".into()), 0));
        let offset = DeviceAddress::parse("/dev/sdb@1G", &parse_sim).unwrap();
        assert_eq!((offset.backend, offset.offset_bytes), (Backend::Path("/dev/sdb".into()), 1 << 30));
        let at_in_path = DeviceAddress::parse("a@b.img@8s", &parse_sim).unwrap();
        assert_eq!((at_in_path.backend, at_in_path.offset_bytes), (Backend::Path("a@b.img".into()), 4096));
        let simulated = DeviceAddress::parse("sim:size=1M,seed=3@4K", &parse_sim).unwrap();
        assert_eq!(simulated.offset_bytes, 4096);
        let Backend::Sim(spec) = simulated.backend else { panic!("not a sim device: {simulated:?}") };
        assert_eq!(spec.len_bytes(), Some(1048576));
        let nbd = DeviceAddress::parse("nbd://host:10900/disk@1M", &parse_sim).unwrap();
        assert_eq!((nbd.backend, nbd.offset_bytes), (Backend::Nbd("nbd://host:10900/disk".into()), 1 << 20));
        let unix = DeviceAddress::parse("nbd+unix:///?socket=/run/s.sock", &parse_sim).unwrap();
        assert_eq!((unix.backend, unix.offset_bytes), (Backend::Nbd("nbd+unix:///?socket=/run/s.sock".into()), 0));
        let tls = DeviceAddress::parse("nbds://host/disk?tls-certificates=/etc/pki/nbd@1M", &parse_sim).unwrap();
        let expected = Backend::Nbd("nbds://host/disk?tls-certificates=/etc/pki/nbd".into());
        assert_eq!((tls.backend, tls.offset_bytes), (expected, 1 << 20));
    }

    #[test]
    fn malformed_arguments_say_why() {
        assert_eq!(DeviceAddress::parse("", &parse_sim), Err(AddressError::Empty));
        assert_eq!(DeviceAddress::parse("@4K", &parse_sim), Err(AddressError::Empty));
        let offset = DeviceAddress::parse("disk.img@1Q", &parse_sim).unwrap_err().to_string();
        assert!(offset.contains("offset '1Q'") && offset.contains("NAME@0"), "{offset}");
        let sim = DeviceAddress::parse("sim:size=1M,colour=red", &parse_sim).unwrap_err();
        assert_eq!(sim, AddressError::Sim("unknown key 'colour'".into()));
        let tls = DeviceAddress::parse("nbd://host/disk?tls-verify-peer=false", &parse_sim).unwrap_err().to_string();
        assert!(tls.contains("use nbds://"), "{tls}");
        let socket = DeviceAddress::parse("nbd+unix:///disk", &parse_sim).unwrap_err().to_string();
        assert!(socket.contains("?socket=PATH"), "{socket}");
    }
}
