//! Keeping the cluster's etcd bounded: `ferry_store::health` decides, this runs it.
//! One host tends etcd at a time — the HA manager, or while there is none the host
//! whose member leads: every 30 s it surveys the members, compacts history
//! older than the retention, defragments a member that is mostly free space, and on a
//! NOSPACE alarm frees space and disarms it, with an event for each thing it did.
//! `cluster status` surveys afresh; `/metrics` shows the tending host's last survey.

use crate::error::{AgentError, Result};
use crate::Cluster;
use ferry_store::health::{self, History, Policy, Step, Survey};
use ferry_store::membership as etcd_members;
use ferry_types::{EtcdMemberHealth, EtcdStatus};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// How often the tending host looks at etcd.
pub(crate) const TICK: Duration = Duration::from_secs(30);
/// How often the tending host looks while a voter is down or voters are lacking.
const VOTER_TICK: Duration = Duration::from_secs(5);
/// A NOSPACE recovery that left etcd full is tried again after this long.
const NOSPACE_RETRY: Duration = Duration::from_secs(600);

/// The etcd tender's state.
pub(crate) struct EtcdHealthState {
    /// When the daemon started (the history's clock).
    epoch: Instant,
    history: History,
    /// When this daemon last defragmented each member.
    defragged: BTreeMap<u64, Instant>,
    /// Warnings already sent as events, and when (each at most once an hour).
    warned: BTreeMap<String, Instant>,
    /// The last survey, while this host tends etcd.
    last: Option<Survey>,
    /// When a NOSPACE recovery last ran without freeing enough.
    nospace_tried: Option<Instant>,
    /// Since when each member has not answered (the voter choice's clock).
    pub(crate) down_since: BTreeMap<u64, Instant>,
    /// Since when each learner has been one (a promotion that never ends is undone).
    pub(crate) learner_since: BTreeMap<u64, Instant>,
    /// The last round found fewer voters than the target.
    pub(crate) voters_short: bool,
}

impl Default for EtcdHealthState {
    fn default() -> EtcdHealthState {
        EtcdHealthState {
            epoch: Instant::now(),
            history: History::default(),
            defragged: BTreeMap::new(),
            warned: BTreeMap::new(),
            last: None,
            nospace_tried: None,
            down_since: BTreeMap::new(),
            learner_since: BTreeMap::new(),
            voters_short: false,
        }
    }
}

fn etcd_err(what: &'static str) -> impl FnOnce(etcd_client::Error) -> AgentError {
    move |source| AgentError::Etcd {
        what: what.into(),
        source,
    }
}

impl Cluster {
    /// Tends etcd for the daemon's life (in an etcd cluster).
    #[tracing::instrument(skip_all)]
    pub(crate) async fn etcd_health_loop(self) {
        loop {
            let r = self
                .tend_etcd()
                .await
                .map_err(|e| crate::error_chain(&e).join(": "));
            self.loops().report("etcd-health", TICK, r);
            // While a voter is down or being replaced, the voter choice looks often.
            let busy = {
                let st = self.inner.etcd.lock().unwrap_or_else(|e| e.into_inner());
                !st.down_since.is_empty() || !st.learner_since.is_empty() || st.voters_short
            };
            tokio::time::sleep(if busy { VOTER_TICK } else { TICK }).await;
        }
    }

    /// One round: when this host tends etcd, survey, decide, act.
    pub(crate) async fn tend_etcd(&self) -> Result<()> {
        let link = self.cluster_link()?;
        let Ok(etcd) = link.etcd() else {
            return Ok(());
        };
        let client = etcd.client();
        let members = etcd_members::list(&client)
            .await
            .map_err(etcd_err("List etcd members"))?;
        // One tender: the HA manager (an elected role under a lease). With no manager
        // (none elected yet, or NOSPACE refusing the election's lease), the host whose
        // member leads.
        let tends = if self.inner.ha.is_manager.load(Ordering::Relaxed) {
            true
        } else if link
            .root
            .get(ferry_store::keys::cluster::MANAGER)
            .await?
            .is_none()
        {
            let leader = etcd_members::leader(&client).await;
            members
                .iter()
                .any(|m| m.id == leader && m.name == self.host_name())
        } else {
            false
        };
        if !tends {
            let mut st = self.inner.etcd.lock().unwrap_or_else(|e| e.into_inner());
            st.last = None;
            // Clocks start afresh when this host tends again (an old "down since" would
            // replace a voter that only just stopped answering).
            st.down_since.clear();
            st.learner_since.clear();
            st.voters_short = false;
            return Ok(());
        }
        let tls = crate::membership::etcd_tls(&self.cfg().pki);
        let s = health::survey(&client, &members, Some(&tls)).await;
        // Who votes: a voter down too long replaced, voters up to the target.
        let voters = self.tend_voters(&client, &members, &s).await;
        if let Err(e) = &voters {
            tracing::warn!(error = %crate::error_chain(e).join(": "), "etcd voter change");
        }
        let policy = self.etcd_policy();
        let steps = {
            let mut st = self.inner.etcd.lock().unwrap_or_else(|e| e.into_inner());
            let now_s = st.epoch.elapsed().as_secs();
            st.history.note(now_s, s.revision);
            let since: BTreeMap<u64, Duration> = st
                .defragged
                .iter()
                .map(|(id, t)| (*id, t.elapsed()))
                .collect();
            let mut steps = health::plan(&s, &policy, &since);
            // History older than the retention goes (etcd's own periodic compaction
            // does the same on members ferry runs; this covers any etcd).
            if !matches!(steps.first(), Some(Step::Compact(_))) {
                if let Some(rev) = health::compact_to(&mut st.history, now_s, health::RETENTION) {
                    steps.insert(0, Step::Compact(rev));
                }
            }
            st.last = Some(s.clone());
            steps
        };
        if steps.is_empty() {
            return voters;
        }
        let nospace = steps.iter().any(|st| matches!(st, Step::Disarm(_)));
        if nospace {
            // A recovery that freed nothing is not repeated every round.
            let mut st = self.inner.etcd.lock().unwrap_or_else(|e| e.into_inner());
            if st
                .nospace_tried
                .is_some_and(|t| t.elapsed() < NOSPACE_RETRY)
            {
                return Err(AgentError::failed(
                    crate::error::Failure::Internal,
                    "etcd raised NOSPACE and holds more live data than its quota allows; free space (delete VMs, events) or raise the quota",
                ));
            }
            st.nospace_tried = Some(Instant::now());
        }
        let (disarms, first): (Vec<Step>, Vec<Step>) = steps
            .into_iter()
            .partition(|st| matches!(st, Step::Disarm(_)));
        let mut failed = self.carry_out_steps(&client, &s, &first, &tls).await;
        if !disarms.is_empty() && failed.is_none() {
            // Disarmed only with room again: else writes fill it at once.
            let after = health::survey(&client, &members, Some(&tls)).await;
            let used = after.members.iter().map(|m| m.db_in_use).max().unwrap_or(0);
            if health::may_disarm(&after, policy.quota_bytes) {
                failed = self.carry_out_steps(&client, &after, &disarms, &tls).await;
                self.inner
                    .etcd
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .nospace_tried = None;
            } else {
                let w = format!(
                    "etcd holds {} MiB of live data after compaction and defragmentation, {:.0} % of its {} MiB quota: NOSPACE left armed; free space (delete VMs, events) or raise the quota",
                    used >> 20,
                    100.0 * used as f64 / policy.quota_bytes as f64,
                    policy.quota_bytes >> 20
                );
                self.events().emit(None, "cluster", w.clone());
                failed = Some(w);
            }
        }
        match failed {
            Some(e) => Err(AgentError::failed(crate::error::Failure::Internal, e)),
            None => voters,
        }
    }

    /// Runs `steps`, each reported (defragmentations, disarms and warnings as events,
    /// a warning at most hourly); the last failure.
    async fn carry_out_steps(
        &self,
        client: &etcd_client::Client,
        s: &Survey,
        steps: &[Step],
        tls: &ferry_store::EtcdTls,
    ) -> Option<String> {
        let done = health::carry_out(client, s, steps, Some(tls)).await;
        let mut failed = None;
        for (step, r) in steps.iter().zip(done) {
            match (step, r) {
                (Step::Defrag(id), Ok(what)) => {
                    self.inner
                        .etcd
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .defragged
                        .insert(*id, Instant::now());
                    self.events().emit(None, "cluster", what);
                }
                (Step::Compact(_), Ok(what)) => tracing::debug!("{what}"),
                (Step::Warn(w), _) => {
                    let fresh = {
                        let mut st = self.inner.etcd.lock().unwrap_or_else(|e| e.into_inner());
                        let again = st
                            .warned
                            .get(w)
                            .is_none_or(|t| t.elapsed() >= Duration::from_secs(3600));
                        if again {
                            st.warned.insert(w.clone(), Instant::now());
                        }
                        again
                    };
                    if fresh {
                        self.events().emit(None, "cluster", w.clone());
                    }
                }
                (_, Ok(what)) => self.events().emit(None, "cluster", what),
                (_, Err(e)) => {
                    tracing::warn!(error = %e, "etcd upkeep");
                    self.events()
                        .emit(None, "cluster", format!("etcd upkeep failed: {e}"));
                    failed = Some(e);
                }
            }
        }
        failed
    }

    /// The quota this cluster's etcd has: ferry's when ferry runs the members.
    fn etcd_policy(&self) -> Policy {
        Policy::default()
    }

    fn etcd_quota(&self) -> Option<u64> {
        self.cluster()
            .filter(|l| l.cfg.managed_etcd)
            .map(|_| self.etcd_policy().quota_bytes)
    }

    /// etcd as it is now (for `cluster status`): every member asked.
    pub(crate) async fn etcd_status(&self) -> Option<EtcdStatus> {
        let link = self.cluster()?;
        let client = link.etcd().ok()?.client();
        let members = etcd_members::list(&client).await.ok()?;
        let tls = crate::membership::etcd_tls(&self.cfg().pki);
        let s = health::survey(&client, &members, Some(&tls)).await;
        Some(status_of(&s, self.etcd_quota()))
    }

    /// Prometheus lines of the tending host's last survey (nothing on other hosts).
    pub fn etcd_metrics(&self) -> String {
        let last = self
            .inner
            .etcd
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last
            .clone();
        let Some(s) = last else {
            return String::new();
        };
        let mut out = String::new();
        out.push_str("# HELP ferry_etcd_db_bytes Size of each etcd member's database file.\n# TYPE ferry_etcd_db_bytes gauge\n");
        for m in &s.members {
            out.push_str(&format!(
                "ferry_etcd_db_bytes{{member=\"{}\"}} {}\n",
                m.name, m.db_size
            ));
        }
        out.push_str("# HELP ferry_etcd_db_in_use_bytes Part of each etcd member's database holding data.\n# TYPE ferry_etcd_db_in_use_bytes gauge\n");
        for m in &s.members {
            out.push_str(&format!(
                "ferry_etcd_db_in_use_bytes{{member=\"{}\"}} {}\n",
                m.name, m.db_in_use
            ));
        }
        if let Some(q) = self.etcd_quota() {
            out.push_str(&format!(
                "# HELP ferry_etcd_quota_bytes Where etcd refuses writes.\n# TYPE ferry_etcd_quota_bytes gauge\nferry_etcd_quota_bytes {q}\n"
            ));
        }
        out.push_str(&format!(
            "# HELP ferry_etcd_alarms etcd alarms raised.\n# TYPE ferry_etcd_alarms gauge\nferry_etcd_alarms {}\n",
            s.alarms.len()
        ));
        out.push_str(&format!(
            "# HELP ferry_etcd_revision The store's revision.\n# TYPE ferry_etcd_revision counter\nferry_etcd_revision {}\n",
            s.revision
        ));
        out
    }
}

fn status_of(s: &Survey, quota: Option<u64>) -> EtcdStatus {
    let name_of = |id: u64| {
        s.members
            .iter()
            .find(|m| m.id == id)
            .map_or_else(|| format!("{id:x}"), |m| m.name.clone())
    };
    EtcdStatus {
        revision: s.revision,
        quota_bytes: quota,
        members: s
            .members
            .iter()
            .map(|m| EtcdMemberHealth {
                name: m.name.clone(),
                endpoint: m.endpoint.clone(),
                db_size_bytes: m.db_size,
                db_in_use_bytes: m.db_in_use,
                leader: m.leader,
                error: m.error.clone(),
            })
            .collect(),
        alarms: s
            .alarms
            .iter()
            .map(|a| format!("{} on {}", a.kind.as_str(), name_of(a.member)))
            .collect(),
    }
}
