//! HA admission control: the cluster keeps room to restart the HA VMs of any N failed
//! hosts on the others (memory, largest VM first onto the host with the most room).
//! Every combination of N hosts is tried while there are at most [`MAX_COMBOS`];
//! beyond that the N hosts with the most HA memory stand for the worst case.

use crate::state::{mib, State};
use crate::{Cluster, HostState};

pub const MAX_COMBOS: usize = 256;

/// Ok when the HA VMs of every set of `n` failed hosts fit on the rest.
pub fn failover_ok(c: &Cluster, n: u32) -> Result<(), String> {
    let n = n as usize;
    if n == 0 {
        return Ok(());
    }
    let s = State::new(c);
    let live: Vec<usize> = (0..c.hosts.len())
        .filter(|h| c.hosts[*h].state != HostState::Down)
        .collect();
    let ha_mem = |h: usize| -> u64 {
        s.on[h]
            .iter()
            .filter(|v| c.vms[**v].ha)
            .map(|v| c.vms[*v].memory_bytes)
            .sum()
    };
    if live.iter().all(|h| ha_mem(*h) == 0) {
        return Ok(());
    }
    if live.len() <= n {
        return Err(format!(
            "{} hosts cannot keep room for {n} host failures",
            live.len()
        ));
    }
    let sets: Vec<Vec<usize>> = if binomial(live.len(), n) <= MAX_COMBOS {
        combinations(&live, n)
    } else {
        let mut by_ha = live.clone();
        by_ha.sort_by_key(|h| std::cmp::Reverse(ha_mem(*h)));
        vec![by_ha[..n].to_vec()]
    };
    for failed in sets {
        let mut free: Vec<(usize, u64)> = live
            .iter()
            .filter(|h| !failed.contains(h) && c.hosts[**h].state == HostState::Online)
            .map(|h| (*h, c.hosts[*h].memory_bytes.saturating_sub(s.mem[*h])))
            .collect();
        let mut victims: Vec<usize> = failed
            .iter()
            .flat_map(|h| s.on[*h].iter().copied())
            .filter(|v| c.vms[*v].ha)
            .collect();
        victims.sort_by_key(|v| std::cmp::Reverse(c.vms[*v].memory_bytes));
        for v in victims {
            let need = c.vms[v].memory_bytes;
            match free
                .iter_mut()
                .filter(|(_, f)| *f >= need)
                .max_by_key(|(_, f)| *f)
            {
                Some((_, f)) => *f -= need,
                None => {
                    let names: Vec<&str> =
                        failed.iter().map(|h| c.hosts[*h].name.as_str()).collect();
                    return Err(format!(
                        "if {} failed, HA VM {} ({} MiB) would find no host with room",
                        names.join(" and "),
                        c.vms[v].name,
                        mib(need)
                    ));
                }
            }
        }
    }
    Ok(())
}

fn binomial(n: usize, k: usize) -> usize {
    let mut r: usize = 1;
    for i in 0..k.min(n) {
        r = r.saturating_mul(n - i) / (i + 1);
        if r > MAX_COMBOS {
            return r;
        }
    }
    r
}

fn combinations(items: &[usize], k: usize) -> Vec<Vec<usize>> {
    if k == 0 {
        return vec![vec![]];
    }
    let mut out = vec![];
    for (i, x) in items.iter().enumerate() {
        for mut rest in combinations(&items[i + 1..], k - 1) {
            rest.insert(0, *x);
            out.push(rest);
        }
    }
    out
}
