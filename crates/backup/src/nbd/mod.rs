//! An async NBD client for reading VM disks from QEMU: the fleecing export of a running
//! VM (`block-export-add` type `nbd` with `bitmaps: [NAME]`) or `qemu-nbd` /
//! `qemu-storage-daemon` for a stopped one.
//!
//! The backup reader must read only the 4 MiB chunks that are allocated and, for an
//! incremental backup, changed. So the client negotiates structured replies (required)
//! and metadata contexts — [`BASE_ALLOCATION`] for holes and zeroes, and
//! [`dirty_bitmap_context`] for a QEMU dirty bitmap — then asks `NBD_CMD_BLOCK_STATUS`
//! ([`NbdClient::block_status_range`] walks a whole range) and reads with
//! [`NbdClient::read`], where holes arrive as `NBD_REPLY_TYPE_OFFSET_HOLE` and cost
//! nothing on the wire. A context the server does not grant is reported by
//! [`NbdClient::missing_contexts`] (no bitmap: read everything).
//!
//! Layout: [`wire`] (constants, handshake and header parsing) and [`reply`] (whole-reply
//! validation) are sans-IO and never trust a length from the server; `handshake` and
//! `client` do the I/O over any `AsyncRead + AsyncWrite` stream. One request is in
//! flight per connection; open several connections for parallel reads.

mod client;
mod error;
mod handshake;
pub mod reply;
pub mod wire;

#[cfg(test)]
mod fake_server_tests;
#[cfg(test)]
mod qemu_tests;
#[cfg(test)]
mod reply_tests;
#[cfg(test)]
mod wire_tests;

pub use client::{
    connect_tcp, connect_unix, NbdClient, DEFAULT_MAX_READ, MAX_RANGE_EXTENTS, MAX_STATUS_REQUEST,
};
pub use error::{NbdError, Op};
pub use handshake::{ExportInfo, Negotiated};
pub use reply::{ContextExtents, Extent, ServerError};
pub use wire::{BlockSize, MetaContext};

/// The standard allocation context.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// `base:allocation`: the extent is a hole (unallocated).
pub const STATE_HOLE: u32 = 1;
/// `base:allocation`: the extent reads as zeroes.
pub const STATE_ZERO: u32 = 2;
/// `qemu:dirty-bitmap:NAME`: the extent is dirty (changed since the bitmap started).
pub const STATE_DIRTY: u32 = 1;

/// The context name under which QEMU exports the dirty bitmap `bitmap`.
pub fn dirty_bitmap_context(bitmap: &str) -> String {
    format!("qemu:dirty-bitmap:{bitmap}")
}
