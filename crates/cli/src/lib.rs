//! The `ferry` command line: every subcommand but `serve` talks to a daemon over REST
//! (`--server URL` or `FERRY_SERVER`, default `http://127.0.0.1:8470`). Lists print as
//! tables, everything prints as JSON with `--json`, long operations show progress.

mod access;
mod client;
mod cluster;
mod console;
mod drs;
mod replication;
mod specs;

pub use client::Client;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use comfy_table::{presets::UTF8_BORDERS_ONLY, Table};
use ferry_types::{
    ByteSize, ClusterHost, Event, HostInfo, MigrationReport, Pool, Task, TaskAccepted, Vm, Volume,
};
use reqwest::Method;
use serde_json::{json, Value};

#[derive(Args, Debug, Clone)]
pub struct Global {
    /// Another daemon's URL (`https://HOST:8470`); without it the CLI talks to this
    /// host's daemon over its local socket.
    #[arg(long, global = true, env = "FERRY_SERVER")]
    pub server: Option<String>,
    /// The cluster CA (PEM) the server's certificate is checked against (default
    /// /var/lib/ferry/pki/ca.crt).
    #[arg(long, global = true, env = "FERRY_CA")]
    pub ca: Option<std::path::PathBuf>,
    /// The local daemon's socket.
    #[arg(long, global = true, env = "FERRY_SOCKET", default_value = client::DEFAULT_SOCKET)]
    pub socket: std::path::PathBuf,
    /// A file holding an API token (`USER!ID=SECRET`) or the host's admin token (`-`:
    /// read it from standard input). Without it: FERRY_TOKEN from the environment, else
    /// the session `ferry login` kept for --server, else /var/lib/ferry/admin-token
    /// where readable. A token is never taken from the command line, where `ps` shows it.
    #[arg(long, global = true, env = "FERRY_TOKEN_FILE")]
    pub token_file: Option<std::path::PathBuf>,
    /// Print JSON instead of tables and messages.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Virtual machines.
    #[command(subcommand)]
    Vm(VmCmd),
    /// Storage pools.
    #[command(subcommand)]
    Pool(PoolCmd),
    /// Volumes in pools.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Long operations.
    #[command(subcommand)]
    Task(TaskCmd),
    /// Host networking.
    #[command(subcommand)]
    Net(NetCmd),
    /// The event log.
    Events {
        /// Only this VM's events.
        #[arg(long)]
        vm: Option<String>,
    },
    /// The etcd cluster: init, join, leave, status.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// DRS: balancing plans, applying them, settings (HA admission control too).
    #[command(subcommand)]
    Drs(drs::DrsCmd),
    /// Resource pools: reservations, limits and shares for CPU and memory.
    #[command(subcommand, name = "resource-pool", alias = "rpool")]
    ResourcePool(drs::RpoolCmd),
    /// Log in to a server (--server) as a user: its ticket (2 hours) and CA are kept
    /// for later commands to that server.
    Login {
        /// The user (asked for when not given).
        #[arg(long)]
        user: Option<String>,
        /// A file holding the password (`-`: standard input); else FERRY_PASSWORD,
        /// else asked for.
        #[arg(long)]
        password_file: Option<std::path::PathBuf>,
    },
    /// Forget the session kept for a server.
    Logout,
    /// Users: add, list, delete, passwd, disable, enable.
    #[command(subcommand)]
    User(access::UserCmd),
    /// API tokens: create, list, revoke.
    #[command(subcommand)]
    Token(access::TokenCmd),
    /// Grants of roles on paths: grant, revoke, list.
    #[command(subcommand)]
    Acl(access::AclCmd),
    /// The daemon's host, the cluster's hosts, maintenance mode.
    Host {
        #[command(subcommand)]
        cmd: Option<HostCmd>,
    },
}

#[derive(Subcommand, Debug)]
pub enum HostCmd {
    /// Facts about the daemon's host (the default).
    Show,
    /// The daemon's background tasks (lease, HA, DRS, revocation list, ...): last
    /// run, last error, next run.
    Status,
    /// The hosts of the cluster.
    List,
    /// Maintenance mode: move every running VM away (live), take no new ones.
    Maintenance {
        /// The host (default: the daemon's).
        host: Option<String>,
    },
    /// End maintenance mode.
    Activate { host: Option<String> },
}

#[derive(Args, Debug, Clone, Default)]
pub struct SpecArgs {
    /// Number of vCPUs.
    #[arg(long)]
    pub cpus: Option<u32>,
    /// Memory: 512M, 2G (a plain number is MiB).
    #[arg(long)]
    pub memory: Option<String>,
    /// A disk: bus=virtio|scsi|sata|ide,pool=local,size=10G[,format=qcow2|raw][,cache=none|writeback|...][,volume=NAME][,readonly]. Repeatable.
    #[arg(long = "disk")]
    pub disks: Vec<String>,
    /// A CD-ROM: POOL/VOLUME[,bus=ide|sata|scsi], or `empty`. Repeatable.
    #[arg(long = "cdrom")]
    pub cdroms: Vec<String>,
    /// A NIC: bridge=NAME[,model=virtio|e1000][,mac=52:54:00:..]. Repeatable.
    #[arg(long = "nic")]
    pub nics: Vec<String>,
    /// Boot order: device ids, e.g. cdrom0,disk0,net0.
    #[arg(long)]
    pub boot: Option<String>,
    /// pc (i440fx, default) or q35.
    #[arg(long)]
    pub machine: Option<String>,
    /// bios (default) or uefi.
    #[arg(long)]
    pub firmware: Option<String>,
    /// Direct boot: kernel file on the host.
    #[arg(long)]
    pub kernel: Option<String>,
    /// Direct boot: initrd file on the host.
    #[arg(long)]
    pub initrd: Option<String>,
    /// Direct boot: kernel command line.
    #[arg(long)]
    pub append: Option<String>,
    #[arg(long)]
    pub description: Option<String>,
    #[command(flatten)]
    pub ha: HaArgs,
    #[command(flatten)]
    pub placement: PlacementArgs,
}

/// Where DRS may place a VM, and its resource pool.
#[derive(Args, Debug, Clone, Default)]
pub struct PlacementArgs {
    /// Affinity group: VMs of one group run on one host.
    #[arg(long)]
    pub affinity: Option<String>,
    /// Anti-affinity group: VMs of one group run on different hosts. Repeatable.
    #[arg(long = "anti-affinity")]
    pub anti_affinity: Vec<String>,
    /// Only hosts with this label (`ferry serve --label`). Repeatable.
    #[arg(long = "host-label")]
    pub host_labels: Vec<String>,
    /// Only these hosts (comma-separated).
    #[arg(long = "pin-hosts", value_delimiter = ',')]
    pub hosts: Vec<String>,
    /// DRS does not move this VM to balance (yes|no).
    #[arg(long = "drs-pinned")]
    pub pinned: Option<String>,
    /// The resource pool (`ferry resource-pool`); empty: none.
    #[arg(long = "resource-pool")]
    pub resource_pool: Option<String>,
}

/// A VM's HA policy.
#[derive(Args, Debug, Clone, Default)]
pub struct HaArgs {
    /// HA: restart (after a crash, and on another host when its host fails) or off.
    #[arg(long = "ha")]
    pub mode: Option<String>,
    /// HA priority: higher ones are recovered first.
    #[arg(long = "ha-priority")]
    pub priority: Option<i32>,
    /// Crash restarts on one host (within 10 min) before HA moves the VM.
    #[arg(long = "ha-max-restarts")]
    pub max_restarts: Option<u32>,
    /// Anti-affinity group: HA keeps VMs of one group on different hosts.
    #[arg(long = "ha-group")]
    pub group: Option<String>,
}

impl HaArgs {
    /// Applies the given options to the JSON policy `cur`.
    pub fn apply(&self, mut cur: Value) -> Result<Value> {
        if let Some(m) = &self.mode {
            if m != "restart" && m != "off" {
                anyhow::bail!("--ha {m}: use restart or off");
            }
            cur["mode"] = json!(m);
        }
        if let Some(p) = self.priority {
            cur["priority"] = json!(p);
        }
        if let Some(n) = self.max_restarts {
            cur["max_restarts"] = json!(n);
        }
        if let Some(g) = &self.group {
            cur["anti_affinity"] = if g.is_empty() { Value::Null } else { json!(g) };
        }
        Ok(cur)
    }
}

#[derive(Subcommand, Debug)]
pub enum ClusterCmd {
    /// Found a cluster on the daemon's host (it runs the first etcd member).
    Init {
        /// This host's cluster address (one of its IPs).
        #[arg(long)]
        address: String,
        /// This host's API URL for the other hosts (default https://ADDRESS:PORT).
        #[arg(long)]
        api: Option<String>,
        /// Use an external etcd (client URL, repeatable) instead of running a member.
        #[arg(long)]
        etcd: Vec<String>,
        /// Host lease TTL in seconds (2–60): how long a silent host keeps its VMs.
        #[arg(long)]
        lease_ttl: Option<u64>,
    },
    /// Join the cluster of PEER (a member's address or API URL), with a join token and
    /// the CA fingerprint from `ferry cluster join-token` on a member.
    Join {
        peer: String,
        #[arg(long)]
        address: String,
        #[arg(long)]
        api: Option<String>,
        /// The cluster CA's fingerprint (SHA256:…): the member must prove it holds that CA.
        #[arg(long)]
        fingerprint: String,
        /// A file holding the join token (`-`: standard input), else FERRY_JOIN_TOKEN
        /// from the environment.
        #[arg(long)]
        join_token_file: Option<std::path::PathBuf>,
    },
    /// Make a one-time token that lets one host join (and show the CA fingerprint it
    /// must pin).
    JoinToken {
        /// Validity in seconds (60–86400).
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
    /// This host's certificate and the cluster CA.
    #[command(subcommand)]
    Certs(CertsCmd),
    /// Leave the cluster (no VM may run here).
    Leave,
    /// Take a member that is down for good out of the cluster (from another member):
    /// its etcd member and records go, its certificate is revoked.
    Remove {
        host: String,
        /// Also drop the records of VMs it still owns (their disks stay).
        #[arg(long)]
        force: bool,
    },
    /// Members, host states, leases, etcd leader and quorum, HA manager.
    Status,
}

#[derive(Subcommand, Debug)]
pub enum CertsCmd {
    /// The CA's fingerprint, this host's certificate: names, validity.
    Status,
    /// A new key and certificate for this host (signed by the cluster CA held here);
    /// the daemon restarts on it.
    Renew,
}

#[derive(Subcommand, Debug)]
pub enum VmCmd {
    /// List VMs.
    List,
    /// Show one VM.
    Show {
        name: String,
    },
    /// Define a VM.
    Create {
        name: String,
        /// Let DRS pick the host (the definition goes to that host).
        #[arg(long)]
        place: bool,
        #[command(flatten)]
        spec: Box<SpecArgs>,
    },
    /// Where DRS would run the VM, with each host's filters and score.
    Place {
        name: String,
        /// Show every host's verdict, not just the choice.
        #[arg(long)]
        explain: bool,
    },
    /// Change a stopped VM's definition (given options replace, disks/NICs/CD-ROMs are added).
    Edit {
        name: String,
        #[command(flatten)]
        spec: Box<SpecArgs>,
    },
    /// Change a VM's HA policy (also while it runs).
    Ha {
        name: String,
        #[command(flatten)]
        ha: HaArgs,
    },
    /// Start a VM.
    Start {
        name: String,
    },
    /// Shut down through ACPI; killed after the timeout.
    #[command(alias = "shutdown")]
    Stop {
        name: String,
        /// Seconds to wait for the guest.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Stop at once (QEMU quits without asking the guest).
    Kill {
        name: String,
    },
    /// Shut down and start again.
    Reboot {
        name: String,
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    Pause {
        name: String,
    },
    Resume {
        name: String,
    },
    /// Delete a VM and its own disks.
    Delete {
        name: String,
        /// Kill it first if it runs.
        #[arg(long)]
        force: bool,
        /// Keep its volumes.
        #[arg(long)]
        keep_disks: bool,
    },
    /// Take a snapshot (disk-only, or --with-memory of a running VM).
    Snapshot {
        name: String,
        snapshot: String,
        #[arg(long)]
        with_memory: bool,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// The snapshot tree.
    Snapshots {
        name: String,
    },
    /// Go back to a snapshot.
    Revert {
        name: String,
        snapshot: String,
    },
    /// Delete a snapshot (its data merges into what remains).
    SnapshotDelete {
        name: String,
        snapshot: String,
    },
    /// Clone a stopped VM or a template (--linked: instant overlay clone of a template).
    Clone {
        name: String,
        new_name: String,
        #[arg(long)]
        linked: bool,
    },
    /// Make a stopped VM an immutable template.
    Template {
        name: String,
    },
    /// Save RAM and device state to disk and stop (resume continues the guest).
    Suspend {
        name: String,
    },
    /// Move a disk to another pool, also while the VM runs (Storage vMotion).
    MoveDisk {
        name: String,
        /// The disk: its index or `diskN`.
        disk: String,
        /// The pool to move it to.
        #[arg(long, required_unless_present = "abort")]
        to_pool: Option<String>,
        /// Abort a move under way (the disk stays where it was).
        #[arg(long)]
        abort: bool,
        /// Cap the copy, MiB/s (while the VM runs).
        #[arg(long)]
        bandwidth: Option<u64>,
    },
    /// Move a stopped or suspended VM to another host (its local disks are copied).
    Move {
        name: String,
        #[arg(long)]
        to: String,
    },
    /// Move a running VM to another host while it runs (live migration).
    Migrate {
        name: String,
        /// The destination host.
        #[arg(long)]
        to: String,
        /// Also copy disks on local pools (mirrored over NBD while the guest runs).
        #[arg(long)]
        with_storage: bool,
        /// With --with-storage: the destination's pool for the copies.
        #[arg(long)]
        target_pool: Option<String>,
        /// Longest pause allowed at switchover, ms (default 50).
        #[arg(long)]
        downtime: Option<u64>,
        /// Bandwidth cap, MiB/s (default 10240: the link's speed).
        #[arg(long)]
        bandwidth: Option<u64>,
        /// Never switch to post-copy (a guest that dirties faster than the link then
        /// only converges by throttling).
        #[arg(long)]
        no_postcopy: bool,
    },
    /// Disks of a VM (hot-plugged while running: virtio and scsi).
    #[command(subcommand)]
    Disk(DiskCmd),
    /// NICs of a VM (hot-plugged while running).
    #[command(subcommand)]
    Nic(NicCmd),
    /// Insert an ISO (POOL/VOLUME) into a CD-ROM, or `eject` it; also while running.
    Cdrom {
        name: String,
        index: usize,
        media: String,
    },
    /// Attach to the serial console (Ctrl-] detaches).
    Console {
        name: String,
        /// Print the console history and exit.
        #[arg(long)]
        history: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum DiskCmd {
    /// Add a disk: bus=virtio,size=10G (new volume) or volume=NAME (existing).
    Attach { name: String, disk: String },
    /// Remove disk INDEX (its volume stays); while running only the last one.
    Detach { name: String, index: usize },
    /// Grow disk INDEX (online while running).
    Resize {
        name: String,
        index: usize,
        #[arg(long)]
        size: ByteSize,
    },
}

#[derive(Subcommand, Debug)]
pub enum NicCmd {
    /// Add a NIC: bridge=NAME[,model=virtio|e1000][,mac=...].
    Attach { name: String, nic: String },
    /// Remove NIC INDEX; while running only the last one.
    Detach { name: String, index: usize },
}

#[derive(Subcommand, Debug)]
pub enum PoolCmd {
    List,
    Show {
        name: String,
    },
    /// Define a dir pool.
    Create {
        name: String,
        #[arg(long)]
        path: String,
        /// dir (this host only), shared (a directory every host mounts; volumes
        /// locked to one writer) or replicated (a copy on each of --hosts, written
        /// synchronously; needs an etcd cluster).
        #[arg(long = "type", default_value = "dir")]
        kind: String,
        /// The hosts keeping copies (replicated): 2 or 3, comma-separated.
        #[arg(long, value_delimiter = ',')]
        hosts: Vec<String>,
    },
    /// Remove an empty pool's definition.
    Delete {
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum VolumeCmd {
    List {
        pool: String,
    },
    Show {
        pool: String,
        name: String,
    },
    Create {
        pool: String,
        name: String,
        #[arg(long)]
        size: ByteSize,
        /// qcow2 (the default) or raw; a replicated pool's volumes are raw.
        #[arg(long)]
        format: Option<String>,
    },
    Delete {
        pool: String,
        name: String,
    },
    /// Grow a volume (online if a running VM uses it).
    Resize {
        pool: String,
        name: String,
        #[arg(long)]
        size: ByteSize,
    },
    /// Import a host file (disk image or ISO).
    Import {
        pool: String,
        name: String,
        #[arg(long)]
        source: String,
        /// Convert to qcow2 or raw.
        #[arg(long)]
        format: Option<String>,
    },
    /// A replicated volume: primary, generation, each host's copy and its peers.
    Replication {
        pool: String,
        name: String,
    },
    /// Make the host the CLI talks to primary of a replicated volume (its NBD export
    /// takes writes). Starting a VM does this by itself.
    Promote {
        pool: String,
        name: String,
        /// Even if this copy is outdated or stale, or another host is primary: the
        /// admin accepts a possible split brain.
        #[arg(long)]
        force: bool,
    },
    /// End this host's term as primary.
    Demote {
        pool: String,
        name: String,
    },
    /// Compare the primary's copy with its peers' (checksums); differences are
    /// reported and marked for resync.
    Verify {
        pool: String,
        name: String,
    },
    /// Switch replication of a volume off: the primary writes alone, peers outdated.
    Disconnect {
        pool: String,
        name: String,
    },
    /// Switch replication on again: peers resync what they missed.
    Connect {
        pool: String,
        name: String,
    },
    /// End a split brain: keep HOST's copy; the others are kept aside as files and
    /// synced in full from it. Nothing else ever discards a copy's writes.
    Resolve {
        pool: String,
        name: String,
        #[arg(long)]
        keep: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum TaskCmd {
    List,
    Show {
        id: String,
    },
    /// Wait for a task to end.
    Wait {
        id: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum NetCmd {
    #[command(subcommand)]
    Bridge(BridgeCmd),
}

#[derive(Subcommand, Debug)]
pub enum BridgeCmd {
    List,
    /// Create a Linux bridge on the daemon's host.
    Create {
        name: String,
    },
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY).set_header(header.to_vec());
    t
}

fn print_json(v: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn mib(m: u64) -> String {
    ByteSize::mib(m).to_string()
}

/// Runs a CLI command.
pub async fn run(g: Global, cmd: Command) -> Result<()> {
    match cmd {
        Command::Login {
            user,
            password_file,
        } => return access::login(&g, user, password_file).await,
        Command::Logout => return access::logout(&g).await,
        _ => {}
    }
    // A token given is used; else the session `ferry login` kept for the server; else
    // this host's admin token where readable.
    let token = client::read_secret(g.token_file.as_deref(), "FERRY_TOKEN")?;
    let c = match &g.server {
        Some(s) => match (token, access::saved(s)) {
            (Some(t), _) => Client::new(s, Some(t), g.ca.as_deref())?,
            (None, Some(saved)) if g.ca.is_none() && saved.ca.is_some() => Client::with_ca_pem(
                s,
                Some(saved.ticket),
                saved
                    .ca
                    .map(|p| (p, "the session kept by ferry login".into())),
            )?,
            (None, Some(saved)) => Client::new(s, Some(saved.ticket), g.ca.as_deref())?,
            (None, None) => Client::new(s, client::default_token(), g.ca.as_deref())?,
        },
        None => Client::local(&g.socket, token.or_else(client::default_token))?,
    };
    match cmd {
        Command::Login { .. } | Command::Logout => unreachable!("handled above"),
        Command::User(cmd) => access::user(&c, &g, cmd).await,
        Command::Token(cmd) => access::token(&c, &g, cmd).await,
        Command::Acl(cmd) => access::acl(&c, &g, cmd).await,
        Command::Vm(v) => vm(&c, &g, v).await,
        Command::Pool(p) => pool(&c, &g, p).await,
        Command::Volume(v) => volume(&c, &g, v).await,
        Command::Task(t) => task(&c, &g, t).await,
        Command::Net(NetCmd::Bridge(b)) => match b {
            BridgeCmd::List => {
                let v: Value = c.get("/api/v1/bridges").await?;
                if g.json {
                    return print_json(&v);
                }
                for b in v.as_array().into_iter().flatten() {
                    println!("{}", b["name"].as_str().unwrap_or(""));
                }
                Ok(())
            }
            BridgeCmd::Create { name } => {
                let v: Value = c
                    .request(
                        Method::POST,
                        "/api/v1/bridges",
                        Some(&json!({"name": name})),
                    )
                    .await?;
                if g.json {
                    return print_json(&v);
                }
                println!("bridge {name} ready");
                Ok(())
            }
        },
        Command::Events { vm } => {
            let q = vm.map(|v| format!("?vm={v}")).unwrap_or_default();
            let ev: Vec<Event> = c.get(&format!("/api/v1/events{q}")).await?;
            if g.json {
                return print_json(&ev);
            }
            for e in ev {
                println!(
                    "{:>6} {:>13} {:<12} {:<6} {}",
                    e.seq,
                    e.time_ms,
                    e.vm.unwrap_or_default(),
                    e.kind,
                    e.message
                );
            }
            Ok(())
        }
        Command::Host { cmd } => host(&c, &g, cmd.unwrap_or(HostCmd::Show)).await,
        Command::Cluster(cmd) => cluster::run(&c, &g, cmd).await,
        Command::Drs(cmd) => drs::run(&c, &g, cmd).await,
        Command::ResourcePool(cmd) => drs::run_rpool(&c, &g, cmd).await,
    }
}

/// The client of host `name` of the cluster (`None`: the daemon's own).
async fn host_client(c: &Client, name: Option<&str>) -> Result<Client> {
    let Some(name) = name else {
        return Ok(c.clone());
    };
    let hosts: Vec<ClusterHost> = c.get("/api/v1/cluster/hosts").await?;
    hosts
        .iter()
        .find(|h| h.name == name)
        .map(|h| c.at_node(&h.name))
        .with_context(|| {
            format!(
                "no host {name} in the cluster (hosts: {})",
                hosts
                    .iter()
                    .map(|h| h.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

async fn host(c: &Client, g: &Global, cmd: HostCmd) -> Result<()> {
    match cmd {
        HostCmd::Show => {
            let h: HostInfo = c.get("/api/v1/host").await?;
            if g.json {
                return print_json(&h);
            }
            println!(
                "{} ({}): {} CPUs, {} memory ({} available), accel {}, {}; {} of {} VMs running{}",
                h.name,
                h.hostname,
                h.cpus,
                ByteSize(h.memory_bytes),
                ByteSize(h.memory_available_bytes),
                h.accel,
                h.qemu_version,
                h.vms_running,
                h.vms_defined,
                if h.maintenance {
                    "; IN MAINTENANCE"
                } else {
                    ""
                }
            );
            Ok(())
        }
        HostCmd::Status => {
            let h: HostInfo = c.get("/api/v1/host").await?;
            if g.json {
                return print_json(&h.background);
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            let ago = |t: Option<u64>| {
                t.map_or("-".to_string(), |t| {
                    format!("{:.1} s ago", now.saturating_sub(t) as f64 / 1000.0)
                })
            };
            let mut t = table(&[
                "TASK",
                "EVERY",
                "RUNS",
                "FAILED",
                "LAST RUN",
                "LAST OK",
                "LAST ERROR",
            ]);
            for b in h.background {
                t.add_row(vec![
                    b.name,
                    format!("{:.1} s", b.every_ms as f64 / 1000.0),
                    b.runs.to_string(),
                    b.failures.to_string(),
                    ago(b.last_run_ms),
                    ago(b.last_ok_ms),
                    match (b.last_error, b.last_error_ms) {
                        (Some(e), at) => format!("{e} ({})", ago(at)),
                        _ => "-".into(),
                    },
                ]);
            }
            println!(
                "{}: {} of {} VMs running",
                h.name, h.vms_running, h.vms_defined
            );
            println!("{t}");
            Ok(())
        }
        HostCmd::List => {
            let hosts: Vec<ClusterHost> = c.get("/api/v1/cluster/hosts").await?;
            let mut rows = vec![];
            for h in &hosts {
                let info: Result<HostInfo> = c.at_node(&h.name).get("/api/v1/host").await;
                rows.push((h.clone(), info.ok()));
            }
            if g.json {
                let v: Vec<Value> = rows
                    .iter()
                    .map(|(h, i)| json!({"host": h, "info": i}))
                    .collect();
                return print_json(&v);
            }
            let mut t = table(&["HOST", "ADDRESS", "STATE", "VMS", "VM MEMORY", "AVAILABLE"]);
            for (h, i) in rows {
                match i {
                    Some(i) => t.add_row(vec![
                        h.name,
                        h.address,
                        if i.maintenance {
                            "maintenance"
                        } else {
                            "online"
                        }
                        .to_string(),
                        format!("{}/{}", i.vms_running, i.vms_defined),
                        ByteSize(i.vm_memory_bytes).to_string(),
                        ByteSize(i.memory_available_bytes).to_string(),
                    ]),
                    None => t.add_row(vec![h.name, h.address, "unreachable".into()]),
                };
            }
            println!("{t}");
            Ok(())
        }
        HostCmd::Maintenance { host } => {
            let hc = host_client(c, host.as_deref()).await?;
            let t: TaskAccepted = hc
                .request(Method::POST, "/api/v1/host/maintenance", None)
                .await?;
            let done = hc.wait_task(t, g.json).await?;
            if g.json {
                return print_json(&done);
            }
            for l in &done.log {
                println!("{l}");
            }
            println!("{} is in maintenance", done.target);
            Ok(())
        }
        HostCmd::Activate { host } => {
            let hc = host_client(c, host.as_deref()).await?;
            hc.request::<Value>(Method::POST, "/api/v1/host/activate", None)
                .await?;
            println!("{} active", host.unwrap_or_else(|| "host".into()));
            Ok(())
        }
    }
}

async fn action(c: &Client, g: &Global, name: &str, act: &str, body: Option<Value>) -> Result<()> {
    let t: TaskAccepted = c
        .request(
            Method::POST,
            &format!("/api/v1/vms/{name}/{act}"),
            body.as_ref(),
        )
        .await?;
    let done = c.wait_task(t, g.json).await?;
    if g.json {
        return print_json(&done);
    }
    match c.get::<Vm>(&format!("/api/v1/vms/{name}")).await {
        Ok(vm) => println!("{name}: {}", vm.state),
        // DRS started it on another host: the task's last line says where.
        Err(_) => println!("{name}: {}", done.log.last().map_or("done", String::as_str)),
    }
    Ok(())
}

async fn vm(c: &Client, g: &Global, cmd: VmCmd) -> Result<()> {
    match cmd {
        VmCmd::List => {
            let vms: Vec<Vm> = c.get("/api/v1/vms").await?;
            if g.json {
                return print_json(&vms);
            }
            let mut t = table(&[
                "ID", "NAME", "STATE", "CPUS", "MEMORY", "DISKS", "NICS", "PID",
            ]);
            for v in vms {
                t.add_row(vec![
                    v.id.to_string(),
                    v.spec.name.clone(),
                    v.state.to_string(),
                    v.spec.cpus.to_string(),
                    mib(v.spec.memory_mib),
                    v.spec.disks.len().to_string(),
                    v.spec.nics.len().to_string(),
                    v.pid.map(|p| p.to_string()).unwrap_or_default(),
                ]);
            }
            println!("{t}");
            Ok(())
        }
        VmCmd::Show { name } => {
            let v: Vm = c.get(&format!("/api/v1/vms/{name}")).await?;
            print_json(&v)
        }
        VmCmd::Place { name, explain } => {
            let r: ferry_types::PlacementReport =
                c.get(&format!("/api/v1/vms/{name}/placement")).await?;
            drs::print_placement(g, &r, explain)
        }
        VmCmd::Create { name, place, spec } => {
            let body = specs::spec_json(&name, &spec, None)?;
            let path = if place {
                "/api/v1/placement/create"
            } else {
                "/api/v1/vms"
            };
            let v: Vm = c.request(Method::POST, path, Some(&body)).await?;
            if g.json {
                return print_json(&v);
            }
            println!(
                "VM {} defined (id {}, {} disks, {} NICs)",
                v.spec.name,
                v.id,
                v.spec.disks.len(),
                v.spec.nics.len()
            );
            Ok(())
        }
        VmCmd::Edit { name, spec } => {
            let cur: Vm = c.get(&format!("/api/v1/vms/{name}")).await?;
            let body = specs::spec_json(&name, &spec, Some(&cur.spec))?;
            let v: Vm = c
                .request(Method::PUT, &format!("/api/v1/vms/{name}"), Some(&body))
                .await?;
            if g.json {
                return print_json(&v);
            }
            println!("VM {name} changed");
            Ok(())
        }
        VmCmd::Ha { name, ha } => {
            let cur: Vm = c.get(&format!("/api/v1/vms/{name}")).await?;
            let body = ha.apply(serde_json::to_value(&cur.spec.ha)?)?;
            let v: Vm = c
                .request(Method::PUT, &format!("/api/v1/vms/{name}/ha"), Some(&body))
                .await?;
            if g.json {
                return print_json(&v);
            }
            println!("VM {name}: HA {}", serde_json::to_string(&v.spec.ha)?);
            Ok(())
        }
        VmCmd::Start { name } => action(c, g, &name, "start", None).await,
        VmCmd::Stop { name, timeout } => {
            action(
                c,
                g,
                &name,
                "shutdown",
                Some(json!({"timeout_secs": timeout})),
            )
            .await
        }
        VmCmd::Kill { name } => action(c, g, &name, "stop", None).await,
        VmCmd::Reboot { name, timeout } => {
            action(
                c,
                g,
                &name,
                "reboot",
                Some(json!({"timeout_secs": timeout})),
            )
            .await
        }
        VmCmd::Pause { name } => action(c, g, &name, "pause", None).await,
        VmCmd::Disk(d) => disk(c, g, d).await,
        VmCmd::Nic(NicCmd::Attach { name, nic }) => {
            let body = specs::nic_json(&nic)?;
            let v: Value = c
                .request(
                    Method::POST,
                    &format!("/api/v1/vms/{name}/nics"),
                    Some(&body),
                )
                .await?;
            if g.json {
                return print_json(&v);
            }
            println!("{name}: net{} attached", v["index"]);
            Ok(())
        }
        VmCmd::Nic(NicCmd::Detach { name, index }) => {
            let _: Value = c
                .request(
                    Method::DELETE,
                    &format!("/api/v1/vms/{name}/nics/{index}"),
                    None,
                )
                .await?;
            println!("{name}: net{index} detached");
            Ok(())
        }
        VmCmd::Cdrom { name, index, media } => {
            let body = if media == "eject" {
                json!({})
            } else {
                specs::cdrom_json(&media)?
            };
            let v: Vm = c
                .request(
                    Method::PUT,
                    &format!("/api/v1/vms/{name}/cdroms/{index}"),
                    Some(&body),
                )
                .await?;
            if g.json {
                return print_json(&v);
            }
            println!(
                "{name}: cdrom{index} {}",
                if media == "eject" {
                    "ejected".to_string()
                } else {
                    format!("holds {media}")
                }
            );
            Ok(())
        }
        VmCmd::Suspend { name } => action(c, g, &name, "suspend", None).await,
        VmCmd::Move { name, to } => {
            let t: TaskAccepted = c
                .request(
                    Method::POST,
                    &format!("/api/v1/vms/{name}/move"),
                    Some(&json!({"to": to})),
                )
                .await?;
            let done = c.wait_task(t, g.json).await?;
            if g.json {
                return print_json(&done);
            }
            println!("{name} now on {to}");
            Ok(())
        }
        VmCmd::MoveDisk {
            name,
            disk,
            to_pool,
            abort,
            bandwidth,
        } => {
            let index: usize = disk
                .strip_prefix("disk")
                .unwrap_or(&disk)
                .parse()
                .with_context(|| format!("disk {disk:?}: an index or diskN"))?;
            let path = format!("/api/v1/vms/{name}/disks/{index}/move");
            if abort {
                c.request::<Value>(Method::DELETE, &path, None).await?;
                println!("{name}: move of disk{index} aborted");
                return Ok(());
            }
            let mut body = json!({"pool": to_pool});
            if let Some(b) = bandwidth {
                body["bandwidth_mib"] = json!(b);
            }
            let t: TaskAccepted = c.request(Method::POST, &path, Some(&body)).await?;
            let done = c.wait_task(t, g.json).await?;
            if g.json {
                return print_json(&done);
            }
            println!("{name}: disk{index} now on {}", to_pool.unwrap_or_default());
            Ok(())
        }
        VmCmd::Migrate {
            name,
            to,
            with_storage,
            target_pool,
            downtime,
            bandwidth,
            no_postcopy,
        } => {
            let mut body = json!({"to": to, "with_storage": with_storage});
            if let Some(p) = target_pool {
                body["target_pool"] = json!(p);
            }
            if let Some(d) = downtime {
                body["downtime_limit_ms"] = json!(d);
            }
            if let Some(b) = bandwidth {
                body["max_bandwidth_mib"] = json!(b);
            }
            if no_postcopy {
                body["allow_postcopy"] = json!(false);
            }
            let t: TaskAccepted = c
                .request(
                    Method::POST,
                    &format!("/api/v1/vms/{name}/migrate"),
                    Some(&body),
                )
                .await?;
            let done = c.wait_task(t, g.json).await?;
            let report: MigrationReport = done
                .result
                .clone()
                .map(serde_json::from_value)
                .transpose()?
                .context("the migration task gave no report")?;
            if g.json {
                return print_json(&report);
            }
            println!(
                "{name} now runs on {}: {} ms total, QEMU downtime {} ms, {} of RAM sent in {} passes{}",
                report.to,
                report.total_ms,
                report.downtime_ms,
                ByteSize(report.ram_transferred_bytes),
                report.passes,
                if report.disk_transferred_bytes > 0 {
                    format!(", {} of disk", ByteSize(report.disk_transferred_bytes))
                } else {
                    String::new()
                }
            );
            for s in &report.policy_steps {
                println!("  policy: {s}");
            }
            Ok(())
        }
        VmCmd::Snapshot {
            name,
            snapshot,
            with_memory,
            description,
        } => {
            let body =
                json!({"name": snapshot, "with_memory": with_memory, "description": description});
            action(c, g, &name, "snapshots", Some(body)).await
        }
        VmCmd::Revert { name, snapshot } => {
            action(c, g, &name, &format!("snapshots/{snapshot}/revert"), None).await
        }
        VmCmd::SnapshotDelete { name, snapshot } => {
            let t: TaskAccepted = c
                .request(
                    Method::DELETE,
                    &format!("/api/v1/vms/{name}/snapshots/{snapshot}"),
                    None,
                )
                .await?;
            c.wait_task(t, g.json).await?;
            if !g.json {
                println!("snapshot {snapshot} of {name} deleted");
            }
            Ok(())
        }
        VmCmd::Snapshots { name } => {
            let l: ferry_types::SnapshotList =
                c.get(&format!("/api/v1/vms/{name}/snapshots")).await?;
            if g.json {
                return print_json(&l);
            }
            print_tree(&l, None, 0);
            if l.current.is_none() {
                println!("(no snapshot yet)");
            }
            Ok(())
        }
        VmCmd::Clone {
            name,
            new_name,
            linked,
        } => {
            let body = json!({"name": new_name, "linked": linked});
            let t: TaskAccepted = c
                .request(
                    Method::POST,
                    &format!("/api/v1/vms/{name}/clone"),
                    Some(&body),
                )
                .await?;
            c.wait_task(t, g.json).await?;
            let v: Vm = c.get(&format!("/api/v1/vms/{new_name}")).await?;
            if g.json {
                return print_json(&v);
            }
            println!(
                "{} clone {new_name} of {name} (id {})",
                if linked { "linked" } else { "full" },
                v.id
            );
            Ok(())
        }
        VmCmd::Template { name } => {
            let v: Vm = c
                .request(Method::POST, &format!("/api/v1/vms/{name}/template"), None)
                .await?;
            if g.json {
                return print_json(&v);
            }
            println!("{name} is now a template");
            Ok(())
        }
        VmCmd::Resume { name } => action(c, g, &name, "resume", None).await,
        VmCmd::Delete {
            name,
            force,
            keep_disks,
        } => {
            let _: Value = c
                .request(
                    Method::DELETE,
                    &format!("/api/v1/vms/{name}?force={force}&keep_disks={keep_disks}"),
                    None,
                )
                .await?;
            if !g.json {
                println!("VM {name} deleted");
            }
            Ok(())
        }
        VmCmd::Console { name, history } => {
            if history {
                print!(
                    "{}",
                    c.get_text(&format!("/api/v1/vms/{name}/console/history"))
                        .await?
                );
                return Ok(());
            }
            console::attach(c, &name).await
        }
    }
}

async fn disk(c: &Client, g: &Global, cmd: DiskCmd) -> Result<()> {
    match cmd {
        DiskCmd::Attach { name, disk } => {
            let body = specs::disk_json(&disk)?;
            let v: Value = c
                .request(
                    Method::POST,
                    &format!("/api/v1/vms/{name}/disks"),
                    Some(&body),
                )
                .await?;
            if g.json {
                return print_json(&v);
            }
            println!("{name}: disk{} attached", v["index"]);
            Ok(())
        }
        DiskCmd::Detach { name, index } => {
            let _: Value = c
                .request(
                    Method::DELETE,
                    &format!("/api/v1/vms/{name}/disks/{index}"),
                    None,
                )
                .await?;
            println!("{name}: disk{index} detached");
            Ok(())
        }
        DiskCmd::Resize { name, index, size } => {
            let vm: Vm = c.get(&format!("/api/v1/vms/{name}")).await?;
            let d = vm
                .spec
                .disks
                .get(index)
                .ok_or_else(|| anyhow::anyhow!("{name} has no disk{index}"))?;
            let vol = d.volume.clone().unwrap_or_default();
            let v: Volume = c
                .request(
                    Method::POST,
                    &format!("/api/v1/pools/{}/volumes/{vol}/resize", d.pool),
                    Some(&json!({"size": size.0})),
                )
                .await?;
            if g.json {
                return print_json(&v);
            }
            println!("{name}: disk{index} is now {}", ByteSize(v.virtual_bytes));
            Ok(())
        }
    }
}

fn print_tree(l: &ferry_types::SnapshotList, parent: Option<&str>, depth: usize) {
    for s in l.snapshots.iter().filter(|s| s.parent.as_deref() == parent) {
        let here = if l.current.as_deref() == Some(s.name.as_str()) {
            "  <- current"
        } else {
            ""
        };
        let mem = if s.with_memory { " (with memory)" } else { "" };
        println!("{}{}{mem}{here}", "  ".repeat(depth), s.name);
        print_tree(l, Some(&s.name), depth + 1);
    }
}

async fn pool(c: &Client, g: &Global, cmd: PoolCmd) -> Result<()> {
    match cmd {
        PoolCmd::List => {
            let pools: Vec<Pool> = c.get("/api/v1/pools").await?;
            if g.json {
                return print_json(&pools);
            }
            let mut t = table(&[
                "NAME",
                "TYPE",
                "PATH",
                "VOLUMES",
                "USED",
                "AVAILABLE",
                "CAPACITY",
            ]);
            for p in pools {
                t.add_row(vec![
                    p.spec.name.clone(),
                    format!("{:?}", p.spec.kind).to_lowercase(),
                    p.spec.path.clone(),
                    p.volumes.to_string(),
                    ByteSize(p.used_bytes).to_string(),
                    ByteSize(p.available_bytes).to_string(),
                    ByteSize(p.capacity_bytes).to_string(),
                ]);
            }
            println!("{t}");
            Ok(())
        }
        PoolCmd::Show { name } => {
            print_json(&c.get::<Pool>(&format!("/api/v1/pools/{name}")).await?)
        }
        PoolCmd::Create {
            name,
            path,
            kind,
            hosts,
        } => {
            let mut body = json!({"name": name, "type": kind, "path": path});
            if !hosts.is_empty() {
                body["hosts"] = json!(hosts);
            }
            let p: Pool = c
                .request(Method::POST, "/api/v1/pools", Some(&body))
                .await?;
            if g.json {
                return print_json(&p);
            }
            if hosts.is_empty() {
                println!("pool {name} created at {path}");
            } else {
                println!(
                    "pool {name} created: a copy of each volume at {path} on {}",
                    hosts.join(", ")
                );
            }
            Ok(())
        }
        PoolCmd::Delete { name } => {
            let _: Value = c
                .request(Method::DELETE, &format!("/api/v1/pools/{name}"), None)
                .await?;
            println!("pool {name} removed (its directory stays)");
            Ok(())
        }
    }
}

async fn volume(c: &Client, g: &Global, cmd: VolumeCmd) -> Result<()> {
    let show = |v: &Volume| {
        println!(
            "{}/{}: {} {} ({} allocated)",
            v.pool,
            v.name,
            v.format,
            ByteSize(v.virtual_bytes),
            ByteSize(v.allocated_bytes)
        )
    };
    match cmd {
        VolumeCmd::List { pool } => {
            let vols: Vec<Volume> = c.get(&format!("/api/v1/pools/{pool}/volumes")).await?;
            if g.json {
                return print_json(&vols);
            }
            let mut t = table(&["NAME", "FORMAT", "SIZE", "ALLOCATED"]);
            for v in vols {
                t.add_row(vec![
                    v.name,
                    v.format,
                    ByteSize(v.virtual_bytes).to_string(),
                    ByteSize(v.allocated_bytes).to_string(),
                ]);
            }
            println!("{t}");
            Ok(())
        }
        VolumeCmd::Create {
            pool,
            name,
            size,
            format,
        } => {
            let v: Volume = c
                .request(
                    Method::POST,
                    &format!("/api/v1/pools/{pool}/volumes"),
                    Some(&match format {
                        Some(f) => json!({"name": name, "size": size.0, "format": f}),
                        None => json!({"name": name, "size": size.0}),
                    }),
                )
                .await?;
            if g.json {
                return print_json(&v);
            }
            show(&v);
            Ok(())
        }
        VolumeCmd::Show { pool, name } => {
            let v: Volume = c
                .get(&format!("/api/v1/pools/{pool}/volumes/{name}"))
                .await?;
            if g.json {
                return print_json(&v);
            }
            show(&v);
            Ok(())
        }
        VolumeCmd::Delete { pool, name } => {
            let _: Value = c
                .request(
                    Method::DELETE,
                    &format!("/api/v1/pools/{pool}/volumes/{name}"),
                    None,
                )
                .await?;
            println!("volume {pool}/{name} deleted");
            Ok(())
        }
        VolumeCmd::Resize { pool, name, size } => {
            let v: Volume = c
                .request(
                    Method::POST,
                    &format!("/api/v1/pools/{pool}/volumes/{name}/resize"),
                    Some(&json!({"size": size.0})),
                )
                .await?;
            if g.json {
                return print_json(&v);
            }
            show(&v);
            Ok(())
        }
        VolumeCmd::Import {
            pool,
            name,
            source,
            format,
        } => {
            let mut body = json!({"name": name, "source": source});
            if let Some(f) = format {
                body["format"] = json!(f);
            }
            let t: TaskAccepted = c
                .request(
                    Method::POST,
                    &format!("/api/v1/pools/{pool}/import"),
                    Some(&body),
                )
                .await?;
            c.wait_task(t, g.json).await?;
            let v: Volume = c
                .get(&format!("/api/v1/pools/{pool}/volumes/{name}"))
                .await?;
            if g.json {
                return print_json(&v);
            }
            show(&v);
            Ok(())
        }
        other => replication::run(c, g, other).await,
    }
}

async fn task(c: &Client, g: &Global, cmd: TaskCmd) -> Result<()> {
    match cmd {
        TaskCmd::List => {
            let tasks: Vec<Task> = c.get("/api/v1/tasks").await?;
            if g.json {
                return print_json(&tasks);
            }
            let mut t = table(&["ID", "KIND", "TARGET", "STATE", "PROGRESS", "ERROR"]);
            for k in tasks {
                t.add_row(vec![
                    k.id,
                    k.kind,
                    k.target,
                    format!("{:?}", k.state).to_lowercase(),
                    format!("{:.0}%", k.progress * 100.0),
                    k.error.unwrap_or_default(),
                ]);
            }
            println!("{t}");
            Ok(())
        }
        TaskCmd::Show { id } => print_json(&c.get::<Task>(&format!("/api/v1/tasks/{id}")).await?),
        TaskCmd::Wait { id } => {
            let t = c.wait_task(TaskAccepted { task: id }, g.json).await?;
            print_json(&t)
        }
    }
}
