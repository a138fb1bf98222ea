//! A backup's disk as a random-access image: what live-restore serves to QEMU over NBD
//! while the VM already runs. Reads come in any size and order; each 4 MiB chunk is
//! read, checked against its name and decoded once and kept in a small cache (QEMU's
//! reads are much smaller than a chunk and mostly sequential).

use super::chunk::{self, CryptKey};
use super::reader::OpenDisk;
use super::{Store, StoreError};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

/// Decoded chunks kept (64 MiB).
const CACHED_CHUNKS: usize = 16;

pub struct DiskImage {
    store: Arc<Store>,
    key: Option<CryptKey>,
    disk: OpenDisk,
    name: String,
    cache: Mutex<VecDeque<(usize, Arc<Vec<u8>>)>>,
}

impl DiskImage {
    /// Disk `disk` of complete snapshot `id` (an encrypted one needs its `key`).
    pub fn open(
        store: Arc<Store>,
        id: &str,
        disk: &str,
        key: Option<CryptKey>,
    ) -> Result<DiskImage, StoreError> {
        let d = store.open_disk(id, disk, key.as_ref())?;
        let key = if d.encrypted { key } else { None };
        Ok(DiskImage {
            store,
            key,
            disk: d,
            name: format!("{id}/{disk}"),
            cache: Mutex::new(VecDeque::new()),
        })
    }

    pub fn size(&self) -> u64 {
        self.disk.size
    }

    /// `len` bytes at `offset` (the range must lie inside the disk).
    pub fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, StoreError> {
        let end = offset
            .checked_add(len as u64)
            .filter(|e| *e <= self.disk.size)
            .ok_or_else(|| {
                StoreError::Invalid(format!(
                    "read of {len} bytes at {offset} is outside {} ({} bytes)",
                    self.name, self.disk.size
                ))
            })?;
        let cs = chunk::CHUNK_SIZE as u64;
        let mut out = Vec::with_capacity(len);
        let mut pos = offset;
        while pos < end {
            let i = usize::try_from(pos / cs).unwrap_or(usize::MAX);
            let within = usize::try_from(pos % cs).unwrap_or(0);
            let take = usize::try_from((end - pos).min(cs - pos % cs)).unwrap_or(0);
            if self.disk.is_zero(i) {
                out.resize(out.len() + take, 0);
            } else {
                let data = self.chunk(i)?;
                out.extend_from_slice(&data[within..within + take]);
            }
            pos += take as u64;
        }
        Ok(out)
    }

    fn chunk(&self, i: usize) -> Result<Arc<Vec<u8>>, StoreError> {
        let lock = || self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, d)) = lock().iter().find(|(k, _)| *k == i) {
            return Ok(Arc::clone(d));
        }
        let data = self
            .store
            .read_chunk(&self.disk.index[i], self.key.as_ref())?;
        let want = self.disk.chunk_len(i);
        if data.len() as u64 != want {
            return Err(StoreError::Corrupt(format!(
                "chunk {i} of {} is {} bytes, expected {want}",
                self.name,
                data.len()
            )));
        }
        let data = Arc::new(data);
        let mut c = lock();
        if c.len() >= CACHED_CHUNKS {
            c.pop_front();
        }
        c.push_back((i, Arc::clone(&data)));
        Ok(data)
    }
}
