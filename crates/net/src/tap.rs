//! Persistent taps through the tun driver's ioctls.

use crate::NetError;
use std::os::fd::AsRawFd;

nix::ioctl_write_ptr_bad!(tun_set_iff, libc::TUNSETIFF, libc::ifreq);
nix::ioctl_write_int_bad!(tun_set_persist, libc::TUNSETPERSIST);

/// Creates a persistent tap `name` (`IFF_TAP | IFF_NO_PI`, single queue: the flags QEMU
/// uses when it opens the tap by name). An existing tap of that name is reused.
pub fn create_tap(name: &str) -> Result<(), NetError> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(NetError::OpenTun)?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req
        .ifr_name
        .iter_mut()
        .zip(name.as_bytes().iter().take(libc::IFNAMSIZ - 1))
    {
        *d = *s as libc::c_char;
    }
    req.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    let err = |source| NetError::CreateTap {
        name: name.to_string(),
        source,
    };
    // SAFETY: the fd is an open tun device and req a valid ifreq.
    unsafe { tun_set_iff(f.as_raw_fd(), &req) }.map_err(err)?;
    // SAFETY: as above; TUNSETPERSIST takes an int.
    unsafe { tun_set_persist(f.as_raw_fd(), 1) }.map_err(err)?;
    Ok(())
}
