//! A backup store: a directory (local disk or a mounted NFS share several hosts write)
//! laid out as `docs/backup-store.md` describes:
//!
//! ```text
//! ferry-backup-store.json   format name, version, id, chunk size
//! catalog.sqlite            snapshots, disk indexes, chunk reference counts (catalog.rs)
//! chunks/ab/abcd…ef         one file per chunk, named by its digest (chunk.rs)
//! chunks/.tmp/              chunk files being written (renamed into place when whole)
//! ```
//!
//! Everything here blocks (file I/O, SQLite): callers run it on `spawn_blocking` or a
//! thread of their own. [`writer`] writes a snapshot, [`reader`] reads one back,
//! [`maint`] prunes, collects garbage, verifies and repairs.

pub mod catalog;
pub mod chunk;
pub mod copy;
pub mod image;
pub mod maint;
pub mod reader;
pub mod writer;

use catalog::Catalog;
use chunk::{CryptKey, Digest};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

const FORMAT: &str = "ferry-backup-store";
const VERSION: u32 = 1;
const CONFIG_FILE: &str = "ferry-backup-store.json";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("Backup store I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Backup catalog: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("Not a ferry backup store: {0}")]
    NotAStore(String),
    #[error("Backup store version: {0}")]
    Version(String),
    #[error("{0}")]
    NotFound(String),
    #[error("Backup store is damaged: {0}")]
    Corrupt(String),
    #[error("Chunk {digest}: {source}")]
    Chunk {
        digest: String,
        #[source]
        source: chunk::ChunkError,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("Backup store: {0}")]
    Internal(String),
}

impl StoreError {
    fn io(path: &Path, source: std::io::Error) -> StoreError {
        StoreError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The store's config file.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    pub format: String,
    pub version: u32,
    pub id: String,
    pub chunk_size: u64,
    pub created: i64,
}

pub struct Store {
    root: PathBuf,
    config: StoreConfig,
    catalog: Mutex<Catalog>,
}

impl Store {
    /// Makes a new store in `root` (created if missing; it must be empty otherwise).
    pub fn create(root: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(root).map_err(|e| StoreError::io(root, e))?;
        let cfg_path = root.join(CONFIG_FILE);
        if cfg_path.exists() {
            return Err(StoreError::Invalid(format!(
                "{} already holds a backup store",
                root.display()
            )));
        }
        let stray = std::fs::read_dir(root)
            .map_err(|e| StoreError::io(root, e))?
            .filter_map(Result::ok)
            .find(|e| !e.file_name().to_string_lossy().starts_with('.'));
        if let Some(e) = stray {
            return Err(StoreError::Invalid(format!(
                "{} is not empty ({} is there): a store needs a folder of its own",
                root.display(),
                e.file_name().to_string_lossy()
            )));
        }
        let config = StoreConfig {
            format: FORMAT.into(),
            version: VERSION,
            id: uuid::Uuid::new_v4().to_string(),
            chunk_size: chunk::CHUNK_SIZE as u64,
            created: unix_now(),
        };
        for d in ["chunks", "chunks/.tmp"] {
            let p = root.join(d);
            std::fs::create_dir_all(&p).map_err(|e| StoreError::io(&p, e))?;
        }
        Catalog::open(&root.join("catalog.sqlite"))?;
        let body =
            serde_json::to_vec_pretty(&config).map_err(|e| StoreError::Internal(e.to_string()))?;
        write_atomic(&cfg_path, &body)?;
        Store::open(root)
    }

    /// Opens an existing store.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        let cfg_path = root.join(CONFIG_FILE);
        let body = read_regular(&cfg_path, 64 << 10).map_err(|e| match e {
            StoreError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                StoreError::NotAStore(format!("{} has no {CONFIG_FILE}", root.display()))
            }
            other => other,
        })?;
        let config: StoreConfig = serde_json::from_slice(&body)
            .map_err(|e| StoreError::NotAStore(format!("{}: {e}", cfg_path.display())))?;
        if config.format != FORMAT {
            return Err(StoreError::NotAStore(format!(
                "{} names format {:?}",
                cfg_path.display(),
                config.format
            )));
        }
        if config.version != VERSION {
            return Err(StoreError::Version(format!(
                "the store is version {}, this ferry knows {VERSION}",
                config.version
            )));
        }
        if config.chunk_size != chunk::CHUNK_SIZE as u64 {
            return Err(StoreError::Version(format!(
                "the store's chunks are {} bytes, this ferry writes {}",
                config.chunk_size,
                chunk::CHUNK_SIZE
            )));
        }
        // a store folder may be a share someone else controls: nothing in it is
        // followed through a symbolic link, nothing read beyond what it can hold
        for d in ["chunks", "chunks/.tmp"] {
            real_dir(&root.join(d))?;
        }
        let cat = root.join("catalog.sqlite");
        match std::fs::symlink_metadata(&cat) {
            Ok(m) if !m.file_type().is_file() => {
                return Err(StoreError::Corrupt(format!(
                    "{} is not a regular file",
                    cat.display()
                )))
            }
            _ => {}
        }
        let catalog = Catalog::open(&cat)?;
        Ok(Store {
            root: root.to_path_buf(),
            config,
            catalog: Mutex::new(catalog),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    pub(crate) fn catalog(&self) -> MutexGuard<'_, Catalog> {
        self.catalog
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn chunk_path(&self, d: &Digest) -> PathBuf {
        let hex = d.hex();
        self.root.join("chunks").join(&hex[..2]).join(hex)
    }

    /// Reads a chunk file (no checks of its content: see [`chunk::decode`]): a regular
    /// file, never through a link, at most as large as a chunk file can be.
    pub(crate) fn read_chunk_file(&self, d: &Digest) -> Result<Vec<u8>, StoreError> {
        let p = self.chunk_path(d);
        read_regular(&p, chunk::MAX_FILE as u64)
    }

    /// The plain data of a chunk, checked against its name.
    pub fn read_chunk(&self, d: &Digest, key: Option<&CryptKey>) -> Result<Vec<u8>, StoreError> {
        let file = self.read_chunk_file(d)?;
        chunk::decode(&file, d, key).map_err(|source| StoreError::Chunk {
            digest: d.hex(),
            source,
        })
    }

    /// Writes an encoded chunk file: to `.tmp`, synced, renamed into place.
    pub(crate) fn write_chunk_file(&self, d: &Digest, body: &[u8]) -> Result<(), StoreError> {
        let dest = self.chunk_path(d);
        let dir = dest
            .parent()
            .ok_or_else(|| StoreError::Internal("chunk path without parent".into()))?;
        match std::fs::create_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => real_dir(dir)?,
            Err(e) => return Err(StoreError::io(dir, e)),
        }
        let tmp_dir = self.root.join("chunks/.tmp");
        real_dir(&tmp_dir)?;
        let tmp = tmp_dir.join(format!("{}.{}", d.hex(), uuid::Uuid::new_v4().simple()));
        let r = (|| {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp)
                .map_err(|e| StoreError::io(&tmp, e))?;
            f.write_all(body).map_err(|e| StoreError::io(&tmp, e))?;
            f.sync_all().map_err(|e| StoreError::io(&tmp, e))?;
            std::fs::rename(&tmp, &dest).map_err(|e| StoreError::io(&dest, e))
        })();
        if r.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        r
    }

    /// Whether a chunk's file exists and passes the keyless check; its size if so.
    pub(crate) fn chunk_file_ok(&self, d: &Digest) -> Result<Option<u64>, StoreError> {
        match self.read_chunk_file(d) {
            Ok(f) => Ok(chunk::check(&f).ok().map(|_| f.len() as u64)),
            Err(StoreError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    pub(crate) fn remove_chunk_file(&self, d: &Digest) -> Result<(), StoreError> {
        let p = self.chunk_path(d);
        if let Some(dir) = p.parent() {
            if dir.exists() {
                real_dir(dir)?;
            }
        }
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::io(&p, e)),
        }
    }

    /// Snapshots, oldest first (all, or one VM's).
    pub fn snapshots(&self, vm: Option<&str>) -> Result<Vec<catalog::SnapshotRow>, StoreError> {
        self.catalog().snapshots(vm)
    }

    pub fn snapshot(&self, id: &str) -> Result<Option<catalog::SnapshotRow>, StoreError> {
        self.catalog().snapshot(id)
    }

    pub fn disks(&self, id: &str) -> Result<Vec<catalog::DiskRow>, StoreError> {
        self.catalog().disks(id)
    }

    pub fn index(&self, id: &str, disk: &str) -> Result<Vec<Digest>, StoreError> {
        self.catalog().index(id, disk)
    }

    /// What the store holds: chunks, bytes on disk, unreferenced chunks, the plain
    /// bytes its complete snapshots name.
    pub fn usage(&self) -> Result<Usage, StoreError> {
        let cat = self.catalog();
        let (chunks, stored, unreferenced) = cat.usage()?;
        let logical = cat.logical_bytes()?;
        let snapshots = cat.snapshots(None)?.len() as u64;
        Ok(Usage {
            snapshots,
            chunks,
            stored_bytes: stored,
            unreferenced_chunks: unreferenced,
            logical_bytes: logical,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    pub snapshots: u64,
    pub chunks: u64,
    pub stored_bytes: u64,
    pub unreferenced_chunks: u64,
    pub logical_bytes: u64,
}

impl Usage {
    /// Plain bytes named per byte stored.
    pub fn dedup_factor(&self) -> f64 {
        if self.stored_bytes == 0 {
            return 1.0;
        }
        self.logical_bytes as f64 / self.stored_bytes as f64
    }
}

pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// `path` must be a folder itself, not a link to one (a store's folders may be on a
/// share someone else writes: a link could send root's writes and deletes anywhere).
pub(crate) fn real_dir(path: &Path) -> Result<(), StoreError> {
    let m = std::fs::symlink_metadata(path).map_err(|e| StoreError::io(path, e))?;
    if m.file_type().is_dir() {
        Ok(())
    } else {
        Err(StoreError::Corrupt(format!(
            "{} is not a folder (a link or a file): refusing to use it",
            path.display()
        )))
    }
}

/// A regular file's content, never through a link, at most `limit` bytes (a FIFO or a
/// device in its place is refused without blocking).
pub(crate) fn read_regular(path: &Path, limit: u64) -> Result<Vec<u8>, StoreError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| StoreError::io(path, e))?;
    let m = f.metadata().map_err(|e| StoreError::io(path, e))?;
    if !m.file_type().is_file() {
        return Err(StoreError::Corrupt(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    if m.len() > limit {
        return Err(StoreError::Corrupt(format!(
            "{} is {} bytes, more than {limit}",
            path.display(),
            m.len()
        )));
    }
    let mut out = Vec::with_capacity(usize::try_from(m.len()).unwrap_or(0));
    f.take(limit + 1)
        .read_to_end(&mut out)
        .map_err(|e| StoreError::io(path, e))?;
    if out.len() as u64 > limit {
        return Err(StoreError::Corrupt(format!(
            "{} grew past {limit} bytes",
            path.display()
        )));
    }
    Ok(out)
}

fn write_atomic(path: &Path, body: &[u8]) -> Result<(), StoreError> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(|e| StoreError::io(&tmp, e))?;
    f.write_all(body).map_err(|e| StoreError::io(&tmp, e))?;
    f.sync_all().map_err(|e| StoreError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| StoreError::io(path, e))
}

#[cfg(test)]
mod tests;
