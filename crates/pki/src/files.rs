//! The host's certificate files and the TLS configs built from them.

use crate::verify::MemberVerifier;
use crate::{fingerprint, new_ca, new_request, sign_host, Expect, PkiError, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The folder under the state directory.
pub const PKI_DIR: &str = "pki";
/// The revocation list in the folder.
const CRL_FILE: &str = "crl.pem";

/// One host's certificates, loaded.
#[derive(Clone)]
pub struct HostPki {
    pub dir: PathBuf,
    /// The host name in the certificate (CN).
    pub name: String,
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    key_pem: String,
    /// The revocation list in force (`crl.pem`), shared by every TLS setting made
    /// from this value and its clones.
    revoked: crate::Revoked,
}

impl std::fmt::Debug for HostPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostPki")
            .field("dir", &self.dir)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// What `ferry cluster certs status` shows.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CertInfo {
    pub subject: String,
    pub names: Vec<String>,
    pub not_before: i64,
    pub not_after: i64,
    pub fingerprint: String,
    pub serial: String,
}

fn read(dir: &Path, file: &str) -> Result<String> {
    let p = dir.join(file);
    std::fs::read_to_string(&p).map_err(|source| PkiError::Io {
        what: "Read",
        path: p.display().to_string(),
        source,
    })
}

/// Writes `data` to `dir/file` through a temporary file and a rename.
fn write(dir: &Path, file: &str, data: &str, mode: u32) -> Result<()> {
    let p = dir.join(file);
    let tmp = dir.join(format!(".{file}.tmp"));
    let io = |source| PkiError::Io {
        what: "Write",
        path: p.display().to_string(),
        source,
    };
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(data.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, &p).map_err(io)
}

/// The certificate must carry the key's public half.
fn check_pair(cert_pem: &str, key_pem: &str) -> Result<()> {
    let cert = one_cert(cert_pem, "The host certificate")?;
    let key = rcgen::KeyPair::from_pem(key_pem).map_err(|e| PkiError::Bad {
        what: "The host key".into(),
        reason: e.to_string(),
    })?;
    let (_, c) = x509_parser::parse_x509_certificate(&cert).map_err(|e| PkiError::Bad {
        what: "The host certificate".into(),
        reason: e.to_string(),
    })?;
    if c.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(PkiError::Bad {
            what: "The host certificate".into(),
            reason: "it is not for this host's key".into(),
        });
    }
    Ok(())
}

/// Key and certificate, each replaced by a rename, the certificate last: a crash in
/// between leaves a new key beside the old certificate, which `load` refuses with the
/// reason rather than serving a pair that cannot work.
fn write_pair(dir: &Path, cert_pem: &str, key_pem: &str) -> Result<()> {
    write(dir, "host.key", key_pem, 0o600)?;
    write(dir, "host.crt", cert_pem, 0o644)
}

fn make_dir(dir: &Path) -> Result<()> {
    let io = |source| PkiError::Io {
        what: "Make",
        path: dir.display().to_string(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)
}

fn one_cert(pem: &str, what: &str) -> Result<CertificateDer<'static>> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| PkiError::Bad {
        what: what.into(),
        reason: e.to_string(),
    })
}

/// Details of a certificate (DER).
pub fn cert_info(der: &[u8]) -> Result<CertInfo> {
    let (_, c) = x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::Bad {
        what: "Parse a certificate".into(),
        reason: e.to_string(),
    })?;
    let mut names = vec![];
    if let Ok(Some(san)) = c.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                x509_parser::extensions::GeneralName::DNSName(d) => names.push(d.to_string()),
                x509_parser::extensions::GeneralName::IPAddress(b) => match b.len() {
                    4 => {
                        if let Ok(a) = <[u8; 4]>::try_from(*b) {
                            names.push(IpAddr::from(a).to_string());
                        }
                    }
                    16 => {
                        if let Ok(a) = <[u8; 16]>::try_from(*b) {
                            names.push(IpAddr::from(a).to_string());
                        }
                    }
                    _ => {}
                },
                _ => {}
            }
        }
    }
    Ok(CertInfo {
        subject: c.subject().to_string(),
        names,
        not_before: c.validity().not_before.timestamp(),
        not_after: c.validity().not_after.timestamp(),
        fingerprint: fingerprint(der),
        serial: c.raw_serial_as_string(),
    })
}

/// The serial of the first certificate in `pem` (as [`CertInfo::serial`]).
pub fn serial_pem(pem: &str) -> Result<String> {
    Ok(cert_info(&one_cert(pem, "Read a certificate")?)?.serial)
}

/// The fingerprint of the first certificate in `pem`.
pub fn fingerprint_pem(pem: &str) -> Result<String> {
    Ok(fingerprint(&one_cert(pem, "Read a certificate")?))
}

impl HostPki {
    /// Loads `dir`, or — when it holds no certificate yet — makes a CA of this host's
    /// own and a host certificate signed by it (a host alone). The certificate is made
    /// again (same key) when its names no longer match `name`/`addresses`.
    pub fn ensure(dir: &Path, name: &str, addresses: &[IpAddr]) -> Result<HostPki> {
        if !dir.join("host.crt").exists() {
            make_dir(dir)?;
            let (ca, ca_key) = new_ca(name)?;
            write(dir, "ca.key", &ca_key, 0o600)?;
            write(dir, "ca.crt", &ca, 0o644)?;
            let (key, csr) = new_request(name)?;
            let cert = sign_host(&ca, &ca_key, &csr, name, addresses)?;
            write(dir, "host.key", &key, 0o600)?;
            write(dir, "host.crt", &cert, 0o644)?;
            tracing::info!(dir = %dir.display(), "made this host's own CA and certificate");
        }
        let pki = HostPki::load(dir)?;
        let info = pki.host_info()?;
        let mut want: Vec<String> = vec![name.to_string()];
        want.extend(addresses.iter().map(|a| a.to_string()));
        let missing = want.iter().any(|w| !info.names.contains(w));
        if (pki.name != name || missing) && pki.has_ca_key() {
            tracing::info!(name, "host certificate names changed; issuing a new one");
            pki.renew(name, addresses)?;
            return HostPki::load(dir);
        }
        Ok(pki)
    }

    pub fn load(dir: &Path) -> Result<HostPki> {
        let ca_pem = read(dir, "ca.crt")?;
        let cert_pem = read(dir, "host.crt")?;
        let key_pem = read(dir, "host.key")?;
        let ca_der = one_cert(&ca_pem, "The cluster CA")?;
        let cert_der = one_cert(&cert_pem, "The host certificate")?;
        PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| PkiError::Bad {
            what: "The host key".into(),
            reason: e.to_string(),
        })?;
        check_pair(&cert_pem, &key_pem)?;
        let name = crate::verify::common_name(&cert_der).ok_or_else(|| PkiError::Bad {
            what: "The host certificate".into(),
            reason: "names no host (no CN)".into(),
        })?;
        let revoked = crate::Revoked::default();
        if dir.join(CRL_FILE).exists() {
            revoked.set(Some(crate::read_crl(&ca_der, &read(dir, CRL_FILE)?)?));
        }
        Ok(HostPki {
            dir: dir.to_path_buf(),
            name,
            ca_pem,
            ca_der,
            cert_pem,
            cert_der,
            key_pem,
            revoked,
        })
    }

    /// Replaces every file with what a cluster member handed out at join (the CA's
    /// key only where given: a joining host gets none, so its own old one goes).
    /// The certificate must be for `key_pem`'s key.
    pub fn install(
        dir: &Path,
        ca_pem: &str,
        ca_key_pem: Option<&str>,
        cert_pem: &str,
        key_pem: &str,
    ) -> Result<()> {
        one_cert(ca_pem, "The cluster CA")?;
        check_pair(cert_pem, key_pem)?;
        make_dir(dir)?;
        match ca_key_pem {
            Some(k) => write(dir, "ca.key", k, 0o600)?,
            None => {
                let _ = std::fs::remove_file(dir.join("ca.key"));
            }
        }
        write(dir, "ca.crt", ca_pem, 0o644)?;
        // A list of the CA this host had before means nothing under the new one.
        let _ = std::fs::remove_file(dir.join(CRL_FILE));
        write_pair(dir, cert_pem, key_pem)
    }

    /// This host's migration identity (`migration-ca.crt`, `migration.crt`,
    /// `migration.key`), made when missing, not this host's, or within 30 days of its end.
    pub fn migration(&self) -> Result<crate::MigrationIdentity> {
        let current = (|| {
            let id = crate::MigrationIdentity {
                ca_pem: read(&self.dir, "migration-ca.crt").ok()?,
                cert_pem: read(&self.dir, "migration.crt").ok()?,
                key_pem: read(&self.dir, "migration.key").ok()?,
            };
            check_pair(&id.cert_pem, &id.key_pem).ok()?;
            let der = one_cert(&id.cert_pem, "The migration certificate").ok()?;
            let info = cert_info(&der).ok()?;
            let soon =
                (time::OffsetDateTime::now_utc() + time::Duration::days(30)).unix_timestamp();
            (crate::verify::common_name(&der).as_deref() == Some(self.name.as_str())
                && info.not_after > soon)
                .then_some(id)
        })();
        if let Some(id) = current {
            return Ok(id);
        }
        let id = crate::new_migration_identity(&self.name)?;
        write(&self.dir, "migration.key", &id.key_pem, 0o600)?;
        write(&self.dir, "migration.crt", &id.cert_pem, 0o644)?;
        write(&self.dir, "migration-ca.crt", &id.ca_pem, 0o644)?;
        tracing::info!(dir = %self.dir.display(), "made this host's migration identity");
        Ok(id)
    }

    /// Forgets the cluster's CA and certificates (after leaving): the next start makes
    /// the host's own again.
    pub fn forget(dir: &Path) {
        for f in ["host.crt", "host.key", "ca.crt", "ca.key", CRL_FILE] {
            let _ = std::fs::remove_file(dir.join(f));
        }
    }

    pub fn has_ca_key(&self) -> bool {
        self.dir.join("ca.key").exists()
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    pub fn ca_key_pem(&self) -> Result<String> {
        if !self.has_ca_key() {
            return Err(PkiError::NoCaKey);
        }
        read(&self.dir, "ca.key")
    }

    pub fn ca_fingerprint(&self) -> String {
        fingerprint(&self.ca_der)
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    pub fn cert_path(&self) -> PathBuf {
        self.dir.join("host.crt")
    }
    pub fn key_path(&self) -> PathBuf {
        self.dir.join("host.key")
    }
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// This host's certificate pin, for join tokens ([`crate::leaf_pin`]).
    pub fn leaf_pin(&self) -> String {
        crate::leaf_pin(&self.cert_der)
    }

    pub fn host_info(&self) -> Result<CertInfo> {
        cert_info(&self.cert_der)
    }

    pub fn ca_info(&self) -> Result<CertInfo> {
        cert_info(&self.ca_der)
    }

    /// Signs a joining host's request.
    pub fn issue(&self, csr_pem: &str, name: &str, addresses: &[IpAddr]) -> Result<String> {
        sign_host(&self.ca_pem, &self.ca_key_pem()?, csr_pem, name, addresses)
    }

    /// A new key and certificate for this host, signed by the CA key held here.
    pub fn renew(&self, name: &str, addresses: &[IpAddr]) -> Result<()> {
        let (key, csr) = new_request(name)?;
        let cert = self.issue(&csr, name, addresses)?;
        write_pair(&self.dir, &cert, &key)
    }

    /// Takes a certificate signed elsewhere (by the CA holder) for the key `key_pem`.
    pub fn install_host(&self, cert_pem: &str, key_pem: &str) -> Result<()> {
        check_pair(cert_pem, key_pem)?;
        write_pair(&self.dir, cert_pem, key_pem)
    }

    /// The revocation list in force here, if any.
    pub fn crl(&self) -> Option<crate::Crl> {
        self.revoked.current()
    }

    /// Whether the certificate with `serial` is revoked here.
    pub fn is_revoked(&self, serial: &str) -> bool {
        self.revoked.contains(serial)
    }

    /// `crl.pem` when this host has one (etcd's `--client-crl-file`).
    pub fn crl_path(&self) -> Option<PathBuf> {
        let p = self.dir.join(CRL_FILE);
        p.exists().then_some(p)
    }

    /// Signs revocation list `number` naming `serials` (this host must hold the CA key).
    pub fn sign_crl(
        &self,
        number: u64,
        serials: &std::collections::BTreeSet<String>,
    ) -> Result<String> {
        crate::sign_crl(&self.ca_pem, &self.ca_key_pem()?, number, serials)
    }

    /// Reads the revocation list `pem` and checks that this cluster's CA signed it.
    pub fn check_crl(&self, pem: &str) -> Result<crate::Crl> {
        crate::read_crl(&self.ca_der, pem)
    }

    /// Takes the revocation list `pem` when the CA signed it and it is newer than the
    /// one in force (`Ok(false)`: it is the same one). An older number is refused:
    /// a list once in force is never rolled back.
    pub fn install_crl(&self, pem: &str) -> Result<bool> {
        let crl = crate::read_crl(&self.ca_der, pem)?;
        if let Some(cur) = self.revoked.current() {
            if crl.number == cur.number && crl.serials == cur.serials {
                return Ok(false);
            }
            if crl.number <= cur.number {
                return Err(PkiError::Bad {
                    what: "The certificate revocation list".into(),
                    reason: format!(
                        "number {} is not newer than the one in force ({})",
                        crl.number, cur.number
                    ),
                });
            }
        }
        write(&self.dir, CRL_FILE, pem, 0o644)?;
        self.revoked.set(Some(crl));
        Ok(true)
    }

    fn roots(&self) -> Arc<rustls::RootCertStore> {
        let mut r = rustls::RootCertStore::empty();
        r.add(self.ca_der.clone()).expect("the CA parsed before");
        Arc::new(r)
    }

    /// The chain this host presents: its certificate, then the CA (so a joining host
    /// can compare the CA with the fingerprint it was given).
    fn chain(&self) -> Vec<CertificateDer<'static>> {
        vec![self.cert_der.clone(), self.ca_der.clone()]
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).expect("the key parsed before")
    }

    /// The API's TLS settings with an admin's own certificate (`--tls-cert/--tls-key`):
    /// a client that asks for another name than this host's (SNI: a browser at the
    /// site's DNS name) gets the admin's certificate; the other hosts of the cluster
    /// (which connect to the address and ask for no name) and clients naming this
    /// host get the host certificate of the cluster CA. Client certificates as in
    /// [`HostPki::server_config`] (optional).
    pub fn server_config_with(&self, admin: &AdminCert) -> Arc<rustls::ServerConfig> {
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            self.roots(),
            crate::provider(),
        )
        .allow_unauthenticated()
        .build()
        .expect("the CA is a valid root");
        let verifier = crate::verify::RevokingClientVerifier::new(verifier, self.revoked.clone());
        let own =
            rustls::sign::CertifiedKey::from_der(self.chain(), self.key(), &crate::provider())
                .expect("the host key matches its certificate");
        let mut c = rustls::ServerConfig::builder_with_provider(crate::provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the defaults")
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(PickCert {
                name: self.name.clone(),
                own: Arc::new(own),
                admin: admin.0.clone(),
            }));
        c.alpn_protocols = vec![];
        no_resumption(&mut c);
        Arc::new(c)
    }

    /// TLS server settings. `require_client`: every client must show a certificate of
    /// the cluster (host-to-host only links); otherwise one is optional (the API: a
    /// peer shows one, a browser or CLI a token or ticket instead).
    pub fn server_config(&self, require_client: bool) -> Arc<rustls::ServerConfig> {
        let b = rustls::server::WebPkiClientVerifier::builder_with_provider(
            self.roots(),
            crate::provider(),
        );
        let verifier = if require_client {
            b.build()
        } else {
            b.allow_unauthenticated().build()
        }
        .expect("the CA is a valid root");
        let verifier = crate::verify::RevokingClientVerifier::new(verifier, self.revoked.clone());
        let mut c = rustls::ServerConfig::builder_with_provider(crate::provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the defaults")
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain(), self.key())
            .expect("the host key matches its certificate");
        c.alpn_protocols = vec![];
        no_resumption(&mut c);
        Arc::new(c)
    }

    /// TLS client settings: this host's certificate as the client's, the server checked
    /// against the cluster CA and, with [`Expect::Host`], its name.
    pub fn client_config(&self, expect: Expect) -> rustls::ClientConfig {
        let verifier = MemberVerifier::new(self.roots(), expect).refusing(self.revoked.clone());
        rustls::ClientConfig::builder_with_provider(crate::provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the defaults")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(self.chain(), self.key())
            .expect("the host key matches its certificate")
    }
}

/// Every connection is a full handshake: a resumed session would skip the check of
/// the client's certificate against the revocation list in force now.
fn no_resumption(c: &mut rustls::ServerConfig) {
    c.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    c.send_tls13_tickets = 0;
}

/// TLS client settings for someone without a host certificate (the CLI elsewhere): the
/// server checked against the CA in `ca_pem`.
pub fn ca_client_config(ca_pem: &str, expect: Expect) -> Result<rustls::ClientConfig> {
    let mut r = rustls::RootCertStore::empty();
    let mut n = 0;
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let c = c.map_err(|e| PkiError::Bad {
            what: "Read the CA file".into(),
            reason: e.to_string(),
        })?;
        r.add(c).map_err(|e| PkiError::Bad {
            what: "Read the CA file".into(),
            reason: e.to_string(),
        })?;
        n += 1;
    }
    if n == 0 {
        return Err(PkiError::Bad {
            what: "Read the CA file".into(),
            reason: "no certificate in it".into(),
        });
    }
    let verifier = MemberVerifier::new(Arc::new(r), expect);
    Ok(
        rustls::ClientConfig::builder_with_provider(crate::provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the defaults")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth(),
    )
}

/// An admin's own certificate and key for the API (PEM files, e.g. from the site's CA
/// or ACME), checked to belong together when loaded.
#[derive(Clone)]
pub struct AdminCert(Arc<rustls::sign::CertifiedKey>);

impl std::fmt::Debug for AdminCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminCert(..)")
    }
}

impl AdminCert {
    pub fn load(cert: &Path, key: &Path) -> Result<AdminCert> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|source| PkiError::Io {
                what: "Read",
                path: p.display().to_string(),
                source,
            })
        };
        let bad = |what: &str, reason: String| PkiError::Bad {
            what: what.into(),
            reason,
        };
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&read(cert)?)
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| bad("--tls-cert", e.to_string()))?;
        if chain.is_empty() {
            return Err(bad("--tls-cert", "no certificate in the file".into()));
        }
        let key = PrivateKeyDer::from_pem_slice(&read(key)?)
            .map_err(|e| bad("--tls-key", e.to_string()))?;
        let ck = rustls::sign::CertifiedKey::from_der(chain, key, &crate::provider())
            .map_err(|e| bad("--tls-cert/--tls-key", e.to_string()))?;
        Ok(AdminCert(Arc::new(ck)))
    }
}

/// The admin's certificate for clients that ask for another name than this host's
/// (a browser at the site's DNS name); the host certificate for the rest: clients that
/// name this host, or that ask for no name (the other hosts, which connect to its
/// address, and a host joining).
#[derive(Debug)]
struct PickCert {
    name: String,
    own: Arc<rustls::sign::CertifiedKey>,
    admin: Arc<rustls::sign::CertifiedKey>,
}

impl rustls::server::ResolvesServerCert for PickCert {
    fn resolve(
        &self,
        hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        match hello.server_name() {
            Some(n) if !n.eq_ignore_ascii_case(&self.name) => Some(self.admin.clone()),
            _ => Some(self.own.clone()),
        }
    }
}
