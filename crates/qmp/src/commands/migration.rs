//! Migration settings: capabilities and parameters.

use super::{Command, Empty};
use serde::Serialize;

/// `migrate-set-capabilities`.
#[derive(Debug, Clone, Serialize)]
pub struct MigrateSetCapabilities {
    pub capabilities: Vec<CapabilityState>,
}
impl Command for MigrateSetCapabilities {
    const NAME: &'static str = "migrate-set-capabilities";
    type Reply = Empty;
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct CapabilityState {
    pub capability: Capability,
    pub state: bool,
}

/// The migration capabilities ferry sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Capability {
    /// MIGRATION events instead of polling.
    Events,
    /// Throttle the vCPUs when RAM is dirtied faster than it is sent.
    AutoConverge,
    /// Allow switching to post-copy.
    PostcopyRam,
    /// Pause in `pre-switchover` (the destination claims the NICs there).
    PauseBeforeSwitchover,
}

/// `migrate-set-parameters`: only the ones given change.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrateSetParameters {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime_limit: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_bandwidth: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_postcopy_bandwidth: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_throttle_initial: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_throttle_increment: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub announce_initial: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub announce_max: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub announce_rounds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub announce_step: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_creds: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_hostname: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_authz: Option<String>,
}
impl Command for MigrateSetParameters {
    const NAME: &'static str = "migrate-set-parameters";
    type Reply = Empty;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_the_parameters_given_are_sent() {
        let p = MigrateSetParameters {
            downtime_limit: Some(300),
            tls_hostname: Some("h2".into()),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(&p).unwrap(),
            json!({"downtime-limit": 300, "tls-hostname": "h2"})
        );
        let c = MigrateSetCapabilities {
            capabilities: vec![CapabilityState {
                capability: Capability::PauseBeforeSwitchover,
                state: true,
            }],
        };
        assert_eq!(
            serde_json::to_value(&c).unwrap(),
            json!({"capabilities": [{"capability": "pause-before-switchover", "state": true}]})
        );
    }
}
