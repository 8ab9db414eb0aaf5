#!/usr/bin/env bash
# Installs tcpkit on this host as systemd services.
#   deploy/install.sh agent        the agent (tcpkit)
#   deploy/install.sh aggregator   the aggregator and tcpkit-query
# Builds the release binaries unless they exist, copies them to /usr/local/bin, the units to
# /etc/systemd/system and the example settings to /etc/tcpkit (never over existing ones),
# creates a token if there is none, then enables the service. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
role=${1:?usage: deploy/install.sh agent|aggregator}
case "$role" in
  agent) binaries=(tcpkit); unit=tcpkit-agent ;;
  aggregator) binaries=(tcpkit-aggregator tcpkit-query); unit=tcpkit-aggregator ;;
  *) echo "usage: deploy/install.sh agent|aggregator" >&2; exit 2 ;;
esac
[ "$(id -u)" = 0 ] || { echo "install.sh: run as root" >&2; exit 1; }
for b in "${binaries[@]}"; do
  [ -x "target/release/$b" ] || cargo build --release --bin "$b"
  install -m 0755 "target/release/$b" "/usr/local/bin/$b"
done
install -d -m 0755 /etc/tcpkit
[ -e "/etc/tcpkit/$role.toml" ] || install -m 0644 "deploy/config/$role.toml" "/etc/tcpkit/$role.toml"
if [ ! -e /etc/tcpkit/token ]; then
  (umask 077; head -c 32 /dev/urandom | base64 | tr -d '/+=\n' > /etc/tcpkit/token)
  echo "install.sh: made /etc/tcpkit/token: copy it to every agent and tcpkit-query user"
fi
chmod 0600 /etc/tcpkit/token  # the service reads it as a systemd credential
if [ "$role" = aggregator ] && [ ! -e /etc/tcpkit/aggregator.key ]; then
  echo "install.sh: put the aggregator's TLS certificate and key in /etc/tcpkit/aggregator.crt" >&2
  echo "  and /etc/tcpkit/aggregator.key (or remove tls-* from /etc/tcpkit/aggregator.toml and" >&2
  echo "  the --tls-key credential from the unit), then: systemctl restart $unit" >&2
fi
install -m 0644 "deploy/systemd/$unit.service" "/etc/systemd/system/$unit.service"
if [ "$role" = agent ] && [ -d /etc/logrotate.d ]; then
  install -m 0644 deploy/logrotate/tcpkit /etc/logrotate.d/tcpkit  # SIGHUP reopens the log
fi
systemctl daemon-reload
systemctl enable --now "$unit"
systemctl --no-pager status "$unit" || true
