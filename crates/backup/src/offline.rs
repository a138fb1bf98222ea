//! Backing up a VM that does not run: its disks are opened by `qemu-storage-daemon`
//! (the same block layer, bitmaps and NBD export as a running QEMU, without a guest), so
//! changed block tracking works the same for stopped VMs; the daemon's `quit` writes the
//! new persistent bitmap into each qcow2 image. The caller holds the VM's operation lock
//! (nothing starts the VM meanwhile).

use crate::capture::{
    capture, CaptureError, CaptureOutcome, CaptureProgress, CaptureRequest, DiskSource,
};
use crate::store::chunk::CryptKey;
use crate::store::writer::SnapshotMeta;
use crate::store::Store;
use ferry_qmp::Qmp;
use serde_json::Value;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// One disk of a stopped VM.
#[derive(Debug, Clone)]
pub struct OfflineDisk {
    pub name: String,
    /// Its format node as QEMU takes it (`ferry_qemu::format_node` with the file inline
    /// and every backing file stated): never a format probed from the file.
    pub node: Value,
    pub persistent: bool,
}

pub struct OfflineRequest {
    pub meta: SnapshotMeta,
    pub disks: Vec<OfflineDisk>,
    /// The daemon's own folder for the socket and monitor (root's).
    pub work_dir: PathBuf,
    pub key: Option<CryptKey>,
}

struct Daemon {
    child: tokio::process::Child,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

pub async fn capture_offline(
    store: Arc<Store>,
    req: OfflineRequest,
    progress: &CaptureProgress,
) -> Result<CaptureOutcome, CaptureError> {
    std::fs::create_dir_all(&req.work_dir)
        .map_err(|e| CaptureError::Failed(format!("{}: {e}", req.work_dir.display())))?;
    let qmp_path = req.work_dir.join("storage-daemon.qmp");
    let _ = std::fs::remove_file(&qmp_path);
    let mut cmd = tokio::process::Command::new("qemu-storage-daemon");
    cmd.arg("--chardev")
        .arg(format!(
            "socket,id=m,path={},server=on,wait=off",
            qmp_path.display()
        ))
        .args(["--monitor", "chardev=m"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut sources = Vec::new();
    for (i, d) in req.disks.iter().enumerate() {
        let mut node = d.node.clone();
        let name = format!("disk{i}");
        node["node-name"] = Value::String(name.clone());
        cmd.arg("--blockdev").arg(node.to_string());
        sources.push(DiskSource {
            name: d.name.clone(),
            device: None,
            node: name,
            persistent: d.persistent,
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| CaptureError::Failed(format!("qemu-storage-daemon: {e}")))?;
    let pid = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .ok_or_else(|| CaptureError::Failed("qemu-storage-daemon ended at once".into()))?;
    let mut daemon = Daemon { child };
    // a daemon left running by a restart would hold the images' locks: see [`sweep`]
    let pidfile = req.work_dir.join(PIDFILE);
    let _ = std::fs::write(&pidfile, pid.to_string());
    let qmp = match Qmp::connect_retry_to(&qmp_path, Duration::from_secs(20), pid).await {
        Ok(q) => q,
        Err(e) => {
            let _ = daemon.child.start_kill();
            let out = stderr_of(&mut daemon.child).await;
            return Err(CaptureError::Failed(format!(
                "qemu-storage-daemon did not start ({e}): {out}"
            )));
        }
    };
    let result = capture(
        &qmp,
        store,
        CaptureRequest {
            meta: req.meta,
            disks: sources,
            socket_dir: req.work_dir.clone(),
            work_dir: req.work_dir.clone(),
            owner: None,
            server_pid: Some(pid),
            fleece_cap: u64::MAX,
            key: req.key,
            quiesce: None,
        },
        progress,
    )
    .await;
    // a clean quit writes the persistent bitmaps into the images
    let _ = qmp.execute("quit", None).await;
    match tokio::time::timeout(Duration::from_secs(30), daemon.child.wait()).await {
        Ok(Ok(st)) if st.success() => {}
        other => {
            tracing::warn!(?other, "qemu-storage-daemon did not quit cleanly; the next backup of these disks reads them whole");
        }
    }
    let _ = std::fs::remove_file(&qmp_path);
    let _ = std::fs::remove_file(&pidfile);
    result
}

const PIDFILE: &str = "storage-daemon.pid";

/// After a daemon restart: ends a `qemu-storage-daemon` a cut-off backup of a stopped
/// VM left (it holds the images' locks: the VM could not start). Only a process whose
/// command line names this folder's monitor socket is ended. Returns whether one was.
pub fn sweep(work_dir: &std::path::Path) -> bool {
    let pidfile = work_dir.join(PIDFILE);
    let Some(pid) = std::fs::read_to_string(&pidfile)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
    else {
        return false;
    };
    let _ = std::fs::remove_file(&pidfile);
    let needle = work_dir.join("storage-daemon.qmp");
    let ours = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            let n = needle.as_os_str().as_encoded_bytes();
            c.windows(n.len()).any(|w| w == n)
        })
        .unwrap_or(false);
    if ours {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        for _ in 0..100 {
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    ours
}

/// What a daemon that failed to start said.
async fn stderr_of(child: &mut tokio::process::Child) -> String {
    use tokio::io::AsyncReadExt;
    let _ = child.wait().await;
    let mut s = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut s).await;
    }
    s.chars().take(2000).collect()
}
