#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it (.ci/run calls this script).
# Needs the Rust toolchain (cargo, rustfmt, clippy), Java 17 and Maven: the Kafka-backed
# tests run against a real single-node broker that scripts/kafka.sh fetches from Maven
# Central and starts here (and stops again if this script started it).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo fmt --all --check
# Twice: as released (failpoints compiled out) and as tested (src/failpoints.rs; the chaos
# feature adds the chaos run, tests/chaos.rs).
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo clippy --workspace --all-targets --locked --features im-meter/chaos -- -D warnings

# The deployment kit (Prometheus config and rules, dashboard, manifests, unit, docs):
# validated offline; it installs promtool and the validators it needs.
scripts/deploy-check.sh
# The HTTP tests scrape the worker with a real Prometheus server.
scripts/prometheus.sh >/dev/null

# Brokers this script starts, it stops: the single node here, and the three-node cluster that
# the cluster tests (tests/kafka_cluster.rs) start on 127.0.0.1:19092-19094 when it is down.
cleanup=()
trap 'for c in "${cleanup[@]}"; do $c >/dev/null 2>&1 || true; done' EXIT
if ! scripts/kafka.sh status >/dev/null 2>&1; then
  scripts/kafka.sh start >/dev/null
  cleanup+=("scripts/kafka.sh stop")
fi
if ! scripts/kafka.sh cluster status >/dev/null 2>&1; then
  cleanup+=("scripts/kafka.sh cluster stop")
fi
export IM_METER_TEST_BROKERS="${IM_METER_TEST_BROKERS:-127.0.0.1:${KAFKA_PORT:-9092}}"

# The broker-backed tests switch faults on inside the worker: its failpoints are compiled
# in for them (and only for them). One unit test checks that a build without them ignores
# the variables.
cargo test --workspace --locked --features im-meter/failpoints
cargo test -p im-meter --lib --locked failpoints

# The chaos run (scripts/chaos.sh, tests/chaos.rs): a few fixed seeds, each a month produced
# under a schedule of faults and billed as replay bills it. Their own results file, so that no
# seed is skipped as run before.
chaos_results="$(mktemp)"
scripts/chaos.sh --seed 1 --runs 2 --results "$chaos_results"
scripts/chaos.sh --cluster --seed 1 --results "$chaos_results"
rm -f "$chaos_results"

# The usage API against its OpenAPI document, on a live worker (Schemathesis).
scripts/contract-test.sh

# The main job as a user runs it: the quick start must work on this (clean) machine too.
out=$(scripts/quickstart.sh)
grep -q "Charges (USD)" <<<"$out" && grep -q "1349.97" <<<"$out" || {
  echo "quick start did not print the expected charges:"; echo "$out"; exit 1; }
echo "quick start: ok"
