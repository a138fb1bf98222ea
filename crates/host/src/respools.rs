//! Resource pools (seed 001) on this host: the definitions are read from
//! `/cluster/respools/{name}` (or `/respools/{name}` on a lone host; defining them is
//! the cluster side's, which checks the hierarchy against the cluster's capacity); the
//! pools with VMs running here become cgroups (`cgroups.rs`) whose limits follow them.

use crate::error::{AgentError, Refusal, Result};
use crate::records::VmRecord;
use crate::Host;
use ferry_store::StoreJson;
use ferry_types::{ResourcePool, VmSpec};

impl Host {
    pub fn pool_key(&self, name: &str) -> String {
        ferry_store::keys::shared::respool(self.shared().1, name)
    }

    pub async fn resource_pools(&self) -> Result<Vec<ResourcePool>> {
        let (s, p) = self.shared();
        Ok(
            s.list_json::<ResourcePool>(&ferry_store::keys::shared::respools(p))
                .await?,
        )
    }

    pub async fn resource_pool(&self, name: &str) -> Result<ResourcePool> {
        let (s, _) = self.shared();
        s.get_json::<ResourcePool>(&self.pool_key(name))
            .await?
            .map(|(p, _)| p)
            .ok_or_else(|| AgentError::NotFound(format!("Resource pool {name}")))
    }

    /// A VM definition may only name an existing pool.
    pub async fn check_resource_pool(&self, spec: &VmSpec) -> Result<()> {
        if let Some(p) = &spec.resource_pool {
            if self.resource_pool(p).await.is_err() {
                return Err(AgentError::invalid(
                    "resource_pool",
                    format!("resource pool {p} does not exist"),
                ));
            }
        }
        Ok(())
    }

    /// Puts a freshly started QEMU into its pool's cgroup (under systemd: into its
    /// own scope, in its pool's slice if it has a pool).
    pub async fn place_in_pool(&self, rec: &VmRecord, pid: i32) -> Result<()> {
        let Some(pool) = &rec.spec.resource_pool else {
            if self.inner.cgroups.scopes() {
                let cg = self.inner.cgroups.clone();
                let id = rec.id;
                return tokio::task::spawn_blocking(move || cg.place(&[], id, pid))
                    .await
                    .map_err(|e| {
                        AgentError::failed(crate::error::Failure::Internal, e.to_string())
                    })?
                    .map_err(|e| {
                        AgentError::refused_by(Refusal::HostLacks, "A scope for the VM", e)
                    });
            }
            return Ok(());
        };
        let pools = self.resource_pools().await?;
        let chain = ferry_drs::pools::chain(&pools, pool)
            .map_err(|e| AgentError::refused(Refusal::NoRoom, e))?;
        if let crate::Cgroups::None(why) = &self.inner.cgroups {
            self.inner.events.emit(
                Some(&rec.spec.name),
                "drs",
                format!(
                    "resource pool {pool}: limits and shares not enforced on this host ({why})"
                ),
            );
            return Ok(());
        }
        self.inner.cgroups.place(&chain, rec.id, pid).map_err(|e| {
            AgentError::refused_by(Refusal::HostLacks, format!("Resource pool {pool}"), e)
        })
    }

    /// Brings this host's pool cgroups in line with the definitions.
    pub async fn sync_pool_cgroups(&self) -> Result<()> {
        let pools = self.resource_pools().await?;
        let mut used = std::collections::BTreeSet::new();
        for r in self.records().await? {
            if let (Some(p), true) = (&r.spec.resource_pool, r.last_state.has_process()) {
                used.insert(p.clone());
            }
        }
        for p in used {
            if let Ok(chain) = ferry_drs::pools::chain(&pools, &p) {
                self.inner.cgroups.ensure_pools(&chain).map_err(|e| {
                    AgentError::refused_by(Refusal::HostLacks, format!("Resource pool {p}"), e)
                })?;
            }
        }
        Ok(())
    }

    /// Where resource pool limits are enforced on this host.
    pub fn cgroups_info(&self) -> String {
        self.inner.cgroups.describe()
    }
}
