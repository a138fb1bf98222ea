//! `/api/v1/nodes/{host}/api/v1/...`: a request for another host of the cluster, sent
//! on by this daemon (which that host trusts as a cluster member) and answered with
//! that host's answer. The web UI reaches the whole cluster through the daemon that
//! served it, as Proxmox's does. Websockets (consoles) are not forwarded.

use crate::error::ApiResult;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use ferry_agent::Agent;

pub async fn forward(
    State(a): State<Agent>,
    Path((host, rest)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    let method = reqwest::Method::from_bytes(method.as_str().as_bytes())
        .map_err(|_| crate::ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "Unknown method"))?;
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let (status, ct, body) = a
        .forward_to_host(&host, method, &format!("/{rest}{query}"), ct, body)
        .await?;
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut resp = (status, body).into_response();
    if let Some(v) = ct.and_then(|c| c.parse().ok()) {
        resp.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    Ok(resp)
}
