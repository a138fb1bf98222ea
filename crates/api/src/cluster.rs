//! `/api/v1/cluster`: membership (init, join, leave), status; members add joiners.

use crate::error::{ApiJson, ApiPath, ApiQuery, ApiResult};
use axum::extract::State;
use axum::Json;
use ferry_agent::Agent;
use ferry_types::{
    CertSignRequest, CertSigned, CertStatus, ClusterConfig, ClusterInit, ClusterJoin,
    ClusterStatus, ClusterSummary, JoinToken, JoinTokenRequest, MemberAdd, MemberAdded,
    MemberRemoveParams, MemberRemoved,
};

#[utoipa::path(get, path = "/api/v1/cluster/status", tag = "cluster",
    responses((status = 200, description = "Members with state and lease, etcd leader and quorum, HA manager", body = ClusterStatus)))]
pub async fn cluster_status(State(a): State<Agent>) -> ApiResult<Json<ClusterStatus>> {
    Ok(Json(a.cluster_status().await?))
}

#[utoipa::path(get, path = "/api/v1/cluster/summary", tag = "cluster",
    responses((status = 200, description = "Hosts and VMs by state, memory and CPUs: the whole cluster from the answering host's cache", body = ClusterSummary)))]
pub async fn cluster_summary(State(a): State<Agent>) -> ApiResult<Json<ClusterSummary>> {
    Ok(Json(a.cluster_summary().await?))
}

#[utoipa::path(post, path = "/api/v1/cluster/etcd/promote", tag = "cluster",
    responses((status = 200, description = "This host is an etcd voter now (a learner first, promoted once caught up); its daemon restarts on the new configuration. The host tending etcd asks this of a client host.", body = ClusterConfig),
              (status = 409, description = "Not in an etcd cluster", body = ferry_types::ApiErrorBody)))]
pub async fn promote_voter(State(a): State<Agent>) -> ApiResult<Json<ClusterConfig>> {
    Ok(Json(a.become_voter().await?))
}

#[utoipa::path(post, path = "/api/v1/cluster/init", tag = "cluster", request_body = ClusterInit,
    responses((status = 200, description = "This host founded a cluster; the daemon restarts on etcd", body = ClusterConfig),
              (status = 409, description = "Already in a cluster")))]
pub async fn cluster_init(
    State(a): State<Agent>,
    ApiJson(req): ApiJson<ClusterInit>,
) -> ApiResult<Json<ClusterConfig>> {
    let cfg = a.cluster_init(req).await?;
    a.request_restart();
    Ok(Json(cfg))
}

#[utoipa::path(post, path = "/api/v1/cluster/join", tag = "cluster", request_body = ClusterJoin,
    responses((status = 200, description = "This host joined; the daemon restarts on etcd", body = ClusterConfig)))]
pub async fn cluster_join(
    State(a): State<Agent>,
    ApiJson(req): ApiJson<ClusterJoin>,
) -> ApiResult<Json<ClusterConfig>> {
    let cfg = a.cluster_join(req).await?;
    a.request_restart();
    Ok(Json(cfg))
}

#[utoipa::path(post, path = "/api/v1/cluster/join-tokens", tag = "cluster", request_body = JoinTokenRequest,
    responses((status = 200, description = "A one-time token that lets one host join", body = JoinToken),
              (status = 409, description = "Not in a cluster", body = ferry_types::ApiErrorBody)))]
pub async fn join_token(
    State(a): State<Agent>,
    body: axum::body::Bytes,
) -> ApiResult<Json<JoinToken>> {
    let req: JoinTokenRequest = crate::error::optional_json(&body)?.unwrap_or_default();
    Ok(Json(a.cluster_join_token(req).await?))
}

/// Open to callers without credentials: the join token in the body is the credential
/// (checked, and used up, before anything else).
#[utoipa::path(post, path = "/api/v1/cluster/members", tag = "cluster", request_body = MemberAdd,
    responses((status = 200, description = "The host may start its etcd member with this", body = MemberAdded),
              (status = 401, description = "Unknown, used or expired join token", body = ferry_types::ApiErrorBody)))]
pub async fn add_member(
    State(a): State<Agent>,
    ApiJson(req): ApiJson<MemberAdd>,
) -> ApiResult<Json<MemberAdded>> {
    Ok(Json(a.cluster_add_member(req).await?))
}

#[utoipa::path(post, path = "/api/v1/cluster/leave", tag = "cluster",
    responses((status = 204, description = "This host left; the daemon restarts on its own store")))]
pub async fn cluster_leave(State(a): State<Agent>) -> ApiResult<axum::http::StatusCode> {
    a.cluster_leave().await?;
    a.request_restart();
    Ok(axum::http::StatusCode::NO_CONTENT)
}

#[utoipa::path(delete, path = "/api/v1/cluster/members/{name}", tag = "cluster",
    params(("name" = String, Path, description = "The member"), MemberRemoveParams),
    responses((status = 200, description = "Removed; its certificate is revoked", body = MemberRemoved),
              (status = 404, description = "No such member", body = ferry_types::ApiErrorBody),
              (status = 409, description = "It is up, is this host, or owns VMs (without force)", body = ferry_types::ApiErrorBody)))]
pub async fn remove_member(
    State(a): State<Agent>,
    ApiPath(name): ApiPath<String>,
    ApiQuery(p): ApiQuery<MemberRemoveParams>,
) -> ApiResult<Json<MemberRemoved>> {
    Ok(Json(MemberRemoved {
        dropped_vms: a.cluster_remove(&name, p.force).await?,
    }))
}

#[utoipa::path(get, path = "/api/v1/cluster/certs", tag = "cluster",
    responses((status = 200, description = "The cluster CA and this host's certificate", body = CertStatus)))]
pub async fn certs_status(State(a): State<Agent>) -> ApiResult<Json<CertStatus>> {
    Ok(Json(a.cert_status()?))
}

#[utoipa::path(post, path = "/api/v1/cluster/certs/renew", tag = "cluster",
    responses((status = 200, description = "A new host certificate; the daemon restarts on it", body = CertStatus),
              (status = 409, description = "No CA key on this host", body = ferry_types::ApiErrorBody)))]
pub async fn certs_renew(State(a): State<Agent>) -> ApiResult<Json<CertStatus>> {
    let st = a.renew_certs().await?;
    a.request_restart();
    Ok(Json(st))
}

/// Host-to-host only: the caller (known by its certificate) gets a new certificate for
/// its key from the member holding the CA key.
#[utoipa::path(post, path = "/api/v1/cluster/certs/sign", tag = "cluster", request_body = CertSignRequest,
    responses((status = 200, description = "The caller's new certificate", body = CertSigned),
              (status = 403, description = "Not called by a cluster host", body = ferry_types::ApiErrorBody),
              (status = 409, description = "No CA key on this host", body = ferry_types::ApiErrorBody)))]
pub async fn certs_sign(
    State(a): State<Agent>,
    caller: Option<axum::Extension<crate::Caller>>,
    ApiJson(req): ApiJson<CertSignRequest>,
) -> ApiResult<Json<CertSigned>> {
    let Some(axum::Extension(crate::Caller::Peer { host, .. })) = caller else {
        return Err(crate::ApiError::new(
            axum::http::StatusCode::FORBIDDEN,
            "Only another cluster host signs for its own key here (mutual TLS)",
        ));
    };
    Ok(Json(a.sign_member_cert(&host, &req.csr).await?))
}
