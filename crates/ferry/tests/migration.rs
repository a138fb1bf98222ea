//! Live migration between lab hosts (network namespaces, one daemon each, a shared
//! pool), with real QEMU: the guest keeps its memory, disk, MAC and address; locks move;
//! failures (destination killed, network cut, source daemon killed) leave the VM in
//! exactly one place; maintenance mode evacuates.

use anyhow::{bail, Context, Result};
use ferry_lab::{verify_records, wait_for, Cli, ClusterLab, PingRecorder, RECORD_WRITER};
use serde_json::Value;
use std::time::Duration;

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");
const READY: Duration = Duration::from_secs(120);

/// A running test VM on `cli`'s host: 256 MiB, NIC on br0, `disk` options if any.
fn boot(cli: &Cli, name: &str, ip: &str, disk: Option<&str>) -> Result<Value> {
    match disk {
        Some(d) => cli.boot_vm(name, ip, &["--disk", d]),
        None => cli.boot_vm(name, ip, &[]),
    }
}

/// Stops the guest's record writer and checks the disk: clean, and the last record the
/// guest wrote is the last on disk.
fn stop_writer_and_verify(
    cli: &Cli,
    vm: &str,
    disk: &std::path::Path,
) -> Result<ferry_lab::RecordReport> {
    let last: u64 = cli
        .guest_sh(vm, "touch /tmp/stop-writer; sleep 2; cat /tmp/writer-seq")?
        .trim()
        .parse()?;
    let rep = verify_records(disk)?;
    eprintln!("records of {vm}: {rep}");
    assert!(rep.is_clean(), "{rep}");
    assert_eq!(rep.last_seq, Some(last), "{rep}");
    Ok(rep)
}

fn lock_of(lab: &ClusterLab, volume: &str) -> Result<Value> {
    let p = lab
        .shared_dir()
        .join(".locks")
        .join(format!("{volume}.json"));
    Ok(serde_json::from_slice(
        &std::fs::read(&p).with_context(|| format!("read {}", p.display()))?,
    )?)
}

fn client_ping(lab: &ClusterLab, addr: &str) -> bool {
    lab.client_cmd("ping")
        .args(["-c", "3", "-W", "2", "-i", "0.3", addr])
        .stdout(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

#[test]
fn live_migration_keeps_memory_disk_mac_and_address() -> Result<()> {
    let lab = ClusterLab::for_test(FERRY, 3)?;
    let (h1, h2, h3) = (lab.cli("h1")?, lab.cli("h2")?, lab.cli("h3")?);
    let vm = boot(
        &h1,
        "web",
        "10.78.0.100",
        Some("pool=shared,size=16M,format=raw"),
    )?;
    let mac = vm["spec"]["nics"][0]["mac"].as_str().unwrap().to_string();
    let vol = vm["spec"]["disks"][0]["volume"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(lock_of(&lab, &vol)?["host"], "h1");
    // A guest process writes sequence-numbered records to the shared disk throughout.
    h1.guest_sh(
        "web",
        &format!("{RECORD_WRITER}; echo kept > /tmp/marker; (ferry_writer one /dev/vda 0 > /dev/null 2>&1 &)"),
    )?;
    let ping = PingRecorder::start(&lab.client_ns(), "10.78.0.100", Duration::from_millis(10))?;
    std::thread::sleep(Duration::from_secs(1));
    let report = h1.ferry_json(&["vm", "migrate", "web", "--to", "h2"])?;
    std::thread::sleep(Duration::from_secs(1));
    let pings = ping.stop();
    eprintln!("migration report: {report}\nclient pings: {pings}");
    assert_eq!(report["from"], "h1");
    assert_eq!(report["to"], "h2");
    assert!(report["passes"].as_u64().unwrap() >= 1);
    assert!(report["ram_transferred_bytes"].as_u64().unwrap() > 0);
    assert!(pings.received > 0, "{pings}");

    // The VM lives on h2 only, same MAC, its QEMU on h1 gone.
    assert!(
        h1.vm_names()?.is_empty(),
        "h1 still lists {:?}",
        h1.vm_names()?
    );
    assert!(lab.qemu_pids("h1").is_empty(), "QEMU left on h1");
    let on2 = h2.ferry_json(&["vm", "show", "web"])?;
    assert_eq!(on2["state"], "running");
    assert_eq!(on2["spec"]["nics"][0]["mac"], mac.as_str());
    assert!(on2.get("migration").is_none(), "{on2}");
    // Same boot: the tmpfs marker survived; the address answers the client.
    assert_eq!(h2.guest_sh("web", "cat /tmp/marker")?, "kept");
    assert!(client_ping(&lab, "10.78.0.100"));
    // The disk lock moved with a new generation.
    let lock = lock_of(&lab, &vol)?;
    assert_eq!(lock["host"], "h2");
    assert_eq!(lock["generation"], 2);
    // Another host may not start anything on that disk: the holder is named.
    h3.create_test_vm(
        "thief",
        "10.78.0.101",
        &["--disk", &format!("pool=shared,volume={vol},format=raw")],
    )?;
    let o = h3.ferry(&["vm", "start", "thief"])?;
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "second writer started");
    assert!(err.contains("in use by VM web on host h2"), "{err}");
    assert_eq!(h3.vm_state("thief")?.0, "stopped");

    // The records the guest wrote before, during and after the move are all there,
    // from one instance, in order.
    let rep = stop_writer_and_verify(&h2, "web", &lab.shared_dir().join(&vol))?;
    assert_eq!(rep.runs.len(), 1);

    // And back, while the guest runs on.
    let back = h2.ferry_json(&["vm", "migrate", "web", "--to", "h1"])?;
    assert_eq!(back["to"], "h1");
    assert_eq!(h1.guest_sh("web", "cat /tmp/marker")?, "kept");
    assert_eq!(lock_of(&lab, &vol)?["generation"], 3);
    Ok(())
}

#[test]
fn bad_migration_requests_change_nothing() -> Result<()> {
    let lab = ClusterLab::for_test(FERRY, 2)?;
    let h1 = lab.cli("h1")?;
    boot(&h1, "loc", "10.78.0.110", Some("pool=local,size=16M"))?;
    let cases: &[(&[&str], &str)] = &[
        (&["vm", "migrate", "loc", "--to", "h9"], "Host h9"),
        (&["vm", "migrate", "loc", "--to", "h1"], "is this host"),
        (&["vm", "migrate", "loc", "--to", "h2"], "--with-storage"),
        (&["vm", "migrate", "nosuch", "--to", "h2"], "not found"),
    ];
    for (args, want) in cases {
        let o = h1.ferry(args)?;
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    assert_eq!(h1.vm_state("loc")?.0, "running");
    assert!(lab.cli("h2")?.vm_names()?.is_empty());
    Ok(())
}

/// Starts a slow migration (bandwidth capped) of `vm` from `from` to `to` in the
/// background and waits until the destination has its QEMU.
fn slow_migration(lab: &ClusterLab, vm: &str, from: &str, to: &str) -> Result<std::process::Child> {
    let child = lab
        .cli(from)?
        .spawn(&["vm", "migrate", vm, "--to", to, "--bandwidth", "4"])?;
    let dest = lab.cli(to)?;
    wait_for(
        "incoming QEMU on the destination",
        Duration::from_secs(30),
        || Ok(dest.vm_names()?.iter().any(|n| n == vm) && !lab.qemu_pids(to).is_empty()),
    )?;
    std::thread::sleep(Duration::from_millis(500));
    Ok(child)
}

fn failed(child: std::process::Child) -> Result<String> {
    let o = child.wait_with_output()?;
    assert!(!o.status.success(), "the migration succeeded");
    Ok(String::from_utf8_lossy(&o.stderr).into_owned())
}

#[test]
fn failed_migrations_leave_the_vm_running_on_the_source() -> Result<()> {
    // Three hosts: cutting one of two etcd voters would stop the whole cluster.
    let mut lab = ClusterLab::for_test(FERRY, 3)?;
    let (h1, h2) = (lab.cli("h1")?, lab.cli("h2")?);
    let vm = boot(&h1, "db", "10.78.0.120", Some("pool=shared,size=16M"))?;
    let vol = vm["spec"]["disks"][0]["volume"]
        .as_str()
        .unwrap()
        .to_string();
    h1.guest_sh("db", "echo here > /tmp/marker")?;
    let gone_from_h2 = |lab: &ClusterLab| -> Result<()> {
        wait_for("h2 dropping its copy", Duration::from_secs(60), || {
            Ok(h2.vm_names()?.is_empty() && lab.qemu_pids("h2").is_empty())
        })
    };

    // 1. The destination's QEMU dies mid-migration.
    let child = slow_migration(&lab, "db", "h1", "h2")?;
    // Meanwhile both hosts show it as work in flight, each from its side.
    let (i1, i2) = (
        h1.ferry_json(&["host", "show"])?,
        h2.ferry_json(&["host", "show"])?,
    );
    assert_eq!(i1["migrations"][0]["vm"], "db", "{i1}");
    assert_eq!(i1["migrations"][0]["direction"], "outgoing");
    assert_eq!(i1["migrations"][0]["peer"], "h2");
    assert_eq!(i2["migrations"][0]["direction"], "incoming", "{i2}");
    assert_eq!(i2["migrations"][0]["peer"], "h1");
    let text = h1.ferry_ok(&["host", "status"])?;
    assert!(text.contains("MIGRATION") && text.contains("db"), "{text}");
    for pid in lab.qemu_pids("h2") {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL)?;
    }
    let err = failed(child)?;
    assert!(err.contains("keeps running on h1"), "{err}");
    gone_from_h2(&lab)?;
    assert_eq!(h1.vm_state("db")?.0, "running");
    assert_eq!(h1.guest_sh("db", "cat /tmp/marker")?, "here");
    assert_eq!(lock_of(&lab, &vol)?["host"], "h1");

    // 2. The destination's network is cut mid-migration.
    let child = slow_migration(&lab, "db", "h1", "h2")?;
    lab.set_link("h2", false)?;
    let err = failed(child)?;
    eprintln!("cut: {err}");
    assert!(err.contains("keeps running on h1"), "{err}");
    assert_eq!(h1.vm_state("db")?.0, "running");
    assert!(client_ping(&lab, "10.78.0.120"));
    lab.set_link("h2", true)?;
    gone_from_h2(&lab)?;
    assert_eq!(lock_of(&lab, &vol)?["host"], "h1");

    // 3. The source's daemon is killed mid-migration and comes back.
    let child = slow_migration(&lab, "db", "h1", "h2")?;
    lab.kill_daemon("h1")?;
    let _ = child.wait_with_output();
    lab.start_daemon("h1")?;
    lab.wait_daemon("h1")?;
    // Exactly one host runs it, and that host holds the lock.
    let mut owner = String::new();
    wait_for("one owner", Duration::from_secs(90), || {
        let on1 = h1.vm_names()?.contains(&"db".to_string());
        let on2 = h2.vm_names()?.contains(&"db".to_string());
        let settled = |c: &Cli| -> Result<bool> {
            let v = c.ferry_json(&["vm", "show", "db"])?;
            Ok(v["state"] == "running" && v.get("migration").is_none())
        };
        Ok(match (on1, on2) {
            (true, false) if settled(&h1)? => {
                owner = "h1".into();
                true
            }
            (false, true) if settled(&h2)? => {
                owner = "h2".into();
                true
            }
            _ => false,
        })
    })?;
    eprintln!("after the source daemon's restart the VM runs on {owner}");
    let other = if owner == "h1" { "h2" } else { "h1" };
    assert!(lab.qemu_pids(other).is_empty(), "QEMU left on {other}");
    assert_eq!(lock_of(&lab, &vol)?["host"], owner.as_str());
    assert_eq!(lab.cli(&owner)?.guest_sh("db", "cat /tmp/marker")?, "here");
    Ok(())
}

#[test]
fn maintenance_evacuates_over_the_other_hosts() -> Result<()> {
    let lab = ClusterLab::for_test(FERRY, 3)?;
    let h1 = lab.cli("h1")?;
    boot(&h1, "a", "10.78.0.131", Some("pool=shared,size=16M"))?;
    boot(&h1, "b", "10.78.0.132", None)?;
    h1.ferry_ok(&["host", "maintenance"])?;
    assert!(h1.vm_names()?.is_empty());
    let on2 = lab.cli("h2")?.vm_names()?;
    let on3 = lab.cli("h3")?.vm_names()?;
    assert_eq!(
        (on2.len(), on3.len()),
        (1, 1),
        "not spread: h2 {on2:?}, h3 {on3:?}"
    );
    for (h, n) in [("h2", &on2[0]), ("h3", &on3[0])] {
        assert_eq!(lab.cli(h)?.vm_state(n)?.0, "running");
    }
    assert!(client_ping(&lab, "10.78.0.131") && client_ping(&lab, "10.78.0.132"));
    assert_eq!(h1.ferry_json(&["host"])?["maintenance"], true);
    // Nothing starts or arrives on a host in maintenance.
    h1.create_test_vm("c", "10.78.0.133", &[])?;
    let o = h1.ferry(&["vm", "start", "c"])?;
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("maintenance"));
    let o = lab
        .cli("h2")?
        .ferry(&["vm", "migrate", &on2[0], "--to", "h1"])?;
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("maintenance"));
    assert_eq!(lab.cli("h2")?.vm_state(&on2[0])?.0, "running");
    h1.ferry_ok(&["host", "activate"])?;
    assert_eq!(h1.ferry_json(&["host"])?["maintenance"], false);
    h1.ferry_ok(&["vm", "start", "c"])?;
    Ok(())
}

#[test]
fn migration_with_local_disks_copies_them() -> Result<()> {
    let lab = ClusterLab::for_test(FERRY, 2)?;
    let (h1, h2) = (lab.cli("h1")?, lab.cli("h2")?);
    let vm = boot(
        &h1,
        "loc",
        "10.78.0.140",
        Some("pool=local,size=32M,format=raw"),
    )?;
    let old_vol = vm["spec"]["disks"][0]["volume"]
        .as_str()
        .unwrap()
        .to_string();
    h1.guest_sh(
        "loc",
        &format!("{RECORD_WRITER}; (ferry_writer loc /dev/vda 0 > /dev/null 2>&1 &)"),
    )?;
    std::thread::sleep(Duration::from_secs(2));
    let report = h1.ferry_json(&["vm", "migrate", "loc", "--to", "h2", "--with-storage"])?;
    eprintln!("with storage: {report}");
    assert!(report["disk_transferred_bytes"].as_u64().unwrap() >= 32 << 20);
    let on2 = h2.ferry_json(&["vm", "show", "loc"])?;
    assert_eq!(on2["state"], "running");
    assert_eq!(on2["spec"]["disks"][0]["pool"], "local");
    let new_vol = on2["spec"]["disks"][0]["volume"]
        .as_str()
        .unwrap()
        .to_string();
    // The source's copy is gone; the destination's holds every record, written on
    // both hosts, in order.
    assert!(!lab
        .state_dir("h1")
        .join("pools/local")
        .join(&old_vol)
        .exists());
    stop_writer_and_verify(
        &h2,
        "loc",
        &lab.state_dir("h2").join("pools/local").join(&new_vol),
    )?;
    Ok(())
}

#[test]
fn a_guest_dirtying_faster_than_the_link_still_moves() -> Result<()> {
    let lab = ClusterLab::for_test(FERRY, 2)?;
    let (h1, h2) = (lab.cli("h1")?, lab.cli("h2")?);
    boot(&h1, "busy", "10.78.0.145", None)?;
    h1.guest_sh("busy", "yes abcdefghijklmnop | head -c 33554432 > /tmp/src")?;
    h1.guest_sh(
        "busy",
        "(while :; do dd if=/tmp/src of=/tmp/dst bs=1M count=32 conv=notrunc 2>/dev/null; done &)",
    )?;
    std::thread::sleep(Duration::from_secs(1));
    // A 16 MiB/s link against a guest rewriting 32 MiB many times a second: pre-copy
    // alone never ends (plain QEMU gives up); the policy must finish it.
    let report = h1.ferry_json(&["vm", "migrate", "busy", "--to", "h2", "--bandwidth", "16"])?;
    eprintln!("busy: {report}");
    let steps: Vec<&str> = report["policy_steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s.as_str())
        .collect();
    assert!(
        steps.iter().any(|s| s.starts_with("stall")),
        "no stall seen: {steps:?}"
    );
    assert!(
        steps
            .iter()
            .any(|s| s.starts_with("post-copy") || s.starts_with("downtime limit raised")),
        "{steps:?}"
    );
    assert_eq!(h2.vm_state("busy")?.0, "running");
    assert_eq!(h2.guest_sh("busy", "echo alive")?, "alive");
    assert!(h1.vm_names()?.is_empty());
    Ok(())
}

#[test]
fn storage_vmotion_moves_a_running_disk_between_pools() -> Result<()> {
    let lab = ClusterLab::for_test(FERRY, 1)?;
    let h1 = lab.cli("h1")?;
    let vm = boot(
        &h1,
        "sv",
        "10.78.0.146",
        Some("pool=local,size=32M,format=raw"),
    )?;
    let vol = vm["spec"]["disks"][0]["volume"]
        .as_str()
        .unwrap()
        .to_string();
    h1.guest_sh(
        "sv",
        &format!("{RECORD_WRITER}; (ferry_writer sv /dev/vda 0 > /dev/null 2>&1 &)"),
    )?;
    std::thread::sleep(Duration::from_secs(2));
    // Bad input changes nothing.
    for (args, want) in [
        (
            vec!["vm", "move-disk", "sv", "7", "--to-pool", "shared"],
            "not found",
        ),
        (
            vec!["vm", "move-disk", "sv", "0", "--to-pool", "nope"],
            "not found",
        ),
        (
            vec!["vm", "move-disk", "sv", "0", "--to-pool", "local"],
            "already",
        ),
    ] {
        let o = h1.ferry(&args)?;
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    // A move aborted half-way leaves the disk where it was, in use, and no copy.
    let mut slow = h1.spawn(&[
        "vm",
        "move-disk",
        "sv",
        "0",
        "--to-pool",
        "shared",
        "--bandwidth",
        "2",
    ])?;
    wait_for("the copy under way", Duration::from_secs(30), || {
        Ok(lab.shared_dir().join(&vol).exists())
    })?;
    std::thread::sleep(Duration::from_secs(2));
    h1.ferry_ok(&["vm", "move-disk", "sv", "0", "--abort"])?;
    let out = slow.wait()?;
    assert!(!out.success(), "the aborted move reported success");
    let _ = slow.stdout.take();
    let still = h1.ferry_json(&["vm", "show", "sv"])?;
    assert_eq!(still["spec"]["disks"][0]["pool"], "local");
    assert!(!lab.shared_dir().join(&vol).exists(), "half copy left");
    assert!(lab.state_dir("h1").join("pools/local").join(&vol).exists());
    assert_eq!(h1.guest_sh("sv", "echo alive")?, "alive");

    h1.ferry_ok(&["vm", "move-disk", "sv", "disk0", "--to-pool", "shared"])?;
    let after = h1.ferry_json(&["vm", "show", "sv"])?;
    assert_eq!(after["spec"]["disks"][0]["pool"], "shared");
    assert_eq!(after["state"], "running");
    let old = lab.state_dir("h1").join("pools/local").join(&vol);
    assert!(!old.exists(), "old volume left");
    assert_eq!(lock_of(&lab, &vol)?["host"], "h1");
    // The guest kept writing through the pivot; every record is in the new volume.
    stop_writer_and_verify(&h1, "sv", &lab.shared_dir().join(&vol))?;
    // After a restart QEMU opens the new place.
    h1.ferry_ok(&["vm", "stop", "sv"])?;
    h1.ferry_ok(&["vm", "start", "sv"])?;
    h1.wait_console("sv", "FERRY-READY", READY)?;
    assert_eq!(h1.vm_state("sv")?.0, "running");
    Ok(())
}

#[test]
fn lab_cli_builds_breaks_and_removes_a_cluster() -> Result<()> {
    let name = format!("fy{}-cli", std::process::id());
    let lab = |args: &[&str]| -> Result<std::process::Output> {
        Ok(std::process::Command::new(FERRY)
            .arg("lab")
            .arg(args[0])
            .args(["--name", &name])
            .args(&args[1..])
            .output()?)
    };
    let ok = |args: &[&str]| -> Result<String> {
        let o = lab(args)?;
        if !o.status.success() {
            bail!("ferry lab {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let r = (|| -> Result<()> {
        let up = ok(&["up", "--hosts", "2"])?;
        assert!(up.contains("h1") && up.contains("h2"), "{up}");
        assert!(!lab(&["up", "--hosts", "2"])?.status.success(), "second up");
        ok(&["exec", "h1", "--", FERRY, "host"])?;
        ok(&[
            "exec",
            "client",
            "--",
            "ping",
            "-c",
            "1",
            "-W",
            "2",
            "10.78.0.12",
        ])?;
        ok(&["cut", "h2"])?;
        assert!(ok(&["status"])?.contains("cut"));
        assert!(!lab(&[
            "exec",
            "client",
            "--",
            "ping",
            "-c",
            "1",
            "-W",
            "1",
            "10.78.0.12"
        ])?
        .status
        .success());
        ok(&["heal", "h2"])?;
        ok(&[
            "exec",
            "client",
            "--",
            "ping",
            "-c",
            "1",
            "-W",
            "2",
            "10.78.0.12",
        ])?;
        ok(&["kill-daemon", "h2"])?;
        assert!(ok(&["status"])?.contains("daemon down"));
        ok(&["start", "h2"])?;
        ok(&["exec", "h2", "--", FERRY, "host"])?;
        let killed = ok(&["kill", "h1"])?;
        assert!(killed.contains("processes killed"), "{killed}");
        assert!(!lab(&["exec", "h1", "--", FERRY, "host"])?.status.success());
        Ok(())
    })();
    let down = ok(&["down"]);
    r?;
    let down = down?;
    assert!(down.contains("4 namespaces removed"), "{down}");
    let left = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()?;
    assert!(!String::from_utf8_lossy(&left.stdout).contains(&name));
    // Down again on nothing is fine (leftovers or not).
    ok(&["down"])?;
    Ok(())
}

#[test]
fn cold_migration_moves_stopped_and_suspended_vms() -> Result<()> {
    let lab = ClusterLab::for_test(FERRY, 2)?;
    let (h1, h2) = (lab.cli("h1")?, lab.cli("h2")?);
    // Suspended, with a local disk: disk and state file travel; it resumes on h2.
    let vm = boot(&h1, "sus", "10.78.0.150", Some("pool=local,size=16M"))?;
    let old_vol = vm["spec"]["disks"][0]["volume"]
        .as_str()
        .unwrap()
        .to_string();
    h1.guest_sh("sus", "echo before > /tmp/marker")?;
    h1.ferry_ok(&["vm", "suspend", "sus"])?;
    let o = h1.ferry(&["vm", "move", "sus", "--to", "h9"])?;
    assert!(!o.status.success());
    h1.ferry_ok(&["vm", "move", "sus", "--to", "h2"])?;
    assert!(h1.vm_names()?.is_empty());
    assert!(!lab
        .state_dir("h1")
        .join("pools/local")
        .join(&old_vol)
        .exists());
    assert_eq!(h2.vm_state("sus")?.0, "suspended");
    h2.ferry_ok(&["vm", "resume", "sus"])?;
    assert_eq!(h2.guest_sh("sus", "cat /tmp/marker")?, "before");
    // Running VMs are refused (they migrate live).
    let o = h2.ferry(&["vm", "move", "sus", "--to", "h1"])?;
    assert!(String::from_utf8_lossy(&o.stderr).contains("migrate"));

    // Stopped, with an internal snapshot inside its local qcow2: it arrives with it.
    h1.create_test_vm("cold", "10.78.0.151", &["--disk", "pool=local,size=16M"])?;
    h1.ferry_ok(&["vm", "snapshot", "cold", "s1"])?;
    h1.ferry_ok(&["vm", "move", "cold", "--to", "h2"])?;
    let on2 = h2.ferry_json(&["vm", "show", "cold"])?;
    assert_eq!(on2["state"], "stopped");
    let snaps = h2.ferry_json(&["vm", "snapshots", "cold"])?;
    assert_eq!(snaps["snapshots"][0]["name"], "s1", "{snaps}");
    let vol = on2["spec"]["disks"][0]["volume"].as_str().unwrap();
    let info = std::process::Command::new("qemu-img")
        .args(["snapshot", "-l", "-U"])
        .arg(lab.state_dir("h2").join("pools/local").join(vol))
        .output()?;
    assert!(String::from_utf8_lossy(&info.stdout).contains("s1"));
    h2.ferry_ok(&["vm", "revert", "cold", "s1"])?;

    // A stopped UEFI VM's variables (its boot entries) exist only in its vars file.
    h1.create_test_vm("efi", "10.78.0.152", &["--firmware", "uefi"])?;
    h1.ferry_ok(&["vm", "start", "efi"])?;
    h1.ferry_ok(&["vm", "kill", "efi"])?;
    let id1 = h1.ferry_json(&["vm", "show", "efi"])?["id"]
        .as_u64()
        .unwrap();
    let vars1 = lab.state_dir("h1").join(format!("vms/{id1}/efivars.fd"));
    let mut bytes = std::fs::read(&vars1)?;
    let n = bytes.len();
    bytes[n - 16..].copy_from_slice(b"ferry-nvram-mark");
    std::fs::write(&vars1, &bytes)?;
    h1.ferry_ok(&["vm", "move", "efi", "--to", "h2"])?;
    let id2 = h2.ferry_json(&["vm", "show", "efi"])?["id"]
        .as_u64()
        .unwrap();
    let vars2 = lab.state_dir("h2").join(format!("vms/{id2}/efivars.fd"));
    assert_eq!(
        std::fs::read(&vars2)?,
        bytes,
        "UEFI variables not carried over"
    );
    assert!(!vars1.exists());
    Ok(())
}
