#!/usr/bin/env bash
# Installs everything ferry needs on a fresh Debian 12 machine, idempotently:
# QEMU 10 from bookworm-backports, busybox-static, OVMF, iproute2, nftables (VM MAC filters), etcd, hbal, fio, nbdkit, debootstrap, Chromium
# (the web UI's browser tests), Node.js/npm, the web UI (npm ci + build in ui/, from the
# lock file), the test guest (Debian cloud kernel + busybox initramfs), and a Debian 12
# guest with systemd (debootstrap) for the package test.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export DEBIAN_FRONTEND=noninteractive

need_pkgs=()
have() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
qemu_major() { qemu-system-x86_64 --version 2>/dev/null | sed -n 's/.*version \([0-9]*\)\..*/\1/p'; }

if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  echo "setup: adding bookworm-backports"
  cat > /etc/apt/sources.list.d/ferry-backports.sources <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  rm -f /var/lib/ferry-setup-apt-updated
fi

# Guests of other architectures (issue 22): arm64 packages for the aarch64 test guest;
# riscv64 ones from Debian 13 (Debian 12 has no riscv64), a source limited to riscv64 so
# nothing of this host's own architecture ever comes from it.
foreign_changed=0
for a in arm64 riscv64; do
  if ! dpkg --print-foreign-architectures | grep -qx "$a"; then
    dpkg --add-architecture "$a"
    foreign_changed=1
  fi
done
if [ ! -e /etc/apt/sources.list.d/ferry-riscv64.sources ]; then
  cat > /etc/apt/sources.list.d/ferry-riscv64.sources <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Architectures: riscv64
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  foreign_changed=1
fi
if [ "$foreign_changed" = 1 ]; then
  rm -f /var/lib/ferry-setup-apt-updated
  apt-get update -q
  touch /var/lib/ferry-setup-apt-updated
fi
for p in busybox-static ovmf qemu-efi-aarch64 iproute2 nftables iputils-ping curl cpio lz4 python3 python3-venv protobuf-compiler libprotobuf-dev etcd-server etcd-client ganeti-htools fio nbdkit chromium debootstrap swtpm mtools dosfstools fdisk; do have "$p" || need_pkgs+=("$p"); done
command -v npm >/dev/null 2>&1 || need_pkgs+=(nodejs npm)
q=$(qemu_major || true)
if [ -z "$q" ] || [ "$q" -lt 10 ] || ! have qemu-utils || ! command -v qemu-system-aarch64 >/dev/null || ! command -v qemu-system-riscv64 >/dev/null; then need_qemu=1; else need_qemu=0; fi

if [ ${#need_pkgs[@]} -gt 0 ] || [ "$need_qemu" = 1 ]; then
  if [ ! -e /var/lib/ferry-setup-apt-updated ]; then
    apt-get update -q
    touch /var/lib/ferry-setup-apt-updated
  fi
  if [ "$need_qemu" = 1 ]; then
    apt-get install -y -q -t bookworm-backports --no-install-recommends qemu-system-x86 qemu-system-arm qemu-system-riscv qemu-utils
  fi
  if [ ${#need_pkgs[@]} -gt 0 ]; then
    apt-get install -y -q --no-install-recommends "${need_pkgs[@]}"
  fi
fi

# ferry runs its own etcd member per host; the package's system service stays off.
if [ -d /run/systemd/system ] && systemctl is-enabled -q etcd 2>/dev/null; then
  systemctl disable --now etcd || true
fi

# Every VM's QEMU runs in this group, as a user of its own (uid 1900000000 + VM id):
# crates/agent/src/confine.rs.
getent group ferry-qemu >/dev/null || groupadd --system ferry-qemu

"$here/build-guest.sh"
FERRY_GUEST_ARCH=aarch64 "$here/build-guest.sh"
FERRY_GUEST_ARCH=riscv64 "$here/build-guest.sh"
"$here/build-file-restore.sh"
"$here/build-secureboot-disk.sh"
# A Debian 12 with systemd, QEMU and etcd: the host the package test installs ferry on.
"$here/build-debian-guest.sh"
# A Debian 12 cloud guest (cloud-init, qemu-guest-agent): what the guests test clones.
"$here/build-debian-cloud.sh"

# schemathesis (PyPI), pinned, in its own virtualenv: the API fuzz test runs it against
# a live daemon (crates/ferry/tests/api_fuzz.rs).
st=/var/cache/ferry/schemathesis
st_version=4.32.5
if ! "$st/bin/schemathesis" --version 2>/dev/null | grep -q "version $st_version"; then
  rm -rf "$st"
  mkdir -p /var/cache/ferry
  python3 -m venv "$st"
  "$st/bin/pip" install -q --disable-pip-version-check "schemathesis==$st_version"
fi

# The web UI: npm packages exactly as the lock file says (only when it changed), then
# the build into ui/dist, which `ferry serve` embeds.
ui="$here/../ui"
if [ ! -e "$ui/node_modules/.package-lock.json" ] || [ "$ui/package-lock.json" -nt "$ui/node_modules/.package-lock.json" ]; then
  (cd "$ui" && npm ci --no-audit --no-fund)
fi
(cd "$ui" && npm run --silent build)
