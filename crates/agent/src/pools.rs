//! Storage pools and volumes through the store and `ferry-storage`.

use crate::error::{AgentError, Result};
use crate::Agent;
use ferry_storage::DirPool;
use ferry_store::StoreJson;
use ferry_types::{ByteSize, Pool, PoolKind, PoolSpec, Volume, VolumeCreate, VolumeImport};
use std::path::Path;

const POOLS: &str = "/pools/";

fn pool_key(name: &str) -> String {
    format!("{POOLS}{name}")
}

impl Agent {
    pub(crate) async fn ensure_default_pool(&self) -> Result<()> {
        if self.inner.store.get(&pool_key("local")).await?.is_none() {
            let path = self.inner.cfg.state_dir.join("pools").join("local");
            let spec = PoolSpec {
                name: "local".into(),
                kind: PoolKind::Dir,
                path: path.display().to_string(),
            };
            DirPool::new("local", &path).ensure()?;
            self.inner
                .store
                .create_json(&pool_key("local"), &spec)
                .await?;
        }
        Ok(())
    }

    pub(crate) async fn dir_pool(&self, name: &str) -> Result<DirPool> {
        match self
            .inner
            .store
            .get_json::<PoolSpec>(&pool_key(name))
            .await?
        {
            Some((spec, _)) => match spec.kind {
                PoolKind::Dir | PoolKind::Shared => Ok(DirPool::new(name, spec.path)),
            },
            None => Err(AgentError::NotFound(format!("Pool {name}"))),
        }
    }

    pub(crate) async fn pool_specs(&self) -> Result<Vec<PoolSpec>> {
        Ok(self.inner.store.list_json::<PoolSpec>(POOLS).await?)
    }

    /// The lock directory of pool `name` if it is shared (None for local pools).
    pub(crate) async fn pool_locks(&self, name: &str) -> Result<Option<ferry_storage::LockDir>> {
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
        let path = &spec.path;
        let p = Path::new(path);
        if p.exists() && !p.is_dir() {
            return Err(AgentError::invalid(
                "path",
                format!("{path} exists and is not a directory"),
            ));
        }
        for other in self.inner.store.list_json::<PoolSpec>(POOLS).await? {
            if &other.path == path {
                return Err(AgentError::Conflict(format!(
                    "Pool {} already uses {path}",
                    other.name
                )));
            }
        }
        DirPool::new(&spec.name, p).ensure()?;
        if !self
            .inner
            .store
            .create_json(&pool_key(&spec.name), &spec)
            .await?
        {
            return Err(AgentError::Conflict(format!(
                "Pool {} already exists",
                spec.name
            )));
        }
        self.inner
            .events
            .emit(None, "pool", format!("pool {} created", spec.name));
        self.get_pool(&spec.name).await
    }

    /// Removes a pool definition (its directory and files stay); refused while it holds
    /// volumes.
    pub async fn delete_pool(&self, name: &str) -> Result<()> {
        let pool = self.get_pool(name).await?;
        if pool.volumes > 0 {
            return Err(AgentError::Conflict(format!(
                "Pool {name} still holds {} volumes",
                pool.volumes
            )));
        }
        self.inner.store.delete(&pool_key(name)).await?;
        self.inner
            .events
            .emit(None, "pool", format!("pool {name} removed"));
        Ok(())
    }

    pub async fn list_volumes(&self, pool: &str) -> Result<Vec<Volume>> {
        Ok(self.dir_pool(pool).await?.list().await?)
    }

    pub async fn get_volume(&self, pool: &str, name: &str) -> Result<Volume> {
        Ok(self.dir_pool(pool).await?.info(name).await?)
    }

    pub async fn create_volume(&self, pool: &str, req: VolumeCreate) -> Result<Volume> {
        req.validate()?;
        let v = self
            .dir_pool(pool)
            .await?
            .create(&req.name, req.size, req.format)
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
            return Err(AgentError::Conflict(format!(
                "Volume {pool}/{name} is used by VM {}",
                users.join(", ")
            )));
        }
        self.dir_pool(pool).await?.delete(name).await?;
        self.inner
            .events
            .emit(None, "volume", format!("volume {pool}/{name} deleted"));
        Ok(())
    }

    /// Grows a volume. A running VM's disk grows online (QMP `block_resize`).
    pub async fn resize_volume(&self, pool: &str, name: &str, size: ByteSize) -> Result<Volume> {
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
                    .execute(
                        "block_resize",
                        Some(serde_json::json!({"node-name": node, "size": size.0})),
                    )
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
            return Err(AgentError::Conflict(format!(
                "Volume {pool}/{} already exists",
                req.name
            )));
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
    pub(crate) async fn create_spec_volumes(
        &self,
        id: u32,
        spec: &mut ferry_types::VmSpec,
    ) -> Result<Vec<(String, String)>> {
        let mut made: Vec<(String, String)> = vec![];
        let mut n = 0;
        for i in 0..spec.disks.len() {
            if spec.disks[i].volume.is_some() {
                continue;
            }
            let d = spec.disks[i].clone();
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
            let size = d.size.unwrap_or(ByteSize::mib(1));
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

    pub(crate) async fn remove_volumes(&self, vols: &[(String, String)]) {
        for (pool, name) in vols {
            if let Ok(dp) = self.dir_pool(pool).await {
                if let Err(e) = dp.delete(name).await {
                    tracing::warn!(pool, volume = name, error = %e, "cannot remove volume");
                }
            }
        }
    }
}
