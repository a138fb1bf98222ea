//! What ferry knows of a volume, kept beside it in the pool: its format and, for an
//! overlay ferry made (a linked clone), the volume it is an overlay on.
//!
//! The format is data, never probed: a guest writes whatever it likes into a raw disk,
//! including a qcow2 header naming a host file as its backing file. Asking `qemu-img` (or
//! QEMU) what a file "is" would turn that into a read of the host file. So every
//! operation on a volume passes the format recorded here (`-f`, `"driver"`), and a
//! qcow2 node names its backing chain from here, never from the file's header.
//!
//! Kept in `{pool}/.meta/{volume}.json`, in the pool's own directory, so a shared pool's
//! hosts all see it. A file with no record (put into the pool by hand) is raw: import
//! images with `ferry volume import`, which checks and records their format.

use crate::StorageError;
use ferry_types::DiskFormat;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// How deep a chain of linked clones may go (templates of clones of templates …).
pub const MAX_CHAIN: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeMeta {
    pub format: DiskFormat,
    /// The volume of the same pool this one is an overlay on (made by ferry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing: Option<String>,
}

impl VolumeMeta {
    pub fn plain(format: DiskFormat) -> VolumeMeta {
        VolumeMeta {
            format,
            backing: None,
        }
    }
}

/// A file of a backing chain as QEMU must open it: path and recorded format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainLink {
    pub path: PathBuf,
    pub format: DiskFormat,
}

pub(crate) fn dir(pool: &Path) -> PathBuf {
    pool.join(".meta")
}

pub(crate) fn path(pool: &Path, volume: &str) -> PathBuf {
    dir(pool).join(format!("{volume}.json"))
}

/// The record of `volume`; raw when there is none. A record that cannot be read or
/// parsed is an error (never a guess).
pub(crate) fn read(pool: &Path, volume: &str) -> Result<VolumeMeta, StorageError> {
    let p = path(pool, volume);
    match std::fs::read(&p) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| StorageError::Meta {
            path: p.display().to_string(),
            reason: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Ok(VolumeMeta::plain(DiskFormat::Raw))
        }
        Err(e) => Err(StorageError::Meta {
            path: p.display().to_string(),
            reason: e.to_string(),
        }),
    }
}

/// Writes the record durably (temporary file, fsync, rename), readable by root only.
pub(crate) fn write(pool: &Path, volume: &str, m: &VolumeMeta) -> Result<(), StorageError> {
    let d = dir(pool);
    let err = |e: std::io::Error| StorageError::Meta {
        path: path(pool, volume).display().to_string(),
        reason: e.to_string(),
    };
    std::fs::create_dir_all(&d).map_err(err)?;
    let tmp = d.join(format!(".{volume}.tmp"));
    let body = serde_json::to_vec(m).map_err(|e| StorageError::Meta {
        path: tmp.display().to_string(),
        reason: e.to_string(),
    })?;
    let mut f = crate::create_private(&tmp).map_err(err)?;
    f.write_all(&body).and_then(|_| f.sync_all()).map_err(err)?;
    std::fs::rename(&tmp, path(pool, volume)).map_err(err)
}

pub(crate) fn remove(pool: &Path, volume: &str) {
    let _ = std::fs::remove_file(path(pool, volume));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_is_raw_and_junk_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(
            read(d.path(), "v").unwrap(),
            VolumeMeta::plain(DiskFormat::Raw)
        );
        let m = VolumeMeta {
            format: DiskFormat::Qcow2,
            backing: Some("base".into()),
        };
        write(d.path(), "v", &m).unwrap();
        assert_eq!(read(d.path(), "v").unwrap(), m);
        std::fs::write(path(d.path(), "w"), b"{\"format\":\"vmdk\"}").unwrap();
        assert!(matches!(
            read(d.path(), "w"),
            Err(StorageError::Meta { .. })
        ));
    }
}
