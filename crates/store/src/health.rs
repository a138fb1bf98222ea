//! Keeping etcd bounded and healthy. etcd keeps every revision until it is compacted,
//! never gives file space back until a member is defragmented, and once its database
//! reaches the quota it raises a NOSPACE alarm and refuses every write and lease grant
//! until an operator disarms it. ferry does what the operator would:
//!
//! - members run with an explicit quota ([`QUOTA_BYTES`]) and compact their history
//!   themselves after [`RETENTION`] (`member.rs`); ferry compacts too ([`compact_to`]),
//!   so an etcd ferry does not run (`--etcd` endpoints) stays bounded as well;
//! - [`plan`] (pure) decides from a [`Survey`] what to do: defragment a follower whose
//!   file is mostly free space (one member a round, each at most once an hour), and on a
//!   NOSPACE alarm compact to now, defragment every member (the leader last) and disarm
//!   — the caller disarms only once a survey after the rest shows room again;
//! - [`survey`] and [`carry_out`] are the I/O around it.

use crate::membership::Member;
use crate::EtcdTls;
use etcd_client::{AlarmAction, AlarmOptions, AlarmType, Client, CompactionOptions};
use std::collections::BTreeMap;
use std::time::Duration;

/// The database size at which etcd raises NOSPACE (etcd's default, set explicitly).
pub const QUOTA_BYTES: u64 = 2 << 30;
/// How much history members keep (what watches resuming after a reconnect need).
pub const RETENTION: Duration = Duration::from_secs(5 * 60);

/// One member as it reports itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberHealth {
    pub id: u64,
    pub name: String,
    pub endpoint: String,
    /// The database file's size.
    pub db_size: u64,
    /// The part of it holding data (the rest is free pages a defragmentation returns).
    pub db_in_use: u64,
    pub leader: bool,
    /// Why it could not be asked (then the sizes are 0).
    pub error: Option<String>,
}

/// An alarm etcd raised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Alarm {
    pub member: u64,
    pub kind: AlarmKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum AlarmKind {
    /// The database reached the quota: writes and lease grants are refused.
    NoSpace,
    /// A member's data differs from the others'.
    Corrupt,
}

impl AlarmKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AlarmKind::NoSpace => "NOSPACE",
            AlarmKind::Corrupt => "CORRUPT",
        }
    }
}

/// The cluster's etcd at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Survey {
    /// The store's current revision.
    pub revision: i64,
    pub members: Vec<MemberHealth>,
    pub alarms: Vec<Alarm>,
}

/// When [`plan`] defragments.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub quota_bytes: u64,
    /// A member is defragmented when its free pages are at least this much...
    pub defrag_min_free: u64,
    /// ...and at least this share of its file.
    pub defrag_min_share: f64,
    /// No member is defragmented twice within this (but on NOSPACE).
    pub defrag_every: Duration,
    /// Above this share of the quota in use, [`plan`] warns.
    pub warn_share: f64,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            quota_bytes: QUOTA_BYTES,
            defrag_min_free: 64 << 20,
            defrag_min_share: 0.5,
            defrag_every: Duration::from_secs(3600),
            warn_share: 0.75,
        }
    }
}

/// One thing to do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Drop all history before this revision (physically).
    Compact(i64),
    /// Defragment this member (it blocks it for a moment: one at a time).
    Defrag(u64),
    /// Disarm this alarm.
    Disarm(Alarm),
    /// Tell the admin (an event; also in `cluster status`).
    Warn(String),
}

/// What to do about `s`. `since_defrag[id]`: how long ago member `id` was last
/// defragmented (absent: never by this daemon).
pub fn plan(s: &Survey, p: &Policy, since_defrag: &BTreeMap<u64, Duration>) -> Vec<Step> {
    let mut steps = vec![];
    let reachable: Vec<&MemberHealth> = s.members.iter().filter(|m| m.error.is_none()).collect();
    let nospace: Vec<Alarm> = s
        .alarms
        .iter()
        .copied()
        .filter(|a| a.kind == AlarmKind::NoSpace)
        .collect();
    if !nospace.is_empty() {
        // etcd's documented recovery: compact, defragment every member, disarm.
        if s.revision > 0 {
            steps.push(Step::Compact(s.revision));
        }
        // The leader last: the others keep serving while it is busy.
        let mut order = reachable.clone();
        order.sort_by_key(|m| m.leader);
        steps.extend(order.iter().map(|m| Step::Defrag(m.id)));
        steps.extend(nospace.into_iter().map(Step::Disarm));
        steps.push(Step::Warn(format!(
            "etcd reached its quota ({} MiB): history compacted, members defragmented, alarm disarmed",
            p.quota_bytes >> 20
        )));
    } else if let Some(m) = reachable
        .iter()
        // Never the leader in a routine round: its defragmentation would stall every
        // write (and may move leadership).
        .filter(|m| !m.leader)
        .filter(|m| {
            let free = m.db_size.saturating_sub(m.db_in_use);
            free >= p.defrag_min_free
                && free as f64 >= p.defrag_min_share * m.db_size as f64
                && since_defrag.get(&m.id).is_none_or(|d| *d >= p.defrag_every)
        })
        .max_by_key(|m| {
            (
                m.db_size.saturating_sub(m.db_in_use),
                std::cmp::Reverse(m.id),
            )
        })
    {
        steps.push(Step::Defrag(m.id));
    }
    for a in &s.alarms {
        if a.kind == AlarmKind::Corrupt {
            steps.push(Step::Warn(format!(
                "etcd member {:x} raised CORRUPT: its data differs from the others'; replace it",
                a.member
            )));
        }
    }
    if let Some(m) = reachable
        .iter()
        .find(|m| m.db_in_use as f64 > p.warn_share * p.quota_bytes as f64)
    {
        steps.push(Step::Warn(format!(
            "etcd member {} holds {} MiB of live data, {:.0} % of the {} MiB quota",
            m.name,
            m.db_in_use >> 20,
            100.0 * m.db_in_use as f64 / p.quota_bytes as f64,
            p.quota_bytes >> 20
        )));
    }
    steps
}

/// Whether a NOSPACE alarm may be disarmed after the recovery's compaction and
/// defragmentations, judged by the survey taken after them: only with room again
/// (live data below 90 % of the quota on every member that answered, and at least one
/// answered), else writes would fill it at once.
pub fn may_disarm(after: &Survey, quota_bytes: u64) -> bool {
    let used: Vec<u64> = after
        .members
        .iter()
        .filter(|m| m.error.is_none())
        .map(|m| m.db_in_use)
        .collect();
    !used.is_empty() && used.iter().all(|u| (*u as f64) < 0.9 * quota_bytes as f64)
}

/// Revisions seen over time, to compact what is older than the retention.
#[derive(Debug, Default, Clone)]
pub struct History {
    /// (seconds since an epoch of the caller's, revision), oldest first.
    seen: Vec<(u64, i64)>,
}

impl History {
    /// Notes that the store was at `revision` at `now_s`.
    pub fn note(&mut self, now_s: u64, revision: i64) {
        if self.seen.last().is_none_or(|l| l.1 != revision) {
            self.seen.push((now_s, revision));
        }
    }
}

/// The revision to compact to at `now_s`: the newest one seen at least `retention`
/// ago (history newer than that is kept for watches); forgets older samples.
pub fn compact_to(h: &mut History, now_s: u64, retention: Duration) -> Option<i64> {
    let cutoff = now_s.checked_sub(retention.as_secs())?;
    let i = h.seen.iter().rposition(|(t, _)| *t <= cutoff)?;
    let rev = h.seen[i].1;
    h.seen.drain(..i);
    Some(rev)
}

fn alarm_kind(t: AlarmType) -> Option<AlarmKind> {
    match t {
        AlarmType::Nospace => Some(AlarmKind::NoSpace),
        AlarmType::Corrupt => Some(AlarmKind::Corrupt),
        AlarmType::None => None,
    }
}

/// A client of one member only (status and defragmentation speak to one member).
async fn client_of(endpoint: &str, tls: Option<&EtcdTls>) -> Result<Client, etcd_client::Error> {
    let opts = crate::etcd::with_tls(
        etcd_client::ConnectOptions::new()
            .with_timeout(Duration::from_secs(60))
            .with_connect_timeout(Duration::from_secs(2)),
        endpoint,
        tls,
    );
    Client::connect([endpoint], Some(opts)).await
}

/// Asks every member for its sizes, and the cluster for its alarms and revision.
pub async fn survey(client: &Client, members: &[Member], tls: Option<&EtcdTls>) -> Survey {
    let mut s = Survey::default();
    let mut leader = 0;
    for m in members {
        let Some(ep) = m.client_urls.first() else {
            continue;
        };
        let mut h = MemberHealth {
            id: m.id,
            name: m.name.clone(),
            endpoint: ep.clone(),
            db_size: 0,
            db_in_use: 0,
            leader: false,
            error: None,
        };
        let st = match client_of(ep, tls).await {
            Ok(mut c) => c.status().await,
            Err(e) => Err(e),
        };
        match st {
            Ok(st) => {
                h.db_size = u64::try_from(st.db_size()).unwrap_or(0);
                h.db_in_use = u64::try_from(st.raft_used_db_size()).unwrap_or(0);
                leader = st.leader();
                if let Some(hd) = st.header() {
                    s.revision = s.revision.max(hd.revision());
                }
            }
            Err(e) => h.error = Some(e.to_string()),
        }
        s.members.push(h);
    }
    for m in &mut s.members {
        m.leader = m.id == leader;
    }
    if let Ok(r) = client
        .clone()
        .alarm(AlarmAction::Get, AlarmType::None, None)
        .await
    {
        s.alarms = r
            .alarms()
            .iter()
            .filter_map(|a| {
                alarm_kind(a.alarm()).map(|kind| Alarm {
                    member: a.member_id(),
                    kind,
                })
            })
            .collect();
    }
    s
}

/// Carries out `steps` against the members of `s`; what each did, in words (for the
/// event log). A step that fails is reported and the rest still run, but no alarm is
/// disarmed after a failed compaction or defragmentation.
pub async fn carry_out(
    client: &Client,
    s: &Survey,
    steps: &[Step],
    tls: Option<&EtcdTls>,
) -> Vec<Result<String, String>> {
    let mut out = vec![];
    let mut failed = false;
    for step in steps {
        let r = match step {
            Step::Compact(rev) => client
                .clone()
                .compact(*rev, Some(CompactionOptions::new().with_physical()))
                .await
                .map(|_| format!("compacted etcd history before revision {rev}"))
                .or_else(|e| {
                    // Already compacted that far: nothing left to do.
                    if e.to_string().contains("compacted") {
                        Ok(format!("etcd history already compacted past {rev}"))
                    } else {
                        Err(format!("compacting etcd to {rev}: {e}"))
                    }
                }),
            Step::Defrag(id) => match s.members.iter().find(|m| m.id == *id) {
                None => Err(format!("no etcd member {id:x} to defragment")),
                Some(m) => match client_of(&m.endpoint, tls).await {
                    Ok(mut c) => c
                        .defragment()
                        .await
                        .map(|_| {
                            format!(
                                "defragmented etcd member {} ({} MiB file, {} MiB in use before)",
                                m.name,
                                m.db_size >> 20,
                                m.db_in_use >> 20
                            )
                        })
                        .map_err(|e| format!("defragmenting etcd member {}: {e}", m.name)),
                    Err(e) => Err(format!("defragmenting etcd member {}: {e}", m.name)),
                },
            },
            Step::Disarm(a) if failed => Err(format!(
                "{} alarm of etcd member {:x} left armed: a step before failed",
                a.kind.as_str(),
                a.member
            )),
            Step::Disarm(a) => {
                let mut o = AlarmOptions::new();
                o.with_member(a.member);
                let kind = match a.kind {
                    AlarmKind::NoSpace => AlarmType::Nospace,
                    AlarmKind::Corrupt => AlarmType::Corrupt,
                };
                client
                    .clone()
                    .alarm(AlarmAction::Deactivate, kind, Some(o))
                    .await
                    .map(|_| format!("disarmed {} of etcd member {:x}", a.kind.as_str(), a.member))
                    .map_err(|e| format!("disarming {}: {e}", a.kind.as_str()))
            }
            Step::Warn(w) => Ok(w.clone()),
        };
        failed |= r.is_err();
        out.push(r);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn member(id: u64, size_mib: u64, used_mib: u64, leader: bool) -> MemberHealth {
        MemberHealth {
            id,
            name: format!("h{id}"),
            endpoint: format!("https://127.0.0.{id}:2379"),
            db_size: size_mib << 20,
            db_in_use: used_mib << 20,
            leader,
            error: None,
        }
    }

    #[test]
    fn nospace_compacts_defrags_everyone_leader_last_then_disarms() {
        let s = Survey {
            revision: 900,
            members: vec![
                member(1, 2048, 2000, true),
                member(2, 2048, 2000, false),
                member(3, 10, 5, false),
            ],
            alarms: vec![Alarm {
                member: 2,
                kind: AlarmKind::NoSpace,
            }],
        };
        let steps = plan(&s, &Policy::default(), &BTreeMap::new());
        assert_eq!(steps[0], Step::Compact(900));
        assert_eq!(
            &steps[1..4],
            &[Step::Defrag(2), Step::Defrag(3), Step::Defrag(1)]
        );
        assert_eq!(
            steps[4],
            Step::Disarm(Alarm {
                member: 2,
                kind: AlarmKind::NoSpace
            })
        );
        assert!(matches!(steps[5], Step::Warn(_)));
    }

    #[test]
    fn a_mostly_free_member_is_defragmented_once_an_hour() {
        let s = Survey {
            revision: 5,
            members: vec![member(1, 400, 100, true), member(2, 500, 100, false)],
            alarms: vec![],
        };
        let p = Policy::default();
        assert_eq!(plan(&s, &p, &BTreeMap::new()), vec![Step::Defrag(2)]);
        // Member 1 leads: never defragmented in a routine round.
        let recent = BTreeMap::from([(2, Duration::from_secs(60))]);
        assert!(plan(&s, &p, &recent).is_empty());
        let s = Survey {
            members: vec![member(1, 100, 60, true)],
            ..s
        };
        assert!(plan(&s, &p, &BTreeMap::new()).is_empty());
    }

    #[test]
    fn disarmed_only_with_room() {
        let q = 1000 << 20;
        let s = |used: &[u64]| Survey {
            members: used
                .iter()
                .enumerate()
                .map(|(i, u)| member(i as u64 + 1, 1000, *u, i == 0))
                .collect(),
            ..Survey::default()
        };
        assert!(may_disarm(&s(&[100, 120]), q));
        assert!(!may_disarm(&s(&[100, 950]), q));
        assert!(!may_disarm(&s(&[]), q), "nobody answered");
    }

    #[test]
    fn compaction_keeps_the_retention() {
        let mut h = History::default();
        for (t, r) in [(0, 10), (100, 20), (200, 20), (400, 40), (700, 70)] {
            h.note(t, r);
        }
        assert_eq!(compact_to(&mut h, 250, RETENTION), None);
        assert_eq!(compact_to(&mut h, 500, RETENTION), Some(20));
        assert_eq!(compact_to(&mut h, 701, RETENTION), Some(40));
        assert_eq!(compact_to(&mut h, 701, RETENTION), Some(40));
    }

    fn arb_member() -> impl Strategy<Value = MemberHealth> {
        (
            1u64..6,
            0u64..4096,
            0u64..4096,
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(id, size, used, leader, down)| MemberHealth {
                error: down.then(|| "down".to_string()),
                ..member(id, size.max(used), used.min(size), leader)
            })
    }

    proptest! {
        /// Without an alarm at most one member is defragmented a round, never a
        /// member defragmented within the hour, never an unreachable one, and nothing
        /// is ever disarmed or compacted. With NOSPACE, every disarm comes after the
        /// compaction and after every reachable member's defragmentation.
        #[test]
        fn plans_are_safe(
            members in proptest::collection::vec(arb_member(), 0..6).prop_map(|v| {
                // Member ids are unique.
                v.into_iter()
                    .enumerate()
                    .map(|(i, m)| MemberHealth { id: i as u64 + 1, ..m })
                    .collect::<Vec<_>>()
            }),
            nospace in any::<bool>(),
            recent in proptest::collection::btree_map(1u64..6, 0u64..7200, 0..6),
        ) {
            let alarms = if nospace && !members.is_empty() {
                vec![Alarm { member: members[0].id, kind: AlarmKind::NoSpace }]
            } else {
                vec![]
            };
            let s = Survey { revision: 77, members: members.clone(), alarms };
            let since: BTreeMap<u64, Duration> =
                recent.iter().map(|(k, v)| (*k, Duration::from_secs(*v))).collect();
            let p = Policy::default();
            let steps = plan(&s, &p, &since);
            let defrags: Vec<u64> = steps.iter().filter_map(|s| match s {
                Step::Defrag(id) => Some(*id),
                _ => None,
            }).collect();
            for id in &defrags {
                let m = members.iter().find(|m| m.id == *id).unwrap();
                prop_assert!(m.error.is_none());
            }
            if s.alarms.is_empty() {
                prop_assert!(defrags.len() <= 1);
                for id in &defrags {
                    prop_assert!(!members.iter().any(|m| m.id == *id && m.leader));
                }
                for id in &defrags {
                    prop_assert!(since.get(id).is_none_or(|d| *d >= p.defrag_every));
                }
                prop_assert!(!steps.iter().any(|s| matches!(s, Step::Disarm(_) | Step::Compact(_))));
            } else {
                let first_disarm = steps.iter().position(|s| matches!(s, Step::Disarm(_))).unwrap();
                let last_other = steps.iter().rposition(|s| matches!(s, Step::Defrag(_) | Step::Compact(_)));
                prop_assert!(last_other.is_none_or(|i| i < first_disarm));
                prop_assert_eq!(steps[0].clone(), Step::Compact(77));
                let reachable = members.iter().filter(|m| m.error.is_none()).count();
                prop_assert_eq!(defrags.len(), reachable);
            }
        }
    }
}
