//! `ferry-bench arches [--runs 3] [--json]`: each architecture's tiny guest (x86_64,
//! aarch64 — and riscv64 when its guest is built) from `vm start` to its ready marker
//! through ferry, against the same kernel and initramfs in a bare `qemu-system-ARCH`
//! (TCG on this machine for all of them). Goals (issue 22): aarch64 < 10 s,
//! riscv64 < 15 s.

use anyhow::{bail, Context, Result};
use ferry_lab::{ClusterLab, LabOptions};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Guest {
    arch: &'static str,
    kernel: PathBuf,
    initrd: PathBuf,
    console: &'static str,
    qemu: Vec<&'static str>,
    goal: Option<f64>,
}

fn guests() -> Vec<Guest> {
    let d = ferry_lab::guest_dir();
    let all = vec![
        Guest {
            arch: "x86_64",
            kernel: d.join("vmlinux"),
            initrd: d.join("initrd.img"),
            console: "ttyS0",
            qemu: vec!["-machine", "pc"],
            goal: None,
        },
        Guest {
            arch: "aarch64",
            kernel: d.join("aarch64/vmlinuz"),
            initrd: d.join("aarch64/initrd.img"),
            console: "ttyAMA0",
            qemu: vec!["-machine", "virt", "-cpu", "cortex-a72"],
            goal: Some(10.0),
        },
        Guest {
            arch: "riscv64",
            kernel: d.join("riscv64/vmlinuz"),
            initrd: d.join("riscv64/initrd.img"),
            console: "ttyS0",
            qemu: vec!["-machine", "virt", "-cpu", "rv64"],
            goal: Some(15.0),
        },
    ];
    all.into_iter().filter(|g| g.kernel.exists()).collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Seconds from spawning bare QEMU to the ready marker on its serial console.
fn bare(g: &Guest) -> Result<f64> {
    let t = Instant::now();
    let mut child = Command::new(format!("qemu-system-{}", g.arch))
        .args(&g.qemu)
        .args([
            "-accel",
            "tcg",
            "-m",
            "256",
            "-nodefaults",
            "-display",
            "none",
        ])
        .args(["-serial", "stdio", "-kernel"])
        .arg(&g.kernel)
        .arg("-initrd")
        .arg(&g.initrd)
        .args(["-append", &format!("console={} quiet", g.console)])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("qemu")?;
    let out = child.stdout.take().context("stdout")?;
    let mut ready = None;
    for line in BufReader::new(out).split(b'\n') {
        let Ok(line) = line else { break };
        if String::from_utf8_lossy(&line).contains("FERRY-READY") {
            ready = Some(t.elapsed().as_secs_f64());
            break;
        }
        if t.elapsed() > Duration::from_secs(300) {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    ready.context("bare QEMU: no ready marker")
}

/// Seconds from `vm start` to the ready marker, through ferry.
fn through_ferry(lab: &ClusterLab, g: &Guest, run: usize) -> Result<f64> {
    let c = lab.cli("h1")?;
    let name = format!("{}-{run}", g.arch.replace('_', "-"));
    let s = |p: &PathBuf| p.display().to_string();
    c.ferry_ok(&[
        "vm",
        "create",
        &name,
        "--arch",
        g.arch,
        "--memory",
        "256M",
        "--kernel",
        &s(&g.kernel),
        "--initrd",
        &s(&g.initrd),
        "--append",
        &format!("console={} quiet", g.console),
    ])?;
    let t = Instant::now();
    c.ferry_ok(&["vm", "start", &name])?;
    c.wait_console(&name, "FERRY-READY", Duration::from_secs(300))?;
    let secs = t.elapsed().as_secs_f64();
    c.ferry_ok(&["vm", "stop", &name])?;
    c.ferry_ok(&["vm", "delete", &name])?;
    Ok(secs)
}

pub fn run() -> Result<()> {
    let runs = crate::arg("--runs", 3).max(1);
    let as_json = std::env::args().any(|a| a == "--json");
    let gs = guests();
    if gs.is_empty() {
        bail!("no test guests built (scripts/setup.sh)");
    }
    let lab = ClusterLab::for_test_with(
        crate::ferry_bin(),
        1,
        LabOptions {
            etcd: false,
            ..Default::default()
        },
    )?;
    let mut rows = vec![];
    for g in &gs {
        let mut f = vec![];
        let mut b = vec![];
        // alternating, so both see the machine alike
        for r in 0..runs {
            f.push(through_ferry(&lab, g, r)?);
            b.push(bare(g)?);
        }
        rows.push((g.arch, median(f), median(b), g.goal));
    }
    if as_json {
        let v: Vec<_> = rows
            .iter()
            .map(|(a, f, b, goal)| serde_json::json!({"arch": a, "ferry_s": f, "bare_qemu_s": b, "goal_s": goal}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("boot to the ready marker, TCG, median of {runs} (seconds)");
    println!(
        "{:<10} {:>8} {:>10} {:>8}",
        "arch", "ferry", "bare QEMU", "goal"
    );
    for (a, f, b, goal) in rows {
        let goal = goal
            .map(|g| format!("< {g:.0}"))
            .unwrap_or_else(|| "-".into());
        println!("{a:<10} {f:>8.2} {b:>10.2} {goal:>8}");
    }
    Ok(())
}
