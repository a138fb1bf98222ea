//! Resource pools on the host: each pool is a cgroup (nested like the pools) holding
//! the QEMUs of its VMs, one leaf cgroup per VM; the kernel enforces the pool's CPU
//! limit and shares and its memory limit and reservation.
//!
//! Under systemd (PID 1; Debian's default, cgroup v2) systemd owns the tree: every
//! VM's QEMU moves into a scope `{root}-vm-{id}.scope` (so restarting the daemon never
//! ends it), in the slice of its pool (`{root}-{pool}-{sub-pool}.slice`, or
//! `{root}.slice`), whose `CPUWeight=`, `CPUQuota=`, `MemoryMax=` and `MemoryLow=` are
//! set through systemd (`ferry_systemd`). Otherwise:
//! cgroup v2 where its `cpu` and `memory` controllers can be enabled under our own
//! cgroup (`cpu.max`, `cpu.weight`, `memory.max`, `memory.low`); else cgroup v1's `cpu`
//! and `memory` hierarchies (`cpu.cfs_quota_us`, `cpu.shares`, `memory.limit_in_bytes`,
//! `memory.soft_limit_in_bytes` — v1 has no protection, the soft limit is the nearest);
//! else none, reported by [`Cgroups::describe`]. Our tree lives under this process's
//! own cgroup, in a directory named by `--cgroup-root` (default `ferry`).

use ferry_drs::pools::{cgroup_limits, CgroupLimits, CPU_PERIOD_US};
use ferry_types::ResourcePool;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("systemd: {0}")]
    Systemd(String),
    #[error("cgroup {path}: {what}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, CgroupError>;

#[derive(Debug, Clone)]
pub enum Cgroups {
    /// systemd's: scopes and slices named after this root (`--cgroup-root`).
    Systemd {
        root: String,
        /// The properties last set on each slice (set again only when they change).
        applied: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, String>>>,
    },
    V2(PathBuf),
    V1 {
        cpu: PathBuf,
        memory: PathBuf,
    },
    None(String),
}

/// The path of this process's cgroup in a hierarchy (`0::/x` for v2, `4:memory:/x`).
fn own_path(controller: Option<&str>) -> Option<String> {
    let s = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    s.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, ctrls, path) = (f.next()?, f.next()?, f.next()?);
        let hit = match controller {
            None => ctrls.is_empty(),
            Some(c) => ctrls.split(',').any(|x| x == c),
        };
        hit.then(|| path.trim_start_matches('/').to_string())
    })
}

fn write(path: &Path, file: &str, value: &str) -> Result<()> {
    std::fs::write(path.join(file), value).map_err(|source| CgroupError::Io {
        path: path.join(file),
        what: "write",
        source,
    })
}

fn mkdir(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(|source| CgroupError::Io {
        path: path.to_path_buf(),
        what: "create",
        source,
    })
}

impl Cgroups {
    /// Finds the hierarchy for our tree `root_name` (created on first use).
    pub fn detect(root_name: &str) -> Cgroups {
        if ferry_systemd::booted() {
            return Cgroups::Systemd {
                root: root_name.to_string(),
                applied: Default::default(),
            };
        }
        let v2 = Path::new("/sys/fs/cgroup");
        let ctrl = std::fs::read_to_string(v2.join("cgroup.controllers")).unwrap_or_default();
        if ctrl.split_whitespace().any(|c| c == "cpu")
            && ctrl.split_whitespace().any(|c| c == "memory")
        {
            if let Some(own) = own_path(None) {
                return Cgroups::V2(v2.join(own).join(root_name));
            }
        }
        let (cpu, mem) = (
            Path::new("/sys/fs/cgroup/cpu"),
            Path::new("/sys/fs/cgroup/memory"),
        );
        if cpu.join("cpu.shares").exists() && mem.join("memory.limit_in_bytes").exists() {
            if let (Some(c), Some(m)) = (own_path(Some("cpu")), own_path(Some("memory"))) {
                return Cgroups::V1 {
                    cpu: cpu.join(c).join(root_name),
                    memory: mem.join(m).join(root_name),
                };
            }
        }
        Cgroups::None("no cgroup cpu and memory controllers".into())
    }

    pub fn describe(&self) -> String {
        match self {
            Cgroups::Systemd { root, .. } => format!(
                "systemd: VMs in scopes {root}-vm-ID.scope under {}, pools as slices below it",
                ferry_systemd::slice(root, &[])
            ),
            Cgroups::V2(p) => format!("cgroup v2 at {}", p.display()),
            Cgroups::V1 { cpu, memory } => {
                format!("cgroup v1 at {} and {}", cpu.display(), memory.display())
            }
            Cgroups::None(why) => format!("not enforced: {why}"),
        }
    }

    fn rel(chain: &[&ResourcePool]) -> PathBuf {
        chain.iter().map(|p| format!("pool-{}", p.name)).collect()
    }

    /// Creates the pools' cgroups along `chain` (top first) with their limits (and our
    /// root on first use, with the controllers enabled down to it on v2).
    pub fn ensure_pools(&self, chain: &[&ResourcePool]) -> Result<()> {
        if let Cgroups::Systemd { root, applied } = self {
            for i in 0..chain.len() {
                let names: Vec<&str> = chain[..=i].iter().map(|p| p.name.as_str()).collect();
                let slice = ferry_systemd::slice(root, &names);
                let props = systemd_props(&cgroup_limits(chain[i]));
                let key = format!("{props:?}");
                let done = applied
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&slice)
                    .is_some_and(|k| *k == key);
                if !done {
                    ferry_systemd::set_properties(&slice, &props)
                        .map_err(|e| CgroupError::Systemd(e.to_string()))?;
                    applied
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(slice, key);
                }
            }
            return Ok(());
        }
        if let Cgroups::V2(root) = self {
            if !root.exists() {
                mkdir(root)?;
                if let Some(base) = root.parent() {
                    write(base, "cgroup.subtree_control", "+cpu +memory")?;
                }
            }
            write(root, "cgroup.subtree_control", "+cpu +memory")?;
        }
        for i in 0..chain.len() {
            let rel = Self::rel(&chain[..=i]);
            let l = cgroup_limits(chain[i]);
            match self {
                Cgroups::V2(root) => {
                    let d = root.join(&rel);
                    mkdir(&d)?;
                    // Its sub-pools and VM leaves get the controllers too.
                    write(&d, "cgroup.subtree_control", "+cpu +memory")?;
                    write_v2(&d, &l)?;
                }
                Cgroups::V1 { cpu, memory } => {
                    let (c, m) = (cpu.join(&rel), memory.join(&rel));
                    mkdir(&c)?;
                    mkdir(&m)?;
                    write_v1(&c, &m, &l)?;
                }
                Cgroups::None(_) | Cgroups::Systemd { .. } => {}
            }
        }
        Ok(())
    }

    /// Our tree's root in each hierarchy.
    fn roots(&self) -> Vec<&PathBuf> {
        match self {
            Cgroups::V2(root) => vec![root],
            Cgroups::V1 { cpu, memory } => vec![cpu, memory],
            Cgroups::None(_) | Cgroups::Systemd { .. } => vec![],
        }
    }

    /// Puts QEMU `pid` of VM `id` into its pool: a leaf cgroup `vm-{id}` under it
    /// (under systemd its scope, in the pool's slice — also without a pool).
    pub fn place(&self, chain: &[&ResourcePool], id: u32, pid: i32) -> Result<()> {
        self.ensure_pools(chain)?;
        if let Cgroups::Systemd { root, .. } = self {
            let names: Vec<&str> = chain.iter().map(|p| p.name.as_str()).collect();
            let slice = ferry_systemd::slice(root, &names);
            let unit = Self::scope_unit(root, id);
            let description = format!("ferry VM {id}");
            ferry_systemd::move_to_scope(
                pid,
                &ferry_systemd::Scope {
                    unit: &unit,
                    slice: &slice,
                    description: &description,
                    before: &[GUESTS_UNIT],
                },
            )
            .map_err(|e| CgroupError::Systemd(e.to_string()))?;
            return Ok(());
        }
        let rel = Self::rel(chain).join(format!("vm-{id}"));
        for d in self.roots().into_iter().map(|r| r.join(&rel)) {
            mkdir(&d)?;
            write(&d, "cgroup.procs", &pid.to_string())?;
        }
        Ok(())
    }

    /// The leaf cgroups of VM `id` (wherever its pool is), for removal after its QEMU
    /// ended; the kernel refuses to remove one that still holds a process.
    pub fn remove_vm(&self, id: u32) {
        for r in self.roots() {
            for d in find(r, &format!("vm-{id}")) {
                let _ = std::fs::remove_dir(&d);
            }
        }
    }

    /// Whether VMs start in a scope of their own even without a resource pool.
    pub fn scopes(&self) -> bool {
        matches!(self, Cgroups::Systemd { .. })
    }

    /// VM `id`'s scope under systemd.
    fn scope_unit(root: &str, id: u32) -> String {
        format!("{}-vm-{id}.scope", ferry_systemd::escape(root))
    }

    /// Whether QEMU `pid` of VM `id` is in the scope this host gives it (under
    /// systemd; elsewhere there is none to be in).
    pub fn in_own_scope(&self, id: u32, pid: i32) -> bool {
        match self {
            Cgroups::Systemd { root, .. } => {
                let unit = Self::scope_unit(root, id);
                ferry_systemd::cgroup_of(pid).is_none_or(|c| {
                    c.split('/').any(|part| {
                        part == unit
                            || part.starts_with(&format!("{}-", unit.trim_end_matches(".scope")))
                    })
                })
            }
            _ => true,
        }
    }

    /// Removes a pool's (empty) cgroups. Under systemd nothing: stopping a slice
    /// would stop every scope in it (VMs a pool's move left there), and an empty slice
    /// costs nothing (its runtime properties end with the boot).
    pub fn remove_pool(&self, name: &str) {
        if let Cgroups::Systemd { .. } = self {
            return;
        }
        for r in self.roots() {
            for d in find(r, &format!("pool-{name}")) {
                let _ = std::fs::remove_dir(&d);
            }
        }
    }
}

/// The unit whose stop brings the VMs down at the machine's shutdown (`ferry host
/// stop-all`): VM scopes stop after it.
pub const GUESTS_UNIT: &str = "ferry-guests.service";

/// A pool's limits as systemd properties (cgroup v2 names; systemd maps them on v1).
pub fn systemd_props(l: &CgroupLimits) -> Vec<(&'static str, String)> {
    vec![
        // cpu.weight 1..10000, 100 the default: systemd's CPUWeight is the same scale
        ("CPUWeight", l.cpu_weight.clamp(1, 10_000).to_string()),
        (
            "CPUQuota",
            // percent of one CPU; empty: no limit
            l.cpu_max_us.map_or(String::new(), |q| {
                format!("{}%", (q * 100).div_ceil(CPU_PERIOD_US).max(1))
            }),
        ),
        (
            "MemoryMax",
            l.memory_max.map_or("infinity".into(), |b| b.to_string()),
        ),
        ("MemoryLow", l.memory_low.to_string()),
    ]
}

fn find(root: &Path, name: &str) -> Vec<PathBuf> {
    let mut out = vec![];
    let Ok(rd) = std::fs::read_dir(root) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if !p.is_dir() {
            continue;
        }
        // Deepest first, so a pool's VM leaves go before the pool.
        out.extend(find(&p, name));
        if e.file_name().to_str() == Some(name) {
            out.push(p);
        }
    }
    out
}

fn write_v2(d: &Path, l: &CgroupLimits) -> Result<()> {
    write(d, "cpu.weight", &l.cpu_weight.to_string())?;
    let max = match l.cpu_max_us {
        Some(q) => format!("{q} {CPU_PERIOD_US}"),
        None => format!("max {CPU_PERIOD_US}"),
    };
    write(d, "cpu.max", &max)?;
    write(
        d,
        "memory.max",
        &l.memory_max.map_or("max".into(), |b| b.to_string()),
    )?;
    write(d, "memory.low", &l.memory_low.to_string())
}

fn write_v1(cpu: &Path, mem: &Path, l: &CgroupLimits) -> Result<()> {
    // cpu.shares: 1024 is the default, like cpu.weight 100.
    write(
        cpu,
        "cpu.shares",
        &(l.cpu_weight * 1024 / 100).max(2).to_string(),
    )?;
    write(cpu, "cpu.cfs_period_us", &CPU_PERIOD_US.to_string())?;
    write(
        cpu,
        "cpu.cfs_quota_us",
        &l.cpu_max_us.map_or("-1".into(), |q| q.to_string()),
    )?;
    // -1: unlimited (the kernel's largest value).
    write(
        mem,
        "memory.limit_in_bytes",
        &l.memory_max.map_or("-1".into(), |b| b.to_string()),
    )?;
    write(
        mem,
        "memory.soft_limit_in_bytes",
        &if l.memory_low > 0 {
            l.memory_low.to_string()
        } else {
            "-1".into()
        },
    )
}
