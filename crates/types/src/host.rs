//! Facts about a host.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Facts about this host, as the API reports them.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HostInfo {
    pub hostname: String,
    /// `kvm` or `tcg`: what VMs started here use.
    pub accel: String,
    pub cpus: usize,
    pub memory_bytes: u64,
    pub qemu_version: String,
    pub vms_running: usize,
    pub vms_defined: usize,
}
