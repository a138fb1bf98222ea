//! The `dir` pool: volumes are files directly in one directory.

use crate::meta::{self, ChainLink, VolumeMeta};
use crate::qemu_img::{self, ImageTool, ImgOp, QemuImg};
use crate::source;
use crate::StorageError;
use ferry_types::validate::check_name;
use ferry_types::{ByteSize, DiskFormat, ValidationErrors, Volume};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct DirPool {
    pub name: String,
    pub path: PathBuf,
    /// What runs `qemu-img` (the real program unless [`DirPool::using`] says).
    tool: Arc<dyn ImageTool>,
}

/// Files being written get this prefix and are never listed as volumes.
const PARTIAL: &str = ".partial-";

impl DirPool {
    pub fn new(name: impl Into<String>, path: impl Into<PathBuf>) -> DirPool {
        DirPool {
            name: name.into(),
            path: path.into(),
            tool: Arc::new(QemuImg),
        }
    }

    /// The same pool, its images made by `tool`.
    pub fn using(mut self, tool: Arc<dyn ImageTool>) -> DirPool {
        self.tool = tool;
        self
    }

    /// What runs `qemu-img` for this pool.
    pub fn tool(&self) -> &dyn ImageTool {
        &*self.tool
    }

    /// Creates the directory if it is missing.
    pub fn ensure(&self) -> Result<(), StorageError> {
        std::fs::create_dir_all(&self.path).map_err(|source| StorageError::PoolDir {
            path: self.path.display().to_string(),
            source,
        })
    }

    /// The file of volume `name`; refuses any name that could leave the pool.
    pub fn volume_path(&self, name: &str) -> Result<PathBuf, StorageError> {
        let mut e = ValidationErrors::default();
        check_name(&mut e, "volume", name);
        e.into_result()?;
        Ok(self.path.join(name))
    }

    fn existing(&self, name: &str) -> Result<PathBuf, StorageError> {
        let p = self.volume_path(name)?;
        if !p.is_file() {
            return Err(StorageError::NotFound(format!("{}/{name}", self.name)));
        }
        Ok(p)
    }

    pub async fn create(
        &self,
        name: &str,
        size: ByteSize,
        format: DiskFormat,
    ) -> Result<Volume, StorageError> {
        let p = self.volume_path(name)?;
        if p.exists() {
            return Err(StorageError::Exists(format!("{}/{name}", self.name)));
        }
        let tmp = self.path.join(format!("{PARTIAL}{name}"));
        meta::write(&self.path, name, &VolumeMeta::plain(format))?;
        let op = ImgOp::Create {
            path: &tmp,
            format: format.as_str(),
            size: size.0,
        };
        let r = self.tool.run(op, &mut |_| {}).await;
        if let Err(e) = r {
            let _ = std::fs::remove_file(&tmp);
            meta::remove(&self.path, name);
            return Err(e);
        }
        self.publish(&tmp, &p, name)?;
        self.info(name).await
    }

    /// What ferry recorded of a volume: its format and the volume it is an overlay on.
    pub fn meta(&self, name: &str) -> Result<VolumeMeta, StorageError> {
        self.existing(name)?;
        meta::read(&self.path, name)
    }

    /// The files under a volume, nearest first, as QEMU must open them: the volumes it
    /// is an overlay on, each with its recorded format (empty for a volume of its own).
    pub fn chain(&self, name: &str) -> Result<Vec<ChainLink>, StorageError> {
        let mut out: Vec<ChainLink> = vec![];
        let mut seen = vec![name.to_string()];
        let mut next = self.meta(name)?.backing;
        while let Some(b) = next {
            if seen.contains(&b) || out.len() >= meta::MAX_CHAIN {
                return Err(StorageError::Meta {
                    path: meta::path(&self.path, name).display().to_string(),
                    reason: format!("backing chain loops or is deeper than {}", meta::MAX_CHAIN),
                });
            }
            let m = self.meta(&b)?;
            out.push(ChainLink {
                path: self.volume_path(&b)?,
                format: m.format,
            });
            seen.push(b);
            next = m.backing;
        }
        Ok(out)
    }

    /// Moves a finished file into place; fails (and removes it) if the name got taken.
    /// Its record was written before: a file in place never lacks one.
    fn publish(&self, tmp: &Path, p: &Path, name: &str) -> Result<(), StorageError> {
        let r = std::fs::hard_link(tmp, p);
        let _ = std::fs::remove_file(tmp);
        r.map_err(|source| match source.kind() {
            std::io::ErrorKind::AlreadyExists => StorageError::Exists(p.display().to_string()),
            _ => {
                meta::remove(&self.path, name);
                StorageError::PoolDir {
                    path: p.display().to_string(),
                    source,
                }
            }
        })
    }

    pub async fn info(&self, name: &str) -> Result<Volume, StorageError> {
        let p = self.existing(name)?;
        let m = meta::read(&self.path, name)?;
        let i = qemu_img::info(self.tool(), &p, m.format.as_str()).await?;
        Ok(Volume {
            pool: self.name.clone(),
            name: name.to_string(),
            format: m.format.as_str().to_string(),
            virtual_bytes: i.virtual_size,
            allocated_bytes: i.actual_size,
        })
    }

    /// A work file for making volume `name` (`{PARTIAL}{what}~{name}`): in the pool's
    /// folder, removed by the start-up repair when an interrupted operation leaves it.
    /// A volume name never holds `~`, so this is never another volume's own work file
    /// (`{PARTIAL}{name}`, which `x.upload` would otherwise share with `x`'s upload).
    pub fn partial_path(&self, name: &str, what: &str) -> Result<PathBuf, StorageError> {
        self.volume_path(name)?;
        Ok(self.path.join(format!("{PARTIAL}{what}~{name}")))
    }

    /// Imports a raw image of a guest's disk (a restore) as `name` in `format`: read as
    /// raw, never probed — its bytes are a guest's, which may look like any format.
    pub async fn import_raw(
        &self,
        name: &str,
        source: &Path,
        format: DiskFormat,
        progress: impl FnMut(f32) + Send,
    ) -> Result<Volume, StorageError> {
        if self.volume_path(name)?.exists() {
            return Err(StorageError::Exists(format!("{}/{name}", self.name)));
        }
        self.convert_in(name, source, "raw", format, progress).await
    }

    /// Files left by interrupted creates, imports and copies.
    pub fn partial_files(&self) -> Vec<PathBuf> {
        std::fs::read_dir(&self.path)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with(PARTIAL))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default()
    }

    pub async fn list(&self) -> Result<Vec<Volume>, StorageError> {
        let rd = std::fs::read_dir(&self.path).map_err(|source| StorageError::PoolDir {
            path: self.path.display().to_string(),
            source,
        })?;
        let mut names: Vec<String> = rd
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        let mut out = vec![];
        for n in names {
            match self.info(&n).await {
                Ok(v) => out.push(v),
                Err(e) => {
                    tracing::warn!(pool = %self.name, volume = %n, error = %e, "unreadable volume")
                }
            }
        }
        Ok(out)
    }

    pub async fn delete(&self, name: &str) -> Result<(), StorageError> {
        let p = self.existing(name)?;
        std::fs::remove_file(&p).map_err(|source| StorageError::Delete {
            path: p.display().to_string(),
            source,
        })?;
        meta::remove(&self.path, name);
        Ok(())
    }

    /// Grows a volume (offline; a running VM's disk grows through QMP `block_resize`).
    pub async fn resize(&self, name: &str, size: ByteSize) -> Result<Volume, StorageError> {
        let v = self.info(name).await?;
        if size.0 < v.virtual_bytes {
            return Err(StorageError::Shrink {
                volume: format!("{}/{name}", self.name),
                from: v.virtual_bytes,
                to: size.0,
            });
        }
        let p = self.existing(name)?;
        let op = ImgOp::Resize {
            path: &p,
            format: &v.format,
            size: size.0,
        };
        self.tool.run(op, &mut |_| {}).await?;
        self.info(name).await
    }

    /// Imports a host file (image or ISO): copied, or converted to `format`.
    pub async fn import(
        &self,
        name: &str,
        source: &Path,
        format: Option<DiskFormat>,
        progress: impl FnMut(f32) + Send,
    ) -> Result<Volume, StorageError> {
        let p = self.volume_path(name)?;
        if p.exists() {
            return Err(StorageError::Exists(format!("{}/{name}", self.name)));
        }
        std::fs::metadata(source)
            .and_then(|m| {
                if m.is_file() {
                    Ok(())
                } else {
                    Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        "not a regular file",
                    ))
                }
            })
            .map_err(|e| StorageError::Source {
                path: source.display().to_string(),
                source: e,
            })?;
        let (src_fmt, _) = source::check(self.tool(), source).await?;
        let dst_fmt = format.unwrap_or(match src_fmt {
            source::SourceFormat::Raw => DiskFormat::Raw,
            _ => DiskFormat::Qcow2,
        });
        self.convert_in(name, source, src_fmt.as_str(), dst_fmt, progress)
            .await
    }

    /// Copies volume `src` of another pool in as `name`, in the format ferry recorded for
    /// it (never sniffed: its bytes are a guest's), flattened.
    pub async fn copy_from(
        &self,
        from: &DirPool,
        src: &str,
        name: &str,
        progress: impl FnMut(f32) + Send,
    ) -> Result<Volume, StorageError> {
        if self.volume_path(name)?.exists() {
            return Err(StorageError::Exists(format!("{}/{name}", self.name)));
        }
        let fmt = from.meta(src)?.format;
        self.convert_in(name, &from.existing(src)?, fmt.as_str(), fmt, progress)
            .await
    }

    /// `qemu-img convert -f src_fmt -O dst_fmt` into a new volume `name` (recorded first,
    /// published when complete, nothing left on failure).
    async fn convert_in(
        &self,
        name: &str,
        source: &Path,
        src_fmt: &str,
        dst_fmt: DiskFormat,
        mut progress: impl FnMut(f32) + Send,
    ) -> Result<Volume, StorageError> {
        let p = self.volume_path(name)?;
        let tmp = self.path.join(format!("{PARTIAL}{name}"));
        meta::write(&self.path, name, &VolumeMeta::plain(dst_fmt))?;
        let op = ImgOp::Convert {
            src: source,
            src_format: src_fmt,
            dst: &tmp,
            dst_format: dst_fmt.as_str(),
        };
        if let Err(e) = self.tool.run(op, &mut progress).await {
            let _ = std::fs::remove_file(&tmp);
            meta::remove(&self.path, name);
            return Err(e);
        }
        self.publish(&tmp, &p, name)?;
        self.info(name).await
    }

    /// Records the format of a volume file that arrived from elsewhere (a cold
    /// migration's upload; the format comes with the VM's definition), after checking the
    /// file in that format: no backing file, no external data file, no encryption — a
    /// header that names other files is refused, whoever wrote it.
    pub async fn register_checked(
        &self,
        name: &str,
        format: DiskFormat,
    ) -> Result<(), StorageError> {
        let p = self.existing(name)?;
        source::check_as(self.tool(), &p, format.as_str()).await?;
        meta::write(&self.path, name, &VolumeMeta::plain(format))
    }

    /// Checks that a volume's header names no other file to open as its data (an
    /// external data file) and is not encrypted, before a root-run program reads it:
    /// QEMU's user can write the header of a volume its VM uses.
    pub async fn check_own_data(&self, name: &str) -> Result<(), StorageError> {
        let p = self.existing(name)?;
        let format = meta::read(&self.path, name)?.format;
        let v = qemu_img::info_json(self.tool(), &p, format.as_str()).await?;
        let refuse = |reason: String| StorageError::Refused {
            path: p.display().to_string(),
            reason,
        };
        if let Some(f) = v["format-specific"]["data"]
            .get("data-file")
            .and_then(|f| f.as_str())
        {
            return Err(refuse(format!(
                "its header names another file for its data ({f})"
            )));
        }
        if v.get("encrypted").and_then(|e| e.as_bool()) == Some(true) {
            return Err(refuse("it is encrypted".into()));
        }
        Ok(())
    }

    /// Internal qcow2 snapshots of a stopped volume: `-c` create, `-a` apply, `-d` delete.
    pub async fn snapshot(
        &self,
        name: &str,
        op: SnapshotOp,
        tag: &str,
    ) -> Result<(), StorageError> {
        let p = self.existing(name)?;
        if meta::read(&self.path, name)?.format != DiskFormat::Qcow2 {
            return Err(StorageError::QemuImg {
                op: "snapshot",
                stderr: format!("{}/{name} is not qcow2: it keeps no snapshots", self.name),
            });
        }
        let op = ImgOp::Snapshot { path: &p, op, tag };
        self.tool.run(op, &mut |_| {}).await?;
        Ok(())
    }

    /// A new qcow2 volume whose backing file is `base` (another volume of this pool):
    /// instant, whatever the size. The base must never change afterwards.
    pub async fn create_linked(&self, base: &str, name: &str) -> Result<Volume, StorageError> {
        let b = self.existing(base)?;
        let base_meta = self.meta(base)?;
        let p = self.volume_path(name)?;
        if p.exists() {
            return Err(StorageError::Exists(format!("{}/{name}", self.name)));
        }
        let tmp = self.path.join(format!("{PARTIAL}{name}"));
        let m = VolumeMeta {
            format: DiskFormat::Qcow2,
            backing: Some(base.to_string()),
        };
        meta::write(&self.path, name, &m)?;
        if let Err(e) = create_overlay(self.tool(), &tmp, &b, base_meta.format.as_str()).await {
            meta::remove(&self.path, name);
            return Err(e);
        }
        self.publish(&tmp, &p, name)?;
        self.info(name).await
    }

    /// A full, independent copy of volume `base` (backing chain flattened), with progress.
    pub async fn copy(
        &self,
        base: &str,
        name: &str,
        mut progress: impl FnMut(f32) + Send,
    ) -> Result<Volume, StorageError> {
        let b = self.existing(base)?;
        let fmt = self.meta(base)?.format.as_str();
        let p = self.volume_path(name)?;
        if p.exists() {
            return Err(StorageError::Exists(format!("{}/{name}", self.name)));
        }
        let tmp = self.path.join(format!("{PARTIAL}{name}"));
        meta::write(
            &self.path,
            name,
            &VolumeMeta::plain(self.meta(base)?.format),
        )?;
        let op = ImgOp::Convert {
            src: &b,
            src_format: fmt,
            dst: &tmp,
            dst_format: fmt,
        };
        if let Err(e) = self.tool.run(op, &mut progress).await {
            let _ = std::fs::remove_file(&tmp);
            meta::remove(&self.path, name);
            return Err(e);
        }
        self.publish(&tmp, &p, name)?;
        self.info(name).await
    }

    /// (capacity, available) of the file system under the pool.
    pub fn capacity(&self) -> Result<(u64, u64), StorageError> {
        let s = nix::sys::statvfs::statvfs(&self.path).map_err(|e| StorageError::PoolDir {
            path: self.path.display().to_string(),
            source: e.into(),
        })?;
        let f = s.fragment_size() as u64;
        Ok((s.blocks() as u64 * f, s.blocks_available() as u64 * f))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotOp {
    Create,
    Apply,
    Delete,
}

/// A qcow2 overlay at `path` on `backing` (absolute path) of format `backing_fmt`.
pub async fn create_overlay(
    tool: &dyn ImageTool,
    path: &Path,
    backing: &Path,
    backing_fmt: &str,
) -> Result<(), StorageError> {
    let op = ImgOp::Overlay {
        path,
        backing,
        backing_format: backing_fmt,
    };
    let r = tool.run(op, &mut |_| {}).await;
    if r.is_err() {
        let _ = std::fs::remove_file(path);
    }
    r.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn linked_and_full_copies_and_offline_snapshots() {
        let (_d, p) = pool();
        p.create("base", "64M".parse().unwrap(), DiskFormat::Qcow2)
            .await
            .unwrap();
        let l = p.create_linked("base", "linked").await.unwrap();
        assert_eq!((l.format.as_str(), l.virtual_bytes), ("qcow2", 64 << 20));
        let b = qemu_img::info(&QemuImg, &p.volume_path("linked").unwrap(), "qcow2")
            .await
            .unwrap();
        assert!(b.backing_filename.unwrap().ends_with("/base"));
        let chain = p.chain("linked").unwrap();
        assert_eq!(chain.len(), 1);
        assert_eq!(chain[0].path, p.volume_path("base").unwrap());
        p.create_linked("linked", "linked2").await.unwrap();
        assert_eq!(p.chain("linked2").unwrap().len(), 2);
        assert!(p.chain("base").unwrap().is_empty());
        let mut last = 0.0;
        p.copy("linked", "full", |f| last = f).await.unwrap();
        let f = qemu_img::info(&QemuImg, &p.volume_path("full").unwrap(), "qcow2")
            .await
            .unwrap();
        assert!(
            f.backing_filename.is_none(),
            "full copy still has a backing file"
        );
        assert!(last > 0.99);
        p.snapshot("full", SnapshotOp::Create, "s1").await.unwrap();
        p.snapshot("full", SnapshotOp::Apply, "s1").await.unwrap();
        p.snapshot("full", SnapshotOp::Delete, "s1").await.unwrap();
        assert!(p.snapshot("full", SnapshotOp::Apply, "s1").await.is_err());
    }

    /// Writes at `path` what a guest can write into its raw disk: a qcow2 header naming
    /// a host file (`dir/secret`) as the backing file.
    fn hostile_header(dir: &Path, path: &Path) {
        let secret = dir.join("secret");
        std::fs::write(&secret, b"host secret").unwrap();
        let ok = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&secret)
            .arg(path)
            .arg("4M")
            .status()
            .unwrap()
            .success();
        assert!(ok, "qemu-img create");
    }

    fn pool() -> (tempfile::TempDir, DirPool) {
        let d = tempfile::tempdir().unwrap();
        let p = DirPool::new("local", d.path().join("pool"));
        p.ensure().unwrap();
        (d, p)
    }

    #[tokio::test]
    async fn create_list_resize_delete_real_qemu_img() {
        let (_d, p) = pool();
        let v = p
            .create("a", "64M".parse().unwrap(), DiskFormat::Qcow2)
            .await
            .unwrap();
        assert_eq!((v.format.as_str(), v.virtual_bytes), ("qcow2", 64 << 20));
        p.create("b", "1M".parse().unwrap(), DiskFormat::Raw)
            .await
            .unwrap();
        let names: Vec<_> = p
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|v| v.name)
            .collect();
        assert_eq!(names, ["a", "b"]);
        assert!(matches!(
            p.create("a", ByteSize::mib(1), DiskFormat::Raw).await,
            Err(StorageError::Exists(_))
        ));
        let v = p.resize("a", "128M".parse().unwrap()).await.unwrap();
        assert_eq!(v.virtual_bytes, 128 << 20);
        assert!(matches!(
            p.resize("a", ByteSize::mib(1)).await,
            Err(StorageError::Shrink { .. })
        ));
        p.delete("a").await.unwrap();
        assert!(matches!(p.info("a").await, Err(StorageError::NotFound(_))));
        let (cap, avail) = p.capacity().unwrap();
        assert!(cap >= avail && cap > 0);
    }

    #[tokio::test]
    async fn names_outside_pool_refused() {
        let (_d, p) = pool();
        for n in ["../x", "/etc/passwd", "..", ".hidden", "a/b"] {
            let r = p.create(n, ByteSize::mib(1), DiskFormat::Raw).await;
            assert!(matches!(r, Err(StorageError::Invalid(_))), "{n}: {r:?}");
        }
    }

    #[tokio::test]
    async fn import_converts_and_reports_progress() {
        let (d, p) = pool();
        let src = d.path().join("src.raw");
        std::fs::write(&src, vec![7u8; 4 << 20]).unwrap();
        let mut last = 0.0;
        let v = p
            .import("img", &src, Some(DiskFormat::Qcow2), |f| last = f)
            .await
            .unwrap();
        assert_eq!((v.format.as_str(), v.virtual_bytes), ("qcow2", 4 << 20));
        assert!(last > 0.99, "progress ended at {last}");
        let r = p.import("x", &d.path().join("missing"), None, |_| {}).await;
        assert!(matches!(r, Err(StorageError::Source { .. })));
        assert!(
            p.list().await.unwrap().len() == 1,
            "a failed import left a volume"
        );
    }

    /// The format probe trick: a guest writes a qcow2 header naming a host file into its
    /// raw disk. The volume stays raw for ferry (recorded format), with no backing chain.
    #[tokio::test]
    async fn a_header_written_into_a_raw_volume_changes_nothing() {
        let (d, p) = pool();
        let v = p
            .create("v", ByteSize::mib(4), DiskFormat::Raw)
            .await
            .unwrap();
        assert_eq!(v.format, "raw");
        let path = p.volume_path("v").unwrap();
        std::fs::remove_file(&path).unwrap();
        hostile_header(d.path(), &path);
        let v = p.info("v").await.unwrap();
        assert_eq!(v.format, "raw");
        assert!(p.chain("v").unwrap().is_empty());
        assert!(p.snapshot("v", SnapshotOp::Create, "s").await.is_err());
        let listed = p.list().await.unwrap();
        assert_eq!(listed[0].format, "raw");
    }

    /// A single-file VMDK is converted (to qcow2 by default), a descriptor refused and
    /// nothing left behind.
    #[tokio::test]
    async fn import_converts_vmdk_and_refuses_descriptors() {
        let (d, p) = pool();
        let src = d.path().join("disk.vmdk");
        let ok = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "vmdk"])
            .arg(&src)
            .arg("8M")
            .status()
            .unwrap()
            .success();
        assert!(ok);
        let v = p.import("img", &src, None, |_| {}).await.unwrap();
        assert_eq!((v.format.as_str(), v.virtual_bytes), ("qcow2", 8 << 20));
        let desc = d.path().join("desc.vmdk");
        std::fs::write(
            &desc,
            "# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicFlat\"\nRW 2048 FLAT \"/etc/passwd\" 0\n",
        )
        .unwrap();
        let r = p.import("bad", &desc, None, |_| {}).await;
        assert!(matches!(r, Err(StorageError::Refused { .. })), "{r:?}");
        assert_eq!(p.list().await.unwrap().len(), 1);
        assert!(!meta::path(&p.path, "bad").exists());
    }

    /// A file that arrives with a VM (cold migration) is recorded in the VM's format only
    /// if its header names no other file; a guest-written header naming a host file as
    /// backing is refused. A copy into another pool takes the recorded format, whatever
    /// the bytes say.
    #[tokio::test]
    async fn arriving_files_are_checked_and_copies_never_sniff() {
        let (d, p) = pool();
        let path = p.volume_path("arrived").unwrap();
        hostile_header(d.path(), &path);
        let r = p.register_checked("arrived", DiskFormat::Qcow2).await;
        assert!(matches!(r, Err(StorageError::Refused { .. })), "{r:?}");
        assert_eq!(p.meta("arrived").unwrap().format, DiskFormat::Raw);
        // Recorded raw, its qcow2 bytes are copied as bytes into another pool.
        let other = DirPool::new("other", d.path().join("other"));
        other.ensure().unwrap();
        let v = other
            .copy_from(&p, "arrived", "arrived", |_| {})
            .await
            .unwrap();
        assert_eq!(v.format, "raw");
        // Byte for byte (the copy may be padded to whole sectors).
        let copied = std::fs::read(other.volume_path("arrived").unwrap()).unwrap();
        let original = std::fs::read(&path).unwrap();
        assert!(copied.starts_with(&original), "the copy decoded the bytes");
        assert!(copied[original.len()..].iter().all(|b| *b == 0));
    }
}
