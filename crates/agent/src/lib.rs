//! The per-host agent: one host's VM runtime (`ferry-host`) and, on top of it, the
//! cluster side — membership, the host lease and self-fencing, the HA manager, DRS,
//! maintenance, resource pool definitions, certificates — and migrations (live,
//! storage, cold, recovery, Storage vMotion). [`Agent`] is what the API holds; it
//! dereferences to the [`Host`] it runs on.
//!
//! Request flow: API handler → [`Agent`] method → (store, storage, net, qemu, qmp).

mod cluster;
mod drs;
mod maintenance;
mod migration;
mod movedisk;
mod respools;

// The runtime's modules under their old paths, for the cluster side and migrations.
pub use ferry_host::{audit, confine};
pub(crate) use ferry_host::{error, events, exit, gate, records, runtime, tasks};

pub use cluster::lease::{kill_ha_qemus, run_watchdog};
pub use cluster::{connect as connect_cluster, load_config as load_cluster_config};
pub(crate) use ferry_host::meminfo;
pub use ferry_host::{
    check_forwarded, host_memory_bytes, host_token_id, AgentConfig, AgentError, Cgroups,
    ClusterLink, Console, ErrorClass, EventLog, Host, HostInfo, HostResources, Result, TaskCtx,
    Tasks, REPLICATION_PORT,
};
pub use ferry_host::{error_chain, Accel, AccelSetting};
pub use maintenance::plan_evacuation;
pub use migration::ColdPiece;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// What the cluster side and migrations own (the runtime's state is the [`Host`]'s).
struct Inner {
    /// Outgoing live migrations: VM → (destination, QEMU's last status).
    outgoing: Mutex<HashMap<String, (String, String)>>,
    /// Incoming live migrations: VM → (id, spec), for the claim at switchover.
    claims: Mutex<HashMap<String, (u32, ferry_types::VmSpec)>>,
    /// The host lease and the fence clock (the lease keeper's; the runtime asks it
    /// through [`ferry_host::ClusterView`]).
    lease: Arc<cluster::lease::LeaseCell>,
    restarts: Mutex<cluster::ha::Restarts>,
    /// When the HA manager last read every VM record.
    full_round: Mutex<Option<std::time::Instant>>,
    /// VMs the HA manager could not place last round, with the reason.
    ha_no_place: Mutex<std::collections::BTreeMap<String, String>>,
    restart: tokio::sync::Notify,
    /// Smoothed CPU load of this host's VMs (DRS).
    loads: Mutex<drs::LoadTracker>,
    /// This host's agent was the HA manager at its last round (DRS runs there).
    is_manager: std::sync::atomic::AtomicBool,
    /// Join attempts in the current minute (a limit on guessing join tokens).
    join_attempts: Mutex<(std::time::Instant, u32)>,
}

/// The agent. Cheap to clone.
#[derive(Clone)]
pub struct Agent {
    host: Host,
    inner: Arc<Inner>,
}

impl std::ops::Deref for Agent {
    type Target = Host;
    fn deref(&self) -> &Host {
        &self.host
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
        cluster: Option<ClusterLink>,
    ) -> Result<Agent> {
        let lease = Arc::new(cluster::lease::LeaseCell::default());
        let host = Host::open(cfg, store, cluster).await?;
        host.set_view(lease.clone());
        let agent = Agent {
            host,
            inner: Arc::new(Inner {
                outgoing: Mutex::new(HashMap::new()),
                claims: Mutex::new(HashMap::new()),
                lease,
                restarts: Mutex::new(Default::default()),
                full_round: Mutex::new(None),
                ha_no_place: Mutex::default(),
                restart: tokio::sync::Notify::new(),
                loads: Mutex::new(Default::default()),
                is_manager: Default::default(),
                join_attempts: Mutex::new((std::time::Instant::now(), 0)),
            }),
        };
        agent.recover_migrations().await;
        if agent.cluster().is_some() {
            tokio::spawn(agent.clone().lease_loop());
        }
        tokio::spawn(agent.clone().ha_loop());
        tokio::spawn(agent.clone().load_loop());
        if agent.cluster().is_some() {
            tokio::spawn(agent.clone().drs_loop());
            tokio::spawn(agent.clone().crl_loop());
        }
        tracing::info!("agent ready");
        Ok(agent)
    }

    /// The runtime this agent runs on.
    pub fn host(&self) -> &Host {
        &self.host
    }
}
