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
    let mut list = a.list_snapshots(&name).await?;
    list.snapshots = list.snapshots.into_iter().map(|s| s.redacted()).collect();
    Ok(Json(list))
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
    on_snapshot(&a, name, snap, "vm.revert", |agent, n, s, ctx| async move {
        agent.revert_snapshot(&n, &s, Some(&ctx)).await
    })
    .await
}

/// Checks that the snapshot exists (404 at once), then runs `f` on it as a task.
async fn on_snapshot<F, Fut>(
    a: &Agent,
    name: String,
    snap: String,
    kind: &'static str,
    f: F,
) -> ApiResult<Accepted>
where
    F: FnOnce(Agent, String, String, ferry_agent::TaskCtx) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ferry_agent::Result<()>> + Send + 'static,
{
    let list = a.list_snapshots(&name).await?;
    if !list.snapshots.iter().any(|s| s.name == snap) {
        return Err(AgentError::NotFound(format!("Snapshot {snap} of {name}")).into());
    }
    let agent = a.clone();
    let n = name.clone();
    Ok(accepted(
        a.tasks()
            .spawn(kind, &name, move |ctx| f(agent, n, snap, ctx)),
    ))
}

#[utoipa::path(delete, path = "/api/v1/vms/{name}/snapshots/{snapshot}", tag = "snapshots",
    params(("name" = String, Path, description = "VM name"), ("snapshot" = String, Path)),
    responses((status = 202, description = "Delete task started", body = TaskAccepted), (status = 404, body = ApiErrorBody)))]
pub async fn delete_snapshot(
    State(a): State<Agent>,
    ApiPath((name, snap)): ApiPath<(String, String)>,
) -> ApiResult<Accepted> {
    on_snapshot(
        &a,
        name,
        snap,
        "vm.snapshot-delete",
        |agent, n, s, ctx| async move { agent.delete_snapshot(&n, &s, Some(&ctx)).await },
    )
    .await
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
