//! What the store holds about a VM, and the keys.

use crate::error::{AgentError, Result};
use crate::Agent;
use ferry_store::{Cmp, Compare, Op, StoreJson, Txn};
use ferry_types::{VmSpec, VmState};
use serde::{Deserialize, Serialize};

pub(crate) const VMS: &str = "/vms/";
const NEXT_ID: &str = "/meta/next-vm-id";

pub(crate) fn vm_key(name: &str) -> String {
    format!("{VMS}{name}")
}

/// A VM as stored: its definition and what the agent last knew of it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct VmRecord {
    pub id: u32,
    pub spec: VmSpec,
    /// The state at the last transition; after a daemon restart this tells a VM that
    /// died meanwhile (was running, no process now) from one that was stopped.
    pub last_state: VmState,
    #[serde(default)]
    pub last_exit: Option<String>,
    #[serde(default)]
    pub template: bool,
    #[serde(default)]
    pub current_snapshot: Option<String>,
    #[serde(default)]
    pub clone_of: Option<ferry_types::CloneOf>,
    /// While suspended: the file holding RAM and device state.
    #[serde(default)]
    pub suspend_file: Option<String>,
}

impl Agent {
    pub(crate) async fn record(&self, name: &str) -> Result<(VmRecord, i64)> {
        match self.inner.store.get_json::<VmRecord>(&vm_key(name)).await? {
            Some((r, kv)) => Ok((r, kv.mod_rev)),
            None => Err(AgentError::NotFound(format!("VM {name}"))),
        }
    }

    pub(crate) async fn records(&self) -> Result<Vec<VmRecord>> {
        Ok(self.inner.store.list_json::<VmRecord>(VMS).await?)
    }

    /// Writes the record's state fields, keeping whatever else changed meanwhile.
    pub(crate) async fn save_state(&self, name: &str, state: VmState, last_exit: Option<String>) {
        if let Err(e) = self
            .update_record(name, |r| {
                r.last_state = state;
                r.last_exit = last_exit.clone();
            })
            .await
        {
            tracing::warn!(vm = name, error = %e, "cannot save VM state");
        }
    }

    /// Read-modify-write of a VM record with compare-and-swap (retried on races).
    pub(crate) async fn update_record(
        &self,
        name: &str,
        f: impl Fn(&mut VmRecord),
    ) -> Result<VmRecord> {
        loop {
            let (mut r, rev) = self.record(name).await?;
            f(&mut r);
            if self.inner.store.cas_json(&vm_key(name), rev, &r).await? {
                return Ok(r);
            }
        }
    }

    /// A new VM id, unique on this host (compare-and-swap on a counter).
    pub(crate) async fn allocate_id(&self) -> Result<u32> {
        let store = &self.inner.store;
        loop {
            let cur = store.get_json::<u32>(NEXT_ID).await?;
            let (next, rev) = match &cur {
                Some((n, kv)) => (*n, kv.mod_rev),
                None => (100, 0),
            };
            let r = store
                .txn(Txn {
                    compare: vec![Compare::ModRev(NEXT_ID.into(), Cmp::Equal, rev)],
                    success: vec![Op::Put {
                        key: NEXT_ID.into(),
                        value: serde_json::to_vec(&(next + 1)).expect("u32 serialises"),
                        lease: None,
                    }],
                    failure: vec![],
                })
                .await?;
            if r.succeeded {
                return Ok(next);
            }
        }
    }
}
