#!/usr/bin/env python3
"""Structural checks of the deployment kit, called by scripts/deploy-check.sh.

    python3 deploy/check/kit_checks.py CHECK [ARGS...]

Each check prints a one-line summary and exits 0, or prints what is wrong and exits 1. Run
from the repository root. Needs PyYAML (deploy-check.sh installs it in its venv).
"""

import json
import re
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path.cwd()
DEPLOY = ROOT / "deploy"
METRICS_FILE = DEPLOY / "metrics.txt"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "im-meter.json"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
K8S = DEPLOY / "kubernetes"
DOCS = ROOT / "docs" / "operations.md"
EXAMPLE_CONFIG = DEPLOY / "im-meter.toml"

# Series Prometheus records itself for every target: allowed in expressions, not exposed by
# the worker.
PROMETHEUS_SERIES = {"up"}

PROMQL_KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "offset", "bool", "inf", "nan", "atan2",
}


class CheckError(Exception):
    pass


def fail(problems):
    for p in problems:
        print(p)
    sys.exit(1)


# --- metric names ----------------------------------------------------------------------------

def load_metrics():
    """name -> (type, labels) from deploy/metrics.txt."""
    metrics = {}
    for n, line in enumerate(METRICS_FILE.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 3 or parts[1] not in ("counter", "gauge", "histogram"):
            raise CheckError(f"{METRICS_FILE}:{n}: expected 'name type labels', got {line!r}")
        labels = [] if parts[2] == "-" else parts[2].split(",")
        metrics[parts[0]] = (parts[1], labels)
    return metrics


def series_names(metrics):
    """Every series name the worker's metrics produce (histograms: _bucket, _sum, _count)."""
    names = set()
    for name, (kind, _) in metrics.items():
        if kind == "histogram":
            names.update(name + s for s in ("_bucket", "_sum", "_count"))
        else:
            names.add(name)
    return names


def promql_metric_names(expr):
    """Metric names an expression selects. A lexical pass, good enough for our own queries:
    strings, label matchers, ranges and by/without/on/ignoring lists are removed, and the
    identifiers left that are not followed by '(' (functions, aggregations) nor keywords are
    metric names."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"'(?:[^'\\]|\\.)*'", "''", s)
    s = re.sub(r"`[^`]*`", "``", s)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", s):
        tok = m.group(0)
        if s[m.end():].lstrip().startswith("("):
            continue
        if tok.lower() in PROMQL_KEYWORDS:
            continue
        names.add(tok)
    return names


def check_names(exprs, allowed, where):
    problems = []
    used = set()
    for label, expr in exprs:
        names = promql_metric_names(expr)
        used |= names
        for name in sorted(names - allowed):
            problems.append(f"{where}: {label}: unknown metric {name!r} in: {expr}")
    return problems, used


# --- alerting rules --------------------------------------------------------------------------

def alert_rules():
    doc = yaml.safe_load(ALERTS.read_text())
    alerts, records = [], []
    for group in doc["groups"]:
        for rule in group["rules"]:
            (alerts if "alert" in rule else records).append(rule)
    return alerts, records


def github_anchors(markdown):
    anchors = set()
    for line in markdown.splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
            anchors.add(slug)
    return anchors


def cmd_alerts_conventions():
    alerts, _ = alert_rules()
    tests = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    firing, quiet = set(), set()
    for t in tests:
        for case in t.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    anchors = github_anchors(DOCS.read_text()) if DOCS.exists() else set()
    problems = []
    names = [a["alert"] for a in alerts]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"alert {dup} is defined twice")
    for a in alerts:
        name = a["alert"]
        sev = a.get("labels", {}).get("severity")
        if sev not in ("critical", "warning"):
            problems.append(f"{name}: labels.severity must be critical or warning, is {sev!r}")
        ann = a.get("annotations", {})
        for key in ("summary", "description", "runbook"):
            if not ann.get(key):
                problems.append(f"{name}: annotation {key} missing")
        runbook = ann.get("runbook", "")
        if runbook:
            path, _, anchor = runbook.partition("#")
            if path != "docs/operations.md" or anchor not in anchors:
                problems.append(f"{name}: runbook {runbook!r} is not a heading of docs/operations.md")
        if name not in firing:
            problems.append(f"{name}: no test in alerts_test.yml where it fires")
        if name not in quiet:
            problems.append(f"{name}: no test in alerts_test.yml where it stays quiet")
    for name in sorted((firing | quiet) - set(names)):
        problems.append(f"alerts_test.yml tests unknown alert {name}")
    if problems:
        fail(problems)
    print(f"{len(alerts)} alerts: severity, summary/description/runbook, firing and quiet tests")


def cmd_alerts_metrics():
    metrics = load_metrics()
    alerts, records = alert_rules()
    allowed = series_names(metrics) | PROMETHEUS_SERIES | {r["record"] for r in records}
    exprs = [(r.get("alert") or r.get("record"), r["expr"]) for r in alerts + records]
    problems, used = check_names(exprs, allowed, "alerts.yml")
    if problems:
        fail(problems)
    print(f"{len(exprs)} rule expressions use {len(used)} known series names")


# --- Grafana -------------------------------------------------------------------------------

def dashboard_panels(dash):
    for p in dash.get("panels", []):
        yield p
        for inner in p.get("panels", []):
            yield inner


def dashboard_targets(dash):
    for p in dashboard_panels(dash):
        for t in p.get("targets", []):
            yield p, t


GRAFANA_VARS = {
    "$__rate_interval": "5m", "${__rate_interval}": "5m", "$__interval": "1m",
    "${__interval}": "1m", "$__range": "1h", "${__range}": "1h",
}


def cmd_dashboard():
    problems = []
    try:
        dash = json.loads(DASHBOARD.read_text())
    except json.JSONDecodeError as e:
        fail([f"{DASHBOARD}: not JSON: {e}"])
    for key in ("title", "uid", "panels", "schemaVersion", "templating"):
        if key not in dash:
            problems.append(f"dashboard: key {key!r} missing")
    if not 36 <= dash.get("schemaVersion", 0) <= 41:
        problems.append(f"dashboard: schemaVersion {dash.get('schemaVersion')} outside 36-41")
    variables = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}
    ds_var = variables.get("datasource")
    if not ds_var or ds_var.get("type") != "datasource" or ds_var.get("query") != "prometheus":
        problems.append("dashboard: needs a templating variable 'datasource' of type datasource (prometheus)")
    ids = [p.get("id") for p in dashboard_panels(dash)]
    for dup in sorted({i for i in ids if ids.count(i) > 1}, key=str):
        problems.append(f"dashboard: panel id {dup} used twice")
    for p in dashboard_panels(dash):
        where = f"panel {p.get('id')} {p.get('title')!r}"
        if "gridPos" not in p or not {"h", "w", "x", "y"} <= set(p["gridPos"]):
            problems.append(f"{where}: gridPos missing or incomplete")
        elif p["gridPos"]["x"] + p["gridPos"]["w"] > 24:
            problems.append(f"{where}: wider than the 24-column grid")
        if p.get("type") == "row":
            continue
        if p.get("datasource", {}).get("uid") != "${datasource}":
            problems.append(f"{where}: datasource must be the ${{datasource}} variable")
        if not p.get("targets"):
            problems.append(f"{where}: no targets")
        refs = [t.get("refId") for t in p.get("targets", [])]
        if len(set(refs)) != len(refs) or None in refs:
            problems.append(f"{where}: refIds missing or repeated")
        for t in p.get("targets", []):
            if not t.get("expr"):
                problems.append(f"{where}: target {t.get('refId')} has no expr")
            if t.get("datasource", {}).get("uid") != "${datasource}":
                problems.append(f"{where}: target {t.get('refId')} datasource must be ${{datasource}}")
    cells = {}
    for p in dashboard_panels(dash):
        g = p.get("gridPos", {})
        for x in range(g.get("x", 0), g.get("x", 0) + g.get("w", 0)):
            for y in range(g.get("y", 0), g.get("y", 0) + g.get("h", 0)):
                if (x, y) in cells and cells[(x, y)] != p.get("id"):
                    problems.append(f"panel {p.get('id')} overlaps panel {cells[(x, y)]} at x={x} y={y}")
                    break
                cells[(x, y)] = p.get("id")
            else:
                continue
            break
    metrics = load_metrics()
    allowed = series_names(metrics) | PROMETHEUS_SERIES
    exprs = [(f"panel {p['id']} {p['title']!r} {t['refId']}", t["expr"])
             for p, t in dashboard_targets(dash) if t.get("expr")]
    for v in variables.values():
        q = v.get("definition") or ""
        m = re.match(r"label_values\((.*),\s*\w+\)$", q)
        if m:
            exprs.append((f"variable {v['name']}", m.group(1)))
    name_problems, used = check_names(exprs, allowed, "dashboard")
    problems += name_problems
    unused = sorted(n for n in metrics
                    if not used & {n, n + "_bucket", n + "_sum", n + "_count"})
    if unused:
        problems.append(f"dashboard: metrics shown nowhere: {', '.join(unused)}")
    if problems:
        fail(problems)
    panels = sum(1 for p in dashboard_panels(dash) if p.get("type") != "row")
    print(f"{panels} panels, {len(exprs)} expressions, {len(used)} known series names, every metric shown")


def cmd_dashboard_rules(out):
    """Writes the dashboard's expressions as recording rules, for `promtool check rules`."""
    dash = json.loads(DASHBOARD.read_text())
    rules = []
    for p, t in dashboard_targets(dash):
        expr = t.get("expr", "")
        for var, value in GRAFANA_VARS.items():
            expr = expr.replace(var, value)
        rules.append({"record": f"dashboard:panel_{p['id']}:{t['refId'].lower()}", "expr": expr})
    Path(out).write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    print(f"{len(rules)} expressions written to {out}")


def cmd_grafana_provisioning():
    problems = []
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uids = {d.get("uid") for d in ds["datasources"] if d.get("type") == "prometheus"}
    dash = json.loads(DASHBOARD.read_text())
    default = next(v for v in dash["templating"]["list"] if v["name"] == "datasource")
    if default.get("current", {}).get("value") not in uids:
        problems.append(f"dashboard's default datasource {default.get('current')} is not a provisioned uid {uids}")
    prov = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/im-meter.yml").read_text())
    paths = {p["options"]["path"] for p in prov["providers"]}
    compose = yaml.safe_load(COMPOSE.read_text())
    mounts = {}
    for v in compose["services"]["grafana"].get("volumes", []):
        src, dst = v.split(":")[:2]
        mounts[dst] = src
    for path in paths:
        src = mounts.get(path)
        if src is None:
            problems.append(f"dashboard provider path {path} is not mounted in the grafana service")
        elif not list((COMPOSE.parent / src).glob("*.json")):
            problems.append(f"dashboard provider path {path} <- {src}: no dashboard JSON there")
    if "/etc/grafana/provisioning" not in mounts:
        problems.append("grafana service does not mount the provisioning directory")
    if problems:
        fail(problems)
    print(f"datasource uid {sorted(uids)[0]!r}, dashboards from {sorted(paths)[0]}")


# --- YAML, compose, Dockerfile ---------------------------------------------------------------

def cmd_yaml():
    files = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml"))
    problems = []
    for f in files:
        try:
            docs = list(yaml.safe_load_all(f.read_text()))
            if not any(d is not None for d in docs):
                problems.append(f"{f.relative_to(ROOT)}: empty")
        except yaml.YAMLError as e:
            problems.append(f"{f.relative_to(ROOT)}: {e}")
    if problems:
        fail(problems)
    print(f"{len(files)} YAML files parse")


def cmd_compose_refs():
    compose = yaml.safe_load(COMPOSE.read_text())
    base = COMPOSE.parent
    problems = []
    services = compose["services"]
    for name, svc in services.items():
        build = svc.get("build")
        if build:
            ctx = base / (build if isinstance(build, str) else build.get("context", "."))
            if not ctx.is_dir():
                problems.append(f"{name}: build context {ctx} missing")
            dockerfile = ctx / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")
            if not dockerfile.is_file():
                problems.append(f"{name}: Dockerfile {dockerfile} missing")
        image = svc.get("image", "")
        if not build and (":" not in image or image.endswith(":latest")):
            problems.append(f"{name}: image {image!r} is not pinned to a tag")
        for v in svc.get("volumes", []):
            src = v.split(":")[0] if isinstance(v, str) else v.get("source", "")
            if src.startswith((".", "/")) and not (base / src).exists():
                problems.append(f"{name}: bind-mount source {src} missing")
            elif not src.startswith((".", "/")) and src not in (compose.get("volumes") or {}):
                problems.append(f"{name}: named volume {src} not declared")
        for env_file in ([svc["env_file"]] if isinstance(svc.get("env_file"), str) else svc.get("env_file", [])):
            if not (base / env_file).is_file():
                problems.append(f"{name}: env_file {env_file} missing")
        deps = svc.get("depends_on", {})
        if isinstance(deps, dict):
            for dep, cond in deps.items():
                if dep not in services:
                    problems.append(f"{name}: depends on unknown service {dep}")
                elif cond.get("condition") == "service_healthy" and "healthcheck" not in services[dep]:
                    problems.append(f"{name}: waits for {dep} to be healthy, but {dep} has no healthcheck")
        else:
            for dep in deps:
                if dep not in services:
                    problems.append(f"{name}: depends on unknown service {dep}")
    # The pieces that make the stack work together.
    worker_env = services["worker"].get("environment", {})
    if worker_env.get("IM_METER__HTTP__LISTEN", "").split(":")[0] != "0.0.0.0":
        problems.append("worker: IM_METER__HTTP__LISTEN must listen on 0.0.0.0 for Prometheus to reach it")
    if "IM_METER__KAFKA__BROKERS" not in worker_env:
        problems.append("worker: IM_METER__KAFKA__BROKERS not set")
    if services["worker"].get("depends_on", {}).get("kafka", {}).get("condition") != "service_healthy":
        problems.append("worker: must wait for kafka: service_healthy")
    kafka_env = services["kafka"].get("environment", {})
    for key in ("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
                "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"):
        if str(kafka_env.get(key)) != "1":
            problems.append(f"kafka: {key} must be 1 on a single broker")
    prom_mounts = {v.split(":")[1]: v.split(":")[0] for v in services["prometheus"].get("volumes", [])}
    src = prom_mounts.get("/etc/prometheus")
    if src is None:
        problems.append("prometheus: /etc/prometheus not mounted")
    else:
        conf_dir = base / src
        conf = yaml.safe_load((conf_dir / "prometheus.yml").read_text())
        for rf in conf.get("rule_files", []):
            if not (conf_dir / rf).is_file():
                problems.append(f"prometheus.yml: rule file {rf} not in the mounted {src}")
        for job in conf.get("scrape_configs", []):
            for sd in job.get("dns_sd_configs", []):
                for n in sd.get("names", []):
                    if n not in services:
                        problems.append(f"prometheus.yml: job {job['job_name']} discovers {n}, not a compose service")
    if problems:
        fail(problems)
    print(f"{len(services)} services; build context, Dockerfile, mounts, rule files and dependencies found")


def cmd_dockerfile_refs():
    problems = []
    lines = DOCKERFILE.read_text().replace("\\\n", " ").splitlines()
    copied = []
    for line in lines:
        words = line.split()
        if not words or words[0].upper() != "COPY" or any(w.startswith("--from") for w in words):
            continue
        srcs = [w for w in words[1:-1] if not w.startswith("--")]
        copied += srcs
        for s in srcs:
            if not (ROOT / s).exists():
                problems.append(f"Dockerfile: COPY source {s} does not exist in the context (repo root)")
    text = DOCKERFILE.read_text()
    if not re.search(r"^USER\s+(?!root|0\b)\S+", text, re.M):
        problems.append("Dockerfile: final stage must switch to a non-root USER")
    if not re.search(r"^EXPOSE\s+9464\b", text, re.M):
        problems.append("Dockerfile: EXPOSE 9464 missing")
    m = re.search(r"^ENTRYPOINT\s+(\[.*\])", text, re.M)
    if not m or json.loads(m.group(1))[:4] != ["/usr/local/bin/im-meter", "run", "--config", "/etc/im-meter/im-meter.toml"]:
        problems.append("Dockerfile: ENTRYPOINT must be [/usr/local/bin/im-meter, run, --config, /etc/im-meter/im-meter.toml]")
    # The Dockerfile-specific ignore file is an allow-list: it must let every COPY source in.
    ignore = DOCKERFILE.with_name("Dockerfile.dockerignore")
    if ignore.exists():
        allowed = [l.strip()[1:].rstrip("/") for l in ignore.read_text().splitlines() if l.strip().startswith("!")]
        for s in copied:
            if s.rstrip("/") not in allowed:
                problems.append(f"Dockerfile.dockerignore does not let {s} into the context")
    if problems:
        fail(problems)
    print(f"{len(copied)} COPY sources exist and pass Dockerfile.dockerignore; non-root USER, EXPOSE 9464")


# --- Kubernetes ------------------------------------------------------------------------------

def k8s_docs():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = []
    for res in kust["resources"]:
        for d in yaml.safe_load_all((K8S / res).read_text()):
            if d:
                docs.append((res, d))
    return kust, docs


def cmd_k8s_files():
    kust, _ = k8s_docs()
    missing = [r for r in kust["resources"] if not (K8S / r).is_file()]
    if missing:
        fail([f"kustomization.yaml lists missing {m}" for m in missing])
    print(" ".join(str((K8S / r).relative_to(ROOT)) for r in kust["resources"]))


def toml_keys(doc, prefix=""):
    keys = set()
    for k, v in doc.items():
        if isinstance(v, dict):
            keys |= toml_keys(v, f"{prefix}{k}.")
        else:
            keys.add(f"{prefix}{k}")
    return keys


def cmd_k8s_policy():
    problems = []
    _, docs = k8s_docs()
    by_kind = {}
    for res, d in docs:
        if "namespace" in d.get("metadata", {}):
            problems.append(f"{res}: {d['kind']} sets a namespace (the manifests are namespace-free)")
        by_kind.setdefault(d["kind"], []).append(d)
    for kind in ("ConfigMap", "StatefulSet", "Service", "PodDisruptionBudget"):
        if kind not in by_kind:
            problems.append(f"no {kind} in the kustomization")
    if problems:
        fail(problems)
    sts = by_kind["StatefulSet"][0]
    spec = sts["spec"]
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    if spec["selector"]["matchLabels"].items() - labels.items():
        problems.append("StatefulSet: selector does not match the pod labels")
    services = {s["metadata"]["name"]: s for s in by_kind["Service"]}
    if spec.get("serviceName") not in services:
        problems.append(f"StatefulSet: serviceName {spec.get('serviceName')} is not a Service here")
    if pod.get("terminationGracePeriodSeconds", 30) < 60:
        problems.append("StatefulSet: terminationGracePeriodSeconds must be >= 60")
    if not pod.get("securityContext", {}).get("runAsNonRoot"):
        problems.append("StatefulSet: pod securityContext.runAsNonRoot must be true")
    c = pod["containers"][0]
    sc = c.get("securityContext", {})
    if not sc.get("readOnlyRootFilesystem") or sc.get("allowPrivilegeEscalation", True):
        problems.append("StatefulSet: container needs readOnlyRootFilesystem true, allowPrivilegeEscalation false")
    if c.get("readinessProbe", {}).get("httpGet", {}).get("path") != "/readyz":
        problems.append("StatefulSet: readinessProbe must GET /readyz")
    if c.get("livenessProbe", {}).get("httpGet", {}).get("path") != "/healthz":
        problems.append("StatefulSet: livenessProbe must GET /healthz")
    res = c.get("resources", {})
    for part in ("requests", "limits"):
        if not {"cpu", "memory"} <= set(res.get(part, {})):
            problems.append(f"StatefulSet: resources.{part} needs cpu and memory")
    env = {e["name"]: e for e in c.get("env", [])}
    iid = env.get("IM_METER__KAFKA__INSTANCE_ID", {})
    if iid.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != "metadata.name":
        problems.append("StatefulSet: IM_METER__KAFKA__INSTANCE_ID must come from metadata.name")
    ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    if ports.get("http") != 9464:
        problems.append("StatefulSet: container port 'http' must be 9464")
    # The config file the ConfigMap provides, mounted where the command reads it.
    cm = {m["metadata"]["name"]: m for m in by_kind["ConfigMap"]}
    cmd = c.get("command", []) + c.get("args", [])
    config_path = cmd[cmd.index("--config") + 1] if "--config" in cmd else None
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    mounted = False
    for m in c.get("volumeMounts", []):
        v = vols.get(m["name"], {})
        name = v.get("configMap", {}).get("name")
        if name in cm and config_path and config_path.startswith(m["mountPath"].rstrip("/") + "/"):
            key = config_path[len(m["mountPath"].rstrip("/")) + 1:]
            if key not in cm[name].get("data", {}):
                problems.append(f"ConfigMap {name} has no key {key} for --config {config_path}")
            else:
                mounted = True
                conf = tomllib.loads(cm[name]["data"][key])
                unknown = toml_keys(conf) - toml_keys(tomllib.loads(EXAMPLE_CONFIG.read_text()))
                if unknown:
                    problems.append(f"ConfigMap {name}: keys not in deploy/im-meter.toml: {sorted(unknown)}")
    if not mounted:
        problems.append(f"--config {config_path} is not a key of a mounted ConfigMap")
    scraped = [s for s in services.values() if s["metadata"].get("annotations", {}).get("prometheus.io/scrape") == "true"]
    if not scraped:
        problems.append("no Service carries prometheus.io/scrape: \"true\"")
    for s in scraped:
        ann = s["metadata"]["annotations"]
        if ann.get("prometheus.io/port") != "9464" or ann.get("prometheus.io/path") != "/metrics":
            problems.append(f"Service {s['metadata']['name']}: prometheus.io/port 9464 and path /metrics expected")
        if not any(p["port"] == 9464 for p in s["spec"]["ports"]):
            problems.append(f"Service {s['metadata']['name']}: does not expose 9464")
    for s in services.values():
        if s["spec"]["selector"].items() - labels.items():
            problems.append(f"Service {s['metadata']['name']}: selector does not match the pods")
    pdb = by_kind["PodDisruptionBudget"][0]["spec"]
    if pdb.get("maxUnavailable") != 1:
        problems.append("PodDisruptionBudget: maxUnavailable must be 1")
    if pdb["selector"]["matchLabels"].items() - labels.items():
        problems.append("PodDisruptionBudget: selector does not match the pods")
    if problems:
        fail(problems)
    print("probes, resources, security context, grace period, instance id, config mount, scrape annotations, PDB")


# --- docs ------------------------------------------------------------------------------------

def cmd_docs():
    if not DOCS.exists():
        fail([f"{DOCS.relative_to(ROOT)} missing"])
    text = DOCS.read_text()
    problems = []
    for name in load_metrics():
        if f"`{name}`" not in text:
            problems.append(f"docs/operations.md: metric {name} not documented")
    alerts, _ = alert_rules()
    for a in alerts:
        if not re.search(rf"^#+\s+{a['alert']}\s*$", text, re.M):
            problems.append(f"docs/operations.md: no runbook heading for alert {a['alert']}")
    if problems:
        fail(problems)
    print(f"every metric ({len(load_metrics())}) and alert ({len(alerts)}) documented")


# --- runtime smoke test: a real Prometheus against a synthetic exporter -----------------------

# Label values of the synthetic exporter: the documented sets (docs/operations.md), a few of
# each open-ended one.
LABEL_VALUES = {
    "type": ["login", "logout", "connect", "disconnect", "heartbeat", "group_stats", "invalid"],
    "outcome": ["accepted", "duplicate", "rejected", "late"],
    "reason": ["not_utf8", "not_json", "not_object", "unknown_type", "missing_field", "invalid_field",
               "bad_timestamp", "timestamp_out_of_range", "late", "invalid_change"],
    "source": ["events", "subscriptions"],
    "stage": ["meter", "bill"],
    "consumer": ["0", "1"],
    "partition": ["0", "1", "2"],
    "kind": ["assign", "revoke"],
    "cause": ["broker", "fenced", "unknown_outcome", "fatal", "other"],
    "item": ["plan_fee", "mau_overage", "pcc", "av_call", "dau_overage", "group_overage"],
    "app_id": ["1400000001", "1400000002", "1400000003"],
    "version": ["0.1.0"],
}
BUCKETS = ["0.005", "0.01", "0.05", "0.1", "0.5", "1", "5", "10", "60", "300", "+Inf"]


def exposition(elapsed, now):
    """The worker's metrics as Prometheus text, values moving with time."""
    import itertools
    out = []
    for name, (kind, labels) in load_metrics().items():
        out.append(f"# HELP {name} synthetic")
        out.append(f"# TYPE {name} {kind}")
        combos = itertools.product(*(LABEL_VALUES[l] for l in labels)) if labels else [()]
        for i, combo in enumerate(combos):
            lbl = ",".join(f'{l}="{v}"' for l, v in zip(labels, combo))
            if kind == "counter":
                value = (1 + i % 3) * elapsed
            elif kind == "histogram":
                count = 2 * elapsed
                for j, le in enumerate(BUCKETS):
                    frac = 1.0 if le == "+Inf" else min(1.0, (j + 1) / 6)
                    sep = "," if lbl else ""
                    out.append(f'{name}_bucket{{{lbl}{sep}le="{le}"}} {count * frac}')
                out.append(f"{name}_sum{{{lbl}}} {count * 0.05}")
                out.append(f"{name}_count{{{lbl}}} {count}")
                continue
            elif name.endswith("_timestamp_seconds"):
                value = now - (3600 if "month_end" in name else 30)
            elif name in ("im_meter_ready", "im_meter_build_info"):
                value = 1
            else:
                value = 100 + 10 * i
            out.append(f"{name}{{{lbl}}} {value}" if lbl else f"{name} {value}")
    return "\n".join(out) + "\n"


def cmd_exposition(out):
    import time
    Path(out).write_text(exposition(60.0, time.time()))
    print(f"synthetic exposition written to {out}")


def cmd_serve_metrics(port_file, lifetime="120"):
    """Serves the synthetic exposition on 127.0.0.1 (a free port, written to port_file) for at
    most `lifetime` seconds."""
    import http.server
    import threading
    import time
    start = time.time()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = exposition(time.time() - start, time.time()).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    Path(port_file).write_text(str(server.server_address[1]))
    threading.Timer(float(lifetime), server.shutdown).start()
    server.serve_forever()


def prom_get(base, path, **params):
    import urllib.parse
    import urllib.request
    url = f"{base}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def cmd_smoke(base):
    """Against a Prometheus that scrapes the synthetic exporter as job im-meter and loads
    alerts.yml: every rule evaluates without error, every dashboard query returns data."""
    import time
    problems = []
    deadline = time.time() + 60
    while True:
        groups = prom_get(base, "/api/v1/rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        targets = prom_get(base, "/api/v1/targets")["data"]["activeTargets"]
        scrapes = prom_get(base, "/api/v1/query", query='count_over_time(up{job="im-meter"}[1m])')["data"]["result"]
        evaluated = rules and all(r.get("health") != "unknown" for r in rules)
        if evaluated and scrapes and float(scrapes[0]["value"][1]) >= 6:
            break
        if time.time() > deadline:
            fail([f"Prometheus did not scrape and evaluate in time: targets {targets}, {len(rules)} rules"])
        time.sleep(1)
    for t in targets:
        if t["health"] != "up":
            problems.append(f"target {t['scrapeUrl']}: {t['health']} {t.get('lastError')}")
    for r in rules:
        if r.get("health") != "ok":
            problems.append(f"rule {r.get('name')}: {r.get('health')} {r.get('lastError')}")
    dash = json.loads(DASHBOARD.read_text())
    subst = {**GRAFANA_VARS, "$__rate_interval": "15s", "$__range": "1m", "$job": "im-meter", "$instance": ".*"}
    n = 0
    for p, t in dashboard_targets(dash):
        expr = t["expr"]
        for var, value in sorted(subst.items(), key=lambda kv: -len(kv[0])):
            expr = expr.replace(var, value)
        res = prom_get(base, "/api/v1/query", query=expr)
        n += 1
        if res.get("status") != "success":
            problems.append(f"panel {p['title']!r} {t['refId']}: {res.get('error')}")
        elif not res["data"]["result"]:
            problems.append(f"panel {p['title']!r} {t['refId']}: no data for {expr}")
    if problems:
        fail(problems)
    print(f"{len(rules)} rules evaluate without error, {n} dashboard queries return data")


COMMANDS = {
    "yaml": cmd_yaml,
    "alerts-conventions": cmd_alerts_conventions,
    "alerts-metrics": cmd_alerts_metrics,
    "dashboard": cmd_dashboard,
    "dashboard-rules": cmd_dashboard_rules,
    "grafana-provisioning": cmd_grafana_provisioning,
    "compose-refs": cmd_compose_refs,
    "dockerfile-refs": cmd_dockerfile_refs,
    "k8s-files": cmd_k8s_files,
    "k8s-policy": cmd_k8s_policy,
    "docs": cmd_docs,
    "exposition": cmd_exposition,
    "serve-metrics": cmd_serve_metrics,
    "smoke": cmd_smoke,
}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: {sys.argv[0]} {{{'|'.join(COMMANDS)}}} [ARGS]")
    try:
        COMMANDS[sys.argv[1]](*sys.argv[2:])
    except CheckError as e:
        fail([str(e)])
    except (OSError, KeyError, IndexError, TypeError, ValueError, yaml.YAMLError) as e:
        fail([f"{type(e).__name__}: {e}"])
