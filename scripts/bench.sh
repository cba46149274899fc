#!/usr/bin/env bash
# Tideline benchmark: builds the release binaries, then runs bench/bench.py,
# which writes a disk image with realistic content, runs a full and an
# incremental sync over mutual TLS on loopback, runs zstd, b3sum and rsync on
# the same image in the same run, and prints each measurement with the
# reference tool's figure, the ratio and PASS/MISS against the target.
# See docs/benchmarks.md.
#
# Usage: scripts/bench.sh [--size-gib N] [--block-size BYTES] [--workdir DIR]
#                         [--keep] [--cache auto|cold|warm] [--rss-sizes 1,2]
#                         [--block-size-study [--study-block-sizes 16k,64k,...]]
#                         [--json FILE] [--formats [--vmdk-gib N]]
#                         [--consistency [--skip-tracked] [--skip-overhead]
#                          [--skip-freeze] [--freeze-points N] [--fio-rounds N]]
#        scripts/bench.sh --sparse [--runs N] [--workdir DIR] [--json FILE]
#        scripts/bench.sh --failback [--size-gib N] [--block-size BYTES]
#                         [--workdir DIR] [--keep] [--cache auto|cold|warm]
#                         [--json FILE]
# --consistency (root) runs bench/consistency.py: eBPF-tracked vs hash-scan
# incrementals of a block device, the tracker's cost under fio, and freeze
# windows under a sustained write load.
# --sparse runs bench/sparse.py instead: dump of a 2 TiB sparse disk as two
# VMDK layouts and through qemu-nbd, against qemu-img convert and nbdcopy.
# --failback runs bench/failback.py instead: full and incremental (map and
# --rescan) failback passes into an empty raw target, against zstd -d and
# b3sum in the same run.
# Needs: cargo, python3, zstd, b3sum, rsync (scripts/install-deps.sh). Dropping
# the page cache between phases needs root; without it every tool runs warm.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

for tool in python3 zstd b3sum rsync; do
  command -v "$tool" >/dev/null || { echo "bench: $tool not found; run scripts/install-deps.sh" >&2; exit 1; }
done

echo "== building (release)" >&2
cargo build --release --bins --manifest-path "$ROOT/Cargo.toml" >&2
TARGET="$(cargo metadata --format-version 1 --no-deps --manifest-path "$ROOT/Cargo.toml" \
  | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"

for arg in "$@"; do
  if [ "$arg" = "--sparse" ]; then
    args=()
    for a in "$@"; do [ "$a" = "--sparse" ] || args+=("$a"); done
    exec python3 "$ROOT/bench/sparse.py" --bin-dir "$TARGET/release" "${args[@]}"
  fi
  if [ "$arg" = "--failback" ]; then
    args=()
    for a in "$@"; do [ "$a" = "--failback" ] || args+=("$a"); done
    exec python3 "$ROOT/bench/failback.py" --bin-dir "$TARGET/release" "${args[@]}"
  fi
done

exec python3 "$ROOT/bench/bench.py" --bin-dir "$TARGET/release" "$@"
