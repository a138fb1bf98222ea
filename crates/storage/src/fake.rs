//! An in-memory `qemu-img` for fast tests of the layers above storage: images are
//! small files holding what `qemu-img info` would say of them (format, size, backing
//! file, internal snapshots), so pools, clones and snapshots behave as with the real
//! program, in microseconds. A test can make the next operation of a kind fail
//! ([`FakeImages::fail_next`]) to prove that nothing is left half made.

use crate::qemu_img::{ImageTool, ImgOp};
use crate::{SnapshotOp, StorageError};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Mutex;

/// What a fake image file holds after its first line.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct FakeImage {
    format: String,
    size: u64,
    #[serde(default)]
    backing: Option<String>,
    #[serde(default)]
    snapshots: Vec<String>,
}

/// The first line of every fake image.
const MAGIC: &str = "ferry-fake-image\n";

/// The fake `qemu-img`: what it was asked, and the failures a test planted.
#[derive(Debug, Default)]
pub struct FakeImages {
    /// Operations run, in order, as "name path".
    log: Mutex<Vec<String>>,
    /// Operation names whose next run fails, with the error text.
    fail: Mutex<Vec<(&'static str, String)>>,
}

impl FakeImages {
    pub fn new() -> std::sync::Arc<FakeImages> {
        std::sync::Arc::default()
    }

    /// The next `op` (`create`, `info`, `resize`, `snapshot`, `convert`) fails with
    /// `stderr`, as `qemu-img` would (once).
    pub fn fail_next(&self, op: &'static str, stderr: &str) {
        lock(&self.fail).push((op, stderr.to_string()));
    }

    /// Operations run so far ("create /path", ...).
    pub fn log(&self) -> Vec<String> {
        lock(&self.log).clone()
    }

    fn planted_failure(&self, op: &'static str) -> Option<String> {
        let mut f = lock(&self.fail);
        let i = f.iter().position(|(o, _)| *o == op)?;
        Some(f.remove(i).1)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn err(op: &'static str, stderr: impl Into<String>) -> StorageError {
    StorageError::QemuImg {
        op,
        stderr: stderr.into(),
    }
}

/// Reads an image as `format`: a fake image must say that format; any other file is
/// raw data of its length (as `qemu-img` reads a raw file).
fn read(op: &'static str, path: &Path, format: &str) -> Result<FakeImage, StorageError> {
    let bytes = std::fs::read(path)
        .map_err(|e| err(op, format!("Could not open '{}': {e}", path.display())))?;
    match bytes.strip_prefix(MAGIC.as_bytes()) {
        Some(rest) => {
            let img: FakeImage = serde_json::from_slice(rest)
                .map_err(|e| err(op, format!("{}: damaged fake image: {e}", path.display())))?;
            if img.format != format && format != "raw" {
                return Err(err(
                    op,
                    format!("Image is not in {format} format ({})", path.display()),
                ));
            }
            Ok(img)
        }
        None if format == "raw" => Ok(FakeImage {
            format: "raw".into(),
            size: bytes.len() as u64,
            backing: None,
            snapshots: vec![],
        }),
        None => Err(err(
            op,
            format!("Image is not in {format} format ({})", path.display()),
        )),
    }
}

fn write(op: &'static str, path: &Path, img: &FakeImage) -> Result<(), StorageError> {
    let mut out = MAGIC.as_bytes().to_vec();
    out.extend(serde_json::to_vec(img).map_err(|e| err(op, e.to_string()))?);
    std::fs::write(path, out).map_err(|e| err(op, format!("{}: {e}", path.display())))
}

#[async_trait::async_trait]
impl ImageTool for FakeImages {
    async fn run(
        &self,
        op: ImgOp<'_>,
        progress: &mut (dyn FnMut(f32) + Send),
    ) -> Result<Vec<u8>, StorageError> {
        let name = op.name();
        let path = match op {
            ImgOp::Create { path, .. }
            | ImgOp::Overlay { path, .. }
            | ImgOp::Info { path, .. }
            | ImgOp::Resize { path, .. }
            | ImgOp::Snapshot { path, .. } => path,
            ImgOp::Convert { dst, .. } => dst,
        };
        lock(&self.log).push(format!("{name} {}", path.display()));
        if let Some(stderr) = self.planted_failure(name) {
            return Err(err(name, stderr));
        }
        match op {
            ImgOp::Create { path, format, size } => {
                let img = FakeImage {
                    format: format.into(),
                    size,
                    backing: None,
                    snapshots: vec![],
                };
                write(name, path, &img)?;
            }
            ImgOp::Overlay {
                path,
                backing,
                backing_format,
            } => {
                let base = read(name, backing, backing_format)?;
                let img = FakeImage {
                    format: "qcow2".into(),
                    size: base.size,
                    backing: Some(backing.display().to_string()),
                    snapshots: vec![],
                };
                write(name, path, &img)?;
            }
            ImgOp::Info { path, format } => {
                let img = read(name, path, format)?;
                let len = std::fs::metadata(path).map_or(0, |m| m.len());
                let mut v = serde_json::json!({
                    "format": format,
                    "virtual-size": img.size,
                    "actual-size": len,
                    "snapshots": img.snapshots.iter()
                        .map(|s| serde_json::json!({"name": s, "vm-state-size": 0}))
                        .collect::<Vec<_>>(),
                    "format-specific": {"type": format, "data": {}},
                });
                if let Some(b) = &img.backing {
                    v["backing-filename"] = b.as_str().into();
                }
                return serde_json::to_vec(&v).map_err(|e| err(name, e.to_string()));
            }
            ImgOp::Resize { path, format, size } => {
                let mut img = read(name, path, format)?;
                if size < img.size {
                    return Err(err(name, "Use the --shrink option to shrink an image"));
                }
                img.size = size;
                write(name, path, &img)?;
            }
            ImgOp::Snapshot { path, op, tag } => {
                let mut img = read(name, path, "qcow2")?;
                let has = img.snapshots.iter().any(|s| s == tag);
                match (op, has) {
                    (SnapshotOp::Create, false) => img.snapshots.push(tag.into()),
                    (SnapshotOp::Create, true) => {
                        return Err(err(name, format!("Snapshot '{tag}' already exists")))
                    }
                    (SnapshotOp::Apply, true) => {}
                    (SnapshotOp::Delete, true) => img.snapshots.retain(|s| s != tag),
                    (_, false) => {
                        return Err(err(name, format!("Could not find snapshot '{tag}'")))
                    }
                }
                write(name, path, &img)?;
            }
            ImgOp::Convert {
                src,
                src_format,
                dst,
                dst_format,
            } => {
                let mut img = read(name, src, src_format)?;
                progress(0.5);
                img.format = dst_format.into();
                img.backing = None;
                img.snapshots.clear();
                write(name, dst, &img)?;
                progress(1.0);
            }
        }
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DirPool;
    use ferry_types::{ByteSize, DiskFormat};

    /// A pool over the fake behaves as over qemu-img: sizes, linked clones, copies,
    /// snapshots; a planted failure leaves no volume and no record behind.
    #[tokio::test]
    async fn a_pool_over_the_fake_behaves_and_fails_cleanly() {
        let d = tempfile::tempdir().unwrap();
        let fake = FakeImages::new();
        let p = DirPool::new("local", d.path()).using(fake.clone());
        let v = p
            .create("a", ByteSize(1 << 30), DiskFormat::Qcow2)
            .await
            .unwrap();
        assert_eq!(v.virtual_bytes, 1 << 30);
        let l = p.create_linked("a", "b").await.unwrap();
        assert_eq!(l.virtual_bytes, 1 << 30);
        assert_eq!(p.chain("b").unwrap().len(), 1);
        p.snapshot("b", SnapshotOp::Create, "s1").await.unwrap();
        assert!(p.snapshot("b", SnapshotOp::Create, "s1").await.is_err());
        p.snapshot("b", SnapshotOp::Apply, "s1").await.unwrap();
        let r = p.resize("a", ByteSize(2 << 30)).await.unwrap();
        assert_eq!(r.virtual_bytes, 2 << 30);
        assert!(p.resize("a", ByteSize(1 << 20)).await.is_err());
        let mut seen = vec![];
        p.copy("b", "c", |f| seen.push(f)).await.unwrap();
        assert_eq!(seen.last(), Some(&1.0));
        assert!(p.chain("c").unwrap().is_empty());

        fake.fail_next("convert", "No space left on device");
        let e = p.copy("a", "d", |_| {}).await.unwrap_err();
        assert!(e.to_string().contains("convert"), "{e}");
        assert!(p.meta("d").is_err());
        assert!(p.partial_files().is_empty());
        fake.fail_next("create", "Permission denied");
        assert!(p
            .create("e", ByteSize(1 << 20), DiskFormat::Raw)
            .await
            .is_err());
        let names: Vec<String> = p
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|v| v.name)
            .collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert!(fake.log().iter().any(|l| l.starts_with("snapshot ")));
    }
}
