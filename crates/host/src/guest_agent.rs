//! The QEMU guest agent of a VM with `agent` on: what the guest reports (addresses,
//! OS, host name), shutdown through it, and freezing its file systems around disk
//! snapshots and backups. One client per VM at a time (QEMU serves one connection on the
//! channel): `Slot::agent` serialises them. What the guest says is bounded and shown,
//! never used for a decision.

use crate::error::{AgentError, Failure, Refusal, Result};
use crate::Host;
use ferry_qmp::agent::{self as qga, GuestAgent};
use ferry_types::{GuestInfo, GuestInterface, GuestOs};
use serde_json::json;
use std::time::Duration;

/// How long a query of the agent may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the guest may take to freeze its file systems (it flushes them first).
const FREEZE_TIMEOUT: Duration = Duration::from_secs(60);
const THAW_TIMEOUT: Duration = Duration::from_secs(30);
/// At most this many interfaces and addresses per interface are shown.
const MAX_INTERFACES: usize = 64;
const MAX_ADDRESSES: usize = 64;
/// Longer strings from the guest are cut.
const MAX_TEXT: usize = 256;

/// How long an operation waits for another's use of the agent.
const LOCK_WAIT: Duration = Duration::from_secs(15);

fn text(s: Option<String>) -> Option<String> {
    s.map(|s| {
        s.chars()
            .filter(|c| !c.is_control() && !qga::is_format(*c))
            .take(MAX_TEXT)
            .collect()
    })
}

fn guest_err(vm: &str, e: qga::AgentError) -> AgentError {
    AgentError::failed(Failure::Guest, format!("VM {vm}: {e}"))
}

/// The guest's answers turned into what ferry shows (bounded, loopback left out).
pub fn guest_info(
    host: Option<qga::HostName>,
    os: Option<qga::OsInfo>,
    ifaces: Vec<qga::Interface>,
    version: Option<String>,
    freeze: Option<String>,
) -> GuestInfo {
    let interfaces = ifaces
        .into_iter()
        .filter(|i| i.name != "lo" && !i.name.starts_with("Loopback"))
        .take(MAX_INTERFACES)
        .map(|i| GuestInterface {
            name: text(Some(i.name)).unwrap_or_default(),
            mac: text(i.hardware_address),
            addresses: i
                .ip_addresses
                .into_iter()
                .filter_map(|a| {
                    let ip: std::net::IpAddr = a.ip_address.parse().ok()?;
                    let max = if ip.is_ipv4() { 32 } else { 128 };
                    (a.prefix <= max).then(|| format!("{ip}/{}", a.prefix))
                })
                .take(MAX_ADDRESSES)
                .collect(),
        })
        .collect();
    GuestInfo {
        hostname: text(host.map(|h| h.host_name)),
        os: os.map(|o| GuestOs {
            pretty_name: text(o.pretty_name),
            id: text(o.id),
            version: text(o.version_id),
            kernel_release: text(o.kernel_release),
            machine: text(o.machine),
        }),
        interfaces,
        agent_version: text(version),
        fsfreeze: text(freeze),
    }
}

impl Host {
    /// A synced connection to the agent of running VM `vm`, with the VM's agent lock:
    /// waited for up to [`LOCK_WAIT`] (`wait`), or refused at once when another client
    /// has it (a query: a guest that answers slowly cannot queue up requests that hold
    /// back shutdowns, snapshots and backups).
    async fn agent(
        &self,
        vm: &str,
        wait: bool,
    ) -> Result<(tokio::sync::OwnedMutexGuard<()>, GuestAgent)> {
        let (rec, _) = self.record(vm).await?;
        if !rec.spec.agent {
            return Err(AgentError::refused(
                Refusal::Unsupported,
                format!("{vm} has no guest agent channel (`ferry vm edit {vm} --agent on`, then start it again)"),
            ));
        }
        let slot = self.slot(vm);
        if !slot.state().has_process() {
            return Err(AgentError::refused(
                Refusal::NotRunning,
                format!("VM {vm} is not running"),
            ));
        }
        let lock = slot.agent.clone();
        let busy = || {
            AgentError::refused(
                Refusal::Busy,
                format!("VM {vm}: its guest agent is busy with another request"),
            )
        };
        let held = if wait {
            tokio::time::timeout(LOCK_WAIT, lock.lock_owned())
                .await
                .map_err(|_| busy())?
        } else {
            lock.try_lock_owned().map_err(|_| busy())?
        };
        let pid = slot.with(|rt| rt.pid);
        let a = GuestAgent::connect(&self.run_paths(rec.id).qga, pid)
            .await
            .map_err(|e| guest_err(vm, e))?;
        Ok((held, a))
    }

    /// What the guest agent of `vm` says: host name, OS, addresses.
    pub async fn guest_info(&self, vm: &str) -> Result<GuestInfo> {
        let (_held, mut a) = self.agent(vm, false).await?;
        let info: qga::AgentInfo = a
            .call("guest-info", None, QUERY_TIMEOUT)
            .await
            .map_err(|e| guest_err(vm, e))?;
        // Older or other agents lack some commands: what answers is shown.
        let host = a
            .call("guest-get-host-name", None, QUERY_TIMEOUT)
            .await
            .ok();
        let os = a.call("guest-get-osinfo", None, QUERY_TIMEOUT).await.ok();
        let ifaces = a
            .call("guest-network-get-interfaces", None, QUERY_TIMEOUT)
            .await
            .unwrap_or_default();
        let freeze = a
            .call::<String>("guest-fsfreeze-status", None, QUERY_TIMEOUT)
            .await
            .ok();
        Ok(guest_info(host, os, ifaces, Some(info.version), freeze))
    }

    /// Asks the guest to power off through its agent (no reply when it takes it).
    pub(crate) async fn agent_shutdown(&self, vm: &str) -> Result<()> {
        let (_held, mut a) = self.agent(vm, true).await?;
        a.execute_silent(
            "guest-shutdown",
            Some(json!({"mode": "powerdown"})),
            Duration::from_secs(2),
        )
        .await
        .map_err(|e| guest_err(vm, e))
    }

    /// Freezes the guest's file systems; true when they are (then [`Host::thaw`] must
    /// follow). Anything else — no agent, no answer, a refusal — is logged and false:
    /// the caller goes on crash-consistent.
    pub(crate) async fn freeze(&self, vm: &str) -> bool {
        let (held, mut a) = match self.agent(vm, true).await {
            Ok(a) => a,
            Err(e) => {
                self.inner.events.emit(
                    Some(vm),
                    "agent",
                    format!("file systems not frozen (crash-consistent): {e}"),
                );
                return false;
            }
        };
        match a
            .call::<u64>("guest-fsfreeze-freeze", None, FREEZE_TIMEOUT)
            .await
        {
            Ok(n) => {
                tracing::info!(vm, filesystems = n, "guest file systems frozen");
                true
            }
            Err(e) => {
                // A freeze that timed out may still complete in the guest: thawed on a
                // fresh connection (a late reply on this one is not the thaw's).
                drop((held, a));
                self.thaw(vm).await;
                self.inner.events.emit(
                    Some(vm),
                    "agent",
                    format!("file systems not frozen (crash-consistent): {e}"),
                );
                false
            }
        }
    }

    /// Thaws what [`Host::freeze`] froze, until the agent says `thawed`; tried three
    /// times, an event when it fails.
    pub(crate) async fn thaw(&self, vm: &str) {
        let mut last = String::new();
        for _ in 0..3 {
            match self.agent(vm, true).await {
                Ok((_held, mut a)) => {
                    let thawed = async {
                        a.execute("guest-fsfreeze-thaw", None, THAW_TIMEOUT).await?;
                        a.call::<String>("guest-fsfreeze-status", None, QUERY_TIMEOUT)
                            .await
                    };
                    match thawed.await {
                        Ok(s) if s == "thawed" => return,
                        Ok(s) => last = format!("the agent says its file systems are {s}"),
                        Err(e) => last = e.to_string(),
                    }
                }
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        self.inner.events.emit(
            Some(vm),
            "agent",
            format!("file systems may still be frozen, thaw failed: {last}"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_the_guest_says_is_bounded_and_loopback_is_left_out() {
        let iface = |name: &str, ips: Vec<(&str, u8)>| qga::Interface {
            name: name.into(),
            hardware_address: Some("0a:00:00:00:00:01".into()),
            ip_addresses: ips
                .into_iter()
                .map(|(a, p)| qga::IpAddress {
                    ip_address: a.into(),
                    prefix: p,
                })
                .collect(),
        };
        let mut ifaces = vec![
            iface("lo", vec![("127.0.0.1", 8)]),
            iface(
                "eth0",
                vec![
                    ("10.0.0.5", 24),
                    ("not-an-ip", 24),
                    ("10.0.0.6", 40),
                    ("fe80::1", 64),
                ],
            ),
        ];
        ifaces.extend((0..100).map(|i| iface(&format!("x{i}"), vec![])));
        let info = guest_info(
            Some(qga::HostName {
                host_name: format!("c1\n{}", "y".repeat(1000)),
            }),
            None,
            ifaces,
            Some("7.2".into()),
            None,
        );
        assert_eq!(info.interfaces.len(), MAX_INTERFACES);
        assert_eq!(info.interfaces[0].name, "eth0");
        assert_eq!(
            info.interfaces[0].addresses,
            vec!["10.0.0.5/24".to_string(), "fe80::1/64".to_string()]
        );
        let h = info.hostname.unwrap();
        assert!(h.starts_with("c1y") && h.len() == MAX_TEXT, "{h}");
    }
}
