//! The link to the other hosts of a cluster: the etcd cluster this host belongs to
//! ([`ClusterLink`]), the hosts (etcd's members, or a static cluster file) and a small
//! HTTPS client to their APIs ([`Peer`]: mutual TLS, each peer checked for its host
//! name).

use crate::cache::ClusterCache;
use crate::error::{AgentError, Failure, Refusal, Result};
use crate::Host;
use ferry_store::keys::cluster::{MEMBERS, ROOT};
use ferry_store::{EtcdStore, Prefixed, Store, StoreJson};
use ferry_types::{ApiErrorBody, ClusterConfig, ClusterFile, ClusterHost};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;

/// The largest answer this host's own calls read from another host's API (VM
/// records, plans: far below this). Requests forwarded for a user (`forward`) pass
/// the other host's answer on as it is.
const MAX_PEER_ANSWER: usize = 64 << 20;

/// The daemon's connection to the cluster.
#[derive(Clone)]
pub struct ClusterLink {
    pub cfg: ClusterConfig,
    /// The cluster's keys (under `/ferry` in etcd).
    pub root: Arc<dyn Store>,
    /// The etcd client behind `root`, for what only etcd does (membership, users,
    /// endpoints); none for a cluster simulated on another store in a test.
    etcd: Option<EtcdStore>,
    /// The cluster's records in memory, started on first use; clones of the link
    /// share it.
    cache: Arc<std::sync::OnceLock<ClusterCache>>,
}

impl ClusterLink {
    /// A link to an etcd cluster.
    pub fn on_etcd(cfg: ClusterConfig, root: EtcdStore) -> ClusterLink {
        ClusterLink {
            cfg,
            root: Arc::new(root.clone()),
            etcd: Some(root),
            cache: Arc::default(),
        }
    }

    /// A cluster simulated on `root` (hosts of one test sharing one store).
    pub fn simulated(cfg: ClusterConfig, root: Arc<dyn Store>) -> ClusterLink {
        ClusterLink {
            cfg,
            root,
            etcd: None,
            cache: Arc::default(),
        }
    }

    /// The same link sharing `other`'s cache (simulated hosts of one process: one copy
    /// of the cluster in memory instead of one per host).
    pub fn sharing_cache_of(mut self, other: &ClusterLink) -> ClusterLink {
        self.cache = other.cache.clone();
        self
    }

    /// The cluster's records in memory (mirrors started on the first call, which must
    /// come from within the runtime).
    pub fn cache(&self) -> &ClusterCache {
        self.cache
            .get_or_init(|| ClusterCache::start(self.root.clone()))
    }

    /// The cache when it holds a complete, current view (else the caller reads the
    /// store).
    pub fn synced_cache(&self) -> Option<&ClusterCache> {
        Some(self.cache()).filter(|c| c.synced())
    }

    /// The etcd client, for membership, users and endpoints.
    pub fn etcd(&self) -> Result<&EtcdStore> {
        self.etcd.as_ref().ok_or_else(|| {
            AgentError::refused(
                crate::error::Refusal::Membership,
                "this cluster is simulated: it has no etcd",
            )
        })
    }

    /// This host's own store (its subtree, `/hosts/{name}` under the root: in etcd
    /// `/ferry/hosts/{name}`).
    pub fn host_store(&self) -> Prefixed {
        let scope = ferry_store::keys::cluster::host_scope(&self.cfg.name);
        Prefixed::new(self.root.clone(), scope.trim_end_matches('/'))
    }

    /// The members as the store has them now.
    pub async fn members(&self) -> Result<Vec<ClusterHost>> {
        Ok(self.root.list_json::<ClusterHost>(MEMBERS).await?)
    }

    /// Member `name` from the cache while it is in sync, else (not there yet, or the
    /// cache not in sync) from the store.
    pub async fn member(&self, name: &str) -> Result<Option<ClusterHost>> {
        let cached = self
            .cache()
            .members
            .read(|e| e.map.get(name).filter(|_| e.synced).map(|(h, _)| h.clone()));
        if cached.is_some() {
            return Ok(cached);
        }
        Ok(self
            .root
            .get_json::<ClusterHost>(&ferry_store::keys::cluster::member(name))
            .await?
            .map(|(h, _)| h))
    }
}

/// Host `name`'s scope as an etcd prefix (no trailing slash: the store adds keys
/// starting with one).
pub fn host_prefix(name: &str) -> String {
    format!(
        "{ROOT}{}",
        ferry_store::keys::cluster::host_scope(name).trim_end_matches('/')
    )
}

/// A call to another host's API.
#[derive(Clone)]
pub struct Peer {
    pub host: ClusterHost,
    http: reqwest::Client,
    /// The same without an overall timeout (disk uploads).
    upload: reqwest::Client,
    /// A bearer token sent with every request (only a joining host's join token: hosts
    /// of the cluster are known by their certificates).
    token: Option<String>,
}

/// The HTTPS client settings for calls to host `name`: this host's certificate shown,
/// the other's checked against the cluster CA and its name.
pub fn peer_tls(pki: &ferry_pki::HostPki, name: &str) -> rustls::ClientConfig {
    pki.client_config(ferry_pki::Expect::Host(name.to_string()))
}

impl Peer {
    /// A client of `host`'s API, known by the certificate naming it (mutual TLS).
    pub fn new(host: ClusterHost, timeout: Duration, pki: &ferry_pki::HostPki) -> Result<Peer> {
        let tls = peer_tls(pki, &host.name);
        Peer::with_tls(host, timeout, tls)
    }

    /// A client with the given TLS settings (joining: the CA pinned by fingerprint).
    pub fn with_tls(
        host: ClusterHost,
        timeout: Duration,
        tls: rustls::ClientConfig,
    ) -> Result<Peer> {
        let built = |b: reqwest::ClientBuilder| {
            b.build().map_err(|e| AgentError::Peer {
                host: host.name.clone(),
                what: "HTTP client".into(),
                status: None,
                code: None,
                source: Some(Box::new(e)),
            })
        };
        let http = built(
            reqwest::Client::builder()
                .use_preconfigured_tls(tls.clone())
                .timeout(timeout)
                .connect_timeout(Duration::from_secs(3))
                // Shorter than the peer's header-read timeout (10 s), which also ends
                // idle keep-alive connections: a pooled connection is never reused as
                // it closes.
                .pool_idle_timeout(Duration::from_secs(5)),
        )?;
        let upload = built(
            reqwest::Client::builder()
                .use_preconfigured_tls(tls)
                .connect_timeout(Duration::from_secs(3)),
        )?;
        Ok(Peer {
            host,
            http,
            upload,
            token: None,
        })
    }

    fn err(&self, what: String, source: Option<reqwest::Error>) -> AgentError {
        AgentError::Peer {
            host: self.host.name.clone(),
            what,
            status: None,
            code: None,
            source: source.map(|e| Box::new(e) as _),
        }
    }

    /// A join token, when there is one (hosts prove themselves by certificate).
    /// Adds the bearer (when joining) and, when the call is made for a user's
    /// request, who that user is (the other host records it; it decides nothing).
    fn authed(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        let req = match crate::audit::actor() {
            Some(who) => req.header(crate::audit::ON_BEHALF_HEADER, who),
            None => req,
        };
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    /// Sends `token` as the bearer of every request (joining).
    pub fn with_token(mut self, token: Option<String>) -> Peer {
        self.token = token;
        self
    }

    /// The answer's body, refused beyond `limit` bytes (another host's answer is
    /// checked like any input: this host's own calls cannot be made to buffer without
    /// bound).
    async fn read_capped(
        &self,
        mut resp: reqwest::Response,
        what: &str,
        limit: usize,
    ) -> Result<Vec<u8>> {
        let too_big = || {
            self.err(
                format!("{what}: the answer is larger than {limit} bytes"),
                None,
            )
        };
        if resp.content_length().is_some_and(|n| n > limit as u64) {
            return Err(too_big());
        }
        let mut out = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| self.err(format!("{what}: read the answer"), Some(e)))?
        {
            if out.len() + chunk.len() > limit {
                return Err(too_big());
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }

    async fn send<T: DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
        what: &str,
    ) -> Result<T> {
        self.send_limited(req, what, MAX_PEER_ANSWER).await
    }

    async fn send_limited<T: DeserializeOwned>(
        &self,
        mut req: reqwest::RequestBuilder,
        what: &str,
        limit: usize,
    ) -> Result<T> {
        req = self.authed(req);
        let resp = req
            .send()
            .await
            .map_err(|e| self.err(format!("{what}: cannot reach {}", self.host.api), Some(e)))?;
        let status = resp.status();
        let bytes = self.read_capped(resp, what, limit).await?;
        if !status.is_success() {
            let (msg, code) = serde_json::from_slice::<ApiErrorBody>(&bytes)
                .map(|b| {
                    let mut m = b.error;
                    for c in b.causes {
                        m.push_str(&format!("; {c}"));
                    }
                    (m, Some(b.code).filter(|c| !c.is_empty()))
                })
                .unwrap_or_else(|_| (String::from_utf8_lossy(&bytes).into_owned(), None));
            return Err(if status == reqwest::StatusCode::NOT_FOUND {
                AgentError::NotFound(format!("{msg} (on host {})", self.host.name))
            } else {
                AgentError::Peer {
                    host: self.host.name.clone(),
                    what: format!("{what}: {msg} ({status})"),
                    status: Some(status.as_u16()),
                    code,
                    source: None,
                }
            });
        }
        let body = if bytes.is_empty() {
            &b"null"[..]
        } else {
            &bytes[..]
        };
        serde_json::from_slice(body)
            .map_err(|e| self.err(format!("{what}: unexpected answer ({e})"), None))
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.get_limited(path, MAX_PEER_ANSWER).await
    }

    /// A GET whose answer may be at most `limit` bytes.
    pub async fn get_limited<T: DeserializeOwned>(&self, path: &str, limit: usize) -> Result<T> {
        let req = self.http.get(format!("{}{path}", self.host.api));
        self.send_limited(req, &format!("GET {path}"), limit).await
    }

    /// Streams a file as the body of a PUT (no overall timeout: disks are large).
    pub async fn put_file(&self, path: &str, file: &std::path::Path) -> Result<()> {
        let f = tokio::fs::File::open(file)
            .await
            .map_err(|source| AgentError::Io {
                what: format!("Open {}", file.display()),
                source,
            })?;
        let len = f.metadata().await.map(|m| m.len()).unwrap_or(0);
        let req = self
            .upload
            .put(format!("{}{path}", self.host.api))
            .header(reqwest::header::CONTENT_LENGTH, len)
            .body(reqwest::Body::wrap_stream(
                tokio_util::io::ReaderStream::new(f),
            ));
        self.send::<serde_json::Value>(req, &format!("PUT {path}"))
            .await
            .map(|_| ())
    }

    /// Sends bytes held in memory as the body of a PUT.
    pub async fn put_bytes(&self, path: &str, body: Vec<u8>) -> Result<()> {
        let req = self
            .upload
            .put(format!("{}{path}", self.host.api))
            .body(body);
        self.send::<serde_json::Value>(req, &format!("PUT {path}"))
            .await
            .map(|_| ())
    }

    pub async fn post<T: DeserializeOwned>(&self, path: &str, body: &impl Serialize) -> Result<T> {
        let req = self
            .http
            .post(format!("{}{path}", self.host.api))
            .json(body);
        self.send(req, &format!("POST {path}")).await
    }

    /// Sends a request as it came (the web UI's calls for another host) and hands back
    /// status, content type and body unchanged.
    pub async fn forward(
        &self,
        method: reqwest::Method,
        path_and_query: &str,
        content_type: Option<String>,
        body: bytes::Bytes,
        proxied_for: Option<&str>,
    ) -> Result<(u16, Option<String>, bytes::Bytes)> {
        let mut req = self
            .http
            .request(method, format!("{}{path_and_query}", self.host.api));
        if let Some(ct) = content_type {
            req = req.header(reqwest::header::CONTENT_TYPE, ct);
        }
        if let Some(u) = proxied_for {
            req = req.header(crate::audit::PROXIED_FOR_HEADER, u);
        }
        let resp = self.authed(req).body(body).send().await.map_err(|e| {
            self.err(
                format!("{path_and_query}: cannot reach {}", self.host.api),
                Some(e),
            )
        })?;
        let status = resp.status().as_u16();
        let ct = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        let body = resp
            .bytes()
            .await
            .map_err(|e| self.err(format!("{path_and_query}: read the answer"), Some(e)))?;
        Ok((status, ct, body))
    }
}

/// What may be forwarded to another host: its API, not this proxy again, and a path
/// that means on the other host what it meant here — no percent-escapes and no `.` or
/// `..` segments (which a URL parser would resolve into another path than the one the
/// grants were checked for).
pub fn check_forwarded(path_and_query: &str) -> Result<()> {
    let path = path_and_query.split('?').next().unwrap_or_default();
    let odd =
        path.contains('%') || path.contains('\\') || path.split('/').any(|s| s == "." || s == "..");
    if !path.starts_with("/api/v1/") || path.starts_with("/api/v1/nodes/") || odd {
        return Err(AgentError::invalid(
            "path",
            format!("only plain /api/v1/ paths are forwarded to another host, not {path}"),
        ));
    }
    // A forwarded answer is read whole: a download of a backup's files (any size) is
    // asked of a host that reaches the store itself.
    if path.starts_with("/api/v1/backups/") && path.ends_with("/files/download") {
        return Err(AgentError::invalid(
            "path",
            "downloads of a backup's files are not forwarded: ask any host that reaches the store directly",
        ));
    }
    Ok(())
}

impl Host {
    /// A host of the cluster by name.
    pub async fn cluster_host(&self, host: &str) -> Result<ClusterHost> {
        if let Some(c) = &self.inner.cluster {
            return c
                .member(host)
                .await?
                .ok_or_else(|| AgentError::NotFound(format!("Host {host} of the cluster")));
        }
        let hosts = self.cluster_hosts().await?;
        hosts
            .into_iter()
            .find(|h| h.name == host)
            .ok_or_else(|| AgentError::NotFound(format!("Host {host} of the cluster")))
    }

    /// The base URL of a cluster host's API.
    pub async fn host_api(&self, host: &str) -> Result<String> {
        Ok(self.cluster_host(host).await?.api)
    }

    /// Forwards an API request to another host of the cluster (its answer unchanged).
    /// Only `/api/v1/...` paths, never to this proxy again.
    pub async fn forward_to_host(
        &self,
        host: &str,
        method: reqwest::Method,
        path_and_query: &str,
        content_type: Option<String>,
        body: bytes::Bytes,
        proxied_for: Option<&str>,
    ) -> Result<(u16, Option<String>, bytes::Bytes)> {
        check_forwarded(path_and_query)?;
        Peer::new(
            self.cluster_host(host).await?,
            Duration::from_secs(60),
            &self.inner.cfg.pki,
        )?
        .forward(method, path_and_query, content_type, body, proxied_for)
        .await
    }

    /// The TLS client settings for a connection to host `name` (mutual TLS, the
    /// other host known by its certificate's name).
    pub fn peer_tls(&self, name: &str) -> rustls::ClientConfig {
        peer_tls(&self.inner.cfg.pki, name)
    }

    /// Whether a peer whose verified client certificate names `host` (with `serial`)
    /// may call: a current member whose recorded certificate is this one. The cluster
    /// cache answers (while in sync) when it knows the member with this certificate
    /// (a member removed leaves it with the watch's next event); otherwise the
    /// member list is read (at most every 3 s); when the store cannot be read, the last
    /// list read decides (a cut-off host still answers its peers).
    pub async fn peer_allowed(&self, host: &str, serial: Option<&str>) -> bool {
        let fits = |h: &ClusterHost| {
            h.name == host && h.cert_serial.as_deref().is_none_or(|s| Some(s) == serial)
        };
        if let Some(c) = &self.inner.cluster {
            if c.cache()
                .members
                .read(|e| e.synced && e.map.get(host).is_some_and(|(h, _)| fits(h)))
            {
                return true;
            }
        }
        let fresh = {
            let k = self.inner.known_hosts.lock().expect("known hosts");
            k.as_ref()
                .filter(|(at, _)| at.elapsed() < Duration::from_secs(3))
                .map(|(_, h)| h.clone())
        };
        let hosts = match fresh {
            Some(h) => h,
            None => match self.cluster_hosts().await {
                Ok(h) => {
                    *self.inner.known_hosts.lock().expect("known hosts") =
                        Some((std::time::Instant::now(), h.clone()));
                    h
                }
                Err(e) => {
                    tracing::debug!(error = %e, "member list unreadable; using the last one");
                    let k = self.inner.known_hosts.lock().expect("known hosts");
                    k.as_ref().map(|(_, h)| h.clone()).unwrap_or_default()
                }
            },
        };
        hosts.iter().any(fits)
    }

    /// This host's certificates.
    pub fn pki(&self) -> &ferry_pki::HostPki {
        &self.inner.cfg.pki
    }

    /// This host's name in the cluster.
    pub fn host_name(&self) -> &str {
        &self.inner.cfg.host_name
    }

    /// The cluster's hosts (this one included): etcd's members, else the cluster file;
    /// none outside a cluster.
    pub async fn cluster_hosts(&self) -> Result<Vec<ClusterHost>> {
        if let Some(c) = &self.inner.cluster {
            return c.members().await;
        }
        let Some(path) = &self.inner.cfg.cluster_file else {
            return Ok(vec![]);
        };
        let bytes = std::fs::read(path).map_err(|source| AgentError::Io {
            what: format!("Read the cluster file {}", path.display()),
            source,
        })?;
        let f: ClusterFile = serde_json::from_slice(&bytes).map_err(|e| {
            AgentError::failed_by(
                Failure::Corrupt,
                format!("Cluster file {}", path.display()),
                e,
            )
        })?;
        Ok(f.hosts)
    }

    /// The API client of another host.
    pub async fn peer(&self, name: &str) -> Result<Peer> {
        self.peer_with_timeout(name, Duration::from_secs(30)).await
    }

    pub async fn peer_with_timeout(&self, name: &str, timeout: Duration) -> Result<Peer> {
        if name == self.host_name() {
            return Err(AgentError::invalid("to", format!("{name} is this host")));
        }
        let host = self.cluster_host(name).await.map_err(|e| match e {
            AgentError::NotFound(_) => AgentError::NotFound(format!("Host {name} in the cluster")),
            e => e,
        })?;
        Peer::new(host, timeout, &self.inner.cfg.pki)
    }

    /// This host's migration address (from the cluster file).
    pub async fn own_address(&self) -> Result<String> {
        self.cluster_hosts()
            .await?
            .into_iter()
            .find(|h| h.name == self.host_name())
            .map(|h| h.address)
            .ok_or_else(|| {
                AgentError::refused(
                    Refusal::Membership,
                    format!(
                        "This host ({}) is not in the cluster file",
                        self.host_name()
                    ),
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::check_forwarded;

    #[test]
    fn only_plain_api_paths_are_forwarded() {
        assert!(check_forwarded("/api/v1/vms?q=a").is_ok());
        assert!(check_forwarded("/api/v1/backups/b1/files?path=/disk0").is_ok());
        assert!(check_forwarded("/api/v1/backups/b1/files/download?path=/x").is_err());
        assert!(check_forwarded("/api/v1/nodes/h2/api/v1/vms").is_err());
        assert!(check_forwarded("/api/v1/vms/../access").is_err());
        assert!(check_forwarded("/api/v1/vms/%2e%2e").is_err());
        assert!(check_forwarded("/metrics").is_err());
    }
}
