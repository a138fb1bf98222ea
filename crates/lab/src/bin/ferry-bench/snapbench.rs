//! `ferry-bench snapshots`: see the crate-level comment of ferry-bench.

use crate::{rt, task_wait, BASE};
use anyhow::{bail, Context, Result};
use ferry_lab::{in_netns, Lab};
use serde_json::{json, Value};
use std::process::Command;
use std::time::Instant;

/// POSTs (or DELETEs) an action and waits for its task; returns seconds.
async fn timed(
    c: &reqwest::Client,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> Result<f64> {
    let t = Instant::now();
    let mut r = c.request(method, format!("{BASE}{path}"));
    if let Some(b) = body {
        r = r.json(&b);
    }
    let resp = r.send().await?;
    if !resp.status().is_success() {
        bail!("{path}: {}", resp.text().await?);
    }
    let v: Value = resp.json().await?;
    task_wait(c, &v).await?;
    Ok(t.elapsed().as_secs_f64())
}

fn post(path: &str, body: Option<Value>) -> impl FnOnce(&reqwest::Client) -> Result<f64> + '_ {
    move |c| rt().block_on(timed(c, reqwest::Method::POST, path, body))
}

fn secs(cmd: &mut Command) -> Result<f64> {
    let t = Instant::now();
    let o = cmd.output()?;
    if !o.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(t.elapsed().as_secs_f64())
}

pub fn run() -> Result<()> {
    let as_json = std::env::args().any(|a| a == "--json");
    let ferry = crate::ferry_bin();
    let mut lab = Lab::new(&ferry)?;
    lab.start_daemon()?;
    let ns = lab.ns.clone();
    let token = lab.token()?;
    let in_ns = |f: &(dyn Fn(&reqwest::Client) -> Result<f64> + Sync)| -> Result<f64> {
        in_netns(&ns, || f(&crate::client(&token)?))?
    };
    // The guest disk's cache mode (`--cache none|writeback|...`): the memory state is
    // written into it.
    let a: Vec<String> = std::env::args().collect();
    let cache = a
        .iter()
        .position(|x| x == "--cache")
        .and_then(|i| a.get(i + 1))
        .cloned()
        .unwrap_or_else(|| "none".into());
    let disk = format!("bus=virtio,size=2G,cache={cache}");
    let mut rows = vec![];
    for mem in [256u64, 1024] {
        let vm = format!("m{mem}");
        lab.create_test_vm(
            &vm,
            "10.77.0.60",
            &["--memory", &format!("{mem}M"), "--disk", &disk],
        )?;
        lab.ferry_ok(&["vm", "start", &vm])?;
        lab.wait_console(&vm, "FERRY-READY", std::time::Duration::from_secs(120))?;
        // Fill 40 % of RAM with random data in tmpfs, so the state is not mostly zero pages.
        let fill = mem * 4 / 10;
        lab.guest_sh(
            &vm,
            &format!("dd if=/dev/urandom of=/tmp/fill bs=1M count={fill} 2>/dev/null; echo filled"),
        )?;
        let path = |p: &str| format!("/api/v1/vms/{vm}/{p}");
        let snap_mem = in_ns(&|c| {
            post(
                &path("snapshots"),
                Some(json!({"name": "mem", "with_memory": true})),
            )(c)
        })?;
        let revert = in_ns(&|c| post(&path("snapshots/mem/revert"), None)(c))?;
        let snap_disk = in_ns(&|c| post(&path("snapshots"), Some(json!({"name": "disk"})))(c))?;
        let suspend = in_ns(&|c| post(&path("suspend"), None)(c))?;
        let resume = in_ns(&|c| post(&path("resume"), None)(c))?;
        lab.ferry_ok(&["vm", "kill", &vm])?;
        rows.push(json!({"memory_mib": mem, "filled_mib": fill, "snapshot_with_memory_s": snap_mem,
            "revert_with_memory_s": revert, "snapshot_disk_only_s": snap_disk, "suspend_s": suspend, "resume_s": resume}));
    }

    // Clones of a template with a 2 GiB disk holding 1 GiB of data.
    lab.ferry_ok(&[
        "vm",
        "create",
        "tmpl",
        "--memory",
        "256M",
        "--disk",
        "bus=virtio,size=2G",
    ])?;
    let t = lab.ferry_json(&["vm", "show", "tmpl"])?;
    let vol = lab
        .state_dir()
        .join("pools/local")
        .join(t["spec"]["disks"][0]["volume"].as_str().context("volume")?);
    secs(
        Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 0xa5 0 1G"])
            .arg(&vol),
    )?;
    lab.ferry_ok(&["vm", "template", "tmpl"])?;
    // Dirty pages of one copy must not slow the next one: flush before each timing.
    let sync = || Command::new("sync").status();
    sync()?;
    let linked = in_ns(&|c| {
        post(
            "/api/v1/vms/tmpl/clone",
            Some(json!({"name": "lc", "linked": true})),
        )(c)
    })?;
    // Full clone vs qemu-img convert alone: alternating which goes first (the second
    // of two large copies in a row is slower here, whichever it is), medians of 4.
    let peer_dst = lab.dir.join("peer.qcow2");
    let (mut fulls, mut peers) = (vec![], vec![]);
    for round in 0..4 {
        let ferry_copy = || -> Result<f64> {
            sync()?;
            let name = format!("fc{round}");
            let t = in_ns(&|c| post("/api/v1/vms/tmpl/clone", Some(json!({"name": name})))(c))?;
            lab.ferry_ok(&["vm", "delete", &name])?;
            Ok(t)
        };
        let peer_copy = || -> Result<f64> {
            sync()?;
            let t = secs(
                Command::new("qemu-img")
                    .args(["convert", "-f", "qcow2", "-O", "qcow2"])
                    .arg(&vol)
                    .arg(&peer_dst),
            )?;
            let _ = std::fs::remove_file(&peer_dst);
            Ok(t)
        };
        if round % 2 == 0 {
            fulls.push(ferry_copy()?);
            peers.push(peer_copy()?);
        } else {
            peers.push(peer_copy()?);
            fulls.push(ferry_copy()?);
        }
    }
    let (full, peer) = (crate::median(fulls), crate::median(peers));

    let out = json!({"guests": rows, "linked_clone_s": linked, "full_clone_2g_s": full,
        "qemu_img_convert_2g_s": peer, "full_clone_ratio": full / peer});
    if as_json {
        println!("{out}");
        return Ok(());
    }
    println!("ferry snapshot/clone benchmark (TCG; guest RAM 40 % filled with random data; disk cache={cache}; times include the API task)\n");
    println!("| guest RAM | snapshot with memory | revert with memory | disk-only snapshot (running) | suspend | resume |");
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "| {} MiB | {:.2} s | {:.2} s | {:.3} s | {:.2} s | {:.2} s |",
            r["memory_mib"],
            f("snapshot_with_memory_s"),
            f("revert_with_memory_s"),
            f("snapshot_disk_only_s"),
            f("suspend_s"),
            f("resume_s")
        );
    }
    println!();
    println!(
        "| clone (2 GiB disk, 1 GiB written) | ferry | peer: qemu-img convert alone | ratio |"
    );
    println!("|---|---|---|---|");
    println!("| linked clone | {linked:.3} s | — | — |");
    println!(
        "| full clone (median of 4, order alternated) | {full:.2} s | {peer:.2} s | {:.2}× |",
        full / peer
    );
    drop(lab);
    Ok(())
}
