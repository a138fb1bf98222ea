//! Carrying out the voter choice ([`crate::voters`]): the tending host removes a voter
//! that has been down too long and asks a client host to become a voter; the client
//! joins etcd as a learner, starts its member, is promoted once it has caught up and
//! restarts its daemon on the new configuration (VMs keep running). A host whose member
//! was replaced while it was away becomes a client when it finds its member gone.

use crate::error::{AgentError, Failure, Refusal, Result};
use crate::membership::{
    client_url, etcd_err, etcd_paths, etcd_tls, member_config, peer_url, save_config,
};
use crate::voters::{self, Facts, HostFact, Step, Voter};
use crate::Cluster;
use ferry_store::health::Survey;
use ferry_store::member;
use ferry_store::membership as etcd_members;
use std::time::{Duration, Instant};

/// How long a learner may take to catch up before the promotion is given up.
const CATCH_UP: Duration = Duration::from_secs(120);

impl Cluster {
    /// The tender's part, each round: notes which voters do not answer, decides and
    /// carries out one step (with an event).
    pub(crate) async fn tend_voters(
        &self,
        client: &etcd_client::Client,
        members: &[etcd_members::Member],
        s: &Survey,
    ) -> Result<()> {
        let (down_for, stale_learners) = {
            let mut st = self.inner.etcd.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            for m in members {
                // A member the survey could not ask — or one added that never started
                // (no name, no client URL: the survey skips it) — is down.
                let answered = s.members.iter().any(|h| h.id == m.id && h.error.is_none());
                if answered {
                    st.down_since.remove(&m.id);
                } else {
                    st.down_since.entry(m.id).or_insert(now);
                }
                if m.learner {
                    st.learner_since.entry(m.id).or_insert(now);
                }
            }
            st.down_since
                .retain(|id, _| members.iter().any(|m| m.id == *id));
            st.learner_since
                .retain(|id, _| members.iter().any(|m| m.id == *id && m.learner));
            let stale: Vec<u64> = st
                .learner_since
                .iter()
                .filter(|(_, t)| now.duration_since(**t) > CATCH_UP + Duration::from_secs(60))
                .map(|(id, _)| *id)
                .collect();
            let down = st
                .down_since
                .iter()
                .map(|(id, t)| (*id, now.duration_since(*t)))
                .collect::<std::collections::BTreeMap<u64, Duration>>();
            (down, stale)
        };
        // A promotion that never finished (its host died, or gave up without taking
        // its learner back) would block every later change: the learner goes.
        if let Some(id) = stale_learners.first() {
            let name = members
                .iter()
                .find(|m| m.id == *id)
                .map_or_else(|| format!("{id:x}"), |m| m.name.clone());
            etcd_members::remove(client, *id)
                .await
                .map_err(etcd_err(format!("Remove the stale etcd learner {name}")))?;
            self.events().emit(
                None,
                "cluster",
                format!("etcd learner {name} never caught up: removed"),
            );
            return Ok(());
        }
        let (snapshot, _) = self.drs_snapshot().await?;
        let facts = Facts {
            voters: members
                .iter()
                .filter(|m| !m.learner)
                .map(|m| Voter {
                    id: m.id,
                    name: m.name.clone(),
                    down_for: down_for.get(&m.id).copied(),
                })
                .collect(),
            learners: members
                .iter()
                .filter(|m| m.learner)
                .map(|m| m.name.clone())
                .collect(),
            hosts: snapshot
                .hosts
                .iter()
                .map(|h| HostFact {
                    name: h.name.clone(),
                    alive: h.state != ferry_drs::HostState::Down,
                    maintenance: h.state == ferry_drs::HostState::Maintenance,
                    zone: h
                        .labels
                        .iter()
                        .find_map(|l| l.strip_prefix("zone=").map(String::from)),
                })
                .collect(),
            replace_after: self.cfg().voter_replace_after,
        };
        self.inner
            .etcd
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .voters_short = facts.voters.len() < voters::voter_target(facts.hosts.len());
        match voters::decide(&facts) {
            None => Ok(()),
            Some(Step::Remove { id, name, why }) => {
                etcd_members::remove(client, id)
                    .await
                    .map_err(etcd_err(format!("Remove etcd member {name}")))?;
                self.events().emit(
                    None,
                    "cluster",
                    format!("{why}: removed from etcd; another host takes its place"),
                );
                Ok(())
            }
            Some(Step::Promote { host, why }) => {
                self.events().emit(
                    None,
                    "cluster",
                    format!("{why}: {host} becomes an etcd voter"),
                );
                // In the background: the tender's round (NOSPACE recovery) goes on.
                // The tender itself may be the client to promote.
                let me = self.clone();
                tokio::spawn(async move {
                    let r: Result<ferry_types::ClusterConfig> = if host == me.host_name() {
                        me.become_voter().await
                    } else {
                        match me
                            .peer_with_timeout(&host, CATCH_UP + Duration::from_secs(60))
                            .await
                        {
                            Ok(peer) => {
                                peer.post("/api/v1/cluster/etcd/promote", &serde_json::json!({}))
                                    .await
                            }
                            Err(e) => Err(e),
                        }
                    };
                    if let Err(e) = r {
                        me.events().emit(
                            None,
                            "cluster",
                            format!(
                                "{host} could not become an etcd voter: {}",
                                crate::error_chain(&e).join(": ")
                            ),
                        );
                    }
                });
                Ok(())
            }
        }
    }

    /// Makes this client host an etcd voter (the tending host asks): a learner member
    /// first, promoted once it has caught up; then the daemon restarts on the new
    /// configuration. Undone when a step fails.
    pub async fn become_voter(&self) -> Result<ferry_types::ClusterConfig> {
        // One promotion at a time on this host.
        static PROMOTING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
        let _one = PROMOTING.lock().await;
        let link = self.cluster_link()?;
        if link.cfg.managed_etcd {
            return Ok(link.cfg.clone()); // a voter already
        }
        let client = link.etcd()?.client();
        let name = self.host_name().to_string();
        let peer = peer_url(&link.cfg.address);
        // Only while the cluster lacks voters (the tender decided so; a caller
        // cannot make every host a voter).
        let list = etcd_members::list(&client)
            .await
            .map_err(etcd_err("List etcd members"))?;
        let voters = list.iter().filter(|m| !m.learner).count();
        let hosts = link.members().await?.len();
        if voters >= voters::voter_target(hosts) {
            return Err(AgentError::refused(
                Refusal::Membership,
                format!(
                    "etcd has {voters} voters, as many as {hosts} hosts want: {name} stays a client"
                ),
            ));
        }
        // A learner of ours left from an attempt that died: taken back first.
        if let Some(m) = list.iter().find(|m| m.peer_urls.contains(&peer)) {
            if !m.learner {
                return Err(AgentError::refused(
                    Refusal::Membership,
                    format!("{name} is an etcd voter already (its configuration says client)"),
                ));
            }
            etcd_members::remove(&client, m.id)
                .await
                .map_err(etcd_err(format!("Remove {name}'s old learner")))?;
        }
        let added = etcd_members::while_unhealthy(|| {
            let mut c = client.clone();
            let peer = peer.clone();
            async move {
                c.member_add(
                    [peer.as_str()],
                    Some(etcd_client::MemberAddOptions::new().with_is_learner()),
                )
                .await
            }
        })
        .await
        .map_err(etcd_err(format!("Add {name} to etcd as a learner")))?;
        let id = added.member().map(|m| m.id()).ok_or_else(|| {
            AgentError::failed(Failure::Internal, "etcd added a member without naming it")
        })?;
        let initial: Vec<String> = added
            .member_list()
            .iter()
            .filter_map(|m| {
                let n = if m.id() == id {
                    name.as_str()
                } else {
                    m.name()
                };
                Some(format!("{n}={}", m.peer_urls().first()?))
            })
            .collect();
        let mut cfg = link.cfg.clone();
        cfg.initial_cluster = initial.join(",");
        cfg.managed_etcd = true;
        let own = client_url(&cfg.address);
        cfg.endpoints.retain(|e| *e != own);
        cfg.endpoints.insert(0, own);
        let paths = etcd_paths(&self.cfg().state_dir, &self.cfg().run_dir);
        let started = self.start_learner(&client, id, &cfg, &paths).await;
        if let Err(e) = started {
            tracing::warn!(error = %crate::error_chain(&e).join(": "), "promotion failed; taking the learner back");
            let _ = etcd_members::remove(&client, id).await;
            member::stop(&paths.pidfile, &paths.data).await;
            let _ = std::fs::remove_dir_all(&paths.data);
            return Err(e);
        }
        save_config(&self.cfg().state_dir, &cfg)?;
        self.events().emit(
            None,
            "cluster",
            format!("{name} is an etcd voter now; the daemon restarts on it (VMs keep running)"),
        );
        self.request_restart();
        Ok(cfg)
    }

    async fn start_learner(
        &self,
        client: &etcd_client::Client,
        id: u64,
        cfg: &ferry_types::ClusterConfig,
        paths: &crate::membership::EtcdPaths,
    ) -> Result<()> {
        let pki = &self.cfg().pki;
        let _ = std::fs::remove_dir_all(&paths.data);
        let mc = member_config(cfg, paths, false, pki);
        member::spawn("etcd", &mc, &paths.log, &paths.pidfile).await?;
        // A learner serves no reads: it has caught up when etcd lets it be promoted.
        let t = Instant::now();
        loop {
            match etcd_members::promote(client, id, Some(&etcd_tls(pki))).await {
                Ok(_) => break,
                Err(e) if t.elapsed() < CATCH_UP => {
                    tracing::debug!(error = %e, "learner not promoted yet");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(etcd_err("Promote the learner to a voter")(e)),
            }
        }
        member::wait_healthy(
            &cfg.name,
            &mc.client_url,
            Some(&etcd_tls(pki)),
            &paths.log,
            Duration::from_secs(30),
        )
        .await?;
        Ok(())
    }

    /// Whether this host's etcd member is still one of etcd's members (asked of the
    /// others). None when they cannot say (no quorum, unreachable).
    pub(crate) async fn own_member_kept(&self) -> Option<bool> {
        let link = self.cluster()?;
        let list = etcd_members::list(&link.etcd().ok()?.client()).await.ok()?;
        let peer = peer_url(&link.cfg.address);
        Some(
            list.iter()
                .any(|m| m.name == link.cfg.name || m.peer_urls.contains(&peer)),
        )
    }

    /// This host's member was removed while it was away (another host voted in its
    /// place): it becomes a client of the voters — its member stopped and its data
    /// gone, the configuration written, the daemon restarted on it.
    pub(crate) async fn become_client(&self) -> Result<()> {
        let link = self.cluster_link()?;
        let list = etcd_members::list(&link.etcd()?.client())
            .await
            .map_err(etcd_err("List etcd members"))?;
        let endpoints: Vec<String> = list
            .iter()
            .filter(|m| !m.learner)
            .flat_map(|m| m.client_urls.iter().cloned())
            .collect();
        if endpoints.is_empty() {
            return Err(AgentError::refused(
                Refusal::Membership,
                "etcd lists no voters to be a client of",
            ));
        }
        let paths = etcd_paths(&self.cfg().state_dir, &self.cfg().run_dir);
        member::stop(&paths.pidfile, &paths.data).await;
        let _ = std::fs::remove_dir_all(&paths.data);
        let mut cfg = link.cfg.clone();
        cfg.managed_etcd = false;
        cfg.initial_cluster = String::new();
        cfg.endpoints = endpoints;
        save_config(&self.cfg().state_dir, &cfg)?;
        self.events().emit(
            None,
            "cluster",
            format!(
                "{}'s etcd member was replaced while it was away: it is a client of the voters now",
                cfg.name
            ),
        );
        self.request_restart();
        Ok(())
    }
}
