//! A small typed client for the REST API.

use anyhow::{anyhow, bail, Context, Result};
use ferry_types::{ApiErrorBody, Task, TaskAccepted, TaskState};
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::time::Duration;

/// The daemon's local socket, used when no `--server` is given.
pub const DEFAULT_SOCKET: &str = "/run/ferry/api.sock";

#[derive(Clone)]
pub struct Client {
    /// Where requests go: the server's URL, or a fixed one over the local socket.
    pub base: String,
    /// Path prefix: empty, or `/api/v1/nodes/HOST` for another host of the cluster.
    prefix: String,
    /// The local socket, when requests go there.
    socket: Option<std::path::PathBuf>,
    http: reqwest::Client,
    token: Option<String>,
    /// TLS settings for `https://` servers (the cluster CA).
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

/// The cluster CA a host keeps (readable by root): the default `--ca` on a host.
pub const DEFAULT_CA: &str = "/var/lib/ferry/pki/ca.crt";

/// A secret from a file (`-`: standard input), else from the environment variable
/// `env`; never from the command line.
pub fn read_secret(file: Option<&std::path::Path>, env: &str) -> anyhow::Result<Option<String>> {
    use anyhow::Context;
    let raw = match file {
        Some(f) if f.as_os_str() == "-" => {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                .context("Read the secret from standard input")?;
            s
        }
        Some(f) => std::fs::read_to_string(f)
            .with_context(|| format!("Read the secret from {}", f.display()))?,
        None => return Ok(std::env::var(env).ok().filter(|t| !t.trim().is_empty())),
    };
    let t = raw.trim().to_string();
    anyhow::ensure!(
        !t.is_empty(),
        "the secret (file or standard input) is empty"
    );
    Ok(Some(t))
}

/// The cluster CA's PEM from `path`.
pub fn read_ca(path: &std::path::Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| {
        format!(
            "Read the cluster CA {} (give --ca FILE or FERRY_CA: a member's {DEFAULT_CA}, checked against the fingerprint `ferry cluster certs status` shows)",
            path.display()
        )
    })
}

/// The local daemon's admin token, where this user may read it.
pub fn default_token() -> Option<String> {
    std::fs::read_to_string("/var/lib/ferry/admin-token")
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

impl Client {
    /// A daemon at a URL: `https://HOST:PORT`, its certificate checked against the
    /// cluster CA in `ca` (PEM; any member of that cluster will do), or `http://` on
    /// loopback for a daemon run with `--plain-http`.
    pub fn new(base: &str, token: Option<String>, ca: Option<&std::path::Path>) -> Result<Client> {
        let pem = if base.starts_with("https://") {
            let path = ca.unwrap_or(std::path::Path::new(DEFAULT_CA));
            Some((read_ca(path)?, path.display().to_string()))
        } else {
            None
        };
        Client::with_ca_pem(base, token, pem)
    }

    /// [`Client::new`] with the CA's PEM text and where it came from (for messages).
    pub fn with_ca_pem(
        base: &str,
        token: Option<String>,
        ca: Option<(String, String)>,
    ) -> Result<Client> {
        let base = base.trim_end_matches('/').to_string();
        let mut tls = None;
        let http = if base.starts_with("https://") {
            let Some((pem, from)) = ca else {
                bail!("--server {base}: no cluster CA to check it against (--ca FILE)");
            };
            let cfg = ferry_pki::ca_client_config(&pem, ferry_pki::Expect::AnyMember)
                .with_context(|| format!("The cluster CA {from}"))?;
            tls = Some(std::sync::Arc::new(cfg.clone()));
            reqwest::Client::builder()
                .use_preconfigured_tls(cfg)
                .build()
                .context("HTTPS client")?
        } else if base.starts_with("http://") {
            // The token travels in clear: only to this machine (a daemon run with
            // --plain-http listens on loopback only).
            let host = base
                .trim_start_matches("http://")
                .split(['/', '?'])
                .next()
                .unwrap_or("");
            let host = host
                .rsplit_once(':')
                .map_or(host, |(h, _)| h)
                .trim_matches(['[', ']']);
            let local = host == "localhost"
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            if !local {
                bail!(
                    "--server {base}: plain http:// only to this machine; give https://HOST:PORT"
                );
            }
            reqwest::Client::new()
        } else {
            bail!("--server {base}: give https://HOST:PORT");
        };
        Ok(Client {
            base,
            prefix: String::new(),
            socket: None,
            http,
            token,
            tls,
        })
    }

    /// The TLS settings for `https://` servers.
    pub fn tls(&self) -> Option<std::sync::Arc<rustls::ClientConfig>> {
        self.tls.clone()
    }

    /// The daemon of this host over its local socket (the kernel tells it who we are).
    pub fn local(socket: &std::path::Path, token: Option<String>) -> Result<Client> {
        let http = reqwest::Client::builder()
            .unix_socket(socket)
            .build()
            .context("HTTP client over the local socket")?;
        Ok(Client {
            base: "http://localhost".into(),
            prefix: String::new(),
            socket: Some(socket.to_path_buf()),
            http,
            token,
            tls: None,
        })
    }

    /// Another host of the cluster, through this daemon (which forwards the request).
    pub fn at_node(&self, host: &str) -> Client {
        let mut c = self.clone();
        c.prefix = format!("/api/v1/nodes/{host}");
        c
    }

    /// What the client talks to, for messages.
    pub fn target(&self) -> String {
        match &self.socket {
            Some(s) => format!("{} (--socket/FERRY_SOCKET)", s.display()),
            None => format!("{} (--server/FERRY_SERVER)", self.base),
        }
    }

    /// The local socket, when requests go there.
    pub fn socket(&self) -> Option<&std::path::Path> {
        self.socket.as_deref()
    }

    /// The token as a request header, for the websocket of the console.
    pub fn bearer(&self) -> Option<String> {
        self.token.as_ref().map(|t| format!("Bearer {t}"))
    }

    /// A request with a typed body (one of `ferry_types`' request structs).
    pub async fn send<B: serde::Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: &B,
    ) -> Result<T> {
        let v = serde_json::to_value(body)?;
        self.request(method, path, Some(&v)).await
    }

    pub async fn request<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<T> {
        let url = format!("{}{}{path}", self.base, self.prefix);
        let mut req = self.http.request(method.clone(), &url);
        if let Some(b) = body {
            req = req.json(b);
        }
        self.answer(method, path, req).await
    }

    /// A PUT of a file's bytes from `offset` on (streamed), with query `query`.
    pub async fn put_file<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
        file: &std::path::Path,
        offset: u64,
    ) -> Result<T> {
        use tokio::io::AsyncSeekExt;
        let mut f = tokio::fs::File::open(file)
            .await
            .with_context(|| format!("Open {}", file.display()))?;
        let len = f.metadata().await?.len();
        f.seek(std::io::SeekFrom::Start(offset)).await?;
        let url = format!("{}{}{path}", self.base, self.prefix);
        let req = self
            .http
            .put(&url)
            .query(query)
            .header("content-type", "application/octet-stream")
            .header("content-length", len.saturating_sub(offset))
            .body(reqwest::Body::wrap_stream(
                tokio_util::io::ReaderStream::new(f),
            ));
        self.answer(Method::PUT, path, req).await
    }

    async fn answer<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        mut req: reqwest::RequestBuilder,
    ) -> Result<T> {
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.with_context(|| {
            format!(
                "Cannot reach the ferry daemon at {} (is `ferry serve` running?)",
                self.target()
            )
        })?;
        let status = resp.status();
        let bytes = resp.bytes().await.context("Read the daemon's answer")?;
        if !status.is_success() {
            match serde_json::from_slice::<ApiErrorBody>(&bytes) {
                Ok(e) if e.causes.is_empty() => bail!("{} ({})", e.error, status.as_u16()),
                Ok(e) => bail!(
                    "{} ({}):\n  - {}",
                    e.error,
                    status.as_u16(),
                    e.causes.join("\n  - ")
                ),
                Err(_) => bail!(
                    "{method} {path} failed: {status}: {}",
                    String::from_utf8_lossy(&bytes)
                ),
            }
        }
        if status == StatusCode::NO_CONTENT || bytes.is_empty() {
            return serde_json::from_value(Value::Null).map_err(|e| anyhow!("Empty answer: {e}"));
        }
        serde_json::from_slice(&bytes)
            .with_context(|| format!("Unexpected answer to {method} {path}"))
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.request(Method::GET, path, None).await
    }

    /// A GET with query parameters (encoded here: any characters).
    async fn get_response(&self, path: &str, query: &[(&str, &str)]) -> Result<reqwest::Response> {
        let url = format!("{}{}{path}", self.base, self.prefix);
        let mut req = self.http.get(&url).query(query);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.with_context(|| {
            format!(
                "Cannot reach the ferry daemon at {} (is `ferry serve` running?)",
                self.target()
            )
        })?;
        let status = resp.status();
        if !status.is_success() {
            let bytes = resp.bytes().await.unwrap_or_default();
            let e = serde_json::from_slice::<ApiErrorBody>(&bytes).unwrap_or(ApiErrorBody {
                code: ferry_types::code_for_status(status.as_u16()).into(),
                error: String::from_utf8_lossy(&bytes).into_owned(),
                causes: vec![],
            });
            bail!("{} ({})", e.error, status.as_u16());
        }
        Ok(resp)
    }

    /// [`Client::get`] with query parameters.
    pub async fn get_query<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<T> {
        let bytes = self
            .get_response(path, query)
            .await?
            .bytes()
            .await
            .context("Read the daemon's answer")?;
        serde_json::from_slice(&bytes).with_context(|| format!("Unexpected answer to GET {path}"))
    }

    /// Streams a GET's body into `out`; the bytes written. A body broken off half-way
    /// is an error.
    pub async fn download(
        &self,
        path: &str,
        query: &[(&str, &str)],
        out: &mut (dyn std::io::Write + Send),
    ) -> Result<u64> {
        let mut resp = self.get_response(path, query).await?;
        let mut n = 0u64;
        while let Some(chunk) = resp
            .chunk()
            .await
            .context("The download broke off (the daemon says why in its log)")?
        {
            out.write_all(&chunk).context("Write the download")?;
            n += chunk.len() as u64;
        }
        out.flush().context("Write the download")?;
        Ok(n)
    }

    pub async fn get_text(&self, path: &str) -> Result<String> {
        let url = format!("{}{}{path}", self.base, self.prefix);
        let mut req = self.http.get(&url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("Cannot reach {}", self.target()))?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            let e: ApiErrorBody = serde_json::from_str(&text).unwrap_or(ApiErrorBody {
                code: ferry_types::code_for_status(status.as_u16()).into(),
                error: text,
                causes: vec![],
            });
            bail!("{} ({})", e.error, status.as_u16());
        }
        Ok(text)
    }

    /// Waits for a task, with a progress bar unless `quiet`; fails if the task failed.
    pub async fn wait_task(&self, accepted: TaskAccepted, quiet: bool) -> Result<Task> {
        let bar = if quiet {
            ProgressBar::hidden()
        } else {
            let b = ProgressBar::new(1000);
            b.set_style(
                ProgressStyle::with_template("{spinner} {prefix} [{bar:30}] {percent:>3}% {msg}")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            b
        };
        let mut shown = 0;
        loop {
            let t: Task = self
                .get(&format!("/api/v1/tasks/{}", accepted.task))
                .await?;
            bar.set_prefix(format!("{} {}", t.kind, t.target));
            bar.set_position(permille(t.progress));
            for l in t.log.iter().skip(shown) {
                bar.println(format!("  {l}"));
            }
            shown = t.log.len();
            match t.state {
                TaskState::Running => tokio::time::sleep(Duration::from_millis(150)).await,
                TaskState::Succeeded => {
                    bar.finish_and_clear();
                    return Ok(t);
                }
                TaskState::Failed => {
                    bar.abandon();
                    bail!(
                        "Task {} failed: {}",
                        t.id,
                        t.error.clone().unwrap_or_default()
                    );
                }
            }
        }
    }

    pub fn ws_url(&self, path: &str) -> String {
        let b = self
            .base
            .replacen("http://", "ws://", 1)
            .replacen("https://", "wss://", 1);
        format!("{b}{}{path}", self.prefix)
    }
}

/// A task's progress (0 to 1) in thousandths, for the progress bar.
#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "clamped to 0..=1000 first"
)]
fn permille(p: f32) -> u64 {
    (p.clamp(0.0, 1.0) * 1000.0).round() as u64
}
