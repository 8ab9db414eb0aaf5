#!/usr/bin/env bash
# Installs the system packages tcpkit builds and tests with (Debian/Ubuntu), when missing.
# Used by demo.sh and test.sh; safe to run again.
#   libpcap-dev                      build: the pcap crate links the system libpcap
#   tcpdump tshark                   fixtures, and an independent decoder to compare with
#   redis-server redis-tools         real servers for the end-to-end tests
#   memcached dnsmasq clickhouse-server
#   prometheus                       promtool: checks and tests deploy/grafana/'s rules
#   chromium chromium-driver         the web page's tests, in a real headless browser (WebDriver)
#   iproute2 ethtool util-linux bc   network namespaces, offloads, setpriv, benchmarks
set -euo pipefail

packages=(libpcap-dev tcpdump tshark redis-server redis-tools memcached dnsmasq clickhouse-server
          prometheus chromium chromium-driver iproute2 ethtool util-linux bc)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "setup: cargo is missing: install Rust (rustup)" >&2; exit 1; }
