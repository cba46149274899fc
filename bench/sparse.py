#!/usr/bin/env python3
"""Large sparse disks (issue 14), run by `scripts/bench.sh --sparse`.

A 2 TiB + 64 MiB raw image holding 1 MiB of random data at its start, its
middle and its end is read three ways, each against the tool a user would
otherwise reach for, in the same run:

* as a monolithicSparse VMDK and as a streamOptimized VMDK (both written by
  `qemu-img convert`): `tideline-agent dump` against `qemu-img convert -O
  raw` of the same file;
* served by `qemu-nbd` (read-only, raw): `tideline-agent dump` of the
  `nbd+unix://` URI against `nbdcopy` of it.

Every output is checked at the three data runs against the source. Target:
the agent at least as fast as each reference (ratio <= 1.0x).
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

MiB = 1 << 20
SIZE = (2 << 40) + 64 * MiB
DATA_AT = (0, 1 << 40, SIZE - MiB)


def timed(cmd):
    t0 = time.perf_counter()
    r = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return time.perf_counter() - t0, r.stdout


def same_data(out, raw):
    with open(out, "rb") as a, open(raw, "rb") as b:
        for at in DATA_AT:
            a.seek(at)
            b.seek(at)
            if a.read(MiB) != b.read(MiB):
                return False
    return os.path.getsize(out) == SIZE


def best_of(n, fn):
    """The fastest of n runs (each run's output is checked by fn)."""
    return min(fn() for _ in range(n))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bin-dir", required=True)
    p.add_argument("--workdir")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--json")
    args, _ = p.parse_known_args()
    agent = os.path.join(args.bin_dir, "tideline-agent")
    work = tempfile.mkdtemp(prefix="tideline-sparse-", dir=args.workdir)
    rows = []
    try:
        raw = os.path.join(work, "big.raw")
        rng = random.Random(14)
        with open(raw, "wb") as f:
            f.truncate(SIZE)
            for at in DATA_AT:
                f.seek(at)
                f.write(rng.randbytes(MiB))
        out = os.path.join(work, "out.raw")

        def dump(location):
            def once():
                if os.path.exists(out):
                    os.unlink(out)
                secs, text = timed([agent, "dump", "--path", location, "--out", out])
                stats = json.loads(text)
                if stats["bytes_read"] != 3 * MiB or not same_data(out, raw):
                    raise SystemExit(f"dump of {location} is wrong: {stats}")
                return secs
            return best_of(args.runs, once)

        def reference(cmd):
            def once():
                if os.path.exists(out):
                    os.unlink(out)
                secs, _ = timed(cmd)
                if not same_data(out, raw):
                    raise SystemExit(f"{cmd[0]} output differs")
                return secs
            return best_of(args.runs, once)

        for sub in ("monolithicSparse", "streamOptimized"):
            vmdk = os.path.join(work, f"{sub}.vmdk")
            subprocess.run(["qemu-img", "convert", "-O", "vmdk", "-o", f"subformat={sub}", raw, vmdk],
                           check=True)
            ours = dump(vmdk)
            theirs = reference(["qemu-img", "convert", "-O", "raw", vmdk, out])
            rows.append((f"dump of a 2 TiB sparse {sub} VMDK vs qemu-img convert -O raw", ours, theirs))
            os.unlink(vmdk)

        sock = os.path.join(work, "nbd.sock")
        server = subprocess.Popen(["qemu-nbd", "--persistent", "--shared=8", "--read-only", "-f", "raw",
                                   "--socket", sock, "--export-name=disk", raw], stderr=subprocess.DEVNULL)
        try:
            for _ in range(200):
                if os.path.exists(sock):
                    break
                time.sleep(0.05)
            uri = f"nbd+unix:///disk?socket={sock}"
            ours = dump(uri)
            theirs = reference(["nbdcopy", uri, out])
            rows.append(("dump of a 2 TiB sparse NBD export vs nbdcopy", ours, theirs))
        finally:
            server.terminate()
            server.wait(10)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n2 TiB + 64 MiB disk, 3 MiB of data; best of {args.runs} runs each")
    print(f"{'measure':<66} {'tideline':>10} {'reference':>10} {'ratio':>8} target  verdict")
    result = []
    for name, ours, theirs in rows:
        r = ours / theirs
        verdict = "PASS" if r <= 1.0 else "MISS"
        print(f"{name:<66} {ours:>8.3f} s {theirs:>8.3f} s {r:>7.3f}x <= 1.0x  {verdict}")
        result.append({"measure": name, "secs": ours, "reference_secs": theirs, "ratio": r})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
