//! Cluster membership: `init` makes this host the first etcd member, `join` adds it to a
//! running cluster through any member, `leave` takes it out again. The host's state
//! (VMs, pools, tasks, events) moves from its SQLite store into etcd under
//! `/ferry/hosts/{name}/` and back; the daemon restarts itself afterwards so every part
//! of it runs on the new store.
//!
//! etcd keys (under `/ferry`):
//! - `/cluster/members/{host}`: [`ClusterHost`] (name, API, address);
//! - `/cluster/alive/{host}`: under the host's lease (see [`crate::lease`]);
//! - `/cluster/ha/manager`: the elected HA manager, under its lease;
//! - `/cluster/fenced/{host}`: set by the manager for a host whose VMs it recovered;
//! - `/cluster/next-vm-id`: VM ids are unique in the cluster;
//! - `/hosts/{host}/...`: the host's own store (its VMs: ownership is where the record is).

use crate::error::{AgentError, Failure, Refusal, Result};
use crate::Cluster;
use ferry_host::ClusterLink;
use ferry_pki::HostPki;
use ferry_store::member::{self, MemberConfig, MemberTls};
use ferry_store::membership as etcd_members;
use ferry_store::{EtcdStore, EtcdTls, Store, StoreJson};
use ferry_types::{
    ClusterConfig, ClusterHost, ClusterInit, ClusterJoin, ClusterStatus, HostState, JoinToken,
    JoinTokenRequest, MemberAdd, MemberAdded, MemberStatus,
};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub(crate) use ferry_store::keys::cluster::{MANAGER, NEXT_VM_ID as NEXT_ID, ROOT};
/// Join attempts a host answers per minute.
const JOIN_ATTEMPTS: u32 = 20;
const CLIENT_PORT: u16 = 2379;
const PEER_PORT: u16 = 2380;
const DEFAULT_TTL_S: u64 = 5;

/// Join tokens are kept by their digest: etcd never holds one that works.
fn token_key(token: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(token.trim().as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn cluster_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("cluster")
}

fn config_path(state_dir: &Path) -> PathBuf {
    cluster_dir(state_dir).join("config.json")
}

pub(crate) struct EtcdPaths {
    pub data: PathBuf,
    pub log: PathBuf,
    pub pidfile: PathBuf,
}

pub(crate) fn etcd_paths(state_dir: &Path, run_dir: &Path) -> EtcdPaths {
    EtcdPaths {
        data: cluster_dir(state_dir).join("etcd"),
        log: cluster_dir(state_dir).join("etcd.log"),
        pidfile: run_dir.join("etcd.pid"),
    }
}

/// This host's membership, if it is in a cluster.
pub fn load_config(state_dir: &Path) -> Result<Option<ClusterConfig>> {
    let p = config_path(state_dir);
    match std::fs::read(&p) {
        Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
            AgentError::failed_by(
                Failure::Corrupt,
                format!("Cluster config {}", p.display()),
                e,
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(AgentError::Io {
            what: format!("Read {}", p.display()),
            source,
        }),
    }
}

/// Held while the configuration file is read to be changed and written (the lease loop
/// keeps the voters there while a promotion may rewrite it).
static CONFIG_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub(crate) fn save_config(state_dir: &Path, cfg: &ClusterConfig) -> Result<()> {
    let _held = CONFIG_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    write_config(state_dir, cfg)
}

/// Changes the saved configuration under the lock; `change` says whether it changed
/// anything (only then it is written). False when there is none.
pub(crate) fn update_config(
    state_dir: &Path,
    change: impl FnOnce(&mut ClusterConfig) -> bool,
) -> Result<bool> {
    let _held = CONFIG_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut cfg) = load_config(state_dir)? else {
        return Ok(false);
    };
    if !change(&mut cfg) {
        return Ok(false);
    }
    write_config(state_dir, &cfg)?;
    Ok(true)
}

fn write_config(state_dir: &Path, cfg: &ClusterConfig) -> Result<()> {
    let p = config_path(state_dir);
    let io = |source| AgentError::Io {
        what: format!("Write {}", p.display()),
        source,
    };
    std::fs::create_dir_all(cluster_dir(state_dir)).map_err(io)?;
    let tmp = p.with_extension("json.tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(cfg).expect("config serialises"),
    )
    .map_err(io)?;
    std::fs::rename(&tmp, &p).map_err(io)
}

/// The host's certificates where etcd reads them.
fn member_tls(pki: &HostPki) -> MemberTls {
    MemberTls {
        ca: pki.ca_path(),
        cert: pki.cert_path(),
        key: pki.key_path(),
        crl: pki.crl_path(),
    }
}

/// The host's certificates for its etcd client.
pub(crate) fn etcd_tls(pki: &HostPki) -> EtcdTls {
    EtcdTls {
        ca_pem: pki.ca_pem().to_string(),
        cert_pem: pki.cert_pem().to_string(),
        key_pem: pki.key_pem().to_string(),
    }
}

pub(crate) fn client_url(address: &str) -> String {
    format!("https://{}:{CLIENT_PORT}", url_host(address))
}

pub(crate) fn peer_url(address: &str) -> String {
    format!("https://{}:{PEER_PORT}", url_host(address))
}

fn url_host(address: &str) -> String {
    if address.contains(':') {
        format!("[{address}]")
    } else {
        address.to_string()
    }
}

pub(crate) fn member_config(
    cfg: &ClusterConfig,
    paths: &EtcdPaths,
    new: bool,
    pki: &HostPki,
) -> MemberConfig {
    MemberConfig {
        name: cfg.name.clone(),
        data_dir: paths.data.clone(),
        client_url: client_url(&cfg.address),
        peer_url: peer_url(&cfg.address),
        tls: Some(member_tls(pki)),
        initial_cluster: cfg.initial_cluster.clone(),
        new_cluster: new,
        // A LAN: a leader's loss is noticed in half a second, well inside the time a
        // host may go without renewing its lease before it fences itself.
        heartbeat_ms: 50,
        election_ms: 500,
        quota_bytes: ferry_store::health::QUOTA_BYTES,
    }
}

pub use crate::voters::voter_target;

/// At daemon start: makes sure the local etcd member runs (when ferry manages it) and
/// connects. Does not wait for quorum; the agent's store calls do.
pub async fn connect(
    state_dir: &Path,
    run_dir: &Path,
    cfg: &ClusterConfig,
    pki: &HostPki,
) -> Result<ClusterLink> {
    if cfg.managed_etcd {
        let paths = etcd_paths(state_dir, run_dir);
        restart_outdated_member(cfg, &paths, pki).await;
        if member::running(&paths.pidfile, &paths.data).is_none() {
            let mc = member_config(cfg, &paths, false, pki);
            let pid = member::spawn("etcd", &mc, &paths.log, &paths.pidfile).await?;
            tracing::info!(pid, "started the local etcd member");
        }
    }
    let root = EtcdStore::connect(&cfg.endpoints, ROOT, Some(etcd_tls(pki))).await?;
    Ok(ClusterLink::on_etcd(cfg.clone(), root))
}

/// A member started by an older ferry, or before this host had a revocation list, lacks
/// flags ferry wants now (the list, quota, compaction): it is started again with them —
/// but only while every other voter is healthy and no other host restarts its member
/// (a lock under a lease), so a fleet upgraded at once never loses quorum. Otherwise
/// later (`ensure_member` asks again). True if it restarted the member.
async fn restart_outdated_member(cfg: &ClusterConfig, paths: &EtcdPaths, pki: &HostPki) -> bool {
    let Some(pid) = member::running(&paths.pidfile, &paths.data) else {
        return false;
    };
    let mc = member_config(cfg, paths, false, pki);
    let missing = member::outdated_flags(pid, &mc);
    if missing.is_empty() {
        return false;
    }
    let own = client_url(&cfg.address);
    let others: Vec<String> = cfg
        .endpoints
        .iter()
        .filter(|e| **e != own)
        .cloned()
        .collect();
    let tls = etcd_tls(pki);
    let mut lock = None;
    if !others.is_empty() {
        match restart_lock(cfg, &others, &tls).await {
            Ok(Some(l)) => lock = Some(l),
            Ok(None) => {
                tracing::info!(?missing, "etcd member with outdated flags: restart deferred (another member restarts, or a voter is unhealthy)");
                return false;
            }
            Err(e) => {
                tracing::info!(error = %e, "etcd member with outdated flags: restart deferred");
                return false;
            }
        }
    }
    tracing::warn!(
        pid,
        ?missing,
        "the local etcd member runs with outdated flags; restarting it"
    );
    member::stop(&paths.pidfile, &paths.data).await;
    let restarted = match member::spawn("etcd", &mc, &paths.log, &paths.pidfile).await {
        Ok(_) => member::wait_healthy(
            &cfg.name,
            &mc.client_url,
            Some(&tls),
            &paths.log,
            Duration::from_secs(30),
        )
        .await
        .is_ok(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot restart the local etcd member");
            false
        }
    };
    if let Some((mut c, lease)) = lock {
        let _ = c.lease_revoke(lease).await;
    }
    restarted
}

/// Takes the member-restart lock (for 60 s at most) if every voter but this host's is
/// healthy; None if another host holds it or a voter is not.
async fn restart_lock(
    cfg: &ClusterConfig,
    others: &[String],
    tls: &EtcdTls,
) -> std::result::Result<Option<(etcd_client::Client, i64)>, etcd_client::Error> {
    let mut c = etcd_members::connect(others, Some(tls)).await?;
    let list = etcd_members::list(&c).await?;
    let voters: Vec<etcd_members::Member> = list
        .into_iter()
        .filter(|m| !m.learner && m.name != cfg.name)
        .collect();
    let s = ferry_store::health::survey(&c, &voters, Some(tls)).await;
    if s.members.iter().any(|m| m.error.is_some()) {
        return Ok(None);
    }
    let lease = c.lease_grant(60, None).await?.id();
    let key = format!("{ROOT}{}", ferry_store::keys::cluster::MEMBER_RESTART);
    let txn = etcd_client::Txn::new()
        .when([etcd_client::Compare::version(
            key.as_str(),
            etcd_client::CompareOp::Equal,
            0,
        )])
        .and_then([etcd_client::TxnOp::put(
            key.as_str(),
            cfg.name.as_str(),
            Some(etcd_client::PutOptions::new().with_lease(lease)),
        )]);
    if c.txn(txn).await?.succeeded() {
        Ok(Some((c, lease)))
    } else {
        let _ = c.lease_revoke(lease).await;
        Ok(None)
    }
}

pub(crate) fn etcd_err(what: impl Into<String>) -> impl FnOnce(etcd_client::Error) -> AgentError {
    let what = what.into();
    move |source| AgentError::Etcd { what, source }
}

/// Turns on etcd's check by certificate (auth), this host its first user.
async fn enable_access(client_url: &str, tls: &EtcdTls, name: &str) -> Result<()> {
    let opts = tls.apply(
        etcd_client::ConnectOptions::new()
            .with_timeout(Duration::from_secs(5))
            .with_connect_timeout(Duration::from_secs(2)),
    );
    let mut c = etcd_client::Client::connect([client_url], Some(opts))
        .await
        .map_err(etcd_err("Connect to the new etcd member"))?;
    member::access::enable(&mut c, name)
        .await
        .map_err(etcd_err("Turn on etcd's certificate check"))
}

/// `address` must be an IP of this host (something we can bind).
fn check_own_address(address: &str) -> Result<()> {
    let ip: std::net::IpAddr = address
        .parse()
        .map_err(|_| AgentError::invalid("address", format!("{address} is not an IP address")))?;
    std::net::TcpListener::bind((ip, 0)).map_err(|e| {
        AgentError::invalid(
            "address",
            format!("{address} is not an address of this host ({e})"),
        )
    })?;
    Ok(())
}

impl Cluster {
    /// Restarts the local etcd member if ferry manages it and it died.
    pub(crate) async fn ensure_member(&self) {
        let Some(link) = &self.cluster() else {
            return;
        };
        // Not once the host is leaving (its config is gone).
        if !link.cfg.managed_etcd || !config_path(&self.cfg().state_dir).exists() {
            return;
        }
        let paths = etcd_paths(&self.cfg().state_dir, &self.cfg().run_dir);
        if member::running(&paths.pidfile, &paths.data).is_some() {
            if restart_outdated_member(&link.cfg, &paths, &self.cfg().pki).await {
                self.events().emit(
                    None,
                    "cluster",
                    "local etcd member restarted with the flags this ferry wants",
                );
            }
            return;
        }
        // Replaced while it was away (another host voted in its place): a client now.
        if self.own_member_kept().await == Some(false) {
            if let Err(e) = self.become_client().await {
                tracing::warn!(error = %crate::error_chain(&e).join(": "), "cannot become a client of the etcd voters");
            }
            return;
        }
        let mc = member_config(&link.cfg, &paths, false, &self.cfg().pki);
        match member::spawn("etcd", &mc, &paths.log, &paths.pidfile).await {
            Ok(pid) => self.events().emit(
                None,
                "cluster",
                format!("local etcd member had stopped; restarted (pid {pid})"),
            ),
            Err(e) => tracing::warn!(error = %e, "cannot restart the local etcd member"),
        }
    }

    pub(crate) fn cluster_link(&self) -> Result<&ClusterLink> {
        self.cluster().ok_or_else(|| {
            AgentError::refused(
                Refusal::Membership,
                "This host is not in a cluster (ferry cluster init|join)",
            )
        })
    }

    fn refuse_if_clustered(&self) -> Result<()> {
        if self.cluster().is_some() || load_config(&self.cfg().state_dir)?.is_some() {
            return Err(AgentError::refused(
                Refusal::Membership,
                format!(
                    "Host {} is already in a cluster (ferry cluster leave first)",
                    self.host_name()
                ),
            ));
        }
        Ok(())
    }

    fn default_api(&self, address: &str, api: Option<String>) -> String {
        api.unwrap_or_else(|| format!("https://{}:{}", url_host(address), self.cfg().api_port))
    }

    /// The certificate files, made again for this host's cluster address (this host
    /// holds the CA key: its own, before it founds a cluster).
    fn pki_for(&self, address: &str) -> Result<HostPki> {
        let ip: std::net::IpAddr = address.parse().map_err(|_| {
            AgentError::invalid("address", format!("{address} is not an IP address"))
        })?;
        Ok(HostPki::ensure(
            &self.cfg().pki.dir,
            self.host_name(),
            &[ip],
        )?)
    }

    /// Makes this host the first member of a new cluster. The daemon restarts afterwards.
    pub async fn cluster_init(&self, req: ClusterInit) -> Result<ClusterConfig> {
        self.refuse_if_clustered()?;
        check_own_address(&req.address)?;
        let ttl = req.lease_ttl_s.unwrap_or(DEFAULT_TTL_S);
        if !(2..=60).contains(&ttl) {
            return Err(AgentError::invalid(
                "lease_ttl_s",
                format!("{ttl} s is outside 2–60 s"),
            ));
        }
        let name = self.host_name().to_string();
        let managed = req.etcd.is_empty();
        // This host's CA becomes the cluster's; its certificate names the address.
        let pki = self.pki_for(&req.address)?;
        // The first revocation list (empty), before etcd starts reading it.
        if pki.crl().is_none() {
            pki.install_crl(&pki.sign_crl(1, &Default::default())?)?;
        }
        let mut cfg = ClusterConfig {
            name: name.clone(),
            address: req.address.clone(),
            api: self.default_api(&req.address, req.api),
            endpoints: if managed {
                vec![client_url(&req.address)]
            } else {
                req.etcd.clone()
            },
            managed_etcd: managed,
            initial_cluster: format!("{name}={}", peer_url(&req.address)),
            lease_ttl_s: ttl,
            ca_fingerprint: pki.ca_fingerprint(),
        };
        let paths = etcd_paths(&self.cfg().state_dir, &self.cfg().run_dir);
        if managed {
            let _ = std::fs::remove_dir_all(&paths.data);
            let mc = member_config(&cfg, &paths, true, &pki);
            member::spawn("etcd", &mc, &paths.log, &paths.pidfile).await?;
            let tls = etcd_tls(&pki);
            let up = member::wait_healthy(
                &name,
                &mc.client_url,
                Some(&tls),
                &paths.log,
                Duration::from_secs(20),
            )
            .await;
            // etcd's own check by certificate: only hosts with a user get in (a host
            // that leaves loses it).
            let up = match up {
                Ok(()) => enable_access(&mc.client_url, &tls, &name).await,
                Err(e) => Err(e.into()),
            };
            if let Err(e) = up {
                member::stop(&paths.pidfile, &paths.data).await;
                return Err(e);
            }
        }
        let done = self.enter_cluster(&mut cfg, &pki).await;
        if done.is_err() && managed {
            member::stop(&paths.pidfile, &paths.data).await;
            let _ = std::fs::remove_dir_all(&paths.data);
        }
        done?;
        Ok(cfg)
    }

    /// A one-time join token (kept hashed in etcd under a lease: it expires with it).
    pub async fn cluster_join_token(&self, req: JoinTokenRequest) -> Result<JoinToken> {
        let link = self.cluster_link()?;
        let ttl = req.ttl_s.unwrap_or(3600);
        if !(60..=86400).contains(&ttl) {
            return Err(AgentError::invalid(
                "ttl_s",
                format!("{ttl} s is outside 60 s – 24 h"),
            ));
        }
        let bytes: [u8; 24] = rand::random();
        let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let lease = link.root.grant_lease(Duration::from_secs(ttl)).await?;
        link.root
            .put(
                &ferry_store::keys::cluster::join_token(&token_key(&token)),
                b"1".to_vec(),
                Some(lease),
            )
            .await?;
        self.events()
            .emit(None, "cluster", format!("join token made (valid {ttl} s)"));
        // The token names this member's certificate too (after the dot): the joiner
        // gives it only to the holder of that certificate.
        Ok(JoinToken {
            token: format!("{token}.{}", self.cfg().pki.leaf_pin()),
            expires_in_s: ttl,
            ca_fingerprint: self.cfg().pki.ca_fingerprint(),
        })
    }

    /// Uses up a join token: true when it existed (and now does not). A token that is
    /// not there costs a read, never a write (no raft round for a guess).
    async fn take_join_token(&self, link: &ClusterLink, token: &str) -> Result<bool> {
        let t = token.trim();
        let t = t.split_once('.').map_or(t, |(secret, _)| secret);
        if t.len() != 48 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(false);
        }
        let key = ferry_store::keys::cluster::join_token(&token_key(t));
        if link.root.get(&key).await?.is_none() {
            return Ok(false);
        }
        let r = link
            .root
            .txn(ferry_store::Txn {
                compare: vec![ferry_store::Compare::Version(
                    key.clone(),
                    ferry_store::Cmp::Greater,
                    0,
                )],
                success: vec![ferry_store::Op::Delete(key)],
                failure: vec![],
            })
            .await?;
        Ok(r.succeeded)
    }

    /// At most [`JOIN_ATTEMPTS`] join attempts per minute on this host: a guessed
    /// token costs the guesser time, and the store no work beyond that.
    fn join_attempt_allowed(&self) -> bool {
        let mut w = self
            .inner
            .membership
            .join_attempts
            .lock()
            .expect("join attempts");
        let now = std::time::Instant::now();
        if now.duration_since(w.0) > Duration::from_secs(60) {
            *w = (now, 0);
        }
        w.1 += 1;
        w.1 <= JOIN_ATTEMPTS
    }

    /// On the member holding the CA key: lets host `req.name` in when it shows a join
    /// token (checked after the request itself, used up before anything changes):
    /// signs its certificate request (names and address decided here), adds its etcd
    /// member, and hands back the CA certificate. Neither the CA key nor any token
    /// leaves this host.
    pub async fn cluster_add_member(&self, req: MemberAdd) -> Result<MemberAdded> {
        let link = self.cluster_link()?;
        if !self.join_attempt_allowed() {
            return Err(AgentError::Unauthorized(
                "Too many join attempts on this host; try again in a minute".into(),
            ));
        }
        let mut errs = ferry_types::ValidationErrors::default();
        ferry_types::validate::check_name(&mut errs, "name", &req.name);
        if let Err(e) = ferry_pki::check_host_name(&req.name) {
            errs.push("name", e.to_string());
        }
        errs.into_result()?;
        let ip: std::net::IpAddr = req.address.parse().map_err(|_| {
            AgentError::invalid("address", format!("{} is not an IP address", req.address))
        })?;
        if !req.api.starts_with("https://") {
            return Err(AgentError::invalid(
                "api",
                format!("{} is no https:// URL", req.api),
            ));
        }
        let pki = &self.cfg().pki;
        if !pki.has_ca_key() {
            return Err(AgentError::refused(
                Refusal::Membership,
                format!(
                    "{} holds no CA key: join through the member that founded the cluster",
                    self.host_name()
                ),
            ));
        }
        if !self.take_join_token(link, &req.join_token).await? {
            tracing::warn!(name = %req.name, "join refused: unknown, used or expired join token");
            return Err(AgentError::Unauthorized(
                "Unknown, used or expired join token (ferry cluster join-token on a member makes one)"
                    .into(),
            ));
        }
        let host_cert = pki.issue(&req.csr, &req.name, &[ip])?;
        // Registered first, and only if no member has the name: once etcd counts the
        // new member, nothing commits until it runs (a one-member cluster has no
        // quorum between the two steps).
        let key = ferry_store::keys::cluster::member(&req.name);
        let record = ClusterHost {
            name: req.name.clone(),
            api: req.api.clone(),
            address: req.address.clone(),
            cert_serial: ferry_pki::serial_pem(&host_cert).ok(),
            // The joiner publishes its own when its daemon starts.
            migration_ca: None,
        };
        let value = serde_json::to_vec(&record).expect("a host record serialises");
        if !put_if_absent(&*link.root, &key, value).await? {
            return Err(AgentError::refused(
                Refusal::Exists,
                format!("A host named {} is already a member", req.name),
            ));
        }
        let (initial, endpoints) = match join_etcd(link, &req, &key).await {
            Ok(r) => r,
            Err(e) => {
                // Nothing of the joiner stays: its record goes (its user and member
                // never came, or `add_etcd_member` took them back).
                let _ = link.root.delete(&key).await;
                return Err(e);
            }
        };
        self.events()
            .emit(None, "cluster", format!("host {} joins", req.name));
        Ok(MemberAdded {
            initial_cluster: initial.join(","),
            endpoints,
            lease_ttl_s: link.cfg.lease_ttl_s,
            ca_cert: pki.ca_pem().to_string(),
            host_cert,
            crl: pki.crl().map(|c| c.pem),
        })
    }

    /// Joins the cluster `req.peer` belongs to: the member must show a certificate of
    /// the CA with `req.fingerprint`; this host shows the join token and gets its
    /// certificate. The daemon restarts afterwards.
    pub async fn cluster_join(&self, req: ClusterJoin) -> Result<ClusterConfig> {
        self.refuse_if_clustered()?;
        check_own_address(&req.address)?;
        let name = self.host_name().to_string();
        let api = self.default_api(&req.address, req.api);
        let peer_api = if req.peer.contains("://") {
            req.peer.trim_end_matches('/').to_string()
        } else {
            format!("https://{}:{}", url_host(&req.peer), self.cfg().api_port)
        };
        if !peer_api.starts_with("https://") {
            return Err(AgentError::invalid(
                "peer",
                format!("{peer_api}: members are reached over https://"),
            ));
        }
        let (secret, leaf) = match req.join_token.trim().split_once('.') {
            Some((s, pin)) => (s.to_string(), Some(pin.to_string())),
            None => (req.join_token.trim().to_string(), None),
        };
        let tls = ferry_pki::pinned_client(&req.fingerprint, leaf.as_deref()).map_err(|e| {
            let field = if leaf.is_some() && ferry_pki::parse_fingerprint(&req.fingerprint).is_ok()
            {
                "join_token"
            } else {
                "fingerprint"
            };
            AgentError::invalid(field, crate::error_chain(&e).join(": "))
        })?;
        let peer = ferry_host::Peer::with_tls(
            ClusterHost {
                name: req.peer.clone(),
                api: peer_api,
                address: String::new(),
                cert_serial: None,
                migration_ca: None,
            },
            Duration::from_secs(30),
            tls,
        )?
        .with_token(None);
        let (key, csr) = ferry_pki::new_request(&name)?;
        let added: MemberAdded = peer
            .post(
                "/api/v1/cluster/members",
                &MemberAdd {
                    join_token: secret,
                    name: name.clone(),
                    address: req.address.clone(),
                    api: api.clone(),
                    peer_url: Some(peer_url(&req.address)),
                    csr,
                },
            )
            .await?;
        // The CA handed out must be the one pinned (checked before anything is written).
        if ferry_pki::fingerprint_pem(&added.ca_cert)?
            != ferry_pki::parse_fingerprint(&req.fingerprint)?
        {
            return Err(AgentError::failed(
                Failure::Untrusted,
                "The member handed out another CA than the one it showed",
            ));
        }
        let dir = self.cfg().pki.dir.clone();
        HostPki::install(&dir, &added.ca_cert, None, &added.host_cert, &key)?;
        let pki = HostPki::load(&dir)?;
        if let Some(crl) = &added.crl {
            pki.install_crl(crl)?;
        }
        // No initial cluster: the cluster has its voters, this host is their client.
        let voter = !added.initial_cluster.is_empty();
        let own = client_url(&req.address);
        let endpoints = if voter {
            // The own member first: the store talks to it while it answers.
            let mut e = vec![own.clone()];
            e.extend(added.endpoints.iter().filter(|e| **e != own).cloned());
            e
        } else {
            added.endpoints.clone()
        };
        let mut cfg = ClusterConfig {
            name: name.clone(),
            address: req.address.clone(),
            api,
            endpoints,
            managed_etcd: voter,
            initial_cluster: added.initial_cluster.clone(),
            lease_ttl_s: added.lease_ttl_s,
            ca_fingerprint: pki.ca_fingerprint(),
        };
        if !voter {
            self.enter_cluster(&mut cfg, &pki).await?;
            return Ok(cfg);
        }
        let paths = etcd_paths(&self.cfg().state_dir, &self.cfg().run_dir);
        let _ = std::fs::remove_dir_all(&paths.data);
        let mc = member_config(&cfg, &paths, false, &pki);
        member::spawn("etcd", &mc, &paths.log, &paths.pidfile).await?;
        let etls = etcd_tls(&pki);
        member::wait_healthy(
            &name,
            &mc.client_url,
            Some(&etls),
            &paths.log,
            Duration::from_secs(30),
        )
        .await?;
        self.enter_cluster(&mut cfg, &pki).await?;
        Ok(cfg)
    }

    /// Copies this host's store into etcd, registers it, writes the config.
    async fn enter_cluster(&self, cfg: &mut ClusterConfig, pki: &HostPki) -> Result<()> {
        let root = EtcdStore::connect(&cfg.endpoints, ROOT, Some(etcd_tls(pki))).await?;
        let host = root.scoped(&ferry_host::link::host_prefix(&cfg.name));
        if !host.list("/").await?.is_empty() {
            return Err(AgentError::refused(Refusal::Exists, format!(
                "The cluster already holds state of a host named {} (ferry cluster leave on it, or pick another --host-name)",
                cfg.name
            )));
        }
        let mine = self.store().list("").await?;
        for kv in &mine {
            host.put(&kv.key, kv.value.clone(), None).await?;
        }
        // What a host alone keeps for the whole of itself — resource pools, backup
        // stores and jobs, DRS settings — becomes the cluster's (`/cluster/...`) where
        // the cluster has none of that name: a VM's resource pool must not vanish.
        let shared = [
            "/respools/",
            "/backup-stores/",
            "/backup-jobs/",
            "/drs/config",
        ];
        for kv in mine
            .iter()
            .filter(|kv| shared.iter().any(|p| kv.key.starts_with(p)))
        {
            let key = format!("{}{}", ferry_store::keys::shared::CLUSTER, kv.key);
            if !put_if_absent(&root, &key, kv.value.clone()).await? {
                tracing::warn!(%key, "the cluster has its own; this host's is not taken over");
            }
        }
        // VM ids stay unique across the cluster: start the counter above ours.
        let next: u32 = self
            .store()
            .get_json::<u32>(ferry_store::keys::host::NEXT_VM_ID)
            .await?
            .map_or(100, |(n, _)| n);
        let cur = root.get_json::<u32>(NEXT_ID).await?.map_or(100, |(n, _)| n);
        root.put_json(NEXT_ID, &cur.max(next)).await?;
        root.put_json(
            &ferry_store::keys::cluster::member(&cfg.name),
            &ClusterHost {
                name: cfg.name.clone(),
                api: cfg.api.clone(),
                address: cfg.address.clone(),
                cert_serial: pki.host_info().ok().map(|i| i.serial),
                migration_ca: pki.migration().ok().map(|m| m.ca_pem),
            },
        )
        .await?;
        save_config(&self.cfg().state_dir, cfg)?;
        tracing::info!(keys = mine.len(), "host state copied into etcd");
        Ok(())
    }

    /// Takes this host out of the cluster: its state goes back to SQLite, its etcd
    /// member is removed and stopped. Refused while VMs run here (migrate them first).
    pub async fn cluster_leave(&self) -> Result<()> {
        let link = self.cluster_link()?.clone();
        let running: Vec<String> = self
            .list_vms()
            .await?
            .into_iter()
            .filter(|v| v.state.has_process())
            .map(|v| v.spec.name)
            .collect();
        if !running.is_empty() {
            return Err(AgentError::refused(
                Refusal::InUse,
                format!(
                    "VMs still run on this host: {} (migrate or stop them first)",
                    running.join(", ")
                ),
            ));
        }
        // The CA key never leaves this host: without it no host joins or renews and no
        // certificate is revoked again. It leaves last.
        let others = link
            .members()
            .await?
            .into_iter()
            .filter(|m| m.name != link.cfg.name)
            .count();
        if self.cfg().pki.has_ca_key() && others > 0 {
            return Err(AgentError::refused(Refusal::Membership, format!(
                "{} holds the cluster's CA key (it signs the certificates and revocation lists of {others} other host(s)); it leaves last",
                link.cfg.name
            )));
        }
        let sqlite = ferry_store::SqliteStore::open(&self.cfg().state_dir.join("ferry.db"))?;
        for kv in sqlite.list("").await? {
            sqlite.delete(&kv.key).await?;
        }
        let host = link.host_store();
        // From "/": the scope has no trailing slash, so "" would also take the keys of
        // a host whose name starts with this one's (h1 and h10).
        for kv in host.list("/").await? {
            sqlite.put(&kv.key, kv.value, None).await?;
        }
        let name = &link.cfg.name;
        if link.cfg.managed_etcd {
            let list = etcd_members::list(&link.etcd()?.client())
                .await
                .map_err(etcd_err("List etcd members"))?;
            if let Some(m) = list.iter().find(|m| m.name == *name) {
                if list.len() > 1 {
                    // Asked of another member: ours stops as it leaves, which can cut
                    // off the answer to a removal that did happen.
                    let others: Vec<String> = list
                        .iter()
                        .filter(|x| x.name != *name)
                        .flat_map(|x| x.client_urls.iter().cloned())
                        .collect();
                    let c = etcd_members::connect(&others, Some(&etcd_tls(&self.cfg().pki)))
                        .await
                        .map_err(etcd_err("Connect to another etcd member"))?;
                    etcd_members::remove(&c, m.id)
                        .await
                        .map_err(etcd_err(format!("Remove etcd member {name}")))?;
                }
            }
        }
        // Our member is gone (or going): the store moves on to another one. The
        // host's certificates are revoked as its record goes (the one the record
        // names, and the one on disk should a renewal not have been recorded).
        let mut serials: std::collections::BTreeSet<String> = HostPki::load(&self.cfg().pki.dir)
            .ok()
            .and_then(|p| p.host_info().ok())
            .map(|i| i.serial)
            .into_iter()
            .collect();
        if let Ok(i) = self.cfg().pki.host_info() {
            serials.insert(i.serial);
        }
        if let Ok(Some((rec, _))) = link
            .root
            .get_json::<ClusterHost>(&ferry_store::keys::cluster::member(name))
            .await
        {
            serials.extend(rec.cert_serial);
        }
        crate::remove::drop_member_records(link.root.as_ref(), name, &serials, "left").await?;
        // The CA holder signs the list itself before it goes (no one else can).
        if self.cfg().pki.has_ca_key() {
            if let Err(e) = self.sync_crl().await {
                tracing::warn!(error = %crate::error_chain(&e).join(": "), "cannot sign the revocation list of this host's certificate");
            }
        }
        // Last: this host's etcd user (a voter's or a client's), so its certificate
        // opens nothing in etcd now.
        if let Ok(etcd) = link.etcd() {
            if let Err(e) = member::access::revoke(&mut etcd.client(), name).await {
                tracing::warn!(error = %e, "cannot remove this host's etcd user");
            }
        }
        self.disarm_watchdog();
        if link.cfg.managed_etcd {
            let paths = etcd_paths(&self.cfg().state_dir, &self.cfg().run_dir);
            member::stop(&paths.pidfile, &paths.data).await;
            let _ = std::fs::remove_dir_all(&paths.data);
        }
        let _ = std::fs::remove_file(config_path(&self.cfg().state_dir));
        // The cluster's CA and certificate go; the next start makes the host's own.
        HostPki::forget(&self.cfg().pki.dir);
        Ok(())
    }

    /// Members, their states and leases, etcd's leader and quorum, the HA manager.
    pub async fn cluster_status(&self) -> Result<ClusterStatus> {
        let Some(link) = &self.cluster() else {
            return Ok(ClusterStatus {
                clustered: false,
                name: self.host_name().to_string(),
                members: vec![],
                etcd_voters: 0,
                quorum: 0,
                has_quorum: false,
                ha_manager: None,
                lease_ttl_s: 0,
                etcd: None,
                warnings: vec![],
            });
        };
        let mut client = link.etcd()?.client();
        let list = etcd_members::list(&client)
            .await
            .map_err(etcd_err("List etcd members"))?;
        let leader = etcd_members::leader(&client).await;
        let voters = list.iter().filter(|m| !m.learner).count();
        let manager = link.root.get_json::<String>(MANAGER).await?.map(|(m, _)| m);
        let mut members = vec![];
        for h in link.members().await? {
            let alive = link
                .root
                .get(&ferry_store::keys::cluster::alive(&h.name))
                .await?;
            let left = match alive.as_ref().and_then(|a| a.lease) {
                Some(l) => client
                    .lease_time_to_live(l, None)
                    .await
                    .ok()
                    .map(|t| t.ttl()),
                None => None,
            };
            // The flag's value, not its presence: ending maintenance writes false.
            let maintenance = link
                .root
                .get_json::<bool>(&ferry_store::keys::cluster::of_host(
                    &h.name,
                    ferry_store::keys::host::MAINTENANCE,
                ))
                .await?
                .is_some_and(|(m, _)| m);
            let fenced = link
                .root
                .get(&ferry_store::keys::cluster::fenced(&h.name))
                .await?
                .is_some();
            let state = match (alive.is_some(), maintenance, fenced) {
                (true, true, _) => HostState::Maintenance,
                (true, false, _) => HostState::Online,
                (false, _, true) => HostState::Fenced,
                (false, _, false) => HostState::Offline,
            };
            let em = list.iter().find(|m| m.name == h.name);
            members.push(MemberStatus {
                etcd_member: em.is_some(),
                etcd_leader: em.is_some_and(|m| m.id == leader),
                lease_ttl_left_s: left,
                ha_manager: manager.as_deref() == Some(h.name.as_str()),
                name: h.name,
                address: h.address,
                api: h.api,
                state,
            });
        }
        let quorum = voters / 2 + 1;
        let mut warnings = vec![];
        let etcd = self.etcd_status().await;
        for e in etcd.iter().flat_map(|e| &e.alarms) {
            warnings.push(format!("etcd alarm: {e}"));
        }
        if let Some(e) = &etcd {
            if let (Some(q), Some(m)) = (
                e.quota_bytes,
                e.members.iter().map(|m| m.db_in_use_bytes).max(),
            ) {
                if m as f64 > 0.75 * q as f64 {
                    warnings.push(format!(
                        "etcd holds {} MiB of live data, {:.0} % of its {} MiB quota",
                        m >> 20,
                        100.0 * m as f64 / q as f64,
                        q >> 20
                    ));
                }
            }
        }
        if voters == 2 {
            warnings.push(
                "Two etcd voters: losing either stops the cluster. Add a third voter (a witness etcd member on a third machine, like a corosync QDevice).".into(),
            );
        }
        if voters % 2 == 0 && voters > 2 {
            warnings.push(format!(
                "{voters} etcd voters tolerate no more failures than {}",
                voters - 1
            ));
        }
        Ok(ClusterStatus {
            clustered: true,
            name: link.cfg.name.clone(),
            members,
            etcd_voters: voters,
            quorum,
            has_quorum: leader != 0,
            ha_manager: manager,
            lease_ttl_s: link.cfg.lease_ttl_s,
            etcd,
            warnings,
        })
    }

    /// Asks `ferry serve` to restart itself (after init/join/leave: the store changed).
    pub fn request_restart(&self) {
        self.inner.membership.restart.notify_one();
    }

    /// Resolves when a restart was asked for.
    pub async fn restart_requested(&self) {
        self.inner.membership.restart.notified().await
    }
}

/// How host `req.name` (its member record at `key` made) enters etcd: a voter while
/// the cluster has fewer than it should (quorum must not count every hypervisor; etcd
/// advises 3 to 5 voters), else a client of the voters — their client URLs and an etcd
/// user of its name (etcd lets its certificate in only then), no member of its own. The
/// cluster decides, not the joiner (its peer URL follows from its address anyway).
/// Returns the initial cluster (empty for a client) and the endpoints.
async fn join_etcd(
    link: &ClusterLink,
    req: &MemberAdd,
    key: &str,
) -> Result<(Vec<String>, Vec<String>)> {
    let client = link.etcd()?.client();
    let list = etcd_members::list(&client)
        .await
        .map_err(etcd_err("List etcd members"))?;
    let hosts = link.members().await?.len();
    let voters: Vec<&etcd_members::Member> = list.iter().filter(|m| !m.learner).collect();
    if voters.len() < voter_target(hosts) {
        return add_etcd_member(link, req, key).await;
    }
    member::access::admit(&mut client.clone(), &req.name)
        .await
        .map_err(etcd_err(format!("Admit {} to etcd", req.name)))?;
    let eps = voters
        .iter()
        .flat_map(|m| m.client_urls.iter().cloned())
        .collect();
    Ok((vec![], eps))
}

/// Lets host `req.name` into etcd: its user (etcd admits its certificate only then)
/// and its member at the peer URL its address gives. Undone, with the member record
/// `key`, when a step fails. Returns the initial cluster and the client endpoints.
async fn add_etcd_member(
    link: &ClusterLink,
    req: &MemberAdd,
    key: &str,
) -> Result<(Vec<String>, Vec<String>)> {
    let client = link.etcd()?.client();
    let mut initial = vec![];
    let mut endpoints = vec![];
    // etcd lets the joiner's certificate in only with a user of its name.
    let mut c = client.clone();
    if let Err(e) = member::access::admit(&mut c, &req.name).await {
        let _ = link.root.delete(key).await;
        return Err(etcd_err(format!("Admit {} to etcd", req.name))(e));
    }
    // The peer URL follows from the address; the joiner's word is not taken.
    let peer = peer_url(&req.address);
    let added = match etcd_members::add(&client, &peer).await {
        Ok(a) => a,
        Err(e) => {
            let _ = link.root.delete(key).await;
            let _ = member::access::revoke(&mut client.clone(), &req.name).await;
            return Err(etcd_err(format!("Add etcd member {}", req.name))(e));
        }
    };
    for m in added {
        let name = if m.name.is_empty() {
            req.name.as_str()
        } else {
            m.name.as_str()
        };
        if let Some(u) = m.peer_urls.first() {
            initial.push(format!("{name}={u}"));
        }
        endpoints.extend(m.client_urls);
    }
    endpoints.push(client_url(&req.address));
    Ok((initial, endpoints))
}

/// Writes `key` only if it does not exist; whether it was written.
async fn put_if_absent(
    store: &dyn ferry_store::Store,
    key: &str,
    value: Vec<u8>,
) -> std::result::Result<bool, ferry_store::StoreError> {
    Ok(store
        .txn(ferry_store::Txn {
            compare: vec![ferry_store::Compare::Version(
                key.into(),
                ferry_store::Cmp::Equal,
                0,
            )],
            success: vec![ferry_store::Op::Put {
                key: key.into(),
                value,
                lease: None,
            }],
            failure: vec![],
        })
        .await?
        .succeeded)
}
