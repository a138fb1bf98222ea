//! Maintenance mode (seeds 003, 004): the host takes no new VMs (no start, no incoming
//! migration) and its running VMs are evacuated by live migration, spread over the
//! other hosts by DRS placement in an etcd cluster (by free memory in a static one) —
//! never all onto one.

use crate::error::{AgentError, Failure, Result};
use crate::tasks::TaskCtx;
use crate::Cluster;
use ferry_types::{HostInfo, MigrateRequest, VmState};

/// Where each VM goes: greedy, largest VM first, onto the host with the most memory
/// left after what was already placed there. `hosts`: (name, free bytes);
/// `vms`: (name, bytes). A VM that fits nowhere gets `None`.
pub fn plan_evacuation(
    hosts: &[(String, u64)],
    vms: &[(String, u64)],
) -> Vec<(String, Option<String>)> {
    let mut free: Vec<(String, u64)> = hosts.to_vec();
    let mut order: Vec<&(String, u64)> = vms.iter().collect();
    order.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    order
        .into_iter()
        .map(|(vm, need)| {
            free.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            match free.first_mut() {
                Some((h, f)) if *f >= *need => {
                    *f -= need;
                    (vm.clone(), Some(h.clone()))
                }
                _ => (vm.clone(), None),
            }
        })
        .collect()
}

impl Cluster {
    /// Targets for this host's running VMs by DRS placement, largest VM first.
    async fn drs_evacuation(
        &self,
        live: &[(String, u64)],
    ) -> Result<Vec<(String, Option<String>)>> {
        let (mut c, _) = self.drs_snapshot_loaded().await?;
        let cfg = self.drs_config().await?;
        let mut order = live.to_vec();
        order.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        Ok(order
            .into_iter()
            .map(|(vm, _)| {
                let to = ferry_drs::place_away(&mut c, &vm, self.host_name(), &cfg).ok();
                (vm, to)
            })
            .collect())
    }

    /// Enters maintenance and moves every running VM away. Fails (still in maintenance)
    /// naming each VM that could not move.
    #[tracing::instrument(skip_all)]
    pub async fn enter_maintenance(&self, ctx: &TaskCtx) -> Result<()> {
        self.set_maintenance().await?;
        self.events().emit(
            None,
            "host",
            format!("{} entering maintenance", self.host_name()),
        );
        let live: Vec<(String, u64)> = self
            .list_vms()
            .await?
            .into_iter()
            .filter(|v| matches!(v.state, VmState::Running | VmState::Paused))
            .map(|v| (v.spec.name.clone(), v.spec.memory_mib << 20))
            .collect();
        if live.is_empty() {
            ctx.log("no running VMs: nothing to move");
            return Ok(());
        }
        let mut hosts = vec![];
        for h in self.cluster_hosts().await? {
            if h.name == self.host_name() {
                continue;
            }
            match self.peer(&h.name).await {
                Ok(p) => match p.get::<HostInfo>("/api/v1/host").await {
                    Ok(i) if !i.maintenance => {
                        hosts.push((h.name.clone(), i.memory_available_bytes))
                    }
                    Ok(_) => ctx.log(format!("{} is in maintenance too: skipped", h.name)),
                    Err(e) => ctx.log(format!("{} unreachable ({e}): skipped", h.name)),
                },
                Err(e) => ctx.log(format!("{}: {e}", h.name)),
            }
        }
        // In an etcd cluster DRS places each VM (its rules, labels, CPU and memory);
        // a static cluster spreads by the peers' free memory.
        let plan = if self.cluster().is_some() {
            self.drs_evacuation(&live).await?
        } else {
            plan_evacuation(&hosts, &live)
        };
        let mut failed = vec![];
        let n = plan.len();
        for (k, (vm, to)) in plan.into_iter().enumerate() {
            ctx.progress(k as f32 / n as f32);
            let Some(to) = to else {
                ctx.log(format!("{vm}: no host has room for it"));
                failed.push(format!("{vm} (no host has room)"));
                continue;
            };
            ctx.log(format!("{vm} → {to}"));
            let req = MigrateRequest {
                to: to.clone(),
                with_storage: true,
                target_pool: None,
                downtime_limit_ms: None,
                max_bandwidth_mib: None,
                allow_postcopy: None,
            };
            match self.mig.migrate_vm(&vm, req, ctx).await {
                Ok(r) => ctx.log(format!(
                    "{vm} now on {to} ({} ms, downtime {} ms)",
                    r.total_ms, r.downtime_ms
                )),
                Err(e) => {
                    let why = crate::error_chain(&e).join(": ");
                    ctx.log(format!("{vm} could not move: {why}"));
                    failed.push(format!("{vm} ({why})"));
                }
            }
        }
        if failed.is_empty() {
            self.events().emit(
                None,
                "host",
                format!("{} in maintenance, evacuated", self.host_name()),
            );
            Ok(())
        } else {
            Err(AgentError::failed(
                Failure::Migration,
                format!(
                    "{} in maintenance, but {} VM(s) still here: {}",
                    self.host_name(),
                    failed.len(),
                    failed.join("; ")
                ),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_by_free_memory_and_reports_what_fits_nowhere() {
        let g = 1u64 << 30;
        let hosts = vec![("h2".to_string(), 4 * g), ("h3".to_string(), 3 * g)];
        let vms = vec![
            ("a".to_string(), g),
            ("b".to_string(), g),
            ("c".to_string(), g),
            ("d".to_string(), 2 * g),
            ("big".to_string(), 8 * g),
        ];
        let p = plan_evacuation(&hosts, &vms);
        let on = |h: &str| p.iter().filter(|(_, t)| t.as_deref() == Some(h)).count();
        assert_eq!(p[0], ("big".to_string(), None));
        // d (2G) to h2 (4G free → 2G), then a, b, c alternate by what is left.
        assert!(on("h2") >= 1 && on("h3") >= 1, "{p:?}");
        assert_eq!(on("h2") + on("h3"), 4);
        let placed: u64 = p
            .iter()
            .filter(|(_, t)| t.as_deref() == Some("h3"))
            .map(|(v, _)| vms.iter().find(|x| &x.0 == v).unwrap().1)
            .sum();
        assert!(placed <= 3 * g);
    }
}
