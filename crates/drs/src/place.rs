//! Placement for a start, an HA restart or an evacuation: every host goes through the
//! filters, the ones that pass are scored, the best wins (ties: the name). With HA
//! admission control on, the winner must also keep the failover reserve; otherwise
//! the next one is tried.

use crate::admission;
use crate::state::State;
use crate::{Cluster, Vm};
use ferry_types::{DrsConfig, HostVerdict, PlacementPolicy, PlacementReport};

/// Utilisation of host `h` with `vm` added, weighted as the config says.
pub(crate) fn weighted_util(s: &State, vm: &Vm, h: usize, cfg: &DrsConfig) -> f64 {
    let host = &s.c.hosts[h];
    let mu = (s.mem[h] + vm.memory_bytes) as f64 / (host.memory_bytes.max(1)) as f64;
    let cu = (s.cpu[h] + vm.cpu_load) / host.cpus.max(0.001);
    let w = cfg.memory_weight + cfg.cpu_weight;
    (cfg.memory_weight * mu + cfg.cpu_weight * cu) / w
}

/// Where HA restarts (or evacuation moves) VM `name`, never on `away_from`; the HA
/// reserve does not apply (this is what it is for). On success the snapshot is updated
/// (the VM runs there now), so the next call sees it. Err: every host's reasons.
pub fn place_away(
    c: &mut Cluster,
    name: &str,
    away_from: &str,
    cfg: &DrsConfig,
) -> Result<String, String> {
    let i = c
        .vms
        .iter()
        .position(|v| v.name == name)
        .ok_or_else(|| format!("VM {name} is not in the snapshot"))?;
    let mut trial = c.clone();
    for h in trial.hosts.iter_mut().filter(|h| h.name == away_from) {
        h.state = crate::HostState::Down;
    }
    let cfg = DrsConfig {
        ha_host_failures: 0,
        ..cfg.clone()
    };
    let r = place(&trial, &c.vms[i], &cfg);
    match r.host {
        Some(h) => {
            c.vms[i].host = h.clone();
            c.vms[i].running = true;
            Ok(h)
        }
        None => Err(r
            .hosts
            .iter()
            .filter(|h| h.host != away_from)
            .map(|h| format!("{}: {}", h.host, h.reasons.join(", ")))
            .collect::<Vec<_>>()
            .join("; ")),
    }
}

/// Where `vm` should run. If it is in the snapshot (by name) it is taken out first, so
/// its current host is judged like any other.
pub fn place(c: &Cluster, vm: &Vm, cfg: &DrsConfig) -> PlacementReport {
    let mut s = State::new(c);
    if let Some(i) = c.vms.iter().position(|v| v.name == vm.name) {
        if let (true, Some(h)) = (c.vms[i].running, s.at[i]) {
            s.remove(i, h);
        }
    }
    let mut hosts: Vec<HostVerdict> = c
        .hosts
        .iter()
        .enumerate()
        .map(|(h, host)| {
            let mut reasons = vec![];
            s.reasons(vm, h, cfg, &mut reasons);
            let u = weighted_util(&s, vm, h, cfg);
            let eligible = reasons.is_empty();
            HostVerdict {
                host: host.name.clone(),
                eligible,
                reasons,
                score: eligible.then_some(match cfg.policy {
                    PlacementPolicy::Spread => 1.0 - u,
                    PlacementPolicy::Pack => u,
                }),
                memory_free_bytes: host.memory_bytes.saturating_sub(s.mem[h]),
                cpu_load: s.cpu[h],
                cpus: host.cpus,
            }
        })
        .collect();
    let mut order: Vec<usize> = (0..hosts.len()).filter(|i| hosts[*i].eligible).collect();
    order.sort_by(|a, b| {
        let (x, y) = (&hosts[*a], &hosts[*b]);
        y.score
            .partial_cmp(&x.score)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(x.host.cmp(&y.host))
    });
    let mut chosen = None;
    for i in order {
        if cfg.ha_host_failures > 0 {
            let mut trial = c.clone();
            trial.vms.retain(|v| v.name != vm.name);
            let mut placed = vm.clone();
            placed.host = hosts[i].host.clone();
            placed.running = true;
            trial.vms.push(placed);
            if let Err(why) = admission::failover_ok(&trial, cfg.ha_host_failures) {
                let h = &mut hosts[i];
                h.eligible = false;
                h.score = None;
                h.reasons.push(format!("HA admission control: {why}"));
                continue;
            }
        }
        chosen = Some(hosts[i].host.clone());
        break;
    }
    PlacementReport {
        vm: vm.name.clone(),
        policy: cfg.policy,
        host: chosen,
        hosts,
    }
}
