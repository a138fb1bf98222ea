//! The command line of a helper VM: the file-restore helper (`ferry backup files`), a
//! small Linux booted directly that attaches a backup's disks read-only from ferry's
//! NBD server and answers on a virtio-serial port. No network, no display, QEMU's
//! sandbox as for every VM.

use crate::accel::Accel;
use crate::argv::SANDBOX;
use crate::process::RunPaths;
use serde_json::json;
use std::ffi::OsString;
use std::path::PathBuf;

/// The name of the port the helper answers on (`ferry_filerestore::proto::PORT_NAME`).
pub const FILE_RESTORE_PORT: &str = "org.ferry.file-restore";

/// What a file-restore helper VM is started with.
#[derive(Debug, Clone)]
pub struct HelperPlan {
    pub name: String,
    pub accel: Accel,
    pub run: RunPaths,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub memory_mib: u32,
    /// The NBD socket serving the disks, exports `disk0`, `disk1`, …
    pub nbd: PathBuf,
    /// How many disks (exports) it attaches.
    pub disks: usize,
    /// The chardev socket of the port (QEMU listens, the daemon connects).
    pub port: PathBuf,
    /// The console's log (made by the daemon, appended to by QEMU).
    pub console_log: PathBuf,
}

/// The helper's argv (without the binary).
pub fn helper_argv(p: &HelperPlan) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec![];
    let mut push = |f: &str, v: String| {
        a.push(f.into());
        a.push(v.into());
    };
    push("-name", format!("{},debug-threads=on", p.name));
    push("-machine", "q35".into());
    match p.accel {
        Accel::Kvm => {
            push("-accel", "kvm".into());
            push("-cpu", "host".into());
        }
        Accel::Tcg => {
            push("-accel", "tcg,thread=single".into());
            // the cloud kernel's crc32c and friends want SSE 4.2
            push("-cpu", "max".into());
        }
    }
    push("-smp", "1".into());
    push("-m", format!("{}M", p.memory_mib));
    push("-sandbox", SANDBOX.into());
    push(
        "-qmp",
        format!("unix:{},server=on,wait=off", p.run.qmp.display()),
    );
    push("-display", "none".into());
    push(
        "-chardev",
        format!("file,id=con,path={},append=on", p.console_log.display()),
    );
    push("-serial", "chardev:con".into());
    push("-kernel", p.kernel.display().to_string());
    push("-initrd", p.initrd.display().to_string());
    push(
        "-append",
        "console=ttyS0 ferry.restore=1 panic=-1 quiet loglevel=4".into(),
    );
    for i in 0..p.disks {
        push(
            "-blockdev",
            json!({
                "driver": "nbd",
                "node-name": format!("d{i}"),
                "server": {"type": "unix", "path": p.nbd},
                "export": format!("disk{i}"),
                "read-only": true,
            })
            .to_string(),
        );
        push(
            "-device",
            json!({
                "driver": "virtio-blk-pci",
                "drive": format!("d{i}"),
                "serial": format!("disk{i}"),
                "id": format!("vd{i}"),
            })
            .to_string(),
        );
    }
    push("-device", "virtio-serial-pci,id=vs".into());
    push(
        "-chardev",
        format!("socket,id=fr,path={},server=on,wait=off", p.port.display()),
    );
    push(
        "-device",
        format!("virtserialport,bus=vs.0,chardev=fr,name={FILE_RESTORE_PORT}"),
    );
    a.extend(["-nodefaults", "-no-user-config", "-no-reboot"].map(OsString::from));
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helper_attaches_read_only_disks_and_nothing_else() {
        let p = HelperPlan {
            name: "ferry-file-restore-0".into(),
            accel: Accel::Tcg,
            run: RunPaths::new("/run/ferry/file-restore/0"),
            kernel: "/k".into(),
            initrd: "/i".into(),
            memory_mib: 256,
            nbd: "/run/ferry/file-restore/0/nbd.sock".into(),
            disks: 2,
            port: "/run/ferry/file-restore/0/qemu/port.sock".into(),
            console_log: "/run/ferry/file-restore/0/console.log".into(),
        };
        let a: Vec<String> = helper_argv(&p)
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        let blockdevs: Vec<serde_json::Value> = a
            .windows(2)
            .filter(|w| w[0] == "-blockdev")
            .map(|w| serde_json::from_str(&w[1]).unwrap())
            .collect();
        assert_eq!(blockdevs.len(), 2);
        assert!(blockdevs.iter().all(|b| b["read-only"] == true));
        assert_eq!(blockdevs[1]["export"], "disk1");
        assert!(a.windows(2).any(|w| w[0] == "-sandbox" && w[1] == SANDBOX));
        assert!(a.iter().any(|s| s == "-nodefaults"));
        assert!(!a.iter().any(|s| s.contains("netdev") || s == "-nic"));
        assert!(a.iter().any(|s| s.contains("name=org.ferry.file-restore")));
    }
}
