//! The VM state machine.
//!
//! ```text
//!             start                 QMP up
//!  Stopped ----------> Starting ------------> Running <----- resume ----- Paused
//!  Crashed ----------^     |                   |   |  ------ pause ------>  |
//!     ^                    | QEMU failed       |   | shutdown (ACPI)        |
//!     |                    v                   |   v                        |
//!     |                 Stopped         ShuttingDown --- exit / timeout+kill |
//!     |                                        |                            |
//!     |           stop (kill) from Running, Paused, ShuttingDown            |
//!     |                                        v                            |
//!     +---- QEMU died unexpectedly ------   Stopped   <---------------------+
//! ```
//! Running/Paused --suspend (state saved to a file)--> Suspended --start/resume--> Running
//!
//! `Crashed` is `Stopped` with the knowledge that QEMU ended without being asked to
//! (killed, died, guest panic); it may be started again.

use serde::{Deserialize, Serialize};
use std::fmt;
use utoipa::ToSchema;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    #[default]
    Stopped,
    Starting,
    Running,
    Paused,
    ShuttingDown,
    Crashed,
    /// RAM and device state saved to a file in a pool, QEMU ended ("hibernate").
    Suspended,
}

/// What a user (or the agent) asks of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VmAction {
    Start,
    /// ACPI power button, then kill after a timeout.
    Shutdown,
    /// Hard stop (kill QEMU).
    Stop,
    Reboot,
    Pause,
    Resume,
    Delete,
    Edit,
    /// Save RAM and device state to a file and end QEMU.
    Suspend,
    Snapshot,
    /// A backup (of a running VM through fleecing, of a stopped one from its disks).
    Backup,
    Clone,
    /// Live migration to another host (the VM runs on through it).
    Migrate,
    /// Cold migration: a VM without a QEMU moves to another host.
    Move,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Cannot {action} a VM that is {state}{}", hint(*action, *state))]
pub struct InvalidTransition {
    pub action: VmAction,
    pub state: VmState,
}

/// What to do instead, where there is a better way.
fn hint(action: VmAction, state: VmState) -> &'static str {
    match action {
        VmAction::Migrate if !state.has_process() => {
            " (only running or paused VMs migrate live; one without a QEMU moves with ferry vm move)"
        }
        VmAction::Move if state.has_process() => {
            " (a running VM moves with ferry vm migrate)"
        }
        _ => "",
    }
}

impl VmState {
    /// True while a QEMU process exists for the VM.
    pub fn has_process(self) -> bool {
        matches!(
            self,
            VmState::Starting | VmState::Running | VmState::Paused | VmState::ShuttingDown
        )
    }

    /// Whether `action` is allowed in this state (deleting a running VM needs `force`,
    /// checked by the caller).
    pub fn check(self, action: VmAction) -> Result<(), InvalidTransition> {
        use VmAction as A;
        use VmState as S;
        let ok = match action {
            A::Start => matches!(self, S::Stopped | S::Crashed | S::Suspended),
            A::Edit | A::Clone => matches!(self, S::Stopped | S::Crashed),
            A::Delete => matches!(self, S::Stopped | S::Crashed | S::Suspended),
            A::Shutdown | A::Reboot | A::Suspend => matches!(self, S::Running | S::Paused),
            A::Stop => self.has_process(),
            A::Pause => self == S::Running,
            A::Resume => matches!(self, S::Paused | S::Suspended),
            A::Snapshot | A::Backup => {
                matches!(self, S::Stopped | S::Crashed | S::Running | S::Paused)
            }
            A::Migrate => matches!(self, S::Running | S::Paused),
            A::Move => matches!(self, S::Stopped | S::Crashed | S::Suspended),
        };
        if ok {
            Ok(())
        } else {
            Err(InvalidTransition {
                action,
                state: self,
            })
        }
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            VmState::Stopped => "stopped",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::ShuttingDown => "shutting down",
            VmState::Crashed => "crashed",
            VmState::Suspended => "suspended",
        };
        f.write_str(s)
    }
}

impl fmt::Display for VmAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = serde_json::to_value(self).ok();
        f.write_str(s.as_ref().and_then(|v| v.as_str()).unwrap_or("?"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_allowed_only_when_stopped_or_crashed() {
        assert!(VmState::Stopped.check(VmAction::Start).is_ok());
        assert!(VmState::Crashed.check(VmAction::Start).is_ok());
        for s in [VmState::Running, VmState::Paused, VmState::Starting] {
            assert!(s.check(VmAction::Start).is_err());
        }
    }

    #[test]
    fn pause_resume_pairs() {
        assert!(VmState::Running.check(VmAction::Pause).is_ok());
        assert!(VmState::Paused.check(VmAction::Pause).is_err());
        assert!(VmState::Paused.check(VmAction::Resume).is_ok());
        assert!(VmState::Running.check(VmAction::Resume).is_err());
    }

    #[test]
    fn edit_and_delete_refused_while_running() {
        let e = VmState::Running.check(VmAction::Delete).unwrap_err();
        assert_eq!(e.to_string(), "Cannot delete a VM that is running");
        assert!(VmState::Running.check(VmAction::Edit).is_err());
    }

    /// Live migration is for VMs with a running guest, a cold move for VMs without a
    /// QEMU; each refusal says which way the VM can go instead.
    #[test]
    fn migrate_and_move_split_the_states() {
        use VmState as S;
        for s in [
            S::Stopped,
            S::Starting,
            S::Running,
            S::Paused,
            S::ShuttingDown,
            S::Crashed,
            S::Suspended,
        ] {
            let live = s.check(VmAction::Migrate).is_ok();
            let cold = s.check(VmAction::Move).is_ok();
            assert_eq!(live, matches!(s, S::Running | S::Paused), "{s}");
            assert_eq!(
                cold,
                matches!(s, S::Stopped | S::Crashed | S::Suspended),
                "{s}"
            );
            assert!(!(live && cold), "{s}");
        }
        let e = S::Stopped.check(VmAction::Migrate).unwrap_err().to_string();
        assert!(e.contains("ferry vm move"), "{e}");
        let e = S::Running.check(VmAction::Move).unwrap_err().to_string();
        assert!(e.contains("ferry vm migrate"), "{e}");
    }
}
