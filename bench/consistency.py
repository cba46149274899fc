"""Consistency benchmarks (scripts/bench.sh --consistency), against what an
administrator would otherwise get, in the same run:

  tracked incremental    an incremental of a block device (loop over the
                         image) after 1% changed, with the eBPF write tracker,
                         against the hash-scan incremental of the same device
                         with tracking off, and b3sum of the device
  tracking overhead      fio 4 KiB random direct writes, iodepth 32, on a loop
                         device over a file in /dev/shm (the fastest device
                         here, so the tracker's cost shows most), with the
                         disk tracked vs no tracker loaded, alternating runs
  freeze window          20 points of an ext4 disk written at a sustained
                         50 MB/s (fio, buffered, rate-limited) while a SQLite
                         database commits durably on it: each point's frozen
                         time, and the database's commit latency with and
                         without syncs running

Needs root (loop devices, eBPF, FIFREEZE), fio and sqlite3.
"""

import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time

import bench as b

MiB, GiB = b.MiB, b.GiB


def sh(*cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout.strip()


class Loop:
    """A loop device over `path` (detached on exit)."""

    def __init__(self, path):
        self.dev = sh("losetup", "--find", "--show", path)

    def close(self):
        subprocess.run(["losetup", "-d", self.dev], check=False)


def tracking_extra(pin_dir, on=True):
    return f'\n[tracking]\nebpf = {"true" if on else "false"}\npin_dir = "{pin_dir}"\n'


def remove_pins(pin_dir):
    shutil.rmtree(pin_dir, ignore_errors=True)


def percentile(xs, p):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, int(round(p / 100 * (len(xs) - 1)))))
    return xs[k]


# ------------------------------------------------------ tracked incremental


def incremental_phase(args, bins, cache, work, pki, dev, image, size, tracked, seed):
    """A full sync, 1% of the device rewritten, then the timed incremental."""
    label = "tracked" if tracked else "hash-scan"
    pins = f"/sys/fs/bpf/tideline-bench-{label}"
    remove_pins(pins)
    cl = b.Cluster(bins, pki, os.path.join(work, label), dev, args.block_size,
                   tracking_extra(pins, tracked))
    cl.start_controller()
    try:
        cl.start_agent()
        b.log(f"{label}: full sync")
        full = cl.sync()
        writes = b.scatter_writes(dev, size, 0.01, 64 * b.KiB, seed)
        cache.prepare(image)
        b.log(f"{label}: incremental after {writes} writes")
        inc = cl.sync()
        inc["writes"] = writes
        inc["full_secs"] = full["elapsed_secs"]
        with open(os.path.join(cl.root, "agent.log")) as f:
            lines = [l for l in f if "disk copied" in l]
        inc["bytes_read"] = int(lines[-1].split(" bytes_read=")[1].split()[0]) if lines else None
    finally:
        cl.stop()
        remove_pins(pins)
    return inc


def tracked_run(args, bins, cache, work, pki):
    size = int(args.size_gib * GiB)
    image = os.path.join(work, "disk.img")
    b.log(f"writing a {args.size_gib:g} GiB image")
    mix = b.make_image(image, size, args.seed)
    loop = Loop(image)
    try:
        res = {"size": size, "mix": mix}
        res["hash"] = incremental_phase(args, bins, cache, work, pki, loop.dev, image, size, False, args.seed + 1)
        res["tracked"] = incremental_phase(args, bins, cache, work, pki, loop.dev, image, size, True, args.seed + 2)
        cache.prepare(image)
        secs, _ = b.timed(["b3sum", "--num-threads", "2", loop.dev], stdout=subprocess.DEVNULL)
        res["b3sum_secs"] = secs
    finally:
        loop.close()
        os.unlink(image)
    return res


# -------------------------------------------------------- tracking overhead


def fio_run(dev, secs):
    """IOPS and I/O count of one fio run."""
    out = sh("fio", "--name=w", f"--filename={dev}", "--rw=randwrite", "--bs=4k", "--direct=1",
             "--ioengine=libaio", "--iodepth=32", f"--runtime={secs}", "--time_based",
             "--group_reporting", "--output-format=json", "--size=1g")
    w = json.loads(out)["jobs"][0]["write"]
    return w["iops"], w["total_ios"]


def bpf_run_ns():
    """Total run time (ns) and runs of the tracker's programs, from the
    kernel's own statistics (kernel.bpf_stats_enabled)."""
    progs = json.loads(sh("bpftool", "prog", "show", "-j"))
    ours = [p for p in progs if p.get("name", "").startswith("tl_")]
    return sum(p.get("run_time_ns", 0) for p in ours), sum(p.get("run_cnt", 0) for p in ours)


def overhead_run(args, bins, work, pki):
    backing = "/dev/shm/tideline-bench-fio.img"
    with open(backing, "wb") as f:
        f.truncate(1 * GiB)
    loop = Loop(backing)
    pins = "/sys/fs/bpf/tideline-bench-fio"
    remove_pins(pins)
    cl = b.Cluster(bins, pki, os.path.join(work, "fio"), loop.dev, None, tracking_extra(pins))
    on, off = [], []
    ns_per_io = []
    try:
        cl.start_controller()
        # A first point registers the device with the tracker; the agent then
        # stays idle and the program stays attached through its pins.
        cl.start_agent()
        cl.sync()
        cl.stop_agent()
        fio_run(loop.dev, 3)  # warm-up
        # The programs' own run time, from the kernel's statistics. Keeping
        # them costs time on every run, so the IOPS runs below go without.
        subprocess.run(["sysctl", "-qw", "kernel.bpf_stats_enabled=1"], check=False)
        ns0, _ = bpf_run_ns()
        _, ios = fio_run(loop.dev, args.fio_secs)
        ns1, _ = bpf_run_ns()
        subprocess.run(["sysctl", "-qw", "kernel.bpf_stats_enabled=0"], check=False)
        ns_per_io.append((ns1 - ns0) / max(ios, 1))
        for i in range(args.fio_rounds):
            on.append(fio_run(loop.dev, args.fio_secs)[0])
            # Detach: without pins and without a process holding them, the
            # links go and the program with them.
            remove_pins(pins)
            time.sleep(0.5)
            off.append(fio_run(loop.dev, args.fio_secs)[0])
            b.log(f"fio round {i + 1}: tracked {on[-1]:.0f} IOPS, untracked {off[-1]:.0f} IOPS")
            if i + 1 < args.fio_rounds:
                cl.start_agent()
                cl.sync()
                cl.stop_agent()
    finally:
        subprocess.run(["sysctl", "-qw", "kernel.bpf_stats_enabled=0"], check=False)
        cl.stop()
        remove_pins(pins)
        loop.close()
        os.unlink(backing)
    return {"on": on, "off": off, "secs": args.fio_secs, "bpf_ns_per_io": ns_per_io}


# ------------------------------------------------------------ freeze window


def freeze_run(args, bins, work, pki):
    image = os.path.join(work, "fs.img")
    with open(image, "wb") as f:
        f.truncate(2 * GiB)
    loop = Loop(image)
    mnt = os.path.join(work, "fs.mnt")
    os.makedirs(mnt)
    pins = "/sys/fs/bpf/tideline-bench-freeze"
    remove_pins(pins)
    sh("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", loop.dev)
    sh("mount", loop.dev, mnt)
    procs = []
    res = {}
    try:
        lat = os.path.join(work, "latency.txt")
        progress = os.path.join(work, "progress")
        script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "tests", "workloads", "sqlite_writer.py")
        db = subprocess.Popen([sys.executable, script, os.path.join(mnt, "app.db"), progress,
                               "--latency", lat, "--payload", "4096"], stderr=subprocess.DEVNULL)
        procs.append(db)
        # The sustained load: 50 MB/s of buffered writes over a 512 MiB file,
        # again and again.
        fio = subprocess.Popen(["fio", "--name=load", "--thread", f"--filename={mnt}/load.dat", "--rw=write",
                                "--bs=1m", "--size=512m", "--rate=50m", "--time_based",
                                f"--runtime={args.freeze_points * 60}", "--direct=0",
                                "--output=/dev/null"])
        procs.append(fio)
        time.sleep(5)
        quiet_from = time.time()
        time.sleep(args.quiet_secs)
        quiet_to = time.time()
        cl = b.Cluster(bins, pki, os.path.join(work, "freeze"), loop.dev, None, tracking_extra(pins))
        cl.start_controller()
        windows = []
        spans = []
        try:
            cl.start_agent()
            for i in range(args.freeze_points + 1):
                t0 = time.time()
                cl.sync()
                spans.append((t0, time.time()))
                if i == 0:
                    continue  # the first point's full copy is not the case measured
                pts = cl.admin("points", "--agent", b.AGENT_ID, "--disk", b.DISK_ID)
                c = pts[-1]["consistency"]
                windows.append({"frozen_ms": c["frozen_ms"], "level": c["level"], "rounds": c["rounds"],
                                "note": c["note"]})
                b.log(f"point {i}: {c['level']}, frozen {c['frozen_ms']} ms, {c['rounds']} rounds")
        finally:
            cl.stop()
        res["points"] = windows
        quiet, during = [], []
        with open(lat) as f:
            for line in f:
                t, ms = line.split()
                t, ms = float(t), float(ms)
                if quiet_from <= t <= quiet_to:
                    quiet.append(ms)
                elif any(s <= t <= e for s, e in spans[1:]):
                    during.append(ms)
        res["commit_ms_quiet"] = quiet
        res["commit_ms_during_sync"] = during
    finally:
        for p in procs:
            p.kill()
            p.wait()
        subprocess.run(["fsfreeze", "-u", mnt], capture_output=True)
        subprocess.run(["umount", mnt], check=False)
        loop.close()
        remove_pins(pins)
        os.unlink(image)
    return res


# --------------------------------------------------------------- reporting


def print_results(res):
    rows = []
    t = res.get("tracked")
    if t:
        tr, hs = t["tracked"], t["hash"]
        r = tr["elapsed_secs"] / hs["elapsed_secs"]
        rows.append(("incremental after 1%: eBPF tracking vs hash scan", f"{tr['elapsed_secs']:.2f} s",
                     f"{hs['elapsed_secs']:.2f} s", f"{r:.3f}x time", "<= 0.10x", b.verdict(r <= 0.10)))
        r = tr["elapsed_secs"] / t["b3sum_secs"]
        rows.append(("incremental after 1%: eBPF tracking vs b3sum of the device", f"{tr['elapsed_secs']:.2f} s",
                     f"{t['b3sum_secs']:.2f} s", f"{r:.3f}x time", "-", "-"))
        rows.append(("bytes read by the incremental", f"{tr['bytes_read'] / MiB:.1f} MiB",
                     f"{hs['bytes_read'] / MiB:.1f} MiB (hash scan)", f"{tr['bytes_read'] / hs['bytes_read']:.3f}x",
                     "-", "-"))
    o = res.get("overhead")
    if o:
        on, off = statistics.median(o["on"]), statistics.median(o["off"])
        loss = 1 - on / off
        rows.append(("fio 4 KiB randwrite iodepth 32: tracked vs untracked (median IOPS)", f"{on:.0f}",
                     f"{off:.0f}", f"{loss * 100:.1f}% loss", "<= 3%", b.verdict(loss <= 0.03)))
        if o.get("bpf_ns_per_io"):
            ns = statistics.median(o["bpf_ns_per_io"])
            share = ns * off / 1e9
            rows.append(("tracker's BPF run time per write (kernel bpf_stats, its own cost included)",
                         f"{ns:.0f} ns", f"{1e9 / off:.0f} ns per write untracked",
                         f"{share * 100:.1f}% of a core at that rate", "-", "-"))
    f = res.get("freeze")
    if f:
        ms = [p["frozen_ms"] for p in f["points"]]
        p99 = percentile(ms, 99)
        rows.append((f"freeze window at 50 MB/s writes, {len(ms)} points (p99)", f"{p99:.0f} ms",
                     f"median {statistics.median(ms):.0f} ms, max {max(ms)} ms", "-", "<= 500 ms",
                     b.verdict(p99 <= 500)))
        q, d = f["commit_ms_quiet"], f["commit_ms_during_sync"]
        if q and d:
            rows.append(("SQLite commit latency p99: during syncs vs without", f"{percentile(d, 99):.1f} ms",
                         f"{percentile(q, 99):.1f} ms", f"{percentile(d, 99) / percentile(q, 99):.2f}x",
                         "reported", "-"))
            rows.append(("SQLite commit latency median: during syncs vs without", f"{statistics.median(d):.1f} ms",
                         f"{statistics.median(q):.1f} ms", f"{statistics.median(d) / statistics.median(q):.2f}x",
                         "reported", "-"))
    print()
    b.print_table(("measurement", "tideline", "reference", "ratio", "target", "result"), rows)
    if t:
        tr, hs = t["tracked"], t["hash"]
        print(f"\n{t['size'] / GiB:g} GiB image; {tr['writes']} and {hs['writes']} scattered 64 KiB writes; "
              f"full syncs {hs['full_secs']:.1f} s (hash) and {tr['full_secs']:.1f} s (tracked); "
              f"blocks sent {tr['blocks_received']} (tracked), {hs['blocks_received']} (hash)")
    if o:
        pairs = [a / c for a, c in zip(o["on"], o["off"])]
        print(f"fio IOPS, {o['secs']} s runs alternating: tracked {[round(x) for x in o['on']]}, "
              f"untracked {[round(x) for x in o['off']]}; median of the paired ratios "
              f"{statistics.median(pairs):.3f} ({(1 - statistics.median(pairs)) * 100:.1f}% loss)")
    if f:
        print("freeze windows (ms): " + ", ".join(str(p["frozen_ms"]) for p in f["points"]))
        levels = sorted({p["level"] for p in f["points"]})
        print(f"levels: {levels}; rounds: {[p['rounds'] for p in f['points']]}")
        print(f"commits sampled: {len(f['commit_ms_quiet'])} without syncs, {len(f['commit_ms_during_sync'])} during")


def run(args, bins, cache, work):
    if os.geteuid() != 0:
        raise SystemExit("--consistency needs root (loop devices, eBPF, FIFREEZE)")
    for tool in ("fio", "losetup", "mkfs.ext4", "sqlite3", "b3sum"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found; run scripts/install-deps.sh")
    pki = os.path.join(work, "pki")
    b.make_pki(os.path.join(bins, "tideline-controller"), pki)
    res = {}
    if not args.skip_tracked:
        res["tracked"] = tracked_run(args, bins, cache, work, pki)
    if not args.skip_overhead:
        res["overhead"] = overhead_run(args, bins, work, pki)
    if not args.skip_freeze:
        res["freeze"] = freeze_run(args, bins, work, pki)
    print_results(res)
    return res
