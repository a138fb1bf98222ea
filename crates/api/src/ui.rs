//! The web UI: the files `ui/` builds (scripts/setup.sh runs npm there), embedded in the
//! binary at compile time. `/` is the page, `/ui/...` its scripts, styles and the
//! unbundled noVNC modules. Without a built UI the page says how to build it.

use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

#[derive(rust_embed::Embed)]
#[folder = "../../ui/dist"]
struct Assets;

const NOT_BUILT: &str = "<!doctype html><title>ferry</title><p>The web UI is not built into this binary: run <code>scripts/setup.sh</code> (it runs <code>npm ci &amp;&amp; npm run build</code> in <code>ui/</code>), then build ferry again. The REST API is at <a href=\"/api/docs\">/api/docs</a>.</p>";

/// Whether this binary carries a built UI.
pub fn built() -> bool {
    Assets::get("index.html").is_some()
}

fn file(path: &str, headers: &HeaderMap) -> Response {
    let Some(f) = Assets::get(path) else {
        if path == "index.html" {
            return (
                [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
                NOT_BUILT,
            )
                .into_response();
        }
        return crate::ApiError::new(StatusCode::NOT_FOUND, format!("No such file: /ui/{path}"))
            .into_response();
    };
    let etag = format!(
        "\"{}\"",
        f.metadata
            .sha256_hash()
            .iter()
            .take(12)
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    let mut h = HeaderMap::new();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    if headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == etag.as_bytes())
    {
        return (StatusCode::NOT_MODIFIED, h).into_response();
    }
    if let Ok(v) = HeaderValue::from_str(f.metadata.mimetype()) {
        h.insert(header::CONTENT_TYPE, v);
    }
    if path == "index.html" {
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "default-src 'self'; connect-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'",
            ),
        );
    }
    (h, f.data.into_owned()).into_response()
}

/// `GET /`: the page.
pub async fn index(headers: HeaderMap) -> Response {
    file("index.html", &headers)
}

/// `GET /ui/{*path}`: its files.
pub async fn asset(Path(path): Path<String>, headers: HeaderMap) -> Response {
    file(&path, &headers)
}
