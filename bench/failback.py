#!/usr/bin/env python3
"""Tideline failback benchmark, run by `scripts/bench.sh --failback`.

One controller, a source agent that protects a disk image (bench.py's
realistic mix), and a failback agent with one empty raw target (a sparse
file of the image's size) and no disk of its own, all on 127.0.0.1 over
mutual TLS.

1. Full failback: the source's first point into the empty target; the
   pass's throughput (image size / pass elapsed_secs) against
   `zstd -d -T2` of the same image compressed once with `zstd -1 -T2`
   (untimed), decompressed to /dev/null.
2. Incremental failback after 1% of the image changed (scattered 64 KiB
   writes, then a sync of the source, a new point): once described by the
   previous pass's map, and, after another 1% change, once with --rescan
   (the agent describes the target by reading it). Reference:
   `b3sum --num-threads 2` of the target plus the changed bytes at the
   full pass's throughput.
3. The target is compared (`cmp`) with an export of the source's latest
   point.

The page cache is put in the same state before every timed command (bench.py's
--cache: cold drops it, needs root). Results: a table on stdout and
<workdir>/results.json (and --json).
"""

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402
from bench import GiB, KiB, MiB, Cache, Cluster, CpuSampler, log, make_image, make_pki, scatter_writes, \
    synced_phase, timed  # noqa: E402

FB_AGENT = "bench-failback"
TARGET_ID = "t0"


def store_files(store):
    out = []
    for d, _, files in os.walk(store):
        out += [os.path.join(d, f) for f in files]
    return out


class FailbackAgent:
    """The failback agent: no disk, one [[target]]."""

    def __init__(self, cluster, pki, target):
        self.cl = cluster
        self.root = os.path.join(cluster.root, "failback")
        state = os.path.join(self.root, "state")
        shutil.rmtree(self.root, ignore_errors=True)
        os.makedirs(state)
        with open(cluster.ctl_conf) as f:
            address = next(l.split('"')[1] for l in f if l.startswith("address"))
        self.conf = os.path.join(self.root, "agent.toml")
        with open(self.conf, "w") as f:
            f.write(
                f'[controller]\naddress = "{address}"\nserver_name = "localhost"\n'
                f'[tls]\nca = "{pki}/ca.crt"\ncert = "{pki}/{FB_AGENT}.crt"\nkey = "{pki}/{FB_AGENT}.key"\n'
                f'[state]\ndir = "{state}"\n'
                f'[[target]]\nid = "{TARGET_ID}"\npath = "{target}"\n'
            )
        self.proc = None
        self.log = open(os.path.join(self.root, "agent.log"), "a")

    def connected(self):
        try:
            return any(a["id"] == FB_AGENT and a["connected"] for a in self.cl.admin("agents"))
        except (RuntimeError, ValueError):
            return False

    def start(self):
        self.proc = subprocess.Popen([self.cl.agent_bin, "--config", self.conf, "run"], stderr=self.log)
        for _ in range(300):
            if self.connected():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise SystemExit(f"failback agent did not connect; see {self.root}/agent.log")

    def stop(self):
        if self.proc is None:
            return None
        hwm = bench.proc_status(self.proc.pid, "VmHWM")
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        return hwm

    def run_pass(self, rescan=False, timeout=1800):
        """Starts a pass and polls it (0.2 s, like bench.py's sync) until it
        ends; returns the pass's final status with the controller's
        elapsed_secs, when it left "describing" (the describe phase: map
        check or target scan) and when every differing block had been sent,
        plus CPU figures."""
        sampler = CpuSampler({"fb-agent": self.proc.pid, "controller": self.cl.ctl.pid})
        sampler.start()
        t0 = time.perf_counter()
        args = ["failback", "--agent", FB_AGENT, "--target", f"{TARGET_ID}={bench.AGENT_ID}/{bench.DISK_ID}",
                "--no-wait"] + (["--rescan"] if rescan else [])
        session = self.cl.admin(*args)["session"]
        described = sent = None
        while True:
            s = self.cl.admin("passes", str(session))
            if isinstance(s, list):
                s = s[0]
            t = s["targets"][0] if s["targets"] else {}
            if described is None and s["state"] != "describing":
                described = s["elapsed_secs"]
            if (sent is None and s["state"] == "writing" and t.get("differing_blocks") is not None
                    and t.get("compared_blocks") == t.get("block_count")
                    and t.get("sent_blocks") == t.get("differing_blocks")):
                sent = s["elapsed_secs"]
            if s["state"] in ("done", "failed"):
                break
            if time.perf_counter() - t0 > timeout:
                raise SystemExit(f"pass {session} still {s['state']} after {timeout}s")
            time.sleep(0.2)
        wall = time.perf_counter() - t0
        sampler.stop()
        if s["state"] != "done":
            raise SystemExit(f"pass {session} failed: {s.get('error')}; see {self.root}/agent.log")
        return {"status": s, "target": s["targets"][0], "elapsed_secs": s["elapsed_secs"], "wall_secs": wall,
                "described_secs": described, "sent_secs": sent, "cpu": sampler.report(s["elapsed_secs"])}


def pass_line(label, p):
    t = p["target"]
    d = f"{p['described_secs']:.2f}s" if p["described_secs"] is not None else "-"
    s = f"{p['sent_secs']:.2f}s" if p["sent_secs"] is not None else "-"
    return (f"{label}: {p['elapsed_secs']:.2f}s (wall {p['wall_secs']:.2f}s), described_by {t['described_by']}, "
            f"describe done at {d}, last block sent at {s}; compared {t['compared_blocks']}, "
            f"differing {t['differing_blocks']}, sent {t['sent_blocks']} ({t['sent_bytes'] / MiB:.1f} MiB stored, "
            f"{t['sent_raw_bytes'] / MiB:.1f} MiB decoded), written {t['written_blocks']}, "
            f"verified {t['verified_blocks']}, verified root {t['verified']}")


def run(args, bins, cache, work):
    size = int(args.size_gib * GiB)
    image = os.path.join(work, "disk.img")
    zst = os.path.join(work, "disk.img.zst")
    target = os.path.join(work, "target.raw")
    pki = os.path.join(work, "pki")
    ctl_bin = os.path.join(bins, "tideline-controller")
    make_pki(ctl_bin, pki)
    subprocess.run([ctl_bin, "ca", "issue-agent", "--ca-dir", f"{pki}/ca", "--out", pki, "--id", FB_AGENT],
                   check=True, stdout=subprocess.DEVNULL)
    res = {"size": size}

    log(f"writing a {args.size_gib:g} GiB image")
    res["mix"] = make_image(image, size, args.seed)
    log("zstd -1 -T2 (untimed), then zstd -d to /dev/null (timed)")
    subprocess.run(["zstd", "-q", "-f", "-1", "-T2", image, "-o", zst], check=True)
    res["zst_bytes"] = os.path.getsize(zst)
    cache.prepare(zst)
    secs, r = timed(["zstd", "-q", "-d", "-T2", "-c", zst], stdout=subprocess.DEVNULL)
    res["zstd_d"] = {"secs": secs, "cpu_secs": r.cpu_secs}
    os.unlink(zst)

    cl = Cluster(bins, pki, os.path.join(work, "main"), image, args.block_size)
    fb = None
    cl.start_controller()
    try:
        res["sync_full"] = synced_phase(cl, cache, image, "source full sync")
        with open(target, "wb") as f:
            f.truncate(size)
        fb = FailbackAgent(cl, pki, target)
        fb.start()

        cache.prepare(target, *store_files(cl.store))
        log("pass 1: full failback into the empty target")
        res["full"] = fb.run_pass()
        log(pass_line("pass 1", res["full"]))

        for name, seed, rescan in (("map", 100, False), ("rescan", 200, True)):
            res[f"writes_{name}"] = scatter_writes(image, size, 0.01, 64 * KiB, args.seed + seed)
            res[f"sync_{name}"] = synced_phase(cl, cache, image, f"source incremental sync (before the {name} pass)")
            cache.prepare(target, *store_files(cl.store))
            log(f"incremental failback pass ({'--rescan' if rescan else 'map'})")
            res[name] = fb.run_pass(rescan=rescan)
            log(pass_line(name, res[name]))
        res["fb_agent_vmhwm"] = fb.stop()

        log("b3sum --num-threads 2 of the target")
        res["b3sum"] = bench.ref_b3sum(cache, target)

        log("checking the target against an export of the latest point")
        exported = os.path.join(work, "exported.raw")
        cl.admin("export", "--agent", bench.AGENT_ID, "--disk", bench.DISK_ID, "--point", "latest",
                 "--out", exported)
        res["target_identical"] = subprocess.run(["cmp", "-s", exported, target]).returncode == 0
        res["image_identical"] = subprocess.run(["cmp", "-s", image, target]).returncode == 0
        os.unlink(exported)
    finally:
        if fb is not None:
            fb.stop()
        res["controller_vmhwm"] = cl.stop()
    return res


def print_results(res, cache):
    size = res["size"]
    full = res["full"]
    mib = size / MiB
    tp = size / full["elapsed_secs"]
    tp_z = size / res["zstd_d"]["secs"]
    rows = []
    r = tp / tp_z
    rows.append(("full failback throughput vs zstd -d -T2 to /dev/null",
                 f"{tp / MiB:.0f} MiB/s ({full['elapsed_secs']:.2f} s)",
                 f"{tp_z / MiB:.0f} MiB/s ({res['zstd_d']['secs']:.2f} s)", f"{r:.2f}x", ">= 0.7x",
                 bench.verdict(r >= 0.7)))
    b3 = res["b3sum"]["secs"]
    for name in ("map", "rescan"):
        p = res[name]
        changed = res[f"writes_{name}"] * 64 * KiB
        ref = b3 + changed / tp
        r = p["elapsed_secs"] / ref
        rows.append((f"incremental failback (1%, {'map' if name == 'map' else '--rescan'}) vs b3sum + send",
                     f"{p['elapsed_secs']:.2f} s", f"{ref:.2f} s ({b3:.2f} + {changed / tp:.2f})",
                     f"{r:.2f}x time", "<= 1.5x", bench.verdict(r <= 1.5)))
    ok = res["target_identical"]
    rows.append(("target identical to export of the latest point (cmp)", str(ok), "-", "-", "identical",
                 bench.verdict(ok)))
    mix = ", ".join(f"{k} {v / size * 100:.1f}%" for k, v in res["mix"].items())
    print()
    print(f"Tideline failback benchmark: {size / GiB:g} GiB image ({mix}), zstd -1 output "
          f"{res['zst_bytes'] / MiB:.0f} MiB, {cache.mode} cache before every timed command; "
          f"1% changed as {res['writes_map']} scattered 64 KiB writes before each incremental pass")
    print()
    bench.print_table(("measurement", "tideline", "reference", "ratio", "target", "result"), rows)
    print()
    for label, key in (("full pass", "full"), ("map pass", "map"), ("rescan pass", "rescan")):
        print(pass_line(label, res[key]))
        print("    " + bench.cpu_lines(label, res[key]).split("\n", 1)[0].split(": ", 1)[1])
    print(f"b3sum of the target {b3:.2f}s (CPU {res['b3sum']['cpu_secs']:.2f}s); zstd -d CPU "
          f"{res['zstd_d']['cpu_secs']:.2f}s; failback agent VmHWM {(res['fb_agent_vmhwm'] or 0) / MiB:.1f} MiB, "
          f"controller VmHWM {(res['controller_vmhwm'] or 0) / MiB:.1f} MiB; target identical to the image: "
          f"{res['image_identical']}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin-dir", required=True, help="directory with tideline-agent and tideline-controller")
    p.add_argument("--size-gib", type=float, default=4, help="image size (default 4)")
    p.add_argument("--block-size", type=bench.size_arg, default=None, help="agent block size (default: the agent's)")
    p.add_argument("--workdir", default="/tmp/tideline-bench-failback")
    p.add_argument("--keep", action="store_true", help="keep the workdir")
    p.add_argument("--cache", choices=("auto", "cold", "warm"), default="auto",
                   help="page cache before every timed command (auto: cold when possible)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    for tool in ("zstd", "b3sum", "cmp"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found; run scripts/install-deps.sh")
    work = os.path.abspath(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    bins = os.path.abspath(args.bin_dir)
    cache = Cache(args.cache)
    started = datetime.datetime.now(datetime.timezone.utc)
    out = {"started": started.isoformat(timespec="seconds"), "argv": sys.argv[1:],
           "machine": bench.machine(), "cache": cache.mode}
    try:
        out["failback"] = run(args, bins, cache, work)
        out["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        for path in [os.path.join(work, "results.json")] + ([args.json] if args.json else []):
            with open(path, "w") as f:
                json.dump(out, f, indent=2)
        m = out["machine"]
        print(f"\nmachine: {m['nproc']} x {m['cpu']}, {m['mem_bytes'] / GiB:.1f} GiB RAM, kernel {m['kernel']}; "
              f"run {out['started']} .. {out['finished']}")
        print_results(out["failback"], cache)
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
