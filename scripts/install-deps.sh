#!/usr/bin/env bash
# Installs every system package Tideline's demo, tests and benchmarks need,
# on Debian bookworm (the project's machines). Idempotent; run as root.
#
#   e2fsprogs   mkfs.ext4 and debugfs build the sample disks
#   util-linux  losetup for the block-device tests
#   b3sum rsync zstd   the tools the benchmark compares against
#   qemu-utils  qemu-img for image comparisons (kept from backports if present)
#   nbdkit libnbd-bin   NBD servers and references (nbdinfo, nbdcopy) for the
#               NBD client's tests
#   python3     the demo and benchmark drivers
#   mmdebstrap dpkg-dev systemd   the packaging test: a bookworm chroot,
#               dpkg-shlibdeps for build-deb.sh, systemd-analyze verify
set -euo pipefail

PACKAGES=(e2fsprogs util-linux b3sum rsync zstd python3 procps nbdkit libnbd-bin mmdebstrap dpkg-dev systemd)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# qemu-img may come from backports under the same package name; only install
# it when the command is absent, so a newer backported build is kept.
command -v qemu-img >/dev/null || missing+=(qemu-utils)

if [ "${#missing[@]}" -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
echo "dependencies present: ${PACKAGES[*]} qemu-img"
