//! The replication service of one host: its copies of replicated volumes, the TCP
//! listener peers' primaries connect to, one NBD socket per copy, and the activity-log
//! housekeeping.
//!
//! The data path (NBD clients, the primary's connections to its peers, a secondary's
//! connection from its primary, resyncs) runs on the service's own thread, a
//! current-thread runtime: a write then never hops between threads inside the daemon,
//! and the requests that arrive together go out together (one send to each peer, one
//! reply batch to QEMU). Syncs and large writes still leave that thread (the runtime's
//! blocking pool). The control plane (the agent's calls) runs wherever it is called.

use crate::conn;
use crate::local::Local;
use crate::replica::{OneExport, Replica};
use crate::wire::Msg;
use crate::{Cluster, ReplicaError};
use ferry_types::{GenId, ReplicaStatus, VerifyReport};
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinHandle;

type Served = (Arc<Replica>, JoinHandle<()>);

/// Replication connections (peers' primaries, and strangers being refused) at once.
const MAX_CONNECTIONS: usize = 256;

pub struct Service {
    host: String,
    /// The data path's runtime (see the module's text); the thread ends with the
    /// service (`_stop` dropped).
    rt: tokio::runtime::Handle,
    _stop: tokio::sync::oneshot::Sender<()>,
    socket_dir: PathBuf,
    cluster: Arc<dyn Cluster>,
    /// Each copy with the task serving its NBD socket.
    replicas: Mutex<HashMap<String, Served>>,
}

impl Service {
    /// `socket_dir` holds the NBD sockets (`{pool}.{volume}.sock`). Starts the data
    /// path's thread.
    pub fn new(
        host: &str,
        socket_dir: &Path,
        cluster: Arc<dyn Cluster>,
    ) -> std::io::Result<Arc<Service>> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("ferry-replica")
            .build()?;
        let handle = rt.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("ferry-replica".into())
            .spawn(move || {
                rt.block_on(async {
                    let _ = stopped.await;
                })
            })?;
        let s = Arc::new(Service {
            host: host.to_string(),
            rt: handle,
            _stop: stop,
            socket_dir: socket_dir.to_path_buf(),
            cluster,
            replicas: Mutex::new(HashMap::new()),
        });
        let weak = Arc::downgrade(&s);
        s.rt.spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                let Some(s) = weak.upgrade() else { break };
                for r in s.all() {
                    // Extents go from the activity log once they stayed idle for
                    // some ticks; nothing due, nothing to flush (a busy volume is not
                    // made to sync every tick).
                    let idle = r.local.al_idle();
                    if idle.is_empty() {
                        continue;
                    }
                    // A primary's extents retire only once connected peers have them
                    // durably too.
                    if let Some(p) = r.primary() {
                        if p.flush().await.is_err() {
                            continue;
                        }
                    }
                    let l = r.local.clone();
                    let res = tokio::task::spawn_blocking(move || l.al_retire(&idle)).await;
                    if let Ok(Err(e)) = res {
                        tracing::warn!(volume = %r.key(), error = %e, "activity log");
                    }
                }
            }
        });
        Ok(s)
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    /// Accepts primaries' connections on `addr`; returns the address bound.
    pub fn listen(self: &Arc<Self>, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        let l = std::net::TcpListener::bind(addr)?;
        l.set_nonblocking(true)?;
        let bound = l.local_addr()?;
        let l = {
            let _rt = self.rt.enter();
            TcpListener::from_std(l)?
        };
        let weak = Arc::downgrade(self);
        // Connections being set up or served at once: a flood of strangers waits in the
        // kernel's backlog instead of taking every descriptor.
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        self.rt.spawn(async move {
            loop {
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    break;
                };
                let Ok((stream, peer)) = l.accept().await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let Some(s) = weak.upgrade() else { break };
                tokio::spawn(async move {
                    let _permit = permit;
                    let _ = stream.set_nodelay(true);
                    // With TLS the peer's certificate names its host; without (unit
                    // tests) its address must be the one the cluster lists.
                    let (mut stream, cert_host, cert_serial): (
                        conn::Stream,
                        Option<String>,
                        Option<String>,
                    ) =
                        match s.cluster.server_tls() {
                            Some(tls) => {
                                let acc = tokio_rustls::TlsAcceptor::from(tls);
                                let t = match tokio::time::timeout(
                                    Duration::from_secs(5),
                                    acc.accept(stream),
                                )
                                .await
                                {
                                    Ok(Ok(t)) => t,
                                    Ok(Err(e)) => {
                                        tracing::debug!(%peer, error = %e, "replication TLS handshake refused");
                                        return;
                                    }
                                    Err(_) => return,
                                };
                                let cert = t.get_ref().1.peer_certificates().and_then(|c| c.first());
                                let host = cert.and_then(|c| ferry_pki::peer_name(c));
                                let serial = cert
                                    .and_then(|c| ferry_pki::cert_info(c).ok())
                                    .map(|i| i.serial);
                                (Box::new(t), host, serial)
                            }
                            None => (Box::new(stream), None, None),
                        };
                    let hello =
                        tokio::time::timeout(Duration::from_secs(5), conn::read_hello(&mut stream))
                            .await;
                    let h = match hello {
                        Ok(Ok(Msg::Hello(h))) => h,
                        Ok(Ok(_)) => {
                            tracing::warn!(%peer, "replication peer did not start with a Hello");
                            return;
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(%peer, error = %e, "bad replication handshake");
                            return;
                        }
                        Err(_) => return,
                    };
                    // Only the cluster's hosts replicate here, each as itself.
                    let known = s.cluster.peer_addr(&h.host).await;
                    let ok = match (&cert_host, s.cluster.server_tls().is_some()) {
                        (Some(c), true) => {
                            *c == h.host
                                && known.is_some()
                                && s.cluster.current_cert(c, cert_serial.as_deref()).await
                        }
                        (None, true) => false,
                        (_, false) => known.map(|a| a.ip()) == Some(peer.ip()),
                    };
                    if !ok {
                        tracing::warn!(%peer, host = %h.host, cert = ?cert_host, "replication connection from an unknown peer refused");
                        let reason = format!(
                            "{} is not a host of this cluster (its certificate names {})",
                            h.host,
                            cert_host.as_deref().unwrap_or("no host")
                        );
                        let _ = conn::write_msg(&mut stream, &Msg::Goodbye { reason }).await;
                        return;
                    }
                    match s.get(&h.volume) {
                        Some(r) => r.accept(h, stream).await,
                        None => {
                            let reason = format!("no copy of {} on {}", h.volume, s.host);
                            let _ = conn::write_msg(&mut stream, &Msg::Goodbye { reason }).await;
                        }
                    }
                });
            }
        });
        Ok(bound)
    }

    fn all(&self) -> Vec<Arc<Replica>> {
        self.replicas
            .lock()
            .expect("replicas")
            .values()
            .map(|(r, _)| r.clone())
            .collect()
    }

    pub fn keys(&self) -> Vec<String> {
        self.replicas
            .lock()
            .expect("replicas")
            .keys()
            .cloned()
            .collect()
    }

    pub fn get(&self, key: &str) -> Option<Arc<Replica>> {
        self.replicas
            .lock()
            .expect("replicas")
            .get(key)
            .map(|(r, _)| r.clone())
    }

    fn need(&self, key: &str) -> Result<Arc<Replica>, ReplicaError> {
        self.get(key)
            .ok_or_else(|| ReplicaError::NotFound(format!("{key} on {}", self.host)))
    }

    pub fn socket_path(&self, key: &str) -> PathBuf {
        self.socket_dir
            .join(format!("{}.sock", key.replace('/', ".")))
    }

    /// Opens this host's copy of `key` (`pool/volume`) kept in `dir`, creating it when
    /// `create` gives a size and first generation (None: a new copy, synced in full),
    /// and serves it on its NBD socket.
    pub fn open(
        &self,
        key: &str,
        dir: &Path,
        vol: &str,
        create: Option<(u64, Option<GenId>)>,
    ) -> Result<Arc<Replica>, ReplicaError> {
        if let Some(r) = self.get(key) {
            if let Some((_, Some(_))) = create {
                return Err(ReplicaError::Role(format!(
                    "{} already serves a copy of {key}",
                    self.host
                )));
            }
            return Ok(r);
        }
        let local = Local::open(key, dir, vol, create)
            .map_err(|e| ReplicaError::io(format!("open the copy of {key}"), e))?;
        let sock = self.socket_path(key);
        std::fs::create_dir_all(&self.socket_dir)
            .map_err(|e| ReplicaError::io(format!("create {}", self.socket_dir.display()), e))?;
        let _ = std::fs::remove_file(&sock);
        let listener = std::os::unix::net::UnixListener::bind(&sock)
            .and_then(|l| {
                l.set_nonblocking(true)?;
                let _rt = self.rt.enter();
                UnixListener::from_std(l)
            })
            .map_err(|e| ReplicaError::io(format!("listen on {}", sock.display()), e))?;
        let r = Arc::new(Replica::new(local, &self.host, self.cluster.clone(), sock));
        let exports: Arc<dyn crate::nbd::Exports> = Arc::new(OneExport(r.clone()));
        let task = self.rt.spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((s, _)) => {
                        tokio::spawn(crate::nbd::serve(s, exports.clone()));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "NBD accept");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        self.replicas
            .lock()
            .expect("replicas")
            .insert(key.to_string(), (r.clone(), task));
        tracing::info!(volume = key, "replica open");
        Ok(r)
    }

    pub fn promote(
        &self,
        key: &str,
        gen: GenId,
        peers: &[String],
        outdated: &BTreeSet<String>,
        force: bool,
    ) -> Result<(), ReplicaError> {
        // The term's tasks (peer connections, resyncs) run on the data path's thread.
        let _rt = self.rt.enter();
        self.need(key)?.promote(gen, peers, outdated, force)
    }

    pub async fn demote(&self, key: &str) -> Result<(), ReplicaError> {
        self.need(key)?.demote().await;
        Ok(())
    }

    pub fn status(&self, key: &str) -> Result<ReplicaStatus, ReplicaError> {
        Ok(self.need(key)?.status())
    }

    pub async fn verify(&self, key: &str) -> Result<Vec<VerifyReport>, ReplicaError> {
        self.need(key)?.verify(1 << 20).await
    }

    pub fn set_standalone(&self, key: &str, on: bool) -> Result<(), ReplicaError> {
        self.need(key)?.set_standalone(on);
        Ok(())
    }

    /// The split-brain loser: keeps its data aside and becomes a new, empty copy.
    pub fn discard(&self, key: &str) -> Result<PathBuf, ReplicaError> {
        let r = self.need(key)?;
        if r.is_primary() {
            return Err(ReplicaError::Role(format!(
                "{} is primary of {key}; stop what uses it first",
                self.host
            )));
        }
        r.set_standalone(true);
        let saved = r
            .local
            .discard()
            .map_err(|e| ReplicaError::io(format!("keep the copy of {key} aside"), e))?;
        r.set_standalone(false);
        Ok(saved)
    }

    pub fn grow(&self, key: &str, size: u64) -> Result<(), ReplicaError> {
        let r = self.need(key)?;
        if r.is_primary() {
            return Err(ReplicaError::Role(format!(
                "{key} is in use on {}; resize it while nothing uses it",
                self.host
            )));
        }
        r.local
            .grow(size)
            .map_err(|e| ReplicaError::io(format!("grow {key}"), e))
    }

    /// Stops serving `key`; `remove` deletes the copy's files too.
    pub async fn close(&self, key: &str, remove: bool) -> Result<(), ReplicaError> {
        let entry = self.replicas.lock().expect("replicas").remove(key);
        if let Some((r, task)) = entry {
            r.demote().await;
            r.set_standalone(true);
            task.abort();
            let _ = std::fs::remove_file(&r.nbd_socket);
            if remove {
                Local::remove_files(&r.local.dir, &r.local.vol);
            }
        }
        Ok(())
    }
}
