#!/usr/bin/env bash
# Installs what Bulkhead's tests and demo need on a fresh Debian bookworm machine (run as root).
# The guest kernel is fetched by the test kit itself (apt-get download, cached under target/).
set -euo pipefail
packages=(
  qemu-system-x86      # QEMU 7.2, the VMM the daemons serve
  qemu-utils
  busybox-static       # the guest's userland
  iproute2             # TAP devices and network namespaces
  systemd              # systemd-analyze, systemd-socket-activate
  xz-utils zstd        # in case guest kernel modules are compressed
  ca-certificates
  g++                  # libFuzzer (cargo fuzz, the fuzz step of run-tests.sh) is C++
  python3-prometheus-client  # the control-socket test parses `stats --prometheus` with it
  libvirt-daemon-system libvirt-clients  # the libvirt domain test (libvirtd started by the test)
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# QEMU 10.0 from bookworm-backports, unpacked under target/ for the live-migration tests only
# (QEMU 7.2's TCG migrations corrupt guests whatever the backend; see the script).
bash "$(dirname "$0")/migration-qemu.sh" > /dev/null
# QEMU's contrib vhost-user-blk, the block benchmark's libvhost-user peer (built once, cached in target/).
bash "$(dirname "$0")/peers/build-contrib-vhost-user-blk.sh"
# libvirtd re-probes QEMU's capabilities on every lookup (about a minute per `virsh define`) when
# /dev/kvm is not the kvm group's, as udev makes it on a Debian host; set it as udev would.
if [ -c /dev/kvm ] && getent group kvm > /dev/null; then
  chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
fi
