//! API tests against a real agent (SQLite store, dir pool, qemu-img); no VM is started.

use super::*;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use std::sync::Arc;
use tower::ServiceExt;

const TEST_TOKEN: &str = "0123456789abcdef0123456789abcdef";

async fn agent(d: &tempfile::TempDir) -> Agent {
    let store = ferry_store::SqliteStore::open(&d.path().join("store.db")).unwrap();
    let agent = Agent::open(
        ferry_agent::AgentConfig {
            state_dir: d.path().join("state"),
            run_dir: d.path().join("run"),
            accel: ferry_qemu_setting(),
            qemu_binary: "qemu-system-x86_64".into(),
            host_name: "test".into(),
            cluster_file: None,
            api_port: 0,
            resources: Default::default(),
            replication_port: 0,
            pki: ferry_pki::HostPki::ensure(&d.path().join("pki"), "test", &[]).unwrap(),
            voter_replace_after: std::time::Duration::from_secs(300),
            file_restore_image: "/nonexistent".into(),
            boot_id_file: None,
            cpu_models: vec![],
        },
        Arc::new(store),
    )
    .await
    .unwrap();
    agent.ensure_root(TEST_TOKEN).await.unwrap();
    agent
}

/// The router as `ferry serve` runs it, for requests over a connection `conn`.
fn served(agent: &Agent, conn: ConnInfo) -> Router {
    router(agent.clone(), Auth::new(TEST_TOKEN))
        .layer(axum::extract::connect_info::MockConnectInfo(conn))
}

/// Root on this host, over the local socket.
const ROOT: ConnInfo = ConnInfo::Unix {
    uid: 0,
    gid: 0,
    pid: None,
};

async fn app() -> (tempfile::TempDir, Router, Agent) {
    let d = tempfile::tempdir().unwrap();
    let agent = agent(&d).await;
    let app = served(&agent, ROOT);
    (d, app, agent)
}

fn ferry_qemu_setting() -> ferry_agent::AccelSetting {
    ferry_agent::AccelSetting::Tcg
}

async fn call(app: &Router, method: &str, uri: &str, body: Option<Value>) -> (StatusCode, Value) {
    call_with(app, method, uri, None, body).await
}

/// `call`, with `Authorization: Bearer {bearer}` when given.
async fn call_with(
    app: &Router,
    method: &str,
    uri: &str,
    bearer: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(b) = bearer {
        req = req.header("authorization", format!("Bearer {b}"));
    }
    let body = match body {
        Some(b) => {
            req = req.header("content-type", "application/json");
            Body::from(b.to_string())
        }
        None => Body::empty(),
    };
    let resp = app.clone().oneshot(req.body(body).unwrap()).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let v = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
    (status, v)
}

#[tokio::test]
async fn create_get_list_delete_vm_with_new_disk() {
    let (_d, app, _) = app().await;
    let (s, vm) = call(&app, "POST", "/api/v1/vms", Some(json!({
        "name": "web1", "cpus": 2, "memory_mib": 128,
        "disks": [{"bus": "virtio", "size": "16M"}, {"bus": "sata", "size": "8M", "format": "raw"}],
        "cdroms": [{}]
    }))).await;
    assert_eq!(s, StatusCode::CREATED, "{vm}");
    assert_eq!(vm["state"], "stopped");
    let id = vm["id"].as_u64().unwrap();
    assert_eq!(vm["spec"]["disks"][0]["volume"], format!("vm-{id}-disk-0"));
    let (_, vols) = call(&app, "GET", "/api/v1/pools/local/volumes", None).await;
    assert_eq!(vols.as_array().unwrap().len(), 2);
    let (s, list) = call(&app, "GET", "/api/v1/vms", None).await;
    assert_eq!((s, list.as_array().unwrap().len()), (StatusCode::OK, 1));
    // The volume is in use: it cannot be deleted under the VM.
    let (s, e) = call(
        &app,
        "DELETE",
        &format!("/api/v1/pools/local/volumes/vm-{id}-disk-0"),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{e}");
    let (s, _) = call(&app, "DELETE", "/api/v1/vms/web1", None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (_, vols) = call(&app, "GET", "/api/v1/pools/local/volumes", None).await;
    assert_eq!(vols, json!([]), "own volumes removed with the VM");
    let (s, _) = call(&app, "GET", "/api/v1/vms/web1", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn bad_input_is_4xx_with_reason_and_creates_nothing() {
    let (_d, app, _) = app().await;
    let cases = [
        (json!({"name": "a", "memory_mib": 0}), "memory_mib"),
        (
            json!({"name": "a", "memory_mib": 99999999999u64}),
            "memory_mib",
        ),
        (
            json!({"name": "a", "memory_mib": 64, "disks": [{"bus": "floppy", "size": "1G"}]}),
            "floppy",
        ),
        (
            json!({"name": "a", "memory_mib": 64, "disks": [{"volume": "../../etc/passwd"}]}),
            "disks[0].volume",
        ),
        (
            json!({"name": "a", "memory_mib": 64, "nics": [{"bridge": "nosuchbr0"}]}),
            "no bridge nosuchbr0",
        ),
        (
            json!({"name": "a", "memory_mib": 64, "disks": [{"pool": "nopool", "size": "1G"}]}),
            "no pool nopool",
        ),
        (
            json!({"name": "a", "memory_mib": 64, "colour": "red"}),
            "colour",
        ),
        (json!({"name": "../x", "memory_mib": 64}), "name"),
        (
            json!({"name": "a", "memory_mib": 64, "disks": [{"size": "16M"}, {"pool": "nopool", "size": "1G"}]}),
            "nopool",
        ),
    ];
    for (body, needle) in cases {
        let (s, e) = call(&app, "POST", "/api/v1/vms", Some(body.clone())).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body} -> {e}");
        assert!(e.to_string().contains(needle), "{body}: {e} lacks {needle}");
        assert_eq!(e["code"], "invalid", "{body} -> {e}");
    }
    let (_, list) = call(&app, "GET", "/api/v1/vms", None).await;
    assert_eq!(list, json!([]));
    let (_, vols) = call(&app, "GET", "/api/v1/pools/local/volumes", None).await;
    assert_eq!(vols, json!([]), "a refused create left volumes");
    let (s, _) = call(
        &app,
        "POST",
        "/api/v1/vms",
        Some(json!({"name": "a", "memory_mib": 64})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, e) = call(
        &app,
        "POST",
        "/api/v1/vms",
        Some(json!({"name": "a", "memory_mib": 64})),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{e}");
    assert_eq!(e["code"], "exists", "{e}");
    // Bodies that are no JSON, or the wrong media type, have codes of their own.
    for (ct, status, code) in [
        ("application/json", StatusCode::BAD_REQUEST, "invalid"),
        (
            "text/plain",
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
    ] {
        let req = Request::builder()
            .method("POST")
            .uri("/api/v1/vms")
            .header("content-type", ct)
            .body(Body::from("{"))
            .unwrap();
        let resp = app.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), status);
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let e: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(e["code"], code, "{e}");
    }
}

#[tokio::test]
async fn actions_in_wrong_state_are_409_and_unknown_vm_404() {
    let (_d, app, _) = app().await;
    call(
        &app,
        "POST",
        "/api/v1/vms",
        Some(json!({"name": "a", "memory_mib": 64})),
    )
    .await;
    for act in ["stop", "shutdown", "pause", "resume", "reboot"] {
        let (s, e) = call(&app, "POST", &format!("/api/v1/vms/a/{act}"), None).await;
        assert_eq!(s, StatusCode::CONFLICT, "{act}: {e}");
        assert!(e["error"].as_str().unwrap().contains("stopped"), "{e}");
        assert_eq!(e["code"], "invalid_state", "{e}");
    }
    let (s, e) = call(&app, "POST", "/api/v1/vms/nope/start", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(e["code"], "not_found", "{e}");
    let (s, e) = call(
        &app,
        "POST",
        "/api/v1/vms/a/shutdown",
        Some(json!({"timeout": 3})),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
}

#[tokio::test]
async fn edit_keeps_mac_and_id() {
    let (_d, app, _) = app().await;
    let (_, br) = call(&app, "GET", "/api/v1/bridges", None).await;
    let _ = br;
    let (s, vm) = call(
        &app,
        "POST",
        "/api/v1/vms",
        Some(json!({"name": "e", "memory_mib": 64})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, vm2) = call(
        &app,
        "PUT",
        "/api/v1/vms/e",
        Some(json!({"name": "e", "memory_mib": 96, "cpus": 2})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{vm2}");
    assert_eq!(vm2["id"], vm["id"]);
    assert_eq!(vm2["spec"]["memory_mib"], 96);
    let (s, e) = call(
        &app,
        "PUT",
        "/api/v1/vms/e",
        Some(json!({"name": "other", "memory_mib": 96})),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
}

#[tokio::test]
async fn pools_and_volumes_crud_and_import_task() {
    let (d, app, agent) = app().await;
    let p = d.path().join("p2");
    let (s, pool) = call(
        &app,
        "POST",
        "/api/v1/pools",
        Some(json!({"name": "p2", "type": "dir", "path": p})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{pool}");
    let (s, v) = call(
        &app,
        "POST",
        "/api/v1/pools/p2/volumes",
        Some(json!({"name": "v1", "size": "32M"})),
    )
    .await;
    assert_eq!(
        (s, v["virtual_bytes"].as_u64()),
        (StatusCode::CREATED, Some(32 << 20))
    );
    let (s, v) = call(
        &app,
        "POST",
        "/api/v1/pools/p2/volumes/v1/resize",
        Some(json!({"size": "64M"})),
    )
    .await;
    assert_eq!(
        (s, v["virtual_bytes"].as_u64()),
        (StatusCode::OK, Some(64 << 20))
    );
    let (s, _) = call(
        &app,
        "POST",
        "/api/v1/pools/p2/volumes/v1/resize",
        Some(json!({"size": "1M"})),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let iso = d.path().join("boot.iso");
    std::fs::write(&iso, vec![1u8; 1 << 20]).unwrap();
    let (s, t) = call(
        &app,
        "POST",
        "/api/v1/pools/p2/import",
        Some(json!({"name": "boot.iso", "source": iso})),
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{t}");
    let task = agent
        .tasks()
        .wait(t["task"].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(task.state, ferry_types::TaskState::Succeeded, "{task:?}");
    let (_, v) = call(&app, "GET", "/api/v1/pools/p2/volumes/boot.iso", None).await;
    assert_eq!(v["format"], "raw");
    let (s, _) = call(&app, "DELETE", "/api/v1/pools/p2", None).await;
    assert_eq!(s, StatusCode::CONFLICT, "pool with volumes deleted");
    let (s, _) = call(
        &app,
        "POST",
        "/api/v1/pools/p2/import",
        Some(json!({"name": "x", "source": "/nonexistent"})),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn metrics_and_openapi_served() {
    let (d, app, _) = app().await;
    call(
        &app,
        "POST",
        "/api/v1/vms",
        Some(json!({"name": "m", "memory_mib": 64})),
    )
    .await;
    let bs = d.path().join("bs");
    let (s, _) = call(
        &app,
        "POST",
        "/api/v1/backup-stores",
        Some(json!({"name": "bs", "path": bs})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, m) = call(&app, "GET", "/metrics", None).await;
    assert_eq!(s, StatusCode::OK);
    let m = m.as_str().unwrap();
    assert!(m.contains("ferry_vm_up{vm=\"m\"} 0"), "{m}");
    // backup stores: readable, empty
    assert!(m.contains("ferry_backup_store_up{store=\"bs\"} 1"), "{m}");
    assert!(
        m.contains("ferry_backup_store_backups{store=\"bs\"} 0"),
        "{m}"
    );
    assert!(
        m.contains("# TYPE ferry_backup_job_last_failed gauge"),
        "{m}"
    );
    let (s, doc) = call(&app, "GET", "/api/v1/openapi.json", None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(doc["paths"]["/api/v1/vms/{name}/start"].is_object());
    let (s, e) = call(&app, "GET", "/api/v1/nothing", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{e}");
}

/// The checked-in OpenAPI document must match the code. Regenerate with
/// `FERRY_UPDATE_OPENAPI=1 cargo test -p ferry-api openapi_file_is_current`.
#[test]
fn openapi_file_is_current() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../openapi.json");
    let now = openapi().to_pretty_json().unwrap() + "\n";
    if std::env::var_os("FERRY_UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &now).unwrap();
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(checked_in == now, "openapi.json is stale: run FERRY_UPDATE_OPENAPI=1 cargo test -p ferry-api openapi_file_is_current");
}

/// Creates resource pool `name` with a memory limit.
async fn post_pool(
    app: &Router,
    name: &str,
    parent: Option<&str>,
    limit: u64,
) -> (StatusCode, Value) {
    let body = json!({"name": name, "parent": parent, "memory": {"limit": limit as f64}});
    call(app, "POST", "/api/v1/resource-pools", Some(body)).await
}

#[tokio::test]
async fn drs_settings_pools_and_placement_on_one_host() {
    let (_d, app, _) = app().await;
    let (s, cfg) = call(&app, "GET", "/api/v1/drs/config", None).await;
    assert_eq!(
        (s, &cfg["mode"], &cfg["level"]),
        (StatusCode::OK, &json!("manual"), &json!(3))
    );
    // Bad settings: 400 naming the fields, nothing stored.
    let mut bad = cfg.clone();
    bad["level"] = json!(0);
    bad["max_vcpu_ratio"] = json!(1000);
    let (s, e) = call(&app, "PUT", "/api/v1/drs/config", Some(bad)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    let text = e.to_string();
    assert!(
        text.contains("level") && text.contains("max_vcpu_ratio"),
        "{e}"
    );
    let (_, now) = call(&app, "GET", "/api/v1/drs/config", None).await;
    assert_eq!(now, cfg);
    let mut good = cfg.clone();
    good["mode"] = json!("automatic");
    good["ha_host_failures"] = json!(1);
    let (s, _) = call(&app, "PUT", "/api/v1/drs/config", Some(good)).await;
    assert_eq!(s, StatusCode::OK);
    let (_, st) = call(&app, "GET", "/api/v1/drs", None).await;
    assert_eq!(st["config"]["mode"], "automatic", "{st}");

    // Resource pools: hierarchy checks, then a VM in one, then the delete rules.
    let (s, e) = post_pool(&app, "a", Some("nope"), 1 << 30).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    assert!(e.to_string().contains("nope"), "{e}");
    let (s, _) = post_pool(&app, "top", None, 1 << 30).await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, e) = post_pool(&app, "kid", Some("top"), 2 << 30).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    assert!(e.to_string().contains("above its parent"), "{e}");
    let (s, _) = post_pool(&app, "kid", Some("top"), 1 << 29).await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, _) = post_pool(&app, "kid", Some("top"), 1 << 29).await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (s, e) = call(
        &app,
        "POST",
        "/api/v1/vms",
        Some(json!({"name": "v", "memory_mib": 128, "resource_pool": "ghost"})),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    let (s, _) = call(
        &app,
        "POST",
        "/api/v1/vms",
        Some(json!({"name": "v", "memory_mib": 128, "resource_pool": "kid"})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, e) = call(&app, "DELETE", "/api/v1/resource-pools/top", None).await;
    assert_eq!(s, StatusCode::CONFLICT, "{e}");
    assert!(e.to_string().contains("sub-pools"), "{e}");
    let (s, e) = call(&app, "DELETE", "/api/v1/resource-pools/kid", None).await;
    assert_eq!(s, StatusCode::CONFLICT, "{e}");
    assert!(e.to_string().contains("still holds VMs: v"), "{e}");

    // Placement on one host: this host, with its verdict; an impossible label: none.
    let (s, r) = call(&app, "GET", "/api/v1/vms/v/placement", None).await;
    assert_eq!((s, &r["host"]), (StatusCode::OK, &json!("test")), "{r}");
    let (s, r) = call(
        &app,
        "POST",
        "/api/v1/placement",
        Some(json!({"name": "w", "memory_mib": 128, "placement": {"host_labels": ["gpu"]}})),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert!(r["host"].is_null(), "{r}");
    assert!(
        r["hosts"][0]["reasons"][0]
            .as_str()
            .unwrap()
            .contains("lacks label gpu"),
        "{r}"
    );
    let (s, e) = call(
        &app,
        "POST",
        "/api/v1/placement/create",
        Some(json!({"name": "w", "memory_mib": 128, "placement": {"host_labels": ["gpu"]}})),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{e}");
    let (s, _) = call(&app, "GET", "/api/v1/vms/w", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = call(&app, "GET", "/api/v1/vms/nope/placement", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

/// A request over TCP — from another machine or from loopback alike: only the token
/// lets it through; login sets a ticket cookie, which then works for reads and, with
/// the CSRF header, for writes.
#[tokio::test]
async fn tcp_requests_need_the_token_and_login_sets_a_ticket() {
    let d = tempfile::tempdir().unwrap();
    let agent = agent(&d).await;
    for remote in ["127.0.0.1:40000", "192.0.2.1:40000"] {
        let app = served(
            &agent,
            ConnInfo::Tcp {
                remote: remote.parse().unwrap(),
            },
        );
        let r = app
            .oneshot(Request::get("/api/v1/vms").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{remote}");
    }
    // A user's process on this host, over the local socket: not root, not in the group.
    let app = served(
        &agent,
        ConnInfo::Unix {
            uid: 4242,
            gid: 4242,
            pid: None,
        },
    );
    let r = app
        .oneshot(Request::get("/api/v1/vms").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let app = served(
        &agent,
        ConnInfo::Tcp {
            remote: "192.0.2.7:40000".parse().unwrap(),
        },
    );
    let send = |method: &str, uri: &str, headers: Vec<(&str, String)>, body: Option<Value>| {
        let mut req = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        let body = match body {
            Some(b) => {
                req = req.header("content-type", "application/json");
                Body::from(b.to_string())
            }
            None => Body::empty(),
        };
        app.clone().oneshot(req.body(body).unwrap())
    };
    let spec = json!({"name": "x1", "cpus": 1, "memory_mib": 64});
    // Without the token: refused, reads and writes alike, and nothing is made.
    let r = send("POST", "/api/v1/vms", vec![], Some(spec.clone()))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = send("GET", "/api/v1/vms", vec![], None).await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let b = r.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&b).contains("admin token"));
    let wrong = vec![("authorization", format!("Bearer {}x", &TEST_TOKEN[1..]))];
    let r = send("POST", "/api/v1/vms", wrong, Some(spec.clone()))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(agent.list_vms().await.unwrap().is_empty());
    // The UI's page and the session check are open.
    let r = send("GET", "/", vec![], None).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = send("GET", "/api/v1/session", vec![], None).await.unwrap();
    let b = r.into_body().collect().await.unwrap().to_bytes();
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["authenticated"], false);
    // A wrong login: 401, no cookie.
    let r = send(
        "POST",
        "/api/v1/login",
        vec![],
        Some(json!({"token": "nope"})),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(r.headers().get("set-cookie").is_none());
    // The right one sets the cookie; with it requests go through.
    let r = send(
        "POST",
        "/api/v1/login",
        vec![],
        Some(json!({"token": TEST_TOKEN})),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    assert!(
        !cookie.contains(TEST_TOKEN),
        "the cookie holds the token: {cookie}"
    );
    let pair = cookie.split(';').next().unwrap().to_string();
    let r = send(
        "GET",
        "/api/v1/session",
        vec![("cookie", pair.clone())],
        None,
    )
    .await
    .unwrap();
    let b = r.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        serde_json::from_slice::<Value>(&b).unwrap()["authenticated"],
        true
    );
    // A write with the ticket alone is what a form on another site could send: refused.
    let r = send(
        "POST",
        "/api/v1/vms",
        vec![("cookie", pair.clone())],
        Some(spec.clone()),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(agent.list_vms().await.unwrap().is_empty());
    let r = send(
        "POST",
        "/api/v1/vms",
        vec![("cookie", pair), ("x-ferry-csrf", "1".into())],
        Some(spec),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let bearer = vec![("authorization", format!("Bearer {TEST_TOKEN}"))];
    let r = send("GET", "/api/v1/vms/x1/metrics", bearer, None)
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let b = r.into_body().collect().await.unwrap().to_bytes();
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["interval_s"], 10);
    assert_eq!(v["memory_limit_bytes"], 64 << 20);
}

/// Forwarding to another host: only to hosts of the cluster, only API paths.
#[tokio::test]
async fn forwarding_refuses_unknown_hosts_and_other_paths() {
    let (_d, app, _) = app().await;
    let (s, v) = call(&app, "GET", "/api/v1/nodes/elsewhere/api/v1/vms", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    assert!(v["error"].as_str().unwrap().contains("elsewhere"), "{v}");
    for path in [
        "/api/v1/nodes/elsewhere/etc/passwd",
        "/api/v1/nodes/elsewhere/api/v1/nodes/x/api/v1/vms",
        "/api/v1/nodes/elsewhere/metrics",
    ] {
        let (s, v) = call(&app, "GET", path, None).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{path}: {v}");
        assert!(v.to_string().contains("forwarded"), "{v}");
    }
}

/// A peer that names a host file as an arriving VM's shared suspend state (which would
/// be fed to QEMU and deleted afterwards) is refused, and nothing is registered.
#[tokio::test]
async fn cold_arrivals_take_no_foreign_state_file() {
    let (d, app, agent) = app().await;
    let victim = d.path().join("precious");
    std::fs::write(&victim, b"keep me").unwrap();
    for f in [
        "/etc/passwd".to_string(),
        victim.display().to_string(),
        format!("{}/../precious/.vm-1-suspend.state", d.path().display()),
    ] {
        let (s, v) = call(
            &app,
            "POST",
            "/api/v1/migrations/cold",
            Some(json!({
                "source": "elsewhere",
                "vm": {"spec": {"name": "arriving", "cpus": 1, "memory_mib": 64}},
                "suspended": true,
                "suspend_file": f,
            })),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{f}: {v}");
        assert!(v.to_string().contains("suspend_file"), "{v}");
    }
    assert!(agent.list_vms().await.unwrap().is_empty());
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");
}

/// The one write open to callers without credentials (a host joining) takes small
/// bodies only, and without a cluster it changes nothing.
#[tokio::test]
async fn the_open_join_call_takes_small_bodies_only() {
    let d = tempfile::tempdir().unwrap();
    let agent = agent(&d).await;
    let app = served(
        &agent,
        ConnInfo::Tcp {
            remote: "192.0.2.9:40000".parse().unwrap(),
        },
    );
    let post = |body: String| {
        app.clone().oneshot(
            Request::post("/api/v1/cluster/members")
                .header("content-type", "application/json")
                .body(Body::from(body))
                .unwrap(),
        )
    };
    let big = format!(
        r#"{{"join_token":"x","name":"h9","address":"10.0.0.9","api":"https://10.0.0.9:8470","csr":"{}"}}"#,
        "A".repeat(200 << 10)
    );
    let r = post(big).await.unwrap();
    assert!(r.status().is_client_error(), "{}", r.status());
    let small = r#"{"join_token":"00","name":"h9","address":"10.0.0.9","api":"https://10.0.0.9:8470","csr":"x"}"#;
    let r = post(small.into()).await.unwrap();
    // Not in a cluster: nobody can join this host.
    assert_eq!(r.status(), StatusCode::CONFLICT);
}

/// A request over TCP from elsewhere with `Authorization: Bearer {bearer}`.
async fn as_bearer(
    agent: &Agent,
    bearer: &str,
    method: &str,
    uri: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let app = served(
        agent,
        ConnInfo::Tcp {
            remote: "192.0.2.9:40000".parse().unwrap(),
        },
    );
    call_with(&app, method, uri, Some(bearer), body).await
}

/// `POST /api/v1/login` with a password, from elsewhere.
async fn login(agent: &Agent, user: &str, password: &str) -> (StatusCode, Value) {
    as_bearer(
        agent,
        "x",
        "POST",
        "/api/v1/login",
        Some(json!({"user": user, "password": password})),
    )
    .await
}

/// Users, roles on paths, tokens and tickets, and who did what — over TCP, as a
/// client elsewhere would.
#[tokio::test]
async fn users_roles_tokens_and_audit() {
    let d = tempfile::tempdir().unwrap();
    let agent = agent(&d).await;
    let root = |m: &'static str, u: &'static str, b: Option<Value>| {
        let agent = agent.clone();
        async move { as_bearer(&agent, TEST_TOKEN, m, u, b).await }
    };
    // root is there from the start, its admin token is its token admin-test.
    let (s, users) = root("GET", "/api/v1/access/users", None).await;
    assert_eq!(s, StatusCode::OK, "{users}");
    assert_eq!(users[0]["name"], "root");
    let (_, toks) = root("GET", "/api/v1/access/users/root/tokens", None).await;
    assert_eq!(toks[0]["id"], "admin-test", "{toks}");
    for (name, pw) in [
        ("alice", Some("alice-pass-1234")),
        ("bob", None),
        ("carol", None),
    ] {
        let mut u = json!({"name": name});
        if let Some(p) = pw {
            u["password"] = json!(p);
        }
        let (s, v) = root("POST", "/api/v1/access/users", Some(u)).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        assert_eq!(v["created_by"], "root");
        assert!(v.get("password_hash").is_none());
    }
    // Bad input changes nothing.
    for bad in [
        json!({"name": "Root!"}),
        json!({"name": "dave", "password": "short"}),
        json!({"name": "dave", "extra": 1}),
    ] {
        let (s, _) = root("POST", "/api/v1/access/users", Some(bad.clone())).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}");
    }
    let (s, _) = root("POST", "/api/v1/access/users", Some(json!({"name": "bob"}))).await;
    assert_eq!(s, StatusCode::CONFLICT);
    for g in [
        json!({"path": "/", "user": "alice", "role": "Operator"}),
        json!({"path": "/pools/local", "user": "alice", "role": "Administrator"}),
        json!({"path": "/", "user": "bob", "role": "Auditor"}),
        json!({"path": "/vms/x1", "user": "carol", "role": "Operator"}),
    ] {
        let (s, v) = root("POST", "/api/v1/access/acl", Some(g)).await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
    for bad in [
        json!({"path": "/etc", "user": "bob", "role": "Auditor"}),
        json!({"path": "/", "user": "nobody", "role": "Auditor"}),
        json!({"path": "/", "user": "bob", "role": "God"}),
    ] {
        let (s, _) = root("POST", "/api/v1/access/acl", Some(bad.clone())).await;
        assert!(
            s == StatusCode::BAD_REQUEST || s == StatusCode::NOT_FOUND,
            "{bad}: {s}"
        );
    }
    assert_eq!(agent.acl().await.unwrap().len(), 4);
    let (s, _) = root(
        "POST",
        "/api/v1/vms",
        Some(json!({"name": "x1", "cpus": 1, "memory_mib": 64})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);

    // Tokens: made by root for bob, by carol for herself; shown once.
    let (s, t) = root(
        "POST",
        "/api/v1/access/users/bob/tokens",
        Some(json!({"id": "ro", "expires_days": 30})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{t}");
    let bob = t["value"].as_str().unwrap().to_string();
    assert!(bob.starts_with("bob!ro="));
    let carol_boot = agent
        .create_token(
            "carol",
            ferry_types::TokenCreate {
                id: "boot".into(),
                expires_days: None,
                comment: String::new(),
            },
        )
        .await
        .unwrap()
        .value;
    // A token does not make tokens (a leaked one must not outlive its revocation);
    // a login does.
    let (s, _) = as_bearer(
        &agent,
        &carol_boot,
        "POST",
        "/api/v1/access/users/carol/tokens",
        Some(json!({"id": "ci"})),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = root(
        "PUT",
        "/api/v1/access/users/carol/password",
        Some(json!({"password": "carol-pass-1234"})),
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (_, v) = login(&agent, "carol", "carol-pass-1234").await;
    let carol_t = v["ticket"].as_str().unwrap().to_string();
    let (s, t) = as_bearer(
        &agent,
        &carol_t,
        "POST",
        "/api/v1/access/users/carol/tokens",
        Some(json!({"id": "ci"})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{t}");
    assert_eq!(t["token"]["created_by"], "carol");
    let carol = t["value"].as_str().unwrap().to_string();
    let (s, _) = as_bearer(
        &agent,
        &carol,
        "POST",
        "/api/v1/access/users/bob/tokens",
        Some(json!({"id": "mine"})),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "a token for another user");

    // An Auditor reads, and cannot start a VM or change anything.
    let (s, _) = as_bearer(&agent, &bob, "GET", "/api/v1/vms", None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, e) = as_bearer(&agent, &bob, "POST", "/api/v1/vms/x1/start", None).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{e}");
    assert!(e["error"].as_str().unwrap().contains("PowerMgmt"), "{e}");
    assert_eq!(e["code"], "forbidden", "{e}");
    let (s, _) = as_bearer(&agent, &bob, "GET", "/api/v1/vms/x1/console/history", None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // An Operator cannot delete a pool (but its Administrator grant on one pool lets
    // it change that pool).
    let alice_t = {
        let (s, v) = login(&agent, "alice", "alice-pass-1234").await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["user"], "alice");
        assert_eq!(v["grants"].as_array().unwrap().len(), 2);
        v["ticket"].as_str().unwrap().to_string()
    };
    let (s, _) = root(
        "POST",
        "/api/v1/pools",
        Some(json!({"name": "p2", "path": d.path().join("p2")})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, _) = as_bearer(&agent, &alice_t, "DELETE", "/api/v1/pools/p2", None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = as_bearer(
        &agent,
        &alice_t,
        "POST",
        "/api/v1/vms",
        Some(json!({"name": "x2", "cpus": 1, "memory_mib": 64})),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = as_bearer(
        &agent,
        &alice_t,
        "POST",
        "/api/v1/access/users",
        Some(json!({"name": "eve"})),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert!(agent.get_pool("p2").await.is_ok());
    assert!(agent.list_vms().await.unwrap().len() == 1);
    // A grant on one VM: that VM only.
    let (s, _) = as_bearer(&agent, &carol, "GET", "/api/v1/vms/x1", None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = as_bearer(&agent, &carol, "GET", "/api/v1/vms", None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);

    // An import reads a host file by its path: not for a pool's administrator.
    let iso = d.path().join("boot.iso");
    std::fs::write(&iso, vec![1u8; 1 << 20]).unwrap();
    let import = json!({"name": "boot.iso", "source": iso});
    let (s, _) = as_bearer(
        &agent,
        &alice_t,
        "POST",
        "/api/v1/pools/local/import",
        Some(import.clone()),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // A disk on a pool she has no grant on is refused (she may use /pools/local only).
    let (s, _) = root(
        "POST",
        "/api/v1/access/acl",
        Some(json!({"path": "/vms", "user": "alice", "role": "Administrator"})),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, e) = as_bearer(
        &agent,
        &alice_t,
        "POST",
        "/api/v1/vms/x1/disks",
        Some(json!({"pool": "p2", "size": "1M"})),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{e}");
    assert!(e["error"].as_str().unwrap().contains("pool p2"), "{e}");
    // Who did what: alice's import (as an administrator of everything now) is her
    // task; an Auditor of / sees it, carol does not.
    let (s, _) = root(
        "POST",
        "/api/v1/access/acl",
        Some(json!({"path": "/", "user": "alice", "role": "Administrator"})),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, t) = as_bearer(
        &agent,
        &alice_t,
        "POST",
        "/api/v1/pools/local/import",
        Some(import),
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{t}");
    let id = t["task"].as_str().unwrap().to_string();
    let task = agent.tasks().wait(&id).await.unwrap();
    assert_eq!(task.user.as_deref(), Some("alice"));
    let uri = format!("/api/v1/tasks/{id}");
    let (s, v) = as_bearer(&agent, &alice_t, "GET", &uri, None).await;
    assert_eq!((s, v["user"].as_str()), (StatusCode::OK, Some("alice")));
    let (s, _) = as_bearer(&agent, &bob, "GET", &uri, None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = as_bearer(&agent, &carol, "GET", &uri, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let events = agent.events().list(0, None);
    let by = |needle: &str| {
        events
            .iter()
            .find(|e| e.message.contains(needle))
            .and_then(|e| e.user.clone())
    };
    assert_eq!(by("user bob created").as_deref(), Some("root"));
    assert_eq!(by("token carol!ci created").as_deref(), Some("carol"));
    assert_eq!(by("volume.import started").as_deref(), Some("alice"));

    // A wrong password, a wrong current password; a new password ends old tickets.
    for who in ["alice", "nobody"] {
        let (s, _) = login(&agent, who, "wrong-password-99").await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{who}");
    }
    let (s, _) = as_bearer(
        &agent,
        &alice_t,
        "PUT",
        "/api/v1/access/users/alice/password",
        Some(json!({"password": "alice-pass-5678", "current": "nope-nope-nope"})),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // Tickets name the second they were made: the change must come a second later.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let (s, _) = as_bearer(
        &agent,
        &alice_t,
        "PUT",
        "/api/v1/access/users/alice/password",
        Some(json!({"password": "alice-pass-5678", "current": "alice-pass-1234"})),
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = as_bearer(&agent, &alice_t, "GET", "/api/v1/vms", None).await;
    assert_eq!(
        s,
        StatusCode::UNAUTHORIZED,
        "a ticket from before the new password"
    );

    // A logout ends that ticket (and only that one) at once.
    let ticket = |v: Value| v["ticket"].as_str().unwrap().to_string();
    let t1 = ticket(login(&agent, "alice", "alice-pass-5678").await.1);
    // (A second later: a ticket names the second it was made.)
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let t2 = ticket(login(&agent, "alice", "alice-pass-5678").await.1);
    let (s, _) = as_bearer(&agent, &t1, "POST", "/api/v1/logout", None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = as_bearer(&agent, &t1, "GET", "/api/v1/vms", None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "a logged-out ticket");
    let (s, _) = as_bearer(&agent, &t2, "GET", "/api/v1/vms", None).await;
    assert_eq!(s, StatusCode::OK, "another session of the same user");

    // Revoked tokens and deleted users stop working at once, and so does a session a
    // token logged in.
    let (s, v) = as_bearer(
        &agent,
        "x",
        "POST",
        "/api/v1/login",
        Some(json!({ "token": bob })),
    )
    .await;
    assert_eq!(
        (s, v["user"].as_str()),
        (StatusCode::OK, Some("bob")),
        "{v}"
    );
    let bob_session = ticket(v);
    let (s, _) = as_bearer(&agent, &bob_session, "GET", "/api/v1/vms", None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = root("DELETE", "/api/v1/access/users/bob/tokens/ro", None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(v["revoked_ms"].is_u64());
    for t in [&bob, &bob_session] {
        let (s, _) = as_bearer(&agent, t, "GET", "/api/v1/vms", None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
    }
    let (s, _) = root("DELETE", "/api/v1/access/users/carol", None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = as_bearer(&agent, &carol, "GET", "/api/v1/vms/x1", None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(agent.acl().await.unwrap().iter().all(|e| e.user != "carol"));
    let (s, _) = root("DELETE", "/api/v1/access/users/root", None).await;
    assert_eq!(s, StatusCode::CONFLICT);
    // Root's own host token, revoked: refused over TCP (the local socket stays).
    let (s, _) = root(
        "DELETE",
        "/api/v1/access/users/root/tokens/admin-test",
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = root("GET", "/api/v1/vms", None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    agent.ensure_root(TEST_TOKEN).await.unwrap();
    let (s, _) = root("GET", "/api/v1/vms", None).await;
    assert_eq!(
        s,
        StatusCode::UNAUTHORIZED,
        "a restart does not bring it back"
    );
    let (s, _) = call(&served(&agent, ROOT), "GET", "/api/v1/vms", None).await;
    assert_eq!(s, StatusCode::OK);
}

/// Every operation of the API needs a privilege, except the few that must be open;
/// the ones only hosts call need Administrator on `/` (besides hosts).
#[test]
fn every_route_needs_a_privilege() {
    use ferry_access::{need, Need, Privilege};
    let doc = openapi();
    let mut n = 0;
    for (path, item) in &doc.paths.paths {
        let concrete = path.replace(['{', '}'], "");
        for (m, op) in [
            ("GET", &item.get),
            ("PUT", &item.put),
            ("POST", &item.post),
            ("DELETE", &item.delete),
        ] {
            if op.is_none() {
                continue;
            }
            n += 1;
            let got = need(m, &concrete);
            let open = matches!(
                (m, path.as_str()),
                (
                    "POST",
                    "/api/v1/login" | "/api/v1/logout" | "/api/v1/cluster/members"
                ) | ("GET", "/api/v1/session")
            );
            assert_eq!(got == Need::Open, open, "{m} {path}: {got:?}");
            // (certs/sign checks for a host's certificate itself.)
            let host_only = path.starts_with("/api/v1/migrations/incoming")
                || path.starts_with("/api/v1/migrations/cold")
                || path.starts_with("/api/v1/replication/");
            if host_only && m != "GET" {
                assert_eq!(got, Need::On(Privilege::Modify, "/".into()), "{m} {path}");
            }
        }
    }
    assert!(n > 90, "{n} operations");
}
