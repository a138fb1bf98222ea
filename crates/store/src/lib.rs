//! The state store: the etcd data model behind a trait, so one host runs on SQLite and a
//! cluster on etcd with the same code above it.
//!
//! - keys and values with revisions (`create_rev`, `mod_rev`, `version`), one global
//!   revision counter bumped by every write;
//! - transactions: compare (version/mod_rev/value) then a list of operations, atomically;
//! - leases with a TTL: keys put under a lease vanish when it expires;
//! - watches on a prefix from a revision (history kept for a bounded window; asking for
//!   an older revision gives [`StoreError::Compacted`], so the caller re-lists).

pub mod etcd;
pub mod health;
pub mod keys;
pub mod member;
pub mod membership;
pub mod mirror;
#[cfg(any(test, feature = "fake"))]
pub mod partition;
mod prefixed;
mod sqlite;
#[cfg(test)]
mod tests;
mod typed;

pub use etcd::{EtcdStore, EtcdTls};
pub use prefixed::Prefixed;
pub use sqlite::SqliteStore;
pub use typed::StoreJson;

use async_trait::async_trait;
use std::time::Duration;
use tokio::sync::mpsc;

pub type LeaseId = i64;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("Open store at {path}")]
    Open {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("Store query failed")]
    Sqlite(#[from] rusqlite::Error),
    #[error("Lease {0} not found or expired")]
    LeaseNotFound(LeaseId),
    #[error("Revision {requested} was compacted (oldest kept: {oldest})")]
    Compacted { requested: i64, oldest: i64 },
    #[error("Decode value of {key}")]
    Decode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("Store task failed: {0}")]
    Join(String),
    #[error("Connect to etcd at {endpoints}")]
    Connect {
        endpoints: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error("etcd request failed")]
    Etcd(#[source] etcd_client::Error),
    #[error("etcd did not answer in time ({0})")]
    Timeout(&'static str),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    pub create_rev: i64,
    pub mod_rev: i64,
    /// Number of writes since creation (1 after the first put).
    pub version: i64,
    pub lease: Option<LeaseId>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    Equal,
    NotEqual,
    Less,
    Greater,
}

/// A condition of a transaction. A missing key has version 0, mod_rev 0 and no value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    Version(String, Cmp, i64),
    ModRev(String, Cmp, i64),
    Value(String, Cmp, Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Get(String),
    Put {
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    },
    Delete(String),
    DeletePrefix(String),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    pub compare: Vec<Compare>,
    pub success: Vec<Op>,
    pub failure: Vec<Op>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnResponse {
    pub succeeded: bool,
    pub revision: i64,
    /// One entry per `Get` in the branch that ran.
    pub gets: Vec<Option<KeyValue>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    pub revision: i64,
    pub kind: EventKind,
    pub key: String,
    /// The new value for a put, empty for a delete.
    pub value: Vec<u8>,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;
    /// Every key starting with `prefix`, in key order.
    async fn list(&self, prefix: &str) -> Result<Vec<KeyValue>, StoreError> {
        Ok(self.list_at(prefix).await?.0)
    }
    /// The same, all read at one revision, and that revision (to watch from).
    async fn list_at(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), StoreError>;
    /// Returns the new revision.
    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<i64, StoreError>;
    /// Returns whether the key existed.
    async fn delete(&self, key: &str) -> Result<bool, StoreError>;
    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError>;
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError>;
    /// Renews a lease for its TTL; fails once it has expired.
    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError>;
    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError>;
    /// Events under `prefix` after revision `after` (`None`: from now on).
    async fn watch(
        &self,
        prefix: &str,
        after: Option<i64>,
    ) -> Result<mpsc::Receiver<WatchEvent>, StoreError>;
    async fn revision(&self) -> Result<i64, StoreError>;
}
