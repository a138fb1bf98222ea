//! The lab: test hosts on one machine. A [`Lab`] is a network namespace with a bridge
//! (`br0`, 10.77.0.1/24) and a `ferry serve` inside it, driven through the real CLI
//! (`ip netns exec NS ferry ...`). Everything it made — daemons, QEMUs, taps, the
//! namespace, its directory — is removed on drop, also when a test fails.
//! Only addresses inside the lab's own namespace are ever used.

mod acks;
mod cli;
mod cluster;
mod expose;
mod ping;
mod records;
mod sweep;

pub use acks::AckWatcher;
pub use cli::Cli;
pub use cluster::{
    own_cgroup_dirs, ClusterLab, LabHost, LabOptions, CGROUP_PREFIX, CLIENT_ADDR, LAN_PREFIX,
    SHARED_POOL,
};
pub use expose::expose;
pub use ping::{PingRecorder, PingReport};
pub use records::{verify_records, RecordReport, RECORD_WRITER};

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The lab bridge's address; guests get other addresses in 10.77.0.0/24.
pub const BRIDGE_ADDR: &str = "10.77.0.1";
pub const API_PORT: u16 = 8470;

pub(crate) static SEQ: AtomicU32 = AtomicU32::new(0);

/// The tiny test guest built by `scripts/build-guest.sh`.
pub struct Guest {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// Where `scripts/build-guest.sh` put the test guest.
pub fn guest_dir() -> PathBuf {
    PathBuf::from(
        std::env::var("FERRY_GUEST_DIR").unwrap_or_else(|_| "/var/cache/ferry/guest".into()),
    )
}

/// The file-restore helper VM's image (`scripts/build-file-restore.sh`): the test
/// guest with `ferry-file-restore` added.
pub fn file_restore_image() -> PathBuf {
    guest_dir().join("file-restore")
}

pub fn guest() -> Result<Guest> {
    let dir = guest_dir();
    let g = Guest {
        kernel: dir.join("vmlinux"),
        initrd: dir.join("initrd.img"),
    };
    if !g.kernel.is_file() || !g.initrd.is_file() {
        bail!(
            "test guest missing in {}: run scripts/setup.sh",
            dir.display()
        );
    }
    Ok(g)
}

fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

pub struct Lab {
    pub ns: String,
    pub dir: PathBuf,
    cli: Cli,
    daemon: Option<Child>,
}

impl std::ops::Deref for Lab {
    type Target = Cli;
    fn deref(&self) -> &Cli {
        &self.cli
    }
}

impl Lab {
    /// A new namespace with `br0` up at 10.77.0.1/24. `ferry` is the binary to run.
    pub fn new(ferry: impl Into<PathBuf>) -> Result<Lab> {
        sweep::sweep_stale();
        let ns = format!(
            "fy{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let dir = PathBuf::from("/var/tmp/ferry-lab").join(&ns);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        run(Command::new("ip").args(["netns", "add", &ns]))?;
        let lab = Lab {
            cli: Cli {
                ferry: ferry.into(),
                ns: ns.clone(),
                socket: dir.join("run").join("api.sock"),
            },
            ns,
            dir,
            daemon: None,
        };
        lab.new_boot()?;
        lab.ip(&["link", "set", "lo", "up"])?;
        lab.ip(&["link", "add", "br0", "type", "bridge"])?;
        lab.ip(&["addr", "add", &format!("{BRIDGE_ADDR}/24"), "dev", "br0"])?;
        lab.ip(&["link", "set", "br0", "up"])?;
        Ok(lab)
    }

    /// The lab host's stand-in for the kernel's boot id (`serve --boot-id-file`).
    pub fn boot_id_file(&self) -> PathBuf {
        self.dir.join("boot_id")
    }

    /// A new boot of the lab "machine": the daemon's next start is its first in that
    /// boot (stop the daemon and its VMs first to play a reboot).
    pub fn new_boot(&self) -> Result<()> {
        let id = format!(
            "{:016x}-{:x}",
            rand::random::<u64>(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        );
        std::fs::write(self.boot_id_file(), id)?;
        Ok(())
    }

    /// `ip -n NS ARGS`.
    pub fn ip(&self, args: &[&str]) -> Result<Output> {
        run(Command::new("ip").arg("-n").arg(&self.ns).args(args))
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }
    pub fn run_dir(&self) -> PathBuf {
        self.dir.join("run")
    }

    /// Starts `ferry serve` in the namespace and waits until its API answers.
    pub fn start_daemon(&mut self) -> Result<u32> {
        let pid = self.spawn_daemon()?;
        self.wait_daemon()?;
        Ok(pid)
    }

    /// Starts `ferry serve` in the namespace without waiting for it.
    pub fn spawn_daemon(&mut self) -> Result<u32> {
        self.spawn_daemon_with(false)
    }

    /// Starts `ferry serve` confined and waits until its API answers: in a mount
    /// namespace of its own where the whole file system is read-only except the lab's
    /// folder (and the kernel's own mounts), so API calls that name any path on the
    /// machine (a fuzzer's) cannot change anything outside the lab.
    pub fn start_daemon_confined(&mut self) -> Result<u32> {
        let pid = self.spawn_daemon_with(true)?;
        self.wait_daemon()?;
        Ok(pid)
    }

    fn spawn_daemon_with(&mut self, confined: bool) -> Result<u32> {
        if self.daemon.is_some() {
            bail!("daemon already running");
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("daemon.log"))?;
        let ferry = self.cli.ferry.to_str().context("ferry path")?;
        let mut cmd = if confined {
            let dir = self.dir.display().to_string();
            let mut c = self.cmd("unshare");
            c.args(["--mount", "--propagation", "private", "sh", "-c"])
                .arg(r#"set -e; mount --bind "$1" "$1"; mount -o remount,bind,ro /; shift; exec "$@""#)
                .arg("sh")
                .arg(&dir)
                .arg(ferry);
            c
        } else {
            self.cmd(ferry)
        };
        let child = cmd
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{API_PORT}"),
                // Loopback inside the lab's namespace: the single-host tests speak plain
                // HTTP and websockets; the cluster labs speak HTTPS everywhere.
                "--plain-http",
                "--accel",
                "tcg",
            ])
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--run-dir")
            .arg(self.run_dir())
            .arg("--file-restore-image")
            .arg(file_restore_image())
            .arg("--boot-id-file")
            .arg(self.boot_id_file())
            // nothing from this machine's /etc/ferry/ferry.toml
            .args(["--config", "/dev/null"])
            .env("RUST_LOG", "info,ferry_agent=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn ferry serve")?;
        let pid = child.id();
        self.daemon = Some(child);
        Ok(pid)
    }

    /// Waits until the daemon's API answers the CLI.
    pub fn wait_daemon(&mut self) -> Result<()> {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(30) {
            if self
                .ferry(&["host"])
                .map(|o| o.status.success())
                .unwrap_or(false)
            {
                return Ok(());
            }
            if let Some(c) = self.daemon.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    self.daemon = None;
                    bail!("ferry serve exited ({st}): {}", self.daemon_log());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "ferry serve did not answer within 30 s: {}",
            self.daemon_log()
        )
    }

    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// Stops the daemon: SIGTERM (graceful) or SIGKILL (a crash). VMs keep running.
    pub fn stop_daemon(&mut self, kill: bool) -> Result<()> {
        let Some(mut c) = self.daemon.take() else {
            bail!("no daemon")
        };
        let sig = if kill {
            nix::sys::signal::SIGKILL
        } else {
            nix::sys::signal::SIGTERM
        };
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), sig)?;
        c.wait()?;
        Ok(())
    }

    /// Pids of QEMUs whose pidfiles lie in this lab's run dir and still run them.
    pub fn qemu_pids(&self) -> Vec<i32> {
        qemu_pids_in(&self.run_dir())
    }
}

/// Pids of live QEMUs whose pidfiles lie in `run_dir/*/qemu.pid` (VMs),
/// `run_dir/file-restore/*/qemu.pid` (file-restore helpers) or
/// `run_dir/boot-check/*/qemu.pid` (boot checks of backups).
pub fn qemu_pids_in(run_dir: &Path) -> Vec<i32> {
    let mut out = vec![];
    let dirs = [
        run_dir.to_path_buf(),
        run_dir.join("file-restore"),
        run_dir.join("boot-check"),
    ];
    for e in dirs
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flat_map(|rd| rd.flatten())
    {
        let p = e.path();
        if let Some(pid) = std::fs::read_to_string(p.join("qemu.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            if pid_runs_qemu_of(pid, &p) {
                out.push(pid);
            }
        }
    }
    out
}

/// Whether `pid` is alive (not a zombie) and its command line mentions `dir`.
pub fn pid_runs_qemu_of(pid: i32, dir: &Path) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let zombie = stat
        .rsplit_once(')')
        .and_then(|(_, r)| r.split_whitespace().next())
        == Some("Z");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let needle = dir.as_os_str().as_encoded_bytes();
    !stat.is_empty() && !zombie && cmdline.windows(needle.len()).any(|w| w == needle)
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for pid in self.qemu_pids() {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
        }
        let t = Instant::now();
        while !self.qemu_pids().is_empty() && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `f` on a thread that has entered network namespace `ns` (setns is per thread;
/// sockets made there live in `ns`).
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let path = PathBuf::from("/var/run/netns").join(ns);
    std::thread::scope(|s| {
        s.spawn(|| {
            let fd =
                std::fs::File::open(&path).with_context(|| format!("open {}", path.display()))?;
            nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("netns thread panicked"))?
    })
}

/// Polls `f` every 200 ms until it says yes; fails after `within` with the last error.
pub fn wait_for(
    what: &str,
    within: std::time::Duration,
    mut f: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let t = std::time::Instant::now();
    let mut last = None;
    while t.elapsed() < within {
        match f() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last = Some(e),
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    anyhow::bail!("{what} not within {within:?} (last error: {last:?})")
}

/// CPU seconds (user + system) a process has used so far (0 if it is gone).
pub fn cpu_seconds(pid: i64) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = s.rsplit_once(')').map_or("", |r| r.1);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) / 100.0
}
