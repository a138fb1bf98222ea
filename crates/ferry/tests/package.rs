//! The Debian package on a real Debian 12 host with systemd and cgroup v2 (this machine
//! has neither as PID 1): the guest `scripts/build-debian-guest.sh` builds runs in the
//! lab's daemon, with a second disk holding two packages of this build (versions N and
//! N+1, `scripts/package.sh`) and `package-run.sh`, which the guest runs at each boot.
//! Inside: install N (units enabled and started), a VM in a resource pool (its QEMU in
//! `ferry.slice/ferry-pl.slice/ferry-vm-ID.scope`, the pool's limits in cgroup v2),
//! `systemctl restart ferry` and `systemctl kill -s SIGKILL ferry` (the QEMU pid stays
//! and is re-adopted), the journal's fields, an upgrade to N+1 (the QEMU runs on),
//! `listen` set in `/etc/ferry/ferry.toml`, a cluster of one (the etcd member and the HA
//! watchdog in their scopes outlive a restart of the daemon), a reboot
//! (`ferry-guests.service` shuts the VM down, the boot starts it again), VLANs (two VMs
//! on VLANs 10 and 20 of a VLAN-aware bridge: their taps untagged members of their VLAN
//! alone, a VLAN's broadcasts reaching its VM's tap only; this machine's kernel has no
//! bridge VLAN filtering). Nested under TCG the inner VMs boot no OS: a QEMU that runs
//! is what is checked. Several
//! minutes; its own test binary.

use anyhow::{bail, Context, Result};
use ferry_lab::Lab;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn run(c: &mut Command) -> Result<()> {
    let o = c.output().with_context(|| format!("{c:?}"))?;
    if !o.status.success() {
        bail!(
            "{c:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(())
}

/// Builds the package of this test's binary as `version` into `dir`.
fn package(dir: &Path, version: &str) -> Result<()> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    run(Command::new("bash")
        .arg(repo.join("scripts/package.sh"))
        .env("FERRY_BIN", env!("CARGO_BIN_EXE_ferry"))
        .env("FERRY_DEB_VERSION", version)
        .env("FERRY_DEB_OUT", dir.join(format!("build-{version}")))
        .env("FERRY_DEB_COMPRESS", "gzip"))?;
    let built = dir
        .join(format!("build-{version}"))
        .join(format!("ferry_{version}_amd64.deb"));
    let name = if version.contains('+') {
        "ferry_N1.deb"
    } else {
        "ferry_N.deb"
    };
    std::fs::rename(&built, dir.join("work").join(name))?;
    std::fs::remove_dir_all(dir.join(format!("build-{version}")))?;
    Ok(())
}

/// What the guest wrote to its work disk (`/work/log`, and `phase` = `done` when phase
/// 2 passed), read through a read-only loop mount of the pool's copy, as console lines.
fn work_disk_outcome(lab: &Lab) -> Result<String> {
    let pool: ferry_types::Pool =
        serde_json::from_str(&lab.ferry_ok(&["--json", "pool", "show", "local"])?)?;
    let vol = Path::new(&pool.spec.path).join("work");
    let mnt = tempfile::tempdir_in("/var/tmp")?;
    run(Command::new("mount")
        .args(["-o", "ro,loop,noload"])
        .arg(&vol)
        .arg(mnt.path()))?;
    let phase = std::fs::read_to_string(mnt.path().join("phase")).unwrap_or_default();
    let log = std::fs::read_to_string(mnt.path().join("log")).unwrap_or_default();
    let _ = Command::new("umount").arg(mnt.path()).status();
    let verdict = if phase.trim() == "done" && !log.contains("FERRY-PKG-FAIL") {
        "FERRY-PKG-OK (from the work disk)"
    } else {
        "FERRY-PKG-FAIL: the guest stopped before phase 2 was done (from the work disk)"
    };
    Ok(format!("{log}\n{verdict}\n"))
}

#[test]
fn the_package_runs_under_systemd_restarts_upgrades_and_reboots_without_touching_vms() -> Result<()>
{
    let img = ferry_lab::guest_dir().join("debian");
    for f in ["disk.qcow2", "vmlinuz", "initrd.img"] {
        if !img.join(f).exists() {
            bail!(
                "{} missing: scripts/setup.sh builds the Debian guest (scripts/build-debian-guest.sh)",
                img.join(f).display()
            );
        }
    }
    let tmp = tempfile::tempdir_in("/var/tmp")?;
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work)?;
    let (n, n1) = ("0.1.0", "0.1.0+1");
    package(tmp.path(), n)?;
    package(tmp.path(), n1)?;
    std::fs::write(work.join("version_n1"), n1)?;
    let script = work.join("run.sh");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/package-run.sh"),
        &script,
    )?;
    run(Command::new("chmod").arg("755").arg(&script))?;
    let work_img = tmp.path().join("work.raw");
    run(Command::new("mkfs.ext4")
        .args(["-q", "-L", "work", "-d"])
        .arg(&work)
        .arg(&work_img)
        .arg("1G"))?;

    let mut lab = Lab::new(env!("CARGO_BIN_EXE_ferry"))?;
    lab.start_daemon()?;
    let s = |p: &Path| p.display().to_string();
    lab.ferry_ok(&[
        "volume",
        "import",
        "local",
        "debroot",
        "--source",
        &s(&img.join("disk.qcow2")),
    ])?;
    lab.ferry_ok(&[
        "volume",
        "import",
        "local",
        "work",
        "--source",
        &s(&work_img),
    ])?;
    lab.ferry_ok(&[
        "vm",
        "create",
        "debhost",
        "--cpus",
        "2",
        "--memory",
        "2G",
        "--disk",
        "bus=virtio,volume=debroot",
        "--disk",
        "bus=virtio,volume=work",
        "--kernel",
        &s(&img.join("vmlinuz")),
        "--initrd",
        &s(&img.join("initrd.img")),
        "--append",
        "root=LABEL=root console=ttyS0 rw quiet",
    ])?;
    lab.ferry_ok(&["vm", "start", "debhost"])?;
    let t = Instant::now();
    let mut last = String::new();
    while t.elapsed() < Duration::from_secs(25 * 60) {
        if let Ok(o) = lab.ferry(&["vm", "console", "debhost", "--history"]) {
            last = String::from_utf8_lossy(&o.stdout).into_owned();
            if last.contains("FERRY-PKG-OK") || last.contains("FERRY-PKG-FAIL") {
                break;
            }
        }
        // The guest powers off when it is done: what it found is on its work disk
        // too (its console's history may not reach past the reboot).
        let stopped = lab
            .ferry(&["--json", "vm", "show", "debhost"])
            .ok()
            .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
            .is_some_and(|v| v["state"] == "stopped");
        if stopped {
            last = work_disk_outcome(&lab)?;
            break;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    let lines: Vec<&str> = last
        .lines()
        .filter(|l| l.contains("FERRY-PKG") || l.contains("journal:"))
        .collect();
    println!("{}", lines.join("\n"));
    if !last.contains("FERRY-PKG-OK") {
        bail!(
            "the package test in the Debian guest did not pass within {:?}:\n{last}",
            t.elapsed()
        );
    }
    println!("package test in the guest: {:?}", t.elapsed());
    Ok(())
}
