//! Replicated pools in the agent: the cluster's record of each volume in etcd
//! (`/cluster/replicas/{pool}/{volume}`: primary, generation, outdated copies, split
//! brain), this host's [`ferry_replica::Service`] holding its copies, and the moments
//! the primary changes — VM start (promote), stop (demote), live migration (the source
//! hands over at switchover), HA (the survivor takes over from a host without lease).
//!
//! Every promotion is a compare-and-swap on the record: only a copy that is up to date
//! (not outdated, at the record's generation) may become primary, and only while no
//! other host is, unless that host was fenced (HA) or is handing over (migration), or
//! the admin forces it.

use crate::error::{AgentError, Failure, Refusal, Result};
use crate::Host;
use ferry_replica::{Report, Service};
use ferry_store::StoreJson;
use ferry_types::{
    GenId, LocalCopy, PoolKind, PoolSpec, ReplicaOrError, ReplicaStatus, ReplicatedVolume,
    ReplicationStatus, VerifyReport, VmSpec, Volume,
};
use std::net::SocketAddr;
use std::sync::{Arc, Weak};

fn key(pool: &str, vol: &str) -> String {
    format!("{pool}/{vol}")
}

fn split(k: &str) -> (&str, &str) {
    k.split_once('/').unwrap_or((k, ""))
}

/// What the replication engine asks of the cluster, answered from etcd.
pub struct ReplCluster {
    agent: Weak<crate::Inner>,
    /// The host's certificates: the replication link is mutual TLS.
    pki: ferry_pki::HostPki,
    server_tls: Arc<rustls::ServerConfig>,
}

impl ReplCluster {
    fn agent(&self) -> std::result::Result<Host, String> {
        self.agent
            .upgrade()
            .map(|inner| Host { inner })
            .ok_or_else(|| "the agent is shutting down".to_string())
    }
}

#[async_trait::async_trait]
impl ferry_replica::Cluster for ReplCluster {
    fn client_tls(&self, host: &str) -> Option<Arc<rustls::ClientConfig>> {
        Some(Arc::new(crate::link::peer_tls(&self.pki, host)))
    }

    fn server_tls(&self) -> Option<Arc<rustls::ServerConfig>> {
        Some(self.server_tls.clone())
    }

    async fn current_cert(&self, host: &str, serial: Option<&str>) -> bool {
        match self.agent() {
            Ok(a) => a.peer_allowed(host, serial).await,
            Err(_) => false,
        }
    }

    async fn outdate(&self, volume: &str, peer: &str) -> std::result::Result<(), String> {
        let a = self.agent()?;
        let (pool, vol) = split(volume);
        let me = a.host_name().to_string();
        a.update_replica_record(pool, vol, |r| {
            if r.primary.as_deref() != Some(&me) {
                return Err(AgentError::refused(
                    Refusal::Replica,
                    format!("{me} is no longer primary of {volume}"),
                ));
            }
            r.outdated.insert(peer.to_string());
            Ok(())
        })
        .await
        .map(|_| ())
        .map_err(|e| crate::error_chain(&e).join(": "))
    }

    async fn up_to_date(&self, volume: &str, peer: &str) -> std::result::Result<(), String> {
        let a = self.agent()?;
        let (pool, vol) = split(volume);
        let me = a.host_name().to_string();
        a.update_replica_record(pool, vol, |r| {
            if r.primary.as_deref() == Some(&me) {
                r.outdated.remove(peer);
            }
            Ok(())
        })
        .await
        .map(|_| ())
        .map_err(|e| crate::error_chain(&e).join(": "))
    }

    async fn peer_addr(&self, host: &str) -> Option<SocketAddr> {
        let a = self.agent().ok()?;
        let h = a
            .cluster_hosts()
            .await
            .ok()?
            .into_iter()
            .find(|h| h.name == host)?;
        let ip: std::net::IpAddr = h.address.parse().ok()?;
        Some(SocketAddr::new(ip, a.inner.cfg.replication_port))
    }

    fn report(&self, volume: &str, report: Report) {
        let Ok(a) = self.agent() else { return };
        let msg = match &report {
            Report::Degraded { peer } => {
                format!("{volume}: writing without {peer}; its copy is outdated")
            }
            Report::Resynced {
                peer,
                bytes,
                seconds,
            } => format!("{volume}: {peer} is up to date ({bytes} bytes resynced in {seconds:.1} s)"),
            Report::SplitBrain { peer, reason } => format!(
                "{volume}: split brain with {peer}: {reason}; nothing was discarded — pick the copy to keep with `ferry volume resolve`"
            ),
            Report::Stale { peer, reason } => {
                format!("{volume}: refused by {peer}: {reason}")
            }
        };
        a.inner.events.emit(None, "replication", msg);
        if let Report::SplitBrain { reason, .. } = report {
            let (pool, vol) = split(volume);
            let (pool, vol) = (pool.to_string(), vol.to_string());
            tokio::spawn(async move {
                let _ = a
                    .update_replica_record(&pool, &vol, |r| {
                        r.split_brain = Some(reason.clone());
                        Ok(())
                    })
                    .await;
            });
        }
    }
}

impl Host {
    /// Starts this host's replication service (etcd clusters only): listens for
    /// primaries on the replication port and opens every copy this host keeps.
    pub async fn start_replication(&self) -> Result<()> {
        if self.inner.cluster.is_none() {
            return Ok(());
        }
        let cluster = Arc::new(ReplCluster {
            agent: Arc::downgrade(&self.inner),
            pki: self.inner.cfg.pki.clone(),
            server_tls: self.inner.cfg.pki.server_config(true),
        });
        let svc = Service::new(
            self.host_name(),
            &self.inner.cfg.run_dir.join("nbd"),
            cluster,
        )
        .map_err(|source| AgentError::Io {
            what: "Start the replication thread".into(),
            source,
        })?;
        let addr = match self.own_address().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "no cluster address: replicated pools are not served");
                return Ok(());
            }
        };
        let ip: std::net::IpAddr = addr.parse().map_err(|_| {
            AgentError::failed(
                Failure::Corrupt,
                format!("cluster address {addr} is not an IP"),
            )
        })?;
        let bound = svc
            .listen(SocketAddr::new(ip, self.inner.cfg.replication_port))
            .map_err(|source| AgentError::Io {
                what: format!(
                    "Listen for replication on {ip}:{}",
                    self.inner.cfg.replication_port
                ),
                source,
            })?;
        tracing::info!(%bound, "replication service ready");
        let _ = self.inner.replication.set(svc);
        self.open_replicas().await
    }

    pub fn replication(&self) -> Result<&Arc<Service>> {
        self.inner.replication.get().ok_or_else(|| {
            AgentError::refused(
                Refusal::Membership,
                "replicated pools need an etcd cluster (ferry cluster init / join)",
            )
        })
    }

    /// Opens the copies of every replicated volume naming this host (a missing copy is
    /// created empty and synced in full); re-promotes those this host was primary of
    /// (their QEMU reconnects to the socket).
    async fn open_replicas(&self) -> Result<()> {
        let me = self.host_name().to_string();
        let pools: Vec<PoolSpec> = self
            .pool_specs()
            .await?
            .into_iter()
            .filter(|p| p.kind == PoolKind::Replicated && p.hosts.contains(&me))
            .collect();
        for p in pools {
            for r in self.replica_records(&p.name).await? {
                if !r.hosts.contains(&me) {
                    continue;
                }
                if let Err(e) = self.open_copy(&p, &r.name, r.size, None) {
                    tracing::error!(volume = %key(&p.name, &r.name), error = %e, "cannot open the copy");
                    continue;
                }
                if r.primary.as_deref() == Some(&me) {
                    if let Err(e) = self.promote_volume(&p.name, &r.name, false).await {
                        tracing::error!(volume = %key(&p.name, &r.name), error = %e, "cannot resume as primary");
                    }
                }
            }
        }
        Ok(())
    }

    fn open_copy(
        &self,
        pool: &PoolSpec,
        vol: &str,
        size: u64,
        generation: Option<GenId>,
    ) -> Result<Arc<ferry_replica::Replica>> {
        self.replication()?
            .open(
                &key(&pool.name, vol),
                &self.copy_dir(pool),
                vol,
                Some((size, generation)),
            )
            .map_err(repl_err)
    }

    /// Where this host keeps a replicated pool's copies: its path, `{host}` replaced by
    /// this host's name (hosts sharing one file system, like the lab's).
    pub fn copy_dir(&self, pool: &PoolSpec) -> std::path::PathBuf {
        std::path::PathBuf::from(pool.path.replace("{host}", self.host_name()))
    }

    fn record_key(&self, pool: &str, vol: &str) -> String {
        let (_, prefix) = self.shared();
        ferry_store::keys::shared::replica(prefix, pool, vol)
    }

    pub async fn replica_records(&self, pool: &str) -> Result<Vec<ReplicatedVolume>> {
        let (store, prefix) = self.shared();
        Ok(store
            .list_json::<ReplicatedVolume>(&ferry_store::keys::shared::replicas(prefix, pool))
            .await?)
    }

    pub async fn replica_record(&self, pool: &str, vol: &str) -> Result<ReplicatedVolume> {
        let (store, _) = self.shared();
        store
            .get_json::<ReplicatedVolume>(&self.record_key(pool, vol))
            .await?
            .map(|(r, _)| r)
            .ok_or_else(|| AgentError::NotFound(format!("Volume {pool}/{vol}")))
    }

    /// Changes a volume's record by compare-and-swap (retried on a concurrent change).
    pub async fn update_replica_record(
        &self,
        pool: &str,
        vol: &str,
        f: impl FnMut(&mut ReplicatedVolume) -> Result<()>,
    ) -> Result<ReplicatedVolume> {
        self.update_replica_record_if(pool, vol, None, f).await
    }

    /// The same, and with `lease_gone`: only while that host holds no lease (part of
    /// the compare, so a host that comes back in between keeps its term).
    pub async fn update_replica_record_if(
        &self,
        pool: &str,
        vol: &str,
        lease_gone: Option<&str>,
        mut f: impl FnMut(&mut ReplicatedVolume) -> Result<()>,
    ) -> Result<ReplicatedVolume> {
        use ferry_store::{Cmp, Compare, Op, Txn};
        let (store, _) = self.shared();
        let k = self.record_key(pool, vol);
        let alive = lease_gone
            .filter(|_| self.inner.cluster.is_some())
            .map(ferry_store::keys::cluster::alive);
        for _ in 0..20 {
            let Some((mut r, kv)) = store.get_json::<ReplicatedVolume>(&k).await? else {
                return Err(AgentError::NotFound(format!("Volume {pool}/{vol}")));
            };
            f(&mut r)?;
            let mut compare = vec![Compare::ModRev(k.clone(), Cmp::Equal, kv.mod_rev)];
            if let Some(a) = &alive {
                compare.push(Compare::Version(a.clone(), Cmp::Equal, 0));
            }
            let done = store
                .txn(Txn {
                    compare,
                    success: vec![Op::Put {
                        key: k.clone(),
                        value: serde_json::to_vec(&r).expect("a volume record serialises"),
                        lease: None,
                    }],
                    failure: vec![],
                })
                .await?;
            if done.succeeded {
                return Ok(r);
            }
            if let (Some(a), Some(h)) = (&alive, lease_gone) {
                if store.get(a).await?.is_some() {
                    return Err(AgentError::refused(
                        Refusal::Replica,
                        format!(
                            "{h} holds its lease again: its term on {pool}/{vol} is not taken over"
                        ),
                    ));
                }
            }
        }
        Err(AgentError::refused(
            Refusal::Busy,
            format!("the record of {pool}/{vol} keeps changing; try again"),
        ))
    }

    /// Creates a volume on every host of a replicated pool (all or nothing).
    pub async fn create_replicated_volume(
        &self,
        pool: &PoolSpec,
        name: &str,
        size: u64,
    ) -> Result<Volume> {
        self.replication()?;
        let gen = GenId {
            n: 1,
            host: self.host_name().to_string(),
        };
        let rec = ReplicatedVolume {
            pool: pool.name.clone(),
            name: name.to_string(),
            size,
            hosts: pool.hosts.clone(),
            primary: None,
            max_n: gen.n,
            generation: gen.clone(),
            promoted_from: None,
            outdated: Default::default(),
            split_brain: None,
            disconnected: false,
        };
        let (store, _) = self.shared();
        if !store
            .create_json(&self.record_key(&pool.name, name), &rec)
            .await?
        {
            return Err(AgentError::refused(
                Refusal::Exists,
                format!("Volume {}/{name} already exists", pool.name),
            ));
        }
        let copy = LocalCopy {
            pool: pool.name.clone(),
            volume: name.to_string(),
            size,
            generation: Some(gen),
        };
        let mut made = vec![];
        for h in &pool.hosts {
            let r = self.make_copy(h, &copy).await;
            match r {
                Ok(()) => made.push(h.clone()),
                Err(e) => {
                    for m in &made {
                        let _ = self.drop_copy(m, &pool.name, name).await;
                    }
                    let _ = store.delete(&self.record_key(&pool.name, name)).await;
                    return Err(e);
                }
            }
        }
        self.inner.events.emit(
            None,
            "volume",
            format!(
                "volume {}/{name} created on {}",
                pool.name,
                pool.hosts.join(", ")
            ),
        );
        self.replicated_volume_info(&pool.name, name).await
    }

    async fn make_copy(&self, host: &str, copy: &LocalCopy) -> Result<()> {
        if host == self.host_name() {
            return self.local_copy_create(copy.clone()).await;
        }
        self.peer(host)
            .await?
            .post::<serde_json::Value>("/api/v1/replication/copies", copy)
            .await
            .map(|_| ())
    }

    async fn drop_copy(&self, host: &str, pool: &str, vol: &str) -> Result<()> {
        if host == self.host_name() {
            return self.local_copy_delete(pool, vol).await;
        }
        self.peer(host)
            .await?
            .post::<serde_json::Value>(
                &format!("/api/v1/replication/copies/{pool}/{vol}/delete"),
                &serde_json::json!({}),
            )
            .await
            .map(|_| ())
    }

    /// Host-to-host: creates this host's copy.
    pub async fn local_copy_create(&self, copy: LocalCopy) -> Result<()> {
        let pool = self.pool_spec(&copy.pool).await?;
        if pool.kind != PoolKind::Replicated || !pool.hosts.iter().any(|h| h == self.host_name()) {
            return Err(AgentError::refused(
                Refusal::Replica,
                format!("pool {} keeps no copy on {}", copy.pool, self.host_name()),
            ));
        }
        self.open_copy(&pool, &copy.volume, copy.size, copy.generation)?;
        Ok(())
    }

    /// Host-to-host: deletes this host's copy.
    pub async fn local_copy_delete(&self, pool: &str, vol: &str) -> Result<()> {
        let spec = self.pool_spec(pool).await?;
        let svc = self.replication()?;
        if svc.get(&key(pool, vol)).is_some_and(|r| r.is_primary()) {
            return Err(AgentError::refused(
                Refusal::InUse,
                format!("{pool}/{vol} is in use on {}", self.host_name()),
            ));
        }
        svc.close(&key(pool, vol), false).await.map_err(repl_err)?;
        ferry_replica::local::Local::remove_files(&self.copy_dir(&spec), vol);
        Ok(())
    }

    /// Host-to-host: this host's copy.
    pub fn local_copy_status(&self, pool: &str, vol: &str) -> Result<ReplicaStatus> {
        self.replication()?
            .status(&key(pool, vol))
            .map_err(repl_err)
    }

    /// Host-to-host: grows this host's copy.
    pub fn local_copy_grow(&self, pool: &str, vol: &str, size: u64) -> Result<()> {
        self.replication()?
            .grow(&key(pool, vol), size)
            .map_err(repl_err)
    }

    /// Host-to-host: the split-brain loser keeps its data aside and starts over.
    pub fn local_copy_discard(&self, pool: &str, vol: &str) -> Result<String> {
        self.replication()?
            .discard(&key(pool, vol))
            .map(|p| p.display().to_string())
            .map_err(repl_err)
    }

    pub async fn replicated_volume_info(&self, pool: &str, vol: &str) -> Result<Volume> {
        let r = self.replica_record(pool, vol).await?;
        let allocated = self
            .replication()
            .ok()
            .and_then(|s| s.status(&key(pool, vol)).ok())
            .map(|s| s.allocated_bytes)
            .unwrap_or(0);
        Ok(Volume {
            pool: pool.to_string(),
            name: vol.to_string(),
            format: "raw".into(),
            virtual_bytes: r.size,
            allocated_bytes: allocated,
        })
    }

    /// Deletes a volume and every copy; `check_users`: refuse while any VM of the
    /// cluster names it (off when its VM is being deleted).
    pub async fn delete_replicated_volume(
        &self,
        pool: &PoolSpec,
        vol: &str,
        check_users: bool,
    ) -> Result<()> {
        let r = self.replica_record(&pool.name, vol).await?;
        if let Some(p) = &r.primary {
            return Err(AgentError::refused(
                Refusal::InUse,
                format!("{}/{vol} is in use on {p}", pool.name),
            ));
        }
        if let Some(c) = self.inner.cluster.as_ref().filter(|_| check_users) {
            for m in c.members().await? {
                let recs = c
                    .root
                    .list_json::<crate::records::VmRecord>(&ferry_store::keys::cluster::of_host(
                        &m.name,
                        ferry_store::keys::host::VMS,
                    ))
                    .await?;
                for rec in recs {
                    if rec
                        .spec
                        .disks
                        .iter()
                        .any(|d| d.pool == pool.name && d.volume.as_deref() == Some(vol))
                    {
                        return Err(AgentError::refused(
                            Refusal::InUse,
                            format!(
                                "Volume {}/{vol} is used by VM {} on {}",
                                pool.name, rec.spec.name, m.name
                            ),
                        ));
                    }
                }
            }
        }
        let (store, _) = self.shared();
        store.delete(&self.record_key(&pool.name, vol)).await?;
        for h in &r.hosts {
            if let Err(e) = self.drop_copy(h, &pool.name, vol).await {
                tracing::warn!(host = %h, error = %e, "copy not removed; its host removes it when it opens its copies");
            }
        }
        Ok(())
    }

    pub async fn resize_replicated_volume(
        &self,
        pool: &PoolSpec,
        vol: &str,
        size: u64,
    ) -> Result<Volume> {
        let r = self.replica_record(&pool.name, vol).await?;
        if let Some(p) = &r.primary {
            return Err(AgentError::refused(
                Refusal::InUse,
                format!(
                    "{}/{vol} is in use on {p}; a replicated volume grows while nothing uses it",
                    pool.name
                ),
            ));
        }
        if size < r.size {
            return Err(ferry_storage::StorageError::Shrink {
                volume: format!("{}/{vol}", pool.name),
                from: r.size,
                to: size,
            }
            .into());
        }
        for h in &r.hosts {
            if h == self.host_name() {
                self.local_copy_grow(&pool.name, vol, size)?;
            } else {
                self.peer(h)
                    .await?
                    .post::<serde_json::Value>(
                        &format!("/api/v1/replication/copies/{}/{vol}/grow", pool.name),
                        &serde_json::json!({ "size": size }),
                    )
                    .await?;
            }
        }
        self.update_replica_record(&pool.name, vol, |r| {
            r.size = size;
            Ok(())
        })
        .await?;
        self.replicated_volume_info(&pool.name, vol).await
    }

    /// Makes this host primary of `pool/vol`: [`ferry_replica::promote::may_promote`]
    /// decides, a compare-and-swap on the record commits (with `takeover` from a fenced
    /// host: only while that host still holds no lease), then the engine's term starts.
    /// A term that cannot start takes the recorded generation back.
    pub async fn promote_volume(&self, pool: &str, vol: &str, force: bool) -> Result<GenId> {
        self.promote_volume_for(pool, vol, force, None).await
    }

    pub async fn promote_volume_for(
        &self,
        pool: &str,
        vol: &str,
        force: bool,
        takeover: Option<Takeover<'_>>,
    ) -> Result<GenId> {
        use ferry_replica::promote::{apply, may_promote, undo, Claim, CopyState, Promotion};
        let svc = self.replication()?;
        let k = key(pool, vol);
        let copy = svc.get(&k).ok_or_else(|| {
            AgentError::NotFound(format!("A copy of {k} on {}", self.host_name()))
        })?;
        let me = self.host_name().to_string();
        let claim = match (force, takeover) {
            (true, _) => Claim::Force,
            (false, Some(t)) => Claim::Takeover { from: t.host() },
            (false, None) => Claim::Normal,
        };
        let state = || CopyState {
            current: copy.local.current(),
            uptodate: copy.local.meta().uptodate,
            term: copy
                .primary()
                .filter(|p| !p.is_stopped())
                .map(|p| p.gen.clone()),
        };
        let refused = |e: Box<ferry_replica::promote::Refusal>| {
            AgentError::refused(Refusal::Replica, e.to_string())
        };
        // A running term the record names: nothing to write.
        if let Promotion::AlreadyPrimary(g) =
            may_promote(&self.replica_record(pool, vol).await?, &me, &state(), claim)
                .map_err(refused)?
        {
            return Ok(g);
        }
        let fenced = match takeover {
            Some(Takeover::Fenced(h)) => Some(h),
            _ => None,
        };
        let mut new = None;
        let rec = self
            .update_replica_record_if(pool, vol, fenced, |r| {
                let st = state();
                new = match may_promote(r, &me, &st, claim).map_err(refused)? {
                    Promotion::AlreadyPrimary(g) => Some((g, None)),
                    Promotion::New { generation } => {
                        let before = r.clone();
                        apply(r, &me, &st, &generation, force);
                        Some((generation, Some(before)))
                    }
                };
                Ok(())
            })
            .await?;
        let Some((gen, Some(before))) = new else {
            // Became primary meanwhile (another call): its term stands.
            return Ok(new.map(|(g, _)| g).expect("set by the update"));
        };
        copy.set_standalone(rec.disconnected);
        if let Err(e) = svc.promote(&k, gen.clone(), &rec.hosts, &rec.outdated, force) {
            let _ = self
                .update_replica_record(pool, vol, |r| {
                    undo(r, &me, &before, &gen);
                    Ok(())
                })
                .await;
            return Err(repl_err(e));
        }
        self.inner.events.emit(
            None,
            "replication",
            format!("{k}: {me} is primary (generation {gen})"),
        );
        Ok(gen)
    }

    /// Ends this host's term as primary of `pool/vol`.
    pub async fn demote_volume(&self, pool: &str, vol: &str) -> Result<()> {
        let svc = self.replication()?;
        let k = key(pool, vol);
        svc.demote(&k).await.map_err(repl_err)?;
        let me = self.host_name().to_string();
        self.update_replica_record(pool, vol, |r| {
            if r.primary.as_deref() == Some(&me) {
                r.primary = None;
            }
            Ok(())
        })
        .await?;
        Ok(())
    }

    /// (pool, volume) of every disk of `spec` on a replicated pool.
    pub async fn replicated_disks(&self, spec: &VmSpec) -> Result<Vec<(String, String)>> {
        let mut out = vec![];
        for d in &spec.disks {
            let (Some(vol), Ok(p)) = (&d.volume, self.pool_spec(&d.pool).await) else {
                continue;
            };
            if p.kind == PoolKind::Replicated {
                out.push((d.pool.clone(), vol.clone()));
            }
        }
        Ok(out)
    }

    /// Before QEMU starts: this host becomes primary of every replicated disk (all or
    /// none). `takeover_from`: a fenced host (HA) or a migration source.
    pub async fn acquire_replicas(
        &self,
        spec: &VmSpec,
        takeover: Option<Takeover<'_>>,
    ) -> Result<()> {
        let disks = self.replicated_disks(spec).await?;
        for (i, (pool, vol)) in disks.iter().enumerate() {
            if let Err(e) = self.promote_volume_for(pool, vol, false, takeover).await {
                for (p, v) in &disks[..i] {
                    let _ = self.demote_volume(p, v).await;
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// After QEMU ended (or left by migration): gives up this host's terms.
    pub async fn release_replicas(&self, spec: &VmSpec) {
        match self.replicated_disks(spec).await {
            Ok(disks) => {
                for (p, v) in disks {
                    if let Err(e) = self.demote_volume(&p, &v).await {
                        tracing::warn!(volume = %key(&p, &v), error = %e, "cannot end the term as primary");
                    }
                }
            }
            Err(e) => tracing::warn!(vm = %spec.name, error = %e, "replicated disks"),
        }
    }

    /// The record and every host's view of its copy.
    pub async fn replication_status(&self, pool: &str, vol: &str) -> Result<ReplicationStatus> {
        let rec = self.replica_record(pool, vol).await?;
        let mut replicas = vec![];
        for h in &rec.hosts {
            let r = if h == self.host_name() {
                self.local_copy_status(pool, vol)
            } else {
                match self
                    .peer_with_timeout(h, std::time::Duration::from_secs(3))
                    .await
                {
                    Ok(p) => {
                        p.get::<ReplicaStatus>(&format!("/api/v1/replication/copies/{pool}/{vol}"))
                            .await
                    }
                    Err(e) => Err(e),
                }
            };
            replicas.push(match r {
                Ok(s) => ReplicaOrError {
                    host: h.clone(),
                    replica: Some(s),
                    error: None,
                },
                Err(e) => ReplicaOrError {
                    host: h.clone(),
                    replica: None,
                    error: Some(crate::error_chain(&e).join(": ")),
                },
            });
        }
        Ok(ReplicationStatus {
            volume: rec,
            replicas,
        })
    }

    /// Online verify from the primary (this host).
    pub async fn verify_volume(&self, pool: &str, vol: &str) -> Result<Vec<VerifyReport>> {
        let reports = self
            .replication()?
            .verify(&key(pool, vol))
            .await
            .map_err(repl_err)?;
        for r in &reports {
            self.inner.events.emit(
                None,
                "replication",
                format!(
                    "{pool}/{vol}: verify against {}: {} bytes compared, {} chunks differ",
                    r.peer,
                    r.bytes_compared,
                    r.differing.len()
                ),
            );
        }
        Ok(reports)
    }

    /// Switches replication of a volume off (`disconnect`) or on again, cluster-wide.
    pub async fn set_volume_connected(&self, pool: &str, vol: &str, on: bool) -> Result<()> {
        let rec = self
            .update_replica_record(pool, vol, |r| {
                r.disconnected = !on;
                Ok(())
            })
            .await?;
        for h in &rec.hosts {
            if h == self.host_name() {
                self.local_copy_standalone(pool, vol, !on)?;
            } else if let Err(e) = async {
                self.peer(h)
                    .await?
                    .post::<serde_json::Value>(
                        &format!("/api/v1/replication/copies/{pool}/{vol}/standalone"),
                        &serde_json::json!({ "on": !on }),
                    )
                    .await
            }
            .await
            {
                tracing::warn!(host = %h, error = %e, "could not switch replication");
            }
        }
        self.inner.events.emit(
            None,
            "replication",
            format!(
                "{pool}/{vol}: replication {}",
                if on { "switched on" } else { "switched off" }
            ),
        );
        Ok(())
    }

    pub fn local_copy_standalone(&self, pool: &str, vol: &str, on: bool) -> Result<()> {
        self.replication()?
            .set_standalone(&key(pool, vol), on)
            .map_err(repl_err)
    }

    /// Ends a split brain: `keep`'s copy survives; every other copy is kept aside as a
    /// file and synced in full from `keep`.
    pub async fn resolve_volume(
        &self,
        pool: &str,
        vol: &str,
        keep: &str,
    ) -> Result<ReplicationStatus> {
        let rec = self.replica_record(pool, vol).await?;
        if !rec.hosts.iter().any(|h| h == keep) {
            return Err(AgentError::invalid(
                "keep",
                format!(
                    "{keep} keeps no copy of {pool}/{vol} ({})",
                    rec.hosts.join(", ")
                ),
            ));
        }
        if let Some(p) = &rec.primary {
            if p != keep {
                return Err(AgentError::refused(Refusal::InUse, format!(
                    "{pool}/{vol} is in use on {p}; stop what uses it there before its copy is discarded"
                )));
            }
        }
        let status = self.replication_status(pool, vol).await?;
        let kept = status
            .replicas
            .iter()
            .find(|r| r.host == keep)
            .and_then(|r| r.replica.clone())
            .ok_or_else(|| {
                AgentError::refused(
                    Refusal::Replica,
                    format!("{keep} does not answer; its copy cannot be kept now"),
                )
            })?;
        let kept_gen = kept.generation.clone().ok_or_else(|| {
            AgentError::refused(Refusal::Replica, format!("{keep}'s copy is empty"))
        })?;
        let mut saved = vec![];
        for h in rec.hosts.iter().filter(|h| *h != keep) {
            let path = if h == self.host_name() {
                self.local_copy_discard(pool, vol)?
            } else {
                self.peer(h)
                    .await?
                    .post::<String>(
                        &format!("/api/v1/replication/copies/{pool}/{vol}/discard"),
                        &serde_json::json!({}),
                    )
                    .await?
            };
            saved.push(format!("{h}: {path}"));
        }
        let keep_s = keep.to_string();
        self.update_replica_record(pool, vol, |r| {
            r.split_brain = None;
            r.generation = kept_gen.clone();
            r.promoted_from = None;
            r.outdated = r.hosts.iter().filter(|h| **h != keep_s).cloned().collect();
            Ok(())
        })
        .await?;
        self.inner.events.emit(
            None,
            "replication",
            format!(
                "{pool}/{vol}: split brain resolved, {keep}'s copy kept; the others were kept aside ({}) and sync in full",
                saved.join("; ")
            ),
        );
        self.replication_status(pool, vol).await
    }
}

/// From whom a start takes a volume's term over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Takeover<'a> {
    /// A host HA fenced: only while it holds no lease (checked in the same compare).
    Fenced(&'a str),
    /// A migration's source, handing over.
    Handover(&'a str),
}

impl<'a> Takeover<'a> {
    pub fn host(self) -> &'a str {
        match self {
            Takeover::Fenced(h) | Takeover::Handover(h) => h,
        }
    }
}

fn repl_err(e: ferry_replica::ReplicaError) -> AgentError {
    match e {
        ferry_replica::ReplicaError::NotFound(s) => AgentError::NotFound(s),
        ferry_replica::ReplicaError::Role(s) => AgentError::refused(Refusal::Replica, s),
        ferry_replica::ReplicaError::Io { what, source } => AgentError::Io { what, source },
    }
}
