//! Live migration and maintenance: `/api/v1/vms/{name}/migrate`, the host-to-host
//! `/api/v1/migrations/...` calls, `/api/v1/cluster/hosts`, `/api/v1/host/maintenance`.

use crate::error::{ApiJson, ApiPath, ApiQuery, ApiResult};
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use ferry_agent::{Agent, AgentError, ColdPiece};
use ferry_types::{
    ApiErrorBody, ClusterHost, ColdIncoming, IncomingFinish, IncomingReady, IncomingRequest,
    MigrateRequest, MigrationInfo, MigrationReport, MoveRequest, TaskAccepted, VmAction,
};

type Accepted = (StatusCode, Json<TaskAccepted>);

/// 404 unless `to` is a host of the cluster.
async fn known_host(a: &Agent, to: &str) -> Result<(), AgentError> {
    if a.cluster_hosts().await?.iter().any(|h| h.name == to) {
        Ok(())
    } else {
        Err(AgentError::NotFound(format!("Host {to} in the cluster")))
    }
}

#[utoipa::path(post, path = "/api/v1/vms/{name}/migrate", tag = "migration", request_body = MigrateRequest,
    params(("name" = String, Path, description = "VM name")),
    responses((status = 202, description = "Migration task started; its result is a MigrationReport", body = TaskAccepted),
              (status = 400, body = ApiErrorBody), (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
pub async fn migrate_vm(
    State(a): State<Agent>,
    ApiPath(name): ApiPath<String>,
    ApiJson(req): ApiJson<MigrateRequest>,
) -> ApiResult<Accepted> {
    req.validate().map_err(AgentError::from)?;
    let vm = a.get_vm(&name).await?;
    vm.state
        .check(VmAction::Migrate)
        .map_err(AgentError::from)?;
    known_host(&a, &req.to).await?;
    let agent = a.clone();
    let n = name.clone();
    let task = a.tasks().spawn("vm.migrate", &name, move |ctx| async move {
        let report: MigrationReport = agent.migrations().migrate_vm(&n, req, &ctx).await?;
        ctx.result(serde_json::to_value(&report).unwrap_or_default());
        Ok(())
    });
    Ok((StatusCode::ACCEPTED, Json(TaskAccepted { task })))
}

#[utoipa::path(post, path = "/api/v1/migrations/incoming", tag = "migration", request_body = IncomingRequest,
    responses((status = 200, description = "QEMU waits for the migration", body = IncomingReady),
              (status = 400, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
pub async fn prepare_incoming(
    State(a): State<Agent>,
    ApiJson(req): ApiJson<IncomingRequest>,
) -> ApiResult<Json<IncomingReady>> {
    Ok(Json(a.migrations().prepare_incoming(req).await?))
}

#[utoipa::path(post, path = "/api/v1/migrations/incoming/{name}/finish", tag = "migration", request_body = IncomingFinish,
    params(("name" = String, Path, description = "VM name")),
    responses((status = 200, description = "Done; the locks taken over (volume@host:generation)", body = Vec<String>),
              (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
pub async fn finish_incoming(
    State(a): State<Agent>,
    ApiPath(name): ApiPath<String>,
    ApiJson(req): ApiJson<IncomingFinish>,
) -> ApiResult<Json<Vec<String>>> {
    Ok(Json(
        a.migrations().finish_incoming(&name, req.success).await?,
    ))
}

#[utoipa::path(post, path = "/api/v1/migrations/incoming/{name}/claim", tag = "migration",
    params(("name" = String, Path, description = "VM name")),
    responses((status = 204, description = "The VM's MACs announced from this host"),
              (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
pub async fn claim_incoming(
    State(a): State<Agent>,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<StatusCode> {
    a.migrations().claim_incoming(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/migrations/{name}", tag = "migration",
    params(("name" = String, Path, description = "VM name")),
    responses((status = 200, description = "An outgoing migration of this host", body = MigrationInfo),
              (status = 404, body = ApiErrorBody)))]
pub async fn get_migration(
    State(a): State<Agent>,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<Json<MigrationInfo>> {
    a.migrations()
        .outgoing_migration(&name)
        .map(Json)
        .ok_or_else(|| AgentError::NotFound(format!("Outgoing migration of {name}")).into())
}

#[utoipa::path(get, path = "/api/v1/cluster/hosts", tag = "host",
    responses((status = 200, description = "The cluster's hosts (empty outside a cluster)", body = Vec<ClusterHost>)))]
pub async fn cluster_hosts(State(a): State<Agent>) -> ApiResult<Json<Vec<ClusterHost>>> {
    Ok(Json(a.cluster_hosts().await?))
}

#[utoipa::path(post, path = "/api/v1/host/maintenance", tag = "host",
    responses((status = 202, description = "Maintenance task: evacuates every running VM by live migration", body = TaskAccepted)))]
pub async fn enter_maintenance(State(a): State<Agent>) -> ApiResult<Accepted> {
    let agent = a.clone();
    let host = a.host_name().to_string();
    let task = a
        .tasks()
        .spawn("host.maintenance", &host, move |ctx| async move {
            agent.enter_maintenance(&ctx).await
        });
    Ok((StatusCode::ACCEPTED, Json(TaskAccepted { task })))
}

#[utoipa::path(post, path = "/api/v1/host/stop-all", tag = "host",
    responses((status = 202, description = "Task: every VM brought down as its startup policy says (ACPI shutdown or suspend), in reverse startup order; then no VM starts here until start-all or the next boot (the host's shutdown runs this). Its result is a HostPowerReport", body = TaskAccepted)))]
pub async fn stop_all(State(a): State<Agent>) -> ApiResult<Accepted> {
    Ok(power_task(a, true))
}

/// `stop-all` or `start-all` as a task whose result is the report.
fn power_task(a: Agent, stop: bool) -> Accepted {
    let agent = a.clone();
    let kind = if stop {
        "host.stop-all"
    } else {
        "host.start-all"
    };
    let task = a.tasks().spawn(kind, a.host_name(), move |ctx| async move {
        let r = if stop {
            agent.stop_all(&ctx).await?
        } else {
            agent.start_all(&ctx).await?
        };
        ctx.result(serde_json::to_value(&r).unwrap_or_default());
        Ok(())
    });
    (StatusCode::ACCEPTED, Json(TaskAccepted { task }))
}

#[utoipa::path(post, path = "/api/v1/host/start-all", tag = "host",
    responses((status = 202, description = "Task: what the host's boot starts, in startup order: VMs its shutdown suspended, HA VMs that ran then, autostart VMs; starts are allowed again. Its result is a HostPowerReport", body = TaskAccepted)))]
pub async fn start_all(State(a): State<Agent>) -> ApiResult<Accepted> {
    Ok(power_task(a, false))
}

#[utoipa::path(post, path = "/api/v1/host/activate", tag = "host",
    responses((status = 204, description = "Maintenance ended")))]
pub async fn activate_host(State(a): State<Agent>) -> ApiResult<StatusCode> {
    a.activate_host().await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/api/v1/vms/{name}/move", tag = "migration", request_body = MoveRequest,
    params(("name" = String, Path, description = "VM name")),
    responses((status = 202, description = "Cold migration task started", body = TaskAccepted),
              (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
pub async fn move_vm(
    State(a): State<Agent>,
    ApiPath(name): ApiPath<String>,
    ApiJson(req): ApiJson<MoveRequest>,
) -> ApiResult<Accepted> {
    let vm = a.get_vm(&name).await?;
    vm.state.check(VmAction::Move).map_err(AgentError::from)?;
    known_host(&a, &req.to).await?;
    let agent = a.clone();
    let n = name.clone();
    let task = a.tasks().spawn("vm.move", &name, move |ctx| async move {
        agent.migrations().move_vm(&n, &req.to, &ctx).await
    });
    Ok((StatusCode::ACCEPTED, Json(TaskAccepted { task })))
}

#[utoipa::path(post, path = "/api/v1/migrations/cold", tag = "migration", request_body = ColdIncoming,
    responses((status = 204, description = "Registered, waiting for its files"),
              (status = 400, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
pub async fn prepare_cold(
    State(a): State<Agent>,
    ApiJson(req): ApiJson<ColdIncoming>,
) -> ApiResult<StatusCode> {
    a.migrations().prepare_cold(req).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Writes the request body to `partial`, then publishes it at `path`.
async fn receive(
    a: &Agent,
    name: &str,
    piece: ColdPiece,
    body: axum::body::Body,
) -> ApiResult<StatusCode> {
    use futures::StreamExt;
    use tokio::io::AsyncWriteExt;
    let (path, partial) = a.migrations().cold_upload_target(name, piece).await?;
    let limit = a
        .migrations()
        .cold_upload_limit(name, piece, &partial)
        .await?;
    let io = |what: String| move |source: std::io::Error| AgentError::Io { what, source };
    let mut f = tokio::fs::File::create(&partial)
        .await
        .map_err(io(format!("Create {}", partial.display())))?;
    let mut stream = body.into_data_stream();
    let mut got = 0u64;
    let r: Result<(), AgentError> = async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                io("Receive the upload".into())(std::io::Error::other(e.to_string()))
            })?;
            got += chunk.len() as u64;
            if got > limit {
                return Err(AgentError::invalid(
                    "body",
                    format!("the upload is larger than the {limit} bytes it may take"),
                ));
            }
            f.write_all(&chunk)
                .await
                .map_err(io(format!("Write {}", partial.display())))?;
        }
        f.sync_all()
            .await
            .map_err(io(format!("Sync {}", partial.display())))?;
        Ok(())
    }
    .await;
    if let Err(e) = r {
        let _ = tokio::fs::remove_file(&partial).await;
        return Err(e.into());
    }
    a.migrations()
        .cold_upload_done(name, piece, &partial, &path)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(put, path = "/api/v1/migrations/cold/{name}/disks/{index}", tag = "migration",
    params(("name" = String, Path, description = "VM name"), ("index" = usize, Path)),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "The volume file"),
    responses((status = 204, description = "Stored"), (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
pub async fn upload_cold_disk(
    State(a): State<Agent>,
    ApiPath((name, index)): ApiPath<(String, usize)>,
    body: axum::body::Body,
) -> ApiResult<StatusCode> {
    receive(&a, &name, ColdPiece::Disk(index), body).await
}

#[utoipa::path(put, path = "/api/v1/migrations/cold/{name}/state", tag = "migration",
    params(("name" = String, Path, description = "VM name")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "The suspended state file"),
    responses((status = 204, description = "Stored"), (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
pub async fn upload_cold_state(
    State(a): State<Agent>,
    ApiPath(name): ApiPath<String>,
    body: axum::body::Body,
) -> ApiResult<StatusCode> {
    receive(&a, &name, ColdPiece::State, body).await
}

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct EfivarsQuery {
    /// The template the variables were made from: `plain` or `secure-boot`
    /// (Microsoft's keys). Absent: plain.
    pub kind: Option<String>,
}

#[utoipa::path(put, path = "/api/v1/migrations/cold/{name}/efivars", tag = "migration",
    params(("name" = String, Path, description = "VM name"), EfivarsQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "The UEFI variables file"),
    responses((status = 204, description = "Stored"), (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
pub async fn upload_cold_efivars(
    State(a): State<Agent>,
    ApiPath(name): ApiPath<String>,
    ApiQuery(q): ApiQuery<EfivarsQuery>,
    body: axum::body::Body,
) -> ApiResult<StatusCode> {
    let kind = ferry_agent::VarsKind::parse(q.kind.as_deref().unwrap_or("plain"))?;
    let r = receive(&a, &name, ColdPiece::Efivars, body).await?;
    a.migrations().record_vars_kind(&name, kind).await?;
    Ok(r)
}

#[utoipa::path(put, path = "/api/v1/migrations/cold/{name}/tpm", tag = "migration",
    params(("name" = String, Path, description = "VM name")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "The TPM's state (swtpm's state file)"),
    responses((status = 204, description = "Stored"), (status = 400, body = ApiErrorBody), (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
pub async fn upload_cold_tpm(
    State(a): State<Agent>,
    ApiPath(name): ApiPath<String>,
    body: axum::body::Body,
) -> ApiResult<StatusCode> {
    receive(&a, &name, ColdPiece::Tpm, body).await
}

#[utoipa::path(post, path = "/api/v1/migrations/cold/{name}/finish", tag = "migration", request_body = IncomingFinish,
    params(("name" = String, Path, description = "VM name")),
    responses((status = 200, description = "Done; locks taken over", body = Vec<String>),
              (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
pub async fn finish_cold(
    State(a): State<Agent>,
    ApiPath(name): ApiPath<String>,
    ApiJson(req): ApiJson<IncomingFinish>,
) -> ApiResult<Json<Vec<String>>> {
    Ok(Json(a.migrations().finish_cold(&name, req.success).await?))
}
