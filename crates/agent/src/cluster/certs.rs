//! `ferry cluster certs status|renew`: the cluster CA and this host's certificate.

use crate::error::{AgentError, Result};
use crate::Agent;
use ferry_store::StoreJson;
use ferry_types::{CertDetails, CertStatus};

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

    /// A new key and certificate for this host (same names), signed by the CA held
    /// here; in a cluster the member record names the new serial (the old certificate
    /// is refused from then on). The caller restarts the daemon; etcd reads the files
    /// at each handshake.
    pub async fn renew_certs(&self) -> Result<CertStatus> {
        let pki = ferry_pki::HostPki::load(&self.inner.cfg.pki.dir)?;
        if !pki.has_ca_key() {
            return Err(AgentError::Conflict(
                "This host holds no CA key; renew on a member that does".into(),
            ));
        }
        let addresses: Vec<std::net::IpAddr> = pki
            .host_info()?
            .names
            .iter()
            .filter_map(|n| n.parse().ok())
            .collect();
        pki.renew(self.host_name(), &addresses)?;
        if let Some(link) = &self.inner.cluster {
            let serial = ferry_pki::HostPki::load(&pki.dir)?.host_info()?.serial;
            let key = format!("{}{}", super::membership::MEMBERS, self.host_name());
            if let Some((mut h, _)) = link.root.get_json::<ferry_types::ClusterHost>(&key).await? {
                h.cert_serial = Some(serial);
                link.root.put_json(&key, &h).await?;
            }
        }
        self.inner.events.emit(
            None,
            "cluster",
            format!("host certificate of {} renewed", self.host_name()),
        );
        self.cert_status()
    }
}
