//! The lab: test hosts on one machine. A [`Lab`] is a network namespace with a bridge
//! (`br0`, 10.77.0.1/24) and a `ferry serve` inside it, driven through the real CLI
//! (`ip netns exec NS ferry ...`). Everything it made — daemons, QEMUs, taps, the
//! namespace, its directory — is removed on drop, also when a test fails.
//! Only addresses inside the lab's own namespace are ever used.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The lab bridge's address; guests get other addresses in 10.77.0.0/24.
pub const BRIDGE_ADDR: &str = "10.77.0.1";
pub const API_PORT: u16 = 8470;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// The tiny test guest built by `scripts/build-guest.sh`.
pub struct Guest {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

pub fn guest() -> Result<Guest> {
    let dir = PathBuf::from(
        std::env::var("FERRY_GUEST_DIR").unwrap_or_else(|_| "/var/cache/ferry/guest".into()),
    );
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
    ferry: PathBuf,
    daemon: Option<Child>,
}

impl Lab {
    /// A new namespace with `br0` up at 10.77.0.1/24. `ferry` is the binary to run.
    pub fn new(ferry: impl Into<PathBuf>) -> Result<Lab> {
        sweep_stale();
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
            ns,
            dir,
            ferry: ferry.into(),
            daemon: None,
        };
        lab.ip(&["link", "set", "lo", "up"])?;
        lab.ip(&["link", "add", "br0", "type", "bridge"])?;
        lab.ip(&["addr", "add", &format!("{BRIDGE_ADDR}/24"), "dev", "br0"])?;
        lab.ip(&["link", "set", "br0", "up"])?;
        Ok(lab)
    }

    /// `ip -n NS ARGS`.
    pub fn ip(&self, args: &[&str]) -> Result<Output> {
        run(Command::new("ip").arg("-n").arg(&self.ns).args(args))
    }

    /// A command run inside the namespace.
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns, program]);
        c
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
        if self.daemon.is_some() {
            bail!("daemon already running");
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("daemon.log"))?;
        let child = self
            .cmd(self.ferry.to_str().context("ferry path")?)
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{API_PORT}"),
                "--accel",
                "tcg",
            ])
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--run-dir")
            .arg(self.run_dir())
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

    /// Runs the CLI in the namespace against the lab daemon.
    pub fn ferry(&self, args: &[&str]) -> Result<Output> {
        self.cmd(self.ferry.to_str().context("ferry path")?)
            .args(["--server", &format!("http://127.0.0.1:{API_PORT}")])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("run ferry CLI")
    }

    /// Runs the CLI and fails with its stderr unless it succeeded.
    pub fn ferry_ok(&self, args: &[&str]) -> Result<String> {
        let o = self.ferry(args)?;
        if !o.status.success() {
            bail!(
                "ferry {args:?} failed: {}{}",
                String::from_utf8_lossy(&o.stderr),
                String::from_utf8_lossy(&o.stdout)
            );
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// `ferry --json ARGS` parsed.
    pub fn ferry_json(&self, args: &[&str]) -> Result<Value> {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = self.ferry_ok(&a)?;
        serde_json::from_str(&out).with_context(|| format!("JSON from ferry {args:?}: {out}"))
    }

    /// Defines a VM booting the test guest (1 vCPU, 256 MiB) with `ip` on its first NIC,
    /// plus `extra` CLI options; returns `ferry vm show`.
    pub fn create_test_vm(&self, name: &str, ip: &str, extra: &[&str]) -> Result<Value> {
        let g = guest()?;
        let append = format!("console=ttyS0 quiet ip={ip}/24 ferry.hostname={name}");
        let (k, i) = (
            g.kernel.display().to_string(),
            g.initrd.display().to_string(),
        );
        let mut args = vec![
            "vm", "create", name, "--cpus", "1", "--kernel", &k, "--initrd", &i,
        ];
        if !extra.contains(&"--memory") {
            args.extend_from_slice(&["--memory", "256M"]);
        }
        args.extend_from_slice(&["--append", &append]);
        args.extend_from_slice(extra);
        self.ferry_ok(&args)?;
        self.ferry_json(&["vm", "show", name])
    }

    /// (state, pid) of a VM.
    pub fn vm_state(&self, name: &str) -> Result<(String, Option<i64>)> {
        let v = self.ferry_json(&["vm", "show", name])?;
        Ok((
            v["state"].as_str().unwrap_or("").to_string(),
            v["pid"].as_i64(),
        ))
    }

    /// Runs a shell line in the guest over its console and returns what it printed
    /// (between two markers, so the echoed input and prompts are left out). Waits up to
    /// two minutes for the line to finish.
    pub fn guest_sh(&self, vm: &str, line: &str) -> Result<String> {
        let tag = format!(
            "{}x{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        self.console_type(
            vm,
            &format!("echo BEGIN-{tag}; {line}; echo; echo END-{tag}\n"),
        )?;
        // Output lines start a line; the echoed input has "echo BEGIN-tag;".
        let (begin, end) = (format!("\nBEGIN-{tag}"), format!("\nEND-{tag}"));
        let t = Instant::now();
        loop {
            let hist = self.ferry_ok(&["vm", "console", vm, "--history"])?;
            if let (Some(a), Some(b)) = (hist.rfind(&begin), hist.rfind(&end)) {
                if a < b {
                    let body = &hist[a + begin.len()..b];
                    return Ok(body.replace('\r', "").trim().to_string());
                }
            }
            if t.elapsed() > Duration::from_secs(120) {
                bail!("no answer from {vm} to {line:?}; console:\n{hist}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Types `input` into a VM's console through `ferry vm console` and returns what it printed.
    pub fn console_type(&self, vm: &str, input: &str) -> Result<String> {
        use std::io::Write;
        let mut child = self
            .cmd(self.ferry.to_str().context("ferry path")?)
            .args([
                "--server",
                &format!("http://127.0.0.1:{API_PORT}"),
                "vm",
                "console",
                vm,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(input.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "ferry vm console failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Waits until the console history of `vm` contains `needle`.
    pub fn wait_console(&self, vm: &str, needle: &str, within: Duration) -> Result<String> {
        let t = Instant::now();
        let mut last = String::new();
        while t.elapsed() < within {
            if let Ok(o) = self.ferry(&["vm", "console", vm, "--history"]) {
                last = String::from_utf8_lossy(&o.stdout).into_owned();
                if last.contains(needle) {
                    return Ok(last);
                }
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        bail!("{needle:?} not on the console of {vm} within {within:?}; console so far:\n{last}")
    }

    /// Pings `addr` from the namespace; true if any reply came.
    pub fn ping(&self, addr: &str, count: u32) -> bool {
        self.cmd("ping")
            .args(["-c", &count.to_string(), "-W", "2", "-i", "0.3", addr])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    /// Pids of QEMUs whose pidfiles lie in this lab's run dir and still run them.
    pub fn qemu_pids(&self) -> Vec<i32> {
        let mut out = vec![];
        let Ok(rd) = std::fs::read_dir(self.run_dir()) else {
            return out;
        };
        for e in rd.flatten() {
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

/// Removes what labs of test processes that no longer exist left behind (a test killed
/// before its drop ran): their namespaces, the processes in them, their directories.
fn sweep_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some((pid, _)) = name.strip_prefix("fy").and_then(|r| r.split_once('-')) else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        // Every process still inside that namespace was started by that lab.
        if let Ok(o) = Command::new("ip").args(["netns", "pids", name]).output() {
            for p in String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p),
                    nix::sys::signal::SIGKILL,
                );
            }
        }
        let dir = PathBuf::from("/var/tmp/ferry-lab").join(name);
        if let Ok(rd) = std::fs::read_dir(dir.join("run")) {
            for e in rd.flatten() {
                let run = e.path();
                if let Some(p) = std::fs::read_to_string(run.join("qemu.pid"))
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                {
                    if pid_runs_qemu_of(p, &run) {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(p),
                            nix::sys::signal::SIGKILL,
                        );
                    }
                }
            }
        }
        let _ = Command::new("ip").args(["netns", "del", name]).status();
        let _ = std::fs::remove_dir_all(dir);
    }
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
