#!/usr/bin/env bash
# Debian packages the tests need: a real Redis server and a real Prometheus. Idempotent; needs root (or sudo).
set -euo pipefail
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "installing ${need[*]} (apt-get)"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# The Debian packages may start services of their own; the tests start private instances on free ports.
$SUDO systemctl stop redis-server prometheus 2>/dev/null || true
