//! Host-side backups of VM disks (seeds 001 and 003; Proxmox Backup Server is the
//! anchor users compare with). [`store`] is the backup store: fixed 4 MiB chunks named
//! by their BLAKE3 hash (keyed when encrypted), zstd, optional authenticated encryption,
//! a SQLite catalog of snapshots with reference-counted chunks. [`nbd`] is the client
//! that reads a VM's disks from QEMU's fleecing export, asking the server which chunks
//! are allocated and which the dirty bitmap marks changed.

pub mod calendar;
pub mod capture;
#[cfg(test)]
mod capture_tests;
pub mod nbd;
pub mod offline;
pub mod plan;
pub mod retention;
pub mod store;
