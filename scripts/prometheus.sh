#!/usr/bin/env bash
# Installs Prometheus and promtool from Debian's `prometheus` package (/usr/bin/prometheus,
# /usr/bin/promtool) and prints their versions. Idempotent.
#
# Used by scripts/deploy-check.sh (promtool checks the Prometheus config, the alerting rules
# and their unit tests) and by anything that starts its own Prometheus server. The package
# would start a system service on :9090; tests start their own servers on other ports, so
# this script makes sure no packaged service is left running or enabled:
#   - during the install, a temporary policy-rc.d forbids maintainer scripts to start
#     services (the standard Debian mechanism; an existing policy-rc.d is left alone);
#   - afterwards the packaged service is stopped and disabled (systemd or sysv-init alike).
# --no-install-recommends keeps prometheus-node-exporter (another service, on :9100) out.
set -euo pipefail

if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# temporary, from im-meter scripts/prometheus.sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    trap 'rm -f "$policy"' EXIT
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

# Stop and disable the packaged service, whichever init system this machine has.
if [ -d /run/systemd/system ]; then
  systemctl disable --now prometheus.service >/dev/null 2>&1 || true
else
  if [ -x /etc/init.d/prometheus ]; then
    /etc/init.d/prometheus stop >/dev/null 2>&1 || true
  fi
  if command -v update-rc.d >/dev/null 2>&1 && [ -e /etc/init.d/prometheus ]; then
    update-rc.d prometheus disable >/dev/null 2>&1 || true
  fi
fi
# Belt and braces: the packaged sysv-init daemon records its pid here; stop that one only,
# never a server some test started itself.
pidfile=/run/prometheus/prometheus.pid
if [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
  kill "$(cat "$pidfile")" || true
fi

prometheus --version 2>&1 | head -1
promtool --version 2>&1 | head -1
