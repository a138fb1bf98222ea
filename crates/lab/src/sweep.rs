//! Leftovers of labs whose test process died before cleaning up.

use crate::cluster::{kill_wait, netns_pids};
use crate::qemu_pids_in;
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
        for p in netns_pids(name) {
            kill_wait(p);
        }
        // A cluster lab's namespaces are fy{pid}-{n}-{role}; its directory is fy{pid}-{n}.
        let id: String = name.splitn(3, '-').take(2).collect::<Vec<_>>().join("-");
        let dir = PathBuf::from("/var/tmp/ferry-lab").join(id);
        for p in qemu_pids_in(&dir.join("run")) {
            kill_wait(p);
        }
        let _ = Command::new("ip").args(["netns", "del", name]).status();
        let _ = std::fs::remove_dir_all(dir);
    }
}
