//! Links over rtnetlink: bridges, attach, up, delete; statistics from sysfs.

use crate::NetError;
use futures::TryStreamExt;
use rtnetlink::{Handle, LinkBridge, LinkBridgeVlan, LinkUnspec};
use std::path::Path;

fn connect() -> Result<Handle, NetError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(NetError::Netlink)?;
    tokio::spawn(conn);
    Ok(handle)
}

async fn index(h: &Handle, name: &str) -> Result<u32, NetError> {
    let mut links = h.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(m)) => Ok(m.header.index),
        Ok(None) | Err(_) => Err(NetError::NoSuchLink(name.to_string())),
    }
}

fn bridge_mac() -> Vec<u8> {
    let mut mac: [u8; 6] = rand::random();
    mac[0] = (mac[0] & 0xfc) | 0x02; // unicast, locally administered
    mac.to_vec()
}

pub fn link_exists(name: &str) -> bool {
    !name.contains('/') && Path::new("/sys/class/net").join(name).exists()
}

pub fn bridge_exists(name: &str) -> bool {
    !name.contains('/')
        && Path::new("/sys/class/net")
            .join(name)
            .join("bridge")
            .exists()
}

/// Creates bridge `name` and brings it up (no error if it already exists as a bridge).
/// Its MAC is set at creation (locally administered, random): a bridge whose MAC is not
/// set takes the lowest MAC of its ports, so every VM tap added could change the MAC
/// under the neighbours' ARP caches.
pub async fn create_bridge(name: &str) -> Result<(), NetError> {
    if bridge_exists(name) {
        return Ok(());
    }
    let h = connect()?;
    h.link()
        .add(LinkBridge::new(name).address(bridge_mac()).build())
        .execute()
        .await
        .map_err(|source| NetError::Link {
            op: "Create bridge",
            name: name.to_string(),
            source,
        })
}

/// Attaches `link` to `bridge` and brings it up.
pub async fn attach_up(link: &str, bridge: &str) -> Result<(), NetError> {
    if !bridge_exists(bridge) {
        return Err(NetError::NotABridge(bridge.to_string()));
    }
    let h = connect()?;
    let br = index(&h, bridge).await?;
    let idx = index(&h, link).await?;
    h.link()
        .set(LinkUnspec::new_with_index(idx).controller(br).up().build())
        .execute()
        .await
        .map_err(|source| NetError::Link {
            op: "Attach to bridge",
            name: link.to_string(),
            source,
        })
}

/// Deletes a link; a link that is already gone is not an error.
pub async fn delete_link(name: &str) -> Result<(), NetError> {
    let h = connect()?;
    let idx = match index(&h, name).await {
        Ok(i) => i,
        Err(NetError::NoSuchLink(_)) => return Ok(()),
        Err(e) => return Err(e),
    };
    h.link()
        .del(idx)
        .execute()
        .await
        .map_err(|source| NetError::Link {
            op: "Delete link",
            name: name.to_string(),
            source,
        })
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
}

/// Counters of a link as the host sees them (a tap's rx is the guest's tx).
pub fn link_stats(name: &str) -> Option<LinkStats> {
    if name.contains('/') {
        return None;
    }
    let dir = Path::new("/sys/class/net").join(name).join("statistics");
    let read = |f: &str| -> Option<u64> {
        std::fs::read_to_string(dir.join(f))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    Some(LinkStats {
        rx_bytes: read("rx_bytes")?,
        tx_bytes: read("tx_bytes")?,
        rx_packets: read("rx_packets")?,
        tx_packets: read("tx_packets")?,
    })
}

/// Points `mac` at port `link` in the forwarding table of the bridge `link` is in
/// (`bridge fdb replace MAC dev LINK master dynamic`): frames for the MAC arriving at
/// that bridge go to `link`, whatever the bridge learned before.
pub async fn fdb_point(link: &str, mac: [u8; 6]) -> Result<(), NetError> {
    use rtnetlink::packet_route::neighbour::{NeighbourFlags, NeighbourState};
    let h = connect()?;
    let idx = index(&h, link).await?;
    h.neighbours()
        .add_bridge(idx, &mac)
        .state(NeighbourState::Reachable)
        .flags(NeighbourFlags::Controller)
        .replace()
        .execute()
        .await
        .map_err(|source| NetError::Link {
            op: "Point the bridge's forwarding entry at",
            name: link.to_string(),
            source,
        })
}

/// A bridge's setting under `/sys/class/net/BRIDGE/bridge/`.
fn bridge_attr(bridge: &str, attr: &str) -> Option<String> {
    if bridge.contains('/') {
        return None;
    }
    std::fs::read_to_string(
        Path::new("/sys/class/net")
            .join(bridge)
            .join("bridge")
            .join(attr),
    )
    .ok()
    .map(|s| s.trim().to_string())
}

/// Whether `bridge` filters by VLAN (`vlan_filtering 1`): only then can a port be put
/// in one VLAN.
pub fn bridge_vlan_aware(bridge: &str) -> bool {
    bridge_attr(bridge, "vlan_filtering").as_deref() == Some("1")
}

/// A link's MTU.
pub fn link_mtu(name: &str) -> Option<u32> {
    if name.contains('/') {
        return None;
    }
    std::fs::read_to_string(Path::new("/sys/class/net").join(name).join("mtu"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Sets a link's MTU.
pub async fn set_mtu(link: &str, mtu: u32) -> Result<(), NetError> {
    let h = connect()?;
    let idx = index(&h, link).await?;
    h.link()
        .change(LinkUnspec::new_with_index(idx).mtu(mtu).build())
        .execute()
        .await
        .map_err(|source| NetError::Link {
            op: "Set the MTU of",
            name: link.to_string(),
            source,
        })
}

/// Makes bridge port `link` an untagged member of VLAN `vid` alone (`bridge vlan add
/// dev LINK vid VID pvid untagged`, then the bridge's default VLAN taken away): what enters
/// from it belongs to `vid`, what leaves to it is `vid`'s, untagged.
pub async fn set_port_vlan(link: &str, vid: u16) -> Result<(), NetError> {
    use rtnetlink::packet_route::link::BridgeVlanInfoFlags as F;
    let h = connect()?;
    let idx = index(&h, link).await?;
    let err = |op| {
        let name = link.to_string();
        move |source| NetError::Link { op, name, source }
    };
    h.link()
        .set(
            LinkBridgeVlan::new(idx)
                .vlan(vid, F::Pvid | F::Untagged)
                .build(),
        )
        .execute()
        .await
        .map_err(err("Put in its VLAN"))?;
    // The VLAN a new port joins (the bridge's default PVID, 1 unless changed), taken
    // away: its broadcasts must not reach the guest.
    let master = std::fs::read_link(Path::new("/sys/class/net").join(link).join("master"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    let default = master
        .and_then(|b| bridge_attr(&b, "default_pvid"))
        .and_then(|v| v.parse::<u16>().ok())
        .unwrap_or(1);
    if default != 0 && default != vid {
        h.link()
            .del_with_message(LinkBridgeVlan::new(idx).vlan(default, F::empty()).build())
            .execute()
            .await
            .map_err(err("Take the bridge's default VLAN from"))?;
    }
    Ok(())
}

/// Puts a VM's tap on `bridge`, up: with the bridge's MTU first (a port with a smaller
/// one would shrink the bridge's for every port), then in VLAN `vlan` when given.
pub async fn attach_vm_port(tap: &str, bridge: &str, vlan: Option<u16>) -> Result<(), NetError> {
    if let (Some(b), Some(t)) = (link_mtu(bridge), link_mtu(tap)) {
        if b != t {
            set_mtu(tap, b).await?;
        }
    }
    attach_up(tap, bridge).await?;
    if let Some(v) = vlan {
        if !bridge_vlan_aware(bridge) {
            return Err(NetError::NotVlanAware(bridge.to_string()));
        }
        set_port_vlan(tap, v).await?;
    }
    Ok(())
}
