//! Resource pools (seed 001): defining them cluster-wide, each change checked as a
//! hierarchy against the cluster's capacity by `ferry_drs::pools` (what a host enforces
//! of them: `ferry_host::respools`).

use crate::error::{AgentError, Refusal, Result};
use crate::Cluster;
use ferry_drs::HostState;
use ferry_store::StoreJson;
use ferry_types::ResourcePool;

impl Cluster {
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
            return Err(AgentError::refused(
                Refusal::Exists,
                format!("Resource pool {} already exists", pool.name),
            ));
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
        self.events().emit(
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
            return Err(AgentError::refused(
                Refusal::InUse,
                format!("Resource pool {name} has sub-pools: {}", kids.join(", ")),
            ));
        }
        let (c, _) = self.drs_snapshot().await?;
        let vms: Vec<&str> = c
            .vms
            .iter()
            .filter(|v| v.pool.as_deref() == Some(name))
            .map(|v| v.name.as_str())
            .collect();
        if !vms.is_empty() {
            return Err(AgentError::refused(
                Refusal::InUse,
                format!("Resource pool {name} still holds VMs: {}", vms.join(", ")),
            ));
        }
        let (s, _) = self.shared();
        s.delete(&self.pool_key(name)).await?;
        self.cgroups().remove_pool(name);
        self.events()
            .emit(None, "drs", format!("resource pool {name} deleted"));
        Ok(())
    }
}
