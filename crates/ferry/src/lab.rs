//! `ferry lab`: a cluster of ferry hosts on this machine (network namespaces, see
//! `ferry_lab::ClusterLab`), kept between commands, with fault injection.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use ferry_lab::ClusterLab;

#[derive(Args, Debug, Clone)]
pub struct LabName {
    /// The lab's name (prefix of its namespaces).
    #[arg(long, default_value = "lab")]
    name: String,
}

#[derive(Subcommand, Debug)]
pub enum LabCmd {
    /// Create the LAN, N hosts with their daemons, the client and the shared pool.
    Up {
        #[arg(long, default_value_t = 3)]
        hosts: usize,
        /// A static cluster file instead of an etcd cluster (no HA).
        #[arg(long = "static")]
        static_cluster: bool,
        /// Host lease TTL in seconds (etcd cluster).
        #[arg(long, default_value_t = 3)]
        lease_ttl: u64,
        #[command(flatten)]
        lab: LabName,
    },
    /// Kill a host's etcd member (the host and its daemon stay).
    KillEtcd {
        host: String,
        #[command(flatten)]
        lab: LabName,
    },
    /// Remove everything the lab made (also leftovers of a crashed lab).
    Down {
        #[command(flatten)]
        lab: LabName,
    },
    /// Hosts, links, daemons and VMs.
    Status {
        #[command(flatten)]
        lab: LabName,
    },
    /// Pull HOST's LAN cable.
    Cut {
        host: String,
        #[command(flatten)]
        lab: LabName,
    },
    /// Plug HOST's LAN cable back in.
    Heal {
        host: String,
        #[command(flatten)]
        lab: LabName,
    },
    /// Kill every process of HOST (daemon and QEMUs): a power loss.
    Kill {
        host: String,
        #[command(flatten)]
        lab: LabName,
    },
    /// Kill HOST's daemon only (its VMs run on).
    KillDaemon {
        host: String,
        #[command(flatten)]
        lab: LabName,
    },
    /// Start HOST's daemon again.
    Start {
        host: String,
        #[command(flatten)]
        lab: LabName,
    },
    /// Run a command inside HOST's namespace (or `client`'s), with FERRY_SERVER set to
    /// that host's API (h1's for the client): `ferry lab exec h1 -- ferry vm list`.
    Exec {
        host: String,
        #[command(flatten)]
        lab: LabName,
        #[arg(trailing_var_arg = true, required = true)]
        command: Vec<String>,
    },
    /// Make HOST's API and web UI reachable on an address of this machine (outside the
    /// lab's namespaces), until stopped: `ferry lab expose h1 --listen 127.0.0.1:8471`.
    Expose {
        host: String,
        #[command(flatten)]
        lab: LabName,
        #[arg(long, default_value = "127.0.0.1:8471")]
        listen: std::net::SocketAddr,
    },
}

pub fn run(cmd: LabCmd) -> Result<()> {
    let me = std::env::current_exe().context("the ferry binary's path")?;
    match cmd {
        LabCmd::KillEtcd { host, lab } => {
            ClusterLab::open(&me, &lab.name)?.kill_etcd(&host)?;
            println!("{host}: etcd member killed");
            Ok(())
        }
        LabCmd::Up {
            hosts,
            static_cluster,
            lease_ttl,
            lab,
        } => {
            let opts = ferry_lab::LabOptions {
                etcd: !static_cluster,
                lease_ttl_s: lease_ttl,
                ..Default::default()
            };
            let l = ClusterLab::up_with(&me, &lab.name, hosts, opts)?;
            print!("{}", l.status()?);
            println!(
                "CLI on a host: ferry lab exec h1 -- ferry vm list   (VM NICs: bridge=br0; free addresses {}.100-250)",
                ferry_lab::LAN_PREFIX
            );
            l.keep();
            Ok(())
        }
        LabCmd::Down { lab } => {
            let n = ClusterLab::down(&lab.name)?;
            println!("lab {}: {n} namespaces removed", lab.name);
            Ok(())
        }
        LabCmd::Status { lab } => {
            print!("{}", ClusterLab::open(&me, &lab.name)?.status()?);
            Ok(())
        }
        LabCmd::Cut { host, lab } => ClusterLab::open(&me, &lab.name)?.set_link(&host, false),
        LabCmd::Heal { host, lab } => ClusterLab::open(&me, &lab.name)?.set_link(&host, true),
        LabCmd::Kill { host, lab } => {
            let n = ClusterLab::open(&me, &lab.name)?.kill_host(&host)?;
            println!("{host}: {n} processes killed");
            Ok(())
        }
        LabCmd::KillDaemon { host, lab } => ClusterLab::open(&me, &lab.name)?.kill_daemon(&host),
        LabCmd::Start { host, lab } => {
            let mut l = ClusterLab::open(&me, &lab.name)?;
            l.start_daemon(&host)?;
            l.wait_daemon(&host)
        }
        LabCmd::Expose { host, lab, listen } => {
            let l = ClusterLab::open(&me, &lab.name)?;
            let h = l.host(&host)?;
            let target = format!("{}:{}", h.addr, ferry_lab::API_PORT)
                .parse()
                .context("the host's API address")?;
            println!(
                "{host}'s API and web UI: https://{listen}/ (relayed to {target}; the cluster CA: {})",
                l.ca_file().display()
            );
            ferry_lab::expose(&h.ns, target, listen)
        }
        LabCmd::Exec { host, lab, command } => {
            let l = ClusterLab::open(&me, &lab.name)?;
            // A lab host's own CLI uses its daemon's local socket; the client namespace is
            // another machine: h1's API over the LAN, with the cluster's token.
            let mut cmd = std::process::Command::new("ip");
            if host == "client" {
                let h1 = l.hosts.first().context("the lab has no hosts")?;
                cmd.args(["netns", "exec", &l.client_ns()])
                    .env("FERRY_SERVER", h1.api())
                    .env(
                        "FERRY_TOKEN_FILE",
                        l.state_dir(&h1.name).join("admin-token"),
                    )
                    .env("FERRY_CA", l.ca_file());
            } else {
                let h = l.host(&host)?;
                cmd.args(["netns", "exec", &h.ns])
                    .env("FERRY_SOCKET", l.run_dir(&host).join("api.sock"));
            }
            let st = cmd.args(&command).status().context("run the command")?;
            if !st.success() {
                bail!("{} exited with {st}", command[0]);
            }
            Ok(())
        }
    }
}
