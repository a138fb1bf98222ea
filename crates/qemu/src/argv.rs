//! The QEMU command line for a VM, as data. Block devices, devices and netdevs use
//! QEMU's JSON syntax, so paths with commas need no escaping.

use crate::accel::Accel;
use crate::process::RunPaths;
use ferry_types::{
    CdromBus, DiskBus, DiskFormat, DiskSpec, Firmware, Machine, NicModel, NicSpec, VmSpec,
};
use serde_json::{json, Value};
use std::ffi::OsString;
use std::path::PathBuf;

/// A disk with its volume file located.
#[derive(Debug, Clone)]
pub struct ResolvedDisk {
    pub spec: DiskSpec,
    pub path: PathBuf,
    /// The format ferry recorded for the volume (never probed from the file).
    pub format: DiskFormat,
    /// The files under a qcow2 overlay that ferry made, nearest first (empty: none; QEMU
    /// is told `"backing": null` and never reads a backing file named in the header).
    pub backing: Vec<BackingFile>,
    /// Served over NBD: `path` is the unix socket, this the export name (replicated
    /// volumes).
    pub nbd_export: Option<String>,
    /// Live-restore: the qcow2 volume's backing is this backup disk served by the
    /// daemon over NBD, streamed into the volume while the guest runs.
    pub restore_from: Option<NbdSource>,
}

/// An export of the daemon's NBD server on a unix socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdSource {
    pub socket: PathBuf,
    pub export: String,
}

/// How long QEMU holds requests to a restore source whose server went away (the daemon
/// restarting) before they fail — and the guest pauses (`rerror`/`werror=stop`).
pub const RESTORE_RECONNECT_DELAY: u64 = 10;

/// QEMU's seccomp filter for every VM.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// A file of a backing chain, with the format ferry recorded for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingFile {
    pub path: PathBuf,
    pub format: DiskFormat,
}

/// A format node over `file` (a protocol node's name or an inline definition) with its
/// backing chain stated: a qcow2 node names each backing file with its recorded format,
/// read-only, ending in `"backing": null`; a raw node has none. So what a file's header
/// says about backing files is never followed.
pub fn format_node(format: DiskFormat, file: Value, backing: &[BackingFile]) -> Value {
    let mut node = json!({"driver": format.as_str(), "file": file});
    if format == DiskFormat::Qcow2 {
        node["backing"] = match backing.split_first() {
            None => Value::Null,
            Some((b, rest)) => {
                let mut n = format_node(
                    b.format,
                    json!({"driver": "file", "filename": b.path, "read-only": true}),
                    rest,
                );
                n["read-only"] = json!(true);
                n
            }
        };
    }
    node
}

#[derive(Debug, Clone)]
pub struct ResolvedCdrom {
    pub bus: CdromBus,
    pub iso: Option<PathBuf>,
}

/// Everything needed to start one VM.
#[derive(Debug, Clone)]
pub struct LaunchPlan {
    pub spec: VmSpec,
    pub accel: Accel,
    pub run: RunPaths,
    pub disks: Vec<ResolvedDisk>,
    pub cdroms: Vec<ResolvedCdrom>,
    /// Tap names, one per NIC, with the MAC from the spec.
    pub taps: Vec<String>,
    /// (code, vars) for UEFI.
    pub ovmf: Option<(PathBuf, PathBuf)>,
    /// A VM with a TPM: swtpm (started by the launcher, see `tpm_companion`) serves
    /// it on `run.tpm`, keeping its state in this folder.
    pub tpm: Option<PathBuf>,
    /// Start with the vCPUs stopped (`-S`).
    pub paused: bool,
    /// Wait for incoming migration state (`-incoming defer`).
    pub incoming: bool,
    /// NICs get open descriptors instead of tap names: NIC k's tap is fd
    /// `nic_fd(k)`, its vhost-net device (KVM) `nic_fd(k) + 1` (see
    /// `process::spawn_detached`, which places them). QEMU running unprivileged cannot
    /// open `/dev/net/tun` or `/dev/vhost-net` itself.
    pub nic_fds: bool,
    /// The cloud-init seed disk (`run.cloud_init`), written: attached read-only.
    pub cloud_init: bool,
    /// NICs on a hub inside QEMU instead of taps (a boot check of a backup): the guest
    /// sees its NICs with their MACs and links up, and nothing it sends leaves QEMU.
    pub isolated: bool,
}

/// The descriptor of NIC `k`'s tap in a QEMU started with [`LaunchPlan::nic_fds`]
/// (descriptor 3 carries QEMU's output while it starts).
pub fn nic_fd(k: usize) -> i32 {
    // A VM has at most a few dozen NICs.
    4 + 2 * i32::try_from(k).unwrap_or(i32::MAX / 4)
}

struct Args(Vec<OsString>);

impl Args {
    fn push(&mut self, flag: &str, v: impl Into<OsString>) {
        self.0.push(flag.into());
        self.0.push(v.into());
    }
    fn json(&mut self, flag: &str, v: Value) {
        self.push(flag, v.to_string());
    }
}

/// Where IDE, SATA and SCSI devices go.
#[derive(Default)]
struct Slots {
    ide: usize,
    sata: usize,
    scsi: usize,
}

fn bus_placement(machine: Machine, slots: &mut Slots, bus: &str) -> Value {
    match bus {
        "ide" => {
            let k = slots.ide;
            slots.ide += 1;
            json!({"bus": format!("ide.{}", k / 2), "unit": k % 2})
        }
        "sata" => {
            let k = slots.sata;
            slots.sata += 1;
            let ctl = if machine == Machine::Q35 {
                "ide"
            } else {
                "ahci0"
            };
            json!({"bus": format!("{ctl}.{k}")})
        }
        _ => {
            let k = slots.scsi;
            slots.scsi += 1;
            json!({"bus": "scsi0.0", "channel": 0, "scsi-id": k, "lun": 0})
        }
    }
}

fn merge(mut a: Value, b: Value) -> Value {
    if let (Some(a), Value::Object(b)) = (a.as_object_mut(), b) {
        a.extend(b);
    }
    a
}

/// NIC `k`'s device (on netdev `net{k}`): its model, MAC and, on virtio, the MTU the
/// guest is told.
pub fn nic_device(n: &NicSpec, k: usize) -> Value {
    let id = format!("net{k}");
    let mut dev = json!({"driver": n.model.qemu_driver(), "netdev": id, "id": id, "mac": n.mac});
    if let (Some(mtu), NicModel::Virtio) = (n.mtu, n.model) {
        dev["host_mtu"] = json!(mtu);
    }
    dev
}

/// swtpm's command line for a VM with a TPM (run by QEMU's launcher just before it
/// becomes QEMU, as the VM's user, in its place): TPM 2.0, its state in `dir`, its
/// control socket `run.tpm`, ending when QEMU leaves it; it forks once it listens.
pub fn tpm_companion(swtpm: &str, dir: &std::path::Path, run: &RunPaths) -> Vec<OsString> {
    let mut a = vec![OsString::from(swtpm), "socket".into(), "--tpm2".into()];
    let kv = |k: &str, v: String| [OsString::from(k), OsString::from(v)];
    a.extend(kv("--tpmstate", format!("dir={},mode=0600", dir.display())));
    a.extend(kv(
        "--ctrl",
        format!("type=unixio,path={},mode=0600", run.tpm.display()),
    ));
    a.extend(kv("--pid", format!("file={}", run.swtpm_pid.display())));
    a.extend(kv(
        "--log",
        format!("file={},level=1", run.sockets.join("swtpm.log").display()),
    ));
    a.extend(["--terminate".into(), "--daemon".into()]);
    a
}

/// The full argv (without the binary).
pub fn build_argv(p: &LaunchPlan) -> Vec<OsString> {
    let s = &p.spec;
    let mut a = Args(vec![]);
    a.push("-name", format!("guest={},debug-threads=on", s.name));
    let mut mach = s.machine_type();
    if p.ovmf.is_some() && s.firmware == Firmware::Uefi {
        mach.push_str(",pflash0=pflash0,pflash1=pflash1");
    }
    if s.secure_boot {
        // the Secure Boot firmware keeps its variables in SMM: only it writes them
        mach.push_str(",smm=on");
    }
    a.push("-machine", mach);
    if s.secure_boot {
        a.push("-global", "driver=cfi.pflash01,property=secure,value=on");
    }
    match p.accel {
        Accel::Kvm => a.push("-accel", "kvm"),
        Accel::Tcg => a.push("-accel", "tcg,thread=single"),
    }
    let pc = s.arch().is_pc();
    match (&s.cpu, p.accel) {
        // other architectures' models are QEMU's own, as they are
        (Some(m), _) if !pc => a.push("-cpu", m.clone()),
        (Some(m), _) => a.push("-cpu", ferry_types::cpu::qemu_cpu_arg(m)),
        // defined before CPU models: as it always ran
        (None, Accel::Kvm) => a.push("-cpu", "host"),
        (None, Accel::Tcg) => {}
    }
    a.push("-smp", s.cpus.to_string());
    a.push("-m", format!("{}M", s.memory_mib));
    a.0.extend(["-nodefaults", "-no-user-config"].map(OsString::from));
    // seccomp: no obsolete system calls, no privilege changes, no new processes (so no
    // `exec:` migration and no helper programs), no scheduler or CPU-affinity changes.
    // ferry detaches the process itself (`process::spawn_detached`): QEMU's own
    // -daemonize forks and calls setsid, which this filter forbids.
    a.push("-sandbox", SANDBOX);
    a.push(
        "-qmp",
        format!("unix:{},server=on,wait=off", p.run.qmp.display()),
    );
    a.push(
        "-chardev",
        format!(
            "socket,id=serial0,path={},server=on,wait=off,logfile={},logappend=on",
            p.run.serial.display(),
            p.run.serial_log.display()
        ),
    );
    a.push("-serial", "chardev:serial0");
    if pc {
        a.push("-vga", "std");
    } else {
        // virt has no VGA: a virtio GPU for the VNC console
        a.json(
            "-device",
            json!({"driver": "virtio-gpu-pci", "id": "video0"}),
        );
    }
    a.push("-display", "none");
    a.push("-vnc", format!("unix:{}", p.run.vnc.display()));
    if p.paused {
        a.0.push("-S".into());
    }
    if p.incoming {
        a.push("-incoming", "defer");
    }

    if let (Some((code, vars)), Firmware::Uefi) = (&p.ovmf, s.firmware) {
        a.json(
            "-blockdev",
            json!({"driver": "file", "filename": code, "node-name": "pflash0", "read-only": true}),
        );
        a.json(
            "-blockdev",
            json!({"driver": "file", "filename": vars, "node-name": "pflash1"}),
        );
    }
    if p.tpm.is_some() && s.tpm {
        a.push(
            "-chardev",
            format!("socket,id=tpm0chr,path={}", p.run.tpm.display()),
        );
        a.push("-tpmdev", "emulator,id=tpm0,chardev=tpm0chr");
        a.json(
            "-device",
            json!({"driver": "tpm-tis", "tpmdev": "tpm0", "id": "tpm0dev"}),
        );
    }
    if let Some(k) = &s.direct_boot {
        a.push("-kernel", k.kernel.clone());
        if let Some(i) = &k.initrd {
            a.push("-initrd", i.clone());
        }
        if !k.cmdline.is_empty() {
            a.push("-append", k.cmdline.clone());
        }
    }

    let order = s.effective_boot_order();
    let bootindex = |id: &str| -> Option<usize> {
        if s.direct_boot.is_some() {
            None
        } else {
            order.iter().position(|o| o == id)
        }
    };
    let uses = |bus: &str| {
        s.disks
            .iter()
            .any(|d| format!("{:?}", d.bus).eq_ignore_ascii_case(bus))
            || s.cdroms
                .iter()
                .any(|c| format!("{:?}", c.bus).eq_ignore_ascii_case(bus))
    };
    if uses("scsi") {
        a.json(
            "-device",
            json!({"driver": "virtio-scsi-pci", "id": "scsi0"}),
        );
    }
    if uses("sata") && s.machine == Machine::Pc {
        a.json("-device", json!({"driver": "ahci", "id": "ahci0"}));
    }

    let mut slots = Slots::default();
    for (i, d) in p.disks.iter().enumerate() {
        let (direct, no_flush, wce) = d.spec.cache.qemu_flags();
        let cache = json!({"direct": direct, "no-flush": no_flush});
        let ro = d.spec.readonly;
        let proto = match &d.nbd_export {
            // QEMU reconnects for a while if the serving daemon restarts.
            Some(export) => json!({"driver": "nbd", "export": export, "reconnect-delay": 20,
                   "server": {"type": "unix", "path": d.path},
                   "node-name": format!("file-disk{i}"),
                   "cache": cache, "read-only": ro, "discard": "unmap"}),
            None => {
                json!({"driver": "file", "filename": d.path, "node-name": format!("file-disk{i}"),
                   "cache": cache, "read-only": ro, "discard": "unmap"})
            }
        };
        a.json("-blockdev", proto);
        let mut node = merge(
            format_node(d.format, json!(format!("file-disk{i}")), &d.backing),
            json!({"node-name": format!("disk{i}"), "cache": cache, "read-only": ro, "discard": "unmap"}),
        );
        if let (Some(src), DiskFormat::Qcow2) = (&d.restore_from, d.format) {
            node["backing"] = json!({"driver": "nbd", "node-name": format!("restore-disk{i}"),
                "server": {"type": "unix", "path": src.socket}, "export": src.export,
                "reconnect-delay": RESTORE_RECONNECT_DELAY, "read-only": true});
        }
        a.json("-blockdev", node);
        let id = format!("disk{i}");
        let mut dev = match d.spec.bus {
            DiskBus::Virtio => json!({"driver": "virtio-blk-pci"}),
            DiskBus::Scsi => merge(
                json!({"driver": "scsi-hd"}),
                bus_placement(s.machine, &mut slots, "scsi"),
            ),
            DiskBus::Sata => merge(
                json!({"driver": "ide-hd"}),
                bus_placement(s.machine, &mut slots, "sata"),
            ),
            DiskBus::Ide => merge(
                json!({"driver": "ide-hd"}),
                bus_placement(s.machine, &mut slots, "ide"),
            ),
        };
        dev = merge(
            dev,
            json!({"drive": id, "id": id, "write-cache": if wce { "on" } else { "off" }}),
        );
        if d.restore_from.is_some() {
            // The backup unreachable: the guest pauses until it is back, its I/O kept.
            dev = merge(dev, json!({"rerror": "stop", "werror": "stop"}));
        }
        if let Some(b) = bootindex(&id) {
            dev["bootindex"] = json!(b);
        }
        a.json("-device", dev);
    }
    for (j, c) in p.cdroms.iter().enumerate() {
        let id = format!("cdrom{j}");
        let busname = match c.bus {
            CdromBus::Ide => "ide",
            CdromBus::Sata => "sata",
            CdromBus::Scsi => "scsi",
        };
        let driver = if c.bus == CdromBus::Scsi {
            "scsi-cd"
        } else {
            "ide-cd"
        };
        let mut dev = merge(
            json!({"driver": driver, "id": id}),
            bus_placement(s.machine, &mut slots, busname),
        );
        if let Some(iso) = &c.iso {
            a.json(
                "-blockdev",
                json!({"driver": "file", "filename": iso, "node-name": format!("file-{id}"), "read-only": true}),
            );
            a.json(
                "-blockdev",
                json!({"driver": "raw", "file": format!("file-{id}"), "node-name": format!("media-{id}"), "read-only": true}),
            );
            dev["drive"] = json!(format!("media-{id}"));
        }
        if let Some(b) = bootindex(&id) {
            dev["bootindex"] = json!(b);
        }
        a.json("-device", dev);
    }
    let no_taps = vec![String::new(); if p.isolated { s.nics.len() } else { 0 }];
    let taps = if p.isolated { &no_taps } else { &p.taps };
    for (k, (n, tap)) in s.nics.iter().zip(taps).enumerate() {
        let id = format!("net{k}");
        let kvm = p.accel == Accel::Kvm;
        let netdev = if p.isolated {
            json!({"type": "hubport", "id": id, "hubid": 0})
        } else if p.nic_fds {
            let mut n = json!({"type": "tap", "id": id, "fd": nic_fd(k).to_string(), "vhost": kvm});
            if kvm {
                n["vhostfd"] = json!((nic_fd(k) + 1).to_string());
            }
            n
        } else {
            json!({"type": "tap", "id": id, "ifname": tap, "script": "no", "downscript": "no",
                   "vhost": kvm})
        };
        a.json("-netdev", netdev);
        let mut dev = nic_device(n, k);
        if s.direct_boot.is_some() {
            // No PXE needed: skip loading the option ROM.
            dev["romfile"] = json!("");
        }
        if let Some(b) = bootindex(&id) {
            dev["bootindex"] = json!(b);
        }
        a.json("-device", dev);
    }
    // After the disks and NICs: turning one of these on or off never moves their PCI
    // slots (the guest's NIC names follow them).
    if s.tablet == Some(true) {
        a.json("-device", json!({"driver": "qemu-xhci", "id": "xhci"}));
        a.json(
            "-device",
            json!({"driver": "usb-tablet", "id": "tablet0", "bus": "xhci.0"}),
        );
    }
    if s.rng == Some(true) {
        a.json(
            "-object",
            json!({"qom-type": "rng-random", "id": "rng0", "filename": "/dev/urandom"}),
        );
        a.json(
            "-device",
            json!({"driver": "virtio-rng-pci", "id": "rng0dev", "rng": "rng0",
                   "max-bytes": 1024, "period": 1000}),
        );
    }
    if s.balloon == Some(true) {
        a.json(
            "-device",
            json!({"driver": "virtio-balloon-pci", "id": "balloon0"}),
        );
    }
    if s.agent {
        a.push(
            "-chardev",
            format!(
                "socket,id=qga0,path={},server=on,wait=off",
                p.run.qga.display()
            ),
        );
        a.json(
            "-device",
            json!({"driver": "virtio-serial-pci", "id": "vserial0"}),
        );
        a.json(
            "-device",
            json!({"driver": "virtserialport", "id": "qga0port", "bus": "vserial0.0",
                   "chardev": "qga0", "name": "org.qemu.guest_agent.0"}),
        );
    }
    if p.cloud_init {
        // virtio on every machine type and architecture; never a boot device.
        a.json(
            "-blockdev",
            json!({"driver": "file", "filename": p.run.cloud_init, "node-name": "file-cidata",
                   "read-only": true}),
        );
        a.json(
            "-blockdev",
            json!({"driver": "raw", "file": "file-cidata", "node-name": "cidata",
                   "read-only": true}),
        );
        a.json(
            "-device",
            json!({"driver": "virtio-blk-pci", "id": "cidata0", "drive": "cidata"}),
        );
    }
    a.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_types::DiskFormat;

    fn plan() -> LaunchPlan {
        let spec: VmSpec = serde_json::from_value(json!({
            "name": "web1", "cpus": 2, "memory_mib": 256,
            "disks": [{"bus": "virtio", "volume": "a"}, {"bus": "scsi", "volume": "b"},
                      {"bus": "sata", "volume": "c"}, {"bus": "ide", "volume": "d", "cache": "writeback"}],
            "cdroms": [{"bus": "ide", "pool": "local", "volume": "x.iso"}, {}],
            "nics": [{"bridge": "vmbr0", "mac": "52:54:00:00:00:01"}],
            "boot_order": ["cdrom0", "disk0", "net0"]
        }))
        .unwrap();
        let disks = spec
            .disks
            .iter()
            .map(|d| ResolvedDisk {
                spec: d.clone(),
                path: PathBuf::from(format!("/pool/{}", d.volume.clone().unwrap())),
                format: DiskFormat::Qcow2,
                backing: vec![],
                nbd_export: None,
                restore_from: None,
            })
            .collect();
        LaunchPlan {
            accel: Accel::Tcg,
            run: RunPaths::new("/run/ferry/7"),
            disks,
            cdroms: vec![
                ResolvedCdrom {
                    bus: CdromBus::Ide,
                    iso: Some("/pool/x.iso".into()),
                },
                ResolvedCdrom {
                    bus: CdromBus::Ide,
                    iso: None,
                },
            ],
            taps: vec!["tap7i0".into()],
            ovmf: None,
            tpm: None,
            paused: false,
            incoming: false,
            nic_fds: false,
            cloud_init: false,
            isolated: false,
            spec,
        }
    }

    fn devices(argv: &[OsString], flag: &str) -> Vec<Value> {
        argv.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| serde_json::from_str(w[1].to_str().unwrap()).unwrap())
            .collect()
    }

    #[test]
    fn a_tpm_and_secure_boot_reach_qemu() {
        let mut p = plan();
        // a spec with a TPM, without a TPM folder (a backup's boot check): no TPM
        p.spec.tpm = true;
        let argv = build_argv(&p);
        assert!(!argv.iter().any(|a| a == "-tpmdev"));
        p.tpm = Some("/state/vms/7/tpm".into());
        let argv = build_argv(&p);
        let after = |flag: &str| {
            argv.windows(2)
                .filter(|w| w[0] == flag)
                .map(|w| w[1].to_string_lossy().into_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            after("-chardev").last().unwrap(),
            "socket,id=tpm0chr,path=/run/ferry/7/qemu/tpm.sock"
        );
        assert_eq!(after("-tpmdev"), ["emulator,id=tpm0,chardev=tpm0chr"]);
        assert!(devices(&argv, "-device")
            .iter()
            .any(|d| d["driver"] == "tpm-tis" && d["tpmdev"] == "tpm0"));
        assert!(!after("-machine")[0].contains("smm"));
        p.spec.secure_boot = true;
        let argv = build_argv(&p);
        let machine: Vec<_> = argv.windows(2).filter(|w| w[0] == "-machine").collect();
        assert!(machine[0][1].to_string_lossy().ends_with(",smm=on"));
        assert!(argv
            .windows(2)
            .any(|w| w[0] == "-global" && w[1] == "driver=cfi.pflash01,property=secure,value=on"));
        let c = tpm_companion("swtpm", std::path::Path::new("/state/vms/7/tpm"), &p.run);
        let c: Vec<_> = c.iter().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(&c[..3], ["swtpm", "socket", "--tpm2"]);
        assert!(
            c.contains(&"dir=/state/vms/7/tpm,mode=0600".to_string()),
            "{c:?}"
        );
        assert!(c.contains(&"--terminate".to_string()) && c.contains(&"--daemon".to_string()));
    }

    #[test]
    fn argv_places_each_bus_and_boot_order() {
        let argv = build_argv(&plan());
        let dev = devices(&argv, "-device");
        let find = |id: &str| dev.iter().find(|d| d["id"] == id).cloned().unwrap();
        assert_eq!(find("disk0")["driver"], "virtio-blk-pci");
        assert_eq!(find("disk1")["driver"], "scsi-hd");
        assert_eq!(find("disk1")["bus"], "scsi0.0");
        assert_eq!(find("disk2")["bus"], "ahci0.0");
        assert_eq!(find("disk3")["bus"], "ide.0");
        assert_eq!(find("disk3")["unit"], 0);
        assert_eq!(find("cdrom0")["bus"], "ide.0");
        assert_eq!(find("cdrom0")["unit"], 1);
        assert_eq!(find("cdrom1")["bus"], "ide.1");
        assert!(
            find("cdrom1").get("drive").is_none(),
            "empty drive has no medium"
        );
        assert_eq!(find("cdrom0")["bootindex"], 0);
        assert_eq!(find("disk0")["bootindex"], 1);
        assert_eq!(find("net0")["bootindex"], 2);
        assert!(find("disk1").get("bootindex").is_none());
        assert_eq!(find("net0")["mac"], "52:54:00:00:00:01");
        assert!(dev.iter().any(|d| d["driver"] == "virtio-scsi-pci"));
        assert!(dev.iter().any(|d| d["driver"] == "ahci"));
        assert_eq!(find("disk3")["write-cache"], "on");
    }

    /// A live-restoring disk reads what its qcow2 volume lacks from the daemon's NBD
    /// export (read-only, reconnecting) and pauses the guest on an error; the other
    /// disks are untouched.
    #[test]
    fn argv_live_restore_backs_the_volume_with_the_backup() {
        let mut p = plan();
        p.disks[1].restore_from = Some(NbdSource {
            socket: "/run/ferry/7/restore.sock".into(),
            export: "b1/disk1".into(),
        });
        let argv = build_argv(&p);
        let bd = devices(&argv, "-blockdev");
        let d1 = bd.iter().find(|b| b["node-name"] == "disk1").unwrap();
        let b = &d1["backing"];
        assert_eq!(b["driver"], "nbd");
        assert_eq!(b["export"], "b1/disk1");
        assert_eq!(b["server"]["path"], "/run/ferry/7/restore.sock");
        assert_eq!(b["read-only"], true);
        assert!(b["reconnect-delay"].as_u64().is_some_and(|d| d > 0));
        let d0 = bd.iter().find(|b| b["node-name"] == "disk0").unwrap();
        assert!(d0["backing"].is_null());
        let dev = devices(&argv, "-device");
        let find = |id: &str| dev.iter().find(|d| d["id"] == id).cloned().unwrap();
        assert_eq!(find("disk1")["rerror"], "stop");
        assert_eq!(find("disk1")["werror"], "stop");
        assert!(find("disk0").get("rerror").is_none());
    }

    #[test]
    fn isolated_nics_reach_no_tap() {
        let mut p = plan();
        p.isolated = true;
        p.taps = vec![];
        let nd = devices(&build_argv(&p), "-netdev");
        assert_eq!(nd.len(), 1);
        assert_eq!(nd[0]["type"], "hubport");
        assert!(nd[0].get("fd").is_none() && nd[0].get("ifname").is_none());
        let dev = devices(&build_argv(&p), "-device");
        assert!(dev
            .iter()
            .any(|d| d["netdev"] == "net0" && d["mac"] == "52:54:00:00:00:01"));
    }

    #[test]
    fn argv_cache_modes_and_accel() {
        let mut p = plan();
        let argv = build_argv(&p);
        let bd = devices(&argv, "-blockdev");
        let d0 = bd.iter().find(|b| b["node-name"] == "disk0").unwrap();
        assert_eq!(d0["cache"]["direct"], true);
        let d3 = bd.iter().find(|b| b["node-name"] == "disk3").unwrap();
        assert_eq!(d3["cache"]["direct"], false);
        // No backing file is ever taken from an image's header.
        assert!(d0.get("backing").is_some_and(|b| b.is_null()));
        let s: Vec<String> = argv
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(s
            .windows(2)
            .any(|w| w[0] == "-accel" && w[1].starts_with("tcg")));
        assert!(!s.contains(&"-daemonize".to_string()));
        assert!(s.windows(2).any(|w| w[0] == "-sandbox" && w[1] == SANDBOX));
        p.accel = Accel::Kvm;
        let s: Vec<String> = build_argv(&p)
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(s.windows(2).any(|w| w[0] == "-accel" && w[1] == "kvm"));
        // a VM defined before CPU models keeps the host's CPU on KVM
        assert!(s.windows(2).any(|w| w[0] == "-cpu" && w[1] == "host"));
        assert!(s.windows(2).any(|w| w[0] == "-machine" && w[1] == "pc"));
        let nd = devices(&build_argv(&p), "-netdev");
        assert_eq!(nd[0]["vhost"], true);
    }

    #[test]
    fn argv_pins_the_cpu_model_and_the_machine_version() {
        let mut p = plan();
        p.spec.cpu = Some("x86-64-v2-AES".into());
        p.spec.machine = Machine::Q35;
        p.spec.machine_version = Some("9.2".into());
        for accel in [Accel::Tcg, Accel::Kvm] {
            p.accel = accel;
            let s: Vec<String> = build_argv(&p)
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect();
            let cpu: Vec<&String> = s
                .windows(2)
                .filter(|w| w[0] == "-cpu")
                .map(|w| &w[1])
                .collect();
            assert_eq!(cpu.len(), 1, "{s:?}");
            assert!(cpu[0].starts_with("qemu64,+cx16") && cpu[0].ends_with(",enforce"));
            assert!(s
                .windows(2)
                .any(|w| w[0] == "-machine" && w[1] == "pc-q35-9.2"));
        }
    }

    #[test]
    fn argv_q35_sata_uses_builtin_ahci() {
        let mut p = plan();
        p.spec.machine = Machine::Q35;
        p.spec.disks.retain(|d| d.bus != DiskBus::Ide);
        p.disks.retain(|d| d.spec.bus != DiskBus::Ide);
        p.spec.cdroms = vec![];
        p.cdroms = vec![];
        p.spec.boot_order = vec![];
        p.spec.nics = vec![NicSpec {
            model: NicModel::E1000,
            bridge: "b".into(),
            mac: Some("52:54:00:00:00:02".into()),
            vlan: Some(7),
            mtu: None,
            link_down: false,
        }];
        let dev = devices(&build_argv(&p), "-device");
        let sata = dev.iter().find(|d| d["id"] == "disk2").unwrap();
        assert_eq!(sata["bus"], "ide.0");
        assert!(!dev.iter().any(|d| d["driver"] == "ahci"));
        assert!(dev.iter().any(|d| d["driver"] == "e1000"));
    }

    #[test]
    fn tablet_rng_and_balloon_only_when_the_spec_says_so() {
        let mut p = plan();
        let dev = |p: &LaunchPlan| devices(&build_argv(p), "-device");
        let has = |d: &[Value], driver: &str| d.iter().any(|x| x["driver"] == driver);
        // a VM defined before them keeps its hardware as it was
        let d = dev(&p);
        for driver in [
            "usb-tablet",
            "qemu-xhci",
            "virtio-rng-pci",
            "virtio-balloon-pci",
        ] {
            assert!(!has(&d, driver), "{driver}");
        }
        p.spec.tablet = Some(true);
        p.spec.rng = Some(true);
        p.spec.balloon = Some(true);
        let d = dev(&p);
        for driver in [
            "usb-tablet",
            "qemu-xhci",
            "virtio-rng-pci",
            "virtio-balloon-pci",
        ] {
            assert!(has(&d, driver), "{driver}");
        }
        let objects = devices(&build_argv(&p), "-object");
        assert_eq!(objects[0]["filename"], "/dev/urandom");
        p.spec.rng = Some(false);
        assert!(!has(&dev(&p), "virtio-rng-pci"));
    }

    #[test]
    fn an_aarch64_guest_gets_the_virt_board_its_own_cpu_and_a_virtio_gpu() {
        let mut p = plan();
        p.spec.arch = Some(ferry_types::Arch::Aarch64);
        p.spec.machine = Machine::Virt;
        p.spec.machine_version = Some("10.0".into());
        p.spec.cpu = Some("cortex-a72".into());
        p.spec
            .disks
            .retain(|d| matches!(d.bus, DiskBus::Virtio | DiskBus::Scsi));
        p.disks
            .retain(|d| matches!(d.spec.bus, DiskBus::Virtio | DiskBus::Scsi));
        p.spec.cdroms = vec![];
        p.cdroms = vec![];
        p.spec.boot_order = vec![];
        let argv: Vec<String> = build_argv(&p)
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let arg = |f: &str| argv.windows(2).find(|w| w[0] == f).map(|w| w[1].clone());
        assert_eq!(arg("-machine").as_deref(), Some("virt-10.0"));
        assert_eq!(arg("-cpu").as_deref(), Some("cortex-a72"));
        assert_eq!(arg("-vga"), None);
        let dev = devices(&build_argv(&p), "-device");
        assert!(dev.iter().any(|d| d["driver"] == "virtio-gpu-pci"));
        assert!(!dev.iter().any(|d| d["driver"] == "ahci"));
    }

    #[test]
    fn the_agent_channel_and_the_cloud_init_disk_come_last_and_only_when_asked() {
        let mut p = plan();
        let before = devices(&build_argv(&p), "-device");
        assert!(!before
            .iter()
            .any(|d| d["driver"] == "virtserialport" || d["id"] == "cidata0"));
        p.spec.agent = true;
        p.cloud_init = true;
        let argv: Vec<String> = build_argv(&p)
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let dev = devices(&build_argv(&p), "-device");
        // the devices there were keep their order (and so their PCI slots)
        assert_eq!(&dev[..before.len()], &before[..]);
        let port = dev
            .iter()
            .find(|d| d["driver"] == "virtserialport")
            .unwrap();
        assert_eq!(port["name"], "org.qemu.guest_agent.0");
        assert_eq!(port["bus"], "vserial0.0");
        assert!(argv.windows(2).any(|w| w[0] == "-chardev"
            && w[1].starts_with("socket,id=qga0,path=")
            && w[1].contains(&*p.run.qga.to_string_lossy())));
        let seed = dev.iter().find(|d| d["id"] == "cidata0").unwrap();
        assert_eq!(seed["driver"], "virtio-blk-pci");
        assert!(seed.get("bootindex").is_none());
        let nodes = devices(&build_argv(&p), "-blockdev");
        let file = nodes
            .iter()
            .find(|n| n["node-name"] == "file-cidata")
            .unwrap();
        assert_eq!(file["read-only"], true);
        assert_eq!(file["filename"], json!(p.run.cloud_init));
    }

    #[test]
    fn nic_models_and_the_mtu_the_guest_is_told() {
        let mut n: NicSpec =
            serde_json::from_value(json!({"bridge": "b", "mac": "52:54:00:00:00:03",
            "mtu": 9000, "vlan": 10}))
            .unwrap();
        let d = nic_device(&n, 2);
        assert_eq!(d["driver"], "virtio-net-pci");
        assert_eq!(d["id"], "net2");
        assert_eq!(d["host_mtu"], 9000);
        for (m, driver) in [
            (NicModel::E1000e, "e1000e"),
            (NicModel::Rtl8139, "rtl8139"),
            (NicModel::Vmxnet3, "vmxnet3"),
        ] {
            n.model = m;
            let d = nic_device(&n, 0);
            assert_eq!(d["driver"], driver);
            assert!(d.get("host_mtu").is_none());
        }
    }

    #[test]
    fn backing_chain_is_stated_and_raw_has_none() {
        let chain = [
            BackingFile {
                path: "/pool/tmpl".into(),
                format: DiskFormat::Qcow2,
            },
            BackingFile {
                path: "/pool/base".into(),
                format: DiskFormat::Raw,
            },
        ];
        let n = format_node(DiskFormat::Qcow2, json!("file-disk0"), &chain);
        assert_eq!(n["backing"]["driver"], "qcow2");
        assert_eq!(n["backing"]["file"]["filename"], "/pool/tmpl");
        assert_eq!(n["backing"]["read-only"], true);
        assert_eq!(n["backing"]["backing"]["driver"], "raw");
        assert!(n["backing"]["backing"].get("backing").is_none());
        let r = format_node(DiskFormat::Raw, json!("file-disk0"), &[]);
        assert!(r.get("backing").is_none());
    }
}
