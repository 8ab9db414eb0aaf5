#!/usr/bin/env bash
# Memory per tracked connection, live: tcpkit captures lo in redis mode while a client opens
# C connections (100,000 by default) to real redis-servers, sends one PING on each, reads
# its PONG and keeps every connection open. Reports the agent's peak RSS and its RSS with
# every connection open, beside an agent's with none (the baseline), the bytes per connection,
# and the PINGs counted against the PINGs sent.
#
# A process may hold `ulimit -n` descriptors (20,000 here, and root cannot raise it), and a
# loopback address pair gives ~28k ephemeral ports: the connections are spread over 8
# servers and 8 client processes, client i binding 127.0.0.(2+i) and connecting to server i.
#
#   sudo bench/connections.sh            # C=100000 (C=… to change)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
c=${C:-100000}
servers=8
# TCPKIT=path measures another build (compare two in one run).
if [ -z "${TCPKIT:-}" ]; then
  cargo build --release --quiet --manifest-path "$root/Cargo.toml" -p tcpkit
fi
tcpkit=${TCPKIT:-$root/target/release/tcpkit}
work=$(mktemp -d)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
per=$(( (c + servers - 1) / servers ))
if [ "$(ulimit -n)" -lt $((per + 100)) ]; then
  echo "ulimit -n is $(ulimit -n): $per connections per process need more (use a larger C/8)" >&2
  exit 1
fi

ports=()
for _ in $(seq "$servers"); do
  port=$(free_port)
  redis-server --port "$port" --bind 127.0.0.1 --protected-mode no --save "" --appendonly no \
    --logfile "" \
    --maxclients $((per + 50)) >/dev/null &
  pids+=($!)
  ports+=("$port")
done
for port in "${ports[@]}"; do
  for _ in $(seq 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
done
filter=$(printf 'port %s or ' "${ports[@]}")
filter=${filter% or }
port_list=$(IFS=,; echo "${ports[*]}")

rss() { awk -v f="$2" '$1 == f":" { print $2 }' "/proc/$1/status"; }
stats_port=$(free_port)
# --max-flows above C, so that every connection stays tracked.
"$tcpkit" -i lo -p "$port_list" -m redis -t 100000 -P "$stats_port" --max-flows $((2 * c)) \
  --summary text -o "$work/agent.log" &
agent=$!
pids+=("$agent")
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$stats_port") 2>/dev/null && break; sleep 0.05; done
base=$(rss "$agent" VmRSS)

# The clients: C connections in all, one PING each, all kept open until the fifo closes.
mkfifo "$work/hold"
clients=()
for i in $(seq 0 $((servers - 1))); do
  python3 - "$per" "$work/hold" "$i" "${ports[$i]}" <<'EOF' &
import socket, sys
n, hold, i, port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
conns = []
for _ in range(n):
    s = socket.socket()
    s.bind((f"127.0.0.{2 + i}", 0))
    s.connect(("127.0.0.1", port))
    s.sendall(b"*1\r\n$4\r\nPING\r\n")
    assert s.recv(16) == b"+PONG\r\n"
    conns.append(s)
open(hold).read()
EOF
  clients+=($!)
  pids+=($!)
done
c=$((per * servers))
start=$(date +%s.%N)
until [ "$(python3 -c '
import json, socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
data = b""
while chunk := s.recv(65536):
    data += chunk
print(sum(p.get("commands", {}).get("PING", {}).get("total_reqs", 0) for d in json.loads(data) for p in d.values()))
' "$stats_port")" -ge "$c" ]; do
  for p in "${clients[@]}"; do kill -0 "$p" 2>/dev/null || { echo "a client failed" >&2; exit 1; }; done
  sleep 1
done
end=$(date +%s.%N)
open_rss=$(rss "$agent" VmRSS)
peak=$(rss "$agent" VmHWM)
exec 4>"$work/hold"   # opened and closed: the clients close their connections
exec 4>&-
for p in "${clients[@]}"; do wait "$p" || true; done
sleep 1
kill -INT "$agent"
wait "$agent" || true
counted=$(awk '/requests, avg/ { s += $3 } END { print s }' "$work/agent.log")
created=$(awk '/^flows:/ { print $2 }' "$work/agent.log")
printf '%-12s %12s %12s %12s %14s %14s %10s %10s\n' connections baseline_kib open_rss_kib \
  peak_kib peak_B_per_conn open_B_per_conn counted flows
printf '%-12d %12d %12d %12d %14.0f %14.0f %10s %10s\n' "$c" "$base" "$open_rss" "$peak" \
  "$(echo "($peak - $base) * 1024 / $c" | bc -l)" "$(echo "($open_rss - $base) * 1024 / $c" | bc -l)" \
  "$counted" "$created"
echo "(opening took $(echo "$end - $start" | bc -l | cut -c1-5) s)"
