#!/usr/bin/env bash
# The whole test suite: installs what is missing, builds every crate, runs every test.
# Live-capture and namespace tests need root; without it they say SKIPPED (in CI, with
# CI=true, they fail instead).
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh
cargo build --workspace --all-targets
cargo test --workspace
