//! Live-restore (`ferry backup restore ID --as NAME --live`): the VM runs at once from
//! its backup while its disks fill in the background (Proxmox's live-restore, Veeam's
//! instant recovery).
//!
//! Each disk is a new, empty qcow2 volume whose backing is the backup's disk, served by
//! this daemon over NBD on a socket in the VM's run dir (read-only, that VM's QEMU's
//! own). QEMU's `block-stream` copies what the volume lacks into it, then drops the
//! backing. Guest writes only ever go to the volume, so none is lost whatever happens
//! to the backup's side: while the backup cannot be read (the daemon restarting, the
//! store gone), a guest read of what is not restored yet waits a while
//! ([`ferry_qemu::RESTORE_RECONNECT_DELAY`]), then fails, and the guest pauses
//! (`rerror`/`werror=stop`) with its request kept. The watcher here resumes it and
//! restarts the stream once the backup answers again.
//!
//! The VM's record holds the restore ([`LiveRestoreInfo`]) until no disk has a backing
//! left, so a restart of the daemon, a stop and start of the VM (or an HA restart on a
//! host that reaches the store) picks it up. Until then the VM cannot be migrated,
//! snapshotted or backed up: its data is in two places.

use crate::backup::blocking;
use crate::error::{AgentError, Refusal, Result};
use crate::records::VmRecord;
use crate::Host;
use ferry_backup::store::image::DiskImage;
use ferry_qmp::commands as qc;
use ferry_replica::nbd::{Backend, Exports};
use ferry_types::LiveRestoreInfo;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The block jobs filling the disks are named `restore-disk{i}`.
pub const JOB_PREFIX: &str = "restore-";

/// The daemon's side of one VM's live-restore.
#[derive(Default)]
pub struct Restores {
    /// VM id → its NBD server's task.
    servers: HashMap<u32, tokio::task::JoinHandle<()>>,
    /// VM names a watcher follows.
    watched: std::collections::HashSet<String>,
}

/// Chunk decodes one VM's restore runs at once (a hostile QEMU's flood of reads waits
/// here instead of filling the blocking pool).
const DECODES: usize = 4;
/// Connections one restore socket takes at once (QEMU opens one per disk node).
const CONNECTIONS: usize = 16;
/// The largest read answered: one chunk.
const MAX_READ: u32 = 4 << 20;

/// A backup's disk as a read-only NBD export.
struct ImageExport(Arc<DiskImage>, Arc<tokio::sync::Semaphore>);

fn read_only() -> std::io::Error {
    std::io::Error::from_raw_os_error(libc::EPERM)
}

#[async_trait::async_trait]
impl Backend for ImageExport {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_only(&self) -> bool {
        true
    }
    fn max_read(&self) -> u32 {
        MAX_READ
    }
    async fn read(&self, offset: u64, len: u32) -> std::io::Result<Vec<u8>> {
        let _slot = self.1.acquire().await.map_err(std::io::Error::other)?;
        let img = Arc::clone(&self.0);
        tokio::task::spawn_blocking(move || img.read(offset, len as usize))
            .await
            .map_err(std::io::Error::other)?
            .map_err(|e| {
                tracing::warn!(error = %e, offset, len, "live-restore read");
                std::io::Error::other(e)
            })
    }
    async fn write(&self, _: u64, _: Vec<u8>, _: bool) -> std::io::Result<()> {
        Err(read_only())
    }
    async fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    async fn trim(&self, _: u64, _: u32, _: bool) -> std::io::Result<()> {
        Err(read_only())
    }
    async fn write_zeroes(&self, _: u64, _: u32, _: bool) -> std::io::Result<()> {
        Err(read_only())
    }
}

/// The disks of one backup, by export name (`disk{i}`).
struct BackupExports(HashMap<String, Arc<dyn Backend>>);

impl Exports for BackupExports {
    fn lookup(&self, name: &str) -> Option<Arc<dyn Backend>> {
        self.0.get(name).cloned()
    }
    fn names(&self) -> Vec<String> {
        self.0.keys().cloned().collect()
    }
}

/// A backup's disks as read-only NBD exports `disk0`, `disk1`, … (for
/// `ferry_replica::nbd::serve`).
pub fn backup_exports(images: Vec<Arc<DiskImage>>) -> Arc<dyn Exports> {
    let decodes = Arc::new(tokio::sync::Semaphore::new(DECODES));
    Arc::new(BackupExports(
        images
            .into_iter()
            .enumerate()
            .map(|(i, img)| {
                (
                    format!("disk{i}"),
                    Arc::new(ImageExport(img, Arc::clone(&decodes))) as Arc<dyn Backend>,
                )
            })
            .collect(),
    ))
}

/// Serves `exports` on `listener` until the task is aborted: at most [`CONNECTIONS`]
/// at once (more than QEMU ever opens are dropped). `label` names whose it is in logs.
pub(crate) fn serve_nbd(
    listener: tokio::net::UnixListener,
    exports: Arc<dyn Exports>,
    label: String,
) -> tokio::task::JoinHandle<()> {
    let conns = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS));
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((s, _)) => {
                    let Ok(slot) = Arc::clone(&conns).try_acquire_owned() else {
                        tracing::warn!(%label, "backup NBD: too many connections");
                        continue;
                    };
                    let ex = Arc::clone(&exports);
                    tokio::spawn(async move {
                        ferry_replica::nbd::serve(s, ex).await;
                        drop(slot);
                    });
                }
                Err(e) => {
                    tracing::warn!(%label, error = %e, "backup NBD accept");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    })
}

impl Host {
    /// Where VM `id`'s backup is served while it live-restores.
    pub fn restore_socket(&self, id: u32) -> PathBuf {
        self.run_paths(id).dir.join("restore.sock")
    }

    /// Opens every disk of the backup `lr` names (checked: complete, indexes whole).
    pub(crate) async fn open_restore_images(
        &self,
        lr: &LiveRestoreInfo,
        disks: usize,
    ) -> Result<Vec<Arc<DiskImage>>> {
        let (_, store) = self.open_backup_store(&lr.store).await?;
        let backup = lr.backup.clone();
        blocking(move || {
            (0..disks)
                .map(|i| {
                    DiskImage::open(Arc::clone(&store), &backup, &format!("disk{i}"), None)
                        .map(Arc::new)
                })
                .collect()
        })
        .await
    }

    /// Serves the backup of live-restoring VM `rec` on its socket (once; a running
    /// server is kept), owned by the VM's QEMU user.
    pub(crate) async fn serve_restore(&self, rec: &VmRecord) -> Result<()> {
        let Some(lr) = &rec.live_restore else {
            return Ok(());
        };
        if self
            .restores()
            .servers
            .get(&rec.id)
            .is_some_and(|t| !t.is_finished())
        {
            return Ok(());
        }
        let images = self.open_restore_images(lr, rec.spec.disks.len()).await?;
        let exports = backup_exports(images);
        let sock = self.restore_socket(rec.id);
        let io = |what: String| move |source| AgentError::Io { what, source };
        let dir = self.run_paths(rec.id).dir;
        std::fs::create_dir_all(&dir).map_err(io(format!("Create {}", dir.display())))?;
        let _ = std::fs::remove_file(&sock);
        let listener = tokio::net::UnixListener::bind(&sock)
            .map_err(io(format!("Listen on {}", sock.display())))?;
        if let Some(who) = self.qemu_identity(rec.id)? {
            crate::confine::own(&sock, who.uid, who.gid, 0o600)?;
        } else {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))
                .map_err(io(format!("chmod {}", sock.display())))?;
        }
        let task = serve_nbd(listener, exports, rec.spec.name.clone());
        if let Some(old) = self.restores().servers.insert(rec.id, task) {
            old.abort();
        }
        Ok(())
    }

    fn stop_restore_server(&self, id: u32) {
        if let Some(t) = self.restores().servers.remove(&id) {
            t.abort();
        }
        let _ = std::fs::remove_file(self.restore_socket(id));
    }

    fn restores(&self) -> std::sync::MutexGuard<'_, Restores> {
        self.inner
            .restores
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Refuses `what` on a VM whose disks still fill from a backup.
    pub fn refuse_live_restoring(&self, rec: &VmRecord, what: &str) -> Result<()> {
        match &rec.live_restore {
            Some(lr) => Err(AgentError::refused(
                Refusal::Busy,
                format!(
                    "{} is being live-restored from backup {} (its disks still fill): {what} once it has finished",
                    rec.spec.name, lr.backup
                ),
            )),
            None => Ok(()),
        }
    }

    /// Follows VM `name`'s live-restore to its end (once per VM; returns at once when
    /// a watcher runs).
    pub(crate) fn watch_live_restore(&self, name: &str) {
        if !self.restores().watched.insert(name.to_string()) {
            return;
        }
        let h = self.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            h.live_restore_loop(&name).await;
            h.restores().watched.remove(&name);
        });
    }

    async fn live_restore_loop(&self, name: &str) {
        // disk index → when its stream may be started again, and how often it was
        let mut backoff: HashMap<usize, (Instant, u32)> = HashMap::new();
        let mut id = None;
        let mut last: Option<LiveRestoreInfo> = None;
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let rec = match self.record(name).await {
                Ok((r, _)) => r,
                Err(AgentError::NotFound(_)) => {
                    // deleted: nothing to serve any more, the backup let go
                    if let Some(id) = id {
                        self.stop_restore_server(id);
                    }
                    if let Some(lr) = last.filter(|l| l.held) {
                        self.release_backup(&lr).await;
                    }
                    return;
                }
                Err(_) => continue,
            };
            if id.is_some_and(|i| i != rec.id) {
                // another VM by this name now
                if let Some(old) = id {
                    self.stop_restore_server(old);
                }
            }
            id = Some(rec.id);
            let Some(lr) = rec.live_restore.clone() else {
                self.stop_restore_server(rec.id);
                return;
            };
            last = Some(lr.clone());
            let Ok(qmp) = self.qmp(name) else {
                continue; // stopped: the next start serves and streams again
            };
            // served again if serving failed before (a store not mounted at start)
            if let Err(e) = self.serve_restore(&rec).await {
                tracing::warn!(vm = name, error = %e, "live-restore: cannot serve the backup");
                continue;
            }
            match self
                .live_restore_step(name, &rec, &lr, &qmp, &mut backoff)
                .await
            {
                Ok(false) => {}
                Ok(true) => {
                    if let Err(e) = self.finish_live_restore(name, rec.id, &lr, &qmp).await {
                        tracing::warn!(vm = name, error = %e, "live-restore: cannot record the end");
                        continue;
                    }
                    self.stop_restore_server(rec.id);
                    self.inner.events.emit(
                        Some(name),
                        "backup",
                        format!("live-restore of {name} from backup {} finished: its disks hold all their data", lr.backup),
                    );
                    return;
                }
                Err(e) => {
                    tracing::warn!(vm = name, error = %e, "live-restore step");
                }
            }
        }
    }

    /// The end, under the VM's operation lock (no suspend or pause in between): what
    /// the streams copied may sit in QEMU's qcow2 metadata cache, so it is flushed
    /// before the record lets the backup go (a `stop` flushes every node; a running
    /// guest pauses for that moment only); the backup's protection is released.
    async fn finish_live_restore(
        &self,
        name: &str,
        id: u32,
        lr: &LiveRestoreInfo,
        qmp: &ferry_qmp::Qmp,
    ) -> Result<()> {
        let _op = self.lock_vm(name).await;
        let (rec, _) = self.record(name).await?;
        if rec.id != id || rec.live_restore.as_ref() != Some(lr) {
            return Err(AgentError::refused(
                Refusal::Busy,
                format!("{name} changed meanwhile"),
            ));
        }
        flush_all(qmp).await?;
        self.update_record(name, |r| {
            if r.id == id {
                r.live_restore = None;
            }
        })
        .await?;
        if lr.held {
            self.release_backup(lr).await;
        }
        Ok(())
    }

    /// Lets the backup a live-restore protected go, unless another live-restore on
    /// this host reads it too.
    pub(crate) async fn release_backup(&self, lr: &LiveRestoreInfo) {
        let others = self.records().await.map(|rs| {
            rs.iter().any(|r| {
                r.live_restore
                    .as_ref()
                    .is_some_and(|o| o.backup == lr.backup && o.store == lr.store)
            })
        });
        if others.unwrap_or(true) {
            return;
        }
        let Ok((_, store)) = self.open_backup_store(&lr.store).await else {
            return;
        };
        let id = lr.backup.clone();
        if let Err(e) = blocking(move || store.set_protected(&id, false)).await {
            tracing::warn!(backup = %lr.backup, error = %e, "cannot release the backup");
        }
    }

    /// One look: streams started where missing, a guest paused on an unreachable backup
    /// resumed. True once no disk has a backing left.
    async fn live_restore_step(
        &self,
        name: &str,
        rec: &VmRecord,
        lr: &LiveRestoreInfo,
        qmp: &ferry_qmp::Qmp,
        backoff: &mut HashMap<usize, (Instant, u32)>,
    ) -> Result<bool> {
        let n = rec.spec.disks.len();
        let blocks = qmp.run(&qc::QueryBlock).await?;
        let jobs = qmp.run(&qc::QueryJobs).await?;
        // A fill that ended: its error told, the job gone (a finished one leaves the
        // disk without backing, which the next look sees).
        for j in jobs
            .iter()
            .filter(|j| j.id.starts_with(JOB_PREFIX) && j.status == qc::JobStatus::Concluded)
        {
            if let Some(e) = &j.error {
                let disk = &j.id[JOB_PREFIX.len()..];
                tracing::warn!(vm = name, disk, error = %e, "live-restore fill failed");
                self.inner.events.emit(
                    Some(name),
                    "backup",
                    format!("live-restore of {name}: filling {disk} stopped: {e}"),
                );
            }
            let _ = qmp.run(&qc::JobDismiss { id: j.id.clone() }).await;
        }
        let mut done = true;
        for i in 0..n {
            let id = format!("disk{i}");
            let inserted =
                crate::blockdev::disk_block(&blocks, i).and_then(|b| b.inserted.as_ref());
            if inserted.and_then(|i| i.backing_file_depth) == Some(0) {
                continue;
            }
            done = false;
            let Some(node) = inserted.and_then(|i| i.node_name.clone()) else {
                continue;
            };
            let job = format!("{JOB_PREFIX}{id}");
            if jobs
                .iter()
                .any(|j| j.id == job && j.status != qc::JobStatus::Concluded)
            {
                continue;
            }
            let (next, tries) = backoff.get(&i).copied().unwrap_or((Instant::now(), 0));
            if Instant::now() < next {
                continue;
            }
            if tries > 0 {
                self.inner.events.emit(
                    Some(name),
                    "backup",
                    format!(
                        "live-restore of {name}: filling {id} again (try {})",
                        tries + 1
                    ),
                );
            }
            let wait = Duration::from_secs(2u64.saturating_pow(tries.min(5)).min(30));
            backoff.insert(i, (Instant::now() + wait, tries + 1));
            let started = qmp
                .run(&qc::BlockStream {
                    job_id: job,
                    device: node,
                    speed: lr.bwlimit.map(|b| b.0),
                    auto_dismiss: Some(false),
                })
                .await;
            if let Err(e) = started {
                tracing::warn!(vm = name, disk = %id, error = %e, "block-stream");
            }
        }
        // (at most every 10 s: a backup that still cannot be read pauses it again)
        let cont_ok = backoff
            .get(&usize::MAX)
            .is_none_or(|(next, _)| Instant::now() >= *next);
        if cont_ok && qmp.run(&qc::QueryStatus).await?.status == qc::RunState::IoError {
            backoff.insert(usize::MAX, (Instant::now() + Duration::from_secs(10), 0));
            // Paused on a read the backup could not answer: it answers again.
            qmp.run(&qc::Cont).await?;
            self.inner.events.emit(
                Some(name),
                "backup",
                format!("live-restore of {name}: the guest, paused while backup {} could not be read, runs again", lr.backup),
            );
        }
        Ok(done)
    }
}

/// Flushes every block node of a QEMU (`stop` does; the vCPUs run again at once if they
/// ran).
async fn flush_all(qmp: &ferry_qmp::Qmp) -> Result<()> {
    let was = qmp.run(&qc::QueryStatus).await?;
    qmp.run(&qc::Stop).await?;
    if was.running {
        qmp.run(&qc::Cont).await?;
    }
    Ok(())
}
