#!/usr/bin/env bash
# The usage API's contract test: a live worker (on the sample, with October billed) is
# checked against docs/openapi.yaml by Schemathesis — every documented status, content
# type, header and body schema, and that malformed input is refused. Needs the broker
# (scripts/kafka.sh start) and a built `target/debug/im-meter`; installs Schemathesis
# from PyPI into a cached virtual environment.
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS=${IM_METER_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/im-meter/contract-tools}
SCHEMATHESIS_VERSION=4.32.5
if ! "$TOOLS/venv/bin/schemathesis" --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; then
  python3 -m venv "$TOOLS/venv"
  "$TOOLS/venv/bin/pip" install -q "schemathesis==$SCHEMATHESIS_VERSION"
fi

bin=${IM_METER_BIN:-target/debug/im-meter}
prefix="contract.$$.$(date +%s)"
export IM_METER__KAFKA__BROKERS="${IM_METER_TEST_BROKERS:-127.0.0.1:${KAFKA_PORT:-9092}}"
export IM_METER__KAFKA__GROUP_ID="$prefix"
export IM_METER__KAFKA__IDLE_PARTITION_TIMEOUT=1s
export IM_METER__KAFKA__COMMIT_INTERVAL=100ms
export IM_METER__HTTP__LISTEN=127.0.0.1:0
# The examples ask for October 2026, and the worker bills every month since by the clock:
# keep ten years of billed months in the API, whatever the date.
export IM_METER__HTTP__HISTORY_MONTHS=120
for topic in events subscriptions dead_letters changelog billing_changelog charges alerts usage plan_book; do
  export "IM_METER__TOPICS__${topic^^}=$prefix.$topic"
done

work=$(mktemp -d)
worker=""
cleanup() {
  [ -n "$worker" ] && kill "$worker" 2>/dev/null && wait "$worker" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

"$bin" produce --sample --month 2026-10 --subscriptions deploy/sample/subscriptions.ndjson >/dev/null 2>&1
"$bin" run >"$work/worker.log" 2>&1 &
worker=$!

# ok URL: whether GET URL answers 200 (python3, which the venv needs anyway).
ok() { python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' "$1" 2>/dev/null; }

# The address it listens on, then October billed (the examples ask for it).
address=""
for _ in $(seq 1 600); do
  address=$(grep -o 'http: serving.*address=[0-9.:]*' "$work/worker.log" | grep -o '[0-9.]*:[0-9]*$' || true)
  if [ -n "$address" ] && ok "http://$address/v1/months/2026-10/charges"; then
    break
  fi
  kill -0 "$worker" 2>/dev/null || { echo "the worker stopped:"; cat "$work/worker.log"; exit 1; }
  sleep 0.2
done
ok "http://$address/v1/months/2026-10/charges" || {
  echo "October was not billed within 120 s:"; tail -20 "$work/worker.log"; exit 1; }

"$TOOLS/venv/bin/schemathesis" run docs/openapi.yaml --url "http://$address" \
  --checks all --max-examples 100 --generation-deterministic --request-timeout 10 --no-color
