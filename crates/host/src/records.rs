//! What the store holds about a VM, and the keys.

use crate::error::{AgentError, Refusal, Result};
use crate::Host;
use ferry_store::{Cmp, Compare, Op, StoreJson, Txn};
use ferry_types::{VmSpec, VmState};
use serde::{Deserialize, Serialize};

use ferry_store::keys::host::NEXT_VM_ID as NEXT_ID;
pub use ferry_store::keys::host::VMS;

pub fn vm_key(name: &str) -> String {
    format!("{VMS}{name}")
}

/// Which way a migration is moving a VM, as its record on each side says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transit {
    /// Source: the VM is leaving for this host (still ours until it finishes).
    To(String),
    /// Destination: the VM is arriving from this host (not ours until it finishes).
    From(String),
}

impl Transit {
    /// The destination, on the source's record.
    pub fn to(t: &Option<Transit>) -> Option<&str> {
        match t {
            Some(Transit::To(h)) => Some(h),
            _ => None,
        }
    }

    /// The source, on the destination's record.
    pub fn from(t: &Option<Transit>) -> Option<&str> {
        match t {
            Some(Transit::From(h)) => Some(h),
            _ => None,
        }
    }
}

/// A VM as stored: its definition and what the agent last knew of it.
#[derive(Debug, Clone, Deserialize)]
#[serde(from = "StoredRecord")]
pub struct VmRecord {
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
    /// A migration moving the VM: to another host (this is the source) or from one
    /// (this is the destination).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transit: Option<Transit>,
    /// The id the VM had where it was created, when it arrived here under another
    /// (its volumes keep names with that id).
    #[serde(default)]
    pub origin_id: Option<u32>,
    /// HA moved the VM here from this (fenced or crash-looping) host: its disk locks
    /// are taken over from it at the next start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ha_from: Option<String>,
    /// The host gave up restarting it; the HA manager moves it elsewhere.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ha_relocate: bool,
    /// Shared volume → the lock generation this host got (the fencing token).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub lock_generations: std::collections::BTreeMap<String, u64>,
    /// A live-restore under way: every disk's qcow2 volume reads what it lacks from
    /// this backup until it is filled (`live_restore.rs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live_restore: Option<ferry_types::LiveRestoreInfo>,
    /// The host's shutdown acted on it (`power.rs`): the next boot brings it back if
    /// it was suspended (or is HA), and clears this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_down: Option<HostDown>,
}

/// What a host's shutdown did to a VM that ran, and in which boot of the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostDown {
    pub boot: String,
    pub action: ferry_types::HostShutdownAction,
}

impl VmRecord {
    /// A stopped VM that has never run.
    pub fn new(id: u32, spec: VmSpec) -> VmRecord {
        VmRecord {
            id,
            spec,
            last_state: VmState::Stopped,
            last_exit: None,
            template: false,
            current_snapshot: None,
            clone_of: None,
            suspend_file: None,
            transit: None,
            origin_id: None,
            ha_from: None,
            ha_relocate: false,
            lock_generations: Default::default(),
            live_restore: None,
            host_down: None,
        }
    }
}

/// A record as read: today's fields, and the two a record written before [`Transit`]
/// had instead (`migrating_to`, `incoming_from`), so a migration cut off by an upgrade
/// is still recognised and finished.
#[derive(Deserialize)]
struct StoredRecord {
    id: u32,
    spec: VmSpec,
    last_state: VmState,
    #[serde(default)]
    last_exit: Option<String>,
    #[serde(default)]
    template: bool,
    #[serde(default)]
    current_snapshot: Option<String>,
    #[serde(default)]
    clone_of: Option<ferry_types::CloneOf>,
    #[serde(default)]
    suspend_file: Option<String>,
    #[serde(default)]
    transit: Option<Transit>,
    #[serde(default)]
    migrating_to: Option<String>,
    #[serde(default)]
    incoming_from: Option<String>,
    #[serde(default)]
    origin_id: Option<u32>,
    #[serde(default)]
    ha_from: Option<String>,
    #[serde(default)]
    ha_relocate: bool,
    #[serde(default)]
    lock_generations: std::collections::BTreeMap<String, u64>,
    #[serde(default)]
    live_restore: Option<ferry_types::LiveRestoreInfo>,
    #[serde(default)]
    host_down: Option<HostDown>,
}

fn none<T>(o: &&Option<T>) -> bool {
    o.is_none()
}

fn empty(m: &&std::collections::BTreeMap<String, u64>) -> bool {
    m.is_empty()
}

/// What is written: every field, and (for the release after `transit` came) the two
/// fields an older ferry reads instead, so hosts not yet upgraded in a rolling upgrade
/// still see a VM in transit as one (and do not restart it elsewhere).
impl Serialize for VmRecord {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Wire<'a> {
            id: u32,
            spec: &'a VmSpec,
            last_state: VmState,
            last_exit: &'a Option<String>,
            template: bool,
            current_snapshot: &'a Option<String>,
            clone_of: &'a Option<ferry_types::CloneOf>,
            suspend_file: &'a Option<String>,
            #[serde(skip_serializing_if = "none")]
            transit: &'a Option<Transit>,
            migrating_to: Option<&'a str>,
            incoming_from: Option<&'a str>,
            origin_id: Option<u32>,
            #[serde(skip_serializing_if = "none")]
            ha_from: &'a Option<String>,
            #[serde(skip_serializing_if = "std::ops::Not::not")]
            ha_relocate: bool,
            #[serde(skip_serializing_if = "empty")]
            lock_generations: &'a std::collections::BTreeMap<String, u64>,
            #[serde(skip_serializing_if = "none")]
            live_restore: &'a Option<ferry_types::LiveRestoreInfo>,
            #[serde(skip_serializing_if = "none")]
            host_down: &'a Option<HostDown>,
        }
        Wire {
            id: self.id,
            spec: &self.spec,
            last_state: self.last_state,
            last_exit: &self.last_exit,
            template: self.template,
            current_snapshot: &self.current_snapshot,
            clone_of: &self.clone_of,
            suspend_file: &self.suspend_file,
            transit: &self.transit,
            migrating_to: Transit::to(&self.transit),
            incoming_from: Transit::from(&self.transit),
            origin_id: self.origin_id,
            ha_from: &self.ha_from,
            ha_relocate: self.ha_relocate,
            lock_generations: &self.lock_generations,
            live_restore: &self.live_restore,
            host_down: &self.host_down,
        }
        .serialize(s)
    }
}

impl From<StoredRecord> for VmRecord {
    fn from(r: StoredRecord) -> VmRecord {
        let legacy = r
            .migrating_to
            .map(Transit::To)
            .or(r.incoming_from.map(Transit::From));
        VmRecord {
            id: r.id,
            spec: r.spec,
            last_state: r.last_state,
            last_exit: r.last_exit,
            template: r.template,
            current_snapshot: r.current_snapshot,
            clone_of: r.clone_of,
            suspend_file: r.suspend_file,
            transit: r.transit.or(legacy),
            origin_id: r.origin_id,
            ha_from: r.ha_from,
            ha_relocate: r.ha_relocate,
            lock_generations: r.lock_generations,
            live_restore: r.live_restore,
            host_down: r.host_down,
        }
    }
}

impl Host {
    pub async fn record(&self, name: &str) -> Result<(VmRecord, i64)> {
        match self.inner.store.get_json::<VmRecord>(&vm_key(name)).await? {
            Some((r, kv)) => Ok((r, kv.mod_rev)),
            None => Err(AgentError::NotFound(format!("VM {name}"))),
        }
    }

    pub async fn records(&self) -> Result<Vec<VmRecord>> {
        Ok(self.inner.store.list_json::<VmRecord>(VMS).await?)
    }

    /// Writes the record's state fields, keeping whatever else changed meanwhile.
    pub async fn save_state(&self, name: &str, state: VmState, last_exit: Option<String>) {
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

    /// A new VM's name must be free here and, in a cluster, on every other host (HA and
    /// migration move VMs by name).
    /// Writes a new VM's record; false if the name is taken. In a cluster the name is
    /// reserved (`/cluster/names/{vm}`, holding the id) in the same transaction, so two
    /// hosts creating one name at once cannot both succeed. A reservation no record
    /// backs any more (a VM removed with its host, or taken out of the cluster) is
    /// taken over.
    pub async fn create_new_record(&self, rec: &VmRecord) -> Result<bool> {
        let name = &rec.spec.name;
        let Some(c) = &self.inner.cluster else {
            return Ok(self.inner.store.create_json(&vm_key(name), rec).await?);
        };
        let reserve = ferry_store::keys::cluster::vm_name(name);
        let record = ferry_store::keys::cluster::of_host(
            self.host_name(),
            &ferry_store::keys::host::vm(name),
        );
        for _ in 0..5 {
            let held = c.root.get(&reserve).await?;
            let mut compare = vec![Compare::Version(record.clone(), Cmp::Equal, 0)];
            match &held {
                None => compare.push(Compare::Version(reserve.clone(), Cmp::Equal, 0)),
                Some(kv) => {
                    if self.check_name_free_in_store(name).await.is_err() {
                        return Ok(false);
                    }
                    tracing::info!(vm = %name, "taking over a stale name reservation");
                    compare.push(Compare::ModRev(reserve.clone(), Cmp::Equal, kv.mod_rev));
                    // No host holds a record of the name at the moment of the takeover
                    // (the scan above read the hosts one after another: an HA move
                    // between two reads could have hidden a live VM).
                    // (etcd takes at most 128 comparisons a transaction: beyond that
                    // the scan alone stands.)
                    let members = c.members().await?;
                    for h in members.iter().filter(|_| members.len() <= 120) {
                        compare.push(Compare::Version(
                            ferry_store::keys::cluster::of_host(
                                &h.name,
                                &ferry_store::keys::host::vm(name),
                            ),
                            Cmp::Equal,
                            0,
                        ));
                    }
                }
            }
            let r = c
                .root
                .txn(Txn {
                    compare,
                    success: vec![
                        Op::Put {
                            key: reserve.clone(),
                            value: serde_json::to_vec(&rec.id).expect("serialises"),
                            lease: None,
                        },
                        Op::Put {
                            key: record.clone(),
                            value: serde_json::to_vec(rec).expect("serialises"),
                            lease: None,
                        },
                    ],
                    failure: vec![],
                })
                .await?;
            if r.succeeded {
                return Ok(true);
            }
            if self.inner.store.get(&vm_key(name)).await?.is_some() {
                return Ok(false);
            }
        }
        Ok(false)
    }

    /// Gives up the cluster-wide reservation of VM `name` if it is VM `id`'s (a VM
    /// deleted).
    pub async fn release_name(&self, name: &str, id: u32) -> Result<()> {
        if let Some(c) = &self.inner.cluster {
            let reserve = ferry_store::keys::cluster::vm_name(name);
            c.root
                .txn(Txn {
                    compare: vec![Compare::Value(
                        reserve.clone(),
                        Cmp::Equal,
                        serde_json::to_vec(&id).expect("serialises"),
                    )],
                    success: vec![Op::Delete(reserve)],
                    failure: vec![],
                })
                .await?;
        }
        Ok(())
    }

    /// Refuses a name some host of the cluster holds a VM by (the cluster cache
    /// answers when it is in sync; the reservation in the create transaction decides).
    pub async fn check_name_free(&self, name: &str) -> Result<()> {
        if self.inner.store.get(&vm_key(name)).await?.is_some() {
            return Err(AgentError::refused(
                Refusal::Exists,
                format!("VM {name} already exists"),
            ));
        }
        if let Some(c) = &self.inner.cluster {
            if let Some(cache) = c.synced_cache() {
                let Some(h) = cache.vm_host(name) else {
                    return Ok(());
                };
                // The cache may lag a delete: a refusal is confirmed by the record.
                let key =
                    ferry_store::keys::cluster::of_host(&h, &ferry_store::keys::host::vm(name));
                if c.root.get(&key).await?.is_none() {
                    return Ok(());
                }
                return Err(AgentError::refused(
                    Refusal::Exists,
                    format!("VM {name} already exists on host {h}"),
                ));
            }
        }
        self.check_name_free_in_store(name).await
    }

    /// The same, every host's record read from the store.
    pub async fn check_name_free_in_store(&self, name: &str) -> Result<()> {
        if self.inner.store.get(&vm_key(name)).await?.is_some() {
            return Err(AgentError::refused(
                Refusal::Exists,
                format!("VM {name} already exists"),
            ));
        }
        if let Some(c) = &self.inner.cluster {
            for h in c.members().await? {
                if h.name == self.host_name() {
                    continue;
                }
                let key = ferry_store::keys::cluster::of_host(
                    &h.name,
                    &ferry_store::keys::host::vm(name),
                );
                if c.root.get(&key).await?.is_some() {
                    return Err(AgentError::refused(
                        Refusal::Exists,
                        format!("VM {name} already exists on host {}", h.name),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Records the lock generations got at start; the HA origin is settled then.
    pub async fn save_lock_generations(
        &self,
        name: &str,
        generations: std::collections::BTreeMap<String, u64>,
    ) -> Result<()> {
        self.update_record(name, |r| {
            r.lock_generations = generations.clone();
            r.ha_from = None;
            r.ha_relocate = false;
        })
        .await
        .map(|_| ())
    }

    /// Read-modify-write of a VM record with compare-and-swap (retried on races).
    pub async fn update_record(&self, name: &str, f: impl Fn(&mut VmRecord)) -> Result<VmRecord> {
        loop {
            let (mut r, rev) = self.record(name).await?;
            f(&mut r);
            if self.inner.store.cas_json(&vm_key(name), rev, &r).await? {
                return Ok(r);
            }
        }
    }

    /// A new VM id, unique on this host (compare-and-swap on a counter), skipping ids
    /// whose volumes exist in a pool (another host of the cluster made them on a shared
    /// pool).
    pub async fn allocate_id(&self) -> Result<u32> {
        loop {
            let id = self.next_counter().await?;
            if !self.id_has_volumes(id).await? {
                return Ok(id);
            }
        }
    }

    /// Whether any pool holds a `vm-{id}-*` file.
    pub async fn id_has_volumes(&self, id: u32) -> Result<bool> {
        let prefix = format!("vm-{id}-");
        for p in self.pool_specs().await? {
            if let Ok(rd) = std::fs::read_dir(&p.path) {
                if rd
                    .flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    async fn next_counter(&self) -> Result<u32> {
        // In a cluster the counter is the cluster's: ids stay unique when VMs move.
        let (store, key): (&dyn ferry_store::Store, &str) = match &self.inner.cluster {
            Some(c) => (c.root.as_ref(), ferry_store::keys::cluster::NEXT_VM_ID),
            None => (&*self.inner.store, NEXT_ID),
        };
        loop {
            let cur = store.get_json::<u32>(key).await?;
            let (next, rev) = match &cur {
                Some((n, kv)) => (*n, kv.mod_rev),
                None => (100, 0),
            };
            let r = store
                .txn(Txn {
                    compare: vec![Compare::ModRev(key.into(), Cmp::Equal, rev)],
                    success: vec![Op::Put {
                        key: key.into(),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> serde_json::Value {
        serde_json::json!({"name": "a", "memory_mib": 64})
    }

    /// A record an older ferry wrote mid-migration still says where the VM goes.
    #[test]
    fn records_of_older_versions_keep_their_migration() {
        let old = |k: &str| serde_json::json!({"id": 1, "spec": spec(), "last_state": "running", k: "h2"});
        let r: VmRecord = serde_json::from_value(old("migrating_to")).unwrap();
        assert_eq!(r.transit, Some(Transit::To("h2".into())));
        let r: VmRecord = serde_json::from_value(old("incoming_from")).unwrap();
        assert_eq!(r.transit, Some(Transit::From("h2".into())));
        let r: VmRecord = serde_json::from_value(
            serde_json::json!({"id": 1, "spec": spec(), "last_state": "stopped"}),
        )
        .unwrap();
        assert_eq!(r.transit, None);
    }

    /// What is written reads back the same; the fields older versions read say the
    /// same as `transit`.
    #[test]
    fn transit_round_trips() {
        let mut r: VmRecord = serde_json::from_value(
            serde_json::json!({"id": 7, "spec": spec(), "last_state": "running"}),
        )
        .unwrap();
        for t in [
            None,
            Some(Transit::To("h3".into())),
            Some(Transit::From("h1".into())),
        ] {
            r.transit = t.clone();
            let v = serde_json::to_value(&r).unwrap();
            assert_eq!(v["migrating_to"].as_str(), Transit::to(&t), "{v}");
            assert_eq!(v["incoming_from"].as_str(), Transit::from(&t), "{v}");
            let back: VmRecord = serde_json::from_value(v).unwrap();
            assert_eq!(back.transit, t);
            assert_eq!(back.id, 7);
        }
    }

    /// A live-restore under way survives being written and read (dropping it would
    /// start the VM on volumes that lack the backup's data).
    #[test]
    fn live_restore_round_trips() {
        let mut r = VmRecord::new(3, serde_json::from_value(spec()).unwrap());
        let lr = ferry_types::LiveRestoreInfo {
            store: "bs".into(),
            backup: "20261207T081304Z-4d4094be".into(),
            bwlimit: Some(ferry_types::ByteSize(2 << 20)),
            held: true,
        };
        r.live_restore = Some(lr.clone());
        let back: VmRecord = serde_json::from_value(serde_json::to_value(&r).unwrap()).unwrap();
        assert_eq!(back.live_restore, Some(lr));
        r.live_restore = None;
        let v = serde_json::to_value(&r).unwrap();
        assert!(v.get("live_restore").is_none(), "{v}");
    }
}
