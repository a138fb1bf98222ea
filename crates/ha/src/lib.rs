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

/// The commands for one round.
pub fn plan(hosts: &[HostView], vms: &[VmView]) -> Vec<Command> {
    let alive: BTreeMap<&str, &HostView> = hosts
        .iter()
        .filter(|h| h.alive)
        .map(|h| (h.name.as_str(), h))
        .collect();
    let known = |h: &str| hosts.iter().any(|x| x.name == h);
    // Memory in use and anti-affinity groups per live host, updated as we place.
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
    let mut todo: Vec<&VmView> = vms
        .iter()
        .filter(|v| v.ha.enabled() && v.wanted)
        .filter(|v| {
            let host_dead = known(&v.host) && !alive.contains_key(v.host.as_str());
            host_dead || (v.relocate && alive.contains_key(v.host.as_str()))
        })
        .collect();
    todo.sort_by(|a, b| b.ha.priority.cmp(&a.ha.priority).then(a.name.cmp(&b.name)));
    let mut out = vec![];
    for v in todo {
        let mut best: Option<(&str, u64)> = None;
        let mut why = vec![];
        for (name, h) in &alive {
            if *name == v.host {
                continue;
            }
            if h.maintenance {
                why.push(format!("{name}: maintenance"));
                continue;
            }
            let free = h.memory_bytes.saturating_sub(used[name]);
            if free < v.memory_bytes {
                why.push(format!("{name}: {} MiB free", free >> 20));
                continue;
            }
            if let Some(g) = &v.ha.anti_affinity {
                if groups.get(name).is_some_and(|gs| gs.contains(g)) {
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
                *used.get_mut(to).expect("live host") += v.memory_bytes;
                if let Some(g) = &v.ha.anti_affinity {
                    groups.entry(to).or_default().push(g.clone());
                }
                let (vm, from, to) = (v.name.clone(), v.host.clone(), to.to_string());
                out.push(if alive.contains_key(v.host.as_str()) {
                    Command::Relocate { vm, from, to }
                } else {
                    Command::Recover { vm, from, to }
                });
            }
            None => out.push(Command::NoPlace {
                vm: v.name.clone(),
                reason: if why.is_empty() {
                    "no other host holds a lease".into()
                } else {
                    why.join("; ")
                },
            }),
        }
    }
    out
}

#[cfg(test)]
mod tests;
