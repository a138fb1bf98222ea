//! A persistent bitmap of regions: the dirty bitmap of a peer (what it lacks) and the
//! activity log (extents with writes that may not be on every replica yet). Changes are
//! made in memory; [`Bitmap::save`] writes them. The activity log is saved durably
//! before a write enters a new extent, so a crash never forgets a region being written;
//! peers' bitmaps are saved before the activity log retires the extents covering their
//! bits (until then the activity log stands in for them). A bit set by mistake only
//! costs a resync of that region.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub struct Bitmap {
    words: Vec<u64>,
    bits: usize,
    /// Bytes per bit.
    gran: u64,
    file: Option<(PathBuf, File)>,
    unsaved: bool,
}

impl Bitmap {
    /// An in-memory bitmap covering `size` bytes.
    pub fn new(size: u64, gran: u64) -> Bitmap {
        // 64-bit hosts only (QEMU/KVM hosts): a u64 count fits a usize.
        let bits = usize::try_from(size.div_ceil(gran)).unwrap_or(usize::MAX);
        Bitmap {
            words: vec![0; bits.div_ceil(64)],
            bits,
            gran,
            file: None,
            unsaved: false,
        }
    }

    /// Opens (or creates, all clear) the bitmap file at `path`.
    pub fn open(path: &Path, size: u64, gran: u64) -> std::io::Result<Bitmap> {
        let mut b = Bitmap::new(size, gran);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let mut buf = vec![0u8; b.words.len() * 8];
        let n = file.read_at(&mut buf, 0)?;
        for (i, c) in buf[..n - n % 8].chunks_exact(8).enumerate() {
            b.words[i] = u64::from_le_bytes(c.try_into().expect("8 bytes"));
        }
        b.mask_tail();
        b.file = Some((path.to_path_buf(), file));
        Ok(b)
    }

    fn mask_tail(&mut self) {
        let extra = self.words.len() * 64 - self.bits;
        if extra > 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= u64::MAX >> extra;
            }
        }
    }

    pub fn gran(&self) -> u64 {
        self.gran
    }

    pub fn bits(&self) -> usize {
        self.bits
    }

    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Bits covering `[offset, offset + len)`.
    pub fn range(&self, offset: u64, len: u64) -> std::ops::Range<usize> {
        if len == 0 || self.bits == 0 {
            return 0..0;
        }
        let bit = |b: u64| usize::try_from(b).unwrap_or(usize::MAX);
        let first = bit(offset / self.gran);
        let last = bit((offset + len - 1) / self.gran);
        first.min(self.bits)..(last + 1).min(self.bits)
    }

    pub fn get(&self, i: usize) -> bool {
        i < self.bits && self.words[i / 64] & (1 << (i % 64)) != 0
    }

    /// Sets bits `r` in memory; returns whether any was newly set.
    pub fn set(&mut self, r: std::ops::Range<usize>) -> bool {
        let mut changed = false;
        for i in r {
            let w = &mut self.words[i / 64];
            if *w & (1 << (i % 64)) == 0 {
                *w |= 1 << (i % 64);
                changed = true;
            }
        }
        self.unsaved |= changed;
        changed
    }

    /// Sets the bits covering a byte range.
    pub fn set_bytes(&mut self, offset: u64, len: u64) -> bool {
        let r = self.range(offset, len);
        self.set(r)
    }

    /// Clears bit `i` in memory; [`Bitmap::save`] writes it.
    pub fn clear(&mut self, i: usize) {
        if i < self.bits && self.get(i) {
            self.words[i / 64] &= !(1 << (i % 64));
            self.unsaved = true;
        }
    }

    pub fn clear_all(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
        self.unsaved = true;
    }

    pub fn set_all(&mut self) {
        let n = self.bits;
        self.set(0..n);
    }

    /// ORs in another bitmap's words (same geometry, or a coarser one: each set bit of
    /// `other` at granularity `other_gran` sets every bit it covers here).
    pub fn or_words(&mut self, other: &[u64], other_gran: u64) {
        let mut set = vec![];
        for (wi, w) in other.iter().enumerate() {
            if *w == 0 {
                continue;
            }
            for b in 0..64 {
                if w & (1 << b) != 0 {
                    let i = (wi * 64 + b) as u64;
                    set.push(self.range(i * other_gran, other_gran));
                }
            }
        }
        let mut changed = false;
        for r in set {
            for i in r {
                let w = &mut self.words[i / 64];
                if *w & (1 << (i % 64)) == 0 {
                    *w |= 1 << (i % 64);
                    changed = true;
                }
            }
        }
        self.unsaved |= changed;
    }

    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    pub fn is_clear(&self) -> bool {
        self.words.iter().all(|w| *w == 0)
    }

    /// The set bits, in order.
    pub fn ones(&self) -> Vec<usize> {
        let mut v = vec![];
        for (wi, w) in self.words.iter().enumerate() {
            let mut w = *w;
            while w != 0 {
                let b = w.trailing_zeros() as usize;
                v.push(wi * 64 + b);
                w &= w - 1;
            }
        }
        v
    }

    /// Writes the bitmap to its file (if it has one and anything changed);
    /// `durable` adds an `fdatasync`.
    pub fn save(&mut self, durable: bool) -> std::io::Result<()> {
        if !self.unsaved {
            return Ok(());
        }
        if let Some((_, f)) = &self.file {
            let mut buf = Vec::with_capacity(self.words.len() * 8);
            for w in &self.words {
                buf.extend_from_slice(&w.to_le_bytes());
            }
            f.write_all_at(&buf, 0)?;
            if durable {
                f.sync_data()?;
            }
        }
        self.unsaved = false;
        Ok(())
    }

    /// Removes the bitmap's file.
    pub fn remove(self) {
        if let Some((p, _)) = self.file {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_persist_and_coarse_words_spread() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bm");
        let mut b = Bitmap::open(&p, 10 << 20, 1 << 20).unwrap();
        assert_eq!(b.bits(), 10);
        assert!(b.set_bytes(3 << 20, 1));
        assert!(!b.set_bytes(3 << 20, 5));
        assert!(b.set_bytes((9 << 20) + 10, 1 << 30));
        drop(b);
        // unsaved changes are not on disk
        assert_eq!(
            Bitmap::open(&p, 10 << 20, 1 << 20).unwrap().ones(),
            Vec::<usize>::new()
        );
        let mut b = Bitmap::open(&p, 10 << 20, 1 << 20).unwrap();
        b.set_bytes(3 << 20, 1);
        b.set_bytes((9 << 20) + 10, 1 << 30);
        b.save(true).unwrap();
        drop(b);
        let mut b = Bitmap::open(&p, 10 << 20, 1 << 20).unwrap();
        assert_eq!(b.ones(), vec![3, 9]);
        b.clear(3);
        b.save(false).unwrap();
        assert_eq!(Bitmap::open(&p, 10 << 20, 1 << 20).unwrap().ones(), vec![9]);
        // a 4 MiB extent bit sets four 1 MiB bits
        let mut fine = Bitmap::new(10 << 20, 1 << 20);
        fine.or_words(&[0b10], 4 << 20);
        assert_eq!(fine.ones(), vec![4, 5, 6, 7]);
        fine.or_words(&[0b100], 4 << 20);
        assert_eq!(fine.ones(), vec![4, 5, 6, 7, 8, 9]);
        assert_eq!(fine.range(0, 0), 0..0);
    }
}
