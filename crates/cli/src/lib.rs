//! The `ferry` command line: every subcommand but `serve` talks to a daemon over REST —
//! the local daemon's unix socket by default, another over HTTPS with `--server URL`
//! (or `FERRY_SERVER`). Lists print as tables, everything prints as JSON with `--json`,
//! long operations show progress. One module per noun: `vm`, `host`, `pools`,
//! `tasks`, `cluster`, `drs`, `replication`, `access`, `console`.

mod access;
mod backup;
mod client;
mod cluster;
mod console;
mod drs;
mod host;
mod pools;
mod replication;
mod specs;
mod tasks;
mod vm;

pub use host::HostCmd;
pub use pools::{PoolCmd, VolumeCmd};
pub use tasks::{BridgeCmd, NetCmd, TaskCmd};
pub use vm::{DiskCmd, HaArgs, NicCmd, PlacementArgs, SpecArgs, VmCmd};

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
    /// Backup stores: create, list, show, delete.
    #[command(subcommand, name = "backup-store")]
    BackupStore(backup::StoreCmd),
    /// Backups: run, list, show, delete, restore, prune, gc, verify.
    #[command(subcommand)]
    Backup(backup::BackupCmd),
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

pub(crate) fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY).set_header(header.to_vec());
    t
}

pub(crate) fn print_json(v: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

pub(crate) fn mib(m: u64) -> String {
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
        Command::Vm(v) => vm::vm(&c, &g, v).await,
        Command::Pool(p) => pools::pool(&c, &g, p).await,
        Command::BackupStore(cmd) => backup::store(&c, &g, cmd).await,
        Command::Backup(cmd) => backup::run(&c, &g, cmd).await,
        Command::Volume(v) => pools::volume(&c, &g, v).await,
        Command::Task(t) => tasks::task(&c, &g, t).await,
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
        Command::Host { cmd } => host::host(&c, &g, cmd.unwrap_or(HostCmd::Show)).await,
        Command::Cluster(cmd) => cluster::run(&c, &g, cmd).await,
        Command::Drs(cmd) => drs::run(&c, &g, cmd).await,
        Command::ResourcePool(cmd) => drs::run_rpool(&c, &g, cmd).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct T {
        #[command(subcommand)]
        cmd: Command,
    }

    fn parse(args: &[&str]) -> Result<Command, clap::Error> {
        T::try_parse_from(std::iter::once("ferry").chain(args.iter().copied())).map(|t| t.cmd)
    }

    /// Closed choices take exactly the names the API uses, and anything else is refused
    /// by the parser with the choices listed.
    #[test]
    fn closed_choices_are_the_apis_names() {
        for args in [
            &[
                "vm",
                "create",
                "a",
                "--memory",
                "64",
                "--machine",
                "q35",
                "--firmware",
                "uefi",
            ][..],
            &["vm", "ha", "a", "--ha", "restart"],
            &[
                "pool",
                "create",
                "p",
                "--path",
                "/x",
                "--type",
                "replicated",
            ],
            &[
                "volume", "create", "p", "v", "--size", "1G", "--format", "raw",
            ],
            &[
                "drs",
                "config",
                "--mode",
                "automatic",
                "--policy",
                "pack",
                "--admission",
                "warn",
            ],
        ] {
            assert!(parse(args).is_ok(), "{args:?}: {:?}", parse(args).err());
        }
        for (args, bad) in [
            (&["vm", "create", "a", "--machine", "q36"][..], "q36"),
            (
                &["pool", "create", "p", "--path", "/x", "--type", "nfs"],
                "nfs",
            ),
            (&["drs", "config", "--mode", "auto"], "auto"),
        ] {
            let e = parse(args).unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains("possible values"), "{e}");
        }
        let e = parse(&["vm", "ha", "a", "--ha", "always"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--ha always: use restart or off"), "{e}");
    }
}
