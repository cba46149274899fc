#!/usr/bin/env bash
# Builds the Tideline agent appliance: a Debian bookworm disk image with
# systemd, cloud-init and tideline-agent that boots with UEFI and with
# legacy BIOS, in the formats OpenStack and ESXi import.
#
#   image-build/build.sh [--out DIR] [--deb DIR | --release-dir DIR]
#                        [--mirror URL] [--security-mirror URL]
#                        [--disk-size MIB] [--apt-cache DIR]
#
#   --out DIR            where the outputs go (default: target/appliance)
#   --deb DIR            take tideline-agent_*.deb from DIR (the newest
#                        version there) instead of building it
#   --release-dir DIR    build the .deb with packaging/build-deb.sh from the
#                        binaries in DIR; without --deb or --release-dir,
#                        build-deb.sh runs `cargo build --release --bins`
#   --mirror URL         Debian mirror (default http://deb.debian.org/debian;
#                        a snapshot.debian.org URL pins the package versions)
#   --security-mirror URL   Debian security mirror
#                        (default http://deb.debian.org/debian-security)
#   --disk-size MIB      virtual size of the disk (default 2048; cloud-init
#                        grows the root file system to the real disk at boot)
#   --apt-cache DIR      keep the downloaded .deb files in DIR and reuse them
#                        in the next build (optional)
#
# Writes to DIR: tideline-appliance.raw (sparse), tideline-appliance.raw.tar.gz
# (OpenStack), tideline-appliance.qcow2 (compressed), tideline-appliance.ova
# (ESXi: OVF descriptor, manifest, streamOptimized VMDK), manifest.json
# (inputs, versions, checksums) and SHA256SUMS. Runs as root (mmdebstrap's
# root mode, file ownership in the image) but needs no running systemd, no
# KVM, no loop device and no mount. Needs mmdebstrap, sfdisk (fdisk),
# mkfs.ext4 (e2fsprogs), mkfs.vfat (dosfstools), mtools, grub-mkimage for
# i386-pc and x86_64-efi (grub-pc-bin, grub-efi-amd64-bin), qemu-img, pigz
# (or gzip) and python3; scripts/install-deps.sh installs them.
# docs/appliance.md describes the image.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"

out="$root/target/appliance"
deb_dir=""
release_dir=""
mirror="http://deb.debian.org/debian"
security_mirror="http://deb.debian.org/debian-security"
disk_mib=2048
apt_cache=""
suite=bookworm
name=tideline-appliance

usage() { sed -n '2,34p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "build.sh: $*" >&2; exit 1; }
while [ $# -gt 0 ]; do
	case "$1" in
	--out) out="${2:?--out needs a directory}"; shift 2 ;;
	--deb) deb_dir="${2:?--deb needs a directory}"; shift 2 ;;
	--release-dir) release_dir="${2:?--release-dir needs a directory}"; shift 2 ;;
	--mirror) mirror="${2:?--mirror needs a URL}"; shift 2 ;;
	--security-mirror) security_mirror="${2:?--security-mirror needs a URL}"; shift 2 ;;
	--disk-size) disk_mib="${2:?--disk-size needs a size in MiB}"; shift 2 ;;
	--apt-cache) apt_cache="${2:?--apt-cache needs a directory}"; shift 2 ;;
	-h | --help) usage; exit 0 ;;
	*) echo "build.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
	esac
done
[ -z "$deb_dir" ] || [ -z "$release_dir" ] || die "--deb and --release-dir exclude each other"
[[ "$disk_mib" =~ ^[0-9]+$ ]] && [ "$disk_mib" -ge 1024 ] || die "--disk-size must be at least 1024 (MiB)"
[ "$(id -u)" -eq 0 ] || die "must run as root (mmdebstrap root mode, root-owned files in the image)"

for tool in mmdebstrap dpkg-deb sfdisk mkfs.ext4 mkfs.vfat mmd mcopy grub-mkimage qemu-img python3 tar sha256sum; do
	command -v "$tool" >/dev/null || die "$tool is missing (scripts/install-deps.sh installs it)"
done
for dir in /usr/lib/grub/i386-pc /usr/lib/grub/x86_64-efi /usr/share/mmdebstrap/hooks/merged-usr; do
	[ -d "$dir" ] || die "$dir is missing (grub-pc-bin, grub-efi-amd64-bin, mmdebstrap)"
done
gzip_cmd=(gzip -n -6)
command -v pigz >/dev/null && gzip_cmd=(pigz -n -6)

started="$(date +%s)"
say() { printf 'build.sh: [%4ss] %s\n' "$(($(date +%s) - started))" "$*" >&2; }

mkdir -p "$out"
out="$(cd "$out" && pwd)"
work="$(mktemp -d "${TMPDIR:-/var/tmp}/tideline-appliance.XXXXXX")"
# TIDELINE_KEEP_WORK=1 keeps the root file system and the pieces (debugging).
if [ -n "${TIDELINE_KEEP_WORK:-}" ]; then
	trap 'echo "build.sh: kept $work" >&2' EXIT
else
	trap 'rm -rf "$work"' EXIT
fi

# ---------------------------------------------------------------------------
# 1. The agent's .deb
if [ -n "$deb_dir" ]; then
	deb="$(find "$deb_dir" -maxdepth 1 -name 'tideline-agent_*.deb' | sort -V | tail -n 1)"
	[ -n "$deb" ] || die "no tideline-agent_*.deb in $deb_dir"
else
	say "building the .deb with packaging/build-deb.sh"
	"$root/packaging/build-deb.sh" ${release_dir:+--release-dir "$release_dir"} --out "$work/deb" >/dev/null
	deb="$(find "$work/deb" -maxdepth 1 -name 'tideline-agent_*.deb' | head -n 1)"
	[ -n "$deb" ] || die "packaging/build-deb.sh made no tideline-agent .deb"
fi
deb="$(cd "$(dirname "$deb")" && pwd)/$(basename "$deb")"
tideline_version="$(dpkg-deb --field "$deb" Version)"
say "agent package: $deb ($tideline_version)"

# ---------------------------------------------------------------------------
# 2. The root file system
#
# mmdebstrap (root mode, a directory): minbase plus an explicit list, no
# Recommends, no documentation, man pages or translations (dpkg path
# excludes, kept in the image so later installs stay small too).
# mmdebstrap's merged-usr hooks make the /usr merge themselves and install
# usr-is-merged, so that apt does not pick usrmerge (and perl with it) for
# init-system-helpers' "usrmerge | usr-is-merged".
packages=(
	# boot: the kernel for clouds and hypervisors (virtio, vmxnet3, pvscsi,
	# NVMe, Hyper-V, Xen), its initramfs (zstd), systemd as init
	linux-image-cloud-amd64 initramfs-tools zstd systemd systemd-sysv udev dbus
	# network: systemd-networkd (cloud-init renders its configuration),
	# the stub resolver on 127.0.0.53, an SNTP client (certificates need a
	# right clock)
	systemd-resolved systemd-timesyncd iproute2 netbase
	# first boot: cloud-init, growpart/resize2fs to fill a larger disk, and
	# open-vm-tools (VMware guestinfo and OVF environment, clean shutdown)
	cloud-init cloud-guest-utils e2fsprogs fdisk open-vm-tools
	# administration, off by default: sshd (keys only), sudo for the
	# default user cloud-init creates
	openssh-server sudo
)
rootfs="$work/rootfs"
root_uuid="$(python3 -c 'import uuid; print(uuid.uuid4())')"
disk_uuid="$(python3 -c 'import uuid; print(uuid.uuid4())')"
esp_serial="$(python3 -c 'import secrets; print(secrets.token_hex(4).upper())')"
export TIDELINE_DEB="$deb" TIDELINE_OVERLAY="$here/rootfs" TIDELINE_CUSTOMIZE="$here/customize.sh"
export TIDELINE_ROOT_UUID="$root_uuid" TIDELINE_WORK="$work" TIDELINE_VERSION="$tideline_version"

# snapshot.debian.org serves Release files whose Valid-Until has passed.
snapshot_opts=()
case "$mirror $security_mirror" in
*snapshot.debian.org*) snapshot_opts=(--aptopt='Acquire::Check-Valid-Until "false"') ;;
esac

cache_hooks=()
if [ -n "$apt_cache" ]; then
	mkdir -p "$apt_cache"
	apt_cache="$(cd "$apt_cache" && pwd)"
	export TIDELINE_APT_CACHE="$apt_cache"
	# Essential packages are unlinked after extraction unless told not to.
	cache_hooks=(
		--skip=essential/unlink
		--setup-hook='mkdir -p "$1/var/cache/apt/archives" && find "$TIDELINE_APT_CACHE" -maxdepth 1 -name "*.deb" -exec cp -t "$1/var/cache/apt/archives/" {} +'
		--customize-hook='find "$1/var/cache/apt/archives" -maxdepth 1 -name "*.deb" -exec cp -u -t "$TIDELINE_APT_CACHE/" {} + -exec rm -f {} +'
	)
fi

say "making the bookworm root file system (mmdebstrap)"
mmdebstrap --quiet --mode=root --variant=minbase --format=directory \
	--include="$(IFS=,; echo "${packages[*]}")" \
	--aptopt='APT::Install-Recommends "false"' \
	--aptopt='APT::Install-Suggests "false"' \
	--aptopt='Acquire::Languages "none"' \
	"${snapshot_opts[@]}" \
	--dpkgopt='path-exclude=/usr/share/man/*' \
	--dpkgopt='path-exclude=/usr/share/info/*' \
	--dpkgopt='path-exclude=/usr/share/locale/*' \
	--dpkgopt='path-include=/usr/share/locale/locale.alias' \
	--dpkgopt='path-exclude=/usr/share/doc/*' \
	--dpkgopt='path-include=/usr/share/doc/*/copyright' \
	--dpkgopt='path-exclude=/usr/share/lintian/*' \
	--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
	"${cache_hooks[@]}" \
	--customize-hook='"$TIDELINE_OVERLAY/../hook.sh" "$1"' \
	"$suite" "$rootfs" \
	"deb $mirror $suite main" \
	"deb $mirror $suite-updates main" \
	"deb $security_mirror $suite-security main"

kernel_release="$(basename "$(readlink -f "$rootfs/vmlinuz")" | sed 's/^vmlinuz-//')"
[ -n "$kernel_release" ] && [ -f "$rootfs/boot/vmlinuz-$kernel_release" ] && [ -e "$rootfs/initrd.img" ] ||
	die "no kernel or initramfs in the root file system (/vmlinuz, /initrd.img)"
say "root file system: $(du -sh --apparent-size "$rootfs" | cut -f1), kernel $kernel_release"

# ---------------------------------------------------------------------------
# 3. GRUB, for BIOS and UEFI, from this host's GRUB modules. Both images
# embed the modules they need and an early configuration that finds the root
# file system by UUID and reads /boot/grub/grub.cfg from it.
cmdline="console=tty0 console=ttyS0,115200n8"
mkdir -p "$rootfs/boot/grub"
sed -e "s/@ROOT_UUID@/$root_uuid/g" -e "s/@CMDLINE@/$cmdline/g" "$here/grub.cfg.in" >"$rootfs/boot/grub/grub.cfg"
sed -e "s/@ROOT_UUID@/$root_uuid/g" "$here/grub-early.cfg.in" >"$work/grub-early.cfg"
grub_modules=(part_gpt part_msdos ext2 fat search search_fs_uuid search_label normal configfile
	linux echo test serial terminal terminfo gzio loadenv ls cat halt reboot sleep all_video)
grub-mkimage --format=i386-pc --output="$work/core.img" --config="$work/grub-early.cfg" \
	--prefix=/boot/grub biosdisk "${grub_modules[@]}"
grub-mkimage --format=x86_64-efi --output="$work/BOOTX64.EFI" --config="$work/grub-early.cfg" \
	--prefix=/boot/grub "${grub_modules[@]}"

# ---------------------------------------------------------------------------
# 4. The disk: GPT with a BIOS boot partition (GRUB's core.img), an EFI
# system partition (EFI/BOOT/BOOTX64.EFI, the removable-media path firmware
# boots without NVRAM entries), and the root file system, last so that
# growpart can extend it. File systems are made as files (mkfs.ext4 -d,
# mkfs.vfat + mcopy) and copied into place: no loop device, no mount.
sector=512
bios_start=2048 bios_sectors=2048         # 1 MiB at 1 MiB
esp_start=4096 esp_sectors=126976         # 62 MiB at 2 MiB
root_start=131072                         # at 64 MiB
total_sectors=$((disk_mib * 2048))
# The backup GPT takes the last 33 sectors; keep the root a whole number of MiB.
root_sectors=$(((total_sectors - 34 - root_start) / 2048 * 2048))

say "making the file systems"
# Bookworm's mke2fs defaults (no orphan_file, no metadata_csum_seed), which
# GRUB 2.06 reads.
mkfs.ext4 -q -F -L tideline-root -U "$root_uuid" -d "$rootfs" \
	"$work/root.img" "$((root_sectors * sector / 1024))k"
mkfs.vfat -C -F 32 -s 1 -n ESP -i "$esp_serial" "$work/esp.img" "$((esp_sectors * sector / 1024))" >/dev/null
export MTOOLS_SKIP_CHECK=1
mmd -i "$work/esp.img" ::/EFI ::/EFI/BOOT
mcopy -i "$work/esp.img" "$work/BOOTX64.EFI" ::/EFI/BOOT/BOOTX64.EFI

raw="$work/$name.raw"
truncate -s "$((total_sectors * sector))" "$raw"
sfdisk --quiet --no-reread --no-tell-kernel "$raw" <<-EOF
	label: gpt
	label-id: $disk_uuid
	first-lba: 2048
	start=$bios_start, size=$bios_sectors, type=21686148-6449-6E6F-744E-656564454649, name="bios-boot"
	start=$esp_start, size=$esp_sectors, type=C12A7328-F81F-11D2-BA4B-00A0C93EC3B8, name="esp"
	start=$root_start, size=$root_sectors, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, name="root"
EOF
dd if="$work/esp.img" of="$raw" bs=1M seek=$((esp_start / 2048)) conv=notrunc,sparse status=none
dd if="$work/root.img" of="$raw" bs=1M seek=$((root_start / 2048)) conv=notrunc,sparse status=none
rm -f "$work/esp.img" "$work/root.img"
# BIOS: boot.img in the MBR's code area and core.img in the BIOS boot
# partition, patched as grub-bios-setup would (bios-boot.py says how).
python3 "$here/bios-boot.py" "$raw" /usr/lib/grub/i386-pc/boot.img "$work/core.img" "$bios_start" "$bios_sectors"

# ---------------------------------------------------------------------------
# 5. The outputs, made in parallel (each is one compressor on one core).
say "writing the outputs"
staging="$work/out"
mkdir -p "$staging"
mtime="@${SOURCE_DATE_EPOCH:-$started}"
(
	tar --sparse --format=gnu --owner=0 --group=0 --numeric-owner --mtime="$mtime" \
		-C "$work" -cf - "$name.raw" | "${gzip_cmd[@]}" >"$staging/$name.raw.tar.gz"
) &
pid_tgz=$!
qemu-img convert -f raw -O qcow2 -c -o compat=1.1 "$raw" "$staging/$name.qcow2" &
pid_qcow=$!
qemu-img convert -f raw -O vmdk -o subformat=streamOptimized,adapter_type=lsilogic \
	"$raw" "$work/$name-disk1.vmdk" &
pid_vmdk=$!
wait "$pid_tgz" || die "tar/gzip of the raw image failed"
wait "$pid_qcow" || die "qemu-img convert to qcow2 failed"
wait "$pid_vmdk" || die "qemu-img convert to vmdk failed"

# The OVA: the OVF descriptor first, then its manifest, then the disk.
python3 "$here/ovf.py" --template "$here/tideline-appliance.ovf.in" \
	--vmdk "$work/$name-disk1.vmdk" --raw "$raw" --version "$tideline_version" \
	--kernel "$kernel_release" --out "$work/$name.ovf"
(
	cd "$work"
	printf 'SHA256(%s)= %s\n' "$name.ovf" "$(sha256sum <"$name.ovf" | cut -d' ' -f1)" >"$name.mf"
	printf 'SHA256(%s)= %s\n' "$name-disk1.vmdk" "$(sha256sum <"$name-disk1.vmdk" | cut -d' ' -f1)" >>"$name.mf"
	tar --format=ustar --owner=0 --group=0 --numeric-owner --mtime="$mtime" --mode=0644 \
		-cf "$staging/$name.ova" "$name.ovf" "$name.mf" "$name-disk1.vmdk"
)
mv "$raw" "$staging/$name.raw"

# ---------------------------------------------------------------------------
# 6. The manifest: inputs, versions, layout, checksums.
finished="$(date +%s)"
tool_version() { "$@" 2>&1 | head -n 1; }
python3 "$here/manifest.py" \
	--out-dir "$staging" --name "$name" --suite "$suite" \
	--mirror "$mirror" --security-mirror "$security_mirror" \
	--archive-info "$work/archive-info" --packages "$work/packages.tsv" \
	--deb "$deb" --tideline-version "$tideline_version" --kernel "$kernel_release" \
	--root-uuid "$root_uuid" --disk-uuid "$disk_uuid" --esp-serial "$esp_serial" \
	--cmdline "$cmdline" --build-seconds "$((finished - started))" \
	--layout "bios-boot:$bios_start:$bios_sectors,esp:$esp_start:$esp_sectors,root:$root_start:$root_sectors" \
	--tool "mmdebstrap=$(tool_version mmdebstrap --version)" \
	--tool "grub-mkimage=$(tool_version grub-mkimage --version)" \
	--tool "qemu-img=$(tool_version qemu-img --version)" \
	--tool "mke2fs=$(tool_version mke2fs -V)" \
	--tool "dosfstools=$(dpkg-query -W -f '${Version}' dosfstools 2>/dev/null || echo unknown)" \
	--tool "grub-pc-bin=$(dpkg-query -W -f '${Version}' grub-pc-bin 2>/dev/null || echo unknown)" \
	--tool "grub-efi-amd64-bin=$(dpkg-query -W -f '${Version}' grub-efi-amd64-bin 2>/dev/null || echo unknown)" \
	--tool "sfdisk=$(tool_version sfdisk --version)" \
	--tool "mtools=$(tool_version mcopy --version)" \
	--tool "compressor=$(tool_version "${gzip_cmd[0]}" --version)" \
	--tool "host=$(. /etc/os-release && echo "$PRETTY_NAME") $(uname -r)"

# Replace the previous outputs only now that every file is complete.
for f in "$name.raw" "$name.raw.tar.gz" "$name.qcow2" "$name.ova" manifest.json SHA256SUMS; do
	mv -f "$staging/$f" "$out/$f"
done
say "done in $((finished - started)) s:"
(cd "$out" && ls -ls "$name".* manifest.json SHA256SUMS) >&2
