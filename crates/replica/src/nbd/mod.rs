//! A hand-written NBD server for QEMU on a unix socket: fixed-newstyle handshake,
//! `NBD_OPT_GO`/`INFO`/`EXPORT_NAME`/`LIST`/`ABORT`, simple replies (structured replies
//! are refused, which QEMU handles), READ/WRITE/FLUSH/TRIM/WRITE_ZEROES with FUA.
//! Requests are served concurrently (QEMU keeps many in flight); the parser is in
//! [`proto`] and never trusts a length. The export is a [`Backend`]: later a vhost-user-blk
//! front end can serve the same backend.

pub mod proto;
mod server;

pub use server::{serve, Backend, Exports};
