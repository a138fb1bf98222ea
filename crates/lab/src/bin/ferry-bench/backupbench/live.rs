//! Live-restore, measured without a guest OS: QEMU starts on an empty qcow2 volume
//! whose backing is the full backup's disk, served by ferry's NBD server as the daemon
//! serves it (`ferry_host::live_restore::backup_exports`). How soon the disk answers
//! (server up, QEMU up, the first MiB read through the device), random 4 KiB reads
//! through it against the same reads of the original disk, and how fast `block-stream`
//! fills the volume; the filled volume compared with `qemu-img`'s copy of the image.

use super::{guest_write, mbs, start_qemu_on, Sizes, MIB};
use anyhow::{bail, Context, Result};
use ferry_backup::store::image::DiskImage;
use ferry_backup::store::Store;
use ferry_qmp::commands as qc;
use ferry_qmp::Qmp;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::json;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Default, Clone, Serialize)]
pub(super) struct LiveRestore {
    /// Images opened, server listening, QEMU started, QMP up, the first MiB read.
    pub first_read_secs: f64,
    /// Mean of random 4 KiB reads through the device, nothing filled yet.
    pub read_4k_ms: f64,
    /// The same reads through the original disk's QEMU.
    pub read_4k_ms_local: f64,
    pub fill_secs: f64,
    /// Data MB/s of the fill (the disk's data over its time).
    pub fill_mbs: f64,
    pub identical_to_qemu_img: bool,
}

const READS: usize = 200;

async fn random_reads(qmp: &Qmp, rng: &mut StdRng, span: u64) -> Result<f64> {
    let t = Instant::now();
    for _ in 0..READS {
        let off = rng.random_range(0..span / 4096) * 4096;
        guest_write(qmp, &format!("read {off} 4k")).await?;
    }
    Ok(t.elapsed().as_secs_f64() * 1000.0 / READS as f64)
}

pub(super) async fn live_restore(
    root: &Path,
    store: &Arc<Store>,
    backup: &str,
    original: &Qmp,
    peer_raw: &Path,
    sz: &Sizes,
) -> Result<LiveRestore> {
    let mut r = LiveRestore::default();
    let vol = root.join("live.qcow2");
    let sock = root.join("live.sock");
    let _ = std::fs::remove_file(&sock);
    let ok = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&vol)
        .arg(sz.disk.to_string())
        .status()?;
    if !ok.success() {
        bail!("qemu-img create {}", vol.display());
    }

    let t0 = Instant::now();
    let img = {
        let (st, id) = (Arc::clone(store), backup.to_string());
        tokio::task::spawn_blocking(move || DiskImage::open(st, &id, "disk0", None)).await??
    };
    let exports = ferry_host::live_restore::backup_exports(vec![Arc::new(img)]);
    let listener = tokio::net::UnixListener::bind(&sock)?;
    let server = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(ferry_replica::nbd::serve(s, Arc::clone(&exports)));
        }
    });
    let file = json!({"driver": "file", "filename": vol, "node-name": "disk0-file"});
    let fmt = json!({"driver": "qcow2", "file": "disk0-file", "node-name": "disk0",
        "backing": {"driver": "nbd", "node-name": "restore-disk0", "read-only": true,
            "server": {"type": "unix", "path": sock}, "export": "disk0"}});
    let (q, qmp) = start_qemu_on(root, "live", &[file, fmt]).await?;
    guest_write(&qmp, "read 0 1M").await?;
    r.first_read_secs = t0.elapsed().as_secs_f64();

    let span = sz.data.max(MIB);
    r.read_4k_ms = random_reads(&qmp, &mut StdRng::seed_from_u64(7), span).await?;
    r.read_4k_ms_local = random_reads(original, &mut StdRng::seed_from_u64(7), span).await?;

    let t = Instant::now();
    qmp.run(&qc::BlockStream {
        job_id: "fill".into(),
        device: "disk0".into(),
        speed: None,
        auto_dismiss: Some(false),
    })
    .await?;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let jobs = qmp.run(&qc::QueryJobs).await?;
        let Some(j) = jobs.iter().find(|j| j.id == "fill") else {
            bail!("the fill job is gone");
        };
        if j.status == qc::JobStatus::Concluded {
            if let Some(e) = &j.error {
                bail!("the fill failed: {e}");
            }
            break;
        }
    }
    r.fill_secs = t.elapsed().as_secs_f64();
    r.fill_mbs = mbs(sz.data, r.fill_secs);
    let blocks = qmp.run(&qc::QueryBlock).await?;
    let depth = blocks
        .iter()
        .find_map(|b| b.inserted.as_ref()?.backing_file_depth)
        .context("backing depth")?;
    if depth != 0 {
        bail!("the filled volume still has {depth} backing images");
    }
    drop(qmp);
    drop(q); // QEMU's end writes the qcow2 metadata
    server.abort();
    let cmp = Command::new("qemu-img")
        .args(["compare", "-q", "-f", "qcow2", "-F", "raw"])
        .arg(&vol)
        .arg(peer_raw)
        .status()?;
    r.identical_to_qemu_img = cmp.success();
    std::fs::remove_file(&vol)?;
    Ok(r)
}
