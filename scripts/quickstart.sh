#!/usr/bin/env bash
# Quick start: the main job, end to end, on this machine.
#
# Starts a local Kafka broker (scripts/kafka.sh), creates a fresh set of topics, produces the
# bundled sample (six apps on different plans; see deploy/sample/) for October 2026 with its
# subscription events, runs the worker until October is closed and billed, and prints the
# usage and charges read back from the output topics. October is long over, so the worker
# closes it as soon as every partition has caught up.
#
#   scripts/quickstart.sh            # the Kafka pipeline (needs Java 17 and Maven)
#   scripts/quickstart.sh --replay   # the same sample month through `im-meter replay`
#   extra arguments go to the final command (e.g. --format json)
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked -p im-meter
bin=target/release/im-meter
month=2026-10

if [ "${1:-}" = "--replay" ]; then
  shift
  events=$(mktemp)
  trap 'rm -f "$events"' EXIT
  "$bin" generate --sample --month "$month" --out "$events"
  "$bin" replay --events "$events" --subscriptions deploy/sample/subscriptions.ndjson "$@"
  exit
fi

scripts/kafka.sh start >/dev/null
run="quickstart-$(date +%Y%m%d-%H%M%S)"
export IM_METER__KAFKA__GROUP_ID="$run" IM_METER__KAFKA__INSTANCE_ID="$run"
# The default six partitions: most of them never see an event of the six sample apps, and
# close October all the same. Idle partitions follow the clock after 2 s instead of 30 s.
export IM_METER__KAFKA__IDLE_PARTITION_TIMEOUT=2s
for topic in events subscriptions dead_letters changelog billing_changelog charges alerts usage plan_book; do
  export "IM_METER__TOPICS__${topic^^}=$run.$topic"
done

"$bin" produce --sample --month "$month" --subscriptions deploy/sample/subscriptions.ndjson
log="$(mktemp -d)/worker.log"
"$bin" run 2>"$log" &
worker=$!
trap 'kill -INT $worker 2>/dev/null; wait $worker 2>/dev/null || true' EXIT
echo "im-meter: worker running (log: $log); waiting for $month to be billed..." >&2
"$bin" report --month "$month" --wait 180s "$@"
