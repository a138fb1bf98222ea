//! What a backup reads (pure): per disk, whether its changes since an earlier backup
//! can be trusted ([`track`]), and per 4 MiB chunk whether to read it, store zeros or
//! reuse the earlier backup's chunk ([`chunks`]).
//!
//! A disk's changes are tracked by one persistent QEMU dirty bitmap named after the
//! backup it counts from (`ferry-bk-{id}`). An incremental is taken only when exactly
//! that bitmap exists, is recording, was saved cleanly, and its backup is complete in
//! this store with the disk at the same size. Anything else reads the whole disk and
//! says why — never a silently wrong incremental.

/// The prefix of ferry's tracking bitmaps.
pub const BITMAP_PREFIX: &str = "ferry-bk-";

pub fn bitmap_name(snapshot: &str) -> String {
    format!("{BITMAP_PREFIX}{snapshot}")
}

/// A ferry bitmap on a disk's node, as QEMU reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapState {
    pub name: String,
    pub recording: bool,
    pub inconsistent: bool,
}

/// An earlier backup as the store knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Base {
    pub complete: bool,
    /// The size of this disk in it (`None`: the backup has no such disk).
    pub disk_size: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tracking {
    /// Read only what the bitmap marks; reuse the rest from `base`.
    Incremental { base: String, bitmap: String },
    /// Read everything allocated.
    Full { reason: String },
}

/// The decision for one disk, and the ferry bitmaps to remove once the new one exists
/// (in an incremental, the base bitmap goes only after success).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackDecision {
    pub tracking: Tracking,
    pub stale: Vec<String>,
}

pub fn track(
    disk: &str,
    size: u64,
    persistent: bool,
    bitmaps: &[BitmapState],
    base: &dyn Fn(&str) -> Option<Base>,
) -> TrackDecision {
    let ours: Vec<&BitmapState> = bitmaps
        .iter()
        .filter(|b| b.name.starts_with(BITMAP_PREFIX))
        .collect();
    let all_stale = || ours.iter().map(|b| b.name.clone()).collect::<Vec<_>>();
    let full = |reason: String| TrackDecision {
        tracking: Tracking::Full { reason },
        stale: all_stale(),
    };
    if !persistent {
        return full(format!(
            "{disk} is a raw image: QEMU keeps no persistent change tracking for it"
        ));
    }
    let b = match ours.as_slice() {
        [] => {
            return full(format!(
                "{disk} has no change tracking: its first backup, or tracking was reset \
                 (a snapshot revert, a replaced disk, QEMU stopped uncleanly)"
            ))
        }
        [b] => *b,
        _ => {
            return full(format!(
                "{disk} has {} tracking bitmaps: an interrupted backup left one",
                ours.len()
            ))
        }
    };
    if b.inconsistent {
        return full(format!(
            "{disk}'s tracking bitmap was not saved cleanly (QEMU stopped uncleanly)"
        ));
    }
    if !b.recording {
        return full(format!(
            "{disk}'s tracking bitmap is disabled: an interrupted backup left it"
        ));
    }
    let id = &b.name[BITMAP_PREFIX.len()..];
    match base(id) {
        None => full(format!(
            "{disk} tracks changes since backup {id}, which is not in this store (pruned, taken to another store, or never finished)"
        )),
        Some(Base { complete: false, .. }) => full(format!("backup {id} never completed")),
        Some(Base {
            disk_size: None, ..
        }) => full(format!("backup {id} has no disk {disk}")),
        Some(Base {
            disk_size: Some(s),
            ..
        }) if s != size => full(format!(
            "{disk} was resized since backup {id} ({s} → {size} bytes)"
        )),
        Some(_) => TrackDecision {
            tracking: Tracking::Incremental {
                base: id.to_string(),
                bitmap: b.name.clone(),
            },
            stale: Vec::new(),
        },
    }
}

/// What to do with one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkAction {
    Read,
    /// Nothing allocated in it: zeros, without reading.
    Zero,
    /// Unchanged since the base backup: its chunk is reused.
    Reuse,
}

/// A run of bytes with the same status: `(offset, len, flag set)`.
pub type Run = (u64, u64, bool);

fn touched(runs: &[Run], start: u64, end: u64) -> bool {
    runs.iter()
        .any(|&(o, l, set)| set && o < end && o + l > start)
}

/// Decides each chunk of a disk of `size` bytes. `unallocated` marks ranges that read
/// as zeros (holes); `dirty` (in an incremental) the ranges changed since the base. A
/// range not described counts as allocated and dirty (never skipped on a guess).
pub fn chunks(
    size: u64,
    chunk: u64,
    unallocated: &[Run],
    dirty: Option<&[Run]>,
) -> Vec<ChunkAction> {
    let n = size.div_ceil(chunk);
    (0..n)
        .map(|i| {
            let start = i * chunk;
            let end = (start + chunk).min(size);
            let all_hole = covered(unallocated, start, end);
            match dirty {
                Some(d) if !touched(d, start, end) && covered_any(d, start, end) => {
                    ChunkAction::Reuse
                }
                _ if all_hole => ChunkAction::Zero,
                _ => ChunkAction::Read,
            }
        })
        .collect()
}

/// Whether runs with the flag set cover all of `[start, end)`.
fn covered(runs: &[Run], start: u64, end: u64) -> bool {
    let mut pos = start;
    let mut sorted: Vec<&Run> = runs.iter().filter(|r| r.2).collect();
    sorted.sort_by_key(|r| r.0);
    for &&(o, l, _) in &sorted {
        if o > pos {
            break;
        }
        pos = pos.max(o + l);
        if pos >= end {
            return true;
        }
    }
    pos >= end
}

/// Whether the runs (set or not) describe all of `[start, end)`.
fn covered_any(runs: &[Run], start: u64, end: u64) -> bool {
    let all: Vec<Run> = runs.iter().map(|&(o, l, _)| (o, l, true)).collect();
    covered(&all, start, end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MB: u64 = 1 << 20;

    fn bm(name: &str) -> BitmapState {
        BitmapState {
            name: name.into(),
            recording: true,
            inconsistent: false,
        }
    }

    fn base_ok(size: u64) -> impl Fn(&str) -> Option<Base> {
        move |id| {
            (id == "b1").then_some(Base {
                complete: true,
                disk_size: Some(size),
            })
        }
    }

    #[test]
    fn track_one_good_bitmap_is_incremental() {
        let d = track(
            "disk0",
            64 * MB,
            true,
            &[bm("ferry-bk-b1"), bm("other")],
            &base_ok(64 * MB),
        );
        assert_eq!(
            d.tracking,
            Tracking::Incremental {
                base: "b1".into(),
                bitmap: "ferry-bk-b1".into()
            }
        );
        assert!(d.stale.is_empty());
    }

    #[test]
    fn track_says_why_it_reads_everything() {
        let size = 64 * MB;
        let reason = |d: TrackDecision| match d.tracking {
            Tracking::Full { reason } => reason,
            t => panic!("{t:?}"),
        };
        assert!(
            reason(track("disk0", size, true, &[], &base_ok(size))).contains("no change tracking")
        );
        assert!(reason(track(
            "disk0",
            size,
            false,
            &[bm("ferry-bk-b1")],
            &base_ok(size)
        ))
        .contains("raw"));
        assert!(reason(track(
            "disk0",
            size,
            true,
            &[bm("ferry-bk-b1"), bm("ferry-bk-b2")],
            &base_ok(size)
        ))
        .contains("interrupted"));
        let mut bad = bm("ferry-bk-b1");
        bad.inconsistent = true;
        assert!(reason(track("disk0", size, true, &[bad], &base_ok(size))).contains("uncleanly"));
        let mut off = bm("ferry-bk-b1");
        off.recording = false;
        assert!(reason(track("disk0", size, true, &[off], &base_ok(size))).contains("disabled"));
        assert!(reason(track(
            "disk0",
            size,
            true,
            &[bm("ferry-bk-b9")],
            &base_ok(size)
        ))
        .contains("not in this store"));
        assert!(reason(track(
            "disk0",
            2 * size,
            true,
            &[bm("ferry-bk-b1")],
            &base_ok(size)
        ))
        .contains("resized"));
    }

    #[test]
    fn chunks_full_skips_holes_and_reads_the_rest() {
        let a = chunks(10 * MB, 4 * MB, &[(4 * MB, 6 * MB, true)], None);
        assert_eq!(
            a,
            vec![ChunkAction::Read, ChunkAction::Zero, ChunkAction::Zero]
        );
    }

    #[test]
    fn chunks_incremental_reads_only_dirty_chunks() {
        let dirty = [
            (0, 5 * MB, false),
            (5 * MB, 1, true),
            (5 * MB + 1, 7 * MB, false),
        ];
        let a = chunks(12 * MB, 4 * MB, &[], Some(&dirty));
        assert_eq!(
            a,
            vec![ChunkAction::Reuse, ChunkAction::Read, ChunkAction::Reuse]
        );
    }

    proptest! {
        #[test]
        fn chunks_never_reuse_a_dirty_or_undescribed_chunk(
            size in 1u64..(40 * MB),
            cuts in proptest::collection::vec((0u64..(40 * MB), any::<bool>()), 0..12),
        ) {
            // build runs covering [0, covered_to) from the cut points
            let mut points: Vec<(u64, bool)> = cuts.into_iter().filter(|c| c.0 < size).collect();
            points.sort();
            let mut runs = Vec::new();
            let mut pos = 0;
            let mut flag = false;
            for (p, f) in points {
                if p > pos {
                    runs.push((pos, p - pos, flag));
                    pos = p;
                }
                flag = f;
            }
            // the runs may stop short of the end: the rest is undescribed
            let described = pos;
            let a = chunks(size, 4 * MB, &[], Some(&runs));
            prop_assert_eq!(a.len() as u64, size.div_ceil(4 * MB));
            for (i, act) in a.iter().enumerate() {
                let s = i as u64 * 4 * MB;
                let e = (s + 4 * MB).min(size);
                if *act == ChunkAction::Reuse {
                    prop_assert!(e <= described);
                    prop_assert!(!runs.iter().any(|&(o, l, d)| d && o < e && o + l > s));
                }
            }
        }
    }
}
