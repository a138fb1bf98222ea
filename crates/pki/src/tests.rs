//! Real TLS handshakes (tokio-rustls over loopback TCP) between certificates made here.

use super::*;
use rustls::pki_types::ServerName;
use std::net::Ipv4Addr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn host(dir: &std::path::Path, ca: &HostPki, name: &str, ip: [u8; 4]) -> HostPki {
    let d = dir.join(name);
    let (key, csr) = new_request(name).unwrap();
    let cert = ca
        .issue(&csr, name, &[IpAddr::V4(Ipv4Addr::from(ip))])
        .unwrap();
    HostPki::install(&d, ca.ca_pem(), None, &cert, &key).unwrap();
    HostPki::load(&d).unwrap()
}

/// One handshake: the server's view of the client's name (or the error of either side).
async fn handshake(
    server: Arc<rustls::ServerConfig>,
    client: rustls::ClientConfig,
) -> std::result::Result<Option<String>, String> {
    handshake_as(server, client, None).await
}

/// The same, the client naming the server `sni` (else its IP address).
async fn handshake_as(
    server: Arc<rustls::ServerConfig>,
    client: rustls::ClientConfig,
    sni: Option<&str>,
) -> std::result::Result<Option<String>, String> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let srv = tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        let mut t = tokio_rustls::TlsAcceptor::from(server)
            .accept(s)
            .await
            .map_err(|e| e.to_string())?;
        let name = t
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| peer_name(c));
        let mut b = [0u8; 4];
        t.read_exact(&mut b).await.map_err(|e| e.to_string())?;
        t.write_all(b"pong").await.map_err(|e| e.to_string())?;
        t.shutdown().await.ok();
        Ok::<_, String>(name)
    });
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let c = tokio_rustls::TlsConnector::from(Arc::new(client));
    let r = async {
        let name = match sni {
            Some(n) => ServerName::try_from(n.to_string()).unwrap(),
            None => ServerName::IpAddress(addr.ip().into()),
        };
        let mut t = c.connect(name, s).await.map_err(|e| e.to_string())?;
        t.write_all(b"ping").await.map_err(|e| e.to_string())?;
        let mut b = [0u8; 4];
        t.read_exact(&mut b).await.map_err(|e| e.to_string())?;
        assert_eq!(&b, b"pong");
        Ok::<_, String>(())
    }
    .await;
    let s = srv.await.unwrap();
    r?;
    s
}

#[tokio::test]
async fn hosts_know_each_other_by_name_not_address() {
    let d = tempfile::tempdir().unwrap();
    let h1 = HostPki::ensure(&d.path().join("h1"), "h1", &[[10, 0, 0, 1].into()]).unwrap();
    let h2 = host(d.path(), &h1, "h2", [10, 0, 0, 2]);
    // h2 calls h1 (reached at 127.0.0.1, which neither certificate names).
    let got = handshake(
        h1.server_config(true),
        h2.client_config(Expect::Host("h1".into())),
    )
    .await
    .unwrap();
    assert_eq!(got.as_deref(), Some("h2"));
    // The same connection expecting another host is refused by the client.
    let e = handshake(
        h1.server_config(true),
        h2.client_config(Expect::Host("h3".into())),
    )
    .await
    .unwrap_err();
    assert!(e.contains("names host h1, expected h3"), "{e}");
}

#[tokio::test]
async fn another_cluster_is_refused_both_ways() {
    let d = tempfile::tempdir().unwrap();
    let a = HostPki::ensure(&d.path().join("a"), "h1", &[]).unwrap();
    let b = HostPki::ensure(&d.path().join("b"), "h1", &[]).unwrap();
    assert_ne!(a.ca_fingerprint(), b.ca_fingerprint());
    // b as client of a: a refuses b's certificate (and b a's).
    assert!(
        handshake(a.server_config(true), b.client_config(Expect::AnyMember))
            .await
            .is_err()
    );
    // A client without any certificate: refused where one is required...
    let anon = ca_client_config(a.ca_pem(), Expect::AnyMember).unwrap();
    assert!(handshake(a.server_config(true), anon.clone())
        .await
        .is_err());
    // ...let in (without a name) where it is optional, like the API.
    assert_eq!(handshake(a.server_config(false), anon).await.unwrap(), None);
    // A CLI trusting b's CA refuses a.
    let wrong = ca_client_config(b.ca_pem(), Expect::AnyMember).unwrap();
    assert!(handshake(a.server_config(false), wrong).await.is_err());
}

#[tokio::test]
async fn joining_pins_the_ca_by_fingerprint() {
    let d = tempfile::tempdir().unwrap();
    let a = HostPki::ensure(&d.path().join("a"), "h1", &[]).unwrap();
    let b = HostPki::ensure(&d.path().join("b"), "h1", &[]).unwrap();
    let good = pinned_client(&a.ca_fingerprint().to_lowercase(), None).unwrap();
    assert_eq!(handshake(a.server_config(false), good).await.unwrap(), None);
    let bad = pinned_client(&b.ca_fingerprint(), None).unwrap();
    let e = handshake(a.server_config(false), bad).await.unwrap_err();
    assert!(e.contains("not the one with fingerprint"), "{e}");
    assert!(pinned_client("SHA256:00", None).is_err());
    // With the join token's pin of the member's own certificate: that one only. Another
    // certificate of the same CA (a host that left, say, whose key someone kept) is
    // refused though the CA matches.
    let h2 = host(d.path(), &a, "h2", [10, 0, 0, 2]);
    let pinned = pinned_client(&a.ca_fingerprint(), Some(&a.leaf_pin())).unwrap();
    assert_eq!(
        handshake(a.server_config(false), pinned.clone())
            .await
            .unwrap(),
        None
    );
    let e = handshake(h2.server_config(false), pinned)
        .await
        .unwrap_err();
    assert!(e.contains("not the one the join token names"), "{e}");
    assert!(pinned_client(&a.ca_fingerprint(), Some("xyz")).is_err());
}

#[test]
fn the_signer_names_the_host_not_the_request() {
    let d = tempfile::tempdir().unwrap();
    let ca = HostPki::ensure(&d.path().join("a"), "h1", &[]).unwrap();
    let (_, csr) = new_request("h1").unwrap(); // asks to be h1
    let cert = ca
        .issue(&csr, "h2", &["10.0.0.2".parse().unwrap()])
        .unwrap();
    let info = cert_info(
        &rustls::pki_types::pem::PemObject::from_pem_slice(cert.as_bytes())
            .map(|c: rustls::pki_types::CertificateDer| c.to_vec())
            .unwrap(),
    )
    .unwrap();
    assert!(info.subject.contains("CN=h2"), "{}", info.subject);
    assert_eq!(info.names, vec!["h2".to_string(), "10.0.0.2".into()]);
    assert!(ca.issue("garbage", "h2", &[]).is_err());
    assert!(ca.issue(&csr, "../h2", &[]).is_err());
}

#[test]
fn files_are_private_and_names_follow_the_host() {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("pki");
    let a = HostPki::ensure(&dir, "h1", &["10.0.0.1".parse().unwrap()]).unwrap();
    let mode = |f: &str| std::fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(""), 0o700);
    assert_eq!(mode("ca.key"), 0o600);
    assert_eq!(mode("host.key"), 0o600);
    // Loading again changes nothing.
    let b = HostPki::ensure(&dir, "h1", &["10.0.0.1".parse().unwrap()]).unwrap();
    assert_eq!(a.host_info().unwrap().serial, b.host_info().unwrap().serial);
    // A new address: a new certificate from the same CA.
    let c = HostPki::ensure(&dir, "h1", &["10.0.0.9".parse().unwrap()]).unwrap();
    assert_ne!(a.host_info().unwrap().serial, c.host_info().unwrap().serial);
    assert_eq!(a.ca_fingerprint(), c.ca_fingerprint());
    assert!(c
        .host_info()
        .unwrap()
        .names
        .contains(&"10.0.0.9".to_string()));
}

#[test]
fn fingerprints_parse_in_any_spelling() {
    let f = "SHA256:".to_string() + &["AB"; 32].join(":");
    assert_eq!(parse_fingerprint(&f).unwrap(), f);
    assert_eq!(parse_fingerprint(&"ab".repeat(32)).unwrap(), f);
    assert!(parse_fingerprint("SHA256:zz").is_err());
}

#[test]
fn a_certificate_for_another_key_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let ca = HostPki::ensure(&d.path().join("a"), "h1", &[]).unwrap();
    let (_, csr) = new_request("h2").unwrap();
    let (other_key, _) = new_request("h2").unwrap();
    let cert = ca.issue(&csr, "h2", &[]).unwrap();
    let e =
        HostPki::install(&d.path().join("b"), ca.ca_pem(), None, &cert, &other_key).unwrap_err();
    assert!(e.to_string().contains("host certificate"), "{e}");
    assert!(!d.path().join("b/host.crt").exists());
}

/// With an admin's own certificate the API shows it to browsers and CLIs, and the
/// host certificate to whoever names the host (the other hosts do): both verify.
#[tokio::test]
async fn an_admin_certificate_for_people_the_host_certificate_for_hosts() {
    let d = tempfile::tempdir().unwrap();
    let h1 = HostPki::ensure(&d.path().join("h1"), "h1", &[]).unwrap();
    let h2 = host(d.path(), &h1, "h2", [10, 0, 0, 2]);
    // The "site's" certificate: another CA's, for www.example.
    let site = HostPki::ensure(&d.path().join("site"), "www.example", &[]).unwrap();
    let admin = AdminCert::load(&site.cert_path(), &site.key_path()).unwrap();
    let srv = h1.server_config_with(&admin);
    // A host connects to h1's address (no name asked) and checks it by the cluster CA
    // and its name; naming h1 works the same.
    for sni in [None, Some("h1")] {
        let got = handshake_as(
            srv.clone(),
            h2.client_config(Expect::Host("h1".into())),
            sni,
        )
        .await
        .unwrap();
        assert_eq!(got.as_deref(), Some("h2"));
    }
    // A browser names the site and trusts the site's CA.
    let browser = ca_client_config(site.ca_pem(), Expect::AnyMember).unwrap();
    assert_eq!(
        handshake_as(srv.clone(), browser, Some("www.example"))
            .await
            .unwrap(),
        None
    );
    // The site's certificate is not the cluster's.
    let cluster_only = ca_client_config(h1.ca_pem(), Expect::AnyMember).unwrap();
    assert!(handshake_as(srv, cluster_only, Some("www.example"))
        .await
        .is_err());
    // A key that is not the certificate's is refused at load.
    assert!(AdminCert::load(&site.cert_path(), &h1.key_path()).is_err());
}

/// A host's migration identity names the host, is kept, and opens no link that the
/// cluster CA guards (QEMU holds its key while it migrates).
#[tokio::test]
async fn the_migration_identity_is_trusted_by_nothing_else() {
    let d = tempfile::tempdir().unwrap();
    let h1 = HostPki::ensure(&d.path().join("h1"), "h1", &[]).unwrap();
    let h2 = host(d.path(), &h1, "h2", [10, 0, 0, 2]);
    let m = h2.migration().unwrap();
    assert_eq!(h2.migration().unwrap(), m, "made again although current");
    let der = files_cert_der(&m.cert_pem);
    assert_eq!(crate::verify::common_name(&der).as_deref(), Some("h2"));
    assert!(cert_info(&der).unwrap().subject.contains(MIGRATION_ORG));
    // Shown to h1 as if it were h2's host certificate: refused.
    let fake = d.path().join("fake");
    HostPki::install(&fake, h1.ca_pem(), None, &m.cert_pem, &m.key_pem).unwrap();
    let fake = HostPki::load(&fake).unwrap();
    assert!(handshake(
        h1.server_config(true),
        fake.client_config(Expect::Host("h1".into()))
    )
    .await
    .is_err());
    // h2's real certificate still works.
    assert!(handshake(
        h1.server_config(true),
        h2.client_config(Expect::Host("h1".into()))
    )
    .await
    .is_ok());
}

fn files_cert_der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

#[tokio::test]
async fn a_revoked_certificate_is_refused_both_ways_from_the_next_handshake() {
    let d = tempfile::tempdir().unwrap();
    let h1 = HostPki::ensure(&d.path().join("h1"), "h1", &[[10, 0, 0, 1].into()]).unwrap();
    let h2 = host(d.path(), &h1, "h2", [10, 0, 0, 2]);
    // Settings made before the list arrives (a daemon's, at its start).
    let server1 = h1.server_config(true);
    let api1 = h1.server_config(false);
    let client1 = h1.client_config(Expect::Host("h2".into()));
    let server2 = h2.server_config(true);
    let client2 = h2.client_config(Expect::Host("h1".into()));
    assert_eq!(
        handshake(server1.clone(), client2.clone()).await.unwrap(),
        Some("h2".into())
    );
    let h2_serial = h2.host_info().unwrap().serial;
    let crl = h1.sign_crl(1, &[h2_serial.clone()].into()).unwrap();
    assert!(h1.install_crl(&crl).unwrap());
    assert!(
        !h1.install_crl(&crl).unwrap(),
        "the same list again is no change"
    );
    assert!(h1.is_revoked(&h2_serial));
    // h1 refuses h2 as a client (required or optional) and as a server.
    let e = handshake(server1.clone(), client2.clone())
        .await
        .unwrap_err();
    assert!(e.to_lowercase().contains("revoked"), "{e}");
    assert!(handshake(api1, client2.clone()).await.is_err());
    let e = handshake(server2, client1).await.unwrap_err();
    assert!(e.to_lowercase().contains("revoked"), "{e}");
    // The list lasts across a restart (read from crl.pem) and nobody else is hit.
    let again = HostPki::load(&h1.dir).unwrap();
    assert!(again.is_revoked(&h2_serial));
    assert_eq!(again.crl().unwrap().number, 1);
    let h3 = host(d.path(), &h1, "h3", [10, 0, 0, 3]);
    assert_eq!(
        handshake(
            again.server_config(true),
            h3.client_config(Expect::AnyMember)
        )
        .await
        .unwrap(),
        Some("h3".into())
    );
}

#[test]
fn only_a_newer_list_signed_by_the_cluster_ca_is_taken() {
    let d = tempfile::tempdir().unwrap();
    let a = HostPki::ensure(&d.path().join("a"), "h1", &[]).unwrap();
    let other = HostPki::ensure(&d.path().join("b"), "h1", &[]).unwrap();
    let h2 = host(d.path(), &a, "h2", [10, 0, 0, 2]);
    let s: std::collections::BTreeSet<String> = [a.host_info().unwrap().serial].into();
    // Signed by another cluster's CA (same CN even): refused, nothing written.
    let foreign = other.sign_crl(5, &s).unwrap();
    let e = h2.install_crl(&foreign).unwrap_err().to_string();
    assert!(e.contains("signed by this cluster's CA"), "{e}");
    assert!(h2.crl().is_none() && h2.crl_path().is_none());
    // Garbage and a certificate in place of a list: refused with the reason.
    assert!(h2.install_crl("not pem").is_err());
    let e = h2.install_crl(a.ca_pem()).unwrap_err().to_string();
    assert!(e.contains("not X509 CRL"), "{e}");
    // A tampered list (one byte of the body changed): the signature fails.
    let good = a.sign_crl(2, &s).unwrap();
    let der = pem::parse(good.as_bytes()).unwrap().into_contents();
    let mut bad = der.clone();
    let at = bad.len() / 3;
    bad[at] ^= 0x01;
    let b64 = |b: &[u8]| pem::encode(&pem::Pem::new("X509 CRL", b.to_vec()));
    assert_eq!(read_crl(&a_ca_der(&a), &b64(&der)).unwrap().number, 2);
    assert!(h2.install_crl(&b64(&bad)).is_err());
    // The good one is taken; an older number afterwards is refused (no rollback).
    assert!(h2.install_crl(&good).unwrap());
    let older = a.sign_crl(1, &Default::default()).unwrap();
    let e = h2.install_crl(&older).unwrap_err().to_string();
    assert!(e.contains("not newer"), "{e}");
    assert!(h2.is_revoked(&a.host_info().unwrap().serial));
    // Joining another CA drops the list of the old one.
    let (key, csr) = new_request("h2").unwrap();
    let cert = other.issue(&csr, "h2", &[]).unwrap();
    HostPki::install(&h2.dir, other.ca_pem(), None, &cert, &key).unwrap();
    assert!(HostPki::load(&h2.dir).unwrap().crl().is_none());
}

fn a_ca_der(p: &HostPki) -> Vec<u8> {
    pem::parse(p.ca_pem().as_bytes()).unwrap().into_contents()
}
