//! The cluster: membership in etcd ([`membership`]), the host lease and self-fencing
//! ([`lease`]), the HA manager and the local restart logic ([`ha`]), certificates
//! ([`certs`]) and removing a dead member ([`remove`]).

mod certs;
pub(crate) mod fence;
pub(crate) mod ha;
pub(crate) mod lease;
pub(crate) mod membership;
mod remove;

pub use membership::{connect, load_config};
