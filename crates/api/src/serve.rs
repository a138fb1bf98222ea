//! Serving the router on a listener, with limits a peer cannot talk its way past: at
//! most [`Limits::connections`] connections at once (more wait in the kernel's backlog),
//! request headers complete within [`Limits::header_timeout`], and the connection's
//! [`ConnInfo`] attached to every request for `auth`. One loop for TCP and the local
//! unix socket (and, later, TLS streams).

use crate::auth::ConnInfo;
use axum::extract::ConnectInfo;
use axum::Router;
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

/// Something that hands out connections with what is known of their peer.
pub trait Accept: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept(
        &mut self,
    ) -> impl std::future::Future<Output = std::io::Result<(Self::Io, ConnInfo)>> + Send;
}

impl Accept for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept(&mut self) -> std::io::Result<(Self::Io, ConnInfo)> {
        let (s, remote) = tokio::net::TcpListener::accept(self).await?;
        let _ = s.set_nodelay(true);
        Ok((s, ConnInfo::Tcp { remote }))
    }
}

impl Accept for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
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
        conns.spawn(async move {
            let _permit = permit;
            let svc = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(ConnectInfo(info));
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
