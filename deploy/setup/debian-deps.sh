#!/usr/bin/env bash
# Install the Debian packages volmirror's make targets need, only those missing.
# Usage: deploy/setup/debian-deps.sh [run|test|bench]
#   run   : JDK (Kafka broker), Maven (fetches the broker jars)
#   test  : run + promtool/prometheus (rule tests, end-to-end scrape tests)
#   bench : test + rsync and lsyncd (the baselines benchmarks compare against)
set -euo pipefail
what="${1:-test}"

need=()   # "command:package" pairs
need+=("java:openjdk-17-jre-headless" "mvn:maven")
if [[ "$what" == test || "$what" == bench ]]; then
  need+=("promtool:prometheus")
fi
if [[ "$what" == bench ]]; then
  need+=("rsync:rsync" "lsyncd:lsyncd")
fi

missing=()
for pair in "${need[@]}"; do
  cmd="${pair%%:*}"; pkg="${pair#*:}"
  command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

SUDO=""
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null 2>&1 || { echo "debian-deps: need root (or sudo) to install: ${missing[*]}" >&2; exit 1; }
  SUDO="sudo"
fi
echo "debian-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# Debian's prometheus package starts a server on :9090 via its unit; tests run their own.
if [[ " ${missing[*]} " == *" prometheus "* ]] && command -v systemctl >/dev/null 2>&1; then
  $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
