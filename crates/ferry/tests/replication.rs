//! Replicated volumes in the lab's etcd cluster with real QEMU (issue 6): a VM on a
//! replicated pool (copies on h1 and h2) writes numbered records through the NBD
//! export while the client watches which were acknowledged. The secondary's daemon is
//! killed (the primary writes on, the secondary is outdated), comes back and resyncs
//! only what it missed; the primary host loses power mid-write and HA restarts the VM
//! on h2 from its copy with every acknowledged record; the dead host returns as a
//! secondary and catches up; a live migration hands the primary over at switchover.
//! Then a split brain made on purpose (replication off, both sides forced to write) is
//! reported with nothing discarded until the admin resolves it.

use anyhow::{Context, Result};
use ferry_lab::{verify_records, wait_for, AckWatcher, Cli, ClusterLab, RECORD_WRITER};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

fn status(cli: &Cli, vol: &str) -> Result<Value> {
    cli.ferry_json(&["volume", "replication", "r1", vol])
}

/// The primary's view of peer `peer`.
fn peer_state(s: &Value, peer: &str) -> String {
    s["replicas"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["replica"]["peers"].as_array())
        .flatten()
        .find(|p| p["host"] == peer)
        .map(|p| p["state"].as_str().unwrap_or("").to_string())
        .unwrap_or_default()
}

fn wait_in_sync(cli: &Cli, vol: &str, primary: &str, peer: &str) -> Result<Value> {
    let mut last = Value::Null;
    wait_for(
        &format!("{peer} up to date with {primary} for {vol}"),
        Duration::from_secs(60),
        || {
            last = status(cli, vol)?;
            Ok(last["volume"]["primary"] == primary
                && peer_state(&last, peer) == "up-to-date"
                && last["volume"]["outdated"]
                    .as_array()
                    .is_some_and(|o| o.is_empty()))
        },
    )
    .with_context(|| format!("last status: {last}"))?;
    Ok(last)
}

fn copy_file(lab: &ClusterLab, host: &str, vol: &str) -> PathBuf {
    lab.dir
        .join(format!("repl-{host}"))
        .join(format!("{vol}.raw"))
}

/// `ferry pool create r1` of a replicated pool on `hosts`.
fn pool_args<'a>(hosts: &'a str, path: &'a str) -> [&'a str; 9] {
    [
        "pool",
        "create",
        "r1",
        "--type",
        "replicated",
        "--hosts",
        hosts,
        "--path",
        path,
    ]
}

/// Runs qemu-io commands on a host's NBD export of r1/`vol`.
fn qemu_io(lab: &ClusterLab, host: &str, vol: &str, cmds: &[&str]) -> Result<String> {
    let sock = lab.run_dir(host).join("nbd").join(format!("r1.{vol}.sock"));
    let mut c = std::process::Command::new("qemu-io");
    c.arg("--image-opts").arg(format!(
        "driver=raw,file.driver=nbd,file.server.type=unix,file.server.path={},file.export=r1/{vol}",
        sock.display()
    ));
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    let out = c.output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    anyhow::ensure!(
        out.status.success() && !text.contains("failed"),
        "qemu-io {cmds:?} on {host}: {text}"
    );
    Ok(text)
}

fn region(path: &Path, at: usize, len: usize) -> Result<Vec<u8>> {
    let d = std::fs::read(path)?;
    Ok(d[at..at + len].to_vec())
}

fn start_writer(cli: &Cli, vm: &str, inst: &str, disk: &Path) -> Result<()> {
    let next = verify_records(disk)?.last_seq.map_or(0, |s| s + 1);
    cli.guest_sh(
        vm,
        &format!("{RECORD_WRITER}; (ferry_writer {inst} /dev/vda {next} > /dev/null 2>&1 &)"),
    )?;
    Ok(())
}

/// Records acknowledged so far (as the guest says).
fn written(cli: &Cli, vm: &str) -> Result<u64> {
    Ok(cli.guest_sh(vm, "cat /tmp/writer-seq")?.trim().parse()?)
}

#[test]
fn replicated_volumes_survive_peer_and_primary_failures_and_report_split_brain() -> Result<()> {
    let mut lab = ClusterLab::for_test(FERRY, 3)?;
    let h1 = lab.cli("h1")?;
    let h2 = lab.cli("h2")?;
    let h3 = lab.cli("h3")?;
    let path = format!("{}/repl-{{host}}", lab.dir.display());

    // Bad pools are refused and nothing is defined.
    h1.ferry_fails(&pool_args("h1", &path), "2 or 3")?;
    h1.ferry_fails(&pool_args("h1,h9", &path), "h9 is not a host")?;
    h3.ferry_fails(&["pool", "show", "r1"], "not found")?;
    h1.ferry_ok(&pool_args("h1,h2", &path))?;
    let p = h3.ferry_json(&["pool", "show", "r1"])?;
    assert_eq!(p["spec"]["hosts"], serde_json::json!(["h1", "h2"]), "{p}");
    h1.ferry_fails(
        &[
            "volume", "create", "r1", "q", "--size", "8M", "--format", "qcow2",
        ],
        "raw",
    )?;

    // An HA VM whose disk is replicated, writing records.
    let ip = "10.78.0.140";
    let v = h1.boot_vm(
        "r",
        ip,
        &["--disk", "pool=r1,size=16M,format=raw", "--ha", "restart"],
    )?;
    let vol = v["spec"]["disks"][0]["volume"]
        .as_str()
        .context("volume")?
        .to_string();
    wait_in_sync(&h1, &vol, "h1", "h2")?;
    let acks = AckWatcher::start(&lab.client_ns(), ip);
    start_writer(&h1, "r", "r1", &copy_file(&lab, "h1", &vol))?;
    std::thread::sleep(Duration::from_secs(3));

    // The secondary dies: writes go on, h2 is outdated and its regions recorded.
    lab.kill_daemon("h2")?;
    let before = written(&h1, "r")?;
    wait_for("writes without h2", Duration::from_secs(30), || {
        Ok(written(&h1, "r")? > before + 20)
    })?;
    let s = status(&h1, &vol)?;
    assert_eq!(s["volume"]["outdated"], serde_json::json!(["h2"]), "{s}");
    let h1_copy = s["replicas"][0]["replica"].clone();
    assert!(
        h1_copy["peers"][0]["out_of_sync_bytes"]
            .as_u64()
            .unwrap_or(0)
            > 0,
        "{s}"
    );
    // An outdated copy may not be promoted (nothing changes).
    lab.start_daemon("h2")?;
    lab.wait_daemon("h2")?;
    let t = Instant::now();
    let s = wait_in_sync(&h1, &vol, "h1", "h2")?;
    eprintln!(
        "h2 resynced {:.1} s after its daemon came back: {}",
        t.elapsed().as_secs_f64(),
        s["replicas"][1]
    );
    let verify = h1.ferry_json(&["volume", "verify", "r1", &vol])?;
    assert_eq!(verify[0]["peer"], "h2", "{verify}");
    assert_eq!(verify[0]["differing"], serde_json::json!([]), "{verify}");
    assert_eq!(verify[0]["bytes_compared"], 16 << 20, "{verify}");
    let events = h1.ferry_ok(&["events"])?;
    assert!(events.contains("is up to date ("), "{events}");
    let resynced: Vec<&str> = events.lines().filter(|l| l.contains("resynced")).collect();
    eprintln!("{resynced:?}");

    // The primary host loses power mid-write: HA restarts r on h2, its copy promoted.
    let acked_before = acks.highest();
    std::thread::sleep(Duration::from_secs(2));
    let t0 = Instant::now();
    lab.kill_host("h1")?;
    let acked = acks.stop();
    assert!(acked > acked_before, "no records acknowledged: {acked:?}");
    wait_for("r running on h2", Duration::from_secs(120), || {
        Ok(h2
            .vm_state("r")
            .map(|(s, _)| s == "running")
            .unwrap_or(false))
    })?;
    h2.wait_console("r", "FERRY-READY", Duration::from_secs(120))?;
    eprintln!(
        "r back on h2 {:.1} s after the power cut",
        t0.elapsed().as_secs_f64()
    );
    let s = status(&h2, &vol)?;
    assert_eq!(s["volume"]["primary"], "h2", "{s}");
    assert_eq!(s["volume"]["generation"]["host"], "h2", "{s}");
    let rep = verify_records(&copy_file(&lab, "h2", &vol))?;
    eprintln!("records on h2's copy after the failover: {rep}; acknowledged: {acked:?}");
    assert!(rep.is_clean(), "{rep}");
    assert!(
        rep.last_seq >= acked,
        "acknowledged record {acked:?} lost: {rep}"
    );
    start_writer(&h2, "r", "r2", &copy_file(&lab, "h2", &vol))?;

    // h1 comes back: its stale copy becomes a secondary and catches up.
    lab.start_daemon("h1")?;
    lab.wait_daemon("h1")?;
    let s = wait_in_sync(&h2, &vol, "h2", "h1")?;
    let h1_gen = &s["replicas"][0]["replica"]["generation"];
    assert_eq!(h1_gen["host"], "h2", "h1 follows h2's generation: {s}");
    h1.ferry_fails(&["volume", "promote", "r1", &vol], "in use on h2")?;

    // Live migration back to h1 hands the primary over at switchover.
    let m = h2.ferry_json(&["vm", "migrate", "r", "--to", "h1"])?;
    eprintln!("migration: {m}");
    let s = wait_in_sync(&h1, &vol, "h1", "h2")?;
    assert_eq!(s["volume"]["generation"]["host"], "h1", "{s}");
    let n = written(&h1, "r")?;
    wait_for(
        "writes after the migration",
        Duration::from_secs(30),
        || Ok(written(&h1, "r")? > n + 10),
    )?;
    let last: u64 = h1
        .guest_sh("r", "touch /tmp/stop-writer; sleep 2; cat /tmp/writer-seq")?
        .trim()
        .parse()?;
    let s = wait_in_sync(&h1, &vol, "h1", "h2")?;
    drop(s);
    let verify = h1.ferry_json(&["volume", "verify", "r1", &vol])?;
    assert_eq!(verify[0]["differing"], serde_json::json!([]), "{verify}");
    for h in ["h1", "h2"] {
        let rep = verify_records(&copy_file(&lab, h, &vol))?;
        eprintln!("records on {h}'s copy: {rep}");
        assert!(rep.is_clean(), "{h}: {rep}");
        assert_eq!(rep.last_seq, Some(last), "{h}: {rep}");
        let order: Vec<&str> = rep.runs.iter().map(|(i, _)| i.as_str()).collect();
        assert_eq!(order, ["r1", "r2"], "{h}: {rep}");
    }
    assert_eq!(
        std::fs::read(copy_file(&lab, "h1", &vol))?,
        std::fs::read(copy_file(&lab, "h2", &vol))?
    );

    // Split brain, made on purpose: replication off, h1 writes, h2 is forced to
    // primary and writes too.
    h1.ferry_ok(&["volume", "create", "r1", "sb", "--size", "8M"])?;
    h1.ferry_ok(&["volume", "promote", "r1", "sb"])?;
    wait_in_sync(&h1, "sb", "h1", "h2")?;
    qemu_io(&lab, "h1", "sb", &["write -P 0x11 0 1M"])?;
    h1.ferry_ok(&["volume", "disconnect", "r1", "sb"])?;
    qemu_io(&lab, "h1", "sb", &["write -P 0xaa 1M 1M"])?;
    h1.ferry_ok(&["volume", "demote", "r1", "sb"])?;
    h2.ferry_fails(&["volume", "promote", "r1", "sb"], "outdated")?;
    h2.ferry_ok(&["volume", "promote", "r1", "sb", "--force"])?;
    qemu_io(&lab, "h2", "sb", &["write -P 0xbb 2M 1M"])?;
    h2.ferry_ok(&["volume", "connect", "r1", "sb"])?;
    let mut s = Value::Null;
    wait_for("split brain reported", Duration::from_secs(30), || {
        s = status(&h2, "sb")?;
        Ok(s["volume"]["split_brain"].is_string())
    })?;
    eprintln!("split brain: {}", s["volume"]["split_brain"]);
    assert_eq!(peer_state(&s, "h1"), "refused", "{s}");
    let text = h2.ferry_ok(&["volume", "replication", "r1", "sb"])?;
    assert!(text.contains("SPLIT BRAIN"), "{text}");
    // nothing was discarded: each side still has its own writes
    let (f1, f2) = (copy_file(&lab, "h1", "sb"), copy_file(&lab, "h2", "sb"));
    assert!(region(&f1, 1 << 20, 1 << 20)?.iter().all(|b| *b == 0xaa));
    assert!(region(&f2, 2 << 20, 1 << 20)?.iter().all(|b| *b == 0xbb));
    assert!(region(&f2, 1 << 20, 1 << 20)?.iter().all(|b| *b == 0));
    h1.ferry_fails(&["volume", "promote", "r1", "sb"], "split brain")?;
    h1.ferry_fails(
        &["volume", "resolve", "r1", "sb", "--keep", "h1"],
        "in use on h2",
    )?;
    h1.ferry_fails(
        &["volume", "resolve", "r1", "sb", "--keep", "h3"],
        "keeps no copy",
    )?;

    // The admin keeps h1's copy: h2's is kept aside as a file and synced in full.
    h2.ferry_ok(&["volume", "demote", "r1", "sb"])?;
    h1.ferry_ok(&["volume", "resolve", "r1", "sb", "--keep", "h1"])?;
    let aside: Vec<PathBuf> = std::fs::read_dir(lab.dir.join("repl-h2"))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().contains("sb.splitbrain-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert!(region(&aside[0], 2 << 20, 1 << 20)?
        .iter()
        .all(|b| *b == 0xbb));
    h1.ferry_ok(&["volume", "promote", "r1", "sb"])?;
    wait_in_sync(&h1, "sb", "h1", "h2")?;
    h1.ferry_ok(&["volume", "demote", "r1", "sb"])?;
    assert_eq!(std::fs::read(&f1)?, std::fs::read(&f2)?);
    assert!(region(&f2, 1 << 20, 1 << 20)?.iter().all(|b| *b == 0xaa));

    // Placement keeps a VM with a replicated disk on the pool's hosts.
    let create = h3.ferry_ok(&[
        "vm",
        "create",
        "p",
        "--place",
        "--memory",
        "64M",
        "--disk",
        "pool=r1,size=8M,format=raw",
    ])?;
    eprintln!("{}", create.trim());
    assert!(
        h3.ferry(&["vm", "show", "p"])?.status.code() != Some(0),
        "p on h3"
    );
    let on = if h1.ferry(&["vm", "show", "p"])?.status.success() {
        &h1
    } else {
        &h2
    };
    on.ferry_ok(&["vm", "delete", "p"])?;

    // Deleting: refused while used, then the copies go on both hosts.
    h1.ferry_fails(&["volume", "delete", "r1", &vol], "used by VM r")?;
    h1.ferry_ok(&["volume", "delete", "r1", "sb"])?;
    assert!(!f1.exists() && !f2.exists());
    Ok(())
}
