//! A VM's write locks on shared volumes: taken before QEMU opens the disks, given up
//! when it ends, moved to the destination when a live migration completes. Read-only
//! and non-persistent disks (QEMU only reads the volume) take none.

use crate::error::Result;
use crate::records::VmRecord;
use crate::Host;
use ferry_storage::LockDir;
use ferry_types::VmSpec;
use std::collections::BTreeMap;

impl Host {
    /// (lock dir, volume) of every shared volume `spec` writes to.
    pub async fn shared_volumes(&self, spec: &VmSpec) -> Result<Vec<(LockDir, String)>> {
        let mut out = vec![];
        for d in spec
            .disks
            .iter()
            .filter(|d| !d.readonly && !d.nonpersistent)
        {
            if let (Some(locks), Some(vol)) = (self.pool_locks(&d.pool).await?, &d.volume) {
                out.push((locks, vol.clone()));
            }
        }
        Ok(out)
    }

    /// Takes every lock of VM `name` or none (a conflict names the holder). A VM that
    /// HA moved here from a fenced host takes that host's locks over (only while that
    /// host still has no lease). Returns the generations (fencing tokens) got.
    pub async fn lock_disks(
        &self,
        name: &str,
        spec: &VmSpec,
        ha_from: Option<&str>,
    ) -> Result<BTreeMap<String, u64>> {
        let vols = self.shared_volumes(spec).await?;
        let me = self.host_name().to_string();
        let from_fenced = match ha_from {
            Some(h) => self.host_has_no_lease(h).await?,
            None => false,
        };
        // Replicated disks: this host becomes their primary (a fenced host's term is
        // taken over, like its locks).
        self.acquire_replicas(
            spec,
            ha_from
                .filter(|_| from_fenced)
                .map(crate::replication::Takeover::Fenced),
        )
        .await?;
        let mut got = BTreeMap::new();
        for (i, (locks, vol)) in vols.iter().enumerate() {
            let held_by_from = from_fenced
                && locks.read(vol)?.is_some_and(|l| {
                    !l.released && Some(l.host.as_str()) == ha_from && l.vm == name
                });
            let r = if held_by_from {
                locks.transfer(vol, ha_from.unwrap_or_default(), &me)
            } else {
                locks.acquire(vol, &me, name)
            };
            match r {
                Ok(l) => {
                    got.insert(vol.clone(), l.generation);
                }
                Err(e) => {
                    for (l, v) in &vols[..i] {
                        let _ = l.release(v, &me);
                    }
                    self.release_replicas(spec).await;
                    return Err(e.into());
                }
            }
        }
        Ok(got)
    }

    /// In an etcd cluster: true if `host` holds no lease (it has fenced itself).
    async fn host_has_no_lease(&self, host: &str) -> Result<bool> {
        let Some(c) = &self.inner.cluster else {
            return Ok(false);
        };
        let key = ferry_store::keys::cluster::alive(host);
        Ok(c.root.get(&key).await?.is_none())
    }

    /// Storage-side fencing: does this host still hold every lock of `rec` with the
    /// generation it got? A QEMU that survived its host's fencing fails this (HA took
    /// the locks over, bumping the generation) and must not run on.
    pub async fn locks_still_ours(
        &self,
        rec: &VmRecord,
    ) -> Result<std::result::Result<(), String>> {
        let me = self.host_name();
        for (locks, vol) in self.shared_volumes(&rec.spec).await? {
            let Some(want) = rec.lock_generations.get(&vol) else {
                continue;
            };
            match locks.read(&vol)? {
                Some(l) if l.host == me && l.generation == *want && !l.released => {}
                Some(l) => {
                    return Ok(Err(format!(
                        "volume {vol} is now held by host {} (generation {}, ours was {want})",
                        l.host, l.generation
                    )))
                }
                None => return Ok(Err(format!("volume {vol} has no lock any more"))),
            }
        }
        Ok(Ok(()))
    }

    /// Gives up this host's locks of `spec`'s volumes (and its terms as primary of
    /// its replicated volumes).
    pub async fn unlock_disks(&self, spec: &VmSpec) {
        self.release_replicas(spec).await;
        let me = self.host_name().to_string();
        match self.shared_volumes(spec).await {
            Ok(vols) => {
                for (l, v) in vols {
                    if let Err(e) = l.release(&v, &me) {
                        tracing::warn!(volume = %v, error = %e, "cannot release lock");
                    }
                }
            }
            Err(e) => tracing::warn!(vm = %spec.name, error = %e, "cannot release locks"),
        }
    }

    /// Moves `spec`'s locks from host `from` to this host (and the terms as primary of
    /// its replicated volumes); returns "volume@generation".
    pub async fn take_over_locks(&self, spec: &VmSpec, from: &str) -> Result<Vec<String>> {
        let me = self.host_name().to_string();
        let mut out = vec![];
        self.acquire_replicas(spec, Some(crate::replication::Takeover::Handover(from)))
            .await?;
        for (p, v) in self.replicated_disks(spec).await? {
            if let Ok(r) = self.replica_record(&p, &v).await {
                out.push(format!("{p}/{v}@{}", r.generation));
            }
        }
        let mut generations = BTreeMap::new();
        for (l, v) in self.shared_volumes(spec).await? {
            let lock = l.transfer(&v, from, &me)?;
            out.push(format!("{v}@{}:{}", lock.host, lock.generation));
            generations.insert(v, lock.generation);
        }
        self.save_lock_generations(&spec.name, generations).await?;
        Ok(out)
    }
}
