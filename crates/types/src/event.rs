//! Events: state changes and QEMU events, kept by the daemon and streamed to clients.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Event {
    /// Monotonic sequence number (per daemon store).
    pub seq: u64,
    /// Unix time in milliseconds.
    pub time_ms: u64,
    /// The VM concerned, if any.
    pub vm: Option<String>,
    /// `state`, `qmp`, `task`, ...
    pub kind: String,
    /// Human-readable detail, e.g. `stopped -> running` or a QMP event name.
    pub message: String,
    /// Who caused it, when a request did (see [`crate::Task::user`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}
