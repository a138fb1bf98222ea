//! `ferry pool ...` and `ferry volume ...`: storage pools and their volumes.

use super::*;
use ferry_types::{DiskFormat, PoolKind, PoolSpec, VolumeCreate, VolumeImport, VolumeResize};

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
        #[arg(long = "type", value_enum, default_value_t = PoolKind::Dir)]
        kind: PoolKind,
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
        format: Option<DiskFormat>,
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
        format: Option<DiskFormat>,
    },
    /// Upload an image or ISO from this machine (streamed; checked and converted like
    /// import). --resume goes on with an upload that broke off.
    Upload {
        pool: String,
        name: String,
        #[arg(long)]
        file: std::path::PathBuf,
        /// Convert to qcow2 or raw.
        #[arg(long)]
        format: Option<DiskFormat>,
        #[arg(long)]
        resume: bool,
    },
    /// Have the daemon fetch an image or ISO from an http(s) URL into the pool.
    Download {
        pool: String,
        name: String,
        #[arg(long)]
        url: String,
        /// The file's SHA-256 (hex): refused when it differs.
        #[arg(long)]
        sha256: Option<String>,
        #[arg(long)]
        format: Option<DiskFormat>,
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

pub(crate) async fn pool(c: &Client, g: &Global, cmd: PoolCmd) -> Result<()> {
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
            let body = PoolSpec {
                name: name.clone(),
                kind,
                path: path.clone(),
                hosts: hosts.clone(),
            };
            let p: Pool = c.send(Method::POST, "/api/v1/pools", &body).await?;
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

fn show(v: &Volume) {
    println!(
        "{}/{}: {} {} ({} allocated)",
        v.pool,
        v.name,
        v.format,
        ByteSize(v.virtual_bytes),
        ByteSize(v.allocated_bytes)
    )
}

pub(crate) async fn volume(c: &Client, g: &Global, cmd: VolumeCmd) -> Result<()> {
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
                .send(
                    Method::POST,
                    &format!("/api/v1/pools/{pool}/volumes"),
                    &VolumeCreate { name, size, format },
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
                .send(
                    Method::POST,
                    &format!("/api/v1/pools/{pool}/volumes/{name}/resize"),
                    &VolumeResize { size },
                )
                .await?;
            if g.json {
                return print_json(&v);
            }
            show(&v);
            Ok(())
        }
        VolumeCmd::Upload {
            pool,
            name,
            file,
            format,
            resume,
        } => {
            let path = format!("/api/v1/pools/{pool}/upload/{name}");
            let offset = if resume {
                let s: ferry_types::UploadStatus = c.get(&path).await?;
                s.received
            } else {
                0
            };
            let mut q = vec![("offset", offset.to_string()), ("last", "true".into())];
            if let Some(f) = format {
                q.push(("format", f.as_str().into()));
            }
            let s: ferry_types::UploadStatus = c.put_file(&path, &q, &file, offset).await?;
            let task = s
                .task
                .ok_or_else(|| anyhow::anyhow!("the daemon started no import"))?;
            volume_made(c, g, TaskAccepted { task }, &pool, &name).await
        }
        VolumeCmd::Download {
            pool,
            name,
            url,
            sha256,
            format,
        } => {
            let body = ferry_types::VolumeDownload {
                name: name.clone(),
                url,
                format,
                sha256,
            };
            let t: TaskAccepted = c
                .send(
                    Method::POST,
                    &format!("/api/v1/pools/{pool}/download"),
                    &body,
                )
                .await?;
            volume_made(c, g, t, &pool, &name).await
        }
        VolumeCmd::Import {
            pool,
            name,
            source,
            format,
        } => {
            let body = VolumeImport {
                name: name.clone(),
                source,
                format,
            };
            let t: TaskAccepted = c
                .send(Method::POST, &format!("/api/v1/pools/{pool}/import"), &body)
                .await?;
            volume_made(c, g, t, &pool, &name).await
        }
        other => replication::run(c, g, other).await,
    }
}

/// Waits for the task that makes `pool/name`, then shows the volume.
async fn volume_made(
    c: &Client,
    g: &Global,
    t: TaskAccepted,
    pool: &str,
    name: &str,
) -> Result<()> {
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
