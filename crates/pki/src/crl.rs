//! Revocation: the CA holder signs a list of the host certificates that no longer
//! count (renewed, or of a host that left); every host keeps it as `crl.pem`, where
//! etcd reads it at each handshake (`--client-crl-file`/`--peer-crl-file`) and ferry's
//! own TLS checks consult it ([`Revoked`]).

use crate::{bad, PkiError, Result};
use rcgen::{
    CertificateRevocationListParams, Issuer, KeyIdMethod, KeyPair, RevocationReason,
    RevokedCertParams, SerialNumber,
};
use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};
use time::{Duration, OffsetDateTime};

/// A CRL as read and checked: its number, the serials it names (as
/// [`crate::CertInfo::serial`] writes them) and its PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crl {
    pub number: u64,
    pub serials: BTreeSet<String>,
    pub pem: String,
}

/// The serials this host refuses, shared by every TLS setting made from one
/// [`crate::HostPki`]: a newly installed list counts at the next handshake.
#[derive(Debug, Clone, Default)]
pub struct Revoked(Arc<RwLock<Option<Crl>>>);

impl Revoked {
    pub fn contains(&self, serial: &str) -> bool {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|c| c.serials.contains(serial))
    }

    pub fn current(&self) -> Option<Crl> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn set(&self, crl: Option<Crl>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = crl;
    }
}

/// `0a:1b:...` (x509-parser's form) to bytes.
fn serial_bytes(s: &str) -> Result<Vec<u8>> {
    let bytes: std::result::Result<Vec<u8>, _> =
        s.split(':').map(|b| u8::from_str_radix(b, 16)).collect();
    match bytes {
        Ok(b) if !b.is_empty() && b.len() <= 20 && s.split(':').all(|p| p.len() == 2) => Ok(b),
        _ => Err(PkiError::Bad {
            what: format!("Serial {s:?}"),
            reason: "expected hex bytes separated by ':' (at most 20)".into(),
        }),
    }
}

/// Signs CRL number `number` naming `serials`, with the CA's key. Valid until the
/// CA itself ends: a new list replaces it whenever the set changes.
pub fn sign_crl(
    ca_pem: &str,
    ca_key_pem: &str,
    number: u64,
    serials: &BTreeSet<String>,
) -> Result<String> {
    let key = KeyPair::from_pem(ca_key_pem).map_err(bad("Read the CA key"))?;
    let issuer = Issuer::from_ca_cert_pem(ca_pem, key).map_err(bad("Read the CA"))?;
    let now = OffsetDateTime::now_utc();
    let mut revoked = vec![];
    for s in serials {
        revoked.push(RevokedCertParams {
            serial_number: SerialNumber::from_slice(&serial_bytes(s)?),
            revocation_time: now,
            reason_code: Some(RevocationReason::Superseded),
            invalidity_date: None,
        });
    }
    let p = CertificateRevocationListParams {
        this_update: now - Duration::minutes(5),
        next_update: now + Duration::days(crate::CA_DAYS),
        crl_number: SerialNumber::from_slice(&number.to_be_bytes()),
        issuing_distribution_point: None,
        revoked_certs: revoked,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let crl = p
        .signed_by(&issuer)
        .map_err(bad("Sign the revocation list"))?;
    crl.pem().map_err(bad("Encode the revocation list"))
}

/// Reads `pem` and checks that the CA `ca_der` signed it.
pub fn read_crl(ca_der: &[u8], pem: &str) -> Result<Crl> {
    let what = || "The certificate revocation list".to_string();
    if pem.len() > 4 << 20 {
        return Err(PkiError::Bad {
            what: what(),
            reason: "larger than 4 MiB".into(),
        });
    }
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| PkiError::Bad {
        what: what(),
        reason: e.to_string(),
    })?;
    if p.label != "X509 CRL" {
        return Err(PkiError::Bad {
            what: what(),
            reason: format!("a PEM block of {:?}, not X509 CRL", p.label),
        });
    }
    let (_, crl) = x509_parser::parse_x509_crl(&p.contents).map_err(|e| PkiError::Bad {
        what: what(),
        reason: e.to_string(),
    })?;
    let (_, ca) = x509_parser::parse_x509_certificate(ca_der).map_err(|e| PkiError::Bad {
        what: "The cluster CA".into(),
        reason: e.to_string(),
    })?;
    if crl.issuer() != ca.subject() {
        return Err(PkiError::Bad {
            what: what(),
            reason: format!("issued by {}, not by this cluster's CA", crl.issuer()),
        });
    }
    crl.verify_signature(ca.public_key())
        .map_err(|e| PkiError::Bad {
            what: what(),
            reason: format!("not signed by this cluster's CA ({e})"),
        })?;
    let number = crl
        .crl_number()
        .and_then(|n| u64::try_from(n).ok())
        .ok_or_else(|| PkiError::Bad {
            what: what(),
            reason: "no CRL number".into(),
        })?;
    let serials = crl
        .iter_revoked_certificates()
        .map(|r| r.raw_serial_as_string())
        .collect();
    Ok(Crl {
        number,
        serials,
        pem: pem.to_string(),
    })
}
