//! `qemu-img` behind a seam: [`ImgOp`] names every use, [`ImageTool`] runs it, and
//! [`QemuImg`] is the real program.

use crate::StorageError;
use serde::Deserialize;
use std::path::Path;
use std::process::Stdio;
use tokio::io::AsyncReadExt;
use tokio::process::Command;

#[derive(Debug, Clone, Deserialize)]
pub struct ImageInfo {
    pub format: String,
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
    #[serde(rename = "actual-size", default)]
    pub actual_size: u64,
    #[serde(rename = "backing-filename", default)]
    pub backing_filename: Option<String>,
    /// Internal snapshots (qcow2).
    #[serde(default)]
    pub snapshots: Vec<InternalSnapshot>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct InternalSnapshot {
    pub name: String,
    #[serde(rename = "vm-state-size", default)]
    pub vm_state_size: u64,
}

/// What ferry asks of `qemu-img`: every use, typed. The format of an image is always
/// given, never probed (probing would trust what a guest wrote).
#[derive(Debug, Clone, Copy)]
pub enum ImgOp<'a> {
    /// A new, empty image.
    Create {
        path: &'a Path,
        format: &'a str,
        size: u64,
    },
    /// A new qcow2 image over `backing` (absolute path) of `backing_format`.
    Overlay {
        path: &'a Path,
        backing: &'a Path,
        backing_format: &'a str,
    },
    /// `info --output=json` (with `-U`: works on images a running QEMU holds).
    Info { path: &'a Path, format: &'a str },
    /// Grows an image to `size` bytes.
    Resize {
        path: &'a Path,
        format: &'a str,
        size: u64,
    },
    /// An internal snapshot of a qcow2 image: create, apply or delete `tag`.
    Snapshot {
        path: &'a Path,
        op: crate::SnapshotOp,
        tag: &'a str,
    },
    /// A flattened copy of `src` as `dst`, with progress.
    Convert {
        src: &'a Path,
        src_format: &'a str,
        dst: &'a Path,
        dst_format: &'a str,
    },
}

impl ImgOp<'_> {
    /// The operation's name in errors.
    pub fn name(&self) -> &'static str {
        match self {
            ImgOp::Create { .. } | ImgOp::Overlay { .. } => "create",
            ImgOp::Info { .. } => "info",
            ImgOp::Resize { .. } => "resize",
            ImgOp::Snapshot { .. } => "snapshot",
            ImgOp::Convert { .. } => "convert",
        }
    }
}

/// The storage seam: whatever runs `qemu-img`. [`QemuImg`] is the real one; tests of
/// the layers above may use `fake::FakeImages` (feature `fake`).
#[async_trait::async_trait]
pub trait ImageTool: Send + Sync + std::fmt::Debug + 'static {
    /// Runs `op`; its standard output (`Info`'s JSON; empty for the others). `Convert`
    /// reports progress (0.0–1.0) as it goes.
    async fn run(
        &self,
        op: ImgOp<'_>,
        progress: &mut (dyn FnMut(f32) + Send),
    ) -> Result<Vec<u8>, StorageError>;
}

/// The real `qemu-img` (from `PATH`, never through a shell).
#[derive(Debug, Default, Clone, Copy)]
pub struct QemuImg;

#[async_trait::async_trait]
impl ImageTool for QemuImg {
    async fn run(
        &self,
        op: ImgOp<'_>,
        progress: &mut (dyn FnMut(f32) + Send),
    ) -> Result<Vec<u8>, StorageError> {
        let name = op.name();
        let size;
        let opts;
        let args: Vec<&std::ffi::OsStr> = match op {
            ImgOp::Create {
                path,
                format,
                size: s,
            } => {
                size = s.to_string();
                vec![
                    "create".as_ref(),
                    "-q".as_ref(),
                    "-f".as_ref(),
                    format.as_ref(),
                    path.as_os_str(),
                    size.as_ref(),
                ]
            }
            ImgOp::Overlay {
                path,
                backing,
                backing_format,
            } => vec![
                "create".as_ref(),
                "-q".as_ref(),
                "-f".as_ref(),
                "qcow2".as_ref(),
                "-F".as_ref(),
                backing_format.as_ref(),
                "-b".as_ref(),
                backing.as_os_str(),
                path.as_os_str(),
            ],
            ImgOp::Info { path, format } => vec![
                "info".as_ref(),
                "-U".as_ref(),
                "-f".as_ref(),
                format.as_ref(),
                "--output=json".as_ref(),
                path.as_os_str(),
            ],
            ImgOp::Resize {
                path,
                format,
                size: s,
            } => {
                size = s.to_string();
                vec![
                    "resize".as_ref(),
                    "-q".as_ref(),
                    "-f".as_ref(),
                    format.as_ref(),
                    path.as_os_str(),
                    size.as_ref(),
                ]
            }
            ImgOp::Snapshot { path, op, tag } => {
                if op == crate::SnapshotOp::Apply {
                    drop_bitmaps(path).await?;
                }
                opts = image_opts(path, "qcow2");
                let flag = match op {
                    crate::SnapshotOp::Create => "-c",
                    crate::SnapshotOp::Apply => "-a",
                    crate::SnapshotOp::Delete => "-d",
                };
                vec![
                    "snapshot".as_ref(),
                    "--image-opts".as_ref(),
                    flag.as_ref(),
                    tag.as_ref(),
                    opts.as_os_str(),
                ]
            }
            ImgOp::Convert {
                src,
                src_format,
                dst,
                dst_format,
            } => {
                convert(src, src_format, dst, dst_format, progress).await?;
                return Ok(Vec::new());
            }
        };
        run(name, &args).await
    }
}

/// Removes an image's persistent dirty bitmaps before a snapshot is applied: QEMU
/// refuses to apply one while any exist ("Device has active dirty bitmaps"), and changes
/// tracked since a backup say nothing true about a disk that went back in time — the
/// next backup then reads the whole disk.
async fn drop_bitmaps(path: &Path) -> Result<(), StorageError> {
    let opts = image_opts(path, "qcow2");
    let out = run(
        "snapshot",
        &[
            "info".as_ref(),
            "-U".as_ref(),
            "--output=json".as_ref(),
            "--image-opts".as_ref(),
            opts.as_os_str(),
        ],
    )
    .await?;
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap_or_default();
    let names: Vec<String> = v["format-specific"]["data"]["bitmaps"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|b| b["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    for n in names {
        run(
            "snapshot",
            &[
                // the names come from the image (QEMU's user can write them): after
                // `--` nothing is taken for an option
                "bitmap".as_ref(),
                "--remove".as_ref(),
                "--image-opts".as_ref(),
                "--".as_ref(),
                opts.as_os_str(),
                n.as_ref(),
            ],
        )
        .await?;
    }
    Ok(())
}

async fn run(op: &'static str, args: &[&std::ffi::OsStr]) -> Result<Vec<u8>, StorageError> {
    let out = Command::new("qemu-img")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|source| StorageError::Spawn { op, source })?;
    if !out.status.success() {
        return Err(StorageError::QemuImg {
            op,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out.stdout)
}

/// `qemu-img info -f FORMAT` through `tool`.
pub async fn info(
    tool: &dyn ImageTool,
    path: &Path,
    format: &str,
) -> Result<ImageInfo, StorageError> {
    serde_json::from_value(info_json(tool, path, format).await?).map_err(|e| {
        StorageError::QemuImg {
            op: "info",
            stderr: e.to_string(),
        }
    })
}

/// `qemu-img info -f FORMAT --output=json`, the whole answer.
pub async fn info_json(
    tool: &dyn ImageTool,
    path: &Path,
    format: &str,
) -> Result<serde_json::Value, StorageError> {
    let out = tool.run(ImgOp::Info { path, format }, &mut |_| {}).await?;
    serde_json::from_slice(&out).map_err(|e| StorageError::QemuImg {
        op: "info",
        stderr: e.to_string(),
    })
}

/// `--image-opts` for a file of a given format (commas in the path doubled, as QEMU's
/// option syntax wants).
pub(crate) fn image_opts(path: &Path, format: &str) -> std::ffi::OsString {
    let mut o =
        std::ffi::OsString::from(format!("driver={format},file.driver=file,file.filename="));
    o.push(path.to_string_lossy().replace(',', ",,"));
    o
}

/// `qemu-img convert -p`, reporting progress (0.0–1.0) as it goes.
async fn convert(
    src: &Path,
    src_fmt: &str,
    dst: &Path,
    dst_fmt: &str,
    progress: &mut (dyn FnMut(f32) + Send),
) -> Result<(), StorageError> {
    let mut child = Command::new("qemu-img")
        .args(["convert", "-p", "-f", src_fmt, "-O", dst_fmt])
        .arg(src)
        .arg(dst)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| StorageError::Spawn {
            op: "convert",
            source,
        })?;
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let err_task = tokio::spawn(async move {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s).await;
        s
    });
    // Progress lines look like "    (12.50/100%)\r".
    let mut buf = [0u8; 256];
    let mut acc = String::new();
    loop {
        let n = stdout.read(&mut buf).await.unwrap_or(0);
        if n == 0 {
            break;
        }
        acc.push_str(&String::from_utf8_lossy(&buf[..n]));
        while let Some(end) = acc.find(['\r', '\n']) {
            let piece: String = acc.drain(..=end).collect();
            if let Some(p) = piece
                .trim()
                .strip_prefix('(')
                .and_then(|s| s.split('/').next())
            {
                if let Ok(v) = p.parse::<f32>() {
                    progress(v / 100.0);
                }
            }
        }
    }
    let status = child.wait().await.map_err(|source| StorageError::Spawn {
        op: "convert",
        source,
    })?;
    let stderr = err_task.await.unwrap_or_default();
    if !status.success() {
        return Err(StorageError::QemuImg {
            op: "convert",
            stderr: stderr.trim().to_string(),
        });
    }
    Ok(())
}
