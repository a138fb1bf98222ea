//! HA in the lab's etcd cluster, with real QEMU and etcd: the fault matrix of issue 5.
//! Every HA VM writes numbered records to its shared disk; a client watches which
//! records were acknowledged and pings the guest. After each fault the VM runs again
//! exactly once, the disk holds every acknowledged record, and no two instances ever
//! wrote alternately.

use anyhow::{bail, Context, Result};
use ferry_lab::{
    verify_records, wait_for, AckWatcher, Cli, ClusterLab, PingRecorder, RecordReport,
    RECORD_WRITER,
};
use serde_json::Value;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");
const READY: Duration = Duration::from_secs(120);

/// An HA test VM: its name, address, and the file of its shared disk.
struct HaVm {
    name: String,
    ip: String,
    disk: PathBuf,
}

/// Boots an HA VM on `host` with a shared raw disk and starts writer instance `inst`.
fn ha_vm(lab: &ClusterLab, host: &str, name: &str, ip: &str, inst: &str) -> Result<HaVm> {
    let cli = lab.cli(host)?;
    let v = cli.boot_vm(
        name,
        ip,
        &[
            "--disk",
            "pool=shared,size=16M,format=raw",
            "--ha",
            "restart",
        ],
    )?;
    let vol = v["spec"]["disks"][0]["volume"]
        .as_str()
        .context("volume name")?;
    let vm = HaVm {
        name: name.into(),
        ip: ip.into(),
        disk: lab.shared_dir().join(vol),
    };
    start_writer(&cli, &vm, inst)?;
    Ok(vm)
}

/// Starts writer instance `inst` after the last record on the disk.
fn start_writer(cli: &Cli, vm: &HaVm, inst: &str) -> Result<()> {
    let next = verify_records(&vm.disk)?.last_seq.map_or(0, |s| s + 1);
    cli.guest_sh(
        &vm.name,
        &format!("{RECORD_WRITER}; (ferry_writer {inst} /dev/vda {next} > /dev/null 2>&1 &)"),
    )?;
    Ok(())
}

/// The hosts (with a live daemon) where `vm` runs, with its QEMU pid.
fn running_on(lab: &ClusterLab, vm: &str) -> Vec<(String, i64)> {
    let mut out = vec![];
    for h in &lab.hosts {
        if !lab.daemon_alive(&h.name) {
            continue;
        }
        let Ok(cli) = lab.cli(&h.name) else { continue };
        if let Ok(v) = cli.ferry_json(&["vm", "show", vm]) {
            if v["state"] == "running" {
                out.push((h.name.clone(), v["pid"].as_i64().unwrap_or(0)));
            }
        }
    }
    out
}

/// Waits until `vm` runs on a host other than `not_on` and its guest is up; returns
/// the host and how long it took.
fn wait_recovered(lab: &ClusterLab, vm: &str, not_on: &str, t0: Instant) -> Result<String> {
    let mut host = None;
    wait_for(
        &format!("{vm} running elsewhere"),
        Duration::from_secs(90),
        || {
            let r = running_on(lab, vm);
            host = r.into_iter().map(|(h, _)| h).find(|h| h != not_on);
            Ok(host.is_some())
        },
    )?;
    let host = host.context("recovered host")?;
    eprintln!(
        "{vm}: QEMU running on {host} {:.1} s after the fault",
        t0.elapsed().as_secs_f64()
    );
    lab.cli(&host)?.wait_console(vm, "FERRY-READY", READY)?;
    eprintln!(
        "{vm}: guest up on {host} {:.1} s after the fault",
        t0.elapsed().as_secs_f64()
    );
    Ok(host)
}

/// Waits until the client gets an answer from `ip` again.
fn wait_answers(lab: &ClusterLab, ip: &str) -> Result<()> {
    wait_for(&format!("{ip} answering"), Duration::from_secs(30), || {
        Ok(lab
            .client_cmd("ping")
            .args(["-c", "1", "-W", "1", ip])
            .stdout(std::process::Stdio::null())
            .status()?
            .success())
    })
}

/// Stops the writer on `host` and checks the disk: no gap, no corruption, instances in
/// `insts` order with no interleaving, and every acknowledged record present.
fn verify(cli: &Cli, vm: &HaVm, insts: &[&str], acked: Option<u64>) -> Result<RecordReport> {
    let last: u64 = cli
        .guest_sh(
            &vm.name,
            "touch /tmp/stop-writer; sleep 2; cat /tmp/writer-seq",
        )?
        .trim()
        .parse()?;
    let rep = verify_records(&vm.disk)?;
    eprintln!(
        "records of {}: {rep}; acknowledged before the fault: {acked:?}",
        vm.name
    );
    assert!(rep.is_clean(), "{rep}");
    assert_eq!(rep.last_seq, Some(last), "{rep}");
    let order: Vec<&str> = rep.runs.iter().map(|(i, _)| i.as_str()).collect();
    assert_eq!(order, insts, "{rep}");
    if let (Some(a), Some((first, n))) = (acked, rep.runs.first()) {
        // The first instance's records reach at least the last one acknowledged.
        assert!(
            *n > a,
            "acknowledged record {a} lost ({first} has {n}): {rep}"
        );
    }
    Ok(rep)
}

fn cluster_status(cli: &Cli) -> Result<Value> {
    cli.ferry_json(&["cluster", "status"])
}

fn host_state(st: &Value, host: &str) -> String {
    st["members"]
        .as_array()
        .and_then(|m| m.iter().find(|x| x["name"] == host))
        .and_then(|x| x["state"].as_str())
        .unwrap_or("?")
        .to_string()
}

fn manager(cli: &Cli) -> Result<String> {
    let mut m = None;
    wait_for("an HA manager", Duration::from_secs(20), || {
        m = cluster_status(cli)?["ha_manager"]
            .as_str()
            .map(String::from);
        Ok(m.is_some())
    })?;
    m.context("manager")
}

#[test]
fn host_failures_restart_ha_vms_elsewhere_exactly_once() -> Result<()> {
    let mut lab = ClusterLab::for_test(FERRY, 3)?;
    let h1 = lab.cli("h1")?;
    let st = cluster_status(&h1)?;
    assert_eq!(st["etcd_voters"], 3, "{st}");
    assert_eq!(st["has_quorum"], true, "{st}");
    let mgr = manager(&h1)?;
    let other = lab
        .hosts
        .iter()
        .map(|h| h.name.clone())
        .find(|h| *h != mgr)
        .context("a non-manager host")?;
    // One HA VM on a plain host, one on the manager's host, one non-HA VM.
    let a = ha_vm(&lab, &other, "a", "10.78.0.100", "a1")?;
    let b = ha_vm(&lab, &mgr, "b", "10.78.0.101", "b1")?;
    let plain = lab.cli(&other)?;
    plain.create_test_vm("plain", "10.78.0.102", &["--nic", "bridge=br0"])?;
    plain.ferry_ok(&["vm", "start", "plain"])?;

    // 1. A host dies (every process: daemon, etcd member, watchdog, QEMU).
    let acks = AckWatcher::start(&lab.client_ns(), &a.ip);
    let ping = PingRecorder::start(&lab.client_ns(), &a.ip, Duration::from_millis(100))?;
    std::thread::sleep(Duration::from_secs(2));
    let t0 = Instant::now();
    lab.kill_host(&other)?;
    let to = wait_recovered(&lab, "a", &other, t0)?;
    wait_answers(&lab, &a.ip)?;
    let pings = ping.stop();
    let acked = acks.stop();
    eprintln!("host failure: client pings {pings}");
    assert!(pings.longest_gap < Duration::from_secs(60), "{pings}");
    let survivor = lab.cli(&to)?;
    assert_eq!(host_state(&cluster_status(&survivor)?, &other), "fenced");
    // The non-HA VM is not restarted anywhere.
    assert!(running_on(&lab, "plain").is_empty());
    start_writer(&survivor, &a, "a2")?;
    std::thread::sleep(Duration::from_secs(2));
    verify(&survivor, &a, &["a1", "a2"], acked)?;

    // The dead host comes back (daemon restarts its etcd member): it rejoins, runs
    // nothing of a, and is online again.
    lab.start_daemon(&other)?;
    lab.wait_daemon(&other)?;
    wait_for("the host back online", Duration::from_secs(30), || {
        Ok(host_state(&cluster_status(&survivor)?, &other) == "online")
    })?;
    assert!(
        lab.qemu_pids(&other).is_empty(),
        "QEMU came back on {other}"
    );
    assert_eq!(running_on(&lab, "a").len(), 1);

    // 2. The HA manager's host dies: a new manager is elected and recovers b.
    let acks = AckWatcher::start(&lab.client_ns(), &b.ip);
    std::thread::sleep(Duration::from_secs(1));
    let t0 = Instant::now();
    lab.kill_host(&mgr)?;
    let to = wait_recovered(&lab, "b", &mgr, t0)?;
    let acked = acks.stop();
    let c = lab.cli(&to)?;
    let new_mgr = manager(&c)?;
    assert_ne!(new_mgr, mgr);
    start_writer(&c, &b, "b2")?;
    std::thread::sleep(Duration::from_secs(2));
    verify(&c, &b, &["b1", "b2"], acked)?;
    // a was untouched by all this.
    assert_eq!(running_on(&lab, "a").len(), 1);

    // 3. The dead host is gone for good: a survivor takes it out, and its certificate
    // is revoked. Itself, a live host and an unknown one are refused.
    c.ferry_fails(&["cluster", "remove", &to], "cluster leave")?;
    let live = lab
        .hosts
        .iter()
        .map(|h| h.name.clone())
        .find(|h| *h != mgr && *h != to)
        .context("a third host")?;
    c.ferry_fails(&["cluster", "remove", &live], "holds its cluster lease")?;
    c.ferry_fails(&["cluster", "remove", "h9"], "not found")?;
    let hosts = c.ferry_json(&["host", "list"])?;
    let serial = hosts
        .as_array()
        .and_then(|a| a.iter().find(|h| h["host"]["name"] == mgr.as_str()))
        .and_then(|h| h["host"]["cert_serial"].as_str().map(String::from))
        .with_context(|| format!("no serial of {mgr}: {hosts}"))?;
    c.ferry_ok(&["cluster", "remove", &mgr])?;
    let st = cluster_status(&c)?;
    assert_eq!(st["etcd_voters"], 2, "{st}");
    assert_eq!(st["members"].as_array().map(Vec::len), Some(2), "{st}");
    if mgr != "h1" {
        // The founder (h1, the CA key) lives: its next list names the certificate.
        wait_for(
            "the removed host's certificate revoked",
            Duration::from_secs(20),
            || {
                let st = lab.cli("h1")?.ferry_json(&["cluster", "certs", "status"])?;
                Ok(st["revoked"]
                    .as_array()
                    .is_some_and(|r| r.iter().any(|s| *s == serial)))
            },
        )?;
    }
    Ok(())
}

#[test]
fn a_partitioned_host_fences_itself_and_does_not_resume_after_healing() -> Result<()> {
    let lab = ClusterLab::for_test(FERRY, 3)?;
    let p = ha_vm(&lab, "h3", "p", "10.78.0.110", "p1")?;
    let acks = AckWatcher::start(&lab.client_ns(), &p.ip);
    let ping = PingRecorder::start(&lab.client_ns(), &p.ip, Duration::from_millis(100))?;
    std::thread::sleep(Duration::from_secs(2));
    let t0 = Instant::now();
    lab.set_link("h3", false)?;
    // The isolated host kills its HA QEMU before its lease can run out (TTL 3 s).
    wait_for("self-fence on h3", Duration::from_secs(6), || {
        Ok(lab.qemu_pids("h3").is_empty())
    })?;
    eprintln!(
        "h3 fenced itself {:.1} s after the cut",
        t0.elapsed().as_secs_f64()
    );
    let to = wait_recovered(&lab, "p", "h3", t0)?;
    wait_answers(&lab, &p.ip)?;
    let pings = ping.stop();
    let acked = acks.stop();
    eprintln!("partition: client pings {pings}");
    let c = lab.cli(&to)?;
    assert_eq!(host_state(&cluster_status(&c)?, "h3"), "fenced");
    // The isolated side refuses work while it has no lease.
    let o = lab.cli("h3")?.ferry(&["vm", "list"])?;
    assert!(!o.status.success(), "h3 answered without quorum");

    // Heal: h3 gets a new lease, sees p is no longer its VM, starts nothing.
    lab.set_link("h3", true)?;
    wait_for("h3 online again", Duration::from_secs(30), || {
        Ok(host_state(&cluster_status(&c)?, "h3") == "online")
    })?;
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        lab.qemu_pids("h3").is_empty(),
        "h3 resumed the old instance"
    );
    assert!(lab.cli("h3")?.vm_names()?.is_empty());
    assert_eq!(
        running_on(&lab, "p"),
        vec![(to.clone(), running_on(&lab, "p")[0].1)]
    );
    start_writer(&c, &p, "p2")?;
    std::thread::sleep(Duration::from_secs(2));
    verify(&c, &p, &["p1", "p2"], acked)?;
    Ok(())
}

#[test]
fn daemon_qemu_and_etcd_member_faults_keep_exactly_one_instance() -> Result<()> {
    let mut lab = ClusterLab::for_test(FERRY, 3)?;
    let d = ha_vm(&lab, "h2", "d", "10.78.0.120", "d1")?;
    let h2 = lab.cli("h2")?;
    let pid = running_on(&lab, "d")[0].1;

    // 1. The daemon is killed and restarted within the lease: nothing moves.
    lab.kill_daemon("h2")?;
    std::thread::sleep(Duration::from_millis(500));
    lab.start_daemon("h2")?;
    lab.wait_daemon("h2")?;
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(running_on(&lab, "d"), vec![("h2".to_string(), pid)]);

    // 2. The host's etcd member dies: the agent keeps its lease through the other
    // members and restarts the member; nothing moves.
    let etcd = lab.etcd_pid("h2").context("etcd on h2")?;
    lab.kill_etcd("h2")?;
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(running_on(&lab, "d"), vec![("h2".to_string(), pid)]);
    assert_eq!(
        host_state(&cluster_status(&lab.cli("h1")?)?, "h2"),
        "online"
    );
    wait_for("etcd member restarted", Duration::from_secs(20), || {
        Ok(lab.etcd_pid("h2").is_some_and(|p| p != etcd))
    })?;

    // 3. QEMU is killed: HA restarts it in place.
    let acks = AckWatcher::start(&lab.client_ns(), &d.ip);
    std::thread::sleep(Duration::from_secs(1));
    let t0 = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid)?),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    wait_for("d restarted on h2", Duration::from_secs(60), || {
        Ok(running_on(&lab, "d")
            .iter()
            .any(|(h, p)| h == "h2" && *p != pid))
    })?;
    h2.wait_console("d", "FERRY-READY", READY)?;
    eprintln!(
        "QEMU kill: guest up again {:.1} s later",
        t0.elapsed().as_secs_f64()
    );
    let acked = acks.stop();
    start_writer(&h2, &d, "d2")?;
    std::thread::sleep(Duration::from_secs(2));
    verify(&h2, &d, &["d1", "d2"], acked)?;
    let events = String::from_utf8_lossy(&h2.ferry(&["events", "--vm", "d"])?.stdout).into_owned();
    assert!(events.contains("HA restart 1 of 3"), "{events}");

    // 4. The daemon dies for good: the watchdog kills the HA QEMU before the lease
    // expires, then HA restarts the VM elsewhere; the restarted daemon runs nothing.
    h2.guest_sh("d", &format!("rm -f /tmp/stop-writer; {RECORD_WRITER}; (ferry_writer d3 /dev/vda $(( $(cat /tmp/writer-seq) + 1 )) > /dev/null 2>&1 &)"))?;
    let acks = AckWatcher::start(&lab.client_ns(), &d.ip);
    std::thread::sleep(Duration::from_secs(2));
    let qemu = lab.qemu_pids("h2");
    assert_eq!(qemu.len(), 1);
    let t0 = Instant::now();
    lab.kill_daemon("h2")?;
    wait_for("watchdog kill on h2", Duration::from_secs(6), || {
        Ok(lab.qemu_pids("h2").is_empty())
    })?;
    eprintln!(
        "watchdog fired {:.1} s after the daemon died",
        t0.elapsed().as_secs_f64()
    );
    let to = wait_recovered(&lab, "d", "h2", t0)?;
    let acked = acks.stop();
    lab.start_daemon("h2")?;
    lab.wait_daemon("h2")?;
    std::thread::sleep(Duration::from_secs(3));
    assert!(lab.qemu_pids("h2").is_empty());
    assert!(h2.vm_names()?.is_empty());
    let c = lab.cli(&to)?;
    start_writer(&c, &d, "d4")?;
    std::thread::sleep(Duration::from_secs(2));
    let rep = verify(&c, &d, &["d1", "d2", "d3", "d4"], None)?;
    let d3_end = rep.runs.iter().take(3).map(|(_, n)| n).sum::<u64>();
    if let Some(a) = acked {
        assert!(d3_end > a, "acknowledged record {a} lost: {rep}");
    }

    // 5. A crash loop: with at most one restart per host (the recovery start counted),
    // the next crash moves the VM to another host instead.
    c.ferry_ok(&["vm", "ha", "d", "--ha-max-restarts", "1"])?;
    let pid = running_on(&lab, "d")[0].1;
    let t0 = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid)?),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    let moved = wait_recovered(&lab, "d", &to, t0)?;
    let events = String::from_utf8_lossy(&c.ferry(&["events", "--vm", "d"])?.stdout).into_owned();
    assert!(events.contains("HA moves it to another host"), "{events}");
    let m = lab.cli(&moved)?;
    start_writer(&m, &d, "d5")?;
    std::thread::sleep(Duration::from_secs(2));
    verify(&m, &d, &["d1", "d2", "d3", "d4", "d5"], None)?;
    Ok(())
}

#[test]
fn cluster_commands_and_bad_requests() -> Result<()> {
    let lab = ClusterLab::for_test(FERRY, 2)?;
    let h1 = lab.cli("h1")?;
    let st = cluster_status(&h1)?;
    assert_eq!(st["etcd_voters"], 2);
    // Two voters: the status says a witness is needed.
    assert!(
        st["warnings"][0]
            .as_str()
            .unwrap_or("")
            .contains("third voter"),
        "{st}"
    );
    // etcd's database: each member's size against ferry's explicit quota, no alarm.
    let e = &st["etcd"];
    assert_eq!(e["quota_bytes"], 2u64 << 30, "{st}");
    assert_eq!(e["members"].as_array().map(Vec::len), Some(2), "{st}");
    assert!(
        e["members"][0]["db_size_bytes"]
            .as_u64()
            .context("db_size_bytes")?
            > 0,
        "{st}"
    );
    assert_eq!(e["alarms"], serde_json::json!([]), "{st}");
    let text = h1.ferry_ok(&["cluster", "status"])?;
    assert!(
        text.contains("etcd database: ") && text.contains("alarms: none"),
        "{text}"
    );
    // The host whose member leads tends etcd: its metrics show every member's size.
    let metrics = |c: &Cli| -> Result<String> {
        let o = c
            .cmd("curl")
            .args(["-s", "http://localhost/metrics", "--unix-socket"])
            .arg(&c.socket)
            .output()?;
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let h2 = lab.cli("h2")?;
    wait_for(
        "etcd metrics on the tending host",
        Duration::from_secs(40),
        || {
            let all = metrics(&h1)? + &metrics(&h2)?;
            Ok(all.contains("ferry_etcd_db_bytes{member=\"h1\"}")
                && all.contains("ferry_etcd_db_bytes{member=\"h2\"}")
                && all.contains("ferry_etcd_quota_bytes 2147483648"))
        },
    )?;
    // Already a member: init and join are refused and change nothing.
    let o = h1.ferry(&["cluster", "init", "--address", "10.78.0.11"])?;
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("already in a cluster"));
    // A bad HA mode, a bad group name: refused, nothing changed.
    let o = h1.ferry(&["vm", "create", "x", "--memory", "64M", "--ha", "sometimes"])?;
    assert!(String::from_utf8_lossy(&o.stderr).contains("--ha sometimes"));
    h1.ferry_ok(&["vm", "create", "x", "--memory", "64M"])?;
    let o = h1.ferry(&[
        "vm",
        "ha",
        "x",
        "--ha",
        "restart",
        "--ha-group",
        "bad name!",
    ])?;
    assert!(!o.status.success());
    let v = h1.ferry_json(&["vm", "show", "x"])?;
    assert!(v["spec"].get("ha").is_none(), "{v}");
    h1.ferry_ok(&["vm", "ha", "x", "--ha", "restart", "--ha-priority", "5"])?;
    let v = h1.ferry_json(&["vm", "show", "x"])?;
    assert_eq!(v["spec"]["ha"]["priority"], 5);
    // VM ids are the cluster's: a VM on h2 gets the next one; names are the cluster's.
    let id1 = v["id"].as_u64().unwrap();
    let o = h2.ferry(&["vm", "create", "x", "--memory", "64M"])?;
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("already exists on host h1"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(h2.vm_names()?.is_empty());
    h2.ferry_ok(&["vm", "create", "y", "--memory", "64M"])?;
    assert!(h2.ferry_json(&["vm", "show", "y"])?["id"].as_u64().unwrap() > id1);
    // No VM runs on h2: it leaves, and keeps its VM in its own store.
    h2.ferry_ok(&["cluster", "leave"])?;
    let st = cluster_status(&h2)?;
    assert_eq!(st["clustered"], false);
    assert_eq!(h2.vm_names()?, vec!["y".to_string()]);
    assert!(st.get("etcd").is_none(), "{st}");
    let st = cluster_status(&h1)?;
    assert_eq!(st["etcd_voters"], 1);
    if st["members"].as_array().map(|m| m.len()) != Some(1) {
        bail!("h2 still listed: {st}");
    }
    Ok(())
}

/// Quorum does not count every hypervisor: a fourth host joins as a client of the
/// three etcd voters (no member of its own), holds a lease and defines VMs. A voter
/// down longer than the replacement delay is removed from etcd and the client promoted
/// in its place (a learner first); the old voter, back, finds its member gone and
/// becomes a client. When a voter leaves, that host is promoted again: three voters.
#[test]
fn hosts_beyond_three_are_clients_of_the_voters() -> Result<()> {
    let mut serve_args = std::collections::BTreeMap::new();
    serve_args.insert(
        "*".to_string(),
        vec!["--voter-replace-after".to_string(), "10".to_string()],
    );
    let lab = ClusterLab::for_test_with(
        FERRY,
        4,
        ferry_lab::LabOptions {
            serve_args,
            ..Default::default()
        },
    )?;
    let h1 = lab.cli("h1")?;
    let st = cluster_status(&h1)?;
    assert_eq!(st["etcd_voters"], 3, "{st}");
    let members = st["members"].as_array().context("members")?;
    assert_eq!(members.len(), 4, "{st}");
    let clients: Vec<&str> = members
        .iter()
        .filter(|m| m["etcd_member"] == false)
        .filter_map(|m| m["name"].as_str())
        .collect();
    assert_eq!(clients, vec!["h4"], "{st}");
    let text = h1.ferry_ok(&["cluster", "status"])?;
    assert!(text.contains("client"), "{text}");
    // The client is a full host: a lease, VMs, names the cluster's.
    let h4 = lab.cli("h4")?;
    wait_for(
        "a lease on the client host",
        Duration::from_secs(30),
        || {
            let st = cluster_status(&h4)?;
            Ok(st["members"]
                .as_array()
                .and_then(|m| m.iter().find(|x| x["name"] == "h4"))
                .is_some_and(|m| m["lease_ttl_left_s"].as_i64().is_some()))
        },
    )?;
    h4.ferry_ok(&["vm", "create", "c1", "--memory", "64M"])?;
    let o = h1.ferry(&["vm", "create", "c1", "--memory", "64M"])?;
    assert!(!o.status.success(), "a second c1 on h1");
    h4.ferry_ok(&["vm", "delete", "c1"])?;

    // A voter's etcd member an older ferry started (a day of history, no quota): the
    // next start of its daemon restarts it with today's flags, quorum kept.
    let mut lab = lab;
    let old = lab.etcd_pid("h2").context("h2's etcd member")?;
    let argv: Vec<String> = std::fs::read(format!("/proc/{old}/cmdline"))?
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let older: Vec<String> = argv[1..]
        .iter()
        .filter(|a| !a.starts_with("--quota-backend-bytes="))
        .map(|a| {
            if a.starts_with("--auto-compaction-retention=") {
                "--auto-compaction-retention=24h".to_string()
            } else {
                a.clone()
            }
        })
        .collect();
    lab.kill_daemon("h2")?;
    lab.kill_etcd("h2")?;
    wait_for("h2's member gone", Duration::from_secs(10), || {
        Ok(lab.etcd_pid("h2").is_none())
    })?;
    let ns = lab.host("h2")?.ns.clone();
    let log = lab.state_dir("h2").join("cluster/etcd.log");
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &ns, "sh", "-c"])
        .arg(r#"log=$1; shift; setsid "$@" >>"$log" 2>&1 </dev/null & echo $!"#)
        .arg("sh")
        .arg(&log)
        .arg(&argv[0])
        .args(&older)
        .output()?;
    let pid: i32 = String::from_utf8_lossy(&out.stdout).trim().parse()?;
    std::fs::write(lab.run_dir("h2").join("etcd.pid"), pid.to_string())?;
    wait_for(
        "quorum with the older member",
        Duration::from_secs(30),
        || Ok(cluster_status(&h1)?["has_quorum"] == true && lab.etcd_pid("h2") == Some(pid)),
    )?;
    lab.start_daemon("h2")?;
    lab.wait_daemon("h2")?;
    wait_for(
        "h2's member restarted with the new flags",
        Duration::from_secs(60),
        || {
            let Some(now) = lab.etcd_pid("h2") else {
                return Ok(false);
            };
            let cmd = String::from_utf8_lossy(&std::fs::read(format!("/proc/{now}/cmdline"))?)
                .replace('\0', " ");
            Ok(now != pid
                && cmd.contains("--quota-backend-bytes=2147483648")
                && cmd.contains("--auto-compaction-retention=5m"))
        },
    )?;
    wait_for("quorum after the restart", Duration::from_secs(30), || {
        Ok(cluster_status(&h1)?["has_quorum"] == true)
    })?;
    let o = h1.ferry_json(&["cluster", "status"])?;
    assert_eq!(o["etcd_voters"], 3, "{o}");

    // h3 goes down (daemon and etcd member): after the delay its member is removed
    // and the client h4 voted in its place; the cluster keeps three voters.
    lab.kill_daemon("h3")?;
    lab.kill_etcd("h3")?;
    let is_member = |st: &serde_json::Value, host: &str| {
        st["members"]
            .as_array()
            .and_then(|m| m.iter().find(|x| x["name"] == host))
            .map(|m| m["etcd_member"] == true)
    };
    let replaced = wait_for("h4 voted in h3's place", Duration::from_secs(400), || {
        let st = cluster_status(&h1)?;
        Ok(st["etcd_voters"] == 3
            && st["has_quorum"] == true
            && is_member(&st, "h4") == Some(true)
            && is_member(&st, "h3") == Some(false))
    });
    if replaced.is_err() {
        dump_voters(&lab, &["h1", "h2", "h4"]);
    }
    replaced?;
    assert!(lab.etcd_pid("h4").is_some(), "h4 runs a member");
    // h3 comes back: its member was replaced, it becomes a client (and holds a lease).
    lab.start_daemon("h3")?;
    let h3 = lab.cli("h3")?;
    wait_for("h3 back as a client", Duration::from_secs(300), || {
        let Ok(st) = cluster_status(&h3) else {
            return Ok(false);
        };
        let me = st["members"]
            .as_array()
            .and_then(|m| m.iter().find(|x| x["name"] == "h3"))
            .cloned()
            .unwrap_or_default();
        Ok(me["etcd_member"] == false
            && me["lease_ttl_left_s"].as_i64().is_some()
            && lab.etcd_pid("h3").is_none())
    })?;
    // The tending host (the HA manager, any of them) says what it did; h4 what it became.
    let mut events = String::new();
    for h in ["h1", "h2", "h4"] {
        events += &lab.cli(h)?.ferry_ok(&["events"])?;
    }
    assert!(events.contains("h4 is an etcd voter now"), "{events}");
    assert!(
        events.contains("removed from etcd") && events.contains("h4 becomes an etcd voter"),
        "{events}"
    );
    // A voter leaves: a client (h3, whose earlier member was removed) is promoted,
    // three voters again.
    h4.ferry_ok(&["cluster", "leave"])?;
    let three = wait_for(
        "three voters after h4 left",
        Duration::from_secs(400),
        || {
            let st = cluster_status(&h1)?;
            Ok(st["etcd_voters"] == 3
                && st["has_quorum"] == true
                && is_member(&st, "h3") == Some(true)
                && st["members"].as_array().map(Vec::len) == Some(3))
        },
    );
    if three.is_err() {
        dump_voters(&lab, &["h1", "h2", "h3", "h4"]);
    }
    three?;
    // h3's daemon restarts on its voter configuration (its VMs keep running): the CLI
    // finds it again.
    wait_for(
        "h3's daemon back as a voter",
        Duration::from_secs(60),
        || Ok(is_member(&cluster_status(&h3)?, "h3") == Some(true)),
    )?;
    // (the status may have come from the daemon just before it restarted: the create
    // is tried until the new one answers)
    wait_for("a VM created on h3", Duration::from_secs(60), || {
        let o = h3.ferry(&["vm", "create", "c2", "--memory", "64M"])?;
        let err = String::from_utf8_lossy(&o.stderr);
        if !o.status.success()
            && !err.contains("reach the ferry daemon")
            && !err.contains("already exists")
        {
            anyhow::bail!("vm create on h3: {err}");
        }
        Ok(o.status.success() || err.contains("already exists"))
    })?;
    // (the create may have been answered by the daemon just before its restart, too)
    wait_for("c2 shown by h3", Duration::from_secs(60), || {
        let o = h3.ferry(&["--json", "vm", "show", "c2"])?;
        let err = String::from_utf8_lossy(&o.stderr);
        if !o.status.success() {
            if err.contains("reach the ferry daemon") {
                return Ok(false);
            }
            anyhow::bail!("vm show c2 on h3: {err}");
        }
        let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
        Ok(v["id"].is_u64())
    })?;
    Ok(())
}

/// What each host says (events, the end of its daemon's log) and the cluster's status,
/// when a voter change did not come in time.
fn dump_voters(lab: &ClusterLab, hosts: &[&str]) {
    for h in hosts {
        let ev = lab
            .cli(h)
            .and_then(|c| c.ferry(&["events"]))
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default();
        let log = lab.daemon_log(h);
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        let etcd = std::fs::read_to_string(lab.state_dir(h).join("cluster").join("etcd.log"))
            .unwrap_or_default();
        let etcd_tail: Vec<&str> = etcd.lines().rev().take(40).collect();
        eprintln!(
            "--- {h} events\n{ev}\n--- {h} daemon log (last lines, newest first)\n{}\n--- {h} etcd log (newest first)\n{}",
            tail.join("\n"),
            etcd_tail.join("\n")
        );
    }
    if let Ok(c) = lab.cli("h1") {
        eprintln!("--- status {:?}", cluster_status(&c).ok());
    }
}
