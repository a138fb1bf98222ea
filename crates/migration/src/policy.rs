//! The convergence policy of a live migration, as a state machine without I/O: it is
//! fed `query-migrate` samples and answers what to do.
//!
//! ```text
//!  PreCopy --stall, and the rest fits in `max_downtime` at link speed--> raise the
//!            downtime limit to what the rest needs (completes at the next pass)
//!  PreCopy --stall (dirty rate ≥ link, remaining not shrinking)--> Throttling
//!  Throttling --QEMU's auto-converge raises the vCPU throttle each pass--> (converges)
//!  Throttling --throttle ≥ limit and still stalled, or pre-copy budget spent--> PostCopy
//!  any --no bytes moved for `no_progress`--> Cancel
//! ```
//!
//! Auto-converge is QEMU's: it is enabled from the start and throttles the vCPUs when
//! the guest dirties faster than the link carries; the policy watches the throttle and
//! the remaining RAM and decides the switch to post-copy (which always completes: the
//! destination runs the guest and pulls missing pages on demand).

use ferry_qmp::commands::{MigrationInfo, MigrationStatus};
use std::time::Duration;

/// One `query-migrate` answer, reduced to what the policy needs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sample {
    pub elapsed: Duration,
    pub status: MigrationStatus,
    pub remaining: u64,
    pub transferred: u64,
    pub total: u64,
    /// Dirty-bitmap syncs so far (a pass each).
    pub passes: u64,
    pub dirty_pages_rate: u64,
    pub page_size: u64,
    /// Link throughput QEMU measured, Mbit/s.
    pub mbps: f64,
    pub throttle_pct: u64,
}

impl Sample {
    /// Reduces `query-migrate`'s answer. Before QEMU has RAM statistics (in `setup`)
    /// nothing has moved yet: zeros then are the truth, not a missing field.
    pub fn from_info(v: &MigrationInfo, elapsed: Duration) -> Sample {
        let ram = v.ram.as_ref();
        Sample {
            elapsed,
            status: v.status(),
            remaining: ram.map_or(0, |r| r.remaining),
            transferred: ram.map_or(0, |r| r.transferred),
            total: ram.map_or(0, |r| r.total),
            passes: ram.map_or(0, |r| r.dirty_sync_count),
            dirty_pages_rate: ram.map_or(0, |r| r.dirty_pages_rate),
            page_size: ram.map_or(4096, |r| r.page_size),
            mbps: ram.map_or(0.0, |r| r.mbps),
            // Present only while auto-converge throttles.
            throttle_pct: v.cpu_throttle_percentage.unwrap_or(0),
        }
    }

    /// Bytes per second the guest dirties.
    pub fn dirty_bytes_rate(&self) -> u64 {
        self.dirty_pages_rate * self.page_size
    }

    /// Bytes per second the link carries.
    pub fn link_bytes_rate(&self) -> u64 {
        ferry_types::whole(self.mbps * 1e6 / 8.0)
    }
}

#[derive(Debug, Clone)]
pub struct PolicyConfig {
    pub allow_postcopy: bool,
    /// Passes without the remaining RAM shrinking by 10 % that make a stall.
    pub stall_passes: u32,
    /// The throttle at which, still stalled, post-copy starts.
    pub throttle_limit: u64,
    /// Pre-copy time after which post-copy starts regardless.
    pub precopy_budget: Duration,
    /// No bytes moved for this long: the link is gone, cancel.
    pub no_progress: Duration,
    /// Switch to post-copy once the first full pass is done (an earlier attempt of this
    /// migration stalled already).
    pub postcopy_after_first_pass: bool,
    /// The longest pause the policy may allow to finish a stalled pre-copy, ms.
    pub max_downtime_ms: u64,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            allow_postcopy: true,
            stall_passes: 4,
            throttle_limit: 70,
            precopy_budget: Duration::from_secs(30),
            no_progress: Duration::from_secs(8),
            postcopy_after_first_pass: false,
            max_downtime_ms: 300,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    PreCopy,
    Throttling,
    PostCopy,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Continue,
    /// Set QEMU's downtime limit to this many ms.
    SetDowntime(u64),
    StartPostcopy,
    Cancel(String),
}

#[derive(Debug)]
pub struct Policy {
    cfg: PolicyConfig,
    pub phase: Phase,
    best_remaining: u64,
    stalled_for: u32,
    last_pass: u64,
    last_transferred: u64,
    last_progress: Duration,
    max_throttle: u64,
    downtime_raised: bool,
    pub max_dirty_pages_rate: u64,
    /// What the policy did, for the report.
    pub steps: Vec<String>,
}

impl Policy {
    pub fn new(cfg: PolicyConfig) -> Policy {
        Policy {
            cfg,
            phase: Phase::PreCopy,
            best_remaining: u64::MAX,
            stalled_for: 0,
            last_pass: 0,
            last_transferred: 0,
            last_progress: Duration::ZERO,
            max_throttle: 0,
            downtime_raised: false,
            max_dirty_pages_rate: 0,
            steps: vec![],
        }
    }

    fn stalled(&self) -> bool {
        self.stalled_for >= self.cfg.stall_passes
    }

    pub fn observe(&mut self, s: &Sample) -> Decision {
        self.max_dirty_pages_rate = self.max_dirty_pages_rate.max(s.dirty_pages_rate);
        if s.transferred != self.last_transferred {
            self.last_transferred = s.transferred;
            self.last_progress = s.elapsed;
        } else if s.status != MigrationStatus::PreSwitchover
            && s.elapsed.saturating_sub(self.last_progress) >= self.cfg.no_progress
        {
            let why = format!(
                "no data moved for {:?} (network or destination gone)",
                self.cfg.no_progress
            );
            self.steps.push(format!("cancel: {why}"));
            return Decision::Cancel(why);
        }
        if s.status == MigrationStatus::PostcopyActive || self.phase == Phase::PostCopy {
            return Decision::Continue;
        }
        if s.passes > self.last_pass {
            self.last_pass = s.passes;
            if s.remaining < self.best_remaining / 10 * 9 {
                self.best_remaining = s.remaining;
                self.stalled_for = 0;
            } else {
                self.stalled_for += 1;
                if self.stalled_for == self.cfg.stall_passes {
                    self.steps.push(format!(
                        "stall at pass {}: dirtying {} MiB/s, link {} MiB/s, {} MiB left",
                        s.passes,
                        s.dirty_bytes_rate() >> 20,
                        s.link_bytes_rate() >> 20,
                        s.remaining >> 20
                    ));
                }
            }
        }
        if s.throttle_pct > self.max_throttle {
            if self.max_throttle == 0 {
                self.phase = Phase::Throttling;
                self.steps.push(format!(
                    "auto-converge: vCPUs throttled {}%",
                    s.throttle_pct
                ));
            }
            self.max_throttle = s.throttle_pct;
        }
        if self.cfg.allow_postcopy
            && self.cfg.postcopy_after_first_pass
            && s.status == MigrationStatus::Active
            && s.passes >= 2
        {
            self.phase = Phase::PostCopy;
            self.steps.push(format!(
                "post-copy after the first pass ({} MiB left)",
                s.remaining >> 20
            ));
            return Decision::StartPostcopy;
        }
        if self.stalled() && !self.downtime_raised && s.link_bytes_rate() > 0 {
            self.downtime_raised = true;
            // What the last pages need at the measured link speed, with a margin.
            let need = s.remaining.saturating_mul(1000) / s.link_bytes_rate() * 5 / 4 + 5;
            if need <= self.cfg.max_downtime_ms {
                self.steps.push(format!(
                    "downtime limit raised to {need} ms for the last {} MiB",
                    s.remaining >> 20
                ));
                return Decision::SetDowntime(need);
            }
        }
        // The budget grows with the guest: three first passes' worth at the link's speed.
        let first_pass = match s.link_bytes_rate() {
            0 => Duration::ZERO,
            r => Duration::from_secs_f64(s.total as f64 / r as f64),
        };
        let budget_spent = s.elapsed >= self.cfg.precopy_budget.max(first_pass * 3);
        let throttled_out = self.max_throttle >= self.cfg.throttle_limit && self.stalled();
        // A slow migration that still makes headway is left alone.
        if self.cfg.allow_postcopy
            && s.status == MigrationStatus::Active
            && (throttled_out || (budget_spent && self.stalled()))
        {
            self.phase = Phase::PostCopy;
            self.steps.push(format!(
                "post-copy at pass {} ({}; throttle {}%, {} MiB left)",
                s.passes,
                if throttled_out {
                    "still stalled"
                } else {
                    "pre-copy budget spent"
                },
                self.max_throttle,
                s.remaining >> 20
            ));
            return Decision::StartPostcopy;
        }
        Decision::Continue
    }

    /// Closes the report's steps with the highest throttle reached.
    pub fn finish(&mut self) {
        if self.max_throttle > 0 {
            self.steps
                .push(format!("highest vCPU throttle {}%", self.max_throttle));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(ms: u64, pass: u64, remaining: u64, transferred: u64, throttle: u64) -> Sample {
        Sample {
            elapsed: Duration::from_millis(ms),
            status: MigrationStatus::Active,
            remaining,
            transferred,
            total: 256 << 20,
            passes: pass,
            dirty_pages_rate: 40_000,
            page_size: 4096,
            mbps: 800.0,
            throttle_pct: throttle,
        }
    }

    #[test]
    fn a_converging_migration_is_left_alone() {
        let mut p = Policy::new(PolicyConfig::default());
        for (i, rem) in [200u64, 100, 40, 10, 1].iter().enumerate() {
            let d = p.observe(&s(
                i as u64 * 100,
                i as u64 + 1,
                rem << 20,
                i as u64 * 1000 + 1,
                0,
            ));
            assert_eq!(d, Decision::Continue);
        }
        assert_eq!(p.phase, Phase::PreCopy);
        assert!(p.steps.is_empty());
    }

    #[test]
    fn stall_then_throttle_then_postcopy() {
        let mut p = Policy::new(PolicyConfig::default());
        let mut t = 0;
        let mut d = Decision::Continue;
        for pass in 1..=12u64 {
            t += 1;
            let throttle = if pass > 3 { 20 + (pass - 4) * 10 } else { 0 };
            d = p.observe(&s(pass * 300, pass, 100 << 20, t * 1000, throttle));
            if d != Decision::Continue {
                break;
            }
        }
        assert_eq!(d, Decision::StartPostcopy);
        assert_eq!(p.phase, Phase::PostCopy);
        assert!(
            p.steps.iter().any(|x| x.starts_with("stall")),
            "{:?}",
            p.steps
        );
        assert!(p.steps.iter().any(|x| x.starts_with("auto-converge")));
        assert!(p.steps.last().unwrap().starts_with("post-copy"));
        // Once in post-copy the policy only watches for a dead link.
        let mut ps = s(5000, 13, 1 << 20, 99_999, 90);
        ps.status = MigrationStatus::PostcopyActive;
        assert_eq!(p.observe(&ps), Decision::Continue);
    }

    #[test]
    fn no_postcopy_when_not_allowed_but_budget_is_reported() {
        let mut p = Policy::new(PolicyConfig {
            allow_postcopy: false,
            ..Default::default()
        });
        for pass in 1..=20u64 {
            assert_eq!(
                p.observe(&s(pass * 3000, pass, 100 << 20, pass * 1000, 99)),
                Decision::Continue
            );
        }
    }

    #[test]
    fn a_small_stalled_rest_gets_a_longer_pause_instead() {
        let mut p = Policy::new(PolicyConfig::default());
        let mut d = Decision::Continue;
        for pass in 1..=6u64 {
            // 8 MiB left at 100 MB/s: 84 ms, within the 300 ms ceiling.
            let mut x = s(pass * 300, pass, 8 << 20, pass * 1000, 0);
            x.mbps = 800.0;
            d = p.observe(&x);
            if d != Decision::Continue {
                break;
            }
        }
        match d {
            Decision::SetDowntime(ms) => assert!((90..=120).contains(&ms), "{ms}"),
            other => panic!("{other:?}"),
        }
        assert!(p.steps.last().unwrap().starts_with("downtime limit raised"));
    }

    #[test]
    fn a_slow_migration_making_headway_is_not_switched() {
        let mut p = Policy::new(PolicyConfig::default());
        let mut rem = 200u64 << 20;
        for pass in 1..=20u64 {
            rem = rem * 3 / 4;
            // 40 s and more: past the budget, but every pass shrinks the rest.
            let d = p.observe(&s(40_000 + pass * 1000, pass, rem, pass * 1000, 0));
            assert_eq!(d, Decision::Continue, "pass {pass}");
        }
    }

    #[test]
    fn a_dead_link_cancels() {
        let mut p = Policy::new(PolicyConfig::default());
        assert_eq!(p.observe(&s(0, 1, 100 << 20, 5000, 0)), Decision::Continue);
        assert_eq!(
            p.observe(&s(4000, 1, 100 << 20, 5000, 0)),
            Decision::Continue
        );
        assert!(matches!(
            p.observe(&s(8100, 1, 100 << 20, 5000, 0)),
            Decision::Cancel(_)
        ));
    }
}
