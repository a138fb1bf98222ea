//! DRS at run time, around the sans-IO engine `ferry-drs`:
//! - every host measures its VMs' CPU load (from /proc, smoothed over the configured
//!   window, so a short spike moves nothing) and publishes it with its capacity and
//!   labels under its lease (`/cluster/load/{host}`);
//! - the snapshot the engine gets: members, leases, maintenance, loads and every VM
//!   record of the cluster (or this host alone);
//! - the HA manager runs a balancing round every `interval_s`: the plan is stored
//!   (`/cluster/drs/plan`, `ferry drs status`) and in automatic mode carried out as live
//!   migrations, within the per-host and cluster limits; migrations under way are kept
//!   in `/cluster/drs/inflight/{vm}`, finished moves in `/cluster/drs/moved/{vm}` (the
//!   hysteresis: a VM is not moved again within `hysteresis_s`);
//! - placement for `vm place`/`vm create --place`, and admission at start (resource
//!   pools, HA admission control).

use crate::error::{AgentError, Failure, Refusal, Result};
use crate::records::Transit;
use crate::records::VmRecord;
use crate::Cluster;
use ferry_drs::{Cluster as DrsCluster, Host as DrsHost, HostState as DrsHostState, Vm as DrsVm};
use ferry_store::{keys, StoreJson};
use ferry_types::{
    AdmissionMode, DrsConfig, DrsMode, DrsMove, DrsPlan, DrsStatus, HostCapacity, HostLoads,
    MigrateRequest, PlacementReport, PoolKind, PoolSpec, ResourcePool, TaskState, VmLoad, VmSpec,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::lease::Alive;
use crate::membership::MANAGER;

const SAMPLE: Duration = Duration::from_secs(2);
/// An unchanged DRS plan is stored again after this long (`drs status`'s `plan_at`).
const PLAN_REFRESH: Duration = Duration::from_secs(600);
/// How long DRS waits for a host's per-VM loads when it balances.
const LOADS_TIMEOUT: Duration = Duration::from_secs(3);
/// Hosts asked for their loads at once.
const LOADS_PARALLEL: usize = 16;
/// The largest load list a host may answer (~100,000 VMs).
const LOADS_MAX_BYTES: usize = 8 << 20;

/// Smoothed CPU load per VM on this host (in memory).
#[derive(Default)]
pub(crate) struct LoadTracker {
    /// VM → (CPU seconds at the last sample, when, smoothed cores).
    vms: HashMap<String, (f64, Instant, f64)>,
    /// What the last sample gave (read by the snapshot; only the loop samples).
    last: BTreeMap<String, VmLoad>,
    /// What this host last wrote to the cluster store, when, under which lease (a new
    /// lease took the old key with it).
    published: Option<(HostCapacity, Instant, ferry_store::LeaseId)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredPlan {
    /// When it was computed (Unix s); an unchanged plan is not stored again for up to
    /// [`PLAN_REFRESH`].
    at: u64,
    plan: DrsPlan,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct InFlight {
    mv: DrsMove,
    task: String,
    at: u64,
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Which pools let a VM move: shared pools reach every host, a replicated pool only
/// the hosts keeping its copies.
#[derive(Debug, Default)]
struct PoolReach {
    shared: BTreeSet<String>,
    replicated: BTreeMap<String, Vec<String>>,
}

fn pool_reach(pools: Vec<PoolSpec>) -> PoolReach {
    let mut r = PoolReach::default();
    for p in pools {
        match p.kind {
            PoolKind::Shared => {
                r.shared.insert(p.name);
            }
            PoolKind::Replicated => {
                r.replicated.insert(p.name, p.hosts);
            }
            PoolKind::Dir => {}
        }
    }
    r
}

/// The engine's view of one VM record. Only VMs whose disks all live on shared or
/// replicated pools can move live without copying storage (the others stay where they
/// are); disks on replicated pools pin the VM to the hosts with copies.
/// Host `name` and its VMs (neither templates nor VMs in transit) as DRS sees them.
fn add_host(
    c: &mut DrsCluster,
    name: &str,
    alive: Option<&Alive>,
    cap: Option<&HostCapacity>,
    maintenance: bool,
    caps: Option<std::sync::Arc<ferry_types::HostCaps>>,
    vms: impl IntoIterator<Item = DrsVm>,
) {
    let mut host = drs_host(name, alive, cap, maintenance);
    host.caps = caps;
    let cpus = host.cpus;
    c.hosts.push(host);
    // A record of an earlier release: each VM's load.
    let per_vm = cap.map(|c| &c.vms).filter(|m| !m.is_empty());
    for mut v in vms {
        if let Some(l) = per_vm.and_then(|m| m.get(&v.name)) {
            v.cpu_load = sane_load(l.cpu, cpus);
        }
        c.vms.push(v);
    }
}

/// Host `name` as DRS sees it: its size, state and labels, and (when each VM's load
/// is not known) the total load it published.
fn drs_host(
    name: &str,
    alive: Option<&Alive>,
    cap: Option<&HostCapacity>,
    maintenance: bool,
) -> DrsHost {
    let (cpus, memory_bytes) = match (cap, alive) {
        (Some(c), _) => (c.cpus, c.memory_bytes),
        (None, Some(a)) => (a.cpus as f64, a.memory_bytes),
        (None, None) => (0.0, 0),
    };
    // The published total (a record of an earlier release: each VM's load).
    let per_vm = cap.map(|c| &c.vms).filter(|m| !m.is_empty());
    DrsHost {
        name: name.to_string(),
        cpus,
        memory_bytes,
        state: match (alive.is_some(), maintenance) {
            (false, _) => DrsHostState::Down,
            (true, true) => DrsHostState::Maintenance,
            (true, false) => DrsHostState::Online,
        },
        labels: cap.map(|c| c.labels.clone()).unwrap_or_default(),
        cpu_base: match (cap, per_vm) {
            (Some(c), None) => sane_load(c.cpu_load, cpus),
            _ => 0.0,
        },
        caps: None,
    }
}

/// Host `host`'s VMs as DRS sees them (neither templates nor VMs in transit), their
/// loads unknown; disks on the host's shared pools may move, disks on replicated pools
/// pin the VM to the hosts with copies.
pub(crate) fn host_vms<'a>(
    host: &str,
    pools: Vec<PoolSpec>,
    recs: impl Iterator<Item = &'a VmRecord>,
) -> Vec<DrsVm> {
    let reach = pool_reach(pools);
    recs.filter(|r| !r.template && Transit::from(&r.transit).is_none())
        .map(|r| drs_vm(r, host, None, &reach))
        .collect()
}

/// A load a host reported, as DRS may use it: finite, not negative, at most the
/// host's cores (a hostile or broken host cannot skew the balance beyond its size).
fn sane_load(cores: f64, cpus: f64) -> f64 {
    if cores.is_finite() {
        cores.clamp(0.0, cpus.max(0.0))
    } else {
        0.0
    }
}

fn drs_vm(rec: &VmRecord, host: &str, load: Option<&VmLoad>, reach: &PoolReach) -> DrsVm {
    let mut rules = rec.spec.placement.clone();
    if let Some(g) = &rec.spec.ha.anti_affinity {
        if !rules.anti_affinity.contains(g) {
            rules.anti_affinity.push(g.clone());
        }
    }
    for d in &rec.spec.disks {
        if let Some(hosts) = reach.replicated.get(&d.pool) {
            if rules.hosts.is_empty() {
                rules.hosts = hosts.clone();
            } else {
                rules.hosts.retain(|h| hosts.contains(h));
                if rules.hosts.is_empty() {
                    // pins and copies do not meet: only where it is stays possible
                    rules.hosts.push(host.to_string());
                }
            }
        }
    }
    let running = rec.last_state.has_process();
    // A crashed HA VM will run again (here or elsewhere): it keeps its room.
    let counts =
        running || (rec.spec.ha.enabled() && rec.last_state == ferry_types::VmState::Crashed);
    DrsVm {
        name: rec.spec.name.clone(),
        host: host.to_string(),
        vcpus: rec.spec.cpus,
        memory_bytes: rec.spec.memory_mib << 20,
        cpu_load: load.map_or(0.0, |l| l.cpu),
        running: counts,
        ha: rec.spec.ha.enabled(),
        rules,
        movable: running
            && rec
                .spec
                .disks
                .iter()
                .all(|d| reach.shared.contains(&d.pool) || reach.replicated.contains_key(&d.pool))
            && !rec.template
            && rec.transit.is_none()
            // the host's own CPU passed through: moved only when an admin asks
            && !rec.spec.cpu.as_deref().is_some_and(ferry_types::cpu::is_passthrough)
            // and never an architecture ferry does not move live
            && rec.spec.arch().live_migrates(),
        pool: rec.spec.resource_pool.clone(),
        cpu_model: rec.spec.cpu.clone(),
        arch: rec.spec.arch(),
        machine: rec.spec.pinned_machine(),
        needs: rec.spec.needs(),
    }
}

/// A VM about to be created, as DRS sees it: with the CPU model its create will pin.
fn spec_vm(spec: &VmSpec, reach: &PoolReach) -> DrsVm {
    let mut rec = VmRecord::new(0, spec.clone());
    rec.spec
        .cpu
        .get_or_insert_with(|| spec.arch().default_cpu().to_string());
    rec.last_state = ferry_types::VmState::Stopped;
    drs_vm(&rec, "", None, reach)
}

impl Cluster {
    pub async fn drs_config(&self) -> Result<DrsConfig> {
        let (s, p) = self.shared();
        Ok(s.get_json::<DrsConfig>(&keys::shared::drs_config(p))
            .await?
            .map(|(c, _)| c)
            .unwrap_or_default())
    }

    pub async fn set_drs_config(&self, cfg: DrsConfig) -> Result<DrsConfig> {
        cfg.validate()?;
        let (s, p) = self.shared();
        s.put_json(&keys::shared::drs_config(p), &cfg).await?;
        self.events().emit(
            None,
            "drs",
            format!(
                "DRS config: mode {:?}, level {}, HA reserve for {} host failures",
                cfg.mode, cfg.level, cfg.ha_host_failures
            )
            .to_lowercase(),
        );
        Ok(cfg)
    }

    /// Measures this host's VMs and (in a cluster) publishes capacity and load.
    #[tracing::instrument(skip_all)]
    pub(crate) async fn load_loop(self) {
        loop {
            tokio::time::sleep(SAMPLE).await;
            let window = self.drs_config().await.map_or(300, |c| c.window_s).max(1);
            let loads = self.sample_loads(window).await;
            let r = self.sync_pool_cgroups().await;
            if let Err(e) = &r {
                tracing::debug!(error = %e, "resource pool cgroups");
            }
            self.loops().report(
                "load",
                SAMPLE,
                r.map_err(|e| crate::error_chain(&e).join(": ")),
            );
            let Some(link) = &self.cluster() else {
                continue;
            };
            let Some(lease) = self.lease_id() else {
                continue;
            };
            let (cpus, memory_bytes) = self.capacity();
            let cap = HostCapacity::summary(
                cpus,
                memory_bytes,
                self.cfg().resources.labels.clone(),
                &loads,
            );
            // Written only when DRS would see a difference (or it is getting old):
            // each write is a revision etcd keeps.
            let due = {
                let t = self
                    .inner
                    .drs
                    .loads
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                let last = t.published.as_ref().filter(|(_, _, l)| *l == lease);
                ferry_drs::publish::republish(
                    last.map(|(c, _, _)| c),
                    &cap,
                    last.map_or(Duration::MAX, |(_, at, _)| at.elapsed()),
                    &ferry_drs::publish::Thresholds::default(),
                )
            };
            if !due {
                continue;
            }
            let key = keys::cluster::load(self.host_name());
            let v = serde_json::to_vec(&cap).expect("serialises");
            match link.root.put(&key, v, Some(lease)).await {
                Ok(_) => {
                    self.inner
                        .drs
                        .loads
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .published = Some((cap, Instant::now(), lease));
                }
                Err(e) => tracing::debug!(error = %e, "publish DRS load"),
            }
        }
    }

    /// CPU load per running VM: the QEMU's CPU time since the last sample, smoothed
    /// exponentially with the window as time constant.
    async fn sample_loads(&self, window_s: u64) -> BTreeMap<String, VmLoad> {
        let mut out = BTreeMap::new();
        let Ok(recs) = self.records().await else {
            return out;
        };
        let now = Instant::now();
        let mut t = self
            .inner
            .drs
            .loads
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut seen = BTreeSet::new();
        for r in recs {
            let name = r.spec.name.clone();
            let Some(pid) = self.slot(&name).with(|rt| rt.pid) else {
                continue;
            };
            let (Some(cpu_s), rss) = (
                ferry_host::metrics::proc_cpu_seconds(pid),
                ferry_host::metrics::proc_rss_bytes(pid).unwrap_or(0),
            ) else {
                continue;
            };
            seen.insert(name.clone());
            let e = t.vms.entry(name.clone()).or_insert((cpu_s, now, 0.0));
            let dt = now.duration_since(e.1).as_secs_f64();
            if dt > 0.0 {
                let inst = ((cpu_s - e.0) / dt).max(0.0);
                let a = (dt / window_s as f64).min(1.0);
                e.2 += a * (inst - e.2);
                *e = (cpu_s, now, e.2);
            }
            out.insert(
                name,
                VmLoad {
                    cpu: e.2,
                    rss_bytes: rss,
                },
            );
        }
        t.vms.retain(|k, _| seen.contains(k));
        t.last = out.clone();
        out
    }

    /// Each running VM's load as this host measured it last (what DRS asks of every
    /// host when it balances).
    pub fn host_loads(&self) -> HostLoads {
        HostLoads {
            host: self.host_name().to_string(),
            vms: self.last_loads(),
        }
    }

    /// How many times other hosts' DRS views were derived (each VM list re-read from
    /// the cache after a change); the benchmark shows it per VM start.
    pub fn drs_views_derived(&self) -> u64 {
        self.views().derived
    }

    /// Whether other hosts' DRS views are kept between snapshots (the default) or
    /// derived anew at every snapshot and a start's admission walks the whole snapshot,
    /// as before views and sums were kept: for the benchmark's side-by-side figures
    /// only.
    pub fn set_drs_views_kept(&self, kept: bool) {
        self.views().always_all = !kept;
    }

    /// The loads of the last sample.
    fn last_loads(&self) -> BTreeMap<String, VmLoad> {
        self.inner
            .drs
            .loads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last
            .clone()
    }

    /// The cluster as DRS sees it (this host alone outside a cluster), and the
    /// resource pools.
    pub(crate) async fn drs_snapshot(&self) -> Result<(DrsCluster, Vec<ResourcePool>)> {
        let pools = self.resource_pools().await?;
        let mut c = DrsCluster::default();
        let Some(link) = &self.cluster() else {
            let (cpus, memory_bytes) = self.capacity();
            let loads = self.last_loads();
            c.hosts.push(DrsHost {
                name: self.host_name().to_string(),
                cpus,
                memory_bytes,
                state: if self.in_maintenance().await? {
                    DrsHostState::Maintenance
                } else {
                    DrsHostState::Online
                },
                labels: self.cfg().resources.labels.clone(),
                cpu_base: 0.0,
                caps: self.caps().cloned().map(std::sync::Arc::new),
            });
            let shared = pool_reach(
                self.store()
                    .list_json::<PoolSpec>(keys::host::POOLS)
                    .await?,
            );
            for r in self.records().await? {
                if !r.template {
                    let load = loads.get(&r.spec.name);
                    c.vms.push(drs_vm(&r, self.host_name(), load, &shared));
                }
            }
            return Ok((c, pools));
        };
        // Other hosts from the cache; this host's own records from its store, so a
        // start here sees the one before it (read-your-writes in a mass power-on).
        if let Some(cache) = link.synced_cache() {
            let (members, views) = self.kept_views(cache);
            for m in members {
                let vms = if m.name == self.host_name() {
                    let pools = cache
                        .pools_of(&m.name)
                        .iter()
                        .map(|p| (**p).clone())
                        .collect();
                    host_vms(&m.name, pools, self.records().await?.iter())
                } else {
                    views
                        .get(&m.name)
                        .map(|v| v.vms.clone())
                        .unwrap_or_default()
                };
                add_host(
                    &mut c,
                    &m.name,
                    cache.alive(&m.name).as_ref(),
                    cache.load(&m.name).as_ref(),
                    cache.maintenance(&m.name),
                    cache.caps(&m.name),
                    vms,
                );
            }
            return Ok((c, pools));
        }
        let root = &link.root;
        for m in link.members().await? {
            let alive = root
                .get_json::<Alive>(&ferry_store::keys::cluster::alive(&m.name))
                .await?
                .map(|(a, _)| a);
            let cap = root
                .get_json::<HostCapacity>(&keys::cluster::load(&m.name))
                .await?
                .map(|(c, _)| c);
            let maintenance = root
                .get_json::<bool>(&keys::cluster::of_host(&m.name, keys::host::MAINTENANCE))
                .await?
                .is_some_and(|(b, _)| b);
            let pools = root
                .list_json::<PoolSpec>(&keys::cluster::of_host(&m.name, keys::host::POOLS))
                .await?;
            let caps = root
                .get_json::<ferry_types::HostCaps>(&keys::cluster::of_host(
                    &m.name,
                    keys::host::CAPS,
                ))
                .await?
                .map(|(c, _)| std::sync::Arc::new(c));
            let vms = root
                .list_json::<VmRecord>(&keys::cluster::of_host(&m.name, keys::host::VMS))
                .await?;
            add_host(
                &mut c,
                &m.name,
                alive.as_ref(),
                cap.as_ref(),
                maintenance,
                caps,
                host_vms(&m.name, pools, vms.iter()),
            );
        }
        Ok((c, pools))
    }

    /// The snapshot with each running VM's load, asked of its host: balancing and
    /// evacuation choose which VMs to move and need to know which VM carries the load;
    /// placement and admission need only each host's published total. A host that
    /// does not answer within [`LOADS_TIMEOUT`] keeps its published total (its VMs
    /// then count as idle when they move).
    pub(crate) async fn drs_snapshot_loaded(&self) -> Result<(DrsCluster, Vec<ResourcePool>)> {
        let (mut c, pools) = self.drs_snapshot().await?;
        if self.cluster().is_none() {
            return Ok((c, pools)); // this host's own loads are in already
        }
        let mut asks = tokio::task::JoinSet::new();
        let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(LOADS_PARALLEL));
        let busy: BTreeSet<&str> = c
            .vms
            .iter()
            .filter(|v| v.running)
            .map(|v| v.host.as_str())
            .collect();
        for h in &c.hosts {
            if h.state == DrsHostState::Down || !busy.contains(h.name.as_str()) {
                continue;
            }
            let (me, host, limit) = (self.clone(), h.name.clone(), limit.clone());
            asks.spawn(async move {
                if host == me.host_name() {
                    return (host, Ok(me.host_loads()));
                }
                let _turn = limit.acquire_owned().await;
                let r = async {
                    me.peer_with_timeout(&host, LOADS_TIMEOUT)
                        .await?
                        .get_limited::<HostLoads>("/api/v1/host/loads", LOADS_MAX_BYTES)
                        .await
                }
                .await;
                (host, r)
            });
        }
        let mut got: HashMap<String, BTreeMap<String, VmLoad>> = HashMap::new();
        while let Some(r) = asks.join_next().await {
            let Ok((host, r)) = r else { continue };
            match r {
                Ok(l) if l.host == host => {
                    got.insert(host, l.vms);
                }
                Ok(l) => tracing::warn!(host, answered = l.host, "VM loads from another host"),
                // A host of an earlier release has no such call: its published total
                // stands.
                Err(AgentError::NotFound(_)) => {}
                Err(e) => tracing::warn!(
                    host,
                    error = %crate::error_chain(&e).join(": "),
                    "VM loads not fetched: its published total stands and its VMs count as idle when they move"
                ),
            }
        }
        let cpus: HashMap<String, f64> = c.hosts.iter().map(|h| (h.name.clone(), h.cpus)).collect();
        for v in &mut c.vms {
            if let Some(l) = got.get(&v.host) {
                let cores = cpus.get(&v.host).copied().unwrap_or(0.0);
                // A VM uses at most its vCPUs, a host at most its cores (a host's
                // answer cannot make it look fuller than it is).
                v.cpu_load = l
                    .get(&v.name)
                    .map_or(0.0, |l| sane_load(l.cpu, cores.min(f64::from(v.vcpus))));
            }
        }
        let mut listed: HashMap<&str, BTreeSet<&str>> = HashMap::new();
        for v in &c.vms {
            listed
                .entry(v.host.as_str())
                .or_default()
                .insert(v.name.as_str());
        }
        let none = BTreeSet::new();
        for h in &mut c.hosts {
            if let Some(l) = got.get(&h.name) {
                let vms = listed.get(h.name.as_str()).unwrap_or(&none);
                // What runs there but is not listed (a VM arriving or leaving) still
                // loads the host.
                let unlisted: f64 = l
                    .iter()
                    .filter(|(n, _)| !vms.contains(n.as_str()))
                    .map(|(_, v)| sane_load(v.cpu, h.cpus))
                    .sum();
                h.cpu_base = sane_load(unlisted, h.cpus);
            }
        }
        // The listed VMs together at most the host's cores (less what is unlisted).
        let room: HashMap<String, f64> = c
            .hosts
            .iter()
            .filter(|h| got.contains_key(&h.name))
            .map(|h| (h.name.clone(), (h.cpus - h.cpu_base).max(0.0)))
            .collect();
        let mut sums: HashMap<String, f64> = HashMap::new();
        for v in &c.vms {
            if room.contains_key(&v.host) {
                *sums.entry(v.host.clone()).or_default() += v.cpu_load;
            }
        }
        for v in &mut c.vms {
            if let (Some(r), Some(s)) = (room.get(&v.host), sums.get(&v.host)) {
                if *s > *r && *s > 0.0 {
                    v.cpu_load *= r / s;
                }
            }
        }
        Ok((c, pools))
    }

    /// Where VM `name` would run best now, with every host's verdict (each VM's load
    /// asked of its host, as an explanation should show it).
    pub async fn place_vm(&self, name: &str) -> Result<PlacementReport> {
        self.place_vm_in(name, self.drs_snapshot_loaded().await?.0)
            .await
    }

    async fn place_vm_in(&self, name: &str, c: DrsCluster) -> Result<PlacementReport> {
        let vm = c
            .vms
            .iter()
            .find(|v| v.name == name)
            .cloned()
            .ok_or_else(|| AgentError::NotFound(format!("VM {name}")))?;
        Ok(ferry_drs::place(&c, &vm, &self.drs_config().await?))
    }

    /// Where a new VM of this definition would go.
    pub async fn place_spec(&self, spec: &VmSpec) -> Result<PlacementReport> {
        spec.validate()?;
        let (c, _) = self.drs_snapshot().await?;
        // Disks on a replicated pool limit it to the pool's hosts.
        let reach = pool_reach(self.pool_specs().await?);
        Ok(ferry_drs::place(
            &c,
            &spec_vm(spec, &reach),
            &self.drs_config().await?,
        ))
    }

    /// Defines a VM on the host placement picks (forwarded to that host's API).
    pub async fn create_placed(&self, spec: VmSpec) -> Result<ferry_types::Vm> {
        let r = self.place_spec(&spec).await?;
        let Some(host) = r.host else {
            let why: Vec<String> = r
                .hosts
                .iter()
                .map(|h| format!("{}: {}", h.host, h.reasons.join(", ")))
                .collect();
            return Err(AgentError::refused(
                Refusal::NoRoom,
                format!("No host can take VM {}: {}", spec.name, why.join("; ")),
            ));
        };
        self.events().emit(
            Some(&spec.name),
            "drs",
            format!("DRS places {} on {host}", spec.name),
        );
        if host == self.host_name() {
            return self.create_vm(spec).await;
        }
        self.peer(&host).await?.post("/api/v1/vms", &spec).await
    }

    /// Starts VM `name`. In DRS automatic mode a VM this host cannot run (its rules,
    /// memory, vCPUs) is first moved (stopped, disks copied if local) to the host
    /// placement picks and started there, like vSphere's placement at power-on.
    pub async fn start_placed(&self, name: &str, ctx: &crate::TaskCtx) -> Result<()> {
        let cfg = self.drs_config().await?;
        if cfg.mode != DrsMode::Automatic || self.cluster().is_none() {
            return self.start_vm(name).await;
        }
        // The published totals suffice (a VM not running has no load of its own):
        // a start asks no host for anything.
        let r = self.place_vm_in(name, self.drs_snapshot().await?.0).await?;
        let here = r.hosts.iter().find(|h| h.host == self.host_name());
        let (Some(here), Some(to)) = (here, r.host.clone()) else {
            return self.start_vm(name).await;
        };
        if here.eligible || to == self.host_name() {
            return self.start_vm(name).await;
        }
        let why = here.reasons.join("; ");
        ctx.log(format!(
            "DRS: {} cannot run {name} ({why}); it starts on {to}",
            self.host_name()
        ));
        self.events().emit(
            Some(name),
            "drs",
            format!(
                "DRS starts {name} on {to}: {} cannot run it ({why})",
                self.host_name()
            ),
        );
        self.mig.move_vm(name, &to, ctx).await?;
        let peer = self.peer(&to).await?;
        let t: ferry_types::TaskAccepted = peer
            .post(&format!("/api/v1/vms/{name}/start"), &serde_json::json!({}))
            .await?;
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let task: ferry_types::Task = peer.get(&format!("/api/v1/tasks/{}", t.task)).await?;
            match task.state {
                TaskState::Running => {}
                TaskState::Succeeded => {
                    ctx.log(format!("{name} runs on {to}"));
                    return Ok(());
                }
                TaskState::Failed => {
                    return Err(AgentError::failed(
                        Failure::Migration,
                        format!(
                            "{name} moved to {to} but did not start there: {}",
                            task.error.unwrap_or_default()
                        ),
                    ))
                }
            }
        }
    }

    /// The kept DRS views (held only for a call, never across an await).
    fn views(&self) -> std::sync::MutexGuard<'_, crate::drs_views::DrsViews> {
        self.inner
            .drs
            .views
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The cluster's members, and the other hosts' DRS views as kept (derived again
    /// where the cache changed).
    fn kept_views(
        &self,
        cache: &ferry_host::cache::ClusterCache,
    ) -> (
        Vec<ferry_types::ClusterHost>,
        HashMap<String, std::sync::Arc<crate::drs_views::HostView>>,
    ) {
        let members = cache.members();
        let others: Vec<String> = members
            .iter()
            .map(|m| m.name.clone())
            .filter(|n| n != self.host_name())
            .collect();
        let views = self.views().refresh(cache, &others);
        (members, views)
    }

    /// The memory running VMs hold per resource pool across the cluster, and the
    /// online hosts' memory (VM `skip` left out): other hosts' sums as kept with their
    /// DRS views, this host's from its store.
    async fn pool_usage(&self, skip: &str) -> Result<ferry_drs::pools::Usage> {
        use ferry_drs::pools::Usage;
        let cache = self.cluster().and_then(|l| l.synced_cache().cloned());
        let Some(cache) = cache else {
            return Ok(Usage::of(&self.drs_snapshot().await?.0, skip));
        };
        let (members, views) = self.kept_views(&cache);
        let mut total = Usage::default();
        for m in &members {
            let host = drs_host(
                &m.name,
                cache.alive(&m.name).as_ref(),
                cache.load(&m.name).as_ref(),
                cache.maintenance(&m.name),
            );
            let mut u = if m.name == self.host_name() {
                let pools = cache
                    .pools_of(&m.name)
                    .iter()
                    .map(|p| (**p).clone())
                    .collect();
                let own = host_vms(&m.name, pools, self.records().await?.iter());
                Usage::of_vms(&own, skip)
            } else {
                match views.get(&m.name) {
                    // The VM still listed elsewhere (an HA move the cache has not
                    // heard of yet): left out there too.
                    Some(v) if v.lists(skip) => Usage::of_vms(&v.vms, skip),
                    Some(v) => v.usage.clone(),
                    None => Usage::default(),
                }
            };
            u.online_memory = if host.state == DrsHostState::Online {
                host.memory_bytes
            } else {
                0
            };
            total.add(&u);
        }
        Ok(total)
    }

    /// May VM `name` start here? Resource pool limits and reservations, and HA
    /// admission control (strict: refused with the reason; warn: an event).
    pub async fn admit_start(&self, name: &str) -> Result<()> {
        let (rec, _) = self.record(name).await?;
        let cfg = self.drs_config().await?;
        let pools = self.resource_pools().await?;
        let mut vm = drs_vm(&rec, self.host_name(), None, &PoolReach::default());
        vm.running = true;
        // HA admission control weighs every HA VM: the whole snapshot. Pool admission
        // alone needs the memory per pool: each other host's sum is kept.
        let as_before = self.views().always_all;
        let snapshot = if cfg.ha_host_failures > 0 || as_before {
            Some(self.drs_snapshot().await?.0)
        } else {
            None
        };
        let usage = match &snapshot {
            Some(c) => ferry_drs::pools::Usage::of(c, name),
            None => self.pool_usage(name).await?,
        };
        if let Err(why) = ferry_drs::pools::admit_usage(&pools, &usage, &vm) {
            self.events()
                .emit(Some(name), "drs", format!("start refused: {why}"));
            return Err(AgentError::refused(
                Refusal::NoRoom,
                format!("Cannot start {name}: {why}"),
            ));
        }
        let Some(mut c) = snapshot else {
            return Ok(());
        };
        c.vms.retain(|v| v.name != name);
        c.vms.push(vm);
        if let Err(why) = ferry_drs::admission::failover_ok(&c, cfg.ha_host_failures) {
            let msg = format!(
                "HA admission control (room for {} host failures): {why}",
                cfg.ha_host_failures
            );
            match cfg.admission {
                AdmissionMode::Strict => {
                    self.events()
                        .emit(Some(name), "drs", format!("start refused: {msg}"));
                    return Err(AgentError::refused(
                        Refusal::NoRoom,
                        format!("Cannot start {name}: {msg}"),
                    ));
                }
                AdmissionMode::Warn => self.events().emit(Some(name), "drs", msg),
            }
        }
        Ok(())
    }

    async fn recently_moved(&self, cfg: &DrsConfig) -> Result<BTreeSet<String>> {
        let (s, p) = self.shared();
        let now = now_s();
        let mut out = BTreeSet::new();
        for kv in s.list(&keys::shared::drs_moved(p)).await? {
            let at: u64 = serde_json::from_slice(&kv.value).unwrap_or(0);
            let vm = kv.key.rsplit('/').next().unwrap_or_default().to_string();
            if now.saturating_sub(at) < cfg.hysteresis_s {
                out.insert(vm);
            } else {
                s.delete(&kv.key).await?;
            }
        }
        for f in self.in_flight().await? {
            out.insert(f.mv.vm);
        }
        Ok(out)
    }

    async fn in_flight(&self) -> Result<Vec<InFlight>> {
        let (s, p) = self.shared();
        Ok(s.list_json::<InFlight>(&keys::shared::drs_inflight(p))
            .await?)
    }

    /// A balancing plan for the cluster now.
    pub async fn drs_plan(&self) -> Result<DrsPlan> {
        let cfg = self.drs_config().await?;
        let (c, _) = self.drs_snapshot_loaded().await?;
        let frozen = self.recently_moved(&cfg).await?;
        Ok(ferry_drs::balance(
            &c,
            &cfg,
            &frozen,
            ferry_drs::Tuning::default(),
        ))
    }

    pub async fn drs_status(&self) -> Result<DrsStatus> {
        let config = self.drs_config().await?;
        let (s, p) = self.shared();
        let stored = s
            .get_json::<StoredPlan>(&keys::shared::drs_plan(p))
            .await?
            .map(|(sp, _)| sp);
        let manager = match &self.cluster() {
            Some(c) => c.root.get_json::<String>(MANAGER).await?.map(|(m, _)| m),
            None => Some(self.host_name().to_string()),
        };
        let (c, _) = self.drs_snapshot().await?;
        let admission = match ferry_drs::admission::failover_ok(&c, config.ha_host_failures) {
            Ok(()) if config.ha_host_failures == 0 => "off".to_string(),
            Ok(()) => format!("ok: room for {} host failures", config.ha_host_failures),
            Err(why) => why,
        };
        Ok(DrsStatus {
            config,
            manager,
            plan_at: stored.as_ref().map(|s| s.at),
            plan: stored.map(|s| s.plan),
            in_flight: self.in_flight().await?.into_iter().map(|f| f.mv).collect(),
            admission,
        })
    }

    /// Computes a plan and starts its moves now (within the limits), whatever the mode.
    pub async fn drs_apply(&self) -> Result<Vec<DrsMove>> {
        self.track_in_flight().await?;
        let cfg = self.drs_config().await?;
        let plan = self.drs_plan().await?;
        self.store_plan(&plan).await?;
        self.start_moves(&plan, &cfg).await
    }

    /// Stores the plan for `drs status`: only when it differs from the stored one or
    /// that is older than [`PLAN_REFRESH`] (each write is a revision etcd keeps; the
    /// DRS loop's last run is in the background tasks).
    async fn store_plan(&self, plan: &DrsPlan) -> Result<()> {
        let (s, p) = self.shared();
        if let Some((old, _)) = s.get_json::<StoredPlan>(&keys::shared::drs_plan(p)).await? {
            if old.plan == *plan && now_s().saturating_sub(old.at) < PLAN_REFRESH.as_secs() {
                return Ok(());
            }
        }
        s.put_json(
            &keys::shared::drs_plan(p),
            &StoredPlan {
                at: now_s(),
                plan: plan.clone(),
            },
        )
        .await?;
        Ok(())
    }

    /// Starts the plan's moves in order while the hosts involved and the cluster are
    /// below their limits of concurrent DRS migrations ([`ferry_drs::limits`]).
    async fn start_moves(&self, plan: &DrsPlan, cfg: &DrsConfig) -> Result<Vec<DrsMove>> {
        use ferry_drs::limits::{Admit, MoveLimits};
        let flying = self.in_flight().await?;
        let mut limits = MoveLimits::new(
            flying
                .iter()
                .map(|f| (f.mv.from.as_str(), f.mv.to.as_str())),
            cfg,
        );
        let mut started = vec![];
        for mv in &plan.moves {
            match limits.admit(mv) {
                Admit::Stop => break,
                Admit::Hold => continue,
                Admit::Start => {}
            }
            match self.start_move(mv).await {
                Ok(task) => {
                    let (s, p) = self.shared();
                    s.put_json(
                        &keys::shared::drs_inflight_vm(p, &mv.vm),
                        &InFlight {
                            mv: mv.clone(),
                            task,
                            at: now_s(),
                        },
                    )
                    .await?;
                    limits.started(mv);
                    self.events().emit(
                        Some(&mv.vm),
                        "drs",
                        format!(
                            "DRS moves {} from {} to {}: {}",
                            mv.vm, mv.from, mv.to, mv.reason
                        ),
                    );
                    started.push(mv.clone());
                }
                Err(e) => {
                    limits.failed(mv);
                    // Not tried again before the hysteresis is over.
                    let (s, p) = self.shared();
                    s.put_json(&keys::shared::drs_moved_vm(p, &mv.vm), &now_s())
                        .await?;
                    self.events().emit(
                        Some(&mv.vm),
                        "drs",
                        format!(
                            "DRS could not move {} to {}: {}",
                            mv.vm,
                            mv.to,
                            crate::error_chain(&e).join(": ")
                        ),
                    );
                }
            }
        }
        Ok(started)
    }

    /// Starts one live migration on the VM's host; returns the task id there.
    async fn start_move(&self, mv: &DrsMove) -> Result<String> {
        let req = MigrateRequest {
            to: mv.to.clone(),
            with_storage: false,
            target_pool: None,
            downtime_limit_ms: None,
            max_bandwidth_mib: None,
            allow_postcopy: None,
        };
        if mv.from == self.host_name() {
            let agent = self.clone();
            let n = mv.vm.clone();
            return Ok(self
                .tasks()
                .spawn("vm.migrate", &mv.vm, move |ctx| async move {
                    let report = agent.mig.migrate_vm(&n, req, &ctx).await?;
                    ctx.result(serde_json::to_value(&report).unwrap_or_default());
                    Ok(())
                }));
        }
        let peer = self.peer(&mv.from).await?;
        let t: ferry_types::TaskAccepted = peer
            .post(&format!("/api/v1/vms/{}/migrate", mv.vm), &req)
            .await?;
        Ok(t.task)
    }

    /// Forgets finished DRS migrations (recording when each VM moved) and reports the
    /// failed ones.
    async fn track_in_flight(&self) -> Result<()> {
        let (s, p) = self.shared();
        for f in self.in_flight().await? {
            let task = if f.mv.from == self.host_name() {
                self.tasks().get(&f.task)
            } else {
                match self.peer(&f.mv.from).await {
                    Ok(peer) => peer
                        .get::<ferry_types::Task>(&format!("/api/v1/tasks/{}", f.task))
                        .await
                        .ok(),
                    Err(_) => None,
                }
            };
            let done = match &task {
                Some(t) => t.state != TaskState::Running,
                // The source's daemon lost it (restarted, or the host is gone).
                None => now_s().saturating_sub(f.at) > 600,
            };
            if !done {
                continue;
            }
            s.delete(&keys::shared::drs_inflight_vm(p, &f.mv.vm))
                .await?;
            s.put_json(&keys::shared::drs_moved_vm(p, &f.mv.vm), &now_s())
                .await?;
            if let Some(t) = task.filter(|t| t.state == TaskState::Failed) {
                self.events().emit(
                    Some(&f.mv.vm),
                    "drs",
                    format!(
                        "DRS move of {} to {} failed: {}",
                        f.mv.vm,
                        f.mv.to,
                        t.error.unwrap_or_default()
                    ),
                );
            }
        }
        Ok(())
    }

    /// The HA manager's balancing rounds.
    #[tracing::instrument(skip_all)]
    pub(crate) async fn drs_loop(self) {
        let mut last: Option<Instant> = None;
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if !self.holds_lease() || !self.inner.ha.is_manager.load(Ordering::Relaxed) {
                last = None;
                continue;
            }
            let Ok(cfg) = self.drs_config().await else {
                continue;
            };
            if cfg.mode == DrsMode::Off
                || last.is_some_and(|t| t.elapsed() < Duration::from_secs(cfg.interval_s))
            {
                continue;
            }
            last = Some(Instant::now());
            let r = self.drs_round(&cfg).await;
            if let Err(e) = &r {
                tracing::warn!(error = %e, "DRS round");
            }
            self.loops().report(
                "drs",
                Duration::from_secs(cfg.interval_s),
                r.map_err(|e| crate::error_chain(&e).join(": ")),
            );
        }
    }

    async fn drs_round(&self, cfg: &DrsConfig) -> Result<()> {
        self.track_in_flight().await?;
        let plan = self.drs_plan().await?;
        let (s, p) = self.shared();
        // Only a different set of moves is news (scores drift with the load).
        let key = |m: &[DrsMove]| -> Vec<(String, String, String)> {
            m.iter()
                .map(|m| (m.vm.clone(), m.from.clone(), m.to.clone()))
                .collect()
        };
        let before = s
            .get_json::<StoredPlan>(&keys::shared::drs_plan(p))
            .await?
            .map(|(sp, _)| key(&sp.plan.moves));
        if before != Some(key(&plan.moves)) && !plan.moves.is_empty() {
            self.events().emit(
                None,
                "drs",
                format!(
                    "DRS recommends {} moves (imbalance {:.3} → {:.3})",
                    plan.moves.len(),
                    plan.score_before,
                    plan.score_after
                ),
            );
        }
        self.store_plan(&plan).await?;
        if cfg.mode == DrsMode::Automatic {
            self.start_moves(&plan, cfg).await?;
        }
        Ok(())
    }
}
