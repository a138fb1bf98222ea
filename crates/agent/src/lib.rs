//! The per-host agent: owns the VM definitions in the store, turns them into QEMU
//! processes and back (start, shutdown, stop, reboot, pause, resume, delete, edit),
//! supervises each QEMU over QMP, holds the serial consoles, runs long operations as
//! tasks and keeps the event log. QEMU runs detached: a restarted agent re-adopts every
//! VM from its run dir (`{run_dir}/{vm id}/`).
//!
//! Request flow: API handler → [`Agent`] method → (store, storage, net, qemu, qmp).
//! Lifecycle operations on one VM are serialised by that VM's operation lock; the
//! supervisor task of a running VM follows QMP events and notices QEMU's exit.

mod access;
pub mod audit;
mod cgroups;
mod clones;
mod cluster;
pub mod confine;
mod console;
mod devices;
mod drs;
mod error;
mod events;
mod exit;
mod gate;
mod history;
mod lifecycle;
mod locks;
mod loops;
mod maintenance;
mod metrics;
mod migration;
mod movedisk;
mod pools;
mod records;
mod repair;
mod replication;
mod respools;
mod runtime;
mod snapshots;
mod suspend;
mod tasks;
mod vms;

pub use access::host_token_id;
pub use cgroups::Cgroups;
pub use cluster::lease::{kill_ha_qemus, run_watchdog};
pub use cluster::{
    check_forwarded, connect as connect_cluster, load_config as load_cluster_config, ClusterLink,
};
pub use console::Console;
pub use error::{AgentError, ErrorClass, Result};
pub use events::EventLog;
pub use ferry_types::HostInfo;
pub use maintenance::plan_evacuation;
pub use migration::ColdPiece;
pub use tasks::{TaskCtx, Tasks};

pub use ferry_qemu::{Accel, AccelSetting};
use ferry_store::Store;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// How this host runs VMs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Store, pools, per-VM state (UEFI vars).
    pub state_dir: PathBuf,
    /// Per-VM run dirs (sockets, pidfiles).
    pub run_dir: PathBuf,
    pub accel: AccelSetting,
    pub qemu_binary: String,
    /// This host's name in the cluster.
    pub host_name: String,
    /// The cluster file (hosts, their APIs and migration addresses) of a static
    /// cluster; an etcd cluster's members come from etcd instead.
    pub cluster_file: Option<PathBuf>,
    /// The port of this daemon's API (for the API URL other hosts use).
    pub api_port: u16,
    /// What DRS plans with on this host, and where resource pools live.
    pub resources: HostResources,
    /// The TCP port of the replication service (replicated pools), on the host's
    /// cluster address.
    pub replication_port: u16,
    /// This host's certificate and the cluster CA (`{state_dir}/pki`): every
    /// host-to-host link is mutual TLS with them.
    pub pki: ferry_pki::HostPki,
}

/// The default port of the replication service.
pub const REPLICATION_PORT: u16 = 7790;

/// This host's size and labels for DRS, and its cgroup tree for resource pools.
#[derive(Debug, Clone)]
pub struct HostResources {
    /// Cores DRS plans with (default: the machine's).
    pub cpus: Option<f64>,
    /// Memory DRS plans with (default: the machine's).
    pub memory_bytes: Option<u64>,
    /// Labels VMs can require (`placement.host_labels`).
    pub labels: Vec<String>,
    /// Name of the cgroup directory holding the resource pools.
    pub cgroup_root: String,
}

impl Default for HostResources {
    fn default() -> Self {
        HostResources {
            cpus: None,
            memory_bytes: None,
            labels: vec![],
            cgroup_root: "ferry".into(),
        }
    }
}

struct Inner {
    cfg: AgentConfig,
    accel: Accel,
    store: Arc<dyn Store>,
    events: EventLog,
    tasks: Tasks,
    slots: Mutex<HashMap<String, Arc<runtime::Slot>>>,
    qemu_version: String,
    /// Outgoing live migrations: VM → (destination, QEMU's last status).
    outgoing: Mutex<HashMap<String, (String, String)>>,
    /// Incoming live migrations: VM → (id, spec), for the claim at switchover.
    claims: Mutex<HashMap<String, (u32, ferry_types::VmSpec)>>,
    /// The etcd cluster this host belongs to.
    cluster: Option<cluster::ClusterLink>,
    lease: Mutex<cluster::lease::LeaseState>,
    restarts: Mutex<cluster::ha::Restarts>,
    /// When the HA manager last read every VM record.
    full_round: Mutex<Option<std::time::Instant>>,
    /// The background tasks' last runs and errors.
    loops: loops::Loops,
    /// VMs the HA manager could not place last round, with the reason.
    ha_no_place: Mutex<std::collections::BTreeMap<String, String>>,
    restart: tokio::sync::Notify,
    /// Smoothed CPU load of this host's VMs (DRS).
    loads: Mutex<drs::LoadTracker>,
    /// Where resource pools are enforced.
    cgroups: cgroups::Cgroups,
    /// This host's agent was the HA manager at its last round (DRS runs there).
    is_manager: std::sync::atomic::AtomicBool,
    /// This host's copies of replicated volumes (etcd clusters).
    replication: std::sync::OnceLock<Arc<ferry_replica::Service>>,
    /// The last hour of load per VM and for the host (the web UI's graphs).
    history: Mutex<history::History>,
    /// The cluster's hosts as last read, for checking peers' certificates (kept when
    /// the store cannot be read).
    known_hosts: Mutex<Option<(std::time::Instant, Vec<ferry_types::ClusterHost>)>>,
    /// Join attempts in the current minute (a limit on guessing join tokens).
    join_attempts: Mutex<(std::time::Instant, u32)>,
    /// Wrong passwords per user in the current minute.
    login_failures: Mutex<access::LoginFailures>,
}

/// The agent. Cheap to clone.
#[derive(Clone)]
pub struct Agent {
    inner: Arc<Inner>,
}

impl Agent {
    /// Opens the agent on `store`: makes the default pool, then re-adopts every VM.
    pub async fn open(cfg: AgentConfig, store: Arc<dyn Store>) -> Result<Agent> {
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
        store: Arc<dyn Store>,
        cluster: Option<ClusterLink>,
    ) -> Result<Agent> {
        for d in [&cfg.state_dir, &cfg.run_dir] {
            std::fs::create_dir_all(d).map_err(|source| AgentError::Io {
                what: format!("Create {}", d.display()),
                source,
            })?;
        }
        let accel = ferry_qemu::detect_accel(cfg.accel);
        let events = EventLog::load(store.clone()).await?;
        let tasks = Tasks::load(store.clone(), events.clone()).await?;
        let qemu_version = qemu_version(&cfg.qemu_binary).await;
        let cgroups = cgroups::Cgroups::detect(&cfg.resources.cgroup_root);
        tracing::info!(cgroups = %cgroups.describe(), "resource pools");
        let agent = Agent {
            inner: Arc::new(Inner {
                cfg,
                accel,
                store,
                events,
                tasks,
                slots: Mutex::new(HashMap::new()),
                qemu_version,
                outgoing: Mutex::new(HashMap::new()),
                claims: Mutex::new(HashMap::new()),
                cluster,
                lease: Mutex::new(Default::default()),
                restarts: Mutex::new(Default::default()),
                full_round: Mutex::new(None),
                loops: Default::default(),
                ha_no_place: Mutex::default(),
                restart: tokio::sync::Notify::new(),
                loads: Mutex::new(Default::default()),
                cgroups,
                is_manager: Default::default(),
                replication: Default::default(),
                history: Default::default(),
                known_hosts: Mutex::new(None),
                join_attempts: Mutex::new((std::time::Instant::now(), 0)),
                login_failures: Mutex::new(Default::default()),
            }),
        };
        agent.open_dirs_to_qemu();
        agent.ensure_default_pool().await?;
        agent.start_replication().await?;
        agent.adopt_all().await?;
        agent.repair().await?;
        agent.recover_migrations().await;
        if agent.inner.cluster.is_some() {
            tokio::spawn(agent.clone().lease_loop());
        }
        tokio::spawn(agent.clone().ha_loop());
        tokio::spawn(agent.clone().load_loop());
        tokio::spawn(agent.clone().history_loop());
        tokio::spawn(agent.clone().serial_log_loop());
        if agent.inner.cluster.is_some() {
            tokio::spawn(agent.clone().drs_loop());
            tokio::spawn(agent.clone().crl_loop());
        }
        tracing::info!(%accel, "agent ready");
        Ok(agent)
    }

    pub fn events(&self) -> &EventLog {
        &self.inner.events
    }

    pub fn tasks(&self) -> &Tasks {
        &self.inner.tasks
    }

    pub fn accel(&self) -> Accel {
        self.inner.accel
    }

    pub async fn host_info(&self) -> Result<HostInfo> {
        let vms = self.list_vms().await?;
        let live = vms.iter().filter(|v| v.state.has_process());
        Ok(HostInfo {
            name: self.host_name().to_string(),
            hostname: nix_hostname(),
            accel: self.inner.accel.to_string(),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_bytes: host_memory_bytes(),
            memory_available_bytes: meminfo("MemAvailable:"),
            vm_memory_bytes: live.clone().map(|v| v.spec.memory_mib << 20).sum(),
            qemu_version: self.inner.qemu_version.clone(),
            vms_running: live.count(),
            vms_defined: vms.len(),
            maintenance: self.in_maintenance().await?,
            cpu_busy: self.host_cpu_busy(),
            background: self.inner.loops.list(),
        })
    }
}

/// An error and its sources, outermost first.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> Vec<String> {
    let mut v = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let m = s.to_string();
        // Some errors repeat their source in their own message: keep it once.
        if !v.last().is_some_and(|l| l.contains(&m)) {
            v.push(m);
        }
        cur = s.source();
    }
    v
}

fn nix_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// MemTotal from /proc/meminfo.
pub fn host_memory_bytes() -> u64 {
    meminfo("MemTotal:")
}

/// A /proc/meminfo figure in bytes.
pub(crate) fn meminfo(key: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

async fn qemu_version(bin: &str) -> String {
    match tokio::process::Command::new(bin)
        .arg("--version")
        .output()
        .await
    {
        Ok(o) => String::from_utf8_lossy(&o.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .to_string(),
        Err(e) => format!("unavailable: {e}"),
    }
}
