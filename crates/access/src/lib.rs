//! Who may do what, decided without I/O.
//!
//! - [`need`]: the privilege an API call needs, and on which path (`/vms/web1`, ...),
//!   from its method and path alone — one table for every route.
//! - [`allows`]: whether a user's grants give that privilege on that path (a grant
//!   covers its path and everything below it; `root` may do everything).
//! - [`password`]: argon2id hashes; [`token`]: API token values and their digests.

pub mod password;
pub mod token;

use ferry_types::{AclEntry, Role, ROOT_USER};

/// What an API call does to its object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Privilege {
    /// Read.
    Audit,
    /// Start, stop, shutdown, reboot, pause, resume, suspend.
    PowerMgmt,
    /// The serial console and VNC (and the console's history).
    Console,
    /// Take, revert and delete snapshots.
    Snapshot,
    /// Move a VM to another host.
    Migrate,
    /// Create, change, delete: everything else.
    Modify,
}

impl Privilege {
    pub const ALL: [Privilege; 6] = [
        Privilege::Audit,
        Privilege::PowerMgmt,
        Privilege::Console,
        Privilege::Snapshot,
        Privilege::Migrate,
        Privilege::Modify,
    ];
}

/// Whether `role` includes `p`.
pub fn role_has(role: Role, p: Privilege) -> bool {
    match role {
        Role::Administrator => true,
        Role::Operator => p != Privilege::Modify,
        Role::Auditor => p == Privilege::Audit,
    }
}

/// Whether a grant on `grant` covers the object at `path` (itself or below it; path
/// segments whole: `/vms/web` does not cover `/vms/web1`).
pub fn covers(grant: &str, path: &str) -> bool {
    grant == "/"
        || path == grant
        || path
            .strip_prefix(grant)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// Whether `user` has privilege `p` on `path` under `acl`.
pub fn allows(acl: &[AclEntry], user: &str, p: Privilege, path: &str) -> bool {
    user == ROOT_USER
        || acl
            .iter()
            .any(|e| e.user == user && covers(&e.path, path) && role_has(e.role, p))
}

/// The grants that apply to `user` (root: Administrator on `/`).
pub fn grants_of(acl: &[AclEntry], user: &str) -> Vec<AclEntry> {
    if user == ROOT_USER {
        return vec![AclEntry {
            path: "/".into(),
            user: user.into(),
            role: Role::Administrator,
        }];
    }
    acl.iter().filter(|e| e.user == user).cloned().collect()
}

/// What a call needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Need {
    /// Nothing: the login, the session, the OpenAPI document, the UI's files, a
    /// joining host's request (its handler checks the join token).
    Open,
    /// Any authenticated caller; the handler decides on the object (a task by id).
    Authenticated,
    /// `Privilege` on the path.
    On(Privilege, String),
    /// Allowed to the named user itself (its password, its tokens), otherwise
    /// `Privilege` on the path.
    SelfOr(String, Privilege, String),
}

fn on(p: Privilege, path: impl Into<String>) -> Need {
    Need::On(p, path.into())
}

/// The need of `method path` (the path without its query). Anything not named here
/// under `/api/` needs Modify on `/`: a new route is closed until it is listed.
pub fn need(method: &str, path: &str) -> Need {
    let read = matches!(method, "GET" | "HEAD");
    let rw = |path: &str| {
        if read {
            on(Privilege::Audit, path)
        } else {
            on(Privilege::Modify, path)
        }
    };
    if path == "/metrics" {
        return on(Privilege::Audit, "/");
    }
    // Nothing ferry names needs escapes or dot segments; a path with them could mean
    // something else to whoever resolves it next (a proxy, a URL parser).
    let odd = path
        .split('/')
        .any(|s| s == "." || s == ".." || s.contains('%') || s.contains('\\'));
    if odd && (path.starts_with("/api/") || path.starts_with("/metrics")) {
        return on(Privilege::Modify, "/");
    }
    let Some(rest) = path.strip_prefix("/api/v1/") else {
        return if path.starts_with("/api/") && !path.starts_with("/api/docs") {
            on(Privilege::Modify, "/")
        } else {
            Need::Open
        };
    };
    let seg: Vec<&str> = rest.split('/').collect();
    match (method, seg.as_slice()) {
        ("POST", ["login"] | ["logout"]) | ("GET", ["session"] | ["openapi.json"]) => Need::Open,
        ("POST", ["cluster", "members"]) => Need::Open,
        // Another host's API through this one (`/api/v1/nodes/HOST/api/v1/...`): what
        // it needs there. Anything else there is closed (and not forwarded anyway).
        (_, ["nodes", _host, "api", "v1", inner @ ..])
            if !inner.is_empty() && inner[0] != "nodes" =>
        {
            need(method, &format!("/api/v1/{}", inner.join("/")))
        }
        (_, ["nodes", ..]) => on(Privilege::Modify, "/"),
        (_, ["vms"]) => rw("/vms"),
        ("GET", ["vms", n]) | ("GET", ["vms", n, "metrics" | "placement" | "snapshots" | "agent"]) => {
            on(Privilege::Audit, format!("/vms/{n}"))
        }
        ("GET", ["vms", n, "console" | "vnc"]) | ("GET", ["vms", n, "console", "history"]) => {
            on(Privilege::Console, format!("/vms/{n}"))
        }
        (
            "POST",
            ["vms", n, "start" | "stop" | "shutdown" | "reboot" | "pause" | "resume" | "suspend"],
        ) => on(Privilege::PowerMgmt, format!("/vms/{n}")),
        ("POST", ["vms", n, "snapshots"])
        | ("DELETE", ["vms", n, "snapshots", _])
        | ("POST", ["vms", n, "snapshots", _, "revert"]) => {
            on(Privilege::Snapshot, format!("/vms/{n}"))
        }
        ("POST", ["vms", n, "migrate" | "move"]) => on(Privilege::Migrate, format!("/vms/{n}")),
        // A clone is a new VM.
        ("POST", ["vms", _, "clone"]) => on(Privilege::Modify, "/vms"),
        (_, ["vms", n, ..]) => rw(&format!("/vms/{n}")),
        ("GET", ["migrations", n]) => on(Privilege::Audit, format!("/vms/{n}")),
        ("POST", ["placement", "create"]) => on(Privilege::Modify, "/vms"),
        ("POST", ["placement"]) => on(Privilege::Audit, "/cluster"),
        // An import reads a file of the host by its path: the host's administrator's.
        // A download fetches from wherever the host can reach: the host's administrator's.
        ("POST", ["pools", _, "import" | "import-ova" | "download"]) => {
            on(Privilege::Modify, "/")
        }
        // A store is a folder of the hosts, named by its path: the hosts' administrator's.
        ("POST", ["backup-stores"]) => on(Privilege::Modify, "/"),
        // Backups hold every VM's data: one privilege path for taking, listing, restoring
        // and pruning them (a backup operator's).
        // A backup's files, its chunks and its index are a VM's data: reading them is
        // restoring, never an audit.
        (_, ["backups", _, "files" | "index", ..]) | (_, ["backup-stores", _, "chunks", ..]) => {
            on(Privilege::Modify, "/backup-stores")
        }
        // A sync makes this host connect where it is told: the hosts' administrator's.
        (_, ["backup-stores", _, "sync"]) => on(Privilege::Modify, "/"),
        (_, ["backup-stores" | "backups" | "backup-jobs", ..]) => rw("/backup-stores"),
        (_, ["pools"]) => rw("/pools"),
        (_, ["pools", p, ..]) => rw(&format!("/pools/{p}")),
        // What only hosts call of each other (a VM arriving, its files uploaded, the
        // copies of replicated volumes): besides hosts, root-level administrators only.
        ("POST" | "PUT", ["migrations", "incoming" | "cold", ..])
        | ("POST", ["replication", "copies" | "pools", ..])
        | ("POST", ["cluster", "etcd", ..])
        // Every running VM's name and load, whatever the caller's VM grants: DRS on
        // another host asks.
        | ("GET", ["host", "loads"]) => on(Privilege::Modify, "/"),
        (
            _,
            ["bridges" | "resource-pools" | "drs" | "cluster" | "host" | "migrations"
            | "replication", ..],
        ) => rw("/cluster"),
        ("GET", ["tasks", _]) => Need::Authenticated,
        ("GET", ["tasks"] | ["events"] | ["events", "stream"]) => on(Privilege::Audit, "/"),
        ("GET", ["access", "users", u] | ["access", "users", u, "tokens"]) => {
            Need::SelfOr(u.to_string(), Privilege::Audit, "/access".into())
        }
        ("PUT", ["access", "users", u, "password"])
        | ("POST", ["access", "users", u, "tokens"])
        | ("DELETE", ["access", "users", u, "tokens", _]) => {
            Need::SelfOr(u.to_string(), Privilege::Modify, "/access".into())
        }
        (_, ["access", ..]) => rw("/access"),
        _ => on(Privilege::Modify, "/"),
    }
}

/// Whether `user` (with `acl`) may make a call that needs `n`.
pub fn permits(acl: &[AclEntry], user: &str, n: &Need) -> bool {
    match n {
        Need::Open | Need::Authenticated => true,
        Need::On(p, path) => allows(acl, user, *p, path),
        Need::SelfOr(who, p, path) => who == user || allows(acl, user, *p, path),
    }
}

#[cfg(test)]
mod tests;
