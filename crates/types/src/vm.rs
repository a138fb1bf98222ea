//! The VM definition (seed 000: CPU, RAM, disks on SCSI/IDE/SATA/virtio, optical drives,
//! NICs) and its structural validation. Checks that need the host (does the bridge or
//! pool exist, is there that much memory) are done by the agent.

use crate::size::ByteSize;
use crate::state::VmState;
use crate::validate::{check_ifname, check_name, ValidationErrors};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use utoipa::ToSchema;

pub const MIN_MEMORY_MIB: u64 = 16;
/// 16 TiB: beyond any host ferry runs on; larger is a typo.
pub const MAX_MEMORY_MIB: u64 = 16 << 20;
pub const MAX_CPUS: u32 = 255;
pub const MAX_DISKS: usize = 32;
pub const MAX_NICS: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum DiskBus {
    #[default]
    Virtio,
    Scsi,
    Sata,
    Ide,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum DiskFormat {
    #[default]
    Qcow2,
    Raw,
}

impl DiskFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
        }
    }
}

/// Host page cache use, as QEMU's `cache=` modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum CacheMode {
    /// O_DIRECT, guest flushes honoured (the safe default for shared storage).
    #[default]
    None,
    Writeback,
    Writethrough,
    Directsync,
    Unsafe,
}

impl CacheMode {
    /// (cache.direct, cache.no-flush, write-cache on the device)
    pub fn qemu_flags(self) -> (bool, bool, bool) {
        match self {
            CacheMode::None => (true, false, true),
            CacheMode::Writeback => (false, false, true),
            CacheMode::Writethrough => (false, false, false),
            CacheMode::Directsync => (true, false, false),
            CacheMode::Unsafe => (false, true, true),
        }
    }
}

/// A virtual disk. On create, give `size` for a new volume in `pool`, or `volume` to
/// attach an existing one; the stored definition always names its volume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    #[serde(default)]
    pub bus: DiskBus,
    #[serde(default = "default_pool")]
    pub pool: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<ByteSize>,
    #[serde(default)]
    pub format: DiskFormat,
    #[serde(default)]
    pub cache: CacheMode,
    #[serde(default)]
    pub readonly: bool,
    /// Kiosk mode: every start begins from the same content; writes go to a throw-away
    /// overlay discarded at power-off and at start. The volume itself never changes.
    #[serde(default, skip_serializing_if = "is_false")]
    pub nonpersistent: bool,
    /// I/O operations per second the guest may do on it (reads and writes together).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops: Option<u64>,
    /// MiB per second the guest may move on it (reads and writes together).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mbps: Option<u64>,
    /// Bursts: this many IOPS for up to `burst_s` seconds (at least `iops`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops_max: Option<u64>,
    /// Bursts: this many MiB/s for up to `burst_s` seconds (at least `mbps`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mbps_max: Option<u64>,
    /// How long a burst may last (default 1 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst_s: Option<u64>,
}

/// The most a disk limit may say (IOPS or MiB/s): beyond any device.
pub const MAX_DISK_LIMIT: u64 = 1_000_000;
/// The longest burst, in seconds.
pub const MAX_BURST_S: u64 = 3600;

impl DiskSpec {
    /// Whether any I/O limit is set.
    pub fn limited(&self) -> bool {
        self.iops.is_some() || self.mbps.is_some()
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum CdromBus {
    #[default]
    Ide,
    Sata,
    Scsi,
}

/// An optical drive, empty or with an ISO volume from a pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct CdromSpec {
    #[serde(default)]
    pub bus: CdromBus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum NicModel {
    #[default]
    Virtio,
    E1000,
    /// Intel 82574L (Windows has its driver built in).
    E1000e,
    Rtl8139,
    /// VMware's paravirtual NIC (imported VMware guests have its driver).
    Vmxnet3,
}

impl NicModel {
    /// QEMU's device.
    pub fn qemu_driver(self) -> &'static str {
        match self {
            NicModel::Virtio => "virtio-net-pci",
            NicModel::E1000 => "e1000",
            NicModel::E1000e => "e1000e",
            NicModel::Rtl8139 => "rtl8139",
            NicModel::Vmxnet3 => "vmxnet3",
        }
    }
}

/// The lowest and highest MTU a NIC may have.
pub const MTU_RANGE: std::ops::RangeInclusive<u32> = 576..=65520;

/// A network card: a tap on the named host bridge. The MAC is generated once at create
/// and kept for the VM's life (also across migration).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NicSpec {
    #[serde(default)]
    pub model: NicModel,
    pub bridge: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// The VLAN (1–4094) its frames belong to on a VLAN-aware bridge: the tap is an
    /// untagged member of that VLAN alone, the guest sees plain frames.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan: Option<u16>,
    /// The MTU the guest is told (virtio only; at most the bridge's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// The cable pulled: the guest sees no link (changeable while the VM runs).
    #[serde(default, skip_serializing_if = "is_false")]
    pub link_down: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Machine {
    /// i440fx: IDE built in (SATA through an added AHCI controller).
    #[default]
    Pc,
    /// Q35: SATA (AHCI) built in, no IDE.
    Q35,
    /// QEMU's `virt` board: aarch64 and riscv64 guests (PCI, virtio; no IDE or SATA).
    Virt,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Firmware {
    #[default]
    Bios,
    /// OVMF; needs the `ovmf` package on the host.
    Uefi,
}

/// Direct kernel boot (host paths), as for the test guest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DirectBoot {
    pub kernel: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    #[serde(default)]
    pub cmdline: String,
}

/// A VM definition as the user gives it (create, edit).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    pub name: String,
    /// The guest's CPU architecture (absent: x86_64). Other than the host's, it runs
    /// by emulation (TCG) on hosts that have its QEMU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<crate::arch::Arch>,
    #[serde(default = "one")]
    pub cpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    #[serde(default)]
    pub machine: Machine,
    /// The machine's QEMU version (`10.0`: `pc-q35-10.0`), pinned at create to the
    /// newest the host has, so a QEMU upgrade never changes the VM's hardware; absent
    /// in VMs defined before versions were pinned (they get the newest at each start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_version: Option<String>,
    /// The CPU model (`x86-64-v2-AES` by default at create; `host` only by choice: it
    /// cannot move between hosts safely). Absent in VMs defined before models: `host`
    /// on KVM, QEMU's default under TCG.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    #[serde(default)]
    pub firmware: Firmware,
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    #[serde(default)]
    pub cdroms: Vec<CdromSpec>,
    #[serde(default)]
    pub nics: Vec<NicSpec>,
    /// Device ids in boot order: `disk0`, `cdrom0`, `net0`, ... Empty: disks, CD-ROMs, NICs.
    #[serde(default)]
    pub boot_order: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_boot: Option<DirectBoot>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// High availability (restart after a crash or a host failure).
    #[serde(default, skip_serializing_if = "crate::cluster::HaPolicy::is_off")]
    pub ha: crate::cluster::HaPolicy,
    /// Where DRS may place it (affinity, anti-affinity, host labels, pins).
    #[serde(default, skip_serializing_if = "crate::drs::PlacementRules::is_empty")]
    pub placement: crate::drs::PlacementRules,
    /// The resource pool whose reservation, limit and shares it shares.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_pool: Option<String>,
    /// What its host does with it at boot and at shutdown.
    #[serde(default, skip_serializing_if = "crate::Startup::is_default")]
    pub startup: crate::Startup,
    /// A USB tablet (an absolute pointer: the VNC console's pointer does not drift).
    /// On by default at create; absent in VMs defined before it (off: their hardware
    /// stays as it was, also for migration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tablet: Option<bool>,
    /// A virtio RNG fed from the host's /dev/urandom (at most 1 KiB/s). On by default at
    /// create.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rng: Option<bool>,
    /// A virtio memory balloon (the guest's memory statistics; the host can take
    /// memory back). On by default at create.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<bool>,
    /// The QEMU guest agent's channel (a virtio-serial port): ferry then shows the
    /// guest's addresses and OS, shuts it down through the agent (ACPI when it does
    /// not answer) and freezes its file systems for disk snapshots and backups.
    #[serde(default, skip_serializing_if = "is_false")]
    pub agent: bool,
    /// cloud-init (NoCloud) settings: a seed disk labelled `cidata` at every start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init: Option<crate::guest::CloudInit>,
    /// A TPM 2.0 (swtpm, one per VM, running as the VM's QEMU user). Its state is kept
    /// with the VM and goes with it: live migration, cold moves, clones, snapshots.
    #[serde(default, skip_serializing_if = "is_false")]
    pub tpm: bool,
    /// UEFI Secure Boot with Microsoft's keys enrolled (OVMF's Secure Boot build; q35
    /// with SMM): only signed boot loaders run. Changing it gives the VM new UEFI
    /// variables at its next start (boot entries made by the guest are lost).
    #[serde(default, skip_serializing_if = "is_false")]
    pub secure_boot: bool,
}

/// A defined VM with its runtime status, as the API returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Vm {
    /// Small number unique on the host; names taps (`tap{id}i{n}`) and volumes.
    pub id: u32,
    pub spec: VmSpec,
    pub state: VmState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    /// `kvm` or `tcg` while running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel: Option<String>,
    /// Why the VM last stopped or crashed, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<String>,
    /// Templates are immutable: they are cloned, never started or edited.
    #[serde(default)]
    pub template: bool,
    /// The snapshot the VM's current state descends from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_snapshot: Option<String>,
    /// The VM this one was cloned from, and whether its disks are linked to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone_of: Option<CloneOf>,
    /// A live migration under way: `to HOST` on the source, `from HOST` on the
    /// destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<String>,
    /// The host holding the VM (in a cluster).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// A live-restore under way: the disks still fill from this backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live_restore: Option<crate::LiveRestoreInfo>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CloneOf {
    pub vm: String,
    pub linked: bool,
}

/// `POST /api/v1/vms/{name}/clone`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CloneRequest {
    /// Name of the new VM.
    pub name: String,
    /// A linked clone's disks are qcow2 overlays on the template's (instant, needs a
    /// template); a full clone copies them.
    #[serde(default)]
    pub linked: bool,
}

/// A snapshot of a VM: its disks, and with `with_memory` also its RAM and device state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Snapshot {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    pub with_memory: bool,
    pub created_ms: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// The guest agent froze the guest's file systems while its disks were taken (a
    /// disk-only snapshot of a running VM with the agent); false: crash-consistent (or
    /// with memory, where the saved RAM makes it whole).
    #[serde(default)]
    pub quiesced: bool,
    /// It keeps the VM's TPM state (a disk-only snapshot of a VM with a TPM), put back
    /// when it is reverted. With memory, the TPM's state is in the saved device state.
    #[serde(default, skip_serializing_if = "is_false")]
    pub tpm: bool,
    /// That state (base64 of swtpm's state file). Kept in the store and carried with
    /// the snapshot between hosts; never in an API answer (it holds the TPM's secrets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm_state: Option<String>,
}

impl Snapshot {
    /// As the API shows it: without the TPM's secrets.
    pub fn redacted(mut self) -> Snapshot {
        self.tpm_state = None;
        self
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreate {
    pub name: String,
    /// Also save RAM and device state (the VM must be running or paused).
    #[serde(default)]
    pub with_memory: bool,
    #[serde(default)]
    pub description: String,
}

/// All snapshots of a VM (parents before children) and where the VM stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SnapshotList {
    pub snapshots: Vec<Snapshot>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<String>,
}

/// Filters and paging of `GET /api/v1/vms` (every VM of the cluster, by name).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct VmListParams {
    /// Only the VMs of this host.
    #[serde(default)]
    pub host: Option<String>,
    /// Only VMs in this state.
    #[serde(default)]
    pub state: Option<VmState>,
    /// Only VMs whose name contains this text (any case).
    #[serde(default)]
    pub q: Option<String>,
    /// At most this many rows (1 to 1000; all when absent). The `x-next-cursor`
    /// header of the reply continues the listing; `x-total-count` counts every row the
    /// filters match.
    #[serde(default)]
    pub limit: Option<usize>,
    /// Rows after this one: the previous page's `x-next-cursor` (`name/host`), or a
    /// VM name.
    #[serde(default)]
    pub cursor: Option<String>,
}

/// The most rows one page of `GET /api/v1/vms` holds.
pub const VM_PAGE_MAX: usize = 1000;

/// Query flags for `DELETE /api/v1/vms/{name}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DeleteVmParams {
    /// Kill a running VM first.
    #[serde(default)]
    pub force: bool,
    /// Keep the VM's own volumes (`vm-{id}-*`) instead of deleting them.
    #[serde(default)]
    pub keep_disks: bool,
}

/// Options of shutdown.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ShutdownParams {
    /// Seconds to wait for the guest before killing QEMU (default 60).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

fn one() -> u32 {
    1
}
fn default_pool() -> String {
    "local".into()
}

/// The MAC of NIC slot `slot` of VM `id` in the cluster (or lone host) whose `salt`
/// it is (14 bits of its CA's fingerprint, [`mac_salt`]): unique in the cluster because
/// VM ids are, and apart from other clusters' and lone hosts' on the same LAN (whose
/// ids start at 100 too) unless their salts meet (1 in 16,384). Locally administered
/// and unicast; never in QEMU's `52:54:00` range, where random MACs of older VMs live.
/// None past 2^28 VMs or 16 slots.
pub fn derived_mac(salt: u16, id: u32, slot: usize) -> Option<String> {
    let slot = u32::try_from(slot).ok().filter(|s| *s < 16)?;
    let v = id.checked_mul(16)?.checked_add(slot)?;
    let [a, b, c, d] = v.to_be_bytes();
    // First octet: 64 locally administered unicast values (bits 0b......10).
    let first = (((salt >> 8) & 0x3f) as u8) << 2 | 0x02;
    let mut second = (salt & 0xff) as u8;
    if first == 0x52 && second == 0x54 {
        second = 0x55;
    }
    Some(format!(
        "{first:02x}:{second:02x}:{a:02x}:{b:02x}:{c:02x}:{d:02x}"
    ))
}

/// A cluster's (or lone host's) MAC salt from its CA's fingerprint (`SHA256:…` or any
/// text): 14 bits.
pub fn mac_salt(ca_fingerprint: &str) -> u16 {
    // FNV-1a: stable across versions and platforms (not a security measure).
    let mut h: u32 = 0x811c_9dc5;
    for b in ca_fingerprint.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    ((h ^ (h >> 16)) & 0x3fff) as u16
}

/// Locally administered unicast MAC in QEMU's 52:54:00 range.
pub fn random_mac() -> String {
    let b: [u8; 3] = rand::random();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
}

/// Parses `aa:bb:cc:dd:ee:ff`; refuses multicast and all-zero addresses.
pub fn parse_mac(s: &str) -> Result<[u8; 6], &'static str> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err("expected six hex bytes separated by ':'");
    }
    let mut out = [0u8; 6];
    for (o, p) in out.iter_mut().zip(&parts) {
        if p.len() != 2 {
            return Err("expected six hex bytes separated by ':'");
        }
        *o = u8::from_str_radix(p, 16).map_err(|_| "not a hex byte")?;
    }
    if out[0] & 1 == 1 {
        return Err("multicast address");
    }
    if out == [0; 6] {
        return Err("all-zero address");
    }
    Ok(out)
}

impl VmSpec {
    /// The guest's architecture.
    pub fn arch(&self) -> crate::arch::Arch {
        self.arch.unwrap_or_default()
    }

    /// What a new or edited spec means without saying it: a VM of another architecture
    /// than x86_64 left at the default machine (pc) gets `virt`.
    pub fn fill_arch_defaults(&mut self) {
        if !self.arch().is_pc() && self.machine == Machine::Pc {
            self.machine = Machine::Virt;
        }
    }

    /// The QEMU machine type (`pc-q35-10.0`, or the unversioned alias of an old VM).
    pub fn machine_type(&self) -> String {
        crate::cpu::machine_type(self.machine, self.machine_version.as_deref())
    }

    /// The machine type placement and migration must find on a host (None: unpinned).
    pub fn pinned_machine(&self) -> Option<String> {
        self.machine_version.as_ref().map(|_| self.machine_type())
    }

    /// Device ids in the default boot order.
    pub fn device_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = (0..self.disks.len()).map(|i| format!("disk{i}")).collect();
        ids.extend((0..self.cdroms.len()).map(|i| format!("cdrom{i}")));
        ids.extend((0..self.nics.len()).map(|i| format!("net{i}")));
        ids
    }

    /// The effective boot order (explicit, or disks, CD-ROMs, NICs).
    pub fn effective_boot_order(&self) -> Vec<String> {
        if self.boot_order.is_empty() {
            self.device_ids()
        } else {
            self.boot_order.clone()
        }
    }

    /// The host features ([`crate::cpu::HostCaps::features`]) it needs.
    pub fn needs(&self) -> Vec<String> {
        let mut out = vec![];
        if self.tpm {
            out.push(crate::cpu::FEATURE_TPM.to_string());
        }
        if self.secure_boot {
            out.push(crate::cpu::FEATURE_SECURE_BOOT.to_string());
        }
        out
    }

    /// Structural checks; reports every problem, not just the first.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut e = ValidationErrors::default();
        check_name(&mut e, "name", &self.name);
        if let Some(g) = &self.ha.anti_affinity {
            check_name(&mut e, "ha.anti_affinity", g);
        }
        self.placement.check(&mut e);
        self.startup.check(&mut e);
        if let Some(p) = &self.resource_pool {
            check_name(&mut e, "resource_pool", p);
        }
        if let Some(c) = &self.cloud_init {
            c.check(&mut e, self.nics.len());
        }
        let arch = self.arch();
        match (arch.is_pc(), self.machine) {
            (true, Machine::Virt) => e.push(
                "machine",
                "virt is the machine of aarch64 and riscv64 guests; x86_64 uses pc or q35",
            ),
            (false, Machine::Pc | Machine::Q35) => {
                e.push("machine", format!("{arch} guests use the machine virt"))
            }
            _ => {}
        }
        if !arch.is_pc() {
            for (i, d) in self.disks.iter().enumerate() {
                if matches!(d.bus, DiskBus::Ide | DiskBus::Sata) {
                    e.push(
                        format!("disks[{i}].bus"),
                        format!("{arch}'s virt machine has no IDE or SATA: use virtio or scsi"),
                    );
                }
            }
            for (i, c) in self.cdroms.iter().enumerate() {
                if c.bus != CdromBus::Scsi {
                    e.push(
                        format!("cdroms[{i}].bus"),
                        format!("{arch}'s virt machine has no IDE or SATA: use scsi"),
                    );
                }
            }
            if self.firmware == Firmware::Bios && self.direct_boot.is_none() {
                e.push(
                    "firmware",
                    format!(
                        "{arch} guests boot with UEFI (firmware uefi) or a kernel given directly"
                    ),
                );
            }
            if arch == crate::arch::Arch::Riscv64 && self.firmware == Firmware::Uefi {
                e.push(
                    "firmware",
                    "riscv64 guests boot a kernel given directly here",
                );
            }
        }
        if self.tpm && !arch.is_pc() {
            e.push(
                "tpm",
                format!("ferry gives a TPM to x86_64 guests (TIS); {arch} guests have none"),
            );
        }
        if self.secure_boot {
            if !arch.is_pc() {
                e.push("secure_boot", "Secure Boot is offered to x86_64 guests");
            } else if self.machine != Machine::Q35 {
                e.push(
                    "secure_boot",
                    "Secure Boot needs the q35 machine (its firmware runs in SMM, which pc lacks here)",
                );
            }
            if self.firmware != Firmware::Uefi {
                e.push("secure_boot", "Secure Boot is UEFI's: set firmware uefi");
            }
            if self.direct_boot.is_some() {
                e.push(
                    "secure_boot",
                    "a kernel given directly bypasses the boot loader Secure Boot checks: boot from a disk",
                );
            }
        }
        if let Some(Err(r)) = self.cpu.as_deref().map(crate::cpu::check_cpu_model) {
            e.push("cpu", r);
        }
        if let Some(Err(r)) = self
            .machine_version
            .as_deref()
            .map(crate::cpu::check_machine_version)
        {
            e.push("machine_version", r);
        }
        if self.cpus == 0 || self.cpus > MAX_CPUS {
            e.push("cpus", format!("must be between 1 and {MAX_CPUS}"));
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            e.push(
                "memory_mib",
                format!("must be at least {MIN_MEMORY_MIB} MiB"),
            );
        } else if self.memory_mib > MAX_MEMORY_MIB {
            e.push(
                "memory_mib",
                format!("{} MiB is absurd (at most 16 TiB)", self.memory_mib),
            );
        }
        if self.disks.len() > MAX_DISKS {
            e.push("disks", format!("at most {MAX_DISKS} disks"));
        }
        if self.nics.len() > MAX_NICS {
            e.push("nics", format!("at most {MAX_NICS} NICs"));
        }
        let mut vols = HashSet::new();
        for (i, d) in self.disks.iter().enumerate() {
            let f = format!("disks[{i}]");
            check_name(&mut e, &format!("{f}.pool"), &d.pool);
            match (&d.volume, d.size) {
                (None, None) => e.push(
                    &f,
                    "give a size for a new volume or the name of an existing volume",
                ),
                (Some(v), _) => {
                    check_name(&mut e, &format!("{f}.volume"), v);
                    if !vols.insert((d.pool.clone(), v.clone())) {
                        e.push(format!("{f}.volume"), format!("volume {v} is used twice"));
                    }
                }
                (None, Some(s)) => {
                    if s.0 < 1 << 20 {
                        e.push(format!("{f}.size"), "must be at least 1M");
                    } else if s.0 > 1 << 50 {
                        e.push(format!("{f}.size"), "larger than 1 PiB");
                    }
                }
            }
            if d.bus == DiskBus::Ide && self.machine == Machine::Q35 {
                e.push(
                    format!("{f}.bus"),
                    "the q35 machine has no IDE controller; use sata",
                );
            }
            for (k, v) in [
                ("iops", d.iops),
                ("mbps", d.mbps),
                ("iops_max", d.iops_max),
                ("mbps_max", d.mbps_max),
                ("burst_s", d.burst_s),
            ] {
                if v.is_some_and(|v| v == 0 || v > MAX_DISK_LIMIT) {
                    e.push(
                        format!("{f}.{k}"),
                        format!("must be between 1 and {MAX_DISK_LIMIT}"),
                    );
                }
            }
            for (base, max, k) in [
                (d.iops, d.iops_max, "iops_max"),
                (d.mbps, d.mbps_max, "mbps_max"),
            ] {
                match (base, max) {
                    (None, Some(_)) => {
                        e.push(format!("{f}.{k}"), "a burst needs the limit it rises above")
                    }
                    (Some(b), Some(m)) if m < b => {
                        e.push(format!("{f}.{k}"), format!("{m} is below the limit {b}"))
                    }
                    _ => {}
                }
            }
            if d.burst_s.is_some() && d.iops_max.is_none() && d.mbps_max.is_none() {
                e.push(format!("{f}.burst_s"), "give iops_max or mbps_max with it");
            }
            if d.burst_s.is_some_and(|b| b > MAX_BURST_S) {
                e.push(format!("{f}.burst_s"), format!("at most {MAX_BURST_S} s"));
            } else if d.mbps_max.is_some_and(|m| {
                m.saturating_mul(1 << 20)
                    .saturating_mul(d.burst_s.unwrap_or(1))
                    > 1_000_000_000_000_000
            }) {
                // QEMU's bound on what one burst may move
                e.push(
                    format!("{f}.burst_s"),
                    "mbps_max for burst_s seconds is more than 10^15 bytes",
                );
            }
        }
        for (i, c) in self.cdroms.iter().enumerate() {
            let f = format!("cdroms[{i}]");
            match (&c.pool, &c.volume) {
                (Some(p), Some(v)) => {
                    check_name(&mut e, &format!("{f}.pool"), p);
                    check_name(&mut e, &format!("{f}.volume"), v);
                }
                (None, None) => {}
                _ => e.push(
                    &f,
                    "give both pool and volume for an ISO, or neither for an empty drive",
                ),
            }
            if c.bus == CdromBus::Ide && self.machine == Machine::Q35 {
                e.push(
                    format!("{f}.bus"),
                    "the q35 machine has no IDE controller; use sata",
                );
            }
        }
        let ide = self.disks.iter().filter(|d| d.bus == DiskBus::Ide).count()
            + self
                .cdroms
                .iter()
                .filter(|c| c.bus == CdromBus::Ide)
                .count();
        if ide > 4 {
            e.push("disks", format!("{ide} IDE devices; IDE has 4 slots"));
        }
        let sata = self.disks.iter().filter(|d| d.bus == DiskBus::Sata).count()
            + self
                .cdroms
                .iter()
                .filter(|c| c.bus == CdromBus::Sata)
                .count();
        if sata > 6 {
            e.push(
                "disks",
                format!("{sata} SATA devices; the AHCI controller has 6 ports"),
            );
        }
        let mut macs = HashSet::new();
        for (i, n) in self.nics.iter().enumerate() {
            let f = format!("nics[{i}]");
            check_ifname(&mut e, &format!("{f}.bridge"), &n.bridge);
            if n.vlan.is_some_and(|v| !(1..=4094).contains(&v)) {
                e.push(format!("{f}.vlan"), "must be between 1 and 4094");
            }
            if let Some(m) = n.mtu {
                if !MTU_RANGE.contains(&m) {
                    e.push(
                        format!("{f}.mtu"),
                        format!(
                            "must be between {} and {}",
                            MTU_RANGE.start(),
                            MTU_RANGE.end()
                        ),
                    );
                } else if n.model != NicModel::Virtio {
                    e.push(
                        format!("{f}.mtu"),
                        "only a virtio NIC tells the guest its MTU; set it in the guest",
                    );
                }
            }
            if let Some(m) = &n.mac {
                match parse_mac(m) {
                    Err(r) => e.push(format!("{f}.mac"), format!("{m:?}: {r}")),
                    Ok(b) => {
                        if !macs.insert(b) {
                            e.push(format!("{f}.mac"), format!("{m} is used twice"));
                        }
                    }
                }
            }
        }
        let ids = self.device_ids();
        let mut seen = HashSet::new();
        for b in &self.boot_order {
            if !ids.contains(b) {
                e.push(
                    "boot_order",
                    format!("no device {b:?} (have: {})", ids.join(", ")),
                );
            } else if !seen.insert(b) {
                e.push("boot_order", format!("{b} listed twice"));
            }
        }
        if let Some(k) = &self.direct_boot {
            for (f, p) in [
                ("direct_boot.kernel", Some(&k.kernel)),
                ("direct_boot.initrd", k.initrd.as_ref()),
            ] {
                if let Some(p) = p {
                    if !p.starts_with('/') || p.split('/').any(|c| c == "..") {
                        e.push(f, "must be an absolute path without '..'");
                    }
                }
            }
            if k.cmdline.contains('\n') || k.cmdline.len() > 4096 {
                e.push(
                    "direct_boot.cmdline",
                    "must be one line of at most 4096 bytes",
                );
            }
        }
        if self.description.len() > 4096 {
            e.push("description", "at most 4096 bytes");
        }
        e.into_result()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        serde_json::from_value(serde_json::json!({
            "name": "web1", "cpus": 2, "memory_mib": 512,
            "disks": [{"bus": "virtio", "size": "1G"}, {"bus": "scsi", "pool": "p2", "volume": "data"}],
            "cdroms": [{}],
            "nics": [{"bridge": "vmbr0"}]
        }))
        .unwrap()
    }

    #[test]
    fn other_architectures_get_the_virt_board_and_its_buses() {
        let mut s = spec();
        s.arch = Some(crate::Arch::Aarch64);
        s.fill_arch_defaults();
        assert_eq!(s.machine, Machine::Virt);
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("cdroms[0].bus"), "{e}");
        assert!(e.contains("firmware: aarch64 guests boot with UEFI"), "{e}");
        s.cdroms[0].bus = CdromBus::Scsi;
        s.firmware = Firmware::Uefi;
        s.validate().unwrap();
        s.disks[0].bus = DiskBus::Sata;
        assert!(s
            .validate()
            .unwrap_err()
            .to_string()
            .contains("disks[0].bus"));
        s.disks[0].bus = DiskBus::Virtio;
        s.machine = Machine::Q35;
        assert!(s
            .validate()
            .unwrap_err()
            .to_string()
            .contains("aarch64 guests use the machine virt"));
        let mut x = spec();
        x.machine = Machine::Virt;
        assert!(x
            .validate()
            .unwrap_err()
            .to_string()
            .contains("x86_64 uses pc or q35"));
        assert_eq!(
            serde_json::to_value(crate::Arch::Aarch64).unwrap(),
            serde_json::json!("aarch64")
        );
        assert!(
            serde_json::to_value(spec()).unwrap().get("arch").is_none(),
            "old specs unchanged"
        );
    }

    #[test]
    fn a_tpm_and_secure_boot_need_what_they_run_on() {
        let mut s = spec();
        s.tpm = true;
        s.validate().unwrap();
        assert_eq!(s.needs(), ["tpm"]);
        s.secure_boot = true;
        let e = s.validate().unwrap_err().to_string();
        assert!(
            e.contains("secure_boot: Secure Boot needs the q35 machine"),
            "{e}"
        );
        assert!(e.contains("secure_boot: Secure Boot is UEFI's"), "{e}");
        s.machine = Machine::Q35;
        s.firmware = Firmware::Uefi;
        s.cdroms[0].bus = CdromBus::Sata;
        s.validate().unwrap();
        assert_eq!(s.needs(), ["tpm", "secure-boot"]);
        s.direct_boot = Some(DirectBoot {
            kernel: "/k".into(),
            initrd: None,
            cmdline: String::new(),
        });
        assert!(s.validate().unwrap_err().to_string().contains("bypasses"));
        let mut arm = spec();
        arm.arch = Some(crate::Arch::Aarch64);
        arm.fill_arch_defaults();
        arm.firmware = Firmware::Uefi;
        arm.cdroms[0].bus = CdromBus::Scsi;
        arm.tpm = true;
        assert!(arm
            .validate()
            .unwrap_err()
            .to_string()
            .contains("tpm: ferry gives a TPM to x86_64"));
        // absent in old specs, and absent when off
        let v = serde_json::to_value(spec()).unwrap();
        assert!(v.get("tpm").is_none() && v.get("secure_boot").is_none());
        // a snapshot's TPM state never leaves in an API answer
        let snap = Snapshot {
            name: "s".into(),
            parent: None,
            with_memory: false,
            created_ms: 1,
            description: String::new(),
            quiesced: false,
            tpm: true,
            tpm_state: Some("c2VjcmV0".into()),
        };
        let shown = serde_json::to_value(snap.redacted()).unwrap();
        assert!(
            shown.get("tpm_state").is_none() && shown["tpm"] == true,
            "{shown}"
        );
    }

    #[test]
    fn validate_good_spec_passes() {
        spec().validate().unwrap();
        assert_eq!(
            spec().effective_boot_order(),
            ["disk0", "disk1", "cdrom0", "net0"]
        );
    }

    #[test]
    fn validate_reports_every_problem() {
        let mut s = spec();
        s.memory_mib = 0;
        s.cpus = 0;
        s.disks[1].volume = Some("../etc/passwd".into());
        s.boot_order = vec!["disk7".into()];
        let errs = s.validate().unwrap_err();
        let fields: Vec<&str> = errs.0.iter().map(|e| e.field.as_str()).collect();
        assert!(fields.contains(&"memory_mib"), "{errs}");
        assert!(fields.contains(&"cpus"), "{errs}");
        assert!(fields.contains(&"disks[1].volume"), "{errs}");
        assert!(fields.contains(&"boot_order"), "{errs}");
    }

    #[test]
    fn validate_absurd_memory_rejected() {
        let mut s = spec();
        s.memory_mib = u64::MAX;
        assert!(s.validate().unwrap_err().to_string().contains("absurd"));
    }

    #[test]
    fn unknown_fields_and_buses_rejected() {
        let r: Result<VmSpec, _> = serde_json::from_value(serde_json::json!({
            "name": "a", "memory_mib": 64, "colour": "red"}));
        assert!(r.unwrap_err().to_string().contains("colour"));
        let r: Result<VmSpec, _> = serde_json::from_value(serde_json::json!({
            "name": "a", "memory_mib": 64, "disks": [{"bus": "floppy", "size": "1G"}]}));
        assert!(r.unwrap_err().to_string().contains("floppy"));
    }

    #[test]
    fn ide_on_q35_rejected() {
        let mut s = spec();
        s.machine = Machine::Q35;
        s.disks[0].bus = DiskBus::Ide;
        assert!(s.validate().is_err());
    }

    #[test]
    fn mac_parsing() {
        assert!(parse_mac("52:54:00:12:34:56").is_ok());
        assert!(parse_mac("01:00:5e:00:00:01").is_err());
        assert!(parse_mac("52:54:00:12:34").is_err());
        assert!(parse_mac("zz:54:00:12:34:56").is_err());
        assert!(parse_mac(&random_mac()).is_ok());
        let s = 0x1446; // first octet 0x52, second 0x46
        assert_eq!(derived_mac(s, 100, 0).as_deref(), Some("52:46:00:00:06:40"));
        assert_eq!(
            derived_mac(s, 100, 15).as_deref(),
            Some("52:46:00:00:06:4f")
        );
        assert_eq!(derived_mac(s, 101, 0).as_deref(), Some("52:46:00:00:06:50"));
        assert!(derived_mac(s, 100, 16).is_none());
        assert!(derived_mac(s, 1 << 28, 0).is_none());
        // Never QEMU's 52:54:00 range.
        assert_eq!(
            derived_mac(0x1454, 1, 0).as_deref(),
            Some("52:55:00:00:00:10")
        );
        // Two clusters (their CAs) differ.
        let (a, b) = (mac_salt("SHA256:aa"), mac_salt("SHA256:ab"));
        assert_ne!(derived_mac(a, 100, 0), derived_mac(b, 100, 0));
        for salt in [0u16, 0x3fff, a, b] {
            let m = parse_mac(&derived_mac(salt, u32::MAX >> 4, 15).unwrap()).unwrap();
            assert_eq!(m[0] & 1, 0, "unicast");
            assert_eq!(m[0] & 2, 2, "locally administered");
        }
    }

    proptest::proptest! {
        #[test]
        fn validate_never_panics(name in ".{0,80}", cpus in 0u32..1000, mem in 0u64..u64::MAX,
                                 vol in ".{0,20}", order in proptest::collection::vec(".{0,8}", 0..4)) {
            let mut s = spec();
            s.name = name; s.cpus = cpus; s.memory_mib = mem;
            s.disks[1].volume = Some(vol); s.boot_order = order;
            let _ = s.validate();
        }

        #[test]
        fn disk_limits_and_nic_numbers_are_checked_never_overflow(
            iops in proptest::option::of(proptest::num::u64::ANY),
            mbps in proptest::option::of(proptest::num::u64::ANY),
            iops_max in proptest::option::of(proptest::num::u64::ANY),
            mbps_max in proptest::option::of(proptest::num::u64::ANY),
            burst_s in proptest::option::of(proptest::num::u64::ANY),
            vlan in proptest::option::of(proptest::num::u16::ANY),
            mtu in proptest::option::of(proptest::num::u32::ANY),
        ) {
            let mut s = spec();
            let d = &mut s.disks[0];
            (d.iops, d.mbps, d.iops_max, d.mbps_max, d.burst_s) = (iops, mbps, iops_max, mbps_max, burst_s);
            s.nics.push(NicSpec { model: NicModel::Virtio, bridge: "br0".into(), mac: None, vlan, mtu, link_down: false });
            if s.validate().is_ok() {
                let d = &s.disks[0];
                for v in [d.iops, d.mbps, d.iops_max, d.mbps_max].into_iter().flatten() {
                    proptest::prop_assert!((1..=MAX_DISK_LIMIT).contains(&v));
                }
                proptest::prop_assert!(d.iops_max.is_none() || d.iops_max >= d.iops);
                proptest::prop_assert!(d.mbps_max.is_none() || d.mbps_max >= d.mbps);
                let burst = d.burst_s.unwrap_or(1);
                proptest::prop_assert!(d.mbps_max.unwrap_or(0) * (1 << 20) * burst <= 1_000_000_000_000_000);
                proptest::prop_assert!(vlan.is_none_or(|v| (1..=4094).contains(&v)));
                proptest::prop_assert!(mtu.is_none_or(|m| MTU_RANGE.contains(&m)));
            }
        }
    }
}
