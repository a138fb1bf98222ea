#!/usr/bin/env bash
# Builds a real Debian 12 guest with systemd (cgroup v2), cached outside the repo in
# ${FERRY_GUEST_DIR:-/var/cache/ferry/guest}/debian: the host a package test installs
# ferry's .deb into (crates/ferry/tests/package.rs). From Debian's packages only:
# debootstrap (minbase) + systemd, dbus, the generic kernel (its initramfs with
# MODULES=most), and ferry's runtime dependencies — QEMU 10 from bookworm-backports,
# qemu-utils, etcd-server, OVMF, nftables, iproute2 — so the .deb installs offline.
#   disk.qcow2  the root filesystem (ext4, LABEL=root)
#   vmlinuz, initrd.img  for direct kernel boot (root=LABEL=root console=ttyS0)
# At each boot `ferry-test-runner.service` mounts the disk labelled `work` at /work, if
# there is one, and runs /work/run.sh with its output on the serial console.
# Idempotent: rebuilds only when this script changed. ~5-8 min on 2 cores.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
out=${FERRY_GUEST_DIR:-/var/cache/ferry/guest}/debian
stamp="$(sha256sum "$0" | cut -c1-16)"
if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ] && [ -f "$out/disk.qcow2" ]; then
  echo "build-debian-guest: cached ($stamp) in $out"
  exit 0
fi
command -v debootstrap >/dev/null || apt-get install -y -q --no-install-recommends debootstrap
mirror=http://deb.debian.org/debian

work=$(mktemp -d /var/tmp/ferry-debian.XXXXXX)
cleanup() {
  for m in proc sys dev/pts dev; do umount -l "$work/root/$m" 2>/dev/null || true; done
  rm -rf --one-file-system "$work"
}
trap cleanup EXIT
root=$work/root
echo "build-debian-guest: debootstrap bookworm (minbase) into $root"
debootstrap --variant=minbase \
  --include=systemd,systemd-sysv,udev,dbus,kmod,procps,iproute2,e2fsprogs,ca-certificates,initramfs-tools,adduser,less \
  bookworm "$root" "$mirror" >"$work/debootstrap.log" 2>&1 || { tail -30 "$work/debootstrap.log"; exit 1; }

mount -t proc proc "$root/proc"
mount -t sysfs sys "$root/sys"
mount --bind /dev "$root/dev"
mount --bind /dev/pts "$root/dev/pts"
cat > "$root/etc/apt/sources.list" <<EOF
deb $mirror bookworm main
deb $mirror bookworm-backports main
EOF
# no services start inside the chroot
printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"
chmod +x "$root/usr/sbin/policy-rc.d"
in_root() { chroot "$root" /usr/bin/env DEBIAN_FRONTEND=noninteractive "$@"; }
echo "build-debian-guest: kernel, QEMU 10 (backports), etcd, OVMF"
in_root apt-get update -q >/dev/null
in_root apt-get install -y -q --no-install-recommends linux-image-amd64 >"$work/kernel.log" 2>&1 || { tail -30 "$work/kernel.log"; exit 1; }
in_root apt-get install -y -q --no-install-recommends -t bookworm-backports qemu-system-x86 qemu-utils >"$work/qemu.log" 2>&1 || { tail -30 "$work/qemu.log"; exit 1; }
in_root apt-get install -y -q --no-install-recommends etcd-server ovmf nftables >"$work/deps.log" 2>&1 || { tail -30 "$work/deps.log"; exit 1; }
in_root apt-get clean
rm -f "$root/usr/sbin/policy-rc.d"

echo debian-host > "$root/etc/hostname"
echo 'LABEL=root / ext4 defaults,errors=remount-ro 0 1' > "$root/etc/fstab"
in_root passwd -d root >/dev/null
# etcd's packaged service stays off: ferry runs its own member
in_root systemctl disable etcd.service >/dev/null 2>&1 || true
mkdir -p "$root/var/log/journal"
cat > "$root/usr/local/sbin/ferry-test-runner" <<'EOF'
#!/bin/sh
# Runs /work/run.sh from the disk labelled "work", if any (the package test's script).
mkdir -p /work
mount LABEL=work /work 2>/dev/null || exit 0
[ -x /work/run.sh ] || exit 0
exec /work/run.sh >/dev/ttyS0 2>&1
EOF
chmod +x "$root/usr/local/sbin/ferry-test-runner"
cat > "$root/etc/systemd/system/ferry-test-runner.service" <<'EOF'
[Unit]
Description=ferry's package test: /work/run.sh from the disk labelled work
After=multi-user.target
[Service]
Type=simple
ExecStart=/usr/local/sbin/ferry-test-runner
[Install]
WantedBy=multi-user.target
EOF
in_root systemctl enable ferry-test-runner.service >/dev/null 2>&1
kver=$(ls "$root/lib/modules" | head -1)
umount -l "$root/dev/pts" "$root/dev" "$root/sys" "$root/proc"

mkdir -p "$out"
cp "$root/boot/vmlinuz-$kver" "$out/vmlinuz.new"
cp "$root/boot/initrd.img-$kver" "$out/initrd.img.new"
chmod 0644 "$out/vmlinuz.new" "$out/initrd.img.new"
echo "build-debian-guest: ext4 image"
truncate -s 4G "$work/disk.raw"
mkfs.ext4 -q -L root -d "$root" "$work/disk.raw"
qemu-img convert -O qcow2 "$work/disk.raw" "$out/disk.qcow2.new"
mv "$out/vmlinuz.new" "$out/vmlinuz"
mv "$out/initrd.img.new" "$out/initrd.img"
mv "$out/disk.qcow2.new" "$out/disk.qcow2"
echo "$stamp" > "$out/stamp"
echo "build-debian-guest: done ($(du -sh "$out/disk.qcow2" | cut -f1)) in $out"
