//! Scheduled backups. A job (in the shared store: one cluster-wide list) names a store,
//! a calendar event, the VMs and a retention policy. Every host's loop looks at the jobs
//! every 20 s; a run that is due is claimed by moving the job's `last_slot` forward with
//! a compare-and-swap, so exactly one host runs it however many look (a host that was
//! down runs a missed slot once, not once per slot missed). The claiming host backs each
//! VM up on the VM's own host (its own, or another's through the API), prunes by the
//! job's policy, collects the store's garbage, and records the outcome in the job.

use crate::error::{AgentError, Refusal, Result};
use crate::tasks::TaskCtx;
use crate::Host;
use ferry_backup::calendar::Calendar;
use ferry_store::{keys, StoreJson};
use ferry_types::{
    BackupJob, BackupJobFailure, BackupJobResult, BackupJobSpec, BackupKeep, BackupPrune,
    BackupRun, Task, TaskAccepted, TaskState, VmListParams,
};
use std::time::Duration;

const TICK: Duration = Duration::from_secs(20);

fn now() -> i64 {
    i64::try_from(crate::events::now_ms() / 1000).unwrap_or(i64::MAX)
}

/// The latest scheduled minute at or before `now` after `last` (None: none due).
pub fn due_slot(cal: &Calendar, last: i64, now: i64) -> Option<i64> {
    // a long outage runs the job once, not once per missed slot
    let mut s = cal.next_after(last.max(now - 8 * 86400))?;
    if s > now {
        return None;
    }
    while let Some(n) = cal.next_after(s) {
        if n > now {
            break;
        }
        s = n;
    }
    Some(s)
}

fn schedule(spec: &BackupJobSpec) -> Result<Calendar> {
    Calendar::parse(&spec.schedule).map_err(|e| AgentError::invalid("schedule", e.to_string()))
}

impl Host {
    fn backup_job_key(&self, name: &str) -> String {
        keys::shared::backup_job(self.shared().1, name)
    }

    pub async fn backup_jobs(&self) -> Result<Vec<BackupJob>> {
        let (s, p) = self.shared();
        let mut jobs: Vec<BackupJob> = s.list_json(&keys::shared::backup_jobs(p)).await?;
        for j in &mut jobs {
            j.next_run = Calendar::parse(&j.spec.schedule)
                .ok()
                .and_then(|c| c.next_after(j.last_slot.max(now())));
        }
        jobs.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        Ok(jobs)
    }

    pub async fn backup_job(&self, name: &str) -> Result<(BackupJob, i64)> {
        let (s, _) = self.shared();
        s.get_json::<BackupJob>(&self.backup_job_key(name))
            .await?
            .map(|(j, kv)| (j, kv.mod_rev))
            .ok_or_else(|| AgentError::NotFound(format!("Backup job {name}")))
    }

    pub async fn create_backup_job(&self, spec: BackupJobSpec) -> Result<BackupJob> {
        spec.validate()?;
        let cal = schedule(&spec)?;
        self.backup_store(&spec.store).await?;
        let job = BackupJob {
            // runs from the next scheduled minute on, never for past ones
            last_slot: now(),
            next_run: None,
            last_result: None,
            spec,
        };
        let (s, _) = self.shared();
        if !s
            .create_json(&self.backup_job_key(&job.spec.name), &job)
            .await?
        {
            return Err(AgentError::refused(
                Refusal::Exists,
                format!("Backup job {} already exists", job.spec.name),
            ));
        }
        self.inner.events.emit(
            None,
            "backup",
            format!(
                "backup job {} defined ({})",
                job.spec.name, job.spec.schedule
            ),
        );
        Ok(BackupJob {
            next_run: cal.next_after(job.last_slot),
            ..job
        })
    }

    pub async fn delete_backup_job(&self, name: &str) -> Result<()> {
        self.backup_job(name).await?;
        let (s, _) = self.shared();
        s.delete(&self.backup_job_key(name)).await?;
        self.inner
            .events
            .emit(None, "backup", format!("backup job {name} deleted"));
        Ok(())
    }

    /// Every 20 s: claims and runs the jobs that are due.
    #[tracing::instrument(skip_all)]
    pub async fn backup_jobs_loop(self) {
        loop {
            tokio::time::sleep(TICK).await;
            let r = self.claim_due_jobs().await;
            self.inner
                .loops
                .report("backup-jobs", TICK, r.map_err(|e| e.to_string()));
        }
    }

    async fn claim_due_jobs(&self) -> Result<()> {
        let (s, p) = self.shared();
        for kv in s.list(&keys::shared::backup_jobs(p)).await? {
            let Ok(mut job) = serde_json::from_slice::<BackupJob>(&kv.value) else {
                continue;
            };
            if !job.spec.enabled {
                continue;
            }
            let Ok(cal) = Calendar::parse(&job.spec.schedule) else {
                continue;
            };
            let Some(slot) = due_slot(&cal, job.last_slot, now()) else {
                continue;
            };
            job.last_slot = slot;
            if !s.cas_json(&kv.key, kv.mod_rev, &job).await? {
                continue; // another host claimed it
            }
            let host = self.clone();
            let name = job.spec.name.clone();
            self.inner
                .tasks
                .spawn("backup.job", &name, move |ctx| async move {
                    host.execute_backup_job(&job.spec, &ctx).await.map(|_| ())
                });
        }
        Ok(())
    }

    /// Runs a job now (also outside its schedule).
    pub async fn run_backup_job(&self, name: &str, ctx: &TaskCtx) -> Result<BackupJobResult> {
        let (job, _) = self.backup_job(name).await?;
        self.execute_backup_job(&job.spec, ctx).await
    }

    async fn execute_backup_job(
        &self,
        spec: &BackupJobSpec,
        ctx: &TaskCtx,
    ) -> Result<BackupJobResult> {
        let me = self.host_name().to_string();
        let all = self.list_vms_page(&VmListParams::default()).await?.vms;
        let sel = &spec.selection;
        let mut chosen: Vec<(String, String)> = all
            .into_iter()
            .filter(|v| !v.template)
            .filter(|v| sel.all || sel.vms.contains(&v.spec.name))
            .map(|v| {
                (
                    v.spec.name.clone(),
                    v.host.clone().unwrap_or_else(|| me.clone()),
                )
            })
            .filter(|(_, h)| sel.hosts.is_empty() || sel.hosts.contains(h))
            .collect();
        chosen.sort();
        let mut result = BackupJobResult {
            host: me.clone(),
            ended: 0,
            backed_up: Vec::new(),
            failed: Vec::new(),
        };
        for missing in sel
            .vms
            .iter()
            .filter(|v| !chosen.iter().any(|(n, _)| n == *v))
        {
            result.failed.push(BackupJobFailure {
                vm: missing.clone(),
                error: "no such VM (on the selected hosts)".into(),
            });
        }
        let total = chosen.len().max(1);
        for (i, (vm, host)) in chosen.iter().enumerate() {
            ctx.log(format!("backing up {vm} on {host}"));
            let r = if *host == me {
                self.run_backup(vm, &spec.store, None).await.map(|b| b.id)
            } else {
                self.backup_on(host, vm, &spec.store).await
            };
            match r {
                Ok(id) => {
                    ctx.log(format!("{vm}: backup {id}"));
                    result.backed_up.push(vm.clone());
                    if let Some(bc) = &spec.boot_check {
                        let failed = match self.boot_check_backup(&id, bc.clone(), None).await {
                            Ok(r) if r.booted => {
                                ctx.log(format!("{vm}: boot check: up after {:.0} s", r.seconds));
                                None
                            }
                            Ok(r) => Some(format!(
                                "boot check of backup {id}: {:?} not seen within {:.0} s",
                                r.marker, r.seconds
                            )),
                            Err(e) => Some(format!("boot check of backup {id}: {e}")),
                        };
                        if let Some(error) = failed {
                            ctx.log(format!("{vm}: {error}"));
                            result.failed.push(BackupJobFailure {
                                vm: vm.clone(),
                                error,
                            });
                        }
                    }
                    if spec.keep != BackupKeep::default() {
                        let pruned = self
                            .prune_backups(BackupPrune {
                                store: spec.store.clone(),
                                vm: vm.clone(),
                                keep: spec.keep,
                                dry_run: false,
                            })
                            .await;
                        if let Err(e) = pruned {
                            ctx.log(format!("{vm}: prune failed: {e}"));
                        }
                    }
                }
                Err(e) => {
                    ctx.log(format!("{vm}: {e}"));
                    self.inner.events.emit(
                        Some(vm),
                        "backup",
                        format!("backup job {}: backup of {vm} failed: {e}", spec.name),
                    );
                    result.failed.push(BackupJobFailure {
                        vm: vm.clone(),
                        error: e.to_string(),
                    });
                }
            }
            ctx.progress((i + 1) as f32 / total as f32);
        }
        if spec.keep != BackupKeep::default() {
            if let Err(e) = self.gc_backup_store(&spec.store).await {
                ctx.log(format!("garbage collection failed: {e}"));
            }
        }
        result.ended = now();
        self.record_job_result(&spec.name, &result).await;
        ctx.result(serde_json::to_value(&result).unwrap_or_default());
        self.inner.events.emit(
            None,
            "backup",
            format!(
                "backup job {}: {} backed up, {} failed",
                spec.name,
                result.backed_up.len(),
                result.failed.len()
            ),
        );
        if let Some(f) = result.failed.first() {
            return Err(AgentError::failed(
                crate::error::Failure::Backup,
                format!(
                    "backup job {}: {} of {} VMs failed (first: {}: {})",
                    spec.name,
                    result.failed.len(),
                    result.failed.len() + result.backed_up.len(),
                    f.vm,
                    f.error
                ),
            ));
        }
        Ok(result)
    }

    async fn record_job_result(&self, name: &str, result: &BackupJobResult) {
        let (s, _) = self.shared();
        for _ in 0..5 {
            let Ok((mut job, rev)) = self.backup_job(name).await else {
                return;
            };
            job.last_result = Some(result.clone());
            job.next_run = None;
            if let Ok(true) = s.cas_json(&self.backup_job_key(name), rev, &job).await {
                return;
            }
        }
    }

    /// A backup on another host of the cluster, through its API; waits for its task.
    async fn backup_on(&self, host: &str, vm: &str, store: &str) -> Result<String> {
        let body = serde_json::to_vec(&BackupRun {
            vm: vm.to_string(),
            store: store.to_string(),
        })
        .map_err(|e| AgentError::failed(crate::error::Failure::Internal, e.to_string()))?;
        let (status, _, answer) = self
            .forward_to_host(
                host,
                reqwest::Method::POST,
                "/api/v1/backups",
                Some("application/json".into()),
                body.into(),
                None,
            )
            .await?;
        let bad = |what: String| AgentError::failed(crate::error::Failure::Backup, what);
        if status != 202 {
            return Err(bad(format!(
                "{host} refused the backup of {vm}: {}",
                String::from_utf8_lossy(&answer)
                    .chars()
                    .take(500)
                    .collect::<String>()
            )));
        }
        let t: TaskAccepted =
            serde_json::from_slice(&answer).map_err(|e| bad(format!("{host}'s answer: {e}")))?;
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let (status, _, answer) = self
                .forward_to_host(
                    host,
                    reqwest::Method::GET,
                    &format!("/api/v1/tasks/{}", t.task),
                    None,
                    Default::default(),
                    None,
                )
                .await?;
            if status != 200 {
                return Err(bad(format!("{host} lost the backup task of {vm}")));
            }
            let task: Task =
                serde_json::from_slice(&answer).map_err(|e| bad(format!("{host}'s task: {e}")))?;
            match task.state {
                TaskState::Running => continue,
                TaskState::Failed => {
                    return Err(bad(task.error.unwrap_or_else(|| "failed".into())))
                }
                TaskState::Succeeded => {
                    let b: ferry_types::Backup =
                        serde_json::from_value(task.result.unwrap_or_default())
                            .map_err(|e| bad(format!("{host}'s backup of {vm}: {e}")))?;
                    return Ok(b.id);
                }
            }
        }
    }
}

/// One Prometheus sample line.
fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], v: f64) {
    let l: Vec<String> = labels
        .iter()
        .map(|(k, v)| {
            format!(
                "{k}=\"{}\"",
                v.replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n")
            )
        })
        .collect();
    if l.is_empty() {
        out.push_str(&format!("{name} {v}\n"));
    } else {
        out.push_str(&format!("{name}{{{}}} {v}\n", l.join(",")));
    }
}

impl Host {
    /// Backups in Prometheus text format: each store's size and dedup factor, each
    /// job's last run, each VM's newest complete backup. A store that does not answer
    /// within 2 s (a hung share) is left out, with `ferry_backup_store_up` 0.
    pub async fn backup_metrics(&self) -> String {
        let mut out = String::new();
        let stores = self.backup_stores().await.unwrap_or_default();
        let mut up = Vec::new();
        let mut infos = Vec::new();
        for s in &stores {
            let info =
                tokio::time::timeout(Duration::from_secs(2), self.backup_store_info(&s.name))
                    .await
                    .ok()
                    .and_then(|r| r.ok());
            up.push((s.name.clone(), info.is_some()));
            infos.extend(info);
        }
        out.push_str("# HELP ferry_backup_store_up Whether the store could be read.\n# TYPE ferry_backup_store_up gauge\n");
        for (n, ok) in &up {
            sample(
                &mut out,
                "ferry_backup_store_up",
                &[("store", n)],
                f64::from(u8::from(*ok)),
            );
        }
        type Field = fn(&ferry_types::BackupStoreUsage) -> f64;
        let fields: [(&str, &str, Field); 6] = [
            ("ferry_backup_store_backups", "Backups in the store.", |u| {
                u.backups as f64
            }),
            ("ferry_backup_store_chunks", "Chunks in the store.", |u| {
                u.chunks as f64
            }),
            (
                "ferry_backup_store_stored_bytes",
                "Bytes the chunks take.",
                |u| u.stored_bytes as f64,
            ),
            (
                "ferry_backup_store_logical_bytes",
                "Plain bytes of every disk of every backup.",
                |u| u.logical_bytes as f64,
            ),
            (
                "ferry_backup_store_dedup_factor",
                "Logical bytes per stored byte.",
                |u| u.dedup_factor,
            ),
            (
                "ferry_backup_store_free_bytes",
                "Free space of the store's file system.",
                |u| u.free_bytes as f64,
            ),
        ];
        for (name, help, f) in fields {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n"));
            for i in &infos {
                sample(&mut out, name, &[("store", &i.store.name)], f(&i.usage));
            }
        }
        let jobs = self.backup_jobs().await.unwrap_or_default();
        out.push_str("# HELP ferry_backup_job_last_run_timestamp_seconds When the job's last run ended.\n# TYPE ferry_backup_job_last_run_timestamp_seconds gauge\n");
        for j in &jobs {
            if let Some(r) = &j.last_result {
                sample(
                    &mut out,
                    "ferry_backup_job_last_run_timestamp_seconds",
                    &[("job", &j.spec.name)],
                    r.ended as f64,
                );
            }
        }
        out.push_str("# HELP ferry_backup_job_last_failed VMs the job's last run failed for.\n# TYPE ferry_backup_job_last_failed gauge\n");
        for j in &jobs {
            if let Some(r) = &j.last_result {
                sample(
                    &mut out,
                    "ferry_backup_job_last_failed",
                    &[("job", &j.spec.name)],
                    r.failed.len() as f64,
                );
            }
        }
        out.push_str("# HELP ferry_backup_job_last_backed_up VMs the job's last run backed up.\n# TYPE ferry_backup_job_last_backed_up gauge\n");
        for j in &jobs {
            if let Some(r) = &j.last_result {
                sample(
                    &mut out,
                    "ferry_backup_job_last_backed_up",
                    &[("job", &j.spec.name)],
                    r.backed_up.len() as f64,
                );
            }
        }
        // each VM's newest complete backup, per store
        let mut newest: std::collections::BTreeMap<(String, String), i64> = Default::default();
        for i in &infos {
            let list = tokio::time::timeout(
                Duration::from_secs(2),
                self.list_backups(Some(&i.store.name), None),
            )
            .await;
            if let Ok(Ok(l)) = list {
                for b in l.backups.iter().filter(|b| b.state == "complete") {
                    let t = b.finished.unwrap_or(b.started);
                    let e = newest.entry((b.vm.clone(), b.store.clone())).or_insert(t);
                    *e = (*e).max(t);
                }
            }
        }
        out.push_str("# HELP ferry_backup_last_success_timestamp_seconds When each VM's newest complete backup in a store finished.\n# TYPE ferry_backup_last_success_timestamp_seconds gauge\n");
        for ((vm, store), t) in &newest {
            sample(
                &mut out,
                "ferry_backup_last_success_timestamp_seconds",
                &[("vm", vm), ("store", store)],
                *t as f64,
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_slot_runs_a_missed_schedule_once_and_waits_for_the_next() {
        let c = Calendar::parse("*:00").unwrap();
        let t0 = 1_796_601_600; // an hour's start
        assert_eq!(due_slot(&c, t0, t0 + 59 * 60), None);
        assert_eq!(due_slot(&c, t0, t0 + 3600), Some(t0 + 3600));
        // down for five hours: one run, for the latest slot
        assert_eq!(due_slot(&c, t0, t0 + 5 * 3600 + 10), Some(t0 + 5 * 3600));
        assert_eq!(due_slot(&c, t0 + 5 * 3600, t0 + 5 * 3600 + 10), None);
    }
}
