#!/usr/bin/env bash
# Runs every test of the project: formatting, clippy, unit and property
# tests, the fuzz corpus replay, and the end-to-end tests that start the real
# binaries (built first, in the same profile the tests use).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

"$(dirname "$0")/install-deps.sh"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo build --workspace --bins
cargo test --workspace
