//! The HA manager's decisions, without I/O: it gets what the cluster store says (hosts
//! with their lease, VMs with their owner and HA policy) and answers with commands the
//! manager then carries out by compare-and-swap in the store. Deterministic: the same
//! view gives the same commands, so the tests assert on them.
//!
//! Rules:
//! - a host without a lease has self-fenced (its agent kills its HA VMs before the lease
//!   can run out); its HA VMs that should run are recovered on hosts with a lease;
//! - order: priority (high first), then name; placement: hosts that are online, not in
//!   maintenance, with room for the VM's memory, not running a VM of the same
//!   anti-affinity group, then the most free memory (seed 001: "the hardware with the
//!   most available resources"), then the name;
//! - a VM whose host gave up restarting it (crash loop) is relocated the same way,
//!   never back to that host;
//! - a VM that fits nowhere stays where it is, reported with the reason.
//!
//! Which VMs and in what order is [`select`]'s answer alone; where they go is the
//! placer's ([`plan_with`]): in a cluster, DRS's placement (rules, labels, CPU and
//! memory); [`plan`] uses the memory-only placer here when DRS has no snapshot.

use ferry_types::HaPolicy;
use serde::Serialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostView {
    pub name: String,
    /// Holds its lease.
    pub alive: bool,
    pub maintenance: bool,
    pub memory_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmView {
    pub name: String,
    /// The owner host (the VM's record lives under it).
    pub host: String,
    pub ha: HaPolicy,
    pub memory_bytes: u64,
    /// Running (or starting) according to its host; counts against that host's memory.
    pub running: bool,
    /// Should be running: started by a user and not stopped by one.
    pub wanted: bool,
    /// Its host gave up restarting it after crashes.
    pub relocate: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Command {
    /// Move the VM's ownership from a fenced host to `to`, which starts it.
    Recover {
        vm: String,
        from: String,
        to: String,
    },
    /// Move a crash-looping VM from a live host to `to`.
    Relocate {
        vm: String,
        from: String,
        to: String,
    },
    /// No host can take the VM now; tried again on the next round.
    NoPlace { vm: String, reason: String },
}

/// A VM to bring up elsewhere: its host is dead (`dead`) or gave up restarting it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    pub vm: String,
    pub from: String,
    /// The host holds no lease (Recover); else it is alive and gave up (Relocate).
    pub dead: bool,
}

/// The VMs to bring up elsewhere this round, in order: HA-managed and wanted, on a
/// host that lost its lease, or crash-looping on a live host; priority (high first),
/// then name.
pub fn select(hosts: &[HostView], vms: &[VmView]) -> Vec<Recovery> {
    let alive = |h: &str| hosts.iter().any(|x| x.name == h && x.alive);
    let known = |h: &str| hosts.iter().any(|x| x.name == h);
    let mut todo: Vec<&VmView> = vms
        .iter()
        .filter(|v| v.ha.enabled() && v.wanted)
        .filter(|v| (known(&v.host) && !alive(&v.host)) || (v.relocate && alive(&v.host)))
        .collect();
    todo.sort_by(|a, b| b.ha.priority.cmp(&a.ha.priority).then(a.name.cmp(&b.name)));
    todo.into_iter()
        .map(|v| Recovery {
            vm: v.name.clone(),
            from: v.host.clone(),
            dead: !alive(&v.host),
        })
        .collect()
}

/// The commands for one round, each selected VM placed by `place` (in order, so a
/// placer that keeps track sees the earlier ones): `Ok(host)` or `Err(reason)`.
pub fn plan_with(
    hosts: &[HostView],
    vms: &[VmView],
    mut place: impl FnMut(&Recovery) -> Result<String, String>,
) -> Vec<Command> {
    select(hosts, vms)
        .into_iter()
        .map(|r| match place(&r) {
            Ok(to) if to != r.from => {
                let (vm, from) = (r.vm, r.from);
                if r.dead {
                    Command::Recover { vm, from, to }
                } else {
                    Command::Relocate { vm, from, to }
                }
            }
            Ok(_) => Command::NoPlace {
                vm: r.vm,
                reason: "the placer chose the host it leaves".into(),
            },
            Err(reason) => Command::NoPlace { vm: r.vm, reason },
        })
        .collect()
}

/// The commands for one round with the memory-only placer: hosts that are online,
/// not in maintenance, with room for the VM's memory, not running a VM of the same
/// anti-affinity group, then the most free memory, then the name.
pub fn plan(hosts: &[HostView], vms: &[VmView]) -> Vec<Command> {
    let mut placer = MemoryPlacer::new(hosts, vms);
    plan_with(hosts, vms, |r| placer.place(r))
}

/// The fallback placer: memory and anti-affinity only, updated as it places.
struct MemoryPlacer<'a> {
    alive: BTreeMap<&'a str, &'a HostView>,
    vms: &'a [VmView],
    used: BTreeMap<&'a str, u64>,
    groups: BTreeMap<&'a str, Vec<String>>,
}

impl<'a> MemoryPlacer<'a> {
    fn new(hosts: &'a [HostView], vms: &'a [VmView]) -> MemoryPlacer<'a> {
        let alive: BTreeMap<&str, &HostView> = hosts
            .iter()
            .filter(|h| h.alive)
            .map(|h| (h.name.as_str(), h))
            .collect();
        let mut used: BTreeMap<&str, u64> = alive.keys().map(|h| (*h, 0)).collect();
        let mut groups: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for v in vms.iter().filter(|v| alive.contains_key(v.host.as_str())) {
            if v.running || (v.wanted && v.ha.enabled()) {
                *used.entry(v.host.as_str()).or_default() += v.memory_bytes;
                if let Some(g) = &v.ha.anti_affinity {
                    groups.entry(v.host.as_str()).or_default().push(g.clone());
                }
            }
        }
        MemoryPlacer {
            alive,
            vms,
            used,
            groups,
        }
    }

    fn place(&mut self, r: &Recovery) -> Result<String, String> {
        let Some(v) = self.vms.iter().find(|v| v.name == r.vm && v.host == r.from) else {
            return Err(format!("VM {} is not in the view", r.vm));
        };
        let mut best: Option<(&str, u64)> = None;
        let mut why = vec![];
        for (name, h) in &self.alive {
            if *name == v.host {
                continue;
            }
            if h.maintenance {
                why.push(format!("{name}: maintenance"));
                continue;
            }
            let free = h.memory_bytes.saturating_sub(self.used[name]);
            if free < v.memory_bytes {
                why.push(format!("{name}: {} MiB free", free >> 20));
                continue;
            }
            if let Some(g) = &v.ha.anti_affinity {
                if self.groups.get(name).is_some_and(|gs| gs.contains(g)) {
                    why.push(format!("{name}: runs a VM of group {g}"));
                    continue;
                }
            }
            if best.is_none_or(|(_, f)| free > f) {
                best = Some((name, free));
            }
        }
        match best {
            Some((to, _)) => {
                *self.used.get_mut(to).expect("live host") += v.memory_bytes;
                if let Some(g) = &v.ha.anti_affinity {
                    self.groups.entry(to).or_default().push(g.clone());
                }
                Ok(to.to_string())
            }
            None if why.is_empty() => Err("no other host holds a lease".into()),
            None => Err(why.join("; ")),
        }
    }
}

#[cfg(test)]
mod tests;
