//! Cluster membership (etcd), host states and the HA policy of a VM.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// How HA treats a VM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum HaMode {
    /// Not HA-managed: a crash or a host failure leaves it stopped.
    #[default]
    Off,
    /// Restarted after a crash (in place, then elsewhere) and after its host fails.
    Restart,
}

fn default_max_restarts() -> u32 {
    3
}

/// A VM's HA policy (part of its definition).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HaPolicy {
    #[serde(default)]
    pub mode: HaMode,
    /// Higher first when several VMs are recovered at once.
    #[serde(default)]
    pub priority: i32,
    /// Crash restarts on one host (within 10 minutes) before HA moves it elsewhere.
    #[serde(default = "default_max_restarts")]
    pub max_restarts: u32,
    /// VMs sharing this group are kept on different hosts when HA places them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anti_affinity: Option<String>,
}

impl Default for HaPolicy {
    fn default() -> Self {
        HaPolicy {
            mode: HaMode::Off,
            priority: 0,
            max_restarts: default_max_restarts(),
            anti_affinity: None,
        }
    }
}

impl HaPolicy {
    pub fn enabled(&self) -> bool {
        self.mode == HaMode::Restart
    }

    /// The default (serialised as absent).
    pub fn is_off(&self) -> bool {
        *self == HaPolicy::default()
    }
}

/// What the cluster thinks of a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    /// Holds its lease.
    Online,
    /// Holds its lease, takes no VMs.
    Maintenance,
    /// Lost its lease: its HA VMs were (or are being) recovered elsewhere.
    Fenced,
    /// Lost its lease and runs no HA VMs to recover.
    Offline,
}

/// This host's membership, kept in its state dir.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ClusterConfig {
    /// This host's name (its etcd member name too).
    pub name: String,
    /// This host's cluster address (etcd peer/client traffic, migration).
    pub address: String,
    /// This host's API base URL.
    pub api: String,
    /// etcd client URLs.
    pub endpoints: Vec<String>,
    /// ferry runs the local etcd member (false: an external etcd given by URL).
    pub managed_etcd: bool,
    /// `name=peer_url,...` the member was started with.
    #[serde(default)]
    pub initial_cluster: String,
    /// Host lease TTL in seconds.
    pub lease_ttl_s: u64,
    /// The cluster CA's fingerprint (`SHA256:…`): what a joining host pins.
    #[serde(default)]
    pub ca_fingerprint: String,
}

/// `POST /cluster/join-tokens`: a one-time token that lets one host join.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct JoinTokenRequest {
    /// How long it stays valid, in seconds (60–86400, default 3600).
    #[serde(default)]
    pub ttl_s: Option<u64>,
}

/// The answer to [`JoinTokenRequest`]: give both to `ferry cluster join` on the new host.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JoinToken {
    /// Secret; valid once, until it expires.
    pub token: String,
    pub expires_in_s: u64,
    /// The cluster CA's fingerprint, which the joining host checks the member against.
    pub ca_fingerprint: String,
}

/// `POST /cluster/init`
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ClusterInit {
    /// This host's cluster address (an IP of this host).
    pub address: String,
    /// This host's API URL as the other hosts reach it (default `http://ADDRESS:PORT`
    /// with the daemon's port).
    #[serde(default)]
    pub api: Option<String>,
    /// Use this external etcd instead of running a member here.
    #[serde(default)]
    pub etcd: Vec<String>,
    /// Host lease TTL in seconds (2–60, default 5).
    #[serde(default)]
    pub lease_ttl_s: Option<u64>,
}

/// `POST /cluster/join`: sent to the joining host's own daemon.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ClusterJoin {
    /// API URL (or address) of any member.
    pub peer: String,
    /// This host's cluster address.
    pub address: String,
    #[serde(default)]
    pub api: Option<String>,
    /// The cluster CA's fingerprint (`ferry cluster join-token` and `ferry cluster certs
    /// status` on a member show it): the member must prove it holds that CA.
    pub fingerprint: String,
    /// A join token from `ferry cluster join-token` on a member (valid once).
    pub join_token: String,
}

/// `POST /cluster/members`: a joining host asks a member to add it, with a join token
/// (this call needs no other credentials) and a certificate request for its key.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MemberAdd {
    pub join_token: String,
    pub name: String,
    pub address: String,
    pub api: String,
    /// The joiner's etcd peer URL, when it runs a member.
    #[serde(default)]
    pub peer_url: Option<String>,
    /// PEM certificate request (PKCS#10) for the joiner's new key; the member decides
    /// the names in the certificate (`name`, `address`).
    pub csr: String,
}

/// The answer to [`MemberAdd`]: how to start the etcd member, and the host's
/// certificates.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MemberAdded {
    pub initial_cluster: String,
    pub endpoints: Vec<String>,
    pub lease_ttl_s: u64,
    /// The cluster CA (PEM). Its key stays with the member that holds it.
    pub ca_cert: String,
    /// The joiner's certificate (PEM), signed by the CA.
    pub host_cert: String,
    /// The certificate revocation list in force (PEM, signed by the CA): the joiner's
    /// etcd refuses what it names from its first handshake.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crl: Option<String>,
}

/// `GET /cluster/summary`: the cluster in figures, from the answering host's cache.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ClusterSummary {
    pub hosts: usize,
    /// Holding a lease and not in maintenance.
    pub hosts_online: usize,
    pub hosts_maintenance: usize,
    /// Without a lease.
    pub hosts_down: usize,
    /// VMs, templates included.
    pub vms: usize,
    pub templates: usize,
    /// VMs by state (`running`, `stopped`, …).
    pub vms_by_state: std::collections::BTreeMap<String, usize>,
    /// Memory of the hosts holding a lease.
    pub memory_bytes: u64,
    /// Memory the running VMs were given.
    pub vm_memory_bytes: u64,
    /// CPUs of the hosts holding a lease.
    pub cpus: f64,
    /// vCPUs of the running VMs.
    pub vm_cpus: usize,
    /// False when the answering host's view of the other hosts is incomplete (its cache
    /// is catching up after losing etcd): the figures are its last view.
    pub complete: bool,
}

/// A frame of `GET /api/v1/cluster/changes` (a websocket): what changed in the cluster
/// since the last frame, from the answering host's cache (frames at most every 250 ms).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ClusterChange {
    /// Hosts whose VMs changed (defined, deleted, moved, or changing state): read their
    /// rows again (`GET /api/v1/vms?host=`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vms_of: Vec<String>,
    /// The hosts themselves changed (members, leases, maintenance, pools, loads, fence
    /// marks).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hosts: bool,
    /// Anything may have changed (the cache listed the cluster again): read it all.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all: bool,
}

/// `DELETE /cluster/members/{name}`: take a member that is down out of the cluster.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct MemberRemoveParams {
    /// Drop the records of VMs the member still owns (their disks stay).
    #[serde(default)]
    pub force: bool,
}

/// The answer to a member's removal.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MemberRemoved {
    /// The VMs whose records went with it (with `force`).
    pub dropped_vms: Vec<String>,
}

/// `POST /cluster/certs/sign`: a member asks the CA holder to sign a new certificate
/// for its own key (renewal); the caller's certificate says which host it is.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CertSignRequest {
    /// PEM certificate request (PKCS#10).
    pub csr: String,
}

/// The answer to [`CertSignRequest`].
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CertSigned {
    /// PEM certificate.
    pub cert: String,
}

/// One host in `ferry cluster status`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MemberStatus {
    pub name: String,
    pub address: String,
    pub api: String,
    pub state: HostState,
    /// Runs an etcd member (a voter).
    pub etcd_member: bool,
    pub etcd_leader: bool,
    /// Seconds left on its lease, if it holds one.
    #[serde(default)]
    pub lease_ttl_left_s: Option<i64>,
    pub ha_manager: bool,
}

/// One etcd member's database, as it reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EtcdMemberHealth {
    pub name: String,
    pub endpoint: String,
    /// The database file.
    pub db_size_bytes: u64,
    /// The part holding data (the rest is free pages a defragmentation returns).
    pub db_in_use_bytes: u64,
    pub leader: bool,
    /// Why it could not be asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The cluster's etcd: size against its quota, alarms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EtcdStatus {
    /// The store's revision.
    pub revision: i64,
    /// Where etcd refuses writes (NOSPACE); unknown for an etcd ferry does not run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_bytes: Option<u64>,
    pub members: Vec<EtcdMemberHealth>,
    /// Raised alarms, as "NOSPACE on h2" (ferry disarms NOSPACE after freeing space).
    pub alarms: Vec<String>,
}

/// `GET /cluster/status`
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ClusterStatus {
    /// False on a host that is not in a cluster (the rest is empty then).
    pub clustered: bool,
    pub name: String,
    pub members: Vec<MemberStatus>,
    pub etcd_voters: usize,
    /// Voters needed for quorum.
    pub quorum: usize,
    pub has_quorum: bool,
    #[serde(default)]
    pub ha_manager: Option<String>,
    pub lease_ttl_s: u64,
    /// etcd's database and alarms (absent outside a cluster, or when etcd cannot be
    /// asked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd: Option<EtcdStatus>,
    /// Advice (e.g. a two-voter cluster needs a witness).
    #[serde(default)]
    pub warnings: Vec<String>,
}

/// A certificate, as `ferry cluster certs status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CertDetails {
    pub subject: String,
    /// Its subject alternative names (host name, addresses).
    pub names: Vec<String>,
    /// RFC 3339.
    pub not_before: String,
    /// RFC 3339.
    pub not_after: String,
    /// `SHA256:…` of the DER.
    pub fingerprint: String,
    pub serial: String,
}

/// `GET /cluster/certs`: the cluster CA and this host's certificate.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CertStatus {
    pub ca: CertDetails,
    pub host: CertDetails,
    pub host_days_left: i64,
    /// This host holds the CA key (it can sign a joining host's certificate).
    pub ca_key_here: bool,
    /// The number of the revocation list in force here (none outside a cluster).
    #[serde(default)]
    pub crl_number: Option<u64>,
    /// The serials of the host certificates it revokes (renewed ones, those of hosts
    /// that left).
    #[serde(default)]
    pub revoked: Vec<String>,
    pub warnings: Vec<String>,
}

/// In the store: a host certificate that no longer counts, until the CA holder's
/// next revocation list names it (`/cluster/revoked/{serial}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RevokedCert {
    pub serial: String,
    /// The host it was issued to.
    pub host: String,
    /// Why: `renewed` or `left`.
    pub reason: String,
    /// Unix time in milliseconds.
    pub at_ms: u64,
}

/// In the store: the revocation list the CA holder signed last (`/cluster/crl`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CrlRecord {
    pub number: u64,
    /// PEM, signed by the cluster CA.
    pub pem: String,
}
