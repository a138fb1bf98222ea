//! An async client for QEMU's QMP protocol.
//!
//! One connection = one [`Qmp`]. A reader task parses every line QEMU sends: replies are
//! routed to the caller that sent the command with the same `id` (never "the next line",
//! since events can arrive between a command and its reply — `quit` sends `SHUTDOWN`
//! first), events go to a broadcast stream. Commands time out; when the socket closes
//! every waiting caller gets [`QmpError::Closed`] and [`Qmp::closed`] resolves, so the
//! owner can reconnect with [`Qmp::connect_retry`].

pub mod agent;
mod client;
mod codec;
pub mod commands;
#[cfg(feature = "fake")]
pub mod fake;

pub use client::{Qmp, QmpEvent};
pub use codec::{parse_message, Message};
pub use commands::Command;

use std::time::Duration;

/// Errors of the QMP client.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("Connect to QMP socket {path}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP handshake failed: {0}")]
    Handshake(String),
    #[error("QMP socket I/O")]
    Io(#[source] std::io::Error),
    #[error("QMP connection closed")]
    Closed,
    #[error("QMP command {command} timed out after {after:?}")]
    Timeout { command: String, after: Duration },
    /// QEMU answered with an error (`{"error": {"class": ..., "desc": ...}}`).
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("Unexpected QMP reply to {command}")]
    Decode {
        command: String,
        #[source]
        source: serde_json::Error,
    },
}

impl QmpError {
    /// Whether reconnecting may help (the connection, not the command, failed).
    pub fn should_reconnect(&self) -> bool {
        matches!(
            self,
            QmpError::Closed | QmpError::Io(_) | QmpError::Connect { .. }
        )
    }
}
