#!/usr/bin/env bash
# The aggregator's benchmarks (aggregator/examples/fleet_bench.rs) on both stores, side by
# side: SQLite (a file under bench-data/fleet), then a throwaway clickhouse-server of its own
# (config and data under bench-data/fleet/clickhouse, free ports on 127.0.0.1, stopped at
# the end). Ingest: 4 agent streams, 2M events, stored and acknowledged (ClickHouse with 1 and
# with 2 aggregators); queries: `slow --min-ms 10 --limit 100` and `hist --since 24h` over
# 10M events and 1M snapshots, median of RUNS (5). The query stores are built once and kept.
#
#   bench/fleet.sh            # both stores
#   STORES=sqlite bench/fleet.sh
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
dir="$root/bench-data/fleet"
mkdir -p "$dir"
stores=${STORES:-"sqlite clickhouse"}

cargo build --release --quiet --manifest-path "$root/Cargo.toml" -p tcpkit-aggregator --example fleet_bench
bench="$root/target/release/examples/fleet_bench"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

for store in $stores; do
  case "$store" in
    sqlite)
      echo "== SQLite"
      "$bench" "$dir"
      ;;
    clickhouse)
      server=/usr/sbin/clickhouse-server
      [ -x "$server" ] || { echo "fleet.sh: $server is missing (apt-get install clickhouse-server)" >&2; exit 1; }
      ch="$dir/clickhouse"
      mkdir -p "$ch"
      http=$(free_port); tcp=$(free_port)
      cat > "$ch/users.xml" <<XML
<?xml version="1.0"?>
<yandex>
  <profiles><default></default></profiles>
  <users><default><password></password><networks><ip>127.0.0.1</ip></networks><profile>default</profile><quota>default</quota></default></users>
  <quotas><default></default></quotas>
</yandex>
XML
      cat > "$ch/config.xml" <<XML
<?xml version="1.0"?>
<yandex>
  <logger><level>warning</level><log>$ch/server.log</log><errorlog>$ch/error.log</errorlog><console>0</console></logger>
  <http_port>$http</http_port>
  <tcp_port>$tcp</tcp_port>
  <listen_host>127.0.0.1</listen_host>
  <path>$ch/data/</path>
  <tmp_path>$ch/tmp/</tmp_path>
  <user_files_path>$ch/user_files/</user_files_path>
  <format_schema_path>$ch/format_schemas/</format_schema_path>
  <mark_cache_size>1073741824</mark_cache_size>
  <uncompressed_cache_size>1073741824</uncompressed_cache_size>
  <users_config>$ch/users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <mlock_executable>false</mlock_executable>
</yandex>
XML
      "$server" --config-file="$ch/config.xml" > "$ch/stdout.log" 2>&1 &
      pid=$!
      trap 'kill $pid 2>/dev/null || true' EXIT
      for _ in $(seq 100); do
        curl -sf "http://127.0.0.1:$http/" --data-binary 'SELECT 1' >/dev/null 2>&1 && break
        sleep 0.2
      done
      echo "== ClickHouse $(curl -s "http://127.0.0.1:$http/" --data-binary 'SELECT version()') on 127.0.0.1:$http"
      STORE="clickhouse://127.0.0.1:$http" "$bench" "$dir"
      # The ingest databases are not kept.
      for db in $(curl -s "http://127.0.0.1:$http/" --data-binary "SELECT name FROM system.databases WHERE name LIKE 'bench_ingest_%'"); do
        curl -s "http://127.0.0.1:$http/" --data-binary "DROP DATABASE $db" >/dev/null
      done
      kill $pid; wait $pid 2>/dev/null || true
      trap - EXIT
      ;;
    *) echo "fleet.sh: unknown store $store (sqlite, clickhouse)" >&2; exit 2 ;;
  esac
done
