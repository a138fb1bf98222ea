//! The store's tests: real files and a real SQLite catalog in a temporary folder.

use super::catalog::DiskRow;
use super::chunk::{CryptKey, Digest, CHUNK_SIZE};
use super::reader::Progress;
use super::writer::SnapshotMeta;
use super::*;
use crate::retention::Keep;
use std::sync::Arc;

fn meta(vm: &str) -> SnapshotMeta {
    SnapshotMeta {
        vm: vm.into(),
        host: "h1".into(),
        consistency: "crash".into(),
        config: None,
    }
}

/// A disk image: `n` chunks of patterned data, chunk 1 all zeros, a short tail.
fn disk(n: usize, seed: u8) -> Vec<u8> {
    let mut v = vec![0u8; n * CHUNK_SIZE + 12345];
    for (i, b) in v.iter_mut().enumerate() {
        let chunk = i / CHUNK_SIZE;
        if chunk != 1 {
            *b = (i / 4096).to_le_bytes()[0] ^ seed.wrapping_mul(31) ^ chunk.to_le_bytes()[0];
        }
    }
    v
}

fn row(name: &str, size: usize) -> DiskRow {
    DiskRow {
        name: name.into(),
        size: size as u64,
        mode: "full".into(),
        reason: None,
        read_bytes: size as u64,
        new_bytes: 0,
        chunks: 0,
        bitmap: None,
    }
}

fn backup(store: &Arc<Store>, vm: &str, data: &[u8], key: Option<&CryptKey>) -> String {
    let mut w = store.begin(meta(vm), key.cloned()).unwrap();
    let index: Vec<Digest> = data
        .chunks(CHUNK_SIZE)
        .map(|c| w.put(c.to_vec()).unwrap())
        .collect();
    w.disk(row("disk0", data.len()), &index).unwrap();
    w.commit().unwrap()
}

fn restore(store: &Store, id: &str, key: Option<&CryptKey>) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("out.raw");
    store
        .restore_raw(id, "disk0", key, &dest, 3, &Progress::default())
        .unwrap();
    std::fs::read(dest).unwrap()
}

fn new_store() -> (tempfile::TempDir, Arc<Store>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::create(&dir.path().join("store")).unwrap());
    (dir, store)
}

#[test]
fn store_backup_restores_byte_identical_and_dedups() {
    let (_d, store) = new_store();
    let data = disk(3, 1);
    let a = backup(&store, "web", &data, None);
    let b = backup(&store, "web", &data, None);
    assert_eq!(restore(&store, &a, None), data);
    assert_eq!(restore(&store, &b, None), data);
    let u = store.usage().unwrap();
    // three data chunks + the zero chunk + the tail, stored once for both backups
    assert_eq!(u.chunks, 4);
    assert_eq!(u.snapshots, 2);
    assert!(u.dedup_factor() > 2.0, "{u:?}");
}

#[test]
fn store_refuses_a_non_empty_folder_and_a_second_create() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("x"), b"x").unwrap();
    assert!(matches!(
        Store::create(dir.path()),
        Err(StoreError::Invalid(_))
    ));
    let (_d, store) = new_store();
    assert!(matches!(
        Store::create(store.root()),
        Err(StoreError::Invalid(_))
    ));
    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(
        Store::open(empty.path()),
        Err(StoreError::NotAStore(_))
    ));
}

#[test]
fn store_of_a_newer_version_is_refused() {
    let (_d, store) = new_store();
    let cfg = store.root().join(CONFIG_FILE);
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"version\": 1", "\"version\": 9");
    std::fs::write(&cfg, text).unwrap();
    assert!(matches!(
        Store::open(store.root()),
        Err(StoreError::Version(_))
    ));
}

#[test]
fn store_dropped_writer_leaves_nothing_and_gc_frees_its_chunks() {
    let (_d, store) = new_store();
    {
        let mut w = store.begin(meta("web"), None).unwrap();
        w.put(disk(1, 7)[..CHUNK_SIZE].to_vec()).unwrap();
        w.put(disk(1, 8)[..CHUNK_SIZE].to_vec()).unwrap();
    }
    assert!(store.snapshots(None).unwrap().is_empty());
    let gc = store.gc("h1").unwrap();
    assert_eq!(gc.removed_chunks, 2);
    assert_eq!(store.usage().unwrap().chunks, 0);
    let files = walk(store.root());
    assert!(files.is_empty(), "{files:?}");
}

fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for d in std::fs::read_dir(root.join("chunks"))
        .unwrap()
        .filter_map(Result::ok)
    {
        if d.file_name().len() == 2 {
            out.extend(
                std::fs::read_dir(d.path())
                    .unwrap()
                    .filter_map(|f| f.ok().map(|f| f.path())),
            );
        }
    }
    out
}

#[test]
fn store_prune_then_gc_frees_only_chunks_no_backup_uses() {
    let (_d, store) = new_store();
    let old = disk(2, 1);
    let mut new = old.clone();
    new[..CHUNK_SIZE].fill(0x55);
    let a = backup(&store, "web", &old, None);
    let b = backup(&store, "web", &new, None);
    store
        .catalog()
        .conn_for_tests()
        .execute(
            "UPDATE snapshots SET started = started - 60 WHERE id = ?1",
            [&a],
        )
        .unwrap();
    let verdicts = store
        .prune(
            "web",
            &Keep {
                last: 1,
                ..Keep::default()
            },
            false,
        )
        .unwrap();
    assert_eq!(verdicts.iter().filter(|v| !v.keep).count(), 1);
    assert!(store.snapshot(&a).unwrap().is_none());
    let gc = store.gc("h1").unwrap();
    // only the first chunk of the old disk is used by nothing else
    assert_eq!(gc.removed_chunks, 1, "{gc:?}");
    assert_eq!(restore(&store, &b, None), new);
}

#[test]
fn store_chunk_collected_between_naming_and_pinning_is_written_again() {
    let (_d, store) = new_store();
    let data = disk(1, 3);
    let a = backup(&store, "web", &data, None);
    store.delete(&a).unwrap();
    let mut w = store.begin(meta("web"), None).unwrap();
    // the chunks are still in the catalog (no references): the writer only names them
    let index: Vec<Digest> = data
        .chunks(CHUNK_SIZE)
        .map(|c| w.put(c.to_vec()).unwrap())
        .collect();
    // another host collects garbage before the writer pins them
    let other = Store::open(store.root()).unwrap();
    assert_eq!(other.gc("h2").unwrap().removed_chunks, 2);
    w.disk(row("disk0", data.len()), &index).unwrap();
    let b = w.commit().unwrap();
    assert_eq!(restore(&store, &b, None), data);
}

#[test]
fn store_verify_finds_a_damaged_chunk_and_the_next_backup_heals_it() {
    let (_d, store) = new_store();
    let data = disk(2, 9);
    let a = backup(&store, "web", &data, None);
    let victim = store.index(&a, "disk0").unwrap()[0];
    let path = store.chunk_path(&victim);
    let mut f = std::fs::read(&path).unwrap();
    let at = f.len() - 10;
    f[at] ^= 0xff;
    std::fs::write(&path, f).unwrap();
    let r = store.verify(None, None, &Progress::default()).unwrap();
    assert_eq!(r.bad.len(), 1, "{r:?}");
    assert_eq!(r.bad[0].digest, victim.hex());
    assert_eq!(r.bad[0].backups, vec![a.clone()]);
    let b = backup(&store, "web", &data, None);
    let r = store.verify(None, None, &Progress::default()).unwrap();
    assert!(r.bad.is_empty(), "{r:?}");
    assert_eq!(restore(&store, &a, None), data);
    assert_eq!(restore(&store, &b, None), data);
}

#[test]
fn store_encrypted_backup_needs_its_key_and_verifies_by_crc_without_it() {
    let (_d, store) = new_store();
    let (_, key) = CryptKey::generate();
    let (_, other) = CryptKey::generate();
    let data = disk(1, 4);
    let a = backup(&store, "web", &data, Some(&key));
    let dest = store.root().join("x.raw");
    let e = store
        .restore_raw(&a, "disk0", None, &dest, 1, &Progress::default())
        .unwrap_err();
    assert!(e.to_string().contains("encrypted"), "{e}");
    assert!(!dest.exists());
    assert!(store
        .restore_raw(&a, "disk0", Some(&other), &dest, 1, &Progress::default())
        .is_err());
    assert_eq!(restore(&store, &a, Some(&key)), data);
    let r = store.verify(None, None, &Progress::default()).unwrap();
    assert!(r.bad.is_empty());
    assert_eq!(r.crc_only, r.checked_chunks);
    // the store's files do not hold the data in the clear
    let needle = &data[..64];
    for f in walk(store.root()) {
        let body = std::fs::read(f).unwrap();
        assert!(!body.windows(64).any(|w| w == needle));
    }
}

#[test]
fn store_writer_killed_is_removed_only_once_its_process_is_gone() {
    let (_d, store) = new_store();
    let mut w = store.begin(meta("web"), None).unwrap();
    w.put(vec![1u8; 1000]).unwrap();
    let id = w.id().to_string();
    std::mem::forget(w);
    assert!(store.remove_stale("h1").unwrap().is_empty());
    store
        .catalog()
        .conn_for_tests()
        .execute(
            "UPDATE snapshots SET owner = 'h1:4194303:1' WHERE id = ?1",
            [&id],
        )
        .unwrap();
    assert_eq!(store.remove_stale("h1").unwrap(), vec![id]);
    // its chunk was never pinned: a file without a row, which only repair's sweep of
    // old orphans removes; no listed backup names it
    assert_eq!(store.gc("h1").unwrap().removed_chunks, 0);
    assert_eq!(walk(store.root()).len(), 1);
    assert_eq!(store.repair().unwrap().orphan_files, 0);
}

#[test]
fn store_incremental_reuses_pinned_chunks() {
    let (_d, store) = new_store();
    let data = disk(3, 2);
    let a = backup(&store, "web", &data, None);
    let base = store.index(&a, "disk0").unwrap();
    let mut changed = data.clone();
    changed[2 * CHUNK_SIZE..2 * CHUNK_SIZE + 100].fill(9);
    let mut w = store.begin(meta("web"), None).unwrap();
    let keep: Vec<Digest> = base
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 2)
        .map(|(_, d)| *d)
        .collect();
    assert!(w.reuse(&keep).unwrap().is_empty());
    let mut index = base.clone();
    index[2] = w
        .put(changed[2 * CHUNK_SIZE..3 * CHUNK_SIZE].to_vec())
        .unwrap();
    let mut r = row("disk0", changed.len());
    r.mode = "incremental".into();
    w.disk(r, &index).unwrap();
    assert_eq!(w.stats().new_chunks, 1);
    let b = w.commit().unwrap();
    assert_eq!(restore(&store, &b, None), changed);
    store.delete(&a).unwrap();
    store.gc("h1").unwrap();
    assert_eq!(restore(&store, &b, None), changed);
}

#[test]
fn store_two_hosts_writing_while_gc_runs_lose_no_chunk() {
    let (_d, store) = new_store();
    let root = store.root().to_path_buf();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gc = {
        let root = root.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let s = Store::open(&root).unwrap();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                s.gc("h3").unwrap();
            }
        })
    };
    let writers: Vec<_> = (0..2)
        .map(|h| {
            let root = root.clone();
            std::thread::spawn(move || {
                let s = Arc::new(Store::open(&root).unwrap());
                let data = disk(2, 5);
                let mut kept = Vec::new();
                for round in 0..10 {
                    let id = backup(&s, &format!("vm{h}"), &data, None);
                    // every other backup is deleted at once: its chunks go to zero
                    if round % 2 == 0 {
                        s.delete(&id).unwrap();
                    } else {
                        kept.push(id);
                    }
                }
                (kept, data)
            })
        })
        .collect();
    let results: Vec<_> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    gc.join().unwrap();
    for (kept, data) in results {
        for id in kept {
            assert_eq!(restore(&store, &id, None), data);
        }
    }
}

#[test]
fn store_on_a_hostile_share_follows_no_link_and_runs_no_sql_of_its_own() {
    let (_d, store) = new_store();
    let data = disk(1, 6);
    let a = backup(&store, "web", &data, None);
    let outside = tempfile::tempdir().unwrap();
    let bait = outside.path().join("precious");
    std::fs::write(&bait, b"keep me").unwrap();
    // a chunk file swapped for a link to a host file: never read through
    let victim = store.index(&a, "disk0").unwrap()[0];
    let path = store.chunk_path(&victim);
    std::fs::remove_file(&path).unwrap();
    std::os::unix::fs::symlink(&bait, &path).unwrap();
    assert!(store.read_chunk(&victim, None).is_err());
    // the work folder swapped for a link: the store is refused, nothing there removed
    let tmp = store.root().join("chunks/.tmp");
    std::fs::remove_dir(&tmp).unwrap();
    std::os::unix::fs::symlink(outside.path(), &tmp).unwrap();
    assert!(matches!(
        Store::open(store.root()),
        Err(StoreError::Corrupt(_))
    ));
    assert_eq!(std::fs::read(&bait).unwrap(), b"keep me");
    std::fs::remove_file(&tmp).unwrap();
    std::fs::create_dir(&tmp).unwrap();
    // a trigger planted in the catalog: refused before any statement runs
    store
        .catalog()
        .conn_for_tests()
        .execute_batch("CREATE TRIGGER t AFTER DELETE ON chunks BEGIN SELECT 1; END;")
        .unwrap();
    let e = Store::open(store.root()).err().unwrap();
    assert!(e.to_string().contains("never made"), "{e}");
}

#[test]
fn store_chunk_whose_file_a_failed_collection_removed_is_written_again() {
    let (_d, store) = new_store();
    let data = disk(1, 11);
    let a = backup(&store, "web", &data, None);
    let first = store.index(&a, "disk0").unwrap()[0];
    store.delete(&a).unwrap();
    // a collection unlinked the file, then failed: its row came back (refs 0)
    std::fs::remove_file(store.chunk_path(&first)).unwrap();
    let b = backup(&store, "web", &data, None);
    assert_eq!(restore(&store, &b, None), data);
}

/// Live-restore's view of a backup: any range reads what the disk held (across chunk
/// boundaries, in the zero chunk, in the short tail, encrypted), a range past the end
/// is refused, and a damaged chunk is an error, never other data.
#[test]
fn disk_image_reads_any_range_of_a_backup() {
    use super::image::DiskImage;
    use proptest::prelude::*;
    let (_d, store) = new_store();
    let data = disk(3, 7);
    let key = CryptKey::new(&[9u8; 32]);
    let plain = backup(&store, "web", &data, None);
    let sealed = backup(&store, "web", &data, Some(&key));
    assert!(DiskImage::open(Arc::clone(&store), &sealed, "disk0", None).is_err());
    assert!(DiskImage::open(Arc::clone(&store), &plain, "disk9", None).is_err());
    let images = [
        DiskImage::open(Arc::clone(&store), &plain, "disk0", None).unwrap(),
        DiskImage::open(Arc::clone(&store), &sealed, "disk0", Some(key.clone())).unwrap(),
    ];
    let size = data.len() as u64;
    for img in &images {
        assert_eq!(img.size(), size);
        assert_eq!(img.read(0, data.len()).unwrap(), data);
        assert!(img.read(size - 10, 11).is_err());
        assert!(img.read(u64::MAX, 2).is_err());
        assert_eq!(img.read(size, 0).unwrap(), Vec::<u8>::new());
    }
    proptest!(ProptestConfig::with_cases(64), |(off in 0..size, len in 0usize..(3 * CHUNK_SIZE))| {
        let len = len.min(usize::try_from(size - off).unwrap());
        let o = usize::try_from(off).unwrap();
        for img in &images {
            prop_assert_eq!(img.read(off, len).unwrap(), data[o..o + len].to_vec());
        }
    });
    // A flipped byte in chunk 0's file: reading it fails.
    let fresh = DiskImage::open(Arc::clone(&store), &plain, "disk0", None).unwrap();
    let d0 = store.index(&plain, "disk0").unwrap()[0];
    let f = store.chunk_path(&d0);
    let mut bytes = std::fs::read(&f).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&f, bytes).unwrap();
    assert!(fresh.read(100, 10).is_err());
}

/// A source that is another local store, counting what it is asked; `tamper`: the
/// file of the second chunk is sent under the first one's name.
struct LocalSource {
    store: Arc<Store>,
    asked: std::cell::Cell<u64>,
    tamper: Option<(Digest, Digest)>,
}

impl copy::ChunkSource for LocalSource {
    fn fetch(&self, digests: &[Digest]) -> Vec<Result<Vec<u8>, String>> {
        self.asked.set(self.asked.get() + digests.len() as u64);
        digests
            .iter()
            .map(|d| match self.tamper {
                Some((victim, other)) if victim == *d => {
                    self.store.chunk_file(&other).map_err(|e| e.to_string())
                }
                _ => self.store.chunk_file(d).map_err(|e| e.to_string()),
            })
            .collect()
    }
}

#[test]
fn store_copy_between_stores_is_byte_identical_fetches_only_what_is_missing() {
    let (_a, src) = new_store();
    let (_b, dst) = new_store();
    let d1 = disk(4, 1);
    let id1 = backup(&src, "vm1", &d1, None);
    let mut d2 = d1.clone();
    d2[7] ^= 0xff; // one chunk differs
    let id2 = backup(&src, "vm1", &d2, None);
    let source = LocalSource {
        store: Arc::clone(&src),
        asked: Default::default(),
        tamper: None,
    };
    let s1 = dst
        .copy_in(src.describe(&id1).unwrap().unwrap(), &source, "h2")
        .unwrap();
    assert_eq!(restore(&dst, &id1, None), d1);
    let first = source.asked.get();
    assert_eq!(s1.chunks_fetched, first);
    // the second backup: only its changed chunk comes over
    let s2 = dst
        .copy_in(src.describe(&id2).unwrap().unwrap(), &source, "h2")
        .unwrap();
    assert_eq!(s2.chunks_fetched, 1, "{s2:?}");
    assert_eq!(restore(&dst, &id2, None), d2);
    // the same id twice: refused (already here)
    assert!(dst
        .copy_in(src.describe(&id2).unwrap().unwrap(), &source, "h2")
        .is_err());
    let listed = dst.snapshots(None).unwrap();
    assert_eq!(listed.len(), 2);
    assert!(listed
        .iter()
        .all(|s| s.state == "complete" && s.vm == "vm1"));
}

#[test]
fn store_copy_refuses_a_chunk_that_is_not_its_name_and_lists_nothing() {
    let (_a, src) = new_store();
    let (_b, dst) = new_store();
    let d = disk(3, 2);
    let id = backup(&src, "vm1", &d, None);
    let snap = src.describe(&id).unwrap().unwrap();
    // chunk 2's file (whole, as chunk 0) under chunk 0's name
    let victim = (snap.disks[0].chunks[0], snap.disks[0].chunks[2]);
    let source = LocalSource {
        store: Arc::clone(&src),
        asked: Default::default(),
        tamper: Some(victim),
    };
    let e = dst.copy_in(snap.clone(), &source, "h2").unwrap_err();
    assert!(e.to_string().contains("name"), "{e}");
    assert!(dst.snapshots(None).unwrap().is_empty());
    // the short last chunk named where a whole one belongs
    let mut swapped = snap.clone();
    let last = swapped.disks[0].chunks.len() - 1;
    swapped.disks[0].chunks.swap(0, last);
    let clean = LocalSource {
        store: Arc::clone(&src),
        asked: Default::default(),
        tamper: None,
    };
    assert!(dst.copy_in(swapped, &clean, "h2").is_err());
    // an index that does not fit its disk is refused before anything is written
    let mut short = snap;
    short.disks[0].chunks.pop();
    assert!(dst.copy_in(short, &source, "h2").is_err());
    // a hostile id, a backup from the future, a VM name with control characters
    let mut odd = src.describe(&id).unwrap().unwrap();
    odd.meta.id = "../../x".into();
    assert!(dst.copy_in(odd, &source, "h2").is_err());
    let mut future = src.describe(&id).unwrap().unwrap();
    future.meta.started = unix_now() + 86_400;
    assert!(dst.copy_in(future, &source, "h2").is_err());
    let mut named = src.describe(&id).unwrap().unwrap();
    named.meta.vm = "web\n1".into();
    assert!(dst.copy_in(named, &source, "h2").is_err());
    assert!(dst.snapshots(None).unwrap().is_empty());
}

#[test]
fn store_copy_of_an_encrypted_backup_stays_sealed() {
    let (_a, src) = new_store();
    let (_b, dst) = new_store();
    let (_, key) = CryptKey::generate();
    let d = disk(3, 3);
    let id = backup(&src, "vm1", &d, Some(&key));
    let source = LocalSource {
        store: Arc::clone(&src),
        asked: Default::default(),
        tamper: None,
    };
    dst.copy_in(src.describe(&id).unwrap().unwrap(), &source, "h2")
        .unwrap();
    // the copy's files are the source's sealed ones: its key reads them
    assert_eq!(restore(&dst, &id, Some(&key)), d);
    let s = dst.snapshot(&id).unwrap().unwrap();
    assert_eq!(s.key_fingerprint.as_deref(), Some(key.fingerprint()));
}
