//! Boot checks of backups (`ferry backup boot-check ID`, Veeam's SureBackup): the
//! backed-up VM boots from its backup without restoring it — each disk a throw-away
//! qcow2 overlay in the run dir whose backing is the backup's disk, served read-only by
//! this daemon over NBD as for live-restore; its NICs on a hub inside QEMU (links up,
//! MACs kept, nothing reaches a network); no CD-ROM — until its ready marker shows on
//! the serial console or the time is up. Then QEMU is killed and the overlays go:
//! nothing of the check stays, and the backup is only read.
//!
//! The VM's QEMU runs confined like a VM's, as a user of its own below the VMs' uid
//! range; at most [`CHECKS`] run at once on a host.

use crate::backup::{backup_spec, blocking};
use crate::error::{AgentError, Failure, Refusal, Result};
use crate::live_restore::{backup_exports, serve_nbd};
use crate::tasks::TaskCtx;
use crate::Host;
use ferry_backup::store::image::DiskImage;
use ferry_qemu::{LaunchPlan, ResolvedDisk, RunAs, RunPaths};
use ferry_types::{BackupBootCheck, BackupBootCheckResult, DiskFormat};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Boot checks running at once on a host.
pub const CHECKS: usize = 2;
/// What a checked guest may write to its overlays before the check stops.
pub const OVERLAY_MAX: u64 = 4 << 30;

/// A claimed slot, released however the check ends.
struct SlotGuard {
    host: Host,
    slot: usize,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.host
            .inner
            .boot_checks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.slot);
    }
}

/// Bytes of memory available on this host (`MemAvailable`).
fn mem_available() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(u64::MAX, |kb| kb.saturating_mul(1024))
}

/// A backup's kernel and initrd (direct boot) are host files QEMU reads into the
/// guest, whose console the caller sees: only files anyone on the host may read.
fn check_direct_boot(spec: &ferry_types::VmSpec) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    if let Some(b) = &spec.direct_boot {
        for f in [Some(&b.kernel), b.initrd.as_ref()].into_iter().flatten() {
            let ok = std::fs::metadata(f).is_ok_and(|m| m.is_file() && m.mode() & 0o004 != 0);
            if !ok {
                return Err(AgentError::refused(
                    Refusal::Unsupported,
                    format!("the backup boots kernel file {f}, which is not a file everyone on this host may read; a boot check does not load it"),
                ));
            }
        }
    }
    Ok(())
}

/// Who boot check `slot`'s QEMU runs as.
fn check_identity(slot: usize) -> Result<RunAs> {
    let vm = crate::confine::identity(0)?;
    let below = u32::try_from(100 + slot).unwrap_or(u32::MAX);
    Ok(RunAs {
        uid: crate::confine::UID_BASE.saturating_sub(below),
        ..vm
    })
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> AgentError {
    move |source| AgentError::Io { what, source }
}

/// Whether `marker` is in `log` (the console's bytes; control characters between
/// letters, as a terminal's colours, do not hide it).
pub fn shows(log: &[u8], marker: &str) -> bool {
    let plain: Vec<u8> = strip_escapes(log);
    plain
        .windows(marker.len().max(1))
        .any(|w| w == marker.as_bytes())
}

/// `log` without ANSI escape sequences (`ESC [ ... letter`) and carriage returns.
fn strip_escapes(log: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(log.len());
    let mut i = 0;
    while i < log.len() {
        match log[i] {
            0x1b if log.get(i + 1) == Some(&b'[') => {
                i += 2;
                while i < log.len() && !log[i].is_ascii_alphabetic() {
                    i += 1;
                }
                i += 1;
            }
            b'\r' => i += 1,
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// The last `max` bytes of the console, read without following links.
fn console_tail(p: &Path, max: u64) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(mut f) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(p)
    else {
        return vec![];
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut buf = Vec::new();
    let _ = f.take(max).read_to_end(&mut buf);
    buf
}

fn printable(b: &[u8]) -> String {
    String::from_utf8_lossy(&strip_escapes(b))
        .chars()
        .filter(|c| !c.is_control() || *c == '\n')
        .collect::<String>()
        .trim()
        .to_string()
}

impl Host {
    /// Boots backup `id` on throw-away overlays until its marker shows or the time is
    /// up; what it saw. A backup that does not come up is a result (`booted` false,
    /// with an event), not an error.
    pub async fn boot_check_backup(
        &self,
        id: &str,
        req: BackupBootCheck,
        ctx: Option<&TaskCtx>,
    ) -> Result<BackupBootCheckResult> {
        req.validate()?;
        let (_, store, b) = self.complete_backup(id).await?;
        if b.key_fingerprint.is_some() {
            return Err(AgentError::refused(
                Refusal::Unsupported,
                format!("backup {id} is encrypted; it cannot be booted without its key"),
            ));
        }
        let mut spec = backup_spec(&store, &b).await?;
        spec.validate()?;
        check_direct_boot(&spec)?;
        let avail = mem_available();
        if spec.memory_mib.saturating_mul(1 << 20) > avail {
            return Err(AgentError::refused(
                Refusal::NoRoom,
                format!(
                    "backup {id}'s VM needs {} MiB, this host has {} MiB available",
                    spec.memory_mib,
                    avail >> 20
                ),
            ));
        }
        let slot = SlotGuard {
            host: self.clone(),
            slot: self.claim_check_slot()?,
        };
        let r = self
            .boot_check_in(slot.slot, &store, &b, &mut spec, &req, ctx)
            .await;
        drop(slot);
        let r = r?;
        let what = if r.booted {
            format!(
                "boot check of backup {id}: up after {:.0} s ({:?} seen)",
                r.seconds, r.marker
            )
        } else {
            format!(
                "boot check of backup {id} FAILED: {:?} not seen within {:.0} s",
                r.marker, r.seconds
            )
        };
        self.inner.events.emit(Some(&b.vm), "backup", what);
        Ok(r)
    }

    fn claim_check_slot(&self) -> Result<usize> {
        let mut used = self
            .inner
            .boot_checks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let slot = (0..CHECKS).find(|s| !used.contains(s)).ok_or_else(|| {
            AgentError::refused(
                Refusal::Busy,
                format!("{CHECKS} boot checks run on this host already; try again later"),
            )
        })?;
        used.insert(slot);
        Ok(slot)
    }

    async fn boot_check_in(
        &self,
        slot: usize,
        store: &Arc<ferry_backup::store::Store>,
        b: &ferry_types::Backup,
        spec: &mut ferry_types::VmSpec,
        req: &BackupBootCheck,
        ctx: Option<&TaskCtx>,
    ) -> Result<BackupBootCheckResult> {
        let dir = self
            .inner
            .cfg
            .run_dir
            .join("boot-check")
            .join(slot.to_string());
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(io(format!("Create {}", dir.display())))?;
        let run = RunPaths::new(&dir);
        let who = if self.inner.os.confines() {
            Some(check_identity(slot)?)
        } else {
            None
        };
        // the backup's disks, served read-only
        let names: Vec<String> = b.disks.iter().map(|d| d.name.clone()).collect();
        let (st, bid) = (Arc::clone(store), b.id.clone());
        let images = blocking(move || {
            names
                .iter()
                .map(|n| DiskImage::open(Arc::clone(&st), &bid, n, None).map(Arc::new))
                .collect::<std::result::Result<Vec<_>, _>>()
        })
        .await?;
        let nbd_sock = dir.join("nbd.sock");
        let listener = tokio::net::UnixListener::bind(&nbd_sock)
            .map_err(io(format!("Listen on {}", nbd_sock.display())))?;
        let nbd = serve_nbd(
            listener,
            backup_exports(images),
            format!("boot check {}", b.id),
        );
        // the overlays take the guest's writes: on the state dir's disk, not in /run
        let disk_dir = self
            .inner
            .cfg
            .state_dir
            .join("boot-check")
            .join(slot.to_string());
        let _ = std::fs::remove_dir_all(&disk_dir);
        let r = match std::fs::create_dir_all(&disk_dir) {
            Ok(()) => {
                self.boot_check_run(&disk_dir, &run, who.as_ref(), &nbd_sock, b, spec, req, ctx)
                    .await
            }
            Err(e) => Err(io(format!("Create {}", disk_dir.display()))(e)),
        };
        nbd.abort();
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&disk_dir);
        r
    }

    #[allow(clippy::too_many_arguments)]
    async fn boot_check_run(
        &self,
        dir: &Path,
        run: &RunPaths,
        who: Option<&RunAs>,
        nbd_sock: &Path,
        b: &ferry_types::Backup,
        spec: &mut ferry_types::VmSpec,
        req: &BackupBootCheck,
        ctx: Option<&TaskCtx>,
    ) -> Result<BackupBootCheckResult> {
        spec.name = format!("bootcheck-{}", &b.id[..b.id.len().min(12)]);
        // ISOs are not part of a backup
        spec.cdroms.clear();
        let mut disks = vec![];
        for (i, (d, bd)) in spec.disks.iter().zip(&b.disks).enumerate() {
            let overlay = dir.join(format!("disk{i}.qcow2"));
            let op = ferry_storage::ImgOp::Create {
                path: &overlay,
                format: "qcow2",
                size: bd.size,
            };
            self.inner.os.images().run(op, &mut |_| {}).await?;
            let mut d = d.clone();
            d.nonpersistent = false;
            disks.push(ResolvedDisk {
                spec: d,
                path: overlay,
                format: DiskFormat::Qcow2,
                backing: vec![],
                nbd_export: None,
                restore_from: Some(ferry_qemu::NbdSource {
                    socket: nbd_sock.to_path_buf(),
                    export: format!("disk{i}"),
                }),
            });
        }
        let ovmf = if spec.firmware == ferry_types::Firmware::Uefi {
            let (code, tpl) = crate::lifecycle::firmware_paths(spec).ok_or_else(|| {
                AgentError::refused(Refusal::HostLacks, "UEFI needs OVMF (Debian package ovmf)")
            })?;
            let vars = dir.join("efivars.fd");
            std::fs::copy(&tpl, &vars).map_err(io(format!("Create {}", vars.display())))?;
            Some((code, vars))
        } else {
            None
        };
        let plan = LaunchPlan {
            spec: spec.clone(),
            accel: self.accel_for(spec.arch()),
            run: run.clone(),
            disks,
            cdroms: vec![],
            taps: vec![],
            ovmf,
            // the check boots the backup's disks alone: no TPM of the VM's
            tpm: None,
            paused: false,
            incoming: false,
            nic_fds: false,
            cloud_init: false,
            isolated: true,
        };
        run.prepare()
            .map_err(|e| AgentError::failed(Failure::Qemu, format!("boot check run dir: {e}")))?;
        if let Some(w) = who {
            self.confine_plan(&plan, w).await?;
            crate::confine::own(nbd_sock, w.uid, w.gid, 0o600)?;
        } else {
            std::fs::write(&run.serial_log, b"")
                .map_err(io(format!("Create {}", run.serial_log.display())))?;
        }
        let argv = ferry_qemu::build_argv(&plan);
        if let Some(c) = ctx {
            c.log(format!(
                "booting {} from backup {} until {:?} shows (at most {} s)",
                b.vm,
                b.id,
                req.marker(),
                req.timeout_s()
            ));
        }
        let started = Instant::now();
        let pid = self
            .inner
            .os
            .spawn_qemu(
                &self.qemu_binary_for(spec.arch()),
                &argv,
                run,
                who,
                ferry_qemu::Launcher::default(),
            )
            .await
            .map_err(|e| AgentError::failed(Failure::Qemu, format!("boot check: {e}")))?;
        let marker = req.marker().to_string();
        let timeout = Duration::from_secs(u64::from(req.timeout_s()));
        let mut booted = false;
        let mut ended = false;
        let mut reason = None;
        let overlays: Vec<std::path::PathBuf> = plan.disks.iter().map(|d| d.path.clone()).collect();
        while started.elapsed() < timeout {
            tokio::time::sleep(Duration::from_millis(500)).await;
            // the marker near the end: a guest cannot make the daemon read more
            if shows(&console_tail(&run.serial_log, 256 << 10), &marker) {
                booted = true;
                break;
            }
            // a guest flooding its console fills no disk
            crate::file_restore::trim_log(&run.serial_log, 8 << 20);
            if !self.inner.os.qemu_alive(pid, run) {
                ended = true;
                reason = Some("QEMU ended".to_string());
                break;
            }
            let written: u64 = overlays
                .iter()
                .filter_map(|p| std::fs::metadata(p).ok())
                .map(|m| {
                    use std::os::unix::fs::MetadataExt;
                    m.blocks() * 512
                })
                .sum();
            if written > OVERLAY_MAX {
                reason = Some(format!(
                    "the guest wrote more than {} GiB to its throw-away disks",
                    OVERLAY_MAX >> 30
                ));
                break;
            }
            if let Some(c) = ctx {
                let f = started.elapsed().as_secs_f32() / timeout.as_secs_f32();
                c.progress(f.min(0.99));
            }
        }
        let seconds = started.elapsed().as_secs_f64();
        let console = printable(&console_tail(&run.serial_log, 2048));
        if let Err(e) = self.inner.os.kill_qemu(pid, run).await {
            tracing::warn!(backup = %b.id, error = %e, "boot check: QEMU kill");
        }
        if ended && !booted {
            let log = std::fs::read_to_string(&run.log).unwrap_or_default();
            tracing::warn!(backup = %b.id, log = %log.trim(), "boot check: QEMU ended");
        }
        Ok(BackupBootCheckResult {
            backup: b.id.clone(),
            vm: b.vm.clone(),
            booted,
            seconds,
            marker,
            console,
            reason: if booted { None } else { reason },
        })
    }

    /// Boot check dirs an earlier run of the daemon left: their QEMUs killed, the
    /// overlays removed.
    pub(crate) async fn sweep_boot_checks(&self) {
        let _ = std::fs::remove_dir_all(self.inner.cfg.state_dir.join("boot-check"));
        let root = self.inner.cfg.run_dir.join("boot-check");
        if let Ok(rd) = std::fs::read_dir(&root) {
            for e in rd.flatten() {
                let run = RunPaths::new(e.path());
                if let Some(pid) = self.inner.os.read_pid(&run) {
                    let _ = self.inner.os.kill_qemu(pid, &run).await;
                }
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_show_through_terminal_colours() {
        assert!(shows(b"boot...\r\nFERRY-READY 1.2 x\r\n", "FERRY-READY"));
        assert!(shows(b"\x1b[1mdebian\x1b[0m login: ", "debian login:"));
        assert!(!shows(b"FERRY-REA", "FERRY-READY"));
        assert!(!shows(b"", "x"));
        // an escape cut off at the end of the log does not panic
        assert!(!shows(b"abc\x1b[12", "login:"));
        assert_eq!(printable(b"a\x1b[31mb\x07c\r\n"), "abc");
    }
}
