#!/usr/bin/env bash
# Live cost of the agent: tcpkit captures lo in redis mode while redis-benchmark drives a
# local redis-server (50 clients, SET/GET), without and with -P 16. Reports the agent's CPU as
# % of one core per 100k requests/s (all its threads), its peak RSS, kernel drops, and
# commands counted vs those the server executed (its INFO commandstats); with 1 and 2
# pipelines (--threads, a PACKET_FANOUT group of captures). Each load is also measured under
# `tcpdump -B 262144 -w /dev/null` (the floor a capture costs, on the same machine at the same
# hour: this machine's speed swings by half from hour to hour); TCPDUMP=0 skips it.
#
#   sudo bench/live.sh            # N=2000000 requests per run by default (N=… to change)
#   THREADS="1 2 4" sudo bench/live.sh
#   AGENT_ARGS="--no-templates" sudo bench/live.sh   # more flags for the agent
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
n=${N:-2000000}
# TCPKIT=path measures another build (compare two in one run).
if [ -z "${TCPKIT:-}" ]; then
  cargo build --release --quiet --manifest-path "$root/Cargo.toml" -p tcpkit
fi
tcpkit=${TCPKIT:-$root/target/release/tcpkit}
work=$(mktemp -d)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port)
stats_port=$(free_port)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --logfile "" >/dev/null &
pids+=($!)
for _ in $(seq 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done

ticks=$(getconf CLK_TCK)
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

row() { # threads pipeline start end cpu_ticks_used rss drops counted sent
  local wall rps cpu
  wall=$(echo "$4 - $3" | bc -l)
  rps=$(echo "2 * $n / $wall" | bc -l)
  cpu=$(echo "100 * $5 / $ticks / $wall" | bc -l)
  printf '%-8s %-10s %10d %12.0f %9.1f %14.2f %10s %7s %12s %12s\n' "$1" "-P $2" \
    $((2 * n)) "$rps" "$cpu" "$(echo "$cpu / ($rps / 100000)" | bc -l)" "$6" "$7" "$8" "$9"
}

printf '%-8s %-10s %10s %12s %9s %14s %10s %7s %12s %12s\n' \
  threads pipeline requests requests/s cpu_%core cpu_%/100k_rps peak_rss drops counted sent
if [ "${TCPDUMP:-1}" != 0 ]; then
for pipeline in 1 16; do
  tcpdump -i lo -B 262144 -w /dev/null "tcp port $port" 2>"$work/tcpdump.err" &
  capturer=$!
  pids+=("$capturer")
  for _ in $(seq 100); do grep -q listening "$work/tcpdump.err" 2>/dev/null && break; sleep 0.05; done
  before=$(cpu_ticks "$capturer")
  start=$(date +%s.%N)
  redis-benchmark -p "$port" -n "$n" -c 50 -P "$pipeline" -t set,get -q >/dev/null
  end=$(date +%s.%N)
  after=$(cpu_ticks "$capturer")
  rss=$(awk '/VmHWM/ { print $2 " " $3 }' "/proc/$capturer/status")
  kill -INT "$capturer"
  wait "$capturer" || true
  drops=$(awk '/packets dropped by kernel/ { print $1 }' "$work/tcpdump.err")
  row tcpdump "$pipeline" "$start" "$end" $((after - before)) "$rss" "$drops" - -
done
fi
for threads in ${THREADS:-1 2}; do
for pipeline in 1 16; do
  "$tcpkit" -i lo -p "$port" -m redis -t 100000 -P "$stats_port" --threads "$threads" \
    ${AGENT_ARGS:-} --summary text -o "$work/agent.log" &
  agent=$!
  pids+=("$agent")
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$stats_port") 2>/dev/null && break; sleep 0.05; done
  redis-cli -p "$port" config resetstat >/dev/null
  before=$(cpu_ticks "$agent")
  start=$(date +%s.%N)
  redis-benchmark -p "$port" -n "$n" -c 50 -P "$pipeline" -t set,get -q >/dev/null
  end=$(date +%s.%N)
  after=$(cpu_ticks "$agent")
  sleep 1.5  # let the agent drain and publish
  counted=$(python3 -c '
import json, socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
data = b""
while chunk := s.recv(65536):
    data += chunk
port = json.loads(data)[0][sys.argv[2]]
print(sum(port["commands"].get(c, {}).get("total_reqs", 0) for c in ("SET", "GET")))
' "$stats_port" "$port")
  sent=$(redis-cli -p "$port" info commandstats | tr -d '\r' |
    awk -F'[:,=]' '/^cmdstat_(set|get):/ { s += $3 } END { print s }')
  rss=$(awk '/VmHWM/ { print $2 " " $3 }' "/proc/$agent/status")
  kill -INT "$agent"
  wait "$agent" || true
  drops=$(awk '/packets dropped by kernel/ { print $1 }' "$work/agent.log" | tail -1)
  rm -f "$work/agent.log"
  row "$threads" "$pipeline" "$start" "$end" $((after - before)) "$rss" "$drops" "$counted" "$sent"
done
done
