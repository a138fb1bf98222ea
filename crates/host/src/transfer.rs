//! Images and ISOs brought into a pool over the network: uploaded by a client in pieces
//! (each appended to a partial file, so a broken upload goes on where it stopped) or
//! fetched by the daemon from a URL. Either way the file is then imported like any
//! image — its format sniffed and checked, a backing file or a descriptor naming other
//! files refused — and the partial file goes. Sizes are bounded by the pool's free
//! space; one writer per upload (an exclusive `flock` on its partial file).

use crate::error::{AgentError, Failure, Refusal, Result};
use crate::Host;
use ferry_storage::DirPool;
use ferry_types::{DiskFormat, VolumeDownload};
use nix::fcntl::{Flock, FlockArg};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Room an upload or download leaves free in its pool.
const RESERVE: u64 = 64 << 20;
/// Debian's bundle of the CAs HTTPS downloads are checked against.
const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

fn io(what: String) -> impl FnOnce(std::io::Error) -> AgentError {
    move |source| AgentError::Io { what, source }
}

/// An upload's partial file, held exclusively while a piece is written.
pub struct UploadFile {
    _lock: Flock<std::fs::File>,
    pub file: tokio::fs::File,
    pub path: PathBuf,
    /// How many more bytes the pool takes.
    pub room: u64,
}

fn open_locked(path: &Path, truncate: bool) -> std::io::Result<Flock<std::fs::File>> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    let locked = Flock::lock(f, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        if e == nix::errno::Errno::EWOULDBLOCK {
            std::io::Error::new(
                std::io::ErrorKind::WouldBlock,
                "another upload to this volume is under way",
            )
        } else {
            e.into()
        }
    })?;
    if truncate {
        locked.set_len(0)?;
    }
    Ok(locked)
}

impl Host {
    async fn transfer_pool(&self, pool: &str, volume: &str) -> Result<DirPool> {
        let dp = self.dir_pool(pool).await?;
        if dp.volume_path(volume)?.exists() {
            return Err(AgentError::refused(
                Refusal::Exists,
                format!("Volume {pool}/{volume} already exists"),
            ));
        }
        Ok(dp)
    }

    fn room(dp: &DirPool) -> Result<u64> {
        Ok(dp.capacity()?.1.saturating_sub(RESERVE))
    }

    /// How many bytes of an upload to `pool/volume` the daemon holds.
    pub async fn upload_received(&self, pool: &str, volume: &str) -> Result<u64> {
        let dp = self.transfer_pool(pool, volume).await?;
        let p = dp.partial_path(volume, "upload")?;
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.is_file() => Ok(m.len()),
            Ok(_) => Err(AgentError::failed(
                Failure::Untrusted,
                format!("{} is not a file", p.display()),
            )),
            Err(_) => Ok(0),
        }
    }

    /// Opens the upload to `pool/volume` for a piece starting at `offset` (0: start
    /// over; else exactly what was received).
    pub async fn upload_piece(&self, pool: &str, volume: &str, offset: u64) -> Result<UploadFile> {
        let dp = self.transfer_pool(pool, volume).await?;
        let path = dp.partial_path(volume, "upload")?;
        let lock = open_locked(&path, offset == 0).map_err(|e| {
            if e.kind() == std::io::ErrorKind::WouldBlock {
                AgentError::refused(Refusal::Busy, format!("{pool}/{volume}: {e}"))
            } else {
                io(format!("Open {}", path.display()))(e)
            }
        })?;
        let have = lock
            .metadata()
            .map_err(io(format!("Stat {}", path.display())))?
            .len();
        if have != offset {
            return Err(AgentError::refused(
                Refusal::Busy,
                format!("the upload to {pool}/{volume} holds {have} bytes: send from offset {have} (or 0 to start over)"),
            ));
        }
        let mut file = tokio::fs::File::from_std(
            lock.try_clone()
                .map_err(io(format!("Open {}", path.display())))?,
        );
        use tokio::io::AsyncSeekExt;
        file.seek(std::io::SeekFrom::Start(offset))
            .await
            .map_err(io(format!("Seek {}", path.display())))?;
        Ok(UploadFile {
            _lock: lock,
            file,
            room: Self::room(&dp)?,
            path,
        })
    }

    /// Imports a finished upload as a task (the partial file goes either way).
    pub async fn upload_finish(
        &self,
        pool: &str,
        volume: &str,
        format: Option<DiskFormat>,
    ) -> Result<String> {
        let dp = self.transfer_pool(pool, volume).await?;
        let path = dp.partial_path(volume, "upload")?;
        let lock = open_locked(&path, false)
            .map_err(|e| AgentError::refused(Refusal::Busy, format!("{pool}/{volume}: {e}")))?;
        let host = self.clone();
        let (volume, target) = (volume.to_string(), format!("{pool}/{volume}"));
        Ok(self
            .inner
            .tasks
            .spawn("volume.upload", &target.clone(), move |ctx| async move {
                let c = ctx.clone();
                let r = dp
                    .import(&volume, &path, format, move |p| c.progress(p))
                    .await;
                host.finish_transfer(
                    &ctx,
                    lock,
                    &path,
                    r.map_err(AgentError::from),
                    &target,
                    "uploaded",
                )
            }))
    }

    /// The end of an upload's or download's task: the partial file goes, the outcome is
    /// logged.
    fn finish_transfer(
        &self,
        ctx: &crate::tasks::TaskCtx,
        lock: Flock<std::fs::File>,
        path: &Path,
        imported: Result<ferry_types::Volume>,
        target: &str,
        what: &str,
    ) -> Result<()> {
        // gone before the lock is: no other writer opens it meanwhile
        let _ = std::fs::remove_file(path);
        drop(lock);
        let v = imported?;
        ctx.log(format!("{} bytes, format {}", v.virtual_bytes, v.format));
        self.inner
            .events
            .emit(None, "volume", format!("volume {target} {what}"));
        Ok(())
    }

    /// Drops an unfinished upload.
    pub async fn upload_discard(&self, pool: &str, volume: &str) -> Result<()> {
        let dp = self.transfer_pool(pool, volume).await?;
        let path = dp.partial_path(volume, "upload")?;
        let _lock = open_locked(&path, false)
            .map_err(|e| AgentError::refused(Refusal::Busy, format!("{pool}/{volume}: {e}")))?;
        std::fs::remove_file(&path).map_err(io(format!("Remove {}", path.display())))
    }

    /// Fetches `req.url` into the pool and imports it, as a task.
    pub async fn download_volume(&self, pool: &str, req: VolumeDownload) -> Result<String> {
        req.validate()?;
        let dp = self.transfer_pool(pool, &req.name).await?;
        let path = dp.partial_path(&req.name, "download")?;
        let lock = open_locked(&path, true)
            .map_err(|e| AgentError::refused(Refusal::Busy, format!("{pool}/{}: {e}", req.name)))?;
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(30))
            .read_timeout(Duration::from_secs(60))
            .redirect(reqwest::redirect::Policy::custom(|a| {
                // never from https down to http, at most 5 hops
                let down = a.previous().iter().any(|u| u.scheme() == "https")
                    && a.url().scheme() != "https";
                if down {
                    a.error("a redirect from https to http")
                } else if a.previous().len() >= 5 {
                    a.error("more than 5 redirects")
                } else {
                    a.follow()
                }
            }))
            .user_agent(concat!("ferry/", env!("CARGO_PKG_VERSION")));
        if let Ok(pem) = std::fs::read(CA_BUNDLE) {
            for c in reqwest::Certificate::from_pem_bundle(&pem).unwrap_or_default() {
                builder = builder.add_root_certificate(c);
            }
        }
        let client = builder
            .build()
            .map_err(|e| AgentError::failed(Failure::Internal, format!("HTTP client: {e}")))?;
        let room = Self::room(&dp)?;
        let host = self.clone();
        let target = format!("{pool}/{}", req.name);
        Ok(self
            .inner
            .tasks
            .spawn("volume.download", &target.clone(), move |ctx| async move {
                ctx.log(format!("fetching {}", req.url));
                let file = lock
                    .try_clone()
                    .map_err(io(format!("Open {}", path.display())));
                let fetched = match file {
                    Ok(f) => fetch(&client, &req, tokio::fs::File::from_std(f), room, &ctx).await,
                    Err(e) => Err(e),
                };
                let r = match fetched {
                    Ok(n) => {
                        ctx.log(format!("{n} bytes received"));
                        let c = ctx.clone();
                        dp.import(&req.name, &path, req.format, move |p| {
                            c.progress(0.5 + p / 2.0)
                        })
                        .await
                        .map_err(AgentError::from)
                    }
                    Err(e) => Err(e),
                };
                host.finish_transfer(&ctx, lock, &path, r, &target, "downloaded")
            }))
    }
}

/// The body of `req.url` into `out`, at most `room` bytes, its SHA-256 checked.
async fn fetch(
    client: &reqwest::Client,
    req: &VolumeDownload,
    mut out: tokio::fs::File,
    room: u64,
    ctx: &crate::tasks::TaskCtx,
) -> Result<u64> {
    use futures::StreamExt;
    use sha2::Digest;
    use tokio::io::AsyncWriteExt;
    let bad = |m: String| AgentError::invalid("url", m);
    let resp = client
        .get(&req.url)
        .send()
        .await
        .map_err(|e| bad(format!("{}: {e}", req.url)))?;
    if !resp.status().is_success() {
        return Err(bad(format!("{} answered {}", req.url, resp.status())));
    }
    let len = resp.content_length();
    if len.is_some_and(|l| l > room) {
        return Err(bad(format!(
            "{} is {} bytes; the pool has room for {room}",
            req.url,
            len.unwrap_or(0)
        )));
    }
    let mut hash = sha2::Sha256::new();
    let mut got = 0u64;
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| bad(format!("{}: {e}", req.url)))?;
        got += chunk.len() as u64;
        if got > room || len.is_some_and(|l| got > l) {
            return Err(bad(format!(
                "{} sent more than it may ({got} bytes)",
                req.url
            )));
        }
        hash.update(&chunk);
        out.write_all(&chunk)
            .await
            .map_err(io("Write the download".into()))?;
        if let Some(l) = len.filter(|l| *l > 0) {
            ctx.progress(got as f32 / l as f32 / 2.0);
        }
    }
    if len.is_some_and(|l| got != l) {
        return Err(bad(format!(
            "{} ended after {got} of {} bytes",
            req.url,
            len.unwrap_or(0)
        )));
    }
    out.sync_all()
        .await
        .map_err(io("Sync the download".into()))?;
    if let Some(want) = &req.sha256 {
        let have: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
        if have != want.to_ascii_lowercase() {
            return Err(AgentError::invalid(
                "sha256",
                format!("the download's SHA-256 is {have}, not {want}"),
            ));
        }
    }
    Ok(got)
}
