//! VM definitions: create, list, show, edit, delete.

use crate::error::{AgentError, Refusal, Result};
use crate::records::Transit;
use crate::records::{vm_key, VmRecord};
use crate::runtime::VmOp;
use crate::Host;
use ferry_store::StoreJson;
use ferry_types::{random_mac, DeleteVmParams, Vm, VmAction, VmSpec, VmState};
use std::collections::HashSet;

impl Host {
    pub fn to_vm(&self, r: VmRecord) -> Vm {
        let slot = self.slot(&r.spec.name);
        let rt = slot.rt.lock().unwrap_or_else(|e| e.into_inner());
        Vm {
            id: r.id,
            state: rt.state,
            pid: rt.pid,
            accel: rt.accel.map(|a| a.to_string()),
            last_exit: rt.last_exit.clone().or(r.last_exit),
            template: r.template,
            current_snapshot: r.current_snapshot,
            clone_of: r.clone_of,
            migration: r.transit.as_ref().map(|t| match t {
                Transit::To(to) => format!("to {to}"),
                Transit::From(from) => format!("from {from}"),
            }),
            live_restore: r.live_restore,
            spec: r.spec,
            host: self
                .inner
                .cluster
                .as_ref()
                .map(|_| self.host_name().to_string()),
        }
    }

    pub async fn list_vms(&self) -> Result<Vec<Vm>> {
        Ok(self
            .records()
            .await?
            .into_iter()
            .map(|r| self.to_vm(r))
            .collect())
    }

    /// Changes the HA policy, in any state (a running VM's fencing marker follows).
    pub async fn set_ha(&self, name: &str, ha: ferry_types::HaPolicy) -> Result<Vm> {
        let mut errs = ferry_types::ValidationErrors::default();
        if let Some(g) = &ha.anti_affinity {
            ferry_types::validate::check_name(&mut errs, "anti_affinity", g);
        }
        errs.into_result()?;
        let rec = self
            .update_record(name, |r| {
                r.spec.ha = ha.clone();
                r.ha_relocate = false;
            })
            .await?;
        let marker = self.run_paths(rec.id).dir.join(crate::os::HA_MARKER);
        if ha.enabled() && self.slot(name).with(|rt| rt.pid.is_some()) {
            let _ = std::fs::write(&marker, b"");
        } else {
            let _ = std::fs::remove_file(&marker);
        }
        self.inner.events.emit(
            Some(name),
            "ha",
            format!(
                "HA policy: {}",
                serde_json::to_string(&ha).unwrap_or_default()
            ),
        );
        Ok(self.to_vm(rec))
    }

    pub async fn get_vm(&self, name: &str) -> Result<Vm> {
        let (r, _) = self.record(name).await?;
        Ok(self.to_vm(r))
    }

    /// What keeps NIC `n` off this host's bridge (the field and why), if anything: no
    /// such bridge, a VLAN on a bridge that is not VLAN-aware, an MTU above the
    /// bridge's.
    pub(crate) fn nic_misfit(&self, n: &ferry_types::NicSpec) -> Option<(&'static str, String)> {
        let os = &self.inner.os;
        if !os.bridge_exists(&n.bridge) {
            return Some((
                "bridge",
                format!(
                    "no bridge {} on this host (create it with `ferry net bridge create`)",
                    n.bridge
                ),
            ));
        }
        if n.vlan.is_some() && !os.bridge_vlan_aware(&n.bridge) {
            return Some((
                "vlan",
                ferry_net::NetError::NotVlanAware(n.bridge.clone()).to_string(),
            ));
        }
        match (n.mtu, os.link_mtu(&n.bridge)) {
            (Some(m), Some(b)) if m > b => Some((
                "mtu",
                format!("{m} is above the MTU of bridge {} ({b})", n.bridge),
            )),
            _ => None,
        }
    }

    /// Checks of a spec against this host: CPU model and machine, pools, volumes,
    /// bridges, memory, MACs.
    pub(crate) async fn check_host(&self, spec: &VmSpec, own_name: Option<&str>) -> Result<()> {
        let mut e = ferry_types::ValidationErrors::default();
        let arch = spec.arch();
        let all = self.caps();
        if let (Some(all), None) = (all, all.and_then(|c| c.for_arch(arch.as_str()))) {
            e.push(
                "arch",
                format!(
                    "this host runs no {arch} guests (it runs {}; install qemu-system-{arch})",
                    all.arches().join(", ")
                ),
            );
        }
        if let Some(caps) = all.and_then(|c| c.for_arch(arch.as_str())) {
            if let Some(c) = spec.cpu.as_deref() {
                if !caps.cpu_models.iter().any(|m| m == c) {
                    e.push(
                        "cpu",
                        format!(
                            "CPU model {c} is not one this host runs ({})",
                            caps.cpu_models.join(", ")
                        ),
                    );
                }
            }
            if let Some(m) = spec.pinned_machine() {
                if !caps.machines.contains(&m) {
                    e.push(
                        "machine_version",
                        format!(
                            "QEMU {} here has no machine type {m} (newest: {})",
                            caps.qemu,
                            caps.latest_machine_version(spec.machine)
                                .unwrap_or_else(|| "none".into())
                        ),
                    );
                }
            }
        }
        let host_mem_mib = crate::host_memory_bytes() >> 20;
        if host_mem_mib > 0 && spec.memory_mib > host_mem_mib {
            e.push(
                "memory_mib",
                format!(
                    "{} MiB is more than this host has ({host_mem_mib} MiB)",
                    spec.memory_mib
                ),
            );
        }
        for (i, d) in spec.disks.iter().enumerate() {
            if let Ok(Some(_)) = self.replicated_pool(&d.pool).await {
                if let Some(v) = &d.volume {
                    if self.replica_record(&d.pool, v).await.is_err() {
                        e.push(
                            format!("disks[{i}].volume"),
                            format!("no volume {v} in pool {}", d.pool),
                        );
                    }
                } else if d.format != ferry_types::DiskFormat::Raw {
                    e.push(
                        format!("disks[{i}].format"),
                        format!(
                            "pool {} is replicated: its volumes are raw (format=raw)",
                            d.pool
                        ),
                    );
                }
                continue;
            }
            match self.dir_pool(&d.pool).await {
                Err(_) => e.push(format!("disks[{i}].pool"), format!("no pool {}", d.pool)),
                Ok(dp) => {
                    if let Some(v) = &d.volume {
                        if !dp.volume_path(v).map(|p| p.is_file()).unwrap_or(false) {
                            e.push(
                                format!("disks[{i}].volume"),
                                format!("no volume {v} in pool {}", d.pool),
                            );
                        }
                    }
                }
            }
        }
        for (i, c) in spec.cdroms.iter().enumerate() {
            if let (Some(p), Some(v)) = (&c.pool, &c.volume) {
                let ok = match self.dir_pool(p).await {
                    Ok(dp) => dp.volume_path(v).map(|p| p.is_file()).unwrap_or(false),
                    Err(_) => false,
                };
                if !ok {
                    e.push(format!("cdroms[{i}]"), format!("no volume {v} in pool {p}"));
                }
            }
        }
        for (i, n) in spec.nics.iter().enumerate() {
            if let Some((field, why)) = self.nic_misfit(n) {
                e.push(format!("nics[{i}].{field}"), why);
            }
        }
        if let Some(k) = &spec.direct_boot {
            for (f, p) in [
                ("direct_boot.kernel", Some(&k.kernel)),
                ("direct_boot.initrd", k.initrd.as_ref()),
            ] {
                if let Some(p) = p {
                    if !std::path::Path::new(p).is_file() {
                        e.push(f, format!("{p} is not a file on this host"));
                    }
                }
            }
        }
        if spec.firmware == ferry_types::Firmware::Uefi
            && spec.secure_boot
            && crate::lifecycle::secure_boot_paths().is_none()
        {
            e.push(
                "secure_boot",
                "Secure Boot needs OVMF's Secure Boot build (Debian package ovmf: OVMF_CODE_4M.secboot.fd, OVMF_VARS_4M.ms.fd), which this host lacks",
            );
        }
        if spec.tpm && !crate::caps::installed(crate::tpm::SWTPM) {
            e.push(
                "tpm",
                "a TPM needs swtpm (Debian package swtpm), which this host lacks",
            );
        }
        if spec.firmware == ferry_types::Firmware::Uefi
            && crate::lifecycle::ovmf_paths(spec.arch()).is_none()
        {
            e.push(
                "firmware",
                "UEFI needs OVMF (Debian package ovmf; AAVMF, qemu-efi-aarch64, for aarch64), which this host lacks",
            );
        }
        // MACs must be unique among all VMs of the host.
        let mut used = HashSet::new();
        for r in self.records().await? {
            if Some(r.spec.name.as_str()) == own_name {
                continue;
            }
            for n in r.spec.nics {
                if let Some(m) = n.mac {
                    used.insert(m.to_ascii_lowercase());
                }
            }
        }
        for (i, n) in spec.nics.iter().enumerate() {
            if let Some(m) = &n.mac {
                if used.contains(&m.to_ascii_lowercase()) {
                    e.push(
                        format!("nics[{i}].mac"),
                        format!("{m} is used by another VM"),
                    );
                }
            }
        }
        e.into_result()?;
        Ok(())
    }

    /// Fills in MACs: kept from `old` for the same NIC position, else derived from the
    /// cluster-unique VM id and the cluster's CA (`ferry_types::derived_mac`: no random
    /// collisions), random only when every slot of the id is taken on this host.
    async fn assign_macs(&self, spec: &mut VmSpec, old: Option<&VmSpec>, id: u32) -> Result<()> {
        let mut used: HashSet<String> = HashSet::new();
        for r in self.records().await? {
            for n in r.spec.nics {
                used.extend(n.mac.map(|m| m.to_ascii_lowercase()));
            }
        }
        // This cluster's (or lone host's) salt: its CA.
        let salt = ferry_types::mac_salt(&self.inner.cfg.pki.ca_fingerprint());
        used.extend(
            spec.nics
                .iter()
                .filter_map(|n| n.mac.as_ref().map(|m| m.to_ascii_lowercase())),
        );
        for (i, n) in spec.nics.iter_mut().enumerate() {
            if n.mac.is_none() {
                let keep = old.and_then(|o| o.nics.get(i)).and_then(|o| o.mac.clone());
                let derived = (0..ferry_types::MAX_NICS)
                    .map(|k| (i + k) % ferry_types::MAX_NICS)
                    .filter_map(|slot| ferry_types::derived_mac(salt, id, slot))
                    .find(|m| !used.contains(m));
                n.mac = Some(match keep.or(derived) {
                    Some(m) => {
                        used.insert(m.clone());
                        m
                    }
                    None => loop {
                        let m = random_mac();
                        if used.insert(m.clone()) {
                            break m;
                        }
                    },
                });
            }
        }
        Ok(())
    }

    /// Gives every NIC of VM `id` without a MAC a new one (derived from the id).
    pub async fn assign_new_macs(&self, spec: &mut VmSpec, id: u32) -> Result<()> {
        self.assign_macs(spec, None, id).await
    }

    /// Defines a VM. Either everything is created (record and new volumes) or nothing.
    #[tracing::instrument(skip_all, fields(vm = %spec.name))]
    pub async fn create_vm(&self, mut spec: VmSpec) -> Result<Vm> {
        spec.fill_arch_defaults();
        spec.validate()?;
        self.pin_hardware(&mut spec);
        self.check_resource_pool(&spec).await?;
        self.check_name_free(&spec.name).await?;
        self.check_host(&spec, None).await?;
        let id = self.allocate_id().await?;
        self.assign_macs(&mut spec, None, id).await?;
        self.write_intent(id, &spec.name, "create").await?;
        let made = match self.create_spec_volumes(id, &mut spec).await {
            Ok(m) => m,
            Err(e) => {
                self.clear_intent(id).await;
                return Err(e);
            }
        };
        let rec = VmRecord::new(id, spec.clone());
        let created = self.create_new_record(&rec).await;
        self.clear_intent(id).await;
        match created {
            Ok(true) => {}
            Ok(false) => {
                self.remove_volumes(&made).await;
                return Err(AgentError::refused(
                    Refusal::Exists,
                    format!("VM {} already exists", spec.name),
                ));
            }
            Err(e) => {
                self.remove_volumes(&made).await;
                return Err(e);
            }
        }
        self.inner
            .events
            .emit(Some(&spec.name), "vm", format!("defined (id {id})"));
        Ok(self.to_vm(rec))
    }

    /// Replaces the definition of a stopped VM (new disks with a size are created); its
    /// startup policy and description alone change in any state.
    pub async fn edit_vm(&self, name: &str, mut spec: VmSpec) -> Result<Vm> {
        spec.fill_arch_defaults();
        spec.validate()?;
        self.check_resource_pool(&spec).await?;
        if spec.name != name {
            return Err(AgentError::invalid(
                "name",
                "renaming is not supported; the name must match the URL",
            ));
        }
        let _op = self.lock_vm(name).await;
        let slot = _op.slot().clone();
        let (old, rev) = self.record(name).await?;
        // The CPU model, machine version and pinned devices stay unless the edit names
        // others.
        if spec.cpu.is_none() {
            spec.cpu.clone_from(&old.spec.cpu);
        }
        if spec.machine_version.is_none() {
            spec.machine_version.clone_from(&old.spec.machine_version);
        }
        for (new, was) in [
            (&mut spec.tablet, old.spec.tablet),
            (&mut spec.rng, old.spec.rng),
            (&mut spec.balloon, old.spec.balloon),
        ] {
            if new.is_none() {
                *new = was;
            }
        }
        // Its startup policy, description, cloud-init settings and NICs' links change in
        // any state; the rest while stopped.
        let policy_only = {
            let mut same = old.spec.clone();
            same.startup = spec.startup;
            same.description.clone_from(&spec.description);
            // cloud-init's seed is made at each start: a change reaches the guest then
            same.cloud_init.clone_from(&spec.cloud_init);
            if same.nics.len() == spec.nics.len() {
                for (a, b) in same.nics.iter_mut().zip(&spec.nics) {
                    a.link_down = b.link_down;
                }
            }
            same == spec
        };
        if !policy_only {
            slot.state().check(VmAction::Edit)?;
            self.refuse_live_restoring(&old, "edit it")?;
        }
        let links_changed = old
            .spec
            .nics
            .iter()
            .zip(&spec.nics)
            .any(|(a, b)| a.link_down != b.link_down);
        if links_changed && slot.state() == VmState::Suspended {
            // its saved NIC state would override the change at resume
            return Err(AgentError::refused(
                Refusal::Running,
                format!("VM {name} is suspended; resume it, then change its NICs' links"),
            ));
        }
        if old.template {
            return Err(AgentError::refused(
                Refusal::Template,
                format!("{name} is a template; templates are immutable (clone it)"),
            ));
        }
        self.check_host(&spec, Some(name)).await?;
        self.assign_macs(&mut spec, Some(&old.spec), old.id).await?;
        let made = self.create_spec_volumes(old.id, &mut spec).await?;
        // A running VM's links change first: if QEMU refuses, nothing is saved.
        let live = slot.state().has_process() && links_changed;
        if live {
            if let Err(e) = self.apply_links(name, &old.spec, &spec).await {
                let _ = self.apply_links(name, &spec, &old.spec).await;
                self.remove_volumes(&made).await;
                return Err(e);
            }
        }
        let old_spec = old.spec.clone();
        let rec = VmRecord { spec, ..old };
        match self.inner.store.cas_json(&vm_key(name), rev, &rec).await {
            Ok(true) => {}
            Ok(false) => {
                if live {
                    let _ = self.apply_links(name, &rec.spec, &old_spec).await;
                }
                self.remove_volumes(&made).await;
                return Err(AgentError::refused(
                    Refusal::Busy,
                    format!("VM {name} was changed meanwhile; retry"),
                ));
            }
            Err(e) => {
                if live {
                    let _ = self.apply_links(name, &rec.spec, &old_spec).await;
                }
                self.remove_volumes(&made).await;
                return Err(e.into());
            }
        }
        self.inner
            .events
            .emit(Some(name), "vm", "definition changed");
        Ok(self.to_vm(rec))
    }

    /// Plugs in or pulls the cables of a running VM's NICs whose `link_down` changed.
    async fn apply_links(&self, name: &str, old: &VmSpec, new: &VmSpec) -> Result<()> {
        for (k, (a, b)) in old.nics.iter().zip(&new.nics).enumerate() {
            if a.link_down != b.link_down {
                let qmp = self.qmp(name)?;
                qmp.run(&ferry_qmp::commands::SetLink {
                    name: format!("net{k}"),
                    up: !b.link_down,
                })
                .await?;
                self.inner.events.emit(
                    Some(name),
                    "vm",
                    format!("net{k} link {}", if b.link_down { "down" } else { "up" }),
                );
            }
        }
        Ok(())
    }

    /// Marks a stopped VM as a template: immutable, cloned but never started or edited.
    pub async fn make_template(&self, name: &str) -> Result<Vm> {
        let _op = self.lock_vm(name).await;
        let slot = _op.slot().clone();
        let (rec, _) = self.record(name).await?;
        slot.state().check(VmAction::Edit)?;
        self.refuse_live_restoring(&rec, "make it a template")?;
        let r = self.update_record(name, |r| r.template = true).await?;
        self.inner.events.emit(Some(name), "vm", "made a template");
        Ok(self.to_vm(r))
    }

    /// Deletes a VM and (unless kept) its own volumes `vm-{id}-*`.
    #[tracing::instrument(skip_all, fields(vm = %name))]
    pub async fn delete_vm(&self, name: &str, params: DeleteVmParams) -> Result<()> {
        let slot = self.slot(name);
        let (rec, _) = self.record(name).await?;
        if params.keep_disks {
            // unfilled parts would read as zeros without the backup behind them
            self.refuse_live_restoring(&rec, "delete it keeping its disks")?;
        }
        if slot.state().has_process() {
            if !params.force {
                return Err(AgentError::refused(
                    Refusal::Running,
                    format!(
                        "VM {name} is {}; stop it first or delete with force",
                        slot.state()
                    ),
                ));
            }
            self.stop_vm(name).await?;
        }
        let _op = VmOp::lock(name, &slot).await;
        slot.state().check(VmAction::Delete)?;
        let linked: Vec<String> = self
            .records()
            .await?
            .into_iter()
            .filter(|r| {
                r.clone_of
                    .as_ref()
                    .is_some_and(|c| c.linked && c.vm == name)
            })
            .map(|r| r.spec.name)
            .collect();
        if !linked.is_empty() {
            return Err(AgentError::refused(
                Refusal::InUse,
                format!(
                    "{name} has linked clones ({}); delete them or make full clones first",
                    linked.join(", ")
                ),
            ));
        }
        if let Some(f) = &rec.suspend_file {
            let _ = std::fs::remove_file(f);
        }
        self.delete_snapshot_records(name).await?;
        if !params.keep_disks {
            let prefix = format!("vm-{}-", rec.id);
            let origin = rec.origin_id.map(|o| format!("vm-{o}-"));
            let own: Vec<(String, String)> = rec
                .spec
                .disks
                .iter()
                .filter_map(|d| {
                    d.volume
                        .as_ref()
                        .filter(|v| {
                            v.starts_with(&prefix)
                                || origin.as_ref().is_some_and(|o| v.starts_with(o))
                        })
                        .map(|v| (d.pool.clone(), v.clone()))
                })
                .collect();
            self.remove_volumes(&own).await;
        }
        self.unlock_disks(&rec.spec).await;
        self.forget_vm(name, &rec).await?;
        if let Err(e) = self.release_name(name, rec.id).await {
            tracing::warn!(vm = %name, error = %e, "name reservation kept (taken over when stale)");
        }
        self.inner.events.emit(Some(name), "vm", "deleted");
        Ok(())
    }

    /// Removes a VM that now lives on another host: record, snapshot records, run and
    /// state dirs, runtime slot. Volumes stay.
    pub async fn forget_vm(&self, name: &str, rec: &crate::records::VmRecord) -> Result<()> {
        self.delete_snapshot_records(name).await?;
        self.inner
            .store
            .delete(&crate::records::vm_key(name))
            .await?;
        let _ = std::fs::remove_dir_all(self.run_paths(rec.id).dir);
        let _ = std::fs::remove_dir_all(self.vm_state_dir(rec.id));
        self.inner
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        Ok(())
    }
}
