//! The host seam: everything the VM runtime does to the machine itself — QEMU
//! processes and their sockets, taps and bridges, cgroups, QEMU's own users, the
//! pools' `qemu-img` — goes through [`HostOs`]. [`RealOs`] does it (root, QEMU,
//! netlink, nftables, `qemu-img`); `fake::FakeOs` (feature `fake`, and the crate's own
//! tests) does it in memory with fake QEMUs speaking QMP and
//! `ferry_storage::fake::FakeImages`, so the runtime's logic is tested in seconds
//! without root.

use ferry_net::{LinkStats, NetError};
use ferry_qemu::{QemuError, RunAs, RunPaths};
use ferry_qmp::{Qmp, QmpError};
use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::time::Duration;
use tokio::net::UnixStream;

/// What the runtime asks of the machine.
#[async_trait::async_trait]
pub trait HostOs: Send + Sync + 'static {
    /// Starts a VM's QEMU detached, as `who`, with `fds` at the numbers given; its pid.
    /// `before_exec` places the process (scope, cgroup) before it becomes QEMU.
    async fn spawn_qemu(
        &self,
        binary: &str,
        argv: &[OsString],
        run: &RunPaths,
        who: Option<&RunAs>,
        launcher: ferry_qemu::Launcher<'_>,
    ) -> Result<i32, QemuError>;
    /// Ends a VM's QEMU (SIGKILL when it lingers) and waits until it is gone.
    async fn kill_qemu(&self, pid: i32, run: &RunPaths) -> Result<(), QemuError>;
    /// The pid of the live QEMU of a run dir (its pidfile names it, and it is that
    /// run dir's QEMU).
    fn read_pid(&self, run: &RunPaths) -> Option<i32>;
    /// Whether `pid` is still the QEMU of `run`.
    fn qemu_alive(&self, pid: i32, run: &RunPaths) -> bool;
    /// A QMP connection to the QEMU `pid` of `run`, retried for `within`.
    async fn connect_qmp(
        &self,
        run: &RunPaths,
        within: Duration,
        pid: i32,
    ) -> Result<Qmp, QmpError>;
    /// Whether the other end of `stream` is the QEMU `pid`.
    fn served_by(&self, stream: &UnixStream, pid: i32) -> bool;
    /// Whether each VM's QEMU runs as a user of its own.
    fn confines(&self) -> bool;
    /// Where resource pools are enforced.
    fn cgroups(&self, root_name: &str) -> crate::Cgroups;

    fn bridge_exists(&self, bridge: &str) -> bool;
    /// A tap owned by `owner`, dropping frames not from `mac`.
    async fn create_tap(
        &self,
        tap: &str,
        mac: &str,
        owner: Option<(u32, u32)>,
    ) -> Result<(), NetError>;
    /// Puts a VM's tap on a bridge (with the bridge's MTU; in VLAN `vlan` when given)
    /// and up.
    async fn attach_up(&self, tap: &str, bridge: &str, vlan: Option<u16>) -> Result<(), NetError>;
    /// Whether a bridge can put ports in VLANs (`vlan_filtering`).
    fn bridge_vlan_aware(&self, bridge: &str) -> bool;
    /// A link's MTU.
    fn link_mtu(&self, link: &str) -> Option<u32>;
    /// An open descriptor on a tap, for QEMU.
    fn open_tap(&self, tap: &str) -> Result<OwnedFd, NetError>;
    /// `/dev/vhost-net`, when the host has it.
    fn open_vhost(&self) -> Option<OwnedFd>;
    async fn delete_tap(&self, tap: &str) -> Result<(), NetError>;
    /// Sets a tap's source-MAC filter again (after a restart).
    async fn guard_tap(&self, tap: &str, mac: &str) -> Result<(), NetError>;
    fn link_stats(&self, link: &str) -> Option<LinkStats>;
    /// Points the bridge's forwarding entry for `mac` at `tap` (a VM arrived here).
    async fn fdb_point(&self, tap: &str, mac: [u8; 6]) -> Result<(), NetError>;
    /// Tells the LAN that `mac` is now behind `bridge` (a RARP).
    fn announce_mac(&self, bridge: &str, mac: [u8; 6]) -> Result<(), NetError>;
    /// SIGKILLs every HA-managed QEMU under `run_dir` (a self-fence); their pids.
    fn kill_ha_qemus(&self, run_dir: &std::path::Path) -> Vec<i32>;
    /// What runs `qemu-img` for the pools.
    fn images(&self) -> std::sync::Arc<dyn ferry_storage::ImageTool>;
    /// What QEMU `binary` can run with `accel` (CPU models limited to `allowed` when
    /// given); None when it cannot be asked.
    async fn probe_caps(
        &self,
        binary: &str,
        accel: ferry_qemu::Accel,
        run_dir: &std::path::Path,
        allowed: &[String],
    ) -> Option<ferry_types::HostCaps>;
}

/// The machine itself.
pub struct RealOs;

#[async_trait::async_trait]
impl HostOs for RealOs {
    async fn spawn_qemu(
        &self,
        binary: &str,
        argv: &[OsString],
        run: &RunPaths,
        who: Option<&RunAs>,
        launcher: ferry_qemu::Launcher<'_>,
    ) -> Result<i32, QemuError> {
        ferry_qemu::spawn_detached(binary, argv, run, who, launcher).await
    }

    async fn kill_qemu(&self, pid: i32, run: &RunPaths) -> Result<(), QemuError> {
        ferry_qemu::kill_and_wait(pid, &run.qmp).await
    }

    fn read_pid(&self, run: &RunPaths) -> Option<i32> {
        ferry_qemu::read_pid(run)
    }

    fn qemu_alive(&self, pid: i32, run: &RunPaths) -> bool {
        ferry_qemu::pid_alive(pid, &run.qmp)
    }

    async fn connect_qmp(
        &self,
        run: &RunPaths,
        within: Duration,
        pid: i32,
    ) -> Result<Qmp, QmpError> {
        Qmp::connect_retry_to(&run.qmp, within, pid).await
    }

    fn served_by(&self, stream: &UnixStream, pid: i32) -> bool {
        ferry_qemu::peer_is(stream, pid)
    }

    fn confines(&self) -> bool {
        nix::unistd::geteuid().is_root()
    }

    fn cgroups(&self, root_name: &str) -> crate::Cgroups {
        crate::Cgroups::detect(root_name)
    }

    fn bridge_exists(&self, bridge: &str) -> bool {
        ferry_net::bridge_exists(bridge)
    }

    async fn create_tap(
        &self,
        tap: &str,
        mac: &str,
        owner: Option<(u32, u32)>,
    ) -> Result<(), NetError> {
        ferry_net::create_guarded_tap(tap, mac, owner).await
    }

    async fn attach_up(&self, tap: &str, bridge: &str, vlan: Option<u16>) -> Result<(), NetError> {
        ferry_net::attach_vm_port(tap, bridge, vlan).await
    }

    fn bridge_vlan_aware(&self, bridge: &str) -> bool {
        ferry_net::bridge_vlan_aware(bridge)
    }

    fn link_mtu(&self, link: &str) -> Option<u32> {
        ferry_net::link_mtu(link)
    }

    fn open_tap(&self, tap: &str) -> Result<OwnedFd, NetError> {
        ferry_net::open_tap(tap)
    }

    fn open_vhost(&self) -> Option<OwnedFd> {
        ferry_net::open_vhost()
    }

    async fn delete_tap(&self, tap: &str) -> Result<(), NetError> {
        ferry_net::delete_tap(tap).await
    }

    async fn guard_tap(&self, tap: &str, mac: &str) -> Result<(), NetError> {
        ferry_net::guard_tap(tap, mac).await
    }

    fn link_stats(&self, link: &str) -> Option<LinkStats> {
        ferry_net::link_stats(link)
    }

    async fn fdb_point(&self, tap: &str, mac: [u8; 6]) -> Result<(), NetError> {
        ferry_net::fdb_point(tap, mac).await
    }

    fn announce_mac(&self, bridge: &str, mac: [u8; 6]) -> Result<(), NetError> {
        ferry_net::announce_mac(bridge, mac)
    }

    fn images(&self) -> std::sync::Arc<dyn ferry_storage::ImageTool> {
        std::sync::Arc::new(ferry_storage::QemuImg)
    }

    fn kill_ha_qemus(&self, run_dir: &std::path::Path) -> Vec<i32> {
        kill_ha_qemus(run_dir)
    }

    async fn probe_caps(
        &self,
        binary: &str,
        accel: ferry_qemu::Accel,
        run_dir: &std::path::Path,
        allowed: &[String],
    ) -> Option<ferry_types::HostCaps> {
        crate::caps::detect(binary, accel, run_dir, allowed).await
    }
}

/// SIGKILLs every HA-managed QEMU under `run_dir` (VM run dirs with an `ha` marker and
/// a live QEMU); returns their pids.
pub fn kill_ha_qemus(run_dir: &std::path::Path) -> Vec<i32> {
    let mut killed = vec![];
    let Ok(rd) = std::fs::read_dir(run_dir) else {
        return killed;
    };
    for e in rd.flatten() {
        let dir = e.path();
        if !dir.join(HA_MARKER).exists() {
            continue;
        }
        let run = ferry_qemu::RunPaths::new(&dir);
        if let Some(pid) = ferry_qemu::read_pid(&run) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            killed.push(pid);
        }
    }
    killed
}

/// The marker in a VM's run dir that says its QEMU is HA-managed (what a fence kills).
pub const HA_MARKER: &str = "ha";

/// Raises this process's open-file limit to its hard limit (QEMU's children inherit
/// it): each running VM holds descriptors (QMP, serial, taps, disks) in the daemon and
/// in its QEMU, and the default soft limit of 1,024 ends a host at a few hundred VMs.
/// Returns the (old, new) soft limit.
pub fn raise_fd_limit() -> std::io::Result<(u64, u64)> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(std::io::Error::from)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(std::io::Error::from)?;
    }
    let (now, _) = getrlimit(Resource::RLIMIT_NOFILE).map_err(std::io::Error::from)?;
    Ok((soft, now))
}

#[cfg(test)]
mod fd_limit_tests {
    #[test]
    fn the_open_file_limit_is_raised_to_the_hard_limit() {
        use nix::sys::resource::{getrlimit, Resource};
        let (_, new) = super::raise_fd_limit().unwrap();
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        assert_eq!((new, soft), (hard, hard));
    }
}
