//! The CLI as tests use it: `ip netns exec NS ferry --socket RUN_DIR/api.sock ...`, plus helpers that
//! drive a guest through its serial console.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::{guest, SEQ};

/// The `ferry` CLI run inside a namespace against one daemon.
#[derive(Debug, Clone)]
pub struct Cli {
    pub ferry: PathBuf,
    pub ns: String,
    /// The daemon's local socket (`{run_dir}/api.sock`).
    pub socket: PathBuf,
}

impl Cli {
    /// The daemon's admin token (from the state dir beside the run dir).
    pub fn token(&self) -> Result<String> {
        let state = self
            .socket
            .parent()
            .and_then(|run| run.parent())
            .context("socket path")?
            .join("state/admin-token");
        Ok(std::fs::read_to_string(&state)
            .with_context(|| format!("read {}", state.display()))?
            .trim()
            .to_string())
    }

    /// A command run inside the namespace.
    /// The daemon's `/metrics` (Prometheus text), over its local socket.
    pub fn metrics(&self) -> Result<String> {
        let out = self
            .cmd("curl")
            .args(["-s", "http://localhost/metrics", "--unix-socket"])
            .arg(&self.socket)
            .output()
            .context("curl /metrics")?;
        String::from_utf8(out.stdout).context("/metrics is not UTF-8")
    }

    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns, program]);
        c
    }

    /// Runs the CLI in the namespace against the daemon.
    pub fn ferry(&self, args: &[&str]) -> Result<Output> {
        self.cmd(self.ferry.to_str().context("ferry path")?)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("run ferry CLI")
    }

    /// Starts the CLI in the background (output piped).
    pub fn spawn(&self, args: &[&str]) -> Result<std::process::Child> {
        self.cmd(self.ferry.to_str().context("ferry path")?)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawn ferry CLI")
    }

    /// Names of the VMs the daemon holds (its own, not the cluster's).
    pub fn vm_names(&self) -> Result<Vec<String>> {
        Ok(self
            .ferry_json(&["vm", "list", "--here"])?
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v["spec"]["name"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default())
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

    /// Runs the CLI expecting it to fail with `needle` in its error.
    pub fn ferry_fails(&self, args: &[&str], needle: &str) -> Result<()> {
        let out = self.ferry(args)?;
        let err = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            bail!("ferry {args:?} succeeded");
        }
        if !err.contains(needle) {
            bail!("ferry {args:?}: {err:?} lacks {needle:?}");
        }
        Ok(())
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

    /// Defines and starts a test VM (256 MiB, NIC on br0, plus `extra` options) and
    /// waits for its ready marker.
    pub fn boot_vm(&self, name: &str, ip: &str, extra: &[&str]) -> Result<Value> {
        let mut all = vec!["--nic", "bridge=br0"];
        all.extend_from_slice(extra);
        self.create_test_vm(name, ip, &all)?;
        self.ferry_ok(&["vm", "start", name])?;
        self.wait_console(name, "FERRY-READY", Duration::from_secs(120))?;
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
            .arg("--socket")
            .arg(&self.socket)
            .args(["vm", "console", vm])
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
}
