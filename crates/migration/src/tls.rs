//! QEMU's own TLS on the live-migration stream and the NBD disk mirror, with the hosts'
//! certificates: the destination's QEMU lets in only the source host's certificate
//! (`authz-list` on its subject), the source's QEMU checks that the destination's
//! certificate names the host it migrates to (`tls-hostname`). Neither trusts an
//! address.

use crate::error::{AgentError, Result};
use crate::Migrations;
use ferry_qmp::commands as qc;
use ferry_qmp::Qmp;
use serde_json::json;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

/// The destination's credentials object (server end, client certificate required).
/// The certificates are the hosts' migration identities (`ferry_pki::MigrationIdentity`):
/// the key QEMU holds while it migrates is trusted by nothing but another QEMU.
pub(crate) const SERVER_CREDS: &str = "ferry-tls-server";
/// The source's credentials object (client end).
pub(crate) const CLIENT_CREDS: &str = "ferry-tls-client";
/// Who may connect to the destination.
pub(crate) const AUTHZ: &str = "ferry-tls-authz";

/// The subject of host `host`'s certificate (of organisation `org`) as GnuTLS prints
/// it (RFC 4514), in either order of its two parts.
fn subjects(host: &str, org: &str) -> [String; 2] {
    [format!("CN={host},O={org}"), format!("O={org},CN={host}")]
}

/// What QEMU gets for a migration with host `peer`: the CAs it trusts, this host's
/// certificate and key, and the organisation the peer's certificate names.
struct Creds {
    ca: String,
    cert: String,
    key: String,
    org: &'static str,
}

/// A folder of QEMU's TLS files for one VM's QEMU, removed when dropped: QEMU reads
/// them when the credentials object is made, so the host key lies on disk, readable by
/// that VM's QEMU user only, for the moment it takes.
struct TlsFiles(PathBuf);

impl Drop for TlsFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Adds a QOM object, replacing one of the same id from an earlier migration (which
/// may hold an old certificate or admit another source host).
async fn object_add(qmp: &Qmp, obj: serde_json::Value) -> Result<()> {
    if let Some(id) = obj["id"].as_str() {
        let _ = qmp.run(&qc::ObjectDel { id: id.to_string() }).await;
    }
    qmp.run(&qc::ObjectAdd(obj)).await?;
    Ok(())
}

/// Takes the migration's TLS settings back and deletes the credentials objects, so the
/// host's key (which they hold in memory) stays in QEMU no longer than a migration.
pub(crate) async fn drop_creds(qmp: &Qmp) {
    let _ = qmp
        .run(&qc::MigrateSetParameters {
            tls_creds: Some(String::new()),
            tls_authz: Some(String::new()),
            tls_hostname: Some(String::new()),
            ..Default::default()
        })
        .await;
    for id in [SERVER_CREDS, CLIENT_CREDS, AUTHZ] {
        let _ = qmp.run(&qc::ObjectDel { id: id.to_string() }).await;
    }
}

impl Migrations {
    /// The files QEMU's `tls-creds-x509` reads (the names it expects), from the host's
    /// certificate files, for VM `vm`'s QEMU.
    /// The credentials for a migration with host `peer`: both hosts' migration
    /// identities when the peer published its own (its member record), else — a static
    /// cluster, a member from before — the cluster's CA and the host certificates.
    async fn migration_creds(&self, peer: &str) -> Result<Creds> {
        let peer_ca = match &self.cluster() {
            Some(_) => self.cluster_host(peer).await?.migration_ca,
            None => None,
        };
        if let Some(peer_ca) = peer_ca {
            let own = self.cfg().pki.migration()?;
            return Ok(Creds {
                ca: format!("{}\n{peer_ca}", own.ca_pem.trim_end()),
                cert: own.cert_pem,
                key: own.key_pem,
                org: ferry_pki::MIGRATION_ORG,
            });
        }
        let pki = ferry_pki::HostPki::load(&self.cfg().pki.dir)?;
        Ok(Creds {
            ca: pki.ca_pem().to_string(),
            cert: pki.cert_pem().to_string(),
            key: pki.key_pem().to_string(),
            org: "ferry",
        })
    }

    async fn qemu_tls_files(&self, vm: &str, creds: &Creds) -> Result<TlsFiles> {
        let id = self.record(vm).await?.0.id;
        let who = self.qemu_identity(id)?;
        let dir = self
            .cfg()
            .run_dir
            .join("qemu-tls")
            .join(format!("{id}-{:08x}", rand::random::<u32>()));
        let io = |source| AgentError::Io {
            what: format!("Write QEMU's TLS files in {}", dir.display()),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(io)?;
        let files = TlsFiles(dir.clone());
        if let Some(w) = &who {
            crate::confine::reachable(&dir.join("x"), w, &self.managed_dirs().await)?;
            crate::confine::own(&dir, 0, w.gid, 0o710)?;
        }
        for (file, data) in [
            ("ca-cert.pem", creds.ca.as_str()),
            ("server-cert.pem", creds.cert.as_str()),
            ("server-key.pem", creds.key.as_str()),
            ("client-cert.pem", creds.cert.as_str()),
            ("client-key.pem", creds.key.as_str()),
        ] {
            let path = dir.join(file);
            std::fs::OpenOptions::new()
                .create_new(true)
                .write(true)
                .mode(0o400)
                .open(&path)
                .and_then(|mut f| f.write_all(data.as_bytes()))
                .map_err(io)?;
            if let Some(w) = &who {
                crate::confine::own(&path, w.uid, w.gid, 0o400)?;
            }
        }
        Ok(files)
    }

    /// On the destination's QEMU: server credentials that require a client certificate
    /// of the cluster, and an authorisation that admits host `source` only.
    pub(crate) async fn qemu_tls_server(&self, vm: &str, qmp: &Qmp, source: &str) -> Result<()> {
        let creds = self.migration_creds(source).await?;
        let files = self.qemu_tls_files(vm, &creds).await?;
        object_add(
            qmp,
            json!({"qom-type": "tls-creds-x509", "id": SERVER_CREDS,
                   "dir": files.0, "endpoint": "server", "verify-peer": true}),
        )
        .await?;
        drop(files);
        let rules: Vec<_> = subjects(source, creds.org)
            .into_iter()
            .map(|s| json!({"match": s, "policy": "allow", "format": "exact"}))
            .collect();
        object_add(
            qmp,
            json!({"qom-type": "authz-list", "id": AUTHZ, "policy": "deny", "rules": rules}),
        )
        .await
    }

    /// On the source's QEMU: client credentials (this host's certificate shown, the
    /// server's checked against the cluster CA).
    pub(crate) async fn qemu_tls_client(&self, vm: &str, qmp: &Qmp, to: &str) -> Result<()> {
        let creds = self.migration_creds(to).await?;
        let files = self.qemu_tls_files(vm, &creds).await?;
        object_add(
            qmp,
            json!({"qom-type": "tls-creds-x509", "id": CLIENT_CREDS,
                   "dir": files.0, "endpoint": "client", "verify-peer": true}),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_the_named_host_is_admitted() {
        let s = super::subjects("h1", ferry_pki::MIGRATION_ORG);
        assert!(s
            .iter()
            .all(|x| x.contains("CN=h1,") || x.ends_with("CN=h1")));
        assert!(!s.iter().any(|x| x.contains("h12")));
    }
}
