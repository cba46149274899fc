#!/bin/sh
# mmdebstrap customize hook of image-build/build.sh, run on the build host
# with the root file system as $1 (root mode: a plain directory). Installs
# the agent's .deb, adds image-build/rootfs/, runs customize.sh inside the
# root, and records what the root holds for the manifest. Environment (set by
# build.sh): TIDELINE_DEB, TIDELINE_OVERLAY, TIDELINE_CUSTOMIZE,
# TIDELINE_ROOT_UUID, TIDELINE_WORK, TIDELINE_VERSION.
set -eu
rootfs="$1"

in_root() {
	chroot "$rootfs" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 \
		DEBIAN_FRONTEND=noninteractive "$@"
}

# The agent, with dpkg as an admin would; its dependencies (libc6,
# libgcc-s1) are already there.
cp "$TIDELINE_DEB" "$rootfs/tmp/tideline-agent.deb"
in_root dpkg -i /tmp/tideline-agent.deb >/dev/null
rm -f "$rootfs/tmp/tideline-agent.deb"

# The appliance's own files (root-owned: cp as root does not keep owners).
cp -R --preserve=mode --no-dereference "$TIDELINE_OVERLAY/." "$rootfs/"

cp "$TIDELINE_CUSTOMIZE" "$rootfs/tmp/customize.sh"
in_root env ROOT_UUID="$TIDELINE_ROOT_UUID" sh /tmp/customize.sh

# For the manifest: the archive's state (the Date of each Release file
# pins it, e.g. for snapshot.debian.org) and every installed package. apt's
# lists are still here: mmdebstrap removes them after the hooks.
for f in "$rootfs"/var/lib/apt/lists/*_InRelease; do
	[ -e "$f" ] || continue
	printf '%s\t%s\t%s\n' "$(sed -n 's/^Origin: //p' "$f" | head -n 1)" \
		"$(sed -n 's/^Suite: //p' "$f" | head -n 1)" "$(sed -n 's/^Date: //p' "$f" | head -n 1)"
done >"$TIDELINE_WORK/archive-info"
in_root dpkg-query -W -f '${Package}\t${Version}\t${Architecture}\n' >"$TIDELINE_WORK/packages.tsv"

cat >"$rootfs/usr/lib/tideline-appliance/build-info" <<INFO
tideline_version=$TIDELINE_VERSION
built=$(date -u +%Y-%m-%dT%H:%M:%SZ)
$(awk -F'\t' '{ printf "archive=%s %s %s\n", $1, $2, $3 }' "$TIDELINE_WORK/archive-info")
INFO
