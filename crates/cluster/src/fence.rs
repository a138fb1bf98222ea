//! When this host may run HA VMs, decided without I/O: the fence clock.
//!
//! Every renewal of the host's etcd lease that etcd acknowledges was *sent* at some
//! time `s` (etcd processed it at or after `s`, so the lease lives until at least
//! `s + ttl`). From the latest such `s` the clock derives, in the host's boot-time
//! nanoseconds (a clock that keeps counting while the machine sleeps, as etcd's
//! does):
//! - the fence deadline `s + ttl − ttl/3`: past it the agent kills its HA QEMUs and
//!   refuses HA work;
//! - the watchdog deadline `s + ttl − ttl/6`: what `ferry watchdog` enforces should
//!   the agent hang.
//!
//! So fence < watchdog < lease expiry, whatever the renewal timing: a late ack still
//! counts from its send, and an older renewal acknowledged late never moves a
//! deadline back.

use std::time::Duration;

/// Why the host fences.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FenceReason {
    /// etcd says the lease is gone: the HA manager may have restarted the VMs.
    LeaseExpired,
    /// No renewal was acknowledged in time.
    NotRenewedInTime,
}

impl FenceReason {
    pub(crate) fn text(self) -> &'static str {
        match self {
            FenceReason::LeaseExpired => "the cluster lease expired",
            FenceReason::NotRenewedInTime => "the cluster lease could not be renewed in time",
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct FenceClock {
    ttl_ns: u64,
    /// The send time of the latest acknowledged renewal (or grant).
    best_sent: Option<u64>,
    /// A previous daemon's promise to the watchdog, until this one renews.
    restored_fence: Option<u64>,
    /// The deadline the watchdog file holds now (the last write that succeeded): the
    /// fence never comes after what the watchdog enforces.
    written: Option<u64>,
    /// etcd has a lease for this host (as far as the clock was told).
    lease: bool,
    fenced: bool,
}

impl FenceClock {
    pub(crate) fn new(ttl: Duration) -> FenceClock {
        FenceClock {
            ttl_ns: u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX / 2),
            best_sent: None,
            restored_fence: None,
            written: None,
            lease: false,
            fenced: false,
        }
    }

    /// A clock that takes over a previous daemon's watchdog deadline: it fences when
    /// that daemon would have, unless a renewal comes first.
    pub(crate) fn restored(ttl: Duration, watchdog_deadline_ns: Option<u64>) -> FenceClock {
        let mut c = FenceClock::new(ttl);
        c.restored_fence = watchdog_deadline_ns.map(|w| w.saturating_sub(c.margin() / 2));
        c.written = watchdog_deadline_ns;
        c.lease = watchdog_deadline_ns.is_some();
        c
    }

    fn margin(&self) -> u64 {
        self.ttl_ns / 3
    }

    /// How often to renew.
    pub(crate) fn tick(&self) -> Duration {
        Duration::from_nanos(self.ttl_ns / 5)
    }

    /// How long one renewal may take.
    pub(crate) fn renew_timeout(&self) -> Duration {
        self.tick().max(Duration::from_millis(500))
    }

    pub(crate) fn fence_deadline(&self) -> Option<u64> {
        let own = match self.best_sent {
            Some(s) => Some(s + self.ttl_ns - self.margin()),
            None => self.restored_fence,
        };
        // A watchdog file that could not be moved on still holds an older deadline.
        let cap = self.written.map(|w| w.saturating_sub(self.margin() / 2));
        match (own, cap) {
            (Some(d), Some(c)) => Some(d.min(c)),
            (d, c) => d.or(c),
        }
    }

    /// The watchdog file now holds `deadline_ns` (the write succeeded).
    pub(crate) fn written(&mut self, deadline_ns: u64) {
        self.written = Some(self.written.map_or(deadline_ns, |w| w.max(deadline_ns)));
    }

    /// What the watchdog file should hold (none until a renewal succeeded here).
    pub(crate) fn watchdog_deadline(&self) -> Option<u64> {
        self.best_sent.map(|s| s + self.ttl_ns - self.margin() / 2)
    }

    /// A renewal (or a new lease) sent at `sent_ns` was acknowledged. Returns the
    /// watchdog deadline to write and whether HA work resumes after a fence.
    pub(crate) fn renewed(&mut self, sent_ns: u64) -> (u64, bool) {
        self.best_sent = Some(self.best_sent.map_or(sent_ns, |b| b.max(sent_ns)));
        self.lease = true;
        let resumed = std::mem::replace(&mut self.fenced, false);
        let wd = self.watchdog_deadline().expect("set just now");
        (wd, resumed)
    }

    /// etcd says the lease is gone: fence now.
    pub(crate) fn lost(&mut self) -> FenceReason {
        self.lease = false;
        self.best_sent = None;
        self.restored_fence = None;
        FenceReason::LeaseExpired
    }

    /// Past the fence deadline at `now_ns`? (Once fenced, keeps answering so, so
    /// that a QEMU that appears meanwhile is killed too.)
    pub(crate) fn poll(&self, now_ns: u64) -> Option<FenceReason> {
        if self.fenced && !self.lease {
            return Some(FenceReason::LeaseExpired);
        }
        match self.fence_deadline() {
            Some(d) if now_ns >= d => Some(FenceReason::NotRenewedInTime),
            _ => None,
        }
    }

    /// Marks the host fenced; true the first time.
    pub(crate) fn mark_fenced(&mut self) -> bool {
        !std::mem::replace(&mut self.fenced, true)
    }

    /// May HA VMs run here at `now_ns`?
    pub(crate) fn holds(&self, now_ns: u64) -> bool {
        self.lease && !self.fenced && self.fence_deadline().is_some_and(|d| now_ns < d)
    }
}

#[cfg(test)]
mod tests;
