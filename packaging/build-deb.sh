#!/usr/bin/env bash
# Builds the Debian packages tideline-agent and tideline-controller.
#
#   packaging/build-deb.sh [--release-dir DIR] [--out DIR] [--version-suffix S]
#
#   --release-dir DIR    take tideline-agent and tideline-controller from DIR
#                        instead of running `cargo build --release --bins`
#                        (any profile works; the binaries are stripped here)
#   --out DIR            where the .deb files go (default: target/debian)
#   --version-suffix S   appended to the version, e.g. "+test1" (an upgrade
#                        test) or "-1" (a Debian revision)
#
# Writes DIR/tideline-agent_<version>_<arch>.deb and
# DIR/tideline-controller_<version>_<arch>.deb and prints their paths. The
# version is [workspace.package] version from Cargo.toml ("-" becomes "~",
# so that a Cargo pre-release sorts before its release, as it does in Cargo).
# Needs dpkg-deb; uses dpkg-shlibdeps (dpkg-dev) for Depends when present.
# Runs as any user: --root-owner-group makes every file root:root.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"

release_dir=""
out="$root/target/debian"
suffix=""
usage() { sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
	case "$1" in
	--release-dir) release_dir="${2:?--release-dir needs a directory}"; shift 2 ;;
	--out) out="${2:?--out needs a directory}"; shift 2 ;;
	--version-suffix) suffix="${2?--version-suffix needs a value}"; shift 2 ;;
	-h | --help) usage; exit 0 ;;
	*) echo "build-deb.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
	esac
done

# The version: the first `version = "..."` inside [workspace.package].
cargo_version="$(awk '
	/^\[/ { in_pkg = ($0 == "[workspace.package]") }
	in_pkg && /^version *=/ { gsub(/.*= *"|".*/, ""); print; exit }
' "$root/Cargo.toml")"
[ -n "$cargo_version" ] || { echo "build-deb.sh: no [workspace.package] version in $root/Cargo.toml" >&2; exit 1; }
version="${cargo_version//-/\~}${suffix}"
if ! dpkg --validate-version "$version" 2>/dev/null; then
	echo "build-deb.sh: $version is not a valid Debian version" >&2
	exit 1
fi

if [ -z "$release_dir" ]; then
	(cd "$root" && cargo build --release --bins)
	release_dir="${CARGO_TARGET_DIR:-$root/target}/release"
fi
for b in tideline-agent tideline-controller; do
	[ -x "$release_dir/$b" ] || { echo "build-deb.sh: $release_dir/$b is missing or not executable" >&2; exit 1; }
done

arch="$(dpkg --print-architecture)"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
# Reproducible timestamps when building from a git checkout (read-only use).
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
	SOURCE_DATE_EPOCH="$(git -C "$root" log -1 --format=%ct 2>/dev/null || date +%s)"
fi
export SOURCE_DATE_EPOCH

work="$(mktemp -d "${TMPDIR:-/tmp}/tideline-deb.XXXXXX")"
trap 'rm -rf "$work"' EXIT
# dpkg-shlibdeps wants a debian/control naming the packages, and the
# binaries under debian/<package>/.
mkdir -p "$work/debian"
printf 'Source: tideline\n\nPackage: tideline-agent\nArchitecture: any\n\nPackage: tideline-controller\nArchitecture: any\n' \
	>"$work/debian/control"

# Depends for a binary: what dpkg-shlibdeps finds (libc6 and libgcc-s1 with
# minimum versions, today), else the same without versions.
shlib_depends() {
	local deps=""
	if command -v dpkg-shlibdeps >/dev/null; then
		deps="$(cd "$work" && dpkg-shlibdeps -O -e "$1" 2>/dev/null | sed -n 's/^shlibs:Depends=//p')"
	fi
	if [ -z "$deps" ]; then
		deps="$(ldd "$1" | awk '/libc\.so/ { print "libc6" } /libgcc_s/ { print "libgcc-s1" }' | sort -u | paste -sd, | sed 's/,/, /g')"
	fi
	echo "$deps"
}

# build PACKAGE SHORT-DESCRIPTION EXTRA-DEPENDS LONG-DESCRIPTION
build() {
	local pkg="$1" summary="$2" extra_depends="$3" long="$4"
	local short="${pkg#tideline-}"
	local tree="$work/debian/$pkg"
	install -d -m 0755 "$tree/DEBIAN" "$tree/usr/bin" "$tree/lib/systemd/system" \
		"$tree/etc/tideline/pki" "$tree/usr/share/doc/$pkg"

	if command -v strip >/dev/null; then
		strip --strip-unneeded --remove-section=.comment \
			-o "$tree/usr/bin/$pkg" "$release_dir/$pkg"
		chmod 0755 "$tree/usr/bin/$pkg"
	else
		install -m 0755 "$release_dir/$pkg" "$tree/usr/bin/$pkg"
	fi
	# /lib, not /usr/lib: bookworm's rule for units until the /usr merge is
	# finished in dpkg (DEP 17).
	install -m 0644 "$here/systemd/$pkg.service" "$tree/lib/systemd/system/$pkg.service"
	install -m 0644 "$here/config/$short.toml" "$tree/etc/tideline/$short.toml"
	install -m 0644 "$here/README.md" "$tree/usr/share/doc/$pkg/README.md"
	cat >"$tree/usr/share/doc/$pkg/copyright" <<-EOF
		Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
		Upstream-Name: tideline

		Files: *
		Copyright: The Tideline authors
		License: Apache-2.0
		 On Debian systems the full text of the Apache License 2.0 is in
		 /usr/share/common-licenses/Apache-2.0.
	EOF
	chmod 0644 "$tree/usr/share/doc/$pkg/copyright"

	for s in postinst prerm postrm; do
		install -m 0755 "$here/debian/$short/$s" "$tree/DEBIAN/$s"
	done
	echo "/etc/tideline/$short.toml" >"$tree/DEBIAN/conffiles"

	local depends installed_size
	depends="$(shlib_depends "$tree/usr/bin/$pkg")"
	[ -n "$extra_depends" ] && depends="${depends:+$depends, }$extra_depends"
	installed_size="$(du -sk --exclude=DEBIAN "$tree" | cut -f1)"
	cat >"$tree/DEBIAN/control" <<-EOF
		Package: $pkg
		Version: $version
		Architecture: $arch
		Maintainer: Tideline maintainers <tideline@localhost>
		Installed-Size: $installed_size
		Depends: $depends
		Section: admin
		Priority: optional
		Description: $summary
		$long
	EOF

	local deb="$out/${pkg}_${version}_${arch}.deb"
	dpkg-deb --root-owner-group -Zxz --build "$tree" "$deb" >/dev/null
	echo "$deb"
}

build tideline-agent "Tideline disaster-recovery replication agent" "" \
	" Reads a machine's disks (block devices, raw images, VMDK exports, NBD),
 finds the blocks that changed and streams them to a Tideline controller
 over mutual TLS. Runs as a systemd notify service with a watchdog."
# useradd, groupadd and userdel in the maintainer scripts.
build tideline-controller "Tideline disaster-recovery replication controller" "passwd" \
	" Accepts Tideline agents over mutual TLS, runs their sync sessions and
 keeps their recovery points in a store; exports and verifies points. Also
 holds the certificate tools and the admin command-line client."
