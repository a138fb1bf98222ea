#!/usr/bin/env bash
# Builds the tiny test guest, cached outside the repo in ${FERRY_GUEST_DIR:-/var/cache/ferry/guest}:
#   vmlinux    the ELF kernel from Debian's cloud kernel package (boots directly, PVH)
#   initrd.img busybox-static + virtio (and vmxnet3) modules + scripts/guest-init
# With FERRY_GUEST_ARCH=aarch64: the same guest for arm64 (Debian's arm64 cloud kernel,
# busybox-static:arm64; the dpkg architecture arm64 added by setup.sh) in .../aarch64,
# its kernel `vmlinuz` (an Image, which QEMU boots directly); FERRY_GUEST_ARCH=riscv64
# likewise from Debian 13's riscv64 packages (Debian 12 has no riscv64; setup.sh adds a
# trixie source limited to riscv64) in .../riscv64.
# Idempotent: rebuilds only when the inputs changed (their contents, wherever the checkout is).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
arch=${FERRY_GUEST_ARCH:-x86_64}
case "$arch" in
  x86_64) deb=amd64; meta=linux-image-cloud-amd64; out=${FERRY_GUEST_DIR:-/var/cache/ferry/guest}; kfile=vmlinux ;;
  aarch64) deb=arm64; meta=linux-image-cloud-arm64; out=${FERRY_GUEST_DIR:-/var/cache/ferry/guest}/aarch64; kfile=vmlinuz ;;
  riscv64) deb=riscv64; meta=linux-image-riscv64; out=${FERRY_GUEST_DIR:-/var/cache/ferry/guest}/riscv64; kfile=vmlinuz ;;
  *) echo "build-guest: no test guest for $arch" >&2; exit 1 ;;
esac
mkdir -p "$out"

kpkg=$(apt-cache depends "$meta:$deb" 2>/dev/null | sed -n 's/.*Depends: \(linux-image-[0-9][^:]*\).*$/\1/p' | head -1)
[ -n "$kpkg" ] || { echo "build-guest: cannot resolve the $deb cloud kernel package (apt-get update?)" >&2; exit 1; }
stamp="$kpkg $(cat "$here/guest-init" "$0" | sha256sum | cut -c1-16)"
if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ] && [ -f "$out/$kfile" ] && [ -f "$out/initrd.img" ]; then
  echo "build-guest: cached ($stamp) in $out"
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
echo "build-guest: downloading $kpkg ($deb)"
apt-get download -q "$kpkg:$deb" >/dev/null
dpkg-deb -x ./linux-image-*.deb root
kver=${kpkg#linux-image-}
bz=root/boot/vmlinuz-$kver
[ -f "$bz" ] || bz=root/boot/vmlinux-$kver
# Debian 13 keeps modules under /usr/lib
[ -d root/lib/modules ] || { mkdir -p root/lib; mv root/usr/lib/modules root/lib/modules; }
if [ "$arch" = x86_64 ]; then

# The bzImage carries an LZ4 (legacy frame) compressed ELF vmlinux; extract it to boot it
# directly (PVH entry), skipping real-mode setup.
python3 - "$bz" vmlinux <<'PY'
import subprocess, sys
data = open(sys.argv[1], 'rb').read()
magic = b'\x02\x21\x4c\x18'
pos = data.find(magic)
while pos >= 0:
    p = subprocess.run(['lz4', '-dc'], input=data[pos:], capture_output=True)
    if p.stdout[:4] == b'\x7fELF':
        open(sys.argv[2], 'wb').write(p.stdout)
        sys.exit(0)
    pos = data.find(magic, pos + 1)
sys.exit('no LZ4-compressed ELF kernel found in ' + sys.argv[1])
PY
  busybox=/bin/busybox
else
  cp "$bz" vmlinuz
  apt-get download -q "busybox-static:$deb" >/dev/null
  dpkg-deb -x ./busybox-static_*.deb bb
  busybox=bb/bin/busybox
  [ -f "$busybox" ] || busybox=bb/usr/bin/busybox
fi

mkdir -p ird/bin ird/sbin ird/etc ird/proc ird/sys ird/dev ird/tmp ird/run ird/mnt ird/www/cgi-bin ird/lib/modules ird/root
cp "$busybox" ird/bin/busybox
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci failover net_failover \
         virtio_net vmxnet3 virtio_blk scsi_common scsi_mod sd_mod virtio_scsi virtio_console button evdev; do
  f=$(find root/lib/modules -name "$m.ko*" | head -1)
  [ -n "$f" ] || { echo "build-guest: module $m not in $kpkg (built in?)"; continue; }
  case "$f" in
    *.xz) xz -dc "$f" > "ird/lib/modules/$m.ko" ;;
    *.zst) zstd -dcq "$f" > "ird/lib/modules/$m.ko" ;;
    *) cp "$f" "ird/lib/modules/$m.ko" ;;
  esac
  echo "$m" >> ird/lib/modules/order
done
# The file-restore helper (scripts/build-file-restore.sh, `ferry backup files`) reads
# guests' filesystems: their modules, with what they depend on, loaded only in that mode
# (`order-restore`). ext4 is built into the cloud kernel.
python3 - root ird/lib/modules <<'PY'
import glob, lzma, os, re, sys
root, out = sys.argv[1], sys.argv[2]
want = ['crc32c_intel', 'libcrc32c', 'xfs', 'xxhash_generic', 'blake2b_generic', 'btrfs',
        'fat', 'vfat', 'nls_cp437', 'nls_iso8859_1', 'nls_utf8', 'isofs', 'udf', 'exfat']
files = {}
for f in glob.glob(root + '/lib/modules/**/*.ko*', recursive=True):
    files[os.path.basename(f).split('.ko')[0].replace('-', '_')] = f
order = []
def add(m):
    if m in order or m not in files:
        if m not in files:
            print('build-guest: module %s not in the kernel package (built in?)' % m)
        return
    f = files[m]
    d = open(f, 'rb').read()
    if f.endswith('.xz'):
        d = lzma.decompress(d)
    dep = re.search(rb'\0depends=([^\0]*)\0', d)
    for x in (dep.group(1).decode().split(',') if dep else []):
        if x:
            add(x.replace('-', '_'))
    if m not in order:
        open(os.path.join(out, m + '.ko'), 'wb').write(d)
        order.append(m)
for m in want:
    add(m)
open(os.path.join(out, 'order-restore'), 'w').write(''.join(m + '\n' for m in order))
PY
cp "$here/guest-init" ird/init
chmod +x ird/init
(cd ird && find . | cpio -o -H newc --quiet | gzip -1) > initrd.img

install -m 0644 "$kfile" "$out/$kfile.tmp" && mv "$out/$kfile.tmp" "$out/$kfile"
install -m 0644 initrd.img "$out/initrd.img.tmp" && mv "$out/initrd.img.tmp" "$out/initrd.img"
echo "$stamp" > "$out/stamp"
echo "build-guest: built $out (kernel $kver)"
