//! Snapshots, clones, templates, suspend: `/api/v1/vms/{name}/...`.

use crate::error::{ApiJson, ApiPath, ApiResult};
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use ferry_agent::{Agent, AgentError};
use ferry_types::{
    ApiErrorBody, CloneRequest, SnapshotCreate, SnapshotList, TaskAccepted, Vm, VmAction,
};

type Accepted = (StatusCode, Json<TaskAccepted>);

fn accepted(task: String) -> Accepted {
    (StatusCode::ACCEPTED, Json(TaskAccepted { task }))
}

#[utoipa::path(get, path = "/api/v1/vms/{name}/snapshots", tag = "snapshots",
    params(("name" = String, Path, description = "VM name")),
    responses((status = 200, description = "Snapshots, parents first, and the current one", body = SnapshotList),
              (status = 404, body = ApiErrorBody)))]
pub async fn list_snapshots(
    State(a): State<Agent>,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<Json<SnapshotList>> {
    Ok(Json(a.list_snapshots(&name).await?))
}

#[utoipa::path(post, path = "/api/v1/vms/{name}/snapshots", tag = "snapshots", request_body = SnapshotCreate,
    params(("name" = String, Path, description = "VM name")),
    responses((status = 202, description = "Snapshot task started", body = TaskAccepted),
              (status = 400, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
pub async fn create_snapshot(
    State(a): State<Agent>,
    ApiPath(name): ApiPath<String>,
    ApiJson(req): ApiJson<SnapshotCreate>,
) -> ApiResult<Accepted> {
    let vm = a.get_vm(&name).await?;
    vm.state
        .check(VmAction::Snapshot)
        .map_err(AgentError::from)?;
    let agent = a.clone();
    let n = name.clone();
    Ok(accepted(a.tasks().spawn(
        "vm.snapshot",
        &name,
        move |ctx| async move { agent.create_snapshot(&n, req, Some(&ctx)).await.map(|_| ()) },
    )))
}

#[utoipa::path(post, path = "/api/v1/vms/{name}/snapshots/{snapshot}/revert", tag = "snapshots",
    params(("name" = String, Path, description = "VM name"), ("snapshot" = String, Path)),
    responses((status = 202, description = "Revert task started", body = TaskAccepted), (status = 404, body = ApiErrorBody)))]
pub async fn revert_snapshot(
    State(a): State<Agent>,
    ApiPath((name, snap)): ApiPath<(String, String)>,
) -> ApiResult<Accepted> {
    let list = a.list_snapshots(&name).await?;
    if !list.snapshots.iter().any(|s| s.name == snap) {
        return Err(AgentError::NotFound(format!("Snapshot {snap} of {name}")).into());
    }
    let agent = a.clone();
    let n = name.clone();
    Ok(accepted(a.tasks().spawn(
        "vm.revert",
        &name,
        move |ctx| async move { agent.revert_snapshot(&n, &snap, Some(&ctx)).await },
    )))
}

#[utoipa::path(delete, path = "/api/v1/vms/{name}/snapshots/{snapshot}", tag = "snapshots",
    params(("name" = String, Path, description = "VM name"), ("snapshot" = String, Path)),
    responses((status = 202, description = "Delete task started", body = TaskAccepted), (status = 404, body = ApiErrorBody)))]
pub async fn delete_snapshot(
    State(a): State<Agent>,
    ApiPath((name, snap)): ApiPath<(String, String)>,
) -> ApiResult<Accepted> {
    let list = a.list_snapshots(&name).await?;
    if !list.snapshots.iter().any(|s| s.name == snap) {
        return Err(AgentError::NotFound(format!("Snapshot {snap} of {name}")).into());
    }
    let agent = a.clone();
    let n = name.clone();
    Ok(accepted(a.tasks().spawn(
        "vm.snapshot-delete",
        &name,
        move |ctx| async move { agent.delete_snapshot(&n, &snap, Some(&ctx)).await },
    )))
}

#[utoipa::path(post, path = "/api/v1/vms/{name}/clone", tag = "snapshots", request_body = CloneRequest,
    params(("name" = String, Path, description = "Source VM or template")),
    responses((status = 202, description = "Clone task started", body = TaskAccepted),
              (status = 400, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
pub async fn clone_vm(
    State(a): State<Agent>,
    ApiPath(name): ApiPath<String>,
    ApiJson(req): ApiJson<CloneRequest>,
) -> ApiResult<Accepted> {
    a.check_clone(&name, &req).await?;
    let agent = a.clone();
    let n = name.clone();
    let target = req.name.clone();
    Ok(accepted(a.tasks().spawn(
        "vm.clone",
        &target,
        move |ctx| async move { agent.clone_vm(&n, req, Some(&ctx)).await },
    )))
}

#[utoipa::path(post, path = "/api/v1/vms/{name}/template", tag = "snapshots",
    params(("name" = String, Path, description = "VM name")),
    responses((status = 200, description = "Now an immutable template", body = Vm), (status = 409, body = ApiErrorBody)))]
pub async fn make_template(
    State(a): State<Agent>,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<Json<Vm>> {
    Ok(Json(a.make_template(&name).await?))
}

#[utoipa::path(post, path = "/api/v1/vms/{name}/suspend", tag = "vms",
    params(("name" = String, Path, description = "VM name")),
    responses((status = 202, description = "Suspend-to-disk task started; resume continues the guest", body = TaskAccepted),
              (status = 409, body = ApiErrorBody)))]
pub async fn suspend_vm(
    State(a): State<Agent>,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<Accepted> {
    let vm = a.get_vm(&name).await?;
    vm.state
        .check(VmAction::Suspend)
        .map_err(AgentError::from)?;
    let agent = a.clone();
    let n = name.clone();
    Ok(accepted(a.tasks().spawn(
        "vm.suspend",
        &name,
        move |ctx| async move { agent.suspend_vm(&n, Some(&ctx)).await },
    )))
}

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
    ApiPath(name): ApiPath<String>,
    ApiJson(disk): ApiJson<ferry_types::DiskSpec>,
) -> ApiResult<(StatusCode, Json<DiskAttached>)> {
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
    ApiPath((name, index)): ApiPath<(String, usize)>,
    ApiJson(media): ApiJson<ferry_types::CdromSpec>,
) -> ApiResult<Json<Vm>> {
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
