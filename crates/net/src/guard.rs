//! A VM sends only with its own MAC: every tap's frames whose source MAC is not the
//! one of the VM's NIC are dropped before the bridge sees them (nftables, bridge family).
//! Without it a guest could take a host's or another VM's MAC on the bridge and receive
//! its traffic.
//!
//! ```text
//! table bridge ferry {
//!   map taps { type ifname : verdict; }                 # tap → its chain
//!   chain vm-source-macs { hook prerouting; iifname vmap @taps }
//!   chain tap100i0 { ether saddr != 52:54:00:12:34:56 drop }
//! }
//! ```
//! Each change is one `nft -f -` transaction; names and MACs are checked before they are
//! written into it.

use crate::NetError;
use std::process::Stdio;
use tokio::io::AsyncWriteExt;

const BASE: &str = "add table bridge ferry
add map bridge ferry taps { type ifname : verdict; }
add chain bridge ferry vm-source-macs { type filter hook prerouting priority -200; policy accept; }
flush chain bridge ferry vm-source-macs
add rule bridge ferry vm-source-macs iifname vmap @taps
";

async fn nft(script: &str) -> Result<(), NetError> {
    let err = |reason: String| NetError::Guard { reason };
    let mut child = tokio::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| err(format!("run nft (package nftables): {e}")))?;
    if let Some(mut i) = child.stdin.take() {
        i.write_all(script.as_bytes())
            .await
            .map_err(|e| err(format!("write to nft: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| err(format!("nft: {e}")))?;
    if !out.status.success() {
        return Err(err(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    Ok(())
}

fn tap_ok(tap: &str) -> bool {
    !tap.is_empty() && tap.len() <= 15 && tap.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// `aa:bb:cc:dd:ee:ff`, hex digits only, and not a multicast address.
fn mac_ok(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
        && u8::from_str_radix(parts[0], 16).is_ok_and(|b| b & 1 == 0)
}

/// The script that lets `tap` send only from `mac` (idempotent).
fn guard_script(tap: &str, mac: &str) -> Result<String, NetError> {
    if !tap_ok(tap) || !mac_ok(mac) {
        return Err(NetError::Guard {
            reason: format!("refusing tap {tap:?} / MAC {mac:?}"),
        });
    }
    let mac = mac.to_ascii_lowercase();
    Ok(format!(
        "{BASE}add chain bridge ferry {tap}
flush chain bridge ferry {tap}
add rule bridge ferry {tap} ether saddr != {mac} counter drop
add element bridge ferry taps {{ \"{tap}\" : jump {tap} }}
"
    ))
}

/// Lets `tap` send only frames from `mac`. Call before the tap joins its bridge.
pub async fn guard_tap(tap: &str, mac: &str) -> Result<(), NetError> {
    nft(&guard_script(tap, mac)?).await
}

/// Forgets `tap`'s rule (best effort: a missing rule is no error).
pub async fn unguard_tap(tap: &str) {
    if !tap_ok(tap) {
        return;
    }
    let script = format!(
        "delete element bridge ferry taps {{ \"{tap}\" }}\ndelete chain bridge ferry {tap}\n"
    );
    if let Err(e) = nft(&script).await {
        tracing::debug!(tap, error = %e, "no MAC rule to remove");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_checked_names_and_macs_reach_the_script() {
        let s = guard_script("tap100i0", "52:54:00:AB:cd:01").unwrap();
        assert!(s.contains("ether saddr != 52:54:00:ab:cd:01 counter drop"));
        assert!(s.contains("\"tap100i0\" : jump tap100i0"));
        for (tap, mac) in [
            ("tap1; flush ruleset", "52:54:00:00:00:01"),
            ("tap100i0", "52:54:00:00:00:01 accept"),
            ("tap100i0", "52:54:00:00:00"),
            ("tap100i0", "01:00:5e:00:00:01"),
            ("", "52:54:00:00:00:01"),
            ("averyveryverylongtap", "52:54:00:00:00:01"),
        ] {
            assert!(guard_script(tap, mac).is_err(), "{tap} {mac}");
        }
    }
}
