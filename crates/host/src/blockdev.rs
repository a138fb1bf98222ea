//! What the runtime asks QEMU about its block devices, and the store shared by the
//! cluster's hosts.

use crate::Host;
use ferry_store::{keys, Store};

/// Disk `i`'s device in a `query-block` answer (its qdev is `disk{i}`, or a path
/// under `/machine/peripheral/disk{i}/` for virtio devices).
pub fn disk_block(
    blocks: &[ferry_qmp::commands::BlockInfo],
    i: usize,
) -> Option<&ferry_qmp::commands::BlockInfo> {
    let id = format!("disk{i}");
    let dev = format!("/machine/peripheral/disk{i}/");
    blocks.iter().find(|b| {
        b.qdev
            .as_deref()
            .is_some_and(|q| q == id || q.starts_with(&dev))
    })
}

impl Host {
    /// The block node QEMU uses for disk `i` of running VM `vm` (`disk{i}` unless a
    /// pivot renamed it); `disk{i}` when the VM does not run.
    pub async fn disk_node(&self, vm: &str, i: usize) -> String {
        self.disk_nodes(vm, i + 1).await.swap_remove(i)
    }

    /// The block nodes of disks 0..n, from one `query-block`.
    pub async fn disk_nodes(&self, vm: &str, n: usize) -> Vec<String> {
        let blocks = match self.qmp(vm) {
            Ok(qmp) => qmp.run(&ferry_qmp::commands::QueryBlock).await.ok(),
            Err(_) => None,
        };
        (0..n)
            .map(|i| {
                blocks
                    .as_deref()
                    .and_then(|b| disk_block(b, i))
                    .and_then(|b| b.inserted.as_ref().and_then(|i| i.node_name.clone()))
                    .unwrap_or_else(|| format!("disk{i}"))
            })
            .collect()
    }

    /// The store holding cluster-wide settings and its key prefix: etcd's root in a
    /// cluster, this host's store alone.
    pub fn shared(&self) -> (&dyn Store, &'static str) {
        match &self.inner.cluster {
            Some(c) => (c.root.as_ref(), keys::shared::CLUSTER),
            None => (self.inner.store.as_ref(), keys::shared::ALONE),
        }
    }

    /// Cores and memory DRS plans with on this host (`--drs-cpus/--drs-memory`, else
    /// the machine's).
    pub fn capacity(&self) -> (f64, u64) {
        let r = &self.inner.cfg.resources;
        (
            r.cpus.unwrap_or_else(|| {
                std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64)
            }),
            r.memory_bytes.unwrap_or_else(crate::host_memory_bytes),
        )
    }
}
