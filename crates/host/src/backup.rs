//! Backups as this host runs them (`ferry_backup` does the work): the cluster's backup
//! stores (definitions in the shared store; each a folder every host sees at the same
//! path), a backup of one of this host's VMs — running: fleecing in its QEMU; stopped:
//! its disks opened by `qemu-storage-daemon` —, listing, restoring as a new VM on this
//! host, prune, garbage collection, verify. Store work blocks (files, SQLite): it runs
//! on `spawn_blocking`.

use crate::error::{AgentError, Failure, Refusal, Result};
use crate::tasks::TaskCtx;
use crate::Host;
use ferry_backup::capture::{self, CaptureProgress, CaptureRequest, DiskSource};
use ferry_backup::offline::{self, OfflineDisk, OfflineRequest};
use ferry_backup::retention::Keep;
use ferry_backup::store::reader::Progress;
use ferry_backup::store::writer::SnapshotMeta;
use ferry_backup::store::{Store, StoreError};
use ferry_store::{keys, StoreJson};
use ferry_types::{
    Backup, BackupDisk, BackupList, BackupPrune, BackupRestore, BackupStore, BackupStoreCreate,
    BackupStoreInfo, BackupStoreUsage, DiskFormat, PruneResult, PruneVerdict, Vm, VmSpec, VmState,
};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// The fleecing images of one backup may grow to this much before the backup gives up
/// (the guest never notices: the snapshot breaks, not its writes).
const FLEECE_CAP: u64 = 16 << 30;

fn store_err(e: StoreError) -> AgentError {
    match e {
        StoreError::NotFound(what) => AgentError::NotFound(what),
        StoreError::Invalid(what) => AgentError::refused(Refusal::Unsupported, what),
        StoreError::NotAStore(_) | StoreError::Version(_) => {
            AgentError::failed_by(Failure::Backup, "Backup store", e)
        }
        StoreError::Corrupt(_) | StoreError::Chunk { .. } => {
            AgentError::failed_by(Failure::Corrupt, "Backup store", e)
        }
        other => AgentError::failed_by(Failure::Backup, "Backup store", other),
    }
}

fn capture_err(e: capture::CaptureError) -> AgentError {
    match e {
        capture::CaptureError::Store(s) => store_err(s),
        capture::CaptureError::Qmp { .. } => AgentError::failed_by(Failure::Qemu, "Backup", e),
        other => AgentError::failed_by(Failure::Backup, "Backup", other),
    }
}

/// Runs blocking store work.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::result::Result<T, StoreError> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AgentError::failed(Failure::Internal, format!("backup worker: {e}")))?
        .map_err(store_err)
}

fn backup_of(
    store: &str,
    s: ferry_backup::store::catalog::SnapshotRow,
    disks: Vec<ferry_backup::store::catalog::DiskRow>,
) -> Backup {
    Backup {
        id: s.id,
        store: store.to_string(),
        vm: s.vm,
        host: s.host,
        started: s.started,
        finished: s.finished,
        state: s.state,
        consistency: s.consistency,
        key_fingerprint: s.key_fingerprint,
        protected: s.protected,
        disks: disks
            .into_iter()
            .map(|d| BackupDisk {
                name: d.name,
                size: d.size,
                mode: d.mode,
                reason: d.reason,
                read_bytes: d.read_bytes,
                new_bytes: d.new_bytes,
            })
            .collect(),
    }
}

/// Reports `(done, total)` as the task's progress every half second until aborted.
fn reporter(
    ctx: Option<&TaskCtx>,
    read: impl Fn() -> (u64, u64) + Send + 'static,
) -> Option<tokio::task::JoinHandle<()>> {
    let c = ctx?.clone();
    Some(tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let (done, total) = read();
            c.progress(crate::tasks::fraction(done, total));
        }
    }))
}

fn free_bytes(path: &Path) -> u64 {
    nix::sys::statvfs::statvfs(path)
        .map(|s| s.blocks_available() * s.fragment_size())
        .unwrap_or(0)
}

/// Removes every dirty bitmap of a running VM's disk nodes (before a snapshot revert;
/// the next backup of each disk then reads it whole and says so).
pub(crate) async fn drop_bitmaps(qmp: &ferry_qmp::Qmp, nodes: &[String]) -> Result<()> {
    use ferry_qmp::commands as qc;
    let all = qmp.run(&qc::QueryNamedBlockNodes { flat: true }).await?;
    for n in all {
        let Some(name) = n.node_name.filter(|x| nodes.contains(x)) else {
            continue;
        };
        for b in n.dirty_bitmaps.into_iter().filter_map(|b| b.name) {
            qmp.run(&qc::BlockDirtyBitmapRemove(qc::BitmapRef {
                node: name.clone(),
                name: b,
            }))
            .await?;
        }
    }
    Ok(())
}

impl Host {
    fn backup_store_key(&self, name: &str) -> String {
        keys::shared::backup_store(self.shared().1, name)
    }

    pub async fn backup_stores(&self) -> Result<Vec<BackupStore>> {
        let (s, p) = self.shared();
        let mut v: Vec<BackupStore> = s.list_json(&keys::shared::backup_stores(p)).await?;
        v.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(v)
    }

    pub async fn backup_store(&self, name: &str) -> Result<BackupStore> {
        let (s, _) = self.shared();
        s.get_json::<BackupStore>(&self.backup_store_key(name))
            .await?
            .map(|(b, _)| b)
            .ok_or_else(|| AgentError::NotFound(format!("Backup store {name}")))
    }

    /// Defines a store: makes the folder a store (or adopts the store already there).
    pub async fn create_backup_store(&self, req: BackupStoreCreate) -> Result<BackupStore> {
        req.validate()?;
        if self.backup_store(&req.name).await.is_ok() {
            return Err(AgentError::refused(
                Refusal::Exists,
                format!("Backup store {} already exists", req.name),
            ));
        }
        if let Some(other) = self
            .backup_stores()
            .await?
            .into_iter()
            .find(|s| s.path == req.path)
        {
            return Err(AgentError::refused(
                Refusal::Exists,
                format!("{} is backup store {} already", req.path, other.name),
            ));
        }
        let path = PathBuf::from(&req.path);
        blocking(move || match Store::open(&path) {
            Ok(_) => Ok(()),
            Err(StoreError::NotAStore(_)) => Store::create(&path).map(|_| ()),
            Err(e) => Err(e),
        })
        .await?;
        let store = BackupStore {
            name: req.name.clone(),
            path: req.path,
            created_ms: crate::events::now_ms(),
        };
        let (s, _) = self.shared();
        if !s
            .create_json(&self.backup_store_key(&req.name), &store)
            .await?
        {
            return Err(AgentError::refused(
                Refusal::Exists,
                format!("Backup store {} already exists", req.name),
            ));
        }
        self.inner.events.emit(
            None,
            "backup",
            format!("backup store {} defined at {}", store.name, store.path),
        );
        Ok(store)
    }

    /// Forgets a store's definition; its folder and backups stay where they are.
    pub async fn delete_backup_store(&self, name: &str) -> Result<()> {
        self.backup_store(name).await?;
        let (s, _) = self.shared();
        s.delete(&self.backup_store_key(name)).await?;
        self.inner.events.emit(
            None,
            "backup",
            format!("backup store {name} forgotten (its files stay)"),
        );
        Ok(())
    }

    pub(crate) async fn open_backup_store(&self, name: &str) -> Result<(BackupStore, Arc<Store>)> {
        let def = self.backup_store(name).await?;
        let path = PathBuf::from(&def.path);
        let store = blocking(move || Store::open(&path)).await?;
        Ok((def, Arc::new(store)))
    }

    pub async fn backup_store_info(&self, name: &str) -> Result<BackupStoreInfo> {
        let (def, store) = self.open_backup_store(name).await?;
        let st = Arc::clone(&store);
        let u = blocking(move || st.usage()).await?;
        Ok(BackupStoreInfo {
            id: store.config().id.clone(),
            usage: BackupStoreUsage {
                backups: u.snapshots,
                chunks: u.chunks,
                stored_bytes: u.stored_bytes,
                logical_bytes: u.logical_bytes,
                unreferenced_chunks: u.unreferenced_chunks,
                dedup_factor: u.dedup_factor(),
                free_bytes: free_bytes(store.root()),
            },
            store: def,
        })
    }

    /// Backs up one of this host's VMs into `store_name`.
    #[tracing::instrument(skip_all, fields(vm = %vm, store = %store_name))]
    pub async fn run_backup(
        &self,
        vm: &str,
        store_name: &str,
        ctx: Option<&TaskCtx>,
    ) -> Result<Backup> {
        let (def, store) = self.open_backup_store(store_name).await?;
        let me = self.host_name().to_string();
        let st = Arc::clone(&store);
        let host = me.clone();
        let stale = blocking(move || st.remove_stale(&host)).await?;
        if let (Some(ctx), false) = (ctx, stale.is_empty()) {
            ctx.log(format!(
                "removed unfinished backups of dead writers: {}",
                stale.join(", ")
            ));
        }
        let op = self.lock_vm(vm).await;
        let slot = op.slot().clone();
        let (rec, _) = self.record(vm).await?;
        slot.state().check(ferry_types::VmAction::Backup)?;
        self.refuse_live_restoring(&rec, "back it up")?;
        if rec.transit.is_some() {
            return Err(AgentError::refused(
                Refusal::Busy,
                format!("{vm} is being migrated: back it up before or after"),
            ));
        }
        if rec.spec.disks.is_empty() {
            return Err(AgentError::refused(
                Refusal::Unsupported,
                format!("{vm} has no disk to back up"),
            ));
        }
        let meta = SnapshotMeta {
            vm: vm.to_string(),
            host: me,
            consistency: "crash".into(),
            config: Some(
                serde_json::to_string(&rec.spec)
                    .map_err(|e| AgentError::failed(Failure::Internal, format!("VM spec: {e}")))?,
            ),
        };
        let progress = Arc::new(CaptureProgress::default());
        let p = Arc::clone(&progress);
        let reporter = reporter(ctx, move || {
            (
                p.done_bytes.load(Ordering::Relaxed),
                p.total_bytes.load(Ordering::Relaxed),
            )
        });
        let run = self.run_paths(rec.id);
        let work = self.backup_work_dir(rec.id);
        let result = if slot.state().has_process() {
            let owner = self.qemu_identity(rec.id)?.map(|w| (w.uid, w.gid));
            // root's folder QEMU may pass through (its fleecing images are its own files
            // inside), never create, rename or remove entries in
            // (on the state disk, not the run dir's RAM: a busy guest fills it)
            for d in [work.parent().unwrap_or(&work), &work] {
                std::fs::create_dir_all(d).map_err(|source| AgentError::Io {
                    what: format!("Create {}", d.display()),
                    source,
                })?;
                if let Some((_, gid)) = owner {
                    crate::confine::own(d, 0, gid, 0o710)?;
                }
            }
            let cap = FLEECE_CAP.min(free_bytes(&self.inner.cfg.state_dir) / 2);
            let server_pid = slot.with(|rt| rt.pid);
            let nodes = self.disk_nodes(vm, rec.spec.disks.len()).await;
            let mut disks = Vec::new();
            for (i, d) in rec.spec.disks.iter().enumerate() {
                disks.push(DiskSource {
                    name: format!("disk{i}"),
                    device: Some(format!("/machine/peripheral/disk{i}")),
                    node: nodes[i].clone(),
                    persistent: self.keeps_bitmap(d).await,
                });
            }
            let qmp = self.qmp(vm)?;
            capture::capture(
                &qmp,
                Arc::clone(&store),
                CaptureRequest {
                    meta,
                    disks,
                    work_dir: work,
                    socket_dir: run.sockets.clone(),
                    owner,
                    server_pid,
                    fleece_cap: cap,
                    key: None,
                    quiesce: (rec.spec.agent && slot.state() == VmState::Running).then(|| {
                        Arc::new(GuestQuiesce {
                            host: self.clone(),
                            vm: vm.to_string(),
                        }) as Arc<dyn capture::Quiesce>
                    }),
                },
                &progress,
            )
            .await
        } else {
            let mut disks = Vec::new();
            for (i, d) in rec.spec.disks.iter().enumerate() {
                // qemu-storage-daemon runs as root: a header QEMU's user rewrote to name
                // another file for its data must not make it read that file
                if let (Some(vol), Ok(dp)) = (&d.volume, self.dir_pool(&d.pool).await) {
                    dp.check_own_data(vol).await?;
                }
                disks.push(OfflineDisk {
                    name: format!("disk{i}"),
                    node: self.offline_node(d).await?,
                    persistent: self.keeps_bitmap(d).await,
                });
            }
            offline::capture_offline(
                Arc::clone(&store),
                OfflineRequest {
                    meta,
                    disks,
                    work_dir: work,
                    key: None,
                },
                &progress,
            )
            .await
        };
        if let Some(r) = reporter {
            r.abort();
        }
        drop(op);
        let outcome = match result {
            Ok(o) => o,
            Err(e) => {
                let e = capture_err(e);
                self.inner.events.emit(
                    Some(vm),
                    "backup",
                    format!("backup of {vm} to {store_name} failed: {e}"),
                );
                return Err(e);
            }
        };
        if let Some(ctx) = ctx {
            for d in &outcome.disks {
                ctx.log(match &d.reason {
                    None => format!("{}: incremental, {} bytes read", d.name, d.read_bytes),
                    Some(r) => format!("{}: full read ({r}), {} bytes read", d.name, d.read_bytes),
                });
            }
            ctx.progress(1.0);
        }
        self.inner.events.emit(
            Some(vm),
            "backup",
            format!(
                "backed up {vm} to {store_name} as {} ({} new bytes)",
                outcome.id, outcome.stats.new_plain_bytes
            ),
        );
        let id = outcome.id.clone();
        let st = Arc::clone(&store);
        let (snap, disks) = blocking(move || {
            let s = st
                .snapshot(&id)?
                .ok_or_else(|| StoreError::NotFound(format!("backup {id}")))?;
            Ok((s, st.disks(&id)?))
        })
        .await?;
        Ok(backup_of(&def.name, snap, disks))
    }

    /// At daemon start, after re-adoption: what backups cut off by the restart left —
    /// fleecing filters in running VMs, a `qemu-storage-daemon` holding a stopped VM's
    /// images, unfinished backups of this host's dead writers in the stores.
    pub async fn sweep_backups(&self) {
        let records = match self.records().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "backup sweep: cannot list VMs");
                return;
            }
        };
        for rec in records {
            let work = self.backup_work_dir(rec.id);
            if !work.exists() {
                continue;
            }
            let name = rec.spec.name.clone();
            let w = work.clone();
            if tokio::task::spawn_blocking(move || offline::sweep(&w))
                .await
                .unwrap_or(false)
            {
                self.fixed_backup(&name, "ended the disk reader of an interrupted backup");
            }
            if self.slot(&name).state().has_process() {
                if let Ok(qmp) = self.qmp(&name) {
                    if capture::sweep(&qmp, &work).await {
                        self.fixed_backup(
                            &name,
                            "took an interrupted backup's fleecing out of the VM",
                        );
                    }
                }
            }
        }
        let me = self.host_name().to_string();
        for def in self.backup_stores().await.unwrap_or_default() {
            let path = PathBuf::from(&def.path);
            let host = me.clone();
            let removed = blocking(move || Store::open(&path)?.remove_stale(&host)).await;
            match removed {
                Ok(ids) if !ids.is_empty() => self.inner.events.emit(
                    None,
                    "repair",
                    format!(
                        "removed unfinished backups {} from {}",
                        ids.join(", "),
                        def.name
                    ),
                ),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(store = %def.name, error = %e, "backup sweep: store unreadable")
                }
            }
        }
    }

    fn fixed_backup(&self, vm: &str, what: &str) {
        tracing::warn!(vm = %vm, "{what}");
        self.inner.events.emit(Some(vm), "repair", what.to_string());
    }

    /// Where VM `id`'s backups keep their work files (fleecing images, the storage
    /// daemon's socket, what to undo after a restart): root's, on the state disk.
    fn backup_work_dir(&self, id: u32) -> PathBuf {
        self.inner.cfg.state_dir.join("backup").join(id.to_string())
    }

    /// Whether a disk keeps a persistent dirty bitmap: a qcow2 volume of a dir pool,
    /// not a kiosk overlay.
    async fn keeps_bitmap(&self, d: &ferry_types::DiskSpec) -> bool {
        if d.nonpersistent {
            return false;
        }
        let Some(vol) = &d.volume else { return false };
        match self.dir_pool(&d.pool).await {
            Ok(dp) => dp
                .meta(vol)
                .map(|m| m.format == DiskFormat::Qcow2)
                .unwrap_or(false),
            Err(_) => false,
        }
    }

    /// A stopped VM's disk as `qemu-storage-daemon` opens it: the recorded format and
    /// backing chain, never the file's header.
    async fn offline_node(&self, d: &ferry_types::DiskSpec) -> Result<serde_json::Value> {
        let vol = d
            .volume
            .as_deref()
            .ok_or_else(|| AgentError::invalid("disks", "disk without volume"))?;
        if self.replicated_pool(&d.pool).await?.is_some() {
            return Err(AgentError::refused(
                Refusal::Unsupported,
                format!(
                    "{}/{vol} is replicated: back the VM up while it runs",
                    d.pool
                ),
            ));
        }
        let dp = self.dir_pool(&d.pool).await?;
        let format = dp.meta(vol)?.format;
        let backing = crate::pools::backing_files(dp.chain(vol)?);
        let path = dp.volume_path(vol)?;
        let mut node = ferry_qemu::format_node(
            format,
            serde_json::json!({"driver": "file", "filename": path}),
            &backing,
        );
        node["read-only"] = serde_json::json!(false);
        Ok(node)
    }

    /// Backups in one store or every store, of one VM or all.
    pub async fn list_backups(&self, store: Option<&str>, vm: Option<&str>) -> Result<BackupList> {
        let stores = match store {
            Some(s) => vec![self.backup_store(s).await?],
            None => self.backup_stores().await?,
        };
        let mut backups = Vec::new();
        for def in stores {
            let path = PathBuf::from(&def.path);
            let vm = vm.map(str::to_string);
            let name = def.name.clone();
            let found = blocking(move || {
                let st = Store::open(&path)?;
                let mut out = Vec::new();
                for s in st.snapshots(vm.as_deref())? {
                    let disks = st.disks(&s.id)?;
                    out.push(backup_of(&name, s, disks));
                }
                Ok(out)
            })
            .await;
            match found {
                Ok(v) => backups.extend(v),
                Err(e) if store.is_some() => return Err(e),
                Err(e) => {
                    tracing::warn!(store = %def.name, error = %e, "backup store unreadable; listed without it")
                }
            }
        }
        backups.sort_by(|a, b| a.started.cmp(&b.started).then(a.id.cmp(&b.id)));
        Ok(BackupList { backups })
    }

    /// A backup by id, in whichever store holds it.
    pub async fn find_backup(&self, id: &str) -> Result<(BackupStore, Arc<Store>, Backup)> {
        for def in self.backup_stores().await? {
            let Ok((def, store)) = self.open_backup_store(&def.name).await else {
                continue;
            };
            let st = Arc::clone(&store);
            let i = id.to_string();
            let found = blocking(move || match st.snapshot(&i)? {
                Some(s) => Ok(Some((s, st.disks(&i)?))),
                None => Ok(None),
            })
            .await?;
            if let Some((s, disks)) = found {
                let b = backup_of(&def.name, s, disks);
                return Ok((def, store, b));
            }
        }
        Err(AgentError::NotFound(format!("Backup {id}")))
    }

    /// [`Host::find_backup`] of a backup that is complete (restores, boot checks and
    /// syncs read it whole).
    pub(crate) async fn complete_backup(
        &self,
        id: &str,
    ) -> Result<(BackupStore, Arc<Store>, Backup)> {
        let found = self.find_backup(id).await?;
        if found.2.state != "complete" {
            return Err(AgentError::refused(
                Refusal::Busy,
                format!("backup {id} is still being written"),
            ));
        }
        Ok(found)
    }

    pub async fn delete_backup(&self, id: &str) -> Result<()> {
        let (def, store, b) = self.find_backup(id).await?;
        let i = id.to_string();
        blocking(move || store.delete(&i)).await?;
        self.stop_helper(id).await;
        self.inner.events.emit(
            Some(&b.vm),
            "backup",
            format!("backup {id} of {} deleted from {}", b.vm, def.name),
        );
        Ok(())
    }

    /// Restores a backup as a new VM on this host, stopped (or started with `start`).
    #[tracing::instrument(skip_all, fields(backup = %id))]
    pub async fn restore_backup(
        &self,
        id: &str,
        req: BackupRestore,
        ctx: Option<&TaskCtx>,
    ) -> Result<Vm> {
        req.validate()?;
        let (_, store, b) = self.complete_backup(id).await?;
        let mut spec = backup_spec(&store, &b).await?;
        if self.record(&req.name).await.is_ok() {
            return Err(AgentError::refused(
                Refusal::Exists,
                format!("VM {} already exists", req.name),
            ));
        }
        spec.name = req.name.clone();
        for n in &mut spec.nics {
            n.mac = None;
        }
        if let Some(p) = &req.pool {
            for d in &mut spec.disks {
                d.pool = p.clone();
            }
        }
        for (d, bd) in spec.disks.iter_mut().zip(&b.disks) {
            if self.dir_pool(&d.pool).await.is_err() {
                d.pool = "default".into();
            }
            // a restored volume of the backed-up size replaces whatever the disk was
            d.volume = None;
            d.size = Some(ferry_types::ByteSize(bd.size));
            d.nonpersistent = false;
        }
        let live = req.live.then(|| ferry_types::LiveRestoreInfo {
            store: b.store.clone(),
            backup: b.id.clone(),
            bwlimit: req.bwlimit,
            held: false,
        });
        if let Some(lr) = &live {
            // the volumes read what they lack from the backup: qcow2 over it
            for d in &mut spec.disks {
                if self.replicated_pool(&d.pool).await?.is_some() {
                    return Err(AgentError::refused(
                        Refusal::Unsupported,
                        format!("a live-restore fills qcow2 volumes of a directory pool; {} is replicated (restore without --live)", d.pool),
                    ));
                }
                if d.readonly {
                    return Err(AgentError::refused(
                        Refusal::Unsupported,
                        "a live-restore fills its disks while the VM runs; this backup has a read-only disk (restore without --live)",
                    ));
                }
                d.format = ferry_types::DiskFormat::Qcow2;
            }
            self.open_restore_images(lr, spec.disks.len()).await?;
        }
        spec.validate()?;
        self.check_resource_pool(&spec).await?;
        self.check_name_free(&spec.name).await?;
        self.check_host(&spec, None).await?;
        let id = self.allocate_id().await?;
        self.assign_new_macs(&mut spec, id).await?;
        // the start-up repair removes vm-{id}-* volumes of an intent without a record
        self.write_intent(id, &spec.name, "restore").await?;
        let mut live = live;
        if let Some(lr) = &mut live {
            // no delete or prune takes the backup while the disks read from it
            if !b.protected {
                let (st, bid) = (Arc::clone(&store), b.id.clone());
                if let Err(e) = blocking(move || st.set_protected(&bid, true)).await {
                    self.clear_intent(id).await;
                    return Err(e);
                }
                lr.held = true;
            }
        }
        let r = match &live {
            Some(_) => self.live_volumes(id, &mut spec).await,
            None => self.restore_into(id, &mut spec, &store, &b, ctx).await,
        };
        let made = match r {
            Ok(made) => made,
            Err(e) => {
                self.clear_intent(id).await;
                self.release_live_hold(&live).await;
                return Err(e);
            }
        };
        let mut rec = crate::records::VmRecord::new(id, spec.clone());
        rec.live_restore = live.clone();
        let created = self.create_new_record(&rec).await;
        self.clear_intent(id).await;
        match created {
            Ok(true) => {}
            Ok(false) => {
                self.remove_volumes(&made).await;
                self.release_live_hold(&live).await;
                return Err(AgentError::refused(
                    Refusal::Exists,
                    format!("VM {} already exists", spec.name),
                ));
            }
            Err(e) => {
                self.remove_volumes(&made).await;
                self.release_live_hold(&live).await;
                return Err(e);
            }
        }
        let vm = self.get_vm(&spec.name).await?;
        self.inner.events.emit(
            Some(&vm.spec.name),
            "backup",
            format!("{} restored from backup {id} of {}", vm.spec.name, b.vm),
        );
        if (req.start || req.live) && vm.state == VmState::Stopped {
            self.start_vm(&vm.spec.name).await?;
            return self.get_vm(&vm.spec.name).await;
        }
        Ok(vm)
    }

    /// Restores every disk of backup `b` into `vm-{id}-disk-{i}` volumes (raw from the
    /// store, converted to the disk's format; the data is never probed). On failure the
    /// volumes made so far are removed.
    async fn restore_into(
        &self,
        id: u32,
        spec: &mut VmSpec,
        store: &Arc<Store>,
        b: &Backup,
        ctx: Option<&TaskCtx>,
    ) -> Result<Vec<(String, String)>> {
        let total: u64 = b.disks.iter().map(|d| d.size).sum();
        let mut done = 0u64;
        let mut made: Vec<(String, String)> = Vec::new();
        for i in 0..spec.disks.len() {
            let r = self
                .restore_disk(id, i, spec, store, b, ctx, done, total)
                .await;
            match r {
                Ok((pool, vol)) => {
                    if let Some(ctx) = ctx {
                        ctx.log(format!("disk{i} restored into {pool}/{vol}"));
                    }
                    made.push((pool, vol.clone()));
                    spec.disks[i].volume = Some(vol);
                    spec.disks[i].size = None;
                    done += b.disks[i].size;
                }
                Err(e) => {
                    self.remove_volumes(&made).await;
                    return Err(e);
                }
            }
        }
        Ok(made)
    }

    /// A live-restore that never got its record lets its backup go again.
    async fn release_live_hold(&self, live: &Option<ferry_types::LiveRestoreInfo>) {
        if let Some(lr) = live.as_ref().filter(|l| l.held) {
            self.release_backup(lr).await;
        }
    }

    /// A live-restore's volumes: `vm-{id}-disk-{i}`, empty qcow2 of each disk's size
    /// (what they lack is read from the backup). On failure the ones made are removed.
    async fn live_volumes(&self, id: u32, spec: &mut VmSpec) -> Result<Vec<(String, String)>> {
        let mut made: Vec<(String, String)> = Vec::new();
        for (i, d) in spec.disks.iter_mut().enumerate() {
            let vol = format!("vm-{id}-disk-{i}");
            let size = d.size.unwrap_or_default();
            let r = match self.dir_pool(&d.pool).await {
                Ok(dp) => dp
                    .create(&vol, size, ferry_types::DiskFormat::Qcow2)
                    .await
                    .map_err(AgentError::from),
                Err(e) => Err(e),
            };
            if let Err(e) = r {
                self.remove_volumes(&made).await;
                return Err(e);
            }
            made.push((d.pool.clone(), vol.clone()));
            d.volume = Some(vol);
            d.size = None;
        }
        Ok(made)
    }

    #[allow(clippy::too_many_arguments)]
    async fn restore_disk(
        &self,
        id: u32,
        i: usize,
        spec: &VmSpec,
        store: &Arc<Store>,
        b: &Backup,
        ctx: Option<&TaskCtx>,
        done: u64,
        total: u64,
    ) -> Result<(String, String)> {
        let d = &spec.disks[i];
        let dp = self.dir_pool(&d.pool).await?;
        let vol = format!("vm-{id}-disk-{i}");
        let tmp = dp.partial_path(&vol, "restore")?;
        let st = Arc::clone(store);
        let (bid, disk, t) = (b.id.clone(), b.disks[i].name.clone(), tmp.clone());
        let progress = Arc::new(Progress::default());
        let p2 = Arc::clone(&progress);
        let p = Arc::clone(&progress);
        let reporter = reporter(ctx, move || {
            (done + p.done_bytes.load(Ordering::Relaxed), total)
        });
        let r = blocking(move || st.restore_raw(&bid, &disk, None, &t, 4, &p2)).await;
        if let Some(r) = reporter {
            r.abort();
        }
        if let Err(e) = r {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        let imported = dp.import_raw(&vol, &tmp, d.format, |_| {}).await;
        let _ = std::fs::remove_file(&tmp);
        imported?;
        Ok((d.pool.clone(), vol))
    }

    pub async fn prune_backups(&self, req: BackupPrune) -> Result<PruneResult> {
        let (def, store) = self.open_backup_store(&req.store).await?;
        let keep: Keep = req.keep;
        let (vm, dry) = (req.vm.clone(), req.dry_run);
        let verdicts = blocking(move || store.prune(&vm, &keep, dry)).await?;
        let gone = verdicts.iter().filter(|v| !v.keep).count();
        if !req.dry_run {
            for v in verdicts.iter().filter(|v| !v.keep) {
                self.stop_helper(&v.id).await;
            }
        }
        if !req.dry_run && gone > 0 {
            self.inner.events.emit(
                Some(&req.vm),
                "backup",
                format!("pruned {gone} backups of {} in {}", req.vm, def.name),
            );
        }
        Ok(PruneResult {
            verdicts: verdicts
                .into_iter()
                .map(|v| PruneVerdict {
                    id: v.id,
                    keep: v.keep,
                    reason: v.reason.to_string(),
                })
                .collect(),
        })
    }

    pub async fn gc_backup_store(&self, name: &str) -> Result<ferry_types::BackupGcReport> {
        let (_, store) = self.open_backup_store(name).await?;
        let me = self.host_name().to_string();
        let report = blocking(move || store.gc(&me)).await?;
        self.inner.events.emit(
            None,
            "backup",
            format!(
                "garbage collection of {name}: {} chunks, {} bytes freed",
                report.removed_chunks, report.freed_bytes
            ),
        );
        Ok(report)
    }

    pub async fn verify_backup_store(
        &self,
        name: &str,
        since_days: Option<u32>,
        ctx: Option<&TaskCtx>,
    ) -> Result<ferry_types::BackupVerifyReport> {
        let (_, store) = self.open_backup_store(name).await?;
        let progress = Arc::new(Progress::default());
        let p2 = Arc::clone(&progress);
        let p = Arc::clone(&progress);
        let reporter = reporter(ctx, move || {
            (
                p.done_bytes.load(Ordering::Relaxed),
                p.total_bytes.load(Ordering::Relaxed),
            )
        });
        let report = blocking(move || store.verify(since_days, None, &p2)).await;
        if let Some(r) = reporter {
            r.abort();
        }
        let report = report?;
        for bad in &report.bad {
            self.inner.events.emit(
                None,
                "backup",
                format!(
                    "verify of {name}: chunk {} is damaged ({}); backups using it: {}",
                    bad.digest,
                    bad.error,
                    bad.backups.join(", ")
                ),
            );
        }
        Ok(report)
    }
}

/// The VM definition backup `b` holds, checked against its disks: disk `i` of the
/// definition is `disk{i}` of the backup (never matched by position in a list sorted
/// otherwise).
pub(crate) async fn backup_spec(store: &Arc<Store>, b: &Backup) -> Result<VmSpec> {
    let id = b.id.clone();
    let st = Arc::clone(store);
    let i = id.clone();
    let config = blocking(move || Ok(st.snapshot(&i)?.and_then(|s| s.config))).await?;
    let spec: VmSpec = config
        .as_deref()
        .map(serde_json::from_str)
        .transpose()
        .map_err(|e| {
            AgentError::failed(
                Failure::Corrupt,
                format!("backup {id}'s VM definition: {e}"),
            )
        })?
        .ok_or_else(|| {
            AgentError::failed(
                Failure::Corrupt,
                format!("backup {id} holds no VM definition"),
            )
        })?;
    if spec.disks.len() != b.disks.len() {
        return Err(AgentError::failed(
            Failure::Corrupt,
            format!(
                "backup {id} has {} disks, its VM definition {}",
                b.disks.len(),
                spec.disks.len()
            ),
        ));
    }
    if let Some((i, bd)) = b
        .disks
        .iter()
        .enumerate()
        .find(|(i, bd)| bd.name != format!("disk{i}"))
    {
        return Err(AgentError::failed(
            Failure::Corrupt,
            format!("backup {id}: disk {i} is named {}", bd.name),
        ));
    }
    Ok(spec)
}

/// A VM's file systems frozen through its guest agent for a backup.
struct GuestQuiesce {
    host: Host,
    vm: String,
}

impl capture::Quiesce for GuestQuiesce {
    fn freeze(&self) -> capture::QuiesceFuture<'_, bool> {
        Box::pin(self.host.freeze(&self.vm))
    }
    fn thaw(&self) -> capture::QuiesceFuture<'_, ()> {
        Box::pin(self.host.thaw(&self.vm))
    }
}
