//! Devices of a VM, also while it runs: disks and NICs attached/detached, CD-ROM media.

use crate::error::{ApiJson, ApiPath, ApiResult};
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use ferry_agent::Agent;
use ferry_types::{ApiErrorBody, DiskMove, TaskAccepted, Vm};

/// The index of an attached disk.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct DiskAttached {
    pub index: usize,
}

#[utoipa::path(post, path = "/api/v1/vms/{name}/disks", tag = "vms", request_body = ferry_types::DiskSpec,
    params(("name" = String, Path, description = "VM name")),
    responses((status = 201, description = "Attached (hot-plugged if running: virtio or scsi)", body = DiskAttached),
              (status = 400, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
pub async fn attach_disk(
    State(a): State<Agent>,
    axum::Extension(caller): axum::Extension<crate::Caller>,
    ApiPath(name): ApiPath<String>,
    ApiJson(disk): ApiJson<ferry_types::DiskSpec>,
) -> ApiResult<(StatusCode, Json<DiskAttached>)> {
    crate::access::check_pool_use(&a, &caller, &[disk.pool.as_str()], &[]).await?;
    let index = a.attach_disk(&name, disk).await?;
    Ok((StatusCode::CREATED, Json(DiskAttached { index })))
}

#[utoipa::path(delete, path = "/api/v1/vms/{name}/disks/{index}", tag = "vms",
    params(("name" = String, Path, description = "VM name"), ("index" = usize, Path)),
    responses((status = 204, description = "Detached; the volume stays"), (status = 409, body = ApiErrorBody)))]
pub async fn detach_disk(
    State(a): State<Agent>,
    ApiPath((name, index)): ApiPath<(String, usize)>,
) -> ApiResult<StatusCode> {
    a.detach_disk(&name, index).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(put, path = "/api/v1/vms/{name}/cdroms/{index}", tag = "vms", request_body = ferry_types::CdromSpec,
    params(("name" = String, Path, description = "VM name"), ("index" = usize, Path)),
    responses((status = 200, description = "Medium changed (pool+volume) or ejected (neither), also while running", body = Vm),
              (status = 404, body = ApiErrorBody)))]
pub async fn change_cdrom(
    State(a): State<Agent>,
    axum::Extension(caller): axum::Extension<crate::Caller>,
    ApiPath((name, index)): ApiPath<(String, usize)>,
    ApiJson(media): ApiJson<ferry_types::CdromSpec>,
) -> ApiResult<Json<Vm>> {
    let isos: Vec<&str> = media.pool.as_deref().into_iter().collect();
    crate::access::check_pool_use(&a, &caller, &[], &isos).await?;
    a.change_cdrom(&name, index, media).await?;
    Ok(Json(a.get_vm(&name).await?))
}

/// The index of an attached NIC.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct NicAttached {
    pub index: usize,
}

#[utoipa::path(post, path = "/api/v1/vms/{name}/nics", tag = "vms", request_body = ferry_types::NicSpec,
    params(("name" = String, Path, description = "VM name")),
    responses((status = 201, description = "Attached (hot-plugged with its tap if running)", body = NicAttached),
              (status = 400, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
pub async fn attach_nic(
    State(a): State<Agent>,
    ApiPath(name): ApiPath<String>,
    ApiJson(nic): ApiJson<ferry_types::NicSpec>,
) -> ApiResult<(StatusCode, Json<NicAttached>)> {
    let index = a.attach_nic(&name, nic).await?;
    Ok((StatusCode::CREATED, Json(NicAttached { index })))
}

#[utoipa::path(delete, path = "/api/v1/vms/{name}/nics/{index}", tag = "vms",
    params(("name" = String, Path, description = "VM name"), ("index" = usize, Path)),
    responses((status = 204, description = "Detached"), (status = 409, body = ApiErrorBody)))]
pub async fn detach_nic(
    State(a): State<Agent>,
    ApiPath((name, index)): ApiPath<(String, usize)>,
) -> ApiResult<StatusCode> {
    a.detach_nic(&name, index).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/api/v1/vms/{name}/disks/{index}/move", tag = "vms", request_body = DiskMove,
    params(("name" = String, Path, description = "VM name"), ("index" = usize, Path)),
    responses((status = 202, description = "Move task started (mirror while running, copy while stopped)", body = TaskAccepted),
              (status = 400, body = ApiErrorBody), (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
pub async fn move_disk(
    State(a): State<Agent>,
    axum::Extension(caller): axum::Extension<crate::Caller>,
    ApiPath((name, index)): ApiPath<(String, usize)>,
    ApiJson(req): ApiJson<DiskMove>,
) -> ApiResult<(StatusCode, Json<TaskAccepted>)> {
    crate::access::check_pool_use(&a, &caller, &[req.pool.as_str()], &[]).await?;
    let vm = a.get_vm(&name).await?;
    if index >= vm.spec.disks.len() {
        return Err(ferry_agent::AgentError::NotFound(format!("disk{index} of {name}")).into());
    }
    a.get_pool(&req.pool).await?;
    let agent = a.clone();
    let n = name.clone();
    let task = a
        .tasks()
        .spawn("vm.move-disk", &name, move |ctx| async move {
            agent.migrations().move_disk(&n, index, &req, &ctx).await
        });
    Ok((StatusCode::ACCEPTED, Json(TaskAccepted { task })))
}

#[utoipa::path(delete, path = "/api/v1/vms/{name}/disks/{index}/move", tag = "vms",
    params(("name" = String, Path, description = "VM name"), ("index" = usize, Path)),
    responses((status = 204, description = "The running move was aborted; the disk stays where it was"),
              (status = 409, body = ApiErrorBody)))]
pub async fn abort_move_disk(
    State(a): State<Agent>,
    ApiPath((name, index)): ApiPath<(String, usize)>,
) -> ApiResult<StatusCode> {
    a.migrations().abort_move_disk(&name, index).await?;
    Ok(StatusCode::NO_CONTENT)
}
