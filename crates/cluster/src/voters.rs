//! Which hosts vote in etcd: 3 voters (5 from 7 hosts on), chosen by ferry, every other
//! host a client of them. A voter down for longer than the replacement delay is removed
//! from etcd and a client host promoted in its place (through a learner, which does not
//! count for quorum until it has caught up); voters are spread over the hosts' `zone=`
//! labels when they carry them. A host whose member was replaced while it was away
//! finds out at its next start of the member and becomes a client.
//!
//! [`decide`] is the pure decision (one step per round, property-tested); the tending
//! host ([`crate::etcd_health`]) gathers the facts and carries the step out.

use std::collections::BTreeSet;
use std::time::Duration;

/// How many voters a cluster of `hosts` hosts has: every host up to 3, then 3; 5 from 7
/// hosts on (5 voters tolerate 2 failures; each voter more is one more fsync every
/// write waits for, and an even count tolerates no more failures than the odd one
/// below it).
pub fn voter_target(hosts: usize) -> usize {
    if hosts >= 7 {
        5
    } else {
        hosts.min(3)
    }
}

/// A voting etcd member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Voter {
    pub id: u64,
    pub name: String,
    /// How long it has failed to answer (None: it answers).
    pub down_for: Option<Duration>,
}

/// A host of the cluster as the voter choice sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFact {
    pub name: String,
    /// It holds its lease.
    pub alive: bool,
    pub maintenance: bool,
    /// Its `zone=` label.
    pub zone: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Facts {
    pub voters: Vec<Voter>,
    /// Names of etcd's learners (a promotion under way).
    pub learners: Vec<String>,
    pub hosts: Vec<HostFact>,
    pub replace_after: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Take a voter that has been down too long out of etcd.
    Remove { id: u64, name: String, why: String },
    /// Ask a client host to become a voter.
    Promote { host: String, why: String },
}

/// The next step, if any. Nothing while a promotion is under way (a learner exists) or
/// while the voters that answer are no majority (etcd could not commit the change).
pub fn decide(f: &Facts) -> Option<Step> {
    if !f.learners.is_empty() || f.voters.is_empty() {
        return None;
    }
    let up = f.voters.iter().filter(|v| v.down_for.is_none()).count();
    if up * 2 <= f.voters.len() {
        return None;
    }
    let target = voter_target(f.hosts.len());
    let candidates = candidates(f);
    // A voter down too long goes first — only with a host to take its place (else it
    // may as well come back as it was).
    if let Some(dead) = f
        .voters
        .iter()
        .filter(|v| v.down_for.is_some_and(|d| d >= f.replace_after))
        .max_by_key(|v| v.down_for)
    {
        // Removing it must leave a majority of the rest answering (always true with
        // one voter down; with two of five down, the second waits).
        let rest = f.voters.len() - 1;
        if !candidates.is_empty() && up * 2 > rest {
            return Some(Step::Remove {
                id: dead.id,
                name: dead.name.clone(),
                why: format!(
                    "etcd voter {} has not answered for {} s",
                    dead.name,
                    dead.down_for.unwrap_or_default().as_secs()
                ),
            });
        }
    }
    if f.voters.len() < target && up == f.voters.len() {
        let zones: BTreeSet<&str> = f
            .voters
            .iter()
            .filter_map(|v| f.hosts.iter().find(|h| h.name == v.name))
            .filter_map(|h| h.zone.as_deref())
            .collect();
        // A zone no voter is in, then any; by name within each.
        let best = candidates
            .iter()
            .min_by_key(|h| (h.zone.as_deref().is_none_or(|z| zones.contains(z)), &h.name))?;
        return Some(Step::Promote {
            host: best.name.clone(),
            why: format!(
                "{} etcd voters of {target} for {} hosts",
                f.voters.len(),
                f.hosts.len()
            ),
        });
    }
    None
}

/// Hosts that may become voters: alive, not in maintenance, not a member of etcd.
fn candidates(f: &Facts) -> Vec<&HostFact> {
    f.hosts
        .iter()
        .filter(|h| h.alive && !h.maintenance)
        .filter(|h| !f.voters.iter().any(|v| v.name == h.name))
        .filter(|h| !f.learners.contains(&h.name))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn host(name: &str, zone: Option<&str>) -> HostFact {
        HostFact {
            name: name.into(),
            alive: true,
            maintenance: false,
            zone: zone.map(String::from),
        }
    }

    fn voter(id: u64, name: &str, down_s: Option<u64>) -> Voter {
        Voter {
            id,
            name: name.into(),
            down_for: down_s.map(Duration::from_secs),
        }
    }

    fn facts(voters: Vec<Voter>, hosts: Vec<HostFact>) -> Facts {
        Facts {
            voters,
            learners: vec![],
            hosts,
            replace_after: Duration::from_secs(60),
        }
    }

    #[test]
    fn a_voter_down_too_long_is_replaced_by_a_client() {
        let hosts = vec![
            host("h1", None),
            host("h2", None),
            HostFact {
                alive: false,
                ..host("h3", None)
            },
            host("h4", None),
        ];
        let mut f = facts(
            vec![
                voter(1, "h1", None),
                voter(2, "h2", None),
                voter(3, "h3", Some(30)),
            ],
            hosts,
        );
        assert_eq!(decide(&f), None, "not down long enough");
        f.voters[2].down_for = Some(Duration::from_secs(61));
        assert!(matches!(decide(&f), Some(Step::Remove { id: 3, .. })));
        f.voters.pop();
        assert_eq!(
            decide(&f),
            Some(Step::Promote {
                host: "h4".into(),
                why: "2 etcd voters of 3 for 4 hosts".into()
            })
        );
        f.learners.push("h4".into());
        assert_eq!(decide(&f), None, "a promotion under way");
    }

    #[test]
    fn without_a_candidate_the_dead_voter_stays() {
        let mut f = facts(
            vec![
                voter(1, "h1", None),
                voter(2, "h2", None),
                voter(3, "h3", Some(600)),
            ],
            vec![host("h1", None), host("h2", None), host("h3", None)],
        );
        f.hosts[2].alive = false;
        assert_eq!(decide(&f), None);
    }

    #[test]
    fn voters_spread_over_zones_and_grow_to_five_from_seven_hosts() {
        let hosts: Vec<HostFact> = [
            ("a1", "a"),
            ("a2", "a"),
            ("b1", "b"),
            ("b2", "b"),
            ("c1", "c"),
            ("c2", "c"),
            ("d1", "d"),
        ]
        .iter()
        .map(|(n, z)| host(n, Some(z)))
        .collect();
        let f = facts(
            vec![voter(1, "a1", None), voter(2, "a2", None)],
            hosts[..6].to_vec(),
        );
        assert_eq!(
            decide(&f).map(|s| match s {
                Step::Promote { host, .. } => host,
                s => panic!("{s:?}"),
            }),
            Some("b1".into())
        );
        let three = vec![
            voter(1, "a1", None),
            voter(2, "b1", None),
            voter(3, "c1", None),
        ];
        assert_eq!(decide(&facts(three.clone(), hosts[..6].to_vec())), None);
        assert!(matches!(
            decide(&facts(three, hosts.clone())),
            Some(Step::Promote { host, .. }) if host == "d1"
        ));
    }

    #[test]
    fn nothing_without_a_majority_answering() {
        let f = facts(
            vec![
                voter(1, "h1", None),
                voter(2, "h2", Some(900)),
                voter(3, "h3", Some(900)),
            ],
            vec![host("h1", None), host("h4", None), host("h5", None)],
        );
        assert_eq!(decide(&f), None);
    }

    proptest! {
        /// Whatever the facts: a removal leaves a majority of the remaining voters
        /// answering and names a voter down past the delay; a promotion names an alive
        /// host out of maintenance that is no member yet, and happens only while every
        /// voter answers and there are fewer than the target.
        #[test]
        fn steps_never_cost_quorum(
            nv in 1usize..6,
            nh in 0usize..9,
            down in proptest::collection::vec(proptest::option::of(0u64..200), 6),
            alive in proptest::collection::vec(any::<bool>(), 15),
            zones in proptest::collection::vec(proptest::option::of(0u8..3), 15),
        ) {
            let voters: Vec<Voter> = (0..nv)
                .map(|i| voter(i as u64 + 1, &format!("v{i}"), down[i]))
                .collect();
            let mut hosts: Vec<HostFact> = (0..nv)
                .map(|i| HostFact {
                    alive: down[i].is_none(),
                    ..host(&format!("v{i}"), zones[i].map(|z| ["x", "y", "z"][z as usize]))
                })
                .collect();
            hosts.extend((0..nh).map(|i| HostFact {
                alive: alive[i],
                ..host(&format!("c{i}"), zones[nv + i].map(|z| ["x", "y", "z"][z as usize]))
            }));
            let f = facts(voters.clone(), hosts.clone());
            let up = voters.iter().filter(|v| v.down_for.is_none()).count();
            match decide(&f) {
                Some(Step::Remove { id, .. }) => {
                    let v = voters.iter().find(|v| v.id == id).unwrap();
                    prop_assert!(v.down_for.unwrap() >= f.replace_after);
                    prop_assert!(up * 2 > voters.len() - 1);
                }
                Some(Step::Promote { host: h, .. }) => {
                    let h = hosts.iter().find(|x| x.name == h).unwrap();
                    prop_assert!(h.alive && !h.maintenance);
                    prop_assert!(!voters.iter().any(|v| v.name == h.name));
                    prop_assert_eq!(up, voters.len());
                    prop_assert!(voters.len() < voter_target(hosts.len()));
                }
                None => {}
            }
        }
    }
}
