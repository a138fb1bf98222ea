//! Live migration with local disks (libvirt's copy-storage-all): every local disk is
//! mirrored into an NBD export of the destination's QEMU while the guest runs; RAM
//! migrates once the mirrors are in sync, and at the pause before switchover the
//! mirrors are completed (their last writes flushed) before the device state moves.

use crate::error::{AgentError, Failure, Result};
use crate::tasks::TaskCtx;
use crate::Migrations;
use ferry_qmp::commands as qc;
use ferry_qmp::Qmp;
use ferry_types::IncomingReady;
use serde_json::json;
use std::time::Duration;

fn job(i: usize) -> String {
    format!("mirror-disk{i}")
}

impl Migrations {
    /// Starts the mirrors and waits until each is in sync; returns the bytes copied.
    pub(super) async fn mirror_disks(
        &self,
        name: &str,
        qmp: &Qmp,
        ready: &IncomingReady,
        copy: &[usize],
        to: &str,
        ctx: &TaskCtx,
    ) -> Result<u64> {
        let nbd = ready.nbd.as_deref().ok_or_else(|| {
            AgentError::failed(
                Failure::Migration,
                "the destination offered no NBD server for the disks",
            )
        })?;
        let (host, port) = nbd.rsplit_once(':').ok_or_else(|| {
            AgentError::failed(Failure::Migration, format!("bad NBD address {nbd}"))
        })?;
        for (k, &i) in copy.iter().enumerate() {
            let node = self.disk_node(name, i).await;
            let export = ready.exports.get(k).ok_or_else(|| {
                AgentError::failed(
                    Failure::Migration,
                    format!("the destination exports no disk {i}"),
                )
            })?;
            qmp.run(&qc::BlockdevAdd(json!({
                    "driver": "nbd", "node-name": job(i),
                    "server": {"type": "inet", "host": host, "port": port},
                    "export": export,
                    // TLS with the host certificates; the server must be host `to`.
                    "tls-creds": crate::tls::CLIENT_CREDS, "tls-hostname": to,
            })))
            .await?;
            qmp.run(&qc::BlockdevMirror {
                job_id: job(i),
                device: node,
                target: job(i),
                sync: "full".into(),
                auto_dismiss: None,
                speed: None,
            })
            .await?;
            ctx.log(format!("mirroring disk {i} of {name} to {nbd}/{export}"));
        }
        let mut stalled = 0;
        let mut last = 0;
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let jobs: Vec<_> = qmp
                .run(&qc::QueryBlockJobs)
                .await?
                .into_iter()
                .filter(|j| copy.iter().any(|&i| j.device == job(i)))
                .collect();
            if jobs.len() != copy.len() {
                return Err(AgentError::failed(
                    Failure::Migration,
                    "a disk mirror ended before it was in sync (destination gone?)",
                ));
            }
            let (off, len) = jobs
                .iter()
                .fold((0, 0), |(o, l), j| (o + j.offset, l + j.len));
            if len > 0 {
                ctx.progress(0.05 * off as f32 / len as f32);
            }
            if jobs.iter().all(|j| j.ready) {
                ctx.log(format!("disks in sync ({} MiB)", len >> 20));
                return Ok(len);
            }
            stalled = if off == last { stalled + 1 } else { 0 };
            last = off;
            if stalled > 50 {
                return Err(AgentError::failed(
                    Failure::Migration,
                    "disk mirror made no progress for 10 s",
                ));
            }
        }
    }

    /// At the pause before switchover: ends the mirrors with the target complete.
    pub(super) async fn complete_mirrors(&self, qmp: &Qmp, copy: &[usize]) -> Result<()> {
        for &i in copy {
            qmp.run(&qc::BlockJobCancel {
                device: job(i),
                force: None,
            })
            .await?;
        }
        self.wait_jobs_gone(qmp, copy).await;
        for &i in copy {
            let _ = qmp.run(&qc::BlockdevDel { node_name: job(i) }).await;
        }
        Ok(())
    }

    /// After a failure: stops the mirrors and drops the NBD clients.
    pub(super) async fn cancel_mirrors(&self, qmp: &Qmp, copy: &[usize]) {
        for &i in copy {
            let _ = qmp
                .run(&qc::BlockJobCancel {
                    device: job(i),
                    force: Some(true),
                })
                .await;
        }
        self.wait_jobs_gone(qmp, copy).await;
        for &i in copy {
            let _ = qmp.run(&qc::BlockdevDel { node_name: job(i) }).await;
        }
    }

    async fn wait_jobs_gone(&self, qmp: &Qmp, copy: &[usize]) {
        for _ in 0..300 {
            let Ok(jobs) = qmp.run(&qc::QueryBlockJobs).await else {
                return;
            };
            let left = jobs
                .iter()
                .any(|j| copy.iter().any(|&i| j.device == job(i)));
            if !left {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
