//! The host lease and self-fencing.
//!
//! The agent holds an etcd lease (TTL `lease_ttl_s`) with the key
//! `/cluster/alive/{host}` on it and renews it every TTL/5. Each renewal that succeeds
//! moves two deadlines, both counted from the moment the renewal was *sent* (etcd's
//! expiry is at least a TTL after that):
//! - the agent's own fence deadline, TTL − TTL/3: past it, the agent kills every
//!   HA-managed QEMU on this host (and keeps killing any that appears) and refuses work;
//! - the watchdog's deadline, TTL − TTL/6, written to `{run_dir}/watchdog`: a separate
//!   process (`ferry watchdog`) kills the HA QEMUs when it passes, so a hung or killed
//!   agent cannot keep them alive.
//!
//! So when the HA manager sees the lease expire, the host's HA VMs are already gone.
//! A restarted daemon re-uses its lease (id in `{run_dir}/cluster-lease`) if it still
//! lives: no failover for a daemon restart within the grace. If it expired, the agent
//! fences first, then announces itself with a new lease.

use crate::error::Result;
use crate::fence::{FenceClock, FenceReason};
use crate::Cluster;
use ferry_store::{LeaseId, Op, StoreError, Txn};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub(crate) use ferry_types::HostAlive as Alive;

#[derive(Debug, Default)]
pub(crate) struct LeaseState {
    pub lease: Option<LeaseId>,
    /// When HA VMs may run here (none until the lease loop starts).
    pub clock: Option<FenceClock>,
}

/// The lease keeper's state: only the lease loop and the fence timer change it; the
/// runtime asks it whether HA VMs may run here ([`ferry_host::ClusterView`]).
#[derive(Debug, Default)]
pub(crate) struct LeaseCell(std::sync::Mutex<LeaseState>);

impl LeaseCell {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, LeaseState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl ferry_host::ClusterView for LeaseCell {
    fn holds_lease(&self) -> bool {
        let s = self.lock();
        s.lease.is_some() && s.clock.as_ref().is_some_and(|c| c.holds(mono_ns()))
    }
}

/// What `{run_dir}/watchdog` holds.
#[derive(Debug, Serialize, Deserialize)]
struct WatchdogFile {
    /// CLOCK_BOOTTIME nanoseconds.
    deadline_ns: u64,
}

/// CLOCK_BOOTTIME now, in nanoseconds: the same clock in every process of the host,
/// and it keeps counting while the machine is suspended (as etcd's lease does; a
/// monotonic clock would stand still and let HA QEMUs run on past the lease).
pub fn mono_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .expect("CLOCK_BOOTTIME exists");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

fn watchdog_path(run_dir: &Path) -> PathBuf {
    run_dir.join("watchdog")
}

/// The watchdog's deadline, if armed.
fn watchdog_deadline(run_dir: &Path) -> Option<u64> {
    let b = std::fs::read(watchdog_path(run_dir)).ok()?;
    serde_json::from_slice::<WatchdogFile>(&b)
        .ok()
        .map(|w| w.deadline_ns)
}

pub use ferry_host::os::kill_ha_qemus;

/// What the watchdog does on one tick.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum WatchdogStep {
    /// Disarmed, or the deadline holds: feed the hardware watchdog, if any.
    Feed,
    /// Past the deadline: kill the HA QEMUs and stop feeding (the hardware watchdog,
    /// if any, then resets the host: the last word of fencing).
    Fence,
}

pub(crate) fn watchdog_step(deadline_ns: Option<u64>, now_ns: u64) -> WatchdogStep {
    match deadline_ns {
        Some(d) if now_ns > d => WatchdogStep::Fence,
        _ => WatchdogStep::Feed,
    }
}

/// `ferry watchdog`: every 100 ms, once the deadline in `{run_dir}/watchdog` has
/// passed, kills the HA QEMUs. Disarmed while the file is absent. With `device` (a
/// hardware watchdog such as `/dev/watchdog`) it feeds the device while the deadline
/// holds and stops once it has passed, so a host whose processes cannot be killed is
/// reset. Runs until killed, or until told to stop (SIGTERM: its scope stopped at the
/// machine's shutdown, after the VMs): then it kills the HA QEMUs still there — it can
/// no longer fence them —, closes the hardware watchdog with the magic `V` (so a slow
/// power-off is not a reset) and ends.
pub fn run_watchdog(run_dir: &Path, device: Option<&Path>) -> ! {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    if let Err(e) = signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone()) {
        eprintln!("ferry watchdog: no SIGTERM handler ({e}); it ends only when killed");
    }
    let mut dev = device.and_then(|d| match std::fs::OpenOptions::new().write(true).open(d) {
        Ok(f) => Some(f),
        Err(e) => {
            eprintln!(
                "ferry watchdog: cannot open {}: {e}; software fencing only",
                d.display()
            );
            None
        }
    });
    let mut fired = false;
    loop {
        match watchdog_step(watchdog_deadline(run_dir), mono_ns()) {
            WatchdogStep::Fence => {
                let killed = kill_ha_qemus(run_dir);
                if !killed.is_empty() || !fired {
                    eprintln!(
                        "ferry watchdog: the agent stopped renewing the cluster lease; killed HA QEMU {killed:?}"
                    );
                }
                fired = true;
            }
            WatchdogStep::Feed => {
                fired = false;
                if let Some(f) = dev.as_mut() {
                    use std::io::Write;
                    let _ = f.write_all(b"\0").and_then(|_| f.flush());
                }
            }
        }
        if stop.load(std::sync::atomic::Ordering::SeqCst) {
            let killed = kill_ha_qemus(run_dir);
            if !killed.is_empty() {
                eprintln!("ferry watchdog: stopped; killed the HA QEMUs it guarded {killed:?}");
            }
            if let Some(f) = dev.as_mut() {
                use std::io::Write;
                // the magic close: the driver disarms the hardware watchdog
                let _ = f.write_all(b"V").and_then(|_| f.flush());
            }
            std::process::exit(0);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Cluster {
    fn lease_file(&self) -> PathBuf {
        self.cfg().run_dir.join("cluster-lease")
    }

    /// The host lease, while it has one.
    pub(crate) fn lease_id(&self) -> Option<LeaseId> {
        self.inner.lease.lock().lease
    }

    /// Writes the watchdog's deadline; false when it could not (the file keeps the
    /// older one, which the fence clock then keeps to).
    fn write_watchdog(&self, deadline_ns: u64) -> bool {
        let p = watchdog_path(&self.cfg().run_dir);
        let tmp = p.with_extension("tmp");
        let body = serde_json::to_vec(&WatchdogFile { deadline_ns }).expect("serialises");
        let ok = std::fs::write(&tmp, body)
            .and_then(|_| std::fs::rename(&tmp, &p))
            .is_ok();
        if !ok {
            tracing::warn!("cannot feed the watchdog");
        }
        ok
    }

    pub(crate) fn disarm_watchdog(&self) {
        let _ = std::fs::remove_file(watchdog_path(&self.cfg().run_dir));
    }

    /// Kills this host's HA VMs: it may no longer run them.
    fn self_fence(&self, why: FenceReason) {
        let why = why.text();
        let first = {
            let mut s = self.inner.lease.lock();
            s.clock.as_mut().is_some_and(FenceClock::mark_fenced)
        };
        let killed = self.os().kill_ha_qemus(&self.cfg().run_dir);
        if first || !killed.is_empty() {
            tracing::error!(why, ?killed, "self-fence: HA VMs killed");
            self.events().emit(
                None,
                "ha",
                format!("self-fence ({why}): killed HA QEMU {killed:?}"),
            );
        }
    }

    /// Grants a lease and publishes this host as alive under it.
    async fn announce(&self, ttl: Duration) -> Result<LeaseId> {
        let link = self.cluster_link()?;
        let lease = link.root.grant_lease(ttl).await?;
        let (cpus, memory_bytes) = self.capacity();
        let alive = Alive {
            memory_bytes,
            cpus: usize::try_from(ferry_types::whole(cpus.ceil())).unwrap_or(usize::MAX),
            pid: std::process::id(),
        };
        link.root
            .txn(Txn {
                compare: vec![],
                success: vec![Op::Put {
                    key: ferry_store::keys::cluster::alive(self.host_name()),
                    value: serde_json::to_vec(&alive).expect("serialises"),
                    lease: Some(lease),
                }],
                failure: vec![],
            })
            .await?;
        let _ = std::fs::write(self.lease_file(), lease.to_string());
        self.events().emit(
            None,
            "ha",
            format!("host lease {lease:x} granted ({} s)", ttl.as_secs()),
        );
        Ok(lease)
    }

    /// Keeps the lease, fences on loss ([`FenceClock`] decides). Runs for the daemon's
    /// life; a second task checks the fence deadline every 100 ms, so a slow store
    /// call in this loop never delays a fence.
    #[tracing::instrument(skip_all)]
    pub(crate) async fn lease_loop(self) {
        let Ok(link) = self.cluster_link().cloned() else {
            return;
        };
        let ttl = Duration::from_secs(link.cfg.lease_ttl_s);
        let mut lease: Option<LeaseId> = std::fs::read_to_string(self.lease_file())
            .ok()
            .and_then(|s| s.trim().parse().ok());
        // A previous daemon's promise to the watchdog still holds until it runs out.
        let clock = FenceClock::restored(ttl, watchdog_deadline(&self.cfg().run_dir));
        let (tick, renew_timeout) = (clock.tick(), clock.renew_timeout());
        self.inner.lease.lock().clock = Some(clock);
        tokio::spawn(self.clone().fence_timer());
        let mut round = 0u64;
        loop {
            let sent = Instant::now();
            let sent_ns = mono_ns();
            let mut acked = false;
            if let Some(l) = lease {
                match tokio::time::timeout(renew_timeout, link.root.keep_alive(l)).await {
                    Ok(Ok(())) => acked = true,
                    Ok(Err(StoreError::LeaseNotFound(_))) => {
                        tracing::warn!("the cluster lease expired");
                        lease = None;
                        // Recovered elsewhere by now, or about to be: never run them
                        // here too.
                        let why = self.with_clock(FenceClock::lost);
                        self.self_fence(why);
                    }
                    Ok(Err(e)) => tracing::debug!(error = %e, "lease renewal failed"),
                    Err(_) => tracing::debug!("lease renewal timed out"),
                }
            }
            if lease.is_none() {
                match tokio::time::timeout(
                    renew_timeout.max(Duration::from_secs(3)),
                    self.announce(ttl),
                )
                .await
                {
                    Ok(Ok(l)) => {
                        lease = Some(l);
                        acked = true;
                    }
                    Ok(Err(e)) => tracing::debug!(error = %e, "cannot get a cluster lease"),
                    Err(_) => tracing::debug!("getting a cluster lease timed out"),
                }
            }
            if acked {
                let (wd, resumed) = {
                    let mut s = self.inner.lease.lock();
                    s.lease = lease;
                    s.clock
                        .as_mut()
                        .expect("set before the loop")
                        .renewed(sent_ns)
                };
                if resumed {
                    tracing::info!("cluster lease held again: HA work resumes");
                }
                if self.write_watchdog(wd) {
                    self.with_clock(|c| c.written(wd));
                }
            }
            self.loops().report(
                "lease",
                tick,
                if acked {
                    Ok(())
                } else {
                    Err("the cluster lease was not renewed")
                },
            );
            if let Some(why) = self.with_clock(|c| c.poll(mono_ns())) {
                self.self_fence(why);
            }
            if round.is_multiple_of(20) {
                self.refresh_endpoints(&link).await;
            }
            if round % 5 == 4 {
                self.ensure_member().await;
            }
            round += 1;
            tokio::time::sleep(tick.saturating_sub(sent.elapsed())).await;
        }
    }

    fn with_clock<T>(&self, f: impl FnOnce(&mut FenceClock) -> T) -> T {
        let mut s = self.inner.lease.lock();
        f(s.clock.as_mut().expect("the lease loop set the clock"))
    }

    /// Fences as soon as the deadline passes, whatever the lease loop is waiting on.
    async fn fence_timer(self) {
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if let Some(why) = self.with_clock(|c| c.poll(mono_ns())) {
                self.self_fence(why);
            }
        }
    }

    /// Learns every etcd member's client URL, to fail over to when the local member
    /// is down (members that joined after this host are not in its config).
    async fn refresh_endpoints(&self, link: &ferry_host::ClusterLink) {
        let Ok(etcd) = link.etcd() else {
            return; // a simulated cluster has no members to learn
        };
        let Ok(list) = ferry_store::membership::list(&etcd.client()).await else {
            return;
        };
        let voters: Vec<String> = list
            .iter()
            .filter(|m| !m.learner)
            .flat_map(|m| m.client_urls.iter().cloned())
            .collect();
        let urls: Vec<String> = list.into_iter().flat_map(|m| m.client_urls).collect();
        etcd.add_endpoints(&urls);
        // A client keeps the voters it knows in its configuration, so a restart after
        // voters were replaced still finds them.
        if link.cfg.managed_etcd || voters.is_empty() {
            return;
        }
        let sorted = |v: &[String]| {
            let mut v = v.to_vec();
            v.sort();
            v
        };
        let changed = crate::membership::update_config(&self.cfg().state_dir, |saved| {
            // Not once a promotion made this host a voter (its restart follows).
            if saved.managed_etcd || sorted(&saved.endpoints) == sorted(&voters) {
                return false;
            }
            saved.endpoints = voters.clone();
            true
        });
        match changed {
            Ok(true) => {
                tracing::info!(endpoints = ?voters, "the etcd voters changed; configuration updated")
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "cannot save the etcd voters"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_feeds_until_the_deadline_then_fences() {
        assert_eq!(watchdog_step(None, 5), WatchdogStep::Feed);
        assert_eq!(watchdog_step(Some(10), 5), WatchdogStep::Feed);
        assert_eq!(watchdog_step(Some(10), 10), WatchdogStep::Feed);
        assert_eq!(watchdog_step(Some(10), 11), WatchdogStep::Fence);
    }

    #[test]
    fn watchdog_file_round_trip_and_kill_scan_skip_non_ha() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(watchdog_deadline(d.path()), None);
        std::fs::write(
            watchdog_path(d.path()),
            serde_json::to_vec(&WatchdogFile { deadline_ns: 42 }).unwrap(),
        )
        .unwrap();
        assert_eq!(watchdog_deadline(d.path()), Some(42));
        // A VM run dir without the marker, and one with it but no live QEMU: nothing
        // to kill (and no panic).
        std::fs::create_dir_all(d.path().join("100")).unwrap();
        std::fs::create_dir_all(d.path().join("101")).unwrap();
        std::fs::write(d.path().join("101/ha"), b"").unwrap();
        std::fs::write(d.path().join("101/qemu.pid"), b"1").unwrap();
        assert!(kill_ha_qemus(d.path()).is_empty());
    }
}
