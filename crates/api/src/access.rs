//! `/api/v1/access`: users, their API tokens, and the grants (who may do what where).
//! Which caller may call what is decided in `auth.rs` (`ferry_access::need`): users
//! and grants are an Administrator's on `/access`; each user's own password and tokens
//! are its own.

use crate::auth::Caller;
use crate::error::{ApiJson, ApiPath, ApiResult};
use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use ferry_agent::Agent;
use ferry_types::{
    AclEntry, ApiErrorBody, ApiToken, PasswordChange, TokenCreate, TokenCreated, User, UserCreate,
    UserUpdate,
};

#[utoipa::path(get, path = "/api/v1/access/users", tag = "access",
    responses((status = 200, body = Vec<User>)))]
pub async fn list_users(State(a): State<Agent>) -> ApiResult<Json<Vec<User>>> {
    Ok(Json(a.users().await?))
}

#[utoipa::path(post, path = "/api/v1/access/users", tag = "access", request_body = UserCreate,
    responses((status = 201, body = User), (status = 409, body = ApiErrorBody)))]
pub async fn create_user(
    State(a): State<Agent>,
    ApiJson(req): ApiJson<UserCreate>,
) -> ApiResult<(StatusCode, Json<User>)> {
    Ok((StatusCode::CREATED, Json(a.create_user(req).await?)))
}

#[utoipa::path(get, path = "/api/v1/access/users/{name}", tag = "access",
    params(("name" = String, Path)), responses((status = 200, body = User)))]
pub async fn get_user(
    State(a): State<Agent>,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<Json<User>> {
    Ok(Json(a.user(&name).await?))
}

#[utoipa::path(put, path = "/api/v1/access/users/{name}", tag = "access",
    params(("name" = String, Path)), request_body = UserUpdate,
    responses((status = 200, body = User)))]
pub async fn update_user(
    State(a): State<Agent>,
    ApiPath(name): ApiPath<String>,
    ApiJson(req): ApiJson<UserUpdate>,
) -> ApiResult<Json<User>> {
    Ok(Json(a.update_user(&name, req).await?))
}

#[utoipa::path(delete, path = "/api/v1/access/users/{name}", tag = "access",
    params(("name" = String, Path)),
    responses((status = 204, description = "The user, its tokens and its grants are gone")))]
pub async fn delete_user(
    State(a): State<Agent>,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<StatusCode> {
    a.delete_user(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(put, path = "/api/v1/access/users/{name}/password", tag = "access",
    params(("name" = String, Path)), request_body = PasswordChange,
    responses((status = 204, description = "Set; every session of the user ended")))]
pub async fn set_password(
    State(a): State<Agent>,
    Extension(caller): Extension<Caller>,
    ApiPath(name): ApiPath<String>,
    ApiJson(req): ApiJson<PasswordChange>,
) -> ApiResult<StatusCode> {
    // A user setting its own password proves it knows the current one; an
    // administrator (or root on the host) setting another's does not.
    let own = matches!(&caller, Caller::User { name: n } if *n == name);
    a.set_password(&name, req, own).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/access/users/{name}/tokens", tag = "access",
    params(("name" = String, Path)), responses((status = 200, body = Vec<ApiToken>)))]
pub async fn list_tokens(
    State(a): State<Agent>,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<Json<Vec<ApiToken>>> {
    Ok(Json(a.tokens(&name).await?))
}

#[utoipa::path(post, path = "/api/v1/access/users/{name}/tokens", tag = "access",
    params(("name" = String, Path)), request_body = TokenCreate,
    responses((status = 201, description = "The token; its value is shown only here", body = TokenCreated),
              (status = 409, body = ApiErrorBody)))]
pub async fn create_token(
    State(a): State<Agent>,
    ApiPath(name): ApiPath<String>,
    ApiJson(req): ApiJson<TokenCreate>,
) -> ApiResult<(StatusCode, Json<TokenCreated>)> {
    Ok((StatusCode::CREATED, Json(a.create_token(&name, req).await?)))
}

#[utoipa::path(delete, path = "/api/v1/access/users/{name}/tokens/{id}", tag = "access",
    params(("name" = String, Path), ("id" = String, Path)),
    responses((status = 200, description = "Revoked (it stays listed)", body = ApiToken)))]
pub async fn revoke_token(
    State(a): State<Agent>,
    ApiPath((name, id)): ApiPath<(String, String)>,
) -> ApiResult<Json<ApiToken>> {
    Ok(Json(a.revoke_token(&name, &id).await?))
}

#[utoipa::path(get, path = "/api/v1/access/acl", tag = "access",
    responses((status = 200, description = "Every grant", body = Vec<AclEntry>)))]
pub async fn list_acl(State(a): State<Agent>) -> ApiResult<Json<Vec<AclEntry>>> {
    Ok(Json(a.acl().await?))
}

#[utoipa::path(post, path = "/api/v1/access/acl", tag = "access", request_body = AclEntry,
    responses((status = 200, description = "Granted: every grant now", body = Vec<AclEntry>)))]
pub async fn grant(
    State(a): State<Agent>,
    ApiJson(e): ApiJson<AclEntry>,
) -> ApiResult<Json<Vec<AclEntry>>> {
    Ok(Json(a.grant(e).await?))
}

#[utoipa::path(post, path = "/api/v1/access/acl/revoke", tag = "access", request_body = AclEntry,
    responses((status = 200, description = "Taken back: every grant now", body = Vec<AclEntry>)))]
pub async fn revoke_grant(
    State(a): State<Agent>,
    ApiJson(e): ApiJson<AclEntry>,
) -> ApiResult<Json<Vec<AclEntry>>> {
    Ok(Json(a.revoke_grant(e).await?))
}

/// What a VM definition (or a disk, or a CD) a restricted user hands in may use: disks
/// take space in (or name a volume of) their pool, so they need Modify there; ISOs
/// need Audit on theirs. Root, local callers and hosts are not held to this.
pub(crate) async fn check_pool_use(
    a: &Agent,
    caller: &Caller,
    disk_pools: &[&str],
    iso_pools: &[&str],
) -> crate::error::ApiResult<()> {
    use ferry_access::Privilege;
    let Some(user) = caller.restricted_user() else {
        return Ok(());
    };
    let acl = a.acl().await?;
    let needs = disk_pools
        .iter()
        .map(|p| (Privilege::Modify, *p))
        .chain(iso_pools.iter().map(|p| (Privilege::Audit, *p)));
    for (p, pool) in needs {
        let on = format!("/pools/{pool}");
        if !ferry_access::allows(&acl, user, p, &on) {
            return Err(crate::ApiError::new(
                StatusCode::FORBIDDEN,
                format!("User {user} may not use pool {pool}: it needs {p:?} on {on}"),
            ));
        }
    }
    Ok(())
}

/// [`check_pool_use`] for a whole definition.
pub(crate) async fn check_spec_pools(
    a: &Agent,
    caller: &Caller,
    spec: &ferry_types::VmSpec,
) -> crate::error::ApiResult<()> {
    let disks: Vec<&str> = spec.disks.iter().map(|d| d.pool.as_str()).collect();
    let isos: Vec<&str> = spec
        .cdroms
        .iter()
        .filter_map(|c| c.pool.as_deref())
        .collect();
    check_pool_use(a, caller, &disks, &isos).await
}
