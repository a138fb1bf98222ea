//! Backups: backup stores (a folder, local or a mounted share, holding deduplicated
//! chunks and a catalog), backups of VMs in them, restores.

use crate::validate::{check_name, ValidationErrors};
use crate::ByteSize;
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
    /// Live-restore: the VM starts at once, reading what is not restored yet from the
    /// backup while its disks fill in the background (qcow2 volumes). Implies `start`.
    #[serde(default)]
    pub live: bool,
    /// Bytes per second a live-restore fills the disks at (none: as fast as it can).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bwlimit: Option<ByteSize>,
}

/// A VM running from a backup while its disks fill (`ferry backup restore --live`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LiveRestoreInfo {
    /// The store and backup the disks fill from.
    pub store: String,
    pub backup: String,
    /// Bytes per second the disks fill at (none: as fast as they can).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bwlimit: Option<ByteSize>,
    /// ferry protected the backup for this restore (no delete or prune takes it while
    /// the disks need it) and releases it at the end.
    #[serde(default)]
    pub held: bool,
}

impl BackupRestore {
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut e = ValidationErrors::default();
        check_name(&mut e, "as", &self.name);
        if let Some(p) = &self.pool {
            check_name(&mut e, "pool", p);
        }
        if self.bwlimit.is_some() && !self.live {
            e.push(
                "bwlimit",
                "only a live-restore fills its disks at a set rate",
            );
        }
        if self.bwlimit.is_some_and(|b| b.0 < 64 << 10) {
            e.push("bwlimit", "at least 64K per second");
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

/// Which VMs a backup job takes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct BackupSelection {
    /// Every VM of the cluster (or of `hosts`).
    pub all: bool,
    /// These VMs by name.
    pub vms: Vec<String>,
    /// Only VMs on these hosts.
    pub hosts: Vec<String>,
}

/// A scheduled backup: which VMs, to which store, when, and what to keep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BackupJobSpec {
    pub name: String,
    pub store: String,
    /// A calendar event in UTC: `daily 02:00`, `mon..fri 22:30`, `*:15`, `hourly`, `4h`.
    pub schedule: String,
    pub selection: BackupSelection,
    /// Applied to each VM's backups in the store after the job backed it up (all 0:
    /// keep everything).
    #[serde(default)]
    pub keep: BackupKeep,
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Boot each new backup to check it (a failed check counts as a failure of the
    /// job for that VM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_check: Option<BackupBootCheck>,
}

fn yes() -> bool {
    true
}

impl BackupJobSpec {
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut e = ValidationErrors::default();
        check_name(&mut e, "name", &self.name);
        check_name(&mut e, "store", &self.store);
        if !self.selection.all && self.selection.vms.is_empty() {
            e.push("selection", "name VMs, or take all (of some hosts)");
        }
        if self.selection.all && !self.selection.vms.is_empty() {
            e.push("selection", "either all VMs or a list, not both");
        }
        for v in &self.selection.vms {
            check_name(&mut e, "selection.vms", v);
        }
        for h in &self.selection.hosts {
            check_name(&mut e, "selection.hosts", h);
        }
        if self.selection.vms.len() > 10_000 {
            e.push("selection.vms", "at most 10000");
        }
        if let Some(b) = &self.boot_check {
            if b.validate().is_err() {
                e.push(
                    "boot_check",
                    "marker: 1 to 200 printable characters; timeout_s: 10 to 3600",
                );
            }
        }
        e.into_result()
    }
}

/// A backup job with what it last did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BackupJob {
    #[serde(flatten)]
    pub spec: BackupJobSpec,
    /// The scheduled minute (unix seconds) the job last ran for: a host claims a run by
    /// moving it forward (compare-and-swap), so each run happens once in the cluster.
    #[serde(default)]
    pub last_slot: i64,
    /// When it next runs (unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_run: Option<i64>,
    /// The last run: the host that ran it, when it ended, its outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_result: Option<BackupJobResult>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BackupJobResult {
    pub host: String,
    pub ended: i64,
    pub backed_up: Vec<String>,
    pub failed: Vec<BackupJobFailure>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BackupJobFailure {
    pub vm: String,
    pub error: String,
}

/// What a garbage collection of a store did.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BackupGcReport {
    /// Unfinished backups of dead writers removed first.
    pub stale_snapshots: Vec<String>,
    pub removed_chunks: u64,
    pub freed_bytes: u64,
}

/// A damaged chunk and the backups that use it.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BackupBadChunk {
    pub digest: String,
    pub error: String,
    pub backups: Vec<String>,
}

/// What a verify of a store found.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BackupVerifyReport {
    pub checked_chunks: u64,
    pub checked_bytes: u64,
    /// Encrypted chunks checked by their CRC only (no key given).
    pub crc_only: u64,
    pub bad: Vec<BackupBadChunk>,
}

/// What an entry of a backup's files is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BackupFileKind {
    /// A disk of the backup (`/disk0`).
    Disk,
    /// A filesystem of a disk: a partition (`p1`) or the whole disk (`fs`).
    Volume,
    Dir,
    File,
    Symlink,
    /// A device node, FIFO or socket.
    Other,
}

/// One entry of a folder in a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BackupFileEntry {
    /// The name (invalid UTF-8 replaced: `utf8` is false then, and the entry is
    /// reached through its folder's archive).
    pub name: String,
    pub utf8: bool,
    pub kind: BackupFileKind,
    /// Bytes (files; a disk's or volume's size).
    pub size: u64,
    /// Last modification, Unix seconds (0 for disks and volumes).
    pub mtime: i64,
    /// Permission bits.
    pub mode: u32,
    /// A symbolic link's target (never followed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// A volume's filesystem (`ext4`, `xfs`, `vfat`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs: Option<String>,
    /// Why a volume cannot be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A folder of a backup (`ferry backup files ID PATH`): `/` lists the disks,
/// `/disk0` a disk's volumes, `/disk0/p1/etc` a folder inside one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BackupFiles {
    pub backup: String,
    pub path: String,
    pub entries: Vec<BackupFileEntry>,
    /// The folder holds more entries than one listing carries (the first ones).
    pub truncated: bool,
}

/// Boot a backup to check it (Veeam's SureBackup): its disks as throw-away overlays on
/// the backup, its NICs on a hub of their own inside QEMU (nothing reaches a network),
/// until `marker` shows on the serial console or `timeout_s` passes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BackupBootCheck {
    /// Text the guest prints on its serial console once it is up (default `login:`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub marker: Option<String>,
    /// Seconds to wait for it (default 300, 10 to 3600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u32>,
}

impl BackupBootCheck {
    pub const DEFAULT_MARKER: &'static str = "login:";
    pub const DEFAULT_TIMEOUT_S: u32 = 300;

    pub fn marker(&self) -> &str {
        self.marker.as_deref().unwrap_or(Self::DEFAULT_MARKER)
    }
    pub fn timeout_s(&self) -> u32 {
        self.timeout_s.unwrap_or(Self::DEFAULT_TIMEOUT_S)
    }

    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut e = ValidationErrors::default();
        if let Some(m) = &self.marker {
            if m.is_empty() || m.len() > 200 || m.chars().any(|c| c.is_control()) {
                e.push("marker", "1 to 200 printable characters");
            }
        }
        if let Some(t) = self.timeout_s {
            if !(10..=3600).contains(&t) {
                e.push("timeout_s", "10 to 3600 seconds");
            }
        }
        e.into_result()
    }
}

/// What a boot check saw.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BackupBootCheckResult {
    pub backup: String,
    pub vm: String,
    /// The marker showed in time.
    pub booted: bool,
    /// Seconds from QEMU's start to the marker (or to giving up).
    pub seconds: f64,
    pub marker: String,
    /// The end of the serial console (the last 2 KiB, control characters removed).
    pub console: String,
    /// Why the check ended before its time without the marker (QEMU ended, the guest
    /// wrote too much).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Copy backups in from another ferry's store (`ferry backup sync`): a second site
/// keeps the first one's backups. Pulled over HTTPS with an API token of the source
/// (Modify on `/backup-stores` there); chunks come as the source keeps them (encrypted
/// ones stay sealed), several at a time, only those this store lacks.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BackupSync {
    /// The source's API, `https://host:8470`.
    pub url: String,
    /// The store there.
    pub remote_store: String,
    /// An API token of the source (`USER!ID=SECRET`); used for this sync only, never
    /// kept.
    pub token: String,
    /// The source's CA certificate (PEM) its API's certificate is checked against.
    pub ca_pem: String,
    /// Only this VM's backups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
}

impl std::fmt::Debug for BackupSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupSync")
            .field("url", &self.url)
            .field("remote_store", &self.remote_store)
            .field("token", &"<secret>")
            .field("vm", &self.vm)
            .finish()
    }
}

impl BackupSync {
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut e = ValidationErrors::default();
        let rest = self.url.strip_prefix("https://").unwrap_or("");
        if rest.is_empty()
            || self.url.len() > 512
            || rest.contains(['@', '?', '#', ' '])
            || self.url.chars().any(char::is_control)
        {
            e.push(
                "url",
                "the source's API as https://host[:port] (no user, query or fragment)",
            );
        }
        check_name(&mut e, "remote_store", &self.remote_store);
        if self.token.is_empty()
            || self.token.len() > 512
            || self.token.chars().any(|c| c.is_control())
        {
            e.push("token", "an API token of the source");
        }
        if !self.ca_pem.contains("BEGIN CERTIFICATE") || self.ca_pem.len() > 64 << 10 {
            e.push("ca_pem", "the source's CA certificate, PEM");
        }
        if let Some(v) = &self.vm {
            check_name(&mut e, "vm", v);
        }
        e.into_result()
    }
}

/// What a sync did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BackupSyncReport {
    /// Backups copied in now.
    pub copied: Vec<String>,
    /// Backups this store had already.
    pub present: u64,
    pub failed: Vec<BackupSyncFailure>,
    pub chunks_fetched: u64,
    pub bytes_fetched: u64,
    /// Chunks of the copied backups this store had already.
    pub chunks_reused: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BackupSyncFailure {
    pub backup: String,
    pub error: String,
}

/// A backup as a sync reads it: its rows, its VM definition, each disk's complete
/// index (chunk names, hex).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BackupIndex {
    pub backup: Backup,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
    pub disks: Vec<BackupIndexDisk>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BackupIndexDisk {
    pub name: String,
    pub size: u64,
    pub mode: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub chunks: Vec<String>,
}
