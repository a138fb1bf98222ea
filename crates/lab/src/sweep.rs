//! Leftovers of labs whose test process died before cleaning up.

use crate::pid_runs_qemu_of;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Removes what labs of test processes that no longer exist left behind (a test killed
/// before its drop ran): their namespaces, the processes in them, their directories.
pub(crate) fn sweep_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some((pid, _)) = name.strip_prefix("fy").and_then(|r| r.split_once('-')) else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        // Every process still inside that namespace was started by that lab.
        if let Ok(o) = Command::new("ip").args(["netns", "pids", name]).output() {
            for p in String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p),
                    nix::sys::signal::SIGKILL,
                );
            }
        }
        // A cluster lab's namespaces are fy{pid}-{n}-{role}; its directory is fy{pid}-{n}.
        let id: String = name.splitn(3, '-').take(2).collect::<Vec<_>>().join("-");
        let dir = PathBuf::from("/var/tmp/ferry-lab").join(id);
        if let Ok(rd) = std::fs::read_dir(dir.join("run")) {
            for e in rd.flatten() {
                let run = e.path();
                if let Some(p) = std::fs::read_to_string(run.join("qemu.pid"))
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                {
                    if pid_runs_qemu_of(p, &run) {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(p),
                            nix::sys::signal::SIGKILL,
                        );
                    }
                }
            }
        }
        let _ = Command::new("ip").args(["netns", "del", name]).status();
        let _ = std::fs::remove_dir_all(dir);
    }
}
