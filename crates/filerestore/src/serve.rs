//! The helper's answers: a request in, frames out. The filesystems it reads are a
//! guest's (hostile): links are never followed (a link on the way is an error, a link
//! listed or archived stays a link), listings are bounded, archives skip folders seen
//! before (a corrupt filesystem may loop) and stop at [`MAX_DEPTH`].

use crate::proto::{
    self, components, encode_header, sync_marker, Entry, EntryKind, ErrorKind, Kind, Op, Reply,
    Request, MAX_DATA, MAX_ENTRIES,
};
use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// How deep an archive descends.
pub const MAX_DEPTH: usize = 256;

/// One filesystem of a disk: a partition (`p1`, …) or the whole disk (`fs`).
#[derive(Debug, Clone)]
pub struct Volume {
    pub name: String,
    pub size: u64,
    pub fs: Option<String>,
    /// Where it is mounted (read-only), or why not.
    pub mount: Result<PathBuf, String>,
}

/// One disk of the backup (`disk0`, … as the daemon named it).
#[derive(Debug, Clone)]
pub struct Disk {
    pub name: String,
    pub size: u64,
    pub volumes: Vec<Volume>,
}

/// A failed request: sent as [`Reply::Error`].
#[derive(Debug)]
pub struct Failure(pub ErrorKind, pub String);

fn fail<T>(kind: ErrorKind, msg: impl Into<String>) -> Result<T, Failure> {
    Err(Failure(kind, msg.into()))
}

fn io_failure(what: &str, e: &io::Error) -> Failure {
    let kind = if e.kind() == io::ErrorKind::NotFound {
        ErrorKind::NotFound
    } else {
        ErrorKind::Io
    };
    Failure(kind, format!("{what}: {e}"))
}

/// Writes one frame.
pub fn frame(out: &mut impl Write, kind: Kind, payload: &[u8]) -> io::Result<()> {
    let len = u32::try_from(payload.len()).map_err(|_| io::Error::other("frame too long"))?;
    out.write_all(&encode_header(kind, len))?;
    out.write_all(payload)
}

fn message(out: &mut impl Write, kind: Kind, r: &Reply) -> io::Result<()> {
    let j = serde_json::to_vec(r).map_err(io::Error::other)?;
    frame(out, kind, &j)
}

/// Answers `req` on `out`: the sync marker, then the reply (and data).
pub fn answer(disks: &[Disk], req: &Request, out: &mut impl Write) -> io::Result<()> {
    out.write_all(&sync_marker(req.id))?;
    let path = match &req.op {
        Op::List { path } | Op::Read { path } => path,
    };
    let target = match locate(disks, path) {
        Ok(t) => t,
        Err(Failure(kind, message)) => {
            return self::message(out, Kind::Message, &Reply::Error { kind, message });
        }
    };
    let r = match (&req.op, target) {
        (Op::List { .. }, Target::Root) => Ok(Reply::Listing {
            entries: disks.iter().map(disk_entry).collect(),
            truncated: false,
        }),
        (Op::List { .. }, Target::Disk(d)) => Ok(Reply::Listing {
            entries: d.volumes.iter().map(volume_entry).collect(),
            truncated: false,
        }),
        (Op::List { .. }, Target::Path(p)) => list(&p),
        (Op::Read { .. }, Target::Root | Target::Disk(_)) => fail(
            ErrorKind::WrongKind,
            "a disk is restored whole by `ferry backup restore`; name a folder or file inside one of its volumes",
        ),
        (Op::Read { .. }, Target::Path(p)) => return read(&p, out),
    };
    match r {
        Ok(r) => message(out, Kind::Message, &r),
        Err(Failure(kind, message)) => {
            self::message(out, Kind::Message, &Reply::Error { kind, message })
        }
    }
}

enum Target<'a> {
    Root,
    Disk(&'a Disk),
    Path(PathBuf),
}

/// What `path` names: the root, a disk, or a path inside a mounted volume whose every
/// step before the last is a real folder (no link).
fn locate<'a>(disks: &'a [Disk], path: &str) -> Result<Target<'a>, Failure> {
    let c = components(path).map_err(|e| Failure(ErrorKind::Invalid, e.to_string()))?;
    let Some((first, rest)) = c.split_first() else {
        return Ok(Target::Root);
    };
    let Some(d) = disks.iter().find(|d| d.name == *first) else {
        return fail(
            ErrorKind::NotFound,
            format!("the backup has no disk {first}"),
        );
    };
    let Some((vol, inner)) = rest.split_first() else {
        return Ok(Target::Disk(d));
    };
    let Some(v) = d.volumes.iter().find(|v| v.name == *vol) else {
        return fail(
            ErrorKind::NotFound,
            format!("disk {} has no volume {vol}", d.name),
        );
    };
    let root = match &v.mount {
        Ok(m) => m.clone(),
        Err(why) => {
            return fail(
                ErrorKind::Unreadable,
                format!("{}/{vol} cannot be read: {why}", d.name),
            )
        }
    };
    let mut p = root;
    for (i, step) in inner.iter().enumerate() {
        p.push(step);
        if i + 1 == inner.len() {
            break;
        }
        let m = std::fs::symlink_metadata(&p).map_err(|e| io_failure(step, &e))?;
        if m.file_type().is_symlink() {
            let to = std::fs::read_link(&p)
                .map(|t| t.to_string_lossy().into_owned())
                .unwrap_or_default();
            return fail(
                ErrorKind::WrongKind,
                format!("{step} is a link (to {to}); links are not followed, name its target"),
            );
        }
        if !m.is_dir() {
            return fail(ErrorKind::WrongKind, format!("{step} is not a folder"));
        }
    }
    Ok(Target::Path(p))
}

fn disk_entry(d: &Disk) -> Entry {
    Entry {
        name: d.name.clone(),
        utf8: true,
        kind: EntryKind::Disk,
        size: d.size,
        mtime: 0,
        mode: 0,
        target: None,
        fs: None,
        error: None,
    }
}

fn volume_entry(v: &Volume) -> Entry {
    Entry {
        name: v.name.clone(),
        utf8: true,
        kind: EntryKind::Volume,
        size: v.size,
        mtime: 0,
        mode: 0,
        target: None,
        fs: v.fs.clone(),
        error: v.mount.as_ref().err().cloned(),
    }
}

/// The entry of `p` (never following it).
pub fn entry(name: &std::ffi::OsStr, p: &Path) -> io::Result<Entry> {
    let m = std::fs::symlink_metadata(p)?;
    let ft = m.file_type();
    let (kind, target) = if ft.is_symlink() {
        let t = std::fs::read_link(p)?;
        (EntryKind::Symlink, Some(t.to_string_lossy().into_owned()))
    } else if ft.is_dir() {
        (EntryKind::Dir, None)
    } else if ft.is_file() {
        (EntryKind::File, None)
    } else {
        (EntryKind::Other, None)
    };
    let utf8 = std::str::from_utf8(name.as_bytes()).is_ok();
    Ok(Entry {
        name: name.to_string_lossy().into_owned(),
        utf8,
        kind,
        size: if ft.is_file() { m.len() } else { 0 },
        mtime: m.mtime(),
        mode: m.mode() & 0o7777,
        target,
        fs: None,
        error: None,
    })
}

fn list(p: &Path) -> Result<Reply, Failure> {
    let m = std::fs::symlink_metadata(p).map_err(|e| io_failure(&show(p), &e))?;
    if !m.is_dir() {
        return fail(ErrorKind::WrongKind, format!("{} is not a folder", show(p)));
    }
    let mut entries = Vec::new();
    let mut truncated = false;
    for e in std::fs::read_dir(p).map_err(|e| io_failure(&show(p), &e))? {
        let e = e.map_err(|e| io_failure(&show(p), &e))?;
        if entries.len() == MAX_ENTRIES {
            truncated = true;
            break;
        }
        // An entry the filesystem cannot describe is left out, not the folder.
        if let Ok(x) = entry(&e.file_name(), &e.path()) {
            entries.push(x);
        }
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Reply::Listing { entries, truncated })
}

fn show(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "/".into())
}

/// Data frames out of writes, [`MAX_DATA`] at most each.
pub struct Frames<'a, W: Write> {
    out: &'a mut W,
    buf: Vec<u8>,
}

impl<'a, W: Write> Frames<'a, W> {
    pub fn new(out: &'a mut W) -> Self {
        Frames {
            out,
            buf: Vec::with_capacity(MAX_DATA as usize),
        }
    }

    fn emit(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            frame(self.out, Kind::Data, &self.buf)?;
            self.buf.clear();
        }
        Ok(())
    }

    /// The rest of the data, then the end frame.
    pub fn finish(mut self) -> io::Result<()> {
        self.emit()?;
        frame(self.out, Kind::End, &[])
    }
}

impl<W: Write> Write for Frames<'_, W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = MAX_DATA as usize - self.buf.len();
        let n = data.len().min(room);
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == MAX_DATA as usize {
            self.emit()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.emit()?;
        self.out.flush()
    }
}

/// Where the answer's writer failed: the daemon went away (the answer ends), or the
/// guest's filesystem did (a failed frame says so).
enum Broke {
    Out(io::Error),
    In(String),
}

fn read(p: &Path, out: &mut impl Write) -> io::Result<()> {
    if std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir()) {
        return tar(p, out);
    }
    let opened = std::fs::symlink_metadata(p).and_then(|m| {
        if m.is_file() {
            std::fs::File::open(p).map(|f| Some((f, m.len())))
        } else {
            Ok(None)
        }
    });
    let (mut f, size) = match opened {
        Ok(Some(x)) => x,
        Ok(None) => {
            let message = format!("{} is neither a folder nor a regular file", show(p));
            return message_err(out, ErrorKind::WrongKind, message);
        }
        Err(e) => {
            let Failure(kind, message) = io_failure(&show(p), &e);
            return message_err(out, kind, message);
        }
    };
    message(
        out,
        Kind::Message,
        &Reply::Data {
            size: Some(size),
            archive: false,
        },
    )?;
    let mut w = Frames::new(out);
    let mut buf = vec![0u8; MAX_DATA as usize];
    let r = loop {
        match f.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                if let Err(e) = w.write_all(&buf[..n]) {
                    break Err(Broke::Out(e));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(Broke::In(format!("reading {}: {e}", show(p)))),
        }
    };
    end(w, r)
}

fn message_err(out: &mut impl Write, kind: ErrorKind, message: String) -> io::Result<()> {
    self::message(out, Kind::Message, &Reply::Error { kind, message })
}

/// Ends data: the end frame, or a failed frame saying why.
fn end<W: Write>(mut w: Frames<'_, W>, r: Result<(), Broke>) -> io::Result<()> {
    match r {
        Ok(()) => w.finish(),
        Err(Broke::Out(e)) => Err(e),
        Err(Broke::In(message)) => {
            w.emit()?;
            self::message(
                w.out,
                Kind::Failed,
                &Reply::Error {
                    kind: ErrorKind::Io,
                    message,
                },
            )
        }
    }
}

fn tar(p: &Path, out: &mut impl Write) -> io::Result<()> {
    let m = match std::fs::symlink_metadata(p) {
        Ok(m) => m,
        Err(e) => {
            let Failure(kind, message) = io_failure(&show(p), &e);
            return message_err(out, kind, message);
        }
    };
    message(
        out,
        Kind::Message,
        &Reply::Data {
            size: None,
            archive: true,
        },
    )?;
    let name = p
        .file_name()
        .map(PathBuf::from)
        .unwrap_or_else(|| ".".into());
    let mut w = Frames::new(out);
    let r = {
        let mut b = tar::Builder::new(&mut w);
        b.follow_symlinks(false);
        let mut seen = HashSet::new();
        let r = walk(&mut b, p, &name, &m, 0, &mut seen);
        match r {
            Ok(()) => b.finish().map_err(Broke::Out),
            Err(e) => Err(e),
        }
    };
    end(w, r)
}

/// Appends `p` (as `name`) and, for a folder, what it holds.
fn walk<W: Write>(
    b: &mut tar::Builder<W>,
    p: &Path,
    name: &Path,
    m: &std::fs::Metadata,
    depth: usize,
    seen: &mut HashSet<(u64, u64)>,
) -> Result<(), Broke> {
    // Errors writing the archive are the daemon's side; errors reading are the guest's
    // filesystem's (the tar crate says which only by where it failed: reads happen in
    // append_path_with_name, a broken output makes every later call fail too, which
    // the outer finish then reports).
    if m.is_dir() {
        if depth > MAX_DEPTH || !seen.insert((m.dev(), m.ino())) {
            return Ok(());
        }
        b.append_path_with_name(p, name)
            .map_err(|e| Broke::In(format!("{}: {e}", name.display())))?;
        let mut kids: Vec<_> = match std::fs::read_dir(p) {
            Ok(rd) => rd.flatten().collect(),
            Err(e) => return Err(Broke::In(format!("{}: {e}", name.display()))),
        };
        kids.sort_by_key(|e| e.file_name());
        for k in kids {
            let kp = k.path();
            let Ok(km) = std::fs::symlink_metadata(&kp) else {
                continue;
            };
            walk(b, &kp, &name.join(k.file_name()), &km, depth + 1, seen)?;
        }
        Ok(())
    } else {
        b.append_path_with_name(p, name)
            .map_err(|e| Broke::In(format!("{}: {e}", name.display())))
    }
}

/// For tests and the daemon's fakes: the frames of one answer, parsed.
pub fn parse_answer(mut bytes: &[u8], id: u64) -> Result<(Reply, Vec<u8>, bool), String> {
    let m = sync_marker(id);
    let at = bytes
        .windows(m.len())
        .position(|w| w == m)
        .ok_or("no sync marker")?;
    bytes = &bytes[at + m.len()..];
    let mut next = || -> Result<(Kind, Vec<u8>), String> {
        if bytes.len() < proto::HEADER {
            return Err("short frame".into());
        }
        let mut h = [0u8; proto::HEADER];
        h.copy_from_slice(&bytes[..proto::HEADER]);
        let (k, len) = proto::decode_header(h).map_err(|e| e.to_string())?;
        let len = len as usize;
        let body = bytes
            .get(proto::HEADER..proto::HEADER + len)
            .ok_or("short body")?
            .to_vec();
        bytes = &bytes[proto::HEADER + len..];
        Ok((k, body))
    };
    let (k, body) = next()?;
    if k != Kind::Message {
        return Err(format!("{k:?} first"));
    }
    let reply: Reply = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    let mut data = Vec::new();
    let mut complete = true;
    if matches!(reply, Reply::Data { .. }) {
        loop {
            match next()? {
                (Kind::Data, b) => data.extend(b),
                (Kind::End, _) => break,
                (Kind::Failed, _) => {
                    complete = false;
                    break;
                }
                (k, _) => return Err(format!("{k:?} in data")),
            }
        }
    }
    Ok((reply, data, complete))
}

#[cfg(test)]
mod tests;
