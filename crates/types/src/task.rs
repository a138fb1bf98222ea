//! Tasks: long operations run in the background, with state, progress and a log
//! (like Proxmox's UPID tasks).
//!
//! ```text
//!  Running --ok--> Succeeded
//!     \----err---> Failed
//! ```

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    Running,
    Succeeded,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Task {
    pub id: String,
    /// What runs: `vm.start`, `vm.shutdown`, `volume.import`, ...
    pub kind: String,
    /// The object it works on (a VM name, `pool/volume`).
    pub target: String,
    pub state: TaskState,
    /// 0.0 to 1.0.
    pub progress: f32,
    pub log: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What the task produced (a migration report, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub result: Option<serde_json::Value>,
    pub started_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_ms: Option<u64>,
    /// Who started it (a user, `host:NAME` for another host of the cluster, or
    /// `ferry` for the daemon's own work such as HA and DRS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// The answer to a request that started a task (HTTP 202).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TaskAccepted {
    pub task: String,
}
