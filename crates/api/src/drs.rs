//! `/api/v1/drs`: DRS status, plans, applying them and the settings; placement of VMs;
//! `/api/v1/resource-pools`: the resource pool hierarchy.

use crate::error::{ApiJson, ApiPath, ApiResult};
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use ferry_agent::Agent;
use ferry_types::{
    ApiErrorBody, DrsConfig, DrsMove, DrsPlan, DrsStatus, PlacementReport, ResourcePool, Vm, VmSpec,
};

#[utoipa::path(get, path = "/api/v1/drs", tag = "drs",
    responses((status = 200, description = "Settings, the manager's last plan, moves under way, HA admission", body = DrsStatus)))]
pub async fn drs_status(State(a): State<Agent>) -> ApiResult<Json<DrsStatus>> {
    Ok(Json(a.drs_status().await?))
}

#[utoipa::path(get, path = "/api/v1/drs/plan", tag = "drs",
    responses((status = 200, description = "A balancing plan computed now (nothing is moved)", body = DrsPlan)))]
pub async fn drs_plan(State(a): State<Agent>) -> ApiResult<Json<DrsPlan>> {
    Ok(Json(a.drs_plan().await?))
}

#[utoipa::path(post, path = "/api/v1/drs/apply", tag = "drs",
    responses((status = 200, description = "The live migrations started (within the limits)", body = Vec<DrsMove>)))]
pub async fn drs_apply(State(a): State<Agent>) -> ApiResult<Json<Vec<DrsMove>>> {
    Ok(Json(a.drs_apply().await?))
}

#[utoipa::path(get, path = "/api/v1/drs/config", tag = "drs",
    responses((status = 200, body = DrsConfig)))]
pub async fn get_drs_config(State(a): State<Agent>) -> ApiResult<Json<DrsConfig>> {
    Ok(Json(a.drs_config().await?))
}

#[utoipa::path(put, path = "/api/v1/drs/config", tag = "drs", request_body = DrsConfig,
    responses((status = 200, body = DrsConfig), (status = 400, body = ApiErrorBody)))]
pub async fn put_drs_config(
    State(a): State<Agent>,
    ApiJson(cfg): ApiJson<DrsConfig>,
) -> ApiResult<Json<DrsConfig>> {
    Ok(Json(a.set_drs_config(cfg).await?))
}

#[utoipa::path(get, path = "/api/v1/vms/{name}/placement", tag = "drs",
    params(("name" = String, Path, description = "VM name")),
    responses((status = 200, description = "Each host's filters and score for the VM", body = PlacementReport),
              (status = 404, body = ApiErrorBody)))]
pub async fn place_vm(
    State(a): State<Agent>,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<Json<PlacementReport>> {
    Ok(Json(a.place_vm(&name).await?))
}

#[utoipa::path(post, path = "/api/v1/placement", tag = "drs", request_body = VmSpec,
    responses((status = 200, description = "Where a VM of this definition would go", body = PlacementReport),
              (status = 400, body = ApiErrorBody)))]
pub async fn place_spec(
    State(a): State<Agent>,
    ApiJson(spec): ApiJson<VmSpec>,
) -> ApiResult<Json<PlacementReport>> {
    Ok(Json(a.place_spec(&spec).await?))
}

#[utoipa::path(post, path = "/api/v1/placement/create", tag = "drs", request_body = VmSpec,
    responses((status = 201, description = "Defined on the host DRS picked", body = Vm),
              (status = 400, body = ApiErrorBody), (status = 409, description = "No host can take it", body = ApiErrorBody)))]
pub async fn create_placed(
    State(a): State<Agent>,
    axum::Extension(caller): axum::Extension<crate::Caller>,
    ApiJson(spec): ApiJson<VmSpec>,
) -> ApiResult<(StatusCode, Json<Vm>)> {
    crate::access::check_spec_pools(&a, &caller, &spec).await?;
    Ok((StatusCode::CREATED, Json(a.create_placed(spec).await?)))
}

#[utoipa::path(get, path = "/api/v1/resource-pools", tag = "drs",
    responses((status = 200, body = Vec<ResourcePool>)))]
pub async fn list_resource_pools(State(a): State<Agent>) -> ApiResult<Json<Vec<ResourcePool>>> {
    Ok(Json(a.resource_pools().await?))
}

#[utoipa::path(post, path = "/api/v1/resource-pools", tag = "drs", request_body = ResourcePool,
    responses((status = 201, body = ResourcePool), (status = 400, body = ApiErrorBody),
              (status = 409, body = ApiErrorBody)))]
pub async fn create_resource_pool(
    State(a): State<Agent>,
    ApiJson(p): ApiJson<ResourcePool>,
) -> ApiResult<(StatusCode, Json<ResourcePool>)> {
    Ok((
        StatusCode::CREATED,
        Json(a.put_resource_pool(p, true).await?),
    ))
}

#[utoipa::path(get, path = "/api/v1/resource-pools/{name}", tag = "drs",
    params(("name" = String, Path, description = "Pool name")),
    responses((status = 200, body = ResourcePool), (status = 404, body = ApiErrorBody)))]
pub async fn get_resource_pool(
    State(a): State<Agent>,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<Json<ResourcePool>> {
    Ok(Json(a.resource_pool(&name).await?))
}

#[utoipa::path(put, path = "/api/v1/resource-pools/{name}", tag = "drs", request_body = ResourcePool,
    params(("name" = String, Path, description = "Pool name")),
    responses((status = 200, body = ResourcePool), (status = 400, body = ApiErrorBody),
              (status = 404, body = ApiErrorBody)))]
pub async fn put_resource_pool(
    State(a): State<Agent>,
    ApiPath(name): ApiPath<String>,
    ApiJson(p): ApiJson<ResourcePool>,
) -> ApiResult<Json<ResourcePool>> {
    if p.name != name {
        return Err(ferry_agent::AgentError::invalid("name", "differs from the path").into());
    }
    Ok(Json(a.put_resource_pool(p, false).await?))
}

#[utoipa::path(delete, path = "/api/v1/resource-pools/{name}", tag = "drs",
    params(("name" = String, Path, description = "Pool name")),
    responses((status = 204), (status = 404, body = ApiErrorBody),
              (status = 409, description = "Has sub-pools or VMs", body = ApiErrorBody)))]
pub async fn delete_resource_pool(
    State(a): State<Agent>,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<StatusCode> {
    a.delete_resource_pool(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}
