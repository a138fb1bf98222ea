//! The connection: a reader task routes replies by id and events to a broadcast channel.

use crate::codec::{parse_message, Message};
use crate::QmpError;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{broadcast, oneshot, watch};

type Reply = Result<Value, (String, String)>;

/// Writes a first part of `bytes` with `fd` attached (`SCM_RIGHTS`); returns how many
/// bytes went.
async fn send_with_fd(
    stream: &UnixStream,
    bytes: &[u8],
    fd: std::os::fd::RawFd,
) -> std::io::Result<usize> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    use std::os::fd::AsRawFd;
    loop {
        stream.writable().await?;
        let r = stream.try_io(tokio::io::Interest::WRITABLE, || {
            let iov = [std::io::IoSlice::new(bytes)];
            let fds = [fd];
            let cmsg = [ControlMessage::ScmRights(&fds)];
            sendmsg::<()>(stream.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)
                .map_err(std::io::Error::from)
        });
        match r {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// An asynchronous event from QEMU (`STOP`, `RESUME`, `SHUTDOWN`, `MIGRATION`, ...).
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    pub name: String,
    pub data: Value,
    pub timestamp_us: u64,
}

struct Inner {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Mutex<Option<HashMap<u64, oneshot::Sender<Reply>>>>,
    next_id: AtomicU64,
    events: broadcast::Sender<QmpEvent>,
    closed: watch::Receiver<bool>,
}

/// A QMP connection. Cheap to clone; all clones share the connection.
#[derive(Clone)]
pub struct Qmp {
    inner: Arc<Inner>,
    timeout: Duration,
    greeting: Arc<Value>,
}

const GREETING_TIMEOUT: Duration = Duration::from_secs(10);

impl Qmp {
    /// Connects, reads the greeting and negotiates capabilities.
    pub async fn connect(path: impl AsRef<Path>) -> Result<Qmp, QmpError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.display().to_string(),
                source,
            })?;
        Self::handshake(stream).await
    }

    /// Connects, retrying while the socket is missing or refuses (QEMU still starting)
    /// until `within` has passed.
    pub async fn connect_retry(path: impl AsRef<Path>, within: Duration) -> Result<Qmp, QmpError> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match Self::connect(path.as_ref()).await {
                Ok(q) => return Ok(q),
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(QmpError::Connect { .. }) => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// [`Qmp::connect_retry`], accepting only a socket whose other end is process
    /// `pid` (the socket's folder may belong to QEMU's user, who could put another
    /// socket in its place).
    pub async fn connect_retry_to(
        path: impl AsRef<Path>,
        within: Duration,
        pid: i32,
    ) -> Result<Qmp, QmpError> {
        let path = path.as_ref();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match UnixStream::connect(path).await {
                Ok(stream) => {
                    let peer = stream.peer_cred().ok().and_then(|c| c.pid());
                    if peer != Some(pid) {
                        return Err(QmpError::Connect {
                            path: path.display().to_string(),
                            source: std::io::Error::other(format!(
                                "the socket is served by {peer:?}, not QEMU {pid}"
                            )),
                        });
                    }
                    return Self::handshake(stream).await;
                }
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(QmpError::Connect {
                        path: path.display().to_string(),
                        source: e,
                    })
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// Runs the protocol on an already connected stream.
    pub async fn handshake(stream: UnixStream) -> Result<Qmp, QmpError> {
        let (rd, wr) = stream.into_split();
        let mut lines = BufReader::new(rd).lines();
        let greeting = tokio::time::timeout(GREETING_TIMEOUT, async {
            loop {
                match lines.next_line().await {
                    Ok(Some(l)) => {
                        if let Some(Message::Greeting(g)) = parse_message(&l) {
                            return Ok(g);
                        }
                    }
                    Ok(None) => {
                        return Err(QmpError::Handshake("closed before the greeting".into()))
                    }
                    Err(e) => return Err(QmpError::Io(e)),
                }
            }
        })
        .await
        .map_err(|_| QmpError::Handshake("no greeting".into()))??;

        let (events, _) = broadcast::channel(256);
        let (closed_tx, closed_rx) = watch::channel(false);
        let inner = Arc::new(Inner {
            writer: tokio::sync::Mutex::new(wr),
            pending: Mutex::new(Some(HashMap::new())),
            next_id: AtomicU64::new(1),
            events,
            closed: closed_rx,
        });
        tokio::spawn(read_loop(
            lines,
            Arc::downgrade(&inner),
            inner.events.clone(),
            closed_tx,
        ));
        let qmp = Qmp {
            inner,
            timeout: Duration::from_secs(30),
            greeting: Arc::new(greeting),
        };
        qmp.execute("qmp_capabilities", None)
            .await
            .map_err(|e| QmpError::Handshake(e.to_string()))?;
        Ok(qmp)
    }

    /// The same connection with another per-command timeout.
    pub fn with_timeout(mut self, t: Duration) -> Qmp {
        self.timeout = t;
        self
    }

    /// QEMU's greeting (`{"version": ..., "capabilities": [...]}`).
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// A new subscription to the events that arrive from now on.
    pub fn events(&self) -> broadcast::Receiver<QmpEvent> {
        self.inner.events.subscribe()
    }

    pub fn is_closed(&self) -> bool {
        *self.inner.closed.borrow()
    }

    /// Resolves when the connection is gone (QEMU exited or closed the socket).
    pub async fn closed(&self) {
        let mut rx = self.inner.closed.clone();
        let _ = rx.wait_for(|c| *c).await;
    }

    /// Sends a command and waits for its reply (matched by id).
    pub async fn execute(&self, command: &str, args: Option<Value>) -> Result<Value, QmpError> {
        self.execute_fd(command, args, None).await
    }

    /// Hands QEMU an open file under `name` (`getfd`, the descriptor sent alongside
    /// the command with `SCM_RIGHTS`): QEMU then uses it by that name (a tap's
    /// `fd=NAME`, a migration's `fd:NAME`) and never opens a host path itself.
    pub async fn send_fd(
        &self,
        name: &str,
        fd: std::os::fd::BorrowedFd<'_>,
    ) -> Result<(), QmpError> {
        use std::os::fd::AsRawFd;
        self.execute_fd(
            "getfd",
            Some(json!({ "fdname": name })),
            Some(fd.as_raw_fd()),
        )
        .await
        .map(|_| ())
    }

    async fn execute_fd(
        &self,
        command: &str,
        args: Option<Value>,
        fd: Option<std::os::fd::RawFd>,
    ) -> Result<Value, QmpError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut p = self.inner.pending.lock().unwrap_or_else(|e| e.into_inner());
            match p.as_mut() {
                Some(map) => map.insert(id, tx),
                None => return Err(QmpError::Closed),
            };
        }
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string();
        line.push('\n');
        let fut = async {
            {
                let mut w = self.inner.writer.lock().await;
                let mut bytes = line.as_bytes();
                if let Some(fd) = fd {
                    let n = send_with_fd(w.as_ref(), bytes, fd)
                        .await
                        .map_err(QmpError::Io)?;
                    bytes = &bytes[n..];
                }
                w.write_all(bytes).await.map_err(QmpError::Io)?;
            }
            match rx.await {
                Ok(Ok(v)) => Ok(v),
                Ok(Err((class, desc))) => Err(QmpError::Command {
                    command: command.to_string(),
                    class,
                    desc,
                }),
                Err(_) => Err(QmpError::Closed),
            }
        };
        let res = tokio::time::timeout(self.timeout, fut).await;
        if let Some(map) = self
            .inner
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            map.remove(&id);
        }
        res.map_err(|_| QmpError::Timeout {
            command: command.to_string(),
            after: self.timeout,
        })?
    }

    /// Runs a typed command ([`crate::commands`]) and decodes its reply.
    pub async fn run<C: crate::Command>(&self, cmd: &C) -> Result<C::Reply, QmpError> {
        let args = if C::ARGS {
            Some(
                serde_json::to_value(cmd).map_err(|source| QmpError::Decode {
                    command: C::NAME.to_string(),
                    source,
                })?,
            )
        } else {
            None
        };
        self.call(C::NAME, args).await
    }

    /// Executes a command and decodes its `return` value.
    pub async fn call<T: DeserializeOwned>(
        &self,
        command: &str,
        args: Option<Value>,
    ) -> Result<T, QmpError> {
        let v = self.execute(command, args).await?;
        serde_json::from_value(v).map_err(|source| QmpError::Decode {
            command: command.to_string(),
            source,
        })
    }
}

async fn read_loop(
    mut lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    inner: std::sync::Weak<Inner>,
    events: broadcast::Sender<QmpEvent>,
    closed: watch::Sender<bool>,
) {
    loop {
        let line = match lines.next_line().await {
            Ok(Some(l)) => l,
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(error = %e, "QMP read failed");
                break;
            }
        };
        let Some(msg) = parse_message(&line) else {
            tracing::debug!(line = %line.chars().take(200).collect::<String>(), "ignoring non-QMP line");
            continue;
        };
        let (id, reply) = match msg {
            Message::Event {
                name,
                data,
                timestamp_us,
            } => {
                let _ = events.send(QmpEvent {
                    name,
                    data,
                    timestamp_us,
                });
                continue;
            }
            Message::Return { id, value } => (id, Ok(value)),
            Message::Error { id, class, desc } => (id, Err((class, desc))),
            Message::Greeting(_) => continue,
        };
        let Some(inner) = inner.upgrade() else { break };
        let tx = id.and_then(|id| {
            inner
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_mut()
                .and_then(|m| m.remove(&id))
        });
        match tx {
            Some(tx) => {
                let _ = tx.send(reply);
            }
            None => tracing::debug!(?id, "QMP reply for no waiting command"),
        }
    }
    if let Some(inner) = inner.upgrade() {
        // Dropping the senders wakes every waiter with Closed.
        inner
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }
    let _ = closed.send(true);
}

#[cfg(test)]
mod tests;
