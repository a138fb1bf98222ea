//! Where the source sends a VM: built here from the destination's listed address, taking
//! only a port from the destination's answer. A URI handed to QEMU's `migrate` decides
//! what QEMU does (`exec:` runs a command, `unix:` and `file:` reach local files, another
//! host's address sends the guest's memory there), so a peer's answer never becomes one.

use crate::error::{AgentError, Failure, Result};
use std::net::IpAddr;

/// The port in the destination's answer (`tcp:HOST:PORT` for the migration stream,
/// `HOST:PORT` for the NBD server); anything else is refused with the reason.
pub(crate) fn answered_port(answer: &str, tcp_scheme: bool) -> Result<u16> {
    let refuse = || {
        AgentError::failed(
            Failure::Untrusted,
            format!(
                "the destination answered {answer:?}, not a {}HOST:PORT address",
                if tcp_scheme { "tcp:" } else { "" }
            ),
        )
    };
    let rest = if tcp_scheme {
        answer.strip_prefix("tcp:").ok_or_else(refuse)?
    } else {
        answer
    };
    let (_, port) = rest.rsplit_once(':').ok_or_else(refuse)?;
    match port.parse::<u16>() {
        Ok(p) if p > 0 && port.bytes().all(|b| b.is_ascii_digit()) => Ok(p),
        _ => Err(refuse()),
    }
}

/// `(host, port)` for QEMU: the member's listed address, which must be an IP address.
pub(crate) fn endpoint(address: &str, port: u16) -> Result<(String, u16)> {
    let ip: IpAddr = address.parse().map_err(|_| {
        AgentError::failed(
            Failure::Corrupt,
            format!("the destination's listed address {address:?} is not an IP address"),
        )
    })?;
    Ok((ip.to_string(), port))
}

/// The `migrate` URI to the destination: `tcp:` with its listed address.
pub(crate) fn migration_uri(address: &str, port: u16) -> Result<String> {
    let (host, port) = endpoint(address, port)?;
    Ok(if host.contains(':') {
        format!("tcp:[{host}]:{port}")
    } else {
        format!("tcp:{host}:{port}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_port_is_taken_from_the_peer() {
        assert_eq!(answered_port("tcp:10.0.0.12:49152", true).unwrap(), 49152);
        assert_eq!(answered_port("10.0.0.12:10809", false).unwrap(), 10809);
        for bad in [
            "exec:cat /etc/shadow > /tmp/x",
            "exec:x:1",
            "unix:/run/x.sock",
            "file:/etc/passwd",
            "tcp:10.0.0.12",
            "tcp:10.0.0.12:0",
            "tcp:10.0.0.12:+1",
            "tcp:10.0.0.12:70000",
            "rdma:10.0.0.12:4444",
        ] {
            assert!(answered_port(bad, true).is_err(), "{bad} accepted");
        }
        // A foreign host in the answer changes nothing: the listed address is used.
        let p = answered_port("tcp:203.0.113.9:4444", true).unwrap();
        assert_eq!(migration_uri("10.0.0.12", p).unwrap(), "tcp:10.0.0.12:4444");
        assert_eq!(migration_uri("fd00::2", 5).unwrap(), "tcp:[fd00::2]:5");
        assert!(migration_uri("exec:id", 5).is_err());
        assert!(migration_uri("host.example", 5).is_err());
    }
}
