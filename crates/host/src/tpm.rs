//! A VM's TPM 2.0: one swtpm per VM, started by QEMU's launcher just before it becomes
//! QEMU (so as the VM's own user, in its scope or pool cgroup; `ferry_qemu::
//! tpm_companion`), ending by itself when QEMU closes its control socket. Its state
//! lives in `{state_dir}/vms/{id}/tpm/` (swtpm's dir backend writes `tpm2-00.permall`
//! whole, by rename, so a copy taken at any time is one complete state). It goes with
//! the VM: live migration carries it in QEMU's stream (the destination starts with
//! none), a cold move sends the file, a clone copies it, a disk-only snapshot keeps it
//! in the snapshot's record (with memory, it is in the saved device state).
//!
//! The folder belongs to the VM's QEMU user while it runs: what is in it is read with
//! no links followed, bounded, and replaced only while the VM is stopped, by a new
//! folder.

use crate::error::{AgentError, Failure, Result};
use crate::Host;
use base64::Engine as _;
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The swtpm program (Debian package swtpm), found on the PATH.
pub const SWTPM: &str = "swtpm";
/// swtpm's state file in a VM's TPM folder.
pub const STATE_FILE: &str = "tpm2-00.permall";
/// The most TPM state ferry reads: swtpm's is a few KiB, with NV indices tens.
pub const MAX_STATE: u64 = 1 << 20;

fn io(what: String) -> impl FnOnce(std::io::Error) -> AgentError {
    move |source| AgentError::Io { what, source }
}

/// The state in `dir` (None: the TPM never ran). Never follows a link; a state that
/// is no regular file or larger than [`MAX_STATE`] is an error.
pub fn read_state(dir: &Path) -> Result<Option<Vec<u8>>> {
    let path = dir.join(STATE_FILE);
    let f = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(format!("Read the TPM state {}", path.display()))(e)),
    };
    let m = f
        .metadata()
        .map_err(io(format!("Read the TPM state {}", path.display())))?;
    if !m.is_file() || m.nlink() != 1 {
        return Err(AgentError::failed(
            Failure::Untrusted,
            format!(
                "{} is not a plain file: not a TPM state ferry reads",
                path.display()
            ),
        ));
    }
    let mut out = vec![];
    f.take(MAX_STATE + 1)
        .read_to_end(&mut out)
        .map_err(io(format!("Read the TPM state {}", path.display())))?;
    if out.len() as u64 > MAX_STATE {
        return Err(AgentError::failed(
            Failure::Corrupt,
            format!(
                "{} is larger than {} KiB: not a TPM state ferry keeps",
                path.display(),
                MAX_STATE >> 10
            ),
        ));
    }
    Ok(Some(out))
}

/// Makes `dir` a new folder holding `state` alone (whatever was there is gone): the
/// new folder is made beside it and exchanged with it in one step, so a crash leaves
/// the old state or the new one, never none.
pub fn write_state(dir: &Path, state: &[u8]) -> Result<()> {
    if state.len() as u64 > MAX_STATE {
        return Err(AgentError::invalid(
            "tpm_state",
            format!("larger than {} KiB", MAX_STATE >> 10),
        ));
    }
    let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else {
        return Err(AgentError::invalid(
            "tpm",
            format!("{} is no folder's path", dir.display()),
        ));
    };
    let mut new_name = std::ffi::OsString::from(".");
    new_name.push(name);
    new_name.push(".new");
    let new = parent.join(&new_name);
    clear(&new)?;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&new)
        .map_err(io(format!("Create {}", new.display())))?;
    let path = new.join(STATE_FILE);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(io(format!("Write {}", path.display())))?;
    std::io::Write::write_all(&mut f, state)
        .and_then(|_| f.sync_all())
        .and_then(|_| std::fs::File::open(&new)?.sync_all())
        .map_err(io(format!("Write {}", path.display())))?;
    let p = std::fs::File::open(parent).map_err(io(format!("Open {}", parent.display())))?;
    if std::fs::symlink_metadata(dir).is_ok() {
        nix::fcntl::renameat2(
            &p,
            new_name.as_os_str(),
            &p,
            name,
            nix::fcntl::RenameFlags::RENAME_EXCHANGE,
        )
        .map_err(|e| io(format!("Replace {}", dir.display()))(e.into()))?;
        clear(&new)?;
    } else {
        std::fs::rename(&new, dir).map_err(io(format!("Create {}", dir.display())))?;
    }
    p.sync_all()
        .map_err(io(format!("Sync {}", parent.display())))
}

/// Removes `dir` and what is in it (links removed, never followed).
pub fn clear(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(format!("Remove {}", dir.display()))(e)),
    }
}

/// The state as a snapshot record keeps it.
pub fn encode(state: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(state)
}

/// A snapshot record's state, checked.
pub fn decode(text: &str) -> Result<Vec<u8>> {
    if text.len() as u64 > MAX_STATE * 4 / 3 + 4 {
        return Err(AgentError::invalid("tpm_state", "too large"));
    }
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| AgentError::invalid("tpm_state", format!("not base64: {e}")))
}

impl Host {
    /// VM `id`'s TPM folder.
    pub fn tpm_dir(&self, id: u32) -> PathBuf {
        self.vm_state_dir(id).join("tpm")
    }

    /// The folder swtpm keeps the state of VM `spec` (id `id`) in, made if missing (the
    /// daemon's until the VM's QEMU user is given it at start); refused without swtpm.
    pub(crate) fn prepare_tpm(&self, spec: &ferry_types::VmSpec, id: u32) -> Result<PathBuf> {
        if !crate::caps::installed(SWTPM) {
            return Err(AgentError::refused(
                crate::error::Refusal::HostLacks,
                format!(
                    "{} has a TPM, which needs swtpm (Debian package swtpm) on {}",
                    spec.name,
                    self.host_name()
                ),
            ));
        }
        let dir = self.tpm_dir(id);
        std::fs::create_dir_all(self.vm_state_dir(id))
            .map_err(io(format!("Create {}", self.vm_state_dir(id).display())))?;
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let m = std::fs::symlink_metadata(&dir)
                    .map_err(io(format!("Read {}", dir.display())))?;
                if !m.is_dir() {
                    return Err(AgentError::failed(
                        Failure::Untrusted,
                        format!("{} is not a folder", dir.display()),
                    ));
                }
                Ok(dir)
            }
            Err(e) => Err(io(format!("Create {}", dir.display()))(e)),
        }
    }

    /// VM `id`'s TPM state now (None: it has no TPM state yet).
    pub fn read_tpm_state(&self, id: u32) -> Result<Option<Vec<u8>>> {
        read_state(&self.tpm_dir(id))
    }

    /// Replaces VM `id`'s TPM state (the VM is stopped: no swtpm holds it).
    pub fn write_tpm_state(&self, id: u32, state: &[u8]) -> Result<()> {
        std::fs::create_dir_all(self.vm_state_dir(id))
            .map_err(io(format!("Create {}", self.vm_state_dir(id).display())))?;
        write_state(&self.tpm_dir(id), state)
    }

    /// Forgets VM `id`'s TPM state (a live migration's destination: the state comes
    /// in QEMU's stream).
    pub fn clear_tpm(&self, id: u32) -> Result<()> {
        clear(&self.tpm_dir(id))
    }

    /// Ends a swtpm of VM `id` left without its QEMU (QEMU failed before it connected;
    /// once connected, swtpm ends with QEMU). Its pidfile is the VM user's: the pid
    /// counts only if that process is the VM user's swtpm of this run dir.
    pub(crate) fn end_swtpm(&self, id: u32, run: &ferry_qemu::RunPaths) {
        // the VM's user's file: no link followed, no FIFO waited on, a few bytes read
        let Ok(f) = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&run.swtpm_pid)
        else {
            return;
        };
        if !f.metadata().is_ok_and(|m| m.is_file()) {
            return;
        }
        let mut text = String::new();
        if f.take(32).read_to_string(&mut text).is_err() {
            return;
        }
        let Ok(pid) = text.trim().parse::<i32>() else {
            return;
        };
        if pid <= 1 {
            return;
        }
        let uid = self.qemu_identity(id).ok().flatten().map(|w| w.uid);
        let ours = std::fs::metadata(format!("/proc/{pid}"))
            .is_ok_and(|m| uid.is_none_or(|u| m.uid() == u))
            && std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let needle = run.tpm.as_os_str().as_encoded_bytes();
                c.starts_with(SWTPM.as_bytes()) && c.windows(needle.len()).any(|w| w == needle)
            });
        if ours {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_replacing_leaves_nothing_else() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("tpm");
        assert_eq!(read_state(&dir).unwrap(), None);
        write_state(&dir, b"state-1").unwrap();
        std::fs::write(dir.join(".lock"), b"").unwrap();
        assert_eq!(read_state(&dir).unwrap().as_deref(), Some(&b"state-1"[..]));
        write_state(&dir, b"state-2").unwrap();
        assert_eq!(read_state(&dir).unwrap().as_deref(), Some(&b"state-2"[..]));
        assert!(!dir.join(".lock").exists());
        assert_eq!(decode(&encode(b"\x00\xffx")).unwrap(), b"\x00\xffx");
        assert!(decode("not base64!").is_err());
    }

    #[test]
    fn links_fifos_and_huge_files_are_not_read() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("tpm");
        std::fs::create_dir(&dir).unwrap();
        let secret = d.path().join("secret");
        std::fs::write(&secret, b"root's").unwrap();
        std::os::unix::fs::symlink(&secret, dir.join(STATE_FILE)).unwrap();
        assert!(read_state(&dir).is_err());
        // a hard link to another file is refused too
        std::fs::remove_file(dir.join(STATE_FILE)).unwrap();
        std::fs::hard_link(&secret, dir.join(STATE_FILE)).unwrap();
        assert!(read_state(&dir).is_err());
        std::fs::remove_file(dir.join(STATE_FILE)).unwrap();
        nix::unistd::mkfifo(&dir.join(STATE_FILE), nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert!(read_state(&dir).is_err());
        std::fs::remove_file(dir.join(STATE_FILE)).unwrap();
        let f = std::fs::File::create(dir.join(STATE_FILE)).unwrap();
        f.set_len(MAX_STATE + 1).unwrap();
        assert!(read_state(&dir).is_err());
        // replacing removes the links, never their targets
        std::os::unix::fs::symlink(&secret, dir.join("other")).unwrap();
        write_state(&dir, b"s").unwrap();
        assert_eq!(std::fs::read(&secret).unwrap(), b"root's");
        assert!(write_state(&dir, &vec![0; (1 << 20) + 1]).is_err());
    }
}
