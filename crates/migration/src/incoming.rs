//! Live migration, the destination's side: a QEMU waiting with `-incoming` (taps on the
//! bridge before switchover, MAC announcements right after), optional NBD exports for
//! copied disks, and a watchdog: the VM becomes this host's when the source says so,
//! or by itself once QEMU completed the migration and the source stays silent; it is
//! dropped when the source gave up or vanished before completion.

use crate::error::{AgentError, Failure, Refusal, Result};
use crate::records::Transit;
use crate::records::{vm_key, VmRecord};
use crate::runtime::VmOp;
use crate::Migrations;
use ferry_qmp::commands as qc;
use ferry_store::StoreJson;
use ferry_types::{
    ByteSize, IncomingReady, IncomingRequest, MigrationInfo, MigrationPhase, VmState,
};
use std::time::{Duration, Instant};

/// How long the destination waits for an unreachable source before dropping its copy.
const SOURCE_SILENCE: Duration = Duration::from_secs(30);
/// How long it waits for the source's word after QEMU completed.
const FINISH_GRACE: Duration = Duration::from_secs(5);

impl Migrations {
    /// Prepares to receive `req.vm`: record (marked incoming), volumes for copied
    /// disks, QEMU listening. All or nothing.
    #[tracing::instrument(skip_all, fields(vm = %req.vm.spec.name, from = %req.source))]
    pub async fn prepare_incoming(&self, req: IncomingRequest) -> Result<IncomingReady> {
        let name = req.vm.spec.name.clone();
        self.may_receive(&req.vm.spec).await?;
        self.check_room(&req.vm.spec)?;
        let addr = self.own_address().await?;
        let op = self.lock_vm(&name).await;
        let slot = op.slot().clone();
        let id = match req.origin_id {
            Some(o) if !self.id_taken_here(o).await? => o,
            _ => self.allocate_id().await?,
        };
        let mut spec = req.vm.spec.clone();
        let made = self.make_copy_volumes(&req, id, &mut spec).await?;
        let origin = req.origin_id.filter(|&o| o != id);
        let rec = VmRecord {
            template: req.vm.template,
            current_snapshot: req.vm.current_snapshot.clone(),
            clone_of: req.vm.clone_of.clone(),
            transit: Some(Transit::From(req.source.clone())),
            origin_id: origin,
            ..VmRecord::new(id, spec)
        };
        if !self.store().create_json(&vm_key(&name), &rec).await? {
            self.remove_volumes(&made).await;
            return Err(AgentError::refused(
                Refusal::Exists,
                format!("A VM named {name} exists"),
            ));
        }
        // The claim happens while the guest is paused: it must not wait for the store.
        self.inner
            .arriving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                name.clone(),
                crate::Arriving {
                    id: rec.id,
                    spec: rec.spec.clone(),
                    phase: MigrationPhase::Setup,
                    from: req.source.clone(),
                    since_ms: ferry_host::events::now_ms(),
                },
            );
        let r = self.arm_incoming(&op, &req, &addr, &made).await;
        match r {
            Ok(ready) => {
                self.events().emit(
                    Some(&name),
                    "migration",
                    format!("waiting for {name} from {} on {}", req.source, ready.uri),
                );
                let agent = self.clone();
                let n = name.clone();
                let run = Some(slot.with(|rt| rt.generation));
                tokio::spawn(async move { agent.watch_incoming(n, run).await });
                Ok(ready)
            }
            Err(e) => {
                self.drop_incoming_held(&op).await;
                Err(e)
            }
        }
    }

    /// Refuses a VM bigger than the memory this host has available.
    fn check_room(&self, spec: &ferry_types::VmSpec) -> Result<()> {
        let need = spec.memory_mib << 20;
        let avail = crate::meminfo("MemAvailable:");
        if avail > 0 && need > avail {
            return Err(AgentError::refused(
                Refusal::NoRoom,
                format!(
                    "{} needs {} MiB; {} has {} MiB available",
                    spec.name,
                    need >> 20,
                    self.host_name(),
                    avail >> 20
                ),
            ));
        }
        Ok(())
    }

    /// The volumes the disks copied with `--with-storage` arrive in (on the target
    /// pool, under this host's id); `spec` is changed to name them. All or nothing.
    async fn make_copy_volumes(
        &self,
        req: &IncomingRequest,
        id: u32,
        spec: &mut ferry_types::VmSpec,
    ) -> Result<Vec<(String, String)>> {
        let mut made = vec![];
        let pool = req.target_pool.clone().unwrap_or_else(|| "local".into());
        let made_ok: Result<()> = async {
            for (k, &i) in req.copy_disks.iter().enumerate() {
                let size = *req
                    .copy_sizes
                    .get(k)
                    .ok_or_else(|| AgentError::invalid("copy_sizes", "one size per copied disk"))?;
                let d = spec
                    .disks
                    .get_mut(i)
                    .ok_or_else(|| AgentError::invalid("copy_disks", format!("no disk {i}")))?;
                let vol = format!("vm-{id}-disk-{i}");
                self.dir_pool(&pool)
                    .await?
                    .create(&vol, ByteSize(size), d.format)
                    .await?;
                made.push((pool.clone(), vol.clone()));
                d.pool = pool.clone();
                d.volume = Some(vol);
            }
            Ok(())
        }
        .await;
        if let Err(e) = made_ok {
            self.remove_volumes(&made).await;
            return Err(e);
        }
        Ok(made)
    }

    /// Starts the waiting QEMU of an arriving VM (its snapshots recorded first) with
    /// its migration settings and TLS, and the NBD exports of copied disks.
    async fn arm_incoming(
        &self,
        op: &VmOp,
        req: &IncomingRequest,
        addr: &str,
        made: &[(String, String)],
    ) -> Result<IncomingReady> {
        let name = op.name();
        for s in &req.vm.snapshots {
            self.store()
                .put_json(&ferry_store::keys::host::snapshot(name, &s.name), s)
                .await?;
        }
        self.start_incoming(op).await?;
        let qmp = self.qmp(name)?;
        qmp.run(&qc::MigrateSetCapabilities {
            capabilities: vec![qc::CapabilityState {
                capability: qc::Capability::PostcopyRam,
                state: req.postcopy,
            }],
        })
        .await?;
        // Only the source host's certificate gets in (QEMU's TLS).
        self.qemu_tls_server(name, &qmp, &req.source).await?;
        // Announce the MACs at once and a few times more (the LAN's bridges learn
        // where the VM is from these), instead of QEMU's 50 ms first delay.
        qmp.run(&qc::MigrateSetParameters {
            announce_initial: Some(1),
            announce_max: Some(100),
            announce_rounds: Some(6),
            announce_step: Some(20),
            tls_creds: Some(crate::tls::SERVER_CREDS.into()),
            tls_authz: Some(crate::tls::AUTHZ.into()),
            ..Default::default()
        })
        .await?;
        qmp.run(&qc::MigrateIncoming {
            uri: format!("tcp:{addr}:0"),
        })
        .await?;
        let info = qmp.run(&qc::QueryMigrate).await?;
        let port = info
            .socket_address
            .as_ref()
            .and_then(|a| a.first())
            .and_then(|s| s.port.clone())
            .ok_or_else(|| {
                AgentError::failed(
                    Failure::Migration,
                    format!("QEMU did not say where it listens: {info:?}"),
                )
            })?;
        let mut ready = IncomingReady {
            uri: format!("tcp:{addr}:{port}"),
            nbd: None,
            exports: vec![],
            volumes: made.iter().map(|(_, v)| v.clone()).collect(),
        };
        if !req.copy_disks.is_empty() {
            ready.nbd = Some(self.start_nbd(&qmp, addr).await?);
            for &i in &req.copy_disks {
                let export = format!("disk{i}");
                // Not allow-inactive: the export activates the node, which the
                // mirror's writes need before switchover.
                qmp.run(&qc::NbdExportAdd {
                    id: format!("mig-{export}"),
                    node_name: export.clone(),
                    name: export.clone(),
                    writable: true,
                })
                .await?;
                ready.exports.push(export);
            }
        }
        Ok(ready)
    }

    /// Checks that this host may take VM `spec` (valid, not in maintenance, name free).
    pub(crate) async fn may_receive(&self, spec: &ferry_types::VmSpec) -> Result<()> {
        spec.validate()?;
        self.check_runnable(spec)?;
        if self.shutting_down() {
            return Err(AgentError::refused(
                Refusal::ShuttingDown,
                format!(
                    "Host {} is shutting its VMs down: it takes no VMs",
                    self.host_name()
                ),
            ));
        }
        if self.in_maintenance().await? {
            return Err(AgentError::refused(
                Refusal::Maintenance,
                format!(
                    "Host {} is in maintenance: it takes no VMs",
                    self.host_name()
                ),
            ));
        }
        if self.record(&spec.name).await.is_ok() {
            return Err(AgentError::refused(
                Refusal::Exists,
                format!(
                    "A VM named {} exists on {} already",
                    spec.name,
                    self.host_name()
                ),
            ));
        }
        Ok(())
    }

    /// Whether `id` names a VM or a run dir on this host.
    async fn id_taken_here(&self, id: u32) -> Result<bool> {
        Ok(self.records().await?.iter().any(|r| r.id == id) || self.run_paths(id).dir.exists())
    }

    async fn start_nbd(&self, qmp: &ferry_qmp::Qmp, addr: &str) -> Result<String> {
        let mut last = None;
        for _ in 0..20 {
            let port = 20000 + rand::random::<u16>() % 20000;
            match qmp
                .run(&qc::NbdServerStart {
                    addr: qc::SocketAddressLegacy::Inet {
                        host: addr.to_string(),
                        port: port.to_string(),
                    },
                    tls_creds: crate::tls::SERVER_CREDS.into(),
                    tls_authz: crate::tls::AUTHZ.into(),
                })
                .await
            {
                Ok(_) => return Ok(format!("{addr}:{port}")),
                Err(e) => last = Some(e),
            }
        }
        Err(last.map(AgentError::from).unwrap_or_else(|| {
            AgentError::failed(Failure::Migration, "no free port for the NBD server")
        }))
    }

    /// The source paused the guest for switchover: make the LAN send the VM's frames
    /// here (they wait in the taps until the guest runs) instead of to the paused source.
    pub async fn claim_incoming(&self, name: &str) -> Result<()> {
        let cached = self
            .inner
            .arriving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(name)
            .map(|a| {
                a.phase = MigrationPhase::Switchover;
                (a.id, a.spec.clone())
            });
        let (id, spec) = match cached {
            Some(c) => c,
            None => {
                let (rec, _) = self.record(name).await?;
                if Transit::from(&rec.transit).is_none() {
                    return Err(AgentError::refused(
                        Refusal::NotInTransit,
                        format!("{name} is not arriving here"),
                    ));
                }
                (rec.id, rec.spec)
            }
        };
        // This host's bridge may have learned the MAC on its uplink while the VM ran
        // elsewhere: it would drop the VM's frames coming in there. Point it at the tap.
        for (k, n) in spec.nics.iter().enumerate() {
            if let Some(mac) = n
                .mac
                .as_deref()
                .and_then(|m| ferry_types::parse_mac(m).ok())
            {
                let tap = ferry_net::tap_name(id, k);
                if let Err(e) = self.os().fdb_point(&tap, mac).await {
                    tracing::warn!(vm = name, %tap, error = %e, "cannot point the bridge at the tap");
                }
            }
        }
        self.announce_vm(&spec);
        Ok(())
    }

    /// The source's word: `success` makes the VM this host's (locks taken over), else
    /// the prepared copy goes. Returns the locks as "volume@host:generation".
    #[tracing::instrument(skip_all, fields(vm = %name, success))]
    pub async fn finish_incoming(&self, name: &str, success: bool) -> Result<Vec<String>> {
        let op = self.lock_vm(name).await;
        self.finish_incoming_held(&op, success).await
    }

    async fn finish_incoming_held(&self, op: &VmOp, success: bool) -> Result<Vec<String>> {
        let (name, slot) = (op.name(), op.slot());
        self.forget_claim(name);
        let (rec, _) = self.record(name).await?;
        let Some(source) = Transit::from(&rec.transit).map(String::from) else {
            if success {
                return Ok(vec![]); // finished already (a retry)
            }
            return Err(AgentError::refused(
                Refusal::NotInTransit,
                format!(
                    "VM {name} runs on {} (the migration finished)",
                    self.host_name()
                ),
            ));
        };
        if !success {
            self.drop_incoming_held(op).await;
            return Ok(vec![]);
        }
        let qmp = self.qmp(name)?;
        let t = Instant::now();
        loop {
            let st = qmp.run(&qc::QueryMigrate).await?.status();
            match st {
                qc::MigrationStatus::Completed => break,
                qc::MigrationStatus::Failed | qc::MigrationStatus::Cancelled => {
                    return Err(AgentError::failed(
                        Failure::Migration,
                        format!("the incoming migration of {name} {st}"),
                    ))
                }
                _ if t.elapsed() > Duration::from_secs(10) => {
                    return Err(AgentError::failed(
                        Failure::Migration,
                        format!("QEMU has not completed the incoming migration of {name} ({st})"),
                    ))
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        let locks = self.take_over_locks(&rec.spec, &source).await?;
        let _ = qmp.run(&qc::NbdServerStop).await;
        // The host's key leaves this QEMU's memory with its credentials.
        crate::tls::drop_creds(&qmp).await;
        let state = slot.state();
        let state = if state == VmState::Starting {
            VmState::Running
        } else {
            state
        };
        self.update_record(name, |r| {
            r.transit = None;
            r.last_state = state;
        })
        .await?;
        self.events().emit(
            Some(name),
            "migration",
            format!("{name} arrived from {source} and runs here"),
        );
        Ok(locks)
    }

    /// Removes a prepared VM that never became this host's: QEMU, record, volumes made
    /// for copied disks (disks on pools only this host sees).
    fn set_arriving_phase(&self, name: &str, phase: MigrationPhase) {
        if let Some(a) = self
            .inner
            .arriving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(name)
        {
            a.phase = phase;
        }
    }

    fn forget_claim(&self, name: &str) {
        self.inner
            .arriving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
    }

    /// Drops what was prepared for the VM arriving under `op` (its QEMU, record,
    /// copied volumes).
    pub(crate) async fn drop_incoming_held(&self, op: &VmOp) {
        let (name, slot) = (op.name(), op.slot());
        self.forget_claim(name);
        let Ok((rec, _)) = self.record(name).await else {
            return;
        };
        if Transit::from(&rec.transit).is_none() {
            return;
        }
        if slot.state().has_process() {
            if let Err(e) = self.stop_held(op).await {
                tracing::warn!(vm = name, error = %e, "cannot stop the incoming QEMU");
            }
        }
        let mut copies = vec![];
        for d in &rec.spec.disks {
            if let (Ok(None), Some(v)) = (self.pool_locks(&d.pool).await, &d.volume) {
                copies.push((d.pool.clone(), v.clone()));
            }
        }
        self.remove_volumes(&copies).await;
        if let Err(e) = self.forget_vm(name, &rec).await {
            tracing::warn!(vm = name, error = %e, "cannot remove the incoming VM's record");
        }
        self.events().emit(
            Some(name),
            "migration",
            format!(
                "dropped the incoming copy of {name} (the source {} keeps it)",
                Transit::from(&rec.transit).unwrap_or_default()
            ),
        );
    }

    /// Follows an incoming VM until it is this host's or dropped. `run` is the
    /// generation of the incoming QEMU this watcher is for (`None`: a cold move, no
    /// QEMU, the source uploads files). A watcher whose QEMU was replaced (the source
    /// dropped that copy and asked again, as when it restarts with post-copy armed)
    /// ends: it must never judge, or drop, the new one.
    #[tracing::instrument(skip_all, fields(vm = %name))]
    pub(crate) async fn watch_incoming(self, name: String, run: Option<u64>) {
        let cold = run.is_none();
        let mut completed_at: Option<Instant> = None;
        let mut silent_since: Option<Instant> = None;
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            // The store may be out of reach for a while (a partition): keep watching.
            let rec = match self.record(&name).await {
                Ok((rec, _)) => rec,
                Err(AgentError::NotFound(_)) => return,
                Err(_) => continue,
            };
            let Some(source) = Transit::from(&rec.transit).map(String::from) else {
                return;
            };
            let slot = self.slot(&name);
            if run.is_some_and(|g| slot.with(|rt| rt.generation) != g) {
                return;
            }
            let status = match self.qmp(&name) {
                _ if cold => None,
                Ok(q) => q.run(&qc::QueryMigrate).await.ok().map(|i| i.status()),
                Err(_) => {
                    let op = VmOp::lock(&name, &slot).await;
                    if run.is_none_or(|g| slot.with(|rt| rt.generation) == g) {
                        self.drop_incoming_held(&op).await;
                    }
                    return;
                }
            };
            if status == Some(qc::MigrationStatus::Completed) {
                self.set_arriving_phase(&name, MigrationPhase::Completed);
                let at = *completed_at.get_or_insert_with(Instant::now);
                if at.elapsed() >= FINISH_GRACE {
                    tracing::warn!(vm = %name, %source, "source silent after completion; taking over");
                    if let Err(e) = self.finish_incoming(&name, true).await {
                        tracing::error!(vm = %name, error = %e, "cannot take over the migrated VM");
                    }
                    return;
                }
                continue;
            }
            let drop_it = match self
                .peer_with_timeout(&source, Duration::from_secs(3))
                .await
            {
                Ok(p) => match p
                    .get::<MigrationInfo>(&format!("/api/v1/migrations/{name}"))
                    .await
                {
                    Ok(i) => {
                        silent_since = None;
                        i.to != self.host_name() || i.phase().is_given_up()
                    }
                    Err(AgentError::NotFound(_)) => true,
                    Err(_) => {
                        let since = *silent_since.get_or_insert_with(Instant::now);
                        since.elapsed() >= SOURCE_SILENCE
                            && !status.is_some_and(|s| {
                                MigrationPhase::from_qemu(s.as_str()) == MigrationPhase::PostCopy
                            })
                    }
                },
                Err(AgentError::NotFound(_)) => true,
                Err(_) => continue, // the host list is in the store: not reachable now
            };
            if drop_it {
                let op = VmOp::lock(&name, &slot).await;
                if run.is_some_and(|g| slot.with(|rt| rt.generation) != g) {
                    return;
                }
                // Checked again under the lock: the source may have finished meanwhile.
                match self.record(&name).await {
                    Ok((r, _)) if Transit::from(&r.transit).is_some() => {
                        self.drop_incoming_held(&op).await;
                    }
                    Ok(_) | Err(AgentError::NotFound(_)) => {}
                    Err(_) => continue,
                }
                return;
            }
        }
    }
}
