//! A watch-fed copy of one prefix of the store in memory: listed once, then kept
//! current from a watch starting at the listing's revision; when the watch ends it is
//! resumed from the last revision seen, and when that revision was compacted away the
//! prefix is listed again.
//!
//! Readers never wait on the store: [`Mirror::read`] runs a closure over the current
//! map under a short read lock. Each entry keeps the revision it was written at, so an
//! event older than what the map holds (a listing raced a watch) changes nothing.
//! Values are decoded once, as they arrive; a key the decoder refuses (not wanted, or
//! not readable) is left out as if it were absent.

use crate::{EventKind, Store, StoreError, WatchEvent};
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::{broadcast, watch};

/// Turns a key (relative to the mirrored prefix) and its value into an entry; `None`
/// leaves the key out (not wanted, or not readable).
pub type Decode<T> = dyn Fn(&str, &[u8]) -> Option<T> + Send + Sync;

/// The mirrored entries with the revision each was written at.
#[derive(Debug)]
pub struct Entries<T> {
    pub map: BTreeMap<String, (T, i64)>,
    /// The store revision the map reflects (at least).
    pub revision: i64,
    /// False until the first listing arrived, and again while the mirror re-lists after
    /// losing its watch.
    pub synced: bool,
}

impl<T> Entries<T> {
    /// Applies one event (the key already relative to the mirrored prefix); returns
    /// whether the map changed.
    pub fn apply(&mut self, ev: &WatchEvent, decode: &Decode<T>) -> bool {
        self.revision = self.revision.max(ev.revision);
        let newer = self
            .map
            .get(&ev.key)
            .is_none_or(|(_, rev)| *rev < ev.revision);
        if !newer {
            return false;
        }
        match ev.kind {
            EventKind::Delete => self.map.remove(&ev.key).is_some(),
            EventKind::Put => match decode(&ev.key, &ev.value) {
                Some(v) => {
                    self.map.insert(ev.key.clone(), (v, ev.revision));
                    true
                }
                None => self.map.remove(&ev.key).is_some(),
            },
        }
    }
}

struct Shared<T> {
    entries: RwLock<Entries<T>>,
    /// Bumped after every change (and when the mirror gets in or out of sync).
    generation: watch::Sender<u64>,
    /// Which keys changed, for followers ([`Mirror::changes`]).
    changes: broadcast::Sender<Change>,
}

/// What changed in a mirror.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// This key (relative to the mirrored prefix) was written or deleted.
    Key(String),
    /// Anything may have changed (the prefix was listed again).
    All,
}

/// One prefix kept in memory; clones share it. The task feeding it ends with the last
/// clone.
pub struct Mirror<T> {
    shared: Arc<Shared<T>>,
    _task: Arc<AbortOnDrop>,
}

impl<T> Clone for Mirror<T> {
    fn clone(&self) -> Self {
        Mirror {
            shared: self.shared.clone(),
            _task: self._task.clone(),
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How long to wait before listing again after the store failed.
const RETRY: Duration = Duration::from_secs(1);

impl<T: Send + Sync + 'static> Mirror<T> {
    /// Starts mirroring `prefix` of `store` (on the current tokio runtime).
    pub fn start(
        store: Arc<dyn Store>,
        prefix: &str,
        decode: impl Fn(&str, &[u8]) -> Option<T> + Send + Sync + 'static,
    ) -> Mirror<T> {
        let shared = Arc::new(Shared {
            entries: RwLock::new(Entries {
                map: BTreeMap::new(),
                revision: 0,
                synced: false,
            }),
            generation: watch::channel(0).0,
            changes: broadcast::channel(1024).0,
        });
        let task = tokio::spawn(feed(
            store,
            prefix.to_string(),
            Box::new(decode),
            shared.clone(),
        ));
        Mirror {
            shared,
            _task: Arc::new(AbortOnDrop(task)),
        }
    }

    /// Runs `f` over the current entries (under a read lock: keep it short).
    pub fn read<R>(&self, f: impl FnOnce(&Entries<T>) -> R) -> R {
        f(&self
            .shared
            .entries
            .read()
            .unwrap_or_else(|e| e.into_inner()))
    }

    /// Whether the mirror holds a complete listing kept current by its watch.
    pub fn synced(&self) -> bool {
        self.read(|e| e.synced)
    }

    /// Waits up to `timeout` for the mirror to be in sync; returns whether it is.
    pub async fn wait_synced(&self, timeout: Duration) -> bool {
        let mut rx = self.shared.generation.subscribe();
        let waited = tokio::time::timeout(timeout, async {
            while !self.synced() {
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        waited.is_ok() && self.synced()
    }

    /// How many changes the mirror has seen (any change bumps it).
    pub fn generation(&self) -> u64 {
        *self.shared.generation.borrow()
    }

    /// Each change as it happens (a follower that lags behind gets `Lagged` and should
    /// take it as [`Change::All`]).
    pub fn changes(&self) -> broadcast::Receiver<Change> {
        self.shared.changes.subscribe()
    }

    /// Notified after every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.generation.subscribe()
    }
}

async fn feed<T>(store: Arc<dyn Store>, prefix: String, decode: Box<Decode<T>>, s: Arc<Shared<T>>) {
    let bump = || s.generation.send_modify(|g| *g += 1);
    let set_synced = |v: bool| {
        let mut e = s.entries.write().unwrap_or_else(|e| e.into_inner());
        let changed = e.synced != v;
        e.synced = v;
        changed
    };
    let mut resume: Option<i64> = None;
    loop {
        let from = match resume {
            Some(r) => r,
            None => match store.list_at(&prefix).await {
                Ok((kvs, rev)) => {
                    let map = kvs
                        .into_iter()
                        .filter_map(|kv| {
                            let key = kv.key.strip_prefix(&prefix)?.to_string();
                            let v = decode(&key, &kv.value)?;
                            Some((key, (v, kv.mod_rev)))
                        })
                        .collect();
                    let mut e = s.entries.write().unwrap_or_else(|e| e.into_inner());
                    e.map = map;
                    e.revision = rev;
                    drop(e);
                    let _ = s.changes.send(Change::All);
                    rev
                }
                Err(err) => {
                    tracing::debug!(prefix, error = %err, "mirror: listing failed");
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
            },
        };
        let mut rx = match store.watch(&prefix, Some(from)).await {
            Ok(rx) => rx,
            Err(StoreError::Compacted { .. }) => {
                tracing::info!(prefix, from, "mirror: history compacted, listing again");
                if set_synced(false) {
                    bump();
                }
                resume = None;
                continue;
            }
            Err(err) => {
                tracing::debug!(prefix, error = %err, "mirror: watch failed");
                if set_synced(false) {
                    bump();
                }
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        set_synced(true);
        bump();
        while let Some(first) = rx.recv().await {
            let mut changed = false;
            {
                let mut e = s.entries.write().unwrap_or_else(|e| e.into_inner());
                let mut ev = Some(first);
                while let Some(mut x) = ev {
                    match x.key.strip_prefix(&prefix) {
                        Some(k) => x.key = k.to_string(),
                        None => {
                            ev = rx.try_recv().ok();
                            continue;
                        }
                    }
                    if e.apply(&x, &*decode) {
                        changed = true;
                        let _ = s.changes.send(Change::Key(x.key.clone()));
                    }
                    ev = rx.try_recv().ok();
                }
            }
            if changed {
                bump();
            }
        }
        // The watch ended (etcd lost its leader, the connection broke, compaction):
        // resume from the last revision seen.
        resume = Some(s.entries.read().unwrap_or_else(|e| e.into_inner()).revision);
        if set_synced(false) {
            bump();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: EventKind, key: &str, value: &str, revision: i64) -> WatchEvent {
        WatchEvent {
            revision,
            kind,
            key: key.into(),
            value: value.as_bytes().to_vec(),
        }
    }

    fn num(_: &str, v: &[u8]) -> Option<i64> {
        std::str::from_utf8(v).ok()?.parse().ok()
    }

    #[test]
    fn events_older_than_the_entry_change_nothing() {
        let mut e = Entries {
            map: BTreeMap::from([("a".to_string(), (1, 10))]),
            revision: 12,
            synced: true,
        };
        // A listing at 12 raced a watch replaying from 5.
        assert!(!e.apply(&ev(EventKind::Put, "a", "0", 7), &num));
        assert!(!e.apply(&ev(EventKind::Delete, "a", "", 9), &num));
        assert_eq!(e.map["a"], (1, 10));
        // A key put and deleted within the replay ends absent.
        assert!(e.apply(&ev(EventKind::Put, "b", "2", 8), &num));
        assert!(e.apply(&ev(EventKind::Delete, "b", "", 11), &num));
        assert!(!e.map.contains_key("b"));
        assert!(e.apply(&ev(EventKind::Put, "a", "5", 13), &num));
        assert_eq!(e.map["a"], (5, 13));
        assert_eq!(e.revision, 13);
        // A value that does not decode removes the key.
        assert!(e.apply(&ev(EventKind::Put, "a", "x", 14), &num));
        assert!(e.map.is_empty());
    }
}
