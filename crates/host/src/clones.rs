//! Templates and clones (seed 000: "copy or clone a VM and have an identical environment
//! in a short time"). A linked clone's disks are qcow2 overlays on the template's
//! volumes: instant whatever their size, which is why the base must never change (only
//! templates, which are immutable, can be cloned linked). A full clone copies every disk
//! (with progress) and is independent. Clones get a new id, name and MACs.

use crate::error::{AgentError, Refusal, Result};
use crate::records::VmRecord;
use crate::tasks::TaskCtx;
use crate::Host;
use ferry_types::validate::check_name;
use ferry_types::{CloneOf, CloneRequest, ValidationErrors, VmAction};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;

impl Host {
    /// Checks a clone request before any work (for an immediate 4xx).
    pub async fn check_clone(&self, src: &str, req: &CloneRequest) -> Result<()> {
        let mut e = ValidationErrors::default();
        check_name(&mut e, "name", &req.name);
        e.into_result()?;
        let (rec, _) = self.record(src).await?;
        self.refuse_live_restoring(&rec, "clone it")?;
        self.check_name_free(&req.name).await?;
        if !rec.template {
            self.slot(src).state().check(VmAction::Clone)?;
        }
        if req.linked && !rec.template {
            return Err(AgentError::refused(Refusal::Unsupported, format!(
                "linked clones need a template, so their base never changes: run `ferry vm template {src}` first"
            )));
        }
        Ok(())
    }

    #[tracing::instrument(skip_all, fields(vm = %src, clone = %req.name))]
    pub async fn clone_vm(
        &self,
        src: &str,
        req: CloneRequest,
        ctx: Option<&TaskCtx>,
    ) -> Result<()> {
        self.check_clone(src, &req).await?;
        let _op = self.lock_vm(src).await;
        let (rec, _) = self.record(src).await?;
        let id = self.allocate_id().await?;
        self.write_intent(id, &req.name, "clone").await?;
        let r = self.clone_into(src, &req, &rec, id, ctx).await;
        self.clear_intent(id).await;
        r
    }

    async fn clone_into(
        &self,
        src: &str,
        req: &CloneRequest,
        rec: &VmRecord,
        id: u32,
        ctx: Option<&TaskCtx>,
    ) -> Result<()> {
        let mut spec = rec.spec.clone();
        spec.name = req.name.clone();
        for n in &mut spec.nics {
            n.mac = None;
        }
        self.assign_new_macs(&mut spec, id).await?;
        let mut made: Vec<(String, String)> = vec![];
        let total = spec.disks.len().max(1) as f32;
        for i in 0..spec.disks.len() {
            let d = spec.disks[i].clone();
            let base = d.volume.clone().unwrap_or_default();
            let new = format!("vm-{id}-disk-{i}");
            let dp = self.dir_pool(&d.pool).await?;
            let r = if req.linked {
                dp.create_linked(&base, &new).await
            } else {
                let c = ctx.cloned();
                dp.copy(&base, &new, move |p| {
                    if let Some(c) = &c {
                        c.progress((i as f32 + p) / total);
                    }
                })
                .await
            };
            match r {
                Ok(_) => {
                    if let Some(c) = ctx {
                        c.log(format!("disk{i}: {}/{base} -> {}/{new}", d.pool, d.pool));
                    }
                    made.push((d.pool.clone(), new.clone()));
                    if req.linked {
                        spec.disks[i].format = ferry_types::DiskFormat::Qcow2;
                    }
                    spec.disks[i].volume = Some(new);
                    spec.disks[i].size = None;
                }
                Err(e) => {
                    self.remove_volumes(&made).await;
                    return Err(e.into());
                }
            }
        }
        // Its firmware's variables and TPM go with it, as its disks do.
        if let Err(e) = self.clone_nvram(rec, id) {
            self.remove_volumes(&made).await;
            let _ = std::fs::remove_dir_all(self.vm_state_dir(id));
            return Err(e);
        }
        let new_rec = VmRecord {
            clone_of: Some(CloneOf {
                vm: src.to_string(),
                linked: req.linked,
            }),
            ..VmRecord::new(id, spec)
        };
        match self.create_new_record(&new_rec).await {
            Ok(true) => {}
            Ok(false) => {
                self.remove_volumes(&made).await;
                let _ = std::fs::remove_dir_all(self.vm_state_dir(id));
                return Err(AgentError::refused(
                    Refusal::Exists,
                    format!("VM {} already exists", req.name),
                ));
            }
            Err(e) => {
                self.remove_volumes(&made).await;
                let _ = std::fs::remove_dir_all(self.vm_state_dir(id));
                return Err(e);
            }
        }
        let kind = if req.linked { "linked" } else { "full" };
        self.inner.events.emit(
            Some(&req.name),
            "vm",
            format!("{kind} clone of {src} (id {id})"),
        );
        Ok(())
    }
}

/// The most UEFI variables a clone copies (OVMF's are 540 KiB; cold moves take 64 MiB).
const MAX_VARS: u64 = 64 << 20;

impl Host {
    /// Copies VM `rec`'s UEFI variables and (unless it is a template) TPM state to VM
    /// `id` (a clone).
    fn clone_nvram(&self, rec: &VmRecord, id: u32) -> Result<()> {
        let (from, to) = (self.vm_state_dir(rec.id), self.vm_state_dir(id));
        let io = |what: String| move |source| AgentError::Io { what, source };
        for f in ["efivars.fd", "efivars.kind"] {
            // the source's folder is the daemon's (these names are no links QEMU put),
            // the variables' content its QEMU's: at most what OVMF's are
            let src = from.join(f);
            let Ok(file) = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                .open(&src)
            else {
                continue;
            };
            let len = file.metadata().map(|m| m.len()).unwrap_or(u64::MAX);
            if len > MAX_VARS {
                return Err(AgentError::failed(
                    crate::error::Failure::Corrupt,
                    format!("{} is {len} bytes: not UEFI variables", src.display()),
                ));
            }
            std::fs::create_dir_all(&to).map_err(io(format!("Create {}", to.display())))?;
            let mut out = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(to.join(f))
                .map_err(io(format!("Create {}", to.join(f).display())))?;
            std::io::copy(&mut file.take(MAX_VARS), &mut out)
                .map_err(io(format!("Copy {}", src.display())))?;
        }
        // A template's clones are new machines: each gets a TPM of its own (its own
        // keys); a clone of a VM gets a copy of its TPM, as of its disks.
        if rec.spec.tpm && !rec.template {
            if let Some(state) = self.read_tpm_state(rec.id)? {
                self.write_tpm_state(id, &state)?;
            }
        }
        Ok(())
    }
}
