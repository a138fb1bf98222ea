//! Who may call the API. One admin token per daemon, made on first start and kept in
//! `STATE_DIR/admin-token` (0600); `ferry serve` prints it then. A request is allowed
//! when it carries the token (`Authorization: Bearer …`, or the `ferry_token` cookie the
//! web UI's login sets) or comes from a trusted peer: a process on this host (loopback,
//! or a connection from the host's own address) or another host of the cluster (its
//! address, as the cluster lists it — the host-to-host calls of migration and
//! replication). Everything else gets 401 and changes nothing. Open to all: the UI's
//! files, login/session, and the OpenAPI document.

use crate::error::{ApiJson, ApiResult};
use crate::ApiError;
use axum::extract::connect_info::Connected;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::serve::IncomingStream;
use axum::{Extension, Json};
use ferry_agent::Agent;
use ferry_types::{LoginRequest, Session};
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

/// The cookie the web UI's login sets.
pub const COOKIE: &str = "ferry_token";
/// The token's file in the state directory.
pub const TOKEN_FILE: &str = "admin-token";

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("Read the admin token {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Write the admin token {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "The admin token in {path} is empty or malformed (delete it and restart to make a new one)"
    )]
    Malformed { path: String },
}

/// The daemon's admin token.
#[derive(Clone)]
pub struct Auth {
    token: Arc<str>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Auth(..)")
    }
}

impl Auth {
    pub fn new(token: &str) -> Auth {
        Auth {
            token: token.into(),
        }
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    /// Loads `STATE_DIR/admin-token`, or makes it (32 random bytes, hex, mode 0600).
    /// The flag says whether it was made now.
    pub fn load_or_create(state_dir: &Path) -> Result<(Auth, bool), AuthError> {
        let path = state_dir.join(TOKEN_FILE);
        let shown = path.display().to_string();
        match std::fs::read_to_string(&path) {
            Ok(s) => {
                let t = s.trim();
                if t.len() < 16 || !t.bytes().all(|b| b.is_ascii_alphanumeric()) {
                    return Err(AuthError::Malformed { path: shown });
                }
                return Ok((Auth::new(t), false));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(AuthError::Read {
                    path: shown,
                    source,
                })
            }
        }
        let mut bytes = [0u8; 32];
        let write = |source| AuthError::Write {
            path: shown.clone(),
            source,
        };
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
            .map_err(write)?;
        let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        std::fs::create_dir_all(state_dir).map_err(write)?;
        let tmp = state_dir.join(format!("{TOKEN_FILE}.new"));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(write)?;
        f.write_all(format!("{token}\n").as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(write)?;
        std::fs::rename(&tmp, &path).map_err(write)?;
        Ok((Auth::new(&token), true))
    }

    /// Whether the request carries the token (header or cookie).
    pub fn presented(&self, headers: &HeaderMap) -> bool {
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        bearer.is_some_and(|t| same(t, &self.token))
            || cookie(headers, COOKIE).is_some_and(|t| same(&t, &self.token))
    }
}

/// Compares without stopping at the first difference.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// Both ends of a connection (what `ferry serve` records for each one).
#[derive(Debug, Clone, Copy)]
pub struct PeerAddrs {
    pub remote: SocketAddr,
    pub local: SocketAddr,
}

impl Connected<IncomingStream<'_, tokio::net::TcpListener>> for PeerAddrs {
    fn connect_info(s: IncomingStream<'_, tokio::net::TcpListener>) -> PeerAddrs {
        PeerAddrs {
            remote: *s.remote_addr(),
            local: s.io().local_addr().unwrap_or(*s.remote_addr()),
        }
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// A process on this host: loopback, or connected from the address it connected to.
fn local_peer(p: &PeerAddrs) -> bool {
    let r = canonical(p.remote.ip());
    r.is_loopback() || r == canonical(p.local.ip())
}

/// Another host of the cluster, calling from its own address.
async fn cluster_peer(agent: &Agent, p: &PeerAddrs) -> bool {
    let r = canonical(p.remote.ip());
    let Ok(hosts) = agent.cluster_hosts().await else {
        return false;
    };
    hosts.iter().any(|h| {
        let api_host = h
            .api
            .split("://")
            .nth(1)
            .and_then(|rest| rest.split(['/', ':']).next())
            .unwrap_or("");
        [h.address.as_str(), api_host]
            .iter()
            .any(|a| a.parse::<IpAddr>().is_ok_and(|ip| canonical(ip) == r))
    })
}

fn peer(req: &Request) -> Option<PeerAddrs> {
    let x = req.extensions();
    x.get::<axum::extract::ConnectInfo<PeerAddrs>>()
        .map(|c| c.0)
        .or_else(|| {
            x.get::<axum::extract::connect_info::MockConnectInfo<PeerAddrs>>()
                .map(|c| c.0)
        })
}

fn open_path(path: &str) -> bool {
    !(path.starts_with("/api/") || path == "/metrics")
        || matches!(
            path,
            "/api/v1/login" | "/api/v1/logout" | "/api/v1/session" | "/api/v1/openapi.json"
        )
        || path.starts_with("/api/docs")
}

/// The middleware: lets a request through or answers 401.
pub async fn require(
    State((auth, agent)): State<(Auth, Agent)>,
    req: Request,
    next: Next,
) -> Response {
    if open_path(req.uri().path()) || auth.presented(req.headers()) {
        return next.run(req).await;
    }
    if let Some(p) = peer(&req) {
        if local_peer(&p) || cluster_peer(&agent, &p).await {
            return next.run(req).await;
        }
    }
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "Log in first: send the admin token (Authorization: Bearer TOKEN, or FERRY_TOKEN for the CLI); `ferry serve` printed it on its first start and keeps it in STATE_DIR/admin-token",
    )
    .into_response()
}

#[utoipa::path(post, path = "/api/v1/login", tag = "host", request_body = LoginRequest,
    responses((status = 200, description = "Logged in; sets the session cookie", body = Session),
              (status = 401, description = "Wrong token", body = ferry_types::ApiErrorBody)))]
pub async fn login(
    State(agent): State<Agent>,
    Extension(auth): Extension<Auth>,
    ApiJson(req): ApiJson<LoginRequest>,
) -> ApiResult<Response> {
    if !same(req.token.trim(), auth.token()) {
        tracing::warn!("login with a wrong token");
        return Err(ApiError::new(StatusCode::UNAUTHORIZED, "Wrong token"));
    }
    let cookie = format!(
        "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict",
        auth.token()
    );
    let mut resp = Json(Session {
        authenticated: true,
        host: agent.host_name().to_string(),
    })
    .into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&cookie).map_err(|_| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "Malformed admin token")
        })?,
    );
    Ok(resp)
}

#[utoipa::path(post, path = "/api/v1/logout", tag = "host",
    responses((status = 204, description = "The session cookie is cleared")))]
pub async fn logout() -> Response {
    (
        StatusCode::NO_CONTENT,
        [(
            header::SET_COOKIE,
            format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
        )],
    )
        .into_response()
}

#[utoipa::path(get, path = "/api/v1/session", tag = "host",
    responses((status = 200, description = "Whether this request carries the admin token", body = Session)))]
pub async fn session(
    State(agent): State<Agent>,
    Extension(auth): Extension<Auth>,
    headers: HeaderMap,
) -> Json<Session> {
    Json(Session {
        authenticated: auth.presented(&headers),
        host: agent.host_name().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_made_once_private_and_kept() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let (a, made) = Auth::load_or_create(d.path()).unwrap();
        assert!(made);
        assert_eq!(a.token().len(), 64);
        let mode = std::fs::metadata(d.path().join(TOKEN_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (b, made) = Auth::load_or_create(d.path()).unwrap();
        assert!(!made);
        assert_eq!(a.token(), b.token());
        std::fs::write(d.path().join(TOKEN_FILE), "x y\n").unwrap();
        let e = Auth::load_or_create(d.path()).unwrap_err();
        assert!(e.to_string().contains("malformed"), "{e}");
    }

    #[test]
    fn token_from_header_or_cookie_only_when_equal() {
        let a = Auth::new("0123456789abcdef0123");
        let mut h = HeaderMap::new();
        assert!(!a.presented(&h));
        h.insert(
            header::AUTHORIZATION,
            "Bearer 0123456789abcdef0124".parse().unwrap(),
        );
        assert!(!a.presented(&h));
        h.insert(
            header::AUTHORIZATION,
            "Bearer 0123456789abcdef0123".parse().unwrap(),
        );
        assert!(a.presented(&h));
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            "a=b; ferry_token=0123456789abcdef0123".parse().unwrap(),
        );
        assert!(a.presented(&h));
        h.insert(
            header::COOKIE,
            "ferry_token=0123456789abcdef012".parse().unwrap(),
        );
        assert!(!a.presented(&h));
    }

    #[test]
    fn local_peers_are_loopback_or_own_address() {
        let p = |r: &str, l: &str| PeerAddrs {
            remote: r.parse().unwrap(),
            local: l.parse().unwrap(),
        };
        assert!(local_peer(&p("127.0.0.1:5000", "127.0.0.1:8470")));
        assert!(local_peer(&p("10.1.0.1:5000", "10.1.0.1:8470")));
        assert!(local_peer(&p("[::ffff:10.1.0.1]:5000", "10.1.0.1:8470")));
        assert!(!local_peer(&p("10.1.0.2:5000", "10.1.0.1:8470")));
    }
}
