#!/usr/bin/env bash
# Installs the system packages tcpkit builds and tests with (Debian/Ubuntu), when missing.
# Used by demo.sh and test.sh; safe to run again.
#   libpcap-dev                      build: the pcap crate links the system libpcap
#   tcpdump tshark                   fixtures, and an independent decoder to compare with
#   redis-server redis-tools         real servers for the end-to-end tests
#   memcached dnsmasq clickhouse-server
#   prometheus                       promtool: checks and tests deploy/grafana/'s rules
#   chromium chromium-driver         the web page's tests, in real headless browsers (WebDriver);
#   firefox-esr                      geckodriver, Firefox's driver, is built from crates.io
#   iproute2 ethtool util-linux bc   network namespaces, offloads, setpriv, benchmarks
#   tcpreplay                        bench/capacity.sh
set -euo pipefail

packages=(libpcap-dev tcpdump tshark redis-server redis-tools memcached dnsmasq clickhouse-server
          prometheus chromium chromium-driver firefox-esr iproute2 ethtool util-linux bc tcpreplay)
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
# Debian ships no geckodriver: built once (about 3 minutes) into cargo's bin directory.
if ! command -v geckodriver >/dev/null; then
  echo "setup: building geckodriver 0.37.1 (crates.io) for the Firefox tests" >&2
  cargo install --locked --quiet geckodriver --version 0.37.1
fi
