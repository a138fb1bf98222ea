//! Storage pools and their volumes. A `dir` pool keeps each volume as one qcow2 or raw
//! file in a directory; every operation goes through `qemu-img` (never a shell), and a
//! volume name can never point outside its pool.

mod dir;
#[cfg(any(test, feature = "fake"))]
pub mod fake;
mod lock;
mod meta;
pub mod ovf;
mod qemu_img;
mod source;

pub use dir::{create_overlay, DirPool, SnapshotOp};
pub use lock::{LockDir, LockError, VolumeLock};
pub use meta::{ChainLink, VolumeMeta};
pub use qemu_img::{info as image_info, ImageInfo, ImageTool, ImgOp, InternalSnapshot, QemuImg};
pub use source::{check as check_source, SourceFormat};

/// Creates (or truncates) a file readable and writable by its owner only; never
/// through a symlink.
pub fn create_private(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
}

use ferry_types::ValidationErrors;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error(transparent)]
    Invalid(#[from] ValidationErrors),
    #[error("Volume {0} not found")]
    NotFound(String),
    #[error("Volume {0} already exists")]
    Exists(String),
    #[error("Pool directory {path}")]
    PoolDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Run qemu-img {op}")]
    Spawn {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("qemu-img {op} failed: {stderr}")]
    QemuImg { op: &'static str, stderr: String },
    #[error("Source file {path}")]
    Source {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Image {path} refused: {reason}")]
    Refused { path: String, reason: String },
    #[error("Volume record {path}: {reason}")]
    Meta { path: String, reason: String },
    #[error("Cannot shrink {volume} from {from} to {to} bytes")]
    Shrink { volume: String, from: u64, to: u64 },
    #[error("Delete volume file {path}")]
    Delete {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl StorageError {
    /// Whether the caller's input, not the host, is at fault (an HTTP 4xx).
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            StorageError::Invalid(_)
                | StorageError::NotFound(_)
                | StorageError::Exists(_)
                | StorageError::Shrink { .. }
                | StorageError::Source { .. }
                | StorageError::Refused { .. }
        )
    }
}
