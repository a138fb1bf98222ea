//! Storage pools and volumes.

use crate::size::ByteSize;
use crate::validate::{check_name, ValidationErrors};
use crate::vm::DiskFormat;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// What backs a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum PoolKind {
    /// Volumes are qcow2/raw files in a local directory.
    #[default]
    Dir,
    /// Like `dir`, on a directory every host of the cluster mounts (NFS); a volume is
    /// open read-write on one host at a time (a lock with owner and generation).
    Shared,
    /// Every volume is kept on each of `hosts` (2 or 3) as a raw file in `path` and
    /// written synchronously to all of them (DRBD's "RAID-1 over servers", no SAN); the
    /// host running the VM is the primary. Needs an etcd cluster.
    Replicated,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PoolSpec {
    pub name: String,
    #[serde(rename = "type", default)]
    pub kind: PoolKind,
    /// The directory (type `dir`, `shared`; for `replicated` the directory on each of
    /// its hosts, where `{host}` stands for the host's name).
    pub path: String,
    /// The hosts keeping a copy of every volume (type `replicated`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
}

impl PoolSpec {
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut e = ValidationErrors::default();
        check_name(&mut e, "name", &self.name);
        if !self.path.starts_with('/') || self.path.split('/').any(|c| c == "..") {
            e.push("path", "must be an absolute path without '..'");
        }
        match self.kind {
            PoolKind::Dir | PoolKind::Shared => {
                if !self.hosts.is_empty() {
                    e.push("hosts", "only a replicated pool has hosts");
                }
            }
            PoolKind::Replicated => {
                if !(2..=3).contains(&self.hosts.len()) {
                    e.push(
                        "hosts",
                        "a replicated pool keeps 2 or 3 copies: name 2 or 3 hosts",
                    );
                }
                for (i, h) in self.hosts.iter().enumerate() {
                    check_name(&mut e, "hosts", h);
                    if self.hosts[..i].contains(h) {
                        e.push("hosts", format!("{h} is named twice"));
                    }
                }
            }
        }
        e.into_result()
    }
}

/// A pool with its capacity figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Pool {
    pub spec: PoolSpec,
    pub capacity_bytes: u64,
    pub available_bytes: u64,
    /// Bytes allocated by the pool's volumes.
    pub used_bytes: u64,
    pub volumes: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Volume {
    pub pool: String,
    pub name: String,
    pub format: String,
    /// Size the guest sees.
    pub virtual_bytes: u64,
    /// Space taken on the host.
    pub allocated_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeCreate {
    pub name: String,
    pub size: ByteSize,
    /// qcow2 by default; volumes of a replicated pool are raw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DiskFormat>,
}

/// Import a host file (disk image or ISO) into a pool as a new volume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeImport {
    pub name: String,
    /// Absolute path of the file on the daemon's host.
    pub source: String,
    /// Convert to this format; by default the file is copied as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DiskFormat>,
}

/// Query of `PUT /api/v1/pools/{pool}/upload/{volume}`: one piece of an image or ISO
/// sent by the client. Pieces go to a partial file; the last one starts the import.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct UploadParams {
    /// Where this piece starts: 0 (the default) starts over; otherwise exactly the
    /// bytes received so far (`GET` says how many), to go on after a broken upload.
    #[serde(default)]
    pub offset: Option<u64>,
    /// Whether this is the last piece (default true): the upload is then checked and
    /// imported like `import` (a task).
    #[serde(default)]
    pub last: Option<bool>,
    /// Convert to this format (default: qcow2, raw for raw images and ISOs).
    #[serde(default)]
    pub format: Option<DiskFormat>,
}

/// How much of an upload the daemon holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UploadStatus {
    pub received: u64,
    /// The import task, when the last piece came.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
}

/// `POST /api/v1/pools/{pool}/download`: the daemon fetches an image or ISO over
/// HTTP(S) and imports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeDownload {
    pub name: String,
    /// `http://` or `https://` (HTTPS checked against the host's CA bundle).
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DiskFormat>,
    /// The file's SHA-256 (hex): a download that differs is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

impl VolumeDownload {
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut e = ValidationErrors::default();
        check_name(&mut e, "name", &self.name);
        let u = self.url.to_ascii_lowercase();
        if !(u.starts_with("http://") || u.starts_with("https://")) {
            e.push("url", "only http:// and https:// URLs are fetched");
        } else if self.url.len() > 2048
            || self
                .url
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            e.push("url", "at most 2048 characters, no spaces");
        }
        if let Some(h) = &self.sha256 {
            if h.len() != 64 || !h.chars().all(|c| c.is_ascii_hexdigit()) {
                e.push("sha256", "64 hex digits");
            }
        }
        e.into_result()
    }
}

/// `POST /api/v1/pools/{pool}/import-ova`: an OVF appliance on the daemon's host made a
/// VM, its disks volumes of the pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OvaImport {
    /// Absolute path of the `.ova` file on the daemon's host.
    pub source: String,
    /// The new VM's name.
    pub name: String,
    /// The bridge its NICs go to (needed when the appliance has NICs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
}

impl OvaImport {
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut e = ValidationErrors::default();
        check_name(&mut e, "name", &self.name);
        if !self.source.starts_with('/') {
            e.push("source", "must be an absolute path on the daemon's host");
        }
        if let Some(b) = &self.bridge {
            crate::validate::check_ifname(&mut e, "bridge", b);
        }
        e.into_result()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeResize {
    pub size: ByteSize,
}

impl VolumeCreate {
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut e = ValidationErrors::default();
        check_name(&mut e, "name", &self.name);
        if self.size.0 < 1 << 20 {
            e.push("size", "must be at least 1M");
        }
        e.into_result()
    }
}

impl VolumeImport {
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut e = ValidationErrors::default();
        check_name(&mut e, "name", &self.name);
        if !self.source.starts_with('/') {
            e.push("source", "must be an absolute path");
        }
        e.into_result()
    }
}
