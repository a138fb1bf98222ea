//! Websockets: the serial console (history, then live output; input typed back), the
//! VNC display (raw RFB bytes both ways, for noVNC), and the event stream.

use crate::error::{ApiPath, ApiResult};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use bytes::Bytes;
use ferry_agent::Agent;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `GET /api/v1/vms/{name}/console`: binary frames of console output; frames sent by the
/// client (text or binary) are typed into the console.
pub async fn console(
    State(a): State<Agent>,
    ApiPath(name): ApiPath<String>,
    ws: WebSocketUpgrade,
) -> ApiResult<Response> {
    a.get_vm(&name).await?;
    let console = a.console(&name)?;
    Ok(ws.on_upgrade(move |socket| async move {
        let (history, mut live) = console.subscribe();
        let (mut tx, mut rx) = socket.split();
        if tx
            .send(Message::Binary(Bytes::from(history)))
            .await
            .is_err()
        {
            return;
        }
        let out = async {
            loop {
                match live.recv().await {
                    Ok(chunk) => {
                        if tx.send(Message::Binary(chunk)).await.is_err() {
                            break;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        let note = format!("\r\n[ferry: {n} chunks of output skipped]\r\n");
                        let _ = tx.send(Message::Binary(Bytes::from(note))).await;
                    }
                    Err(_) => break,
                }
            }
            let _ = tx.send(Message::Close(None)).await;
        };
        let inp = async {
            while let Some(Ok(m)) = rx.next().await {
                let data = match m {
                    Message::Binary(b) => b,
                    Message::Text(t) => Bytes::copy_from_slice(t.as_bytes()),
                    Message::Close(_) => break,
                    _ => continue,
                };
                if !console.send(data).await {
                    break;
                }
            }
        };
        tokio::select! { _ = out => {}, _ = inp => {} }
    }))
}

/// `GET /api/v1/vms/{name}/vnc`: the VM's VNC server (RFB) over binary frames.
pub async fn vnc(
    State(a): State<Agent>,
    ApiPath(name): ApiPath<String>,
    ws: WebSocketUpgrade,
) -> ApiResult<Response> {
    let stream = a.connect_vnc(&name).await?;
    Ok(ws
        .protocols(["binary"])
        .on_upgrade(move |socket| pump(socket, stream)))
}

async fn pump(socket: WebSocket, stream: tokio::net::UnixStream) {
    let (mut rd, mut wr) = stream.into_split();
    let (mut tx, mut rx) = socket.split();
    let up = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx
                        .send(Message::Binary(Bytes::copy_from_slice(&buf[..n])))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    };
    let down = async {
        while let Some(Ok(m)) = rx.next().await {
            match m {
                Message::Binary(b) if wr.write_all(&b).await.is_err() => break,
                Message::Close(_) => break,
                _ => {}
            }
        }
    };
    tokio::select! { _ = up => {}, _ = down => {} }
}

/// `GET /api/v1/events/stream`: each new event as a JSON text frame.
pub async fn events(State(a): State<Agent>, ws: WebSocketUpgrade) -> Response {
    let mut rx = a.events().subscribe();
    ws.on_upgrade(move |mut socket| async move {
        loop {
            match rx.recv().await {
                Ok(e) => {
                    let text = serde_json::to_string(&e).unwrap_or_default();
                    if socket.send(Message::Text(text.into())).await.is_err() {
                        break;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => break,
            }
        }
    })
}

/// `GET /api/v1/cluster/changes`: what changed in the cluster, as JSON text frames
/// ([`ferry_types::ClusterChange`]) at most every 250 ms, from this host's cluster
/// cache (fed by etcd watches): the web UI reads again only what a frame names. 409
/// outside a cluster (there the event stream says everything).
pub async fn cluster_changes(State(a): State<Agent>, ws: WebSocketUpgrade) -> ApiResult<Response> {
    let Some(link) = a.cluster() else {
        return Err(crate::error::ApiError::new(
            axum::http::StatusCode::CONFLICT,
            "This host is in no cluster: follow /api/v1/events/stream",
        ));
    };
    let cache = link.cache().clone();
    Ok(ws.on_upgrade(move |socket| follow_changes(socket, cache)))
}

async fn follow_changes(mut socket: WebSocket, cache: ferry_agent::ClusterCache) {
    use ferry_agent::CacheChange as Change;
    use tokio::sync::broadcast::error::RecvError;
    let mut records = cache.hosts.changes();
    let mut parts = [
        cache.members.subscribe(),
        cache.alive.subscribe(),
        cache.loads.subscribe(),
        cache.fenced.subscribe(),
    ];
    let mut pending = ferry_types::ClusterChange::default();
    let mut vms_of = std::collections::BTreeSet::new();
    let mut due: Option<tokio::time::Instant> = None;
    let window = std::time::Duration::from_millis(250);
    loop {
        let [m, al, l, f] = &mut parts;
        tokio::select! {
            r = records.recv() => match r {
                Ok(Change::Key(k)) => {
                    let mut seg = k.splitn(3, '/');
                    match (seg.next(), seg.next()) {
                        (Some(h), Some("vms")) => {
                            vms_of.insert(h.to_string());
                        }
                        _ => pending.hosts = true,
                    }
                }
                Ok(Change::All) | Err(RecvError::Lagged(_)) => pending.all = true,
                Err(RecvError::Closed) => break,
            },
            r = m.changed() => if r.is_err() { break } else { pending.hosts = true },
            r = al.changed() => if r.is_err() { break } else { pending.hosts = true },
            r = l.changed() => if r.is_err() { break } else { pending.hosts = true },
            r = f.changed() => if r.is_err() { break } else { pending.hosts = true },
            msg = socket.recv() => match msg {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break,
                Some(Ok(_)) => continue,
            },
            _ = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => {
                pending.vms_of = std::mem::take(&mut vms_of).into_iter().collect();
                let frame = std::mem::take(&mut pending);
                due = None;
                let text = serde_json::to_string(&frame).unwrap_or_default();
                if socket.send(Message::Text(text.into())).await.is_err() {
                    break;
                }
                continue;
            }
        }
        if due.is_none() && (pending.hosts || pending.all || !vms_of.is_empty()) {
            due = Some(tokio::time::Instant::now() + window);
        }
    }
}
