//! Cold migration (seed 000): a stopped VM moves to another host by moving its
//! definition; disks on pools only this host sees are streamed over HTTP (qcow2 files
//! as they are, internal snapshots included); a suspended VM's state file goes along
//! (or stays where it is on a shared pool) and it resumes on the destination.

use crate::error::{AgentError, Failure, Refusal, Result};
use crate::records::Transit;
use crate::records::{vm_key, VmRecord};
use crate::tasks::TaskCtx;
use crate::Migrations;
use ferry_store::StoreJson;
use ferry_types::{ColdIncoming, IncomingFinish, MigrationPhase, VmAction, VmState, VmTransfer};
use std::path::{Path, PathBuf};

/// A file of a VM arriving cold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColdPiece {
    /// The volume of disk N (into the `local` pool).
    Disk(usize),
    /// The suspended state.
    State,
    /// The UEFI variables (a stopped VM's only copy of its boot entries).
    Efivars,
    /// The TPM's state (a VM with a TPM).
    Tpm,
}

impl Migrations {
    /// Moves stopped or suspended VM `name` to host `to`.
    #[tracing::instrument(skip_all, fields(vm = %name, to = %to))]
    pub async fn move_vm(&self, name: &str, to: &str, ctx: &TaskCtx) -> Result<()> {
        let _op = self.lock_vm(name).await;
        let slot = _op.slot().clone();
        let (rec, _) = self.record(name).await?;
        let state = slot.state();
        state.check(VmAction::Move)?;
        self.refuse_live_restoring(&rec, "move it")?;
        let peer = self.peer(to).await?;
        let uploads = self.disks_to_upload(&rec, to).await?;
        // A state file on a shared pool stays put; any other one travels.
        let mut state_upload = false;
        let mut shared_state = None;
        if state == VmState::Suspended {
            let f = rec.suspend_file.clone().ok_or_else(|| {
                AgentError::failed(
                    Failure::Corrupt,
                    format!("{name} is suspended but has no state file"),
                )
            })?;
            if self.in_shared_pool(Path::new(&f)).await? {
                shared_state = Some(f);
            } else {
                state_upload = true;
            }
        }
        let req = ColdIncoming {
            source: self.host_name().to_string(),
            vm: VmTransfer {
                spec: rec.spec.clone(),
                template: rec.template,
                current_snapshot: rec.current_snapshot.clone(),
                clone_of: rec.clone_of.clone(),
                snapshots: self.list_snapshots(name).await?.snapshots,
            },
            suspended: state == VmState::Suspended,
            upload_disks: uploads.clone(),
            state_upload,
            suspend_file: shared_state,
            origin_id: Some(rec.origin_id.unwrap_or(rec.id)),
        };
        ctx.log(format!("registering {name} on {to}"));
        self.set_outgoing(
            name,
            Some((to, crate::Step::Ferry(MigrationPhase::Cold, "cold"))),
        );
        peer.post::<serde_json::Value>("/api/v1/migrations/cold", &req)
            .await?;
        let sent = self
            .send_cold(name, &rec, &peer, &uploads, state_upload, ctx)
            .await;
        self.set_outgoing(name, None);
        if let Err(e) = sent {
            let _ = peer
                .post::<serde_json::Value>(
                    &format!("/api/v1/migrations/cold/{name}/finish"),
                    &IncomingFinish { success: false },
                )
                .await;
            return Err(e);
        }
        // The destination owns it now.
        self.hand_off(name, &rec, &uploads).await?;
        if state_upload {
            if let Some(f) = &rec.suspend_file {
                let _ = std::fs::remove_file(f);
            }
        }
        self.events().emit(
            Some(name),
            "migration",
            format!("{name} moved to {to} (cold)"),
        );
        Ok(())
    }

    /// The disks a cold move copies (those on pools only this host sees); refuses
    /// disks on a replicated pool without a copy on `to` and linked clones whose base
    /// stays here.
    async fn disks_to_upload(&self, rec: &VmRecord, to: &str) -> Result<Vec<usize>> {
        let mut uploads = vec![];
        for (i, d) in rec.spec.disks.iter().enumerate() {
            if let Some(rp) = self.replicated_pool(&d.pool).await? {
                if !rp.hosts.iter().any(|h| h == to) {
                    return Err(AgentError::refused(Refusal::NotMovable, format!(
                        "disk {i} is on replicated pool {}, which keeps no copy on {to} (its hosts: {})",
                        d.pool,
                        rp.hosts.join(", ")
                    )));
                }
                continue;
            }
            if self.pool_locks(&d.pool).await?.is_none() {
                let vol = d.volume.as_deref().unwrap_or_default();
                if let Some(base) = self.dir_pool(&d.pool).await?.meta(vol)?.backing {
                    return Err(AgentError::refused(Refusal::NotMovable, format!(
                        "disk {i} is a linked clone of {}/{base}, which stays here: make a full clone, or move the VM while it runs (ferry vm migrate --with-storage copies it whole)",
                        d.pool
                    )));
                }
                uploads.push(i);
            }
        }
        Ok(uploads)
    }

    /// Sends a cold move's files (disks, the suspended state, UEFI variables) and
    /// asks the destination to finish; the locks it took over come back.
    async fn send_cold(
        &self,
        name: &str,
        rec: &VmRecord,
        peer: &ferry_host::Peer,
        uploads: &[usize],
        state_upload: bool,
        ctx: &TaskCtx,
    ) -> Result<Vec<String>> {
        let n = uploads.len() + usize::from(state_upload);
        for (k, &i) in uploads.iter().enumerate() {
            let d = &rec.spec.disks[i];
            let path = self
                .dir_pool(&d.pool)
                .await?
                .volume_path(d.volume.as_deref().unwrap_or_default())?;
            ctx.log(format!("copying disk{i} ({})", path.display()));
            peer.put_file(&format!("/api/v1/migrations/cold/{name}/disks/{i}"), &path)
                .await?;
            ctx.progress((k + 1) as f32 / (n + 1) as f32);
        }
        if state_upload {
            let f = PathBuf::from(rec.suspend_file.clone().unwrap_or_default());
            ctx.log("copying the suspended state");
            peer.put_file(&format!("/api/v1/migrations/cold/{name}/state"), &f)
                .await?;
        }
        let vars = self.vm_state_dir(rec.id).join("efivars.fd");
        if vars.is_file() {
            ctx.log("copying the UEFI variables");
            let kind = self.vars_kind_of(rec.id).as_str();
            peer.put_file(
                &format!("/api/v1/migrations/cold/{name}/efivars?kind={kind}"),
                &vars,
            )
            .await?;
        }
        // read here, never by following what the VM's user may have put in its folder
        if let Some(state) = self.read_tpm_state(rec.id)? {
            ctx.log("copying the TPM's state");
            peer.put_bytes(&format!("/api/v1/migrations/cold/{name}/tpm"), state)
                .await?;
        }
        peer.post::<Vec<String>>(
            &format!("/api/v1/migrations/cold/{name}/finish"),
            &IncomingFinish { success: true },
        )
        .await
    }

    async fn in_shared_pool(&self, path: &Path) -> Result<bool> {
        for p in self.pool_specs().await? {
            if p.kind == ferry_types::PoolKind::Shared && path.starts_with(&p.path) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Destination: a suspend state file the source names on a shared pool. It is
    /// loaded into QEMU at the next start and deleted after, so it must be one ferry
    /// made: directly in a shared pool's directory, named `.vm-N-suspend.state`, a
    /// regular file, no `..` on the way.
    async fn check_shared_state(&self, f: &str) -> Result<()> {
        let p = Path::new(f);
        let refuse = |why: &str| {
            AgentError::invalid(
                "suspend_file",
                format!("{f} is not a suspend file of a shared pool: {why}"),
            )
        };
        if !p.components().all(|c| {
            matches!(
                c,
                std::path::Component::RootDir | std::path::Component::Normal(_)
            )
        }) {
            return Err(refuse("not a plain absolute path"));
        }
        let named = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix(".vm-"))
            .and_then(|n| n.strip_suffix("-suspend.state"))
            .is_some_and(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()));
        if !named {
            return Err(refuse("not named .vm-ID-suspend.state"));
        }
        let parent = p.parent().unwrap_or(p);
        let shared = self
            .pool_specs()
            .await?
            .into_iter()
            .any(|s| s.kind == ferry_types::PoolKind::Shared && Path::new(&s.path) == parent);
        if !shared {
            return Err(refuse("not in a shared pool's directory"));
        }
        if !std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_file()) {
            return Err(refuse("no such regular file"));
        }
        Ok(())
    }

    /// Destination: registers a VM arriving cold (not startable until finished).
    pub async fn prepare_cold(&self, req: ColdIncoming) -> Result<()> {
        let name = req.vm.spec.name.clone();
        let _op = self.lock_vm(&name).await;
        self.may_receive(&req.vm.spec).await?;
        if let Some(f) = &req.suspend_file {
            self.check_shared_state(f).await?;
        }
        let id = self.allocate_id().await?;
        let mut spec = req.vm.spec.clone();
        for (i, d) in spec.disks.iter_mut().enumerate() {
            if req.upload_disks.contains(&i) {
                // Arrives into this host's local pool.
                d.pool = "local".into();
                d.volume = Some(format!("vm-{id}-disk-{i}"));
            } else if self.pool_locks(&d.pool).await?.is_none() {
                return Err(AgentError::refused(
                    Refusal::NotMovable,
                    format!(
                        "disk{i}'s pool {} is not shared on {}",
                        d.pool,
                        self.host_name()
                    ),
                ));
            }
        }
        let rec = VmRecord {
            template: req.vm.template,
            current_snapshot: req.vm.current_snapshot.clone(),
            clone_of: req.vm.clone_of.clone(),
            transit: Some(Transit::From(req.source.clone())),
            origin_id: req.origin_id.filter(|&o| o != id),
            suspend_file: req.suspend_file.clone(),
            last_state: if req.suspended {
                VmState::Suspended
            } else {
                VmState::Stopped
            },
            ..VmRecord::new(id, spec)
        };
        if !self.store().create_json(&vm_key(&name), &rec).await? {
            return Err(AgentError::refused(
                Refusal::Exists,
                format!("A VM named {name} exists"),
            ));
        }
        for s in &req.vm.snapshots {
            self.store()
                .put_json(&ferry_store::keys::host::snapshot(&name, &s.name), s)
                .await?;
        }
        let agent = self.clone();
        tokio::spawn(async move { agent.watch_incoming(name, None).await });
        Ok(())
    }

    /// Destination: where an uploaded piece of an arriving VM goes, as (final path,
    /// partial path).
    pub async fn cold_upload_target(
        &self,
        name: &str,
        piece: ColdPiece,
    ) -> Result<(PathBuf, PathBuf)> {
        let (rec, _) = self.record(name).await?;
        if Transit::from(&rec.transit).is_none() {
            return Err(AgentError::refused(
                Refusal::NotInTransit,
                format!("{name} is not arriving here"),
            ));
        }
        if piece == ColdPiece::Efivars {
            let dir = self.vm_state_dir(rec.id);
            std::fs::create_dir_all(&dir).map_err(|source| AgentError::Io {
                what: format!("Create {}", dir.display()),
                source,
            })?;
            return Ok((dir.join("efivars.fd"), dir.join(".partial-efivars.fd")));
        }
        if piece == ColdPiece::Tpm {
            // received beside the TPM's folder, which is made anew from it when done
            let dir = self.vm_state_dir(rec.id);
            std::fs::create_dir_all(&dir).map_err(|source| AgentError::Io {
                what: format!("Create {}", dir.display()),
                source,
            })?;
            return Ok((self.tpm_dir(rec.id), dir.join(".partial-tpm")));
        }
        let dp = self.dir_pool("local").await?;
        let file = match piece {
            ColdPiece::Disk(i) => {
                let d = rec
                    .spec
                    .disks
                    .get(i)
                    .ok_or_else(|| AgentError::NotFound(format!("disk{i} of {name}")))?;
                if d.pool != "local" {
                    return Err(AgentError::failed(
                        Failure::Migration,
                        format!("disk{i} of {name} is not copied"),
                    ));
                }
                d.volume.clone().unwrap_or_default()
            }
            _ => format!(".vm-{}-suspend.state", rec.id),
        };
        let path = dp
            .volume_path(file.trim_start_matches('.'))
            .map(|p| p.with_file_name(&file))?;
        let partial = path.with_file_name(format!(".partial-{}", file.trim_start_matches('.')));
        Ok((path, partial))
    }

    /// Destination: how many bytes an upload of `piece` may take: UEFI variables 64 MiB,
    /// a suspend state the VM's memory plus 512 MiB, and nothing may leave the file
    /// system under it with less than 1 GiB free.
    pub async fn cold_upload_limit(&self, name: &str, piece: ColdPiece, at: &Path) -> Result<u64> {
        let (rec, _) = self.record(name).await?;
        let dir = at.parent().unwrap_or(at);
        let free = nix::sys::statvfs::statvfs(dir)
            .map(|s| s.blocks_available() * s.fragment_size())
            .map_err(|e| AgentError::Io {
                what: format!("Free space under {}", dir.display()),
                source: e.into(),
            })?;
        let room = free.saturating_sub(1 << 30);
        Ok(match piece {
            ColdPiece::Efivars => room.min(64 << 20),
            ColdPiece::Tpm => room.min(ferry_host::tpm::MAX_STATE),
            ColdPiece::State => room.min((rec.spec.memory_mib << 20) + (512 << 20)),
            ColdPiece::Disk(_) => room,
        })
    }

    /// Destination: the template the arriving VM's UEFI variables came from.
    pub async fn record_vars_kind(
        &self,
        name: &str,
        kind: ferry_host::lifecycle::VarsKind,
    ) -> Result<()> {
        let (rec, _) = self.record(name).await?;
        if Transit::from(&rec.transit).is_none() {
            return Err(AgentError::refused(
                Refusal::NotInTransit,
                format!("{name} is not arriving here"),
            ));
        }
        self.set_vars_kind(rec.id, kind)
    }

    /// Destination: an uploaded piece is complete.
    pub async fn cold_upload_done(
        &self,
        name: &str,
        piece: ColdPiece,
        partial: &Path,
        path: &Path,
    ) -> Result<()> {
        if let ColdPiece::Disk(i) = piece {
            // The file's format is the one its VM's definition records, never its header.
            let (rec, _) = self.record(name).await?;
            let d = rec
                .spec
                .disks
                .get(i)
                .ok_or_else(|| AgentError::NotFound(format!("disk{i} of {name}")))?;
            let dp = self.dir_pool("local").await?;
            let vol = d.volume.as_deref().unwrap_or_default();
            // Published first (without a record it is raw, which opens nothing), and
            // recorded only once the file passed the check in its format.
            std::fs::rename(partial, path).map_err(|source| AgentError::Io {
                what: format!("Publish {}", path.display()),
                source,
            })?;
            if let Err(e) = dp.register_checked(vol, d.format).await {
                let _ = std::fs::remove_file(path);
                return Err(e.into());
            }
            return Ok(());
        }
        if piece == ColdPiece::Tpm {
            let (rec, _) = self.record(name).await?;
            let state = std::fs::read(partial).map_err(|source| AgentError::Io {
                what: format!("Read {}", partial.display()),
                source,
            });
            let _ = std::fs::remove_file(partial);
            return self.write_tpm_state(rec.id, &state?);
        }
        std::fs::rename(partial, path).map_err(|source| AgentError::Io {
            what: format!("Publish {}", path.display()),
            source,
        })?;
        if piece == ColdPiece::State {
            let f = path.display().to_string();
            self.update_record(name, |r| r.suspend_file = Some(f.clone()))
                .await?;
        }
        Ok(())
    }

    /// Destination: the source's word on a cold move.
    pub async fn finish_cold(&self, name: &str, success: bool) -> Result<Vec<String>> {
        let op = self.lock_vm(name).await;
        let slot = op.slot().clone();
        let (rec, _) = self.record(name).await?;
        let Some(source) = Transit::from(&rec.transit).map(String::from) else {
            return Ok(vec![]);
        };
        if !success {
            if let Some(f) = &rec.suspend_file {
                if !self.in_shared_pool(Path::new(f)).await? {
                    let _ = std::fs::remove_file(f);
                }
            }
            self.drop_incoming_held(&op).await;
            return Ok(vec![]);
        }
        let locks = if rec.last_state == VmState::Suspended {
            // A suspended VM keeps its disks locked; they change hands now.
            self.take_over_locks(&rec.spec, &source).await?
        } else {
            vec![]
        };
        self.update_record(name, |r| r.transit = None).await?;
        slot.with(|rt| rt.state = rec.last_state);
        self.events().emit(
            Some(name),
            "migration",
            format!("{name} arrived from {source} ({})", rec.last_state),
        );
        Ok(locks)
    }
}
