//! Serving the router on a listener, with limits a peer cannot talk its way past: at
//! most [`Limits::connections`] connections at once (more wait in the kernel's backlog),
//! request headers complete within [`Limits::header_timeout`], and the connection's
//! [`ConnInfo`] attached to every request for `auth`. One loop for TCP and the local
//! unix socket and HTTPS (the TLS handshake runs in the connection's task, within the
//! header timeout).

use crate::auth::ConnInfo;
use axum::extract::ConnectInfo;
use axum::Router;
use futures::future::BoxFuture;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{watch, Semaphore};
use tower::ServiceExt;

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub connections: usize,
    pub header_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            connections: 1024,
            header_timeout: Duration::from_secs(10),
        }
    }
}

/// Turns an accepted connection into the one HTTP is spoken on (a TLS handshake), in
/// the connection's own task, so a slow handshake never holds up the accept loop.
pub type Upgrade<Raw, Io> =
    Arc<dyn Fn(Raw, ConnInfo) -> BoxFuture<'static, std::io::Result<(Io, ConnInfo)>> + Send + Sync>;

/// Something that hands out connections with what is known of their peer.
pub trait Accept: Send + 'static {
    type Raw: Send + 'static;
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept(
        &mut self,
    ) -> impl std::future::Future<Output = std::io::Result<(Self::Raw, ConnInfo)>> + Send;
    fn upgrade(&self) -> Upgrade<Self::Raw, Self::Io>;
}

fn as_is<Io: Send + 'static>() -> Upgrade<Io, Io> {
    Arc::new(|io, info| Box::pin(async move { Ok((io, info)) }))
}

impl Accept for tokio::net::TcpListener {
    type Raw = tokio::net::TcpStream;
    type Io = tokio::net::TcpStream;
    async fn accept(&mut self) -> std::io::Result<(Self::Io, ConnInfo)> {
        let (s, remote) = tokio::net::TcpListener::accept(self).await?;
        let _ = s.set_nodelay(true);
        Ok((s, ConnInfo::Tcp { remote }))
    }
    fn upgrade(&self) -> Upgrade<Self::Raw, Self::Io> {
        as_is()
    }
}

/// HTTPS: TCP, then a TLS handshake with the host certificate; a client certificate of
/// the cluster, when shown, names the peer host in the [`ConnInfo`].
pub struct TlsListener {
    pub tcp: tokio::net::TcpListener,
    pub config: Arc<rustls::ServerConfig>,
    /// How long a handshake may take.
    pub timeout: Duration,
}

impl Accept for TlsListener {
    type Raw = tokio::net::TcpStream;
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    async fn accept(&mut self) -> std::io::Result<(Self::Raw, ConnInfo)> {
        Accept::accept(&mut self.tcp).await
    }
    fn upgrade(&self) -> Upgrade<Self::Raw, Self::Io> {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.config.clone());
        let timeout = self.timeout;
        Arc::new(move |s, info| {
            let acceptor = acceptor.clone();
            Box::pin(async move {
                let remote = match info {
                    ConnInfo::Tcp { remote } | ConnInfo::Tls { remote, .. } => remote,
                    ConnInfo::Unix { .. } => unreachable!("TLS listens on TCP"),
                };
                let tls = tokio::time::timeout(timeout, acceptor.accept(s))
                    .await
                    .map_err(|_| std::io::Error::other("TLS handshake timed out"))??;
                let cert = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
                let peer = cert.and_then(|c| ferry_pki::peer_name(c)).map(Arc::from);
                let serial = cert
                    .and_then(|c| ferry_pki::cert_info(c).ok())
                    .map(|i| Arc::from(i.serial));
                Ok((
                    tls,
                    ConnInfo::Tls {
                        remote,
                        peer,
                        serial,
                    },
                ))
            })
        })
    }
}

impl Accept for tokio::net::UnixListener {
    type Raw = tokio::net::UnixStream;
    type Io = tokio::net::UnixStream;
    fn upgrade(&self) -> Upgrade<Self::Raw, Self::Io> {
        as_is()
    }
    async fn accept(&mut self) -> std::io::Result<(Self::Io, ConnInfo)> {
        let (s, _) = tokio::net::UnixListener::accept(self).await?;
        let info = match s.peer_cred() {
            Ok(c) => ConnInfo::Unix {
                uid: c.uid(),
                gid: c.gid(),
                pid: c.pid(),
            },
            // No credentials: nobody.
            Err(_) => ConnInfo::Unix {
                uid: u32::MAX,
                gid: u32::MAX,
                pid: None,
            },
        };
        Ok((s, info))
    }
}

/// Serves `app` on `listener` until `stop` turns true; connections still open then get
/// a graceful shutdown (they finish their request), for at most 5 s.
pub async fn serve<L: Accept>(
    mut listener: L,
    app: Router,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(limits.connections));
    let upgrade = listener.upgrade();
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = stopped(&mut stop) => break,
        };
        let (io, info) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => break,
        };
        let app = app.clone();
        let mut stop = stop.clone();
        let upgrade = upgrade.clone();
        conns.spawn(async move {
            let _permit = permit;
            let (io, info) = match upgrade(io, info).await {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(error = %e, "connection dropped before HTTP");
                    return;
                }
            };
            let svc = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(ConnectInfo(info.clone()));
                    app.clone().oneshot(req.map(axum::body::Body::new))
                },
            );
            // HTTP/1.1 only: no protocol sniffing without a deadline, and the header
            // timeout covers every connection.
            let mut b =
                hyper_util::server::conn::auto::Builder::new(TokioExecutor::new()).http1_only();
            b.http1()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout);
            let conn = b.serve_connection_with_upgrades(TokioIo::new(io), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stopped(&mut stop) => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
                }
            }
        });
        // Reap finished connections as we go.
        while conns.try_join_next().is_some() {}
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while conns.join_next().await.is_some() {}
    })
    .await;
}

/// Resolves once `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
