//! The one-host backend: one SQLite file (WAL, synchronous=FULL). Every write is one SQLite
//! transaction, so a crash leaves either the whole operation or none of it.

use crate::{
    Cmp, Compare, EventKind, KeyValue, LeaseId, Op, Store, StoreError, Txn, TxnResponse, WatchEvent,
};
use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{broadcast, mpsc};

/// How many revisions of history are kept for watches.
const HISTORY: i64 = 10_000;

struct Shared {
    conn: Mutex<Connection>,
    events: broadcast::Sender<WatchEvent>,
}

#[derive(Clone)]
pub struct SqliteStore {
    shared: Arc<Shared>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis()
        .try_into()
        .unwrap_or(i64::MAX)
}

impl SqliteStore {
    /// Opens (creating if needed) the store file and starts the lease expiry task.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let open_err = |source| StoreError::Open {
            path: path.display().to_string(),
            source,
        };
        let conn = Connection::open(path).map_err(open_err)?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA busy_timeout=5000;
             CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB NOT NULL,
                 create_rev INTEGER NOT NULL, mod_rev INTEGER NOT NULL, version INTEGER NOT NULL, lease INTEGER);
             CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS leases (id INTEGER PRIMARY KEY, ttl_ms INTEGER NOT NULL, expires_ms INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS history (rev INTEGER NOT NULL, key TEXT NOT NULL, kind INTEGER NOT NULL, value BLOB NOT NULL);
             CREATE INDEX IF NOT EXISTS history_rev ON history(rev);
             INSERT OR IGNORE INTO meta VALUES ('revision', 0), ('lease', 0);",
        )
        .map_err(open_err)?;
        let (events, _) = broadcast::channel(1024);
        let store = SqliteStore {
            shared: Arc::new(Shared {
                conn: Mutex::new(conn),
                events,
            }),
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            let weak = Arc::downgrade(&store.shared);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let Some(shared) = weak.upgrade() else { break };
                    let s = SqliteStore { shared };
                    if let Err(e) = s.blocking(|tx| expire_leases(tx, now_ms())).await {
                        tracing::warn!(error = %e, "lease expiry failed");
                    }
                }
            });
        }
        Ok(store)
    }

    /// Runs `f` in one SQLite transaction on a blocking thread; publishes its events after
    /// commit.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Batch) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = shared.conn.lock().unwrap_or_else(|e| e.into_inner());
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let mut batch = Batch {
                tx,
                events: vec![],
                rev: None,
            };
            let out = f(&mut batch)?;
            let events = batch.finish()?;
            for e in events {
                let _ = shared.events.send(e);
            }
            Ok(out)
        })
        .await
        .map_err(|e| StoreError::Join(e.to_string()))?
    }
}

/// One write transaction: bumps the revision once, records history.
struct Batch<'c> {
    tx: Transaction<'c>,
    events: Vec<WatchEvent>,
    rev: Option<i64>,
}

impl Batch<'_> {
    fn revision(&self) -> Result<i64, StoreError> {
        Ok(self
            .tx
            .query_row("SELECT v FROM meta WHERE k='revision'", [], |r| r.get(0))?)
    }
    /// The revision this batch writes at (current + 1), allocated on the first write.
    fn write_rev(&mut self) -> Result<i64, StoreError> {
        if let Some(r) = self.rev {
            return Ok(r);
        }
        let r = self.revision()? + 1;
        self.tx
            .execute("UPDATE meta SET v=?1 WHERE k='revision'", [r])?;
        self.rev = Some(r);
        Ok(r)
    }
    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        Ok(self
            .tx
            .query_row(
                "SELECT key, value, create_rev, mod_rev, version, lease FROM kv WHERE key=?1",
                [key],
                row_kv,
            )
            .optional()?)
    }
    fn put(&mut self, key: &str, value: &[u8], lease: Option<LeaseId>) -> Result<(), StoreError> {
        if let Some(l) = lease {
            let ok: Option<i64> = self
                .tx
                .query_row("SELECT id FROM leases WHERE id=?1", [l], |r| r.get(0))
                .optional()?;
            if ok.is_none() {
                return Err(StoreError::LeaseNotFound(l));
            }
        }
        let rev = self.write_rev()?;
        self.tx.execute(
            "INSERT INTO kv (key, value, create_rev, mod_rev, version, lease) VALUES (?1, ?2, ?3, ?3, 1, ?4)
             ON CONFLICT(key) DO UPDATE SET value=?2, mod_rev=?3, version=version+1, lease=?4",
            params![key, value, rev, lease],
        )?;
        self.record(rev, EventKind::Put, key, value)
    }
    fn delete(&mut self, key: &str) -> Result<bool, StoreError> {
        if self.get(key)?.is_none() {
            return Ok(false);
        }
        let rev = self.write_rev()?;
        self.tx.execute("DELETE FROM kv WHERE key=?1", [key])?;
        self.record(rev, EventKind::Delete, key, &[])?;
        Ok(true)
    }
    fn delete_prefix(&mut self, prefix: &str) -> Result<(), StoreError> {
        for kv in list(&self.tx, prefix)? {
            self.delete(&kv.key)?;
        }
        Ok(())
    }
    fn record(
        &mut self,
        rev: i64,
        kind: EventKind,
        key: &str,
        value: &[u8],
    ) -> Result<(), StoreError> {
        let k = match kind {
            EventKind::Put => 0,
            EventKind::Delete => 1,
        };
        self.tx.execute(
            "INSERT INTO history (rev, key, kind, value) VALUES (?1, ?2, ?3, ?4)",
            params![rev, key, k, value],
        )?;
        self.events.push(WatchEvent {
            revision: rev,
            kind,
            key: key.to_string(),
            value: value.to_vec(),
        });
        Ok(())
    }
    fn finish(self) -> Result<Vec<WatchEvent>, StoreError> {
        if let Some(rev) = self.rev {
            if rev % 100 == 0 {
                self.tx
                    .execute("DELETE FROM history WHERE rev <= ?1", [rev - HISTORY])?;
            }
        }
        self.tx.commit()?;
        Ok(self.events)
    }
}

fn row_kv(r: &rusqlite::Row<'_>) -> rusqlite::Result<KeyValue> {
    Ok(KeyValue {
        key: r.get(0)?,
        value: r.get(1)?,
        create_rev: r.get(2)?,
        mod_rev: r.get(3)?,
        version: r.get(4)?,
        lease: r.get(5)?,
    })
}

/// Keys with `prefix`, using a range scan (`prefix` <= key < `prefix` + U+10FFFF).
fn list(conn: &Connection, prefix: &str) -> Result<Vec<KeyValue>, StoreError> {
    let mut st = conn.prepare_cached(
        "SELECT key, value, create_rev, mod_rev, version, lease FROM kv WHERE key >= ?1 AND key < ?2 ORDER BY key",
    )?;
    let end = format!("{prefix}\u{10FFFF}");
    let rows = st.query_map([prefix, end.as_str()], row_kv)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn check(cmp: Cmp, ord: std::cmp::Ordering) -> bool {
    use std::cmp::Ordering::*;
    match cmp {
        Cmp::Equal => ord == Equal,
        Cmp::NotEqual => ord != Equal,
        Cmp::Less => ord == Less,
        Cmp::Greater => ord == Greater,
    }
}

fn expire_leases(b: &mut Batch, now: i64) -> Result<(), StoreError> {
    let ids: Vec<i64> = {
        let mut st =
            b.tx.prepare("SELECT id FROM leases WHERE expires_ms <= ?1")?;
        let rows = st.query_map([now], |r| r.get(0))?;
        rows.collect::<Result<_, _>>()?
    };
    for id in ids {
        revoke(b, id)?;
    }
    Ok(())
}

fn revoke(b: &mut Batch, id: LeaseId) -> Result<(), StoreError> {
    let keys: Vec<String> = {
        let mut st = b.tx.prepare("SELECT key FROM kv WHERE lease=?1")?;
        let rows = st.query_map([id], |r| r.get(0))?;
        rows.collect::<Result<_, _>>()?
    };
    for k in keys {
        b.delete(&k)?;
    }
    b.tx.execute("DELETE FROM leases WHERE id=?1", [id])?;
    Ok(())
}

#[async_trait]
impl Store for SqliteStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let key = key.to_string();
        self.blocking(move |b| b.get(&key)).await
    }
    async fn list_at(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), StoreError> {
        let prefix = prefix.to_string();
        self.blocking(move |b| Ok((list(&b.tx, &prefix)?, b.revision()?)))
            .await
    }
    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<i64, StoreError> {
        let key = key.to_string();
        self.blocking(move |b| {
            b.put(&key, &value, lease)?;
            b.write_rev()
        })
        .await
    }
    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let key = key.to_string();
        self.blocking(move |b| b.delete(&key)).await
    }
    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        self.blocking(move |b| {
            let mut ok = true;
            for c in &txn.compare {
                let (key, holds) = match c {
                    Compare::Version(k, cmp, v) => {
                        let cur = b.get(k)?.map_or(0, |kv| kv.version);
                        (k, check(*cmp, cur.cmp(v)))
                    }
                    Compare::ModRev(k, cmp, v) => {
                        let cur = b.get(k)?.map_or(0, |kv| kv.mod_rev);
                        (k, check(*cmp, cur.cmp(v)))
                    }
                    Compare::Value(k, cmp, v) => match b.get(k)? {
                        Some(kv) => (k, check(*cmp, kv.value.cmp(v))),
                        None => (k, false),
                    },
                };
                let _ = key;
                ok &= holds;
            }
            let ops = if ok { &txn.success } else { &txn.failure };
            let mut gets = vec![];
            for op in ops {
                match op {
                    Op::Get(k) => gets.push(b.get(k)?),
                    Op::Put { key, value, lease } => b.put(key, value, *lease)?,
                    Op::Delete(k) => {
                        b.delete(k)?;
                    }
                    Op::DeletePrefix(p) => b.delete_prefix(p)?,
                }
            }
            let revision = match b.rev {
                Some(r) => r,
                None => b.revision()?,
            };
            Ok(TxnResponse {
                succeeded: ok,
                revision,
                gets,
            })
        })
        .await
    }
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        self.blocking(move |b| {
            let id: i64 = b.tx.query_row(
                "UPDATE meta SET v=v+1 WHERE k='lease' RETURNING v",
                [],
                |r| r.get(0),
            )?;
            b.tx.execute(
                "INSERT INTO leases VALUES (?1, ?2, ?3)",
                params![id, ttl_ms, now_ms() + ttl_ms],
            )?;
            Ok(id)
        })
        .await
    }
    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.blocking(move |b| {
            let now = now_ms();
            let n = b.tx.execute(
                "UPDATE leases SET expires_ms = ?2 + ttl_ms WHERE id=?1 AND expires_ms > ?2",
                params![lease, now],
            )?;
            if n == 0 {
                return Err(StoreError::LeaseNotFound(lease));
            }
            Ok(())
        })
        .await
    }
    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.blocking(move |b| revoke(b, lease)).await
    }
    async fn watch(
        &self,
        prefix: &str,
        after: Option<i64>,
    ) -> Result<mpsc::Receiver<WatchEvent>, StoreError> {
        let prefix = prefix.to_string();
        // Subscribe first, then read the history, so nothing falls between the two.
        let mut live = self.shared.events.subscribe();
        let p = prefix.clone();
        let (past, current) = self
            .blocking(move |b| {
                let current = b.revision()?;
                let Some(after) = after else {
                    return Ok((vec![], current));
                };
                let oldest: Option<i64> = b.tx.query_row("SELECT MIN(rev) FROM history", [], |r| r.get(0))?;
                if let Some(oldest) = oldest {
                    if after + 1 < oldest {
                        return Err(StoreError::Compacted { requested: after, oldest });
                    }
                }
                let mut st = b.tx.prepare(
                    "SELECT rev, key, kind, value FROM history WHERE rev > ?1 AND key >= ?2 AND key < ?3 ORDER BY rev, rowid",
                )?;
                let end = format!("{p}\u{10FFFF}");
                let rows = st.query_map(params![after, p, end], |r| {
                    Ok(WatchEvent {
                        revision: r.get(0)?,
                        key: r.get(1)?,
                        kind: if r.get::<_, i64>(2)? == 0 { EventKind::Put } else { EventKind::Delete },
                        value: r.get(3)?,
                    })
                })?;
                Ok((rows.collect::<Result<Vec<_>, _>>()?, current))
            })
            .await?;
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            for e in past {
                if tx.send(e).await.is_err() {
                    return;
                }
            }
            let seen = current.max(after.unwrap_or(0));
            loop {
                match live.recv().await {
                    Ok(e) => {
                        if e.revision > seen
                            && e.key.starts_with(&prefix)
                            && tx.send(e).await.is_err()
                        {
                            return;
                        }
                    }
                    // A watcher that falls behind is closed; it re-lists, as after compaction.
                    Err(broadcast::error::RecvError::Lagged(_))
                    | Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(rx)
    }
    async fn revision(&self) -> Result<i64, StoreError> {
        self.blocking(|b| b.revision()).await
    }
}
