//! Who may call the API — decided by what a caller proves, never by its address —
//! and what it may do there.
//!
//! - **Local clients** come over the unix socket `{run_dir}/api.sock` (0660); the kernel
//!   tells who they are (`SO_PEERCRED`): root, or a member of the `ferry` group, may
//!   call everything (recorded as `root` or `unix:NAME`).
//! - **Other hosts** of the cluster show their certificate (mutual TLS); one of a
//!   current member may call everything. A host passing on a user's request names
//!   that user (`x-ferry-user`), which is recorded and decides nothing.
//! - **Users** send `Authorization: Bearer` with an API token (`USER!ID=SECRET`,
//!   looked up by its digest; revoked or expired ones fail), this host's admin token
//!   (root's token `admin-HOST`), or a ticket from `POST /api/v1/login` (user and
//!   password, argon2id); the web UI keeps the ticket in the `ferry_ticket` cookie
//!   (HttpOnly, Secure, SameSite=Strict, valid for [`TICKET_LIFETIME`], void once the
//!   user's password changes or it is disabled). A browser's write with the cookie
//!   must also carry the `X-Ferry-CSRF` header; a websocket that names an Origin must
//!   come from the page's own origin.
//! - What a user may do is its grants' (`ferry_access::need` names the privilege and
//!   path of every call; root may do everything): 403 otherwise.
//! - Everything else gets 401 (403 for a missing CSRF header or a foreign Origin) and
//!   changes nothing. Open to all: the UI's files, login/logout/session, the OpenAPI
//!   document, a joining host's request.
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
use ferry_access::Need;
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
    /// A process on this host, over the unix socket: root, or a member of the `ferry`
    /// group (both may do everything, as root).
    Local { uid: u32 },
    /// A user: by an API token, a session ticket, or a host's admin token (root).
    User { name: String },
    /// Another host of the cluster, by its certificate (mutual TLS); `on_behalf` names
    /// the user whose request it passes on (recorded, not believed for anything else).
    Peer {
        host: String,
        serial: Option<String>,
        on_behalf: Option<String>,
    },
}

impl Caller {
    /// The name the request's work is recorded under (tasks, events).
    pub fn actor(&self) -> String {
        match self {
            Caller::Local { uid: 0 } => ferry_types::ROOT_USER.to_string(),
            Caller::Local { uid } => nix::unistd::User::from_uid((*uid).into())
                .ok()
                .flatten()
                .map_or_else(|| format!("uid:{uid}"), |u| format!("unix:{}", u.name)),
            Caller::User { name } => name.clone(),
            Caller::Peer {
                on_behalf: Some(u), ..
            } => u.clone(),
            Caller::Peer { host, .. } => format!("host:{host}"),
        }
    }

    /// The user whose grants decide, if any (local callers and hosts may do
    /// everything; root too).
    pub fn restricted_user(&self) -> Option<&str> {
        match self {
            Caller::User { name } if name != ferry_types::ROOT_USER => Some(name),
            _ => None,
        }
    }
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

    /// Signs tickets with `key` (the cluster's, from its store) instead of the key
    /// derived from the admin token: a ticket is then good on every host.
    pub fn with_ticket_key(self, key: &str) -> Auth {
        use sha2::Digest;
        let mut h = Sha256::new();
        h.update(b"ferry cluster ticket key\0");
        h.update(key.as_bytes());
        Auth {
            key: Arc::new(h.finalize().into()),
            ..self
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

    /// Whether `t` is this host's admin token.
    pub fn is_admin_token(&self, t: &str) -> bool {
        same(t.trim(), &self.token)
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

    /// A ticket for `user`, issued `now`, valid until `now + TICKET_LIFETIME`:
    /// `user:issued:expiry:mac` (times in Unix seconds).
    pub fn ticket(&self, user: &str, now: SystemTime) -> String {
        let secs = |t: SystemTime| {
            t.duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        };
        let payload = format!("{user}:{}:{}", secs(now), secs(now + TICKET_LIFETIME));
        let mac = self.mac(&payload);
        format!("{payload}:{mac}")
    }

    /// The user and issue time of a ticket that this daemon signed and that has not
    /// expired (whether its user still may log in is the caller's to check).
    pub fn check_ticket(&self, ticket: &str, now: SystemTime) -> Option<(String, u64)> {
        let (payload, mac) = ticket.rsplit_once(':')?;
        let (rest, expiry) = payload.rsplit_once(':')?;
        let (user, issued) = rest.rsplit_once(':')?;
        let expiry: u64 = expiry.parse().ok()?;
        let issued: u64 = issued.parse().ok()?;
        let now = now.duration_since(UNIX_EPOCH).ok()?.as_secs();
        (same(mac, &self.mac(payload)) && now < expiry).then(|| (user.to_string(), issued))
    }

    /// The ticket of the request's session cookie, if it holds a valid one.
    pub fn session(&self, headers: &HeaderMap) -> Option<(String, u64)> {
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

/// What a request shows, before the store is asked about it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Proof {
    /// The kernel's word: root or the `ferry` group over the unix socket.
    Local { uid: u32 },
    /// A cluster host's certificate (still to be checked against its member record).
    Peer {
        host: String,
        serial: Option<String>,
        on_behalf: Option<String>,
        /// The user whose request the host passes on (held to its grants here).
        proxied_for: Option<String>,
    },
    /// A ticket this daemon signed (the user still to be checked).
    Ticket {
        user: String,
        issued: u64,
        /// The ticket's digest (a logged-out ticket is kept by it until it expires).
        id: String,
    },
    /// This host's admin token (root's token `admin-HOST`; still to be checked for
    /// revocation).
    AdminToken,
    /// A bearer to look up as an API token.
    Token(String),
}

type Refusal = (StatusCode, &'static str);

const LOG_IN: &str = "Log in first: an API token (Authorization: Bearer USER!ID=SECRET; the CLI reads --token-file or FERRY_TOKEN), a ticket from POST /api/v1/login (`ferry login`), or the local socket as root; `ferry serve` made this host's admin token (root's) on its first start in STATE_DIR/admin-token";

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// What the request proves, or why it is refused (status and reason). No address
/// counts for anything.
fn proof(
    auth: &Auth,
    conn: Option<ConnInfo>,
    method: &Method,
    headers: &HeaderMap,
    ferry_gid: Option<u32>,
) -> Result<Proof, Refusal> {
    if is_upgrade(headers) && foreign_origin(headers) {
        return Err((
            StatusCode::FORBIDDEN,
            "A websocket from another site's page is refused (its Origin is not this host)",
        ));
    }
    match conn {
        Some(ConnInfo::Unix { uid, gid, pid }) if trusted_local(uid, gid, pid, ferry_gid) => {
            return Ok(Proof::Local { uid });
        }
        Some(ConnInfo::Tls {
            peer: Some(host),
            serial,
            ..
        }) => {
            let named = |h: &str| {
                headers
                    .get(h)
                    .and_then(|v| v.to_str().ok())
                    .filter(|u| plausible_actor(u))
                    .map(String::from)
            };
            return Ok(Proof::Peer {
                host: host.to_string(),
                serial: serial.map(|s| s.to_string()),
                on_behalf: named(ferry_agent::audit::ON_BEHALF_HEADER),
                proxied_for: named(ferry_agent::audit::PROXIED_FOR_HEADER),
            });
        }
        _ => {}
    }
    if let Some(b) = bearer(headers) {
        // A bearer is sent by a program, never attached by a browser: no CSRF check.
        if auth.is_admin_token(b) {
            return Ok(Proof::AdminToken);
        }
        if let Some((user, issued)) = auth.check_ticket(b, SystemTime::now()) {
            let id = ferry_access::token::digest(b);
            return Ok(Proof::Ticket { user, issued, id });
        }
        if ferry_access::token::parse(b).is_some() {
            return Ok(Proof::Token(b.to_string()));
        }
        return Err((
            StatusCode::UNAUTHORIZED,
            "The bearer is no API token, admin token or valid ticket of this host",
        ));
    }
    if let Some(t) = cookie(headers, COOKIE) {
        if let Some((user, issued)) = auth.check_ticket(&t, SystemTime::now()) {
            let read = matches!(*method, Method::GET | Method::HEAD);
            if !read && !is_upgrade(headers) && !headers.contains_key(CSRF_HEADER) {
                return Err((
                    StatusCode::FORBIDDEN,
                    "A write from the browser must carry the X-Ferry-CSRF header",
                ));
            }
            let id = ferry_access::token::digest(&t);
            return Ok(Proof::Ticket { user, issued, id });
        }
    }
    Err((StatusCode::UNAUTHORIZED, LOG_IN))
}

/// A name another host may say it acts for: a user, `host:NAME`, `unix:NAME`.
fn plausible_actor(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 80
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

/// Turns a proof into a caller, asking the store what it must (tokens, users,
/// member records).
async fn caller(agent: &Agent, auth: &Auth, p: Proof) -> Result<Caller, Refusal> {
    let unknown = (
        StatusCode::UNAUTHORIZED,
        "Unknown, revoked or expired credentials (or a disabled user)",
    );
    let store_down = (
        StatusCode::UNAUTHORIZED,
        "The cluster store cannot be read to check these credentials: use the local socket",
    );
    match p {
        Proof::Local { uid } => Ok(Caller::Local { uid }),
        Proof::Peer {
            host,
            serial,
            on_behalf,
            proxied_for,
        } => {
            // A certificate of the CA, but not (or no longer) a member's: a host that
            // left, or a renewed certificate's predecessor.
            if !agent.peer_allowed(&host, serial.as_deref()).await {
                tracing::warn!(%host, ?serial, "a certificate of no current member refused");
                return Err((
                    StatusCode::UNAUTHORIZED,
                    "This host certificate belongs to no current member of the cluster",
                ));
            }
            // A user's request passed on by the host it reached: that user here too
            // (its grants, its own tasks and password), never more.
            if let Some(name) = proxied_for {
                return Ok(Caller::User { name });
            }
            Ok(Caller::Peer {
                host,
                serial,
                on_behalf,
            })
        }
        Proof::AdminToken => {
            let root = || Caller::User {
                name: ferry_types::ROOT_USER.into(),
            };
            match agent
                .host_token_valid(&ferry_access::token::digest(auth.token()))
                .await
            {
                Ok(true) => Ok(root()),
                Ok(false) => Err((
                    StatusCode::UNAUTHORIZED,
                    "This host's admin token was revoked (`ferry token list root`)",
                )),
                // The file is this host's own word; with the store out of reach (no
                // quorum) root must still be able to look at the host.
                Err(e) => {
                    tracing::warn!(error = %ferry_agent::error_chain(&e).join(": "), "cannot check the admin token against the store; accepting the host's own");
                    Ok(root())
                }
            }
        }
        Proof::Ticket { user, issued, id } => {
            // A ticket made by a token login lives only as long as that token.
            let (user, token) = match user.split_once('!') {
                Some((u, t)) => (u.to_string(), Some(t.to_string())),
                None => (user, None),
            };
            let token_live = match &token {
                Some(t) => agent.token_live(&user, t).await,
                None => Ok(true),
            };
            match (
                agent.session_valid(&user, issued).await,
                agent.ticket_revoked(&id).await,
                token_live,
            ) {
                (Ok(true), Ok(false), Ok(true)) => Ok(Caller::User { name: user }),
                (Ok(_), Ok(_), Ok(_)) => Err(unknown),
                _ => Err(store_down),
            }
        }
        Proof::Token(t) => match agent.token_user(&t).await {
            Ok(Some(name)) => Ok(Caller::User { name }),
            Ok(None) => Err(unknown),
            Err(_) => Err(store_down),
        },
    }
}

/// Whether the caller may make this call; the refusal names what it lacks.
async fn authorize(
    agent: &Agent,
    caller: &Caller,
    method: &Method,
    path: &str,
) -> Result<(), ApiError> {
    let Some(user) = caller.restricted_user() else {
        return Ok(());
    };
    let need = ferry_access::need(method.as_str(), path);
    if matches!(need, Need::Open | Need::Authenticated) {
        return Ok(());
    }
    let acl = agent.acl().await.map_err(|e| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            format!(
                "The grants cannot be read ({}): use the local socket",
                ferry_agent::error_chain(&e).join(": ")
            ),
        )
    })?;
    if ferry_access::permits(&acl, user, &need) {
        return Ok(());
    }
    let (p, on) = match &need {
        Need::On(p, on) | Need::SelfOr(_, p, on) => (*p, on.as_str()),
        Need::Open | Need::Authenticated => unreachable!("returned above"),
    };
    let roles: Vec<&str> = ferry_types::Role::ALL
        .into_iter()
        .filter(|r| ferry_access::role_has(*r, p))
        .map(|r| r.as_str())
        .collect();
    tracing::info!(%user, %method, %path, "refused by the grants");
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        format!(
            "User {user} may not do this: it needs {p:?} on {on} (roles {}), granted on {on} or above",
            roles.join(" or ")
        ),
    ))
}

/// The middleware: lets a request through (with its [`Caller`], on whose behalf its
/// work is recorded) or refuses it.
pub async fn require(
    State((auth, agent)): State<(Auth, Agent)>,
    mut req: Request,
    next: Next,
) -> Response {
    let c = conn(&req);
    let path = req.uri().path().to_string();
    let open = ferry_access::need(req.method().as_str(), &path) == Need::Open;
    let shown = proof(&auth, c.clone(), req.method(), req.headers(), ferry_gid());
    // An API token does not make tokens: one that leaked must not outlive its
    // revocation through tokens it made (through the proxy to another host neither).
    let by_token = matches!(shown, Ok(Proof::Token(_)));
    if by_token && req.method() == Method::POST && path.ends_with("/tokens") {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "An API token cannot make tokens: log in with the user's password (ferry login)",
        )
        .into_response();
    }
    let decided = match shown {
        Ok(p) => caller(&agent, &auth, p).await,
        Err(e) => Err(e),
    };
    match decided {
        Ok(caller) => {
            if let Err(e) = authorize(&agent, &caller, req.method(), &path).await {
                return e.into_response();
            }
            let actor = caller.actor();
            req.extensions_mut().insert(caller);
            ferry_agent::audit::acting_as(&actor, next.run(req)).await
        }
        Err(_) if open => {
            // Callers without credentials get small bodies only (a join request is a
            // few KiB).
            let req = req
                .map(|b| axum::body::Body::new(http_body_util::Limited::new(b, OPEN_BODY_LIMIT)));
            next.run(req).await
        }
        Err((status, why)) => {
            if let Some(ConnInfo::Tcp { remote } | ConnInfo::Tls { remote, .. }) = c {
                tracing::debug!(%remote, %path, %status, "request refused");
            }
            ApiError::new(status, why).into_response()
        }
    }
}

/// The user a login names, checked: by password, or by an API token (or a host's
/// admin token).
/// The user a login names, checked, and — for a login with a token — that token's id
/// (its ticket lives only as long as the token does).
async fn login_user(
    agent: &Agent,
    auth: &Auth,
    req: &LoginRequest,
) -> Result<(String, Option<String>), ApiError> {
    let wrong = |why: &str| ApiError::new(StatusCode::UNAUTHORIZED, why.to_string());
    match (&req.user, &req.password, &req.token) {
        (Some(u), Some(p), None) => agent
            .login_password(u.trim(), p)
            .await
            .map(|u| (u, None))
            .map_err(|e| wrong(&e.to_string())),
        (None, None, Some(t)) => {
            let (p, id) = if auth.is_admin_token(t) {
                (
                    Proof::AdminToken,
                    ferry_agent::host_token_id(agent.host_name()),
                )
            } else if let Some(v) = ferry_access::token::parse(t) {
                (Proof::Token(t.trim().to_string()), v.id.to_string())
            } else {
                return Err(wrong("Wrong token"));
            };
            match caller(agent, auth, p).await {
                Ok(Caller::User { name }) => Ok((name, Some(id))),
                Ok(_) | Err(_) => Err(wrong("Wrong token")),
            }
        }
        _ => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "Give either user and password, or token",
        )),
    }
}

async fn session_of(agent: &Agent, user: Option<String>, ticket: Option<String>) -> Session {
    let grants = match &user {
        Some(u) => agent
            .acl()
            .await
            .map(|acl| ferry_access::grants_of(&acl, u))
            .unwrap_or_default(),
        None => vec![],
    };
    Session {
        authenticated: user.is_some(),
        host: agent.host_name().to_string(),
        user,
        grants,
        ticket,
    }
}

#[utoipa::path(post, path = "/api/v1/login", tag = "access", request_body = LoginRequest,
    responses((status = 200, description = "Logged in; sets the session cookie (a signed ticket, also in the answer for programs)", body = Session),
              (status = 401, description = "Wrong user name, password or token", body = ferry_types::ApiErrorBody)))]
pub async fn login(
    State(agent): State<Agent>,
    Extension(auth): Extension<Auth>,
    ApiJson(req): ApiJson<LoginRequest>,
) -> ApiResult<Response> {
    let (user, token) = login_user(&agent, &auth, &req).await?;
    // A token's ticket names it (`USER!ID`): revoking the token ends the session.
    let subject = match &token {
        Some(id) => format!("{user}!{id}"),
        None => user.clone(),
    };
    let ticket = auth.ticket(&subject, SystemTime::now());
    let cookie = format!(
        "{COOKIE}={ticket}; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age={}",
        TICKET_LIFETIME.as_secs()
    );
    agent
        .events()
        .emit(None, "access", format!("{user} logged in"));
    let mut resp = Json(session_of(&agent, Some(user), Some(ticket)).await).into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&cookie)
            .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "Malformed ticket"))?,
    );
    Ok(resp)
}

#[utoipa::path(post, path = "/api/v1/logout", tag = "access",
    responses((status = 204, description = "The session cookie is cleared, and the ticket shown (as bearer, or as cookie with the CSRF header) is void on every host until it would have expired")))]
pub async fn logout(
    State(agent): State<Agent>,
    Extension(auth): Extension<Auth>,
    headers: HeaderMap,
) -> Response {
    // A cookie counts only with the CSRF header (another site's form cannot end a
    // session); a bearer is a program's own.
    let shown = bearer(&headers).map(String::from).or_else(|| {
        headers
            .contains_key(CSRF_HEADER)
            .then(|| cookie(&headers, COOKIE))
            .flatten()
    });
    if let Some(t) = shown {
        if auth.check_ticket(&t, SystemTime::now()).is_some() {
            let left = t
                .rsplit(':')
                .nth(1)
                .and_then(|e| e.parse::<u64>().ok())
                .and_then(|e| {
                    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
                    e.checked_sub(now)
                })
                .unwrap_or(0);
            if let Err(e) = agent
                .revoke_ticket(&ferry_access::token::digest(&t), left)
                .await
            {
                tracing::warn!(error = %ferry_agent::error_chain(&e).join(": "), "cannot record the logged-out ticket");
            }
        }
    }
    (
        StatusCode::NO_CONTENT,
        [(
            header::SET_COOKIE,
            format!("{COOKIE}=; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age=0"),
        )],
    )
        .into_response()
}

#[utoipa::path(get, path = "/api/v1/session", tag = "access",
    responses((status = 200, description = "Whether this request is logged in, as whom, with which grants", body = Session)))]
pub async fn session(
    State(agent): State<Agent>,
    caller: Option<Extension<Caller>>,
) -> Json<Session> {
    let user = caller.map(|Extension(c)| match c {
        Caller::User { name } => name,
        other => other.actor(),
    });
    Json(session_of(&agent, user, None).await)
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
    fn the_cookie_is_no_token_and_the_token_no_cookie() {
        let a = Auth::new("0123456789abcdef0123");
        assert!(a.is_admin_token("0123456789abcdef0123"));
        assert!(!a.is_admin_token("0123456789abcdef0124"));
        let raw = headers(&[(header::COOKIE, "ferry_ticket=0123456789abcdef0123")]);
        assert!(a.session(&raw).is_none());
    }

    #[test]
    fn tickets_are_signed_and_expire() {
        let a = Auth::new("0123456789abcdef0123");
        let now = SystemTime::now();
        let t = a.ticket("root", now);
        let secs = now.duration_since(UNIX_EPOCH).unwrap().as_secs();
        assert_eq!(a.check_ticket(&t, now), Some(("root".into(), secs)));
        assert_eq!(a.check_ticket(&t, now + TICKET_LIFETIME), None);
        let forged = t.replacen("root", "admin", 1);
        assert_eq!(a.check_ticket(&forged, now), None);
        let parts: Vec<&str> = t.split(':').collect();
        let longer = format!("root:{}:99999999999:{}", parts[1], parts[3]);
        assert_eq!(a.check_ticket(&longer, now), None);
        let earlier = format!("root:0:{}:{}", parts[2], parts[3]);
        assert_eq!(a.check_ticket(&earlier, now), None);
        // Another token signs other tickets.
        assert_eq!(Auth::new("other-token-0123456").check_ticket(&t, now), None);
    }

    /// No address is trusted: loopback, the host's own or any other. Only the kernel's
    /// word on a unix socket client, a host's certificate, a bearer (admin token, API
    /// token, ticket), or the ticket cookie (with the CSRF header for writes; a
    /// websocket from a foreign origin is refused).
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
            let d = proof(&a, tcp(r), &Method::GET, &none, None);
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
            proof(&a, unix(0, 0), &Method::POST, &none, None),
            Ok(Proof::Local { uid: 0 })
        );
        assert!(proof(&a, unix(1000, 1000), &Method::GET, &none, None).is_err());
        assert!(proof(&a, unix(1000, 990), &Method::GET, &none, Some(990)).is_ok());
        // TLS: a verified client certificate names a host; without one, nothing. The
        // user it acts for is taken from a host only, and only if it looks like one.
        let tls = |peer: Option<&str>| {
            Some(ConnInfo::Tls {
                remote: "10.1.0.12:4000".parse().unwrap(),
                peer: peer.map(Arc::from),
                serial: None,
            })
        };
        let behalf = headers(&[(
            ferry_agent::audit::ON_BEHALF_HEADER.parse().unwrap(),
            "alice",
        )]);
        assert_eq!(
            proof(&a, tls(Some("h2")), &Method::POST, &behalf, None),
            Ok(Proof::Peer {
                host: "h2".into(),
                serial: None,
                on_behalf: Some("alice".into()),
                proxied_for: None,
            })
        );
        let odd = headers(&[(
            ferry_agent::audit::ON_BEHALF_HEADER.parse().unwrap(),
            "a b\\c",
        )]);
        assert!(matches!(
            proof(&a, tls(Some("h2")), &Method::POST, &odd, None),
            Ok(Proof::Peer {
                on_behalf: None,
                ..
            })
        ));
        assert_eq!(
            proof(&a, tls(None), &Method::GET, &behalf, None)
                .unwrap_err()
                .0,
            StatusCode::UNAUTHORIZED
        );
        let bearer = |b: &str| headers(&[(header::AUTHORIZATION, &format!("Bearer {b}"))]);
        assert_eq!(
            proof(
                &a,
                tcp("10.9.9.9:1"),
                &Method::DELETE,
                &bearer("0123456789abcdef0123"),
                None
            ),
            Ok(Proof::AdminToken)
        );
        let tok = format!("alice!ci={}", "ab".repeat(32));
        assert_eq!(
            proof(&a, tcp("10.9.9.9:1"), &Method::DELETE, &bearer(&tok), None),
            Ok(Proof::Token(tok.clone()))
        );
        assert!(proof(&a, tcp("10.9.9.9:1"), &Method::GET, &bearer("guess"), None).is_err());
        let t = a.ticket("alice", SystemTime::now());
        // A ticket as bearer is a program's: no CSRF header needed.
        assert!(matches!(
            proof(&a, tcp("10.9.9.9:1"), &Method::POST, &bearer(&t), None),
            Ok(Proof::Ticket { ref user, .. }) if user == "alice"
        ));
        let c = format!("{COOKIE}={t}");
        let sess = headers(&[(header::COOKIE, &c)]);
        assert!(proof(&a, tcp("10.9.9.9:1"), &Method::GET, &sess, None).is_ok());
        let e = proof(&a, tcp("10.9.9.9:1"), &Method::POST, &sess, None).unwrap_err();
        assert_eq!(e.0, StatusCode::FORBIDDEN);
        let csrf = headers(&[(header::COOKIE, &c), (CSRF_HEADER.parse().unwrap(), "1")]);
        assert!(proof(&a, tcp("10.9.9.9:1"), &Method::POST, &csrf, None).is_ok());
        let ws = |origin: &str| {
            headers(&[
                (header::COOKIE, &c),
                (header::UPGRADE, "websocket"),
                (header::HOST, "10.0.0.11:8470"),
                (header::ORIGIN, origin),
            ])
        };
        assert!(proof(
            &a,
            tcp("10.9.9.9:1"),
            &Method::GET,
            &ws("https://10.0.0.11:8470"),
            None
        )
        .is_ok());
        let e = proof(
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
        assert!(proof(&a, unix(0, 0), &Method::GET, &h, None).is_err());
    }
}
