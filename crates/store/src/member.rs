//! Running an etcd member: its command line, starting it detached (it outlives a
//! restarting ferry daemon, like QEMU does), finding it again by pidfile, stopping it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum MemberError {
    #[error("Start etcd ({binary})")]
    Spawn {
        binary: String,
        #[source]
        source: std::io::Error,
    },
    #[error("etcd member {name} did not become healthy within {secs} s (log: {log})")]
    Unhealthy {
        name: String,
        secs: u64,
        log: String,
    },
}

/// One etcd member of the cluster.
#[derive(Debug, Clone)]
pub struct MemberConfig {
    pub name: String,
    pub data_dir: PathBuf,
    /// `https://ADDR:2379` (`http://` without TLS)
    pub client_url: String,
    /// `https://ADDR:2380` (`http://` without TLS)
    pub peer_url: String,
    /// `name=peer_url,...` of every member, this one included.
    pub initial_cluster: String,
    /// A new cluster (first member) or joining an existing one.
    pub new_cluster: bool,
    pub heartbeat_ms: u64,
    pub election_ms: u64,
    /// The database size at which etcd refuses writes (NOSPACE): set explicitly,
    /// [`crate::health::QUOTA_BYTES`] unless a test wants it small.
    pub quota_bytes: u64,
    /// TLS for clients and peers, both with certificates required: then the URLs are
    /// `https://`.
    pub tls: Option<MemberTls>,
}

/// The member's certificate files (the host's, from the cluster CA).
#[derive(Debug, Clone)]
pub struct MemberTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The revocation list, read by etcd at every handshake (it must exist: with
    /// the flag set and no file, etcd refuses every certificate).
    pub crl: Option<PathBuf>,
}

impl MemberConfig {
    pub fn argv(&self) -> Vec<String> {
        let mut client_listen = self.client_url.clone();
        if self.tls.is_none() && !self.client_url.contains("127.0.0.1") {
            // Local tools reach the member over loopback too.
            client_listen.push_str(",http://127.0.0.1:");
            client_listen.push_str(self.client_url.rsplit(':').next().unwrap_or("2379"));
        }
        let mut v = vec![
            format!("--name={}", self.name),
            format!("--data-dir={}", self.data_dir.display()),
            format!("--listen-client-urls={client_listen}"),
            format!("--advertise-client-urls={}", self.client_url),
            format!("--listen-peer-urls={}", self.peer_url),
            format!("--initial-advertise-peer-urls={}", self.peer_url),
            format!("--initial-cluster={}", self.initial_cluster),
            format!(
                "--initial-cluster-state={}",
                if self.new_cluster { "new" } else { "existing" }
            ),
            "--initial-cluster-token=ferry".into(),
            // A member returning from a partition must not depose the leader (its
            // higher term would force an election and stall every lease renewal).
            "--pre-vote=true".into(),
            format!("--heartbeat-interval={}", self.heartbeat_ms),
            format!("--election-timeout={}", self.election_ms),
            // History for watches resuming after a reconnect, no more: a day of it
            // filled the quota at a few hundred VMs.
            "--auto-compaction-mode=periodic".into(),
            format!(
                "--auto-compaction-retention={}m",
                crate::health::RETENTION.as_secs() / 60
            ),
            format!("--quota-backend-bytes={}", self.quota_bytes),
            "--logger=zap".into(),
            "--log-outputs=stderr".into(),
        ];
        if let Some(t) = &self.tls {
            // Clients and peers alike show a certificate of the cluster CA: no record
            // in the store, no address, lets anyone in.
            for (side, ca) in [("", "trusted-ca-file"), ("peer-", "peer-trusted-ca-file")] {
                v.push(format!("--{side}cert-file={}", t.cert.display()));
                v.push(format!("--{side}key-file={}", t.key.display()));
                v.push(format!("--{ca}={}", t.ca.display()));
                v.push(format!("--{side}client-cert-auth=true"));
            }
            if let Some(crl) = &t.crl {
                v.push(format!("--client-crl-file={}", crl.display()));
                v.push(format!("--peer-crl-file={}", crl.display()));
            }
            v.push("--cipher-suites=TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305".into());
        }
        v
    }
}

/// The flags of `cfg` that the running member `pid` lacks among those ferry may change
/// between versions (revocation list, quota, compaction): a member started by an
/// older ferry is restarted with them.
pub fn outdated_flags(pid: i32, cfg: &MemberConfig) -> Vec<String> {
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let running: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
    cfg.argv()
        .into_iter()
        .filter(|a| {
            [
                "--client-crl-file=",
                "--peer-crl-file=",
                "--quota-backend-bytes=",
                "--auto-compaction-mode=",
                "--auto-compaction-retention=",
            ]
            .iter()
            .any(|p| a.starts_with(p))
        })
        .filter(|a| !running.contains(&a.as_bytes()))
        .collect()
}

/// Starts etcd detached from the caller (own session, re-parented to init), output
/// appended to `log`; writes and returns its pid.
pub async fn spawn(
    binary: &str,
    cfg: &MemberConfig,
    log: &Path,
    pidfile: &Path,
) -> Result<i32, MemberError> {
    std::fs::create_dir_all(&cfg.data_dir).map_err(|source| MemberError::Spawn {
        binary: binary.into(),
        source,
    })?;
    let out = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(r#"log=$1; shift; setsid "$@" >>"$log" 2>&1 </dev/null & echo $!"#)
        .arg("sh")
        .arg(log)
        .arg(binary)
        .args(cfg.argv())
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|source| MemberError::Spawn {
            binary: binary.into(),
            source,
        })?;
    let pid: i32 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(|_| MemberError::Spawn {
            binary: binary.into(),
            source: std::io::Error::other("no pid from the shell"),
        })?;
    std::fs::write(pidfile, pid.to_string()).map_err(|source| MemberError::Spawn {
        binary: binary.into(),
        source,
    })?;
    // Under systemd the member leaves the daemon's cgroup: restarting the daemon
    // (`systemctl restart ferry`) must not end it.
    if ferry_systemd::booted() {
        let moved = tokio::task::spawn_blocking(move || {
            ferry_systemd::move_to_scope(
                pid,
                &ferry_systemd::Scope {
                    unit: "ferry-etcd.scope",
                    slice: "ferry.slice",
                    description: "ferry: this host's etcd member",
                    // it stops after the daemon and the VMs' shutdown, which write to it
                    before: &["ferry.service", "ferry-guests.service"],
                },
            )
        })
        .await;
        match moved {
            Ok(Ok(unit)) => tracing::info!(pid, %unit, "etcd member in its own scope"),
            Ok(Err(e)) => {
                tracing::error!(pid, error = %e, "etcd member left in the daemon's cgroup: a restart of the daemon ends it")
            }
            Err(e) => tracing::error!(pid, error = %e, "etcd member's scope"),
        }
    }
    Ok(pid)
}

/// The pid in `pidfile` if it is a live etcd on `data_dir`.
pub fn running(pidfile: &Path, data_dir: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(pidfile).ok()?.trim().parse().ok()?;
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let zombie = stat
        .rsplit_once(')')
        .and_then(|(_, r)| r.split_whitespace().next())
        .is_none_or(|s| s == "Z" || s == "X");
    let needle = format!("--data-dir={}", data_dir.display());
    let ours = cmd.split(|b| *b == 0).any(|a| a == needle.as_bytes());
    (ours && !zombie).then_some(pid)
}

/// Stops the member (SIGTERM, then SIGKILL after 5 s).
pub async fn stop(pidfile: &Path, data_dir: &Path) {
    let Some(pid) = running(pidfile, data_dir) else {
        return;
    };
    let p = nix::unistd::Pid::from_raw(pid);
    let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGTERM);
    for i in 0..100 {
        if running(pidfile, data_dir).is_none() {
            break;
        }
        if i == 50 {
            let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGKILL);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = std::fs::remove_file(pidfile);
}

/// Waits until the member answers on `client_url` with a leader.
pub async fn wait_healthy(
    name: &str,
    client_url: &str,
    tls: Option<&crate::etcd::EtcdTls>,
    log: &Path,
    timeout: Duration,
) -> Result<(), MemberError> {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        let opts = etcd_client::ConnectOptions::new()
            .with_require_leader(true)
            .with_timeout(Duration::from_secs(1))
            .with_connect_timeout(Duration::from_millis(500));
        let opts = crate::etcd::with_tls(opts, client_url, tls);
        if let Ok(mut c) = etcd_client::Client::connect([client_url], Some(opts)).await {
            if c.get("/ferry/health", None).await.is_ok() {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(MemberError::Unhealthy {
        name: name.into(),
        secs: timeout.as_secs(),
        log: log.display().to_string(),
    })
}

/// etcd's own check of who a client is: with auth on, a client's certificate CN is
/// its user name, and only hosts with a user (holding the root role) get anything. A
/// host that leaves loses its user, so its certificate (still signed by the CA) opens
/// nothing in etcd any more.
pub mod access {
    use etcd_client::{Client, Error, UserAddOptions};

    fn exists(e: &Error) -> bool {
        let s = e.to_string();
        s.contains("already exists") || s.contains("already granted")
    }

    /// A user for host `name` (no password: its certificate), with the root role.
    pub async fn admit(client: &mut Client, name: &str) -> Result<(), Error> {
        match client
            .user_add(name, "", Some(UserAddOptions::new().with_no_pwd()))
            .await
        {
            Ok(_) => {}
            Err(e) if exists(&e) => {}
            Err(e) => return Err(e),
        }
        match client.user_grant_role(name, "root").await {
            Ok(_) => Ok(()),
            Err(e) if exists(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Turns auth on with host `first` as its first user (and the `root` user etcd
    /// requires). Idempotent.
    pub async fn enable(client: &mut Client, first: &str) -> Result<(), Error> {
        match client.role_add("root").await {
            Ok(_) => {}
            Err(e) if exists(&e) => {}
            Err(e) => return Err(e),
        }
        admit(client, "root").await?;
        admit(client, first).await?;
        client.auth_enable().await.map(|_| ())
    }

    /// Takes host `name`'s user away.
    pub async fn revoke(client: &mut Client, name: &str) -> Result<(), Error> {
        match client.user_delete(name).await {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().contains("not found") => Ok(()),
            Err(e) => Err(e),
        }
    }
}
