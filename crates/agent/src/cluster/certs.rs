//! `ferry cluster certs status|renew`: the cluster CA and this host's certificate.

use crate::error::{AgentError, Result};
use crate::Agent;
use ferry_store::StoreJson;
use ferry_types::{CertDetails, CertSignRequest, CertSigned, CertStatus};

/// Warn this many days before the host certificate ends.
const RENEW_WITHIN_DAYS: i64 = 30;

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

impl Agent {
    /// The CA and host certificate as on disk now.
    pub fn cert_status(&self) -> Result<CertStatus> {
        let pki = ferry_pki::HostPki::load(&self.inner.cfg.pki.dir)?;
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
        Ok(CertStatus {
            ca: details(pki.ca_info()?),
            host: details(host),
            host_days_left: left,
            ca_key_here: pki.has_ca_key(),
            warnings,
        })
    }

    /// A new key and certificate for this host (same names): signed here when this
    /// host holds the CA key, else by the member that does (over mutual TLS, which
    /// tells it who asks). The member record then names the new serial, so the old
    /// certificate is refused from then on. The caller restarts the daemon; etcd reads
    /// the files at each handshake.
    pub async fn renew_certs(&self) -> Result<CertStatus> {
        let pki = ferry_pki::HostPki::load(&self.inner.cfg.pki.dir)?;
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
                let peer = super::Peer::new(h, std::time::Duration::from_secs(10), &pki)?;
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
                return Err(last
                    .unwrap_or_else(|| AgentError::Conflict("No member holds the CA key".into())));
            };
            pki.install_host(&cert, &key)?;
        }
        self.inner.events.emit(
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
        let pki = ferry_pki::HostPki::load(&self.inner.cfg.pki.dir)?;
        if !pki.has_ca_key() {
            return Err(AgentError::Conflict(format!(
                "{} holds no CA key",
                self.host_name()
            )));
        }
        let key = format!("{}{host}", super::membership::MEMBERS);
        let Some((rec, _)) = link.root.get_json::<ferry_types::ClusterHost>(&key).await? else {
            return Err(AgentError::NotFound(format!("Member {host}")));
        };
        let ip: std::net::IpAddr = rec.address.parse().map_err(|_| {
            AgentError::Conflict(format!(
                "{host}'s recorded address {} is no IP",
                rec.address
            ))
        })?;
        let cert = pki.issue(csr, host, &[ip])?;
        if let Some(serial) = super::membership::cert_serial(&cert) {
            self.record_cert_serial(host, &serial).await?;
        }
        Ok(CertSigned { cert })
    }

    /// Writes `serial` into host `host`'s member record (in a cluster).
    pub(crate) async fn record_cert_serial(&self, host: &str, serial: &str) -> Result<()> {
        let Some(link) = &self.inner.cluster else {
            return Ok(());
        };
        let key = format!("{}{host}", super::membership::MEMBERS);
        if let Some((mut h, _)) = link.root.get_json::<ferry_types::ClusterHost>(&key).await? {
            if h.cert_serial.as_deref() != Some(serial) {
                h.cert_serial = Some(serial.to_string());
                link.root.put_json(&key, &h).await?;
            }
        }
        Ok(())
    }

    /// At start in a cluster: the own member record names this host's certificate
    /// (it may have been made again for a changed address).
    pub async fn publish_own_cert(&self) -> Result<()> {
        let serial = self.inner.cfg.pki.host_info()?.serial;
        self.record_cert_serial(self.host_name(), &serial).await?;
        // And the CA of its migration identity (what other hosts' QEMUs trust for a
        // migration stream with this one).
        let Some(link) = &self.inner.cluster else {
            return Ok(());
        };
        let ca = self.inner.cfg.pki.migration()?.ca_pem;
        let key = format!("{}{}", super::membership::MEMBERS, self.host_name());
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
