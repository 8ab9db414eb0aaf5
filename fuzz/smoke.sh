#!/usr/bin/env bash
# A short fuzz run of every target (the long runs are in the README): builds them with
# AddressSanitizer and runs each for SECONDS (default 20). Exits non-zero on any crash.
# cargo fuzz needs nightly flags: RUSTC_BOOTSTRAP=1 lets the stable toolchain take them.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-20}
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
export RUSTC_BOOTSTRAP=1
if ! cargo fuzz build -O >/dev/null 2>&1; then
  echo "fuzz smoke: the targets do not build:"
  cargo fuzz build -O
  exit 1
fi
failed=0
for target in resp memcached dns decode; do
  mkdir -p "corpus/$target"
  if out=$(cargo fuzz run -O "$target" -- -max_total_time="$seconds" -max_len=4096 2>&1); then
    runs=$(grep -oE '^#[0-9]+' <<<"$out" | tail -1 | tr -d '#')
    echo "fuzz smoke: $target ok, ${runs:-0} runs in ${seconds} s"
  else
    echo "fuzz smoke: $target FAILED"
    tail -40 <<<"$out"
    failed=1
  fi
done
exit "$failed"
