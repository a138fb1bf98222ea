//! Each other host's VMs as DRS sees them, kept between snapshots: a host's list is
//! derived again only when the cache's change feed names one of that host's keys (a
//! VM record, a pool, its maintenance flag), or everything when the cache listed its
//! prefix again or this reader fell behind. A VM start's admission in a mass power-on
//! then re-derives the one host that changed, not every VM record of the cluster.

use crate::drs::host_vms;
use ferry_drs::pools::Usage;
use ferry_drs::Vm as DrsVm;
use ferry_host::cache::{Change, ClusterCache};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use tokio::sync::broadcast::error::TryRecvError;
use tokio::sync::broadcast::Receiver;

/// One host's VMs as DRS sees them, and the memory its running VMs hold per resource
/// pool (what a start's pool admission adds up).
pub(crate) struct HostView {
    /// In name order (the cache's key order).
    pub vms: Vec<DrsVm>,
    pub usage: Usage,
}

impl HostView {
    /// Whether VM `name` is among them.
    pub fn lists(&self, name: &str) -> bool {
        self.vms
            .binary_search_by(|v| v.name.as_str().cmp(name))
            .is_ok()
    }
}

#[derive(Default)]
pub(crate) struct DrsViews {
    /// The cache's change feed, subscribed before the first derivation (so no change
    /// between a derivation and the next drain is missed).
    feed: Option<Receiver<Change>>,
    hosts: HashMap<String, Arc<HostView>>,
    /// Hosts derived since this host started (what the benchmark reports).
    pub derived: u64,
    /// Derive every host at every call (the path before views were kept): only the
    /// benchmark sets it, to print both side by side.
    pub always_all: bool,
}

/// Which hosts the changes drained from `feed` touch; None: any may have changed.
fn drain(feed: &mut Receiver<Change>) -> Option<HashSet<String>> {
    let mut dirty = HashSet::new();
    loop {
        match feed.try_recv() {
            Ok(Change::Key(k)) => {
                dirty.insert(k.split('/').next().unwrap_or_default().to_string());
            }
            Ok(Change::All) | Err(TryRecvError::Lagged(_)) | Err(TryRecvError::Closed) => {
                return None
            }
            Err(TryRecvError::Empty) => return Some(dirty),
        }
    }
}

impl DrsViews {
    /// The VMs of `hosts` as DRS sees them, derived anew for those that changed.
    pub fn refresh(
        &mut self,
        cache: &ClusterCache,
        hosts: &[String],
    ) -> HashMap<String, Arc<HostView>> {
        let dirty = match &mut self.feed {
            Some(_) if self.always_all => None,
            Some(f) => drain(f),
            None => None,
        };
        let dirty = match dirty {
            Some(d) => d,
            None => {
                // First use, a relisted cache or a reader left behind: all anew.
                self.feed = Some(cache.hosts.changes());
                self.hosts.clear();
                HashSet::new()
            }
        };
        self.hosts
            .retain(|h, _| hosts.contains(h) && !dirty.contains(h));
        let mut out = HashMap::with_capacity(hosts.len());
        for h in hosts {
            let view = match self.hosts.get(h) {
                Some(v) => v.clone(),
                None => {
                    let pools = cache.pools_of(h).iter().map(|p| (**p).clone()).collect();
                    let recs = cache.vms_of(h);
                    let vms = host_vms(h, pools, recs.iter().map(|r| &**r));
                    let usage = Usage::of_vms(&vms, "");
                    let v = Arc::new(HostView { vms, usage });
                    self.derived += 1;
                    self.hosts.insert(h.clone(), v.clone());
                    v
                }
            };
            out.insert(h.clone(), view);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_host::records::VmRecord;
    use ferry_store::{keys, Store, StoreJson};
    use std::time::Duration;

    async fn put_vm(root: &Arc<dyn Store>, host: &str, name: &str) {
        let spec: ferry_types::VmSpec = serde_json::from_value(serde_json::json!({
            "name": name,
            "memory_mib": 64,
        }))
        .unwrap();
        let key = format!("{}{name}", keys::cluster::of_host(host, keys::host::VMS));
        root.put_json(&key, &VmRecord::new(1, spec)).await.unwrap();
    }

    async fn settle(cache: &ClusterCache, generation: u64) {
        let t = tokio::time::Instant::now();
        while cache.hosts.generation() == generation && t.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn names(v: &HashMap<String, Arc<HostView>>, host: &str) -> Vec<String> {
        let mut n: Vec<String> = v[host].vms.iter().map(|v| v.name.clone()).collect();
        n.sort();
        n
    }

    /// Views are derived once, kept while nothing changes, and derived again only for
    /// the host whose record changed; a host left out is dropped.
    #[tokio::test]
    async fn only_the_host_that_changed_is_derived_again() {
        let d = tempfile::tempdir().unwrap();
        let root: Arc<dyn Store> =
            Arc::new(ferry_store::SqliteStore::open(&d.path().join("c.db")).unwrap());
        put_vm(&root, "h1", "a").await;
        put_vm(&root, "h2", "b").await;
        let cache = ClusterCache::start(root.clone());
        assert!(cache.wait_synced(Duration::from_secs(10)).await);
        let hosts = ["h1".to_string(), "h2".to_string()];
        let mut views = DrsViews::default();
        let v = views.refresh(&cache, &hosts);
        assert_eq!(
            (names(&v, "h1"), names(&v, "h2")),
            (vec!["a".into()], vec!["b".into()])
        );
        assert_eq!(views.derived, 2);
        assert!(v["h2"].lists("b") && !v["h2"].lists("a"));
        views.refresh(&cache, &hosts);
        assert_eq!(views.derived, 2, "nothing changed, nothing derived");

        let g = cache.hosts.generation();
        put_vm(&root, "h2", "c").await;
        settle(&cache, g).await;
        let v = views.refresh(&cache, &hosts);
        assert_eq!(names(&v, "h2"), vec!["b".to_string(), "c".to_string()]);
        assert_eq!(views.derived, 3, "h2 alone derived again");
        assert!(v["h2"].lists("c") && v["h2"].lists("b"));

        let g = cache.hosts.generation();
        root.delete(&format!(
            "{}a",
            keys::cluster::of_host("h1", keys::host::VMS)
        ))
        .await
        .unwrap();
        settle(&cache, g).await;
        let v = views.refresh(&cache, &hosts[..1]);
        assert!(names(&v, "h1").is_empty());
        assert!(!v.contains_key("h2"));
        assert_eq!(views.derived, 4);
    }
}
