//! `ferry-bench backup [--disk-gib 8] [--data-gib 4] [--clones 10] [--gc-chunks 100000]
//! [--write-secs 10] [--threads 2,4] [--json]`: ferry's backups (`ferry-backup`) against
//! a real QEMU without a guest OS (its vCPUs never start; "guest" writes come through
//! QEMU's block layer with HMP `qemu-io`, as a guest's would), side by side with
//! `qemu-img` on the same image, in one run:
//!
//! 1. a full backup of a qcow2 disk holding mixed data (incompressible, text-like,
//!    repeated chunks, allocated zeros, half-sparse chunks): MB/s of data, and MB/s per
//!    core of this process's CPU (the store's hashing, compression and writes run here;
//!    QEMU's CPU is counted apart), against `qemu-img convert -c` (zlib and zstd) and a
//!    plain `qemu-img convert`; plus what one core does per chunk (BLAKE3, zstd);
//! 2. incrementals end to end: nothing changed, 1 % changed in clustered 64 KiB writes,
//!    1 % in scattered ones; PBS's published figure as a reference;
//! 3. guest write throughput while a full backup runs against without;
//! 4. the dedup factor of N clones' backups (one base image, small changes each) in one
//!    store, against N compressed copies;
//! 5. restore (`restore_raw`) against `qemu-img convert -O raw`; live-restore (QEMU
//!    on an empty volume backed by the backup over ferry's NBD server): the first read,
//!    random reads against the original disk's, the fill's speed;
//! 6. verify; 7. GC of many chunks once their backup is deleted.
//!
//! Everything lives in `/var/tmp/ferry-bench-backup` (removed at the end, on failure
//! too); the QEMUs it starts are killed by their pid, and die with the bench.

mod image;
mod live;
mod tables;

use anyhow::{bail, Context, Result};
use ferry_backup::capture::{capture, CaptureOutcome, CaptureProgress, CaptureRequest, DiskSource};
use ferry_backup::store::catalog::DiskRow;
use ferry_backup::store::chunk::CHUNK_SIZE;
use ferry_backup::store::reader::Progress;
use ferry_backup::store::writer::SnapshotMeta;
use ferry_backup::store::{Store, Usage};
use ferry_qmp::Qmp;
use image::{components, convert, make_image, run_ok, same_content, Components, Mix, Peer};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::json;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const ROOT: &str = "/var/tmp/ferry-bench-backup";
const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
const CHUNK: u64 = CHUNK_SIZE as u64;
/// The "guest"'s small writes.
const SMALL_WRITE: u64 = 64 << 10;
const DEVICE: &str = "/machine/peripheral/disk0";

struct Sizes {
    disk: u64,
    data: u64,
    clones: usize,
    gc_chunks: usize,
    write_secs: u64,
    threads: Vec<usize>,
}

/// `"8"`, `"0.5"` GiB → bytes (decimal, no floating point), rounded down to whole chunks.
fn parse_gib(flag: &str, s: &str) -> Result<u64> {
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    let whole: u128 = if int.is_empty() { 0 } else { int.parse()? };
    let frac_part: u128 = if frac.is_empty() { 0 } else { frac.parse()? };
    let scale = 10u128
        .checked_pow(u32::try_from(frac.len())?)
        .with_context(|| format!("{flag} {s}: too many digits"))?;
    let bytes = whole * u128::from(GIB) + frac_part * u128::from(GIB) / scale;
    let bytes = u64::try_from(bytes).with_context(|| format!("{flag} {s}: too large"))?;
    Ok(bytes / CHUNK * CHUNK)
}

impl Sizes {
    fn from_args() -> Result<Sizes> {
        let disk = parse_gib("--disk-gib", &crate::arg_str("--disk-gib", "8"))?;
        let data = parse_gib("--data-gib", &crate::arg_str("--data-gib", "4"))?;
        if data < 2 * CHUNK || data > disk {
            bail!("--data-gib must be at least 8 MiB and at most --disk-gib");
        }
        let threads = crate::arg_str("--threads", "2,4")
            .split(',')
            .filter_map(|t| t.parse().ok())
            .collect();
        Ok(Sizes {
            disk,
            data,
            clones: crate::arg("--clones", 10).max(1),
            gc_chunks: crate::arg("--gc-chunks", 100_000).max(1),
            write_secs: crate::arg("--write-secs", 10).max(1) as u64,
            threads,
        })
    }
}

/// The bench's folder: removed when dropped (also when the bench fails).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A QEMU this bench started: killed by its pid when dropped.
struct Qemu {
    child: Child,
}

impl Qemu {
    fn cpu(&self) -> f64 {
        ferry_lab::cpu_seconds(i64::from(self.child.id()))
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts QEMU on a qcow2 image as `disk0` (virtio-blk), vCPUs stopped (`-S`: there is
/// no guest OS; its firmware would only spin). Call from the thread that stays (the
/// runtime's `block_on`): QEMU dies with the thread that started it.
async fn start_qemu(dir: &Path, name: &str, img: &Path) -> Result<(Qemu, Qmp)> {
    let file = json!({"driver": "file", "filename": img, "node-name": "disk0-file"});
    let fmt = json!({"driver": "qcow2", "file": "disk0-file", "node-name": "disk0"});
    start_qemu_on(dir, name, &[file, fmt]).await
}

/// [`start_qemu`] on these block nodes (the last one is `disk0`).
async fn start_qemu_on(dir: &Path, name: &str, nodes: &[serde_json::Value]) -> Result<(Qemu, Qmp)> {
    use std::os::unix::process::CommandExt;
    let sock = dir.join(format!("{name}.qmp"));
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-machine",
        "q35",
        "-accel",
        "tcg",
        "-m",
        "64",
        "-S",
    ])
    .arg("-qmp")
    .arg(format!("unix:{},server=on,wait=off", sock.display()));
    for n in nodes {
        cmd.arg("-blockdev").arg(n.to_string());
    }
    cmd.args(["-device", "virtio-blk-pci,drive=disk0,id=disk0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    // SAFETY: runs in the forked child before exec and makes one system call (prctl).
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
    let child = cmd.spawn().context("start qemu-system-x86_64")?;
    let q = Qemu { child };
    let qmp = Qmp::connect_retry(&sock, Duration::from_secs(20))
        .await
        .with_context(|| {
            let log = std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default();
            format!("QMP of QEMU {name}: {log}")
        })?;
    Ok((q, qmp))
}

/// A write through the disk's device, as the guest would make it.
async fn guest_write(qmp: &Qmp, cmd: &str) -> Result<()> {
    let line = format!("qemu-io -d {DEVICE}/virtio-backend \"{cmd}\"");
    let r = qmp
        .execute(
            "human-monitor-command",
            Some(json!({ "command-line": line })),
        )
        .await
        .with_context(|| format!("HMP {line}"))?;
    // qemu-io prints its result on QEMU's stdout; failures come back here
    let said = r.as_str().unwrap_or("").to_lowercase();
    if said.contains("error") || said.contains("conflict") {
        bail!("qemu-io {cmd}: {said}");
    }
    Ok(())
}

fn cpu_of(who: nix::sys::resource::UsageWho) -> f64 {
    use nix::sys::time::TimeValLike;
    match nix::sys::resource::getrusage(who) {
        Ok(u) => {
            (u.user_time().num_microseconds() + u.system_time().num_microseconds()) as f64 / 1e6
        }
        Err(_) => f64::NAN,
    }
}

/// CPU seconds of this process (every thread: the store's writer, the NBD reader).
fn self_cpu() -> f64 {
    cpu_of(nix::sys::resource::UsageWho::RUSAGE_SELF)
}

/// CPU seconds of this process's children that were waited for.
fn children_cpu() -> f64 {
    cpu_of(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
}

fn mbs(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / 1e6 / secs
}

fn meta(vm: &str) -> SnapshotMeta {
    SnapshotMeta {
        vm: vm.into(),
        host: "bench".into(),
        consistency: "crash".into(),
        config: None,
    }
}

/// What the bench asks of a capture: `disk0` of the VM `qemu` runs (its NBD export
/// accepted only from that process, as ferry does).
fn request(vm: &str, work: &Path, cap: u64, qemu: &Qemu) -> CaptureRequest {
    CaptureRequest {
        meta: meta(vm),
        disks: vec![DiskSource {
            name: "disk0".into(),
            device: Some(DEVICE.into()),
            node: "disk0".into(),
            persistent: true,
        }],
        work_dir: work.to_path_buf(),
        socket_dir: work.to_path_buf(),
        owner: None,
        server_pid: i32::try_from(qemu.child.id()).ok(),
        fleece_cap: cap,
        key: None,
        quiesce: None,
    }
}

#[derive(Debug, Default, Clone, Serialize)]
struct Backup {
    id: String,
    mode: String,
    secs: f64,
    read_bytes: u64,
    new_plain_bytes: u64,
    new_stored_bytes: u64,
    chunks: u64,
    new_chunks: u64,
    cpu_s: f64,
    qemu_cpu_s: f64,
    mbs: f64,
    mbs_per_core: f64,
    mbs_per_core_with_qemu: f64,
}

impl Backup {
    fn of(o: &CaptureOutcome, secs: f64, cpu_s: f64, qemu_cpu_s: f64) -> Backup {
        let read: u64 = o.disks.iter().map(|d| d.read_bytes).sum();
        Backup {
            id: o.id.clone(),
            mode: o.disks.first().map(|d| d.mode.clone()).unwrap_or_default(),
            secs,
            read_bytes: read,
            new_plain_bytes: o.stats.new_plain_bytes,
            new_stored_bytes: o.stats.new_stored_bytes,
            chunks: o.stats.chunks,
            new_chunks: o.stats.new_chunks,
            cpu_s,
            qemu_cpu_s,
            mbs: mbs(read, secs),
            mbs_per_core: mbs(read, cpu_s),
            mbs_per_core_with_qemu: mbs(read, cpu_s + qemu_cpu_s),
        }
    }
}

/// One capture, timed end to end, with this process's and QEMU's CPU.
async fn backup(
    qmp: &Qmp,
    q: &Qemu,
    store: &Arc<Store>,
    vm: &str,
    work: &Path,
    cap: u64,
) -> Result<Backup> {
    let (c0, q0) = (self_cpu(), q.cpu());
    let t = Instant::now();
    let o = capture(
        qmp,
        Arc::clone(store),
        request(vm, work, cap, q),
        &CaptureProgress::default(),
    )
    .await
    .with_context(|| format!("backup of {vm}"))?;
    let secs = t.elapsed().as_secs_f64();
    Ok(Backup::of(&o, secs, self_cpu() - c0, q.cpu() - q0))
}

#[derive(Debug, Default, Clone, Serialize)]
struct Incremental {
    change: String,
    changed_bytes: u64,
    writes: u64,
    chunks_touched: u64,
    backup: Backup,
}

/// Writes `bytes` in 64 KiB writes through QEMU: runs of 64 (4 MiB) at random places
/// when `clustered`, else each write at its own random place. Returns (writes, chunks
/// touched).
async fn change(
    qmp: &Qmp,
    rng: &mut StdRng,
    disk: u64,
    bytes: u64,
    clustered: bool,
) -> Result<(u64, u64)> {
    let slots = disk / SMALL_WRITE;
    let run_len = if clustered { 64 } else { 1 };
    let writes = bytes.div_ceil(SMALL_WRITE).max(1);
    let mut touched = BTreeSet::new();
    let mut done = 0;
    while done < writes {
        let start = rng.random_range(0..=slots - run_len);
        for k in 0..run_len.min(writes - done) {
            let off = (start + k) * SMALL_WRITE;
            guest_write(qmp, &format!("write -P 0x33 {off} 64k")).await?;
            touched.insert(off / CHUNK);
            touched.insert((off + SMALL_WRITE - 1) / CHUNK);
            done += 1;
        }
    }
    Ok((writes, touched.len() as u64))
}

#[derive(Debug, Default, Clone, Serialize)]
struct GuestWrites {
    region: (u64, u64),
    alone_mbs: f64,
    alone_secs: f64,
    during_mbs: f64,
    during_secs: f64,
    ratio: f64,
    /// CPU seconds in each window: (this process, QEMU).
    alone_cpu: (f64, f64),
    during_cpu: (f64, f64),
    /// Whether the backup still ran when the measured writes ended.
    backup_outlasted_writes: bool,
    backup: Backup,
}

/// Sequential 1 MiB writes over `region` for `secs` (or until `stop`): (bytes, secs).
async fn write_loop(
    qmp: &Qmp,
    region: (u64, u64),
    secs: f64,
    stop: Option<&AtomicBool>,
) -> Result<(u64, f64)> {
    let (start, len) = region;
    let t = Instant::now();
    let mut written = 0u64;
    while t.elapsed().as_secs_f64() < secs && !stop.is_some_and(|s| s.load(Ordering::SeqCst)) {
        let off = start + written % len;
        guest_write(qmp, &format!("write -P 0x5a {off} 1M")).await?;
        written += MIB;
    }
    Ok((written, t.elapsed().as_secs_f64()))
}

/// Guest writes alone, then while a full backup (into a fresh store) runs.
async fn guest_writes(qmp: &Qmp, q: &Qemu, root: &Path, sz: &Sizes) -> Result<GuestWrites> {
    let start = (sz.data / 2) / MIB * MIB;
    let region = if sz.data - start >= 64 * MIB {
        (start, sz.data - start)
    } else {
        (0, sz.disk)
    };
    let window = sz.write_secs as f64;
    let (c0, q0) = (self_cpu(), q.cpu());
    let (alone_b, alone_s) = write_loop(qmp, region, window, None).await?;
    let alone_cpu = (self_cpu() - c0, q.cpu() - q0);
    let store = Arc::new(Store::create(&root.join("store-writes"))?);
    let progress = Arc::new(CaptureProgress::default());
    let done = Arc::new(AtomicBool::new(false));
    let (c0, q0) = (self_cpu(), q.cpu());
    let t = Instant::now();
    let task = {
        let (qmp, store, progress, done) =
            (qmp.clone(), store, Arc::clone(&progress), Arc::clone(&done));
        let req = request("writes", &root.join("work-writes"), sz.disk, q);
        tokio::spawn(async move {
            let r = capture(&qmp, store, req, &progress).await;
            done.store(true, Ordering::SeqCst);
            r
        })
    };
    // from the moment the backup reads (fleecing in place)
    while progress.done_bytes.load(Ordering::Relaxed) == 0 && !done.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let (c1, q1) = (self_cpu(), q.cpu());
    let (during_b, during_s) = write_loop(qmp, region, window, Some(&done)).await?;
    let during_cpu = (self_cpu() - c1, q.cpu() - q1);
    let outlasted = !done.load(Ordering::SeqCst);
    let o = task.await?.context("backup during guest writes")?;
    let b = Backup::of(&o, t.elapsed().as_secs_f64(), self_cpu() - c0, q.cpu() - q0);
    let (alone_mbs, during_mbs) = (mbs(alone_b, alone_s), mbs(during_b, during_s));
    Ok(GuestWrites {
        region,
        alone_mbs,
        alone_secs: alone_s,
        during_mbs,
        during_secs: during_s,
        ratio: during_mbs / alone_mbs,
        alone_cpu,
        during_cpu,
        backup_outlasted_writes: outlasted,
        backup: b,
    })
}

#[derive(Debug, Clone, Serialize)]
struct Dedup {
    clones: usize,
    usage: Usage,
    dedup_factor: f64,
    read_bytes: u64,
    unique_plain_bytes: u64,
    backups: Vec<Backup>,
    /// N copies made with `qemu-img convert -c` (zstd): what a store without dedup holds.
    peer_bytes: u64,
}

/// N linked clones of the base image, each changed a little (8 writes of 4 MiB),
/// each backed up by its own QEMU into one store.
fn clones(
    rt: &tokio::runtime::Runtime,
    root: &Path,
    img: &Path,
    sz: &Sizes,
    copy_bytes: u64,
) -> Result<Dedup> {
    let store = Arc::new(Store::create(&root.join("store-clones"))?);
    let mut rng = StdRng::seed_from_u64(4);
    let mut backups = Vec::new();
    for i in 0..sz.clones {
        let name = format!("clone{i}");
        let ov = root.join(format!("{name}.qcow2"));
        run_ok(
            Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
                .arg(img)
                .arg(&ov),
        )?;
        let pattern = 0x20 + i % 200;
        let b = rt.block_on(async {
            let (q, qmp) = start_qemu(root, &name, &ov).await?;
            for _ in 0..8 {
                let off = rng.random_range(0..=(sz.data - CHUNK) / SMALL_WRITE) * SMALL_WRITE;
                guest_write(&qmp, &format!("write -P {pattern} {off} 4M")).await?;
            }
            backup(&qmp, &q, &store, &name, &root.join("work-clones"), sz.disk).await
        })?;
        eprintln!("clone {}/{}: {:.1} s", i + 1, sz.clones, b.secs);
        backups.push(b);
        std::fs::remove_file(&ov)?;
    }
    let usage = store.usage()?;
    Ok(Dedup {
        clones: sz.clones,
        usage,
        dedup_factor: usage.dedup_factor(),
        read_bytes: backups.iter().map(|b| b.read_bytes).sum(),
        unique_plain_bytes: backups.iter().map(|b| b.new_plain_bytes).sum(),
        backups,
        peer_bytes: copy_bytes * sz.clones as u64,
    })
}

#[derive(Debug, Default, Clone, Serialize)]
struct Restore {
    threads: usize,
    secs: f64,
    cpu_s: f64,
    mbs: f64,
    identical_to_qemu_img: bool,
}

#[derive(Debug, Default, Clone, Serialize)]
struct Verify {
    secs: f64,
    chunks: u64,
    stored_bytes: u64,
    plain_bytes: u64,
    mbs_stored: f64,
    mbs_plain: f64,
    bad: usize,
}

#[derive(Debug, Default, Clone, Serialize)]
struct Gc {
    chunks: usize,
    write_secs: f64,
    delete_secs: f64,
    gc_secs: f64,
    removed_chunks: u64,
}

/// `n` distinct 4 KiB chunks in one backup; the backup deleted; the GC timed.
fn gc(root: &Path, n: usize) -> Result<Gc> {
    let store = Arc::new(Store::create(&root.join("store-gc"))?);
    let t = Instant::now();
    let mut w = store.begin(meta("gc"), None)?;
    let mut index = Vec::with_capacity(n);
    for i in 0..n as u64 {
        let mut data = vec![0x5au8; 4096];
        data[..8].copy_from_slice(&(i + 1).to_le_bytes());
        index.push(w.put(data)?);
    }
    let row = DiskRow {
        name: "gc".into(),
        size: n as u64 * CHUNK,
        mode: "full".into(),
        reason: None,
        read_bytes: 0,
        new_bytes: 0,
        chunks: 0,
        bitmap: None,
    };
    w.disk(row, &index)?;
    let id = w.commit()?;
    let write_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    store.delete(&id)?;
    let delete_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let r = store.gc("bench")?;
    Ok(Gc {
        chunks: n,
        write_secs,
        delete_secs,
        gc_secs: t.elapsed().as_secs_f64(),
        removed_chunks: r.removed_chunks,
    })
}

#[derive(Debug, Default, Clone, Serialize)]
struct Report {
    date: String,
    qemu: String,
    cpus: usize,
    load_before: String,
    disk_bytes: u64,
    data_bytes: u64,
    mix: Mix,
    full: Backup,
    peers: Vec<Peer>,
    components: Components,
    incrementals: Vec<Incremental>,
    guest_writes: GuestWrites,
    dedup: Option<Dedup>,
    restore: Vec<Restore>,
    restore_peer: Peer,
    verify: Verify,
    gc: Gc,
    live_restore: Option<live::LiveRestore>,
}

fn first_line(c: &mut Command) -> String {
    c.output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default()
}

pub fn run() -> Result<()> {
    let sz = Sizes::from_args()?;
    let as_json = std::env::args().any(|a| a == "--json");
    let root = PathBuf::from(ROOT);
    // a killed run's leftovers (its QEMUs died with it)
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root)?;
    let scratch = Scratch(root.clone());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let r = bench(&rt, &root, &sz);
    drop(rt);
    drop(scratch);
    let r = r?;
    if as_json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        tables::print(&r, &sz);
    }
    Ok(())
}

fn bench(rt: &tokio::runtime::Runtime, root: &Path, sz: &Sizes) -> Result<Report> {
    let mut r = Report {
        date: first_line(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M"])),
        qemu: first_line(Command::new("qemu-system-x86_64").arg("--version")),
        cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        load_before: std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
            .to_string(),
        disk_bytes: sz.disk,
        data_bytes: sz.data,
        ..Report::default()
    };
    eprintln!(
        "making the image ({} MiB of data in a {} MiB disk)…",
        sz.data / MIB,
        sz.disk / MIB
    );
    let (img, mix, samples) = make_image(root, sz.disk, sz.data)?;
    r.mix = mix;
    r.components = components(&samples)?;
    drop(samples);

    eprintln!("peers: qemu-img convert…");
    let copy = root.join("copy.qcow2");
    for (what, args) in [
        (
            "qemu-img convert -c (zlib, qcow2's default)",
            &["-O", "qcow2", "-c"][..],
        ),
        (
            "qemu-img convert -c -o compression_type=zstd",
            &["-O", "qcow2", "-c", "-o", "compression_type=zstd"],
        ),
        ("qemu-img convert (plain qcow2 copy)", &["-O", "qcow2"]),
    ] {
        r.peers.push(convert(what, &img, &copy, args, sz.data)?);
        std::fs::remove_file(&copy)?;
    }
    // the clones first, while the base image holds what the peers copied (the later
    // steps write into it)
    eprintln!("{} clones…", sz.clones);
    let zstd_copy = r.peers.get(1).map_or(0, |p| p.out_bytes);
    r.dedup = Some(clones(rt, root, &img, sz, zstd_copy)?);

    let peer_raw = root.join("peer.raw");
    r.restore_peer = convert(
        "qemu-img convert -O raw",
        &img,
        &peer_raw,
        &["-O", "raw"],
        sz.data,
    )?;

    let (q, qmp) = rt.block_on(start_qemu(root, "vm", &img))?;
    let store = Arc::new(Store::create(&root.join("store"))?);
    let work = root.join("work");
    eprintln!("full backup…");
    r.full = rt.block_on(backup(&qmp, &q, &store, "bench", &work, sz.disk))?;
    if r.full.mode != "full" {
        bail!("the first backup was {}", r.full.mode);
    }

    for (k, &threads) in sz.threads.iter().enumerate() {
        eprintln!("restore with {threads} threads…");
        let dest = root.join(format!("restore-{threads}.raw"));
        let c0 = self_cpu();
        let t = Instant::now();
        store.restore_raw(
            &r.full.id,
            "disk0",
            None,
            &dest,
            threads,
            &Progress::default(),
        )?;
        let secs = t.elapsed().as_secs_f64();
        let cpu_s = self_cpu() - c0;
        let identical = k == 0 && same_content(&dest, &peer_raw)?;
        if k == 0 && !identical {
            bail!("the restored disk differs from qemu-img's copy of the image");
        }
        std::fs::remove_file(&dest)?;
        r.restore.push(Restore {
            threads,
            secs,
            cpu_s,
            mbs: mbs(sz.data, secs),
            identical_to_qemu_img: identical,
        });
    }
    eprintln!("live-restore…");
    r.live_restore = Some(rt.block_on(live::live_restore(
        root, &store, &r.full.id, &qmp, &peer_raw, sz,
    ))?);
    std::fs::remove_file(&peer_raw)?;

    eprintln!("verify…");
    let t = Instant::now();
    let v = store.verify(None, None, &Progress::default())?;
    let secs = t.elapsed().as_secs_f64();
    r.verify = Verify {
        secs,
        chunks: v.checked_chunks,
        stored_bytes: v.checked_bytes,
        plain_bytes: r.full.new_plain_bytes,
        mbs_stored: mbs(v.checked_bytes, secs),
        mbs_plain: mbs(r.full.new_plain_bytes, secs),
        bad: v.bad.len(),
    };

    eprintln!("incrementals…");
    let mut rng = StdRng::seed_from_u64(1);
    let one_pct = sz.disk / 100;
    for (what, bytes, clustered) in [
        ("nothing", 0, true),
        (
            "1 % of the disk, 64 KiB writes in 4 MiB runs",
            one_pct,
            true,
        ),
        ("1 % of the disk, 64 KiB writes scattered", one_pct, false),
    ] {
        let (writes, touched) = if bytes == 0 {
            (0, 0)
        } else {
            rt.block_on(change(&qmp, &mut rng, sz.disk, bytes, clustered))?
        };
        let b = rt.block_on(backup(&qmp, &q, &store, "bench", &work, sz.disk))?;
        if b.mode != "incremental" {
            bail!("the backup after {what} changed was {}", b.mode);
        }
        r.incrementals.push(Incremental {
            change: what.into(),
            changed_bytes: writes * SMALL_WRITE,
            writes,
            chunks_touched: touched,
            backup: b,
        });
    }

    eprintln!("guest writes alone and during a full backup…");
    r.guest_writes = rt.block_on(guest_writes(&qmp, &q, root, sz))?;
    drop(qmp);
    drop(q);

    eprintln!("GC of {} chunks…", sz.gc_chunks);
    r.gc = gc(root, sz.gc_chunks)?;
    Ok(r)
}
