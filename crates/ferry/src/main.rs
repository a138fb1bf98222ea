//! The `ferry` binary: `ferry serve` runs the daemon; every other subcommand is the CLI,
//! talking to a daemon over REST.

mod lab;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use ferry_agent::{AccelSetting, Agent, AgentConfig};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Parser, Debug)]
#[command(name = "ferry", version, about = "KVM virtualization cluster manager")]
struct Cli {
    #[command(flatten)]
    global: ferry_cli::Global,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the daemon (API, agent) on this host.
    Serve(ServeArgs),
    /// A cluster on this machine: hosts in network namespaces, faults on demand.
    #[command(subcommand)]
    Lab(lab::LabCmd),
    #[command(flatten)]
    Cli(ferry_cli::Command),
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Address of the REST API.
    #[arg(long, default_value = "127.0.0.1:8470")]
    listen: SocketAddr,
    /// Store, pools and VM state.
    #[arg(long, default_value = "/var/lib/ferry")]
    state_dir: PathBuf,
    /// Sockets and pidfiles of running VMs.
    #[arg(long, default_value = "/run/ferry")]
    run_dir: PathBuf,
    /// auto (KVM where it really works, else TCG), kvm or tcg.
    #[arg(long, default_value = "auto")]
    accel: AccelSetting,
    /// The QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: String,
    /// This host's name in the cluster (default: the hostname).
    #[arg(long)]
    host_name: Option<String>,
    /// The cluster file: JSON `{"hosts": [{"name", "api", "address"}]}`.
    #[arg(long)]
    cluster: Option<PathBuf>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new().context("Start the async runtime")?;
    match cli.cmd {
        Cmd::Serve(a) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info,tower_http=warn".into()),
                )
                .init();
            rt.block_on(serve(a))
        }
        Cmd::Lab(l) => {
            if let Err(e) = lab::run(l) {
                eprintln!("ferry lab: {e:#}");
                std::process::exit(1);
            }
            Ok(())
        }
        Cmd::Cli(c) => {
            let r = rt.block_on(ferry_cli::run(cli.global, c));
            if let Err(e) = &r {
                eprintln!("ferry: {e:#}");
                std::process::exit(1);
            }
            Ok(())
        }
    }
}

/// Holds an exclusive lock on the state dir for the daemon's life.
fn lock_state_dir(dir: &std::path::Path) -> Result<nix::fcntl::Flock<std::fs::File>> {
    std::fs::create_dir_all(dir).with_context(|| format!("Create {}", dir.display()))?;
    let f = std::fs::File::create(dir.join("lock")).context("Create the state dir lock")?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| anyhow::anyhow!("Another ferry daemon uses {} ({e})", dir.display()))
}

async fn serve(a: ServeArgs) -> Result<()> {
    let _lock = lock_state_dir(&a.state_dir)?;
    let store = ferry_store::SqliteStore::open(&a.state_dir.join("ferry.db"))
        .context("Open the state store")?;
    let agent = Agent::open(
        AgentConfig {
            state_dir: a.state_dir.clone(),
            run_dir: a.run_dir.clone(),
            accel: a.accel,
            qemu_binary: a.qemu.clone(),
            host_name: a.host_name.clone().unwrap_or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_string())
                    .unwrap_or_else(|_| "localhost".into())
            }),
            cluster_file: a.cluster.clone(),
        },
        Arc::new(store),
    )
    .await
    .context("Start the agent")?;
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("Listen on {}", a.listen))?;
    tracing::info!(listen = %a.listen, accel = %agent.accel(), "ferry serve: API ready");
    println!(
        "ferry: API on http://{} (accel {})",
        a.listen,
        agent.accel()
    );
    axum::serve(listener, ferry_api::router(agent))
        .with_graceful_shutdown(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = term.recv() => {},
            }
            tracing::info!("stopping the daemon; VMs keep running");
        })
        .await
        .context("Serve the API")?;
    Ok(())
}
