//! X.509 certificates for the TLS tests, made here with `certtool` (Debian's gnutls-bin) in a
//! scratch directory, laid out as nbdkit, qemu-nbd and libnbd read them.
//!
//! ```text
//!  TestPki::new ─► ca/ (our CA: ca-key.pem, ca-cert.pem) + other-ca/ (a CA nobody trusts)
//!  server(ServerCert { names, expired, by_other_ca }) ─► DIR: ca-cert.pem server-cert.pem server-key.pem
//!  client(Trust::OurCa | Trust::OtherCa, identity)    ─► DIR: ca-cert.pem [client-cert.pem client-key.pem]
//! ```
//!
//! The CAs have ECDSA P-256 keys; servers and clients RSA 2048 keys, because qemu-nbd wants
//! key encipherment in their key usage, which certtool gives RSA keys only. A missing
//! certtool prints `SKIPPED:` ([`TestPki::new`] gives `None`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::fixtures::{TempDir, skip};
use crate::nbd_servers::installed;

/// A server certificate to make.
#[derive(Debug, Clone, Copy)]
pub struct ServerCert<'a> {
    /// Its DNS names (an IP address is written as such: `127.0.0.1`).
    pub names: &'a [&'a str],
    /// Valid only in 2020: expired long ago.
    pub expired: bool,
    /// Issued by the CA nobody trusts.
    pub by_other_ca: bool,
}

impl Default for ServerCert<'_> {
    /// `localhost` and `127.0.0.1`, valid for a week, issued by our CA.
    fn default() -> Self {
        ServerCert { names: &["localhost", "127.0.0.1"], expired: false, by_other_ca: false }
    }
}

/// Which CA a client trusts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trust {
    /// The CA that issued the servers' certificates.
    OurCa,
    /// Another CA, which issued nothing the servers use.
    OtherCa,
}

/// A scratch public-key infrastructure: two CAs, and directories of certificates.
#[derive(Debug)]
pub struct TestPki {
    dir: TempDir,
}

impl TestPki {
    /// Two fresh CAs. `None` after printing `SKIPPED:` when certtool is not installed.
    pub fn new(test: &str) -> Option<TestPki> {
        if !installed("certtool") {
            skip(test, "certtool is not installed (Debian: apt-get install gnutls-bin)");
            return None;
        }
        let pki = TestPki { dir: TempDir::new("tls-pki") };
        for ca in ["ca", "other-ca"] {
            let dir = pki.dir.join(ca);
            fs::create_dir(&dir).unwrap();
            private_key(&dir.join("ca-key.pem"), "--key-type=ecdsa");
            let template =
                write_template(&dir, "ca.info", &format!("cn = kcopyd test {ca}\nca\ncert_signing_key\n{VALID}"));
            certtool(&[
                "--generate-self-signed",
                "--load-privkey",
                &path(&dir.join("ca-key.pem")),
                "--template",
                &path(&template),
                "--outfile",
                &path(&dir.join("ca-cert.pem")),
            ]);
        }
        Some(pki)
    }

    /// A server's directory (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`) named `name`.
    pub fn server(&self, name: &str, cert: ServerCert<'_>) -> PathBuf {
        let dir = self.fresh_dir(name);
        let mut template = String::from("organization = kcopyd test\ncn = kcopyd test server\n");
        for host in cert.names {
            let kind = if host.parse::<std::net::IpAddr>().is_ok() { "ip_address" } else { "dns_name" };
            template.push_str(&format!("{kind} = {host}\n"));
        }
        // qemu-nbd checks for key encipherment as well as signing (as its docs make them).
        template.push_str("tls_www_server\nsigning_key\nencryption_key\n");
        template.push_str(if cert.expired { EXPIRED } else { VALID });
        let issuer = if cert.by_other_ca { "other-ca" } else { "ca" };
        self.issue(&dir, "server", issuer, &template);
        fs::copy(self.dir.join(issuer).join("ca-cert.pem"), dir.join("ca-cert.pem")).unwrap();
        dir
    }

    /// A client's directory named `name`: the `trust`ed CA's `ca-cert.pem`, and with
    /// `identity` a `client-cert.pem` and `client-key.pem` issued by our CA.
    pub fn client(&self, name: &str, trust: Trust, identity: bool) -> PathBuf {
        let dir = self.fresh_dir(name);
        let trusted = match trust {
            Trust::OurCa => "ca",
            Trust::OtherCa => "other-ca",
        };
        fs::copy(self.dir.join(trusted).join("ca-cert.pem"), dir.join("ca-cert.pem")).unwrap();
        if identity {
            let template = format!(
                "organization = kcopyd test\ncn = kcopyd test client\ntls_www_client\nsigning_key\nencryption_key\n{VALID}"
            );
            self.issue(&dir, "client", "ca", &template);
        }
        dir
    }

    fn fresh_dir(&self, name: &str) -> PathBuf {
        let dir = self.dir.join(name);
        fs::create_dir(&dir).unwrap_or_else(|error| panic!("{}: {error}", dir.display()));
        dir
    }

    /// `dir/{role}-key.pem` and `dir/{role}-cert.pem`, signed by `issuer`.
    fn issue(&self, dir: &Path, role: &str, issuer: &str, template: &str) {
        let (key, cert) = (dir.join(format!("{role}-key.pem")), dir.join(format!("{role}-cert.pem")));
        private_key(&key, "--key-type=rsa");
        let template = write_template(dir, &format!("{role}.info"), template);
        let ca = self.dir.join(issuer);
        certtool(&[
            "--generate-certificate",
            "--load-ca-certificate",
            &path(&ca.join("ca-cert.pem")),
            "--load-ca-privkey",
            &path(&ca.join("ca-key.pem")),
            "--load-privkey",
            &path(&key),
            "--template",
            &path(&template),
            "--outfile",
            &path(&cert),
        ]);
    }
}

/// Valid from now for a week.
const VALID: &str = "expiration_days = 7\n";
/// Valid through 2020 only.
const EXPIRED: &str = "activation_date = \"2020-01-01 00:00:00 UTC\"\nexpiration_date = \"2021-01-01 00:00:00 UTC\"\n";

fn write_template(dir: &Path, name: &str, text: &str) -> PathBuf {
    let template = dir.join(name);
    fs::write(&template, text).unwrap();
    template
}

fn private_key(key: &Path, key_type: &str) {
    certtool(&["--generate-privkey", key_type, "--bits=2048", "--outfile", &path(key)]);
}

fn path(path: &Path) -> String {
    path.display().to_string()
}

fn certtool(args: &[&str]) {
    let output = Command::new("certtool").args(args).output().expect("running certtool");
    assert!(
        output.status.success(),
        "certtool {args:?}: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}
