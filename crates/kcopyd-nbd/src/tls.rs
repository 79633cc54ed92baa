//! TLS for `nbds://` and `nbds+unix://`: the client's rustls configuration, built once per
//! device from libnbd's parameters and shared by all its connections.
//!
//! ```text
//!  tls-certificates=DIR ─► DIR/ca-cert.pem ──────────► trust roots (only these)
//!                          DIR/client-cert.pem ┐ both or neither: the client's identity
//!                          DIR/client-key.pem  ┘ (for servers that verify their clients)
//!  no tls-certificates  ─► the system's CA bundle (Debian, Fedora, … paths; SSL_CERT_FILE)
//!  tls-verify-peer=false ► any certificate: encrypted, but the server is not authenticated
//!  tls-hostname=NAME    ─► the name the certificate must hold; by default the URI's host,
//!                          "localhost" for a unix socket
//! ```
//!
//! With verification on (the default), the server's certificate must chain to a trust root,
//! be within its validity period, be meant for a TLS server, and hold the expected name as a
//! DNS name or IP address in its subject alternative names (rustls's webpki checks). The
//! handshake's signatures are checked in every case, also with `tls-verify-peer=false`.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use thiserror::Error;

use crate::uri::{Address, TlsOptions};

/// The trust roots in a `tls-certificates` directory (libnbd's and nbdkit's name).
pub const CA_CERT_FILE: &str = "ca-cert.pem";
/// The client's certificate chain in a `tls-certificates` directory, for servers that verify
/// their clients.
pub const CLIENT_CERT_FILE: &str = "client-cert.pem";
/// The client's private key in a `tls-certificates` directory.
pub const CLIENT_KEY_FILE: &str = "client-key.pem";
/// The name a server on a unix socket must hold in its certificate unless `tls-hostname`
/// names another (a unix socket has no host to check against).
pub const UNIX_SOCKET_HOSTNAME: &str = "localhost";
/// Where the system's CA bundle is looked for without `tls-certificates`, after the file
/// `SSL_CERT_FILE` names: Debian and Ubuntu, Fedora and RHEL, openSUSE, Alpine and the BSDs.
pub const SYSTEM_CA_BUNDLES: [&str; 4] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// Why the TLS configuration could not be built (nothing was sent to the server).
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A certificate or key file could not be read.
    #[error("cannot read {}: {source}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// A file that should hold PEM certificates holds none, or malformed ones.
    #[error("{}: {problem}", .path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// Only one of the client's certificate and key is there.
    #[error("{} is there but {} is not: client authentication needs both", .present.display(), .missing.display())]
    HalfClientIdentity {
        /// The file that is there.
        present: PathBuf,
        /// The file that is missing.
        missing: PathBuf,
    },
    /// The client's certificate and key do not make an identity rustls accepts.
    #[error("{} with {}: {source}", .cert.display(), .key.display())]
    ClientIdentity {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What rustls said.
        #[source]
        source: rustls::Error,
    },
    /// No `tls-certificates` and no system CA bundle.
    #[error(
        "no trust roots to verify the server with: give tls-certificates=DIR (holding {CA_CERT_FILE}) \
         in the URI or --tls-certificates DIR (no system CA bundle found: SSL_CERT_FILE, {})",
        SYSTEM_CA_BUNDLES.join(", ")
    )]
    NoTrustRoots,
    /// The name to verify is neither a DNS name nor an IP address.
    #[error("'{name}' is not a host name or IP address a certificate can be checked against")]
    Hostname {
        /// The name.
        name: String,
    },
    /// rustls refused the configuration (no protocol version in common with the provider).
    #[error("{0}")]
    Config(#[source] rustls::Error),
}

/// What every TLS connection of one device shares: the configuration (with its session
/// cache, so that further connections may resume) and the name the server must hold.
#[derive(Clone)]
pub(crate) struct TlsClient {
    pub config: Arc<ClientConfig>,
    pub name: ServerName<'static>,
}

impl fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsClient").field("name", &self.name).finish_non_exhaustive()
    }
}

impl TlsClient {
    /// The configuration `options` describe for a server at `address`.
    ///
    /// # Errors
    /// A file missing or malformed, no trust roots, an unusable host name.
    pub(crate) fn new(options: &TlsOptions, address: &Address) -> Result<TlsClient, TlsError> {
        // ring, not aws-lc-rs: a far lighter build. rustls marks it deprecated because it has no
        // post-quantum key exchange; classical ECDHE (X25519, P-256, P-384) is what the NBD
        // servers (gnutls in nbdkit and qemu-nbd) offer by default in any case.
        #[allow(deprecated, reason = "ring is the lean provider; see above")]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let name_text = match (&options.hostname, address) {
            (Some(name), _) => name.clone(),
            (None, Address::Tcp { host, .. }) => host.clone(),
            (None, Address::Unix(_)) => UNIX_SOCKET_HOSTNAME.to_owned(),
        };
        let name = ServerName::try_from(name_text.clone()).map_err(|_| TlsError::Hostname { name: name_text })?;
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?;
        let builder = if options.verifies_peer() {
            builder.with_root_certificates(trust_roots(options.certificates.as_deref())?)
        } else {
            let verifier = AnyServerCertificate { algorithms: provider.signature_verification_algorithms };
            builder.dangerous().with_custom_certificate_verifier(Arc::new(verifier))
        };
        let config = match client_identity(options.certificates.as_deref())? {
            Some((cert, key, (chain, private_key))) => builder
                .with_client_auth_cert(chain, private_key)
                .map_err(|source| TlsError::ClientIdentity { cert, key, source })?,
            None => builder.with_no_client_auth(),
        };
        Ok(TlsClient { config: Arc::new(config), name })
    }
}

/// The trust roots: `DIR/ca-cert.pem`, or else the system's bundle.
fn trust_roots(certificates: Option<&Path>) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    match certificates {
        Some(dir) => {
            let path = dir.join(CA_CERT_FILE);
            for cert in read_certificates(&path)? {
                roots.add(cert).map_err(|error| TlsError::Pem { path: path.clone(), problem: error.to_string() })?;
            }
        }
        None => {
            let from_env = std::env::var_os("SSL_CERT_FILE").map(PathBuf::from);
            let bundle = from_env.into_iter().chain(SYSTEM_CA_BUNDLES.iter().map(PathBuf::from)).find(|p| p.is_file());
            let path = bundle.ok_or(TlsError::NoTrustRoots)?;
            // A system bundle may hold certificates webpki cannot use: those are skipped.
            let (added, _ignored) = roots.add_parsable_certificates(read_certificates(&path)?);
            if added == 0 {
                return Err(TlsError::Pem { path, problem: "no usable CA certificate in it".into() });
            }
        }
    }
    Ok(roots)
}

/// A certificate chain and its key, with the files they came from.
type ClientIdentity = (PathBuf, PathBuf, (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>));

/// `DIR/client-cert.pem` and `DIR/client-key.pem` if both are there.
fn client_identity(certificates: Option<&Path>) -> Result<Option<ClientIdentity>, TlsError> {
    let Some(dir) = certificates else { return Ok(None) };
    let (cert, key) = (dir.join(CLIENT_CERT_FILE), dir.join(CLIENT_KEY_FILE));
    match (cert.exists(), key.exists()) {
        (false, false) => Ok(None),
        (true, false) => Err(TlsError::HalfClientIdentity { present: cert, missing: key }),
        (false, true) => Err(TlsError::HalfClientIdentity { present: key, missing: cert }),
        (true, true) => {
            let chain = read_certificates(&cert)?;
            let pem = fs::read(&key).map_err(|source| TlsError::Read { path: key.clone(), source })?;
            let private_key = PrivateKeyDer::from_pem_slice(&pem)
                .map_err(|error| TlsError::Pem { path: key.clone(), problem: format!("no private key: {error}") })?;
            Ok(Some((cert, key, (chain, private_key))))
        }
    }
}

/// Every PEM certificate in `path`: at least one.
fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = fs::read(path).map_err(|source| TlsError::Read { path: path.to_owned(), source })?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| TlsError::Pem { path: path.to_owned(), problem: format!("malformed PEM: {error}") })?;
    if certificates.is_empty() {
        return Err(TlsError::Pem { path: path.to_owned(), problem: "no PEM certificate in it".into() });
    }
    Ok(certificates)
}

/// `tls-verify-peer=false`: any certificate is taken, but the handshake's signatures are
/// still checked (the server proves it holds the key of the certificate it sent).
#[derive(Debug)]
struct AnyServerCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AnyServerCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// What a server that hangs up right after the TLS handshake most likely means.
pub(crate) const CLOSED_AFTER_TLS_HANDSHAKE: &str = "the server closed the connection after the TLS handshake: \
     it may require a client certificate it trusts (client-cert.pem and client-key.pem in tls-certificates=DIR)";

/// A hint for a failed TLS handshake, from rustls's error inside `error` (if any).
pub(crate) fn handshake_hint(error: &io::Error) -> Option<&'static str> {
    let rustls_error = error.get_ref()?.downcast_ref::<rustls::Error>()?;
    use rustls::CertificateError as Cert;
    Some(match rustls_error {
        rustls::Error::InvalidCertificate(Cert::UnknownIssuer | Cert::BadSignature) => {
            "the server's certificate is not signed by a trusted CA (tls-certificates=DIR/ca-cert.pem)"
        }
        rustls::Error::InvalidCertificate(Cert::Expired | Cert::ExpiredContext { .. }) => {
            "the server's certificate has expired"
        }
        rustls::Error::InvalidCertificate(Cert::NotValidYet | Cert::NotValidYetContext { .. }) => {
            "the server's certificate is not valid yet"
        }
        rustls::Error::InvalidCertificate(Cert::NotValidForName | Cert::NotValidForNameContext { .. }) => {
            "the server's certificate is for another name (tls-hostname=NAME names the one to expect)"
        }
        rustls::Error::AlertReceived(_) => {
            "the server ended the handshake: it may require a client certificate it trusts \
             (client-cert.pem and client-key.pem in tls-certificates=DIR)"
        }
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
            "the server did not answer in TLS after agreeing to NBD_OPT_STARTTLS"
        }
        _ => return None,
    })
}
