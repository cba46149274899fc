#!/usr/bin/env bash
# The main job, end to end on embedded defaults: certificates, a controller
# and an agent on loopback, a sample disk with a real filesystem, a full sync,
# changes, an incremental sync, an export of the latest point compared bit for
# bit with the disk, a verify, and a summary.
#
# Usage: scripts/demo.sh [WORKDIR]      (default: ./demo-run, recreated)
# Needs cargo; installs the rest with scripts/install-deps.sh (root or sudo).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${1:-$ROOT/demo-run}"
DISK_MIB="${DEMO_DISK_MIB:-512}"

say() { printf '\n== %s\n' "$*" >&2; }

say "system packages"
"$ROOT/scripts/install-deps.sh" >&2

say "building (release)"
cargo build --release --bins --manifest-path "$ROOT/Cargo.toml" >&2
BIN="$ROOT/target/release"
CTL="$BIN/tideline-controller"
AGENT="$BIN/tideline-agent"

rm -rf "$WORK"
mkdir -p "$WORK"/{pki,state,store,stage}
cd "$WORK"

PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"

say "certificates (CA, controller, agent 'demo-agent')"
"$CTL" ca init --dir pki/ca >/dev/null
"$CTL" ca issue-controller --ca-dir pki/ca --out pki --san localhost --san 127.0.0.1 >/dev/null
"$CTL" ca issue-agent --ca-dir pki/ca --out pki --id demo-agent >/dev/null

cat > controller.toml <<TOML
[listen]
address = "127.0.0.1:$PORT"
[tls]
ca = "pki/ca.crt"
cert = "pki/controller.crt"
key = "pki/controller.key"
[store]
dir = "store"
[admin]
socket = "controller.sock"
TOML

cat > agent.toml <<TOML
[controller]
address = "127.0.0.1:$PORT"
server_name = "localhost"
[tls]
ca = "pki/ca.crt"
cert = "pki/demo-agent.crt"
key = "pki/demo-agent.key"
[state]
dir = "state"
[[disk]]
id = "data"
path = "disk.raw"
# The new machine's disk that failback writes into (an empty file here).
[[target]]
id = "new-data"
path = "new-disk.raw"
TOML

say "sample disk: ${DISK_MIB} MiB ext4 with text, binaries, incompressible data and free space"
python3 - "$DISK_MIB" <<'PY'
import os, random, sys
random.seed(7)
mib = int(sys.argv[1])
stage = "stage"
words = "replica recovery point block digest failback controller agent disk volume snapshot".split()
for i in range(max(2, mib // 16)):     # compressible text, like logs
    with open(f"{stage}/log-{i:02}.txt", "w") as f:
        for n in range(20000):
            f.write(f"{n:06} {' '.join(random.choice(words) for _ in range(8))}\n")
os.makedirs(f"{stage}/media", exist_ok=True)
for i in range(max(1, mib // 32)):       # incompressible, like media or archives
    with open(f"{stage}/media/blob-{i:02}.bin", "wb") as f:
        f.write(os.urandom(4 * 1024 * 1024))
with open(f"{stage}/zeros.img", "wb") as f:   # an allocated file full of zeros
    f.write(bytes(8 * 1024 * 1024))
PY
mkdir -p stage/bin
for f in /usr/bin/*; do                        # real executables, up to ~1/8 of the disk
  [ -f "$f" ] && [ "$(stat -L -c %s "$f")" -lt 2000000 ] || continue
  [ "$(du -sm stage/bin | cut -f1)" -lt $((DISK_MIB / 8)) ] || break
  cp "$f" stage/bin/ 2>/dev/null || true
done
mkfs.ext4 -q -F -E root_owner=0:0 -d stage disk.raw "${DISK_MIB}M"
rm -rf stage

truncate -s "$(stat -c %s disk.raw)" new-disk.raw
say "starting controller and agent on 127.0.0.1:$PORT"
"$CTL" --config controller.toml serve 2> controller.log &
CTL_PID=$!
"$AGENT" --config agent.toml run 2> agent.log &
AGENT_PID=$!
cleanup() { kill "$AGENT_PID" "$CTL_PID" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT

for _ in $(seq 100); do
  if "$CTL" --config controller.toml agents 2>/dev/null | grep -q '"connected": true'; then break; fi
  sleep 0.1
done
"$CTL" --config controller.toml agents | grep -q '"connected": true' || { echo "agent did not connect; see $WORK/agent.log" >&2; exit 1; }

say "full sync"
"$CTL" --config controller.toml sync --agent demo-agent > full.json

say "changing the disk: a new file through debugfs, and scattered 4 KiB and 64 KiB writes"
head -c 3000000 /dev/urandom > newfile.bin
debugfs -w -R "write newfile.bin added-after-full-sync.bin" disk.raw >/dev/null 2>&1
python3 - <<'PY'
import os, random
random.seed(11)
size = os.path.getsize("disk.raw")
with open("disk.raw", "r+b") as f:
    for i in range(48):
        n = 4096 if i % 2 else 65536
        off = random.randrange(0, size - n) // 4096 * 4096
        f.seek(off); f.write(os.urandom(n))
PY

say "incremental sync"
"$CTL" --config controller.toml sync --agent demo-agent > incr.json

say "export the latest point and compare bit for bit"
"$CTL" --config controller.toml export --agent demo-agent --disk data --point latest --out "$WORK/exported.raw" > export.json
cmp disk.raw exported.raw
"$CTL" --config controller.toml verify --agent demo-agent --disk data --point latest > verify.json

say "failback pass 1: write the latest point into an empty new disk"
"$CTL" --config controller.toml failback --agent demo-agent --target new-data=demo-agent/data > fb1.json
cmp disk.raw new-disk.raw

say "change the disk, sync, failback pass 2 (only the change travels)"
python3 - <<'PY'
import os
with open("disk.raw", "r+b") as f:
    size = f.seek(0, 2)
    for i in range(16):
        f.seek((i * 7919 * 65536) % (size - 8192)); f.write(os.urandom(5000))
PY
"$CTL" --config controller.toml sync --agent demo-agent > incr2.json
"$CTL" --config controller.toml failback --agent demo-agent --target new-data=demo-agent/data > fb2.json
cmp disk.raw new-disk.raw

python3 - <<'PY'
import json
def load(p): return json.load(open(p))
full, incr, exp, ver = load("full.json"), load("incr.json"), load("export.json"), load("verify.json")
def row(name, s):
    d = s["disks"][0]
    bs = d["committed"]["block_size"]; size = d["committed"]["disk_size"]
    secs = s["elapsed_secs"] or 1e-9
    return (f"{name:<12} scanned {size/2**20:8.1f} MiB | changed {d['blocks_received']:6d} blocks "
            f"({d['blocks_received']*bs/2**20:7.1f} MiB) | wire {s['wire_bytes']/2**20:7.1f} MiB | "
            f"{secs:6.2f} s | {size/2**20/secs:7.1f} MiB/s scanned | point {d['committed']['point']}")
print()
print("Tideline demo summary")
print(row("full sync", full))
print(row("incremental", incr))
print(f"export       {exp['report']['bytes']/2**20:.1f} MiB in {exp['seconds']:.2f} s, identical to the disk (cmp)")
print(f"verify       {'ok' if ver['ok'] else 'FAILED'}: {ver['report']['data_blocks']} data blocks, {ver['report']['zero_blocks']} zero blocks re-hashed")
for name in ("fb1.json", "fb2.json"):
    fb = load(name); t = fb["targets"][0]
    print(f"failback {fb['pass']}   {t['described_by']:<7} target | differing {t['differing_blocks']:6d} blocks | "
          f"sent {t['sent_bytes']/2**20:7.1f} MiB | written {t['written_blocks']:6d}, verified {t['verified_blocks']:6d} | "
          f"{fb['elapsed_secs']:6.2f} s | root matches the point: {t['verified']} | new disk identical (cmp)")
PY
