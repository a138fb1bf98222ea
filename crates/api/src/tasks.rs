//! `/api/v1/tasks`, `/api/v1/events`, `/api/v1/host`, the metrics history for graphs.

use crate::error::{ApiError, ApiPath, ApiQuery, ApiResult};
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use ferry_agent::Agent;
use ferry_types::{ApiErrorBody, Event, HostInfo, HostLoads, MetricsHistory, Task};
use serde::Deserialize;

#[utoipa::path(get, path = "/api/v1/tasks", tag = "tasks", responses((status = 200, description = "Newest first", body = Vec<Task>)))]
pub async fn list_tasks(State(a): State<Agent>) -> Json<Vec<Task>> {
    Json(a.tasks().list())
}

#[utoipa::path(get, path = "/api/v1/tasks/{id}", tag = "tasks", params(("id" = String, Path)),
    responses((status = 200, body = Task), (status = 404, body = ApiErrorBody)))]
pub async fn get_task(
    State(a): State<Agent>,
    axum::Extension(caller): axum::Extension<crate::Caller>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Task>> {
    let missing = || ApiError::new(StatusCode::NOT_FOUND, format!("Task {id} not found"));
    let t = a.tasks().get(&id).ok_or_else(missing)?;
    // A user sees its own tasks, and those it may audit (a VM's, or all from `/`);
    // another's task answers as if there were none.
    if let Some(user) = caller.restricted_user() {
        let mine = t.user.as_deref() == Some(user);
        if !mine {
            let acl = a.acl().await?;
            let on = if t.kind.starts_with("vm.") {
                format!("/vms/{}", t.target)
            } else {
                "/".to_string()
            };
            if !ferry_access::allows(&acl, user, ferry_access::Privilege::Audit, &on) {
                return Err(missing());
            }
        }
    }
    Ok(Json(t))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EventQuery {
    /// Only events with a larger sequence number.
    #[serde(default)]
    #[param(maximum = 9007199254740991_u64)]
    pub after: u64,
    /// Only events of this VM.
    pub vm: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/events", tag = "events", params(EventQuery),
    responses((status = 200, description = "Kept events, oldest first", body = Vec<Event>)))]
pub async fn list_events(
    State(a): State<Agent>,
    ApiQuery(q): ApiQuery<EventQuery>,
) -> crate::error::ApiResult<Json<Vec<Event>>> {
    if q.after > MAX_SEQ {
        return Err(crate::ApiError::new(
            axum::http::StatusCode::BAD_REQUEST,
            format!("after: {} is above {MAX_SEQ}", q.after),
        ));
    }
    Ok(Json(a.events().list(q.after, q.vm.as_deref())))
}

/// The largest event number a client may name (what JSON numbers hold exactly).
const MAX_SEQ: u64 = 9007199254740991;

#[utoipa::path(get, path = "/api/v1/host", tag = "host", responses((status = 200, body = HostInfo)))]
pub async fn host(State(a): State<Agent>) -> ApiResult<Json<HostInfo>> {
    let mut info = a.host_info().await?;
    info.migrations = a.migrations().in_flight();
    Ok(Json(info))
}

#[utoipa::path(get, path = "/api/v1/host/metrics", tag = "host",
    responses((status = 200, description = "The last hour of this host's load (10 s samples)", body = MetricsHistory)))]
pub async fn host_metrics(State(a): State<Agent>) -> Json<MetricsHistory> {
    Json(a.host_history())
}

#[utoipa::path(get, path = "/api/v1/host/loads", tag = "host",
    responses((status = 200, description = "Each running VM's load as this host measured it last (DRS asks every host when it balances)", body = HostLoads)))]
pub async fn host_loads(State(a): State<Agent>) -> Json<HostLoads> {
    Json(a.host_loads())
}

#[utoipa::path(get, path = "/api/v1/vms/{name}/metrics", tag = "vms",
    params(("name" = String, Path, description = "VM name")),
    responses((status = 200, description = "The last hour of the VM's load (10 s samples, while running)", body = MetricsHistory),
              (status = 404, body = ApiErrorBody)))]
pub async fn vm_metrics(
    State(a): State<Agent>,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<Json<MetricsHistory>> {
    Ok(Json(a.vm_history(&name).await?))
}
