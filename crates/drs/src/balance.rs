//! Balancing. The imbalance score is hbal's idea with two metrics: the standard
//! deviation of memory utilisation plus that of CPU utilisation (measured load /
//! cores) over the online hosts, each weighted. The planner first fixes broken rules
//! (anti-affinity, affinity, labels, pins), then moves one VM at a time: among the VMs
//! of the most loaded hosts and the least loaded hosts as targets (all of them in small
//! clusters) it takes, of the moves gaining nearly the most (within [`Tuning::band`]),
//! the one copying the least memory — gain per cost without many small moves —, never
//! onto a host that would be
//! oversubscribed, never a VM twice, until the level's target imbalance is reached or
//! no move gains the minimum.

use crate::admission;
use crate::state::{mib, State};
use crate::{Cluster, HostState};
use ferry_types::{DrsConfig, DrsMove, DrsPlan, HostLoad};
use std::collections::BTreeSet;

/// Knobs of the search (the benchmark compares them; the defaults are what DRS uses).
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    /// Moves gaining at least (1 − band) of the best gain count as equally good; of
    /// those the one copying the least memory wins. 0: always the best gain.
    pub band: f64,
    /// Sources and targets looked at per step (per metric for targets).
    pub k: usize,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning { band: 0.25, k: 4 }
    }
}

/// The imbalance a DRS level is content with (vSphere's migration threshold: the target
/// deviation); level 1 does no balancing, only rule fixes.
pub fn target(level: u8) -> Option<f64> {
    match level {
        0 | 1 => None,
        2 => Some(0.25),
        3 => Some(0.12),
        4 => Some(0.06),
        _ => Some(0.0),
    }
}

/// The least a balancing move must gain: what moving a twentieth of a host's load
/// changes on `hosts` hosts. (Like hbal's minimum gain, scaled so one move on a large
/// cluster can still count.)
pub fn min_gain(hosts: usize) -> f64 {
    0.02 / hosts.max(1) as f64
}

#[derive(Clone, Copy, Default)]
struct Sums {
    n: f64,
    m1: f64,
    m2: f64,
    c1: f64,
    c2: f64,
}

fn sd(s1: f64, s2: f64, n: f64) -> f64 {
    if n <= 0.0 {
        return 0.0;
    }
    let mean = s1 / n;
    (s2 / n - mean * mean).max(0.0).sqrt()
}

impl Sums {
    fn of(s: &State) -> Sums {
        let mut x = Sums::default();
        for h in s.balanced() {
            let (m, c) = s.util(h);
            x.add(m, c, 1.0);
        }
        x
    }
    fn add(&mut self, m: f64, c: f64, sign: f64) {
        self.n += sign;
        self.m1 += sign * m;
        self.m2 += sign * m * m;
        self.c1 += sign * c;
        self.c2 += sign * c * c;
    }
    fn score(&self, cfg: &DrsConfig) -> f64 {
        cfg.memory_weight * sd(self.m1, self.m2, self.n)
            + cfg.cpu_weight * sd(self.c1, self.c2, self.n)
    }
}

/// The cluster's imbalance (0: perfectly even).
pub fn score(c: &Cluster, cfg: &DrsConfig) -> f64 {
    Sums::of(&State::new(c)).score(cfg)
}

fn loads(s: &State) -> Vec<HostLoad> {
    s.c.hosts
        .iter()
        .enumerate()
        .map(|(h, host)| HostLoad {
            host: host.name.clone(),
            memory_used_bytes: s.mem[h],
            memory_bytes: host.memory_bytes,
            cpu_load: s.cpu[h],
            cpus: host.cpus,
            vms: s.on[h].len(),
        })
        .collect()
}

/// A balancing plan for the snapshot. `frozen`: VMs that must not move (moved
/// recently, or migrating now).
pub fn balance(c: &Cluster, cfg: &DrsConfig, frozen: &BTreeSet<String>, t: Tuning) -> DrsPlan {
    let mut s = State::new(c);
    let mut sums = Sums::of(&s);
    let score_before = sums.score(cfg);
    let hosts = loads(&s);
    let mut moves: Vec<DrsMove> = vec![];
    let mut moved = vec![false; c.vms.len()];
    let limit = cfg.max_plan_moves as usize;
    let reserve_ok = admission::failover_ok(c, cfg.ha_host_failures).is_ok();
    let can_move = |v: usize, moved: &[bool]| {
        let vm = &c.vms[v];
        vm.running && vm.movable && !moved[v] && !frozen.contains(&vm.name)
    };

    // 1. Rule fixes, whatever they gain.
    let mut order: Vec<usize> = (0..c.vms.len()).collect();
    order.sort_by(|a, b| c.vms[*a].name.cmp(&c.vms[*b].name));
    for v in order {
        if moves.len() >= limit || !can_move(v, &moved) {
            continue;
        }
        let Some(from) = s.at[v] else { continue };
        if c.hosts[from].state != HostState::Online {
            continue; // maintenance evacuates its own
        }
        let vm = &c.vms[v];
        s.remove(v, from);
        let mut broken = vec![];
        s.rule_reasons(vm, from, &mut broken);
        let target = if broken.is_empty() {
            None
        } else {
            (0..c.hosts.len())
                .filter(|h| *h != from && s.fits(vm, *h, cfg))
                .min_by(|a, b| {
                    let ua = crate::place::weighted_util(&s, vm, *a, cfg);
                    let ub = crate::place::weighted_util(&s, vm, *b, cfg);
                    ua.partial_cmp(&ub).unwrap_or(std::cmp::Ordering::Equal)
                })
        };
        match target {
            Some(to) if admits(c, &s, v, to, cfg, reserve_ok) => {
                s.add(v, to);
                sums = Sums::of(&s);
                moved[v] = true;
                moves.push(DrsMove {
                    vm: vm.name.clone(),
                    from: c.hosts[from].name.clone(),
                    to: c.hosts[to].name.clone(),
                    memory_bytes: vm.memory_bytes,
                    score_after: sums.score(cfg),
                    reason: format!("rule: {}", broken.join("; ")),
                });
            }
            _ => s.add(v, from),
        }
    }

    // 2. Balancing moves.
    let Some(target) = target(cfg.level) else {
        return DrsPlan {
            score_before,
            score_after: sums.score(cfg),
            moves,
            hosts,
        };
    };
    let balanced: Vec<usize> = s.balanced().collect();
    let min = min_gain(balanced.len());
    let exhaustive = balanced.len() <= 3 * t.k;
    let mut banned: BTreeSet<(usize, usize)> = BTreeSet::new();
    let mut cands: Vec<Cand> = vec![];
    while moves.len() < limit {
        let cur = sums.score(cfg);
        if cur <= target {
            break;
        }
        let (sources, targets): (Vec<usize>, Vec<usize>) = if exhaustive {
            (balanced.clone(), balanced.clone())
        } else {
            // (host, memory, CPU, weighted) utilisations, then partial selections.
            let u: Vec<(usize, f64, f64, f64)> = balanced
                .iter()
                .map(|h| {
                    let (m, c) = s.util(*h);
                    (*h, m, c, cfg.memory_weight * m + cfg.cpu_weight * c)
                })
                .collect();
            let lowest = |key: fn(&(usize, f64, f64, f64)) -> f64, k: usize| {
                let mut v = u.clone();
                v.select_nth_unstable_by(k - 1, |a, b| key(a).total_cmp(&key(b)));
                v.truncate(k);
                v.into_iter().map(|x| x.0).collect::<Vec<usize>>()
            };
            let sources = lowest(|x| -x.3, t.k);
            let mut targets = lowest(|x| x.3, t.k);
            targets.extend(lowest(|x| x.1, t.k));
            targets.extend(lowest(|x| x.2, t.k));
            targets.sort_unstable();
            targets.dedup();
            (sources, targets)
        };
        cands.clear();
        let tu: Vec<(usize, f64, f64)> = targets
            .iter()
            .map(|h| {
                let (m, c) = s.util(*h);
                (*h, m, c)
            })
            .collect();
        for &from in &sources {
            let (fm, fc) = s.util(from);
            let fhost = &c.hosts[from];
            for &v in &s.on[from] {
                if !can_move(v, &moved) {
                    continue;
                }
                let vm = &c.vms[v];
                if vm.rules.pinned || vm.rules.affinity.is_some() {
                    continue;
                }
                let nfm = fm - vm.memory_bytes as f64 / fhost.memory_bytes.max(1) as f64;
                let nfc = fc - vm.cpu_load / fhost.cpus.max(0.001);
                let mut base = sums;
                base.add(fm, fc, -1.0);
                base.add(nfm, nfc, 1.0);
                // The best target of this VM (capacity checked here, rules in `pick`).
                let mut mine: Option<Cand> = None;
                for &(to, tm, tc) in &tu {
                    if to == from || !s.has_room(vm, to, cfg) || banned.contains(&(v, to)) {
                        continue;
                    }
                    let th = &c.hosts[to];
                    let ntm = tm + vm.memory_bytes as f64 / th.memory_bytes.max(1) as f64;
                    let ntc = tc + vm.cpu_load / th.cpus.max(0.001);
                    let mut x = base;
                    x.add(tm, tc, -1.0);
                    x.add(ntm, ntc, 1.0);
                    let new = x.score(cfg);
                    if cur - new >= min && mine.is_none_or(|m| new < m.new) {
                        mine = Some(Cand {
                            gain: cur - new,
                            v,
                            from,
                            to,
                            new,
                        });
                    }
                }
                cands.extend(mine);
            }
        }
        let Some(Cand {
            v, from, to, new, ..
        }) = pick(&mut cands, &s, c, cfg, t.band)
        else {
            break;
        };
        if !admits(c, &s, v, to, cfg, reserve_ok) {
            banned.insert((v, to));
            continue;
        }
        let (fm, fc) = s.util(from);
        let (tm, tc) = s.util(to);
        sums.add(fm, fc, -1.0);
        sums.add(tm, tc, -1.0);
        s.remove(v, from);
        s.add(v, to);
        let (fm, fc) = s.util(from);
        let (tm, tc) = s.util(to);
        sums.add(fm, fc, 1.0);
        sums.add(tm, tc, 1.0);
        moved[v] = true;
        let vm = &c.vms[v];
        moves.push(DrsMove {
            vm: vm.name.clone(),
            from: c.hosts[from].name.clone(),
            to: c.hosts[to].name.clone(),
            memory_bytes: vm.memory_bytes,
            score_after: new,
            reason: format!(
                "imbalance {cur:.4} → {new:.4} ({} MiB to copy, CPU load {:.2} cores)",
                mib(vm.memory_bytes),
                vm.cpu_load
            ),
        });
    }
    DrsPlan {
        score_before,
        score_after: sums.score(cfg),
        moves,
        hosts,
    }
}

#[derive(Clone, Copy)]
struct Cand {
    gain: f64,
    v: usize,
    from: usize,
    to: usize,
    new: f64,
}

/// Of the candidates within `band` of the best gain, the one copying the least memory
/// (then the bigger gain, then the names) whose target still passes every filter.
fn pick(cands: &mut Vec<Cand>, s: &State, c: &Cluster, cfg: &DrsConfig, band: f64) -> Option<Cand> {
    loop {
        let best = cands
            .iter()
            .map(|x| x.gain)
            .fold(f64::NEG_INFINITY, f64::max);
        if cands.is_empty() {
            return None;
        }
        let floor = best * (1.0 - band);
        let mut inband: Vec<Cand> = cands.iter().copied().filter(|x| x.gain >= floor).collect();
        inband.sort_by(|a, b| {
            let (va, vb) = (&c.vms[a.v], &c.vms[b.v]);
            va.memory_bytes
                .cmp(&vb.memory_bytes)
                .then(b.gain.total_cmp(&a.gain))
                .then(va.name.cmp(&vb.name))
                .then(a.to.cmp(&b.to))
        });
        if let Some(x) = inband.iter().find(|x| s.fits(&c.vms[x.v], x.to, cfg)) {
            return Some(*x);
        }
        cands.retain(|x| x.gain < floor);
    }
}

/// With HA admission control on (and kept so far), a move must keep the reserve.
fn admits(c: &Cluster, s: &State, v: usize, to: usize, cfg: &DrsConfig, reserve_ok: bool) -> bool {
    if cfg.ha_host_failures == 0 || !reserve_ok {
        return true;
    }
    let mut trial = c.clone();
    for (i, vm) in trial.vms.iter_mut().enumerate() {
        if let Some(h) = s.at[i] {
            vm.host = c.hosts[h].name.clone();
        }
    }
    trial.vms[v].host = c.hosts[to].name.clone();
    admission::failover_ok(&trial, cfg.ha_host_failures).is_ok()
}
