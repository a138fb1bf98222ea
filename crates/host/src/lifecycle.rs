//! Start, shutdown, stop, reboot, pause, resume; the supervisor of a running QEMU; and
//! re-adoption of running QEMUs when the daemon starts.

use crate::console::{tail, Console};
use crate::error::{AgentError, Failure, Refusal, Result};
use crate::exit::{classify_exit, ExitFacts, ExitIntent, IntentGuard};
use crate::gate::{start_gate, StartFacts, StartOrigin};
use crate::pools::backing_files;
use crate::records::VmRecord;
use crate::runtime::{Slot, VmOp};
use crate::Host;
use ferry_qemu::{build_argv, BackingFile, LaunchPlan, ResolvedCdrom, ResolvedDisk, RunPaths};
use ferry_qmp::commands as qc;
use ferry_qmp::Qmp;
use ferry_types::{DiskFormat, Firmware, VmAction, VmState};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

const QMP_CONNECT: Duration = Duration::from_secs(10);
const STOP_WAIT: Duration = Duration::from_secs(10);
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(60);

/// QEMU's throttle settings for disk `d` on device `id`: its IOPS and MiB/s limits,
/// bursts for `burst_s` seconds.
pub fn io_throttle(id: &str, d: &ferry_types::DiskSpec) -> ferry_qmp::commands::BlockSetIoThrottle {
    let mib = |v: u64| v.saturating_mul(1 << 20);
    let burst = d.burst_s.unwrap_or(1);
    // The device holding the disk's block backend: a virtio-blk-pci's is its inner
    // virtio device.
    let qom = match d.bus {
        ferry_types::DiskBus::Virtio => format!("/machine/peripheral/{id}/virtio-backend"),
        _ => format!("/machine/peripheral/{id}"),
    };
    ferry_qmp::commands::BlockSetIoThrottle {
        id: qom,
        bps: d.mbps.map_or(0, mib),
        iops: d.iops.unwrap_or(0),
        bps_max: d.mbps_max.map(mib),
        iops_max: d.iops_max,
        bps_max_length: d.mbps_max.map(|_| burst),
        iops_max_length: d.iops_max.map(|_| burst),
        ..Default::default()
    }
}

/// UEFI code and vars templates for guests of `arch`, if installed (OVMF for x86_64,
/// AAVMF — Debian's qemu-efi-aarch64 — for aarch64).
pub fn ovmf_paths(arch: ferry_types::Arch) -> Option<(PathBuf, PathBuf)> {
    if arch == ferry_types::Arch::Aarch64 {
        let (c, v) = (
            PathBuf::from("/usr/share/AAVMF/AAVMF_CODE.fd"),
            PathBuf::from("/usr/share/AAVMF/AAVMF_VARS.fd"),
        );
        return (c.is_file() && v.is_file()).then_some((c, v));
    }
    if arch != ferry_types::Arch::X86_64 {
        return None;
    }
    [
        (
            "/usr/share/OVMF/OVMF_CODE_4M.fd",
            "/usr/share/OVMF/OVMF_VARS_4M.fd",
        ),
        (
            "/usr/share/OVMF/OVMF_CODE.fd",
            "/usr/share/OVMF/OVMF_VARS.fd",
        ),
    ]
    .into_iter()
    .map(|(c, v)| (PathBuf::from(c), PathBuf::from(v)))
    .find(|(c, v)| c.is_file() && v.is_file())
}

/// OVMF's Secure Boot build and its variables with Microsoft's keys enrolled (Debian's
/// ovmf: `OVMF_CODE_4M.secboot.fd`, `OVMF_VARS_4M.ms.fd`), if installed.
pub fn secure_boot_paths() -> Option<(PathBuf, PathBuf)> {
    let (c, v) = (
        PathBuf::from("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd"),
        PathBuf::from("/usr/share/OVMF/OVMF_VARS_4M.ms.fd"),
    );
    (c.is_file() && v.is_file()).then_some((c, v))
}

/// The UEFI code and variables template a VM boots with: with Secure Boot, OVMF's
/// Secure Boot build with Microsoft's keys; else the plain one of its architecture.
pub fn firmware_paths(spec: &ferry_types::VmSpec) -> Option<(PathBuf, PathBuf)> {
    if spec.secure_boot {
        secure_boot_paths()
    } else {
        ovmf_paths(spec.arch())
    }
}

/// Which template a VM's UEFI variables were made from (`efivars.kind` beside them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VarsKind {
    Plain,
    /// With Microsoft's keys (Secure Boot).
    SecureBoot,
}

impl VarsKind {
    pub fn of(spec: &ferry_types::VmSpec) -> VarsKind {
        if spec.secure_boot {
            VarsKind::SecureBoot
        } else {
            VarsKind::Plain
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            VarsKind::Plain => "plain",
            VarsKind::SecureBoot => "secure-boot",
        }
    }

    /// A kind as a peer names it.
    pub fn parse(s: &str) -> Result<VarsKind> {
        match s {
            "plain" => Ok(VarsKind::Plain),
            "secure-boot" => Ok(VarsKind::SecureBoot),
            other => Err(AgentError::invalid(
                "kind",
                format!("{other:?}: the variables' kind is plain or secure-boot"),
            )),
        }
    }
}

impl Host {
    pub fn set_state(&self, name: &str, slot: &Slot, state: VmState) {
        let old = slot.with(|rt| std::mem::replace(&mut rt.state, state));
        if old != state {
            self.inner
                .events
                .emit(Some(name), "state", format!("{old} -> {state}"));
        }
    }

    /// The template VM `id`'s UEFI variables came from (none recorded: plain).
    pub fn vars_kind_of(&self, id: u32) -> VarsKind {
        std::fs::read_to_string(self.vm_state_dir(id).join("efivars.kind"))
            .ok()
            .and_then(|k| VarsKind::parse(k.trim()).ok())
            .unwrap_or(VarsKind::Plain)
    }

    /// Records the template VM `id`'s UEFI variables came from (a cold move's).
    pub fn set_vars_kind(&self, id: u32, kind: VarsKind) -> Result<()> {
        let f = self.vm_state_dir(id).join("efivars.kind");
        std::fs::write(&f, kind.as_str()).map_err(|source| AgentError::Io {
            what: format!("Write {}", f.display()),
            source,
        })
    }

    /// OVMF's code and this VM's own copy of the UEFI variables (made from the
    /// template the first time), for a UEFI VM.
    fn uefi_files(&self, rec: &VmRecord) -> Result<Option<(PathBuf, PathBuf)>> {
        if rec.spec.firmware != Firmware::Uefi {
            return Ok(None);
        }
        let (code, vars_tpl) = firmware_paths(&rec.spec).ok_or_else(|| {
            AgentError::refused(
                Refusal::HostLacks,
                if rec.spec.secure_boot {
                    "Secure Boot needs OVMF's Secure Boot build (Debian package ovmf: OVMF_CODE_4M.secboot.fd, OVMF_VARS_4M.ms.fd)"
                } else {
                    "UEFI needs OVMF (Debian package ovmf)"
                },
            )
        })?;
        let dir = self.vm_state_dir(rec.id);
        let vars = dir.join("efivars.fd");
        let kind_file = dir.join("efivars.kind");
        let kind = VarsKind::of(&rec.spec);
        // Secure Boot switched on or off: variables from the other template (without
        // Microsoft's keys, or with them) are made anew.
        if vars.exists() && self.vars_kind_of(rec.id) != kind {
            let _ = std::fs::remove_file(&vars);
            self.inner.events.emit(
                Some(&rec.spec.name),
                "firmware",
                format!("Secure Boot {}: new UEFI variables ({} template); boot entries the guest made are gone", if rec.spec.secure_boot { "on" } else { "off" }, kind.as_str()),
            );
        }
        if !vars.exists() {
            std::fs::create_dir_all(&dir)
                .and_then(|_| std::fs::copy(&vars_tpl, &vars).map(|_| ()))
                .and_then(|_| std::fs::write(&kind_file, kind.as_str()))
                .map_err(|source| AgentError::Io {
                    what: format!("Create UEFI variables {}", vars.display()),
                    source,
                })?;
        }
        Ok(Some((code, vars)))
    }

    /// Resolves volumes, ISOs, taps and firmware into a launch plan.
    async fn plan(&self, rec: &VmRecord) -> Result<LaunchPlan> {
        let spec = &rec.spec;
        self.check_runnable(spec)?;
        let mut disks = vec![];
        let run = self.run_paths(rec.id);
        for (i, d) in spec.disks.iter().enumerate() {
            let vol = d
                .volume
                .as_deref()
                .ok_or_else(|| AgentError::invalid("disks", "disk without volume"))?;
            if self.replicated_pool(&d.pool).await?.is_some() {
                if d.nonpersistent {
                    return Err(AgentError::invalid(
                        "disks",
                        format!(
                            "disk {i}: a non-persistent disk cannot be on replicated pool {}",
                            d.pool
                        ),
                    ));
                }
                let svc = self.replication()?;
                let key = format!("{}/{vol}", d.pool);
                if svc.get(&key).is_none() {
                    return Err(AgentError::refused(
                        Refusal::Replica,
                        format!(
                            "{} keeps no copy of {key}: run the VM on a host of pool {}",
                            self.host_name(),
                            d.pool
                        ),
                    ));
                }
                disks.push(ResolvedDisk {
                    spec: d.clone(),
                    path: svc.socket_path(&key),
                    format: DiskFormat::Raw,
                    backing: vec![],
                    nbd_export: Some(key),
                    restore_from: None,
                });
                continue;
            }
            let dp = self.dir_pool(&d.pool).await?;
            // The recorded format and chain, never what the file's header says.
            let mut format = dp.meta(vol)?.format;
            let mut backing = backing_files(dp.chain(vol)?);
            let mut path = dp.volume_path(vol)?;
            if d.nonpersistent {
                // Writes go to a fresh overlay in the run dir; the volume is only read.
                let overlay = run.dir.join(format!("overlay-disk{i}.qcow2"));
                std::fs::create_dir_all(&run.dir).map_err(|source| AgentError::Io {
                    what: format!("Create {}", run.dir.display()),
                    source,
                })?;
                let _ = std::fs::remove_file(&overlay);
                ferry_storage::create_overlay(
                    &*self.inner.os.images(),
                    &overlay,
                    &path,
                    format.as_str(),
                )
                .await?;
                backing.insert(
                    0,
                    BackingFile {
                        path: std::mem::replace(&mut path, overlay),
                        format,
                    },
                );
                format = DiskFormat::Qcow2;
            }
            // A live-restore: what the volume lacks comes from the backup.
            let restore_from = rec.live_restore.as_ref().map(|_| ferry_qemu::NbdSource {
                socket: self.restore_socket(rec.id),
                export: format!("disk{i}"),
            });
            if restore_from.is_some() && (format != DiskFormat::Qcow2 || !backing.is_empty()) {
                return Err(AgentError::failed(
                    Failure::Corrupt,
                    format!(
                        "disk {i} of live-restoring VM {} is not a plain qcow2 volume",
                        spec.name
                    ),
                ));
            }
            disks.push(ResolvedDisk {
                spec: d.clone(),
                path,
                format,
                backing,
                nbd_export: None,
                restore_from,
            });
        }
        let mut cdroms = vec![];
        for c in &spec.cdroms {
            let iso = match (&c.pool, &c.volume) {
                (Some(p), Some(v)) => {
                    let dp = self.dir_pool(p).await?;
                    dp.info(v).await?;
                    Some(dp.volume_path(v)?)
                }
                _ => None,
            };
            cdroms.push(ResolvedCdrom { bus: c.bus, iso });
        }
        for n in &spec.nics {
            if !self.inner.os.bridge_exists(&n.bridge) {
                return Err(AgentError::refused(
                    Refusal::HostLacks,
                    format!("Bridge {} does not exist on this host", n.bridge),
                ));
            }
        }
        let ovmf = self.uefi_files(rec)?;
        let run = self.run_paths(rec.id);
        let tpm = if spec.tpm {
            Some(self.prepare_tpm(spec, rec.id)?)
        } else {
            None
        };
        // cloud-init's seed, made again at every start (and on a migration's
        // destination: the same spec gives the same disk).
        let cloud_init = match ferry_cloudinit::render(spec) {
            Some(seed) => {
                std::fs::create_dir_all(&run.dir).map_err(|source| AgentError::Io {
                    what: format!("Create {}", run.dir.display()),
                    source,
                })?;
                ferry_cloudinit::write_image(&seed, &run.cloud_init)
                    .map_err(|e| AgentError::failed(Failure::Internal, e.to_string()))?;
                true
            }
            None => {
                let _ = std::fs::remove_file(&run.cloud_init);
                false
            }
        };
        Ok(LaunchPlan {
            spec: spec.clone(),
            accel: self.accel_for(spec.arch()),
            run,
            disks,
            cdroms,
            taps: (0..spec.nics.len())
                .map(|i| ferry_net::tap_name(rec.id, i))
                .collect(),
            ovmf,
            tpm,
            paused: false,
            incoming: false,
            nic_fds: true,
            cloud_init,
            isolated: false,
        })
    }

    pub async fn remove_taps(&self, id: u32, nics: usize) {
        for i in 0..nics {
            let t = ferry_net::tap_name(id, i);
            if let Err(e) = self.inner.os.delete_tap(&t).await {
                tracing::warn!(tap = %t, error = %e, "cannot delete tap");
            }
        }
    }

    #[tracing::instrument(skip_all, fields(vm = %name))]
    pub async fn start_vm(&self, name: &str) -> Result<()> {
        let op = self.lock_vm(name).await;
        self.start_held(&op, StartOrigin::User).await
    }

    /// Starts the VM whose operation lock `op` holds.
    pub async fn start_held(&self, op: &VmOp, origin: StartOrigin) -> Result<()> {
        self.start_with(op, false, origin).await
    }

    /// Starts QEMU once [`start_gate`] lets it; `paused` leaves the vCPUs stopped (to
    /// load a snapshot first). A suspended VM resumes from its state file. The VM's
    /// shared volumes are locked first (refused if another host holds them).
    pub async fn start_with(&self, op: &VmOp, paused: bool, origin: StartOrigin) -> Result<()> {
        let (name, slot) = (op.name(), op.slot());
        let (rec, _) = self.record(name).await?;
        let facts = StartFacts {
            origin,
            state: slot.state(),
            has_pid: slot.with(|rt| rt.pid.is_some()),
            template: rec.template,
            ha_enabled: rec.spec.ha.enabled(),
            last_state: rec.last_state,
            holds_lease: self.holds_lease(),
            maintenance: self.in_maintenance().await?,
            shutting_down: self.shutting_down(),
        };
        start_gate(&facts).map_err(|r| r.into_error(name, self.host_name()))?;
        let mut plan = self.plan(&rec).await?;
        plan.paused = paused;
        let resume_from = if slot.state() == VmState::Suspended {
            rec.suspend_file.clone()
        } else {
            None
        };
        plan.incoming = resume_from.is_some();
        let generations = self
            .lock_disks(name, &rec.spec, rec.ha_from.as_deref())
            .await?;
        self.save_lock_generations(name, generations).await?;
        let r = self
            .run_plan(name, slot, &rec, &plan, resume_from.as_deref())
            .await;
        if r.is_err() && slot.state() != VmState::Suspended {
            self.unlock_disks(&rec.spec).await;
        }
        r
    }

    /// Starts QEMU waiting for a live migration (`-incoming defer`); the source holds
    /// the disk locks until the migration finishes.
    pub async fn start_incoming(&self, op: &VmOp) -> Result<()> {
        let (name, slot) = (op.name(), op.slot());
        let (rec, _) = self.record(name).await?;
        // the TPM's state comes in the migration stream: swtpm starts with none
        if rec.spec.tpm {
            self.clear_tpm(rec.id)?;
        }
        let mut plan = self.plan(&rec).await?;
        plan.incoming = true;
        self.run_plan(name, slot, &rec, &plan, None).await
    }

    /// Launches `plan`; on failure everything it made is removed and the VM is back
    /// where it was (stopped, or suspended with its state file).
    async fn run_plan(
        &self,
        name: &str,
        slot: &Arc<Slot>,
        rec: &VmRecord,
        plan: &LaunchPlan,
        resume_from: Option<&str>,
    ) -> Result<()> {
        let before = slot.state();
        self.set_state(name, slot, VmState::Starting);
        let launched = match self.launch(name, slot, rec, plan).await {
            Ok(()) => match resume_from {
                Some(f) => self.load_suspended(name, slot, f).await,
                None => Ok(()),
            },
            Err(e) => Err(e),
        };
        match launched {
            Ok(()) => Ok(()),
            Err(e) => {
                let pid = slot.with(|rt| {
                    rt.generation += 1; // the supervisor of this failed run must not act
                    rt.intent = ExitIntent::None;
                    rt.pid.take()
                });
                if let Some(pid) = pid {
                    let _ = self.inner.os.kill_qemu(pid, &plan.run).await;
                }
                if plan.tpm.is_some() {
                    self.end_swtpm(rec.id, &plan.run);
                }
                self.remove_taps(rec.id, rec.spec.nics.len()).await;
                self.remove_overlays(rec.id);
                let msg = format!("start failed: {}", crate::error_chain(&e).join(": "));
                slot.with(|rt| {
                    rt.qmp = None;
                    rt.console = None;
                    rt.last_exit = Some(msg.clone());
                });
                // A suspended VM whose resume failed keeps its state file and stays suspended.
                let back = if before == VmState::Suspended {
                    before
                } else {
                    VmState::Stopped
                };
                self.set_state(name, slot, back);
                self.save_state(name, back, Some(msg)).await;
                Err(e)
            }
        }
    }

    async fn launch(
        &self,
        name: &str,
        slot: &Arc<Slot>,
        rec: &VmRecord,
        plan: &LaunchPlan,
    ) -> Result<()> {
        let who = self.qemu_identity(rec.id)?;
        let owner = who.as_ref().map(|w| (w.uid, w.gid));
        for (k, n) in rec.spec.nics.iter().enumerate() {
            if let Some((_, why)) = self.nic_misfit(n) {
                return Err(AgentError::refused(
                    Refusal::HostLacks,
                    format!("net{k}: {why}"),
                ));
            }
        }
        // QEMU gets its taps (and vhost-net) open: it cannot open them itself.
        let mut fds = vec![];
        for (k, (n, tap)) in rec.spec.nics.iter().zip(&plan.taps).enumerate() {
            let mac = n
                .mac
                .as_deref()
                .ok_or_else(|| AgentError::invalid("nics", format!("{tap}: NIC without a MAC")))?;
            self.inner.os.create_tap(tap, mac, owner).await?;
            self.inner.os.attach_up(tap, &n.bridge, n.vlan).await?;
            fds.push((ferry_qemu::nic_fd(k), self.inner.os.open_tap(tap)?));
            if plan.accel == ferry_qemu::Accel::Kvm {
                let vhost = self.inner.os.open_vhost().ok_or_else(|| {
                    AgentError::refused(
                        Refusal::HostLacks,
                        "/dev/vhost-net is missing (modprobe vhost_net)",
                    )
                })?;
                fds.push((ferry_qemu::nic_fd(k) + 1, vhost));
            }
        }

        let _ = std::fs::remove_file(&plan.run.serial_log);
        // HA VMs are the ones self-fencing and the watchdog kill.
        let marker = plan.run.dir.join(crate::os::HA_MARKER);
        if rec.spec.ha.enabled() {
            std::fs::create_dir_all(&plan.run.dir)
                .and_then(|_| std::fs::write(&marker, b""))
                .map_err(|source| AgentError::Io {
                    what: format!("Write {}", marker.display()),
                    source,
                })?;
        } else {
            let _ = std::fs::remove_file(&marker);
        }
        if let Some(w) = &who {
            self.confine_plan(plan, w).await?;
        }
        // A live-restore's backup is served before QEMU opens it.
        self.serve_restore(rec).await?;
        // Disk limits and pulled cables are set over QMP: the vCPUs wait for them.
        let setup =
            rec.spec.disks.iter().any(|d| d.limited()) || rec.spec.nics.iter().any(|n| n.link_down);
        let hold = setup && !plan.paused && !plan.incoming;
        let argv = if hold {
            build_argv(&LaunchPlan {
                paused: true,
                ..plan.clone()
            })
        } else {
            build_argv(plan)
        };
        tracing::debug!(vm = name, ?argv, "starting QEMU");
        // Its scope or pool cgroup before it becomes QEMU (KVM's threads stay where
        // they were made).
        let place = self.placement(rec).await?;
        // swtpm, started by the launcher where QEMU goes, as QEMU's user
        let companion = plan
            .tpm
            .as_deref()
            .map(|dir| ferry_qemu::tpm_companion(crate::tpm::SWTPM, dir, &plan.run))
            .unwrap_or_default();
        let pid = self
            .inner
            .os
            .spawn_qemu(
                &self.qemu_binary_for(rec.spec.arch()),
                &argv,
                &plan.run,
                who.as_ref(),
                ferry_qemu::Launcher {
                    fds: &fds,
                    before_exec: place.as_ref().map(|f| f as ferry_qemu::BeforeExec<'_>),
                    companion: &companion,
                },
            )
            .await?;
        drop(fds);
        let connected = async {
            let qmp = self
                .inner
                .os
                .connect_qmp(&plan.run, QMP_CONNECT, pid)
                .await?;
            let console =
                Console::attach(&plan.run.serial, &[], &|s| self.inner.os.served_by(s, pid))
                    .await
                    .map_err(|source| AgentError::Io {
                        what: "Connect to the serial console".into(),
                        source,
                    })?;
            // Disks' I/O limits and NICs whose cable is pulled, before the guest runs
            for (i, d) in rec.spec.disks.iter().enumerate() {
                if d.limited() {
                    qmp.run(&io_throttle(&format!("disk{i}"), d)).await?;
                }
            }
            for (k, n) in rec.spec.nics.iter().enumerate() {
                if n.link_down {
                    qmp.run(&ferry_qmp::commands::SetLink {
                        name: format!("net{k}"),
                        up: false,
                    })
                    .await?;
                }
            }
            if hold {
                qmp.run(&ferry_qmp::commands::Cont).await?;
            }
            Ok::<_, AgentError>((qmp, console))
        }
        .await;
        let (qmp, console) = match connected {
            Ok(c) => c,
            Err(e) => {
                let _ = self.inner.os.kill_qemu(pid, &plan.run).await;
                return Err(e);
            }
        };
        self.attach_runtime(name, slot, pid, qmp, console);
        let state = if plan.paused || plan.incoming {
            VmState::Paused
        } else {
            VmState::Running
        };
        self.set_state(name, slot, state);
        slot.with(|rt| rt.last_exit = None);
        self.save_state(name, state, None).await;
        if rec.live_restore.is_some() {
            self.watch_live_restore(name);
        }
        Ok(())
    }

    /// Records a live QEMU in the slot and starts its supervisor.
    fn attach_runtime(&self, name: &str, slot: &Arc<Slot>, pid: i32, qmp: Qmp, console: Console) {
        let events = qmp.events();
        let generation = slot.with(|rt| {
            rt.pid = Some(pid);
            rt.qmp = Some(qmp.clone());
            rt.console = Some(console);
            rt.accel = Some(self.inner.accel);
            rt.intent = ExitIntent::None;
            rt.facts = ExitFacts::default();
            rt.generation += 1;
            rt.generation
        });
        let agent = self.clone();
        let name = name.to_string();
        let slot = slot.clone();
        tokio::spawn(async move { agent.supervise(name, slot, generation, qmp, events).await });
    }

    /// Follows one QEMU until it exits: QMP events to states and events, then cleanup.
    #[tracing::instrument(skip_all, fields(vm = %name, generation))]
    async fn supervise(
        self,
        name: String,
        slot: Arc<Slot>,
        generation: u64,
        mut qmp: Qmp,
        mut events: tokio::sync::broadcast::Receiver<ferry_qmp::QmpEvent>,
    ) {
        let current = |slot: &Slot| slot.with(|rt| rt.generation) == generation;
        loop {
            tokio::select! {
                // Events first: what QEMU said before it closed the socket (SHUTDOWN from
                // the guest, GUEST_PANICKED) decides how its end is read.
                biased;
                ev = events.recv() => {
                    let Ok(ev) = ev else { continue };
                    if !current(&slot) { return; }
                    match ev.name.as_str() {
                        "STOP" if slot.state() == VmState::Running => self.set_state(&name, &slot, VmState::Paused),
                        "RESUME" if slot.state() == VmState::Paused => self.set_state(&name, &slot, VmState::Running),
                        "SHUTDOWN" if ev.data.get("guest").and_then(|g| g.as_bool()) == Some(true) => {
                            slot.with(|rt| rt.facts.guest_shutdown = true);
                        }
                        "GUEST_PANICKED" => {
                            slot.with(|rt| {
                                rt.facts.panicked = true;
                                rt.last_exit = Some("guest panicked".into());
                            });
                            // A panicked HA guest is ended so it counts as a crash and HA
                            // restarts it; others stay paused for a look.
                            if self.record(&name).await.is_ok_and(|(r, _)| r.spec.ha.enabled()) {
                                let _ = qmp.run(&qc::Quit).await;
                            }
                        }
                        _ => {}
                    }
                    self.inner.events.emit(Some(&name), "qmp", ev.name.clone());
                }
                _ = qmp.closed() => {
                    if !current(&slot) { return; }
                    let (pid, run) = match self.record(&name).await {
                        Ok((r, _)) => (slot.with(|rt| rt.pid), self.run_paths(r.id)),
                        Err(_) => (slot.with(|rt| rt.pid), RunPaths::new("/nonexistent")),
                    };
                    // QEMU closes QMP as it exits; give it a moment to be gone.
                    let mut alive = true;
                    for _ in 0..200 {
                        alive = pid.is_some_and(|p| self.inner.os.qemu_alive(p, &run));
                        if !alive { break; }
                        tokio::time::sleep(Duration::from_millis(25)).await;
                    }
                    if let (true, Some(p)) = (alive, pid) {
                        // QMP dropped but QEMU lives: reconnect.
                        match self.inner.os.connect_qmp(&run, QMP_CONNECT, p).await {
                            Ok(q) => {
                                events = q.events();
                                slot.with(|rt| rt.qmp = Some(q.clone()));
                                qmp = q;
                                continue;
                            }
                            Err(e) => {
                                // Never treat a live QEMU as ended (its disks, locks and
                                // replica terms are still its own): wait for it.
                                tracing::warn!(vm = %name, error = %e, "QMP lost; QEMU still running; waiting for it to end");
                                while self.inner.os.qemu_alive(p, &run) {
                                    if !current(&slot) { return; }
                                    tokio::time::sleep(Duration::from_millis(500)).await;
                                }
                            }
                        }
                    }
                    self.on_exit(&name, &slot, generation).await;
                    return;
                }
            }
        }
    }

    /// QEMU is gone: clean up and record what its end means ([`classify_exit`]).
    async fn on_exit(&self, name: &str, slot: &Slot, generation: u64) {
        let Some(out) = slot.with(|rt| {
            if rt.generation != generation {
                return None;
            }
            let out = classify_exit(
                std::mem::take(&mut rt.intent),
                &std::mem::take(&mut rt.facts),
                rt.last_exit.as_deref(),
            );
            rt.pid = None;
            rt.qmp = None;
            rt.console = None;
            rt.accel = None;
            rt.last_exit = out.why.clone();
            Some(out)
        }) else {
            return;
        };
        if let Ok((r, _)) = self.record(name).await {
            self.remove_taps(r.id, r.spec.nics.len()).await;
            self.remove_overlays(r.id);
            self.inner.cgroups.remove_vm(r.id);
            if out.unlock_disks {
                // After a live migration the locks are the destination's: a no-op then.
                self.unlock_disks(&r.spec).await;
            }
        }
        self.set_state(name, slot, out.state);
        self.save_state(name, out.state, out.why).await;
    }

    /// Throws away the writes of non-persistent disks.
    pub fn remove_overlays(&self, id: u32) {
        if let Ok(rd) = std::fs::read_dir(self.run_paths(id).dir) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with("overlay-") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }

    pub async fn wait_gone(&self, slot: &Slot, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < deadline {
            if !slot.state().has_process() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        !slot.state().has_process()
    }

    /// Hard stop: QMP `quit`, then SIGKILL if QEMU lingers.
    #[tracing::instrument(skip_all, fields(vm = %name))]
    pub async fn stop_vm(&self, name: &str) -> Result<()> {
        let op = self.lock_vm(name).await;
        self.stop_held(&op).await
    }

    /// Hard stop of the VM whose operation lock `op` holds.
    pub async fn stop_held(&self, op: &VmOp) -> Result<()> {
        let (name, slot) = (op.name(), op.slot());
        let (rec, _) = self.record(name).await?;
        slot.state().check(VmAction::Stop)?;
        let mut intent = IntentGuard::set(slot, ExitIntent::Stop);
        let (qmp, pid) = slot.with(|rt| (rt.qmp.clone(), rt.pid));
        if let Some(q) = qmp {
            let _ = q.run(&qc::Quit).await;
        }
        // Asked: QEMU's end is a stop whenever it comes (a QEMU stuck in I/O may die
        // of the SIGKILL long after this gives up).
        intent.keep();
        if !self.wait_gone(slot, STOP_WAIT).await {
            if let Some(pid) = pid {
                self.inner
                    .os
                    .kill_qemu(pid, &self.run_paths(rec.id))
                    .await?;
            }
            if !self.wait_gone(slot, STOP_WAIT).await {
                return Err(AgentError::failed(
                    Failure::Qemu,
                    format!("VM {name} did not stop"),
                ));
            }
        }
        Ok(())
    }

    /// ACPI power button; after `timeout` QEMU is killed.
    #[tracing::instrument(skip_all, fields(vm = %name))]
    pub async fn shutdown_vm(&self, name: &str, timeout: Option<Duration>) -> Result<bool> {
        let op = self.lock_vm(name).await;
        self.shutdown_held(&op, timeout.unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT))
            .await
    }

    /// Returns whether the guest powered off by itself (false: it was killed).
    async fn shutdown_held(&self, op: &VmOp, timeout: Duration) -> Result<bool> {
        let (name, slot) = (op.name(), op.slot());
        slot.state().check(VmAction::Shutdown)?;
        let qmp = slot.with(|rt| rt.qmp.clone()).ok_or_else(|| {
            AgentError::failed(Failure::Qemu, format!("VM {name} has no QMP connection"))
        })?;
        if slot.state() == VmState::Paused {
            // A paused guest cannot react to the power button.
            qmp.run(&qc::Cont).await?;
        }
        let mut intent = IntentGuard::set(slot, ExitIntent::Shutdown);
        let before = slot.state();
        let agent = self.record(name).await.is_ok_and(|(r, _)| r.spec.agent);
        self.set_state(name, slot, VmState::ShuttingDown);
        // Through the guest agent when the VM has one (a guest that ignores ACPI still
        // goes down); the power button when the agent does not take it.
        let mut by_agent = false;
        if agent {
            match self.agent_shutdown(name).await {
                Ok(()) => {
                    by_agent = true;
                    self.inner.events.emit(
                        Some(name),
                        "vm",
                        "shutdown requested through the guest agent",
                    );
                }
                Err(e) => self.inner.events.emit(
                    Some(name),
                    "vm",
                    format!("the guest agent did not take the shutdown ({e}); pressing the ACPI power button"),
                ),
            }
        }
        if !by_agent {
            if let Err(e) = qmp.run(&qc::SystemPowerdown).await {
                // Nothing happened: the VM is as it was (its intent goes with the guard).
                if slot.state() == VmState::ShuttingDown {
                    self.set_state(name, slot, before);
                }
                return Err(e.into());
            }
        }
        // The button was pressed: the guest may power off whenever it likes.
        intent.keep();
        if by_agent {
            // an agent that said nothing may be hung: half the time, then the button too
            let half = timeout / 2;
            if self.wait_gone(slot, half).await {
                return Ok(true);
            }
            self.inner.events.emit(
                Some(name),
                "vm",
                format!("guest still running {half:?} after the agent's shutdown; pressing the ACPI power button too"),
            );
            let _ = qmp.run(&qc::SystemPowerdown).await;
            if self.wait_gone(slot, timeout.saturating_sub(half)).await {
                return Ok(true);
            }
        } else if self.wait_gone(slot, timeout).await {
            return Ok(true);
        }
        self.inner.events.emit(
            Some(name),
            "vm",
            format!("guest did not power off within {timeout:?}; killing"),
        );
        self.stop_held(op).await?;
        Ok(false)
    }

    /// Shutdown (ACPI, killed after the timeout) and start again.
    #[tracing::instrument(skip_all, fields(vm = %name))]
    pub async fn reboot_vm(&self, name: &str, timeout: Option<Duration>) -> Result<()> {
        let op = self.lock_vm(name).await;
        self.shutdown_held(&op, timeout.unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT))
            .await?;
        self.start_held(&op, StartOrigin::Reboot).await
    }

    pub async fn pause_vm(&self, name: &str) -> Result<()> {
        self.pause_resume(name, VmAction::Pause, VmState::Paused)
            .await
    }

    /// Resumes a paused VM, or a suspended one from its state file.
    pub async fn resume_vm(&self, name: &str) -> Result<()> {
        if self.slot(name).state() == VmState::Suspended {
            return self.start_vm(name).await;
        }
        self.pause_resume(name, VmAction::Resume, VmState::Running)
            .await
    }

    async fn pause_resume(&self, name: &str, action: VmAction, to: VmState) -> Result<()> {
        let _op = self.lock_vm(name).await;
        let slot = _op.slot().clone();
        self.record(name).await?;
        slot.state().check(action)?;
        let qmp = self.qmp(name)?;
        if action == VmAction::Resume && slot.with(|rt| rt.intent) == ExitIntent::Suspend {
            // A suspend whose QEMU did not end: running on makes its saved state
            // stale, so it goes, and QEMU's end is no longer a suspend.
            slot.with(|rt| rt.intent = ExitIntent::None);
            if let Ok((r, _)) = self.record(name).await {
                if let Some(f) = r.suspend_file {
                    let _ = self.update_record(name, |r| r.suspend_file = None).await;
                    let _ = std::fs::remove_file(f);
                }
            }
        }
        if action == VmAction::Pause {
            qmp.run(&qc::Stop).await?;
        } else {
            qmp.run(&qc::Cont).await?;
        }
        self.set_state(name, &slot, to);
        self.save_state(name, to, None).await;
        Ok(())
    }

    /// At daemon start: find every VM's QEMU again, or report it stopped/crashed.
    #[tracing::instrument(skip_all)]
    pub async fn adopt_all(&self) -> Result<()> {
        for rec in self.records().await? {
            let name = rec.spec.name.clone();
            let slot = self.slot(&name);
            let run = self.run_paths(rec.id);
            if let Some(pid) = self.inner.os.read_pid(&run) {
                if let Ok(Err(why)) = self.locks_still_ours(&rec).await {
                    // Fenced on the storage side: another host runs this VM now.
                    tracing::error!(vm = %name, pid, why, "killing a QEMU that lost its disk locks");
                    let _ = self.inner.os.kill_qemu(pid, &run).await;
                    self.inner.events.emit(
                        Some(&name),
                        "ha",
                        format!("killed QEMU {pid} at adoption: {why}"),
                    );
                }
            }
            if rec.live_restore.is_some() {
                // Served again before anything waits on QEMU: its disks read from it.
                if let Err(e) = self.serve_restore(&rec).await {
                    tracing::error!(vm = %name, error = %e, "cannot serve the live-restore's backup");
                }
                self.watch_live_restore(&name);
            }
            match self.inner.os.read_pid(&run) {
                Some(pid) => match self.adopt(&name, &slot, pid, &run).await {
                    Ok(state) => {
                        // A QEMU an older daemon left in its own cgroup gets its scope.
                        if !self.inner.cgroups.in_own_scope(rec.id, pid) {
                            if let Err(e) = self.place_in_pool(&rec, pid).await {
                                tracing::error!(vm = %name, pid, error = %e, "cannot give the re-adopted QEMU its scope");
                            }
                        }
                        // The taps' MAC rules again (a flushed ruleset, an older daemon).
                        for (i, n) in rec.spec.nics.iter().enumerate() {
                            let tap = ferry_net::tap_name(rec.id, i);
                            let guarded = match n.mac.as_deref() {
                                Some(mac) => self.inner.os.guard_tap(&tap, mac).await,
                                None => Ok(()),
                            };
                            if let Err(e) = guarded {
                                tracing::error!(vm = %name, %tap, error = %e, "no MAC filter on the tap");
                            }
                        }
                        self.inner.events.emit(
                            Some(&name),
                            "vm",
                            format!("re-adopted QEMU pid {pid} ({state})"),
                        );
                    }
                    Err(e) => {
                        tracing::error!(vm = %name, pid, error = %e, "cannot re-adopt running QEMU");
                        slot.with(|rt| {
                            rt.state = VmState::Running;
                            rt.pid = Some(pid);
                            rt.last_exit = Some(format!("re-adoption failed: {e}"));
                        });
                    }
                },
                None => {
                    let was = rec.last_state;
                    let state = if was.has_process() {
                        VmState::Crashed
                    } else {
                        was
                    };
                    let why = if was.has_process() && self.rebooted() {
                        Some("the host went down while it ran (no clean shutdown)".to_string())
                    } else if was.has_process() {
                        Some("QEMU ended while the daemon was not running".to_string())
                    } else {
                        rec.last_exit.clone()
                    };
                    slot.with(|rt| {
                        rt.state = state;
                        rt.last_exit = why.clone();
                    });
                    if was.has_process() {
                        self.remove_taps(rec.id, rec.spec.nics.len()).await;
                        self.unlock_disks(&rec.spec).await;
                        self.save_state(&name, state, why).await;
                        self.inner.events.emit(
                            Some(&name),
                            "state",
                            format!("{was} -> {state} (found dead at start)"),
                        );
                    }
                }
            }
        }
        Ok(())
    }

    async fn adopt(
        &self,
        name: &str,
        slot: &Arc<Slot>,
        pid: i32,
        run: &RunPaths,
    ) -> Result<VmState> {
        let qmp = self
            .inner
            .os
            .connect_qmp(run, Duration::from_secs(5), pid)
            .await?;
        // Jobs the previous daemon started (snapshots) run on in QEMU: let them end, so
        // the repair pass sees their result, and dismiss them.
        for _ in 0..600 {
            let jobs = qmp.run(&qc::QueryJobs).await?;
            for j in jobs.iter().filter(|j| j.status == qc::JobStatus::Concluded) {
                let _ = qmp.run(&qc::JobDismiss { id: j.id.clone() }).await;
            }
            // (a live-restore's streams are the watcher's; they run for long)
            if jobs.iter().all(|j| {
                j.status == qc::JobStatus::Concluded
                    || j.id.starts_with(crate::live_restore::JOB_PREFIX)
            }) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        use qc::RunState as R;
        let state = match qmp.run(&qc::QueryStatus).await?.status {
            R::Running => VmState::Running,
            R::Paused
            | R::Inmigrate
            | R::Prelaunch
            | R::Suspended
            | R::Postmigrate
            | R::FinishMigrate
            | R::SaveVm
            | R::RestoreVm => VmState::Paused,
            R::Shutdown => VmState::ShuttingDown,
            R::Debug
            | R::InternalError
            | R::IoError
            | R::Watchdog
            | R::GuestPanicked
            | R::Colo
            | R::Unknown => VmState::Running,
        };
        let console = Console::attach(&run.serial, &tail(&run.serial_log, 256 * 1024), &|s| {
            self.inner.os.served_by(s, pid)
        })
        .await
        .map_err(|source| AgentError::Io {
            what: "Reconnect to the serial console".into(),
            source,
        })?;
        slot.with(|rt| rt.state = state);
        self.attach_runtime(name, slot, pid, qmp, console);
        self.save_state(name, state, None).await;
        Ok(state)
    }
}
