//! What the agent knows of a VM's QEMU at run time.

use crate::console::Console;
use crate::error::{AgentError, Refusal, Result};
use crate::Host;
use ferry_qemu::{Accel, RunPaths};
use ferry_qmp::Qmp;
use ferry_types::VmState;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

#[derive(Default)]
pub struct Runtime {
    pub state: VmState,
    pub pid: Option<i32>,
    pub qmp: Option<Qmp>,
    pub console: Option<Console>,
    pub accel: Option<Accel>,
    pub last_exit: Option<String>,
    /// Why the agent is ending this QEMU, if it is (see [`crate::exit`]).
    pub intent: crate::exit::ExitIntent,
    /// What QEMU said before it ended.
    pub facts: crate::exit::ExitFacts,
    /// Bumped at every start/adoption, so a stale supervisor never touches a new run.
    pub generation: u64,
}

/// One VM's runtime and the lock that serialises its lifecycle operations.
#[derive(Default)]
pub struct Slot {
    /// Held through [`VmOp`] by whatever changes the VM.
    pub op: Arc<tokio::sync::Mutex<()>>,
    pub rt: Mutex<Runtime>,
    /// Held by whoever talks to the VM's guest agent (QEMU serves one at a time).
    pub agent: Arc<tokio::sync::Mutex<()>>,
}

/// Proof that a VM's operation lock is held: the steps that must run under it take one
/// instead of trusting their callers to have taken it. Released when dropped.
pub struct VmOp {
    name: String,
    slot: Arc<Slot>,
    _held: tokio::sync::OwnedMutexGuard<()>,
}

impl VmOp {
    /// Waits for the operation lock of VM `name` (its `slot`).
    pub async fn lock(name: &str, slot: &Arc<Slot>) -> VmOp {
        let held = slot.op.clone().lock_owned().await;
        VmOp {
            name: name.to_string(),
            slot: slot.clone(),
            _held: held,
        }
    }

    /// The VM this operation is on.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its runtime.
    pub fn slot(&self) -> &Arc<Slot> {
        &self.slot
    }
}

impl Slot {
    pub fn state(&self) -> VmState {
        self.rt.lock().unwrap_or_else(|e| e.into_inner()).state
    }
    pub fn with<T>(&self, f: impl FnOnce(&mut Runtime) -> T) -> T {
        f(&mut self.rt.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Host {
    /// Takes VM `name`'s operation lock.
    pub async fn lock_vm(&self, name: &str) -> VmOp {
        VmOp::lock(name, &self.slot(name)).await
    }

    pub fn slot(&self, name: &str) -> Arc<Slot> {
        self.inner
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    pub fn run_paths(&self, id: u32) -> RunPaths {
        RunPaths::new(self.inner.cfg.run_dir.join(id.to_string()))
    }

    pub fn vm_state_dir(&self, id: u32) -> PathBuf {
        self.inner.cfg.state_dir.join("vms").join(id.to_string())
    }

    /// The QMP connection of a running VM.
    pub fn qmp(&self, name: &str) -> Result<Qmp> {
        self.slot(name).with(|rt| rt.qmp.clone()).ok_or_else(|| {
            AgentError::refused(Refusal::NotRunning, format!("VM {name} is not running"))
        })
    }

    /// The serial console of a running VM.
    pub fn console(&self, name: &str) -> Result<Console> {
        self.slot(name)
            .with(|rt| rt.console.clone())
            .ok_or_else(|| {
                AgentError::refused(
                    Refusal::NotRunning,
                    format!("VM {name} is not running (no console)"),
                )
            })
    }

    /// A connection to the VNC server of a running VM (checked to be its QEMU's).
    pub async fn connect_vnc(&self, name: &str) -> Result<tokio::net::UnixStream> {
        let (r, _) = self.record(name).await?;
        let slot = self.slot(name);
        let pid = slot.with(|rt| rt.pid);
        let (true, Some(pid)) = (slot.state().has_process(), pid) else {
            return Err(AgentError::refused(
                Refusal::NotRunning,
                format!("VM {name} is not running"),
            ));
        };
        let path = self.run_paths(r.id).vnc;
        let io = |source| AgentError::Io {
            what: format!("Connect to VNC of {name}"),
            source,
        };
        let stream = tokio::net::UnixStream::connect(&path).await.map_err(io)?;
        if !self.inner.os.served_by(&stream, pid) {
            return Err(io(std::io::Error::other(format!(
                "{} is not served by QEMU {pid}",
                path.display()
            ))));
        }
        Ok(stream)
    }

    /// The block node of `pool/volume` if VM `vm` runs with it.
    pub async fn running_disk_node(&self, vm: &str, pool: &str, volume: &str) -> Option<String> {
        if !self.slot(vm).state().has_process() {
            return None;
        }
        let (r, _) = self.record(vm).await.ok()?;
        let i = r
            .spec
            .disks
            .iter()
            .position(|d| d.pool == pool && d.volume.as_deref() == Some(volume))?;
        Some(self.disk_node(vm, i).await)
    }
}
