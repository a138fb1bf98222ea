//! One host's copy of a volume: the raw data file, its metadata (generation history,
//! up-to-date flag, bitmap bases), the activity log and the peers' dirty bitmaps.
//!
//! Files in the pool directory: `{vol}.raw`, `{vol}.meta` (JSON, replaced atomically),
//! `{vol}.al` (activity log, one bit per 4 MiB extent), `{vol}.bm-{peer}` (one bit per
//! 64 KiB region the peer lacks).

use crate::bitmap::Bitmap;
use ferry_types::GenId;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Bytes per bit of a peer's dirty bitmap (and the resync unit).
pub const REGION: u64 = 64 << 10;
/// Bytes per bit of the activity log.
pub const EXTENT: u64 = 4 << 20;
/// Generations kept in the history.
const HISTORY: usize = 1000;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    pub size: u64,
    /// Generations the data went through, oldest first (empty: a new copy).
    pub history: Vec<GenId>,
    pub uptodate: bool,
    pub sync_source: Option<GenId>,
    /// Peers this copy keeps a bitmap for, each with the peer's generation the bitmap
    /// starts at (None: the bitmap is not valid for a resync, only as a record of
    /// writes the peer lacks).
    pub bitmaps: BTreeMap<String, Option<GenId>>,
    /// Peers this copy acknowledged writes without (as primary, after the cluster
    /// marked them outdated): their bitmap bits are writes only this copy has.
    #[serde(default)]
    pub degraded: BTreeSet<String>,
}

pub(crate) fn io_err(what: String, e: std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{what}: {e}"))
}

pub struct Local {
    pub key: String,
    pub dir: PathBuf,
    pub vol: String,
    file: Arc<File>,
    meta: Mutex<Meta>,
    al: Mutex<Bitmap>,
    /// Writes in flight per extent, extents written since the last tick, and for each
    /// active extent the ticks it has stayed idle.
    al_busy: Mutex<AlBusy>,
    bitmaps: Mutex<BTreeMap<String, Bitmap>>,
}

/// Ticks (of the service's housekeeping, 2 s) an extent stays in the activity log after
/// its last write. Like DRBD's al-extents the log keeps a hot area: a sequential or
/// random writer keeps its extents and never waits for the log to be saved again, and a
/// volume is not synced merely to retire extents it is still writing; the cost is a
/// larger resync after a primary crash (what was written in the last ~20 s).
const AL_IDLE_TICKS: u32 = 10;

#[derive(Default)]
struct AlBusy {
    in_flight: HashMap<usize, u32>,
    touched: BTreeSet<usize>,
    idle: HashMap<usize, u32>,
}

/// An extent range held in the activity log while a write is in flight.
pub struct AlGuard<'a> {
    local: &'a Local,
    extents: std::ops::Range<usize>,
}

impl Drop for AlGuard<'_> {
    fn drop(&mut self) {
        let mut b = self.local.al_busy.lock().expect("al");
        for e in self.extents.clone() {
            if let Some(n) = b.in_flight.get_mut(&e) {
                *n -= 1;
                if *n == 0 {
                    b.in_flight.remove(&e);
                }
            }
        }
    }
}

impl Local {
    pub fn data_path(dir: &Path, vol: &str) -> PathBuf {
        dir.join(format!("{vol}.raw"))
    }

    fn meta_path(&self) -> PathBuf {
        self.dir.join(format!("{}.meta", self.vol))
    }

    fn bitmap_path(&self, peer: &str) -> PathBuf {
        self.dir.join(format!("{}.bm-{peer}", self.vol))
    }

    /// Opens the copy, creating it when `create` gives its size and first generation
    /// (None: a new copy that must be synced in full before it is up to date). With a
    /// first generation (a brand-new volume) existing files are an error.
    pub fn open(
        key: &str,
        dir: &Path,
        vol: &str,
        create: Option<(u64, Option<GenId>)>,
    ) -> std::io::Result<Local> {
        let data = Local::data_path(dir, vol);
        let meta_path = dir.join(format!("{vol}.meta"));
        if meta_path.exists() {
            if let Some((_, Some(_))) = create {
                // A brand-new volume never takes over files someone left behind.
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!(
                        "{} already holds a copy named {vol} (left from an earlier volume?); remove its files or pick another name",
                        dir.display()
                    ),
                ));
            }
        }
        let (file, meta) = if !meta_path.exists() {
            let Some((size, gen)) = create else {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("no copy of {key} in {}", dir.display()),
                ));
            };
            std::fs::create_dir_all(dir)
                .map_err(|e| io_err(format!("create {}", dir.display()), e))?;
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&data)
                .map_err(|e| io_err(format!("create {}", data.display()), e))?;
            f.set_len(size)?;
            let meta = Meta {
                size,
                uptodate: gen.is_some(),
                history: gen.into_iter().collect(),
                ..Default::default()
            };
            write_meta(&meta_path, &meta)?;
            (f, meta)
        } else {
            let bytes = std::fs::read(&meta_path)
                .map_err(|e| io_err(format!("read {}", meta_path.display()), e))?;
            let meta: Meta = serde_json::from_slice(&bytes).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", meta_path.display()),
                )
            })?;
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&data)
                .map_err(|e| io_err(format!("open {}", data.display()), e))?;
            (f, meta)
        };
        let size = meta.size;
        let al = Bitmap::open(&dir.join(format!("{vol}.al")), size, EXTENT)?;
        let mut bitmaps = BTreeMap::new();
        for peer in meta.bitmaps.keys() {
            let p = dir.join(format!("{vol}.bm-{peer}"));
            bitmaps.insert(peer.clone(), Bitmap::open(&p, size, REGION)?);
        }
        Ok(Local {
            key: key.to_string(),
            dir: dir.to_path_buf(),
            vol: vol.to_string(),
            file: Arc::new(file),
            meta: Mutex::new(meta),
            al: Mutex::new(al),
            al_busy: Mutex::new(Default::default()),
            bitmaps: Mutex::new(bitmaps),
        })
    }

    pub fn size(&self) -> u64 {
        self.meta.lock().expect("meta").size
    }

    pub fn meta(&self) -> Meta {
        self.meta.lock().expect("meta").clone()
    }

    /// Changes the metadata and saves it durably.
    pub fn update_meta(&self, f: impl FnOnce(&mut Meta)) -> std::io::Result<()> {
        let mut m = self.meta.lock().expect("meta");
        let mut new = m.clone();
        f(&mut new);
        if new.history.len() > HISTORY {
            let cut = new.history.len() - HISTORY;
            new.history.drain(..cut);
        }
        write_meta(&self.meta_path(), &new)?;
        *m = new;
        Ok(())
    }

    pub fn current(&self) -> Option<GenId> {
        self.meta.lock().expect("meta").history.last().cloned()
    }

    pub async fn read(&self, offset: u64, len: u32) -> std::io::Result<Vec<u8>> {
        let f = self.file.clone();
        tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; len as usize];
            f.read_exact_at(&mut buf, offset)?;
            Ok(buf)
        })
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?
    }

    pub fn read_blocking(&self, offset: u64, len: u32) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len as usize];
        self.file.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }

    pub fn write_blocking(&self, offset: u64, data: &[u8], fua: bool) -> std::io::Result<()> {
        self.file.write_all_at(data, offset)?;
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    /// Zeroes a range: punches a hole (reads as zeroes on every copy alike) or, where
    /// the file system cannot, writes zeroes.
    pub fn zero_blocking(&self, offset: u64, len: u32, fua: bool) -> std::io::Result<()> {
        let r = nix::fcntl::fallocate(
            &*self.file,
            nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            offset as i64,
            len as i64,
        );
        if r.is_err() {
            let zeroes = vec![0u8; (len as usize).min(1 << 20)];
            let mut at = 0u64;
            while at < len as u64 {
                let n = usize::try_from((len as u64 - at).min(zeroes.len() as u64))
                    .unwrap_or(zeroes.len());
                self.file.write_all_at(&zeroes[..n], offset + at)?;
                at += n as u64;
            }
        }
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    pub fn sync_blocking(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    pub async fn write(&self, offset: u64, data: Arc<Vec<u8>>, fua: bool) -> std::io::Result<()> {
        let f = self.file.clone();
        tokio::task::spawn_blocking(move || {
            f.write_all_at(&data, offset)?;
            if fua {
                f.sync_data()?;
            }
            Ok(())
        })
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?
    }

    pub async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Local) -> std::io::Result<T> + Send + 'static,
    ) -> std::io::Result<T> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || f(&me))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?
    }

    /// MD5 of a range (online verify).
    pub fn digest_blocking(&self, offset: u64, len: u32) -> std::io::Result<[u8; 16]> {
        use md5::Digest;
        let data = self.read_blocking(offset, len)?;
        Ok(md5::Md5::digest(&data).into())
    }

    /// Enters a write into the activity log. `durable` (the primary): its extents are
    /// on disk as active before the data is written anywhere. A secondary only marks
    /// them (saved with its next flush): what it loses in a crash before that, its
    /// primary's activity log covers.
    pub fn al_enter(&self, offset: u64, len: u64, durable: bool) -> std::io::Result<AlGuard<'_>> {
        // Lock order: `al`, then `al_busy` (a retire must not clear an extent between
        // the bit being set and the write counted in flight).
        let mut al = self.al.lock().expect("al");
        let extents = al.range(offset, len);
        if al.set(extents.clone()) && durable {
            al.save(true)?;
        }
        Ok(self.al_guard(al, extents))
    }

    /// Counts a write in flight in `extents` (set in `al`, still locked: see the lock
    /// order above).
    fn al_guard(
        &self,
        al: std::sync::MutexGuard<'_, Bitmap>,
        extents: std::ops::Range<usize>,
    ) -> AlGuard<'_> {
        let mut b = self.al_busy.lock().expect("al");
        drop(al);
        for e in extents.clone() {
            *b.in_flight.entry(e).or_default() += 1;
            b.touched.insert(e);
        }
        AlGuard {
            local: self,
            extents,
        }
    }

    /// Enters a write whose extents are all in the activity log already, without
    /// waiting: None when one is not (entering needs a save) or when the log is busy
    /// being saved by another thread. For the data path's thread, which must not wait
    /// for an fsync.
    pub fn al_try_enter(&self, offset: u64, len: u64) -> Option<AlGuard<'_>> {
        let al = self.al.try_lock().ok()?;
        let extents = al.range(offset, len);
        if !extents.clone().all(|e| al.get(e)) {
            return None;
        }
        Some(self.al_guard(al, extents))
    }

    /// Saves the activity log durably (after a flush of the data).
    pub fn al_save(&self) -> std::io::Result<()> {
        self.al.lock().expect("al").save(true)
    }

    /// Saves every peer bitmap durably.
    pub fn save_bitmaps(&self) -> std::io::Result<()> {
        for b in self.bitmaps.lock().expect("bitmaps").values_mut() {
            b.save(true)?;
        }
        Ok(())
    }

    /// Ends a tick and returns the extents a retire may clear: active, with no write in
    /// flight and none for [`AL_IDLE_TICKS`] ticks. Empty: nothing to retire, and no
    /// flush is needed for it.
    pub fn al_idle(&self) -> BTreeSet<usize> {
        let active = self.al.lock().expect("al").ones();
        let mut b = self.al_busy.lock().expect("al");
        let touched = std::mem::take(&mut b.touched);
        let mut idle = HashMap::new();
        let mut out = BTreeSet::new();
        for e in active {
            let n = if b.in_flight.contains_key(&e) || touched.contains(&e) {
                0
            } else {
                b.idle.get(&e).copied().unwrap_or(0) + 1
            };
            if n >= AL_IDLE_TICKS {
                out.insert(e);
            }
            idle.insert(e, n);
        }
        b.idle = idle;
        out
    }

    /// Retires the `idle` extents (from [`Local::al_idle`]) that are still idle. The
    /// caller has made the data durable on every connected copy after `al_idle`; here
    /// the data and the peers' bitmaps (which hold what the others missed) are saved
    /// before the extents go.
    pub fn al_retire(&self, idle: &BTreeSet<usize>) -> std::io::Result<()> {
        if idle.is_empty() {
            return Ok(());
        }
        self.file.sync_data()?;
        self.save_bitmaps()?;
        let mut al = self.al.lock().expect("al");
        let b = self.al_busy.lock().expect("al");
        for e in idle {
            if !b.in_flight.contains_key(e) && !b.touched.contains(e) {
                al.clear(*e);
            }
        }
        drop(b);
        al.save(true)
    }

    pub fn al_words(&self) -> Vec<u64> {
        self.al.lock().expect("al").words().to_vec()
    }

    pub fn al_count(&self) -> usize {
        self.al.lock().expect("al").count()
    }

    /// Runs `f` on peer `peer`'s bitmap (created, all clear and with no valid base, if
    /// missing).
    pub fn with_bitmap<T>(
        &self,
        peer: &str,
        f: impl FnOnce(&mut Bitmap) -> T,
    ) -> std::io::Result<T> {
        let mut m = self.bitmaps.lock().expect("bitmaps");
        if !m.contains_key(peer) {
            let mut b = Bitmap::open(&self.bitmap_path(peer), self.size(), REGION)?;
            b.clear_all();
            b.save(true)?;
            m.insert(peer.to_string(), b);
            drop(m);
            let known = self.meta().bitmaps.contains_key(peer);
            if !known {
                self.update_meta(|meta| {
                    meta.bitmaps.insert(peer.to_string(), None);
                })?;
            }
            m = self.bitmaps.lock().expect("bitmaps");
        }
        let b = m
            .get_mut(peer)
            .ok_or_else(|| std::io::Error::other("bitmap vanished"))?;
        Ok(f(b))
    }

    /// For the Hello to `peer`: the base of its bitmap, and the bitmap itself only if
    /// this copy acknowledged writes without the peer (bits of writes that were never
    /// acknowledged are not a split brain: the activity logs cover them).
    pub fn bitmap_info(&self, peer: &str) -> (Option<GenId>, Vec<u64>) {
        let meta = self.meta();
        let base = meta.bitmaps.get(peer).cloned().flatten();
        if !meta.degraded.contains(peer) {
            return (base, vec![]);
        }
        let m = self.bitmaps.lock().expect("bitmaps");
        (
            base,
            m.get(peer).map(|b| b.words().to_vec()).unwrap_or_default(),
        )
    }

    /// Records whether this copy acknowledges writes without `peer`.
    pub fn set_degraded(&self, peer: &str, on: bool) -> std::io::Result<()> {
        if self.meta().degraded.contains(peer) == on {
            return Ok(());
        }
        self.update_meta(|m| {
            if on {
                m.degraded.insert(peer.to_string());
            } else {
                m.degraded.remove(peer);
            }
        })
    }

    /// Starts peer `peer`'s bitmap afresh: all clear (or all set) from `base`.
    pub fn reset_bitmap(&self, peer: &str, base: Option<GenId>, all: bool) -> std::io::Result<()> {
        self.with_bitmap(peer, |b| {
            b.clear_all();
            if all {
                b.set_all();
            }
            b.save(true)
        })??;
        self.set_degraded(peer, false)?;
        self.set_bitmap_base(peer, base)
    }

    pub fn set_bitmap_base(&self, peer: &str, base: Option<GenId>) -> std::io::Result<()> {
        self.update_meta(|m| {
            m.bitmaps.insert(peer.to_string(), base);
        })
    }

    pub fn bitmap_peers(&self) -> Vec<String> {
        self.meta().bitmaps.keys().cloned().collect()
    }

    /// Removes every peer bitmap and its base.
    pub fn drop_bitmaps(&self) -> std::io::Result<()> {
        let old = std::mem::take(&mut *self.bitmaps.lock().expect("bitmaps"));
        for (_, b) in old {
            b.remove();
        }
        self.update_meta(|m| {
            m.bitmaps.clear();
            m.degraded.clear();
        })
    }

    /// Grows the copy (never shrinks).
    pub fn grow(&self, size: u64) -> std::io::Result<()> {
        if size < self.size() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a replicated volume cannot shrink",
            ));
        }
        self.file.set_len(size)?;
        self.update_meta(|m| m.size = size)
    }

    pub fn allocated_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        self.file.metadata().map(|m| m.blocks() * 512).unwrap_or(0)
    }

    /// Keeps the data aside as `{vol}.splitbrain-{generation}` and starts over as a new,
    /// empty copy (the split-brain loser). Returns the saved file.
    pub fn discard(&self) -> std::io::Result<PathBuf> {
        let m = self.meta();
        let tag = m
            .history
            .last()
            .map(|g| format!("{}-{}", g.n, g.host))
            .unwrap_or_else(|| "none".into());
        let saved = self.dir.join(format!("{}.splitbrain-{tag}", self.vol));
        let data = Local::data_path(&self.dir, &self.vol);
        std::fs::copy(&data, &saved).map_err(|e| io_err(format!("keep {}", saved.display()), e))?;
        self.file.sync_data()?;
        self.drop_bitmaps()?;
        self.update_meta(|m| {
            m.history.clear();
            m.uptodate = false;
            m.sync_source = None;
        })?;
        Ok(saved)
    }

    /// Deletes every file of the copy.
    pub fn remove_files(dir: &Path, vol: &str) {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                let ours = n == format!("{vol}.raw")
                    || n == format!("{vol}.meta")
                    || n == format!("{vol}.al")
                    || n.starts_with(&format!("{vol}.bm-"));
                if ours {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}

fn write_meta(path: &Path, m: &Meta) -> std::io::Result<()> {
    let tmp = path.with_extension("meta.tmp");
    let bytes = serde_json::to_vec_pretty(m).map_err(std::io::Error::other)?;
    {
        let f = File::create(&tmp).map_err(|e| io_err(format!("write {}", tmp.display()), e))?;
        f.write_all_at(&bytes, 0)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).map_err(|e| io_err(format!("replace {}", path.display()), e))?;
    if let Some(d) = path.parent() {
        if let Ok(d) = File::open(d) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod al_tests {
    use super::*;

    fn idle_after(l: &Local, ticks: u32) -> BTreeSet<usize> {
        let mut idle = BTreeSet::new();
        for _ in 0..ticks {
            idle = l.al_idle();
        }
        idle
    }

    #[test]
    fn extents_retire_only_after_staying_idle() {
        let dir = tempfile::tempdir().unwrap();
        let gen = GenId {
            n: 1,
            host: "a".into(),
        };
        let l = Local::open("p/v", dir.path(), "v", Some((16 * EXTENT, Some(gen)))).unwrap();
        // The data path's thread enters only extents already in the log.
        assert!(l.al_try_enter(0, 4096).is_none());
        drop(l.al_enter(0, 4096, true).unwrap());
        drop(l.al_try_enter(0, 4096).expect("extent 0 is in the log"));
        drop(l.al_enter(3 * EXTENT, 4096, true).unwrap());
        assert_eq!(l.al_count(), 2);

        // Written in this tick: not idle; then idle for AL_IDLE_TICKS - 1 ticks: kept.
        assert!(l.al_idle().is_empty());
        assert!(idle_after(&l, AL_IDLE_TICKS - 1).is_empty());

        // Extent 3 written again: it starts over, extent 0 is due.
        drop(l.al_enter(3 * EXTENT + 8192, 4096, true).unwrap());
        let due = l.al_idle();
        assert_eq!(due, BTreeSet::from([0]));

        // A write entering a due extent before the retire keeps it.
        let g = l.al_enter(100, 4096, true).unwrap();
        l.al_retire(&due).unwrap();
        assert_eq!(l.al_count(), 2);
        drop(g);

        // A write in flight across ticks keeps its extent; once done and idle long
        // enough, both go.
        let g = l.al_enter(3 * EXTENT, 4096, true).unwrap();
        assert!(!idle_after(&l, AL_IDLE_TICKS + 1).contains(&3));
        drop(g);
        let due = idle_after(&l, AL_IDLE_TICKS);
        assert_eq!(due, BTreeSet::from([0, 3]));
        l.al_retire(&due).unwrap();
        assert_eq!(l.al_count(), 0);
        // Saved: a reopened copy has an empty activity log.
        drop(l);
        let l = Local::open("p/v", dir.path(), "v", None).unwrap();
        assert_eq!(l.al_count(), 0);
    }
}
