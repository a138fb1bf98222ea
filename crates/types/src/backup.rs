//! Backups: backup stores (a folder, local or a mounted share, holding deduplicated
//! chunks and a catalog), backups of VMs in them, restores.

use crate::validate::{check_name, ValidationErrors};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A backup store the cluster knows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BackupStore {
    pub name: String,
    /// Its folder on every host (local disk, or a share mounted at the same path).
    pub path: String,
    pub created_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BackupStoreCreate {
    pub name: String,
    /// An absolute path: an empty or missing folder (made), or a store made earlier
    /// (another cluster's, or one defined again: it is adopted as it is).
    pub path: String,
}

impl BackupStoreCreate {
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut e = ValidationErrors::default();
        check_name(&mut e, "name", &self.name);
        let p = std::path::Path::new(&self.path);
        if !p.is_absolute() {
            e.push("path", "must be an absolute path");
        } else if p
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            e.push("path", "must not contain '..'");
        } else if self.path.len() > 4096 {
            e.push("path", "is too long");
        }
        e.into_result()
    }
}

/// What a store holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BackupStoreUsage {
    pub backups: u64,
    pub chunks: u64,
    /// Bytes the chunks take in the store.
    pub stored_bytes: u64,
    /// Plain bytes of every disk of every backup.
    pub logical_bytes: u64,
    /// Chunks no backup uses any more (freed by the next garbage collection).
    pub unreferenced_chunks: u64,
    /// `logical_bytes / stored_bytes`.
    pub dedup_factor: f64,
    /// Free space of the store's file system.
    pub free_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BackupStoreInfo {
    #[serde(flatten)]
    pub store: BackupStore,
    /// The store's own id (from its folder).
    pub id: String,
    pub usage: BackupStoreUsage,
}

/// Back a VM up now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BackupRun {
    pub vm: String,
    pub store: String,
}

/// One disk of a backup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BackupDisk {
    pub name: String,
    pub size: u64,
    /// `full` or `incremental`.
    pub mode: String,
    /// Why the disk was read whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Bytes read from the VM for this backup.
    pub read_bytes: u64,
    /// Plain bytes the store did not have yet.
    pub new_bytes: u64,
}

/// A backup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Backup {
    pub id: String,
    pub store: String,
    pub vm: String,
    /// The host that took it.
    pub host: String,
    /// Unix seconds.
    pub started: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished: Option<i64>,
    /// `complete`, or `writing` while it is taken.
    pub state: String,
    /// `quiesced` (the guest agent froze the file systems) or `crash` (as after a
    /// power cut: journaling file systems recover).
    pub consistency: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_fingerprint: Option<String>,
    pub protected: bool,
    pub disks: Vec<BackupDisk>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BackupList {
    pub backups: Vec<Backup>,
}

/// Restore a backup as a new VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BackupRestore {
    /// The new VM's name.
    #[serde(rename = "as")]
    pub name: String,
    /// The pool for its disks (default: each disk's pool in the backup, if this host
    /// has it, else `default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Start it when restored.
    #[serde(default)]
    pub start: bool,
}

impl BackupRestore {
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut e = ValidationErrors::default();
        check_name(&mut e, "as", &self.name);
        if let Some(p) = &self.pool {
            check_name(&mut e, "pool", p);
        }
        e.into_result()
    }
}

/// Keep rules for pruning (each 0 = not used; all 0 = keep everything).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct BackupKeep {
    pub last: u32,
    pub hourly: u32,
    pub daily: u32,
    pub weekly: u32,
    pub monthly: u32,
    pub yearly: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BackupPrune {
    pub store: String,
    pub vm: String,
    pub keep: BackupKeep,
    /// Only say what would go.
    #[serde(default)]
    pub dry_run: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PruneVerdict {
    pub id: String,
    pub keep: bool,
    /// The rule that keeps it, or `pruned`.
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PruneResult {
    pub verdicts: Vec<PruneVerdict>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BackupVerify {
    /// Only chunks of backups finished within this many days.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_days: Option<u32>,
}
