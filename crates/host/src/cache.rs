//! The cluster as this host sees it, kept in memory from watches on the cluster store:
//! the members, which of them hold a lease, what each publishes for DRS, which the HA
//! manager fenced, and every
//! host's VM records, pool definitions and maintenance flag.
//!
//! Each part is a [`Mirror`]: listed once, then fed by a watch from the listing's
//! revision (re-listed when that history was compacted). Reads take a short lock and
//! never wait on etcd, so what used to read the whole cluster per request (a VM start's
//! admission, a DRS snapshot, a name check, a peer's certificate check, the cluster VM
//! list) costs memory instead of round trips. Decisions that must not act on a stale
//! view still decide in a store transaction (names are reserved by key, HA fences
//! under its lease); the cache only saves the reads around them.

use crate::records::VmRecord;
use ferry_store::keys::cluster as ck;
pub use ferry_store::mirror::Change;
use ferry_store::mirror::Mirror;
use ferry_store::Store;
use ferry_types::{ClusterHost, HostAlive, HostCapacity, HostCaps, PoolSpec};
use std::sync::Arc;
use std::time::Duration;

/// One record of a host's scope the cache keeps.
#[derive(Debug, Clone)]
pub enum HostItem {
    Vm(Arc<VmRecord>),
    Pool(Arc<PoolSpec>),
    Maintenance(bool),
    Caps(Arc<HostCaps>),
}

/// A VM record and the host holding it.
#[derive(Debug, Clone)]
pub struct CachedVm {
    pub host: String,
    pub record: Arc<VmRecord>,
}

/// The mirrors; clones share them.
#[derive(Clone)]
pub struct ClusterCache {
    pub members: Mirror<ClusterHost>,
    pub alive: Mirror<HostAlive>,
    pub loads: Mirror<HostCapacity>,
    /// Hosts the HA manager marked fenced (the value names the manager).
    pub fenced: Mirror<String>,
    /// Keyed `{host}/vms/{name}`, `{host}/pools/{name}`, `{host}/meta/maintenance`.
    pub hosts: Mirror<HostItem>,
}

fn json<T: serde::de::DeserializeOwned>(what: &'static str) -> impl Fn(&str, &[u8]) -> Option<T> {
    move |key, value| match serde_json::from_slice(value) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::warn!(key, what, error = %e, "cache: unreadable record left out");
            None
        }
    }
}

/// What a key under `/hosts/` is to the cache (`None`: not kept: snapshots, intents…).
fn host_item(key: &str, value: &[u8]) -> Option<HostItem> {
    let (_, rest) = key.split_once('/')?;
    let (kind, name) = rest.split_once('/')?;
    let decoded = match (kind, name) {
        ("vms", n) if !n.is_empty() && !n.contains('/') => {
            serde_json::from_slice(value).map(|r| HostItem::Vm(Arc::new(r)))
        }
        ("pools", n) if !n.is_empty() && !n.contains('/') => {
            serde_json::from_slice(value).map(|p| HostItem::Pool(Arc::new(p)))
        }
        ("meta", "maintenance") => serde_json::from_slice(value).map(HostItem::Maintenance),
        ("meta", "caps") => serde_json::from_slice(value).map(|c| HostItem::Caps(Arc::new(c))),
        _ => return None,
    };
    match decoded {
        Ok(item) => Some(item),
        Err(e) => {
            tracing::warn!(key, error = %e, "cache: unreadable host record left out");
            None
        }
    }
}

impl ClusterCache {
    /// Starts mirroring the cluster's keys of `root` (the store at `/ferry`).
    pub fn start(root: Arc<dyn Store>) -> ClusterCache {
        ClusterCache {
            members: Mirror::start(root.clone(), ck::MEMBERS, json("member")),
            alive: Mirror::start(root.clone(), ck::ALIVE, json("liveness")),
            loads: Mirror::start(root.clone(), ck::LOAD, json("load")),
            fenced: Mirror::start(root.clone(), ck::FENCED, json("fence mark")),
            hosts: Mirror::start(root, "/hosts/", host_item),
        }
    }

    /// Whether every part holds a complete listing kept current by its watch.
    pub fn synced(&self) -> bool {
        self.members.synced()
            && self.alive.synced()
            && self.loads.synced()
            && self.fenced.synced()
            && self.hosts.synced()
    }

    /// Waits up to `timeout` for every part to be in sync (start-up: polled).
    pub async fn wait_synced(&self, timeout: Duration) -> bool {
        let until = tokio::time::Instant::now() + timeout;
        while !self.synced() {
            if tokio::time::Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// The members, in name order.
    pub fn members(&self) -> Vec<ClusterHost> {
        self.members
            .read(|e| e.map.values().map(|(h, _)| h.clone()).collect())
    }

    /// The host holding VM `name`, if any host does.
    pub fn vm_host(&self, name: &str) -> Option<String> {
        self.hosts.read(|e| {
            e.map.iter().find_map(|(k, (item, _))| match item {
                HostItem::Vm(_) => {
                    let (host, rest) = k.split_once('/')?;
                    (rest.strip_prefix("vms/") == Some(name)).then(|| host.to_string())
                }
                _ => None,
            })
        })
    }

    /// Every VM record with its host, in host then name order.
    pub fn vms(&self) -> Vec<CachedVm> {
        self.hosts.read(|e| {
            e.map
                .iter()
                .filter_map(|(k, (item, _))| match item {
                    HostItem::Vm(r) => Some(CachedVm {
                        host: k.split_once('/')?.0.to_string(),
                        record: r.clone(),
                    }),
                    _ => None,
                })
                .collect()
        })
    }

    /// Host `host`'s VM records.
    pub fn vms_of(&self, host: &str) -> Vec<Arc<VmRecord>> {
        self.vms_of_at(host).into_iter().map(|(r, _)| r).collect()
    }

    /// Host `host`'s VM records, each with the revision it was written at (what a
    /// compare-and-swap on it compares).
    pub fn vms_of_at(&self, host: &str) -> Vec<(Arc<VmRecord>, i64)> {
        let from = format!("{host}/vms/");
        self.hosts.read(|e| {
            e.map
                .range(from.clone()..)
                .take_while(|(k, _)| k.starts_with(&from))
                .filter_map(|(_, (item, rev))| match item {
                    HostItem::Vm(r) => Some((r.clone(), *rev)),
                    _ => None,
                })
                .collect()
        })
    }

    /// Whether the HA manager marked host `host` fenced.
    pub fn fenced(&self, host: &str) -> bool {
        self.fenced.read(|e| e.map.contains_key(host))
    }

    /// Host `host`'s pool definitions.
    pub fn pools_of(&self, host: &str) -> Vec<Arc<PoolSpec>> {
        let from = format!("{host}/pools/");
        self.hosts.read(|e| {
            e.map
                .range(from.clone()..)
                .take_while(|(k, _)| k.starts_with(&from))
                .filter_map(|(_, (item, _))| match item {
                    HostItem::Pool(p) => Some(p.clone()),
                    _ => None,
                })
                .collect()
        })
    }

    /// Whether host `host` is in maintenance mode.
    pub fn maintenance(&self, host: &str) -> bool {
        self.hosts.read(|e| {
            matches!(
                e.map.get(&format!("{host}/meta/maintenance")),
                Some((HostItem::Maintenance(true), _))
            )
        })
    }

    /// What host `host` can run, as it published at its daemon's start.
    pub fn caps(&self, host: &str) -> Option<Arc<HostCaps>> {
        self.hosts
            .read(|e| match e.map.get(&format!("{host}/meta/caps")) {
                Some((HostItem::Caps(c), _)) => Some(c.clone()),
                _ => None,
            })
    }

    pub fn alive(&self, host: &str) -> Option<HostAlive> {
        self.alive.read(|e| e.map.get(host).map(|(a, _)| a.clone()))
    }

    pub fn load(&self, host: &str) -> Option<HostCapacity> {
        self.loads.read(|e| e.map.get(host).map(|(c, _)| c.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_records_the_cache_uses_are_kept() {
        let pool =
            serde_json::to_vec(&serde_json::json!({"name": "p", "type": "dir", "path": "/x"}))
                .unwrap();
        assert!(matches!(
            host_item("h1/pools/p", &pool),
            Some(HostItem::Pool(_))
        ));
        assert!(matches!(
            host_item("h1/meta/maintenance", b"true"),
            Some(HostItem::Maintenance(true))
        ));
        for (key, value) in [
            ("h1/snapshots/vm/s1", &b"{}"[..]),
            ("h1/intents/7", b"{}"),
            ("h1/meta/next-vm-id", b"7"),
            ("h1/vms/", b"{}"),
            ("h1/vms/a/b", b"{}"),
            ("h1", b"{}"),
            // Unreadable: left out, never a panic.
            ("h1/vms/x", b"{not json"),
            ("h1/meta/maintenance", b"\"yes\""),
            ("h1/meta/caps", b"[]"),
        ] {
            assert!(host_item(key, value).is_none(), "{key}");
        }
    }
}
