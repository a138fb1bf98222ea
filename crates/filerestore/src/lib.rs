//! File-level restore (`ferry backup files`): a tiny helper VM attaches a backup's
//! disks read-only and answers listings and reads, so no guest filesystem is ever
//! mounted on the host. `proto` is the wire between the daemon and the helper,
//! `serve` the helper's answers (tested here on the host's own folders), and the
//! binary `ferry-file-restore` the helper's program (its init, after the test guest's
//! `/init` loaded the kernel modules): it mounts what it finds and serves.

pub mod proto;
pub mod serve;
