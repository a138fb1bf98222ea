//! A store seen under a key prefix: what etcd's scoped client does, over any
//! [`Store`]. A host's subtree of a cluster store is one; with SQLite underneath,
//! several simulated hosts share one store in a test as real hosts share etcd.
//!
//! Keys handed in get the prefix, keys handed back lose it; a key outside the prefix
//! never comes back (a watch or list only ever sees the subtree).

use crate::{Compare, KeyValue, LeaseId, Op, Store, StoreError, Txn, TxnResponse, WatchEvent};
use async_trait::async_trait;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// `inner`'s keys under `prefix` (no trailing slash: keys start with one).
#[derive(Clone)]
pub struct Prefixed {
    inner: Arc<dyn Store>,
    prefix: String,
}

impl Prefixed {
    pub fn new(inner: Arc<dyn Store>, prefix: &str) -> Prefixed {
        Prefixed {
            inner,
            prefix: prefix.to_string(),
        }
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// A prefix asked for: the empty one is the subtree's "/" (never a longer
    /// sibling's keys: "/hosts/h10" under "/hosts/h1").
    fn full_prefix(&self, prefix: &str) -> String {
        if prefix.is_empty() {
            format!("{}/", self.prefix)
        } else {
            self.full(prefix)
        }
    }

    /// A key asked for by its name, without the prefix.
    fn strip(&self, mut kv: KeyValue) -> Option<KeyValue> {
        kv.key = kv.key.strip_prefix(&self.prefix)?.to_string();
        Some(kv)
    }

    /// A key found under `asked`, without the prefix; none for a key of a longer
    /// sibling ("/hosts/h10/..." when "" is asked under "/hosts/h1").
    fn strip_found(&self, mut kv: KeyValue, asked: &str) -> Option<KeyValue> {
        kv.key = own(&kv.key, &self.prefix, asked)?.to_string();
        Some(kv)
    }

    fn compare(&self, c: Compare) -> Compare {
        match c {
            Compare::Version(k, o, v) => Compare::Version(self.full(&k), o, v),
            Compare::ModRev(k, o, v) => Compare::ModRev(self.full(&k), o, v),
            Compare::Value(k, o, v) => Compare::Value(self.full(&k), o, v),
        }
    }

    fn op(&self, op: Op) -> Op {
        match op {
            Op::Get(k) => Op::Get(self.full(&k)),
            Op::Put { key, value, lease } => Op::Put {
                key: self.full(&key),
                value,
                lease,
            },
            Op::Delete(k) => Op::Delete(self.full(&k)),
            Op::DeletePrefix(k) => Op::DeletePrefix(self.full_prefix(&k)),
        }
    }
}

/// `key`, found under `asked`, without `prefix`, when it is a key of the subtree: the
/// subtree's keys start with "/" after the prefix, so a key found by a prefix that does
/// not (only "" in practice) must.
fn own<'a>(key: &'a str, prefix: &str, asked: &str) -> Option<&'a str> {
    key.strip_prefix(prefix)
        .filter(|k| asked.starts_with('/') || k.starts_with('/'))
}

#[async_trait]
impl Store for Prefixed {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        Ok(self
            .inner
            .get(&self.full(key))
            .await?
            .and_then(|kv| self.strip(kv)))
    }

    async fn list_at(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), StoreError> {
        let (kvs, rev) = self.inner.list_at(&self.full_prefix(prefix)).await?;
        Ok((
            kvs.into_iter()
                .filter_map(|kv| self.strip_found(kv, prefix))
                .collect(),
            rev,
        ))
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<i64, StoreError> {
        self.inner.put(&self.full(key), value, lease).await
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        self.inner.delete(&self.full(key)).await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        let t = Txn {
            compare: txn.compare.into_iter().map(|c| self.compare(c)).collect(),
            success: txn.success.into_iter().map(|o| self.op(o)).collect(),
            failure: txn.failure.into_iter().map(|o| self.op(o)).collect(),
        };
        let mut r = self.inner.txn(t).await?;
        r.gets = r
            .gets
            .into_iter()
            .map(|g| g.and_then(|kv| self.strip(kv)))
            .collect();
        Ok(r)
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        self.inner.grant_lease(ttl).await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.inner.keep_alive(lease).await
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.inner.revoke(lease).await
    }

    async fn watch(
        &self,
        prefix: &str,
        after: Option<i64>,
    ) -> Result<mpsc::Receiver<WatchEvent>, StoreError> {
        let mut rx = self.inner.watch(&self.full_prefix(prefix), after).await?;
        let (tx, out) = mpsc::channel(256);
        let (strip, asked) = (self.prefix.clone(), prefix.to_string());
        tokio::spawn(async move {
            while let Some(mut ev) = rx.recv().await {
                if tx.is_closed() {
                    return; // the caller is gone (even if only filtered events come)
                }
                let Some(k) = own(&ev.key, &strip, &asked) else {
                    continue;
                };
                ev.key = k.to_string();
                if tx.send(ev).await.is_err() {
                    return;
                }
            }
        });
        Ok(out)
    }

    async fn revision(&self) -> Result<i64, StoreError> {
        self.inner.revision().await
    }
}
