//! QEMU confined: each VM's QEMU runs as a user of its own (uid [`UID_BASE`] + VM id,
//! group `ferry-qemu`), set before QEMU is executed, under its seccomp sandbox (no
//! privilege changes, no new processes). It owns only its VM's files:
//!
//! - its volumes, its UEFI variables, its serial log and the folder of its sockets:
//!   owned by it, 0600/0700; its run dir stays root's (0710), so nothing the daemon
//!   reads or writes there (logs, pidfile, overlays) can be a link QEMU put, and every
//!   connection to QEMU's sockets is checked for QEMU's pid at the other end;
//! - what VMs share read-only (template backing files, ISOs): root's, group
//!   `ferry-qemu`, 0640;
//! - what it cannot open itself it gets as open descriptors from the daemon: its taps
//!   and vhost-net (at start and when a NIC is plugged), suspend files, and nothing of
//!   the host's TLS key but a copy that exists while a migration's credentials load.
//!
//! Two VMs' QEMUs are two users: one cannot read the other's disks. The directories
//! ferry keeps (state and run dirs, pools) are root's with group `ferry-qemu`, 0710:
//! QEMU passes through them to its own files and lists nothing.

use crate::error::{AgentError, Failure, Refusal, Result};
use crate::Host;
use ferry_qemu::{LaunchPlan, RunAs};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The group every VM's QEMU runs in (made by `scripts/setup.sh` and the package).
pub const QEMU_GROUP: &str = "ferry-qemu";
/// The device unprivileged processes get userfaultfd from (post-copy migration).
const USERFAULTFD: &str = "/dev/userfaultfd";

/// VM `id`'s QEMU runs as uid `UID_BASE + id` (no account needed: a range no login
/// user has).
pub const UID_BASE: u32 = 1_900_000_000;

fn io(what: String) -> impl FnOnce(std::io::Error) -> AgentError {
    move |source| AgentError::Io { what, source }
}

/// The group's id, or why QEMU cannot be confined.
fn qemu_gid() -> Result<u32> {
    nix::unistd::Group::from_name(QEMU_GROUP)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
        .ok_or_else(|| {
            AgentError::refused(Refusal::HostLacks, format!(
                "There is no group {QEMU_GROUP}, which every VM's QEMU runs in: scripts/setup.sh (or the ferry package) makes it (groupadd --system {QEMU_GROUP})"
            ))
        })
}

/// Who VM `id`'s QEMU runs as.
pub fn identity(id: u32) -> Result<RunAs> {
    let gid = qemu_gid()?;
    let mut groups = vec![gid];
    // /dev/kvm is the kvm group's on Debian.
    if let Ok(Some(kvm)) = nix::unistd::Group::from_name("kvm") {
        groups.push(kvm.gid.as_raw());
    }
    Ok(RunAs {
        uid: UID_BASE
            .checked_add(id)
            .ok_or_else(|| AgentError::invalid("id", "VM id too large"))?,
        gid,
        groups,
    })
}

/// Makes `path` (never a symlink: it would hand over its target) `uid:gid` with `mode`.
/// Files and folders are changed through a descriptor opened without following links,
/// so nothing can be swapped in between the check and the change.
pub fn own(path: &Path, uid: u32, gid: u32, mode: u32) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let what = || format!("Hand {} to QEMU's user {uid}", path.display());
    let m = std::fs::symlink_metadata(path).map_err(io(what()))?;
    if m.file_type().is_symlink() {
        return Err(AgentError::failed(
            Failure::Untrusted,
            format!(
                "{} is a symbolic link; a VM's files must be files",
                path.display()
            ),
        ));
    }
    if m.file_type().is_socket() {
        // A socket cannot be opened; sockets ferry hands over lie in its own folders.
        std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(io(what()))?;
        return std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(io(what()));
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(io(what()))?;
    // A second name of a file (a hard link its owner made) would hand over what the
    // other name is: another VM's disk, a host file.
    let fm = f.metadata().map_err(io(what()))?;
    if fm.is_file() && fm.nlink() != 1 {
        return Err(AgentError::failed(
            Failure::Untrusted,
            format!(
                "{} has {} names (hard links); a VM's files have one",
                path.display(),
                fm.nlink()
            ),
        ));
    }
    std::os::unix::fs::fchown(&f, Some(uid), Some(gid)).map_err(io(what()))?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io(what()))
}

/// Makes a file every VM may read (a template's volume, an ISO): root's, group
/// `gid`, 0640.
pub fn share(path: &Path, gid: u32) -> Result<()> {
    own(path, 0, gid, 0o640)
}

/// Whether a process of `who` may pass through directory `m`.
fn passes(m: &std::fs::Metadata, who: &RunAs) -> bool {
    let mode = m.mode();
    (m.uid() == who.uid && mode & 0o100 != 0)
        || (who.groups.contains(&m.gid()) && mode & 0o010 != 0)
        || mode & 0o001 != 0
}

/// Makes sure QEMU (as `who`) can reach `path`: directories inside `managed` (ferry's
/// own: its state and run dirs, its pools) are opened to group `ferry-qemu` for
/// passing through (0710 at least); any other closed one is an error naming it.
pub fn reachable(path: &Path, who: &RunAs, managed: &[PathBuf]) -> Result<()> {
    let mut dirs: Vec<&Path> = path.ancestors().skip(1).collect();
    dirs.reverse();
    for d in dirs {
        let m = std::fs::metadata(d).map_err(io(format!("Read {}", d.display())))?;
        if passes(&m, who) {
            continue;
        }
        if managed.iter().any(|r| d.starts_with(r)) && m.uid() == 0 {
            std::os::unix::fs::chown(d, None, Some(who.gid))
                .and_then(|_| {
                    // The group becomes QEMU's: it passes through, nothing more.
                    std::fs::set_permissions(
                        d,
                        std::fs::Permissions::from_mode((m.mode() & 0o7707) | 0o010),
                    )
                })
                .map_err(io(format!("Open {} to group {QEMU_GROUP}", d.display())))?;
            continue;
        }
        return Err(AgentError::refused(Refusal::HostLacks, format!(
            "QEMU runs as uid {} (group {QEMU_GROUP}) and cannot reach {}: {} is closed to it (give it o+x, or group {QEMU_GROUP} with g+x)",
            who.uid,
            path.display(),
            d.display()
        )));
    }
    Ok(())
}

impl Host {
    /// Who VM `id`'s QEMU runs as; None when the daemon is not root (it cannot change
    /// users; QEMU then runs as the daemon's user, still under its sandbox).
    pub fn qemu_identity(&self, id: u32) -> Result<Option<RunAs>> {
        if !self.inner.os.confines() {
            return Ok(None);
        }
        identity(id).map(Some)
    }

    /// The directories ferry keeps (for [`reachable`]).
    pub async fn managed_dirs(&self) -> Vec<PathBuf> {
        let mut v = vec![
            self.inner.cfg.state_dir.clone(),
            self.inner.cfg.run_dir.clone(),
        ];
        if let Ok(pools) = self.pool_specs().await {
            v.extend(pools.into_iter().map(|p| PathBuf::from(p.path)));
        }
        v
    }

    /// Hands the files of `plan` to the VM's QEMU user before it starts: its run dir,
    /// volumes (or replica sockets) and UEFI variables become its own; backing files and
    /// ISOs readable by the group; every one reachable.
    pub async fn confine_plan(&self, plan: &LaunchPlan, who: &RunAs) -> Result<()> {
        let managed = self.managed_dirs().await;
        let run = &plan.run;
        for d in [&run.dir, &run.sockets] {
            std::fs::create_dir_all(d).map_err(io(format!("Create {}", d.display())))?;
        }
        // The run dir stays the daemon's (QEMU cannot put a link in it); QEMU makes
        // its sockets in a folder of its own.
        own(&run.dir, 0, who.gid, 0o710)?;
        own(&run.sockets, who.uid, who.gid, 0o700)?;
        reachable(&run.qmp, who, &managed)?;
        // The serial log: made here, appended to by QEMU.
        let _ = std::fs::remove_file(&run.serial_log);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&run.serial_log)
            .map_err(io(format!("Create {}", run.serial_log.display())))?;
        own(&run.serial_log, who.uid, who.gid, 0o600)?;
        if plan.cloud_init {
            // the seed holds the password hash: the VM's QEMU alone reads it
            own(&run.cloud_init, who.uid, who.gid, 0o400)?;
        }
        for d in &plan.disks {
            reachable(&d.path, who, &managed)?;
            own(&d.path, who.uid, who.gid, 0o600)?;
            for b in &d.backing {
                reachable(&b.path, who, &managed)?;
                share(&b.path, who.gid)?;
            }
        }
        for c in &plan.cdroms {
            if let Some(iso) = &c.iso {
                reachable(iso, who, &managed)?;
                share(iso, who.gid)?;
            }
        }
        if let Some((code, vars)) = &plan.ovmf {
            reachable(code, who, &managed)?;
            reachable(vars, who, &managed)?;
            own(vars, who.uid, who.gid, 0o600)?;
        }
        if let Some(dir) = &plan.tpm {
            // swtpm (as this user) keeps the TPM's state here. The folder is made anew
            // by the daemon from the checked state: nothing the user left in it (links
            // to other files) is ever handed back to it.
            let state = crate::tpm::read_state(dir)?;
            match &state {
                Some(st) => crate::tpm::write_state(dir, st)?,
                None => {
                    crate::tpm::clear(dir)?;
                    std::fs::create_dir(dir).map_err(io(format!("Create {}", dir.display())))?;
                }
            }
            reachable(dir, who, &managed)?;
            own(dir, who.uid, who.gid, 0o700)?;
            if state.is_some() {
                own(&dir.join(crate::tpm::STATE_FILE), who.uid, who.gid, 0o600)?;
            }
        }
        if let Some(b) = &plan.spec.direct_boot {
            for f in [Some(&b.kernel), b.initrd.as_ref()].into_iter().flatten() {
                reachable(Path::new(f), who, &managed)?;
            }
        }
        Ok(())
    }

    /// Hands one more volume to a running VM's QEMU (a disk plugged, a disk moved).
    pub async fn confine_file(&self, id: u32, path: &Path) -> Result<()> {
        if let Some(who) = self.qemu_identity(id)? {
            reachable(path, &who, &self.managed_dirs().await)?;
            own(path, who.uid, who.gid, 0o600)?;
        }
        Ok(())
    }

    /// Lets a running VM's QEMU read an ISO (a CD changed).
    pub async fn share_file(&self, id: u32, path: &Path) -> Result<()> {
        if let Some(who) = self.qemu_identity(id)? {
            reachable(path, &who, &self.managed_dirs().await)?;
            share(path, who.gid)?;
        }
        Ok(())
    }

    /// The state and run dirs: root's, group `ferry-qemu`, 0710 (QEMU passes through,
    /// lists nothing). Done at start when the group exists.
    pub fn open_dirs_to_qemu(&self) {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let Ok(gid) = qemu_gid() else {
            tracing::warn!("no group {QEMU_GROUP}: VMs cannot start until it exists (scripts/setup.sh makes it)");
            return;
        };
        for d in [&self.inner.cfg.state_dir, &self.inner.cfg.run_dir] {
            let r = std::os::unix::fs::chown(d, Some(0), Some(gid))
                .and_then(|_| std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o710)));
            if let Err(e) = r {
                tracing::warn!(dir = %d.display(), error = %e, "cannot open the directory to QEMU's group");
            }
            // What lies directly in them is the daemon's alone (the store, tokens).
            for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
                if let Ok(m) = e.metadata() {
                    if m.is_file() && m.mode() & 0o077 != 0 {
                        let _ = std::fs::set_permissions(
                            e.path(),
                            std::fs::Permissions::from_mode(m.mode() & 0o700),
                        );
                    }
                }
            }
        }
        // Post-copy migration needs userfaultfd, which an unprivileged process gets
        // through this device (Linux 6.1+) when it may open it.
        let uffd = Path::new(USERFAULTFD);
        match std::fs::metadata(uffd) {
            Ok(m) if m.gid() == gid && m.mode() & 0o060 == 0o060 => {}
            Ok(m) => {
                let r = std::os::unix::fs::chown(uffd, None, Some(gid)).and_then(|_| {
                    std::fs::set_permissions(
                        uffd,
                        std::fs::Permissions::from_mode((m.mode() & 0o7707) | 0o060),
                    )
                });
                if let Err(e) = r {
                    tracing::warn!(error = %e, "cannot open {USERFAULTFD} to QEMU's group: post-copy migration will fail");
                }
            }
            Err(_) => tracing::warn!(
                "no {USERFAULTFD} (Linux 6.1+): post-copy migration needs vm.unprivileged_userfaultfd=1 with QEMU unprivileged"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passing_through_takes_x_for_the_right_class() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x");
        std::fs::create_dir(&p).unwrap();
        let who = RunAs {
            uid: 4242,
            gid: 4343,
            groups: vec![4343],
        };
        let set = |mode| std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode));
        set(0o700).unwrap();
        assert!(!passes(&std::fs::metadata(&p).unwrap(), &who));
        set(0o701).unwrap();
        assert!(passes(&std::fs::metadata(&p).unwrap(), &who));
        // Group x counts only for its group.
        set(0o710).unwrap();
        assert!(!passes(&std::fs::metadata(&p).unwrap(), &who));
        std::os::unix::fs::chown(&p, None, Some(4343)).unwrap();
        assert!(passes(&std::fs::metadata(&p).unwrap(), &who));
        // A closed directory outside ferry's is named, not changed.
        set(0o700).unwrap();
        let f = p.join("disk");
        let e = reachable(&f, &who, &[]).unwrap_err();
        assert!(e.to_string().contains(&p.display().to_string()), "{e}");
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o700);
        // Inside ferry's own, it is opened to the group.
        reachable(&f, &who, &[d.path().to_path_buf()]).unwrap();
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!((m.mode() & 0o777, m.gid()), (0o710, 4343));
    }

    #[test]
    fn symlinks_are_never_handed_over() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("secret");
        std::fs::write(&target, "x").unwrap();
        let link = d.path().join("disk.raw");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(own(&link, 4242, 4343, 0o600).is_err());
        assert_eq!(std::fs::metadata(&target).unwrap().uid(), 0);
        own(&target, 4242, 4343, 0o600).unwrap();
        let m = std::fs::metadata(&target).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o777), (4242, 4343, 0o600));
        // nor a file with a second name
        let other = d.path().join("other");
        std::fs::write(&other, "y").unwrap();
        std::fs::hard_link(&other, d.path().join("second")).unwrap();
        assert!(own(&d.path().join("second"), 4242, 4343, 0o600).is_err());
        assert_eq!(std::fs::metadata(&other).unwrap().uid(), 0);
    }
}
