//! ferry's API and domain types: VM, disk, NIC, pool, volume, task and event definitions,
//! with serde, OpenAPI schemas and validation. Shared by the daemon, the CLI and the UI;
//! this crate does no I/O.

pub mod access;
pub mod arch;
pub mod backup;
pub mod cluster;
pub mod cpu;
pub mod drs;
pub mod error;
pub mod event;
pub mod guest;
pub mod host;
pub mod migration;
pub mod replica;
pub mod size;
pub mod startup;
pub mod state;
pub mod storage;
pub mod task;
pub mod validate;
pub mod vm;

pub use access::*;
pub use arch::Arch;
pub use backup::*;
pub use cluster::*;
pub use cpu::{HostCaps, DEFAULT_CPU_MODEL};
pub use drs::*;
pub use error::{code_for_status, ApiErrorBody};
pub use event::Event;
pub use guest::{CloudInit, CloudNet, GuestInfo, GuestInterface, GuestOs};
pub use host::{
    BackgroundTask, ClusterFile, ClusterHost, HostAlive, HostInfo, HostPort, HostUnit,
    MetricsHistory, MetricsPoint,
};
pub use migration::*;
pub use replica::*;
pub use size::{whole, ByteSize};
pub use startup::{HostPowerReport, HostPowerStep, HostShutdownAction, Startup};
pub use state::{VmAction, VmState};
pub use storage::{
    OvaImport, Pool, PoolKind, PoolSpec, UploadParams, UploadStatus, Volume, VolumeCreate,
    VolumeDownload, VolumeImport, VolumeResize,
};
pub use task::{Task, TaskAccepted, TaskState};
pub use validate::{Invalid, ValidationErrors};
pub use vm::*;
