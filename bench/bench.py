#!/usr/bin/env python3
"""Tideline benchmark driver (python3 standard library only).

Measures the agent and the controller against the tools a user would
otherwise pick, in the same run, on the same image and the same cache state:

  full initial sync        vs  zstd -1 -T2 image > /dev/null  (throughput, bytes)
  incremental sync (1%)    vs  b3sum --num-threads 2 image     (time)
                           vs  rsync -I --inplace --no-whole-file image previous
  agent peak RSS (VmHWM)   per phase, and at a second disk size

and, with --block-size-study, compares block sizes on a smaller image.
Usually started through scripts/bench.sh, which builds the binaries first.
Results go to stdout as a table and to <workdir>/results.json (and --json).
"""

import argparse
import datetime
import json
import os
import platform
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

AGENT_ID = "bench-agent"
DISK_ID = "bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Share of the image (by bytes) taken by each kind of content.
CONTENT_MIX = (
    ("random", 0.35),  # incompressible: media, archives, encrypted files
    ("text", 0.35),  # compressible: logs, source, configuration
    ("zeros", 0.15),  # allocated but zero: preallocated files, zeroed space
    ("hole", 0.15),  # never written: sparse regions of the image
)
EXTENT_MIN = 16 * KiB
EXTENT_MAX = 16 * MiB

WORDS = (
    "replica recovery point block digest failback controller agent disk volume "
    "snapshot session commit checkpoint resume heartbeat request response error "
    "warning info debug user service kernel network socket timeout retry write "
    "read flush sync journal inode extent cache page buffer queue worker thread "
    "GET POST /api/v1/items /health /metrics status=200 status=404 status=500"
).split()
LEVELS = ("INFO", "INFO", "INFO", "DEBUG", "WARN", "ERROR")
COMPONENTS = ("sshd", "nginx", "postgres", "kernel", "systemd", "app", "cron")


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- content


def text_pool(rng, size=8 * MiB):
    """Log-like lines: timestamps, levels, counters, hex ids and words.

    zstd -1 compresses this about 3-4x. The pool is larger than zstd -1's
    window, so slicing it at random offsets does not hand zstd (or the
    store's deduplication) repeats that real text would not have.
    """
    out = []
    n = 0
    t = 1_700_000_000.0
    while n < size:
        t += rng.random() * 0.05
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t))
        line = (
            f"{ts}.{int(t * 1000) % 1000:03}Z {rng.choice(LEVELS)} "
            f"{rng.choice(COMPONENTS)}[{rng.randrange(100, 65000)}]: "
            f"{' '.join(rng.choice(WORDS) for _ in range(rng.randrange(3, 12)))} "
            f"id={rng.getrandbits(32):08x} bytes={rng.randrange(0, 1 << 20)} "
            f"ms={rng.random() * 100:.3f}\n"
        )
        out.append(line)
        n += len(line)
    pool = "".join(out).encode()[:size]
    return pool + pool  # doubled so any slice up to `size` wraps around


def text_bytes(rng, pool, n):
    half = len(pool) // 2
    assert n <= half
    start = rng.randrange(0, half)
    return pool[start : start + n]


def random_bytes(rng, n):
    return rng.randbytes(n)


def make_image(path, size, seed):
    """Writes a sparse image of `size` bytes with CONTENT_MIX in interleaved
    extents of 16 KiB..16 MiB (log-uniform sizes, 4 KiB aligned, so extents
    do not line up with blocks); returns the bytes of each kind written."""
    rng = random.Random(seed)
    pool = text_pool(rng)
    kinds = [k for k, _ in CONTENT_MIX]
    weights = [w for _, w in CONTENT_MIX]
    zeros = bytes(4 * MiB)
    got = {k: 0 for k in kinds}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        off = 0
        lo, hi = EXTENT_MIN.bit_length(), EXTENT_MAX.bit_length()
        while off < size:
            n = int(2 ** rng.uniform(lo - 1, hi - 1)) // (4 * KiB) * (4 * KiB)
            n = max(4 * KiB, min(n, size - off))
            # The kind furthest behind its share (with some noise), so the
            # mix holds at any image size while the order stays irregular.
            kind = max(kinds, key=lambda k: weights[kinds.index(k)] * (off + n) - got[k]
                       + rng.uniform(0, EXTENT_MAX))
            got[kind] += n
            pos = off
            while pos < off + n:
                m = min(4 * MiB, off + n - pos)
                if kind == "random":
                    os.pwrite(fd, random_bytes(rng, m), pos)
                elif kind == "text":
                    os.pwrite(fd, text_bytes(rng, pool, m), pos)
                elif kind == "zeros":
                    os.pwrite(fd, zeros[:m], pos)
                pos += m
            off += n
        os.fsync(fd)
    finally:
        os.close(fd)
    return got


def scatter_writes(path, size, fraction, write_size, seed):
    """Overwrites `fraction` of the image with writes of `write_size` bytes at
    distinct random offsets aligned to `write_size`; half the writes are
    random data, half log text. Returns the number of writes."""
    rng = random.Random(seed)
    pool = text_pool(random.Random(seed + 1), 1 * MiB)
    slots = size // write_size
    count = max(1, round(size * fraction / write_size))
    fd = os.open(path, os.O_WRONLY)
    try:
        for i, slot in enumerate(sorted(rng.sample(range(slots), count))):
            data = random_bytes(rng, write_size) if i % 2 == 0 else text_bytes(rng, pool, write_size)
            os.pwrite(fd, data, slot * write_size)
        os.fsync(fd)
    finally:
        os.close(fd)
    return count


def allocated_bytes(path):
    return os.stat(path).st_blocks * 512


def du_bytes(path):
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def sparse_copy(src, dst):
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)


# ------------------------------------------------------------------ cache


class Cache:
    """Puts the page cache in the same state before every timed command.

    cold: sync and drop the page cache (needs root), so every tool reads the
          image from the device.
    warm: read the files first, before every measurement, so every tool
          reads from memory.
    """

    def __init__(self, mode):
        if mode == "auto":
            mode = "cold" if self._drop() else "warm"
            if mode == "warm":
                log("cannot write /proc/sys/vm/drop_caches: every measurement is warm-cache")
        self.mode = mode

    @staticmethod
    def _drop():
        os.sync()
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            return True
        except OSError:
            return False

    def prepare(self, *paths):
        if self.mode == "cold":
            if not self._drop():
                raise SystemExit("--cache cold needs write access to /proc/sys/vm/drop_caches (root)")
        else:
            os.sync()
            for p in paths:
                with open(p, "rb", buffering=0) as f:
                    while f.readinto(bytearray(8 * MiB)):
                        pass


# ----------------------------------------------------------- reference tools


def timed(cmd, **kw):
    """Runs cmd; returns wall seconds and the result, with the CPU seconds
    (user + system) of everything it started in r.cpu_secs."""
    u0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, check=True, **kw)
    secs = time.perf_counter() - t0
    u1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    r.cpu_secs = (u1.ru_utime - u0.ru_utime) + (u1.ru_stime - u0.ru_stime)
    return secs, r


def ref_zstd(cache, image):
    cache.prepare(image)
    secs, r0 = timed(["zstd", "-q", "-1", "-T2", "-c", str(image)], stdout=subprocess.DEVNULL)
    cache.prepare(image)
    secs_wc, r = timed(
        f"zstd -q -1 -T2 -c '{image}' | wc -c", shell=True, capture_output=True, text=True
    )
    return {"secs": secs, "cpu_secs": r0.cpu_secs, "secs_with_wc": secs_wc, "bytes": int(r.stdout.strip())}


def ref_b3sum(cache, image):
    cache.prepare(image)
    secs, r = timed(["b3sum", "--num-threads", "2", str(image)], stdout=subprocess.DEVNULL)
    return {"secs": secs, "cpu_secs": r.cpu_secs}


def ref_rsync(cache, image, previous):
    cache.prepare(image, previous)
    secs, r = timed(
        ["rsync", "-I", "--inplace", "--no-whole-file", "--stats", str(image), str(previous)],
        capture_output=True,
        text=True,
    )
    stats = {}
    for line in r.stdout.splitlines():
        for key in ("Literal data", "Matched data"):
            if line.startswith(key):
                stats[key.lower().replace(" ", "_")] = int(
                    line.split(":")[1].split()[0].replace(",", "")
                )
    return {"secs": secs, "cpu_secs": r.cpu_secs, **stats}


# ------------------------------------------------------------ /proc sampling


def proc_status(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * KiB
    except OSError:
        pass
    return None


def proc_stat(path):
    """(comm, state letter, utime+stime seconds) from a /proc/.../stat file."""
    with open(path) as f:
        s = f.read()
    comm = s[s.index("(") + 1 : s.rindex(")")]
    fields = s[s.rindex(")") + 2 :].split()
    return comm, fields[0], (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_cpu(path):
    comm, _, cpu = proc_stat(path)
    return comm, cpu


class CpuSampler:
    """Samples some processes every 50 ms while a phase runs: per-thread CPU
    time and scheduler state (R running or runnable, D waiting for the disk,
    S sleeping: waiting on a channel, a lock or the network), and the
    process's resident anonymous and file-backed memory. Scan threads exit
    when their scan ends, so per-thread CPU can miss a thread's last 50 ms;
    the per-process totals (/proc/<pid>/stat keeps exited threads) are exact."""

    def __init__(self, pids):
        self.pids = dict(pids)  # label -> pid
        self.base = {}
        self.last = {}
        self.names = {}
        self.proc0 = {}
        self.proc1 = {}
        self.states = {}  # (label, name) -> {state letter: samples}
        self.rss_peak = {}  # label -> {"RssAnon": bytes, "RssFile": bytes}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self, first=False):
        for label, pid in self.pids.items():
            try:
                tids = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            for tid in tids:
                try:
                    comm, state, cpu = proc_stat(f"/proc/{pid}/task/{tid}/stat")
                except (OSError, ValueError):
                    continue
                key = (label, tid)
                self.names[key] = comm
                st = self.states.setdefault((label, comm.rstrip("0123456789")), {})
                st[state] = st.get(state, 0) + 1
                if first:
                    self.base[key] = cpu
                else:
                    self.base.setdefault(key, 0.0)
                self.last[key] = cpu
            peak = self.rss_peak.setdefault(label, {})
            for k in ("RssAnon", "RssFile"):
                v = proc_status(pid, k)
                if v is not None:
                    peak[k] = max(peak.get(k, 0), v)

    def _proc(self):
        out = {}
        for label, pid in self.pids.items():
            try:
                out[label] = proc_cpu(f"/proc/{pid}/stat")[1]
            except OSError:
                out[label] = None
        return out

    def _run(self):
        while not self._stop.wait(0.05):
            self._sample()

    def start(self):
        self.proc0 = self._proc()
        self._sample(first=True)
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join()
        self._sample()
        self.proc1 = self._proc()

    def report(self, secs):
        groups = {}
        for key, cpu in self.last.items():
            label = key[0]
            name = self.names[key].rstrip("0123456789")
            used = cpu - self.base.get(key, 0.0)
            if used <= 0:
                continue
            g = groups.setdefault(f"{label}:{name}", {"threads": 0, "cpu_secs": 0.0})
            g["threads"] += 1
            g["cpu_secs"] += used
        for g in groups.values():
            g["busy"] = g["cpu_secs"] / secs if secs > 0 else 0.0
        for (label, name), st in self.states.items():
            g = groups.get(f"{label}:{name}")
            if g is not None:
                n = sum(st.values())
                g["states"] = {k: round(v / n, 2) for k, v in sorted(st.items())}
        totals = {}
        for label in self.pids:
            a, b = self.proc0.get(label), self.proc1.get(label)
            if a is not None and b is not None:
                totals[label] = {"cpu_secs": b - a, "busy": (b - a) / secs if secs > 0 else 0.0}
        return {"threads": dict(sorted(groups.items())), "process": totals, "rss_peak": self.rss_peak}


# ------------------------------------------------------- controller and agent


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Cluster:
    """One controller with its own store, and agents started one per phase,
    all in `root`, on 127.0.0.1."""

    def __init__(self, bins, pki, root, image, block_size=None, disk_extra=""):
        self.ctl_bin = os.path.join(bins, "tideline-controller")
        self.agent_bin = os.path.join(bins, "tideline-agent")
        self.root = root
        self.store = os.path.join(root, "store")
        self.state = os.path.join(root, "state")
        for d in (self.store, self.state):
            shutil.rmtree(d, ignore_errors=True)
            os.makedirs(d)
        port = free_port()
        self.ctl_conf = os.path.join(root, "controller.toml")
        self.agent_conf = os.path.join(root, "agent.toml")
        with open(self.ctl_conf, "w") as f:
            f.write(
                f'[listen]\naddress = "127.0.0.1:{port}"\n'
                f'[tls]\nca = "{pki}/ca.crt"\ncert = "{pki}/controller.crt"\nkey = "{pki}/controller.key"\n'
                f'[store]\ndir = "{self.store}"\n'
                f'[admin]\nsocket = "{root}/controller.sock"\n'
            )
        with open(self.agent_conf, "w") as f:
            f.write(
                f'[controller]\naddress = "127.0.0.1:{port}"\nserver_name = "localhost"\n'
                f'[tls]\nca = "{pki}/ca.crt"\ncert = "{pki}/{AGENT_ID}.crt"\nkey = "{pki}/{AGENT_ID}.key"\n'
                f'[state]\ndir = "{self.state}"\n'
                f'[[disk]]\nid = "{DISK_ID}"\npath = "{image}"\n'
                + (f"block_size = {block_size}\n" if block_size else "")
                + disk_extra
            )
        self.ctl = None
        self.agent = None
        self.agent_log = open(os.path.join(root, "agent.log"), "a")
        self.ctl_log = open(os.path.join(root, "controller.log"), "a")

    def admin(self, *args):
        r = subprocess.run(
            [self.ctl_bin, "--config", self.ctl_conf, *args], capture_output=True, text=True
        )
        if r.returncode != 0:
            raise RuntimeError(f"tideline-controller {' '.join(args)}: {r.stderr.strip()}")
        return json.loads(r.stdout)

    def connected(self):
        try:
            agents = self.admin("agents")
        except (RuntimeError, ValueError):
            return False
        return any(a["id"] == AGENT_ID and a["connected"] for a in agents)

    def start_controller(self):
        self.ctl = subprocess.Popen(
            [self.ctl_bin, "--config", self.ctl_conf, "serve"], stderr=self.ctl_log
        )
        sock = os.path.join(self.root, "controller.sock")
        for _ in range(200):
            if os.path.exists(sock):
                return
            if self.ctl.poll() is not None:
                break
            time.sleep(0.05)
        raise SystemExit(f"controller did not start; see {self.root}/controller.log")

    def start_agent(self):
        """A fresh agent process, so each phase's VmHWM is its own."""
        self.agent = subprocess.Popen(
            [self.agent_bin, "--config", self.agent_conf, "run"], stderr=self.agent_log
        )
        for _ in range(300):
            if self.connected():
                return
            if self.agent.poll() is not None:
                break
            time.sleep(0.05)
        raise SystemExit(f"agent did not connect; see {self.root}/agent.log")

    def stop_agent(self):
        """Reads the agent's peak RSS, then stops it and waits until the
        controller has seen the link go."""
        hwm = proc_status(self.agent.pid, "VmHWM")
        self.agent.send_signal(signal.SIGTERM)
        try:
            self.agent.wait(20)
        except subprocess.TimeoutExpired:
            self.agent.kill()
            self.agent.wait()
        self.agent = None
        for _ in range(200):
            if not self.connected():
                break
            time.sleep(0.05)
        return hwm

    def stop(self):
        hwm = None
        if self.agent is not None:
            self.stop_agent()
        if self.ctl is not None:
            hwm = proc_status(self.ctl.pid, "VmHWM")
            self.ctl.send_signal(signal.SIGTERM)
            try:
                self.ctl.wait(20)
            except subprocess.TimeoutExpired:
                self.ctl.kill()
                self.ctl.wait()
            self.ctl = None
        return hwm

    def sync(self, timeout=900):
        """Starts a sync of every disk and polls the session until it is done.
        Returns the session JSON plus wall time and CPU figures."""
        sampler = CpuSampler({"agent": self.agent.pid, "controller": self.ctl.pid})
        sampler.start()
        t0 = time.perf_counter()
        session = self.admin("sync", "--agent", AGENT_ID, "--no-wait")["session"]
        scanned = None
        while True:
            s = self.admin("sessions", str(session))
            if s["state"] in ("done", "failed"):
                break
            d = s["disks"][0] if s["disks"] else {}
            if scanned is None and d.get("block_count") and d.get("scanned", {}).get("block") == d["block_count"]:
                scanned = s["elapsed_secs"]
            if time.perf_counter() - t0 > timeout:
                raise SystemExit(f"session {session} still {s['state']} after {timeout}s")
            # Each poll starts the admin CLI; 0.2 s keeps that out of the way
            # of the measured processes on a small machine.
            time.sleep(0.2)
        wall = time.perf_counter() - t0
        sampler.stop()
        if s["state"] != "done":
            raise SystemExit(f"session {session} failed: {s.get('error')}")
        d = s["disks"][0]
        return {
            "session": session,
            "elapsed_secs": s["elapsed_secs"],
            "wall_secs": wall,
            "wire_bytes": s["wire_bytes"],
            "blocks_received": d["blocks_received"],
            "payload_bytes": d["payload_bytes"],
            "stored_bytes": d["stored_bytes"],
            "block_size": d["committed"]["block_size"],
            "disk_size": d["committed"]["disk_size"],
            "point": d["committed"]["point"],
            # Controller's clock when the last block or checkpoint had
            # arrived; the rest of elapsed_secs is the commit.
            "scanned_secs": scanned,
            "cpu": sampler.report(s["elapsed_secs"]),
        }


def make_pki(ctl_bin, pki):
    os.makedirs(pki, exist_ok=True)
    run = lambda *a: subprocess.run([ctl_bin, "ca", *a], check=True, stdout=subprocess.DEVNULL)
    run("init", "--dir", f"{pki}/ca")
    run("issue-controller", "--ca-dir", f"{pki}/ca", "--out", pki, "--san", "localhost", "--san", "127.0.0.1")
    run("issue-agent", "--ca-dir", f"{pki}/ca", "--out", pki, "--id", AGENT_ID)


def synced_phase(cluster, cache, image, label):
    """One agent process, one sync, the agent's peak RSS."""
    cluster.start_agent()
    cache.prepare(image)
    log(f"{label}: syncing")
    r = cluster.sync()
    r["agent_vmhwm"] = cluster.stop_agent()
    log(
        f"{label}: {r['elapsed_secs']:.2f}s, {r['blocks_received']} blocks, "
        f"wire {r['wire_bytes'] / MiB:.1f} MiB, agent VmHWM {r['agent_vmhwm'] / MiB:.1f} MiB"
    )
    return r


# ------------------------------------------------------------- the main run


def main_run(args, bins, cache, work):
    size = int(args.size_gib * GiB)
    image = os.path.join(work, "disk.img")
    previous = os.path.join(work, "previous.img")
    pki = os.path.join(work, "pki")
    make_pki(os.path.join(bins, "tideline-controller"), pki)
    res = {"size": size, "block_size": args.block_size}

    log(f"writing a {args.size_gib:g} GiB image")
    t0 = time.perf_counter()
    res["mix"] = make_image(image, size, args.seed)
    res["image_allocated"] = allocated_bytes(image)
    log(f"image written in {time.perf_counter() - t0:.1f}s: {res['mix']}")

    log("zstd -1 -T2")
    res["zstd"] = ref_zstd(cache, image)

    cl = Cluster(bins, pki, os.path.join(work, "main"), image, args.block_size)
    cl.start_controller()
    try:
        res["full"] = synced_phase(cl, cache, image, "full sync")
        sparse_copy(image, previous)
        res["writes"] = scatter_writes(image, size, 0.01, 64 * KiB, args.seed + 100)
        res["incremental"] = synced_phase(cl, cache, image, "incremental sync")
        res["store_bytes"] = du_bytes(cl.store)
        res["state_bytes"] = du_bytes(cl.state)
    finally:
        res["controller_vmhwm"] = cl.stop()

    log("b3sum --num-threads 2")
    res["b3sum"] = ref_b3sum(cache, image)
    log("rsync -I --inplace --no-whole-file")
    res["rsync"] = ref_rsync(cache, image, previous)
    os.unlink(previous)

    anon = lambda ph: ph["cpu"]["rss_peak"].get("agent", {}).get("RssAnon")
    res["rss_sizes"] = [{"size": size, "agent_vmhwm": res["full"]["agent_vmhwm"],
                         "agent_anon_peak": anon(res["full"]), "elapsed_secs": res["full"]["elapsed_secs"]}]
    for gib in args.rss_sizes:
        other = int(gib * GiB)
        if other == size:
            continue
        log(f"RSS check: full sync of a {gib:g} GiB image")
        img = os.path.join(work, f"disk-{gib:g}.img")
        make_image(img, other, args.seed)
        c2 = Cluster(bins, pki, os.path.join(work, f"rss-{gib:g}"), img, args.block_size)
        c2.start_controller()
        try:
            r = synced_phase(c2, cache, img, f"full sync {gib:g} GiB")
        finally:
            c2.stop()
        res["rss_sizes"].append({"size": other, "agent_vmhwm": r["agent_vmhwm"],
                                 "agent_anon_peak": anon(r), "elapsed_secs": r["elapsed_secs"]})
        os.unlink(img)
    return res


def verdict(ok):
    return "PASS" if ok else "MISS"


def main_table(res):
    full, inc = res["full"], res["incremental"]
    z, b3, rs = res["zstd"], res["b3sum"], res["rsync"]
    size = res["size"]
    rows = []
    r = inc["elapsed_secs"] / b3["secs"]
    rows.append(("incremental sync vs b3sum --num-threads 2", f"{inc['elapsed_secs']:.2f} s",
                 f"{b3['secs']:.2f} s", f"{r:.2f}x time", "<= 1.5x", verdict(r <= 1.5)))
    r = rs["secs"] / inc["elapsed_secs"]
    rows.append(("incremental sync vs rsync --no-whole-file", f"{inc['elapsed_secs']:.2f} s",
                 f"{rs['secs']:.2f} s", f"{r:.2f}x faster", ">= 5x", verdict(r >= 5)))
    tp_agent = size / full["elapsed_secs"] / MiB
    tp_zstd = size / z["secs"] / MiB
    r = tp_agent / tp_zstd
    rows.append(("full sync throughput vs zstd -1 -T2", f"{tp_agent:.0f} MiB/s ({full['elapsed_secs']:.2f} s)",
                 f"{tp_zstd:.0f} MiB/s ({z['secs']:.2f} s)", f"{r:.2f}x", ">= 0.7x", verdict(r >= 0.7)))
    r = full["wire_bytes"] / z["bytes"]
    rows.append(("full sync wire bytes vs zstd output", f"{full['wire_bytes'] / MiB:.1f} MiB",
                 f"{z['bytes'] / MiB:.1f} MiB", f"{r:.3f}x", "<= 1.05x", verdict(r <= 1.05)))
    for name, ph in (("full", full), ("incremental", inc)):
        m = ph["agent_vmhwm"] / MiB
        rows.append((f"agent peak RSS, {name} sync", f"{m:.1f} MiB", "-", "-", "<= 128 MiB", verdict(m <= 128)))
    sizes = sorted(res["rss_sizes"], key=lambda x: x["size"])
    if len(sizes) > 1:
        small, big = sizes[0], sizes[-1]
        r = big["agent_vmhwm"] / small["agent_vmhwm"]
        rows.append((f"agent peak RSS {big['size'] / GiB:g} GiB vs {small['size'] / GiB:g} GiB disk",
                     f"{big['agent_vmhwm'] / MiB:.1f} MiB", f"{small['agent_vmhwm'] / MiB:.1f} MiB",
                     f"{r:.2f}x", "<= 1.10x", verdict(r <= 1.10)))
    return rows


def print_table(header, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))


def cpu_lines(label, ph):
    cpu = ph["cpu"]
    parts = [f"{k} x{v['threads']} {v['cpu_secs']:.2f}s ({v['busy'] * 100:.0f}%"
             + (", states " + " ".join(f"{s}{f * 100:.0f}%" for s, f in v["states"].items()) if "states" in v else "")
             + ")" for k, v in cpu["threads"].items()]
    tot = [f"{k} {v['cpu_secs']:.2f}s ({v['busy'] * 100:.0f}%)" for k, v in cpu["process"].items()]
    rss = "; ".join(f"{k} " + ", ".join(f"{n} {b / MiB:.1f} MiB" for n, b in v.items())
                    for k, v in cpu.get("rss_peak", {}).items())
    scan = f", last block in at {ph['scanned_secs']:.2f}s" if ph.get("scanned_secs") else ""
    return (f"{label} ({ph['elapsed_secs']:.2f}s{scan}): CPU totals: {', '.join(tot)}\n"
            + "".join(f"    {p}\n" for p in parts)
            + f"    peak resident: {rss}")


def print_main(res, cache):
    size = res["size"]
    mix = ", ".join(f"{k} {v / size * 100:.1f}%" for k, v in res["mix"].items())
    print()
    print(f"Tideline benchmark: {size / GiB:g} GiB image ({mix}; "
          f"{res['image_allocated'] / GiB:.2f} GiB allocated), block size "
          f"{res['full']['block_size'] // KiB} KiB, {cache.mode} cache before every timed command")
    print(f"incremental: {res['writes']} scattered 64 KiB writes (1% of the image); "
          f"full sync {res['full']['blocks_received']} blocks, incremental {res['incremental']['blocks_received']} blocks; "
          f"incremental wire {res['incremental']['wire_bytes'] / MiB:.1f} MiB")
    print()
    print_table(("measurement", "tideline", "reference", "ratio", "target", "result"), main_table(res))
    print()
    print(cpu_lines("full sync", res["full"]))
    print(cpu_lines("incremental sync", res["incremental"]))
    print(f"wall clock (request to done, 0.2 s polling): full {res['full']['wall_secs']:.2f}s, "
          f"incremental {res['incremental']['wall_secs']:.2f}s; zstd piped to wc -c {res['zstd']['secs_with_wc']:.2f}s")
    print(f"store after both points {res['store_bytes'] / MiB:.1f} MiB, agent state {res['state_bytes'] / KiB:.0f} KiB, "
          f"controller VmHWM {(res['controller_vmhwm'] or 0) / MiB:.1f} MiB")
    print("agent peak RSS by disk size (full sync): " + ", ".join(
        f"{x['size'] / GiB:g} GiB: VmHWM {x['agent_vmhwm'] / MiB:.1f} MiB, anon {(x['agent_anon_peak'] or 0) / MiB:.1f} MiB"
        for x in sorted(res["rss_sizes"], key=lambda x: x["size"])))
    print("reference CPU (user+sys): " + ", ".join(
        f"{k} {res[k]['cpu_secs']:.2f}s" for k in ("zstd", "b3sum", "rsync") if "cpu_secs" in res[k]))
    rs = res["rsync"]
    if "literal_data" in rs:
        print(f"rsync: literal {rs['literal_data'] / MiB:.1f} MiB, matched {rs['matched_data'] / MiB:.1f} MiB")


# ------------------------------------------------------- block-size study


def study_run(args, bins, cache, work):
    size = int(args.size_gib * GiB)
    pki = os.path.join(work, "pki")
    make_pki(os.path.join(bins, "tideline-controller"), pki)
    base = os.path.join(work, "base.img")
    image = os.path.join(work, "disk.img")
    log(f"writing a {args.size_gib:g} GiB image")
    mix = make_image(base, size, args.seed)
    rows = []
    for bs in args.study_block_sizes:
        log(f"block size {bs // KiB} KiB")
        sparse_copy(base, image)
        cl = Cluster(bins, pki, os.path.join(work, f"bs-{bs}"), image, bs)
        cl.start_controller()
        try:
            full = synced_phase(cl, cache, image, f"{bs // KiB} KiB full")
            w64 = scatter_writes(image, size, 0.01, 64 * KiB, args.seed + 100)
            inc64 = synced_phase(cl, cache, image, f"{bs // KiB} KiB incremental (64 KiB writes)")
            store_after_two = du_bytes(cl.store)
            state_after_two = du_bytes(cl.state)
            w4 = scatter_writes(image, size, 0.01, 4 * KiB, args.seed + 200)
            inc4 = synced_phase(cl, cache, image, f"{bs // KiB} KiB incremental (4 KiB writes)")
            store_after_three = du_bytes(cl.store)
        finally:
            cl.stop()
        rows.append({
            "block_size": bs, "full": full, "inc64": inc64, "inc4": inc4,
            "writes64": w64, "writes4": w4,
            "store_after_two": store_after_two, "store_after_three": store_after_three,
            "state_bytes": state_after_two,
        })
        shutil.rmtree(cl.root, ignore_errors=True)
    os.unlink(image)
    os.unlink(base)
    return {"size": size, "mix": mix, "rows": rows}


def print_study(res, cache):
    size = res["size"]
    mix = ", ".join(f"{k} {v / size * 100:.1f}%" for k, v in res["mix"].items())
    r0 = res["rows"][0]
    print()
    print(f"Block-size study: {size / GiB:g} GiB image ({mix}), {cache.mode} cache; "
          f"1% changed as {r0['writes64']} x 64 KiB writes, then 1% as {r0['writes4']} x 4 KiB writes")
    header = ("block", "full s", "full wire MiB", "incr64 s", "incr64 blocks", "incr64 wire MiB",
              "incr4 s", "incr4 blocks", "incr4 wire MiB", "store MiB (2 pts)", "store MiB (3 pts)",
              "state KiB", "agent RSS MiB")
    rows = []
    for r in res["rows"]:
        rows.append((
            f"{r['block_size'] // KiB} KiB",
            f"{r['full']['elapsed_secs']:.2f}", f"{r['full']['wire_bytes'] / MiB:.1f}",
            f"{r['inc64']['elapsed_secs']:.2f}", r["inc64"]["blocks_received"], f"{r['inc64']['wire_bytes'] / MiB:.1f}",
            f"{r['inc4']['elapsed_secs']:.2f}", r["inc4"]["blocks_received"], f"{r['inc4']['wire_bytes'] / MiB:.1f}",
            f"{r['store_after_two'] / MiB:.1f}", f"{r['store_after_three'] / MiB:.1f}",
            f"{r['state_bytes'] / KiB:.0f}",
            f"{max(r['full']['agent_vmhwm'], r['inc64']['agent_vmhwm'], r['inc4']['agent_vmhwm']) / MiB:.1f}",
        ))
    print_table(header, rows)
    for r in res["rows"]:
        print(cpu_lines(f"{r['block_size'] // KiB} KiB full sync", r["full"]))


# ------------------------------------------------------------------- main


def size_arg(s):
    s = s.strip().lower()
    mult = 1
    for suffix, m in (("kib", KiB), ("k", KiB), ("mib", MiB), ("m", MiB)):
        if s.endswith(suffix):
            s, mult = s[: -len(suffix)], m
            break
    return int(s) * mult


def machine():
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) * KiB
    return {"nproc": os.cpu_count(), "cpu": model, "mem_bytes": mem, "kernel": platform.release()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin-dir", required=True, help="directory with tideline-agent and tideline-controller")
    p.add_argument("--size-gib", type=float, default=None, help="image size (default 4, or 1 for the study)")
    p.add_argument("--block-size", type=size_arg, default=None, help="agent block size (default: the agent's)")
    p.add_argument("--workdir", default="/tmp/tideline-bench")
    p.add_argument("--keep", action="store_true", help="keep the workdir")
    p.add_argument("--cache", choices=("auto", "cold", "warm"), default="auto",
                   help="page cache before every timed command (auto: cold when possible)")
    p.add_argument("--rss-sizes", default="1,2", help="other image sizes in GiB (comma list, '' for none) "
                   "whose full-sync peak RSS is compared with the main run's")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--block-size-study", action="store_true")
    p.add_argument("--study-block-sizes", default="16k,64k,256k,1m")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--formats", action="store_true",
                   help="the format benchmarks instead: dirty-bitmap incremental over NBD, streamOptimized VMDK reads")
    p.add_argument("--vmdk-gib", type=float, default=2, help="image size of the VMDK read benchmark")
    p.add_argument("--skip-bitmap", action="store_true", help="with --formats: skip the dirty-bitmap benchmark")
    p.add_argument("--skip-vmdk", action="store_true", help="with --formats: skip the VMDK benchmark")
    p.add_argument("--consistency", action="store_true",
                   help="the consistency benchmarks instead: tracked vs hash-scan incremental of a block device, "
                        "the tracker's cost under fio, freeze windows under a sustained write load")
    p.add_argument("--skip-tracked", action="store_true", help="with --consistency: skip the tracked incremental")
    p.add_argument("--skip-overhead", action="store_true", help="with --consistency: skip the fio overhead runs")
    p.add_argument("--skip-freeze", action="store_true", help="with --consistency: skip the freeze windows")
    p.add_argument("--fio-rounds", type=int, default=5, help="with --consistency: fio runs per side")
    p.add_argument("--fio-secs", type=int, default=10, help="with --consistency: seconds per fio run")
    p.add_argument("--freeze-points", type=int, default=20, help="with --consistency: points under load")
    p.add_argument("--quiet-secs", type=int, default=30,
                   help="with --consistency: seconds of commit latency sampled before any sync")
    args = p.parse_args()
    args.rss_sizes = [float(x) for x in args.rss_sizes.split(",") if x.strip()]
    args.study_block_sizes = [size_arg(x) for x in args.study_block_sizes.split(",") if x.strip()]
    if args.size_gib is None:
        args.size_gib = 1 if args.block_size_study else 8 if args.formats else 4
    for tool in ("zstd", "b3sum", "rsync", "du", "cp"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found; run scripts/install-deps.sh")

    work = os.path.abspath(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    bins = os.path.abspath(args.bin_dir)
    cache = Cache(args.cache)
    started = datetime.datetime.now(datetime.timezone.utc)
    out = {"started": started.isoformat(timespec="seconds"), "argv": sys.argv[1:],
           "machine": machine(), "cache": cache.mode}
    try:
        if args.formats:
            import formats

            out["formats"] = formats.run(args, bins, cache, work)
        elif args.consistency:
            import consistency

            out["consistency"] = consistency.run(args, bins, cache, work)
        elif args.block_size_study:
            out["study"] = study_run(args, bins, cache, work)
        else:
            out["main"] = main_run(args, bins, cache, work)
        out["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        with open(os.path.join(work, "results.json"), "w") as f:
            json.dump(out, f, indent=2)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=2)
        m = out["machine"]
        print(f"\nmachine: {m['nproc']} x {m['cpu']}, {m['mem_bytes'] / GiB:.1f} GiB RAM, kernel {m['kernel']}; "
              f"run {out['started']} .. {out['finished']}")
        if args.formats or args.consistency:
            pass  # printed as it finished
        elif args.block_size_study:
            print_study(out["study"], cache)
        else:
            print_main(out["main"], cache)
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
