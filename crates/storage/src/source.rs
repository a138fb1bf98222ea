//! What an image brought in by an admin is, decided from its first bytes by ferry itself,
//! then checked through `qemu-img info -f` before anything is copied.
//!
//! Images from elsewhere are hostile until checked: a VMDK descriptor names other files
//! as its extents, a qcow2 or QED header names a backing file or an external data file,
//! and a `json:` file name is a whole block graph. Any of these would make the import copy
//! a host file into a volume a guest can read. They are refused with the reason; what is
//! left (raw, qcow2, single-file VMDK, VHDX, VDI, QED, VHD) is converted with its format
//! given explicitly.

use crate::qemu_img::{self, ImageTool};
use crate::StorageError;
use std::io::Read;
use std::path::Path;

/// A format ferry can take an image in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceFormat {
    Raw,
    Qcow2,
    Vmdk,
    Vhdx,
    Vdi,
    Qed,
    Vpc,
}

impl SourceFormat {
    /// QEMU's driver name.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceFormat::Raw => "raw",
            SourceFormat::Qcow2 => "qcow2",
            SourceFormat::Vmdk => "vmdk",
            SourceFormat::Vhdx => "vhdx",
            SourceFormat::Vdi => "vdi",
            SourceFormat::Qed => "qed",
            SourceFormat::Vpc => "vpc",
        }
    }
}

/// The format the first bytes of a file show, or why the file is refused.
pub fn sniff(head: &[u8]) -> Result<SourceFormat, String> {
    let at = |off: usize, magic: &[u8]| head.get(off..off + magic.len()) == Some(magic);
    if at(0, b"QFI\xfb") {
        let version = head
            .get(4..8)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            .unwrap_or(0);
        return if version >= 2 {
            Ok(SourceFormat::Qcow2)
        } else {
            Err(format!("qcow version {version} images are not supported"))
        };
    }
    if at(0, b"QED\0") {
        return Ok(SourceFormat::Qed);
    }
    if at(0, b"KDMV") {
        return Ok(SourceFormat::Vmdk);
    }
    if at(0, b"COWD") {
        return Err("ESX COWD VMDK images are not supported".into());
    }
    if at(0, b"# Disk DescriptorFile") {
        return Err(
            "a VMDK descriptor names other files as its extents: import the single-file (monolithicSparse/streamOptimized) VMDK, or convert it first".into(),
        );
    }
    if at(0, b"vhdxfile") {
        return Ok(SourceFormat::Vhdx);
    }
    if at(0x40, &[0x7f, 0x10, 0xda, 0xbe]) {
        return Ok(SourceFormat::Vdi);
    }
    if at(0, b"conectix") {
        return Ok(SourceFormat::Vpc);
    }
    if at(0, b"LUKS\xba\xbe") {
        return Err("LUKS-encrypted images are not supported".into());
    }
    Ok(SourceFormat::Raw)
}

/// Reads the head of `path`, decides its format and checks it through `qemu-img info -f`:
/// no backing file, no external data file, no encryption, every VMDK extent the file
/// itself. Returns the format and the virtual size.
pub async fn check(tool: &dyn ImageTool, path: &Path) -> Result<(SourceFormat, u64), StorageError> {
    let refuse = |reason: String| StorageError::Refused {
        path: path.display().to_string(),
        reason,
    };
    if !path.is_absolute() {
        return Err(refuse("the source must be an absolute path".into()));
    }
    let mut head = vec![0u8; 4096];
    let n = std::fs::File::open(path)
        .and_then(|mut f| read_full(&mut f, &mut head))
        .map_err(|source| StorageError::Source {
            path: path.display().to_string(),
            source,
        })?;
    head.truncate(n);
    let fmt = sniff(&head).map_err(refuse)?;
    let size = check_as(tool, path, fmt.as_str()).await?;
    Ok((fmt, size))
}

/// Checks `path` read as `format` (given, never probed): no backing file, no external
/// data file, no encryption, every VMDK extent the file itself. Returns the virtual size.
pub async fn check_as(
    tool: &dyn ImageTool,
    path: &Path,
    format: &str,
) -> Result<u64, StorageError> {
    let refuse = |reason: String| StorageError::Refused {
        path: path.display().to_string(),
        reason,
    };
    let v = qemu_img::info_json(tool, path, format).await?;
    if let Some(b) = v.get("backing-filename").and_then(|b| b.as_str()) {
        return Err(refuse(format!(
            "it has a backing file ({b}); import a flattened image (qemu-img convert)"
        )));
    }
    if v.get("encrypted").and_then(|e| e.as_bool()) == Some(true) {
        return Err(refuse("encrypted images are not supported".into()));
    }
    let data = &v["format-specific"]["data"];
    if let Some(f) = data.get("data-file").and_then(|f| f.as_str()) {
        return Err(refuse(format!("it keeps its data in another file ({f})")));
    }
    if format == "vmdk" {
        let own = path.to_string_lossy();
        if let Some(extents) = data.get("extents").and_then(|e| e.as_array()) {
            for e in extents {
                let f = e.get("filename").and_then(|f| f.as_str()).unwrap_or("");
                if f != own {
                    return Err(refuse(format!(
                        "its extent {f} is another file; only single-file VMDKs are imported"
                    )));
                }
            }
        }
    }
    v.get("virtual-size")
        .and_then(|s| s.as_u64())
        .ok_or_else(|| refuse("qemu-img reported no virtual size".into()))
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::QemuImg;

    #[test]
    fn magic_bytes() {
        let mut q = b"QFI\xfb\0\0\0\x03".to_vec();
        assert_eq!(sniff(&q), Ok(SourceFormat::Qcow2));
        q[7] = 1;
        assert!(sniff(&q).is_err());
        assert_eq!(sniff(b"KDMV...."), Ok(SourceFormat::Vmdk));
        assert!(sniff(b"# Disk DescriptorFile\nversion=1").is_err());
        assert_eq!(sniff(b"vhdxfile"), Ok(SourceFormat::Vhdx));
        let mut vdi = vec![0u8; 0x50];
        vdi[0x40..0x44].copy_from_slice(&[0x7f, 0x10, 0xda, 0xbe]);
        assert_eq!(sniff(&vdi), Ok(SourceFormat::Vdi));
        assert_eq!(sniff(b""), Ok(SourceFormat::Raw));
        assert_eq!(sniff(&[0u8; 512]), Ok(SourceFormat::Raw));
    }

    async fn img(dir: &Path, name: &str, args: &[&str]) -> std::path::PathBuf {
        let p = dir.join(name);
        let ok = tokio::process::Command::new("qemu-img")
            .args(args)
            .arg(&p)
            .args(["1M"])
            .status()
            .await
            .unwrap()
            .success();
        assert!(ok, "qemu-img create {args:?}");
        p
    }

    /// Each hostile image (real qemu-img files) is refused with a reason that says why.
    #[tokio::test]
    async fn hostile_images_refused() {
        let d = tempfile::tempdir().unwrap();
        let secret = d.path().join("secret");
        std::fs::write(&secret, vec![1u8; 1 << 20]).unwrap();
        let s = secret.to_str().unwrap();
        let backed = img(
            d.path(),
            "b.qcow2",
            &["create", "-q", "-f", "qcow2", "-F", "raw", "-b", s],
        )
        .await;
        let datafile = img(
            d.path(),
            "d.qcow2",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!(
                    "data_file={},data_file_raw=on",
                    d.path().join("x").display()
                ),
            ],
        )
        .await;
        let flat = img(
            d.path(),
            "f.vmdk",
            &[
                "create",
                "-q",
                "-f",
                "vmdk",
                "-o",
                "subformat=monolithicFlat",
            ],
        )
        .await;
        let qed = img(
            d.path(),
            "q.qed",
            &["create", "-q", "-f", "qed", "-F", "raw", "-b", s],
        )
        .await;
        for (p, why) in [
            (&backed, "backing file"),
            (&datafile, "another file"),
            (&flat, "descriptor"),
            (&qed, "backing file"),
        ] {
            match check(&QemuImg, p).await {
                Err(StorageError::Refused { reason, .. }) => {
                    assert!(reason.contains(why), "{}: {reason}", p.display())
                }
                r => panic!("{} not refused: {r:?}", p.display()),
            }
        }
        let ok = img(
            d.path(),
            "ok.vmdk",
            &[
                "create",
                "-q",
                "-f",
                "vmdk",
                "-o",
                "subformat=monolithicSparse",
            ],
        )
        .await;
        assert_eq!(
            check(&QemuImg, &ok).await.unwrap(),
            (SourceFormat::Vmdk, 1 << 20)
        );
        assert!(matches!(
            check(&QemuImg, Path::new("relative.img")).await,
            Err(StorageError::Refused { .. })
        ));
    }
}
