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

/// Memory of the running VMs in `pool` and its sub-pools (`vm` itself left out).
fn used(pools: &[ResourcePool], c: &Cluster, pool: &str, skip: &str) -> u64 {
    c.vms
        .iter()
        .filter(|v| v.running && v.name != skip)
        .filter(|v| {
            v.pool
                .as_deref()
                .is_some_and(|p| chain(pools, p).is_ok_and(|ch| ch.iter().any(|q| q.name == pool)))
        })
        .map(|v| v.memory_bytes)
        .sum()
}

/// May `vm` start (in its pool, if any)? Err says which limit or reservation stops it.
pub fn admit(pools: &[ResourcePool], c: &Cluster, vm: &Vm) -> Result<(), String> {
    let mem = vm.memory_bytes;
    let chain = match &vm.pool {
        Some(p) => chain(pools, p)?,
        None => vec![],
    };
    for p in &chain {
        if let Some(limit) = p.memory.limit {
            let u = used(pools, c, &p.name, &vm.name);
            if (u + mem) as f64 > limit {
                return Err(format!(
                    "resource pool {}: its VMs would use {} MiB, its limit is {} MiB",
                    p.name,
                    mib(u + mem),
                    mib(ferry_types::whole(limit))
                ));
            }
        }
    }
    // Memory not held by reservations of the other top-level pools.
    let total: u64 = c
        .hosts
        .iter()
        .filter(|h| h.state == HostState::Online)
        .map(|h| h.memory_bytes)
        .sum();
    let top = chain.first().map(|p| p.name.as_str());
    let mut held = 0u64;
    for p in pools.iter().filter(|p| p.parent.is_none()) {
        let u = used(pools, c, &p.name, &vm.name);
        held += ferry_types::whole(p.memory.reservation).max(u);
    }
    let outside: u64 = c
        .vms
        .iter()
        .filter(|v| v.running && v.name != vm.name && v.pool.is_none())
        .map(|v| v.memory_bytes)
        .sum();
    held += outside;
    let adds = match top.and_then(|t| pools.iter().find(|p| p.name == t)) {
        Some(t) => {
            let u = used(pools, c, &t.name, &vm.name);
            let r = ferry_types::whole(t.memory.reservation);
            (u + mem).max(r) - u.max(r)
        }
        None => mem,
    };
    if held + adds > total {
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
