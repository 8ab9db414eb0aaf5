#!/usr/bin/env bash
# The main job on bundled captures: no root and no live server needed.
# Installs what is missing, builds the three binaries, then shows what tcpkit is for:
#  1. Redis mode on tests/fixtures/redis-slow.pcap (redis-benchmark with some DEBUG SLEEPs,
#     against a real redis-server): the slow log (-t 20 ms) and the summary with percentiles;
#  2. the fleet: an aggregator on 127.0.0.1 (SQLite in a temp dir), two agents replaying two
#     captures into it, then `tcpkit-query hist --by agent`, `slow` and `agents`.
# About 5 s after the build. DEMO_BIN=DIR uses the binaries in DIR as they are (no set-up,
# no build: the tests run it so).
set -euo pipefail
cd "$(dirname "$0")"
bin=${DEMO_BIN:-}
if [ -z "$bin" ]; then
  ./setup.sh
  cargo build --release --quiet -p tcpkit -p tcpkit-aggregator
  bin=./target/release
fi
slow=tests/fixtures/redis-slow.pcap
bench=tests/fixtures/redis-benchmark-lo.pcap

echo "== 1. tcpkit -r $slow -p 26379 -m redis -t 20"
echo "   (the slow log: requests of 20 ms or more, then the summary)"
"$bin/tcpkit" -r "$slow" -p 26379 -m redis -t 20

echo
echo "== 2. the fleet: an aggregator and two agents, then tcpkit-query"
dir=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$bin/tcpkit-aggregator" --listen "127.0.0.1:$port" --db "$dir/fleet.db" 2>"$dir/aggregator.log" &
aggregator=$!
trap 'kill "$aggregator" 2>/dev/null; wait "$aggregator" 2>/dev/null; rm -rf "$dir"' EXIT
url="http://127.0.0.1:$port"
for _ in $(seq 50); do
  "$bin/tcpkit-query" --aggregator "$url" agents >/dev/null 2>&1 && break
  sleep 0.1
done
"$bin/tcpkit" -r "$bench" -p 26379 -m redis -t 1 --summary none -o /dev/null \
  --aggregator "$url" --agent-id web-1
"$bin/tcpkit" -r "$slow" -p 26379 -m redis -t 20 --summary none -o /dev/null \
  --aggregator "$url" --agent-id web-2
echo "-- tcpkit-query hist --by agent   (one fleet histogram, percentiles of all requests)"
"$bin/tcpkit-query" --aggregator "$url" hist --by agent
echo "-- tcpkit-query slow --slowest --limit 5"
"$bin/tcpkit-query" --aggregator "$url" slow --slowest --limit 5
echo "-- tcpkit-query agents"
"$bin/tcpkit-query" --aggregator "$url" agents
