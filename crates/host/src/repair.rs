//! The check-and-repair pass at start-up: after a crash (daemon or QEMU killed in the
//! middle of an operation) the store and the files are brought back into agreement.
//!
//! - VM creations and clones write an intent (`/intents/{id}`) before they make volumes
//!   and remove it with the VM record; an intent without a record means the operation
//!   died: its `vm-{id}-*` volumes are removed.
//! - Half-written files (`.partial-*`) of interrupted creates, imports and copies go.
//! - Snapshots: a tag present on every disk but missing from the store (the daemon died
//!   after QEMU finished) is adopted into the tree; a tag on only some disks is removed
//!   from them; a stored snapshot whose tag is gone from the disks is dropped.
//! - Suspend files no VM points to are removed; a suspended VM whose file is gone is
//!   reported stopped.
//!   Every fix is an event (`repair`).

use crate::error::Result;
use crate::records::VmRecord;
use crate::Host;
use ferry_store::StoreJson;
use ferry_types::{PoolSpec, Snapshot, VmState};
use std::collections::{HashMap, HashSet};

use ferry_store::keys::host::INTENTS;

#[derive(serde::Serialize, serde::Deserialize)]
pub struct Intent {
    pub vm: String,
    pub op: String,
}

impl Host {
    pub async fn write_intent(&self, id: u32, vm: &str, op: &str) -> Result<()> {
        let i = Intent {
            vm: vm.to_string(),
            op: op.to_string(),
        };
        self.inner
            .store
            .put_json(&ferry_store::keys::host::intent(id), &i)
            .await?;
        Ok(())
    }

    pub async fn clear_intent(&self, id: u32) {
        let _ = self
            .inner
            .store
            .delete(&ferry_store::keys::host::intent(id))
            .await;
    }

    fn fixed(&self, vm: Option<&str>, msg: String) {
        tracing::warn!(vm = vm.unwrap_or(""), "repair: {msg}");
        self.inner.events.emit(vm, "repair", msg);
    }

    #[tracing::instrument(skip_all)]
    pub async fn repair(&self) -> Result<()> {
        let records = self.records().await?;
        let ids: HashSet<u32> = records.iter().map(|r| r.id).collect();
        let pools: Vec<PoolSpec> = self
            .inner
            .store
            .list_json(ferry_store::keys::host::POOLS)
            .await?;

        // Interrupted creations and clones.
        for kv in self.inner.store.list(INTENTS).await? {
            let id: u32 = kv.key.trim_start_matches(INTENTS).parse().unwrap_or(0);
            let intent: Option<Intent> = serde_json::from_slice(&kv.value).ok();
            if !ids.contains(&id) {
                let prefix = format!("vm-{id}-");
                for p in &pools {
                    let Ok(dp) = self.dir_pool(&p.name).await else {
                        continue;
                    };
                    for v in dp.list().await.unwrap_or_default() {
                        if v.name.starts_with(&prefix) && dp.delete(&v.name).await.is_ok() {
                            self.fixed(
                                intent.as_ref().map(|i| i.vm.as_str()),
                                format!(
                                    "removed volume {}/{} of an interrupted {}",
                                    p.name,
                                    v.name,
                                    intent.as_ref().map_or("operation", |i| i.op.as_str())
                                ),
                            );
                        }
                    }
                }
            }
            self.inner.store.delete(&kv.key).await?;
        }

        // Half-written files.
        for p in &pools {
            let Ok(dp) = self.dir_pool(&p.name).await else {
                continue;
            };
            for f in dp.partial_files() {
                if std::fs::remove_file(&f).is_ok() {
                    self.fixed(None, format!("removed unfinished file {}", f.display()));
                }
            }
            // Suspend files nobody points to.
            let wanted: HashSet<String> = records
                .iter()
                .filter_map(|r| r.suspend_file.clone())
                .collect();
            if let Ok(rd) = std::fs::read_dir(&dp.path) {
                for e in rd.flatten() {
                    let n = e.file_name().to_string_lossy().into_owned();
                    let path = e.path().display().to_string();
                    if n.starts_with(".vm-")
                        && n.ends_with("-suspend.state")
                        && !wanted.contains(&path)
                    {
                        let _ = std::fs::remove_file(e.path());
                        self.fixed(None, format!("removed stale suspend file {path}"));
                    }
                }
            }
        }

        for r in &records {
            self.repair_suspend(r).await?;
            self.repair_snapshots(r).await?;
        }
        Ok(())
    }

    async fn repair_suspend(&self, r: &VmRecord) -> Result<()> {
        let name = &r.spec.name;
        let slot = self.slot(name);
        if slot.state() == VmState::Suspended
            && r.suspend_file
                .as_ref()
                .is_none_or(|f| !std::path::Path::new(f).exists())
        {
            slot.with(|rt| rt.state = VmState::Stopped);
            self.update_record(name, |r| {
                r.suspend_file = None;
                r.last_state = VmState::Stopped;
                r.last_exit = Some("its suspend file was lost; the saved state is gone".into());
            })
            .await?;
            self.fixed(
                Some(name),
                "suspended, but the state file is missing: now stopped".into(),
            );
        }
        Ok(())
    }

    async fn repair_snapshots(&self, r: &VmRecord) -> Result<()> {
        let name = &r.spec.name;
        // Tags per disk (qcow2 only; VMs with other disks have no snapshots).
        let mut per_disk: Vec<HashMap<String, u64>> = vec![];
        for d in &r.spec.disks {
            let Ok(dp) = self.dir_pool(&d.pool).await else {
                return Ok(());
            };
            let vol = d.volume.as_deref().unwrap_or("");
            let Ok(path) = dp.volume_path(vol) else {
                return Ok(());
            };
            // The recorded format decides; a header a guest wrote into a raw disk is data.
            if !matches!(dp.meta(vol), Ok(m) if m.format == ferry_types::DiskFormat::Qcow2) {
                return Ok(());
            }
            let Ok(info) =
                ferry_storage::image_info(&*self.inner.os.images(), &path, "qcow2").await
            else {
                return Ok(());
            };
            per_disk.push(
                info.snapshots
                    .iter()
                    .map(|s| (s.name.clone(), s.vm_state_size))
                    .collect(),
            );
        }
        let stored: Vec<Snapshot> = self
            .inner
            .store
            .list_json(&ferry_store::keys::host::snapshots(name))
            .await?;
        let stored_names: HashSet<&str> = stored.iter().map(|s| s.name.as_str()).collect();
        let all_tags: HashSet<String> = per_disk.iter().flat_map(|m| m.keys().cloned()).collect();
        let running = self.slot(name).state().has_process();
        for tag in &all_tags {
            let on: Vec<usize> = (0..per_disk.len())
                .filter(|i| per_disk[*i].contains_key(tag))
                .collect();
            if on.len() == per_disk.len() {
                if !stored_names.contains(tag.as_str()) {
                    let snap = Snapshot {
                        name: tag.clone(),
                        parent: r.current_snapshot.clone(),
                        with_memory: per_disk[0].get(tag).copied().unwrap_or(0) > 0,
                        created_ms: crate::events::now_ms(),
                        description: "recovered after an interrupted snapshot".into(),
                        quiesced: false,
                        tpm: false,
                        tpm_state: None,
                    };
                    self.inner
                        .store
                        .put_json(&ferry_store::keys::host::snapshot(name, tag), &snap)
                        .await?;
                    let t = tag.clone();
                    self.update_record(name, |r| r.current_snapshot = Some(t.clone()))
                        .await?;
                    self.fixed(
                        Some(name),
                        format!("snapshot {tag} found on every disk: added to the tree"),
                    );
                }
            } else {
                for i in on {
                    let d = &r.spec.disks[i];
                    let node = self.disk_node(name, i).await;
                    let res = if running {
                        match self.qmp(name) {
                            Ok(q) => q
                                .run(&ferry_qmp::commands::BlockdevSnapshotDeleteInternalSync {
                                    device: node,
                                    name: tag.to_string(),
                                })
                                .await
                                .map(|_| ())
                                .map_err(crate::AgentError::from),
                            Err(e) => Err(e),
                        }
                    } else {
                        match self.dir_pool(&d.pool).await {
                            Ok(dp) => dp
                                .snapshot(
                                    d.volume.as_deref().unwrap_or(""),
                                    ferry_storage::SnapshotOp::Delete,
                                    tag,
                                )
                                .await
                                .map_err(crate::AgentError::from),
                            Err(e) => Err(e),
                        }
                    };
                    match res {
                        Ok(()) => self.fixed(
                            Some(name),
                            format!("removed partial snapshot {tag} from disk{i}"),
                        ),
                        Err(e) => self.fixed(
                            Some(name),
                            format!("cannot remove partial snapshot {tag} from disk{i}: {e}"),
                        ),
                    }
                }
            }
        }
        // Stored snapshots whose data is not on every disk.
        for s in &stored {
            let complete = !per_disk.is_empty() && per_disk.iter().all(|m| m.contains_key(&s.name));
            if !complete {
                self.forget_snapshot(name, s).await?;
                self.fixed(
                    Some(name),
                    format!(
                        "snapshot {} has no data on the disks: removed from the tree",
                        s.name
                    ),
                );
            }
        }
        Ok(())
    }
}
