//! One host's VM runtime: the VM definitions in the store, turned into QEMU processes
//! and back (start, shutdown, stop, reboot, pause, resume, delete, edit), each QEMU
//! supervised over QMP, the serial consoles, storage (dir, shared and replicated pools,
//! shared-volume locks), snapshots, clones, suspend, hot-plug, long operations as tasks,
//! the event log, users and grants, and the link to the other hosts of a cluster (their
//! list and an HTTPS client to their APIs). QEMU runs detached: a restarted host
//! re-adopts every VM from its run dir (`{run_dir}/{vm id}/`).
//!
//! The cluster side (`ferry-cluster`: lease, HA, DRS, membership) and migrations
//! (`ferry-migration`) build on [`Host`]; what the runtime needs to know of the cluster
//! side comes through [`ClusterView`], never by calling up.
//!
//! Lifecycle operations on one VM are serialised by that VM's operation lock; the
//! supervisor task of a running VM follows QMP events and notices QEMU's exit.

pub mod access;
pub mod audit;
pub mod backup;
pub mod backup_jobs;
pub mod backup_sync;
pub mod blockdev;
pub mod boot_check;
pub mod cache;
pub mod caps;
pub mod cgroups;
pub mod clones;
pub mod confine;
pub mod console;
pub mod devices;
pub mod error;
pub mod events;
pub mod exit;
#[cfg(any(test, feature = "fake"))]
pub mod fake;
pub mod file_restore;
pub mod gate;
pub mod guest_agent;
pub mod history;
pub mod lifecycle;
pub mod link;
pub mod listing;
pub mod live_restore;
pub mod locks;
pub mod loops;
pub mod maintenance;
pub mod metrics;
pub mod os;
pub mod ova;
pub mod pools;
pub mod power;
pub mod records;
pub mod repair;
pub mod replication;
pub mod respools;
pub mod runtime;
pub mod snapshots;
pub mod suspend;
pub mod tasks;
#[cfg(test)]
mod tests;
pub mod tpm;
pub mod transfer;
pub mod vms;

pub use access::host_token_id;
pub use cgroups::Cgroups;
pub use console::Console;
pub use error::{AgentError, ErrorClass, Failure, Refusal, Result};
pub use events::EventLog;
pub use ferry_types::HostInfo;
pub use link::{check_forwarded, ClusterLink, Peer};
pub use os::{HostOs, RealOs};
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
    /// While this host tends etcd: how long a voter may be down before another host
    /// is voted in its place.
    pub voter_replace_after: std::time::Duration,
    /// The file-restore helper VM's image: a folder with `vmlinux` and `initrd.img`
    /// (`ferry backup files`).
    pub file_restore_image: PathBuf,
    /// Where the kernel says which boot of the machine this is
    /// (`/proc/sys/kernel/random/boot_id`): the first daemon start of a boot starts the
    /// VMs the host brings back (`power.rs`). None: no boot handling (tests).
    pub boot_id_file: Option<PathBuf>,
    /// The CPU models VMs may use here (empty: every model this host's QEMU runs): a
    /// cluster's common baseline, like vSphere's EVC.
    pub cpu_models: Vec<String>,
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

/// What the VM runtime needs to know of the cluster side, answered by the subsystem that
/// owns it (the lease keeper in `ferry-cluster`).
pub trait ClusterView: Send + Sync {
    /// Whether this host holds its cluster lease now, so HA VMs may run here.
    fn holds_lease(&self) -> bool;
}

struct Inner {
    cfg: AgentConfig,
    /// What the runtime does to the machine goes through here.
    os: Arc<dyn HostOs>,
    accel: Accel,
    store: Arc<dyn Store>,
    events: EventLog,
    tasks: Tasks,
    slots: Mutex<HashMap<String, Arc<runtime::Slot>>>,
    qemu_version: String,
    /// What this host can run (its QEMU's CPU models and machine types).
    caps: Option<ferry_types::HostCaps>,
    /// The etcd cluster this host belongs to.
    cluster: Option<link::ClusterLink>,
    /// The cluster side's answers (set once, when the cluster side starts).
    view: std::sync::OnceLock<Arc<dyn ClusterView>>,
    /// The background tasks' last runs and errors.
    loops: loops::Loops,
    /// Where resource pools are enforced.
    cgroups: cgroups::Cgroups,
    /// This host's copies of replicated volumes (etcd clusters).
    replication: std::sync::OnceLock<Arc<ferry_replica::Service>>,
    /// The last hour of load per VM and for the host (the web UI's graphs).
    history: Mutex<history::History>,
    /// The cluster's hosts as last read, for checking peers' certificates (kept when
    /// the store cannot be read).
    known_hosts: Mutex<Option<(std::time::Instant, Vec<ferry_types::ClusterHost>)>>,
    /// Wrong passwords per user in the current minute.
    login_failures: Mutex<access::LoginFailures>,
    /// Live-restores served and followed.
    restores: Mutex<live_restore::Restores>,
    /// File-restore helper VMs, and the start of one at a time.
    file_restores: Mutex<file_restore::FileRestores>,
    file_restore_start: tokio::sync::Mutex<()>,
    /// Boot checks running (their slots).
    boot_checks: Mutex<std::collections::HashSet<usize>>,
    /// The first daemon start since the machine booted (`power.rs`), and the boot id
    /// recorded before this start.
    rebooted: bool,
    prev_boot: Option<String>,
    /// One host-wide boot or shutdown of the VMs at a time.
    power: tokio::sync::Mutex<()>,
    /// Shutting the VMs down for the host's shutdown: nothing starts.
    shutting_down: std::sync::atomic::AtomicBool,
}

/// One host's VM runtime. Cheap to clone.
#[derive(Clone)]
pub struct Host {
    inner: Arc<Inner>,
}

impl Host {
    /// Opens the host on `store` (its subtree in etcd when `cluster` is given): makes
    /// the default pool, starts the replication service, re-adopts every VM and repairs
    /// what an interrupted operation left. The background loops of the runtime
    /// (history, serial logs) start here; the cluster side starts its own.
    pub async fn open(
        cfg: AgentConfig,
        store: Arc<dyn Store>,
        cluster: Option<ClusterLink>,
    ) -> Result<Host> {
        Host::open_on(cfg, store, cluster, Arc::new(RealOs)).await
    }

    /// [`Host::open`] on the machine `os` stands for (a fake one in tests).
    pub async fn open_on(
        cfg: AgentConfig,
        store: Arc<dyn Store>,
        cluster: Option<ClusterLink>,
        os: Arc<dyn HostOs>,
    ) -> Result<Host> {
        for d in [&cfg.state_dir, &cfg.run_dir] {
            std::fs::create_dir_all(d).map_err(|source| AgentError::Io {
                what: format!("Create {}", d.display()),
                source,
            })?;
        }
        let accel = ferry_qemu::detect_accel(cfg.accel);
        if let Some(c) = &cluster {
            // The cluster cache starts listing and watching now, ready for the first
            // request.
            c.cache();
        }
        let local = local_store(&cfg.state_dir, &store, cluster.is_some()).await?;
        let events = EventLog::load(local.clone()).await?;
        let tasks = Tasks::load(local, events.clone()).await?;
        let qemu_version = qemu_version(&cfg.qemu_binary).await;
        let mut caps = os
            .probe_caps(&cfg.qemu_binary, accel, &cfg.run_dir, &cfg.cpu_models)
            .await;
        // Guests of other architectures: by emulation, where their QEMU is installed.
        if let Some(c) = caps.as_mut() {
            for arch in ferry_types::arch::ARCHES {
                if arch.as_str() == c.arch {
                    continue;
                }
                let bin = caps::binary_for(&cfg.qemu_binary, arch);
                if !caps::installed(&bin) {
                    continue;
                }
                if let Some(o) = os.probe_caps(&bin, Accel::Tcg, &cfg.run_dir, &[]).await {
                    c.others.push(o);
                }
            }
        }
        let (rebooted, prev_boot) = Host::read_boot(&cfg);
        let cgroups = os.cgroups(&cfg.resources.cgroup_root);
        tracing::info!(cgroups = %cgroups.describe(), "resource pools");
        let host = Host {
            inner: Arc::new(Inner {
                cfg,
                os,
                accel,
                store,
                events,
                tasks,
                slots: Mutex::new(HashMap::new()),
                qemu_version,
                caps,
                cluster,
                view: Default::default(),
                loops: Default::default(),
                cgroups,
                replication: Default::default(),
                history: Default::default(),
                known_hosts: Mutex::new(None),
                login_failures: Mutex::new(Default::default()),
                restores: Mutex::new(Default::default()),
                file_restores: Mutex::new(Default::default()),
                file_restore_start: Default::default(),
                boot_checks: Default::default(),
                rebooted,
                prev_boot,
                power: Default::default(),
                shutting_down: Default::default(),
            }),
        };
        host.open_dirs_to_qemu();
        host.ensure_default_pool().await?;
        host.publish_caps().await?;
        host.start_replication().await?;
        // before any request: a check an earlier run left is not a new one's
        host.sweep_boot_checks().await;
        host.adopt_all().await?;
        host.repair().await?;
        // in the background: a store on a share that hangs must not hold the start up
        tokio::spawn({
            let h = host.clone();
            async move { h.sweep_backups().await }
        });
        tokio::spawn(host.clone().history_loop());
        tokio::spawn(host.clone().backup_jobs_loop());
        tokio::spawn(host.clone().serial_log_loop());
        tokio::spawn(host.clone().file_restore_loop());

        tracing::info!(%accel, "host runtime ready");
        Ok(host)
    }

    /// Hands the runtime the cluster side's answers (once; later calls are ignored).
    pub fn set_view(&self, view: Arc<dyn ClusterView>) {
        let _ = self.inner.view.set(view);
    }

    /// Whether HA VMs may run here: always outside an etcd cluster; in one, only while
    /// the cluster side says this host holds its lease (never before it has said so).
    pub fn holds_lease(&self) -> bool {
        if self.inner.cluster.is_none() {
            return true;
        }
        self.inner.view.get().is_some_and(|v| v.holds_lease())
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

    /// How this host runs VMs.
    pub fn cfg(&self) -> &AgentConfig {
        &self.inner.cfg
    }

    /// This host's store (its subtree in etcd in a cluster).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// The etcd cluster this host belongs to, if any.
    pub fn cluster(&self) -> Option<&ClusterLink> {
        self.inner.cluster.as_ref()
    }

    /// The background tasks' last runs and errors (every subsystem reports here).
    pub fn loops(&self) -> &loops::Loops {
        &self.inner.loops
    }

    /// The machine this runtime drives (the real one, or a fake in tests).
    pub fn os(&self) -> &dyn HostOs {
        &*self.inner.os
    }

    /// Where resource pools are enforced.
    pub fn cgroups(&self) -> &cgroups::Cgroups {
        &self.inner.cgroups
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
            // Migrations are a layer above the runtime: it fills them in.
            migrations: Vec::new(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            units: if ferry_systemd::booted() {
                tokio::task::spawn_blocking(|| ferry_systemd::units("ferry*"))
                    .await
                    .ok()
                    .and_then(|r| r.ok())
                    .unwrap_or_default()
                    .into_iter()
                    .map(|u| ferry_types::HostUnit {
                        unit: u.unit,
                        active: u.active,
                        sub: u.sub,
                    })
                    .collect()
            } else {
                vec![]
            },
            ports: self.ports(),
            cgroups: self.inner.cgroups.describe(),
            shutting_down: self.shutting_down(),
            caps: self.caps().cloned(),
        })
    }

    /// The ports this host serves, with what uses each.
    fn ports(&self) -> Vec<ferry_types::HostPort> {
        let p = |port: String, what: &str| ferry_types::HostPort {
            port,
            what: what.to_string(),
        };
        let mut out = vec![p(
            self.inner.cfg.api_port.to_string(),
            "the API and web UI (HTTPS; other hosts' calls with their certificates)",
        )];
        if self.inner.cluster.is_some() {
            out.push(p(
                self.inner.cfg.replication_port.to_string(),
                "replicated pools' copies (mutual TLS, from the other hosts)",
            ));
            out.push(p(
                "2379".into(),
                "etcd clients (on etcd voters; mutual TLS, from the other hosts)",
            ));
            out.push(p(
                "2380".into(),
                "etcd peers (on etcd voters; mutual TLS, from the other voters)",
            ));
        }
        let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .map(|r| r.split_whitespace().collect::<Vec<_>>().join("-"))
            .filter(|r| !r.is_empty())
            .unwrap_or_else(|| "32768-60999".into());
        out.push(p(
            range,
            "live migration and storage moves (QEMU's streams, TLS; ephemeral ports, from the other hosts)",
        ));
        out
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
pub fn meminfo(key: &str) -> u64 {
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

/// Where the host keeps what is its alone and changes often (the event log and the
/// tasks): in a cluster a SQLite file of its own (`local.db`), so neither churns etcd's
/// history nor reaches every host's watch; alone, its one store. Records an older
/// version left in the cluster store move over once.
pub(crate) async fn local_store(
    state_dir: &std::path::Path,
    store: &Arc<dyn Store>,
    in_cluster: bool,
) -> Result<Arc<dyn Store>> {
    if !in_cluster {
        return Ok(store.clone());
    }
    let local: Arc<dyn Store> =
        Arc::new(ferry_store::SqliteStore::open(&state_dir.join("local.db"))?);
    for prefix in [
        ferry_store::keys::host::EVENTS,
        ferry_store::keys::host::TASKS,
    ] {
        let old = store.list(prefix).await?;
        if old.is_empty() {
            continue;
        }
        // Every record the host's own store lacks, in one transaction; only then the
        // cluster's copies go (a crash in between copies nothing twice, loses nothing).
        let have: std::collections::BTreeSet<String> = local
            .list(prefix)
            .await?
            .into_iter()
            .map(|kv| kv.key)
            .collect();
        let success = old
            .iter()
            .filter(|kv| !have.contains(&kv.key))
            .map(|kv| ferry_store::Op::Put {
                key: kv.key.clone(),
                value: kv.value.clone(),
                lease: None,
            })
            .collect();
        local
            .txn(ferry_store::Txn {
                success,
                ..Default::default()
            })
            .await?;
        store
            .txn(ferry_store::Txn {
                success: vec![ferry_store::Op::DeletePrefix(prefix.to_string())],
                ..Default::default()
            })
            .await?;
        tracing::info!(prefix, records = old.len(), "moved to the host's own store");
    }
    Ok(local)
}
