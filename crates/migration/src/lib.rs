//! Live migration, the source's side (seed 004's three steps): the destination prepares
//! a QEMU with `-incoming` (same devices, same MACs, taps already on its bridge), this
//! QEMU sends RAM in passes over TCP between the hosts' addresses with a dirty bitmap
//! while the guest runs, then pauses it for the last pages and device state; the
//! destination resumes it and announces its MACs. The disk locks and the VM record move
//! when it completes; on failure the VM keeps running here and the destination removes
//! what it prepared. `incoming.rs` is the destination's side, `policy.rs` decides
//! throttling and post-copy, `recover.rs` finishes migrations a daemon restart cut off.
//! `cold.rs` moves stopped and suspended VMs, `storage.rs` mirrors local disks for
//! `--with-storage`, `movedisk.rs` is Storage vMotion, `tls.rs` QEMU's TLS on the
//! migration stream, `target.rs` where the stream goes.
//!
//! [`Migrations`] is this crate's view of a host: the [`Host`] runtime plus the
//! migrations in flight, which only this crate changes. It needs nothing of the
//! cluster side; the cluster side (DRS, maintenance) calls it.

mod cold;
pub use cold::ColdPiece;
mod incoming;
mod movedisk;
pub mod policy;
mod recover;
mod storage;
mod target;
mod tls;

use ferry_host::Host;
pub(crate) use ferry_host::{confine, error, error_chain, exit, meminfo, records, runtime, tasks};

use crate::error::{AgentError, Failure, Refusal, Result};
use crate::records::Transit;
use crate::tasks::TaskCtx;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// An outgoing migration: where to, and where it stands.
struct Outgoing {
    to: String,
    phase: MigrationPhase,
    /// QEMU's last status (or ferry's step before QEMU has one).
    status: String,
    /// When it began (Unix ms).
    since_ms: u64,
}

/// A step of an outgoing migration: one of ferry's own, or QEMU's status.
#[derive(Clone, Copy)]
enum Step {
    Ferry(MigrationPhase, &'static str),
    Qemu(qc::MigrationStatus),
}

/// The first step of every migration.
const SETUP: Step = Step::Ferry(MigrationPhase::Setup, "setup");

/// The migrations in flight on this host (only this crate changes them).
#[derive(Default)]
struct Inner {
    /// Outgoing migrations: VM → destination and phase.
    outgoing: Mutex<HashMap<String, Outgoing>>,
    /// Live migrations arriving here: their phase, and what the claim at switchover
    /// needs (it must not wait for the store while the guest is paused).
    arriving: Mutex<HashMap<String, Arriving>>,
}

/// A live migration arriving here.
struct Arriving {
    id: u32,
    spec: ferry_types::VmSpec,
    /// Setup until the source's claim, Switchover after it, Completed once QEMU has
    /// everything; gone when the source's word (or the watchdog) ends it.
    phase: MigrationPhase,
    /// The source host.
    from: String,
    /// When the source asked (Unix ms).
    since_ms: u64,
}

/// A host's migrations: the runtime it moves VMs off and onto, and what is in flight.
/// Cheap to clone; dereferences to the [`Host`].
#[derive(Clone)]
pub struct Migrations {
    host: Host,
    inner: Arc<Inner>,
}

impl std::ops::Deref for Migrations {
    type Target = Host;
    fn deref(&self) -> &Host {
        &self.host
    }
}

impl Migrations {
    /// The migrations of `host`; finishes those a daemon restart cut off.
    pub async fn open(host: Host) -> Migrations {
        let m = Migrations {
            host,
            inner: Arc::default(),
        };
        m.recover_migrations().await;
        m
    }
}
use ferry_qmp::commands as qc;
use ferry_qmp::Qmp;
use ferry_types::{
    IncomingFinish, IncomingReady, IncomingRequest, MigrateRequest, MigrationDirection,
    MigrationInFlight, MigrationInfo, MigrationPhase, MigrationReport, VmAction, VmState,
    VmTransfer,
};
use policy::{Decision, Policy, PolicyConfig, Sample};
use serde_json::json;
use std::time::{Duration, Instant};

/// How one attempt at migrating ended (errors aside).
/// How a watched migration ended.
struct Watched {
    info: qc::MigrationInfo,
    switchover: Duration,
    /// The policy wanted post-copy that was not armed: the attempt was cancelled.
    give_up: bool,
}

enum Attempt {
    Done(MigrationReport),
    /// Pre-copy stalled even with throttling: retry with post-copy armed.
    RetryWithPostcopy(Vec<String>),
}

const POLL: Duration = Duration::from_millis(100);
const DEFAULT_DOWNTIME_MS: u64 = 50;
/// No cap unless asked: the migration link is the hosts' (like Proxmox's default).
const DEFAULT_BANDWIDTH_MIB: u64 = 10 * 1024;

impl Migrations {
    /// Outgoing migrations (the destination asks while it waits).
    pub fn outgoing_migration(&self, vm: &str) -> Option<MigrationInfo> {
        self.inner
            .outgoing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(vm)
            .map(|o| MigrationInfo {
                vm: vm.to_string(),
                to: o.to.clone(),
                status: o.status.clone(),
                phase: Some(o.phase),
            })
    }

    /// Every migration in flight on this host, both ways, oldest first (what
    /// `ferry host status` shows beside the background tasks).
    pub fn in_flight(&self) -> Vec<MigrationInFlight> {
        let mut v: Vec<MigrationInFlight> = self
            .inner
            .outgoing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(vm, o)| MigrationInFlight {
                vm: vm.clone(),
                direction: MigrationDirection::Outgoing,
                peer: o.to.clone(),
                phase: o.phase,
                since_ms: o.since_ms,
            })
            .collect();
        v.extend(
            self.inner
                .arriving
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|(vm, a)| MigrationInFlight {
                    vm: vm.clone(),
                    direction: MigrationDirection::Incoming,
                    peer: a.from.clone(),
                    phase: a.phase,
                    since_ms: a.since_ms,
                }),
        );
        v.sort_by(|a, b| (a.since_ms, &a.vm).cmp(&(b.since_ms, &b.vm)));
        v
    }

    /// Records where the outgoing migration of `vm` stands (`None`: it is over). A
    /// status QEMU reported gives the phase; ferry's own steps name theirs.
    fn set_outgoing(&self, vm: &str, to: Option<(&str, Step)>) {
        let mut m = self
            .inner
            .outgoing
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match to {
            Some((to, step)) => {
                let (phase, status) = match step {
                    Step::Ferry(p, s) => (p, s.to_string()),
                    Step::Qemu(s) => (MigrationPhase::from_qemu(s.as_str()), s.as_str().into()),
                };
                let since_ms = m
                    .get(vm)
                    .map_or_else(ferry_host::events::now_ms, |o| o.since_ms);
                m.insert(
                    vm.to_string(),
                    Outgoing {
                        to: to.to_string(),
                        phase,
                        status,
                        since_ms,
                    },
                );
            }
            None => {
                m.remove(vm);
            }
        }
    }

    /// Moves running VM `name` to host `req.to` while it runs.
    #[tracing::instrument(skip_all, fields(vm = %name, to = %req.to))]
    pub async fn migrate_vm(
        &self,
        name: &str,
        req: MigrateRequest,
        ctx: &TaskCtx,
    ) -> Result<MigrationReport> {
        req.validate()?;
        let t0 = Instant::now();
        let _op = self.lock_vm(name).await;
        let slot = _op.slot().clone();
        let (rec, _) = self.record(name).await?;
        slot.state().check(VmAction::Migrate)?;
        self.refuse_live_restoring(&rec, "migrate it")?;
        if !rec.spec.arch().live_migrates() {
            return Err(AgentError::refused(
                Refusal::NotMovable,
                format!(
                    "VM {name} is a {} guest: ferry does not move those while they run (a guest stopped answering after it in the lab); shut it down and move it cold",
                    rec.spec.arch()
                ),
            ));
        }
        if rec.transit.is_some() {
            return Err(AgentError::refused(
                Refusal::Busy,
                format!("VM {name} is already migrating"),
            ));
        }
        let peer = self.peer(&req.to).await?;
        let (copy, copy_sizes) = self.disks_to_copy(&rec, &req).await?;
        let snapshots = self.list_snapshots(name).await?.snapshots;
        if !copy.is_empty() && !snapshots.is_empty() {
            return Err(AgentError::refused(Refusal::NotMovable, format!(
                "VM {name} has snapshots, which a disk copy while running does not carry; delete them or put its disks on a shared pool"
            )));
        }
        let qmp = self.qmp(name)?;
        // Post-copy costs a return path that lengthens every switchover, so the first
        // attempt is pre-copy only; a migration the policy finds stalled even with
        // throttling is restarted with post-copy armed.
        let may_postcopy = req.allow_postcopy.unwrap_or(true) && copy.is_empty();
        let transfer = VmTransfer {
            spec: rec.spec.clone(),
            template: rec.template,
            current_snapshot: rec.current_snapshot.clone(),
            clone_of: rec.clone_of.clone(),
            snapshots,
        };
        let incoming = IncomingRequest {
            source: self.host_name().to_string(),
            vm: transfer,
            copy_disks: copy.clone(),
            copy_sizes,
            target_pool: req.target_pool.clone(),
            postcopy: false,
            origin_id: Some(rec.origin_id.unwrap_or(rec.id)),
        };
        self.set_outgoing(name, Some((&req.to, SETUP)));
        self.update_record(name, |r| r.transit = Some(Transit::To(req.to.clone())))
            .await?;
        self.events().emit(
            Some(name),
            "migration",
            format!("live migration to {} started", req.to),
        );
        ctx.log(format!("preparing {} to receive {name}", req.to));
        let mut report = match self
            .migrate_attempts(name, &qmp, &req, &peer, incoming, may_postcopy, ctx)
            .await
        {
            Ok(report) => report,
            Err(e) => {
                self.set_outgoing(name, None);
                let _ = self.update_record(name, |r| r.transit = None).await;
                self.events().emit(
                    Some(name),
                    "migration",
                    format!(
                        "migration to {} failed: {}; the VM stays here",
                        req.to,
                        crate::error_chain(&e).join(": ")
                    ),
                );
                return Err(e);
            }
        };
        self.hand_over(name, &slot, &peer, &req, &copy, &mut report, ctx)
            .await?;
        report.total_ms = u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.events().emit(
            Some(name),
            "migration",
            format!(
                "migrated to {} in {} ms (downtime {} ms)",
                req.to, report.total_ms, report.downtime_ms
            ),
        );
        ctx.log(format!(
            "done: {} ms total, QEMU downtime {} ms, {} MiB sent in {} passes",
            report.total_ms,
            report.downtime_ms,
            report.ram_transferred_bytes >> 20,
            report.passes
        ));
        Ok(report)
    }

    /// Attempts the migration (pre-copy first; once more with post-copy armed when
    /// pre-copy does not converge and post-copy may be used), each with a destination
    /// prepared anew. Nothing is sent before the destination answered.
    #[allow(clippy::too_many_arguments)]
    async fn migrate_attempts(
        &self,
        name: &str,
        qmp: &Qmp,
        req: &MigrateRequest,
        peer: &ferry_host::Peer,
        mut incoming: IncomingRequest,
        may_postcopy: bool,
        ctx: &TaskCtx,
    ) -> Result<MigrationReport> {
        let copy = incoming.copy_disks.clone();
        let mut earlier_steps = vec![];
        let r = loop {
            let ready: Result<IncomingReady> =
                peer.post("/api/v1/migrations/incoming", &incoming).await;
            let mut ready = match ready {
                Ok(r) => r,
                // Nothing was sent yet (a copy the destination made before its answer
                // was lost goes by itself once this host gives up).
                Err(e) => {
                    // The destination's refusal keeps its meaning (its status).
                    let status = match &e {
                        AgentError::Peer { status, .. } => *status,
                        AgentError::NotFound(_) => Some(404),
                        _ => None,
                    };
                    let code = status.map(|_| e.code().to_string());
                    break Err(AgentError::Peer {
                        host: req.to.clone(),
                        what: format!(
                            "preparing it to receive {name} failed; {name} keeps running on {}",
                            self.host_name()
                        ),
                        status,
                        code,
                        source: Some(Box::new(e)),
                    });
                }
            };
            // Only ports come from the peer; QEMU gets addresses built here.
            if let Err(e) = local_addresses(&peer.host.address, &mut ready) {
                break Err(e);
            }
            ctx.log(format!("destination QEMU listens on {}", ready.uri));
            let r = self
                .run_migration(name, qmp, req, &ready, &copy, incoming.postcopy, ctx)
                .await;
            let retry = matches!(&r, Ok(Attempt::RetryWithPostcopy(_)));
            if r.is_err() || retry {
                let abort = IncomingFinish { success: false };
                if let Err(e) = peer
                    .post::<serde_json::Value>(
                        &format!("/api/v1/migrations/incoming/{name}/finish"),
                        &abort,
                    )
                    .await
                {
                    ctx.log(format!(
                        "could not tell {} to drop its copy ({e}); it removes it by itself",
                        req.to
                    ));
                }
            }
            match r {
                Ok(Attempt::RetryWithPostcopy(steps)) if may_postcopy && !incoming.postcopy => {
                    earlier_steps = steps;
                    earlier_steps.push("pre-copy cancelled: restarting with post-copy armed".into());
                    ctx.log("pre-copy does not converge: restarting with post-copy armed");
                    incoming.postcopy = true;
                    // Not the cancelled attempt's status: the destination must not
                    // read it as this migration's end and drop the next copy.
                    self.set_outgoing(name, Some((&req.to, SETUP)));
                }
                Ok(Attempt::RetryWithPostcopy(steps)) => {
                    break Err(AgentError::failed(Failure::Migration, format!(
                        "migration does not converge ({}); {name} keeps running on {} (allow post-copy, raise the downtime limit or the bandwidth)",
                        steps.join("; "),
                        self.host_name()
                    )))
                }
                Ok(Attempt::Done(r)) => break Ok(r),
                Err(e) => break Err(e),
            }
        };
        let mut report = r?;
        earlier_steps.append(&mut report.policy_steps);
        report.policy_steps = earlier_steps;
        Ok(report)
    }

    /// Which of `rec`'s disks a live migration to `req.to` copies (with their sizes);
    /// refuses a disk that cannot move live with the reason.
    async fn disks_to_copy(
        &self,
        rec: &crate::records::VmRecord,
        req: &MigrateRequest,
    ) -> Result<(Vec<usize>, Vec<u64>)> {
        let mut copy = vec![];
        let mut copy_sizes = vec![];
        for (i, d) in rec.spec.disks.iter().enumerate() {
            if d.nonpersistent {
                return Err(AgentError::refused(Refusal::NotMovable, format!(
                    "disk {i} is non-persistent: its writes live in this host's run dir; stop the VM to move it"
                )));
            }
            if let Some(rp) = self.replicated_pool(&d.pool).await? {
                if !rp.hosts.contains(&req.to) {
                    return Err(AgentError::refused(Refusal::NotMovable, format!(
                        "disk {i} is on replicated pool {}, which keeps no copy on {} (its hosts: {})",
                        d.pool,
                        req.to,
                        rp.hosts.join(", ")
                    )));
                }
                continue;
            }
            if self.pool_locks(&d.pool).await?.is_none() {
                if !req.with_storage {
                    return Err(AgentError::refused(Refusal::NotMovable, format!(
                        "disk {i} is on pool {}, which only this host sees: migrate with --with-storage to copy it",
                        d.pool
                    )));
                }
                let vol = d.volume.as_deref().unwrap_or_default();
                copy_sizes.push(self.dir_pool(&d.pool).await?.info(vol).await?.virtual_bytes);
                copy.push(i);
            }
        }
        Ok((copy, copy_sizes))
    }

    /// The destination runs the VM: it becomes the owner, the paused QEMU here ends.
    #[allow(clippy::too_many_arguments)]
    async fn hand_over(
        &self,
        name: &str,
        slot: &std::sync::Arc<crate::runtime::Slot>,
        peer: &ferry_host::Peer,
        req: &MigrateRequest,
        copy: &[usize],
        report: &mut MigrationReport,
        ctx: &TaskCtx,
    ) -> Result<()> {
        self.set_outgoing(
            name,
            Some((&req.to, Step::Qemu(qc::MigrationStatus::Completed))),
        );
        // QEMU here has stopped writing (its disks are inactive after completion):
        // hand the replicated volumes' terms over; the destination promotes its copies.
        if let Ok((r, _)) = self.record(name).await {
            self.release_replicas(&r.spec).await;
        }
        match peer
            .post::<Vec<String>>(
                &format!("/api/v1/migrations/incoming/{name}/finish"),
                &IncomingFinish { success: true },
            )
            .await
        {
            Ok(locks) => report.locks = locks,
            Err(e) => ctx.log(format!(
                "{} did not confirm ({e}); it takes over by itself",
                req.to
            )),
        }
        self.finish_outgoing(name, slot, copy).await?;
        self.set_outgoing(name, None);
        report.from = self.host_name().to_string();
        report.to = req.to.clone();
        report.vm = name.to_string();
        Ok(())
    }

    /// Follows a started migration to its end: the policy's decisions each poll, the
    /// one switchover at pre-switchover.
    #[allow(clippy::too_many_arguments)]
    async fn watch_migration(
        &self,
        name: &str,
        qmp: &Qmp,
        req: &MigrateRequest,
        copy: &[usize],
        postcopy: bool,
        claim_peer: &ferry_host::Peer,
        policy: &mut Policy,
        ctx: &TaskCtx,
        // Subscribed before the migration started (no event missed), and its start.
        (mut events, t): (
            tokio::sync::broadcast::Receiver<ferry_qmp::QmpEvent>,
            Instant,
        ),
    ) -> Result<Watched> {
        let mut switched = false;
        let mut switchover = Duration::ZERO;
        let mut tick = tokio::time::interval(POLL);
        let mut give_up = false;
        let mut last_pass = 0;
        let info = loop {
            // QEMU pauses the guest at pre-switchover: noticed by its event or by a
            // poll, whichever comes first, it leads into the one switchover below.
            let mut pre = false;
            tokio::select! {
                ev = events.recv() => {
                    let status = match &ev {
                        Ok(e) if e.name == "MIGRATION" => e
                            .data
                            .get("status")
                            .and_then(|s| serde_json::from_value::<qc::MigrationStatus>(s.clone()).ok()),
                        _ => None,
                    };
                    match status {
                        Some(qc::MigrationStatus::PreSwitchover) => pre = true,
                        // An end status is read at once rather than at the next tick.
                        Some(st) if st.is_final() => {}
                        _ => continue,
                    }
                }
                _ = tick.tick() => {}
            }
            if !pre {
                let info = qmp.run(&qc::QueryMigrate).await?;
                let s = Sample::from_info(&info, t.elapsed());
                self.set_outgoing(name, Some((&req.to, Step::Qemu(s.status))));
                if s.total > 0 {
                    let done = s.total.saturating_sub(s.remaining) as f32 / s.total as f32;
                    ctx.progress(0.05 + 0.9 * done);
                }
                if s.passes > last_pass {
                    last_pass = s.passes;
                    ctx.log(format!(
                        "pass {}: {} MiB left, dirtying {} MiB/s, link {} MiB/s{}{}",
                        s.passes,
                        s.remaining >> 20,
                        s.dirty_bytes_rate() >> 20,
                        s.link_bytes_rate() >> 20,
                        info.expected_downtime
                            .map(|d| format!(", expected downtime {d} ms"))
                            .unwrap_or_default(),
                        if s.throttle_pct > 0 {
                            format!(", throttle {}%", s.throttle_pct)
                        } else {
                            String::new()
                        }
                    ));
                }
                if s.status.is_final() {
                    break info;
                }
                pre = s.status == qc::MigrationStatus::PreSwitchover;
                if !pre {
                    match policy.observe(&s) {
                        Decision::Continue => {}
                        Decision::SetDowntime(ms) => {
                            ctx.log(policy.steps.last().cloned().unwrap_or_default());
                            qmp.run(&qc::MigrateSetParameters {
                                downtime_limit: Some(ms),
                                ..Default::default()
                            })
                            .await?;
                        }
                        Decision::StartPostcopy if postcopy => {
                            ctx.log(policy.steps.last().cloned().unwrap_or_default());
                            qmp.run(&qc::MigrateStartPostcopy).await?;
                        }
                        Decision::StartPostcopy => {
                            give_up = true;
                            let _ = qmp.run(&qc::MigrateCancel).await;
                        }
                        Decision::Cancel(why) => {
                            ctx.log(format!("cancelling: {why}"));
                            let _ = qmp.run(&qc::MigrateCancel).await;
                        }
                    }
                    continue;
                }
            }
            // The guest waits at pre-switchover: the one way into the switchover.
            if !switched {
                switched = true;
                let t = Instant::now();
                self.switchover(name, qmp, req, claim_peer, copy, ctx)
                    .await?;
                switchover = t.elapsed();
            }
        };
        Ok(Watched {
            info,
            switchover,
            give_up,
        })
    }

    /// Capabilities and parameters of an outgoing migration, and QEMU's TLS with the
    /// destination (which must be host `req.to`).
    async fn arm_migration(
        &self,
        name: &str,
        qmp: &Qmp,
        req: &MigrateRequest,
        postcopy: bool,
    ) -> Result<()> {
        // The pause before switchover is where the destination claims the MACs (and
        // disk mirrors complete); events tell it without polling.
        let cap = |capability, state| qc::CapabilityState { capability, state };
        qmp.run(&qc::MigrateSetCapabilities {
            capabilities: vec![
                cap(qc::Capability::Events, true),
                cap(qc::Capability::AutoConverge, true),
                cap(qc::Capability::PostcopyRam, postcopy),
                cap(qc::Capability::PauseBeforeSwitchover, true),
            ],
        })
        .await?;
        let bw = req.max_bandwidth_mib.unwrap_or(DEFAULT_BANDWIDTH_MIB) << 20;
        qmp.run(&qc::MigrateSetParameters {
            downtime_limit: Some(req.downtime_limit_ms.unwrap_or(DEFAULT_DOWNTIME_MS)),
            max_bandwidth: Some(bw),
            max_postcopy_bandwidth: Some(bw),
            cpu_throttle_initial: Some(30),
            cpu_throttle_increment: Some(20),
            ..Default::default()
        })
        .await?;
        // QEMU's TLS with the host certificates; the destination must be host `to`.
        self.qemu_tls_client(name, qmp, &req.to).await?;
        qmp.run(&qc::MigrateSetParameters {
            tls_creds: Some(tls::CLIENT_CREDS.into()),
            tls_hostname: Some(req.to.clone()),
            ..Default::default()
        })
        .await?;
        Ok(())
    }

    /// The migration proper, from capabilities to a terminal status.
    #[allow(clippy::too_many_arguments)]
    async fn run_migration(
        &self,
        name: &str,
        qmp: &Qmp,
        req: &MigrateRequest,
        ready: &IncomingReady,
        copy: &[usize],
        postcopy: bool,
        ctx: &TaskCtx,
    ) -> Result<Attempt> {
        // Resolved now: the guest is paused when the claim goes out.
        let claim_peer = self
            .peer_with_timeout(&req.to, Duration::from_secs(2))
            .await?;
        self.arm_migration(name, qmp, req, postcopy).await?;
        let mut disk_bytes = 0;
        if !copy.is_empty() {
            disk_bytes = self
                .mirror_disks(name, qmp, ready, copy, &req.to, ctx)
                .await?;
        }
        let t = Instant::now();
        let events = qmp.events();
        qmp.run(&qc::Migrate {
            uri: ready.uri.clone(),
        })
        .await?;
        // Without post-copy armed, the policy's post-copy decision means: give up this
        // attempt (the caller restarts with post-copy if allowed).
        let mut policy = Policy::new(PolicyConfig {
            allow_postcopy: true,
            postcopy_after_first_pass: postcopy,
            ..Default::default()
        });
        let Watched {
            info: final_info,
            switchover,
            give_up,
        } = self
            .watch_migration(
                name,
                qmp,
                req,
                copy,
                postcopy,
                &claim_peer,
                &mut policy,
                ctx,
                (events, t),
            )
            .await?;
        policy.finish();
        let status = final_info.status();
        let completed = status == qc::MigrationStatus::Completed;
        if give_up && !completed {
            self.recover_source(name, qmp, copy).await;
            return Ok(Attempt::RetryWithPostcopy(policy.steps));
        }
        if !completed {
            let why = final_info
                .error_desc
                .clone()
                .or_else(|| {
                    policy
                        .steps
                        .iter()
                        .rev()
                        .find(|s| s.starts_with("cancel"))
                        .cloned()
                })
                .unwrap_or_else(|| status.to_string());
            self.recover_source(name, qmp, copy).await;
            return Err(AgentError::failed(
                Failure::Migration,
                format!(
                    "migration {status}: {why}; {name} keeps running on {}",
                    self.host_name()
                ),
            ));
        }
        // The VM runs on the destination now: a report QEMU left incomplete is
        // logged, never a reason to fail what happened.
        let (Some(total_ms), Some(downtime_ms), Some(ram)) = (
            final_info.total_time,
            final_info.downtime,
            final_info.ram.clone(),
        ) else {
            tracing::warn!(vm = name, info = ?final_info, "QEMU's report of a completed migration lacks figures");
            return Ok(Attempt::Done(MigrationReport {
                switchover_ms: u64::try_from(switchover.as_millis()).unwrap_or(u64::MAX),
                disk_transferred_bytes: disk_bytes,
                postcopy: policy.phase == policy::Phase::PostCopy,
                policy_steps: policy.steps,
                ..Default::default()
            }));
        };
        Ok(Attempt::Done(MigrationReport {
            migration_ms: total_ms,
            downtime_ms,
            switchover_ms: u64::try_from(switchover.as_millis()).unwrap_or(u64::MAX),
            ram_transferred_bytes: ram.transferred,
            ram_total_bytes: ram.total,
            passes: ram.dirty_sync_count,
            max_dirty_pages_rate: policy.max_dirty_pages_rate,
            disk_transferred_bytes: disk_bytes,
            postcopy: policy.phase == policy::Phase::PostCopy,
            policy_steps: policy.steps,
            ..Default::default()
        }))
    }

    /// The guest is paused for the last pages and the device state: complete the disk
    /// mirrors, have the destination claim the MACs, continue. The claim runs alongside
    /// the device state transfer: frames that reach the source before it lands are lost
    /// either way, so waiting for it would only lengthen the pause.
    async fn switchover(
        &self,
        name: &str,
        qmp: &Qmp,
        req: &MigrateRequest,
        peer: &ferry_host::Peer,
        copy: &[usize],
        ctx: &TaskCtx,
    ) -> Result<()> {
        self.complete_mirrors(qmp, copy).await?;
        let peer = peer.clone();
        let (path, ctx2, to) = (
            format!("/api/v1/migrations/incoming/{name}/claim"),
            ctx.clone(),
            req.to.clone(),
        );
        tokio::spawn(async move {
            if let Err(e) = peer.post::<serde_json::Value>(&path, &json!({})).await {
                ctx2.log(format!("{to} could not claim the MACs early ({e})"));
            }
        });
        qmp.run(&qc::MigrateContinue {
            state: qc::MigrationStatus::PreSwitchover,
        })
        .await?;
        Ok(())
    }

    /// Sends a RARP for each NIC of `spec` out of its bridge on this host.
    pub(crate) fn announce_vm(&self, spec: &ferry_types::VmSpec) {
        for n in &spec.nics {
            let Some(mac) = n
                .mac
                .as_deref()
                .and_then(|m| ferry_types::parse_mac(m).ok())
            else {
                continue;
            };
            if let Err(e) = self.os().announce_mac(&n.bridge, mac) {
                tracing::warn!(vm = %spec.name, bridge = %n.bridge, error = %e, "cannot announce MAC");
            }
        }
    }

    /// After a failed or cancelled migration: the guest runs here again, mirrors gone,
    /// the LAN told where it is (the destination may have claimed its MACs).
    async fn recover_source(&self, name: &str, qmp: &Qmp, copy: &[usize]) {
        self.cancel_mirrors(qmp, copy).await;
        // TLS off again (a later suspend migrates to a file), and the host's key out of
        // this QEMU's memory.
        tls::drop_creds(qmp).await;
        if let Ok((r, _)) = self.record(name).await {
            self.announce_vm(&r.spec);
        }
        let was_running = self
            .record(name)
            .await
            .map(|(r, _)| r.last_state == VmState::Running)
            .unwrap_or(true);
        if let Ok(st) = qmp.run(&qc::QueryStatus).await {
            if st.status != qc::RunState::Running && was_running {
                if let Err(e) = qmp.run(&qc::Cont).await {
                    tracing::warn!(vm = name, error = %e, "cannot resume after a failed migration");
                }
            }
        }
    }

    /// The destination owns the VM now: end the QEMU here (paused since switchover),
    /// forget the VM, remove copied-away local volumes.
    async fn finish_outgoing(
        &self,
        name: &str,
        slot: &std::sync::Arc<crate::runtime::Slot>,
        copied: &[usize],
    ) -> Result<()> {
        let (rec, _) = self.record(name).await?;
        let _intent = crate::exit::IntentGuard::set(slot, crate::exit::ExitIntent::MigratedAway);
        let (qmp, pid) = slot.with(|rt| (rt.qmp.clone(), rt.pid));
        if let Some(q) = qmp {
            let _ = q.run(&qc::Quit).await;
        }
        if !self.wait_gone(slot, Duration::from_secs(10)).await {
            if let Some(pid) = pid {
                let _ = self.os().kill_qemu(pid, &self.run_paths(rec.id)).await;
            }
            self.wait_gone(slot, Duration::from_secs(5)).await;
        }
        self.hand_off(name, &rec, copied).await
    }

    /// The VM lives on another host now: forget it here and remove the volumes of the
    /// disks that were copied over (`copied`: disk indexes).
    pub(crate) async fn hand_off(
        &self,
        name: &str,
        rec: &crate::records::VmRecord,
        copied: &[usize],
    ) -> Result<()> {
        self.forget_vm(name, rec).await?;
        let vols: Vec<(String, String)> = copied
            .iter()
            .filter_map(|&i| rec.spec.disks.get(i))
            .filter_map(|d| d.volume.clone().map(|v| (d.pool.clone(), v)))
            .collect();
        self.remove_volumes(&vols).await;
        Ok(())
    }
}

/// Replaces the addresses in the destination's answer by ones built here from the
/// member's listed address: only the ports are the peer's.
fn local_addresses(address: &str, ready: &mut IncomingReady) -> Result<()> {
    let uri = target::migration_uri(address, target::answered_port(&ready.uri, true)?)?;
    let nbd = match &ready.nbd {
        Some(n) => {
            let (h, p) = target::endpoint(address, target::answered_port(n, false)?)?;
            Some(format!("{h}:{p}"))
        }
        None => None,
    };
    (ready.uri, ready.nbd) = (uri, nbd);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both ways show, oldest first, and a phase change keeps when it began.
    #[tokio::test]
    async fn migrations_in_flight_show_both_ways() {
        let dir = tempfile::tempdir().unwrap();
        let os = ferry_host::fake::FakeOs::new(&["br0"]);
        let m = Migrations::open(ferry_host::fake::open_host(dir.path(), os).await.unwrap()).await;
        assert!(m.in_flight().is_empty());
        m.set_outgoing("a", Some(("h2", SETUP)));
        let began = m.in_flight()[0].since_ms;
        m.inner.arriving.lock().unwrap().insert(
            "b".into(),
            Arriving {
                id: 7,
                spec: serde_json::from_value(json!({"name": "b", "memory_mib": 64})).unwrap(),
                phase: MigrationPhase::Switchover,
                from: "h3".into(),
                since_ms: began + 1,
            },
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
        m.set_outgoing("a", Some(("h2", Step::Qemu(qc::MigrationStatus::Active))));
        let v = m.in_flight();
        let got: Vec<_> = v
            .iter()
            .map(|x| (x.vm.as_str(), x.direction, x.peer.as_str(), x.phase))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    "a",
                    MigrationDirection::Outgoing,
                    "h2",
                    MigrationPhase::Transferring
                ),
                (
                    "b",
                    MigrationDirection::Incoming,
                    "h3",
                    MigrationPhase::Switchover
                ),
            ]
        );
        assert_eq!(v[0].since_ms, began);
        m.set_outgoing("a", None);
        assert_eq!(m.in_flight().len(), 1);
    }
}
