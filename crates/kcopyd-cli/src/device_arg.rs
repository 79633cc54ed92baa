//! Device arguments: `PATH`, `PATH@OFFSET`, `sim:KEY=VALUE,...[@OFFSET]`, NBD URIs.
//!
//! ```text
//!  "disk.img"              path disk.img, offset 0
//!  "mirror.img@1G"         path mirror.img, offset 1 GiB (the text after the last '@' is a size)
//!  "a@b.img@0"             path a@b.img: a path holding '@' needs an explicit offset
//!  "sim:size=1G,seed=7@4K" simulated disk, offset 4 KiB
//!  "nbd://host/disk@1M"    NBD export 'disk' on host:10809, offset 1 MiB
//!  "nbd+unix:///?socket=/run/nbd.sock"  the default export on a unix socket
//! ```

use std::path::PathBuf;

use thiserror::Error;

use crate::size::{self, SizeError};
use kcopyd_sim::spec::{self as sim, SimSpec, SpecError as SimError};

/// What backs a device argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// A regular file or a block device.
    Path(PathBuf),
    /// A simulated disk.
    Sim(Box<SimSpec>),
    /// An NBD export, by its URI (checked by [`kcopyd_nbd::NbdUri::parse`]).
    Nbd(String),
}

/// A parsed device argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceArg {
    /// The argument as given, for messages.
    pub text: String,
    /// The device.
    pub backend: Backend,
    /// Where the range starts on the device, in bytes.
    pub offset_bytes: u64,
}

/// Why a device argument could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DeviceArgError {
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
    /// A malformed `sim:` device.
    #[error(transparent)]
    Sim(#[from] SimError),
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
fn check_scheme_case(device: &str) -> Result<(), DeviceArgError> {
    let Some((scheme, _)) = device.split_once("://") else { return Ok(()) };
    let lower = scheme.to_ascii_lowercase();
    if lower != scheme && kcopyd_nbd::NbdUri::is_nbd_uri(&format!("{lower}://")) {
        return Err(DeviceArgError::UriSchemeCase { scheme: scheme.to_owned(), lower });
    }
    Ok(())
}

impl DeviceArg {
    /// Reads a device argument.
    ///
    /// # Errors
    /// An empty path, a malformed offset or a malformed `sim:` option.
    pub fn parse(text: &str) -> Result<DeviceArg, DeviceArgError> {
        let (device, offset_bytes) = match text.rsplit_once('@') {
            Some((device, offset)) => {
                let offset_bytes = size::parse_size(offset)
                    .map_err(|source| DeviceArgError::Offset { offset: offset.to_owned(), source })?;
                (device, offset_bytes)
            }
            None => (text, 0),
        };
        check_scheme_case(device)?;
        let backend = match device.strip_prefix(sim::PREFIX) {
            Some(options) => Backend::Sim(Box::new(SimSpec::parse(options)?)),
            None if kcopyd_nbd::NbdUri::is_nbd_uri(device) => {
                let uri = kcopyd_nbd::NbdUri::parse(device)?;
                if matches!(uri.address, kcopyd_nbd::Address::Tcp { port: 0, .. }) {
                    return Err(DeviceArgError::PortZero { uri: device.to_owned() });
                }
                Backend::Nbd(device.to_owned())
            }
            None if device.is_empty() => return Err(DeviceArgError::Empty),
            None => Backend::Path(PathBuf::from(device)),
        };
        Ok(DeviceArg { text: text.to_owned(), backend, offset_bytes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_offsets_and_sim_devices() {
        let plain = DeviceArg::parse("disk.img").unwrap();
        assert_eq!((plain.backend, plain.offset_bytes), (Backend::Path("disk.img".into()), 0));
        let offset = DeviceArg::parse("/dev/sdb@1G").unwrap();
        assert_eq!((offset.backend, offset.offset_bytes), (Backend::Path("/dev/sdb".into()), 1 << 30));
        let at_in_path = DeviceArg::parse("a@b.img@8s").unwrap();
        assert_eq!((at_in_path.backend, at_in_path.offset_bytes), (Backend::Path("a@b.img".into()), 4096));
        let simulated = DeviceArg::parse("sim:size=1M,seed=3@4K").unwrap();
        assert_eq!(simulated.offset_bytes, 4096);
        let Backend::Sim(spec) = simulated.backend else { panic!("not a sim device: {simulated:?}") };
        assert_eq!((spec.len_bytes, spec.seed), (Some(1048576), Some(3)));
        let nbd = DeviceArg::parse("nbd://host:10900/disk@1M").unwrap();
        assert_eq!((nbd.backend, nbd.offset_bytes), (Backend::Nbd("nbd://host:10900/disk".into()), 1 << 20));
        let unix = DeviceArg::parse("nbd+unix:///?socket=/run/s.sock").unwrap();
        assert_eq!((unix.backend, unix.offset_bytes), (Backend::Nbd("nbd+unix:///?socket=/run/s.sock".into()), 0));
    }

    #[test]
    fn malformed_arguments_say_why() {
        assert_eq!(DeviceArg::parse(""), Err(DeviceArgError::Empty));
        assert_eq!(DeviceArg::parse("@4K"), Err(DeviceArgError::Empty));
        let offset = DeviceArg::parse("disk.img@1Q").unwrap_err().to_string();
        assert!(offset.contains("offset '1Q'") && offset.contains("NAME@0"), "{offset}");
        let sim = DeviceArg::parse("sim:size=1M,colour=red").unwrap_err().to_string();
        assert!(sim.contains("'colour'"), "{sim}");
        let tls = DeviceArg::parse("nbds://host/disk").unwrap_err().to_string();
        assert!(tls.contains("TLS"), "{tls}");
        let socket = DeviceArg::parse("nbd+unix:///disk").unwrap_err().to_string();
        assert!(socket.contains("?socket=PATH"), "{socket}");
    }
}
