//! The JSON body of every API error.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `{"code": "...", "error": "...", "causes": ["...", ...]}`: a stable name for scripts,
/// the message and its cause chain.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ApiErrorBody {
    /// What kind of error, for scripts (stable; the message may change).
    /// Refusals (409): `exists`, `in_use`, `not_running`, `running`, `template`,
    /// `maintenance`, `busy`, `unsupported`, `host_lacks`, `no_room`, `membership`,
    /// `replica`, `not_movable`, `not_in_transit`, `not_wanted`, `shutting_down`, `invalid_state`,
    /// `locked`, `fenced`; failures of an allowed operation (409): `qemu_failed`,
    /// `guest`, `migration_failed`, `aborted`, `corrupt`, `untrusted`. Others:
    /// `invalid`, `not_found`, `unauthorized`, `forbidden`, `too_large`,
    /// `unsupported_media_type`, `too_many_requests`, `peer_unreachable`, `peer_failed`,
    /// `qemu`, `qmp`, `network`, `store`, `etcd`, `storage`, `pki`,
    /// `invalid_certificate`, `io`, `internal`; `conflict` for a 409 of no finer kind.
    /// A refusal another host gave keeps its code.
    #[serde(default)]
    pub code: String,
    pub error: String,
    #[serde(default)]
    pub causes: Vec<String>,
}

/// The code of an error known only by its HTTP status.
pub fn code_for_status(status: u16) -> &'static str {
    match status {
        400 | 422 => "invalid",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not_found",
        409 => "conflict",
        413 => "too_large",
        415 => "unsupported_media_type",
        429 => "too_many_requests",
        502 | 504 => "peer_failed",
        _ => "internal",
    }
}
