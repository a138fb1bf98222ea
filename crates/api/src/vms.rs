//! `/api/v1/vms`: definitions and lifecycle actions (actions are tasks: 202 + task id).

use crate::error::{optional_json, ApiJson, ApiPath, ApiQuery, ApiResult};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::http::{HeaderMap, HeaderValue};
use axum::Json;
use ferry_agent::Agent;
use ferry_types::{
    DeleteVmParams, HaPolicy, ShutdownParams, TaskAccepted, Vm, VmAction, VmListParams, VmSpec,
};
use std::time::Duration;

/// Header of a `GET /api/v1/vms` reply: the rows the filters match, on every page.
pub const TOTAL_COUNT: &str = "x-total-count";
/// Header of a `GET /api/v1/vms` reply with more rows: the `cursor` of the next page.
pub const NEXT_CURSOR: &str = "x-next-cursor";

#[utoipa::path(get, path = "/api/v1/vms", tag = "vms", params(VmListParams),
    responses((status = 200, description = "The VMs of the cluster (of this host alone outside one) the filters match, by name; any host answers for the whole cluster from its cache", body = Vec<Vm>,
        headers(("x-total-count" = usize, description = "Rows the filters match"),
                ("x-next-cursor" = String, description = "The `cursor` of the next page (`name/host`), when there is one"))),
              (status = 400, description = "Invalid filter", body = ferry_types::ApiErrorBody)))]
pub async fn list_vms(
    State(a): State<Agent>,
    ApiQuery(p): ApiQuery<VmListParams>,
) -> ApiResult<(HeaderMap, Json<Vec<Vm>>)> {
    let page = a.list_vms_page(&p).await?;
    let mut h = HeaderMap::new();
    h.insert(TOTAL_COUNT, HeaderValue::from(page.total));
    if let Some(c) = page
        .next_cursor
        .and_then(|c| HeaderValue::from_str(&c).ok())
    {
        h.insert(NEXT_CURSOR, c);
    }
    Ok((h, Json(page.vms)))
}

#[utoipa::path(post, path = "/api/v1/vms", tag = "vms", request_body = VmSpec,
    responses((status = 201, description = "Defined", body = Vm),
              (status = 400, description = "Invalid definition", body = ferry_types::ApiErrorBody),
              (status = 409, description = "Name taken", body = ferry_types::ApiErrorBody)))]
pub async fn create_vm(
    State(a): State<Agent>,
    axum::Extension(caller): axum::Extension<crate::Caller>,
    ApiJson(spec): ApiJson<VmSpec>,
) -> ApiResult<(StatusCode, Json<Vm>)> {
    crate::access::check_spec_pools(&a, &caller, &spec).await?;
    Ok((StatusCode::CREATED, Json(a.create_vm(spec).await?)))
}

#[utoipa::path(get, path = "/api/v1/vms/{name}", tag = "vms",
    params(("name" = String, Path, description = "VM name")),
    responses((status = 200, body = Vm), (status = 404, body = ferry_types::ApiErrorBody)))]
pub async fn get_vm(State(a): State<Agent>, ApiPath(name): ApiPath<String>) -> ApiResult<Json<Vm>> {
    Ok(Json(a.get_vm(&name).await?))
}

#[utoipa::path(put, path = "/api/v1/vms/{name}", tag = "vms", request_body = VmSpec,
    params(("name" = String, Path, description = "VM name")),
    responses((status = 200, description = "Definition replaced (the VM must be stopped, unless only its startup policy or description changes)", body = Vm),
              (status = 400, body = ferry_types::ApiErrorBody), (status = 409, body = ferry_types::ApiErrorBody)))]
pub async fn put_vm(
    State(a): State<Agent>,
    axum::Extension(caller): axum::Extension<crate::Caller>,
    ApiPath(name): ApiPath<String>,
    ApiJson(spec): ApiJson<VmSpec>,
) -> ApiResult<Json<Vm>> {
    crate::access::check_spec_pools(&a, &caller, &spec).await?;
    Ok(Json(a.edit_vm(&name, spec).await?))
}

#[utoipa::path(put, path = "/api/v1/vms/{name}/ha", tag = "vms", request_body = HaPolicy,
    params(("name" = String, Path, description = "VM name")),
    responses((status = 200, description = "HA policy changed (in any state)", body = Vm),
              (status = 400, body = ferry_types::ApiErrorBody)))]
pub async fn put_vm_ha(
    State(a): State<Agent>,
    ApiPath(name): ApiPath<String>,
    ApiJson(ha): ApiJson<HaPolicy>,
) -> ApiResult<Json<Vm>> {
    Ok(Json(a.set_ha(&name, ha).await?))
}

#[utoipa::path(delete, path = "/api/v1/vms/{name}", tag = "vms",
    params(("name" = String, Path, description = "VM name"), DeleteVmParams),
    responses((status = 204, description = "Deleted"),
              (status = 409, description = "Running and not forced", body = ferry_types::ApiErrorBody)))]
pub async fn delete_vm(
    State(a): State<Agent>,
    ApiPath(name): ApiPath<String>,
    ApiQuery(p): ApiQuery<DeleteVmParams>,
) -> ApiResult<StatusCode> {
    a.delete_vm(&name, p).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Checks existence and state now (so a bad request is a 4xx, not a failed task), then
/// runs the action as a task.
async fn action<F, Fut>(
    a: &Agent,
    name: &str,
    act: VmAction,
    kind: &'static str,
    f: F,
) -> ApiResult<(StatusCode, Json<TaskAccepted>)>
where
    F: FnOnce(Agent, String, ferry_agent::TaskCtx) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ferry_agent::Result<()>> + Send + 'static,
{
    let vm = a.get_vm(name).await?;
    vm.state.check(act).map_err(ferry_agent::AgentError::from)?;
    if act == VmAction::Start {
        // Resource pool limits and HA admission control answer now, with the reason.
        a.admit_start(name).await?;
    }
    let agent = a.clone();
    let n = name.to_string();
    let task = a.tasks().spawn(kind, name, move |ctx| async move {
        ctx.log(format!("{kind} {n}"));
        f(agent, n, ctx).await
    });
    Ok((StatusCode::ACCEPTED, Json(TaskAccepted { task })))
}

macro_rules! vm_action {
    ($fn:ident, $path:literal, $act:expr, $kind:literal, $doc:literal, |$ag:ident, $n:ident, $ctx:pat_param| $body:expr) => {
        #[doc = $doc]
        #[utoipa::path(post, path = $path, tag = "vms",
            params(("name" = String, Path, description = "VM name")),
            responses((status = 202, description = "Task started", body = TaskAccepted),
                      (status = 404, body = ferry_types::ApiErrorBody),
                      (status = 409, description = "Not allowed in the VM's state", body = ferry_types::ApiErrorBody)))]
        pub async fn $fn(State(a): State<Agent>, ApiPath(name): ApiPath<String>) -> ApiResult<(StatusCode, Json<TaskAccepted>)> {
            action(&a, &name, $act, $kind, |$ag, $n, $ctx| async move { $body }).await
        }
    };
}

vm_action!(
    start_vm,
    "/api/v1/vms/{name}/start",
    VmAction::Start,
    "vm.start",
    "Start the VM (in DRS automatic mode on the host placement picks when this one cannot run it).",
    |a, n, ctx| a.start_placed(&n, &ctx).await
);
vm_action!(
    stop_vm,
    "/api/v1/vms/{name}/stop",
    VmAction::Stop,
    "vm.stop",
    "Hard stop (QEMU quits at once).",
    |a, n, _| a.stop_vm(&n).await
);
vm_action!(
    pause_vm,
    "/api/v1/vms/{name}/pause",
    VmAction::Pause,
    "vm.pause",
    "Pause the vCPUs.",
    |a, n, _| a.pause_vm(&n).await
);
vm_action!(
    resume_vm,
    "/api/v1/vms/{name}/resume",
    VmAction::Resume,
    "vm.resume",
    "Resume a paused VM.",
    |a, n, _| a.resume_vm(&n).await
);

#[utoipa::path(post, path = "/api/v1/vms/{name}/shutdown", tag = "vms", request_body(content = ShutdownParams, description = "Optional"),
    params(("name" = String, Path, description = "VM name")),
    responses((status = 202, description = "Task started: ACPI power button, QEMU killed after the timeout", body = TaskAccepted),
              (status = 409, body = ferry_types::ApiErrorBody)))]
pub async fn shutdown_vm(
    State(a): State<Agent>,
    ApiPath(name): ApiPath<String>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<TaskAccepted>)> {
    let t = optional_json::<ShutdownParams>(&body)?
        .and_then(|b| b.timeout_secs)
        .map(Duration::from_secs);
    action(
        &a,
        &name,
        VmAction::Shutdown,
        "vm.shutdown",
        move |a, n, _| async move { a.shutdown_vm(&n, t).await.map(|_| ()) },
    )
    .await
}

#[utoipa::path(post, path = "/api/v1/vms/{name}/reboot", tag = "vms", request_body(content = ShutdownParams, description = "Optional"),
    params(("name" = String, Path, description = "VM name")),
    responses((status = 202, description = "Task started: shutdown (killed after the timeout), then start", body = TaskAccepted),
              (status = 409, body = ferry_types::ApiErrorBody)))]
pub async fn reboot_vm(
    State(a): State<Agent>,
    ApiPath(name): ApiPath<String>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<TaskAccepted>)> {
    let t = optional_json::<ShutdownParams>(&body)?
        .and_then(|b| b.timeout_secs)
        .map(Duration::from_secs);
    action(
        &a,
        &name,
        VmAction::Reboot,
        "vm.reboot",
        move |a, n, _| async move { a.reboot_vm(&n, t).await },
    )
    .await
}

#[utoipa::path(get, path = "/api/v1/vms/{name}/agent", tag = "vms",
    params(("name" = String, Path, description = "VM name")),
    responses((status = 200, description = "What the guest agent says (from inside the guest: shown, never trusted)", body = ferry_types::GuestInfo),
              (status = 409, description = "The VM is not running, has no agent channel (`unsupported`), or its agent does not answer (`guest`)", body = ferry_types::ApiErrorBody)))]
pub async fn guest_agent(
    State(a): State<Agent>,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<Json<ferry_types::GuestInfo>> {
    Ok(Json(a.guest_info(&name).await?))
}

#[utoipa::path(get, path = "/api/v1/vms/{name}/console/history", tag = "vms",
    params(("name" = String, Path, description = "VM name")),
    responses((status = 200, description = "The serial console output kept so far", body = String, content_type = "text/plain"),
              (status = 409, body = ferry_types::ApiErrorBody)))]
pub async fn console_history(
    State(a): State<Agent>,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<String> {
    a.get_vm(&name).await?;
    let c = a.console(&name)?;
    Ok(String::from_utf8_lossy(&c.history()).into_owned())
}
