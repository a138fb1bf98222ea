//! ferry's HTTP API: REST resources under `/api/v1` (OpenAPI generated from the types,
//! served at `/api/v1/openapi.json`, Swagger UI at `/api/docs`), websockets for the
//! serial console, VNC and events, Prometheus metrics at `/metrics`, the web UI at `/`.
//! Handlers only translate between HTTP and the [`Agent`]; errors become JSON in
//! `error.rs`; who may call is decided in `auth.rs`.

mod access;
pub mod auth;
mod backup;
mod cluster;
mod devices;
mod drs;
mod error;
mod migration;
mod nodes;
mod pools;
mod replication;
pub mod serve;
mod snapshots;
mod tasks;
mod ui;
mod vms;
mod ws;

pub use auth::{Auth, Caller, ConnInfo};
pub use error::ApiError;
pub use pools::Bridge;

use axum::extract::State;
use axum::routing::get;
use axum::Router;
use ferry_agent::Agent;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use utoipa_swagger_ui::SwaggerUi;

#[derive(OpenApi)]
#[openapi(
    info(title = "ferry", description = "KVM virtualization cluster manager: REST API"),
    tags(
        (name = "vms", description = "VM definitions and lifecycle"),
        (name = "snapshots", description = "Snapshots, templates and clones"),
        (name = "storage", description = "Pools and volumes"),
        (name = "backup", description = "Backup stores, backups, restores"),
        (name = "network", description = "Host bridges"),
        (name = "tasks", description = "Long operations"),
        (name = "events", description = "Event log"),
        (name = "host", description = "This host and its cluster"),
        (name = "migration", description = "Live migration (and the host-to-host calls it makes)"),
        (name = "cluster", description = "etcd cluster membership, host leases, HA"),
        (name = "drs", description = "DRS: placement, balancing, HA admission control, resource pools"),
        (name = "access", description = "Users, API tokens, grants; login"),
        (name = "replication", description = "Replicated volumes: primary, resync, verify, split brain (and the host-to-host calls)"),
    ),
    // The frames of the websockets (`/api/v1/cluster/changes`), which OpenAPI has no
    // path for.
    components(schemas(
        ferry_types::ClusterChange,
        ferry_types::BackupBootCheckResult,
        ferry_types::BackupSyncReport,
        ferry_types::HostPowerReport
    ))
)]
struct ApiDoc;

fn api() -> OpenApiRouter<Agent> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(vms::list_vms, vms::create_vm))
        .routes(routes!(vms::get_vm, vms::put_vm, vms::delete_vm))
        .routes(routes!(vms::put_vm_ha))
        .routes(routes!(vms::start_vm))
        .routes(routes!(vms::stop_vm))
        .routes(routes!(vms::shutdown_vm))
        .routes(routes!(vms::reboot_vm))
        .routes(routes!(vms::pause_vm))
        .routes(routes!(vms::resume_vm))
        .routes(routes!(vms::console_history))
        .routes(routes!(vms::guest_agent))
        .routes(routes!(
            snapshots::list_snapshots,
            snapshots::create_snapshot
        ))
        .routes(routes!(snapshots::revert_snapshot))
        .routes(routes!(snapshots::delete_snapshot))
        .routes(routes!(snapshots::clone_vm))
        .routes(routes!(snapshots::make_template))
        .routes(routes!(snapshots::suspend_vm))
        .routes(routes!(devices::attach_disk))
        .routes(routes!(devices::detach_disk))
        .routes(routes!(devices::move_disk, devices::abort_move_disk))
        .routes(routes!(devices::change_cdrom))
        .routes(routes!(devices::attach_nic))
        .routes(routes!(devices::detach_nic))
        .routes(routes!(backup::list_stores, backup::create_store))
        .routes(routes!(backup::get_store, backup::delete_store))
        .routes(routes!(backup::gc_store))
        .routes(routes!(backup::verify_store))
        .routes(routes!(backup::list_backups, backup::run_backup))
        .routes(routes!(backup::get_backup, backup::delete_backup))
        .routes(routes!(backup::restore_backup))
        .routes(routes!(backup::list_files))
        .routes(routes!(backup::boot_check))
        .routes(routes!(backup::backup_index))
        .routes(routes!(backup::chunk_file))
        .routes(routes!(backup::sync_store))
        .routes(routes!(backup::download_file))
        .routes(routes!(backup::prune_backups))
        .routes(routes!(backup::list_jobs, backup::create_job))
        .routes(routes!(backup::get_job, backup::delete_job))
        .routes(routes!(backup::run_job))
        .routes(routes!(pools::list_pools, pools::create_pool))
        .routes(routes!(pools::get_pool, pools::delete_pool))
        .routes(routes!(pools::list_volumes, pools::create_volume))
        .routes(routes!(pools::get_volume, pools::delete_volume))
        .routes(routes!(pools::resize_volume))
        .routes(routes!(pools::import_volume))
        .routes(routes!(pools::import_ova))
        .routes(routes!(
            pools::upload_volume,
            pools::upload_status,
            pools::upload_discard
        ))
        .routes(routes!(pools::download_volume))
        .routes(routes!(pools::list_bridges, pools::create_bridge))
        .routes(routes!(replication::replication_status))
        .routes(routes!(replication::promote))
        .routes(routes!(replication::demote))
        .routes(routes!(replication::verify))
        .routes(routes!(replication::disconnect))
        .routes(routes!(replication::connect))
        .routes(routes!(replication::resolve))
        .routes(routes!(replication::define_pool))
        .routes(routes!(replication::undefine_pool))
        .routes(routes!(replication::create_copy))
        .routes(routes!(replication::copy_status))
        .routes(routes!(replication::delete_copy))
        .routes(routes!(replication::grow_copy))
        .routes(routes!(replication::discard_copy))
        .routes(routes!(replication::standalone_copy))
        .routes(routes!(tasks::list_tasks))
        .routes(routes!(tasks::get_task))
        .routes(routes!(tasks::list_events))
        .routes(routes!(tasks::host))
        .routes(routes!(tasks::host_metrics))
        .routes(routes!(tasks::host_loads))
        .routes(routes!(tasks::vm_metrics))
        .routes(routes!(access::list_users, access::create_user))
        .routes(routes!(
            access::get_user,
            access::update_user,
            access::delete_user
        ))
        .routes(routes!(access::set_password))
        .routes(routes!(access::list_tokens, access::create_token))
        .routes(routes!(access::revoke_token))
        .routes(routes!(access::list_acl, access::grant))
        .routes(routes!(access::revoke_grant))
        .routes(routes!(auth::login))
        .routes(routes!(auth::logout))
        .routes(routes!(auth::session))
        .routes(routes!(migration::migrate_vm))
        .routes(routes!(migration::prepare_incoming))
        .routes(routes!(migration::finish_incoming))
        .routes(routes!(migration::claim_incoming))
        .routes(routes!(migration::move_vm))
        .routes(routes!(migration::prepare_cold))
        .routes(routes!(migration::upload_cold_disk))
        .routes(routes!(migration::upload_cold_state))
        .routes(routes!(migration::upload_cold_efivars))
        .routes(routes!(migration::upload_cold_tpm))
        .routes(routes!(migration::finish_cold))
        .routes(routes!(migration::get_migration))
        .routes(routes!(migration::cluster_hosts))
        .routes(routes!(migration::enter_maintenance))
        .routes(routes!(migration::activate_host))
        .routes(routes!(migration::stop_all))
        .routes(routes!(migration::start_all))
        .routes(routes!(cluster::cluster_status))
        .routes(routes!(cluster::cluster_summary))
        .routes(routes!(cluster::promote_voter))
        .routes(routes!(cluster::cluster_init))
        .routes(routes!(cluster::cluster_join))
        .routes(routes!(cluster::add_member))
        .routes(routes!(cluster::join_token))
        .routes(routes!(cluster::certs_status))
        .routes(routes!(cluster::certs_renew))
        .routes(routes!(cluster::certs_sign))
        .routes(routes!(cluster::cluster_leave))
        .routes(routes!(cluster::remove_member))
        .routes(routes!(drs::drs_status))
        .routes(routes!(drs::drs_plan))
        .routes(routes!(drs::drs_apply))
        .routes(routes!(drs::get_drs_config, drs::put_drs_config))
        .routes(routes!(drs::place_vm))
        .routes(routes!(drs::place_spec))
        .routes(routes!(drs::create_placed))
        .routes(routes!(drs::list_resource_pools, drs::create_resource_pool))
        .routes(routes!(
            drs::get_resource_pool,
            drs::put_resource_pool,
            drs::delete_resource_pool
        ))
}

/// The OpenAPI document (checked in as `openapi.json`).
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = api().split_for_parts().1;
    document_errors(&mut doc);
    doc
}

/// The error answers any operation can give besides its own (bad path, query or body;
/// no credentials; a refused browser write; an unknown resource; a conflict; a wrong
/// content type; a failure inside), each an [`ferry_types::ApiErrorBody`]: added to
/// every operation that does not name them, so the document says all a client gets.
fn document_errors(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
    const COMMON: [(&str, &str); 9] = [
        (
            "400",
            "Invalid input (path, query or body), with the reasons",
        ),
        ("401", "No credentials, or wrong ones"),
        (
            "403",
            "Refused (the user's grants do not allow it, a browser write without the CSRF header, a foreign page)",
        ),
        ("404", "No such resource"),
        ("409", "Not possible in the resource's current state"),
        ("413", "Body too large"),
        ("415", "The body is not JSON (Content-Type)"),
        ("500", "A failure inside the daemon"),
        (
            "502",
            "Another host of the cluster failed, refused this host, or did not answer",
        ),
    ];
    for item in doc.paths.paths.values_mut() {
        for op in [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ]
        .into_iter()
        .flatten()
        {
            for (code, what) in COMMON {
                op.responses
                    .responses
                    .entry(code.to_string())
                    .or_insert_with(|| {
                        RefOr::T(
                            ResponseBuilder::new()
                                .description(what)
                                .content(
                                    "application/json",
                                    ContentBuilder::new()
                                        .schema(Some(Ref::from_schema_name("ApiErrorBody")))
                                        .build(),
                                )
                                .build(),
                        )
                    });
            }
        }
    }
}

async fn metrics(State(a): State<Agent>) -> ([(axum::http::HeaderName, &'static str); 1], String) {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        a.render_metrics().await + &a.etcd_metrics() + &a.backup_metrics().await,
    )
}

/// The whole HTTP service. Serve it with connect info ([`ConnInfo`]): without it only
/// requests carrying the admin token get through.
pub fn router(agent: Agent, auth: Auth) -> Router {
    let (api, mut doc) = api().split_for_parts();
    document_errors(&mut doc);
    api.route("/api/v1/vms/{name}/console", get(ws::console))
        .route("/api/v1/vms/{name}/vnc", get(ws::vnc))
        .route("/api/v1/events/stream", get(ws::events))
        .route("/api/v1/cluster/changes", get(ws::cluster_changes))
        .route("/metrics", get(metrics))
        .route(
            "/api/v1/nodes/{host}/{*rest}",
            axum::routing::any(nodes::forward),
        )
        .route("/", get(ui::index))
        .route("/ui/{*path}", get(ui::asset))
        .fallback(|| async {
            error::ApiError::new(axum::http::StatusCode::NOT_FOUND, "No such resource")
        })
        .with_state(agent.clone())
        .merge(SwaggerUi::new("/api/docs").url("/api/v1/openapi.json", doc))
        .layer(axum::middleware::from_fn_with_state(
            (auth.clone(), agent),
            auth::require,
        ))
        .layer(axum::Extension(auth))
        .layer(tower_http::trace::TraceLayer::new_for_http())
}

/// Whether this binary carries the built web UI.
pub fn ui_built() -> bool {
    ui::built()
}

#[cfg(test)]
mod tests;
