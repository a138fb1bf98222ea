//! Facts about hosts and the cluster they form.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Facts about this host, as the API reports them.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HostInfo {
    /// The host's name in the cluster (`--host-name`).
    pub name: String,
    pub hostname: String,
    /// `kvm` or `tcg`: what VMs started here use.
    pub accel: String,
    pub cpus: usize,
    pub memory_bytes: u64,
    /// MemAvailable of the host.
    pub memory_available_bytes: u64,
    /// Memory of the VMs with a QEMU here.
    pub vm_memory_bytes: u64,
    pub qemu_version: String,
    pub vms_running: usize,
    pub vms_defined: usize,
    /// In maintenance: no new VMs start or arrive here.
    #[serde(default)]
    pub maintenance: bool,
    /// Cores busy over the last 10 s sample (none right after the daemon started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_busy: Option<f64>,
    /// The daemon's background tasks (lease, HA, DRS, ...) and how they fare.
    #[serde(default)]
    pub background: Vec<BackgroundTask>,
    /// Migrations in flight on this host, both ways (oldest first).
    #[serde(default)]
    pub migrations: Vec<crate::MigrationInFlight>,
    /// The ferry release the daemon runs.
    #[serde(default)]
    pub version: String,
    /// ferry's systemd units here (the daemon, the guests' shutdown, the etcd member,
    /// the watchdog, each VM's scope, the slices); empty without systemd.
    #[serde(default)]
    pub units: Vec<HostUnit>,
    /// The ports this host serves, each with what uses it.
    #[serde(default)]
    pub ports: Vec<HostPort>,
    /// Where VMs' processes and resource pools live (systemd scopes and slices, or
    /// cgroups, or nowhere, with why).
    #[serde(default)]
    pub cgroups: String,
    /// Its VMs were brought down for the host's shutdown: no VM starts until start-all
    /// or the next boot.
    #[serde(default)]
    pub shutting_down: bool,
    /// What it can run: CPU models and machine types (none when its QEMU could not be
    /// asked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caps: Option<crate::HostCaps>,
}

/// One of ferry's systemd units on a host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HostUnit {
    pub unit: String,
    /// `active`, `inactive`, `failed`, …
    pub active: String,
    /// `running`, `exited`, …
    pub sub: String,
}

/// A port a host serves (TCP), and what uses it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HostPort {
    /// A port, or a range `FROM-TO`.
    pub port: String,
    pub what: String,
}

/// One of the daemon's background tasks. Times are Unix milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BackgroundTask {
    pub name: String,
    /// How often it runs.
    pub every_ms: u64,
    pub runs: u64,
    /// Runs that ended in an error.
    pub failures: u64,
    pub last_run_ms: Option<u64>,
    pub last_ok_ms: Option<u64>,
    pub last_error: Option<String>,
    pub last_error_ms: Option<u64>,
    pub next_run_ms: Option<u64>,
}

/// What a live host publishes under its lease (`/cluster/alive/{host}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostAlive {
    pub memory_bytes: u64,
    pub cpus: usize,
    pub pid: u32,
}

/// A member of the cluster as the cluster file (later the cluster store) lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ClusterHost {
    pub name: String,
    /// Base URL of its API.
    pub api: String,
    /// Its address for migration traffic.
    pub address: String,
    /// The serial of its host certificate: other hosts accept only that one (a host
    /// that left, or a renewed certificate's predecessor, is refused). None in a
    /// static cluster file (any certificate of the CA naming the host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_serial: Option<String>,
    /// The CA of its migration identity (PEM): what QEMU on another host trusts for a
    /// migration stream with it (nothing else trusts it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_ca: Option<String>,
}

/// The cluster file: `{"hosts": [...]}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ClusterFile {
    pub hosts: Vec<ClusterHost>,
}

/// One sample of a VM's or a host's load; rates are per second over the interval
/// before it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MetricsPoint {
    /// Unix time in milliseconds.
    pub time_ms: u64,
    /// Cores busy (1.0 = one core all the time).
    pub cpu: f64,
    /// Memory in use: the QEMU process's resident set, or the host's total minus
    /// available.
    pub memory_bytes: u64,
    pub disk_read_bps: f64,
    pub disk_write_bps: f64,
    /// Bytes the guest (or the host) received per second.
    pub net_rx_bps: f64,
    pub net_tx_bps: f64,
}

/// The last hour of samples (bounded; oldest first).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MetricsHistory {
    /// Seconds between samples.
    pub interval_s: u64,
    /// Memory the VM is configured with, or the host has (for the graph's scale).
    pub memory_limit_bytes: u64,
    /// Cores the VM has, or the host has.
    pub cpu_limit: f64,
    pub points: Vec<MetricsPoint>,
}
