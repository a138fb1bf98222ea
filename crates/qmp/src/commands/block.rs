//! Block devices, jobs and hot-plug: the commands and their replies.

use super::{Command, Empty};
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A command whose argument is one of QEMU's large unions (a block node, a device, a
/// netdev, a QOM object), built as JSON by `ferry_qemu` from the VM's spec.
macro_rules! object_command {
    ($(#[$m:meta])* $t:ident, $name:literal) => {
        $(#[$m])*
        #[derive(Debug, Clone, Serialize)]
        #[serde(transparent)]
        pub struct $t(pub Value);
        impl Command for $t {
            const NAME: &'static str = $name;
            type Reply = Empty;
        }
    };
}

object_command!(
    /// `blockdev-add`: a block node (its driver, file, format, cache).
    BlockdevAdd,
    "blockdev-add"
);
object_command!(
    /// `device_add`: a guest device (disk, NIC).
    DeviceAdd,
    "device_add"
);
object_command!(
    /// `netdev_add`: a network back end (a tap QEMU was handed).
    NetdevAdd,
    "netdev_add"
);
object_command!(
    /// `object-add`: a QOM object (TLS credentials, an authorisation list).
    ObjectAdd,
    "object-add"
);

/// `query-block`: every block device with the node inserted in it.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct QueryBlock;
impl Command for QueryBlock {
    const NAME: &'static str = "query-block";
    type Reply = Vec<BlockInfo>;
    const ARGS: bool = false;
}

#[derive(Debug, Clone, Deserialize)]
pub struct BlockInfo {
    pub device: String,
    /// The guest device's QOM path or id (absent for devices without one).
    #[serde(default)]
    pub qdev: Option<String>,
    /// The medium (absent when a drive is empty).
    #[serde(default)]
    pub inserted: Option<BlockInserted>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockInserted {
    /// QEMU names every node ferry adds; the schema has it optional.
    #[serde(default)]
    pub node_name: Option<String>,
    /// How many backing images the node has (absent: not known — never read as 0).
    /// QEMU spells this one with underscores.
    #[serde(default, rename = "backing_file_depth")]
    pub backing_file_depth: Option<u64>,
}

/// `query-blockstats` of the guest devices (not every node).
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct QueryBlockstats {
    pub query_nodes: bool,
}
impl Command for QueryBlockstats {
    const NAME: &'static str = "query-blockstats";
    type Reply = Vec<BlockStatsEntry>;
}

#[derive(Debug, Clone, Deserialize)]
pub struct BlockStatsEntry {
    #[serde(default)]
    pub qdev: Option<String>,
    pub stats: BlockDeviceStats,
}

#[derive(Debug, Clone, Copy, Deserialize)]
pub struct BlockDeviceStats {
    pub rd_bytes: u64,
    pub wr_bytes: u64,
    pub rd_operations: u64,
    pub wr_operations: u64,
}

/// `eject`: empties a removable drive.
#[derive(Debug, Clone, Serialize)]
pub struct Eject {
    pub id: String,
    pub force: bool,
}
impl Command for Eject {
    const NAME: &'static str = "eject";
    type Reply = Empty;
}

/// `blockdev-change-medium`: puts an image into a removable drive.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevChangeMedium {
    pub id: String,
    pub filename: std::path::PathBuf,
    pub format: String,
    /// `read-only` for ISOs.
    pub read_only_mode: String,
}
impl Command for BlockdevChangeMedium {
    const NAME: &'static str = "blockdev-change-medium";
    type Reply = Empty;
}

/// `block_resize`: grows a node while the guest runs.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockResize {
    pub node_name: String,
    pub size: u64,
}
impl Command for BlockResize {
    const NAME: &'static str = "block_resize";
    type Reply = Empty;
}

/// `transaction`: actions that happen together or not at all.
#[derive(Debug, Clone, Serialize)]
pub struct Transaction {
    pub actions: Vec<TransactionAction>,
}
impl Command for Transaction {
    const NAME: &'static str = "transaction";
    type Reply = Empty;
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", content = "data", rename_all = "kebab-case")]
pub enum TransactionAction {
    /// An internal snapshot of one node (a disk-only snapshot of a running VM).
    BlockdevSnapshotInternalSync {
        device: String,
        name: String,
    },
    BlockDirtyBitmapAdd(super::BlockDirtyBitmapAdd),
    BlockDirtyBitmapRemove(super::BitmapRef),
    BlockDirtyBitmapEnable(super::BitmapRef),
    BlockDirtyBitmapDisable(super::BitmapRef),
    BlockDirtyBitmapMerge(super::BlockDirtyBitmapMerge),
}

/// `blockdev-snapshot-delete-internal-sync`: removes an internal snapshot of a node.
#[derive(Debug, Clone, Serialize)]
pub struct BlockdevSnapshotDeleteInternalSync {
    pub device: String,
    pub name: String,
}
impl Command for BlockdevSnapshotDeleteInternalSync {
    const NAME: &'static str = "blockdev-snapshot-delete-internal-sync";
    /// The removed snapshot's details (not read).
    type Reply = IgnoredAny;
}

/// A snapshot job: RAM and device state (in the node `vmstate`) and every node in
/// `devices`, under `tag`.
macro_rules! snapshot_job {
    ($(#[$m:meta])* $t:ident, $name:literal) => {
        $(#[$m])*
        #[derive(Debug, Clone, Serialize)]
        #[serde(rename_all = "kebab-case")]
        pub struct $t {
            pub job_id: String,
            pub tag: String,
            pub vmstate: String,
            pub devices: Vec<String>,
        }
        impl Command for $t {
            const NAME: &'static str = $name;
            type Reply = Empty;
        }
    };
}

snapshot_job!(
    /// `snapshot-save`: a snapshot with memory.
    SnapshotSave,
    "snapshot-save"
);
snapshot_job!(
    /// `snapshot-load`: back to a snapshot with memory.
    SnapshotLoad,
    "snapshot-load"
);

/// `snapshot-delete`: removes a snapshot from every node in `devices`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotDelete {
    pub job_id: String,
    pub tag: String,
    pub devices: Vec<String>,
}
impl Command for SnapshotDelete {
    const NAME: &'static str = "snapshot-delete";
    type Reply = Empty;
}

/// `blockdev-mirror`: copies a node into another while the guest writes to both.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevMirror {
    pub job_id: String,
    pub device: String,
    pub target: String,
    /// `full`: the whole disk.
    pub sync: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_dismiss: Option<bool>,
    /// Bytes per second (0: no limit).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub speed: Option<u64>,
}
impl Command for BlockdevMirror {
    const NAME: &'static str = "blockdev-mirror";
    type Reply = Empty;
}

/// `block-stream`: copies what `device` reads from its backing chain into it, then
/// drops the chain.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockStream {
    pub job_id: String,
    pub device: String,
    /// `false`: the concluded job stays (with its error) until `job-dismiss`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_dismiss: Option<bool>,
    /// Bytes per second (none: no limit).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub speed: Option<u64>,
}
impl Command for BlockStream {
    const NAME: &'static str = "block-stream";
    type Reply = Empty;
}

/// `block-job-cancel`: ends a mirror; at sync, the target is complete.
#[derive(Debug, Clone, Serialize)]
pub struct BlockJobCancel {
    pub device: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub force: Option<bool>,
}
impl Command for BlockJobCancel {
    const NAME: &'static str = "block-job-cancel";
    type Reply = Empty;
}

/// `block-export-add` of an NBD export of a node.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename = "nbd", rename_all = "kebab-case")]
pub struct NbdExportAdd {
    pub id: String,
    pub node_name: String,
    pub name: String,
    pub writable: bool,
}
impl Command for NbdExportAdd {
    const NAME: &'static str = "block-export-add";
    type Reply = Empty;
}

/// `nbd-server-start` on a TCP address, with TLS.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct NbdServerStart {
    pub addr: SocketAddressLegacy,
    pub tls_creds: String,
    pub tls_authz: String,
}
impl Command for NbdServerStart {
    const NAME: &'static str = "nbd-server-start";
    type Reply = Empty;
}

/// QEMU's `SocketAddressLegacy` (the form `nbd-server-start` takes).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", content = "data", rename_all = "lowercase")]
pub enum SocketAddressLegacy {
    Inet { host: String, port: String },
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// `query-block` as QEMU 10 answers (its mixed spelling): a node's backing depth
    /// is read, and a reply without it is "unknown", never 0.
    #[test]
    fn query_block_reads_the_backing_depth() {
        let r: Vec<BlockInfo> = serde_json::from_value(json!([
            {"device": "", "qdev": "/machine/peripheral/disk0/virtio-backend",
             "inserted": {"node-name": "disk0", "backing_file_depth": 1, "ro": false}},
            {"device": "", "qdev": "disk1", "inserted": {"node-name": "disk1"}}
        ]))
        .unwrap();
        let i0 = r[0].inserted.as_ref().unwrap();
        assert_eq!(i0.node_name.as_deref(), Some("disk0"));
        assert_eq!(i0.backing_file_depth, Some(1));
        assert_eq!(r[1].inserted.as_ref().unwrap().backing_file_depth, None);
        assert_eq!(
            serde_json::to_value(BlockStream {
                job_id: "restore-disk0".into(),
                device: "disk0".into(),
                auto_dismiss: Some(false),
                speed: None
            })
            .unwrap(),
            json!({"job-id": "restore-disk0", "device": "disk0", "auto-dismiss": false})
        );
    }

    /// The arguments QEMU expects, field for field.
    #[test]
    fn arguments_serialise_as_qemu_spells_them() {
        let v = |c: &dyn erased::Ser| c.value();
        assert_eq!(
            v(&Transaction {
                actions: vec![TransactionAction::BlockdevSnapshotInternalSync {
                    device: "disk0".into(),
                    name: "s1".into()
                }]
            }),
            json!({"actions": [{"type": "blockdev-snapshot-internal-sync", "data": {"device": "disk0", "name": "s1"}}]})
        );
        assert_eq!(
            v(&NbdExportAdd {
                id: "mig-disk0".into(),
                node_name: "disk0".into(),
                name: "disk0".into(),
                writable: true
            }),
            json!({"type": "nbd", "id": "mig-disk0", "node-name": "disk0", "name": "disk0", "writable": true})
        );
        assert_eq!(
            v(&NbdServerStart {
                addr: SocketAddressLegacy::Inet {
                    host: "10.0.0.2".into(),
                    port: "20001".into()
                },
                tls_creds: "c".into(),
                tls_authz: "a".into()
            }),
            json!({"addr": {"type": "inet", "data": {"host": "10.0.0.2", "port": "20001"}}, "tls-creds": "c", "tls-authz": "a"})
        );
        assert_eq!(
            v(&SnapshotDelete {
                job_id: "j".into(),
                tag: "t".into(),
                devices: vec!["disk0".into()]
            }),
            json!({"job-id": "j", "tag": "t", "devices": ["disk0"]})
        );
        assert_eq!(
            v(&BlockdevMirror {
                job_id: "j".into(),
                device: "disk0".into(),
                target: "t".into(),
                sync: "full".into(),
                auto_dismiss: None,
                speed: None
            }),
            json!({"job-id": "j", "device": "disk0", "target": "t", "sync": "full"})
        );
    }

    /// A reply lacking what QEMU always sends is an error, not a zero.
    #[test]
    fn replies_missing_fields_are_errors() {
        let ok: Vec<BlockStatsEntry> = serde_json::from_value(json!([
            {"qdev": "/machine/peripheral/disk0/virtio-backend", "stats": {"rd_bytes": 1, "wr_bytes": 2, "rd_operations": 3, "wr_operations": 4, "flush_operations": 0}}
        ]))
        .unwrap();
        assert_eq!(ok[0].stats.wr_operations, 4);
        assert!(serde_json::from_value::<Vec<BlockStatsEntry>>(
            json!([{"qdev": "x", "stats": {"rd_bytes": 1}}])
        )
        .is_err());
        let b: Vec<BlockInfo> = serde_json::from_value(json!([
            {"device": "", "qdev": "disk0", "inserted": {"node-name": "disk0"}},
            {"device": "ide1-cd0"}
        ]))
        .unwrap();
        assert_eq!(
            b[0].inserted.as_ref().unwrap().node_name.as_deref(),
            Some("disk0")
        );
        assert!(b[1].inserted.is_none());
    }

    mod erased {
        pub trait Ser {
            fn value(&self) -> serde_json::Value;
        }
        impl<T: serde::Serialize> Ser for T {
            fn value(&self) -> serde_json::Value {
                serde_json::to_value(self).unwrap()
            }
        }
    }
}
