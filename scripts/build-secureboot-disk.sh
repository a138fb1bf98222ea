#!/usr/bin/env bash
# Builds a disk that boots the tiny test guest through UEFI Secure Boot, cached in
# ${FERRY_GUEST_DIR:-/var/cache/ferry/guest}/secureboot:
#   esp.img   a GPT disk with one EFI system partition (FAT32): Debian's shim signed by
#             Microsoft as EFI/BOOT/BOOTX64.EFI, Debian's signed GRUB beside it, the
#             Debian-signed cloud kernel and the test guest's initramfs (scripts/build-guest.sh)
#   vmlinuz   that kernel as Debian signed it (a bzImage: boots directly through the
#             firmware's loader, where the guest's ACPI tables — and so its TPM — are found)
# Every signed piece comes from Debian's packages (shim-signed, grub-efi-amd64-signed,
# linux-image-cloud-amd64), fetched with apt-get download, never installed.
# Idempotent: rebuilds only when the inputs changed.
set -euo pipefail
guest=${FERRY_GUEST_DIR:-/var/cache/ferry/guest}
out=$guest/secureboot
[ -f "$guest/initrd.img" ] || { echo "build-secureboot-disk: no test guest in $guest (scripts/build-guest.sh first)" >&2; exit 1; }
mkdir -p "$out"

pkg() { apt-cache depends "$1" 2>/dev/null | sed -n "s/.*Depends: \($2[^:]*\).*$/\1/p" | head -1; }
kpkg=$(pkg linux-image-cloud-amd64 'linux-image-[0-9]')
[ -n "$kpkg" ] || { echo "build-secureboot-disk: cannot resolve the cloud kernel package (apt-get update?)" >&2; exit 1; }
ver() { apt-cache policy "$1" 2>/dev/null | sed -n 's/^ *Candidate: //p'; }
stamp="$kpkg shim $(ver shim-signed) grub $(ver grub-efi-amd64-signed) $(cat "$guest/initrd.img" "$0" | sha256sum | cut -c1-16)"
if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ] && [ -f "$out/esp.img" ] && [ -f "$out/vmlinuz" ]; then
  echo "build-secureboot-disk: cached ($stamp) in $out"
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
echo "build-secureboot-disk: downloading $kpkg, shim-signed, grub-efi-amd64-signed"
apt-get download -q "$kpkg" shim-signed grub-efi-amd64-signed >/dev/null 2>&1 \
  || apt-get download -q "$kpkg" shim-signed grub-efi-amd64-signed
for f in ./*.deb; do dpkg-deb -x "$f" root; done
kver=${kpkg#linux-image-}
shim=root/usr/lib/shim/shimx64.efi.signed
grub=root/usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed
kernel=root/boot/vmlinuz-$kver
for f in "$shim" "$grub" "$kernel"; do
  [ -f "$f" ] || { echo "build-secureboot-disk: $f missing from the packages" >&2; exit 1; }
done

# Debian's signed GRUB has its prefix built in: it reads /EFI/debian/grub.cfg of the ESP.
cat > grub.cfg <<'CFG'
set timeout=0
linux /vmlinuz console=ttyS0 ferry.hostname=secureboot
initrd /initrd.img
boot
CFG
size_mib=64
truncate -s ${size_mib}M esp.img
printf 'label: gpt\nstart=2048, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name="EFI system partition"\n' | sfdisk -q esp.img
# the partition: from sector 2048 to the backup GPT (33 sectors at the end)
blocks=$(( (size_mib * 2048 - 2048 - 34) / 2 ))
mkfs.fat -F 32 -n FERRY-ESP --offset 2048 esp.img "$blocks" >/dev/null
export MTOOLS_SKIP_CHECK=1
p="esp.img@@1M"
mmd -i "$p" ::/EFI ::/EFI/BOOT ::/EFI/debian
mcopy -i "$p" "$shim" ::/EFI/BOOT/BOOTX64.EFI
mcopy -i "$p" "$grub" ::/EFI/BOOT/grubx64.efi
mcopy -i "$p" grub.cfg ::/EFI/debian/grub.cfg
mcopy -i "$p" "$kernel" ::/vmlinuz
mcopy -i "$p" "$guest/initrd.img" ::/initrd.img

install -m 0644 esp.img "$out/esp.img.tmp" && mv "$out/esp.img.tmp" "$out/esp.img"
install -m 0644 "$kernel" "$out/vmlinuz.tmp" && mv "$out/vmlinuz.tmp" "$out/vmlinuz"
echo "$stamp" > "$out/stamp"
echo "build-secureboot-disk: built $out (kernel $kver)"
