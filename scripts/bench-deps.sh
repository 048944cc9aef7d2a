#!/usr/bin/env bash
# Installs what the end-to-end benchmark compares against: kcat, a bare librdkafka
# consumer, from Debian's packages. Idempotent.
set -euo pipefail
if ! command -v kcat >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq kcat >/dev/null
fi
kcat -V 2>&1 | head -1
