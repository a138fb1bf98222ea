//! Replicated volumes: `/api/v1/pools/{pool}/volumes/{volume}/replication[...]` for the
//! admin (status, promote, demote, verify, disconnect/connect, resolve a split brain),
//! and `/api/v1/replication/...`, the calls hosts make to each other (define a pool,
//! make/drop/grow/discard a host's copy, its status).

use crate::error::{ApiJson, ApiPath, ApiResult};
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use ferry_agent::Agent;
use ferry_types::{
    ApiErrorBody, GenId, LocalCopy, PoolSpec, PromoteRequest, ReplicaStatus, ReplicationStatus,
    ResolveRequest, VerifyReport,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[utoipa::path(get, path = "/api/v1/pools/{pool}/volumes/{volume}/replication", tag = "replication",
    params(("pool" = String, Path), ("volume" = String, Path)),
    responses((status = 200, body = ReplicationStatus), (status = 404, body = ApiErrorBody)))]
pub async fn replication_status(
    State(a): State<Agent>,
    ApiPath((pool, vol)): ApiPath<(String, String)>,
) -> ApiResult<Json<ReplicationStatus>> {
    Ok(Json(a.replication_status(&pool, &vol).await?))
}

/// Makes the host answering primary of the volume (its NBD export takes writes).
#[utoipa::path(post, path = "/api/v1/pools/{pool}/volumes/{volume}/replication/promote", tag = "replication",
    params(("pool" = String, Path), ("volume" = String, Path)), request_body = PromoteRequest,
    responses((status = 200, body = GenId), (status = 409, body = ApiErrorBody)))]
pub async fn promote(
    State(a): State<Agent>,
    ApiPath((pool, vol)): ApiPath<(String, String)>,
    ApiJson(req): ApiJson<PromoteRequest>,
) -> ApiResult<Json<GenId>> {
    Ok(Json(a.promote_volume(&pool, &vol, req.force).await?))
}

#[utoipa::path(post, path = "/api/v1/pools/{pool}/volumes/{volume}/replication/demote", tag = "replication",
    params(("pool" = String, Path), ("volume" = String, Path)),
    responses((status = 204, description = "This host is no longer primary"), (status = 409, body = ApiErrorBody)))]
pub async fn demote(
    State(a): State<Agent>,
    ApiPath((pool, vol)): ApiPath<(String, String)>,
) -> ApiResult<StatusCode> {
    a.demote_volume(&pool, &vol).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Online verify, run on the primary: both copies compared by checksum.
#[utoipa::path(post, path = "/api/v1/pools/{pool}/volumes/{volume}/replication/verify", tag = "replication",
    params(("pool" = String, Path), ("volume" = String, Path)),
    responses((status = 200, body = Vec<VerifyReport>), (status = 409, body = ApiErrorBody)))]
pub async fn verify(
    State(a): State<Agent>,
    ApiPath((pool, vol)): ApiPath<(String, String)>,
) -> ApiResult<Json<Vec<VerifyReport>>> {
    Ok(Json(a.verify_volume(&pool, &vol).await?))
}

#[utoipa::path(post, path = "/api/v1/pools/{pool}/volumes/{volume}/replication/disconnect", tag = "replication",
    params(("pool" = String, Path), ("volume" = String, Path)),
    responses((status = 204, description = "Replication switched off; the primary writes alone"), (status = 404, body = ApiErrorBody)))]
pub async fn disconnect(
    State(a): State<Agent>,
    ApiPath((pool, vol)): ApiPath<(String, String)>,
) -> ApiResult<StatusCode> {
    a.set_volume_connected(&pool, &vol, false).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/api/v1/pools/{pool}/volumes/{volume}/replication/connect", tag = "replication",
    params(("pool" = String, Path), ("volume" = String, Path)),
    responses((status = 204, description = "Replication switched on again"), (status = 404, body = ApiErrorBody)))]
pub async fn connect(
    State(a): State<Agent>,
    ApiPath((pool, vol)): ApiPath<(String, String)>,
) -> ApiResult<StatusCode> {
    a.set_volume_connected(&pool, &vol, true).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Ends a split brain: the copy of `keep` survives, the others are kept aside as files
/// and synced in full.
#[utoipa::path(post, path = "/api/v1/pools/{pool}/volumes/{volume}/replication/resolve", tag = "replication",
    params(("pool" = String, Path), ("volume" = String, Path)), request_body = ResolveRequest,
    responses((status = 200, body = ReplicationStatus), (status = 400, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
pub async fn resolve(
    State(a): State<Agent>,
    ApiPath((pool, vol)): ApiPath<(String, String)>,
    ApiJson(req): ApiJson<ResolveRequest>,
) -> ApiResult<Json<ReplicationStatus>> {
    Ok(Json(a.resolve_volume(&pool, &vol, &req.keep).await?))
}

/// Host to host: define a replicated pool here.
#[utoipa::path(post, path = "/api/v1/replication/pools", tag = "replication", request_body = PoolSpec,
    responses((status = 204, description = "Defined"), (status = 409, body = ApiErrorBody)))]
pub async fn define_pool(
    State(a): State<Agent>,
    ApiJson(spec): ApiJson<PoolSpec>,
) -> ApiResult<StatusCode> {
    a.define_pool(&spec).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Host to host: drop a replicated pool's definition here.
#[utoipa::path(post, path = "/api/v1/replication/pools/{pool}/delete", tag = "replication",
    params(("pool" = String, Path)), responses((status = 204, description = "Removed")))]
pub async fn undefine_pool(
    State(a): State<Agent>,
    ApiPath(pool): ApiPath<String>,
) -> ApiResult<StatusCode> {
    a.undefine_pool(&pool).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Host to host: make this host's copy of a volume.
#[utoipa::path(post, path = "/api/v1/replication/copies", tag = "replication", request_body = LocalCopy,
    responses((status = 204, description = "Copy made"), (status = 409, body = ApiErrorBody)))]
pub async fn create_copy(
    State(a): State<Agent>,
    ApiJson(copy): ApiJson<LocalCopy>,
) -> ApiResult<StatusCode> {
    a.local_copy_create(copy).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Host to host: this host's copy.
#[utoipa::path(get, path = "/api/v1/replication/copies/{pool}/{volume}", tag = "replication",
    params(("pool" = String, Path), ("volume" = String, Path)),
    responses((status = 200, body = ReplicaStatus), (status = 404, body = ApiErrorBody)))]
pub async fn copy_status(
    State(a): State<Agent>,
    ApiPath((pool, vol)): ApiPath<(String, String)>,
) -> ApiResult<Json<ReplicaStatus>> {
    Ok(Json(a.local_copy_status(&pool, &vol)?))
}

/// Host to host: delete this host's copy.
#[utoipa::path(post, path = "/api/v1/replication/copies/{pool}/{volume}/delete", tag = "replication",
    params(("pool" = String, Path), ("volume" = String, Path)),
    responses((status = 204, description = "Deleted"), (status = 409, body = ApiErrorBody)))]
pub async fn delete_copy(
    State(a): State<Agent>,
    ApiPath((pool, vol)): ApiPath<(String, String)>,
) -> ApiResult<StatusCode> {
    a.local_copy_delete(&pool, &vol).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GrowRequest {
    pub size: u64,
}

/// Host to host: grow this host's copy.
#[utoipa::path(post, path = "/api/v1/replication/copies/{pool}/{volume}/grow", tag = "replication",
    params(("pool" = String, Path), ("volume" = String, Path)), request_body = GrowRequest,
    responses((status = 204, description = "Grown"), (status = 409, body = ApiErrorBody)))]
pub async fn grow_copy(
    State(a): State<Agent>,
    ApiPath((pool, vol)): ApiPath<(String, String)>,
    ApiJson(req): ApiJson<GrowRequest>,
) -> ApiResult<StatusCode> {
    a.local_copy_grow(&pool, &vol, req.size)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Host to host: keep this host's copy aside and start over empty (split-brain loser).
#[utoipa::path(post, path = "/api/v1/replication/copies/{pool}/{volume}/discard", tag = "replication",
    params(("pool" = String, Path), ("volume" = String, Path)),
    responses((status = 200, description = "Where the old data is kept", body = String), (status = 409, body = ApiErrorBody)))]
pub async fn discard_copy(
    State(a): State<Agent>,
    ApiPath((pool, vol)): ApiPath<(String, String)>,
) -> ApiResult<Json<String>> {
    Ok(Json(a.local_copy_discard(&pool, &vol)?))
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StandaloneRequest {
    pub on: bool,
}

/// Host to host: switch replication of this host's copy off or on.
#[utoipa::path(post, path = "/api/v1/replication/copies/{pool}/{volume}/standalone", tag = "replication",
    params(("pool" = String, Path), ("volume" = String, Path)), request_body = StandaloneRequest,
    responses((status = 204, description = "Switched"), (status = 404, body = ApiErrorBody)))]
pub async fn standalone_copy(
    State(a): State<Agent>,
    ApiPath((pool, vol)): ApiPath<(String, String)>,
    ApiJson(req): ApiJson<StandaloneRequest>,
) -> ApiResult<StatusCode> {
    a.local_copy_standalone(&pool, &vol, req.on)?;
    Ok(StatusCode::NO_CONTENT)
}
