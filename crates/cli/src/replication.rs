//! `ferry volume replication|promote|demote|verify|disconnect|connect|resolve`:
//! replicated volumes.

use crate::client::Client;
use crate::{print_json, table, Global, VolumeCmd};
use anyhow::Result;
use ferry_types::{
    ByteSize, GenId, PeerState, PromoteRequest, ReplicationStatus, ResolveRequest, VerifyReport,
};
use reqwest::Method;
use serde_json::Value;

pub async fn run(c: &Client, g: &Global, cmd: VolumeCmd) -> Result<()> {
    let base = |pool: &str, name: &str| format!("/api/v1/pools/{pool}/volumes/{name}/replication");
    match cmd {
        VolumeCmd::Replication { pool, name } => {
            let s: ReplicationStatus = c.get(&base(&pool, &name)).await?;
            if g.json {
                return print_json(&s);
            }
            print_status(&s);
            Ok(())
        }
        VolumeCmd::Promote { pool, name, force } => {
            let gen: GenId = c
                .send(
                    Method::POST,
                    &format!("{}/promote", base(&pool, &name)),
                    &PromoteRequest { force },
                )
                .await?;
            if g.json {
                return print_json(&gen);
            }
            println!("{pool}/{name}: primary here, generation {gen}");
            Ok(())
        }
        VolumeCmd::Demote { pool, name } => {
            let _: Value = c
                .request(
                    Method::POST,
                    &format!("{}/demote", base(&pool, &name)),
                    None,
                )
                .await?;
            println!("{pool}/{name}: no longer primary here");
            Ok(())
        }
        VolumeCmd::Verify { pool, name } => {
            let r: Vec<VerifyReport> = c
                .request(
                    Method::POST,
                    &format!("{}/verify", base(&pool, &name)),
                    None,
                )
                .await?;
            if g.json {
                return print_json(&r);
            }
            if r.is_empty() {
                println!("{pool}/{name}: no up-to-date peer to compare with");
            }
            for v in r {
                if v.differing.is_empty() {
                    println!(
                        "{pool}/{name}: identical on {} ({} compared)",
                        v.peer,
                        ByteSize(v.bytes_compared)
                    );
                } else {
                    println!(
                        "{pool}/{name}: {} chunks of {} differ on {} (offsets {:?}); marked for resync",
                        v.differing.len(),
                        ByteSize(v.chunk_bytes),
                        v.peer,
                        v.differing
                    );
                }
            }
            Ok(())
        }
        VolumeCmd::Disconnect { pool, name } => {
            let _: Value = c
                .request(
                    Method::POST,
                    &format!("{}/disconnect", base(&pool, &name)),
                    None,
                )
                .await?;
            println!("{pool}/{name}: replication switched off; the primary writes alone");
            Ok(())
        }
        VolumeCmd::Connect { pool, name } => {
            let _: Value = c
                .request(
                    Method::POST,
                    &format!("{}/connect", base(&pool, &name)),
                    None,
                )
                .await?;
            println!("{pool}/{name}: replication switched on; peers resync what they missed");
            Ok(())
        }
        VolumeCmd::Resolve { pool, name, keep } => {
            let s: ReplicationStatus = c
                .send(
                    Method::POST,
                    &format!("{}/resolve", base(&pool, &name)),
                    &ResolveRequest { keep: keep.clone() },
                )
                .await?;
            if g.json {
                return print_json(&s);
            }
            println!("{pool}/{name}: split brain resolved, the copy on {keep} kept");
            print_status(&s);
            Ok(())
        }
        _ => unreachable!("volume commands without replication are handled in lib.rs"),
    }
}

fn print_status(s: &ReplicationStatus) {
    let v = &s.volume;
    println!(
        "{}/{}: {} on {}, primary {}, generation {}{}{}",
        v.pool,
        v.name,
        ByteSize(v.size),
        v.hosts.join(", "),
        v.primary.as_deref().unwrap_or("none"),
        v.generation,
        if v.outdated.is_empty() {
            String::new()
        } else {
            format!(
                ", outdated: {}",
                v.outdated.iter().cloned().collect::<Vec<_>>().join(", ")
            )
        },
        if v.disconnected {
            ", replication switched off"
        } else {
            ""
        }
    );
    if let Some(sb) = &v.split_brain {
        println!("SPLIT BRAIN: {sb}");
        println!(
            "  nothing was discarded; keep one copy with: ferry volume resolve {} {} --keep HOST",
            v.pool, v.name
        );
    }
    let mut t = table(&["HOST", "ROLE", "GENERATION", "UP TO DATE", "PEERS"]);
    for r in &s.replicas {
        match &r.replica {
            Some(c) => {
                let peers: Vec<String> = c
                    .peers
                    .iter()
                    .map(|p| {
                        let state = match p.state {
                            PeerState::Connecting => "connecting",
                            PeerState::Syncing => "syncing",
                            PeerState::UpToDate => "up to date",
                            PeerState::StandAlone => "stand-alone",
                            PeerState::Refused => "refused",
                        };
                        let mut s = format!("{}: {state}", p.host);
                        if p.state == PeerState::Syncing && p.sync_total_bytes > 0 {
                            s.push_str(&format!(
                                " {}%",
                                p.sync_done_bytes * 100 / p.sync_total_bytes
                            ));
                        }
                        if p.out_of_sync_bytes > 0 {
                            s.push_str(&format!(", {} out of sync", ByteSize(p.out_of_sync_bytes)));
                        }
                        if let Some(r) = &p.reason {
                            s.push_str(&format!(" ({r})"));
                        }
                        s
                    })
                    .collect();
                t.add_row(vec![
                    r.host.clone(),
                    if c.primary { "primary" } else { "secondary" }.to_string(),
                    c.generation
                        .as_ref()
                        .map(|g| g.to_string())
                        .unwrap_or_else(|| "new".into()),
                    if c.uptodate { "yes" } else { "no" }.to_string(),
                    peers.join("; "),
                ]);
            }
            None => {
                t.add_row(vec![
                    r.host.clone(),
                    "?".into(),
                    "?".into(),
                    "?".into(),
                    r.error.clone().unwrap_or_default(),
                ]);
            }
        }
    }
    println!("{t}");
}
