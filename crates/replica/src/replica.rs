//! A replicated volume on this host: its local copy, its role (secondary, or primary
//! for a term), the NBD export QEMU opens, and the secondary's side of replication.

use crate::conn::Stream;
use crate::conn::{self, ConnError};
use crate::decide::{decide, Decision, Side};
use crate::local::Local;
use crate::nbd::{Backend, Exports};
use crate::primary::{hello_side, Op, Primary};
use crate::wire::{Hello, Msg};
use crate::{Cluster, ReplicaError, Report};
use ferry_types::{GenId, ReplicaStatus, VerifyReport};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::{watch, Notify};

/// How long a write to a copy that is not (yet) primary waits for its promotion: the
/// destination of a live migration runs before the source has handed over.
const PROMOTION_WAIT: Duration = Duration::from_secs(30);

pub struct Replica {
    pub local: Arc<Local>,
    host: String,
    cluster: Arc<dyn Cluster>,
    primary: watch::Sender<Option<Arc<Primary>>>,
    standalone: Arc<AtomicBool>,
    /// The primary currently connected to this secondary: its generation and a way
    /// to end that connection.
    incoming: Mutex<Option<(GenId, Arc<Notify>)>>,
    pub nbd_socket: PathBuf,
}

impl Replica {
    pub(crate) fn new(
        local: Local,
        host: &str,
        cluster: Arc<dyn Cluster>,
        nbd_socket: PathBuf,
    ) -> Replica {
        Replica {
            local: Arc::new(local),
            host: host.to_string(),
            cluster,
            primary: watch::channel(None).0,
            standalone: Arc::new(AtomicBool::new(false)),
            incoming: Mutex::new(None),
            nbd_socket,
        }
    }

    pub fn key(&self) -> &str {
        &self.local.key
    }

    pub fn primary(&self) -> Option<Arc<Primary>> {
        self.primary.borrow().clone()
    }

    pub fn is_primary(&self) -> bool {
        self.primary().is_some()
    }

    /// Becomes primary in generation `gen` (the cluster has agreed: the caller did the
    /// compare-and-swap on the volume's record). Drops the connection from an old
    /// primary.
    pub fn promote(
        &self,
        gen: GenId,
        peers: &[String],
        outdated: &BTreeSet<String>,
        force: bool,
    ) -> Result<(), ReplicaError> {
        if self.is_primary() {
            return Err(ReplicaError::Role(format!(
                "{} is already primary of {}",
                self.host,
                self.key()
            )));
        }
        let meta = self.local.meta();
        if !force && !meta.uptodate {
            return Err(ReplicaError::Role(format!(
                "the copy of {} on {} is not up to date (a resync did not finish)",
                self.key(),
                self.host
            )));
        }
        if meta.history.is_empty() && !force {
            return Err(ReplicaError::Role(format!(
                "the copy of {} on {} is new and was never synced",
                self.key(),
                self.host
            )));
        }
        if let Some((_, stop)) = self.incoming.lock().expect("incoming").take() {
            stop.notify_waiters();
        }
        let p = Primary::start(
            self.local.clone(),
            &self.host,
            gen,
            peers,
            outdated,
            self.cluster.clone(),
            self.standalone.clone(),
        )
        .map_err(|e| ReplicaError::io(format!("start the term of {}", self.key()), e))?;
        self.primary.send_replace(Some(p));
        Ok(())
    }

    /// Ends this host's term as primary (no-op on a secondary).
    pub async fn demote(&self) {
        let p = self.primary.send_replace(None);
        if let Some(p) = p {
            p.demote().await;
        }
    }

    pub fn set_standalone(&self, on: bool) {
        self.standalone.store(on, Ordering::SeqCst);
        if on {
            if let Some(p) = self.primary() {
                p.drop_connections();
            }
            if let Some((_, stop)) = self.incoming.lock().expect("incoming").take() {
                stop.notify_waiters();
            }
        }
    }

    pub fn is_standalone(&self) -> bool {
        self.standalone.load(Ordering::SeqCst)
    }

    pub fn status(&self) -> ReplicaStatus {
        let meta = self.local.meta();
        let p = self.primary();
        ReplicaStatus {
            host: self.host.clone(),
            primary: p.is_some(),
            generation: meta.history.last().cloned(),
            history: meta.history.clone(),
            uptodate: meta.uptodate,
            active_extents: self.local.al_count(),
            peers: p.map(|p| p.peer_status()).unwrap_or_default(),
            nbd_socket: self.nbd_socket.display().to_string(),
            allocated_bytes: self.local.allocated_bytes(),
        }
    }

    pub async fn verify(&self, chunk: u64) -> Result<Vec<VerifyReport>, ReplicaError> {
        let p = self.primary().ok_or_else(|| {
            ReplicaError::Role(format!("{} is not primary of {}", self.host, self.key()))
        })?;
        Ok(p.verify(chunk).await)
    }

    async fn wait_primary(&self) -> std::io::Result<Arc<Primary>> {
        let mut rx = self.primary.subscribe();
        let r = tokio::time::timeout(PROMOTION_WAIT, async {
            loop {
                if let Some(p) = rx.borrow_and_update().clone() {
                    if !p.is_stopped() {
                        return Some(p);
                    }
                }
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        })
        .await;
        match r {
            Ok(Some(p)) => Ok(p),
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!("{} is not primary of {}", self.host, self.key()),
            )),
        }
    }

    /// The secondary's side of a connection from a primary whose Hello is `ph`.
    pub(crate) async fn accept(self: Arc<Self>, ph: Hello, mut stream: Stream) {
        let refuse = |reason: String| Msg::Goodbye { reason };
        if self.is_standalone() {
            let m = refuse(format!(
                "replication of {} is switched off on {}",
                self.key(),
                self.host
            ));
            let _ = conn::write_msg(&mut stream, &m).await;
            return;
        }
        if !ph.primary {
            let _ =
                conn::write_msg(&mut stream, &refuse("only a primary may connect".into())).await;
            return;
        }
        let Some(pc) = ph.history.last().cloned() else {
            let _ = conn::write_msg(
                &mut stream,
                &refuse("a primary without a generation".into()),
            )
            .await;
            return;
        };
        let meta = self.local.meta();
        let (base, words) = self.local.bitmap_info(&ph.host);
        let mine = Hello {
            volume: self.key().to_string(),
            host: self.host.clone(),
            primary: false,
            size: self.local.size(),
            history: meta.history.clone(),
            uptodate: meta.uptodate,
            sync_source: meta.sync_source.clone(),
            bitmap_base: base,
            bitmap: words,
            active: self.local.al_words(),
        };
        let mine = Hello {
            primary: self.is_primary(),
            ..mine
        };
        if conn::write_msg(&mut stream, &Msg::Hello(mine.clone()))
            .await
            .is_err()
        {
            return;
        }
        if mine.primary {
            // The other side decides whether it is the stale one from our Hello.
            let m = refuse(format!("{} is primary of {} itself", self.host, self.key()));
            let _ = conn::write_msg(&mut stream, &m).await;
            return;
        }
        let my_side = Side {
            // only bits written as primary of the current generation count
            bitmap_dirty: meta.history.last().is_some_and(|g| g.host == self.host)
                && mine.bitmap.iter().any(|w| *w != 0),
            ..hello_side(&mine)
        };
        match decide(&hello_side(&ph), &my_side) {
            Decision::SplitBrain(reason) => {
                self.cluster.report(
                    self.key(),
                    Report::SplitBrain {
                        peer: ph.host.clone(),
                        reason,
                    },
                );
                return;
            }
            Decision::StalePrimary(_) => return,
            Decision::Bitmap | Decision::Full(_) => {}
        }
        if ph.size != mine.size {
            return;
        }
        let stop = Arc::new(Notify::new());
        let newer_primary = {
            let mut inc = self.incoming.lock().expect("incoming");
            let newer = inc
                .as_ref()
                .filter(|(g, _)| g.n > pc.n)
                .map(|(g, _)| g.clone());
            match newer {
                Some(g) => Some(g),
                None => {
                    if let Some((_, old)) = inc.take() {
                        old.notify_waiters();
                    }
                    *inc = Some((pc.clone(), stop.clone()));
                    None
                }
            }
        };
        if let Some(g) = newer_primary {
            let m = refuse(format!(
                "{} follows generation {g}, newer than {pc}",
                self.host
            ));
            let _ = conn::write_msg(&mut stream, &m).await;
            return;
        }
        if let Err(e) = self.local.update_meta(|m| {
            m.uptodate = false;
            m.sync_source = Some(pc.clone());
        }) {
            tracing::error!(volume = %self.key(), error = %e, "cannot record the resync");
            return;
        }
        let r = self.clone().follow(ph, pc.clone(), stream, stop).await;
        {
            let mut inc = self.incoming.lock().expect("incoming");
            if inc.as_ref().is_some_and(|(g, _)| *g == pc) {
                *inc = None;
            }
        }
        if let Err(e) = r {
            tracing::info!(volume = %self.key(), error = %e, "connection from the primary ended");
        }
    }

    /// Applies the primary's messages in order as they arrive and answers each; the
    /// answers go out in batches (when no more input is waiting). Small writes go
    /// straight to the page cache; syncs and large writes leave the runtime's thread
    /// first.
    async fn follow(
        self: Arc<Self>,
        ph: Hello,
        pc: GenId,
        stream: Stream,
        stop: Arc<Notify>,
    ) -> Result<(), ConnError> {
        let (rd, wr) = tokio::io::split(stream);
        let mut rd = tokio::io::BufReader::with_capacity(256 << 10, rd);
        let mut wr = tokio::io::BufWriter::with_capacity(64 << 10, wr);
        let history: Arc<[GenId]> = ph.history.into();
        let result = loop {
            let m = tokio::select! {
                m = conn::read_msg(&mut rd) => m,
                _ = stop.notified() => break Ok(()),
            };
            let m = match m {
                Ok(Msg::Goodbye { reason }) => {
                    tracing::info!(volume = %self.key(), %reason, "primary said goodbye");
                    break Ok(());
                }
                Ok(
                    m @ (Msg::Write { .. }
                    | Msg::Zero { .. }
                    | Msg::Flush { .. }
                    | Msg::ResyncDone { .. }
                    | Msg::VerifyReq { .. }),
                ) => m,
                Ok(_) => break Err(ConnError::Unexpected("a message only a secondary sends")),
                Err(e) => break Err(e),
            };
            let small = matches!(&m, Msg::Write { data, fua: false, .. } if data.len() <= 64 << 10);
            let answer = if small {
                self.apply(m, &pc, &history)
            } else {
                // Answers so far go out before the thread waits for a sync or a
                // large write.
                if let Err(e) = wr.flush().await {
                    break Err(e.into());
                }
                let (me, pc, history) = (self.clone(), pc.clone(), history.clone());
                match tokio::task::spawn_blocking(move || me.apply(m, &pc, &history)).await {
                    Ok(a) => a,
                    Err(e) => break Err(ConnError::Io(std::io::Error::other(e))),
                }
            };
            let Some(a) = answer else { break Ok(()) };
            if let Err(e) = wr.write_all(&a.encode()).await {
                break Err(e.into());
            }
            if rd.buffer().is_empty() {
                if let Err(e) = wr.flush().await {
                    break Err(e.into());
                }
            }
        };
        let _ = wr.flush().await;
        let _ = wr.shutdown().await;
        result
    }

    /// Applies one message from the primary; None ends the connection.
    fn apply(&self, m: Msg, gen: &GenId, history: &[GenId]) -> Option<Msg> {
        let nack = |seq, reason: String| Some(Msg::Nack { seq, reason });
        let size = self.local.size();
        let old = |seq, g: &GenId| {
            nack(
                seq,
                format!("generation {g} is not {gen}, the one this copy follows"),
            )
        };
        match m {
            Msg::Write {
                seq,
                gen: g,
                offset,
                fua,
                data,
            } => {
                if &g != gen {
                    return old(seq, &g);
                }
                if offset
                    .checked_add(data.len() as u64)
                    .is_none_or(|e| e > size)
                {
                    return nack(seq, format!("write at {offset} is outside the volume"));
                }
                let r = self
                    .local
                    .al_enter(offset, data.len() as u64, false)
                    .and_then(|_al| self.local.write_blocking(offset, &data, fua));
                Some(match r {
                    Ok(()) => Msg::Ack { seq },
                    Err(e) => Msg::Nack {
                        seq,
                        reason: e.to_string(),
                    },
                })
            }
            Msg::Zero {
                seq,
                gen: g,
                offset,
                len,
                fua,
                ..
            } => {
                if &g != gen {
                    return old(seq, &g);
                }
                if offset.checked_add(len as u64).is_none_or(|e| e > size) {
                    return nack(seq, format!("zero at {offset} is outside the volume"));
                }
                let r = self
                    .local
                    .al_enter(offset, len as u64, false)
                    .and_then(|_al| self.local.zero_blocking(offset, len, fua));
                Some(match r {
                    Ok(()) => Msg::Ack { seq },
                    Err(e) => Msg::Nack {
                        seq,
                        reason: e.to_string(),
                    },
                })
            }
            Msg::Flush { seq, gen: g } => {
                if &g != gen {
                    return old(seq, &g);
                }
                Some(
                    match self
                        .local
                        .sync_blocking()
                        .and_then(|_| self.local.al_save())
                    {
                        Ok(()) => Msg::Ack { seq },
                        Err(e) => Msg::Nack {
                            seq,
                            reason: e.to_string(),
                        },
                    },
                )
            }
            Msg::ResyncDone { seq, gen: g } => {
                if &g != gen {
                    return None;
                }
                let r = self
                    .local
                    .sync_blocking()
                    .and_then(|_| self.local.drop_bitmaps())
                    .and_then(|_| {
                        self.local.update_meta(|m| {
                            m.history = history.to_vec();
                            m.uptodate = true;
                            m.sync_source = None;
                        })
                    });
                match r {
                    Ok(()) => {
                        tracing::info!(volume = %self.key(), generation = %gen, "copy up to date");
                        Some(Msg::Ack { seq })
                    }
                    Err(e) => {
                        tracing::error!(volume = %self.key(), error = %e, "cannot record the copy up to date");
                        None
                    }
                }
            }
            Msg::VerifyReq { seq, offset, len } => {
                if offset.checked_add(len as u64).is_none_or(|e| e > size) || len > (64 << 20) {
                    return nack(seq, "verify range outside the volume".into());
                }
                Some(match self.local.digest_blocking(offset, len) {
                    Ok(digest) => Msg::VerifyResp { seq, digest },
                    Err(e) => Msg::Nack {
                        seq,
                        reason: e.to_string(),
                    },
                })
            }
            _ => None,
        }
    }
}

#[async_trait::async_trait]
impl Backend for Replica {
    fn size(&self) -> u64 {
        self.local.size()
    }

    async fn read(&self, offset: u64, len: u32) -> std::io::Result<Vec<u8>> {
        if !self.is_primary() && !self.local.meta().uptodate {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        self.local.read(offset, len).await
    }

    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> std::io::Result<()> {
        self.wait_primary()
            .await?
            .submit(Op::Write {
                offset,
                data: Arc::new(data),
                fua,
            })
            .await
    }

    async fn flush(&self) -> std::io::Result<()> {
        match self.primary() {
            Some(p) => p.flush().await,
            // nothing was written through a copy that is not primary
            None => self.local.blocking(|l| l.sync_blocking()).await,
        }
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> std::io::Result<()> {
        self.wait_primary()
            .await?
            .submit(Op::Zero {
                offset,
                len,
                trim: true,
                fua,
            })
            .await
    }

    async fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> std::io::Result<()> {
        self.wait_primary()
            .await?
            .submit(Op::Zero {
                offset,
                len,
                trim: false,
                fua,
            })
            .await
    }
}

/// The export of one replica: its key, or the default (empty) name.
pub(crate) struct OneExport(pub Arc<Replica>);

impl Exports for OneExport {
    fn lookup(&self, name: &str) -> Option<Arc<dyn Backend>> {
        (name.is_empty() || name == self.0.key()).then(|| self.0.clone() as Arc<dyn Backend>)
    }
    fn names(&self) -> Vec<String> {
        vec![self.0.key().to_string()]
    }
}
