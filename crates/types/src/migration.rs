//! Live migration: the request, the host-to-host protocol, the report.

use crate::validate::{check_name, ValidationErrors};
use crate::vm::{CloneOf, Snapshot, VmSpec};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `POST /vms/{name}/migrate`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// The destination host (a name from the cluster).
    pub to: String,
    /// Also copy disks that live on a local pool (mirror to the destination over NBD).
    #[serde(default)]
    pub with_storage: bool,
    /// With `with_storage`: the destination's pool for the copies (default `local`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_pool: Option<String>,
    /// The pause QEMU may take at switchover (default 50 ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_limit_ms: Option<u64>,
    /// Bandwidth cap in MiB/s (default 10240: the link's speed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bandwidth_mib: Option<u64>,
    /// Allow the switch to post-copy when throttling does not make it converge
    /// (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_postcopy: Option<bool>,
}

impl MigrateRequest {
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut e = ValidationErrors::default();
        check_name(&mut e, "to", &self.to);
        if let Some(p) = &self.target_pool {
            check_name(&mut e, "target_pool", p);
            if !self.with_storage {
                e.push("target_pool", "only with with_storage");
            }
        }
        if let Some(d) = self.downtime_limit_ms {
            if !(1..=60_000).contains(&d) {
                e.push("downtime_limit_ms", "must be 1 to 60000");
            }
        }
        if let Some(b) = self.max_bandwidth_mib {
            if !(1..=1 << 20).contains(&b) {
                e.push("max_bandwidth_mib", "must be 1 to 1048576");
            }
        }
        e.into_result()
    }
}

/// What moves with a VM from host to host besides its disks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmTransfer {
    pub spec: VmSpec,
    #[serde(default)]
    pub template: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_snapshot: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone_of: Option<CloneOf>,
    #[serde(default)]
    pub snapshots: Vec<Snapshot>,
}

/// Source → destination: prepare to receive a running VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct IncomingRequest {
    /// The source host's name.
    pub source: String,
    pub vm: VmTransfer,
    /// Disks to receive over NBD (indexes into `vm.spec.disks`) and the pool for them.
    #[serde(default)]
    pub copy_disks: Vec<usize>,
    /// Virtual size of each copied disk (same order).
    #[serde(default)]
    pub copy_sizes: Vec<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_pool: Option<String>,
    /// The VM's id where it was created (its volumes are named with it); kept as the
    /// id on the destination when that id is free there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin_id: Option<u32>,
    /// The migration runs with post-copy enabled (both sides must say so).
    #[serde(default)]
    pub postcopy: bool,
}

/// Destination → source: QEMU listens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct IncomingReady {
    /// `tcp:ADDR:PORT` for `migrate`.
    pub uri: String,
    /// With copied disks: NBD server `ADDR:PORT` and the export of each copied disk
    /// (same order as `copy_disks`), with the volume made for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd: Option<String>,
    #[serde(default)]
    pub exports: Vec<String>,
    #[serde(default)]
    pub volumes: Vec<String>,
}

/// Source → destination at the end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct IncomingFinish {
    /// true: the VM runs on the destination now; false: abort (the source keeps it).
    pub success: bool,
}

/// Where a migration stands. The source's phase is what it reports to the destination
/// ([`MigrationInfo`]); the destination keeps its own for the VM arriving.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MigrationPhase {
    /// The destination is being prepared; its QEMU waits for the stream.
    Setup,
    /// RAM (and disks) are copied while the guest runs on the source (pre-copy).
    Transferring,
    /// The guest runs on the destination while its remaining pages arrive (post-copy):
    /// neither side may drop its half.
    PostCopy,
    /// The guest is paused; the destination claims its NICs and the last state goes.
    Switchover,
    /// QEMU finished sending; the destination takes the VM over.
    Completed,
    /// A stopped or suspended VM's files are being copied.
    Cold,
    /// The source's daemon restarted mid-migration and is finding out how it ended.
    Recovering,
    /// It is being cancelled; the VM stays on the source.
    Cancelling,
    /// It failed; the VM stays (or runs again) on the source.
    Failed,
    /// It was cancelled; the VM stays on the source.
    Cancelled,
    /// A phase a newer ferry named (read from `status` instead).
    #[serde(other)]
    Unknown,
}

impl MigrationPhase {
    /// The phase QEMU's `query-migrate` status names (QEMU's own spelling).
    pub fn from_qemu(status: &str) -> MigrationPhase {
        match status {
            "setup" => MigrationPhase::Setup,
            "pre-switchover" | "device" => MigrationPhase::Switchover,
            s if s.starts_with("postcopy") => MigrationPhase::PostCopy,
            "completed" => MigrationPhase::Completed,
            "failed" => MigrationPhase::Failed,
            "cancelling" => MigrationPhase::Cancelling,
            "cancelled" => MigrationPhase::Cancelled,
            _ => MigrationPhase::Transferring,
        }
    }

    /// Over for good: the destination drops what it prepared.
    pub fn is_given_up(self) -> bool {
        matches!(self, MigrationPhase::Failed | MigrationPhase::Cancelled)
    }
}

/// Which way a migration in flight goes, seen from the host that reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MigrationDirection {
    /// A VM leaving this host.
    Outgoing,
    /// A VM arriving here (live).
    Incoming,
}

/// A migration in flight on a host: the background work `ferry host status` shows
/// beside the daemon's loops.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MigrationInFlight {
    pub vm: String,
    pub direction: MigrationDirection,
    /// The other host: the destination of an outgoing migration, the source of an
    /// incoming one.
    pub peer: String,
    pub phase: MigrationPhase,
    /// When it began (Unix ms).
    pub since_ms: u64,
}

/// An outgoing migration as the source reports it (the destination asks while it waits).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MigrationInfo {
    pub vm: String,
    pub to: String,
    /// QEMU's migration status (`active`, `postcopy-active`, `completed`, `failed`, ...),
    /// or ferry's (`setup`, `cold`, `recovering`) before QEMU has one.
    pub status: String,
    /// Where the migration stands (absent from a source older than this field: then
    /// read from `status`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<MigrationPhase>,
}

impl MigrationInfo {
    /// The phase, from `status` when the source did not say.
    pub fn phase(&self) -> MigrationPhase {
        match self.phase {
            Some(p) if p != MigrationPhase::Unknown => p,
            _ => MigrationPhase::from_qemu(&self.status),
        }
    }
}

/// How a migration went.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MigrationReport {
    pub vm: String,
    pub from: String,
    pub to: String,
    /// From the request to the VM running on the destination, cleanup included.
    pub total_ms: u64,
    /// QEMU's `total-time` of the RAM migration.
    pub migration_ms: u64,
    /// QEMU's reported downtime (the pause it measured).
    pub downtime_ms: u64,
    /// Of the downtime: the pause before switchover (mirrors completed, MACs claimed by
    /// the destination), ms.
    #[serde(default)]
    pub switchover_ms: u64,
    /// Bytes of RAM sent (all passes).
    pub ram_transferred_bytes: u64,
    pub ram_total_bytes: u64,
    /// Dirty-bitmap sync passes.
    pub passes: u64,
    /// Highest dirty rate seen, pages/s.
    pub max_dirty_pages_rate: u64,
    /// Bytes of disk mirrored (with storage).
    #[serde(default)]
    pub disk_transferred_bytes: u64,
    /// Steps of the convergence policy (e.g. "throttle 30%", "post-copy").
    pub policy_steps: Vec<String>,
    pub postcopy: bool,
    /// Lock generations after the move, per shared volume.
    #[serde(default)]
    pub locks: Vec<String>,
}

/// `POST /vms/{name}/disks/{index}/move`: Storage vMotion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskMove {
    /// The pool the disk moves to.
    pub pool: String,
    /// Cap of the copy while the VM runs, MiB/s (like Proxmox's bwlimit; default none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_mib: Option<u64>,
}

/// Source → destination: register a stopped or suspended VM arriving cold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ColdIncoming {
    pub source: String,
    pub vm: VmTransfer,
    /// Suspended (resumes from its state file) rather than stopped.
    #[serde(default)]
    pub suspended: bool,
    /// Disks (indexes) whose files will be uploaded into the destination's `local` pool.
    #[serde(default)]
    pub upload_disks: Vec<usize>,
    /// The suspended state file will be uploaded too.
    #[serde(default)]
    pub state_upload: bool,
    /// The state file when it lies on a shared pool (it stays there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspend_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin_id: Option<u32>,
}

/// `POST /vms/{name}/move`: cold migration of a stopped or suspended VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MoveRequest {
    pub to: String,
}

#[cfg(test)]
mod phase_tests {
    use super::*;

    fn info(v: serde_json::Value) -> MigrationInfo {
        serde_json::from_value(v).unwrap()
    }

    /// The destination reads a phase it knows; one it does not (a newer source) or none
    /// (an older source) is read from QEMU's status; only a failed or cancelled
    /// migration is given up, not one being cancelled.
    #[test]
    fn phases_read_from_any_source() {
        let i = info(
            serde_json::json!({"vm": "a", "to": "h2", "status": "active", "phase": "switchover"}),
        );
        assert_eq!(i.phase(), MigrationPhase::Switchover);
        let i = info(
            serde_json::json!({"vm": "a", "to": "h2", "status": "failed", "phase": "warp_drive"}),
        );
        assert_eq!(i.phase(), MigrationPhase::Failed);
        let i = info(serde_json::json!({"vm": "a", "to": "h2", "status": "postcopy-active"}));
        assert_eq!(i.phase(), MigrationPhase::PostCopy);
        for (s, gone) in [
            ("cancelling", false),
            ("cancelled", true),
            ("failed", true),
            ("active", false),
            ("completed", false),
        ] {
            assert_eq!(MigrationPhase::from_qemu(s).is_given_up(), gone, "{s}");
        }
    }
}
