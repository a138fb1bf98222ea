//! Backups end to end on real QEMU with the test guest: a backup store, the daemon
//! killed in the middle of a backup (the fleecing taken out of the VM at its restart, no
//! half backup listed), a full then an incremental backup of a running VM while the
//! guest writes records, restores
//! byte-identical to the disk at backup time, backups of the stopped VM (after a
//! kill: a full read that says why), a snapshot revert resetting change tracking,
//! prune, garbage collection, verify finding a damaged chunk.

use anyhow::{Context, Result};
use ferry_lab::{verify_records, Lab, RECORD_WRITER};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const MB: u64 = 1 << 20;

/// The file of disk `i` of `vm`.
fn volume_file(lab: &Lab, vm: &str, i: usize) -> Result<PathBuf> {
    let v = lab.ferry_json(&["vm", "show", vm])?;
    let d = &v["spec"]["disks"][i];
    let pool = d["pool"].as_str().context("pool")?;
    let vol = d["volume"].as_str().context("volume")?;
    let p = lab.ferry_json(&["pool", "show", pool])?;
    Ok(Path::new(p["spec"]["path"].as_str().context("path")?).join(vol))
}

/// A disk's content (also while a VM has it open).
fn content(file: &Path) -> Result<Vec<u8>> {
    let tmp = std::env::temp_dir().join(format!("ferry-bk-{}.raw", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let out = Command::new("qemu-img")
        .args(["convert", "-U", "-O", "raw"])
        .arg(file)
        .arg(&tmp)
        .output()?;
    anyhow::ensure!(out.status.success(), "qemu-img convert: {out:?}");
    let data = std::fs::read(&tmp)?;
    let _ = std::fs::remove_file(&tmp);
    Ok(data)
}

/// Fills disk `i` of stopped VM `vm` with `mib` MiB of random data from the host;
/// returns the data.
fn random_disk(lab: &Lab, vm: &str, i: usize, mib: u64) -> Result<Vec<u8>> {
    let random = lab.dir.join("random.raw");
    let ok = Command::new("dd")
        .args(["if=/dev/urandom", "bs=1M", "status=none"])
        .arg(format!("count={mib}"))
        .arg(format!("of={}", random.display()))
        .status()?;
    anyhow::ensure!(ok.success(), "dd");
    let ok = Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "qcow2"])
        .arg(&random)
        .arg(volume_file(lab, vm, i)?)
        .status()?;
    anyhow::ensure!(ok.success(), "qemu-img convert");
    let data = std::fs::read(&random)?;
    std::fs::remove_file(&random)?;
    Ok(data)
}

/// The element of array `list` named `name`.
fn named<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .and_then(|d| d.iter().find(|d| d["name"] == name))
        .unwrap_or(&Value::Null)
}

fn disk<'a>(b: &'a Value, name: &str) -> &'a Value {
    named(&b["disks"], name)
}

#[test]
fn backups_full_incremental_restore_offline_prune_gc_verify() -> Result<()> {
    let mut lab = Lab::new(env!("CARGO_BIN_EXE_ferry"))?;
    lab.start_daemon()?;
    let store_dir = lab.dir.join("backups");
    let sd = store_dir.to_str().unwrap();

    // A store; bad definitions are refused and change nothing.
    lab.ferry_ok(&["backup-store", "create", "bs", "--path", sd])?;
    let o = lab.ferry(&["backup-store", "create", "bs2", "--path", "relative/dir"])?;
    assert!(!o.status.success(), "{o:?}");
    let o = lab.ferry(&["backup-store", "create", "bs", "--path", sd])?;
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("already"),
        "{o:?}"
    );
    let stores = lab.ferry_json(&["backup-store", "list"])?;
    assert_eq!(stores.as_array().map(Vec::len), Some(1), "{stores}");

    // A VM with two disks: disk0 holds data the test checks byte for byte, disk1 the
    // record writer's records, written all through the backups.
    lab.create_test_vm(
        "bk",
        "10.77.0.30",
        &[
            "--disk",
            "bus=virtio,size=48M",
            "--disk",
            "bus=scsi,size=24M",
            "--disk",
            "bus=virtio,size=320M",
        ],
    )?;
    // disk2: 256 MiB of random data, written from the host before the VM starts
    // (reading and storing it takes a while: the daemon is killed in the middle)
    random_disk(&lab, "bk", 2, 256)?;
    lab.ferry_ok(&["vm", "start", "bk"])?;
    lab.wait_console("bk", "FERRY-READY", Duration::from_secs(120))?;
    lab.guest_sh(
        "bk",
        "dd if=/dev/urandom of=/dev/vda bs=1M count=6 seek=2 oflag=direct 2>/dev/null; echo ok",
    )?;
    lab.guest_sh(
        "bk",
        &format!("{RECORD_WRITER}; (ferry_writer w1 /dev/sda 0 > /dev/null 2>&1 &)"),
    )?;
    std::thread::sleep(Duration::from_secs(2));
    let acked_before: u64 = lab.guest_sh("bk", "cat /tmp/writer-seq")?.trim().parse()?;
    let disk0 = volume_file(&lab, "bk", 0)?;

    // 0. The daemon killed in the middle of the first backup (disk2 read whole): after
    //     its restart the fleecing is out of the VM (no image left growing with every
    //     guest write), no half backup is listed, and the next backup reads the disks
    //     whole, saying why.
    let id = lab.ferry_json(&["vm", "show", "bk"])?["id"]
        .as_u64()
        .context("vm id")?;
    let work = lab.state_dir().join("backup").join(id.to_string());
    let mut cut = lab.spawn(&["backup", "run", "bk", "--store", "bs"])?;
    ferry_lab::wait_for("the backup under way", Duration::from_secs(60), || {
        Ok(work.join("fleecing.json").exists())
    })?;
    std::thread::sleep(Duration::from_millis(300));
    anyhow::ensure!(
        work.join("fleecing.json").exists(),
        "the backup ended before the daemon could be killed in it"
    );
    lab.stop_daemon(true)?;
    let _ = cut.wait();
    lab.start_daemon()?;
    ferry_lab::wait_for("the restart's sweep", Duration::from_secs(30), || {
        Ok(!work.join("fleecing.json").exists())
    })?;
    assert!(!work.join("fleece0.qcow2").exists() && !work.join("fleece2.qcow2").exists());
    let qemu = lab.vm_state("bk")?.1.context("QEMU pid")?;
    let open: Vec<String> = std::fs::read_dir(format!("/proc/{qemu}/fd"))?
        .filter_map(|f| std::fs::read_link(f.ok()?.path()).ok())
        .map(|p| p.display().to_string())
        .collect();
    assert!(
        !open.iter().any(|p| p.contains("fleece")),
        "QEMU still holds {open:?}"
    );
    let list = lab.ferry_json(&["backup", "list", "--vm", "bk"])?;
    assert!(
        list["backups"].as_array().is_some_and(Vec::is_empty),
        "{list}"
    );
    let events = lab.ferry_ok(&["events", "--vm", "bk"])?;
    assert!(events.contains("fleecing"), "{events}");

    // 1. The first complete backup reads every allocated chunk and says why (the
    //    bitmap the cut-off one left counts from a backup that never finished).
    let b1 = lab.ferry_json(&["backup", "run", "bk", "--store", "bs"])?;
    let id1 = b1["id"].as_str().context("backup id")?.to_string();
    assert_eq!(disk(&b1, "disk0")["mode"], "full", "{b1}");
    assert!(
        disk(&b1, "disk0")["reason"]
            .as_str()
            .unwrap_or("")
            .contains("never finished"),
        "{b1}"
    );
    let at_b1 = content(&disk0)?;

    // 2. The guest changes 1 MiB of disk0: the incremental reads that chunk (and
    //    disk1's chunks the writer touched), not the disk.
    lab.guest_sh(
        "bk",
        "dd if=/dev/urandom of=/dev/vda bs=1M count=1 seek=30 oflag=direct 2>/dev/null; echo ok",
    )?;
    let b2 = lab.ferry_json(&["backup", "run", "bk", "--store", "bs"])?;
    let id2 = b2["id"].as_str().context("backup id")?.to_string();
    assert_eq!(disk(&b2, "disk0")["mode"], "incremental", "{b2}");
    assert_eq!(disk(&b2, "disk0")["read_bytes"], 4 * MB, "{b2}");
    assert_eq!(disk(&b2, "disk1")["mode"], "incremental", "{b2}");
    assert!(
        disk(&b2, "disk1")["read_bytes"]
            .as_u64()
            .unwrap_or(u64::MAX)
            < 24 * MB,
        "{b2}"
    );
    let at_b2 = content(&disk0)?;
    assert_ne!(at_b1, at_b2);

    // 3. Restores: each backup as a new VM, disk0 byte-identical to the disk at that
    //    backup, disk1 a clean run of records from the start past what was
    //    acknowledged before the first backup.
    for (id, name, want) in [(&id1, "r1", &at_b1), (&id2, "r2", &at_b2)] {
        lab.ferry_ok(&["backup", "restore", id, "--as", name])?;
        assert_eq!(lab.vm_state(name)?.0, "stopped");
        assert!(
            content(&volume_file(&lab, name, 0)?)? == *want,
            "{name}: disk0 differs from the disk at backup {id}"
        );
        let rep = verify_records(&volume_file(&lab, name, 1)?)?;
        assert!(rep.is_clean(), "{name}: {rep}");
        assert!(
            rep.last_seq.unwrap_or(0) >= acked_before,
            "{name}: {rep}, {acked_before} acknowledged before"
        );
    }
    // A restore over an existing name changes nothing.
    let o = lab.ferry(&["backup", "restore", &id1, "--as", "r1"])?;
    assert!(!o.status.success(), "{o:?}");

    // 4. Stopped: its disks are read by qemu-storage-daemon. `vm kill` lets QEMU quit
    //    (its bitmaps are written into the images): incremental, nothing changed.
    lab.guest_sh("bk", "touch /tmp/stop-writer; sleep 1; echo ok")?;
    lab.ferry_ok(&["vm", "kill", "bk"])?;
    let b3 = lab.ferry_json(&["backup", "run", "bk", "--store", "bs"])?;
    assert_eq!(disk(&b3, "disk0")["mode"], "incremental", "{b3}");
    assert_eq!(disk(&b3, "disk0")["read_bytes"], 0, "{b3}");
    let b4 = lab.ferry_json(&["backup", "run", "bk", "--store", "bs"])?;
    assert_eq!(disk(&b4, "disk1")["mode"], "incremental", "{b4}");
    assert_eq!(disk(&b4, "disk1")["read_bytes"], 0, "{b4}");
    // A QEMU killed outright with the bitmap open leaves it marked in use: the next
    // backup reads everything and says why.
    lab.ferry_ok(&["vm", "start", "bk"])?;
    lab.wait_console("bk", "FERRY-READY", Duration::from_secs(120))?;
    let pid = lab.vm_state("bk")?.1.context("QEMU's pid")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid)?),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    ferry_lab::wait_for("bk crashed", Duration::from_secs(30), || {
        Ok(lab.vm_state("bk")?.0 == "crashed")
    })?;
    let b5 = lab.ferry_json(&["backup", "run", "bk", "--store", "bs"])?;
    assert_eq!(disk(&b5, "disk0")["mode"], "full", "{b5}");
    assert!(
        disk(&b5, "disk0")["reason"]
            .as_str()
            .unwrap_or("")
            .contains("uncleanly"),
        "{b5}"
    );

    // 5. A snapshot revert resets change tracking: the next backup says so.
    lab.ferry_ok(&["vm", "snapshot", "bk", "s1"])?;
    lab.ferry_ok(&["vm", "revert", "bk", "s1"])?;
    let b6 = lab.ferry_json(&["backup", "run", "bk", "--store", "bs"])?;
    assert_eq!(disk(&b6, "disk0")["mode"], "full", "{b6}");
    assert!(
        disk(&b6, "disk0")["reason"]
            .as_str()
            .unwrap_or("")
            .contains("revert"),
        "{b6}"
    );
    let id6 = b6["id"].as_str().context("id")?.to_string();

    // 6. Listing, prune (keep the newest), garbage collection, and the kept backup
    //    still restores.
    let list = lab.ferry_json(&["backup", "list", "--vm", "bk"])?;
    assert_eq!(list["backups"].as_array().map(Vec::len), Some(6), "{list}");
    let pruned = lab.ferry_json(&["backup", "prune", "bk", "--store", "bs", "--keep-last", "1"])?;
    let gone = pruned["verdicts"]
        .as_array()
        .map_or(0, |v| v.iter().filter(|v| v["keep"] == false).count());
    assert_eq!(gone, 5, "{pruned}");
    let gc = lab.ferry_json(&["backup", "gc", "--store", "bs"])?;
    assert!(gc["removed_chunks"].as_u64().unwrap_or(0) > 0, "{gc}");
    let info = lab.ferry_json(&["backup-store", "show", "bs"])?;
    assert_eq!(info["usage"]["backups"], 1, "{info}");
    assert_eq!(info["usage"]["unreferenced_chunks"], 0, "{info}");
    let v = lab.ferry_json(&["backup", "verify", "--store", "bs"])?;
    assert!(v["bad"].as_array().is_some_and(Vec::is_empty), "{v}");
    lab.ferry_ok(&["backup", "restore", &id6, "--as", "r6"])?;
    assert!(
        content(&volume_file(&lab, "r6", 0)?)? == content(&disk0)?,
        "r6 differs"
    );

    // 6b. A scheduled job: a bad schedule is refused; one due in a minute or two runs
    //     by itself (claimed once), backs the VM up and prunes to its policy.
    let o = lab.ferry(&[
        "backup",
        "job",
        "create",
        "j0",
        "--store",
        "bs",
        "--schedule",
        "at noon",
        "--vm",
        "bk",
    ])?;
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Schedule"),
        "{o:?}"
    );
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let minute = (secs / 60 + if secs % 60 < 40 { 1 } else { 2 }) % 60;
    let schedule = format!("*:{minute:02}");
    let job = lab.ferry_json(&[
        "backup",
        "job",
        "create",
        "nightly",
        "--store",
        "bs",
        "--schedule",
        &schedule,
        "--vm",
        "bk",
        "--keep-last",
        "2",
    ])?;
    assert!(job["next_run"].as_i64().is_some(), "{job}");
    ferry_lab::wait_for("the job's scheduled run", Duration::from_secs(200), || {
        let j = lab.ferry_json(&["backup", "job", "show", "nightly"])?;
        Ok(j["last_result"]["backed_up"] == serde_json::json!(["bk"]))
    })?;
    let ran = lab.ferry_json(&["backup", "job", "run", "nightly"])?;
    assert_eq!(ran["backed_up"], serde_json::json!(["bk"]), "{ran}");
    let list = lab.ferry_json(&["backup", "list", "--vm", "bk"])?;
    assert_eq!(
        list["backups"].as_array().map(Vec::len),
        Some(2),
        "pruned to 2: {list}"
    );
    let id6 = list["backups"][1]["id"].as_str().context("id")?.to_string();
    lab.ferry_ok(&["backup", "job", "delete", "nightly"])?;

    // 7. A damaged chunk: verify fails and names the backup using it.
    let chunks = store_dir.join("chunks");
    let victim = std::fs::read_dir(&chunks)?
        .filter_map(Result::ok)
        .filter(|d| d.file_name().len() == 2)
        .flat_map(|d| {
            std::fs::read_dir(d.path())
                .into_iter()
                .flatten()
                .filter_map(Result::ok)
        })
        .map(|f| f.path())
        .find(|p| {
            std::fs::metadata(p)
                .map(|m| m.len() > 1000)
                .unwrap_or(false)
        })
        .context("a chunk file")?;
    let mut bytes = std::fs::read(&victim)?;
    let n = bytes.len();
    bytes[n - 100] ^= 0x55;
    std::fs::write(&victim, bytes)?;
    let o = lab.ferry(&["backup", "verify", "--store", "bs"])?;
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("damaged"), "{o:?}");
    let events = lab.ferry_ok(&["events"])?;
    assert!(
        events.contains(&id6),
        "the event names the backup: {events}"
    );
    Ok(())
}

/// The md5 of `data` (as the guest's `md5sum` prints it).
fn md5(data: &[u8]) -> Result<String> {
    use std::io::Write;
    let mut c = Command::new("md5sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    c.stdin.take().context("stdin")?.write_all(data)?;
    let out = c.wait_with_output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string())
}

/// Live-restore: the VM runs from its backup at once (its disks empty qcow2 volumes
/// reading what they lack from the daemon's NBD export of the backup), the guest reads
/// backed-up data that was not copied yet, writes records all along; the daemon is
/// SIGKILLed in the middle and the restore goes on after its restart; at the end the
/// disks hold the backup byte for byte, with no backing, and every acknowledged
/// record. While it runs, what would need the data in one place is refused.
#[test]
fn live_restore_runs_at_once_and_survives_a_daemon_kill() -> Result<()> {
    let mut lab = Lab::new(env!("CARGO_BIN_EXE_ferry"))?;
    lab.start_daemon()?;
    let store_dir = lab.dir.join("backups");
    lab.ferry_ok(&[
        "backup-store",
        "create",
        "bs",
        "--path",
        store_dir.to_str().context("path")?,
    ])?;
    lab.create_test_vm(
        "src",
        "10.77.0.40",
        &[
            "--disk",
            "bus=virtio,size=64M",
            "--disk",
            "bus=scsi,size=24M",
        ],
    )?;
    let want0 = random_disk(&lab, "src", 0, 64)?;
    let b = lab.ferry_json(&["backup", "run", "src", "--store", "bs"])?;
    let id = b["id"].as_str().context("backup id")?.to_string();

    // Bad requests change nothing.
    let o = lab.ferry(&["backup", "restore", &id, "--as", "x", "--bwlimit", "1M"])?;
    assert!(!o.status.success(), "{o:?}");
    let o = lab.ferry(&["backup", "restore", "nosuch", "--as", "x", "--live"])?;
    assert!(!o.status.success(), "{o:?}");
    assert!(lab.ferry(&["vm", "show", "x"])?.status.code() != Some(0));

    // At 2 MiB/s the 88 MiB take ~45 s to fill: the VM runs long before.
    lab.ferry_ok(&[
        "backup",
        "restore",
        &id,
        "--as",
        "lr",
        "--live",
        "--bwlimit",
        "2M",
    ])?;
    assert_eq!(lab.vm_state("lr")?.0, "running");
    lab.wait_console("lr", "FERRY-READY", Duration::from_secs(120))?;
    let v = lab.ferry_json(&["vm", "show", "lr"])?;
    assert_eq!(v["live_restore"]["backup"], id.as_str(), "{v}");
    // The last MiB of disk0 is not copied yet: the guest reads it from the backup.
    let sum = lab.guest_sh(
        "lr",
        "dd if=/dev/vda bs=1M skip=63 count=1 2>/dev/null | md5sum",
    )?;
    assert!(
        sum.contains(&md5(&want0[63 << 20..])?),
        "the guest read {sum}"
    );
    lab.guest_sh(
        "lr",
        &format!("{RECORD_WRITER}; (ferry_writer w1 /dev/sda 0 > /dev/null 2>&1 &)"),
    )?;
    std::thread::sleep(Duration::from_secs(2));
    // Its data is in two places: no snapshot, backup, edit or migration now; the
    // backup cannot be deleted.
    for args in [
        &["vm", "snapshot", "lr", "s1"][..],
        &["backup", "run", "lr", "--store", "bs"][..],
        &["vm", "clone", "lr", "lr2"][..],
    ] {
        let o = lab.ferry(args)?;
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("live-restored"),
            "{args:?}: {o:?}"
        );
    }
    assert_eq!(lab.ferry_json(&["backup", "show", &id])?["protected"], true);
    let o = lab.ferry(&["backup", "delete", &id])?;
    assert!(!o.status.success(), "{o:?}");

    // The daemon killed mid-restore: the VM lives on; the restore resumes.
    let qemu = lab.vm_state("lr")?.1.context("QEMU pid")?;
    lab.stop_daemon(true)?;
    std::thread::sleep(Duration::from_secs(4));
    lab.start_daemon()?;
    assert_eq!(lab.vm_state("lr")?.1, Some(qemu), "the same QEMU");
    let v = lab.ferry_json(&["vm", "show", "lr"])?;
    assert!(v["live_restore"].is_object(), "finished too early: {v}");
    let ended = ferry_lab::wait_for("the live-restore's end", Duration::from_secs(240), || {
        Ok(lab.ferry_json(&["vm", "show", "lr"])?["live_restore"].is_null())
    });
    if let Err(e) = ended {
        let events = lab.ferry_ok(&["events", "--vm", "lr"]).unwrap_or_default();
        let log = lab.daemon_log();
        let tail = &log[log.len().saturating_sub(6000)..];
        anyhow::bail!("{e}\nevents:\n{events}\ndaemon log:\n{tail}");
    }
    assert_eq!(lab.vm_state("lr")?.0, "running");
    let acked: u64 = lab.guest_sh("lr", "cat /tmp/writer-seq")?.trim().parse()?;
    lab.guest_sh("lr", "touch /tmp/stop-writer; sleep 1; sync; echo ok")?;
    let events = lab.ferry_ok(&["events", "--vm", "lr"])?;
    assert!(events.contains("finished"), "{events}");
    assert_eq!(
        lab.ferry_json(&["backup", "show", &id])?["protected"],
        false
    );

    // The volumes alone hold everything.
    for i in 0..2 {
        let info = Command::new("qemu-img")
            .args(["info", "-U", "--output=json"])
            .arg(volume_file(&lab, "lr", i)?)
            .output()?;
        let info: Value = serde_json::from_slice(&info.stdout)?;
        assert_eq!(info["format"], "qcow2", "{info}");
        assert!(info.get("backing-filename").is_none(), "{info}");
    }
    let got0 = content(&volume_file(&lab, "lr", 0)?)?;
    if got0 != want0 {
        let diff: Vec<usize> = (0..64)
            .filter(|m| got0[m << 20..(m + 1) << 20] != want0[m << 20..(m + 1) << 20])
            .collect();
        let map = Command::new("qemu-img")
            .args(["map", "-U", "--output=json"])
            .arg(volume_file(&lab, "lr", 0)?)
            .output()?;
        anyhow::bail!(
            "disk0 differs from the backup in MiB {diff:?} ({} vs {} bytes); map {}; events {}",
            got0.len(),
            want0.len(),
            String::from_utf8_lossy(&map.stdout),
            lab.ferry_ok(&["events", "--vm", "lr"])?
        );
    }
    let rep = verify_records(&volume_file(&lab, "lr", 1)?)?;
    assert!(rep.is_clean(), "{rep}");
    assert!(
        rep.last_seq.unwrap_or(0) >= acked,
        "{rep}, {acked} acknowledged"
    );
    // And it is an ordinary VM again.
    lab.ferry_ok(&["vm", "snapshot", "lr", "s1"])?;
    Ok(())
}

/// A raw disk image of `mib` MiB: an MBR partition table with one Linux partition
/// from 1 MiB to the end, holding an ext4 filesystem made from `src` (no mount: mke2fs
/// populates it).
fn partitioned_ext4(img: &Path, src: &Path, mib: u64) -> Result<()> {
    let f = std::fs::File::create(img)?;
    f.set_len(mib * MB)?;
    let sectors = u32::try_from((mib - 1) * MB / 512)?;
    let mut mbr = [0u8; 512];
    mbr[446 + 4] = 0x83;
    mbr[446 + 8..446 + 12].copy_from_slice(&2048u32.to_le_bytes());
    mbr[446 + 12..446 + 16].copy_from_slice(&sectors.to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xAA;
    use std::os::unix::fs::FileExt;
    f.write_all_at(&mbr, 0)?;
    drop(f);
    let ok = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "offset=1048576", "-d"])
        .arg(src)
        .arg(img)
        .arg(format!("{}k", (mib - 1) * 1024))
        .status()?;
    anyhow::ensure!(ok.success(), "mkfs.ext4");
    Ok(())
}

/// Writes raw image `img` onto disk `i` of stopped VM `vm`.
fn write_disk(lab: &Lab, vm: &str, i: usize, img: &Path) -> Result<()> {
    let ok = Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "qcow2"])
        .arg(img)
        .arg(volume_file(lab, vm, i)?)
        .status()?;
    anyhow::ensure!(ok.success(), "qemu-img convert");
    Ok(())
}

fn entry<'a>(l: &'a Value, name: &str) -> &'a Value {
    named(&l["entries"], name)
}

/// File-level restore: a helper VM attaches the backup read-only and lists and reads
/// its filesystems (a partitioned ext4 disk, a whole-disk ext4, a disk with none); a
/// file downloads byte-identical, a folder as a tar archive with its link kept a link;
/// links are never followed, `..` is refused, and the daemon's restart stops the
/// helper it left.
#[test]
fn file_level_restore_lists_and_downloads_files_of_a_backup() -> Result<()> {
    let mut lab = Lab::new(env!("CARGO_BIN_EXE_ferry"))?;
    lab.start_daemon()?;
    let store_dir = lab.dir.join("backups");
    lab.ferry_ok(&[
        "backup-store",
        "create",
        "bs",
        "--path",
        store_dir.to_str().context("path")?,
    ])?;
    lab.create_test_vm(
        "fr",
        "10.77.0.50",
        &[
            "--disk",
            "bus=virtio,size=48M",
            "--disk",
            "bus=scsi,size=16M",
            "--disk",
            "bus=virtio,size=8M",
            "--nic",
            "bridge=br0",
        ],
    )?;
    // disk0: a partition with ext4 holding folders, a 3 MB file, a link pointing at the
    // host's /etc/shadow and a name that needs quoting
    let src = lab.dir.join("fs0");
    std::fs::create_dir_all(src.join("etc/deep"))?;
    std::fs::write(src.join("etc/hostname"), b"fr\n")?;
    let blob: Vec<u8> = (0..3_000_000u32)
        .map(|i| i.wrapping_mul(2_654_435_761).to_le_bytes()[1])
        .collect();
    std::fs::write(src.join("etc/deep/blob"), &blob)?;
    std::os::unix::fs::symlink("/etc/shadow", src.join("escape"))?;
    std::fs::write(src.join("a b&c=d?.txt"), b"quoted\n")?;
    let img0 = lab.dir.join("disk0.raw");
    partitioned_ext4(&img0, &src, 48)?;
    write_disk(&lab, "fr", 0, &img0)?;
    // disk1: ext4 on the whole disk
    let src1 = lab.dir.join("fs1");
    std::fs::create_dir_all(&src1)?;
    std::fs::write(src1.join("hello.txt"), b"from disk1\n")?;
    let img1 = lab.dir.join("disk1.raw");
    std::fs::File::create(&img1)?.set_len(16 * MB)?;
    let ok = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&src1)
        .arg(&img1)
        .status()?;
    anyhow::ensure!(ok.success(), "mkfs.ext4");
    write_disk(&lab, "fr", 1, &img1)?;
    // disk2: random bytes, no filesystem
    random_disk(&lab, "fr", 2, 8)?;

    let b = lab.ferry_json(&["backup", "run", "fr", "--store", "bs"])?;
    let id = b["id"].as_str().context("backup id")?.to_string();
    // /metrics: the store and fr's newest backup
    let m = lab.metrics()?;
    assert!(
        m.contains("ferry_backup_store_backups{store=\"bs\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("ferry_backup_last_success_timestamp_seconds{vm=\"fr\",store=\"bs\"}"),
        "{m}"
    );

    // The disks, their volumes, and what is inside.
    let root = lab.ferry_json(&["backup", "files", &id])?;
    let names: Vec<&str> = root["entries"]
        .as_array()
        .context("entries")?
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    assert_eq!(names, ["disk0", "disk1", "disk2"], "{root}");
    let d0 = lab.ferry_json(&["backup", "files", &id, "/disk0"])?;
    assert_eq!(entry(&d0, "p1")["fs"], "ext4", "{d0}");
    let d1 = lab.ferry_json(&["backup", "files", &id, "/disk1"])?;
    assert_eq!(entry(&d1, "fs")["fs"], "ext4", "{d1}");
    let d2 = lab.ferry_json(&["backup", "files", &id, "/disk2"])?;
    assert!(entry(&d2, "fs")["error"].is_string(), "{d2}");
    let o = lab.ferry(&["backup", "files", &id, "/disk2/fs"])?;
    assert!(!o.status.success(), "{o:?}");
    let top = lab.ferry_json(&["backup", "files", &id, "/disk0/p1"])?;
    assert_eq!(entry(&top, "escape")["kind"], "symlink", "{top}");
    assert_eq!(entry(&top, "escape")["target"], "/etc/shadow", "{top}");
    assert_eq!(entry(&top, "etc")["kind"], "dir", "{top}");
    let etc = lab.ferry_json(&["backup", "files", &id, "/disk0/p1/etc/deep"])?;
    assert_eq!(entry(&etc, "blob")["size"], 3_000_000, "{etc}");
    // the table for people
    let table = lab.ferry_ok(&["backup", "files", &id, "/disk0/p1"])?;
    assert!(table.contains("escape -> /etc/shadow"), "{table}");

    // Downloads: a file byte for byte, a name that needs quoting, a folder as tar.
    let out = lab.dir.join("blob.out");
    lab.ferry_ok(&[
        "backup",
        "files",
        &id,
        "/disk0/p1/etc/deep/blob",
        "--download",
        out.to_str().context("path")?,
    ])?;
    assert!(std::fs::read(&out)? == blob, "the downloaded file differs");
    let q = lab.ferry_ok(&["backup", "files", &id, "/disk0/p1/a b&c=d?.txt", "-o", "-"])?;
    assert_eq!(q, "quoted\n");
    let h = lab.ferry_ok(&["backup", "files", &id, "/disk1/fs/hello.txt", "-o", "-"])?;
    assert_eq!(h, "from disk1\n");
    let tar = lab.dir.join("p1.tar");
    lab.ferry_ok(&[
        "backup",
        "files",
        &id,
        "/disk0/p1",
        "--download",
        tar.to_str().context("path")?,
    ])?;
    let x = lab.dir.join("x");
    std::fs::create_dir_all(&x)?;
    let ok = Command::new("tar")
        .arg("-xf")
        .arg(&tar)
        .arg("-C")
        .arg(&x)
        .status()?;
    anyhow::ensure!(ok.success(), "tar -x");
    assert!(std::fs::read(x.join("p1/etc/deep/blob"))? == blob);
    assert_eq!(std::fs::read(x.join("p1/etc/hostname"))?, b"fr\n");
    assert_eq!(
        std::fs::read_link(x.join("p1/escape"))?,
        Path::new("/etc/shadow")
    );

    // Links are not followed, `..` climbs nowhere, unknown things are not found; a
    // failed download leaves no file behind.
    let bad = lab.dir.join("bad.out");
    let o = lab.ferry(&[
        "backup",
        "files",
        &id,
        "/disk0/p1/escape",
        "-o",
        bad.to_str().context("path")?,
    ])?;
    assert!(!o.status.success(), "{o:?}");
    assert!(!bad.exists() && !lab.dir.join("bad.out.part").exists());
    let o = lab.ferry(&["backup", "files", &id, "/disk0/p1/escape/x"])?;
    assert!(String::from_utf8_lossy(&o.stderr).contains("link"), "{o:?}");
    let o = lab.ferry(&["backup", "files", &id, "/disk0/p1/../../etc"])?;
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("(400)"),
        "{o:?}"
    );
    let o = lab.ferry(&["backup", "files", &id, "/disk0/p1/nothing"])?;
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("(404)"),
        "{o:?}"
    );
    let o = lab.ferry(&["backup", "files", "no-such-backup"])?;
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("(404)"),
        "{o:?}"
    );

    // One helper ran; the daemon's restart stops the one it left.
    let helpers = lab.qemu_pids();
    assert_eq!(helpers.len(), 1, "one helper VM: {helpers:?}");
    lab.stop_daemon(true)?;
    lab.start_daemon()?;
    ferry_lab::wait_for("the helper stopped", Duration::from_secs(30), || {
        Ok(lab.qemu_pids().is_empty())
    })?;
    // and a new one answers
    let again = lab.ferry_json(&["backup", "files", &id, "/disk1/fs"])?;
    assert_eq!(entry(&again, "hello.txt")["size"], 11, "{again}");

    // Boot check: the backup boots (the test guest's kernel, its disks overlays on the
    // backup) until its ready marker; its NIC is on a hub inside QEMU, no tap on the
    // bridge; nothing stays. A marker that never shows is a failed check.
    let check = lab.spawn(&[
        "--json",
        "backup",
        "boot-check",
        &id,
        "--marker",
        "FERRY-READY",
        "--timeout",
        "240",
    ])?;
    let check_dir = lab.run_dir().join("boot-check").join("0");
    ferry_lab::wait_for("the boot check's QEMU", Duration::from_secs(60), || {
        Ok(std::fs::read_to_string(check_dir.join("qemu.pid")).is_ok())
    })?;
    let pid = std::fs::read_to_string(check_dir.join("qemu.pid"))?;
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", pid.trim())).unwrap_or_default();
    let cmdline = String::from_utf8_lossy(&cmdline);
    assert!(cmdline.contains("hubport"), "{cmdline}");
    let ports = lab.ip(&["link", "show", "master", "br0"])?;
    assert!(
        String::from_utf8_lossy(&ports.stdout).trim().is_empty(),
        "a tap on br0: {ports:?}"
    );
    let out = check.wait_with_output()?;
    assert!(out.status.success(), "{out:?}");
    let r: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(r["booted"], true, "{r}");
    assert!(
        !check_dir.exists(),
        "the boot check left {}",
        check_dir.display()
    );
    let o = lab.ferry(&[
        "backup",
        "boot-check",
        &id,
        "--marker",
        "NEVER-SHOWS",
        "--timeout",
        "10",
    ])?;
    assert!(!o.status.success(), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("did not boot"),
        "{o:?}"
    );
    let ev = lab.ferry_ok(&["events"])?;
    assert!(ev.contains("boot check of backup"), "{ev}");
    assert!(lab.qemu_pids().iter().all(|p| p.to_string() != pid.trim()));
    Ok(())
}

/// The content of a volume of `pool` on `cli`'s host.
fn pool_volume(cli: &ferry_lab::Cli, pool: &str, vol: &str) -> Result<Vec<u8>> {
    let p = cli.ferry_json(&["pool", "show", pool])?;
    content(&Path::new(p["spec"]["path"].as_str().context("path")?).join(vol))
}

/// Change tracking survives what VMs do: a backup, a live migration to another host,
/// the guest writing, an incremental backup on the new host (its bitmap came along in
/// the shared qcow2), its daemon killed and restarted, another incremental; each
/// restore byte-identical to the disk when it was taken.
#[test]
fn change_tracking_survives_live_migration_and_a_daemon_restart() -> Result<()> {
    let mut lab = ferry_lab::ClusterLab::for_test(env!("CARGO_BIN_EXE_ferry"), 2)?;
    let (h1, h2) = (lab.cli("h1")?, lab.cli("h2")?);
    let store = lab.shared_dir().join("bs");
    let sd = store.to_str().context("path")?;
    lab.cli("h1")?
        .ferry_ok(&["backup-store", "create", "bs", "--path", sd])?;
    // (a cluster knows its stores; a static lab's hosts each adopt it)
    if h2
        .ferry_json(&["backup-store", "list"])?
        .as_array()
        .map(Vec::len)
        != Some(1)
    {
        h2.ferry_ok(&["backup-store", "create", "bs", "--path", sd])?;
    }
    h1.boot_vm(
        "bt",
        "10.78.0.150",
        &["--disk", "pool=shared,size=24M,format=qcow2"],
    )?;
    let vol = h1.ferry_json(&["vm", "show", "bt"])?["spec"]["disks"][0]["volume"]
        .as_str()
        .context("volume")?
        .to_string();
    let write = |cli: &ferry_lab::Cli, seek: u32| -> Result<()> {
        cli.guest_sh(
            "bt",
            &format!(
                "dd if=/dev/urandom of=/dev/vda bs=1M count=2 seek={seek} oflag=direct 2>/dev/null; sync; echo ok"
            ),
        )?;
        Ok(())
    };
    // restore(backup) = the disk when it was taken (no writes meanwhile)
    let shared = lab.shared_dir();
    let check = |cli: &ferry_lab::Cli, id: &str, as_name: &str| -> Result<()> {
        let disk = content(&shared.join(&vol))?;
        cli.ferry_ok(&["backup", "restore", id, "--as", as_name])?;
        let r = cli.ferry_json(&["vm", "show", as_name])?;
        let d0 = &r["spec"]["disks"][0];
        let rv = d0["volume"].as_str().context("volume")?;
        let restored = pool_volume(cli, d0["pool"].as_str().context("pool")?, rv)?;
        assert!(
            restored == disk,
            "{as_name}: the restore differs from the disk"
        );
        cli.ferry_ok(&["vm", "delete", as_name])?;
        Ok(())
    };
    write(&h1, 1)?;
    let b1 = h1.ferry_json(&["backup", "run", "bt", "--store", "bs"])?;
    assert_eq!(disk(&b1, "disk0")["mode"], "full", "{b1}");

    // live migration to h2; the guest writes; the next backup is incremental there
    h1.ferry_ok(&["vm", "migrate", "bt", "--to", "h2"])?;
    write(&h2, 9)?;
    let b2 = h2.ferry_json(&["backup", "run", "bt", "--store", "bs"])?;
    assert_eq!(disk(&b2, "disk0")["mode"], "incremental", "{b2}");
    assert!(
        disk(&b2, "disk0")["read_bytes"]
            .as_u64()
            .context("read_bytes")?
            <= 8 * MB,
        "{b2}"
    );
    check(&h2, b2["id"].as_str().context("id")?, "bt-r2")?;

    // h2's daemon killed and started again (QEMU runs on): still incremental
    lab.kill_daemon("h2")?;
    lab.start_daemon("h2")?;
    let h2 = lab.cli("h2")?;
    ferry_lab::wait_for("h2's daemon", Duration::from_secs(60), || {
        Ok(h2.ferry(&["vm", "show", "bt"])?.status.success())
    })?;
    write(&h2, 17)?;
    let b3 = h2.ferry_json(&["backup", "run", "bt", "--store", "bs"])?;
    assert_eq!(disk(&b3, "disk0")["mode"], "incremental", "{b3}");
    check(&h2, b3["id"].as_str().context("id")?, "bt-r3")?;
    Ok(())
}

/// Remote sync: h2 pulls the backups of a store of h1 (its API over HTTPS, h1's CA
/// and a token of h1) into a store of its own; a second sync copies nothing; a restore
/// on h2 from the copy is byte-identical; a wrong token or CA copies nothing and says
/// why.
#[test]
fn sync_pulls_another_hosts_backups_and_restores_them() -> Result<()> {
    let lab = ferry_lab::ClusterLab::for_test(env!("CARGO_BIN_EXE_ferry"), 2)?;
    let (h1, h2) = (lab.cli("h1")?, lab.cli("h2")?);
    let src = lab.state_dir("h1").join("src-store");
    let dst = lab.state_dir("h2").join("dst-store");
    h1.ferry_ok(&[
        "backup-store",
        "create",
        "src",
        "--path",
        src.to_str().context("path")?,
    ])?;
    let have = |cli: &ferry_lab::Cli, name: &str| -> Result<bool> {
        Ok(cli
            .ferry_json(&["backup-store", "list"])?
            .as_array()
            .is_some_and(|l| l.iter().any(|s| s["name"] == name)))
    };
    if !have(&h2, "dst")? {
        h2.ferry_ok(&[
            "backup-store",
            "create",
            "dst",
            "--path",
            dst.to_str().context("path")?,
        ])?;
    }
    h1.boot_vm("sy", "10.78.0.160", &["--disk", "size=16M"])?;
    h1.guest_sh(
        "sy",
        "dd if=/dev/urandom of=/dev/vda bs=1M count=6 seek=1 oflag=direct 2>/dev/null; echo ok",
    )?;
    let b1 = h1.ferry_json(&["backup", "run", "sy", "--store", "src"])?;
    h1.guest_sh(
        "sy",
        "dd if=/dev/urandom of=/dev/vda bs=1M count=1 seek=12 oflag=direct 2>/dev/null; sync; echo ok",
    )?;
    let b2 = h1.ferry_json(&["backup", "run", "sy", "--store", "src"])?;
    let vm = h1.ferry_json(&["vm", "show", "sy"])?;
    let d0 = &vm["spec"]["disks"][0];
    let disk_now = pool_volume(
        &h1,
        d0["pool"].as_str().context("pool")?,
        d0["volume"].as_str().context("volume")?,
    )?;

    let from = lab.host("h1")?.api();
    let token = lab.state_dir("h1").join("admin-token");
    let ca = lab.state_dir("h1").join("pki").join("ca.crt");
    let sync = |token: &Path, ca: &Path| {
        h2.ferry(&[
            "--json",
            "backup",
            "sync",
            "--store",
            "dst",
            "--from",
            &from,
            "--remote-store",
            "src",
            "--remote-token-file",
            token.to_str().unwrap_or_default(),
            "--remote-ca",
            ca.to_str().unwrap_or_default(),
        ])
    };
    let o = sync(&token, &ca)?;
    assert!(o.status.success(), "{o:?}");
    let r: Value = serde_json::from_slice(&o.stdout)?;
    assert_eq!(r["copied"].as_array().map(Vec::len), Some(2), "{r}");
    assert!(
        r["chunks_fetched"].as_u64().context("chunks_fetched")? > 0,
        "{r}"
    );
    // the second backup shared most chunks with the first: fetched once
    assert!(
        r["chunks_reused"].as_u64().context("chunks_reused")? > 0,
        "{r}"
    );
    let o = sync(&token, &ca)?;
    let again: Value = serde_json::from_slice(&o.stdout)?;
    assert_eq!(again["present"], 2, "{again}");
    assert_eq!(again["chunks_fetched"], 0, "{again}");
    // the copies are listed in h2's store under the same ids; a restore is the disk
    let listed = h2.ferry_json(&["backup", "list", "--store", "dst"])?;
    let ids: Vec<&str> = listed["backups"]
        .as_array()
        .context("backups")?
        .iter()
        .filter_map(|b| b["id"].as_str())
        .collect();
    assert!(ids.contains(&b1["id"].as_str().context("id")?), "{listed}");
    let id2 = b2["id"].as_str().context("id")?;
    assert!(ids.contains(&id2), "{listed}");
    let restored_ids = h2.ferry_json(&["backup", "list", "--store", "dst", "--vm", "sy"])?;
    assert_eq!(restored_ids["backups"].as_array().map(Vec::len), Some(2));
    // (the id exists in both stores: restore the copy from h2's store by restoring on h2
    // after forgetting h1's store there, if the cluster shares definitions)
    if have(&h2, "src")? {
        h2.ferry_ok(&["backup-store", "delete", "src"])?;
    }
    h2.ferry_ok(&["backup", "restore", id2, "--as", "sy-r"])?;
    let r = h2.ferry_json(&["vm", "show", "sy-r"])?;
    let rd = &r["spec"]["disks"][0];
    let restored = pool_volume(
        &h2,
        rd["pool"].as_str().context("pool")?,
        rd["volume"].as_str().context("volume")?,
    )?;
    assert!(restored == disk_now, "the restore from the copy differs");

    // A wrong token or a CA the source's certificate is not from: nothing copied, why.
    let bad_token = lab.state_dir("h2").join("bad-token");
    std::fs::write(&bad_token, "root!nope=0000")?;
    let o = sync(&bad_token, &ca)?;
    assert!(!o.status.success(), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("401"), "{o:?}");
    let other_ca = lab.state_dir("h2").join("other-ca.crt");
    let (ca_pem, _) = ferry_pki::new_ca("elsewhere")?;
    std::fs::write(&other_ca, ca_pem)?;
    let o = sync(&token, &other_ca)?;
    assert!(!o.status.success(), "{o:?}");
    Ok(())
}
