#!/usr/bin/env bash
# The whole test suite: installs what is missing, builds every crate, runs every test, then
# a short run of every fuzz target.
# Live-capture and namespace tests need root; without it they say SKIPPED (in CI, with
# CI=true, they fail instead).
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh
cargo build --workspace --all-targets
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
# --no-fail-fast: a failing test binary does not hide the tests of the ones after it.
cargo test --workspace --no-fail-fast 2>&1 | tee "$log" || status=$?
# Every fuzz target for a few seconds (its own build: AddressSanitizer, its own workspace).
if fuzz/smoke.sh 20 2>&1 | tee -a "$log"; then
  echo "test result: ok. 1 passed; 0 failed; (fuzz smoke)" >>"$log"
else
  echo "test result: FAILED. 0 passed; 1 failed; (fuzz smoke)" >>"$log"
  status=1
fi
awk '/^test result:/ { p += $4; f += $6 } END { printf "total: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
