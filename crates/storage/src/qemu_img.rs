//! Thin async wrappers around `qemu-img`.

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

pub(crate) async fn run(
    op: &'static str,
    args: &[&std::ffi::OsStr],
) -> Result<Vec<u8>, StorageError> {
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

/// `qemu-img info -f FORMAT` (with `-U`, so it works on images a running QEMU holds
/// locked). The format is always given: probing would trust what a guest wrote.
pub async fn info(path: &Path, format: &str) -> Result<ImageInfo, StorageError> {
    serde_json::from_value(info_json(path, format).await?).map_err(|e| StorageError::QemuImg {
        op: "info",
        stderr: e.to_string(),
    })
}

/// `qemu-img info -f FORMAT --output=json`, the whole answer.
pub async fn info_json(path: &Path, format: &str) -> Result<serde_json::Value, StorageError> {
    let out = run(
        "info",
        &[
            "info".as_ref(),
            "-U".as_ref(),
            "-f".as_ref(),
            format.as_ref(),
            "--output=json".as_ref(),
            path.as_os_str(),
        ],
    )
    .await?;
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
pub async fn convert(
    src: &Path,
    src_fmt: &str,
    dst: &Path,
    dst_fmt: &str,
    mut progress: impl FnMut(f32) + Send,
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
