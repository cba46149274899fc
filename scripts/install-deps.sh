#!/usr/bin/env bash
# Installs every system package Tideline's demo, tests and benchmarks need,
# on Debian bookworm (the project's machines). Idempotent; run as root.
#
#   e2fsprogs   mkfs.ext4 and debugfs build the sample disks (and the
#               appliance's root file system, mkfs.ext4 -d)
#   util-linux  losetup for the block-device tests
#   b3sum rsync zstd   the tools the benchmark compares against
#   qemu-utils  qemu-img for image comparisons (kept from backports if present);
#               also the appliance's .qcow2 and streamOptimized .vmdk
#   nbdkit libnbd-bin   NBD servers and references (nbdinfo, nbdcopy) for the
#               NBD client's tests
#   python3     the demo and benchmark drivers
#   mmdebstrap dpkg-dev systemd   the packaging test: a bookworm chroot,
#               dpkg-shlibdeps for build-deb.sh, systemd-analyze verify; the
#               appliance's root file system (image-build/build.sh)
#   fdisk       sfdisk writes the appliance's GPT partition table
#   dosfstools mtools   the appliance's EFI system partition and the boot
#               test's NoCloud seed, made without mounting (mkfs.vfat, mcopy)
#   grub-pc-bin grub-efi-amd64-bin   GRUB images for the appliance's BIOS and
#               UEFI boot (grub-mkimage; nothing is installed on this host's
#               own boot path)
#   pigz        parallel gzip for the appliance's .raw.tar.gz
#   qemu-system-x86   the appliance boot test: QEMU in TCG mode; brings
#               SeaBIOS, the BIOS firmware (see below for qemu-utils)
#   ovmf        UEFI firmware for the appliance boot test (OVMF_CODE.fd)
#   clang libelf-dev zlib1g-dev pkg-config make   the agent's eBPF write
#               tracker: clang compiles the BPF program in agent/build.rs,
#               libbpf-sys builds libbpf against libelf and zlib
#   bpftool     inspecting the tracker's pinned maps and links (bpftool map
#               show, link show) when diagnosing tracking
#   xfsprogs btrfs-progs   consistency tests: XFS and btrfs (reflinks,
#               FIFREEZE) on loop devices
#   sqlite3     the consistency tests' database integrity checks
#   fio stress-ng   the tracking overhead and freeze-window benchmarks
set -euo pipefail

PACKAGES=(e2fsprogs util-linux b3sum rsync zstd python3 procps nbdkit libnbd-bin mmdebstrap dpkg-dev systemd
  fdisk dosfstools mtools grub-pc-bin grub-efi-amd64-bin pigz ovmf
  clang libelf-dev zlib1g-dev pkg-config make bpftool xfsprogs btrfs-progs sqlite3 fio stress-ng)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive

# qemu-img may come from backports under the same package name; only install
# it when the command is absent, so a newer backported build is kept.
# qemu-system-x86 must match it: a backported qemu-utils (>= 8.0) Breaks
# bookworm's qemu-system-common (7.2), and installing bookworm's
# qemu-system-x86 on its own would remove qemu-utils. So qemu-utils is always
# named in the same apt command, and when it is a backports build, the
# qemu-system packages come from bookworm-backports too (the same version).
# Adding the backports source changes nothing else: apt never takes a
# package from backports unless asked to (NotAutomatic).
if ! command -v qemu-system-x86_64 >/dev/null; then
  qemu_utils="$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)"
  case "$qemu_utils" in
  *bpo*)
    if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
      printf '%s\n' 'Types: deb' 'URIs: http://deb.debian.org/debian' 'Suites: bookworm-backports' \
        'Components: main' 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' |
        $SUDO tee /etc/apt/sources.list.d/bookworm-backports.sources >/dev/null
    fi
    missing+=(qemu-utils qemu-system-x86/bookworm-backports qemu-system-common/bookworm-backports
      qemu-system-data/bookworm-backports seabios/bookworm-backports)
    ;;
  *) missing+=(qemu-utils qemu-system-x86) ;;
  esac
elif ! command -v qemu-img >/dev/null; then
  missing+=(qemu-utils)
fi

if [ "${#missing[@]}" -gt 0 ]; then
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
echo "dependencies present: ${PACKAGES[*]} qemu-img qemu-system-x86_64"
