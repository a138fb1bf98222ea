//! CPU models and machine versions: what a VM's virtual hardware is, pinned so it stays
//! the same on every host it runs on (live migration needs both ends to present the
//! same CPU and the same machine), and what each host can run.
//!
//! - A VM's CPU model is named: QEMU's own (`Westmere`, `qemu64`, …) or one of the
//!   x86-64 micro-architecture levels ferry defines like Proxmox does
//!   ([`NAMED_MODELS`]: `qemu64` with the level's flags). `host` (and `max`) pass the
//!   host's CPU through: fastest, but the guest may use anything the host has, so such
//!   a VM only moves when an admin asks.
//! - The machine type is versioned at create (`pc-q35-10.0`): a newer QEMU keeps the
//!   old version's virtual hardware.
//! - Each host publishes its [`HostCaps`] (probed from its QEMU at start, limited by
//!   the admin's `cpu_models`); placement, live migration and starts refuse a host
//!   that cannot run the VM's model or machine, with the reason.

use crate::vm::Machine;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The CPU model of a new VM (Proxmox's default too): runs on any x86-64 server CPU of
/// the last decade and under TCG, and migrates between all of them.
pub const DEFAULT_CPU_MODEL: &str = "x86-64-v2-AES";

/// A model ferry defines on top of QEMU's: (name, the level it extends or None for the
/// QEMU base model `qemu64`, the flags it adds).
pub type NamedModel = (&'static str, Option<&'static str>, &'static [&'static str]);

/// The QEMU model ferry's levels start from.
const LEVEL_BASE: &str = "qemu64";

/// The x86-64 micro-architecture levels (psABI), as Proxmox names them, each adding to
/// the one before. With AES they also carry `pclmulqdq` (every AES-NI CPU has it;
/// Linux's aesni_intel uses it without asking: a #UD under TCG, found by the lab's
/// Debian guest); v3 and v4 `xsaveopt` (every CPU with AVX2 has it: a Linux guest with
/// XSAVE but without it hangs early under TCG).
pub const NAMED_MODELS: &[NamedModel] = &[
    (
        "x86-64-v2",
        None,
        &[
            "cx16", "lahf-lm", "popcnt", "pni", "sse4.1", "sse4.2", "ssse3",
        ],
    ),
    ("x86-64-v2-AES", Some("x86-64-v2"), &["aes", "pclmulqdq"]),
    (
        "x86-64-v3",
        Some("x86-64-v2-AES"),
        &[
            "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave", "xsaveopt",
        ],
    ),
    (
        "x86-64-v4",
        Some("x86-64-v3"),
        &["avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"],
    ),
];

/// Every flag ferry's level `name` adds to `qemu64` (None: not one of its levels).
pub fn model_flags(name: &str) -> Option<Vec<&'static str>> {
    let (_, parent, flags) = NAMED_MODELS.iter().find(|m| m.0 == name)?;
    let mut all = match parent {
        Some(p) => model_flags(p)?,
        None => vec![],
    };
    all.extend_from_slice(flags);
    Some(all)
}

/// Models that pass the host's CPU through: not migration-safe.
pub fn is_passthrough(model: &str) -> bool {
    model == "host" || model == "max"
}

/// What QEMU's `-cpu` gets for model `name`: a named model as its base with the flags
/// added; with `enforce` (not for pass-through models), so QEMU refuses to start rather
/// than silently leave out a flag the host lacks.
pub fn qemu_cpu_arg(name: &str) -> String {
    if is_passthrough(name) {
        return name.to_string();
    }
    match model_flags(name) {
        Some(flags) => {
            let mut s = LEVEL_BASE.to_string();
            for f in flags {
                s.push_str(",+");
                s.push_str(f);
            }
            s.push_str(",enforce");
            s
        }
        None => format!("{name},enforce"),
    }
}

/// Checks a CPU model name's form (what it names is checked by the host).
pub fn check_cpu_model(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err("must be 1 to 64 characters long".into());
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(format!("{name:?}: only letters, digits, '-', '_' and '.'"));
    }
    Ok(())
}

/// Checks a machine version's form: `MAJOR.MINOR` (QEMU's, e.g. `10.0`).
pub fn check_machine_version(v: &str) -> Result<(), String> {
    let ok = v.split_once('.').is_some_and(|(a, b)| {
        [a, b]
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 3 && p.chars().all(|c| c.is_ascii_digit()))
    });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{v:?}: give QEMU's machine version as MAJOR.MINOR, e.g. 10.0"
        ))
    }
}

/// The QEMU machine type of family `machine` at `version` (None: the unversioned alias,
/// for VMs defined before machine versions were pinned).
pub fn machine_type(machine: Machine, version: Option<&str>) -> String {
    let (alias, prefix) = match machine {
        Machine::Pc => ("pc", "pc-i440fx-"),
        Machine::Q35 => ("q35", "pc-q35-"),
        Machine::Virt => ("virt", "virt-"),
    };
    match version {
        Some(v) => format!("{prefix}{v}"),
        None => alias.to_string(),
    }
}

/// What a host can run, as its QEMU said at the daemon's start (`/hosts/{host}/meta/caps`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HostCaps {
    /// The guest architecture its QEMU emulates (`x86_64`).
    pub arch: String,
    /// `kvm` or `tcg`.
    pub accel: String,
    /// The QEMU release (`10.0.2`).
    pub qemu: String,
    /// CPU models VMs may use here (QEMU's usable ones and ferry's levels, limited to
    /// the admin's `cpu_models` when set), sorted.
    pub cpu_models: Vec<String>,
    /// Versioned machine types of the families ferry uses (`pc-i440fx-*`,
    /// `pc-q35-*`, `virt-*`), sorted.
    pub machines: Vec<String>,
    /// The other architectures it runs by emulation (TCG), each as its QEMU said.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(no_recursion)]
    pub others: Vec<HostCaps>,
    /// Devices beyond QEMU it can give guests of this architecture: `tpm` (swtpm is
    /// installed), `secure-boot` (OVMF's Secure Boot build with Microsoft's keys).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<String>,
}

/// A host feature ([`HostCaps::features`]): swtpm, for VMs with a TPM.
pub const FEATURE_TPM: &str = "tpm";
/// A host feature: OVMF's Secure Boot build and variables with Microsoft's keys.
pub const FEATURE_SECURE_BOOT: &str = "secure-boot";

/// Orders `a.b` versions numerically (`9.2` < `10.0`).
fn version_key(v: &str) -> (u32, u32) {
    let (a, b) = v.split_once('.').unwrap_or((v, "0"));
    (a.parse().unwrap_or(0), b.parse().unwrap_or(0))
}

impl HostCaps {
    /// The newest version of machine family `machine` this host's QEMU has.
    pub fn latest_machine_version(&self, machine: Machine) -> Option<String> {
        let prefix = machine_type(machine, Some(""));
        self.machines
            .iter()
            .filter_map(|m| m.strip_prefix(&prefix))
            .filter(|v| check_machine_version(v).is_ok())
            .max_by_key(|v| version_key(v))
            .map(str::to_string)
    }

    /// The caps for guests of `arch`: its own or an emulated one's.
    pub fn for_arch(&self, arch: &str) -> Option<&HostCaps> {
        if self.arch == arch {
            Some(self)
        } else {
            self.others.iter().find(|o| o.arch == arch)
        }
    }

    /// Every architecture it runs, with how: `x86_64 (kvm)`, `aarch64 (tcg)`.
    pub fn arches(&self) -> Vec<String> {
        std::iter::once(self)
            .chain(&self.others)
            .map(|c| format!("{} ({})", c.arch, c.accel))
            .collect()
    }

    /// [`HostCaps::refusals`] for a guest of `arch` that needs `features`.
    pub fn refusals_for(
        &self,
        arch: &str,
        cpu: Option<&str>,
        machine: Option<&str>,
        features: &[String],
    ) -> Vec<String> {
        match self.for_arch(arch) {
            Some(c) => {
                let mut out = c.refusals(cpu, machine);
                for f in features {
                    if !c.features.contains(f) {
                        out.push(match f.as_str() {
                            FEATURE_TPM => "has no swtpm for a TPM (Debian package swtpm)".into(),
                            FEATURE_SECURE_BOOT => {
                                "has no Secure Boot firmware (OVMF_CODE_4M.secboot.fd, OVMF_VARS_4M.ms.fd: Debian package ovmf)".into()
                            }
                            other => format!("lacks {other}"),
                        });
                    }
                }
                out
            }
            None => vec![format!(
                "cannot run {arch} guests (it has no qemu-system-{arch})"
            )],
        }
    }

    /// Why this host cannot run a VM with CPU model `cpu` and machine type `machine`
    /// (None: defined before they were pinned; not checked); empty: it can.
    pub fn refusals(&self, cpu: Option<&str>, machine: Option<&str>) -> Vec<String> {
        let mut out = vec![];
        if let Some(c) = cpu {
            if !self.cpu_models.iter().any(|m| m == c) {
                out.push(format!("cannot run CPU model {c}"));
            }
        }
        if let Some(m) = machine {
            if !self.machines.iter().any(|x| x == m) {
                out.push(format!("its QEMU {} lacks machine type {m}", self.qemu));
            }
        }
        out
    }
}

/// QEMU's answers at a probe, reduced to what [`host_caps`] needs.
#[derive(Debug, Clone, Default)]
pub struct Probe {
    /// `query-cpu-definitions`: (name, usable: no unavailable features).
    pub definitions: Vec<(String, bool)>,
    /// Flags the `max` model has on this accelerator (`query-cpu-model-expansion`).
    pub max_flags: std::collections::BTreeSet<String>,
    /// `query-machines` names.
    pub machines: Vec<String>,
}

/// The caps a probe gives, limited to `allowed` when it is not empty (names QEMU cannot
/// run are left out: the second list).
pub fn host_caps(
    arch: &str,
    accel: &str,
    qemu: &str,
    p: &Probe,
    allowed: &[String],
) -> (HostCaps, Vec<String>) {
    let mut models: std::collections::BTreeSet<String> = p
        .definitions
        .iter()
        .filter(|(_, usable)| *usable)
        .map(|(n, _)| n.clone())
        .collect();
    // TCG has no `host`; a KVM host lists it usable.
    let base_usable = |b: &str| models.contains(b);
    let named: Vec<String> = NAMED_MODELS
        .iter()
        .filter(|(name, _, _)| {
            base_usable(LEVEL_BASE)
                && model_flags(name)
                    .unwrap_or_default()
                    .iter()
                    .all(|f| p.max_flags.contains(*f) || p.max_flags.contains(&f.replace('.', "_")))
        })
        .map(|(n, _, _)| n.to_string())
        .collect();
    models.extend(named);
    let mut dropped = vec![];
    if !allowed.is_empty() {
        for a in allowed {
            if !models.contains(a) {
                dropped.push(a.clone());
            }
        }
        models.retain(|m| allowed.contains(m));
    }
    let mut machines: Vec<String> = p
        .machines
        .iter()
        .filter(|m| {
            [Machine::Pc, Machine::Q35, Machine::Virt].iter().any(|f| {
                m.strip_prefix(&machine_type(*f, Some("")))
                    .is_some_and(|v| check_machine_version(v).is_ok())
            })
        })
        .cloned()
        .collect();
    machines.sort();
    machines.dedup();
    (
        HostCaps {
            arch: arch.to_string(),
            accel: accel.to_string(),
            qemu: qemu.to_string(),
            cpu_models: models.into_iter().collect(),
            machines,
            others: vec![],
            features: vec![],
        },
        dropped,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn probe() -> Probe {
        Probe {
            definitions: vec![
                ("qemu64".into(), true),
                ("Westmere".into(), true),
                ("Skylake-Server".into(), false),
            ],
            max_flags: model_flags("x86-64-v3")
                .unwrap_or_default()
                .iter()
                .map(|s| s.to_string())
                .collect(),
            machines: vec![
                "pc-q35-10.0".into(),
                "pc-q35-9.2".into(),
                "pc-i440fx-10.0".into(),
                "pc".into(),
                "q35".into(),
                "microvm".into(),
                "pc-q35-evil".into(),
            ],
        }
    }

    #[test]
    fn caps_offer_usable_models_and_the_levels_the_flags_allow() {
        let (c, dropped) = host_caps("x86_64", "tcg", "10.0.2", &probe(), &[]);
        assert!(dropped.is_empty());
        assert_eq!(
            c.cpu_models,
            [
                "Westmere",
                "qemu64",
                "x86-64-v2",
                "x86-64-v2-AES",
                "x86-64-v3"
            ]
        );
        assert_eq!(c.machines, ["pc-i440fx-10.0", "pc-q35-10.0", "pc-q35-9.2"]);
        assert_eq!(
            c.latest_machine_version(Machine::Q35).as_deref(),
            Some("10.0")
        );
        assert_eq!(
            c.latest_machine_version(Machine::Pc).as_deref(),
            Some("10.0")
        );
    }

    #[test]
    fn the_admins_list_limits_the_models_and_unknown_names_are_reported() {
        let allowed = vec!["x86-64-v2-AES".to_string(), "x86-64-v4".to_string()];
        let (c, dropped) = host_caps("x86_64", "kvm", "10.0.2", &probe(), &allowed);
        assert_eq!(c.cpu_models, ["x86-64-v2-AES"]);
        assert_eq!(dropped, ["x86-64-v4"]);
        assert!(c
            .refusals(Some("x86-64-v2-AES"), Some("pc-q35-9.2"))
            .is_empty());
        let r = c.refusals(Some("x86-64-v3"), Some("pc-q35-11.0"));
        assert_eq!(r.len(), 2, "{r:?}");
        assert!(r[0].contains("x86-64-v3"));
        assert!(r[1].contains("pc-q35-11.0"));
        assert!(c.refusals(None, None).is_empty());
    }

    #[test]
    fn qemu_arguments_of_models() {
        assert_eq!(qemu_cpu_arg("host"), "host");
        assert_eq!(qemu_cpu_arg("Westmere"), "Westmere,enforce");
        let v2 = qemu_cpu_arg("x86-64-v2-AES");
        assert!(v2.starts_with("qemu64,+cx16,"), "{v2}");
        assert!(v2.ends_with(",+aes,+pclmulqdq,enforce"), "{v2}");
        assert_eq!(machine_type(Machine::Q35, Some("10.0")), "pc-q35-10.0");
        assert_eq!(machine_type(Machine::Pc, Some("9.2")), "pc-i440fx-9.2");
        assert_eq!(machine_type(Machine::Pc, None), "pc");
    }

    #[test]
    fn forms_are_checked() {
        for bad in ["", "a,b", "x y", "host;", &"a".repeat(65)] {
            assert!(check_cpu_model(bad).is_err(), "{bad}");
        }
        assert!(check_cpu_model("x86-64-v2-AES").is_ok());
        for bad in ["10", "10.", ".0", "a.b", "1000.0", "10.0.1", "10,0"] {
            assert!(check_machine_version(bad).is_err(), "{bad}");
        }
        assert!(check_machine_version("9.2").is_ok());
    }

    proptest! {
        #[test]
        fn argv_of_any_valid_name_has_no_separator_injection(name in "[A-Za-z0-9._-]{1,64}") {
            prop_assert!(check_cpu_model(&name).is_ok());
            let arg = qemu_cpu_arg(&name);
            prop_assert!(arg.starts_with(&name) || model_flags(&name).is_some());
            prop_assert_eq!(arg.matches('=').count(), 0);
        }
    }
}
