//! Storage vMotion (seed 003): a disk moves to another pool while its VM runs. QEMU
//! mirrors the disk into a new volume (`blockdev-mirror`, guest writes go to both),
//! then pivots to it (`job-complete`); the old volume is removed afterwards. A failed
//! or aborted mirror leaves the old disk in use and removes the half-made copy. A
//! stopped VM's disk is copied with `qemu-img convert`.

use crate::error::{AgentError, Failure, Refusal, Result};
use crate::tasks::TaskCtx;
use crate::Migrations;
use ferry_qmp::commands as qc;
use ferry_types::{ByteSize, DiskFormat, VmState};
use serde_json::json;
use std::time::Duration;

impl Migrations {
    /// Moves disk `index` of VM `name` to pool `to_pool` (running or stopped).
    #[tracing::instrument(skip_all, fields(vm = %name, disk = index))]
    pub async fn move_disk(
        &self,
        name: &str,
        index: usize,
        req: &ferry_types::DiskMove,
        ctx: &TaskCtx,
    ) -> Result<()> {
        let to_pool = req.pool.as_str();
        let _op = self.lock_vm(name).await;
        let slot = _op.slot().clone();
        let (rec, _) = self.record(name).await?;
        let d = rec
            .spec
            .disks
            .get(index)
            .cloned()
            .ok_or_else(|| AgentError::NotFound(format!("disk{index} of {name}")))?;
        self.refuse_live_restoring(&rec, "move its disks")?;
        if d.pool == to_pool {
            return Err(AgentError::invalid(
                "pool",
                format!("disk{index} is on {to_pool} already"),
            ));
        }
        if d.nonpersistent {
            return Err(AgentError::refused(
                Refusal::Unsupported,
                format!("disk{index} is non-persistent; change its pool while the VM is stopped"),
            ));
        }
        let state = slot.state();
        if !matches!(
            state,
            VmState::Running | VmState::Paused | VmState::Stopped | VmState::Crashed
        ) {
            return Err(AgentError::refused(
                Refusal::Busy,
                format!("{name} is {state}; its disks cannot move now"),
            ));
        }
        if !self.list_snapshots(name).await?.snapshots.is_empty() {
            return Err(AgentError::refused(Refusal::NotMovable, format!(
                "{name} has snapshots, stored inside its disks; a moved copy would not carry them (delete them first)"
            )));
        }
        let old = d.volume.clone().unwrap_or_default();
        let src = self.dir_pool(&d.pool).await?;
        let dst = self.dir_pool(to_pool).await?;
        let info = src.info(&old).await?;
        if dst.volume_path(&old)?.exists() {
            return Err(AgentError::refused(
                Refusal::Exists,
                format!("Volume {to_pool}/{old} already exists"),
            ));
        }
        let format = src.meta(&old)?.format;
        // The new copy must be this host's to write before anything is written.
        if let Some(locks) = self.pool_locks(to_pool).await? {
            locks.acquire(&old, self.host_name(), name)?;
        }
        ctx.log(format!(
            "disk{index}: {}/{old} → {to_pool}/{old} ({})",
            d.pool,
            ByteSize(info.virtual_bytes)
        ));
        let moved = if state.has_process() {
            self.mirror_to(
                name,
                index,
                &dst,
                &old,
                format,
                info.virtual_bytes,
                d.cache,
                req.bandwidth_mib.map_or(0, |b| b << 20),
                ctx,
            )
            .await
        } else {
            let c = ctx.clone();
            dst.copy_from(&src, &old, &old, move |p| c.progress(p))
                .await
                .map(|_| ())
                .map_err(AgentError::from)
        };
        if let Err(e) = moved {
            if let Ok(p) = dst.volume_path(&old) {
                if p.exists() {
                    let _ = dst.delete(&old).await;
                }
            }
            if let Some(locks) = self.pool_locks(to_pool).await? {
                let _ = locks.release(&old, self.host_name());
            }
            return Err(e);
        }
        let from_pool = d.pool.clone();
        self.update_record(name, |r| {
            if let Some(x) = r.spec.disks.get_mut(index) {
                x.pool = to_pool.to_string();
            }
        })
        .await?;
        if let Some(locks) = self.pool_locks(&from_pool).await? {
            let _ = locks.release(&old, self.host_name());
        }
        src.delete(&old).await?;
        self.events().emit(
            Some(name),
            "vm",
            format!("disk{index} moved from {from_pool} to {to_pool}"),
        );
        Ok(())
    }

    /// Aborts a running disk move: the mirror stops, the old disk stays in use.
    pub async fn abort_move_disk(&self, name: &str, index: usize) -> Result<()> {
        let qmp = self.qmp(name)?;
        qmp.run(&qc::JobCancel {
            id: format!("move-disk{index}"),
        })
        .await
        .map_err(|e| {
            AgentError::refused(
                Refusal::NotInTransit,
                format!("no move of disk{index} of {name} to abort ({e})"),
            )
        })?;
        Ok(())
    }

    /// Mirrors the running disk into a new volume and pivots to it.
    #[allow(clippy::too_many_arguments)]
    async fn mirror_to(
        &self,
        name: &str,
        index: usize,
        dst: &ferry_storage::DirPool,
        vol: &str,
        format: DiskFormat,
        size: u64,
        cache: ferry_types::CacheMode,
        speed: u64,
        ctx: &TaskCtx,
    ) -> Result<()> {
        dst.create(vol, ByteSize(size), format).await?;
        let id = self.record(name).await?.0.id;
        self.confine_file(id, &dst.volume_path(vol)?).await?;
        let qmp = self.qmp(name)?;
        let old_node = self.disk_node(name, index).await;
        let new_node = format!("disk{index}-{:x}", rand::random::<u16>());
        let (direct, no_flush, _) = cache.qemu_flags();
        let c = json!({"direct": direct, "no-flush": no_flush});
        let mut node = ferry_qemu::format_node(
            format,
            json!({"driver": "file", "filename": dst.volume_path(vol)?, "cache": c}),
            &[],
        );
        node["node-name"] = json!(new_node);
        node["cache"] = c;
        qmp.run(&qc::BlockdevAdd(node)).await?;
        let job = format!("move-disk{index}");
        let r = async {
            qmp.run(&qc::BlockdevMirror {
                job_id: job.clone(),
                device: old_node.clone(),
                target: new_node.clone(),
                sync: "full".into(),
                auto_dismiss: Some(false),
                speed: Some(speed),
            })
            .await?;
            let mut completing = false;
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let jobs = qmp.run(&qc::QueryJobs).await?;
                let Some(j) = jobs.into_iter().find(|j| j.id == job) else {
                    return Err(AgentError::failed(Failure::Qemu, "the mirror job vanished"));
                };
                if j.total_progress > 0 {
                    ctx.progress(j.current_progress as f32 / j.total_progress as f32 * 0.95);
                }
                match j.status {
                    qc::JobStatus::Ready if !completing => {
                        ctx.log("in sync: pivoting to the new volume");
                        completing = true;
                        qmp.run(&qc::JobComplete { id: job.clone() }).await?;
                    }
                    qc::JobStatus::Concluded => {
                        let _ = qmp.run(&qc::JobDismiss { id: job.clone() }).await;
                        if let Some(e) = j.error {
                            return Err(AgentError::failed_by(
                                Failure::Migration,
                                "mirror failed",
                                e,
                            ));
                        }
                        if !completing {
                            // Cancelled (an abort): no pivot happened.
                            return Err(AgentError::failed(
                                Failure::Aborted,
                                format!("move aborted; disk{index} stays where it was"),
                            ));
                        }
                        return Ok(());
                    }
                    _ => {}
                }
            }
        }
        .await;
        match r {
            Ok(()) => {
                // The device reads and writes the new node now; drop the old ones.
                let _ = qmp
                    .run(&qc::BlockdevDel {
                        node_name: old_node.clone(),
                    })
                    .await;
                let _ = qmp
                    .run(&qc::BlockdevDel {
                        node_name: format!("file-disk{index}"),
                    })
                    .await;
                Ok(())
            }
            Err(e) => {
                // (job-cancel takes no 'force': with it QEMU refused the cancel.)
                let _ = qmp.run(&qc::JobCancel { id: job.clone() }).await;
                for _ in 0..50 {
                    let gone = qmp
                        .run(&qc::QueryJobs)
                        .await
                        .map(|j| {
                            !j.iter()
                                .any(|x| x.id == job && x.status != qc::JobStatus::Concluded)
                        })
                        .unwrap_or(true);
                    if gone {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                let _ = qmp.run(&qc::JobDismiss { id: job.clone() }).await;
                let _ = qmp
                    .run(&qc::BlockdevDel {
                        node_name: new_node.clone(),
                    })
                    .await;
                Err(e)
            }
        }
    }
}
