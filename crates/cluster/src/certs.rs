//! `ferry cluster certs status|renew`: the cluster CA and this host's certificate.

use crate::error::{AgentError, Failure, Refusal, Result};
use crate::Cluster;
use ferry_store::StoreJson;
use ferry_types::{CertDetails, CertSignRequest, CertSigned, CertStatus};

/// Warn this many days before the host certificate ends.
const RENEW_WITHIN_DAYS: i64 = 30;
use ferry_store::keys::cluster::{CRL, REVOKED};
/// How often a host looks for a newer revocation list (and the CA holder for
/// revocations to sign).
const CRL_TICK: std::time::Duration = std::time::Duration::from_secs(2);

/// The store operation that marks certificate `serial` of `host` revoked.
pub(crate) fn revoke_op(serial: &str, host: &str, reason: &str) -> ferry_store::Op {
    let rec = ferry_types::RevokedCert {
        serial: serial.to_string(),
        host: host.to_string(),
        reason: reason.to_string(),
        at_ms: crate::events::now_ms(),
    };
    ferry_store::Op::Put {
        key: ferry_store::keys::cluster::revoked(serial),
        value: serde_json::to_vec(&rec).expect("a revocation serialises"),
        lease: None,
    }
}

fn rfc3339(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| t.to_string())
}

fn details(i: ferry_pki::CertInfo) -> CertDetails {
    CertDetails {
        subject: i.subject,
        names: i.names,
        not_before: rfc3339(i.not_before),
        not_after: rfc3339(i.not_after),
        fingerprint: i.fingerprint,
        serial: i.serial,
    }
}

impl Cluster {
    /// The CA and host certificate as on disk now.
    pub fn cert_status(&self) -> Result<CertStatus> {
        let pki = ferry_pki::HostPki::load(&self.cfg().pki.dir)?;
        let host = pki.host_info()?;
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let left = (host.not_after - now) / 86400;
        let mut warnings = vec![];
        if left < RENEW_WITHIN_DAYS {
            warnings.push(format!(
                "The host certificate ends in {left} days: ferry cluster certs renew"
            ));
        }
        if !pki.has_ca_key() {
            warnings.push("This host holds no CA key: it cannot renew or admit hosts".into());
        }
        let crl = self.cfg().pki.crl();
        if self.cluster().is_some() && crl.is_none() {
            warnings.push(
                "No certificate revocation list yet: etcd does not check for revoked certificates until the daemon restarts with one"
                    .into(),
            );
        }
        Ok(CertStatus {
            ca: details(pki.ca_info()?),
            host: details(host),
            host_days_left: left,
            ca_key_here: pki.has_ca_key(),
            crl_number: crl.as_ref().map(|c| c.number),
            revoked: crl
                .map(|c| c.serials.into_iter().collect())
                .unwrap_or_default(),
            warnings,
        })
    }

    /// A new key and certificate for this host (same names): signed here when this
    /// host holds the CA key, else by the member that does (over mutual TLS, which
    /// tells it who asks). The caller restarts the daemon; etcd reads the files at each
    /// handshake. At its start the daemon records the new serial in its member record,
    /// which revokes the old certificate.
    pub async fn renew_certs(&self) -> Result<CertStatus> {
        let pki = ferry_pki::HostPki::load(&self.cfg().pki.dir)?;
        if pki.has_ca_key() {
            let addresses: Vec<std::net::IpAddr> = pki
                .host_info()?
                .names
                .iter()
                .filter_map(|n| n.parse().ok())
                .collect();
            pki.renew(self.host_name(), &addresses)?;
            let serial = ferry_pki::HostPki::load(&pki.dir)?.host_info()?.serial;
            self.record_cert_serial(self.host_name(), &serial).await?;
        } else {
            let (key, csr) = ferry_pki::new_request(self.host_name())?;
            let mut last = None;
            let mut signed = None;
            for h in self.cluster_hosts().await? {
                if h.name == self.host_name() {
                    continue;
                }
                let peer = ferry_host::Peer::new(h, std::time::Duration::from_secs(10), &pki)?;
                match peer
                    .post::<CertSigned>(
                        "/api/v1/cluster/certs/sign",
                        &CertSignRequest { csr: csr.clone() },
                    )
                    .await
                {
                    Ok(c) => {
                        signed = Some(c.cert);
                        break;
                    }
                    Err(e) => last = Some(e),
                }
            }
            let Some(cert) = signed else {
                return Err(last.unwrap_or_else(|| {
                    AgentError::refused(Refusal::Membership, "No member holds the CA key")
                }));
            };
            pki.install_host(&cert, &key)?;
        }
        self.events().emit(
            None,
            "cluster",
            format!("host certificate of {} renewed", self.host_name()),
        );
        self.cert_status()
    }

    /// On the CA holder: signs a new certificate for host `host` (the caller, known by
    /// its current certificate) at its recorded address, and records its serial.
    pub async fn sign_member_cert(&self, host: &str, csr: &str) -> Result<CertSigned> {
        let link = self.cluster_link()?;
        let pki = ferry_pki::HostPki::load(&self.cfg().pki.dir)?;
        if !pki.has_ca_key() {
            return Err(AgentError::refused(
                Refusal::Membership,
                format!("{} holds no CA key", self.host_name()),
            ));
        }
        let key = ferry_store::keys::cluster::member(host);
        let Some((rec, _)) = link.root.get_json::<ferry_types::ClusterHost>(&key).await? else {
            return Err(AgentError::NotFound(format!("Member {host}")));
        };
        let ip: std::net::IpAddr = rec.address.parse().map_err(|_| {
            AgentError::failed(
                Failure::Corrupt,
                format!("{host}'s recorded address {} is no IP", rec.address),
            )
        })?;
        let cert = pki.issue(csr, host, &[ip])?;
        // Not recorded here: should the answer not reach the host, its current
        // certificate must stay good. The host records (and so revokes its old one)
        // when it restarts with the new one (publish_own_cert).
        Ok(CertSigned { cert })
    }

    /// Writes `serial` into host `host`'s member record (in a cluster); the
    /// certificate it named before is revoked in the same step.
    pub(crate) async fn record_cert_serial(&self, host: &str, serial: &str) -> Result<()> {
        let Some(link) = &self.cluster() else {
            return Ok(());
        };
        let key = ferry_store::keys::cluster::member(host);
        loop {
            let Some((mut h, kv)) = link.root.get_json::<ferry_types::ClusterHost>(&key).await?
            else {
                return Ok(());
            };
            if h.cert_serial.as_deref() == Some(serial) {
                return Ok(());
            }
            let old = h.cert_serial.replace(serial.to_string());
            let mut success = vec![ferry_store::Op::Put {
                key: key.clone(),
                value: serde_json::to_vec(&h).expect("a host record serialises"),
                lease: None,
            }];
            if let Some(old) = old {
                success.push(revoke_op(&old, host, "renewed"));
            }
            let r = link
                .root
                .txn(ferry_store::Txn {
                    compare: vec![ferry_store::Compare::ModRev(
                        key.clone(),
                        ferry_store::Cmp::Equal,
                        kv.mod_rev,
                    )],
                    success,
                    failure: vec![],
                })
                .await?;
            if r.succeeded {
                return Ok(());
            }
        }
    }

    /// Keeps the revocation list current, for the daemon's life (in a cluster).
    #[tracing::instrument(skip_all)]
    pub(crate) async fn crl_loop(self) {
        loop {
            let r = self
                .sync_crl()
                .await
                .map_err(|e| crate::error_chain(&e).join(": "));
            if let Err(e) = &r {
                tracing::debug!(error = %e, "revocation list not synced");
            }
            self.loops().report("revocation-list", CRL_TICK, r);
            tokio::time::sleep(CRL_TICK).await;
        }
    }

    /// On the CA holder: signs a new revocation list when the store names a revoked
    /// certificate the current one lacks. On every host: installs the newest list
    /// (etcd reads it at its next handshake, ferry's TLS at its next one).
    pub(crate) async fn sync_crl(&self) -> Result<()> {
        let link = self.cluster_link()?;
        let pki = &self.cfg().pki;
        let mut current = link.root.get_json::<ferry_types::CrlRecord>(CRL).await?;
        if pki.has_ca_key() {
            let mut records = std::collections::BTreeSet::new();
            for kv in link.root.list(REVOKED).await? {
                match serde_json::from_slice::<ferry_types::RevokedCert>(&kv.value) {
                    Ok(r) if ferry_pki::canonical_serial(&r.serial) => {
                        records.insert(r.serial);
                    }
                    Ok(r) => {
                        tracing::warn!(serial = %r.serial, "revocation record with a malformed serial skipped")
                    }
                    Err(e) => {
                        tracing::warn!(key = %kv.key, error = %e, "unreadable revocation record skipped")
                    }
                }
            }
            // Serials the member records name are live certificates: a record that
            // revokes one is not signed (a member cannot cut another off).
            let in_use: std::collections::BTreeSet<String> = link
                .members()
                .await?
                .into_iter()
                .filter_map(|m| m.cert_serial)
                .collect();
            let (stored, rev) = match &current {
                Some((c, kv)) => match pki.check_crl(&c.pem) {
                    Ok(crl) => (Some(crl), kv.mod_rev),
                    Err(e) => {
                        tracing::warn!(error = %e, "the stored revocation list does not check out; signing over it");
                        (None, kv.mod_rev)
                    }
                },
                None => (None, 0),
            };
            if let Some((number, all)) =
                ferry_pki::next_crl(pki.crl().as_ref(), stored.as_ref(), &records, &in_use)
            {
                let rec = ferry_types::CrlRecord {
                    number,
                    pem: pki.sign_crl(number, &all)?,
                };
                let cmp = if rev == 0 {
                    ferry_store::Compare::Version(CRL.into(), ferry_store::Cmp::Equal, 0)
                } else {
                    ferry_store::Compare::ModRev(CRL.into(), ferry_store::Cmp::Equal, rev)
                };
                let r = link
                    .root
                    .txn(ferry_store::Txn {
                        compare: vec![cmp],
                        success: vec![ferry_store::Op::Put {
                            key: CRL.into(),
                            value: serde_json::to_vec(&rec).expect("a CRL record serialises"),
                            lease: None,
                        }],
                        failure: vec![],
                    })
                    .await?;
                if r.succeeded {
                    tracing::info!(
                        number = rec.number,
                        revoked = all.len(),
                        "signed a new certificate revocation list"
                    );
                }
                current = link.root.get_json::<ferry_types::CrlRecord>(CRL).await?;
            }
        }
        if let Some((c, _)) = current {
            if pki.crl().is_none_or(|mine| mine.number < c.number) && pki.install_crl(&c.pem)? {
                let n = pki.crl().map_or(0, |c| c.serials.len());
                self.events().emit(
                    None,
                    "cluster",
                    format!(
                        "certificate revocation list {} in force ({n} revoked)",
                        c.number
                    ),
                );
            }
        }
        Ok(())
    }

    /// At start in a cluster: the own member record names this host's certificate
    /// (it may have been made again for a changed address).
    pub async fn publish_own_cert(&self) -> Result<()> {
        let serial = self.cfg().pki.host_info()?.serial;
        self.record_cert_serial(self.host_name(), &serial).await?;
        // And the CA of its migration identity (what other hosts' QEMUs trust for a
        // migration stream with this one).
        let Some(link) = &self.cluster() else {
            return Ok(());
        };
        let ca = self.cfg().pki.migration()?.ca_pem;
        let key = ferry_store::keys::cluster::member(self.host_name());
        loop {
            let Some((mut h, kv)) = link.root.get_json::<ferry_types::ClusterHost>(&key).await?
            else {
                return Ok(());
            };
            if h.migration_ca.as_deref() == Some(ca.as_str()) {
                return Ok(());
            }
            h.migration_ca = Some(ca.clone());
            if link.root.cas_json(&key, kv.mod_rev, &h).await? {
                return Ok(());
            }
        }
    }
}
