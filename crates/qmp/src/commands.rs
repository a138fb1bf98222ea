//! The QMP commands ferry uses, one type each with the type of its reply
//! ([`Command`], run with [`crate::Qmp::run`]). A reply that lacks a field QEMU
//! always sends is a decode error, never a zero; fields QEMU sends only in some
//! states are `Option`s.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A QMP command: its name, arguments (the value itself, kebab-case) and reply.
pub trait Command: Serialize {
    const NAME: &'static str;
    type Reply: DeserializeOwned;
    /// Whether the command takes arguments (unit commands send none).
    const ARGS: bool = true;
}

/// The reply `{}` of commands that return nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Empty {}

macro_rules! unit_command {
    ($(#[$m:meta])* $t:ident, $name:literal) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, Serialize)]
        pub struct $t;
        impl Command for $t {
            const NAME: &'static str = $name;
            type Reply = Empty;
            const ARGS: bool = false;
        }
    };
}

/// A command with one string argument and no reply.
macro_rules! id_command {
    ($(#[$m:meta])* $t:ident, $name:literal, $field:ident) => {
        $(#[$m])*
        #[derive(Debug, Clone, Serialize)]
        #[serde(rename_all = "kebab-case")]
        pub struct $t {
            pub $field: String,
        }
        impl Command for $t {
            const NAME: &'static str = $name;
            type Reply = Empty;
        }
    };
}

unit_command!(
    /// Resume the vCPUs.
    Cont,
    "cont"
);
unit_command!(
    /// Pause the vCPUs.
    Stop,
    "stop"
);
unit_command!(
    /// End QEMU.
    Quit,
    "quit"
);
unit_command!(
    /// The ACPI power button.
    SystemPowerdown,
    "system_powerdown"
);
mod bitmap;
mod block;
mod migration;
pub use bitmap::*;
pub use block::*;
pub use migration::*;

unit_command!(MigrateCancel, "migrate_cancel");
unit_command!(MigrateStartPostcopy, "migrate-start-postcopy");
unit_command!(NbdServerStop, "nbd-server-stop");
id_command!(JobDismiss, "job-dismiss", id);
id_command!(JobComplete, "job-complete", id);
id_command!(JobCancel, "job-cancel", id);
id_command!(BlockdevDel, "blockdev-del", node_name);
id_command!(ObjectDel, "object-del", id);
id_command!(NetdevDel, "netdev_del", id);
id_command!(DeviceDel, "device_del", id);

id_command!(
    /// `migrate`: send the VM's state to `uri`.
    Migrate,
    "migrate",
    uri
);
id_command!(
    /// `migrate-incoming`: receive a VM's state at `uri`.
    MigrateIncoming,
    "migrate-incoming",
    uri
);

/// `migrate-continue`: go on from a pause state (`pre-switchover`).
#[derive(Debug, Clone, Serialize)]
pub struct MigrateContinue {
    pub state: MigrationStatus,
}
impl Command for MigrateContinue {
    const NAME: &'static str = "migrate-continue";
    type Reply = Empty;
}

/// `block_set_io_throttle`: the I/O limits of the block device `id` (a qdev id). The six
/// base figures are required by QEMU (0: none).
#[derive(Debug, Clone, Default, Serialize)]
pub struct BlockSetIoThrottle {
    pub id: String,
    pub bps: u64,
    pub bps_rd: u64,
    pub bps_wr: u64,
    pub iops: u64,
    pub iops_rd: u64,
    pub iops_wr: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bps_max: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iops_max: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bps_max_length: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iops_max_length: Option<u64>,
}
impl Command for BlockSetIoThrottle {
    const NAME: &'static str = "block_set_io_throttle";
    type Reply = Empty;
}

/// `set_link`: plug NIC `name`'s cable in or pull it.
#[derive(Debug, Clone, Serialize)]
pub struct SetLink {
    pub name: String,
    pub up: bool,
}
impl Command for SetLink {
    const NAME: &'static str = "set_link";
    type Reply = Empty;
}

/// `query-status`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct QueryStatus;
impl Command for QueryStatus {
    const NAME: &'static str = "query-status";
    type Reply = StatusInfo;
    const ARGS: bool = false;
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StatusInfo {
    pub running: bool,
    pub status: RunState,
}

/// QEMU's run state (`query-status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    Debug,
    Inmigrate,
    InternalError,
    IoError,
    Paused,
    Postmigrate,
    Prelaunch,
    FinishMigrate,
    RestoreVm,
    Running,
    SaveVm,
    Shutdown,
    Suspended,
    Watchdog,
    GuestPanicked,
    Colo,
    /// A state this ferry does not know (a newer QEMU).
    #[serde(other)]
    Unknown,
}

/// `query-migrate`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct QueryMigrate;
impl Command for QueryMigrate {
    const NAME: &'static str = "query-migrate";
    type Reply = MigrationInfo;
    const ARGS: bool = false;
}

/// A migration's phase as QEMU reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationStatus {
    #[default]
    None,
    Setup,
    Cancelling,
    Cancelled,
    Active,
    PostcopyActive,
    PostcopyPaused,
    PostcopyRecover,
    Completed,
    Failed,
    Colo,
    PreSwitchover,
    Device,
    WaitUnplug,
    /// A phase this ferry does not know (a newer QEMU).
    #[serde(other)]
    Unknown,
}

impl MigrationStatus {
    /// QEMU's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationStatus::None => "none",
            MigrationStatus::Setup => "setup",
            MigrationStatus::Cancelling => "cancelling",
            MigrationStatus::Cancelled => "cancelled",
            MigrationStatus::Active => "active",
            MigrationStatus::PostcopyActive => "postcopy-active",
            MigrationStatus::PostcopyPaused => "postcopy-paused",
            MigrationStatus::PostcopyRecover => "postcopy-recover",
            MigrationStatus::Completed => "completed",
            MigrationStatus::Failed => "failed",
            MigrationStatus::Colo => "colo",
            MigrationStatus::PreSwitchover => "pre-switchover",
            MigrationStatus::Device => "device",
            MigrationStatus::WaitUnplug => "wait-unplug",
            MigrationStatus::Unknown => "unknown",
        }
    }

    /// Ended, one way or the other.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled
        )
    }
}

impl std::fmt::Display for MigrationStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `query-migrate`'s answer. Before any migration QEMU answers `{}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationInfo {
    pub status: Option<MigrationStatus>,
    /// RAM statistics, once the migration has left `setup`.
    pub ram: Option<RamStats>,
    /// Where an incoming migration listens.
    pub socket_address: Option<Vec<SocketAddress>>,
    /// Only while auto-converge throttles the guest.
    pub cpu_throttle_percentage: Option<u64>,
    pub error_desc: Option<String>,
    pub total_time: Option<u64>,
    pub downtime: Option<u64>,
    pub expected_downtime: Option<u64>,
}

impl MigrationInfo {
    /// The status, `none` when QEMU names none (no migration yet).
    pub fn status(&self) -> MigrationStatus {
        self.status.unwrap_or(MigrationStatus::None)
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RamStats {
    pub transferred: u64,
    pub remaining: u64,
    pub total: u64,
    pub dirty_pages_rate: u64,
    pub page_size: u64,
    pub mbps: f64,
    pub dirty_sync_count: u64,
}

/// An address QEMU listens on (`inet` with host and port as strings).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SocketAddress {
    #[serde(rename = "type")]
    pub kind: String,
    pub host: Option<String>,
    pub port: Option<String>,
}

/// `query-jobs`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct QueryJobs;
impl Command for QueryJobs {
    const NAME: &'static str = "query-jobs";
    type Reply = Vec<JobInfo>;
    const ARGS: bool = false;
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct JobInfo {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub status: JobStatus,
    pub current_progress: u64,
    pub total_progress: u64,
    pub error: Option<String>,
}

/// A block job's state (`query-jobs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobStatus {
    Undefined,
    Created,
    Running,
    Paused,
    Ready,
    Standby,
    Waiting,
    Pending,
    Aborting,
    Concluded,
    Null,
    #[serde(other)]
    Unknown,
}

/// `query-block-jobs`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct QueryBlockJobs;
impl Command for QueryBlockJobs {
    const NAME: &'static str = "query-block-jobs";
    type Reply = Vec<BlockJobInfo>;
    const ARGS: bool = false;
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockJobInfo {
    pub device: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub offset: u64,
    pub len: u64,
    pub ready: bool,
    pub status: JobStatus,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_field_is_an_error_not_a_zero() {
        let ok: MigrationInfo = serde_json::from_value(serde_json::json!({
            "status": "active",
            "ram": {"transferred": 5, "remaining": 7, "total": 12, "dirty-pages-rate": 0,
                    "page-size": 4096, "mbps": 1.5, "dirty-sync-count": 1, "duplicate": 3}
        }))
        .unwrap();
        assert_eq!(ok.status(), MigrationStatus::Active);
        assert_eq!(ok.ram.unwrap().remaining, 7);
        let e = serde_json::from_value::<MigrationInfo>(serde_json::json!({
            "status": "active", "ram": {"transferred": 5, "total": 12}
        }));
        assert!(e.is_err(), "a RAM block without 'remaining' decoded");
        // Before any migration: {}.
        let none: MigrationInfo = serde_json::from_value(serde_json::json!({})).unwrap();
        assert_eq!(none.status(), MigrationStatus::None);
        // A phase of a newer QEMU is kept as unknown, not an error.
        let new: MigrationInfo =
            serde_json::from_value(serde_json::json!({"status": "postcopy-recover-setup"}))
                .unwrap();
        assert_eq!(new.status(), MigrationStatus::Unknown);
        assert_eq!(
            serde_json::to_value(MigrateContinue {
                state: MigrationStatus::PreSwitchover
            })
            .unwrap(),
            serde_json::json!({"state": "pre-switchover"})
        );
        assert_eq!(
            serde_json::to_value(BlockdevDel {
                node_name: "d".into()
            })
            .unwrap(),
            serde_json::json!({"node-name": "d"})
        );
    }
}
