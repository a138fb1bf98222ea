//! Fleecing capture against a real QEMU (no guest OS: writes come through QEMU's own
//! block layer with HMP `qemu-io`, as a guest's would). Full, incremental, restore
//! byte-identical, the filters gone afterwards, a failed backup keeping the changes
//! for the next incremental.

use crate::capture::{capture, CaptureError, CaptureProgress, CaptureRequest, DiskSource};
use crate::store::reader::Progress;
use crate::store::writer::SnapshotMeta;
use crate::store::Store;
use ferry_qmp::Qmp;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;

const MB: u64 = 1 << 20;

struct Qemu {
    child: Child,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn qemu_io(img: &Path, cmd: &str) {
    let ok = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", cmd])
        .arg(img)
        .output()
        .unwrap();
    assert!(ok.status.success(), "{ok:?}");
}

async fn start(dir: &Path, img: &Path) -> (Qemu, Qmp) {
    let sock = dir.join("qmp.sock");
    let child = Command::new("qemu-system-x86_64")
        .args([
            "-nodefaults",
            "-display",
            "none",
            "-machine",
            "q35",
            "-accel",
            "tcg",
            "-m",
            "64",
        ])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .arg("-blockdev")
        .arg(format!(
            "driver=file,filename={},node-name=disk0-file",
            img.display()
        ))
        .arg("-blockdev")
        .arg("driver=qcow2,file=disk0-file,node-name=disk0")
        .args(["-device", "virtio-blk-pci,drive=disk0,id=disk0"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let q = Qemu { child };
    let qmp = Qmp::connect_retry(&sock, std::time::Duration::from_secs(20))
        .await
        .unwrap();
    (q, qmp)
}

async fn guest_write(qmp: &Qmp, cmd: &str) {
    let r = qmp
        .execute(
            "human-monitor-command",
            Some(json!({"command-line": format!("qemu-io -d /machine/peripheral/disk0/virtio-backend \"{cmd}\"")})),
        )
        .await
        .unwrap();
    // qemu-io prints its result on QEMU's stdout; failures come back here
    let said = r.as_str().unwrap_or("").to_lowercase();
    assert!(!said.contains("error") && !said.contains("conflict"), "{r}");
}

/// The disk's content now, through QEMU's shared lock.
fn content(img: &Path, dir: &Path) -> Vec<u8> {
    let out = dir.join("now.raw");
    let _ = std::fs::remove_file(&out);
    let ok = Command::new("qemu-img")
        .args(["convert", "-U", "-f", "qcow2", "-O", "raw"])
        .arg(img)
        .arg(&out)
        .output()
        .unwrap();
    assert!(ok.status.success(), "{ok:?}");
    std::fs::read(out).unwrap()
}

fn restored(store: &Store, id: &str, dir: &Path) -> Vec<u8> {
    let out = dir.join(format!("{id}.raw"));
    let _ = std::fs::remove_file(&out);
    store
        .restore_raw(id, "disk0", None, &out, 2, &Progress::default())
        .unwrap();
    std::fs::read(out).unwrap()
}

fn request(work: PathBuf, cap: u64) -> CaptureRequest {
    CaptureRequest {
        meta: SnapshotMeta {
            vm: "web".into(),
            host: "h1".into(),
            consistency: "crash".into(),
            config: None,
        },
        disks: vec![DiskSource {
            name: "disk0".into(),
            device: Some("/machine/peripheral/disk0".into()),
            node: "disk0".into(),
            persistent: true,
        }],
        socket_dir: work.clone(),
        work_dir: work,
        owner: None,
        server_pid: None,
        fleece_cap: cap,
        key: None,
        quiesce: None,
    }
}

async fn bitmaps(qmp: &Qmp) -> Vec<(String, bool)> {
    let nodes = qmp
        .run(&ferry_qmp::commands::QueryNamedBlockNodes { flat: true })
        .await
        .unwrap();
    let n = nodes
        .iter()
        .find(|n| n.node_name.as_deref() == Some("disk0"))
        .unwrap();
    n.dirty_bitmaps
        .iter()
        .filter_map(|b| Some((b.name.clone()?, b.recording)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_full_then_incremental_restore_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    assert!(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg((40 * MB).to_string())
        .status()
        .unwrap()
        .success());
    qemu_io(&img, "write -P 0x11 0 5M");
    qemu_io(&img, "write -P 0x22 20M 1M");
    let (_q, qmp) = start(dir.path(), &img).await;
    let store = Arc::new(Store::create(&dir.path().join("store")).unwrap());
    let work = dir.path().join("work");

    // 1. full: nothing tracks the disk yet
    let p = CaptureProgress::default();
    let full = capture(&qmp, Arc::clone(&store), request(work.clone(), 1 << 30), &p)
        .await
        .unwrap();
    assert_eq!(full.disks[0].mode, "full");
    assert!(full.disks[0]
        .reason
        .as_deref()
        .unwrap()
        .contains("no change tracking"));
    // holes are not read: 5 MiB + 1 MiB of data touch 3 chunks
    assert_eq!(full.disks[0].read_bytes, 12 * MB, "{full:?}");
    let at_full = content(&img, dir.path());
    assert_eq!(restored(&store, &full.id, dir.path()), at_full);
    let blocks = qmp.run(&ferry_qmp::commands::QueryBlock).await.unwrap();
    let node = blocks[0].inserted.as_ref().unwrap().node_name.clone();
    assert_eq!(node.as_deref(), Some("disk0"), "the filter is gone");
    assert_eq!(
        bitmaps(&qmp).await,
        vec![(format!("ferry-bk-{}", full.id), true)]
    );

    // 2. the guest changes one chunk: the incremental reads only that one
    guest_write(&qmp, "write -P 0x33 30M 64k").await;
    let inc = capture(&qmp, Arc::clone(&store), request(work.clone(), 1 << 30), &p)
        .await
        .unwrap();
    assert_eq!(inc.disks[0].mode, "incremental", "{inc:?}");
    assert_eq!(inc.disks[0].read_bytes, 4 * MB);
    let at_inc = content(&img, dir.path());
    assert_ne!(at_inc, at_full);
    assert_eq!(restored(&store, &inc.id, dir.path()), at_inc);
    assert_eq!(restored(&store, &full.id, dir.path()), at_full);
    assert_eq!(
        bitmaps(&qmp).await,
        vec![(format!("ferry-bk-{}", inc.id), true)]
    );

    // 3. a backup that fails (fleecing cap of 0) keeps the changes for the next one
    guest_write(&qmp, "write -P 0x44 8M 64k").await;
    let e = capture(&qmp, Arc::clone(&store), request(work.clone(), 0), &p)
        .await
        .unwrap_err();
    assert!(matches!(e, CaptureError::FleeceFull { .. }), "{e}");
    assert_eq!(
        bitmaps(&qmp).await,
        vec![(format!("ferry-bk-{}", inc.id), true)]
    );
    assert_eq!(
        store.snapshots(None).unwrap().len(),
        2,
        "no half backup listed"
    );
    guest_write(&qmp, "write -P 0x55 36M 64k").await;
    let next = capture(&qmp, Arc::clone(&store), request(work, 1 << 30), &p)
        .await
        .unwrap();
    assert_eq!(next.disks[0].mode, "incremental");
    assert_eq!(
        next.disks[0].read_bytes,
        8 * MB,
        "both changed chunks, no more"
    );
    assert_eq!(
        restored(&store, &next.id, dir.path()),
        content(&img, dir.path())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_capture_tracks_changes_between_stopped_backups() {
    use crate::offline::{capture_offline, OfflineDisk, OfflineRequest};
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    assert!(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg((24 * MB).to_string())
        .status()
        .unwrap()
        .success());
    qemu_io(&img, "write -P 0x11 0 1M");
    let store = Arc::new(Store::create(&dir.path().join("store")).unwrap());
    let req = || OfflineRequest {
        meta: request(dir.path().join("w"), 0).meta,
        disks: vec![OfflineDisk {
            name: "disk0".into(),
            node: json!({"driver": "qcow2", "backing": null,
                         "file": {"driver": "file", "filename": img.display().to_string()}}),
            persistent: true,
        }],
        work_dir: dir.path().join("w"),
        key: None,
    };
    let p = CaptureProgress::default();
    let full = capture_offline(Arc::clone(&store), req(), &p)
        .await
        .unwrap();
    assert_eq!(full.disks[0].mode, "full");
    assert_eq!(
        restored(&store, &full.id, dir.path()),
        content(&img, dir.path())
    );
    // the new bitmap was saved in the image by the daemon's clean quit
    let info = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&img)
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    let names: Vec<String> = info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, vec![format!("ferry-bk-{}", full.id)]);
    // changed while stopped (qemu-io records into enabled persistent bitmaps too)
    qemu_io(&img, "write -P 0x66 16M 4k");
    let inc = capture_offline(Arc::clone(&store), req(), &p)
        .await
        .unwrap();
    assert_eq!(inc.disks[0].mode, "incremental", "{inc:?}");
    assert_eq!(inc.disks[0].read_bytes, 4 * MB);
    assert_eq!(
        restored(&store, &inc.id, dir.path()),
        content(&img, dir.path())
    );
}
