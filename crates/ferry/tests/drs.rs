//! DRS in the lab's etcd cluster with real QEMU (issue 7): three hosts that DRS treats
//! as 2 cores / 1 GiB each; three VMs start on h1, one of them busy; in manual mode
//! DRS only recommends, in automatic mode it live-migrates until the hosts are even
//! while the client pings every VM, and a VM started on a host that cannot run it
//! starts where placement says. Then resource pools (cgroup limits enforced on the
//! QEMU, limits refusing starts), HA admission control, placement with labels, and bad
//! input that changes nothing.

use anyhow::{Context, Result};
use ferry_lab::{cpu_seconds, wait_for, ClusterLab, LabOptions, PingRecorder};
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

fn lab() -> Result<ClusterLab> {
    let mut serve_args = BTreeMap::new();
    serve_args.insert(
        "*".to_string(),
        ["--drs-cpus", "2", "--drs-memory", "1G"]
            .map(String::from)
            .to_vec(),
    );
    serve_args.insert("h3".to_string(), vec!["--label".into(), "ssd".into()]);
    ClusterLab::for_test_with(
        FERRY,
        3,
        LabOptions {
            serve_args,
            ..Default::default()
        },
    )
}

/// Host → VMs running there.
fn placement(lab: &ClusterLab) -> Result<BTreeMap<String, Vec<String>>> {
    let mut out = BTreeMap::new();
    for h in &lab.hosts {
        let vms = lab.cli(&h.name)?.ferry_json(&["vm", "list", "--here"])?;
        let names: Vec<String> = vms
            .as_array()
            .context("vm list")?
            .iter()
            .filter(|v| v["state"] == "running")
            .filter_map(|v| v["spec"]["name"].as_str().map(String::from))
            .collect();
        out.insert(h.name.clone(), names);
    }
    Ok(out)
}

#[test]
fn drs_balances_live_and_enforces_pools_and_admission() -> Result<()> {
    let lab = lab()?;
    let h1 = lab.cli("h1")?;
    let h2 = lab.cli("h2")?;

    // Settings: bad input is refused and changes nothing.
    h1.ferry_ok(&[
        "drs",
        "config",
        "--mode",
        "manual",
        "--interval",
        "1",
        "--window",
        "4",
        "--hysteresis",
        "600",
    ])?;
    h1.ferry_fails(&["drs", "config", "--level", "9"], "level")?;
    h1.ferry_fails(&["drs", "config", "--mode", "sometimes"], "sometimes")?;
    let cfg = h2.ferry_json(&["drs", "config"])?;
    assert_eq!(cfg["level"], 3, "{cfg}");
    assert_eq!(cfg["mode"], "manual", "{cfg}");

    // Three VMs on h1 (3 × 256 MiB of 1 GiB), one of them spinning.
    let vms = [
        ("a", "10.78.0.130"),
        ("b", "10.78.0.131"),
        ("c", "10.78.0.132"),
    ];
    for (n, ip) in vms {
        h1.boot_vm(n, ip, &[])?;
    }
    h1.guest_sh("a", "(while :; do :; done > /dev/null 2>&1 &)")?;

    let explain = h1.ferry_json(&["vm", "place", "a", "--explain"])?;
    assert_eq!(
        explain["hosts"].as_array().map(Vec::len),
        Some(3),
        "{explain}"
    );
    assert_ne!(explain["host"], "h1", "{explain}");
    let plan = h2.ferry_json(&["drs", "plan"])?;
    let moves = plan["moves"].as_array().context("moves")?;
    assert!(!moves.is_empty(), "{plan}");
    assert!(moves.iter().all(|m| m["from"] == "h1"), "{plan}");
    // h1 publishes totals only; h2's plan knows which VM spins because it asked h1
    // for each VM's load (GET /api/v1/host/loads) when it balanced.
    let mut spinning = None;
    wait_for("h2's plan to see a spin", Duration::from_secs(60), || {
        let plan = h2.ferry_json(&["drs", "plan"])?;
        spinning = plan["moves"].as_array().and_then(|m| {
            m.iter()
                .find(|m| m["vm"] == "a")
                .and_then(|m| m["reason"].as_str())
                .and_then(|r| r.split("CPU load ").nth(1))
                .and_then(|r| r.split(' ').next())
                .and_then(|c| c.parse::<f64>().ok())
                .filter(|c| *c >= 0.3)
        });
        Ok(spinning.is_some())
    })?;
    eprintln!("h2's plan moves a with {spinning:?} cores");

    // Manual: recommendations only.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(placement(&lab)?["h1"].len(), 3);
    let st = h1.ferry_json(&["drs", "status"])?;
    assert!(
        st["plan"]["moves"]
            .as_array()
            .is_some_and(|m| !m.is_empty()),
        "{st}"
    );

    // Automatic: live migrations until even, with the client pinging every VM.
    let pings: Vec<PingRecorder> = vms
        .iter()
        .map(|(_, ip)| PingRecorder::start(&lab.client_ns(), ip, Duration::from_millis(100)))
        .collect::<Result<_>>()?;
    std::thread::sleep(Duration::from_secs(1));
    let t0 = Instant::now();
    h1.ferry_ok(&["drs", "config", "--mode", "automatic"])?;
    wait_for("one VM per host", Duration::from_secs(180), || {
        Ok(placement(&lab)?.values().all(|v| v.len() == 1))
    })?;
    eprintln!(
        "balanced {:.1} s after automatic mode",
        t0.elapsed().as_secs_f64()
    );
    // Stays so: balanced, and the moved VMs are within their hysteresis.
    std::thread::sleep(Duration::from_secs(4));
    let now = placement(&lab)?;
    assert!(now.values().all(|v| v.len() == 1), "{now:?}");
    for (p, (n, _)) in pings.into_iter().zip(vms) {
        let r = p.stop();
        eprintln!("{n}: {r}");
        assert!(r.received > 0, "{n}: {r}");
        assert!(r.lost <= 1, "{n}: {r}");
    }
    let events = h1.ferry_ok(&["events"])?
        + &h2.ferry_ok(&["events"])?
        + &lab.cli("h3")?.ferry_ok(&["events"])?;
    assert!(events.contains("DRS moves"), "{events}");
    assert!(events.contains("DRS recommends"), "{events}");
    // Automatic mode places at start: s needs label ssd (only h3) but is defined on h1.
    h1.create_test_vm("s", "10.78.0.136", &["--host-label", "ssd"])?;
    let out = h1.ferry_ok(&["vm", "start", "s"])?;
    assert!(out.contains("runs on h3"), "{out}");
    assert_eq!(lab.cli("h3")?.vm_state("s")?.0, "running");
    assert!(!h1.vm_names()?.contains(&"s".to_string()));
    lab.cli("h3")?.ferry_ok(&["vm", "kill", "s"])?;
    h1.ferry_ok(&["drs", "config", "--mode", "manual"])?;
    // Quiet hosts for what follows.
    for (h, names) in &now {
        for n in names {
            lab.cli(h)?.ferry_ok(&["vm", "kill", n])?;
        }
    }

    // Resource pools: bad ones are refused and nothing is created.
    h2.ferry_fails(
        &[
            "resource-pool",
            "create",
            "huge",
            "--memory-reservation",
            "100G",
        ],
        "reserve",
    )?;
    h2.ferry_fails(
        &["resource-pool", "create", "orphan", "--parent", "nope"],
        "nope",
    )?;
    h2.ferry_fails(
        &["resource-pool", "create", "neg", "--cpu-limit=-1"],
        "limit",
    )?;
    let pools = h1.ferry_json(&["resource-pool", "list"])?;
    assert_eq!(pools.as_array().map(Vec::len), Some(0), "{pools}");
    h2.ferry_ok(&[
        "resource-pool",
        "create",
        "prod",
        "--memory-limit",
        "300M",
        "--cpu-limit",
        "0.25",
    ])?;
    h2.ferry_fails(
        &[
            "vm",
            "create",
            "x",
            "--memory",
            "128M",
            "--resource-pool",
            "nope",
        ],
        "resource pool nope does not exist",
    )?;
    h2.boot_vm("d", "10.78.0.133", &["--resource-pool", "prod"])?;
    let pid = h2.ferry_json(&["vm", "show", "d"])?["pid"]
        .as_i64()
        .context("pid")?;
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    let mine = format!("ferry-lab-{}-h2/pool-prod/vm-", lab.prefix);
    assert!(
        cg.lines().any(|l| l.contains(&mine)),
        "QEMU not in the pool's cgroup: {cg}"
    );
    for dir in ferry_lab::own_cgroup_dirs() {
        let pool = dir.join(format!("ferry-lab-{}-h2/pool-prod", lab.prefix));
        for (file, want) in [
            ("memory.limit_in_bytes", (300u64 << 20).to_string()),
            ("cpu.cfs_quota_us", "25000".into()),
            ("memory.max", (300u64 << 20).to_string()),
            ("cpu.max", "25000 100000".into()),
        ] {
            if let Ok(v) = std::fs::read_to_string(pool.join(file)) {
                assert_eq!(v.trim(), want, "{}", pool.join(file).display());
            }
        }
    }
    // The kernel holds the spinning guest to a quarter core.
    h2.guest_sh("d", "(while :; do :; done > /dev/null 2>&1 &)")?;
    let (c0, t) = (cpu_seconds(pid), Instant::now());
    std::thread::sleep(Duration::from_secs(4));
    let cores = (cpu_seconds(pid) - c0) / t.elapsed().as_secs_f64();
    eprintln!("QEMU of d in pool prod (limit 0.25 cores): {cores:.2} cores");
    assert!(cores < 0.35, "{cores} cores above the pool's limit");
    // A second VM does not fit the pool's 300 MiB limit: refused, stays stopped.
    h2.create_test_vm("e", "10.78.0.134", &["--resource-pool", "prod"])?;
    h2.ferry_fails(&["vm", "start", "e"], "resource pool prod")?;
    assert_eq!(h2.vm_state("e")?.0, "stopped");
    h2.ferry_fails(&["resource-pool", "delete", "prod"], "still holds VMs")?;
    h2.ferry_ok(&["resource-pool", "set", "prod", "--memory-limit", "600M"])?;
    h2.ferry_ok(&["vm", "start", "e"])?;
    wait_for("e running", Duration::from_secs(30), || {
        Ok(h2.vm_state("e")?.0 == "running")
    })?;
    for v in ["d", "e"] {
        h2.ferry_ok(&["vm", "kill", v])?;
        h2.ferry_ok(&["vm", "delete", v])?;
    }
    h2.ferry_ok(&["resource-pool", "delete", "prod"])?;

    // HA admission control: 3 hosts cannot keep room for 3 failures.
    h1.ferry_ok(&["drs", "config", "--ha-host-failures", "3"])?;
    h2.create_test_vm("f", "10.78.0.135", &["--ha", "restart"])?;
    h2.ferry_fails(&["vm", "start", "f"], "HA admission control")?;
    assert_eq!(h2.vm_state("f")?.0, "stopped");
    let st = h1.ferry_json(&["drs", "status"])?;
    assert!(
        st["admission"]
            .as_str()
            .is_some_and(|a| a.contains("3 host failures")),
        "{st}"
    );
    h1.ferry_ok(&["drs", "config", "--admission", "warn"])?;
    h2.ferry_ok(&["vm", "start", "f"])?;
    h2.ferry_ok(&["vm", "kill", "f"])?;
    h1.ferry_ok(&[
        "drs",
        "config",
        "--ha-host-failures",
        "0",
        "--admission",
        "strict",
    ])?;

    // Placement with a host label: only h3 has `ssd`; nobody has `gpu`.
    let g = h1.ferry_json(&[
        "vm",
        "create",
        "g",
        "--place",
        "--memory",
        "128M",
        "--host-label",
        "ssd",
    ])?;
    assert_eq!(g["spec"]["name"], "g", "{g}");
    let on3: Value = lab.cli("h3")?.ferry_json(&["vm", "show", "g"])?;
    assert_eq!(on3["spec"]["placement"]["host_labels"][0], "ssd", "{on3}");
    h1.ferry_fails(
        &[
            "vm",
            "create",
            "h",
            "--place",
            "--memory",
            "128M",
            "--host-label",
            "gpu",
        ],
        "lacks label gpu",
    )?;
    assert!(h1.ferry(&["vm", "show", "h"])?.status.code() != Some(0));
    Ok(())
}
