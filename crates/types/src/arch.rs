//! Guest architectures (seed 000: guests of another CPU architecture run by emulation).
//! A VM's `arch` decides its QEMU (`qemu-system-ARCH`), its machine family (`virt` for
//! aarch64 and riscv64) and its default CPU model; a host runs its own architecture
//! with its accelerator (KVM) and others under TCG when it has their QEMU.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Arch {
    #[default]
    #[serde(rename = "x86_64")]
    #[cfg_attr(feature = "clap", value(name = "x86_64"))]
    X86_64,
    #[serde(rename = "aarch64")]
    #[cfg_attr(feature = "clap", value(name = "aarch64"))]
    Aarch64,
    #[serde(rename = "riscv64")]
    #[cfg_attr(feature = "clap", value(name = "riscv64"))]
    Riscv64,
}

/// Every architecture ferry knows.
pub const ARCHES: [Arch; 3] = [Arch::X86_64, Arch::Aarch64, Arch::Riscv64];

impl Arch {
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
            Arch::Riscv64 => "riscv64",
        }
    }

    /// From QEMU's name for it (`x86_64`, `aarch64`, `riscv64`).
    pub fn parse(s: &str) -> Option<Arch> {
        ARCHES.into_iter().find(|a| a.as_str() == s)
    }

    /// The QEMU that runs it.
    pub fn qemu_binary(self) -> String {
        format!("qemu-system-{}", self.as_str())
    }

    /// A new VM's CPU model: runs under TCG and on every host of the architecture.
    pub fn default_cpu(self) -> &'static str {
        match self {
            Arch::X86_64 => crate::cpu::DEFAULT_CPU_MODEL,
            Arch::Aarch64 => "cortex-a72",
            Arch::Riscv64 => "rv64",
        }
    }

    /// Whether ferry moves VMs of this arch while they run. riscv64: not yet — in the
    /// lab a riscv64 guest stopped answering after ferry's live migration (bare QEMU's
    /// between two processes worked); they move cold.
    pub fn live_migrates(self) -> bool {
        self != Arch::Riscv64
    }

    /// Whether VMs of this arch use the PC machine families (pc, q35) rather than virt.
    pub fn is_pc(self) -> bool {
        self == Arch::X86_64
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
