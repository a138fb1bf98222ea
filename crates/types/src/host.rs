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
}

/// A member of the cluster as the cluster file (later the cluster store) lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ClusterHost {
    pub name: String,
    /// Base URL of its API.
    pub api: String,
    /// Its address for migration traffic.
    pub address: String,
}

/// The cluster file: `{"hosts": [...]}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ClusterFile {
    pub hosts: Vec<ClusterHost>,
}
