//! HA at run time: every agent with a lease runs the local part (restart its crashed HA
//! VMs with back-off, give up after `max_restarts` within 10 minutes and ask for a
//! relocation); the one elected manager (key `/cluster/ha/manager` under its lease)
//! reads the cluster, lets [`ferry_ha::plan`] decide and carries the commands out by
//! compare-and-swap: a VM's record moves from the dead host's subtree to the target's
//! only if the dead host still has no lease and the record is unchanged. The target
//! then starts it, taking its disk locks over from the dead host.

use crate::error::Result;
use crate::records::Transit;
use crate::records::VmRecord;
use crate::Cluster;
use ferry_ha::{Command, HostView, VmView};
use ferry_store::{keys, Cmp, Compare, KeyValue, Op, StoreJson, Txn};
use ferry_types::VmState;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::lease::Alive;
use keys::cluster::{ALIVE, MANAGER};

const TICK: Duration = Duration::from_millis(250);
/// The campaign reads the manager key this often even when its watch says nothing.
const MANAGER_READ: Duration = Duration::from_secs(2);
const RESTART_WINDOW: Duration = Duration::from_secs(600);

/// A full manager round (every VM record of every host) at least this often; in
/// between only the hosts' leases are read, unless one is missing.
const FULL_ROUND: Duration = Duration::from_secs(2);

/// Crash restarts per VM on this host (in memory).
#[derive(Default)]
pub(crate) struct Restarts(HashMap<String, Vec<Instant>>);

/// Should an HA VM in this state be running?
use crate::gate::wanted;

/// Hosts, VMs, and each VM's record with its revision by (host, name).
type HaView = (
    Vec<HostView>,
    Vec<VmView>,
    HashMap<(String, String), (Arc<VmRecord>, i64)>,
);

/// What the HA manager sees of one VM record (`None`: not its business: a template,
/// a VM arriving somewhere).
fn vm_view(host: &str, rec: &VmRecord) -> Option<VmView> {
    if Transit::from(&rec.transit).is_some() || rec.template {
        return None;
    }
    Some(VmView {
        name: rec.spec.name.clone(),
        host: host.to_string(),
        ha: rec.spec.ha.clone(),
        memory_bytes: rec.spec.memory_mib << 20,
        running: rec.last_state.has_process(),
        wanted: wanted(rec.last_state),
        relocate: rec.ha_relocate,
    })
}

fn decode(kv: &KeyValue) -> Option<VmRecord> {
    serde_json::from_slice(&kv.value).ok()
}

impl Cluster {
    #[tracing::instrument(skip_all)]
    pub(crate) async fn ha_loop(self) {
        // The manager wakes at once when a lease ends (its alive key's delete reaches
        // the cache's watch), else every tick.
        let mut leases = self.cluster().map(|c| c.cache().alive.subscribe());
        loop {
            match &mut leases {
                Some(rx) if self.inner.ha.is_manager.load(Ordering::Relaxed) => {
                    if let Ok(Err(_)) = tokio::time::timeout(TICK, rx.changed()).await {
                        tokio::time::sleep(TICK).await; // the cache is gone
                    }
                }
                _ => tokio::time::sleep(TICK).await,
            }
            if !self.holds_lease() {
                continue;
            }
            let r = self.local_round().await;
            if let Err(e) = &r {
                tracing::debug!(error = %e, "HA local round");
            }
            self.loops().report(
                "ha-local",
                TICK,
                r.map_err(|e| crate::error_chain(&e).join(": ")),
            );
            if self.cluster().is_none() {
                continue; // one host: crash restarts only
            }
            // The campaign (`campaign_loop`) says whether this host manages.
            if self.inner.ha.is_manager.load(Ordering::Relaxed) {
                let r = self.manager_round().await;
                if let Err(e) = &r {
                    tracing::warn!(error = %e, "HA manager round");
                }
                self.loops().report(
                    "ha-manager",
                    TICK,
                    r.map_err(|e| crate::error_chain(&e).join(": ")),
                );
            }
        }
    }

    /// The HA manager election: campaign once, then wait for the manager key to go (a
    /// delete: the manager's lease ended) before campaigning again — no transaction
    /// every tick, as etcd's own election recipe does. Sets `is_manager` (the HA loop
    /// and DRS read it). A read of the key every [`MANAGER_READ`] covers a
    /// watch that stalled without ending.
    #[tracing::instrument(skip_all)]
    pub(crate) async fn campaign_loop(self) {
        let Ok(link) = self.cluster_link().cloned() else {
            return;
        };
        loop {
            let Some(lease) = self.lease_id().filter(|_| self.holds_lease()) else {
                self.set_manager(false);
                tokio::time::sleep(TICK).await;
                continue;
            };
            // Watch from before the campaign: no delete after it goes unseen.
            let watch = match link.root.revision().await {
                Ok(rev) => link.root.watch(MANAGER, Some(rev)).await,
                Err(e) => Err(e),
            };
            let won = self.try_manager().await;
            let (mut watch, won) = match (watch, won) {
                (Ok(w), Ok(won)) => (w, won),
                (w, won) => {
                    let e = match (w.err(), won.err()) {
                        (Some(e), _) => e.to_string(),
                        (_, Some(e)) => crate::error_chain(&e).join(": "),
                        _ => String::new(),
                    };
                    tracing::debug!(error = %e, "HA manager campaign");
                    self.set_manager(false);
                    tokio::time::sleep(TICK).await;
                    continue;
                }
            };
            self.set_manager(won);
            let mut since_read = Instant::now();
            // A watch that ends at once (a store going away) must not turn this into a
            // loop of transactions.
            tokio::time::sleep(TICK).await;
            loop {
                tokio::select! {
                    ev = watch.recv() => match ev {
                        None => break,
                        Some(ev) if ev.kind == ferry_store::EventKind::Delete => break,
                        Some(_) => {}
                    },
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {
                        let same = self.lease_id() == Some(lease) && self.holds_lease();
                        if !same {
                            break;
                        }
                        // A watch that stalled without ending: a read (no raft
                        // proposal, unlike a campaign) sees the key gone.
                        if since_read.elapsed() >= MANAGER_READ {
                            since_read = Instant::now();
                            if matches!(link.root.get(MANAGER).await, Ok(None)) {
                                break;
                            }
                        }
                    }
                }
            }
        }
    }

    fn set_manager(&self, now: bool) {
        self.inner.ha.is_manager.store(now, Ordering::Relaxed);
    }

    /// Restarts this host's crashed HA VMs (back-off 1, 2, 4 ... s), or marks them for
    /// relocation after too many restarts.
    async fn local_round(&self) -> Result<()> {
        // The scan reads the cache when it is in sync (each restart re-reads its record
        // under the VM's lock before it acts), so an idle host reads nothing.
        let records = match self.cluster().and_then(|c| c.synced_cache()) {
            Some(c) => c.vms_of(self.host_name()),
            None => self.records().await?.into_iter().map(Arc::new).collect(),
        };
        for rec in records {
            let name = rec.spec.name.clone();
            if !rec.spec.ha.enabled()
                || rec.template
                || rec.transit.is_some()
                || rec.ha_relocate
                || !wanted(rec.last_state)
            {
                continue;
            }
            let slot = self.slot(&name);
            if slot.with(|rt| rt.pid.is_some()) || slot.op.try_lock().is_err() {
                continue; // running, or someone works on it
            }
            let now = Instant::now();
            let (count, last) = {
                let mut r = self
                    .inner
                    .ha
                    .restarts
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                let v = r.0.entry(name.clone()).or_default();
                v.retain(|t| now.duration_since(*t) < RESTART_WINDOW);
                (v.len(), v.last().copied())
            };
            if u32::try_from(count).unwrap_or(u32::MAX) >= rec.spec.ha.max_restarts {
                if self.cluster().is_some() {
                    self.mark_relocate(&name).await?;
                }
                continue;
            }
            if let Some(last) = last {
                let backoff = Duration::from_secs(1 << count.min(6));
                if now.duration_since(last) < backoff {
                    continue;
                }
            }
            self.inner
                .ha
                .restarts
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .0
                .entry(name.clone())
                .or_default()
                .push(now);
            let why = rec.last_exit.clone().unwrap_or_default();
            self.events().emit(
                Some(&name),
                "ha",
                format!(
                    "HA restart {} of {} ({why})",
                    count + 1,
                    rec.spec.ha.max_restarts
                ),
            );
            let agent = self.clone();
            tokio::spawn(async move {
                // Decided on records read before this round (the cache's): under the
                // VM's lock, the record read again, the restart happens only if it is
                // still wanted (a user may have stopped the VM in between; a stop is
                // never undone; a migration or relocation may have begun).
                let op = agent.lock_vm(&name).await;
                let slot = op.slot().clone();
                match agent.record(&name).await {
                    Ok((r, _))
                        if r.spec.ha.enabled()
                            && wanted(r.last_state)
                            && !r.template
                            && r.transit.is_none()
                            && !r.ha_relocate
                            && slot.with(|rt| rt.pid.is_none()) => {}
                    _ => return,
                }
                let started = agent
                    .start_held(&op, crate::gate::StartOrigin::HaRestart)
                    .await;
                if let Err(e) = started {
                    agent.events().emit(
                        Some(&name),
                        "ha",
                        format!("HA restart failed: {}", crate::error_chain(&e).join(": ")),
                    );
                }
            });
        }
        Ok(())
    }

    async fn mark_relocate(&self, name: &str) -> Result<()> {
        let (mut rec, rev) = self.record(name).await?;
        if rec.ha_relocate {
            return Ok(());
        }
        rec.ha_relocate = true;
        if self
            .store()
            .cas_json(&crate::records::vm_key(name), rev, &rec)
            .await?
        {
            self.events().emit(
                Some(name),
                "ha",
                format!(
                    "{} restarts within 10 min: HA moves it to another host",
                    rec.spec.ha.max_restarts
                ),
            );
        }
        Ok(())
    }

    /// Becomes (or stays) the HA manager if nobody else is.
    async fn try_manager(&self) -> Result<bool> {
        let link = self.cluster_link()?;
        let Some(lease) = self.lease_id() else {
            return Ok(false);
        };
        let me = serde_json::to_vec(self.host_name()).expect("serialises");
        let r = link
            .root
            .txn(Txn {
                compare: vec![Compare::Version(MANAGER.into(), Cmp::Equal, 0)],
                success: vec![Op::Put {
                    key: MANAGER.into(),
                    value: me.clone(),
                    lease: Some(lease),
                }],
                failure: vec![Op::Get(MANAGER.into())],
            })
            .await?;
        if r.succeeded {
            self.events().emit(
                None,
                "ha",
                format!("{} is the HA manager", self.host_name()),
            );
            return Ok(true);
        }
        Ok(r.gets
            .first()
            .and_then(|g| g.as_ref())
            .is_some_and(|kv| kv.value == me))
    }

    /// What the HA manager decides on: each member's lease, maintenance and memory,
    /// and the VMs it owns (with their records and revisions, for the moves). From the
    /// cluster cache when it is in sync (the moves compare against the store, so a
    /// view a moment old only makes a move fail and come again next round), else read.
    async fn ha_view(
        &self,
        link: &ferry_host::ClusterLink,
        members: &[ferry_types::ClusterHost],
        cache: Option<&ferry_host::cache::ClusterCache>,
    ) -> Result<HaView> {
        let root = link.root.as_ref();
        let mut hosts = vec![];
        let mut vms = vec![];
        let mut records = HashMap::new();
        for h in members {
            let (alive, maintenance, recs) = match cache {
                Some(c) => (
                    c.alive(&h.name),
                    c.maintenance(&h.name),
                    c.vms_of_at(&h.name),
                ),
                None => {
                    let alive = root
                        .get_json::<Alive>(&ferry_store::keys::cluster::alive(&h.name))
                        .await?
                        .map(|(a, _)| a);
                    // Stored `false` after maintenance ends.
                    let maintenance = root
                        .get_json::<bool>(&keys::cluster::of_host(&h.name, keys::host::MAINTENANCE))
                        .await?
                        .is_some_and(|(m, _)| m);
                    let recs = root
                        .list(&keys::cluster::of_host(&h.name, keys::host::VMS))
                        .await?
                        .iter()
                        .filter_map(|kv| Some((Arc::new(decode(kv)?), kv.mod_rev)))
                        .collect();
                    (alive, maintenance, recs)
                }
            };
            hosts.push(HostView {
                name: h.name.clone(),
                alive: alive.is_some(),
                maintenance,
                memory_bytes: alive.map_or(0, |a| a.memory_bytes),
            });
            for (rec, rev) in recs {
                let Some(view) = vm_view(&h.name, &rec) else {
                    continue;
                };
                if let Some(to) = Transit::to(&rec.transit) {
                    // Mid-migration: the destination may own it by now; leave it to
                    // the migration's own recovery while the destination has a copy
                    // (read from the store: the cache may not show the copy yet).
                    let there = root
                        .get(&keys::cluster::of_host(to, &keys::host::vm(&rec.spec.name)))
                        .await?;
                    if there.is_some() {
                        continue;
                    }
                }
                vms.push(view);
                records.insert((h.name.clone(), rec.spec.name.clone()), (rec, rev));
            }
        }
        Ok((hosts, vms, records))
    }

    /// One manager round: read the cluster, plan, carry out. Cheap while every host
    /// holds its lease (from the cache, or two reads); everything is looked at when one
    /// does not (with the cache: when it changed), and every [`FULL_ROUND`]
    /// (relocation requests, fenced marks).
    async fn manager_round(&self) -> Result<()> {
        let link = self.cluster_link()?;
        let root = &link.root;
        // Every tick: from the cache (fed by watches: a lease's expiry arrives as the
        // delete of its alive key) when in sync, else two reads.
        let (members, alive, seen) = match link.synced_cache() {
            Some(c) => (
                c.members(),
                c.alive.read(|e| e.map.len()),
                (c.alive.generation(), c.hosts.generation()),
            ),
            None => (link.members().await?, root.list(ALIVE).await?.len(), (0, 0)),
        };
        {
            let mut last = self
                .inner
                .ha
                .full_round
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let recent = last.is_some_and(|(t, _)| t.elapsed() < FULL_ROUND);
            // With a host down, a round whenever the cache changed (from memory).
            let unchanged = seen != (0, 0) && last.is_some_and(|(_, s)| s == seen);
            if recent && (alive >= members.len() || unchanged) {
                return Ok(());
            }
            *last = Some((Instant::now(), seen));
        }
        // A full round checks the cache against the store's leases (one small read): a
        // watch that stalled without ending must not hide a dead host. Behind, the
        // round reads the store.
        let mut members = members;
        let cache = match link.synced_cache() {
            Some(c) => {
                let stored: Vec<String> = root
                    .list(ALIVE)
                    .await?
                    .into_iter()
                    .map(|kv| kv.key[ALIVE.len()..].to_string())
                    .collect();
                let cached: Vec<String> = c.alive.read(|e| e.map.keys().cloned().collect());
                if stored == cached {
                    Some(c)
                } else {
                    tracing::info!(
                        ?stored,
                        ?cached,
                        "HA: the cache's leases lag the store's; reading the store"
                    );
                    members = link.members().await?;
                    None
                }
            }
            None => None,
        };
        let (hosts, vms, records) = self.ha_view(link, &members, cache).await?;
        // ferry-ha decides which VMs go (and in which order); DRS placement where
        // (rules, labels, CPU and memory), one answer, updated as it places. Without
        // a DRS snapshot, ferry-ha's memory-only placer.
        let due = ferry_ha::select(&hosts, &vms);
        let cmds = if due.is_empty() {
            vec![]
        } else {
            match (self.drs_snapshot().await, self.drs_config().await) {
                (Ok((mut c, _)), Ok(cfg)) => ferry_ha::plan_with(&hosts, &vms, |r| {
                    ferry_drs::place_away(&mut c, &r.vm, &r.from, &cfg)
                }),
                (snap, cfg) => {
                    let e = snap
                        .err()
                        .or(cfg.err())
                        .map(|e| crate::error_chain(&e).join(": "));
                    tracing::warn!(error = ?e, "HA: no DRS snapshot; placing by memory only");
                    ferry_ha::plan(&hosts, &vms)
                }
            }
        };
        let mut no_place = std::collections::BTreeMap::new();
        for cmd in cmds {
            match cmd {
                Command::Recover { vm, from, to } | Command::Relocate { vm, from, to } => {
                    let Some((rec, rev)) = records.get(&(from.clone(), vm.clone())) else {
                        continue;
                    };
                    let dead = !hosts.iter().any(|h| h.name == from && h.alive);
                    self.move_owner((**rec).clone(), *rev, &from, &to, dead)
                        .await?;
                }
                Command::NoPlace { vm, reason } => {
                    tracing::warn!(vm, reason, "HA: no host can take the VM now");
                    no_place.insert(vm, reason);
                }
            }
        }
        self.report_no_place(no_place);
        // Host states for `cluster status`: fenced while dead with HA VMs it owned.
        for h in &hosts {
            let key = ferry_store::keys::cluster::fenced(&h.name);
            let had_ha = vms.iter().any(|v| v.host == h.name && v.ha.enabled());
            // The cache says whether the mark is there (a stale answer costs a read or
            // an idempotent write, nothing more).
            let marked = match cache {
                Some(c) => c.fenced(&h.name),
                None => root.get(&key).await?.is_some(),
            };
            if h.alive {
                if marked {
                    root.delete(&key).await?;
                }
            } else if had_ha && !marked && root.get(&key).await?.is_none() {
                root.put_json(&key, &self.host_name()).await?;
                self.events().emit(
                    None,
                    "ha",
                    format!("host {} lost its lease: fenced", h.name),
                );
            }
        }
        Ok(())
    }

    /// Tells the event log about VMs HA cannot place, once per VM and reason (the
    /// round repeats every few seconds).
    fn report_no_place(&self, now: std::collections::BTreeMap<String, String>) {
        let mut last = self
            .inner
            .ha
            .no_place
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for (vm, reason) in &now {
            if last.get(vm) != Some(reason) {
                self.events().emit(
                    Some(vm),
                    "ha",
                    format!("no host can take {vm} now: {reason}"),
                );
            }
        }
        *last = now;
    }

    /// Moves `rec` from host `from` to `to` in one transaction: only if `from` still has
    /// no lease (when it is dead), the record is unchanged and `to` has no VM of that name.
    async fn move_owner(
        &self,
        mut rec: VmRecord,
        rev: i64,
        from: &str,
        to: &str,
        dead: bool,
    ) -> Result<()> {
        let root = &self.cluster_link()?.root;
        let name = rec.spec.name.clone();
        let from_key = keys::cluster::of_host(from, &keys::host::vm(&name));
        let to_key = keys::cluster::of_host(to, &keys::host::vm(&name));
        rec.last_state = VmState::Crashed;
        rec.last_exit = Some(if dead {
            format!("host {from} failed; restarted by HA on {to}")
        } else {
            format!("crashed repeatedly on {from}; moved by HA to {to}")
        });
        rec.ha_from = Some(from.to_string());
        rec.ha_relocate = false;
        rec.transit = None;
        let mut compare = vec![
            Compare::ModRev(from_key.clone(), Cmp::Equal, rev),
            Compare::Version(to_key.clone(), Cmp::Equal, 0),
            Compare::Version(ferry_store::keys::cluster::alive(to), Cmp::Greater, 0),
        ];
        if dead {
            compare.push(Compare::Version(
                ferry_store::keys::cluster::alive(from),
                Cmp::Equal,
                0,
            ));
        }
        let mut success = vec![
            Op::Delete(from_key),
            Op::Put {
                key: to_key,
                value: serde_json::to_vec(&rec).expect("serialises"),
                lease: None,
            },
        ];
        // The snapshot tree goes along (the snapshots live in the shared volumes).
        let snaps = keys::cluster::of_host(from, &keys::host::snapshots(&name));
        for kv in root.list(&snaps).await? {
            let rest = &kv.key[snaps.len()..];
            success.push(Op::Put {
                key: keys::cluster::of_host(to, &keys::host::snapshot(&name, rest)),
                value: kv.value,
                lease: None,
            });
        }
        success.push(Op::DeletePrefix(snaps));
        let r = root
            .txn(Txn {
                compare,
                success,
                failure: vec![],
            })
            .await?;
        if r.succeeded {
            tracing::info!(vm = %name, from, to, "HA moved the VM");
            self.events().emit(
                Some(&name),
                "ha",
                format!(
                    "HA: {name} from {from} to {to} ({})",
                    rec.last_exit.unwrap_or_default()
                ),
            );
        }
        Ok(())
    }
}
