//! DRS (seed 001): placement rules of a VM, the cluster's DRS settings, resource pools,
//! and what the planner answers (placements with their reasons, balancing plans).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::validate::{check_name, ValidationErrors};

/// Where a VM may run (part of its definition).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PlacementRules {
    /// VMs of the same affinity group run on one host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<String>,
    /// VMs sharing an anti-affinity group run on different hosts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub anti_affinity: Vec<String>,
    /// Only hosts carrying every one of these labels (`ferry serve --label`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_labels: Vec<String>,
    /// Only these hosts (a pin); empty: any host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// DRS never moves this VM for balancing (rule fixes and evacuations still may).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pinned: bool,
}

impl PlacementRules {
    pub fn is_empty(&self) -> bool {
        *self == PlacementRules::default()
    }
}

impl PlacementRules {
    /// Group, label and host names must be names.
    pub fn check(&self, errs: &mut ValidationErrors) {
        let tags = self
            .affinity
            .iter()
            .map(|t| ("placement.affinity", t))
            .chain(
                self.anti_affinity
                    .iter()
                    .map(|t| ("placement.anti_affinity", t)),
            )
            .chain(
                self.host_labels
                    .iter()
                    .map(|t| ("placement.host_labels", t)),
            )
            .chain(self.hosts.iter().map(|t| ("placement.hosts", t)));
        for (field, t) in tags {
            check_name(errs, field, t);
        }
    }
}

/// How DRS acts on its recommendations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum DrsMode {
    /// No balancing (placement at create still picks a host when asked).
    Off,
    /// Recommendations are computed and shown; `ferry drs apply` carries them out.
    #[default]
    Manual,
    /// Recommendations are carried out as live migrations.
    Automatic,
}

/// Placement scoring among the hosts that pass the filters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum PlacementPolicy {
    /// The host with the most free resources (seed 001).
    #[default]
    Spread,
    /// The fullest host that still fits (frees whole hosts).
    Pack,
}

/// What a start that breaks HA admission control gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum AdmissionMode {
    /// Refused with the reason.
    #[default]
    Strict,
    /// Started, with a warning event.
    Warn,
}

/// The cluster's DRS settings (`ferry drs config`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct DrsConfig {
    pub mode: DrsMode,
    /// Migration threshold like vSphere's: 1 only fixes rule violations, 3 the
    /// default, 5 moves for small gains.
    pub level: u8,
    pub policy: PlacementPolicy,
    /// Seconds between balancing rounds.
    pub interval_s: u64,
    /// Seconds over which measured load is averaged (a short spike moves nothing).
    pub window_s: u64,
    /// A VM moved by DRS is not moved again for this many seconds.
    pub hysteresis_s: u64,
    /// Live migrations DRS runs at once, per host and in the cluster.
    pub max_moves_per_host: u32,
    pub max_moves_cluster: u32,
    /// Moves in one plan at most.
    pub max_plan_moves: u32,
    /// Weights of CPU and memory imbalance in the score.
    pub cpu_weight: f64,
    pub memory_weight: f64,
    /// vCPUs per host core at most.
    pub max_vcpu_ratio: f64,
    /// HA admission control: capacity for this many host failures is kept free.
    pub ha_host_failures: u32,
    pub admission: AdmissionMode,
}

impl Default for DrsConfig {
    fn default() -> Self {
        DrsConfig {
            mode: DrsMode::Manual,
            level: 3,
            policy: PlacementPolicy::Spread,
            interval_s: 60,
            window_s: 300,
            hysteresis_s: 900,
            max_moves_per_host: 1,
            max_moves_cluster: 4,
            max_plan_moves: 64,
            cpu_weight: 1.0,
            memory_weight: 1.0,
            max_vcpu_ratio: 8.0,
            ha_host_failures: 0,
            admission: AdmissionMode::Strict,
        }
    }
}

impl DrsConfig {
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errs = ValidationErrors::default();
        if !(1..=5).contains(&self.level) {
            errs.push("level", "must be 1 to 5");
        }
        if self.interval_s == 0 || self.interval_s > 86_400 {
            errs.push("interval_s", "must be 1 to 86400");
        }
        if self.window_s == 0 || self.window_s > 86_400 {
            errs.push("window_s", "must be 1 to 86400");
        }
        if self.max_moves_per_host == 0 || self.max_moves_cluster == 0 {
            errs.push("max_moves_per_host", "must be at least 1");
        }
        if self.max_plan_moves == 0 {
            errs.push("max_plan_moves", "must be at least 1");
        }
        for (f, w) in [
            ("cpu_weight", self.cpu_weight),
            ("memory_weight", self.memory_weight),
        ] {
            if !(0.0..=100.0).contains(&w) {
                errs.push(f, "must be 0 to 100");
            }
        }
        if self.cpu_weight + self.memory_weight <= 0.0 {
            errs.push("cpu_weight", "CPU and memory weight are both 0");
        }
        if !(0.1..=64.0).contains(&self.max_vcpu_ratio) {
            errs.push("max_vcpu_ratio", "must be 0.1 to 64");
        }
        if self.ha_host_failures > 16 {
            errs.push("ha_host_failures", "at most 16");
        }
        errs.into_result()
    }
}

/// Reservation, limit and shares of one resource of a resource pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct Allocation {
    /// Guaranteed to the pool (CPU: cores, memory: bytes); others cannot take it.
    pub reservation: f64,
    /// At most this much (CPU: cores, memory: bytes); none: unlimited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<f64>,
    /// Relative weight against sibling pools under contention (vSphere: low 500,
    /// normal 1000, high 2000).
    pub shares: u32,
}

impl Default for Allocation {
    fn default() -> Self {
        Allocation {
            reservation: 0.0,
            limit: None,
            shares: 1000,
        }
    }
}

/// A resource pool (seed 001): VMs in it share its reservation, limit and shares.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ResourcePool {
    pub name: String,
    /// The parent pool; none: a top-level pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    #[serde(default)]
    pub cpu: Allocation,
    #[serde(default)]
    pub memory: Allocation,
}

impl ResourcePool {
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errs = ValidationErrors::default();
        check_name(&mut errs, "name", &self.name);
        if let Some(p) = &self.parent {
            check_name(&mut errs, "parent", p);
        }
        if self.parent.as_deref() == Some(self.name.as_str()) {
            errs.push("parent", "a pool cannot be its own parent");
        }
        for (f, a) in [("cpu", &self.cpu), ("memory", &self.memory)] {
            if !a.reservation.is_finite() || a.reservation < 0.0 {
                errs.push(format!("{f}.reservation"), "must be 0 or more");
            }
            if let Some(l) = a.limit {
                if !l.is_finite() || l <= 0.0 {
                    errs.push(format!("{f}.limit"), "must be above 0");
                } else if l < a.reservation {
                    errs.push(format!("{f}.limit"), "is below the reservation");
                }
            }
            if !(1..=1_000_000).contains(&a.shares) {
                errs.push(format!("{f}.shares"), "must be 1 to 1000000");
            }
        }
        errs.into_result()
    }
}

/// One host as placement saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HostVerdict {
    pub host: String,
    /// Passed every filter.
    pub eligible: bool,
    /// Why it was filtered out (empty when eligible).
    pub reasons: Vec<String>,
    /// Higher is better; only for eligible hosts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub score: Option<f64>,
    pub memory_free_bytes: u64,
    /// Measured CPU load in cores, and the host's cores.
    pub cpu_load: f64,
    pub cpus: f64,
}

/// Where a VM would go, and why (`ferry vm place NAME --explain`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PlacementReport {
    pub vm: String,
    pub policy: PlacementPolicy,
    /// The chosen host; none: no host passes the filters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    pub hosts: Vec<HostVerdict>,
}

/// One live migration DRS recommends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DrsMove {
    pub vm: String,
    pub from: String,
    pub to: String,
    /// Memory the migration copies.
    pub memory_bytes: u64,
    /// Imbalance score after this move (lower is better).
    pub score_after: f64,
    pub reason: String,
}

/// A balancing plan.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DrsPlan {
    /// Imbalance (weighted standard deviations of CPU and memory utilisation).
    pub score_before: f64,
    pub score_after: f64,
    pub moves: Vec<DrsMove>,
    /// Per host: (memory utilisation, CPU utilisation) now, 0..1.
    pub hosts: Vec<HostLoad>,
}

/// A host's utilisation as DRS sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HostLoad {
    pub host: String,
    pub memory_used_bytes: u64,
    pub memory_bytes: u64,
    /// Smoothed CPU load in cores.
    pub cpu_load: f64,
    pub cpus: f64,
    pub vms: usize,
}

/// `ferry drs status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DrsStatus {
    pub config: DrsConfig,
    /// The host whose agent runs DRS (the HA manager).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manager: Option<String>,
    /// When the manager stored the plan (unix seconds): an unchanged plan is stored
    /// again only after 10 minutes (the DRS loop's last run is in `host status`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan_at: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan: Option<DrsPlan>,
    /// DRS migrations under way: (vm, from, to).
    pub in_flight: Vec<DrsMove>,
    /// HA admission control: `ok`, or why the reserve is not kept.
    pub admission: String,
}

/// Load of one VM as its host measured it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmLoad {
    /// Smoothed over the DRS window, in cores.
    pub cpu: f64,
    /// Resident memory of its QEMU.
    pub rss_bytes: u64,
}

/// What a host publishes for DRS (under its lease).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HostCapacity {
    pub cpus: f64,
    pub memory_bytes: u64,
    #[serde(default)]
    pub labels: Vec<String>,
    /// Running VMs measured on the host.
    #[serde(default)]
    pub running: u32,
    /// Their CPU load in total (cores, smoothed over the DRS window).
    #[serde(default)]
    pub cpu_load: f64,
    /// Their resident memory in total.
    #[serde(default)]
    pub rss_bytes: u64,
    /// Each VM's load: no longer published (the record would grow with the VMs and
    /// change with any of them); DRS fetches them from the host when it balances
    /// (`GET /api/v1/host/loads`). Read when a host of an earlier release writes them.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub vms: std::collections::BTreeMap<String, VmLoad>,
}

impl HostCapacity {
    /// What a host publishes: its size, labels and the totals of its VMs' loads.
    pub fn summary(
        cpus: f64,
        memory_bytes: u64,
        labels: Vec<String>,
        vms: &std::collections::BTreeMap<String, VmLoad>,
    ) -> HostCapacity {
        HostCapacity {
            cpus,
            memory_bytes,
            labels,
            running: u32::try_from(vms.len()).unwrap_or(u32::MAX),
            cpu_load: vms.values().map(|v| v.cpu).sum(),
            rss_bytes: vms.values().map(|v| v.rss_bytes).sum(),
            vms: Default::default(),
        }
    }
}

/// Each running VM's load as its host measures it now (`GET /api/v1/host/loads`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HostLoads {
    pub host: String,
    pub vms: std::collections::BTreeMap<String, VmLoad>,
}
