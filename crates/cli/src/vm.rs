//! `ferry vm ...` and `ferry disk ...`: defining, running and changing VMs.

use super::*;
use ferry_types::{
    CloneRequest, DiskMove, Firmware, HaMode, HaPolicy, Machine, MigrateRequest, MoveRequest,
    ShutdownParams, SnapshotCreate, VolumeResize,
};

#[derive(Args, Debug, Clone, Default)]
pub struct SpecArgs {
    /// Number of vCPUs.
    #[arg(long)]
    pub cpus: Option<u32>,
    /// Memory: 512M, 2G (a plain number is MiB).
    #[arg(long)]
    pub memory: Option<String>,
    /// A disk: bus=virtio|scsi|sata|ide,pool=local,size=10G[,format=qcow2|raw][,cache=none|writeback|...][,volume=NAME][,readonly][,iops=N][,mbps=N][,iops_max=N,mbps_max=N,burst_s=S (bursts)]. Repeatable.
    #[arg(long = "disk")]
    pub disks: Vec<String>,
    /// A CD-ROM: POOL/VOLUME[,bus=ide|sata|scsi], or `empty`. Repeatable.
    #[arg(long = "cdrom")]
    pub cdroms: Vec<String>,
    /// A NIC: bridge=NAME[,model=virtio|e1000|e1000e|rtl8139|vmxnet3][,mac=52:54:00:..]
    /// [,vlan=1-4094 (on a VLAN-aware bridge)][,mtu=N (virtio)][,link=up|down].
    /// Repeatable.
    #[arg(long = "nic")]
    pub nics: Vec<String>,
    /// Boot order: device ids, e.g. cdrom0,disk0,net0.
    #[arg(long)]
    pub boot: Option<String>,
    /// The guest's architecture: x86_64 (default), aarch64 or riscv64 (by emulation on
    /// hosts of another architecture; `ferry host status` lists what a host runs).
    #[arg(long)]
    pub arch: Option<ferry_types::Arch>,
    /// pc (i440fx, default) or q35; virt for aarch64 and riscv64 (their default).
    #[arg(long)]
    pub machine: Option<Machine>,
    /// The machine's QEMU version, e.g. 9.2 for pc-q35-9.2 (default at create: the
    /// newest the host has; kept afterwards).
    #[arg(long = "machine-version")]
    pub machine_version: Option<String>,
    /// CPU model: x86-64-v2-AES (default), x86-64-v2, x86-64-v3, x86-64-v4, a QEMU
    /// model (Westmere, EPYC, ...) or host (the host's CPU; never moved by DRS). `ferry
    /// host status` lists the host's.
    #[arg(long)]
    pub cpu: Option<String>,
    /// A USB tablet, so the VNC pointer does not drift: on (default at create) or off.
    #[arg(long)]
    pub tablet: Option<String>,
    /// A virtio RNG fed from the host's /dev/urandom: on (default at create) or off.
    #[arg(long)]
    pub rng: Option<String>,
    /// A virtio memory balloon: on (default at create) or off.
    #[arg(long)]
    pub balloon: Option<String>,
    /// The QEMU guest agent's channel: on or off (default). With it ferry shows the
    /// guest's addresses (`ferry vm agent`), shuts down through it and freezes file
    /// systems for disk snapshots and backups.
    #[arg(long)]
    pub agent: Option<String>,
    /// cloud-init (NoCloud): user=NAME,password-hash=HASH,ssh-key=FILE (repeatable),
    /// hostname=H,ip=ADDR/PREFIX|dhcp,gw=G (NIC 0; ip1=,gw1= for NIC 1, ...),
    /// dns=ADDR (repeatable),search=DOMAIN,user-data=FILE (a #cloud-config or script,
    /// run as vendor data). On edit the keys given replace theirs, the rest stays;
    /// `--cloud-init off` removes it. Changes reach the guest at its next start.
    #[arg(long = "cloud-init")]
    pub cloud_init: Vec<String>,
    /// bios (default) or uefi.
    #[arg(long)]
    pub firmware: Option<Firmware>,
    /// A TPM 2.0 (swtpm; x86_64): on or off (default). Its state stays with the VM
    /// (migration, cold moves, clones, snapshots).
    #[arg(long)]
    pub tpm: Option<String>,
    /// UEFI Secure Boot with Microsoft's keys (needs --firmware uefi and --machine q35):
    /// on or off (default). Switching it gives the VM new UEFI variables.
    #[arg(long = "secure-boot")]
    pub secure_boot: Option<String>,
    /// Direct boot: kernel file on the host.
    #[arg(long)]
    pub kernel: Option<String>,
    /// Direct boot: initrd file on the host.
    #[arg(long)]
    pub initrd: Option<String>,
    /// Direct boot: kernel command line.
    #[arg(long)]
    pub append: Option<String>,
    #[arg(long)]
    pub description: Option<String>,
    /// Start it when its host boots: on or off (not for HA VMs: the cluster places them).
    #[arg(long)]
    pub autostart: Option<String>,
    /// Its place at host boot and shutdown: order=N,up=SECONDS,down=SECONDS (lower
    /// orders start first and stop last; up: wait before the next start; down: how long
    /// its guest may take to power off at host shutdown, default 180).
    #[arg(long)]
    pub startup: Option<String>,
    /// At host shutdown: shutdown (ACPI, stopped after `down`) or suspend (resumes at boot).
    #[arg(long = "on-host-shutdown")]
    pub on_host_shutdown: Option<ferry_types::HostShutdownAction>,
    #[command(flatten)]
    pub ha: HaArgs,
    #[command(flatten)]
    pub placement: PlacementArgs,
}

/// Where DRS may place a VM, and its resource pool.
#[derive(Args, Debug, Clone, Default)]
pub struct PlacementArgs {
    /// Affinity group: VMs of one group run on one host.
    #[arg(long)]
    pub affinity: Option<String>,
    /// Anti-affinity group: VMs of one group run on different hosts. Repeatable.
    #[arg(long = "anti-affinity")]
    pub anti_affinity: Vec<String>,
    /// Only hosts with this label (`ferry serve --label`). Repeatable.
    #[arg(long = "host-label")]
    pub host_labels: Vec<String>,
    /// Only these hosts (comma-separated).
    #[arg(long = "pin-hosts", value_delimiter = ',')]
    pub hosts: Vec<String>,
    /// DRS does not move this VM to balance (yes|no).
    #[arg(long = "drs-pinned")]
    pub pinned: Option<String>,
    /// The resource pool (`ferry resource-pool`); empty: none.
    #[arg(long = "resource-pool")]
    pub resource_pool: Option<String>,
}

/// A VM's HA policy.
#[derive(Args, Debug, Clone, Default)]
pub struct HaArgs {
    /// HA: restart (after a crash, and on another host when its host fails) or off.
    #[arg(long = "ha", value_parser = ha_mode)]
    pub mode: Option<HaMode>,
    /// HA priority: higher ones are recovered first.
    #[arg(long = "ha-priority")]
    pub priority: Option<i32>,
    /// Crash restarts on one host (within 10 min) before HA moves the VM.
    #[arg(long = "ha-max-restarts")]
    pub max_restarts: Option<u32>,
    /// Anti-affinity group: HA keeps VMs of one group on different hosts.
    #[arg(long = "ha-group")]
    pub group: Option<String>,
}

/// `--ha`: restart or off (the API's names).
fn ha_mode(s: &str) -> std::result::Result<HaMode, String> {
    match s {
        "restart" => Ok(HaMode::Restart),
        "off" => Ok(HaMode::Off),
        _ => Err(format!("--ha {s}: use restart or off")),
    }
}

impl HaArgs {
    /// Whether any option was given.
    pub fn any(&self) -> bool {
        self.mode.is_some()
            || self.priority.is_some()
            || self.max_restarts.is_some()
            || self.group.is_some()
    }

    /// Applies the given options to the policy `cur`.
    pub fn apply(&self, cur: &mut HaPolicy) {
        if let Some(m) = self.mode {
            cur.mode = m;
        }
        if let Some(p) = self.priority {
            cur.priority = p;
        }
        if let Some(n) = self.max_restarts {
            cur.max_restarts = n;
        }
        if let Some(g) = &self.group {
            cur.anti_affinity = (!g.is_empty()).then(|| g.clone());
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum VmCmd {
    /// List the VMs of the cluster (of this host alone outside one).
    List {
        /// Only the VMs of this host.
        #[arg(long, conflicts_with = "here")]
        host: Option<String>,
        /// Only the VMs of the host the CLI talks to.
        #[arg(long)]
        here: bool,
        /// Only VMs in this state (running, stopped, crashed, …).
        #[arg(long)]
        state: Option<String>,
        /// Only VMs whose name contains this text.
        #[arg(long)]
        search: Option<String>,
    },
    /// Show one VM.
    Show {
        name: String,
    },
    /// Define a VM.
    Create {
        name: String,
        /// Let DRS pick the host (the definition goes to that host).
        #[arg(long)]
        place: bool,
        #[command(flatten)]
        spec: Box<SpecArgs>,
    },
    /// Where DRS would run the VM, with each host's filters and score.
    Place {
        name: String,
        /// Show every host's verdict, not just the choice.
        #[arg(long)]
        explain: bool,
    },
    /// Change a stopped VM's definition (given options replace, disks/NICs/CD-ROMs are
    /// added); --autostart, --startup, --on-host-shutdown and --description also while it runs.
    Edit {
        name: String,
        #[command(flatten)]
        spec: Box<SpecArgs>,
    },
    /// Change a VM's HA policy (also while it runs).
    Ha {
        name: String,
        #[command(flatten)]
        ha: HaArgs,
    },
    /// Start a VM.
    Start {
        name: String,
    },
    /// Shut down through ACPI; killed after the timeout.
    #[command(alias = "shutdown")]
    Stop {
        name: String,
        /// Seconds to wait for the guest.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Stop at once (QEMU quits without asking the guest).
    Kill {
        name: String,
    },
    /// Shut down and start again.
    Reboot {
        name: String,
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    Pause {
        name: String,
    },
    Resume {
        name: String,
    },
    /// Delete a VM and its own disks.
    Delete {
        name: String,
        /// Kill it first if it runs.
        #[arg(long)]
        force: bool,
        /// Keep its volumes.
        #[arg(long)]
        keep_disks: bool,
    },
    /// Take a snapshot (disk-only, or --with-memory of a running VM).
    Snapshot {
        name: String,
        snapshot: String,
        #[arg(long)]
        with_memory: bool,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// The snapshot tree.
    Snapshots {
        name: String,
    },
    /// Go back to a snapshot.
    Revert {
        name: String,
        snapshot: String,
    },
    /// Delete a snapshot (its data merges into what remains).
    SnapshotDelete {
        name: String,
        snapshot: String,
    },
    /// Clone a stopped VM or a template (--linked: instant overlay clone of a template).
    Clone {
        name: String,
        new_name: String,
        #[arg(long)]
        linked: bool,
    },
    /// Make a stopped VM an immutable template.
    Template {
        name: String,
    },
    /// Save RAM and device state to disk and stop (resume continues the guest).
    Suspend {
        name: String,
    },
    /// Move a disk to another pool, also while the VM runs (Storage vMotion).
    MoveDisk {
        name: String,
        /// The disk: its index or `diskN`.
        disk: String,
        /// The pool to move it to.
        #[arg(long, required_unless_present = "abort")]
        to_pool: Option<String>,
        /// Abort a move under way (the disk stays where it was).
        #[arg(long)]
        abort: bool,
        /// Cap the copy, MiB/s (while the VM runs).
        #[arg(long)]
        bandwidth: Option<u64>,
    },
    /// Move a stopped or suspended VM to another host (its local disks are copied).
    Move {
        name: String,
        #[arg(long)]
        to: String,
    },
    /// Move a running VM to another host while it runs (live migration).
    Migrate {
        name: String,
        /// The destination host.
        #[arg(long)]
        to: String,
        /// Also copy disks on local pools (mirrored over NBD while the guest runs).
        #[arg(long)]
        with_storage: bool,
        /// With --with-storage: the destination's pool for the copies.
        #[arg(long)]
        target_pool: Option<String>,
        /// Longest pause allowed at switchover, ms (default 50).
        #[arg(long)]
        downtime: Option<u64>,
        /// Bandwidth cap, MiB/s (default 10240: the link's speed).
        #[arg(long)]
        bandwidth: Option<u64>,
        /// Never switch to post-copy (a guest that dirties faster than the link then
        /// only converges by throttling).
        #[arg(long)]
        no_postcopy: bool,
    },
    /// Disks of a VM (hot-plugged while running: virtio and scsi).
    #[command(subcommand)]
    Disk(DiskCmd),
    /// NICs of a VM (hot-plugged while running).
    #[command(subcommand)]
    Nic(NicCmd),
    /// Insert an ISO (POOL/VOLUME) into a CD-ROM, or `eject` it; also while running.
    Cdrom {
        name: String,
        index: usize,
        media: String,
    },
    /// Import an OVF appliance (.ova, e.g. exported from VMware) on the daemon's host as
    /// a VM: CPUs, memory, firmware, disks (converted into POOL) and NICs mapped; what
    /// cannot be mapped is listed.
    ImportOva {
        /// The .ova file (a path on the daemon's host).
        file: String,
        /// The new VM's name.
        #[arg(long = "as")]
        name: String,
        #[arg(long, default_value = "local")]
        pool: String,
        /// The bridge its NICs go to.
        #[arg(long)]
        bridge: Option<String>,
    },
    /// What the guest agent says: the guest's host name, OS and addresses (the VM needs
    /// `--agent on` and qemu-guest-agent running inside).
    Agent {
        name: String,
    },
    /// Attach to the serial console (Ctrl-] detaches).
    Console {
        name: String,
        /// Print the console history and exit.
        #[arg(long)]
        history: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum DiskCmd {
    /// Add a disk: bus=virtio,size=10G (new volume) or volume=NAME (existing).
    Attach { name: String, disk: String },
    /// Remove disk INDEX (its volume stays); while running only the last one.
    Detach { name: String, index: usize },
    /// Grow disk INDEX (online while running).
    Resize {
        name: String,
        index: usize,
        #[arg(long)]
        size: ByteSize,
    },
}

#[derive(Subcommand, Debug)]
pub enum NicCmd {
    /// Add a NIC: bridge=NAME[,model=...][,mac=...][,vlan=N][,mtu=N][,link=up|down].
    Attach { name: String, nic: String },
    /// Remove NIC INDEX; while running only the last one.
    Detach { name: String, index: usize },
    /// Plug NIC INDEX's cable in (up) or pull it (down), also while the VM runs.
    Link {
        name: String,
        index: usize,
        #[arg(value_parser = ["up", "down"])]
        state: String,
    },
}

pub(crate) async fn action(
    c: &Client,
    g: &Global,
    name: &str,
    act: &str,
    body: Option<Value>,
) -> Result<()> {
    let t: TaskAccepted = c
        .request(
            Method::POST,
            &format!("/api/v1/vms/{name}/{act}"),
            body.as_ref(),
        )
        .await?;
    let done = c.wait_task(t, g.json).await?;
    if g.json {
        return print_json(&done);
    }
    match c.get::<Vm>(&format!("/api/v1/vms/{name}")).await {
        Ok(vm) => println!("{name}: {}", vm.state),
        // DRS started it on another host: the task's last line says where.
        Err(_) => println!("{name}: {}", done.log.last().map_or("done", String::as_str)),
    }
    Ok(())
}

pub(crate) async fn vm(c: &Client, g: &Global, cmd: VmCmd) -> Result<()> {
    match cmd {
        VmCmd::List {
            host,
            here,
            state,
            search,
        } => {
            let host = match (host, here) {
                (Some(h), _) => Some(h),
                (None, true) => Some(c.get::<ferry_types::HostInfo>("/api/v1/host").await?.name),
                (None, false) => None,
            };
            let mut url = reqwest::Url::parse("http://ferry/api/v1/vms")?;
            for (k, v) in [("host", host), ("state", state), ("q", search)] {
                if let Some(v) = v {
                    url.query_pairs_mut().append_pair(k, &v);
                }
            }
            let path = match url.query() {
                Some(q) if !q.is_empty() => format!("{}?{q}", url.path()),
                _ => url.path().to_string(),
            };
            let vms: Vec<Vm> = c.get(&path).await?;
            if g.json {
                return print_json(&vms);
            }
            let mut t = table(&[
                "ID", "NAME", "HOST", "STATE", "CPUS", "MEMORY", "DISKS", "NICS", "PID",
            ]);
            for v in vms {
                t.add_row(vec![
                    v.id.to_string(),
                    v.spec.name.clone(),
                    v.host.clone().unwrap_or_default(),
                    v.state.to_string(),
                    v.spec.cpus.to_string(),
                    mib(v.spec.memory_mib),
                    v.spec.disks.len().to_string(),
                    v.spec.nics.len().to_string(),
                    v.pid.map(|p| p.to_string()).unwrap_or_default(),
                ]);
            }
            println!("{t}");
            Ok(())
        }
        VmCmd::Show { name } => {
            let v: Vm = c.get(&format!("/api/v1/vms/{name}")).await?;
            print_json(&v)
        }
        VmCmd::Place { name, explain } => {
            let r: ferry_types::PlacementReport =
                c.get(&format!("/api/v1/vms/{name}/placement")).await?;
            drs::print_placement(g, &r, explain)
        }
        VmCmd::Create { name, place, spec } => {
            let body = specs::spec_json(&name, &spec, None)?;
            let path = if place {
                "/api/v1/placement/create"
            } else {
                "/api/v1/vms"
            };
            let v: Vm = c.request(Method::POST, path, Some(&body)).await?;
            if g.json {
                return print_json(&v);
            }
            println!(
                "VM {} defined (id {}, {} disks, {} NICs; CPU {}, machine {})",
                v.spec.name,
                v.id,
                v.spec.disks.len(),
                v.spec.nics.len(),
                v.spec.cpu.as_deref().unwrap_or("as the host's"),
                v.spec.machine_type()
            );
            Ok(())
        }
        VmCmd::Edit { name, spec } => {
            let cur: Vm = c.get(&format!("/api/v1/vms/{name}")).await?;
            let body = specs::spec_json(&name, &spec, Some(&cur.spec))?;
            let v: Vm = c
                .request(Method::PUT, &format!("/api/v1/vms/{name}"), Some(&body))
                .await?;
            if g.json {
                return print_json(&v);
            }
            println!("VM {name} changed");
            Ok(())
        }
        VmCmd::Ha { name, ha } => {
            let cur: Vm = c.get(&format!("/api/v1/vms/{name}")).await?;
            let mut body = cur.spec.ha;
            ha.apply(&mut body);
            let v: Vm = c
                .send(Method::PUT, &format!("/api/v1/vms/{name}/ha"), &body)
                .await?;
            if g.json {
                return print_json(&v);
            }
            println!("VM {name}: HA {}", serde_json::to_string(&v.spec.ha)?);
            Ok(())
        }
        VmCmd::Start { name } => action(c, g, &name, "start", None).await,
        VmCmd::Stop { name, timeout } => {
            action(
                c,
                g,
                &name,
                "shutdown",
                Some(serde_json::to_value(ShutdownParams {
                    timeout_secs: Some(timeout),
                })?),
            )
            .await
        }
        VmCmd::Kill { name } => action(c, g, &name, "stop", None).await,
        VmCmd::Reboot { name, timeout } => {
            action(
                c,
                g,
                &name,
                "reboot",
                Some(serde_json::to_value(ShutdownParams {
                    timeout_secs: Some(timeout),
                })?),
            )
            .await
        }
        VmCmd::Pause { name } => action(c, g, &name, "pause", None).await,
        VmCmd::Disk(d) => disk(c, g, d).await,
        VmCmd::Nic(NicCmd::Attach { name, nic }) => {
            let body = specs::nic_json(&nic)?;
            let v: Value = c
                .request(
                    Method::POST,
                    &format!("/api/v1/vms/{name}/nics"),
                    Some(&body),
                )
                .await?;
            if g.json {
                return print_json(&v);
            }
            println!("{name}: net{} attached", v["index"]);
            Ok(())
        }
        VmCmd::Nic(NicCmd::Detach { name, index }) => {
            let _: Value = c
                .request(
                    Method::DELETE,
                    &format!("/api/v1/vms/{name}/nics/{index}"),
                    None,
                )
                .await?;
            println!("{name}: net{index} detached");
            Ok(())
        }
        VmCmd::Nic(NicCmd::Link { name, index, state }) => {
            let mut cur: Vm = c.get(&format!("/api/v1/vms/{name}")).await?;
            let count = cur.spec.nics.len();
            let n = cur
                .spec
                .nics
                .get_mut(index)
                .with_context(|| format!("{name} has no NIC {index} (it has {count})"))?;
            n.link_down = state == "down";
            let _: Vm = c
                .request(
                    Method::PUT,
                    &format!("/api/v1/vms/{name}"),
                    Some(&serde_json::to_value(&cur.spec)?),
                )
                .await?;
            println!("{name}: net{index} link {state}");
            Ok(())
        }
        VmCmd::Cdrom { name, index, media } => {
            let body = if media == "eject" {
                json!({})
            } else {
                specs::cdrom_json(&media)?
            };
            let v: Vm = c
                .request(
                    Method::PUT,
                    &format!("/api/v1/vms/{name}/cdroms/{index}"),
                    Some(&body),
                )
                .await?;
            if g.json {
                return print_json(&v);
            }
            println!(
                "{name}: cdrom{index} {}",
                if media == "eject" {
                    "ejected".to_string()
                } else {
                    format!("holds {media}")
                }
            );
            Ok(())
        }
        VmCmd::Suspend { name } => action(c, g, &name, "suspend", None).await,
        VmCmd::Move { name, to } => {
            let t: TaskAccepted = c
                .send(
                    Method::POST,
                    &format!("/api/v1/vms/{name}/move"),
                    &MoveRequest { to: to.clone() },
                )
                .await?;
            let done = c.wait_task(t, g.json).await?;
            if g.json {
                return print_json(&done);
            }
            println!("{name} now on {to}");
            Ok(())
        }
        VmCmd::MoveDisk {
            name,
            disk,
            to_pool,
            abort,
            bandwidth,
        } => {
            let index: usize = disk
                .strip_prefix("disk")
                .unwrap_or(&disk)
                .parse()
                .with_context(|| format!("disk {disk:?}: an index or diskN"))?;
            let path = format!("/api/v1/vms/{name}/disks/{index}/move");
            if abort {
                c.request::<Value>(Method::DELETE, &path, None).await?;
                println!("{name}: move of disk{index} aborted");
                return Ok(());
            }
            let body = DiskMove {
                pool: to_pool
                    .clone()
                    .ok_or_else(|| anyhow::anyhow!("give --to-pool (or --abort)"))?,
                bandwidth_mib: bandwidth,
            };
            let t: TaskAccepted = c.send(Method::POST, &path, &body).await?;
            let done = c.wait_task(t, g.json).await?;
            if g.json {
                return print_json(&done);
            }
            println!("{name}: disk{index} now on {}", to_pool.unwrap_or_default());
            Ok(())
        }
        VmCmd::Migrate {
            name,
            to,
            with_storage,
            target_pool,
            downtime,
            bandwidth,
            no_postcopy,
        } => {
            let body = MigrateRequest {
                to: to.clone(),
                with_storage,
                target_pool,
                downtime_limit_ms: downtime,
                max_bandwidth_mib: bandwidth,
                allow_postcopy: no_postcopy.then_some(false),
            };
            let t: TaskAccepted = c
                .send(Method::POST, &format!("/api/v1/vms/{name}/migrate"), &body)
                .await?;
            let done = c.wait_task(t, g.json).await?;
            let report: MigrationReport = done
                .result
                .clone()
                .map(serde_json::from_value)
                .transpose()?
                .context("the migration task gave no report")?;
            if g.json {
                return print_json(&report);
            }
            println!(
                "{name} now runs on {}: {} ms total, QEMU downtime {} ms, {} of RAM sent in {} passes{}",
                report.to,
                report.total_ms,
                report.downtime_ms,
                ByteSize(report.ram_transferred_bytes),
                report.passes,
                if report.disk_transferred_bytes > 0 {
                    format!(", {} of disk", ByteSize(report.disk_transferred_bytes))
                } else {
                    String::new()
                }
            );
            for s in &report.policy_steps {
                println!("  policy: {s}");
            }
            Ok(())
        }
        VmCmd::Snapshot {
            name,
            snapshot,
            with_memory,
            description,
        } => {
            let body = SnapshotCreate {
                name: snapshot,
                with_memory,
                description,
            };
            action(c, g, &name, "snapshots", Some(serde_json::to_value(body)?)).await
        }
        VmCmd::Revert { name, snapshot } => {
            action(c, g, &name, &format!("snapshots/{snapshot}/revert"), None).await
        }
        VmCmd::SnapshotDelete { name, snapshot } => {
            let t: TaskAccepted = c
                .request(
                    Method::DELETE,
                    &format!("/api/v1/vms/{name}/snapshots/{snapshot}"),
                    None,
                )
                .await?;
            c.wait_task(t, g.json).await?;
            if !g.json {
                println!("snapshot {snapshot} of {name} deleted");
            }
            Ok(())
        }
        VmCmd::Snapshots { name } => {
            let l: ferry_types::SnapshotList =
                c.get(&format!("/api/v1/vms/{name}/snapshots")).await?;
            if g.json {
                return print_json(&l);
            }
            print_tree(&l, None, 0);
            if l.current.is_none() {
                println!("(no snapshot yet)");
            }
            Ok(())
        }
        VmCmd::Clone {
            name,
            new_name,
            linked,
        } => {
            let body = CloneRequest {
                name: new_name.clone(),
                linked,
            };
            let t: TaskAccepted = c
                .send(Method::POST, &format!("/api/v1/vms/{name}/clone"), &body)
                .await?;
            c.wait_task(t, g.json).await?;
            let v: Vm = c.get(&format!("/api/v1/vms/{new_name}")).await?;
            if g.json {
                return print_json(&v);
            }
            println!(
                "{} clone {new_name} of {name} (id {})",
                if linked { "linked" } else { "full" },
                v.id
            );
            Ok(())
        }
        VmCmd::Template { name } => {
            let v: Vm = c
                .request(Method::POST, &format!("/api/v1/vms/{name}/template"), None)
                .await?;
            if g.json {
                return print_json(&v);
            }
            println!("{name} is now a template");
            Ok(())
        }
        VmCmd::Resume { name } => action(c, g, &name, "resume", None).await,
        VmCmd::Delete {
            name,
            force,
            keep_disks,
        } => {
            let _: Value = c
                .request(
                    Method::DELETE,
                    &format!("/api/v1/vms/{name}?force={force}&keep_disks={keep_disks}"),
                    None,
                )
                .await?;
            if !g.json {
                println!("VM {name} deleted");
            }
            Ok(())
        }
        VmCmd::ImportOva {
            file,
            name,
            pool,
            bridge,
        } => {
            // a relative path means this machine's file
            let source = std::fs::canonicalize(&file)
                .map(|p| p.display().to_string())
                .unwrap_or(file);
            let body = ferry_types::OvaImport {
                source,
                name: name.clone(),
                bridge,
            };
            let t: TaskAccepted = c
                .send(
                    Method::POST,
                    &format!("/api/v1/pools/{pool}/import-ova"),
                    &body,
                )
                .await?;
            let task = c.wait_task(t, g.json).await?;
            if g.json {
                return print_json(&task.result);
            }
            println!("VM {name} imported");
            #[derive(serde::Deserialize)]
            struct Imported {
                unmapped: Vec<String>,
            }
            let r: Imported = serde_json::from_value(task.result.unwrap_or_default())
                .context("the import task's result")?;
            for u in r.unmapped {
                println!("not mapped: {u}");
            }
            Ok(())
        }
        VmCmd::Agent { name } => {
            let info: ferry_types::GuestInfo = c.get(&format!("/api/v1/vms/{name}/agent")).await?;
            if g.json {
                return print_json(&info);
            }
            let or = |s: &Option<String>| s.clone().unwrap_or_else(|| "-".into());
            println!("hostname: {}", or(&info.hostname));
            if let Some(os) = &info.os {
                println!(
                    "os:       {} (kernel {}, {})",
                    or(&os.pretty_name),
                    or(&os.kernel_release),
                    or(&os.machine)
                );
            }
            println!("agent:    {}", or(&info.agent_version));
            if let Some(f) = &info.fsfreeze {
                println!("fsfreeze: {f}");
            }
            for i in &info.interfaces {
                println!(
                    "{:<12} {:<18} {}",
                    i.name,
                    or(&i.mac),
                    i.addresses.join(" ")
                );
            }
            Ok(())
        }
        VmCmd::Console { name, history } => {
            if history {
                print!(
                    "{}",
                    c.get_text(&format!("/api/v1/vms/{name}/console/history"))
                        .await?
                );
                return Ok(());
            }
            console::attach(c, &name).await
        }
    }
}

pub(crate) async fn disk(c: &Client, g: &Global, cmd: DiskCmd) -> Result<()> {
    match cmd {
        DiskCmd::Attach { name, disk } => {
            let body = specs::disk_json(&disk)?;
            let v: Value = c
                .request(
                    Method::POST,
                    &format!("/api/v1/vms/{name}/disks"),
                    Some(&body),
                )
                .await?;
            if g.json {
                return print_json(&v);
            }
            println!("{name}: disk{} attached", v["index"]);
            Ok(())
        }
        DiskCmd::Detach { name, index } => {
            let _: Value = c
                .request(
                    Method::DELETE,
                    &format!("/api/v1/vms/{name}/disks/{index}"),
                    None,
                )
                .await?;
            println!("{name}: disk{index} detached");
            Ok(())
        }
        DiskCmd::Resize { name, index, size } => {
            let vm: Vm = c.get(&format!("/api/v1/vms/{name}")).await?;
            let d = vm
                .spec
                .disks
                .get(index)
                .ok_or_else(|| anyhow::anyhow!("{name} has no disk{index}"))?;
            let vol = d.volume.clone().unwrap_or_default();
            let v: Volume = c
                .request(
                    Method::POST,
                    &format!("/api/v1/pools/{}/volumes/{vol}/resize", d.pool),
                    Some(&serde_json::to_value(VolumeResize { size })?),
                )
                .await?;
            if g.json {
                return print_json(&v);
            }
            println!("{name}: disk{index} is now {}", ByteSize(v.virtual_bytes));
            Ok(())
        }
    }
}

pub(crate) fn print_tree(l: &ferry_types::SnapshotList, parent: Option<&str>, depth: usize) {
    for s in l.snapshots.iter().filter(|s| s.parent.as_deref() == parent) {
        let here = if l.current.as_deref() == Some(s.name.as_str()) {
            "  <- current"
        } else {
            ""
        };
        let mem = if s.with_memory { " (with memory)" } else { "" };
        println!("{}{}{mem}{here}", "  ".repeat(depth), s.name);
        print_tree(l, Some(&s.name), depth + 1);
    }
}
