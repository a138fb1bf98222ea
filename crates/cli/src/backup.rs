//! `ferry backup-store ...` and `ferry backup ...`: stores, backups, restores, prune,
//! garbage collection, verify. A backup runs on the VM's host (found in the cluster's
//! VM list); a restore on the host the CLI talks to, or `--host`.

use super::*;
use ferry_types::{
    Backup, BackupBootCheck, BackupBootCheckResult, BackupFileKind, BackupFiles, BackupGcReport,
    BackupJob, BackupJobResult, BackupJobSpec, BackupKeep, BackupList, BackupPrune, BackupRestore,
    BackupRun, BackupSelection, BackupStore, BackupStoreCreate, BackupStoreInfo, BackupSync,
    BackupSyncReport, BackupVerify, BackupVerifyReport, PruneResult,
};

#[derive(Subcommand, Debug)]
pub enum StoreCmd {
    /// Define a backup store: a folder (local, or a share every host mounts at the same
    /// path). An empty folder becomes a store; an existing store is adopted.
    Create {
        name: String,
        #[arg(long)]
        path: String,
    },
    List,
    /// A store with its usage and dedup factor.
    Show {
        name: String,
    },
    /// Forget a store's definition (its folder and backups stay).
    Delete {
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum BackupCmd {
    /// Back a VM up now (incremental when its change tracking is sound; otherwise a
    /// full read, and the task says why). `--json` prints the backup.
    Run {
        vm: String,
        #[arg(long)]
        store: String,
    },
    List {
        #[arg(long)]
        vm: Option<String>,
        #[arg(long)]
        store: Option<String>,
    },
    Show {
        id: String,
    },
    /// List the files of a backup without restoring it (`/`: its disks; `/disk0`: a
    /// disk's volumes; `/disk0/p1/etc`: a folder), or download a file or a folder (a
    /// tar archive) with --download. A helper VM reads the backup; the first call
    /// starts it (seconds).
    Files {
        id: String,
        /// The folder (or, with --download, the file or folder).
        #[arg(default_value = "/")]
        path: String,
        /// Download to this file (`-`: standard output).
        #[arg(long, short = 'o')]
        download: Option<String>,
    },
    /// Boot a backup to check it (SureBackup): its disks as throw-away overlays on the
    /// backup, its NICs on a hub of their own (no network), until the marker shows on
    /// its serial console. Fails when it does not come up in time.
    BootCheck {
        id: String,
        /// Text the guest prints on its serial console once up (default "login:").
        #[arg(long)]
        marker: Option<String>,
        /// Seconds to wait for it (default 300).
        #[arg(long)]
        timeout: Option<u32>,
    },
    /// Pull the backups of another ferry's store into a store here (a second site
    /// keeps the first one's backups): only backups and chunks this store lacks; encrypted
    /// ones stay sealed.
    Sync {
        /// The store here.
        #[arg(long)]
        store: String,
        /// The source's API, `https://host:8470`.
        #[arg(long = "from")]
        url: String,
        /// The store there.
        #[arg(long)]
        remote_store: String,
        /// A file holding an API token of the source (Modify on /backup-stores there).
        #[arg(long)]
        remote_token_file: std::path::PathBuf,
        /// The source's CA certificate (PEM; its `{state_dir}/pki/ca.crt`).
        #[arg(long)]
        remote_ca: std::path::PathBuf,
        /// Only this VM's backups.
        #[arg(long)]
        vm: Option<String>,
    },
    /// Delete a backup (garbage collection frees its chunks).
    Delete {
        id: String,
    },
    /// Restore a backup as a new VM.
    Restore {
        id: String,
        /// The new VM's name.
        #[arg(long = "as")]
        name: String,
        /// The pool for its disks (default: the backed-up disks' pools, else `default`).
        #[arg(long)]
        pool: Option<String>,
        /// The host to restore on (default: the one the CLI talks to).
        #[arg(long)]
        host: Option<String>,
        /// Start it when restored.
        #[arg(long)]
        start: bool,
        /// Live-restore: start the VM at once; its disks fill from the backup in the
        /// background (`vm show` lists the restore until they have).
        #[arg(long)]
        live: bool,
        /// With --live: how fast the disks fill, per second (e.g. 50M).
        #[arg(long, requires = "live")]
        bwlimit: Option<ferry_types::ByteSize>,
    },
    /// Apply a retention policy to a VM's backups in a store.
    Prune {
        vm: String,
        #[arg(long)]
        store: String,
        #[arg(long, default_value_t = 0)]
        keep_last: u32,
        #[arg(long, default_value_t = 0)]
        keep_hourly: u32,
        #[arg(long, default_value_t = 0)]
        keep_daily: u32,
        #[arg(long, default_value_t = 0)]
        keep_weekly: u32,
        #[arg(long, default_value_t = 0)]
        keep_monthly: u32,
        #[arg(long, default_value_t = 0)]
        keep_yearly: u32,
        /// Only say what would go.
        #[arg(long)]
        dry_run: bool,
    },
    /// Free the chunks no backup uses any more.
    Gc {
        #[arg(long)]
        store: String,
    },
    /// Scheduled backups: create, list, show, delete, run.
    #[command(subcommand)]
    Job(JobCmd),
    /// Check every chunk (or those of backups of the last N days) against its name.
    Verify {
        #[arg(long)]
        store: String,
        #[arg(long)]
        since_days: Option<u32>,
    },
}

#[derive(Subcommand, Debug)]
pub enum JobCmd {
    /// Define a job: which VMs (--vm a,b or --all [--host h1,h2]) to which store, when
    /// (UTC: "daily 02:00", "mon..fri 22:30", "*:15", "hourly", "4h") and what to keep.
    Create {
        name: String,
        #[arg(long)]
        store: String,
        #[arg(long)]
        schedule: String,
        #[arg(long, value_delimiter = ',')]
        vm: Vec<String>,
        #[arg(long)]
        all: bool,
        #[arg(long, value_delimiter = ',')]
        host: Vec<String>,
        #[arg(long, default_value_t = 0)]
        keep_last: u32,
        #[arg(long, default_value_t = 0)]
        keep_hourly: u32,
        #[arg(long, default_value_t = 0)]
        keep_daily: u32,
        #[arg(long, default_value_t = 0)]
        keep_weekly: u32,
        #[arg(long, default_value_t = 0)]
        keep_monthly: u32,
        #[arg(long, default_value_t = 0)]
        keep_yearly: u32,
        /// Boot each new backup to check it (see `ferry backup boot-check`).
        #[arg(long)]
        boot_check: bool,
        /// With --boot-check: the text the guest shows on its serial console when up
        /// (default "login:").
        #[arg(long, requires = "boot_check")]
        boot_marker: Option<String>,
        /// With --boot-check: seconds to wait for it (default 300).
        #[arg(long, requires = "boot_check")]
        boot_timeout: Option<u32>,
    },
    List,
    Show {
        name: String,
    },
    Delete {
        name: String,
    },
    /// Run a job now (besides its schedule).
    Run {
        name: String,
    },
}

fn when(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| t.to_string())
}

pub(crate) async fn store(c: &Client, g: &Global, cmd: StoreCmd) -> Result<()> {
    match cmd {
        StoreCmd::Create { name, path } => {
            let s: BackupStore = c
                .send(
                    Method::POST,
                    "/api/v1/backup-stores",
                    &BackupStoreCreate {
                        name: name.clone(),
                        path: path.clone(),
                    },
                )
                .await?;
            if g.json {
                return print_json(&s);
            }
            println!("backup store {name} at {path}");
            Ok(())
        }
        StoreCmd::List => {
            let stores: Vec<BackupStore> = c.get("/api/v1/backup-stores").await?;
            if g.json {
                return print_json(&stores);
            }
            let mut t = table(&["NAME", "PATH"]);
            for s in stores {
                t.add_row(vec![s.name, s.path]);
            }
            println!("{t}");
            Ok(())
        }
        StoreCmd::Show { name } => {
            let s: BackupStoreInfo = c.get(&format!("/api/v1/backup-stores/{name}")).await?;
            if g.json {
                return print_json(&s);
            }
            let u = &s.usage;
            println!("{}: {}", s.store.name, s.store.path);
            println!(
                "  {} backups, {} chunks, {} stored for {} of disks (dedup factor {:.2}), {} free",
                u.backups,
                u.chunks,
                ByteSize(u.stored_bytes),
                ByteSize(u.logical_bytes),
                u.dedup_factor,
                ByteSize(u.free_bytes)
            );
            if u.unreferenced_chunks > 0 {
                println!(
                    "  {} chunks unused (the next `ferry backup gc` frees them)",
                    u.unreferenced_chunks
                );
            }
            Ok(())
        }
        StoreCmd::Delete { name } => {
            let _: Value = c
                .request(
                    Method::DELETE,
                    &format!("/api/v1/backup-stores/{name}"),
                    None,
                )
                .await?;
            println!("backup store {name} forgotten (its files stay)");
            Ok(())
        }
    }
}

/// The client for the host holding `vm`.
async fn vm_host(c: &Client, vm: &str) -> Result<Client> {
    if c.get::<Vm>(&format!("/api/v1/vms/{vm}")).await.is_ok() {
        return Ok(c.clone());
    }
    let all: Vec<Vm> = c.get(&format!("/api/v1/vms?q={vm}")).await?;
    match all
        .iter()
        .find(|v| v.spec.name == vm)
        .and_then(|v| v.host.clone())
    {
        Some(h) => Ok(c.at_node(&h)),
        None => anyhow::bail!("VM {vm} not found"),
    }
}

async fn files(
    c: &Client,
    g: &Global,
    id: &str,
    path: &str,
    download: Option<String>,
) -> Result<()> {
    let api = format!("/api/v1/backups/{id}/files");
    if let Some(to) = download {
        let dl = format!("{api}/download");
        let n = if to == "-" {
            let mut out = std::io::stdout();
            c.download(&dl, &[("path", path)], &mut out).await?
        } else {
            // written next to the target, renamed into place only when complete
            let part = format!("{to}.part");
            let mut f = std::io::BufWriter::new(
                std::fs::File::create(&part).with_context(|| format!("Create {part}"))?,
            );
            let n = match c.download(&dl, &[("path", path)], &mut f).await {
                Ok(n) => n,
                Err(e) => {
                    drop(f);
                    let _ = std::fs::remove_file(&part);
                    return Err(e);
                }
            };
            drop(f);
            std::fs::rename(&part, &to).with_context(|| format!("Rename {part} to {to}"))?;
            n
        };
        if to != "-" && !g.json {
            eprintln!("{} written to {to}", ByteSize(n));
        }
        return Ok(());
    }
    let l: BackupFiles = c.get_query(&api, &[("path", path)]).await?;
    if g.json {
        return print_json(&l);
    }
    let mut t = table(&["KIND", "SIZE", "MODIFIED", "MODE", "NAME"]);
    for e in &l.entries {
        let kind = match e.kind {
            BackupFileKind::Disk => "disk",
            BackupFileKind::Volume => "volume",
            BackupFileKind::Dir => "dir",
            BackupFileKind::File => "file",
            BackupFileKind::Symlink => "link",
            BackupFileKind::Other => "other",
        };
        // names and link targets are a guest's: no control characters reach the terminal
        let mut name = clean(&e.name);
        if let Some(to) = &e.target {
            name = format!("{name} -> {}", clean(to));
        }
        if let Some(fs) = &e.fs {
            name = format!("{name} ({})", clean(fs));
        }
        if let Some(err) = &e.error {
            name = format!("{name} (unreadable: {})", clean(err));
        }
        t.add_row(vec![
            kind.to_string(),
            ByteSize(e.size).to_string(),
            if e.mtime > 0 {
                when(e.mtime)
            } else {
                String::new()
            },
            if e.mode > 0 {
                format!("{:04o}", e.mode)
            } else {
                String::new()
            },
            name,
        ]);
    }
    println!("{}\n{t}", l.path);
    if l.truncated {
        println!(
            "(more entries than one listing carries: the first {} shown)",
            l.entries.len()
        );
    }
    Ok(())
}

/// `s` with control characters shown as `?` (what a guest wrote, printed to a terminal).
fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() && c != '\n' { '?' } else { c })
        .collect()
}

fn print_backup(b: &Backup) {
    println!(
        "{} of {} in {} ({}, {}, taken on {} at {})",
        b.id,
        b.vm,
        b.store,
        b.state,
        b.consistency,
        b.host,
        when(b.started)
    );
    for d in &b.disks {
        let how = match &d.reason {
            Some(r) => format!("full: {r}"),
            None => d.mode.clone(),
        };
        println!(
            "  {}: {} ({how}), {} read, {} new",
            d.name,
            ByteSize(d.size),
            ByteSize(d.read_bytes),
            ByteSize(d.new_bytes)
        );
    }
}

pub(crate) async fn run(c: &Client, g: &Global, cmd: BackupCmd) -> Result<()> {
    match cmd {
        BackupCmd::Run { vm, store } => {
            let at = vm_host(c, &vm).await?;
            let t: TaskAccepted = at
                .send(
                    Method::POST,
                    "/api/v1/backups",
                    &BackupRun {
                        vm: vm.clone(),
                        store,
                    },
                )
                .await?;
            let done = at.wait_task(t, g.json).await?;
            let b: Backup = serde_json::from_value(done.result.unwrap_or_default())
                .context("the backup task's result")?;
            if g.json {
                return print_json(&b);
            }
            print_backup(&b);
            Ok(())
        }
        BackupCmd::Files { id, path, download } => files(c, g, &id, &path, download).await,
        BackupCmd::Sync {
            store,
            url,
            remote_store,
            remote_token_file,
            remote_ca,
            vm,
        } => {
            let token = crate::client::read_secret(Some(&remote_token_file), "FERRY_REMOTE_TOKEN")?
                .context("--remote-token-file is empty")?;
            let ca_pem = std::fs::read_to_string(&remote_ca)
                .with_context(|| format!("Read {}", remote_ca.display()))?;
            let t: TaskAccepted = c
                .send(
                    Method::POST,
                    &format!("/api/v1/backup-stores/{store}/sync"),
                    &BackupSync {
                        url,
                        remote_store,
                        token,
                        ca_pem,
                        vm,
                    },
                )
                .await?;
            let done = c.wait_task(t, g.json).await?;
            let r: BackupSyncReport = serde_json::from_value(done.result.unwrap_or_default())
                .context("the sync's result")?;
            if g.json {
                print_json(&r)?;
            } else {
                println!(
                    "{} backups copied ({} chunks, {} fetched, {} chunks here already), {} here already",
                    r.copied.len(),
                    r.chunks_fetched,
                    ByteSize(r.bytes_fetched),
                    r.chunks_reused,
                    r.present
                );
                for f in &r.failed {
                    println!("  {}: {}", f.backup, clean(&f.error));
                }
            }
            if !r.failed.is_empty() {
                anyhow::bail!("{} backups could not be copied", r.failed.len());
            }
            Ok(())
        }
        BackupCmd::BootCheck {
            id,
            marker,
            timeout,
        } => {
            let t: TaskAccepted = c
                .send(
                    Method::POST,
                    &format!("/api/v1/backups/{id}/boot-check"),
                    &BackupBootCheck {
                        marker,
                        timeout_s: timeout,
                    },
                )
                .await?;
            let done = c.wait_task(t, g.json).await?;
            let r: BackupBootCheckResult = serde_json::from_value(done.result.unwrap_or_default())
                .context("the boot check's result")?;
            if g.json {
                print_json(&r)?;
            } else if r.booted {
                println!(
                    "backup {} of {} boots: {:?} after {:.0} s",
                    r.backup, r.vm, r.marker, r.seconds
                );
            }
            if !r.booted {
                anyhow::bail!(
                    "backup {} of {} did not boot: {:?} not seen within {:.0} s{}; its console ended with:\n{}",
                    r.backup,
                    r.vm,
                    r.marker,
                    r.seconds,
                    r.reason.as_deref().map(|w| format!(" ({})", clean(w))).unwrap_or_default(),
                    clean(&r.console)
                );
            }
            Ok(())
        }
        BackupCmd::List { vm, store } => {
            let mut q = Vec::new();
            if let Some(v) = &vm {
                q.push(format!("vm={v}"));
            }
            if let Some(s) = &store {
                q.push(format!("store={s}"));
            }
            let l: BackupList = c.get(&format!("/api/v1/backups?{}", q.join("&"))).await?;
            if g.json {
                return print_json(&l);
            }
            let mut t = table(&[
                "ID", "VM", "STORE", "TAKEN", "STATE", "SIZE", "READ", "MODE",
            ]);
            for b in l.backups {
                let size: u64 = b.disks.iter().map(|d| d.size).sum();
                let read: u64 = b.disks.iter().map(|d| d.read_bytes).sum();
                let mode = if b.disks.iter().all(|d| d.mode == "incremental") {
                    "incremental"
                } else {
                    "full"
                };
                t.add_row(vec![
                    b.id,
                    b.vm,
                    b.store,
                    when(b.started),
                    b.state,
                    ByteSize(size).to_string(),
                    ByteSize(read).to_string(),
                    mode.to_string(),
                ]);
            }
            println!("{t}");
            Ok(())
        }
        BackupCmd::Show { id } => {
            let b: Backup = c.get(&format!("/api/v1/backups/{id}")).await?;
            if g.json {
                return print_json(&b);
            }
            print_backup(&b);
            Ok(())
        }
        BackupCmd::Delete { id } => {
            let _: Value = c
                .request(Method::DELETE, &format!("/api/v1/backups/{id}"), None)
                .await?;
            println!("backup {id} deleted");
            Ok(())
        }
        BackupCmd::Restore {
            id,
            name,
            pool,
            host,
            start,
            live,
            bwlimit,
        } => {
            let at = match &host {
                Some(h) => c.at_node(h),
                None => c.clone(),
            };
            let t: TaskAccepted = at
                .send(
                    Method::POST,
                    &format!("/api/v1/backups/{id}/restore"),
                    &BackupRestore {
                        name: name.clone(),
                        pool,
                        start,
                        live,
                        bwlimit,
                    },
                )
                .await?;
            let done = at.wait_task(t, g.json).await?;
            if g.json {
                return print_json(&done.result.unwrap_or_default());
            }
            if live {
                println!("{name} runs from backup {id}; its disks fill in the background");
            } else {
                println!("{name} restored from {id}");
            }
            Ok(())
        }
        BackupCmd::Prune {
            vm,
            store,
            keep_last,
            keep_hourly,
            keep_daily,
            keep_weekly,
            keep_monthly,
            keep_yearly,
            dry_run,
        } => {
            let r: PruneResult = c
                .send(
                    Method::POST,
                    "/api/v1/backups/prune",
                    &BackupPrune {
                        store,
                        vm,
                        keep: BackupKeep {
                            last: keep_last,
                            hourly: keep_hourly,
                            daily: keep_daily,
                            weekly: keep_weekly,
                            monthly: keep_monthly,
                            yearly: keep_yearly,
                        },
                        dry_run,
                    },
                )
                .await?;
            if g.json {
                return print_json(&r);
            }
            let mut t = table(&["ID", "VERDICT", "RULE"]);
            for v in r.verdicts {
                let verdict = match (v.keep, dry_run) {
                    (true, _) => "keep",
                    (false, true) => "would go",
                    (false, false) => "pruned",
                };
                t.add_row(vec![v.id, verdict.to_string(), v.reason]);
            }
            println!("{t}");
            Ok(())
        }
        BackupCmd::Gc { store } => {
            let t: TaskAccepted = c
                .request(
                    Method::POST,
                    &format!("/api/v1/backup-stores/{store}/gc"),
                    None,
                )
                .await?;
            let done = c.wait_task(t, g.json).await?;
            let r: BackupGcReport = serde_json::from_value(done.result.unwrap_or_default())
                .context("the garbage collection's result")?;
            if g.json {
                return print_json(&r);
            }
            println!(
                "{} chunks removed, {} freed",
                r.removed_chunks,
                ByteSize(r.freed_bytes)
            );
            Ok(())
        }
        BackupCmd::Job(cmd) => job(c, g, cmd).await,
        BackupCmd::Verify { store, since_days } => {
            let t: TaskAccepted = c
                .send(
                    Method::POST,
                    &format!("/api/v1/backup-stores/{store}/verify"),
                    &BackupVerify { since_days },
                )
                .await?;
            let done = c.wait_task(t, g.json).await?;
            let r: BackupVerifyReport = serde_json::from_value(done.result.unwrap_or_default())
                .context("the verify's result")?;
            if g.json {
                return print_json(&r);
            }
            println!(
                "{} chunks checked ({} by checksum only), none damaged",
                r.checked_chunks, r.crc_only
            );
            Ok(())
        }
    }
}

async fn job(c: &Client, g: &Global, cmd: JobCmd) -> Result<()> {
    match cmd {
        JobCmd::Create {
            name,
            store,
            schedule,
            vm,
            all,
            host,
            keep_last,
            keep_hourly,
            keep_daily,
            keep_weekly,
            keep_monthly,
            keep_yearly,
            boot_check,
            boot_marker,
            boot_timeout,
        } => {
            let spec = BackupJobSpec {
                name: name.clone(),
                store,
                schedule,
                selection: BackupSelection {
                    all,
                    vms: vm,
                    hosts: host,
                },
                keep: BackupKeep {
                    last: keep_last,
                    hourly: keep_hourly,
                    daily: keep_daily,
                    weekly: keep_weekly,
                    monthly: keep_monthly,
                    yearly: keep_yearly,
                },
                enabled: true,
                boot_check: boot_check.then_some(BackupBootCheck {
                    marker: boot_marker,
                    timeout_s: boot_timeout,
                }),
            };
            let j: BackupJob = c.send(Method::POST, "/api/v1/backup-jobs", &spec).await?;
            if g.json {
                return print_json(&j);
            }
            println!(
                "backup job {name}: next run {}",
                j.next_run.map_or_else(|| "-".into(), when)
            );
            Ok(())
        }
        JobCmd::List => {
            let jobs: Vec<BackupJob> = c.get("/api/v1/backup-jobs").await?;
            if g.json {
                return print_json(&jobs);
            }
            let mut t = table(&[
                "NAME",
                "STORE",
                "SCHEDULE",
                "VMS",
                "NEXT RUN",
                "LAST RESULT",
            ]);
            for j in jobs {
                let vms = if j.spec.selection.all {
                    "all".to_string()
                } else {
                    j.spec.selection.vms.join(",")
                };
                let last = j.last_result.map_or_else(
                    || "-".into(),
                    |r| format!("{} ok, {} failed", r.backed_up.len(), r.failed.len()),
                );
                t.add_row(vec![
                    j.spec.name,
                    j.spec.store,
                    j.spec.schedule,
                    vms,
                    j.next_run.map_or_else(|| "-".into(), when),
                    last,
                ]);
            }
            println!("{t}");
            Ok(())
        }
        JobCmd::Show { name } => print_json(
            &c.get::<BackupJob>(&format!("/api/v1/backup-jobs/{name}"))
                .await?,
        ),
        JobCmd::Delete { name } => {
            let _: Value = c
                .request(Method::DELETE, &format!("/api/v1/backup-jobs/{name}"), None)
                .await?;
            println!("backup job {name} deleted (its backups stay)");
            Ok(())
        }
        JobCmd::Run { name } => {
            let t: TaskAccepted = c
                .request(
                    Method::POST,
                    &format!("/api/v1/backup-jobs/{name}/run"),
                    None,
                )
                .await?;
            let done = c.wait_task(t, g.json).await?;
            let r: BackupJobResult = serde_json::from_value(done.result.unwrap_or_default())
                .context("the job's result")?;
            if g.json {
                return print_json(&r);
            }
            println!(
                "backup job {name}: {} backed up, {} failed",
                r.backed_up.join(", "),
                r.failed.len()
            );
            Ok(())
        }
    }
}
