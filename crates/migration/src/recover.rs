//! Migrations a daemon restart cut off. QEMU carries on without the daemon, so at start
//! the source looks at its QEMU: still migrating → cancel (the guest keeps running
//! here); failed → resume the guest; completed → ask the destination and hand the VM
//! over. It never resumes a guest whose migration completed unless the destination
//! says it does not run it: the guest must not run twice. The destination re-arms the
//! watchdog of every VM still arriving, and drops those whose QEMU is gone.

use crate::error::{AgentError, Failure};
use crate::records::Transit;
use crate::runtime::VmOp;
use crate::Migrations;
use ferry_qmp::commands as qc;
use ferry_types::{IncomingFinish, MigrationPhase, Vm};
use std::time::Duration;

impl Migrations {
    #[tracing::instrument(skip_all)]
    pub(crate) async fn recover_migrations(&self) {
        let Ok(records) = self.records().await else {
            return;
        };
        for rec in records {
            let name = rec.spec.name.clone();
            if let Some(to) = Transit::to(&rec.transit).map(String::from) {
                self.set_outgoing(
                    &name,
                    Some((
                        &to,
                        crate::Step::Ferry(MigrationPhase::Recovering, "recovering"),
                    )),
                );
                let agent = self.clone();
                tokio::spawn(async move { agent.resolve_outgoing(name, to).await });
            } else if Transit::from(&rec.transit).is_some() {
                let slot = self.slot(&name);
                if slot.state().has_process() {
                    let agent = self.clone();
                    let run = Some(slot.with(|rt| rt.generation));
                    tokio::spawn(async move { agent.watch_incoming(name, run).await });
                } else {
                    let op = VmOp::lock(&name, &slot).await;
                    self.drop_incoming_held(&op).await;
                }
            }
        }
    }

    /// Brings an outgoing migration of a previous daemon to an end, retrying while the
    /// destination cannot be asked.
    async fn resolve_outgoing(self, name: String, to: String) {
        loop {
            match self.resolve_once(&name, &to).await {
                Ok(true) => break,
                Ok(false) => tokio::time::sleep(Duration::from_secs(1)).await,
                Err(e) => {
                    tracing::warn!(vm = %name, %to, error = %e, "migration outcome not settled yet");
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
        }
        self.set_outgoing(&name, None);
    }

    /// One step; true when settled.
    async fn resolve_once(&self, name: &str, to: &str) -> crate::Result<bool> {
        let slot = self.slot(name);
        let peer = self.peer_with_timeout(to, Duration::from_secs(5)).await?;
        let copied: Vec<usize> = {
            let (rec, _) = self.record(name).await?;
            let mut v = vec![];
            for (i, d) in rec.spec.disks.iter().enumerate() {
                if self.pool_locks(&d.pool).await?.is_none() {
                    v.push(i);
                }
            }
            v
        };
        let dest_has_it = || async {
            match peer.get::<Vm>(&format!("/api/v1/vms/{name}")).await {
                Ok(vm) => Ok(Some(vm)),
                Err(AgentError::NotFound(_)) => Ok(None),
                Err(e) => Err(e),
            }
        };
        if !slot.state().has_process() {
            // QEMU is gone here: the VM is the destination's if it has it.
            let _op = VmOp::lock(name, &slot).await;
            if dest_has_it().await?.is_some() {
                let (rec, _) = self.record(name).await?;
                self.forget_vm(name, &rec).await?;
                self.events().emit(
                    Some(name),
                    "migration",
                    format!("{name} runs on {to}: forgotten here after a restart"),
                );
            } else {
                let _ = self.update_record(name, |r| r.transit = None).await;
            }
            return Ok(true);
        }
        let qmp = self.qmp(name)?;
        let status = qmp.run(&qc::QueryMigrate).await?.status();
        self.set_outgoing(name, Some((to, crate::Step::Qemu(status))));
        match status.as_str() {
            "completed" => match dest_has_it().await? {
                Some(_) => {
                    let _ = peer
                        .post::<Vec<String>>(
                            &format!("/api/v1/migrations/incoming/{name}/finish"),
                            &IncomingFinish { success: true },
                        )
                        .await;
                    let _op = VmOp::lock(name, &slot).await;
                    self.finish_outgoing(name, &slot, &copied).await?;
                    self.events().emit(
                        Some(name),
                        "migration",
                        format!("migration to {to} had completed; handed over after a restart"),
                    );
                    Ok(true)
                }
                None => Err(AgentError::failed(Failure::Migration, format!(
                    "QEMU completed the migration but {to} does not have {name}; the guest stays paused here"
                ))),
            },
            "failed" | "cancelled" | "none" => {
                let _op = VmOp::lock(name, &slot).await;
                self.recover_source(name, &qmp, &copied).await;
                let _ = peer
                    .post::<serde_json::Value>(
                        &format!("/api/v1/migrations/incoming/{name}/finish"),
                        &IncomingFinish { success: false },
                    )
                    .await;
                let _ = self.update_record(name, |r| r.transit = None).await;
                let st = slot.state();
                self.save_state(name, st, None).await;
                self.events().emit(
                    Some(name),
                    "migration",
                    format!("migration to {to} was cut off by a restart ({status}); the VM stays here"),
                );
                Ok(true)
            }
            s if s.starts_with("postcopy") => Ok(false), // cannot be cancelled: let it end
            _ => {
                let _ = qmp.run(&qc::MigrateCancel).await;
                Ok(false)
            }
        }
    }
}
