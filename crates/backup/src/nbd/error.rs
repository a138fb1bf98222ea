//! The NBD client's error: which operation failed and why, with the server's own
//! message when it sent one.

use super::reply::errno_name;
use super::wire::{rep_err_name, NameError, ProtoError, ESHUTDOWN};
use std::fmt;
use thiserror::Error;

/// The step of the protocol an error happened in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Handshake,
    StructuredReply,
    SetMetaContext,
    Go,
    Read,
    BlockStatus,
    Disconnect,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Handshake => "handshake",
            Op::StructuredReply => "NBD_OPT_STRUCTURED_REPLY",
            Op::SetMetaContext => "NBD_OPT_SET_META_CONTEXT",
            Op::Go => "NBD_OPT_GO",
            Op::Read => "read",
            Op::BlockStatus => "block status",
            Op::Disconnect => "disconnect",
        })
    }
}

#[derive(Debug, Error)]
pub enum NbdError {
    #[error("Cannot connect to the NBD server at {target}")]
    Connect {
        target: String,
        #[source]
        source: std::io::Error,
    },
    #[error("NBD {op} failed on the connection")]
    Io {
        op: Op,
        #[source]
        source: std::io::Error,
    },
    #[error("NBD server broke the protocol in {op}")]
    Protocol {
        op: Op,
        #[source]
        source: ProtoError,
    },
    #[error("NBD server refused {op} with {}: {message:?}", rep_err_name(*.reply))]
    Refused {
        op: Op,
        /// The option error reply type (`NBD_REP_ERR_*`).
        reply: u32,
        /// The server's message (may be empty).
        message: String,
    },
    #[error("NBD server failed {op} of {len} bytes at {offset} with {}: {message:?}", errno_name(*.errno))]
    Server {
        op: Op,
        offset: u64,
        len: u64,
        /// The NBD error value (errno-like).
        errno: u32,
        message: String,
    },
    #[error("Invalid NBD {op} of {len} bytes at {offset}: {reason}")]
    InvalidRequest {
        op: Op,
        offset: u64,
        len: u64,
        reason: &'static str,
    },
    #[error("Cannot send NBD {op}")]
    InvalidName {
        op: Op,
        #[source]
        source: NameError,
    },
    #[error("Metadata context {0} was not negotiated on this connection")]
    UnknownContext(u32),
    #[error("Block status walk produced more than {0} extents")]
    TooManyExtents(usize),
    #[error("NBD connection is unusable after an earlier failure")]
    Broken,
}

impl NbdError {
    /// Whether the connection is gone or must be dropped (I/O, protocol violation, a
    /// server shutting down): a new connection may succeed where this one cannot.
    pub fn should_reconnect(&self) -> bool {
        match self {
            NbdError::Connect { .. }
            | NbdError::Io { .. }
            | NbdError::Protocol { .. }
            | NbdError::Broken => true,
            NbdError::Server { errno, .. } => *errno == ESHUTDOWN,
            _ => false,
        }
    }
}
