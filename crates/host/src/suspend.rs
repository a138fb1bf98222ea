//! Suspend to disk ("hibernate", seed 000): the running VM's RAM and device state are
//! migrated into a file in its pool, then QEMU ends; resuming starts QEMU with
//! `-incoming defer`, loads the file and continues — the guest never notices (its
//! uptime runs on). The same file is the building block for cold migration.

use crate::error::{AgentError, Failure, Refusal, Result};
use crate::runtime::Slot;
use crate::tasks::TaskCtx;
use crate::Host;
use ferry_qmp::commands as qc;
use ferry_types::{VmAction, VmState};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;
use std::time::Duration;

impl Host {
    pub async fn set_running(&self, name: &str, slot: &Slot) {
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
            let m = qmp.run(&qc::QueryMigrate).await?;
            match m.status() {
                qc::MigrationStatus::Completed => return Ok(()),
                qc::MigrationStatus::Failed | qc::MigrationStatus::Cancelled => {
                    return Err(AgentError::failed_by(
                        Failure::Qemu,
                        format!("saving/loading the state of {name} failed"),
                        m.error_desc
                            .clone()
                            .unwrap_or_else(|| "QEMU gave no reason".into()),
                    ))
                }
                _ => {
                    if let (Some(ctx), Some(ram)) = (ctx, &m.ram) {
                        if ram.total > 0 {
                            ctx.progress(1.0 - crate::tasks::fraction(ram.remaining, ram.total));
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tracing::instrument(skip_all, fields(vm = %name))]
    pub async fn suspend_vm(&self, name: &str, ctx: Option<&TaskCtx>) -> Result<()> {
        let _op = self.lock_vm(name).await;
        let slot = _op.slot().clone();
        let (rec, _) = self.record(name).await?;
        slot.state().check(VmAction::Suspend)?;
        self.refuse_live_restoring(&rec, "suspend it")?;
        if let Some(i) = rec.spec.disks.iter().position(|d| d.nonpersistent) {
            return Err(AgentError::refused(Refusal::Unsupported, format!(
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
        qmp.run(&qc::Migrate {
            uri: "fd:suspend".into(),
        })
        .await?;
        if let Err(e) = self.wait_migration(name, ctx).await {
            let _ = std::fs::remove_file(&file);
            let _ = qmp.run(&qc::Cont).await;
            return Err(e);
        }
        let f = file.display().to_string();
        self.update_record(name, |r| r.suspend_file = Some(f.clone()))
            .await?;
        let mut intent = crate::exit::IntentGuard::set(&slot, crate::exit::ExitIntent::Suspend);
        let _ = qmp.run(&qc::Quit).await;
        // The state is saved and QEMU told to end: whenever it ends, it is suspended
        // (the guest does not run again after the migration completed, unless a
        // resume takes the suspend back).
        intent.keep();
        for _ in 0..500 {
            if !slot.state().has_process() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if slot.state() != VmState::Suspended {
            return Err(AgentError::refused(Refusal::Busy, format!(
                "{name}'s state is saved but its QEMU has not ended yet; it is recorded as suspended when it does"
            )));
        }
        self.inner
            .events
            .emit(Some(name), "vm", format!("suspended to {f}"));
        Ok(())
    }

    /// Loads the suspend file into a QEMU started with `-incoming defer` and continues.
    pub async fn load_suspended(&self, name: &str, slot: &Arc<Slot>, file: &str) -> Result<()> {
        let qmp = self.qmp(name)?;
        let input = std::fs::File::open(file).map_err(|source| AgentError::Io {
            what: format!("Open the suspend file {file}"),
            source,
        })?;
        qmp.send_fd("resume", input.as_fd()).await?;
        drop(input);
        qmp.run(&qc::MigrateIncoming {
            uri: "fd:resume".into(),
        })
        .await?;
        self.wait_migration(name, None).await?;
        // The incoming side reports completion just before it is ready to run.
        for _ in 0..250 {
            if qmp.run(&qc::QueryStatus).await?.status != qc::RunState::Inmigrate {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        qmp.run(&qc::Cont).await?;
        self.set_running(name, slot).await;
        self.update_record(name, |r| r.suspend_file = None).await?;
        let _ = std::fs::remove_file(file);
        self.inner
            .events
            .emit(Some(name), "vm", "resumed from its suspend file");
        Ok(())
    }
}
