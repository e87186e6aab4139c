#!/usr/bin/env bash
# Unpacks the QEMU that the live-migration tests run on: Debian's QEMU 10.0 from
# bookworm-backports, into target/migration-qemu/ (nothing installed over the system's QEMU 7.2,
# which every other test uses).
#
# Why a second QEMU: QEMU 7.2 under TCG corrupts the destination guest of a migration now and then
# whatever the backend (measured side by side: qemu-storage-daemon, QEMU's own virtio-blk, DPDK's
# vhost-user-net; see README, Live migration), so its migrations cannot prove anything about ours.
# The same tests pass on 10.0. Set BULKHEAD_MIGRATION_QEMU=qemu-system-x86_64 to run them on 7.2.
#
# Prints the wrapper's path. Idempotent: exits at once when the wrapper exists. Needs root for apt.
set -euo pipefail
cd "$(dirname "$0")/.."

dir=target/migration-qemu
wrapper=$dir/qemu-system-x86_64
if [[ -x $wrapper ]]; then
  echo "$wrapper"
  exit 0
fi

# bookworm-backports next to the bookworm entry, from the same mirror. apt gives backports a
# priority of 100, so nothing on the system is upgraded from it unless asked by name.
has_backports() {
  apt-get indextargets --no-release-info --format '$(TARGET_OF) $(RELEASE)' 2>/dev/null |
    grep -x 'deb bookworm-backports' >/dev/null  # not -q: an early exit could SIGPIPE apt
}
if ! has_backports; then
  mirror=$(apt-get indextargets --no-release-info --format '$(TARGET_OF) $(RELEASE) $(REPO_URI)' 2>/dev/null |
    awk '$1 == "deb" && $2 == "bookworm" { print $3; exit }')
  mirror=${mirror:-http://deb.debian.org/debian/}
  echo "deb $mirror bookworm-backports main" > /etc/apt/sources.list.d/bulkhead-bookworm-backports.list
  apt-get update -qq
fi

packages=(qemu-system-x86 qemu-system-common qemu-system-data seabios)
debs=$(mktemp -d)
trap 'rm -rf "$debs"' EXIT
chown _apt "$debs" 2> /dev/null || true  # apt downloads as _apt where it can
(cd "$debs" && apt-get download -qq "${packages[@]/%//bookworm-backports}")

# Its shared libraries come from bookworm itself (that is what a backport is built against);
# install the ones the system's QEMU did not already bring.
libs=$(dpkg-deb -f "$debs"/qemu-system-x86_*.deb Depends | tr ',' '\n' |
  sed -E 's/^ *//; s/ .*//; s/\|.*//' | grep -Ev '^(qemu-|seabios|ipxe)' | sort -u)
missing=()
for p in $libs; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

rm -rf "$dir"
mkdir -p "$dir/root"
for deb in "$debs"/*.deb; do
  dpkg-deb -x "$deb" "$dir/root"
done
root=$(cd "$dir/root" && pwd)
# QEMU looks for its firmware (SeaBIOS, the linuxboot option ROMs) in the data directories -L
# names, before the system's 7.2 ones; its modules are looked up next to the binary's package.
cat > "$wrapper.tmp" << EOF
#!/bin/sh
# QEMU 10.0 from bookworm-backports, unpacked by tests/migration-qemu.sh.
exec "$root/usr/bin/qemu-system-x86_64" -L "$root/usr/share/seabios" -L "$root/usr/share/qemu" "\$@"
EOF
chmod +x "$wrapper.tmp"
"$wrapper.tmp" --version | head -n 1 >&2
mv "$wrapper.tmp" "$wrapper"
echo "$wrapper"
