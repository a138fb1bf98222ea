//! The per-host agent, put together: the host's VM runtime (`ferry-host`), its
//! migrations (`ferry-migration`) and its cluster side (`ferry-cluster`), in that order
//! of dependence — no crate calls one above it. [`Agent`] is what the API holds; it
//! dereferences to the [`Cluster`] side (and through it to the [`Host`]); migrations
//! are reached through [`Cluster::migrations`].
//!
//! Request flow: API handler → [`Agent`] method → (store, storage, net, qemu, qmp).

pub use ferry_cluster::{
    connect as connect_cluster, kill_ha_qemus, load_config as load_cluster_config, plan_evacuation,
    run_watchdog, Cluster,
};
pub use ferry_host::cache::{Change as CacheChange, ClusterCache};
pub use ferry_host::lifecycle::VarsKind;
pub use ferry_host::os::raise_fd_limit;
pub use ferry_host::{
    audit, check_forwarded, confine, error_chain, host_memory_bytes, host_token_id, Accel,
    AccelSetting, AgentConfig, AgentError, Cgroups, ClusterLink, Console, ErrorClass, EventLog,
    Failure, Host, HostInfo, HostResources, Result, TaskCtx, Tasks, REPLICATION_PORT,
};
pub use ferry_migration::{ColdPiece, Migrations};

use std::sync::Arc;

/// The agent. Cheap to clone.
#[derive(Clone)]
pub struct Agent {
    cluster: Cluster,
}

impl std::ops::Deref for Agent {
    type Target = Cluster;
    fn deref(&self) -> &Cluster {
        &self.cluster
    }
}

impl Agent {
    /// Opens the agent on `store`: makes the default pool, then re-adopts every VM.
    pub async fn open(cfg: AgentConfig, store: Arc<dyn ferry_store::Store>) -> Result<Agent> {
        Agent::open_with(cfg, store, None).await
    }

    /// Opens the agent as a member of an etcd cluster: its store is its subtree in
    /// etcd; the host lease, self-fencing and HA run alongside.
    pub async fn open_in_cluster(cfg: AgentConfig, link: ClusterLink) -> Result<Agent> {
        let store = Arc::new(link.host_store());
        Agent::open_with(cfg, store, Some(link)).await
    }

    async fn open_with(
        cfg: AgentConfig,
        store: Arc<dyn ferry_store::Store>,
        link: Option<ClusterLink>,
    ) -> Result<Agent> {
        let host = Host::open(cfg, store, link).await?;
        let mig = Migrations::open(host).await;
        let cluster = Cluster::start(mig);
        tracing::info!("agent ready");
        Ok(Agent { cluster })
    }
}
