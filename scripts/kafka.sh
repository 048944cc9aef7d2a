#!/usr/bin/env bash
# scripts/kafka.sh — a single-node Apache Kafka 4.x broker (KRaft, broker+controller in one JVM) on
# loopback, for tests, CI and the quick start. No Docker and no Kafka tarball: the jars come from
# Maven Central through scripts/kafka/pom.xml and are cached in .cache/kafka/<version>/libs.
#
# Usage: scripts/kafka.sh start | stop | restart | status | reset
#        scripts/kafka.sh topics ARGS...           # TopicCommand --bootstrap-server ADDR ARGS...
#        scripts/kafka.sh run-class CLASS ARGS...  # any class on the Kafka classpath
#        scripts/kafka.sh cluster start [N] | stop | kill I | restart I | status | reset
#            N (default 3) KRaft nodes, each broker+controller, on loopback: node I (1..N) listens
#            on KAFKA_CLUSTER_PORT+I-1 and its controller on KAFKA_CLUSTER_PORT+100+I-1; Kafka's
#            internal topics get replication factor min(3, N) and min.insync.replicas min(2, N),
#            other topics Kafka's own defaults (1 and 1, as on a fresh install: a client asks for
#            more, as im-meter's kafka.replication_factor does); `kill` is kill -9 of node I,
#            `restart` starts it again and waits until it answers.
#            `start` and `status` print the bootstrap list (127.0.0.1:19092,...).
#
# Environment (defaults in brackets):
#   KAFKA_VERSION          Kafka version fetched from Maven Central [4.1.1]
#   KAFKA_PORT             PLAINTEXT listener on 127.0.0.1 [9092]
#   KAFKA_CONTROLLER_PORT  CONTROLLER listener on 127.0.0.1 [KAFKA_PORT+1, i.e. 9093]
#   KAFKA_DATA_DIR         data, config, pid and logs [<repo>/.cache/kafka/data-$KAFKA_PORT]
#   KAFKA_HEAP_OPTS        broker heap [-Xms256m -Xmx768m]
#   KAFKA_TOOL_HEAP_OPTS   heap of topics/run-class JVMs [-Xmx512m]
#   KAFKA_START_TIMEOUT    seconds to wait for the broker to answer [90]
#   KAFKA_MVN_ARGS         extra Maven arguments (e.g. -Dmaven.repo.local=...) [none: ~/.m2]
#   JAVA_HOME              Java 17+ to use [java on PATH]
#   KAFKA_CLUSTER_PORT     first node's PLAINTEXT port of `cluster` [19092]
#   KAFKA_CLUSTER_DIR      the cluster's data, one directory per node [<repo>/.cache/kafka/cluster-PORT]
#
# Facts this relies on (checked against Kafka 4.1.1's Maven artifacts):
# - Broker main class kafka.Kafka and the storage formatter kafka.tools.StorageTool
#   (`random-uuid`, `format -t ID -c server.properties`) are in org.apache.kafka:kafka_2.13;
#   TopicCommand, ConsoleProducer, consumer.ConsoleConsumer, ProducerPerformance, ConsumerPerformance,
#   TransactionsCommand are under org.apache.kafka.tools in org.apache.kafka:kafka-tools.
# - The Maven artifacts carry no logging backend (the tarball adds one), so the pom adds log4j-core +
#   log4j-slf4j2-impl, and the JVM gets -Dlog4j2.configurationFile=scripts/kafka/log4j2.properties
#   (the Log4j 1 flag -Dlog4j.configuration is ignored by Kafka 4).
# - A static quorum (controller.quorum.voters) formats without --standalone.
# - One broker: internal topics need replication factor 1 / min ISR 1, or consumer groups and
#   transactions fail (__consumer_offsets, __transaction_state, __share_group_state).
set -euo pipefail

SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)"
REPO_ROOT="$(cd -- "$SCRIPT_DIR/.." && pwd -P)"

KAFKA_VERSION="${KAFKA_VERSION:-4.1.1}"
KAFKA_PORT="${KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-$((KAFKA_PORT + 1))}"
KAFKA_DATA_DIR="${KAFKA_DATA_DIR:-$REPO_ROOT/.cache/kafka/data-$KAFKA_PORT}"
KAFKA_HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xms256m -Xmx768m}"
KAFKA_START_TIMEOUT="${KAFKA_START_TIMEOUT:-90}"
KAFKA_MVN_ARGS="${KAFKA_MVN_ARGS:-}"
KAFKA_TOOL_HEAP_OPTS="${KAFKA_TOOL_HEAP_OPTS:--Xmx512m}"
# A node of a cluster (set by `cluster`): its id, the quorum, and the replication its topics get.
KAFKA_NODE_ID="${KAFKA_NODE_ID:-1}"
KAFKA_QUORUM_VOTERS="${KAFKA_QUORUM_VOTERS:-1@127.0.0.1:$KAFKA_CONTROLLER_PORT}"
# (internal topics only: others get Kafka's defaults, one replica and min.insync.replicas 1)
KAFKA_REPLICATION="${KAFKA_REPLICATION:-1}"
KAFKA_MIN_ISR="${KAFKA_MIN_ISR:-1}"
KAFKA_CLUSTER_ID="${KAFKA_CLUSTER_ID:-}"
KAFKA_CLUSTER_PORT="${KAFKA_CLUSTER_PORT:-19092}"
KAFKA_CLUSTER_DIR="${KAFKA_CLUSTER_DIR:-$REPO_ROOT/.cache/kafka/cluster-$KAFKA_CLUSTER_PORT}"
# exported so the nested `kafka.sh topics` of the readiness probe sees the same settings
export KAFKA_VERSION KAFKA_PORT KAFKA_CONTROLLER_PORT KAFKA_DATA_DIR KAFKA_MVN_ARGS KAFKA_TOOL_HEAP_OPTS

BOOTSTRAP="127.0.0.1:$KAFKA_PORT"
POM="$SCRIPT_DIR/kafka/pom.xml"
LOG4J_CONFIG="$SCRIPT_DIR/kafka/log4j2.properties"
LIBS="$REPO_ROOT/.cache/kafka/$KAFKA_VERSION/libs"
LIBS_STAMP="$LIBS/.installed"          # holds the sha256 of the pom the jars were copied with
SERVER_PROPS="$KAFKA_DATA_DIR/server.properties"
CLIENT_PROPS="$KAFKA_DATA_DIR/probe-client.properties"
LOG_DIRS="$KAFKA_DATA_DIR/kraft-logs"  # log.dirs (topic data and the metadata log)
PID_FILE="$KAFKA_DATA_DIR/kafka.pid"
OUT_FILE="$KAFKA_DATA_DIR/kafka.out"   # the broker JVM's stdout/stderr
LOG4J_DIR="$KAFKA_DATA_DIR/logs"       # server.log (broker) and tools.log (tools), WARN and up

if [[ -n "${JAVA_HOME:-}" && -x "$JAVA_HOME/bin/java" ]]; then JAVA="$JAVA_HOME/bin/java"; else JAVA=java; fi

log() { printf 'kafka.sh: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

# --- jars -------------------------------------------------------------------------------------

pom_hash() { sha256sum "$POM" | cut -d' ' -f1; }

ensure_libs() {
  if [[ -f "$LIBS_STAMP" && "$(cat "$LIBS_STAMP")" == "$(pom_hash)" ]]; then
    return 0
  fi
  command -v mvn >/dev/null || die "Maven (mvn) is needed to fetch Kafka $KAFKA_VERSION"
  log "fetching Kafka $KAFKA_VERSION jars from Maven Central into $LIBS ..."
  local tmp
  tmp="$(dirname "$LIBS")/libs.tmp.$$"
  rm -rf "$tmp"
  mkdir -p "$tmp"
  # shellcheck disable=SC2086 # KAFKA_MVN_ARGS is a list of words on purpose
  if ! mvn -B -q $KAFKA_MVN_ARGS -f "$POM" \
      -Dkafka.version="$KAFKA_VERSION" \
      dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$tmp" >&2; then
    rm -rf "$tmp"
    die "Maven could not fetch Kafka $KAFKA_VERSION (is that version on Maven Central?)"
  fi
  pom_hash >"$tmp/.installed"
  rm -rf "$LIBS"
  mv -T "$tmp" "$LIBS" 2>/dev/null || rm -rf "$tmp"   # lost a race with another start: keep theirs
  [[ -f "$LIBS_STAMP" ]] || die "failed to install jars into $LIBS"
}

# Run a class on the Kafka classpath in the foreground; its Log4j output goes to tools.log.
# With KAFKA_EXEC=1 the shell is replaced by the JVM (signals and exit code go straight to it).
run_class() {
  ensure_libs
  mkdir -p "$LOG4J_DIR"
  # shellcheck disable=SC2206 # KAFKA_TOOL_HEAP_OPTS is a list of words on purpose
  local java_cmd=("$JAVA" $KAFKA_TOOL_HEAP_OPTS -Djava.awt.headless=true
    -Dlog4j2.configurationFile="$LOG4J_CONFIG"
    -Dkafka.logs.dir="$LOG4J_DIR" -Dkafka.log.file=tools.log
    -cp "$LIBS/*" "$@")
  if [[ "${KAFKA_EXEC:-}" == 1 ]]; then exec "${java_cmd[@]}"; fi
  "${java_cmd[@]}"
}

# --- config and storage -------------------------------------------------------------------------

write_config() {
  mkdir -p "$KAFKA_DATA_DIR" "$LOG_DIRS" "$LOG4J_DIR"
  cat >"$SERVER_PROPS" <<EOF
# Written by scripts/kafka.sh on every start; edits here are overwritten.
process.roles=broker,controller
node.id=$KAFKA_NODE_ID
controller.quorum.voters=$KAFKA_QUORUM_VOTERS
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
log.dirs=$LOG_DIRS

num.partitions=3
# Kafka's defaults for other topics, spelled out: a topic is as replicated as its creator asks.
default.replication.factor=1
min.insync.replicas=1
auto.create.topics.enable=false

# internal topics as replicated as the cluster allows (one replica on a single node)
offsets.topic.replication.factor=$KAFKA_REPLICATION
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=$KAFKA_REPLICATION
transaction.state.log.min.isr=$KAFKA_MIN_ISR
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=$KAFKA_REPLICATION
share.coordinator.state.topic.min.isr=$KAFKA_MIN_ISR
share.coordinator.state.topic.num.partitions=1

# tests: no 3 s delay before the first consumer-group rebalance
group.initial.rebalance.delay.ms=0
EOF
  # Client settings for the readiness probe: fail fast instead of retrying for a minute.
  cat >"$CLIENT_PROPS" <<EOF
request.timeout.ms=5000
default.api.timeout.ms=8000
EOF
}

is_formatted() { [[ -f "$LOG_DIRS/meta.properties" ]]; }

format_storage() {
  local cluster_id="$KAFKA_CLUSTER_ID"
  [[ -n "$cluster_id" ]] || cluster_id="$(run_class kafka.tools.StorageTool random-uuid)"
  log "formatting $LOG_DIRS (cluster id $cluster_id)"
  run_class kafka.tools.StorageTool format -t "$cluster_id" -c "$SERVER_PROPS" --ignore-formatted >/dev/null
}

# --- process ------------------------------------------------------------------------------------

# Prints the pid of the broker started by this script for this data dir, if it is alive.
broker_pid() {
  [[ -f "$PID_FILE" ]] || return 1
  local pid
  pid="$(cat "$PID_FILE")"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  # guard against a recycled pid: the process must be our kafka.Kafka with our server.properties
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "kafka.Kafka $SERVER_PROPS" || return 1
  echo "$pid"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# The broker answers when an Admin client can list topics through the bootstrap address.
answering() {
  port_open "$KAFKA_PORT" || return 1
  timeout 30 "$BASH_SOURCE_ABS" topics --list --command-config "$CLIENT_PROPS" >/dev/null 2>&1
}
BASH_SOURCE_ABS="$SCRIPT_DIR/$(basename -- "${BASH_SOURCE[0]}")"

tail_logs() {
  local f
  for f in "$OUT_FILE" "$LOG4J_DIR/server.log"; do
    [[ -s "$f" ]] || continue
    echo "----- last 50 lines of $f -----" >&2
    tail -n 50 "$f" >&2
  done
}

cmd_start() {
  local pid
  if pid="$(broker_pid)"; then
    if answering; then
      log "already running (pid $pid), bootstrap $BOOTSTRAP"
      [[ -n "${KAFKA_QUIET:-}" ]] || echo "$BOOTSTRAP"
      return 0
    fi
    die "broker pid $pid is running but does not answer on $BOOTSTRAP; try: $0 restart"
  fi
  port_open "$KAFKA_PORT" && die "port $KAFKA_PORT is in use by another process; set KAFKA_PORT"
  port_open "$KAFKA_CONTROLLER_PORT" &&
    die "controller port $KAFKA_CONTROLLER_PORT is in use by another process; set KAFKA_CONTROLLER_PORT"

  ensure_libs
  write_config
  is_formatted || format_storage

  log "starting Kafka $KAFKA_VERSION on $BOOTSTRAP (controller 127.0.0.1:$KAFKA_CONTROLLER_PORT, data $KAFKA_DATA_DIR)"
  rm -f "$PID_FILE"
  echo "===== $(date -u +%FT%TZ) start" >>"$OUT_FILE"
  # setsid: own session, so Ctrl-C or the end of the calling shell does not take the broker down.
  # The inner shell writes its own pid, then execs java, so the pid file names the JVM.
  # shellcheck disable=SC2086,SC2016 # KAFKA_HEAP_OPTS is a list of words; $$ is for the inner shell
  setsid bash -c 'echo $$ >"$0"; exec "$@"' "$PID_FILE" \
    "$JAVA" $KAFKA_HEAP_OPTS -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent -XX:MaxInlineLevel=15 \
    -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$LOG4J_CONFIG" \
    -Dkafka.logs.dir="$LOG4J_DIR" -Dkafka.log.file=server.log \
    -cp "$LIBS/*" kafka.Kafka "$SERVER_PROPS" \
    </dev/null >>"$OUT_FILE" 2>&1 &

  [[ "${KAFKA_NO_WAIT:-}" == 1 ]] && return 0
  wait_answering
}

# Waits until the broker answers (or exited, or KAFKA_START_TIMEOUT passed: stopped, exit 1).
wait_answering() {
  local started=$SECONDS
  while (( SECONDS - started < KAFKA_START_TIMEOUT )); do
    sleep 1
    if ! broker_pid >/dev/null; then
      tail_logs
      die "the broker exited during startup (see $OUT_FILE and $LOG4J_DIR/server.log)"
    fi
    if answering; then
      log "ready after $((SECONDS - started)) s (pid $(cat "$PID_FILE")), bootstrap $BOOTSTRAP"
      [[ -n "${KAFKA_QUIET:-}" ]] || echo "$BOOTSTRAP"
      return 0
    fi
  done
  tail_logs
  log "the broker did not answer on $BOOTSTRAP within $KAFKA_START_TIMEOUT s; stopping it"
  cmd_stop
  exit 1
}

cmd_stop() {
  local pid
  if ! pid="$(broker_pid)"; then
    rm -f "$PID_FILE"
    log "not running ($KAFKA_DATA_DIR)"
    return 0
  fi
  log "stopping pid $pid"
  kill -TERM "$pid" 2>/dev/null || true
  local i
  for ((i = 0; i < 300; i++)); do           # 30 s in steps of 0.1 s
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "still running after 30 s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
  fi
  rm -f "$PID_FILE"
  log "stopped"
}

cmd_status() {
  local pid
  if pid="$(broker_pid)"; then
    if answering; then
      echo "$BOOTSTRAP"
      return 0
    fi
    log "pid $pid is running but does not answer on $BOOTSTRAP"
    return 1
  fi
  if port_open "$KAFKA_PORT"; then
    log "not started by this script ($KAFKA_DATA_DIR), but port $KAFKA_PORT is in use"
  else
    log "not running"
  fi
  return 3
}

cmd_reset() {
  cmd_stop
  if [[ -d "$KAFKA_DATA_DIR" ]]; then
    rm -rf -- "$KAFKA_DATA_DIR"
    log "deleted $KAFKA_DATA_DIR"
  fi
}

# --- a cluster of nodes ---------------------------------------------------------------------------

CLUSTER_SIZE_FILE="$KAFKA_CLUSTER_DIR/size"

cluster_size() {
  [[ -f "$CLUSTER_SIZE_FILE" ]] || die "no cluster in $KAFKA_CLUSTER_DIR; start one: $0 cluster start 3"
  cat "$CLUSTER_SIZE_FILE"
}

cluster_bootstrap() {
  local n="$1" i list=()
  for ((i = 1; i <= n; i++)); do list+=("127.0.0.1:$((KAFKA_CLUSTER_PORT + i - 1))"); done
  local IFS=,
  echo "${list[*]}"
}

# Runs `kafka.sh CMD` as node I of an N-node cluster.
as_node() {
  local n="$1" i="$2" voters=() j
  shift 2
  for ((j = 1; j <= n; j++)); do voters+=("$j@127.0.0.1:$((KAFKA_CLUSTER_PORT + 100 + j - 1))"); done
  local IFS=,
  KAFKA_NODE_ID="$i" KAFKA_QUORUM_VOTERS="${voters[*]}" \
    KAFKA_REPLICATION="$((n < 3 ? n : 3))" KAFKA_MIN_ISR="$((n < 2 ? n : 2))" \
    KAFKA_CLUSTER_ID="$(cat "$KAFKA_CLUSTER_DIR/cluster-id")" \
    KAFKA_PORT="$((KAFKA_CLUSTER_PORT + i - 1))" KAFKA_CONTROLLER_PORT="$((KAFKA_CLUSTER_PORT + 100 + i - 1))" \
    KAFKA_DATA_DIR="$KAFKA_CLUSTER_DIR/node-$i" KAFKA_QUIET=1 \
    "$BASH_SOURCE_ABS" "$@"
}

cmd_cluster() {
  local cmd="${1:-}" n i
  [[ $# -gt 0 ]] && shift
  case "$cmd" in
    start)
      n="${1:-3}"
      [[ "$n" =~ ^[1-9]$ ]] || die "cluster start: N must be 1 to 9, not '$n'"
      if [[ -f "$CLUSTER_SIZE_FILE" && "$(cat "$CLUSTER_SIZE_FILE")" != "$n" ]]; then
        die "$KAFKA_CLUSTER_DIR holds a cluster of $(cat "$CLUSTER_SIZE_FILE") nodes; $0 cluster reset first"
      fi
      mkdir -p "$KAFKA_CLUSTER_DIR"
      echo "$n" >"$CLUSTER_SIZE_FILE"
      ensure_libs
      [[ -s "$KAFKA_CLUSTER_DIR/cluster-id" ]] ||
        run_class kafka.tools.StorageTool random-uuid >"$KAFKA_CLUSTER_DIR/cluster-id"
      # Every node first: one alone has no quorum and cannot answer.
      for ((i = 1; i <= n; i++)); do KAFKA_NO_WAIT=1 as_node "$n" "$i" start; done
      for ((i = 1; i <= n; i++)); do as_node "$n" "$i" wait; done
      cluster_bootstrap "$n"
      ;;
    stop)
      [[ -f "$CLUSTER_SIZE_FILE" ]] || { log "no cluster in $KAFKA_CLUSTER_DIR"; return 0; }
      n="$(cluster_size)"
      # All at once: a node stopping alone waits for a quorum the stopped ones no longer give.
      for ((i = 1; i <= n; i++)); do as_node "$n" "$i" stop & done
      wait
      ;;
    kill | restart)
      n="$(cluster_size)"
      i="${1:-}"
      [[ "$i" =~ ^[0-9]+$ && "$i" -ge 1 && "$i" -le "$n" ]] || die "cluster $cmd: a node from 1 to $n"
      if [[ "$cmd" == kill ]]; then as_node "$n" "$i" kill; else as_node "$n" "$i" start; fi
      ;;
    status)
      n="$(cluster_size)"
      local down=0
      for ((i = 1; i <= n; i++)); do
        if as_node "$n" "$i" status >/dev/null 2>&1; then log "node $i: up"; else log "node $i: down"; down=1; fi
      done
      cluster_bootstrap "$n"
      return "$down"
      ;;
    reset)
      if [[ -f "$CLUSTER_SIZE_FILE" ]]; then cmd_cluster stop; fi
      rm -rf -- "$KAFKA_CLUSTER_DIR"
      log "deleted $KAFKA_CLUSTER_DIR"
      ;;
    *) die "usage: $0 cluster start [N] | stop | kill I | restart I | status | reset" ;;
  esac
}

# kill -9 of this node's JVM, as a crash would.
cmd_kill() {
  local pid
  pid="$(broker_pid)" || { log "not running ($KAFKA_DATA_DIR)"; return 0; }
  log "kill -9 of pid $pid"
  kill -KILL "$pid"
  while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
}

usage() {
  sed -n '2,/^set -euo/p' "$BASH_SOURCE_ABS" | sed -e '$d' -e 's/^# \{0,1\}//'
}

main() {
  local cmd="${1:-}"
  [[ $# -gt 0 ]] && shift
  case "$cmd" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    restart) cmd_stop; cmd_start ;;
    status) cmd_status ;;
    reset) cmd_reset ;;
    wait) wait_answering ;;
    kill) cmd_kill ;;
    cluster) cmd_cluster "$@" ;;
    topics) KAFKA_EXEC=1 run_class org.apache.kafka.tools.TopicCommand --bootstrap-server "$BOOTSTRAP" "$@" ;;
    run-class)
      [[ $# -ge 1 ]] || die "usage: $0 run-class CLASS [ARGS...]"
      KAFKA_EXEC=1 run_class "$@" ;;
    -h|--help|help) usage ;;
    *) usage >&2; exit 2 ;;
  esac
}

main "$@"
