//! When a host writes its load to the cluster store. Every write is a revision etcd
//! keeps until compaction, so a host publishes a summary — its size, labels and the
//! totals of its VMs' loads, never one entry per VM — and republishes it only when
//! what DRS would see changed beyond [`Thresholds`] (the number of VMs changed, the totals
//! moved by more than a threshold, the host's capacity or labels changed) or the last
//! write is older than `max_age`. Each VM's load stays on its host until DRS balances
//! and asks for it. An idle cluster then writes with its hosts, not with its VMs.

use ferry_types::HostCapacity;
use std::time::Duration;

/// How far the published view may drift from the measured one.
#[derive(Debug, Clone, Copy)]
pub struct Thresholds {
    /// The host's total CPU load may differ by this many cores...
    pub cpu_cores: f64,
    /// The resident memory of its VMs by this many bytes...
    pub rss_bytes: u64,
    /// ...or by this share of the total, whichever is more.
    pub total_share: f64,
    /// Republished at least this often (well inside DRS's 300 s window).
    pub max_age: Duration,
}

impl Default for Thresholds {
    fn default() -> Thresholds {
        Thresholds {
            cpu_cores: 0.05,
            rss_bytes: 64 << 20,
            total_share: 0.05,
            max_age: Duration::from_secs(120),
        }
    }
}

fn close(a: f64, b: f64, abs: f64, share: f64) -> bool {
    (a - b).abs() <= abs.max(share * a.abs().max(b.abs()))
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
    age >= t.max_age
        || p.cpus != now.cpus
        || p.memory_bytes != now.memory_bytes
        || p.labels != now.labels
        || p.running != now.running
        || !p.vms.is_empty()
        || !close(p.cpu_load, now.cpu_load, t.cpu_cores, t.total_share)
        || !close(
            p.rss_bytes as f64,
            now.rss_bytes as f64,
            t.rss_bytes as f64,
            t.total_share,
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_types::VmLoad;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn loads(vms: &[(&str, f64, u64)]) -> BTreeMap<String, VmLoad> {
        vms.iter()
            .map(|(n, cpu, rss)| {
                (
                    n.to_string(),
                    VmLoad {
                        cpu: *cpu,
                        rss_bytes: *rss,
                    },
                )
            })
            .collect()
    }

    fn cap(vms: &[(&str, f64, u64)]) -> HostCapacity {
        HostCapacity::summary(8.0, 32 << 30, vec![], &loads(vms))
    }

    #[test]
    fn the_summary_is_the_totals() {
        let c = cap(&[("a", 0.5, 100), ("b", 1.25, 50)]);
        assert_eq!((c.running, c.cpu_load, c.rss_bytes), (2, 1.75, 150));
        assert!(c.vms.is_empty());
        // Not one byte per VM in the record.
        let many: Vec<(String, f64, u64)> =
            (0..500).map(|i| (format!("vm{i}"), 0.1, 1 << 20)).collect();
        let r: Vec<(&str, f64, u64)> = many.iter().map(|(n, c, r)| (n.as_str(), *c, *r)).collect();
        let json = serde_json::to_vec(&cap(&r)).expect("serialises");
        assert!(json.len() < 200, "{}", String::from_utf8_lossy(&json));
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
        // Another VM with the same load: which VMs run is in their records, the
        // summary is the same.
        assert!(!republish(
            Some(&a),
            &cap(&[("a", 0.01, 200 << 20), ("c", 1.0, 1 << 30)]),
            s,
            &t
        ));
        assert!(republish(Some(&a), &a, t.max_age, &t));
        // 40 VMs each up 60 MiB: 2.4 GiB on the host.
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
        // A record an earlier release wrote (per-VM loads) is replaced.
        let mut old = a.clone();
        old.vms = loads(&[("a", 0.01, 200 << 20)]);
        assert!(republish(Some(&old), &a, s, &t));
    }

    fn arb_cap() -> impl Strategy<Value = HostCapacity> {
        proptest::collection::btree_map(
            "[a-d]",
            (0.0f64..4.0, 0u64..(8 << 30)).prop_map(|(cpu, rss_bytes)| VmLoad { cpu, rss_bytes }),
            0..4,
        )
        .prop_map(|vms: BTreeMap<String, VmLoad>| {
            HostCapacity::summary(8.0, 32 << 30, vec![], &vms)
        })
    }

    proptest! {
        /// Not republishing means DRS's view is within the thresholds of the truth:
        /// as many VMs, total CPU and memory close, and not older than max_age.
        #[test]
        fn silence_means_close(p in arb_cap(), n in arb_cap(), age_s in 0u64..300) {
            let t = Thresholds::default();
            let age = Duration::from_secs(age_s);
            if !republish(Some(&p), &n, age, &t) {
                prop_assert!(age < t.max_age);
                prop_assert_eq!(p.running, n.running);
                let tol = t.cpu_cores.max(t.total_share * p.cpu_load.max(n.cpu_load));
                prop_assert!((p.cpu_load - n.cpu_load).abs() <= tol + 1e-12);
                let tol = (t.rss_bytes as f64).max(t.total_share * p.rss_bytes.max(n.rss_bytes) as f64);
                prop_assert!((p.rss_bytes as f64 - n.rss_bytes as f64).abs() <= tol + 1.0);
            }
            prop_assert!(!republish(Some(&n), &n, Duration::ZERO, &t));
        }
    }
}
