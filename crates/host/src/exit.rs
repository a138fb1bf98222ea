//! What a QEMU's end means — decided without I/O.
//!
//! Before the agent ends a QEMU it records why ([`ExitIntent`], one slot per VM run);
//! the supervisor records what QEMU said before it ended ([`ExitFacts`]). When QEMU
//! is gone, [`classify_exit`] names the VM's new state. An operation that fails before
//! QEMU ends takes its intent back ([`IntentGuard`]), so a later real crash is never
//! mistaken for that stop.

use ferry_types::VmState;

/// Why the agent expects this QEMU to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExitIntent {
    /// Nothing asked for: an exit is the guest's doing or a crash.
    #[default]
    None,
    /// A hard stop (`quit`, then SIGKILL).
    Stop,
    /// The power button (ACPI), escalating to [`ExitIntent::Stop`] after the timeout.
    Shutdown,
    /// Suspend to a file: the state file is written, QEMU is told to quit.
    Suspend,
    /// An outgoing live migration completed: the VM runs on the destination.
    MigratedAway,
}

/// What QEMU said before it ended (QMP events the supervisor saw).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExitFacts {
    /// A `SHUTDOWN` event with `guest: true`: the guest powered itself off.
    pub guest_shutdown: bool,
    /// A `GUEST_PANICKED` event.
    pub panicked: bool,
}

/// The VM's state after its QEMU ended, and what to do about its disks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitOutcome {
    pub state: VmState,
    /// Shown as the VM's last exit (none for an exit the user asked for).
    pub why: Option<String>,
    /// Release its shared-volume locks (not when suspended: it resumes with them).
    pub unlock_disks: bool,
}

/// Classifies the end of a QEMU run. `last_error`: what the run recorded last (a
/// failed re-adoption), shown for a crash without a better reason.
pub fn classify_exit(
    intent: ExitIntent,
    facts: &ExitFacts,
    last_error: Option<&str>,
) -> ExitOutcome {
    let (state, why) = match intent {
        ExitIntent::Suspend => (VmState::Suspended, None),
        ExitIntent::Stop | ExitIntent::Shutdown | ExitIntent::MigratedAway => {
            (VmState::Stopped, None)
        }
        ExitIntent::None if facts.panicked => {
            (VmState::Crashed, Some("guest panicked".to_string()))
        }
        ExitIntent::None if facts.guest_shutdown => {
            (VmState::Stopped, Some("guest powered off".to_string()))
        }
        ExitIntent::None => (
            VmState::Crashed,
            Some(last_error.unwrap_or("QEMU exited unexpectedly").to_string()),
        ),
    };
    ExitOutcome {
        unlock_disks: state != VmState::Suspended,
        state,
        why,
    }
}

/// Sets an intent on a VM's run and takes it back when dropped, unless QEMU ended
/// meanwhile (the supervisor consumed it) or another intent replaced it: an
/// operation that fails part way leaves no stale intent behind.
pub struct IntentGuard<'a> {
    slot: &'a crate::runtime::Slot,
    intent: ExitIntent,
    generation: u64,
    kept: bool,
}

impl<'a> IntentGuard<'a> {
    pub fn set(slot: &'a crate::runtime::Slot, intent: ExitIntent) -> IntentGuard<'a> {
        let generation = slot.with(|rt| {
            rt.intent = intent;
            rt.generation
        });
        IntentGuard {
            slot,
            intent,
            generation,
            kept: false,
        }
    }

    /// QEMU was told to end (`quit` or a signal went out): whenever it ends from now
    /// on, it is the end asked for, even if this operation gives up waiting.
    pub fn keep(&mut self) {
        self.kept = true;
    }
}

impl Drop for IntentGuard<'_> {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        self.slot.with(|rt| {
            if rt.generation == self.generation && rt.intent == self.intent {
                rt.intent = ExitIntent::None;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn intent() -> impl Strategy<Value = ExitIntent> {
        prop_oneof![
            Just(ExitIntent::None),
            Just(ExitIntent::Stop),
            Just(ExitIntent::Shutdown),
            Just(ExitIntent::Suspend),
            Just(ExitIntent::MigratedAway),
        ]
    }

    fn facts() -> impl Strategy<Value = ExitFacts> {
        (any::<bool>(), any::<bool>()).prop_map(|(guest_shutdown, panicked)| ExitFacts {
            guest_shutdown,
            panicked,
        })
    }

    proptest! {
        /// An end the agent asked for is never a crash (HA never undoes a user's stop).
        #[test]
        fn an_asked_for_end_is_never_a_crash(i in intent(), f in facts(), e in proptest::option::of(".*")) {
            let o = classify_exit(i, &f, e.as_deref());
            if i != ExitIntent::None {
                prop_assert_ne!(o.state, VmState::Crashed);
                prop_assert_eq!(o.why, None);
            }
        }

        /// Without an intent, only a guest that powered off (and did not panic) is
        /// stopped; everything else is a crash, with a reason.
        #[test]
        fn an_unasked_end_is_a_crash_unless_the_guest_powered_off(f in facts(), e in proptest::option::of(".*")) {
            let o = classify_exit(ExitIntent::None, &f, e.as_deref());
            if f.guest_shutdown && !f.panicked {
                prop_assert_eq!(o.state, VmState::Stopped);
            } else {
                prop_assert_eq!(o.state, VmState::Crashed);
                prop_assert!(o.why.is_some());
            }
        }

        /// Suspended exactly when a suspend ended it; the disks stay locked exactly then.
        #[test]
        fn suspended_iff_suspending(i in intent(), f in facts()) {
            let o = classify_exit(i, &f, None);
            prop_assert_eq!(o.state == VmState::Suspended, i == ExitIntent::Suspend);
            prop_assert_eq!(o.unlock_disks, o.state != VmState::Suspended);
            // Only states a VM can be in without a QEMU come out.
            prop_assert!(!o.state.has_process());
        }
    }

    #[test]
    fn reasons_say_what_happened() {
        let panic = ExitFacts {
            panicked: true,
            guest_shutdown: false,
        };
        assert_eq!(
            classify_exit(ExitIntent::None, &panic, None).why.as_deref(),
            Some("guest panicked")
        );
        assert_eq!(
            classify_exit(
                ExitIntent::None,
                &ExitFacts::default(),
                Some("re-adoption failed: x")
            )
            .why
            .as_deref(),
            Some("re-adoption failed: x")
        );
        assert_eq!(
            classify_exit(ExitIntent::None, &ExitFacts::default(), None)
                .why
                .as_deref(),
            Some("QEMU exited unexpectedly")
        );
    }

    /// A failed operation takes its intent back; one that QEMU's end consumed, or
    /// that another replaced, is left alone.
    #[test]
    fn the_guard_takes_back_only_its_own_intent() {
        let slot = crate::runtime::Slot::default();
        drop(IntentGuard::set(&slot, ExitIntent::Stop));
        assert_eq!(slot.with(|rt| rt.intent), ExitIntent::None);
        {
            let _shutdown = IntentGuard::set(&slot, ExitIntent::Shutdown);
            // The shutdown escalates to a stop, which succeeds: QEMU ended, the
            // supervisor took the intent, a new run started.
            let stop = IntentGuard::set(&slot, ExitIntent::Stop);
            slot.with(|rt| {
                rt.intent = ExitIntent::None;
                rt.generation += 1;
                rt.intent = ExitIntent::Suspend; // the new run's own business
            });
            drop(stop);
        }
        assert_eq!(slot.with(|rt| rt.intent), ExitIntent::Suspend);
        // Once the end was asked of QEMU, giving up waiting keeps the intent: its exit,
        // whenever it comes, is not a crash.
        slot.with(|rt| rt.intent = ExitIntent::None);
        {
            let mut g = IntentGuard::set(&slot, ExitIntent::Stop);
            g.keep();
        }
        assert_eq!(slot.with(|rt| rt.intent), ExitIntent::Stop);
    }
}
