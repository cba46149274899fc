#!/bin/sh
# Runs inside the appliance's root file system (chroot), as the last
# mmdebstrap customize hook of image-build/build.sh, after the agent's .deb
# and the files of image-build/rootfs/ are in place. Environment:
#   ROOT_UUID   UUID of the root file system (fstab)
set -eu
: "${ROOT_UUID:?}"
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8

echo tideline-appliance >/etc/hostname
cat >/etc/hosts <<'HOSTS'
127.0.0.1	localhost
::1		localhost ip6-localhost ip6-loopback
ff02::1		ip6-allnodes
ff02::2		ip6-allrouters
HOSTS
cat >/etc/fstab <<FSTAB
# <file system>	<mount point>	<type>	<options>	<dump>	<pass>
UUID=$ROOT_UUID	/	ext4	errors=remount-ro	0	1
FSTAB

# The agent's configuration comes from first-boot user data; keep the
# packaged template beside it. Deleting a conffile is a local change that
# dpkg keeps across upgrades, so an upgrade does not bring the placeholder
# back (see the unit's drop-in: no agent.toml, no start).
mv /etc/tideline/agent.toml /etc/tideline/agent.toml.example

# What runs at boot. Presets say the same (system-preset/10-tideline-appliance.preset).
systemctl enable tideline-agent.service tideline-appliance-ssh.service \
	systemd-networkd.service systemd-resolved.service systemd-timesyncd.service
# sshd: off unless a key is authorized (tideline-appliance-ssh.service).
systemctl disable ssh.service ssh.socket 2>/dev/null || true
# systemd-networkd-wait-online is enabled with networkd (Also=); the serial
# console keeps its getty (no password works: every account is locked).

# No password can log in: every account with a password field that is not
# locked gets locked (mmdebstrap leaves root with "*" already).
awk -F: '$2 !~ /^[!*]/ { print $1 }' /etc/shadow | while read -r user; do
	usermod -L "$user"
done

# Per-machine identity is made at first boot, never shipped: SSH host keys
# (cloud-init), machine-id (systemd writes one at boot when the file is
# empty), the random seed, the D-Bus machine id.
rm -f /etc/ssh/ssh_host_*
: >/etc/machine-id
rm -f /var/lib/dbus/machine-id /var/lib/systemd/random-seed
rm -rf /var/lib/cloud/* /var/log/journal/*

# Logs and caches of the build itself.
apt-get clean
find /var/log -type f -exec truncate -s 0 {} +
rm -f /var/cache/debconf/*-old /var/lib/dpkg/*-old
rm -rf /tmp/* /var/tmp/*
