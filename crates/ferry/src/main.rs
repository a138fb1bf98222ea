//! The `ferry` binary: `ferry serve` runs the daemon; every other subcommand is the CLI,
//! talking to a daemon over REST.

mod config;
mod lab;

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser, Subcommand};
use ferry_agent::{Agent, AgentConfig};
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
    Serve(Box<config::ServeArgs>),
    /// The daemon's configuration file.
    #[command(subcommand)]
    Config(config::ConfigCmd),
    /// Shell completions on standard output (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Man pages of every command into a folder (for packaging).
    #[command(hide = true)]
    Man { dir: PathBuf },
    /// A cluster on this machine: hosts in network namespaces, faults on demand.
    #[command(subcommand)]
    Lab(lab::LabCmd),
    /// The HA watchdog (started by `ferry serve` in a cluster): kills this host's HA
    /// VMs when the daemon stops renewing the cluster lease.
    #[command(hide = true)]
    Watchdog {
        #[arg(long)]
        run_dir: PathBuf,
        /// A hardware watchdog device to feed while the lease holds.
        #[arg(long)]
        device: Option<PathBuf>,
    },
    #[command(flatten)]
    Cli(ferry_cli::Command),
}

fn main() -> Result<()> {
    config::cli_defaults();
    let mut cli = Cli::parse();
    if matches!(
        cli.cmd,
        Cmd::Cli(_) | Cmd::Config(_) | Cmd::Completions { .. }
    ) {
        // A CLI whose reader went away (`ferry host status | head`) ends quietly, as
        // other tools do, instead of panicking on the next print.
        // SAFETY: at the start of main, before any thread; SIG_DFL is no handler.
        unsafe {
            let _ = nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGPIPE,
                nix::sys::signal::SigHandler::SigDfl,
            );
        }
    }
    if let Cmd::Serve(a) = &cli.cmd {
        // The file's settings join as environment the flags' variables lack: parse again.
        if let Err(e) = config::apply(a.config.as_deref()) {
            eprintln!("ferry serve: configuration: {e:#}");
            std::process::exit(2);
        }
        cli = Cli::parse();
    }
    let rt = tokio::runtime::Runtime::new().context("Start the async runtime")?;
    match cli.cmd {
        Cmd::Serve(a) => {
            init_logging();
            rt.block_on(serve(*a))
        }
        Cmd::Config(c) => {
            if let Err(e) = config::run(c) {
                eprintln!("ferry config: {e:#}");
                std::process::exit(1);
            }
            Ok(())
        }
        Cmd::Completions { shell } => {
            use std::io::Write;
            let mut out = vec![];
            clap_complete::generate(shell, &mut Cli::command(), "ferry", &mut out);
            // a closed pipe (`| head`) ends it quietly
            let _ = std::io::stdout().write_all(&out);
            Ok(())
        }
        Cmd::Man { dir } => man_pages(&dir),
        Cmd::Watchdog { run_dir, device } => ferry_agent::run_watchdog(&run_dir, device.as_deref()),
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

/// Makes `dir` (and its parents) and leaves it to root alone (0700), also when it was
/// made before with looser rights.
fn private_dir(dir: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).with_context(|| format!("Create {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("Make {} private", dir.display()))
}

/// The local socket's name in the run dir.
const SOCKET: &str = "api.sock";

/// Binds `{run_dir}/api.sock` for local clients: root and the `ferry` group may connect
/// (0660); the daemon asks the kernel who each one is.
fn local_socket(run_dir: &std::path::Path) -> Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let path = run_dir.join(SOCKET);
    // The state dir's lock is ours: a socket left there is a dead daemon's.
    let _ = std::fs::remove_file(&path);
    let l = tokio::net::UnixListener::bind(&path)
        .with_context(|| format!("Listen on {}", path.display()))?;
    if let Some(gid) = ferry_api::auth::ferry_gid() {
        nix::unistd::chown(&path, None, Some(nix::unistd::Gid::from_raw(gid)))
            .with_context(|| format!("Give {} to the ferry group", path.display()))?;
        // The run dir must let the group reach the socket.
        std::fs::set_permissions(run_dir, std::fs::Permissions::from_mode(0o710))
            .with_context(|| format!("Open {} to the ferry group", run_dir.display()))?;
        nix::unistd::chown(run_dir, None, Some(nix::unistd::Gid::from_raw(gid)))
            .with_context(|| format!("Give {} to the ferry group", run_dir.display()))?;
    }
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("Set the rights of {}", path.display()))?;
    Ok(l)
}

/// Starts `ferry watchdog` for `run_dir` unless one runs; it outlives the daemon.
fn ensure_watchdog(
    run_dir: &std::path::Path,
    log: &std::path::Path,
    device: Option<&std::path::Path>,
) -> Result<()> {
    let pidfile = run_dir.join("watchdog.pid");
    let needle = run_dir.as_os_str().as_encoded_bytes().to_vec();
    let running = std::fs::read_to_string(&pidfile)
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok())
        .and_then(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).ok())
        .is_some_and(|c| {
            c.split(|b| *b == 0).any(|a| a == b"watchdog")
                && c.split(|b| *b == 0).any(|a| a == needle.as_slice())
        });
    if running {
        return Ok(());
    }
    std::fs::create_dir_all(run_dir).context("Create the run dir")?;
    let exe = std::env::current_exe().context("Find the ferry binary")?;
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(r#"log=$1; shift; setsid "$@" </dev/null >/dev/null 2>>"$log" & echo $!"#)
        .arg("sh")
        .arg(log)
        .arg(exe)
        .arg("watchdog")
        .arg("--run-dir")
        .arg(run_dir)
        .args(
            device
                .map(|d| vec![std::ffi::OsStr::new("--device"), d.as_os_str()])
                .unwrap_or_default(),
        )
        .output()
        .context("Start the watchdog")?;
    let pid = String::from_utf8_lossy(&out.stdout).trim().to_string();
    std::fs::write(&pidfile, &pid).context("Write the watchdog pidfile")?;
    tracing::info!(pid, "watchdog started");
    // Under systemd the watchdog outlives a restart of the daemon in a scope of its own.
    if let (true, Ok(p)) = (ferry_systemd::booted(), pid.parse::<i32>()) {
        let scope = ferry_systemd::Scope {
            unit: "ferry-watchdog.scope",
            slice: "ferry.slice",
            description: "ferry: the HA watchdog",
            before: &["ferry.service", "ferry-guests.service"],
        };
        if let Err(e) = ferry_systemd::move_to_scope(p, &scope) {
            tracing::error!(error = %e, "the watchdog stays in the daemon's cgroup: a restart of the daemon ends it");
        }
    }
    Ok(())
}

/// The daemon's log: to the journal with fields (`VM`, `TASK`, the target, the code
/// location) when systemd runs it with its output in the journal; as text otherwise.
fn init_logging() {
    use tracing_subscriber::prelude::*;
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| "info,tower_http=warn".into())
    };
    if ferry_systemd::journal_stream() {
        match tracing_journald::layer() {
            Ok(j) => {
                tracing_subscriber::registry()
                    .with(filter())
                    .with(
                        j.with_syslog_identifier("ferry".into())
                            // `VM=web1`, `TASK=…`: the fields as named in the code
                            .with_field_prefix(None),
                    )
                    .init();
                return;
            }
            Err(e) => eprintln!("ferry: no journal ({e}); logging as text"),
        }
    }
    tracing_subscriber::fmt().with_env_filter(filter()).init();
}

/// `man DIR`: one page per command and subcommand (`ferry-vm-create.1`).
fn man_pages(dir: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("Create {}", dir.display()))?;
    fn walk(cmd: &clap::Command, name: &str, dir: &std::path::Path) -> Result<()> {
        if cmd.is_hide_set() || cmd.get_name() == "help" {
            return Ok(());
        }
        let cmd = cmd.clone().name(name.to_string());
        let mut out = vec![];
        clap_mangen::Man::new(cmd.clone()).render(&mut out)?;
        std::fs::write(dir.join(format!("{name}.1")), out)?;
        for sub in cmd.get_subcommands() {
            walk(sub, &format!("{name}-{}", sub.get_name()), dir)?;
        }
        Ok(())
    }
    let mut cmd = Cli::command();
    cmd.build();
    walk(&cmd, "ferry", dir)
}

async fn serve(a: config::ServeArgs) -> Result<()> {
    config::check(&a)?;
    // Everything the daemon and its children (QEMU, etcd, the watchdog) write is theirs
    // alone: volumes, suspend files holding guest RAM, replica copies, logs, tokens.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    match ferry_agent::raise_fd_limit() {
        Ok((old, new)) if old != new => {
            tracing::info!(old, new, "raised the open-file limit")
        }
        Ok((_, n)) => tracing::info!(limit = n, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
    let lock = lock_state_dir(&a.state_dir)?;
    private_dir(&a.state_dir)?;
    private_dir(&a.run_dir)?;
    let host_name = a.host_name.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into())
    });
    let cluster_cfg = ferry_agent::load_cluster_config(&a.state_dir)?;
    // The host's certificate names its cluster address and the address it listens on.
    let mut addresses = vec![];
    if let Some(ip) = cluster_cfg.as_ref().and_then(|c| c.address.parse().ok()) {
        addresses.push(ip);
    }
    if !a.listen.ip().is_unspecified() && !addresses.contains(&a.listen.ip()) {
        addresses.push(a.listen.ip());
    }
    let pki = ferry_pki::HostPki::ensure(
        &a.state_dir.join(ferry_pki::PKI_DIR),
        &host_name,
        &addresses,
    )
    .context("Load this host's certificates")?;
    let admin_cert = match (&a.tls_cert, &a.tls_key) {
        (Some(c), Some(k)) => Some(
            ferry_pki::AdminCert::load(c, k)
                .context("Load the API's certificate (--tls-cert/--tls-key)")?,
        ),
        _ => None,
    };
    let cfg = AgentConfig {
        state_dir: a.state_dir.clone(),
        run_dir: a.run_dir.clone(),
        accel: a.accel,
        qemu_binary: a.qemu.clone(),
        host_name,
        pki: pki.clone(),
        cluster_file: a.cluster.clone(),
        api_port: a.listen.port(),
        resources: ferry_agent::HostResources {
            cpus: a.drs_cpus,
            memory_bytes: a.drs_memory.map(|b| b.0),
            labels: a.labels.clone(),
            cgroup_root: a.cgroup_root.clone(),
        },
        replication_port: a.replication_port,
        voter_replace_after: std::time::Duration::from_secs(a.voter_replace_after),
        file_restore_image: a.file_restore_image.clone(),
        boot_id_file: Some(a.boot_id_file.clone()),
        cpu_models: a.cpu_models.clone(),
    };
    let agent = match cluster_cfg {
        Some(cc) => {
            ensure_watchdog(
                &a.run_dir,
                &a.state_dir.join("cluster").join("watchdog.log"),
                a.hardware_watchdog.as_deref(),
            )?;
            let link = ferry_agent::connect_cluster(&a.state_dir, &a.run_dir, &cc, &pki)
                .await
                .context("Connect to the cluster's etcd")?;
            // Without quorum the store does not answer: wait for it.
            let mut tries = 0u32;
            loop {
                match Agent::open_in_cluster(cfg.clone(), link.clone()).await {
                    Ok(agent) => {
                        // The member record names this host's certificate as it is now.
                        if let Err(e) = agent.publish_own_cert().await {
                            tracing::warn!(error = %ferry_agent::error_chain(&e).join(": "), "cannot record this host's certificate");
                        }
                        break agent;
                    }
                    Err(e) => {
                        tries += 1;
                        if tries % 5 == 1 {
                            tracing::warn!(error = %ferry_agent::error_chain(&e).join(": "), "cluster store not ready; retrying");
                        }
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    }
                }
            }
        }
        None => {
            let store = ferry_store::SqliteStore::open(&a.state_dir.join("ferry.db"))
                .context("Open the state store")?;
            Agent::open(cfg, Arc::new(store))
                .await
                .context("Start the agent")?
        }
    };
    let (auth, made) =
        ferry_api::Auth::load_or_create(&a.state_dir).context("Load the admin token")?;
    agent
        .ensure_root(auth.token())
        .await
        .context("Record root and this host's admin token")?;
    let auth = auth.with_ticket_key(
        &agent
            .ticket_key()
            .await
            .context("Read the cluster's ticket key")?,
    );
    if made {
        // Never into a log: only where it is.
        println!(
            "ferry: admin token made (first start): read it from {} (root only)",
            a.state_dir.join(ferry_api::auth::TOKEN_FILE).display(),
        );
    }
    if !ferry_api::ui_built() {
        tracing::warn!("this binary has no web UI built in (scripts/setup.sh builds it)");
    }
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("Listen on {}", a.listen))?;
    let local = local_socket(&a.run_dir)?;
    let scheme = if a.plain_http { "http" } else { "https" };
    tracing::info!(listen = %a.listen, accel = %agent.accel(), "ferry serve: API ready");
    println!(
        "ferry: API on {scheme}://{} and {} (accel {}; CA fingerprint {})",
        a.listen,
        a.run_dir.join(SOCKET).display(),
        agent.accel(),
        pki.ca_fingerprint(),
    );
    let restart = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (r, ag) = (restart.clone(), agent.clone());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
            _ = ag.restart_requested() => {
                // Let the answer that asked for it reach the client first.
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                r.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        tracing::info!("stopping the daemon; VMs keep running");
        let _ = stop_tx.send(true);
    });
    // The first start in a new boot of the machine starts what the boot brings back.
    agent.boot();
    let app = ferry_api::router(agent, auth);
    let limits = ferry_api::serve::Limits::default();
    let tcp_stop = stop_rx.clone();
    let tcp_app = app.clone();
    let tcp = async move {
        let (app, stop_rx) = (tcp_app, tcp_stop);
        if a.plain_http {
            ferry_api::serve::serve(listener, app, limits, stop_rx).await
        } else {
            let tls = ferry_api::serve::TlsListener {
                tcp: listener,
                config: match &admin_cert {
                    Some(c) => pki.server_config_with(c),
                    None => pki.server_config(false),
                },
                timeout: limits.header_timeout,
            };
            ferry_api::serve::serve(tls, app, limits, stop_rx).await
        }
    };
    tokio::join!(tcp, ferry_api::serve::serve(local, app, limits, stop_rx));
    if restart.load(std::sync::atomic::Ordering::SeqCst) {
        use std::os::unix::process::CommandExt;
        drop(lock);
        tracing::info!("restarting the daemon on the new store");
        let e = std::process::Command::new("/proc/self/exe")
            .args(std::env::args_os().skip(1))
            .exec();
        return Err(e).context("Restart the daemon");
    }
    Ok(())
}
