//! `ferry cluster init|join|leave|status`.

use crate::client::Client;
use crate::{print_json, table, CertsCmd, ClusterCmd, Global};
use anyhow::{Context, Result};
use ferry_types::{
    CertStatus, ClusterConfig, ClusterInit, ClusterJoin, ClusterStatus, HostState, JoinToken,
    JoinTokenRequest,
};
use reqwest::Method;
use std::time::Duration;

pub async fn run(c: &Client, g: &Global, cmd: ClusterCmd) -> Result<()> {
    match cmd {
        ClusterCmd::Init {
            address,
            api,
            etcd,
            lease_ttl,
        } => {
            let body = ClusterInit {
                address,
                api,
                etcd,
                lease_ttl_s: lease_ttl,
            };
            let cfg: ClusterConfig = c.send(Method::POST, "/api/v1/cluster/init", &body).await?;
            let st = wait_back(c, true).await?;
            if g.json {
                return print_json(&st);
            }
            println!(
                "cluster founded on {} ({}); etcd at {}; lease TTL {} s",
                cfg.name,
                cfg.address,
                cfg.endpoints.join(","),
                cfg.lease_ttl_s
            );
            println!("CA fingerprint: {}", cfg.ca_fingerprint);
            Ok(())
        }
        ClusterCmd::Join {
            peer,
            address,
            api,
            fingerprint,
            join_token_file,
        } => {
            let Some(join_token) =
                crate::client::read_secret(join_token_file.as_deref(), "FERRY_JOIN_TOKEN")?
            else {
                anyhow::bail!(
                    "give the join token: --join-token-file FILE (or -) or FERRY_JOIN_TOKEN (ferry cluster join-token on a member makes one)"
                );
            };
            let body = ClusterJoin {
                peer,
                address,
                api,
                fingerprint,
                join_token,
            };
            let cfg: ClusterConfig = c.send(Method::POST, "/api/v1/cluster/join", &body).await?;
            let st = wait_back(c, true).await?;
            if g.json {
                return print_json(&st);
            }
            println!("{} joined: {} members", cfg.name, st.members.len());
            Ok(())
        }
        ClusterCmd::JoinToken { ttl } => {
            let t: JoinToken = c
                .send(
                    Method::POST,
                    "/api/v1/cluster/join-tokens",
                    &JoinTokenRequest { ttl_s: Some(ttl) },
                )
                .await?;
            if g.json {
                return print_json(&t);
            }
            println!("join token:      {}", t.token);
            println!("CA fingerprint:  {}", t.ca_fingerprint);
            println!("valid once, for {} s. On the new host:", t.expires_in_s);
            println!(
                "  ferry cluster join MEMBER --address ITS-ADDRESS --fingerprint {} --join-token-file FILE",
                t.ca_fingerprint
            );
            Ok(())
        }
        ClusterCmd::Certs(CertsCmd::Status) => {
            let st: CertStatus = c.get("/api/v1/cluster/certs").await?;
            if g.json {
                return print_json(&st);
            }
            println!("cluster CA:      {}", st.ca.subject);
            println!("CA fingerprint:  {}", st.ca.fingerprint);
            println!("CA valid until:  {}", st.ca.not_after);
            println!("host:            {}", st.host.subject);
            println!("names:           {}", st.host.names.join(", "));
            println!(
                "valid until:     {} ({} days left)",
                st.host.not_after, st.host_days_left
            );
            println!(
                "CA key held here: {}",
                if st.ca_key_here { "yes" } else { "no" }
            );
            if let Some(n) = st.crl_number {
                println!(
                    "revocation list: number {n}, {} certificate(s) revoked",
                    st.revoked.len()
                );
            }
            for w in &st.warnings {
                println!("warning: {w}");
            }
            Ok(())
        }
        ClusterCmd::Certs(CertsCmd::Renew) => {
            let st: CertStatus = c
                .request(Method::POST, "/api/v1/cluster/certs/renew", None)
                .await?;
            // The daemon restarts on the new certificate.
            tokio::time::sleep(Duration::from_secs(1)).await;
            for _ in 0..120 {
                if c.get::<ClusterStatus>("/api/v1/cluster/status")
                    .await
                    .is_ok()
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            if g.json {
                return print_json(&st);
            }
            println!(
                "new certificate for {}: valid until {} (serial {})",
                st.host.names.join(", "),
                st.host.not_after,
                st.host.serial
            );
            Ok(())
        }
        ClusterCmd::Leave => {
            c.request::<serde_json::Value>(Method::POST, "/api/v1/cluster/leave", None)
                .await?;
            wait_back(c, false).await?;
            println!("left the cluster");
            Ok(())
        }
        ClusterCmd::Remove { host, force } => {
            let r: ferry_types::MemberRemoved = c
                .request(
                    Method::DELETE,
                    &format!("/api/v1/cluster/members/{host}?force={force}"),
                    None,
                )
                .await?;
            if g.json {
                return print_json(&r);
            }
            println!("{host} removed from the cluster; its certificate is revoked");
            if !r.dropped_vms.is_empty() {
                println!("records dropped of VMs {}", r.dropped_vms.join(", "));
            }
            Ok(())
        }
        ClusterCmd::Status => {
            let st: ClusterStatus = c.get("/api/v1/cluster/status").await?;
            if g.json {
                return print_json(&st);
            }
            if !st.clustered {
                println!("{} is not in a cluster (ferry cluster init|join)", st.name);
                return Ok(());
            }
            println!(
                "etcd: {} voters, quorum {} ({}); HA manager: {}; lease TTL {} s",
                st.etcd_voters,
                st.quorum,
                if st.has_quorum { "ok" } else { "LOST" },
                st.ha_manager.as_deref().unwrap_or("none"),
                st.lease_ttl_s
            );
            let mut t = table(&["HOST", "ADDRESS", "STATE", "ETCD", "LEASE", "HA"]);
            for m in &st.members {
                t.add_row(vec![
                    m.name.clone(),
                    m.address.clone(),
                    match m.state {
                        HostState::Online => "online",
                        HostState::Maintenance => "maintenance",
                        HostState::Fenced => "fenced",
                        HostState::Offline => "offline",
                    }
                    .to_string(),
                    match (m.etcd_member, m.etcd_leader) {
                        (true, true) => "leader",
                        (true, false) => "voter",
                        _ => "client",
                    }
                    .to_string(),
                    m.lease_ttl_left_s
                        .map(|s| format!("{s} s"))
                        .unwrap_or_else(|| "-".into()),
                    if m.ha_manager { "manager" } else { "" }.to_string(),
                ]);
            }
            println!("{t}");
            if let Some(e) = &st.etcd {
                let mib = |b: u64| format!("{:.1} MiB", b as f64 / 1048576.0);
                let sizes: Vec<String> = e
                    .members
                    .iter()
                    .map(|m| match &m.error {
                        Some(err) => format!("{}: unreachable ({err})", m.name),
                        None => format!(
                            "{} {} ({} in use)",
                            m.name,
                            mib(m.db_size_bytes),
                            mib(m.db_in_use_bytes)
                        ),
                    })
                    .collect();
                println!(
                    "etcd database: {}; quota {}; revision {}; alarms: {}",
                    sizes.join(", "),
                    e.quota_bytes.map_or("unknown".into(), mib),
                    e.revision,
                    if e.alarms.is_empty() {
                        "none".to_string()
                    } else {
                        e.alarms.join(", ")
                    }
                );
            }
            for w in &st.warnings {
                println!("warning: {w}");
            }
            Ok(())
        }
    }
}

/// The daemon restarts on its new store: wait until it answers with the expected state.
async fn wait_back(c: &Client, clustered: bool) -> Result<ClusterStatus> {
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut last = None;
    for _ in 0..120 {
        match c.get::<ClusterStatus>("/api/v1/cluster/status").await {
            Ok(st) if st.clustered == clustered => return Ok(st),
            Ok(_) => {}
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no answer")))
        .context("the daemon did not come back after its restart")
}
