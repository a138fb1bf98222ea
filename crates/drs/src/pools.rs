//! Resource pools (seed 001): a hierarchy; each pool has a reservation, a limit and
//! shares for CPU and memory.
//!
//! - A child's reservations together fit in its parent's, a child's limit is not above
//!   its parent's, and the top-level reservations fit in the cluster.
//! - Starting a VM in a pool: its memory plus the pool's running VMs (sub-pools
//!   included) stay within the limit of the pool and of every ancestor; and the
//!   cluster's memory not reserved by other pools has room for what the start adds
//!   beyond the top-level pool's own reservation.
//! - On the host the limits and shares become cgroup values (`cgroup_limits`): the
//!   pool's cgroup holds its VMs' QEMUs, so the kernel enforces them.

use crate::state::mib;
use crate::{Cluster, HostState, Vm};
use ferry_types::ResourcePool;
use std::collections::BTreeMap;

/// The chain from the top-level pool down to `name`; Err names a missing pool or a loop.
pub fn chain<'a>(pools: &'a [ResourcePool], name: &str) -> Result<Vec<&'a ResourcePool>, String> {
    let by: BTreeMap<&str, &ResourcePool> = pools.iter().map(|p| (p.name.as_str(), p)).collect();
    let mut out = vec![];
    let mut cur = Some(name);
    while let Some(n) = cur {
        let p = by
            .get(n)
            .ok_or_else(|| format!("resource pool {n} does not exist"))?;
        if out.iter().any(|q: &&ResourcePool| q.name == n) {
            return Err(format!("resource pool {n} is its own ancestor"));
        }
        out.push(*p);
        cur = p.parent.as_deref();
    }
    out.reverse();
    Ok(out)
}

/// The hierarchy is consistent and the top-level reservations fit the cluster
/// (`cores`, `memory_bytes`: the online hosts' total).
pub fn check(pools: &[ResourcePool], cores: f64, memory_bytes: u64) -> Result<(), String> {
    let mut names = std::collections::BTreeSet::new();
    for p in pools {
        if !names.insert(p.name.as_str()) {
            return Err(format!("resource pool {} is defined twice", p.name));
        }
    }
    for p in pools {
        chain(pools, &p.name)?;
        let kids: Vec<&ResourcePool> = pools
            .iter()
            .filter(|k| k.parent.as_deref() == Some(p.name.as_str()))
            .collect();
        let cpu: f64 = kids.iter().map(|k| k.cpu.reservation).sum();
        let mem: f64 = kids.iter().map(|k| k.memory.reservation).sum();
        if cpu > p.cpu.reservation + 1e-9 && !kids.is_empty() && p.cpu.reservation > 0.0 {
            return Err(format!(
                "the pools under {} reserve {cpu} cores, {} reserves {}",
                p.name, p.name, p.cpu.reservation
            ));
        }
        if mem > p.memory.reservation && !kids.is_empty() && p.memory.reservation > 0.0 {
            return Err(format!(
                "the pools under {} reserve {} MiB, {} reserves {} MiB",
                p.name,
                mib(ferry_types::whole(mem)),
                p.name,
                mib(ferry_types::whole(p.memory.reservation))
            ));
        }
        for k in kids {
            for (what, kl, pl) in [
                ("CPU", k.cpu.limit, p.cpu.limit),
                ("memory", k.memory.limit, p.memory.limit),
            ] {
                if let (Some(kl), Some(pl)) = (kl, pl) {
                    if kl > pl {
                        return Err(format!(
                            "the {what} limit of {} is above its parent {}'s",
                            k.name, p.name
                        ));
                    }
                }
            }
        }
    }
    let top = pools.iter().filter(|p| p.parent.is_none());
    let (cpu, mem) = top.fold((0.0, 0.0), |(c, m), p| {
        (c + p.cpu.reservation, m + p.memory.reservation)
    });
    if cpu > cores + 1e-9 {
        return Err(format!(
            "the pools reserve {cpu} cores, the cluster has {cores}"
        ));
    }
    if mem > memory_bytes as f64 {
        return Err(format!(
            "the pools reserve {} MiB, the cluster has {} MiB",
            mib(ferry_types::whole(mem)),
            mib(memory_bytes)
        ));
    }
    Ok(())
}

/// Memory of running VMs by the pool they are in (None: in no pool), and the online
/// hosts' memory: all pool admission needs. Sums add up, so each host's part can be
/// kept and the cluster's added from them; a start's admission then costs the pools
/// and hosts, not the VMs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Usage {
    pub by_pool: BTreeMap<Option<String>, u64>,
    /// Memory of the online hosts.
    pub online_memory: u64,
}

impl Usage {
    /// What the running VMs of `vms` hold (each VM named in `skip` left out).
    pub fn of_vms<'a>(vms: impl IntoIterator<Item = &'a Vm>, skip: &str) -> Usage {
        let mut u = Usage::default();
        for v in vms {
            if v.running && v.name != skip {
                let e = u.by_pool.entry(v.pool.clone()).or_default();
                *e = e.saturating_add(v.memory_bytes);
            }
        }
        u
    }

    /// The cluster's usage (`skip` left out).
    pub fn of(c: &Cluster, skip: &str) -> Usage {
        let mut u = Usage::of_vms(&c.vms, skip);
        u.online_memory = c
            .hosts
            .iter()
            .filter(|h| h.state == HostState::Online)
            .map(|h| h.memory_bytes)
            .sum();
        u
    }

    /// Adds another part (another host's VMs).
    pub fn add(&mut self, o: &Usage) {
        for (p, m) in &o.by_pool {
            let e = self.by_pool.entry(p.clone()).or_default();
            *e = e.saturating_add(*m);
        }
        self.online_memory = self.online_memory.saturating_add(o.online_memory);
    }

    /// Memory of the running VMs in `pool` and its sub-pools.
    fn used(&self, pools: &[ResourcePool], pool: &str) -> u64 {
        self.by_pool
            .iter()
            .filter(|(p, _)| {
                p.as_deref().is_some_and(|p| {
                    chain(pools, p).is_ok_and(|ch| ch.iter().any(|q| q.name == pool))
                })
            })
            .fold(0u64, |a, (_, m)| a.saturating_add(*m))
    }
}

/// May `vm` start (in its pool, if any)? Err says which limit or reservation stops it.
pub fn admit(pools: &[ResourcePool], c: &Cluster, vm: &Vm) -> Result<(), String> {
    admit_usage(pools, &Usage::of(c, &vm.name), vm)
}

/// [`admit`] from the usage without `vm`.
pub fn admit_usage(pools: &[ResourcePool], usage: &Usage, vm: &Vm) -> Result<(), String> {
    let mem = vm.memory_bytes;
    let chain = match &vm.pool {
        Some(p) => chain(pools, p)?,
        None => vec![],
    };
    for p in &chain {
        if let Some(limit) = p.memory.limit {
            let u = usage.used(pools, &p.name);
            if u.saturating_add(mem) as f64 > limit {
                return Err(format!(
                    "resource pool {}: its VMs would use {} MiB, its limit is {} MiB",
                    p.name,
                    mib(u.saturating_add(mem)),
                    mib(ferry_types::whole(limit))
                ));
            }
        }
    }
    // Memory not held by reservations of the other top-level pools.
    let total = usage.online_memory;
    let top = chain.first().map(|p| p.name.as_str());
    let mut held = 0u64;
    for p in pools.iter().filter(|p| p.parent.is_none()) {
        let u = usage.used(pools, &p.name);
        held = held.saturating_add(ferry_types::whole(p.memory.reservation).max(u));
    }
    held = held.saturating_add(usage.by_pool.get(&None).copied().unwrap_or(0));
    let adds = match top.and_then(|t| pools.iter().find(|p| p.name == t)) {
        Some(t) => {
            let u = usage.used(pools, &t.name);
            let r = ferry_types::whole(t.memory.reservation);
            u.saturating_add(mem).max(r) - u.max(r)
        }
        None => mem,
    };
    if held.saturating_add(adds) > total {
        return Err(format!(
            "{} MiB more would not fit: the cluster has {} MiB, {} MiB are running or reserved by resource pools",
            mib(adds),
            mib(total),
            mib(held)
        ));
    }
    Ok(())
}

/// What the host's cgroups get for a pool.
#[derive(Debug, Clone, PartialEq)]
pub struct CgroupLimits {
    /// cgroup v2 `cpu.weight` (1..=10000; shares 1000 → 100, the default).
    pub cpu_weight: u64,
    /// `cpu.max` quota per 100 ms period, in µs; none: unlimited.
    pub cpu_max_us: Option<u64>,
    /// `memory.max`; none: unlimited.
    pub memory_max: Option<u64>,
    /// `memory.low` (the reservation, protected from reclaim).
    pub memory_low: u64,
}

pub const CPU_PERIOD_US: u64 = 100_000;

pub fn cgroup_limits(p: &ResourcePool) -> CgroupLimits {
    CgroupLimits {
        cpu_weight: (p.cpu.shares as u64 / 10).clamp(1, 10_000),
        cpu_max_us: p
            .cpu
            .limit
            .map(|cores| ferry_types::whole(cores * CPU_PERIOD_US as f64).max(1000)),
        memory_max: p.memory.limit.map(ferry_types::whole),
        memory_low: ferry_types::whole(p.memory.reservation),
    }
}
