//! The serial console. The daemon holds the one connection to QEMU's serial socket and
//! reads it continuously (a client that stops reading stalls the guest's console), keeps
//! a history buffer and fans the output out to any number of viewers.

use crate::Host;
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
    /// Only a socket served by process `pid` (QEMU) is taken.
    pub async fn attach(
        socket: &Path,
        seed: &[u8],
        served_by_qemu: &(dyn Fn(&UnixStream) -> bool + Sync),
    ) -> std::io::Result<Console> {
        let stream = UnixStream::connect(socket).await?;
        if !served_by_qemu(&stream) {
            return Err(std::io::Error::other(format!(
                "{} is not served by the VM's QEMU",
                socket.display()
            )));
        }
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

/// The last `max` bytes of a file (the serial log), empty if missing; reads no more.
pub fn tail(path: &Path, max: usize) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return vec![];
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(max as u64);
    let mut out = vec![];
    if f.seek(SeekFrom::Start(start)).is_ok() {
        let _ = f.take(max as u64).read_to_end(&mut out);
    }
    out
}

/// A VM's serial log (which QEMU appends to, whatever the guest prints) is rotated past
/// this size: the current file becomes `serial.log.1` and starts again empty. So a
/// guest printing without end fills at most twice this (plus one check interval's
/// worth) of the run dir, which is tmpfs.
pub const SERIAL_LOG_CAP: u64 = 4 << 20;

/// Rotates `log` when it has grown past `cap` (copy, then truncate: QEMU keeps its file
/// open with O_APPEND, so its next write lands at the new start). True when rotated.
pub fn rotate_log(log: &Path, cap: u64) -> std::io::Result<bool> {
    let len = match std::fs::metadata(log) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if len <= cap {
        return Ok(false);
    }
    let mut old = log.as_os_str().to_owned();
    old.push(".1");
    std::fs::copy(log, &old)?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(log)?
        .set_len(0)?;
    Ok(true)
}

impl Host {
    /// Every 10 s: rotates the serial log of every VM run dir past `SERIAL_LOG_CAP`.
    #[tracing::instrument(skip_all)]
    pub async fn serial_log_loop(self) {
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(10)).await;
            let Ok(rd) = std::fs::read_dir(&self.inner.cfg.run_dir) else {
                continue;
            };
            let mut failed: Option<String> = None;
            for d in rd.flatten() {
                if !d.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let log = d.path().join("serial.log");
                if let Err(e) = rotate_log(&log, SERIAL_LOG_CAP) {
                    tracing::warn!(log = %log.display(), error = %e, "cannot rotate the serial log");
                    failed = Some(format!("{}: {e}", log.display()));
                }
            }
            self.inner.loops.report(
                "serial-logs",
                std::time::Duration::from_secs(10),
                failed.map_or(Ok(()), Err),
            );
        }
    }
}

#[cfg(test)]
mod log_tests {
    use super::*;

    #[test]
    fn serial_log_rotates_and_tail_reads_only_the_end() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("serial.log");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        use std::io::Write;
        f.write_all(&[b'a'; 100]).unwrap();
        assert!(!rotate_log(&log, 100).unwrap());
        f.write_all(b"bc").unwrap();
        assert!(rotate_log(&log, 100).unwrap());
        assert_eq!(std::fs::metadata(&log).unwrap().len(), 0);
        assert_eq!(
            std::fs::read(d.path().join("serial.log.1")).unwrap().len(),
            102
        );
        // The appending writer carries on at the new start, not at its old offset.
        f.write_all(b"xyz").unwrap();
        assert_eq!(std::fs::read(&log).unwrap(), b"xyz");
        assert_eq!(tail(&d.path().join("serial.log.1"), 2), b"bc");
        assert!(tail(&d.path().join("missing"), 2).is_empty());
    }
}
