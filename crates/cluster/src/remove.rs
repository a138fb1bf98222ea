//! `ferry cluster remove HOST`: a member that is gone for good (dead, stolen,
//! reinstalled) is taken out by the others — its etcd member, its records, its etcd
//! user — and its certificate is revoked, like Proxmox's `pvecm delnode`. A host
//! that is up leaves by itself (`ferry cluster leave`).

use crate::error::{AgentError, Refusal, Result};
use crate::membership::etcd_err;
use crate::Cluster;
use ferry_store::keys::{cluster as ck, host as hk};
use ferry_store::membership as etcd_members;
use ferry_store::{member, StoreJson};
use ferry_types::ClusterHost;
use std::collections::BTreeSet;
use std::time::Duration;

/// Deletes member `name`'s records (its scope, member record, liveness, fence mark)
/// and revokes `serials`, in one transaction (retried while etcd changes leaders).
pub(super) async fn drop_member_records(
    root: &dyn ferry_store::Store,
    name: &str,
    serials: &BTreeSet<String>,
    reason: &str,
) -> Result<()> {
    let mut tries = 0;
    loop {
        let mut success = vec![
            ferry_store::Op::DeletePrefix(ck::host_scope(name)),
            ferry_store::Op::Delete(ck::member(name)),
            ferry_store::Op::Delete(ck::alive(name)),
            ferry_store::Op::Delete(ck::fenced(name)),
        ];
        success.extend(
            serials
                .iter()
                .map(|s| crate::certs::revoke_op(s, name, reason)),
        );
        let r = root
            .txn(ferry_store::Txn {
                compare: vec![],
                success,
                failure: vec![],
            })
            .await;
        match r {
            Ok(_) => return Ok(()),
            Err(e) if tries < 10 => {
                tracing::debug!(error = %e, "removing the host's keys; retrying");
                tries += 1;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

impl Cluster {
    /// Takes member `name` out of the cluster from here: only while it holds no lease
    /// (it is down); with VM records it still owns only with `force` (they go; their
    /// disks stay where they are). Its certificate is revoked.
    pub async fn cluster_remove(&self, name: &str, force: bool) -> Result<Vec<String>> {
        let link = self.cluster_link()?.clone();
        if name == link.cfg.name {
            return Err(AgentError::refused(
                Refusal::Membership,
                format!("{name} is this host: ferry cluster leave takes a host out by itself"),
            ));
        }
        let Some((rec, _)) = link.root.get_json::<ClusterHost>(&ck::member(name)).await? else {
            return Err(AgentError::NotFound(format!("Member {name}")));
        };
        if link.root.get(&ck::alive(name)).await?.is_some() {
            return Err(AgentError::refused(
                Refusal::Membership,
                format!("{name} holds its cluster lease (it is up): run ferry cluster leave on it"),
            ));
        }
        let vms: Vec<String> = link
            .root
            .list(&ck::of_host(name, hk::VMS))
            .await?
            .into_iter()
            .filter_map(|kv| kv.key.rsplit('/').next().map(String::from))
            .collect();
        if !vms.is_empty() && !force {
            return Err(AgentError::refused(Refusal::InUse, format!(
                "{name} still owns VMs {} (HA moves the HA ones; --force drops the records of the others, their disks stay)",
                vms.join(", ")
            )));
        }
        // Whoever removes it (a voter or a client of the voters): the removed host's
        // member, if it was a voter.
        if let Ok(etcd) = link.etcd() {
            let c = etcd.client();
            let list = etcd_members::list(&c)
                .await
                .map_err(etcd_err("List etcd members"))?;
            if let Some(m) = list.iter().find(|m| m.name == name) {
                etcd_members::remove(&c, m.id)
                    .await
                    .map_err(etcd_err(format!("Remove etcd member {name}")))?;
            }
        }
        let serials: BTreeSet<String> = rec.cert_serial.into_iter().collect();
        drop_member_records(link.root.as_ref(), name, &serials, "removed").await?;
        if let Ok(etcd) = link.etcd() {
            if let Err(e) = member::access::revoke(&mut etcd.client(), name).await {
                tracing::warn!(host = name, error = %e, "cannot remove the host's etcd user");
            }
        }
        self.events().emit(
            None,
            "cluster",
            format!(
                "host {name} removed from the cluster (certificate revoked{})",
                if vms.is_empty() {
                    String::new()
                } else {
                    format!("; records of VMs {} dropped", vms.join(", "))
                }
            ),
        );
        Ok(vms)
    }
}
