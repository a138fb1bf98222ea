//! `ferry-bench`: ferry's core figures side by side with bare QEMU, in one run.
//!
//! - daemon start → API ready (median of N);
//! - `vm create` + `start` → the guest's ready marker on the serial console (median of N),
//!   against a bare `qemu-system-x86_64` start of the same guest (ferry's overhead as a ratio);
//! - defining 1,000 VMs, then `GET /api/v1/vms` requests/s with them defined;
//! - what a running VM costs the daemon: open files, threads and resident memory with
//!   `--hold` VMs running (default 8), against none.
//!
//! `ferry-bench snapshots`: snapshot with memory (create, revert), disk-only snapshot,
//! suspend and resume for 256 MiB and 1 GiB guests with RAM filled; linked clone, and full
//! clone of a 2 GiB disk against `qemu-img convert` of the same disk alone.
//!
//! `ferry-bench migration [--sizes 256,1024]`: live migration in a 3-host lab, idle and
//! dirtying guests, pings lost and longest gap at 10 ms and 1 ms, against plain QEMU
//! migrating the same guest with its defaults.
//!
//! `ferry-bench failover [--ttls 2,3,5] [--runs 3]`: HA failover per fault (host killed,
//! cut off, daemon killed, QEMU killed) and lease TTL in a 3-host etcd lab: fault → new
//! QEMU and fault → pings answered, and the most instances of the VM seen at once.
//!
//! `ferry-bench drs [--sizes 10x200,30x600,100x2000,1000x20000]`: the DRS planner against
//! Ganeti's hbal on the same synthetic clusters (no lab needed).
//!
//! `ferry-bench replication [--seconds 10] [--size-mib 512]`: fio against a local raw
//! file, qemu-nbd, and ferry's NBD export without replication, replicated to one and to
//! two peers (3-host etcd lab).
//!
//! `ferry-bench tls [--seconds 5] [--size-mib 256] [--calls 2000]`: replication and a
//! host-to-host API call over plain TCP and over mutual TLS, side by side (loopback).
//!
//! `ferry-bench scale [--hosts 16,64] [--vms 1000,10000] [--running N] [--seconds 60]`:
//! a simulated cluster (agents on fake machines in this process) against a real
//! 3-voter etcd: idle etcd writes, proposals and bytes, admission and a DRS round.
//!
//! `ferry-bench backup [--disk-gib 8] [--data-gib 4] [--clones 10] [--gc-chunks 100000]`:
//! full and incremental backups of a running QEMU's disk, guest writes during a backup,
//! dedup of clones, restore, verify and GC, against `qemu-img` (no lab needed).
//!
//! `ferry-bench arches [--runs 3]`: each architecture's tiny guest booted through ferry
//! against bare `qemu-system-ARCH` (TCG), with the goals of issue 22.
//!
//! Usage: `ferry-bench [core|arches|snapshots|migration|failover|drs|replication|tls|scale|backup] [--runs N] [--vms N] [--json]` (as root; the
//! `ferry` binary next to this one, or `FERRY_BIN`). Everything runs in a lab namespace,
//! removed at the end.

mod archbench;
mod backupbench;
mod drsbench;
mod failbench;
mod migbench;
mod replbench;
mod scalebench;
mod snapbench;
mod tlsbench;

use anyhow::{bail, Context, Result};
use ferry_lab::{guest, in_netns, Lab, API_PORT};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub(crate) fn arg(name: &str, default: usize) -> usize {
    let a: Vec<String> = std::env::args().collect();
    a.iter()
        .position(|x| x == name)
        .and_then(|i| a.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub(crate) fn arg_str(name: &str, default: &str) -> String {
    let a: Vec<String> = std::env::args().collect();
    a.iter()
        .position(|x| x == name)
        .and_then(|i| a.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

pub(crate) const BASE: &str = "http://127.0.0.1:8470";

fn spec(name: &str, g: &ferry_lab::Guest) -> Value {
    json!({
        "name": name, "cpus": 1, "memory_mib": 256,
        "direct_boot": {"kernel": g.kernel, "initrd": g.initrd, "cmdline": "console=ttyS0 quiet"}
    })
}

/// Bare QEMU: same guest, same accelerator; time from spawn to the ready marker.
fn bare_qemu(g: &ferry_lab::Guest) -> Result<f64> {
    let t = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-machine",
            "pc",
            "-accel",
            "tcg,thread=single",
            "-smp",
            "1",
            "-m",
            "256M",
        ])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(&g.kernel)
        .arg("-initrd")
        .arg(&g.initrd)
        .args(["-append", "console=ttyS0 quiet"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("spawn qemu")?;
    let out = child.stdout.take().context("stdout")?;
    let mut found = None;
    for line in BufReader::new(out).lines() {
        let line = line.unwrap_or_default();
        if line.contains("FERRY-READY") {
            found = Some(t.elapsed().as_secs_f64());
            break;
        }
        if t.elapsed() > Duration::from_secs(120) {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    found.context("bare QEMU: no ready marker")
}

pub(crate) async fn task_wait(c: &reqwest::Client, accepted: &Value) -> Result<()> {
    let id = accepted["task"].as_str().context("task id")?;
    loop {
        let t: Value = c
            .get(format!("{BASE}/api/v1/tasks/{id}"))
            .send()
            .await?
            .json()
            .await?;
        match t["state"].as_str() {
            Some("running") => tokio::time::sleep(Duration::from_millis(5)).await,
            Some("succeeded") => return Ok(()),
            _ => bail!("task failed: {t}"),
        }
    }
}

/// Create + start one VM and wait for the ready marker; then remove it.
/// Defines VM `name` (the test guest) and starts it.
async fn create_start(c: &reqwest::Client, name: &str, g: &ferry_lab::Guest) -> Result<()> {
    let r = c
        .post(format!("{BASE}/api/v1/vms"))
        .json(&spec(name, g))
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("create: {}", r.text().await?);
    }
    let a: Value = c
        .post(format!("{BASE}/api/v1/vms/{name}/start"))
        .send()
        .await?
        .json()
        .await?;
    task_wait(c, &a).await
}

/// Stops VM `name` and deletes it.
async fn stop_delete(c: &reqwest::Client, name: &str) -> Result<()> {
    let a: Value = c
        .post(format!("{BASE}/api/v1/vms/{name}/stop"))
        .send()
        .await?
        .json()
        .await?;
    task_wait(c, &a).await?;
    c.delete(format!("{BASE}/api/v1/vms/{name}")).send().await?;
    Ok(())
}

/// The daemon's open files, threads and resident memory (KiB).
fn daemon_usage(pid: u32) -> Result<[f64; 3]> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as f64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> f64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    };
    Ok([fds, field("Threads:"), field("VmRSS:")])
}

async fn ferry_boot(c: &reqwest::Client, name: &str, g: &ferry_lab::Guest) -> Result<f64> {
    let t = Instant::now();
    create_start(c, name, g).await?;
    loop {
        let h = c
            .get(format!("{BASE}/api/v1/vms/{name}/console/history"))
            .send()
            .await?
            .text()
            .await?;
        if h.contains("FERRY-READY") {
            break;
        }
        if t.elapsed() > Duration::from_secs(120) {
            bail!("no ready marker from {name}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let secs = t.elapsed().as_secs_f64();
    stop_delete(c, name).await?;
    Ok(secs)
}

/// An HTTP client that sends `token` with every request (nothing is trusted by
/// address, loopback included).
pub(crate) fn client(token: &str) -> Result<reqwest::Client> {
    let mut h = reqwest::header::HeaderMap::new();
    h.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}").parse()?,
    );
    Ok(reqwest::Client::builder().default_headers(h).build()?)
}

async fn wait_api(c: &reqwest::Client, t: Instant) -> Result<f64> {
    while t.elapsed() < Duration::from_secs(30) {
        if let Ok(r) = c.get(format!("{BASE}/api/v1/host")).send().await {
            // Answering at all (a first start has not told us its token yet).
            if r.status().is_success() || r.status() == reqwest::StatusCode::UNAUTHORIZED {
                return Ok(t.elapsed().as_secs_f64());
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    bail!("API not ready within 30 s")
}

/// The `ferry` binary: `FERRY_BIN`, or the one next to this benchmark.
pub(crate) fn ferry_bin() -> std::path::PathBuf {
    std::env::var("FERRY_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| {
            std::env::current_exe()
                .expect("exe")
                .parent()
                .expect("dir")
                .join("ferry")
        })
}

pub(crate) fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn main() -> Result<()> {
    if std::env::args().nth(1).as_deref() == Some("arches") {
        return archbench::run();
    }
    if std::env::args().nth(1).as_deref() == Some("snapshots") {
        return snapbench::run();
    }
    if std::env::args().nth(1).as_deref() == Some("migration") {
        return migbench::run();
    }
    if std::env::args().nth(1).as_deref() == Some("drs") {
        return drsbench::run();
    }
    if std::env::args().nth(1).as_deref() == Some("failover") {
        return failbench::run();
    }
    if std::env::args().nth(1).as_deref() == Some("replication") {
        return replbench::run();
    }
    if std::env::args().nth(1).as_deref() == Some("scale") {
        return scalebench::run();
    }
    if std::env::args().nth(1).as_deref() == Some("voters") {
        return scalebench::voters();
    }
    if std::env::args().nth(1).as_deref() == Some("backup") {
        return backupbench::run();
    }
    if std::env::args().nth(1).as_deref() == Some("tls") {
        return tlsbench::run();
    }
    if std::env::args().nth(1).as_deref() == Some("tcp-echo") {
        // The other process of the replication benchmark's round-trip figure.
        return replbench::echo(&std::env::args().nth(2).unwrap_or_default());
    }
    let runs = arg("--runs", 10);
    let nvms = arg("--vms", 1000);
    let as_json = std::env::args().any(|a| a == "--json");
    let ferry = ferry_bin();
    let g = guest()?;
    let mut lab = Lab::new(&ferry)?;
    let ns = lab.ns.clone();

    // 1. Daemon start → API ready.
    let mut starts = vec![];
    for _ in 0..runs {
        let t = Instant::now();
        lab.spawn_daemon()?;
        starts.push(in_netns(&ns, || {
            rt().block_on(wait_api(&reqwest::Client::new(), t))
        })??);
        lab.stop_daemon(false)?;
    }
    let daemon = lab.start_daemon()?;
    let token = lab.token()?;

    // 2. Boot to ready marker: ferry vs bare QEMU, interleaved.
    let mut ferry_boots = vec![];
    let mut qemu_boots = vec![];
    for i in 0..runs {
        let name = format!("bench{i}");
        ferry_boots.push(in_netns(&ns, || {
            rt().block_on(ferry_boot(&client(&token)?, &name, &g))
        })??);
        qemu_boots.push(bare_qemu(&g)?);
    }

    // 2b. What a running VM costs the daemon: its open files, threads and resident
    // memory with `--hold` VMs running, against none.
    let hold = arg("--hold", 8);
    let idle = daemon_usage(daemon)?;
    in_netns(&ns, || {
        rt().block_on(async {
            let c = client(&token)?;
            for i in 0..hold {
                create_start(&c, &format!("hold{i}"), &g).await?;
            }
            Ok::<_, anyhow::Error>(())
        })
    })??;
    std::thread::sleep(Duration::from_secs(3));
    let busy = daemon_usage(daemon)?;
    in_netns(&ns, || {
        rt().block_on(async {
            let c = client(&token)?;
            for i in 0..hold {
                stop_delete(&c, &format!("hold{i}")).await?;
            }
            Ok::<_, anyhow::Error>(())
        })
    })??;
    let per_vm = |i: usize| (busy[i] - idle[i]) / hold.max(1) as f64;

    // 3. 1,000 VMs defined; list throughput.
    let (define_rate, list_rate, list_p50_ms) = in_netns(&ns, || {
        rt().block_on(async {
            let c = client(&token)?;
            let t = Instant::now();
            for i in 0..nvms {
                let r = c
                    .post(format!("{BASE}/api/v1/vms"))
                    .json(&spec(&format!("many{i:04}"), &g))
                    .send()
                    .await?;
                if !r.status().is_success() {
                    bail!("define: {}", r.text().await?);
                }
            }
            let define_rate = nvms as f64 / t.elapsed().as_secs_f64();
            let window = Duration::from_secs(5);
            let t = Instant::now();
            let workers = (0..4).map(|_| {
                let c = c.clone();
                async move {
                    let mut lat = vec![];
                    while t.elapsed() < window {
                        let s = Instant::now();
                        let v: Vec<Value> = c
                            .get(format!("{BASE}/api/v1/vms"))
                            .send()
                            .await?
                            .json()
                            .await?;
                        if v.len() != nvms {
                            bail!("listed {} VMs", v.len());
                        }
                        lat.push(s.elapsed().as_secs_f64() * 1000.0);
                    }
                    Ok::<_, anyhow::Error>(lat)
                }
            });
            let mut all = vec![];
            for r in futures::future::join_all(workers).await {
                all.extend(r?);
            }
            let rate = all.len() as f64 / t.elapsed().as_secs_f64();
            Ok((define_rate, rate, median(all)))
        })
    })??;

    let qemu_version = String::from_utf8_lossy(
        &Command::new("qemu-system-x86_64")
            .arg("--version")
            .output()?
            .stdout,
    )
    .lines()
    .next()
    .unwrap_or("")
    .to_string();
    let fb = median(ferry_boots.clone());
    let qb = median(qemu_boots.clone());
    let out = json!({
        "date": String::from_utf8_lossy(&Command::new("date").arg("-u").arg("+%Y-%m-%d").output()?.stdout).trim(),
        "accel": "tcg", "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "qemu": qemu_version, "runs": runs, "api_port": API_PORT,
        "daemon_start_ms_median": median(starts) * 1000.0,
        "boot_to_ready_s_median": {"ferry": fb, "bare_qemu": qb, "ratio": fb / qb},
        "boot_to_ready_s_all": {"ferry": ferry_boots, "bare_qemu": qemu_boots},
        "define_vms_per_s": define_rate, "vms_defined": nvms,
        "list_vms_req_per_s": list_rate, "list_vms_p50_ms": list_p50_ms,
        "daemon_per_running_vm": {"vms": hold, "fds": per_vm(0), "threads": per_vm(1),
            "rss_kib": per_vm(2), "idle": {"fds": idle[0], "threads": idle[1], "rss_kib": idle[2]}},
    });
    if as_json {
        println!("{out}");
        return Ok(());
    }
    println!(
        "ferry core benchmark, {} ({}; {} cores, TCG; median of {runs})",
        out["date"].as_str().unwrap_or(""),
        out["qemu"].as_str().unwrap_or(""),
        out["cpus"]
    );
    println!();
    println!("| measure | ferry | peer | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| daemon start → API ready | {:.0} ms | — | — |",
        out["daemon_start_ms_median"].as_f64().unwrap_or(0.0)
    );
    println!("| VM create + start → ready marker on serial | {fb:.2} s | bare qemu-system-x86_64: {qb:.2} s | {:.2}× |", fb / qb);
    println!(
        "| define {nvms} VMs (POST /api/v1/vms, sequential) | {define_rate:.0} VMs/s | — | — |"
    );
    println!("| GET /api/v1/vms with {nvms} VMs, 4 clients | {list_rate:.0} req/s (p50 {list_p50_ms:.1} ms) | — | — |");
    println!(
        "| the daemon per running VM ({hold} held; idle: {:.0} fds, {:.0} threads, {:.0} KiB) | {:.1} fds, {:.1} threads, {:.0} KiB resident | — | — |",
        idle[0], idle[1], idle[2], per_vm(0), per_vm(1), per_vm(2)
    );
    drop(lab);
    Ok(())
}
