//! OVA import: an OVF appliance (a tar of the `.ovf` descriptor, its disks and a
//! manifest) becomes a VM. The descriptor is read by `ferry_storage::ovf`; each disk
//! it names is taken out of the tar by its exact name (never by a path the archive
//! chooses), checked and converted like any imported image (a VMDK naming other files,
//! a backing file, a truncated image: refused), and the VM defined with them. What the
//! descriptor holds that ferry cannot map is listed in the task's log and result and in
//! the VM's description. Nothing is left behind when any step fails.

use crate::error::{AgentError, Refusal, Result};
use crate::Host;
use ferry_storage::ovf::{self, OvfPlan};
use ferry_types::{OvaImport, VmSpec};
use serde_json::json;
use std::io::Read;
use std::path::{Path, PathBuf};

fn invalid(reason: impl Into<String>) -> AgentError {
    AgentError::invalid("source", reason)
}

/// The descriptor inside the OVA at `src` (its first `.ovf` entry), bounded.
fn read_descriptor(src: &Path) -> std::result::Result<String, String> {
    let f = std::fs::File::open(src).map_err(|e| format!("{}: {e}", src.display()))?;
    let mut ar = tar::Archive::new(f);
    for entry in ar.entries().map_err(|e| format!("not an OVA (tar): {e}"))? {
        let entry = entry.map_err(|e| format!("not an OVA (tar): {e}"))?;
        let name = entry
            .path()
            .map_err(|e| e.to_string())?
            .to_string_lossy()
            .into_owned();
        if name.ends_with(".ovf") && entry.header().entry_type().is_file() {
            if entry.size() > ovf::MAX_OVF as u64 {
                return Err(format!("{name} is larger than {} bytes", ovf::MAX_OVF));
            }
            let mut xml = String::new();
            entry
                .take(ovf::MAX_OVF as u64)
                .read_to_string(&mut xml)
                .map_err(|e| format!("{name}: {e}"))?;
            return Ok(xml);
        }
    }
    Err("not an OVA: it holds no .ovf descriptor".into())
}

/// Copies the entries named `files[i]` (exact names, regular files) to `out[i]`, each
/// at most `limit` bytes in all; every file must be there.
fn extract(
    src: &Path,
    files: &[String],
    out: &[PathBuf],
    limit: u64,
) -> std::result::Result<(), String> {
    let f = std::fs::File::open(src).map_err(|e| format!("{}: {e}", src.display()))?;
    let mut ar = tar::Archive::new(f);
    let mut found = vec![false; files.len()];
    let mut total = 0u64;
    for entry in ar.entries().map_err(|e| format!("not an OVA (tar): {e}"))? {
        let mut entry = entry.map_err(|e| format!("not an OVA (tar): {e}"))?;
        let name = entry
            .path()
            .map_err(|e| e.to_string())?
            .to_string_lossy()
            .into_owned();
        let Some(i) = files.iter().position(|f| *f == name) else {
            continue;
        };
        if !entry.header().entry_type().is_file() {
            return Err(format!("{name} in the OVA is not a regular file"));
        }
        if found[i] {
            return Err(format!("{name} is in the OVA twice"));
        }
        total = total.saturating_add(entry.size());
        if total > limit {
            return Err(format!(
                "the OVA's disks need more than the {limit} bytes the pool has free"
            ));
        }
        let mut o = ferry_storage::create_private(&out[i])
            .map_err(|e| format!("{}: {e}", out[i].display()))?;
        let size = entry.size();
        let n = std::io::copy(&mut (&mut entry).take(size), &mut o)
            .map_err(|e| format!("{name}: {e}"))?;
        if n != size {
            return Err(format!("{name} is truncated in the OVA"));
        }
        o.sync_all()
            .map_err(|e| format!("{}: {e}", out[i].display()))?;
        found[i] = true;
    }
    if let Some(i) = found.iter().position(|f| !f) {
        return Err(format!(
            "{} is named by the descriptor but not in the OVA",
            files[i]
        ));
    }
    Ok(())
}

/// The VM an OVF plan makes, with its disks as `volumes`.
pub fn spec_of(
    plan: &OvfPlan,
    req: &OvaImport,
    pool: &str,
    volumes: &[String],
) -> std::result::Result<VmSpec, serde_json::Error> {
    let disks: Vec<_> = plan
        .disks
        .iter()
        .zip(volumes)
        .map(|(d, v)| json!({"bus": d.bus, "pool": pool, "volume": v}))
        .collect();
    let nics: Vec<_> = plan
        .nics
        .iter()
        .map(|m| json!({"model": m, "bridge": req.bridge.clone().unwrap_or_default()}))
        .collect();
    let cdroms: Vec<_> = (0..plan.cdroms.min(4)).map(|_| json!({})).collect();
    let mut description = format!("Imported from OVA {}", req.source);
    if !plan.unmapped.is_empty() {
        description.push_str(". Not mapped: ");
        description.push_str(&plan.unmapped.join("; "));
    }
    serde_json::from_value(json!({
        "name": req.name,
        "cpus": plan.cpus,
        "memory_mib": plan.memory_mib.max(ferry_types::MIN_MEMORY_MIB),
        "firmware": plan.firmware,
        "disks": disks,
        "cdroms": cdroms,
        "nics": nics,
        "description": description.chars().take(2000).collect::<String>(),
    }))
}

impl Host {
    /// Starts importing the OVA `req.source` (a file on this host) as VM `req.name`
    /// with its disks in `pool`; the task's result names the VM, its disks and what was
    /// not mapped.
    pub async fn import_ova(&self, pool: &str, req: OvaImport) -> Result<String> {
        req.validate()?;
        let src = PathBuf::from(&req.source);
        if !src.is_file() {
            return Err(invalid(format!("{} is not a readable file", req.source)));
        }
        if self.get_vm(&req.name).await.is_ok() {
            return Err(AgentError::refused(
                Refusal::Exists,
                format!("VM {} already exists", req.name),
            ));
        }
        let dp = self.dir_pool(pool).await?;
        // The descriptor first: a bad one is refused before the task starts.
        let s = src.clone();
        let xml = tokio::task::spawn_blocking(move || read_descriptor(&s))
            .await
            .map_err(|e| invalid(e.to_string()))?
            .map_err(invalid)?;
        let plan = ovf::parse(&xml).map_err(invalid)?;
        if !plan.nics.is_empty() && req.bridge.is_none() {
            return Err(AgentError::invalid(
                "bridge",
                format!(
                    "the appliance has {} NIC(s): name the bridge they go to",
                    plan.nics.len()
                ),
            ));
        }
        let stem: String = req.name.chars().take(50).collect();
        let volumes: Vec<String> = (0..plan.disks.len())
            .map(|i| format!("{stem}-disk{i}"))
            .collect();
        // The VM it makes is checked before anything is copied.
        let mut spec = spec_of(&plan, &req, pool, &volumes).map_err(|e| invalid(e.to_string()))?;
        spec.fill_arch_defaults();
        spec.validate()?;
        for v in &volumes {
            if dp.volume_path(v)?.exists() {
                return Err(AgentError::refused(
                    Refusal::Exists,
                    format!("Volume {pool}/{v} already exists"),
                ));
            }
        }
        let host = self.clone();
        let pool = pool.to_string();
        Ok(self
            .inner
            .tasks
            .spawn("vm.import-ova", &req.name.clone(), move |ctx| async move {
                for u in &plan.unmapped {
                    ctx.log(format!("not mapped: {u}"));
                }
                let parts: Vec<PathBuf> = volumes
                    .iter()
                    .map(|v| dp.partial_path(v, "ova"))
                    .collect::<std::result::Result<_, _>>()?;
                let files: Vec<String> = plan.disks.iter().map(|d| d.file.clone()).collect();
                let free = dp.capacity().map(|(_, free)| free)?;
                let (s, f, p) = (src.clone(), files.clone(), parts.clone());
                let extracted = tokio::task::spawn_blocking(move || extract(&s, &f, &p, free))
                    .await
                    .map_err(|e| invalid(e.to_string()))
                    .and_then(|r| r.map_err(invalid));
                let mut made: Vec<String> = vec![];
                let mut result = extracted;
                if result.is_ok() {
                    for (i, (part, vol)) in parts.iter().zip(&volumes).enumerate() {
                        let c = ctx.clone();
                        let n = plan.disks.len() as f32;
                        match dp
                            .import(vol, part, None, move |p| c.progress((i as f32 + p) / n))
                            .await
                        {
                            Ok(v) => {
                                ctx.log(format!(
                                    "disk {i}: {} -> volume {pool}/{vol} ({}, {} bytes, bus {:?})",
                                    files[i], v.format, v.virtual_bytes, plan.disks[i].bus
                                ));
                                made.push(vol.clone());
                            }
                            Err(e) => {
                                result = Err(invalid(format!("disk {} ({}): {e}", i, files[i])));
                                break;
                            }
                        }
                    }
                }
                for p in &parts {
                    let _ = std::fs::remove_file(p);
                }
                let created = match result {
                    Ok(()) => match spec_of(&plan, &req, &pool, &volumes) {
                        Ok(spec) => host.create_vm(spec).await,
                        Err(e) => Err(invalid(e.to_string())),
                    },
                    Err(e) => Err(e),
                };
                match created {
                    Ok(vm) => {
                        ctx.result(json!({
                            "vm": vm.spec.name,
                            "disks": made,
                            "unmapped": plan.unmapped,
                        }));
                        Ok(())
                    }
                    Err(e) => {
                        for v in &made {
                            let _ = dp.delete(v).await;
                        }
                        Err(e)
                    }
                }
            }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spec_keeps_the_plan_and_lists_what_was_left_out() {
        let plan = ovf::parse(include_str!("ova_test.ovf")).unwrap();
        let req = OvaImport {
            source: "/x/web.ova".into(),
            name: "web".into(),
            bridge: Some("br0".into()),
        };
        let spec = spec_of(&plan, &req, "local", &["web-disk0".into()]).unwrap();
        spec.validate().unwrap();
        assert_eq!((spec.cpus, spec.memory_mib), (2, 2048));
        assert_eq!(spec.disks[0].volume.as_deref(), Some("web-disk0"));
        assert_eq!(spec.nics[0].bridge, "br0");
        assert!(
            spec.description.contains("Not mapped: "),
            "{}",
            spec.description
        );
    }
}
