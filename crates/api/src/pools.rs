//! `/api/v1/pools` and their volumes; `/api/v1/bridges`.

use crate::error::{ApiError, ApiJson, ApiPath, ApiResult};
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use ferry_agent::Agent;
use ferry_types::{
    ApiErrorBody, Pool, PoolSpec, TaskAccepted, Volume, VolumeCreate, VolumeImport, VolumeResize,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[utoipa::path(get, path = "/api/v1/pools", tag = "storage", responses((status = 200, body = Vec<Pool>)))]
pub async fn list_pools(State(a): State<Agent>) -> ApiResult<Json<Vec<Pool>>> {
    Ok(Json(a.list_pools().await?))
}

#[utoipa::path(post, path = "/api/v1/pools", tag = "storage", request_body = PoolSpec,
    responses((status = 201, body = Pool), (status = 400, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
pub async fn create_pool(
    State(a): State<Agent>,
    ApiJson(spec): ApiJson<PoolSpec>,
) -> ApiResult<(StatusCode, Json<Pool>)> {
    Ok((StatusCode::CREATED, Json(a.create_pool(spec).await?)))
}

#[utoipa::path(get, path = "/api/v1/pools/{pool}", tag = "storage",
    params(("pool" = String, Path)), responses((status = 200, body = Pool), (status = 404, body = ApiErrorBody)))]
pub async fn get_pool(
    State(a): State<Agent>,
    ApiPath(pool): ApiPath<String>,
) -> ApiResult<Json<Pool>> {
    Ok(Json(a.get_pool(&pool).await?))
}

#[utoipa::path(delete, path = "/api/v1/pools/{pool}", tag = "storage",
    params(("pool" = String, Path)),
    responses((status = 204, description = "Definition removed; files stay"), (status = 409, body = ApiErrorBody)))]
pub async fn delete_pool(
    State(a): State<Agent>,
    ApiPath(pool): ApiPath<String>,
) -> ApiResult<StatusCode> {
    a.delete_pool(&pool).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/pools/{pool}/volumes", tag = "storage",
    params(("pool" = String, Path)), responses((status = 200, body = Vec<Volume>)))]
pub async fn list_volumes(
    State(a): State<Agent>,
    ApiPath(pool): ApiPath<String>,
) -> ApiResult<Json<Vec<Volume>>> {
    Ok(Json(a.list_volumes(&pool).await?))
}

#[utoipa::path(post, path = "/api/v1/pools/{pool}/volumes", tag = "storage", request_body = VolumeCreate,
    params(("pool" = String, Path)),
    responses((status = 201, body = Volume), (status = 400, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
pub async fn create_volume(
    State(a): State<Agent>,
    ApiPath(pool): ApiPath<String>,
    ApiJson(req): ApiJson<VolumeCreate>,
) -> ApiResult<(StatusCode, Json<Volume>)> {
    Ok((
        StatusCode::CREATED,
        Json(a.create_volume(&pool, req).await?),
    ))
}

#[utoipa::path(post, path = "/api/v1/pools/{pool}/import", tag = "storage", request_body = VolumeImport,
    params(("pool" = String, Path)),
    responses((status = 202, description = "Import task started", body = TaskAccepted), (status = 400, body = ApiErrorBody)))]
pub async fn import_volume(
    State(a): State<Agent>,
    ApiPath(pool): ApiPath<String>,
    ApiJson(req): ApiJson<VolumeImport>,
) -> ApiResult<(StatusCode, Json<TaskAccepted>)> {
    let task = a.import_volume(&pool, req).await?;
    Ok((StatusCode::ACCEPTED, Json(TaskAccepted { task })))
}

#[utoipa::path(put, path = "/api/v1/pools/{pool}/upload/{volume}", tag = "storage",
    params(("pool" = String, Path), ("volume" = String, Path), ferry_types::UploadParams),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "A piece of the image or ISO"),
    responses((status = 200, description = "Received; with `task` when this was the last piece and the import started", body = ferry_types::UploadStatus),
              (status = 400, description = "Larger than the pool's room", body = ApiErrorBody),
              (status = 409, description = "The volume exists, another upload to it runs, or the offset is not what was received", body = ApiErrorBody)))]
pub async fn upload_volume(
    State(a): State<Agent>,
    ApiPath((pool, volume)): ApiPath<(String, String)>,
    crate::error::ApiQuery(q): crate::error::ApiQuery<ferry_types::UploadParams>,
    body: axum::body::Body,
) -> ApiResult<Json<ferry_types::UploadStatus>> {
    use futures::StreamExt;
    use tokio::io::AsyncWriteExt;
    let offset = q.offset.unwrap_or(0);
    let mut up = a.upload_piece(&pool, &volume, offset).await?;
    let io =
        |what: String| move |source: std::io::Error| ferry_agent::AgentError::Io { what, source };
    let mut got = offset;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        // a broken piece keeps what arrived: the client goes on from there
        let chunk = chunk
            .map_err(|e| io("Receive the upload".into())(std::io::Error::other(e.to_string())))?;
        if (got - offset).saturating_add(chunk.len() as u64) > up.room {
            return Err(ferry_agent::AgentError::invalid(
                "body",
                format!(
                    "the upload is larger than the {} bytes pool {pool} has room for",
                    up.room
                ),
            )
            .into());
        }
        got += chunk.len() as u64;
        up.file
            .write_all(&chunk)
            .await
            .map_err(io(format!("Write {}", up.path.display())))?;
    }
    up.file
        .sync_all()
        .await
        .map_err(io(format!("Sync {}", up.path.display())))?;
    drop(up);
    let task = if q.last.unwrap_or(true) {
        Some(a.upload_finish(&pool, &volume, q.format).await?)
    } else {
        None
    };
    Ok(Json(ferry_types::UploadStatus {
        received: got,
        task,
    }))
}

#[utoipa::path(get, path = "/api/v1/pools/{pool}/upload/{volume}", tag = "storage",
    params(("pool" = String, Path), ("volume" = String, Path)),
    responses((status = 200, description = "How much of an unfinished upload is held (0: none)", body = ferry_types::UploadStatus),
              (status = 409, body = ApiErrorBody)))]
pub async fn upload_status(
    State(a): State<Agent>,
    ApiPath((pool, volume)): ApiPath<(String, String)>,
) -> ApiResult<Json<ferry_types::UploadStatus>> {
    let received = a.upload_received(&pool, &volume).await?;
    Ok(Json(ferry_types::UploadStatus {
        received,
        task: None,
    }))
}

#[utoipa::path(delete, path = "/api/v1/pools/{pool}/upload/{volume}", tag = "storage",
    params(("pool" = String, Path), ("volume" = String, Path)),
    responses((status = 204, description = "The unfinished upload is gone"), (status = 409, body = ApiErrorBody)))]
pub async fn upload_discard(
    State(a): State<Agent>,
    ApiPath((pool, volume)): ApiPath<(String, String)>,
) -> ApiResult<StatusCode> {
    a.upload_discard(&pool, &volume).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/api/v1/pools/{pool}/download", tag = "storage", request_body = ferry_types::VolumeDownload,
    params(("pool" = String, Path)),
    responses((status = 202, description = "Download task started", body = TaskAccepted),
              (status = 400, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
pub async fn download_volume(
    State(a): State<Agent>,
    ApiPath(pool): ApiPath<String>,
    ApiJson(req): ApiJson<ferry_types::VolumeDownload>,
) -> ApiResult<(StatusCode, Json<TaskAccepted>)> {
    let task = a.download_volume(&pool, req).await?;
    Ok((StatusCode::ACCEPTED, Json(TaskAccepted { task })))
}

#[utoipa::path(post, path = "/api/v1/pools/{pool}/import-ova", tag = "storage", request_body = ferry_types::OvaImport,
    params(("pool" = String, Path)),
    responses((status = 202, description = "Import task started: its result names the VM, its disks and what was not mapped", body = TaskAccepted),
              (status = 400, description = "Not an OVA, a descriptor ferry refuses (the reason), or no bridge for its NICs", body = ApiErrorBody),
              (status = 409, body = ApiErrorBody)))]
pub async fn import_ova(
    State(a): State<Agent>,
    ApiPath(pool): ApiPath<String>,
    ApiJson(req): ApiJson<ferry_types::OvaImport>,
) -> ApiResult<(StatusCode, Json<TaskAccepted>)> {
    let task = a.import_ova(&pool, req).await?;
    Ok((StatusCode::ACCEPTED, Json(TaskAccepted { task })))
}

#[utoipa::path(get, path = "/api/v1/pools/{pool}/volumes/{volume}", tag = "storage",
    params(("pool" = String, Path), ("volume" = String, Path)),
    responses((status = 200, body = Volume), (status = 404, body = ApiErrorBody)))]
pub async fn get_volume(
    State(a): State<Agent>,
    ApiPath((pool, vol)): ApiPath<(String, String)>,
) -> ApiResult<Json<Volume>> {
    Ok(Json(a.get_volume(&pool, &vol).await?))
}

#[utoipa::path(delete, path = "/api/v1/pools/{pool}/volumes/{volume}", tag = "storage",
    params(("pool" = String, Path), ("volume" = String, Path)),
    responses((status = 204, description = "Deleted"), (status = 409, description = "Used by a VM", body = ApiErrorBody)))]
pub async fn delete_volume(
    State(a): State<Agent>,
    ApiPath((pool, vol)): ApiPath<(String, String)>,
) -> ApiResult<StatusCode> {
    a.delete_volume(&pool, &vol).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/api/v1/pools/{pool}/volumes/{volume}/resize", tag = "storage", request_body = VolumeResize,
    params(("pool" = String, Path), ("volume" = String, Path)),
    responses((status = 200, description = "Grown (online if a running VM uses it)", body = Volume),
              (status = 400, description = "Shrinking is refused", body = ApiErrorBody)))]
pub async fn resize_volume(
    State(a): State<Agent>,
    ApiPath((pool, vol)): ApiPath<(String, String)>,
    ApiJson(req): ApiJson<VolumeResize>,
) -> ApiResult<Json<Volume>> {
    Ok(Json(a.resize_volume(&pool, &vol, req.size).await?))
}

/// A Linux bridge on the host.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Bridge {
    pub name: String,
}

#[utoipa::path(get, path = "/api/v1/bridges", tag = "network", responses((status = 200, body = Vec<Bridge>)))]
pub async fn list_bridges() -> ApiResult<Json<Vec<Bridge>>> {
    let mut out: Vec<Bridge> = std::fs::read_dir("/sys/class/net")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.path().join("bridge").exists())
                .filter_map(|e| e.file_name().into_string().ok())
                .map(|name| Bridge { name })
                .collect()
        })
        .unwrap_or_default();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Json(out))
}

#[utoipa::path(post, path = "/api/v1/bridges", tag = "network", request_body = Bridge,
    responses((status = 201, description = "Created (or already a bridge)", body = Bridge),
              (status = 400, body = ApiErrorBody), (status = 409, description = "Name used by a non-bridge", body = ApiErrorBody)))]
pub async fn create_bridge(
    State(a): State<Agent>,
    ApiJson(b): ApiJson<Bridge>,
) -> ApiResult<(StatusCode, Json<Bridge>)> {
    let mut e = ferry_types::ValidationErrors::default();
    ferry_types::validate::check_ifname(&mut e, "name", &b.name);
    e.into_result().map_err(ferry_agent::AgentError::from)?;
    if ferry_net::link_exists(&b.name) && !ferry_net::bridge_exists(&b.name) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("{} exists and is not a bridge", b.name),
        ));
    }
    ferry_net::create_bridge(&b.name)
        .await
        .map_err(ferry_agent::AgentError::from)?;
    a.events()
        .emit(None, "network", format!("bridge {} created", b.name));
    Ok((StatusCode::CREATED, Json(b)))
}
