//! Users, API tokens and grants, kept in the cluster's store (etcd: one set for the
//! whole cluster) or, on a single host, in its own. Decisions about them are
//! `ferry_access`'s; this module reads and writes the records.
//!
//! - `/access/users/{name}`: a user, its argon2id password hash (never shown);
//! - `/access/tokens/{user}/{id}`: a token, the SHA-256 of its secret (the store
//!   never holds a token that works); revoked tokens stay listed as revoked;
//! - `/access/acl`: every grant, one document changed by compare-and-swap.

use crate::error::{AgentError, Failure, Refusal, Result};
use crate::events::now_ms;
use crate::Host;
use ferry_store::{Store, StoreJson};
use ferry_types::{
    AclEntry, ApiToken, PasswordChange, TokenCreate, TokenCreated, User, UserCreate, UserUpdate,
    ValidationErrors, ROOT_USER,
};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_store::keys::access::{ACL, TICKET_KEY, USERS};
/// The key session tickets are signed with: one for the cluster, so a ticket from one
/// host is good on all (kept where only hosts read).
/// `/access/logged-out/{digest}`: tickets ended by a logout, each under a lease that
/// ends when the ticket would have expired.
/// Wrong passwords a user may try per minute (then every login of it fails until the
/// minute is over, right password or not).
const LOGIN_FAILURES: u32 = 5;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct UserRecord {
    name: String,
    #[serde(default)]
    password_hash: Option<String>,
    enabled: bool,
    #[serde(default)]
    comment: String,
    created_ms: u64,
    #[serde(default)]
    created_by: String,
    /// Session tickets issued before this (Unix s) are void: a new password or a
    /// disabled user ends every session.
    #[serde(default)]
    sessions_after_s: u64,
}

impl UserRecord {
    fn public(&self) -> User {
        User {
            name: self.name.clone(),
            comment: self.comment.clone(),
            enabled: self.enabled,
            has_password: self.password_hash.is_some(),
            created_ms: self.created_ms,
            created_by: self.created_by.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TokenRecord {
    #[serde(flatten)]
    token: ApiToken,
    /// SHA-256 of the secret.
    digest: String,
    /// When its user was made: a token of an earlier user of the same name (one made
    /// while that user was being deleted) is not the new one's.
    #[serde(default)]
    user_created_ms: u64,
}

/// Failed logins per user in the current minute.
#[derive(Default)]
pub struct LoginFailures(HashMap<String, (Instant, u32)>);

/// The id of a host's admin token as a token of root: `admin-HOST`, or for a host
/// name that does not fit a token id, `admin-` and a digest of it (never two hosts'
/// tokens under one id).
pub fn host_token_id(host: &str) -> String {
    let plain = format!("admin-{host}");
    let mut e = ValidationErrors::default();
    ferry_types::check_token_id(&mut e, "id", &plain);
    if e.0.is_empty() {
        return plain;
    }
    let d = ferry_access::token::digest(host);
    format!("admin-{}", &d[..16])
}

fn user_key(name: &str) -> String {
    ferry_store::keys::access::user(name)
}

fn token_key(user: &str, id: &str) -> String {
    ferry_store::keys::access::token(user, id)
}

fn checked(f: impl FnOnce(&mut ValidationErrors)) -> Result<()> {
    let mut e = ValidationErrors::default();
    f(&mut e);
    Ok(e.into_result()?)
}

fn actor() -> String {
    crate::audit::actor().unwrap_or_else(|| "ferry".into())
}

impl Host {
    /// Where users, tokens and grants live: the cluster's keys, or this host's store.
    fn access_store(&self) -> Arc<dyn Store> {
        match &self.inner.cluster {
            Some(link) => link.root.clone(),
            None => self.inner.store.clone(),
        }
    }

    /// Makes `root` if there is none, and records this host's admin token as root's
    /// token `admin-HOST` (by its digest). A revoked one stays revoked; one that was
    /// made again (its file deleted) replaces the old digest.
    pub async fn ensure_root(&self, admin_token: &str) -> Result<()> {
        let store = self.access_store();
        let root = UserRecord {
            name: ROOT_USER.into(),
            password_hash: None,
            enabled: true,
            comment: "The superuser: may do everything".into(),
            created_ms: now_ms(),
            created_by: "ferry".into(),
            sessions_after_s: 0,
        };
        store.create_json(&user_key(ROOT_USER), &root).await?;
        let root_created = self.user_record(ROOT_USER).await?.0.created_ms;
        let id = host_token_id(self.host_name());
        let digest = ferry_access::token::digest(admin_token);
        let key = token_key(ROOT_USER, &id);
        loop {
            match store.get_json::<TokenRecord>(&key).await? {
                Some((t, _)) if t.token.revoked_ms.is_some() => {
                    tracing::warn!(token = %id, "this host's admin token was revoked: only the local socket admits root here");
                    return Ok(());
                }
                Some((t, _)) if t.digest == digest && t.user_created_ms == root_created => {
                    return Ok(())
                }
                Some((_, kv)) => {
                    let rec = self.host_token_record(&id, digest.clone(), root_created);
                    if store.cas_json(&key, kv.mod_rev, &rec).await? {
                        return Ok(());
                    }
                }
                None => {
                    let rec = self.host_token_record(&id, digest.clone(), root_created);
                    if store.create_json(&key, &rec).await? {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// The key session tickets are signed with, made at the first start (32 random
    /// bytes, hex).
    pub async fn ticket_key(&self) -> Result<String> {
        let store = self.access_store();
        loop {
            if let Some((k, _)) = store.get_json::<String>(TICKET_KEY).await? {
                if k.len() == 64 && k.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Ok(k);
                }
                return Err(AgentError::failed(
                    Failure::Corrupt,
                    format!("The ticket key in the store ({TICKET_KEY}) is malformed"),
                ));
            }
            let fresh = ferry_access::token::new_secret();
            store.create_json(TICKET_KEY, &fresh).await?;
        }
    }

    fn host_token_record(&self, id: &str, digest: String, root_created_ms: u64) -> TokenRecord {
        TokenRecord {
            token: ApiToken {
                user: ROOT_USER.into(),
                id: id.into(),
                comment: format!(
                    "The admin token of host {} (its STATE_DIR/admin-token)",
                    self.host_name()
                ),
                created_ms: now_ms(),
                expires_ms: None,
                revoked_ms: None,
                created_by: "ferry".into(),
            },
            digest,
            user_created_ms: root_created_ms,
        }
    }

    async fn user_record(&self, name: &str) -> Result<(UserRecord, i64)> {
        checked(|e| ferry_types::check_user_name(e, "user", name))?;
        match self
            .access_store()
            .get_json::<UserRecord>(&user_key(name))
            .await?
        {
            Some((u, kv)) => Ok((u, kv.mod_rev)),
            None => Err(AgentError::NotFound(format!("User {name}"))),
        }
    }

    pub async fn users(&self) -> Result<Vec<User>> {
        Ok(self
            .access_store()
            .list_json::<UserRecord>(USERS)
            .await?
            .iter()
            .map(UserRecord::public)
            .collect())
    }

    pub async fn user(&self, name: &str) -> Result<User> {
        Ok(self.user_record(name).await?.0.public())
    }

    pub async fn create_user(&self, req: UserCreate) -> Result<User> {
        req.validate()?;
        let hash = match req.password.clone() {
            Some(p) => Some(hash_blocking(p).await?),
            None => None,
        };
        let rec = UserRecord {
            name: req.name.clone(),
            password_hash: hash,
            enabled: true,
            comment: req.comment.clone(),
            created_ms: now_ms(),
            created_by: actor(),
            // A ticket of an earlier user of this name is not this one's.
            sessions_after_s: now_s(),
        };
        if !self
            .access_store()
            .create_json(&user_key(&req.name), &rec)
            .await?
        {
            return Err(AgentError::refused(
                Refusal::Exists,
                format!("A user named {} exists", req.name),
            ));
        }
        self.inner
            .events
            .emit(None, "access", format!("user {} created", req.name));
        Ok(rec.public())
    }

    pub async fn update_user(&self, name: &str, req: UserUpdate) -> Result<User> {
        if let Some(c) = &req.comment {
            if c.len() > 256 {
                return Err(AgentError::invalid("comment", "at most 256 bytes"));
            }
        }
        if name == ROOT_USER && req.enabled == Some(false) {
            return Err(AgentError::invalid(
                "enabled",
                "root cannot be disabled (revoke its tokens instead)",
            ));
        }
        let u = self
            .change_user(name, |u| {
                if let Some(e) = req.enabled {
                    if u.enabled && !e {
                        u.sessions_after_s = now_s();
                    }
                    u.enabled = e;
                }
                if let Some(c) = &req.comment {
                    u.comment = c.clone();
                }
            })
            .await?;
        self.inner
            .events
            .emit(None, "access", format!("user {name} changed"));
        Ok(u.public())
    }

    async fn change_user(&self, name: &str, f: impl Fn(&mut UserRecord)) -> Result<UserRecord> {
        let store = self.access_store();
        loop {
            let (mut u, rev) = self.user_record(name).await?;
            f(&mut u);
            if store.cas_json(&user_key(name), rev, &u).await? {
                return Ok(u);
            }
        }
    }

    /// Deletes a user with its tokens and grants (root cannot be deleted).
    pub async fn delete_user(&self, name: &str) -> Result<()> {
        if name == ROOT_USER {
            return Err(AgentError::refused(
                Refusal::Unsupported,
                "root cannot be deleted",
            ));
        }
        self.user_record(name).await?;
        let store = self.access_store();
        // Grants first: a user made again under this name starts with none.
        self.change_acl(|acl| {
            acl.retain(|e| e.user != name);
            Ok(())
        })
        .await?;
        store
            .txn(ferry_store::Txn {
                compare: vec![],
                success: vec![
                    ferry_store::Op::DeletePrefix(ferry_store::keys::access::tokens_of(name)),
                    ferry_store::Op::Delete(user_key(name)),
                ],
                failure: vec![],
            })
            .await?;
        self.inner
            .events
            .emit(None, "access", format!("user {name} deleted"));
        Ok(())
    }

    /// Sets a password. `own`: the user changes its own and must name the current one
    /// (when it has one). Every session of the user ends.
    pub async fn set_password(&self, name: &str, req: PasswordChange, own: bool) -> Result<()> {
        checked(|e| ferry_types::check_password(e, "password", &req.password))?;
        let (u, _) = self.user_record(name).await?;
        if own {
            if let Some(h) = u.password_hash.clone() {
                let cur = req.current.clone().unwrap_or_default();
                if !verify_blocking(cur, Some(h)).await? {
                    return Err(AgentError::Unauthorized(
                        "The current password is wrong".into(),
                    ));
                }
            }
        }
        let hash = hash_blocking(req.password.clone()).await?;
        self.change_user(name, |u| {
            u.password_hash = Some(hash.clone());
            u.sessions_after_s = now_s();
        })
        .await?;
        self.inner
            .events
            .emit(None, "access", format!("password of user {name} set"));
        Ok(())
    }

    /// Checks a password login; the user's name when right. Wrong passwords are
    /// counted per user: after [`LOGIN_FAILURES`] in a minute every login of that user
    /// fails until the minute is over.
    pub async fn login_password(&self, name: &str, password: &str) -> Result<String> {
        let refuse = || AgentError::Unauthorized("Wrong user name or password".into());
        if password.len() > ferry_types::MAX_PASSWORD || name.len() > 64 {
            return Err(refuse());
        }
        // Counted as a failure before the check (and taken back if right), so
        // attempts sent at once cannot all pass the limit.
        {
            let mut f = self
                .inner
                .login_failures
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            f.0.retain(|_, (t, _)| t.elapsed() < Duration::from_secs(60));
            let e = f.0.entry(name.to_string()).or_insert((Instant::now(), 0));
            if e.1 >= LOGIN_FAILURES {
                return Err(AgentError::Unauthorized(format!(
                    "Too many wrong passwords for {name}: try again in a minute"
                )));
            }
            e.1 += 1;
        }
        let rec = match self.user_record(name).await {
            Ok((u, _)) => Some(u),
            Err(AgentError::NotFound(_)) => None,
            Err(e) => return Err(e),
        };
        let hash = rec
            .as_ref()
            .filter(|u| u.enabled)
            .and_then(|u| u.password_hash.clone());
        let ok = verify_blocking(password.to_string(), hash).await?;
        if ok {
            let mut f = self
                .inner
                .login_failures
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(e) = f.0.get_mut(name) {
                e.1 = e.1.saturating_sub(1);
            }
            return Ok(name.to_string());
        }
        tracing::warn!(user = %name, "login with a wrong password");
        Err(refuse())
    }

    /// Voids a ticket (by its digest) on every host until it would have expired
    /// (`left_s` from now): a logout.
    pub async fn revoke_ticket(&self, digest: &str, left_s: u64) -> Result<()> {
        if left_s == 0 {
            return Ok(());
        }
        let store = self.access_store();
        let lease = store.grant_lease(Duration::from_secs(left_s + 5)).await?;
        store
            .put(
                &ferry_store::keys::access::logged_out(digest),
                b"1".to_vec(),
                Some(lease),
            )
            .await?;
        Ok(())
    }

    /// Whether a ticket (by its digest) was logged out.
    pub async fn ticket_revoked(&self, digest: &str) -> Result<bool> {
        Ok(self
            .access_store()
            .get(&ferry_store::keys::access::logged_out(digest))
            .await?
            .is_some())
    }

    /// Whether a session ticket of `user` issued at `issued_s` is still good (the user
    /// exists, is enabled, and has not changed its password since).
    pub async fn session_valid(&self, user: &str, issued_s: u64) -> Result<bool> {
        match self.user_record(user).await {
            Ok((u, _)) => Ok(u.enabled && issued_s >= u.sessions_after_s),
            Err(AgentError::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The user of an API token `USER!ID=SECRET` that exists, is not revoked or
    /// expired, and whose user is enabled.
    pub async fn token_user(&self, value: &str) -> Result<Option<String>> {
        let Some(v) = ferry_access::token::parse(value) else {
            return Ok(None);
        };
        self.token_of(v.user, v.id, &ferry_access::token::digest(v.secret))
            .await
    }

    /// Whether `user`'s token `id` still works (not revoked or expired, its user the
    /// same and enabled): what a ticket made by a login with it needs.
    pub async fn token_live(&self, user: &str, id: &str) -> Result<bool> {
        let mut e = ValidationErrors::default();
        ferry_types::check_user_name(&mut e, "user", user);
        ferry_types::check_token_id(&mut e, "id", id);
        if !e.0.is_empty() {
            return Ok(false);
        }
        let Some((t, _)) = self
            .access_store()
            .get_json::<TokenRecord>(&token_key(user, id))
            .await?
        else {
            return Ok(false);
        };
        Ok(self.token_of(user, id, &t.digest).await?.is_some())
    }

    /// Whether `digest` is the one root's token `id` names (a host's admin token).
    pub async fn host_token_valid(&self, digest: &str) -> Result<bool> {
        let id = host_token_id(self.host_name());
        Ok(self.token_of(ROOT_USER, &id, digest).await?.is_some())
    }

    async fn token_of(&self, user: &str, id: &str, digest: &str) -> Result<Option<String>> {
        let mut e = ValidationErrors::default();
        ferry_types::check_user_name(&mut e, "user", user);
        ferry_types::check_token_id(&mut e, "id", id);
        if !e.0.is_empty() {
            return Ok(None);
        }
        let store = self.access_store();
        let Some((t, _)) = store.get_json::<TokenRecord>(&token_key(user, id)).await? else {
            return Ok(None);
        };
        if !ferry_access::token::same(&t.digest, digest)
            || !ferry_access::token::usable(t.token.expires_ms, t.token.revoked_ms, now_ms())
        {
            return Ok(None);
        }
        match self.user_record(user).await {
            Ok((u, _)) if u.enabled && t.user_created_ms == u.created_ms => Ok(Some(u.name)),
            Ok(_) | Err(AgentError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn tokens(&self, user: &str) -> Result<Vec<ApiToken>> {
        self.user_record(user).await?;
        Ok(self
            .access_store()
            .list_json::<TokenRecord>(&ferry_store::keys::access::tokens_of(user))
            .await?
            .into_iter()
            .map(|t| t.token)
            .collect())
    }

    /// Makes a token for `user`; its value is shown only in this answer.
    pub async fn create_token(&self, user: &str, req: TokenCreate) -> Result<TokenCreated> {
        req.validate()?;
        let (u, _) = self.user_record(user).await?;
        let secret = ferry_access::token::new_secret();
        let now = now_ms();
        let rec = TokenRecord {
            token: ApiToken {
                user: user.into(),
                id: req.id.clone(),
                comment: req.comment.clone(),
                created_ms: now,
                expires_ms: req
                    .expires_days
                    .map(|d| now + u64::from(d) * 24 * 3600 * 1000),
                revoked_ms: None,
                created_by: actor(),
            },
            digest: ferry_access::token::digest(&secret),
            user_created_ms: u.created_ms,
        };
        if !self
            .access_store()
            .create_json(&token_key(user, &req.id), &rec)
            .await?
        {
            return Err(AgentError::refused(
                Refusal::Exists,
                format!(
                    "User {user} has a token {} (revoked ones stay listed; pick another id)",
                    req.id
                ),
            ));
        }
        self.inner
            .events
            .emit(None, "access", format!("token {user}!{} created", req.id));
        Ok(TokenCreated {
            value: ferry_access::token::format(user, &req.id, &secret),
            token: rec.token,
        })
    }

    /// Revokes a token at once (it stays listed, revoked).
    pub async fn revoke_token(&self, user: &str, id: &str) -> Result<ApiToken> {
        checked(|e| {
            ferry_types::check_user_name(e, "user", user);
            ferry_types::check_token_id(e, "id", id);
        })?;
        let store = self.access_store();
        let key = token_key(user, id);
        loop {
            let Some((mut t, kv)) = store.get_json::<TokenRecord>(&key).await? else {
                return Err(AgentError::NotFound(format!("Token {user}!{id}")));
            };
            if t.token.revoked_ms.is_some() {
                return Ok(t.token);
            }
            t.token.revoked_ms = Some(now_ms());
            if store.cas_json(&key, kv.mod_rev, &t).await? {
                self.inner
                    .events
                    .emit(None, "access", format!("token {user}!{id} revoked"));
                return Ok(t.token);
            }
        }
    }

    /// Every grant.
    pub async fn acl(&self) -> Result<Vec<AclEntry>> {
        Ok(self
            .access_store()
            .get_json::<Vec<AclEntry>>(ACL)
            .await?
            .map(|(v, _)| v)
            .unwrap_or_default())
    }

    async fn change_acl(
        &self,
        f: impl Fn(&mut Vec<AclEntry>) -> Result<()>,
    ) -> Result<Vec<AclEntry>> {
        let store = self.access_store();
        loop {
            let (mut acl, rev) = match store.get_json::<Vec<AclEntry>>(ACL).await? {
                Some((v, kv)) => (v, kv.mod_rev),
                None => (vec![], 0),
            };
            f(&mut acl)?;
            let done = if rev == 0 {
                store.create_json(ACL, &acl).await?
            } else {
                store.cas_json(ACL, rev, &acl).await?
            };
            if done {
                return Ok(acl);
            }
        }
    }

    /// Grants `role` on `path` to `user` (an existing user other than root).
    pub async fn grant(&self, e: AclEntry) -> Result<Vec<AclEntry>> {
        e.validate()?;
        if e.user == ROOT_USER {
            return Err(AgentError::invalid(
                "user",
                "root may do everything already",
            ));
        }
        self.user_record(&e.user).await?;
        let acl = self
            .change_acl(|acl| {
                if !acl.contains(&e) {
                    acl.push(e.clone());
                }
                Ok(())
            })
            .await?;
        self.inner.events.emit(
            None,
            "access",
            format!("{} granted to {} on {}", e.role.as_str(), e.user, e.path),
        );
        Ok(acl)
    }

    /// Takes a grant back (not found: nothing was granted so).
    pub async fn revoke_grant(&self, e: AclEntry) -> Result<Vec<AclEntry>> {
        e.validate()?;
        let acl = self
            .change_acl(|acl| {
                let n = acl.len();
                acl.retain(|x| x != &e);
                if acl.len() == n {
                    return Err(AgentError::NotFound(format!(
                        "Grant of {} to {} on {}",
                        e.role.as_str(),
                        e.user,
                        e.path
                    )));
                }
                Ok(())
            })
            .await?;
        self.inner.events.emit(
            None,
            "access",
            format!("{} taken from {} on {}", e.role.as_str(), e.user, e.path),
        );
        Ok(acl)
    }
}

fn now_s() -> u64 {
    now_ms() / 1000
}

/// Password hashes computed at once (each takes 19 MiB and a core for a while): more
/// logins wait their turn instead of taking the host's memory.
static ARGON2_SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

async fn hash_blocking(p: String) -> Result<String> {
    let _slot = ARGON2_SLOTS
        .acquire()
        .await
        .map_err(|e| AgentError::failed_by(Failure::Internal, "password hashing", e))?;
    tokio::task::spawn_blocking(move || ferry_access::password::hash(&p))
        .await
        .map_err(|e| AgentError::failed_by(Failure::Internal, "password hashing failed", e))
}

/// Verifies against `hash`, or spends the same time when there is none.
async fn verify_blocking(p: String, hash: Option<String>) -> Result<bool> {
    let _slot = ARGON2_SLOTS
        .acquire()
        .await
        .map_err(|e| AgentError::failed_by(Failure::Internal, "password check", e))?;
    tokio::task::spawn_blocking(move || match hash {
        Some(h) => ferry_access::password::verify(&p, &h),
        None => {
            ferry_access::password::verify_nothing(&p);
            false
        }
    })
    .await
    .map_err(|e| AgentError::failed_by(Failure::Internal, "password check failed", e))
}
