#!/usr/bin/env bash
# The whole test suite: installs what is missing, builds every crate, runs every test.
# Live-capture and namespace tests need root; without it they say SKIPPED (in CI, with
# CI=true, they fail instead).
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh
cargo build --workspace --all-targets
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace 2>&1 | tee "$log" || status=$?
awk '/^test result:/ { p += $4; f += $6 } END { printf "total: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
