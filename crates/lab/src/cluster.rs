//! A cluster on one machine: a LAN namespace holding a bridge, N host namespaces (each
//! with its own bridge `br0` enslaving its LAN veth, an address on the LAN and its own
//! `ferry serve`), a client namespace for pings and load, and a directory every host
//! sees as the shared pool. `ferry lab up/down/status/cut/heal/kill/kill-daemon` and the
//! multi-host tests drive this. Every address lives inside the lab's namespaces.
//!
//! Names: namespaces `{prefix}-lan`, `{prefix}-h1`.., `{prefix}-client`; files under
//! `/var/tmp/ferry-lab/{prefix}/` (`lab.json` says what was made, so `down` works from
//! another process and after a crash).

use crate::cli::Cli;
use crate::{pid_runs_qemu_of, run, API_PORT};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The LAN's /24; hosts are .11, .12, ..; the client .2; guests may use .100–.250.
pub const LAN_PREFIX: &str = "10.78.0";
pub const CLIENT_ADDR: &str = "10.78.0.2";
/// The pool every host of a lab has on the shared directory.
pub const SHARED_POOL: &str = "shared";

const LAB_ROOT: &str = "/var/tmp/ferry-lab";

/// One host of the lab.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabHost {
    pub name: String,
    pub ns: String,
    /// Its address on the LAN (API and migration traffic).
    pub addr: String,
    #[serde(default)]
    pub daemon_pid: Option<u32>,
}

impl LabHost {
    pub fn api(&self) -> String {
        format!("https://{}:{API_PORT}", self.addr)
    }
}

/// What `lab.json` records.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LabFile {
    prefix: String,
    hosts: Vec<LabHost>,
    #[serde(default)]
    opts: LabOptions,
}

/// How a lab's hosts form their cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabOptions {
    /// An etcd cluster (`ferry cluster init` on h1, `join` on the others; HA on);
    /// false: a static cluster file, no HA.
    pub etcd: bool,
    /// Host lease TTL (seconds) of the etcd cluster.
    pub lease_ttl_s: u64,
    /// Extra `ferry serve` options per host name (`*`: every host), e.g. the
    /// capacity DRS plans with or labels.
    #[serde(default)]
    pub serve_args: std::collections::BTreeMap<String, Vec<String>>,
}

impl Default for LabOptions {
    fn default() -> Self {
        LabOptions {
            etcd: true,
            lease_ttl_s: 3,
            serve_args: Default::default(),
        }
    }
}

/// A running lab cluster. Dropping it tears everything down unless [`ClusterLab::keep`]
/// was called (the `ferry lab up` CLI keeps it for later commands).
pub struct ClusterLab {
    pub prefix: String,
    pub dir: PathBuf,
    pub hosts: Vec<LabHost>,
    pub opts: LabOptions,
    ferry: PathBuf,
    keep: bool,
}

impl ClusterLab {
    /// A lab for a test: prefix `fy{pid}-{n}` (swept when the test process is gone).
    pub fn for_test(ferry: impl Into<PathBuf>, hosts: usize) -> Result<ClusterLab> {
        ClusterLab::for_test_with(ferry, hosts, LabOptions::default())
    }

    pub fn for_test_with(
        ferry: impl Into<PathBuf>,
        hosts: usize,
        opts: LabOptions,
    ) -> Result<ClusterLab> {
        crate::sweep::sweep_stale();
        let prefix = format!(
            "fy{}-{}",
            std::process::id(),
            crate::SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        ClusterLab::up_with(ferry, &prefix, hosts, opts)
    }

    pub fn up(ferry: impl Into<PathBuf>, prefix: &str, hosts: usize) -> Result<ClusterLab> {
        ClusterLab::up_with(ferry, prefix, hosts, LabOptions::default())
    }

    /// Creates the namespaces, links and daemons, forms the cluster, and makes the
    /// shared pool on every host. A failure part-way removes what was made.
    pub fn up_with(
        ferry: impl Into<PathBuf>,
        prefix: &str,
        hosts: usize,
        opts: LabOptions,
    ) -> Result<ClusterLab> {
        check_prefix(prefix)?;
        if !(1..=9).contains(&hosts) {
            bail!("--hosts must be 1 to 9");
        }
        if !namespaces_of(prefix).is_empty() {
            bail!("a lab named {prefix} exists already (ferry lab down --name {prefix})");
        }
        let dir = Path::new(LAB_ROOT).join(prefix);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("shared"))?;
        let mut lab = ClusterLab {
            prefix: prefix.to_string(),
            dir,
            hosts: (1..=hosts)
                .map(|i| LabHost {
                    name: format!("h{i}"),
                    ns: format!("{prefix}-h{i}"),
                    addr: format!("{LAN_PREFIX}.{}", 10 + i),
                    daemon_pid: None,
                })
                .collect(),
            ferry: ferry.into(),
            keep: false,
            opts: opts.clone(),
        };
        // On error the drop tears down the part that exists.
        lab.build_network()?;
        lab.write_cluster_file()?;
        if !opts.etcd {
            lab.share_token()?;
        }
        for h in lab.hosts.clone() {
            lab.start_daemon(&h.name)?;
        }
        for h in lab.hosts.clone() {
            lab.wait_daemon(&h.name)?;
        }
        if opts.etcd {
            lab.form_cluster()?;
        }
        for h in lab.hosts.clone() {
            let shared = lab.dir.join("shared").display().to_string();
            lab.cli(&h.name)?.ferry_ok(&[
                "pool",
                "create",
                SHARED_POOL,
                "--type",
                "shared",
                "--path",
                &shared,
            ])?;
        }
        Ok(lab)
    }

    /// A static cluster's hosts share one admin token (for CLI clients) and one CA:
    /// the lab makes the CA and each host's certificate, as `cluster join` would.
    fn share_token(&self) -> Result<()> {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        let mut b = [0u8; 32];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
        let token: String = b.iter().map(|x| format!("{x:02x}")).collect();
        let (ca, ca_key) = ferry_pki::new_ca(&self.prefix)?;
        for h in &self.hosts {
            let dir = self.state_dir(&h.name);
            std::fs::create_dir_all(&dir)?;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(dir.join("admin-token"))?;
            std::io::Write::write_all(&mut f, format!("{token}\n").as_bytes())?;
            let (key, csr) = ferry_pki::new_request(&h.name)?;
            let cert = ferry_pki::sign_host(&ca, &ca_key, &csr, &h.name, &[h.addr.parse()?])?;
            ferry_pki::HostPki::install(&dir.join(ferry_pki::PKI_DIR), &ca, None, &cert, &key)?;
        }
        Ok(())
    }

    /// The cluster CA (as h1 has it): what clients check the hosts' certificates with.
    pub fn ca_file(&self) -> PathBuf {
        self.state_dir(&self.hosts[0].name)
            .join(ferry_pki::PKI_DIR)
            .join("ca.crt")
    }

    /// The lab `prefix` made earlier (by `ferry lab up`).
    pub fn open(ferry: impl Into<PathBuf>, prefix: &str) -> Result<ClusterLab> {
        check_prefix(prefix)?;
        let dir = Path::new(LAB_ROOT).join(prefix);
        let f: LabFile = serde_json::from_slice(
            &std::fs::read(dir.join("lab.json"))
                .with_context(|| format!("no lab named {prefix} (ferry lab up)"))?,
        )?;
        Ok(ClusterLab {
            prefix: f.prefix,
            dir,
            hosts: f.hosts,
            opts: f.opts,
            ferry: ferry.into(),
            keep: true,
        })
    }

    /// `ferry cluster init` on h1, `join` on the others (one at a time, as etcd adds
    /// members one by one).
    fn form_cluster(&self) -> Result<()> {
        let first = &self.hosts[0];
        self.cli(&first.name)?.ferry_ok(&[
            "cluster",
            "init",
            "--address",
            &first.addr,
            "--lease-ttl",
            &self.opts.lease_ttl_s.to_string(),
        ])?;
        for (i, h) in self.hosts[1..].iter().enumerate() {
            // The first joiner also tries a wrong fingerprint and a made-up token.
            self.join_host(&h.name, i == 0)?;
            if i == 0 {
                let st: serde_json::Value = serde_json::from_str(
                    &self
                        .cli(&first.name)?
                        .ferry_ok(&["--json", "cluster", "status"])?,
                )?;
                anyhow::ensure!(
                    st["members"].as_array().map(Vec::len) == Some(2),
                    "h2 did not join: {st}"
                );
            }
        }
        Ok(())
    }

    /// `ferry cluster join` of host `name` through h1 (again after a `leave`), with a
    /// one-time token from h1 and h1's CA fingerprint pinned. `refusals`: first a
    /// wrong fingerprint and a made-up token, each refused.
    pub fn join_host(&self, name: &str, refusals: bool) -> Result<()> {
        let first = &self.hosts[0];
        let h = self.host(name)?;
        let cli1 = self.cli(&first.name)?;
        let t: serde_json::Value = serde_json::from_str(&cli1.ferry_ok(&[
            "--json",
            "cluster",
            "join-token",
            "--ttl",
            "600",
        ])?)?;
        let token = t["token"].as_str().context("join token")?;
        let fp = t["ca_fingerprint"].as_str().context("CA fingerprint")?;
        let file = self.dir.join(format!("join-token-{}", h.name));
        std::fs::write(&file, token)?;
        let file = file.to_str().context("token path")?;
        let join = |fp: &str| {
            [
                "cluster",
                "join",
                &first.addr,
                "--address",
                &h.addr,
                "--fingerprint",
                fp,
                "--join-token-file",
                file,
            ]
            .map(String::from)
        };
        if refusals {
            // A wrong fingerprint: the joiner refuses the member, and stays as it was.
            let wrong = format!("SHA256:{}", ["00"; 32].join(":"));
            let args = join(&wrong);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            self.cli(&h.name)?.ferry_fails(&args, "fingerprint")?;
            // The right member but a made-up token: the member refuses (401).
            std::fs::write(file, "00".repeat(24))?;
            let args = join(fp);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            self.cli(&h.name)?.ferry_fails(&args, "join token")?;
            std::fs::write(file, token)?;
        }
        let args = join(fp);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.cli(&h.name)?.ferry_ok(&args)?;
        Ok(())
    }

    /// The pid of `host`'s etcd member, if it runs.
    pub fn etcd_pid(&self, host: &str) -> Option<i32> {
        ferry_store::member::running(
            &self.run_dir(host).join("etcd.pid"),
            &self.state_dir(host).join("cluster").join("etcd"),
        )
    }

    /// SIGKILLs `host`'s etcd member (the host and its daemon stay).
    pub fn kill_etcd(&self, host: &str) -> Result<()> {
        let pid = self
            .etcd_pid(host)
            .with_context(|| format!("no etcd runs on {host}"))?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        Ok(())
    }

    /// Leaves the lab running when this value is dropped.
    pub fn keep(mut self) {
        self.keep = true;
    }

    pub fn lan_ns(&self) -> String {
        format!("{}-lan", self.prefix)
    }

    pub fn client_ns(&self) -> String {
        format!("{}-client", self.prefix)
    }

    pub fn host(&self, name: &str) -> Result<&LabHost> {
        self.hosts.iter().find(|h| h.name == name).with_context(|| {
            format!(
                "no host {name} in lab {} (hosts: {})",
                self.prefix,
                self.hosts
                    .iter()
                    .map(|h| h.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
    }

    /// The CLI run inside `host`'s namespace against its daemon (works while cut).
    pub fn cli(&self, host: &str) -> Result<Cli> {
        let h = self.host(host)?;
        Ok(Cli {
            ferry: self.ferry.clone(),
            ns: h.ns.clone(),
            socket: self.run_dir(host).join("api.sock"),
        })
    }

    /// A command run in the client namespace.
    pub fn client_cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.client_ns(), program]);
        c
    }

    pub fn state_dir(&self, host: &str) -> PathBuf {
        self.dir.join(host).join("state")
    }

    pub fn run_dir(&self, host: &str) -> PathBuf {
        self.dir.join(host).join("run")
    }

    /// Live QEMUs of `host`.
    pub fn qemu_pids(&self, host: &str) -> Vec<i32> {
        crate::qemu_pids_in(&self.run_dir(host))
    }

    pub fn shared_dir(&self) -> PathBuf {
        self.dir.join("shared")
    }

    fn ip(&self, ns: &str, args: &[&str]) -> Result<()> {
        run(Command::new("ip").arg("-n").arg(ns).args(args)).map(|_| ())
    }

    fn build_network(&self) -> Result<()> {
        let lan = self.lan_ns();
        run(Command::new("ip").args(["netns", "add", &lan]))?;
        self.ip(&lan, &["link", "set", "lo", "up"])?;
        self.ip(&lan, &["link", "add", "lan0", "type", "bridge"])?;
        self.ip(&lan, &["link", "set", "lan0", "up"])?;
        let mut ends: Vec<(String, String, String)> = self
            .hosts
            .iter()
            .map(|h| (h.name.clone(), h.ns.clone(), h.addr.clone()))
            .collect();
        ends.push(("client".into(), self.client_ns(), CLIENT_ADDR.into()));
        for (port, ns, addr) in ends {
            run(Command::new("ip").args(["netns", "add", &ns]))?;
            self.ip(&ns, &["link", "set", "lo", "up"])?;
            self.ip(
                &lan,
                &[
                    "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns,
                ],
            )?;
            self.ip(&lan, &["link", "set", &port, "master", "lan0", "up"])?;
            let addr = format!("{addr}/24");
            if port == "client" {
                self.ip(&ns, &["addr", "add", &addr, "dev", "eth0"])?;
                self.ip(&ns, &["link", "set", "eth0", "up"])?;
            } else {
                // Like a hypervisor's vmbr0: the host's address on a bridge that also
                // holds the VMs' taps.
                self.ip(&ns, &["link", "add", "br0", "type", "bridge"])?;
                self.ip(&ns, &["link", "set", "eth0", "master", "br0", "up"])?;
                // A bridge takes the lowest MAC of its ports unless given one: every VM
                // tap added later could change the host's MAC under its neighbours'
                // ARP caches (connections to the host then stall for a minute). Pin it
                // to the uplink's, as hypervisor hosts do.
                let o = run(Command::new("ip").args(["-n", &ns, "-br", "link", "show", "eth0"]))?;
                let line = String::from_utf8_lossy(&o.stdout).to_string();
                let mac = line
                    .split_whitespace()
                    .nth(2)
                    .with_context(|| format!("MAC of eth0 in {ns}: {line}"))?
                    .to_string();
                self.ip(&ns, &["link", "set", "br0", "address", &mac])?;
                self.ip(&ns, &["addr", "add", &addr, "dev", "br0"])?;
                self.ip(&ns, &["link", "set", "br0", "up"])?;
            }
        }
        Ok(())
    }

    /// `cluster.json`: the hosts every daemon knows (name, API, migration address).
    fn write_cluster_file(&self) -> Result<()> {
        let hosts: Vec<_> = self
            .hosts
            .iter()
            .map(|h| serde_json::json!({"name": h.name, "api": h.api(), "address": h.addr}))
            .collect();
        std::fs::write(
            self.dir.join("cluster.json"),
            serde_json::to_vec_pretty(&serde_json::json!({ "hosts": hosts }))?,
        )?;
        self.save()
    }

    fn save(&self) -> Result<()> {
        let f = LabFile {
            prefix: self.prefix.clone(),
            hosts: self.hosts.clone(),
            opts: self.opts.clone(),
        };
        std::fs::write(self.dir.join("lab.json"), serde_json::to_vec_pretty(&f)?)?;
        Ok(())
    }

    /// Whether `host`'s daemon process is alive.
    pub fn daemon_alive(&self, host: &str) -> bool {
        self.host(host)
            .ok()
            .and_then(|h| h.daemon_pid)
            .is_some_and(|p| pid_runs_qemu_of(p as i32, &self.state_dir(host)))
    }

    /// Starts `ferry serve` in `host`'s namespace (detached: it outlives this process).
    pub fn start_daemon(&mut self, host: &str) -> Result<u32> {
        if self.daemon_alive(host) {
            bail!("the daemon of {host} is running already");
        }
        let h = self.host(host)?.clone();
        std::fs::create_dir_all(self.dir.join(host))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(host).join("daemon.log"))?;
        // `ip netns exec` mounts a fresh /sys: the cgroup hierarchies are mounted again
        // (in the daemon's own mount namespace) for resource pools; `exec` keeps the pid.
        let child = Command::new("ip")
            .args(["netns", "exec", &h.ns, "sh", "-c"])
            .arg(format!("{}; exec \"$0\" \"$@\"", cgroup_mounts()))
            .arg(&self.ferry)
            .args([
                "serve",
                "--listen",
                &format!("{}:{API_PORT}", h.addr),
                "--host-name",
                &h.name,
            ])
            .args(if self.opts.etcd {
                vec![]
            } else {
                vec!["--cluster".into(), self.dir.join("cluster.json")]
            })
            .arg("--state-dir")
            .arg(self.state_dir(host))
            .arg("--run-dir")
            .arg(self.run_dir(host))
            .arg("--file-restore-image")
            .arg(crate::file_restore_image())
            // nothing from this machine's /etc/ferry/ferry.toml
            .args(["--config", "/dev/null"])
            // Resource pool cgroups of this lab host, removed by `down`.
            .args([
                "--cgroup-root",
                &format!("{}{}-{host}", CGROUP_PREFIX, self.prefix),
            ])
            .args(self.opts.serve_args.get("*").into_iter().flatten())
            .args(self.opts.serve_args.get(host).into_iter().flatten())
            .env("RUST_LOG", "info,ferry_agent=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("spawn ferry serve")?;
        // `ip netns exec` execs the program: the child's pid is the daemon's.
        let pid = child.id();
        // Reaped by whoever waits; a detached daemon of the CLI is reparented at exit.
        std::mem::forget(child);
        if let Some(x) = self.hosts.iter_mut().find(|x| x.name == host) {
            x.daemon_pid = Some(pid);
        }
        self.save()?;
        Ok(pid)
    }

    /// Waits until `host`'s daemon answers.
    pub fn wait_daemon(&self, host: &str) -> Result<()> {
        let cli = self.cli(host)?;
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(30) {
            if cli
                .ferry(&["host"])
                .map(|o| o.status.success())
                .unwrap_or(false)
            {
                return Ok(());
            }
            // Its pid is ours (just started): gone or a zombie means it ended. (Its
            // command line names the state dir only once `ip netns exec` has exec'd it.)
            let ended = self.host(host)?.daemon_pid.is_none_or(|p| {
                let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
                stat.is_empty()
                    || stat
                        .rsplit_once(')')
                        .and_then(|(_, r)| r.split_whitespace().next())
                        == Some("Z")
            });
            if ended {
                bail!("ferry serve on {host} exited: {}", self.daemon_log(host));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("ferry serve on {host} did not answer within 30 s")
    }

    pub fn daemon_log(&self, host: &str) -> String {
        std::fs::read_to_string(self.dir.join(host).join("daemon.log")).unwrap_or_default()
    }

    /// SIGKILLs `host`'s daemon (a crash); its VMs keep running.
    pub fn kill_daemon(&mut self, host: &str) -> Result<()> {
        let h = self.host(host)?.clone();
        match h.daemon_pid {
            Some(p) if self.daemon_alive(host) => kill_wait(p as i32),
            _ => bail!("the daemon of {host} is not running"),
        }
        if let Some(x) = self.hosts.iter_mut().find(|x| x.name == host) {
            x.daemon_pid = None;
        }
        self.save()
    }

    /// SIGKILLs every process of `host` (daemon, QEMUs): the host lost power.
    pub fn kill_host(&mut self, host: &str) -> Result<usize> {
        let ns = self.host(host)?.ns.clone();
        let pids = netns_pids(&ns);
        // All at once, like a power cut; then wait for each.
        for &p in &pids {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), nix::sys::signal::SIGKILL);
        }
        for &p in &pids {
            kill_wait(p);
        }
        if let Some(x) = self.hosts.iter_mut().find(|x| x.name == host) {
            x.daemon_pid = None;
        }
        self.save()?;
        Ok(pids.len())
    }

    /// Takes `host`'s LAN link down (cable pulled) or up again.
    pub fn set_link(&self, host: &str, up: bool) -> Result<()> {
        self.host(host)?;
        self.ip(
            &self.lan_ns(),
            &["link", "set", host, if up { "up" } else { "down" }],
        )
    }

    /// One line per host: address, daemon, link, VMs.
    pub fn status(&self) -> Result<String> {
        let mut out = format!(
            "lab {}: LAN {LAN_PREFIX}.0/24 (namespace {}), client {CLIENT_ADDR} (namespace {}), shared pool {}\n",
            self.prefix,
            self.lan_ns(),
            self.client_ns(),
            self.shared_dir().display()
        );
        for h in &self.hosts {
            let link = Command::new("ip")
                .args(["-n", &self.lan_ns(), "-br", "link", "show", &h.name])
                .output()
                .ok()
                .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
                .unwrap_or_default();
            let link = if link.contains("DOWN") && !link.contains("LOWER_UP") {
                "cut"
            } else {
                "up"
            };
            let alive = self.daemon_alive(&h.name);
            let vms = if alive {
                self.cli(&h.name)?
                    .ferry_json(&["vm", "list", "--here"])
                    .ok()
                    .and_then(|v| {
                        v.as_array().map(|a| {
                            a.iter()
                                .map(|vm| {
                                    format!(
                                        "{}({})",
                                        vm["spec"]["name"].as_str().unwrap_or("?"),
                                        vm["state"].as_str().unwrap_or("?")
                                    )
                                })
                                .collect::<Vec<_>>()
                                .join(" ")
                        })
                    })
                    .unwrap_or_else(|| "?".into())
            } else {
                "-".into()
            };
            out.push_str(&format!(
                "{:<4} {:<12} ns {:<14} link {:<4} daemon {:<8} VMs {}\n",
                h.name,
                h.addr,
                h.ns,
                link,
                if alive {
                    format!("pid {}", h.daemon_pid.unwrap_or(0))
                } else {
                    "down".into()
                },
                vms
            ));
        }
        Ok(out)
    }

    /// Removes the lab `prefix`: every process in its namespaces, the namespaces, its
    /// directory. Works on leftovers (no `lab.json`, half-made labs).
    pub fn down(prefix: &str) -> Result<usize> {
        check_prefix(prefix)?;
        let nss = namespaces_of(prefix);
        for ns in &nss {
            for p in netns_pids(ns) {
                kill_wait(p);
            }
        }
        for ns in &nss {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir_all(Path::new(LAB_ROOT).join(prefix));
        remove_cgroups(&format!("{CGROUP_PREFIX}{prefix}-"));
        Ok(nss.len())
    }
}

impl Drop for ClusterLab {
    fn drop(&mut self) {
        if !self.keep {
            let _ = ClusterLab::down(&self.prefix);
        }
    }
}

/// Shell commands mounting this machine's cgroup hierarchies that carry the `cpu` or
/// `memory` controller (v1) and the unified one (v2) under /sys/fs/cgroup, as the
/// daemon expects them; failures are left to the daemon's detection.
fn cgroup_mounts() -> String {
    let s = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mut cmds = vec!["mount -t tmpfs cgroup /sys/fs/cgroup".to_string()];
    let mut v1 = false;
    for l in s.lines() {
        let mut f = l.splitn(3, ':');
        let (Some(_), Some(ctrls)) = (f.next(), f.next()) else {
            continue;
        };
        let names: Vec<&str> = ctrls.split(',').collect();
        if ctrls.is_empty() || !names.iter().any(|c| *c == "cpu" || *c == "memory") {
            continue;
        }
        v1 = true;
        cmds.push(format!(
            "mkdir -p /sys/fs/cgroup/{ctrls} && mount -t cgroup -o {ctrls} cgroup /sys/fs/cgroup/{ctrls}"
        ));
        for n in names.iter().filter(|n| **n == "cpu" || **n == "memory") {
            if *n != ctrls {
                cmds.push(format!("ln -s {ctrls} /sys/fs/cgroup/{n}"));
            }
        }
    }
    if v1 {
        cmds.push(
            "mkdir -p /sys/fs/cgroup/unified && mount -t cgroup2 none /sys/fs/cgroup/unified"
                .into(),
        );
    } else {
        cmds = vec!["mount -t cgroup2 none /sys/fs/cgroup".into()];
    }
    format!("{{ {}; }} 2>/dev/null", cmds.join(" && "))
}

/// The lab daemons' resource pool cgroups: `{CGROUP_PREFIX}{lab}-{host}`.
pub const CGROUP_PREFIX: &str = "ferry-lab-";

/// This process's cgroup directories (v1 cpu and memory, v2); the lab's daemons
/// inherit them.
pub fn own_cgroup_dirs() -> Vec<PathBuf> {
    let s = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mut out = vec![];
    for l in s.lines() {
        let mut f = l.splitn(3, ':');
        let (Some(_), Some(ctrls), Some(path)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let path = path.trim_start_matches('/');
        let mount = match ctrls {
            "" => Path::new("/sys/fs/cgroup").to_path_buf(),
            c if c.split(',').any(|x| x == "cpu") => Path::new("/sys/fs/cgroup/cpu").into(),
            c if c.split(',').any(|x| x == "memory") => Path::new("/sys/fs/cgroup/memory").into(),
            _ => continue,
        };
        out.push(mount.join(path));
    }
    out
}

/// Removes the (empty) cgroup trees whose names start with `prefix`, deepest first.
fn remove_cgroups(prefix: &str) {
    fn rm_tree(d: &Path) {
        if let Ok(rd) = std::fs::read_dir(d) {
            for e in rd.flatten() {
                if e.path().is_dir() {
                    rm_tree(&e.path());
                }
            }
        }
        let _ = std::fs::remove_dir(d);
    }
    for dir in own_cgroup_dirs() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(prefix) && e.path().is_dir() {
                rm_tree(&e.path());
            }
        }
    }
}

fn check_prefix(prefix: &str) -> Result<()> {
    if prefix.is_empty()
        || prefix.len() > 20
        || !prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        bail!("lab name {prefix:?}: 1-20 characters of a-z, 0-9, '-', '_'");
    }
    Ok(())
}

/// The namespaces of lab `prefix`.
fn namespaces_of(prefix: &str) -> Vec<String> {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return vec![];
    };
    let roles = |r: &str| {
        r == "lan" || r == "client" || (r.starts_with('h') && r[1..].parse::<u32>().is_ok())
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| {
            n.strip_prefix(prefix)
                .and_then(|r| r.strip_prefix('-'))
                .is_some_and(roles)
        })
        .map(String::from)
        .collect()
}

/// The processes inside namespace `ns` (all of them started by the lab).
pub(crate) fn netns_pids(ns: &str) -> Vec<i32> {
    Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// SIGKILL and wait until the process is gone (reaped or a zombie of someone else).
pub(crate) fn kill_wait(pid: i32) {
    use nix::sys::wait::{waitpid, WaitPidFlag};
    let p = nix::unistd::Pid::from_raw(pid);
    let _ = nix::sys::signal::kill(p, nix::sys::signal::SIGKILL);
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        let _ = waitpid(p, Some(WaitPidFlag::WNOHANG));
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().next());
        if stat.is_empty() || state == Some("Z") {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
