//! Whether KVM can really run guests here. `/dev/kvm` may open on a nested host without
//! VMX/SVM (kvm_pvm), where unmodified guests die in instruction emulation: then TCG.

use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AccelSetting {
    #[default]
    Auto,
    Kvm,
    Tcg,
}

impl std::str::FromStr for AccelSetting {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(AccelSetting::Auto),
            "kvm" => Ok(AccelSetting::Kvm),
            "tcg" => Ok(AccelSetting::Tcg),
            _ => Err(format!("accel must be auto, kvm or tcg, not {s:?}")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// Decides from `/dev/kvm` and the CPU flags in `cpuinfo`.
pub fn decide(setting: AccelSetting, kvm_opens: bool, cpuinfo: &str) -> Accel {
    match setting {
        AccelSetting::Kvm => Accel::Kvm,
        AccelSetting::Tcg => Accel::Tcg,
        AccelSetting::Auto => {
            let hw = cpuinfo
                .lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
            if kvm_opens && hw {
                Accel::Kvm
            } else {
                Accel::Tcg
            }
        }
    }
}

pub fn detect_accel(setting: AccelSetting) -> Accel {
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    decide(setting, kvm, &cpuinfo)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_needs_both_dev_kvm_and_vmx_or_svm() {
        let vmx = "flags\t: fpu vme vmx sse\n";
        let none = "flags\t: fpu vme sse\n";
        assert_eq!(decide(AccelSetting::Auto, true, vmx), Accel::Kvm);
        assert_eq!(decide(AccelSetting::Auto, true, none), Accel::Tcg);
        assert_eq!(decide(AccelSetting::Auto, false, vmx), Accel::Tcg);
        assert_eq!(decide(AccelSetting::Kvm, false, none), Accel::Kvm);
        assert_eq!(decide(AccelSetting::Tcg, true, vmx), Accel::Tcg);
    }
}
