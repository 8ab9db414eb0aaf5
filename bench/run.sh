#!/usr/bin/env bash
# Offline throughput of tcpkit beside tcpdump's floor of merely reading the same pcap.
#
#   sudo bench/run.sh            # makes bench-data/*.pcap once (real redis-server), then times
#
# Captures (made once against a real redis-server, under bench-data/):
#   redis-small      ~1.7M packets: 840k SET/GET from 50 clients, one request a segment
#   redis-pipelined  ~0.9M packets: 6.4M SET/GET pipelined 16 deep
#   memcached-small  ~0.3M packets: 140k set/get, one request a segment
#   dns-udp          ~0.26M packets: 130k queries over UDP
# For each: `tcpdump -r FILE -w /dev/null` (the floor of reading the pcap), tcpkit in raw mode
# (lines to /dev/null) and in its protocol mode (`-t 100000`: pairs everything, prints nothing),
# as it runs by default (key templates on) and with `--no-templates`; for Redis also with
# `--slots`,
# RUNS (5) times each; prints the median wall time, packets/s, requests/s and the ratio to
# tcpdump. BASELINE=/path/to/another/tcpkit also times that build's protocol mode in the same
# run, side by side (this machine is noisy: compare within one run).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
runs=${RUNS:-5}
out_dir="$root/bench-data"
mkdir -p "$out_dir"

cargo build --release --quiet --manifest-path "$root/Cargo.toml" -p tcpkit
tcpkit="$root/target/release/tcpkit"

if [ ! -f "$out_dir/redis-small.pcap" ] || [ ! -f "$out_dir/redis-pipelined.pcap" ]; then
  (
    source "$root/tests/fixtures/capture-lib.sh"
    capture redis-small -i lo -- \
      redis-benchmark -p "$port" -n 420000 -c 50 -t set,get -q
    capture redis-pipelined -i lo -- \
      redis-benchmark -p "$port" -n 3200000 -c 50 -P 16 -t set,get -q
  )
fi
if [ ! -f "$out_dir/memcached-small.pcap" ] || [ ! -f "$out_dir/dns-udp.pcap" ]; then
  (
    source "$root/tests/fixtures/capture-lib.sh"
    port=$memcached_port capture memcached-small -i lo -- \
      python3 "$root/tests/fixtures/memcached_scenarios.py" "$memcached_port" load
    proto=udp port=$dns_port capture dns-udp -i lo -- \
      python3 "$root/tests/fixtures/dns_scenarios.py" "$dns_port" load
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

printf '%-16s %9s  %-30s %8s %12s %12s %7s\n' \
  capture packets command median_s packets/s requests/s ratio
for name in redis-small redis-pipelined memcached-small dns-udp; do
  pcap="$out_dir/$name.pcap"
  port=$(sed -n 's/.*"port":\([0-9]*\).*/\1/p' "$out_dir/$name.expected.json")
  packets=$(sed -n 's/.*"packets":\([0-9]*\),.*/\1/p' "$out_dir/$name.expected.json")
  requests=$(sed -n 's/.*"commands":{\([^}]*\)}.*/\1/p' "$out_dir/$name.expected.json" |
    tr ',' '\n' | awk -F: '{ s += $2 } END { print s }')
  exchanges=$(sed -n 's/.*"exchanges":\([0-9]*\).*/\1/p' "$out_dir/$name.expected.json")
  requests=${exchanges:-$requests}
  mode=${name%%-*}
  udp=$([ "$mode" = dns ] && echo -u || true)
  floor=$(median_seconds tcpdump -r "$pcap" -w /dev/null)
  raw=$(median_seconds "$tcpkit" -r "$pcap" -p "$port" $udp -m raw -o /dev/null)
  parsed=$(median_seconds "$tcpkit" -r "$pcap" -p "$port" $udp -m "$mode" -t 100000 -o /dev/null)
  # The cost of key templates (each first key folded, figures per template): on above.
  untemplated=$(median_seconds "$tcpkit" -r "$pcap" -p "$port" $udp -m "$mode" --no-templates -t 100000 -o /dev/null)
  rows=("tcpdump -r FILE -w /dev/null:$floor" "tcpkit -m raw:$raw" "tcpkit -m $mode -t 100000:$parsed"
    "tcpkit -m $mode --no-templates:$untemplated")
  if [ "$mode" = redis ]; then
    # The cost of Redis Cluster slots (CRC16 of every first key, figures per slot): off above.
    slots=$(median_seconds "$tcpkit" -r "$pcap" -p "$port" -m redis --slots -t 100000 -o /dev/null)
    rows+=("tcpkit -m redis --slots:$slots")
  fi
  if [ -n "${BASELINE:-}" ]; then
    base=$(median_seconds "$BASELINE" -r "$pcap" -p "$port" $udp -m "$mode" -t 100000 -o /dev/null)
    rows+=("baseline -m $mode -t 100000:$base")
  fi
  for row in "${rows[@]}"; do
    cmd=${row%:*}; secs=${row##*:}
    printf '%-16s %9d  %-30s %8.3f %12.0f %12.0f %6.2fx\n' "$name" "$packets" "$cmd" "$secs" \
      "$(echo "$packets / $secs" | bc -l)" "$(echo "$requests / $secs" | bc -l)" \
      "$(echo "$secs / $floor" | bc -l)"
  done
done

# Lua: a trivial process(packet) on the small-request capture.
trivial=$(mktemp --suffix=.lua)
echo 'function process(packet) end' >"$trivial"
pcap="$out_dir/redis-small.pcap"
packets=$(sed -n 's/.*"packets":\([0-9]*\),.*/\1/p' "$out_dir/redis-small.expected.json")
lua=$(median_seconds "$tcpkit" -r "$pcap" -p 26379 -m raw -S "$trivial" --summary none)
printf '%-16s %9d  %-30s %8.3f %12.0f\n' redis-small "$packets" "tcpkit -S (trivial process)" \
  "$lua" "$(echo "$packets / $lua" | bc -l)"
rm -f "$trivial"
# Lua: scripts/dns.lua (DNS latency in Lua, through tcpkit.record) on the DNS capture.
pcap="$out_dir/dns-udp.pcap"
packets=$(sed -n 's/.*"packets":\([0-9]*\),.*/\1/p' "$out_dir/dns-udp.expected.json")
lua=$(median_seconds "$tcpkit" -r "$pcap" -p 5300 -u -m raw -t 100000 -S "$root/scripts/dns.lua" --summary none)
printf '%-16s %9d  %-30s %8.3f %12.0f\n' dns-udp "$packets" "tcpkit -S scripts/dns.lua" \
  "$lua" "$(echo "$packets / $lua" | bc -l)"
