//! When a host writes its load to the cluster store. Every write is a revision etcd
//! keeps until compaction, so a host republishes only when what DRS would see changed
//! beyond [`Thresholds`] (a VM came or went, a VM's load moved by more than a
//! threshold, the host's capacity or labels changed) or the last write is older than
//! `max_age` — never every sample. An idle cluster then writes with its hosts, not with
//! its VMs.

use ferry_types::{HostCapacity, VmLoad};
use std::time::Duration;

/// How far the published view may drift from the measured one.
#[derive(Debug, Clone, Copy)]
pub struct Thresholds {
    /// A VM's CPU may differ by this many cores...
    pub cpu_cores: f64,
    /// ...or by this share of its load, whichever is more.
    pub cpu_share: f64,
    /// Its resident memory by this many bytes, or this share.
    pub rss_bytes: u64,
    pub rss_share: f64,
    /// The host's totals (CPU, memory of all its VMs) may differ by this share (or the
    /// per-VM absolute figures): many VMs each drifting inside their own threshold add
    /// up.
    pub total_share: f64,
    /// Republished at least this often (well inside DRS's 300 s window).
    pub max_age: Duration,
}

impl Default for Thresholds {
    fn default() -> Thresholds {
        Thresholds {
            cpu_cores: 0.05,
            cpu_share: 0.2,
            rss_bytes: 64 << 20,
            rss_share: 0.2,
            total_share: 0.05,
            max_age: Duration::from_secs(120),
        }
    }
}

fn close(a: f64, b: f64, abs: f64, share: f64) -> bool {
    (a - b).abs() <= abs.max(share * a.abs().max(b.abs()))
}

fn vm_close(a: &VmLoad, b: &VmLoad, t: &Thresholds) -> bool {
    close(a.cpu, b.cpu, t.cpu_cores, t.cpu_share)
        && close(
            a.rss_bytes as f64,
            b.rss_bytes as f64,
            t.rss_bytes as f64,
            t.rss_share,
        )
}

/// Whether `now` must be written, given what was `published` `age` ago (None: nothing
/// is published, e.g. a new lease took the old key with it).
pub fn republish(
    published: Option<&HostCapacity>,
    now: &HostCapacity,
    age: Duration,
    t: &Thresholds,
) -> bool {
    let Some(p) = published else {
        return true;
    };
    if age >= t.max_age
        || p.cpus != now.cpus
        || p.memory_bytes != now.memory_bytes
        || p.labels != now.labels
        || p.vms.len() != now.vms.len()
    {
        return true;
    }
    if !p
        .vms
        .iter()
        .zip(&now.vms)
        .all(|((pn, pl), (nn, nl))| pn == nn && vm_close(pl, nl, t))
    {
        return true;
    }
    // Many VMs each drifting just inside their threshold add up: the host's totals
    // keep to a tighter share.
    let total = |c: &HostCapacity| {
        c.vms.values().fold((0.0, 0.0), |(cpu, rss), v| {
            (cpu + v.cpu, rss + v.rss_bytes as f64)
        })
    };
    let ((pc, pr), (nc, nr)) = (total(p), total(now));
    !(close(pc, nc, t.cpu_cores, t.total_share) && close(pr, nr, t.rss_bytes as f64, t.total_share))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn cap(vms: &[(&str, f64, u64)]) -> HostCapacity {
        HostCapacity {
            cpus: 8.0,
            memory_bytes: 32 << 30,
            labels: vec![],
            vms: vms
                .iter()
                .map(|(n, cpu, rss)| {
                    (
                        n.to_string(),
                        VmLoad {
                            cpu: *cpu,
                            rss_bytes: *rss,
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn idle_hosts_stay_quiet_and_changes_go_out() {
        let t = Thresholds::default();
        let a = cap(&[("a", 0.01, 200 << 20), ("b", 1.0, 1 << 30)]);
        let s = Duration::from_secs(10);
        assert!(republish(None, &a, s, &t));
        assert!(!republish(Some(&a), &a, s, &t));
        assert!(!republish(
            Some(&a),
            &cap(&[("a", 0.03, 210 << 20), ("b", 1.03, 1 << 30)]),
            s,
            &t
        ));
        assert!(republish(
            Some(&a),
            &cap(&[("a", 0.01, 200 << 20), ("b", 1.5, 1 << 30)]),
            s,
            &t
        ));
        assert!(republish(Some(&a), &cap(&[("a", 0.01, 200 << 20)]), s, &t));
        assert!(republish(
            Some(&a),
            &cap(&[("a", 0.01, 200 << 20), ("c", 1.0, 1 << 30)]),
            s,
            &t
        ));
        assert!(republish(Some(&a), &a, t.max_age, &t));
        // 40 VMs each up 60 MiB (inside their own threshold): 2.4 GiB on the host.
        let many = |rss: u64| {
            let v: Vec<(String, f64, u64)> =
                (0..40).map(|i| (format!("v{i:02}"), 0.0, rss)).collect();
            let r: Vec<(&str, f64, u64)> = v.iter().map(|(n, c, r)| (n.as_str(), *c, *r)).collect();
            cap(&r)
        };
        assert!(republish(
            Some(&many(1 << 30)),
            &many((1 << 30) + (60 << 20)),
            s,
            &t
        ));
    }

    fn arb_cap() -> impl Strategy<Value = HostCapacity> {
        proptest::collection::btree_map(
            "[a-d]",
            (0.0f64..4.0, 0u64..(8 << 30)).prop_map(|(cpu, rss_bytes)| VmLoad { cpu, rss_bytes }),
            0..4,
        )
        .prop_map(|vms: BTreeMap<String, VmLoad>| HostCapacity {
            cpus: 8.0,
            memory_bytes: 32 << 30,
            labels: vec![],
            vms,
        })
    }

    proptest! {
        /// Not republishing means DRS's view is within the thresholds of the truth:
        /// the same VMs, each VM's CPU and memory close, and not older than max_age.
        #[test]
        fn silence_means_close(p in arb_cap(), n in arb_cap(), age_s in 0u64..300) {
            let t = Thresholds::default();
            let age = Duration::from_secs(age_s);
            if !republish(Some(&p), &n, age, &t) {
                prop_assert!(age < t.max_age);
                prop_assert_eq!(p.vms.keys().collect::<Vec<_>>(), n.vms.keys().collect::<Vec<_>>());
                for (k, v) in &n.vms {
                    let o = &p.vms[k];
                    prop_assert!((o.cpu - v.cpu).abs() <= t.cpu_cores.max(t.cpu_share * o.cpu.max(v.cpu)) + 1e-12);
                }
            }
            prop_assert!(!republish(Some(&n), &n, Duration::ZERO, &t));
        }
    }
}
