//! `/api/v1/nodes/{host}/api/v1/...`: a request for another host of the cluster, sent
//! on by this daemon (with the cluster's token) and answered with
//! that host's answer. The web UI reaches the whole cluster through the daemon that
//! served it, as Proxmox's does; websockets (serial console, VNC) are relayed frame by
//! frame.

use crate::error::ApiResult;
use crate::ApiError;
use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use ferry_agent::Agent;
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as TMessage;

/// Largest body forwarded (VM definitions, not disk uploads).
const MAX_BODY: usize = 4 << 20;

pub async fn forward(
    State(a): State<Agent>,
    Path((host, _)): Path<(String, String)>,
    caller: Option<axum::Extension<crate::Caller>>,
    req: Request,
) -> ApiResult<Response> {
    // The path exactly as it came (never the decoded one), so the other host gets what
    // the grants were checked against here (`ferry_access::need` sees the raw path).
    let raw = req.uri().path();
    let prefix = format!("/api/v1/nodes/{host}");
    let rest = raw.strip_prefix(&prefix).unwrap_or_default();
    let query = req
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let path = format!("{rest}{query}");
    ferry_agent::check_forwarded(&path)?;
    // A user's request: the other host holds it to that user's grants too (its
    // handlers decide by the user as well: its tasks, its own password).
    let user = caller.and_then(|axum::Extension(c)| c.restricted_user().map(String::from));
    let (mut parts, body) = req.into_parts();
    let upgrade = parts
        .headers
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    if upgrade {
        let protocol = parts.headers.get(header::SEC_WEBSOCKET_PROTOCOL).cloned();
        let ws = WebSocketUpgrade::from_request_parts(&mut parts, &a)
            .await
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
        return relay(a, host, path, protocol, ws, user).await;
    }
    let method = reqwest::Method::from_bytes(parts.method.as_str().as_bytes())
        .map_err(|_| ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "Unknown method"))?;
    let ct = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let body: Bytes = axum::body::to_bytes(body, MAX_BODY)
        .await
        .map_err(|e| ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, format!("Body: {e}")))?;
    let (status, ct, body) = a
        .forward_to_host(&host, method, &path, ct, body, user.as_deref())
        .await?;
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut resp = (status, body).into_response();
    if let Some(v) = ct.and_then(|c| c.parse().ok()) {
        resp.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    Ok(resp)
}

/// Opens the same websocket on the other host first (so its refusal reaches the
/// client as an HTTP error; the subprotocols the client offered are offered there and
/// the one chosen there is answered), then relays frames both ways until either side
/// closes.
async fn relay(
    a: Agent,
    host: String,
    path: String,
    protocol: Option<header::HeaderValue>,
    ws: WebSocketUpgrade,
    user: Option<String>,
) -> ApiResult<Response> {
    ferry_agent::check_forwarded(&path)?;
    let api = a.host_api(&host).await?;
    let url = format!("{}{path}", api.replacen("https://", "wss://", 1));
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("{url}: {e}")))?;
    if let Some(p) = protocol {
        request
            .headers_mut()
            .insert(header::SEC_WEBSOCKET_PROTOCOL, p);
    }
    if let Some(who) = ferry_agent::audit::actor().and_then(|w| w.parse().ok()) {
        request
            .headers_mut()
            .insert(ferry_agent::audit::ON_BEHALF_HEADER, who);
    }
    if let Some(u) = user.and_then(|u| u.parse().ok()) {
        request
            .headers_mut()
            .insert(ferry_agent::audit::PROXIED_FOR_HEADER, u);
    }
    let (peer, resp) = connect_peer(&a, &host, request).await.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!("Open {path} on host {host}: {e}"),
        )
    })?;
    let chosen = resp
        .headers()
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    Ok(ws
        .protocols(chosen)
        .on_upgrade(move |socket| pump(socket, peer)))
}

type PeerSocket =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// Opens the websocket on host `host` over mutual TLS (this host's certificate shown,
/// the other's checked for its name).
async fn connect_peer(
    a: &Agent,
    host: &str,
    request: tokio_tungstenite::tungstenite::handshake::client::Request,
) -> Result<
    (
        PeerSocket,
        tokio_tungstenite::tungstenite::handshake::client::Response,
    ),
    String,
> {
    let uri = request.uri().clone();
    let authority = uri.authority().ok_or("no host in the URL")?;
    let port = authority
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("wss") {
            443
        } else {
            80
        });
    let addr = format!("{}:{port}", authority.host().trim_matches(['[', ']']));
    let tcp = tokio::time::timeout(
        std::time::Duration::from_secs(3),
        tokio::net::TcpStream::connect(&addr),
    )
    .await
    .map_err(|_| format!("connect to {addr}: timed out"))?
    .map_err(|e| format!("connect to {addr}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let name = rustls::pki_types::ServerName::try_from(authority.host().trim_matches(['[', ']']))
        .map_err(|e| e.to_string())?
        .to_owned();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(a.peer_tls(host)))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS with {host}: {e}"))?;
    tokio_tungstenite::client_async(request, tls)
        .await
        .map_err(|e| e.to_string())
}

async fn pump(socket: WebSocket, peer: PeerSocket) {
    let (mut ptx, mut prx) = peer.split();
    let (mut ctx, mut crx) = socket.split();
    let down = async {
        while let Some(Ok(m)) = prx.next().await {
            let m = match m {
                TMessage::Binary(b) => Message::Binary(b),
                TMessage::Text(t) => Message::Text(t.as_str().into()),
                TMessage::Close(_) => break,
                _ => continue,
            };
            if ctx.send(m).await.is_err() {
                break;
            }
        }
        let _ = ctx.send(Message::Close(None)).await;
    };
    let up = async {
        while let Some(Ok(m)) = crx.next().await {
            let m = match m {
                Message::Binary(b) => TMessage::Binary(b),
                Message::Text(t) => TMessage::Text(t.as_str().into()),
                Message::Close(_) => break,
                _ => continue,
            };
            if ptx.send(m).await.is_err() {
                break;
            }
        }
        let _ = ptx.send(TMessage::Close(None)).await;
    };
    tokio::select! { _ = down => {}, _ = up => {} }
}
