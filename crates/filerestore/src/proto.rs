//! The wire between the daemon and the file-restore helper VM, over a virtio-serial
//! port (`PORT_NAME`): the daemon is one end of QEMU's chardev socket, the helper
//! reads and writes `/dev/vportNpM`.
//!
//! The daemon sends one request at a time, a [`Kind::Message`] frame holding a JSON
//! [`Request`]. The helper answers with [`sync_marker`] of the request's id (the
//! daemon skips whatever came before it: the tail of an answer whose reader went
//! away, which QEMU dropped only in part), then frames: a [`Reply`] message; for a
//! read, data frames and an end frame (or an error frame when the read failed
//! half-way). A frame is a kind byte and a big-endian `u32` length, then that many
//! bytes; lengths beyond [`MAX_MESSAGE`]/[`MAX_DATA`] are refused before anything is
//! read (the helper runs what a guest wrote: it is no more trusted than the guest).

use serde::{Deserialize, Serialize};

/// The name of the virtio-serial port (`/sys/class/virtio-ports/*/name` in the helper).
pub const PORT_NAME: &str = "org.ferry.file-restore";
/// The largest JSON message (a listing of [`MAX_ENTRIES`] fits).
pub const MAX_MESSAGE: u32 = 16 << 20;
/// The largest data frame.
pub const MAX_DATA: u32 = 256 << 10;
/// Entries one listing holds at most (a folder with more says it was cut short).
pub const MAX_ENTRIES: usize = 20_000;
/// The longest path a request may name.
pub const MAX_PATH: usize = 4096;

/// What a frame holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// JSON: a [`Request`] (daemon → helper) or a [`Reply`] (helper → daemon).
    Message = 1,
    /// Bytes of a file or an archive.
    Data = 2,
    /// The data is complete (empty).
    End = 3,
    /// The data broke off (JSON [`Reply::Error`]).
    Failed = 4,
}

/// Why a frame or a path was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtoError {
    UnknownKind(u8),
    TooLong { kind: Kind, len: u32 },
    BadEnd(u32),
    BadPath(String),
}

impl std::fmt::Display for ProtoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProtoError::UnknownKind(k) => write!(f, "unknown frame kind {k}"),
            ProtoError::TooLong { kind, len } => {
                write!(f, "a {kind:?} frame of {len} bytes is longer than allowed")
            }
            ProtoError::BadEnd(len) => write!(f, "an end frame of {len} bytes"),
            ProtoError::BadPath(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for ProtoError {}

/// Bytes of a frame header.
pub const HEADER: usize = 5;

/// A frame's header: its kind and length, checked against the limits.
pub fn decode_header(h: [u8; HEADER]) -> Result<(Kind, u32), ProtoError> {
    let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]);
    let kind = match h[0] {
        1 => Kind::Message,
        2 => Kind::Data,
        3 => Kind::End,
        4 => Kind::Failed,
        k => return Err(ProtoError::UnknownKind(k)),
    };
    let max = match kind {
        Kind::Message | Kind::Failed => MAX_MESSAGE,
        Kind::Data => MAX_DATA,
        Kind::End => 0,
    };
    if kind == Kind::End && len != 0 {
        return Err(ProtoError::BadEnd(len));
    }
    if len > max {
        return Err(ProtoError::TooLong { kind, len });
    }
    Ok((kind, len))
}

/// A frame's header for `len` bytes of `kind`.
pub fn encode_header(kind: Kind, len: u32) -> [u8; HEADER] {
    let l = len.to_be_bytes();
    [kind as u8, l[0], l[1], l[2], l[3]]
}

/// What the helper writes before its answer to request `id`.
pub fn sync_marker(id: u64) -> [u8; 16] {
    let mut m = [0u8; 16];
    m[..8].copy_from_slice(b"\0FERRYFR");
    m[8..].copy_from_slice(&id.to_be_bytes());
    m
}

/// A request of the daemon. Paths are `/disk{i}/{volume}/...` (see [`components`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Chosen at random by the daemon (nothing a guest wrote can predict it).
    pub id: u64,
    #[serde(flatten)]
    pub op: Op,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// A folder's entries (`/`: the disks; `/disk0`: its volumes).
    List { path: String },
    /// A regular file's bytes, or a folder as a tar archive (links stay links).
    Read { path: String },
}

/// The helper's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    Listing {
        entries: Vec<Entry>,
        /// More entries than [`MAX_ENTRIES`]: the first ones only.
        truncated: bool,
    },
    /// Data frames follow: a file's bytes (`size` its length) or a folder's tar
    /// archive (`archive`).
    Data {
        size: Option<u64>,
        archive: bool,
    },
    Error {
        kind: ErrorKind,
        message: String,
    },
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    NotFound,
    /// Not a folder (list), a link or device (read), a link on the way.
    WrongKind,
    /// The volume holds no filesystem the helper can read.
    Unreadable,
    Invalid,
    Io,
}

/// One entry of a listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The name (invalid UTF-8 replaced; `utf8` false then).
    pub name: String,
    pub utf8: bool,
    pub kind: EntryKind,
    /// Bytes (files; a disk's or volume's size).
    pub size: u64,
    /// Seconds since 1970 (0 when unknown).
    pub mtime: i64,
    /// Permission bits.
    pub mode: u32,
    /// A link's target.
    pub target: Option<String>,
    /// A volume's filesystem.
    pub fs: Option<String>,
    /// Why a volume cannot be read.
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    Disk,
    Volume,
    Dir,
    File,
    Symlink,
    Other,
}

/// The components of a request path: `/` separated, empty ones skipped; `.`, `..`,
/// NUL and paths longer than [`MAX_PATH`] refused (nothing leaves the tree it names).
pub fn components(path: &str) -> Result<Vec<&str>, ProtoError> {
    if path.len() > MAX_PATH {
        return Err(ProtoError::BadPath(format!(
            "the path is longer than {MAX_PATH} bytes"
        )));
    }
    if path.contains('\0') {
        return Err(ProtoError::BadPath("the path holds a NUL byte".into()));
    }
    let c: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    if c.iter().any(|s| *s == "." || *s == "..") {
        return Err(ProtoError::BadPath(
            "the path holds `.` or `..`; name it from the backup's root".into(),
        ));
    }
    Ok(c)
}

/// `path` in the form listings use: `/` and the components joined.
pub fn normalize(path: &str) -> Result<String, ProtoError> {
    Ok(format!("/{}", components(path)?.join("/")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn paths() {
        assert_eq!(components("/").unwrap(), Vec::<&str>::new());
        assert_eq!(
            components("//disk0//p1/etc/").unwrap(),
            ["disk0", "p1", "etc"]
        );
        assert!(components("/disk0/p1/../../x").is_err());
        assert!(components("/disk0/./x").is_err());
        assert!(components("/a\0b").is_err());
        assert!(components(&"a/".repeat(3000)).is_err());
        assert_eq!(normalize("disk0//fs/").unwrap(), "/disk0/fs");
        // dots inside names are names
        assert_eq!(components("/d/...").unwrap(), ["d", "..."]);
    }

    #[test]
    fn headers() {
        assert_eq!(
            decode_header(encode_header(Kind::Data, 7)).unwrap(),
            (Kind::Data, 7)
        );
        assert!(matches!(
            decode_header(encode_header(Kind::Data, MAX_DATA + 1)),
            Err(ProtoError::TooLong { .. })
        ));
        assert!(decode_header([3, 0, 0, 0, 1]).is_err());
        assert!(decode_header([9, 0, 0, 0, 0]).is_err());
    }

    #[test]
    fn messages_round_trip() {
        let r = Request {
            id: 42,
            op: Op::Read {
                path: "/disk0/p1".into(),
            },
        };
        let j = serde_json::to_string(&r).unwrap();
        assert_eq!(j, r#"{"id":42,"op":"read","path":"/disk0/p1"}"#);
        assert_eq!(serde_json::from_str::<Request>(&j).unwrap(), r);
    }

    proptest! {
        /// Any header bytes decode to a frame within the limits or an error; never
        /// a length beyond them.
        #[test]
        fn any_header_is_bounded(h in any::<[u8; 5]>()) {
            if let Ok((k, len)) = decode_header(h) {
                prop_assert!(len <= MAX_MESSAGE);
                if k == Kind::Data { prop_assert!(len <= MAX_DATA); }
                if k == Kind::End { prop_assert_eq!(len, 0); }
                prop_assert_eq!(encode_header(k, len), h);
            }
        }

        /// What components accepts never climbs out.
        #[test]
        fn accepted_paths_stay_inside(p in "[a./]{0,24}") {
            if let Ok(c) = components(&p) {
                prop_assert!(c.iter().all(|s| !s.is_empty() && *s != "." && *s != ".."));
            }
        }
    }
}
