//! File-level restore (`ferry backup files ID [PATH]`, Proxmox's single-file restore):
//! a helper VM per backup browsed — the test guest's kernel and initramfs with
//! `ferry-file-restore` as its init ([`AgentConfig::file_restore_image`]) — attaches
//! the backup's disks read-only from this daemon's NBD server (the same read-only
//! exports live-restore serves) and answers listings and reads on a virtio-serial
//! port. The guest's filesystems are parsed by the helper's kernel, never by the
//! host's; what the helper sends is checked here like anything a guest writes (frame
//! sizes, the answer's sync marker, a download's length bounded by the backup's size).
//!
//! A helper runs as a QEMU user of its own (below the VMs' uid range), under QEMU's
//! sandbox, without network. It stays up [`IDLE`] after its last use (browsing is
//! several requests); at most [`MAX_HELPERS`] run at once (the least recently used
//! one is stopped for a new one). The daemon's restart stops the helpers an earlier
//! run left.
//!
//! [`AgentConfig::file_restore_image`]: crate::AgentConfig::file_restore_image

use crate::backup::blocking;
use crate::error::{AgentError, Refusal, Result};
use crate::live_restore::{backup_exports, serve_nbd};
use crate::Host;
use ferry_backup::store::image::DiskImage;
use ferry_filerestore::proto::{self, Kind, Op, Reply, Request};
use ferry_qemu::{HelperPlan, RunAs, RunPaths};
use ferry_types::{BackupFileEntry, BackupFileKind, BackupFiles};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Helper VMs running at once on a host.
pub const MAX_HELPERS: usize = 4;
/// How long a helper stays after its last use.
pub const IDLE: Duration = Duration::from_secs(600);
/// How long a helper may take to boot and mount (TCG is slow).
const BOOT: Duration = Duration::from_secs(180);
/// How long one answer (or the next frame of a download) may take.
const ANSWER: Duration = Duration::from_secs(120);
/// Bytes skipped looking for an answer's sync marker before giving up (more than
/// the virtio queue and the chardev hold of an answer nobody read).
const SKIP_MAX: u64 = 8 << 20;
/// How long a request waits for another one on the same helper.
const LOCK_WAIT: Duration = Duration::from_secs(10);
/// How long a download waits for the helper's next frame.
const NEXT_FRAME: Duration = Duration::from_secs(30);
/// How long a download waits for its client to take the next piece.
const SEND_WAIT: Duration = Duration::from_secs(60);
/// A helper's console log is emptied beyond this.
const CONSOLE_MAX: u64 = 1 << 20;
const MEMORY_MIB: u32 = 256;

/// The helpers of this host.
#[derive(Default)]
pub struct FileRestores {
    helpers: HashMap<String, Arc<Helper>>,
}

/// One running helper VM.
pub(crate) struct Helper {
    backup: String,
    slot: usize,
    pid: i32,
    run: RunPaths,
    port: PathBuf,
    /// The connection to the helper's port: one request at a time.
    conn: Arc<tokio::sync::Mutex<Option<Conn>>>,
    used: std::sync::Mutex<Instant>,
    nbd: tokio::task::JoinHandle<()>,
    /// The most a download may carry: twice the backup's disks (tar headers), plus 1 GiB.
    limit: u64,
}

impl Helper {
    fn touch(&self) {
        *self
            .used
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Instant::now();
    }
    fn idle(&self) -> Duration {
        self.used
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .elapsed()
    }
}

/// A download from a backup: a file's bytes, or a folder as a tar archive.
pub struct FileDownload {
    /// A name for the download (the file's, or the folder's with `.tar`).
    pub name: String,
    pub archive: bool,
    /// A file's length.
    pub size: Option<u64>,
    /// The bytes; an error ends it (the helper could not read on, or went away).
    pub body: tokio::sync::mpsc::Receiver<std::io::Result<Vec<u8>>>,
}

/// Who helper `slot`'s QEMU runs as: a uid just below the VMs' range.
fn helper_identity(slot: usize) -> Result<RunAs> {
    let vm = crate::confine::identity(0)?;
    let below = u32::try_from(slot + 1).unwrap_or(u32::MAX);
    Ok(RunAs {
        uid: crate::confine::UID_BASE.saturating_sub(below),
        ..vm
    })
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> AgentError {
    move |source| AgentError::Io { what, source }
}

fn broken(what: impl std::fmt::Display) -> AgentError {
    AgentError::failed(
        crate::error::Failure::Backup,
        format!("The file-restore helper VM: {what}"),
    )
}

fn kind(k: proto::EntryKind) -> BackupFileKind {
    use proto::EntryKind as E;
    match k {
        E::Disk => BackupFileKind::Disk,
        E::Volume => BackupFileKind::Volume,
        E::Dir => BackupFileKind::Dir,
        E::File => BackupFileKind::File,
        E::Symlink => BackupFileKind::Symlink,
        E::Other => BackupFileKind::Other,
    }
}

/// An entry as the API passes it on (names and targets at most [`MAX_NAME`] bytes, a
/// volume's filesystem and error tamed: the helper is no more trusted than the guest).
fn entry(e: proto::Entry) -> BackupFileEntry {
    BackupFileEntry {
        name: cap(e.name),
        utf8: e.utf8,
        kind: kind(e.kind),
        size: e.size,
        mtime: e.mtime,
        mode: e.mode & 0o7777,
        target: e.target.map(cap),
        fs: e.fs.as_deref().map(tame),
        error: e.error.as_deref().map(tame),
    }
}

/// What a failed request means to the caller.
fn refusal(kind: proto::ErrorKind, message: String) -> AgentError {
    use proto::ErrorKind as E;
    match kind {
        E::NotFound => AgentError::NotFound(message),
        E::Invalid => AgentError::invalid("path", message),
        E::WrongKind | E::Unreadable => AgentError::refused(Refusal::Unsupported, message),
        E::Io => broken(message),
    }
}

/// The connection to a helper's port, with what was read and not used yet.
pub(crate) struct Conn {
    s: UnixStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn more(&mut self) -> Result<()> {
        let mut tmp = [0u8; 64 << 10];
        let n = self.s.read(&mut tmp).await.map_err(broken)?;
        if n == 0 {
            return Err(broken("it closed its port"));
        }
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(())
    }

    async fn exact(&mut self, n: usize) -> Result<Vec<u8>> {
        while self.buf.len() < n {
            self.more().await?;
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// One frame (checked against the protocol's limits before its body is read).
    async fn frame(&mut self) -> Result<(Kind, Vec<u8>)> {
        let h = self.exact(proto::HEADER).await?;
        let mut hh = [0u8; proto::HEADER];
        hh.copy_from_slice(&h);
        let (k, len) = proto::decode_header(hh).map_err(broken)?;
        Ok((k, self.exact(len as usize).await?))
    }

    /// Skips to the sync marker of request `id` (what came before: the tail of an
    /// answer nobody read, or a hostile helper's noise, at most [`SKIP_MAX`]).
    async fn sync(&mut self, id: u64) -> Result<()> {
        let marker = proto::sync_marker(id);
        let mut skipped = 0u64;
        loop {
            if let Some(p) = self.buf.windows(marker.len()).position(|w| w == marker) {
                self.buf.drain(..p + marker.len());
                return Ok(());
            }
            // a marker may be split between reads: its start stays
            let drop = self.buf.len().saturating_sub(marker.len() - 1);
            self.buf.drain(..drop);
            skipped += drop as u64;
            if skipped > SKIP_MAX {
                return Err(broken("no answer in what it sent"));
            }
            self.more().await?;
        }
    }

    /// Sends `op` and reads the reply message (data frames, if any, follow).
    async fn ask(&mut self, op: Op) -> Result<Reply> {
        let id: u64 = rand::random();
        let j = serde_json::to_vec(&Request { id, op }).map_err(broken)?;
        let len = u32::try_from(j.len()).map_err(broken)?;
        let mut frame = proto::encode_header(Kind::Message, len).to_vec();
        frame.extend(j);
        self.s.write_all(&frame).await.map_err(broken)?;
        self.sync(id).await?;
        match self.frame().await? {
            (Kind::Message, body) => serde_json::from_slice(&body).map_err(broken),
            (k, _) => Err(broken(format!("a {k:?} frame instead of an answer"))),
        }
    }
}

/// A helper's text as the daemon passes it on: at most 1 KiB, no control characters.
fn tame(s: &str) -> String {
    let mut t: String = s.chars().filter(|c| !c.is_control()).take(1024).collect();
    if t.len() < s.len() && s.chars().filter(|c| !c.is_control()).count() > 1024 {
        t.push('…');
    }
    t
}

/// The longest name or link target passed on.
const MAX_NAME: usize = 4096;

fn cap(mut s: String) -> String {
    if s.len() > MAX_NAME {
        let mut at = MAX_NAME;
        while !s.is_char_boundary(at) {
            at -= 1;
        }
        s.truncate(at);
    }
    s
}

impl Host {
    fn file_restores(&self) -> std::sync::MutexGuard<'_, FileRestores> {
        self.inner
            .file_restores
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn file_restore_dir(&self) -> PathBuf {
        self.inner.cfg.run_dir.join("file-restore")
    }

    /// Helper `h`'s connection for one exchange: taken out of the helper while it
    /// lasts (a request dropped half-way drops it, and the helper sees the hang-up);
    /// waits [`LOCK_WAIT`] for another request to end, then refuses.
    async fn take_conn(
        &self,
        h: &Arc<Helper>,
    ) -> Result<(tokio::sync::OwnedMutexGuard<Option<Conn>>, Conn)> {
        let mut guard = tokio::time::timeout(LOCK_WAIT, Arc::clone(&h.conn).lock_owned())
            .await
            .map_err(|_| {
                AgentError::refused(
                    Refusal::Busy,
                    format!(
                        "The file-restore helper of backup {} is busy with another request (a download); try again",
                        h.backup
                    ),
                )
            })?;
        h.touch();
        let c = match guard.take() {
            Some(c) => c,
            None => {
                let s = UnixStream::connect(&h.port)
                    .await
                    .map_err(io(format!("Connect to {}", h.port.display())))?;
                if !self.inner.os.served_by(&s, h.pid) {
                    return Err(broken("its port is not its QEMU's"));
                }
                Conn { s, buf: vec![] }
            }
        };
        Ok((guard, c))
    }

    /// A folder of backup `id` (`/`: its disks; `/disk0`: a disk's volumes).
    pub async fn backup_files(&self, id: &str, path: &str) -> Result<BackupFiles> {
        let path =
            proto::normalize(path).map_err(|e| AgentError::invalid("path", e.to_string()))?;
        let h = self.helper(id).await?;
        let (mut guard, mut c) = self.take_conn(&h).await?;
        let r = tokio::time::timeout(ANSWER, c.ask(Op::List { path: path.clone() }))
            .await
            .unwrap_or_else(|_| Err(broken("no answer in time")))?;
        h.touch();
        match r {
            Reply::Listing { entries, truncated } => {
                *guard = Some(c);
                let more = entries.len() > proto::MAX_ENTRIES;
                Ok(BackupFiles {
                    backup: id.to_string(),
                    path,
                    entries: entries
                        .into_iter()
                        .take(proto::MAX_ENTRIES)
                        .map(entry)
                        .collect(),
                    truncated: truncated || more,
                })
            }
            Reply::Error { kind, message } => {
                *guard = Some(c);
                Err(refusal(kind, tame(&message)))
            }
            other => Err(broken(format!(
                "answered a listing with {}",
                tame(&format!("{other:?}"))
            ))),
        }
    }

    /// A file of backup `id` (its bytes), or a folder (a tar archive), streamed.
    pub async fn backup_file_download(&self, id: &str, path: &str) -> Result<FileDownload> {
        let path =
            proto::normalize(path).map_err(|e| AgentError::invalid("path", e.to_string()))?;
        let h = self.helper(id).await?;
        let (mut guard, mut c) = self.take_conn(&h).await?;
        let r = tokio::time::timeout(ANSWER, c.ask(Op::Read { path: path.clone() }))
            .await
            .unwrap_or_else(|_| Err(broken("no answer in time")))?;
        h.touch();
        let (size, archive) = match r {
            Reply::Data { size, archive } => (size, archive),
            Reply::Error { kind, message } => {
                *guard = Some(c);
                return Err(refusal(kind, tame(&message)));
            }
            other => {
                return Err(broken(format!(
                    "answered a read with {}",
                    tame(&format!("{other:?}"))
                )))
            }
        };
        let base = path
            .rsplit('/')
            .find(|s| !s.is_empty())
            .unwrap_or("backup")
            .to_string();
        let name = if archive { format!("{base}.tar") } else { base };
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let limit = size.map(|s| s.min(h.limit)).unwrap_or(h.limit);
        let helper = Arc::clone(&h);
        tokio::spawn(async move {
            let mut sent = 0u64;
            let end: std::result::Result<(), String> = loop {
                let f = match tokio::time::timeout(NEXT_FRAME, c.frame()).await {
                    Ok(Ok(f)) => f,
                    Ok(Err(e)) => break Err(e.to_string()),
                    Err(_) => break Err("the helper stopped sending".into()),
                };
                match f {
                    (Kind::Data, b) => {
                        sent += b.len() as u64;
                        if sent > limit {
                            break Err(format!("it sent more than {limit} bytes"));
                        }
                        match tokio::time::timeout(SEND_WAIT, tx.send(Ok(b))).await {
                            Ok(Ok(())) => helper.touch(),
                            // the client went away, or reads nothing: the connection
                            // goes (the helper sees the hang-up and stops)
                            Ok(Err(_)) => break Err(String::new()),
                            Err(_) => break Err("the client stopped reading".into()),
                        }
                    }
                    (Kind::End, _) if size.is_some_and(|n| n != sent) => {
                        break Err(format!(
                            "it ended the file after {sent} bytes, not {size:?}"
                        ));
                    }
                    (Kind::End, _) => {
                        *guard = Some(c);
                        return;
                    }
                    (Kind::Failed, b) => {
                        let why = serde_json::from_slice::<Reply>(&b)
                            .ok()
                            .and_then(|r| match r {
                                Reply::Error { message, .. } => Some(tame(&message)),
                                _ => None,
                            })
                            .unwrap_or_else(|| "the helper could not read on".into());
                        // the answer ended in order: the connection stays
                        *guard = Some(c);
                        let _ = tx.send(Err(std::io::Error::other(why))).await;
                        return;
                    }
                    (k, _) => break Err(format!("a {k:?} frame in a download")),
                }
            };
            // the connection is dropped with `c`
            drop(guard);
            if let Err(why) = end {
                if !why.is_empty() {
                    tracing::warn!(backup = %helper.backup, %why, "file-restore download");
                    let _ =
                        tokio::time::timeout(SEND_WAIT, tx.send(Err(std::io::Error::other(why))))
                            .await;
                }
            }
        });
        Ok(FileDownload {
            name,
            archive,
            size,
            body: rx,
        })
    }

    /// The helper of backup `id`, started when none runs. The start runs in a task of
    /// its own: a request that goes away meanwhile leaves no QEMU nobody knows.
    async fn helper(&self, id: &str) -> Result<Arc<Helper>> {
        if let Some(h) = self.live_helper(id) {
            return Ok(h);
        }
        let this = self.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            let _one = this.inner.file_restore_start.lock().await;
            if let Some(h) = this.live_helper(&id) {
                return Ok(h);
            }
            if this.file_restores().helpers.len() >= MAX_HELPERS {
                // room: the least recently used helper that serves nobody now goes
                let idle = {
                    let fr = this.file_restores();
                    fr.helpers
                        .values()
                        .filter(|h| h.conn.try_lock().is_ok())
                        .max_by_key(|h| h.idle())
                        .map(|h| h.backup.clone())
                };
                match idle {
                    Some(o) => this.stop_locked(&o).await,
                    None => {
                        return Err(AgentError::refused(
                            Refusal::Busy,
                            format!("All {MAX_HELPERS} file-restore helpers are serving requests; try again"),
                        ))
                    }
                }
            }
            let used: Vec<usize> = this
                .file_restores()
                .helpers
                .values()
                .map(|h| h.slot)
                .collect();
            let slot = (0..MAX_HELPERS)
                .find(|s| !used.contains(s))
                .ok_or_else(|| {
                    AgentError::refused(Refusal::Busy, "Every file-restore helper is in use")
                })?;
            let h = this.start_helper(&id, slot).await?;
            this.file_restores()
                .helpers
                .insert(id.to_string(), Arc::clone(&h));
            Ok(h)
        })
        .await
        .map_err(|e| broken(format!("its start failed: {e}")))?
    }

    /// The running helper of backup `id` (a dead one is forgotten).
    fn live_helper(&self, id: &str) -> Option<Arc<Helper>> {
        let mut fr = self.file_restores();
        let h = fr.helpers.get(id)?;
        if self.inner.os.qemu_alive(h.pid, &h.run) {
            return Some(Arc::clone(h));
        }
        let h = fr.helpers.remove(id)?;
        h.nbd.abort();
        let _ = std::fs::remove_dir_all(&h.run.dir);
        None
    }

    async fn start_helper(&self, id: &str, slot: usize) -> Result<Arc<Helper>> {
        let (_, store, backup) = self.find_backup(id).await?;
        let image = &self.inner.cfg.file_restore_image;
        let (kernel, initrd) = (image.join("vmlinux"), image.join("initrd.img"));
        if !kernel.is_file() || !initrd.is_file() {
            return Err(AgentError::refused(
                Refusal::HostLacks,
                format!(
                    "File-level restore needs its helper VM's image: {} lacks vmlinux and initrd.img (scripts/setup.sh builds it; `ferry serve --file-restore-image DIR`)",
                    image.display()
                ),
            ));
        }
        if backup.state != "complete" {
            return Err(AgentError::refused(
                Refusal::Unsupported,
                format!("Backup {id} is {}, not complete", backup.state),
            ));
        }
        if backup.key_fingerprint.is_some() {
            return Err(AgentError::refused(
                Refusal::Unsupported,
                format!("Backup {id} is encrypted; its files cannot be browsed on the host (restore it with its key)"),
            ));
        }
        let names: Vec<String> = backup.disks.iter().map(|d| d.name.clone()).collect();
        let total: u64 = backup.disks.iter().map(|d| d.size).sum();
        let bid = backup.id.clone();
        let images = blocking(move || {
            names
                .iter()
                .map(|n| DiskImage::open(Arc::clone(&store), &bid, n, None).map(Arc::new))
                .collect::<std::result::Result<Vec<_>, _>>()
        })
        .await?;
        let disks = images.len();

        let dir = self.file_restore_dir().join(slot.to_string());
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(io(format!("Create {}", dir.display())))?;
        let who = if self.inner.os.confines() {
            Some(helper_identity(slot)?)
        } else {
            None
        };
        let run = RunPaths::new(&dir);
        run.prepare().map_err(|e| broken(e.to_string()))?;
        let nbd_sock = dir.join("nbd.sock");
        let console = dir.join("console.log");
        std::fs::write(&console, b"").map_err(io(format!("Create {}", console.display())))?;
        let listener = tokio::net::UnixListener::bind(&nbd_sock)
            .map_err(io(format!("Listen on {}", nbd_sock.display())))?;
        if let Some(w) = &who {
            crate::confine::own(&dir, 0, w.gid, 0o710)?;
            crate::confine::own(&run.sockets, w.uid, w.gid, 0o700)?;
            crate::confine::own(&nbd_sock, w.uid, w.gid, 0o600)?;
            crate::confine::own(&console, w.uid, w.gid, 0o600)?;
            let managed = self.managed_dirs().await;
            for p in [&kernel, &initrd, &nbd_sock] {
                crate::confine::reachable(p, w, &managed)?;
            }
        }
        let nbd = serve_nbd(
            listener,
            backup_exports(images),
            format!("file-restore {id}"),
        );
        let port = run.sockets.join("port.sock");
        let plan = HelperPlan {
            name: format!("ferry-file-restore-{slot}"),
            accel: self.inner.accel,
            run: run.clone(),
            kernel,
            initrd,
            memory_mib: MEMORY_MIB,
            nbd: nbd_sock,
            disks,
            port: port.clone(),
            console_log: console.clone(),
        };
        let argv = ferry_qemu::helper_argv(&plan);
        let pid = match self
            .inner
            .os
            .spawn_qemu(
                &self.inner.cfg.qemu_binary,
                &argv,
                &run,
                who.as_ref(),
                ferry_qemu::Launcher::default(),
            )
            .await
        {
            Ok(p) => p,
            Err(e) => {
                nbd.abort();
                return Err(broken(format!("it did not start: {e}")));
            }
        };
        let helper = Helper {
            backup: id.to_string(),
            slot,
            pid,
            run,
            port,
            conn: Default::default(),
            used: std::sync::Mutex::new(Instant::now()),
            nbd,
            limit: total.saturating_mul(2).saturating_add(1 << 30),
        };
        tracing::info!(backup = %id, slot, pid, "file-restore helper started");
        // Ready once it answers (it reads its port after mounting the disks).
        let helper = Arc::new(helper);
        let ready = async {
            let (mut guard, mut c) = self.take_conn(&helper).await?;
            tokio::time::timeout(BOOT, c.ask(Op::List { path: "/".into() }))
                .await
                .unwrap_or_else(|_| Err(broken("it did not answer in time")))?;
            *guard = Some(c);
            Ok::<(), AgentError>(())
        }
        .await;
        if let Err(e) = ready {
            let log = console_tail(&console);
            self.kill_helper(&helper).await;
            return Err(broken(format!("{e}; its console: {}", tame(&log))));
        }
        Ok(helper)
    }

    async fn kill_helper(&self, h: &Helper) {
        h.nbd.abort();
        if let Err(e) = self.inner.os.kill_qemu(h.pid, &h.run).await {
            tracing::warn!(backup = %h.backup, error = %e, "file-restore helper kill");
        }
        let _ = std::fs::remove_dir_all(&h.run.dir);
    }

    /// Stops backup `id`'s helper, if one runs (a deleted or pruned backup's).
    pub async fn stop_helper(&self, id: &str) {
        let _one = self.inner.file_restore_start.lock().await;
        self.stop_locked(id).await;
    }

    /// [`Host::stop_helper`] under the start lock: its slot is free only once its
    /// QEMU is gone and its folder removed.
    async fn stop_locked(&self, id: &str) {
        let h = self.file_restores().helpers.get(id).cloned();
        if let Some(h) = h {
            self.kill_helper(&h).await;
            self.file_restores().helpers.remove(id);
            tracing::info!(backup = %id, "file-restore helper stopped");
        }
    }

    /// Stops helpers idle for [`IDLE`], every 30 s; at the start, the helpers an
    /// earlier run of the daemon left.
    pub(crate) async fn file_restore_loop(self) {
        {
            let _one = self.inner.file_restore_start.lock().await;
            if let Ok(rd) = std::fs::read_dir(self.file_restore_dir()) {
                for e in rd.flatten() {
                    let run = RunPaths::new(e.path());
                    if let Some(pid) = self.inner.os.read_pid(&run) {
                        let _ = self.inner.os.kill_qemu(pid, &run).await;
                    }
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let helpers: Vec<Arc<Helper>> =
                self.file_restores().helpers.values().cloned().collect();
            for h in helpers {
                // what a helper writes on its console is kept to its last MiB or so
                trim_log(&h.run.dir.join("console.log"), CONSOLE_MAX);
                if h.idle() > IDLE && h.conn.try_lock().is_ok() {
                    self.stop_helper(&h.backup).await;
                }
            }
        }
    }
}

/// Empties log `p` (a file a QEMU appends to) once it is larger than `max`; opened
/// without following links.
pub(crate) fn trim_log(p: &Path, max: u64) {
    use std::os::unix::fs::OpenOptionsExt;
    if let Ok(f) = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(p)
    {
        if f.metadata().is_ok_and(|m| m.is_file() && m.len() > max) {
            let _ = f.set_len(0);
        }
    }
}

/// The end of a helper's console log (read without following links; at most 2 KiB).
fn console_tail(p: &Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(mut f) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(p)
    else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(2048)));
    let mut buf = Vec::new();
    let _ = f.take(2048).read_to_end(&mut buf);
    String::from_utf8_lossy(&buf)
        .chars()
        .filter(|c| !c.is_control() || *c == '\n')
        .collect::<String>()
        .trim()
        .to_string()
}
