//! The serial console. The daemon holds the one connection to QEMU's serial socket and
//! reads it continuously (a client that stops reading stalls the guest's console), keeps
//! a history buffer and fans the output out to any number of viewers.

use bytes::Bytes;
use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, mpsc};

const HISTORY: usize = 256 * 1024;

struct Shared {
    history: Mutex<VecDeque<u8>>,
    out: broadcast::Sender<Bytes>,
}

/// A live console connection. Dropping every clone does not stop the reader: it ends
/// when QEMU closes the socket.
#[derive(Clone)]
pub struct Console {
    shared: Arc<Shared>,
    input: mpsc::Sender<Bytes>,
}

impl Console {
    /// Connects to the serial socket; `seed` is earlier output (e.g. the log file's tail
    /// after a daemon restart).
    pub async fn attach(socket: &Path, seed: &[u8]) -> std::io::Result<Console> {
        let stream = UnixStream::connect(socket).await?;
        let (mut rd, mut wr) = stream.into_split();
        let (out, _) = broadcast::channel(1024);
        let mut h = VecDeque::with_capacity(HISTORY);
        h.extend(&seed[seed.len().saturating_sub(HISTORY)..]);
        let shared = Arc::new(Shared {
            history: Mutex::new(h),
            out,
        });
        let (input, mut input_rx) = mpsc::channel::<Bytes>(64);
        let s = shared.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let chunk = Bytes::copy_from_slice(&buf[..n]);
                let mut h = s.history.lock().unwrap_or_else(|e| e.into_inner());
                h.extend(&chunk[..]);
                let excess = h.len().saturating_sub(HISTORY);
                h.drain(..excess);
                // Sent under the history lock, so a new viewer sees each byte exactly once.
                let _ = s.out.send(chunk);
            }
        });
        tokio::spawn(async move {
            while let Some(b) = input_rx.recv().await {
                if wr.write_all(&b).await.is_err() {
                    break;
                }
            }
        });
        Ok(Console { shared, input })
    }

    /// The history so far and a receiver for everything after it.
    pub fn subscribe(&self) -> (Vec<u8>, broadcast::Receiver<Bytes>) {
        let h = self
            .shared
            .history
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let rx = self.shared.out.subscribe();
        (h.iter().copied().collect(), rx)
    }

    pub fn history(&self) -> Vec<u8> {
        self.subscribe().0
    }

    /// Types into the console.
    pub async fn send(&self, data: Bytes) -> bool {
        self.input.send(data).await.is_ok()
    }
}

/// The last `max` bytes of a file (the serial log), empty if missing.
pub fn tail(path: &Path, max: usize) -> Vec<u8> {
    let data = std::fs::read(path).unwrap_or_default();
    data[data.len().saturating_sub(max)..].to_vec()
}
