//! NBD URIs, as the NBD URI specification (`doc/uri.md` of the reference implementation)
//! writes them.
//!
//! ```text
//!  nbd://HOST[:PORT]/EXPORT              TCP, port 10809 by default, IPv6 hosts in [brackets]
//!  nbd+unix:///EXPORT?socket=PATH        a unix socket
//!  nbds://…, nbds+unix://…               TLS: refused, not supported yet
//! ```
//!
//! The export name is the path after the first `/`, percent-decoded; an empty one (`nbd://host`
//! or `nbd://host/`) names the server's default export.

use std::fmt;
use std::path::PathBuf;

use thiserror::Error;

use crate::proto::NBD_DEFAULT_PORT;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Address {
    /// A TCP host (name or address) and port.
    Tcp {
        /// Host name or address, without IPv6 brackets.
        host: String,
        /// TCP port.
        port: u16,
    },
    /// A unix socket.
    Unix(PathBuf),
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Address::Tcp { host, port } => write!(f, "{host}:{port}"),
            Address::Unix(path) => write!(f, "{}", path.display()),
        }
    }
}

/// A parsed NBD URI: where the server is and which export to open.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NbdUri {
    /// Where the server listens.
    pub address: Address,
    /// The export's name (empty: the server's default export).
    pub export: String,
}

/// Why a text is not an NBD URI this client can use.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum UriError {
    /// The scheme is not one of `nbd`, `nbd+unix`.
    #[error("'{uri}': not an NBD URI (expected nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH)")]
    Scheme {
        /// The text given.
        uri: String,
    },
    /// `nbds` and `nbds+unix` ask for TLS, which this client does not speak.
    #[error("'{uri}': TLS (nbds) is not supported; serve the export without TLS or tunnel it")]
    Tls {
        /// The text given.
        uri: String,
    },
    /// Something in the URI is malformed, named.
    #[error("'{uri}': {problem}")]
    Malformed {
        /// The text given.
        uri: String,
        /// What is wrong.
        problem: String,
    },
}

impl NbdUri {
    /// Whether `text` looks like an NBD URI (an `nbd` or `nbds` scheme), so that callers can
    /// tell URIs from paths before parsing.
    ///
    /// ```
    /// assert!(kcopyd_nbd::NbdUri::is_nbd_uri("nbd+unix:///?socket=/run/nbd.sock"));
    /// assert!(!kcopyd_nbd::NbdUri::is_nbd_uri("nbd.img"));
    /// ```
    pub fn is_nbd_uri(text: &str) -> bool {
        ["nbd://", "nbd+unix://", "nbds://", "nbds+unix://"].iter().any(|scheme| text.starts_with(scheme))
    }

    /// Parses an NBD URI.
    ///
    /// ```
    /// use kcopyd_nbd::{Address, NbdUri};
    /// let tcp = NbdUri::parse("nbd://[::1]/disk%20a").unwrap();
    /// assert_eq!(tcp.address, Address::Tcp { host: "::1".into(), port: 10809 });
    /// assert_eq!(tcp.export, "disk a");
    /// let unix = NbdUri::parse("nbd+unix:///?socket=/run/nbd.sock").unwrap();
    /// assert_eq!((unix.address, unix.export), (Address::Unix("/run/nbd.sock".into()), String::new()));
    /// ```
    ///
    /// # Errors
    /// Another scheme, TLS schemes, a missing or extra socket, a bad port, unknown query keys.
    pub fn parse(uri: &str) -> Result<NbdUri, UriError> {
        let malformed = |problem: String| UriError::Malformed { uri: uri.to_owned(), problem };
        let (scheme, rest) = uri.split_once("://").ok_or_else(|| UriError::Scheme { uri: uri.to_owned() })?;
        let unix = match scheme {
            "nbd" => false,
            "nbd+unix" => true,
            "nbds" | "nbds+unix" => return Err(UriError::Tls { uri: uri.to_owned() }),
            _ => return Err(UriError::Scheme { uri: uri.to_owned() }),
        };
        let (rest, query) = match rest.split_once('?') {
            Some((rest, query)) => (rest, Some(query)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(slash) => (&rest[..slash], &rest[slash + 1..]),
            None => (rest, ""),
        };
        let export = percent_decode(path, malformed)?;
        let mut socket = None;
        for pair in query.into_iter().flat_map(|q| q.split('&')).filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "socket" if unix => socket = Some(percent_decode(value, malformed)?),
                "socket" => return Err(malformed("'socket' belongs to nbd+unix:// URIs".into())),
                _ => return Err(malformed(format!("unknown query parameter '{key}'"))),
            }
        }
        let address = if unix {
            if !authority.is_empty() {
                return Err(malformed(format!(
                    "nbd+unix:// takes no host ('{authority}'): nbd+unix:///EXPORT?socket=PATH"
                )));
            }
            match socket {
                Some(path) if !path.is_empty() => Address::Unix(PathBuf::from(path)),
                _ => return Err(malformed("nbd+unix:// needs ?socket=PATH".into())),
            }
        } else {
            let (host, port) = split_host_port(authority, malformed)?;
            if host.is_empty() {
                return Err(malformed("no host: nbd://HOST[:PORT]/EXPORT".into()));
            }
            Address::Tcp { host, port }
        };
        Ok(NbdUri { address, export })
    }
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.address {
            Address::Tcp { .. } => write!(f, "nbd://{}/{}", self.address, self.export),
            Address::Unix(path) => write!(f, "nbd+unix:///{}?socket={}", self.export, path.display()),
        }
    }
}

/// `host`, `host:port`, `[v6]`, `[v6]:port`.
fn split_host_port(authority: &str, malformed: impl Fn(String) -> UriError) -> Result<(String, u16), UriError> {
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let (host, after) =
            bracketed.split_once(']').ok_or_else(|| malformed("an IPv6 host without its closing ']'".into()))?;
        match after {
            "" => (host, None),
            _ => (
                host,
                Some(after.strip_prefix(':').ok_or_else(|| malformed(format!("'{after}' after the IPv6 host")))?),
            ),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    let port = match port {
        None => NBD_DEFAULT_PORT,
        Some(port) => port.parse().map_err(|_| malformed(format!("port '{port}' is not a number from 0 to 65535")))?,
    };
    Ok((host.to_owned(), port))
}

/// Decodes `%XX` escapes.
fn percent_decode(text: &str, malformed: impl Fn(String) -> UriError) -> Result<String, UriError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        if bytes[at] == b'%' {
            let hex =
                text.get(at + 1..at + 3).ok_or_else(|| malformed(format!("'%' without two hex digits in '{text}'")))?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| malformed(format!("'%{hex}' is not a percent escape")))?);
            at += 3;
        } else {
            out.push(bytes[at]);
            at += 1;
        }
    }
    String::from_utf8(out).map_err(|_| malformed(format!("'{text}' does not decode to UTF-8")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_and_unix_uris() {
        let uri = NbdUri::parse("nbd://example.com:10900/backup").unwrap();
        assert_eq!(uri.address, Address::Tcp { host: "example.com".into(), port: 10900 });
        assert_eq!(uri.export, "backup");
        assert_eq!(uri.to_string(), "nbd://example.com:10900/backup");
        let default = NbdUri::parse("nbd://localhost").unwrap();
        assert_eq!((default.address.to_string(), default.export.as_str()), ("localhost:10809".into(), ""));
        let v6 = NbdUri::parse("nbd://[fe80::1]:99/").unwrap();
        assert_eq!(v6.address.to_string(), "[fe80::1]:99");
        let unix = NbdUri::parse("nbd+unix:///a%2Fb?socket=/tmp/s%20.sock").unwrap();
        assert_eq!((unix.address, unix.export), (Address::Unix("/tmp/s .sock".into()), "a/b".into()));
    }

    #[test]
    fn malformed_uris_say_why() {
        let problem = |uri: &str| NbdUri::parse(uri).unwrap_err().to_string();
        assert!(problem("nbds://host/x").contains("TLS"));
        assert!(problem("nbds+unix:///x?socket=/s").contains("TLS"));
        assert!(problem("http://host/x").contains("not an NBD URI"));
        assert!(problem("nbd+unix:///x").contains("?socket=PATH"));
        assert!(problem("nbd+unix://host/x?socket=/s").contains("takes no host"));
        assert!(problem("nbd://host/x?socket=/s").contains("nbd+unix"));
        assert!(problem("nbd://host:99999/x").contains("port '99999'"));
        assert!(problem("nbd:///x").contains("no host"));
        assert!(problem("nbd://h/x?tls-certificates=/c").contains("unknown query parameter 'tls-certificates'"));
        assert!(problem("nbd://h/%zz").contains("'%zz'"));
        assert!(problem("nbd://[::1/x").contains("']'"));
    }
}
