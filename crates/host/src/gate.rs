//! May a VM start here now? One pure gate for every way a VM starts (a user, a
//! reboot, a snapshot revert, an HA restart), so no path skips a check.
//!
//! What needs the store or other hosts is decided elsewhere and stays atomic there:
//! shared-volume locks and replica promotion (compare-and-swap), resource-pool and HA
//! admission (answered by the API before the task, with the reason).

use ferry_types::state::InvalidTransition;
use ferry_types::{VmAction, VmState};

/// What starts the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartOrigin {
    /// `ferry vm start` (or DRS placing it at power-on).
    User,
    /// The second half of a reboot: the VM ran here a moment ago.
    Reboot,
    /// Reverting a stopped VM to a snapshot with memory.
    SnapshotRevert,
    /// The HA restart of a crashed VM on its host, or on the host HA moved it to.
    HaRestart,
}

/// What the gate looks at, read under the VM's operation lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartFacts {
    pub origin: StartOrigin,
    /// The VM's state on this host now.
    pub state: VmState,
    /// Its QEMU process is known (a start in flight or one that did not end).
    pub has_pid: bool,
    pub template: bool,
    pub ha_enabled: bool,
    /// The state its record keeps (what HA restores).
    pub last_state: VmState,
    /// This host holds its cluster lease (always true alone).
    pub holds_lease: bool,
    pub maintenance: bool,
    /// The host is shutting its VMs down (`stop-all`, the host's shutdown).
    pub shutting_down: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartRefusal {
    State(InvalidTransition),
    Template,
    /// The host takes no new VMs.
    Maintenance,
    /// The host lost its lease: its HA VMs may be running elsewhere.
    Fenced,
    /// HA was to restart it, but it no longer should run (a user stopped it) or runs.
    NotWanted,
    /// The host is shutting its VMs down.
    ShuttingDown,
}

/// Should HA keep this VM running? (Started by a user and not stopped by one.)
pub fn wanted(last_state: VmState) -> bool {
    last_state.has_process() || last_state == VmState::Crashed
}

pub fn start_gate(f: &StartFacts) -> Result<(), StartRefusal> {
    f.state
        .check(VmAction::Start)
        .map_err(StartRefusal::State)?;
    if f.template {
        return Err(StartRefusal::Template);
    }
    if f.shutting_down {
        return Err(StartRefusal::ShuttingDown);
    }
    if f.origin == StartOrigin::HaRestart && (!f.ha_enabled || !wanted(f.last_state) || f.has_pid) {
        return Err(StartRefusal::NotWanted);
    }
    // A reboot is the VM that ran here going on; everything else is a new start.
    if f.maintenance && f.origin != StartOrigin::Reboot {
        return Err(StartRefusal::Maintenance);
    }
    if f.ha_enabled && !f.holds_lease {
        return Err(StartRefusal::Fenced);
    }
    Ok(())
}

impl StartRefusal {
    pub fn into_error(self, vm: &str, host: &str) -> crate::AgentError {
        use crate::error::{AgentError, Refusal};
        match self {
            StartRefusal::State(e) => AgentError::State(e),
            StartRefusal::Template => AgentError::refused(
                Refusal::Template,
                format!("{vm} is a template; templates are not started (clone it)"),
            ),
            StartRefusal::Maintenance => AgentError::refused(
                Refusal::Maintenance,
                format!("Host {host} is in maintenance: no VM starts here (ferry host activate)"),
            ),
            StartRefusal::Fenced => AgentError::Fenced(host.to_string()),
            StartRefusal::ShuttingDown => AgentError::refused(
                Refusal::ShuttingDown,
                format!("Host {host} is shutting its VMs down: none starts here until it boots again or `ferry host start-all`"),
            ),
            StartRefusal::NotWanted => AgentError::refused(
                Refusal::NotWanted,
                format!("{vm} is no longer to be restarted by HA (stopped by a user, or running)"),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn state() -> impl Strategy<Value = VmState> {
        prop_oneof![
            Just(VmState::Stopped),
            Just(VmState::Starting),
            Just(VmState::Running),
            Just(VmState::Paused),
            Just(VmState::ShuttingDown),
            Just(VmState::Crashed),
            Just(VmState::Suspended),
        ]
    }

    fn origin() -> impl Strategy<Value = StartOrigin> {
        prop_oneof![
            Just(StartOrigin::User),
            Just(StartOrigin::Reboot),
            Just(StartOrigin::SnapshotRevert),
            Just(StartOrigin::HaRestart),
        ]
    }

    prop_compose! {
        fn facts()(origin in origin(), state in state(), has_pid in any::<bool>(),
                   template in any::<bool>(), ha_enabled in any::<bool>(),
                   last_state in state(), holds_lease in any::<bool>(),
                   maintenance in any::<bool>(), shutting_down in any::<bool>()) -> StartFacts {
            StartFacts { origin, state, has_pid, template, ha_enabled, last_state, holds_lease, maintenance, shutting_down }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        /// What lets a VM start holds for every origin.
        #[test]
        fn a_start_needs_a_startable_state_no_template_and_a_lease_for_ha(f in facts()) {
            if start_gate(&f).is_ok() {
                prop_assert!(f.state.check(VmAction::Start).is_ok());
                prop_assert!(!f.template);
                prop_assert!(!f.ha_enabled || f.holds_lease, "an HA VM started on a fenced host");
                prop_assert!(!f.maintenance || f.origin == StartOrigin::Reboot);
                prop_assert!(!f.shutting_down, "a VM started while the host shuts its VMs down");
            }
        }

        /// HA never undoes a user's stop, and never starts a second QEMU.
        #[test]
        fn ha_restarts_only_what_should_run(f in facts()) {
            let f = StartFacts { origin: StartOrigin::HaRestart, ..f };
            if start_gate(&f).is_ok() {
                prop_assert!(f.ha_enabled && wanted(f.last_state) && !f.has_pid);
            }
        }

        /// Making any fact worse never turns a refusal into a start.
        #[test]
        fn worse_facts_never_open_the_gate(f in facts(), which in 0..5usize) {
            let mut worse = f.clone();
            match which {
                0 => worse.template = true,
                1 => worse.maintenance = true,
                2 => worse.holds_lease = false,
                3 => worse.shutting_down = true,
                _ => worse.has_pid = true,
            }
            if start_gate(&f).is_err() {
                prop_assert!(start_gate(&worse).is_err());
            }
        }
    }

    #[test]
    fn a_reboot_goes_on_in_maintenance_a_new_start_does_not() {
        let f = StartFacts {
            origin: StartOrigin::Reboot,
            state: VmState::Stopped,
            has_pid: false,
            template: false,
            ha_enabled: true,
            last_state: VmState::Running,
            holds_lease: true,
            maintenance: true,
            shutting_down: false,
        };
        assert_eq!(start_gate(&f), Ok(()));
        for origin in [
            StartOrigin::User,
            StartOrigin::SnapshotRevert,
            StartOrigin::HaRestart,
        ] {
            let g = StartFacts {
                origin,
                ..f.clone()
            };
            assert_eq!(start_gate(&g), Err(StartRefusal::Maintenance), "{origin:?}");
        }
        let fenced = StartFacts {
            holds_lease: false,
            maintenance: false,
            ..f
        };
        assert_eq!(start_gate(&fenced), Err(StartRefusal::Fenced));
    }
}
