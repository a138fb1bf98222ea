//! Keeping a store healthy: removing snapshots whose writer died, pruning by a
//! retention policy, garbage collection (chunks whose reference count fell to zero —
//! no walk over chunk files, so space comes back within minutes of a prune), verify
//! (every chunk, or those of recent backups: damaged ones are marked, reported with the
//! backups that use them, and written again by the next backup that has their data) and
//! repair (recount every reference and remove chunk files no row names: the full mark
//! phase, for after damage only).

use super::chunk::{self, CryptKey, Digest};
use super::{unix_now, Store, StoreError};
use crate::retention::{self, Keep, Verdict};

/// A writer whose heartbeat is older than this is taken for dead when it is another
/// host's (a writer on this host is checked by its process).
pub const STALE_AFTER_SECS: i64 = 30 * 60;
/// Chunk files without a row younger than this may be a writer's before its pin.
const ORPHAN_GRACE_SECS: u64 = 6 * 3600;

/// Who writes a snapshot: host, process id and the process's start time, so a reused
/// process id is not mistaken for the writer.
pub fn owner_tag(host: &str) -> String {
    format!(
        "{host}:{}:{}",
        std::process::id(),
        start_time(std::process::id()).unwrap_or(0)
    )
}

fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // the command may hold spaces and parentheses: fields follow the last ')'
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn writer_alive(owner: &str, my_host: &str) -> Option<bool> {
    let mut parts = owner.rsplitn(3, ':');
    let started: u64 = parts.next()?.parse().ok()?;
    let pid: u32 = parts.next()?.parse().ok()?;
    let host = parts.next()?;
    if host != my_host {
        return None;
    }
    Some(start_time(pid) == Some(started))
}

/// The API's report types (one definition for the store, the daemon and the CLI).
pub use ferry_types::{
    BackupBadChunk as BadChunk, BackupGcReport as GcReport, BackupVerifyReport as VerifyReport,
};

#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RepairReport {
    pub recounted: u64,
    pub orphan_files: u64,
    pub missing_files: Vec<String>,
}

impl Store {
    /// Removes snapshots left `writing` by a writer that is gone: on this host when its
    /// process is gone, elsewhere when its heartbeat is older than [`STALE_AFTER_SECS`].
    pub fn remove_stale(&self, my_host: &str) -> Result<Vec<String>, StoreError> {
        let now = unix_now();
        let mut removed = Vec::new();
        for s in self.snapshots(None)? {
            if s.state != "writing" {
                continue;
            }
            let dead = match writer_alive(&s.owner, my_host) {
                Some(alive) => !alive,
                None => now - s.heartbeat > STALE_AFTER_SECS,
            };
            if dead && self.catalog().remove(&s.id)? {
                tracing::info!(snapshot = %s.id, owner = %s.owner, "removed a backup its writer left unfinished");
                removed.push(s.id);
            }
        }
        Ok(removed)
    }

    /// Deletes one backup (its chunks are freed by the next [`Store::gc`]).
    /// Protects a backup from delete and prune (or lets it go again).
    pub fn set_protected(&self, id: &str, protected: bool) -> Result<(), StoreError> {
        self.catalog().set_protected(id, protected)
    }

    pub fn delete(&self, id: &str) -> Result<(), StoreError> {
        let s = self
            .snapshot(id)?
            .ok_or_else(|| StoreError::NotFound(format!("no backup {id}")))?;
        if s.protected {
            return Err(StoreError::Invalid(format!(
                "backup {id} is protected: unprotect it first"
            )));
        }
        if s.state == "writing" {
            return Err(StoreError::Invalid(format!(
                "backup {id} is still being written"
            )));
        }
        self.catalog().remove(id)?;
        Ok(())
    }

    /// Applies a retention policy to one VM's complete backups (`dry_run`: only says).
    pub fn prune(&self, vm: &str, keep: &Keep, dry_run: bool) -> Result<Vec<Verdict>, StoreError> {
        let items: Vec<retention::Item> = self
            .snapshots(Some(vm))?
            .into_iter()
            .filter(|s| s.state == "complete")
            .map(|s| retention::Item {
                id: s.id,
                time: s.started,
                protected: s.protected,
            })
            .collect();
        let verdicts = retention::select(&items, keep);
        if !dry_run {
            for v in verdicts.iter().filter(|v| !v.keep) {
                self.catalog().remove(&v.id)?;
            }
        }
        Ok(verdicts)
    }

    /// Frees every chunk no backup references (after removing stale writers' backups).
    pub fn gc(&self, my_host: &str) -> Result<GcReport, StoreError> {
        let stale = self.remove_stale(my_host)?;
        let mut report = GcReport {
            stale_snapshots: stale,
            ..GcReport::default()
        };
        loop {
            let mut remove = |d: &Digest| self.remove_chunk_file(d);
            let (n, freed) = self.catalog().collect(2000, &mut remove)?;
            report.removed_chunks += n as u64;
            report.freed_bytes += freed;
            if n == 0 {
                break;
            }
        }
        self.clean_tmp();
        Ok(report)
    }

    fn clean_tmp(&self) {
        let dir = self.root().join("chunks/.tmp");
        if super::real_dir(&dir).is_err() {
            return;
        }
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return;
        };
        for e in rd.filter_map(Result::ok) {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|m| m.elapsed().ok())
                .is_some_and(|age| age.as_secs() > 3600);
            if old {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// Checks chunks of complete backups: all, or those of backups finished within
    /// `since_days`. Plain chunks (and encrypted ones with `key`) are decoded and their
    /// name checked; other encrypted chunks by CRC. Damaged chunks are marked.
    pub fn verify(
        &self,
        since_days: Option<u32>,
        key: Option<&CryptKey>,
        progress: &super::reader::Progress,
    ) -> Result<VerifyReport, StoreError> {
        let since = since_days.map(|d| unix_now() - i64::from(d) * 86400);
        let todo = self.catalog().chunks_to_verify(since, None)?;
        progress
            .total_bytes
            .store(todo.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let mut report = VerifyReport::default();
        let mut good = Vec::new();
        let mut bad = Vec::new();
        for d in &todo {
            let result = self.read_chunk_file(d).and_then(|file| {
                report.checked_bytes += file.len() as u64;
                let header = chunk::check(&file).map_err(|source| StoreError::Chunk {
                    digest: d.hex(),
                    source,
                })?;
                if header.encrypted && key.is_none() {
                    report.crc_only += 1;
                    return Ok(());
                }
                let k = if header.encrypted { key } else { None };
                chunk::decode(&file, d, k)
                    .map(|_| ())
                    .map_err(|source| StoreError::Chunk {
                        digest: d.hex(),
                        source,
                    })
            });
            report.checked_chunks += 1;
            progress
                .done_bytes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            match result {
                Ok(()) => good.push(*d),
                Err(StoreError::Chunk {
                    source: chunk::ChunkError::Decrypt,
                    ..
                }) if key.is_some() => {
                    // another key's chunk: its CRC passed, that is all this key can say
                    report.crc_only += 1;
                }
                Err(e) => {
                    let backups = self.catalog().users(d)?;
                    report.bad.push(BadChunk {
                        digest: d.hex(),
                        error: e.to_string(),
                        backups,
                    });
                    bad.push(*d);
                }
            }
            if good.len() >= 512 {
                self.catalog()
                    .mark_verified(&std::mem::take(&mut good), &[])?;
            }
        }
        self.catalog().mark_verified(&good, &bad)?;
        Ok(report)
    }

    /// The full mark phase: recounts references from the backups and removes chunk files
    /// no row names (older than a grace period, so a writer's unpinned file survives).
    pub fn repair(&self) -> Result<RepairReport, StoreError> {
        let recounted = self.catalog().recount()?;
        let known = self.catalog().all_chunks()?;
        let mut report = RepairReport {
            recounted,
            ..RepairReport::default()
        };
        let chunks = self.root().join("chunks");
        let rd = std::fs::read_dir(&chunks).map_err(|e| StoreError::Io {
            path: chunks.clone(),
            source: e,
        })?;
        let mut seen = std::collections::HashSet::new();
        for dir in rd.filter_map(Result::ok) {
            let name = dir.file_name().to_string_lossy().to_string();
            // a link in a store's folder is never followed
            if name.len() != 2 || !dir.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let Ok(files) = std::fs::read_dir(dir.path()) else {
                continue;
            };
            for f in files.filter_map(Result::ok) {
                let Some(d) = parse_hex(&f.file_name().to_string_lossy()) else {
                    continue;
                };
                seen.insert(d);
                if known.contains(&d) {
                    continue;
                }
                let old = f
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|m| m.elapsed().ok())
                    .is_some_and(|age| age.as_secs() > ORPHAN_GRACE_SECS);
                if old && std::fs::remove_file(f.path()).is_ok() {
                    report.orphan_files += 1;
                }
            }
        }
        for d in known.iter().filter(|d| !seen.contains(d)) {
            report.missing_files.push(d.hex());
        }
        if !report.missing_files.is_empty() {
            let missing: Vec<Digest> = known
                .iter()
                .filter(|d| !seen.contains(d))
                .copied()
                .collect();
            self.catalog().mark_verified(&[], &missing)?;
        }
        Ok(report)
    }
}

fn parse_hex(s: &str) -> Option<Digest> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(Digest(out))
}
