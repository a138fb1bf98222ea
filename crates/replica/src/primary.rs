//! The primary: every write goes to the local copy and to each connected peer at once
//! and is acknowledged when all of them have it (DRBD's protocol C). A peer that is not
//! connected gets the write's regions in its dirty bitmap, and before that write is
//! acknowledged the cluster records the peer as outdated (writes wait while the cluster
//! cannot be told: the copy that may be promoted later must have every acknowledged
//! write). One task per peer connects, hands over histories, resyncs what the peer
//! lacks in the background and watches the connection.

use crate::conn::{self, Conn};
use crate::decide::{decide, Decision, Side};
use crate::local::{Local, EXTENT, REGION};
use crate::ranges::RangeLock;
use crate::wire::{Frame, Hello, Msg};
use crate::{Cluster, Report};
use ferry_types::{GenId, PeerState, PeerStatus, VerifyReport};
use futures::{StreamExt, TryStreamExt};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

pub(crate) enum Op {
    Write {
        offset: u64,
        data: Arc<Vec<u8>>,
        fua: bool,
    },
    Zero {
        offset: u64,
        len: u32,
        trim: bool,
        fua: bool,
    },
}

impl Op {
    fn range(&self) -> (u64, u64) {
        match self {
            Op::Write { offset, data, .. } => (*offset, data.len() as u64),
            Op::Zero { offset, len, .. } => (*offset, *len as u64),
        }
    }
}

struct LinkState {
    state: PeerState,
    reason: Option<String>,
    conn: Option<Arc<Conn>>,
    done: u64,
    total: u64,
}

pub(crate) struct PeerLink {
    pub host: String,
    st: Mutex<LinkState>,
    /// The cluster knows this peer's copy is outdated (in this term).
    outdated: tokio::sync::Mutex<bool>,
}

impl PeerLink {
    fn sendable(&self) -> Option<Arc<Conn>> {
        let st = self.st.lock().expect("link");
        match st.state {
            PeerState::Syncing | PeerState::UpToDate => st.conn.clone().filter(|c| !c.is_closed()),
            _ => None,
        }
    }

    fn set(&self, state: PeerState, reason: Option<String>) {
        let mut st = self.st.lock().expect("link");
        st.state = state;
        st.reason = reason;
        if !matches!(state, PeerState::Syncing | PeerState::UpToDate) {
            if let Some(c) = st.conn.take() {
                c.close();
            }
        }
    }
}

pub struct Primary {
    pub(crate) local: Arc<Local>,
    host: String,
    pub gen: GenId,
    history: Vec<GenId>,
    pub(crate) peers: Vec<Arc<PeerLink>>,
    ranges: RangeLock,
    /// Held (read) by every write; taken (write) to switch a peer's state or demote.
    term: tokio::sync::RwLock<bool>,
    seq: AtomicU64,
    cluster: Arc<dyn Cluster>,
    standalone: Arc<AtomicBool>,
    stopped: AtomicBool,
}

/// Writes up to this size go to the page cache on the calling task.
const INLINE_WRITE: usize = 64 << 10;

fn shutdown() -> std::io::Error {
    std::io::Error::from_raw_os_error(libc::ESHUTDOWN)
}

impl Primary {
    /// Starts a term as primary in generation `gen`. `outdated` peers keep their bitmap
    /// only if this copy was the last primary (its bitmap then tells all they lack);
    /// the others start a clear bitmap from the generation before `gen`.
    pub(crate) fn start(
        local: Arc<Local>,
        host: &str,
        gen: GenId,
        peers: &[String],
        outdated: &std::collections::BTreeSet<String>,
        cluster: Arc<dyn Cluster>,
        standalone: Arc<AtomicBool>,
    ) -> std::io::Result<Arc<Primary>> {
        let meta = local.meta();
        let prev = meta.history.last().cloned();
        let was_last_primary = prev.as_ref().is_some_and(|g| g.host == host);
        let mut links = vec![];
        for p in peers.iter().filter(|p| *p != host) {
            if outdated.contains(p) {
                if !(was_last_primary && meta.bitmaps.get(p).is_some_and(|b| b.is_some())) {
                    local.reset_bitmap(p, None, true)?;
                }
            } else {
                local.reset_bitmap(p, prev.clone(), false)?;
            }
            links.push(Arc::new(PeerLink {
                host: p.clone(),
                st: Mutex::new(LinkState {
                    state: PeerState::Connecting,
                    reason: None,
                    conn: None,
                    done: 0,
                    total: 0,
                }),
                outdated: tokio::sync::Mutex::new(outdated.contains(p)),
            }));
        }
        let mut history = meta.history.clone();
        history.push(gen.clone());
        local.update_meta(|m| {
            m.history = history.clone();
            m.uptodate = true;
            m.sync_source = None;
        })?;
        let p = Arc::new(Primary {
            local,
            host: host.to_string(),
            gen,
            history,
            peers: links,
            ranges: RangeLock::default(),
            term: tokio::sync::RwLock::new(true),
            seq: AtomicU64::new(1),
            cluster,
            standalone,
            stopped: AtomicBool::new(false),
        });
        for l in &p.peers {
            tokio::spawn(p.clone().run_peer(l.clone()));
        }
        Ok(p)
    }

    fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) async fn submit(&self, op: Op) -> std::io::Result<()> {
        let term = self.term.read().await;
        if !*term {
            return Err(shutdown());
        }
        let (offset, len) = op.range();
        let _r = self.ranges.lock(offset, len).await;
        let _al = loop {
            if let Some(g) = self.local.al_try_enter(offset, len) {
                break g;
            }
            // A new extent (or the log being saved): the save, an fsync, happens off
            // the data path's thread; then the extent is there (a retire needs many
            // idle ticks) and entering succeeds.
            self.local
                .blocking(move |l| l.al_enter(offset, len, true).map(drop))
                .await?;
        };
        let seq = self.next_seq();
        let targets = self.targets();
        let frame = Arc::new(match &op {
            Op::Write { offset, data, fua } => {
                Frame::write(seq, &self.gen, *offset, *fua, data.clone())
            }
            Op::Zero {
                offset,
                len,
                trim,
                fua,
            } => Frame::msg(&Msg::Zero {
                seq,
                gen: self.gen.clone(),
                offset: *offset,
                len: *len,
                trim: *trim,
                fua: *fua,
            }),
        });
        let local_io = async {
            match &op {
                // Small writes into the page cache cost less than a thread hop.
                Op::Write { offset, data, fua } if data.len() <= INLINE_WRITE && !fua => {
                    self.local.write_blocking(*offset, data, false)
                }
                Op::Write { offset, data, fua } => {
                    self.local.write(*offset, data.clone(), *fua).await
                }
                Op::Zero {
                    offset, len, fua, ..
                } => {
                    let (o, l, f) = (*offset, *len, *fua);
                    self.local
                        .blocking(move |loc| loc.zero_blocking(o, l, f))
                        .await
                }
            }
        };
        // The frame is queued to the peers before the local write starts.
        let (missed, local_r) = tokio::join!(self.replicate(seq, frame, targets), local_io);
        local_r?;
        for p in missed {
            // In memory: saved before the activity log retires this extent.
            self.local
                .with_bitmap(&p.host, |b| b.set_bytes(offset, len))?;
            if !self.ensure_outdated(&p).await {
                return Err(std::io::Error::other(format!(
                    "{} missed the write and the cluster could not be told",
                    p.host
                )));
            }
        }
        Ok(())
    }

    /// The peers taking writes now, with their connections.
    fn targets(&self) -> Vec<(Arc<PeerLink>, Arc<Conn>)> {
        self.peers
            .iter()
            .filter_map(|p| p.sendable().map(|c| (p.clone(), c)))
            .collect()
    }

    /// Sends a frame to `calls` (the peers taking writes); returns the peers that do
    /// not have it.
    async fn replicate(
        &self,
        seq: u64,
        frame: Arc<Frame>,
        calls: Vec<(Arc<PeerLink>, Arc<Conn>)>,
    ) -> Vec<Arc<PeerLink>> {
        let mut missed: Vec<Arc<PeerLink>> = self
            .peers
            .iter()
            .filter(|p| !calls.iter().any(|(c, _)| Arc::ptr_eq(c, p)))
            .cloned()
            .collect();
        let results =
            futures::future::join_all(calls.iter().map(|(_, c)| c.call(seq, frame.clone()))).await;
        for ((p, c), r) in calls.into_iter().zip(results) {
            if let Err(e) = r {
                tracing::warn!(volume = %self.local.key, peer = %p.host, error = %e, "peer missed a write; disconnecting it");
                c.close();
                missed.push(p);
            }
        }
        missed
    }

    /// Waits until the cluster records `p` as outdated (false: the term ended first).
    async fn ensure_outdated(&self, p: &PeerLink) -> bool {
        let mut done = p.outdated.lock().await;
        let mut warned = false;
        while !*done {
            match self.cluster.outdate(&self.local.key, &p.host).await {
                Ok(()) => {
                    // From here on writes are acknowledged without the peer.
                    if let Err(e) = self.local.set_degraded(&p.host, true) {
                        tracing::warn!(volume = %self.local.key, error = %e, "cannot record degraded mode");
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        continue;
                    }
                    *done = true;
                    self.cluster.report(
                        &self.local.key,
                        Report::Degraded {
                            peer: p.host.clone(),
                        },
                    );
                }
                Err(e) => {
                    if !warned {
                        tracing::warn!(volume = %self.local.key, peer = %p.host, error = %e,
                            "cannot mark the peer outdated; writes wait");
                        warned = true;
                    }
                    if self.stopped.load(Ordering::SeqCst) {
                        return false;
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        }
        true
    }

    pub async fn flush(&self) -> std::io::Result<()> {
        let term = self.term.read().await;
        if !*term {
            return Err(shutdown());
        }
        let seq = self.next_seq();
        let frame = Arc::new(Frame::msg(&Msg::Flush {
            seq,
            gen: self.gen.clone(),
        }));
        let targets = self.targets();
        let (l, missed) = tokio::join!(
            self.local.blocking(|l| l.sync_blocking()),
            self.replicate(seq, frame, targets)
        );
        l?;
        for p in missed {
            // Whatever the peer had not made durable is in its activity log.
            if !self.ensure_outdated(&p).await {
                return Err(shutdown());
            }
        }
        Ok(())
    }

    /// Ends the term: waits for writes in flight, makes everything durable on the
    /// connected peers, tells them goodbye. Peers up to date keep a clear bitmap based
    /// on this generation.
    pub(crate) async fn demote(&self) {
        {
            // Stopped first: a write waiting to tell the cluster about a missed peer
            // gives up (fails, unacknowledged) instead of holding the term forever.
            self.stopped.store(true, Ordering::SeqCst);
            let _ = self.flush().await;
            let mut t = self.term.write().await;
            *t = false;
        }
        for p in &self.peers {
            let (state, conn) = {
                let st = p.st.lock().expect("link");
                (st.state, st.conn.clone())
            };
            if state == PeerState::UpToDate {
                let _ = self
                    .local
                    .reset_bitmap(&p.host, Some(self.gen.clone()), false);
            }
            if let Some(c) = conn {
                c.send(&Msg::Goodbye {
                    reason: format!("{} is no longer primary", self.host),
                });
                tokio::time::sleep(Duration::from_millis(20)).await;
                c.close();
            }
            p.set(PeerState::Connecting, None);
        }
        if let Err(e) = self.local.save_bitmaps() {
            tracing::warn!(volume = %self.local.key, error = %e, "cannot save the peers' bitmaps");
        }
    }

    /// Closes every peer connection (the peer tasks then follow the standalone flag).
    pub(crate) fn drop_connections(&self) {
        for p in &self.peers {
            if let Some(c) = p.st.lock().expect("link").conn.clone() {
                c.close();
            }
        }
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    pub(crate) fn peer_status(&self) -> Vec<PeerStatus> {
        self.peers
            .iter()
            .map(|p| {
                let st = p.st.lock().expect("link");
                let dirty = self
                    .local
                    .with_bitmap(&p.host, |b| b.count() as u64 * REGION)
                    .unwrap_or(0)
                    .min(self.local.size());
                PeerStatus {
                    host: p.host.clone(),
                    state: st.state,
                    reason: st.reason.clone(),
                    out_of_sync_bytes: dirty,
                    sync_done_bytes: st.done,
                    sync_total_bytes: st.total,
                }
            })
            .collect()
    }

    fn my_hello(&self, peer: &str) -> Hello {
        let (base, words) = self.local.bitmap_info(peer);
        Hello {
            volume: self.local.key.clone(),
            host: self.host.clone(),
            primary: true,
            size: self.local.size(),
            history: self.history.clone(),
            uptodate: true,
            sync_source: None,
            bitmap_base: base,
            bitmap: words,
            active: self.local.al_words(),
        }
    }

    async fn run_peer(self: Arc<Self>, p: Arc<PeerLink>) {
        let mut last_refusal: Option<String> = None;
        while !self.is_stopped() {
            if self.standalone.load(Ordering::SeqCst) {
                p.set(PeerState::StandAlone, None);
                tokio::time::sleep(Duration::from_millis(300)).await;
                continue;
            }
            match self.connect_peer(&p).await {
                Ok(conn) => {
                    last_refusal = None;
                    conn.closed().await;
                    if !self.is_stopped() {
                        tracing::warn!(volume = %self.local.key, peer = %p.host, "peer disconnected");
                        p.set(PeerState::Connecting, Some("connection lost".into()));
                    }
                }
                Err(Refusal::Retry(why)) => {
                    p.set(PeerState::Connecting, Some(why));
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(Refusal::Refused(why, report)) => {
                    if last_refusal.as_deref() != Some(&why) {
                        tracing::error!(volume = %self.local.key, peer = %p.host, reason = %why, "replication refused");
                        if let Some(r) = report {
                            self.cluster.report(&self.local.key, r);
                        }
                        last_refusal = Some(why.clone());
                    }
                    p.set(PeerState::Refused, Some(why));
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            }
        }
    }

    async fn connect_peer(&self, p: &Arc<PeerLink>) -> Result<Arc<Conn>, Refusal> {
        let addr = self
            .cluster
            .peer_addr(&p.host)
            .await
            .ok_or_else(|| Refusal::Retry(format!("address of {} unknown", p.host)))?;
        let tcp = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr))
            .await
            .map_err(|_| Refusal::Retry(format!("connect to {addr}: timed out")))?
            .map_err(|e| Refusal::Retry(format!("connect to {addr}: {e}")))?;
        let _ = tcp.set_nodelay(true);
        // Mutual TLS: the peer proves it is host `p.host` by its certificate.
        let mut stream: conn::Stream = match self.cluster.client_tls(&p.host) {
            Some(tls) => {
                let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
                let t = tokio::time::timeout(
                    Duration::from_secs(5),
                    tokio_rustls::TlsConnector::from(tls).connect(name, tcp),
                )
                .await
                .map_err(|_| Refusal::Retry(format!("TLS with {addr}: timed out")))?
                .map_err(|e| Refusal::Retry(format!("TLS with {} at {addr}: {e}", p.host)))?;
                Box::new(t)
            }
            None => Box::new(tcp),
        };
        let mine = self.my_hello(&p.host);
        let handshake = async {
            conn::write_msg(&mut stream, &Msg::Hello(mine.clone())).await?;
            conn::read_msg(&mut stream).await
        };
        let theirs = match tokio::time::timeout(Duration::from_secs(5), handshake).await {
            Err(_) => return Err(Refusal::Retry("handshake timed out".into())),
            Ok(Err(e)) => return Err(Refusal::Retry(format!("handshake: {e}"))),
            Ok(Ok(Msg::Hello(h))) => h,
            Ok(Ok(Msg::Goodbye { reason })) => return Err(Refusal::Refused(reason, None)),
            Ok(Ok(_)) => return Err(Refusal::Retry("peer answered without a Hello".into())),
        };
        if theirs.size != mine.size {
            let why = format!(
                "{} has {} bytes, this copy {}",
                p.host, theirs.size, mine.size
            );
            let _ = conn::write_msg(
                &mut stream,
                &Msg::Goodbye {
                    reason: why.clone(),
                },
            )
            .await;
            return Err(Refusal::Refused(why, None));
        }
        let decision = match decide(&side(&mine), &side(&theirs)) {
            Decision::Bitmap | Decision::Full(_) if theirs.primary => {
                return Err(Refusal::Refused(format!("{} is primary too", p.host), None))
            }
            d => d,
        };
        let local = &self.local;
        let io = |e: std::io::Error| Refusal::Retry(format!("bitmap: {e}"));
        match &decision {
            Decision::StalePrimary(why) | Decision::SplitBrain(why) => {
                let _ = conn::write_msg(
                    &mut stream,
                    &Msg::Goodbye {
                        reason: why.clone(),
                    },
                )
                .await;
                let report = match decision {
                    Decision::SplitBrain(_) => Report::SplitBrain {
                        peer: p.host.clone(),
                        reason: why.clone(),
                    },
                    _ => Report::Stale {
                        peer: p.host.clone(),
                        reason: why.clone(),
                    },
                };
                return Err(Refusal::Refused(why.clone(), Some(report)));
            }
            Decision::Bitmap => {
                local
                    .with_bitmap(&p.host, |b| {
                        b.or_words(&theirs.active, EXTENT);
                        b.or_words(&mine.active, EXTENT);
                        b.save(true)
                    })
                    .map_err(io)?
                    .map_err(io)?;
            }
            Decision::Full(why) => {
                tracing::info!(volume = %local.key, peer = %p.host, %why, "full resync");
                local
                    .reset_bitmap(&p.host, theirs.history.last().cloned(), true)
                    .map_err(io)?;
            }
        }
        let conn = Conn::start(stream);
        {
            let _quiet = self.term.write().await;
            let mut st = p.st.lock().expect("link");
            st.state = PeerState::Syncing;
            st.reason = None;
            st.conn = Some(conn.clone());
            st.done = 0;
            st.total = 0;
        }
        let started = Instant::now();
        match self.resync(p, &conn).await {
            Ok(bytes) => {
                p.set(PeerState::UpToDate, None);
                let mut o = p.outdated.lock().await;
                match self.cluster.up_to_date(&local.key, &p.host).await {
                    Ok(()) => *o = false,
                    Err(e) => {
                        tracing::warn!(volume = %local.key, peer = %p.host, error = %e, "cannot record the peer up to date")
                    }
                }
                self.cluster.report(
                    &local.key,
                    Report::Resynced {
                        peer: p.host.clone(),
                        bytes,
                        seconds: started.elapsed().as_secs_f64(),
                    },
                );
                Ok(conn)
            }
            Err(e) => {
                conn.close();
                Err(Refusal::Retry(format!("resync: {e}")))
            }
        }
    }

    /// Copies every region in the peer's bitmap (again while new bits appear), then
    /// tells it it is up to date. Returns the bytes copied.
    async fn resync(&self, p: &Arc<PeerLink>, conn: &Arc<Conn>) -> Result<u64, String> {
        let size = self.local.size();
        let mut copied = 0u64;
        loop {
            let bits = self
                .local
                .with_bitmap(&p.host, |b| b.ones())
                .map_err(|e| e.to_string())?;
            if bits.is_empty() {
                break;
            }
            {
                let mut st = p.st.lock().expect("link");
                st.total = st.done + bits.len() as u64 * REGION;
            }
            let n = futures::stream::iter(bits)
                .map(|i| self.resync_region(p, conn, i, size))
                .buffer_unordered(16)
                .try_fold(0u64, |a, b| async move { Ok(a + b) })
                .await?;
            copied += n;
            let _ = self.local.with_bitmap(&p.host, |b| b.save(true));
        }
        let seq = self.next_seq();
        conn.call(
            seq,
            Arc::new(Frame::msg(&Msg::Flush {
                seq,
                gen: self.gen.clone(),
            })),
        )
        .await
        .map_err(|e| e.to_string())?;
        // From here on the peer's copy is complete: its bitmap restarts at this
        // generation (writes it misses from now on set bits again).
        let _quiet = self.term.write().await;
        let seq = self.next_seq();
        conn.call(
            seq,
            Arc::new(Frame::msg(&Msg::ResyncDone {
                seq,
                gen: self.gen.clone(),
            })),
        )
        .await
        .map_err(|e| e.to_string())?;
        self.local
            .set_bitmap_base(&p.host, Some(self.gen.clone()))
            .and_then(|_| self.local.set_degraded(&p.host, false))
            .map_err(|e| e.to_string())?;
        Ok(copied)
    }

    async fn resync_region(
        &self,
        p: &Arc<PeerLink>,
        conn: &Arc<Conn>,
        i: usize,
        size: u64,
    ) -> Result<u64, String> {
        let offset = i as u64 * REGION;
        let len =
            u32::try_from(REGION.min(size.saturating_sub(offset))).expect("REGION fits a u32");
        let _r = self.ranges.lock(offset, len as u64).await;
        if len == 0
            || !self
                .local
                .with_bitmap(&p.host, |b| b.get(i))
                .unwrap_or(false)
        {
            return Ok(0);
        }
        let data = self
            .local
            .read(offset, len)
            .await
            .map_err(|e| format!("read {offset}: {e}"))?;
        let seq = self.next_seq();
        let frame = Frame::write(seq, &self.gen, offset, false, Arc::new(data));
        conn.call(seq, Arc::new(frame))
            .await
            .map_err(|e| e.to_string())?;
        self.local
            .with_bitmap(&p.host, |b| b.clear(i))
            .map_err(|e| e.to_string())?;
        p.st.lock().expect("link").done += len as u64;
        Ok(len as u64)
    }

    /// Online verify: compares MD5s of every chunk with each up-to-date peer; differing
    /// chunks are marked out of sync (resynced at the next connect).
    pub(crate) async fn verify(&self, chunk: u64) -> Vec<VerifyReport> {
        let size = self.local.size();
        let mut out = vec![];
        for p in &self.peers {
            let Some(conn) = p.sendable() else { continue };
            let mut report = VerifyReport {
                peer: p.host.clone(),
                bytes_compared: 0,
                chunk_bytes: chunk,
                differing: vec![],
            };
            let mut offset = 0;
            while offset < size {
                // A chunk is at most 64 MiB (one frame).
                let len = u32::try_from(chunk.min(size - offset).min(64 << 20)).unwrap_or(64 << 20);
                let _r = self.ranges.lock(offset, len as u64).await;
                let seq = self.next_seq();
                let theirs = conn
                    .call(
                        seq,
                        Arc::new(Frame::msg(&Msg::VerifyReq { seq, offset, len })),
                    )
                    .await;
                let mine = self
                    .local
                    .blocking(move |l| l.digest_blocking(offset, len))
                    .await;
                match (theirs, mine) {
                    (Ok(Msg::VerifyResp { digest, .. }), Ok(d)) => {
                        if digest != d {
                            report.differing.push(offset);
                            let _ = self
                                .local
                                .with_bitmap(&p.host, |b| b.set_bytes(offset, len as u64));
                        }
                        report.bytes_compared += len as u64;
                    }
                    _ => break,
                }
                offset += len as u64;
            }
            out.push(report);
        }
        let _ = self.local.save_bitmaps();
        out
    }
}

enum Refusal {
    /// Try again shortly.
    Retry(String),
    /// Refused by decision (split brain, stale, size); reported once.
    Refused(String, Option<Report>),
}

fn side(h: &Hello) -> Side<'_> {
    Side {
        host: &h.host,
        history: &h.history,
        uptodate: h.uptodate,
        sync_source: h.sync_source.as_ref(),
        bitmap_base: h.bitmap_base.as_ref(),
        bitmap_dirty: h.bitmap.iter().any(|w| *w != 0),
    }
}

pub(crate) fn hello_side(h: &Hello) -> Side<'_> {
    side(h)
}
