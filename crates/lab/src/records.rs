//! The disk record checker. [`RECORD_WRITER`] is a shell function for the test guest
//! that writes sequence-numbered, checksummed 512-byte records with an instance id to
//! a block device (record `n` at sector `n`, `O_DIRECT` + fsync per record);
//! [`verify_records`] reads the disk afterwards and reports gaps, corrupt records and
//! whether two instances interleaved (a guest that ran twice at once).

use anyhow::{bail, Context, Result};
use md5::{Digest, Md5};
use std::path::Path;
use std::process::Command;

/// Defines `ferry_writer INSTANCE DEVICE [FIRST_SEQ]`, which appends records until
/// `/tmp/stop-writer` exists, keeping the last written (acknowledged) number in
/// `/tmp/writer-seq` and in `/www/seq` (served by the guest's httpd, so an observer
/// outside the VM learns which records were acknowledged: [`crate::AckWatcher`]).
pub const RECORD_WRITER: &str = r#"ferry_writer() { i=$1; d=$2; s=${3:-0}; while [ ! -e /tmp/stop-writer ]; do c=$(echo "$i $s" | md5sum | cut -c1-8); printf '%-511s\n' "FREC $i $s $c" | dd of=$d bs=512 seek=$s count=1 oflag=direct conv=notrunc,fsync 2>/dev/null || break; echo $s > /tmp/writer-seq; echo $s > /www/seq; s=$((s+1)); done; }"#;

const SECTOR: usize = 512;

/// What the disk holds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RecordReport {
    /// Valid records.
    pub records: u64,
    /// Highest sequence number found.
    pub last_seq: Option<u64>,
    /// Sequence numbers below the highest without a valid record.
    pub gaps: Vec<u64>,
    /// Sectors that start like a record but fail the checks (wrong place, checksum).
    pub corrupt: Vec<u64>,
    /// Instances in the order they appear by sequence number, each with its run length:
    /// `[(a, 100), (b, 50)]` is a clean handover; `a, b, a` means interleaving.
    pub runs: Vec<(String, u64)>,
}

impl RecordReport {
    /// Two instances wrote alternately (an instance appears in more than one run).
    pub fn interleaved(&self) -> bool {
        let mut seen = std::collections::HashSet::new();
        self.runs.iter().any(|(i, _)| !seen.insert(i.as_str()))
    }

    pub fn is_clean(&self) -> bool {
        self.gaps.is_empty() && self.corrupt.is_empty() && !self.interleaved()
    }
}

impl std::fmt::Display for RecordReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} records (last {:?}), {} gaps, {} corrupt, runs {:?}{}",
            self.records,
            self.last_seq,
            self.gaps.len(),
            self.corrupt.len(),
            self.runs,
            if self.interleaved() {
                " INTERLEAVED"
            } else {
                ""
            }
        )
    }
}

/// Checks a raw image of the record device.
pub fn verify_raw(data: &[u8]) -> RecordReport {
    let mut rep = RecordReport::default();
    let mut found: Vec<(u64, String)> = vec![];
    for (n, sector) in data.chunks(SECTOR).enumerate() {
        let n = n as u64;
        if !sector.starts_with(b"FREC ") {
            continue;
        }
        match parse(sector) {
            Some((inst, seq)) if seq == n => found.push((seq, inst)),
            _ => rep.corrupt.push(n),
        }
    }
    rep.records = found.len() as u64;
    rep.last_seq = found.last().map(|f| f.0);
    let mut next = 0;
    for (seq, inst) in &found {
        rep.gaps.extend(next..*seq);
        next = seq + 1;
        match rep.runs.last_mut() {
            Some((i, c)) if i == inst => *c += 1,
            _ => rep.runs.push((inst.clone(), 1)),
        }
    }
    rep
}

fn parse(sector: &[u8]) -> Option<(String, u64)> {
    let text = std::str::from_utf8(sector).ok()?;
    if sector.len() != SECTOR || !text.ends_with('\n') {
        return None;
    }
    let mut w = text.split_whitespace();
    let (_, inst, seq, sum) = (w.next()?, w.next()?, w.next()?, w.next()?);
    if w.next().is_some() {
        return None;
    }
    let digest = Md5::digest(format!("{inst} {seq}\n").as_bytes());
    let hex: String = digest.iter().take(4).map(|b| format!("{b:02x}")).collect();
    (hex == sum).then(|| Some((inst.to_string(), seq.parse().ok()?)))?
}

/// Reads the volume at `path` (qcow2 or raw, also while a VM has it open) and checks it.
pub fn verify_records(path: &Path) -> Result<RecordReport> {
    let tmp = std::env::temp_dir().join(format!(
        "ferry-records-{}-{}.raw",
        std::process::id(),
        crate::SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let out = Command::new("qemu-img")
        .args(["convert", "-U", "-O", "raw"])
        .arg(path)
        .arg(&tmp)
        .output()
        .context("run qemu-img convert")?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&tmp);
        bail!(
            "qemu-img convert {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let data = std::fs::read(&tmp);
    let _ = std::fs::remove_file(&tmp);
    Ok(verify_raw(&data?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(inst: &str, seq: u64) -> Vec<u8> {
        let d = Md5::digest(format!("{inst} {seq}\n").as_bytes());
        let sum: String = d.iter().take(4).map(|b| format!("{b:02x}")).collect();
        let mut s = format!("{:<511}\n", format!("FREC {inst} {seq} {sum}")).into_bytes();
        s.truncate(SECTOR);
        s
    }

    fn disk(recs: &[(&str, u64)], sectors: usize) -> Vec<u8> {
        let mut d = vec![0u8; sectors * SECTOR];
        for (i, s) in recs {
            let at = usize::try_from(*s).expect("a sector number of a small test disk") * SECTOR;
            d[at..at + SECTOR].copy_from_slice(&rec(i, *s));
        }
        d
    }

    #[test]
    fn clean_handover_is_clean() {
        let r = verify_raw(&disk(&[("a", 0), ("a", 1), ("b", 2), ("b", 3)], 8));
        assert!(r.is_clean(), "{r}");
        assert_eq!(r.runs, vec![("a".into(), 2), ("b".into(), 2)]);
        assert_eq!(r.last_seq, Some(3));
    }

    #[test]
    fn finds_gaps_corruption_and_interleaving() {
        let mut d = disk(&[("a", 0), ("b", 1), ("a", 2), ("a", 4), ("a", 5)], 8);
        d[5 * SECTOR + 20] ^= 1; // checksum no longer matches
        let r = verify_raw(&d);
        assert_eq!(r.gaps, vec![3]);
        assert_eq!(r.corrupt, vec![5]);
        assert!(r.interleaved());
        assert!(!r.is_clean());
        // A record written to the wrong sector is corrupt too.
        let mut d = disk(&[("a", 0)], 4);
        d.copy_within(0..SECTOR, 2 * SECTOR);
        assert_eq!(verify_raw(&d).corrupt, vec![2]);
    }
}
