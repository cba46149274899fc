#!/usr/bin/env python3
"""Fills in the appliance's OVF descriptor (image-build/build.sh).

    ovf.py --template T --vmdk DISK.vmdk --raw DISK.raw --version V --kernel K --out F

Sizes come from the files: the VMDK's size in bytes (References/File), the
raw disk's virtual size (Disk capacity) and its allocated bytes (Disk
populatedSize, what the disk holds once deployed thin). The result must
parse as XML and name only the placeholders it knows.
"""

import argparse
import os
import re
import sys
import xml.etree.ElementTree as ET
from xml.sax.saxutils import escape


def main() -> None:
    p = argparse.ArgumentParser()
    for a in ("--template", "--vmdk", "--raw", "--version", "--kernel", "--out"):
        p.add_argument(a, required=True)
    args = p.parse_args()
    raw = os.stat(args.raw)
    values = {
        "VMDK_BYTES": str(os.stat(args.vmdk).st_size),
        "CAPACITY_BYTES": str(raw.st_size),
        "POPULATED_BYTES": str(raw.st_blocks * 512),
        "VERSION": escape(args.version),
        "KERNEL": escape(args.kernel),
    }
    text = open(args.template, encoding="utf-8").read()

    def fill(m: "re.Match[str]") -> str:
        key = m.group(1)
        if key not in values:
            sys.exit(f"{args.template}: unknown placeholder @{key}@")
        return values[key]

    text = re.sub(r"@([A-Z_]+)@", fill, text)
    ET.fromstring(text.encode("utf-8"))  # well-formed, or raise
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)


if __name__ == "__main__":
    main()
