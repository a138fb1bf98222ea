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

    /// Where a VM's QEMU goes (its pool's cgroup; under systemd its scope, in its
    /// pool's slice if it has one): the pool chain, or none when nothing is placed.
    async fn pool_chain(&self, rec: &VmRecord) -> Result<Option<Vec<ResourcePool>>> {
        match &rec.spec.resource_pool {
            None if self.inner.cgroups.scopes() => Ok(Some(vec![])),
            None => Ok(None),
            Some(pool) => {
                let pools = self.resource_pools().await?;
                let chain = ferry_drs::pools::chain(&pools, pool)
                    .map_err(|e| AgentError::refused(Refusal::NoRoom, e))?
                    .into_iter()
                    .cloned()
                    .collect();
                if let crate::Cgroups::None(why) = &self.inner.cgroups {
                    self.inner.events.emit(
                        Some(&rec.spec.name),
                        "drs",
                        format!(
                            "resource pool {pool}: limits and shares not enforced on this host ({why})"
                        ),
                    );
                    return Ok(None);
                }
                Ok(Some(chain))
            }
        }
    }

    /// What places a VM's process before it becomes QEMU (`HostOs::spawn_qemu`).
    #[allow(clippy::type_complexity)]
    pub async fn placement(
        &self,
        rec: &VmRecord,
    ) -> Result<Option<Box<dyn Fn(i32) -> std::result::Result<(), String> + Send + Sync>>> {
        let Some(chain) = self.pool_chain(rec).await? else {
            return Ok(None);
        };
        let what = match &rec.spec.resource_pool {
            Some(p) => format!("resource pool {p}"),
            None => "its scope".to_string(),
        };
        let (cg, id) = (self.inner.cgroups.clone(), rec.id);
        Ok(Some(Box::new(move |pid| {
            cg.place(&chain.iter().collect::<Vec<_>>(), id, pid)
                .map_err(|e| format!("cannot place the VM in {what}: {e}"))
        })))
    }

    /// Puts a running QEMU where it belongs (one an older daemon started elsewhere).
    pub async fn place_in_pool(&self, rec: &VmRecord, pid: i32) -> Result<()> {
        let Some(place) = self.placement(rec).await? else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || place(pid))
            .await
            .map_err(|e| AgentError::failed(crate::error::Failure::Internal, e.to_string()))?
            .map_err(|e| AgentError::refused(Refusal::HostLacks, e))
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
                let chain: Vec<ResourcePool> = chain.into_iter().cloned().collect();
                let cg = self.inner.cgroups.clone();
                tokio::task::spawn_blocking(move || {
                    cg.ensure_pools(&chain.iter().collect::<Vec<_>>())
                })
                .await
                .map_err(|e| AgentError::failed(crate::error::Failure::Internal, e.to_string()))?
                .map_err(|e| {
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
