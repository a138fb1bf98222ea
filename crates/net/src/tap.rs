//! Persistent taps through the tun driver's ioctls.

use crate::NetError;
use std::os::fd::AsRawFd;

nix::ioctl_write_ptr_bad!(tun_set_iff, libc::TUNSETIFF, libc::ifreq);
nix::ioctl_write_int_bad!(tun_set_persist, libc::TUNSETPERSIST);
nix::ioctl_write_int_bad!(tun_set_owner, libc::TUNSETOWNER);
nix::ioctl_write_int_bad!(tun_set_group, libc::TUNSETGROUP);

/// Creates a persistent tap `name` (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, single queue:
/// the flags QEMU uses). An existing tap of that name is reused. `owner` (uid, gid): the
/// only unprivileged user that may attach to it (the VM's QEMU).
pub fn create_tap(name: &str, owner: Option<(u32, u32)>) -> Result<(), NetError> {
    let f = attach(name)?;
    let err = |source| NetError::CreateTap {
        name: name.to_string(),
        source,
    };
    if let Some((uid, gid)) = owner {
        // SAFETY: the fd is an open tun device attached to the tap; these take an int.
        unsafe { tun_set_owner(f.as_raw_fd(), uid as libc::c_int) }.map_err(err)?;
        // SAFETY: as above.
        unsafe { tun_set_group(f.as_raw_fd(), gid as libc::c_int) }.map_err(err)?;
    }
    // SAFETY: as above; TUNSETPERSIST takes an int.
    unsafe { tun_set_persist(f.as_raw_fd(), 1) }.map_err(err)?;
    Ok(())
}

/// An open descriptor on tap `name` (created if missing, not persistent then): what
/// QEMU gets as `-netdev tap,fd=N`, so it never opens `/dev/net/tun` itself.
pub fn open_tap(name: &str) -> Result<std::os::fd::OwnedFd, NetError> {
    Ok(attach(name)?.into())
}

/// `/dev/net/tun` attached to the tap `name` with QEMU's flags.
fn attach(name: &str) -> Result<std::fs::File, NetError> {
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
        libc::c_short::try_from(libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR)
            .expect("the tap flags fit ifr_flags");
    let err = |source| NetError::CreateTap {
        name: name.to_string(),
        source,
    };
    // SAFETY: the fd is an open tun device and req a valid ifreq.
    unsafe { tun_set_iff(f.as_raw_fd(), &req) }.map_err(err)?;
    Ok(f)
}

/// `/dev/vhost-net` opened for QEMU's `vhostfd=N` (KVM hosts), when the host has it.
pub fn open_vhost() -> Option<std::os::fd::OwnedFd> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/vhost-net")
        .ok()
        .map(Into::into)
}
