//! Gratuitous RARP frames (what QEMU sends after a migration), sent by the host out of
//! a bridge so that the LAN's switches learn that a MAC now lives behind this host.
//! Sent by the destination at the pause before switchover, frames for the VM reach the
//! destination's tap (queued there until the guest runs) instead of the paused source.

use crate::NetError;
use std::os::fd::AsRawFd;

/// The RARP request QEMU's announce sends: broadcast, sender and target MAC = `mac`.
pub fn rarp_frame(mac: [u8; 6]) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x80, 0x35]); // RARP
    f.extend_from_slice(&[0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x03]); // ether/IPv4, reverse request
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.resize(60, 0);
    f
}

/// Sends one RARP frame for `mac` out of interface `ifname` (a bridge: it floods it to
/// every port, the uplink included).
pub fn announce_mac(ifname: &str, mac: [u8; 6]) -> Result<(), NetError> {
    let io = |source: std::io::Error| NetError::Announce {
        ifname: ifname.to_string(),
        source,
    };
    let index = nix::net::if_::if_nametoindex(ifname)
        .map_err(|_| NetError::NoSuchLink(ifname.to_string()))?;
    let fd = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Packet,
        nix::sys::socket::SockType::Raw,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| io(e.into()))?;
    // SAFETY: sockaddr_ll is plain old data; all-zero is valid before the fields are set.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = u16::try_from(libc::AF_PACKET).expect("AF_PACKET is 17");
    addr.sll_protocol = 0x8035u16.to_be();
    addr.sll_ifindex = index as i32;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    let frame = rarp_frame(mac);
    // SAFETY: fd is an open packet socket; frame and addr outlive the call and the
    // lengths passed are theirs.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&addr as *const libc::sockaddr_ll).cast(),
            libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_ll>())
                .expect("sockaddr_ll is 20 bytes"),
        )
    };
    if n < 0 {
        return Err(io(std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rarp_frame_is_what_qemu_sends() {
        let mac = [0x52, 0x54, 0, 1, 2, 3];
        let f = rarp_frame(mac);
        assert_eq!(f.len(), 60);
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &mac);
        assert_eq!(&f[12..14], &[0x80, 0x35]);
        assert_eq!(&f[20..22], &[0, 3]);
        assert_eq!(&f[22..28], &mac);
        assert_eq!(&f[32..38], &mac);
    }
}
