//! The cluster's certificates and the TLS every link speaks.
//!
//! Every host keeps `{state_dir}/pki/` (0700): `ca.crt` and `ca.key` (the cluster CA;
//! a host alone has its own, a joining host receives the cluster's), `host.crt` and
//! `host.key` (this host's certificate: subject CN = the host name, SANs = its name
//! and cluster addresses; usable as TLS server and client). Keys are 0600.
//!
//! `crl.pem`: the revocation list the CA holder signed last ([`Crl`]): certificates
//! of renewed hosts and of hosts that left, refused by etcd and by every ferry link.
//!
//! `migration-ca.crt`, `migration.crt`, `migration.key`: the host's identity for QEMU's
//! TLS on migration streams only ([`MigrationIdentity`], a CA of its own that nothing
//! else trusts).
//!
//! Peers are identified by the host name in their certificate, verified against the
//! cluster CA — never by their address ([`Expect::Host`]). A CLI that only needs "a
//! member of my cluster" uses [`Expect::AnyMember`]; a host joining a cluster for the
//! first time checks the CA against a fingerprint the admin copied ([`pinned_client`]),
//! like an SSH host key.

mod crl;
mod files;
mod verify;

pub use crl::{canonical_serial, next_crl, read_crl, sign_crl, Crl, Revoked};
pub use files::{
    ca_client_config, cert_info, fingerprint_pem, serial_pem, AdminCert, CertInfo, HostPki, PKI_DIR,
};
pub use verify::{leaf_pin, peer_name, pinned_client, Expect};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use sha2::{Digest, Sha256};
use std::net::IpAddr;
use std::sync::Arc;
use time::{Duration, OffsetDateTime};

/// How long the cluster CA is valid.
pub const CA_DAYS: i64 = 3650;
/// How long a host certificate is valid (`ferry cluster certs renew` makes a new one).
pub const HOST_DAYS: i64 = 730;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{what}: {path}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {reason}")]
    Bad { what: String, reason: String },
    #[error("This host holds no cluster CA key, so it cannot sign certificates")]
    NoCaKey,
}

pub type Result<T> = std::result::Result<T, PkiError>;

fn bad(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> PkiError {
    let what = what.into();
    move |e| PkiError::Bad {
        what,
        reason: e.to_string(),
    }
}

/// The crypto provider every config uses (ring).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    // ring: aws-lc-rs (rustls' post-quantum default) takes too long to build on small
    // hosts; ring's X25519/P-256 key exchange is what the peers (etcd, QEMU) offer too.
    #[allow(deprecated)]
    Arc::new(rustls::crypto::ring::default_provider())
}

fn serial() -> SerialNumber {
    let mut b: [u8; 16] = rand::random();
    b[0] &= 0x7f; // positive
    b[0] |= 0x01; // and no leading zero byte
    SerialNumber::from_slice(&b)
}

/// A new cluster CA: (certificate PEM, key PEM).
pub fn new_ca(cluster: &str) -> Result<(String, String)> {
    let key = KeyPair::generate().map_err(bad("Make the CA key"))?;
    let mut p = CertificateParams::default();
    p.distinguished_name
        .push(DnType::CommonName, format!("ferry cluster CA ({cluster})"));
    p.distinguished_name
        .push(DnType::OrganizationName, "ferry".to_string());
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    p.not_before = now - Duration::hours(1);
    p.not_after = now + Duration::days(CA_DAYS);
    p.serial_number = Some(serial());
    let cert = p.self_signed(&key).map_err(bad("Sign the CA"))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A new key and a certificate request for host `name`: (key PEM, CSR PEM). The key
/// never leaves the host; the signer decides the names (see [`sign_host`]).
pub fn new_request(name: &str) -> Result<(String, String)> {
    let key = KeyPair::generate().map_err(bad("Make the host key"))?;
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, name);
    let csr = p
        .serialize_request(&key)
        .map_err(bad("Make the certificate request"))?;
    let pem = csr.pem().map_err(bad("Encode the certificate request"))?;
    Ok((key.serialize_pem(), pem))
}

fn host_params(name: &str, addresses: &[IpAddr]) -> Result<CertificateParams> {
    check_host_name(name)?;
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, name);
    p.distinguished_name
        .push(DnType::OrganizationName, "ferry".to_string());
    // A DNS SAN only for a name DNS allows (the CN always holds the host name).
    if name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    {
        let dns =
            rcgen::string::Ia5String::try_from(name).map_err(bad(format!("Host name {name}")))?;
        p.subject_alt_names.push(SanType::DnsName(dns));
    }
    for a in addresses {
        p.subject_alt_names.push(SanType::IpAddress(*a));
    }
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let now = OffsetDateTime::now_utc();
    p.not_before = now - Duration::hours(1);
    p.not_after = now + Duration::days(HOST_DAYS);
    p.serial_number = Some(serial());
    Ok(p)
}

/// A host's identity for QEMU's TLS on migration streams: a CA of its own (made for
/// this only; its key is thrown away once it signed) and a certificate it signed (CN =
/// the host name, O = `ferry-migration`). No API, etcd or replication link trusts this
/// CA, so the key QEMU must hold while it migrates opens nothing else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationIdentity {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// The organisation in migration certificates (QEMU's `authz-list` matches it).
pub const MIGRATION_ORG: &str = "ferry-migration";

/// A new [`MigrationIdentity`] for host `name`.
pub fn new_migration_identity(name: &str) -> Result<MigrationIdentity> {
    let ca_key = KeyPair::generate().map_err(bad("Make the migration CA key"))?;
    let mut p = CertificateParams::default();
    p.distinguished_name
        .push(DnType::CommonName, format!("ferry migration CA ({name})"));
    p.distinguished_name
        .push(DnType::OrganizationName, MIGRATION_ORG.to_string());
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    p.not_before = now - Duration::hours(1);
    p.not_after = now + Duration::days(HOST_DAYS + 1);
    p.serial_number = Some(serial());
    let ca = p
        .self_signed(&ca_key)
        .map_err(bad("Sign the migration CA"))?;
    let issuer =
        Issuer::from_ca_cert_pem(&ca.pem(), ca_key).map_err(bad("Read the migration CA"))?;
    let key = KeyPair::generate().map_err(bad("Make the migration key"))?;
    let mut leaf = host_params(name, &[])?;
    leaf.distinguished_name = rcgen::DistinguishedName::new();
    leaf.distinguished_name.push(DnType::CommonName, name);
    leaf.distinguished_name
        .push(DnType::OrganizationName, MIGRATION_ORG.to_string());
    let cert = leaf
        .signed_by(&key, &issuer)
        .map_err(bad("Sign the migration certificate"))?;
    Ok(MigrationIdentity {
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Host names in certificates: what ferry accepts as a host name (letters, digits,
/// `-`, `_`, `.`; 1–63 characters, starting with a letter or digit).
pub fn check_host_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(PkiError::Bad {
            what: format!("Host name {name:?}"),
            reason: "not a host name (letters, digits, -, _, .)".into(),
        })
    }
}

/// Signs the request `csr_pem` for host `name` at `addresses` with the CA. Only the
/// request's public key is used: the names come from the signer, never the request.
pub fn sign_host(
    ca_pem: &str,
    ca_key_pem: &str,
    csr_pem: &str,
    name: &str,
    addresses: &[IpAddr],
) -> Result<String> {
    if csr_pem.len() > 16 * 1024 {
        return Err(PkiError::Bad {
            what: "The certificate request".into(),
            reason: "larger than 16 KiB".into(),
        });
    }
    let csr = CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(bad("Read the certificate request"))?;
    let key = KeyPair::from_pem(ca_key_pem).map_err(bad("Read the CA key"))?;
    let issuer = Issuer::from_ca_cert_pem(ca_pem, key).map_err(bad("Read the CA"))?;
    let cert = host_params(name, addresses)?
        .signed_by(&csr.public_key, &issuer)
        .map_err(bad("Sign the host certificate"))?;
    Ok(cert.pem())
}

/// `SHA256:` and the hex of the DER's digest, bytes separated by `:` (what `openssl
/// x509 -fingerprint -sha256` prints).
pub fn fingerprint(der: &[u8]) -> String {
    let d = Sha256::digest(der);
    let hex: Vec<String> = d.iter().map(|b| format!("{b:02X}")).collect();
    format!("SHA256:{}", hex.join(":"))
}

/// Parses a fingerprint as the admin typed it (with or without `SHA256:`, colons,
/// either case) into the canonical form [`fingerprint`] prints.
pub fn parse_fingerprint(s: &str) -> Result<String> {
    let t = s.trim();
    let t = t
        .strip_prefix("SHA256:")
        .or_else(|| t.strip_prefix("sha256:"))
        .unwrap_or(t);
    let hex: String = t.chars().filter(|c| *c != ':').collect();
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(PkiError::Bad {
            what: format!("Fingerprint {s:?}"),
            reason: "expected SHA256: and 32 hex bytes (ferry cluster certs status shows it)"
                .into(),
        });
    }
    let up = hex.to_ascii_uppercase();
    let pairs: Vec<&str> = (0..32).map(|i| &up[2 * i..2 * i + 2]).collect();
    Ok(format!("SHA256:{}", pairs.join(":")))
}

#[cfg(test)]
mod tests;
