#!/usr/bin/env python3
"""Tideline format benchmarks (issue 3), run by `scripts/bench.sh --formats`.

1. Dirty bitmap: an image served by qemu-nbd from qcow2 with a persistent
   dirty bitmap; 1% of it rewritten in scattered 64 KiB writes; the
   incremental sync through the bitmap against (a) a hash-scan incremental
   of the same export and (b) copying just the dirty extents with nbdcopy
   (through nbdkit's extentlist filter, which leaves everything else a
   hole, so nbdcopy reads and writes only the dirty extents); reading them
   with qemu-io, a lower bound that writes nothing, is reported too. The replica is compared with
   `qemu-img convert -O raw` of the qcow2.
2. streamOptimized VMDK: `tideline-agent dump` (the agent's VMDK reader)
   against `qemu-img convert -O raw` of the same file; both outputs are
   compared with the source image.
"""

import json
import os
import random
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402
from bench import GiB, MiB, Cluster, log, make_image, make_pki, timed  # noqa: E402

BITMAP = "tideline"


def qemu_nbd(image, sock, bitmap=None):
    cmd = ["qemu-nbd", "--persistent", "--shared=8", "--read-only", "-f", "qcow2", "--socket", sock]
    if bitmap:
        cmd += ["-B", bitmap]
    p = subprocess.Popen(cmd + [image], stderr=subprocess.DEVNULL)
    for _ in range(200):
        if os.path.exists(sock):
            return p
        time.sleep(0.05)
    p.kill()
    raise SystemExit("qemu-nbd did not start")


def stop(p):
    if p and p.poll() is None:
        p.terminate()
        p.wait(10)


def dirty_extents(uri):
    out = subprocess.run(["nbdinfo", "--json", f"--map=qemu:dirty-bitmap:{BITMAP}", uri],
                         check=True, capture_output=True, text=True).stdout
    return [(e["offset"], e["length"]) for e in json.loads(out) if e["type"] & 1]


def nbdcopy_extents(work, qemu_sock, extents, cache, qcow):
    """Copies just `extents` of the export to a file with nbdcopy, the way
    a user of libnbd's tools would; returns the seconds nbdcopy took."""
    listing = os.path.join(work, "dirty.txt")
    with open(listing, "w") as f:
        f.writelines(f"{o} {l}\n" for o, l in extents)
    sock = os.path.join(work, "dirty.sock")
    proxy = subprocess.Popen(["nbdkit", "--foreground", "--exit-with-parent", "-U", sock,
                              "--filter=extentlist", "nbd", f"socket={qemu_sock}", f"extentlist={listing}"],
                             stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if os.path.exists(sock):
                break
            time.sleep(0.05)
        out = os.path.join(work, "nbdcopy.raw")
        cache.prepare(qcow)
        secs, _ = timed(["nbdcopy", f"nbd+unix:///?socket={sock}", out])
        os.remove(out)
        return secs
    finally:
        stop(proxy)


def bitmap_run(args, bins, cache, work):
    size = int(args.size_gib * GiB)
    raw = os.path.join(work, "base.raw")
    qcow = os.path.join(work, "disk.qcow2")
    make_image(raw, size, args.seed)
    log("converting to qcow2")
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", raw, qcow], check=True)
    os.remove(raw)
    subprocess.run(["qemu-img", "bitmap", "--add", "--enable", qcow, BITMAP], check=True)
    sock = os.path.join(work, "nbd.sock")
    uri = f"nbd+unix:///?socket={sock}"
    pki = os.path.join(work, "pki")
    make_pki(os.path.join(bins, "tideline-controller"), pki)
    with_bitmap = Cluster(bins, pki, os.path.join(work, "bitmap"), uri, disk_extra=f'dirty_bitmap = "{BITMAP}"\n')
    scanning = Cluster(bins, pki, os.path.join(work, "scan"), uri)
    server = qemu_nbd(qcow, sock, BITMAP)
    res = {"size": size}
    try:
        for name, c in (("bitmap", with_bitmap), ("scan", scanning)):
            c.start_controller()
            c.start_agent()
            log(f"full sync ({name})")
            c.sync()
            c.stop_agent()
        stop(server)

        n = int(size * 0.01) // (64 * 1024)
        rng = random.Random(args.seed + 1)
        offsets = rng.sample(range(size // (64 * 1024)), n)
        script = "".join(f"write -P {rng.randrange(1, 255)} {o * 65536} 64k\n" for o in offsets)
        log(f"{n} scattered 64 KiB writes with qemu-io")
        subprocess.run(["qemu-io", "-f", "qcow2", qcow], input=script, text=True, check=True,
                       stdout=subprocess.DEVNULL)
        server = qemu_nbd(qcow, sock, BITMAP)
        extents = dirty_extents(uri)
        res["dirty_bytes"] = sum(l for _, l in extents)
        res["dirty_extents"] = len(extents)

        for name, c in (("bitmap", with_bitmap), ("scan", scanning)):
            cache.prepare(qcow)
            c.start_agent()
            log(f"incremental sync ({name})")
            res[name] = c.sync()
            c.stop_agent()

        cache.prepare(qcow)
        reads = "".join(f"read {o} {l}\n" for o, l in extents)
        secs, _ = timed(["qemu-io", "-r", "-f", "raw", uri], input=reads, text=True, stdout=subprocess.DEVNULL)
        res["qemu_io_dirty_secs"] = secs
        res["nbdcopy_dirty_secs"] = nbdcopy_extents(work, sock, extents, cache, qcow)

        log("checking the replica against qemu-img convert")
        expected = os.path.join(work, "expected.raw")
        subprocess.run(["qemu-img", "convert", "-O", "raw", qcow, expected], check=True)
        exported = os.path.join(work, "exported.raw")
        with_bitmap.admin("export", "--agent", bench.AGENT_ID, "--disk", bench.DISK_ID, "--out", exported)
        res["replica_identical"] = subprocess.run(["cmp", "-s", expected, exported]).returncode == 0
    finally:
        stop(server)
        with_bitmap.stop()
        scanning.stop()
    return res


def vmdk_run(args, bins, cache, work):
    size = int(args.vmdk_gib * GiB)
    raw = os.path.join(work, "vmdk-src.raw")
    vmdk = os.path.join(work, "disk.vmdk")
    make_image(raw, size, args.seed + 2)
    log("converting to streamOptimized VMDK")
    subprocess.run(["qemu-img", "convert", "-O", "vmdk", "-o", "subformat=streamOptimized", raw, vmdk], check=True)
    res = {"size": size, "vmdk_bytes": os.path.getsize(vmdk)}
    out_q = os.path.join(work, "qemu.raw")
    out_t = os.path.join(work, "tideline.raw")
    cache.prepare(vmdk)
    res["qemu_img_secs"], _ = timed(["qemu-img", "convert", "-O", "raw", vmdk, out_q])
    cache.prepare(vmdk)
    res["tideline_secs"], _ = timed([os.path.join(bins, "tideline-agent"), "dump", "--path", vmdk, "--out", out_t],
                                    stdout=subprocess.DEVNULL)
    res["identical"] = (subprocess.run(["cmp", "-s", raw, out_t]).returncode == 0
                        and subprocess.run(["cmp", "-s", raw, out_q]).returncode == 0)
    return res


def print_results(b, v):
    rows = []
    if b:
        bm, sc = b["bitmap"], b["scan"]
        r1 = bm["elapsed_secs"] / sc["elapsed_secs"]
        r2 = bm["elapsed_secs"] / b["nbdcopy_dirty_secs"]
        r3 = bm["elapsed_secs"] / b["qemu_io_dirty_secs"]
        rows.append(("incremental via dirty bitmap vs hash-scan incremental",
                     f"{bm['elapsed_secs']:.2f} s", f"{sc['elapsed_secs']:.2f} s", f"{r1:.3f}x time", "<= 0.10x",
                     bench.verdict(r1 <= 0.10)))
        rows.append(("incremental via dirty bitmap vs nbdcopy of the dirty extents",
                     f"{bm['elapsed_secs']:.2f} s", f"{b['nbdcopy_dirty_secs']:.2f} s", f"{r2:.2f}x time", "<= 2x",
                     bench.verdict(r2 <= 2.0)))
        rows.append(("(lower bound) vs qemu-io read of the dirty extents, no write",
                     f"{bm['elapsed_secs']:.2f} s", f"{b['qemu_io_dirty_secs']:.2f} s", f"{r3:.2f}x time", "-", "-"))
    if v:
        r = v["qemu_img_secs"] / v["tideline_secs"]
        mib = v["size"] / MiB
        rows.append(("streamOptimized VMDK read vs qemu-img convert -O raw",
                     f"{mib / v['tideline_secs']:.0f} MiB/s", f"{mib / v['qemu_img_secs']:.0f} MiB/s",
                     f"{r:.2f}x", ">= 0.8x", bench.verdict(r >= 0.8)))
    bench.print_table(("measurement", "tideline", "reference", "ratio", "target", "result"), rows)
    if b:
        print(f"\nbitmap run: {b['size'] / GiB:.0f} GiB image, {b['dirty_extents']} dirty extents, "
              f"{b['dirty_bytes'] / MiB:.1f} MiB dirty; bitmap incremental sent {b['bitmap']['blocks_received']} "
              f"blocks, scan incremental {b['scan']['blocks_received']}; replica identical to qemu-img convert: "
              f"{b['replica_identical']}; bitmap incremental: last block at {b['bitmap'].get('scanned_secs')} s, "
              f"done (committed) at {b['bitmap']['elapsed_secs']:.3f} s")
    if v:
        print(f"vmdk run: {v['size'] / GiB:.1f} GiB image, {v['vmdk_bytes'] / MiB:.0f} MiB streamOptimized file; "
              f"outputs identical to the source: {v['identical']}")


def run(args, bins, cache, work):
    b = bitmap_run(args, bins, cache, work) if not args.skip_bitmap else None
    v = vmdk_run(args, bins, cache, work) if not args.skip_vmdk else None
    print_results(b, v)
    return {"bitmap": b, "vmdk": v}
