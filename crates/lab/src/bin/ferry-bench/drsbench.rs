//! `ferry-bench drs [--sizes 10x200,30x600,100x2000,1000x20000] [--hbal-timeout 300]`: ferry's
//! balancing planner against Ganeti's `hbal` on the same synthetic clusters (random
//! and skewed placement and load), both judged by ferry's imbalance score (weighted
//! standard deviations of memory and CPU utilisation); hbal's own score is printed too.
//! The cluster goes to hbal in its text format (`-t`) with the measured load as its
//! dynamic utilisation (`-U`), VMs on shared storage (migrations only, like ours).

use crate::arg_str;
use anyhow::{Context, Result};
use ferry_drs::{balance, hbal, score, Cluster, Host, Tuning, Vm};
use ferry_types::DrsConfig;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

const G: u64 = 1 << 30;

/// A synthetic cluster: hosts of 48 cores and 384 GiB; VMs of 1-4 vCPUs and 1-16 GiB
/// with a CPU load up to 60 % of their vCPUs. `skewed`: half the VMs (and the busier
/// ones) start on a fifth of the hosts.
pub(crate) fn synthetic(hosts: usize, vms: usize, skewed: bool, seed: u64) -> Cluster {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut c = Cluster {
        hosts: (0..hosts)
            .map(|i| Host::new(&format!("node{i:04}"), 48.0, 384 * G))
            .collect(),
        vms: vec![],
    };
    let (mut mem, mut cpu, mut vc) = (vec![0u64; hosts], vec![0f64; hosts], vec![0u64; hosts]);
    let hot = (hosts / 5).max(1);
    for i in 0..vms {
        let vcpus = rng.random_range(1..=4u32);
        let memory = [1, 2, 2, 4, 4, 8, 16][rng.random_range(0..7)] * G;
        let busy = skewed && i % 2 == 0;
        let load = vcpus as f64 * rng.random_range(if busy { 0.3..0.6 } else { 0.02..0.4 });
        let first = if busy {
            rng.random_range(0..hot)
        } else {
            rng.random_range(0..hosts)
        };
        // The first host from there that has room.
        let Some(h) = (0..hosts).map(|k| (first + k) % hosts).find(|h| {
            mem[*h] + memory <= 384 * G && cpu[*h] + load <= 48.0 && vc[*h] + vcpus as u64 <= 8 * 48
        }) else {
            continue;
        };
        mem[h] += memory;
        cpu[h] += load;
        vc[h] += vcpus as u64;
        c.vms.push(Vm::new(
            &format!("vm{i:05}"),
            &c.hosts[h].name.clone(),
            vcpus,
            memory,
            load,
        ));
    }
    c
}

struct Outcome {
    score: f64,
    moves: usize,
    moved_bytes: u64,
    secs: f64,
    note: String,
}

fn ours(c: &Cluster, cfg: &DrsConfig, t: Tuning) -> Outcome {
    let start = Instant::now();
    let plan = balance(c, cfg, &BTreeSet::new(), t);
    let secs = start.elapsed().as_secs_f64();
    Outcome {
        score: plan.score_after,
        moves: plan.moves.len(),
        moved_bytes: plan.moves.iter().map(|m| m.memory_bytes).sum(),
        secs,
        note: String::new(),
    }
}

fn run_hbal(c: &Cluster, cfg: &DrsConfig, timeout: Duration) -> Result<Outcome> {
    let dir = std::env::temp_dir().join(format!("ferry-hbal-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let data = dir.join("cluster.txt");
    let util = dir.join("util.txt");
    std::fs::write(&data, hbal::write_cluster(c, cfg.max_vcpu_ratio))?;
    std::fs::write(&util, hbal::write_utilisation(c))?;
    let start = Instant::now();
    let child = Command::new("hbal")
        .arg("-t")
        .arg(&data)
        .arg("-U")
        .arg(&util)
        .arg("-v")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("run hbal (Debian package ganeti-htools)")?;
    let pid = child.id();
    let out = std::thread::spawn(move || child.wait_with_output());
    while !out.is_finished() {
        if start.elapsed() > timeout {
            // Our own child, by PID.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = out.join();
            let _ = std::fs::remove_dir_all(&dir);
            return Ok(Outcome {
                score: f64::NAN,
                moves: 0,
                moved_bytes: 0,
                secs: start.elapsed().as_secs_f64(),
                note: format!("timed out after {} s", timeout.as_secs()),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let secs = start.elapsed().as_secs_f64();
    let out = out.join().expect("hbal thread")?;
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let steps = hbal::parse_steps(&stdout);
    let after = hbal::apply(c, &steps);
    let moved_bytes = steps
        .iter()
        .filter_map(|s| c.vms.iter().find(|v| v.name == s.vm))
        .map(|v| v.memory_bytes)
        .sum();
    let own = stdout
        .lines()
        .find(|l| l.starts_with("Cluster score improved from"))
        .map(|l| {
            l.trim_start_matches("Cluster score improved from ")
                .to_string()
        })
        .unwrap_or_else(|| "no improvement found".into());
    Ok(Outcome {
        score: score(&after, cfg),
        moves: steps.len(),
        moved_bytes,
        secs,
        note: format!("hbal's own score: {own}"),
    })
}

pub(crate) fn run() -> Result<()> {
    let sizes = arg_str("--sizes", "10x200,30x600,100x2000,1000x20000");
    let timeout = Duration::from_secs(arg_str("--hbal-timeout", "300").parse()?);
    // Level 5: as even as the moves allow, like hbal's defaults.
    let cfg = DrsConfig {
        level: 5,
        max_plan_moves: 1_000_000,
        ..DrsConfig::default()
    };
    println!("DRS planner vs Ganeti hbal (ganeti-htools), same clusters, same score");
    println!("score: memory + CPU utilisation standard deviations (lower is better)");
    println!(
        "{:<12} {:<7} {:<22} {:>8} {:>8} {:>6} {:>10} {:>9}  notes",
        "cluster", "load", "planner", "before", "after", "moves", "moved GiB", "time s"
    );
    let mut gave_up = std::collections::BTreeSet::new();
    for size in sizes.split(',') {
        let (h, v) = size.split_once('x').context("--sizes: HOSTSxVMS,...")?;
        let (h, v): (usize, usize) = (h.parse()?, v.parse()?);
        for skewed in [false, true] {
            let c = synthetic(h, v, skewed, 7 + h as u64);
            let before = score(&c, &cfg);
            let label = format!("{h}/{}", c.vms.len());
            let load = if skewed { "skewed" } else { "random" };
            // hbal on a larger cluster of the same load only if it finished the smaller.
            let hb = if gave_up.contains(&skewed) {
                Outcome {
                    score: f64::NAN,
                    moves: 0,
                    moved_bytes: 0,
                    secs: f64::NAN,
                    note: "not run: timed out on a smaller cluster".into(),
                }
            } else {
                run_hbal(&c, &cfg, timeout)?
            };
            if hb.score.is_nan() {
                gave_up.insert(skewed);
            }
            // ferry again, stopped at hbal's number of moves.
            let capped = DrsConfig {
                max_plan_moves: u32::try_from(hb.moves.max(1)).unwrap_or(u32::MAX),
                ..cfg.clone()
            };
            let mut rows = vec![
                ("ferry".to_string(), ours(&c, &cfg, Tuning::default())),
                (
                    "ferry (best gain only)".into(),
                    ours(
                        &c,
                        &cfg,
                        Tuning {
                            band: 0.0,
                            ..Tuning::default()
                        },
                    ),
                ),
            ];
            if hb.moves > 0 {
                rows.push((
                    format!("ferry ≤ {} moves", hb.moves),
                    ours(&c, &capped, Tuning::default()),
                ));
            }
            rows.push(("hbal".into(), hb));
            for (name, o) in rows {
                println!(
                    "{:<12} {:<7} {:<22} {:>8.4} {:>8.4} {:>6} {:>10.0} {:>9.3}  {}",
                    label,
                    load,
                    name,
                    before,
                    o.score,
                    o.moves,
                    o.moved_bytes as f64 / G as f64,
                    o.secs,
                    o.note
                );
            }
        }
    }
    Ok(())
}
