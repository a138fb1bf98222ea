//! Resource pools (seed 001): definitions cluster-wide (`/cluster/respools/{name}`, or
//! `/respools/{name}` on a lone host), checked as a hierarchy against the cluster's
//! capacity by `ferry_drs::pools`; on each host the pools with VMs running there become
//! cgroups (`cgroups.rs`) whose limits follow the definitions.

use crate::error::{AgentError, Result};
use crate::records::VmRecord;
use crate::Agent;
use ferry_drs::HostState;
use ferry_store::StoreJson;
use ferry_types::{ResourcePool, VmSpec};

impl Agent {
    fn pool_key(&self, name: &str) -> String {
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

    /// Creates (`create`) or replaces a pool after checking the whole hierarchy with
    /// it against the cluster's capacity; nothing changes when the check fails.
    pub async fn put_resource_pool(
        &self,
        pool: ResourcePool,
        create: bool,
    ) -> Result<ResourcePool> {
        pool.validate()?;
        let mut pools = self.resource_pools().await?;
        let exists = pools.iter().any(|p| p.name == pool.name);
        if create && exists {
            return Err(AgentError::Conflict(format!(
                "Resource pool {} already exists",
                pool.name
            )));
        }
        if !create && !exists {
            return Err(AgentError::NotFound(format!("Resource pool {}", pool.name)));
        }
        pools.retain(|p| p.name != pool.name);
        pools.push(pool.clone());
        let (c, _) = self.drs_snapshot().await?;
        let online = c.hosts.iter().filter(|h| h.state == HostState::Online);
        let (cores, mem) = online.fold((0.0, 0u64), |(a, b), h| (a + h.cpus, b + h.memory_bytes));
        ferry_drs::pools::check(&pools, cores, mem)
            .map_err(|why| AgentError::invalid("resource pool", why))?;
        let (s, _) = self.shared();
        s.put_json(&self.pool_key(&pool.name), &pool).await?;
        self.inner.events.emit(
            None,
            "drs",
            format!(
                "resource pool {} {}",
                pool.name,
                if create { "created" } else { "changed" }
            ),
        );
        self.sync_pool_cgroups().await?;
        Ok(pool)
    }

    /// Deletes a pool that has no sub-pools and no VMs.
    pub async fn delete_resource_pool(&self, name: &str) -> Result<()> {
        let pools = self.resource_pools().await?;
        if !pools.iter().any(|p| p.name == name) {
            return Err(AgentError::NotFound(format!("Resource pool {name}")));
        }
        let kids: Vec<&str> = pools
            .iter()
            .filter(|p| p.parent.as_deref() == Some(name))
            .map(|p| p.name.as_str())
            .collect();
        if !kids.is_empty() {
            return Err(AgentError::Conflict(format!(
                "Resource pool {name} has sub-pools: {}",
                kids.join(", ")
            )));
        }
        let (c, _) = self.drs_snapshot().await?;
        let vms: Vec<&str> = c
            .vms
            .iter()
            .filter(|v| v.pool.as_deref() == Some(name))
            .map(|v| v.name.as_str())
            .collect();
        if !vms.is_empty() {
            return Err(AgentError::Conflict(format!(
                "Resource pool {name} still holds VMs: {}",
                vms.join(", ")
            )));
        }
        let (s, _) = self.shared();
        s.delete(&self.pool_key(name)).await?;
        self.inner.cgroups.remove_pool(name);
        self.inner
            .events
            .emit(None, "drs", format!("resource pool {name} deleted"));
        Ok(())
    }

    /// A VM definition may only name an existing pool.
    pub(crate) async fn check_resource_pool(&self, spec: &VmSpec) -> Result<()> {
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

    /// Puts a freshly started QEMU into its pool's cgroup.
    pub(crate) async fn place_in_pool(&self, rec: &VmRecord, pid: i32) -> Result<()> {
        let Some(pool) = &rec.spec.resource_pool else {
            return Ok(());
        };
        let pools = self.resource_pools().await?;
        let chain = ferry_drs::pools::chain(&pools, pool).map_err(AgentError::Conflict)?;
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
        self.inner
            .cgroups
            .place(&chain, rec.id, pid)
            .map_err(|e| AgentError::Conflict(format!("Resource pool {pool}: {e}")))
    }

    /// Brings this host's pool cgroups in line with the definitions.
    pub(crate) async fn sync_pool_cgroups(&self) -> Result<()> {
        let pools = self.resource_pools().await?;
        let mut used = std::collections::BTreeSet::new();
        for r in self.records().await? {
            if let (Some(p), true) = (&r.spec.resource_pool, r.last_state.has_process()) {
                used.insert(p.clone());
            }
        }
        for p in used {
            if let Ok(chain) = ferry_drs::pools::chain(&pools, &p) {
                self.inner
                    .cgroups
                    .ensure_pools(&chain)
                    .map_err(|e| AgentError::Conflict(format!("Resource pool {p}: {e}")))?;
            }
        }
        Ok(())
    }

    /// Where resource pool limits are enforced on this host.
    pub fn cgroups_info(&self) -> String {
        self.inner.cgroups.describe()
    }
}
