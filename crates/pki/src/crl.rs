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

/// Whether `s` is a serial exactly as [`crate::CertInfo::serial`] writes a positive
/// DER integer: lowercase hex bytes separated by `:`, 1 to 20 of them, no sign bit,
/// no superfluous leading zero byte. Only such a serial reads back the same from a
/// signed list (anything else would make a list that never matches its records).
pub fn canonical_serial(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    let well_formed = !parts.is_empty()
        && parts.len() <= 20
        && parts.iter().all(|p| {
            p.len() == 2
                && p.bytes()
                    .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
        });
    if !well_formed {
        return false;
    }
    let byte = |i: usize| u8::from_str_radix(parts[i], 16).unwrap_or(0xff);
    let first = byte(0);
    first < 0x80 && (parts.len() == 1 || first != 0 || byte(1) >= 0x80)
}

/// A canonical serial ([`canonical_serial`]) to bytes.
fn serial_bytes(s: &str) -> Result<Vec<u8>> {
    let bad = || {
        PkiError::Bad {
        what: format!("Serial {s:?}"),
        reason: "expected a certificate serial as ferry writes it (lowercase hex bytes separated by ':', at most 20, positive, minimal)".into(),
    }
    };
    if !canonical_serial(s) {
        return Err(bad());
    }
    s.split(':')
        .map(|b| u8::from_str_radix(b, 16).map_err(|_| bad()))
        .collect()
}

/// What the CA holder's next list holds and its number, when one is due: every
/// serial of the list in force here (`local`) and of the one in the store
/// (`stored`, already checked), plus the revoked `records` that are canonical and not
/// the current certificate of a member (`in_use`: a record naming one is refused, so
/// no member can revoke another's live certificate). Numbered above both lists: a
/// store rolled back or emptied never makes the holder sign a lower number, and no
/// serial once listed is ever dropped.
pub fn next_crl(
    local: Option<&Crl>,
    stored: Option<&Crl>,
    records: &BTreeSet<String>,
    in_use: &BTreeSet<String>,
) -> Option<(u64, BTreeSet<String>)> {
    let mut base: BTreeSet<String> = BTreeSet::new();
    for c in [local, stored].into_iter().flatten() {
        base.extend(c.serials.iter().cloned());
    }
    let number = local
        .map_or(0, |c| c.number)
        .max(stored.map_or(0, |c| c.number));
    let want: BTreeSet<String> = records
        .iter()
        .filter(|s| canonical_serial(s) && !in_use.contains(*s))
        .cloned()
        .collect();
    let all: BTreeSet<String> = base.union(&want).cloned().collect();
    let stored_current = stored.is_some_and(|s| s.number == number && s.serials == all);
    if stored_current {
        return None;
    }
    Some((number + 1, all))
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn crl(number: u64, serials: &[&str]) -> Crl {
        Crl {
            number,
            serials: serials.iter().map(|s| s.to_string()).collect(),
            pem: String::new(),
        }
    }

    #[test]
    fn only_canonical_serials_are_taken() {
        for ok in ["01", "7f", "0a:1b", "00:80", "12:34:56"] {
            assert!(canonical_serial(ok), "{ok}");
        }
        for bad in [
            "",
            "0A",
            "+a",
            "1",
            "00:01",
            "80",
            "ff:00",
            "0a:",
            ":0a",
            "0g",
            &"11:".repeat(20),
        ] {
            assert!(!canonical_serial(bad), "{bad}");
        }
    }

    proptest! {
        /// The next list keeps every serial of both lists, numbers above both, never
        /// takes a live member's serial it did not list before, and is not due when
        /// the store already holds exactly it.
        #[test]
        fn the_next_list_only_grows_and_numbers_up(
            local in proptest::option::of((0u64..10, proptest::collection::btree_set(0u8..8, 0..4))),
            stored in proptest::option::of((0u64..10, proptest::collection::btree_set(0u8..8, 0..4))),
            records in proptest::collection::btree_set(0u8..8, 0..5),
            in_use in proptest::collection::btree_set(0u8..8, 0..3),
        ) {
            let s = |b: u8| format!("{:02x}", b + 1);
            let mk = |c: &Option<(u64, std::collections::BTreeSet<u8>)>| c.as_ref().map(|(n, set)| Crl {
                number: *n,
                serials: set.iter().map(|b| s(*b)).collect(),
                pem: String::new(),
            });
            let (local, stored) = (mk(&local), mk(&stored));
            let records: BTreeSet<String> = records.iter().map(|b| s(*b)).collect();
            let in_use: BTreeSet<String> = in_use.iter().map(|b| s(*b)).collect();
            match next_crl(local.as_ref(), stored.as_ref(), &records, &in_use) {
                Some((n, all)) => {
                    for c in [&local, &stored].into_iter().flatten() {
                        prop_assert!(n > c.number);
                        prop_assert!(c.serials.is_subset(&all));
                    }
                    for x in &all {
                        let listed = [&local, &stored].into_iter().flatten().any(|c| c.serials.contains(x));
                        prop_assert!(listed || (records.contains(x) && !in_use.contains(x)));
                    }
                    for r in records.difference(&in_use) {
                        prop_assert!(all.contains(r));
                    }
                }
                None => {
                    let st = stored.as_ref().expect("due without a stored list");
                    prop_assert!(local.as_ref().is_none_or(|l| l.number <= st.number && l.serials.is_subset(&st.serials)));
                    for r in records.difference(&in_use) {
                        prop_assert!(st.serials.contains(r));
                    }
                }
            }
        }
    }

    #[test]
    fn a_rolled_back_store_is_numbered_over() {
        let local = crl(7, &["01", "02"]);
        let stored = crl(3, &["01"]);
        let (n, all) = next_crl(
            Some(&local),
            Some(&stored),
            &BTreeSet::new(),
            &BTreeSet::new(),
        )
        .expect("due");
        assert_eq!(n, 8);
        assert!(
            all.contains("02"),
            "a serial dropped by the rollback came back"
        );
        // A record naming a live member's certificate is refused.
        let live: BTreeSet<String> = ["03".to_string()].into();
        let (_, all) = next_crl(Some(&local), None, &live, &live).expect("due");
        assert!(!all.contains("03"));
    }
}
