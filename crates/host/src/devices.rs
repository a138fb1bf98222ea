//! Changing a VM's devices, also while it runs: CD-ROM media, disks and NICs attached
//! and detached (hot-plug on virtio-blk, virtio-scsi and PCI NICs; SATA/IDE only while
//! stopped).
//! Running disks keep their QEMU names `disk{index}`, so a running VM only loses its
//! last disk; a stopped one any.

use crate::error::{AgentError, Failure, Refusal, Result};
use crate::Host;
use ferry_qmp::commands as qc;
use ferry_types::{CdromSpec, DiskBus, DiskSpec, NicSpec, VmState};
use serde_json::json;
use std::os::fd::AsFd;
use std::time::Duration;

/// Devices of templates (immutable) and suspended VMs (their state file describes the
/// devices) cannot change.
fn changeable(
    name: &str,
    rec: &crate::records::VmRecord,
    slot: &crate::runtime::Slot,
) -> Result<()> {
    if rec.template {
        return Err(AgentError::refused(
            Refusal::Template,
            format!("{name} is a template; templates are immutable"),
        ));
    }
    if slot.state() == VmState::Suspended {
        return Err(AgentError::refused(
            Refusal::Unsupported,
            format!("{name} is suspended; its devices cannot change"),
        ));
    }
    Ok(())
}

impl Host {
    /// Inserts an ISO (`pool` + `volume`) into CD-ROM `index`, or ejects it (neither).
    pub async fn change_cdrom(&self, name: &str, index: usize, media: CdromSpec) -> Result<()> {
        let _op = self.lock_vm(name).await;
        let slot = _op.slot().clone();
        let (rec, _) = self.record(name).await?;
        let Some(cur) = rec.spec.cdroms.get(index) else {
            return Err(AgentError::NotFound(format!("CD-ROM {index} of {name}")));
        };
        let iso = match (&media.pool, &media.volume) {
            (Some(p), Some(v)) => {
                let dp = self.dir_pool(p).await?;
                dp.info(v).await?;
                Some(dp.volume_path(v)?)
            }
            (None, None) => None,
            _ => {
                return Err(AgentError::invalid(
                    "media",
                    "give both pool and volume, or neither to eject",
                ))
            }
        };
        if slot.state().has_process() {
            let qmp = self.qmp(name)?;
            let id = format!("cdrom{index}");
            match &iso {
                Some(path) => {
                    self.share_file(rec.id, path).await?;
                    qmp.run(&qc::BlockdevChangeMedium {
                        id,
                        filename: path.clone(),
                        format: "raw".into(),
                        read_only_mode: "read-only".into(),
                    })
                    .await?;
                }
                None => {
                    qmp.run(&qc::Eject { id, force: true }).await?;
                }
            }
        }
        let bus = cur.bus;
        self.update_record(name, |r| {
            r.spec.cdroms[index] = CdromSpec {
                bus,
                pool: media.pool.clone(),
                volume: media.volume.clone(),
            };
        })
        .await?;
        let what = match (&media.pool, &media.volume) {
            (Some(p), Some(v)) => format!("inserted {p}/{v} into cdrom{index}"),
            _ => format!("ejected cdrom{index}"),
        };
        self.inner.events.emit(Some(name), "vm", what);
        Ok(())
    }

    /// Adds a disk (a new volume with `size`, or an existing `volume`); hot-plugged when
    /// the VM runs. Returns the disk's index.
    pub async fn attach_disk(&self, name: &str, disk: DiskSpec) -> Result<usize> {
        let _op = self.lock_vm(name).await;
        let slot = _op.slot().clone();
        let (rec, _) = self.record(name).await?;
        changeable(name, &rec, &slot)?;
        self.refuse_live_restoring(&rec, "add a disk")?;
        let running = slot.state().has_process();
        if running && !matches!(disk.bus, DiskBus::Virtio | DiskBus::Scsi) {
            return Err(AgentError::refused(
                Refusal::Unsupported,
                format!(
                    "{:?} disks cannot be hot-plugged; stop {name} first or use virtio/scsi",
                    disk.bus
                ),
            ));
        }
        if running
            && disk.bus == DiskBus::Scsi
            && !rec.spec.disks.iter().any(|d| d.bus == DiskBus::Scsi)
        {
            return Err(AgentError::refused(
                Refusal::Unsupported,
                format!("{name} has no SCSI controller yet; stop it to add the first SCSI disk"),
            ));
        }
        let mut spec = rec.spec.clone();
        spec.disks.push(disk);
        spec.validate()?;
        let made = self.create_spec_volumes(rec.id, &mut spec).await?;
        let index = spec.disks.len() - 1;
        if running {
            if let Err(e) = self.hotplug_disk(name, &spec.disks[index], index).await {
                self.remove_volumes(&made).await;
                return Err(e);
            }
        }
        let d = spec.disks[index].clone();
        self.update_record(name, |r| r.spec.disks.push(d.clone()))
            .await?;
        self.inner
            .events
            .emit(Some(name), "vm", format!("disk{index} attached"));
        Ok(index)
    }

    async fn hotplug_disk(&self, name: &str, d: &DiskSpec, i: usize) -> Result<()> {
        let qmp = self.qmp(name)?;
        let dp = self.dir_pool(&d.pool).await?;
        let vol = d.volume.clone().unwrap_or_default();
        let fmt = dp.meta(&vol)?.format;
        let backing = crate::pools::backing_files(dp.chain(&vol)?);
        let (direct, no_flush, wce) = d.cache.qemu_flags();
        let cache = json!({"direct": direct, "no-flush": no_flush});
        // QEMU opens the volume itself now: it must be its user's, its backing files
        // readable to it.
        let id = self.record(name).await?.0.id;
        let path = dp.volume_path(&vol)?;
        self.confine_file(id, &path).await?;
        for b in &backing {
            self.share_file(id, &b.path).await?;
        }
        let mut node = ferry_qemu::format_node(
            fmt,
            json!({"driver": "file", "filename": path, "cache": cache}),
            &backing,
        );
        node["node-name"] = json!(format!("disk{i}"));
        node["cache"] = cache;
        node["read-only"] = json!(d.readonly);
        qmp.run(&qc::BlockdevAdd(node)).await?;
        let mut dev = json!({"id": format!("disk{i}"), "drive": format!("disk{i}"), "write-cache": if wce { "on" } else { "off" }});
        if d.bus == DiskBus::Scsi {
            dev["driver"] = json!("scsi-hd");
            dev["bus"] = json!("scsi0.0");
            dev["scsi-id"] = json!(i);
        } else {
            dev["driver"] = json!("virtio-blk-pci");
        }
        if let Err(e) = qmp.run(&qc::DeviceAdd(dev)).await {
            let _ = qmp
                .run(&qc::BlockdevDel {
                    node_name: format!("disk{i}"),
                })
                .await;
            return Err(e.into());
        }
        if d.limited() {
            let id = format!("disk{i}");
            if let Err(e) = qmp.run(&crate::lifecycle::io_throttle(&id, d)).await {
                // taken out again, waiting for the guest, and its node with it
                if self.unplug(name, &id).await.is_ok() {
                    let _ = qmp.run(&qc::BlockdevDel { node_name: id }).await;
                }
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// Removes disk `index` from the VM (its volume stays); hot-unplugged when running
    /// (only the last disk then).
    pub async fn detach_disk(&self, name: &str, index: usize) -> Result<()> {
        let _op = self.lock_vm(name).await;
        let slot = _op.slot().clone();
        let (rec, _) = self.record(name).await?;
        if index >= rec.spec.disks.len() {
            return Err(AgentError::NotFound(format!("disk{index} of {name}")));
        }
        self.refuse_live_restoring(&rec, "remove a disk")?;
        if slot.state().has_process() {
            if index + 1 != rec.spec.disks.len() {
                return Err(AgentError::refused(
                    Refusal::Unsupported,
                    format!(
                        "while {name} runs only its last disk (disk{}) can be detached",
                        rec.spec.disks.len() - 1
                    ),
                ));
            }
            let d = &rec.spec.disks[index];
            if !matches!(d.bus, DiskBus::Virtio | DiskBus::Scsi) {
                return Err(AgentError::refused(
                    Refusal::Unsupported,
                    format!("{:?} disks cannot be hot-unplugged", d.bus),
                ));
            }
            let node = self.disk_node(name, index).await;
            self.unplug(name, &format!("disk{index}")).await?;
            let qmp = self.qmp(name)?;
            qmp.run(&qc::BlockdevDel {
                node_name: node.clone(),
            })
            .await?;
        } else if slot.state() == VmState::Suspended {
            return Err(AgentError::refused(
                Refusal::Unsupported,
                format!("{name} is suspended; its devices cannot change"),
            ));
        }
        self.update_record(name, |r| {
            if index < r.spec.disks.len() {
                r.spec.disks.remove(index);
                // Boot entries follow the renumbering of the disks after it.
                r.spec.boot_order = r
                    .spec
                    .boot_order
                    .iter()
                    .filter_map(|b| {
                        match b.strip_prefix("disk").and_then(|n| n.parse::<usize>().ok()) {
                            Some(n) if n == index => None,
                            Some(n) if n > index => Some(format!("disk{}", n - 1)),
                            _ => Some(b.clone()),
                        }
                    })
                    .collect();
            }
        })
        .await?;
        self.inner
            .events
            .emit(Some(name), "vm", format!("disk{index} detached"));
        Ok(())
    }
}

impl Host {
    /// Adds a NIC (a new MAC unless given); hot-plugged with its tap when the VM runs.
    /// Returns the NIC's index.
    pub async fn attach_nic(&self, name: &str, nic: NicSpec) -> Result<usize> {
        let _op = self.lock_vm(name).await;
        let slot = _op.slot().clone();
        let (rec, _) = self.record(name).await?;
        changeable(name, &rec, &slot)?;
        let mut spec = rec.spec.clone();
        spec.nics.push(nic);
        spec.validate()?;
        let i = spec.nics.len() - 1;
        if let Some((field, why)) = self.nic_misfit(&spec.nics[i]) {
            return Err(AgentError::invalid(&format!("nics[{i}].{field}"), why));
        }
        self.assign_new_macs(&mut spec, rec.id).await?;
        let n = spec.nics[i].clone();
        if slot.state().has_process() {
            let tap = ferry_net::tap_name(rec.id, i);
            let mac = n
                .mac
                .as_deref()
                .ok_or_else(|| AgentError::invalid("nics", format!("{tap}: NIC without a MAC")))?;
            let owner = self.qemu_identity(rec.id)?.map(|w| (w.uid, w.gid));
            self.inner.os.create_tap(&tap, mac, owner).await?;
            let plugged = async {
                self.inner.os.attach_up(&tap, &n.bridge, n.vlan).await?;
                let qmp = self.qmp(name)?;
                // QEMU cannot open the tap (or vhost-net) itself: it gets them open.
                let fd = format!("tap-net{i}");
                qmp.send_fd(&fd, self.inner.os.open_tap(&tap)?.as_fd())
                    .await?;
                let mut netdev = json!({"type": "tap", "id": format!("net{i}"), "fd": fd});
                if self.accel() == ferry_qemu::Accel::Kvm {
                    let vhost = self.inner.os.open_vhost().ok_or_else(|| {
                        AgentError::refused(
                            Refusal::HostLacks,
                            "/dev/vhost-net is missing (modprobe vhost_net)",
                        )
                    })?;
                    let vfd = format!("vhost-net{i}");
                    qmp.send_fd(&vfd, vhost.as_fd()).await?;
                    netdev["vhost"] = json!(true);
                    netdev["vhostfd"] = json!(vfd);
                }
                qmp.run(&qc::NetdevAdd(netdev)).await?;
                if let Err(e) = qmp.run(&qc::DeviceAdd(ferry_qemu::nic_device(&n, i))).await {
                    let _ = qmp
                        .run(&qc::NetdevDel {
                            id: format!("net{i}"),
                        })
                        .await;
                    return Err(e.into());
                }
                if n.link_down {
                    let down = qmp
                        .run(&qc::SetLink {
                            name: format!("net{i}"),
                            up: false,
                        })
                        .await;
                    if let Err(e) = down {
                        if self.unplug(name, &format!("net{i}")).await.is_ok() {
                            let _ = qmp
                                .run(&qc::NetdevDel {
                                    id: format!("net{i}"),
                                })
                                .await;
                        }
                        return Err(e.into());
                    }
                }
                Ok::<_, AgentError>(())
            }
            .await;
            if let Err(e) = plugged {
                let _ = self.inner.os.delete_tap(&tap).await;
                return Err(e);
            }
        }
        self.update_record(name, |r| r.spec.nics.push(n.clone()))
            .await?;
        self.inner.events.emit(
            Some(name),
            "vm",
            format!("net{i} attached ({})", n.mac.clone().unwrap_or_default()),
        );
        Ok(i)
    }

    /// Removes NIC `index`; hot-unplugged when running (only the last NIC then).
    pub async fn detach_nic(&self, name: &str, index: usize) -> Result<()> {
        let _op = self.lock_vm(name).await;
        let slot = _op.slot().clone();
        let (rec, _) = self.record(name).await?;
        if index >= rec.spec.nics.len() {
            return Err(AgentError::NotFound(format!("net{index} of {name}")));
        }
        if slot.state().has_process() {
            if index + 1 != rec.spec.nics.len() {
                return Err(AgentError::refused(
                    Refusal::Unsupported,
                    format!(
                        "while {name} runs only its last NIC (net{}) can be detached",
                        rec.spec.nics.len() - 1
                    ),
                ));
            }
            self.unplug(name, &format!("net{index}")).await?;
            let qmp = self.qmp(name)?;
            qmp.run(&qc::NetdevDel {
                id: format!("net{index}"),
            })
            .await?;
            self.inner
                .os
                .delete_tap(&ferry_net::tap_name(rec.id, index))
                .await?;
        } else if slot.state() == VmState::Suspended {
            return Err(AgentError::refused(
                Refusal::Unsupported,
                format!("{name} is suspended; its devices cannot change"),
            ));
        }
        self.update_record(name, |r| {
            if index < r.spec.nics.len() {
                r.spec.nics.remove(index);
                r.spec.boot_order.retain(|b| b != &format!("net{index}"));
            }
        })
        .await?;
        self.inner
            .events
            .emit(Some(name), "vm", format!("net{index} detached"));
        Ok(())
    }

    /// `device_del` and wait until the guest let the device go.
    async fn unplug(&self, name: &str, id: &str) -> Result<()> {
        let qmp = self.qmp(name)?;
        let mut ev = qmp.events();
        qmp.run(&qc::DeviceDel { id: id.to_string() }).await?;
        let wait = async {
            loop {
                match ev.recv().await {
                    Ok(e) if e.name == "DEVICE_DELETED" && e.data["device"] == json!(id) => return,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    _ => {}
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(30), wait)
            .await
            .map_err(|_| {
                AgentError::failed(
                    Failure::Guest,
                    format!("the guest did not release {id} within 30 s"),
                )
            })
    }
}
