//! Dirty bitmaps, node queries, QOM properties and local NBD exports: what a backup
//! asks of QEMU (fleecing, changed block tracking, the export ferry's reader reads).

use super::{Command, Empty};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A bitmap by node and name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BitmapRef {
    pub node: String,
    pub name: String,
}

/// `block-dirty-bitmap-add` (also a transaction action).
#[derive(Debug, Clone, Serialize)]
pub struct BlockDirtyBitmapAdd {
    pub node: String,
    pub name: String,
    /// Saved in the qcow2 image when QEMU closes it.
    pub persistent: bool,
}
impl Command for BlockDirtyBitmapAdd {
    const NAME: &'static str = "block-dirty-bitmap-add";
    type Reply = Empty;
}

/// `block-dirty-bitmap-remove`.
#[derive(Debug, Clone, Serialize)]
#[serde(transparent)]
pub struct BlockDirtyBitmapRemove(pub BitmapRef);
impl Command for BlockDirtyBitmapRemove {
    const NAME: &'static str = "block-dirty-bitmap-remove";
    type Reply = Empty;
}

/// `block-dirty-bitmap-merge` (also a transaction action): `bitmaps` (on `node`) into
/// `target`.
#[derive(Debug, Clone, Serialize)]
pub struct BlockDirtyBitmapMerge {
    pub node: String,
    pub target: String,
    pub bitmaps: Vec<String>,
}

/// `qom-set`: a property of a QOM object (e.g. which node a disk device uses).
#[derive(Debug, Clone, Serialize)]
pub struct QomSet {
    pub path: String,
    pub property: String,
    pub value: Value,
}
impl Command for QomSet {
    const NAME: &'static str = "qom-set";
    type Reply = Empty;
}

/// `nbd-server-start` on a unix socket, without TLS (the socket is the daemon's own).
#[derive(Debug, Clone, Serialize)]
pub struct NbdServerStartLocal {
    pub addr: LocalSocket,
}
impl Command for NbdServerStartLocal {
    const NAME: &'static str = "nbd-server-start";
    type Reply = Empty;
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", content = "data", rename_all = "lowercase")]
pub enum LocalSocket {
    Unix { path: String },
}

/// `block-export-add` of a read-only NBD export with dirty bitmaps.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename = "nbd", rename_all = "kebab-case")]
pub struct NbdExportBitmaps {
    pub id: String,
    pub node_name: String,
    pub name: String,
    pub writable: bool,
    pub bitmaps: Vec<BitmapRef>,
}
impl Command for NbdExportBitmaps {
    const NAME: &'static str = "block-export-add";
    type Reply = Empty;
}

/// `block-export-del`, `hard`: clients are cut off.
#[derive(Debug, Clone, Serialize)]
pub struct BlockExportDel {
    pub id: String,
    pub mode: &'static str,
}
impl Command for BlockExportDel {
    const NAME: &'static str = "block-export-del";
    type Reply = Empty;
}

/// `query-named-block-nodes` (flat): every node with its bitmaps and size.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct QueryNamedBlockNodes {
    pub flat: bool,
}
impl Command for QueryNamedBlockNodes {
    const NAME: &'static str = "query-named-block-nodes";
    type Reply = Vec<NamedNode>;
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct NamedNode {
    pub node_name: Option<String>,
    pub drv: String,
    #[serde(default)]
    pub dirty_bitmaps: Vec<BitmapInfo>,
    pub image: NodeImage,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct NodeImage {
    pub virtual_size: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BitmapInfo {
    /// Absent for QEMU's own anonymous bitmaps (block jobs, copy-before-write).
    #[serde(default)]
    pub name: Option<String>,
    pub recording: bool,
    pub busy: bool,
    pub persistent: bool,
    /// Set when the image was not closed cleanly: the bitmap cannot be trusted.
    #[serde(default)]
    pub inconsistent: bool,
    pub count: u64,
}
