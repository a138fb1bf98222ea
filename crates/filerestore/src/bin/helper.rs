//! `ferry-file-restore`: the program of the file-restore helper VM. The test guest's
//! `/init` loads the kernel modules and, with `ferry.restore=1` on the kernel command
//! line, execs this as PID 1. It mounts every volume of the disks whose serial is
//! `disk{i}` read-only under `/mnt/disk{i}/{volume}` and answers the daemon's requests
//! on the virtio-serial port [`PORT_NAME`] (see `ferry_filerestore::proto`). It never
//! exits (PID 1); the daemon ends the VM.

use ferry_filerestore::proto::{self, Kind, Request, PORT_NAME};
use ferry_filerestore::serve::{self, Disk, Volume};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn main() {
    let disks = discover();
    for d in &disks {
        for v in &d.volumes {
            match &v.mount {
                Ok(m) => println!(
                    "ferry-file-restore: {}/{} ({}) at {}",
                    d.name,
                    v.name,
                    v.fs.as_deref().unwrap_or("?"),
                    m.display()
                ),
                Err(e) => println!("ferry-file-restore: {}/{}: {e}", d.name, v.name),
            }
        }
    }
    println!("FERRY-FILE-RESTORE-READY {}", disks.len());
    loop {
        if let Err(e) = serve_port(&disks) {
            println!("ferry-file-restore: {e}");
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn read_trim(p: &Path) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
}

/// Sectors of 512 bytes in `/sys/block/.../size`.
fn sectors(p: &Path) -> u64 {
    read_trim(&p.join("size"))
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(0)
        .saturating_mul(512)
}

/// The disks the daemon attached (virtio-blk with serial `disk{i}`), their volumes
/// mounted.
fn discover() -> Vec<Disk> {
    let mut disks = Vec::new();
    let Ok(rd) = std::fs::read_dir("/sys/block") else {
        return disks;
    };
    for e in rd.flatten() {
        let dev = e.file_name().to_string_lossy().into_owned();
        let sys = e.path();
        let Some(serial) = read_trim(&sys.join("serial")) else {
            continue;
        };
        let valid = serial
            .strip_prefix("disk")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if !valid {
            continue;
        }
        let mut parts: Vec<(u32, String, u64)> = std::fs::read_dir(&sys)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|p| {
                let name = p.file_name().to_string_lossy().into_owned();
                let n = read_trim(&p.path().join("partition"))?.parse().ok()?;
                Some((n, name, sectors(&p.path())))
            })
            .collect();
        parts.sort();
        let targets: Vec<(String, String, u64)> = if parts.is_empty() {
            vec![("fs".into(), dev.clone(), sectors(&sys))]
        } else {
            parts
                .into_iter()
                .map(|(n, name, size)| (format!("p{n}"), name, size))
                .collect()
        };
        let volumes = targets
            .into_iter()
            .map(|(name, node, size)| {
                let at = PathBuf::from("/mnt").join(&serial).join(&name);
                let mounted = mount(&PathBuf::from("/dev").join(&node), &at);
                Volume {
                    name,
                    size,
                    fs: mounted.as_ref().ok().cloned(),
                    mount: mounted.map(|_| at),
                }
            })
            .collect();
        disks.push(Disk {
            name: serial,
            size: sectors(&sys),
            volumes,
        });
    }
    disks.sort_by_key(|d| d.name[4..].parse::<u64>().unwrap_or(u64::MAX));
    disks
}

/// Mounts `dev` read-only at `at`; its filesystem type, or why not. A filesystem whose
/// journal wants replaying is mounted without replay (the disk is read-only).
fn mount(dev: &Path, at: &Path) -> Result<String, String> {
    std::fs::create_dir_all(at).map_err(|e| format!("mkdir {}: {e}", at.display()))?;
    let tries: [&[&str]; 4] = [
        &["-o", "ro"],
        &["-t", "ext4", "-o", "ro,noload"],
        &["-t", "xfs", "-o", "ro,norecovery"],
        &["-t", "btrfs", "-o", "ro,rescue=nologreplay"],
    ];
    for t in tries {
        let ok = Command::new("mount")
            .args(t)
            .arg(dev)
            .arg(at)
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
            let at_s = at.to_string_lossy();
            let fs = mounts
                .lines()
                .rev()
                .find_map(|l| {
                    let f: Vec<&str> = l.split(' ').collect();
                    (f.get(1) == Some(&at_s.as_ref()))
                        .then(|| f.get(2).map(|s| s.to_string()))
                        .flatten()
                })
                .unwrap_or_else(|| "?".into());
            return Ok(fs);
        }
    }
    Err("no filesystem the helper can read (swap, LVM, encrypted or damaged?)".into())
}

/// The device of the port named [`PORT_NAME`].
fn find_port() -> Option<PathBuf> {
    for e in std::fs::read_dir("/sys/class/virtio-ports").ok()?.flatten() {
        if read_trim(&e.path().join("name")).as_deref() == Some(PORT_NAME) {
            return Some(PathBuf::from("/dev").join(e.file_name()));
        }
    }
    None
}

/// Waits until `fd` is ready for `events` (or a second passed); the events seen.
fn wait(fd: i32, events: libc::c_short) -> libc::c_short {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd on the stack, its count 1.
    let n = unsafe { libc::poll(&mut p, 1, 1000) };
    if n > 0 {
        p.revents
    } else {
        0
    }
}

/// The port, opened non-blocking: writes wait in `poll` and end when the daemon went
/// away (POLLHUP), so an answer nobody reads is dropped.
struct Port(std::fs::File);

impl Write for Port {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            match self.0.write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let ev = wait(self.0.as_raw_fd(), libc::POLLOUT);
                    if ev & libc::POLLHUP != 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::BrokenPipe,
                            "the daemon went away",
                        ));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Port {
    /// Fills `buf`; `Ok(false)` when the daemon went away first (what was read of a
    /// request is dropped).
    fn fill(&mut self, buf: &mut [u8], started: bool) -> io::Result<bool> {
        let mut at = 0;
        while at < buf.len() {
            match self.0.read(&mut buf[at..]) {
                Ok(0) => {
                    if started || at > 0 {
                        return Ok(false);
                    }
                    // no daemon connected: wait for one
                    std::thread::sleep(Duration::from_millis(200));
                }
                Ok(n) => at += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    wait(self.0.as_raw_fd(), libc::POLLIN);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
}

fn serve_port(disks: &[Disk]) -> io::Result<()> {
    let mut tries = 0;
    let dev = loop {
        if let Some(d) = find_port() {
            break d;
        }
        tries += 1;
        if tries > 300 {
            return Err(io::Error::other(format!("no virtio port {PORT_NAME}")));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&dev)?;
    let mut port = Port(f);
    loop {
        let mut h = [0u8; proto::HEADER];
        if !port.fill(&mut h, false)? {
            continue;
        }
        let (kind, len) = match proto::decode_header(h) {
            Ok(x) => x,
            Err(e) => {
                // out of step: what follows is dropped until the daemon reconnects
                println!("ferry-file-restore: {e}");
                std::thread::sleep(Duration::from_millis(500));
                drain(&mut port);
                continue;
            }
        };
        let mut body = vec![0u8; len as usize];
        if !port.fill(&mut body, true)? {
            continue;
        }
        if kind != Kind::Message {
            continue;
        }
        let req: Request = match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => {
                println!("ferry-file-restore: a request that is not one: {e}");
                continue;
            }
        };
        if let Err(e) = serve::answer(disks, &req, &mut port) {
            println!("ferry-file-restore: answer {}: {e}", req.id);
        }
    }
}

/// Drops whatever is queued on the port.
fn drain(port: &mut Port) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = port.0.read(&mut buf) {
        if n == 0 {
            break;
        }
    }
}
