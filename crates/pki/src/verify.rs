//! Checking the other end of a TLS connection: a member of the cluster (its chain ends
//! at the cluster CA) and, where it matters, which one (the CN names the host).

use crate::{fingerprint, Revoked};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};
use std::sync::Arc;

/// Who the server must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// The host of this name (host-to-host links).
    Host(String),
    /// Any member of the cluster (a CLI talking to whichever host it was pointed at).
    AnyMember,
}

/// The CN of a certificate (DER): for ferry's host certificates, the host name.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, c) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = c.subject().iter_common_name().next()?.as_str().ok()?;
    Some(cn.to_string())
}

/// The host a verified peer certificate names (its CN), if it is a host name.
pub fn peer_name(der: &[u8]) -> Option<String> {
    common_name(der).filter(|n| crate::check_host_name(n).is_ok())
}

fn name_mismatch(e: &Error) -> bool {
    matches!(
        e,
        Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }
        )
    )
}

/// Verifies the chain against `roots`, then the identity by [`Expect`] — the name in
/// the certificate, never the address the connection went to.
#[derive(Debug)]
pub(crate) struct MemberVerifier {
    inner: Arc<WebPkiServerVerifier>,
    expect: Expect,
    revoked: Option<Revoked>,
}

impl MemberVerifier {
    pub(crate) fn new(roots: Arc<rustls::RootCertStore>, expect: Expect) -> MemberVerifier {
        let inner = WebPkiServerVerifier::builder_with_provider(roots, crate::provider())
            .build()
            .expect("the CA is a valid root");
        MemberVerifier {
            inner,
            expect,
            revoked: None,
        }
    }

    /// Also refuses certificates the revocation list names.
    pub(crate) fn refusing(mut self, revoked: Revoked) -> MemberVerifier {
        self.revoked = Some(revoked);
        self
    }
}

/// Refuses a certificate whose serial `revoked` names.
fn check_revoked(revoked: &Revoked, end_entity: &CertificateDer<'_>) -> Result<(), Error> {
    let serial = x509_parser::parse_x509_certificate(end_entity)
        .map(|(_, c)| c.raw_serial_as_string())
        .map_err(|_| Error::InvalidCertificate(CertificateError::BadEncoding))?;
    if revoked.contains(&serial) {
        return Err(Error::InvalidCertificate(CertificateError::Revoked));
    }
    Ok(())
}

/// A client-certificate verifier that also refuses revoked certificates (the list
/// can change while the server runs).
#[derive(Debug)]
pub(crate) struct RevokingClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    revoked: Revoked,
}

impl RevokingClientVerifier {
    pub(crate) fn new(inner: Arc<dyn ClientCertVerifier>, revoked: Revoked) -> Arc<Self> {
        Arc::new(RevokingClientVerifier { inner, revoked })
    }
}

impl ClientCertVerifier for RevokingClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let ok = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        check_revoked(&self.revoked, end_entity)?;
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

impl ServerCertVerifier for MemberVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Ok(_) => {}
            // The chain is good; the name is checked below.
            Err(e) if name_mismatch(&e) => {}
            Err(e) => return Err(e),
        }
        if let Some(r) = &self.revoked {
            check_revoked(r, end_entity)?;
        }
        if let Expect::Host(want) = &self.expect {
            let got = common_name(end_entity);
            if got.as_deref() != Some(want.as_str()) {
                return Err(Error::General(format!(
                    "the server's certificate names host {}, expected {want}",
                    got.as_deref().unwrap_or("(none)")
                )));
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A host joining: the server's chain must end at a CA whose fingerprint the admin
/// gave (it is sent along with the host certificate).
#[derive(Debug)]
struct PinnedVerifier {
    fingerprint: String,
    /// The start of the hex SHA-256 of the member's own certificate (from the join
    /// token): only that certificate, not any other of the CA (one revoked, of a host
    /// that left), may take the token.
    leaf: Option<String>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

/// The pin of a certificate in a join token: the first 16 bytes of its SHA-256, hex.
pub fn leaf_pin(der: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(der)[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let Some(ca) = intermediates
            .iter()
            .find(|c| fingerprint(c) == self.fingerprint)
        else {
            return Err(Error::General(format!(
                "the server's CA is not the one with fingerprint {} (wrong cluster, or someone in between)",
                self.fingerprint
            )));
        };
        if let Some(pin) = &self.leaf {
            if leaf_pin(end_entity) != *pin {
                return Err(Error::General(
                    "the member's certificate is not the one the join token names (renewed since, or someone in between): make a new join token".into(),
                ));
            }
        }
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let v = MemberVerifier::new(Arc::new(roots), Expect::AnyMember);
        v.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// TLS client settings for joining: no client certificate yet, the server's CA pinned
/// by its fingerprint (see [`crate::parse_fingerprint`]) and, with `leaf`, the
/// member's own certificate by its pin ([`leaf_pin`]).
pub fn pinned_client(fingerprint: &str, leaf: Option<&str>) -> crate::Result<rustls::ClientConfig> {
    let fingerprint = crate::parse_fingerprint(fingerprint)?;
    let leaf = match leaf {
        Some(l) if l.len() == 32 && l.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Some(l.to_ascii_lowercase())
        }
        Some(l) => {
            return Err(crate::PkiError::Bad {
                what: format!("The certificate pin {l:?} of the join token"),
                reason: "expected 32 hex digits".into(),
            })
        }
        None => None,
    };
    let provider = crate::provider();
    Ok(
        rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("ring supports the defaults")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedVerifier {
                fingerprint,
                leaf,
                provider,
            }))
            .with_no_client_auth(),
    )
}
