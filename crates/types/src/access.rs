//! Users, API tokens, roles and the access control list (Proxmox's model): a user
//! logs in with a password or calls with one of its tokens, and may do what the roles
//! granted to it on a path (and everything below it) allow.

use crate::validate::ValidationErrors;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The user who may do everything, always (it cannot be deleted or restricted).
pub const ROOT_USER: &str = "root";

/// What a role allows.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
pub enum Role {
    /// Everything, including users, tokens and grants.
    Administrator,
    /// Reads, power (start, stop, shutdown, reboot, pause, resume, suspend), console,
    /// snapshots and migration; no creating, changing or deleting.
    Operator,
    /// Reads only.
    Auditor,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Administrator, Role::Operator, Role::Auditor];

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str().eq_ignore_ascii_case(s))
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Administrator => "Administrator",
            Role::Operator => "Operator",
            Role::Auditor => "Auditor",
        }
    }
}

/// One grant: `role` for `user` on `path` and everything below it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AclEntry {
    /// `/`, `/vms`, `/vms/{name}`, `/pools`, `/pools/{name}`, `/cluster` or `/access`.
    pub path: String,
    pub user: String,
    pub role: Role,
}

impl AclEntry {
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errs = ValidationErrors::default();
        check_acl_path(&mut errs, "path", &self.path);
        check_user_name(&mut errs, "user", &self.user);
        errs.into_result()
    }
}

/// The paths grants are made on.
pub fn check_acl_path(errs: &mut ValidationErrors, field: &str, path: &str) {
    let parts: Vec<&str> = path
        .strip_prefix('/')
        .unwrap_or("\u{0}")
        .split('/')
        .collect();
    let ok = match parts.as_slice() {
        [""] | ["vms"] | ["pools"] | ["cluster"] | ["access"] => true,
        ["vms" | "pools", name] => {
            let mut e = ValidationErrors::default();
            crate::validate::check_name(&mut e, field, name);
            e.0.is_empty()
        }
        _ => false,
    };
    if !ok {
        errs.push(
            field,
            format!("{path:?} is not a path grants are made on: /, /vms, /vms/NAME, /pools, /pools/NAME, /cluster or /access"),
        );
    }
}

/// User names: 1–32 characters of `[a-z0-9_.-]`, starting with a letter.
pub fn check_user_name(errs: &mut ValidationErrors, field: &str, name: &str) {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'));
    if !ok {
        errs.push(
            field,
            "user names are 1 to 32 characters of a-z, 0-9, '-', '_' and '.', starting with a letter",
        );
    }
}

/// Token ids: 1–32 characters of `[A-Za-z0-9_-]`, starting with a letter or digit.
pub fn check_token_id(errs: &mut ValidationErrors, field: &str, id: &str) {
    let ok = !id.is_empty()
        && id.len() <= 32
        && id.starts_with(|c: char| c.is_ascii_alphanumeric())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'));
    if !ok {
        errs.push(
            field,
            "token ids are 1 to 32 characters of letters, digits, '-' and '_', starting with a letter or digit",
        );
    }
}

/// The shortest password accepted.
pub const MIN_PASSWORD: usize = 10;
/// The longest (argon2 takes any length; this bounds the work a caller can ask for).
pub const MAX_PASSWORD: usize = 1024;

pub fn check_password(errs: &mut ValidationErrors, field: &str, password: &str) {
    let n = password.chars().count();
    if n < MIN_PASSWORD {
        errs.push(
            field,
            format!("passwords are at least {MIN_PASSWORD} characters long"),
        );
    } else if password.len() > MAX_PASSWORD {
        errs.push(
            field,
            format!("passwords are at most {MAX_PASSWORD} bytes long"),
        );
    }
}

/// A user as the API shows it (never its password hash).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct User {
    pub name: String,
    #[serde(default)]
    pub comment: String,
    /// A disabled user can neither log in nor use its tokens.
    pub enabled: bool,
    /// Whether a password is set (without one the user logs in with tokens only).
    pub has_password: bool,
    pub created_ms: u64,
    /// Who made it.
    #[serde(default)]
    pub created_by: String,
}

/// `POST /api/v1/access/users`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserCreate {
    pub name: String,
    /// Optional: a user without one logs in with tokens only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    #[serde(default)]
    pub comment: String,
}

impl UserCreate {
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errs = ValidationErrors::default();
        check_user_name(&mut errs, "name", &self.name);
        if let Some(p) = &self.password {
            check_password(&mut errs, "password", p);
        }
        if self.comment.len() > 256 {
            errs.push("comment", "at most 256 bytes");
        }
        errs.into_result()
    }
}

/// `PUT /api/v1/access/users/{name}`: what changes (absent: unchanged).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserUpdate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

/// `PUT /api/v1/access/users/{name}/password`. A user changing its own password
/// names the current one; an administrator setting another's does not need to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PasswordChange {
    pub password: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<String>,
}

/// An API token as the API shows it (never its secret).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ApiToken {
    pub user: String,
    pub id: String,
    #[serde(default)]
    pub comment: String,
    pub created_ms: u64,
    /// Unix time in ms after which it no longer works (none: never expires).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<u64>,
    /// Set when revoked: it no longer works.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_ms: Option<u64>,
    #[serde(default)]
    pub created_by: String,
}

/// `POST /api/v1/access/users/{user}/tokens`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenCreate {
    pub id: String,
    /// Valid for this many days (none: until revoked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 3650)]
    pub expires_days: Option<u32>,
    #[serde(default)]
    pub comment: String,
}

impl TokenCreate {
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errs = ValidationErrors::default();
        check_token_id(&mut errs, "id", &self.id);
        if let Some(d) = self.expires_days {
            if !(1..=3650).contains(&d) {
                errs.push("expires_days", "1 to 3650 days");
            }
        }
        if self.comment.len() > 256 {
            errs.push("comment", "at most 256 bytes");
        }
        errs.into_result()
    }
}

/// The answer to a token's creation: the only time its secret is shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TokenCreated {
    pub token: ApiToken,
    /// What a client sends: `Authorization: Bearer USER!ID=SECRET`.
    pub value: String,
}

/// `POST /api/v1/login`: a user and its password, or an API token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// An API token (`USER!ID=SECRET`, or a host's admin token) instead of a password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// Whether a request is logged in, and as whom.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Session {
    pub authenticated: bool,
    /// The host answering.
    pub host: String,
    /// The user the request acts as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The grants that apply to that user (root: Administrator on `/`).
    #[serde(default)]
    pub grants: Vec<AclEntry>,
    /// The ticket, for clients that are not browsers (`ferry login` keeps it; it is
    /// also set as an HttpOnly cookie). Only in the answer to a login.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ticket: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acl_paths_are_a_closed_set() {
        for ok in [
            "/",
            "/vms",
            "/vms/web1",
            "/pools/local",
            "/cluster",
            "/access",
        ] {
            let mut e = ValidationErrors::default();
            check_acl_path(&mut e, "p", ok);
            assert!(e.0.is_empty(), "{ok}: {e}");
        }
        for bad in [
            "",
            "vms",
            "/vms/",
            "/vms/a/b",
            "/vms/..",
            "/etc",
            "//",
            "/cluster/x",
            "/vms/a b",
        ] {
            let mut e = ValidationErrors::default();
            check_acl_path(&mut e, "p", bad);
            assert!(!e.0.is_empty(), "{bad}");
        }
    }

    #[test]
    fn names_and_ids() {
        let ok = |f: fn(&mut ValidationErrors, &str, &str), s: &str| {
            let mut e = ValidationErrors::default();
            f(&mut e, "x", s);
            e.0.is_empty()
        };
        assert!(ok(check_user_name, "alice"));
        assert!(ok(check_user_name, "ops.team-1"));
        assert!(!ok(check_user_name, "Alice"));
        assert!(!ok(check_user_name, "1a"));
        assert!(!ok(check_user_name, "a!b"));
        assert!(!ok(check_user_name, "a:b"));
        assert!(!ok(check_user_name, &"a".repeat(33)));
        assert!(ok(check_token_id, "ci-2026"));
        assert!(!ok(check_token_id, "a=b"));
        assert!(!ok(check_token_id, "a!b"));
        assert!(!ok(check_token_id, ""));
        assert_eq!(Role::parse("operator"), Some(Role::Operator));
        assert_eq!(Role::parse("god"), None);
    }
}
