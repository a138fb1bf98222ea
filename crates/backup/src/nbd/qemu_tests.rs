//! The client against a real `qemu-nbd` exporting a qcow2 image with a persistent
//! dirty bitmap: size, data, holes, `base:allocation`, `qemu:dirty-bitmap:b0`, a
//! bitmap that does not exist, a wrong export name, unix socket and TCP.
//!
//! The image (64 MiB, 64 KiB clusters and bitmap granularity):
//!
//! ```text
//! [0, 1M)            0x11, written before the bitmap was added: allocated, clean
//! [4M, 5M)           0xab, written while the bitmap is enabled: allocated, dirty
//! [20M+64K, 20M+128K) 0xcd, written while enabled: allocated, dirty
//! everything else    never written: hole, reads as zeroes, clean
//! ```
//!
//! Needs `qemu-img`, `qemu-io` and `qemu-nbd` on the PATH; a test fails (it does not
//! skip) when they are missing. Each `qemu-nbd` is killed by its pid when its guard
//! drops, also when an assertion fails.

use super::wire::TF_READ_ONLY;
use super::{connect_tcp, connect_unix, dirty_bitmap_context, NbdError, Op, BASE_ALLOCATION};
use super::{Extent, STATE_DIRTY, STATE_HOLE, STATE_ZERO};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;
const SIZE: u64 = 64 * MIB;
const EXPORT: &str = "disk0";

/// (offset, length, pattern) of each write; the first before the bitmap exists.
const CLEAN: (u64, u64, u8) = (0, MIB, 0x11);
const DIRTY: [(u64, u64, u8); 2] = [(4 * MIB, MIB, 0xab), (20 * MIB + 64 * KIB, 64 * KIB, 0xcd)];

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd} (is QEMU installed?): {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn write(img: &str, (offset, len, pattern): (u64, u64, u8)) {
    let c = format!("write -P {pattern:#x} {offset} {len}");
    run("qemu-io", &["-f", "qcow2", "-c", &c, img]);
}

/// A qcow2 image laid out as the module docs draw it, in its own temporary directory.
fn make_image() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.qcow2");
    let s = img.to_str().unwrap();
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", s, &SIZE.to_string()],
    );
    write(s, CLEAN);
    run(
        "qemu-img",
        &["bitmap", "--add", "--enable", "-f", "qcow2", s, "b0"],
    );
    for w in DIRTY {
        write(s, w);
    }
    (dir, img)
}

/// A running `qemu-nbd`, killed by its pid on drop.
struct QemuNbd {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `qemu-nbd` read-only on the image, exporting bitmap `b0`, listening with
/// `listen` (`--socket=...` or `--bind/--port`), and waits until it accepts.
fn start(
    dir: tempfile::TempDir,
    img: &Path,
    listen: &[String],
    ready: impl Fn() -> bool,
) -> QemuNbd {
    let child = Command::new("qemu-nbd")
        .args([
            "--read-only",
            "--persistent",
            "--shared=4",
            "--format=qcow2",
            "--bitmap=b0",
            &format!("--export-name={EXPORT}"),
        ])
        .args(listen)
        .arg(img)
        .stdin(Stdio::null())
        .spawn()
        .expect("cannot start qemu-nbd (is QEMU installed?)");
    let mut guard = QemuNbd { child, _dir: dir };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ready() {
        if let Ok(Some(status)) = guard.child.try_wait() {
            panic!("qemu-nbd exited early: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "qemu-nbd did not start listening"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    guard
}

fn start_unix() -> (QemuNbd, PathBuf) {
    let (dir, img) = make_image();
    let sock = dir.path().join("nbd.sock");
    let s = sock.clone();
    let guard = start(
        dir,
        &img,
        &[format!("--socket={}", sock.display())],
        move || s.exists(),
    );
    (guard, sock)
}

/// Where `[offset, offset+len)` meets a list of written ranges, flags from `inside`
/// and `outside`: the expected extents of a walk over the whole disk.
fn expected(written: &[(u64, u64)], inside: u32, outside: u32) -> Vec<Extent> {
    let mut out = Vec::new();
    let mut pos = 0;
    for &(o, l) in written {
        if o > pos {
            out.push(Extent {
                offset: pos,
                len: o - pos,
                flags: outside,
            });
        }
        out.push(Extent {
            offset: o,
            len: l,
            flags: inside,
        });
        pos = o + l;
    }
    if pos < SIZE {
        out.push(Extent {
            offset: pos,
            len: SIZE - pos,
            flags: outside,
        });
    }
    out
}

#[tokio::test]
async fn qemu_nbd_reads_data_and_reports_allocation_and_dirty_blocks() {
    let (_nbd, sock) = start_unix();
    let bitmap = dirty_bitmap_context("b0");
    let missing = dirty_bitmap_context("no-such-bitmap");
    let mut c = connect_unix(&sock, EXPORT, &[BASE_ALLOCATION, &bitmap, &missing])
        .await
        .unwrap();

    // the export and what was granted
    assert_eq!(c.size(), SIZE);
    assert_ne!(c.export().flags & TF_READ_ONLY, 0);
    assert_eq!(c.missing_contexts(), std::slice::from_ref(&missing));
    let alloc = c
        .context_id(BASE_ALLOCATION)
        .expect("base:allocation granted");
    let dirty = c.context_id(&bitmap).expect("bitmap context granted");
    assert_ne!(alloc, dirty);
    assert_eq!(c.contexts().len(), 2);
    let bs = c.export().block_size.expect("qemu-nbd sends block sizes");
    assert!(bs.max >= 4 * 1024 * 1024, "{bs:?}");

    // data reads back, holes read as zeroes, a read across data and hole is split
    for (offset, len, pattern) in std::iter::once(CLEAN).chain(DIRTY) {
        let got = c.read(offset, u32::try_from(len).unwrap()).await.unwrap();
        assert!(got.iter().all(|b| *b == pattern), "pattern at {offset}");
    }
    let zeros = c.read(8 * MIB, 4 << 20).await.unwrap();
    assert!(zeros.iter().all(|b| *b == 0));
    let across = c.read(5 * MIB - 512, 1024).await.unwrap();
    assert!(across[..512].iter().all(|b| *b == 0xab));
    assert!(across[512..].iter().all(|b| *b == 0));
    let mut buf = vec![0xffu8; 4096];
    c.read_into(SIZE - 4096, &mut buf).await.unwrap();
    assert!(buf.iter().all(|b| *b == 0));

    // base:allocation: written clusters are data (flags 0), the rest HOLE|ZERO
    let mut written: Vec<(u64, u64)> = std::iter::once(CLEAN)
        .chain(DIRTY)
        .map(|(o, l, _)| (o, l))
        .collect();
    written.sort();
    let got = c.block_status_range(0, SIZE, alloc).await.unwrap();
    assert_eq!(got, expected(&written, 0, STATE_HOLE | STATE_ZERO));

    // the bitmap: exactly the writes made while it was enabled are dirty
    let dirty_ranges: Vec<(u64, u64)> = DIRTY.iter().map(|(o, l, _)| (*o, *l)).collect();
    let got = c.block_status_range(0, SIZE, dirty).await.unwrap();
    assert_eq!(got, expected(&dirty_ranges, STATE_DIRTY, 0));

    // one request answers every context, each starting at the request's offset
    let all = c.block_status_all(4 * MIB, 2 << 20).await.unwrap();
    assert_eq!(all.len(), 2);
    for ctx in &all {
        let first = ctx.extents.first().expect("at least one extent");
        assert_eq!((first.offset, first.len), (4 * MIB, MIB));
        let want = if ctx.context_id == dirty {
            STATE_DIRTY
        } else {
            0
        };
        assert_eq!(first.flags, want, "context {}", ctx.context_id);
    }

    // a query past the end is refused before it is sent; the connection stays usable
    assert!(matches!(
        c.block_status(SIZE - 512, 1024, dirty).await,
        Err(NbdError::InvalidRequest { .. })
    ));
    assert!(!c.is_broken());
    assert_eq!(c.read(4 * MIB, 512).await.unwrap(), vec![0xab; 512]);
    c.disconnect().await.unwrap();
}

#[tokio::test]
async fn qemu_nbd_wrong_export_name_is_refused_with_its_message() {
    let (_nbd, sock) = start_unix();
    let err = connect_unix(&sock, "no-such-export", &[])
        .await
        .unwrap_err();
    match &err {
        NbdError::Refused { op, reply, message } => {
            // QEMU refuses the name already at SET_META_CONTEXT when contexts are
            // asked for; here none are, so NBD_OPT_GO is the first to see it.
            assert_eq!(*op, Op::Go);
            assert_eq!(super::wire::rep_err_name(*reply), "NBD_REP_ERR_UNKNOWN");
            assert!(message.contains("no-such-export"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // the server is still fine for a correct client
    let c = connect_unix(&sock, EXPORT, &[]).await.unwrap();
    assert_eq!(c.size(), SIZE);
    assert!(c.contexts().is_empty());
    c.disconnect().await.unwrap();
}

#[tokio::test]
async fn qemu_nbd_over_tcp_with_parallel_connections() {
    let (dir, img) = make_image();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let _nbd = start(
        dir,
        &img,
        &["--bind=127.0.0.1".into(), format!("--port={port}")],
        move || std::net::TcpStream::connect(addr).is_ok(),
    );
    let bitmap = dirty_bitmap_context("b0");
    let mut a = connect_tcp(addr, EXPORT, &[&bitmap]).await.unwrap();
    let mut b = connect_tcp(addr, EXPORT, &[&bitmap]).await.unwrap();
    let (ra, rb) = tokio::join!(a.read(4 * MIB, 1 << 20), b.read(20 * MIB, 1 << 20));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert!(ra.iter().all(|x| *x == 0xab));
    assert!(rb[..64 << 10].iter().all(|x| *x == 0));
    assert!(rb[64 << 10..128 << 10].iter().all(|x| *x == 0xcd));
    assert!(rb[128 << 10..].iter().all(|x| *x == 0));
    let id = b.context_id(&bitmap).unwrap();
    let ext = b.block_status(20 * MIB, 1 << 20, id).await.unwrap();
    assert_eq!(
        ext,
        vec![
            Extent {
                offset: 20 * MIB,
                len: 64 * KIB,
                flags: 0
            },
            Extent {
                offset: 20 * MIB + 64 * KIB,
                len: 64 * KIB,
                flags: STATE_DIRTY
            },
            Extent {
                offset: 20 * MIB + 128 * KIB,
                len: MIB - 128 * KIB,
                flags: 0
            },
        ]
    );
    a.disconnect().await.unwrap();
    b.disconnect().await.unwrap();
}
