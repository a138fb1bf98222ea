//! A client for the QEMU guest agent (qemu-ga) on the host end of its virtio-serial
//! channel. The protocol is QMP's without greeting or ids: one JSON command per line,
//! one reply per command. The other end is the guest — whatever it sends is hostile:
//! lines are bounded, every wait has a timeout, and a stale reply left over from an
//! earlier client is skipped by `guest-sync-delimited` (the agent sends 0xFF first,
//! then the number we chose).
//!
//! QEMU serves one connection on the socket at a time: the caller keeps one client per
//! VM at once.

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// The longest line the guest may send (a reply listing every interface of a busy
/// guest stays far below).
pub const MAX_LINE: usize = 1 << 20;

/// How long the agent has to answer the sync at connect.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot connect to the guest agent's socket {path}: {source}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the guest agent's socket is not served by the VM's QEMU")]
    WrongPeer,
    #[error("the guest agent did not answer {command} within {after:?} (is qemu-guest-agent running in the guest?)")]
    Timeout { command: String, after: Duration },
    #[error("the guest agent closed the channel")]
    Closed,
    #[error("guest agent channel: {0}")]
    Io(#[source] std::io::Error),
    #[error("the guest agent sent a line longer than {MAX_LINE} bytes")]
    TooLong,
    #[error("the guest agent refused {command}: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("the guest agent's reply to {command} is not what the protocol says: {reason}")]
    Protocol { command: String, reason: String },
}

/// One connection to a VM's guest agent, synced.
pub struct GuestAgent {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

/// Reads up to and including `delim`, at most `max` bytes; the bytes without `delim`.
async fn read_until_bounded(
    r: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
    delim: u8,
    max: usize,
) -> Result<Vec<u8>, AgentError> {
    let mut out = vec![];
    loop {
        let buf = r.fill_buf().await.map_err(AgentError::Io)?;
        if buf.is_empty() {
            return Err(AgentError::Closed);
        }
        if let Some(i) = buf.iter().position(|b| *b == delim) {
            if out.len() + i > max {
                return Err(AgentError::TooLong);
            }
            out.extend_from_slice(&buf[..i]);
            r.consume(i + 1);
            return Ok(out);
        }
        let n = buf.len();
        if out.len() + n > max {
            return Err(AgentError::TooLong);
        }
        out.extend_from_slice(buf);
        r.consume(n);
    }
}

/// A reply line: `Ok(value)` for `{"return": …}`, the error for `{"error": …}`, None for
/// anything else (skipped).
fn parse_reply(command: &str, line: &[u8]) -> Option<Result<Value, AgentError>> {
    let v: Value = serde_json::from_slice(line).ok()?;
    let obj = v.as_object()?;
    if let Some(r) = obj.get("return") {
        return Some(Ok(r.clone()));
    }
    let e = obj.get("error")?;
    // the guest's words: no control or format characters reach a log or a terminal
    let s = |k: &str| {
        e.get(k)
            .and_then(Value::as_str)
            .unwrap_or("")
            .chars()
            .filter(|c| !c.is_control() && !is_format(*c))
            .take(512)
            .collect::<String>()
    };
    Some(Err(AgentError::Command {
        command: command.into(),
        class: s("class"),
        desc: s("desc"),
    }))
}

/// Unicode format characters (bidi overrides, zero-width): they reorder or hide text
/// shown to an admin.
pub fn is_format(c: char) -> bool {
    matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{206f}' | '\u{feff}')
}

impl GuestAgent {
    /// Connects to the agent's socket (served by QEMU `pid` when given) and syncs.
    pub async fn connect(path: &Path, pid: Option<i32>) -> Result<GuestAgent, AgentError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| AgentError::Connect {
                path: path.display().to_string(),
                source,
            })?;
        if let Some(pid) = pid {
            let peer = stream.peer_cred().ok().and_then(|c| c.pid());
            if peer != Some(pid) {
                return Err(AgentError::WrongPeer);
            }
        }
        let (r, writer) = stream.into_split();
        let mut a = GuestAgent {
            reader: BufReader::new(r),
            writer,
        };
        a.sync().await?;
        Ok(a)
    }

    async fn send(&mut self, cmd: &Value) -> Result<(), AgentError> {
        let mut line = serde_json::to_vec(cmd).unwrap_or_default();
        line.push(b'\n');
        self.writer.write_all(&line).await.map_err(AgentError::Io)
    }

    /// `guest-sync-delimited` with a fresh number: everything before the agent's 0xFF
    /// and any reply not carrying our number is dropped.
    async fn sync(&mut self) -> Result<(), AgentError> {
        let id: u32 = rand::random();
        let command = "guest-sync-delimited";
        self.send(&json!({"execute": command, "arguments": {"id": id}}))
            .await?;
        let wait = async {
            // Junk before the agent's delimiter is dropped; after it, the reply
            // carrying our number (a line holding another 0xFF counts from the last).
            read_until_bounded(&mut self.reader, 0xff, MAX_LINE).await?;
            loop {
                let line = read_until_bounded(&mut self.reader, b'\n', MAX_LINE).await?;
                let tail = match line.iter().rposition(|b| *b == 0xff) {
                    Some(i) => &line[i + 1..],
                    None => &line[..],
                };
                if let Some(Ok(v)) = parse_reply(command, tail) {
                    if v.as_u64() == Some(u64::from(id)) {
                        return Ok(());
                    }
                }
            }
        };
        match tokio::time::timeout(SYNC_TIMEOUT, wait).await {
            Ok(r) => r,
            Err(_) => Err(AgentError::Timeout {
                command: command.into(),
                after: SYNC_TIMEOUT,
            }),
        }
    }

    /// Runs `command` and returns its reply, within `timeout`.
    pub async fn execute(
        &mut self,
        command: &str,
        args: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, AgentError> {
        let mut cmd = json!({"execute": command});
        if let Some(a) = args {
            cmd["arguments"] = a;
        }
        self.send(&cmd).await?;
        let wait = async {
            loop {
                let line = read_until_bounded(&mut self.reader, b'\n', MAX_LINE).await?;
                let line = line.strip_prefix(&[0xff]).unwrap_or(&line);
                if let Some(r) = parse_reply(command, line) {
                    return r;
                }
            }
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(r) => r,
            Err(_) => Err(AgentError::Timeout {
                command: command.into(),
                after: timeout,
            }),
        }
    }

    /// [`execute`](Self::execute) with the reply decoded.
    pub async fn call<T: DeserializeOwned>(
        &mut self,
        command: &str,
        args: Option<Value>,
        timeout: Duration,
    ) -> Result<T, AgentError> {
        let v = self.execute(command, args, timeout).await?;
        serde_json::from_value(v).map_err(|e| AgentError::Protocol {
            command: command.into(),
            reason: e.to_string(),
        })
    }

    /// A command that has no reply when it works (`guest-shutdown`): Ok when the
    /// agent sends nothing back within `wait` (or closes), its error otherwise.
    pub async fn execute_silent(
        &mut self,
        command: &str,
        args: Option<Value>,
        wait: Duration,
    ) -> Result<(), AgentError> {
        match self.execute(command, args, wait).await {
            Ok(_) | Err(AgentError::Timeout { .. }) | Err(AgentError::Closed) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// `guest-get-osinfo` (the fields ferry shows).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct OsInfo {
    pub id: Option<String>,
    pub pretty_name: Option<String>,
    pub version_id: Option<String>,
    pub kernel_release: Option<String>,
    pub machine: Option<String>,
}

/// `guest-get-host-name`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct HostName {
    pub host_name: String,
}

/// One entry of `guest-network-get-interfaces`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Interface {
    pub name: String,
    pub hardware_address: Option<String>,
    #[serde(default)]
    pub ip_addresses: Vec<IpAddress>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct IpAddress {
    pub ip_address: String,
    pub prefix: u8,
}

/// `guest-info` (only the version).
#[derive(Debug, Clone, Deserialize)]
pub struct AgentInfo {
    pub version: String,
}

#[cfg(test)]
mod tests;
