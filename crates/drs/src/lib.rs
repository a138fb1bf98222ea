//! DRS without I/O (seed 001: "DRS makes the VM run on the hardware with the most
//! available resources; when a host runs short, DRS moves VMs away by live migration").
//! A cluster snapshot goes in — hosts with their size, state and labels, VMs with their
//! requested and measured CPU and memory, host, rules and resource pool — and
//! placements, balancing plans and admission verdicts come out. Deterministic: the same
//! snapshot gives the same answer, so the tests assert on it; the agent's DRS loop
//! (`agent/src/cluster/drs.rs`) gathers the snapshot and carries the moves out.
//!
//! - [`place`]: filters (state, memory, vCPU ratio, pins, labels, affinity,
//!   anti-affinity, the HA reserve) then a score (spread: most free; pack: fullest);
//!   every host's verdict is kept for `--explain`.
//! - [`balance`]: the imbalance score (weighted standard deviations of memory and CPU
//!   utilisation, like Ganeti's hbal), rule fixes first, then greedy moves by gain per
//!   memory copied, down to a minimum gain set by the level.
//! - [`admission`]: capacity for N host failures (HA admission control).
//! - [`pools`]: resource pool hierarchy checks, pool admission and cgroup values.
//! - [`hbal`]: Ganeti's text backend format, for the benchmark against `hbal`.

pub mod admission;
pub mod balance;
pub mod hbal;
pub mod limits;
pub mod place;
pub mod pools;
pub mod publish;
mod state;

pub use balance::{balance, score, Tuning};
pub use place::{place, place_away};

use ferry_types::PlacementRules;

/// A host as DRS sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Host {
    pub name: String,
    /// Cores DRS plans with.
    pub cpus: f64,
    pub memory_bytes: u64,
    pub state: HostState,
    pub labels: Vec<String>,
    /// CPU load (cores) on this host that no listed VM carries: the host's published
    /// total when its per-VM loads were not fetched (placement and admission need the
    /// total only; balancing fetches each VM's load).
    pub cpu_base: f64,
    /// The CPU models and machine types it runs (None: not published; nothing checked).
    pub caps: Option<std::sync::Arc<ferry_types::HostCaps>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostState {
    /// Takes VMs.
    Online,
    /// Runs what it has, takes nothing new, left out of the balance.
    Maintenance,
    /// Without its lease: neither counts nor takes VMs.
    Down,
}

/// A VM as DRS sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Vm {
    pub name: String,
    pub host: String,
    pub vcpus: u32,
    pub memory_bytes: u64,
    /// Measured CPU load in cores, smoothed over the DRS window.
    pub cpu_load: f64,
    /// Has a QEMU: counts against its host.
    pub running: bool,
    /// HA-managed (restarted elsewhere when its host fails).
    pub ha: bool,
    pub rules: PlacementRules,
    /// May be live-migrated now (running, not mid-migration, not a template).
    pub movable: bool,
    pub pool: Option<String>,
    /// Its CPU model and pinned machine type (None: defined before they were pinned).
    pub cpu_model: Option<String>,
    pub machine: Option<String>,
    /// Its architecture (`x86_64`, `aarch64`, …): a host must run it.
    pub arch: ferry_types::Arch,
    /// Host features it needs (`tpm`, `secure-boot`: `HostCaps::features`).
    pub needs: Vec<String>,
}

impl Vm {
    /// A running VM that can move, for tests and the benchmark.
    pub fn new(name: &str, host: &str, vcpus: u32, memory_bytes: u64, cpu_load: f64) -> Vm {
        Vm {
            name: name.into(),
            host: host.into(),
            vcpus,
            memory_bytes,
            cpu_load,
            running: true,
            ha: false,
            rules: PlacementRules::default(),
            movable: true,
            pool: None,
            cpu_model: None,
            arch: ferry_types::Arch::X86_64,
            machine: None,
            needs: vec![],
        }
    }
}

impl Host {
    pub fn new(name: &str, cpus: f64, memory_bytes: u64) -> Host {
        Host {
            name: name.into(),
            cpus,
            memory_bytes,
            state: HostState::Online,
            labels: vec![],
            cpu_base: 0.0,
            caps: None,
        }
    }
}

/// The snapshot DRS works on.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Cluster {
    pub hosts: Vec<Host>,
    pub vms: Vec<Vm>,
}

#[cfg(test)]
mod tests;
