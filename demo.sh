#!/usr/bin/env bash
# The main job on a bundled capture: no root and no live server needed.
# Installs what is missing, builds tcpkit, and reads tests/fixtures/redis-benchmark-lo.pcap
# (redis-benchmark against a real redis-server): the last packet lines, then the summary
# and the stats JSON.
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh
cargo build --release --quiet -p tcpkit
pcap=tests/fixtures/redis-benchmark-lo.pcap
echo "== tcpkit -r $pcap -p 26379 -m raw   (last lines)"
./target/release/tcpkit -r "$pcap" -p 26379 -m raw | tail -n 12
echo "== tcpkit -r $pcap -p 26379 --summary json   (the stats document)"
./target/release/tcpkit -r "$pcap" -p 26379 --summary json | tail -n 1
