//! Writing one snapshot: chunks are named, stored when the store lacks them, and pinned
//! to the snapshot in batches; each disk's index is recorded when the disk is done; the
//! snapshot is listed only when [`SnapshotWriter::commit`] succeeds. A writer dropped
//! before that (an error, a panic, a cancelled task) removes its snapshot and its pins;
//! one killed outright leaves a `writing` row that [`super::maint`] removes once its
//! owner is gone.

use super::catalog::{DiskRow, SnapshotRow};
use super::chunk::{self, CryptKey, Digest};
use super::{unix_now, Store, StoreError};
use std::collections::HashMap;
use std::sync::Arc;

/// How many chunks are pinned per catalog transaction (their data is kept until then:
/// 32 MiB).
const BATCH: usize = 8;

/// What a new snapshot records about itself.
#[derive(Debug, Clone)]
pub struct SnapshotMeta {
    pub vm: String,
    pub host: String,
    /// `quiesced` (guest agent froze the filesystems) or `crash`.
    pub consistency: String,
    /// The VM's definition as JSON (restored with the disks).
    pub config: Option<String>,
}

struct Pending {
    digest: Digest,
    plain: u64,
    /// Kept until the pin: if garbage collection removed the chunk since it was named
    /// or written (another writer's copy of the same data, pinned and freed
    /// meanwhile), the pin writes it again.
    data: Payload,
}

/// A chunk's content as a writer has it.
enum Payload {
    /// Plain data (a backup): encoded when written.
    Plain(Vec<u8>),
    /// A chunk file as another store keeps it (a copy): written as it is.
    File(Vec<u8>),
}

/// A snapshot copied from another store, as the source lists it.
#[derive(Debug, Clone)]
pub struct CopyMeta {
    pub id: String,
    pub vm: String,
    /// The host that took it.
    pub host: String,
    pub started: i64,
    pub consistency: String,
    /// Encrypted at the source: its chunks arrive sealed and stay so.
    pub key_fingerprint: Option<String>,
    pub config: Option<String>,
}

/// Whether `id` can be a snapshot's id here (the source's ids are kept).
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Counters of one snapshot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct WriteStats {
    pub chunks: u64,
    pub new_chunks: u64,
    pub new_stored_bytes: u64,
    pub new_plain_bytes: u64,
    pub reused_chunks: u64,
}

pub struct SnapshotWriter {
    store: Arc<Store>,
    id: String,
    key: Option<CryptKey>,
    batch: Vec<Pending>,
    zero: HashMap<usize, Digest>,
    stats: WriteStats,
    disk_new_plain: u64,
    done: bool,
    /// A copy: whether its chunks are sealed (encrypted at the source).
    copy_sealed: Option<bool>,
}

/// A new snapshot's id: its start time and a random suffix (sorts by time).
pub fn new_id(started: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(started)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z-{}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        &suffix[..8]
    )
}

impl Store {
    /// Starts a snapshot (listed as `writing` until committed).
    pub fn begin(
        self: &Arc<Self>,
        meta: SnapshotMeta,
        key: Option<CryptKey>,
    ) -> Result<SnapshotWriter, StoreError> {
        let started = unix_now();
        let id = new_id(started);
        let row = SnapshotRow {
            id: id.clone(),
            vm: meta.vm,
            host: meta.host.clone(),
            started,
            finished: None,
            state: "writing".into(),
            owner: super::maint::owner_tag(&meta.host),
            heartbeat: started,
            consistency: meta.consistency,
            key_fingerprint: key.as_ref().map(|k| k.fingerprint().to_string()),
            config: meta.config,
            protected: false,
        };
        self.catalog().begin_snapshot(&row)?;
        Ok(self.writer(id, key, None))
    }

    /// Starts a copy of another store's snapshot (same id, VM, times, consistency,
    /// definition), written by `my_host`: its chunks come as the source's files
    /// ([`SnapshotWriter::put_file`]).
    pub fn begin_copy(
        self: &Arc<Self>,
        meta: CopyMeta,
        my_host: &str,
    ) -> Result<SnapshotWriter, StoreError> {
        if !valid_id(&meta.id) {
            return Err(StoreError::Invalid(format!(
                "{:?} is not a backup id (letters, digits, - and _, at most 64)",
                meta.id
            )));
        }
        let now = unix_now();
        let plain_text = |v: &str, max: usize| {
            !v.is_empty() && v.len() <= max && !v.chars().any(char::is_control)
        };
        if !plain_text(&meta.vm, 64) || !plain_text(&meta.host, 64) {
            return Err(StoreError::Invalid(format!(
                "the source names VM {:?} on host {:?}",
                meta.vm, meta.host
            )));
        }
        if !matches!(meta.consistency.as_str(), "crash" | "quiesced") {
            return Err(StoreError::Invalid(format!(
                "the source says the backup is {:?}",
                meta.consistency
            )));
        }
        // a backup from the future would be the newest for retention for ever
        if meta.started < 0 || meta.started > now + 600 {
            return Err(StoreError::Invalid(format!(
                "the source says the backup started at {}, now is {now}",
                meta.started
            )));
        }
        if meta.config.as_ref().is_some_and(|c| c.len() > 64 << 10) {
            return Err(StoreError::Invalid(
                "the source's VM definition is larger than 64 KiB".into(),
            ));
        }
        let row = SnapshotRow {
            id: meta.id.clone(),
            vm: meta.vm,
            host: meta.host,
            started: meta.started,
            finished: None,
            state: "writing".into(),
            owner: super::maint::owner_tag(my_host),
            heartbeat: now,
            consistency: meta.consistency,
            key_fingerprint: meta.key_fingerprint.clone(),
            config: meta.config,
            protected: false,
        };
        self.catalog().begin_snapshot(&row)?;
        Ok(self.writer(meta.id, None, Some(meta.key_fingerprint.is_some())))
    }

    fn writer(
        self: &Arc<Self>,
        id: String,
        key: Option<CryptKey>,
        copy_sealed: Option<bool>,
    ) -> SnapshotWriter {
        SnapshotWriter {
            store: Arc::clone(self),
            id,
            key,
            batch: Vec::new(),
            zero: HashMap::new(),
            stats: WriteStats::default(),
            disk_new_plain: 0,
            done: false,
            copy_sealed,
        }
    }
}

impl SnapshotWriter {
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn stats(&self) -> WriteStats {
        self.stats
    }

    /// The name `data` gets in this snapshot (keyed when encrypted).
    pub fn digest(&self, data: &[u8]) -> Digest {
        chunk::digest(data, self.key.as_ref())
    }

    /// Adds one chunk of a disk; returns its name for the disk's index.
    pub fn put(&mut self, data: Vec<u8>) -> Result<Digest, StoreError> {
        if data.len() > chunk::CHUNK_SIZE || data.is_empty() {
            return Err(StoreError::Invalid(format!(
                "a chunk is 1 to {} bytes, not {}",
                chunk::CHUNK_SIZE,
                data.len()
            )));
        }
        let is_zero = data.iter().all(|b| *b == 0);
        let digest = match (is_zero, self.zero.get(&data.len())) {
            (true, Some(d)) => *d,
            _ => self.digest(&data),
        };
        if is_zero {
            self.zero.insert(data.len(), digest);
        }
        let plain = data.len() as u64;
        let known = self.batch.iter().any(|p| p.digest == digest)
            || self.store.catalog().has_chunk(&digest)?;
        if !known {
            self.store_new(&digest, &data)?;
        }
        let pending = Pending {
            digest,
            plain,
            data: Payload::Plain(data),
        };
        self.stats.chunks += 1;
        self.batch.push(pending);
        if self.batch.len() >= BATCH {
            self.flush()?;
        }
        Ok(digest)
    }

    /// Adds a chunk file of a copy as the source keeps it, named `digest`, of
    /// `plain_len` bytes where the index puts it: checked
    /// first (header, lengths, checksum; a plain one decoded and named again, so a
    /// source cannot pass off other data; a sealed one stays sealed — its key alone
    /// checks its content, at restore), written when the store lacks it.
    pub fn put_file(
        &mut self,
        digest: Digest,
        file: Vec<u8>,
        plain_len: usize,
    ) -> Result<(), StoreError> {
        let sealed = self
            .copy_sealed
            .ok_or_else(|| StoreError::Internal("chunk files are added to copies only".into()))?;
        let bad = |source| StoreError::Chunk {
            digest: digest.hex(),
            source,
        };
        let h = chunk::check(&file).map_err(bad)?;
        if h.plain_len != plain_len {
            return Err(StoreError::Invalid(format!(
                "chunk {} holds {} bytes where the index needs {plain_len}",
                digest.hex(),
                h.plain_len
            )));
        }
        if h.encrypted != sealed {
            return Err(StoreError::Invalid(format!(
                "chunk {} is {}, the backup {}",
                digest.hex(),
                if h.encrypted { "encrypted" } else { "plain" },
                if sealed { "encrypted" } else { "plain" }
            )));
        }
        if !sealed {
            chunk::decode(&file, &digest, None).map_err(bad)?;
        }
        let known = self.batch.iter().any(|p| p.digest == digest)
            || self.store.catalog().has_chunk(&digest)?;
        if !known {
            self.store.write_chunk_file(&digest, &file)?;
            self.stats.new_chunks += 1;
            self.stats.new_stored_bytes += file.len() as u64;
            self.stats.new_plain_bytes += h.plain_len as u64;
            self.disk_new_plain += h.plain_len as u64;
        }
        self.stats.chunks += 1;
        self.batch.push(Pending {
            digest,
            plain: h.plain_len as u64,
            data: Payload::File(file),
        });
        if self.batch.len() >= BATCH {
            self.flush()?;
        }
        Ok(())
    }

    /// Pins chunks of a copy the store has a sound file of (written by an earlier,
    /// broken-off copy, or by any backup); returns those it lacks, to be fetched.
    pub fn reuse_files(&mut self, digests: &[Digest]) -> Result<Vec<Digest>, StoreError> {
        self.flush()?;
        let store = Arc::clone(&self.store);
        let mut missing = Vec::new();
        for part in digests.chunks(1024) {
            let list: Vec<(Digest, u64)> = part.iter().map(|d| (*d, 0)).collect();
            let mut ensure = |d: &Digest| store.chunk_file_ok(d);
            missing.extend(store.catalog().pin(&self.id, &list, &mut ensure)?);
        }
        self.stats.reused_chunks += (digests.len() - missing.len()) as u64;
        Ok(missing)
    }

    /// A chunk of zeros of `len` bytes (a hole the reader did not read).
    pub fn put_zero(&mut self, len: usize) -> Result<Digest, StoreError> {
        self.put(vec![0u8; len])
    }

    fn store_new(&mut self, digest: &Digest, data: &[u8]) -> Result<u64, StoreError> {
        let body = chunk::encode(data, self.key.as_ref()).map_err(|source| StoreError::Chunk {
            digest: digest.hex(),
            source,
        })?;
        self.store.write_chunk_file(digest, &body)?;
        self.stats.new_chunks += 1;
        self.stats.new_stored_bytes += body.len() as u64;
        self.stats.new_plain_bytes += data.len() as u64;
        self.disk_new_plain += data.len() as u64;
        Ok(body.len() as u64)
    }

    /// Pins chunks an earlier snapshot of this disk has (the unchanged ones of an
    /// incremental backup). Returns those the store no longer has: the caller reads them.
    pub fn reuse(&mut self, digests: &[Digest]) -> Result<Vec<Digest>, StoreError> {
        self.flush()?;
        let store = Arc::clone(&self.store);
        let mut missing = Vec::new();
        for part in digests.chunks(1024) {
            let list: Vec<(Digest, u64)> = part.iter().map(|d| (*d, 0)).collect();
            let mut ensure = |_: &Digest| Ok(None);
            missing.extend(store.catalog().pin(&self.id, &list, &mut ensure)?);
        }
        self.stats.reused_chunks += (digests.len() - missing.len()) as u64;
        Ok(missing)
    }

    fn flush(&mut self) -> Result<(), StoreError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.batch);
        let list: Vec<(Digest, u64)> = batch.iter().map(|p| (p.digest, p.plain)).collect();
        let store = Arc::clone(&self.store);
        let key = self.key.clone();
        let mut rewritten = WriteStats::default();
        let mut ensure = |d: &Digest| -> Result<Option<u64>, StoreError> {
            // the file may be there (written by this writer, not collected): keep it
            if let Some(size) = store.chunk_file_ok(d)? {
                return Ok(Some(size));
            }
            let Some(p) = batch.iter().find(|p| p.digest == *d) else {
                return Ok(None);
            };
            let body = match &p.data {
                Payload::Plain(data) => {
                    chunk::encode(data, key.as_ref()).map_err(|source| StoreError::Chunk {
                        digest: d.hex(),
                        source,
                    })?
                }
                Payload::File(f) => f.clone(),
            };
            store.write_chunk_file(d, &body)?;
            rewritten.new_chunks += 1;
            rewritten.new_stored_bytes += body.len() as u64;
            rewritten.new_plain_bytes += p.plain;
            Ok(Some(body.len() as u64))
        };
        let missing = store.catalog().pin(&self.id, &list, &mut ensure)?;
        self.stats.new_chunks += rewritten.new_chunks;
        self.stats.new_stored_bytes += rewritten.new_stored_bytes;
        self.stats.new_plain_bytes += rewritten.new_plain_bytes;
        self.disk_new_plain += rewritten.new_plain_bytes;
        if let Some(d) = missing.first() {
            return Err(StoreError::Internal(format!(
                "chunk {d:?} written by this backup is gone from the store"
            )));
        }
        Ok(())
    }

    /// Records a finished disk: its size, how it was read and its complete index.
    pub fn disk(&mut self, mut row: DiskRow, index: &[Digest]) -> Result<(), StoreError> {
        self.flush()?;
        let want = row.size.div_ceil(chunk::CHUNK_SIZE as u64);
        if index.len() as u64 != want {
            return Err(StoreError::Internal(format!(
                "disk {} of {} bytes needs {want} chunks, the index has {}",
                row.name,
                row.size,
                index.len()
            )));
        }
        row.chunks = index.len() as u64;
        row.new_bytes = std::mem::take(&mut self.disk_new_plain);
        self.store.catalog().put_disk(&self.id, &row, index)
    }

    /// Lists the snapshot: from now on restores may use it.
    pub fn commit(mut self) -> Result<String, StoreError> {
        self.flush()?;
        self.store.catalog().commit(&self.id)?;
        self.done = true;
        Ok(self.id.clone())
    }

    /// Keeps a long disk read from looking stale to other hosts' cleanup.
    pub fn heartbeat(&mut self) -> Result<(), StoreError> {
        self.store.catalog().heartbeat(&self.id)
    }
}

impl Drop for SnapshotWriter {
    fn drop(&mut self) {
        if !self.done {
            // pin what was written, so that garbage collection frees it with the rest
            let _ = self.flush();
            if let Err(e) = self.store.catalog().remove(&self.id) {
                tracing::warn!(snapshot = %self.id, error = %e, "could not remove an unfinished backup; the next cleanup will");
            }
        }
    }
}
