#!/usr/bin/env bash
# scripts/chaos.sh — the seeded chaos run (tests/chaos.rs): a month of events produced while a
# schedule of faults drawn from the seed applies (workers killed, frozen, joining and leaving,
# one with its clock off; a broker killed; the events topic grown; a 1 MB poison record; a late
# burst), then the bill compared with `replay` over the events the producer acknowledged.
#
# Usage: scripts/chaos.sh --seed S [--runs N] [--cluster] [--results FILE]
#   --seed S       the first run's seed (run i uses S+i); the same seed draws the same month and
#                  schedule, so `--seed S` alone reproduces a failure
#   --runs N       N seeds in a row [1]; seeds already in the results file are skipped, so a
#                  long series can be gathered over several sittings
#   --cluster      on the three-node cluster (scripts/kafka.sh cluster) instead of the single
#                  broker; broker kills hit a busy partition's leader or a coordinator
#   --results F    where each run's line goes [target/chaos/results.tsv]: seed, brokers,
#                  pass|FAIL, seconds, notes (workers that exited by themselves)
#
# Each run leaves target/chaos/<single|cluster>-seed-S/: schedule.log (the faults as they
# happened, with times) and worker-*.log. The brokers are started here if they are down, and
# stopped again afterwards. Exit status: 0 when every run passed.
set -euo pipefail

cluster=0
args=()
while (($#)); do
  case "$1" in
    --cluster) cluster=1; args+=("$1") ;;
    # The test runs in its crate's directory: a relative path is taken from the caller's.
    --results) args+=("$1" "$(realpath -m -- "${2:?--results needs a file}")"); shift ;;
    *) args+=("$1") ;;
  esac
  shift
done
cd "$(dirname "$0")/.."

stop=()
trap 'for c in "${stop[@]}"; do $c >/dev/null 2>&1 || true; done' EXIT
if [[ $cluster == 1 ]]; then
  if ! scripts/kafka.sh cluster status >/dev/null 2>&1; then
    scripts/kafka.sh cluster start 3 >/dev/null
    stop+=("scripts/kafka.sh cluster stop")
  fi
else
  if ! scripts/kafka.sh status >/dev/null 2>&1; then
    scripts/kafka.sh start >/dev/null
    stop+=("scripts/kafka.sh stop")
  fi
  export IM_METER_TEST_BROKERS="127.0.0.1:${KAFKA_PORT:-9092}"
fi

cargo test --locked --features im-meter/chaos --test chaos -- "${args[@]}"
