#!/usr/bin/env bash
# Builds the Debian package: target/debian/ferry_VERSION_amd64.deb — the `ferry` binary
# with the web UI built in, its systemd units (ferry.service, ferry-guests.service), the
# default /etc/ferry/ferry.toml, man pages and shell completions, the maintainer
# scripts; dependencies on Debian's QEMU 10 (bookworm-backports), qemu-utils,
# etcd-server, OVMF, iproute2 and nftables.
#
# Needs what `cargo build` and the UI's build need (scripts/setup.sh installs both). The
# same sources give the same package: files sorted, owned by root, dated by the last
# commit (SOURCE_DATE_EPOCH). FERRY_DEB_VERSION overrides the version (an upgrade test
# builds N+1 from the same tree), FERRY_BIN packs a binary built already, FERRY_DEB_OUT
# writes elsewhere than target/debian, FERRY_DEB_COMPRESS=gzip packs faster than xz.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

version="${FERRY_DEB_VERSION:-$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)}"
[[ "$version" =~ ^[0-9][0-9A-Za-z.+~-]*$ ]] || { echo "package.sh: bad version '$version'" >&2; exit 2; }
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}"

if [ ! -f ui/dist/index.html ]; then
  echo "== building the web UI"
  (cd ui && { [ -d node_modules ] || npm ci --no-audit --no-fund; } && npm run --silent build)
fi
if [ -n "${FERRY_BIN:-}" ]; then
  bin=$FERRY_BIN   # a binary built already (the package test's)
else
  echo "== cargo build --release -p ferry"
  cargo build --release -q -p ferry
  bin=target/release/ferry
fi

out=${FERRY_DEB_OUT:-target/debian}
root="$out/root"
rm -rf "$root"
install -d "$root/DEBIAN" "$root/usr/bin" "$root/lib/systemd/system" "$root/etc/ferry" \
  "$root/usr/share/man/man1" "$root/usr/share/bash-completion/completions" \
  "$root/usr/share/zsh/vendor-completions" "$root/usr/share/fish/vendor_completions.d" \
  "$root/usr/share/doc/ferry"
install -m 0755 "$bin" "$root/usr/bin/ferry"
strip --strip-unneeded "$root/usr/bin/ferry"
install -m 0644 packaging/debian/ferry.service packaging/debian/ferry-guests.service \
  "$root/lib/systemd/system/"
install -m 0644 packaging/debian/ferry.toml "$root/etc/ferry/ferry.toml"
"$bin" man "$root/usr/share/man/man1"
gzip -9n "$root"/usr/share/man/man1/*.1
"$bin" completions bash > "$root/usr/share/bash-completion/completions/ferry"
"$bin" completions zsh > "$root/usr/share/zsh/vendor-completions/_ferry"
"$bin" completions fish > "$root/usr/share/fish/vendor_completions.d/ferry.fish"
install -m 0644 README.md "$root/usr/share/doc/ferry/README.md"
cat > "$root/usr/share/doc/ferry/copyright" <<'EOF'
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: ferry
License: Apache-2.0
 On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.
EOF
for s in postinst prerm postrm; do
  install -m 0755 "packaging/debian/$s" "$root/DEBIAN/$s"
done
echo /etc/ferry/ferry.toml > "$root/DEBIAN/conffiles"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat > "$root/DEBIAN/control" <<EOF
Package: ferry
Version: $version
Architecture: amd64
Maintainer: ferry developers <ferry@localhost>
Installed-Size: $size
Depends: libc6 (>= 2.36), qemu-system-x86 (>= 1:10.0), qemu-utils (>= 1:10.0), etcd-server (>= 3.4), ovmf, iproute2, nftables, adduser
Recommends: etcd-client, swtpm
Section: admin
Priority: optional
Description: KVM virtualization cluster manager
 ferry runs VMs on QEMU/KVM across a cluster of hosts: live migration, HA
 restarts with fencing, DRS placement and balancing, shared and replicated
 storage, incremental host-side backups; a web UI, a REST API and a CLI.
 .
 QEMU 10 comes from bookworm-backports on Debian 12.
EOF
find "$root" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
deb="$out/ferry_${version}_amd64.deb"
dpkg-deb --root-owner-group "-Z${FERRY_DEB_COMPRESS:-xz}" --build "$root" "$deb" >/dev/null
echo "$deb"
