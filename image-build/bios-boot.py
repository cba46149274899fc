#!/usr/bin/env python3
"""Makes a GPT disk image boot with legacy BIOS through GRUB, without
grub-install, a loop device or a mount (image-build/build.sh).

    bios-boot.py DISK BOOT_IMG CORE_IMG PART_START PART_SECTORS

Does what grub-bios-setup does for a GPT disk with a BIOS boot partition:

* core.img (made by grub-mkimage -O i386-pc) is written at the start of the
  BIOS boot partition (LBA PART_START). Its first sector is diskboot.img,
  which ends with a block list telling it where the rest of core.img is: the
  last 12 bytes are {start LBA u64, sector count u16, load segment u16}.
  grub-mkimage fills in the count and the segment (0x820); the start is set
  here to PART_START + 1, and the entry before it is zeroed (the list's
  terminator).
* boot.img's code (the first 440 bytes; the disk signature and the
  protective MBR's partition table after them are kept) goes to LBA 0, with
  the LBA of core.img at offset 0x5c (GRUB_BOOT_MACHINE_KERNEL_SECTOR), the
  boot drive at 0x64 left as 0xff (use the drive the BIOS booted from), and
  the floppy probe's jump at 0x66 replaced by two NOPs, as
  grub-bios-setup does for hard disks.
"""

import struct
import sys

SECTOR = 512
KERNEL_SECTOR = 0x5C
BOOT_DRIVE = 0x64
DRIVE_CHECK = 0x66
MBR_CODE = 440
BLOCKLIST_SIZE = 12
DEFAULT_SEGMENT = 0x820


def main() -> None:
    disk, boot_img, core_img = sys.argv[1:4]
    start, sectors = int(sys.argv[4]), int(sys.argv[5])
    boot = open(boot_img, "rb").read()
    core = bytearray(open(core_img, "rb").read())
    if len(boot) != SECTOR or boot[510:512] != b"\x55\xaa":
        sys.exit(f"{boot_img}: not a GRUB boot.img")
    if boot[BOOT_DRIVE] != 0xFF or boot[DRIVE_CHECK] != 0xEB:
        sys.exit(f"{boot_img}: unexpected layout (boot drive byte, drive check jump)")
    core_sectors = (len(core) + SECTOR - 1) // SECTOR
    if core_sectors > sectors:
        sys.exit(f"core.img needs {core_sectors} sectors, the BIOS boot partition has {sectors}")
    core.extend(b"\0" * (core_sectors * SECTOR - len(core)))

    entry = SECTOR - BLOCKLIST_SIZE
    _, count, segment = struct.unpack_from("<QHH", core, entry)
    if count != core_sectors - 1 or segment != DEFAULT_SEGMENT:
        sys.exit(
            f"{core_img}: block list says {count} sectors at segment {segment:#x}, "
            f"expected {core_sectors - 1} at {DEFAULT_SEGMENT:#x}: not an i386-pc core.img?"
        )
    struct.pack_into("<QHH", core, entry, start + 1, count, segment)
    core[entry - BLOCKLIST_SIZE : entry] = b"\0" * BLOCKLIST_SIZE

    with open(disk, "r+b") as f:
        mbr = bytearray(f.read(SECTOR))
        if mbr[510:512] != b"\x55\xaa" or mbr[450] != 0xEE:
            sys.exit(f"{disk}: no protective MBR (write the GPT first)")
        mbr[:MBR_CODE] = boot[:MBR_CODE]
        struct.pack_into("<Q", mbr, KERNEL_SECTOR, start)
        mbr[DRIVE_CHECK : DRIVE_CHECK + 2] = b"\x90\x90"
        f.seek(0)
        f.write(mbr)
        f.seek(start * SECTOR)
        f.write(core)


if __name__ == "__main__":
    main()
