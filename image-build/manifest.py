#!/usr/bin/env python3
"""Writes manifest.json and SHA256SUMS beside the appliance's outputs
(image-build/build.sh): what the image was built from (Debian suite,
mirrors and the Date of each archive's Release file, every package and its
version, the kernel, the Tideline package), with which tools, its disk
layout, and the size and SHA-256 of each output.
"""

import argparse
import datetime
import hashlib
import json
import os


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main() -> None:
    p = argparse.ArgumentParser()
    for a in (
        "--out-dir", "--name", "--suite", "--mirror", "--security-mirror",
        "--archive-info", "--packages", "--deb", "--tideline-version", "--kernel",
        "--root-uuid", "--disk-uuid", "--esp-serial", "--cmdline", "--build-seconds",
        "--layout",
    ):
        p.add_argument(a, required=True)
    p.add_argument("--tool", action="append", default=[])
    a = p.parse_args()

    archives = []
    for line in open(a.archive_info, encoding="utf-8"):
        origin, suite, date = (line.rstrip("\n").split("\t") + ["", "", ""])[:3]
        archives.append({"origin": origin, "suite": suite, "date": date})
    packages = []
    for line in open(a.packages, encoding="utf-8"):
        name, version, arch = line.rstrip("\n").split("\t")
        packages.append({"name": name, "version": version, "architecture": arch})
    by_name = {p["name"]: p["version"] for p in packages}
    layout = []
    for part in a.layout.split(","):
        label, start, sectors = part.split(":")
        layout.append({"name": label, "start_lba": int(start), "sectors": int(sectors)})

    outputs = []
    sums = []
    for suffix, what in (
        (".raw", "raw disk image (sparse), GPT, BIOS + UEFI"),
        (".raw.tar.gz", "the raw image in a gzip'd tar (OpenStack)"),
        (".qcow2", "compressed qcow2 (OpenStack, KVM)"),
        (".ova", "OVF descriptor, manifest and streamOptimized VMDK (ESXi)"),
    ):
        path = os.path.join(a.out_dir, a.name + suffix)
        st = os.stat(path)
        digest = sha256(path)
        sums.append(f"{digest}  {a.name + suffix}\n")
        outputs.append({
            "file": a.name + suffix,
            "what": what,
            "bytes": st.st_size,
            "allocated_bytes": st.st_blocks * 512,
            "sha256": digest,
        })

    manifest = {
        "name": a.name,
        "built": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "build_seconds": int(a.build_seconds),
        "tideline": {
            "version": a.tideline_version,
            "package": os.path.basename(a.deb),
            "package_sha256": sha256(a.deb),
        },
        "debian": {
            "suite": a.suite,
            "mirror": a.mirror,
            "security_mirror": a.security_mirror,
            "archives": archives,
        },
        "kernel": {
            "release": a.kernel,
            "package": f"linux-image-{a.kernel}",
            "version": by_name.get(f"linux-image-{a.kernel}", ""),
            "cmdline": a.cmdline,
        },
        "key_packages": {
            n: by_name.get(n, "")
            for n in ("systemd", "cloud-init", "open-vm-tools", "openssh-server",
                      "linux-image-cloud-amd64", "tideline-agent", "libc6")
        },
        "disk": {
            "partition_table": "gpt",
            "disk_guid": a.disk_uuid,
            "root_fs_uuid": a.root_uuid,
            "esp_serial": a.esp_serial,
            "partitions": layout,
            "boot": ["bios: GRUB i386-pc core.img in bios-boot",
                     "uefi: GRUB x86_64-efi at EFI/BOOT/BOOTX64.EFI"],
        },
        "tools": dict(t.split("=", 1) for t in a.tool),
        "packages": packages,
        "outputs": outputs,
    }
    with open(os.path.join(a.out_dir, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    with open(os.path.join(a.out_dir, "SHA256SUMS"), "w", encoding="utf-8") as f:
        f.writelines(sums)


if __name__ == "__main__":
    main()
