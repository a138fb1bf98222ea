//! QEMU processes: the argv for a [`VmSpec`](ferry_types::VmSpec) (built as data, never
//! through a shell), accelerator detection, spawning detached (`-daemonize`, so VMs
//! outlive the daemon) and finding a running QEMU again from its run dir.

mod accel;
mod argv;
mod helper;
mod process;

pub use accel::{detect_accel, Accel, AccelSetting};
pub use argv::{
    build_argv, format_node, nic_device, nic_fd, tpm_companion, BackingFile, LaunchPlan, NbdSource,
    ResolvedCdrom, ResolvedDisk, RESTORE_RECONNECT_DELAY, SANDBOX,
};
pub use helper::{helper_argv, HelperPlan, FILE_RESTORE_PORT};
pub use process::{
    kill_and_wait, peer_is, pid_alive, read_pid, spawn_detached, BeforeExec, Launcher, RunAs,
    RunPaths,
};

#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("Run {binary}")]
    Spawn {
        binary: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QEMU failed to start: {stderr}")]
    Start { stderr: String },
    #[error("Run dir {path}")]
    RunDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QEMU process {pid} did not exit")]
    NoExit { pid: i32 },
}
