//! Suspend to disk ("hibernate", seed 000): the running VM's RAM and device state are
//! migrated into a file in its pool, then QEMU ends; resuming starts QEMU with
//! `-incoming defer`, loads the file and continues — the guest never notices (its
//! uptime runs on). The same file is the building block for cold migration.

use crate::error::{AgentError, Result};
use crate::runtime::Slot;
use crate::tasks::TaskCtx;
use crate::Agent;
use ferry_types::{VmAction, VmState};
use serde_json::json;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;
use std::time::Duration;

impl Agent {
    pub(crate) async fn set_running(&self, name: &str, slot: &Slot) {
        let old = slot.with(|rt| std::mem::replace(&mut rt.state, VmState::Running));
        if old != VmState::Running {
            self.inner
                .events
                .emit(Some(name), "state", format!("{old} -> running"));
        }
        self.save_state(name, VmState::Running, None).await;
    }

    /// Waits for the migration stream of `qmp` to complete, reporting progress.
    async fn wait_migration(&self, name: &str, ctx: Option<&TaskCtx>) -> Result<()> {
        let qmp = self.qmp(name)?;
        loop {
            let m = qmp.execute("query-migrate", None).await?;
            match m["status"].as_str().unwrap_or("") {
                "completed" => return Ok(()),
                "failed" | "cancelled" => {
                    return Err(AgentError::Conflict(format!(
                        "saving/loading the state of {name} failed: {}",
                        m["error-desc"].as_str().unwrap_or("unknown reason")
                    )))
                }
                _ => {
                    if let (Some(ctx), Some(t), Some(r)) = (
                        ctx,
                        m["ram"]["total"].as_f64(),
                        m["ram"]["remaining"].as_f64(),
                    ) {
                        if t > 0.0 {
                            ctx.progress((1.0 - r / t) as f32);
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn suspend_vm(&self, name: &str, ctx: Option<&TaskCtx>) -> Result<()> {
        let slot = self.slot(name);
        let _op = slot.op.lock().await;
        let (rec, _) = self.record(name).await?;
        slot.state().check(VmAction::Suspend)?;
        if let Some(i) = rec.spec.disks.iter().position(|d| d.nonpersistent) {
            return Err(AgentError::Conflict(format!(
                "disk{i} is non-persistent and would be lost at power-off; {name} cannot be suspended"
            )));
        }
        let pool = rec
            .spec
            .disks
            .first()
            .map_or("local".to_string(), |d| d.pool.clone());
        let dp = self.dir_pool(&pool).await?;
        let file = dp.path.join(format!(".vm-{}-suspend.state", rec.id));
        let _ = std::fs::remove_file(&file);
        let qmp = self.qmp(name)?;
        // QEMU writes into a file the daemon opened (it may not make files in a pool).
        let out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&file)
            .map_err(|source| AgentError::Io {
                what: format!("Create {}", file.display()),
                source,
            })?;
        qmp.send_fd("suspend", out.as_fd()).await?;
        drop(out);
        qmp.execute("migrate", Some(json!({"uri": "fd:suspend"})))
            .await?;
        if let Err(e) = self.wait_migration(name, ctx).await {
            let _ = std::fs::remove_file(&file);
            let _ = qmp.execute("cont", None).await;
            return Err(e);
        }
        let f = file.display().to_string();
        self.update_record(name, |r| r.suspend_file = Some(f.clone()))
            .await?;
        let _intent = crate::exit::IntentGuard::set(&slot, crate::exit::ExitIntent::Suspend);
        let _ = qmp.execute("quit", None).await;
        for _ in 0..500 {
            if !slot.state().has_process() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if slot.state() != VmState::Suspended {
            // QEMU hangs: its end is no longer a suspend, and the state file (which a
            // later start would load over disks it no longer matches) goes.
            drop(_intent);
            let _ = self.update_record(name, |r| r.suspend_file = None).await;
            let _ = std::fs::remove_file(&file);
            return Err(AgentError::Conflict(format!(
                "{name} did not end after saving its state"
            )));
        }
        self.inner
            .events
            .emit(Some(name), "vm", format!("suspended to {f}"));
        Ok(())
    }

    /// Loads the suspend file into a QEMU started with `-incoming defer` and continues.
    pub(crate) async fn load_suspended(
        &self,
        name: &str,
        slot: &Arc<Slot>,
        file: &str,
    ) -> Result<()> {
        let qmp = self.qmp(name)?;
        let input = std::fs::File::open(file).map_err(|source| AgentError::Io {
            what: format!("Open the suspend file {file}"),
            source,
        })?;
        qmp.send_fd("resume", input.as_fd()).await?;
        drop(input);
        qmp.execute("migrate-incoming", Some(json!({"uri": "fd:resume"})))
            .await?;
        self.wait_migration(name, None).await?;
        // The incoming side reports completion just before it is ready to run.
        for _ in 0..250 {
            let st = qmp.execute("query-status", None).await?;
            if st["status"] != "inmigrate" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        qmp.execute("cont", None).await?;
        self.set_running(name, slot).await;
        self.update_record(name, |r| r.suspend_file = None).await?;
        let _ = std::fs::remove_file(file);
        self.inner
            .events
            .emit(Some(name), "vm", "resumed from its suspend file");
        Ok(())
    }
}
