//! QEMU's own TLS on the live-migration stream and the NBD disk mirror, with the hosts'
//! certificates: the destination's QEMU lets in only the source host's certificate
//! (`authz-list` on its subject), the source's QEMU checks that the destination's
//! certificate names the host it migrates to (`tls-hostname`). Neither trusts an
//! address.

use crate::error::{AgentError, Result};
use crate::Agent;
use ferry_qmp::Qmp;
use serde_json::json;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

/// The destination's credentials object (server end, client certificate required).
pub(crate) const SERVER_CREDS: &str = "ferry-tls-server";
/// The source's credentials object (client end).
pub(crate) const CLIENT_CREDS: &str = "ferry-tls-client";
/// Who may connect to the destination.
pub(crate) const AUTHZ: &str = "ferry-tls-authz";

/// The subject of host `host`'s certificate as GnuTLS prints it (RFC 4514), in either
/// order of its two parts.
fn subjects(host: &str) -> [String; 2] {
    [format!("CN={host},O=ferry"), format!("O=ferry,CN={host}")]
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
    let _ = qmp
        .execute("object-del", Some(json!({"id": obj["id"]})))
        .await;
    qmp.execute("object-add", Some(obj)).await?;
    Ok(())
}

/// Takes the migration's TLS settings back and deletes the credentials objects, so the
/// host's key (which they hold in memory) stays in QEMU no longer than a migration.
pub(crate) async fn drop_creds(qmp: &Qmp) {
    let _ = qmp
        .execute(
            "migrate-set-parameters",
            Some(json!({"tls-creds": "", "tls-authz": "", "tls-hostname": ""})),
        )
        .await;
    for id in [SERVER_CREDS, CLIENT_CREDS, AUTHZ] {
        let _ = qmp.execute("object-del", Some(json!({ "id": id }))).await;
    }
}

impl Agent {
    /// The files QEMU's `tls-creds-x509` reads (the names it expects), from the host's
    /// certificate files, for VM `vm`'s QEMU.
    async fn qemu_tls_files(&self, vm: &str) -> Result<TlsFiles> {
        let id = self.record(vm).await?.0.id;
        let who = self.qemu_identity(id)?;
        let dir = self
            .inner
            .cfg
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
        let pki = ferry_pki::HostPki::load(&self.inner.cfg.pki.dir)?;
        for (file, data) in [
            ("ca-cert.pem", pki.ca_pem()),
            ("server-cert.pem", pki.cert_pem()),
            ("server-key.pem", pki.key_pem()),
            ("client-cert.pem", pki.cert_pem()),
            ("client-key.pem", pki.key_pem()),
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
        let files = self.qemu_tls_files(vm).await?;
        object_add(
            qmp,
            json!({"qom-type": "tls-creds-x509", "id": SERVER_CREDS,
                   "dir": files.0, "endpoint": "server", "verify-peer": true}),
        )
        .await?;
        drop(files);
        let rules: Vec<_> = subjects(source)
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
    pub(crate) async fn qemu_tls_client(&self, vm: &str, qmp: &Qmp) -> Result<()> {
        let files = self.qemu_tls_files(vm).await?;
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
        let s = super::subjects("h1");
        assert!(s
            .iter()
            .all(|x| x.contains("CN=h1,") || x.ends_with("CN=h1")));
        assert!(!s.iter().any(|x| x.contains("h12")));
    }
}
