//! The etcd backend: the same [`Store`] over etcd's v3 API, with every key under a
//! namespace prefix (one etcd holds the whole cluster; each host's agent sees its own
//! subtree, the cluster code the shared one).
//!
//! Requests go out with `require_leader`, so a member cut off from the majority answers
//! "no leader" at once instead of serving stale reads; every call has a timeout. The
//! store talks to one member at a time (the first endpoint: the host's own); when that
//! member is unreachable or has no leader, it switches to the next one that answers.

use crate::{
    Cmp, Compare, EventKind, KeyValue, LeaseId, Op, Store, StoreError, Txn, TxnResponse, WatchEvent,
};
use async_trait::async_trait;
use etcd_client as ec;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// How long one etcd request may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// The connection shared by every scope: the member in use and the others to try.
struct Conn {
    tls: Option<EtcdTls>,
    endpoints: std::sync::RwLock<Vec<String>>,
    cur: std::sync::RwLock<(usize, ec::Client)>,
    switching: tokio::sync::Mutex<()>,
}

#[derive(Clone)]
pub struct EtcdStore {
    conn: Arc<Conn>,
    prefix: String,
}

/// TLS to etcd: the cluster CA the members' certificates are checked against, and the
/// client certificate (the host's) etcd requires (`--client-cert-auth`).
#[derive(Clone)]
pub struct EtcdTls {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EtcdTls(..)")
    }
}

impl EtcdTls {
    /// The connect options with these certificates (for `https://` endpoints).
    pub fn apply(&self, opts: ec::ConnectOptions) -> ec::ConnectOptions {
        opts.with_tls(
            ec::TlsOptions::new()
                .ca_certificate(ec::Certificate::from_pem(&self.ca_pem))
                .identity(ec::Identity::from_pem(&self.cert_pem, &self.key_pem)),
        )
    }
}

/// Connect options with `tls` when the endpoint speaks it.
pub fn with_tls(
    opts: ec::ConnectOptions,
    endpoint: &str,
    tls: Option<&EtcdTls>,
) -> ec::ConnectOptions {
    match tls {
        Some(t) if endpoint.starts_with("https://") => t.apply(opts),
        _ => opts,
    }
}

async fn connect_one(endpoint: &str, tls: Option<&EtcdTls>) -> Result<ec::Client, ec::Error> {
    let opts = ec::ConnectOptions::new()
        .with_require_leader(true)
        .with_timeout(REQUEST_TIMEOUT)
        .with_connect_timeout(Duration::from_secs(1))
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
    ec::Client::connect([endpoint], Some(with_tls(opts, endpoint, tls))).await
}

/// Errors after which another member may do better.
fn member_unusable(e: &ec::Error) -> bool {
    match e {
        ec::Error::TransportError(_) | ec::Error::IoError(_) => true,
        ec::Error::GRpcStatus(s) => matches!(
            s.code(),
            tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
        ),
        _ => false,
    }
}

impl EtcdStore {
    /// Connects to the first of `endpoints` (`http://host:port`) that takes a connection;
    /// keys live under `prefix`.
    pub async fn connect(
        endpoints: &[String],
        prefix: &str,
        tls: Option<EtcdTls>,
    ) -> Result<EtcdStore, StoreError> {
        let mut last = None;
        for (i, ep) in endpoints.iter().enumerate() {
            match connect_one(ep, tls.as_ref()).await {
                Ok(c) => {
                    return Ok(EtcdStore {
                        conn: Arc::new(Conn {
                            tls,
                            endpoints: std::sync::RwLock::new(endpoints.to_vec()),
                            cur: std::sync::RwLock::new((i, c)),
                            switching: tokio::sync::Mutex::new(()),
                        }),
                        prefix: prefix.to_string(),
                    })
                }
                Err(e) => last = Some(e),
            }
        }
        Err(StoreError::Connect {
            endpoints: endpoints.join(","),
            source: last.unwrap_or_else(|| ec::Error::InvalidArgs("no etcd endpoints".into())),
        })
    }

    /// The same connection with keys under another prefix.
    pub fn scoped(&self, prefix: &str) -> EtcdStore {
        EtcdStore {
            conn: self.conn.clone(),
            prefix: prefix.to_string(),
        }
    }

    /// The raw client of the member in use, for cluster membership calls.
    pub fn client(&self) -> ec::Client {
        self.conn
            .cur
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .clone()
    }

    /// The member endpoint in use.
    pub fn endpoint(&self) -> String {
        let i = self.conn.cur.read().unwrap_or_else(|e| e.into_inner()).0;
        self.conn
            .endpoints
            .read()
            .unwrap_or_else(|e| e.into_inner())[i]
            .clone()
    }

    /// Adds members to fail over to (a member that joined later).
    pub fn add_endpoints(&self, more: &[String]) {
        let mut eps = self
            .conn
            .endpoints
            .write()
            .unwrap_or_else(|e| e.into_inner());
        for m in more {
            if !eps.contains(m) {
                eps.push(m.clone());
            }
        }
    }

    /// Moves to the next member that answers with a leader.
    async fn switch_member(&self) {
        let Ok(_g) = self.conn.switching.try_lock() else {
            return; // another request is at it
        };
        let start = self.conn.cur.read().unwrap_or_else(|e| e.into_inner()).0;
        let eps = self
            .conn
            .endpoints
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for k in 1..=eps.len() {
            let j = (start + k) % eps.len();
            let Ok(mut c) = connect_one(&eps[j], self.conn.tls.as_ref()).await else {
                continue;
            };
            let ok = tokio::time::timeout(
                Duration::from_secs(1),
                c.get(
                    "/ferry/health",
                    Some(ec::GetOptions::new().with_count_only()),
                ),
            )
            .await
            .is_ok_and(|r| r.is_ok());
            if ok {
                if j != start {
                    tracing::info!(from = %eps[start], to = %eps[j], "etcd: switched member");
                }
                *self.conn.cur.write().unwrap_or_else(|e| e.into_inner()) = (j, c);
                return;
            }
        }
    }

    /// Passes a result on; a member that failed us is replaced for the next request.
    async fn check<T>(
        &self,
        r: Result<T, ec::Error>,
        lease: Option<LeaseId>,
    ) -> Result<T, StoreError> {
        match r {
            Ok(v) => Ok(v),
            Err(e) => {
                if member_unusable(&e) {
                    self.switch_member().await;
                }
                Err(err(e, lease))
            }
        }
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn kv(&self, kv: &ec::KeyValue) -> KeyValue {
        let key = String::from_utf8_lossy(kv.key());
        KeyValue {
            key: key.strip_prefix(&self.prefix).unwrap_or(&key).to_string(),
            value: kv.value().to_vec(),
            create_rev: kv.create_revision(),
            mod_rev: kv.mod_revision(),
            version: kv.version(),
            lease: (kv.lease() != 0).then_some(kv.lease()),
        }
    }

    fn op(&self, op: &Op) -> ec::TxnOp {
        match op {
            Op::Get(k) => ec::TxnOp::get(self.full(k), None),
            Op::Put { key, value, lease } => ec::TxnOp::put(
                self.full(key),
                value.clone(),
                lease.map(|l| ec::PutOptions::new().with_lease(l)),
            ),
            Op::Delete(k) => ec::TxnOp::delete(self.full(k), None),
            Op::DeletePrefix(p) => {
                ec::TxnOp::delete(self.full(p), Some(ec::DeleteOptions::new().with_prefix()))
            }
        }
    }
}

fn cmp(c: Cmp) -> ec::CompareOp {
    match c {
        Cmp::Equal => ec::CompareOp::Equal,
        Cmp::NotEqual => ec::CompareOp::NotEqual,
        Cmp::Less => ec::CompareOp::Less,
        Cmp::Greater => ec::CompareOp::Greater,
    }
}

/// Maps etcd's "lease not found" to our error; everything else stays an etcd error.
fn err(e: ec::Error, lease: Option<LeaseId>) -> StoreError {
    if let Some(l) = lease {
        let msg = match &e {
            ec::Error::GRpcStatus(s) => s.message().to_string(),
            ec::Error::LeaseKeepAliveError(m) => m.clone(),
            _ => String::new(),
        };
        if msg.contains("lease not found") {
            return StoreError::LeaseNotFound(l);
        }
    }
    StoreError::Etcd(e)
}

/// Keys per page of a listing: VM records are a few KiB at most, so a page stays well
/// under the 4 MiB etcd's client accepts in one reply.
const LIST_PAGE: i64 = 500;

/// The first key after every key starting with `prefix` (etcd's range end for a prefix).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Only 0xff bytes: everything from the key on.
    vec![0]
}

fn header_rev(h: Option<&ec::ResponseHeader>) -> i64 {
    h.map_or(0, |h| h.revision())
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let r = self.client().kv_client().get(self.full(key), None).await;
        let r = self.check(r, None).await?;
        Ok(r.kvs().first().map(|kv| self.kv(kv)))
    }

    /// In pages of [`LIST_PAGE`] keys, each read at the first page's revision: one
    /// consistent listing however large (etcd's replies stay under the client's 4 MiB).
    async fn list_at(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), StoreError> {
        let full = self.full(prefix);
        let end = prefix_end(full.as_bytes());
        let mut from = full.into_bytes();
        let mut rev = 0;
        let mut kvs = vec![];
        loop {
            let mut opts = ec::GetOptions::new()
                .with_range(end.clone())
                .with_limit(LIST_PAGE);
            if rev > 0 {
                opts = opts.with_revision(rev);
            }
            let r = self
                .client()
                .kv_client()
                .get(from.clone(), Some(opts))
                .await;
            let r = self.check(r, None).await?;
            if rev == 0 {
                rev = header_rev(r.header());
            }
            let Some(last) = r.kvs().last() else { break };
            from = last.key().to_vec();
            from.push(0);
            kvs.extend(r.kvs().iter().map(|kv| self.kv(kv)));
            if !r.more() {
                break;
            }
        }
        // A scope without a trailing slash ("/ferry/hosts/h1"): "" also matches a longer
        // sibling ("/ferry/hosts/h10/..."); its keys are not this scope's.
        let open_scope = !self.prefix.is_empty() && !self.prefix.ends_with('/');
        Ok((
            kvs.into_iter()
                .filter(|kv| !open_scope || prefix.starts_with('/') || kv.key.starts_with('/'))
                .collect(),
            rev,
        ))
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<i64, StoreError> {
        let r = self
            .client()
            .kv_client()
            .put(
                self.full(key),
                value,
                lease.map(|l| ec::PutOptions::new().with_lease(l)),
            )
            .await;
        let r = self.check(r, lease).await?;
        Ok(header_rev(r.header()))
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let r = self.client().kv_client().delete(self.full(key), None).await;
        let r = self.check(r, None).await?;
        Ok(r.deleted() > 0)
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        let compares: Vec<ec::Compare> = txn
            .compare
            .iter()
            .map(|c| match c {
                Compare::Version(k, c, v) => ec::Compare::version(self.full(k), cmp(*c), *v),
                Compare::ModRev(k, c, v) => ec::Compare::mod_revision(self.full(k), cmp(*c), *v),
                Compare::Value(k, c, v) => ec::Compare::value(self.full(k), cmp(*c), v.clone()),
            })
            .collect();
        let lease = txn
            .success
            .iter()
            .chain(&txn.failure)
            .find_map(|o| match o {
                Op::Put { lease, .. } => *lease,
                _ => None,
            });
        let t = ec::Txn::new()
            .when(compares)
            .and_then(txn.success.iter().map(|o| self.op(o)).collect::<Vec<_>>())
            .or_else(txn.failure.iter().map(|o| self.op(o)).collect::<Vec<_>>());
        let r = self.client().kv_client().txn(t).await;
        let r = self.check(r, lease).await?;
        let gets = r
            .op_responses()
            .into_iter()
            .filter_map(|o| match o {
                ec::TxnOpResponse::Get(g) => Some(g.kvs().first().map(|kv| self.kv(kv))),
                _ => None,
            })
            .collect();
        Ok(TxnResponse {
            succeeded: r.succeeded(),
            revision: header_rev(r.header()),
            gets,
        })
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        // etcd counts in whole seconds (and raises a TTL below its minimum to it).
        let secs = i64::try_from(ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0))
            .unwrap_or(i64::MAX)
            .max(1);
        let r = self.client().lease_client().grant(secs, None).await;
        let r = self.check(r, None).await?;
        Ok(r.id())
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        let r = self.client().lease_client().keep_alive(lease).await;
        let (mut keeper, mut stream) = self.check(r, Some(lease)).await?;
        let r = keeper.keep_alive().await;
        self.check(r, Some(lease)).await?;
        let reply = tokio::time::timeout(REQUEST_TIMEOUT, stream.message())
            .await
            .map_err(|_| StoreError::Timeout("lease keep-alive"))?;
        let reply = self.check(reply, Some(lease)).await?;
        match reply {
            Some(r) if r.ttl() > 0 => Ok(()),
            _ => Err(StoreError::LeaseNotFound(lease)),
        }
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        let r = self.client().lease_client().revoke(lease).await;
        self.check(r, Some(lease)).await?;
        Ok(())
    }

    async fn watch(
        &self,
        prefix: &str,
        after: Option<i64>,
    ) -> Result<mpsc::Receiver<WatchEvent>, StoreError> {
        let mut opts = ec::WatchOptions::new().with_prefix();
        if let Some(a) = after.filter(|a| *a > 0) {
            // etcd answers a watch from a compacted revision with "created" first and
            // the cancellation only later: a read at the revision says it at once.
            let at = self
                .client()
                .kv_client()
                .get(
                    self.full(prefix),
                    Some(ec::GetOptions::new().with_count_only().with_revision(a)),
                )
                .await;
            if let Err(e) = &at {
                if e.to_string().contains("compacted") {
                    return Err(StoreError::Compacted {
                        requested: a,
                        oldest: a + 1,
                    });
                }
            }
            self.check(at, None).await?;
            opts = opts.with_start_revision(a + 1);
        }
        let r = self
            .client()
            .watch_client()
            .watch(self.full(prefix), Some(opts))
            .await;
        let mut stream = self.check(r, None).await?;
        let (tx, rx) = mpsc::channel(256);
        let me = self.clone();
        // The first answer says whether the start revision is still there.
        let r = stream.message().await;
        let first = self.check(r, None).await?;
        if let Some(r) = &first {
            if r.compact_revision() > 0 {
                return Err(StoreError::Compacted {
                    requested: after.unwrap_or(0),
                    oldest: r.compact_revision(),
                });
            }
        }
        tokio::spawn(async move {
            let mut next = first;
            loop {
                let Some(r) = next else { return };
                if r.canceled() {
                    // Compaction or cancellation: closing the channel tells the caller
                    // to re-list.
                    return;
                }
                for e in r.events() {
                    let Some(kv) = e.kv() else { continue };
                    let kv = me.kv(kv);
                    let ev = WatchEvent {
                        revision: kv.mod_rev,
                        kind: match e.event_type() {
                            ec::EventType::Put => EventKind::Put,
                            ec::EventType::Delete => EventKind::Delete,
                        },
                        key: kv.key,
                        value: kv.value,
                    };
                    if tx.send(ev).await.is_err() {
                        return;
                    }
                }
                next = match stream.message().await {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::debug!(error = %e, "etcd watch ended");
                        return;
                    }
                };
            }
        });
        Ok(rx)
    }

    async fn revision(&self) -> Result<i64, StoreError> {
        let r = self
            .client()
            .kv_client()
            .get(self.full(""), Some(ec::GetOptions::new().with_count_only()))
            .await;
        let r = self.check(r, None).await?;
        Ok(header_rev(r.header()))
    }
}
