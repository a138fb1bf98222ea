//! The store's catalog: one SQLite file (`catalog.sqlite`, rollback journal so it also
//! works on an NFS share with locking) holding every snapshot, each disk's complete index
//! (the chunk names in order: a restore never walks a chain) and a reference count per
//! chunk. Writers on several hosts share it; each change is one `BEGIN IMMEDIATE`
//! transaction.
//!
//! The rule that keeps chunks safe: *a chunk row with references has its file*. A writer
//! pins a chunk (adds its reference) before it relies on it and writes the file before
//! the row exists; garbage collection removes a file and its row together, in one
//! transaction, only while the count is zero. A snapshot being written pins its chunks as
//! it goes; when it is committed its references are trimmed to exactly the chunks its
//! indexes name; when it is aborted (or found stale after a crash) they are dropped.

use super::chunk::Digest;
use super::StoreError;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use std::path::Path;
use std::time::Duration;

const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS snapshots(
    id TEXT PRIMARY KEY,
    vm TEXT NOT NULL,
    host TEXT NOT NULL,
    started INTEGER NOT NULL,
    finished INTEGER,
    state TEXT NOT NULL,
    owner TEXT NOT NULL,
    heartbeat INTEGER NOT NULL,
    consistency TEXT NOT NULL,
    key_fingerprint TEXT,
    config TEXT,
    protected INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS snapshots_vm ON snapshots(vm, started);
CREATE TABLE IF NOT EXISTS disks(
    snapshot TEXT NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    size INTEGER NOT NULL,
    mode TEXT NOT NULL,
    reason TEXT,
    read_bytes INTEGER NOT NULL,
    new_bytes INTEGER NOT NULL,
    chunk_index BLOB NOT NULL,
    bitmap TEXT,
    PRIMARY KEY(snapshot, name)
);
CREATE TABLE IF NOT EXISTS refs(
    snapshot TEXT NOT NULL,
    digest BLOB NOT NULL,
    PRIMARY KEY(snapshot, digest)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS refs_digest ON refs(digest);
CREATE TABLE IF NOT EXISTS chunks(
    digest BLOB PRIMARY KEY,
    refs INTEGER NOT NULL,
    stored INTEGER NOT NULL,
    plain INTEGER NOT NULL,
    bad INTEGER NOT NULL DEFAULT 0,
    verified INTEGER
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS chunks_unreferenced ON chunks(refs) WHERE refs = 0;
";

/// A snapshot's row.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SnapshotRow {
    pub id: String,
    pub vm: String,
    pub host: String,
    pub started: i64,
    pub finished: Option<i64>,
    /// `writing` or `complete`.
    pub state: String,
    pub owner: String,
    pub heartbeat: i64,
    /// `quiesced` or `crash`.
    pub consistency: String,
    pub key_fingerprint: Option<String>,
    pub config: Option<String>,
    pub protected: bool,
}

/// A disk of a snapshot, without its index.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DiskRow {
    pub name: String,
    pub size: u64,
    /// `full` or `incremental`.
    pub mode: String,
    /// Why a disk was read whole when an incremental was possible in principle.
    pub reason: Option<String>,
    pub read_bytes: u64,
    pub new_bytes: u64,
    pub chunks: u64,
    /// The dirty bitmap that tracks changes since this backup (if any).
    pub bitmap: Option<String>,
}

/// A chunk's file as the writer produced it.
pub struct NewChunk {
    pub digest: Digest,
    pub stored: u64,
    pub plain: u64,
}

pub struct Catalog {
    conn: Connection,
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn u(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Catalog {
    pub fn open(path: &Path) -> Result<Catalog, StoreError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(120))?;
        conn.pragma_update(None, "journal_mode", "DELETE")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // the file may come from a share someone else writes: no SQL of theirs runs
        conn.pragma_update(None, "trusted_schema", "OFF")?;
        conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_DEFENSIVE, true)?;
        check_schema(&conn)?;
        conn.execute_batch(SCHEMA)?;
        let version: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| {
                r.get(0)
            })
            .optional()?;
        match version {
            None => {
                conn.execute(
                    "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema', ?1)",
                    params![SCHEMA_VERSION.to_string()],
                )?;
            }
            Some(v) if v == SCHEMA_VERSION.to_string() => {}
            Some(v) => {
                return Err(StoreError::Version(format!(
                    "the catalog's schema is {v}, this ferry knows {SCHEMA_VERSION}"
                )))
            }
        }
        Ok(Catalog { conn })
    }

    pub fn begin_snapshot(&mut self, row: &SnapshotRow) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO snapshots(id, vm, host, started, state, owner, heartbeat, consistency, key_fingerprint, config, protected)
             VALUES (?1, ?2, ?3, ?4, 'writing', ?5, ?6, ?7, ?8, ?9, 0)",
            params![row.id, row.vm, row.host, row.started, row.owner, now(), row.consistency, row.key_fingerprint, row.config],
        )?;
        Ok(())
    }

    /// Whether a chunk is stored and not known to be damaged (a hint: only a pin holds).
    pub fn has_chunk(&self, d: &Digest) -> Result<bool, StoreError> {
        let bad: Option<i64> = self
            .conn
            .query_row(
                "SELECT bad FROM chunks WHERE digest = ?1",
                params![&d.0[..]],
                |r| r.get(0),
            )
            .optional()?;
        Ok(bad == Some(0))
    }

    /// Pins chunks for a snapshot being written, in one transaction. `ensure` is called
    /// for a chunk that has no row (or a damaged one) at that moment — collected since the
    /// writer looked, or never stored — and must make its file exist; it returns the file
    /// size, or `None` when it cannot (then that chunk is reported back unpinned).
    pub fn pin(
        &mut self,
        snapshot: &str,
        chunks: &[(Digest, u64)],
        ensure: &mut dyn FnMut(&Digest) -> Result<Option<u64>, StoreError>,
    ) -> Result<Vec<Digest>, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut missing = Vec::new();
        for (d, plain) in chunks {
            let row: Option<(i64, i64)> = tx
                .query_row(
                    "SELECT bad, refs FROM chunks WHERE digest = ?1",
                    params![&d.0[..]],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            // no row, a damaged chunk, or one nothing references — whose file a
            // collection that failed half-way may have removed (its rows rolled back,
            // the unlinks not): make sure the file is there
            if !matches!(row, Some((0, refs)) if refs > 0) {
                match ensure(d)? {
                    Some(stored) => {
                        tx.execute(
                            "INSERT INTO chunks(digest, refs, stored, plain, bad) VALUES (?1, 0, ?2, ?3, 0)
                             ON CONFLICT(digest) DO UPDATE SET bad = 0, stored = ?2, verified = NULL",
                            params![&d.0[..], i(stored), i(*plain)],
                        )?;
                    }
                    None => {
                        missing.push(*d);
                        continue;
                    }
                }
            }
            let added = tx.execute(
                "INSERT OR IGNORE INTO refs(snapshot, digest) VALUES (?1, ?2)",
                params![snapshot, &d.0[..]],
            )?;
            if added == 1 {
                tx.execute(
                    "UPDATE chunks SET refs = refs + 1 WHERE digest = ?1",
                    params![&d.0[..]],
                )?;
            }
        }
        tx.execute(
            "UPDATE snapshots SET heartbeat = ?2 WHERE id = ?1",
            params![snapshot, now()],
        )?;
        tx.commit()?;
        Ok(missing)
    }

    /// Records a finished disk of a snapshot being written.
    pub fn put_disk(
        &mut self,
        snapshot: &str,
        disk: &DiskRow,
        index: &[Digest],
    ) -> Result<(), StoreError> {
        let blob: Vec<u8> = index.iter().flat_map(|d| d.0).collect();
        self.conn.execute(
            "INSERT INTO disks(snapshot, name, size, mode, reason, read_bytes, new_bytes, chunk_index, bitmap)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![snapshot, disk.name, i(disk.size), disk.mode, disk.reason, i(disk.read_bytes), i(disk.new_bytes), blob, disk.bitmap],
        )?;
        Ok(())
    }

    /// Completes a snapshot: its references become exactly the chunks its indexes name
    /// (each of which it pinned), then it is listed.
    pub fn commit(&mut self, snapshot: &str) -> Result<(), StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut named = std::collections::HashSet::new();
        {
            let mut st = tx.prepare("SELECT chunk_index FROM disks WHERE snapshot = ?1")?;
            let mut rows = st.query(params![snapshot])?;
            while let Some(r) = rows.next()? {
                let blob: Vec<u8> = r.get(0)?;
                for c in blob.chunks_exact(32) {
                    if let Some(d) = Digest::from_slice(c) {
                        named.insert(d);
                    }
                }
            }
        }
        let pinned: Vec<Digest> = {
            let mut st = tx.prepare("SELECT digest FROM refs WHERE snapshot = ?1")?;
            let v = st
                .query_map(params![snapshot], |r| r.get::<_, Vec<u8>>(0))?
                .collect::<Result<Vec<_>, _>>()?;
            v.iter().filter_map(|b| Digest::from_slice(b)).collect()
        };
        let pinned_set: std::collections::HashSet<Digest> = pinned.iter().copied().collect();
        if let Some(d) = named.iter().find(|d| !pinned_set.contains(d)) {
            return Err(StoreError::Internal(format!(
                "snapshot {snapshot} names chunk {d:?} it never pinned"
            )));
        }
        for d in pinned.iter().filter(|d| !named.contains(d)) {
            unref(&tx, snapshot, d)?;
        }
        let n = tx.execute(
            "UPDATE snapshots SET state = 'complete', finished = ?2 WHERE id = ?1 AND state = 'writing'",
            params![snapshot, now()],
        )?;
        if n != 1 {
            return Err(StoreError::NotFound(format!(
                "snapshot {snapshot} is no longer being written (aborted as stale?)"
            )));
        }
        tx.commit()?;
        Ok(())
    }

    /// Removes a snapshot (aborted, stale or pruned) and drops its references.
    pub fn remove(&mut self, snapshot: &str) -> Result<bool, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let pinned: Vec<Vec<u8>> = {
            let mut st = tx.prepare("SELECT digest FROM refs WHERE snapshot = ?1")?;
            let v = st
                .query_map(params![snapshot], |r| r.get(0))?
                .collect::<Result<Vec<_>, _>>()?;
            v
        };
        for b in &pinned {
            if let Some(d) = Digest::from_slice(b) {
                unref(&tx, snapshot, &d)?;
            }
        }
        let n = tx.execute("DELETE FROM snapshots WHERE id = ?1", params![snapshot])?;
        tx.commit()?;
        Ok(n == 1)
    }

    pub fn set_protected(&mut self, snapshot: &str, protected: bool) -> Result<(), StoreError> {
        let n = self.conn.execute(
            "UPDATE snapshots SET protected = ?2 WHERE id = ?1",
            params![snapshot, protected],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("no backup {snapshot}")));
        }
        Ok(())
    }

    pub fn snapshots(&self, vm: Option<&str>) -> Result<Vec<SnapshotRow>, StoreError> {
        let mut st = self.conn.prepare(
            "SELECT id, vm, host, started, finished, state, owner, heartbeat, consistency, key_fingerprint, config, protected
             FROM snapshots WHERE (?1 IS NULL OR vm = ?1) ORDER BY started, id",
        )?;
        let rows = st
            .query_map(params![vm], snapshot_row)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    pub fn snapshot(&self, id: &str) -> Result<Option<SnapshotRow>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT id, vm, host, started, finished, state, owner, heartbeat, consistency, key_fingerprint, config, protected
                 FROM snapshots WHERE id = ?1",
                params![id],
                snapshot_row,
            )
            .optional()?)
    }

    pub fn disks(&self, snapshot: &str) -> Result<Vec<DiskRow>, StoreError> {
        let mut st = self.conn.prepare(
            "SELECT name, size, mode, reason, read_bytes, new_bytes, length(chunk_index) / 32, bitmap
             FROM disks WHERE snapshot = ?1 ORDER BY length(name), name",
        )?;
        let rows = st
            .query_map(params![snapshot], |r| {
                Ok(DiskRow {
                    name: r.get(0)?,
                    size: u(r.get(1)?),
                    mode: r.get(2)?,
                    reason: r.get(3)?,
                    read_bytes: u(r.get(4)?),
                    new_bytes: u(r.get(5)?),
                    chunks: u(r.get(6)?),
                    bitmap: r.get(7)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    pub fn index(&self, snapshot: &str, disk: &str) -> Result<Vec<Digest>, StoreError> {
        let blob: Option<Vec<u8>> = self
            .conn
            .query_row(
                "SELECT chunk_index FROM disks WHERE snapshot = ?1 AND name = ?2",
                params![snapshot, disk],
                |r| r.get(0),
            )
            .optional()?;
        let blob = blob
            .ok_or_else(|| StoreError::NotFound(format!("backup {snapshot} has no disk {disk}")))?;
        if blob.len() % 32 != 0 {
            return Err(StoreError::Corrupt(format!(
                "index of {snapshot}/{disk} is {} bytes",
                blob.len()
            )));
        }
        Ok(blob
            .chunks_exact(32)
            .filter_map(Digest::from_slice)
            .collect())
    }

    /// Up to `limit` chunks nobody references, handed to `remove` (which deletes each
    /// file) inside the transaction that then deletes their rows.
    pub fn collect(
        &mut self,
        limit: usize,
        remove: &mut dyn FnMut(&Digest) -> Result<(), StoreError>,
    ) -> Result<(usize, u64), StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let found: Vec<(Vec<u8>, i64)> = {
            let mut st = tx.prepare("SELECT digest, stored FROM chunks WHERE refs = 0 LIMIT ?1")?;
            let v = st
                .query_map(params![i64::try_from(limit).unwrap_or(i64::MAX)], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            v
        };
        let mut freed = 0u64;
        for (b, stored) in &found {
            if let Some(d) = Digest::from_slice(b) {
                remove(&d)?;
            }
            tx.execute("DELETE FROM chunks WHERE digest = ?1", params![b])?;
            freed += u(*stored);
        }
        tx.commit()?;
        Ok((found.len(), freed))
    }

    /// Chunks referenced by complete snapshots (all, or those of snapshots finished since
    /// `since`), with whether they were verified after `fresh`.
    pub fn chunks_to_verify(
        &self,
        since: Option<i64>,
        fresh: Option<i64>,
    ) -> Result<Vec<Digest>, StoreError> {
        let mut st = self.conn.prepare(
            "SELECT DISTINCT c.digest FROM chunks c JOIN refs r ON r.digest = c.digest
             JOIN snapshots s ON s.id = r.snapshot
             WHERE s.state = 'complete' AND (?1 IS NULL OR s.finished >= ?1)
               AND (?2 IS NULL OR c.verified IS NULL OR c.verified < ?2)",
        )?;
        let v = st
            .query_map(params![since, fresh], |r| r.get::<_, Vec<u8>>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(v.iter().filter_map(|b| Digest::from_slice(b)).collect())
    }

    pub fn mark_verified(&mut self, good: &[Digest], bad: &[Digest]) -> Result<(), StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let t = now();
        for d in good {
            tx.execute(
                "UPDATE chunks SET verified = ?2 WHERE digest = ?1",
                params![&d.0[..], t],
            )?;
        }
        for d in bad {
            tx.execute(
                "UPDATE chunks SET bad = 1, verified = ?2 WHERE digest = ?1",
                params![&d.0[..], t],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The snapshots that use a chunk.
    pub fn users(&self, d: &Digest) -> Result<Vec<String>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT snapshot FROM refs WHERE digest = ?1 ORDER BY snapshot")?;
        let v = st
            .query_map(params![&d.0[..]], |r| r.get(0))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(v)
    }

    pub fn bad_chunks(&self) -> Result<Vec<Digest>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT digest FROM chunks WHERE bad = 1")?;
        let v = st
            .query_map([], |r| r.get::<_, Vec<u8>>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(v.iter().filter_map(|b| Digest::from_slice(b)).collect())
    }

    /// (chunks, bytes stored, chunks without references).
    pub fn usage(&self) -> Result<(u64, u64, u64), StoreError> {
        Ok(self.conn.query_row(
            "SELECT count(*), coalesce(sum(stored), 0), coalesce(sum(refs = 0), 0) FROM chunks",
            [],
            |r| Ok((u(r.get(0)?), u(r.get(1)?), u(r.get(2)?))),
        )?)
    }

    /// The plain bytes all complete snapshots name (what the dedup factor divides).
    pub fn logical_bytes(&self) -> Result<u64, StoreError> {
        Ok(self.conn.query_row(
            "SELECT coalesce(sum(d.size), 0) FROM disks d JOIN snapshots s ON s.id = d.snapshot WHERE s.state = 'complete'",
            [],
            |r| Ok(u(r.get(0)?)),
        )?)
    }

    /// Repair: recounts every chunk's references from the refs table (the full mark
    /// phase; normal runs never need it).
    pub fn recount(&mut self) -> Result<u64, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let changed = tx.execute(
            "UPDATE chunks SET refs = (SELECT count(*) FROM refs r WHERE r.digest = chunks.digest)
             WHERE refs != (SELECT count(*) FROM refs r WHERE r.digest = chunks.digest)",
            [],
        )?;
        tx.execute(
            "DELETE FROM refs WHERE snapshot NOT IN (SELECT id FROM snapshots)",
            [],
        )?;
        tx.commit()?;
        Ok(u64::try_from(changed).unwrap_or(0))
    }

    /// Every chunk row's name (repair: files without a row are orphans).
    pub fn all_chunks(&self) -> Result<std::collections::HashSet<Digest>, StoreError> {
        let mut st = self.conn.prepare("SELECT digest FROM chunks")?;
        let v = st
            .query_map([], |r| r.get::<_, Vec<u8>>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(v.iter().filter_map(|b| Digest::from_slice(b)).collect())
    }

    #[cfg(test)]
    pub(crate) fn conn_for_tests(&self) -> &Connection {
        &self.conn
    }

    pub fn heartbeat(&mut self, snapshot: &str) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE snapshots SET heartbeat = ?2 WHERE id = ?1",
            params![snapshot, now()],
        )?;
        Ok(())
    }
}

/// Refuses a catalog holding anything ferry did not make (a trigger or view runs SQL on
/// every change or read; a table of another shape would be read as ours).
fn check_schema(conn: &Connection) -> Result<(), StoreError> {
    const KNOWN: [&str; 10] = [
        "meta",
        "snapshots",
        "snapshots_vm",
        "disks",
        "refs",
        "refs_digest",
        "chunks",
        "chunks_unreferenced",
        "sqlite_sequence",
        "sqlite_stat1",
    ];
    let mut st = conn.prepare("SELECT type, name FROM sqlite_master")?;
    let objects = st
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
        .collect::<Result<Vec<_>, _>>()?;
    for (kind, name) in objects {
        let ok = match kind.as_str() {
            "table" | "index" => {
                KNOWN.contains(&name.as_str()) || name.starts_with("sqlite_autoindex_")
            }
            _ => false,
        };
        if !ok {
            return Err(StoreError::Corrupt(format!(
                "the catalog holds a {kind} {name:?} ferry never made: refusing to use it"
            )));
        }
    }
    Ok(())
}

fn unref(tx: &rusqlite::Transaction<'_>, snapshot: &str, d: &Digest) -> Result<(), StoreError> {
    let n = tx.execute(
        "DELETE FROM refs WHERE snapshot = ?1 AND digest = ?2",
        params![snapshot, &d.0[..]],
    )?;
    if n == 1 {
        tx.execute(
            "UPDATE chunks SET refs = max(refs - 1, 0) WHERE digest = ?1",
            params![&d.0[..]],
        )?;
    }
    Ok(())
}

fn snapshot_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SnapshotRow> {
    Ok(SnapshotRow {
        id: r.get(0)?,
        vm: r.get(1)?,
        host: r.get(2)?,
        started: r.get(3)?,
        finished: r.get(4)?,
        state: r.get(5)?,
        owner: r.get(6)?,
        heartbeat: r.get(7)?,
        consistency: r.get(8)?,
        key_fingerprint: r.get(9)?,
        config: r.get(10)?,
        protected: r.get::<_, i64>(11)? != 0,
    })
}
