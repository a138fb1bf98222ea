//! Replicated volumes (pool type `replicated`): the cluster's record of a volume and the
//! status each host reports about its copy.

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use utoipa::ToSchema;

/// A generation: the `n`-th promotion of a volume, made by `host`. Two hosts that
/// promote from the same point during a partition make different generations.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema)]
pub struct GenId {
    pub n: u64,
    pub host: String,
}

impl std::fmt::Display for GenId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.n, self.host)
    }
}

/// The cluster's record of a replicated volume (`/cluster/replicas/{pool}/{volume}`):
/// who may write (the primary) and in which generation, and which copies are outdated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ReplicatedVolume {
    pub pool: String,
    pub name: String,
    pub size: u64,
    pub hosts: Vec<String>,
    /// The host that may write, if any.
    pub primary: Option<String>,
    /// The newest generation; only a copy that has it may become primary.
    pub generation: GenId,
    /// The generation `generation` was promoted from: the promoting host's copy was
    /// there when the record named it primary. Lets that host resume its promotion if
    /// it failed before its copy took the new generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promoted_from: Option<GenId>,
    /// The highest generation number ever recorded (a resolve may set `generation`
    /// back): a promotion numbers above it, so no generation is ever made twice.
    #[serde(default)]
    pub max_n: u64,
    /// Hosts whose copy misses writes (a primary wrote without them).
    #[serde(default)]
    pub outdated: BTreeSet<String>,
    /// Set when two copies both took writes the other lacks; cleared by `resolve`.
    #[serde(default)]
    pub split_brain: Option<String>,
    /// Replication switched off by the admin (`ferry volume disconnect`).
    #[serde(default)]
    pub disconnected: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum PeerState {
    /// Not connected (the primary keeps trying).
    Connecting,
    /// Receiving the regions it lacks.
    Syncing,
    UpToDate,
    /// Replication switched off by the admin.
    StandAlone,
    /// The connection is refused: split brain or a stale copy (see `reason`).
    Refused,
}

/// A primary's view of one peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PeerStatus {
    pub host: String,
    pub state: PeerState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Bytes the peer lacks (its dirty bitmap).
    pub out_of_sync_bytes: u64,
    /// Resync progress.
    pub sync_done_bytes: u64,
    pub sync_total_bytes: u64,
}

/// One host's copy of a replicated volume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ReplicaStatus {
    pub host: String,
    pub primary: bool,
    /// The generation this copy's data belongs to (None: a new copy not yet synced).
    pub generation: Option<GenId>,
    pub history: Vec<GenId>,
    /// Complete for its generation (false during a resync).
    pub uptodate: bool,
    /// Extents in the activity log.
    pub active_extents: usize,
    /// The primary's peers (empty on a secondary).
    pub peers: Vec<PeerStatus>,
    /// The unix socket of the NBD export.
    pub nbd_socket: String,
    pub allocated_bytes: u64,
}

/// A replicated volume: the record and each host's copy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ReplicationStatus {
    pub volume: ReplicatedVolume,
    /// Per host: its copy, or why it could not be asked.
    pub replicas: Vec<ReplicaOrError>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ReplicaOrError {
    pub host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<ReplicaStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Online verify: both copies compared chunk by chunk (MD5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VerifyReport {
    pub peer: String,
    pub bytes_compared: u64,
    pub chunk_bytes: u64,
    /// Offsets of the chunks that differ (marked out of sync on the peer).
    pub differing: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct PromoteRequest {
    /// Promote even if this copy is outdated, another host is primary, or the record
    /// has a newer generation (the admin accepts the risk of a split brain).
    #[serde(default)]
    pub force: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResolveRequest {
    /// The host whose copy survives; the others keep theirs as a file
    /// `{volume}.splitbrain-{generation}` and are synced in full from the survivor.
    pub keep: String,
}

/// Host to host: make this host's copy of a volume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LocalCopy {
    pub pool: String,
    pub volume: String,
    pub size: u64,
    /// The first generation of a brand-new volume (all copies start identical, empty);
    /// None: a new copy of an existing volume, synced in full.
    pub generation: Option<GenId>,
}
