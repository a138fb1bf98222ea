//! Replicated volumes without a SAN: DRBD's "RAID-1 over servers" in user space.
//!
//! Each host of a `replicated` pool keeps a full copy of every volume ([`local`]: a raw
//! file, its generation history, an activity log and per-peer dirty bitmaps). The host
//! running the VM is the *primary* for a term ([`primary`]): QEMU writes through an NBD
//! export on a unix socket ([`nbd`]), each write goes to the local copy and to every
//! connected peer and is acknowledged when all have it (protocol C; FLUSH and FUA end
//! to end). A peer that is gone is marked outdated in the cluster ([`Cluster`]) before
//! a write it missed is acknowledged, and its regions collect in its bitmap; when it
//! returns only those are resynced, in the background. Every promotion starts a new
//! generation; on connect the histories decide ([`decide`]): resync by bitmap or in
//! full, refuse a stale primary, or report a split brain and wait for the admin.
//!
//! The wire formats ([`wire`], [`nbd::proto`]) are sans-IO, versioned and length
//! checked; the fuzz targets in `fuzz/` and the corpus test run them on junk.
//!
//! Runs inside `ferry serve` ([`Service`]): one TCP listener per host for peers, one
//! NBD socket per copy.

pub mod bitmap;
pub mod conn;
pub mod decide;
pub mod local;
pub mod nbd;
pub mod primary;
pub mod promote;
mod ranges;
pub mod replica;
mod service;
pub mod wire;

pub use replica::Replica;
pub use service::Service;

use std::net::SocketAddr;

#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Role(String),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl ReplicaError {
    pub(crate) fn io(what: String, source: std::io::Error) -> ReplicaError {
        ReplicaError::Io { what, source }
    }
}

/// Something the replication reports to the cluster (events).
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    /// A peer was marked outdated: the primary writes without it.
    Degraded {
        peer: String,
    },
    /// A peer caught up.
    Resynced {
        peer: String,
        bytes: u64,
        seconds: f64,
    },
    SplitBrain {
        peer: String,
        reason: String,
    },
    Stale {
        peer: String,
        reason: String,
    },
}

/// What replication needs from the cluster; the agent implements it on the store.
#[async_trait::async_trait]
pub trait Cluster: Send + Sync + 'static {
    /// Records that `peer`'s copy of `volume` misses writes (it must not be promoted).
    /// A write the peer missed is acknowledged only after this succeeded.
    async fn outdate(&self, volume: &str, peer: &str) -> Result<(), String>;
    /// Records that `peer`'s copy is complete again.
    async fn up_to_date(&self, volume: &str, peer: &str) -> Result<(), String>;
    /// Where `host`'s replication service listens.
    async fn peer_addr(&self, host: &str) -> Option<SocketAddr>;
    /// TLS to host `host` (this host's certificate shown, `host`'s name checked in
    /// its certificate); None: plain TCP (unit tests only).
    fn client_tls(&self, _host: &str) -> Option<std::sync::Arc<rustls::ClientConfig>> {
        None
    }
    /// Whether `serial` is host `host`'s current certificate (not one renewed away,
    /// nor that of a host that left and came back under the same name).
    async fn current_cert(&self, _host: &str, _serial: Option<&str>) -> bool {
        true
    }
    /// TLS for connections from peers (their certificates required); None: plain TCP,
    /// peers then checked by address (unit tests only).
    fn server_tls(&self) -> Option<std::sync::Arc<rustls::ServerConfig>> {
        None
    }
    fn report(&self, volume: &str, report: Report);
}

#[cfg(test)]
mod tests;

/// What the `nbd_request` fuzz target (and the corpus test) feeds arbitrary bytes to.
pub fn fuzz_nbd(data: &[u8]) {
    if data.len() >= nbd::proto::REQUEST_LEN {
        if let Ok(r) = nbd::proto::parse_request(&data[..nbd::proto::REQUEST_LEN]) {
            let size = u64::from_le_bytes(
                data[data.len() - 8.min(data.len())..]
                    .iter()
                    .chain([0u8; 8].iter())
                    .take(8)
                    .copied()
                    .collect::<Vec<_>>()
                    .try_into()
                    .unwrap_or([0; 8]),
            );
            let _ = r.check(size);
            let _ = r.payload();
        }
    }
    if data.len() >= nbd::proto::OPTION_HEADER_LEN {
        let h: [u8; nbd::proto::OPTION_HEADER_LEN] = data[..nbd::proto::OPTION_HEADER_LEN]
            .try_into()
            .unwrap_or([0; nbd::proto::OPTION_HEADER_LEN]);
        let _ = nbd::proto::parse_option_header(&h);
    }
    let _ = nbd::proto::parse_go(data);
}

/// What the `wire_frame` fuzz target (and the corpus test) feeds arbitrary bytes to:
/// a decoded frame must encode back to the same bytes.
pub fn fuzz_wire(data: &[u8]) {
    if let Ok(m) = wire::decode_frame(data) {
        assert_eq!(wire::decode_frame(&m.encode()).as_ref(), Ok(&m));
    }
    if data.len() > wire::HEADER_LEN + 18 {
        let _ = wire::decode_write_head(&data[wire::HEADER_LEN + 18..]);
    }
}
