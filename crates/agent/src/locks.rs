//! A VM's write locks on shared volumes: taken before QEMU opens the disks, given up
//! when it ends, moved to the destination when a live migration completes. Read-only
//! and non-persistent disks (QEMU only reads the volume) take none.

use crate::error::Result;
use crate::Agent;
use ferry_storage::LockDir;
use ferry_types::VmSpec;

impl Agent {
    /// (lock dir, volume) of every shared volume `spec` writes to.
    pub(crate) async fn shared_volumes(&self, spec: &VmSpec) -> Result<Vec<(LockDir, String)>> {
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

    /// Takes every lock of VM `name` or none (a conflict names the holder).
    pub(crate) async fn lock_disks(&self, name: &str, spec: &VmSpec) -> Result<()> {
        let vols = self.shared_volumes(spec).await?;
        let me = self.host_name().to_string();
        for (i, (locks, vol)) in vols.iter().enumerate() {
            if let Err(e) = locks.acquire(vol, &me, name) {
                for (l, v) in &vols[..i] {
                    let _ = l.release(v, &me);
                }
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// Gives up this host's locks of `spec`'s volumes.
    pub(crate) async fn unlock_disks(&self, spec: &VmSpec) {
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

    /// Moves `spec`'s locks from host `from` to this host; returns "volume@generation".
    pub(crate) async fn take_over_locks(&self, spec: &VmSpec, from: &str) -> Result<Vec<String>> {
        let me = self.host_name().to_string();
        let mut out = vec![];
        for (l, v) in self.shared_volumes(spec).await? {
            let lock = l.transfer(&v, from, &me)?;
            out.push(format!("{v}@{}:{}", lock.host, lock.generation));
        }
        Ok(out)
    }
}
