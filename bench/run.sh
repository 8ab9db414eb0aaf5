#!/usr/bin/env bash
# Offline throughput of tcpkit beside tcpdump's floor of merely reading the same pcap.
#
#   sudo bench/run.sh            # makes bench-data/*.pcap once (real redis-server), then times
#
# For each capture: `tcpdump -r FILE -w /dev/null` and `tcpkit -r FILE -p PORT -m raw`
# (lines written to /dev/null), RUNS times each; prints the median wall time and packets/s.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
runs=${RUNS:-5}
out_dir="$root/bench-data"
mkdir -p "$out_dir"

cargo build --release --quiet --manifest-path "$root/Cargo.toml" -p tcpkit
tcpkit="$root/target/release/tcpkit"

if [ ! -f "$out_dir/redis-small.pcap" ]; then
  (
    source "$root/tests/fixtures/capture-lib.sh"
    # About 2 packets a request: 420k SET/GET requests from 50 clients ≈ 840k packets.
    capture redis-small -i lo -- \
      redis-benchmark -p "$port" -n 420000 -c 50 -t set,get -q
  )
fi

# median_seconds CMD...: runs CMD $runs times, prints the median wall time in seconds.
median_seconds() {
  local times=()
  for _ in $(seq "$runs"); do
    local start end
    start=$(date +%s.%N)
    "$@" >/dev/null 2>&1
    end=$(date +%s.%N)
    times+=("$(echo "$end - $start" | bc -l)")
  done
  printf '%s\n' "${times[@]}" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'
}

printf '%-22s %10s  %-34s %10s %14s %8s\n' capture packets command median_s packets/s vs_tcpdump
for pcap in "$out_dir"/*.pcap; do
  name=$(basename "$pcap" .pcap)
  port=$(sed -n 's/.*"port":\([0-9]*\).*/\1/p' "$out_dir/$name.expected.json")
  packets=$(sed -n 's/.*"packets":\([0-9]*\).*/\1/p' "$out_dir/$name.expected.json")
  floor=$(median_seconds tcpdump -r "$pcap" -w /dev/null)
  raw=$(median_seconds "$tcpkit" -r "$pcap" -p "$port" -m raw -o /dev/null)
  for row in "tcpdump -r FILE -w /dev/null:$floor" "tcpkit -m raw -o /dev/null:$raw"; do
    cmd=${row%:*}; secs=${row##*:}
    printf '%-22s %10d  %-34s %10.3f %14.0f %8.2fx\n' "$name" "$packets" "$cmd" "$secs" \
      "$(echo "$packets / $secs" | bc -l)" "$(echo "$secs / $floor" | bc -l)"
  done
done
