//! A replication connection: framed messages over TCP, requests matched to their
//! answers by sequence number so many can be in flight (pipelined).

use crate::wire::{self, Frame, Msg, WireError};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, Notify};

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("connection I/O")]
    Io(#[from] std::io::Error),
    #[error("peer sent a bad message")]
    Wire(#[from] WireError),
    #[error("peer did not answer within {0:?}")]
    Timeout(Duration),
    #[error("connection closed")]
    Closed,
    #[error("peer refused: {0}")]
    Refused(String),
    #[error("peer sent {0} where it must not")]
    Unexpected(&'static str),
}

/// Reads exactly `n` bytes into a new buffer (not zeroed first: a write's data is
/// copied once, from the socket into the buffer that is written out).
pub(crate) async fn read_vec<R: AsyncRead + Unpin>(
    r: &mut R,
    n: usize,
) -> std::io::Result<Vec<u8>> {
    use bytes::BufMut;
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        let want = n - v.len();
        if r.read_buf(&mut (&mut v).limit(want)).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(v)
}

/// Reads one frame. A write's data is read straight into its own buffer.
pub async fn read_msg<R: AsyncRead + Unpin>(r: &mut R) -> Result<Msg, ConnError> {
    let mut h = [0u8; wire::HEADER_LEN];
    r.read_exact(&mut h).await?;
    let (kind, len) = wire::decode_header(&h)?;
    read_body(r, kind, len).await
}

/// The first message of an incoming connection, which must be a `Hello`. Its kind is
/// checked from the header, and its body is read as it arrives: memory grows only with
/// what the peer really sent, never with the length it claims.
pub async fn read_hello<R: AsyncRead + Unpin>(r: &mut R) -> Result<Msg, ConnError> {
    let mut h = [0u8; wire::HEADER_LEN];
    r.read_exact(&mut h).await?;
    let (kind, len) = wire::decode_header(&h)?;
    if kind != wire::KIND_HELLO {
        return Err(ConnError::Unexpected("another message before its Hello"));
    }
    let mut body = Vec::with_capacity(4096);
    let got = r.take(u64::from(len)).read_to_end(&mut body).await?;
    if got != len as usize {
        return Err(ConnError::Closed);
    }
    Ok(wire::decode_body(kind, &body)?)
}

async fn read_body<R: AsyncRead + Unpin>(r: &mut R, kind: u16, len: u32) -> Result<Msg, ConnError> {
    if kind == 2 {
        // seq, generation number, host length; then host, offset, fua, data length
        let mut a = [0u8; 18];
        if (len as usize) < a.len() {
            return Err(WireError::Short {
                at: 0,
                need: a.len() - len as usize,
            }
            .into());
        }
        r.read_exact(&mut a).await?;
        let hl = u16::from_be_bytes([a[16], a[17]]) as usize;
        let fixed = a.len() + hl + 13;
        if (len as usize) < fixed {
            return Err(WireError::Short {
                at: a.len(),
                need: fixed - len as usize,
            }
            .into());
        }
        let mut head = a.to_vec();
        head.resize(fixed, 0);
        r.read_exact(&mut head[a.len()..]).await?;
        let (seq, gen, offset, fua, dlen) = wire::decode_write_head(&head)?;
        if fixed + dlen != len as usize {
            return Err(WireError::Field("write length").into());
        }
        let data = read_vec(r, dlen).await?;
        return Ok(Msg::Write {
            seq,
            gen,
            offset,
            fua,
            data,
        });
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body).await?;
    Ok(wire::decode_body(kind, &body)?)
}

pub async fn write_msg<W: AsyncWrite + Unpin>(w: &mut W, m: &Msg) -> Result<(), ConnError> {
    w.write_all(&m.encode()).await?;
    w.flush().await?;
    Ok(())
}

async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, f: &Frame) -> std::io::Result<()> {
    w.write_all(&f.head).await?;
    if let Some(d) = &f.data {
        w.write_all(d).await?;
    }
    Ok(())
}

/// How long a peer may take to acknowledge before it is considered gone.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(4);

/// A connection between two hosts' replication services: mutual TLS (the cluster's
/// host certificates) in a cluster, plain TCP only in unit tests.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}
pub type Stream = Box<dyn Io>;

/// The primary's end of a connection to a secondary.
pub struct Conn {
    tx: mpsc::UnboundedSender<Arc<Frame>>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Msg>>>,
    closed: AtomicBool,
    closed_note: Notify,
}

impl Conn {
    /// Starts the writer and reader tasks on an established (handshaken) stream.
    pub fn start(stream: Stream) -> Arc<Conn> {
        let (rd, wr) = tokio::io::split(stream);
        let mut rd = tokio::io::BufReader::with_capacity(64 << 10, rd);
        let (tx, mut rx) = mpsc::unbounded_channel::<Arc<Frame>>();
        let c = Arc::new(Conn {
            tx,
            pending: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            closed_note: Notify::new(),
        });
        let cw = c.clone();
        tokio::spawn(async move {
            let mut wr = tokio::io::BufWriter::with_capacity(256 << 10, wr);
            loop {
                let buf = tokio::select! {
                    b = rx.recv() => b,
                    _ = cw.closed_note.notified() => None,
                };
                let Some(buf) = buf else { break };
                if write_frame(&mut wr, &buf).await.is_err() {
                    break;
                }
                while let Ok(more) = rx.try_recv() {
                    if write_frame(&mut wr, &more).await.is_err() {
                        cw.close();
                        return;
                    }
                }
                if wr.flush().await.is_err() {
                    break;
                }
                if cw.is_closed() {
                    break;
                }
            }
            let _ = wr.shutdown().await;
            cw.close();
        });
        let cr = c.clone();
        tokio::spawn(async move {
            loop {
                if cr.is_closed() {
                    break;
                }
                let m = tokio::select! {
                    m = read_msg(&mut rd) => m,
                    _ = cr.closed_note.notified() => break,
                };
                let seq = match &m {
                    Ok(Msg::Ack { seq }) | Ok(Msg::Nack { seq, .. }) => *seq,
                    Ok(Msg::VerifyResp { seq, .. }) => *seq,
                    Ok(Msg::Goodbye { reason }) => {
                        tracing::info!(%reason, "peer ended the connection");
                        break;
                    }
                    Ok(_) => {
                        tracing::warn!("peer sent an unexpected message; disconnecting");
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "replication connection ended");
                        break;
                    }
                };
                let waiter = cr.pending.lock().expect("pending").remove(&seq);
                if let (Some(w), Ok(m)) = (waiter, m) {
                    let _ = w.send(m);
                }
            }
            cr.close();
        });
        c
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Closes the connection; every waiting request fails.
    pub fn close(&self) {
        if !self.closed.swap(true, Ordering::SeqCst) {
            self.closed_note.notify_waiters();
            self.pending.lock().expect("pending").clear();
        }
    }

    /// Waits until the connection is closed.
    pub async fn closed(&self) {
        loop {
            let n = self.closed_note.notified();
            if self.is_closed() {
                return;
            }
            n.await;
        }
    }

    /// Sends an encoded request with sequence number `seq` and waits for its answer.
    pub async fn call(&self, seq: u64, frame: Arc<Frame>) -> Result<Msg, ConnError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut p = self.pending.lock().expect("pending");
            if self.is_closed() {
                return Err(ConnError::Closed);
            }
            p.insert(seq, tx);
        }
        if self.tx.send(frame).is_err() {
            self.close();
            return Err(ConnError::Closed);
        }
        match tokio::time::timeout(ACK_TIMEOUT, rx).await {
            Ok(Ok(Msg::Nack { reason, .. })) => Err(ConnError::Refused(reason)),
            Ok(Ok(m)) => Ok(m),
            Ok(Err(_)) => Err(ConnError::Closed),
            Err(_) => {
                self.close();
                Err(ConnError::Timeout(ACK_TIMEOUT))
            }
        }
    }

    /// Sends a message that gets no answer (Goodbye).
    pub fn send(&self, m: &Msg) {
        let _ = self.tx.send(Arc::new(Frame::msg(m)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An unauthenticated peer that claims a 64 MiB first frame and sends a few bytes
    /// costs those bytes, not 64 MiB; another kind than Hello is refused from the header.
    #[tokio::test]
    async fn first_frame_is_checked_before_it_is_read() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let mut h = Msg::Goodbye { reason: "x".into() }.encode();
        h.truncate(wire::HEADER_LEN);
        h[6..8].copy_from_slice(&wire::KIND_HELLO.to_be_bytes());
        h[8..12].copy_from_slice(&(64u32 << 20).to_be_bytes());
        a.write_all(&h).await.unwrap();
        a.write_all(b"only a few bytes").await.unwrap();
        drop(a);
        assert!(matches!(read_hello(&mut b).await, Err(ConnError::Closed)));

        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let bye = Msg::Goodbye { reason: "x".into() }.encode();
        a.write_all(&bye).await.unwrap();
        assert!(matches!(
            read_hello(&mut b).await,
            Err(ConnError::Unexpected(_))
        ));
    }
}
