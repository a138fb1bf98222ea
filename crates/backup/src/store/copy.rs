//! Copying snapshots in from another store (remote sync, `ferry backup sync`): the
//! source names a snapshot (its rows, each disk's complete index) and hands over the
//! chunk files this store lacks, several at a time, as it keeps them — encrypted chunks
//! stay sealed. Each file is checked before it is written ([`SnapshotWriter::put_file`]);
//! the copy is listed only when every chunk of every index is pinned, under the
//! source's id (a copy already here is not fetched again). A copy broken off (the
//! source gone, the daemon killed) lists nothing; the files it wrote are reused by
//! the next attempt, until a garbage collection frees them.
//!
//! [`SnapshotWriter::put_file`]: super::writer::SnapshotWriter::put_file

use super::catalog::DiskRow;
use super::chunk::{Digest, CHUNK_SIZE};
use super::writer::CopyMeta;
use super::{Store, StoreError};
use std::sync::Arc;

/// One disk of a snapshot at the source.
#[derive(Debug, Clone)]
pub struct SourceDisk {
    pub name: String,
    pub size: u64,
    pub mode: String,
    pub reason: Option<String>,
    pub chunks: Vec<Digest>,
}

/// A snapshot at the source.
#[derive(Debug, Clone)]
pub struct SourceSnapshot {
    pub meta: CopyMeta,
    pub disks: Vec<SourceDisk>,
}

/// Where chunk files come from.
pub trait ChunkSource {
    /// The files of `digests`, in that order (fetched several at a time).
    fn fetch(&self, digests: &[Digest]) -> Vec<Result<Vec<u8>, String>>;
}

/// What one copy did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyStats {
    pub chunks_fetched: u64,
    pub bytes_fetched: u64,
    /// Chunks this store had already.
    pub chunks_reused: u64,
}

/// Chunks asked of the source at once.
pub const FETCH_BATCH: usize = 16;
/// Disks a copied backup may have.
pub const MAX_DISKS: usize = 64;

impl Store {
    /// Copies snapshot `snap` in from `src` (see the module's notes).
    pub fn copy_in(
        self: &Arc<Self>,
        snap: SourceSnapshot,
        src: &dyn ChunkSource,
        my_host: &str,
    ) -> Result<CopyStats, StoreError> {
        if snap.disks.len() > MAX_DISKS {
            return Err(StoreError::Invalid(format!(
                "the source's backup has {} disks (at most {MAX_DISKS})",
                snap.disks.len()
            )));
        }
        for (i, d) in snap.disks.iter().enumerate() {
            if d.name != format!("disk{i}") {
                return Err(StoreError::Invalid(format!(
                    "the source's disk {i} is named {:?}",
                    d.name
                )));
            }
            if !matches!(d.mode.as_str(), "full" | "incremental")
                || d.reason
                    .as_ref()
                    .is_some_and(|r| r.len() > 512 || r.chars().any(char::is_control))
            {
                return Err(StoreError::Invalid(format!(
                    "the source's {} says it was read {:?} ({:?})",
                    d.name, d.mode, d.reason
                )));
            }
            let want = d.size.div_ceil(CHUNK_SIZE as u64);
            if d.chunks.len() as u64 != want {
                return Err(StoreError::Invalid(format!(
                    "the source's {} of {} bytes lists {} chunks, not {want}",
                    d.name,
                    d.size,
                    d.chunks.len()
                )));
            }
        }
        let mut stats = CopyStats::default();
        let mut w = self.begin_copy(snap.meta, my_host)?;
        for d in snap.disks {
            let mut seen = std::collections::HashSet::new();
            let uniq: Vec<Digest> = d
                .chunks
                .iter()
                .copied()
                .filter(|c| seen.insert(*c))
                .collect();
            // each chunk's length follows from where the index puts it (all whole but
            // the last); a name the index puts where lengths differ is refused
            let mut lengths: std::collections::HashMap<Digest, usize> = Default::default();
            for (k, c) in d.chunks.iter().enumerate() {
                let start = k as u64 * CHUNK_SIZE as u64;
                let len =
                    usize::try_from((d.size - start).min(CHUNK_SIZE as u64)).unwrap_or(CHUNK_SIZE);
                if *lengths.entry(*c).or_insert(len) != len {
                    return Err(StoreError::Invalid(format!(
                        "the source's {} names chunk {} for pieces of different lengths",
                        d.name,
                        c.hex()
                    )));
                }
            }
            let missing = w.reuse_files(&uniq)?;
            stats.chunks_reused += (uniq.len() - missing.len()) as u64;
            let mut fetched = 0u64;
            for part in missing.chunks(FETCH_BATCH) {
                let files = src.fetch(part);
                if files.len() != part.len() {
                    return Err(StoreError::Invalid(format!(
                        "the source sent {} chunks for {} asked",
                        files.len(),
                        part.len()
                    )));
                }
                for (digest, f) in part.iter().zip(files) {
                    let f = f.map_err(|e| {
                        StoreError::Invalid(format!("chunk {} from the source: {e}", digest.hex()))
                    })?;
                    stats.chunks_fetched += 1;
                    stats.bytes_fetched += f.len() as u64;
                    fetched += f.len() as u64;
                    let want = lengths.get(digest).copied().unwrap_or(CHUNK_SIZE);
                    w.put_file(*digest, f, want)?;
                }
                w.heartbeat()?;
            }
            w.disk(
                DiskRow {
                    name: d.name,
                    size: d.size,
                    mode: d.mode,
                    reason: d.reason,
                    read_bytes: fetched,
                    new_bytes: 0,
                    chunks: 0,
                    // change tracking counts from the source's backups, not from copies
                    bitmap: None,
                },
                &d.chunks,
            )?;
        }
        w.commit()?;
        Ok(stats)
    }

    /// A snapshot of this store as a source would describe it (what `copy_in` takes).
    pub fn describe(&self, id: &str) -> Result<Option<SourceSnapshot>, StoreError> {
        let Some(s) = self.snapshot(id)? else {
            return Ok(None);
        };
        let mut disks = Vec::new();
        for d in self.disks(id)? {
            let chunks = self.index(id, &d.name)?;
            disks.push(SourceDisk {
                name: d.name,
                size: d.size,
                mode: d.mode,
                reason: d.reason,
                chunks,
            });
        }
        Ok(Some(SourceSnapshot {
            meta: CopyMeta {
                id: s.id,
                vm: s.vm,
                host: s.host,
                started: s.started,
                consistency: s.consistency,
                key_fingerprint: s.key_fingerprint,
                config: s.config,
            },
            disks,
        }))
    }

    /// A chunk's file as this store keeps it (for a copy elsewhere).
    pub fn chunk_file(&self, d: &Digest) -> Result<Vec<u8>, StoreError> {
        self.read_chunk_file(d)
    }
}
