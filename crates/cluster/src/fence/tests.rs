//! The fence clock against a model of etcd: a lease lives until `ttl` after the last
//! renewal etcd processed; etcd processes a renewal somewhere between its send and its
//! ack, and acks arrive late, out of order, or never.

use super::*;
use crate::lease::{watchdog_step, WatchdogStep};
use proptest::prelude::*;

const MS: u64 = 1_000_000;

#[derive(Debug, Clone)]
enum Ev {
    /// A renewal sent `gap` ms after the previous one; etcd processes it `proc` ms
    /// after the send; its ack arrives `ack` ms after that (or never); the watchdog
    /// file is written then (or the write fails).
    Renew {
        gap: u64,
        proc: u64,
        ack: Option<u64>,
        write_ok: bool,
    },
    /// etcd reports the lease gone.
    Lost,
}

fn ev() -> impl Strategy<Value = Ev> {
    prop_oneof![
        8 => (0..3000u64, 0..2000u64, proptest::option::of(0..4000u64), prop::bool::weighted(0.85))
            .prop_map(|(gap, proc, ack, write_ok)| Ev::Renew { gap, proc, ack, write_ok }),
        1 => Just(Ev::Lost),
    ]
}

fn ttl() -> impl Strategy<Value = u64> {
    2u64..=60
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    /// fence < watchdog < lease expiry, and neither deadline moves back, under any
    /// renewal timing.
    #[test]
    fn fence_before_watchdog_before_expiry(ttl_s in ttl(), evs in proptest::collection::vec(ev(), 1..60)) {
        let ttl = Duration::from_secs(ttl_s);
        let ttl_ns = u64::try_from(ttl.as_nanos()).expect("a ttl of seconds");
        let mut c = FenceClock::new(ttl);
        let mut t = 1_000 * MS; // send times
        // Acks waiting to arrive: (arrival, sent, the watchdog write succeeds).
        let mut pending: Vec<(u64, u64, bool)> = vec![];
        // What the watchdog file holds.
        let mut file: Option<u64> = None;
        // The model: etcd's expiry is the latest processing time + ttl.
        let mut expiry: Option<u64> = None;
        let (mut last_fence, mut last_wd) = (0u64, 0u64);
        for e in evs {
            match e {
                Ev::Renew { gap, proc, ack, write_ok } => {
                    t += gap * MS;
                    let processed = t + proc * MS;
                    expiry = Some(expiry.map_or(processed + ttl_ns, |x| x.max(processed + ttl_ns)));
                    if let Some(a) = ack {
                        pending.push((processed + a * MS, t, write_ok));
                    }
                }
                Ev::Lost => {
                    // Only once etcd has actually let the lease go (nothing pending
                    // can come back).
                    pending.clear();
                    expiry = None;
                    c.lost();
                    prop_assert!(!c.holds(t));
                    last_fence = 0;
                    last_wd = 0;
                    continue;
                }
            }
            // Deliver the acks due by now, in arrival order (not send order).
            pending.sort();
            let now = t;
            while let Some(&(arrive, sent, write_ok)) = pending.first() {
                if arrive > now { break; }
                pending.remove(0);
                let (wd, _) = c.renewed(sent);
                if write_ok {
                    c.written(wd);
                    file = Some(file.map_or(wd, |f| f.max(wd)));
                }
            }
            // Whatever the file holds, the agent has fenced by the time the watchdog
            // would (a failed write leaves the older deadline there).
            if let Some(f) = file {
                for probe in [f, f + 1] {
                    if watchdog_step(Some(f), probe) == WatchdogStep::Fence {
                        prop_assert!(c.poll(probe).is_some(), "the watchdog fires at {probe} before the agent fences");
                    }
                }
            }
            if let (Some(f), Some(w)) = (c.fence_deadline(), c.watchdog_deadline()) {
                let x = expiry.expect("a renewal was acked, so etcd processed it");
                prop_assert!(f < w, "fence {f} not before watchdog {w}");
                prop_assert!(w + ttl_ns / 6 <= x + 1, "watchdog {w} not ttl/6 before expiry {x}");
                prop_assert!(f >= last_fence && w >= last_wd, "a deadline moved back");
                last_fence = f;
                last_wd = w;
                // Whenever the watchdog would fire, the agent's clock has fenced.
                for probe in [w, w + 1, x] {
                    if watchdog_step(Some(w), probe) == WatchdogStep::Fence {
                        prop_assert!(c.poll(probe).is_some());
                        prop_assert!(!c.holds(probe));
                    }
                }
                // And while it holds, the lease lives.
                if c.holds(now) {
                    prop_assert!(now < f && now < x);
                }
            }
        }
    }

    /// A restored clock fences before the previous daemon's watchdog would.
    #[test]
    fn a_restored_clock_fences_before_the_old_watchdog(ttl_s in ttl(), wd in 1u64..u64::MAX / 4) {
        let c = FenceClock::restored(Duration::from_secs(ttl_s), Some(wd));
        let f = c.fence_deadline().expect("restored");
        prop_assert!(f < wd || wd < ttl_s * 1_000_000_000 / 6);
        prop_assert!(c.poll(wd).is_some());
    }
}

#[test]
fn lost_fences_until_a_new_lease() {
    let mut c = FenceClock::new(Duration::from_secs(6));
    let (wd, resumed) = c.renewed(10 * MS);
    assert!(!resumed);
    assert_eq!(wd, 10 * MS + 5_000 * MS);
    assert_eq!(c.fence_deadline(), Some(10 * MS + 4_000 * MS));
    assert!(c.holds(11 * MS));
    assert_eq!(c.lost(), FenceReason::LeaseExpired);
    assert!(c.mark_fenced());
    assert!(!c.mark_fenced());
    assert!(!c.holds(11 * MS));
    let (_, resumed) = c.renewed(20 * MS);
    assert!(resumed, "a grant after a fence resumes HA work");
    assert!(c.holds(21 * MS));
    // Past the deadline with no renewal: fence.
    assert_eq!(
        c.poll(20 * MS + 4_000 * MS),
        Some(FenceReason::NotRenewedInTime)
    );
}
