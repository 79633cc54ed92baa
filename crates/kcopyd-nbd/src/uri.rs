//! NBD URIs, as the NBD URI specification (`doc/uri.md` of the reference implementation)
//! writes them.
//!
//! ```text
//!  nbd://HOST[:PORT]/EXPORT              TCP, port 10809 by default, IPv6 hosts in [brackets]
//!  nbd+unix:///EXPORT?socket=PATH        a unix socket
//!  nbds://HOST[:PORT]/EXPORT             the same through TLS (NBD_OPT_STARTTLS)
//!  nbds+unix:///EXPORT?socket=PATH       a unix socket through TLS
//!  nbds://…?tls-certificates=DIR&tls-verify-peer=false&tls-hostname=NAME
//! ```
//!
//! The export name is the path after the first `/`, percent-decoded; an empty one (`nbd://host`
//! or `nbd://host/`) names the server's default export. The `tls-*` query parameters are
//! libnbd's; they belong to the TLS schemes only (on `nbd://` they would suggest an encryption
//! that does not happen, so they are refused there).
//!
//! The parameters themselves are [`TlsOptions`], plain data kept here, below `tls.rs`, which
//! builds the rustls configuration from them.

use std::fmt;
use std::path::PathBuf;

use thiserror::Error;

use crate::proto::NBD_DEFAULT_PORT;

/// How an `nbds://` connection is secured: libnbd's URI parameters, each `None` when not
/// given. In [`ConnectOptions::tls`](crate::ConnectOptions::tls) they are the defaults for
/// every TLS URI; the URI's own parameters win.
///
/// ```
/// use kcopyd_nbd::TlsOptions;
/// let uri = TlsOptions { verify_peer: Some(false), ..TlsOptions::default() };
/// let defaults = TlsOptions { certificates: Some("/etc/pki/nbd".into()), verify_peer: Some(true), hostname: None };
/// let merged = uri.or(&defaults);
/// assert_eq!((merged.certificates.unwrap().to_str(), merged.verify_peer), (Some("/etc/pki/nbd"), Some(false)));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct TlsOptions {
    /// `tls-certificates=DIR`: the directory holding [`CA_CERT_FILE`](crate::CA_CERT_FILE) and optionally
    /// [`CLIENT_CERT_FILE`](crate::CLIENT_CERT_FILE) with [`CLIENT_KEY_FILE`](crate::CLIENT_KEY_FILE). `None`: the system's trust roots.
    pub certificates: Option<PathBuf>,
    /// `tls-verify-peer`: whether the server's certificate is verified (`None`: yes).
    pub verify_peer: Option<bool>,
    /// `tls-hostname`: the name the server's certificate must hold (`None`: the URI's host,
    /// [`UNIX_SOCKET_HOSTNAME`](crate::UNIX_SOCKET_HOSTNAME) for a unix socket).
    pub hostname: Option<String>,
}

impl TlsOptions {
    /// Each parameter of `self`, or else of `defaults`.
    pub fn or(self, defaults: &TlsOptions) -> TlsOptions {
        TlsOptions {
            certificates: self.certificates.or_else(|| defaults.certificates.clone()),
            verify_peer: self.verify_peer.or(defaults.verify_peer),
            hostname: self.hostname.or_else(|| defaults.hostname.clone()),
        }
    }

    /// Whether the server's certificate is verified (the default).
    pub fn verifies_peer(&self) -> bool {
        self.verify_peer.unwrap_or(true)
    }
}

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
    /// `Some` for the TLS schemes (`nbds`, `nbds+unix`): what the query's `tls-*` parameters
    /// say (each `None` when not given). `None`: plain text.
    pub tls: Option<TlsOptions>,
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
    /// A `tls-*` query parameter on a plain-text URI (`nbd://`, `nbd+unix://`).
    #[error("'{uri}': '{key}' asks for TLS but the scheme is plain text: use {tls_scheme}://")]
    TlsParameterWithoutTls {
        /// The text given.
        uri: String,
        /// The parameter.
        key: String,
        /// The TLS scheme to use instead.
        tls_scheme: &'static str,
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
    /// Another scheme, a missing or extra socket, a bad port, unknown query keys, `tls-*`
    /// parameters on a plain-text scheme or with a malformed value.
    pub fn parse(uri: &str) -> Result<NbdUri, UriError> {
        let malformed = |problem: String| UriError::Malformed { uri: uri.to_owned(), problem };
        let (scheme, rest) = uri.split_once("://").ok_or_else(|| UriError::Scheme { uri: uri.to_owned() })?;
        let (unix, tls) = match scheme {
            "nbd" => (false, false),
            "nbd+unix" => (true, false),
            "nbds" => (false, true),
            "nbds+unix" => (true, true),
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
        let mut tls_options = TlsOptions::default();
        for pair in query.into_iter().flat_map(|q| q.split('&')).filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "socket" if unix => socket = Some(percent_decode(value, malformed)?),
                "socket" => return Err(malformed("'socket' belongs to nbd+unix:// URIs".into())),
                "tls-certificates" | "tls-verify-peer" | "tls-hostname" if !tls => {
                    let tls_scheme = if unix { "nbds+unix" } else { "nbds" };
                    return Err(UriError::TlsParameterWithoutTls {
                        uri: uri.to_owned(),
                        key: key.to_owned(),
                        tls_scheme,
                    });
                }
                "tls-certificates" => tls_options.certificates = Some(PathBuf::from(percent_decode(value, malformed)?)),
                "tls-verify-peer" => tls_options.verify_peer = Some(parse_bool(key, value, malformed)?),
                "tls-hostname" => tls_options.hostname = Some(percent_decode(value, malformed)?),
                _ => return Err(malformed(format!("unknown query parameter '{key}'"))),
            }
        }
        if tls_options.certificates.as_ref().is_some_and(|dir| dir.as_os_str().is_empty()) {
            return Err(malformed("'tls-certificates' names no directory".into()));
        }
        if tls_options.hostname.as_ref().is_some_and(String::is_empty) {
            return Err(malformed("'tls-hostname' names no host".into()));
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
        Ok(NbdUri { address, export, tls: tls.then_some(tls_options) })
    }
}

/// `true`/`false` as libnbd reads them (also `on`/`off`, `yes`/`no`, `1`/`0`).
fn parse_bool(key: &str, value: &str, malformed: impl Fn(String) -> UriError) -> Result<bool, UriError> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "on" | "yes" | "1" => Ok(true),
        "false" | "off" | "no" | "0" => Ok(false),
        _ => Err(malformed(format!("'{key}={value}': expected true or false"))),
    }
}

/// `uri` with its scheme turned into the TLS one (`nbd://` into `nbds://`, `nbd+unix://`
/// into `nbds+unix://`), for the message that a server requires TLS.
pub(crate) fn with_tls_scheme(uri: &str) -> String {
    match uri.strip_prefix("nbd") {
        Some(rest) if rest.starts_with("://") || rest.starts_with("+unix://") => format!("nbds{rest}"),
        _ => uri.to_owned(),
    }
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = if self.tls.is_some() { "s" } else { "" };
        match &self.address {
            Address::Tcp { .. } => write!(f, "nbd{s}://{}/{}", self.address, self.export)?,
            Address::Unix(path) => write!(f, "nbd{s}+unix:///{}?socket={}", self.export, path.display())?,
        }
        let Some(tls) = &self.tls else { return Ok(()) };
        let mut separator = if matches!(self.address, Address::Unix(_)) { '&' } else { '?' };
        let mut parameter = |f: &mut fmt::Formatter<'_>, key: &str, value: &dyn fmt::Display| {
            let written = write!(f, "{separator}{key}={value}");
            separator = '&';
            written
        };
        if let Some(dir) = &tls.certificates {
            parameter(f, "tls-certificates", &dir.display())?;
        }
        if let Some(verify) = tls.verify_peer {
            parameter(f, "tls-verify-peer", &verify)?;
        }
        if let Some(name) = &tls.hostname {
            parameter(f, "tls-hostname", name)?;
        }
        Ok(())
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
        assert_eq!(unix.tls, None);
    }

    #[test]
    fn tls_uris_and_their_parameters() {
        let plain_tls = NbdUri::parse("nbds://example.com/backup").unwrap();
        assert_eq!(plain_tls.tls, Some(TlsOptions::default()));
        assert_eq!(plain_tls.to_string(), "nbds://example.com:10809/backup");
        let text = "nbds://h:99/x?tls-certificates=/etc/pki/a%20b&tls-verify-peer=off&tls-hostname=disk.example";
        let full = NbdUri::parse(text).unwrap();
        let expected = TlsOptions {
            certificates: Some("/etc/pki/a b".into()),
            verify_peer: Some(false),
            hostname: Some("disk.example".into()),
        };
        assert_eq!(full.tls.as_ref(), Some(&expected));
        assert_eq!(
            full.to_string(),
            "nbds://h:99/x?tls-certificates=/etc/pki/a b&tls-verify-peer=false&tls-hostname=disk.example"
        );
        let unix = NbdUri::parse("nbds+unix:///?socket=/run/s&tls-verify-peer=1").unwrap();
        assert_eq!(unix.address, Address::Unix("/run/s".into()));
        assert_eq!(unix.tls.and_then(|tls| tls.verify_peer), Some(true));
        assert_eq!(with_tls_scheme("nbd://h/x"), "nbds://h/x");
        assert_eq!(with_tls_scheme("nbd+unix:///x?socket=/s"), "nbds+unix:///x?socket=/s");
    }

    #[test]
    fn malformed_uris_say_why() {
        let problem = |uri: &str| NbdUri::parse(uri).unwrap_err().to_string();
        assert!(problem("http://host/x").contains("not an NBD URI"));
        assert!(problem("nbd+unix:///x").contains("?socket=PATH"));
        assert!(problem("nbd+unix://host/x?socket=/s").contains("takes no host"));
        assert!(problem("nbd://host/x?socket=/s").contains("nbd+unix"));
        assert!(problem("nbd://host:99999/x").contains("port '99999'"));
        assert!(problem("nbd:///x").contains("no host"));
        assert!(problem("nbd://h/x?tls-certificates=/c").contains("'tls-certificates' asks for TLS"));
        assert!(problem("nbd+unix:///x?socket=/s&tls-verify-peer=false").contains("use nbds+unix://"));
        assert!(problem("nbds://h/x?tls-verify-peer=maybe").contains("expected true or false"));
        assert!(problem("nbds://h/x?tls-certificates=").contains("names no directory"));
        assert!(problem("nbds://h/x?tls-hostname=").contains("names no host"));
        assert!(problem("nbds://h/x?tls-psk-file=/k").contains("unknown query parameter 'tls-psk-file'"));
        assert!(problem("nbd://h/%zz").contains("'%zz'"));
        assert!(problem("nbd://[::1/x").contains("']'"));
    }
}
