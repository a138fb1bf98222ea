//! `ferry cluster init|join|leave|status`.

use crate::client::Client;
use crate::{print_json, table, ClusterCmd, Global};
use anyhow::{Context, Result};
use ferry_types::{ClusterConfig, ClusterStatus, HostState};
use reqwest::Method;
use serde_json::json;
use std::time::Duration;

pub async fn run(c: &Client, g: &Global, cmd: ClusterCmd) -> Result<()> {
    match cmd {
        ClusterCmd::Init {
            address,
            api,
            etcd,
            lease_ttl,
        } => {
            let body =
                json!({"address": address, "api": api, "etcd": etcd, "lease_ttl_s": lease_ttl});
            let cfg: ClusterConfig = c
                .request(Method::POST, "/api/v1/cluster/init", Some(&body))
                .await?;
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
            Ok(())
        }
        ClusterCmd::Join {
            peer,
            address,
            api,
            peer_token_file,
        } => {
            let peer_token =
                crate::client::read_secret(peer_token_file.as_deref(), "FERRY_PEER_TOKEN")?;
            let body = json!({"peer": peer, "address": address, "api": api, "token": peer_token});
            let cfg: ClusterConfig = c
                .request(Method::POST, "/api/v1/cluster/join", Some(&body))
                .await?;
            let st = wait_back(c, true).await?;
            if g.json {
                return print_json(&st);
            }
            println!("{} joined: {} members", cfg.name, st.members.len());
            Ok(())
        }
        ClusterCmd::Leave => {
            c.request::<serde_json::Value>(Method::POST, "/api/v1/cluster/leave", None)
                .await?;
            wait_back(c, false).await?;
            println!("left the cluster");
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
                        _ => "-",
                    }
                    .to_string(),
                    m.lease_ttl_left_s
                        .map(|s| format!("{s} s"))
                        .unwrap_or_else(|| "-".into()),
                    if m.ha_manager { "manager" } else { "" }.to_string(),
                ]);
            }
            println!("{t}");
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
