//! What a host does with a VM when it boots and when it shuts down (Proxmox's `onboot`
//! and `startup: order=,up=,down=`; vSphere's automatic startup and shutdown).

use crate::ValidationErrors;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The longest delay or timeout a VM may ask for (an hour).
pub const MAX_STARTUP_SECONDS: u32 = 3600;
/// The highest startup order.
pub const MAX_STARTUP_ORDER: u32 = 100_000;
/// How long a guest may take to power off at host shutdown unless it says otherwise.
pub const DEFAULT_DOWN_SECONDS: u32 = 180;

/// At host shutdown: power the guest off through ACPI (stopped after its timeout), or
/// suspend it (its state to disk; it resumes when the host is back).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum HostShutdownAction {
    #[default]
    Shutdown,
    Suspend,
}

impl std::fmt::Display for HostShutdownAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HostShutdownAction::Shutdown => "shutdown",
            HostShutdownAction::Suspend => "suspend",
        })
    }
}

/// A VM's startup and shutdown policy on its host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Startup {
    /// Started when its host boots. Not for HA VMs: those come back when they ran at
    /// the host's shutdown, and the cluster places them after a host failure.
    #[serde(default)]
    pub autostart: bool,
    /// Lower first at boot, higher first at shutdown; VMs without one start after
    /// those with one and stop before them. VMs of one order stop together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<u32>,
    /// Seconds to wait after starting it before the next VM starts at boot.
    #[serde(default)]
    pub up_s: u32,
    /// Seconds its guest may take to power off at host shutdown before it is stopped
    /// (default 180).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub down_s: Option<u32>,
    /// What host shutdown does with it.
    #[serde(default)]
    pub on_host_shutdown: HostShutdownAction,
}

impl Startup {
    pub fn is_default(&self) -> bool {
        *self == Startup::default()
    }

    /// The shutdown timeout in seconds.
    pub fn down(&self) -> u32 {
        self.down_s.unwrap_or(DEFAULT_DOWN_SECONDS)
    }

    pub fn check(&self, e: &mut ValidationErrors) {
        if self.order.is_some_and(|o| o > MAX_STARTUP_ORDER) {
            e.push("startup.order", format!("at most {MAX_STARTUP_ORDER}"));
        }
        if self.up_s > MAX_STARTUP_SECONDS {
            e.push(
                "startup.up_s",
                format!("at most {MAX_STARTUP_SECONDS} seconds"),
            );
        }
        if let Some(d) = self.down_s {
            if d == 0 || d > MAX_STARTUP_SECONDS {
                e.push(
                    "startup.down_s",
                    format!("between 1 and {MAX_STARTUP_SECONDS} seconds"),
                );
            }
        }
    }

    /// Proxmox's notation: `order=N,up=S,down=S` (each part optional).
    pub fn parse_notation(s: &str, mut into: Startup) -> Result<Startup, String> {
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("`{part}`: give order=N, up=SECONDS or down=SECONDS"))?;
            let n: u32 = v
                .parse()
                .map_err(|_| format!("`{part}`: {v} is not a whole number"))?;
            match k {
                "order" => into.order = Some(n),
                "up" => into.up_s = n,
                "down" => into.down_s = Some(n),
                _ => return Err(format!("`{k}`: use order, up or down")),
            }
        }
        Ok(into)
    }
}

/// What the host did to one VM at a shutdown or boot of all its VMs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HostPowerStep {
    pub vm: String,
    /// `shutdown`, `stopped` (its guest did not power off in time), `suspend`,
    /// `start`, `resume`, or `failed`.
    pub action: String,
    /// Why this VM (autostart, suspended by the host's shutdown, ...), or the error.
    pub detail: String,
}

/// The answer of `POST /api/v1/host/stop-all` and `start-all` (the task's result).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
pub struct HostPowerReport {
    pub steps: Vec<HostPowerStep>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notation_sets_only_what_it_names() {
        let base = Startup {
            autostart: true,
            up_s: 5,
            ..Default::default()
        };
        let s = Startup::parse_notation("order=2,down=60", base).unwrap();
        assert_eq!(s.order, Some(2));
        assert_eq!(s.up_s, 5);
        assert_eq!(s.down_s, Some(60));
        assert!(s.autostart);
        assert!(Startup::parse_notation("order=x", base)
            .unwrap_err()
            .contains("not a whole number"));
        assert!(Startup::parse_notation("late=1", base)
            .unwrap_err()
            .contains("use order, up or down"));
        assert!(Startup::parse_notation("order", base).is_err());
    }

    #[test]
    fn limits_are_checked() {
        let mut e = ValidationErrors::default();
        Startup {
            down_s: Some(0),
            up_s: 4000,
            order: Some(MAX_STARTUP_ORDER + 1),
            ..Default::default()
        }
        .check(&mut e);
        assert!(e.into_result().is_err());
        let mut e = ValidationErrors::default();
        Startup::default().check(&mut e);
        assert!(e.into_result().is_ok());
    }
}
