#!/usr/bin/env bash
# Builds the file-restore helper VM's image (`ferry backup files`), cached outside the
# repo in ${FERRY_GUEST_DIR:-/var/cache/ferry/guest}/file-restore:
#   vmlinux     the test guest's kernel
#   initrd.img  the test guest's initramfs with /ferry-file-restore appended (a second
#               cpio archive; the kernel unpacks both): the helper's program, a static
#               binary built here (crates/filerestore), which the guest's /init execs
#               when the kernel command line says ferry.restore=1
# `ferry serve --file-restore-image DIR` names the folder. Needs the test guest
# (scripts/build-guest.sh) and cargo. Idempotent: rebuilds when an input changed.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
guest=${FERRY_GUEST_DIR:-/var/cache/ferry/guest}
out=$guest/file-restore
mkdir -p "$out"
[ -f "$guest/vmlinux" ] && [ -f "$guest/initrd.img" ] || { echo "build-file-restore: no test guest in $guest (scripts/build-guest.sh)" >&2; exit 1; }

# A static binary (glibc, static-pie): it runs in the guest's busybox initramfs. Its
# own target folder, so the workspace's builds keep their flags.
target=x86_64-unknown-linux-gnu
(cd "$here" && RUSTFLAGS="-C target-feature=+crt-static" cargo build -q --release --locked \
  -p ferry-filerestore --bin ferry-file-restore --target "$target" --target-dir target/file-restore)
bin=$here/target/file-restore/$target/release/ferry-file-restore

stamp="$(cat "$bin" "$guest/vmlinux" "$guest/initrd.img" | sha256sum | cut -c1-16)"
if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ] && [ -f "$out/initrd.img" ] && [ -f "$out/vmlinux" ]; then
  echo "build-file-restore: cached ($stamp) in $out"
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
install -m 0755 "$bin" "$work/ferry-file-restore"
strip "$work/ferry-file-restore" 2>/dev/null || true
(cd "$work" && echo ferry-file-restore | cpio -o -H newc --quiet | gzip -1) > "$work/helper.cpio.gz"
cat "$guest/initrd.img" "$work/helper.cpio.gz" > "$work/initrd.img"
install -m 0644 "$work/initrd.img" "$out/initrd.img.tmp" && mv "$out/initrd.img.tmp" "$out/initrd.img"
install -m 0644 "$guest/vmlinux" "$out/vmlinux.tmp" && mv "$out/vmlinux.tmp" "$out/vmlinux"
echo "$stamp" > "$out/stamp"
echo "build-file-restore: built $out"
