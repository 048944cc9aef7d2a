#!/usr/bin/env bash
# Quick start: build im-meter and run the pipeline over the bundled sample month
# (deploy/sample/: six apps on different plans), printing usage and charges.
# Extra arguments are passed to `im-meter replay` (e.g. --format json, --exact).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked -p im-meter
exec ./target/release/im-meter replay \
  --events deploy/sample/events.ndjson \
  --subscriptions deploy/sample/subscriptions.ndjson \
  "$@"
