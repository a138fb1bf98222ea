//! `ferry vm console`: the serial console over the daemon's websocket. On a terminal it
//! switches to raw mode and Ctrl-] detaches; otherwise stdin is forwarded as it comes.

use crate::client::Client;
use anyhow::{Context, Result};
use futures::{SinkExt, StreamExt};
use std::io::{IsTerminal, Write};
use tokio::io::AsyncReadExt;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const DETACH: u8 = 0x1d; // Ctrl-]

struct RawGuard;
impl Drop for RawGuard {
    fn drop(&mut self) {
        let _ = crossterm::terminal::disable_raw_mode();
    }
}

pub async fn attach(c: &Client, name: &str) -> Result<()> {
    let url = c.ws_url(&format!("/api/v1/vms/{name}/console"));
    let mut request = url
        .as_str()
        .into_client_request()
        .with_context(|| format!("Bad console URL {url}"))?;
    if let Some(b) = c.bearer() {
        request.headers_mut().insert(
            "authorization",
            b.parse()
                .context("The admin token is not a valid header value")?,
        );
    }
    match c.socket() {
        Some(sock) => {
            let stream = tokio::net::UnixStream::connect(sock)
                .await
                .with_context(|| format!("Connect to {}", sock.display()))?;
            let r = tokio_tungstenite::client_async(request, stream).await;
            session(opened(r, name, &url)?, name).await
        }
        None => match c.tls() {
            Some(tls) => {
                let uri = request.uri().clone();
                let host = uri
                    .host()
                    .unwrap_or("")
                    .trim_matches(['[', ']'])
                    .to_string();
                let addr = format!("{host}:{}", uri.port_u16().unwrap_or(443));
                let tcp = tokio::net::TcpStream::connect(&addr)
                    .await
                    .with_context(|| format!("Connect to {addr}"))?;
                let server_name = rustls::pki_types::ServerName::try_from(host)
                    .context("The server's host name")?;
                let stream = tokio_rustls::TlsConnector::from(tls)
                    .connect(server_name, tcp)
                    .await
                    .with_context(|| format!("TLS with {addr}"))?;
                let r = tokio_tungstenite::client_async(request, stream).await;
                session(opened(r, name, &url)?, name).await
            }
            None => {
                let r = tokio_tungstenite::connect_async(request).await;
                session(opened(r, name, &url)?, name).await
            }
        },
    }
}

/// The websocket, or the daemon's refusal as an error that says why.
fn opened<W, R>(
    r: Result<(W, R), tokio_tungstenite::tungstenite::Error>,
    name: &str,
    url: &str,
) -> Result<W> {
    match r {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            anyhow::bail!(
                "Cannot open the console of {name}: {} {body}",
                resp.status()
            );
        }
        Err(e) => Err(e).with_context(|| format!("Connect to {url}")),
    }
}

async fn session<S>(ws: tokio_tungstenite::WebSocketStream<S>, name: &str) -> Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let tty = std::io::stdin().is_terminal();
    let _guard = if tty {
        crossterm::terminal::enable_raw_mode().context("Raw terminal mode")?;
        eprint!("[ferry: console of {name}; Ctrl-] detaches]\r\n");
        Some(RawGuard)
    } else {
        None
    };
    let (mut tx, mut rx) = ws.split();
    let output = async {
        let mut out = std::io::stdout();
        while let Some(Ok(m)) = rx.next().await {
            match m {
                Message::Binary(b) => {
                    let _ = out.write_all(&b);
                    let _ = out.flush();
                }
                Message::Text(t) => {
                    let _ = out.write_all(t.as_bytes());
                    let _ = out.flush();
                }
                Message::Close(_) => break,
                _ => {}
            }
        }
    };
    let input = async {
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 1024];
        loop {
            let n = match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let data = &buf[..n];
            if tty {
                if let Some(p) = data.iter().position(|b| *b == DETACH) {
                    if p > 0 {
                        let _ = tx.send(Message::Binary(data[..p].to_vec().into())).await;
                    }
                    return;
                }
            }
            if tx
                .send(Message::Binary(data.to_vec().into()))
                .await
                .is_err()
            {
                return;
            }
        }
        // stdin ended (a pipe): let the output of what was typed arrive, then leave.
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    };
    tokio::select! { _ = output => {}, _ = input => {} }
    if tty {
        eprint!("\r\n[ferry: detached]\r\n");
    }
    Ok(())
}
