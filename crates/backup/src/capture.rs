//! Backing up a running VM's disks through QEMU's fleecing, without stalling the guest:
//!
//! ```text
//!   device ──▶ ferry-cbw{i} (copy-before-write, on-cbw-error=break-snapshot)
//!                 │ file                  │ target
//!                 ▼                       ▼
//!              disk node            ferry-fleece{i} (qcow2 in the work folder)
//!   ferry-snap{i} (snapshot-access over the cbw node) ──▶ NBD export ──▶ this reader
//! ```
//!
//! With the vCPUs stopped for a moment (so all disks show one point in time), each
//! disk's filter is inserted, a new tracking bitmap is added and the old one frozen in
//! one transaction; then the guest runs on. A guest write to a block not yet read first
//! copies the old data into the fleecing image; when that image cannot take it (full,
//! slow), the *snapshot* breaks and the backup fails — the guest write goes through.
//! The reader reads only chunks that are allocated and (in an incremental) changed, and
//! hands them to the store's writer on a blocking thread. Afterwards the filters are
//! taken out again; on failure the frozen bitmap takes the new one's changes back, so
//! nothing is lost for the next incremental.

use crate::nbd::{self, NbdClient};
use crate::plan::{self, ChunkAction, Tracking};
use crate::store::catalog::DiskRow;
use crate::store::chunk::{CryptKey, Digest, CHUNK_SIZE};
use crate::store::writer::{SnapshotMeta, WriteStats};
use crate::store::{Store, StoreError};
use ferry_qmp::commands as qc;
use ferry_qmp::Qmp;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use tokio::net::UnixStream;

/// One disk of the VM as QEMU has it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DiskSource {
    /// The name the backup records (`disk0`, …).
    pub name: String,
    /// The guest device's QOM path (`/machine/peripheral/disk0`); `None` when no guest
    /// uses the node (a stopped VM's disk opened by `qemu-storage-daemon`): it is then
    /// exported as it is, without fleecing.
    pub device: Option<String>,
    /// The block node the device uses.
    pub node: String,
    /// Whether the image can keep a persistent bitmap (qcow2).
    pub persistent: bool,
}

pub struct CaptureRequest {
    pub meta: SnapshotMeta,
    pub disks: Vec<DiskSource>,
    /// A folder of the daemon's own (QEMU may not create, rename or remove entries in
    /// it) for the fleecing images: root never runs `qemu-img` on a path QEMU's user
    /// could swap for a symlink.
    pub work_dir: PathBuf,
    /// A folder QEMU may create its NBD socket in.
    pub socket_dir: PathBuf,
    /// QEMU's user and group, when it runs as one of its own: the fleecing images are
    /// handed to it.
    pub owner: Option<(u32, u32)>,
    /// The process serving the NBD export (QEMU): the socket lies in a folder QEMU's
    /// user writes, so the reader accepts only a socket this process serves (another
    /// VM's export put in its place would be read as this VM's disk).
    pub server_pid: Option<i32>,
    /// The most the fleecing images may grow to together (bytes).
    pub fleece_cap: u64,
    pub key: Option<CryptKey>,
    /// The guest's file systems frozen for the moment the disks are taken (its guest
    /// agent): the backup is then `quiesced`, else `crash`-consistent.
    pub quiesce: Option<Arc<dyn Quiesce>>,
}

/// A future a [`Quiesce`] returns.
pub type QuiesceFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// Freezes and thaws a guest's file systems (the daemon's guest agent client).
pub trait Quiesce: Send + Sync {
    /// True when frozen: [`Quiesce::thaw`] follows.
    fn freeze(&self) -> QuiesceFuture<'_, bool>;
    fn thaw(&self) -> QuiesceFuture<'_, ()>;
}

/// Progress a task reports.
#[derive(Debug, Default)]
pub struct CaptureProgress {
    pub total_bytes: AtomicU64,
    pub done_bytes: AtomicU64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DiskOutcome {
    pub name: String,
    pub size: u64,
    pub mode: String,
    pub reason: Option<String>,
    pub read_bytes: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct CaptureOutcome {
    pub id: String,
    pub consistency: String,
    pub disks: Vec<DiskOutcome>,
    pub stats: WriteStats,
}

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("QEMU refused {step}: {source}")]
    Qmp {
        step: &'static str,
        #[source]
        source: ferry_qmp::QmpError,
    },
    #[error("Reading {disk} from QEMU's export: {source}")]
    Nbd {
        disk: String,
        #[source]
        source: nbd::NbdError,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("The fleecing images outgrew their cap ({cap} bytes): the guest wrote faster than the backup read; the backup was stopped, the guest went on")]
    FleeceFull { cap: u64 },
    #[error("Backup: {0}")]
    Failed(String),
}

fn qmp_err(step: &'static str) -> impl FnOnce(ferry_qmp::QmpError) -> CaptureError {
    move |source| CaptureError::Qmp { step, source }
}

fn cbw_node(i: usize) -> String {
    format!("ferry-cbw{i}")
}
fn fleece_node(i: usize) -> String {
    format!("ferry-fleece{i}")
}
fn snap_node(i: usize) -> String {
    format!("ferry-snap{i}")
}
fn export_id(i: usize) -> String {
    format!("ferry-backup{i}")
}

/// Takes fleecing out of a VM: exports, nodes, the NBD server; each device back on its
/// disk node. Safe to run when nothing (or only part) is there: after a crash too.
pub async fn teardown(qmp: &Qmp, disks: &[DiskSource]) {
    // which node each device uses now: QEMU 10 aborts on a `qom-set drive` naming the
    // node the device already has (bdrv_replace_child_noperm: old_bs != new_bs)
    let blocks = qmp.run(&qc::QueryBlock).await.unwrap_or_default();
    for (i, d) in disks.iter().enumerate() {
        let current = d.device.as_ref().and_then(|device| {
            // QEMU names a device's block backend by its path (`…/disk0/virtio-backend`)
            // or, for some devices (scsi-hd), by its id alone
            let dev = format!("{device}/");
            let id = device.rsplit('/').next().unwrap_or(device);
            blocks
                .iter()
                .find(|b| {
                    b.qdev
                        .as_deref()
                        .is_some_and(|q| q == device || q == id || q.starts_with(&dev))
                })
                .and_then(|b| b.inserted.as_ref().and_then(|x| x.node_name.clone()))
        });
        let _ = qmp
            .run(&qc::BlockExportDel {
                id: export_id(i),
                mode: "hard",
            })
            .await;
        let _ = qmp
            .run(&qc::BlockdevDel {
                node_name: snap_node(i),
            })
            .await;
        if let (Some(device), true) = (&d.device, current.as_deref() == Some(cbw_node(i).as_str()))
        {
            let _ = qmp
                .run(&qc::QomSet {
                    path: device.clone(),
                    property: "drive".into(),
                    value: json!(d.node),
                })
                .await;
        }
        let _ = qmp
            .run(&qc::BlockdevDel {
                node_name: cbw_node(i),
            })
            .await;
        let _ = qmp
            .run(&qc::BlockdevDel {
                node_name: fleece_node(i),
            })
            .await;
    }
    let _ = qmp.run(&qc::NbdServerStop).await;
}

/// The file in the work folder naming the disks a capture under way changed.
const RECORD: &str = "fleecing.json";

/// After a daemon restart: undoes the fleecing a capture cut off left in a running VM
/// (its filters would copy every guest write into an image that only grows). Its
/// bitmaps stay as they were (the old one frozen, the new one recording): the next
/// backup finds two and reads the disks whole, saying so. Returns whether there was
/// anything to undo.
pub async fn sweep(qmp: &Qmp, work_dir: &Path) -> bool {
    let record = work_dir.join(RECORD);
    let Ok(body) = std::fs::read(&record) else {
        return false;
    };
    let disks: Vec<DiskSource> = serde_json::from_slice(&body).unwrap_or_default();
    teardown(qmp, &disks).await;
    for i in 0..disks.len() {
        let _ = std::fs::remove_file(fleece_path(work_dir, i));
    }
    let _ = std::fs::remove_file(&record);
    true
}

/// Blocking store work on a thread of its own, fed chunk by chunk.
enum Job {
    Put(
        Vec<u8>,
        tokio::sync::oneshot::Sender<Result<Digest, StoreError>>,
    ),
    Reuse(
        Vec<Digest>,
        tokio::sync::oneshot::Sender<Result<Vec<Digest>, StoreError>>,
    ),
    Disk(
        DiskRow,
        Vec<Digest>,
        tokio::sync::oneshot::Sender<Result<(), StoreError>>,
    ),
}

struct WriterThread {
    tx: tokio::sync::mpsc::Sender<Job>,
    handle: tokio::task::JoinHandle<Result<(String, WriteStats), StoreError>>,
}

impl WriterThread {
    /// Begins the snapshot on a blocking thread; returns its id once it is listed.
    async fn start(
        store: Arc<Store>,
        meta: SnapshotMeta,
        key: Option<CryptKey>,
        commit: Arc<AtomicBool>,
    ) -> Result<(Self, String), CaptureError> {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Job>(4);
        let (id_tx, id_rx) = tokio::sync::oneshot::channel();
        let handle = tokio::task::spawn_blocking(move || {
            let mut w = match store.begin(meta, key) {
                Ok(w) => w,
                Err(e) => {
                    let _ = id_tx.send(None);
                    return Err(e);
                }
            };
            let _ = id_tx.send(Some(w.id().to_string()));
            while let Some(job) = rx.blocking_recv() {
                match job {
                    Job::Put(data, r) => {
                        let _ = r.send(w.put(data));
                    }
                    Job::Reuse(d, r) => {
                        let _ = r.send(w.reuse(&d));
                    }
                    Job::Disk(row, index, r) => {
                        let _ = r.send(w.disk(row, &index));
                    }
                }
            }
            let stats = w.stats();
            let id = w.id().to_string();
            if commit.load(Ordering::SeqCst) {
                w.commit()?;
                Ok((id, stats))
            } else {
                drop(w);
                Err(StoreError::Invalid("backup abandoned".into()))
            }
        });
        match id_rx.await.ok().flatten() {
            Some(id) => Ok((WriterThread { tx, handle }, id)),
            None => match handle.await {
                Ok(Err(e)) => Err(CaptureError::Store(e)),
                _ => Err(CaptureError::Failed(
                    "the store writer did not start".into(),
                )),
            },
        }
    }

    async fn ask<T>(
        &self,
        job: impl FnOnce(tokio::sync::oneshot::Sender<Result<T, StoreError>>) -> Job,
    ) -> Result<T, CaptureError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(job(tx))
            .await
            .map_err(|_| CaptureError::Failed("the store writer stopped".into()))?;
        Ok(rx
            .await
            .map_err(|_| CaptureError::Failed("the store writer stopped".into()))??)
    }
}

/// Backs up a running VM. The caller holds the VM's operation lock (no migration, no
/// snapshot, no stop while this runs).
pub async fn capture(
    qmp: &Qmp,
    store: Arc<Store>,
    req: CaptureRequest,
    progress: &CaptureProgress,
) -> Result<CaptureOutcome, CaptureError> {
    teardown(qmp, &req.disks).await;
    std::fs::create_dir_all(&req.work_dir).map_err(|e| {
        CaptureError::Failed(format!("work folder {}: {e}", req.work_dir.display()))
    })?;
    // what to undo if the daemon dies before the end (see [`sweep`])
    let record = req.work_dir.join(RECORD);
    let body = serde_json::to_vec(&req.disks).map_err(|e| CaptureError::Failed(e.to_string()))?;
    std::fs::write(&record, body)
        .map_err(|e| CaptureError::Failed(format!("{}: {e}", record.display())))?;
    let nodes = qmp
        .run(&qc::QueryNamedBlockNodes { flat: true })
        .await
        .map_err(qmp_err("query-named-block-nodes"))?;
    // what each disk is and what tracks it
    let mut sizes = Vec::new();
    let mut decisions = Vec::new();
    for d in &req.disks {
        let node = nodes
            .iter()
            .find(|n| n.node_name.as_deref() == Some(d.node.as_str()))
            .ok_or_else(|| {
                CaptureError::Failed(format!("QEMU has no node {} for {}", d.node, d.name))
            })?;
        let size = node.image.virtual_size;
        let bitmaps: Vec<plan::BitmapState> = node
            .dirty_bitmaps
            .iter()
            .filter_map(|b| {
                Some(plan::BitmapState {
                    name: b.name.clone()?,
                    recording: b.recording,
                    inconsistent: b.inconsistent,
                })
            })
            .collect();
        let st = Arc::clone(&store);
        let disk_name = d.name.clone();
        let vm = req.meta.vm.clone();
        let lookup = move |id: &str| -> Option<plan::Base> {
            let snap = st.snapshot(id).ok().flatten()?;
            if snap.vm != vm {
                return None;
            }
            let disks = st.disks(id).ok()?;
            Some(plan::Base {
                complete: snap.state == "complete",
                disk_size: disks.iter().find(|x| x.name == disk_name).map(|x| x.size),
            })
        };
        let decision = tokio::task::block_in_place(|| {
            plan::track(&d.name, size, d.persistent, &bitmaps, &lookup)
        });
        sizes.push(size);
        decisions.push(decision);
    }
    progress
        .total_bytes
        .store(sizes.iter().sum(), Ordering::Relaxed);

    let commit = Arc::new(AtomicBool::new(false));
    // Frozen from before the backup is listed (it says how consistent it is) until
    // the filters are in: the point in time every disk is read at.
    let quiesced = match &req.quiesce {
        Some(q) => q.freeze().await,
        None => false,
    };
    let mut meta = req.meta.clone();
    meta.consistency = if quiesced { "quiesced" } else { "crash" }.into();
    let started = WriterThread::start(
        Arc::clone(&store),
        meta.clone(),
        req.key.clone(),
        Arc::clone(&commit),
    )
    .await;
    let frozen = match &started {
        Ok((_, id)) => start_fleecing(qmp, &req, &decisions, &plan::bitmap_name(id), &sizes).await,
        Err(_) => Ok(()),
    };
    if let (true, Some(q)) = (quiesced, &req.quiesce) {
        q.thaw().await;
    }
    let (writer, id) = started?;
    let new_bitmap = plan::bitmap_name(&id);
    let result = match frozen {
        Ok(()) => {
            read_all(
                qmp,
                &req,
                &decisions,
                &sizes,
                &store,
                &writer,
                &new_bitmap,
                progress,
            )
            .await
        }
        Err(e) => Err(e),
    };
    let result = match result {
        Ok(disks) => {
            commit.store(true, Ordering::SeqCst);
            drop(writer.tx);
            match writer.handle.await {
                Ok(Ok((id, stats))) => Ok((id, stats, disks)),
                Ok(Err(e)) => Err(CaptureError::Store(e)),
                Err(e) => Err(CaptureError::Failed(format!("store writer: {e}"))),
            }
        }
        Err(e) => {
            drop(writer.tx);
            let _ = writer.handle.await;
            Err(e)
        }
    };
    teardown(qmp, &req.disks).await;
    for i in 0..req.disks.len() {
        let _ = std::fs::remove_file(fleece_path(&req.work_dir, i));
    }
    finish_bitmaps(qmp, &req.disks, &decisions, &new_bitmap, result.is_ok()).await;
    let _ = std::fs::remove_file(&record);
    let (id, stats, disks) = result?;
    Ok(CaptureOutcome {
        id,
        consistency: meta.consistency,
        disks,
        stats,
    })
}

fn fleece_path(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("fleece{i}.qcow2"))
}

fn sock_path(req: &CaptureRequest) -> PathBuf {
    req.socket_dir.join("backup-nbd.sock")
}

/// Stops the vCPUs, inserts every filter, swaps bitmaps in one transaction, resumes.
async fn start_fleecing(
    qmp: &Qmp,
    req: &CaptureRequest,
    decisions: &[plan::TrackDecision],
    new_bitmap: &str,
    sizes: &[u64],
) -> Result<(), CaptureError> {
    for (i, size) in sizes.iter().enumerate() {
        if req.disks[i].device.is_none() {
            continue;
        }
        let path = fleece_path(&req.work_dir, i);
        let _ = std::fs::remove_file(&path);
        let out = tokio::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536"])
            .arg(&path)
            .arg(size.to_string())
            .output()
            .await
            .map_err(|e| CaptureError::Failed(format!("qemu-img create: {e}")))?;
        if !out.status.success() {
            return Err(CaptureError::Failed(format!(
                "qemu-img create {}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        hand_to_qemu(&path, req.owner)?;
    }
    // a guest runs only where a device uses the disks (qemu-storage-daemon has none)
    let live = req.disks.iter().any(|d| d.device.is_some());
    let running = live
        && qmp
            .run(&qc::QueryStatus)
            .await
            .map_err(qmp_err("query-status"))?
            .running;
    if running {
        qmp.run(&qc::Stop).await.map_err(qmp_err("stop"))?;
    }
    let r = insert_filters(qmp, req, decisions, new_bitmap).await;
    if running {
        if let Err(e) = qmp.run(&qc::Cont).await {
            tracing::error!(error = %e, "could not resume the VM after inserting the backup filters");
        }
    }
    r?;
    // a socket left by an earlier run (removing a symlink removes only the link)
    let _ = std::fs::remove_file(sock_path(req));
    qmp.run(&qc::NbdServerStartLocal {
        addr: qc::LocalSocket::Unix {
            path: sock_path(req).display().to_string(),
        },
    })
    .await
    .map_err(qmp_err("nbd-server-start"))?;
    for (i, (d, dec)) in req.disks.iter().zip(decisions).enumerate() {
        let exported = if d.device.is_some() {
            qmp.run(&qc::BlockdevAdd(json!({
                "driver": "snapshot-access", "node-name": snap_node(i), "file": cbw_node(i),
            })))
            .await
            .map_err(qmp_err("blockdev-add snapshot-access"))?;
            snap_node(i)
        } else {
            d.node.clone()
        };
        let bitmaps = match &dec.tracking {
            Tracking::Incremental { bitmap, .. } => vec![qc::BitmapRef {
                node: d.node.clone(),
                name: bitmap.clone(),
            }],
            Tracking::Full { .. } => Vec::new(),
        };
        qmp.run(&qc::NbdExportBitmaps {
            id: export_id(i),
            node_name: exported,
            name: d.name.clone(),
            writable: false,
            bitmaps,
        })
        .await
        .map_err(qmp_err("block-export-add"))?;
    }
    Ok(())
}

/// The fleecing image belongs to QEMU's user when QEMU runs as one.
fn hand_to_qemu(path: &Path, owner: Option<(u32, u32)>) -> Result<(), CaptureError> {
    let Some((uid, gid)) = owner else {
        return Ok(());
    };
    use std::os::unix::fs::PermissionsExt;
    nix::unistd::chown(
        path,
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(gid)),
    )
    .map_err(|e| CaptureError::Failed(format!("chown {}: {e}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| CaptureError::Failed(format!("chmod {}: {e}", path.display())))
}

async fn insert_filters(
    qmp: &Qmp,
    req: &CaptureRequest,
    decisions: &[plan::TrackDecision],
    new_bitmap: &str,
) -> Result<(), CaptureError> {
    for (i, d) in req.disks.iter().enumerate() {
        let Some(device) = &d.device else {
            continue;
        };
        qmp.run(&qc::BlockdevAdd(json!({
            "driver": "qcow2", "node-name": fleece_node(i), "discard": "unmap",
            "file": {"driver": "file", "filename": fleece_path(&req.work_dir, i).display().to_string()},
        })))
        .await
        .map_err(qmp_err("blockdev-add fleecing image"))?;
        qmp.run(&qc::BlockdevAdd(json!({
            "driver": "copy-before-write", "node-name": cbw_node(i),
            "file": d.node, "target": fleece_node(i),
            "on-cbw-error": "break-snapshot", "cbw-timeout": 60,
        })))
        .await
        .map_err(qmp_err("blockdev-add copy-before-write"))?;
        qmp.run(&qc::QomSet {
            path: device.clone(),
            property: "drive".into(),
            value: json!(cbw_node(i)),
        })
        .await
        .map_err(qmp_err("qom-set drive"))?;
    }
    let mut actions = Vec::new();
    for (d, dec) in req.disks.iter().zip(decisions) {
        if d.persistent {
            actions.push(qc::TransactionAction::BlockDirtyBitmapAdd(
                qc::BlockDirtyBitmapAdd {
                    node: d.node.clone(),
                    name: new_bitmap.to_string(),
                    persistent: true,
                },
            ));
        }
        if let Tracking::Incremental { bitmap, .. } = &dec.tracking {
            actions.push(qc::TransactionAction::BlockDirtyBitmapDisable(
                qc::BitmapRef {
                    node: d.node.clone(),
                    name: bitmap.clone(),
                },
            ));
        }
    }
    if !actions.is_empty() {
        qmp.run(&qc::Transaction { actions })
            .await
            .map_err(qmp_err("transaction (bitmaps)"))?;
    }
    Ok(())
}

/// After the backup: on success the old bitmaps go (the new one counts from this
/// backup); on failure the frozen bitmap takes the new one's changes back and records
/// on, and the new one goes.
async fn finish_bitmaps(
    qmp: &Qmp,
    disks: &[DiskSource],
    decisions: &[plan::TrackDecision],
    new_bitmap: &str,
    ok: bool,
) {
    for (d, dec) in disks.iter().zip(decisions) {
        let node = d.node.clone();
        let r = |name: &str| qc::BitmapRef {
            node: node.clone(),
            name: name.to_string(),
        };
        let mut actions = Vec::new();
        match (&dec.tracking, ok) {
            (Tracking::Incremental { bitmap, .. }, true) => {
                actions.push(qc::TransactionAction::BlockDirtyBitmapRemove(r(bitmap)));
            }
            (Tracking::Incremental { bitmap, .. }, false) => {
                if d.persistent {
                    actions.push(qc::TransactionAction::BlockDirtyBitmapMerge(
                        qc::BlockDirtyBitmapMerge {
                            node: node.clone(),
                            target: bitmap.clone(),
                            bitmaps: vec![new_bitmap.to_string()],
                        },
                    ));
                    actions.push(qc::TransactionAction::BlockDirtyBitmapRemove(r(new_bitmap)));
                }
                actions.push(qc::TransactionAction::BlockDirtyBitmapEnable(r(bitmap)));
            }
            (Tracking::Full { .. }, true) => {}
            (Tracking::Full { .. }, false) => {
                if d.persistent {
                    actions.push(qc::TransactionAction::BlockDirtyBitmapRemove(r(new_bitmap)));
                }
            }
        }
        for s in &dec.stale {
            if ok || !matches!(dec.tracking, Tracking::Incremental { .. }) {
                actions.push(qc::TransactionAction::BlockDirtyBitmapRemove(r(s)));
            }
        }
        if actions.is_empty() {
            continue;
        }
        if let Err(e) = qmp.run(&qc::Transaction { actions }).await {
            tracing::warn!(disk = %d.name, error = %e, "could not settle the tracking bitmaps; the next backup reads the whole disk");
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn read_all(
    qmp: &Qmp,
    req: &CaptureRequest,
    decisions: &[plan::TrackDecision],
    sizes: &[u64],
    store: &Arc<Store>,
    writer: &WriterThread,
    new_bitmap: &str,
    progress: &CaptureProgress,
) -> Result<Vec<DiskOutcome>, CaptureError> {
    let _ = qmp;
    let mut out = Vec::new();
    for (i, (d, dec)) in req.disks.iter().zip(decisions).enumerate() {
        let size = sizes[i];
        let dirty_ctx = match &dec.tracking {
            Tracking::Incremental { bitmap, .. } => Some(nbd::dirty_bitmap_context(bitmap)),
            Tracking::Full { .. } => None,
        };
        let mut contexts = vec![nbd::BASE_ALLOCATION];
        if let Some(c) = &dirty_ctx {
            contexts.push(c.as_str());
        }
        let nbd_err = |source| CaptureError::Nbd {
            disk: d.name.clone(),
            source,
        };
        let path = sock_path(req);
        let stream = UnixStream::connect(&path).await.map_err(|source| {
            nbd_err(nbd::NbdError::Connect {
                target: path.display().to_string(),
                source,
            })
        })?;
        if let Some(pid) = req.server_pid {
            let peer = stream.peer_cred().ok().and_then(|c| c.pid());
            if peer != Some(pid) {
                return Err(CaptureError::Failed(format!(
                    "the NBD socket of {} is served by process {peer:?}, not QEMU {pid}",
                    d.name
                )));
            }
        }
        let mut client: NbdClient<UnixStream> = NbdClient::handshake(stream, &d.name, &contexts)
            .await
            .map_err(nbd_err)?;
        if client.size() != size {
            return Err(CaptureError::Failed(format!(
                "the export of {} is {} bytes, QEMU said {size}",
                d.name,
                client.size()
            )));
        }
        let runs = |ext: Vec<nbd::Extent>, flag: u32| -> Vec<plan::Run> {
            ext.iter()
                .map(|e| (e.offset, e.len, e.flags & flag != 0))
                .collect()
        };
        let alloc_id = client
            .context_id(nbd::BASE_ALLOCATION)
            .ok_or_else(|| CaptureError::Failed("QEMU granted no base:allocation".into()))?;
        let zeros = runs(
            client
                .block_status_range(0, size, alloc_id)
                .await
                .map_err(nbd_err)?,
            nbd::STATE_ZERO,
        );
        let dirty = match &dirty_ctx {
            Some(c) => {
                let cid = client.context_id(c).ok_or_else(|| {
                    CaptureError::Failed(format!("QEMU did not export the bitmap {c}"))
                })?;
                Some(runs(
                    client
                        .block_status_range(0, size, cid)
                        .await
                        .map_err(nbd_err)?,
                    nbd::STATE_DIRTY,
                ))
            }
            None => None,
        };
        let mut actions = plan::chunks(size, CHUNK_SIZE as u64, &zeros, dirty.as_deref());
        let mut index: Vec<Option<Digest>> = vec![None; actions.len()];
        if let Tracking::Incremental { base, .. } = &dec.tracking {
            let st = Arc::clone(store);
            let (b, name) = (base.clone(), d.name.clone());
            let base_index = tokio::task::spawn_blocking(move || st.index(&b, &name))
                .await
                .map_err(|e| CaptureError::Failed(e.to_string()))??;
            if base_index.len() != actions.len() {
                return Err(CaptureError::Failed(format!(
                    "backup {base} has {} chunks of {}, the disk {}",
                    base_index.len(),
                    d.name,
                    actions.len()
                )));
            }
            let reuse: Vec<Digest> = actions
                .iter()
                .zip(&base_index)
                .filter(|(a, _)| **a == ChunkAction::Reuse)
                .map(|(_, d)| *d)
                .collect();
            let missing = writer.ask(|tx| Job::Reuse(reuse, tx)).await?;
            for (j, a) in actions.iter_mut().enumerate() {
                if *a == ChunkAction::Reuse {
                    if missing.contains(&base_index[j]) {
                        *a = ChunkAction::Read;
                    } else {
                        index[j] = Some(base_index[j]);
                    }
                }
            }
        }
        let mut read_bytes = 0u64;
        for (j, a) in actions.iter().enumerate() {
            let offset = j as u64 * CHUNK_SIZE as u64;
            let len = (size - offset).min(CHUNK_SIZE as u64);
            check_fleece(&req.work_dir, req.disks.len(), req.fleece_cap)?;
            let data = match a {
                ChunkAction::Reuse => {
                    progress.done_bytes.fetch_add(len, Ordering::Relaxed);
                    continue;
                }
                ChunkAction::Zero => vec![0u8; usize::try_from(len).unwrap_or(CHUNK_SIZE)],
                ChunkAction::Read => {
                    read_bytes += len;
                    let n = u32::try_from(len).unwrap_or(u32::MAX);
                    client.read(offset, n).await.map_err(nbd_err)?
                }
            };
            let digest = writer.ask(|tx| Job::Put(data, tx)).await?;
            index[j] = Some(digest);
            progress.done_bytes.fetch_add(len, Ordering::Relaxed);
        }
        let _ = client.disconnect().await;
        let index: Vec<Digest> = index
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| CaptureError::Failed(format!("chunks of {} left unread", d.name)))?;
        let (mode, reason) = match &dec.tracking {
            Tracking::Incremental { .. } => ("incremental".to_string(), None),
            Tracking::Full { reason } => ("full".to_string(), Some(reason.clone())),
        };
        let row = DiskRow {
            name: d.name.clone(),
            size,
            mode: mode.clone(),
            reason: reason.clone(),
            read_bytes,
            new_bytes: 0,
            chunks: 0,
            bitmap: d.persistent.then(|| new_bitmap.to_string()),
        };
        writer.ask(|tx| Job::Disk(row, index, tx)).await?;
        out.push(DiskOutcome {
            name: d.name.clone(),
            size,
            mode,
            reason,
            read_bytes,
        });
    }
    Ok(out)
}

fn check_fleece(dir: &Path, n: usize, cap: u64) -> Result<(), CaptureError> {
    use std::os::unix::fs::MetadataExt;
    let used: u64 = (0..n)
        .filter_map(|i| std::fs::metadata(fleece_path(dir, i)).ok())
        .map(|m| m.blocks() * 512)
        .sum();
    if used > cap {
        return Err(CaptureError::FleeceFull { cap });
    }
    Ok(())
}
