//! `ferry-bench failover`: HA failover times in a 3-host etcd lab, per fault and per host
//! lease TTL, median of several runs. One HA VM (shared disk) runs; each fault hits the
//! host it runs on; the clock runs from the fault to (a) a new QEMU of the VM running
//! and (b) the client's first ping answered by the guest. Every 100 ms the bench counts
//! the VM's QEMU processes across all hosts: more than one would be a double run.

use anyhow::{bail, Context, Result};
use ferry_lab::{ClusterLab, LabOptions};
use std::process::Stdio;
use std::time::{Duration, Instant};

const IP: &str = "10.78.0.160";

#[derive(Clone, Copy, PartialEq)]
enum Fault {
    HostKill,
    Partition,
    DaemonKill,
    QemuKill,
}

impl Fault {
    fn label(self) -> &'static str {
        match self {
            Fault::HostKill => "host killed (all its processes)",
            Fault::Partition => "host cut off the network",
            Fault::DaemonKill => "daemon killed, not restarted (watchdog)",
            Fault::QemuKill => "QEMU killed (restart in place)",
        }
    }
}

struct Sample {
    qemu_s: f64,
    ping_s: f64,
    max_instances: usize,
}

fn where_runs(lab: &ClusterLab) -> Vec<(String, i32)> {
    lab.hosts
        .iter()
        .flat_map(|h| {
            lab.qemu_pids(&h.name)
                .into_iter()
                .map(|p| (h.name.clone(), p))
        })
        .collect()
}

fn pings(lab: &ClusterLab) -> bool {
    lab.client_cmd("ping")
        .args(["-c", "1", "-W", "1", IP])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn all_online(lab: &ClusterLab) -> Result<()> {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(60) {
        let ok = lab
            .cli("h1")
            .and_then(|c| c.ferry_json(&["cluster", "status"]))
            .is_ok_and(|st| {
                st["members"]
                    .as_array()
                    .is_some_and(|m| m.iter().all(|x| x["state"] == "online"))
            });
        if ok {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    bail!("the cluster did not come back to all hosts online")
}

fn one_run(lab: &mut ClusterLab, fault: Fault) -> Result<Sample> {
    let before = where_runs(lab);
    let [(host, old_pid)] = before.as_slice() else {
        bail!("expected one QEMU of the VM, found {before:?}");
    };
    let (host, old_pid) = (host.clone(), *old_pid);
    let t = Instant::now();
    while !pings(lab) {
        if t.elapsed() > Duration::from_secs(60) {
            bail!("the guest does not answer before the fault");
        }
    }
    let t0 = Instant::now();
    match fault {
        Fault::HostKill => {
            lab.kill_host(&host)?;
        }
        Fault::Partition => lab.set_link(&host, false)?,
        Fault::DaemonKill => lab.kill_daemon(&host)?,
        Fault::QemuKill => nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(old_pid),
            nix::sys::signal::Signal::SIGKILL,
        )?,
    }
    let mut qemu_s = None;
    let mut max_instances = 0;
    let ping_s = loop {
        if t0.elapsed() > Duration::from_secs(120) {
            bail!("{}: no failover within 120 s", fault.label());
        }
        let now = where_runs(lab);
        max_instances = max_instances.max(now.len());
        if qemu_s.is_none() && now.iter().any(|(_, p)| *p != old_pid) {
            qemu_s = Some(t0.elapsed().as_secs_f64());
        }
        if qemu_s.is_some() && pings(lab) {
            break t0.elapsed().as_secs_f64();
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // Repair, so the next run starts from three healthy hosts.
    match fault {
        Fault::HostKill | Fault::DaemonKill => {
            lab.start_daemon(&host)?;
            lab.wait_daemon(&host)?;
        }
        Fault::Partition => lab.set_link(&host, true)?,
        Fault::QemuKill => {}
    }
    all_online(lab)?;
    Ok(Sample {
        qemu_s: qemu_s.unwrap_or(ping_s),
        ping_s,
        max_instances,
    })
}

pub fn run() -> Result<()> {
    let ttls: Vec<u64> = crate::arg_str("--ttls", "2,3,5")
        .split(',')
        .filter_map(|s| s.parse().ok())
        .collect();
    let runs = crate::arg_str("--runs", "3").parse::<usize>().unwrap_or(3);
    let ferry = crate::ferry_bin();
    println!("HA failover in a 3-host lab (etcd on every host, TCG guests), median of {runs} runs per row.");
    println!("'QEMU up': fault → the VM's new QEMU runs; 'pings': fault → the client's first answered ping (includes the guest's boot).");
    println!();
    println!("| fault | lease TTL s | QEMU up s | pings answered s | most instances at once |");
    println!("|---|---|---|---|---|");
    for ttl in ttls {
        let mut lab = ClusterLab::for_test_with(
            &ferry,
            3,
            LabOptions {
                etcd: true,
                lease_ttl_s: ttl,
                ..Default::default()
            },
        )?;
        let h1 = lab.cli("h1")?;
        h1.boot_vm(
            "f",
            IP,
            &[
                "--disk",
                "pool=shared,size=16M,format=raw",
                "--ha",
                "restart",
                "--ha-max-restarts",
                "100",
            ],
        )
        .context("boot the HA VM")?;
        for fault in [
            Fault::HostKill,
            Fault::Partition,
            Fault::DaemonKill,
            Fault::QemuKill,
        ] {
            let mut s = vec![];
            for _ in 0..runs {
                s.push(one_run(&mut lab, fault)?);
            }
            let most = s.iter().map(|x| x.max_instances).max().unwrap_or(0);
            println!(
                "| {} | {ttl} | {:.1} | {:.1} | {most} |",
                fault.label(),
                crate::median(s.iter().map(|x| x.qemu_s).collect()),
                crate::median(s.iter().map(|x| x.ping_s).collect()),
            );
        }
    }
    println!();
    println!("Documented anchors (not run here): Proxmox VE HA recovers a failed node's services after ~120 s (fencing + lock timeouts); vSphere HA declares a host dead after 15–18 s, then restarts its VMs.");
    Ok(())
}
