#!/usr/bin/env bash
# Builds a Debian 12 cloud guest, cached outside the repo in
# ${FERRY_GUEST_DIR:-/var/cache/ferry/guest}/debian-cloud: what admins run as templates —
# systemd, cloud-init (NoCloud: its seed is the disk labelled `cidata` ferry makes),
# qemu-guest-agent (started by udev when ferry's virtio-serial port appears),
# openssh-server, ifupdown (cloud-init's network renderer here). From Debian's packages
# only (debootstrap minbase). The tests of issue 22 clone it (crates/ferry/tests/cloud.rs).
#   disk.qcow2  the root filesystem (ext4, LABEL=root), no SSH host keys and no
#               machine-id: every clone makes its own at its first boot
#   vmlinuz, initrd.img  for direct kernel boot (root=LABEL=root console=ttyS0)
# Idempotent: rebuilds only when this script changed. ~4-6 min on 2 cores.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
out=${FERRY_GUEST_DIR:-/var/cache/ferry/guest}/debian-cloud
stamp="$(sha256sum "$0" | cut -c1-16)"
if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ] && [ -f "$out/disk.qcow2" ]; then
  echo "build-debian-cloud: cached ($stamp) in $out"
  exit 0
fi
command -v debootstrap >/dev/null || apt-get install -y -q --no-install-recommends debootstrap
mirror=http://deb.debian.org/debian

work=$(mktemp -d /var/tmp/ferry-debian-cloud.XXXXXX)
cleanup() {
  for m in proc sys dev/pts dev; do umount -l "$work/root/$m" 2>/dev/null || true; done
  rm -rf --one-file-system "$work"
}
trap cleanup EXIT
root=$work/root
echo "build-debian-cloud: debootstrap bookworm (minbase) into $root"
debootstrap --variant=minbase \
  --include=systemd,systemd-sysv,udev,dbus,kmod,procps,iproute2,e2fsprogs,ca-certificates,initramfs-tools,less,netbase \
  bookworm "$root" "$mirror" >"$work/debootstrap.log" 2>&1 || { tail -30 "$work/debootstrap.log"; exit 1; }

mount -t proc proc "$root/proc"
mount -t sysfs sys "$root/sys"
mount --bind /dev "$root/dev"
mount --bind /dev/pts "$root/dev/pts"
echo "deb $mirror bookworm main" > "$root/etc/apt/sources.list"
# no services start inside the chroot
printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"
chmod +x "$root/usr/sbin/policy-rc.d"
in_root() { chroot "$root" /usr/bin/env DEBIAN_FRONTEND=noninteractive "$@"; }
echo "build-debian-cloud: kernel, cloud-init, qemu-guest-agent, openssh-server"
in_root apt-get update -q >/dev/null
in_root apt-get install -y -q --no-install-recommends linux-image-amd64 >"$work/kernel.log" 2>&1 || { tail -30 "$work/kernel.log"; exit 1; }
in_root apt-get install -y -q --no-install-recommends \
  cloud-init qemu-guest-agent openssh-server ifupdown isc-dhcp-client sudo \
  >"$work/pkgs.log" 2>&1 || { tail -30 "$work/pkgs.log"; exit 1; }
in_root apt-get clean
rm -f "$root/usr/sbin/policy-rc.d"

echo debian > "$root/etc/hostname"
echo 'LABEL=root / ext4 defaults,errors=remount-ro 0 1' > "$root/etc/fstab"
# A template carries no identity: cloud-init makes the SSH host keys at each new
# instance, systemd the machine id at first boot.
rm -f "$root"/etc/ssh/ssh_host_*
: > "$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"
# Only the NoCloud seed ferry attaches (no network metadata services probed); ed25519
# and ECDSA host keys only (an RSA key takes tens of seconds under TCG).
cat > "$root/etc/cloud/cloud.cfg.d/90-ferry.cfg" <<'EOF'
datasource_list: [NoCloud, None]
ssh_genkeytypes: [ed25519, ecdsa]
EOF
# cloud-init's network config goes to interfaces.d
grep -q '^source /etc/network/interfaces.d/' "$root/etc/network/interfaces" 2>/dev/null ||
  echo 'source /etc/network/interfaces.d/*' >> "$root/etc/network/interfaces"
kver=$(ls "$root/lib/modules" | head -1)
umount -l "$root/dev/pts" "$root/dev" "$root/sys" "$root/proc"

mkdir -p "$out"
cp "$root/boot/vmlinuz-$kver" "$out/vmlinuz.new"
cp "$root/boot/initrd.img-$kver" "$out/initrd.img.new"
chmod 0644 "$out/vmlinuz.new" "$out/initrd.img.new"
echo "build-debian-cloud: ext4 image"
truncate -s 4G "$work/disk.raw"
mkfs.ext4 -q -L root -d "$root" "$work/disk.raw"
qemu-img convert -O qcow2 "$work/disk.raw" "$out/disk.qcow2.new"
mv "$out/vmlinuz.new" "$out/vmlinuz"
mv "$out/initrd.img.new" "$out/initrd.img"
mv "$out/disk.qcow2.new" "$out/disk.qcow2"
echo "$stamp" > "$out/stamp"
echo "build-debian-cloud: done ($(du -sh "$out/disk.qcow2" | cut -f1)) in $out"
