//! `/api/v1/backup-stores` (stores: define, show with usage, forget, garbage collection,
//! verify) and `/api/v1/backups` (run, list, show, delete, restore, prune). Long work is
//! a task; a backup's task result is the backup (with its id).

use crate::error::{ApiJson, ApiPath, ApiQuery, ApiResult};
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use ferry_agent::Agent;
use ferry_types::{
    ApiErrorBody, Backup, BackupBootCheck, BackupFiles, BackupIndex, BackupJob, BackupJobSpec,
    BackupList, BackupPrune, BackupRestore, BackupRun, BackupStore, BackupStoreCreate,
    BackupStoreInfo, BackupSync, BackupVerify, PruneResult, TaskAccepted,
};
use serde::Deserialize;

type Accepted = (StatusCode, Json<TaskAccepted>);

fn accepted(task: String) -> Accepted {
    (StatusCode::ACCEPTED, Json(TaskAccepted { task }))
}

#[utoipa::path(get, path = "/api/v1/backup-stores", tag = "backup",
    responses((status = 200, body = Vec<BackupStore>)))]
pub async fn list_stores(State(a): State<Agent>) -> ApiResult<Json<Vec<BackupStore>>> {
    Ok(Json(a.backup_stores().await?))
}

#[utoipa::path(post, path = "/api/v1/backup-stores", tag = "backup", request_body = BackupStoreCreate,
    responses((status = 201, body = BackupStore), (status = 400, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
pub async fn create_store(
    State(a): State<Agent>,
    ApiJson(req): ApiJson<BackupStoreCreate>,
) -> ApiResult<(StatusCode, Json<BackupStore>)> {
    Ok((StatusCode::CREATED, Json(a.create_backup_store(req).await?)))
}

#[utoipa::path(get, path = "/api/v1/backup-stores/{store}", tag = "backup",
    params(("store" = String, Path)),
    responses((status = 200, body = BackupStoreInfo), (status = 404, body = ApiErrorBody)))]
pub async fn get_store(
    State(a): State<Agent>,
    ApiPath(store): ApiPath<String>,
) -> ApiResult<Json<BackupStoreInfo>> {
    Ok(Json(a.backup_store_info(&store).await?))
}

#[utoipa::path(delete, path = "/api/v1/backup-stores/{store}", tag = "backup",
    params(("store" = String, Path)),
    responses((status = 204, description = "Definition removed; the folder and its backups stay"), (status = 404, body = ApiErrorBody)))]
pub async fn delete_store(
    State(a): State<Agent>,
    ApiPath(store): ApiPath<String>,
) -> ApiResult<StatusCode> {
    a.delete_backup_store(&store).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/api/v1/backup-stores/{store}/gc", tag = "backup",
    params(("store" = String, Path)),
    responses((status = 202, description = "Garbage collection started", body = TaskAccepted), (status = 404, body = ApiErrorBody)))]
pub async fn gc_store(
    State(a): State<Agent>,
    ApiPath(store): ApiPath<String>,
) -> ApiResult<Accepted> {
    a.backup_store(&store).await?;
    let agent = a.clone();
    let s = store.clone();
    Ok(accepted(a.tasks().spawn(
        "backup.gc",
        &store,
        move |ctx| async move {
            let r = agent.gc_backup_store(&s).await?;
            ctx.result(serde_json::to_value(&r).unwrap_or_default());
            Ok(())
        },
    )))
}

#[utoipa::path(post, path = "/api/v1/backup-stores/{store}/verify", tag = "backup", request_body = BackupVerify,
    params(("store" = String, Path)),
    responses((status = 202, description = "Verify started; its result lists damaged chunks and the backups using them", body = TaskAccepted), (status = 404, body = ApiErrorBody)))]
pub async fn verify_store(
    State(a): State<Agent>,
    ApiPath(store): ApiPath<String>,
    ApiJson(req): ApiJson<BackupVerify>,
) -> ApiResult<Accepted> {
    a.backup_store(&store).await?;
    let agent = a.clone();
    let s = store.clone();
    Ok(accepted(a.tasks().spawn(
        "backup.verify",
        &store,
        move |ctx| async move {
            let r = agent
                .verify_backup_store(&s, req.since_days, Some(&ctx))
                .await?;
            let bad = r.bad.len();
            ctx.result(serde_json::to_value(&r).unwrap_or_default());
            if bad > 0 {
                return Err(ferry_agent::AgentError::failed(
                    ferry_agent::Failure::Corrupt,
                    format!("{bad} damaged chunks in backup store {s} (see the task's result)"),
                ));
            }
            Ok(())
        },
    )))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct BackupQuery {
    /// Only this store's backups.
    pub store: Option<String>,
    /// Only this VM's backups.
    pub vm: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/backups", tag = "backup", params(BackupQuery),
    responses((status = 200, body = BackupList), (status = 404, body = ApiErrorBody)))]
pub async fn list_backups(
    State(a): State<Agent>,
    ApiQuery(q): ApiQuery<BackupQuery>,
) -> ApiResult<Json<BackupList>> {
    Ok(Json(
        a.list_backups(q.store.as_deref(), q.vm.as_deref()).await?,
    ))
}

#[utoipa::path(post, path = "/api/v1/backups", tag = "backup", request_body = BackupRun,
    responses((status = 202, description = "Backup started; the task's result is the backup", body = TaskAccepted),
              (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
pub async fn run_backup(
    State(a): State<Agent>,
    ApiJson(req): ApiJson<BackupRun>,
) -> ApiResult<Accepted> {
    a.backup_store(&req.store).await?;
    a.get_vm(&req.vm)
        .await?
        .state
        .check(ferry_types::VmAction::Backup)
        .map_err(ferry_agent::AgentError::from)?;
    let agent = a.clone();
    let vm = req.vm.clone();
    Ok(accepted(a.tasks().spawn(
        "vm.backup",
        &vm,
        move |ctx| async move {
            let b = agent.run_backup(&req.vm, &req.store, Some(&ctx)).await?;
            ctx.result(serde_json::to_value(&b).unwrap_or_default());
            Ok(())
        },
    )))
}

#[utoipa::path(get, path = "/api/v1/backups/{id}", tag = "backup",
    params(("id" = String, Path)),
    responses((status = 200, body = Backup), (status = 404, body = ApiErrorBody)))]
pub async fn get_backup(
    State(a): State<Agent>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Backup>> {
    Ok(Json(a.find_backup(&id).await?.2))
}

#[utoipa::path(delete, path = "/api/v1/backups/{id}", tag = "backup",
    params(("id" = String, Path)),
    responses((status = 204, description = "Deleted; garbage collection frees its chunks"), (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
pub async fn delete_backup(
    State(a): State<Agent>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<StatusCode> {
    a.delete_backup(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/api/v1/backups/{id}/restore", tag = "backup", request_body = BackupRestore,
    params(("id" = String, Path)),
    responses((status = 202, description = "Restore started; the task's result is the new VM", body = TaskAccepted),
              (status = 400, body = ApiErrorBody), (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody), (status = 500, body = ApiErrorBody)))]
pub async fn restore_backup(
    State(a): State<Agent>,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<BackupRestore>,
) -> ApiResult<Accepted> {
    req.validate().map_err(ferry_agent::AgentError::from)?;
    a.find_backup(&id).await?;
    let agent = a.clone();
    let name = req.name.clone();
    Ok(accepted(a.tasks().spawn(
        "vm.restore",
        &name,
        move |ctx| async move {
            let vm = agent.restore_backup(&id, req, Some(&ctx)).await?;
            ctx.result(serde_json::to_value(&vm).unwrap_or_default());
            Ok(())
        },
    )))
}

/// A backup as a sync reads it: its rows, VM definition and each disk's chunk names.
#[utoipa::path(get, path = "/api/v1/backups/{id}/index", tag = "backup",
    params(("id" = String, Path)),
    responses((status = 200, body = BackupIndex), (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
pub async fn backup_index(
    State(a): State<Agent>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<BackupIndex>> {
    Ok(Json(a.backup_index(&id).await?))
}

/// A chunk file of a store as it keeps it (a sync elsewhere checks it).
#[utoipa::path(get, path = "/api/v1/backup-stores/{store}/chunks/{chunk}", tag = "backup",
    params(("store" = String, Path), ("chunk" = String, Path, description = "64 hex digits")),
    responses((status = 200, description = "The chunk file", content_type = "application/octet-stream"), (status = 400, body = ApiErrorBody), (status = 404, body = ApiErrorBody)))]
pub async fn chunk_file(
    State(a): State<Agent>,
    ApiPath((store, chunk)): ApiPath<(String, String)>,
) -> ApiResult<([(axum::http::HeaderName, &'static str); 1], Vec<u8>)> {
    let b = a.backup_chunk_file(&store, &chunk).await?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
        b,
    ))
}

/// Pull another ferry's backups into this store (a task; its result is a
/// BackupSyncReport).
#[utoipa::path(post, path = "/api/v1/backup-stores/{store}/sync", tag = "backup", request_body = BackupSync,
    params(("store" = String, Path)),
    responses((status = 202, description = "The sync runs; the task's result says what it copied", body = TaskAccepted), (status = 400, body = ApiErrorBody), (status = 404, body = ApiErrorBody)))]
pub async fn sync_store(
    State(a): State<Agent>,
    ApiPath(store): ApiPath<String>,
    ApiJson(req): ApiJson<BackupSync>,
) -> ApiResult<Accepted> {
    req.validate().map_err(ferry_agent::AgentError::from)?;
    a.backup_store(&store).await?;
    let agent = a.clone();
    let s = store.clone();
    Ok(accepted(a.tasks().spawn(
        "backup.sync",
        &store,
        move |ctx| async move {
            let r = agent.sync_backups(&s, req, Some(&ctx)).await?;
            ctx.result(serde_json::to_value(&r).unwrap_or_default());
            Ok(())
        },
    )))
}

/// Boot a backup to check it (SureBackup): a task whose result says whether its marker
/// showed on the serial console in time.
#[utoipa::path(post, path = "/api/v1/backups/{id}/boot-check", tag = "backup", request_body = BackupBootCheck,
    params(("id" = String, Path)),
    responses((status = 202, description = "The check runs; the task's result is a BackupBootCheckResult", body = TaskAccepted), (status = 400, body = ApiErrorBody), (status = 404, body = ApiErrorBody)))]
pub async fn boot_check(
    State(a): State<Agent>,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<BackupBootCheck>,
) -> ApiResult<Accepted> {
    req.validate().map_err(ferry_agent::AgentError::from)?;
    a.find_backup(&id).await?;
    let agent = a.clone();
    let i = id.clone();
    Ok(accepted(a.tasks().spawn(
        "backup.boot-check",
        &id,
        move |ctx| async move {
            let r = agent.boot_check_backup(&i, req, Some(&ctx)).await?;
            ctx.result(serde_json::to_value(&r).unwrap_or_default());
            Ok(())
        },
    )))
}

/// A path inside a backup: `/` (its disks), `/disk0` (a disk's volumes),
/// `/disk0/p1/etc` (inside a volume).
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct FilesQuery {
    /// Default `/`.
    pub path: Option<String>,
}

/// A folder of a backup, read by a helper VM that attaches the backup read-only (no
/// guest filesystem is mounted on the host); the first call starts it (seconds).
#[utoipa::path(get, path = "/api/v1/backups/{id}/files", tag = "backup",
    params(("id" = String, Path), FilesQuery),
    responses((status = 200, body = BackupFiles), (status = 400, body = ApiErrorBody), (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody), (status = 500, body = ApiErrorBody)))]
pub async fn list_files(
    State(a): State<Agent>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<FilesQuery>,
) -> ApiResult<Json<BackupFiles>> {
    Ok(Json(
        a.backup_files(&id, q.path.as_deref().unwrap_or("/"))
            .await?,
    ))
}

/// A file of a backup (its bytes), or a folder (a tar archive; links stay links).
#[utoipa::path(get, path = "/api/v1/backups/{id}/files/download", tag = "backup",
    params(("id" = String, Path), FilesQuery),
    responses((status = 200, description = "The file (application/octet-stream) or the folder (application/x-tar); a read error half-way breaks the body off", content_type = "application/octet-stream"),
        (status = 400, body = ApiErrorBody), (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody), (status = 500, body = ApiErrorBody)))]
pub async fn download_file(
    State(a): State<Agent>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<FilesQuery>,
) -> ApiResult<axum::response::Response> {
    use axum::http::header;
    let d = a
        .backup_file_download(&id, q.path.as_deref().unwrap_or("/"))
        .await?;
    let body = futures::stream::unfold(d.body, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    });
    // The name goes into a header: only characters that need no quoting there.
    let safe: String = d
        .name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-+".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut r = axum::response::Response::builder()
        .header(
            header::CONTENT_TYPE,
            if d.archive {
                "application/x-tar"
            } else {
                "application/octet-stream"
            },
        )
        .header(
            header::CONTENT_DISPOSITION,
            format!("attachment; filename=\"{safe}\""),
        );
    if let Some(n) = d.size {
        r = r.header(header::CONTENT_LENGTH, n);
    }
    r.body(axum::body::Body::from_stream(body))
        .map_err(|e| ferry_agent::AgentError::invalid("path", e.to_string()).into())
}

#[utoipa::path(post, path = "/api/v1/backups/prune", tag = "backup", request_body = BackupPrune,
    responses((status = 200, body = PruneResult), (status = 404, body = ApiErrorBody)))]
pub async fn prune_backups(
    State(a): State<Agent>,
    ApiJson(req): ApiJson<BackupPrune>,
) -> ApiResult<Json<PruneResult>> {
    Ok(Json(a.prune_backups(req).await?))
}

#[utoipa::path(get, path = "/api/v1/backup-jobs", tag = "backup",
    responses((status = 200, body = Vec<BackupJob>)))]
pub async fn list_jobs(State(a): State<Agent>) -> ApiResult<Json<Vec<BackupJob>>> {
    Ok(Json(a.backup_jobs().await?))
}

#[utoipa::path(post, path = "/api/v1/backup-jobs", tag = "backup", request_body = BackupJobSpec,
    responses((status = 201, body = BackupJob), (status = 400, body = ApiErrorBody), (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
pub async fn create_job(
    State(a): State<Agent>,
    ApiJson(spec): ApiJson<BackupJobSpec>,
) -> ApiResult<(StatusCode, Json<BackupJob>)> {
    Ok((StatusCode::CREATED, Json(a.create_backup_job(spec).await?)))
}

#[utoipa::path(get, path = "/api/v1/backup-jobs/{job}", tag = "backup",
    params(("job" = String, Path)),
    responses((status = 200, body = BackupJob), (status = 404, body = ApiErrorBody)))]
pub async fn get_job(
    State(a): State<Agent>,
    ApiPath(job): ApiPath<String>,
) -> ApiResult<Json<BackupJob>> {
    let jobs = a.backup_jobs().await?;
    jobs.into_iter()
        .find(|j| j.spec.name == job)
        .map(Json)
        .ok_or_else(|| ferry_agent::AgentError::NotFound(format!("Backup job {job}")).into())
}

#[utoipa::path(delete, path = "/api/v1/backup-jobs/{job}", tag = "backup",
    params(("job" = String, Path)),
    responses((status = 204, description = "Deleted (its backups stay)"), (status = 404, body = ApiErrorBody)))]
pub async fn delete_job(
    State(a): State<Agent>,
    ApiPath(job): ApiPath<String>,
) -> ApiResult<StatusCode> {
    a.delete_backup_job(&job).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/api/v1/backup-jobs/{job}/run", tag = "backup",
    params(("job" = String, Path)),
    responses((status = 202, description = "The job runs now; the task's result says what it backed up", body = TaskAccepted), (status = 404, body = ApiErrorBody)))]
pub async fn run_job(State(a): State<Agent>, ApiPath(job): ApiPath<String>) -> ApiResult<Accepted> {
    a.backup_job(&job).await?;
    let agent = a.clone();
    let j = job.clone();
    Ok(accepted(a.tasks().spawn(
        "backup.job",
        &job,
        move |ctx| async move { agent.run_backup_job(&j, &ctx).await.map(|_| ()) },
    )))
}
