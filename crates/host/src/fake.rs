//! An in-memory host for fast tests of the runtime (feature `fake`; the crate's own
//! tests): QEMUs are [`FakeQemu`]s speaking QMP on the run dir's sockets, taps and
//! bridges are names in a table, nothing runs as another user, no cgroups. Pids start
//! above Linux's largest (2^22), so none is ever a real process.

use crate::os::HostOs;
use ferry_net::{LinkStats, NetError};
use ferry_qemu::{QemuError, RunAs, RunPaths};
use ferry_qmp::fake::FakeQemu;
use ferry_qmp::{Qmp, QmpError};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::UnixStream;

/// Above `pid_max`'s largest value: never a real process.
const FIRST_PID: i32 = 5_000_000;

/// A tap of the fake host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeTap {
    pub mac: String,
    pub bridge: Option<String>,
    pub vlan: Option<u16>,
}

#[derive(Default)]
struct State {
    next_pid: i32,
    /// pid → (run dir, QEMU, its argv).
    qemus: HashMap<i32, (PathBuf, FakeQemu, Vec<OsString>)>,
    bridges: BTreeSet<String>,
    taps: BTreeMap<String, FakeTap>,
    /// When each QEMU started, and when a kill or a fence ended it.
    started: BTreeMap<i32, std::time::Instant>,
    killed: BTreeMap<i32, std::time::Instant>,
    /// MACs announced, as (bridge, MAC), in order.
    announced: Vec<(String, [u8; 6])>,
}

/// The fake host.
pub struct FakeOs {
    state: Mutex<State>,
    /// The fake QEMUs run on a runtime of their own (its thread lives as long as the
    /// process), so they outlive the runtime of a test's first daemon, as real QEMUs
    /// outlive a daemon restart.
    machine: tokio::runtime::Handle,
    /// The host's `qemu-img`.
    pub images: Arc<ferry_storage::fake::FakeImages>,
}

impl FakeOs {
    /// A host with these bridges.
    pub fn new(bridges: &[&str]) -> Arc<FakeOs> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            let _ = tx.send(rt.handle().clone());
            rt.block_on(std::future::pending::<()>());
        });
        let machine = rx.recv().expect("the fake machine's runtime starts");
        Arc::new(FakeOs {
            state: Mutex::new(State {
                next_pid: FIRST_PID,
                bridges: bridges.iter().map(|b| b.to_string()).collect(),
                ..Default::default()
            }),
            machine,
            images: ferry_storage::fake::FakeImages::new(),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// When QEMU `pid` started (None: never here).
    pub fn started_at(&self, pid: i32) -> Option<std::time::Instant> {
        self.with(|s| s.started.get(&pid).copied())
    }

    /// When a kill or a fence ended QEMU `pid` (None: it was not killed).
    pub fn killed_at(&self, pid: i32) -> Option<std::time::Instant> {
        self.with(|s| s.killed.get(&pid).copied())
    }

    /// The MACs announced so far, as (bridge, MAC), in order.
    pub fn announced(&self) -> Vec<(String, [u8; 6])> {
        self.with(|s| s.announced.clone())
    }

    /// The newest QEMU started in `run_dir`, with its pid.
    pub fn qemu(&self, run_dir: &std::path::Path) -> Option<(i32, FakeQemu)> {
        self.with(|s| {
            s.qemus
                .iter()
                .filter(|(_, (d, _, _))| d == run_dir)
                .max_by_key(|(p, _)| **p)
                .map(|(p, (_, q, _))| (*p, q.clone()))
        })
    }

    /// The argv the QEMU `pid` was started with.
    pub fn argv(&self, pid: i32) -> Vec<String> {
        self.with(|s| {
            s.qemus
                .get(&pid)
                .map(|(_, _, a)| a.iter().map(|x| x.to_string_lossy().into()).collect())
                .unwrap_or_default()
        })
    }

    /// How many QEMUs run now.
    pub fn running(&self) -> usize {
        self.with(|s| s.qemus.values().filter(|(_, q, _)| q.alive()).count())
    }

    /// The taps that exist.
    pub fn taps(&self) -> BTreeMap<String, FakeTap> {
        self.with(|s| s.taps.clone())
    }

    fn alive(&self, pid: i32, run: &RunPaths) -> Option<FakeQemu> {
        self.with(|s| {
            s.qemus
                .get(&pid)
                .filter(|(d, q, _)| *d == run.dir && q.alive())
                .map(|(_, q, _)| q.clone())
        })
    }
}

#[async_trait::async_trait]
impl HostOs for FakeOs {
    async fn spawn_qemu(
        &self,
        _binary: &str,
        argv: &[OsString],
        run: &RunPaths,
        _who: Option<&RunAs>,
        _launcher: ferry_qemu::Launcher<'_>,
    ) -> Result<i32, QemuError> {
        run.prepare()?;
        let paused = argv.iter().any(|a| a == "-S");
        let q = {
            let _on_the_machine = self.machine.enter();
            FakeQemu::start(&run.qmp, &run.serial, paused)
        }
        .map_err(|source| QemuError::RunDir {
            path: run.qmp.display().to_string(),
            source,
        })?;
        let pid = self.with(|s| {
            let pid = s.next_pid;
            s.next_pid += 1;
            s.qemus.insert(pid, (run.dir.clone(), q, argv.to_vec()));
            s.started.insert(pid, std::time::Instant::now());
            pid
        });
        Ok(pid)
    }

    async fn kill_qemu(&self, pid: i32, run: &RunPaths) -> Result<(), QemuError> {
        if let Some(q) = self.alive(pid, run) {
            q.crash();
            self.with(|s| s.killed.insert(pid, std::time::Instant::now()));
            q.ended().await;
        }
        Ok(())
    }

    fn read_pid(&self, run: &RunPaths) -> Option<i32> {
        self.qemu(&run.dir)
            .filter(|(_, q)| q.alive())
            .map(|(p, _)| p)
    }

    fn qemu_alive(&self, pid: i32, run: &RunPaths) -> bool {
        self.alive(pid, run).is_some()
    }

    async fn connect_qmp(
        &self,
        run: &RunPaths,
        within: Duration,
        pid: i32,
    ) -> Result<Qmp, QmpError> {
        if self.alive(pid, run).is_none() {
            return Err(QmpError::Connect {
                path: run.qmp.display().to_string(),
                source: std::io::Error::other(format!("no fake QEMU {pid}")),
            });
        }
        Qmp::connect_retry(&run.qmp, within).await
    }

    fn served_by(&self, _stream: &UnixStream, pid: i32) -> bool {
        self.with(|s| s.qemus.get(&pid).is_some_and(|(_, q, _)| q.alive()))
    }

    fn confines(&self) -> bool {
        false
    }

    fn cgroups(&self, _root_name: &str) -> crate::Cgroups {
        crate::Cgroups::None("a fake host has no cgroups".into())
    }

    fn bridge_exists(&self, bridge: &str) -> bool {
        self.with(|s| s.bridges.contains(bridge))
    }

    fn bridge_vlan_aware(&self, bridge: &str) -> bool {
        self.bridge_exists(bridge)
    }

    fn link_mtu(&self, link: &str) -> Option<u32> {
        self.bridge_exists(link).then_some(1500)
    }

    async fn create_tap(
        &self,
        tap: &str,
        mac: &str,
        _owner: Option<(u32, u32)>,
    ) -> Result<(), NetError> {
        self.with(|s| {
            s.taps.insert(
                tap.to_string(),
                FakeTap {
                    mac: mac.to_string(),
                    bridge: None,
                    vlan: None,
                },
            )
        });
        Ok(())
    }

    async fn attach_up(&self, tap: &str, bridge: &str, vlan: Option<u16>) -> Result<(), NetError> {
        self.with(|s| {
            if !s.bridges.contains(bridge) {
                return Err(NetError::NotABridge(bridge.to_string()));
            }
            match s.taps.get_mut(tap) {
                Some(t) => {
                    t.bridge = Some(bridge.to_string());
                    t.vlan = vlan;
                    Ok(())
                }
                None => Err(NetError::NoSuchLink(tap.to_string())),
            }
        })
    }

    fn open_tap(&self, tap: &str) -> Result<OwnedFd, NetError> {
        if !self.with(|s| s.taps.contains_key(tap)) {
            return Err(NetError::NoSuchLink(tap.to_string()));
        }
        std::fs::File::open("/dev/null")
            .map(OwnedFd::from)
            .map_err(NetError::OpenTun)
    }

    fn open_vhost(&self) -> Option<OwnedFd> {
        None
    }

    async fn delete_tap(&self, tap: &str) -> Result<(), NetError> {
        self.with(|s| s.taps.remove(tap));
        Ok(())
    }

    async fn fdb_point(&self, tap: &str, _mac: [u8; 6]) -> Result<(), NetError> {
        if self.with(|s| s.taps.contains_key(tap)) {
            Ok(())
        } else {
            Err(NetError::NoSuchLink(tap.to_string()))
        }
    }

    fn announce_mac(&self, bridge: &str, mac: [u8; 6]) -> Result<(), NetError> {
        self.with(|s| {
            if !s.bridges.contains(bridge) {
                return Err(NetError::NoSuchLink(bridge.to_string()));
            }
            s.announced.push((bridge.to_string(), mac));
            Ok(())
        })
    }

    async fn guard_tap(&self, tap: &str, _mac: &str) -> Result<(), NetError> {
        if self.with(|s| s.taps.contains_key(tap)) {
            Ok(())
        } else {
            Err(NetError::NoSuchLink(tap.to_string()))
        }
    }

    fn link_stats(&self, _link: &str) -> Option<LinkStats> {
        None
    }

    fn images(&self) -> Arc<dyn ferry_storage::ImageTool> {
        self.images.clone()
    }

    async fn probe_caps(
        &self,
        binary: &str,
        accel: ferry_qemu::Accel,
        _run_dir: &std::path::Path,
        allowed: &[String],
    ) -> Option<ferry_types::HostCaps> {
        // an x86_64 QEMU only
        if crate::caps::arch_of(binary) != "x86_64" {
            return None;
        }
        // What QEMU 10.0 answers under TCG, in short.
        let probe = ferry_types::cpu::Probe {
            definitions: vec![("qemu64".into(), true), ("Westmere".into(), true)],
            max_flags: ferry_types::cpu::model_flags("x86-64-v2-AES")
                .unwrap_or_default()
                .iter()
                .map(|s| s.to_string())
                .collect(),
            machines: ["pc-i440fx-10.0", "pc-q35-10.0", "pc-q35-9.2", "pc", "q35"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
        };
        Some(ferry_types::cpu::host_caps("x86_64", &accel.to_string(), "10.0.2", &probe, allowed).0)
    }

    fn kill_ha_qemus(&self, run_dir: &std::path::Path) -> Vec<i32> {
        self.with(|s| {
            let now = std::time::Instant::now();
            let mut killed = vec![];
            for (pid, (dir, q, _)) in &s.qemus {
                if q.alive() && dir.starts_with(run_dir) && dir.join(crate::os::HA_MARKER).exists()
                {
                    q.crash();
                    killed.push(*pid);
                }
            }
            for pid in &killed {
                s.killed.insert(*pid, now);
            }
            killed
        })
    }
}

/// A host runtime named `h1` on `os`, its state and run dirs under `dir` (SQLite store,
/// its own certificates, TCG): what the fast tests of the runtime and of the layers
/// above it open.
pub async fn open_host(dir: &std::path::Path, os: Arc<FakeOs>) -> crate::Result<crate::Host> {
    open_member(dir, os, "h1", None).await
}

/// Host `name` on `os` under `dir`; in the cluster `link` when given (its store is its
/// subtree of the link's root, as in etcd), else alone on SQLite.
pub async fn open_member(
    dir: &std::path::Path,
    os: Arc<FakeOs>,
    name: &str,
    link: Option<crate::ClusterLink>,
) -> crate::Result<crate::Host> {
    let state_dir = dir.join("state");
    let pki = ferry_pki::HostPki::ensure(&state_dir.join("pki"), name, &[])?;
    let store: Arc<dyn ferry_store::Store> = match &link {
        Some(l) => Arc::new(l.host_store()),
        None => Arc::new(ferry_store::SqliteStore::open(&state_dir.join("ferry.db"))?),
    };
    let cfg = crate::AgentConfig {
        state_dir,
        run_dir: dir.join("run"),
        accel: crate::AccelSetting::Tcg,
        qemu_binary: "qemu-system-x86_64".into(),
        host_name: name.into(),
        cluster_file: None,
        api_port: 8470,
        resources: Default::default(),
        replication_port: 0,
        pki,
        voter_replace_after: std::time::Duration::from_secs(300),
        file_restore_image: "/nonexistent".into(),
        boot_id_file: None,
        cpu_models: vec![],
    };
    crate::Host::open_on(cfg, store, link, os).await
}
