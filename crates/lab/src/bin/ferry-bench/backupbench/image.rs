//! The backup bench's test image (mixed data written as a raw file, converted to
//! qcow2, allocated zeros written into it), what one core does with its chunks, and the
//! `qemu-img` runs it is compared with.

use super::{children_cpu, mbs, CHUNK};
use anyhow::{bail, Context, Result};
use ferry_backup::store::chunk::{self, CHUNK_SIZE};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use serde::Serialize;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

#[derive(Debug, Default, Clone, Copy, Serialize)]
pub(super) struct Mix {
    pub(super) random: u64,
    pub(super) text: u64,
    pub(super) repeated: u64,
    pub(super) zeros: u64,
    pub(super) half_sparse: u64,
}

/// Words for text-like data (zstd -1 makes about a third of it).
const WORDS: &[&str] = &[
    "the",
    "backup",
    "of",
    "a",
    "virtual",
    "machine",
    "disk",
    "is",
    "read",
    "through",
    "QEMU",
    "and",
    "stored",
    "in",
    "chunks",
    "named",
    "by",
    "their",
    "hash",
    "kernel:",
    "INFO",
    "WARN",
    "error",
    "request",
    "GET",
    "/api/v1/vms",
    "200",
    "user",
    "session",
    "opened",
    "closed",
    "for",
    "root",
    "systemd[1]:",
    "Started",
    "Stopped",
    "service",
    "database",
    "query",
    "took",
    "ms",
    "rows",
    "table",
    "index",
    "commit",
    "transaction",
    "<div",
    "class=\"row\">",
    "</div>",
    "function",
    "return",
    "value",
    "null",
    "true",
    "false",
    "{",
    "}",
    "=",
    ";",
    "import",
    "export",
    "from",
];

fn text_pool(rng: &mut StdRng, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 64);
    while v.len() < len {
        v.extend_from_slice(WORDS[rng.random_range(0..WORDS.len())].as_bytes());
        if rng.random_range(0..16) == 0 {
            v.extend_from_slice(format!(" {}", rng.random::<u32>()).as_bytes());
        }
        v.push(if rng.random_range(0..12) == 0 {
            b'\n'
        } else {
            b' '
        });
    }
    v.truncate(len);
    v
}

/// The test image: a qcow2 of `disk` bytes whose first `data` bytes hold, chunk by
/// chunk, random data (35 %), text (30 %), one of 8 repeated chunks (15 %), allocated
/// zeros (10 %) or text in every other 256 KiB with holes between (10 %). Written as a
/// raw file, converted, the zeros then written into the qcow2. Returns the image, its
/// mix and the first chunks' data (for the per-core figures).
pub(super) fn make_image(dir: &Path, disk: u64, data: u64) -> Result<(PathBuf, Mix, Vec<Vec<u8>>)> {
    let raw = dir.join("base.raw");
    let img = dir.join("base.qcow2");
    let mut rng = StdRng::seed_from_u64(20);
    let pool = text_pool(&mut rng, 16 * CHUNK_SIZE);
    let text = |rng: &mut StdRng, tag: &str| {
        let at = rng.random_range(0..pool.len() - CHUNK_SIZE);
        let mut c = pool[at..at + CHUNK_SIZE].to_vec();
        c[..tag.len()].copy_from_slice(tag.as_bytes());
        c
    };
    let templates: Vec<Vec<u8>> = (0..8)
        .map(|t| text(&mut rng, &format!("template {t}\n")))
        .collect();
    let f = std::fs::File::create(&raw)?;
    f.set_len(disk)?;
    let mut mix = Mix::default();
    let mut zeros = Vec::new();
    let mut samples = Vec::new();
    for i in 0..data / CHUNK {
        let off = i * CHUNK;
        let tag = format!("chunk {i} of the ferry backup bench\n");
        let kind = rng.random_range(0..100);
        let c = if kind < 35 {
            mix.random += 1;
            let mut c = vec![0u8; CHUNK_SIZE];
            rng.fill_bytes(&mut c);
            c
        } else if kind < 65 {
            mix.text += 1;
            text(&mut rng, &tag)
        } else if kind < 80 {
            mix.repeated += 1;
            templates[rng.random_range(0..templates.len())].clone()
        } else if kind < 90 {
            mix.zeros += 1;
            zeros.push(off);
            continue;
        } else {
            mix.half_sparse += 1;
            let mut c = text(&mut rng, &tag);
            let q = 256 << 10;
            for (j, part) in c.chunks_mut(q).enumerate() {
                if j % 2 == 1 {
                    part.fill(0);
                }
            }
            for (j, part) in c.chunks(q).enumerate() {
                if j % 2 == 0 {
                    f.write_all_at(part, off + (j * q) as u64)?;
                }
            }
            if samples.len() < 32 {
                samples.push(c);
            }
            continue;
        };
        f.write_all_at(&c, off)?;
        if samples.len() < 32 {
            samples.push(c);
        }
    }
    f.sync_all()?;
    drop(f);
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(&img),
    )?;
    std::fs::remove_file(&raw)?;
    // allocated zeros, as a guest that wrote zeros leaves them (convert made holes)
    for part in zeros.chunks(128) {
        let mut c = Command::new("qemu-io");
        c.args(["-f", "qcow2"]);
        for off in part {
            c.arg("-c").arg(format!("write -q -P 0 {off} {CHUNK}"));
        }
        run_ok(c.arg(&img))?;
    }
    Ok((img, mix, samples))
}

pub(super) fn run_ok(c: &mut Command) -> Result<()> {
    let out = c.output().with_context(|| format!("run {c:?}"))?;
    if !out.status.success() {
        bail!("{c:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

#[derive(Debug, Default, Clone, Serialize)]
pub(super) struct Peer {
    pub(super) what: String,
    pub(super) secs: f64,
    pub(super) cpu_s: f64,
    pub(super) out_bytes: u64,
    pub(super) mbs: f64,
    pub(super) mbs_per_core: f64,
}

/// `qemu-img convert` of the image to `dest` with `args` (durable: `-t writeback`
/// flushes at the end, as the store syncs every chunk). MB/s count `data` bytes.
pub(super) fn convert(
    what: &str,
    img: &Path,
    dest: &Path,
    args: &[&str],
    data: u64,
) -> Result<Peer> {
    let c0 = children_cpu();
    let t = Instant::now();
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-q", "-t", "writeback", "-f", "qcow2"])
            .args(args)
            .arg(img)
            .arg(dest),
    )?;
    let secs = t.elapsed().as_secs_f64();
    let cpu_s = children_cpu() - c0;
    let out_bytes = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(dest)?.blocks() * 512
    };
    Ok(Peer {
        what: what.into(),
        secs,
        cpu_s,
        out_bytes,
        mbs: mbs(data, secs),
        mbs_per_core: mbs(data, cpu_s),
    })
}

#[derive(Debug, Default, Clone, Serialize)]
pub(super) struct Components {
    pub(super) sample_bytes: u64,
    pub(super) blake3_mbs: f64,
    pub(super) zstd_encode_mbs: f64,
    pub(super) decode_check_mbs: f64,
    pub(super) encoded_ratio: f64,
}

/// What one core does with the image's first chunks: name, encode, decode + check.
pub(super) fn components(samples: &[Vec<u8>]) -> Result<Components> {
    let bytes: u64 = samples.iter().map(|s| s.len() as u64).sum();
    let t = Instant::now();
    let names: Vec<chunk::Digest> = samples.iter().map(|s| chunk::digest(s, None)).collect();
    let hash = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let files = samples
        .iter()
        .map(|s| chunk::encode(s, None))
        .collect::<Result<Vec<_>, _>>()?;
    let enc = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for (f, d) in files.iter().zip(&names) {
        chunk::decode(f, d, None)?;
    }
    let dec = t.elapsed().as_secs_f64();
    let stored: u64 = files.iter().map(|f| f.len() as u64).sum();
    Ok(Components {
        sample_bytes: bytes,
        blake3_mbs: mbs(bytes, hash),
        zstd_encode_mbs: mbs(bytes, enc),
        decode_check_mbs: mbs(bytes, dec),
        encoded_ratio: stored as f64 / bytes as f64,
    })
}

/// Whether two files hold the same bytes.
pub(super) fn same_content(a: &Path, b: &Path) -> Result<bool> {
    use std::io::Read;
    let (mut fa, mut fb) = (std::fs::File::open(a)?, std::fs::File::open(b)?);
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; CHUNK_SIZE], vec![0u8; CHUNK_SIZE]);
    loop {
        let n = fa.read(&mut ba)?;
        if n == 0 {
            return Ok(true);
        }
        fb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
    }
}
