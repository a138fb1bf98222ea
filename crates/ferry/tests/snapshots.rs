//! Snapshots with memory, templates and clones, non-persistent disks, suspend/resume —
//! end to end on real QEMU with the test guest.

use anyhow::{Context, Result};
use ferry_lab::Lab;
use std::time::{Duration, Instant};

const BOOT: Duration = Duration::from_secs(90);

fn lab() -> Result<Lab> {
    let mut lab = Lab::new(env!("CARGO_BIN_EXE_ferry"))?;
    lab.start_daemon()?;
    Ok(lab)
}

fn uptime(lab: &Lab, vm: &str) -> Result<f64> {
    let s = lab.guest_sh(vm, "cut -d' ' -f1 /proc/uptime")?;
    Ok(s.trim().parse()?)
}

fn boot(lab: &Lab, vm: &str) -> Result<()> {
    lab.ferry_ok(&["vm", "start", vm])?;
    lab.wait_console(vm, "FERRY-READY", BOOT)?;
    Ok(())
}

#[test]
fn snapshot_with_memory_reverts_processes_and_ram() -> Result<()> {
    let lab = lab()?;
    // Its disks lie on two pools.
    let p2 = lab.dir.join("pool2");
    lab.ferry_ok(&["pool", "create", "p2", "--path", p2.to_str().unwrap()])?;
    lab.create_test_vm(
        "s1",
        "10.77.0.20",
        &[
            "--disk",
            "bus=virtio,size=64M",
            "--disk",
            "bus=scsi,size=32M,pool=p2",
        ],
    )?;
    boot(&lab, "s1")?;
    // A guest process counts in RAM (tmpfs) five times a second.
    lab.guest_sh("s1", "echo before > /tmp/marker; (i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.2; done) & :")?;
    std::thread::sleep(Duration::from_secs(1));
    lab.ferry_ok(&["vm", "snapshot", "s1", "snap1", "--with-memory"])?;
    assert_eq!(
        lab.vm_state("s1")?.0,
        "running",
        "VM not running after a memory snapshot"
    );
    let at_snap: u64 = lab.guest_sh("s1", "cat /tmp/count")?.parse()?;
    lab.guest_sh("s1", "echo after > /tmp/marker")?;
    std::thread::sleep(Duration::from_secs(3));
    let before_revert: u64 = lab.guest_sh("s1", "cat /tmp/count")?.parse()?;
    lab.ferry_ok(&["vm", "revert", "s1", "snap1"])?;
    assert_eq!(lab.vm_state("s1")?.0, "running");
    // The tmpfs marker is back, and the counting process runs on from where it was.
    assert_eq!(lab.guest_sh("s1", "cat /tmp/marker")?, "before");
    let after: u64 = lab.guest_sh("s1", "cat /tmp/count")?.parse()?;
    assert!(
        after < before_revert,
        "counter {after} not rewound (was {before_revert}, {at_snap} at the snapshot)"
    );
    std::thread::sleep(Duration::from_secs(1));
    let later: u64 = lab.guest_sh("s1", "cat /tmp/count")?.parse()?;
    assert!(
        later > after,
        "the guest's process does not run after the revert"
    );

    // A disk-only snapshot while running becomes a child of snap1.
    lab.ferry_ok(&["vm", "snapshot", "s1", "snap2"])?;
    let l = lab.ferry_json(&["vm", "snapshots", "s1"])?;
    assert_eq!(l["current"], "snap2");
    let s2 = l["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "snap2")
        .unwrap()
        .clone();
    assert_eq!(s2["parent"], "snap1");
    // Deleting snap1 re-parents snap2.
    lab.ferry_ok(&["vm", "snapshot-delete", "s1", "snap1"])?;
    let l = lab.ferry_json(&["vm", "snapshots", "s1"])?;
    assert_eq!(l["snapshots"].as_array().unwrap().len(), 1);
    assert!(l["snapshots"][0].get("parent").is_none(), "{l}");

    // Offline: disk snapshot of the stopped VM, then revert to it.
    lab.ferry_ok(&["vm", "kill", "s1"])?;
    let o = lab.ferry(&["vm", "snapshot", "s1", "m", "--with-memory"])?;
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no memory to save"),
        "{o:?}"
    );
    lab.ferry_ok(&["vm", "snapshot", "s1", "offline"])?;
    lab.ferry_ok(&["vm", "revert", "s1", "offline"])?;
    assert_eq!(
        lab.ferry_json(&["vm", "snapshots", "s1"])?["current"],
        "offline"
    );

    // Raw disks cannot hold snapshots: refused with the reason, nothing recorded.
    lab.ferry_ok(&[
        "vm",
        "create",
        "raw1",
        "--memory",
        "64M",
        "--disk",
        "bus=virtio,size=8M,format=raw",
    ])?;
    let o = lab.ferry(&["vm", "snapshot", "raw1", "x"])?;
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("need qcow2"),
        "{o:?}"
    );
    assert_eq!(
        lab.ferry_json(&["vm", "snapshots", "raw1"])?["snapshots"],
        serde_json::json!([])
    );
    Ok(())
}

#[test]
fn templates_linked_and_full_clones_and_nonpersistent_disks() -> Result<()> {
    let lab = lab()?;
    let base = lab.create_test_vm(
        "tmpl",
        "10.77.0.30",
        &["--disk", "bus=virtio,size=256M", "--nic", "bridge=br0"],
    )?;
    lab.ferry_ok(&["vm", "template", "tmpl"])?;
    let o = lab.ferry(&["vm", "start", "tmpl"])?;
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("template"),
        "template started: {o:?}"
    );
    let o = lab.ferry(&["vm", "edit", "tmpl", "--cpus", "2"])?;
    assert!(!o.status.success(), "template edited");

    let t = Instant::now();
    lab.ferry_ok(&["vm", "clone", "tmpl", "c1", "--linked"])?;
    let linked_secs = t.elapsed().as_secs_f64();
    assert!(linked_secs < 5.0, "linked clone took {linked_secs} s");
    lab.ferry_ok(&["vm", "clone", "tmpl", "c2"])?;
    let c1 = lab.ferry_json(&["vm", "show", "c1"])?;
    assert_eq!(c1["clone_of"]["linked"], true);
    assert_ne!(
        c1["spec"]["nics"][0]["mac"], base["spec"]["nics"][0]["mac"],
        "clone kept the MAC"
    );
    assert_ne!(c1["id"], base["id"]);

    // Linked clones keep the template alive.
    let o = lab.ferry(&["vm", "delete", "tmpl"])?;
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("linked clones"),
        "{o:?}"
    );
    // A linked clone needs a template.
    let o = lab.ferry(&["vm", "clone", "c2", "c3", "--linked"])?;
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("need a template"),
        "{o:?}"
    );

    // The linked clone boots from the template's disk content and writes its own.
    boot(&lab, "c1")?;
    lab.guest_sh(
        "c1",
        "echo CLONE-DATA | dd of=/dev/vda bs=512 count=1 conv=fsync 2>/dev/null",
    )?;
    lab.ferry_ok(&["vm", "kill", "c1"])?;
    let tdisk = base["spec"]["disks"][0]["volume"]
        .as_str()
        .unwrap()
        .to_string();
    let tpath = lab.state_dir().join("pools/local").join(&tdisk);
    let head = std::fs::read(&tpath)?;
    assert!(
        !String::from_utf8_lossy(&head).contains("CLONE-DATA"),
        "template disk changed by its clone"
    );

    // Full clone is independent: the template can go once the linked clone is gone.
    lab.ferry_ok(&["vm", "delete", "c1"])?;
    lab.ferry_ok(&["vm", "delete", "tmpl"])?;
    boot(&lab, "c2")?;
    lab.ferry_ok(&["vm", "kill", "c2"])?;

    // Non-persistent disk: writes vanish at power-off, the volume never changes.
    let k = lab.create_test_vm(
        "kiosk",
        "10.77.0.31",
        &["--disk", "bus=virtio,size=16M,nonpersistent"],
    )?;
    let vol = lab
        .state_dir()
        .join("pools/local")
        .join(k["spec"]["disks"][0]["volume"].as_str().unwrap());
    let before = std::fs::read(&vol)?;
    boot(&lab, "kiosk")?;
    lab.guest_sh(
        "kiosk",
        "echo KIOSK-FILE | dd of=/dev/vda bs=512 count=1 conv=fsync 2>/dev/null",
    )?;
    assert!(lab
        .guest_sh(
            "kiosk",
            "dd if=/dev/vda bs=512 count=1 2>/dev/null | head -c 10"
        )?
        .contains("KIOSK-FILE"));
    lab.ferry_ok(&["vm", "stop", "kiosk"])?;
    assert_eq!(
        std::fs::read(&vol)?,
        before,
        "the non-persistent disk's volume changed"
    );
    boot(&lab, "kiosk")?;
    let again = lab.guest_sh(
        "kiosk",
        "dd if=/dev/vda bs=512 count=1 2>/dev/null | head -c 10 | od -c | head -1",
    )?;
    assert!(
        !again.contains("K   I   O   S   K"),
        "write survived a power cycle: {again}"
    );
    lab.ferry_ok(&["vm", "kill", "kiosk"])?;
    Ok(())
}

#[test]
fn suspend_to_disk_and_resume_continues_the_guest() -> Result<()> {
    let mut lab = lab()?;
    lab.create_test_vm(
        "hib",
        "10.77.0.40",
        &["--disk", "bus=virtio,size=64M", "--nic", "bridge=br0"],
    )?;
    boot(&lab, "hib")?;
    lab.guest_sh("hib", "echo still-here > /tmp/marker")?;
    let u1 = uptime(&lab, "hib")?;
    lab.ferry_ok(&["vm", "suspend", "hib"])?;
    let (st, pid) = lab.vm_state("hib")?;
    assert_eq!((st.as_str(), pid), ("suspended", None));
    assert!(lab.qemu_pids().is_empty(), "QEMU still runs after suspend");
    // A daemon restart keeps the suspended state.
    lab.stop_daemon(false)?;
    lab.start_daemon()?;
    assert_eq!(lab.vm_state("hib")?.0, "suspended");
    std::thread::sleep(Duration::from_secs(2));
    lab.ferry_ok(&["vm", "resume", "hib"])?;
    assert_eq!(lab.vm_state("hib")?.0, "running");
    assert_eq!(lab.guest_sh("hib", "cat /tmp/marker")?, "still-here");
    let u2 = uptime(&lab, "hib")?;
    assert!(
        u2 > u1 && u2 < u1 + 30.0,
        "uptime did not continue: {u1} -> {u2}"
    );
    assert!(
        lab.ping("10.77.0.40", 2),
        "resumed guest does not answer pings"
    );
    Ok(())
}

#[test]
fn disks_hotplug_grow_online_and_cdrom_media_change() -> Result<()> {
    let lab = lab()?;
    lab.ferry_ok(&[
        "volume",
        "create",
        "local",
        "media.iso",
        "--size",
        "4M",
        "--format",
        "raw",
    ])?;
    lab.create_test_vm(
        "dev1",
        "10.77.0.50",
        &["--disk", "bus=virtio,size=64M", "--cdrom", "empty"],
    )?;
    boot(&lab, "dev1")?;
    let wait_guest = |cmd: &str, want: &dyn Fn(&str) -> bool| -> Result<String> {
        let t = Instant::now();
        loop {
            let out = lab.guest_sh("dev1", cmd)?;
            if want(&out) || t.elapsed() > Duration::from_secs(30) {
                return Ok(out);
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    };
    // Hot-plug a new virtio disk: the guest sees vdb.
    lab.ferry_ok(&["vm", "disk", "attach", "dev1", "bus=virtio,size=32M"])?;
    let blocks = wait_guest("ls /sys/block | tr '\\n' ' '", &|o| o.contains("vdb"))?;
    assert!(
        blocks.contains("vdb"),
        "hot-plugged disk not seen: {blocks}"
    );
    // Grow disk0 online: the guest sees the new size (512-byte sectors).
    lab.ferry_ok(&["vm", "disk", "resize", "dev1", "0", "--size", "128M"])?;
    let sectors = wait_guest("cat /sys/block/vda/size", &|o| o == "262144")?;
    assert_eq!(sectors, "262144", "online resize not seen by the guest");
    let o = lab.ferry(&["vm", "disk", "resize", "dev1", "0", "--size", "64M"])?;
    assert!(!o.status.success(), "shrinking was accepted");
    // CD-ROM media change while running, then eject.
    lab.ferry_ok(&["vm", "cdrom", "dev1", "0", "local/media.iso"])?;
    assert_eq!(
        lab.ferry_json(&["vm", "show", "dev1"])?["spec"]["cdroms"][0]["volume"],
        "media.iso"
    );
    lab.ferry_ok(&["vm", "cdrom", "dev1", "0", "eject"])?;
    assert!(
        lab.ferry_json(&["vm", "show", "dev1"])?["spec"]["cdroms"][0]
            .get("volume")
            .is_none()
    );
    // Only the last disk can leave a running VM; then the guest loses vdb.
    let o = lab.ferry(&["vm", "disk", "detach", "dev1", "0"])?;
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("only its last disk"),
        "{o:?}"
    );
    lab.ferry_ok(&["vm", "disk", "detach", "dev1", "1"])?;
    let blocks = wait_guest("ls /sys/block | tr '\\n' ' '", &|o| !o.contains("vdb"))?;
    assert!(
        !blocks.contains("vdb"),
        "detached disk still in the guest: {blocks}"
    );
    assert_eq!(
        lab.ferry_json(&["vm", "show", "dev1"])?["spec"]["disks"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // A NIC hot-plugged with its tap: the guest gets eth0 with the MAC and answers pings.
    lab.ferry_ok(&["vm", "nic", "attach", "dev1", "bridge=br0"])?;
    let mac = lab.ferry_json(&["vm", "show", "dev1"])?["spec"]["nics"][0]["mac"]
        .as_str()
        .unwrap()
        .to_string();
    let addr = wait_guest("cat /sys/class/net/eth0/address 2>/dev/null", &|o| {
        !o.is_empty()
    })?;
    assert_eq!(addr, mac, "hot-plugged NIC has another MAC");
    lab.guest_sh(
        "dev1",
        "ip link set eth0 up; ip addr add 10.77.0.50/24 dev eth0",
    )?;
    assert!(lab.ping("10.77.0.50", 3), "hot-plugged NIC does not answer");
    lab.ferry_ok(&["vm", "nic", "detach", "dev1", "0"])?;
    let gone = wait_guest("ls /sys/class/net | tr '\\n' ' '", &|o| !o.contains("eth0"))?;
    assert!(
        !gone.contains("eth0"),
        "unplugged NIC still in the guest: {gone}"
    );
    let id = lab.ferry_json(&["vm", "show", "dev1"])?["id"].clone();
    assert!(
        lab.ip(&["link", "show", &format!("tap{id}i0")]).is_err(),
        "tap left behind"
    );

    // SATA cannot be hot-plugged: a clear refusal, nothing changes.
    let o = lab.ferry(&["vm", "disk", "attach", "dev1", "bus=sata,size=8M"])?;
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("cannot be hot-plugged"),
        "{o:?}"
    );
    lab.ferry_ok(&["vm", "kill", "dev1"])?;
    Ok(())
}

/// `curl -X POST` inside the lab: starts an operation without waiting for it.
fn fire(lab: &Lab, path: &str, body: &str) -> Result<()> {
    let o = lab
        .cmd("curl")
        .args([
            "-s",
            "-f",
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "-d",
            body,
        ])
        .arg("--unix-socket")
        .arg(&lab.socket)
        .arg(format!("http://localhost{path}"))
        .output()?;
    anyhow::ensure!(
        o.status.success(),
        "POST {path} failed: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    Ok(())
}

/// The internal snapshot tags of a qcow2 volume.
fn tags(path: &std::path::Path) -> Result<Vec<String>> {
    let o = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(path)
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    let mut t: Vec<String> = v["snapshots"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["name"].as_str().map(String::from))
        .collect();
    t.sort();
    Ok(t)
}

fn stored(lab: &Lab, vm: &str) -> Result<Vec<String>> {
    let l = lab.ferry_json(&["vm", "snapshots", vm])?;
    let mut t: Vec<String> = l["snapshots"]
        .as_array()
        .context("no snapshot list")?
        .iter()
        .filter_map(|s| s["name"].as_str().map(String::from))
        .collect();
    t.sort();
    Ok(t)
}

#[test]
fn crashes_mid_snapshot_or_clone_leave_store_and_files_agreeing() -> Result<()> {
    let mut lab = lab()?;
    let vm = lab.create_test_vm(
        "cr",
        "10.77.0.70",
        &[
            "--disk",
            "bus=virtio,size=64M",
            "--disk",
            "bus=virtio,size=32M",
        ],
    )?;
    let disks: Vec<std::path::PathBuf> = vm["spec"]["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            lab.state_dir()
                .join("pools/local")
                .join(d["volume"].as_str().unwrap())
        })
        .collect();
    boot(&lab, "cr")?;
    lab.guest_sh(
        "cr",
        "dd if=/dev/urandom of=/tmp/fill bs=1M count=96 2>/dev/null; echo ok",
    )?;

    // 1. The daemon dies (SIGKILL) right after a memory snapshot started.
    fire(
        &lab,
        "/api/v1/vms/cr/snapshots",
        r#"{"name": "c1", "with_memory": true}"#,
    )?;
    std::thread::sleep(Duration::from_millis(150));
    lab.stop_daemon(true)?;
    lab.start_daemon()?;
    assert_eq!(
        lab.vm_state("cr")?.0,
        "running",
        "VM not running after the daemon's crash"
    );
    for d in &disks {
        assert_eq!(
            tags(d)?,
            stored(&lab, "cr")?,
            "store and {} disagree",
            d.display()
        );
    }
    if stored(&lab, "cr")?.contains(&"c1".to_string()) {
        lab.ferry_ok(&["vm", "revert", "cr", "c1"])?;
    }
    assert_eq!(lab.guest_sh("cr", "echo alive")?, "alive");

    // 1b. The daemon dies right after deleting a memory snapshot started.
    lab.ferry_ok(&["vm", "snapshot", "cr", "d1", "--with-memory"])?;
    let o = lab
        .cmd("curl")
        .args([
            "-s",
            "-f",
            "-X",
            "DELETE",
            "http://localhost/api/v1/vms/cr/snapshots/d1",
            "--unix-socket",
        ])
        .arg(&lab.socket)
        .output()?;
    anyhow::ensure!(o.status.success(), "DELETE failed: {o:?}");
    std::thread::sleep(Duration::from_millis(50));
    lab.stop_daemon(true)?;
    lab.start_daemon()?;
    assert_eq!(lab.vm_state("cr")?.0, "running");
    for d in &disks {
        assert_eq!(
            tags(d)?,
            stored(&lab, "cr")?,
            "store and {} disagree after a delete crash",
            d.display()
        );
    }
    assert_eq!(lab.guest_sh("cr", "echo alive")?, "alive");

    // 2. QEMU dies in the middle of a memory snapshot: the VM is crashed, starts again.
    let (_, pid) = lab.vm_state("cr")?;
    fire(
        &lab,
        "/api/v1/vms/cr/snapshots",
        r#"{"name": "c2", "with_memory": true}"#,
    )?;
    std::thread::sleep(Duration::from_millis(100));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid.expect("a pid"))?),
        nix::sys::signal::SIGKILL,
    )?;
    let t = Instant::now();
    while lab.vm_state("cr")?.0 != "crashed" && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(lab.vm_state("cr")?.0, "crashed");
    lab.stop_daemon(false)?;
    lab.start_daemon()?;
    for d in &disks {
        assert_eq!(
            tags(d)?,
            stored(&lab, "cr")?,
            "store and {} disagree after a QEMU crash",
            d.display()
        );
    }
    boot(&lab, "cr")?;
    lab.ferry_ok(&["vm", "kill", "cr"])?;

    // 3. The daemon dies during a full clone: no clone, no stray volumes or files remain.
    lab.ferry_ok(&[
        "vm",
        "create",
        "big",
        "--memory",
        "64M",
        "--disk",
        "bus=virtio,size=2G",
    ])?;
    let big = lab.ferry_json(&["vm", "show", "big"])?;
    let bigvol = lab
        .state_dir()
        .join("pools/local")
        .join(big["spec"]["disks"][0]["volume"].as_str().unwrap());
    let o = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x5a 0 768M"])
        .arg(&bigvol)
        .output()?;
    anyhow::ensure!(o.status.success(), "qemu-io: {o:?}");
    let before: Vec<String> = lab
        .ferry_json(&["volume", "list", "local"])?
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    fire(&lab, "/api/v1/vms/big/clone", r#"{"name": "bigcopy"}"#)?;
    // Killed while the copy is being written (its partial file exists), however fast
    // the copy runs on this machine.
    let pool = lab.state_dir().join("pools/local");
    let t = std::time::Instant::now();
    while t.elapsed() < Duration::from_secs(5)
        && !std::fs::read_dir(&pool)?
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with(".partial-"))
    {
        std::thread::sleep(Duration::from_millis(2));
    }
    lab.stop_daemon(true)?;
    lab.start_daemon()?;
    assert!(
        lab.ferry(&["vm", "show", "bigcopy"])?.status.code() == Some(1),
        "a half-made clone exists"
    );
    let after: Vec<String> = lab
        .ferry_json(&["volume", "list", "local"])?
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(before, after, "volumes left by the interrupted clone");
    let partial: Vec<_> = std::fs::read_dir(lab.state_dir().join("pools/local"))?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".partial-"))
        .collect();
    assert!(partial.is_empty(), "unfinished files left: {partial:?}");
    // And the clone works when tried again.
    lab.ferry_ok(&["vm", "clone", "big", "bigcopy"])?;
    Ok(())
}
