//! The agent's errors, classified for the API (which maps them to status codes).

use ferry_types::state::InvalidTransition;
use ferry_types::ValidationErrors;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Invalid(#[from] ValidationErrors),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
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
            AgentError::Conflict(_) | AgentError::State(_) | AgentError::Fenced(_) => {
                ErrorClass::Conflict
            }
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
            AgentError::Conflict(_) => "conflict",
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
}
