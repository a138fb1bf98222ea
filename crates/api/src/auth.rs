//! Who may call the API — decided by what a caller proves, never by its address.
//!
//! - **Local clients** come over the unix socket `{run_dir}/api.sock` (0660); the kernel
//!   tells who they are (`SO_PEERCRED`): root, or a member of the `ferry` group, may
//!   call everything.
//! - **Over TCP** a request carries the admin token (`Authorization: Bearer …`; the
//!   cluster's hosts share it and send it on every host-to-host call), or the web UI's
//!   session: a signed ticket in the `ferry_ticket` cookie (HttpOnly, SameSite=Strict,
//!   valid for [`TICKET_LIFETIME`]), which `POST /api/v1/login` sets for the token.
//!   A browser's write (anything but GET/HEAD) with a ticket must also carry the
//!   `X-Ferry-CSRF` header (a form on another site cannot send one); a websocket that
//!   names an Origin must come from the page's own origin.
//! - Everything else gets 401 (403 for a missing CSRF header or a foreign Origin) and
//!   changes nothing. Open to all: the UI's files, login/logout/session, the OpenAPI
//!   document.
//!
//! Loopback, the host's own address and the cluster members' addresses are not trusted:
//! a guest on a host bridge can take any of them.

use crate::error::{ApiJson, ApiResult};
use crate::ApiError;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use ferry_agent::Agent;
use ferry_types::{LoginRequest, Session};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The cookie the web UI's login sets: a signed ticket, never the token.
pub const COOKIE: &str = "ferry_ticket";
/// The header a browser's write must carry along with the ticket.
pub const CSRF_HEADER: &str = "x-ferry-csrf";
/// How long a login lasts.
pub const TICKET_LIFETIME: Duration = Duration::from_secs(2 * 3600);
/// The token's file in the state directory.
pub const TOKEN_FILE: &str = "admin-token";
/// The largest body a caller without credentials may send.
pub const OPEN_BODY_LIMIT: usize = 64 << 10;
/// The group whose members may use the local socket besides root.
pub const GROUP: &str = "ferry";

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

/// The daemon's admin token, and the key its session tickets are signed with (derived
/// from the token: a new token ends every session).
#[derive(Clone)]
pub struct Auth {
    token: Arc<str>,
    key: Arc<[u8; 32]>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Auth(..)")
    }
}

/// Who a request is from, as proven (kept in the request's extensions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A process on this host, over the unix socket.
    Local { uid: u32 },
    /// The admin token (the CLI from elsewhere).
    Token,
    /// Another host of the cluster, by its certificate (mutual TLS).
    Peer {
        host: String,
        serial: Option<String>,
    },
    /// A browser session.
    Session { user: String },
}

impl Auth {
    pub fn new(token: &str) -> Auth {
        use sha2::Digest;
        let mut h = Sha256::new();
        h.update(b"ferry session ticket key\0");
        h.update(token.as_bytes());
        Auth {
            token: token.into(),
            key: Arc::new(h.finalize().into()),
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

    /// Whether the request carries the token as its bearer.
    pub fn bearer(&self, headers: &HeaderMap) -> bool {
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .is_some_and(|t| same(t, &self.token))
    }

    fn mac(&self, payload: &str) -> String {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.key[..])
            .expect("HMAC takes any key length");
        m.update(payload.as_bytes());
        m.finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// A ticket for `user`, valid until `now + TICKET_LIFETIME`: `user:expiry:mac`.
    pub fn ticket(&self, user: &str, now: SystemTime) -> String {
        let expiry = (now + TICKET_LIFETIME)
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let payload = format!("{user}:{expiry}");
        let mac = self.mac(&payload);
        format!("{payload}:{mac}")
    }

    /// The user of a ticket that this daemon signed and that has not expired.
    pub fn check_ticket(&self, ticket: &str, now: SystemTime) -> Option<String> {
        let (payload, mac) = ticket.rsplit_once(':')?;
        let (user, expiry) = payload.rsplit_once(':')?;
        let expiry: u64 = expiry.parse().ok()?;
        let now = now.duration_since(UNIX_EPOCH).ok()?.as_secs();
        (same(mac, &self.mac(payload)) && now < expiry).then(|| user.to_string())
    }

    /// The user of the request's session cookie, if it holds a valid ticket.
    pub fn session(&self, headers: &HeaderMap) -> Option<String> {
        cookie(headers, COOKIE).and_then(|t| self.check_ticket(&t, SystemTime::now()))
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

/// Where a connection came from (what `ferry serve` records for each one).
#[derive(Debug, Clone)]
pub enum ConnInfo {
    /// Over TCP: the remote address, for logs only (it proves nothing).
    Tcp { remote: SocketAddr },
    /// Over TLS: the remote address (for logs only) and the cluster host named by the
    /// client certificate the handshake verified against the cluster CA, if one was
    /// shown.
    Tls {
        remote: SocketAddr,
        peer: Option<Arc<str>>,
        /// The serial of that certificate (checked against the member record).
        serial: Option<Arc<str>>,
    },
    /// Over the unix socket: the kernel's word on the client process.
    Unix {
        uid: u32,
        gid: u32,
        pid: Option<i32>,
    },
}

/// Root, or a process whose primary group is `ferry_gid` (or that is in it).
fn trusted_local(uid: u32, gid: u32, pid: Option<i32>, ferry_gid: Option<u32>) -> bool {
    if uid == 0 {
        return true;
    }
    let Some(fg) = ferry_gid else { return false };
    gid == fg || pid.is_some_and(|p| process_groups(p).contains(&fg))
}

/// The supplementary groups of a process (from `/proc/PID/status`).
fn process_groups(pid: i32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Groups:")).map(|g| {
                g.split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// The `ferry` group's id, if the group exists.
pub fn ferry_gid() -> Option<u32> {
    nix::unistd::Group::from_name(GROUP)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
}

fn conn(req: &Request) -> Option<ConnInfo> {
    let x = req.extensions();
    x.get::<axum::extract::ConnectInfo<ConnInfo>>()
        .map(|c| c.0.clone())
        .or_else(|| {
            x.get::<axum::extract::connect_info::MockConnectInfo<ConnInfo>>()
                .map(|c| c.0.clone())
        })
}

fn open_path(method: &Method, path: &str) -> bool {
    // A joining host's request carries a join token (the handler checks it).
    if method == Method::POST && path == "/api/v1/cluster/members" {
        return true;
    }
    !(path.starts_with("/api/") || path == "/metrics")
        || matches!(
            path,
            "/api/v1/login" | "/api/v1/logout" | "/api/v1/session" | "/api/v1/openapi.json"
        )
        || path.starts_with("/api/docs")
}

/// A websocket whose Origin names another site than the Host it was sent to.
fn foreign_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return false;
    };
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let origin_host = origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .map(|(_, rest)| rest.trim_end_matches('/'));
    !matches!((origin_host, host), (Some(o), Some(h)) if o.eq_ignore_ascii_case(h))
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
}

/// What the request proves, or why it is refused (status and reason).
fn decide(
    auth: &Auth,
    conn: Option<ConnInfo>,
    method: &Method,
    headers: &HeaderMap,
    ferry_gid: Option<u32>,
) -> Result<Caller, (StatusCode, &'static str)> {
    if is_upgrade(headers) && foreign_origin(headers) {
        return Err((
            StatusCode::FORBIDDEN,
            "A websocket from another site's page is refused (its Origin is not this host)",
        ));
    }
    match conn {
        Some(ConnInfo::Unix { uid, gid, pid }) if trusted_local(uid, gid, pid, ferry_gid) => {
            return Ok(Caller::Local { uid });
        }
        Some(ConnInfo::Tls {
            peer: Some(host),
            serial,
            ..
        }) => {
            return Ok(Caller::Peer {
                host: host.to_string(),
                serial: serial.map(|s| s.to_string()),
            })
        }
        _ => {}
    }
    if auth.bearer(headers) {
        return Ok(Caller::Token);
    }
    if let Some(user) = auth.session(headers) {
        let read = matches!(*method, Method::GET | Method::HEAD);
        if !read && !is_upgrade(headers) && !headers.contains_key(CSRF_HEADER) {
            return Err((
                StatusCode::FORBIDDEN,
                "A write from the browser must carry the X-Ferry-CSRF header",
            ));
        }
        return Ok(Caller::Session { user });
    }
    Err((
        StatusCode::UNAUTHORIZED,
        "Log in first: send the admin token (Authorization: Bearer TOKEN; the CLI reads --token-file or FERRY_TOKEN, or uses the local socket as root); `ferry serve` made it on its first start and keeps it in STATE_DIR/admin-token (root only)",
    ))
}

/// The middleware: lets a request through (with its [`Caller`]) or refuses it.
pub async fn require(
    State((auth, agent)): State<(Auth, Agent)>,
    mut req: Request,
    next: Next,
) -> Response {
    let c = conn(&req);
    match decide(&auth, c.clone(), req.method(), req.headers(), ferry_gid()) {
        // A certificate of the CA, but not (or no longer) a member's: a host that
        // left, or a renewed certificate's predecessor.
        Ok(Caller::Peer { host, serial })
            if !agent.peer_allowed(&host, serial.as_deref()).await =>
        {
            tracing::warn!(%host, ?serial, "a certificate of no current member refused");
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "This host certificate belongs to no current member of the cluster",
            )
            .into_response()
        }
        Ok(caller) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Err(_) if open_path(req.method(), req.uri().path()) => {
            // Callers without credentials get small bodies only (a join request is a
            // few KiB).
            let req = req
                .map(|b| axum::body::Body::new(http_body_util::Limited::new(b, OPEN_BODY_LIMIT)));
            next.run(req).await
        }
        Err((status, why)) => {
            if let Some(ConnInfo::Tcp { remote } | ConnInfo::Tls { remote, .. }) = c {
                tracing::debug!(%remote, path = req.uri().path(), %status, "request refused");
            }
            ApiError::new(status, why).into_response()
        }
    }
}

#[utoipa::path(post, path = "/api/v1/login", tag = "host", request_body = LoginRequest,
    responses((status = 200, description = "Logged in; sets the session cookie (a signed ticket)", body = Session),
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
        "{COOKIE}={}; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age={}",
        auth.ticket("root", SystemTime::now()),
        TICKET_LIFETIME.as_secs()
    );
    let mut resp = Json(Session {
        authenticated: true,
        host: agent.host_name().to_string(),
    })
    .into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&cookie)
            .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "Malformed ticket"))?,
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
    responses((status = 200, description = "Whether this request is logged in (admin token or a valid session ticket)", body = Session)))]
pub async fn session(
    State(agent): State<Agent>,
    Extension(auth): Extension<Auth>,
    headers: HeaderMap,
) -> Json<Session> {
    Json(Session {
        authenticated: auth.bearer(&headers) || auth.session(&headers).is_some(),
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

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn bearer_only_when_equal_and_the_cookie_is_no_token() {
        let a = Auth::new("0123456789abcdef0123");
        assert!(!a.bearer(&HeaderMap::new()));
        let wrong = headers(&[(header::AUTHORIZATION, "Bearer 0123456789abcdef0124")]);
        assert!(!a.bearer(&wrong));
        let right = headers(&[(header::AUTHORIZATION, "Bearer 0123456789abcdef0123")]);
        assert!(a.bearer(&right));
        let raw = headers(&[(header::COOKIE, "ferry_ticket=0123456789abcdef0123")]);
        assert!(a.session(&raw).is_none());
    }

    #[test]
    fn tickets_are_signed_and_expire() {
        let a = Auth::new("0123456789abcdef0123");
        let now = SystemTime::now();
        let t = a.ticket("root", now);
        assert_eq!(a.check_ticket(&t, now).as_deref(), Some("root"));
        assert_eq!(a.check_ticket(&t, now + TICKET_LIFETIME), None);
        let forged = t.replacen("root", "admin", 1);
        assert_eq!(a.check_ticket(&forged, now), None);
        let (payload, _) = t.rsplit_once(':').unwrap();
        let longer = format!("root:99999999999:{}", &t[payload.len() + 1..]);
        assert_eq!(a.check_ticket(&longer, now), None);
        // Another token signs other tickets.
        assert_eq!(Auth::new("other-token-0123456").check_ticket(&t, now), None);
    }

    /// No address is trusted: loopback, the host's own or any other. Only the kernel's
    /// word on a unix socket client, the token, or a ticket (with the CSRF header for
    /// writes; a websocket from a foreign origin is refused).
    #[test]
    fn callers_are_decided_by_proof_never_by_address() {
        let a = Auth::new("0123456789abcdef0123");
        let tcp = |r: &str| {
            Some(ConnInfo::Tcp {
                remote: r.parse().unwrap(),
            })
        };
        let none = HeaderMap::new();
        for r in ["127.0.0.1:5000", "[::1]:5000", "10.1.0.1:5000"] {
            let d = decide(&a, tcp(r), &Method::GET, &none, None);
            assert_eq!(d.unwrap_err().0, StatusCode::UNAUTHORIZED, "{r}");
        }
        let unix = |uid, gid| {
            Some(ConnInfo::Unix {
                uid,
                gid,
                pid: None,
            })
        };
        assert_eq!(
            decide(&a, unix(0, 0), &Method::POST, &none, None),
            Ok(Caller::Local { uid: 0 })
        );
        assert!(decide(&a, unix(1000, 1000), &Method::GET, &none, None).is_err());
        assert!(decide(&a, unix(1000, 990), &Method::GET, &none, Some(990)).is_ok());
        // TLS: a verified client certificate names a host; without one, nothing.
        let tls = |peer: Option<&str>| {
            Some(ConnInfo::Tls {
                remote: "10.1.0.12:4000".parse().unwrap(),
                peer: peer.map(Arc::from),
                serial: None,
            })
        };
        assert_eq!(
            decide(&a, tls(Some("h2")), &Method::POST, &none, None),
            Ok(Caller::Peer {
                host: "h2".into(),
                serial: None
            })
        );
        assert_eq!(
            decide(&a, tls(None), &Method::GET, &none, None)
                .unwrap_err()
                .0,
            StatusCode::UNAUTHORIZED
        );
        let bearer = headers(&[(header::AUTHORIZATION, "Bearer 0123456789abcdef0123")]);
        assert_eq!(
            decide(&a, tcp("10.9.9.9:1"), &Method::DELETE, &bearer, None),
            Ok(Caller::Token)
        );
        let t = a.ticket("root", SystemTime::now());
        let c = format!("{COOKIE}={t}");
        let sess = headers(&[(header::COOKIE, &c)]);
        assert!(decide(&a, tcp("10.9.9.9:1"), &Method::GET, &sess, None).is_ok());
        let e = decide(&a, tcp("10.9.9.9:1"), &Method::POST, &sess, None).unwrap_err();
        assert_eq!(e.0, StatusCode::FORBIDDEN);
        let csrf = headers(&[(header::COOKIE, &c), (CSRF_HEADER.parse().unwrap(), "1")]);
        assert!(decide(&a, tcp("10.9.9.9:1"), &Method::POST, &csrf, None).is_ok());
        let ws = |origin: &str| {
            headers(&[
                (header::COOKIE, &c),
                (header::UPGRADE, "websocket"),
                (header::HOST, "10.0.0.11:8470"),
                (header::ORIGIN, origin),
            ])
        };
        assert!(decide(
            &a,
            tcp("10.9.9.9:1"),
            &Method::GET,
            &ws("https://10.0.0.11:8470"),
            None
        )
        .is_ok());
        let e = decide(
            &a,
            tcp("10.9.9.9:1"),
            &Method::GET,
            &ws("https://evil.example"),
            None,
        );
        assert_eq!(e.unwrap_err().0, StatusCode::FORBIDDEN);
        // Even root's own socket does not open a websocket for a foreign page.
        let mut h = ws("http://evil.example");
        h.remove(header::COOKIE);
        assert!(decide(&a, unix(0, 0), &Method::GET, &h, None).is_err());
    }
}
