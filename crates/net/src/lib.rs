//! Host networking for VMs. A VM NIC is a persistent tap created with the `TUNSETIFF`
//! ioctl (the kernel refuses tap creation over rtnetlink), attached to a host bridge and
//! brought up over rtnetlink; QEMU gets an open descriptor on it (it runs unprivileged). Bridges are created only on request.

mod announce;
mod guard;
mod link;
mod tap;

pub use announce::{announce_mac, rarp_frame};
pub use guard::{guard_tap, unguard_tap};
pub use link::{
    attach_up, attach_vm_port, bridge_exists, bridge_vlan_aware, create_bridge, delete_link,
    fdb_point, link_exists, link_mtu, link_stats, set_mtu, set_port_vlan, LinkStats,
};
pub use tap::{create_tap, open_tap, open_vhost};

/// Creates `tap` for a NIC with MAC `mac`, sending only from that MAC (see `guard`); not
/// yet on a bridge; `owner` (uid, gid) may attach to it. The tap is removed again if the
/// rule cannot be set.
pub async fn create_guarded_tap(
    tap: &str,
    mac: &str,
    owner: Option<(u32, u32)>,
) -> Result<(), NetError> {
    create_tap(tap, owner)?;
    if let Err(e) = guard_tap(tap, mac).await {
        let _ = delete_link(tap).await;
        return Err(e);
    }
    Ok(())
}

/// Removes a VM's tap and its MAC rule.
pub async fn delete_tap(tap: &str) -> Result<(), NetError> {
    unguard_tap(tap).await;
    delete_link(tap).await
}

/// The tap of NIC `nic` of VM `vm_id` (at most 15 bytes for ids below 10^8).
pub fn tap_name(vm_id: u32, nic: usize) -> String {
    format!("tap{vm_id}i{nic}")
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("Open /dev/net/tun")]
    OpenTun(#[source] std::io::Error),
    #[error("Create tap {name}")]
    CreateTap {
        name: String,
        #[source]
        source: nix::Error,
    },
    #[error("Open netlink socket")]
    Netlink(#[source] std::io::Error),
    #[error("{op} {name}")]
    Link {
        op: &'static str,
        name: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("MAC filter (nftables): {reason}")]
    Guard { reason: String },
    #[error("No network interface {0}")]
    NoSuchLink(String),
    #[error("Send an announcement out of {ifname}")]
    Announce {
        ifname: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is not a bridge")]
    NotABridge(String),
    #[error(
        "bridge {0} is not VLAN-aware: `ip link set {0} type bridge vlan_filtering 1` (and let its uplink carry the VLANs: `bridge vlan add dev UPLINK vid 2-4094`)"
    )]
    NotVlanAware(String),
}

#[cfg(test)]
mod tests {
    #[test]
    fn tap_names_fit_ifnamsiz() {
        assert_eq!(super::tap_name(100, 0), "tap100i0");
        assert!(super::tap_name(99_999_999, 15).len() <= 15);
    }
}
