//! `GET /api/v1/vms`: every VM of the cluster, filtered and paged by name. This host's
//! VMs come with their live state; the others' from the cluster cache (the state their
//! host recorded at its last transition), so any host answers without asking the
//! others. Rows are chosen and ordered on names first and only the page is built.

use crate::error::{AgentError, Result};
use crate::records::VmRecord;
use crate::Host;
use ferry_types::{Vm, VmListParams, VmState, VM_PAGE_MAX};
use std::sync::Arc;

/// One page of VMs.
#[derive(Debug)]
pub struct VmPage {
    pub vms: Vec<Vm>,
    /// Every row the filters match.
    pub total: usize,
    /// The cursor of the next page, when there is one.
    pub next_cursor: Option<String>,
}

/// A row before it is built: its name, host, state and record.
struct Row {
    host: Option<String>,
    state: VmState,
    record: Arc<VmRecord>,
}

/// The rows `p` asks for out of `rows` (any order), ordered by name: the page, the
/// count of all matches and the next cursor. Pure.
fn choose(mut rows: Vec<Row>, p: &VmListParams, limit: usize) -> (Vec<Row>, usize, Option<String>) {
    let q = p.q.as_deref().map(str::to_lowercase);
    rows.retain(|r| {
        p.host
            .as_deref()
            .is_none_or(|h| r.host.as_deref() == Some(h))
            && p.state.is_none_or(|s| r.state == s)
            && q.as_deref()
                .is_none_or(|q| r.record.spec.name.to_lowercase().contains(q))
    });
    let total = rows.len();
    // Ordered by name, then host (a VM a migration holds on two hosts for a moment is
    // two rows); the cursor is `name/host` (neither contains a slash) or a bare name.
    let key = |r: &Row| {
        (
            r.record.spec.name.clone(),
            r.host.clone().unwrap_or_default(),
        )
    };
    if let Some(c) = &p.cursor {
        match c.split_once('/') {
            Some((name, host)) => {
                let after = (name.to_string(), host.to_string());
                rows.retain(|r| key(r) > after);
            }
            None => rows.retain(|r| r.record.spec.name.as_str() > c.as_str()),
        }
    }
    // Partial selection: only the page is ordered.
    if rows.len() > limit {
        rows.select_nth_unstable_by(limit, |a, b| key(a).cmp(&key(b)));
        rows.truncate(limit + 1);
    }
    rows.sort_by_key(key);
    let next = (rows.len() > limit).then(|| {
        let (name, host) = key(&rows[limit - 1]);
        format!("{name}/{host}")
    });
    rows.truncate(limit);
    (rows, total, next)
}

/// A VM of another host as its record describes it.
fn remote_vm(host: &str, r: &VmRecord) -> Vm {
    Vm {
        id: r.id,
        spec: r.spec.clone(),
        state: r.last_state,
        pid: None,
        accel: None,
        last_exit: r.last_exit.clone(),
        template: r.template,
        current_snapshot: r.current_snapshot.clone(),
        clone_of: r.clone_of.clone(),
        migration: r.transit.as_ref().map(|t| match t {
            crate::records::Transit::To(to) => format!("to {to}"),
            crate::records::Transit::From(from) => format!("from {from}"),
        }),
        host: Some(host.to_string()),
        live_restore: r.live_restore.clone(),
    }
}

impl Host {
    /// The cluster in figures: hosts by state, VMs by state, memory and CPUs (this
    /// host's VMs live, the others' from the cache; this host alone outside a cluster).
    pub async fn cluster_summary(&self) -> Result<ferry_types::ClusterSummary> {
        let mut s = ferry_types::ClusterSummary {
            complete: true,
            ..Default::default()
        };
        let mut count_vm = |state: VmState, r: &VmRecord| {
            s.vms += 1;
            if r.template {
                s.templates += 1;
                return;
            }
            *s.vms_by_state.entry(state.to_string()).or_default() += 1;
            if state.has_process() {
                s.vm_memory_bytes += r.spec.memory_mib * 1024 * 1024;
                s.vm_cpus += r.spec.cpus as usize;
            }
        };
        for r in self.records().await? {
            count_vm(self.slot(&r.spec.name).state(), &r);
        }
        let Some(c) = &self.inner.cluster else {
            let (cpus, memory) = self.capacity();
            s.hosts = 1;
            s.hosts_online = usize::from(!self.in_maintenance().await?);
            s.hosts_maintenance = 1 - s.hosts_online;
            s.memory_bytes = memory;
            s.cpus = cpus;
            return Ok(s);
        };
        let cache = c.cache();
        s.complete = cache.synced();
        let me = self.host_name();
        for v in cache.vms().into_iter().filter(|v| v.host != me) {
            count_vm(v.record.last_state, &v.record);
        }
        for m in cache.members() {
            s.hosts += 1;
            match cache.alive(&m.name) {
                None => s.hosts_down += 1,
                Some(a) => {
                    s.memory_bytes += a.memory_bytes;
                    s.cpus += a.cpus as f64;
                    if cache.maintenance(&m.name) {
                        s.hosts_maintenance += 1;
                    } else {
                        s.hosts_online += 1;
                    }
                }
            }
        }
        Ok(s)
    }

    /// The VMs of the cluster (of this host alone outside one) that `p` asks for.
    pub async fn list_vms_page(&self, p: &VmListParams) -> Result<VmPage> {
        let limit = match p.limit {
            None => usize::MAX - 1,
            Some(n) if (1..=VM_PAGE_MAX).contains(&n) => n,
            Some(n) => {
                return Err(AgentError::invalid(
                    "limit",
                    format!("{n} rows: a page holds 1 to {VM_PAGE_MAX}"),
                ))
            }
        };
        let me = self.host_name().to_string();
        let mut rows: Vec<Row> = vec![];
        if p.host.as_deref().is_none_or(|h| h == me) {
            for r in self.records().await? {
                rows.push(Row {
                    host: Some(me.clone()),
                    state: self.slot(&r.spec.name).state(),
                    record: Arc::new(r),
                });
            }
        }
        if let Some(c) = &self.inner.cluster {
            if p.host.as_deref() != Some(me.as_str()) {
                let others = self.others_vms(c, p.host.as_deref()).await?;
                rows.extend(others.into_iter().map(|(host, record)| Row {
                    state: record.last_state,
                    host: Some(host),
                    record,
                }));
            }
        }
        let (page, total, next_cursor) = choose(rows, p, limit);
        let vms = page
            .into_iter()
            .map(|r| match r.host.as_deref() {
                Some(h) if h != me => remote_vm(h, &r.record),
                _ => self.to_vm(Arc::unwrap_or_clone(r.record)),
            })
            .collect();
        Ok(VmPage {
            vms,
            total,
            next_cursor,
        })
    }

    /// Other hosts' VM records (of host `only` when given): from the cache when it is
    /// in sync, else read host by host from the store.
    async fn others_vms(
        &self,
        c: &crate::ClusterLink,
        only: Option<&str>,
    ) -> Result<Vec<(String, Arc<VmRecord>)>> {
        let me = self.host_name();
        if let Some(cache) = c.synced_cache() {
            return Ok(cache
                .vms()
                .into_iter()
                .filter(|v| v.host != me && only.is_none_or(|h| v.host == h))
                .map(|v| (v.host, v.record))
                .collect());
        }
        let mut out = vec![];
        for m in c.members().await? {
            if m.name == me || only.is_some_and(|h| h != m.name) {
                continue;
            }
            let key = ferry_store::keys::cluster::of_host(&m.name, crate::records::VMS);
            for r in ferry_store::StoreJson::list_json::<VmRecord>(&*c.root, &key).await? {
                out.push((m.name.clone(), Arc::new(r)));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn row(name: &str, host: &str, state: VmState) -> Row {
        let spec: ferry_types::VmSpec =
            serde_json::from_value(serde_json::json!({"name": name, "memory_mib": 64})).unwrap();
        let mut r = VmRecord::new(1, spec);
        r.last_state = state;
        Row {
            host: Some(host.into()),
            state,
            record: Arc::new(r),
        }
    }

    fn names(rows: &[Row]) -> Vec<&str> {
        rows.iter().map(|r| r.record.spec.name.as_str()).collect()
    }

    #[test]
    fn filters_then_pages_by_name() {
        let rows = || {
            vec![
                row("web2", "h2", VmState::Running),
                row("db1", "h1", VmState::Stopped),
                row("web1", "h1", VmState::Running),
                row("Web3", "h2", VmState::Running),
            ]
        };
        let p = VmListParams {
            q: Some("WEB".into()),
            ..Default::default()
        };
        let (page, total, next) = choose(rows(), &p, 2);
        assert_eq!((names(&page), total), (vec!["Web3", "web1"], 3));
        assert_eq!(next.as_deref(), Some("web1/h1"));
        let p = VmListParams { cursor: next, ..p };
        let (page, total, next) = choose(rows(), &p, 2);
        assert_eq!((names(&page), total, next), (vec!["web2"], 3, None));
        let p = VmListParams {
            host: Some("h1".into()),
            state: Some(VmState::Running),
            ..Default::default()
        };
        assert_eq!(names(&choose(rows(), &p, 10).0), ["web1"]);
    }

    proptest! {
        /// Paging through every page yields every matching row once, in (name, host)
        /// order — a VM on two hosts at once (mid-migration) as two rows.
        #[test]
        fn pages_cover_every_row_once(
            n in 0usize..60,
            limit in 1usize..12,
            seed in any::<u64>(),
        ) {
            let all: Vec<(String, String)> = (0..n)
                .flat_map(|i| {
                    let name = format!("vm{:04}", (i as u64 * 7919 + seed) % 10_000);
                    let both = i % 3 == 0;
                    std::iter::once((name.clone(), "h1".to_string()))
                        .chain(both.then(|| (name, "h2".to_string())))
                })
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            let rows = || {
                all.iter()
                    .rev()
                    .map(|(n, h)| row(n, h, VmState::Stopped))
                    .collect::<Vec<_>>()
            };
            let mut p = VmListParams::default();
            let mut seen = vec![];
            loop {
                let (page, total, next) = choose(rows(), &p, limit);
                prop_assert_eq!(total, all.len());
                prop_assert!(page.len() <= limit);
                seen.extend(
                    page.iter()
                        .map(|r| (r.record.spec.name.clone(), r.host.clone().unwrap_or_default())),
                );
                match next {
                    Some(c) => p.cursor = Some(c),
                    None => break,
                }
            }
            prop_assert_eq!(seen, all);
        }
    }
}
