#!/usr/bin/env bash
# The most one agent takes live: tcpreplay sends bench-data/redis-small.pcap (1.68M packets,
# 840k requests, made by bench/run.sh against a real redis-server) into one end of a veth
# pair, at rising rates and then --topspeed; the agent captures the other end, in a network
# namespace this script makes, with 1 and 2 pipelines (--threads). For each run: the rate
# tcpreplay reached, the agent's kernel drops, and requests counted against the capture's.
# The capacity is the highest rate with 0 drops and every request counted.
#
#   sudo bench/capacity.sh                 # RATES="100000 200000 400000 topspeed" THREADS="1 2"
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
rates=${RATES:-100000 200000 400000 topspeed}
capture="$root/bench-data/redis-small.pcap"
expected="$root/bench-data/redis-small.expected.json"
if ! command -v tcpreplay >/dev/null; then
  echo "tcpreplay is missing: ./setup.sh installs it (apt-get install tcpreplay)" >&2
  exit 1
fi
[ -f "$capture" ] || { echo "$capture is missing: run bench/run.sh once" >&2; exit 1; }
# TCPKIT=path measures another build.
if [ -z "${TCPKIT:-}" ]; then
  cargo build --release --quiet --manifest-path "$root/Cargo.toml" -p tcpkit
fi
tcpkit=${TCPKIT:-$root/target/release/tcpkit}

ns="tkcap$$"
work=$(mktemp -d)
agent=
cleanup() {
  [ -n "$agent" ] && kill "$agent" 2>/dev/null
  wait 2>/dev/null || true
  ip netns del "$ns" 2>/dev/null || true
  ip link del "tk$$a" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
ip netns add "$ns"
ip link add "tk$$a" type veth peer name "tk$$b"
ip link set "tk$$b" netns "$ns"
# Frames of a capture on lo can be larger than Ethernet's 1500 bytes.
ip link set "tk$$a" mtu 65535 up
ip netns exec "$ns" ip link set "tk$$b" mtu 65535 up
ip netns exec "$ns" ip link set lo up

port=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["port"])' "$expected")
requests=$(python3 -c 'import json,sys; print(sum(json.load(open(sys.argv[1]))["commands"].values()))' "$expected")
packets=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["packets"])' "$expected")

printf '%-8s %-10s %12s %10s %12s %12s\n' threads rate sent_pps drops counted in_capture
for threads in ${THREADS:-1 2}; do
  for rate in $rates; do
    ip netns exec "$ns" "$tcpkit" -i "tk$$b" -p "$port" -m redis -t 100000 --threads "$threads" \
      -P 33333 --summary text -o "$work/agent.log" 2>"$work/agent.err" &
    agent=$!
    # Its stats port (in the namespace) answers once its captures are open.
    for _ in $(seq 100); do
      ip netns exec "$ns" bash -c 'exec 3<>/dev/tcp/127.0.0.1/33333' 2>/dev/null && break
      sleep 0.05
    done
    if [ "$rate" = topspeed ]; then speed=(--topspeed); else speed=(--pps "$rate"); fi
    # -K: the capture is read into memory first, so that reading the file does not hold it back.
    sent=$(tcpreplay -K -i "tk$$a" "${speed[@]}" "$capture" 2>&1 |
      awk '/Rated:/ { for (i = 1; i <= NF; i++) if ($i ~ /pps/) { print $(i - 1); exit } }')
    sleep 1
    kill -INT "$agent"
    wait "$agent" || true
    agent=
    drops=$(awk '/packets dropped by kernel/ { print $1 }' "$work/agent.log" | tail -1)
    counted=$(awk -v p="port $port:" 'index($0, p) == 1 && /requests, avg/ { print $3 }' "$work/agent.log")
    printf '%-8s %-10s %12s %10s %12s %12s\n' "$threads" "$rate" "${sent%.*}" "${drops:-?}" \
      "${counted:-?}" "$requests"
    rm -f "$work/agent.log"
  done
done
echo "($packets packets a run)"
