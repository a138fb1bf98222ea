//! How many DRS migrations run at once, decided without I/O: at most
//! `max_moves_per_host` per host (as source or destination) and `max_moves_cluster` in
//! all, counting those already under way; and a plan's moves start in order per host
//! — a move whose host had an earlier move held back or failed waits for the next
//! round, since it may rely on that one.

use ferry_types::{DrsConfig, DrsMove};
use std::collections::{BTreeMap, BTreeSet};

/// What to do with the next move of the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Start,
    /// Not this round (a host at its limit, or an earlier move of its hosts held).
    Hold,
    /// The cluster is at its limit: nothing more this round.
    Stop,
}

#[derive(Debug, Clone)]
pub struct MoveLimits {
    per_host: BTreeMap<String, u32>,
    total: u32,
    /// Hosts with a move held back or failed this round.
    touched: BTreeSet<String>,
    max_host: u32,
    max_cluster: u32,
}

impl MoveLimits {
    /// `in_flight`: (from, to) of the DRS migrations under way.
    pub fn new<'a>(
        in_flight: impl IntoIterator<Item = (&'a str, &'a str)>,
        cfg: &DrsConfig,
    ) -> Self {
        let mut l = MoveLimits {
            per_host: BTreeMap::new(),
            total: 0,
            touched: BTreeSet::new(),
            max_host: cfg.max_moves_per_host,
            max_cluster: cfg.max_moves_cluster,
        };
        for (from, to) in in_flight {
            l.count(from, to);
        }
        l
    }

    fn count(&mut self, from: &str, to: &str) {
        *self.per_host.entry(from.to_string()).or_default() += 1;
        *self.per_host.entry(to.to_string()).or_default() += 1;
        self.total += 1;
    }

    fn busy(&self, h: &str) -> bool {
        self.per_host.get(h).copied().unwrap_or(0) >= self.max_host
    }

    /// Asks for the plan's next move (in plan order). `Hold` marks its hosts.
    pub fn admit(&mut self, mv: &DrsMove) -> Admit {
        if self.total >= self.max_cluster {
            return Admit::Stop;
        }
        let blocked = |h: &str| self.busy(h) || self.touched.contains(h);
        if blocked(&mv.from) || blocked(&mv.to) {
            self.hold(mv);
            return Admit::Hold;
        }
        Admit::Start
    }

    /// The move started.
    pub fn started(&mut self, mv: &DrsMove) {
        self.count(&mv.from, &mv.to);
    }

    /// The move could not start: later moves of its hosts wait.
    pub fn failed(&mut self, mv: &DrsMove) {
        self.hold(mv);
    }

    fn hold(&mut self, mv: &DrsMove) {
        self.touched.insert(mv.from.clone());
        self.touched.insert(mv.to.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn mv(vm: usize, from: usize, to: usize) -> DrsMove {
        DrsMove {
            vm: format!("v{vm}"),
            from: format!("h{from}"),
            to: format!("h{to}"),
            memory_bytes: 0,
            score_after: 0.0,
            reason: String::new(),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        /// Limits hold with what was under way, and each host's moves start in plan
        /// order: never after one of its earlier moves was held or failed.
        #[test]
        fn limits_and_order_hold(
            max_host in 1u32..3,
            max_cluster in 1u32..6,
            flying in prop::collection::vec((0usize..4, 0usize..4), 0..4),
            plan in prop::collection::vec((0usize..4, 0usize..4, any::<bool>()), 0..12),
        ) {
            let cfg = DrsConfig { max_moves_per_host: max_host, max_moves_cluster: max_cluster, ..DrsConfig::default() };
            let flying: Vec<(String, String)> = flying.iter().filter(|(a, b)| a != b)
                .map(|(a, b)| (format!("h{a}"), format!("h{b}"))).collect();
            let mut l = MoveLimits::new(flying.iter().map(|(a, b)| (a.as_str(), b.as_str())), &cfg);
            let mut per: BTreeMap<String, u32> = BTreeMap::new();
            for (a, b) in &flying {
                *per.entry(a.clone()).or_default() += 1;
                *per.entry(b.clone()).or_default() += 1;
            }
            let mut total = u32::try_from(flying.len()).expect("a few moves");
            let mut held: BTreeSet<String> = BTreeSet::new();
            for (i, (f, t, ok)) in plan.iter().enumerate().filter(|(_, (f, t, _))| f != t) {
                let m = mv(i, *f, *t);
                match l.admit(&m) {
                    Admit::Stop => {
                        prop_assert!(total >= max_cluster);
                        break;
                    }
                    Admit::Hold => {
                        held.insert(m.from.clone());
                        held.insert(m.to.clone());
                    }
                    Admit::Start => {
                        prop_assert!(!held.contains(&m.from) && !held.contains(&m.to), "out of order");
                        if *ok {
                            l.started(&m);
                            *per.entry(m.from.clone()).or_default() += 1;
                            *per.entry(m.to.clone()).or_default() += 1;
                            total += 1;
                            // Started ones never push a host or the cluster past the limit
                            // (beyond what was already under way).
                            let before = u32::try_from(flying.len()).expect("a few moves");
                            prop_assert!(total <= max_cluster.max(before));
                            for h in [&m.from, &m.to] {
                                let was = flying.iter().filter(|(a, b)| a == h || b == h).count();
                                let was = u32::try_from(was).expect("a few moves");
                                prop_assert!(per[h] <= max_host.max(was));
                            }
                        } else {
                            l.failed(&m);
                            held.insert(m.from.clone());
                            held.insert(m.to.clone());
                        }
                    }
                }
            }
        }
    }
}
