//! Snapshots: QEMU's internal qcow2 snapshots. With memory, the `snapshot-save` /
//! `snapshot-load` / `snapshot-delete` jobs store RAM and device state inside the first
//! disk and snapshot every disk under the same tag, atomically for the VM; disk-only
//! snapshots of a running VM are one `transaction` of `blockdev-snapshot-internal-sync`,
//! of a stopped VM `qemu-img snapshot`. Why internal: a snapshot is then part of the
//! volume itself (no overlay chains to track, merge or lose), deleting one needs no data
//! copy (qcow2 refcounts "merge" it), any snapshot of the tree can be reverted to, and it
//! works for disks on different pools. The tree (parents, current position) lives in
//! the store. Raw disks cannot hold internal snapshots and are refused with that reason.

use crate::error::{AgentError, Failure, Refusal, Result};
use crate::tasks::TaskCtx;
use crate::Host;
use ferry_qmp::commands as qc;
use ferry_qmp::Qmp;
use ferry_storage::SnapshotOp;
use ferry_store::{Op, StoreJson, Txn};
use ferry_types::validate::check_name;
use ferry_types::{Snapshot, SnapshotCreate, SnapshotList, ValidationErrors, VmAction, VmState};
use std::time::Duration;

fn snap_prefix(vm: &str) -> String {
    ferry_store::keys::host::snapshots(vm)
}

/// A fresh job id.
pub fn job_id() -> String {
    format!("ferry-{:08x}", rand::random::<u32>())
}

/// Runs the QMP job `cmd` (whose id is `id`) to its end, reporting progress; fails
/// with QEMU's reason.
pub async fn run_job<C: qc::Command>(
    qmp: &Qmp,
    cmd: &C,
    id: &str,
    ctx: Option<&TaskCtx>,
) -> Result<()> {
    let name = C::NAME;
    qmp.run(cmd).await?;
    loop {
        let jobs = qmp.run(&qc::QueryJobs).await?;
        let Some(job) = jobs.into_iter().find(|j| j.id == id) else {
            return Err(AgentError::failed(
                Failure::Qemu,
                format!("QEMU job {name} vanished"),
            ));
        };
        if let (Some(ctx), true) = (ctx, job.total_progress > 0) {
            ctx.progress(crate::tasks::fraction(
                job.current_progress,
                job.total_progress,
            ));
        }
        if job.status == qc::JobStatus::Concluded {
            let _ = qmp.run(&qc::JobDismiss { id: id.to_string() }).await;
            if let Some(e) = job.error {
                return Err(AgentError::failed_by(
                    Failure::Qemu,
                    format!("QEMU refused {name}"),
                    e,
                ));
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Host {
    pub async fn list_snapshots(&self, vm: &str) -> Result<SnapshotList> {
        let (rec, _) = self.record(vm).await?;
        let mut snapshots: Vec<Snapshot> = self.inner.store.list_json(&snap_prefix(vm)).await?;
        snapshots.sort_by_key(|s| s.created_ms);
        Ok(SnapshotList {
            snapshots,
            current: rec.current_snapshot,
        })
    }

    async fn snapshot(&self, vm: &str, snap: &str) -> Result<Snapshot> {
        match self
            .inner
            .store
            .get_json::<Snapshot>(&format!("{}{snap}", snap_prefix(vm)))
            .await?
        {
            Some((s, _)) => Ok(s),
            None => Err(AgentError::NotFound(format!("Snapshot {snap} of {vm}"))),
        }
    }

    /// The disks a snapshot covers, as (pool, volume); refuses VMs it cannot snapshot.
    async fn snapshot_disks(&self, vm: &str) -> Result<Vec<(String, String)>> {
        let (rec, _) = self.record(vm).await?;
        if rec.template {
            return Err(AgentError::refused(
                Refusal::Template,
                format!("{vm} is a template; templates are immutable"),
            ));
        }
        if rec.spec.disks.is_empty() {
            return Err(AgentError::refused(
                Refusal::Unsupported,
                format!("{vm} has no disk: snapshots live in its qcow2 disks"),
            ));
        }
        let mut out = vec![];
        for (i, d) in rec.spec.disks.iter().enumerate() {
            let vol = d.volume.clone().unwrap_or_default();
            if d.nonpersistent {
                return Err(AgentError::refused(Refusal::Unsupported, format!(
                    "disk{i} is non-persistent: its content is thrown away at power-off, so {vm} cannot be snapshotted"
                )));
            }
            let info = self.dir_pool(&d.pool).await?.info(&vol).await?;
            if info.format != "qcow2" {
                return Err(AgentError::refused(
                    Refusal::Unsupported,
                    format!(
                        "disk{i} ({}/{vol}) is {}; snapshots need qcow2 disks",
                        d.pool, info.format
                    ),
                ));
            }
            out.push((d.pool.clone(), vol));
        }
        Ok(out)
    }

    async fn offline_snapshot(
        &self,
        disks: &[(String, String)],
        op: SnapshotOp,
        tag: &str,
    ) -> Result<()> {
        for (pool, vol) in disks {
            self.dir_pool(pool).await?.snapshot(vol, op, tag).await?;
        }
        Ok(())
    }

    #[tracing::instrument(skip_all, fields(vm = %vm))]
    pub async fn create_snapshot(
        &self,
        vm: &str,
        req: SnapshotCreate,
        ctx: Option<&TaskCtx>,
    ) -> Result<Snapshot> {
        let mut e = ValidationErrors::default();
        check_name(&mut e, "name", &req.name);
        e.into_result()?;
        let _op = self.lock_vm(vm).await;
        let slot = _op.slot().clone();
        let (rec, _) = self.record(vm).await?;
        slot.state().check(VmAction::Snapshot)?;
        self.refuse_live_restoring(&rec, "take a snapshot")?;
        let key = format!("{}{}", snap_prefix(vm), req.name);
        if self.inner.store.get(&key).await?.is_some() {
            return Err(AgentError::refused(
                Refusal::Exists,
                format!("{vm} already has a snapshot {}", req.name),
            ));
        }
        let disks = self.snapshot_disks(vm).await?;
        let devices = self.disk_nodes(vm, disks.len()).await;
        let mut quiesced = false;
        if slot.state().has_process() {
            let qmp = self.qmp(vm)?;
            if req.with_memory {
                let id = job_id();
                let job = qc::SnapshotSave {
                    job_id: id.clone(),
                    tag: req.name.clone(),
                    vmstate: "disk0".into(),
                    devices,
                };
                run_job(&qmp, &job, &id, ctx).await?;
                // The job stops the vCPUs while it saves; make sure they run again.
                if slot.state() == VmState::Running
                    && qmp.run(&qc::QueryStatus).await?.status != qc::RunState::Running
                {
                    qmp.run(&qc::Cont).await?;
                }
            } else {
                let actions = devices
                    .iter()
                    .map(|d| qc::TransactionAction::BlockdevSnapshotInternalSync {
                        device: d.clone(),
                        name: req.name.clone(),
                    })
                    .collect();
                // A running guest with an agent flushes and freezes its file systems
                // for the moment the disks are taken.
                quiesced =
                    rec.spec.agent && slot.state() == VmState::Running && self.freeze(vm).await;
                let taken = qmp.run(&qc::Transaction { actions }).await;
                if quiesced {
                    self.thaw(vm).await;
                }
                taken?;
            }
        } else {
            if req.with_memory {
                return Err(AgentError::refused(
                    Refusal::NotRunning,
                    format!(
                    "{vm} is not running: there is no memory to save (take a disk-only snapshot)"
                ),
                ));
            }
            let mut done: Vec<(String, String)> = vec![];
            for d in &disks {
                if let Err(err) = self
                    .offline_snapshot(std::slice::from_ref(d), SnapshotOp::Create, &req.name)
                    .await
                {
                    let _ = self
                        .offline_snapshot(&done, SnapshotOp::Delete, &req.name)
                        .await;
                    return Err(err);
                }
                done.push(d.clone());
            }
        }
        // With memory the TPM's state is in the saved device state; a disk-only
        // snapshot keeps it in its record.
        let tpm_state = if rec.spec.tpm && !req.with_memory {
            self.read_tpm_state(rec.id)?.map(|s| crate::tpm::encode(&s))
        } else {
            None
        };
        let snap = Snapshot {
            name: req.name.clone(),
            parent: rec.current_snapshot.clone(),
            with_memory: req.with_memory,
            created_ms: crate::events::now_ms(),
            description: req.description,
            quiesced,
            tpm: tpm_state.is_some(),
            tpm_state,
        };
        self.inner.store.put_json(&key, &snap).await?;
        self.update_record(vm, |r| r.current_snapshot = Some(req.name.clone()))
            .await?;
        let kind = if req.with_memory {
            "with memory"
        } else if quiesced {
            "disk-only, quiesced by the guest agent"
        } else {
            "disk-only"
        };
        self.inner.events.emit(
            Some(vm),
            "snapshot",
            format!("snapshot {} taken ({kind})", req.name),
        );
        Ok(snap)
    }

    /// Returns the VM to a snapshot: with memory it runs on exactly where it was;
    /// disk-only leaves it stopped with the disks as they were.
    #[tracing::instrument(skip_all, fields(vm = %vm, snapshot = %name))]
    pub async fn revert_snapshot(&self, vm: &str, name: &str, ctx: Option<&TaskCtx>) -> Result<()> {
        let op = self.lock_vm(vm).await;
        let slot = op.slot().clone();
        let snap = self.snapshot(vm, name).await?;
        self.refuse_live_restoring(&self.record(vm).await?.0, "revert it")?;
        let disks = self.snapshot_disks(vm).await?;
        let devices = self.disk_nodes(vm, disks.len()).await;
        if snap.with_memory {
            if !slot.state().has_process() {
                self.start_with(&op, true, crate::gate::StartOrigin::SnapshotRevert)
                    .await?;
            }
            let qmp = self.qmp(vm)?;
            // QEMU refuses to load a snapshot while dirty bitmaps exist, and changes
            // tracked since a backup mean nothing once the disk went back in time.
            crate::backup::drop_bitmaps(&qmp, &devices).await?;
            let id = job_id();
            let job = qc::SnapshotLoad {
                job_id: id.clone(),
                tag: name.to_string(),
                vmstate: "disk0".into(),
                devices,
            };
            run_job(&qmp, &job, &id, ctx).await?;
            if qmp.run(&qc::QueryStatus).await?.status != qc::RunState::Running {
                qmp.run(&qc::Cont).await?;
            }
            self.set_running(vm, &slot).await;
        } else {
            if slot.state().has_process() {
                self.stop_held(&op).await?;
            }
            let tpm = match &snap.tpm_state {
                Some(t) => Some(crate::tpm::decode(t)?),
                None => None,
            };
            self.offline_snapshot(&disks, SnapshotOp::Apply, name)
                .await?;
            if let Some(t) = tpm {
                let (rec, _) = self.record(vm).await?;
                self.write_tpm_state(rec.id, &t)?;
            }
        }
        self.update_record(vm, |r| r.current_snapshot = Some(name.to_string()))
            .await?;
        self.inner
            .events
            .emit(Some(vm), "snapshot", format!("reverted to {name}"));
        Ok(())
    }

    #[tracing::instrument(skip_all, fields(vm = %vm, snapshot = %name))]
    pub async fn delete_snapshot(&self, vm: &str, name: &str, ctx: Option<&TaskCtx>) -> Result<()> {
        let op = self.lock_vm(vm).await;
        let slot = op.slot().clone();
        let snap = self.snapshot(vm, name).await?;
        let disks = self.snapshot_disks(vm).await?;
        if slot.state().has_process() {
            let devices = self.disk_nodes(vm, disks.len()).await;
            let id = job_id();
            let job = qc::SnapshotDelete {
                job_id: id.clone(),
                tag: name.to_string(),
                devices,
            };
            run_job(&self.qmp(vm)?, &job, &id, ctx).await?;
        } else {
            self.offline_snapshot(&disks, SnapshotOp::Delete, name)
                .await?;
        }
        self.forget_snapshot(vm, &snap).await?;
        self.inner
            .events
            .emit(Some(vm), "snapshot", format!("snapshot {name} deleted"));
        Ok(())
    }

    /// Removes a snapshot from the tree: its children hang on its parent (one
    /// transaction), and the VM's current position moves up if it stood there.
    pub async fn forget_snapshot(&self, vm: &str, snap: &Snapshot) -> Result<()> {
        let mut ops = vec![Op::Delete(format!("{}{}", snap_prefix(vm), snap.name))];
        for mut child in self.list_snapshots(vm).await?.snapshots {
            if child.parent.as_deref() == Some(snap.name.as_str()) {
                child.parent = snap.parent.clone();
                ops.push(Op::Put {
                    key: format!("{}{}", snap_prefix(vm), child.name),
                    value: serde_json::to_vec(&child).expect("serialises"),
                    lease: None,
                });
            }
        }
        self.inner
            .store
            .txn(Txn {
                compare: vec![],
                success: ops,
                failure: vec![],
            })
            .await?;
        self.update_record(vm, |r| {
            if r.current_snapshot.as_deref() == Some(snap.name.as_str()) {
                r.current_snapshot = snap.parent.clone();
            }
        })
        .await?;
        Ok(())
    }

    pub async fn delete_snapshot_records(&self, vm: &str) -> Result<()> {
        self.inner
            .store
            .txn(Txn {
                compare: vec![],
                success: vec![Op::DeletePrefix(snap_prefix(vm))],
                failure: vec![],
            })
            .await?;
        Ok(())
    }
}
