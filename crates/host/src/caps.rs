//! What this host can run (`ferry_types::cpu`): probed from its QEMU at the daemon's
//! start (`-machine none`, four QMP queries, ~0.3 s), limited by the admin's
//! `cpu_models`, published under the host's scope (`/meta/caps`) for placement and
//! migration, and checked at every create, edit, start and incoming migration.

use crate::error::{AgentError, Refusal, Result};
use crate::Host;
use ferry_qemu::Accel;
use ferry_store::{keys, StoreJson};
use ferry_types::cpu::{host_caps, Probe};
use ferry_types::{HostCaps, VmSpec};
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;

/// The guest architecture of a `qemu-system-ARCH` binary.
pub fn arch_of(binary: &str) -> String {
    Path::new(binary)
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("qemu-system-"))
        .filter(|a| !a.is_empty())
        .unwrap_or(std::env::consts::ARCH)
        .to_string()
}

/// The QEMU for guests of `arch`: beside the configured one (`qemu` names the host
/// architecture's), else by name on the PATH.
pub fn binary_for(qemu: &str, arch: ferry_types::Arch) -> String {
    let own = format!("qemu-system-{}", arch_of(qemu));
    if arch.as_str() == arch_of(qemu) {
        return qemu.to_string();
    }
    match qemu.strip_suffix(&own) {
        Some(dir) => format!("{dir}{}", arch.qemu_binary()),
        None => arch.qemu_binary(),
    }
}

/// Whether `bin` (a path, or a name on the PATH) is an executable file.
pub fn installed(bin: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let runs = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if bin.contains('/') {
        return runs(Path::new(bin));
    }
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|d| runs(&d.join(bin))))
        .unwrap_or(false)
}

/// Asks QEMU `bin` (with `accel`) which CPU models and machine types it has. The
/// process is ended when this returns.
pub async fn probe(
    bin: &str,
    accel: Accel,
    dir: &Path,
) -> std::result::Result<(Probe, String), String> {
    let sock = dir.join(format!("caps-probe-{}.qmp", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    let mut child = tokio::process::Command::new(bin)
        .args(["-machine", "none", "-accel"])
        .arg(accel.to_string())
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-sandbox", ferry_qemu::SANDBOX])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("run {bin}: {e}"))?;
    let pid = child.id().and_then(|p| i32::try_from(p).ok()).unwrap_or(0);
    let asked = async {
        let q = ferry_qmp::Qmp::connect_retry_to(&sock, Duration::from_secs(20), pid)
            .await
            .map_err(|e| format!("QMP: {e}"))?
            .with_timeout(Duration::from_secs(20));
        let ask = |cmd: &'static str, args: Option<Value>| {
            let q = q.clone();
            async move {
                q.execute(cmd, args)
                    .await
                    .map_err(|e| format!("{cmd}: {e}"))
            }
        };
        let defs = ask("query-cpu-definitions", None).await?;
        let max = ask(
            "query-cpu-model-expansion",
            Some(json!({"type": "full", "model": {"name": "max"}})),
        )
        .await?;
        let machines = ask("query-machines", None).await?;
        let version = ask("query-version", None).await?;
        let _ = q.execute("quit", None).await;
        Ok::<_, String>(parse(&defs, &max, &machines, &version))
    };
    let r = tokio::time::timeout(Duration::from_secs(30), asked)
        .await
        .map_err(|_| "QEMU did not answer within 30 s".to_string())
        .and_then(|r| r);
    let _ = child.start_kill();
    let _ = child.wait().await;
    let _ = std::fs::remove_file(&sock);
    r
}

/// QEMU's answers reduced; anything malformed is left out (never a panic).
fn parse(defs: &Value, max: &Value, machines: &Value, version: &Value) -> (Probe, String) {
    let definitions = defs
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| {
            let name = d.get("name")?.as_str()?.to_string();
            // x86 lists what a model lacks here; other targets (aarch64) say nothing:
            // every model they list runs (under TCG)
            let usable = match d.get("unavailable-features") {
                None => true,
                Some(u) => u.as_array().is_some_and(|u| u.is_empty()),
            };
            Some((name, usable))
        })
        .collect();
    let max_flags = max
        .pointer("/model/props")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter(|(_, v)| v.as_bool() == Some(true))
        .map(|(k, _)| k.clone())
        .collect();
    let machines = machines
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| Some(m.get("name")?.as_str()?.to_string()))
        .collect();
    let v = |k: &str| {
        version
            .pointer(&format!("/qemu/{k}"))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    let qemu = format!("{}.{}.{}", v("major"), v("minor"), v("micro"));
    (
        Probe {
            definitions,
            max_flags,
            machines,
        },
        qemu,
    )
}

/// The devices beyond QEMU this host gives guests of `arch` (see
/// [`HostCaps::features`]).
pub fn features(arch: &str) -> Vec<String> {
    let mut out = vec![];
    if arch == ferry_types::Arch::X86_64.as_str() {
        if installed(crate::tpm::SWTPM) {
            out.push(ferry_types::cpu::FEATURE_TPM.to_string());
        }
        if crate::lifecycle::secure_boot_paths().is_some() {
            out.push(ferry_types::cpu::FEATURE_SECURE_BOOT.to_string());
        }
    }
    out
}

/// This host's caps: probed, limited to `allowed`; None when QEMU could not be asked
/// (then nothing is checked against them, as before they existed).
pub async fn detect(bin: &str, accel: Accel, dir: &Path, allowed: &[String]) -> Option<HostCaps> {
    let started = std::time::Instant::now();
    match probe(bin, accel, dir).await {
        Ok((p, qemu)) => {
            let (mut caps, dropped) =
                host_caps(&arch_of(bin), &accel.to_string(), &qemu, &p, allowed);
            caps.features = features(&caps.arch);
            if !dropped.is_empty() {
                tracing::warn!(
                    models = %dropped.join(", "),
                    "cpu_models names models this host's QEMU cannot run: left out"
                );
            }
            tracing::info!(
                models = caps.cpu_models.len(),
                machines = caps.machines.len(),
                ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                "QEMU's CPU models and machine types"
            );
            Some(caps)
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not ask QEMU for its CPU models: none checked");
            None
        }
    }
}

impl Host {
    /// What this host can run (None: its QEMU could not be asked).
    pub fn caps(&self) -> Option<&HostCaps> {
        self.inner.caps.as_ref()
    }

    /// Writes this host's caps where the cluster reads them, when they changed.
    pub(crate) async fn publish_caps(&self) -> Result<()> {
        let Some(caps) = self.caps() else {
            // what an earlier start found may no longer hold: nothing is claimed
            self.store().delete(keys::host::CAPS).await?;
            return Ok(());
        };
        let old = self.store().get_json::<HostCaps>(keys::host::CAPS).await?;
        if old.as_ref().map(|(c, _)| c) != Some(caps) {
            self.store().put_json(keys::host::CAPS, caps).await?;
        }
        Ok(())
    }

    /// The QEMU for a VM of `arch`.
    pub fn qemu_binary_for(&self, arch: ferry_types::Arch) -> String {
        binary_for(&self.inner.cfg.qemu_binary, arch)
    }

    /// How this host runs a VM of `arch`: its accelerator for its own architecture,
    /// TCG for the others.
    pub fn accel_for(&self, arch: ferry_types::Arch) -> Accel {
        let own = self
            .caps()
            .map(|c| c.arch.clone())
            .unwrap_or_else(|| arch_of(&self.inner.cfg.qemu_binary));
        if arch.as_str() == own {
            self.inner.accel
        } else {
            Accel::Tcg
        }
    }

    /// Refuses a VM whose architecture, CPU model or machine type this host cannot
    /// run, with why.
    pub fn check_runnable(&self, spec: &VmSpec) -> Result<()> {
        let Some(caps) = self.caps() else {
            if spec.arch().is_pc() {
                return Ok(());
            }
            return Err(AgentError::refused(
                Refusal::HostLacks,
                format!(
                    "Host {} could not ask its QEMU what it runs: no {} guests",
                    self.host_name(),
                    spec.arch()
                ),
            ));
        };
        let arch = spec.arch();
        let why = caps.refusals_for(
            arch.as_str(),
            spec.cpu.as_deref(),
            spec.pinned_machine().as_deref(),
            &spec.needs(),
        );
        if why.is_empty() {
            return Ok(());
        }
        let models = caps
            .for_arch(arch.as_str())
            .map(|c| format!(" (it runs {arch} CPU models {})", c.cpu_models.join(", ")))
            .unwrap_or_else(|| format!(" (it runs {})", caps.arches().join(", ")));
        Err(AgentError::refused(
            Refusal::HostLacks,
            format!("Host {} {}{models}", self.host_name(), why.join(" and ")),
        ))
    }

    /// A new VM's CPU model, machine version and devices where the user gave none:
    /// ferry's default model, the newest machine version this host has, a USB tablet,
    /// an RNG and a balloon.
    pub(crate) fn pin_hardware(&self, spec: &mut VmSpec) {
        if spec.cpu.is_none() {
            spec.cpu = Some(spec.arch().default_cpu().to_string());
        }
        if spec.machine_version.is_none() {
            spec.machine_version = self
                .caps()
                .and_then(|c| c.for_arch(spec.arch().as_str()))
                .and_then(|c| c.latest_machine_version(spec.machine));
        }
        for d in [&mut spec.tablet, &mut spec.rng, &mut spec.balloon] {
            d.get_or_insert(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_architecture_has_its_qemu_beside_the_configured_one() {
        use ferry_types::Arch;
        assert_eq!(
            binary_for("qemu-system-x86_64", Arch::X86_64),
            "qemu-system-x86_64"
        );
        assert_eq!(
            binary_for("qemu-system-x86_64", Arch::Aarch64),
            "qemu-system-aarch64"
        );
        assert_eq!(
            binary_for("/opt/q/bin/qemu-system-x86_64", Arch::Riscv64),
            "/opt/q/bin/qemu-system-riscv64"
        );
        assert_eq!(
            binary_for("/opt/wrapper", Arch::Aarch64),
            "qemu-system-aarch64"
        );
        assert!(installed("sh"));
        assert!(!installed("qemu-system-nonexistent"));
        assert!(!installed("/etc/passwd"));
    }

    #[test]
    fn arch_from_the_binary_name() {
        assert_eq!(arch_of("qemu-system-x86_64"), "x86_64");
        assert_eq!(arch_of("/usr/bin/qemu-system-aarch64"), "aarch64");
        assert_eq!(arch_of("/opt/qemu"), std::env::consts::ARCH);
    }

    #[test]
    fn malformed_answers_are_left_out() {
        let (p, v) = parse(
            &json!([{"name": "a", "unavailable-features": []}, {"name": 1}, {"x": 2},
                    {"name": "b", "unavailable-features": ["avx"]}, {"name": "c"}]),
            &json!({"model": {"props": {"aes": true, "avx": false, "family": 6}}}),
            &json!([{"name": "pc-q35-10.0"}, {"name": null}, 3]),
            &json!({"qemu": {"major": 10, "minor": 0, "micro": 2}}),
        );
        assert_eq!(
            p.definitions,
            [("a".into(), true), ("b".into(), false), ("c".into(), true)]
        );
        assert_eq!(p.max_flags.into_iter().collect::<Vec<_>>(), ["aes"]);
        assert_eq!(p.machines, ["pc-q35-10.0"]);
        assert_eq!(v, "10.0.2");
        let (p, v) = parse(&json!(null), &json!("x"), &json!({}), &json!([]));
        assert!(p.definitions.is_empty() && p.machines.is_empty());
        assert_eq!(v, "0.0.0");
    }
}
