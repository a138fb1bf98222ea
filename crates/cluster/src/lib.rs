//! The cluster side of a host: membership in etcd ([`membership`]), certificates and
//! their revocation ([`certs`]), removing a dead member ([`remove`]), the host lease and
//! self-fencing ([`lease`], its clock [`fence`]), the HA manager and the local restart
//! logic ([`ha`]), DRS ([`drs`]: load measurement, the cluster snapshot, balancing,
//! placement, admission), maintenance mode ([`maintenance`]) and resource pool
//! definitions ([`respools`]), and etcd's upkeep ([`etcd_health`]: compaction,
//! defragmentation, alarms).
//!
//! [`Cluster`] is a host's cluster side: the [`Host`] runtime (which it dereferences
//! to), the host's [`Migrations`] (DRS and maintenance move VMs through them) and the
//! state only the cluster side owns. The runtime learns what it needs of it through
//! [`ferry_host::ClusterView`], answered by the lease keeper's [`lease::LeaseCell`].

mod certs;
mod drs;
mod drs_views;
mod etcd_health;
pub mod fence;
mod ha;
pub mod lease;
mod maintenance;
mod membership;
mod promote;
mod remove;
mod respools;
#[cfg(test)]
mod tests;
pub mod voters;

pub use lease::{kill_ha_qemus, run_watchdog};
pub use maintenance::plan_evacuation;
pub use membership::{connect, load_config};

use ferry_host::Host;
pub(crate) use ferry_host::{error, error_chain, events, gate, records, tasks, TaskCtx};
use ferry_migration::Migrations;

use std::sync::{Arc, Mutex};

/// What only the cluster side owns, by the subsystem that owns it.
struct Inner {
    /// The lease keeper's: the host lease and the fence clock (the runtime asks it
    /// through [`ferry_host::ClusterView`]).
    lease: Arc<lease::LeaseCell>,
    /// The HA runner's.
    ha: HaState,
    /// The DRS runner's.
    drs: DrsState,
    /// Membership's.
    membership: MembershipState,
    /// The etcd tender's (quota, compaction, defragmentation, alarms).
    etcd: Mutex<etcd_health::EtcdHealthState>,
}

/// The HA runner's state: local crash restarts, the manager's rounds.
#[derive(Default)]
struct HaState {
    restarts: Mutex<ha::Restarts>,
    /// When the HA manager last read every VM record, and what the cluster cache held
    /// then (its generations of leases and host records; zero without the cache).
    full_round: Mutex<Option<(std::time::Instant, (u64, u64))>>,
    /// VMs the HA manager could not place last round, with the reason.
    no_place: Mutex<std::collections::BTreeMap<String, String>>,
    /// This host was the HA manager at its last round (DRS runs there).
    is_manager: std::sync::atomic::AtomicBool,
}

/// The DRS runner's state.
#[derive(Default)]
struct DrsState {
    /// Smoothed CPU load of this host's VMs.
    loads: Mutex<drs::LoadTracker>,
    /// Other hosts' VMs as DRS sees them, re-derived when they change.
    views: Mutex<drs_views::DrsViews>,
}

/// Membership's state.
struct MembershipState {
    /// Asked for after a join or leave: the daemon restarts on its new store.
    restart: tokio::sync::Notify,
    /// Join attempts in the current minute (a limit on guessing join tokens).
    join_attempts: Mutex<(std::time::Instant, u32)>,
}

/// A host's cluster side. Cheap to clone; dereferences to the [`Host`].
#[derive(Clone)]
pub struct Cluster {
    mig: Migrations,
    inner: Arc<Inner>,
}

impl std::ops::Deref for Cluster {
    type Target = Host;
    fn deref(&self) -> &Host {
        &self.mig
    }
}

impl Cluster {
    /// The cluster side of the host `mig` runs on: hands the runtime the lease keeper's
    /// answers, then starts the lease loop (in an etcd cluster), the HA loop, load
    /// measurement, and in an etcd cluster DRS and the revocation list loop.
    pub fn start(mig: Migrations) -> Cluster {
        let lease = Arc::new(lease::LeaseCell::default());
        mig.set_view(lease.clone());
        let c = Cluster {
            mig,
            inner: Arc::new(Inner {
                lease,
                ha: HaState::default(),
                drs: DrsState::default(),
                membership: MembershipState {
                    restart: tokio::sync::Notify::new(),
                    join_attempts: Mutex::new((std::time::Instant::now(), 0)),
                },
                etcd: Mutex::default(),
            }),
        };
        if c.cluster().is_some() {
            tokio::spawn(c.clone().lease_loop());
            tokio::spawn(c.clone().campaign_loop());
        }
        tokio::spawn(c.clone().ha_loop());
        tokio::spawn(c.clone().load_loop());
        if c.cluster().is_some() {
            tokio::spawn(c.clone().drs_loop());
            tokio::spawn(c.clone().crl_loop());
            tokio::spawn(c.clone().etcd_health_loop());
        }
        c
    }

    /// This host's migrations (DRS and maintenance move VMs through them).
    pub fn migrations(&self) -> &Migrations {
        &self.mig
    }
}
