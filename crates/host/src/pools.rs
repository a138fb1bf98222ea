//! Storage pools and volumes through the store and `ferry-storage`.

use crate::error::{AgentError, Refusal, Result};
use crate::Host;
use ferry_storage::DirPool;
use ferry_store::StoreJson;
use ferry_types::{ByteSize, Pool, PoolKind, PoolSpec, Volume, VolumeCreate, VolumeImport};
use std::path::Path;

use ferry_store::keys::host::POOLS;

fn pool_key(name: &str) -> String {
    format!("{POOLS}{name}")
}

/// A volume's recorded backing chain as QEMU gets it.
pub fn backing_files(chain: Vec<ferry_storage::ChainLink>) -> Vec<ferry_qemu::BackingFile> {
    chain
        .into_iter()
        .map(|l| ferry_qemu::BackingFile {
            path: l.path,
            format: l.format,
        })
        .collect()
}

impl Host {
    pub async fn ensure_default_pool(&self) -> Result<()> {
        if self.inner.store.get(&pool_key("local")).await?.is_none() {
            let path = self.inner.cfg.state_dir.join("pools").join("local");
            let spec = PoolSpec {
                name: "local".into(),
                kind: PoolKind::Dir,
                path: path.display().to_string(),
                hosts: vec![],
            };
            DirPool::new("local", &path).ensure()?;
            self.inner
                .store
                .create_json(&pool_key("local"), &spec)
                .await?;
        }
        Ok(())
    }

    pub async fn dir_pool(&self, name: &str) -> Result<DirPool> {
        let spec = self.pool_spec(name).await?;
        match spec.kind {
            PoolKind::Dir | PoolKind::Shared => {
                Ok(DirPool::new(name, spec.path).using(self.inner.os.images()))
            }
            PoolKind::Replicated => Err(AgentError::refused(Refusal::Unsupported, format!(
                "pool {name} is replicated: its volumes are raw copies on {}, not files this operation can use",
                spec.hosts.join(", ")
            ))),
        }
    }

    pub async fn pool_spec(&self, name: &str) -> Result<PoolSpec> {
        match self
            .inner
            .store
            .get_json::<PoolSpec>(&pool_key(name))
            .await?
        {
            Some((spec, _)) => Ok(spec),
            None => Err(AgentError::NotFound(format!("Pool {name}"))),
        }
    }

    /// The replicated pool `name`, if it is one.
    pub async fn replicated_pool(&self, name: &str) -> Result<Option<PoolSpec>> {
        let spec = self.pool_spec(name).await?;
        Ok((spec.kind == PoolKind::Replicated).then_some(spec))
    }

    pub async fn pool_specs(&self) -> Result<Vec<PoolSpec>> {
        Ok(self.inner.store.list_json::<PoolSpec>(POOLS).await?)
    }

    /// The lock directory of pool `name` if it is shared (None for local pools).
    pub async fn pool_locks(&self, name: &str) -> Result<Option<ferry_storage::LockDir>> {
        match self
            .inner
            .store
            .get_json::<PoolSpec>(&pool_key(name))
            .await?
        {
            Some((spec, _)) => Ok(
                (spec.kind == PoolKind::Shared).then(|| ferry_storage::LockDir::new(&spec.path))
            ),
            None => Err(AgentError::NotFound(format!("Pool {name}"))),
        }
    }

    async fn pool_status(&self, spec: PoolSpec) -> Result<Pool> {
        if spec.kind == PoolKind::Replicated {
            let (capacity, available) = DirPool::new(&spec.name, self.copy_dir(&spec))
                .capacity()
                .unwrap_or((0, 0));
            let vols = self.list_volumes(&spec.name).await.unwrap_or_default();
            return Ok(Pool {
                spec,
                capacity_bytes: capacity,
                available_bytes: available,
                used_bytes: vols.iter().map(|v| v.allocated_bytes).sum(),
                volumes: vols.len(),
            });
        }
        let dp = self.dir_pool(&spec.name).await?;
        let (capacity, available) = dp.capacity()?;
        let vols = dp.list().await?;
        Ok(Pool {
            spec,
            capacity_bytes: capacity,
            available_bytes: available,
            used_bytes: vols.iter().map(|v| v.allocated_bytes).sum(),
            volumes: vols.len(),
        })
    }

    pub async fn list_pools(&self) -> Result<Vec<Pool>> {
        let mut out = vec![];
        for spec in self.inner.store.list_json::<PoolSpec>(POOLS).await? {
            out.push(self.pool_status(spec).await?);
        }
        Ok(out)
    }

    pub async fn get_pool(&self, name: &str) -> Result<Pool> {
        match self
            .inner
            .store
            .get_json::<PoolSpec>(&pool_key(name))
            .await?
        {
            Some((spec, _)) => self.pool_status(spec).await,
            None => Err(AgentError::NotFound(format!("Pool {name}"))),
        }
    }

    pub async fn create_pool(&self, spec: PoolSpec) -> Result<Pool> {
        spec.validate()?;
        if spec.kind == PoolKind::Replicated {
            return self.create_replicated_pool(spec).await;
        }
        self.define_pool(&spec).await?;
        self.get_pool(&spec.name).await
    }

    /// Stores a pool's definition on this host (and makes its directory where this
    /// host keeps files of it).
    pub async fn define_pool(&self, spec: &PoolSpec) -> Result<()> {
        spec.validate()?;
        let dir = self.copy_dir(spec);
        let p = dir.as_path();
        let keeps_files =
            spec.kind != PoolKind::Replicated || spec.hosts.iter().any(|h| h == self.host_name());
        if keeps_files {
            if p.exists() && !p.is_dir() {
                return Err(AgentError::invalid(
                    "path",
                    format!("{} exists and is not a directory", spec.path),
                ));
            }
            for other in self.inner.store.list_json::<PoolSpec>(POOLS).await? {
                if other.path == spec.path {
                    return Err(AgentError::refused(
                        Refusal::InUse,
                        format!("Pool {} already uses {}", other.name, spec.path),
                    ));
                }
            }
            DirPool::new(&spec.name, p).ensure()?;
        }
        if !self
            .inner
            .store
            .create_json(&pool_key(&spec.name), spec)
            .await?
        {
            return Err(AgentError::refused(
                Refusal::Exists,
                format!("Pool {} already exists", spec.name),
            ));
        }
        self.inner
            .events
            .emit(None, "pool", format!("pool {} created", spec.name));
        Ok(())
    }

    /// A replicated pool is defined on every host of the cluster (all or nothing), so
    /// any host can place and route its volumes; its hosts keep the copies.
    async fn create_replicated_pool(&self, spec: PoolSpec) -> Result<Pool> {
        self.replication()?;
        let hosts = self.cluster_hosts().await?;
        for h in &spec.hosts {
            if !hosts.iter().any(|c| &c.name == h) {
                return Err(AgentError::invalid(
                    "hosts",
                    format!("{h} is not a host of this cluster"),
                ));
            }
        }
        if self.pool_spec(&spec.name).await.is_ok() {
            return Err(AgentError::refused(
                Refusal::Exists,
                format!("Pool {} already exists", spec.name),
            ));
        }
        let mut done: Vec<String> = vec![];
        for h in &hosts {
            let r = if h.name == self.host_name() {
                self.define_pool(&spec).await
            } else {
                match self.peer(&h.name).await {
                    Ok(p) => p
                        .post::<serde_json::Value>("/api/v1/replication/pools", &spec)
                        .await
                        .map(|_| ()),
                    Err(e) => Err(e),
                }
            };
            if let Err(e) = r {
                for d in &done {
                    let _ = self.undefine_pool_on(d, &spec.name).await;
                }
                return Err(e);
            }
            done.push(h.name.clone());
        }
        self.get_pool(&spec.name).await
    }

    async fn undefine_pool_on(&self, host: &str, name: &str) -> Result<()> {
        if host == self.host_name() {
            self.inner.store.delete(&pool_key(name)).await?;
            return Ok(());
        }
        self.peer(host)
            .await?
            .post::<serde_json::Value>(
                &format!("/api/v1/replication/pools/{name}/delete"),
                &serde_json::json!({}),
            )
            .await
            .map(|_| ())
    }

    /// Host to host: removes a replicated pool's definition here.
    pub async fn undefine_pool(&self, name: &str) -> Result<()> {
        self.inner.store.delete(&pool_key(name)).await?;
        Ok(())
    }

    /// Removes a pool definition (its directory and files stay); refused while it holds
    /// volumes.
    pub async fn delete_pool(&self, name: &str) -> Result<()> {
        let pool = self.get_pool(name).await?;
        if pool.volumes > 0 {
            return Err(AgentError::refused(
                Refusal::InUse,
                format!("Pool {name} still holds {} volumes", pool.volumes),
            ));
        }
        if pool.spec.kind == PoolKind::Replicated {
            for h in self.cluster_hosts().await? {
                if let Err(e) = self.undefine_pool_on(&h.name, name).await {
                    tracing::warn!(host = %h.name, error = %e, "pool definition not removed there");
                }
            }
        }
        self.inner.store.delete(&pool_key(name)).await?;
        self.inner
            .events
            .emit(None, "pool", format!("pool {name} removed"));
        Ok(())
    }

    pub async fn list_volumes(&self, pool: &str) -> Result<Vec<Volume>> {
        if self.replicated_pool(pool).await?.is_some() {
            let mut out = vec![];
            for r in self.replica_records(pool).await? {
                out.push(self.replicated_volume_info(pool, &r.name).await?);
            }
            return Ok(out);
        }
        Ok(self.dir_pool(pool).await?.list().await?)
    }

    pub async fn get_volume(&self, pool: &str, name: &str) -> Result<Volume> {
        if self.replicated_pool(pool).await?.is_some() {
            return self.replicated_volume_info(pool, name).await;
        }
        Ok(self.dir_pool(pool).await?.info(name).await?)
    }

    pub async fn create_volume(&self, pool: &str, req: VolumeCreate) -> Result<Volume> {
        req.validate()?;
        if let Some(spec) = self.replicated_pool(pool).await? {
            if req
                .format
                .is_some_and(|f| f != ferry_types::DiskFormat::Raw)
            {
                return Err(AgentError::invalid(
                    "format",
                    "volumes of a replicated pool are raw (snapshots are not kept in them)",
                ));
            }
            let v = self
                .create_replicated_volume(&spec, &req.name, req.size.0)
                .await?;
            return Ok(v);
        }
        let v = self
            .dir_pool(pool)
            .await?
            .create(&req.name, req.size, req.format.unwrap_or_default())
            .await?;
        self.inner.events.emit(
            None,
            "volume",
            format!("volume {pool}/{} created", req.name),
        );
        Ok(v)
    }

    /// The VMs whose definition uses `pool/volume`.
    async fn volume_users(&self, pool: &str, volume: &str) -> Result<Vec<String>> {
        Ok(self
            .records()
            .await?
            .into_iter()
            .filter(|r| {
                r.spec
                    .disks
                    .iter()
                    .any(|d| d.pool == pool && d.volume.as_deref() == Some(volume))
                    || r.spec.cdroms.iter().any(|c| {
                        c.pool.as_deref() == Some(pool) && c.volume.as_deref() == Some(volume)
                    })
            })
            .map(|r| r.spec.name)
            .collect())
    }

    pub async fn delete_volume(&self, pool: &str, name: &str) -> Result<()> {
        let users = self.volume_users(pool, name).await?;
        if !users.is_empty() {
            return Err(AgentError::refused(
                Refusal::InUse,
                format!("Volume {pool}/{name} is used by VM {}", users.join(", ")),
            ));
        }
        if let Some(spec) = self.replicated_pool(pool).await? {
            self.delete_replicated_volume(&spec, name, true).await?;
        } else {
            self.dir_pool(pool).await?.delete(name).await?;
        }
        self.inner
            .events
            .emit(None, "volume", format!("volume {pool}/{name} deleted"));
        Ok(())
    }

    /// Grows a volume. A running VM's disk grows online (QMP `block_resize`).
    pub async fn resize_volume(&self, pool: &str, name: &str, size: ByteSize) -> Result<Volume> {
        if let Some(spec) = self.replicated_pool(pool).await? {
            return self.resize_replicated_volume(&spec, name, size.0).await;
        }
        let dp = self.dir_pool(pool).await?;
        for vm in self.volume_users(pool, name).await? {
            if let Some(node) = self.running_disk_node(&vm, pool, name).await {
                let cur = dp.info(name).await?;
                if size.0 < cur.virtual_bytes {
                    return Err(ferry_storage::StorageError::Shrink {
                        volume: format!("{pool}/{name}"),
                        from: cur.virtual_bytes,
                        to: size.0,
                    }
                    .into());
                }
                self.qmp(&vm)?
                    .run(&ferry_qmp::commands::BlockResize {
                        node_name: node,
                        size: size.0,
                    })
                    .await?;
                self.inner.events.emit(
                    Some(&vm),
                    "volume",
                    format!("disk {pool}/{name} grown online to {size}"),
                );
                return Ok(dp.info(name).await?);
            }
        }
        Ok(dp.resize(name, size).await?)
    }

    /// Imports a host file as a volume, as a task; returns the task id.
    pub async fn import_volume(&self, pool: &str, req: VolumeImport) -> Result<String> {
        req.validate()?;
        let dp = self.dir_pool(pool).await?;
        let src = Path::new(&req.source);
        if !src.is_file() {
            return Err(AgentError::invalid(
                "source",
                format!("{} is not a readable file", req.source),
            ));
        }
        if dp.volume_path(&req.name)?.exists() {
            return Err(AgentError::refused(
                Refusal::Exists,
                format!("Volume {pool}/{} already exists", req.name),
            ));
        }
        let agent = self.clone();
        let target = format!("{pool}/{}", req.name);
        let tgt = target.clone();
        Ok(self
            .inner
            .tasks
            .spawn("volume.import", &tgt, move |ctx| async move {
                ctx.log(format!("importing {} into {}", req.source, target));
                let c = ctx.clone();
                let v = dp
                    .import(&req.name, Path::new(&req.source), req.format, move |p| {
                        c.progress(p)
                    })
                    .await?;
                ctx.log(format!("{} bytes, format {}", v.virtual_bytes, v.format));
                agent
                    .inner
                    .events
                    .emit(None, "volume", format!("volume {target} imported"));
                Ok(())
            }))
    }

    /// Creates the new volumes a spec asks for (`size` without `volume`), naming them
    /// `vm-{id}-disk-{n}`; on failure removes those it made.
    pub async fn create_spec_volumes(
        &self,
        id: u32,
        spec: &mut ferry_types::VmSpec,
    ) -> Result<Vec<(String, String)>> {
        let mut made: Vec<(String, String)> = vec![];
        let mut n = 0;
        for i in 0..spec.disks.len() {
            if let Some(v) = spec.disks[i].volume.clone() {
                // An existing volume keeps the format recorded for it.
                if let Ok(None) = self.replicated_pool(&spec.disks[i].pool).await {
                    let dp = self.dir_pool(&spec.disks[i].pool).await?;
                    spec.disks[i].format = dp.meta(&v)?.format;
                }
                continue;
            }
            let d = spec.disks[i].clone();
            let size = d.size.unwrap_or(ByteSize::mib(1));
            match self.replicated_pool(&d.pool).await {
                Ok(Some(rp)) => {
                    let name = format!("vm-{id}-disk-{n}");
                    n += 1;
                    let r = if d.format != ferry_types::DiskFormat::Raw {
                        Err(AgentError::invalid(
                            "disks",
                            format!(
                                "disk {i}: pool {} is replicated; its volumes are raw (format raw)",
                                d.pool
                            ),
                        ))
                    } else {
                        self.create_replicated_volume(&rp, &name, size.0).await
                    };
                    match r {
                        Ok(_) => {
                            made.push((d.pool.clone(), name.clone()));
                            spec.disks[i].volume = Some(name);
                            continue;
                        }
                        Err(e) => {
                            self.remove_volumes(&made).await;
                            return Err(e);
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    self.remove_volumes(&made).await;
                    return Err(e);
                }
            }
            let dp = match self.dir_pool(&d.pool).await {
                Ok(p) => p,
                Err(e) => {
                    self.remove_volumes(&made).await;
                    return Err(e);
                }
            };
            let name = loop {
                let candidate = format!("vm-{id}-disk-{n}");
                n += 1;
                if !dp.volume_path(&candidate)?.exists() {
                    break candidate;
                }
            };
            match dp.create(&name, size, d.format).await {
                Ok(_) => {
                    made.push((d.pool.clone(), name.clone()));
                    spec.disks[i].volume = Some(name);
                }
                Err(e) => {
                    self.remove_volumes(&made).await;
                    return Err(e.into());
                }
            }
        }
        Ok(made)
    }

    pub async fn remove_volumes(&self, vols: &[(String, String)]) {
        for (pool, name) in vols {
            if let Ok(Some(rp)) = self.replicated_pool(pool).await {
                if let Err(e) = self.delete_replicated_volume(&rp, name, false).await {
                    tracing::warn!(pool, volume = name, error = %e, "cannot remove volume");
                }
                continue;
            }
            if let Ok(dp) = self.dir_pool(pool).await {
                if let Err(e) = dp.delete(name).await {
                    tracing::warn!(pool, volume = name, error = %e, "cannot remove volume");
                }
            }
        }
    }
}
