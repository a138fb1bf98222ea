//! The agent's errors, classified for the API (which maps them to status codes).

use ferry_types::state::InvalidTransition;
use ferry_types::ValidationErrors;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Invalid(#[from] ValidationErrors),
    #[error("{0} not found")]
    NotFound(String),
    /// The request is fine but the situation does not allow it (409).
    #[error("{what}{}", cause_text(source))]
    Refused {
        why: Refusal,
        what: String,
        /// What the refusal rests on, when another error (kept whole, for logs).
        #[source]
        source: Option<Cause>,
    },
    /// The operation went wrong on the way: QEMU, the guest, a migration or stored
    /// data did not do what was needed (409, as these always were, but for
    /// [`Failure::Internal`]; the code says which).
    #[error("{what}{}", cause_text(source))]
    Failed {
        why: Failure,
        what: String,
        /// The error underneath, kept whole (its text also ends the message).
        #[source]
        source: Option<Cause>,
    },
    #[error(transparent)]
    State(#[from] InvalidTransition),
    #[error(transparent)]
    Storage(#[from] ferry_storage::StorageError),
    #[error("Start QEMU")]
    Qemu(#[from] ferry_qemu::QemuError),
    #[error("QMP")]
    Qmp(#[from] ferry_qmp::QmpError),
    #[error("Host networking")]
    Net(#[from] ferry_net::NetError),
    #[error("State store")]
    Store(#[from] ferry_store::StoreError),
    #[error(transparent)]
    Lock(#[from] ferry_storage::LockError),
    #[error("etcd member")]
    Member(#[from] ferry_store::member::MemberError),
    #[error("{what}")]
    Etcd {
        what: String,
        #[source]
        source: etcd_client::Error,
    },
    /// This host lost its cluster lease: it runs no HA VMs and takes no work.
    #[error(
        "Host {0} is fenced (it lost its cluster lease); it takes no work until it holds one again"
    )]
    Fenced(String),
    #[error("Host {host}: {what}")]
    Peer {
        host: String,
        what: String,
        /// The other host's HTTP status, when it answered.
        status: Option<u16>,
        /// The other host's error code, when it answered with one.
        code: Option<String>,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// The caller's credentials (a join token) are missing, wrong, used or expired.
    #[error("{0}")]
    Unauthorized(String),
    #[error("Certificates")]
    Pki(#[from] ferry_pki::PkiError),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// An error underneath another, kept as itself rather than flattened into text.
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

/// The message's tail for a cause: ": {cause}", or nothing.
fn cause_text(source: &Option<Cause>) -> String {
    source
        .as_ref()
        .map(|c| format!(": {c}"))
        .unwrap_or_default()
}

/// Why a request is refused. Each has a stable code in API answers
/// ([`ferry_types::ApiErrorBody::code`]); the message says what exactly and what to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Something of that name is there already (VM, pool, volume, snapshot, user, …).
    Exists,
    /// Something still uses or holds it (volumes, pools, resource pools, hosts with VMs).
    InUse,
    /// It needs the VM's QEMU, and the VM has none.
    NotRunning,
    /// It needs the VM stopped.
    Running,
    /// Templates never change and never start.
    Template,
    /// The host is in maintenance: it takes no VMs.
    Maintenance,
    /// Another operation got there first (a migration under way, a record changed
    /// meanwhile); try again.
    Busy,
    /// The VM's devices, disks or pools do not allow it.
    Unsupported,
    /// This host lacks something it needs (a bridge, OVMF, vhost-net, the QEMU group,
    /// access to a directory, cgroups).
    HostLacks,
    /// Not enough room: memory, DRS admission, resource pools, no host to place on.
    NoRoom,
    /// Cluster membership does not allow it (not in a cluster, the CA's holder, …).
    Membership,
    /// A replicated volume's copies do not allow it (no copy here, not primary, …).
    Replica,
    /// The VM cannot move to that host as it is (its disks, snapshots).
    NotMovable,
    /// No migration of that VM is arriving or moving here.
    NotInTransit,
    /// HA no longer wants the VM restarted (a user stopped it, or it runs).
    NotWanted,
    /// The host is shutting its VMs down (its own shutdown): nothing starts.
    ShuttingDown,
}

impl Refusal {
    /// The stable code in API answers.
    pub fn code(self) -> &'static str {
        match self {
            Refusal::Exists => "exists",
            Refusal::InUse => "in_use",
            Refusal::NotRunning => "not_running",
            Refusal::Running => "running",
            Refusal::Template => "template",
            Refusal::Maintenance => "maintenance",
            Refusal::Busy => "busy",
            Refusal::Unsupported => "unsupported",
            Refusal::HostLacks => "host_lacks",
            Refusal::NoRoom => "no_room",
            Refusal::Membership => "membership",
            Refusal::Replica => "replica",
            Refusal::NotMovable => "not_movable",
            Refusal::NotInTransit => "not_in_transit",
            Refusal::NotWanted => "not_wanted",
            Refusal::ShuttingDown => "shutting_down",
        }
    }
}

/// What went wrong in an operation that was allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// QEMU refused a command, lost a job, or did not end.
    Qemu,
    /// The guest did not do its part (release a device).
    Guest,
    /// A migration, disk mirror or move failed (the VM stays where it was).
    Migration,
    /// The user aborted it.
    Aborted,
    /// Stored data or a configuration file is malformed.
    Corrupt,
    /// Something that should be trusted is not (a symlink where a file belongs, a
    /// member showing one CA and handing out another, a peer's odd address).
    Untrusted,
    /// A backup, restore or backup store operation failed (the store, the read from
    /// QEMU, the fleecing space).
    Backup,
    /// A library the agent relies on failed (password hashing): a 500.
    Internal,
}

impl Failure {
    /// The stable code in API answers.
    pub fn code(self) -> &'static str {
        match self {
            Failure::Qemu => "qemu_failed",
            Failure::Guest => "guest",
            Failure::Migration => "migration_failed",
            Failure::Aborted => "aborted",
            Failure::Corrupt => "corrupt",
            Failure::Untrusted => "untrusted",
            Failure::Backup => "backup_failed",
            Failure::Internal => "internal",
        }
    }
}

/// How the API should answer an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    BadRequest,
    NotFound,
    Conflict,
    Unauthorized,
    /// Another host failed or could not be reached.
    BadGateway,
    Internal,
}

impl AgentError {
    pub fn class(&self) -> ErrorClass {
        match self {
            AgentError::Invalid(_) => ErrorClass::BadRequest,
            AgentError::NotFound(_) => ErrorClass::NotFound,
            AgentError::Failed {
                why: Failure::Internal,
                ..
            } => ErrorClass::Internal,
            AgentError::Refused { .. }
            | AgentError::Failed { .. }
            | AgentError::State(_)
            | AgentError::Fenced(_) => ErrorClass::Conflict,
            AgentError::Lock(ferry_storage::LockError::Held { .. }) => ErrorClass::Conflict,
            AgentError::Unauthorized(_) => ErrorClass::Unauthorized,
            // The other host's refusal of the request is passed on as what it was;
            // its refusal of this host (401/403: not the caller's credentials), its
            // failure, or no answer at all, is a bad gateway.
            AgentError::Peer { status, .. } => match status {
                Some(400 | 413 | 415 | 422) => ErrorClass::BadRequest,
                Some(404) => ErrorClass::NotFound,
                Some(409) => ErrorClass::Conflict,
                _ => ErrorClass::BadGateway,
            },
            AgentError::Pki(ferry_pki::PkiError::Bad { .. }) => ErrorClass::BadRequest,
            AgentError::Storage(e) => match e {
                ferry_storage::StorageError::NotFound(_) => ErrorClass::NotFound,
                ferry_storage::StorageError::Exists(_) => ErrorClass::Conflict,
                e if e.is_client_error() => ErrorClass::BadRequest,
                _ => ErrorClass::Internal,
            },
            _ => ErrorClass::Internal,
        }
    }

    /// The stable name of the error in API answers ([`ferry_types::ApiErrorBody::code`]).
    pub fn code(&self) -> &str {
        use ferry_storage::{LockError, StorageError};
        match self {
            AgentError::Invalid(_) => "invalid",
            AgentError::NotFound(_) => "not_found",
            AgentError::Refused { why, .. } => why.code(),
            AgentError::Failed { why, .. } => why.code(),
            AgentError::State(_) => "invalid_state",
            AgentError::Storage(StorageError::NotFound(_)) => "not_found",
            AgentError::Storage(StorageError::Exists(_)) => "exists",
            AgentError::Storage(e) if e.is_client_error() => "invalid",
            AgentError::Storage(_) => "storage",
            AgentError::Qemu(_) => "qemu",
            AgentError::Qmp(_) => "qmp",
            AgentError::Net(_) => "network",
            AgentError::Store(_) => "store",
            AgentError::Lock(LockError::Held { .. }) => "locked",
            AgentError::Lock(_) => "storage",
            AgentError::Member(_) | AgentError::Etcd { .. } => "etcd",
            AgentError::Fenced(_) => "fenced",
            AgentError::Peer {
                code: Some(c),
                status: Some(_),
                ..
            } if !c.is_empty() => c,
            AgentError::Peer {
                status: Some(s), ..
            } => match ferry_types::code_for_status(*s) {
                "internal" => "peer_failed",
                c => c,
            },
            AgentError::Peer { status: None, .. } => "peer_unreachable",
            AgentError::Unauthorized(_) => "unauthorized",
            AgentError::Pki(ferry_pki::PkiError::Bad { .. }) => "invalid_certificate",
            AgentError::Pki(_) => "pki",
            AgentError::Io { .. } => "io",
        }
    }

    /// A refusal: `why` for the code, `what` for people.
    pub fn refused(why: Refusal, what: impl Into<String>) -> AgentError {
        AgentError::Refused {
            why,
            what: what.into(),
            source: None,
        }
    }

    /// A refusal resting on another error: the message is `what: cause`, and the
    /// cause stays the error's source.
    pub fn refused_by(
        why: Refusal,
        what: impl Into<String>,
        cause: impl Into<Cause>,
    ) -> AgentError {
        AgentError::Refused {
            why,
            what: what.into(),
            source: Some(cause.into()),
        }
    }

    /// A failure on the way: `why` for the code, `what` for people.
    pub fn failed(why: Failure, what: impl Into<String>) -> AgentError {
        AgentError::Failed {
            why,
            what: what.into(),
            source: None,
        }
    }

    /// A failure caused by another error: the message is `what: cause`, and the
    /// cause stays the error's source (logs and tracing walk the chain).
    pub fn failed_by(why: Failure, what: impl Into<String>, cause: impl Into<Cause>) -> AgentError {
        AgentError::Failed {
            why,
            what: what.into(),
            source: Some(cause.into()),
        }
    }

    pub fn invalid(field: &str, reason: impl Into<String>) -> AgentError {
        let mut e = ValidationErrors::default();
        e.push(field, reason);
        AgentError::Invalid(e)
    }
}

pub type Result<T, E = AgentError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    /// Another host's refusal keeps its status and code across a host-to-host call;
    /// its failure or silence is the caller's bad gateway.
    #[test]
    fn a_peers_refusal_keeps_its_status_and_code() {
        let peer = |status: Option<u16>, code: Option<&str>| AgentError::Peer {
            host: "h2".into(),
            what: "x".into(),
            status,
            code: code.map(String::from),
            source: None,
        };
        let e = peer(Some(409), Some("invalid_state"));
        assert_eq!(
            (e.class(), e.code()),
            (ErrorClass::Conflict, "invalid_state")
        );
        let e = peer(Some(409), None);
        assert_eq!((e.class(), e.code()), (ErrorClass::Conflict, "conflict"));
        let e = peer(Some(409), Some("maintenance"));
        assert_eq!((e.class(), e.code()), (ErrorClass::Conflict, "maintenance"));
        let e = peer(Some(500), Some("qemu"));
        assert_eq!((e.class(), e.code()), (ErrorClass::BadGateway, "qemu"));
        let e = peer(Some(500), None);
        assert_eq!(
            (e.class(), e.code()),
            (ErrorClass::BadGateway, "peer_failed")
        );
        let e = peer(None, None);
        assert_eq!(
            (e.class(), e.code()),
            (ErrorClass::BadGateway, "peer_unreachable")
        );
        assert_eq!(AgentError::Fenced("h1".into()).code(), "fenced");
    }

    /// A failure's cause stays its source (logs walk it) and ends its message, once.
    #[test]
    fn a_failures_cause_is_its_source() {
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, "bad byte at 7");
        let e = AgentError::failed_by(Failure::Corrupt, "Cluster file /x", io);
        assert_eq!(e.to_string(), "Cluster file /x: bad byte at 7");
        assert_eq!(e.code(), "corrupt");
        let src = std::error::Error::source(&e).map(ToString::to_string);
        assert_eq!(src.as_deref(), Some("bad byte at 7"));
        assert_eq!(
            crate::error_chain(&e),
            vec!["Cluster file /x: bad byte at 7".to_string()]
        );
        let e = AgentError::refused_by(Refusal::HostLacks, "Resource pool p", "EBUSY".to_string());
        assert_eq!(
            (e.to_string().as_str(), e.code()),
            ("Resource pool p: EBUSY", "host_lacks")
        );
        assert!(std::error::Error::source(&AgentError::refused(Refusal::Busy, "x")).is_none());
    }

    /// Every refusal and failure (but an internal one) is a 409 with its own code; no
    /// two share one, and none takes a code the generic statuses use.
    #[test]
    fn refusals_and_failures_have_distinct_codes() {
        use Failure as F;
        use Refusal as R;
        let refusals = [
            R::Exists,
            R::InUse,
            R::NotRunning,
            R::Running,
            R::Template,
            R::Maintenance,
            R::Busy,
            R::Unsupported,
            R::HostLacks,
            R::NoRoom,
            R::Membership,
            R::Replica,
            R::NotMovable,
            R::NotInTransit,
            R::NotWanted,
            R::ShuttingDown,
        ];
        let failures = [
            F::Qemu,
            F::Guest,
            F::Migration,
            F::Aborted,
            F::Corrupt,
            F::Untrusted,
            F::Internal,
        ];
        let mut codes = std::collections::BTreeSet::new();
        for e in refusals
            .iter()
            .map(|&r| AgentError::refused(r, "x"))
            .chain(failures.iter().map(|&f| AgentError::failed(f, "x")))
        {
            let internal = matches!(
                e,
                AgentError::Failed {
                    why: F::Internal,
                    ..
                }
            );
            let want = if internal {
                ErrorClass::Internal
            } else {
                ErrorClass::Conflict
            };
            assert_eq!(e.class(), want);
            assert_eq!(e.to_string(), "x");
            assert!(codes.insert(e.code().to_string()), "{} twice", e.code());
        }
        for generic in [
            "conflict",
            "not_found",
            "invalid",
            "unauthorized",
            "peer_failed",
        ] {
            assert!(!codes.contains(generic), "{generic}");
        }
    }
}
