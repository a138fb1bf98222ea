//! A store behind a link that can be cut (feature `fake`): what one host of a simulated
//! cluster sees when the network between it and etcd fails. While cut, every call fails
//! as an unreachable etcd would and open watches end; healed, calls go through again.
//! Fencing and "never twice at once" are tested through it without a real network.

use crate::{KeyValue, LeaseId, Store, StoreError, Txn, TxnResponse, WatchEvent};
use async_trait::async_trait;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// `inner` as seen over a link that [`Partition::cut`] breaks.
pub struct Partition {
    inner: Arc<dyn Store>,
    cut: Arc<AtomicBool>,
}

impl Partition {
    pub fn new(inner: Arc<dyn Store>) -> Arc<Partition> {
        Arc::new(Partition {
            inner,
            cut: Arc::default(),
        })
    }

    /// Cuts the link (`true`) or heals it (`false`).
    pub fn cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::SeqCst);
    }

    fn check(&self, what: &'static str) -> Result<(), StoreError> {
        if self.cut.load(Ordering::SeqCst) {
            Err(StoreError::Timeout(what))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl Store for Partition {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        self.check("get")?;
        self.inner.get(key).await
    }
    async fn list_at(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), StoreError> {
        self.check("list")?;
        self.inner.list_at(prefix).await
    }
    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<i64, StoreError> {
        self.check("put")?;
        self.inner.put(key, value, lease).await
    }
    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        self.check("delete")?;
        self.inner.delete(key).await
    }
    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        self.check("txn")?;
        self.inner.txn(txn).await
    }
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        self.check("lease grant")?;
        self.inner.grant_lease(ttl).await
    }
    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.check("lease keep-alive")?;
        self.inner.keep_alive(lease).await
    }
    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.check("lease revoke")?;
        self.inner.revoke(lease).await
    }
    async fn watch(
        &self,
        prefix: &str,
        after: Option<i64>,
    ) -> Result<mpsc::Receiver<WatchEvent>, StoreError> {
        self.check("watch")?;
        let mut from = self.inner.watch(prefix, after).await?;
        let (tx, rx) = mpsc::channel(64);
        let cut = self.cut.clone();
        // The relay ends (as a broken connection ends a watch) once the link is cut.
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    ev = from.recv() => match ev {
                        Some(ev) if !cut.load(Ordering::SeqCst) => {
                            if tx.send(ev).await.is_err() {
                                return;
                            }
                        }
                        _ => return,
                    },
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {
                        if cut.load(Ordering::SeqCst) {
                            return;
                        }
                    }
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(rx)
    }
    async fn revision(&self) -> Result<i64, StoreError> {
        self.check("revision")?;
        self.inner.revision().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_cut_link_fails_every_call_and_ends_watches() {
        let d = tempfile::tempdir().unwrap();
        let s: Arc<dyn Store> = Arc::new(crate::SqliteStore::open(&d.path().join("s.db")).unwrap());
        let p = Partition::new(s.clone());
        p.put("/a", b"1".to_vec(), None).await.unwrap();
        let mut w = p.watch("/", None).await.unwrap();
        s.put("/b", b"2".to_vec(), None).await.unwrap();
        assert!(w.recv().await.is_some());
        p.cut(true);
        assert!(matches!(p.get("/a").await, Err(StoreError::Timeout(_))));
        let l = s.grant_lease(Duration::from_secs(5)).await.unwrap();
        assert!(p.keep_alive(l).await.is_err());
        s.put("/c", b"3".to_vec(), None).await.unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(2), w.recv()).await;
        assert!(matches!(ended, Ok(None)), "the watch ends");
        p.cut(false);
        assert_eq!(p.get("/a").await.unwrap().unwrap().value, b"1");
    }
}
