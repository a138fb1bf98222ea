//! Reading a snapshot back: every chunk of a disk's index, checked against its name,
//! by several threads at once, handed to a sink at its offset. Zero chunks are named
//! once and skipped when the sink is sparse (a raw file made at full size).

use super::chunk::{self, CryptKey, Digest};
use super::{Store, StoreError};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Where a restore puts each chunk: `(offset, data)`.
pub type Sink<'a> = dyn Fn(u64, &[u8]) -> Result<(), StoreError> + Sync + 'a;

/// Progress of a restore (shared with whoever reports it).
#[derive(Debug, Default)]
pub struct Progress {
    pub done_bytes: AtomicU64,
    pub total_bytes: AtomicU64,
}

/// A disk of a complete snapshot, ready to read: its chunk index checked against its
/// size, the key settled (only an encrypted snapshot uses one, and only its own).
pub(crate) struct OpenDisk {
    pub index: Vec<Digest>,
    pub size: u64,
    /// Whether the snapshot is encrypted (its chunks need the key).
    pub encrypted: bool,
    zero_full: Digest,
    zero_tail: Option<Digest>,
}

impl OpenDisk {
    /// Whether chunk `i` is all zeros (named once, never read).
    pub fn is_zero(&self, i: usize) -> bool {
        let d = self.index[i];
        d == self.zero_full || Some(d) == self.zero_tail
    }
    /// The bytes chunk `i` holds (the last one may be short).
    pub fn chunk_len(&self, i: usize) -> u64 {
        let cs = chunk::CHUNK_SIZE as u64;
        (self.size - i as u64 * cs).min(cs)
    }
}

impl Store {
    pub(crate) fn open_disk(
        &self,
        id: &str,
        disk: &str,
        key: Option<&CryptKey>,
    ) -> Result<OpenDisk, StoreError> {
        let snap = self
            .snapshot(id)?
            .ok_or_else(|| StoreError::NotFound(format!("no backup {id}")))?;
        if snap.state != "complete" {
            return Err(StoreError::Invalid(format!(
                "backup {id} is not complete ({})",
                snap.state
            )));
        }
        match (&snap.key_fingerprint, key) {
            (Some(_), None) => {
                return Err(StoreError::Invalid(format!(
                    "backup {id} is encrypted: its key is needed"
                )))
            }
            (Some(fp), Some(k)) if fp != k.fingerprint() => {
                return Err(StoreError::Invalid(format!(
                    "backup {id} was encrypted with key {fp}, not {}",
                    k.fingerprint()
                )))
            }
            _ => {}
        }
        let encrypted = snap.key_fingerprint.is_some();
        let key = if encrypted { key } else { None };
        let row = self
            .disks(id)?
            .into_iter()
            .find(|d| d.name == disk)
            .ok_or_else(|| StoreError::NotFound(format!("backup {id} has no disk {disk}")))?;
        let index = self.index(id, disk)?;
        let size = row.size;
        let cs = chunk::CHUNK_SIZE as u64;
        if index.len() as u64 != size.div_ceil(cs) {
            return Err(StoreError::Corrupt(format!(
                "backup {id} disk {disk}: {} chunks for {size} bytes",
                index.len()
            )));
        }
        let tail = usize::try_from(size % cs).unwrap_or(0);
        Ok(OpenDisk {
            index,
            size,
            encrypted,
            zero_full: chunk::digest(&vec![0u8; chunk::CHUNK_SIZE], key),
            zero_tail: (tail != 0).then(|| chunk::digest(&vec![0u8; tail], key)),
        })
    }

    /// Reads disk `disk` of snapshot `id`, calling `sink(offset, data)` for each chunk
    /// that is not all zeros (from `threads` threads; order is not kept).
    pub fn read_disk(
        &self,
        id: &str,
        disk: &str,
        key: Option<&CryptKey>,
        threads: usize,
        progress: &Progress,
        sink: &Sink<'_>,
    ) -> Result<u64, StoreError> {
        let d = self.open_disk(id, disk, key)?;
        let (index, size) = (&d.index, d.size);
        let key = if d.encrypted { key } else { None };
        let cs = chunk::CHUNK_SIZE as u64;
        progress.total_bytes.store(size, Ordering::Relaxed);
        let next = AtomicUsize::new(0);
        let failed = AtomicBool::new(false);
        let first_error: Mutex<Option<StoreError>> = Mutex::new(None);
        let work = |_| loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= index.len() || failed.load(Ordering::Relaxed) {
                return;
            }
            let offset = i as u64 * cs;
            let len = (size - offset).min(cs);
            let r = if d.is_zero(i) {
                Ok(())
            } else {
                self.read_chunk(&index[i], key).and_then(|data| {
                    if data.len() as u64 != len {
                        return Err(StoreError::Corrupt(format!(
                            "chunk {i} of {disk} is {} bytes, expected {len}",
                            data.len()
                        )));
                    }
                    sink(offset, &data)
                })
            };
            if let Err(e) = r {
                failed.store(true, Ordering::Relaxed);
                let mut slot = first_error
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                slot.get_or_insert(e);
                return;
            }
            progress.done_bytes.fetch_add(len, Ordering::Relaxed);
        };
        std::thread::scope(|s| {
            for t in 0..threads.max(1) {
                s.spawn(move || work(t));
            }
        });
        if let Some(e) = first_error
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
        {
            return Err(e);
        }
        Ok(size)
    }

    /// Restores a disk into a new sparse raw file at `dest` (removed if the restore
    /// fails).
    pub fn restore_raw(
        &self,
        id: &str,
        disk: &str,
        key: Option<&CryptKey>,
        dest: &Path,
        threads: usize,
        progress: &Progress,
    ) -> Result<u64, StoreError> {
        let size = self
            .disks(id)?
            .into_iter()
            .find(|d| d.name == disk)
            .map(|d| d.size)
            .ok_or_else(|| StoreError::NotFound(format!("backup {id} has no disk {disk}")))?;
        let io = |e| StoreError::Io {
            path: dest.to_path_buf(),
            source: e,
        };
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dest)
            .map_err(io)?;
        let r = (|| {
            file.set_len(size).map_err(io)?;
            self.read_disk(id, disk, key, threads, progress, &|off, data| {
                file.write_all_at(data, off).map_err(io)
            })?;
            file.sync_all().map_err(io)?;
            Ok(size)
        })();
        if r.is_err() {
            let _ = std::fs::remove_file(dest);
        }
        r
    }
}
