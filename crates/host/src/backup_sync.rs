//! Remote sync of backups (`ferry backup sync`): this host pulls the backups of a store
//! of another ferry (a second site's cluster, or another store of this one) into a
//! local store over the source's API — its list, each backup's index
//! (`GET /api/v1/backups/{id}/index`) and the chunk files this store lacks
//! (`GET /api/v1/backup-stores/{store}/chunks/{name}`), [`IN_FLIGHT`] at a time. The
//! copy itself (checks, pins, listing only when complete) is
//! `ferry_backup::store::copy`. The source's answers are bounded in size and checked
//! like anything a peer sends.

use crate::backup::blocking;
use crate::error::{AgentError, Failure, Result};
use crate::tasks::TaskCtx;
use crate::Host;
use ferry_backup::store::chunk::{Digest, MAX_FILE};
use ferry_backup::store::copy::{ChunkSource, SourceDisk, SourceSnapshot};
use ferry_backup::store::writer::CopyMeta;
use ferry_backup::store::StoreError;
use ferry_types::{
    BackupIndex, BackupIndexDisk, BackupList, BackupSync, BackupSyncFailure, BackupSyncReport,
};
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;

/// Chunk requests in flight at once.
pub const IN_FLIGHT: usize = 4;
/// The largest list a source may send, and the backups in it.
const MAX_LIST: usize = 16 << 20;
const MAX_BACKUPS: usize = 10_000;
/// The largest index (64 disks of 1 TiB: 16 M chunk names).
const MAX_INDEX: usize = 1 << 30;

fn failed(what: impl std::fmt::Display) -> AgentError {
    AgentError::failed(Failure::Backup, format!("Sync: {what}"))
}

/// The source's API, as a sync uses it.
#[derive(Clone)]
struct Source {
    http: reqwest::Client,
    base: String,
    store: String,
    token: String,
}

impl Source {
    /// `path`'s answer, at most `max` bytes.
    async fn get(&self, path: &str, max: usize) -> std::result::Result<Vec<u8>, String> {
        let url = format!("{}{path}", self.base);
        let mut r = self
            .http
            .get(&url)
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        let status = r.status();
        if r.content_length().is_some_and(|n| n > max as u64) {
            return Err(format!("{url}: an answer larger than {max} bytes"));
        }
        let mut body = Vec::new();
        while let Some(c) = r.chunk().await.map_err(|e| format!("{url}: {e}"))? {
            if body.len() + c.len() > max {
                return Err(format!("{url}: an answer larger than {max} bytes"));
            }
            body.extend_from_slice(&c);
        }
        if !status.is_success() {
            let why: String = String::from_utf8_lossy(&body)
                .chars()
                .filter(|c| !c.is_control())
                .take(300)
                .collect();
            return Err(format!("{url}: {status}: {why}"));
        }
        Ok(body)
    }

    async fn json_max<T: serde::de::DeserializeOwned>(&self, path: &str, max: usize) -> Result<T> {
        let b = self.get(path, max).await.map_err(failed)?;
        serde_json::from_slice(&b).map_err(|e| failed(format!("{path}: {e}")))
    }
}

/// Chunk files from the source, fetched [`IN_FLIGHT`] at a time (for the blocking copy).
struct HttpChunks {
    src: Source,
    rt: tokio::runtime::Handle,
}

impl ChunkSource for HttpChunks {
    fn fetch(&self, digests: &[Digest]) -> Vec<std::result::Result<Vec<u8>, String>> {
        let src = self.src.clone();
        let paths: Vec<String> = digests
            .iter()
            .map(|d| format!("/api/v1/backup-stores/{}/chunks/{}", src.store, d.hex()))
            .collect();
        self.rt.block_on(async move {
            futures::stream::iter(paths)
                .map(|p| {
                    let s = src.clone();
                    async move { s.get(&p, MAX_FILE).await }
                })
                .buffered(IN_FLIGHT)
                .collect()
                .await
        })
    }
}

fn source_snapshot(idx: BackupIndex) -> std::result::Result<SourceSnapshot, String> {
    let b = idx.backup;
    let mut disks = Vec::new();
    for d in idx.disks {
        let chunks = d
            .chunks
            .iter()
            .map(|h| Digest::from_hex(h).ok_or_else(|| format!("{h:?} is not a chunk name")))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        disks.push(SourceDisk {
            name: d.name,
            size: d.size,
            mode: d.mode,
            reason: d.reason,
            chunks,
        });
    }
    Ok(SourceSnapshot {
        meta: CopyMeta {
            id: b.id,
            vm: b.vm,
            host: b.host,
            started: b.started,
            consistency: b.consistency,
            key_fingerprint: b.key_fingerprint,
            config: idx.config,
        },
        disks,
    })
}

impl Host {
    /// Backup `id` as a sync reads it.
    pub async fn backup_index(&self, id: &str) -> Result<BackupIndex> {
        let (_, store, b) = self.complete_backup(id).await?;
        let i = id.to_string();
        let snap = blocking(move || store.describe(&i))
            .await?
            .ok_or_else(|| AgentError::NotFound(format!("Backup {id}")))?;
        Ok(BackupIndex {
            backup: b,
            config: snap.meta.config,
            disks: snap
                .disks
                .into_iter()
                .map(|d| BackupIndexDisk {
                    name: d.name,
                    size: d.size,
                    mode: d.mode,
                    reason: d.reason,
                    chunks: d.chunks.iter().map(Digest::hex).collect(),
                })
                .collect(),
        })
    }

    /// A chunk file of store `store` as it keeps it.
    pub async fn backup_chunk_file(&self, store: &str, name: &str) -> Result<Vec<u8>> {
        let d = Digest::from_hex(name).ok_or_else(|| {
            AgentError::invalid("chunk", "a chunk is named by 64 lowercase hex digits")
        })?;
        let (_, st) = self.open_backup_store(store).await?;
        let what = format!("Chunk {name} in store {store}");
        blocking(move || match st.chunk_file(&d) {
            Err(StoreError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                Err(StoreError::NotFound(what))
            }
            r => r,
        })
        .await
    }

    /// Pulls the backups of `req`'s source into store `store_name` (see the module).
    pub async fn sync_backups(
        &self,
        store_name: &str,
        req: BackupSync,
        ctx: Option<&TaskCtx>,
    ) -> Result<BackupSyncReport> {
        req.validate()?;
        let (def, store) = self.open_backup_store(store_name).await?;
        let tls = ferry_pki::ca_client_config(&req.ca_pem, ferry_pki::Expect::AnyMember)
            .map_err(|e| AgentError::invalid("ca_pem", e.to_string()))?;
        // no redirects (the source could send the daemon, and the token, anywhere)
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .redirect(reqwest::redirect::Policy::none())
            .https_only(true)
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(300))
            .build()
            .map_err(|e| failed(format!("HTTPS client: {e}")))?;
        let src = Source {
            http,
            base: req.url.trim_end_matches('/').to_string(),
            store: req.remote_store.clone(),
            token: req.token.clone(),
        };
        let mut q = format!("/api/v1/backups?store={}", req.remote_store);
        if let Some(v) = &req.vm {
            q.push_str(&format!("&vm={v}"));
        }
        let list: BackupList = src.json_max(&q, MAX_LIST).await?;
        if list.backups.len() > MAX_BACKUPS {
            return Err(failed(format!(
                "the source lists {} backups (at most {MAX_BACKUPS} a sync)",
                list.backups.len()
            )));
        }
        let mut remote: Vec<_> = list
            .backups
            .into_iter()
            .filter(|b| b.state == "complete" && b.store == req.remote_store)
            .collect();
        remote.sort_by_key(|b| b.started);
        let st = Arc::clone(&store);
        let here: std::collections::HashSet<String> =
            blocking(move || Ok(st.snapshots(None)?.into_iter().map(|s| s.id).collect())).await?;
        // ids of the other stores here: a copy never shadows another store's backup
        // with other data (the same backup, copied between two stores here, may be in
        // both)
        let mut elsewhere: std::collections::HashMap<String, Arc<ferry_backup::store::Store>> =
            Default::default();
        for d in self.backup_stores().await? {
            if d.name == def.name {
                continue;
            }
            if let Ok((_, st)) = self.open_backup_store(&d.name).await {
                let s2 = Arc::clone(&st);
                let ids: Vec<String> =
                    blocking(move || Ok(s2.snapshots(None)?.into_iter().map(|s| s.id).collect()))
                        .await
                        .unwrap_or_default();
                for id in ids {
                    elsewhere.insert(id, Arc::clone(&st));
                }
            }
        }
        let mut report = BackupSyncReport::default();
        let total = remote.len().max(1);
        for (n, b) in remote.into_iter().enumerate() {
            if here.contains(&b.id) {
                report.present += 1;
                continue;
            }
            let refuse = if b.key_fingerprint.is_some() {
                // a sealed chunk cannot be checked without its key: under a name a plain
                // backup here would compute, it would stand in for that data
                Some("encrypted backups are not synced yet (their chunks cannot be checked without the key)".to_string())
            } else {
                None
            };
            if let Some(error) = refuse {
                report.failed.push(BackupSyncFailure {
                    backup: b.id.clone(),
                    error,
                });
                continue;
            }
            if let Some(c) = ctx {
                c.log(format!("copying backup {} of {}", b.id, b.vm));
            }
            let r = self
                .copy_one(&src, &store, &b.id, elsewhere.get(&b.id))
                .await;
            match r {
                Ok(s) => {
                    report.copied.push(b.id.clone());
                    report.chunks_fetched += s.chunks_fetched;
                    report.bytes_fetched += s.bytes_fetched;
                    report.chunks_reused += s.chunks_reused;
                }
                Err(e) => {
                    if let Some(c) = ctx {
                        c.log(format!("backup {}: {e}", b.id));
                    }
                    report.failed.push(BackupSyncFailure {
                        backup: b.id.clone(),
                        error: e.to_string(),
                    });
                }
            }
            if let Some(c) = ctx {
                c.progress((n + 1) as f32 / total as f32);
            }
        }
        self.inner.events.emit(
            None,
            "backup",
            format!(
                "sync of {}/{} into {}: {} copied, {} present, {} failed",
                src.base,
                req.remote_store,
                def.name,
                report.copied.len(),
                report.present,
                report.failed.len()
            ),
        );
        Ok(report)
    }

    async fn copy_one(
        &self,
        src: &Source,
        store: &Arc<ferry_backup::store::Store>,
        id: &str,
        other: Option<&Arc<ferry_backup::store::Store>>,
    ) -> Result<ferry_backup::store::copy::CopyStats> {
        let idx: BackupIndex = src
            .json_max(&format!("/api/v1/backups/{id}/index"), MAX_INDEX)
            .await?;
        // the definition is restored later: it must be one
        if let Some(c) = &idx.config {
            let spec: ferry_types::VmSpec = serde_json::from_str(c)
                .map_err(|e| failed(format!("backup {id}'s VM definition: {e}")))?;
            spec.validate()
                .map_err(|e| failed(format!("backup {id}'s VM definition: {e}")))?;
        }
        if idx.backup.id != id {
            return Err(failed(format!(
                "asked for backup {id}, the source sent {}",
                idx.backup.id
            )));
        }
        let snap = source_snapshot(idx).map_err(failed)?;
        if let Some(o) = other {
            let (o, i) = (Arc::clone(o), id.to_string());
            let mine = blocking(move || o.describe(&i)).await?;
            let same = mine.is_some_and(|m| {
                m.disks.len() == snap.disks.len()
                    && m.disks
                        .iter()
                        .zip(&snap.disks)
                        .all(|(a, b)| a.size == b.size && a.chunks == b.chunks)
            });
            if !same {
                return Err(failed(format!(
                    "another store here holds a backup {id} with other data"
                )));
            }
        }
        let chunks = HttpChunks {
            src: src.clone(),
            rt: tokio::runtime::Handle::current(),
        };
        let st = Arc::clone(store);
        let me = self.host_name().to_string();
        blocking(move || st.copy_in(snap, &chunks, &me)).await
    }
}
