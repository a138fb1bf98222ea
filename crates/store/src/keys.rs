//! Where everything lives in the store: the one place that spells key paths.
//!
//! Three scopes:
//! - [`host`]: a host's own records, relative to its scope (`/ferry/hosts/{name}` in
//!   a cluster's etcd, the whole SQLite file on a host alone);
//! - [`cluster`]: the cluster's records, relative to `/ferry` in etcd;
//! - [`shared`]: what is the cluster's in a cluster and the host's alone (DRS,
//!   resource pools, replicated volumes): the functions take the prefix,
//!   [`shared::CLUSTER`] in a cluster and [`shared::ALONE`] on a host alone.

/// A host's own records (relative to its scope).
pub mod host {
    /// VM records: `/vms/{name}`.
    pub const VMS: &str = "/vms/";
    /// Storage pool definitions: `/pools/{name}`.
    pub const POOLS: &str = "/pools/";
    /// Tasks: `/tasks/{id}`.
    pub const TASKS: &str = "/tasks/";
    /// Events: `/events/{seq:016}`.
    pub const EVENTS: &str = "/events/";
    /// Unfinished multi-step operations, for the start-up repair: `/intents/{vm id}`.
    pub const INTENTS: &str = "/intents/";
    /// The next VM id on a host alone (a cluster counts in [`super::cluster::NEXT_VM_ID`]).
    pub const NEXT_VM_ID: &str = "/meta/next-vm-id";
    /// Whether the host is in maintenance mode (`true`/`false`).
    pub const MAINTENANCE: &str = "/meta/maintenance";
    /// What the host can run (`ferry_types::HostCaps`), written at the daemon's start.
    pub const CAPS: &str = "/meta/caps";

    pub fn vm(name: &str) -> String {
        format!("{VMS}{name}")
    }

    pub fn pool(name: &str) -> String {
        format!("{POOLS}{name}")
    }

    pub fn task(id: &str) -> String {
        format!("{TASKS}{id}")
    }

    pub fn event(seq: u64) -> String {
        format!("{EVENTS}{seq:016}")
    }

    pub fn intent(vm_id: u32) -> String {
        format!("{INTENTS}{vm_id}")
    }

    /// Snapshot records of VM `vm`: `/snapshots/{vm}/{tag}`.
    pub fn snapshots(vm: &str) -> String {
        format!("/snapshots/{vm}/")
    }

    pub fn snapshot(vm: &str, tag: &str) -> String {
        format!("/snapshots/{vm}/{tag}")
    }
}

/// The cluster's records (relative to `/ferry` in etcd).
pub mod cluster {
    /// Where the cluster's keys live in etcd.
    pub const ROOT: &str = "/ferry";
    /// Member records: `/cluster/members/{host}`.
    pub const MEMBERS: &str = "/cluster/members/";
    /// A member's liveness key, under its lease: `/cluster/alive/{host}`.
    pub const ALIVE: &str = "/cluster/alive/";
    /// Hosts the HA manager fenced: `/cluster/fenced/{host}`.
    pub const FENCED: &str = "/cluster/fenced/";
    /// The elected HA manager (under its lease).
    pub const MANAGER: &str = "/cluster/ha/manager";
    /// The next VM id, cluster-wide.
    pub const NEXT_VM_ID: &str = "/cluster/next-vm-id";
    /// One-time join tokens by digest, under a lease: `/cluster/join-tokens/{digest}`.
    pub const JOIN_TOKENS: &str = "/cluster/join-tokens/";
    /// Host certificates that no longer count: `/cluster/revoked/{serial}`.
    pub const REVOKED: &str = "/cluster/revoked/";
    /// The revocation list the CA holder signed last.
    pub const CRL: &str = "/cluster/crl";
    /// Each host's published load and capacity: `/cluster/load/{host}`.
    pub const LOAD: &str = "/cluster/load/";
    /// Held (under a lease) by the host restarting its etcd member with new flags: one
    /// member at a time.
    pub const MEMBER_RESTART: &str = "/cluster/member-restart";
    /// VM names reserved cluster-wide, each holding its VM's id: `/cluster/names/{vm}`.
    pub const VM_NAMES: &str = "/cluster/names/";

    pub fn vm_name(vm: &str) -> String {
        format!("{VM_NAMES}{vm}")
    }

    pub fn member(host: &str) -> String {
        format!("{MEMBERS}{host}")
    }

    pub fn alive(host: &str) -> String {
        format!("{ALIVE}{host}")
    }

    pub fn fenced(host: &str) -> String {
        format!("{FENCED}{host}")
    }

    pub fn load(host: &str) -> String {
        format!("{LOAD}{host}")
    }

    pub fn revoked(serial: &str) -> String {
        format!("{REVOKED}{serial}")
    }

    pub fn join_token(digest: &str) -> String {
        format!("{JOIN_TOKENS}{digest}")
    }

    /// The scope of host `host`'s own records (see [`super::host`]), relative to the
    /// cluster root.
    pub fn host_scope(host: &str) -> String {
        format!("/hosts/{host}/")
    }

    /// Host `host`'s record at `key` (a [`super::host`] key), seen from the root.
    pub fn of_host(host: &str, key: &str) -> String {
        format!("/hosts/{host}{key}")
    }
}

/// Users, tokens and grants (the cluster's in a cluster, the host's alone).
pub mod access {
    pub const USERS: &str = "/access/users/";
    pub const TOKENS: &str = "/access/tokens/";
    pub const ACL: &str = "/access/acl";
    /// The key tickets are signed with.
    pub const TICKET_KEY: &str = "/access/ticket-key";
    /// Tickets ended by a logout, under a lease until they would have expired.
    pub const LOGGED_OUT: &str = "/access/logged-out/";

    pub fn user(name: &str) -> String {
        format!("{USERS}{name}")
    }

    /// The tokens of user `user`.
    pub fn tokens_of(user: &str) -> String {
        format!("{TOKENS}{user}/")
    }

    pub fn token(user: &str, id: &str) -> String {
        format!("{TOKENS}{user}/{id}")
    }

    pub fn logged_out(digest: &str) -> String {
        format!("{LOGGED_OUT}{digest}")
    }
}

/// What is the cluster's in a cluster and the host's alone: each function takes the
/// prefix ([`CLUSTER`] or [`ALONE`]).
pub mod shared {
    /// The prefix in a cluster (under the cluster root).
    pub const CLUSTER: &str = "/cluster";
    /// The prefix on a host alone (its own store).
    pub const ALONE: &str = "";

    pub fn drs_config(p: &str) -> String {
        format!("{p}/drs/config")
    }

    /// The DRS plan the manager last made.
    pub fn drs_plan(p: &str) -> String {
        format!("{p}/drs/plan")
    }

    /// DRS moves under way: `{p}/drs/inflight/{vm}`.
    pub fn drs_inflight(p: &str) -> String {
        format!("{p}/drs/inflight/")
    }

    pub fn drs_inflight_vm(p: &str, vm: &str) -> String {
        format!("{p}/drs/inflight/{vm}")
    }

    /// When DRS last moved each VM: `{p}/drs/moved/{vm}`.
    pub fn drs_moved(p: &str) -> String {
        format!("{p}/drs/moved/")
    }

    pub fn drs_moved_vm(p: &str, vm: &str) -> String {
        format!("{p}/drs/moved/{vm}")
    }

    /// Backup stores: `{p}/backup-stores/{name}`.
    pub fn backup_stores(p: &str) -> String {
        format!("{p}/backup-stores/")
    }

    pub fn backup_store(p: &str, name: &str) -> String {
        format!("{p}/backup-stores/{name}")
    }

    /// Backup jobs: `{p}/backup-jobs/{name}`.
    pub fn backup_jobs(p: &str) -> String {
        format!("{p}/backup-jobs/")
    }

    pub fn backup_job(p: &str, name: &str) -> String {
        format!("{p}/backup-jobs/{name}")
    }

    /// Resource pools: `{p}/respools/{name}`.
    pub fn respools(p: &str) -> String {
        format!("{p}/respools/")
    }

    pub fn respool(p: &str, name: &str) -> String {
        format!("{p}/respools/{name}")
    }

    /// Replicated volumes of pool `pool`: `{p}/replicas/{pool}/{volume}`.
    pub fn replicas(p: &str, pool: &str) -> String {
        format!("{p}/replicas/{pool}/")
    }

    pub fn replica(p: &str, pool: &str, volume: &str) -> String {
        format!("{p}/replicas/{pool}/{volume}")
    }
}
