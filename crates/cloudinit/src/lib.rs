//! cloud-init's NoCloud seed for a VM: `meta-data`, `user-data`, `vendor-data` and
//! `network-config` rendered from its spec ([`render`], pure), and the small FAT disk
//! labelled `CIDATA` that carries them ([`write_image`]). The daemon writes the disk at
//! every start, so a changed setting reaches the guest at its next boot; the instance id
//! is a hash of the VM's name and every document, so a clone or a change is a new
//! instance to cloud-init (new SSH host keys, the per-instance steps again).
//!
//! The documents are JSON (YAML's subset): nothing a user gives can break out of its
//! string into the document's structure.

use ferry_types::guest::{hostname_from, CloudInit};
use ferry_types::VmSpec;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

/// The seed disk's size: room for the largest documents validation lets through.
pub const IMAGE_SIZE: u64 = 4 << 20;

/// The volume label cloud-init's NoCloud source looks for.
pub const LABEL: [u8; 11] = *b"CIDATA     ";

/// The documents of one seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seed {
    pub instance_id: String,
    pub meta_data: String,
    pub user_data: String,
    pub vendor_data: Option<String>,
    pub network_config: String,
}

impl Seed {
    /// (file name, content) of every file on the disk.
    pub fn files(&self) -> Vec<(&'static str, &str)> {
        let mut f = vec![
            ("meta-data", self.meta_data.as_str()),
            ("user-data", self.user_data.as_str()),
            ("network-config", self.network_config.as_str()),
        ];
        if let Some(v) = &self.vendor_data {
            f.push(("vendor-data", v.as_str()));
        }
        f
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("cloud-init seed {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

fn user_doc(c: &CloudInit, hostname: &str) -> Value {
    let (short, fqdn) = match hostname.split_once('.') {
        Some((s, _)) => (s.to_string(), Some(hostname.to_string())),
        None => (hostname.to_string(), None),
    };
    let mut doc = json!({
        "hostname": short,
        "manage_etc_hosts": true,
        "preserve_hostname": false,
    });
    if let Some(f) = fqdn {
        doc["fqdn"] = json!(f);
        doc["prefer_fqdn_over_hostname"] = json!(false);
    }
    match &c.user {
        Some(u) => {
            let mut user = json!({
                "name": u,
                "shell": "/bin/bash",
                "sudo": "ALL=(ALL) NOPASSWD:ALL",
                "lock_passwd": c.password_hash.is_none(),
            });
            if let Some(h) = &c.password_hash {
                user["hashed_passwd"] = json!(h);
            }
            if !c.ssh_keys.is_empty() {
                user["ssh_authorized_keys"] = json!(c.ssh_keys);
            }
            doc["users"] = json!([user]);
        }
        None => {
            doc["users"] = json!(["default"]);
            if !c.ssh_keys.is_empty() {
                doc["ssh_authorized_keys"] = json!(c.ssh_keys);
            }
        }
    }
    doc
}

fn network_doc(c: &CloudInit, spec: &VmSpec) -> Value {
    let mut config = vec![];
    for (i, nic) in spec.nics.iter().enumerate() {
        let subnet = match c.network.iter().find(|n| n.nic == i) {
            Some(n) if n.ip != "dhcp" => {
                let mut s = json!({"type": "static", "address": n.ip});
                if let Some(g) = &n.gw {
                    s["gateway"] = json!(g);
                }
                s
            }
            _ => json!({"type": "dhcp"}),
        };
        let mut iface = json!({"type": "physical", "name": format!("eth{i}"), "subnets": [subnet]});
        if let Some(m) = &nic.mac {
            iface["mac_address"] = json!(m.to_ascii_lowercase());
        }
        config.push(iface);
    }
    if !c.dns.is_empty() || !c.search.is_empty() {
        config.push(json!({"type": "nameserver", "address": c.dns, "search": c.search}));
    }
    json!({"version": 1, "config": config})
}

/// The seed of a VM with cloud-init settings (None without).
pub fn render(spec: &VmSpec) -> Option<Seed> {
    let c = spec.cloud_init.as_ref()?;
    let hostname = c
        .hostname
        .clone()
        .unwrap_or_else(|| hostname_from(&spec.name));
    let user_data = format!(
        "#cloud-config\n{}\n",
        serde_json::to_string_pretty(&user_doc(c, &hostname)).unwrap_or_default()
    );
    let network_config = format!(
        "{}\n",
        serde_json::to_string_pretty(&network_doc(c, spec)).unwrap_or_default()
    );
    let vendor_data = c.user_data.clone();
    let mut h = Sha256::new();
    for part in [
        spec.name.as_str(),
        hostname.as_str(),
        &user_data,
        &network_config,
        vendor_data.as_deref().unwrap_or(""),
    ] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    let digest = h.finalize();
    let instance_id = format!(
        "ferry-{}",
        digest[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    let meta_data = format!(
        "{}\n",
        serde_json::to_string_pretty(
            &json!({"instance-id": instance_id, "local-hostname": hostname})
        )
        .unwrap_or_default()
    );
    Some(Seed {
        instance_id,
        meta_data,
        user_data,
        vendor_data,
        network_config,
    })
}

/// Writes `seed` as a new FAT disk at `path` (replacing what was there), synced.
pub fn write_image(seed: &Seed, path: &Path) -> Result<(), SeedError> {
    let err = |source| SeedError::Io {
        path: path.display().to_string(),
        source,
    };
    let tmp = path.with_extension("new");
    let _ = std::fs::remove_file(&tmp);
    let mut file = {
        use std::os::unix::fs::OpenOptionsExt;
        // it holds the password hash: its owner's alone from the start
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(err)?
    };
    let written = (|| {
        file.set_len(IMAGE_SIZE)?;
        fatfs::format_volume(
            &mut file,
            fatfs::FormatVolumeOptions::new()
                .volume_label(LABEL)
                .volume_id(0x6665_7279),
        )?;
        file.seek(SeekFrom::Start(0))?;
        {
            let fs = fatfs::FileSystem::new(&mut file, fatfs::FsOptions::new())?;
            {
                let root = fs.root_dir();
                for (name, content) in seed.files() {
                    let mut f = root.create_file(name)?;
                    f.truncate()?;
                    f.write_all(content.as_bytes())?;
                    f.flush()?;
                }
            }
            fs.unmount()?;
        }
        file.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(e));
    }
    std::fs::rename(&tmp, path).map_err(err)
}

/// The files of a seed disk (what the guest would read), for checks.
pub fn read_image(path: &Path) -> Result<Vec<(String, String)>, SeedError> {
    let err = |source| SeedError::Io {
        path: path.display().to_string(),
        source,
    };
    let read = || -> std::io::Result<Vec<(String, String)>> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        let fs = fatfs::FileSystem::new(file, fatfs::FsOptions::new())?;
        let mut out = vec![];
        for e in fs.root_dir().iter() {
            let e = e?;
            if e.is_file() {
                let mut s = String::new();
                e.to_file().read_to_string(&mut s)?;
                out.push((e.file_name(), s));
            }
        }
        Ok(out)
    };
    read().map_err(err)
}

#[cfg(test)]
mod tests;
